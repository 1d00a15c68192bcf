#!/usr/bin/python3
"""Configuration loading and validation against docs/configuration.md:
what is refused, and that each problem is reported where it is."""

import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402


def good_config(port=None):
    p = H.pki()
    return {
        "workers": 1,
        "listeners": [
            {"name": "public", "address": "127.0.0.1",
             "port": port if port is not None else H.free_port(),
             "tls": {"cert": p.server_cert, "key": p.server_key}, "auth": "none"},
        ],
        "tenants": [{"name": "default", "allow": {"any_identity": True}, "backends": [
            {"name": "spark-1", "address": "127.0.0.1", "port": 15002}]}],
    }


class Base(H.SparkgateTestCase):
    def assertRejected(self, cfg, *paths):
        d = H.tempdir("sg-conf-")
        rc, out, err = H.check_config(cfg, directory=d, name="bad-config.json")
        self.assertEqual(rc, 1, "want exit 1; stdout:\n%s\nstderr:\n%s" % (out, err))
        lines = err.splitlines()
        for path in paths:
            hits = [l for l in lines if path in l and "bad-config.json" in l]
            self.assertTrue(hits, "no error names %r; stderr:\n%s" % (path, err))
        return err


class CrlThatIsACertificateTest(Base):
    """listeners[].tls.crl is "CRLs (PEM)": a certificate file listed there
    is refused (it used to be loaded into the client-certificate trust
    store, silently)."""

    def test_certificate_in_crl_list_is_refused(self):
        p = H.pki()
        cfg = good_config()
        cfg["listeners"][0]["tls"].update(client_certificates="required",
                                          client_ca=p.ca_cert,
                                          crl=[p.other_ca_cert])
        err = self.assertRejected(cfg, "listeners[0].tls")
        self.assertIn("holds no PEM CRL", err)


class CrlNotCheckedWithoutClientCertsTest(Base):
    """CRL files are read at load in every mode: an unparsable one fails
    the load also with client_certificates "none" (it used to pass)."""

    def test_garbage_crl_is_refused(self):
        d = H.tempdir("sg-crl-")
        bad = os.path.join(d, "garbage.crl")
        with open(bad, "w") as f:
            f.write("this is not a CRL\n")
        cfg = good_config()
        cfg["listeners"][0]["tls"]["crl"] = [bad]
        self.assertRejected(cfg, "listeners[0].tls")


class EveryErrorIsReportedTest(Base):
    """--check-config "prints every error": an unrelated error elsewhere
    must not hide a key that does not match its certificate."""

    def test_key_mismatch_reported_alongside_other_errors(self):
        p = H.pki()
        cfg = good_config()
        cfg["workers"] = 999
        cfg["listeners"][0]["tls"]["key"] = p.other_server_key
        err = self.assertRejected(cfg, "workers")
        self.assertIn("does not match", err,
                      "the key/certificate mismatch was not reported:\n" + err)


class ListenerAddressSpellingTest(Base):
    """Two listeners on one address:port are refused however the address
    is spelt: "::1" and "0::1" used to both load and both bind
    (SO_REUSEPORT), the kernel spreading connections over two listeners
    with different TLS and auth settings."""

    def test_same_address_spelt_differently_is_refused(self):
        port = H.free_port("::1")
        cfg = good_config(port)
        a = cfg["listeners"][0]
        a["address"] = "::1"
        b = copy.deepcopy(a)
        b["name"] = "other"
        b["address"] = "0::1"
        cfg["listeners"].append(b)
        self.assertRejected(cfg, "listeners[1]")


class Ipv4MappedAddressTest(Base):
    """An IPv4-mapped IPv6 address ("::ffff:127.0.0.1") is refused at load
    for a listener and for the admin listener, with the IPv4 spelling to
    use. A client listener is IPv6-only and cannot bind one (the start used
    to fail with "Invalid argument" after --check-config said OK); the
    admin listener is dual-stack, where it is the IPv4 address, and it
    slipped past the check against client listeners on the same port."""

    def test_listener_address_is_refused(self):
        cfg = good_config(port=0)
        cfg["listeners"][0]["address"] = "::ffff:127.0.0.1"
        err = self.assertRejected(cfg, "listeners[0].address")
        self.assertIn("write it as the IPv4 address 127.0.0.1", err)

    def test_admin_address_is_refused(self):
        port = H.free_port()
        cfg = good_config(port=port)
        cfg["admin"] = {"address": "::ffff:127.0.0.1", "port": port}
        err = self.assertRejected(cfg, "admin.address")
        self.assertIn("write it as the IPv4 address 127.0.0.1", err)


class AccessLogCheckConfigTest(Base):
    """--check-config agrees with a start about the access log: a path in
    a directory that does not exist fails both (the check used to say OK
    to a file a start then refused)."""

    def test_check_config_agrees_with_start(self):
        cfg = good_config()
        cfg["access_log"] = {"path": "/nonexistent-sparkgate-check/access.log"}
        d = H.tempdir("sg-conf-")
        rc, out, err = H.check_config(cfg, directory=d, name="bad-config.json")
        self.assertEqual(rc, 1, "want exit 1; stdout:\n%s\nstderr:\n%s" % (out, err))
        self.assertIn("access_log.path", err)
        self.assertIn("/nonexistent-sparkgate-check", err)
        sg = H.Sparkgate(cfg)
        self.addCleanup(sg.stop, check=False)
        sg.spawn()
        self.assertNotEqual(sg.wait(10), 0, "a start took the access log path")
        # A writable one passes.
        cfg["access_log"] = {"path": os.path.join(d, "access.log")}
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)

    def test_dangling_symlink_is_refused_at_load(self):
        """A symlink whose target's directory is missing cannot be opened:
        it is refused at load (the check used to look only at the link's
        own directory, and the start or reload then failed at open)."""
        cfg = good_config()
        d = H.tempdir("sg-conf-")
        link = os.path.join(d, "access.log")
        os.symlink(os.path.join(d, "no-such-dir", "access.log"), link)
        cfg["access_log"] = {"path": link}
        rc, out, err = H.check_config(cfg, directory=d, name="bad-config.json")
        self.assertEqual(rc, 1, "want exit 1; stdout:\n%s\nstderr:\n%s" % (out, err))
        self.assertIn("access_log.path", err)


class JwtListenerNeedsProviderTest(Base):
    """configuration.md: "A listener that accepts `jwt` needs at least one
    [provider], unless it also accepts `mtls` with "require": "any"". With
    "require": "all" and no provider no call could ever pass: refused."""

    def test_jwt_and_mtls_all_without_providers_is_refused(self):
        p = H.pki()
        cfg = good_config()
        cfg["listeners"][0]["tls"].update(client_certificates="required",
                                          client_ca=p.ca_cert)
        cfg["listeners"][0]["auth"] = {"methods": ["jwt", "mtls"], "require": "all"}
        self.assertRejected(cfg, "listeners[0].auth")
        cfg["listeners"][0]["auth"] = {"methods": ["jwt", "mtls"], "require": "any"}
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)


class ProviderThatFailedIsNotMissingTest(Base):
    """A provider that fails to load (here: an HS256 secret too short) gets
    its own error naming the key file. The listener that accepts JWT is not
    also told "no auth.jwt_providers are configured: add a provider": the
    provider is configured, and that advice would send the operator the
    wrong way."""

    def test_short_hmac_secret_is_not_reported_as_missing_providers(self):
        d = H.tempdir("sg-conf-")
        key = os.path.join(d, "hmac.key")
        with open(key, "w") as f:
            f.write("tooshort")
        cfg = H.base_config(
            1234, listeners=[H.tls_listener("public", auth={"methods": ["jwt"]})],
            auth={"jwt_providers": [{"name": "idp", "issuer": "https://idp.test",
                                     "audiences": ["spark"],
                                     "keys": [{"alg": "HS256", "secret_file": key}]}]})
        rc, out, err = H.check_config(cfg, directory=d)
        self.assertEqual(rc, 1, (out, err))
        self.assertIn("secret_file", err)
        self.assertNotIn("no auth.jwt_providers are configured", err,
                         "a provider that failed to load is reported as absent:\n" + err)


if __name__ == "__main__":
    H.main()
