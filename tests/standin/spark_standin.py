#!/usr/bin/python3
"""A stand-in Spark Connect server for sparkgate's tests and demo.

It speaks gRPC with Debian's python3-grpcio and no generated code: every
message is raw bytes (identity serializers), and what it does is chosen per
call by request metadata, so one server can play every part a test needs.

Method kinds, by path:
  /spark.connect.SparkConnectService/ExecutePlan, .../ReattachExecute
                                         server-streaming
  /spark.connect.SparkConnectService/AddArtifacts   client-streaming
  /spark.connect.SparkConnectService/TestBidi       bidi (test only)
  anything else (any path at all)                   unary
The request header `x-standin-kind: unary|server|client|bidi` overrides that.

Request metadata (all optional):
  x-standin-mode      echo (default) | stream | fail | trailers-only |
                      stall | reset
  x-standin-count     echo: server-streaming replies with this many messages
                      (default 3); fail/stall/reset: messages sent first
                      (default 0)
  x-standin-bytes     stream: total response bytes (default 1 MiB)
  x-standin-chunk     stream: bytes per message (default 64 KiB)
  x-standin-seed      stream: seed of the pseudo-random bytes (default 0)
  x-standin-code      fail/trailers-only: grpc status code, number or name
                      (default 13 INTERNAL / 9 FAILED_PRECONDITION)
  x-standin-message   fail/trailers-only: grpc-message text (ASCII)
  x-standin-message-bin  the same as UTF-8 bytes (for non-ASCII messages)
  x-standin-details-bin  fail/trailers-only: sent as grpc-status-details-bin
  x-standin-delay-ms  sleep before the first response (any mode)
  x-standin-interval-ms  sleep between streamed messages
  x-standin-stall-ms  stall: give up after this long (default 60000)
Any other request header whose name ends in `-bin` is echoed back in the
trailers, byte for byte (in every mode).

Replies:
  echo    unary: the request bytes. server-streaming: message i is
          i.to_bytes(4, 'big') + request. bidi: each request message is sent
          back as soon as it arrives. client-streaming: the upload summary.
  upload summary (client-streaming, every non-failing mode): JSON bytes
          {"messages": n, "bytes": total, "sha256": hex} and the same in
          trailers x-standin-received-bytes / x-standin-received-sha256.
  stream  x-standin-bytes of stream_bytes(seed, total, chunk), in messages
          of x-standin-chunk bytes; trailer x-standin-sha256 is their sha256
          (unary: one message of the whole total).
  fail    initial metadata, then x-standin-count messages (streaming kinds),
          then the status with its trailers.
  trailers-only  the status right away, before any header or message: gRPC
          core answers with one HEADERS frame carrying END_STREAM.
  stall   initial metadata and x-standin-count messages, then waits until the
          client goes away; the call record's `cancelled` turns true.
  reset   x-standin-count messages, then the TCP connection the call came
          on is aborted (no trailers, no GOAWAY; the peer sees EOF/RST).

Every call is recorded (CallRecord) in a thread-safe list; see StandIn.
With StandIn.record_raw set (off by default), each record also keeps every
request message exactly as it arrived, before unwrapping (raw_requests).

As a script:
  /usr/bin/python3 spark_standin.py --port 15002 [--host 127.0.0.1]
      [--tls-cert C --tls-key K [--tls-client-ca CA]]
prints `standin listening on HOST:PORT` and serves until SIGTERM/SIGINT.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "lib"))
import spark_proto  # noqa: E402

SERVICE_PREFIX = "/spark.connect.SparkConnectService/"
SERVER_STREAMING = {"ExecutePlan", "ReattachExecute"}
CLIENT_STREAMING = {"AddArtifacts"}
BIDI = {"TestBidi"}
# Spark Connect has no bidi method; forwarding tests use this one.
TEST_PREFIX = "/sparkgate.test.Echo/"
BIDI_PATH = TEST_PREFIX + "Bidi"

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
    # Cancels from a proxy must not be hidden behind keepalive policing.
    ("grpc.http2.max_pings_without_data", 0),
]

MIB = 1024 * 1024

# How long a finished request stream is watched for a late cancel (see
# StandIn._check_request_end).
CANCEL_GRACE_S = 0.2


def stream_bytes(seed, total, chunk):
    """Yields the deterministic pseudo-random messages of `stream` mode."""
    rng = random.Random(seed)
    left = total
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def stream_sha256(seed, total, chunk):
    h = hashlib.sha256()
    for part in stream_bytes(seed, total, chunk):
        h.update(part)
    return h.hexdigest()


def _parse_peer(peer):
    """("ipv4"|"ipv6", address, port) from a gRPC peer string."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    return kind, host.strip("[]"), int(port)


def _proc_net_addr(hexaddr, family):
    addr, port = hexaddr.split(":")
    raw = bytes.fromhex(addr)
    # /proc/net/tcp* prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw), int(port, 16)


def _socket_fd_for_peer(peer, local_port):
    """The fd in this process of the TCP connection from |peer| to
    |local_port|, or None."""
    try:
        kind, host, port = _parse_peer(peer)
    except ValueError:
        return None
    want = socket.inet_ntop(*((socket.AF_INET6, socket.inet_pton(socket.AF_INET6, host))
                              if ":" in host else
                              (socket.AF_INET, socket.inet_pton(socket.AF_INET, host))))
    inode = None
    for path, fam in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    laddr, lport = _proc_net_addr(cols[1], fam)
                    raddr, rport = _proc_net_addr(cols[2], fam)
                    if lport != local_port or rport != port:
                        continue
                    if raddr.startswith("::ffff:"):
                        raddr = raddr[7:]
                    if raddr == want:
                        inode = cols[9]
                        break
        except OSError:
            continue
        if inode:
            break
    if not inode:
        return None
    target = "socket:[%s]" % inode
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name) == target:
                return int(name)
        except OSError:
            continue
    return None


def method_kind(method, metadata=None):
    """unary | server | client | bidi for a path (and optional override)."""
    if metadata:
        kind = metadata.get("x-standin-kind")
        if kind in ("unary", "server", "client", "bidi"):
            return kind
    if method == BIDI_PATH:
        return "bidi"
    if method.startswith(SERVICE_PREFIX):
        name = method[len(SERVICE_PREFIX):]
        if name in SERVER_STREAMING:
            return "server"
        if name in CLIENT_STREAMING:
            return "client"
        if name in BIDI:
            return "bidi"
    return "unary"


def parse_code(text, default):
    if text is None or text == "":
        return default
    try:
        num = int(text)
    except ValueError:
        return grpc.StatusCode[text.upper()]
    for code in grpc.StatusCode:
        if code.value[0] == num:
            return code
    raise ValueError("unknown grpc status code %r" % text)


class CallRecord:
    """What the stand-in saw of one call. Fields are updated as it runs;
    read them under StandIn.lock or through StandIn's helpers."""

    def __init__(self, method, kind, metadata, peer):
        self.method = method
        self.kind = kind
        self.metadata = metadata      # list of (key, value); -bin values are bytes
        self.peer = peer              # e.g. "ipv4:127.0.0.1:40000"
        self.mode = dict(metadata).get("x-standin-mode", "echo")
        self.messages = 0             # request messages received
        self.bytes = 0                # request bytes received
        self._hash = hashlib.sha256()
        self.sha256 = self._hash.hexdigest()
        self.request_done = False     # the request stream was fully read
        self.responses = 0            # response messages handed to grpc
        self.response_bytes = 0
        self.completed = False        # the handler finished on its own
        self.terminated = False       # grpc reported the call over
        self.cancelled = False        # the call ended before the handler did
        self.status = None            # grpc.StatusCode the handler chose
        # Request messages as they came on the wire, before spark_proto
        # unwrapping; filled only when StandIn.record_raw is set.
        self.raw_requests = []
        self.started = time.monotonic()
        self.ended = None

    def header(self, key, default=None):
        for k, v in self.metadata:
            if k == key:
                return v
        return default

    def _add(self, msg):
        self.messages += 1
        self.bytes += len(msg)
        self._hash.update(msg)
        self.sha256 = self._hash.hexdigest()

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self):
        return ("CallRecord(%s kind=%s mode=%s msgs=%d bytes=%d done=%s "
                "cancelled=%s status=%s peer=%s)" % (
                    self.method, self.kind, self.mode, self.messages,
                    self.bytes, self.completed, self.cancelled, self.status,
                    self.peer))


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, standin):
        self._s = standin

    def service(self, handler_call_details):
        md = {}
        for k, v in handler_call_details.invocation_metadata or ():
            md.setdefault(k, v)
        method = handler_call_details.method
        kind = method_kind(method, md)
        s = self._s
        # Requests made by tests/lib/spark_proto.request() arrive as the
        # payload the test wrapped; anything else as it came.
        des = spark_proto.unwrap
        raws = [] if s.record_raw else None
        if raws is not None:
            # Keeps what came on the wire, in order (the deserializer runs
            # once per message, before the handler sees it).
            def des(data, _raws=raws):
                _raws.append(bytes(data))
                return spark_proto.unwrap(data)
        if kind == "unary":
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: s._unary(method, req, ctx, raws), request_deserializer=des)
        if kind == "server":
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: s._server_stream(method, req, ctx, raws),
                request_deserializer=des)
        if kind == "client":
            return grpc.stream_unary_rpc_method_handler(
                lambda it, ctx: s._client_stream(method, it, ctx, raws),
                request_deserializer=des)
        return grpc.stream_stream_rpc_method_handler(
            lambda it, ctx: s._bidi(method, it, ctx, raws), request_deserializer=des)


class _Cancelled(Exception):
    pass


class StandIn:
    """The server. start() binds (port 0: the kernel chooses; see .port),
    calls() / wait_for() read the records, stop() ends it."""

    def __init__(self, host="127.0.0.1", port=0, tls_cert=None, tls_key=None,
                 tls_client_ca=None, max_workers=256):
        self.host = host
        self.requested_port = port
        self.port = None
        self._tls = None
        if tls_cert:
            with open(tls_cert, "rb") as f:
                cert = f.read()
            with open(tls_key, "rb") as f:
                key = f.read()
            ca = None
            if tls_client_ca:
                with open(tls_client_ca, "rb") as f:
                    ca = f.read()
            self._tls = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca,
                require_client_auth=ca is not None)
        self.lock = threading.Condition()
        self._records = []
        self._max_workers = max_workers
        self._server = None
        self.in_flight = 0
        self.max_in_flight = 0
        # Set to keep each call's raw request messages (CallRecord.raw_requests).
        self.record_raw = False

    # -- lifecycle ---------------------------------------------------------
    def start(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="standin")
        self._server = grpc.server(self._pool, handlers=[_Handler(self)],
                                   options=GRPC_OPTIONS)
        host = self.host
        bind_host = "[%s]" % host if ":" in host and not host.startswith("[") else host
        addr = "%s:%d" % (bind_host, self.requested_port)
        if self._tls:
            self.port = self._server.add_secure_port(addr, self._tls)
        else:
            self.port = self._server.add_insecure_port(addr)
        if not self.port:
            raise RuntimeError("standin: cannot bind %s" % addr)
        self._server.start()
        return self

    def stop(self, grace=0.5):
        if self._server is not None:
            self._server.stop(grace).wait(10)
            self._server = None
            self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    # -- records -----------------------------------------------------------
    def calls(self, method=None):
        with self.lock:
            return [r for r in self._records if method is None or r.method == method]

    def clear(self):
        with self.lock:
            self._records = []

    def wait_for(self, predicate, timeout=10.0):
        """Waits until predicate(list of records) is truthy; returns its value
        or raises TimeoutError (with the records) after |timeout| seconds."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate(list(self._records))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("standin: condition not met in %.1fs; "
                                       "calls: %r" % (timeout, self._records))
                self.lock.wait(min(left, 0.1))

    def wait_for_call(self, method=None, timeout=10.0, where=None):
        """The first record for |method| for which where(record) holds."""
        def pred(records):
            for r in records:
                if (method is None or r.method == method) and (where is None or where(r)):
                    return r
            return None
        return self.wait_for(pred, timeout)

    def _update(self, fn, *args):
        with self.lock:
            fn(*args)
            self.lock.notify_all()

    # -- call plumbing -----------------------------------------------------
    def _begin(self, method, kind, ctx, raws=None):
        md = list(ctx.invocation_metadata() or ())
        rec = CallRecord(method, kind, md, ctx.peer())
        if raws is not None:
            rec.raw_requests = raws

        def on_end():
            def mark():
                rec.terminated = True
                rec.ended = time.monotonic()
                if not rec.completed:
                    rec.cancelled = True
            self._update(mark)

        with self.lock:
            self._records.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.lock.notify_all()
        if not ctx.add_callback(on_end):
            on_end()
        return rec

    def _finish(self, rec, status=grpc.StatusCode.OK):
        def mark():
            rec.completed = True
            rec.status = status
            self.in_flight -= 1
        self._update(mark)

    def _abandon(self, rec):
        def mark():
            self.in_flight -= 1
            if not rec.completed:
                rec.cancelled = True
        self._update(mark)

    def _received(self, rec, msg):
        self._update(rec._add, msg)

    def _request_done(self, rec):
        def mark():
            rec.request_done = True
        self._update(mark)

    def _sent(self, rec, msg):
        def mark():
            rec.responses += 1
            rec.response_bytes += len(msg)
        self._update(mark)

    @staticmethod
    def _opts(ctx):
        md = {}
        for k, v in ctx.invocation_metadata() or ():
            md.setdefault(k, v)
        return md

    @staticmethod
    def _echo_bin(md_list):
        return [(k, v) for k, v in md_list
                if k.endswith("-bin") and not k.startswith("x-standin-")
                and k != "grpc-status-details-bin"]

    @staticmethod
    def _int(md, key, default):
        v = md.get(key)
        return int(v) if v not in (None, "") else default

    def _sleep_ms(self, ctx, ms):
        """Sleeps, waking early (and raising) if the client went away."""
        deadline = time.monotonic() + ms / 1000.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not ctx.is_active():
                raise _Cancelled()
            time.sleep(min(left, 0.02))

    def _trailers(self, ctx, extra=()):
        md = self._echo_bin(list(ctx.invocation_metadata() or ())) + list(extra)
        if md:
            ctx.set_trailing_metadata(tuple(md))

    def _fail(self, rec, ctx, opts, default_code):
        code = parse_code(opts.get("x-standin-code"), default_code)
        message = opts.get("x-standin-message", "standin failure")
        if "x-standin-message-bin" in opts:
            message = opts["x-standin-message-bin"].decode("utf-8")
        extra = []
        details = opts.get("x-standin-details-bin")
        if details is not None:
            extra.append(("grpc-status-details-bin", details))
        self._trailers(ctx, extra)
        self._finish(rec, code)
        ctx.abort(code, message)

    def _stall(self, rec, ctx, opts):
        limit = self._int(opts, "x-standin-stall-ms", 60000) / 1000.0
        deadline = time.monotonic() + limit
        while ctx.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not ctx.is_active():
            raise _Cancelled()
        # Nobody cancelled: end the call so it does not hang a test forever.
        self._finish(rec, grpc.StatusCode.DEADLINE_EXCEEDED)
        ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "standin: stall limit reached")

    def _reset(self, rec, ctx):
        """Aborts the TCP connection the call came on, as a crashing server
        would: no trailers, no GOAWAY, no RST_STREAM. gRPC core has no API
        for that, so the socket is found through /proc and shut down under
        it, with SO_LINGER 0 so that gRPC's own close() then sends a TCP RST."""
        self._finish(rec, "reset")
        fd = _socket_fd_for_peer(ctx.peer(), self.port)
        if fd is None:
            ctx.cancel()  # cannot find it: at least end the stream early
            return
        try:
            dup = socket.socket(fileno=os.dup(fd))
            try:
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                               struct.pack("ii", 1, 0))
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()
        except OSError:
            ctx.cancel()
        # Wait (bounded) for gRPC to notice, so nothing more goes out.
        deadline = time.monotonic() + 5
        while ctx.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _upload_reply(self, rec, ctx):
        summary = {"messages": rec.messages, "bytes": rec.bytes, "sha256": rec.sha256}
        self._trailers(ctx, [("x-standin-received-bytes", str(rec.bytes)),
                             ("x-standin-received-sha256", rec.sha256)])
        return json.dumps(summary).encode()

    def _stream_params(self, opts):
        return (self._int(opts, "x-standin-seed", 0),
                self._int(opts, "x-standin-bytes", MIB),
                max(1, self._int(opts, "x-standin-chunk", 64 * 1024)))

    # The four handler shapes. Each catches _Cancelled (client went away) and
    # leaves the record marked cancelled.
    def _unary(self, method, req, ctx, raws=None):
        rec = self._begin(method, "unary", ctx, raws)
        try:
            self._received(rec, req)
            self._request_done(rec)
            opts = self._opts(ctx)
            mode = opts.get("x-standin-mode", "echo")
            self._sleep_ms(ctx, self._int(opts, "x-standin-delay-ms", 0))
            if mode == "trailers-only":
                self._fail(rec, ctx, opts, grpc.StatusCode.FAILED_PRECONDITION)
            if mode == "fail":
                ctx.send_initial_metadata(())
                self._fail(rec, ctx, opts, grpc.StatusCode.INTERNAL)
            if mode == "stall":
                ctx.send_initial_metadata(())
                self._stall(rec, ctx, opts)
            if mode == "reset":
                self._reset(rec, ctx)
                return b""
            if mode == "stream":
                seed, total, chunk = self._stream_params(opts)
                body = b"".join(stream_bytes(seed, total, chunk))
                self._trailers(ctx, [("x-standin-sha256", hashlib.sha256(body).hexdigest())])
            else:
                body = req
                self._trailers(ctx)
            self._sent(rec, body)
            self._finish(rec)
            return body
        except _Cancelled:
            self._abandon(rec)
            return b""

    def _server_stream(self, method, req, ctx, raws=None):
        rec = self._begin(method, "server", ctx, raws)
        try:
            self._received(rec, req)
            self._request_done(rec)
            opts = self._opts(ctx)
            mode = opts.get("x-standin-mode", "echo")
            interval = self._int(opts, "x-standin-interval-ms", 0)
            self._sleep_ms(ctx, self._int(opts, "x-standin-delay-ms", 0))
            if mode == "trailers-only":
                self._fail(rec, ctx, opts, grpc.StatusCode.FAILED_PRECONDITION)
            if mode == "stream":
                seed, total, chunk = self._stream_params(opts)
                h = hashlib.sha256()
                first = True
                for part in stream_bytes(seed, total, chunk):
                    if not first and interval:
                        self._sleep_ms(ctx, interval)
                    first = False
                    if not ctx.is_active():
                        raise _Cancelled()
                    h.update(part)
                    yield part
                    self._sent(rec, part)
                self._trailers(ctx, [("x-standin-sha256", h.hexdigest())])
                self._finish(rec)
                return
            default_count = 3 if mode == "echo" else 0
            count = self._int(opts, "x-standin-count", default_count)
            if mode in ("fail", "stall"):
                ctx.send_initial_metadata(())
            for i in range(count):
                if i and interval:
                    self._sleep_ms(ctx, interval)
                msg = i.to_bytes(4, "big") + req if mode == "echo" else b"standin %d" % i
                if not ctx.is_active():
                    raise _Cancelled()
                yield msg
                self._sent(rec, msg)
            if mode == "fail":
                self._fail(rec, ctx, opts, grpc.StatusCode.INTERNAL)
            if mode == "stall":
                self._stall(rec, ctx, opts)
            if mode == "reset":
                self._reset(rec, ctx)
                return
            self._trailers(ctx)
            self._finish(rec)
        except (_Cancelled, GeneratorExit):
            self._abandon(rec)

    def _check_request_end(self, ctx):
        """Called when a request stream ended without error. grpcio ends the
        iterator cleanly when RST_STREAM arrives and only marks the call
        cancelled when the close event is processed a moment later, so a
        cancel can look like a half-close: give it CANCEL_GRACE_S to show."""
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline:
            if not ctx.is_active():
                raise _Cancelled()
            time.sleep(0.005)

    def _drain(self, rec, it, ctx, on_message=None):
        try:
            for msg in it:
                self._received(rec, msg)
                if on_message is not None:
                    on_message(msg)
        except grpc.RpcError:
            raise _Cancelled()
        self._check_request_end(ctx)
        self._request_done(rec)

    def _client_stream(self, method, it, ctx, raws=None):
        rec = self._begin(method, "client", ctx, raws)
        try:
            opts = self._opts(ctx)
            mode = opts.get("x-standin-mode", "echo")
            if mode == "trailers-only":
                self._sleep_ms(ctx, self._int(opts, "x-standin-delay-ms", 0))
                self._fail(rec, ctx, opts, grpc.StatusCode.FAILED_PRECONDITION)
            if mode == "stall":
                ctx.send_initial_metadata(())
                self._stall(rec, ctx, opts)
            self._drain(rec, it, ctx)
            self._sleep_ms(ctx, self._int(opts, "x-standin-delay-ms", 0))
            if mode == "fail":
                ctx.send_initial_metadata(())
                self._fail(rec, ctx, opts, grpc.StatusCode.INTERNAL)
            if mode == "reset":
                self._reset(rec, ctx)
                return b""
            body = self._upload_reply(rec, ctx)
            self._sent(rec, body)
            self._finish(rec)
            return body
        except _Cancelled:
            self._abandon(rec)
            return b""

    def _bidi(self, method, it, ctx, raws=None):
        rec = self._begin(method, "bidi", ctx, raws)
        try:
            opts = self._opts(ctx)
            mode = opts.get("x-standin-mode", "echo")
            interval = self._int(opts, "x-standin-interval-ms", 0)
            self._sleep_ms(ctx, self._int(opts, "x-standin-delay-ms", 0))
            if mode == "trailers-only":
                self._fail(rec, ctx, opts, grpc.StatusCode.FAILED_PRECONDITION)
            if mode == "echo":
                try:
                    for msg in it:
                        self._received(rec, msg)
                        yield msg
                        self._sent(rec, msg)
                except grpc.RpcError:
                    raise _Cancelled()
                self._check_request_end(ctx)
                self._request_done(rec)
                self._trailers(ctx)
                self._finish(rec)
                return
            # Other modes ignore what the client sends while they reply, so
            # the request stream is read on the side.
            reader = threading.Thread(target=self._side_drain, args=(rec, it, ctx),
                                      daemon=True)
            reader.start()
            if mode == "stream":
                seed, total, chunk = self._stream_params(opts)
                h = hashlib.sha256()
                for i, part in enumerate(stream_bytes(seed, total, chunk)):
                    if i and interval:
                        self._sleep_ms(ctx, interval)
                    h.update(part)
                    yield part
                    self._sent(rec, part)
                self._trailers(ctx, [("x-standin-sha256", h.hexdigest())])
                self._finish(rec)
                return
            ctx.send_initial_metadata(())
            for i in range(self._int(opts, "x-standin-count", 0)):
                if i and interval:
                    self._sleep_ms(ctx, interval)
                msg = b"standin %d" % i
                yield msg
                self._sent(rec, msg)
            if mode == "fail":
                self._fail(rec, ctx, opts, grpc.StatusCode.INTERNAL)
            if mode == "stall":
                self._stall(rec, ctx, opts)
            if mode == "reset":
                self._reset(rec, ctx)
                return
            self._finish(rec)
        except (_Cancelled, GeneratorExit):
            self._abandon(rec)

    def _side_drain(self, rec, it, ctx):
        try:
            self._drain(rec, it, ctx)
        except Exception:  # the call ended under us: the record says so
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(description="stand-in Spark Connect server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=15002)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--tls-client-ca", help="require client certificates from this CA")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = StandIn(args.host, args.port, args.tls_cert, args.tls_key,
                     args.tls_client_ca).start()
    host = "[%s]" % args.host if ":" in args.host else args.host
    print("standin listening on %s:%d" % (host, server.port), flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
