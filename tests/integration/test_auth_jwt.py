#!/usr/bin/python3
"""JWT authentication (issue 4), end to end against the real binary: a gRPC
client (or raw HTTP/2) over TLS -> sparkgate with auth.jwt_providers -> the
stand-in, which records what reached the upstream.

Keys are generated per run (python3-cryptography) and tokens minted here
(PyJWT, or by hand where PyJWT refuses to make the bad token). Covered:
RS256 / ES256 / HS256 tokens and the identity headers the upstream gets
(and no authorization); a JWKS file with several keys and kid selection;
every claim check (exp, nbf, iat, iss, aud and aud lists); alg none in
several casings; HS256 keyed with the RSA public key; tampered payload and
signature; unknown kid; duplicate claims; tokens over max_token_bytes and
1 MiB / 16 MiB tokens against the header-list cap (the process survives);
two authorization fields; authorization in request trailers; no token and
non-Bearer schemes; spoofed identity headers stripped and underscore
aliases refused; the verified-token cache; fresh RS256 and ES256 tokens
(PEM and JWKS keys, each parsed once at load) verified by both workers at
once, forged ones in between; key rotation by SIGHUP during an active
stream, and a broken key file on SIGHUP keeping the old keys.

Every denial is checked three ways: grpc-status 16 with the generic
message, a `rejected: unauthenticated: <reason>` log line naming the
reason, and no call recorded by the stand-in.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import grpc  # noqa: E402
import jwt as pyjwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

SERVICE = H.SERVICE
MIB = H.MIB
DENY_MESSAGE = "sparkgate: authentication required or failed"

ISS_RSA = "https://idp-rsa.test"
ISS_EC = "https://idp-ec.test"
ISS_HMAC = "https://idp-hmac.test"
ISS_JWKS = "https://idp-jwks.test"
ISS_ROT = "https://idp-rot.test"
AUD = "spark"


# ---------------------------------------------------------------------------
# Keys and tokens

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def int_b64url(n, length=None):
    length = length or (n.bit_length() + 7) // 8
    return b64url(n.to_bytes(length, "big"))


def new_rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_ec():
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_file(path, data):
    """Writes atomically (rename), so a reload never reads half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)
    return path


def jwk_of(key, kid, alg=None):
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        jwk = {"kty": "RSA", "kid": kid, "use": "sig",
               "n": int_b64url(nums.n), "e": int_b64url(nums.e)}
    else:
        nums = pub.public_numbers()
        jwk = {"kty": "EC", "kid": kid, "use": "sig", "crv": "P-256",
               "x": int_b64url(nums.x, 32), "y": int_b64url(nums.y, 32)}
    if alg:
        jwk["alg"] = alg
    return jwk


def claims(iss, sub="alice", aud=AUD, lifetime=600, **extra):
    """Claims valid now: iat now, exp now + lifetime (None drops a claim)."""
    now = int(time.time())
    c = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + lifetime}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def mint(key, alg, payload, kid=None, headers=None):
    """A signed token (PyJWT). key: private key object or HMAC bytes."""
    hdr = dict(headers or {})
    if kid is not None:
        hdr["kid"] = kid
    tok = pyjwt.encode(payload, key, algorithm=alg, headers=hdr or None)
    return tok if isinstance(tok, str) else tok.decode()


def hand_hs256(secret, header_json, payload_json):
    """A token built byte for byte: header and payload JSON given as text
    (so that it can say things a JSON encoder would not), signed HS256."""
    signing_input = b64url(header_json.encode()) + "." + b64url(payload_json.encode())
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def unsigned(header, payload, signature=""):
    return "%s.%s.%s" % (b64url(json.dumps(header).encode()),
                         b64url(json.dumps(payload).encode()), signature)


def bearer(token):
    return [("authorization", "Bearer " + token)]


class Idp:
    """Every key this file's providers use, made fresh per run."""

    def __init__(self, d):
        self.dir = d
        self.rsa = new_rsa()
        self.ec = new_ec()
        self.hmac = secrets.token_hex(24).encode()       # 48 bytes >= 32
        self.jwks_a = new_rsa()
        self.jwks_b = new_rsa()
        self.jwks_ec = new_ec()
        self.rsa_pem = write_file(os.path.join(d, "rsa.pub.pem"), public_pem(self.rsa))
        self.ec_pem = write_file(os.path.join(d, "ec.pub.pem"), public_pem(self.ec))
        self.hmac_file = write_file(os.path.join(d, "hmac.key"), self.hmac + b"\n")
        jwks = {"keys": [jwk_of(self.jwks_a, "k-a", "RS256"),
                         jwk_of(self.jwks_b, "k-b"),
                         jwk_of(self.jwks_ec, "k-ec", "ES256")]}
        self.jwks_file = write_file(os.path.join(d, "jwks.json"), json.dumps(jwks))

    def providers(self):
        return [
            {"name": "corp-rsa", "issuer": ISS_RSA, "audiences": [AUD],
             "keys": [{"alg": "RS256", "pem_file": self.rsa_pem}]},
            {"name": "corp-ec", "issuer": ISS_EC, "audiences": [AUD],
             "keys": [{"kid": "ec-1", "alg": "ES256", "pem_file": self.ec_pem}]},
            {"name": "corp-hmac", "issuer": ISS_HMAC, "audiences": [AUD],
             "keys": [{"alg": "HS256", "secret_file": self.hmac_file}]},
            {"name": "corp-jwks", "issuer": ISS_JWKS, "audiences": [AUD, "spark-alt"],
             "jwks_file": self.jwks_file},
        ]

    # Valid tokens, one per provider.
    def rs256(self, sub="alice", **kw):
        return mint(self.rsa, "RS256", claims(ISS_RSA, sub, **kw), kid="any-kid")

    def es256(self, sub="alice", **kw):
        return mint(self.ec, "ES256", claims(ISS_EC, sub, **kw), kid="ec-1")

    def hs256(self, sub="alice", **kw):
        return mint(self.hmac, "HS256", claims(ISS_HMAC, sub, **kw))


def auth_section(providers, **kw):
    a = {"jwt_providers": providers, "max_token_bytes": 8192,
         "token_cache_entries": 10000, "token_cache_max_ttl_s": 300}
    a.update(kw)
    return a


def jwt_listener(name="public"):
    return H.tls_listener(name, auth={"methods": ["jwt"]})


# ---------------------------------------------------------------------------
# Raw HTTP/2 for what gRPC will not send

def raw_literal_client(port):
    """An H2Client whose HPACK encoder writes plain literals (no Huffman):
    encoding megabytes with Huffman in Python would take seconds."""
    c = H.H2Client(port, timeout=15.0)
    orig = c.conn.encoder.encode
    c.conn.encoder.encode = lambda headers, huffman=True: orig(headers, huffman=False)
    return c


class AuthCase(H.SparkgateTestCase):
    """Shared helpers: calls tagged with x-test-case so the stand-in record
    of each call is found, and the three-way denial check."""

    sg = None
    up = None
    port = None

    def setUp(self):
        super().setUp()
        if self.sg is not None:
            self._started.append(self.sg)  # its log is printed on failure
        if self.up is not None:
            self.up.clear()
        self._n = 0

    def tag(self):
        self._n += 1
        return "%s-%d" % (self._testMethodName, self._n)

    def record_for(self, tag, timeout=5):
        return self.up.wait_for_call(None, timeout=timeout,
                                     where=lambda r: r.header("x-test-case") == tag)

    def call_ok(self, ch, md, method="AnalyzePlan", payload=None):
        """A call that must succeed; returns the stand-in's record of it."""
        tag = self.tag()
        payload = payload if payload is not None else tag.encode()
        r = H.call_unary(ch, method, payload, list(md) + [("x-test-case", tag)])
        self.assertEqual(r.code, grpc.StatusCode.OK, (tag, r, self.sg.log_text(5)))
        self.assertEqual(r.response, payload, tag)
        rec = self.record_for(tag)
        self.assertIsNone(rec.header("authorization"), rec.metadata)
        return rec

    def assert_identity(self, rec, identity, method, provider):
        md = rec.metadata
        self.assertEqual([v for k, v in md if k == "x-sparkgate-identity"], [identity], md)
        self.assertEqual([v for k, v in md if k == "x-sparkgate-auth-method"], [method], md)
        self.assertEqual([v for k, v in md if k == "x-sparkgate-identity-provider"],
                         [provider] if provider else [], md)
        self.assertEqual([v for k, v in md if k == "x-sparkgate-tenant"], ["default"], md)
        self.assertEqual([k for k, v in md if k == "authorization"], [], md)

    def assert_denied(self, ch, md, reason, method=None, sg=None, up=None):
        """grpc-status 16 + generic message, the log names |reason| (a
        regex for what follows `rejected: unauthenticated: `), and the
        upstream saw no call."""
        sg = sg or self.sg
        up = up or self.up
        tag = self.tag()
        path = SERVICE + (method or "AuthCase_" + re.sub(r"\W", "_", tag))
        mark = sg.mark()
        r = H.call_unary(ch, path, b"denied?", list(md) + [("x-test-case", tag)])
        self.assertEqual((r.code, r.details), (grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGE),
                         (tag, r))
        sg.wait_for_log(r"path=%s: rejected: unauthenticated: %s" % (re.escape(path), reason),
                        timeout=5, since=mark)
        self.assertEqual([c for c in up.calls() if c.header("x-test-case") == tag], [])
        return r

    def assert_upstream_only(self, tags_or_none=None):
        """After a control call, the stand-in holds no call but the allowed
        ones (proves nothing denied slipped through late)."""
        allowed = set(tags_or_none or ())
        extra = [c for c in self.up.calls() if c.header("x-test-case") not in allowed]
        self.assertEqual(extra, [], "calls reached the upstream that should not have")


# ---------------------------------------------------------------------------

class JwtTest(AuthCase):
    """One stand-in and one sparkgate (TLS listener, jwt only) for the class."""

    @classmethod
    def setUpClass(cls):
        cls.dir = H.tempdir("sg-jwt-")
        cls.idp = Idp(cls.dir)
        cls.up = H.start_standin()
        cfg = H.base_config(cls.up.port, listeners=[jwt_listener()],
                            auth=auth_section(cls.idp.providers()))
        cls.sg = H.Sparkgate(cfg).start()
        cls.port = cls.sg.port("public")
        cls.ch = H.tls_channel(cls.port)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def control(self, ch=None):
        rec = self.call_ok(ch or self.ch, bearer(self.idp.hs256(sub="control")))
        return rec.header("x-test-case")

    # -- valid tokens ----------------------------------------------------------
    def test_valid_rs256_es256_hs256(self):
        idp = self.idp
        for tok, sub, prov in ((idp.rs256("rsa-user"), "rsa-user", "corp-rsa"),
                               (idp.es256("ec-user"), "ec-user", "corp-ec"),
                               (idp.hs256("hmac-user"), "hmac-user", "corp-hmac")):
            rec = self.call_ok(self.ch, bearer(tok))
            self.assert_identity(rec, sub, "jwt", prov)
            self.assertIsNone(rec.header("x-forwarded-client-cert"), rec.metadata)
        # Every kind of RPC is authenticated, not just unary ones.
        tok = idp.rs256("streamer")
        r = H.call_server_stream(self.ch, "ExecutePlan", b"plan",
                                 bearer(tok) + H.standin_md(count=2)
                                 + [("x-test-case", "stream-1")])
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assert_identity(self.record_for("stream-1"), "streamer", "jwt", "corp-rsa")
        r = H.call_client_stream(self.ch, "AddArtifacts", [b"a", b"bc"],
                                 bearer(tok) + [("x-test-case", "upload-1")])
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assert_identity(self.record_for("upload-1"), "streamer", "jwt", "corp-rsa")

    def test_bearer_scheme_is_case_insensitive(self):
        # RFC 7235 2.1: the auth-scheme is case-insensitive.
        tok = self.idp.hs256("lower")
        rec = self.call_ok(self.ch, [("authorization", "bearer " + tok)])
        self.assert_identity(rec, "lower", "jwt", "corp-hmac")

    def test_jwks_several_keys_kid_selection(self):
        idp = self.idp
        ok = []
        for key, alg, kid, sub in ((idp.jwks_a, "RS256", "k-a", "ua"),
                                   (idp.jwks_b, "RS256", "k-b", "ub"),
                                   (idp.jwks_ec, "ES256", "k-ec", "uec")):
            tok = mint(key, alg, claims(ISS_JWKS, sub), kid=kid)
            rec = self.call_ok(self.ch, bearer(tok))
            self.assert_identity(rec, sub, "jwt", "corp-jwks")
            ok.append(rec.header("x-test-case"))
        # The kid picks the key: signed with k-a but naming k-b.
        tok = mint(idp.jwks_a, "RS256", claims(ISS_JWKS), kid="k-b")
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_signature")
        # A kid the JWKS does not hold.
        tok = mint(idp.jwks_a, "RS256", claims(ISS_JWKS), kid="nope")
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: unknown_kid")
        # No kid and several keys: no guessing.
        tok = mint(idp.jwks_a, "RS256", claims(ISS_JWKS))
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: unknown_kid")
        # A single key configured with a kid: another kid is unknown.
        tok = mint(idp.ec, "ES256", claims(ISS_EC), kid="ec-2")
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: unknown_kid")
        # The EC key with the RSA key's algorithm name is refused.
        tok = mint(idp.jwks_a, "RS256", claims(ISS_JWKS), kid="k-ec")
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_alg")
        self.assert_upstream_only(ok + [self.control()])

    def worker_of_channel(self, ch):
        """The worker carrying |ch|'s connection: a denied call's log line
        names the connection, whose id is n * 256 + the worker's index."""
        tag = self.tag()
        path = SERVICE + "WhichWorker_" + re.sub(r"\W", "_", tag)
        mark = self.sg.mark()
        r = H.call_unary(ch, path, b"", [("x-test-case", tag)])
        self.assertEqual(r.code, grpc.StatusCode.UNAUTHENTICATED, r)
        m = self.sg.wait_for_log(r"conn=(\d+) .*path=%s: rejected: unauthenticated" %
                                 re.escape(path), timeout=5, since=mark)
        return int(m.group(1)) % 256

    def test_fresh_tokens_on_both_workers_at_once(self):
        # RSA and EC keys are parsed once, at load, and shared by the
        # workers: both verify with them at the same time, every token new
        # (no verified-token cache hit), keys from PEM files and from a
        # JWKS, with forged tokens in between.
        idp = self.idp
        channels = {0: [], 1: []}
        for _ in range(40):  # bounded: until each worker holds 3 connections
            if min(len(c) for c in channels.values()) >= 3:
                break
            ch = H.tls_channel(self.port)
            self.addCleanup(ch.close)
            channels[self.worker_of_channel(ch)].append(ch)
        self.assertGreaterEqual(min(len(c) for c in channels.values()), 3,
                                "connections did not reach both workers")
        kinds = (
            (lambda sub: idp.rs256(sub), "corp-rsa"),
            (lambda sub: idp.es256(sub), "corp-ec"),
            (lambda sub: mint(idp.jwks_a, "RS256", claims(ISS_JWKS, sub), kid="k-a"),
             "corp-jwks"),
            (lambda sub: mint(idp.jwks_ec, "ES256", claims(ISS_JWKS, sub), kid="k-ec"),
             "corp-jwks"),
        )
        forged = (
            mint(idp.jwks_b, "RS256", claims(ISS_JWKS, "forged"), kid="k-a"),
            mint(new_ec(), "ES256", claims(ISS_EC, "forged"), kid="ec-1"),
        )
        jobs = []
        for w, chs in channels.items():
            for i, ch in enumerate(chs[:3]):
                calls = []
                for n in range(12):
                    sub = "w%d-c%d-n%d" % (w, i, n)
                    make, provider = kinds[n % len(kinds)]
                    calls.append((sub, provider, make(sub)))
                jobs.append((ch, calls))
        results = []
        lock = threading.Lock()

        def run(ch, calls):
            for n, (sub, provider, tok) in enumerate(calls):
                tag = "fresh-" + sub
                r = H.call_unary(ch, "AnalyzePlan", tag.encode(),
                                 bearer(tok) + [("x-test-case", tag)])
                bad = H.call_unary(ch, "AnalyzePlan", b"forged",
                                   bearer(forged[n % 2]) + [("x-test-case", "forged-" + sub)])
                with lock:
                    results.append((sub, provider, tag, r, bad))

        threads = [threading.Thread(target=run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(len(results), 6 * 12, "calls did not finish")
        for sub, provider, tag, r, bad in results:
            self.assertEqual(r.code, grpc.StatusCode.OK, (sub, r))
            self.assertEqual(r.response, tag.encode(), sub)
            self.assert_identity(self.record_for(tag), sub, "jwt", provider)
            self.assertEqual(bad.code, grpc.StatusCode.UNAUTHENTICATED, (sub, bad))
        self.assertEqual([c for c in self.up.calls()
                          if (c.header("x-test-case") or "").startswith("forged-")], [])
        self.assertTrue(self.sg.alive())

    # -- claims ------------------------------------------------------------------
    def test_time_claims(self):
        idp = self.idp
        now = int(time.time())
        cases = [
            (claims(ISS_HMAC, iat=now - 7200, exp=now - 3600), "jwt_invalid: expired"),
            (claims(ISS_HMAC, nbf=now + 3600, exp=now + 7200), "jwt_invalid: not_yet_valid"),
            (claims(ISS_HMAC, iat=now + 3600, exp=now + 7200),
             "jwt_invalid: issued_in_future"),
            (claims(ISS_HMAC, exp=None), "jwt_invalid: missing_claim"),
            (claims(ISS_HMAC, exp="%d" % (now + 600)), "jwt_invalid: malformed"),
        ]
        for payload, reason in cases:
            self.assert_denied(self.ch, bearer(mint(idp.hmac, "HS256", payload)), reason)
        # The same checks on an asymmetric provider.
        self.assert_denied(self.ch, bearer(mint(idp.rsa, "RS256", claims(
            ISS_RSA, iat=now - 7200, exp=now - 3600))), "jwt_invalid: expired")
        tags = [self.control()]
        self.assert_upstream_only(tags)

    def test_issuer_and_audience(self):
        idp = self.idp
        h = idp.hmac
        self.assert_denied(self.ch, bearer(mint(h, "HS256", claims("https://evil.test"))),
                           "jwt_invalid: unknown_issuer")
        # The issuer compares exactly: no prefix, case or slash games.
        for iss in (ISS_HMAC + "/", ISS_HMAC.upper(), ISS_HMAC[:-1]):
            self.assert_denied(self.ch, bearer(mint(h, "HS256", claims(iss))),
                               "jwt_invalid: unknown_issuer")
        self.assert_denied(self.ch, bearer(mint(h, "HS256", claims(ISS_HMAC, aud="other"))),
                           "jwt_invalid: wrong_audience")
        self.assert_denied(self.ch, bearer(mint(h, "HS256", claims(ISS_HMAC, aud="Spark"))),
                           "jwt_invalid: wrong_audience")
        self.assert_denied(self.ch, bearer(mint(h, "HS256", claims(
            ISS_HMAC, aud=["other", "spark-alt"]))), "jwt_invalid: wrong_audience")
        self.assert_denied(self.ch, bearer(mint(h, "HS256", claims(ISS_HMAC, aud=None))),
                           "jwt_invalid: missing_claim")
        no_iss = claims(ISS_HMAC)
        del no_iss["iss"]
        self.assert_denied(self.ch, bearer(mint(h, "HS256", no_iss)),
                           "jwt_invalid: missing_claim")
        ok = []
        # An audience list containing ours is accepted.
        rec = self.call_ok(self.ch, bearer(mint(h, "HS256", claims(
            ISS_HMAC, "aud-list", aud=["other", AUD, "third"]))))
        self.assert_identity(rec, "aud-list", "jwt", "corp-hmac")
        ok.append(rec.header("x-test-case"))
        # A provider with two audiences accepts either.
        rec = self.call_ok(self.ch, bearer(mint(idp.jwks_b, "RS256", claims(
            ISS_JWKS, "alt", aud="spark-alt"), kid="k-b")))
        self.assert_identity(rec, "alt", "jwt", "corp-jwks")
        ok.append(rec.header("x-test-case"))
        self.assert_upstream_only(ok)

    # -- algorithms and signatures -----------------------------------------------
    def test_alg_none_in_every_casing(self):
        payload = claims(ISS_HMAC, "root")
        for alg in ("none", "None", "NONE", "nOnE"):
            for sig in ("", b64url(b"\x00" * 32)):
                tok = unsigned({"alg": alg, "typ": "JWT"}, payload, sig)
                self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_alg")
        self.assert_upstream_only([self.control()])

    def test_hs256_keyed_with_the_rsa_public_key(self):
        # The classic confusion: the verifier's RSA public key (public
        # knowledge) used as an HMAC secret. The key is pinned to RS256.
        pem = public_pem(self.idp.rsa)
        for header in ({"alg": "HS256", "typ": "JWT"},
                       {"alg": "HS256", "typ": "JWT", "kid": "any-kid"}):
            tok = hand_hs256(pem, json.dumps(header), json.dumps(claims(ISS_RSA, "root")))
            self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_alg")
        # Same with the PEM without its trailing newline, and with the
        # JWKS provider's key (kid names an RSA key).
        tok = hand_hs256(pem.rstrip(b"\n"), json.dumps({"alg": "HS256"}),
                         json.dumps(claims(ISS_RSA, "root")))
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_alg")
        tok = hand_hs256(public_pem(self.idp.jwks_a), json.dumps({"alg": "HS256", "kid": "k-a"}),
                         json.dumps(claims(ISS_JWKS, "root")))
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_alg")
        # An RS256 token presented to the HMAC provider.
        tok = mint(self.idp.rsa, "RS256", claims(ISS_HMAC, "root"))
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: bad_alg")
        self.assert_upstream_only([self.control()])

    def test_tampered_payload_and_signature(self):
        for tok in (self.idp.rs256("honest"), self.idp.es256("honest"),
                    self.idp.hs256("honest")):
            h, p, s = tok.split(".")
            body = json.loads(b64url_decode(p))
            body["sub"] = "root"
            forged = "%s.%s.%s" % (h, b64url(json.dumps(body, separators=(",", ":")).encode()), s)
            self.assert_denied(self.ch, bearer(forged), "jwt_invalid: bad_signature")
            sig = bytearray(b64url_decode(s))
            sig[len(sig) // 2] ^= 0x01
            forged = "%s.%s.%s" % (h, p, b64url(bytes(sig)))
            self.assert_denied(self.ch, bearer(forged), "jwt_invalid: bad_signature")
            # The untouched token is fine (so only the tampering was wrong).
            rec = self.call_ok(self.ch, bearer(tok))
            self.assertEqual(rec.header("x-sparkgate-identity"), "honest")

    def test_duplicate_claims(self):
        secret = self.idp.hmac
        now = int(time.time())
        base = '"iss":"%s","aud":"%s","iat":%d,"exp":%d' % (ISS_HMAC, AUD, now, now + 600)
        header = '{"alg":"HS256","typ":"JWT"}'
        # The builder is right: without the duplicate the token is accepted.
        rec = self.call_ok(self.ch, bearer(hand_hs256(secret, header, '{%s,"sub":"a"}' % base)))
        self.assertEqual(rec.header("x-sparkgate-identity"), "a")
        ok = [rec.header("x-test-case")]
        for payload in ('{%s,"sub":"a","sub":"b"}' % base,
                        '{"sub":"a",%s,"sub":"a"}' % base,
                        '{%s,"exp":%d,"sub":"a"}' % (base, now + 600)):
            self.assert_denied(self.ch, bearer(hand_hs256(secret, header, payload)),
                               "jwt_invalid: malformed")
        # Duplicate header parameters too.
        self.assert_denied(self.ch, bearer(hand_hs256(
            secret, '{"alg":"HS256","alg":"none"}', '{%s,"sub":"a"}' % base)),
            "jwt_invalid: (malformed|bad_alg)")
        self.assert_upstream_only(ok)

    def test_malformed_tokens(self):
        tok = self.idp.hs256()
        h, p, s = tok.split(".")
        for bad in ("abc", h + "." + p, h + "." + p + ".", tok + ".x",
                    h + "=." + p + "." + s, "%s.%s.%s" % (h, p, s + "=="),
                    "%s.%s.%s" % (h, p + "%3D", s), "%s..%s" % (h, s)):
            self.assert_denied(self.ch, [("authorization", "Bearer " + bad)],
                               "jwt_invalid: malformed")
        # A payload that is valid JSON but not what was signed. (The
        # issuer, which picks the keys, is read before the signature: a
        # payload without iss is refused as missing_claim.)
        self.assert_denied(self.ch, bearer("%s.%s.%s" % (
            h, b64url(json.dumps({"iss": ISS_HMAC}).encode()), s)),
            "jwt_invalid: bad_signature")
        self.assert_denied(self.ch, bearer("%s.%s.%s" % (h, "e30", s)),
                           "jwt_invalid: missing_claim")
        self.assert_upstream_only([self.control()])

    def test_rfc9068_access_token_typ_is_accepted(self):
        """RFC 9068 JWT access tokens (what many identity providers issue
        for an API) carry typ "at+jwt" or "application/at+jwt": accepted,
        with every algorithm, as are "JWT", "application/jwt" and no typ.
        Any other typ names another kind of object and is refused
        (bad_typ), as is such a token whose signature does not verify."""
        ok = []
        for typ in ("at+jwt", "application/at+jwt", "AT+JWT", "application/jwt"):
            tok = mint(self.idp.hmac, "HS256", claims(ISS_HMAC, "rfc9068-user"),
                       headers={"typ": typ})
            rec = self.call_ok(self.ch, bearer(tok))
            self.assert_identity(rec, "rfc9068-user", "jwt", "corp-hmac")
            ok.append(rec.header("x-test-case"))
        at = {"typ": "at+jwt"}
        rec = self.call_ok(self.ch, bearer(mint(self.idp.rsa, "RS256",
                                                claims(ISS_RSA, "at-rsa"), headers=at)))
        self.assert_identity(rec, "at-rsa", "jwt", "corp-rsa")
        ok.append(rec.header("x-test-case"))
        rec = self.call_ok(self.ch, bearer(mint(self.idp.ec, "ES256", claims(ISS_EC, "at-ec"),
                                                kid="ec-1", headers=at)))
        self.assert_identity(rec, "at-ec", "jwt", "corp-ec")
        ok.append(rec.header("x-test-case"))
        forged = mint(new_rsa(), "RS256", claims(ISS_RSA, "at-forged"), headers=at)
        self.assert_denied(self.ch, bearer(forged), "jwt_invalid: bad_signature")
        other = mint(self.idp.hmac, "HS256", claims(ISS_HMAC), headers={"typ": "dpop+jwt"})
        self.assert_denied(self.ch, bearer(other), "jwt_invalid: bad_typ")
        self.assert_upstream_only(ok + [self.control()])

    # -- identities --------------------------------------------------------------
    def test_non_ascii_identity_is_not_forwarded_raw(self):
        """The identity goes upstream as a gRPC metadata value, which is
        printable ASCII (%x20-%x7E). grpc-java (Spark's server) reads such
        values as US-ASCII, every non-ASCII byte becoming U+FFFD, so raw
        UTF-8 would make "alic\u00e9" and "alic\u00e8" one identity at the
        backend. A token whose identity claim is not printable ASCII is
        refused (16, bad_identity), as a certificate identity would be."""
        for sub in ("alic\u00e9", "alic\u00e8", "al\u2028ice", "\u202eecila", "a\u0085b"):
            self.assert_denied(self.ch, bearer(self.idp.hs256(sub=sub)),
                               "jwt_invalid: bad_identity")
        self.assert_upstream_only([self.control()])

    def test_token_bound_to_a_key_is_not_accepted_as_a_bearer_token(self):
        """A token with cnf.jkt (RFC 9449 DPoP) or cnf.jwk (RFC 7800) is
        bound by its issuer to a key its holder must prove, which sparkgate
        does not check: it is refused (16, cnf_unsupported), never taken as
        a plain bearer token that works for whoever stole it."""
        jkt = b64url(hashlib.sha256(b"client key").digest())
        for cnf in ({"jkt": jkt},
                    {"jwk": {"kty": "EC", "crv": "P-256",
                             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}}):
            tok = mint(self.idp.hmac, "HS256", claims(ISS_HMAC, "bound-user", cnf=cnf))
            self.assert_denied(self.ch, bearer(tok), "jwt_invalid: cnf_unsupported")
        self.assert_upstream_only([self.control()])

    def test_token_over_max_token_bytes(self):
        # Fits the 16 KiB header-list cap, exceeds max_token_bytes 8192.
        tok = self.idp.hs256(pad="x" * 9000)
        self.assertGreater(len(tok), 8192)
        self.assertLess(len(tok), 14000)
        self.assert_denied(self.ch, bearer(tok), "jwt_invalid: too_long")
        self.assert_upstream_only([self.control()])

    # -- the authorization field itself -----------------------------------------
    def test_no_token_and_not_bearer(self):
        self.assert_denied(self.ch, [], "no_credentials")
        tok = self.idp.hs256()
        for value, reason in (
                ("Basic " + base64.b64encode(b"alice:secret").decode(), "not_bearer"),
                ("Token " + tok, "not_bearer"), ("Bearer" + tok, "not_bearer"),
                (tok, "not_bearer"), ("Bearer", "not_bearer"), ("MAC " + tok, "not_bearer"),
                ("Bearer-" + tok, "not_bearer"), ("Bearer x", "malformed")):
            self.assert_denied(self.ch, [("authorization", value)], "jwt_invalid: " + reason)
        # Two spaces after the scheme: still a Bearer token.
        rec = self.call_ok(self.ch, [("authorization", "Bearer  " + tok)])
        self.assert_identity(rec, "alice", "jwt", "corp-hmac")
        ok = [rec.header("x-test-case")]
        # What gRPC will not send: a tab after the scheme, an empty value,
        # and "Bearer " with nothing after it (trailing whitespace makes a
        # field malformed in HTTP/2, RFC 9113 8.2.1: a reset is fine too).
        for i, value in enumerate(("Bearer\t" + tok, "", "Bearer ")):
            tag = "raw-%d" % i
            path = SERVICE + "AuthCase_raw_%d" % i
            mark = self.sg.mark()
            with H.H2Client(self.port) as c:
                c.conn.config.validate_outbound_headers = False
                c.conn.config.normalize_outbound_headers = False
                resp = c.request(path, body=H.grpc_frame(b"x"), extra=[
                    ("x-test-case", tag), ("authorization", value)])
            self.assertEqual([r for r in self.up.calls() if r.header("x-test-case") == tag],
                             [], value)
            if resp.reset_code is None:
                self.assertEqual(resp.header("grpc-status"), "16", (value, resp))
                self.sg.wait_for_log(re.escape(path) + r": rejected: unauthenticated: "
                                     r"(jwt_invalid: (not_bearer|malformed)|no_credentials)",
                                     timeout=5, since=mark)
            else:
                self.assertIsNone(resp.trailer("grpc-status"), resp)
        self.assert_upstream_only(ok + [self.control()])

    def test_two_authorization_fields(self):
        good = self.idp.hs256("first")
        other = self.idp.hs256("second")
        for md in (bearer(good) + bearer(other), bearer(good) + bearer(good),
                   bearer(good) + [("authorization", "Basic eDp5")]):
            self.assert_denied(self.ch, md, "duplicate_authorization")
        # And on the wire, as separate fields in one header block.
        with H.H2Client(self.port) as c:
            path = SERVICE + "AuthCase_two_fields_raw"
            mark = self.sg.mark()
            resp = c.request(path, body=H.grpc_frame(b"x"), extra=[
                ("authorization", "Bearer " + good), ("x-test-case", "raw-dup"),
                ("authorization", "Bearer " + other)])
            self.assertTrue(resp.trailers_only, resp)
            self.assertEqual(resp.header("grpc-status"), "16", resp)
            self.sg.wait_for_log(re.escape(path) + r": rejected: unauthenticated: "
                                 r"duplicate_authorization", timeout=5, since=mark)
        self.assert_upstream_only([self.control()])

    def test_authorization_in_request_trailers(self):
        tok = self.idp.hs256("trailer-user")
        path = SERVICE + "AddArtifacts"
        with H.H2Client(self.port) as c:
            mark = self.sg.mark()
            sid = c.start(c.grpc_headers(path, extra=bearer(tok) + [("x-test-case", "trl")]),
                          body=H.grpc_frame(b"first chunk"), end_stream=False)
            # The headers were good: the call reached the upstream, which
            # has the first message and waits for the end of the upload.
            rec = self.up.wait_for_call(path, timeout=10,
                                        where=lambda r: r.header("x-test-case") == "trl"
                                        and r.messages >= 1)
            self.assertFalse(rec.completed, rec)
            c.conn.send_headers(sid, [("authorization", "Bearer " + tok)], end_stream=True)
            c._flush()
            resp = c.wait(sid)
            self.assertEqual(resp.status, 200, resp)
            got = resp.header("grpc-status") or resp.trailer("grpc-status")
            self.assertEqual(got, "16", resp)
            self.assertTrue(resp.trailers_only, resp)
            # The connection is fine afterwards.
            ok = c.request(SERVICE + "Config", body=H.grpc_frame(b"after"),
                           extra=bearer(tok) + [("x-test-case", "trl-after")])
            self.assertEqual(ok.trailer("grpc-status"), "0", ok)
        # Nothing completed upstream: the upload was cancelled, never ended.
        self.up.wait_for(lambda _: rec.terminated, timeout=10)
        self.assertFalse(rec.completed, rec)
        self.assertTrue(rec.cancelled, rec)
        self.assertFalse(rec.request_done, rec)
        self.assertIsNone(rec.header("authorization"), rec.metadata)
        self.sg.wait_for_log(r"path=%s: grpc-status 16: " % re.escape(path), timeout=5,
                             since=mark)
        uploads = [r for r in self.up.calls(path)]
        self.assertEqual([r.completed for r in uploads], [False], uploads)

    def test_oversized_tokens_do_not_hurt_the_process(self):
        pid = self.sg.pid
        for size in (MIB, 16 * MIB):
            tag = "huge-%d" % size
            tok = "a" * size
            outcome = None
            c = raw_literal_client(self.port)
            try:
                try:
                    sid = c.start(c.grpc_headers(SERVICE + "AnalyzePlan", extra=[
                        ("x-test-case", tag), ("authorization", "Bearer " + tok)]),
                        body=H.grpc_frame(b"x"))
                    resp = c.wait(sid, timeout=15)
                    outcome = resp
                except (OSError, TimeoutError) as e:
                    outcome = e   # the proxy closed (or stopped reading) first
                except Exception as e:  # h2 protocol state after a GOAWAY
                    outcome = e
            finally:
                c.close()
            if os.environ.get("SG_TEST_VERBOSE"):
                sys.stderr.write("oversized %d: %r\n" % (size, outcome))
            if isinstance(outcome, H.H2Response):
                # Refused one way or another: 16, a stream reset, or the
                # connection closed. Never a success.
                if outcome.status is not None and not outcome.connection_closed \
                        and outcome.reset_code is None:
                    st = outcome.header("grpc-status") or outcome.trailer("grpc-status")
                    self.assertEqual(st, "16", outcome)
                self.assertNotEqual(outcome.trailer("grpc-status"), "0", outcome)
            self.assertEqual([r for r in self.up.calls() if r.header("x-test-case") == tag], [])
            # Alive, the same process, and serving on a new connection.
            self.assertTrue(self.sg.alive(), self.sg.log_text(20))
            self.assertEqual(self.sg.pid, pid)
            ch = H.tls_channel(self.port)
            try:
                rec = self.call_ok(ch, bearer(self.idp.hs256("after-huge")))
                self.assertEqual(rec.header("x-sparkgate-identity"), "after-huge")
            finally:
                ch.close()
        self.assertEqual([r for r in self.up.calls()
                          if (r.header("x-test-case") or "").startswith("huge-")], [])

    # -- identity headers a client must not send ----------------------------------
    def test_spoofed_identity_headers_are_stripped(self):
        spoof = [("x-sparkgate-identity", "root"), ("x-sparkgate-tenant", "admin"),
                 ("x-sparkgate-auth-method", "mtls"),
                 ("x-sparkgate-identity-provider", "corp-rsa"),
                 ("x-forwarded-client-cert", "Hash=00;URI=spiffe://evil/ns/x/sa/root"),
                 ("x-forwarded-for", "10.0.0.1"), ("x-forwarded-proto", "https"),
                 ("x-forwarded-host", "evil"), ("x-real-ip", "10.0.0.1"),
                 ("forwarded", "for=10.0.0.1;by=evil"), ("client-cert", ":AAAA:"),
                 ("client-cert-chain", ":AAAA:")]
        names = {k for k, _ in spoof}
        rec = self.call_ok(self.ch, bearer(self.idp.hs256("real-user")) + spoof)
        self.assert_identity(rec, "real-user", "jwt", "corp-hmac")
        leaked = [(k, v) for k, v in rec.metadata
                  if k in names and not (k.startswith("x-sparkgate-") and v in (
                      "real-user", "jwt", "corp-hmac", "default"))]
        self.assertEqual(leaked, [], rec.metadata)
        self.assertIsNone(rec.header("x-forwarded-client-cert"), rec.metadata)
        # A header that merely looks similar is not touched.
        rec = self.call_ok(self.ch, bearer(self.idp.hs256("u2"))
                           + [("x-sparkgate-identityx", "kept"), ("x-forwardedfor", "kept")])
        self.assertEqual(rec.header("x-sparkgate-identityx"), "kept", rec.metadata)
        self.assertEqual(rec.header("x-forwardedfor"), "kept", rec.metadata)

        # Mixed case, as a client library would write it (h2 lowercases on
        # the wire, as HTTP/2 requires): stripped too.
        mixed = [("X-Sparkgate-Identity", "root"), ("X-Forwarded-Client-Cert", "Hash=00"),
                 ("X-Forwarded-For", "10.0.0.1"), ("Forwarded", "for=x"),
                 ("Client-Cert", ":AAAA:")]
        tok = self.idp.hs256("mixed-user")
        with H.H2Client(self.port) as c:
            resp = c.request(SERVICE + "AnalyzePlan", body=H.grpc_frame(b"m"),
                             extra=bearer(tok) + [("x-test-case", "mixed")] + mixed)
            self.assertEqual(resp.trailer("grpc-status"), "0", resp)
        rec = self.record_for("mixed")
        self.assert_identity(rec, "mixed-user", "jwt", "corp-hmac")
        self.assertIsNone(rec.header("x-forwarded-client-cert"), rec.metadata)
        self.assertIsNone(rec.header("x-forwarded-for"), rec.metadata)
        self.assertIsNone(rec.header("forwarded"), rec.metadata)
        self.assertIsNone(rec.header("client-cert"), rec.metadata)

        # Uppercase bytes on the wire are malformed in HTTP/2 (RFC 9113
        # 8.2.1): the request must not be forwarded at all.
        with H.H2Client(self.port) as c:
            c.conn.config.normalize_outbound_headers = False
            c.conn.config.validate_outbound_headers = False
            resp = c.request(SERVICE + "AnalyzePlan", body=H.grpc_frame(b"u"),
                             extra=bearer(tok) + [("x-test-case", "upper"),
                                                  ("X-Sparkgate-Identity", "root")])
            self.assertNotEqual(resp.trailer("grpc-status"), "0", resp)
        self.assertEqual([r for r in self.up.calls() if r.header("x-test-case") == "upper"], [])

    def test_underscore_aliases_are_invalid_argument(self):
        tok = self.idp.hs256("u")
        for name in ("x_forwarded_for", "x-sparkgate_identity", "x_sparkgate_identity",
                     "x_forwarded_client_cert", "client_cert", "x_real_ip",
                     "x-sparkgate_tenant"):
            tag = self.tag()
            r = H.call_unary(self.ch, "AnalyzePlan", b"x",
                             bearer(tok) + [(name, "root"), ("x-test-case", tag)])
            self.assertEqual(r.code, grpc.StatusCode.INVALID_ARGUMENT, (name, r))
            self.assertEqual([c for c in self.up.calls() if c.header("x-test-case") == tag], [])
        # Even without a token: the header check is not a way to probe auth.
        r = H.call_unary(self.ch, "AnalyzePlan", b"x", [("x_forwarded_for", "1.2.3.4")])
        self.assertIn(r.code, (grpc.StatusCode.INVALID_ARGUMENT,
                               grpc.StatusCode.UNAUTHENTICATED), r)
        # Underscores elsewhere are fine.
        rec = self.call_ok(self.ch, bearer(tok) + [("x_custom_thing", "v")])
        self.assertEqual(rec.header("x_custom_thing"), "v", rec.metadata)
        self.assert_upstream_only([rec.header("x-test-case")])

    # -- the verified-token cache ------------------------------------------------------
    def test_token_cache_hits_and_misses(self):
        a = self.idp.rs256("cache-a")
        b = self.idp.es256("cache-b")
        ch2 = H.tls_channel(self.port)
        self.addCleanup(ch2.close)
        # The first use of each verifies (miss); the others find it (hit).
        # Alternating tokens on two connections: each call gets its own
        # token's identity, never the other's.
        for i in range(12):
            ch = self.ch if i % 3 else ch2
            tok, sub, prov = (a, "cache-a", "corp-rsa") if i % 2 == 0 else (b, "cache-b", "corp-ec")
            rec = self.call_ok(ch, bearer(tok))
            self.assert_identity(rec, sub, "jwt", prov)
        # A token that differs from a cached one only in its signature is
        # not taken for it.
        h, p, s = a.split(".")
        sig = bytearray(b64url_decode(s))
        sig[0] ^= 0x80
        self.assert_denied(self.ch, bearer("%s.%s.%s" % (h, p, b64url(bytes(sig)))),
                           "jwt_invalid: bad_signature")
        # A third, distinct token (miss) after all that.
        rec = self.call_ok(self.ch, bearer(self.idp.hs256("cache-c")))
        self.assert_identity(rec, "cache-c", "jwt", "corp-hmac")


# ---------------------------------------------------------------------------

class StrictBackendJwtTest(AuthCase):
    """sparkgate -> an RFC 9113-strict HTTP/2 backend (a second sparkgate,
    h2c, auth none: nghttp2 validates every field, as Envoy and other
    nghttp2-based sidecars do) -> the stand-in."""

    def setUp(self):
        super().setUp()
        self.idp = Idp(H.tempdir("sg-jwt-strict-"))
        self.up = self.standin()
        inner = self.start_sparkgate(H.base_config(
            self.up.port, listeners=[H.h2c_listener("inner")], workers=1))
        cfg = H.base_config(inner.port("inner"), listeners=[jwt_listener()], workers=1,
                            auth=auth_section(self.idp.providers()))
        self.sg = self.start_sparkgate(cfg)
        self.ch = H.tls_channel(self.sg.port("public"))
        self.addCleanup(self.ch.close)

    def test_identity_with_surrounding_whitespace_is_never_unavailable(self):
        """A token whose identity is "alice " or " alice" is refused at
        authentication (16, bad_identity), as certificate identities are.
        Sent on, `x-sparkgate-identity: alice ` is a field RFC 9113 8.2.1
        calls malformed: a strict backend resets the stream, and the client
        would get UNAVAILABLE (14), which PySpark retries forever (and a
        backend that trims would take " alice" for "alice")."""
        r = H.call_unary(self.ch, "AnalyzePlan", b"x", bearer(self.idp.hs256(sub="alice")))
        self.assertEqual(r.code, grpc.StatusCode.OK, r)  # the chain works
        for sub in ("alice ", " alice"):
            mark = self.sg.mark()
            r = H.call_unary(self.ch, "AnalyzePlan", b"x", bearer(self.idp.hs256(sub=sub)))
            self.assertEqual((r.code, r.details),
                             (grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGE), (sub, r))
            self.sg.wait_for_log(r"rejected: unauthenticated: jwt_invalid: bad_identity",
                                 timeout=5, since=mark)


class JwtConfigTest(H.SparkgateTestCase):
    def test_secret_file_holding_a_public_key_is_refused(self):
        """The classic algorithm confusion, made by configuration: an HS256
        key whose secret_file is the identity provider's public key PEM
        would let anyone holding that public key (it is public) mint
        tokens. The configuration is refused, naming secret_file and the
        fix (pem_file)."""
        d = H.tempdir("sg-jwt-cfg-")
        pem = write_file(os.path.join(d, "idp.pub.pem"), public_pem(new_rsa()))
        providers = [{"name": "confused", "issuer": ISS_RSA, "audiences": [AUD],
                      "keys": [{"alg": "HS256", "secret_file": pem}]}]
        cfg = H.base_config(1, listeners=[jwt_listener()], auth=auth_section(providers))
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertNotEqual(rc, 0, "a public key PEM was accepted as an HMAC secret:\n"
                            + out + err)
        self.assertIn("keys[0].secret_file", out + err)
        self.assertIn("use pem_file", out + err)


class ProviderNameInABackendHeaderTest(H.SparkgateTestCase):
    """A JWT provider's `name` goes to every backend call as the value of
    x-sparkgate-identity-provider and into metrics labels, so it follows
    the tenant-name rule (1 to 64 letters, digits, '.', '_', '-'): a name
    with a CR/LF, which RFC 9113 8.2.1 forbids in a header value, is
    refused at load at auth.jwt_providers[i].name."""

    def test_control_characters_in_provider_name_refused(self):
        d = H.tempdir("sg-jwt-cfg-")
        pem = write_file(os.path.join(d, "idp.pub.pem"), public_pem(new_ec()))
        providers = [{"name": "corp\r\nx-sparkgate-identity: admin", "issuer": ISS_EC,
                      "audiences": [AUD], "keys": [{"alg": "ES256", "pem_file": pem}]}]
        cfg = H.base_config(1, listeners=[jwt_listener()], auth=auth_section(providers))
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertEqual(rc, 1, out + err)
        self.assertIn("auth.jwt_providers[0].name", err)
        self.assertNotIn("x-sparkgate-identity: admin", err)
        providers[0]["name"] = "corp-idp.v2_0"
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertEqual(rc, 0, err)


class KeyRotationTest(AuthCase):
    """SIGHUP with a new key file while a stream runs. One worker, so that
    once a new connection sees the new keys, every later one does."""

    def setUp(self):
        super().setUp()
        self.dir = H.tempdir("sg-rot-")
        self.old = new_rsa()
        self.new = new_rsa()
        self.pem = write_file(os.path.join(self.dir, "rot.pem"), public_pem(self.old))
        self.up = self.standin()
        providers = [{"name": "rot", "issuer": ISS_ROT, "audiences": [AUD],
                      "keys": [{"alg": "RS256", "pem_file": self.pem}]}]
        cfg = H.base_config(self.up.port, listeners=[jwt_listener()], workers=1,
                            auth=auth_section(providers))
        self.sg = self.start_sparkgate(cfg)
        self.port = self.sg.port("public")

    def token(self, key, sub):
        return mint(key, "RS256", claims(ISS_ROT, sub))

    def fresh_call(self, tok, method="AnalyzePlan"):
        ch = H.tls_channel(self.port)
        try:
            tag = self.tag()
            r = H.call_unary(ch, method, tag.encode(), bearer(tok) + [("x-test-case", tag)])
            return r, tag
        finally:
            ch.close()

    def wait_new_keys(self, tok):
        """New connections pick up the new configuration once the worker
        has it: poll (bounded) with the token only the new keys accept."""
        deadline = time.monotonic() + 10
        while True:
            r, tag = self.fresh_call(tok)
            if r.code == grpc.StatusCode.OK:
                return tag
            self.assertEqual(r.code, grpc.StatusCode.UNAUTHENTICATED, r)
            if time.monotonic() > deadline:
                self.fail("the new key was never accepted; log:\n" + self.sg.log_text())
            time.sleep(0.05)

    def test_sighup_rotation_during_active_stream(self):
        pid = self.sg.pid
        old_tok = self.token(self.old, "before")
        new_tok = self.token(self.new, "after")
        r, _ = self.fresh_call(old_tok)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        r, _ = self.fresh_call(new_tok)
        self.assertEqual(r.code, grpc.StatusCode.UNAUTHENTICATED, r)

        # A long server stream on the old key: 24 messages, 150 ms apart.
        total, chunk, seed = 24 * 65536, 65536, 11
        h = hashlib.sha256()
        got = {"n": 0, "bytes": 0}
        result = {}
        ch = H.tls_channel(self.port)
        self.addCleanup(ch.close)

        def sink(msg):
            h.update(msg)
            got["n"] += 1
            got["bytes"] += len(msg)

        def run():
            result["r"] = H.call_server_stream(
                ch, "ExecutePlan", b"long", bearer(old_tok) + [("x-test-case", "long")]
                + H.standin_md("stream", bytes=total, chunk=chunk, seed=seed,
                               interval_ms=150), timeout=60, sink=sink)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=10,
                                    where=lambda r: r.responses >= 2)

        write_file(self.pem, public_pem(self.new))
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
        self.assertFalse(rec.completed, "the stream ended before the reload; make it longer")

        self.wait_new_keys(new_tok)
        # The old key is gone for new connections.
        mark2 = self.sg.mark()
        r, tag = self.fresh_call(old_tok)
        self.assertEqual((r.code, r.details), (grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGE), r)
        self.sg.wait_for_log(r"rejected: unauthenticated: jwt_invalid: bad_signature",
                             timeout=5, since=mark2)
        self.assertEqual([c for c in self.up.calls() if c.header("x-test-case") == tag], [])

        # The stream that was running completes, byte for byte.
        t.join(60)
        self.assertFalse(t.is_alive())
        res = result["r"]
        self.assertEqual(res.code, grpc.StatusCode.OK, res)
        self.assertEqual(got["bytes"], total)
        self.assertEqual(got["n"], total // chunk)
        self.assertEqual(h.hexdigest(), H.stream_sha256(seed, total, chunk))
        self.assertEqual(res.trailer("x-standin-sha256"), H.stream_sha256(seed, total, chunk))
        self.assertTrue(self.sg.alive())

        # A broken key file on SIGHUP: the reload fails, the keys in force stay.
        write_file(self.pem, b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
        mark3 = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload failed", timeout=10, since=mark3)
        self.assertIsNone(self.sg.find_log(r"reload done", since=mark3))
        for _ in range(3):
            r, tag = self.fresh_call(new_tok)
            self.assertEqual(r.code, grpc.StatusCode.OK, (r, self.sg.log_text(10)))
            rec = self.record_for(tag)
            self.assert_identity(rec, "after", "jwt", "rot")
            r, tag = self.fresh_call(old_tok)
            self.assertEqual(r.code, grpc.StatusCode.UNAUTHENTICATED, r)
            self.assertEqual([c for c in self.up.calls() if c.header("x-test-case") == tag], [])
        # An empty key file likewise.
        write_file(self.pem, b"")
        mark4 = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload failed", timeout=10, since=mark4)
        r, tag = self.fresh_call(new_tok)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertTrue(self.sg.alive())
        self.assertEqual(self.sg.pid, pid)


if __name__ == "__main__":
    H.main()
