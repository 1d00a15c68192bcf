#!/usr/bin/python3
"""Client-certificate authentication (issue 4), end to end against the real
binary: gRPC (and raw TLS) clients with the test PKI's client certificates
-> sparkgate -> the stand-in, which records what reached the upstream.

One sparkgate serves every listener policy at once:
  req-uri / req-dns / req-cn   client_certificates required, methods
                               ["mtls"], identity from the SPIFFE URI SAN,
                               the DNS SAN, the subject CN
  opt-mtls                     optional, methods ["mtls"]
  any / all                    optional, methods ["jwt", "mtls"], require
                               any / all
  bind                         optional, jwt + mtls, bind_token_to_certificate
Covered: the identity and x-forwarded-client-cert (Hash= of the DER, URI=,
DNS=, Subject=) the upstream gets; untrusted, expired and revoked (CRL)
certificates and a missing certificate under "required" failing the
handshake; "optional" without a certificate denied; require any / all;
RFC 8705 certificate-bound tokens (cnf.x5t#S256); spoofed
x-forwarded-client-cert replaced. Every denial: grpc-status 16, the log
line with the reason, and no call at the stand-in.
"""

import base64
import hashlib
import os
import re
import secrets
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import certs  # noqa: E402
import grpc  # noqa: E402
import jwt as pyjwt  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

SERVICE = H.SERVICE
DENY_MESSAGE = "sparkgate: authentication required or failed"
ISS = "https://idp-mtls.test"
AUD = "spark"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)


def thumbprint(path):
    """RFC 8705 x5t#S256: base64url (no padding) of SHA-256 of the DER."""
    return b64url(hashlib.sha256(cert_der(path)).digest())


def xfcc_hash(path):
    return hashlib.sha256(cert_der(path)).hexdigest()


def cert_files(pki, who):
    """(cert, key) of the test PKI's client |who|: spiffe, dns, cn, expired,
    revoked, or other (signed by the unrelated CA); (None, None) for None."""
    if who is None:
        return None, None
    if who == "other":
        return pki.other_client_cert, pki.other_client_key
    return getattr(pki, "client_%s_cert" % who), getattr(pki, "client_%s_key" % who)


def bearer(token):
    return [("authorization", "Bearer " + token)]


def client_probe(port, cert=None, key=None, timeout=5.0):
    """Handshakes with |cert| and speaks the HTTP/2 preface. With TLS 1.3
    the client finishes its side before the server has judged the client
    certificate, so the verdict shows on the first read: (handshake_ok,
    got_server_settings, error text)."""
    ctx = H.client_ssl_context(cert=cert, key=key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return False, False, "%s: %s" % (type(e).__name__, e)
    try:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        s.settimeout(timeout)
        data = b""
        while len(data) < 9:
            chunk = s.recv(9 - len(data))
            if not chunk:
                return True, False, "EOF"
            data += chunk
        return True, data[3] == 0x4, None
    except (ssl.SSLError, OSError) as e:
        return True, False, "%s: %s" % (type(e).__name__, e)
    finally:
        s.close()


class MtlsTest(H.SparkgateTestCase):
    @classmethod
    def setUpClass(cls):
        cls.pki = p = H.pki()
        cls.dir = H.tempdir("sg-mtls-")
        cls.secret = secrets.token_hex(24).encode()
        cls.secret_file = os.path.join(cls.dir, "hmac.key")
        with open(cls.secret_file, "wb") as f:
            f.write(cls.secret)
        tls = {"client_ca": p.ca_cert, "crl": [p.crl]}

        def lst(name, mode, **auth):
            return H.tls_listener(name, auth=auth, client_certificates=mode, **tls)

        listeners = [
            lst("req-uri", "required", methods=["mtls"], client_identity="uri_san"),
            lst("req-dns", "required", methods=["mtls"], client_identity="dns_san"),
            lst("req-cn", "required", methods=["mtls"], client_identity="cn"),
            H.tls_listener("req-cn-nocrl", auth={"methods": ["mtls"], "client_identity": "cn"},
                           client_certificates="required", client_ca=p.ca_cert),
            lst("opt-mtls", "optional", methods=["mtls"]),
            lst("any", "optional", methods=["jwt", "mtls"], require="any"),
            lst("all", "optional", methods=["jwt", "mtls"], require="all"),
            lst("bind", "optional", methods=["jwt", "mtls"],
                bind_token_to_certificate=True),
        ]
        cls.up = H.start_standin()
        cfg = H.base_config(cls.up.port, listeners=listeners, auth={"jwt_providers": [
            {"name": "corp", "issuer": ISS, "audiences": [AUD],
             "keys": [{"alg": "HS256", "secret_file": cls.secret_file}]}]})
        cls.sg = H.Sparkgate(cfg).start()
        cls.channels = {}

    @classmethod
    def tearDownClass(cls):
        for ch in cls.channels.values():
            ch.close()
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def setUp(self):
        super().setUp()
        self._started.append(self.sg)
        self.up.clear()
        self._n = 0

    # -- helpers -------------------------------------------------------------------
    def port(self, listener):
        return self.sg.port(listener)

    def channel(self, listener, who=None):
        """A cached channel to |listener| presenting the client certificate
        |who| (spiffe, dns, cn, expired, revoked, other) or none."""
        k = (listener, who)
        if k not in self.channels:
            cert, key = cert_files(self.pki, who)
            self.channels[k] = H.tls_channel(self.port(listener), client_cert=cert,
                                             client_key=key)
        return self.channels[k]

    def token(self, sub="jwt-user", **extra):
        now = int(time.time())
        c = {"iss": ISS, "aud": AUD, "sub": sub, "iat": now, "exp": now + 600}
        c.update(extra)
        tok = pyjwt.encode(c, self.secret, algorithm="HS256")
        return tok if isinstance(tok, str) else tok.decode()

    def tag(self):
        self._n += 1
        return "%s-%d" % (self._testMethodName, self._n)

    def call_ok(self, listener, who=None, md=()):
        tag = self.tag()
        r = H.call_unary(self.channel(listener, who), "AnalyzePlan", tag.encode(),
                         list(md) + [("x-test-case", tag)])
        self.assertEqual(r.code, grpc.StatusCode.OK, (listener, who, r, self.sg.log_text(5)))
        self.assertEqual(r.response, tag.encode())
        rec = self.up.wait_for_call(None, timeout=5,
                                    where=lambda c: c.header("x-test-case") == tag)
        self.assertIsNone(rec.header("authorization"), rec.metadata)
        return rec

    def assert_denied(self, listener, who, md, reason):
        tag = self.tag()
        path = SERVICE + "AuthCase_" + re.sub(r"\W", "_", tag)
        mark = self.sg.mark()
        r = H.call_unary(self.channel(listener, who), path, b"x",
                         list(md) + [("x-test-case", tag)])
        self.assertEqual((r.code, r.details), (grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGE),
                         (listener, who, r))
        self.sg.wait_for_log(r"path=%s: rejected: unauthenticated: %s" % (re.escape(path), reason),
                             timeout=5, since=mark)
        self.assertEqual([c for c in self.up.calls() if c.header("x-test-case") == tag], [])

    def headers(self, rec, name):
        return [v for k, v in rec.metadata if k == name]

    def assert_identity(self, rec, identity, method, provider=None):
        self.assertEqual(self.headers(rec, "x-sparkgate-identity"), [identity], rec.metadata)
        self.assertEqual(self.headers(rec, "x-sparkgate-auth-method"), [method], rec.metadata)
        self.assertEqual(self.headers(rec, "x-sparkgate-identity-provider"),
                         [provider] if provider else [], rec.metadata)
        self.assertEqual(self.headers(rec, "x-sparkgate-tenant"), ["default"], rec.metadata)

    def assert_xfcc(self, rec, cert, *parts):
        xfcc = self.headers(rec, "x-forwarded-client-cert")
        self.assertEqual(len(xfcc), 1, rec.metadata)
        self.assertIn("Hash=" + xfcc_hash(cert), xfcc[0])
        for part in parts:
            self.assertIn(part, xfcc[0])
        return xfcc[0]

    def assert_handshake_refused(self, listener, who):
        cert, key = cert_files(self.pki, who)
        mark = self.sg.mark()
        ok, settings, err = client_probe(self.port(listener), cert, key)
        self.assertFalse(settings, (listener, who, ok, err))
        why = ("certificate verify failed" if who
               else "requires a client certificate and the client sent none")
        self.sg.wait_for_log(r"TLS handshake failed: .*" + why, timeout=5, since=mark)
        # And through gRPC: the call never gets a connection.
        ch = H.tls_channel(self.port(listener), client_cert=cert, client_key=key)
        try:
            r = H.call_unary(ch, "AnalyzePlan", b"x", [("x-test-case", "hs-%s" % who)],
                             timeout=5)
        finally:
            ch.close()
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, (listener, who, r))
        self.assertEqual([c for c in self.up.calls()
                          if c.header("x-test-case") == "hs-%s" % who], [])

    # -- identities --------------------------------------------------------------------
    def test_spiffe_identity(self):
        p = self.pki
        rec = self.call_ok("req-uri", "spiffe")
        self.assert_identity(rec, certs.SPIFFE_ID, "mtls")
        self.assert_xfcc(rec, p.client_spiffe_cert, "URI=" + certs.SPIFFE_ID,
                         'Subject="CN=spiffe-client"')
        # Several calls on the connection: the same identity each time.
        for _ in range(3):
            self.assert_identity(self.call_ok("req-uri", "spiffe"), certs.SPIFFE_ID, "mtls")

    def test_dns_identity(self):
        rec = self.call_ok("req-dns", "dns")
        self.assert_identity(rec, certs.CLIENT_DNS, "mtls")
        self.assert_xfcc(rec, self.pki.client_dns_cert, "DNS=" + certs.CLIENT_DNS)

    def test_cn_identity(self):
        rec = self.call_ok("req-cn", "cn")
        self.assert_identity(rec, "alice", "mtls")
        x = self.assert_xfcc(rec, self.pki.client_cn_cert, 'Subject="CN=alice"')
        self.assertNotIn("URI=", x)
        self.assertNotIn("DNS=", x)
        # The CN mode takes the CN of any trusted certificate.
        rec = self.call_ok("req-cn", "spiffe")
        self.assert_identity(rec, "spiffe-client", "mtls")

    def test_certificate_without_the_listeners_identity(self):
        # A trusted certificate that has no identity of the listener's kind.
        self.assert_denied("req-uri", "cn", [], r"no_cert_identity: no_uri_san")
        self.assert_denied("req-uri", "dns", [], r"no_cert_identity: no_uri_san")
        self.assert_denied("req-dns", "spiffe", [], r"no_cert_identity: no_dns_san")
        self.assert_denied("req-dns", "cn", [], r"no_cert_identity: no_dns_san")

    def test_spoofed_client_cert_headers_replaced(self):
        p = self.pki
        spoof = [("x-forwarded-client-cert", "Hash=00;URI=spiffe://evil.test/ns/x/sa/root"),
                 ("x-sparkgate-identity", "root"), ("client-cert", ":AAAA:"),
                 ("x-sparkgate-auth-method", "jwt")]
        rec = self.call_ok("req-uri", "spiffe", spoof)
        self.assert_identity(rec, certs.SPIFFE_ID, "mtls")
        x = self.assert_xfcc(rec, p.client_spiffe_cert, "URI=" + certs.SPIFFE_ID)
        self.assertNotIn("evil", x)
        self.assertEqual(self.headers(rec, "client-cert"), [])
        # Underscore aliases are refused outright.
        r = H.call_unary(self.channel("req-uri", "spiffe"), "AnalyzePlan", b"x",
                         [("x_forwarded_client_cert", "Hash=00"), ("x-test-case", "alias")])
        self.assertEqual(r.code, grpc.StatusCode.INVALID_ARGUMENT, r)
        self.assertEqual([c for c in self.up.calls() if c.header("x-test-case") == "alias"], [])

    # -- handshake failures --------------------------------------------------------------
    def test_untrusted_expired_revoked_fail_the_handshake(self):
        # req-cn would accept each of these certificates' CN as an identity:
        # only the chain checks stand in the way.
        for who in ("other", "expired", "revoked"):
            self.assert_handshake_refused("req-cn", who)
        for who in ("other", "expired", "revoked"):
            self.assert_handshake_refused("any", who)
        # A good certificate still works on the same listeners.
        self.assert_identity(self.call_ok("req-cn", "cn"), "alice", "mtls")
        # Without the CRL the revoked certificate passes: so the CRL is
        # what refused it above (and the others fail there all the same).
        rec = self.call_ok("req-cn-nocrl", "revoked")
        self.assert_identity(rec, "revoked-client", "mtls")
        self.assert_xfcc(rec, self.pki.client_revoked_cert, 'Subject="CN=revoked-client"')
        for who in ("other", "expired"):
            self.assert_handshake_refused("req-cn-nocrl", who)

    def test_required_without_certificate_fails_the_handshake(self):
        for listener in ("req-uri", "req-dns", "req-cn"):
            self.assert_handshake_refused(listener, None)

    # -- optional ------------------------------------------------------------------------
    def test_optional_without_certificate_mtls_only_is_denied(self):
        ok, settings, err = client_probe(self.port("opt-mtls"))
        self.assertTrue(ok and settings, err)   # the handshake is fine
        self.assert_denied("opt-mtls", None, [], "no_credentials")
        # A token does not help where only mtls counts.
        self.assert_denied("opt-mtls", None, bearer(self.token()), "no_credentials")
        rec = self.call_ok("opt-mtls", "spiffe")
        self.assert_identity(rec, certs.SPIFFE_ID, "mtls")
        # And with a certificate, a token on an mtls-only listener is ignored.
        rec = self.call_ok("opt-mtls", "spiffe", bearer(self.token("ignored")))
        self.assert_identity(rec, certs.SPIFFE_ID, "mtls")

    # -- jwt and mtls ----------------------------------------------------------------------
    def test_require_any(self):
        p = self.pki
        rec = self.call_ok("any", None, bearer(self.token("tok-only")))
        self.assert_identity(rec, "tok-only", "jwt", "corp")
        self.assertEqual(self.headers(rec, "x-forwarded-client-cert"), [])
        rec = self.call_ok("any", "spiffe")
        self.assert_identity(rec, certs.SPIFFE_ID, "mtls")
        self.assert_xfcc(rec, p.client_spiffe_cert, "URI=" + certs.SPIFFE_ID)
        # Both: the token names the user.
        rec = self.call_ok("any", "spiffe", bearer(self.token("both")))
        self.assertEqual(self.headers(rec, "x-sparkgate-identity"), ["both"], rec.metadata)
        self.assert_xfcc(rec, p.client_spiffe_cert)
        # Neither.
        self.assert_denied("any", None, [], "no_credentials")
        # A refused token is never quietly replaced by the certificate.
        now = int(time.time())
        expired = self.token("late", iat=now - 7200, exp=now - 3600)
        self.assert_denied("any", "spiffe", bearer(expired), "jwt_invalid: expired")
        self.assert_denied("any", "spiffe", bearer(self.token() + "x"),
                           r"jwt_invalid: (bad_signature|malformed)")
        # A certificate without the listener's identity kind, no token.
        self.assert_denied("any", "cn", [], r"no_cert_identity: no_uri_san")

    def test_require_all(self):
        p = self.pki
        self.assert_denied("all", None, bearer(self.token("u")), "cert_required")
        self.assert_denied("all", "spiffe", [], "jwt_required")
        self.assert_denied("all", None, [], r"(no_credentials|jwt_required|cert_required)")
        rec = self.call_ok("all", "spiffe", bearer(self.token("both-user")))
        self.assert_identity(rec, "both-user", "jwt+mtls", "corp")
        self.assert_xfcc(rec, p.client_spiffe_cert, "URI=" + certs.SPIFFE_ID)
        # Both presented, one of them bad.
        now = int(time.time())
        self.assert_denied("all", "spiffe", bearer(self.token(iat=now - 7200, exp=now - 3600)),
                           "jwt_invalid: expired")
        self.assert_denied("all", "cn", bearer(self.token("u")), r"no_cert_identity: no_uri_san")

    def test_certificate_bound_token(self):
        p = self.pki
        bound = self.token("bound-user", cnf={"x5t#S256": thumbprint(p.client_spiffe_cert)})
        # On a connection with that certificate: accepted, backed by both.
        for listener in ("any", "bind"):
            rec = self.call_ok(listener, "spiffe", bearer(bound))
            self.assert_identity(rec, "bound-user", "jwt+mtls", "corp")
            self.assert_xfcc(rec, p.client_spiffe_cert)
        # Another certificate of the same CA: refused.
        for listener in ("any", "bind", "all"):
            self.assert_denied(listener, "dns", bearer(bound), "token_cert_mismatch")
            self.assert_denied(listener, "cn", bearer(bound), "token_cert_mismatch")
        # No certificate at all: refused (RFC 8705 3), whatever the policy.
        self.assert_denied("any", None, bearer(bound), "bound_token_no_cert")
        self.assert_denied("bind", None, bearer(bound), "bound_token_no_cert")
        # A thumbprint that is not the certificate's (one bit off).
        tp = bytearray(hashlib.sha256(cert_der(p.client_spiffe_cert)).digest())
        tp[0] ^= 1
        wrong = self.token("x", cnf={"x5t#S256": b64url(bytes(tp))})
        self.assert_denied("any", "spiffe", bearer(wrong), "token_cert_mismatch")
        # Hex instead of base64url, or padded: not a thumbprint at all.
        for bad in (xfcc_hash(p.client_spiffe_cert), thumbprint(p.client_spiffe_cert) + "="):
            self.assert_denied("any", "spiffe", bearer(self.token("x", cnf={"x5t#S256": bad})),
                               "jwt_invalid: malformed")
        # bind_token_to_certificate: an unbound token is refused even with
        # a certificate; elsewhere it is fine.
        unbound = self.token("free-user")
        self.assert_denied("bind", "spiffe", bearer(unbound), "token_not_bound")
        rec = self.call_ok("any", "dns", bearer(unbound))
        self.assert_identity(rec, "free-user", "jwt", "corp")


if __name__ == "__main__":
    H.main()
