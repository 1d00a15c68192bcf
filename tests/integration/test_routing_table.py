#!/usr/bin/python3
"""The routing table (docs/routing.md) against the binary: tenant
selection, allow rules and the loading/reload of the table and of upstream
credentials. Only what test_tenants.py does not already cover.

Every port is chosen by the kernel, every wait is bounded, processes are
stopped by PID (harness).
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import test_tenants as TT  # noqa: E402  (helpers only; its classes are not re-run)
import grpc  # noqa: E402

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


def tenant(name, ident=None, **kw):
    t = {"name": name, "backends": [{"address": "127.0.0.1", "port": 1}],
         "allow": {"identities": [ident or name + "-user"]}}
    t.update(kw)
    return t


def inline_config(tenants, selectors=None):
    cfg = H.base_config(1)
    cfg["tenants"] = tenants
    if selectors is not None:
        cfg["tenant_selectors"] = selectors
    return cfg


# ---------------------------------------------------------------------------
# Upstream credential: the 64 KiB bound (docs/routing.md, "Upstream
# credential": "Leading and trailing white space (the usual final newline)
# is removed; what remains must be one token of at most 64 KiB").

class CredentialBoundTest(H.SparkgateTestCase):
    def test_file_token_of_64_kib_with_final_newline_is_accepted(self):
        """A 65,536-byte token followed by the usual final newline: what
        remains after trimming is exactly 64 KiB, which the docs allow (the
        loader checked the size of the raw file before trimming)."""
        d = H.tempdir("sg-rr-cred-")
        token = "a" * 65536
        path = TT.write_file(os.path.join(d, "tok"), token + "\n")
        cfg = inline_config([tenant("a", upstream_credential={"file": path})])
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertNotIn(token, out + err)
        self.assertEqual(rc, 0, err)
        self.assertIn("credential: file %s" % path, out)

    def test_env_token_over_64_kib_is_refused(self):
        """The same bound holds for a token from an environment variable
        (docs: "what remains must be one token of at most 64 KiB"): only the
        file branch checked it, so a 70,000-byte token loaded and would have
        gone as a 70 KB request header to every backend."""
        d = H.tempdir("sg-rr-cred-")
        token = "b" * 70000
        cfg = inline_config([tenant("a", upstream_credential={"env": "RR_BIG_TOKEN"})])
        path = H.write_config(cfg, d)
        rc, out, err = H.run_cli(["--check-config", "-c", path], env={"RR_BIG_TOKEN": token})
        self.assertNotIn(token, out + err)
        self.assertNotEqual(rc, 0, "a 70,000-byte token was accepted:\n" + out[-400:])
        self.assertIn("tenants[0].upstream_credential.env", err)
        self.assertIn("RR_BIG_TOKEN", err)

    def test_bad_credential_errors_never_print_the_value(self):
        """A token with a space, a control character, or an empty variable:
        the load fails, the message names the file or variable, never the
        value (docs/routing.md)."""
        d = H.tempdir("sg-rr-cred-")
        secret = "s3cr3t-%s" % os.urandom(6).hex()
        spaced = TT.write_file(os.path.join(d, "spaced"), secret + " more-" + secret + "\n")
        ctrl = TT.write_file(os.path.join(d, "ctrl"), secret + "\x01" + secret)
        cfg = inline_config([
            tenant("a", upstream_credential={"file": spaced}),
            tenant("b", upstream_credential={"file": ctrl}),
            tenant("c", upstream_credential={"env": "RR_CTRL_TOKEN"}),
        ], selectors=["header:x-spark-tenant"])
        path = H.write_config(cfg, d)
        rc, out, err = H.run_cli(["--check-config", "-c", path],
                                 env={"RR_CTRL_TOKEN": secret + "\t" + secret})
        self.assertNotEqual(rc, 0)
        self.assertNotIn(secret, out + err)
        for p in ("tenants[0].upstream_credential.file", "tenants[1].upstream_credential.file",
                  "tenants[2].upstream_credential.env"):
            self.assertIn(p, err)
        self.assertIn(spaced, err)
        self.assertIn("RR_CTRL_TOKEN", err)


# ---------------------------------------------------------------------------
# Runtime: claims of every JSON type in allow rules, authorities (IPv6
# literals, case, trailing dot), selector fallthrough.

class SelectionTest(TT.TenantCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = H.tempdir("sg-rr-sel-")
        cls.idp = TT.Idp(cls.dir)
        cls.ups = [H.start_standin() for _ in range(3)]
        table = {
            "tenant_selectors": ["jwt_claim:tenant", "header:x-spark-tenant", "authority",
                                 "identity"],
            "tenants": [
                {"name": "typed", "backends": TT.backends("typed", cls.ups[0:1]),
                 "allow": {"claims": {"level": [42], "staff": [True],
                                      "groups": ["g1"], "team": ["7"]}},
                 "user_id": "off"},
                {"name": "v6", "hosts": ["::1", "[fe80::2]", "Spark.XN--BCHER-KVA.Example."],
                 "backends": TT.backends("v6", cls.ups[1:2]),
                 "allow": {"identity_prefixes": ["spiffe://example.org/ns/v6/"]},
                 "user_id": "off"},
                {"name": "fallback", "backends": TT.backends("fallback", cls.ups[2:3]),
                 "allow": {"identities": ["zed"]}, "user_id": "off"},
            ],
        }
        TT.write_file(os.path.join(cls.dir, "tenants.json"), json.dumps(table))
        cfg = H.base_config(1, listeners=[TT.jwt_listener()], workers=1, auth=cls.idp.auth())
        del cfg["tenants"]
        cfg["routing_table"] = "tenants.json"
        cls.sg = H.Sparkgate(cfg, config_dir=cls.dir).start()
        cls.port = cls.sg.port("public")
        cls.ch = H.tls_channel(cls.port)

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        rc = cls.sg.stop()
        for u in cls.ups:
            H.stop_standin(u)
        if rc != 0:
            raise AssertionError("sparkgate exited %s" % rc)

    def call(self, md):
        tag = self.tag()
        r = TT.g_unary(self.ch, "AnalyzePlan", TT.msg(tag.encode(), TT.new_session(), "u"),
                       list(md) + [("x-test-case", tag)])
        return r, tag

    def assert_tenant(self, md, want_index, what):
        r, tag = self.call(md)
        self.assertEqual(r.code, OK, (what, r, self.sg.log_text(5)))
        i, rec = self.record_of(tag)
        self.assertEqual(i, want_index, what)

    def assert_denied(self, md, reason, what):
        mark = self.sg.mark()
        r, tag = self.call(md)
        self.assertEqual(r.code, DENIED, (what, r))
        self.sg.wait_for_log(reason, timeout=5, since=mark)
        self.assert_reached_nothing(tag)

    def test_claim_values_compare_by_type(self):
        """docs: "Values may be strings, integers or booleans and compare by
        type (42 does not match "42")", array claims match on any element."""
        md = lambda **c: self.idp.md("dana", tenant="typed", **c)  # noqa: E731
        for claims in ({"level": 42}, {"staff": True}, {"groups": "g1"},
                       {"groups": [{"g1": True}, 42, "g1"]}, {"level": [1, 42]},
                       {"team": "7"}):
            self.assert_tenant(md(**claims), 0, claims)
        for claims in ({"level": "42"}, {"level": 43}, {"staff": "true"}, {"staff": 1},
                       {"staff": False}, {"groups": {"g1": True}}, {"groups": [["g1"]]},
                       {"team": 7}, {}, {"level": None}):
            self.assert_denied(md(**claims),
                               r"not_allowed \(selector jwt_claim:tenant, tenant typed, "
                               r"identity dana\)", claims)

    def test_non_string_tenant_claim_falls_through(self):
        """A jwt_claim: value that is a number, bool, object or null yields
        nothing; the next selector decides (identity: zed -> fallback)."""
        for v in (7, True, {"name": "typed"}, None, ""):
            self.assert_tenant(self.idp.md("zed", tenant=v), 2, v)

    def test_ipv6_and_idn_authorities(self):
        """hosts: "::1 or [::1]" ... ":authority (the port, brackets of an
        IPv6 literal and a trailing dot are ignored; case-insensitive)"."""
        user = "spiffe://example.org/ns/v6/sa/x"
        md = self.idp.md(user)
        with H.H2Client(self.port) as c:
            for authority in ("[::1]:%d" % self.port, "[::1]", "[FE80::2]:443",
                              "spark.xn--bcher-kva.example", "SPARK.xn--BCHER-kva.EXAMPLE.:1"):
                c.authority = authority
                tag = self.tag()
                sid = TT.h2_send(c, H.SERVICE + "AnalyzePlan",
                                 [TT.frame(TT.msg(b"v6", TT.new_session(), user))],
                                 extra=md + [("x-test-case", tag)])
                r = c.wait(sid)
                self.assertEqual(TT.h2_status(r), (0, None), (authority, r))
                i, _ = self.record_of(tag)
                self.assertEqual(i, 1, authority)
            # Not the tenant's host: a different IPv6 address, the host
            # spelled as a prefix, and a non-ASCII spelling of the IDN. The
            # identity selector then finds v6 by its prefix (the only tenant
            # admitting the caller), so the call is OK; zed, admitted only
            # by fallback, lands there: the authority yielded nothing.
            for authority in ("[::2]", "[::1", "spark.xn--bcher-kva.example.evil",
                              "spark.b\u00fccher.example"):
                c.authority = authority
                tag = self.tag()
                sid = TT.h2_send(c, H.SERVICE + "AnalyzePlan",
                                 [TT.frame(TT.msg(b"zed", TT.new_session(), "zed"))],
                                 extra=self.idp.md("zed") + [("x-test-case", tag)])
                r = c.wait(sid)
                if TT.h2_status(r)[0] is None:
                    continue  # refused as malformed by the HTTP/2 layer: fine
                self.assertEqual(TT.h2_status(r), (0, None), (authority, r))
                i, _ = self.record_of(tag)
                self.assertEqual(i, 2, authority)


# ---------------------------------------------------------------------------
# Reload: the credential file rotates; a bad credential or a broken table
# keeps the configuration in force and says where.

class CredentialReloadTest(TT.TenantCase):
    def reload(self, ok):
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        self.sg.wait_for_log(r"reload done" if ok else r"reload failed", timeout=15,
                             since=mark)
        if not ok:
            self.assertIsNone(self.sg.find_log(r"reload done", since=mark))
        return mark

    def authorization_seen(self):
        """Through a fresh connection (so the new generation is in force)."""
        ch = H.tls_channel(self.port)
        try:
            tag = self.tag()
            r = TT.g_unary(ch, "AnalyzePlan", TT.msg(b"c", TT.new_session(), "ann"),
                           self.idp.md("ann") + [("x-test-case", tag)])
            self.assertEqual(r.code, OK, r)
            _, rec = self.record_of(tag)
            return TT.header_of(rec, "authorization")
        finally:
            ch.close()

    def test_rotation_and_failed_reloads(self):
        self.ups = [self.standin()]
        d = H.tempdir("sg-rr-reload-")
        self.idp = TT.Idp(d)
        os.makedirs(os.path.join(d, "tables", "secrets"))
        tok_path = os.path.join(d, "tables", "secrets", "tok")
        tok1 = "first-%s" % os.urandom(8).hex()
        tok2 = "second-%s" % os.urandom(8).hex()
        tok3 = "third %s" % os.urandom(8).hex()
        TT.write_file(tok_path, tok1 + "\n")
        table = {"tenant_selectors": ["identity"],
                 "tenants": [{"name": "ann-t", "backends": TT.backends("a", self.ups),
                              "allow": {"identities": ["ann"]}, "user_id": "off",
                              # relative to the table file's own directory
                              "upstream_credential": {"file": "secrets/tok"}}]}
        table_path = TT.write_file(os.path.join(d, "tables", "t.json"), json.dumps(table))
        cfg = H.base_config(1, listeners=[TT.jwt_listener()], workers=1, auth=self.idp.auth())
        del cfg["tenants"]
        cfg["routing_table"] = "tables/t.json"
        self.sg = self.start_sparkgate(cfg, config_dir=d)
        self.port = self.sg.port()
        self.assertEqual(self.authorization_seen(), ["Bearer " + tok1])

        # "To rotate, replace the file (or the variable) and reload."
        TT.write_file(tok_path, tok2 + "\n")
        self.reload(ok=True)
        self.assertEqual(self.authorization_seen(), ["Bearer " + tok2])

        # A token with a space, an empty file, a missing file: the reload
        # fails, names the file, never the value; tok2 stays in force.
        for content in (tok3, "\n", None):
            if content is None:
                os.unlink(tok_path)
            else:
                TT.write_file(tok_path, content)
            mark = self.reload(ok=False)
            self.assertIsNotNone(self.sg.find_log(r"upstream_credential\.file", since=mark))
            self.assertEqual(self.authorization_seen(), ["Bearer " + tok2], content)

        # A syntax error in the table at reload: old table kept, the error
        # names the file, line and column.
        TT.write_file(tok_path, tok2)
        TT.write_file(table_path, '{\n  "tenants": [\n    {"name": "x",,}\n  ]\n}\n')
        mark = self.reload(ok=False)
        self.sg.wait_for_log(r"t\.json:3:\d+: invalid JSON", timeout=5, since=mark)
        self.assertEqual(self.authorization_seen(), ["Bearer " + tok2])

        log = self.sg.log_text()
        for t in (tok1, tok2, tok3, tok3.split()[1]):
            self.assertNotIn(t, log)


# ---------------------------------------------------------------------------
# Names and addresses checked at load (docs/routing.md, "A tenant",
# "Backends", "Errors reported at load").

def read_doc(name):
    with open(os.path.join(H.SOURCE_ROOT, "docs", name), encoding="utf-8") as f:
        return " ".join(f.read().split())


class BackendAddressSyntaxTest(H.SparkgateTestCase):
    """A backend `address` is an IP address or a host name, nothing else.
    One that is neither ("[::1]", the way `hosts` may write IPv6;
    "127.0.0.1:15002"; "http://x"; surrounding spaces) is refused at load
    with an error at tenants[i].backends[j].address saying what to fix,
    both inline and in a routing table file, instead of loading and
    answering every call with 14 "cannot resolve", which PySpark retries
    without end."""

    BAD = [("[::1]", "without brackets"),
           ("127.0.0.1:15002", "without a port"),
           (" 127.0.0.1", "white space"),
           ("http://x", "without a scheme")]

    def test_inline_tenants(self):
        for address, hint in self.BAD:
            cfg = inline_config([tenant("a", backends=[
                {"name": "b", "address": address, "port": 15002}])])
            rc, out, err = H.check_config(cfg)
            self.assertEqual(rc, 1, "address %r was accepted:\n%s" % (address, out))
            self.assertIn("tenants[0].backends[0].address", err)
            self.assertIn(hint, err)
        for address in ("::1", "127.0.0.1", "localhost", "spark-0.spark.ns.svc.cluster.local."):
            cfg = inline_config([tenant("a", backends=[
                {"name": "b", "address": address, "port": 15002}])])
            rc, out, err = H.check_config(cfg)
            self.assertEqual(rc, 0, "address %r was refused:\n%s" % (address, err))

    def test_routing_table_file(self):
        d = H.tempdir("sg-rr-addr-")
        t = tenant("a", backends=[{"name": "ok", "address": "::1", "port": 1},
                                  {"name": "v6", "address": "[::1]", "port": 1}])
        TT.write_file(os.path.join(d, "tenants.json"), json.dumps({"tenants": [t]}))
        cfg = H.base_config(1)
        del cfg["tenants"]
        cfg["routing_table"] = os.path.join(d, "tenants.json")
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertEqual(rc, 1, out)
        self.assertIn("tenants[0].backends[1].address", err)
        self.assertIn("write an IPv6 address without brackets", err)
        self.assertNotIn("tenants[0].backends[0].address", err)


class UnnamedBackendNameTest(H.SparkgateTestCase):
    """A backend's name is its identity for session affinity, and an
    unnamed backend is named ADDRESS:PORT as written: the same servers
    listed once by IP and once by host name are different backends, so
    their sessions hash differently (replicas must spell them alike). The
    docs say so, and no longer promise that an address change moves no
    session without saying that it holds for named backends only."""

    def test_unnamed_backend_is_named_as_written(self):
        names = []
        for address in ("127.0.0.1", "localhost"):
            cfg = inline_config([tenant("a", backends=[{"address": address, "port": 15002}])])
            rc, out, err = H.check_config(cfg)
            self.assertEqual(rc, 0, err)
            line = [ln for ln in out.splitlines() if ln.strip().startswith("upstream ")]
            self.assertEqual(len(line), 1, out)
            names.append(line[0].split()[1])
        self.assertEqual(names, ["127.0.0.1:15002", "localhost:15002"])
        doc = read_doc("routing.md")
        claim = "| change a backend's address, port or `tls` | none |"
        self.assertFalse(claim in doc, "routing.md still says: %s" % claim)
        self.assertIn("| change an unnamed backend's address or port | as renaming it", doc)
        self.assertIn("Name your backends", doc)


class OffTenantSharingABackendTest(H.SparkgateTestCase):
    """Spark keys a session by user_id and session_id and believes the
    user_id it is sent. A tenant with "user_id": "off" that lists a Spark
    server (same address and port, whatever the backend's name) of a
    tenant that rewrites or enforces user_id lets its callers write that
    tenant's users into their calls and reach their sessions. Each tenant
    is valid alone, so only sparkgate sees the two together: it warns at
    start and in --check-config, naming both tenants and the server, and
    says nothing when the servers differ."""

    def tenants(self, off_address, port):
        return [
            tenant("secure-rw", "alice", backends=[{"name": "spark-a", "address": "127.0.0.1",
                                                    "port": port}], user_id="rewrite"),
            tenant("legacy-off", "bob", backends=[{"name": "spark-b", "address": off_address,
                                                   "port": port}], user_id="off"),
        ]

    def test_off_tenant_sharing_a_backend_is_warned_about(self):
        up = H.start_standin()
        self.addCleanup(up.stop)
        cfg = inline_config(self.tenants("127.0.0.1", up.port), ["header:x-spark-tenant"])
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)
        self.assertIn("WARNING: tenant legacy-off (user_id off) shares backend 127.0.0.1:%d "
                      "with tenant secure-rw (user_id rewrite)" % up.port, out)
        sg = self.start_sparkgate(cfg)
        sg.wait_for_log(r"tenant legacy-off \(user_id off\) shares backend 127\.0\.0\.1:%d "
                        r"with tenant secure-rw \(user_id rewrite\).*give legacy-off Spark "
                        r"servers of its own" % up.port, timeout=5)
        # Another spelling of the same IP is the same server; another port is not.
        rc, out, err = H.check_config(inline_config(
            [tenant("a", backends=[{"address": "::1", "port": 15002}], user_id="enforce"),
             tenant("b", backends=[{"address": "0:0::1", "port": 15002}], user_id="off")]))
        self.assertEqual(rc, 0, err)
        self.assertIn("WARNING: tenant b (user_id off) shares backend 0:0::1:15002 with "
                      "tenant a (user_id enforce)", out)
        rc, out, err = H.check_config(inline_config(
            [tenant("a", backends=[{"address": "127.0.0.1", "port": 15002}]),
             tenant("b", backends=[{"address": "127.0.0.1", "port": 15003}], user_id="off")]))
        self.assertEqual(rc, 0, err)
        self.assertNotIn("WARNING: tenant", out)


class TenantNamedNoneTest(H.SparkgateTestCase):
    """Metrics label calls refused before a tenant was known tenant="none"
    (docs/operations.md). A tenant of that name would merge its series with
    them, so the name is refused at load with a message saying it is
    reserved."""

    def test_tenant_named_none_is_refused(self):
        rc, out, err = H.check_config(inline_config([tenant("none")]))
        self.assertEqual(rc, 1, "a tenant named 'none' is accepted:\n%s%s" % (out, err))
        self.assertIn("tenants[0].name", err)
        self.assertIn("'none' is reserved", err)
        rc, out, err = H.check_config(inline_config([tenant("none-1")]))
        self.assertEqual(rc, 0, err)


# ---------------------------------------------------------------------------
# Backend TLS settings that can never work are refused at load (docs/routing.md,
# "Backends"): each would otherwise load and answer every call with 14, which
# PySpark retries without end.

class BackendTlsCheckedAtLoadTest(H.SparkgateTestCase):
    def test_sni_that_is_not_a_host_name_fails_the_load(self):
        """"sni" is a host name or an IP address, checked like "address": a
        URL or a name with a port can never match a certificate, so the load
        fails with an error at tenants[i].backends[j].tls.sni saying what to
        fix."""
        cfg = H.base_config(1234, backend_tls={"ca": H.pki().ca_cert,
                                               "sni": "https://spark.internal:15002"})
        rc, out, err = H.check_config(cfg)
        self.assertNotEqual(rc, 0, out + err)
        self.assertIn("tenants[0].backends[0].tls.sni", err)
        self.assertIn("without a scheme", err)
        cfg = H.base_config(1234, backend_tls={"ca": H.pki().ca_cert, "sni": "localhost."})
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)

    def test_bad_ca_file_with_verify_false_fails_the_load(self):
        """With "verify": false the "ca" file would never be read, so a
        wrong file (here a private key) would load and fail only the day
        verification is turned back on. "ca" with "verify": false is refused
        as contradictory, at tenants[i].backends[j].tls.ca."""
        p = H.pki()
        cfg = H.base_config(1234, backend_tls={"ca": p.client_cn_key, "verify": False})
        rc, out, err = H.check_config(cfg)
        self.assertNotEqual(rc, 0, out + err)
        self.assertIn("tenants[0].backends[0].tls.ca", err)
        self.assertIn('no effect with "verify": false', err)
        cfg = H.base_config(1234, backend_tls={"verify": False})
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)


class CredentialNonAsciiTest(H.SparkgateTestCase):
    def test_credential_with_non_ascii_bytes_fails_the_load(self):
        """The token goes into a request header, whose value is printable
        ASCII (docs/routing.md, "Upstream credential"). A file saved with a
        UTF-8 byte order mark, or holding any byte outside 0x21-0x7e, fails
        the load with a message that says what to fix and never shows the
        token; it would otherwise go to the backend as "Bearer \\ufeff..."
        and be refused on every call."""
        d = H.tempdir("sg-rr-cred-")
        bom = os.path.join(d, "bom")
        with open(bom, "wb") as f:
            f.write(b"\xef\xbb\xbfS3cretToken\n")
        accented = os.path.join(d, "accented")
        with open(accented, "wb") as f:
            f.write("S3cret\u00e9Token\n".encode("utf-8"))
        cfg = inline_config([tenant("a", upstream_credential={"file": bom}),
                             tenant("b", upstream_credential={"file": accented})],
                            selectors=["header:x-spark-tenant"])
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertNotEqual(rc, 0, out + err)
        self.assertNotIn("S3cret", out + err)
        self.assertIn("tenants[0].upstream_credential.file", err)
        self.assertIn("byte order mark: save the file without it", err)
        self.assertIn("tenants[1].upstream_credential.file", err)
        self.assertIn("non-ASCII", err)


class LimitsDocTest(H.SparkgateTestCase):
    """routing.md, "Limits": `max_message_bytes` cannot be 0 (at least
    1024), so "absent or 0 means no limit" is not said of every key; and the
    limit is on the message as forwarded, after a `user_id` rewrite that can
    lengthen it (a message of exactly N bytes may be refused)."""

    def test_limits_section_says_what_the_loader_and_the_rewrite_do(self):
        doc = read_doc("routing.md")
        self.assertNotIn("Every key is optional; absent or `0` means no limit.", doc)
        self.assertIn("`max_message_bytes` always applies", doc)
        self.assertIn("It applies to the message as forwarded", doc)
        cfg = inline_config([tenant("a", limits={"max_message_bytes": 0})])
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 1, out)
        self.assertIn("tenants[0].limits.max_message_bytes", err)


if __name__ == "__main__":
    H.main()
