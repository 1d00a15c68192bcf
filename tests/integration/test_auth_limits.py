#!/usr/bin/python3
"""Authentication at its limits, against the real binary (modelled on
test_auth_jwt.py / test_auth_mtls.py).

  LongSpiffeIdTest   a valid SPIFFE ID (URI SAN) up to 2048 bytes long is
                     an identity like any other: Spark calls under user_id
                     rewrite carry it (over 1024 bytes they used to fail
                     with INTERNAL, 13).
  CachedTokenTest    a verified token that expires while cached is refused.
"""

import datetime
import os
import re
import secrets
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import spark_proto as P  # noqa: E402
import grpc  # noqa: E402
import jwt as pyjwt  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

SERVICE = H.SERVICE
DENY_MESSAGE = "sparkgate: authentication required or failed"
ISS = "https://idp-authlimits.test"
AUD = "spark"


def issue_client_cert(directory, name, uris=(), dns=(), cn="authlimits-client"):
    """A client certificate signed by the test PKI's CA, with the given
    URI / DNS SANs and subject CN. Returns (cert path, key path)."""
    p = H.pki()
    with open(p.ca_cert, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(p.ca_key, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca_cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False))
    sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return H.write_cert_and_key(directory, name, cert, key)


# ---------------------------------------------------------------------------

class LongSpiffeIdTest(H.SparkgateTestCase):
    """docs/security.md: `uri_san`: exactly one URI SAN, a valid SPIFFE ID
    (SPIFFE IDs may be up to 2048 bytes). The Spark message scanner takes
    every identity a caller can be admitted with; it used to stop at 1024
    bytes, and such a caller could not make a single Spark call in
    rewrite/enforce mode."""

    def test_spiffe_id_over_1024_bytes_can_call_spark(self):
        d = H.tempdir("sg-authlim-spiffe-")
        spiffe = "spiffe://example.org/ns/acme/sa/" + "a" * 1100
        self.assertLessEqual(len(spiffe), 2048)
        cert, key = issue_client_cert(d, "long-spiffe", uris=[spiffe])
        up = self.standin()
        up.record_raw = True
        p = H.pki()
        lst = H.tls_listener("public", auth={"methods": ["mtls"], "client_identity": "uri_san"},
                             client_certificates="required", client_ca=p.ca_cert)
        cfg = H.base_config(up.port, listeners=[lst])
        cfg["tenants"][0]["user_id"] = "rewrite"
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"), client_cert=cert, client_key=key)
        self.addCleanup(ch.close)
        mark = sg.mark()
        r = H.call_unary(ch, "AnalyzePlan", b"long-id", [("x-test-case", "long")])
        self.assertEqual(r.code, grpc.StatusCode.OK, (r, sg.log_text(5)))
        rec = up.wait_for_call(None, timeout=5,
                               where=lambda c: c.header("x-test-case") == "long")
        self.assertEqual(rec.header("x-sparkgate-identity"), spiffe)
        self.assertEqual(P.user_id_of(rec.raw_requests[0]), spiffe)
        self.assertIsNone(sg.find_log(r"identity must be 1 to 1024 bytes", since=mark))


# ---------------------------------------------------------------------------

class CachedTokenTest(H.SparkgateTestCase):
    """A token verified (and cached) while valid must be refused once its exp
    (+ leeway, here 0) has passed, though it still sits in the cache."""

    def test_token_expiring_in_cache_is_refused(self):
        self.expiring_token(100)

    def test_without_a_cache_every_call_verifies(self):
        # "token_cache_entries": 0 is no cache (it used to mean the default).
        self.expiring_token(0)

    def expiring_token(self, cache_entries):
        d = H.tempdir("sg-authlim-cache-")
        secret = secrets.token_hex(24).encode()
        sf = os.path.join(d, "hmac.key")
        with open(sf, "wb") as f:
            f.write(secret)
        up = self.standin()
        cfg = H.base_config(up.port, listeners=[H.tls_listener("public",
                                                               auth={"methods": ["jwt"]})],
                            workers=1,
                            auth={"jwt_providers": [
                                {"name": "corp", "issuer": ISS, "audiences": [AUD],
                                 "leeway_s": 0,
                                 "keys": [{"alg": "HS256", "secret_file": sf}]}],
                                "token_cache_entries": cache_entries,
                                "token_cache_max_ttl_s": 300})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        now = int(time.time())
        tok = pyjwt.encode({"iss": ISS, "aud": AUD, "sub": "alice", "iat": now,
                            "exp": now + 3}, secret, algorithm="HS256")
        md = [("authorization", "Bearer " + tok)]
        r = H.call_unary(ch, "AnalyzePlan", b"a", md)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        r = H.call_unary(ch, "AnalyzePlan", b"b", md)   # a cache hit
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        while time.time() < now + 4.2:
            time.sleep(0.2)
        mark = sg.mark()
        r = H.call_unary(ch, "AnalyzePlan", b"c", md)
        self.assertEqual((r.code, r.details), (grpc.StatusCode.UNAUTHENTICATED, DENY_MESSAGE), r)
        sg.wait_for_log(r"rejected: unauthenticated: jwt_invalid: expired", timeout=5,
                        since=mark)


if __name__ == "__main__":
    H.main()
