#!/usr/bin/python3
"""Every call the proxy answered or reset is logged and counted once, as
the client saw it (docs/operations.md: access log, metrics, status table),
also calls refused before their header block was complete.
"""

import copy
import json
import os
import resource
import signal
import socket
import struct
import ssl
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
from test_attacks import (  # noqa: E402
    AttackCase, RawH2, attack_config, frame, hpack_block, INTERNAL_ERROR, MIB, SERVICE)
from test_operations import (  # noqa: E402
    parse_prometheus, sample, series, http_get, read_access_log, wait_access, ADMIN_RE)

import grpc  # noqa: E402
from test_operator_docs import h2c_config, scrape  # noqa: E402

WAIT = 10.0


class ObservedCase(AttackCase):
    """AttackCase with an admin listener and an access log file."""

    def setUp(self):
        H.SparkgateTestCase.setUp(self)
        self.dir = H.tempdir("sg-review5-")
        self.access_path = os.path.join(self.dir, "access.log")
        self.up = self.standin()
        cfg = attack_config(self.up.port, admin={"address": "127.0.0.1", "port": 0},
                            access_log={"path": self.access_path},
                            **self.config_overrides)
        self.sg = self.start_sparkgate(cfg)
        self.pid = self.sg.pid
        self.tls_port = self.sg.port("public")
        self.h2c_port = self.sg.port("dev")
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        self._controls = 0

    def scrape(self):
        status, _, body = http_get(self.admin, "/metrics")
        self.assertEqual(status, 200, body)
        return parse_prometheus(body.decode("utf-8"))

    def rpcs(self, samples, method, status, tenant="default"):
        return sample(samples, "sparkgate_rpcs_total", tenant=tenant, method=method,
                      grpc_status=str(status))


class ResetMidMessageLoggedWithoutStatusTest(ObservedCase):
    """docs/operations.md: access-log grpc_status is "null when the stream
    was reset without one", and a deadline or idle timeout that comes while
    the client is in the middle of a response message resets the stream
    (INTERNAL_ERROR). The client then gets no grpc-status at all, and the
    access log says so (it used to record the 4 the proxy had meant to
    send)."""

    config_overrides = {"stream_idle_timeout_ms": 1000}

    def test_reset_mid_message_is_not_logged_as_status_4(self):
        with RawH2(self.h2c_port, tls=False, auto_window=False) as c:
            # Messages of 1 MiB, 30 s apart: the client takes 64 KiB of the
            # first and no more; then no byte moves either way.
            sid = c.grpc_call(b"idle mid message", extra=H.standin_md(
                "stream", bytes=4 * MIB, chunk=1 * MIB, interval_ms=30000))
            st = c.streams[sid]
            c.wait(lambda: len(st.data) >= 65535, 10, "the first window of data")
            c.wait(lambda: st.done, 10, "the call ended at the stream idle timeout")
            # What the client saw: a reset, no grpc-status.
            self.assertEqual((st.reset, st.grpc_status), (INTERNAL_ERROR, None), st)
        recs = wait_access(self.access_path, lambda r: r["stream_id"] == sid and
                           r["method"].endswith("/ExecutePlan"))
        self.assertIsNone(recs[-1]["grpc_status"],
                          "the client got RST_STREAM(INTERNAL_ERROR) and no status, but "
                          "the access log says %r" % recs[-1])


class IncompleteHeaderBlockCountedTest(ObservedCase):
    """A request whose header block never completes (HEADERS without
    END_HEADERS, no CONTINUATION) is answered by the stream idle timeout
    with grpc-status 4, and the call gets its access-log line and its
    sparkgate_rpcs_total sample (calls whose header block had not completed
    used to get neither)."""

    config_overrides = {"stream_idle_timeout_ms": 1000}

    def test_call_answered_by_idle_timeout_is_logged_and_counted(self):
        before = self.scrape()
        total_before = sum(v for (n, _), v in before.items() if n == "sparkgate_rpcs_total")
        with RawH2(self.h2c_port, tls=False) as c:
            # Finish the SETTINGS exchange first: a SETTINGS ACK inside the
            # header block would be a connection error.
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            c.pump(0.3)
            sid = c.new_sid()
            block = hpack_block(c.request_headers(path=SERVICE + "Config"))
            c.send(frame(0x1, 0x0, sid, block))  # HEADERS, no END_HEADERS, no END_STREAM
            st = c.wait_stream(sid, timeout=10)
            self.assertEqual(st.grpc_status, 4, st)  # answered by the proxy
        deadline = time.monotonic() + 5
        while True:
            lines = [r for r in read_access_log(self.access_path) if r["stream_id"] == sid]
            after = self.scrape()
            total_after = sum(v for (n, _), v in after.items()
                              if n == "sparkgate_rpcs_total")
            if (lines and total_after > total_before) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertTrue(lines, "a call answered with grpc-status 4 has no access-log line")
        self.assertEqual(total_after - total_before, 1,
                         "a call answered with grpc-status 4 is not in sparkgate_rpcs_total")


class OversizedHeaderCallCountedTest(ObservedCase):
    """Status table row "RST_STREAM INTERNAL_ERROR (2): request header list
    over http2.max_header_list_bytes": the proxy refuses the call (stream
    reset), and the refused call gets its access-log line saying why."""

    def test_refused_oversized_header_call_is_logged(self):
        with RawH2(self.h2c_port, tls=False) as c:
            big = [("x-big-%d" % i, "v" * 4000) for i in range(6)]
            sid = c.grpc_call(b"big headers", path=SERVICE + "Config", extra=big)
            st = c.wait_stream(sid)
            self.assertEqual((st.reset, st.headers), (INTERNAL_ERROR, []), st)
            # A later call on the same connection is logged: the log is live.
            ok = c.wait_stream(c.grpc_call(b"fits", path=SERVICE + "Config"))
            self.assertEqual(ok.grpc_status, 0, ok)
        wait_access(self.access_path, lambda r: r["stream_id"] == ok.sid)
        lines = [r for r in read_access_log(self.access_path) if r["stream_id"] == sid]
        self.assertTrue(lines, "the call refused for its oversized header list has no "
                        "access-log line (refused by the proxy: it must have one)")
        self.assertIn("header list exceeds", lines[0].get("reason", ""), lines[0])
        self.assertIsNone(lines[0]["grpc_status"], lines[0])


class FailedReloadKeepsMetricsTest(H.SparkgateTestCase):
    """operations.md, "Reload": "Any error leaves the running configuration
    in force", and /metrics goes on showing that configuration's tenants
    and backends. Here the reload fails after its runtime was built: the
    access log path is a Unix socket, which passes the load check but
    cannot be opened."""

    def test_metrics_show_the_configuration_in_force_after_a_failed_reload(self):
        up = self.standin()
        cfg = h2c_config(up.port)
        cfg["tenants"].append({
            "name": "keep", "allow": {"any_identity": True}, "user_id": "off",
            "backends": [{"name": "k1", "address": "127.0.0.1", "port": up.port}]})
        sg = self.start_sparkgate(cfg)
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))

        def tenants():
            return sorted(dict(k)["tenant"]
                          for k in series(scrape(admin), "sparkgate_request_bytes_total"))

        def backends():
            return sorted("%s/%s" % (dict(k)["tenant"], dict(k)["backend"])
                          for k in series(scrape(admin), "sparkgate_upstream_connects_total"))

        before_t, before_b = tenants(), backends()
        self.assertEqual(before_t, ["default", "keep", "none"])

        d = H.tempdir("sg-observe-")
        sock_path = os.path.join(d, "access.log")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(unix.close)
        unix.bind(sock_path)  # open() of a socket fails with ENXIO
        new = copy.deepcopy(cfg)
        new["tenants"][1] = {
            "name": "added", "allow": {"any_identity": True}, "user_id": "off",
            "backends": [{"name": "a1", "address": "127.0.0.1", "port": up.port}]}
        new["access_log"] = {"path": sock_path}
        tmp = sg.config_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(new, f)
        os.replace(tmp, sg.config_path)
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload failed: access_log", timeout=WAIT, since=mark)

        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"m", metadata=[("x-spark-tenant", "keep")])
        self.assertEqual(r.code, grpc.StatusCode.OK, r)

        self.assertEqual(tenants(), before_t,
                         "/metrics shows the tenants of the configuration the reload "
                         "rejected, not of the one in force")
        self.assertEqual(backends(), before_b)


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def connect_many(port, n):
    """n non-blocking connects to 127.0.0.1:port, not waited for (a full
    accept queue must not make the test wait); returns the sockets."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def stop_then_elide(test, sg, since):
    """At cleanup, before the harness prints the log of a failed test: stop
    sparkgate (which ends any flood of accept-failure lines), then replace
    those lines by a count so that the log stays readable."""
    def run():
        sg.stop()
        with sg._cond:
            tail = sg.lines[since:]
            kept = [l for l in tail if "accept failed" not in l
                    and "Error from accept() call" not in l]
            if len(kept) != len(tail):
                kept.append("[test: %d accept-failure lines elided]" % (len(tail) - len(kept)))
            sg.lines[since:] = kept
    test.addCleanup(run)


class AdminConnectionsCannotStarveDataPathTest(H.SparkgateTestCase):
    """operations.md: the admin listener holds at most 64 connections and
    gives each 10 s for a request, so that whoever reaches the admin port
    (on Kubernetes it binds 0.0.0.0) cannot take the descriptors client
    connections need. Here RLIMIT_NOFILE is what the process holds plus
    150, and 400 connections are opened to the admin port: a gRPC call on
    the data path still succeeds."""

    def test_many_admin_connections_leave_the_data_path_serving(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port, workers=1))
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        ch = H.h2c_channel(sg.port("dev"))
        r = H.call_unary(ch, "Config", b"warm")  # upstream connection made
        ch.close()
        self.assertEqual(r.code, grpc.StatusCode.OK, r)

        stop_then_elide(self, sg, sg.mark())
        limit = open_fds(sg.pid) + 150
        resource.prlimit(sg.pid, resource.RLIMIT_NOFILE, (limit, limit))
        socks = connect_many(admin, 400)
        self.addCleanup(close_all, socks)
        time.sleep(0.5)  # let the main loop accept what it will

        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"m", timeout=3)
        held = open_fds(sg.pid)
        self.assertEqual(r.code, grpc.StatusCode.OK,
                         "with 400 admin connections open (the process holds %d of %d "
                         "descriptors) a client call fails: %r"
                         % (held, limit, r))
        sg.wait_for_log(r"admin: 64 connections open, the most it takes", timeout=5)


class AcceptErrorBackoffTest(H.SparkgateTestCase):
    """operations.md: when accept() fails for want of descriptors, each
    listener (client and admin) pauses and retries every 200 ms, logging
    once when it starts and once when it accepts again, instead of retrying
    at once in a busy loop (100% CPU, one log line per try). The
    descriptors are used up by client connections here; one more connection
    then waits in each accept queue for ~1 s."""

    MAX_LINES = 20  # in ~1.5 s; a back-off of even 100 ms logs at most ~15

    def exhaust(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port, workers=1))
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        stop_then_elide(self, sg, sg.mark())
        limit = open_fds(sg.pid) + 40
        resource.prlimit(sg.pid, resource.RLIMIT_NOFILE, (limit, limit))
        socks = connect_many(sg.port("dev"), 80)
        socks += connect_many(admin, 5)
        self.addCleanup(close_all, socks)
        mark = sg.mark()
        time.sleep(1.0)
        close_all(socks)
        time.sleep(0.5)
        with sg._cond:
            lines = sg.lines[mark:]
        # Once descriptors are free again the process serves.
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"m", timeout=5)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        return lines

    def test_client_listener_does_not_spin_on_emfile(self):
        lines = self.exhaust()
        n = sum(1 for l in lines if "listener dev: accept failed" in l)
        self.assertGreater(n, 0, "accept never failed: the test did not exhaust descriptors")
        self.assertLessEqual(n, self.MAX_LINES,
                             "%d 'accept failed' lines in ~1.5 s: the worker retries accept "
                             "in a busy loop while descriptors are exhausted" % n)

    def test_admin_listener_does_not_spin_on_emfile(self):
        lines = self.exhaust()
        self.assertTrue(any("listener dev: accept failed" in l for l in lines),
                        "accept never failed: the test did not exhaust descriptors")
        n = sum(1 for l in lines if "Error from accept() call" in l
                or "admin listener: accept failed" in l)
        self.assertLessEqual(n, self.MAX_LINES,
                             "%d admin accept-failure lines in ~1.5 s: the admin listener "
                             "retries accept in a busy loop on the main thread while "
                             "descriptors are exhausted" % n)


# ---------------------------------------------------------------------------
# Connections that end before HTTP/2: counted and logged with the cause

def tls_failures(samples, reason):
    return samples.get(("sparkgate_tls_handshake_failures_total",
                        frozenset({("reason", reason)})), 0.0)


def client_hello():
    """The bytes of a real ClientHello (ALPN h2, SNI localhost)."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = H.client_ssl_context().wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


# A TLS 1.2-framed close_notify alert (level warning, description 0), as a
# client sends it when it gives up before the handshake is done.
CLOSE_NOTIFY = bytes.fromhex("15030300020100")


class _TlsFrontCase(H.SparkgateTestCase):
    """One TLS listener "public", the admin listener, one worker, short
    handshake timeout."""

    def setUp(self):
        super().setUp()
        self.up = self.standin()
        cfg = H.base_config(self.up.port, workers=1, tls_handshake_timeout_ms=1000,
                            admin={"address": "127.0.0.1", "port": 0})
        self.sg = self.start_sparkgate(cfg)
        self.port = self.sg.port("public")
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)


class HandshakeClosedByClientTest(_TlsFrontCase):
    def test_client_that_closes_during_the_handshake_is_counted_closed_and_logged(self):
        """A client that connects and goes away before the TLS handshake is
        done (a TCP health check of a load balancer, a client killed, a
        client that closes right after its ClientHello, with or without
        close_notify, or with a reset) must be counted under
        sparkgate_tls_handshake_failures_total{reason="closed"} and logged at
        info with a line that says the client closed or reset the
        connection."""
        ch = client_hello()

        def fin():
            self.connect().close()

        def rst():
            s = self.connect()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

        def hello_then_fin():
            s = self.connect()
            s.sendall(ch)
            s.recv(1)  # the server's first flight has started: mid-handshake
            s.close()

        def hello_then_reset():
            s = self.connect()
            s.sendall(ch)
            s.recv(1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

        def hello_then_close_notify():
            s = self.connect()
            s.sendall(ch)
            s.recv(1)
            s.sendall(CLOSE_NOTIFY)
            time.sleep(0.2)
            s.close()

        for name, act in (("connect and close", fin), ("connect and reset", rst),
                          ("ClientHello and close", hello_then_fin),
                          ("ClientHello and reset", hello_then_reset),
                          ("ClientHello and close_notify", hello_then_close_notify)):
            with self.subTest(name):
                before = scrape(self.admin)
                mark = self.sg.mark()
                act()
                # Bounded: the close is seen within a moment (the handshake
                # timeout, 1 s, would count as "timeout" instead).
                deadline = time.monotonic() + 5
                while (time.monotonic() < deadline and
                       self.sg.find_log(r"conn=\d+ peer=127\.0\.0\.1:\d+: ", since=mark) is None):
                    time.sleep(0.05)
                time.sleep(0.2)
                after = scrape(self.admin)
                info = [x for x in self.sg.lines[mark:] if " info " in x and "conn=" in x]
                self.assertEqual(len(info), 1, "%s: want one info line saying why, got %r"
                                 % (name, self.sg.lines[mark:]))
                self.assertNotRegex(info[0], r"lib\(0\)|reason\(5\)",
                                    "%s: libevent's SSL_ERROR_SYSCALL printed as an "
                                    "OpenSSL error" % name)
                self.assertRegex(info[0], r"(?i)clos|reset",
                                 "%s: the line does not say the client closed" % name)
                self.assertEqual(
                    (tls_failures(after, "closed") - tls_failures(before, "closed"),
                     tls_failures(after, "protocol") - tls_failures(before, "protocol")),
                    (1, 0), "%s: counted as (closed, protocol); log: %s" % (name, info))
        self.assertTrue(self.sg.alive())


class WrongProtocolLogTest(H.SparkgateTestCase):
    def test_cleartext_client_on_tls_listener_and_tls_client_on_h2c_listener_are_named(self):
        """The most common client misconfiguration is the wrong transport:
        PySpark without ";use_ssl=true" speaks cleartext HTTP/2 (prior
        knowledge, "PRI * HTTP/2.0") to a TLS listener, and a client with
        use_ssl=true sends a TLS ClientHello to an "insecure" h2c listener.
        Each refusal must leave a line that says so (and so what to fix),
        not OpenSSL's "wrong version number" or nghttp2's "bad client
        magic"."""
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(
            up.port, workers=1,
            listeners=[H.tls_listener("public"), H.h2c_listener("dev")]))
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")

        def refusal_line(port, data):
            mark = sg.mark()
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                s.sendall(data)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # until the proxy closes
                    try:
                        if not s.recv(4096):
                            break
                    except socket.timeout:
                        pass
                    except OSError:
                        break
            finally:
                s.close()
            m = sg.wait_for_log(r"conn=\d+ peer=127\.0\.0\.1:\d+: (?:closing|rejected|"
                                r"TLS handshake failed|closed).*", timeout=5, since=mark)
            return m.group(0)

        with self.subTest("cleartext HTTP/2 to the TLS listener"):
            line = refusal_line(sg.port("public"), preface)
            self.assertRegex(line, r"(?i)cleartext|plaintext|not TLS|without TLS|use_ssl",
                             "cleartext HTTP/2 on the TLS listener is not named as such")
        with self.subTest("TLS to the h2c listener"):
            line = refusal_line(sg.port("dev"), client_hello())
            self.assertRegex(line, r"\bTLS\b",
                             "a TLS ClientHello on the h2c listener is not named as such")
        self.assertTrue(sg.alive())


if __name__ == "__main__":
    H.main()
