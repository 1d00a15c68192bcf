#!/usr/bin/python3
"""JWT providers' keys fetched over HTTPS (issue 9), end to end: a local
HTTPS identity provider (tests/lib/idp_server.py: test CA, 127.0.0.1, port
0, documents changed at run time, requests counted) -> sparkgate with
"jwks_url" or "discovery" providers -> gRPC calls with tokens minted here.

Covered: discovery + JWKS at start (one request each); key rotation with a
token signed by a new key (UNAVAILABLE, then success after the refetch;
exactly one JWKS fetch for 50 concurrent such calls); the verified-token
cache letting go of tokens whose key the provider removed; the refetch rate
limit under a flood of random kids; a provider down at start (/readyz 503,
calls 14, then ready once it answers; "required": false does not gate
readiness) and during operation (the old keys keep working); a slow
provider (fetch_timeout_ms; other calls keep being served meanwhile);
oversized, malformed, wrong-content, redirected, private-key and
duplicate-kid documents (the old keys stay); TLS failures (untrusted CA,
wrong host name, the system store by default) before any HTTP request; an
issuer mismatch in discovery; SIGHUP keeping fetched keys; config errors.

Nothing here asserts a time: waits are bounded loops, and the only sleeps
let a configured rate-limit window pass.
"""

import os
import random
import re
import signal
import sys
import threading
import time
import http.client
import json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import grpc  # noqa: E402
import idp_server as I  # noqa: E402

AUD = "spark"
RETRY_MESSAGE = "sparkgate: identity provider keys unavailable, retry"
DENY_MESSAGE = "sparkgate: authentication required or failed"
ADMIN_RE = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
OK = grpc.StatusCode.OK


def http_status(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def http_body(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        return c.getresponse().read().decode()
    finally:
        c.close()


def bearer(tok):
    return [("authorization", "Bearer " + tok)]


class FetchCase(H.SparkgateTestCase):

    def setUp(self):
        super().setUp()
        self.dir = H.tempdir("sg-jwks-")
        self.pki = H.pki()
        self.up = self.standin()
        self.k1 = I.new_rsa()
        self.k2 = I.new_rsa()
        self._n = 0

    # -- set-up helpers --------------------------------------------------------
    def idp(self, cert=None, key=None):
        s = I.IdpServer(cert or self.pki.server_cert, key or self.pki.server_key).start()
        self.addCleanup(s.stop)
        return s

    def provider(self, name, issuer, **kw):
        p = {"name": name, "issuer": issuer, "audiences": [AUD],
             "ca_file": self.pki.ca_cert}
        p.update(kw)
        return {k: v for k, v in p.items() if v is not None}

    def start(self, providers, workers=2):
        cfg = H.base_config(self.up.port,
                            listeners=[H.tls_listener("public", auth={"methods": ["jwt"]})],
                            workers=workers,
                            auth={"jwt_providers": providers},
                            admin={"address": "127.0.0.1", "port": 0})
        self.sg = self.start_sparkgate(cfg)
        self.admin = int(self.sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        self.ch = H.tls_channel(self.sg.port("public"))
        self.addCleanup(self.ch.close)
        return self.sg

    def readyz(self):
        return http_status(self.admin, "/readyz")

    def wait_ready(self, timeout=20):
        H.wait_until(lambda: self.readyz() == 200, timeout, interval=0.05,
                     what="/readyz 200")

    def sub(self):
        """A subject no earlier call used: its token is not in any cache."""
        self._n += 1
        return "%s-%d" % (self._testMethodName, self._n)

    def token(self, key, iss, kid, sub=None):
        return I.mint(key, "RS256", I.claims(iss, sub or self.sub()), kid=kid)

    def call(self, tok, ch=None):
        return H.call_unary(ch or self.ch, "AnalyzePlan", b"x", bearer(tok), timeout=20)

    def call_settled(self, tok, timeout=20, ch=None):
        """Calls, retrying (bounded) while the answer is UNAVAILABLE, as a
        client that retries 14 would: the list of codes seen."""
        codes = []
        deadline = time.monotonic() + timeout
        while True:
            r = self.call(tok, ch)
            codes.append(r.code)
            if r.code != UNAVAILABLE:
                return codes
            self.assertEqual(r.details, RETRY_MESSAGE, r)
            if time.monotonic() > deadline:
                self.fail("still UNAVAILABLE after %.0fs: %r\n%s"
                          % (timeout, codes, self.sg.log_text(30)))
            time.sleep(0.05)

    def assert_ok(self, tok):
        r = self.call(tok)
        self.assertEqual(r.code, OK, (r, self.sg.log_text(15)))
        return r

    def assert_14(self, tok):
        r = self.call(tok)
        self.assertEqual((r.code, r.details), (UNAVAILABLE, RETRY_MESSAGE),
                         (r, self.sg.log_text(15)))

    def assert_no_tokens_logged(self, *tokens):
        text = self.sg.log_text()
        for t in tokens:
            self.assertNotIn(t.split(".")[2], text)
            self.assertNotIn(t, text)


# ---------------------------------------------------------------------------

class DiscoveryAndRotationTest(FetchCase):

    def test_discovery_and_jwks_at_start(self):
        idp = self.idp()
        iss = idp.url("/realms/test")
        disc = "/realms/test/.well-known/openid-configuration"
        idp.set(disc, json_obj={"issuer": iss, "jwks_uri": idp.url("/certs"),
                                "token_endpoint": idp.url("/token")})
        idp.set("/certs", json_obj={"keys": [
            I.jwk_of(self.k1, "k1", "RS256"),
            I.jwk_of(I.new_ec(), "enc-1", use="enc"),   # not a signing key: ignored
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AAAA"}]},  # unsupported
            content_type="application/jwk-set+json; charset=utf-8")
        self.start([self.provider("corp", iss, discovery=True)])
        self.wait_ready()
        self.assertEqual((idp.count(disc), idp.count("/certs")), (1, 1))
        self.sg.wait_for_log(r"identity provider corp: discovery: jwks_uri is "
                             + re.escape(idp.url("/certs")), timeout=5)
        tok = self.token(self.k1, iss, "k1", sub="disc-user")
        self.assert_ok(tok)
        rec = self.up.wait_for_call(None, timeout=5)
        self.assertEqual(rec.header("x-sparkgate-identity"), "disc-user", rec.metadata)
        self.assertEqual(rec.header("x-sparkgate-identity-provider"), "corp", rec.metadata)
        # A kid the set does not hold, with the set fresh (default 30 s
        # refetch interval): unknown, 16, and no refetch.
        mark = self.sg.mark()
        r = self.call(self.token(self.k2, iss, "k2"))
        self.assertEqual((r.code, r.details), (UNAUTHENTICATED, DENY_MESSAGE), r)
        self.sg.wait_for_log(r"rejected: unauthenticated: jwt_invalid: unknown_kid",
                             timeout=5, since=mark)
        self.assertEqual(idp.count("/certs"), 1)
        self.assert_no_tokens_logged(tok)
        # /metrics: one good fetch, one key in force, one unknown kid refused.
        page = http_body(self.admin, "/metrics")
        for line in ('sparkgate_jwks_fetches_total{provider="corp",result="ok"} 1',
                     'sparkgate_jwks_fetches_total{provider="corp",result="failed"} 0',
                     'sparkgate_jwks_keys{provider="corp"} 1',
                     'sparkgate_jwks_refetches_total{provider="corp",outcome="denied_fresh"} 1'):
            self.assertIn(line, page.splitlines(), page)

    def test_rotation_one_fetch_for_concurrent_calls(self):
        idp = self.idp()
        iss = "https://idp.rotation.test"
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        self.start([self.provider("rot", iss, jwks_url=idp.url("/jwks"),
                                  min_refetch_interval_s=1)])
        self.wait_ready()
        self.assertEqual(idp.count("/jwks"), 1)
        old_tok = self.token(self.k1, iss, "k1", sub="old-key-user")
        self.assert_ok(old_tok)          # now in the verified-token caches
        # Let the rate-limit window of the first fetch pass.
        time.sleep(1.3)

        # The provider rotates: k2 appears. Its answer is slow, so that all
        # calls below arrive while the one refetch is in flight.
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256"),
                                            I.jwk_of(self.k2, "k2", "RS256")]},
                delay=1.0)
        new_tok = self.token(self.k2, iss, "k2", sub="new-key-user")
        channels = [H.tls_channel(self.sg.port("public")) for _ in range(5)]
        for c in channels:
            self.addCleanup(c.close)
        results = [None] * 50
        start = threading.Barrier(50, timeout=20)

        def worker(i):
            try:
                start.wait()
            except threading.BrokenBarrierError:
                pass
            try:
                results[i] = self.call_settled(new_tok, ch=channels[i % 5])
            except BaseException as e:  # reported below
                results[i] = e

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertFalse(any(t.is_alive() for t in threads))
        for codes in results:
            self.assertIsInstance(codes, list, codes)
            self.assertEqual(codes[-1], OK, codes)
            self.assertTrue(all(c == UNAVAILABLE for c in codes[:-1]), codes)
        firsts = [codes[0] for codes in results]
        self.assertIn(UNAVAILABLE, firsts)      # the call that triggered the refetch
        self.assertEqual(idp.count("/jwks"), 2, "one refetch for all 50 calls")
        self.sg.wait_for_log(r"identity provider rot: 2 keys from .* \(key set changed\)",
                             timeout=5)
        rec = self.up.wait_for_call(None, timeout=5,
                                    where=lambda r: r.header("x-sparkgate-identity")
                                    == "new-key-user")
        self.assertEqual(rec.header("x-sparkgate-identity-provider"), "rot")

        # The provider drops k1. A token with a kid nobody knows makes the
        # proxy refetch; afterwards the token signed by k1, which the
        # workers' caches hold, is refused: cached results do not outlive
        # their key.
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k2, "k2", "RS256")]})
        time.sleep(1.3)
        stranger = self.token(I.new_rsa(), iss, "k3")
        codes = self.call_settled(stranger)
        self.assertEqual(codes[0], UNAVAILABLE, codes)
        self.assertEqual(codes[-1], UNAUTHENTICATED, codes)
        idp.wait_count("/jwks", 3, timeout=10)
        self.sg.wait_for_log(r"identity provider rot: 1 key from .* \(key set changed\)",
                             timeout=10)
        for ch in [self.ch] + channels:
            codes = self.call_settled(old_tok, ch=ch)
            self.assertEqual(codes[-1], UNAUTHENTICATED, codes)
        self.sg.wait_for_log(r"rejected: unauthenticated: jwt_invalid: unknown_kid", timeout=5)
        self.assert_ok(new_tok)
        self.assert_no_tokens_logged(old_tok, new_tok, stranger)

    def test_refetch_rate_limited_under_random_kid_flood(self):
        idp = self.idp()
        iss = "https://idp.flood.test"
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        interval = 2
        self.start([self.provider("flood", iss, jwks_url=idp.url("/jwks"),
                                  min_refetch_interval_s=interval)])
        self.wait_ready()
        self.assertEqual(idp.count("/jwks"), 1)
        time.sleep(interval + 0.3)   # the start-up fetch no longer counts as fresh
        attacker = I.new_rsa()
        before = idp.count("/jwks")
        codes = []
        lock = threading.Lock()
        channels = [H.tls_channel(self.sg.port("public")) for _ in range(4)]
        for c in channels:
            self.addCleanup(c.close)

        def flood(ch):
            for _ in range(40):
                tok = self.token(attacker, iss, "kid-%016x" % random.getrandbits(64))
                r = self.call(tok, ch)
                with lock:
                    codes.append((r.code, r.details))

        t0 = time.monotonic()
        threads = [threading.Thread(target=flood, args=(channels[i % 4],), daemon=True)
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
        self.assertEqual(len(codes), 320)
        self.assertEqual(set(codes) - {(UNAVAILABLE, RETRY_MESSAGE),
                                       (UNAUTHENTICATED, DENY_MESSAGE)}, set(), codes[:5])
        self.assertIn((UNAVAILABLE, RETRY_MESSAGE), codes)
        fetched = idp.count("/jwks") - before
        # At most one refetch per interval (plus one started at t0, plus
        # one still in flight at the end).
        self.assertGreaterEqual(fetched, 1)
        self.assertLessEqual(fetched, int(elapsed / interval) + 2, (fetched, elapsed))
        # Valid tokens still work, and the keys did not change.
        self.assert_ok(self.token(self.k1, iss, "k1"))
        changed = [l for l in self.sg.lines if re.search(r"provider flood: .*key set changed", l)]
        self.assertEqual(len(changed), 1, changed)


class AvailabilityTest(FetchCase):

    def test_provider_down_at_start(self):
        idp = self.idp()
        iss = "https://idp.down.test"
        idp.set("/jwks", status=503, body=b"maintenance", content_type="text/plain")
        dead = "https://127.0.0.1:%d/jwks" % I.free_port_closed()
        self.start([self.provider("down", iss, jwks_url=idp.url("/jwks"),
                                  min_refetch_interval_s=1),
                    # Optional: never holds readiness back, even unreachable.
                    self.provider("optional", "https://idp.optional.test", jwks_url=dead,
                                  required=False)])
        self.sg.wait_for_log(r"not ready \(/readyz 503\) until .*: waiting for down$",
                             timeout=10)
        self.sg.wait_for_log(r"identity provider down: fetching \S+ failed: HTTP 503; "
                             r"no keys yet: its calls get UNAVAILABLE \(14\)", timeout=10)
        self.sg.wait_for_log(r"identity provider optional: fetching \S+ failed: cannot "
                             r"connect", timeout=10)
        self.assertEqual(self.readyz(), 503)
        tok = self.token(self.k1, iss, "k1")
        mark = self.sg.mark()
        self.assert_14(tok)
        self.sg.wait_for_log(r"grpc-status 14: %s: jwt: keys_unavailable"
                             % re.escape(RETRY_MESSAGE), timeout=5, since=mark)
        self.assert_14(self.token(self.k1, "https://idp.optional.test", "k1"))
        self.assertEqual(self.up.calls(), [])
        self.assertEqual(self.readyz(), 503)

        # The provider comes back. A retrying client's calls make the proxy
        # ask again (at most once per min_refetch_interval_s) without
        # waiting for the backoff: the same token passes, and it is ready.
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        codes = self.call_settled(tok, timeout=30)
        self.assertEqual(codes[-1], OK, codes)
        self.wait_ready(timeout=10)
        self.sg.wait_for_log(r"every required provider has keys: ready", timeout=5)
        self.assert_no_tokens_logged(tok)

    def test_provider_down_during_operation(self):
        idp = self.idp()
        iss = "https://idp.flaky.test"
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]},
                headers={"Cache-Control": "public, max-age=0"})
        # A refresh every second (max-age 0 is clamped to min_refresh_s).
        self.start([self.provider("flaky", iss, jwks_url=idp.url("/jwks"),
                                  min_refresh_s=1, max_refresh_s=60)])
        self.wait_ready()
        idp.wait_count("/jwks", 2, timeout=10)     # scheduled refreshes run
        self.assert_ok(self.token(self.k1, iss, "k1"))
        for what, route, reason in (
                ("500", dict(status=500, body=b"oops", content_type="text/plain"),
                 r"HTTP 500"),
                ("drop", dict(drop=True), r"connection failed or closed before a response"),
                ("404", dict(status=404, body=b"gone", content_type="text/plain"),
                 r"HTTP 404")):
            mark = self.sg.mark()
            idp.set("/jwks", **route)
            self.sg.wait_for_log(r"identity provider flaky: fetching \S+ failed: %s.*; the "
                                 r"keys in force stay; retry in \d+ s" % reason, timeout=15,
                                 since=mark)
            self.assert_ok(self.token(self.k1, iss, "k1"))
            self.assertEqual(self.readyz(), 200, what)
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        n = idp.count("/jwks")
        idp.wait_count("/jwks", n + 1, timeout=15)
        self.assert_ok(self.token(self.k1, iss, "k1"))

    def test_slow_provider_times_out_while_calls_are_served(self):
        idp = self.idp()
        iss = "https://idp.slow.test"
        fallback = os.path.join(self.dir, "fallback.json")
        with open(fallback, "w") as f:
            json.dump({"keys": [I.jwk_of(self.k1, "k1", "RS256")]}, f)
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]}, delay=60)
        other = I.IdpServer(self.pki.server_cert, self.pki.server_key).start()
        self.addCleanup(other.stop)
        other_iss = "https://idp.other.test"
        other.set("/jwks", json_obj={"keys": [I.jwk_of(self.k2, "o1", "RS256")]})
        self.start([self.provider("slow", iss, jwks_url=idp.url("/jwks"),
                                  fallback_jwks_file=fallback, fetch_timeout_ms=1500,
                                  connect_timeout_ms=10000, min_refetch_interval_s=1),
                    self.provider("other", other_iss, jwks_url=other.url("/jwks"))])
        # Ready at once: "slow" has its fallback keys, "other" answers.
        self.wait_ready()
        idp.wait_count("/jwks", 1, timeout=10)
        # While the slow fetch hangs, calls of both providers are served.
        served = 0
        for _ in range(10):
            self.assert_ok(self.token(self.k1, iss, "k1"))
            self.assert_ok(self.token(self.k2, other_iss, "o1"))
            served += 2
        self.sg.wait_for_log(r"identity provider slow: fetching \S+ failed: timed out after "
                             r"1500 ms \(fetch_timeout_ms\); the keys in force stay", timeout=15)
        self.assertEqual(served, 20)
        # An unknown kid while a (re)fetch hangs: retry later, never 16.
        time.sleep(1.2)
        self.assert_14(self.token(self.k2, iss, "k-new"))
        self.assert_ok(self.token(self.k1, iss, "k1"))
        self.assert_ok(self.token(self.k2, other_iss, "o1"))

        # A reload while a fetch hangs: the provider keeps its keys and its
        # fetcher, which takes the new timeout for the next attempt.
        n = idp.count("/jwks")
        idp.wait_count("/jwks", n + 1, timeout=15)     # one is in flight now
        providers = self.sg.config["auth"]["jwt_providers"]
        providers[0]["fetch_timeout_ms"] = 1200
        H.write_config(self.sg.config, os.path.dirname(self.sg.config_path))
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done", timeout=10, since=mark)
        self.sg.wait_for_log(r"identity provider slow: fetching \S+ failed: timed out after "
                             r"1200 ms \(fetch_timeout_ms\)", timeout=20, since=mark)
        self.assert_ok(self.token(self.k1, iss, "k1"))
        self.assert_ok(self.token(self.k2, other_iss, "o1"))
        self.assertEqual(self.readyz(), 200)


class BadDocumentsTest(FetchCase):

    def test_bad_documents_keep_the_old_keys(self):
        idp = self.idp()
        iss = "https://idp.bad.test"
        good = {"keys": [I.jwk_of(self.k1, "k1", "RS256")]}
        idp.set("/jwks", json_obj=good)
        self.start([self.provider("bad", iss, jwks_url=idp.url("/jwks"),
                                  max_response_bytes=8192,
                                  min_refresh_s=1, max_refresh_s=1)])
        self.wait_ready()
        self.assert_ok(self.token(self.k1, iss, "k1"))
        k2_jwk = I.jwk_of(self.k2, "k2", "RS256")
        private = dict(k2_jwk, d="AQAB")
        huge = {"keys": [I.jwk_of(self.k1, "k1", "RS256")], "pad": "x" * 20000}
        cases = [
            ("oversized", dict(json_obj=huge), r"response larger than max_response_bytes \(8192\)"),
            ("malformed", dict(body=b'{"keys": [', content_type="application/json"),
             r"JWKS: not valid JSON"),
            ("html", dict(body=b"<html>login</html>", content_type="text/html"),
             r'content-type "text/html" is not JSON'),
            ("no content-type", dict(json_obj=good, content_type=None),
             r'content-type "\(none\)" is not JSON'),
            ("not a jwks", dict(json_obj={"issuer": iss}), r"JWKS: not a JWKS document"),
            ("duplicate json names", dict(body=b'{"keys":[],"keys":[]}'), r"JWKS: not valid JSON"),
            ("no usable key", dict(json_obj={"keys": [I.jwk_of(self.k2, "k2", use="enc")]}),
             r"JWKS: no usable signing key"),
            ("duplicate kid", dict(json_obj={"keys": [k2_jwk, dict(k2_jwk)]}),
             r'JWKS: keys\[1\]: duplicate kid "k2"'),
            ("private key", dict(json_obj={"keys": [private]}),
             r"JWKS: keys\[0\] holds private key material"),
            ("redirect", dict(status=302, body=b"", headers={"Location": idp.url("/evil")}),
             r"HTTP 302 redirect to https://\S+/evil refused"),
        ]
        for what, route, reason in cases:
            mark = self.sg.mark()
            idp.set("/jwks", **route)
            self.sg.wait_for_log(r"identity provider bad: fetching \S+ failed: %s.*; the keys "
                                 r"in force stay" % reason, timeout=15, since=mark)
            self.assert_ok(self.token(self.k1, iss, "k1"))
            # k2 was never accepted from any of these documents.
            r = self.call(self.token(self.k2, iss, "k2"))
            self.assertNotEqual(r.code, OK, what)
        self.assertEqual(idp.count("/evil"), 0)
        # Only the start-up fetch ever changed the keys.
        changed = [l for l in self.sg.lines if re.search(r"provider bad: .*key set changed", l)]
        self.assertEqual(len(changed), 1, changed)
        self.assertTrue(self.sg.alive())


class TlsAndDiscoveryFailuresTest(FetchCase):

    def test_tls_failures_send_no_request(self):
        untrusted = self.idp(self.pki.other_server_cert, self.pki.other_server_key)
        cert, key = I.cert_for_names(self.pki, self.dir, ["wrong-name.test"])
        misnamed = self.idp(cert, key)
        system = self.idp()
        doc = {"keys": [I.jwk_of(self.k1, "k1", "RS256")]}
        for s in (untrusted, misnamed, system):
            s.set("/jwks", json_obj=doc)
        self.start([
            self.provider("untrusted", "https://idp.untrusted.test", jwks_url=untrusted.url("/jwks")),
            self.provider("misnamed", "https://idp.misnamed.test", jwks_url=misnamed.url("/jwks")),
            # No ca_file: the system trust store, which lacks the test CA.
            self.provider("system", "https://idp.system.test", jwks_url=system.url("/jwks"),
                          ca_file=None),
        ])
        self.sg.wait_for_log(r"identity provider untrusted: fetching \S+ failed: TLS: certificate "
                             r"verify failed: unable to get local issuer certificate", timeout=10)
        self.sg.wait_for_log(r"identity provider misnamed: fetching \S+ failed: TLS: certificate "
                             r"verify failed: IP address mismatch", timeout=10)
        self.sg.wait_for_log(r"identity provider system: fetching \S+ failed: TLS: certificate "
                             r"verify failed: unable to get local issuer certificate", timeout=10)
        self.assertEqual(self.readyz(), 503)
        for name in ("untrusted", "misnamed", "system"):
            self.assert_14(self.token(self.k1, "https://idp.%s.test" % name, "k1"))
        # Not one HTTP request went over an unverified connection.
        self.assertEqual([s.count("/jwks") for s in (untrusted, misnamed, system)], [0, 0, 0])
        self.assertEqual(self.up.calls(), [])

    def test_host_name_checked_for_dns_names(self):
        cert, key = I.cert_for_names(self.pki, self.dir, ["wrong-name.test"], ips=["127.0.0.1"])
        idp = self.idp(cert, key)
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        good = self.idp()      # names localhost
        good.set("/jwks", json_obj={"keys": [I.jwk_of(self.k2, "k2", "RS256")]})
        self.start([
            # localhost resolves to 127.0.0.1 but the certificate does not name it.
            self.provider("byname", "https://idp.byname.test",
                          jwks_url=idp.url("/jwks", host="localhost")),
            self.provider("goodname", "https://idp.goodname.test",
                          jwks_url=good.url("/jwks", host="localhost")),
        ])
        self.sg.wait_for_log(r"identity provider byname: fetching \S+ failed: TLS: certificate "
                             r"verify failed: [Hh]ostname mismatch", timeout=10)
        self.assertEqual(idp.count("/jwks"), 0)
        good.wait_count("/jwks", 1, timeout=10)
        codes = self.call_settled(self.token(self.k2, "https://idp.goodname.test", "k2"))
        self.assertEqual(codes[-1], OK, codes)
        self.assert_14(self.token(self.k1, "https://idp.byname.test", "k1"))

    def test_discovery_issuer_mismatch(self):
        idp = self.idp()
        iss = idp.url("/realms/a")
        idp.set("/realms/a/.well-known/openid-configuration",
                json_obj={"issuer": iss + "/", "jwks_uri": idp.url("/jwks")})
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        iss_b = idp.url("/realms/b")
        idp.set("/realms/b/.well-known/openid-configuration",
                json_obj={"issuer": iss_b, "jwks_uri": "http://127.0.0.1:%d/jwks" % idp.port})
        self.start([self.provider("mismatch", iss, discovery=True),
                    self.provider("plainhttp", iss_b, discovery=True)])
        self.sg.wait_for_log(r"identity provider mismatch: fetching \S+ failed: discovery "
                             r"document: its \"issuer\" \"%s/\" is not the configured issuer"
                             % re.escape(iss), timeout=10)
        self.sg.wait_for_log(r"identity provider plainhttp: fetching \S+ failed: discovery "
                             r"document: jwks_uri: .* is not an https:// URL", timeout=10)
        self.assertEqual(idp.count("/jwks"), 0)
        self.assertEqual(self.readyz(), 503)
        self.assert_14(self.token(self.k1, iss, "k1"))


class ReloadTest(FetchCase):

    def test_sighup_keeps_fetched_keys(self):
        idp = self.idp()
        iss = "https://idp.reload.test"
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k1, "k1", "RS256")]})
        prov = self.provider("reload", iss, jwks_url=idp.url("/jwks"))
        sg = self.start([prov])
        self.wait_ready()
        self.assert_ok(self.token(self.k1, iss, "k1"))
        self.assertEqual(idp.count("/jwks"), 1)
        # The provider goes down; a reload with the same provider neither
        # refetches nor loses the keys.
        idp.set("/jwks", status=503, content_type="text/plain")
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", timeout=10, since=mark)
        self.assert_ok(self.token(self.k1, iss, "k1"))
        self.assertEqual(self.readyz(), 200)
        time.sleep(0.5)
        self.assertEqual(idp.count("/jwks"), 1, "a reload must not refetch unchanged providers")

        # A new URL for the same issuer: fetched at once (still down), and
        # meanwhile the keys it had stay in force.
        prov["jwks_url"] = idp.url("/jwks?v=2")
        H.write_config(dict(sg.config, auth={"jwt_providers": [prov]}),
                       os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", timeout=10, since=mark)
        idp.wait_count("/jwks", 2, timeout=10)
        sg.wait_for_log(r"identity provider reload: fetching \S+v=2 failed: HTTP 503; "
                        r"the keys in force stay", timeout=10, since=mark)
        self.assert_ok(self.token(self.k1, iss, "k1"))
        self.assertEqual(self.readyz(), 200)


class ConfigTest(H.SparkgateTestCase):

    def check(self, provider_extra, want):
        p = H.pki()
        prov = {"name": "p", "issuer": "https://idp.test", "audiences": [AUD]}
        prov.update(provider_extra)
        cfg = H.base_config(1, listeners=[H.tls_listener("public", auth={"methods": ["jwt"]})],
                            auth={"jwt_providers": [prov]})
        rc, out, err = H.check_config(cfg)
        if want is None:
            self.assertEqual(rc, 0, err)
        else:
            self.assertEqual(rc, 1, (provider_extra, out, err))
            self.assertRegex(err, want)
        return p

    def test_config_errors(self):
        ca = H.pki().ca_cert
        self.check({"jwks_url": "https://idp.test/jwks"}, None)
        self.check({"discovery": True, "ca_file": ca, "min_refresh_s": 5,
                    "max_refresh_s": 3600, "min_refetch_interval_s": 10,
                    "fetch_timeout_ms": 2000, "connect_timeout_ms": 1000,
                    "max_response_bytes": 65536, "required": False}, None)
        self.check({"jwks_url": "http://idp.test/jwks"},
                   r"auth\.jwt_providers\[0\]\.jwks_url: .* is not an https:// URL")
        self.check({"jwks_url": "https://user:pw@idp.test/jwks"}, r"user information")
        self.check({"jwks_url": "not a url"}, r"jwks_url: .*not a valid URL|not an https")
        self.check({"jwks_url": "https://idp.test/jwks", "discovery": True},
                   r"both say where the keys are")
        self.check({"discovery": True, "issuer": "corp"},
                   r"auth\.jwt_providers\[0\]\.issuer: with \"discovery\": true")
        self.check({"jwks_url": "https://idp.test/jwks",
                    "keys": [{"alg": "RS256", "pem_file": ca}]},
                   r"auth\.jwt_providers\[0\]\.keys: not with \"jwks_url\"")
        self.check({"jwks_url": "https://idp.test/jwks", "min_refresh_s": 700,
                    "max_refresh_s": 600}, r"min_refresh_s: 700 is above max_refresh_s")
        self.check({"jwks_url": "https://idp.test/jwks", "ca_file": "/nonexistent/ca.pem"},
                   r"ca_file: cannot read '/nonexistent/ca\.pem': No such file")
        self.check({"jwks_url": "https://idp.test/jwks", "min_refetch_interval_s": 0},
                   r"min_refetch_interval_s: must be an integer from 1")
        self.check({"ca_file": ca, "keys": [{"alg": "RS256", "pem_file": ca}]},
                   r"ca_file: only applies to keys fetched over HTTPS")
        self.check({"jwks_url": "https://idp.test/jwks", "algorithms": ["HS256"]},
                   r"algorithms: keys fetched from an identity provider are RS\* or ES\*")
        self.check({"jwks_url": "https://idp.test/jwks", "fallback_jwks_file": "/nonexistent.json"},
                   r"fallback_jwks_file: cannot open /nonexistent\.json")
        self.check({"jwks_url": "https://idp.test/jwks", "jwks_uri": "x"},
                   r"\.jwks_uri: unknown key")


if __name__ == "__main__":
    H.main()
