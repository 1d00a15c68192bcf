#!/usr/bin/python3
"""Several workers (2 to 4): what only shows when a process runs more than
one event loop. Most other tests run `workers: 1`.

Connections are placed on a chosen worker: at log_level debug every
accepted connection is logged `conn=ID peer=127.0.0.1:PORT: established`,
and a connection's id is (n * 256 + worker index) (src/conn.c), so a raw
connection's local port tells which worker took it. Connections are opened
until one lands on the wanted worker (bounded).

  PerWorkerLimitsTest       docs/routing.md "Limits": limits are counted
                            by each worker on the calls it carries, "a
                            process with W workers admits up to W times a
                            limit ... Size the limits per worker". One
                            client connection (one worker) must then get
                            the whole configured limit (each worker held
                            a share, the limit divided by W).
  PerClientCapWorkersTest   max_connections_per_client is one count for the
                            process: with 4 workers and a cap of 4, a
                            client's 2nd connection is admitted.
  MaxConnectionsCyclesTest  max_connections is one process-wide count: many
                            connect/close cycles of every kind over 4
                            workers leak no slot.
  ReloadStormWorkersTest    SIGHUPs in a row while calls run on every
                            worker: every worker switches, calls in flight
                            finish, metrics add up, no sanitizer report.
  DrainWorkersTest          SIGTERM with calls on every worker: all finish,
                            exit 0; a second SIGTERM exits at once (1).
  GrpcClientManySmallCallsTest  (any number of workers) a grpcio client's
                            quick small calls on one connection are not
                            taken for a WINDOW_UPDATE flood (it was cut
                            after ~500 calls).
  AccessLogWorkersTest      every worker's lines are whole JSON lines, and
                            SIGUSR1 moves every worker to the new file.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import spark_proto as P  # noqa: E402
import grpc  # noqa: E402
from test_attacks import RawH2  # noqa: E402
from test_operations import ADMIN_RE, http_get, parse_prometheus  # noqa: E402

SERVICE = H.SERVICE
OK = grpc.StatusCode.OK
WAIT = 15.0
MSG_LIMIT = "sparkgate: tenant over its limit, retry later"
MSG_UPLOAD = "sparkgate: tenant over its upload quota, retry later"


# ---------------------------------------------------------------------------
# Helpers

def new_session():
    return str(uuid.uuid4())


def spark_msg(payload=b"p", session_id=None):
    return P.request(payload, session_id=session_id or new_session())


def worker_of(sg, conn, timeout=WAIT):
    """The worker index that accepted RawH2 connection |conn| (debug log)."""
    local_port = conn.sock.getsockname()[1]
    rx = re.compile(r"conn=(\d+) peer=127\.0\.0\.1:%d: established" % local_port)
    m = sg.wait_for_log(rx, timeout=timeout)
    return int(m.group(1)) % 256


def conn_on_worker(sg, port, worker, tries=200):
    """A RawH2 h2c connection that worker |worker| accepted."""
    for _ in range(tries):
        c = RawH2(port, tls=False)
        c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
        if worker_of(sg, c) == worker:
            return c
        c.close()
    raise AssertionError("no connection landed on worker %d in %d tries" % (worker, tries))


def conns_on_every_worker(test, sg, port, n_workers):
    conns = []
    for w in range(n_workers):
        c = conn_on_worker(sg, port, w)
        test.addCleanup(c.close)
        conns.append(c)
    return conns


def rewrite_config(sg, cfg):
    tmp = sg.config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, sg.config_path)


def admin_port(sg):
    m = sg.wait_for_log(ADMIN_RE, timeout=WAIT)
    return int(m.group(1))


def scrape(sg):
    status, _, body = http_get(admin_port(sg), "/metrics")
    assert status == 200, status
    return parse_prometheus(body.decode() if isinstance(body, bytes) else body)


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_metric(sg, pred, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(sg)
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %.0fs; metrics:\n%s" % (
                what, timeout, "\n".join("%s%s %s" % (n, dict(l), v)
                                         for (n, l), v in sorted(s.items(), key=str)
                                         if n.startswith("sparkgate_"))))
        time.sleep(0.1)


def h2c_config(backend_port, workers, **top):
    cfg = H.base_config(backend_port, listeners=[H.h2c_listener("dev")], workers=workers,
                        **top)
    cfg["log_level"] = "debug"
    return cfg


# ---------------------------------------------------------------------------
# Limits: docs/routing.md says they are per worker.

class PerWorkerLimitsTest(H.SparkgateTestCase):
    """docs/routing.md, "Limits": "Limits are counted **by each worker
    thread** on the calls it carries (no locks on the data path): a process
    with W workers admits up to W times a limit in the worst case, and each
    replica counts on its own. Size the limits per worker."

    A client connection is served by one worker, and a PySpark session
    uses one connection. With 4 workers, a tenant configured with a limit
    of L must therefore get L on that one connection (each worker held
    ceil(L / W), so the operator who sized the limits per worker, as told,
    got a quarter of them on a single connection)."""

    WORKERS = 4

    @classmethod
    def setUpClass(cls):
        cls.up = H.start_standin()

        def t(name, **limits):
            return {"name": name,
                    "backends": [{"name": "b1", "address": "127.0.0.1", "port": cls.up.port}],
                    "allow": {"any_identity": True}, "user_id": "off", "limits": limits}

        cfg = h2c_config(cls.up.port, cls.WORKERS)
        cfg["tenants"] = [t("rpcs", max_concurrent_rpcs=2),
                          t("execs", max_concurrent_executions=2),
                          t("rate", requests_per_second=4, burst=4),
                          t("upload", upload_bytes_per_minute=100000)]
        cfg["tenant_selectors"] = ["header:x-spark-tenant"]
        cls.sg = H.Sparkgate(cfg).start()
        cls.port = cls.sg.port("dev")

    @classmethod
    def tearDownClass(cls):
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s" % rc)

    def setUp(self):
        super().setUp()
        self._started.append(self.sg)

    def conn(self):
        c = RawH2(self.port, tls=False)
        self.addCleanup(c.close)
        c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
        return c

    def call(self, c, tenant, method="AnalyzePlan", payload=b"x", live=False):
        extra = [("x-spark-tenant", tenant)]
        if live:
            extra += H.standin_md("stall", count=1, stall_ms=30000)
        sid = c.request(c.request_headers(SERVICE + method, extra=extra),
                        H.grpc_frame(spark_msg(payload), raw=True))
        if live:
            # The stand-in's stall sends its headers (and, streaming, a
            # message) and holds the call open.
            c.wait(lambda: c.streams[sid].headers or c.streams[sid].done, 10,
                   "the call is live")
            self.assertFalse(c.streams[sid].done, c.streams[sid])
            return sid
        return c.wait_stream(sid, 10)

    def status(self, s):
        return (s.grpc_status, s.header("grpc-message"))

    def test_max_concurrent_rpcs_on_one_connection(self):
        c = self.conn()
        self.call(c, "rpcs", live=True)
        s = self.call(c, "rpcs")
        self.assertEqual(
            s.grpc_status, 0,
            "max_concurrent_rpcs 2, workers 4, one connection: the 2nd call at once "
            "was refused (%r); docs/routing.md counts limits per worker" % (self.status(s),))

    def test_max_concurrent_executions_on_one_connection(self):
        c = self.conn()
        self.call(c, "execs", method="ExecutePlan", live=True)
        s = self.call(c, "execs", method="ExecutePlan")
        self.assertEqual(
            s.grpc_status, 0,
            "max_concurrent_executions 2, workers 4, one connection: the 2nd "
            "ExecutePlan at once was refused (%r)" % (self.status(s),))

    def test_requests_per_second_burst_on_one_connection(self):
        c = self.conn()
        got = [self.status(self.call(c, "rate")) for _ in range(4)]
        self.assertEqual(
            got, [(0, None)] * 4,
            "requests_per_second 4 (burst 4), workers 4, one connection: 4 calls "
            "after a quiet start: %r" % got)

    def test_upload_quota_on_one_connection(self):
        c = self.conn()
        s = self.call(c, "upload", method="AddArtifacts", payload=os.urandom(40000))
        self.assertEqual(
            s.grpc_status, 0,
            "upload_bytes_per_minute 100000, workers 4, one connection: a first "
            "40 kB upload was refused (%r)" % (self.status(s),))


# ---------------------------------------------------------------------------
# max_connections: one count for the process

class MaxConnectionsCyclesTest(H.SparkgateTestCase):
    """docs/configuration.md: max_connections counts "client connections
    across all listeners and workers (one count for the process)". With 4
    workers, connections that come and go in every way (clean close, reset
    with a call running, TLS connection closed mid-handshake, refused over
    the cap) must give their slot back: afterwards the cap still admits
    exactly the cap, and connections_open returns to 0."""

    CAP = 3

    def test_cycles_leak_no_slot(self):
        up = self.standin()
        cfg = H.base_config(up.port, listeners=[H.h2c_listener("dev"), H.tls_listener("public")],
                            workers=4, max_connections=self.CAP, idle_timeout_ms=60000,
                            admin={"address": "127.0.0.1", "port": 0})
        sg = self.start_sparkgate(cfg)
        port, tls_port = sg.port("dev"), sg.port("public")

        def admitted(c):
            try:
                c.wait(lambda: c.settings_acked, 2, "SETTINGS ACK")
            except TimeoutError:
                return False
            return bool(c.settings_acked) and not c.closed

        for cycle in range(25):
            conns = [RawH2(port, tls=False) for _ in range(self.CAP + 2)]
            ok = [c for c in conns if admitted(c)]
            self.assertLessEqual(len(ok), self.CAP, "cycle %d: %d admitted over a cap of %d"
                                 % (cycle, len(ok), self.CAP))
            if cycle % 3 == 1 and ok:
                # A call in flight, then the socket is simply dropped.
                ok[0].grpc_call(b"live", extra=H.standin_md("stall", count=1, stall_ms=30000))
                ok[0].wait(lambda: any(len(s.data) for s in ok[0].streams.values()), 5)
            if cycle % 3 == 2:
                # TLS connections that go away before their handshake ends.
                for _ in range(2):
                    s = socket.create_connection(("127.0.0.1", tls_port))
                    s.sendall(b"\x16\x03\x01\x00\x10")
                    s.close()
            for c in conns:
                c.close()

        wait_metric(sg, lambda s: value(s, "sparkgate_connections_open") == 0,
                    "connections_open back to 0 after every connection closed")
        # Now the cap admits exactly the cap.
        keep = []
        deadline = time.monotonic() + WAIT
        while len(keep) < self.CAP and time.monotonic() < deadline:
            c = RawH2(port, tls=False)
            if admitted(c):
                keep.append(c)
            else:
                c.close()
                time.sleep(0.05)
        try:
            self.assertEqual(len(keep), self.CAP, "after the cycles the cap of %d admits "
                             "only %d connections" % (self.CAP, len(keep)))
            for c in keep:
                sid = c.grpc_call(b"hello", path=SERVICE + "Config")
                self.assertEqual(c.wait_stream(sid, 10).grpc_status, 0)
            extra = RawH2(port, tls=False)
            self.assertFalse(admitted(extra), "a connection over the cap was admitted")
            extra.close()
        finally:
            for c in keep:
                c.close()
        self.assertEqual(sg.stop(), 0)


# ---------------------------------------------------------------------------
# max_connections_per_client: per-worker shares

class PerClientCapWorkersTest(H.SparkgateTestCase):
    """docs/configuration.md: max_connections_per_client caps "client
    connections from one IP address (any port), counted for the whole
    process". With a cap of 4 and 4 workers, a client's second connection
    on the worker that has its first is admitted (each worker held a share
    of 1, and refused it)."""

    def test_second_connection_under_the_cap(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port, 4, max_connections_per_client=4,
                                             idle_timeout_ms=60000))
        port = sg.port("dev")
        first = conn_on_worker(sg, port, 0)
        self.addCleanup(first.close)
        # A second connection on the same worker (bounded tries: the other
        # workers' connections are closed again at once).
        second = None
        for _ in range(200):
            c = RawH2(port, tls=False)
            try:
                c.wait(lambda: c.settings_acked, 2, "SETTINGS ACK")
            except TimeoutError:
                pass
            local = c.sock.getsockname()[1]
            refused = sg.find_log(r"refused connection from 127\.0\.0\.1:%d: "
                                  r"max_connections_per_client" % local)
            m = sg.find_log(r"conn=(\d+) peer=127\.0\.0\.1:%d: established" % local)
            if refused is not None or (m is not None and int(m.group(1)) % 256 == 0):
                second = c
                break
            c.close()
            time.sleep(0.02)
        self.assertIsNotNone(second, "no second connection reached worker 0")
        self.addCleanup(second.close)
        local = second.sock.getsockname()[1]
        refused = sg.find_log(r"refused connection from 127\.0\.0\.1:%d.*" % local)
        self.assertIsNone(refused, "max_connections_per_client 4, workers 4: a client's "
                          "2nd connection was refused (%s)" % (refused and refused.group(0)))
        sid = second.grpc_call(b"two", path=SERVICE + "Config")
        self.assertEqual(second.wait_stream(sid, 10).grpc_status, 0)


# ---------------------------------------------------------------------------
# Not about workers, found by the reload storm's background load

class GrpcClientManySmallCallsTest(H.SparkgateTestCase):
    """docs/security.md: WINDOW_UPDATE increments under 1 KiB take from the
    abuse budget only beyond two for each DATA frame sparkgate sent.
    grpcio (what PySpark uses) answers small responses with small
    WINDOW_UPDATEs: a plain client making quick small calls on one
    connection spent the budget in about 500 calls and was cut with GOAWAY
    ENHANCE_YOUR_CALM, the call in flight failing (14 "Socket closed"), as
    would any long ExecutePlan stream sharing the connection."""

    def test_thousand_small_calls_on_one_grpc_channel(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, listeners=[H.h2c_listener("dev")],
                                                workers=2))
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        for i in range(1000):
            r = H.call_unary(ch, "AnalyzePlan", b"small %d" % i)
            if r.code != OK:
                calm = sg.find_log(r"closing: too many .*ENHANCE_YOUR_CALM")
                self.fail("call %d of 1000 on one grpcio channel: %r; %s"
                          % (i + 1, r, calm.group(0) if calm else ""))


# ---------------------------------------------------------------------------
# Reload storm while calls run on every worker

class ReloadStormWorkersTest(H.SparkgateTestCase):
    """docs/operations.md, "Reload": new calls use the new configuration,
    also on connections already open; calls in flight finish on the one they
    started with; sparkgate_config_reloads_total{result="ok"} goes up once
    per reload. With 4 workers, SIGHUPs in a row while every worker carries
    a live call and other clients keep calling."""

    WORKERS = 4

    @staticmethod
    def reloads(sg, mark):
        with sg._cond:
            lines = sg.lines[mark:]
        return (len([l for l in lines if "reloading configuration" in l]),
                len([l for l in lines if "reload done" in l]))

    def test_reload_storm_with_calls_on_every_worker(self):
        up = self.standin()
        cfg = h2c_config(up.port, self.WORKERS, idle_timeout_ms=60000,
                         admin={"address": "127.0.0.1", "port": 0})
        sg = self.start_sparkgate(cfg)
        port = sg.port("dev")
        conns = conns_on_every_worker(self, sg, port, self.WORKERS)
        live = [c.live_call() for c in conns]

        # Background load on channels of its own (any worker).
        stop = threading.Event()
        results = []
        lock = threading.Lock()

        def load(i):
            ch = H.h2c_channel(port)
            try:
                n = 0
                while not stop.is_set():
                    r = H.call_unary(ch, "AnalyzePlan", b"bg %d %d" % (i, n), timeout=20)
                    with lock:
                        results.append(r)
                    n += 1
                    # Under ~100 calls/s per connection: faster, grpcio's
                    # small WINDOW_UPDATEs spend the abuse budget
                    # (GrpcClientManySmallCallsTest).
                    time.sleep(0.03)
            finally:
                ch.close()

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        futs = [pool.submit(load, i) for i in range(4)]
        restricted = json.loads(json.dumps(cfg))
        restricted["tenants"][0]["methods"] = ["AnalyzePlan", "Config"]
        # In between: another tenant comes and goes (selected by header
        # only), limits and backends change, so generations differ in shape.
        other = json.loads(json.dumps(cfg))
        extra_tenant = json.loads(json.dumps(cfg["tenants"][0]))
        extra_tenant.update(name="extra", limits={"max_concurrent_rpcs": 5,
                                                  "requests_per_second": 1000})
        other["tenants"][0]["limits"] = {"max_concurrent_rpcs": 100,
                                         "requests_per_second": 100000}
        other["tenants"][0]["backends"].append(
            {"name": "spark-2", "address": "127.0.0.1", "port": up.port, "weight": 0})
        other["tenants"].append(extra_tenant)
        other["tenant_selectors"] = ["header:x-spark-tenant", "authority"]
        other["tenants"][0]["hosts"] = ["127.0.0.1", "localhost"]
        files = [cfg, other, restricted]
        mark = sg.mark()
        try:
            for i in range(8):
                rewrite_config(sg, files[i % 3] if i < 7 else restricted)
                sg.send_signal(signal.SIGHUP)
                time.sleep(0.05)
            # The last file written is the restricted one. Signals may
            # coalesce: wait until every reload started has finished.
            H.wait_until(lambda: self.reloads(sg, mark) != (0, 0) and
                         self.reloads(sg, mark)[0] == self.reloads(sg, mark)[1],
                         WAIT, what="the reloads finish")
            time.sleep(0.5)  # a signal still pending starts one more
            H.wait_until(lambda: self.reloads(sg, mark)[0] == self.reloads(sg, mark)[1],
                         WAIT, what="the reloads finish")
            time.sleep(0.3)  # the workers pick the newest generation up
            time.sleep(0.5)
        finally:
            stop.set()
            for f in futs:
                f.result(timeout=60)
            pool.shutdown()
        n_done = self.reloads(sg, mark)[1]
        self.assertGreaterEqual(n_done, 1)
        self.assertIsNone(sg.find_log(r"reload failed", since=mark))
        bad = [r for r in results if r.code != OK]
        self.assertEqual(bad, [], "background calls failed during the reload storm")

        # Calls in flight on every worker survived.
        for c, sid in zip(conns, live):
            c.pump(0.1)
            self.assertFalse(c.streams[sid].done, "a live call ended at reload: %r"
                             % c.streams[sid])
        # Every worker uses the newest file: ExecutePlan now refused (7), on
        # connections opened before the storm.
        for w, c in enumerate(conns):
            sid = c.grpc_call(b"after", path=SERVICE + "ExecutePlan")
            s = c.wait_stream(sid, 10)
            self.assertEqual(s.grpc_status, 7, "worker %d still on an older configuration: "
                             "%r" % (w, s))
            sid = c.grpc_call(b"after", path=SERVICE + "Config")
            self.assertEqual(c.wait_stream(sid, 10).grpc_status, 0)

        s = scrape(sg)
        self.assertEqual(value(s, "sparkgate_config_reloads_total", result="ok"), n_done)
        self.assertEqual(value(s, "sparkgate_config_reloads_total", result="failed"), 0)
        self.assertEqual(value(s, "sparkgate_connections_open"),
                         self.WORKERS + 0.0, "only the 4 raw connections are open")
        for c in conns:
            c.close()
        n_ok = len(results)
        s = wait_metric(sg, lambda s: value(s, "sparkgate_connections_open") == 0 and
                        value(s, "sparkgate_streams_open") == 0,
                        "connections and streams back to 0")
        analyze_ok = value(s, "sparkgate_rpcs_total", tenant="default",
                           method="AnalyzePlan", grpc_status="0")
        self.assertEqual(analyze_ok, n_ok, "AnalyzePlan OK calls counted over the "
                         "workers and generations")
        self.assertEqual(value(s, "sparkgate_rpcs_total", tenant="default",
                               method="ExecutePlan", grpc_status="7"), self.WORKERS)
        self.assertEqual(value(s, "sparkgate_rpcs_total", tenant="default",
                               method="Config", grpc_status="0"), self.WORKERS)
        self.assertEqual(sg.stop(), 0)


# ---------------------------------------------------------------------------
# Drain with every worker busy

class DrainWorkersTest(H.SparkgateTestCase):
    """docs/operations.md: SIGTERM drains, then exit 0; a second one while
    draining exits at once (status 1). With 4 workers each carrying a call."""

    WORKERS = 4

    def test_drain_with_calls_on_every_worker(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port, self.WORKERS, drain_timeout_ms=20000))
        port = sg.port("dev")
        conns = conns_on_every_worker(self, sg, port, self.WORKERS)
        sids = []
        for c in conns:
            sids.append(c.grpc_call(b"slow", path=SERVICE + "AnalyzePlan",
                                    extra=H.standin_md(delay_ms=2000)))
        H.wait_until(lambda: len(up.calls()) >= self.WORKERS, WAIT, what="calls reach the backend")
        sg.send_signal(signal.SIGTERM)
        for w, (c, sid) in enumerate(zip(conns, sids)):
            s = c.wait_stream(sid, 15)
            self.assertEqual(s.grpc_status, 0, "worker %d: call in flight at SIGTERM: %r"
                             % (w, s))
            self.assertIsNotNone(c.wait(lambda: c.goaway is not None or c.closed, 10),
                                 "worker %d sent no GOAWAY" % w)
        rc = sg.wait(15)
        self.assertEqual(rc, 0)
        sg.check_sanitizers()

    def test_second_sigterm_exits_at_once(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port, self.WORKERS, drain_timeout_ms=60000))
        port = sg.port("dev")
        conns = conns_on_every_worker(self, sg, port, self.WORKERS)
        for c in conns:
            c.live_call()
        mark = sg.mark()
        sg.send_signal(signal.SIGTERM)
        sg.wait_for_log(r"draining", timeout=WAIT, since=mark)
        time.sleep(0.3)
        self.assertTrue(sg.alive(), "exited with calls in flight and 60 s to drain")
        sg.send_signal(signal.SIGTERM)
        self.assertEqual(sg.wait(10), 1)


# ---------------------------------------------------------------------------
# Access log from every worker

class AccessLogWorkersTest(H.SparkgateTestCase):
    """docs/operations.md: each access-log line is one write(2), so lines of
    different workers never interleave; SIGUSR1 reopens the file. With 4
    workers writing at once, every line must be one JSON object, one line
    per call, and after a rename + SIGUSR1 every worker writes to the new
    file."""

    WORKERS = 4

    def test_lines_whole_and_reopen(self):
        up = self.standin()
        d = H.tempdir("sg-rw-alog-")
        path = os.path.join(d, "access.log")
        cfg = h2c_config(up.port, self.WORKERS, access_log={"path": path})
        sg = self.start_sparkgate(cfg)
        port = sg.port("dev")
        conns = conns_on_every_worker(self, sg, port, self.WORKERS)
        long_sid = "s" * 79

        def burst(tag, n):
            sids = []
            for c in conns:
                for i in range(n):
                    sids.append((c, c.request(
                        c.request_headers(SERVICE + "AnalyzePlan",
                                          extra=[("user-agent", "ua-" + "u" * 1500)]),
                        H.grpc_frame(P.request(b"%s %d" % (tag, i), session_id=long_sid),
                                     raw=True))))
            for c, sid in sids:
                self.assertEqual(c.wait_stream(sid, 20).grpc_status, 0)
            return len(sids)

        n1 = burst(b"one", 25)
        rotated = path + ".1"
        os.rename(path, rotated)
        mark = sg.mark()
        sg.send_signal(signal.SIGUSR1)
        sg.wait_for_log(r"SIGUSR1: access log reopened", timeout=WAIT, since=mark)
        n2 = burst(b"two", 25)

        def lines(p, want):
            deadline = time.monotonic() + WAIT
            while True:
                with open(p, "rb") as f:
                    data = f.read()
                if data.count(b"\n") >= want or time.monotonic() > deadline:
                    return data
                time.sleep(0.1)

        old = lines(rotated, n1)
        new = lines(path, n2)
        for name, data, want in (("rotated", old, n1), ("new", new, n2)):
            self.assertTrue(data.endswith(b"\n"), name)
            recs = []
            for ln in data.split(b"\n")[:-1]:
                try:
                    recs.append(json.loads(ln))
                except ValueError:
                    self.fail("%s file: a line that is not JSON: %r" % (name, ln[:300]))
            self.assertEqual(len(recs), want, "%s file: %d lines for %d calls"
                             % (name, len(recs), want))
            workers = {r["conn_id"] % 256 for r in recs}
            self.assertEqual(workers, set(range(self.WORKERS)), name)
        self.assertEqual(sg.stop(), 0)


if __name__ == "__main__":
    H.main()
