#!/usr/bin/python3
"""Host names through a real DNS exchange: sparkgate runs in a
mount namespace whose /etc/resolv.conf names the test's DNS server
(tests/lib/dns_server.py), so its resolver asks over UDP, as it does in a
Kubernetes pod, instead of answering from /etc/hosts. routing.md: a host
name is resolved for every new connection; its addresses are tried in
turn until one takes the TCP connection; a name that does not resolve
fails the call with UNAVAILABLE and says why. Backend connections to a
resolved name carry calls without Nagle's delay (TCP_NODELAY), as numeric
ones do. An identity provider's key URL whose host does not resolve says
so (security.md, "Identity providers"), not that a connection failed.
Needs root (a mount namespace); skipped otherwise. Every wait is
bounded."""

import os
import re
import socket
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
from dns_server import DnsServer  # noqa: E402
import grpc  # noqa: E402

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class DnsCase(H.SparkgateTestCase):
    """A DNS server for the class, and a resolv.conf naming it."""

    @classmethod
    def setUpClass(cls):
        if not H.mount_namespace_available():
            raise unittest.SkipTest("needs root and a mount namespace (unshare --mount)")
        cls.dns = DnsServer().start()
        cls.resolv_conf = cls.dns.resolv_conf(H.tempdir("sg-dns-"))

    @classmethod
    def tearDownClass(cls):
        cls.dns.stop()


class BackendByHostNameTest(DnsCase):

    def start(self, address, port, resolv_conf=None, **upstream):
        upstream.setdefault("connect_timeout_ms", 5000)
        cfg = H.base_config(port, backend_address=address, workers=1, upstream=upstream)
        sg = self.start_sparkgate(cfg, wrap=H.resolver_wrap(resolv_conf or self.resolv_conf))
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        return sg, ch

    def call(self, ch, body=b"d"):
        return H.call_unary(ch, "Config", body, timeout=15)

    def test_resolved_name_carries_calls_without_nagle_with_keepalive(self):
        up = self.standin()
        self.dns.set("one.sg.test", a=["127.0.0.1"])
        sg, ch = self.start("one.sg.test", up.port)
        r = self.call(ch, b"one")
        self.assertEqual((r.code, r.response), (OK, b"one"), r)
        self.assertGreaterEqual(self.dns.asked("one.sg.test"), 1,
                                "the name was not asked of the DNS server")
        opts = H.tcp_socket_options(sg.pid, up.port)
        if opts is None:
            self.skipTest("pidfd_getfd is not available here")
        self.assertEqual(len(opts), 1, opts)
        self.assertEqual(opts[0]["nodelay"], 1, "TCP_NODELAY is off on the backend connection")
        self.assertEqual(opts[0]["keepalive"], 1, opts)

    def test_next_address_after_a_refusal(self):
        # 127.0.0.2 is this host too, but nothing listens there on the port.
        up = self.standin()
        self.dns.set("two.sg.test", a=["127.0.0.2", "127.0.0.1"])
        sg, ch = self.start("two.sg.test", up.port)
        r = self.call(ch, b"two")
        self.assertEqual((r.code, r.response), (OK, b"two"), r)
        sg.wait_for_log(r"upstream spark-1 conn=1: 127\.0\.0\.2:%d: Connection refused; "
                        r"trying the backend's next address" % up.port)
        self.assertNotIn(" is down", sg.log_text())
        # The next calls ride the connection that was made.
        for i in range(3):
            r = self.call(ch, b"again %d" % i)
            self.assertEqual(r.code, OK, r)
        self.assertEqual(len(up.calls()), 4)

    def test_tls_backend_at_its_second_address(self):
        # The failed attempt's TLS state is not reused: the second address
        # gets a fresh handshake, checked against the certificate's name.
        up = self.standin(tls=True)
        self.dns.set("tls.sg.test", a=["127.0.0.2", "127.0.0.1"])
        cfg = H.base_config(up.port, backend_address="tls.sg.test", workers=1,
                            backend_tls={"ca": H.pki().ca_cert, "sni": "localhost"},
                            upstream={"connect_timeout_ms": 5000})
        sg = self.start_sparkgate(cfg, wrap=H.resolver_wrap(self.resolv_conf))
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        r = self.call(ch, b"tls")
        self.assertEqual((r.code, r.response), (OK, b"tls"), r)
        sg.wait_for_log(r"127\.0\.0\.2:%d: Connection refused; trying the backend's next "
                        r"address" % up.port)

    def test_next_address_after_one_that_does_not_answer(self):
        # 127.0.0.2 takes no connection: its listener's queue is full, so
        # the kernel drops the SYNs, as for a host that is down. It gets
        # its share of the connect timeout (half, of two addresses), then
        # the next address has the rest.
        up = self.standin()
        hole = socket.socket()
        self.addCleanup(hole.close)
        hole.bind(("127.0.0.2", up.port))
        hole.listen(0)
        filler = socket.create_connection(("127.0.0.2", up.port), timeout=5)
        self.addCleanup(filler.close)
        probe = socket.socket()
        self.addCleanup(probe.close)
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.2", up.port))
            self.skipTest("a full listen queue does not hold connects here")
        except (socket.timeout, BlockingIOError):
            pass
        self.dns.set("hole.sg.test", a=["127.0.0.2", "127.0.0.1"])
        sg, ch = self.start("hole.sg.test", up.port, connect_timeout_ms=4000)
        r = self.call(ch, b"hole")
        self.assertEqual((r.code, r.response), (OK, b"hole"), r)
        m = sg.wait_for_log(r"upstream spark-1 conn=1: 127\.0\.0\.2:%d: no answer within (\d+) ms; "
                            r"trying the backend's next address" % up.port)
        self.assertTrue(1000 <= int(m.group(1)) <= 2000, m.group(0))
        self.assertNotIn(" is down", sg.log_text())

    def test_ipv6_address_after_an_ipv4_refusal(self):
        try:
            up = self.standin(host="::1")
        except Exception as e:  # no IPv6 loopback here
            self.skipTest("no ::1: %s" % e)
        self.dns.set("dual.sg.test", a=["127.0.0.2"], aaaa=["::1"])
        sg, ch = self.start("dual.sg.test", up.port)
        r = self.call(ch, b"dual")
        self.assertEqual((r.code, r.response), (OK, b"dual"), r)
        self.assertEqual(len(up.calls()), 1)

    def test_every_address_refused(self):
        port = H.free_port()
        self.dns.set("dead.sg.test", a=["127.0.0.2", "127.0.0.3"])
        sg, ch = self.start("dead.sg.test", port)
        r = self.call(ch)
        self.assertEqual(r.code, UNAVAILABLE, r)
        sg.wait_for_log(
            r"backend spark-1 of tenant default is down: 127\.0\.0\.3:%d: Connection refused "
            r"\(address 2 of 2 of dead\.sg\.test; before it: 127\.0\.0\.2:%d: Connection "
            r"refused\)" % (port, port))

    def assert_unresolved(self, name, why, **upstream):
        """A call to backend |name| gets 14 and the log says the name did
        not resolve, and |why| (a regex)."""
        sg, ch = self.start(name, H.free_port(), **upstream)
        r = self.call(ch)
        self.assertEqual(r.code, UNAVAILABLE, r)
        sg.wait_for_log(r"backend spark-1 of tenant default is down: cannot resolve %s: %s"
                        % (re.escape(name), why))
        self.assertGreaterEqual(self.dns.asked(name), 1)

    def test_name_that_does_not_resolve(self):
        self.assert_unresolved("nx.sg.test", "")

    def test_dns_server_that_does_not_answer(self):
        self.dns.ignore("mute.sg.test")
        self.assert_unresolved("mute.sg.test", "no answer from DNS within 1000 ms",
                               connect_timeout_ms=1000)

    def test_search_domains_complete_short_names_but_not_absolute_ones(self):
        # As in a pod: search domains and ndots:5. A short name is completed
        # with them; a name with a trailing dot is absolute and asked as
        # written, even where a record under a search domain would answer.
        up = self.standin()
        conf = self.dns.resolv_conf(H.tempdir("sg-dns-search-"), search=["acme.test", "test"],
                                    ndots=5)
        self.dns.set("short.acme.test", a=["127.0.0.1"])
        sg, ch = self.start("short", up.port, resolv_conf=conf)
        r = self.call(ch, b"short")
        self.assertEqual((r.code, r.response), (OK, b"short"), r)
        self.assertGreaterEqual(self.dns.asked("short.acme.test"), 1)

        self.dns.set("abs.sg.test", a=["127.0.0.1"])
        self.dns.set("abs.sg.test.acme.test", a=["127.0.0.2"])  # nothing listens there
        sg, ch = self.start("abs.sg.test.", up.port, resolv_conf=conf)
        r = self.call(ch, b"abs")
        self.assertEqual((r.code, r.response), (OK, b"abs"), r)
        self.assertEqual(self.dns.asked("abs.sg.test.acme.test"), 0)
        self.assertEqual(self.dns.asked("abs.sg.test.test"), 0)
        self.assertGreaterEqual(self.dns.asked("abs.sg.test"), 1)

    def test_changed_record_is_followed_by_the_next_connection(self):
        first = self.standin()
        # A second server on the same port at another loopback address.
        try:
            second = self.standin_at("127.0.0.2", first.port)
        except OSError as e:
            self.skipTest("cannot bind 127.0.0.2:%d: %s" % (first.port, e))
        self.dns.set("move.sg.test", a=["127.0.0.1"])
        sg, ch = self.start("move.sg.test", first.port, idle_timeout_ms=300)
        r = self.call(ch, b"before")
        self.assertEqual(r.code, OK, r)
        self.dns.set("move.sg.test", a=["127.0.0.2"])
        # The pooled connection closes once idle; the next one asks again.
        H.wait_until(lambda: H.established_connections_to(first.port) == 0, 10,
                     what="the idle backend connection closed")
        r = self.call(ch, b"after")
        self.assertEqual(r.code, OK, r)
        self.assertEqual(len(first.calls()), 1)
        self.assertEqual(len(second.calls()), 1)

    def standin_at(self, host, port):
        s = H.StandIn(host=host, port=port).start()
        self.addCleanup(s.stop, 0.2)
        return s


class IdentityProviderHostNameTest(DnsCase):

    def test_key_url_whose_host_does_not_resolve(self):
        url = "https://nx.idp.test:8443/jwks"
        provider = {"name": "idp", "issuer": "https://nx.idp.test", "audiences": ["a"],
                    "ca_file": H.pki().ca_cert, "jwks_url": url}
        up = self.standin()
        cfg = H.base_config(up.port, workers=1,
                            listeners=[H.tls_listener("public", auth={"methods": ["jwt"]})],
                            auth={"jwt_providers": [provider]})
        sg = self.start_sparkgate(cfg, wrap=H.resolver_wrap(self.resolv_conf))
        sg.wait_for_log(r"identity provider idp: fetching %s failed: cannot resolve the "
                        r"URL's host name: .*; no keys yet" % re.escape(url))
        self.assertGreaterEqual(self.dns.asked("nx.idp.test"), 1)


if __name__ == "__main__":
    H.main()
