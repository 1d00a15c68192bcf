#!/usr/bin/python3
"""JWKS fetching, key rotation and the systemd integration, beyond
test_jwks_fetch.py and test_operations.py.

Each test checks one promise of docs/security.md ("Identity providers:
JWKS and OIDC discovery"), docs/configuration.md (auth.jwt_providers) or
docs/operations.md (metrics, systemd) that tests/integration/
test_jwks_fetch.py and test_operations.py do not cover. Local HTTPS
identity provider (tests/lib/idp_server.py), ports from port 0, waits
bounded; the only sleeps let a configured rate-limit window pass.
"""

import json
import os
import re
import signal
import socket
import sys
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
import idp_server as I  # noqa: E402
import test_jwks_fetch as F  # noqa: E402
import test_operations as O  # noqa: E402

OK = F.OK
UNAVAILABLE = F.UNAVAILABLE
UNAUTHENTICATED = F.UNAUTHENTICATED


def scrape(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/metrics")
        return O.parse_prometheus(c.getresponse().read().decode())
    finally:
        c.close()


class KeyDocumentTest(F.FetchCase):

    def test_duplicate_kid_refused_even_when_one_copy_is_ignored(self):
        # security.md: "The whole document is refused when it ... lists one
        # `kid` twice". Here the first "dup" is an encryption key (ignored),
        # the second a signing key: the document lists "dup" twice.
        idp = self.idp()
        iss = "https://idp.dupkid.test"
        good = {"keys": [I.jwk_of(self.k1, "k1", "RS256")]}
        idp.set("/jwks", json_obj=good)
        self.start([self.provider("dup", iss, jwks_url=idp.url("/jwks"),
                                  min_refresh_s=1, max_refresh_s=1)])
        self.wait_ready()
        self.assert_ok(self.token(self.k1, iss, "k1"))
        mark = self.sg.mark()
        idp.set("/jwks", json_obj={"keys": [
            I.jwk_of(self.k1, "k1", "RS256"),
            I.jwk_of(I.new_rsa(), "dup", "RS256", use="enc"),
            I.jwk_of(self.k2, "dup", "RS256")]})
        n = idp.count("/jwks")
        idp.wait_count("/jwks", n + 2, timeout=15)   # at least one whole fetch of it
        changed = self.sg.find_log(r"identity provider dup: 2 keys from .*key set changed",
                                   since=mark)
        self.assertIsNone(changed, "a document listing kid \"dup\" twice was accepted:\n"
                          + self.sg.log_text(20))
        self.sg.wait_for_log(r'identity provider dup: fetching \S+ failed: JWKS: keys\[\d\]: '
                             r'duplicate kid "dup"', timeout=10, since=mark)
        r = self.call(self.token(self.k2, iss, "dup"))
        self.assertNotEqual(r.code, OK, r)

    def test_unknown_kid_refetches_when_the_only_key_has_no_kid(self):
        # security.md: "A token whose `kid` the provider's key set lacks
        # makes the proxy refetch at once" and is answered 14 while the
        # refetch runs. A provider that published one key without "kid"
        # rotates to a new key with kid "k2": the set in force lacks "k2".
        idp = self.idp()
        iss = "https://idp.nokid.test"
        nokid = I.jwk_of(self.k1, "x", "RS256")
        del nokid["kid"]
        idp.set("/jwks", json_obj={"keys": [nokid]})
        self.start([self.provider("nokid", iss, jwks_url=idp.url("/jwks"),
                                  min_refetch_interval_s=1)])
        self.wait_ready()
        self.assert_ok(self.token(self.k1, iss, None))
        time.sleep(1.3)   # the start-up fetch is no longer fresh
        idp.set("/jwks", json_obj={"keys": [I.jwk_of(self.k2, "k2", "RS256")]})
        before = idp.count("/jwks")
        tok = self.token(self.k2, iss, "k2")
        mark = self.sg.mark()
        r = self.call(tok)
        self.assertEqual((r.code, r.details), (UNAVAILABLE, F.RETRY_MESSAGE),
                         (r, self.sg.log_text(10)))
        idp.wait_count("/jwks", before + 1, timeout=10)
        codes = self.call_settled(tok)
        self.assertEqual(codes[-1], OK, (codes, self.sg.log_text(10)))
        self.assertIsNone(self.sg.find_log(r"bad_signature", since=mark))


class ReloadKeysTest(F.FetchCase):

    def test_reload_applies_a_changed_fallback_jwks_file(self):
        # configuration.md: fallback_jwks_file "A JWKS file whose keys are
        # in force until the first successful fetch"; operations.md: a
        # reload applies "auth providers and keys". The provider never
        # answered, so the new fallback file's keys are the ones in force.
        idp = self.idp()
        iss = "https://idp.fallback.test"
        idp.set("/jwks", status=503, body=b"down", content_type="text/plain")
        fb1 = os.path.join(self.dir, "fallback1.json")
        fb2 = os.path.join(self.dir, "fallback2.json")
        with open(fb1, "w") as f:
            json.dump({"keys": [I.jwk_of(self.k1, "k1", "RS256")]}, f)
        with open(fb2, "w") as f:
            json.dump({"keys": [I.jwk_of(self.k2, "k2", "RS256")]}, f)
        prov = self.provider("fb", iss, jwks_url=idp.url("/jwks"), fallback_jwks_file=fb1,
                             min_refetch_interval_s=1)
        sg = self.start([prov])
        self.wait_ready()
        self.assert_ok(self.token(self.k1, iss, "k1"))
        idp.wait_count("/jwks", 1, timeout=10)

        prov["fallback_jwks_file"] = fb2
        H.write_config(dict(sg.config, auth={"jwt_providers": [prov]}),
                       os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", timeout=10, since=mark)
        tok2 = self.token(self.k2, iss, "k2")
        seen = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            r = self.call(tok2)
            seen.append((r.code.value[0], r.details))
            if r.code != UNAVAILABLE:
                break
            time.sleep(0.2)
        self.assertEqual(seen[-1][0], 0,
                         "k2, the key of the fallback file in force, after 8 s of retries: "
                         "%d answers, distinct %r; last log lines:\n%s"
                         % (len(seen), sorted(set(seen)), sg.log_text(4)))
        # k1 is in no fallback file any more, and was never fetched.
        r = self.call(self.token(self.k1, iss, "k1"))
        self.assertNotEqual(r.code, OK, r)

    def test_fetch_counters_never_go_back_across_a_url_change(self):
        # operations.md: sparkgate_jwks_fetches_total{provider,result} and
        # sparkgate_jwks_key_set_changes_total{provider} are counters: for
        # the life of the process they only go up. A reload that moves the
        # provider's jwks_url keeps the provider (same name and issuer).
        idp = self.idp()
        iss = "https://idp.counters.test"
        doc = {"keys": [I.jwk_of(self.k1, "k1", "RS256")]}
        idp.set("/jwks", json_obj=doc, headers={"Cache-Control": "max-age=0"})
        idp.set("/jwks2", json_obj={"keys": doc["keys"] + [I.jwk_of(self.k2, "k2", "RS256")]})
        prov = self.provider("ctr", iss, jwks_url=idp.url("/jwks"),
                             min_refresh_s=1, max_refresh_s=1)
        sg = self.start([prov])
        self.wait_ready()
        idp.wait_count("/jwks", 3, timeout=15)
        H.wait_until(lambda: O.sample(scrape(self.admin), "sparkgate_jwks_fetches_total",
                                      provider="ctr", result="ok") >= 3, 10,
                     interval=0.1, what="3 fetches counted")
        before = scrape(self.admin)
        ok_before = O.sample(before, "sparkgate_jwks_fetches_total", provider="ctr",
                             result="ok")
        ch_before = O.sample(before, "sparkgate_jwks_key_set_changes_total", provider="ctr")
        self.assertGreaterEqual(ok_before, 3)
        self.assertEqual(ch_before, 1)

        prov["jwks_url"] = idp.url("/jwks2")
        H.write_config(dict(sg.config, auth={"jwt_providers": [prov]}),
                       os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", timeout=10, since=mark)
        idp.wait_count("/jwks2", 1, timeout=10)
        sg.wait_for_log(r"identity provider ctr: 2 keys from \S+/jwks2 \(key set changed\)",
                        timeout=10, since=mark)
        after = scrape(self.admin)
        ok_after = O.sample(after, "sparkgate_jwks_fetches_total", provider="ctr", result="ok")
        ch_after = O.sample(after, "sparkgate_jwks_key_set_changes_total", provider="ctr")
        self.assertGreaterEqual(ok_after, ok_before,
                                "fetches_total{result=ok} went from %d to %d" % (ok_before, ok_after))
        self.assertGreaterEqual(ch_after, ch_before,
                                "key_set_changes_total went from %d to %d" % (ch_before, ch_after))
        self.assert_ok(self.token(self.k1, iss, "k1"))


class NotifyAbstractTest(H.SparkgateTestCase):

    def test_abstract_notify_socket_and_no_watchdog_without_request(self):
        # operations.md: READY=1, RELOADING=1 (+MONOTONIC_USEC) ... READY=1,
        # STOPPING=1 to $NOTIFY_SOCKET, which systemd may give as an
        # abstract socket ("@name"). No WATCHDOG_USEC: no WATCHDOG=1.
        name = "sg-review-notify-%d-%d" % (os.getpid(), time.monotonic_ns() % 1000000)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        self.addCleanup(sock.close)
        msgs = []

        def until(pred, timeout=15):
            deadline = time.monotonic() + timeout
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("sd_notify: got %r" % msgs)
                sock.settimeout(max(left, 0.01))
                try:
                    data = sock.recv(65536).decode()
                except socket.timeout:
                    continue
                msgs.append(dict(l.partition("=")[::2] for l in data.split("\n") if l))

        up = self.standin()
        cfg = H.base_config(up.port)
        sg = self.start_sparkgate(cfg, env={"NOTIFY_SOCKET": "@" + name})
        until(lambda: "READY" in O.state_messages(msgs))
        n = len(msgs)
        sg.send_signal(signal.SIGHUP)
        until(lambda: O.state_messages(msgs[n:]) == ["RELOADING", "READY"])
        rel = [m for m in msgs[n:] if m.get("RELOADING") == "1"][0]
        self.assertRegex(rel.get("MONOTONIC_USEC", ""), r"^\d+$")
        sg.send_signal(signal.SIGTERM)
        until(lambda: "STOPPING" in O.state_messages(msgs))
        self.assertEqual(sg.wait(15), 0)
        self.assertFalse([m for m in msgs if "WATCHDOG" in m], msgs)


if __name__ == "__main__":
    H.main()
