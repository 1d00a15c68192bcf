#!/usr/bin/python3
"""The backend side: TLS to backends, failover, connect and idle deadlines
of pooled connections, backends by host name and over IPv6. Each test
states what docs/ promise. Every wait is bounded."""

import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
from threaded_server import ThreadedServer  # noqa: E402
import spark_proto as P  # noqa: E402
import grpc  # noqa: E402
from test_tenants import hrw_rank, g_unary, make_config  # noqa: E402

OK = grpc.StatusCode.OK


class TlsNoH2Backend(ThreadedServer):
    """A TLS server (TLS 1.2 at most) that negotiates no ALPN protocol: it
    completes the handshake, then only reads until the peer goes away."""

    def __init__(self):
        p = H.pki()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(p.server_cert, p.server_key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.handshakes = 0
        super().__init__(backlog=16)

    def serve(self, c):
        c.settimeout(2)
        s = None
        try:
            s = self.ctx.wrap_socket(c, server_side=True)
            self.handshakes += 1
            s.settimeout(0.2)
            while not self.closed.is_set():
                try:
                    if not s.recv(4096):
                        break
                except socket.timeout:
                    continue
        except Exception:
            pass
        finally:
            (s or c).close()


class BackendWithoutAlpnH2(H.SparkgateTestCase):
    """docs/security.md "Failing backends": a backend that fails TLS is
    marked down and probed; docs/routing.md: with failover the session's
    calls go to the next backend that is up. A backend whose TLS handshake
    completes without ALPN h2 (a TLS 1.2 server with no h2) cannot serve
    either: it is marked down too, and failover moves its sessions. It
    used to be dropped without being marked down, so failover never
    happened and every call of its sessions was 14 for good."""

    def test_no_alpn_h2_backend_is_marked_down_and_failover_moves_session(self):
        bad = TlsNoH2Backend()
        self.addCleanup(bad.close)
        good = self.standin()
        p = H.pki()
        tenants = [{"name": "fo", "backends": [
            {"name": "fo-tls", "address": "127.0.0.1", "port": bad.port,
             "tls": {"ca": p.ca_cert, "sni": "localhost"}},
            {"name": "fo-h2c", "address": "127.0.0.1", "port": good.port}],
            "allow": {"any_identity": True}, "user_id": "off", "failover": True}]
        cfg = make_config([H.tls_listener("public")], tenants,
                          selectors=["header:x-spark-tenant"],
                          upstream={"connect_timeout_ms": 2000, "idle_timeout_ms": 60000})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port())
        self.addCleanup(ch.close)
        session = None
        for _ in range(200):
            s = str(uuid.uuid4())
            if hrw_rank("fo", "u", s, ["fo-tls", "fo-h2c"])[0] == "fo-tls":
                session = s
                break
        self.assertIsNotNone(session)
        codes = []
        for _ in range(6):
            r = g_unary(ch, "AnalyzePlan", P.request(b"x", session_id=session, user_id="u"),
                        [("x-spark-tenant", "fo")], timeout=10)
            codes.append(r.code)
            if r.code == OK:
                break
            time.sleep(0.2)
        self.assertGreater(bad.handshakes, 0, "the TLS backend was never tried")
        # The first call may find out the hard way; then the session must
        # fail over to fo-h2c.
        self.assertEqual(codes[-1], OK, "calls of a session whose backend cannot "
                         "speak h2 never fail over: %r" % codes)
        self.assertTrue(sg.find_log(r"backend fo-tls of tenant fo is down"),
                        "backend without ALPN h2 never marked down")


class ConnectDeadlineSurvivesCancelledCall(H.SparkgateTestCase):
    """docs/security.md: a backend that gives no HTTP/2 SETTINGS within
    upstream.connect_timeout_ms is 14 and marked down, also when the only
    call on such a connection was cancelled before (its deadline passed):
    the connect deadline keeps running. The cancel used to replace it with
    the idle timer, and the next call waited idle_timeout_ms on the same
    half-open connection."""

    def test_second_call_gets_14_at_connect_timeout(self):
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # never accepted: TCP completes, no SETTINGS ever
        self.addCleanup(hole.close)
        port = hole.getsockname()[1]
        cfg = H.base_config(port, workers=1,
                            upstream={"connect_timeout_ms": 1500, "idle_timeout_ms": 30000})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        H.wait_channel_ready(ch)
        r = H.call_unary(ch, "Config", b"first", timeout=0.4)
        self.assertEqual(r.code, grpc.StatusCode.DEADLINE_EXCEEDED, r)
        # Let the upstream RST_STREAM of the first call go out (and its
        # stream close) before the second call attaches; still well inside
        # the 1.5 s connect deadline.
        time.sleep(0.3)
        t0 = time.monotonic()
        r = H.call_unary(ch, "Config", b"second", timeout=8)
        took = time.monotonic() - t0
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE,
                         "a backend without SETTINGS held the call %.1f s (connect "
                         "timeout 1.5 s): %r" % (took, r))


class UpstreamIdleTimeout(H.SparkgateTestCase):
    """configuration.md: a pooled backend connection with no calls for
    upstream.idle_timeout_ms is closed."""

    def test_idle_upstream_connection_closed(self):
        up = self.standin()
        cfg = H.base_config(up.port, workers=1,
                            upstream={"connect_timeout_ms": 3000, "idle_timeout_ms": 400})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        for _ in range(3):
            r = H.call_unary(ch, "Config", b"i", timeout=10)
            self.assertEqual(r.code, OK, r)
        self.assertGreaterEqual(H.established_connections_to(up.port), 1)
        H.wait_until(lambda: H.established_connections_to(up.port) == 0, 5,
                     what="idle backend connection closed")


class BackendNamesAndFamilies(H.SparkgateTestCase):
    """routing.md: address is an IP address or a host name; tls.sni
    defaults to the address when it is a host name."""

    def _works(self, up, address, tls):
        cfg = H.base_config(up.port, backend_address=address, backend_tls=tls, workers=1,
                            upstream={"connect_timeout_ms": 3000})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"n", timeout=10)
        self.assertEqual((r.code, r.response), (OK, b"n"), r)

    def test_tls_backend_by_host_name(self):
        up = self.standin(tls=True)
        self._works(up, "localhost", {"ca": H.pki().ca_cert})

    def test_h2c_backend_by_host_name(self):
        self._works(self.standin(), "localhost", None)

    def test_ipv6_backend(self):
        try:
            up = self.standin(host="::1")
        except Exception as e:  # no IPv6 loopback here
            self.skipTest("no ::1: %s" % e)
        self._works(up, "::1", None)


class TcpKeepaliveTest(H.SparkgateTestCase):
    """configuration.md, tcp_keepalive_ms: client and backend connections
    get TCP keepalive (idle time in whole seconds, rounded up; probes every
    third of it; three of them), TCP_USER_TIMEOUT at the time the probes
    take but not below write_stall_timeout_ms, and TCP_NODELAY; 0 turns
    keepalive and the user timeout off; a reload applies to the
    connections made after it."""

    def options(self, sg, standin):
        client = H.tcp_socket_options(sg.pid, sg.port("public"), side="local")
        backend = H.tcp_socket_options(sg.pid, standin.port)
        if client is None or backend is None:
            self.skipTest("pidfd_getfd is not available here")
        return client, backend

    def call(self, sg):
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"k", timeout=10)
        self.assertEqual(r.code, OK, r)
        return ch

    def test_keepalive_on_both_sides(self):
        up = self.standin()
        cfg = H.base_config(up.port, workers=1, tcp_keepalive_ms=1500,
                            write_stall_timeout_ms=3000)
        sg = self.start_sparkgate(cfg)
        self.call(sg)
        client, backend = self.options(sg, up)
        # Probes take 2 + 3 x 1 s: the user timeout is that, raised to the
        # write stall timeout.
        want = {"nodelay": 1, "keepalive": 1, "keepidle": 2, "keepintvl": 1, "keepcnt": 3,
                "user_timeout": 5000}
        self.assertEqual(client, [want])
        self.assertEqual(backend, [want])
        sg.stop()
        cfg["write_stall_timeout_ms"] = 9000
        sg = self.start_sparkgate(cfg)
        self.call(sg)
        client, backend = self.options(sg, up)
        want["user_timeout"] = 9000
        self.assertEqual(client, [want])
        self.assertEqual(backend, [want])

    def test_default_zero_and_reload(self):
        up = self.standin()
        cfg = H.base_config(up.port, workers=1, upstream={"idle_timeout_ms": 200})
        sg = self.start_sparkgate(cfg)
        ch = self.call(sg)
        client, backend = self.options(sg, up)
        self.assertEqual([(o["keepalive"], o["keepidle"], o["keepintvl"], o["keepcnt"],
                           o["user_timeout"]) for o in client + backend],
                         [(1, 60, 20, 3, 120000)] * 2)
        # Off after a reload: for connections made after it.
        ch.close()
        H.wait_until(lambda: H.established_connections_to(up.port) == 0, 10,
                     what="the idle backend connection closed")
        cfg["tcp_keepalive_ms"] = 0
        with open(sg.config_path, "w") as f:
            json.dump(cfg, f)
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", since=mark)
        seen = []

        def new_connections_have_no_keepalive():
            # The worker takes the new configuration up on its own loop:
            # a connection accepted just before that still has the old.
            c = H.tls_channel(sg.port("public"))
            try:
                r = H.call_unary(c, "Config", b"k", timeout=10)
                self.assertEqual(r.code, OK, r)
                client, backend = self.options(sg, up)
            finally:
                c.close()
            seen.append((client, backend))
            return any(o["keepalive"] == 0 and o["user_timeout"] == 0 for o in client) and \
                [(o["nodelay"], o["keepalive"], o["user_timeout"]) for o in backend] == [(1, 0, 0)]

        H.wait_until(new_connections_have_no_keepalive, 10,
                     what="connections after the reload without keepalive")
        client, _ = seen[-1]
        self.assertTrue(all(o["nodelay"] == 1 for o in client), client)


if __name__ == "__main__":
    H.main()
