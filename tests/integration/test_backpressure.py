#!/usr/bin/python3
"""The data path between the two HTTP/2 sessions while one side's output
is full: what a late status, a cancel or a deadline does to bytes the
proxy holds then.

RawH2, AttackCase and attack_config come from test_attacks.py. Every wait
is bounded; no test asserts a duration.
"""

import os
import socket
import struct
import sys
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
from threaded_server import ThreadedServer  # noqa: E402
from test_attacks import (  # noqa: E402
    AttackCase, RawH2, RssWatch, attack_config, INTERNAL_ERROR, CANCEL, MAX_WINDOW,
    SETTINGS, WINDOW_UPDATE, DATA, FLAG_ACK, SETTINGS_INITIAL_WINDOW_SIZE,
    frame, rst_stream, window_update)

SERVICE = H.SERVICE
MIB = H.MIB
TEST = H.TEST_PREFIX


# ---------------------------------------------------------------------------
# Helpers

class FlowH2(RawH2):
    """RawH2 that keeps the send windows the server grants, so that it can
    upload as much as flow control allows and no more."""

    def __init__(self, *a, **kw):
        self.initial_window = 65535
        self.conn_window = 65535
        self.stream_windows = {}
        super().__init__(*a, **kw)

    def _on_frame(self, ftype, flags, sid, payload):
        if ftype == SETTINGS and not flags & FLAG_ACK:
            for i in range(0, len(payload) - 5, 6):
                k, v = struct.unpack(">HI", payload[i:i + 6])
                if k == SETTINGS_INITIAL_WINDOW_SIZE:
                    for s in self.stream_windows:
                        self.stream_windows[s] += v - self.initial_window
                    self.initial_window = v
        elif ftype == WINDOW_UPDATE:
            inc = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_window += inc
            elif sid in self.stream_windows:
                self.stream_windows[sid] += inc
        return super()._on_frame(ftype, flags, sid, payload)

    def open(self, headers):
        sid = self.new_sid()
        self.stream_windows[sid] = self.initial_window
        from test_attacks import headers_frames, hpack_block
        self.send(headers_frames(sid, hpack_block(headers)))
        return sid

    def upload(self, sid, total, stall_s=1.0, timeout=20.0):
        """Sends up to |total| body bytes as the windows allow; stops once
        no window came for |stall_s|. Returns the bytes sent."""
        sent = 0
        last = time.monotonic()
        deadline = last + timeout
        while sent < total and time.monotonic() < deadline and not self.closed:
            n = min(16384, total - sent, self.conn_window, self.stream_windows[sid])
            if n > 0:
                if not self.send(frame(DATA, 0, sid, b"u" * n)):
                    break
                self.conn_window -= n
                self.stream_windows[sid] -= n
                sent += n
                last = time.monotonic()
                continue
            if time.monotonic() - last > stall_s:
                break
            self.pump(0.05)
        return sent


class PausableBackend(ThreadedServer):
    """An h2c backend (python3-h2) with 2 GiB windows and a 4 KiB receive
    buffer, whose reading can be paused (`reading` cleared).

      .../Upload  takes the request body and answers nothing
      .../Slow    response headers and one message at once; a second
                  message and grpc-status 0 once `release` is set
    """

    def __init__(self):
        self.reading = threading.Event()
        self.reading.set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.upload_bytes = 0
        self.resets = []
        super().__init__(backlog=16, rcvbuf=4096)

    def accepted(self, sock):
        with self.lock:
            self.connections += 1
        return True

    def close(self):
        self.reading.set()
        super().close()

    def serve(self, sock):
        sock.settimeout(0.05)
        h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(
            client_side=False, validate_inbound_headers=False))
        h2c.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        h2c.initiate_connection()
        h2c.increment_flow_control_window(MAX_WINDOW - 65535)
        slow = []
        try:
            sock.sendall(h2c.data_to_send())
            while not self.closed.is_set():
                if self.release.is_set():
                    for sid in slow:
                        h2c.send_data(sid, b"\x00\x00\x00\x00\x06second")
                        h2c.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                    slow = []
                out = h2c.data_to_send()
                if out:
                    sock.sendall(out)
                if not self.reading.is_set():
                    time.sleep(0.02)
                    continue
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        path = dict(ev.headers).get(b":path", b"")
                        if path.endswith(b"/Slow"):
                            h2c.send_headers(ev.stream_id, [(":status", "200"),
                                                            ("content-type", "application/grpc")])
                            h2c.send_data(ev.stream_id, b"\x00\x00\x00\x00\x05first")
                            slow.append(ev.stream_id)
                    elif isinstance(ev, h2.events.DataReceived):
                        with self.lock:
                            self.upload_bytes += len(ev.data)
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset):
                        with self.lock:
                            self.resets.append((ev.stream_id, ev.error_code))
        except Exception:  # the peer went away, a protocol error: done
            return
        finally:
            sock.close()


class LateStatusWhileOutputBlockedTest(AttackCase):
    """A late status (here the stream idle timeout) decided while the
    client's socket is full ends the call after the last whole message,
    then grpc-status 4. A DATA frame used to wait between its data
    provider and its write (counted as sent, still at the head of the
    buffer): the message was then cut short by one frame, or the whole
    connection closed."""

    config_overrides = {"stream_idle_timeout_ms": 1000,
                        "write_stall_timeout_ms": 60000}

    def test_late_status_after_blocked_output_ends_on_a_message_boundary(self):
        # Messages longer than a DATA frame (16 KiB): the frame in flight
        # is never a whole number of them.
        chunk = 100000
        total = 64 * MIB
        mark = self.sg.mark()
        with RssWatch(self.pid) as watch:
            c = RawH2(self.h2c_port, tls=False, rcvbuf=4096,
                      settings=[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)],
                      auto_window=False)
            try:
                c.send(window_update(0, MAX_WINDOW - 65535))
                sid = c.grpc_call(b"late status", extra=H.standin_md(
                    "stream", bytes=total, chunk=chunk))
                rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10)
                # The client reads nothing: the socket fills, then the
                # proxy's output passes its high-water mark, and the call
                # goes idle. It is ended with grpc-status 4.
                self.sg.wait_for_log(r"stream=%d .*grpc-status 4: sparkgate: the call "
                                     r"was idle too long" % sid, timeout=20, since=mark)
                self.up.wait_for(lambda _: rec.cancelled, timeout=10)
                # Now read everything.
                st = c.streams[sid]
                c.wait(lambda: st.done, 20, "the call ended")
                self.assertFalse(c.closed and not st.done, "connection closed: %r" % st)
                self.assertIsNone(st.reset, st)
                self.assertEqual(st.grpc_status, 4, st)
                # Whatever arrived is whole messages of the stream.
                got = len(st.data)
                self.assertEqual(got % (chunk + 5), 0,
                                 "the call ended inside a message: %d bytes received "
                                 "(%d whole messages and %d bytes of the next)"
                                 % (got, got // (chunk + 5), got % (chunk + 5)))
                msgs = H.grpc_unframe(bytes(st.data))
                self.assertTrue(all(len(m) == chunk for m in msgs))
            finally:
                c.close()
        self.assert_same_process(watch)
        self.control("after a late status")


class CancelWhileBackendOutputBlockedTest(H.SparkgateTestCase):
    """A client resets an upload (or its deadline passes) while the
    backend connection's output is above its high-water mark: the other
    calls on that backend connection go on. A DATA frame of the upload
    used to wait between its data provider and its write; the cancel
    emptied the buffer under it, the write then failed and took the
    backend connection down with every call on it."""

    def start(self):
        be = PausableBackend()
        self.addCleanup(be.close)
        self.sg = self.start_sparkgate(attack_config(be.port, write_stall_timeout_ms=60000))
        return be

    def live_call_b(self, c):
        """Call B: live on the backend connection, waiting for its end."""
        c.wait(lambda: c.settings_acked, 10, "SETTINGS ACK")
        b = c.open(c.request_headers(TEST + "Slow"))
        c.send(frame(DATA, 1, b, b"\x00\x00\x00\x00\x00"))
        c.wait(lambda: len(c.streams[b].data) >= 10, 10, "call B's first message")
        return b

    def stalled_upload_a(self, c, be, extra=()):
        """Call A: an upload the backend stops reading."""
        be.reading.clear()
        a = c.open(c.request_headers(TEST + "Upload", extra=list(extra)))
        sent = c.upload(a, 64 * MIB, stall_s=1.0, timeout=20)
        self.assertLess(sent, 64 * MIB, "the upload never stalled")
        return a

    def assert_b_finishes(self, c, be, b):
        """The backend reads again, and finishes B, on the same connection."""
        be.reading.set()
        H.wait_until(lambda: be.upload_bytes > 0, 15, what="the backend reads again")
        c.pump(0.5)
        be.release.set()
        st = c.wait_stream(b, 15)
        self.assertIsNone(st.reset, "call B was reset: %r; log:\n%s"
                          % (st, self.sg.log_text(20)))
        self.assertEqual(st.grpc_status, 0, st)
        return st

    def test_cancelled_upload_does_not_break_the_shared_backend_connection(self):
        be = self.start()
        with FlowH2(self.sg.port("dev"), tls=False) as c:
            b = self.live_call_b(c)
            a = self.stalled_upload_a(c, be)
            # The client gives up on A.
            c.send(rst_stream(a, CANCEL))
            c.pump(0.3)
            st = self.assert_b_finishes(c, be, b)
            self.assertEqual(bytes(st.data), b"\x00\x00\x00\x00\x05first"
                             b"\x00\x00\x00\x00\x06second")
        self.assertEqual(be.connections, 1)

    def test_deadline_of_an_upload_does_not_break_the_shared_backend_connection(self):
        # The same with no client action: the upload's grpc-timeout expires
        # while its leg is still open upstream.
        be = self.start()
        mark = self.sg.mark()
        with FlowH2(self.sg.port("dev"), tls=False) as c:
            b = self.live_call_b(c)
            a = self.stalled_upload_a(c, be, extra=[("grpc-timeout", "3S")])
            c.wait(lambda: c.streams[a].done, 10, "call A's deadline")
            self.assertEqual(c.streams[a].grpc_status, 4, c.streams[a])
            self.sg.wait_for_log(r"deadline exceeded", timeout=5, since=mark)
            self.assert_b_finishes(c, be, b)
        self.assertEqual(be.connections, 1)

if __name__ == "__main__":
    H.main()
