#!/usr/bin/python3
"""Tenants and Spark-session awareness (issue 5), end to end against the real
binary: gRPC clients and raw HTTP/2 (python3-h2) -> sparkgate -> several
stand-in Spark Connect servers per tenant, which record what reached them
(metadata, and with record_raw the request messages byte for byte).

Covered:
  * tenant selection by jwt_claim:tenant, header:x-spark-tenant, authority
    (gRPC default_authority and raw :authority) and identity; the first
    selector that yields a tenant decides; a selected tenant the caller is
    not allowed on, an unknown tenant, an ambiguous identity and no tenant
    at all are 7 with a message that names no tenant, and nothing reaches
    any upstream.
  * user_id modes on hand-encoded request messages sent in raw DATA frames:
    enforce (match OK, other or missing user_id 7, a forged user_id in the
    10th AddArtifacts message 7 with the upstream call left incomplete),
    rewrite (user_context replaced by the identity, the rest byte for byte,
    also when it is absent or not first), off (unchanged); a second
    user_context, a missing session_id and the compressed flag are 3;
    messages split into 1-byte DATA frames and at every split point arrive
    byte-exact.
  * affinity: 200 random sessions over 3 backends (each gets some), every
    call of a session (ExecutePlan, ReattachExecute, ReleaseSession) on the
    same backend, from two workers and from a second sparkgate process, and
    the backend the documented rendezvous formula predicts.
  * a backend down and back: 14 naming the tenant and no address without
    failover, the next-ranked backend with failover, and the session back
    home once a stand-in listens on the port again.
  * limits (one worker): max_concurrent_rpcs, max_concurrent_executions,
    requests_per_second with burst (8, and 14 with over_limit_status
    unavailable), upload_bytes_per_minute on AddArtifacts; the method
    allow-list (7) and an unknown Spark method (12).
  * the upstream credential from a file and from an environment variable
    replaces the client's authorization.
  * SIGHUP with a new routing table during a long stream: the stream ends
    byte-exact, new calls follow the new table; a broken table keeps the
    one in force.
"""

import concurrent.futures
import hashlib
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import spark_proto as P  # noqa: E402
import grpc  # noqa: E402
import h2.exceptions  # noqa: E402
import jwt as pyjwt  # noqa: E402
from spark_standin import StandIn  # noqa: E402

SERVICE = H.SERVICE
ISS = "https://idp-tenants.test"
AUD = "spark"

MSG_DENIED = "sparkgate: the caller is not allowed to use the requested tenant"
MSG_NO_TENANT = "sparkgate: no tenant is configured for this caller"
MSG_METHOD = "sparkgate: this method is not allowed"
MSG_NOT_SPARK = "sparkgate: not a Spark Connect method"
MSG_USER_ID = "sparkgate: user_id does not match the authenticated identity"
MSG_INVALID = "sparkgate: invalid Spark Connect request message"
MSG_LIMIT = "sparkgate: tenant over its limit, retry later"
MSG_UPLOAD = "sparkgate: tenant over its upload quota, retry later"

OK = grpc.StatusCode.OK


# ---------------------------------------------------------------------------
# Small helpers

def write_file(path, data):
    """Atomically (rename), so that a reload never reads half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)
    return path


def new_session():
    return str(uuid.uuid4())


def msg(payload=b"p", session_id=P.DEFAULT_SESSION, user_id=None, user_name=None):
    """A Spark request message (session_id, user_context, payload field 15)."""
    return P.request(payload, session_id=session_id, user_id=user_id, user_name=user_name)


def frame(body, flag=0):
    return bytes([flag]) + len(body).to_bytes(4, "big") + body


def fb(number, data):
    return P.field_bytes(number, data if isinstance(data, bytes) else data.encode())


def header_of(rec, key):
    return [v for k, v in rec.metadata if k == key]


def call_over(rec):
    """The stand-in is done with the call. (`terminated` alone is not
    enough: grpcio never runs a done-callback added after the call ended,
    which a cancel that races the handler's start makes happen; the handler
    then marks the record cancelled.)"""
    return rec.terminated or rec.cancelled or rec.completed


# -- gRPC calls carrying messages as given (no wrapping) ---------------------

def _result(call_or_err, responses, ok=True):
    if ok:
        return H.CallResult(call_or_err.code(), call_or_err.details(), responses,
                            call_or_err.initial_metadata(), call_or_err.trailing_metadata())
    return H._result_from_error(call_or_err, responses)


def g_unary(ch, method, message, md=(), timeout=20):
    fn = ch.unary_unary(SERVICE + method if not method.startswith("/") else method)
    try:
        resp, call = fn.with_call(message, metadata=list(md), timeout=timeout)
        return _result(call, [resp])
    except grpc.RpcError as e:
        return _result(e, [], ok=False)


def g_server(ch, method, message, md=(), timeout=30, sink=None):
    it = ch.unary_stream(SERVICE + method)(message, metadata=list(md), timeout=timeout)
    got = []
    try:
        for m in it:
            if sink is not None:
                sink(m)
            else:
                got.append(m)
        return _result(it, got)
    except grpc.RpcError as e:
        return _result(e, got, ok=False)


def g_client(ch, method, messages, md=(), timeout=30):
    fn = ch.stream_unary(SERVICE + method)
    try:
        resp, call = fn.with_call(iter(messages), metadata=list(md), timeout=timeout)
        return _result(call, [resp])
    except grpc.RpcError as e:
        return _result(e, [], ok=False)


# -- raw HTTP/2 ----------------------------------------------------------------

def h2_send(c, path, frames, extra=(), end=True):
    """Opens a stream and sends each element of |frames| as its own DATA
    frame, then END_STREAM. Stops sending if the proxy already closed it."""
    sid = c.conn.get_next_available_stream_id()
    c.responses[sid] = H.H2Response(sid)
    c.conn.send_headers(sid, c.grpc_headers(path, extra=extra), end_stream=False)
    c._flush()
    try:
        for f in frames:
            c.conn.send_data(sid, f)
            c._flush()
        if end:
            c.conn.end_stream(sid)
            c._flush()
    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
        pass
    return sid


def h2_status(r):
    """(grpc-status int, grpc-message unquoted) from trailers or a
    trailers-only response."""
    block = r.trailers if r.trailers else r.headers
    d = dict(block)
    st = d.get("grpc-status")
    m = d.get("grpc-message")
    return (int(st) if st is not None else None,
            urllib.parse.unquote(m) if m is not None else None)


# -- rendezvous hashing, as docs/routing.md defines it ---------------------------

_M64 = (1 << 64) - 1
HASH_KEY = bytes(range(16))


def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & _M64


def siphash24(key, data):
    k0 = int.from_bytes(key[:8], "little")
    k1 = int.from_bytes(key[8:], "little")
    v = [k0 ^ 0x736f6d6570736575, k1 ^ 0x646f72616e646f6d,
         k0 ^ 0x6c7967656e657261, k1 ^ 0x7465646279746573]

    def rnd():
        v[0] = (v[0] + v[1]) & _M64
        v[1] = _rotl(v[1], 13) ^ v[0]
        v[0] = _rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & _M64
        v[3] = _rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & _M64
        v[3] = _rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & _M64
        v[1] = _rotl(v[1], 17) ^ v[2]
        v[2] = _rotl(v[2], 32)

    def block(m):
        v[3] ^= m
        rnd()
        rnd()
        v[0] ^= m

    n = len(data)
    for i in range(0, n - n % 8, 8):
        block(int.from_bytes(data[i:i + 8], "little"))
    tail = data[n - n % 8:]
    block(((n & 0xFF) << 56) | int.from_bytes(tail, "little"))
    v[2] ^= 0xFF
    for _ in range(4):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def hrw_rank(tenant, user_id, session_id, names):
    """Backend names in the session's order of preference, equal weights:
    score = -1/ln(u) grows with u, so the largest (h >> 12) wins; ties go to
    the name that sorts first."""
    prefix = b"\0".join(s.encode() for s in (tenant, user_id, session_id)) + b"\0"
    keyed = [(siphash24(HASH_KEY, prefix + n.encode()) >> 12, n) for n in names]
    return [n for _, n in sorted(keyed, key=lambda t: (-t[0], t[1]))]


# -- JWT -------------------------------------------------------------------------

class Idp:
    def __init__(self, d):
        self.secret = os.urandom(32).hex().encode()
        self.secret_file = write_file(os.path.join(d, "hmac.key"), self.secret + b"\n")

    def auth(self):
        return {"jwt_providers": [{"name": "corp", "issuer": ISS, "audiences": [AUD],
                                   "keys": [{"alg": "HS256",
                                             "secret_file": self.secret_file}]}]}

    def token(self, sub, **extra):
        now = int(time.time())
        c = {"iss": ISS, "sub": sub, "aud": AUD, "iat": now, "exp": now + 600}
        c.update(extra)
        t = pyjwt.encode(c, self.secret, algorithm="HS256")
        return t if isinstance(t, str) else t.decode()

    def md(self, sub, **extra):
        return [("authorization", "Bearer " + self.token(sub, **extra))]


def jwt_listener(name="public"):
    return H.tls_listener(name, auth={"methods": ["jwt"]})


def backends(prefix, ups, named=True):
    out = []
    for i, u in enumerate(ups):
        b = {"address": "127.0.0.1", "port": u.port}
        if named:
            b["name"] = "%s-%d" % (prefix, i + 1)
        out.append(b)
    return out


def make_config(listeners, tenants, selectors=None, workers=1, **top):
    cfg = H.base_config(1, listeners=listeners, workers=workers, **top)
    cfg["tenants"] = tenants
    if selectors is not None:
        cfg["tenant_selectors"] = selectors
    return cfg


# ---------------------------------------------------------------------------

class TenantCase(H.SparkgateTestCase):
    """Calls are tagged (x-test-case) so each one's record is found among the
    stand-ins of a class."""

    sg = None
    ups = ()

    def setUp(self):
        super().setUp()
        if self.sg is not None:
            self._started.append(self.sg)
        self._n = 0

    def tag(self):
        self._n += 1
        return "%s-%d" % (self._testMethodName, self._n)

    def records(self, tag, ups=None):
        out = []
        for i, u in enumerate(ups or self.ups):
            out.extend((i, r) for r in u.calls() if r.header("x-test-case") == tag)
        return out

    def record_of(self, tag, ups=None, timeout=5):
        """(index of the stand-in, its record) of the one call tagged |tag|."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.records(tag, ups)
            if got:
                self.assertEqual(len(got), 1, got)
                return got[0]
            if time.monotonic() > deadline:
                self.fail("no upstream saw call %s; log:\n%s" % (tag, self.sg.log_text(20)))
            time.sleep(0.01)

    def assert_reached_nothing(self, tag, ups=None):
        self.assertEqual(self.records(tag, ups), [], "call %s reached an upstream" % tag)

    def assert_no_complete(self, tag, ups=None):
        """The upstream may have seen the start of the call, never its end."""
        for i, rec in self.records(tag, ups):
            u = (ups or self.ups)[i]
            u.wait_for(lambda _r, rec=rec: call_over(rec), timeout=10)
            self.assertFalse(rec.completed, rec)
            self.assertFalse(rec.request_done, rec)


# ---------------------------------------------------------------------------
# Selection, user_id modes and credentials: three tenants, two stand-ins each

class TenantWorldTest(TenantCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = H.tempdir("sg-tenants-")
        cls.idp = Idp(cls.dir)
        cls.ups = [H.start_standin() for _ in range(6)]
        for u in cls.ups:
            u.record_raw = True
        cls.acme_ups, cls.globex_ups, cls.initech_ups = (
            cls.ups[0:2], cls.ups[2:4], cls.ups[4:6])
        cls.acme_token = "acme-upstream-%s" % os.urandom(8).hex()
        cls.globex_token = "globex.upstream_%s" % os.urandom(8).hex()
        os.makedirs(os.path.join(cls.dir, "secrets"))
        write_file(os.path.join(cls.dir, "secrets", "acme-token"), cls.acme_token + "\n")
        table = {
            "tenant_selectors": ["jwt_claim:tenant", "header:x-spark-tenant", "authority",
                                 "identity"],
            "tenants": [
                {"name": "acme", "hosts": ["acme.spark.test"],
                 "backends": backends("acme", cls.acme_ups),
                 "allow": {"identities": ["alice"],
                           "claims": {"groups": ["acme-analysts"]}},
                 "user_id": "rewrite",
                 "upstream_credential": {"file": "secrets/acme-token"}},
                {"name": "globex", "hosts": ["globex.spark.test"],
                 "backends": backends("globex", cls.globex_ups),
                 "allow": {"identities": ["bob"], "identity_prefixes": ["svc/globex/"]},
                 "user_id": "enforce",
                 "upstream_credential": {"env": "GLOBEX_SPARK_TOKEN"}},
                {"name": "initech",
                 "backends": backends("initech", cls.initech_ups),
                 "allow": {"identities": ["carol", "alice"]},
                 "user_id": "off"},
            ],
        }
        write_file(os.path.join(cls.dir, "tenants.json"), json.dumps(table, indent=1))
        cfg = H.base_config(1, listeners=[jwt_listener()], workers=2, auth=cls.idp.auth())
        del cfg["tenants"]
        cfg["routing_table"] = "tenants.json"
        cls.sg = H.Sparkgate(cfg, env={"GLOBEX_SPARK_TOKEN": cls.globex_token},
                             config_dir=cls.dir).start()
        cls.port = cls.sg.port("public")
        cls.ch = H.tls_channel(cls.port)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        rc = cls.sg.stop()
        for u in cls.ups:
            H.stop_standin(u)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def group(self, tenant):
        return {"acme": self.acme_ups, "globex": self.globex_ups,
                "initech": self.initech_ups}[tenant]

    # -- calls -------------------------------------------------------------------
    def call_ok(self, tenant, md, user_id, ch=None, payload=None, method="AnalyzePlan"):
        """A call that must reach |tenant|; returns (index in group, record)."""
        tag = self.tag()
        payload = payload if payload is not None else tag.encode()
        r = g_unary(ch or self.ch, method, msg(payload, new_session(), user_id),
                    list(md) + [("x-test-case", tag)])
        self.assertEqual(r.code, OK, (tag, r, self.sg.log_text(5)))
        self.assertEqual(r.response, payload)
        i, rec = self.record_of(tag)
        self.assertEqual(header_of(rec, "x-sparkgate-tenant"), [tenant], rec.metadata)
        self.assertIn(self.ups[i], self.group(tenant), "call went to another tenant's backend")
        return i, rec

    def call_denied(self, md, code, message, reason, ch=None, user_id="x"):
        """|code| with |message| (never naming a tenant), the log names
        |reason|, and no upstream saw the call."""
        tag = self.tag()
        mark = self.sg.mark()
        r = g_unary(ch or self.ch, "AnalyzePlan", msg(b"no", new_session(), user_id),
                    list(md) + [("x-test-case", tag)])
        self.assertEqual((r.code, r.details), (code, message), (tag, r))
        for t in ("acme", "globex", "initech"):
            self.assertNotIn(t, r.details or "")
        self.sg.wait_for_log(reason, timeout=5, since=mark)
        self.assert_reached_nothing(tag)
        return r

    # -- selection ---------------------------------------------------------------
    def test_select_by_jwt_claim(self):
        idp = self.idp
        # alice may use acme and initech: the claim chooses between them.
        self.call_ok("acme", idp.md("alice", tenant="acme"), "alice")
        self.call_ok("initech", idp.md("alice", tenant="initech"), "alice")
        # The claim decides before the header and the authority.
        ch = H.tls_channel(self.port, options=[("grpc.default_authority", "acme.spark.test")])
        self.addCleanup(ch.close)
        self.call_ok("initech", idp.md("alice", tenant="initech")
                     + [("x-spark-tenant", "acme")], "alice", ch=ch)
        # A claim naming a tenant the caller is not allowed on is refused;
        # the header that would have been fine is not tried.
        self.call_denied(idp.md("bob", tenant="acme") + [("x-spark-tenant", "globex")],
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED,
                         r"grpc-status 7: %s: not_allowed \(selector jwt_claim:tenant, "
                         r"tenant acme, identity bob\)" % MSG_DENIED)
        # A tenant that does not exist: the same answer (no probing).
        self.call_denied(idp.md("alice", tenant="umbrella"),
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED,
                         r"unknown_tenant \(selector jwt_claim:tenant")
        # Names are case-sensitive.
        self.call_denied(idp.md("alice", tenant="ACME"),
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED, r"unknown_tenant")
        # Membership by claim: a group admits an identity not listed.
        self.call_ok("acme", idp.md("dana", tenant="acme", groups=["x", "acme-analysts"]),
                     "dana")
        self.call_denied(idp.md("dana", tenant="acme", groups=["globex-analysts"]),
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED, r"not_allowed")

    def test_select_by_header(self):
        idp = self.idp
        self.call_ok("globex", idp.md("bob") + [("x-spark-tenant", "globex")], "bob")
        self.call_ok("initech", idp.md("alice") + [("x-spark-tenant", "initech")], "alice")
        # The header decides before the authority.
        ch = H.tls_channel(self.port, options=[("grpc.default_authority", "acme.spark.test")])
        self.addCleanup(ch.close)
        self.call_ok("globex", idp.md("svc/globex/etl") + [("x-spark-tenant", "globex")],
                     "svc/globex/etl", ch=ch)
        # A header never grants access.
        self.call_denied(idp.md("bob") + [("x-spark-tenant", "acme")],
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED,
                         r"not_allowed \(selector header:x-spark-tenant, tenant acme, "
                         r"identity bob\)")
        self.call_denied(idp.md("bob") + [("x-spark-tenant", "nope")],
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED,
                         r"unknown_tenant \(selector header:x-spark-tenant")
        # A prefix admits only what is under it.
        self.call_denied(idp.md("svc/globex-evil/x") + [("x-spark-tenant", "globex")],
                         grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED, r"not_allowed")

    def test_select_by_authority(self):
        idp = self.idp
        ch = H.tls_channel(self.port, options=[("grpc.default_authority", "acme.spark.test")])
        self.addCleanup(ch.close)
        # alice is admitted by acme and initech (the identity selector would
        # find both): the authority picks acme.
        self.call_ok("acme", idp.md("alice"), "alice", ch=ch)
        self.call_ok("acme", idp.md("dana", groups=["acme-analysts"]), "dana", ch=ch)
        # A caller the authority's tenant does not admit is refused, not
        # sent on to the identity selector (which would find initech).
        self.call_denied(idp.md("carol"), grpc.StatusCode.PERMISSION_DENIED, MSG_DENIED,
                         r"not_allowed \(selector authority, tenant acme, identity carol\)",
                         ch=ch)
        # Raw :authority: case, port and a trailing dot do not matter.
        with H.H2Client(self.port) as c:
            for authority, user, tenant in (
                    ("ACME.Spark.Test.:%d" % self.port, "alice", "acme"),
                    ("acme.spark.test.", "alice", "acme"),
                    ("GLOBEX.SPARK.TEST:%d" % self.port, "bob", "globex"),
                    ("globex.spark.test.", "alice", None)):
                c.authority = authority
                tag = self.tag()
                body = frame(msg(b"auth", new_session(), user))
                mark = self.sg.mark()
                sid = h2_send(c, SERVICE + "AnalyzePlan", [body],
                              extra=idp.md(user) + [("x-test-case", tag)])
                r = c.wait(sid)
                if tenant is None:
                    self.assertEqual(h2_status(r), (7, MSG_DENIED), (authority, r))
                    self.sg.wait_for_log(r"not_allowed \(selector authority, tenant globex, "
                                         r"identity alice\)", timeout=5, since=mark)
                    self.assert_reached_nothing(tag)
                    continue
                self.assertEqual(h2_status(r), (0, None), (authority, r))
                self.assertEqual(H.grpc_unframe(r.data), [b"auth"])
                i, rec = self.record_of(tag)
                self.assertEqual(header_of(rec, "x-sparkgate-tenant"), [tenant])
                self.assertIn(self.ups[i], self.group(tenant))

    def test_select_by_identity(self):
        idp = self.idp
        # carol is admitted by initech only; the authority 127.0.0.1 is no
        # tenant's host, so the identity selector decides.
        self.call_ok("initech", idp.md("carol"), "carol")
        self.call_ok("globex", idp.md("svc/globex/nightly"), "svc/globex/nightly")
        # alice is admitted by two tenants: ambiguous, refused.
        self.call_denied(idp.md("alice"), grpc.StatusCode.PERMISSION_DENIED, MSG_NO_TENANT,
                         r"grpc-status 7: %s: ambiguous_identity" % MSG_NO_TENANT)
        # Nobody admits mallory.
        self.call_denied(idp.md("mallory"), grpc.StatusCode.PERMISSION_DENIED, MSG_NO_TENANT,
                         r"grpc-status 7: %s: no_tenant" % MSG_NO_TENANT)
        # A claim that is not a string yields nothing; carol still lands by identity.
        self.call_ok("initech", idp.md("carol", tenant=["acme"]), "carol")
        # An empty header yields nothing either.
        self.call_ok("initech", idp.md("carol") + [("x-spark-tenant", "")], "carol")

    # -- user_id: enforce ------------------------------------------------------
    def raw_call(self, c, method, frames, md, tag=None):
        tag = tag or self.tag()
        sid = h2_send(c, SERVICE + method, frames, extra=list(md) + [("x-test-case", tag)])
        return tag, c.wait(sid)

    def test_user_id_enforce(self):
        md = self.idp.md("bob", tenant="globex")
        with H.H2Client(self.port) as c:
            body = msg(b"mine", new_session(), "bob", user_name="Bob B.")
            tag, r = self.raw_call(c, "AnalyzePlan", [frame(body)], md)
            self.assertEqual(h2_status(r), (0, None), r)
            self.assertEqual(H.grpc_unframe(r.data), [b"mine"])
            _, rec = self.record_of(tag, self.globex_ups)
            self.assertEqual(rec.raw_requests, [body])

            for bad_user, why in (("mallory", "user_id is not the authenticated identity"),
                                  ("Bob", "user_id is not the authenticated identity"),
                                  ("bob ", "user_id is not the authenticated identity"),
                                  (None, "no user_id")):
                mark = self.sg.mark()
                body = msg(b"theirs", new_session(), bad_user)
                tag, r = self.raw_call(c, "AnalyzePlan", [frame(body)], md)
                self.assertEqual(h2_status(r), (7, MSG_USER_ID), (bad_user, r))
                self.assertTrue(r.trailers_only, r)
                self.sg.wait_for_log(r"grpc-status 7: %s: message 1: %s"
                                     % (MSG_USER_ID, why), timeout=5, since=mark)
                self.assert_reached_nothing(tag)

    def test_user_id_enforce_forged_in_tenth_upload_message(self):
        md = self.idp.md("bob", tenant="globex")
        sid_ = new_session()
        good = [msg(b"chunk-%02d" % i + os.urandom(40), sid_, "bob") for i in range(10)]
        with H.H2Client(self.port) as c:
            # All ten honest: the upload goes through byte for byte.
            tag, r = self.raw_call(c, "AddArtifacts", [frame(m) for m in good], md)
            self.assertEqual(h2_status(r), (0, None), r)
            summary = json.loads(H.grpc_unframe(r.data)[0])
            self.assertEqual(summary["messages"], 10)
            home, rec = self.record_of(tag, self.globex_ups)
            self.assertEqual(rec.raw_requests, good)

            # The tenth claims another user.
            forged = good[:9] + [msg(b"chunk-09", sid_, "mallory")]
            mark = self.sg.mark()
            tag, r = self.raw_call(c, "AddArtifacts", [frame(m) for m in forged], md)
            self.assertEqual(h2_status(r), (7, MSG_USER_ID), r)
            self.sg.wait_for_log(r"grpc-status 7: %s: message 10: user_id is not the "
                                 r"authenticated identity" % MSG_USER_ID,
                                 timeout=5, since=mark)
            i, rec = self.record_of(tag, self.globex_ups)
            self.assertEqual(i, home)  # the same session, the same backend
            self.globex_ups[i].wait_for(lambda _r: call_over(rec), timeout=10)
            self.assertFalse(rec.completed, rec)
            self.assertFalse(rec.request_done, rec)
            self.assertLessEqual(rec.messages, 9, rec)
            # What did arrive is the honest prefix, byte for byte.
            self.assertEqual(rec.raw_requests, good[:len(rec.raw_requests)])
            # The same connection goes on working.
            tag, r = self.raw_call(c, "AnalyzePlan", [frame(good[0])], md)
            self.assertEqual(h2_status(r), (0, None), r)

    # -- user_id: rewrite ----------------------------------------------------------
    def test_user_id_rewrite(self):
        md = self.idp.md("alice", tenant="acme")
        ident = fb(1, "alice") + fb(2, "alice")
        ext = fb(3, fb(1, "type.googleapis.com/x") + fb(2, b"\x01\x02"))
        sess = new_session()
        tail = fb(15, b"rewrite-payload") + fb(4, b"\xff\x00\x80 other field")
        cases = [
            # (sent body, what the upstream must receive)
            (fb(1, sess) + fb(2, fb(1, "mallory") + fb(2, "Mallory M.") + ext) + tail,
             fb(1, sess) + fb(2, ident + ext) + tail),
            # user_id only, no user_name
            (fb(1, sess) + fb(2, fb(1, "someone")) + tail,
             fb(1, sess) + fb(2, ident) + tail),
            # already right: still re-encoded the same way
            (fb(1, sess) + fb(2, fb(1, "alice")) + tail,
             fb(1, sess) + fb(2, ident) + tail),
            # no user_context: inserted right after the prefix
            (fb(1, sess) + tail, fb(2, ident) + fb(1, sess) + tail),
            # user_context not first: rewritten where it is
            (fb(1, sess) + fb(15, b"early payload") + fb(2, ext + fb(1, "eve")) +
             fb(4, b"after"),
             fb(1, sess) + fb(15, b"early payload") + fb(2, ident + ext) + fb(4, b"after")),
        ]
        with H.H2Client(self.port) as c:
            for sent, want in cases:
                tag, r = self.raw_call(c, "AnalyzePlan", [frame(sent)], md)
                self.assertEqual(h2_status(r), (0, None), r)
                _, rec = self.record_of(tag, self.acme_ups)
                self.assertEqual(rec.raw_requests, [want], tag)
                self.assertEqual(P.user_id_of(rec.raw_requests[0]), "alice")
            # Every message of a stream is rewritten (ExecutePlan: one
            # request; AddArtifacts: many).
            msgs = [fb(1, sess) + fb(2, fb(1, "u%d" % i)) + fb(15, b"m%d" % i)
                    for i in range(5)]
            tag, r = self.raw_call(c, "AddArtifacts", [b"".join(frame(m) for m in msgs)], md)
            self.assertEqual(h2_status(r), (0, None), r)
            _, rec = self.record_of(tag, self.acme_ups)
            self.assertEqual(rec.raw_requests,
                             [fb(1, sess) + fb(2, ident) + fb(15, b"m%d" % i) for i in range(5)])

    # -- user_id: off --------------------------------------------------------------
    def test_user_id_off(self):
        md = self.idp.md("carol")
        with H.H2Client(self.port) as c:
            for body in (msg(b"as-is", new_session(), "somebody-else", "S. Else"),
                         msg(b"no-user", new_session(), None),
                         fb(1, new_session()) + fb(15, b"x") + fb(2, fb(1, "late"))):
                tag, r = self.raw_call(c, "AnalyzePlan", [frame(body)], md)
                self.assertEqual(h2_status(r), (0, None), r)
                _, rec = self.record_of(tag, self.initech_ups)
                self.assertEqual(rec.raw_requests, [body])
                self.assertEqual(header_of(rec, "x-sparkgate-tenant"), ["initech"])

    # -- malformed messages ------------------------------------------------------
    def test_malformed_messages_are_3(self):
        sess = new_session()

        def cases(u):
            return [
                # a second user_context at the end of the message
                (fb(1, sess) + fb(2, fb(1, u)) + fb(15, b"x") + fb(2, fb(1, u)), 0,
                 r"message 1: second user_context"),
                # no session_id
                (fb(2, fb(1, u)) + fb(15, b"x"), 0, r"message 1: no session_id"),
                # compressed flag
                (fb(1, sess) + fb(2, fb(1, u)) + fb(15, b"x"), 1,
                 r"message 1: compressed message refused"),
            ]

        with H.H2Client(self.port) as c:
            for tenant, user in (("acme", "alice"), ("globex", "bob"), ("initech", "alice")):
                md = self.idp.md(user, tenant=tenant)
                for body, flag, why in cases(user):
                    mark = self.sg.mark()
                    tag, r = self.raw_call(c, "AnalyzePlan", [frame(body, flag)], md)
                    self.assertEqual(h2_status(r), (3, MSG_INVALID), (tenant, why, r))
                    self.sg.wait_for_log(r"grpc-status 3: %s: %s" % (MSG_INVALID, why),
                                         timeout=5, since=mark)
                    self.assert_no_complete(tag)
                # A second user_context in a later message of a stream.
                ok = msg(b"one", sess, user)
                bad = (fb(1, sess) + fb(2, fb(1, user)) + fb(2, fb(1, user)) + fb(15, b"2"))
                tag, r = self.raw_call(c, "AddArtifacts", [frame(ok), frame(bad)], md)
                self.assertEqual(h2_status(r), (3, MSG_INVALID), r)
                self.assert_no_complete(tag)

    # -- DATA frame boundaries -----------------------------------------------------
    def test_split_messages_arrive_byte_exact(self):
        ident = fb(1, "alice") + fb(2, "alice")
        ext = fb(3, b"e" * 40)
        uc_sent, uc_want = fb(2, fb(1, "zed") + ext), fb(2, ident + ext)
        modes = [
            # (tenant, caller, make(session) -> body, body -> what the upstream gets)
            ("initech", "carol", lambda s: msg(b"off-" + os.urandom(8), s, "whoever"), None),
            ("globex", "bob", lambda s: msg(b"enf-" + os.urandom(8), s, "bob"), None),
            ("acme", "alice",
             lambda s: fb(1, s) + uc_sent + fb(15, b"rw-" + os.urandom(8)),
             lambda b: b.replace(uc_sent, uc_want, 1)),
        ]
        with H.H2Client(self.port) as c:
            for tenant, caller, make, rewrite in modes:
                md = self.idp.md(caller, tenant=tenant)
                group = self.group(tenant)
                # One larger message (two of them in one stream) as 1-byte frames.
                s = new_session()
                bodies = [make(s) + fb(15, os.urandom(150)), make(s)]
                wire = b"".join(frame(b) for b in bodies)
                tag, r = self.raw_call(c, "AddArtifacts",
                                       [wire[i:i + 1] for i in range(len(wire))], md)
                self.assertEqual(h2_status(r), (0, None), (tenant, r))
                _, rec = self.record_of(tag, group)
                want = [rewrite(b) if rewrite else b for b in bodies]
                self.assertEqual(rec.raw_requests, want, tenant)
                # A small message split in two at every point.
                body = make(new_session())
                f = frame(body)
                want = rewrite(body) if rewrite else body
                for cut in range(1, len(f)):
                    tag, r = self.raw_call(c, "AnalyzePlan", [f[:cut], f[cut:]], md)
                    self.assertEqual(h2_status(r), (0, None), (tenant, cut, r))
                    _, rec = self.record_of(tag, group)
                    self.assertEqual(rec.raw_requests, [want], (tenant, cut))

    # -- upstream credential -------------------------------------------------------
    def test_upstream_credential_replaces_client_authorization(self):
        idp = self.idp
        for tenant, user, want in (("acme", "alice", "Bearer " + self.acme_token),
                                   ("globex", "bob", "Bearer " + self.globex_token)):
            for method in ("AnalyzePlan", "ExecutePlan", "AddArtifacts"):
                tag = self.tag()
                md = idp.md(user, tenant=tenant) + [("x-test-case", tag)]
                m = msg(b"cred", new_session(), user)
                if method == "AnalyzePlan":
                    r = g_unary(self.ch, method, m, md)
                elif method == "ExecutePlan":
                    r = g_server(self.ch, method, m, md)
                else:
                    r = g_client(self.ch, method, [m, m], md)
                self.assertEqual(r.code, OK, (tenant, method, r))
                _, rec = self.record_of(tag, self.group(tenant))
                self.assertEqual(header_of(rec, "authorization"), [want], rec.metadata)
                self.assertEqual(header_of(rec, "x-sparkgate-identity"), [user])
        # No credential configured: no authorization at all.
        _, rec = self.call_ok("initech", idp.md("carol"), "carol")
        self.assertEqual(header_of(rec, "authorization"), [], rec.metadata)
        # --check-config names the source and never prints the secret.
        rc, out, err = H.run_cli(["--check-config", "-c", self.sg.config_path],
                                 env={"GLOBEX_SPARK_TOKEN": self.globex_token})
        self.assertEqual(rc, 0, err)
        self.assertNotIn(self.acme_token, out + err)
        self.assertNotIn(self.globex_token, out + err)
        self.assertIn("env GLOBEX_SPARK_TOKEN", out)
        self.assertIn("acme-token", out)
        self.assertNotIn(self.acme_token, self.sg.log_text())
        self.assertNotIn(self.globex_token, self.sg.log_text())


# ---------------------------------------------------------------------------
# Affinity: 200 sessions, 3 backends, two workers, two processes

class AffinityTest(TenantCase):
    N = 200

    def test_sessions_stick_to_their_backend_everywhere(self):
        ups = [self.standin() for _ in range(3)]
        self.ups = ups
        d = H.tempdir("sg-aff-")
        names = ["aff-a", "aff-b", "aff-c"]
        table = {"tenant_selectors": ["identity"],
                 "tenants": [{"name": "aff",
                              "backends": [dict(b, name=n) for b, n in
                                           zip(backends("x", ups, named=False), names)],
                              "allow": {"identities": ["anonymous"]},
                              "user_id": "rewrite"}]}
        write_file(os.path.join(d, "tenants.json"), json.dumps(table))
        listener = [H.tls_listener("public")]
        cfg = H.base_config(1, listeners=listener, workers=2)
        del cfg["tenants"]
        cfg["routing_table"] = "tenants.json"
        sg1 = self.start_sparkgate(cfg, config_dir=d)
        d2 = H.tempdir("sg-aff2-")
        cfg2 = dict(cfg, workers=1, routing_table=os.path.join(d, "tenants.json"))
        sg2 = self.start_sparkgate(cfg2, config_dir=d2)
        self.sg = sg1
        chans = [H.tls_channel(sg1.port()) for _ in range(3)]
        ch2 = H.tls_channel(sg2.port())
        for ch in chans + [ch2]:
            self.addCleanup(ch.close)

        # The documented hash, checked on a reference vector first.
        self.assertEqual(siphash24(HASH_KEY, b""), 0x726fdb47dd0e0e31)
        self.assertEqual(siphash24(HASH_KEY, bytes(range(15))), 0xa129ca6149be45e5)

        sessions = [new_session() for _ in range(self.N)]

        def run(k):
            s = sessions[k]
            out = []
            for j, (method, kind) in enumerate((("ExecutePlan", "server"),
                                                ("ReattachExecute", "server"),
                                                ("ReleaseSession", "unary"),
                                                ("AnalyzePlan", "unary2"))):
                tag = "aff-%s-%s" % (s, method)
                md = [("x-test-case", tag)] + H.standin_md(count=1)
                m = msg(method.encode(), s, "client-says")
                if kind == "server":
                    r = g_server(chans[(k + j) % len(chans)], method, m, md)
                elif kind == "unary":
                    r = g_unary(chans[(k + j) % len(chans)], method, m, md)
                else:
                    r = g_unary(ch2, method, m, md)  # the second process
                out.append((tag, r))
            return out

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, range(self.N)))

        where = {}
        for i, u in enumerate(ups):
            for rec in u.calls():
                where.setdefault(rec.header("x-test-case"), []).append(i)
        per_backend = [0, 0, 0]
        for k, res in enumerate(results):
            homes = set()
            for tag, r in res:
                self.assertEqual(r.code, OK, (tag, r))
                self.assertEqual(len(where.get(tag, [])), 1, tag)
                homes.add(where[tag][0])
            self.assertEqual(len(homes), 1, "session %s went to backends %s"
                             % (sessions[k], sorted(homes)))
            home = homes.pop()
            per_backend[home] += 1
            # The backend the formula of docs/routing.md picks (user_id is
            # the identity under rewrite, not what the client wrote).
            self.assertEqual(names[home], hrw_rank("aff", "anonymous", sessions[k], names)[0],
                             sessions[k])
        for n in per_backend:
            self.assertGreaterEqual(n, 10, per_backend)
        self.assertEqual(sum(per_backend), self.N)
        # (sg1's calls came over three connections, which SO_REUSEPORT
        # spreads over its two workers: each worker hashes on its own.)
        self.assertTrue(sg1.alive() and sg2.alive())


# ---------------------------------------------------------------------------
# A backend down and back (one worker: one pool per backend)

class BackendHealthTest(TenantCase):
    def call(self, tenant, session):
        tag = self.tag()
        r = g_unary(self.ch, "AnalyzePlan", msg(tag.encode(), session, "u"),
                    [("x-spark-tenant", tenant), ("x-test-case", tag)])
        where = None
        if r.code == OK:
            where = self.record_of(tag)[0]
        else:
            self.assert_reached_nothing(tag)
        return r, where

    def session_homed(self, tenant, index):
        for _ in range(100):
            s = new_session()
            r, where = self.call(tenant, s)
            self.assertEqual(r.code, OK, r)
            if where == index:
                return s
        self.fail("no session of 100 landed on backend %d" % index)

    def test_backend_down_and_back(self):
        self.ups = [self.standin() for _ in range(3)]
        ups = self.ups
        ports = [u.port for u in ups]
        tenants = [
            # unnamed backends: named "127.0.0.1:PORT" inside, "#N" outside
            {"name": "hb", "backends": backends("hb", ups, named=False),
             "allow": {"any_identity": True}, "user_id": "off"},
            {"name": "hbf", "backends": backends("hbf", ups),
             "allow": {"any_identity": True}, "user_id": "off", "failover": True},
            {"name": "hbn", "backends": backends("hbn", ups),
             "allow": {"any_identity": True}, "user_id": "off"},
        ]
        cfg = make_config([H.tls_listener("public")], tenants,
                          selectors=["header:x-spark-tenant"],
                          upstream={"connect_timeout_ms": 2000, "idle_timeout_ms": 60000})
        self.sg = self.start_sparkgate(cfg)
        self.ch = H.tls_channel(self.sg.port())
        self.addCleanup(self.ch.close)

        s_hb = self.session_homed("hb", 1)
        s_hbf = self.session_homed("hbf", 1)
        s_hbn = self.session_homed("hbn", 1)
        s_home0 = self.session_homed("hb", 0)
        names_hbf = ["hbf-1", "hbf-2", "hbf-3"]
        rank = hrw_rank("hbf", "u", s_hbf, names_hbf)
        self.assertEqual(rank[0], "hbf-2")
        alternate = names_hbf.index(rank[1])

        # Stop the stand-in of backend 2.
        H.stop_standin(ups[1])
        mark = self.sg.mark()
        secret_bits = ("127.0.0.1", str(ports[1]), ":%d" % ports[1])
        for _ in range(3):
            r, _ = self.call("hb", s_hb)
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
            self.assertEqual(r.details, 'sparkgate: tenant "hb": backend #2 is unavailable')
            for bit in secret_bits:
                self.assertNotIn(bit, r.details)
        self.sg.wait_for_log(r"backend 127\.0\.0\.1:%d of tenant hb is down" % ports[1],
                             timeout=5, since=mark)
        # A named backend is called by its name.
        r, _ = self.call("hbn", s_hbn)
        self.assertEqual((r.code, r.details), (grpc.StatusCode.UNAVAILABLE,
                         'sparkgate: tenant "hbn": backend "hbn-2" is unavailable'))
        r, _ = self.call("hbn", s_hbn)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        # Other sessions do not notice.
        for _ in range(3):
            r, where = self.call("hb", s_home0)
            self.assertEqual((r.code, where), (OK, 0), r)

        # With failover the session moves to its next-ranked backend (the
        # first call may still find out the hard way).
        moved = None
        for _ in range(20):
            r, where = self.call("hbf", s_hbf)
            if r.code == OK:
                moved = where
                break
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
            self.assertEqual(r.details, 'sparkgate: tenant "hbf": backend "hbf-2" is unavailable')
        self.assertEqual(moved, alternate)
        for _ in range(3):
            r, where = self.call("hbf", s_hbf)
            self.assertEqual((r.code, where), (OK, alternate), r)

        # A stand-in on the same port again: the sessions come home.
        new = None
        for _ in range(50):
            try:
                new = StandIn(host="127.0.0.1", port=ports[1]).start()
                break
            except RuntimeError:
                time.sleep(0.1)
        self.assertIsNotNone(new, "cannot listen on port %d again" % ports[1])
        with H._lock:
            H._live_standins.add(new)
        self.addCleanup(H.stop_standin, new)
        self.ups = [ups[0], new, ups[2]]

        def comes_home(tenant, session, interim):
            for _ in range(300):
                r, where = self.call(tenant, session)
                if r.code == OK and where == 1:
                    return True
                if interim is None:
                    self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
                else:
                    self.assertEqual((r.code, where), (OK, interim), r)
                time.sleep(0.05)
            return False

        self.assertTrue(comes_home("hb", s_hb, None), self.sg.log_text(20))
        self.assertTrue(comes_home("hbf", s_hbf, alternate), self.sg.log_text(20))
        self.assertTrue(comes_home("hbn", s_hbn, None), self.sg.log_text(20))
        self.sg.wait_for_log(r"backend 127\.0\.0\.1:%d of tenant hb is up again" % ports[1],
                             timeout=5, since=mark)
        for _ in range(3):
            for tenant, s in (("hb", s_hb), ("hbf", s_hbf), ("hbn", s_hbn)):
                r, where = self.call(tenant, s)
                self.assertEqual((r.code, where), (OK, 1), r)


# ---------------------------------------------------------------------------
# Limits and the method allow-list (one worker: it enforces the whole limit)

class LimitsTest(TenantCase):
    @classmethod
    def setUpClass(cls):
        cls.ups = [H.start_standin() for _ in range(2)]

        def t(name, **kw):
            d = {"name": name, "backends": backends(name, cls.ups),
                 "allow": {"identities": ["anonymous"]}}
            d.update(kw)
            return d

        tenants = [
            t("lim-rpcs", limits={"max_concurrent_rpcs": 2}),
            t("lim-exec", limits={"max_concurrent_executions": 1}),
            t("lim-rate", limits={"requests_per_second": 1, "burst": 3}),
            t("lim-rate14", limits={"requests_per_second": 1, "burst": 2,
                                    "over_limit_status": "unavailable"}),
            t("lim-upload", limits={"upload_bytes_per_minute": 60000}),
            t("lim-methods", methods=["AnalyzePlan", "Config"]),
        ]
        cfg = make_config([H.tls_listener("public")], tenants,
                          selectors=["header:x-spark-tenant"], workers=1)
        cls.sg = H.Sparkgate(cfg).start()
        cls.ch = H.tls_channel(cls.sg.port())

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        rc = cls.sg.stop()
        for u in cls.ups:
            H.stop_standin(u)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def md(self, tenant, tag, **standin):
        return [("x-spark-tenant", tenant), ("x-test-case", tag)] + H.standin_md(**standin)

    def unary(self, tenant, method="AnalyzePlan", ch=None):
        tag = self.tag()
        r = g_unary(ch or self.ch, method, msg(tag.encode(), new_session(), "a"),
                    self.md(tenant, tag))
        return tag, r

    def stall(self, tenant, method="AnalyzePlan"):
        """A call the stand-in holds open; returns (tag, future or iterator)."""
        tag = self.tag()
        m = msg(b"stall", new_session(), "a")
        md = self.md(tenant, tag, mode="stall", stall_ms=30000)
        if method in ("ExecutePlan", "ReattachExecute"):
            call = self.ch.unary_stream(SERVICE + method)(m, metadata=md, timeout=40)
        else:
            call = self.ch.unary_unary(SERVICE + method).future(m, metadata=md, timeout=40)
        self.addCleanup(call.cancel)
        self.record_of(tag)
        return tag, call

    def assert_over(self, tag, r, code=grpc.StatusCode.RESOURCE_EXHAUSTED, message=MSG_LIMIT):
        self.assertEqual((r.code, r.details), (code, message), (tag, r))
        self.assert_reached_nothing(tag)

    def until_ok(self, tenant, method="AnalyzePlan"):
        """Slots come free once the proxy has seen the cancels: bounded retry."""
        for _ in range(200):
            tag, r = self.unary(tenant, method)
            if r.code == OK:
                return
            self.assert_over(tag, r)
            time.sleep(0.02)
        self.fail("the limit never freed up")

    def test_max_concurrent_rpcs(self):
        calls = [self.stall("lim-rpcs"), self.stall("lim-rpcs", "ExecutePlan")]
        mark = self.sg.mark()
        for method in ("AnalyzePlan", "ExecutePlan", "Config"):
            tag = self.tag()
            m, md = msg(b"x", new_session(), "a"), self.md("lim-rpcs", tag)
            if method == "ExecutePlan":
                r = g_server(self.ch, method, m, md)
            else:
                r = g_unary(self.ch, method, m, md)
            self.assert_over(tag, r)
        self.sg.wait_for_log(r"grpc-status 8: %s: tenant lim-rpcs is over its limit "
                             r"max_concurrent_rpcs" % MSG_LIMIT, timeout=5, since=mark)
        # At the limit, the tenant can still stop and free its work.
        for method in ("Interrupt", "ReleaseExecute", "ReleaseSession"):
            tag, r = self.unary("lim-rpcs", method)
            self.assertEqual(r.code, OK, (method, r))
        # Other tenants are not affected.
        tag, r = self.unary("lim-exec")
        self.assertEqual(r.code, OK, r)
        for _, call in calls:
            call.cancel()
        self.until_ok("lim-rpcs")
        # Two at once again, and the third refused: the slots were returned.
        calls = [self.stall("lim-rpcs"), self.stall("lim-rpcs")]
        tag, r = self.unary("lim-rpcs")
        self.assert_over(tag, r)
        for _, call in calls:
            call.cancel()
        self.until_ok("lim-rpcs")

    def test_max_concurrent_executions(self):
        _, call = self.stall("lim-exec", "ExecutePlan")
        mark = self.sg.mark()
        for method in ("ExecutePlan", "ReattachExecute"):
            tag = self.tag()
            r = g_server(self.ch, method, msg(b"x", new_session(), "a"),
                         self.md("lim-exec", tag))
            self.assert_over(tag, r)
        self.sg.wait_for_log(r"tenant lim-exec is over its limit max_concurrent_executions",
                             timeout=5, since=mark)
        # Other methods still go.
        for method in ("AnalyzePlan", "ReleaseSession"):
            tag, r = self.unary("lim-exec", method)
            self.assertEqual(r.code, OK, r)
        call.cancel()
        for _ in range(200):
            tag = self.tag()
            r = g_server(self.ch, "ExecutePlan", msg(b"x", new_session(), "a"),
                         self.md("lim-exec", tag))
            if r.code == OK:
                break
            self.assert_over(tag, r)
            time.sleep(0.02)
        self.assertEqual(r.code, OK, r)

    def burst(self, tenant, burst, code, n=20):
        results = [self.unary(tenant) for _ in range(n)]
        # The bucket starts full: the first |burst| calls go through.
        for tag, r in results[:burst]:
            self.assertEqual(r.code, OK, (tag, r))
        ok = [tag for tag, r in results if r.code == OK]
        refused = [(tag, r) for tag, r in results if r.code != OK]
        self.assertTrue(refused, "a burst of %d calls at 1/s with burst %d: none refused"
                        % (n, burst))
        for tag, r in refused:
            self.assert_over(tag, r, code)
        for tag in ok:
            self.record_of(tag)
        return ok, refused

    def test_requests_per_second_with_burst(self):
        mark = self.sg.mark()
        self.burst("lim-rate", 3, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.sg.wait_for_log(r"grpc-status 8: .*tenant lim-rate is over its limit "
                             r"requests_per_second", timeout=5, since=mark)

    def test_over_limit_status_unavailable(self):
        mark = self.sg.mark()
        self.burst("lim-rate14", 2, grpc.StatusCode.UNAVAILABLE)
        self.sg.wait_for_log(r"grpc-status 14: .*tenant lim-rate14 is over its limit "
                             r"requests_per_second", timeout=5, since=mark)

    def test_upload_bytes_per_minute(self):
        s = new_session()
        chunks = [msg(os.urandom(20000), s, "a") for _ in range(2)]
        tag = self.tag()
        r = g_client(self.ch, "AddArtifacts", chunks, self.md("lim-upload", tag))
        self.assertEqual(r.code, OK, r)
        self.assertEqual(json.loads(r.response)["messages"], 2)
        # About 20 KB left in the minute's bucket: 40 KB more does not fit.
        tag = self.tag()
        mark = self.sg.mark()
        r = g_client(self.ch, "AddArtifacts", chunks, self.md("lim-upload", tag))
        self.assertEqual((r.code, r.details),
                         (grpc.StatusCode.RESOURCE_EXHAUSTED, MSG_UPLOAD), r)
        self.sg.wait_for_log(r"tenant lim-upload is over its limit upload_bytes_per_minute \(\d+ bytes per worker\)", timeout=5, since=mark)
        self.assert_no_complete(tag)
        # Control calls are not metered: they still go.
        tag, r = self.unary("lim-upload", "Config")
        self.assertEqual(r.code, OK, r)

    def test_method_allow_list(self):
        tag, r = self.unary("lim-methods", "AnalyzePlan")
        self.assertEqual(r.code, OK, r)
        tag, r = self.unary("lim-methods", "Config")
        self.assertEqual(r.code, OK, r)
        mark = self.sg.mark()
        for method in ("ExecutePlan", "AddArtifacts", "ReleaseSession", "Interrupt"):
            tag = self.tag()
            m = msg(b"x", new_session(), "a")
            md = self.md("lim-methods", tag)
            if method == "ExecutePlan":
                r = g_server(self.ch, method, m, md)
            elif method == "AddArtifacts":
                r = g_client(self.ch, method, [m], md)
            else:
                r = g_unary(self.ch, method, m, md)
            self.assertEqual((r.code, r.details),
                             (grpc.StatusCode.PERMISSION_DENIED, MSG_METHOD), (method, r))
            self.assert_reached_nothing(tag)
        self.sg.wait_for_log(r"method AddArtifacts is not allowed for tenant lim-methods",
                             timeout=5, since=mark)
        # A name that is no Spark Connect method at all: 12, for any tenant.
        for tenant in ("lim-methods", "lim-exec"):
            tag, r = self.unary(tenant, "NotAMethod")
            self.assertEqual((r.code, r.details),
                             (grpc.StatusCode.UNIMPLEMENTED, MSG_NOT_SPARK), r)
            self.assert_reached_nothing(tag)


# ---------------------------------------------------------------------------
# Reload of the routing table during traffic

class ReloadTest(TenantCase):
    def table(self, red_ids, blue_ids):
        return {"tenant_selectors": ["identity"],
                "tenants": [
                    {"name": "red", "backends": backends("red", self.ups[0:2]),
                     "allow": {"identities": red_ids}, "user_id": "rewrite"},
                    {"name": "blue", "backends": backends("blue", self.ups[2:4]),
                     "allow": {"identities": blue_ids}, "user_id": "rewrite"}]}

    def fresh_call(self, user):
        ch = H.tls_channel(self.port)
        try:
            tag = self.tag()
            r = g_unary(ch, "AnalyzePlan", msg(tag.encode(), new_session(), user),
                        self.idp.md(user) + [("x-test-case", tag)])
            return r, tag
        finally:
            ch.close()

    def tenant_of(self, user, ch=None):
        tag = self.tag()
        r = g_unary(ch or self.ch, "AnalyzePlan", msg(tag.encode(), new_session(), user),
                    self.idp.md(user) + [("x-test-case", tag)])
        if r.code != OK:
            return r.code
        i, rec = self.record_of(tag)
        t = header_of(rec, "x-sparkgate-tenant")
        self.assertEqual(t, ["red"] if i < 2 else ["blue"], rec.metadata)
        return t[0]

    def test_reload_during_stream(self):
        self.ups = [self.standin() for _ in range(4)]
        d = H.tempdir("sg-reload-")
        self.idp = Idp(d)
        path = os.path.join(d, "tenants.json")
        write_file(path, json.dumps(self.table(["dave", "frank"], ["erin"])))
        cfg = H.base_config(1, listeners=[jwt_listener()], workers=1, auth=self.idp.auth())
        del cfg["tenants"]
        cfg["routing_table"] = "tenants.json"
        self.sg = self.start_sparkgate(cfg, config_dir=d)
        self.port = self.sg.port()
        self.ch = H.tls_channel(self.port)
        self.addCleanup(self.ch.close)
        self.assertEqual(self.tenant_of("dave"), "red")
        self.assertEqual(self.tenant_of("erin"), "blue")

        # A long stream for dave (red), 24 messages 100 ms apart.
        total, chunk, seed = 24 * 65536, 65536, 5
        h = hashlib.sha256()
        got = {"n": 0, "bytes": 0}
        result = {}
        ch = H.tls_channel(self.port)
        self.addCleanup(ch.close)

        def sink(m):
            h.update(m)
            got["n"] += 1
            got["bytes"] += len(m)

        def run():
            result["r"] = g_server(
                ch, "ExecutePlan", msg(b"long", new_session(), "dave"),
                self.idp.md("dave") + [("x-test-case", "long")]
                + H.standin_md("stream", bytes=total, chunk=chunk, seed=seed, interval_ms=100),
                timeout=60, sink=sink)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        i, rec = self.record_of("long", timeout=10)
        self.assertLess(i, 2)
        self.ups[i].wait_for(lambda _r: rec.responses >= 2, timeout=10)

        # dave moves to blue; frank stays on red.
        write_file(path, json.dumps(self.table(["frank"], ["erin", "dave"])))
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
        self.assertFalse(rec.completed, "the stream ended before the reload; make it longer")
        for _ in range(200):
            r, tag = self.fresh_call("dave")
            self.assertEqual(r.code, OK, r)
            if self.record_of(tag)[0] >= 2:
                break
            time.sleep(0.05)
        else:
            self.fail("dave never moved to blue; log:\n" + self.sg.log_text())
        # New calls on the old connection follow the new table too.
        self.assertEqual(self.tenant_of("dave"), "blue")
        self.assertEqual(self.tenant_of("frank"), "red")
        self.assertEqual(self.tenant_of("erin"), "blue")

        t.join(60)
        self.assertFalse(t.is_alive())
        res = result["r"]
        self.assertEqual(res.code, OK, res)
        self.assertEqual((got["n"], got["bytes"]), (total // chunk, total))
        self.assertEqual(h.hexdigest(), H.stream_sha256(seed, total, chunk))
        self.assertEqual(res.trailer("x-standin-sha256"), H.stream_sha256(seed, total, chunk))
        self.assertEqual(header_of(rec, "x-sparkgate-tenant"), ["red"])

        # A broken table: the reload fails, the table in force stays.
        for broken in ("{ not json", json.dumps({"tenants": []}),
                       json.dumps(self.table(["dave"], ["dave"]))):
            write_file(path, broken)
            mark = self.sg.mark()
            self.sg.send_signal(signal.SIGHUP)
            self.sg.wait_for_log(r"reload failed", timeout=10, since=mark)
            self.assertIsNone(self.sg.find_log(r"reload done", since=mark))
            for user, tenant in (("dave", "blue"), ("frank", "red"), ("erin", "blue")):
                r, tag = self.fresh_call(user)
                self.assertEqual(r.code, OK, (broken, r))
                self.assertEqual(self.tenant_of(user), tenant, broken)
        self.assertTrue(self.sg.alive())


if __name__ == "__main__":
    H.main()
