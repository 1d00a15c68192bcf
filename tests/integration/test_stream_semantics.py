#!/usr/bin/python3
"""End-to-end gRPC / HTTP/2 stream semantics as a client sees them.

A scripted h2c backend (ScriptBackend below, python3-h2) answers each
request with what a test says, frame by frame and within flow control;
clients are RawH2 (hand-made frames, from test_attacks.py), H2Client or
grpcio. Every wait is bounded; no test asserts a duration.

Found by these tests and fixed: an empty or overlong grpc-status logged
as 0 or as its first digits; header lists over 144 KiB (within a larger
max_header_list_bytes) that ended the connection; response headers or trailers over 64 KiB
(which the upstream leg takes up to 256 KiB) were never sent and the call
hung; a request header list within a configured max_header_list_bytes
over 64 KiB was refused by the proxy's own upstream session and answered
14; sub-millisecond grpc-timeouts were rounded up for the backend; a
backend's RST_STREAM(CANCEL) before headers was 14, not CANCELLED.
"""

import json
import os
import socket
import sys
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import grpc  # noqa: E402
from test_operations import ADMIN_RE, http_get, parse_prometheus, series  # noqa: E402
from test_attacks import (  # noqa: E402
    RawH2, attack_config, CANCEL, NO_ERROR, DATA, FLAG_END_STREAM,
    SETTINGS_INITIAL_WINDOW_SIZE, frame, hpack_block, headers_frames, data_frames,
    settings_frame, window_update)

SERVICE = H.SERVICE
TEST = H.TEST_PREFIX
MIB = H.MIB
PATH = TEST + "Raw"  # not a Spark path: not scanned, any bytes go


def gframe(payload):
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class Req:
    def __init__(self, conn_index, sid, headers):
        self.conn_index = conn_index
        self.sid = sid
        self.headers = headers      # [(name, value)] as str, in order
        self.body = b""
        self.trailers = None
        self.ended = False
        self.reset = None           # RST_STREAM code from the proxy

    def header(self, name):
        for k, v in self.headers:
            if k == name:
                return v
        return None


class ScriptBackend:
    """An h2c backend. |script(api, req, event)| is called in the
    connection's thread on "headers" (request HEADERS), "end" (request
    END_STREAM) and "reset"; it answers through api.headers / api.data /
    api.trailers / api.rst, which are queued and sent within flow control."""

    def __init__(self, script):
        self.script = script
        self.lock = threading.Lock()
        self.requests = []
        self.closed = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self):
        self.closed.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)

    def wait_for(self, pred, timeout=10, what="backend condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self.requests):
                    return True
            time.sleep(0.02)
        raise AssertionError("%s not met within %ss: %r" % (
            what, timeout, [(r.sid, r.headers, len(r.body), r.ended, r.reset)
                            for r in self.requests]))

    def _accept(self):
        while not self.closed.is_set():
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                idx = self.connections
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(c, idx), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, sock, idx):
        sock.settimeout(0.05)
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False)
        conn = h2.connection.H2Connection(config=cfg)
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 22})
        # An initial value is never "changed" by an ACK, so h2 would keep its
        # decoder at the 64 KiB default: set it to what we advertise.
        conn.decoder.max_header_list_size = 1 << 22
        conn.initiate_connection()
        conn.increment_flow_control_window(64 * MIB)
        queues = {}   # sid -> list of actions
        reqs = {}
        api = _Api(queues)
        try:
            sock.sendall(conn.data_to_send())
            while not self.closed.is_set():
                try:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    events = conn.receive_data(data)
                except socket.timeout:
                    events = []
                for ev in events:
                    sid = getattr(ev, "stream_id", None)
                    if isinstance(ev, h2.events.RequestReceived):
                        r = Req(idx, sid, list(ev.headers))
                        reqs[sid] = r
                        with self.lock:
                            self.requests.append(r)
                        self.script(api, r, "headers")
                        if ev.stream_ended is not None:
                            r.ended = True
                            self.script(api, r, "end")
                    elif isinstance(ev, h2.events.DataReceived):
                        r = reqs.get(sid)
                        if r is not None:
                            with self.lock:
                                r.body += ev.data
                            self.script(api, r, "data")
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        r = reqs.get(sid)
                        if r is not None:
                            r.trailers = list(ev.headers)
                    elif isinstance(ev, h2.events.StreamEnded):
                        r = reqs.get(sid)
                        if r is not None and not r.ended:
                            r.ended = True
                            self.script(api, r, "end")
                    elif isinstance(ev, h2.events.StreamReset):
                        r = reqs.get(sid)
                        queues.pop(sid, None)
                        if r is not None:
                            r.reset = ev.error_code
                            self.script(api, r, "reset")
                self._pump(conn, queues)
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
        except Exception as e:  # noqa: BLE001  the peer went away: done
            if not self.closed.is_set() and os.environ.get("SG_TEST_VERBOSE"):
                sys.stderr.write("ScriptBackend: %r\n" % e)
            return
        finally:
            sock.close()

    @staticmethod
    def _pump(conn, queues):
        for sid in list(queues):
            q = queues[sid]
            while q:
                act = q[0]
                kind = act[0]
                try:
                    if kind == "headers":
                        conn.send_headers(sid, act[1], end_stream=act[2])
                    elif kind == "rst":
                        conn.reset_stream(sid, act[1])
                    elif kind == "data":
                        body, end = act[1], act[2]
                        chunk = act[3] if len(act) > 3 else 1 << 30
                        while body:
                            n = min(len(body), conn.max_outbound_frame_size, chunk,
                                    conn.local_flow_control_window(sid))
                            if n <= 0:
                                break
                            conn.send_data(sid, body[:n])
                            body = body[n:]
                        if body:
                            q[0] = ("data", body, end, chunk)
                            break
                        if end:
                            conn.end_stream(sid)
                    elif kind == "raw":
                        act[1](conn, sid)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError,
                        KeyError):
                    q.clear()
                    break
                q.pop(0)
            if not q:
                queues.pop(sid, None)


class _Api:
    def __init__(self, queues):
        self.q = queues

    def _add(self, sid, act):
        self.q.setdefault(sid, []).append(act)

    def headers(self, sid, hdrs, end=False):
        self._add(sid, ("headers", hdrs, end))

    def data(self, sid, data, end=False, chunk=1 << 30):
        self._add(sid, ("data", data, end, chunk))

    def trailers(self, sid, hdrs):
        self._add(sid, ("headers", hdrs, True))

    def rst(self, sid, code):
        self._add(sid, ("rst", code))

    def raw(self, sid, fn):
        self._add(sid, ("raw", fn))


RESP = [(":status", "200"), ("content-type", "application/grpc")]
# 96 KiB of metadata in 12 fields of 8 KiB: within the 256 KiB a backend
# may send (SG_UPSTREAM_MAX_HEADER_LIST_BYTES), each field well under
# HPACK's per-field limits.
BIG_FIELDS = [("x-detail-%02d-bin" % i, chr(65 + i) * 8192) for i in range(12)]


class ScriptCase(H.SparkgateTestCase):
    """sparkgate (attack_config: listeners "public" TLS and "dev" h2c) with
    its tenant's one backend a ScriptBackend."""

    config_overrides = {}

    def start(self, script, **top):
        self.be = ScriptBackend(script)
        self.addCleanup(self.be.close)
        cfg = attack_config(self.be.port, **dict(self.config_overrides, **top))
        self.sg = self.start_sparkgate(cfg)
        self.h2c_port = self.sg.port("dev")
        self.tls_port = self.sg.port("public")

    def raw(self, **kw):
        c = RawH2(self.h2c_port, tls=False, **kw)
        self.addCleanup(c.close)
        return c


# ---------------------------------------------------------------------------
# Response metadata larger than what the client leg can send

class LargeResponseMetadataTest(ScriptCase):
    """A backend may send response headers and trailers up to 256 KiB
    (upstream.c SG_UPSTREAM_MAX_HEADER_LIST_BYTES): error details ride in
    grpc-status-details-bin. Whatever the proxy does with them, the call
    must end for the client (the status, or at least a reset), never hang
    with the stream open."""

    def _call(self, script):
        self.start(script)
        c = self.raw()
        sid = c.request(c.request_headers(PATH), gframe(b"hello"))
        try:
            c.wait_stream(sid, timeout=10)
        except TimeoutError:
            pass
        return c, c.streams[sid]

    def test_large_status_details_in_trailers_end_the_call(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(b"result"))
                api.trailers(req.sid, [("grpc-status", "3"), ("grpc-message", "bad")] +
                             BIG_FIELDS)
        c, s = self._call(script)
        self.assertTrue(s.done, "the call never ended for the client (10 s) after the "
                        "backend sent 96 KiB of trailers: %r" % s)
        self.assertEqual(H.grpc_unframe(s.data), [b"result"], s)
        if s.reset is None:
            self.assertEqual(s.header("grpc-status"), "3", s)

    def test_large_response_headers_end_the_call(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP + BIG_FIELDS)
                api.data(req.sid, gframe(b"result"))
                api.trailers(req.sid, [("grpc-status", "0")])
        c, s = self._call(script)
        self.assertTrue(s.done, "the call never ended for the client (10 s) after the "
                        "backend sent 96 KiB of response headers: %r" % s)

    def test_large_trailers_only_response_ends_the_call(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP + [("grpc-status", "5")] + BIG_FIELDS, end=True)
        c, s = self._call(script)
        self.assertTrue(s.done, "the call never ended for the client (10 s) after a "
                        "96 KiB trailers-only answer: %r" % s)


# ---------------------------------------------------------------------------
# Request metadata the proxy accepts must reach the backend

class LargeRequestHeadersTest(ScriptCase):
    """http2.max_header_list_bytes may be set up to 1 MiB
    (docs/configuration.md): a request within it is accepted, so it must
    go upstream (or be refused as too large), not be answered
    "backend unavailable"."""

    config_overrides = {"http2": {"max_header_list_bytes": 262144}}

    def test_request_header_list_within_the_limit_reaches_the_backend(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, req.body)
                api.trailers(req.sid, [("grpc-status", "0")])
        self.start(script)
        c = self.raw()
        sid = c.request(c.request_headers(PATH, extra=BIG_FIELDS), gframe(b"hi"))
        s = c.wait_stream(sid, timeout=15)
        self.assertEqual(s.reset, None, s)
        self.assertEqual(s.grpc_status, 0, "a 96 KiB header list (limit 256 KiB) did "
                         "not get through: %r" % s)
        with self.be.lock:
            got = [[(k, v) for k, v in r.headers if k.startswith("x-detail-")]
                   for r in self.be.requests]
        self.assertEqual(got, [BIG_FIELDS])


# ---------------------------------------------------------------------------
# Bytes in order, both ways

ODD_SIZES = [1, 0, 16383, 16384, 16385, 3, 1 * MIB, 4 * MIB + 5, 2, 65535, 65536, 65537]


def odd_messages():
    return [bytes((i * 7 + j) % 251 for j in range(min(n, 251))) * (n // 251) +
            bytes((i * 7 + j) % 251 for j in range(n % 251)) for i, n in enumerate(ODD_SIZES)]


def split_everywhere(body):
    """Pieces of sizes 1, 2, ..., 13, 4099, 16384, 1, ...: every message
    boundary and prefix byte lands on a frame edge somewhere."""
    sizes = list(range(1, 14)) + [4099, 16384, 1]
    out, i, k = [], 0, 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        out.append(body[i:i + n])
        i += n
        k += 1
    return out


class OrderTest(ScriptCase):
    def test_server_stream_odd_sizes_split_at_every_boundary(self):
        msgs = odd_messages()
        body = b"".join(gframe(m) for m in msgs)

        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                for piece in split_everywhere(body[:200000]):
                    api.data(req.sid, piece)
                api.data(req.sid, body[200000:], chunk=9973)
                api.trailers(req.sid, [("grpc-status", "0"), ("x-n", str(len(msgs)))])
        self.start(script)
        ch = H.h2c_channel(self.h2c_port)
        self.addCleanup(ch.close)
        r = H.call_server_stream(ch, PATH, b"go", timeout=60)
        self.assertEqual(r.code, grpc.StatusCode.OK, r.details)
        self.assertEqual([len(m) for m in r.responses], [len(m) for m in msgs])
        self.assertTrue(r.responses == msgs, "message bytes differ")
        self.assertEqual(r.trailer("x-n"), str(len(msgs)))

    def test_client_stream_odd_sizes_arrive_byte_exact(self):
        msgs = odd_messages()

        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(str(len(req.body)).encode()))
                api.trailers(req.sid, [("grpc-status", "0")])
        self.start(script)
        ch = H.h2c_channel(self.h2c_port)
        self.addCleanup(ch.close)
        r = H.call_client_stream(ch, PATH, iter(msgs), timeout=60)
        self.assertEqual(r.code, grpc.StatusCode.OK, r.details)
        with self.be.lock:
            bodies = [rq.body for rq in self.be.requests]
        self.assertEqual(len(bodies), 1)
        self.assertTrue(bodies[0] == b"".join(gframe(m) for m in msgs),
                        "request bytes differ (%d vs %d)" % (
                            len(bodies[0]), sum(5 + len(m) for m in msgs)))


# ---------------------------------------------------------------------------
# Metadata both ways

class MetadataTest(ScriptCase):
    def test_response_metadata_and_trailers_pass_through_in_order(self):
        long_msg = "".join("%%%02X" % (i % 256) if i % 3 else "x" for i in range(3000))
        details = "".join(chr(65 + (i % 26)) for i in range(6000)) + "=="
        hdrs = RESP + [("x-h", "v1"), ("x-h-bin", "AAECAwT/"), ("x-h", "v2")]
        trl = [("grpc-status", "7"), ("grpc-message", long_msg),
               ("grpc-status-details-bin", details), ("x-t-bin", "3q2+7w"),
               ("x-t", "after")]

        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, hdrs)
                api.data(req.sid, gframe(b"m1") + gframe(b""))
                api.trailers(req.sid, trl)
        self.start(script)
        c = self.raw()
        s = c.wait_stream(c.request(c.request_headers(PATH), gframe(b"q")))
        self.assertEqual(s.headers[0], hdrs, s)
        self.assertEqual(s.headers[1], trl, s)
        self.assertEqual(H.grpc_unframe(s.data), [b"m1", b""])

    def test_request_metadata_forwarded_and_trailers_too(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.trailers(req.sid, [("grpc-status", "0")])
        self.start(script)
        c = self.raw()
        extra = [("grpc-timeout", "5000m"), ("user-agent", "grpc-python/9 review"),
                 ("grpc-accept-encoding", "identity,gzip"), ("grpc-encoding", "identity"),
                 ("x-custom", "c1"), ("x-custom-bin", "AAEC/w"), ("x-custom", "c2")]
        sid = c.new_sid()
        c.send(headers_frames(sid, hpack_block(c.request_headers(PATH, extra=extra))) +
               data_frames(sid, gframe(b"body"), end_stream=False) +
               headers_frames(sid, hpack_block([("x-req-trailer", "t1"),
                                                ("x-req-trailer-bin", "AP8")]),
                              end_stream=True))
        s = c.wait_stream(sid)
        self.assertEqual(s.grpc_status, 0, s)
        self.be.wait_for(lambda rs: rs and rs[0].ended, what="request ended")
        r = self.be.requests[0]
        for k, v in extra:
            if k == "grpc-timeout":
                continue
            self.assertIn((k, v), r.headers, r.headers)
        self.assertEqual([v for k, v in r.headers if k == "x-custom"], ["c1", "c2"])
        self.assertEqual(r.header("te"), "trailers")
        t = r.header("grpc-timeout")
        self.assertTrue(t is not None and t.endswith("m") and int(t[:-1]) <= 5000, t)
        self.assertEqual(r.body, gframe(b"body"))
        self.assertEqual(r.trailers, [("x-req-trailer", "t1"), ("x-req-trailer-bin", "AP8")])


# ---------------------------------------------------------------------------
# Deadlines

def timeout_us(v):
    unit = {"H": 3600e6, "M": 60e6, "S": 1e6, "m": 1e3, "u": 1, "n": 1e-3}[v[-1]]
    return int(v[:-1]) * unit


class DeadlineTest(ScriptCase):
    def _echo(self, api, req, ev):
        if ev == "end":
            api.headers(req.sid, RESP)
            api.data(req.sid, gframe((req.header("grpc-timeout") or "-").encode()))
            api.trailers(req.sid, [("grpc-status", "0")])

    def test_forwarded_deadline_is_never_later_than_the_clients(self):
        # grpc-timeout in micro- or nanoseconds: the backend's budget must
        # not exceed the client's (rounding the client's up to a whole
        # millisecond gives the backend more time than the client has).
        self.start(self._echo)
        c = self.raw()
        warm = c.wait_stream(c.request(c.request_headers(PATH), gframe(b"warm")))
        self.assertEqual(warm.grpc_status, 0, warm)
        sent = ["1999999u", "2500000n", "7500u", "300001u"]
        got = []
        for v in sent:
            s = c.wait_stream(c.request(c.request_headers(PATH, extra=[("grpc-timeout", v)]),
                                        gframe(b"t")))
            self.assertEqual(s.grpc_status, 0, s)
            got.append(H.grpc_unframe(s.data)[0].decode())
        too_long = [(a, b) for a, b in zip(sent, got) if timeout_us(b) > timeout_us(a)]
        self.assertEqual(too_long, [], "client grpc-timeout -> what the backend got: %r"
                         % list(zip(sent, got)))

    def test_expired_deadline_is_deadline_exceeded_and_cancels_upstream(self):
        def script(api, req, ev):
            pass  # never answers
        self.start(script)
        c = self.raw()
        sid = c.request(c.request_headers(PATH, extra=[("grpc-timeout", "300m")]),
                        gframe(b"slow"))
        s = c.wait_stream(sid, timeout=10)
        self.assertEqual((s.grpc_status, s.reset), (4, None), s)
        self.be.wait_for(lambda rs: rs and rs[0].reset is not None, what="backend cancel")
        self.assertEqual(self.be.requests[0].reset, CANCEL)

    def test_expired_deadline_mid_stream_ends_with_status_4(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(b"first") + gframe(b"second"))
        self.start(script)
        c = self.raw()
        sid = c.request(c.request_headers(PATH, extra=[("grpc-timeout", "500m")]),
                        gframe(b"slow"))
        s = c.wait_stream(sid, timeout=10)
        self.assertEqual(H.grpc_unframe(s.data), [b"first", b"second"], s)
        self.assertEqual((s.grpc_status, s.reset), (4, None), s)


# ---------------------------------------------------------------------------
# Resets both ways

class ResetTest(ScriptCase):
    def test_backend_cancel_before_headers_is_cancelled_not_unavailable(self):
        # gRPC over HTTP/2 (PROTOCOL-HTTP2.md, "Errors"): RST_STREAM CANCEL
        # maps to CANCELLED (1). The same reset after the response started is
        # passed on as RST_STREAM CANCEL (stream.c), i.e. CANCELLED too.
        def script(api, req, ev):
            if ev == "end":
                api.rst(req.sid, CANCEL)
        self.start(script)
        c = self.raw()
        s = c.wait_stream(c.request(c.request_headers(PATH), gframe(b"q")))
        self.assertTrue(s.reset == CANCEL or s.grpc_status == 1,
                        "backend RST_STREAM(CANCEL) became %r" % s)

    def test_backend_cancel_after_headers_is_cancel(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(b"part"))
                api.rst(req.sid, CANCEL)
        self.start(script)
        c = self.raw()
        s = c.wait_stream(c.request(c.request_headers(PATH), gframe(b"q")))
        self.assertEqual(s.reset, CANCEL, s)

    def test_complete_answer_then_backend_rst_no_error_mid_upload(self):
        # RFC 9113 8.1: a server may answer in full, then RST_STREAM(NO_ERROR)
        # to stop the upload; the client must get the whole answer and status.
        def script(api, req, ev):
            if ev == "data" and len(req.body) >= 1000 and not getattr(req, "done", False):
                req.done = True
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(b"early answer"))
                api.trailers(req.sid, [("grpc-status", "0")])
                api.rst(req.sid, NO_ERROR)
        self.start(script)
        c = self.raw()
        sid = c.new_sid()
        c.send(headers_frames(sid, hpack_block(c.request_headers(PATH))) +
               data_frames(sid, gframe(b"u" * 4000), end_stream=False))
        s = c.wait_stream(sid)
        self.assertEqual(H.grpc_unframe(s.data), [b"early answer"], s)
        self.assertEqual(s.grpc_status, 0, s)
        self.assertIn(s.reset, (None, NO_ERROR), s)

    def test_client_second_headers_without_end_stream_is_stream_error(self):
        def script(api, req, ev):
            pass
        self.start(script)
        c = self.raw()
        sid = c.new_sid()
        c.send(headers_frames(sid, hpack_block(c.request_headers(PATH))) +
               data_frames(sid, gframe(b"x"), end_stream=False) +
               headers_frames(sid, hpack_block([("x-a", "b")]), end_stream=False))
        s = c.wait_stream(sid)
        # RFC 9113 8.1: malformed; a stream error (PROTOCOL_ERROR).
        self.assertEqual((s.reset, c.goaway), (1, None), s)
        with self.be.lock:
            self.assertTrue(all(r.reset is not None or not r.ended
                                for r in self.be.requests), "the backend got a whole request")


# ---------------------------------------------------------------------------
# Flow control from the client's side

FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x3, 0x5
PADDED = 0x8


def stream_answer(msgs):
    body = b"".join(gframe(m) for m in msgs)

    def script(api, req, ev):
        if ev == "end":
            api.headers(req.sid, RESP)
            api.data(req.sid, body, chunk=7001)
            api.trailers(req.sid, [("grpc-status", "0")])
    return script


class FlowControlTest(ScriptCase):
    def test_proxy_settings_are_as_documented(self):
        self.start(stream_answer([b"x"]))
        c = RawH2(self.h2c_port, tls=False)
        self.addCleanup(c.close)
        got = {}
        conn_wu = []
        orig = c._on_frame

        def spy(ftype, flags, sid, payload):
            if ftype == 0x4 and not flags & 0x1:
                for i in range(0, len(payload) - 5, 6):
                    got[int.from_bytes(payload[i:i + 2], "big")] = \
                        int.from_bytes(payload[i + 2:i + 6], "big")
            if ftype == 0x8 and sid == 0:
                conn_wu.append(int.from_bytes(payload[:4], "big"))
            return orig(ftype, flags, sid, payload)
        c._on_frame = spy
        c.wait(lambda: c.settings_acked and got, 5, "SETTINGS")
        c.wait(lambda: conn_wu, 5, "connection WINDOW_UPDATE")
        self.assertEqual(got.get(0x2), 0, got)                 # ENABLE_PUSH
        self.assertEqual(got.get(0x4), 1048576, got)           # INITIAL_WINDOW_SIZE
        self.assertEqual(got.get(0x6), 16384, got)             # MAX_HEADER_LIST_SIZE
        self.assertIn(0x3, got)                                # MAX_CONCURRENT_STREAMS
        self.assertEqual(65535 + sum(conn_wu), 16 * MIB, conn_wu)

    def test_window_zero_then_opened_by_settings_mid_stream(self):
        msgs = [bytes([i % 256]) * (i * 97 % 20000) for i in range(40)]
        self.start(stream_answer(msgs))
        c = self.raw(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
        sid = c.request(c.request_headers(PATH), gframe(b"q"))
        self.be.wait_for(lambda rs: rs and rs[0].ended, what="request at the backend")
        c.wait(lambda: c.streams[sid].headers, 5, "response headers")
        c.pump(0.5)
        self.assertEqual(c.streams[sid].data, b"", "DATA sent into a zero window")
        c.send(settings_frame([(SETTINGS_INITIAL_WINDOW_SIZE, 65535)]))
        s = c.wait_stream(sid, timeout=20)
        self.assertEqual(s.grpc_status, 0, s)
        self.assertTrue(H.grpc_unframe(s.data) == msgs, "bytes differ")

    def test_one_byte_window(self):
        msgs = [b"", b"a", b"bc" * 50, bytes(range(256)) * 4]
        self.start(stream_answer(msgs))
        c = self.raw(settings=[(SETTINGS_INITIAL_WINDOW_SIZE, 1)])
        s = c.wait_stream(c.request(c.request_headers(PATH), gframe(b"q")), timeout=30)
        self.assertEqual(s.grpc_status, 0, s)
        self.assertEqual(H.grpc_unframe(s.data), msgs)

    def test_stream_window_update_overflow_is_a_stream_error(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(b"first"))
        self.start(script)
        c = self.raw()
        other = c.request(c.request_headers(PATH), gframe(b"other"))
        sid = c.request(c.request_headers(PATH), gframe(b"q"))
        c.wait(lambda: c.streams[sid].data and c.streams[other].data, 10, "both live")
        c.send(window_update(sid, 2 ** 31 - 1) + window_update(sid, 2 ** 31 - 1))
        s = c.wait_stream(sid)
        self.assertEqual((s.reset, c.goaway), (FLOW_CONTROL_ERROR, None), s)
        self.be.wait_for(lambda rs: any(r.reset == CANCEL for r in rs), what="backend cancel")
        self.assertFalse(c.streams[other].done, c.streams[other])
        third = c.wait_stream(c.request(c.request_headers(PATH, extra=[("grpc-timeout", "1S")]),
                                        gframe(b"third")), timeout=10)
        self.assertEqual(third.grpc_status, 4, third)

    def test_connection_window_update_overflow_is_goaway(self):
        self.start(stream_answer([b"x"]))
        c = self.raw()
        c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
        c.send(window_update(0, 2 ** 31 - 1) + window_update(0, 2 ** 31 - 1))
        c.wait(lambda: c.goaway is not None, 5, "GOAWAY")
        self.assertEqual(c.goaway[1], FLOW_CONTROL_ERROR, c.goaway)
        self.assertTrue(self.sg.alive())
        c2 = self.raw()
        s = c2.wait_stream(c2.request(c2.request_headers(PATH), gframe(b"q")))
        self.assertEqual(s.grpc_status, 0, s)

    def test_padded_upload_credits_the_padding(self):
        # Padding counts against flow control (RFC 9113 6.1); the proxy
        # must give it back, or a padded upload stalls once the padding
        # adds up to a window.
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(str(len(req.body)).encode()))
                api.trailers(req.sid, [("grpc-status", "0")])
        self.start(script, http2={"stream_window_bytes": 65535,
                                  "connection_window_bytes": 65535})
        from test_backpressure import FlowH2
        c = FlowH2(self.h2c_port, tls=False)
        self.addCleanup(c.close)
        c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
        sid = c.open(c.request_headers(PATH))
        total, sent, pad = 512 * 1024, 0, 200
        body = gframe(bytes(i % 256 for i in range(total - 5)))
        deadline = time.monotonic() + 30
        while sent < len(body) and time.monotonic() < deadline and not c.closed:
            n = min(1000, len(body) - sent)
            cost = n + 1 + pad
            if c.conn_window >= cost and c.stream_windows[sid] >= cost:
                last = sent + n == len(body)
                c.send(frame(DATA, PADDED | (FLAG_END_STREAM if last else 0), sid,
                             bytes([pad]) + body[sent:sent + n] + b"\0" * pad))
                c.conn_window -= cost
                c.stream_windows[sid] -= cost
                sent += n
            else:
                c.pump(0.05)
        self.assertEqual(sent, len(body), "the upload stalled: no window for padding "
                         "(%d of %d bytes sent)" % (sent, len(body)))
        s = c.wait_stream(sid)
        self.assertEqual(s.grpc_status, 0, s)
        with self.be.lock:
            self.assertTrue(self.be.requests[0].body == body)


# ---------------------------------------------------------------------------
# Request framing edges

class RequestFramingTest(ScriptCase):
    def _echo(self, api, req, ev):
        if ev == "end":
            api.headers(req.sid, RESP)
            api.data(req.sid, req.body)
            api.trailers(req.sid, [("grpc-status", "0")])

    def test_end_stream_on_headers_and_empty_data_frames(self):
        self.start(self._echo)
        c = self.raw()
        s1 = c.wait_stream(c.request(c.request_headers(PATH), None, end_stream=True))
        self.assertEqual(s1.grpc_status, 0, s1)
        sid = c.new_sid()
        c.send(headers_frames(sid, hpack_block(c.request_headers(PATH))) +
               frame(DATA, 0, sid, b"") + frame(DATA, 0, sid, gframe(b"a")) +
               frame(DATA, 0, sid, b"") + frame(DATA, FLAG_END_STREAM, sid, b""))
        s2 = c.wait_stream(sid)
        self.assertEqual(s2.grpc_status, 0, s2)
        self.assertEqual(H.grpc_unframe(s2.data), [b"a"])

    def test_data_after_end_stream(self):
        def script(api, req, ev):
            pass  # holds the call open: the stream is half-closed (remote)
        self.start(script)
        c = self.raw()
        sid = c.request(c.request_headers(PATH), gframe(b"done"))
        self.be.wait_for(lambda rs: rs and rs[0].ended, what="request at the backend")
        c.send(frame(DATA, 0, sid, gframe(b"late")))
        c.wait(lambda: c.streams[sid].done or c.goaway is not None, 10, "an error")
        self.assertTrue(c.streams[sid].reset == STREAM_CLOSED or
                        (c.goaway is not None and c.goaway[1] == STREAM_CLOSED),
                        (c.streams[sid], c.goaway))
        self.be.wait_for(lambda rs: rs[0].reset is not None, what="backend cancel")
        with self.be.lock:
            self.assertEqual(self.be.requests[0].body, gframe(b"done"))


# ---------------------------------------------------------------------------
# One backend connection, many calls

class SharedBackendConnectionTest(ScriptCase):
    """Calls from many clients share backend connections. A response field
    over 64 KiB is more than nghttp2's HPACK decoder takes (a fixed limit):
    a connection error upstream, which ends every call on that backend
    connection. docs/security.md says so, and the log says why (it said
    "connection finished")."""

    def test_oversized_response_field_is_named_in_the_log(self):
        self.assertIn("a header field over 64 KiB", " ".join(open(os.path.join(
            H.SOURCE_ROOT, "docs", "security.md"), encoding="utf-8").read().split()))

        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.trailers(req.sid, [("grpc-status", "13"),
                                       ("grpc-status-details-bin", "D" * (96 * 1024))])
        self.start(script, workers=1)
        b = self.raw()
        bad = b.wait_stream(b.request(b.request_headers(PATH), gframe(b"x")), timeout=15)
        self.assertTrue(bad.done or bad.reset is not None, bad)
        self.sg.wait_for_log(r"closed with \d+ streams: the backend's frames broke HTTP/2 "
                             r"\(sent GOAWAY COMPRESSION_ERROR: a header field over 64 KiB",
                             timeout=10)


class ObservedScriptCase(ScriptCase):
    """ScriptCase with an admin listener (metrics) and an access log."""

    def start(self, script, **top):
        self.access_path = os.path.join(H.tempdir("sg-review-streams-"), "access.log")
        top.setdefault("admin", {"address": "127.0.0.1", "port": 0})
        top.setdefault("access_log", {"path": self.access_path})
        super().start(script, **top)
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))

    def rpcs_by_status(self):
        status, _, body = http_get(self.admin, "/metrics")
        self.assertEqual(status, 200, body)
        out = {}
        for labels, v in series(parse_prometheus(body.decode("utf-8")),
                                "sparkgate_rpcs_total").items():
            code = dict(labels)["grpc_status"]
            out[code] = out.get(code, 0) + v
        return out

    def access_records(self):
        try:
            with open(self.access_path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


class StatusInResponseHeadersTest(ObservedScriptCase):
    def test_status_in_headers_without_trailers_is_passed_as_is_and_logged_as_none(self):
        """A backend puts grpc-status 0 in response headers that do not end
        the stream, then ends it without a grpc-status in trailers
        (END_STREAM on DATA, or trailers without one). sparkgate passes
        the frames on as they are (not a status it made up, not a reset),
        and logs and counts what a gRPC client makes of it: grpcio,
        PySpark's client, takes a status only from headers that end the
        stream and reports UNKNOWN; the access log says null and
        sparkgate_rpcs_total counts 2, never 0 for a call that failed."""
        def script(api, req, ev):
            if ev != "end":
                return
            api.headers(req.sid, RESP + [("grpc-status", "0")])
            if req.body == gframe(b"trailers-without-status"):
                api.data(req.sid, gframe(b"only"))
                api.trailers(req.sid, [("x-not-a-status", "1")])
            else:
                api.data(req.sid, gframe(b"only"), end=True)
        self.start(script)
        # The frames as the backend sent them: one header block, a clean end.
        c = self.raw()
        s = c.wait_stream(c.request(c.request_headers(PATH), gframe(b"raw")))
        self.assertEqual(len(s.headers), 1, s)
        self.assertEqual((s.grpc_status, s.reset, s.ended), (0, None, True), s)
        self.assertEqual(H.grpc_unframe(s.data), [b"only"])
        # What a gRPC client makes of them.
        ch = H.h2c_channel(self.h2c_port)
        self.addCleanup(ch.close)
        call = ch.unary_unary(PATH, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        seen = []
        for body in (b"no-trailers", b"trailers-without-status"):
            try:
                call(body, timeout=5)
                seen.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                seen.append(e.code())
        self.assertEqual(seen, [grpc.StatusCode.UNKNOWN] * 2, seen)
        H.wait_until(lambda: len(self.access_records()) >= 3, 5, what="three access-log lines")
        self.assertEqual([r["grpc_status"] for r in self.access_records()], [None] * 3)
        self.assertEqual(self.rpcs_by_status(), {"2": 3.0}, "sparkgate_rpcs_total by grpc_status")


def echo_once(api, req, ev):
    if ev == "end":
        api.headers(req.sid, RESP)
        api.data(req.sid, req.body)
        api.trailers(req.sid, [("grpc-status", "0")])


class LargeHeaderBlockTest(ScriptCase):
    """http2.max_header_list_bytes may be up to 1 MiB ("Largest request
    header list accepted", configuration.md). Clients (grpcio, python-h2)
    split a header block into 16 KiB frames, the default frame size: a
    200 KiB list takes 12 CONTINUATION frames. A list within the limit
    goes through, by hand and from grpcio, and its connection stays up:
    nghttp2's CONTINUATION cap follows the limit (it was a flat 8, which
    ended the connection and gave grpcio UNAVAILABLE, retried for ever)."""

    config_overrides = {"http2": {"max_header_list_bytes": 1048576}}

    def test_header_list_within_the_limit_needing_many_continuations(self):
        self.start(echo_once)
        c = self.raw()
        fields = [("x-big-%02d" % i, chr(97 + i) * 20000) for i in range(10)]  # ~200 KiB
        sid = c.new_sid()
        c.send(headers_frames(sid, hpack_block(c.request_headers(PATH, extra=fields)))
               + data_frames(sid, gframe(b"hi")))
        s = c.wait_stream(sid, timeout=15)
        self.assertIsNone(c.goaway, "a %d-byte header list (limit 1 MiB) ended the "
                          "connection: %r" % (sum(len(k) + len(v) + 32 for k, v in fields),
                                              c.goaway))
        self.assertEqual((s.grpc_status, s.reset), (0, None), s)
        with self.be.lock:
            got = [[(k, v) for k, v in r.headers if k.startswith("x-big-")]
                   for r in self.be.requests]
        self.assertEqual(got, [fields])
        ch = H.h2c_channel(self.h2c_port)
        self.addCleanup(ch.close)
        r = H.call_unary(ch, PATH, b"hi", metadata=fields, timeout=10)
        self.assertEqual(r.code, grpc.StatusCode.OK, "grpcio, same metadata: %r" % r)


class UnparsableStatusTest(ObservedScriptCase):
    """A backend's empty grpc-status, or one of more than three digits,
    is UNKNOWN to grpcio; the access log says null for it and
    sparkgate_rpcs_total counts it as 2 (operations.md), never 0 or the
    value's first three digits."""

    def test_empty_or_overlong_grpc_status_is_not_logged_as_another_code(self):
        def script(api, req, ev):
            if ev == "end":
                api.headers(req.sid, RESP)
                api.data(req.sid, gframe(b"reply"))
                api.trailers(req.sid, [("grpc-status", req.body[5:].decode())])
        self.start(script)
        ch = H.h2c_channel(self.h2c_port)
        self.addCleanup(ch.close)
        seen = []
        for value in ("", "1234"):
            r = H.call_unary(ch, PATH, value.encode(), timeout=5)
            seen.append(r.code)
        self.assertEqual(seen, [grpc.StatusCode.UNKNOWN] * 2, seen)
        H.wait_until(lambda: len(self.access_records()) >= 2, 5, what="two access-log lines")
        logged = [r["grpc_status"] for r in self.access_records()]
        self.assertNotIn(0, logged, "a call grpcio saw as UNKNOWN (empty grpc-status) "
                         "is logged as 0: %r" % logged)
        self.assertNotIn(123, logged, "grpc-status 1234 is logged as 123: %r" % logged)
        self.assertNotIn("0", self.rpcs_by_status(),
                         "sparkgate_rpcs_total counts an empty grpc-status as 0")


if __name__ == "__main__":
    H.main()
