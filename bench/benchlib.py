#!/usr/bin/python3
"""Helpers for bench/run: payloads, h2load output, Python clients, the tables.

  benchlib.py payloads DIR BULK_BYTES UPLOAD_BYTES
      writes DIR/config.req, DIR/execute.req, DIR/upload.req (gRPC-framed
      Spark Connect requests; upload.req is an AddArtifacts stream of
      UPLOAD_BYTES), the upstream's replies under DIR/docroot/, the JWT
      material (jwt.secret, jwt.token, jwt.bad, es256.key, es256.pub);
      prints the reply sizes as JSON
  benchlib.py result --peer P --scenario S --run N --out H2LOAD_OUT [--log LOG]
                     [--rss-kib N] [--expect-body-bytes N] [--upload-bytes N]
                     [--cpu-s X] [--wall-s X]
      one JSON line describing an h2load run (ok or failed, and why)
  benchlib.py failed --peer P --scenario S --run N --note TEXT
      one JSON line for a run that could not happen
  benchlib.py cpu PID
      CPU seconds used so far by PID and its descendants, all threads
  benchlib.py idle --peer P --run N --port PORT --pid PID --conns N ...
      holds N idle TLS HTTP/2 connections; one JSON line with the proxy's
      RSS per connection
  benchlib.py calls --peer P --run N --port PORT --pid PID --alg A --mode M ...
      unary calls with one reused token or a fresh token per call; one JSON
      line with the proxy's CPU time per call
  benchlib.py callgrind-total FILE
      the total instruction count (Ir) of a callgrind output file
  benchlib.py table RESULTS.jsonl --md OUT.md [--meta TEXT]...
      prints the tables and writes them, with the details, as Markdown
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import ssl
import statistics
import struct
import sys
import time
import uuid
import zlib

SERVICE = "spark.connect.SparkConnectService"


# ---- payloads -------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(num, payload):
    """A length-delimited protobuf field."""
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def vi(num, value):
    """A varint protobuf field."""
    return varint(num << 3 | 0) + varint(value)


def grpc_frame(msg):
    return b"\0" + struct.pack(">I", len(msg)) + msg


def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def hs256_token(secret, claims):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return head + b"." + body + b"." + sig


def bench_claims(iss="bench", **extra):
    now = int(time.time())
    c = {"iss": iss, "aud": "spark-connect", "sub": "anonymous",
         "iat": now, "exp": now + 6 * 3600}
    c.update(extra)
    return c


# PySpark sends artifacts in 32 KiB chunks (pyspark.sql.connect.client.artifact).
ARTIFACT_CHUNK = 32 * 1024


def cmd_payloads(args):
    d = args.dir
    session = str(uuid.uuid4()).encode()
    # UserContext{user_id, user_name} with the identity sparkgate rewrites it
    # to (the tokens' sub): the rewrite then keeps every message's length.
    user = ld(1, b"anonymous") + ld(2, b"anonymous")
    # ConfigRequest{session_id, user_context, operation{get_all{}}, client_type}
    config_req = ld(1, session) + ld(2, user) + ld(3, ld(5, b"")) + ld(4, b"sparkgate-bench")
    # ExecutePlanRequest{session_id, user_context, client_type}: the upstream
    # is a static file server, so the plan itself does not matter.
    execute_req = ld(1, session) + ld(2, user) + ld(4, b"sparkgate-bench")
    write(os.path.join(d, "config.req"), grpc_frame(config_req))
    write(os.path.join(d, "execute.req"), grpc_frame(execute_req))

    # AddArtifactsRequest stream as PySpark uploads a large file: a
    # begin_chunk(4) message, then chunk(5) messages of 32 KiB of data, each
    # with session_id, user_context and client_type(6).
    data = b"\0" * ARTIFACT_CHUNK
    chunk = ld(1, data) + vi(2, zlib.crc32(data))
    head = ld(1, session) + ld(2, user) + ld(6, b"sparkgate-bench")
    probe = grpc_frame(head + ld(5, chunk))
    count = max(2, args.upload_bytes // len(probe))
    first = grpc_frame(head + ld(4, ld(1, b"jars/bench.jar") + vi(2, count * ARTIFACT_CHUNK)
                                 + vi(3, count) + ld(4, chunk)))
    with open(os.path.join(d, "upload.req"), "wb") as f:
        f.write(first)
        left = count - 1
        block = probe * 256
        while left >= 256:
            f.write(block)
            left -= 256
        f.write(probe * left)
    upload_bytes = len(first) + (count - 1) * len(probe)

    # JWT auth is on for sparkgate (and haproxy-jwt), as a deployment runs it:
    # an HS256 provider with one token for every call (sparkgate's
    # verified-token cache is part of what is measured), and an ES256
    # provider for the auth scenario.
    secret = os.urandom(32).hex().encode()
    write(os.path.join(d, "jwt.secret"), secret, 0o600)
    write(os.path.join(d, "jwt.token"), hs256_token(secret, bench_claims()))
    # Signed with another secret: every authenticating proxy must refuse it.
    write(os.path.join(d, "jwt.bad"), hs256_token(os.urandom(32).hex().encode(), bench_claims()))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    write(os.path.join(d, "es256.key"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    write(os.path.join(d, "es256.pub"), key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    svc = os.path.join(d, "docroot", SERVICE)
    os.makedirs(svc, exist_ok=True)
    # ConfigResponse{session_id, pairs{key, value}}
    config_reply = grpc_frame(ld(1, session) + ld(2, ld(1, b"spark.sql.shuffle.partitions") + ld(2, b"200")))
    write(os.path.join(svc, "Config"), config_reply)
    # AddArtifactsResponse{artifacts{name, is_crc_successful}, session_id}
    write(os.path.join(svc, "AddArtifacts"),
          grpc_frame(ld(1, ld(1, b"jars/bench.jar") + vi(2, 1)) + ld(2, session)))

    # ExecutePlanResponse{session_id, arrow_batch{row_count, data}} messages
    # of about 64 KiB each, as a result stream is made of.
    body = b"\0" * (64 * 1024 - 64)
    msg = ld(1, session) + ld(2, vi(1, 1024) + ld(2, body))
    frame = grpc_frame(msg)
    count = max(1, args.bulk_bytes // len(frame))
    with open(os.path.join(svc, "ExecutePlan"), "wb") as f:
        block = frame * 256
        left = count
        while left >= 256:
            f.write(block)
            left -= 256
        f.write(frame * left)
    print(json.dumps({"config_reply_bytes": len(config_reply),
                      "execute_reply_bytes": len(frame) * count,
                      "upload_bytes": upload_bytes}))


# ---- h2load output ----------------------------------------------------------

UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def to_us(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * UNIT_US[m.group(2)] if m else None


def parse_h2load(text):
    r = {}
    m = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", text)
    if m:
        r["elapsed_s"] = float(m.group(1)) * UNIT_US[m.group(2)] / 1e6
        r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    if m:
        for k, v in zip(("total", "started", "done", "succeeded", "failed", "errored",
                         "timeout"), m.groups()):
            r[k] = int(v)
    # What TLS the peer negotiated with h2load: every TLS peer must show
    # the same, or the comparison is of ciphers and protocol versions.
    proto = re.search(r"^TLS Protocol: (\S+)", text, re.M)
    cipher = re.search(r"^Cipher: (\S+)", text, re.M)
    if proto and cipher:
        r["tls"] = "%s %s" % (proto.group(1), cipher.group(1))
    m = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?, .*?\((\d+)\) data", text)
    if m:
        r["data_bytes"] = int(m.group(3))
    for name, key in (("time for connect", "connect"), ("time to 1st byte", "ttfb"),
                      ("time for request", "request")):
        m = re.search(re.escape(name) + r":\s+(\S+)\s+(\S+)\s+(\S+)", text)
        if m:
            r[key + "_min_us"] = to_us(m.group(1))
            r[key + "_max_us"] = to_us(m.group(2))
            r[key + "_mean_us"] = to_us(m.group(3))
    return r


def percentiles(log_path):
    """p50/p99 in ms of the per-request times of `h2load --log-file`
    (tab-separated: start time in us, status, duration in us)."""
    durations = []
    try:
        with open(log_path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split("\t")
                # Answered calls only: a 403 or 503 is no latency of the job.
                if len(parts) >= 3 and parts[1].strip().isdigit() and \
                        200 <= int(parts[1]) < 300:
                    durations.append(int(parts[2]))
    except OSError:
        return {}
    if not durations:
        return {}
    durations.sort()

    def pct(p):
        return durations[min(len(durations) - 1, int(p / 100.0 * len(durations)))] / 1000.0

    return {"p50_ms": pct(50), "p99_ms": pct(99), "samples": len(durations)}


def cmd_result(args):
    try:
        with open(args.out, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        text = ""
        args.note = (args.note or "") + " no h2load output: %s" % e
    r = {"peer": args.peer, "scenario": args.scenario, "run": args.run}
    r.update(parse_h2load(text))
    if args.log:
        r.update(percentiles(args.log))
    if args.rss_kib:
        r["rss_kib"] = args.rss_kib
    fatal, warnings = [], []
    if "succeeded" not in r:
        fatal.append("h2load printed no result (timed out or could not connect)")
    elif r["succeeded"] == 0:
        fatal.append("0 of %d requests succeeded" % r.get("total", 0))
    else:
        # h2load: errored is part of failed, timeout part of errored.
        bad = r["failed"]
        if bad:
            # A handful of failures in a timed run (streams cut at the end)
            # is noted; more than 1% makes the figures meaningless.
            (fatal if bad * 100 > r["done"] else warnings).append(
                "%d of %d requests failed" % (bad, r["done"]))
        # h2load counts any HTTP 200 as success; a gRPC error made by the
        # proxy is a 200 without the upstream's body.
        warm = re.search(r"with (\d+(?:\.\d+)?)s of warm-up time", text)
        if args.expect_body_bytes and warm and float(warm.group(1)) > 0:
            # Its byte count spans the warm-up too: replies without a body
            # in the measured period would not show.
            fatal.append("h2load ran with --warm-up-time: its byte count cannot "
                         "show replies without a body (run the warm-up separately)")
        elif args.expect_body_bytes:
            want = r["succeeded"] * args.expect_body_bytes
            if r.get("data_bytes", 0) < want:
                fatal.append("got %d response bytes, expected %d (a proxy-made gRPC error?)"
                             % (r.get("data_bytes", 0), want))
    if args.note:
        fatal.append(args.note.strip())
    r["ok"] = not fatal
    if fatal or warnings:
        r["note"] = "; ".join(fatal + warnings)
    # Bulk figures use h2load's time for the request (first byte sent to
    # last byte received), which leaves out the TCP and TLS handshakes.
    req_s = (r.get("request_mean_us") or 0) / 1e6 or r.get("elapsed_s")
    if r.get("scenario") == "download" and req_s:
        r["mbps"] = r.get("data_bytes", 0) / req_s / 1e6
    if r.get("scenario") == "upload" and req_s:
        r["mbps"] = args.upload_bytes * r.get("succeeded", 0) / req_s / 1e6
    if r.get("scenario") == "conns" and r.get("elapsed_s"):
        r["conn_per_s"] = r.get("succeeded", 0) / r["elapsed_s"]
    if args.cpu_s is not None and args.wall_s:
        r["proxy_cpu_s"] = args.cpu_s
        r["proxy_cores"] = args.cpu_s / args.wall_s
        # Per call (connection): the CPU read must span the whole h2load run
        # whose calls it is divided by.
        if r.get("elapsed_s") and args.wall_s < 0.98 * r["elapsed_s"]:
            fatal.append("the proxy's CPU was read over %.2f s of h2load's %.2f s"
                         % (args.wall_s, r["elapsed_s"]))
            r["ok"] = False
            r["note"] = "; ".join(fatal + warnings)
        if r.get("scenario") == "conns" and r.get("succeeded"):
            r["cpu_us_per_conn"] = args.cpu_s / r["succeeded"] * 1e6
        if r.get("scenario") in ("unary", "scaling") and r.get("done"):
            r["cpu_us_per_call"] = args.cpu_s / r["done"] * 1e6
    # How busy the core of the load generator and the upstream was over the
    # same period: near 1, the figure is that core's limit, not the proxy's.
    if args.load_core:
        (b0, t0), (b1, t1) = (tuple(int(x) for x in v.split(":"))
                              for v in args.load_core.split(","))
        if t1 > t0:
            r["load_core_busy"] = (b1 - b0) / (t1 - t0)
    print(json.dumps(r))


# with_peer's labels that stand for several scenarios of the tables.
SCENARIO_GROUPS = {
    "bulk": ("download", "upload"),
    "auth": ("auth-hs256-reused", "auth-hs256-fresh", "auth-es256-reused", "auth-es256-fresh"),
}


def cmd_failed(args):
    for scen in SCENARIO_GROUPS.get(args.scenario, (args.scenario,)):
        print(json.dumps({"peer": args.peer, "scenario": scen, "run": args.run,
                          "ok": False, "note": args.note}))


# ---- the proxy's processes: CPU and memory ------------------------------------

def tree(pid):
    """pid and all its descendants (from /proc/*/stat)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """CPU time of pid's tree, all threads: se.sum_exec_runtime (ns
    resolution) where the kernel has it, else utime+stime (1/CLK_TCK)."""
    total = 0.0
    for p in tree(pid):
        try:
            tids = os.listdir("/proc/%d/task" % p)
        except OSError:
            continue
        for t in tids:
            base = "/proc/%d/task/%s/" % (p, t)
            try:
                with open(base + "sched", encoding="ascii", errors="replace") as f:
                    m = re.search(r"se\.sum_exec_runtime\s*:\s*([\d.]+)", f.read())
                if m:
                    total += float(m.group(1)) / 1e3
                    continue
            except OSError:
                pass
            try:
                with open(base + "stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
                fields = stat[stat.rindex(")") + 2:].split()
                total += (int(fields[11]) + int(fields[12])) / TICK
            except (OSError, ValueError, IndexError):
                pass
    return total


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/status" % p, encoding="ascii", errors="replace") as f:
                m = re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)
            if m:
                total += int(m.group(1))
        except OSError:
            pass
    return total


def cmd_cpu(args):
    print("%.6f" % cpu_seconds(args.pid))


# ---- Python HTTP/2 clients (idle connections, per-call tokens) -----------------

def client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Conn:
    """One client connection: asyncio streams + an h2 state machine."""

    def __init__(self, reader, writer):
        import h2.config
        import h2.connection
        self.r, self.w = reader, writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.ended = {}      # stream id -> grpc-status (bytes) or None
        self.settings_acked = False
        self.remote_settings = False

    async def pump(self):
        """Reads once and handles the events; False at EOF."""
        import h2.events as ev
        data = await self.r.read(65536)
        if not data:
            return False
        for e in self.h2.receive_data(data):
            if isinstance(e, ev.RemoteSettingsChanged):
                self.remote_settings = True
            elif isinstance(e, ev.SettingsAcknowledged):
                self.settings_acked = True
            elif isinstance(e, ev.DataReceived):
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, (ev.ResponseReceived, ev.TrailersReceived)):
                for k, v in e.headers:
                    if k == b"grpc-status":
                        self.ended[e.stream_id] = v
                    elif k == b":status" and v != b"200":
                        self.ended[e.stream_id] = b"http " + v
            elif isinstance(e, ev.StreamEnded):
                self.ended.setdefault(e.stream_id, None)
            elif isinstance(e, ev.StreamReset):
                self.ended[e.stream_id] = b"reset"
            elif isinstance(e, ev.ConnectionTerminated):
                return False
        self.flush()
        return True

    def flush(self):
        out = self.h2.data_to_send()
        if out:
            self.w.write(out)

    def start_call(self, port, token, body):
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"https"),
            (b":authority", b"127.0.0.1:%d" % port),
            (b":path", b"/%s/Config" % SERVICE.encode()),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            # h2 sends authorization never-indexed: every call carries the
            # whole token, reused or not, as gRPC clients' HPACK mostly does.
            (b"authorization", b"Bearer " + token)])
        self.h2.send_data(sid, body, end_stream=True)
        return sid


async def connect(port, ctx, timeout):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
        timeout)
    c = Conn(reader, writer)
    c.h2.initiate_connection()
    c.flush()
    deadline = time.monotonic() + timeout
    while not (c.remote_settings and c.settings_acked):
        left = deadline - time.monotonic()
        if left <= 0 or not await asyncio.wait_for(c.pump(), left):
            raise ConnectionError("no SETTINGS exchange")
    return c


async def run_calls(c, port, tokens, body, timeout):
    """Calls one after the other in batches of len(tokens[i]) concurrent
    streams; returns (ok, failed-statuses)."""
    ok, bad = 0, []
    deadline = time.monotonic() + timeout
    for batch in tokens:
        sids = [c.start_call(port, t, body) for t in batch]
        c.flush()
        while not all(s in c.ended for s in sids):
            left = deadline - time.monotonic()
            if left <= 0 or not await asyncio.wait_for(c.pump(), left):
                return ok, bad + ["connection closed or timed out"]
        for s in sids:
            st = c.ended.pop(s)
            if st == b"0":
                ok += 1
            else:
                bad.append(st)
    return ok, bad


def read(path):
    with open(path, "rb") as f:
        return f.read()


async def idle_main(args):
    ctx = client_context()
    body = read(args.body)
    token = read(args.token).strip()
    sem = asyncio.Semaphore(args.parallel)
    conns, errors = [], []

    async def one():
        async with sem:
            try:
                conns.append(await connect(args.port, ctx, 30))
            except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError) as e:
                errors.append(type(e).__name__ + ": " + str(e))

    await asyncio.sleep(args.settle)
    before = rss_kib(args.pid)
    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.conns)))
    open_s = time.monotonic() - t0
    tls = None
    if conns:
        so = conns[0].w.get_extra_info("ssl_object")
        if so is not None:
            tls = "%s %s" % (so.version(), so.cipher()[0])
    await asyncio.sleep(args.settle)
    after_settings = rss_kib(args.pid)

    calls_ok, call_errors = 0, []

    async def calls(c, batches, timeout):
        nonlocal calls_ok
        async with sem:
            try:
                n, bad = await run_calls(c, args.port, batches, body, timeout)
                calls_ok += n
                call_errors.extend(bad)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                call_errors.append(type(e).__name__)

    await asyncio.gather(*(calls(c, [[token]], 30) for c in conns))
    await asyncio.sleep(args.settle)
    after_call = rss_kib(args.pid)

    # Then some connections work for a while: what a gateway's idle
    # connections cost once their notebooks have run queries. One call at
    # a time per connection, as many connections at once as in the 1-call
    # phase: the process-wide caches (free lists, pools), which the 1-call
    # phase already grew for that many calls in flight, have no reason to
    # grow again and be counted per connection.
    busy = conns[:min(args.busy_conns, len(conns))]
    batches = [[token] for _ in range(max(args.busy_calls, 1))]
    await asyncio.gather(*(calls(c, batches, 60) for c in busy))
    await asyncio.sleep(args.settle)
    after_busy = rss_kib(args.pid)
    # Still open? A proxy that dropped idle connections would look cheap.
    alive = 0

    async def ping(c):
        nonlocal alive
        try:
            c.h2.ping(b"12345678")
            c.flush()
            if await asyncio.wait_for(c.pump(), 10):
                alive += 1
        except Exception:  # pylint: disable=broad-except
            pass  # h2 refuses to ping a terminated connection: not alive

    await asyncio.gather(*(ping(c) for c in conns))
    for c in conns:
        c.w.close()
    n = len(conns)
    r = {"peer": args.peer, "scenario": "idle", "run": args.run, "conns": n,
         "open_s": open_s, "rss_before_kib": before, "rss_settings_kib": after_settings,
         "rss_call_kib": after_call, "rss_busy_kib": after_busy, "busy_conns": len(busy),
         "busy_calls": len(batches), "calls_ok": calls_ok, "alive": alive}
    if tls:
        r["tls"] = tls
    notes = []
    if errors:
        notes.append("%d of %d connections failed (%s)" % (len(errors), args.conns, errors[0]))
    if call_errors:
        notes.append("%d calls failed (%s)" % (len(call_errors), call_errors[0]))
    if alive < n:
        notes.append("%d of %d connections closed while idle" % (n - alive, n))
    if n:
        r["kib_per_conn_settings"] = (after_settings - before) / n
        r["kib_per_conn_call"] = (after_call - before) / n
    if busy:
        # What the busy connections grew by, on top of what each cost after
        # its one call.
        r["kib_per_conn_busy"] = r["kib_per_conn_call"] + (after_busy - after_call) / len(busy)
    r["ok"] = n == args.conns and not call_errors and alive == n
    if notes:
        r["note"] = "; ".join(notes)
    print(json.dumps(r))


def cmd_idle(args):
    asyncio.run(idle_main(args))


def make_tokens(args, count):
    if args.alg == "HS256":
        secret = read(args.secret)
        sign = lambda claims: hs256_token(secret, claims)
        iss = "bench"
    else:
        import jwt
        key = read(args.key)
        sign = lambda claims: jwt.encode(claims, key, algorithm="ES256").encode()
        iss = "bench-es"
    if args.mode == "reused":
        t = sign(bench_claims(iss, jti=str(uuid.uuid4())))
        return [t] * count
    # A jti makes every token distinct (and every token the same length).
    return [sign(bench_claims(iss, jti=str(uuid.uuid4()))) for _ in range(count)]


async def calls_main(args):
    ctx = client_context()
    body = read(args.body)
    per = args.calls // args.conns
    warm = args.warmup // args.conns
    tokens = make_tokens(args, (per + warm) * args.conns)
    conns = [await connect(args.port, ctx, 30) for _ in range(args.conns)]

    def batches(ts):
        return [ts[i:i + args.depth] for i in range(0, len(ts), args.depth)]

    async def phase(offset, n):
        res = await asyncio.gather(*(
            run_calls(c, args.port, batches(tokens[offset + i * n:offset + (i + 1) * n]),
                      body, args.timeout)
            for i, c in enumerate(conns)))
        return sum(r[0] for r in res), [b for r in res for b in r[1]]

    # Warm-up with the same kind of tokens: connections to the upstream made,
    # the reused token cached, buffers grown.
    w_ok, w_bad = await phase(per * args.conns, warm)
    cpu0, t0 = cpu_seconds(args.pid), time.monotonic()
    ok, bad = await phase(0, per)
    wall, cpu = time.monotonic() - t0, cpu_seconds(args.pid) - cpu0
    for c in conns:
        c.w.close()
    r = {"peer": args.peer, "scenario": "auth-%s-%s" % (args.alg.lower(), args.mode),
         "run": args.run, "calls": per * args.conns, "calls_ok": ok, "wall_s": wall,
         "cpu_s": cpu, "client_rps": ok / wall if wall else 0}
    if ok:
        r["cpu_us_per_call"] = cpu / ok * 1e6
    r["ok"] = ok == per * args.conns and not bad and not w_bad
    if bad or w_bad:
        r["note"] = "%d calls failed (%s)" % (len(bad) + len(w_bad), (bad + w_bad)[0])
    print(json.dumps(r))


def cmd_calls(args):
    asyncio.run(calls_main(args))


def cmd_callgrind_total(args):
    total = None
    with open(args.file, encoding="ascii", errors="replace") as f:
        for line in f:
            m = re.match(r"(summary|totals):\s+(\d+)", line)
            if m:
                total = int(m.group(2))
    if total is None:
        sys.exit("no summary line in %s" % args.file)
    print(total)


# ---- tables -----------------------------------------------------------------------

# (title, scenario, key, higher_is_better, format)
MAIN = [
    ("unary req/s", "unary", "rps", True, "{:.0f}"),
    ("unary p50 ms", "unary", "p50_ms", False, "{:.2f}"),
    ("unary p99 ms", "unary", "p99_ms", False, "{:.2f}"),
    ("unary CPU µs/call", "unary", "cpu_us_per_call", False, "{:.1f}"),
    ("download MB/s", "download", "mbps", True, "{:.0f}"),
    ("upload MB/s", "upload", "mbps", True, "{:.0f}"),
    ("new TLS conns/s", "conns", "conn_per_s", True, "{:.0f}"),
    ("CPU µs/new conn", "conns", "cpu_us_per_conn", False, "{:.0f}"),
    ("idle KiB/conn", "idle", "kib_per_conn_settings", False, "{:.1f}"),
    ("idle KiB/conn, 1 call", "idle", "kib_per_conn_call", False, "{:.1f}"),
    ("idle KiB/conn, 100 calls", "idle", "kib_per_conn_busy", False, "{:.1f}"),
]
BASELINE = "direct"
BASELINES = ("direct", "direct-tls")
OURS = ("sparkgate",)


def load(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


class Results:
    def __init__(self, rows):
        self.rows = rows
        self.order = []
        for r in rows:
            if r["peer"] not in self.order:
                self.order.append(r["peer"])

    def values(self, peer, scen, key):
        return [r[key] for r in self.rows
                if r["peer"] == peer and r["scenario"] == scen and r.get("ok")
                and r.get(key) is not None]

    def runs(self, peer, scen):
        return [r for r in self.rows if r["peer"] == peer and r["scenario"] == scen]

    def runs_of(self, peer):
        return [r for r in self.rows if r["peer"] == peer]

    def median(self, peer, scen, key):
        v = self.values(peer, scen, key)
        return statistics.median(v) if v else None

    def cell(self, peer, scen, key, fmt):
        """median, and min–max when there are several runs; or why not."""
        runs = self.runs(peer, scen)
        if not runs:
            return "-"
        v = self.values(peer, scen, key)
        if not v:
            return "failed" if any(not r.get("ok") for r in runs) else "-"
        text = fmt.format(statistics.median(v))
        if len(v) > 1:
            text += " (%s–%s)" % (fmt.format(min(v)), fmt.format(max(v)))
        failed = len(runs) - len(v)
        if failed:
            text += " [%d failed]" % failed
        return text

    def best_peer(self, scen, key, higher):
        """(peer, median) of the best proxy that is neither the baseline nor ours."""
        best = None
        for p in self.order:
            if p in BASELINES or p in OURS:
                continue
            m = self.median(p, scen, key)
            if m is None:
                continue
            if best is None or (m > best[1] if higher else m < best[1]):
                best = (p, m)
        return best


def md_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + \
        [line(r) for r in rows]


def ratio(a, b):
    return "%.2f×" % (a / b) if a is not None and b else "-"


def main_tables(res):
    out = []
    cols = [c for c in MAIN if any(r["scenario"] == c[1] for r in res.rows)]
    peers = [p for p in res.order if any(r["scenario"] in {c[1] for c in MAIN}
                                         for r in res.runs_of(p))] if cols else []
    if not cols or not peers:
        return out
    rss = {}
    for r in res.rows:
        if r.get("rss_kib") and r["scenario"] in {c[1] for c in MAIN}:
            rss[r["peer"]] = max(rss.get(r["peer"], 0), r["rss_kib"])
    header = ["peer"] + [c[0] for c in cols] + ["peak RSS MiB"]
    rows = [[p] + [res.cell(p, s, k, f) for _, s, k, _, f in cols]
            + ["%.1f" % (rss[p] / 1024.0) if p in rss else "-"] for p in peers]
    out += ["### Figures", "",
            "Median over the runs, (min–max) when there were several.", ""]
    out += md_table(header, rows)

    bests = {(s, k): res.best_peer(s, k, hi) for _, s, k, hi, _ in cols}
    header = ["peer"] + [c[0] for c in cols]
    rows = []
    for p in peers:
        if p == BASELINE:
            continue
        cells = [p]
        for _, s, k, _, _ in cols:
            m = res.median(p, s, k)
            d = res.median(BASELINE, s, k)
            b = bests[(s, k)]
            if m is None:
                cells.append("-")
            else:
                cells.append("%s / %s" % (ratio(m, d), ratio(m, b[1] if b else None)))
        rows.append(cells)
    out += ["", "### Ratios", "",
            "Each cell: median ÷ `direct`'s median / median ÷ the best peer's median "
            "(best of the proxies other than sparkgate, baselines left out; for latencies, CPU and KiB "
            "the lowest is best, so there a ratio under 1 is better). Best peer per column: "
            + ", ".join("%s %s" % (c[0], bests[(c[1], c[2])][0] if bests[(c[1], c[2])] else "-")
                        for c in cols) + ".", ""]
    out += md_table(header, rows)
    return out


def cores_table(res):
    """How busy each of the two cores was: a figure is the proxy's limit
    only while the load's core had time to spare."""
    scens = [s for s in ("unary", "download", "upload", "conns")
             if any(r["scenario"] == s and "load_core_busy" in r for r in res.rows)]
    if not scens:
        return []
    peers = [p for p in res.order if any(res.values(p, s, "load_core_busy") for s in scens)]
    pct = "{:.0%}"
    rows = [[p] + ["%s / %s" % (res.cell(p, s, "proxy_cores", pct) if res.values(p, s, "proxy_cores")
                                else "-", res.cell(p, s, "load_core_busy", pct))
                   for s in scens] for p in peers]
    return ["", "### Which core was the limit", "",
            "Each cell: the proxy's CPU time ÷ wall time (its core) / how busy the "
            "other core was (h2load, or the Python client, and the upstream; from "
            "`/proc/stat`, softirq included: loopback TCP is processed there), over "
            "the same period. A proxy near 100% was the limit; with the load's core "
            "near 100% instead, the figure is what the load generator and the "
            "upstream could do, and a faster proxy would not show.", ""] + \
        md_table(["peer"] + scens, rows)


def target_table(res):
    rows = []

    def add(what, value, target, met):
        rows.append([what, value, target,
                     "-" if met is None else ("met" if met else "**not met**")])

    def cores(peer, scen):
        pc = res.median(peer, scen, "proxy_cores")
        lc = res.median(peer, scen, "load_core_busy")
        if lc is None:
            return ""
        return " (cores busy: %sload %.0f%%)" % (
            "" if pc is None else "proxy %.0f%%, " % (100 * pc), 100 * lc)

    for ours in [p for p in OURS if p in res.order]:
        m = res.median(ours, "unary", "rps")
        b = res.best_peer("unary", "rps", True)
        if m is not None and b:
            add("unary req/s, JWT on, vs best peer (%s)" % b[0],
                "%.2f×%s" % (m / b[1], cores(ours, "unary")), "≥ 1.20×", m / b[1] >= 1.2)
        m = res.median(ours, "unary", "p99_ms")
        b = res.best_peer("unary", "p99_ms", False)
        if m is not None and b:
            add("unary p99 vs best peer (%s)" % b[0], "%.2f ms vs %.2f ms" % (m, b[1]),
                "≤", m <= b[1])
        for scen in ("download", "upload"):
            m = res.median(ours, scen, "mbps")
            d = res.median(BASELINE, scen, "mbps")
            if m is not None and d:
                # `direct` is the ceiling only when it ran at least as fast
                # as every TLS peer; a slow one (its file read from the disk
                # before bench/run warmed the page cache) read as "met".
                faster = [(p, v) for p, v in ((p, res.median(p, scen, "mbps"))
                                              for p in res.order if p != BASELINE)
                          if v is not None and v > d]
                value = "%.0f%%%s" % (100 * m / d, cores(ours, scen))
                if faster:
                    p, v = max(faster, key=lambda pv: pv[1])
                    add("%s MB/s vs direct" % scen,
                        "%s; no verdict: direct (%.0f MB/s) ran below %s (%.0f), "
                        "so it was no ceiling in this run" % (value, d, p, v),
                        "≥ 90%", None)
                else:
                    add("%s MB/s vs direct" % scen, value, "≥ 90%", m / d >= 0.9)
        for key, what in (("kib_per_conn_settings", "idle TLS h2 conn"),
                          ("kib_per_conn_call", "idle TLS h2 conn after 1 call"),
                          ("kib_per_conn_busy", "idle TLS h2 conn after 100 calls")):
            m = res.median(ours, "idle", key)
            b = res.best_peer("idle", key, False)
            if m is not None and b:
                add("%s RSS vs best peer (%s)" % (what, b[0]),
                    "%.1f vs %.1f KiB" % (m, b[1]), "≤", m <= b[1])
        one = res.median("sparkgate-1w", "scaling", "rps")
        two = res.median("sparkgate-2w", "scaling", "rps")
        if one and two:
            add("2 workers vs 1 worker, unary (2 shared cores, see Scaling)",
                "%.2f×" % (two / one), "≥ 1.70×", two / one >= 1.7)
    if not rows:
        return []
    return ["", "### Against the targets of issue 8", ""] + \
        md_table(["target", "measured", "wanted", ""], rows)


def auth_table(res):
    scen = sorted({r["scenario"] for r in res.rows if r["scenario"].startswith("auth-")})
    if not scen:
        return []
    peers = [p for p in res.order if any(r["peer"] == p for r in res.rows
                                         if r["scenario"].startswith("auth-"))]
    algs = sorted({s.split("-")[1] for s in scen}, key=lambda a: (a != "hs256", a))
    rows = []
    for p in peers:
        for a in algs:
            reused = res.median(p, "auth-%s-reused" % a, "cpu_us_per_call")
            fresh = res.median(p, "auth-%s-fresh" % a, "cpu_us_per_call")
            rows.append([p, a.upper(),
                         res.cell(p, "auth-%s-reused" % a, "cpu_us_per_call", "{:.1f}"),
                         res.cell(p, "auth-%s-fresh" % a, "cpu_us_per_call", "{:.1f}"),
                         "%.1f" % (fresh - reused) if fresh is not None and reused is not None
                         else "-",
                         res.cell(p, "auth-%s-reused" % a, "client_rps", "{:.0f}")])
    return ["", "### Authentication cost per call", "",
            "Proxy CPU time (all its threads and processes) per unary call, µs, "
            "with one token reused for every call or a fresh token (distinct `jti`) "
            "per call; median (min–max). The client is Python (h2), so the call "
            "rate is the client's, not the proxy's limit.", ""] + \
        md_table(["peer", "alg", "CPU µs/call, reused token", "CPU µs/call, fresh token",
                  "fresh − reused µs", "calls/s (client-bound)"], rows)


def scaling_table(res):
    peers = [p for p in ("sparkgate-1w", "sparkgate-2w") if res.runs(p, "scaling")]
    if not peers:
        return []
    for r in res.rows:
        if r["scenario"] == "scaling" and r.get("ok") and r.get("proxy_cores"):
            r["rps_per_core"] = r["rps"] / r["proxy_cores"]
    rows = [[p, res.cell(p, "scaling", "rps", "{:.0f}"), res.cell(p, "scaling", "p99_ms", "{:.2f}"),
             res.cell(p, "scaling", "proxy_cores", "{:.2f}"),
             res.cell(p, "scaling", "rps_per_core", "{:.0f}")] for p in peers]
    one = res.median("sparkgate-1w", "scaling", "rps")
    two = res.median("sparkgate-2w", "scaling", "rps")
    out = ["", "### Scaling: 1 worker vs 2 workers", "",
           "Unary load as above; sparkgate, h2load and the upstream all share CPUs 0–1 "
           "(no core to itself): the ratio is bounded by what the load generator and "
           "the upstream take from the same two cores. `proxy cores` is sparkgate's CPU "
           "time ÷ wall time over h2load's measured period; `req/s per proxy core` is "
           "req/s ÷ proxy cores: when it holds with 2 workers, the workers do not slow "
           "each other down, and the second core is what limits.", ""]
    out += md_table(["sparkgate", "unary req/s", "p99 ms", "proxy cores",
                     "req/s per proxy core"], rows)
    if one and two:
        out += ["", "2 workers ÷ 1 worker: **%.2f×**" % (two / one)]
    # What two shared cores allow at best: each call costs the proxy 1/e
    # core-seconds and the load generator plus upstream at least 1/d (d:
    # `direct`'s req/s on its one core, h2c, so a low estimate of the load's
    # cost), and one worker can use one core at most.
    d = res.median(BASELINE, "unary", "rps")
    e = res.median("sparkgate-1w", "scaling", "rps_per_core")
    if d and e and one:
        both = 2.0 / (1.0 / d + 1.0 / e)
        out += ["", "Ceiling on this machine: with every call costing sparkgate 1/%.0f "
                "core-seconds and the load generator and upstream at least 1/%.0f (`direct`'s "
                "unary req/s), two cores carry at most %.0f req/s, so 2 workers ÷ 1 worker "
                "(%.0f req/s) can reach at most **%.2f×** here, whatever the proxy does."
                % (e, d, both, one, both / one)]
    return out


def callgrind_table(res):
    rows = [r for r in res.rows if r["scenario"].startswith("callgrind")]
    if not rows:
        return []
    t = []
    for r in rows:
        if r.get("ok"):
            t.append([r["scenario"].split("-", 1)[1], "%d" % r["calls_lo"], "%d" % r["calls_hi"],
                      "{:,}".format(r["ir_lo"]), "{:,}".format(r["ir_hi"]),
                      "**{:,.0f}**".format(r["ir_per_call"])])
        else:
            t.append([r["scenario"].split("-", 1)[1], "-", "-", "-", "-",
                      "failed: %s" % r.get("note", "")])
    return ["", "### Instructions per unary RPC (callgrind)", "",
            "sparkgate under `valgrind --tool=callgrind` (1 worker, JWT on, one token "
            "reused, access log off), h2load sending unary Config calls over 10 "
            "connections × 10 streams; (Ir of the longer run − Ir of the shorter) ÷ "
            "(the difference in calls), so start-up, connections and shutdown cancel out.",
            ""] + md_table(["front end", "calls A", "calls B", "Ir A", "Ir B", "Ir per call"], t)


def tls_lines(res):
    """What each peer negotiated (h2load's TLS runs, the idle client's
    connections), and a warning when the TLS peers differ."""
    seen = {}
    for r in res.rows:
        if r.get("tls"):
            seen.setdefault(r["peer"], set()).add(r["tls"])
    if not seen:
        return []
    cells = ["%s %s" % (p, " / ".join(sorted(seen[p]))) for p in res.order if p in seen]
    out = ["", "TLS negotiated: " + "; ".join(cells) + "."]
    kinds = {t for p, ts in seen.items() if p not in BASELINES for t in ts}
    if len(kinds) > 1:
        out.append("**Warning: the proxies did not all negotiate the same TLS version and "
                   "cipher: figures that involve TLS compare unlike work.**")
    return out


def cmd_table(args):
    res = Results(load(args.results))
    out = tls_lines(res) + main_tables(res) + cores_table(res) + target_table(res) + auth_table(res) + scaling_table(res) + \
        callgrind_table(res)
    notes = ["- %s / %s / run %s: %s" % (r["peer"], r["scenario"], r.get("run", "?"), r["note"])
             for r in res.rows if r.get("note")]
    print("\n".join(out))
    if notes:
        print("\nnotes:\n" + "\n".join(notes))
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write("# sparkgate benchmark\n\n")
            for m in args.meta or []:
                f.write("- %s\n" % m)
            f.write("\n`direct` is h2load straight to the upstream (h2c, no TLS, no proxy); "
                    "`direct-tls` straight to a twin of the upstream serving TLS itself, "
                    "pinned as the proxies are: what TLS costs without a proxy hop (nghttpd's "
                    "TLS path is no fast bulk server, so its MB/s are no ceiling; its CPU "
                    "figures are nghttpd's). "
                    "For req/s, MB/s and conns/s higher is better; for latencies, CPU "
                    "and KiB lower is better. Peak RSS is VmHWM of the proxy's processes, the "
                    "highest over the scenarios of the main table. See docs/performance.md "
                    "for what each figure is.\n\n")
            f.write("\n".join(out) + "\n")
            if notes:
                f.write("\n### Notes\n\n" + "\n".join(notes) + "\n")
            f.write("\n### Raw results\n\n```\n")
            for r in res.rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.write("```\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("payloads")
    p.add_argument("dir")
    p.add_argument("bulk_bytes", type=int)
    p.add_argument("upload_bytes", type=int)
    p.set_defaults(fn=cmd_payloads)
    p = sub.add_parser("result")
    p.add_argument("--peer", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--log")
    p.add_argument("--rss-kib", type=int, default=0)
    p.add_argument("--expect-body-bytes", type=int, default=0)
    p.add_argument("--upload-bytes", type=int, default=0)
    p.add_argument("--cpu-s", type=float)
    p.add_argument("--wall-s", type=float)
    p.add_argument("--load-core", help="BUSY:TOTAL,BUSY:TOTAL jiffies of the load's CPU "
                   "at the start and the end (bench/run's core_jiffies)")
    p.add_argument("--note")
    p.set_defaults(fn=cmd_result)
    p = sub.add_parser("failed")
    p.add_argument("--peer", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--note", required=True)
    p.set_defaults(fn=cmd_failed)
    p = sub.add_parser("cpu")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_cpu)
    p = sub.add_parser("idle")
    p.add_argument("--peer", required=True)
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--parallel", type=int, default=50,
                   help="handshakes (and calls) in flight at once")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--busy-conns", type=int, default=100,
                   help="connections that then make --busy-calls more calls")
    p.add_argument("--busy-calls", type=int, default=100,
                   help="one after the other on each connection")
    p.add_argument("--token", required=True)
    p.add_argument("--body", required=True)
    p.set_defaults(fn=cmd_idle)
    p = sub.add_parser("calls")
    p.add_argument("--peer", required=True)
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--alg", choices=("HS256", "ES256"), required=True)
    p.add_argument("--mode", choices=("reused", "fresh"), required=True)
    p.add_argument("--secret")
    p.add_argument("--key")
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--body", required=True)
    p.set_defaults(fn=cmd_calls)
    p = sub.add_parser("callgrind-total")
    p.add_argument("file")
    p.set_defaults(fn=cmd_callgrind_total)
    p = sub.add_parser("table")
    p.add_argument("results")
    p.add_argument("--md")
    p.add_argument("--meta", action="append")
    p.set_defaults(fn=cmd_table)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
