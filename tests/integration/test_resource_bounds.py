#!/usr/bin/python3
"""Resource bounds (memory, descriptors, streams, backend
connections) under large transfers, slow or stalled peers, repetition and
pathological inputs.

BlastBackend is a hand-written h2c backend fast enough to push GiBs
through the proxy (python3-h2 and grpcio are not), and FastClient a
hand-written client that reads and credits windows with a frame parser
that does not copy its buffer per frame. Every wait is bounded; bounds on
RSS and counts have generous margins; no test asserts a duration.
"""

import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
from threaded_server import ThreadedServer  # noqa: E402
import hpack  # noqa: E402
from test_attacks import (  # noqa: E402
    RawH2, RssWatch, attack_config, rss_mib, hpack_block, headers_frames, frame,
    settings_frame, window_update, rst_stream, PREFACE, DATA, HEADERS, RST_STREAM,
    SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION, FLAG_ACK, FLAG_END_STREAM,
    FLAG_END_HEADERS, SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW, CANCEL)
from test_operations import parse_prometheus, sample, http_get, ADMIN_RE  # noqa: E402

MIB = H.MIB
GIB = 1024 * MIB
TEST = H.TEST_PREFIX
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3

# A gRPC message of exactly 64 KiB on the wire; a 1 MiB block is 16 of them.
MSG = b"\x00" + struct.pack(">I", 65536 - 5) + bytes(range(256)) * 255 + b"\x00" * (65531 - 65280)
assert len(MSG) == 65536
BLOCK = memoryview(MSG * 16)


def _sanitized():
    try:
        with open(H.sparkgate_bin(), "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


# Under AddressSanitizer RSS is its quarantine and shadow: RSS bounds are
# checked on normal builds only (descriptors, gauges and leaks always).
SANITIZED = _sanitized()


def note(msg):
    if os.environ.get("SG_REVIEW_NOTES"):
        sys.stderr.write("  [note] %s\n" % msg)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def threads_of(pid):
    return len(os.listdir("/proc/%d/task" % pid))


# ---------------------------------------------------------------------------
# A fast scripted h2c backend

class BlastBackend(ThreadedServer):
    """h2c backend written frame by frame. Paths (after TEST):

      Download  response headers at once, then x-bytes bytes of 64 KiB gRPC
                messages (as fast as the proxy's windows allow), then
                grpc-status 0
      Upload    reads the body (crediting it back at once, unless `reading`
                is cleared: then it stops reading the socket), answers
                grpc-status 0 with trailer x-received at its end
      Hold      response headers and one message, then nothing

    Its receive windows are `window` (stream) and 2 GiB (connection)."""

    def __init__(self, window=MAX_WINDOW, rcvbuf=None):
        self.window = window
        self.rcvbuf = rcvbuf
        self.reading = threading.Event()
        self.reading.set()
        self.lock = threading.Lock()
        self.connections = 0
        self.open_connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.requests = 0
        self.resets = 0
        self.finished = 0
        super().__init__(backlog=256, rcvbuf=rcvbuf)

    def accepted(self, sock):
        with self.lock:
            self.connections += 1
            self.open_connections += 1
        return True

    def close(self):
        self.reading.set()
        super().close()

    def serve(self, sock):
        try:
            _BackendConn(self, sock).run()
        except Exception:  # peer gone, protocol error: done
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self.lock:
                self.open_connections -= 1


class _BackendConn:
    def __init__(self, be, sock):
        self.be, self.sock = be, sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 20
        self.peer_initial = 65535
        self.conn_window = 65535
        self.windows = {}     # sid -> send window
        self.sending = {}     # sid -> bytes left to send
        self.offsets = {}     # sid -> offset in BLOCK
        self.uploads = {}     # sid -> bytes received
        self.hdr = None       # (sid, flags, block) of a header block in progress

    def run(self):
        be, sock = self.be, self.sock
        sock.settimeout(10)
        got = b""
        while len(got) < len(PREFACE):
            chunk = sock.recv(len(PREFACE) - len(got))
            if not chunk:
                return
            got += chunk
        sock.sendall(settings_frame([(SETTINGS_INITIAL_WINDOW_SIZE, be.window),
                                     (SETTINGS_MAX_CONCURRENT_STREAMS, 1000)]) +
                     window_update(0, MAX_WINDOW - 65535))
        buf = bytearray()
        while not be.closed.is_set():
            if not be.reading.is_set():
                time.sleep(0.02)
                continue
            ready = self.ready_to_send()
            r, _, _ = select.select([sock], [], [], 0 if ready else 0.05)
            if r:
                data = sock.recv(1 << 20)
                if not data:
                    return
                buf += data
                used = self.parse(buf)
                del buf[:used]
            if self.ready_to_send():
                self.pump_out()

    def ready_to_send(self):
        return self.conn_window > 0 and any(
            self.windows.get(s, 0) > 0 for s, left in self.sending.items() if left > 0)

    def pump_out(self):
        out = []
        size = 0
        for sid in list(self.sending):
            left = self.sending[sid]
            while left > 0 and self.conn_window > 0 and self.windows.get(sid, 0) > 0 \
                    and size < 1024 * 1024:
                off = self.offsets[sid]
                n = min(16384, left, self.conn_window, self.windows[sid], len(BLOCK) - off)
                out.append(struct.pack(">I", n)[1:] + bytes([DATA, 0]) + struct.pack(">I", sid))
                out.append(BLOCK[off:off + n])
                self.offsets[sid] = (off + n) % len(BLOCK)
                self.conn_window -= n
                self.windows[sid] -= n
                left -= n
                size += n
            self.sending[sid] = left
            if left == 0:
                del self.sending[sid]
                out.append(headers_frames(sid, hpack_block([("grpc-status", "0")]),
                                          end_stream=True))
                with self.be.lock:
                    self.be.finished += 1
        if out:
            self.sock.sendall(b"".join(out))
            with self.be.lock:
                self.be.bytes_out += size

    def parse(self, buf):
        i = 0
        n = len(buf)
        mv = memoryview(buf)
        out = []
        while n - i >= 9:
            length = int.from_bytes(mv[i:i + 3], "big")
            if n - i < 9 + length:
                break
            ftype, flags = buf[i + 3], buf[i + 4]
            sid = int.from_bytes(mv[i + 5:i + 9], "big") & 0x7FFFFFFF
            start = i + 9
            i += 9 + length
            if ftype == DATA:
                self.on_frame(ftype, flags, sid, length, out)
            else:
                self.on_frame(ftype, flags, sid, bytes(mv[start:i]), out)
        mv.release()
        if out:
            self.sock.sendall(b"".join(out))
        return i

    def on_frame(self, ftype, flags, sid, payload, out):
        be = self.be
        if ftype == SETTINGS:
            if not flags & FLAG_ACK:
                for k in range(0, len(payload) - 5, 6):
                    key, v = struct.unpack(">HI", payload[k:k + 6])
                    if key == SETTINGS_INITIAL_WINDOW_SIZE:
                        for s in self.windows:
                            self.windows[s] += v - self.peer_initial
                        self.peer_initial = v
                out.append(settings_frame(ack=True))
        elif ftype == PING:
            if not flags & FLAG_ACK:
                out.append(frame(PING, FLAG_ACK, 0, bytes(payload)))
        elif ftype == WINDOW_UPDATE:
            inc = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_window += inc
            elif sid in self.windows:
                self.windows[sid] += inc
        elif ftype == RST_STREAM:
            self.sending.pop(sid, None)
            self.windows.pop(sid, None)
            self.uploads.pop(sid, None)
            with be.lock:
                be.resets += 1
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                body = bytes(payload)
                if flags & 0x8:
                    body = body[1:len(body) - body[0]]
                if flags & 0x20:
                    body = body[5:]
                self.hdr = [sid, flags, body]
            else:
                self.hdr[2] += bytes(payload)
            if flags & FLAG_END_HEADERS:
                hsid, hflags, block = self.hdr
                self.hdr = None
                headers = dict((k.decode(), v.decode()) for k, v in
                               self.dec.decode(block, raw=True))
                if hsid in self.uploads or hsid in self.windows:
                    # Request trailers.
                    if hflags & FLAG_END_STREAM:
                        self.request_end(hsid, out)
                    return
                self.on_request(hsid, hflags, headers, out)
        elif ftype == DATA:
            n = payload  # the length
            if n:
                out.append(window_update(0, n))
                if not flags & FLAG_END_STREAM:
                    out.append(window_update(sid, n))
            if sid in self.uploads:
                self.uploads[sid] += n
            with be.lock:
                be.bytes_in += n
            if flags & FLAG_END_STREAM:
                self.request_end(sid, out)

    def on_request(self, sid, flags, headers, out):
        be = self.be
        with be.lock:
            be.requests += 1
        path = headers.get(":path", "")
        self.windows[sid] = self.peer_initial
        ok = hpack_block([(":status", "200"), ("content-type", "application/grpc")])
        if path.endswith("/Download"):
            out.append(headers_frames(sid, ok))
            self.sending[sid] = int(headers.get("x-bytes", "0"))
            self.offsets[sid] = 0
        elif path.endswith("/Hold"):
            out.append(headers_frames(sid, ok))
            # One message, then nothing (the proxy's windows are far larger).
            for off in range(0, 65536, 16384):
                out.append(frame(DATA, 0, sid, bytes(BLOCK[off:off + 16384])))
            self.conn_window -= 65536
            self.windows[sid] -= 65536
        else:
            self.uploads[sid] = 0
        if flags & FLAG_END_STREAM:
            self.request_end(sid, out)

    def request_end(self, sid, out):
        if sid in self.uploads:
            got = self.uploads.pop(sid)
            out.append(headers_frames(sid, hpack_block(
                [(":status", "200"), ("content-type", "application/grpc")])))
            out.append(headers_frames(sid, hpack_block(
                [("grpc-status", "0"), ("x-received", str(got))]), end_stream=True))
            with self.be.lock:
                self.be.finished += 1


# ---------------------------------------------------------------------------
# A fast client

class FStream:
    def __init__(self, sid):
        self.sid = sid
        self.headers = []
        self.received = 0
        self.ended = False
        self.reset = None
        self.send_window = 0

    @property
    def done(self):
        return self.ended or self.reset is not None

    def header(self, name):
        for block in self.headers:
            for k, v in block:
                if k == name:
                    return v
        return None


class FastClient:
    """A client connection (h2c or TLS) that counts response bytes without
    keeping them, and credits windows as it reads (unless `credit` is
    False). `initial_window` goes in its SETTINGS."""

    def __init__(self, port, tls=False, initial_window=MAX_WINDOW, conn_window=MAX_WINDOW,
                 rcvbuf=None, timeout=10.0):
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = H.client_ssl_context().wrap_socket(raw, server_hostname="localhost") \
            if tls else raw
        self.tls = tls
        self.authority = "localhost:%d" % port
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 20
        self.streams = {}
        self.next_sid = 1
        self.credit = True
        self.closed = False
        self.goaway = None
        self.peer_initial = 65535
        self.conn_send_window = 65535
        self.buf = bytearray()
        self.hdr = None
        self.total = 0
        self.sock.sendall(PREFACE + settings_frame([(SETTINGS_INITIAL_WINDOW_SIZE,
                                                     initial_window)]) +
                          (window_update(0, conn_window - 65535) if conn_window > 65535
                           else b""))

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

    def open(self, path, extra=(), end_stream=False, body=b""):
        sid = self.next_sid
        self.next_sid += 2
        st = self.streams[sid] = FStream(sid)
        st.send_window = self.peer_initial
        hdrs = [(":method", "POST"), (":scheme", "https" if self.tls else "http"),
                (":path", path), (":authority", self.authority),
                ("content-type", "application/grpc"), ("te", "trailers")] + list(extra)
        data = headers_frames(sid, hpack_block(hdrs), end_stream=end_stream and not body)
        if body:
            data += frame(DATA, FLAG_END_STREAM if end_stream else 0, sid, body)
            st.send_window -= len(body)
            self.conn_send_window -= len(body)
        self.send(data)
        return sid

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def pump(self, timeout=0.2):
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (socket.timeout, TimeoutError, BlockingIOError):
            return True
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        mv = memoryview(self.buf)
        i, n = 0, len(self.buf)
        out = []
        credit_conn = 0
        while n - i >= 9:
            length = int.from_bytes(mv[i:i + 3], "big")
            if n - i < 9 + length:
                break
            ftype, flags = self.buf[i + 3], self.buf[i + 4]
            sid = int.from_bytes(mv[i + 5:i + 9], "big") & 0x7FFFFFFF
            start = i + 9
            i += 9 + length
            if ftype == DATA:
                st = self.streams.get(sid)
                if st is not None:
                    st.received += length
                    if flags & FLAG_END_STREAM:
                        st.ended = True
                self.total += length
                if self.credit and length:
                    credit_conn += length
                    if not flags & FLAG_END_STREAM:
                        out.append(window_update(sid, length))
            else:
                self.on_frame(ftype, flags, sid, bytes(mv[start:i]), out)
        mv.release()
        del self.buf[:i]
        if credit_conn:
            out.append(window_update(0, credit_conn))
        if out:
            self.send(b"".join(out))
        return True

    def on_frame(self, ftype, flags, sid, payload, out):
        if ftype == SETTINGS:
            if not flags & FLAG_ACK:
                for k in range(0, len(payload) - 5, 6):
                    key, v = struct.unpack(">HI", payload[k:k + 6])
                    if key == SETTINGS_INITIAL_WINDOW_SIZE:
                        for s in self.streams.values():
                            s.send_window += v - self.peer_initial
                        self.peer_initial = v
                out.append(settings_frame(ack=True))
        elif ftype == PING:
            if not flags & FLAG_ACK:
                out.append(frame(PING, FLAG_ACK, 0, bytes(payload)))
        elif ftype == GOAWAY:
            self.goaway = struct.unpack(">II", payload[:8])
        elif ftype == WINDOW_UPDATE:
            inc = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_send_window += inc
            elif sid in self.streams:
                self.streams[sid].send_window += inc
        elif ftype == RST_STREAM:
            if sid in self.streams:
                self.streams[sid].reset = struct.unpack(">I", payload[:4])[0]
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                body = bytes(payload)
                if flags & 0x8:
                    body = body[1:len(body) - body[0]]
                if flags & 0x20:
                    body = body[5:]
                self.hdr = [sid, flags, body]
            else:
                self.hdr[2] += bytes(payload)
            if flags & FLAG_END_HEADERS:
                hsid, hflags, block = self.hdr
                self.hdr = None
                hdrs = [(k.decode(), v.decode()) for k, v in self.dec.decode(block, raw=True)]
                st = self.streams.get(hsid)
                if st is not None:
                    st.headers.append(hdrs)
                    if hflags & FLAG_END_STREAM:
                        st.ended = True

    def wait(self, predicate, timeout, what="condition"):
        deadline = time.monotonic() + timeout
        while True:
            v = predicate()
            if v or self.closed:
                return v
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("%s not met within %.0fs" % (what, timeout))
            self.pump(min(left, 0.2))

    def upload(self, sid, total, end_stream=True, timeout=60.0, on_idle=None):
        """Sends |total| body bytes as the proxy's windows allow. Returns
        the bytes sent (less than |total| if it stalled for |timeout|)."""
        st = self.streams[sid]
        chunk = bytes(BLOCK[:16384])
        sent = 0
        last = time.monotonic()
        while sent < total and not self.closed and not st.done:
            n = min(16384, total - sent, st.send_window, self.conn_send_window)
            if n > 0:
                batch = []
                while n > 0:
                    last_one = sent + n == total
                    batch.append(frame(DATA, FLAG_END_STREAM if (last_one and end_stream) else 0,
                                       sid, chunk[:n]))
                    st.send_window -= n
                    self.conn_send_window -= n
                    sent += n
                    if len(batch) >= 32:
                        break
                    n = min(16384, total - sent, st.send_window, self.conn_send_window)
                if not self.send(b"".join(batch)):
                    break
                last = time.monotonic()
                # Read whatever came (window updates) without waiting.
                self.pump(0)
                continue
            if time.monotonic() - last > timeout:
                break
            if on_idle is not None:
                on_idle()
            self.pump(0.05)
        return sent


# ---------------------------------------------------------------------------

def h2c_config(backend_port, workers=1, **top):
    """One h2c listener "dev" (no auth), an admin listener on port 0, and
    the backend as tenant "default"."""
    cfg = H.base_config(backend_port, listeners=[H.h2c_listener("dev")], workers=workers,
                        admin={"address": "127.0.0.1", "port": 0})
    cfg.update(top)
    return cfg


class MemCase(H.SparkgateTestCase):
    def start_with(self, cfg):
        self.sg = self.start_sparkgate(cfg)
        self.pid = self.sg.pid
        return self.sg

    def metrics(self):
        port = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        status, _, body = http_get(port, "/metrics")
        self.assertEqual(status, 200)
        return parse_prometheus(body.decode())

    def gauge(self, name):
        return sample(self.metrics(), name)

    def wait_gauges_zero(self, timeout=15):
        def ok():
            m = self.metrics()
            return (sample(m, "sparkgate_connections_open") == 0 and
                    sample(m, "sparkgate_streams_open") == 0)
        try:
            H.wait_until(ok, timeout, interval=0.2, what="connections/streams back to 0")
        except TimeoutError:
            m = self.metrics()
            self.fail("gauges not back to 0: connections_open=%s streams_open=%s"
                      % (sample(m, "sparkgate_connections_open"),
                         sample(m, "sparkgate_streams_open")))

    def wait_fds(self, limit, timeout=15):
        try:
            H.wait_until(lambda: fd_count(self.pid) <= limit, timeout, interval=0.2,
                         what="fds back to %d" % limit)
        except TimeoutError:
            self.fail("sparkgate holds %d fds, baseline allows %d"
                      % (fd_count(self.pid), limit))


# ---------------------------------------------------------------------------
# Constant memory under large transfers

@unittest.skipIf(SANITIZED, "RSS is ASan's own there, and GiB transfers take minutes; the "
                 "data path's memory safety is covered by the other tests")
class LargeTransferTest(MemCase):
    """Multi-GiB results and uploads pass in constant memory: RSS growth
    stays far below what went through."""

    BOUND_MIB = 64

    def setUp(self):
        super().setUp()
        self.be = BlastBackend()
        self.addCleanup(self.be.close)
        self.start_with(h2c_config(self.be.port))
        self.base = rss_mib(self.pid)

    def download(self, c, total, n_streams=1):
        sids = [c.open(TEST + "Download", extra=[("x-bytes", str(total))], end_stream=True,
                       body=b"\0\0\0\0\0") for _ in range(n_streams)]
        return sids

    def check_streams(self, c, sids, total):
        for sid in sids:
            st = c.streams[sid]
            self.assertTrue(st.ended and st.reset is None, st.__dict__)
            self.assertEqual(st.received, total)
            self.assertEqual(st.header("grpc-status"), "0")

    def assert_bounded(self, watch, passed):
        growth = watch.peak - self.base
        note("RSS %.1f -> peak %.1f MiB while %.2f GiB passed" % (self.base, watch.peak, passed / GIB))
        if not SANITIZED:
            self.assertLess(growth, self.BOUND_MIB,
                            "RSS grew %.1f MiB (%.1f -> %.1f) while %.1f GiB passed"
                            % (growth, self.base, watch.peak, passed / GIB))

    def test_2gib_download_to_a_fast_reader(self):
        total = 2 * GIB
        with RssWatch(self.pid) as w, FastClient(self.sg.port("dev")) as c:
            sids = self.download(c, total)
            c.wait(lambda: all(c.streams[s].done for s in sids), 50, "the download")
            self.check_streams(c, sids, total)
        self.assert_bounded(w, total)

    def test_download_to_a_reader_that_keeps_pausing(self):
        # The client stops reading for 0.3 s after every 64 MiB, with a
        # small socket buffer: the backend is always faster.
        total = 1 * GIB
        with RssWatch(self.pid) as w, FastClient(self.sg.port("dev"), rcvbuf=16384) as c:
            sids = self.download(c, total)
            mark = 0
            deadline = time.monotonic() + 50
            while not c.streams[sids[0]].done and not c.closed and time.monotonic() < deadline:
                c.pump(0.2)
                if c.total - mark >= 64 * MIB:
                    mark = c.total
                    time.sleep(0.3)
            self.check_streams(c, sids, total)
        self.assert_bounded(w, total)

    def test_many_large_streams_on_one_and_several_connections(self):
        per = 256 * MIB
        with RssWatch(self.pid) as w:
            with FastClient(self.sg.port("dev")) as c:
                sids = self.download(c, per, n_streams=8)
                c.wait(lambda: all(c.streams[s].done for s in sids), 50, "8 downloads")
                self.check_streams(c, sids, per)
            clients = [FastClient(self.sg.port("dev")) for _ in range(4)]
            try:
                sids = [self.download(c, per, n_streams=2) for c in clients]
                deadline = time.monotonic() + 50
                while time.monotonic() < deadline and not all(
                        c.streams[s].done or c.closed for c, ss in zip(clients, sids) for s in ss):
                    for c in clients:
                        c.pump(0.01)
                for c, ss in zip(clients, sids):
                    self.check_streams(c, ss, per)
            finally:
                for c in clients:
                    c.close()
        self.assert_bounded(w, 16 * per)
        self.wait_gauges_zero()

    def test_tls_download(self):
        cfg = h2c_config(self.be.port)
        cfg["listeners"].append(H.tls_listener("public"))
        self.sg.stop()
        self.start_with(cfg)
        self.base = rss_mib(self.pid)
        total = 512 * MIB
        with RssWatch(self.pid) as w, FastClient(self.sg.port("public"), tls=True) as c:
            sids = self.download(c, total, n_streams=2)
            c.wait(lambda: all(c.streams[s].done for s in sids), 50, "TLS downloads")
            self.check_streams(c, sids, total)
        self.assert_bounded(w, 2 * total)

    def test_upload_to_a_backend_that_keeps_pausing(self):
        total = 1 * GIB
        stop = threading.Event()

        def toggler():
            while not stop.wait(0.3):
                self.be.reading.clear()
                if stop.wait(0.3):
                    break
                self.be.reading.set()
            self.be.reading.set()

        t = threading.Thread(target=toggler, daemon=True)
        with RssWatch(self.pid) as w, FastClient(self.sg.port("dev")) as c:
            t.start()
            try:
                sid = c.open(TEST + "Upload")
                sent = c.upload(sid, total, timeout=20)
                self.assertEqual(sent, total)
                c.wait(lambda: c.streams[sid].done, 30, "the upload's answer")
            finally:
                stop.set()
                t.join(5)
            st = c.streams[sid]
            self.assertEqual((st.header("grpc-status"), st.header("x-received")),
                             ("0", str(total)), st.__dict__)
        self.assert_bounded(w, total)


# ---------------------------------------------------------------------------
# Stalled clients

class StalledClientBufferTest(MemCase):
    """A client that reads its socket but gives no flow-control window
    (SETTINGS_INITIAL_WINDOW_SIZE 0) opens max_concurrent_streams large
    downloads. docs/security.md: what backends may send for one client
    connection is kept within connection_window_bytes (16 MiB), whatever
    its calls do; each stream's 1 MiB backend-leg window used to be granted
    on its own, so such a connection pinned 100 MiB for
    stream_idle_timeout_ms (1 h by default)."""

    def test_unread_streams_are_bounded_per_connection(self):
        be = BlastBackend()
        self.addCleanup(be.close)
        self.start_with(h2c_config(be.port, stream_idle_timeout_ms=60000,
                                   write_stall_timeout_ms=60000, idle_timeout_ms=60000))
        base = rss_mib(self.pid)
        n_conns, n_streams = 2, 100
        clients = []
        with RssWatch(self.pid) as w:
            try:
                for _ in range(n_conns):
                    c = FastClient(self.sg.port("dev"), initial_window=0, conn_window=65535)
                    c.credit = False
                    clients.append(c)
                    for _ in range(n_streams):
                        c.open(TEST + "Download", extra=[("x-bytes", str(64 * MIB))],
                               end_stream=True, body=b"\0\0\0\0\0")
                # Until the backend has pushed all it may (bounded wait).
                last, still = -1, 0
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and still < 10:
                    for c in clients:
                        c.pump(0.05)
                    out = be.bytes_out
                    still = still + 1 if out == last else 0
                    last = out
                held = be.bytes_out
                self.assertTrue(all(not c.closed for c in clients))
                self.assertEqual(sum(c.total for c in clients), 0)
            finally:
                for c in clients:
                    c.close()
        per_conn = 16  # connection_window_bytes, MiB
        note("backend pushed %.1f MiB that %d clients never credited; RSS %.1f -> %.1f MiB"
             % (held / MIB, n_conns, base, w.peak))
        self.assertLessEqual(held / MIB, n_conns * per_conn * 1.05,
                             "sparkgate took %.0f MiB of responses from the backend for %d "
                             "connections that gave no window (%d streams each)"
                             % (held / MIB, n_conns, n_streams))
        if not SANITIZED:
            self.assertLess(w.peak - base, n_conns * per_conn * 2 + 16)
        self.wait_gauges_zero()


# ---------------------------------------------------------------------------
# Leaks over repetition

def partial_client_hello(port):
    """TCP connect, the first bytes of a TLS ClientHello, close."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
    finally:
        s.close()


class CycleCase(MemCase):
    UPSTREAM_IDLE_MS = 500

    def setUp(self):
        super().setUp()
        self.be = BlastBackend()
        self.addCleanup(self.be.close)
        cfg = h2c_config(self.be.port, workers=2, idle_timeout_ms=60000,
                         upstream={"idle_timeout_ms": self.UPSTREAM_IDLE_MS})
        cfg["listeners"].append(H.tls_listener("public"))
        self.start_with(cfg)
        self.h2c = self.sg.port("dev")
        self.tls = self.sg.port("public")

    def ok_call(self, port=None, tls=False):
        with FastClient(port or self.h2c, tls=tls) as c:
            sid = c.open(TEST + "Download", extra=[("x-bytes", str(MIB))], end_stream=True,
                         body=b"\0\0\0\0\0")
            c.wait(lambda: c.streams[sid].done, 15, "a control call")
            st = c.streams[sid]
            self.assertEqual((st.received, st.header("grpc-status")), (MIB, "0"), st.__dict__)

    def baseline(self):
        """fds and RSS once everything is idle again: no client
        connection, no stream, no backend connection."""
        self.wait_gauges_zero()
        H.wait_until(lambda: self.be.open_connections == 0, 15, interval=0.1,
                     what="backend connections closed at upstream idle timeout")
        time.sleep(0.3)
        return fd_count(self.pid), rss_mib(self.pid)

    def assert_back_to(self, base, rss_margin=32, what="cycles"):
        fds0, rss0 = base
        self.wait_gauges_zero()
        try:
            H.wait_until(lambda: self.be.open_connections == 0, 15, interval=0.1,
                         what="backend connections closed")
        except TimeoutError:
            self.fail("after %s: %d backend connections still open %d ms after the last "
                      "call (upstream.idle_timeout_ms)" % (what, self.be.open_connections,
                                                           self.UPSTREAM_IDLE_MS))
        self.wait_fds(fds0)
        rss = rss_mib(self.pid)
        note("after %s: fds %d (baseline %d), RSS %.1f MiB (baseline %.1f)"
             % (what, fd_count(self.pid), fds0, rss, rss0))
        if not SANITIZED:
            self.assertLess(rss - rss0, rss_margin,
                            "RSS grew %.1f MiB over %s" % (rss - rss0, what))


class ConnectCloseCyclesTest(CycleCase):
    def test_thousands_of_connect_close_cycles(self):
        self.ok_call()
        self.ok_call(self.tls, tls=True)
        base = self.baseline()
        mid_calls = 0
        rng = random.Random(7)
        kinds = ["tcp", "h2c_clean", "h2c_preface_abrupt", "h2c_mid_call", "h2c_mid_download",
                 "tls_partial_hello", "tls_abrupt", "tls_mid_call"]
        weights = [3, 3, 3, 4, 3, 2, 1, 1]
        for i in range(1200):
            kind = rng.choices(kinds, weights)[0]
            if kind == "tcp":
                socket.create_connection(("127.0.0.1", self.h2c), timeout=5).close()
            elif kind == "tls_partial_hello":
                partial_client_hello(self.tls)
            elif kind == "h2c_clean":
                c = RawH2(self.h2c, tls=False)
                c.wait(lambda: c.settings_acked, 5)
                c.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
                c.close()
            elif kind == "h2c_preface_abrupt":
                s = socket.create_connection(("127.0.0.1", self.h2c), timeout=5)
                s.sendall(PREFACE[:rng.randrange(1, len(PREFACE) + 1)])
                s.close()
            elif kind == "tls_abrupt":
                c = RawH2(self.tls, preface=rng.random() < 0.5)
                c.close()
            elif kind in ("h2c_mid_call", "tls_mid_call", "h2c_mid_download"):
                tls = kind == "tls_mid_call"
                c = FastClient(self.tls if tls else self.h2c, tls=tls)
                if kind == "h2c_mid_download":
                    sid = c.open(TEST + "Download", extra=[("x-bytes", str(64 * MIB))],
                                 end_stream=True, body=b"\0\0\0\0\0")
                    c.wait(lambda: c.streams[sid].received > rng.randrange(1, 4 * MIB), 10,
                           "some of the download")
                else:
                    sid = c.open(TEST + "Hold", end_stream=True, body=b"\0\0\0\0\0")
                    c.wait(lambda: c.streams[sid].received > 0, 10, "the held call is live")
                mid_calls += 1
                c.close()
        self.ok_call()
        # Every call cut by its client's close was cancelled upstream.
        try:
            H.wait_until(lambda: self.be.resets >= mid_calls, 15, interval=0.1,
                         what="every cut call reset upstream")
        except TimeoutError:
            self.fail("%d calls cut by a client close, %d reset upstream (backend: %d "
                      "requests, %d finished, %d connections open)"
                      % (mid_calls, self.be.resets, self.be.requests, self.be.finished,
                         self.be.open_connections))
        self.assert_back_to(base, what="1200 connect/close cycles (%d mid-call)" % mid_calls)


class CancelCyclesTest(CycleCase):
    def test_thousands_of_calls_cancelled_at_random_points(self):
        self.ok_call()
        base = self.baseline()
        rng = random.Random(11)
        cancelled = 0
        clients = [FastClient(self.h2c) for _ in range(4)]
        try:
            for i in range(1500):
                c = clients[i % 4]
                kind = rng.randrange(4)
                if kind == 0:      # reset right after the request headers
                    sid = c.open(TEST + "Download", extra=[("x-bytes", str(8 * MIB))])
                    c.send(rst_stream(sid, CANCEL))
                elif kind == 1:    # reset somewhere in the response
                    sid = c.open(TEST + "Download", extra=[("x-bytes", str(8 * MIB))],
                                 end_stream=True, body=b"\0\0\0\0\0")
                    want = rng.randrange(0, 2 * MIB)
                    c.wait(lambda: c.streams[sid].received >= want or c.streams[sid].done, 10,
                           "part of the response")
                    c.send(rst_stream(sid, CANCEL))
                elif kind == 2:    # reset in the middle of an upload
                    sid = c.open(TEST + "Upload")
                    c.upload(sid, rng.randrange(1, 3 * MIB), end_stream=False, timeout=5)
                    c.send(rst_stream(sid, CANCEL))
                else:              # a call on hold, reset
                    sid = c.open(TEST + "Hold", end_stream=True, body=b"\0\0\0\0\0")
                    c.wait(lambda: c.streams[sid].received > 0 or c.streams[sid].done, 10,
                           "the held call is live")
                    c.send(rst_stream(sid, CANCEL))
                cancelled += 1
                c.pump(0)
                c.streams.pop(sid, None)
                self.assertFalse(c.closed, "connection closed after %d cancels: goaway=%r"
                                 % (cancelled, c.goaway))
            for c in clients:
                c.pump(0.1)
            self.ok_call()
            H.wait_until(lambda: self.metrics() and
                         sample(self.metrics(), "sparkgate_streams_open") == 0, 15,
                         interval=0.2, what="no stream open")
        finally:
            for c in clients:
                c.close()
        # Every request the backend saw ended: answered or reset.
        H.wait_until(lambda: self.be.resets + self.be.finished >= self.be.requests, 10,
                     interval=0.1, what="every upstream stream ended")
        self.assert_back_to(base, what="1500 cancelled calls")


class ReloadCyclesTest(CycleCase):
    def test_reloads_with_calls_in_flight(self):
        self.ok_call()
        base = self.baseline()
        clients = [FastClient(self.h2c) for _ in range(3)]
        try:
            dl = [c.open(TEST + "Download", extra=[("x-bytes", str(2 * GIB))],
                         end_stream=True, body=b"\0\0\0\0\0") for c in clients]
            held = []
            for n in range(15):
                mark = self.sg.mark()
                self.sg.send_signal(signal.SIGHUP)
                self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
                for c in clients:
                    held.append((c, c.open(TEST + "Hold", end_stream=True, body=b"\0\0\0\0\0")))
                    c.pump(0.02)
                self.ok_call()
            for c, sid in held:
                c.send(rst_stream(sid, CANCEL))
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not all(
                    c.streams[s].done or c.closed for c, s in zip(clients, dl)):
                for c in clients:
                    c.pump(0.02)
            for c, s in zip(clients, dl):
                st = c.streams[s]
                self.assertEqual((st.received, st.header("grpc-status")), (2 * GIB, "0"),
                                 st.__dict__)
        finally:
            for c in clients:
                c.close()
        self.assert_back_to(base, what="15 reloads with calls in flight")


# ---------------------------------------------------------------------------
# Backend connection pool

class PoolTest(MemCase):
    """Many tenants with a backend each, backends that go away and come
    back (by reload): backend connections are closed at
    upstream.idle_timeout_ms and no descriptor stays behind."""

    N = 10

    def tenants(self, bes):
        return [{"name": "t%d" % i, "backends": [{"name": "b%d" % i, "address": "127.0.0.1",
                                                  "port": be.port}],
                 "allow": {"any_identity": True}, "user_id": "off"}
                for i, be in enumerate(bes)]

    def call(self, tenant, expect="0"):
        with FastClient(self.sg.port("dev")) as c:
            sid = c.open(TEST + "Download", extra=[("x-bytes", str(MIB)),
                                                   ("x-spark-tenant", tenant)],
                         end_stream=True, body=b"\0\0\0\0\0")
            c.wait(lambda: c.streams[sid].done, 15, "a call to " + tenant)
            self.assertEqual(c.streams[sid].header("grpc-status"), expect,
                             c.streams[sid].__dict__)

    def test_many_backends_that_come_and_go(self):
        bes = [BlastBackend() for _ in range(self.N)]
        for be in bes:
            self.addCleanup(be.close)
        cfg = h2c_config(bes[0].port, workers=2, upstream={"idle_timeout_ms": 500,
                                                           "connect_timeout_ms": 500})
        cfg["tenant_selectors"] = ["header:x-spark-tenant"]
        cfg["tenants"] = self.tenants(bes)
        self.start_with(cfg)
        fds0 = fd_count(self.pid)
        for rnd in range(3):
            for i in range(self.N):
                for _ in range(4):
                    self.call("t%d" % i)
        self.assertGreater(sum(be.connections for be in bes), 0)
        # Idle: every backend connection goes.
        H.wait_until(lambda: sum(be.open_connections for be in bes) == 0, 15, interval=0.1,
                     what="idle backend connections closed")
        self.wait_fds(fds0)
        # Half the backends go away: calls fail (14), probes run in the
        # background for a few seconds.
        gone = bes[:self.N // 2]
        for be in gone:
            be.close()
        for i in range(self.N // 2):
            for _ in range(3):
                self.call("t%d" % i, expect="14")
        time.sleep(3)
        # They come back elsewhere (a reload points the tenants at them).
        new = [BlastBackend() for _ in gone]
        for be in new:
            self.addCleanup(be.close)
        bes2 = new + bes[self.N // 2:]
        cfg["tenants"] = self.tenants(bes2)
        H.write_config(cfg, os.path.dirname(self.sg.config_path))
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
        for i in range(self.N):
            for _ in range(3):
                self.call("t%d" % i)
        H.wait_until(lambda: sum(be.open_connections for be in bes2) == 0, 15, interval=0.1,
                     what="idle backend connections closed after the reload")
        self.wait_gauges_zero()
        self.wait_fds(fds0)
        note("pool: fds %d (baseline %d)" % (fd_count(self.pid), fds0))


# ---------------------------------------------------------------------------
# Pathological inputs

class PathologicalInputTest(MemCase):
    def setUp(self):
        super().setUp()
        self.be = BlastBackend()
        self.addCleanup(self.be.close)
        self.start_with(h2c_config(self.be.port, workers=1, idle_timeout_ms=60000,
                                   stream_idle_timeout_ms=60000))
        self.base = rss_mib(self.pid)

    def test_tiny_data_frames_to_a_backend_that_does_not_read(self):
        # 1-byte DATA frames while the backend does not read: sparkgate
        # holds at most the windows' worth of them, however they are cut.
        self.be.reading.clear()
        n = 400000
        with RssWatch(self.pid) as w, FastClient(self.sg.port("dev")) as c:
            sid = c.open(TEST + "Upload")
            st = c.streams[sid]
            sent = 0
            while sent < n and st.send_window > 0 and c.conn_send_window > 0 and not c.closed:
                k = min(4096, n - sent, st.send_window, c.conn_send_window)
                if not c.send(frame(DATA, 0, sid, b"t") * k):
                    break
                st.send_window -= k
                c.conn_send_window -= k
                sent += k
                c.pump(0)
            c.pump(0.5)
            held_rss = rss_mib(self.pid)
            self.be.reading.set()
            c.send(frame(DATA, FLAG_END_STREAM, sid, b"t"))
            # The rest as the windows come back.
            c.wait(lambda: st.done, 30, "the upload's answer")
            self.assertFalse(c.closed, "connection closed: goaway=%r" % (c.goaway,))
            self.assertEqual((st.header("grpc-status"), st.header("x-received")),
                             ("0", str(sent + 1)), st.__dict__)
        note("%d one-byte DATA frames held: RSS %.1f -> %.1f (peak %.1f) MiB"
             % (sent, self.base, held_rss, w.peak))
        self.assertLess(w.peak - self.base, 48)
        self.wait_gauges_zero()

    def test_header_lists_at_the_limit_on_every_stream(self):
        # 20 connections x 100 half-open streams, each with a header list
        # just under max_header_list_bytes (16 KiB) of distinct values (no
        # HPACK sharing): what sparkgate holds is about the headers.
        n_conns, n_streams = 20, 100
        clients = []
        with RssWatch(self.pid) as w:
            try:
                for k in range(n_conns):
                    c = RawH2(self.sg.port("dev"), tls=False)
                    clients.append(c)
                    for i in range(n_streams):
                        extra = [("x-pad-%d" % j, os.urandom(1400).hex()[:1900])
                                 for j in range(7)]
                        c.request(c.request_headers(TEST + "Upload", extra=extra),
                                  end_stream=False)
                    c.pump(0.05)
                H.wait_until(lambda: self.be.requests >= n_conns * n_streams, 30,
                             interval=0.1, what="every stream reached the backend")
                open_rss = rss_mib(self.pid)
                self.assertEqual(self.gauge("sparkgate_streams_open"), n_conns * n_streams)
            finally:
                for c in clients:
                    c.close()
        per_stream_kib = (open_rss - self.base) * 1024 / (n_conns * n_streams)
        note("%d streams with ~13.3 KiB header lists: RSS %.1f -> %.1f MiB, %.1f KiB/stream"
             % (n_conns * n_streams, self.base, open_rss, per_stream_kib))
        if not SANITIZED:
            self.assertLess(per_stream_kib, 64, "each half-open stream costs %.0f KiB"
                            % per_stream_kib)
        self.wait_gauges_zero()
        H.wait_until(lambda: self.be.resets >= n_conns * n_streams, 15, interval=0.1,
                     what="every stream reset upstream")

    def test_huge_message_length_prefix_with_little_data(self):
        # Response: a gRPC prefix announcing 4 GiB - 1, a few bytes, then
        # the backend stalls. Request: the same on a pass-through path.
        with RssWatch(self.pid) as w, FastClient(self.sg.port("dev")) as c:
            sid = c.open(TEST + "Upload")
            c.send(frame(DATA, 0, sid, b"\x00\xff\xff\xff\xff" + b"x" * 1000))
            c.send(frame(DATA, FLAG_END_STREAM, sid, b"y" * 1000))
            c.wait(lambda: c.streams[sid].done, 10, "the answer")
            self.assertEqual(c.streams[sid].header("x-received"), "2005")
            # Spark path, the prefix over max_message_bytes: refused with 3.
            sid2 = c.open(H.SERVICE + "ExecutePlan")
            c.send(frame(DATA, 0, sid2, b"\x00\xff\xff\xff\xff" + b"\x0a" * 100))
            c.wait(lambda: c.streams[sid2].done, 10, "the refusal")
            self.assertEqual(c.streams[sid2].header("grpc-status"), "3",
                             c.streams[sid2].__dict__)
        self.assertLess(w.peak - self.base, 16)
        self.wait_gauges_zero()


class StalledStreamsFreedAtIdleTest(MemCase):
    """The same stalled client (window 0, 100 streams of large results)
    keeps its connection open: stream_idle_timeout_ms ends every call,
    the backend streams are reset, and nothing stays open."""

    def test_stalled_streams_end_at_stream_idle_timeout(self):
        be = BlastBackend()
        self.addCleanup(be.close)
        self.start_with(h2c_config(be.port, stream_idle_timeout_ms=2000,
                                   write_stall_timeout_ms=60000, idle_timeout_ms=60000))
        with FastClient(self.sg.port("dev"), initial_window=0, conn_window=65535) as c:
            c.credit = False
            sids = [c.open(TEST + "Download", extra=[("x-bytes", str(64 * MIB))],
                           end_stream=True, body=b"\0\0\0\0\0") for _ in range(100)]
            c.wait(lambda: all(c.streams[s].done for s in sids), 20,
                   "every stalled call ended")
            self.assertFalse(c.closed)
            H.wait_until(lambda: self.gauge("sparkgate_streams_open") == 0, 10, interval=0.2,
                         what="no stream open")
            H.wait_until(lambda: be.resets >= 100, 10, interval=0.1,
                         what="every backend stream reset")
            self.assertEqual(self.gauge("sparkgate_connections_open"), 1)


if __name__ == "__main__":
    H.main()
