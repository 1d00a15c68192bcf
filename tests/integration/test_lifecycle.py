#!/usr/bin/python3
"""Lifecycle and deadlines: calls that must end although nobody moves,
backends that must be probed until they answer, configurations retired
by a reload while calls still use them.

RawH2, AttackCase and attack_config come from test_attacks.py. Every
wait is bounded.
"""

import os
import signal
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import grpc  # noqa: E402
from test_attacks import (  # noqa: E402
    AttackCase, RawH2, attack_config, INTERNAL_ERROR, UPSTREAM_CONNECT_TIMEOUT_MS,
    HEADERS, CONTINUATION, PING, FLAG_END_HEADERS, frame, data_frames, hpack_block)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))
from spark_standin import StandIn  # noqa: E402

SERVICE = H.SERVICE


# ---------------------------------------------------------------------------
# A finished response the client takes no window for.

class FinishedResponseNoWindowTest(AttackCase):
    """stream_idle_timeout_ms is "no byte either way for N ms", also once
    the backend has ended its response and the client gives no window for
    the rest: then the stream is reset (INTERNAL_ERROR). Nothing else would
    end it (no bytes wait in the socket for the write timeout), and the
    stream, its tenant slot and the connection stayed for good."""

    config_overrides = {"stream_idle_timeout_ms": 1000}

    def test_completed_response_without_window_still_ends_at_stream_idle(self):
        total = 100 * 1024  # more than the client's 65535 window, less than
        # the proxy's first window toward the backend (connection_window_bytes
        # / max_concurrent_streams: 160 KiB), so the backend can finish
        with RawH2(self.h2c_port, tls=False, auto_window=False) as c:
            sid = c.grpc_call(b"finished but unread", extra=H.standin_md(
                "stream", bytes=total, chunk=64 * 1024))
            st = c.streams[sid]
            c.wait(lambda: len(st.data) >= 65535 - 5, 10, "the first window of data")
            # The backend has sent everything and ended its side.
            self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10,
                                  where=lambda r: r.completed)
            # Idle 1 s (swept once a second): give it 6 s.
            try:
                c.wait(lambda: st.done, 6, "the call ended")
            except TimeoutError:
                pass
            self.assertTrue(st.done,
                            "a call with no byte either way for 6 s (stream idle "
                            "timeout 1 s) was never ended: %r" % st)
            self.assertEqual(st.reset, INTERNAL_ERROR, st)


# ---------------------------------------------------------------------------
# A probe that reaches a socket which closes before SETTINGS.

class _AcceptThenClose:
    """Listens on |port|; every accepted connection is read briefly (the
    client preface) and then closed with a reset (no TIME_WAIT)."""

    def __init__(self, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.accepts = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepts += 1
            conn.settimeout(0.5)
            try:
                conn.recv(4096)
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self):
        self._stop.set()
        self._t.join(5)
        self.sock.close()


class BackendProbeStopsTest(H.SparkgateTestCase):
    """A backend marked down is probed with backoff until it answers. A probe
    whose TCP connect succeeds but whose connection then ends before the
    backend's SETTINGS (a server restarting, a balancer with no target) is
    a failed probe like a refused one: probing goes on. It used to end
    probing, leaving the backend "down" for good."""

    def test_backend_comes_back_after_a_probe_hit_a_closing_socket(self):
        port = H.free_port()
        cfg = H.base_config(port, listeners=[H.h2c_listener("dev")], workers=1,
                            upstream={"connect_timeout_ms": UPSTREAM_CONNECT_TIMEOUT_MS})
        sg = self.start_sparkgate(cfg)
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        # 1. Nothing listens: connection refused, backend down, probe in 500 ms.
        r = H.call_unary(ch, "Config", b"while down", timeout=10)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        sg.wait_for_log(r"backend spark-1 of tenant default is down", timeout=5)
        # 2. Something that accepts and closes takes the first probe.
        fake = _AcceptThenClose(port)
        try:
            H.wait_until(lambda: fake.accepts >= 1, 5, what="the first probe")
            time.sleep(0.3)
        finally:
            fake.close()
        # 3. The real backend is back on that port.
        up = StandIn(port=port).start()
        self.addCleanup(up.stop, 0)
        # Probes back off 0.5, 1, 2, 4 s: within 10 s one must have reached it.
        deadline = time.monotonic() + 10
        last = None
        while time.monotonic() < deadline:
            last = H.call_unary(ch, "Config", b"after recovery", timeout=10)
            if last.code == grpc.StatusCode.OK:
                break
            time.sleep(0.5)
        self.assertEqual(last.code, grpc.StatusCode.OK,
                         "backend never probed again after a probe connection "
                         "closed before SETTINGS: %r (probes accepted by the fake: %d)"
                         % (last, fake.accepts))


# ---------------------------------------------------------------------------
# A configuration retired by a reload while a call still uses it.

class ReloadThenDrainTimeoutTest(AttackCase):
    """A call in flight on a configuration that a reload retired; then
    SIGTERM, and the drain timeout closes the connection. Freeing the
    retired configuration's backend connections frees the call, which
    released that configuration again from inside its own teardown: the
    process spun for good instead of exiting. Retired configurations are
    now freed only from the top of the event loop."""

    config_overrides = {"drain_timeout_ms": 1000, "workers": 1}

    def test_drain_timeout_after_reload_exits(self):
        with RawH2(self.h2c_port, tls=False) as c:
            sid = c.live_call()
            mark = self.sg.mark()
            self.sg.send_signal(signal.SIGHUP)
            self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
            time.sleep(0.3)  # the worker picks the new generation up
            self.sg.send_signal(signal.SIGTERM)
            self.sg.wait_for_log(r"drain timeout", timeout=10, since=mark)
            try:
                rc = self.sg.wait(8)
            except TimeoutError:
                rc = None
            if rc is None:
                self.sg.kill()
            self.assertEqual(rc, 0, "sparkgate did not exit after the drain timeout "
                             "(a call in flight on a configuration retired by a reload)")


class ReloadThenClientDropTest(AttackCase):
    """Reload while a call is in flight, then the client drops its TCP
    connection: the call's last release came from the backend session's
    own close callback, and freeing the retired configuration there freed
    that session under nghttp2 (a crash). It must keep serving."""

    config_overrides = {"workers": 1}

    def test_client_drop_after_reload_keeps_the_process(self):
        c = RawH2(self.h2c_port, tls=False)
        sid = c.live_call()
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
        time.sleep(0.3)
        c.close()
        rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10)
        self.up.wait_for(lambda _: rec.cancelled, timeout=10)
        for i in range(5):
            time.sleep(0.2)
            self.assertTrue(self.sg.alive(), "sparkgate died (exit status %r):\n%s"
                            % (self.sg.proc.poll(), self.sg.log_text()))
            self.control("after a client drop on a retired configuration %d" % i)
        self.assertEqual(self.sg.stop(), 0, self.sg.log_text())


# ---------------------------------------------------------------------------
# A request header block that outlives the stream idle timeout.

class HeaderBlockOutlivesIdleTest(AttackCase):
    """A client that stops in the middle of a request's header block (a
    HEADERS frame without END_HEADERS) is answered at the stream idle
    timeout. The CONTINUATION that completes the block later must not
    start the call it had described: it was answered already."""

    config_overrides = {"stream_idle_timeout_ms": 1000}

    def test_a_header_block_completed_after_the_idle_answer_starts_nothing(self):
        with RawH2(self.h2c_port, tls=False) as c:
            c.wait(lambda: c.settings_acked, 10, "SETTINGS ACK")
            sid = c.new_sid()
            block = hpack_block(c.request_headers(path=SERVICE + "Config"))
            half = len(block) // 2
            c.send(frame(HEADERS, 0, sid, block[:half]))
            st = c.streams[sid]
            # Idle 1 s (swept once a second): give it 6 s.
            c.wait(lambda: st.done, 6, "the idle timeout's answer")
            self.assertEqual(st.grpc_status, 4, st)
            c.send(frame(CONTINUATION, FLAG_END_HEADERS, sid, block[half:]) +
                   data_frames(sid, H.grpc_frame(b"too late")) +
                   frame(PING, 0, 0, b"12345678"))
            c.wait(lambda: c.pings_acked, 10, "PING ACK after the late block")
        self.control("after a late header block")
        self.assert_upstream_saw_nothing()


if __name__ == "__main__":
    H.main()
