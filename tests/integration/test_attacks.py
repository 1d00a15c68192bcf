#!/usr/bin/python3
"""Attacks on the proxy (issue 7, hardening), against the real binary.

One test per attack class. Each says what the proxy answers (the exact
HTTP/2 error code, HTTP status or grpc-status), and checks that the proxy
is the same process afterwards (same PID, still serving), that its
resident memory stays under RSS_BOUND_MIB, that the stand-in upstream saw
no call from an unauthenticated or malformed request, and that a control
RPC on another connection succeeds (during the attack where that makes
sense, and after it).

Frames are written by hand (RawH2 below: a stateless HPACK encoder that
only writes literals without indexing, plus hand-made indexed fields for
the HPACK bomb), so that the client can say what python3-h2 would refuse
to say. Every wait is a bounded loop; no test asserts a duration.
"""

import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
from raw_backend import RawBackend  # noqa: E402
import grpc  # noqa: E402
import hpack  # noqa: E402
import jwt as pyjwt  # noqa: E402

SERVICE = H.SERVICE
MIB = H.MIB

# Resident memory sparkgate may reach under any of these attacks (a release
# build runs them at 12-16 MiB; the bound leaves room for a sanitizer
# build). Per-stream and per-connection windows, the 16 KiB header cap and
# the 256 KiB output mark bound what an attacker can make it hold: a leak
# per frame or per stream would cross it (2.4 GB of expanded HPACK bomb,
# 512 MiB of unread response).
RSS_BOUND_MIB = 128

# HTTP/2 error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR = 0x0, 0x1, 0x2
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x6, 0x7, 0x8, 0x9
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS = 0x1, 0x1, 0x4

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = 2 ** 31 - 1

# Tight limits, so that the timeouts fire inside a short test.
TLS_HANDSHAKE_TIMEOUT_MS = 1000
IDLE_TIMEOUT_MS = 2000
WRITE_STALL_TIMEOUT_MS = 2000
UPSTREAM_CONNECT_TIMEOUT_MS = 1000

HS_SECRET = b"attack-tests-hmac-secret-0123456789abcdef"  # >= 32 bytes for HS256
ISSUER = "https://idp-attacks.test"
AUDIENCE = "spark"

ABUSE_BURST = 1000  # src/conn.c SG_CONN_ABUSE_BURST


# ---------------------------------------------------------------------------
# Process facts

def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS for pid %d" % pid)


class RssWatch:
    """Samples a process's VmRSS on a thread while an attack runs; .peak."""

    def __init__(self, pid, interval=0.05):
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval):
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, AssertionError):
                return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
        try:
            self.peak = max(self.peak, rss_mib(self.pid))
        except (OSError, AssertionError):
            pass


# ---------------------------------------------------------------------------
# HTTP/2 by hand

def hpack_int(value, prefix_bits, first_byte_flags=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = bytearray([first_byte_flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(data):
    if isinstance(data, str):
        data = data.encode()
    return hpack_int(len(data), 7) + data  # H bit 0: no Huffman


def hpack_literal(name, value, index=False):
    """A literal field with a new name: without indexing (stateless), or
    with incremental indexing (it enters the peer's dynamic table)."""
    return (b"\x40" if index else b"\x00") + hpack_string(name) + hpack_string(value)


def hpack_block(headers):
    return b"".join(hpack_literal(n, v) for n, v in headers)


def hpack_indexed(index):
    return hpack_int(index, 7, 0x80)


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", sid & 0x7FFFFFFF) + payload


def settings_frame(pairs=(), ack=False):
    return frame(SETTINGS, FLAG_ACK if ack else 0, 0,
                 b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(sid, increment):
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def rst_stream(sid, code=CANCEL):
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def headers_frames(sid, block, end_stream=False, max_frame=16384):
    """HEADERS (+ CONTINUATION) frames carrying |block|."""
    parts = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        flags = FLAG_END_HEADERS if last else 0
        if i == 0:
            out.append(frame(HEADERS, flags | (FLAG_END_STREAM if end_stream else 0), sid, part))
        else:
            out.append(frame(CONTINUATION, flags, sid, part))
    return b"".join(out)


def data_frames(sid, payload, end_stream=True, max_frame=16384):
    parts = [payload[i:i + max_frame] for i in range(0, len(payload), max_frame)] or [b""]
    return b"".join(frame(DATA, FLAG_END_STREAM if end_stream and i == len(parts) - 1 else 0,
                          sid, p) for i, p in enumerate(parts))


class Stream:
    def __init__(self, sid):
        self.sid = sid
        self.headers = []       # decoded header blocks, in order
        self.data = b""
        self.ended = False
        self.reset = None       # RST_STREAM error code

    @property
    def done(self):
        return self.ended or self.reset is not None

    def header(self, name, block=None):
        blocks = self.headers if block is None else [self.headers[block]]
        for b in blocks:
            for k, v in b:
                if k == name:
                    return v
        return None

    @property
    def status(self):
        s = self.header(":status")
        return int(s) if s is not None else None

    @property
    def grpc_status(self):
        s = self.header("grpc-status")
        return int(s) if s is not None else None

    def __repr__(self):
        return "Stream(%d headers=%r data=%d ended=%s reset=%r)" % (
            self.sid, self.headers, len(self.data), self.ended, self.reset)


class RawH2:
    """A client connection written frame by frame. send() writes bytes;
    pump() reads and parses what the server sent (SETTINGS are acked,
    response headers decoded, GOAWAY / RST_STREAM / close recorded)."""

    def __init__(self, port, tls=True, host="127.0.0.1", rcvbuf=None, preface=True,
                 settings=(), auto_window=True, timeout=10.0):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            raw.settimeout(timeout)
            raw.connect((host, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                self.sock = H.client_ssl_context().wrap_socket(raw, server_hostname="localhost")
                assert self.sock.selected_alpn_protocol() == "h2"
            else:
                self.sock = raw
        except BaseException:
            raw.close()
            raise
        self.tls = tls
        self.authority = "localhost:%d" % port
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 20
        self.buf = b""
        self.streams = {}
        self.goaway = None          # (last_stream_id, error_code, debug data)
        self.goaways = []           # every GOAWAY, in order
        self.closed = False
        self.send_failed = False
        self.close_error = None
        self.frames_in = 0
        self.pings_acked = 0
        self.settings_acked = 0
        self.auto_window = auto_window
        self.next_sid = 1
        self._hdr_sid = None
        self._hdr_block = b""
        self._hdr_flags = 0
        if preface:
            self.send(PREFACE + settings_frame(settings))

    # -- sending -------------------------------------------------------------
    def send(self, data):
        """Writes everything; False (and closed) when the server is gone."""
        if self.closed or self.send_failed:
            return False
        try:
            self.sock.sendall(data)
            return True
        except (OSError, ssl.SSLError) as e:
            # The server is gone; what it wrote before may still be read.
            self.send_failed = True
            self.close_error = e
            return False

    def new_sid(self):
        sid = self.next_sid
        self.next_sid += 2
        self.streams[sid] = Stream(sid)
        return sid

    def request_headers(self, path=SERVICE + "ExecutePlan", method="POST",
                        content_type="application/grpc", extra=(), scheme=None,
                        authority=None):
        hdrs = [(":method", method), (":scheme", scheme or ("https" if self.tls else "http")),
                (":path", path), (":authority", authority or self.authority)]
        if content_type is not None:
            hdrs.append(("content-type", content_type))
        hdrs.append(("te", "trailers"))
        hdrs.extend(extra)
        return hdrs

    def request_bytes(self, sid, headers, body=None, end_stream=True):
        if body is None:
            return headers_frames(sid, hpack_block(headers), end_stream=end_stream)
        return (headers_frames(sid, hpack_block(headers)) +
                data_frames(sid, body, end_stream=end_stream))

    def request(self, headers, body=None, end_stream=True):
        sid = self.new_sid()
        self.send(self.request_bytes(sid, headers, body, end_stream))
        return sid

    def grpc_call(self, payload=b"x", path=SERVICE + "ExecutePlan", extra=(), **kw):
        """A complete gRPC request (one Spark Connect message) on a new stream."""
        return self.request(self.request_headers(path, extra=extra, **kw),
                            H.grpc_frame(payload))

    def live_call(self, timeout=10.0):
        """A call the stand-in answers with one message and then holds open
        (30 s); returns its stream id once that message has arrived."""
        sid = self.grpc_call(b"long", extra=H.standin_md("stall", count=1, stall_ms=30000))
        self.wait(lambda: len(self.streams[sid].data) > 0, timeout, "the call is live")
        return sid

    # -- receiving -----------------------------------------------------------
    def pump(self, timeout=0.2):
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (socket.timeout, ssl.SSLWantReadError):
            return True
        except (OSError, ssl.SSLError) as e:
            self.closed = True
            self.close_error = e
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        out = b""
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            ftype, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9:9 + length]
            self.buf = self.buf[9 + length:]
            out += self._on_frame(ftype, flags, sid, payload)
        if out:
            self.send(out)
        return True

    def _stream(self, sid):
        if sid not in self.streams:
            self.streams[sid] = Stream(sid)
        return self.streams[sid]

    def _on_frame(self, ftype, flags, sid, payload):
        self.frames_in += 1
        if ftype == SETTINGS:
            if flags & FLAG_ACK:
                self.settings_acked += 1
                return b""
            return settings_frame(ack=True)
        if ftype == PING:
            if flags & FLAG_ACK:
                self.pings_acked += 1
                return b""
            return frame(PING, FLAG_ACK, 0, payload)
        if ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = (last & 0x7FFFFFFF, code, payload[8:])
            self.goaways.append(self.goaway)
            return b""
        if ftype == RST_STREAM:
            self._stream(sid).reset = struct.unpack(">I", payload[:4])[0]
            return b""
        if ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                pad = 0
                body = payload
                if flags & 0x8:  # PADDED
                    pad = body[0]
                    body = body[1:]
                if flags & 0x20:  # PRIORITY
                    body = body[5:]
                if pad:
                    body = body[:-pad]
                self._hdr_sid, self._hdr_block, self._hdr_flags = sid, body, flags
            else:
                self._hdr_block += payload
            if flags & FLAG_END_HEADERS:
                s = self._stream(self._hdr_sid)
                s.headers.append([(k.decode() if isinstance(k, bytes) else k,
                                   v.decode() if isinstance(v, bytes) else v)
                                  for k, v in self.dec.decode(self._hdr_block, raw=True)])
                if self._hdr_flags & FLAG_END_STREAM:
                    s.ended = True
            return b""
        if ftype == DATA:
            s = self._stream(sid)
            body = payload
            if flags & 0x8:
                body = body[1:len(body) - body[0]]
            s.data += body
            if flags & FLAG_END_STREAM:
                s.ended = True
            if self.auto_window and payload:
                return window_update(0, len(payload)) + window_update(sid, len(payload))
            return b""
        return b""

    def wait(self, predicate, timeout=10.0, what="condition"):
        """Pumps until predicate() holds or the connection closes; returns
        predicate() (raises TimeoutError after |timeout| seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            v = predicate()
            if v or self.closed:
                return v
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("%s not met within %.1fs (goaway=%r, closed=%s)"
                                   % (what, timeout, self.goaway, self.closed))
            self.pump(min(left, 0.2))

    def wait_stream(self, sid, timeout=10.0):
        s = self.streams[sid]
        self.wait(lambda: s.done, timeout, "stream %d done" % sid)
        return s

    def wait_closed(self, timeout=10.0):
        """Reads (and drops) until the server closes; True if it did."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.pump(min(0.2, max(0.01, deadline - time.monotonic())))
        return self.closed

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Config and shared checks

def hs256_token(sub="control-user", lifetime=600):
    now = int(time.time())
    tok = pyjwt.encode({"iss": ISSUER, "sub": sub, "aud": AUDIENCE, "iat": now,
                        "exp": now + lifetime}, HS_SECRET, algorithm="HS256")
    return tok if isinstance(tok, str) else tok.decode()


def attack_config(backend_port, **top):
    """Listeners: "public" (TLS, no auth), "dev" (h2c, no auth), "jwt"
    (TLS, JWT required); short timeouts so they fire within a test."""
    d = H.tempdir("sg-attack-")
    secret = os.path.join(d, "hs.secret")
    with open(secret, "wb") as f:
        f.write(HS_SECRET)
    cfg = H.base_config(
        backend_port,
        listeners=[H.tls_listener("public"), H.h2c_listener("dev"),
                   H.tls_listener("jwt", auth={"methods": ["jwt"]})],
        workers=2,
        tls_handshake_timeout_ms=TLS_HANDSHAKE_TIMEOUT_MS,
        idle_timeout_ms=IDLE_TIMEOUT_MS,
        write_stall_timeout_ms=WRITE_STALL_TIMEOUT_MS,
        auth={"jwt_providers": [{"name": "attack-idp", "issuer": ISSUER,
                                 "audiences": [AUDIENCE],
                                 "keys": [{"alg": "HS256", "secret_file": secret}]}]},
        upstream={"connect_timeout_ms": UPSTREAM_CONNECT_TIMEOUT_MS})
    cfg.update(top)
    return cfg


class AttackCase(H.SparkgateTestCase):
    """A stand-in and a sparkgate (attack_config) per test; helpers for the
    checks every attack test makes."""

    config_overrides = {}

    def accepted_h2c_connection(self, timeout=10):
        """A new h2c connection the proxy accepts, once a slot has come free
        (closing a connection is seen by the proxy a moment later): bounded
        retries; None when none was accepted in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = RawH2(self.h2c_port, tls=False)
            try:
                c.wait(lambda: c.settings_acked, 2, "SETTINGS ACK")
            except TimeoutError:
                pass
            if c.settings_acked and not c.closed:
                return c
            c.close()
            time.sleep(0.05)
        return None

    def setUp(self):
        super().setUp()
        self.up = self.standin()
        self.sg = self.start_sparkgate(attack_config(self.up.port, **self.config_overrides))
        self.pid = self.sg.pid
        self.tls_port = self.sg.port("public")
        self.h2c_port = self.sg.port("dev")
        self._controls = 0

    # -- checks --------------------------------------------------------------
    def control(self, what="control"):
        """A unary RPC on a fresh connection must succeed end to end."""
        self._controls += 1
        payload = ("%s %d" % (what, self._controls)).encode()
        ch = H.tls_channel(self.tls_port)
        try:
            r = H.call_unary(ch, "Config", payload, [("x-control", "1")], timeout=15)
        finally:
            ch.close()
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, payload),
                         "%s RPC failed: %r" % (what, r))

    def assert_same_process(self, watch=None):
        self.assertTrue(self.sg.alive(), "sparkgate died; log:\n" + self.sg.log_text())
        self.assertEqual(self.sg.pid, self.pid)
        rss = rss_mib(self.pid)
        peak = max(rss, watch.peak if watch is not None else 0)
        self.assertLess(peak, RSS_BOUND_MIB,
                        "sparkgate RSS %.1f MiB over the %d MiB bound" % (peak, RSS_BOUND_MIB))

    def upstream_calls(self, control=False):
        """Calls the stand-in saw, without (or only) the control RPCs."""
        return [c for c in self.up.calls() if (c.header("x-control") == "1") == control]

    def assert_upstream_saw_nothing(self):
        self.assertEqual(self.upstream_calls(), [], "calls reached the upstream")

    def assert_goaway(self, c, code, what):
        c.wait(lambda: c.goaway is not None, timeout=10, what="GOAWAY after " + what)
        self.assertIsNotNone(c.goaway, "%s: no GOAWAY (closed=%s, error=%r); log:\n%s"
                             % (what, c.closed, c.close_error, self.sg.log_text(30)))
        self.assertEqual(c.goaway[1], code, "%s: GOAWAY %r" % (what, c.goaway))
        # What the client acts on is the first one: same code, and a later
        # GOAWAY never raises the last stream id (RFC 9113 section 6.8).
        c.pump(0.2)
        self.assertEqual(c.goaways[0][1], code, "%s: GOAWAYs %r" % (what, c.goaways))
        for a, b in zip(c.goaways, c.goaways[1:]):
            self.assertLessEqual(b[0], a[0], "%s: GOAWAYs %r" % (what, c.goaways))
        self.assertTrue(c.wait_closed(10), "%s: connection not closed after GOAWAY" % what)


# ---------------------------------------------------------------------------

class FrameFloodTest(AttackCase):
    """Floods of cheap frames spend the connection's abuse budget:
    GOAWAY(ENHANCE_YOUR_CALM) and close, the log naming the frame kind."""

    def flood(self, what, make_batch, batch, setup=b"", tls=True, log_kind=None, acked=None):
        """Sends |make_batch(i)| batches of |batch| frames until GOAWAY or
        close, bounded at 5x the budget. A flood of frames the server must
        acknowledge waits for the ACKs of each batch (acked(c) -> count), as
        a client that reads: the budget, not nghttp2's queue of unsent ACKs
        (test_ack_flood_in_one_write), is what ends it."""
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch, \
                RawH2(self.tls_port if tls else self.h2c_port, tls=tls) as c:
            c.send(setup)
            c.wait(lambda: c.settings_acked > 0, 5, "SETTINGS ACK")
            base = acked(c) if acked else 0
            sent = 0
            i = 0
            while (c.goaway is None and not c.closed and not c.send_failed
                   and sent < 5 * ABUSE_BURST):
                c.send(make_batch(i))
                sent += batch
                i += 1
                if acked:
                    c.wait(lambda: acked(c) - base >= sent or c.goaway is not None, 10,
                           "ACKs of %d frames" % sent)
                else:
                    c.pump(0.01)
                # A control RPC while the flood runs, on its own connection.
                if i == 3:
                    self.control("%s during" % what)
            self.assertGreater(sent, ABUSE_BURST - batch,
                               "%s: closed after only %d frames" % (what, sent))
            self.assert_goaway(c, ENHANCE_YOUR_CALM, what)
        self.sg.wait_for_log(r"closing: too many %s \(abuse budget spent\): GOAWAY "
                             r"ENHANCE_YOUR_CALM" % re.escape(log_kind), timeout=5, since=mark)
        self.assert_same_process(watch)
        self.control("%s after" % what)
        self.assert_upstream_saw_nothing()

    def test_ping_flood(self):
        self.flood("PING flood",
                   lambda i: b"".join(frame(PING, 0, 0, struct.pack(">Q", i * 100 + k))
                                      for k in range(100)), 100, log_kind="PING frames",
                   acked=lambda c: c.pings_acked)

    def test_settings_flood(self):
        self.flood("SETTINGS flood",
                   lambda i: settings_frame([(SETTINGS_INITIAL_WINDOW_SIZE, 65535)]) * 100,
                   100, log_kind="SETTINGS frames", acked=lambda c: c.settings_acked)

    def test_priority_flood(self):
        # PRIORITY for ever new idle streams, each depending on stream 0.
        def batch(i):
            return b"".join(frame(PRIORITY, 0, 2 * (i * 100 + k) + 1,
                                  struct.pack(">IB", 0, 15)) for k in range(100))
        self.flood("PRIORITY flood", batch, 100, log_kind="PRIORITY frames")

    def test_empty_data_flood(self):
        # One open request stream (headers only: no upstream work yet), then
        # DATA frames with no payload and no END_STREAM.
        block = hpack_block([(":method", "POST"), (":scheme", "http"),
                             (":path", SERVICE + "ExecutePlan"), (":authority", "x"),
                             ("content-type", "application/grpc"), ("te", "trailers")])
        self.flood("empty DATA flood", lambda i: frame(DATA, 0, 1) * 100, 100,
                   setup=headers_frames(1, block), tls=False, log_kind="empty DATA frames")

    def test_ack_flood_in_one_write(self):
        # 3000 PINGs, then 3000 SETTINGS, in one write each, read by nobody
        # until the end: the connection is closed (by the budget's GOAWAY
        # or, when one read holds more than 1000 of them, by nghttp2's
        # limit on queued ACKs), whichever comes first.
        for what, flood in (("PING", b"".join(frame(PING, 0, 0, struct.pack(">Q", i))
                                              for i in range(3000))),
                            ("SETTINGS", settings_frame() * 3000)):
            mark = self.sg.mark()
            with RssWatch(self.pid) as watch, RawH2(self.tls_port) as c:
                c.wait(lambda: c.settings_acked > 0, 5, "SETTINGS ACK")
                c.send(flood)
                self.assertTrue(c.wait_closed(10), "%s burst: connection not closed" % what)
                if c.goaway is not None:
                    self.assertEqual(c.goaway[1], ENHANCE_YOUR_CALM, (what, c.goaway))
            self.sg.wait_for_log(r"too many %s frames \(abuse budget spent\)|closing: "
                                 r"Flooding was detected" % what, timeout=5, since=mark)
            self.assert_same_process(watch)
        self.control("after ACK floods")
        self.assert_upstream_saw_nothing()

    def test_window_update_dribble(self):
        self.flood("WINDOW_UPDATE dribble", lambda i: window_update(0, 1) * 100, 100,
                   log_kind="tiny WINDOW_UPDATE frames")


class HeaderAttackTest(AttackCase):
    """Rapid reset, oversized header lists, HPACK bomb, CONTINUATION flood."""

    def test_rapid_reset(self):
        # HEADERS immediately followed by RST_STREAM, as fast as the socket
        # takes them. Each request is valid (a Spark call whose first
        # message never comes). Client resets take from sparkgate's abuse
        # budget, which answers with GOAWAY(ENHANCE_YOUR_CALM) and a log line
        # naming the cause; nghttp2's own limiter (1000 resets, refilled at
        # 33/s, GOAWAY INTERNAL_ERROR) stands behind it.
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch, RawH2(self.tls_port) as c:
            block = hpack_block(c.request_headers())
            n = 0
            while (c.goaway is None and not c.closed and not c.send_failed
                   and n < 20000):
                batch = []
                for _ in range(200):
                    sid = c.next_sid
                    c.next_sid += 2
                    batch.append(headers_frames(sid, block) + rst_stream(sid, CANCEL))
                c.send(b"".join(batch))
                n += 200
                c.pump(0.005)
                if n == 600:
                    self.control("during rapid reset")
            self.assert_goaway(c, ENHANCE_YOUR_CALM, "rapid reset (%d HEADERS+RST_STREAM)" % n)
            self.assertGreaterEqual(n, 600, "GOAWAY before the budget's burst")
        self.sg.wait_for_log(r"too many stream resets \(rapid reset\)", timeout=5, since=mark)
        self.assert_same_process(watch)
        self.control("after rapid reset")
        self.assert_upstream_saw_nothing()

    def test_oversized_header_list_resets_stream(self):
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch, RawH2(self.tls_port) as c:
            # 24 KiB of headers (the default cap is 16 KiB), in HEADERS +
            # CONTINUATION frames; the request is valid otherwise and has
            # its message, so admitting it would reach the upstream.
            big = [("x-big-%d" % i, "v" * 4000) for i in range(6)]
            s = c.wait_stream(c.grpc_call(b"big headers", extra=big))
            self.assertEqual((s.reset, s.headers), (INTERNAL_ERROR, []), s)
            # Just under the cap is fine, on the same connection.
            # (The stand-in, gRPC core, takes 8 KiB of metadata by default.)
            under = [("x-big-0", "v" * 4000)]
            ok = c.wait_stream(c.grpc_call(b"fits", path=SERVICE + "Config",
                                           extra=under + [("x-control", "1")]))
            self.assertEqual((ok.grpc_status, ok.reset), (0, None), ok)
            self.assertFalse(c.closed or c.goaway is not None, c.goaway)
        self.sg.wait_for_log(r"stream=1 .*rejected: request header list exceeds 16384 bytes",
                             timeout=5, since=mark)
        self.assert_same_process(watch)
        self.control("after oversized headers")
        self.assert_upstream_saw_nothing()

    def test_hpack_bomb(self):
        n_bombs, refs = 40, 15000
        with RssWatch(self.pid) as watch, RawH2(self.tls_port) as c:
            # Block 1 puts one 4000-byte value into the server's dynamic
            # table (it becomes index 62), on a request refused for its path.
            sid = c.new_sid()
            c.send(headers_frames(sid, hpack_block(c.request_headers("/not.Allowed/X")) +
                                  hpack_literal("x-bomb", "b" * 4000, index=True),
                                  end_stream=True))
            first = c.wait_stream(sid)
            self.assertEqual(first.grpc_status, 12, first)
            # Each later block: 15 KB on the wire, 15000 references to that
            # entry: 60 MB of header list once expanded. 40 of them: 2.4 GB.
            base = hpack_block(c.request_headers())
            bombs = []
            for _ in range(n_bombs):
                sid = c.new_sid()
                bombs.append(sid)
                c.send(headers_frames(sid, base + hpack_indexed(62) * refs, end_stream=True))
            for sid in bombs:
                s = c.wait_stream(sid)
                self.assertEqual((s.reset, s.headers), (INTERNAL_ERROR, []), s)
            self.control("during HPACK bomb")
            # The connection itself is still in order (the dynamic table
            # stayed in sync): a normal call on it works.
            ok = c.wait_stream(c.grpc_call(b"after bomb", path=SERVICE + "Config",
                                           extra=[("x-control", "1")]))
            self.assertEqual(ok.grpc_status, 0, ok)
        self.assert_same_process(watch)
        self.control("after HPACK bomb")
        self.assert_upstream_saw_nothing()

    def test_continuation_flood(self):
        # HEADERS without END_HEADERS, then CONTINUATION frames that never
        # end the block: nghttp2's cap (9 CONTINUATIONs at the default
        # header list limit) ends the connection, with GOAWAY(ENHANCE_YOUR_CALM).
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch, RawH2(self.tls_port) as c:
            c.send(frame(HEADERS, 0, 1, hpack_block(c.request_headers())))
            n = 0
            while not c.closed and not c.send_failed and n < 10000:
                c.send(b"".join(frame(CONTINUATION, 0, 1, hpack_literal("x-c%d" % (n + k), "v"))
                                for k in range(100)))
                n += 100
                c.pump(0.005)
            self.assertTrue(c.wait_closed(10), "connection still open after %d "
                            "CONTINUATION frames" % n)
            self.assertNotIn(1, c.streams, "the unfinished header block got an answer")
            # Told why before the close.
            self.assertEqual([g[1] for g in c.goaways], [ENHANCE_YOUR_CALM], c.goaways)
        self.sg.wait_for_log(r"closing: Too many CONTINUATION frames", timeout=5, since=mark)
        self.assert_same_process(watch)
        self.control("after CONTINUATION flood")
        self.assert_upstream_saw_nothing()


class MalformedRequestTest(AttackCase):
    """Requests a proxy must refuse, each answered as it must be and none
    reaching the upstream (each carries a valid message, so admitting it
    would)."""

    def test_malformed_requests(self):
        port = self.tls_port
        authority = "localhost:%d" % port
        cases = [
            # (what, request header changes, expected)
            ("host differs from :authority", dict(extra=[("host", "evil.example:%d" % port)]),
             ("reset", PROTOCOL_ERROR), r"rejected \(stream reset\): host differs from :authority"),
            (":authority with userinfo", dict(authority="user:pw@" + authority),
             ("reset", PROTOCOL_ERROR), r"rejected \(stream reset\): :authority carries userinfo"),
            ("host with userinfo", dict(extra=[("host", "user@" + authority)]),
             ("reset", PROTOCOL_ERROR), r"rejected \(stream reset\): host carries userinfo"),
            ("wrong :scheme", dict(scheme="http"),
             ("reset", PROTOCOL_ERROR),
             r"rejected \(stream reset\): :scheme is not https on a TLS listener"),
            ("underscore alias of x-forwarded-for", dict(extra=[("x_forwarded_for", "10.0.0.1")]),
             ("grpc", 3), r"a header name with '_' aliases an identity header"),
            ("underscore alias of the identity header",
             dict(extra=[("x_sparkgate_identity", "admin")]),
             ("grpc", 3), r"aliases an identity header"),
            ("GET", dict(method="GET"), ("http", 405), r"HTTP 405"),
            ("content-type text/plain", dict(content_type="text/plain"), ("http", 415),
             r"HTTP 415"),
            ("no content-type", dict(content_type=None), ("http", 415), r"HTTP 415"),
            ("grpc-timeout without unit", dict(extra=[("grpc-timeout", "100")]),
             ("grpc", 13), r"grpc-status 13: sparkgate: malformed grpc-timeout"),
            ("grpc-timeout too long", dict(extra=[("grpc-timeout", "123456789S")]),
             ("grpc", 13), r"malformed grpc-timeout"),
            ("grpc-timeout not a number", dict(extra=[("grpc-timeout", "1e3m")]),
             ("grpc", 13), r"malformed grpc-timeout"),
            # HTTP/2 messaging rules nghttp2 enforces before sparkgate sees
            # the request (RFC 9113 8.2.2, 8.2.1).
            ("connection-specific header", dict(extra=[("connection", "keep-alive")]),
             ("reset", PROTOCOL_ERROR), r"path=/spark.*rejected \(stream reset\): invalid header field 'connection'"),
            ("te other than trailers", dict(extra=[("te", "gzip")]),
             ("reset", PROTOCOL_ERROR), r"path=/spark.*rejected \(stream reset\): invalid header field 'te'"),
            ("uppercase header name", dict(extra=[("X-Upper", "1")]),
             ("reset", PROTOCOL_ERROR), r"path=/spark.*rejected \(stream reset\): invalid header field 'X-Upper'"),
        ]
        with RssWatch(self.pid) as watch:
            for what, changes, (kind, code), log_rx in cases:
                mark = self.sg.mark()
                # One connection per case: a reset may not hide another's answer.
                with RawH2(port) as c:
                    extra = changes.pop("extra", [])
                    hdrs = c.request_headers(extra=extra, **changes)
                    sid = c.request(hdrs, H.grpc_frame(("malformed: " + what).encode()))
                    s = c.wait_stream(sid)
                    if kind == "reset":
                        self.assertEqual((s.reset, s.headers), (code, []), (what, s))
                    elif kind == "http":
                        self.assertEqual((s.status, s.reset), (code, None), (what, s))
                        self.assertTrue(s.ended, (what, s))
                        if code == 405:
                            self.assertEqual(s.header("allow"), "POST", s)
                    else:
                        self.assertEqual((s.status, s.grpc_status, len(s.headers), s.data),
                                         (200, code, 1, b""), (what, s))
                        self.assertTrue(s.ended, (what, s))
                if log_rx is not None:
                    self.sg.wait_for_log(log_rx, timeout=5, since=mark)
            self.control("after malformed requests")
        self.assert_same_process(watch)
        self.assert_upstream_saw_nothing()

    def test_spark_call_without_message(self):
        # A unary Spark call whose HEADERS carry END_STREAM and no message at
        # all: it can never name a session, so it must be answered (3, as
        # for a body that ends before a complete message) instead of holding
        # a stream until the stream idle timeout.
        with RssWatch(self.pid) as watch, RawH2(self.tls_port) as c:
            sid = c.request(c.request_headers(SERVICE + "AnalyzePlan"))
            try:
                s = c.wait_stream(sid, timeout=5)
            except TimeoutError:
                self.fail("no answer to a Spark call that ended without a message: the "
                          "stream is held (until stream_idle_timeout_ms): %r" % c.streams[sid])
            self.assertEqual((s.status, s.grpc_status), (200, 3), s)
        self.assert_same_process(watch)
        self.control("after a call without message")
        self.assert_upstream_saw_nothing()


class SlowlorisTest(AttackCase):
    """Connections that say nothing, or too little, are closed."""

    config_overrides = {"stream_idle_timeout_ms": 1000}

    def test_silent_connections_are_closed(self):
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch:
            # TLS: TCP connect, then not a byte (no ClientHello).
            silent_tls = [socket.create_connection(("127.0.0.1", self.tls_port), timeout=5)
                          for _ in range(10)]
            # h2c: TCP connect, then nothing (no preface).
            silent_h2c = [socket.create_connection(("127.0.0.1", self.h2c_port), timeout=5)
                          for _ in range(10)]
            # TLS handshake done, then no preface.
            mute_tls = [RawH2(self.tls_port, preface=False) for _ in range(3)]
            # Preface and SETTINGS, then nothing: idle, closed at idle_timeout_ms.
            idle = [RawH2(self.h2c_port, tls=False), RawH2(self.tls_port)]
            try:
                self.control("during slowloris")
                for s in silent_tls + silent_h2c:
                    self.assertTrue(wait_socket_closed(s, 10), "silent connection not closed")
                for c in mute_tls:
                    self.assertTrue(c.wait_closed(10), "TLS connection without preface "
                                    "not closed")
                for c in idle:
                    self.assertTrue(c.wait_closed(10), "idle connection not closed")
                    self.assertEqual(c.goaway and c.goaway[1], NO_ERROR, c.goaway)
            finally:
                for s in silent_tls + silent_h2c:
                    s.close()
                for c in mute_tls + idle:
                    c.close()
        self.sg.wait_for_log(r"closed: TLS handshake not finished in %d ms"
                             % TLS_HANDSHAKE_TIMEOUT_MS, timeout=5, since=mark)
        self.sg.wait_for_log(r"closed: no HTTP/2 preface and SETTINGS within", timeout=5,
                             since=mark)
        self.assert_same_process(watch)
        self.control("after slowloris")
        self.assert_upstream_saw_nothing()

    def test_stuck_request_stream_is_ended_and_connection_closed(self):
        # A request stream that never sends its message (nor END_STREAM):
        # the stream idle timeout answers 4, and then the connection must
        # not stay open for ever on that half-open stream.
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch, RawH2(self.h2c_port, tls=False) as c:
            sid = c.request(c.request_headers(), end_stream=False)
            st = c.wait_stream(sid, timeout=10)
            self.assertEqual((st.status, st.grpc_status), (200, 4), st)
            self.sg.wait_for_log(r"grpc-status 4: sparkgate: the call was idle too long",
                                 timeout=5, since=mark)
            self.assertTrue(c.wait_closed(10), "connection still open 10 s after the "
                            "answer (idle_timeout_ms %d): the answered, half-open stream "
                            "pins it (no RST_STREAM after the response)" % IDLE_TIMEOUT_MS)
        self.assert_same_process(watch)
        self.control("after a stuck stream")
        self.assert_upstream_saw_nothing()

    def test_unauthenticated_half_open_streams_do_not_pin_connections(self):
        # Without a token, streams that are refused (16) but never
        # half-closed by the client: an unauthenticated peer must not be
        # able to keep its connections (and max_connections slots) for ever.
        with RssWatch(self.pid) as watch, RawH2(self.sg.port("jwt")) as c:
            sids = [c.request(c.request_headers(), end_stream=False) for _ in range(10)]
            for sid in sids:
                st = c.wait_stream(sid, timeout=10)
                self.assertEqual((st.status, st.grpc_status), (200, 16), st)
            self.assertTrue(c.wait_closed(10), "unauthenticated connection still open "
                            "10 s after the refusals (idle_timeout_ms %d), held by refused "
                            "half-open streams" % IDLE_TIMEOUT_MS)
        self.assert_same_process(watch)
        self.control("after half-open refused streams")
        self.assert_upstream_saw_nothing()


def wait_socket_closed(sock, timeout):
    """Reads from a plain socket until EOF or reset (bounded); True if so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


class SlowReadTest(AttackCase):
    """A client that asks for a large response and never reads it."""

    def test_slow_read_is_closed_after_write_stall(self):
        total = 512 * MIB
        for listener, tls in (("dev", False), ("public", True)):
            mark = self.sg.mark()
            self.up.clear()
            with RssWatch(self.pid) as watch:
                # A small receive buffer and a huge window: nothing holds the
                # proxy back but the socket, which nobody reads.
                c = RawH2(self.sg.port(listener), tls=tls, rcvbuf=4096,
                          settings=[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)],
                          auto_window=False)
                try:
                    c.send(window_update(0, MAX_WINDOW - 65535))
                    sid = c.grpc_call(b"big result", extra=H.standin_md(
                        "stream", bytes=total, chunk=64 * 1024))
                    rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10)
                    self.control("during slow read (%s)" % listener)
                    self.sg.wait_for_log(r"closed: the client read nothing for %d ms "
                                         r"\(write stall\)" % WRITE_STALL_TIMEOUT_MS,
                                         timeout=20, since=mark)
                    # Closing the client leg cancelled the upstream call.
                    self.up.wait_for(lambda _: rec.cancelled, timeout=10)
                    # Reading now finds the end: the proxy has closed the socket.
                    self.assertTrue(c.wait_closed(20), "connection not closed")
                    got = len(c.streams[sid].data)
                    self.assertLess(got, total, "the whole response was delivered")
                    self.assertFalse(c.streams[sid].ended)
                finally:
                    c.close()
            self.assert_same_process(watch)
        self.control("after slow read")


class FlowControlStallTest(AttackCase):
    """A client that never gives window credit back: the proxy holds at
    most a window of the response, and the call ends at the stream idle
    timeout instead of holding the backend for ever."""

    config_overrides = {"stream_idle_timeout_ms": 1000}

    def test_never_acked_window_ends_at_stream_idle(self):
        mark = self.sg.mark()
        total = 256 * MIB
        with RssWatch(self.pid) as watch, RawH2(self.h2c_port, tls=False,
                                                auto_window=False) as c:
            sid = c.grpc_call(b"big result", extra=H.standin_md(
                "stream", bytes=total, chunk=64 * 1024))
            rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10)
            st = c.streams[sid]
            # The default 65535-byte windows, never credited back.
            c.wait(lambda: len(st.data) >= 65535, 10, "the first window of data")
            self.control("during a flow-control stall")
            c.wait(lambda: st.done, 10, "the stalled call ended")
            self.assertEqual((st.reset, len(st.data)), (INTERNAL_ERROR, 65535), st)
            self.sg.wait_for_log(r"stream=%d .*grpc-status 4: sparkgate: the call was idle "
                                 r"too long" % sid, timeout=5, since=mark)
            self.up.wait_for(lambda _: rec.cancelled, timeout=10)
            self.assertLess(rec.response_bytes, total)
            # With the stream gone the connection is idle, and closed.
            self.assertTrue(c.wait_closed(10), "connection not closed at idle timeout")
            self.assertEqual(c.goaway and c.goaway[1], NO_ERROR, c.goaway)
        self.assert_same_process(watch)
        self.control("after a flow-control stall")

    def test_idle_after_whole_messages_ends_with_status_in_trailers(self):
        # The backend sends two messages, then nothing: the call is ended
        # after the second whole message with grpc-status 4 in trailers
        # (a status the client can act on), not with a reset.
        mark = self.sg.mark()
        with RawH2(self.h2c_port, tls=False) as c:
            sid = c.grpc_call(b"quiet", extra=H.standin_md("stall", count=2, stall_ms=30000))
            rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10)
            st = c.wait_stream(sid, timeout=15)
            self.assertEqual((st.reset, st.grpc_status), (None, 4), st)
            self.assertEqual(H.grpc_unframe(st.data), [b"standin 0", b"standin 1"], st)
            self.assertIn("idle", st.header("grpc-message") or "", st)
            self.sg.wait_for_log(r"stream=%d .*grpc-status 4: sparkgate: the call was idle "
                                 r"too long" % sid, timeout=5, since=mark)
            self.up.wait_for(lambda _: rec.cancelled, timeout=10)
        self.control("after an idle call")




class MaxConnectionsTest(AttackCase):
    config_overrides = {"max_connections": 4, "workers": 1, "idle_timeout_ms": 60000}

    def test_fifth_connection_closed_at_accept(self):
        with RssWatch(self.pid) as watch:
            conns = []
            try:
                for _ in range(4):
                    c = RawH2(self.h2c_port, tls=False)
                    c.wait(lambda c=c: c.settings_acked, 5, "SETTINGS ACK")
                    conns.append(c)
                mark = self.sg.mark()
                with RawH2(self.h2c_port, tls=False) as extra:
                    self.assertTrue(extra.wait_closed(10), "5th connection not closed")
                    self.assertEqual(extra.frames_in, 0, "the 5th connection got HTTP/2 frames")
                self.sg.wait_for_log(r"listener dev: refused connection from 127\.0\.0\.1:\d+: "
                                     r"max_connections \(4\) reached", timeout=5, since=mark)
                # A TLS client is refused the same way (the cap is for all listeners).
                with self.assertRaises((ssl.SSLError, OSError)):
                    RawH2(self.tls_port)
                # The connections already open keep working.
                for c in conns:
                    s = c.wait_stream(c.grpc_call(b"held", path=SERVICE + "Config",
                                                  extra=[("x-control", "1")]))
                    self.assertEqual(s.grpc_status, 0, s)
                # Closing two frees two slots: new connections work again.
                for c in conns[:2]:
                    c.close()
                fresh = self.accepted_h2c_connection()
                self.assertIsNotNone(fresh, "no new connection accepted after closing two")
                conns.append(fresh)
                s = fresh.wait_stream(fresh.grpc_call(b"fresh", path=SERVICE + "Config",
                                                      extra=[("x-control", "1")]))
                self.assertEqual(s.grpc_status, 0, s)
                self.control("after max_connections")
            finally:
                for c in conns:
                    c.close()
        self.assert_same_process(watch)
        self.assert_upstream_saw_nothing()



class MaxConnectionsPerClientTest(AttackCase):
    config_overrides = {"max_connections_per_client": 2, "workers": 1,
                        "idle_timeout_ms": 60000}

    def test_third_connection_from_one_address_closed(self):
        with RssWatch(self.pid) as watch:
            conns = []
            try:
                for _ in range(2):
                    c = RawH2(self.h2c_port, tls=False)
                    c.wait(lambda c=c: c.settings_acked, 5, "SETTINGS ACK")
                    conns.append(c)
                mark = self.sg.mark()
                with RawH2(self.h2c_port, tls=False) as extra:
                    self.assertTrue(extra.wait_closed(10), "3rd connection not closed")
                    self.assertEqual(extra.frames_in, 0, "the 3rd connection got HTTP/2 frames")
                self.sg.wait_for_log(r"refused connection from 127\.0\.0\.1:\d+: "
                                     r"max_connections_per_client \(2\) reached",
                                     timeout=5, since=mark)
                # Another address is not affected: 127.0.0.2 gets SETTINGS.
                other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                other.settimeout(5)
                try:
                    other.bind(("127.0.0.2", 0))
                    other.connect(("127.0.0.1", self.h2c_port))
                    other.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" +
                                  b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                    head = other.recv(9)
                    self.assertEqual(len(head), 9, "no frame for another address")
                    self.assertEqual(head[3], 0x4, "first frame is not SETTINGS")
                finally:
                    other.close()
                # Closing one frees one slot for the first address.
                conns.pop().close()
                fresh = self.accepted_h2c_connection()
                self.assertIsNotNone(fresh, "no new connection after closing one")
                conns.append(fresh)
            finally:
                for c in conns:
                    c.close()
        self.assert_same_process(watch)
        self.assert_upstream_saw_nothing()

class UnauthenticatedFloodTest(AttackCase):
    def jwt_control(self, what):
        ch = H.tls_channel(self.sg.port("jwt"))
        try:
            r = H.call_unary(ch, "Config", what.encode(),
                             [("authorization", "Bearer " + hs256_token()),
                              ("x-control", "1")], timeout=15)
        finally:
            ch.close()
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, what.encode()), r)

    def test_unauthenticated_flood_spends_the_budget(self):
        mark = self.sg.mark()
        denied = 0
        with RssWatch(self.pid) as watch, RawH2(self.sg.port("jwt")) as c:
            while c.goaway is None and not c.closed and not c.send_failed and denied < 3000:
                batch = [c.new_sid() for _ in range(50)]
                c.send(b"".join(c.request_bytes(sid, c.request_headers(SERVICE + "Config"),
                                                H.grpc_frame(b"no token"))
                                for sid in batch))
                c.wait(lambda: all(c.streams[s].done for s in batch), 10, "batch answered")
                for sid in batch:
                    s = c.streams[sid]
                    if not s.done:
                        continue  # beyond the GOAWAY's last stream
                    self.assertEqual((s.status, s.grpc_status, s.header("grpc-message"),
                                      len(s.headers), s.ended),
                                     (200, 16, "sparkgate: authentication required or failed",
                                      1, True), s)
                    denied += 1
                if denied == 200:
                    self.jwt_control("during the flood")
            self.assert_goaway(c, ENHANCE_YOUR_CALM, "unauthenticated flood (%d denied)" % denied)
        # Each denial costs 2 of the 1000-token burst.
        self.assertGreaterEqual(denied, ABUSE_BURST // 2)
        self.sg.wait_for_log(r"closing: too many unauthenticated requests \(abuse budget "
                             r"spent\): GOAWAY ENHANCE_YOUR_CALM", timeout=5, since=mark)
        self.assert_same_process(watch)
        self.jwt_control("after the flood")
        self.assert_upstream_saw_nothing()


class CancellationTest(AttackCase):
    def test_every_client_reset_cancels_upstream(self):
        md = H.standin_md("stall", count=1, stall_ms=30000)
        with RssWatch(self.pid) as watch:
            # 50 streaming calls on one connection, all live end to end
            # (each got its first message), then RST_STREAM on all of them.
            with RawH2(self.tls_port) as c:
                sids = [c.grpc_call(b"call %d" % i, extra=md) for i in range(50)]
                c.wait(lambda: all(len(c.streams[s].data) > 0 for s in sids), 20,
                       "a first message on every stream")
                self.up.wait_for(lambda recs: len(recs) == 50, timeout=10)
                self.assertEqual([r for r in self.up.calls() if r.cancelled], [])
                c.send(b"".join(rst_stream(s, CANCEL) for s in sids))
                self.up.wait_for(lambda recs: sum(r.cancelled for r in recs) == 50, timeout=20)
                # The connection goes on.
                s = c.wait_stream(c.grpc_call(b"after resets", path=SERVICE + "Config",
                                              extra=[("x-control", "1")]))
                self.assertEqual(s.grpc_status, 0, s)
            # 20 more on a connection that is then dropped (no RST_STREAM,
            # no GOAWAY): the proxy cancels them all the same.
            self.up.clear()
            c = RawH2(self.h2c_port, tls=False)
            sids = [c.grpc_call(b"drop %d" % i, extra=md) for i in range(20)]
            c.wait(lambda: all(len(c.streams[s].data) > 0 for s in sids), 20,
                   "a first message on every stream")
            c.close()
            self.up.wait_for(lambda recs: len(recs) == 20 and all(r.cancelled for r in recs),
                             timeout=20)
        self.assert_same_process(watch)
        self.control("after cancellations")


class FailingBackendCase(H.SparkgateTestCase):
    """Tenant "default" is the stand-in; tenant "broken" (chosen with the
    x-spark-tenant header) is a backend that fails in one way or another."""

    def start(self, broken_port):
        self.up = self.standin()
        cfg = attack_config(self.up.port, admin={"address": "127.0.0.1", "port": 0})
        cfg["tenant_selectors"] = ["header:x-spark-tenant", "authority"]
        cfg["tenants"] = [
            {"name": "default", "hosts": ["localhost", "127.0.0.1"],
             "backends": [{"name": "spark-1", "address": "127.0.0.1", "port": self.up.port}],
             "allow": {"any_identity": True}, "user_id": "off"},
            {"name": "broken",
             "backends": [{"name": "spark-broken", "address": "127.0.0.1",
                           "port": broken_port}],
             "allow": {"any_identity": True}, "user_id": "off"},
        ]
        self.sg = self.start_sparkgate(cfg)
        self.pid = self.sg.pid
        self.port = self.sg.port("public")
        self.ch = H.tls_channel(self.port)
        self.addCleanup(self.ch.close)
        self.broken_port = broken_port

    def control(self, what):
        ch = H.tls_channel(self.port)
        try:
            r = H.call_unary(ch, "Config", what.encode(), timeout=15)
        finally:
            ch.close()
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, what.encode()), r)

    def broken_call(self, method="AnalyzePlan", timeout=15, payload=b"to the broken backend"):
        return H.call_unary(self.ch, method, payload,
                            [("x-spark-tenant", "broken")], timeout=timeout)

    def assert_unavailable_naming_no_address(self, r):
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        self.assertNotIn("127.0.0.1", r.details or "", r)
        self.assertNotIn(str(self.broken_port), r.details or "", r)

    def finish(self, watch):
        self.assertTrue(self.sg.alive(), self.sg.log_text())
        self.assertEqual(self.sg.pid, self.pid)
        self.assertLess(max(watch.peak, rss_mib(self.pid)), RSS_BOUND_MIB)
        self.control("after")


class FailingBackendTest(FailingBackendCase):
    def test_backend_refuses_connections(self):
        self.start(H.free_port())
        with RssWatch(self.pid) as watch:
            for _ in range(3):
                self.assert_unavailable_naming_no_address(self.broken_call())
            self.control("while the backend is down")
        self.finish(watch)

    def test_backend_black_hole_accepts_but_never_answers(self):
        # Listening, never accepting: the kernel completes the TCP
        # handshake, then nothing ever comes back (no SETTINGS).
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        self.addCleanup(hole.close)
        self.start(hole.getsockname()[1])
        with RssWatch(self.pid) as watch:
            r = self.broken_call(timeout=10)
            self.assert_unavailable_naming_no_address(r)
            self.control("while the backend is a black hole")
        self.finish(watch)

    def test_backend_black_hole_drops_syn(self):
        # A full accept queue: the kernel drops the proxy's SYN, so the
        # TCP connect itself never completes (connect_timeout_ms).
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        self.addCleanup(hole.close)
        filler = socket.create_connection(hole.getsockname(), timeout=5)
        self.addCleanup(filler.close)
        self.start(hole.getsockname()[1])
        with RssWatch(self.pid) as watch:
            r = self.broken_call(timeout=10)
            self.assert_unavailable_naming_no_address(r)
            self.control("while the backend drops SYNs")
        self.sg.wait_for_log(r"connect timed out after %d ms" % UPSTREAM_CONNECT_TIMEOUT_MS,
                             timeout=5)
        self.finish(watch)

    def test_backend_closes_mid_response(self):
        # The stand-in sends two messages, then aborts its TCP connection.
        self.start(H.free_port())
        with RssWatch(self.pid) as watch, RawH2(self.port) as c:
            # Another call in flight, on the same backend connection.
            other = c.grpc_call(b"other", extra=H.standin_md("stall", count=1, stall_ms=30000))
            c.wait(lambda: len(c.streams[other].data) > 0, 10, "the other call is live")
            sid = c.grpc_call(b"doomed", extra=H.standin_md("reset", count=2))
            s = c.wait_stream(sid, timeout=15)
            self.assertEqual(H.grpc_unframe(s.data), [b"standin 0", b"standin 1"], s)
            self.assertEqual(s.reset, INTERNAL_ERROR, s)
            # The other call shared the backend connection that died: it is
            # reset too (it cannot go on), not left hanging.
            o = c.wait_stream(other, timeout=15)
            self.assertEqual((o.reset, H.grpc_unframe(o.data)), (INTERNAL_ERROR, [b"standin 0"]), o)
            # The connection to the client survives; new calls work.
            ok = c.wait_stream(c.grpc_call(b"next", path=SERVICE + "Config"))
            self.assertEqual(ok.grpc_status, 0, ok)
            self.assertFalse(c.closed or c.goaway is not None, c.goaway)
        self.finish(watch)

class ScriptedBackendTest(FailingBackendCase):
    """Tenant "broken" is a RawBackend (tests/lib/raw_backend.py) that
    follows a plan, one behaviour per connection it accepts."""

    def start_plan(self, *plan):
        self.raw = RawBackend(plan)
        self.addCleanup(self.raw.close)
        self.start(self.raw.port)

    def seen(self):
        return self.raw.snapshot()

    def metrics_text(self):
        m = re.search(r"admin listening on 127\.0\.0\.1:(\d+)", self.sg.log_text())
        s = socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=5)
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            for _ in range(1000):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        return data.decode()

    def test_goaway_before_processing_is_sent_again_once(self):
        # The first connection answers the call with GOAWAY(last stream 0):
        # the call was not processed, so it goes, body and all, to a new
        # connection, and the client never knows.
        self.start_plan("goaway", "ok")
        payload = bytes(range(256)) * 40  # several DATA frames' worth
        with RssWatch(self.pid) as watch:
            r = self.broken_call(payload=payload)
            self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, H.spark_request(payload)), r)
            reqs, conns = self.seen()
            self.assertEqual(conns, 2)
            self.assertEqual([q[0] for q in reqs], [0, 1], reqs)
            self.assertEqual(reqs[1][3], H.grpc_frame(payload))
            self.sg.wait_for_log(r"did not process the call \(GOAWAY\): sending it once more")
            self.assertIn('sparkgate_upstream_retries_total{tenant="broken"} 1',
                          self.metrics_text())
        self.finish(watch)

    def test_request_body_and_its_end_go_upstream_in_one_frame(self):
        # A unary call whose last DATA frame carries END_STREAM reaches the
        # backend the same way, not as the data and then an empty frame.
        self.start_plan("ok")
        body = H.grpc_frame(b"one frame")
        with RawH2(self.port) as c:
            s = c.wait_stream(c.grpc_call(b"one frame", path=SERVICE + "AnalyzePlan",
                                          extra=[("x-spark-tenant", "broken")]))
            self.assertEqual(s.grpc_status, 0, s)
            self.assertEqual(bytes(s.data), body)
        reqs, _ = self.seen()
        self.assertEqual(len(reqs), 1, reqs)
        self.assertEqual(reqs[0][3], body)
        self.assertEqual(reqs[0][4], [(len(body), True)])

    def test_a_long_header_list_reaches_the_backend_whole(self):
        # More fields than a stream keeps room for: the list moves to the
        # heap on the way (twice), and every field arrives, in order.
        self.start_plan("ok")
        extra = [("x-field-%02d" % i, "value %d" % i) for i in range(40)]
        with RawH2(self.port) as c:
            s = c.wait_stream(c.grpc_call(b"many fields", path=SERVICE + "AnalyzePlan",
                                          extra=[("x-spark-tenant", "broken")] + extra))
            self.assertEqual(s.grpc_status, 0, s)
        reqs, _ = self.seen()
        self.assertEqual(len(reqs), 1, reqs)
        got = [(k, v) for k, v in reqs[0][2].items() if k.startswith("x-field-")]
        self.assertEqual(got, extra)

    def test_refused_stream_is_sent_again_once_then_unavailable(self):
        self.start_plan("refuse")
        with RssWatch(self.pid) as watch:
            self.assert_unavailable_naming_no_address(self.broken_call())
            reqs, conns = self.seen()
            # Once more, on another connection, and no more than that.
            self.assertEqual(len(reqs), 2, reqs)
            self.assertEqual(conns, 2)
        self.finish(watch)

    def test_refused_after_a_large_body_is_not_sent_again(self):
        # More request bytes were sent than the proxy keeps for a retry.
        self.start_plan("refuse_after_body", "ok")
        with RssWatch(self.pid) as watch:
            r = self.broken_call(payload=b"x" * (200 * 1024))
            self.assert_unavailable_naming_no_address(r)
            reqs, _ = self.seen()
            self.assertEqual(len(reqs), 1, reqs)
        self.finish(watch)

    def test_goaway_after_processing_is_not_sent_again(self):
        # GOAWAY naming the call's stream as processed, then the connection
        # drops before an answer: it may have run, so it is not repeated.
        self.start_plan("goaway_processed", "ok")
        with RssWatch(self.pid) as watch:
            self.assert_unavailable_naming_no_address(self.broken_call())
            reqs, _ = self.seen()
            self.assertEqual(len(reqs), 1, reqs)
        self.finish(watch)

    def test_reset_before_response_headers_is_unavailable(self):
        self.start_plan("rst")
        with RssWatch(self.pid) as watch:
            r = self.broken_call()
            self.assert_unavailable_naming_no_address(r)
            self.assertEqual(len(self.seen()[0]), 1)
            self.sg.wait_for_log(r"backend spark-broken: .*INTERNAL_ERROR")
        self.finish(watch)

    def test_malformed_response_headers_are_unavailable(self):
        self.start_plan("bad_headers")
        with RssWatch(self.pid) as watch:
            r = self.broken_call()
            self.assert_unavailable_naming_no_address(r)
            # Nothing of the malformed block reached the client.
            self.assertNotIn(("connection", "close"), r.initial_metadata)
        self.finish(watch)

    def test_interim_response_before_the_answer(self):
        # A 1xx interim response is dropped; the final response that follows
        # it (nghttp2 files it like trailers) is the answer.
        self.start_plan("interim")
        with RssWatch(self.pid) as watch:
            r = self.broken_call(payload=b"hello")
            self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, H.spark_request(b"hello")), r)
        self.finish(watch)

    def test_interim_response_before_a_trailers_only_answer(self):
        self.start_plan("interim_only")
        with RssWatch(self.pid) as watch:
            r = self.broken_call()
            self.assertEqual((r.code, r.details), (grpc.StatusCode.NOT_FOUND, "not here"), r)
        self.finish(watch)

    def test_backend_that_stops_reading_an_upload(self):
        # The backend takes the request headers, then never reads again: the
        # upload fills the flow-control windows and stops; the client's
        # deadline ends the call with DEADLINE_EXCEEDED, other calls go on.
        self.start_plan("no_read")
        chunk = b"u" * (256 * 1024)
        with RssWatch(self.pid) as watch:
            r = H.call_client_stream(self.ch, "AddArtifacts", [chunk] * 64,
                                     [("x-spark-tenant", "broken")], timeout=3)
            self.assertEqual(r.code, grpc.StatusCode.DEADLINE_EXCEEDED, r)
            self.control("while a backend stops reading")
        # The proxy dropped the call on its side too: no stream is left.
        H.wait_until(lambda: "\nsparkgate_streams_open 0\n" in self.metrics_text(),
                     10, what="no active stream left")
        self.finish(watch)


class DrainTest(AttackCase):
    # Far longer than the test waits: only a GOAWAY the proxy chooses to
    # send can end the connection in time.
    config_overrides = {"drain_timeout_ms": 60000}

    def test_a_call_opened_after_the_drain_notice_still_gets_the_final_goaway(self):
        # RFC 9113 6.8: after the first GOAWAY (last stream 2^31-1) a client
        # may still open streams until the final one. A call opened in that
        # window once cancelled the final GOAWAY's timer: the connection
        # then stayed open, taking new calls, until the drain timeout cut
        # whatever was in flight.
        total, chunk = 8 * 65536, 65536
        with RawH2(self.h2c_port, tls=False) as c:
            c.wait(lambda: c.settings_acked, 10, "SETTINGS ACK")
            long_sid = c.grpc_call(b"long", extra=H.standin_md(
                "stream", bytes=total, chunk=chunk, seed=5, interval_ms=100))
            c.wait(lambda: len(c.streams[long_sid].data) > 0, 10, "first response bytes")
            self.sg.send_signal(signal.SIGTERM)
            c.wait(lambda: c.goaway is not None, 10, "the drain's GOAWAY")
            self.assertEqual(c.goaways[0][:2], (2**31 - 1, 0), c.goaways)
            late_sid = c.grpc_call(b"late", path=SERVICE + "Config")
            late = c.wait_stream(late_sid, 10)
            self.assertEqual((late.grpc_status, bytes(late.data)),
                             (0, b"\x00" + struct.pack(">I", 4) + b"late"), late)
            c.wait(lambda: len(c.goaways) >= 2, 15, "the final GOAWAY")
            self.assertEqual(c.goaways[1][:2], (late_sid, 0), c.goaways)
            long = c.wait_stream(long_sid, 20)
            self.assertEqual(long.grpc_status, 0, long)
            self.assertEqual(len(long.data), total + 5 * (total // chunk), long)
            self.assertTrue(c.wait_closed(10), "connection not closed after the drain")
        self.assertEqual(self.sg.wait(15), 0, self.sg.log_text())


if __name__ == "__main__":
    H.main()
