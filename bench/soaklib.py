#!/usr/bin/python3
"""bench/soak: minutes of valid load through sparkgate mixed with attacks.

Starts, on 127.0.0.1, an nghttpd upstream (gRPC-framed replies from files,
as bench/run) and sparkgate (TLS listener with JWT auth, admin listener),
then for the whole run:
  * h2load: unary Config calls, rate limited (per-request latencies from
    its --log-file), and a grpcio client making Config calls too;
  * two attack threads on other connections, cycling through the classes of
    tests/integration/test_attacks.py, each run checked for its expected
    answer (GOAWAY code, RST_STREAM code, HTTP or gRPC status, close);
  * a sampler: sparkgate's VmRSS/VmHWM and open fds (/proc), connections
    and streams open (/metrics), connections to the upstream (/proc/net/tcp).
At the end: attacks stopped, a bounded settle, a last sample, SIGTERM, and
a report (stdout and bench/results/soak-latest.md). Exit status 1 when the
proxy died or was replaced, did not stop cleanly, the valid load's success
rate is under 99.9 %, or it holds more fds at the end than at the start
(beyond a small margin); 2 when the run could not be set up.

See bench/SOAK.md. Usage: bench/soak [--minutes N | --quick] [--sparkgate BIN]
"""

import argparse
import collections
import contextlib
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import benchlib  # noqa: E402
import test_attacks as A  # noqa: E402  (imports tests/lib/harness)

H = A.H
grpc = A.grpc

SERVICE = H.SERVICE  # "/spark.connect.SparkConnectService/"
CONFIG = SERVICE + "Config"          # valid load only: its metrics are the load's
ANALYZE = SERVICE + "AnalyzePlan"    # valid calls made by the attack threads
EXECUTE = SERVICE + "ExecutePlan"    # the large response (slow reader)

# Short limits, so that slowloris and slow readers are dealt with within
# seconds; long enough for valid calls on a loaded 2-core machine.
TLS_HANDSHAKE_TIMEOUT_MS = 2000
IDLE_TIMEOUT_MS = 4000
WRITE_STALL_TIMEOUT_MS = 3000
STREAM_IDLE_TIMEOUT_MS = 3000
UPSTREAM_IDLE_TIMEOUT_MS = 2000      # so the pool is empty again at the end
EXECUTE_REPLY_BYTES = 32 << 20       # what a slow reader asks for and never reads

FD_MARGIN = 4                        # fds the end may hold over the start
MIN_SUCCESS_PCT = 99.9
SETTLE_S = 30                        # bound on the wait for connections to close
MAX_ATTACK_ROUNDS = 100000           # per attack thread, whatever the duration


def say(msg):
    print("soak: " + msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Processes: nghttpd upstream, sparkgate, h2load

def pdeathsig(argv):
    """Children die with us, even on SIGKILL (setpriv execs: same PID)."""
    if shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "KILL", "--"] + argv
    return argv


def stop_process(p, timeout=10):
    """SIGTERM, bounded wait, SIGKILL; returns the exit status."""
    if p is None:
        return None
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    return p.returncode


def start_upstream(work):
    port = H.free_port()
    log = open(os.path.join(work, "nghttpd.log"), "wb")
    p = subprocess.Popen(pdeathsig(["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d",
                                    os.path.join(work, "docroot"), "--trailer",
                                    "grpc-status: 0", str(port)]),
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    try:
        H.wait_until(lambda: p.poll() is not None or H.port_is_open(port), 10,
                     what="nghttpd listening")
    except TimeoutError:
        pass
    if p.poll() is not None or not H.port_is_open(port):
        stop_process(p)
        raise SetupError("nghttpd (the upstream) did not start; see %s/nghttpd.log" % work)
    return p, port


def soak_config(upstream_port, workers):
    """bench/run's sparkgate setup (HS256 provider "bench", one tenant, one
    nghttpd backend), with the test PKI's certificate so that the attack
    clients can verify it, an admin listener and short timeouts."""
    return {
        "workers": workers,
        "log_level": "info",
        "drain_timeout_ms": 2000,
        "idle_timeout_ms": IDLE_TIMEOUT_MS,
        "tls_handshake_timeout_ms": TLS_HANDSHAKE_TIMEOUT_MS,
        "write_stall_timeout_ms": WRITE_STALL_TIMEOUT_MS,
        "stream_idle_timeout_ms": STREAM_IDLE_TIMEOUT_MS,
        "upstream": {"idle_timeout_ms": UPSTREAM_IDLE_TIMEOUT_MS},
        "access_log": {"enabled": False},
        "admin": {"address": "127.0.0.1", "port": 0},
        "auth": {"jwt_providers": [{"name": "bench", "issuer": "bench",
                                    "audiences": ["spark-connect"],
                                    "keys": [{"alg": "HS256", "secret_file": "jwt.secret"}]}]},
        "listeners": [H.tls_listener("soak", auth={"methods": ["jwt"]})],
        "tenants": [{"name": "default", "allow": {"any_identity": True},
                     "backends": [{"name": "upstream", "address": "127.0.0.1",
                                   "port": upstream_port}]}],
    }


class SetupError(Exception):
    pass


# ---------------------------------------------------------------------------
# Sampling

def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def scrape(admin_port, timeout=5):
    """/metrics as {name: summed value} plus {"rpcs:Config:STATUS": n}."""
    url = "http://127.0.0.1:%d/metrics" % admin_port
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    out = collections.Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] += v
        if name == "sparkgate_rpcs_total" and 'method="Config"' in head:
            m = re.search(r'grpc_status="(\d+)"', head)
            out["rpcs:Config:" + (m.group(1) if m else "?")] += v
    return out


def take_sample(ctx, label=""):
    s = {"t": time.monotonic() - ctx.t0, "label": label, "alive": ctx.sg.alive()}
    if not s["alive"]:
        return s
    try:
        st = proc_status(ctx.pid)
        s["rss_kib"], s["hwm_kib"], s["threads"] = st["VmRSS"], st["VmHWM"], st["Threads"]
        s["fds"] = len(os.listdir("/proc/%d/fd" % ctx.pid))
    except (OSError, KeyError):
        s["alive"] = False
        return s
    try:
        m = scrape(ctx.admin_port)
        s["cpu_s"] = m["process_cpu_seconds_total"]
        s["conns_open"] = int(m["sparkgate_connections_open"])
        s["streams_open"] = int(m["sparkgate_streams_open"])
        s["metrics"] = m
    except (OSError, ValueError) as e:
        s["metrics_error"] = str(e)
    s["upstream_conns"] = H.established_connections_to(ctx.upstream_port)
    return s


def sampler(ctx, interval):
    n = 0
    while not ctx.stop.wait(interval) and n < 100000:
        s = take_sample(ctx)
        with ctx.lock:
            ctx.samples.append(s)
        n += 1
        if not s["alive"]:
            return


# ---------------------------------------------------------------------------
# Valid load: grpcio client (h2load runs as a process, see run())

def grpc_client(ctx, rate):
    """Config calls, one at a time, at about |rate| per second; a new channel
    (connection) every 200 calls, as clients come and go."""
    st = ctx.grpc_stats
    md = [("authorization", "Bearer " + ctx.token)]
    ch = None
    n = 0
    try:
        while not ctx.stop.is_set() and n < 10000000:
            if n % 200 == 0:
                if ch is not None:
                    ch.close()
                ch = H.tls_channel(ctx.port)
            t = time.monotonic()
            err = None
            try:
                resp = ch.unary_unary(CONFIG)(ctx.config_msg, metadata=md, timeout=10)
                if resp != ctx.config_reply_msg:
                    err = "wrong response (%d bytes)" % len(resp)
            except grpc.RpcError as e:
                err = "%s: %s" % (e.code().name, e.details())
            dt = time.monotonic() - t
            with ctx.lock:
                st["total"] += 1
                st["lat_ms"].append(dt * 1000)
                if err:
                    st["failed"] += 1
                    st["errors"][err[:120]] += 1
            n += 1
            ctx.stop.wait(max(0.0, 1.0 / rate - dt))
    finally:
        if ch is not None:
            ch.close()


# ---------------------------------------------------------------------------
# Attacks. Each returns when the proxy answered as it must, raises Mismatch
# (or anything else) when not. Every loop and wait is bounded.

class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


H2_ERRORS = {A.NO_ERROR: "NO_ERROR", A.PROTOCOL_ERROR: "PROTOCOL_ERROR",
             A.INTERNAL_ERROR: "INTERNAL_ERROR", A.CANCEL: "CANCEL",
             A.ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM"}
_current = threading.local()                            # .attack: the class running
_observed = collections.defaultdict(collections.Counter)  # class -> GOAWAYs -> connections
_observed_lock = threading.Lock()


class Conn(A.RawH2):
    """RawH2 (which keeps every GOAWAY in order in .goaways: a client acts on
    the first, and the last-stream-id may never go up) that also tallies
    how each attack class's connections ended."""

    closed_counted = False

    def close(self):
        # What the connections of each attack class ended with, for the report.
        name = getattr(_current, "attack", None)
        if name and not self.closed_counted:
            self.closed_counted = True
            first = [H2_ERRORS.get(g[1], str(g[1])) for g in self.goaways[:2]]
            with _observed_lock:
                _observed[name][" then ".join(first) or "no GOAWAY"] += 1
        super().close()


def goaway_code(c, timeout=10):
    """Waits for GOAWAY (or close) and then for the close; the first
    GOAWAY's code, or None."""
    c.wait(lambda: c.goaway is not None, timeout, "GOAWAY")
    c.wait_closed(timeout)
    lasts = [g[0] for g in c.goaways]
    expect(all(a >= b for a, b in zip(lasts, lasts[1:])),
           "GOAWAYs (last-stream-id, code) %r: the last-stream-id went up (RFC 9113 6.8)"
           % c.goaways)
    return c.goaways[0][1] if c.goaways else None


def expect_calm(c, what):
    code = goaway_code(c)
    expect(code == A.ENHANCE_YOUR_CALM and c.closed,
           "%s: GOAWAYs (last-stream-id, code) %r closed=%s, want ENHANCE_YOUR_CALM first "
           "and close" % (what, c.goaways, c.closed))


def valid_call(ctx, c, path=ANALYZE, extra=()):
    """A valid call on connection |c| must get grpc-status 0."""
    sid = c.request(c.request_headers(path, extra=ctx.auth + list(extra)), ctx.config_req)
    s = c.wait_stream(sid, 10)
    expect((s.status, s.grpc_status, s.reset) == (200, 0, None), "valid call got %r" % s)


def frame_flood(ctx, make_batch, batch, setup=None, acked=None, what="flood"):
    """FrameFloodTest.flood without the test case: batches until the budget's
    GOAWAY, bounded at 5x the budget; ACK-eliciting frames are sent as fast
    as the ACKs come back."""
    with Conn(ctx.port) as c:
        if setup is not None:
            c.send(setup(c))
        c.wait(lambda: c.settings_acked > 0, 5, "SETTINGS ACK")
        base = acked(c) if acked else 0
        sent = i = 0
        while (c.goaway is None and not c.closed and not c.send_failed
               and sent < 5 * A.ABUSE_BURST):
            c.send(make_batch(i))
            sent += batch
            i += 1
            if acked:
                c.wait(lambda: acked(c) - base >= sent or c.goaway is not None, 10, "ACKs")
            else:
                c.pump(0.01)
        expect(sent > A.ABUSE_BURST - batch, "%s: closed after only %d frames" % (what, sent))
        expect_calm(c, "%s (%d frames)" % (what, sent))


def a_ping_flood(ctx):
    frame_flood(ctx, lambda i: b"".join(A.frame(A.PING, 0, 0, (i * 100 + k).to_bytes(8, "big"))
                                        for k in range(100)), 100,
                acked=lambda c: c.pings_acked, what="PING flood")


def a_settings_flood(ctx):
    frame_flood(ctx, lambda i: A.settings_frame([(A.SETTINGS_INITIAL_WINDOW_SIZE, 65535)]) * 100,
                100, acked=lambda c: c.settings_acked, what="SETTINGS flood")


def a_priority_flood(ctx):
    frame_flood(ctx, lambda i: b"".join(A.frame(A.PRIORITY, 0, 2 * (i * 100 + k) + 1,
                                                bytes(4) + b"\x0f") for k in range(100)),
                100, what="PRIORITY flood")


def a_empty_data_flood(ctx):
    # One authorized request stream waiting for its message, then DATA
    # frames with no payload.
    frame_flood(ctx, lambda i: A.frame(A.DATA, 0, 1) * 100, 100,
                setup=lambda c: A.headers_frames(1, A.hpack_block(
                    c.request_headers(extra=ctx.auth))), what="empty DATA flood")


def a_window_update_dribble(ctx):
    frame_flood(ctx, lambda i: A.window_update(0, 1) * 100, 100, what="WINDOW_UPDATE dribble")


def a_rapid_reset(ctx):
    with Conn(ctx.port) as c:
        block = A.hpack_block(c.request_headers(extra=ctx.auth))
        n = 0
        while c.goaway is None and not c.closed and not c.send_failed and n < 20000:
            batch = []
            for _ in range(200):
                sid = c.next_sid
                c.next_sid += 2
                batch.append(A.headers_frames(sid, block) + A.rst_stream(sid, A.CANCEL))
            c.send(b"".join(batch))
            n += 200
            c.pump(0.005)
        expect_calm(c, "rapid reset (%d HEADERS+RST_STREAM)" % n)


def a_continuation_flood(ctx):
    with Conn(ctx.port) as c:
        c.send(A.frame(A.HEADERS, 0, 1, A.hpack_block(c.request_headers(extra=ctx.auth))))
        n = 0
        while not c.closed and not c.send_failed and n < 10000:
            c.send(b"".join(A.frame(A.CONTINUATION, 0, 1, A.hpack_literal("x-c%d" % (n + k), "v"))
                            for k in range(100)))
            n += 100
            c.pump(0.005)
        expect(c.wait_closed(10), "CONTINUATION flood: open after %d frames" % n)
        expect(1 not in c.streams, "CONTINUATION flood: the unfinished block got an answer")


def a_hpack_bomb(ctx):
    n_bombs, refs = 10, 15000
    with Conn(ctx.port) as c:
        # A 4000-byte value into the dynamic table (index 62), on a request
        # refused for its path; then blocks of 15000 references to it.
        sid = c.new_sid()
        c.send(A.headers_frames(sid, A.hpack_block(c.request_headers("/not.Allowed/X",
                                                                     extra=ctx.auth)) +
                                A.hpack_literal("x-bomb", "b" * 4000, index=True),
                                end_stream=True))
        s = c.wait_stream(sid)
        expect(s.grpc_status == 12, "HPACK bomb: path refusal got %r" % s)
        base = A.hpack_block(c.request_headers())
        bombs = []
        for _ in range(n_bombs):
            sid = c.new_sid()
            bombs.append(sid)
            c.send(A.headers_frames(sid, base + A.hpack_indexed(62) * refs, end_stream=True))
        for sid in bombs:
            s = c.wait_stream(sid)
            expect((s.reset, s.headers) == (A.INTERNAL_ERROR, []),
                   "HPACK bomb: stream got %r, want RST_STREAM INTERNAL_ERROR" % s)
        valid_call(ctx, c)  # the dynamic table stayed in sync


def a_oversized_headers(ctx):
    with Conn(ctx.port) as c:
        big = [("x-big-%d" % i, "v" * 4000) for i in range(6)]
        sid = c.request(c.request_headers(ANALYZE, extra=ctx.auth + big), ctx.config_req)
        s = c.wait_stream(sid)
        expect((s.reset, s.headers) == (A.INTERNAL_ERROR, []),
               "24 KiB header list got %r, want RST_STREAM INTERNAL_ERROR" % s)
        valid_call(ctx, c, extra=[("x-big-0", "v" * 4000)])
        expect(not c.closed and c.goaway is None, "oversized headers: connection closed")


def a_unauth_flood(ctx):
    denied = 0
    with Conn(ctx.port) as c:
        while c.goaway is None and not c.closed and not c.send_failed and denied < 3000:
            batch = [c.new_sid() for _ in range(50)]
            c.send(b"".join(c.request_bytes(sid, c.request_headers(ANALYZE), ctx.config_req)
                            for sid in batch))
            c.wait(lambda: all(c.streams[s].done for s in batch), 10, "batch answered")
            # Streams not done are beyond the GOAWAY's last stream.
            answered = [c.streams[sid] for sid in batch if c.streams[sid].done]
            wrong = [s for s in answered if (s.status, s.grpc_status) != (200, 16)]
            expect(not wrong, "request without token got %r, want grpc-status 16" % wrong[:1])
            denied += len(answered)
        expect(denied >= A.ABUSE_BURST // 2, "unauthenticated: GOAWAY after %d denials" % denied)
        expect_calm(c, "unauthenticated flood (%d denied)" % denied)


def a_bad_tokens(ctx):
    with Conn(ctx.port) as c:
        for value in ctx.bad_auth * 3:
            sid = c.request(c.request_headers(ANALYZE, extra=[("authorization", value)]),
                            ctx.config_req)
            s = c.wait_stream(sid)
            expect((s.status, s.grpc_status) == (200, 16),
                   "authorization %r got %r, want grpc-status 16" % (value[:20], s))
        valid_call(ctx, c)


# (what, request_headers arguments, extra headers, (kind, code)); the
# answers are those of MalformedRequestTest.
MALFORMED = [
    ("host differs from :authority", {}, [("host", "evil.example")], ("reset", A.PROTOCOL_ERROR)),
    (":authority with userinfo", {"authority": "user:pw@localhost"}, [],
     ("reset", A.PROTOCOL_ERROR)),
    ("wrong :scheme", {"scheme": "http"}, [], ("reset", A.PROTOCOL_ERROR)),
    ("_ alias of x-forwarded-for", {}, [("x_forwarded_for", "10.0.0.1")], ("grpc", 3)),
    ("_ alias of the identity header", {}, [("x_sparkgate_identity", "admin")], ("grpc", 3)),
    ("GET", {"method": "GET"}, [], ("http", 405)),
    ("content-type text/plain", {"content_type": "text/plain"}, [], ("http", 415)),
    ("grpc-timeout without unit", {}, [("grpc-timeout", "100")], ("grpc", 13)),
    ("connection-specific header", {}, [("connection", "keep-alive")],
     ("reset", A.PROTOCOL_ERROR)),
    ("uppercase header name", {}, [("X-Upper", "1")], ("reset", A.PROTOCOL_ERROR)),
]


def a_malformed(ctx):
    bad = []
    for what, kw, extra, (kind, code) in MALFORMED:
        with Conn(ctx.port) as c:  # one connection each: a reset may hide another answer
            s = c.wait_stream(c.request(c.request_headers(ANALYZE, extra=ctx.auth + extra, **kw),
                                        ctx.config_req))
        got = {"reset": (s.reset, len(s.headers)), "http": (s.status, s.reset),
               "grpc": (s.status, s.grpc_status)}[kind]
        want = {"reset": (code, 0), "http": (code, None), "grpc": (200, code)}[kind]
        if got != want:
            bad.append("%s: got %r" % (what, s))
    # A Spark call that ends without a message: 3, not a held stream.
    with Conn(ctx.port) as c:
        s = c.wait_stream(c.request(c.request_headers(ANALYZE, extra=ctx.auth)), 5)
        if (s.status, s.grpc_status) != (200, 3):
            bad.append("call without message: got %r" % s)
    expect(not bad, "; ".join(bad))


def a_tls_garbage(ctx):
    # Random bytes instead of a ClientHello: closed.
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=5) as s:
        s.sendall(os.urandom(2048))
        expect(A.wait_socket_closed(s, 10), "TLS garbage: connection not closed")
    # A ClientHello cut short, then gone (nothing to check but the proxy).
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=5) as s:
        s.sendall(bytes.fromhex("16030100c8010000c40303") + os.urandom(40))
    # A handshake without ALPN h2, and one at TLS 1.1: no HTTP/2 either way.
    p = H.tls_probe(ctx.port, alpn=("http/1.1",))
    expect(not p.h2_settings_received, "ALPN http/1.1 got HTTP/2: %r" % p)
    p = H.tls_probe(ctx.port, max_version=ssl.TLSVersion.TLSv1_1, seclevel0=True)
    expect(not p.ok, "TLS 1.1 handshake accepted: %r" % p)


def a_slowloris(ctx):
    """Connections that say nothing or too little, all held at once: each
    must be closed by a timeout (handshake, preface, idle, stream idle)."""
    bound = (IDLE_TIMEOUT_MS + STREAM_IDLE_TIMEOUT_MS) / 1000.0 + 10
    silent, conns = [], []
    try:
        silent = [socket.create_connection(("127.0.0.1", ctx.port), timeout=5) for _ in range(5)]
        mute = Conn(ctx.port, preface=False)           # TLS, no preface
        conns.append(("TLS without preface", mute))
        part = Conn(ctx.port, preface=False)           # half a preface
        part.send(A.PREFACE[:10])
        conns.append(("half a preface", part))
        idle = Conn(ctx.port)                          # SETTINGS, then nothing
        conns.append(("idle after SETTINGS", idle))
        hdrs = Conn(ctx.port)                          # a header block never finished
        hdrs.wait(lambda: hdrs.settings_acked, 5, "SETTINGS ACK")  # no frame may follow it
        hdrs.send(A.frame(A.HEADERS, 0, 1, A.hpack_block(hdrs.request_headers(extra=ctx.auth))))
        conns.append(("unfinished header block", hdrs))
        stuck = Conn(ctx.port)                         # a request whose message never comes
        sid = stuck.request(stuck.request_headers(extra=ctx.auth), end_stream=False)
        conns.append(("request without its message", stuck))
        deadline = time.monotonic() + bound
        for s in silent:
            expect(A.wait_socket_closed(s, max(0.1, deadline - time.monotonic())),
                   "silent TCP connection (no ClientHello) still open after %.0f s" % bound)
        st = stuck.wait_stream(sid, max(0.1, deadline - time.monotonic()))
        expect((st.status, st.grpc_status) == (200, 4),
               "request without its message got %r, want grpc-status 4" % st)
        for what, c in conns:
            expect(c.wait_closed(max(0.1, deadline - time.monotonic())),
                   "%s: still open after %.0f s" % (what, bound))
        expect([g[1] for g in idle.goaways] == [A.NO_ERROR],
               "idle connection: GOAWAYs %r, want one NO_ERROR" % (idle.goaways,))
    finally:
        for s in silent:
            s.close()
        for _, c in conns:
            c.close()


def a_slow_reader(ctx):
    """Asks for a 32 MiB ExecutePlan reply with every window open and a
    4 KiB receive buffer, and reads nothing: closed after the write stall."""
    mark = ctx.sg.mark()
    c = Conn(ctx.port, rcvbuf=4096, settings=[(A.SETTINGS_INITIAL_WINDOW_SIZE, A.MAX_WINDOW)],
                auto_window=False)
    try:
        lport = c.sock.getsockname()[1]
        c.send(A.window_update(0, A.MAX_WINDOW - 65535))
        sid = c.request(c.request_headers(EXECUTE, extra=ctx.auth), ctx.execute_req)
        rx = re.compile(r"peer=127\.0\.0\.1:%d: closed: the client read nothing" % lport)
        deadline = time.monotonic() + WRITE_STALL_TIMEOUT_MS / 1000.0 + 15
        while not ctx.sg.find_log(rx, since=mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        expect(ctx.sg.find_log(rx, since=mark),
               "slow reader: no write-stall close within %.0f s" % (WRITE_STALL_TIMEOUT_MS / 1000.0 + 15))
        expect(c.wait_closed(20), "slow reader: connection still open after the write stall")
        st = c.streams[sid]
        expect(not st.ended and len(st.data) < EXECUTE_REPLY_BYTES,
               "slow reader: the whole reply was delivered")
    finally:
        c.close()


def a_churn(ctx):
    """30 TLS connections one after another: a valid call and close; every
    third one closes with its call in flight; every fifth right after the
    handshake."""
    for i in range(30):
        with Conn(ctx.port) as c:
            if i % 5 == 4:
                continue
            sid = c.request(c.request_headers(ANALYZE, extra=ctx.auth), ctx.config_req)
            if i % 3 == 2:
                continue
            s = c.wait_stream(sid, 10)
            expect((s.status, s.grpc_status) == (200, 0), "churn call %d got %r" % (i, s))


FAST_ATTACKS = [a_ping_flood, a_settings_flood, a_priority_flood, a_rapid_reset,
                a_continuation_flood, a_hpack_bomb, a_oversized_headers, a_empty_data_flood,
                a_window_update_dribble, a_unauth_flood, a_bad_tokens, a_malformed,
                a_tls_garbage, a_churn]
SLOW_ATTACKS = [a_slowloris, a_slow_reader]   # mostly waiting for timeouts


def attack_name(fn):
    return fn.__name__[2:]


def attacker(ctx, attacks, pause):
    for i in range(MAX_ATTACK_ROUNDS):
        if ctx.stop.is_set():
            return
        fn = attacks[i % len(attacks)]
        _current.attack = attack_name(fn)
        t = time.monotonic()
        try:
            fn(ctx)
            err = None
        except Mismatch as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - any failure is a finding, not an abort
            err = "%s: %s" % (type(e).__name__, e)
        with ctx.lock:
            r = ctx.attacks[attack_name(fn)]
            r["runs"] += 1
            r["seconds"] += time.monotonic() - t
            if err:
                r["mismatches"] += 1
                if len(r["examples"]) < 3:
                    r["examples"].append("t=%.0fs %s" % (t - ctx.t0, err[:300]))
        ctx.stop.wait(pause)


# ---------------------------------------------------------------------------
# Analysis

def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(p / 100.0 * len(sorted_vals)))]


def h2load_windows(log_path, window_s):
    """Per-window (from the first request) and overall latencies of the
    h2load log: rows of (start s, requests, non-200, p50 ms, p99 ms)."""
    rows = []
    try:
        with open(log_path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    try:
                        rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
                    except ValueError:
                        pass
    except OSError:
        return [], {}
    if not rows:
        return [], {}
    t0 = min(r[0] for r in rows)
    by = collections.defaultdict(list)
    bad = collections.Counter()
    for start, status, dur in rows:
        w = int((start - t0) / 1e6 // window_s)
        by[w].append(dur / 1000.0)
        if status != 200:
            bad[w] += 1
    windows = []
    for w in sorted(by):
        d = sorted(by[w])
        windows.append((w * window_s, len(d), bad[w], pct(d, 50), pct(d, 99)))
    alld = sorted(r[2] / 1000.0 for r in rows)
    overall = {"requests": len(rows), "non200": sum(bad.values()),
               "p50_ms": pct(alld, 50), "p99_ms": pct(alld, 99), "max_ms": alld[-1]}
    return windows, overall


def normalize_log(line):
    """(level, message with ids, addresses and numbers folded), or None."""
    m = re.match(r"^\S+ (debug|info|warn|error) sparkgate: (.*)$", line)
    if not m:
        return ("other", re.sub(r"\d+", "N", line)[:140])
    msg = re.sub(r"\b(conn|stream|peer)=\S+\s*", "", m.group(2))
    msg = re.sub(r"\d+", "N", msg)
    return (m.group(1), msg[:160])


def fmt(v, f="%.2f"):
    return "-" if v is None else f % v


def mib(kib):
    return "-" if kib is None else "%.1f" % (kib / 1024.0)


def build_report(ctx, h2, h2out, windows, overall, stop_rc, verdict_reasons, flags):
    L = []
    add = L.append
    ss = [s for s in ctx.samples if s.get("alive") and "rss_kib" in s]
    last = ctx.samples[-1]
    add("# sparkgate soak")
    add("")
    add("- date: %s; binary %s (%s)" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ctx.wall0)),
                                       ctx.binary, ctx.version))
    add("- machine: %d CPUs (%s), load average at start %s, at end %s%s"
        % (os.cpu_count() or 0, ctx.cpu_model, ctx.load0, ctx.load1,
           " (shared with other work)" if ctx.shared_note else ""))
    add("- run: %.1f min planned, %.1f min of load; sparkgate %d workers, TLS + JWT (HS256); "
        "h2load %d conns x %d streams at %d req/s per conn; grpcio client %g calls/s; "
        "attacks %s" % (ctx.args.minutes, ctx.load_s / 60.0, ctx.args.workers,
                        ctx.args.connections, ctx.args.streams, ctx.rps_per_conn,
                        ctx.args.grpc_rate, "off" if ctx.args.no_attacks else
                        "on (pause %.2f s)" % ctx.args.attack_pause))
    add("")
    add("## Verdict: %s" % ("PASS" if not verdict_reasons else "FAIL"))
    add("")
    for r in verdict_reasons:
        add("- FAIL: %s" % r)
    for f in flags:
        add("- note: %s" % f)
    if not verdict_reasons and not flags:
        add("- nothing to flag")
    add("")

    add("## Valid load")
    add("")
    g = ctx.grpc_stats
    gl = sorted(g["lat_ms"])
    add("| client | requests | succeeded | failed | success % | p50 ms | p99 ms | max ms |")
    add("|---|---|---|---|---|---|---|---|")
    add("| h2load (Config, TLS) | %d | %d | %d | %s | %s | %s | %s |"
        % (h2["total"], h2["ok"], h2["failed"], fmt(h2["rate"], "%.3f"),
           fmt(overall.get("p50_ms")), fmt(overall.get("p99_ms")), fmt(overall.get("max_ms"))))
    add("| grpcio (Config, TLS) | %d | %d | %d | %s | %s | %s | %s |"
        % (g["total"], g["total"] - g["failed"], g["failed"],
           fmt(100.0 * (g["total"] - g["failed"]) / g["total"] if g["total"] else None, "%.3f"),
           fmt(pct(gl, 50)), fmt(pct(gl, 99)), fmt(gl[-1] if gl else None)))
    add("| **all** | %d | %d | %d | %s | | | |"
        % (ctx.valid_total, ctx.valid_ok, ctx.valid_total - ctx.valid_ok,
           fmt(ctx.success_pct, "%.3f")))
    add("")
    add("h2load: %s. Failed = h2load's failed + errored + timeout, plus HTTP 200 answers "
        "without the upstream's body (a gRPC error made by the proxy): %d. Started but not "
        "finished when the duration ended (not counted): %d."
        % (h2.get("summary", "no summary"), h2["grpc_short"], h2["unfinished"]))
    cfg = last.get("metrics") or (ss[-1].get("metrics") if ss else None) or {}
    by_status = {k.split(":")[2]: int(v) for k, v in cfg.items() if k.startswith("rpcs:Config:")}
    add("sparkgate's own count of Config calls by grpc-status (/metrics): %s."
        % (", ".join("%s: %d" % kv for kv in sorted(by_status.items())) or "none"))
    if g["errors"]:
        add("grpcio errors: %s." % "; ".join("%s (x%d)" % kv for kv in g["errors"].most_common(5)))
    add("")
    if windows:
        add("Per %d-second window of h2load requests (by start time):" % ctx.window_s)
        add("")
        add("| from s | requests | non-200 | p50 ms | p99 ms |")
        add("|---|---|---|---|---|")
        for w in windows:
            add("| %d | %d | %d | %s | %s |" % (w[0], w[1], w[2], fmt(w[3]), fmt(w[4])))
        add("")
        worst = max(windows, key=lambda w: w[4] or 0)
        add("Worst window p99: %s ms (from %d s)." % (fmt(worst[4]), worst[0]))
        add("")

    add("## Attacks")
    add("")
    if ctx.attacks:
        add("%d attack runs in all, %d with another answer than expected."
            % (sum(r["runs"] for r in ctx.attacks.values()),
               sum(r["mismatches"] for r in ctx.attacks.values())))
        add("")
        add("| class | runs | as expected | mismatches | mean s | GOAWAYs seen (first, second) by HTTP/2 connections |")
        add("|---|---|---|---|---|---|")
        for fn in FAST_ATTACKS + SLOW_ATTACKS:
            r = ctx.attacks.get(attack_name(fn))
            if not r:
                continue
            with _observed_lock:
                seen = ", ".join("%s x%d" % kv for kv in _observed[attack_name(fn)].most_common())
            add("| %s | %d | %d | %d | %.2f | %s |"
                % (attack_name(fn), r["runs"], r["runs"] - r["mismatches"], r["mismatches"],
                   r["seconds"] / max(1, r["runs"]), seen or "-"))
        ex = [(k, e) for k, r in ctx.attacks.items() for e in r["examples"]]
        if ex:
            add("")
            add("Mismatches (first 3 per class):")
            add("")
            for k, e in ex:
                add("- %s: %s" % (k, e.replace("\n", " ")))
    else:
        add("none run")
    add("")

    add("## Process")
    add("")
    rss = [s["rss_kib"] for s in ss]
    fds = [s["fds"] for s in ss]
    add("- pid %d at start; %s" % (ctx.pid, "alive with the same pid at the end"
                                    if last.get("alive") else "NOT alive at the end"))
    add("- exit status after SIGTERM at the end: %s" % stop_rc)
    if ss:
        end = "end" if ss[-1]["label"] == "end" else "last sample alive (t=%.0fs)" % ss[-1]["t"]
        add("- RSS MiB: start %s, peak sampled %s, %s %s; VmHWM there %s"
            % (mib(ss[0]["rss_kib"]), mib(max(rss)), end, mib(ss[-1]["rss_kib"]),
               mib(ss[-1]["hwm_kib"])))
        add("- open fds: start %d, max sampled %d, %s %d%s"
            % (ss[0]["fds"], max(fds), end, ss[-1]["fds"],
               " (settling after the load: %s)" % ctx.settle_note if ctx.settle_note else ""))
    if not last.get("alive"):
        add("")
        add("Last lines of the proxy's log:")
        add("")
        add("```")
        add("\n".join(ctx.log_lines[-20:]))
        add("```")
    add("")
    add("| t s | label | RSS MiB | HWM MiB | fds | threads | CPU s | conns open | streams open | upstream conns |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for s in ctx.samples:
        if "rss_kib" not in s:
            add("| %.0f | %s | dead | | | | | | | |" % (s["t"], s["label"]))
            continue
        add("| %.0f | %s | %s | %s | %d | %d | %s | %s | %s | %d |"
            % (s["t"], s["label"], mib(s["rss_kib"]), mib(s["hwm_kib"]), s["fds"],
               s["threads"], fmt(s.get("cpu_s"), "%.1f"), s.get("conns_open", "?"),
               s.get("streams_open", "?"), s["upstream_conns"]))
    add("")

    add("## Proxy log")
    add("")
    lines = ctx.log_lines
    levels = collections.Counter()
    kinds = collections.Counter()
    for line in lines:
        lvl, msg = normalize_log(line)
        levels[lvl] += 1
        kinds[(lvl, msg)] += 1
    add("%d lines: %s." % (len(lines), ", ".join("%s %d" % kv for kv in sorted(levels.items()))))
    add("")
    add("| count | level | message (numbers as N; conn, stream and peer left out) |")
    add("|---|---|---|")
    for (lvl, msg), n in kinds.most_common(30):
        add("| %d | %s | %s |" % (n, lvl, msg.replace("|", "\\|")))
    if len(kinds) > 30:
        add("| ... | | %d more kinds |" % (len(kinds) - 30))
    add("")
    add("h2load output (tail):")
    add("")
    add("```")
    add("\n".join(h2out.strip().splitlines()[-14:]))
    add("```")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------

def parse_args():
    ap = argparse.ArgumentParser(prog="bench/soak", description=__doc__.splitlines()[0],
                                 epilog="See bench/SOAK.md.")
    ap.add_argument("--minutes", type=float, default=5.0, help="load duration (default 5)")
    ap.add_argument("--quick", action="store_true", help="1 minute, for a try")
    ap.add_argument("--sparkgate", default=os.path.join(ROOT, "build", "sparkgate"),
                    help="the binary (default build/sparkgate; not built here)")
    ap.add_argument("--workers", type=int, default=2, help="sparkgate workers (default 2)")
    ap.add_argument("--connections", type=int, default=20, help="h2load connections (20)")
    ap.add_argument("--streams", type=int, default=10, help="h2load streams per connection (10)")
    ap.add_argument("--rate", type=int, default=1000,
                    help="h2load requests per second in all (1000), spread over the connections")
    ap.add_argument("--grpc-rate", type=float, default=20, help="grpcio calls per second (20)")
    ap.add_argument("--attack-pause", type=float, default=0.2,
                    help="seconds between two attacks of one attack thread (0.2)")
    ap.add_argument("--no-attacks", action="store_true", help="valid load only (a baseline)")
    ap.add_argument("--sample-every", type=float, default=10, help="seconds between samples (10)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (config, logs, h2load output)")
    ap.add_argument("--report", default=os.path.join(ROOT, "bench", "results", "soak-latest.md"),
                    help="where the Markdown report goes (default bench/results/soak-latest.md)")
    a = ap.parse_args()
    if a.quick:
        a.minutes = 1.0
    if not (0 < a.minutes <= 24 * 60):
        ap.error("--minutes must be in (0, 1440]")
    if a.connections < 1 or a.streams < 1 or a.rate < 1 or a.grpc_rate <= 0 or a.workers < 1:
        ap.error("--connections, --streams, --rate, --grpc-rate and --workers must be positive")
    return a


def first_line(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run(args, work):
    for tool in ("h2load", "nghttpd"):
        if not shutil.which(tool):
            raise SetupError("'%s' is missing (scripts/install-deps --bench installs it)" % tool)
    binary = os.path.abspath(args.sparkgate)
    if not os.access(binary, os.X_OK):
        raise SetupError("no binary at %s (build it: scripts/test --quick)" % binary)
    os.environ["SPARKGATE_BIN"] = binary

    ctx = SimpleNamespace(args=args, binary=binary, lock=threading.Lock(),
                          stop=threading.Event(), samples=[], wall0=time.time(),
                          attacks=collections.defaultdict(
                              lambda: {"runs": 0, "mismatches": 0, "seconds": 0.0,
                                       "examples": []}),
                          grpc_stats={"total": 0, "failed": 0, "lat_ms": [],
                                      "errors": collections.Counter()},
                          cpu_model=first_line("/proc/cpuinfo", "model name"),
                          load0=loadavg(), shared_note=True, settle_note="")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=10).stdout.strip()
    ctx.version = out.splitlines()[0] if out else "version unknown"
    ctx.window_s = 60 if args.minutes >= 3 else 10

    # Payloads, JWT secret and token, the upstream's docroot: bench/run's.
    with contextlib.redirect_stdout(io.StringIO()):
        benchlib.cmd_payloads(SimpleNamespace(dir=work, bulk_bytes=EXECUTE_REPLY_BYTES,
                                               upload_bytes=64 * 1024))

    def read(name):
        with open(os.path.join(work, name), "rb") as f:
            return f.read()
    ctx.config_req, ctx.execute_req = read("config.req"), read("execute.req")
    ctx.config_msg = ctx.config_req[5:]
    reply = read(os.path.join("docroot", benchlib.SERVICE, "Config"))
    ctx.config_reply_msg = reply[5:]
    with open(os.path.join(work, "docroot", benchlib.SERVICE, "AnalyzePlan"), "wb") as f:
        f.write(reply)
    ctx.token = read("jwt.token").decode()
    ctx.auth = [("authorization", "Bearer " + ctx.token)]
    secret = read("jwt.secret")
    now = int(time.time())
    # authorization values that must each get 16 (an empty one is not here:
    # "Bearer " ends in a space, which nghttp2 refuses before sparkgate sees it).
    ctx.bad_auth = ["Bearer " + (t if isinstance(t, str) else t.decode()) for t in [
        read("jwt.bad"),                                                   # another secret
        benchlib.hs256_token(secret, benchlib.bench_claims(iat=now - 7200,
                                                           exp=now - 3600)),  # expired
        benchlib.hs256_token(secret, benchlib.bench_claims(iss="other")),  # unknown issuer
        "not-a-jwt"]] + ["Bearer", "Basic dXNlcjpwdw=="]

    say("work directory %s; %.1f minute(s) of load" % (work, args.minutes))
    H.pki()  # the test PKI (CA + server certificate for localhost/127.0.0.1)
    ctx.upstream = None
    ctx.sg = None
    ctx.h2load = None
    try:
        ctx.upstream, ctx.upstream_port = start_upstream(work)
        ctx.sg = H.Sparkgate(soak_config(ctx.upstream_port, args.workers), config_dir=work)
        try:
            ctx.sg.start()
            m = ctx.sg.wait_for_log(r"admin listening on 127\.0\.0\.1:(\d+)", timeout=10)
        except AssertionError as e:
            raise SetupError(str(e)[-2000:])
        ctx.admin_port = int(m.group(1))
        ctx.port = ctx.sg.port("soak")
        ctx.pid = ctx.sg.pid
        say("sparkgate pid %d: TLS 127.0.0.1:%d, admin :%d; upstream nghttpd :%d"
            % (ctx.pid, ctx.port, ctx.admin_port, ctx.upstream_port))
        return soak(ctx, work)
    finally:
        ctx.stop.set()
        if ctx.h2load is not None:
            stop_process(ctx.h2load, 5)
        if ctx.sg is not None and ctx.sg.alive():
            ctx.sg.stop(check=False)
        stop_process(ctx.upstream, 5)
        if ctx.sg is not None:
            with open(os.path.join(work, "sparkgate.log"), "w") as f:
                f.write(ctx.sg.log_text() + "\n")


def soak(ctx, work):
    args = ctx.args
    # A probe first: nothing to soak if a valid call does not work.
    ch = H.tls_channel(ctx.port)
    try:
        resp = ch.unary_unary(CONFIG)(ctx.config_msg, metadata=ctx.auth, timeout=15)
    except grpc.RpcError as e:
        raise SetupError("probe Config call failed: %s %s" % (e.code(), e.details()))
    finally:
        ch.close()
    if resp != ctx.config_reply_msg:
        raise SetupError("probe Config call: unexpected reply %r" % resp[:64])

    ctx.t0 = time.monotonic()
    # Settle after the probe (its connections close at the idle timeout).
    settle(ctx, 10)
    ctx.samples.append(take_sample(ctx, "start"))
    secs = max(1, int(round(args.minutes * 60)))
    ctx.rps_per_conn = max(1, -(-args.rate // args.connections))
    h2log, h2out_path = os.path.join(work, "h2load.log"), os.path.join(work, "h2load.out")
    cmd = ["h2load", "-t", "1", "-c", str(args.connections), "-m", str(args.streams),
           "--rps", str(ctx.rps_per_conn), "-D", str(secs),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           "-H", "authorization: Bearer " + ctx.token,
           "-d", os.path.join(work, "config.req"), "--log-file", h2log,
           "https://127.0.0.1:%d%s" % (ctx.port, CONFIG)]
    with open(h2out_path, "wb") as out:
        ctx.h2load = subprocess.Popen(pdeathsig(cmd), stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT)
    t_load = time.monotonic()
    threads = [threading.Thread(target=sampler, args=(ctx, args.sample_every), daemon=True),
               threading.Thread(target=grpc_client, args=(ctx, args.grpc_rate), daemon=True)]
    if not args.no_attacks:
        threads += [threading.Thread(target=attacker, args=(ctx, FAST_ATTACKS, args.attack_pause),
                                     daemon=True),
                    threading.Thread(target=attacker, args=(ctx, SLOW_ATTACKS, args.attack_pause),
                                     daemon=True)]
    for t in threads:
        t.start()
    say("load and attacks running for %d s (h2load pid %d)" % (secs, ctx.h2load.pid))

    # Wait for h2load's duration (bounded), watching the proxy.
    deadline = time.monotonic() + secs + 60
    next_note = time.monotonic() + 60
    died = False
    while ctx.h2load.poll() is None and time.monotonic() < deadline:
        if not ctx.sg.alive():
            died = True
            say("sparkgate EXITED during the run (status %s)" % ctx.sg.proc.poll())
            break
        if time.monotonic() >= next_note:
            next_note += 60
            with ctx.lock:
                s = ctx.samples[-1]
                runs = sum(r["runs"] for r in ctx.attacks.values())
                bad = sum(r["mismatches"] for r in ctx.attacks.values())
            say("t=%.0fs RSS %s MiB, fds %s, %d attacks (%d mismatches), grpcio %d calls"
                % (time.monotonic() - ctx.t0, mib(s.get("rss_kib")), s.get("fds"), runs, bad,
                   ctx.grpc_stats["total"]))
        time.sleep(0.5)
    ctx.load_s = time.monotonic() - t_load
    ctx.stop.set()
    h2_rc = None
    if ctx.h2load.poll() is None:
        stop_process(ctx.h2load, 5)
        h2_note = "h2load did not finish in time (stopped)" if not died else "stopped early"
    else:
        h2_rc = ctx.h2load.returncode
        h2_note = "" if h2_rc == 0 else "h2load exited %d" % h2_rc
    say("load over; stopping attacks (bounded) and settling")
    for t in threads:
        t.join(45)
    stuck = [t for t in threads if t.is_alive()]

    if ctx.sg.alive():
        ctx.settle_note = settle(ctx, SETTLE_S)
    ctx.samples.append(take_sample(ctx, "end"))
    ctx.load1 = loadavg()
    alive_end = ctx.sg.alive()
    stop_rc = ctx.sg.stop(check=False) if alive_end else ctx.sg.proc.poll()
    ctx.log_lines = list(ctx.sg.lines)

    # ---- figures
    with open(h2out_path, encoding="utf-8", errors="replace") as f:
        h2out = f.read()
    r = benchlib.parse_h2load(h2out)
    reply_bytes = len(ctx.config_reply_msg) + 5
    h2 = {"done": r.get("done", 0), "started": r.get("started", 0)}
    h2["grpc_short"] = 0
    if "succeeded" in r:
        want = r["succeeded"] * reply_bytes
        h2["grpc_short"] = max(0, -(-(want - r.get("data_bytes", 0)) // reply_bytes))
    h2["failed"] = r.get("failed", 0) + r.get("errored", 0) + r.get("timeout", 0) + h2["grpc_short"]
    h2["total"] = h2["done"]
    h2["ok"] = max(0, h2["total"] - h2["failed"])
    h2["rate"] = 100.0 * h2["ok"] / h2["total"] if h2["total"] else None
    h2["unfinished"] = max(0, h2["started"] - h2["done"])
    h2["summary"] = ("%d done, %d succeeded, %d failed, %d errored, %d timeout, %.0f req/s%s"
                     % (r.get("done", 0), r.get("succeeded", 0), r.get("failed", 0),
                        r.get("errored", 0), r.get("timeout", 0), r.get("rps", 0),
                        "; " + h2_note if h2_note else "")) if "done" in r else \
        "printed no result" + ("; " + h2_note if h2_note else "")
    windows, overall = h2load_windows(h2log, ctx.window_s)
    g = ctx.grpc_stats
    ctx.valid_total = h2["total"] + g["total"]
    ctx.valid_ok = h2["ok"] + g["total"] - g["failed"]
    ctx.success_pct = 100.0 * ctx.valid_ok / ctx.valid_total if ctx.valid_total else None

    # ---- verdict
    reasons, flags = [], []
    first = ctx.samples[0]
    last = ctx.samples[-1]
    if died or not alive_end:
        reasons.append("sparkgate (pid %d) exited during the run (status %s)"
                       % (ctx.pid, ctx.sg.proc.poll()))
    elif stop_rc != 0:
        reasons.append("sparkgate did not exit 0 on SIGTERM at the end (status %s)" % stop_rc)
    if ctx.success_pct is None or ctx.success_pct < MIN_SUCCESS_PCT:
        reasons.append("valid load success rate %s %% < %.1f %%"
                       % (fmt(ctx.success_pct, "%.3f"), MIN_SUCCESS_PCT))
    if h2["total"] == 0:
        reasons.append("h2load completed no request (%s)" % h2["summary"])
    if "fds" in first and "fds" in last and last["fds"] > first["fds"] + FD_MARGIN:
        reasons.append("open fds %d at the end, %d at the start (margin %d): a leak?"
                       % (last["fds"], first["fds"], FD_MARGIN))
    san = H.sanitizer_reports("\n".join(ctx.log_lines))
    if san:
        reasons.append("sanitizer report in the proxy's log: %s" % san[0][:200])
    bad = sum(r["mismatches"] for r in ctx.attacks.values())
    if bad:
        flags.append("%d attack runs did not get the expected answer (see Attacks)" % bad)
    if stuck:
        flags.append("%d client threads still running 45 s after the stop" % len(stuck))
    if "stalled" in ctx.settle_note:
        flags.append("after the load: " + ctx.settle_note)
    ss = [s for s in ctx.samples if "rss_kib" in s]
    early = [s for s in ss if s["t"] >= 60 and s["label"] != "end"]
    if early and ss[-1]["label"] == "end" and ss[-1]["rss_kib"] > 1.5 * early[0]["rss_kib"] \
            and ss[-1]["rss_kib"] - early[0]["rss_kib"] > 8 * 1024:
        flags.append("RSS grew from %s MiB (t=%.0fs) to %s MiB at the end"
                     % (mib(early[0]["rss_kib"]), early[0]["t"], mib(ss[-1]["rss_kib"])))
    errs = [l for l in ctx.log_lines if normalize_log(l)[0] == "error"]
    if errs:
        flags.append("%d error-level lines in the proxy's log, first: %s" % (len(errs), errs[0][:200]))

    report = build_report(ctx, h2, h2out, windows, overall, stop_rc, reasons, flags)
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    say("report written to %s" % os.path.relpath(args.report, os.getcwd()))
    return 1 if reasons else 0


def settle(ctx, bound_s):
    """Waits (bounded) until sparkgate has no client connection or stream
    and no upstream connection; says how it went."""
    t = time.monotonic()
    s = {}
    while time.monotonic() - t < bound_s:
        if not ctx.sg.alive():
            return "the proxy is gone"
        s = take_sample(ctx)
        if (s.get("conns_open") == 0 and s.get("streams_open") == 0
                and s.get("upstream_conns") == 0):
            return "quiet after %.1f s" % (time.monotonic() - t)
        time.sleep(0.5)
    return ("stalled: still %s client connections, %s streams, %s upstream connections after "
            "%d s" % (s.get("conns_open"), s.get("streams_open"), s.get("upstream_conns"),
                      bound_s))


def main():
    args = parse_args()
    work = tempfile.mkdtemp(prefix="sparkgate-soak-")
    rc = 2
    try:
        rc = run(args, work)
    except SetupError as e:
        say("error: %s" % e)
        rc = 2
    except KeyboardInterrupt:
        say("interrupted")
        rc = 130
    finally:
        if args.keep or rc == 2:
            say("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
