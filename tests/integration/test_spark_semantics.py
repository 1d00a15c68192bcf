#!/usr/bin/python3
"""Spark-specific behaviour against what the docs promise (docs/routing.md,
docs/security.md, docs/operations.md), beyond test_tenants: session
affinity of every method across replicas, weighted picks and draining, the
user_context rewrite at the edges of the scanner's header window, the
upload quota, Spark user-context extensions and the access log's
session_id.
"""

import json
import math
import os
import random
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
import spark_proto as P  # noqa: E402
import grpc  # noqa: E402
import h2.exceptions  # noqa: E402
from test_tenants import (  # noqa: E402
    HASH_KEY, TenantCase, fb, frame, g_client, g_server, g_unary, h2_status, hrw_rank,
    msg, new_session, siphash24, write_file)
from test_operations import wait_access  # noqa: E402


def read_doc(name):
    with open(os.path.join(H.SOURCE_ROOT, "docs", name), encoding="utf-8") as f:
        return " ".join(f.read().split())

SERVICE = H.SERVICE
OK = grpc.StatusCode.OK
MSG_INVALID = "sparkgate: invalid Spark Connect request message"
MSG_UPLOAD = "sparkgate: tenant over its upload quota, retry later"
WINDOW = 64 * 1024  # SG_SPARKMSG_DEFAULT_HEADER_WINDOW_BYTES

ALL_METHODS = [
    # (method, kind) as the stand-in serves them
    ("ExecutePlan", "server"), ("ReattachExecute", "server"), ("ReleaseExecute", "unary"),
    ("Interrupt", "unary"), ("AnalyzePlan", "unary"), ("Config", "unary"),
    ("AddArtifacts", "client"), ("ArtifactStatus", "unary"), ("FetchErrorDetails", "unary"),
    ("ReleaseSession", "unary"),
]


# ---------------------------------------------------------------------------
# helpers

def varint(n):
    return P.varint(n)


def raw_fields(body):
    """[(field, wire, raw bytes of the whole field, value bytes for wt 2)] of
    the top level, keeping each field's bytes exactly as encoded."""
    out, i = [], 0
    while i < len(body):
        start = i
        tag, i = P._read_varint(body, i)
        f, wt = tag >> 3, tag & 7
        val = None
        if wt == 0:
            _, i = P._read_varint(body, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            n, i = P._read_varint(body, i)
            val = body[i:i + n]
            i += n
        else:
            raise ValueError("wire type %d" % wt)
        out.append((f, wt, body[start:i], val))
    return out


def expected_rewrite(body, identity):
    """What docs/security.md's rewrite makes of |body|: user_context holds
    user_id and user_name = identity, then its other fields byte for byte;
    it stays where it was, or goes first when there was none."""
    ident = fb(1, identity) + fb(2, identity)
    out, seen = b"", False
    for f, wt, raw, val in raw_fields(body):
        if f == 2 and wt == 2:
            others = b"".join(r for (g, _, r, _) in raw_fields(val) if g not in (1, 2))
            out += fb(2, ident + others)
            seen = True
        else:
            out += raw
    return out if seen else fb(2, ident) + out


def send_chunks(c, path, chunks, extra=(), end=True, timeout=20.0):
    """One stream; each chunk goes out as its own DATA frame(s) (split only
    where flow control or the frame size demands). Returns the stream id."""
    sid = c.conn.get_next_available_stream_id()
    c.responses[sid] = H.H2Response(sid)
    c.conn.send_headers(sid, c.grpc_headers(path, extra=extra), end_stream=False)
    c._flush()
    deadline = time.monotonic() + timeout
    r = c.responses[sid]
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                if r.ended or r.reset_code is not None or c.closed:
                    return sid
                window = min(c.conn.local_flow_control_window(sid),
                             c.conn.max_outbound_frame_size)
                if window <= 0:
                    if time.monotonic() > deadline:
                        raise TimeoutError("no flow-control credit")
                    c._pump(0.1)
                    continue
                n = min(window, len(view))
                c.conn.send_data(sid, bytes(view[:n]))
                c._flush()
                view = view[n:]
        if end:
            c.conn.end_stream(sid)
            c._flush()
    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
        pass
    return sid


def one_tenant_table(path, tenant, backends, user_id="rewrite", **extra):
    t = {"name": tenant, "backends": backends, "allow": {"any_identity": True},
         "user_id": user_id}
    t.update(extra)
    write_file(path, json.dumps({"tenant_selectors": ["identity"], "tenants": [t]}))


def table_config(directory, workers=1, **top):
    cfg = H.base_config(1, listeners=[H.tls_listener("public")], workers=workers, **top)
    del cfg["tenants"]
    cfg["routing_table"] = os.path.join(directory, "tenants.json")
    return cfg


def backend(name, up, weight=None):
    b = {"name": name, "address": "127.0.0.1", "port": up.port}
    if weight is not None:
        b["weight"] = weight
    return b


# ---------------------------------------------------------------------------
# Draining a backend (docs/routing.md, "Draining a backend")

class DrainTest(TenantCase):
    """"With weight 0, a session that this worker has sent to the backend
    before keeps going there while the backend is up." One worker, so that
    the worker's session memory is the whole story."""

    def setUp(self):
        super().setUp()
        self.dir = H.tempdir("sg-rev-drain-")
        self.path = os.path.join(self.dir, "tenants.json")

    def where(self, ch, session):
        tag = self.tag()
        r = g_unary(ch, "AnalyzePlan", msg(tag.encode(), session, "whoever"),
                    [("x-test-case", tag)])
        self.assertEqual(r.code, OK, (tag, r))
        return self.record_of(tag)[0]

    def reload(self):
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done", timeout=10, since=mark)

    def test_drain_keeps_sessions_between_weighted_backends(self):
        """Guard (passes): sessions on "a" of {a, b} stay on "a" once it is
        drained to weight 0; new sessions go to "b"."""
        a, b = self.standin(), self.standin()
        self.ups = [a, b]
        one_tenant_table(self.path, "dr", [backend("a", a), backend("b", b)])
        self.sg = self.start_sparkgate(table_config(self.dir))
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        on_a = []
        while len(on_a) < 5:
            s = new_session()
            if hrw_rank("dr", "anonymous", s, ["a", "b"])[0] == "a":
                on_a.append(s)
        for s in on_a:
            self.assertEqual(self.where(ch, s), 0)
        one_tenant_table(self.path, "dr", [backend("a", a, 0), backend("b", b)])
        self.reload()
        for s in on_a:
            self.assertEqual(self.where(ch, s), 0, "session %s left the drained backend" % s)
        for _ in range(5):
            self.assertEqual(self.where(ch, new_session()), 1)

    def test_drain_keeps_sessions_first_sent_to_a_lone_backend(self):
        """The usual way to replace a Spark server: the tenant has one
        backend "a"; add "b" and drain "a" (weight 0) in one reload. The
        docs promise that the sessions this worker already sent to "a" stay
        there while "a" is up (with a single backend the worker recorded
        nothing, and every running session moved to "b")."""
        a, b = self.standin(), self.standin()
        self.ups = [a, b]
        one_tenant_table(self.path, "dr", [backend("a", a)])
        self.sg = self.start_sparkgate(table_config(self.dir))
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        sessions = [new_session() for _ in range(5)]
        for s in sessions:
            self.assertEqual(self.where(ch, s), 0)
        one_tenant_table(self.path, "dr", [backend("a", a, 0), backend("b", b)])
        self.reload()
        got = [self.where(ch, s) for s in sessions]
        self.assertEqual(got, [0] * len(sessions),
                         "sessions already on the lone backend 'a' moved to the new "
                         "backend when 'a' was drained (0 = a, 1 = b)")
        # New sessions do go to the new backend.
        self.assertEqual(self.where(ch, new_session()), 1)

    def test_drained_backend_down_keeps_its_sessions_without_failover(self):
        """With "failover": false a session whose backend is down gets 14
        and continues there, with its state, once the backend is back: also
        a session on a drained (weight 0) backend. It is not sent to
        another backend, and the worker's memory keeps it where it was."""
        a, b = self.standin(), self.standin()
        self.ups = [a, b]
        one_tenant_table(self.path, "dd", [backend("a", a), backend("b", b)])
        self.sg = self.start_sparkgate(table_config(
            self.dir, upstream={"connect_timeout_ms": 1000}))
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        s = next(s for s in (new_session() for _ in range(1000))
                 if hrw_rank("dd", "anonymous", s, ["a", "b"])[0] == "a")
        self.assertEqual(self.where(ch, s), 0)
        one_tenant_table(self.path, "dd", [backend("a", a, 0), backend("b", b)])
        self.reload()
        self.assertEqual(self.where(ch, s), 0)
        H.stop_standin(a)
        for _ in range(4):
            tag = self.tag()
            r = g_unary(ch, "AnalyzePlan", msg(tag.encode(), s, "whoever"),
                        [("x-test-case", tag)])
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE,
                             "a session of the drained backend 'a' (failover off) was "
                             "answered while 'a' was down: %r" % (r,))
            self.assertEqual(r.details, 'sparkgate: tenant "dd": backend "a" is unavailable')
            self.assertEqual(self.records(tag), [], "the call reached another backend")


def weighted_pick(tenant, user_id, session_id, weights):
    """The backend docs/routing.md's formula picks: score = -w / ln(u),
    u = ((h >> 12) + 0.5) / 2^52, h = SipHash-2-4(00..0f, T 0 U 0 S 0 name)."""
    prefix = b"\0".join(x.encode() for x in (tenant, user_id, session_id)) + b"\0"
    best = None
    for name, w in sorted(weights.items()):
        if w == 0:
            continue
        h = siphash24(HASH_KEY, prefix + name.encode())
        score = -w / math.log(((h >> 12) + 0.5) / 2 ** 52)
        if best is None or score > best[0]:
            best = (score, name)
    return best[1]


class WeightedAffinityTest(TenantCase):
    """Guard (passes): with weights 3, 1 and 0 each session lands where the
    documented formula says, and weight 0 takes no new session."""

    def test_weighted_formula(self):
        ups = [self.standin() for _ in range(3)]
        self.ups = ups
        weights = {"w3": 3, "w1": 1, "w0": 0}
        names = list(weights)
        d = H.tempdir("sg-rev-w-")
        one_tenant_table(os.path.join(d, "tenants.json"), "wt",
                         [backend(n, u, weights[n]) for n, u in zip(names, ups)])
        self.sg = self.start_sparkgate(table_config(d, workers=2))
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        count = {n: 0 for n in names}
        for _ in range(120):
            s = new_session()
            tag = self.tag()
            r = g_unary(ch, "AnalyzePlan", msg(b"w", s, "x"), [("x-test-case", tag)])
            self.assertEqual(r.code, OK, r)
            i, _ = self.record_of(tag)
            self.assertEqual(names[i], weighted_pick("wt", "anonymous", s, weights), s)
            count[names[i]] += 1
        self.assertEqual(count["w0"], 0)
        self.assertGreater(count["w3"], count["w1"], count)


# ---------------------------------------------------------------------------
# Affinity of every Spark method, two replicas (docs/routing.md)

class EveryMethodAffinityTest(TenantCase):
    """Guard (passes): every SparkConnectService method of a session lands
    on the backend of its ExecutePlan, in both replicas, whatever user_id
    the client writes (rewrite: the hash uses the identity)."""

    def test_all_methods_one_backend_two_replicas(self):
        ups = [self.standin() for _ in range(3)]
        self.ups = ups
        names = ["m1", "m2", "m3"]
        d = H.tempdir("sg-rev-aff-")
        one_tenant_table(os.path.join(d, "tenants.json"), "aff",
                         [backend(n, u) for n, u in zip(names, ups)])
        sg1 = self.start_sparkgate(table_config(d, workers=2))
        # The second replica lists the backends in another order.
        d2 = H.tempdir("sg-rev-aff2-")
        one_tenant_table(os.path.join(d2, "tenants.json"), "aff",
                         [backend(n, u) for n, u in reversed(list(zip(names, ups)))])
        sg2 = self.start_sparkgate(table_config(d2, workers=1))
        self.sg = sg1
        chans = [H.tls_channel(sg1.port()), H.tls_channel(sg2.port())]
        for ch in chans:
            self.addCleanup(ch.close)
        for k in range(12):
            s = new_session()
            want = names.index(hrw_rank("aff", "anonymous", s, names)[0])
            for j, (method, kind) in enumerate(ALL_METHODS):
                ch = chans[(k + j) % 2]
                tag = self.tag()
                md = [("x-test-case", tag)] + H.standin_md(count=1)
                m = msg(method.encode(), s, "client-%d" % j)
                if kind == "server":
                    r = g_server(ch, method, m, md)
                elif kind == "client":
                    r = g_client(ch, method, [m, m], md)
                else:
                    r = g_unary(ch, method, m, md)
                self.assertEqual(r.code, OK, (method, r))
                i, _ = self.record_of(tag)
                self.assertEqual(i, want, (s, method))


# ---------------------------------------------------------------------------
# The rewrite at the scanner's edges (docs/security.md)

class RewriteEdgesTest(TenantCase):
    """user_id "rewrite": every message reaches the backend as the docs say
    (user_context = identity, every other byte kept, in order), at the
    edges of the scanner's 64 KiB header window, with non-minimal
    varints, fixed-size fields, empty and extension-only user contexts,
    many messages per frame and arbitrary DATA frame splits."""

    @classmethod
    def setUpClass(cls):
        cls.up = H.start_standin()
        cls.up.record_raw = True
        cls.ups = [cls.up]
        cfg = H.base_config(cls.up.port, workers=1)
        cfg["tenants"][0]["user_id"] = "rewrite"
        cls.sg = H.Sparkgate(cfg).start()
        cls.port = cls.sg.port()

    @classmethod
    def tearDownClass(cls):
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def run_upload(self, bodies, splitter):
        wire = b"".join(frame(b) for b in bodies)
        tag = self.tag()
        with H.H2Client(self.port) as c:
            sid = send_chunks(c, SERVICE + "AddArtifacts", splitter(wire),
                              extra=[("x-test-case", tag)])
            r = c.wait(sid, timeout=30)
        return tag, r

    def check(self, bodies, splitter=lambda w: [w], what=""):
        tag, r = self.run_upload(bodies, splitter)
        self.assertEqual(h2_status(r), (0, None), (what, r, self.sg.log_text(3)))
        _, rec = self.record_of(tag)
        want = [expected_rewrite(b, "anonymous") for b in bodies]
        got = rec.raw_requests
        self.assertEqual(len(got), len(want), what)
        for k, (g, w) in enumerate(zip(got, want)):
            if g != w:
                self.fail("%s: message %d differs (got %d bytes, want %d; first "
                          "difference at %d)" % (what, k, len(g), len(w),
                                                 next((i for i in range(min(len(g), len(w)))
                                                       if g[i] != w[i]), min(len(g), len(w)))))

    def test_window_edges(self):
        sess = new_session()
        sid_f = fb(1, sess)
        uc = fb(2, fb(1, "mallory") + fb(999, b"x" * 40))
        cases = []
        # user_context whose tag sits at every offset around the window end
        for off in range(-4, 2):
            pad = WINDOW + off - len(sid_f)
            # field 15 with a 3-byte length: tag 1 + len 3 + payload
            payload = b"p" * (pad - 4)
            body = sid_f + fb(15, payload) + uc + fb(4, b"tail")
            start = len(sid_f) + len(fb(15, payload))
            if start < WINDOW:
                cases.append(("uc at %d" % start, body))
        # no user_context in a message longer than the window
        cases.append(("no uc, long", sid_f + fb(15, os.urandom(3 * WINDOW)) + fb(4, b"t")))
        # session_id straddling the window end, no user_context
        pre = fb(15, b"q" * (WINDOW - 20 - 4))
        cases.append(("sid straddles", pre + sid_f + fb(4, os.urandom(100))))
        for what, body in cases:
            self.check([body, body], what=what)
            self.check([body], splitter=lambda w: [w[i:i + 997] for i in range(0, len(w), 997)],
                       what=what + " (997-byte frames)")

    def test_encodings_and_shapes(self):
        sess = new_session()
        ext = fb(999, fb(1, "type.googleapis.com/spark.Ext") + fb(2, os.urandom(300)))
        inner = fb(1, "eve") + fb(2, "Eve")
        # tag 0x12 as two bytes, the length as three
        nonmin_uc = b"\x92\x00" + bytes([0x80 | len(inner), 0x80, 0x00]) + inner
        bodies = [
            fb(1, sess) + fb(2, b"") + fb(15, b"empty uc"),
            fb(1, sess) + fb(2, ext) + fb(15, b"extension only"),
            fb(1, sess) + nonmin_uc + fb(15, b"non-minimal tag and length"),
            b"\x8a\x00" + varint(len(sess)) + sess.encode() + fb(2, fb(1, "z")) + b"\x20\x01",
            fb(1, sess) + b"\x18" + varint(2 ** 63) + b"\x29" + b"\x01" * 8 + b"\x35" + b"\x02" * 4
            + fb(2, fb(2, "only a name") + ext + fb(3, b"x" * 200)) + fb(15, b"after"),
            fb(1, sess) + fb(15, os.urandom(700)) + fb(2, fb(1, "late-ish")) + fb(15, b"z"),
        ]
        self.check(bodies, what="shapes in one frame")
        self.check(bodies, splitter=lambda w: [w[i:i + 1] for i in range(len(w))],
                   what="shapes in 1-byte frames")

    def test_late_user_context_in_a_later_message(self):
        """With rewrite, every message's new length must be known before
        its prefix goes on, so the 64 KiB window holds for each message,
        not only the first: a user_context past it in message 2 is
        refused with 3, logged with the message number, and operations.md
        says so in the row of status 3."""
        window = 64 * 1024
        sess = new_session()
        m1 = fb(1, sess) + fb(2, fb(1, "anonymous")) + fb(15, b"first")
        m2 = fb(1, sess) + fb(15, b"x" * (window + 5000)) + fb(2, fb(1, "anonymous"))
        tag, r = self.run_upload([m1, m2], lambda w: [w])
        self.assertEqual(h2_status(r)[0], 3, r)
        self.sg.wait_for_log(r"message 2: user_context after the first 65536 bytes", timeout=5)
        self.assertRegex(read_doc("operations.md"),
                         r"\| 3 INVALID_ARGUMENT \|[^|]*rewrite[^|]*64 KiB of any message")

    def test_random_messages_random_splits(self):
        rng = random.Random(20240611)
        sess = new_session()
        for round_ in range(6):
            bodies = []
            for _ in range(rng.randint(1, 12)):
                parts = [fb(1, sess)]
                for _ in range(rng.randint(0, 3)):
                    parts.append(fb(rng.choice([3, 4, 5, 15, 1000]),
                                    os.urandom(rng.choice([0, 1, 127, 128, 255, 256, 600, 3000]))))
                if rng.random() < 0.8:
                    inner = [fb(1, "c%d" % rng.randint(0, 99))]
                    if rng.random() < 0.5:
                        inner.append(fb(2, "name"))
                    if rng.random() < 0.5:
                        inner.append(fb(999, os.urandom(rng.choice([10, 130, 1000]))))
                    rng.shuffle(inner)
                    parts.insert(rng.randint(1, len(parts)), fb(2, b"".join(inner)))
                bodies.append(b"".join(parts))

            def splitter(w, rng=rng):
                out, i = [], 0
                while i < len(w):
                    n = rng.choice([1, 2, 5, 7, 64, 300, 4096])
                    out.append(w[i:i + n])
                    i += n
                return out
            self.check(bodies, splitter=splitter, what="round %d" % round_)


# ---------------------------------------------------------------------------
# Spark user-context extensions (UserContext.extensions, field 999)

class UserContextExtensionsTest(TenantCase):
    """PySpark (4.x) lets code attach `Any` messages to every request's
    user_context (SparkConnectClient.add_threadlocal_user_context_extension;
    Spark Declarative Pipelines uses it). docs/routing.md says user_id
    "off" passes user_context through unchanged, docs/security.md that
    "off" checks structure only, and the list of what is refused with 3
    (operations.md) has no size limit on user_context.

    The scanner holds a user_context of up to 4 KiB, in every user_id mode:
    one under it passes byte for byte; a larger one is refused with 3, the
    log saying the size, as docs/operations.md and routing.md say (the
    limit was documented nowhere)."""

    @classmethod
    def setUpClass(cls):
        cls.up = H.start_standin()
        cls.up.record_raw = True
        cls.ups = [cls.up]
        cfg = H.base_config(cls.up.port, workers=1)
        cfg["tenants"] = [
            {"name": "t-off", "backends": [{"name": "b", "address": "127.0.0.1",
                                            "port": cls.up.port}],
             "allow": {"any_identity": True}, "user_id": "off"},
            {"name": "t-rw", "backends": [{"name": "b", "address": "127.0.0.1",
                                           "port": cls.up.port}],
             "allow": {"any_identity": True}, "user_id": "rewrite"},
        ]
        cfg["tenant_selectors"] = ["header:x-spark-tenant"]
        cls.sg = H.Sparkgate(cfg).start()
        cls.ch = H.tls_channel(cls.sg.port())

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def body(self, ext_bytes):
        ext = fb(999, fb(1, "type.googleapis.com/spark.connect.PipelineAnalysisContext")
                 + fb(2, b"g" * ext_bytes))
        return fb(1, new_session()) + fb(2, fb(1, "anonymous") + ext) + fb(15, b"plan")

    def assert_passes_whole(self, tenant, ext_bytes):
        tag = self.tag()
        b = self.body(ext_bytes)
        r = g_unary(self.ch, "AnalyzePlan", b,
                    [("x-spark-tenant", tenant), ("x-test-case", tag)])
        self.assertEqual(r.code, OK, (tenant, r))
        _, rec = self.record_of(tag)
        want = b if tenant == "t-off" else expected_rewrite(b, "anonymous")
        self.assertEqual(rec.raw_requests, [want], tenant)

    def test_small_extension_passes(self):
        for tenant in ("t-off", "t-rw"):
            self.assert_passes_whole(tenant, 1000)

    def test_extension_up_to_the_documented_limit(self):
        self.assertIn("a `user_context` over 4 KiB", read_doc("operations.md"))
        self.assertIn("`user_context` (at most 4 KiB", read_doc("routing.md"))
        for tenant in ("t-off", "t-rw"):
            self.assert_passes_whole(tenant, 3900)
            mark = self.sg.mark()
            r = g_unary(self.ch, "AnalyzePlan", self.body(6000),
                        [("x-spark-tenant", tenant), ("x-test-case", self.tag())])
            self.assertEqual(r.code, grpc.StatusCode.INVALID_ARGUMENT, (tenant, r))
            self.sg.wait_for_log(r"user_context of \d+ bytes, limit 4096", timeout=5, since=mark)


# ---------------------------------------------------------------------------
# The upload quota and plans with local data (docs/routing.md, Limits)

class UploadQuotaTest(TenantCase):
    """docs/routing.md: `upload_bytes_per_minute` meters AddArtifacts, and
    ExecutePlan and AnalyzePlan, "where plans with local data travel": a
    plan with local data is an ExecutePlan request carrying a
    LocalRelation (PySpark's createDataFrame(pandas_df) sends the rows
    inline below spark.sql.session.localRelationCacheThreshold). Only
    AddArtifacts was metered, so ExecutePlan bodies of any size passed a
    spent quota. Control calls stay free: a tenant over its quota can
    still release its session."""

    def test_plans_with_local_data_are_metered(self):
        up = self.standin()
        self.ups = [up]
        cfg = H.base_config(up.port, workers=1)
        cfg["tenants"][0]["limits"] = {"upload_bytes_per_minute": 60000}
        self.sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        s = new_session()
        local_data = os.urandom(50000)
        codes = []
        for _ in range(3):  # 150 KB of plans against a 60 KB-per-minute quota
            tag = self.tag()
            r = g_server(ch, "ExecutePlan", msg(local_data, s, "u"),
                         [("x-test-case", tag)] + H.standin_md(count=1))
            codes.append((r.code, r.details))
        self.assertIn((grpc.StatusCode.RESOURCE_EXHAUSTED, MSG_UPLOAD), codes,
                      "150 KB of ExecutePlan local data in a minute passed a 60 KB "
                      "upload_bytes_per_minute quota: %r" % codes)
        r = g_unary(ch, "ReleaseSession", msg(b"", s, "u"), [("x-test-case", self.tag())])
        self.assertEqual(r.code, OK, r)


# ---------------------------------------------------------------------------
# Access log: session_id (docs/operations.md, Access log)

class AccessLogSessionIdTest(TenantCase):
    """docs/operations.md: `session_id` is "The Spark session id of the
    call"; "String fields are cut at 256 bytes". The scanner takes session
    ids of up to 128 bytes.

    A session id of any length the scanner takes is logged whole (the
    stream kept 79 bytes: two sessions that differed after byte 79 looked
    the same)."""

    def test_long_session_id_logged_whole(self):
        up = self.standin()
        self.ups = [up]
        d = H.tempdir("sg-rev-log-")
        path = os.path.join(d, "access.log")
        cfg = H.base_config(up.port, workers=1, access_log={"path": path})
        self.sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        sessions = {"short": new_session(),
                    "long": "s-" + "0123456789" * 12}  # 122 bytes, under the 128 limit
        for what, s in sessions.items():
            tag = self.tag()
            r = g_unary(ch, "Config", msg(b"x", s, "u"), [("x-test-case", tag)])
            self.assertEqual(r.code, OK, r)
        lines = wait_access(path, lambda rec: rec.get("method") == SERVICE + "Config", n=2)
        logged = [rec["session_id"] for rec in lines]
        self.assertEqual(logged, [sessions["short"], sessions["long"]],
                         "access log session_id (len %s)" % [len(x or "") for x in logged])

    def test_refused_call_logs_its_session_id(self):
        """A call refused because its user_id is not the caller (user_id
        "enforce", 7) carried a session_id the scanner had read, and the
        docs say the access log has "The Spark session id of the call, when
        the request carried one": an auditor looking for who tried to reach
        session X needs it (the log said null: the id was copied only when
        the upstream leg was attached)."""
        up = self.standin()
        self.ups = [up]
        d = H.tempdir("sg-rev-log2-")
        path = os.path.join(d, "access.log")
        cfg = H.base_config(up.port, workers=1, access_log={"path": path})
        cfg["tenants"][0]["user_id"] = "enforce"
        self.sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(self.sg.port())
        self.addCleanup(ch.close)
        ok_s, bad_s = new_session(), new_session()
        r = g_unary(ch, "Config", msg(b"x", ok_s, "anonymous"), [("x-test-case", self.tag())])
        self.assertEqual(r.code, OK, r)
        tag = self.tag()
        r = g_unary(ch, "Config", msg(b"x", bad_s, "mallory"), [("x-test-case", tag)])
        self.assertEqual(r.code, grpc.StatusCode.PERMISSION_DENIED, r)
        self.assert_reached_nothing(tag)
        lines = wait_access(path, lambda rec: rec.get("method") == SERVICE + "Config", n=2)
        self.assertEqual([(x["grpc_status"], x["session_id"]) for x in lines],
                         [(0, ok_s), (7, bad_s)], lines)


if __name__ == "__main__":
    H.main()
