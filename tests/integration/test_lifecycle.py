#!/usr/bin/python3
"""Lifecycle and deadlines: calls that must end although nobody moves,
backends that must be probed until they answer, configurations retired
by a reload while calls still use them.

RawH2, AttackCase and attack_config come from test_attacks.py. Every
wait is bounded.
"""

import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import grpc  # noqa: E402
from test_operations import (  # noqa: E402
    ADMIN_RE, NotifySocket, http_get, parse_prometheus, sample, state_messages)
from test_attacks import (  # noqa: E402
    AttackCase, RawH2, attack_config, INTERNAL_ERROR, UPSTREAM_CONNECT_TIMEOUT_MS,
    HEADERS, CONTINUATION, PING, FLAG_END_HEADERS, frame, data_frames, hpack_block)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))
from spark_standin import StandIn  # noqa: E402
from threaded_server import ResettingServer  # noqa: E402

SERVICE = H.SERVICE
WAIT = 15.0


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
        fake = ResettingServer(port=port)
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


# ---------------------------------------------------------------------------
# A worker thread that cannot be created

class WorkerThreadStartFailureTest(H.SparkgateTestCase):
    """pthread_create fails in production when a container's pids limit,
    systemd's TasksMax= or `ulimit -u` is below "workers" (0: one per CPU
    of the node), or when the thread stacks do not fit (RLIMIT_STACK sets
    glibc's default stack size). sparkgate used to exit 1 with

        error sparkgate: cannot start worker thread 0

    and nothing else, and the operator could not tell a task limit from
    a memory limit. Like every other start failure, the line says why
    (the error pthread_create returned) and what to change. Here the stack limit is set above the address space, so every
    thread creation fails with EAGAIN/ENOMEM."""

    def test_failed_worker_thread_is_logged_with_its_reason(self):
        up = self.standin()
        cfg = H.base_config(up.port, workers=2)
        path = H.write_config(cfg)
        huge = 1 << 48  # 256 TiB: no thread stack of that size can be mapped

        def limit_stack():
            resource.setrlimit(resource.RLIMIT_STACK, (huge, resource.RLIM_INFINITY))

        p = subprocess.Popen([H.sparkgate_bin(), "-c", path], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=H._child_env(), preexec_fn=limit_stack)
        try:
            out, err = p.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=5)
            self.fail("sparkgate did not exit when its worker threads could not start:\n%s"
                      % err.decode(errors="replace"))
        err = err.decode(errors="replace")
        self.assertEqual(p.returncode, 1, err)
        lines = [l for l in err.splitlines() if "cannot start worker thread" in l]
        self.assertTrue(lines, "no line about the worker thread:\n" + err)
        reasons = (os.strerror(errno.EAGAIN), os.strerror(errno.ENOMEM))
        self.assertTrue(any(r in lines[0] for r in reasons),
                        "the failed worker thread is logged without its reason "
                        "(want %r or %r in the line): %r" % (reasons[0], reasons[1], lines[0]))


# ---------------------------------------------------------------------------
# systemd's status line during a drain

class DrainStatusTest(H.SparkgateTestCase):
    """At start sparkgate sends READY=1 and STATUS=serving; a reload updates
    STATUS= too; at SIGTERM, STOPPING=1 and a STATUS= that says it is
    draining, so that `systemctl status sparkgate` does not show "serving"
    for the whole drain (30 s by default, with calls still running)."""

    def test_status_line_says_draining(self):
        up = self.standin()
        d = H.tempdir("sg-rev-lc-notify-")
        ns = NotifySocket(d)
        self.addCleanup(ns.close)
        cfg = H.base_config(up.port, workers=1, drain_timeout_ms=20000)
        sg = self.start_sparkgate(cfg, env={"NOTIFY_SOCKET": ns.path})
        ns.collect_until(lambda got: "READY" in state_messages(got)
                         and any("STATUS" in m for m in got), WAIT)

        # A call in flight keeps the drain going while the status is read.
        ch = H.tls_channel(sg.port())
        self.addCleanup(ch.close)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", H.call_unary(ch, "AnalyzePlan", b"slow",
                              metadata=H.standin_md(delay_ms=2500), timeout=20)),
            daemon=True)
        t.start()
        up.wait_for(lambda recs: [r for r in recs if r.method == SERVICE + "AnalyzePlan"],
                    timeout=WAIT)

        sg.send_signal(signal.SIGTERM)
        got = ns.collect_until(lambda g: "STOPPING" in state_messages(g), WAIT)
        self.assertTrue(sg.alive(), "exited with a call in flight")
        t.join(WAIT)
        self.assertEqual(result["r"].code, grpc.StatusCode.OK, result["r"])
        self.assertEqual(sg.wait(WAIT), 0, sg.log_text())
        got += ns.drain()
        after = got[[i for i, m in enumerate(got) if m.get("STOPPING") == "1"][0]:]
        statuses = [m["STATUS"] for m in after if "STATUS" in m]
        self.assertTrue(any("drain" in s.lower() for s in statuses),
                        "no STATUS= about the drain from STOPPING=1 to the exit: "
                        "`systemctl status` still shows \"serving\" while draining; "
                        "messages: %r" % got)


class DrainBeforePrefaceTest(H.SparkgateTestCase):
    def test_connection_without_preface_at_drain_is_logged_as_drained(self):
        """A TLS connection that has not sent its HTTP/2 preface when the
        drain starts is closed after the drain's short grace, and the line
        says so, not "no preface within <tls_handshake_timeout_ms> ms",
        a deadline that had not passed."""
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, workers=1,
                                                tls_handshake_timeout_ms=60000))
        raw = socket.create_connection(("127.0.0.1", sg.port()), timeout=10)
        tls = H.client_ssl_context().wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(tls.close)
        # The server's SETTINGS: its side of the handshake is done too.
        self.assertTrue(tls.recv(9), "no SETTINGS from sparkgate")
        mark = sg.mark()
        sg.send_signal(signal.SIGTERM)
        sg.wait_for_log(r"closed: draining, and the client had not sent its HTTP/2 preface",
                        timeout=WAIT, since=mark)
        self.assertIsNone(sg.find_log(r"no HTTP/2 preface and SETTINGS within", since=mark))
        self.assertEqual(sg.wait(WAIT), 0, sg.log_text())

    def test_connection_mid_handshake_at_drain_is_logged(self):
        """A connection whose TLS handshake has not finished when the drain
        starts is closed at once (the client retries elsewhere), with a
        line that says so."""
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, workers=1,
                                                tls_handshake_timeout_ms=60000,
                                                admin={"address": "127.0.0.1", "port": 0}))
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=WAIT).group(1))
        raw = socket.create_connection(("127.0.0.1", sg.port()), timeout=10)
        self.addCleanup(raw.close)
        # Accepted (not only queued in the backlog) before the drain starts.
        H.wait_until(lambda: sample(parse_prometheus(http_get(admin, "/metrics")[2].decode()),
                                    "sparkgate_connections_open") == 1,
                     WAIT, what="the connection accepted")
        mark = sg.mark()
        sg.send_signal(signal.SIGTERM)
        sg.wait_for_log(r"peer=127\.0\.0\.1:%d: closed: draining, and its TLS handshake "
                        r"had not finished" % raw.getsockname()[1], timeout=WAIT, since=mark)
        self.assertEqual(sg.wait(WAIT), 0, sg.log_text())


if __name__ == "__main__":
    H.main()
