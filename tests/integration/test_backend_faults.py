#!/usr/bin/python3
"""Backends that misbehave or change state mid-flight.

Each test scripts a backend (python-h2, or raw bytes) that does one wrong or
surprising thing, and checks what docs/security.md ("Failing backends"),
docs/operations.md (status table, access log, metrics) and
docs/routing.md (down backends, failover) promise. Every wait is bounded;
nothing here measures time.
"""

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
from threaded_server import ThreadedServer  # noqa: E402
import spark_proto as P  # noqa: E402
import grpc  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.errors  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402
from test_operations import (  # noqa: E402
    parse_prometheus, sample, http_get, wait_access, ADMIN_RE)
from test_tenants import hrw_rank  # noqa: E402

SERVICE = H.SERVICE
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", sid & 0x7FFFFFFF) + payload


def gframe(payload):
    return b"\x00" + struct.pack(">I", len(payload)) + payload


# ---------------------------------------------------------------------------
# A backend scripted per connection

class BConn:
    """One accepted backend connection, as the script sees it."""

    def __init__(self, backend, sock, index):
        self.backend = backend
        self.sock = sock
        self.index = index
        cfg = h2.config.H2Configuration(client_side=False, validate_outbound_headers=False,
                                        normalize_outbound_headers=False,
                                        validate_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.bodies = {}
        self.ended = set()
        self.open_now = set()
        self.max_open = 0
        self.closed = False
        self.state = {}

    def flush(self):
        out = self.h2.data_to_send()
        if out:
            self.sock.sendall(out)

    def raw(self, data):
        self.flush()
        self.sock.sendall(data)

    def answer(self, sid, messages, status="0", end=True):
        self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        for m in messages:
            self.h2.send_data(sid, gframe(m))
        if end:
            self.h2.send_headers(sid, [("grpc-status", status)], end_stream=True)
        self.flush()

    def close(self, rst=False):
        if self.closed:
            return
        self.closed = True
        try:
            if rst:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


class Script:
    """Override what a behaviour needs. Handlers run on the connection's
    thread; `backend.lock` guards the shared records."""

    settings = None  # dict for the first SETTINGS frame

    def on_connect(self, c):
        pass

    def on_request(self, c, sid, headers):
        pass

    def on_request_end(self, c, sid, body):
        c.answer(sid, [body[5:]])  # echo the (single) message

    def on_tick(self, c):
        pass

    def on_event(self, c, ev):
        pass


class ScriptedBackend:
    def __init__(self, scripts):
        """scripts: a list; connection N gets scripts[N] (the last repeats),
        each a Script instance or a callable returning one."""
        self.scripts = list(scripts)
        self.lock = threading.Lock()
        self.conns = []
        self.requests = []  # (conn index, stream id, headers)
        self.completed = []  # (conn index, stream id, body)
        self.closed = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def close(self):
        self.closed.set()
        self.sock.close()
        for t in list(self.threads):
            t.join(timeout=5)

    def n_conns(self):
        with self.lock:
            return len(self.conns)

    def snapshot(self):
        with self.lock:
            return list(self.requests), list(self.completed)

    def _accept(self):
        while not self.closed.is_set():
            try:
                s, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                idx = len(self.conns)
                c = BConn(self, s, idx)
                self.conns.append(c)
            sc = self.scripts[min(idx, len(self.scripts) - 1)]
            if not isinstance(sc, Script):
                sc = sc()
            t = threading.Thread(target=self._serve, args=(c, sc), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, c, sc):
        c.sock.settimeout(0.05)
        try:
            if sc.settings is not None:
                c.h2.local_settings = h2.settings.Settings(client=False,
                                                           initial_values=sc.settings)
            c.h2.initiate_connection()
            sc.on_connect(c)
            c.flush()
            while not self.closed.is_set() and not c.closed:
                sc.on_tick(c)
                if c.closed:
                    return
                c.flush()
                try:
                    data = c.sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                for ev in c.h2.receive_data(data):
                    sc.on_event(c, ev)
                    if isinstance(ev, h2.events.RequestReceived):
                        sid = ev.stream_id
                        hd = {(k.decode() if isinstance(k, bytes) else k):
                              (v.decode() if isinstance(v, bytes) else v) for k, v in ev.headers}
                        c.bodies[sid] = b""
                        c.open_now.add(sid)
                        c.max_open = max(c.max_open, len(c.open_now))
                        with self.lock:
                            self.requests.append((c.index, sid, hd))
                        sc.on_request(c, sid, hd)
                    elif isinstance(ev, h2.events.DataReceived):
                        if ev.stream_id in c.bodies:
                            c.bodies[ev.stream_id] += ev.data
                        if ev.flow_controlled_length:
                            c.h2.acknowledge_received_data(ev.flow_controlled_length,
                                                           ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        sid = ev.stream_id
                        c.ended.add(sid)
                        with self.lock:
                            self.completed.append((c.index, sid, c.bodies.get(sid, b"")))
                        sc.on_request_end(c, sid, c.bodies.get(sid, b""))
                    elif isinstance(ev, h2.events.StreamReset):
                        c.open_now.discard(ev.stream_id)
                    if c.closed:
                        return
                c.flush()
        except Exception:
            return
        finally:
            c.close()


# ---------------------------------------------------------------------------

def unary(ch, method, payload, md=(), timeout=15, session=None):
    req = P.request(payload, session_id=session) if session else P.request(payload)
    fn = ch.unary_unary(SERVICE + method)
    try:
        resp, call = fn.with_call(req, metadata=list(md), timeout=timeout)
        return H.CallResult(call.code(), call.details(), [resp], call.initial_metadata(),
                            call.trailing_metadata())
    except grpc.RpcError as e:
        return H.CallResult(e.code(), e.details(), [], e.initial_metadata(),
                            e.trailing_metadata())


def stream_call(ch, method, payload, timeout=15):
    """A server-streaming call; returns (code, details, messages)."""
    it = ch.unary_stream(SERVICE + method)(P.request(payload), timeout=timeout)
    got = []
    try:
        for m in it:
            got.append(m)
        return it.code(), it.details(), got
    except grpc.RpcError as e:
        return e.code(), e.details(), got


class Background:
    def __init__(self, fn, *a, **kw):
        self.result = None
        self.t = threading.Thread(target=self._run, args=(fn, a, kw), daemon=True)
        self.t.start()

    def _run(self, fn, a, kw):
        self.result = fn(*a, **kw)

    def get(self, timeout=30):
        self.t.join(timeout)
        if self.t.is_alive():
            raise TimeoutError("background call still running")
        return self.result


class UpCase(H.SparkgateTestCase):
    upstream = {"connect_timeout_ms": 2000, "idle_timeout_ms": 60000}
    extra = {}

    def start_with(self, scripts, **top):
        self.be = ScriptedBackend(scripts)
        self.addCleanup(self.be.close)
        self.dir = H.tempdir("sg-upbad-")
        self.access = os.path.join(self.dir, "access.log")
        cfg = H.base_config(self.be.port, workers=1,
                            admin={"address": "127.0.0.1", "port": 0},
                            access_log={"path": self.access},
                            upstream=dict(self.upstream))
        cfg.update(self.extra)
        cfg.update(top)
        self.sg = self.start_sparkgate(cfg)
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        self.ch = H.tls_channel(self.sg.port("public"))
        self.addCleanup(self.ch.close)
        return self.sg

    def scrape(self):
        status, _, body = http_get(self.admin, "/metrics")
        self.assertEqual(status, 200)
        return parse_prometheus(body.decode())

    def rpcs(self, method, status):
        return sample(self.scrape(), "sparkgate_rpcs_total", tenant="default",
                      method=method, grpc_status=str(status))

    def access_lines(self, pred=lambda r: True, n=1):
        return wait_access(self.access, pred, n=n)


class Http1Backend(ThreadedServer):
    """Not HTTP/2: answers whatever comes with an HTTP/1.1 400 (as an
    HTTP/1.1 server, or the Spark UI port, answers the h2c preface) and
    keeps the connection open until the peer closes it."""

    def __init__(self, close_after_answer=False):
        self.close_after_answer = close_after_answer
        super().__init__()

    def serve(self, c):
        c.settimeout(0.1)
        answered = False
        try:
            while not self.closed.is_set():
                try:
                    d = c.recv(65536)
                except socket.timeout:
                    continue
                if not d:
                    break
                if not answered:
                    answered = True
                    c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                              b"Content-Length: 11\r\nConnection: keep-alive\r\n\r\n"
                              b"bad request")
                    if self.close_after_answer:
                        break
        except OSError:
            pass
        finally:
            c.close()


class NotHttp2Backend(UpCase):
    """docs/security.md "Failing backends": a backend that cannot serve
    HTTP/2 ("offers no h2", "accepts and closes before its SETTINGS") is
    14, is marked down and probed; docs/routing.md: with failover its
    sessions move to the next backend that is up. An h2c backend address
    that answers HTTP/1.1 (a wrong port: an HTTP/1.1 server, Spark's UI)
    never sends SETTINGS either. Also sparkgate_upstream_connects_total
    counts every connection attempt and _connect_failures_total the ones
    that failed."""

    def test_http1_backend_is_marked_down_and_failover_moves_the_session(self):
        bad = Http1Backend()
        self.addCleanup(bad.close)
        good = self.standin()
        tenants = [{"name": "fo", "backends": [
            {"name": "fo-http1", "address": "127.0.0.1", "port": bad.port},
            {"name": "fo-good", "address": "127.0.0.1", "port": good.port}],
            "allow": {"any_identity": True}, "user_id": "off", "failover": True}]
        cfg = H.base_config(1, workers=1, admin={"address": "127.0.0.1", "port": 0},
                            upstream={"connect_timeout_ms": 2000, "idle_timeout_ms": 60000})
        cfg["tenants"] = tenants
        self.sg = self.start_sparkgate(cfg)
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        session = None
        for _ in range(200):
            s = str(uuid.uuid4())
            if hrw_rank("fo", P.DEFAULT_USER, s, ["fo-http1", "fo-good"])[0] == "fo-http1":
                session = s
                break
        self.assertIsNotNone(session)
        codes = []
        for _ in range(6):
            r = unary(ch, "AnalyzePlan", b"x", session=session, timeout=10)
            codes.append(r.code)
            if r.code == OK:
                break
            time.sleep(0.3)
        self.assertGreater(bad.accepts, 0, "the HTTP/1.1 backend was never tried")
        m = self.scrape()
        connects = sample(m, "sparkgate_upstream_connects_total", tenant="fo",
                          backend="fo-http1")
        failures = sample(m, "sparkgate_upstream_connect_failures_total", tenant="fo",
                          backend="fo-http1")
        self.assertEqual(codes[-1], OK, "calls of a session whose backend does not "
                         "speak HTTP/2 never fail over: %r (%d connections accepted "
                         "by the HTTP/1.1 backend; connects_total %s, failures %s)"
                         % ([c.value[0] for c in codes], bad.accepts, connects, failures))
        self.assertTrue(self.sg.find_log(r"backend fo-http1 of tenant fo is down"),
                        "a backend that answers HTTP/1.1 is never marked down")
        self.assertEqual((connects, failures), (bad.accepts, bad.accepts),
                         "connection attempts to a non-HTTP/2 backend not counted")


# ---------------------------------------------------------------------------
# GOAWAY and connections that die

GOAWAY = 7
RST_STREAM = 3


def goaway_frame(last, code=0):
    return frame(GOAWAY, 0, 0, struct.pack(">II", last, code))


class GoawayMidStream(Script):
    """Stream 1 gets its headers and a first message; once stream 3 has
    arrived whole, GOAWAY(NO_ERROR, last stream 1); then stream 1 ends."""

    def on_request_end(self, c, sid, body):
        if sid == 1:
            c.h2.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
            c.h2.send_data(1, gframe(b"first"))
            c.flush()
        else:
            c.raw(goaway_frame(1))
            c.sock.sendall(frame(0, 0, 1, gframe(b"second")))
            # trailers for stream 1, hand-encoded (h2's state machine is
            # closed after a GOAWAY): literal, new name "grpc-status": "0"
            blk = b"\x00" + bytes([11]) + b"grpc-status" + bytes([1]) + b"0"
            c.sock.sendall(frame(1, 0x5, 1, blk))


class GoawayTest(UpCase):
    def test_goaway_below_a_call_in_flight(self):
        """security.md: a call above the GOAWAY's last stream id was not
        processed and is sent once more on another connection; the one
        below finishes; new calls use a new connection."""
        self.start_with([GoawayMidStream(), Script()])
        first = Background(stream_call, self.ch, "ExecutePlan", b"one", timeout=15)
        H.wait_until(lambda: len(self.be.snapshot()[1]) >= 1, 10, what="first call at backend")
        second = unary(self.ch, "AnalyzePlan", b"two", timeout=15)
        code, details, msgs = first.get()
        self.assertEqual((code, msgs), (OK, [b"first", b"second"]), details)
        self.assertEqual((second.code, second.response), (OK, P.request(b"two")), second)
        third = unary(self.ch, "Config", b"three", timeout=15)
        self.assertEqual((third.code, third.response), (OK, P.request(b"three")), third)
        reqs, done = self.be.snapshot()
        self.assertEqual([(r[0], r[1]) for r in reqs], [(0, 1), (0, 3), (1, 1), (1, 3)], reqs)
        self.sg.wait_for_log(r"did not process the call \(GOAWAY\)")
        self.assertEqual(sample(self.scrape(), "sparkgate_upstream_retries_total",
                                tenant="default"), 1)


class DropWhenRequestArrives(Script):
    """The backend process dies as a call arrives: TCP reset, no GOAWAY."""

    def __init__(self, rst=True):
        self.rst = rst

    def on_request_end(self, c, sid, body):
        c.close(rst=self.rst)


class DropMidResponse(Script):
    """Stream 1 gets headers and a message; when stream 3 has arrived,
    the connection is reset."""

    def on_request_end(self, c, sid, body):
        if sid == 1:
            c.h2.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
            c.h2.send_data(1, gframe(b"first"))
            c.flush()
        else:
            c.close(rst=True)


class IdleThenDie(Script):
    """Answers; closes the connection when the test says so."""

    def __init__(self, when, rst):
        self.when, self.rst = when, rst

    def on_tick(self, c):
        if self.when.is_set():
            c.close(rst=self.rst)


class RestartTest(UpCase):
    def test_connection_reset_as_the_call_arrives_is_14_logged_and_counted(self):
        """operations.md: a backend that cannot be reached / drops the
        connection before the response: 14; the access log and
        sparkgate_rpcs_total say 14; the next call opens a new connection."""
        self.start_with([DropWhenRequestArrives(), Script()])
        r = unary(self.ch, "AnalyzePlan", b"x", timeout=15)
        self.assertEqual(r.code, UNAVAILABLE, r)
        line = self.access_lines(lambda r: r["stream_id"] == 1)[0]
        self.assertEqual(line["grpc_status"], 14, line)
        self.assertEqual(self.rpcs("AnalyzePlan", 14), 1)
        r = unary(self.ch, "AnalyzePlan", b"y", timeout=15)
        self.assertEqual((r.code, r.response), (OK, P.request(b"y")), r)

    def test_connection_reset_mid_response(self):
        """security.md: a connection dropped after the response started
        resets the client stream (INTERNAL_ERROR: clients see 13); a call
        on the same connection that had no response yet gets 14."""
        self.start_with([DropMidResponse(), Script()])
        first = Background(stream_call, self.ch, "ExecutePlan", b"one", timeout=15)
        H.wait_until(lambda: len(self.be.snapshot()[1]) >= 1, 10, what="first call at backend")
        second = unary(self.ch, "AnalyzePlan", b"two", timeout=15)
        code, details, msgs = first.get()
        self.assertEqual((code, msgs), (grpc.StatusCode.INTERNAL, [b"first"]), details)
        self.assertEqual(second.code, UNAVAILABLE, second)
        lines = self.access_lines(n=2)
        by_sid = {r["stream_id"]: r for r in lines}
        self.assertIsNone(by_sid[1]["grpc_status"], by_sid[1])
        self.assertEqual(by_sid[3]["grpc_status"], 14, by_sid[3])
        self.assertEqual(self.rpcs("ExecutePlan", 2), 1)
        self.assertEqual(self.rpcs("AnalyzePlan", 14), 1)

    def _idle_then_die(self, rst):
        when = threading.Event()
        self.start_with([IdleThenDie(when, rst), Script()])
        r = unary(self.ch, "Config", b"a", timeout=15)
        self.assertEqual((r.code, r.response), (OK, P.request(b"a")), r)
        when.set()
        H.wait_until(lambda: H.established_connections_to(self.be.port) == 0, 10,
                     what="the proxy saw the pooled connection die")
        for i in range(3):
            r = unary(self.ch, "Config", b"b%d" % i, timeout=15)
            self.assertEqual((r.code, r.response), (OK, P.request(b"b%d" % i)), r)
        self.assertFalse(self.sg.find_log(r"is down"))

    def test_idle_pooled_connection_reset_next_call_ok(self):
        self._idle_then_die(True)

    def test_idle_pooled_connection_closed_next_call_ok(self):
        self._idle_then_die(False)


# ---------------------------------------------------------------------------
# RST_STREAM codes and odd answers

class ResetWith(Script):
    def __init__(self, code, after_headers):
        self.code, self.after_headers = code, after_headers

    def on_request_end(self, c, sid, body):
        if self.after_headers:
            c.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            c.h2.send_data(sid, gframe(b"first"))
        c.h2.reset_stream(sid, self.code)
        c.flush()


class AnswerWith(Script):
    """A trailers-only answer with the given header list."""

    def __init__(self, headers, body=None):
        self.headers, self.body = headers, body

    def on_request_end(self, c, sid, body):
        if self.body is None:
            c.h2.send_headers(sid, self.headers, end_stream=True)
        else:
            c.h2.send_headers(sid, self.headers)
            c.h2.send_data(sid, self.body, end_stream=True)
        c.flush()


class ResetCodesTest(UpCase):
    """security.md: "resets the stream before its response headers" is 14
    (REFUSED_STREAM is retried once), CANCELLED (1) for CANCEL; "resets the
    stream after the response started: the client stream is reset
    (INTERNAL_ERROR, clients see 13; CANCEL ..., clients see 1)"."""

    def test_reset_before_headers_is_14_and_cancel_1(self):
        got = {}
        for code in (h2.errors.ErrorCodes.NO_ERROR, h2.errors.ErrorCodes.PROTOCOL_ERROR,
                     h2.errors.ErrorCodes.INTERNAL_ERROR, h2.errors.ErrorCodes.CANCEL,
                     h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                     h2.errors.ErrorCodes.INADEQUATE_SECURITY):
            be = ScriptedBackend([ResetWith(code, False)])
            self.addCleanup(be.close)
            cfg = H.base_config(be.port, workers=1)
            sg = self.start_sparkgate(cfg)
            ch = H.tls_channel(sg.port("public"))
            r = unary(ch, "AnalyzePlan", b"x", timeout=15)
            ch.close()
            got[code.name] = r.code.value[0]
            sg.stop()
        self.assertEqual(got, {k: 1 if k == "CANCEL" else 14 for k in got})

    def _after_headers(self, codes):
        got = {}
        for code in codes:
            be = ScriptedBackend([ResetWith(code, True)])
            self.addCleanup(be.close)
            cfg = H.base_config(be.port, workers=1)
            sg = self.start_sparkgate(cfg)
            ch = H.tls_channel(sg.port("public"))
            st, details, msgs = stream_call(ch, "ExecutePlan", b"x", timeout=15)
            ch.close()
            got[code.name] = (st.value[0], msgs)
            sg.stop()
        return got

    def test_reset_after_headers_status_is_internal(self):
        """The table's promise: INTERNAL_ERROR to the client, 13; CANCEL
        passed on as CANCEL, 1 (gRPC's mapping)."""
        got = self._after_headers([h2.errors.ErrorCodes.NO_ERROR,
                                   h2.errors.ErrorCodes.INTERNAL_ERROR,
                                   h2.errors.ErrorCodes.CANCEL,
                                   h2.errors.ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertEqual({k: v[0] for k, v in got.items()},
                         {k: 1 if k == "CANCEL" else 13 for k in got})


class HttpStatusTest(UpCase):
    """gRPC's HTTP-to-status mapping for a non-200 answer without
    grpc-status (doc/http-grpc-status-mapping.md): 400 -> 13, 401 -> 16,
    403 -> 7, 404 -> 12, 429/502/503/504 -> 14, others -> 2; operations.md:
    such a call is counted as grpc_status 2, access log null."""

    def test_http_error_answers(self):
        want = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 500: 2, 502: 14, 503: 14, 504: 14}
        got = {}
        for st in want:
            be = ScriptedBackend([AnswerWith([(":status", str(st)),
                                              ("content-type", "text/plain")])])
            self.addCleanup(be.close)
            cfg = H.base_config(be.port, workers=1)
            sg = self.start_sparkgate(cfg)
            ch = H.tls_channel(sg.port("public"))
            r = unary(ch, "AnalyzePlan", b"x", timeout=15)
            ch.close()
            got[st] = r.code.value[0]
            sg.stop()
        self.assertEqual(got, want)

    def test_headers_without_status_is_14(self):
        self.start_with([AnswerWith([("content-type", "application/grpc"),
                                     ("grpc-status", "0")])])
        r = unary(self.ch, "AnalyzePlan", b"x", timeout=15)
        self.assertEqual(r.code, UNAVAILABLE, r)

    def test_200_without_grpc_content_type(self):
        self.start_with([AnswerWith([(":status", "200"), ("content-type", "text/html")],
                                    body=b"<html>gateway</html>")])
        """Passed through; the client decides (grpcio: 2). operations.md: a
        call that ended with no grpc-status counts as 2, access log null."""
        r = unary(self.ch, "AnalyzePlan", b"x", timeout=15)
        self.assertEqual(r.code, grpc.StatusCode.UNKNOWN, r)
        line = self.access_lines(lambda r: r["stream_id"] == 1)[0]
        self.assertIsNone(line["grpc_status"], line)
        self.assertEqual(self.rpcs("AnalyzePlan", 2), 1)


# ---------------------------------------------------------------------------
# Protocol violations and large header blocks

SETTINGS = 4
PUSH_PROMISE = 5
WINDOW_UPDATE = 8


def settings_frame(pairs):
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


class SecondCallDoes(Script):
    """Stream 1 (the innocent call) gets headers and a first message; when
    stream 3 has arrived whole, `act(c, 3)` runs; then stream 1 ends."""

    def __init__(self, act):
        self.act = act

    def on_request_end(self, c, sid, body):
        if sid == 1:
            c.h2.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
            c.h2.send_data(1, gframe(b"first"))
            c.flush()
            return
        if sid != 3:
            c.answer(sid, [body[5:]])
            return
        self.act(c, sid)
        if not c.closed:
            c.h2.send_data(1, gframe(b"second"))
            c.h2.send_headers(1, [("grpc-status", "0")], end_stream=True)
            c.flush()


def big_trailers(n_fields):
    """Trailers of |n_fields| fields of ~22 KB each (base64 of random
    bytes: HPACK cannot shrink them much), grpc-status 13."""
    def act(c, sid):
        hs = [("grpc-status", "13")] + [
            ("x-error-detail-%d" % i,
             __import__("base64").b64encode(os.urandom(16 * 1024)).decode())
            for i in range(n_fields)]
        c.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        c.h2.send_data(sid, gframe(b"partial"))
        c.h2.send_headers(sid, hs, end_stream=True)
        c.flush()
    return act


class ViolationTest(UpCase):
    def _innocent_and_guilty(self, act):
        """The innocent call and the guilty one on two client connections
        (what the guilty response does to its own client is not ours)."""
        self.start_with([SecondCallDoes(act), Script()])
        first = Background(stream_call, self.ch, "ExecutePlan", b"one", timeout=15)
        H.wait_until(lambda: len(self.be.snapshot()[1]) >= 1, 10, what="first call at backend")
        other = H.tls_channel(self.sg.port("public"))
        self.addCleanup(other.close)
        second = unary(other, "AnalyzePlan", b"two", timeout=15)
        return first.get(), second

    def test_large_trailers_on_one_call_do_not_kill_the_other_calls(self):
        """upstream.c accepts response header lists up to 256 KiB ("error
        details ride in trailers") and tells the backend so
        (SETTINGS_MAX_HEADER_LIST_SIZE 262144); security.md: "A backend
        failure affects only the calls on it". A 225 KB trailer block is
        under that, but takes more than 8 CONTINUATION frames of 16 KiB:
        nghttp2 (max_continuations 8) called that fatal and the whole backend
        connection went, with every other call on it."""
        (code, details, msgs), second = self._innocent_and_guilty(big_trailers(10))
        self.assertEqual((code, msgs), (OK, [b"first", b"second"]),
                         "the innocent call on the same backend connection: %s %s; "
                         "log: %s" % (code, details,
                                      self.sg.find_log(r"closed with \d+ streams: .*")
                                      and self.sg.find_log(r"closed with \d+ streams: .*")
                                      .group(0)))

    def test_push_promise_fails_the_connection_bounded(self):
        def push(c, sid):
            blk = b"\x82\x86\x84\x41\x09localhost"  # :method GET :scheme http :path / ...
            c.raw(frame(PUSH_PROMISE, 0x4, sid, struct.pack(">I", 2) + blk))
        (code, details, msgs), second = self._innocent_and_guilty(push)
        self.assertEqual(second.code, UNAVAILABLE, second)
        self.assertEqual(code, grpc.StatusCode.INTERNAL, details)
        r = unary(self.ch, "Config", b"after", timeout=15)
        self.assertEqual((r.code, r.response), (OK, P.request(b"after")), r)

    def test_window_update_overflow_fails_the_connection_bounded(self):
        def overflow(c, sid):
            c.raw(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7fffffff)) * 2)
        (code, details, msgs), second = self._innocent_and_guilty(overflow)
        self.assertEqual(second.code, UNAVAILABLE, second)
        self.assertEqual(code, grpc.StatusCode.INTERNAL, details)
        r = unary(self.ch, "Config", b"after", timeout=15)
        self.assertEqual((r.code, r.response), (OK, P.request(b"after")), r)

    def test_data_after_end_stream(self):
        def junk(c, sid):
            c.answer(sid, [b"two"])
            c.raw(frame(0, 0x1, sid, gframe(b"junk")))
        (code, details, msgs), second = self._innocent_and_guilty(junk)
        self.assertEqual((second.code, second.response), (OK, b"two"), second)
        r = unary(self.ch, "Config", b"after", timeout=15)
        self.assertEqual((r.code, r.response), (OK, P.request(b"after")), r)


class BigTrailers(Script):
    def on_request_end(self, c, sid, body):
        big_trailers(4)(c, sid)


class BigTrailersTest(UpCase):
    extra = {"stream_idle_timeout_ms": 600000}

    def test_backend_trailers_over_64k_end_the_call(self):
        """upstream.c takes response header lists up to 256 KiB from a
        backend, and the client gets them: conn.c sent at most 64 KiB of
        header block (max_send_header_block_length), and nghttp2 dropped a
        larger trailer frame without a word, the client stream staying open
        until the client's deadline, or stream_idle_timeout_ms (1 h by
        default)."""
        self.start_with([BigTrailers()])
        c = H.H2Client(self.sg.port("public"))
        self.addCleanup(c.close)
        c.conn.decoder.max_header_list_size = 1 << 20  # h2's default is 64 KiB
        sid = c.start(c.grpc_headers(SERVICE + "AnalyzePlan"),
                      H.grpc_frame(P.request(b"x")))
        try:
            r = c.wait(sid, timeout=10)
            outcome = "ended: %r" % r
        except TimeoutError as e:
            outcome = "still open after 10 s (%s)" % e
        self.assertTrue(outcome.startswith("ended"), outcome)


# ---------------------------------------------------------------------------
# SETTINGS_MAX_CONCURRENT_STREAMS

class ZeroStreamsBackend(ThreadedServer):
    """Raw bytes, no python-h2: SETTINGS(MAX_CONCURRENT_STREAMS 0) the
    moment a connection is accepted (a backend taking no calls right now),
    SETTINGS acked, every HEADERS answered with RST_STREAM(REFUSED_STREAM)."""

    def __init__(self):
        self.headers_seen = 0
        super().__init__()

    def accepted(self, c):
        try:
            c.sendall(settings_frame([(3, 0)]))
        except OSError:
            pass
        return True

    def serve(self, c):
        c.settimeout(0.1)
        buf = b""
        try:
            while not self.closed.is_set():
                try:
                    d = c.recv(65536)
                except socket.timeout:
                    continue
                if not d:
                    break
                buf += d
                if buf.startswith(b"PRI * HTTP/2.0"):
                    buf = buf[24:]
                while len(buf) >= 9:
                    ln = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + ln:
                        break
                    ftype, flags = buf[3], buf[4]
                    sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    buf = buf[9 + ln:]
                    if ftype == SETTINGS and not flags & 1:
                        c.sendall(frame(SETTINGS, 1, 0))
                    elif ftype == 1:
                        self.headers_seen += 1
                        c.sendall(frame(RST_STREAM, 0, sid, struct.pack(">I", 7)))
        except OSError:
            pass
        finally:
            c.close()


class ZeroStreamsTest(UpCase):
    upstream = {"connect_timeout_ms": 2000, "idle_timeout_ms": 300}

    def test_backend_that_allows_no_streams(self):
        """A backend whose SETTINGS say MAX_CONCURRENT_STREAMS 0: its calls
        get 14 at once and its connections close. When the SETTINGS were
        read before the call's HEADERS went out, nghttp2 kept the stream in
        its queue for ever: the call waited for its deadline (4), and the
        RST_STREAM(CANCEL) sent then only marked the queued HEADERS
        cancelled, so the stream never closed and the upstream connection
        never went idle (one leaked connection and stream per call). Which
        order wins is a race on loopback: 10 calls make it likely."""
        be = ZeroStreamsBackend()
        self.addCleanup(be.close)
        cfg = H.base_config(be.port, workers=1, upstream=dict(self.upstream))
        self.sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(self.sg.port("public"))
        self.addCleanup(ch.close)
        codes = []
        for i in range(10):
            r = unary(ch, "AnalyzePlan", b"z%d" % i, timeout=1.5)
            codes.append(r.code.value[0])
        try:
            H.wait_until(lambda: H.established_connections_to(be.port) == 0, 5,
                         what="backend connections closed")
            left = 0
        except TimeoutError:
            left = H.established_connections_to(be.port)
        self.assertEqual((codes, left), ([14] * 10, 0),
                         "statuses, backend connections still open %s after the "
                         "calls ended (idle_timeout_ms 300); %d connections accepted, "
                         "%d HEADERS received" % ((codes, left), be.accepts, be.headers_seen))


class StopsReadingBackend(ThreadedServer):
    """python-h2, h2c or TLS: opens every flow-control window wide, takes
    the first request's HEADERS, then never reads its socket again (a hung
    server: alive, TCP window zero) and keeps the connection open."""

    def __init__(self, tls=False):
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(H.pki().server_cert, H.pki().server_key)
            self.ctx.set_alpn_protocols(["h2"])
        super().__init__(rcvbuf=16384)  # a small one backs up sooner

    def serve(self, sock):
        sock.settimeout(0.2)
        try:
            if self.ctx is not None:
                sock.settimeout(5)
                sock = self.ctx.wrap_socket(sock, server_side=True)
                sock.settimeout(0.2)
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            c.local_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            c.initiate_connection()
            c.increment_flow_control_window(2**31 - 1 - 65535)
            sock.sendall(c.data_to_send())
            got = False
            while not self.closed.is_set() and not got:
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        got = True
                sock.sendall(c.data_to_send())
            self.closed.wait(60)
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()


class StoppedReadingTest(H.SparkgateTestCase):
    STALL_LOG = r"closed with 1 streams: the backend read nothing for %d ms \(write stall\)"

    def start_proxy(self, be, stall_ms, tls=False):
        cfg = H.base_config(be.port, workers=1,
                            backend_tls={"ca": H.pki().ca_cert} if tls else None,
                            admin={"address": "127.0.0.1", "port": 0},
                            write_stall_timeout_ms=stall_ms,
                            upstream={"connect_timeout_ms": 2000, "idle_timeout_ms": 500})
        self.sg = self.start_sparkgate(cfg)
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        return H.tls_channel(self.sg.port("public"))

    def streams_open(self):
        _, _, body = http_get(self.admin, "/metrics")
        return sample(parse_prometheus(body.decode()), "sparkgate_streams_open")

    def assert_released(self, be):
        try:
            H.wait_until(lambda: self.streams_open() == 0, 6, interval=0.1,
                         what="the call released")
            H.wait_until(lambda: H.established_connections_to(be.port) == 0, 3,
                         interval=0.1, what="backend connection closed")
        except TimeoutError as e:
            self.fail("the proxy still holds the call or its backend connection "
                      "(%s): streams open %r" % (e, self.streams_open()))

    def test_cancelled_upload_is_released(self):
        """An upload to a backend that stopped reading its socket, ended by
        the client's deadline (4) before write_stall_timeout_ms: the
        RST_STREAM that would end the backend leg cannot go out, so the
        backend connection is closed after write_stall_timeout_ms (logged,
        at warn) and the orphaned call with it: no stream, backend
        connection or fd stays for as long as the backend stays hung."""
        be = StopsReadingBackend()
        self.addCleanup(be.close)
        ch = self.start_proxy(be, 1500)
        r = H.call_client_stream(ch, "AddArtifacts", [b"u" * (256 * 1024)] * 64,
                                 timeout=0.5)
        ch.close()
        self.assertEqual(r.code, grpc.StatusCode.DEADLINE_EXCEEDED, r)
        self.sg.wait_for_log(self.STALL_LOG % 1500, timeout=6)
        self.assert_released(be)

    def test_call_on_a_backend_that_stopped_reading_gets_14_over_tls(self):
        """The same over TLS, the client still waiting (deadline far off):
        after write_stall_timeout_ms the backend connection closes and its
        call gets 14 (the backend is unavailable), not the deadline."""
        be = StopsReadingBackend(tls=True)
        self.addCleanup(be.close)
        ch = self.start_proxy(be, 1000, tls=True)
        self.addCleanup(ch.close)
        r = H.call_client_stream(ch, "AddArtifacts", [b"u" * (256 * 1024)] * 64,
                                 timeout=10)
        self.assertEqual(r.code, UNAVAILABLE, r)
        self.sg.wait_for_log(self.STALL_LOG % 1000, timeout=5)
        self.assert_released(be)


# ---------------------------------------------------------------------------
# Stream ids run out on a long-lived backend connection

# An upstream (client) nghttp2 session runs out of stream ids after 2^30
# requests: nghttp2_submit_request then returns
# NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE for good, and
# nghttp2_session_get_next_stream_id says 2^31. A billion calls is days of
# a busy proxy's life, not a test's: this preload makes each upstream
# session run out after SG_SHIM_STREAM_IDS requests, exactly as nghttp2
# does (both calls answer as they would then). Client-side (server)
# sessions are left alone.
STREAM_ID_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <nghttp2/nghttp2.h>

#define SLOTS 4096
static struct { void *s; long used; } tab[SLOTS];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static long limit(void) {
  const char *e = getenv("SG_SHIM_STREAM_IDS");
  return e != NULL ? atol(e) : 3;
}
static int slot(void *s) {
  for (int i = 0; i < SLOTS; i++)
    if (tab[i].s == s) return i;
  return -1;
}
static int exhausted(void *s) {
  pthread_mutex_lock(&mu);
  int i = slot(s);
  int out = i >= 0 && tab[i].used >= limit();
  pthread_mutex_unlock(&mu);
  return out;
}

int nghttp2_session_client_new3(nghttp2_session **out, const nghttp2_session_callbacks *cbs,
                                void *user, const nghttp2_option *opt, nghttp2_mem *mem) {
  int (*real)(nghttp2_session **, const nghttp2_session_callbacks *, void *,
              const nghttp2_option *, nghttp2_mem *) =
      (int (*)(nghttp2_session **, const nghttp2_session_callbacks *, void *,
               const nghttp2_option *, nghttp2_mem *))dlsym(RTLD_NEXT,
                                                            "nghttp2_session_client_new3");
  int rv = real(out, cbs, user, opt, mem);
  if (rv == 0) {
    pthread_mutex_lock(&mu);
    int i = slot(*out);
    if (i < 0) i = slot(NULL);
    if (i >= 0) { tab[i].s = *out; tab[i].used = 0; }
    pthread_mutex_unlock(&mu);
  }
  return rv;
}

void nghttp2_session_del(nghttp2_session *s) {
  void (*real)(nghttp2_session *) =
      (void (*)(nghttp2_session *))dlsym(RTLD_NEXT, "nghttp2_session_del");
  pthread_mutex_lock(&mu);
  int i = slot(s);
  if (s != NULL && i >= 0) tab[i].s = NULL;
  pthread_mutex_unlock(&mu);
  real(s);
}

int32_t nghttp2_submit_request(nghttp2_session *s, const nghttp2_priority_spec *pri,
                               const nghttp2_nv *nva, size_t nvlen,
                               const nghttp2_data_provider *prd, void *user) {
  int32_t (*real)(nghttp2_session *, const nghttp2_priority_spec *, const nghttp2_nv *,
                  size_t, const nghttp2_data_provider *, void *) =
      (int32_t (*)(nghttp2_session *, const nghttp2_priority_spec *, const nghttp2_nv *,
                   size_t, const nghttp2_data_provider *, void *))dlsym(
          RTLD_NEXT, "nghttp2_submit_request");
  if (exhausted(s))
    return NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE;
  int32_t id = real(s, pri, nva, nvlen, prd, user);
  if (id > 0) {
    pthread_mutex_lock(&mu);
    int i = slot(s);
    if (i >= 0) tab[i].used++;
    pthread_mutex_unlock(&mu);
  }
  return id;
}

uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *s) {
  uint32_t (*real)(nghttp2_session *) =
      (uint32_t (*)(nghttp2_session *))dlsym(RTLD_NEXT, "nghttp2_session_get_next_stream_id");
  return exhausted(s) ? (1u << 31) : real(s);
}
"""


def build_stream_id_shim(test):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        test.skipTest("no C compiler for the nghttp2 preload")
    d = H.tempdir("sg-shim-")
    src, so = os.path.join(d, "shim.c"), os.path.join(d, "shim.so")
    with open(src, "w") as f:
        f.write(STREAM_ID_SHIM_C)
    p = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", so, src, "-ldl", "-lpthread"],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        test.skipTest("cannot build the nghttp2 preload: %s" % p.stderr[-500:])
    return so


class StreamIdsRunOut(H.SparkgateTestCase):
    def test_a_connection_out_of_stream_ids_is_replaced(self):
        """An upstream connection whose stream ids are spent (2^30 requests
        on one HTTP/2 connection, RFC 9113 5.1.1: "a client ... MUST
        establish a new connection") takes no more calls: the next call
        goes on a new connection and succeeds, and the spent one closes
        once its calls end. (Before, the call got 14 "No more Stream ID
        available" and the spent connection stayed in the pool, with room
        and no idle timer: every later call to that backend got 14.)"""
        so = build_stream_id_shim(self)
        standin = self.standin()
        cfg = H.base_config(standin.port, workers=1, upstream={"idle_timeout_ms": 1000})
        asan = os.environ.get("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
        sg = self.start_sparkgate(cfg, env={
            "LD_PRELOAD": so, "SG_SHIM_STREAM_IDS": "3",
            "ASAN_OPTIONS": asan + ":verify_asan_link_order=0"})
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        codes = []
        for i in range(6):
            r = unary(ch, "AnalyzePlan", b"call %d" % i, timeout=10)
            codes.append(r.code.value[0])
        # And after a pause longer than upstream.idle_timeout_ms.
        time.sleep(2.0)
        r = unary(ch, "AnalyzePlan", b"after a pause", timeout=10)
        codes.append(r.code.value[0])
        why = sg.find_log(r"grpc-status 14: .*")
        self.assertEqual(codes, [0] * 7,
                         "calls after the backend connection ran out of stream ids: %s"
                         % (why.group(0) if why else "no 14 logged"))


# ---------------------------------------------------------------------------
# A backend that allows one stream per connection

class OneStreamPerConnection(Script):
    """Advertises SETTINGS_MAX_CONCURRENT_STREAMS 1 and holds to it as
    grpc-java/netty does: a stream over the limit is refused with
    RST_STREAM(REFUSED_STREAM) (RFC 9113 5.1.2). Each admitted call is
    answered (its message echoed) a moment later."""

    HOLD_S = 0.3

    def on_connect(self, c):
        c.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        # python-h2 would end the connection on a stream over its own limit;
        # the limit is enforced here instead, by refusing the stream.
        c.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        c.state["active"] = set()
        c.state["due"] = []

    def on_request(self, c, sid, headers):
        active = c.state["active"]
        if active:
            with c.backend.lock:
                c.backend.refused = getattr(c.backend, "refused", 0) + 1
            c.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        active.add(sid)

    def on_request_end(self, c, sid, body):
        if sid in c.state["active"]:
            c.state["due"].append((time.monotonic() + self.HOLD_S, sid, body))

    def on_tick(self, c):
        now = time.monotonic()
        for item in list(c.state["due"]):
            if item[0] <= now:
                c.state["due"].remove(item)
                c.answer(item[1], [item[2][5:]])
                c.state["active"].discard(item[1])


class SmallStreamLimit(UpCase):
    def test_calls_over_a_backends_stream_limit_are_not_failed(self):
        """A healthy backend that takes one stream per connection
        (SETTINGS_MAX_CONCURRENT_STREAMS 1), six calls at once: the
        proxy may open more connections (it does, one per call, for calls
        that arrive once it knows the limit), so all six succeed; none is
        sent over the advertised limit. (Before, nghttp2 sent all six
        before the backend's SETTINGS arrived, as it assumes 100 until then;
        the backend refused five, the retry did the same on one new
        connection, and four calls got 14 from a backend that was up.)"""
        self.start_with([OneStreamPerConnection()])
        c = H.H2Client(self.sg.port("public"))
        self.addCleanup(c.close)
        # All six in one write: the proxy reads them at once.
        sids = []
        for i in range(6):
            sid = c.conn.get_next_available_stream_id()
            c.responses[sid] = H.H2Response(sid)
            c.conn.send_headers(sid, c.grpc_headers(SERVICE + "AnalyzePlan"))
            c.conn.send_data(sid, H.grpc_frame(b"call %d" % i), end_stream=True)
            sids.append(sid)
        c._flush()
        got = {}
        for sid in sids:
            r = c.wait(sid, timeout=10)
            got[sid] = r.trailer("grpc-status", r.header("grpc-status"))
        self.assertEqual(list(got.values()), ["0"] * 6,
                         "grpc-status of 6 concurrent calls on a backend allowing 1 stream "
                         "per connection: %r; streams the backend refused: %d; backend "
                         "connections: %d" % (got, getattr(self.be, "refused", 0),
                                              self.be.n_conns()))
        # Said once, however many connections the limit made it open.
        said = [l for l in self.sg.lines if "the backend takes at most 1 call per connection" in l]
        self.assertEqual(len(said), 1, said or self.sg.log_text())


if __name__ == "__main__":
    H.main()
