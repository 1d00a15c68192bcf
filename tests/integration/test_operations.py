#!/usr/bin/python3
"""Operations (issue 6), end to end against the real binary: the admin
listener (/healthz, /readyz, /metrics, 404, 405), the Prometheus counters
after known traffic, the JSON access log (fields, no tokens, SIGUSR1
reopen), sd_notify (READY / RELOADING / STOPPING to a datagram socket the
test owns), reload accounting (good and broken SIGHUP) and the drain
(/readyz 503 while a call in flight finishes, exit 0).

Counters are checked as exact deltas between two scrapes. A scrape may miss
the last increments a worker made an instant ago (documented), so the
second scrape is polled, bounded, until the expected counts are reached and
then compared for equality: a counter that moves too far fails.

Names of metrics and labels come from docs/operations.md and src/metrics.c
(src/observe.c for the reason lists); nothing here is guessed.
"""

import http.client
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import grpc  # noqa: E402
import jwt as pyjwt  # noqa: E402
import spark_proto  # noqa: E402

SERVICE = H.SERVICE
ISSUER = "https://idp-ops.test"
AUD = "spark"
TENANT_HDR = "x-spark-tenant"
DEFAULT_MD = [(TENANT_HDR, "default")]

ADMIN_RE = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
ACCESS_KEYS = ["time", "conn_id", "stream_id", "client", "identity", "tenant", "method",
               "session_id", "backend", "grpc_status", "bytes_in", "bytes_out",
               "duration_ms"]
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CLIENT_RE = re.compile(r"^127\.0\.0\.1:\d+$")
# From src/observe.c (sg_tls_failure_reasons, sg_auth_failure_reasons) plus
# the "other" the metrics module appends.
TLS_REASONS = ["timeout", "no_alpn_h2", "certificate_verify_failed", "protocol", "closed",
               "other"]
AUTH_REASONS = ["no_credentials", "jwt_invalid", "jwt_required", "cert_required",
                "no_cert_identity", "token_not_bound", "bound_token_no_cert",
                "token_cert_mismatch", "duplicate_authorization", "internal", "other"]
WAIT = 10.0  # bound of every poll


# ---------------------------------------------------------------------------
# Prometheus text format 0.0.4

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _parse_labels(text, i, line):
    """Parses `{a="x",b="y"}` starting at text[i] == '{'; returns (dict, next i)."""
    labels = {}
    i += 1
    while True:
        if text[i] == "}":
            return labels, i + 1
        m = _LABEL_RE.match(text, i)
        if not m or text[m.end():m.end() + 2] != '="':
            raise ValueError("bad label in %r" % line)
        name, i = m.group(0), m.end() + 2
        value = []
        while True:
            c = text[i]
            if c == "\\":
                nxt = text[i + 1]
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt))
                if value[-1] is None:
                    raise ValueError("bad escape in %r" % line)
                i += 2
            elif c == '"':
                i += 1
                break
            elif c == "\n":
                raise ValueError("newline in label value: %r" % line)
            else:
                value.append(c)
                i += 1
        if name in labels:
            raise ValueError("label %s twice in %r" % (name, line))
        labels[name] = "".join(value)
        if text[i] == ",":
            i += 1
        elif text[i] != "}":
            raise ValueError("expected , or } in %r" % line)


def parse_prometheus(text):
    """{(name, frozenset(labels.items())): float}; raises ValueError on any
    line that is not a comment, a blank or a well-formed sample, on a sample
    given twice and on a sample whose family has no # TYPE."""
    samples, types = {}, {}
    for line in text.split("\n"):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = _NAME_RE.match(line)
        if not m:
            raise ValueError("bad sample line %r" % line)
        name, i = m.group(0), m.end()
        labels = {}
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i, line)
        rest = line[i:].split()
        if len(rest) not in (1, 2) or line[i] not in " \t":
            raise ValueError("bad sample line %r" % line)
        value = float(rest[0])
        key = (name, frozenset(labels.items()))
        if key in samples:
            raise ValueError("sample given twice: %r" % line)
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[:-len(suffix)]) == "histogram":
                family = name[:-len(suffix)]
        if family not in types:
            raise ValueError("sample without # TYPE for its family: %r" % line)
        samples[key] = value
    return samples


def sample(samples, name, **labels):
    """The value of one series; 0 when absent (counters appear at first use)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples, name):
    """{frozenset(labels): value} of every series of |name|."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


# ---------------------------------------------------------------------------
# Admin HTTP

def http_get(port, path, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        c.close()


def admin_port(sg):
    return int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))


# ---------------------------------------------------------------------------
# sd_notify

class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.received = []  # every message, as a dict of its KEY=value lines

    def close(self):
        self.sock.close()

    def _recv(self, timeout):
        self.sock.settimeout(max(timeout, 0.01))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return None
        msg = {}
        for line in data.decode().split("\n"):
            if line:
                k, _, v = line.partition("=")
                msg[k] = v
        self.received.append(msg)
        return msg

    def collect_until(self, done, timeout=WAIT):
        """Receives messages until done(list of messages so far) is true;
        returns that list, or raises AssertionError after |timeout|."""
        got = []
        deadline = time.monotonic() + timeout
        while not done(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("sd_notify: condition not met within %.0fs; got %r"
                                     % (timeout, got))
            msg = self._recv(left)
            if msg is not None:
                got.append(msg)
        return got

    def drain(self):
        """Everything already queued, without waiting for more."""
        got = []
        while True:
            msg = self._recv(0.01)
            if msg is None:
                return got
            got.append(msg)


def state_messages(msgs):
    """READY/RELOADING/STOPPING in order, without the STATUS= ones."""
    out = []
    for m in msgs:
        for k in ("READY", "RELOADING", "STOPPING"):
            if m.get(k) == "1":
                out.append(k)
    return out


# ---------------------------------------------------------------------------
# Access log

def read_access_log(path, offset=0):
    """Every complete line of the file from byte |offset| on, parsed
    (AssertionError on a line that is not a JSON object). A missing file is
    an empty log."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n")[:-1]:  # the last piece is "" or a partial line
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError as e:
            raise AssertionError("access log line is not JSON (%s): %r" % (e, raw))
        if not isinstance(obj, dict):
            raise AssertionError("access log line is not an object: %r" % raw)
        out.append(obj)
    return out


def access_log_size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def wait_access(path, pred, n=1, timeout=WAIT, offset=0):
    """The lines of |path| (from byte |offset|) matching pred once there are
    at least |n|."""
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in read_access_log(path, offset) if pred(r)]
        if len(got) >= n:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError("access log %s: %d matching lines within %.0fs, want %d; "
                                 "log:\n%s" % (path, len(got), timeout, n,
                                               "\n".join(json.dumps(r) for r in
                                                         read_access_log(path))))
        time.sleep(0.02)


def assert_record_shape(tc, rec):
    """Every documented key, in the documented order, `reason` the only
    optional one; the types the documentation gives."""
    keys = list(rec)
    want = ACCESS_KEYS + (["reason"] if "reason" in rec else [])
    tc.assertEqual(keys, want, rec)
    tc.assertRegex(rec["time"], TIME_RE)
    for k in ("conn_id", "stream_id", "bytes_in", "bytes_out"):
        tc.assertIsInstance(rec[k], int, (k, rec))
        tc.assertNotIsInstance(rec[k], bool, (k, rec))
        tc.assertGreaterEqual(rec[k], 0, (k, rec))
    tc.assertIsInstance(rec["client"], str, rec)
    tc.assertIsInstance(rec["method"], str, rec)
    for k in ("identity", "tenant", "session_id", "backend"):
        tc.assertTrue(rec[k] is None or isinstance(rec[k], str), (k, rec))
    tc.assertTrue(rec["grpc_status"] is None or isinstance(rec["grpc_status"], int), rec)
    tc.assertIsInstance(rec["duration_ms"], (int, float), rec)
    tc.assertGreaterEqual(rec["duration_ms"], 0, rec)
    if "reason" in rec:
        tc.assertIsInstance(rec["reason"], str, rec)


# ---------------------------------------------------------------------------
# Config and calls

def hmac_provider(secret_file):
    return {"name": "corp-hmac", "issuer": ISSUER, "audiences": [AUD],
            "keys": [{"alg": "HS256", "secret_file": secret_file}]}


def mint(secret, sub="alice", lifetime=600):
    now = int(time.time())
    tok = pyjwt.encode({"iss": ISSUER, "sub": sub, "aud": AUD, "iat": now,
                        "exp": now + lifetime}, secret, algorithm="HS256")
    return tok if isinstance(tok, str) else tok.decode()


def wire_in(payload):
    """Request DATA payload of one unary Spark call carrying |payload|: the
    5-byte gRPC prefix and the Spark request message call_unary sends."""
    return 5 + len(spark_proto.request(payload))


def wire_out(payload):
    """Response DATA payload of the stand-in's unary echo of |payload|."""
    return 5 + len(payload)


class OpsCase(H.SparkgateTestCase):
    sg = None

    def setUp(self):
        super().setUp()
        if self.sg is not None:
            self._started.append(self.sg)  # its log is printed on failure

    def scrape(self, port=None):
        status, headers, body = http_get(port or self.admin, "/metrics")
        self.assertEqual(status, 200, body)
        try:
            return parse_prometheus(body.decode("utf-8"))
        except ValueError as e:
            self.fail("/metrics is not valid Prometheus text: %s\n%s" % (e, body.decode()))

    def scrape_until(self, pred, what, port=None, timeout=WAIT):
        """Scrapes until pred(samples); returns the samples (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.scrape(port)
            if pred(s):
                return s
            if time.monotonic() >= deadline:
                self.fail("/metrics: %s not reached within %.0fs" % (what, timeout))
            time.sleep(0.05)


# ---------------------------------------------------------------------------

class OperationsTest(OpsCase):
    """One sparkgate for the class: TLS listener "public" (auth none) and
    "jwt" (JWT only), tenants "default" (the stand-in) and "dead" (a port
    nothing listens on), chosen by the x-spark-tenant header; admin on port
    0; access log to a file."""

    @classmethod
    def setUpClass(cls):
        cls.dir = H.tempdir("sg-ops-")
        cls.secret = secrets.token_hex(24).encode()
        secret_file = os.path.join(cls.dir, "hmac.key")
        with open(secret_file, "wb") as f:
            f.write(cls.secret + b"\n")
        cls.access_path = os.path.join(cls.dir, "access.log")
        cls.up = H.start_standin()
        cls.dead_port = H.free_port()
        cfg = H.base_config(
            cls.up.port,
            listeners=[H.tls_listener("public"),
                       H.tls_listener("jwt", auth={"methods": ["jwt"]})],
            auth={"jwt_providers": [hmac_provider(secret_file)]},
            admin={"address": "127.0.0.1", "port": 0},
            access_log={"path": cls.access_path},
            tenant_selectors=["header:" + TENANT_HDR])
        cfg["tenants"].append({
            "name": "dead", "allow": {"any_identity": True}, "user_id": "off",
            "backends": [{"name": "down-1", "address": "127.0.0.1", "port": cls.dead_port}]})
        cls.sg = H.Sparkgate(cfg).start()
        cls.admin = admin_port(cls.sg)

    @classmethod
    def tearDownClass(cls):
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def channel(self, listener="public"):
        ch = H.tls_channel(self.sg.port(listener))
        self.addCleanup(ch.close)
        return ch

    def access_since(self, pred, n=1, offset=0):
        return wait_access(self.access_path, pred, n, offset=offset)

    @staticmethod
    def unique_session():
        return str(uuid.uuid4())

    # -- admin endpoints -------------------------------------------------------
    def test_admin_endpoints(self):
        status, _, body = http_get(self.admin, "/healthz")
        self.assertEqual((status, body.strip()), (200, b"ok"))
        status, _, body = http_get(self.admin, "/readyz")
        self.assertEqual((status, body.strip()), (200, b"ready"))
        for path in ("/", "/nope", "/metrics/extra", "/healthzz"):
            status, _, body = http_get(self.admin, path)
            self.assertEqual(status, 404, (path, body))
        status, headers, _ = http_get(self.admin, "/healthz", method="POST")
        self.assertEqual(status, 405)
        self.assertEqual(headers.get("allow"), "GET, HEAD", headers)
        status, headers, body = http_get(self.admin, "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("content-type"),
                         "text/plain; version=0.0.4; charset=utf-8", headers)
        s = parse_prometheus(body.decode("utf-8"))
        self.assertEqual(len(series(s, "sparkgate_build_info")), 1, body)
        self.assertEqual(list(series(s, "sparkgate_build_info").values()), [1.0])
        # The fixed reason lists are rendered whole, from the first scrape.
        self.assertEqual(
            sorted(dict(k)["reason"] for k in series(s, "sparkgate_tls_handshake_failures_total")),
            sorted(TLS_REASONS))
        self.assertEqual(
            sorted(dict(k)["reason"] for k in series(s, "sparkgate_auth_failures_total")),
            sorted(AUTH_REASONS))
        for name in ("process_start_time_seconds", "process_open_fds",
                     "sparkgate_connections_accepted_total", "sparkgate_connections_open",
                     "sparkgate_streams_open"):
            self.assertIn((name, frozenset()), s, name)

    # -- metrics after known traffic ------------------------------------------
    def test_rpc_metrics_move_exactly(self):
        T = dict(tenant="default", method="Config")
        # Connections of earlier tests are closed by their clients; wait
        # until sparkgate has closed them too, so the gauge moves by ours only.
        before = self.scrape_until(lambda s: sample(s, "sparkgate_connections_open") == 0,
                                   "no client connection open before the test")
        n_channels = 3
        chans = [H.tls_channel(self.sg.port("public")) for _ in range(n_channels)]
        try:
            ok_payloads = [b"ok-%d" % i + b"x" * (i * 7) for i in range(5)]
            bytes_in = bytes_out = 0
            for i, p in enumerate(ok_payloads):
                r = H.call_unary(chans[i % n_channels], "Config", p, DEFAULT_MD)
                self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, p), r)
                bytes_in += wire_in(p)
                bytes_out += wire_out(p)
            for i in range(2):
                p = b"fail-%d" % i
                r = H.call_unary(chans[i % n_channels], "Config", p,
                                 DEFAULT_MD + H.standin_md("fail", code=7))
                self.assertEqual(r.code, grpc.StatusCode.PERMISSION_DENIED, r)
                bytes_in += wire_in(p)

            def d(s, name, **labels):
                return sample(s, name, **labels) - sample(before, name, **labels)

            after = self.scrape_until(
                lambda s: (d(s, "sparkgate_rpcs_total", grpc_status="0", **T) >= 5
                           and d(s, "sparkgate_rpcs_total", grpc_status="7", **T) >= 2
                           and d(s, "sparkgate_rpc_duration_seconds_count", **T) >= 7
                           and d(s, "sparkgate_request_bytes_total", tenant="default")
                           >= bytes_in),
                "5 OK + 2 failed Config calls counted")
            for code in range(17):
                want = {0: 5, 7: 2}.get(code, 0)
                self.assertEqual(d(after, "sparkgate_rpcs_total", grpc_status=str(code), **T),
                                 want, "grpc_status %d" % code)
            self.assertEqual(d(after, "sparkgate_rpc_duration_seconds_count", **T), 7)
            self.assertEqual(d(after, "sparkgate_rpc_duration_seconds_bucket", le="+Inf", **T),
                             7)
            self.assertGreaterEqual(d(after, "sparkgate_rpc_duration_seconds_sum", **T), 0)
            # Buckets are cumulative and end at the count.
            buckets = sorted(((float(dict(k)["le"]), v) for k, v in
                              series(after, "sparkgate_rpc_duration_seconds_bucket").items()
                              if dict(k)["tenant"] == "default"
                              and dict(k)["method"] == "Config"), key=lambda x: x[0])
            self.assertEqual(len(buckets), 16, buckets)
            self.assertEqual([b for b, _ in buckets][:15],
                             [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                              300, 1800])
            vals = [v for _, v in buckets]
            self.assertEqual(vals, sorted(vals), buckets)
            self.assertEqual(vals[-1], sample(after, "sparkgate_rpc_duration_seconds_count", **T))
            # Bytes: the DATA payloads, exactly.
            self.assertEqual(d(after, "sparkgate_request_bytes_total", tenant="default"),
                             bytes_in)
            self.assertEqual(d(after, "sparkgate_response_bytes_total", tenant="default"),
                             bytes_out)
            self.assertEqual(d(after, "sparkgate_connections_accepted_total"), n_channels)
            self.assertEqual(d(after, "sparkgate_connections_open"), n_channels)
            # Nothing else was touched.
            self.assertEqual(d(after, "sparkgate_upstream_connect_failures_total",
                               tenant="default", backend="spark-1"), 0)
            for reason in AUTH_REASONS:
                self.assertEqual(d(after, "sparkgate_auth_failures_total", reason=reason), 0,
                                 reason)
            for reason in TLS_REASONS:
                self.assertEqual(d(after, "sparkgate_tls_handshake_failures_total",
                                   reason=reason), 0, reason)
            self.scrape_until(lambda s: sample(s, "sparkgate_streams_open") == 0,
                              "sparkgate_streams_open back to 0 after the calls")
        finally:
            for ch in chans:
                ch.close()
        # Closed channels are closed connections.
        self.scrape_until(
            lambda s: sample(s, "sparkgate_connections_open")
            == sample(before, "sparkgate_connections_open"),
            "sparkgate_connections_open back to %d" % sample(before, "sparkgate_connections_open"))

    def test_auth_failure_metric_log_and_access_log(self):
        ch = self.channel("jwt")
        before = self.scrape()
        mark = self.sg.mark()
        path = SERVICE + "AnalyzePlan"
        r = H.call_unary(ch, "AnalyzePlan", b"who am i", DEFAULT_MD)
        self.assertEqual(r.code, grpc.StatusCode.UNAUTHENTICATED, r)
        m = self.sg.wait_for_log(
            r"conn=(\d+) stream=(\d+) peer=127\.0\.0\.1:\d+ path=%s: "
            r"rejected: unauthenticated: no_credentials$" % re.escape(path),
            timeout=5, since=mark)
        conn_id, stream_id = int(m.group(1)), int(m.group(2))
        after = self.scrape_until(
            lambda s: sample(s, "sparkgate_auth_failures_total", reason="no_credentials")
            > sample(before, "sparkgate_auth_failures_total", reason="no_credentials"),
            "no_credentials counted")
        for reason in AUTH_REASONS:
            self.assertEqual(
                sample(after, "sparkgate_auth_failures_total", reason=reason)
                - sample(before, "sparkgate_auth_failures_total", reason=reason),
                1 if reason == "no_credentials" else 0, reason)
        after = self.scrape_until(
            lambda s: sample(s, "sparkgate_rpcs_total", tenant="none", method="AnalyzePlan",
                             grpc_status="16")
            > sample(before, "sparkgate_rpcs_total", tenant="none", method="AnalyzePlan",
                     grpc_status="16"),
            "the refused call counted under tenant none")
        self.assertEqual(
            sample(after, "sparkgate_rpcs_total", tenant="none", method="AnalyzePlan",
                   grpc_status="16")
            - sample(before, "sparkgate_rpcs_total", tenant="none", method="AnalyzePlan",
                     grpc_status="16"), 1)
        self.assertEqual(sample(after, "sparkgate_rpcs_total", tenant="default",
                                method="AnalyzePlan", grpc_status="16"), 0)
        # The access log line of the same call (same ids as the log line).
        rec = self.access_since(lambda x: (x["conn_id"], x["stream_id"]) == (conn_id, stream_id))
        self.assertEqual(len(rec), 1, rec)
        rec = rec[0]
        assert_record_shape(self, rec)
        self.assertEqual(rec["reason"], "unauthenticated: no_credentials", rec)
        self.assertEqual((rec["grpc_status"], rec["identity"], rec["tenant"], rec["backend"],
                          rec["method"]), (16, None, None, None, path), rec)
        self.assertRegex(rec["client"], CLIENT_RE)

    def test_refused_call_logs_why(self):
        # No tenant header: the selector finds no tenant -> 7, and both logs
        # say why.
        ch = self.channel("public")
        mark = self.sg.mark()
        path = SERVICE + "ArtifactStatus"
        r = H.call_unary(ch, "ArtifactStatus", b"x")
        self.assertEqual(r.code, grpc.StatusCode.PERMISSION_DENIED, r)
        m = self.sg.wait_for_log(r"conn=(\d+) stream=(\d+) peer=\S+ path=%s: .*\bno_tenant\b"
                                 % re.escape(path), timeout=5, since=mark)
        ids = (int(m.group(1)), int(m.group(2)))
        rec = self.access_since(lambda x: (x["conn_id"], x["stream_id"]) == ids)[0]
        assert_record_shape(self, rec)
        self.assertEqual((rec["grpc_status"], rec["tenant"], rec["backend"]), (7, None, None))
        self.assertRegex(rec.get("reason", ""), r"^no_tenant\b", rec)

    def test_tls_handshake_failure_metric(self):
        def tls_total(s):
            return sum(sample(s, "sparkgate_tls_handshake_failures_total", reason=r)
                       for r in TLS_REASONS)

        before = self.scrape()
        port = self.sg.port("public")
        # A client offering only http/1.1.
        probe = H.tls_probe(port, alpn=("http/1.1",))
        self.assertFalse(probe.ok and probe.alpn == "h2", probe)
        self.assertFalse(probe.h2_settings_received, probe)
        after = self.scrape_until(lambda s: tls_total(s) > tls_total(before),
                                  "a TLS handshake failure counted")
        self.assertEqual(tls_total(after) - tls_total(before), 1)
        moved = [r for r in TLS_REASONS
                 if sample(after, "sparkgate_tls_handshake_failures_total", reason=r)
                 != sample(before, "sparkgate_tls_handshake_failures_total", reason=r)]
        self.assertEqual(len(moved), 1, moved)
        self.assertEqual(sample(after, "sparkgate_connections_accepted_total")
                         - sample(before, "sparkgate_connections_accepted_total"), 1)
        # A client offering no ALPN at all: the handshake completes, then the
        # connection is refused for not speaking h2.
        before = after
        mark = self.sg.mark()
        probe = H.tls_probe(port, alpn=None)
        self.assertFalse(probe.h2_settings_received, probe)
        after = self.scrape_until(lambda s: tls_total(s) > tls_total(before),
                                  "the no-ALPN handshake failure counted")
        self.assertEqual(tls_total(after) - tls_total(before), 1)
        self.assertEqual(sample(after, "sparkgate_tls_handshake_failures_total",
                                reason="no_alpn_h2")
                         - sample(before, "sparkgate_tls_handshake_failures_total",
                                  reason="no_alpn_h2"), 1)
        self.sg.wait_for_log(r"conn=\d+ peer=127\.0\.0\.1:\d+: rejected: client did not "
                             r"negotiate ALPN h2", timeout=5, since=mark)
        self.assertTrue(self.sg.alive())

    def test_upstream_connect_failures(self):
        ch = self.channel("public")
        before = self.scrape()
        up = dict(tenant="dead", backend="down-1")
        mark = self.sg.mark()
        r = H.call_unary(ch, "Config", b"anyone there", [(TENANT_HDR, "dead")])
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        after = self.scrape_until(
            lambda s: sample(s, "sparkgate_upstream_connect_failures_total", **up)
            > sample(before, "sparkgate_upstream_connect_failures_total", **up)
            and sample(s, "sparkgate_rpcs_total", tenant="dead", method="Config",
                       grpc_status="14")
            > sample(before, "sparkgate_rpcs_total", tenant="dead", method="Config",
                     grpc_status="14"),
            "the failed connect to down-1 counted")
        # Background probes may add attempts; none of them can succeed.
        self.assertEqual(sample(after, "sparkgate_upstream_connects_total", **up),
                         sample(after, "sparkgate_upstream_connect_failures_total", **up), after)
        self.assertEqual(sample(after, "sparkgate_rpcs_total", tenant="dead", method="Config",
                                grpc_status="14")
                         - sample(before, "sparkgate_rpcs_total", tenant="dead",
                                  method="Config", grpc_status="14"), 1)
        self.assertEqual(sample(after, "sparkgate_upstream_connect_failures_total",
                                tenant="default", backend="spark-1"),
                         sample(before, "sparkgate_upstream_connect_failures_total",
                                tenant="default", backend="spark-1"))
        self.sg.wait_for_log(r"backend down-1 of tenant dead is down", timeout=5)
        m = self.sg.wait_for_log(r"conn=(\d+) stream=(\d+) peer=\S+ path=%s: grpc-status 14"
                                 % re.escape(SERVICE + "Config"), timeout=5, since=mark)
        ids = (int(m.group(1)), int(m.group(2)))
        rec = self.access_since(lambda x: (x["conn_id"], x["stream_id"]) == ids)[0]
        assert_record_shape(self, rec)
        self.assertEqual((rec["tenant"], rec["backend"], rec["grpc_status"], rec["session_id"]),
                         ("dead", "down-1", 14, spark_proto.DEFAULT_SESSION), rec)
        self.assertIn("reason", rec)

    # -- access log ---------------------------------------------------------------
    def test_access_log_fields(self):
        # Raw HTTP/2, so that the client address and stream id are known.
        payload = b"access-log-fields"
        body = H.grpc_frame(payload)
        # A client port is unique among open connections only: lines of
        # this test are those written from here on.
        offset = access_log_size(self.access_path)
        with H.H2Client(self.sg.port("public")) as c:
            local = c.sock.getsockname()
            resp = c.request(SERVICE + "AnalyzePlan", body=body, extra=DEFAULT_MD)
            sid = max(c.responses)
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.trailer("grpc-status"), "0", resp)
        self.assertEqual(H.grpc_unframe(resp.data), [payload])
        client = "%s:%d" % (local[0], local[1])
        rec = self.access_since(lambda x: x["client"] == client
                                and x["method"] == SERVICE + "AnalyzePlan", offset=offset)
        self.assertEqual(len(rec), 1, rec)
        rec = rec[0]
        assert_record_shape(self, rec)
        self.assertNotIn("reason", rec)
        self.assertEqual(rec["stream_id"], sid)
        self.assertEqual(rec["identity"], "anonymous")
        self.assertEqual(rec["tenant"], "default")
        self.assertEqual(rec["session_id"], spark_proto.DEFAULT_SESSION)
        self.assertEqual(rec["backend"], "spark-1")
        self.assertEqual(rec["grpc_status"], 0)
        self.assertEqual(rec["bytes_in"], len(body))
        self.assertEqual(rec["bytes_out"], len(resp.data))

        # A JWT caller: its identity, and the token appears nowhere.
        tok = mint(self.secret, sub="alice")
        bad_tok = mint(b"not-the-secret-" + secrets.token_hex(16).encode(), sub="mallory")
        jch = self.channel("jwt")
        r = H.call_unary(jch, "AnalyzePlan", b"jwt call", DEFAULT_MD + [
            ("authorization", "Bearer " + tok)])
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        mark = self.sg.mark()
        r = H.call_unary(jch, "AnalyzePlan", b"bad jwt call", DEFAULT_MD + [
            ("authorization", "Bearer " + bad_tok)])
        self.assertEqual(r.code, grpc.StatusCode.UNAUTHENTICATED, r)
        self.sg.wait_for_log(r"rejected: unauthenticated: jwt_invalid", timeout=5, since=mark)
        recs = self.access_since(lambda x: x["identity"] == "alice", offset=offset)
        self.assertEqual(len(recs), 1, recs)
        ok = recs[0]
        assert_record_shape(self, ok)
        self.assertEqual((ok["tenant"], ok["backend"], ok["grpc_status"], ok["session_id"],
                          ok["bytes_in"], ok["bytes_out"]),
                         ("default", "spark-1", 0, spark_proto.DEFAULT_SESSION,
                          wire_in(b"jwt call"), wire_out(b"jwt call")), ok)
        denied = self.access_since(lambda x: x.get("reason", "").startswith(
            "unauthenticated: jwt_invalid") and x["identity"] is None and
            # What arrived before the refusal closed the stream: the body
            # may come with the headers or after.
            x["bytes_in"] in (0, wire_in(b"bad jwt call")),
            offset=offset)
        assert_record_shape(self, denied[-1])
        self.assertEqual(denied[-1]["grpc_status"], 16)
        with open(self.access_path, "rb") as f:
            data = f.read()
        log = self.sg.log_text().encode()
        for t in (tok, bad_tok):
            for piece in [t] + t.split(".")[1:]:  # the whole token, payload, signature
                self.assertNotIn(piece.encode(), data, "token in the access log")
                self.assertNotIn(piece.encode(), log, "token in the operational log")
        # Every line of the file: JSON, the same keys, well under 4 KiB.
        for raw in data.split(b"\n")[:-1]:
            self.assertLess(len(raw), 4096)
        for rec in read_access_log(self.access_path):
            assert_record_shape(self, rec)

    def test_access_log_duration_microsecond_resolution(self):
        # docs/operations.md: duration_ms has microsecond resolution. Across
        # twelve calls, a whole number of milliseconds every time would mean
        # a millisecond clock (chance with microseconds: about 1e-36).
        session = self.unique_session()
        with H.H2Client(self.sg.port("public")) as c:
            for i in range(12):
                body = H.grpc_frame(spark_proto.request(b"r%d" % i, session_id=session),
                                    raw=True)
                resp = c.request(SERVICE + "ReleaseExecute", body=body, extra=DEFAULT_MD)
                self.assertEqual(resp.trailer("grpc-status"), "0", resp)
        recs = self.access_since(lambda x: x["session_id"] == session, n=12)
        self.assertEqual(len(recs), 12, recs)
        durations = [r["duration_ms"] for r in recs]
        self.assertTrue(any(d != int(d) for d in durations),
                        "duration_ms is always a whole number of milliseconds: %r"
                        % durations)

    def test_access_log_reopen_on_sigusr1(self):
        path, rotated = self.access_path, self.access_path + ".1"

        def call_on_new_connection(tag):
            """A call on a connection of its own; its (unique) session id."""
            session = self.unique_session()
            body = H.grpc_frame(spark_proto.request(tag, session_id=session), raw=True)
            with H.H2Client(self.sg.port("public")) as c:
                resp = c.request(SERVICE + "ReleaseSession", body=body, extra=DEFAULT_MD)
            self.assertEqual(resp.trailer("grpc-status"), "0", resp)
            return session

        first = call_on_new_connection(b"before rotation")
        wait_access(path, lambda x: x["session_id"] == first)
        os.rename(path, rotated)
        self.addCleanup(lambda: os.path.exists(rotated) and os.unlink(rotated))
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGUSR1)
        self.sg.wait_for_log(r"SIGUSR1: access log reopened", timeout=5, since=mark)
        self.assertTrue(os.path.exists(path), "SIGUSR1 did not create %s" % path)
        mode = os.stat(path).st_mode & 0o777
        self.assertEqual(mode & ~0o640, 0, "access log mode %o wider than 0640" % mode)
        sessions = [call_on_new_connection(b"after rotation %d" % i) for i in range(3)]
        got = wait_access(path, lambda x: x["session_id"] in sessions, n=3)
        self.assertEqual(sorted(x["session_id"] for x in got), sorted(sessions))
        old = read_access_log(rotated)
        self.assertEqual([x for x in old if x["session_id"] in sessions], [],
                         "lines after SIGUSR1 went to the rotated file")
        self.assertEqual(len([x for x in old if x["session_id"] == first]), 1)
        self.assertEqual([x for x in read_access_log(path) if x["session_id"] == first], [])
        self.assertTrue(self.sg.alive())


# ---------------------------------------------------------------------------

class LifecycleTest(OpsCase):
    """sd_notify, reload accounting and the drain: a sparkgate per test."""

    def start_with_notify(self, cfg):
        d = H.tempdir("sg-ops-notify-")
        ns = NotifySocket(d)
        self.addCleanup(ns.close)
        sg = self.start_sparkgate(cfg, env={"NOTIFY_SOCKET": ns.path})
        self.sg = sg
        self.admin = admin_port(sg)
        return sg, ns

    def test_sd_notify_and_reload_accounting(self):
        up = self.standin()
        cfg = H.base_config(up.port, admin={"address": "127.0.0.1", "port": 0})
        sg, ns = self.start_with_notify(cfg)
        ns.collect_until(lambda got: "READY" in state_messages(got))
        status, _, _ = http_get(self.admin, "/readyz")
        self.assertEqual(status, 200)
        ns.drain()
        before = self.scrape()

        # A good reload that changes something visible: Config is no longer
        # among the tenant's methods.
        cfg["tenants"][0]["methods"] = ["AnalyzePlan", "ExecutePlan"]
        H.write_config(cfg, os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        got = ns.collect_until(lambda g: "READY" in state_messages(g))
        self.assertEqual(state_messages(got), ["RELOADING", "READY"], got)
        reloading = [m for m in got if m.get("RELOADING") == "1"][0]
        self.assertRegex(reloading.get("MONOTONIC_USEC", ""), r"^\d+$", reloading)
        sg.wait_for_log(r"reload done", timeout=5, since=mark)
        s = self.scrape_until(
            lambda s: sample(s, "sparkgate_config_reloads_total", result="ok")
            > sample(before, "sparkgate_config_reloads_total", result="ok"), "reload ok counted")
        self.assertEqual(sample(s, "sparkgate_config_reloads_total", result="ok")
                         - sample(before, "sparkgate_config_reloads_total", result="ok"), 1)
        self.assertEqual(sample(s, "sparkgate_config_reloads_total", result="failed")
                         - sample(before, "sparkgate_config_reloads_total", result="failed"), 0)

        def serves_new_config():
            ch = H.tls_channel(sg.port("public"))
            try:
                a = H.call_unary(ch, "AnalyzePlan", b"a")
                c = H.call_unary(ch, "Config", b"c")
            finally:
                ch.close()
            self.assertEqual(a.code, grpc.StatusCode.OK, a)
            self.assertEqual(c.code, grpc.StatusCode.PERMISSION_DENIED, c)

        serves_new_config()

        # A broken file: RELOADING, READY, the failure counted, the
        # configuration in force (Config still refused) keeps serving.
        before = s
        with open(sg.config_path, "w") as f:
            f.write('{ "workers": 2, broken')
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        got = ns.collect_until(lambda g: "READY" in state_messages(g))
        self.assertEqual(state_messages(got), ["RELOADING", "READY"], got)
        sg.wait_for_log(r"reload: config error: %s" % re.escape(sg.config_path), timeout=5,
                        since=mark)
        sg.wait_for_log(r"reload failed", timeout=5, since=mark)
        self.assertIsNone(sg.find_log(r"reload done", since=mark))
        s = self.scrape_until(
            lambda s: sample(s, "sparkgate_config_reloads_total", result="failed")
            > sample(before, "sparkgate_config_reloads_total", result="failed"),
            "reload failure counted")
        self.assertEqual(sample(s, "sparkgate_config_reloads_total", result="failed")
                         - sample(before, "sparkgate_config_reloads_total", result="failed"), 1)
        self.assertEqual(sample(s, "sparkgate_config_reloads_total", result="ok")
                         - sample(before, "sparkgate_config_reloads_total", result="ok"), 0)
        serves_new_config()
        status, _, _ = http_get(self.admin, "/readyz")
        self.assertEqual(status, 200)

        # SIGTERM: STOPPING=1, exit 0.
        ns.drain()
        sg.send_signal(signal.SIGTERM)
        got = ns.collect_until(lambda g: "STOPPING" in state_messages(g))
        self.assertEqual(state_messages(got), ["STOPPING"], got)
        self.assertEqual(sg.wait(15), 0, sg.log_text())

    def test_drain_readyz_and_call_in_flight(self):
        up = self.standin()
        cfg = H.base_config(up.port, admin={"address": "127.0.0.1", "port": 0})
        sg, ns = self.start_with_notify(cfg)
        ns.collect_until(lambda got: "READY" in state_messages(got))
        self.assertEqual(http_get(self.admin, "/readyz")[0], 200)

        # A client-streaming call that ends when the test says so.
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        gate = threading.Event()
        self.addCleanup(gate.set)

        def requests():
            yield b"first part"
            gate.wait(30)
            yield b"last part"

        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", H.call_client_stream(ch, "AddArtifacts", requests(), timeout=40)),
            daemon=True)
        t.start()
        up.wait_for(lambda recs: [r for r in recs if r.method == SERVICE + "AddArtifacts"
                                  and r.messages >= 1], timeout=WAIT)

        ns.drain()
        sg.send_signal(signal.SIGTERM)
        got = ns.collect_until(lambda g: "STOPPING" in state_messages(g))
        self.assertEqual(state_messages(got), ["STOPPING"], got)
        deadline = time.monotonic() + WAIT
        while True:
            status, _, body = http_get(self.admin, "/readyz")
            if status == 503:
                break
            self.assertEqual(status, 200, body)
            self.assertLess(time.monotonic(), deadline, "/readyz never answered 503")
            time.sleep(0.02)
        self.assertEqual(body.strip(), b"not ready")
        status, _, body = http_get(self.admin, "/healthz")
        self.assertEqual((status, body.strip()), (200, b"ok"))
        # New connections are no longer taken.
        H.wait_until(lambda: not H.port_is_open(sg.port("public")), WAIT,
                     what="client listener closed during the drain")
        self.assertTrue(sg.alive(), "exited with a call in flight")
        self.assertIsNone(result.get("r"), result)
        # Still answering probes after all that.
        self.assertEqual(http_get(self.admin, "/readyz")[0], 503)
        self.assertEqual(http_get(self.admin, "/healthz")[0], 200)

        gate.set()
        t.join(WAIT)
        self.assertFalse(t.is_alive(), "the call did not finish")
        r = result["r"]
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual(json.loads(r.response)["messages"], 2, r)
        self.assertEqual(sg.wait(15), 0, sg.log_text())
        # No access_log in the config: the line went to stderr.
        lines = [json.loads(l) for l in sg.lines if l.startswith("{")]
        adds = [x for x in lines if x.get("method") == SERVICE + "AddArtifacts"]
        self.assertEqual(len(adds), 1, sg.log_text())
        assert_record_shape(self, adds[0])
        self.assertEqual(adds[0]["grpc_status"], 0, adds[0])


if __name__ == "__main__":
    H.main()
