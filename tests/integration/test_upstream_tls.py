#!/usr/bin/python3
"""Backends over TLS: sparkgate verifies the backend's certificate against
tenants[].backends[].tls.ca and the expected name (sni, else the address),
and any failure to do so is UNAVAILABLE (14) to the client, with the
backend never seeing the call."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import grpc  # noqa: E402


class UpstreamTlsTest(H.SparkgateTestCase):
    def proxy(self, up, tls, address="127.0.0.1"):
        cfg = H.base_config(up.port, backend_address=address, backend_tls=tls, workers=1)
        cfg["upstream"] = {"connect_timeout_ms": 5000}
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        return sg, ch

    def assertWorks(self, up, ch):
        r = H.call_unary(ch, "Config", b"over tls")
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, b"over tls"), r)
        r = H.call_server_stream(ch, "ExecutePlan", b"s", H.standin_md(count=3))
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual(len(r.responses), 3)
        r = H.call_client_stream(ch, "AddArtifacts", [b"a" * 100000, b"b" * 7])
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual(len(up.calls()), 3)

    def assertUnavailable(self, up, ch):
        for _ in range(2):  # the first call and one after the first failure
            r = H.call_unary(ch, "Config", b"x", timeout=30)
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
            self.assertTrue(r.details, r)
        self.assertEqual(up.calls(), [])

    def test_ca_and_sni_match(self):
        up = self.standin(tls=True)
        sg, ch = self.proxy(up, {"ca": H.pki().ca_cert, "sni": "localhost"})
        self.assertWorks(up, ch)

    def test_ca_match_ip_address_checked_against_ip_san(self):
        # No sni and a numeric address: the certificate's IP SAN 127.0.0.1
        # is what makes it the right server.
        up = self.standin(tls=True)
        sg, ch = self.proxy(up, {"ca": H.pki().ca_cert})
        self.assertWorks(up, ch)

    def test_ca_bundle_with_the_right_ca(self):
        up = self.standin(tls=True)
        sg, ch = self.proxy(up, {"ca": H.pki().ca_bundle, "sni": "localhost"})
        self.assertWorks(up, ch)

    def test_wrong_ca_is_unavailable(self):
        up = self.standin(tls=True)
        sg, ch = self.proxy(up, {"ca": H.pki().other_ca_cert, "sni": "localhost"})
        self.assertUnavailable(up, ch)

    def test_backend_cert_from_another_ca_is_unavailable(self):
        p = H.pki()
        up = self.standin(tls=True, cert=p.other_server_cert, key=p.other_server_key)
        sg, ch = self.proxy(up, {"ca": p.ca_cert, "sni": "localhost"})
        self.assertUnavailable(up, ch)

    def test_sni_name_mismatch_is_unavailable(self):
        up = self.standin(tls=True)
        sg, ch = self.proxy(up, {"ca": H.pki().ca_cert, "sni": "spark.wrong.example"})
        self.assertUnavailable(up, ch)

    def test_expired_backend_cert_is_unavailable(self):
        p = H.pki()
        up = self.standin(tls=True, cert=p.server_expired_cert, key=p.server_expired_key)
        sg, ch = self.proxy(up, {"ca": p.ca_cert, "sni": "localhost"})
        self.assertUnavailable(up, ch)

    def test_h2c_config_against_tls_backend_is_unavailable(self):
        up = self.standin(tls=True)
        sg, ch = self.proxy(up, None)
        self.assertUnavailable(up, ch)

    def test_client_certificate_to_backend(self):
        p = H.pki()
        up = self.standin(tls=True, client_ca=p.ca_cert)
        sg, ch = self.proxy(up, {"ca": p.ca_cert, "sni": "localhost",
                                 "cert": p.client_cn_cert, "key": p.client_cn_key})
        self.assertWorks(up, ch)

    def test_backend_requiring_client_cert_without_one_is_unavailable(self):
        p = H.pki()
        up = self.standin(tls=True, client_ca=p.ca_cert)
        sg, ch = self.proxy(up, {"ca": p.ca_cert, "sni": "localhost"})
        self.assertUnavailable(up, ch)


if __name__ == "__main__":
    H.main()
