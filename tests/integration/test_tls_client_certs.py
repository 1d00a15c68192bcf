#!/usr/bin/python3
"""The TLS front end, mTLS client identity and backend TLS, beyond the
basics of test_auth_mtls and test_upstream_tls: session resumption with
client certificates across reloads, listeners and certificate expiry
(docs/security.md, "TLS front end"), a certificate revoked by a reload on a
connection already open, client certificates the test PKI of
tests/lib/certs.py does not have (made here with `cryptography`:
intermediate CAs and their CRLs, wrong EKU, not yet valid, many SANs), and
what the backend TLS leg logs.

Every wait is bounded; every port is chosen by the kernel; every process
is stopped by the harness.
"""

import datetime
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

SERVICE = H.SERVICE
DENY_MESSAGE = "sparkgate: authentication required or failed"
warnings.filterwarnings("ignore", category=ResourceWarning)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


# ---------------------------------------------------------------------------
# A small PKI made with `cryptography`, for certificates the openssl CLI
# makes awkward (NUL in a name, raw extensions).

def _now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


class Ca:
    def __init__(self, directory, name, cn, issuer=None, path_len=None, extensions=()):
        self.dir, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        self.issuer = issuer
        self.revoked = []  # serials
        signer = issuer or self
        now = _now()
        b = (x509.CertificateBuilder()
             .subject_name(self.subject)
             .issuer_name(signer.subject)
             .public_key(self.key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=3650))
             .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
             .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                          False, False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                            critical=False))
        if issuer is not None:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.key.public_key()), critical=False)
        for ext, crit in extensions:
            b = b.add_extension(ext, critical=crit)
        self.cert = b.sign(signer.key, hashes.SHA256())
        self.cert_file = self._write(name + ".pem", self.cert.public_bytes(
            serialization.Encoding.PEM))

    def _write(self, fname, data):
        path = os.path.join(self.dir, fname)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(self, fname, cn=None, subject=None, sans=(), eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
              not_before=None, not_after=None, extensions=(), with_chain=False):
        """A leaf: (cert_file, key_file, cert). |subject| (an x509.Name)
        overrides |cn|; |sans| are x509.GeneralName; |extensions| are
        (ExtensionType, critical) pairs added as they are; |with_chain|
        writes this CA's certificate after the leaf (for intermediates)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        if subject is None:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
        b = (x509.CertificateBuilder()
             .subject_name(subject)
             .issuer_name(self.subject)
             .public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(not_before or now - datetime.timedelta(days=1))
             .not_valid_after(not_after or now + datetime.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                          False, False), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 self.key.public_key()), critical=False))
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        for ext, crit in extensions:
            b = b.add_extension(ext, critical=crit)
        cert = b.sign(self.key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if with_chain:
            pem += self.cert.public_bytes(serialization.Encoding.PEM)
        cert_file = self._write(fname + ".pem", pem)
        key_file = self._write(fname + ".key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_file, key_file, cert

    def revoke(self, cert):
        self.revoked.append(cert.serial_number)

    def crl(self, fname, next_update_days=30):
        now = _now()
        b = (x509.CertificateRevocationListBuilder()
             .issuer_name(self.subject)
             .last_update(now - datetime.timedelta(minutes=5))
             .next_update(now + datetime.timedelta(days=next_update_days)))
        for serial in self.revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=1)).build())
        crl = b.sign(self.key, hashes.SHA256())
        return self._write(fname, crl.public_bytes(serialization.Encoding.PEM))


def bundle(directory, fname, *files):
    path = os.path.join(directory, fname)
    with open(path, "wb") as out:
        for p in files:
            with open(p, "rb") as f:
                out.write(f.read())
    return path


# ---------------------------------------------------------------------------
# Helpers

def rewrite_config(sg, cfg):
    tmp = sg.config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, sg.config_path)
    sg.config = cfg


def reload_and_wait(sg, ok=True, timeout=10):
    mark = sg.mark()
    sg.send_signal(signal.SIGHUP)
    sg.wait_for_log(r"reload done" if ok else r"reload failed", timeout=timeout, since=mark)
    time.sleep(0.3)  # the workers pick the new generation up
    return mark


class SessionContext:
    """Looks like an SSLContext to H2Client, and offers |session|."""

    def __init__(self, ctx, session):
        self.ctx, self.session = ctx, session

    def wrap_socket(self, raw, server_hostname=None):
        try:
            return self.ctx.wrap_socket(raw, server_hostname=server_hostname,
                                        session=self.session)
        except BaseException:
            raw.close()
            raise


def tls_version(v):
    return {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[v]


def client_ctx(cert=None, key=None, version=None):
    v = tls_version(version) if version else None
    return H.client_ssl_context(cert=cert, key=key, min_version=v, max_version=v)


def h2_call(port, ctx, tag, session=None, path="Config", extra=()):
    """One gRPC call on a fresh TLS connection. Returns (response or None,
    error text or None, the SSLSocket's session, session_reused, peer
    certificate DER)."""
    sctx = SessionContext(ctx, session)
    try:
        c = H.H2Client(port, ssl_context=sctx, timeout=8)
    except (ssl.SSLError, OSError, AssertionError) as e:
        return None, "%s: %s" % (type(e).__name__, e), None, None, None
    try:
        reused = c.sock.session_reused
        der = c.sock.getpeercert(binary_form=True)
        try:
            r = c.request(SERVICE + path, body=H.grpc_frame(tag.encode()),
                          extra=[("x-test-case", tag)] + list(extra), timeout=8)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            return None, "%s: %s" % (type(e).__name__, e), None, reused, der
        if r.connection_closed and r.status is None:
            return None, "connection closed: %r" % r, None, reused, der
        # A TLS 1.3 ticket comes after the handshake: read it before asking.
        return r, None, c.sock.session, reused, der
    finally:
        c.close()


def grpc_status(r):
    if r is None:
        return None
    v = r.trailer("grpc-status") or r.header("grpc-status")
    return int(v) if v is not None else None


# ---------------------------------------------------------------------------
# Session resumption

class _ResumptionCase(H.SparkgateTestCase):
    """A fresh sparkgate per test (tests reload it), one worker so that every
    connection sees the same contexts, and a private CA ("rev CA")."""

    def setUp(self):
        super().setUp()
        self.dir = H.tempdir("sg-rev-tls-")
        self.ca = Ca(self.dir, "rev-ca", "review CA")
        self.other = Ca(self.dir, "rev-other", "review other CA")
        self.alice = self.ca.issue("alice", cn="alice")
        self.mallory = self.other.issue("mallory", cn="mallory")
        self.crl_file = self.ca.crl("rev-ca.crl")
        self.up = self.standin()

    def listener(self, name, mode="required", client_ca=None, crl=True, **auth):
        a = {"methods": ["mtls"], "client_identity": "cn"}
        a.update(auth)
        extra = {"client_certificates": mode}
        if mode != "none":
            extra["client_ca"] = client_ca or self.ca.cert_file
        if crl and mode != "none":
            extra["crl"] = [self.crl_file]
        return H.tls_listener(name, auth=a, **extra)

    def start(self, listeners):
        cfg = H.base_config(self.up.port, listeners=listeners, workers=1)
        self.sg = self.start_sparkgate(cfg)
        return self.sg

    def call_ok(self, port, ctx, tag, session=None):
        r, err, sess, reused, _ = h2_call(port, ctx, tag, session)
        self.assertIsNone(err, err)
        self.assertEqual((r.status, grpc_status(r)), (200, 0), r)
        rec = self.up.wait_for_call(None, timeout=5, where=lambda c: c.header("x-test-case") == tag)
        return rec, sess, reused

    def assert_no_entry(self, port, ctx, tag, session, why):
        """The resumption attempt must not get a call through, and must not
        have resumed."""
        r, err, _, reused, _ = h2_call(port, ctx, tag, session)
        time.sleep(0.3)
        reached = [c for c in self.up.calls() if c.header("x-test-case") == tag]
        self.assertFalse(reached, "%s: a call reached the backend (resumed=%r, status "
                         "%r, identity %r)" % (why, reused, grpc_status(r),
                                               reached and reached[0].header("x-sparkgate-identity")))
        self.assertNotEqual(reused, True, "%s: the old TLS session was resumed" % why)
        return r, err


class ResumptionAcrossReloadTest(_ResumptionCase):
    """security.md: a reload builds new contexts (new ticket keys, an empty
    session cache), so an old session cannot bring back a certificate the
    new configuration refuses."""

    def _session(self, port, version):
        ctx = client_ctx(self.alice[0], self.alice[1], version)
        rec, sess, reused = self.call_ok(port, ctx, "first-" + version)
        self.assertEqual(rec.header("x-sparkgate-identity"), "alice")
        self.assertFalse(reused)
        # Control: the session does resume before the reload, and the
        # resumed connection is still alice (from the original certificate).
        rec, sess2, reused = self.call_ok(port, ctx, "resumed-" + version, sess)
        self.assertTrue(reused, "control: no resumption at all (%s)" % version)
        self.assertEqual(rec.header("x-sparkgate-identity"), "alice")
        self.assertEqual(rec.header("x-sparkgate-auth-method"), "mtls")
        return ctx, sess2 or sess

    def test_crl_added_by_reload_stops_resumption(self):
        sg = self.start([self.listener("m")])
        port = sg.port("m")
        sessions = {v: self._session(port, v) for v in ("1.2", "1.3")}
        self.ca.revoke(self.alice[2])
        self.ca.crl("rev-ca.crl")  # same path, new content
        mark = reload_and_wait(sg)
        for v, (ctx, sess) in sessions.items():
            self.assert_no_entry(port, ctx, "after-crl-" + v, sess, "TLS %s, revoked" % v)
        sg.wait_for_log(r"TLS handshake failed: .*certificate revoked", timeout=5, since=mark)

    def test_client_ca_changed_by_reload_stops_resumption(self):
        sg = self.start([self.listener("m")])
        port = sg.port("m")
        sessions = {v: self._session(port, v) for v in ("1.2", "1.3")}
        cfg = json.loads(json.dumps(sg.config))
        cfg["listeners"][0]["tls"]["client_ca"] = self.other.cert_file
        del cfg["listeners"][0]["tls"]["crl"]
        rewrite_config(sg, cfg)
        reload_and_wait(sg)
        for v, (ctx, sess) in sessions.items():
            self.assert_no_entry(port, ctx, "after-ca-" + v, sess, "TLS %s, CA removed" % v)

    def test_optional_to_required_by_reload_stops_certless_resumption(self):
        # Made without a certificate on "optional" (a token-less, cert-less
        # caller is denied, but the TLS session exists); after the reload
        # makes certificates required, the old session must not stand in
        # for one.
        sg = self.start([self.listener("m", mode="optional")])
        port = sg.port("m")
        for v in ("1.2", "1.3"):
            ctx = client_ctx(version=v)
            r, err, sess, reused, _ = h2_call(port, ctx, "nocert-" + v)
            self.assertIsNone(err, err)
            self.assertEqual(grpc_status(r), 16, r)
            r, err, sess2, reused, _ = h2_call(port, ctx, "nocert-again-" + v, sess)
            self.assertTrue(reused, "control: no resumption (%s)" % v)
            setattr(self, "sess" + v, (ctx, sess2 or sess))
        cfg = json.loads(json.dumps(sg.config))
        cfg["listeners"][0]["tls"]["client_certificates"] = "required"
        rewrite_config(sg, cfg)
        reload_and_wait(sg)
        for v in ("1.2", "1.3"):
            ctx, sess = getattr(self, "sess" + v)
            self.assert_no_entry(port, ctx, "after-req-" + v, sess,
                                 "TLS %s, now required" % v)

    def test_server_certificate_swapped_by_reload(self):
        sg = self.start([self.listener("m")])
        port = sg.port("m")
        ctx, sess = self._session(port, "1.3")
        _, _, _, _, der_before = h2_call(port, ctx, "der-before")
        # A new server certificate and key, from a CA of its own: a client
        # that trusts only that CA tells which certificate it was shown.
        srv_ca = Ca(self.dir, "srv-ca", "review server CA")
        new_cert, new_key, _ = srv_ca.issue(
            "server2", cn="localhost", eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
            sans=[x509.DNSName("localhost")])
        cfg = json.loads(json.dumps(sg.config))
        cfg["listeners"][0]["tls"]["cert"] = new_cert
        cfg["listeners"][0]["tls"]["key"] = new_key
        rewrite_config(sg, cfg)
        reload_and_wait(sg)
        ctx2 = H.client_ssl_context(root=srv_ca.cert_file, cert=self.alice[0], key=self.alice[1])
        r, err, _, reused, der_after = h2_call(port, ctx2, "der-after")
        self.assertIsNone(err, err)
        self.assertEqual(grpc_status(r), 0, r)
        with open(new_cert, "rb") as f:
            want = x509.load_pem_x509_certificate(f.read()).public_bytes(
                serialization.Encoding.DER)
        self.assertEqual(der_after, want)
        self.assertNotEqual(der_before, der_after)
        # The old CA's clients no longer trust the proxy: their handshake
        # fails on their side (nothing was resumed with the old key).
        r, err, _, reused, _ = h2_call(port, ctx, "old-trust", sess)
        self.assertIsNotNone(err)


class ResumptionAcrossListenersTest(_ResumptionCase):
    """security.md: "a session made on one listener never resumes on
    another (whose client-certificate rules may differ)"."""

    def test_session_from_loose_listener_not_resumed_on_strict_one(self):
        loose_ca = bundle(self.dir, "loose-ca.pem", self.ca.cert_file, self.other.cert_file)
        sg = self.start([
            self.listener("loose", mode="optional", client_ca=loose_ca, crl=False),
            self.listener("strict", mode="required"),
        ])
        for v in ("1.2", "1.3"):
            ctx = client_ctx(self.mallory[0], self.mallory[1], v)
            rec, sess, reused = self.call_ok(sg.port("loose"), ctx, "loose-" + v)
            self.assertEqual(rec.header("x-sparkgate-identity"), "mallory")
            _, sess2, reused = self.call_ok(sg.port("loose"), ctx, "loose-again-" + v, sess)
            self.assertTrue(reused, "control: no resumption (%s)" % v)
            self.assert_no_entry(sg.port("strict"), ctx, "strict-" + v, sess2 or sess,
                                 "TLS %s, session of listener loose on strict" % v)


# ---------------------------------------------------------------------------
# Client certificates the test PKI does not have

def probe(port, cert=None, key=None, version=None, timeout=5.0):
    """Handshake, preface, first frame: (got_server_settings, error)."""
    ctx = client_ctx(cert, key, version)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return False, "%s: %s" % (type(e).__name__, e)
    try:
        s.sendall(PREFACE)
        s.settimeout(timeout)
        data = b""
        while len(data) < 9:
            chunk = s.recv(9 - len(data))
            if not chunk:
                return False, "EOF"
            data += chunk
        return data[3] == 0x4, None
    except (ssl.SSLError, OSError) as e:
        return False, "%s: %s" % (type(e).__name__, e)
    finally:
        s.close()


class ClientCertificateTest(H.SparkgateTestCase):
    """One sparkgate, a private root CA and an intermediate under it."""

    @classmethod
    def setUpClass(cls):
        d = cls.dir = H.tempdir("sg-rev-certs-")
        cls.root = Ca(d, "root", "review root CA")
        cls.inter = Ca(d, "inter", "review issuing CA", issuer=cls.root, path_len=0)
        cls.inter_crl = cls.inter.crl("inter.crl")
        cls.root_crl = cls.root.crl("root.crl")
        now = _now()
        c = cls.certs = {}
        c["good"] = cls.root.issue("good", cn="good-client")
        c["server_eku"] = cls.root.issue("server-eku", cn="server-eku",
                                         eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
        c["future"] = cls.root.issue("future", cn="future-client",
                                     not_before=now + datetime.timedelta(days=2),
                                     not_after=now + datetime.timedelta(days=30))
        c["leaf_only"] = cls.inter.issue("leaf-only", cn="leaf-only")
        c["leaf_chain"] = cls.inter.issue("leaf-chain", cn="leaf-chain", with_chain=True)
        # x-forwarded-client-cert is promised "whenever the connection
        # presented a verified client certificate": one with a SPIFFE ID
        # and many (valid, long) DNS names.
        long_dns = [x509.DNSName("%s-%02d.%s.example.org" % ("h" * 60, i, "d" * 60))
                    for i in range(40)]
        c["many_sans"] = cls.root.issue(
            "many-sans", cn="many-sans",
            sans=[x509.UniformResourceIdentifier("spiffe://example.org/ns/a/sa/many")] + long_dns)
        cls.up = H.start_standin()

        def lst(name, identity="cn", crl=None, mode="required"):
            tls = {"client_certificates": mode, "client_ca": cls.root.cert_file}
            if crl:
                tls["crl"] = crl
            return H.tls_listener(name, auth={"methods": ["mtls"], "client_identity": identity},
                                  **tls)

        listeners = [
            lst("cn"),
            lst("uri", identity="uri_san"),
            # Revocation with a two-level PKI: a CRL for every CA of the
            # chain, and the root's alone (the intermediate's missing).
            lst("int-crl-both", crl=[cls.inter_crl, cls.root_crl]),
            lst("root-crl", crl=[cls.root_crl]),
        ]
        cfg = H.base_config(cls.up.port, listeners=listeners, workers=1)
        cls.sg = H.Sparkgate(cfg).start()

    @classmethod
    def tearDownClass(cls):
        rc = cls.sg.stop()
        H.stop_standin(cls.up)
        if rc != 0:
            raise AssertionError("sparkgate exited %s; log:\n%s" % (rc, cls.sg.log_text()))

    def setUp(self):
        super().setUp()
        self._started.append(self.sg)
        self.up.clear()

    def cert(self, who):
        f, k, _ = self.certs[who]
        return f, k

    def call(self, listener, who, tag):
        f, k = self.cert(who)
        r, err, _, _, _ = h2_call(self.sg.port(listener), client_ctx(f, k), tag)
        return r, err

    def assert_refused(self, listener, who, why):
        f, k = self.cert(who)
        mark = self.sg.mark()
        for v in ("1.2", "1.3"):
            ok, err = probe(self.sg.port(listener), f, k, v)
            self.assertFalse(ok, (listener, who, v, "handshake and SETTINGS went through"))
        self.sg.wait_for_log(r"TLS handshake failed: .*client certificate refused: %s" % why,
                             timeout=5, since=mark)
        tag = "refused-%s-%s" % (listener, who)
        r, err = self.call(listener, who, tag)
        self.assertIsNone(grpc_status(r), r)
        self.assertEqual([c for c in self.up.calls() if c.header("x-test-case") == tag], [])

    def assert_identity(self, listener, who, identity):
        tag = "ok-%s-%s" % (listener, who)
        r, err = self.call(listener, who, tag)
        self.assertIsNone(err, (listener, who, err))
        self.assertEqual(grpc_status(r), 0, (listener, who, r))
        rec = self.up.wait_for_call(None, timeout=5, where=lambda c: c.header("x-test-case") == tag)
        self.assertEqual(rec.header("x-sparkgate-identity"), identity, rec.metadata)
        return rec

    def test_server_auth_only_eku_refused(self):
        self.assert_refused("cn", "server_eku", "unsuitable certificate purpose")

    def test_not_yet_valid_refused(self):
        self.assert_refused("cn", "future", "certificate is not yet valid")

    def test_intermediate_not_sent_refused_sent_accepted(self):
        self.assert_refused("cn", "leaf_only", "unable to get local issuer certificate")
        self.assert_identity("cn", "leaf_chain", "leaf-chain")

    def test_every_ca_of_the_chain_needs_its_crl(self):
        """configuration.md, tls.crl: "Every CA of a client's chain needs its
        CRL here": with all of them the client is in; an intermediate
        without one refuses its clients at the handshake, with the reason
        logged; a client_ca without one fails the load, naming it (it
        refused every client without a word at start)."""
        self.assert_identity("int-crl-both", "leaf_chain", "leaf-chain")
        self.assert_refused("root-crl", "leaf_chain", "unable to get certificate CRL")
        cfg = H.base_config(self.up.port, listeners=[H.tls_listener(
            "int-crl", auth={"methods": ["mtls"]}, client_certificates="required",
            client_ca=self.root.cert_file, crl=[self.inter_crl])])
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 1, out + err)
        self.assertIn("review root CA", err)
        self.assertIn("has no CRL in tls.crl", err)

    def test_xfcc_present_for_every_verified_certificate(self):
        rec = self.assert_identity("uri", "many_sans", "spiffe://example.org/ns/a/sa/many")
        xfcc = [v for k, v in rec.metadata if k == "x-forwarded-client-cert"]
        self.assertEqual(len(xfcc), 1, "security.md: x-forwarded-client-cert is added "
                         "whenever the connection presented a verified client certificate; "
                         "the backend got identity %r and no x-forwarded-client-cert"
                         % rec.header("x-sparkgate-identity"))



# ---------------------------------------------------------------------------
# CRLs that would refuse every client

def crl_file(ca, fname, last_update, next_update, signer=None):
    """A CRL naming |ca| as its issuer, signed by |signer| (default |ca|)."""
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(ca.subject).last_update(last_update).next_update(next_update)
           .sign((signer or ca).key, hashes.SHA256()))
    return ca._write(fname, crl.public_bytes(serialization.Encoding.PEM))


def mtls_config(up_port, ca, crl):
    return H.base_config(up_port, listeners=[H.tls_listener(
        "m", auth={"methods": ["mtls"], "client_identity": "cn"},
        client_certificates="required", client_ca=ca.cert_file, crl=[crl])], workers=1)


class CrlUsabilityTest(H.SparkgateTestCase):
    """A CRL that would make the listener refuse every client is said at
    load: one outside its dates is warned about, one not signed by the CA
    it names fails the load."""

    def setUp(self):
        super().setUp()
        self.dir = H.tempdir("sg-rev-crl-")
        self.ca = Ca(self.dir, "root", "review crl CA")
        self.good = self.ca.issue("good", cn="good-client")
        self.up = self.standin()

    def handshake_refusal(self, sg):
        """What a good client certificate gets now: None when the call
        works, else the handshake refusal the log gives."""
        mark = sg.mark()
        r, err, _, _, _ = h2_call(sg.port("m"), client_ctx(self.good[0], self.good[1]),
                                    "crl-probe")
        if grpc_status(r) == 0:
            return None
        m = sg.wait_for_log(r"client certificate refused: (.*)$", timeout=5, since=mark)
        return m.group(1)

    def test_expired_crl_is_reported_at_load(self):
        """A CRL whose nextUpdate has passed makes OpenSSL refuse every
        client certificate of the listener ("CRL has expired"): sparkgate
        says so when it loads the file, naming it and the date, as it does
        for a listener certificate outside its dates."""
        now = _now()
        crl = crl_file(self.ca, "stale.crl", now - datetime.timedelta(days=40),
                       now - datetime.timedelta(days=10))
        cfg = mtls_config(self.up.port, self.ca, crl)
        rc, out, err = H.check_config(cfg)
        if rc != 0:   # refusing the file is a fine answer too
            self.assertIn("stale.crl", err)
            self.assertRegex(err, r"(?i)expired|next ?update")
            return
        sg = self.start_sparkgate(cfg)
        # The listener is unusable for every client with this CRL:
        self.assertEqual(self.handshake_refusal(sg), "CRL has expired")
        said = [l for l in sg.lines if "stale.crl" in l and
                re.search(r"(?i)expired|next ?update", l)]
        self.assertTrue(said, "an expired CRL (every client of listener m is refused) "
                        "loaded without a word; check-config said:\n%s%s" % (out, err))
        self.assertIn("review crl CA", said[0], "the warning does not name the CA")

    def test_crl_not_signed_by_its_ca_fails_the_load(self):
        """configuration.md, tls.crl: every CA of client_ca needs its CRL,
        "a CA of client_ca without one fails the load". A CRL that names
        the CA but is signed by another key (an old CA key, a CA re-keyed
        under the same name) is no CRL of that CA: OpenSSL refuses every
        client at the handshake ("CRL signature failure"). The load should
        fail naming the file, as for a missing CRL."""
        now = _now()
        imposter = Ca(self.dir, "imposter", "review crl CA")   # same name, other key
        crl = crl_file(self.ca, "foreign.crl", now - datetime.timedelta(minutes=5),
                       now + datetime.timedelta(days=30), signer=imposter)
        cfg = mtls_config(self.up.port, self.ca, crl)
        rc, out, err = H.check_config(cfg)
        if rc == 0:
            sg = self.start_sparkgate(cfg)
            why = self.handshake_refusal(sg)
            self.fail("a CRL not signed by the client CA it names loaded (check-config rc 0); "
                      "every client is then refused at the handshake: %r" % why)
        self.assertIn("foreign.crl", err)


def rollover():
    """client_ca holds two CAs named "rollover CA" (old key, new key)."""
    d = H.tempdir("sg-rev-rollover-")
    old = Ca(d, "old", "rollover CA")
    new = Ca(d, "new", "rollover CA")
    bundle = os.path.join(d, "bundle.pem")
    with open(bundle, "wb") as out:
        for ca in (old, new):
            with open(ca.cert_file, "rb") as f:
                out.write(f.read())
    return d, old, new, bundle


def rollover_config(up_port, bundle, crls):
    return H.base_config(up_port, listeners=[H.tls_listener(
        "m", auth={"methods": ["mtls"], "client_identity": "cn"},
        client_certificates="required", client_ca=bundle, crl=crls)], workers=1)


def crl_with_akid(ca, fname, akid):
    """A CRL of |ca| (signed by its key) carrying |akid|."""
    now = _now()
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(ca.subject)
           .last_update(now - datetime.timedelta(minutes=5))
           .next_update(now + datetime.timedelta(days=30))
           .add_extension(akid, critical=False)
           .sign(ca.key, hashes.SHA256()))
    return ca._write(fname, crl.public_bytes(serialization.Encoding.PEM))


def issuer_serial_akid(ca):
    """authorityKeyIdentifier by the CA certificate's issuer and serial only
    (no keyIdentifier), as `authorityKeyIdentifier=issuer:always` makes it."""
    return x509.AuthorityKeyIdentifier(
        key_identifier=None,
        authority_cert_issuer=[x509.DirectoryName(ca.cert.issuer)],
        authority_cert_serial_number=ca.cert.serial_number)


class SameNameClientCasTest(H.SparkgateTestCase):
    """A CA re-keyed under the same name, both keys trusted during the
    roll-over: each needs a CRL of its own that OpenSSL will pick for it."""

    def refusals(self, sg, cas):
        """For each CA, what a client certificate it issued gets: None when
        the call works, else the handshake refusal the log gives."""
        out = {}
        for name, ca in cas:
            cert, key, _ = ca.issue("client-" + name, cn="client-" + name)
            mark = sg.mark()
            r, err, _, _, _ = h2_call(sg.port("m"), client_ctx(cert, key), "probe-" + name)
            if grpc_status(r) == 0:
                out[name] = None
            else:
                m = sg.wait_for_log(r"client certificate refused: (.*)$", timeout=5,
                                    since=mark)
                out[name] = m.group(1)
        return out

    def test_ca_whose_only_crl_is_its_namesakes_fails_the_load(self):
        """configuration.md, tls.crl: "a CA of client_ca without one fails
        the load, as does a CRL that names a CA of client_ca but is not
        signed by its key (a CA re-keyed under the same name)". During a
        CA roll-over client_ca holds the old and the new CA (same name,
        other keys); tls.crl lists only the new key's CRL. That CRL names
        the old CA too and is not signed by its key: every client under the
        old CA is refused at the handshake ("CRL signature failure"). The
        load must fail, naming the CA without a CRL of its own."""
        d, old, new, bundle = rollover()
        now = _now()
        crl = crl_file(new, "new.crl", now - datetime.timedelta(minutes=5),
                       now + datetime.timedelta(days=30))
        up = self.standin()
        cfg = rollover_config(up.port, bundle, [crl])
        rc, out, err = H.check_config(cfg)
        if rc == 0:
            sg = self.start_sparkgate(cfg)
            got = self.refusals(sg, [("old", old), ("new", new)])
            self.fail("client_ca has two CAs named 'rollover CA' and tls.crl only the new "
                      "key's CRL: check-config rc 0, and clients get %r" % got)
        self.assertIn("rollover CA", err)

    def test_same_named_cas_each_with_its_crl_all_clients_served(self):
        """Both CAs of the roll-over have their own CRL, each signed by its
        own key, in one CRL file (CRLs without an authorityKeyIdentifier,
        as `openssl ca -gencrl` makes them unless crl_extensions is set).
        OpenSSL picks the CRL for a certificate by issuer name (and
        authorityKeyIdentifier when the CRL has one): both CRLs score the
        same, one is used for both CAs, and every client of the other CA
        is refused ("CRL signature failure"). Either both CAs' clients are
        served, or the load fails saying why (CRLs of CAs sharing a
        name need an authorityKeyIdentifier)."""
        d, old, new, bundle = rollover()
        now = _now()
        lu, nu = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30)
        paths = [crl_file(new, "new.crl", lu, nu), crl_file(old, "old.crl", lu, nu)]
        both = os.path.join(d, "both.crl")
        with open(both, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    out.write(f.read())
        up = self.standin()
        cfg = rollover_config(up.port, bundle, [both])
        rc, out, err = H.check_config(cfg)
        if rc != 0:
            self.assertRegex(err, r"both\.crl|rollover CA")
            return
        sg = self.start_sparkgate(cfg)
        got = self.refusals(sg, [("old", old), ("new", new)])
        self.assertEqual(got, {"old": None, "new": None},
                         "two CAs named 'rollover CA', each with its own CRL in tls.crl: "
                         "the configuration loaded, and clients were refused: %r" % got)

    def test_crls_told_apart_by_akid_issuer_and_serial_load(self):
        """A CA roll-over (two client CAs named "rollover CA", other keys),
        each with its own CRL whose authorityKeyIdentifier names the CA
        certificate by issuer and serial number (no keyIdentifier).
        OpenSSL tells the two CRLs apart by it (X509_check_akid compares
        the serial), so every client of both CAs is served, and this loaded
        before 195f03f. configuration.md asks CRLs of CAs sharing a name
        for "an authorityKeyIdentifier": these have one. The load must
        succeed and both CAs' clients be served."""
        d, old, new, bundle = rollover()
        crls = [crl_with_akid(old, "old-is.crl", issuer_serial_akid(old)),
                crl_with_akid(new, "new-is.crl", issuer_serial_akid(new))]
        up = self.standin()
        cfg = rollover_config(up.port, bundle, crls)
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, "CRLs told apart by authorityKeyIdentifier issuer+serial "
                         "(which OpenSSL uses) fail the load: %s" % (err or out))
        sg = self.start_sparkgate(cfg)
        got = self.refusals(sg, [("old", old), ("new", new)])
        self.assertEqual(got, {"old": None, "new": None})

    def test_ca_whose_crl_names_another_certificate_of_its_key_fails_the_load(self):
        """A client CA certificate renewed with the same key and name (a new
        serial), and its CRL's authorityKeyIdentifier names the previous
        certificate: keyIdentifier (same key: matches) plus issuer and
        serial (the old certificate's: does not match), as `openssl ca`
        writes with `authorityKeyIdentifier=keyid:always,issuer:always`.
        OpenSSL's X509_check_akid refuses that CRL for the renewed CA
        (serial mismatch): every client is refused at the handshake with
        "unable to get certificate CRL". configuration.md: "a CA of
        client_ca without one fails the load". The load must fail naming
        the CA (or, if it loads, clients must be served)."""
        d = H.tempdir("sg-rev-renewed-")
        ca = Ca(d, "ca", "renewed CA")
        skid = ca.cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest
        crl = crl_with_akid(ca, "renewed.crl", x509.AuthorityKeyIdentifier(
            key_identifier=skid,
            authority_cert_issuer=[x509.DirectoryName(ca.cert.issuer)],
            authority_cert_serial_number=ca.cert.serial_number ^ 1))
        up = self.standin()
        cfg = mtls_config(up.port, ca, crl)
        rc, out, err = H.check_config(cfg)
        if rc == 0:
            sg = self.start_sparkgate(cfg)
            cert, key, _ = ca.issue("client", cn="client")
            r, _, _, _, _ = h2_call(sg.port("m"), client_ctx(cert, key), "renewed")
            if grpc_status(r) == 0:
                return
            m = sg.wait_for_log(r"client certificate refused: (.*)$", timeout=5)
            self.fail("the only CRL of client CA 'renewed CA' names another certificate in "
                      "its authorityKeyIdentifier (OpenSSL never uses it): the load "
                      "succeeded and every client is refused: %r" % m.group(1))
        self.assertIn("renewed CA", err)


# ---------------------------------------------------------------------------
# Backend TLS: what the client gets and what the log says

class BackendTlsLogTest(H.SparkgateTestCase):
    """Every backend TLS failure is 14 to the client (the backend is
    failing, not the caller) and the log says why, in words an operator can
    act on."""

    @classmethod
    def setUpClass(cls):
        d = cls.dir = H.tempdir("sg-rev-up-")
        cls.ca = Ca(d, "up-ca", "review backend CA")
        srv = (ExtendedKeyUsageOID.SERVER_AUTH,)
        cls.dns_only = cls.ca.issue("dns-only", cn="localhost", eku=srv,
                                    sans=[x509.DNSName("localhost")])

    def proxy(self, up, tls, address="127.0.0.1"):
        cfg = H.base_config(up.port, backend_address=address, backend_tls=tls, workers=1)
        cfg["upstream"] = {"connect_timeout_ms": 5000}
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        return sg, ch

    def assert_unavailable_logged(self, up, sg, ch, why):
        import grpc
        mark = sg.mark()
        r = H.call_unary(ch, "Config", b"x", timeout=30)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        self.assertEqual(up.calls(), [])
        sg.wait_for_log(r"TLS handshake failed: .*%s" % why, timeout=10, since=mark)

    def test_ip_address_not_in_certificate_is_refused(self):
        # Numeric address, no sni: the certificate names only DNS:localhost,
        # so it does not name 127.0.0.1.
        up = self.standin(tls=True, cert=self.dns_only[0], key=self.dns_only[1])
        sg, ch = self.proxy(up, {"ca": self.ca.cert_file})
        self.assert_unavailable_logged(up, sg, ch, "IP address mismatch")

    def test_wrong_name_is_refused_and_logged(self):
        up = self.standin(tls=True, cert=self.dns_only[0], key=self.dns_only[1])
        sg, ch = self.proxy(up, {"ca": self.ca.cert_file, "sni": "spark.other.example"})
        self.assert_unavailable_logged(up, sg, ch, "[Hh]ostname mismatch")


class RevokedCertificateOnOpenConnectionTest(_ResumptionCase):
    """security.md trusts the client CA "for the certificates it issues,
    until revoked by a CRL", and says the CRL files are "reloaded on
    SIGHUP"; a listener's auth applies to calls on open connections after
    a reload ("calls"). A certificate revoked (new CRL + SIGHUP) stops
    authenticating new calls on a connection opened before (it kept doing so
    for as long as the client kept the connection: gRPC clients hold one
    for hours): the reload logs it, the connection drains, and a call on it
    is refused unprocessed (REFUSED_STREAM)."""

    def test_revoked_certificate_stops_authenticating_new_calls(self):
        sg = self.start([self.listener("m")])
        port = sg.port("m")
        ctx = client_ctx(self.alice[0], self.alice[1])
        with H.H2Client(port, ssl_context=ctx, timeout=8) as c:
            r = c.request(SERVICE + "Config", body=H.grpc_frame(b"x"),
                          extra=[("x-test-case", "open-before")])
            self.assertEqual(grpc_status(r), 0, r)
            self.ca.revoke(self.alice[2])
            self.ca.crl("rev-ca.crl")
            mark = sg.mark()
            reload_and_wait(sg)
            sg.wait_for_log(r"client certificate no longer verifies under the reloaded "
                            r"configuration \(certificate revoked\)", timeout=5, since=mark)
            # Control: a new connection with the revoked certificate fails.
            ok, err = probe(port, self.alice[0], self.alice[1])
            self.assertFalse(ok, "control: the revoked certificate still handshakes")
            try:
                r = c.request(SERVICE + "Config", body=H.grpc_frame(b"x"),
                              extra=[("x-test-case", "open-after")])
            except Exception:  # noqa: BLE001 - refused, or the connection went away
                r = None
        reached = [x for x in self.up.calls() if x.header("x-test-case") == "open-after"]
        self.assertFalse(reached, "a call authenticated by a certificate revoked (CRL + "
                         "SIGHUP) before it started reached the backend as %r; grpc-status %r"
                         % (reached and reached[0].header("x-sparkgate-identity"),
                            grpc_status(r)))


class ExpiredCertificateResumptionTest(_ResumptionCase):
    """A client certificate that expires after its session was made: a new
    handshake refuses it ("expired ... fail the handshake"), and the
    session ticket (valid for hours) must not let it in either."""

    def test_session_of_a_since_expired_certificate_not_resumed(self):
        now = _now()
        short = self.ca.issue("short", cn="short-lived", not_after=now + datetime.timedelta(seconds=4))
        sg = self.start([self.listener("m", crl=False)])
        port = sg.port("m")
        sessions = {}
        for v in ("1.2", "1.3"):
            ctx = client_ctx(short[0], short[1], v)
            rec, sess, _ = self.call_ok(port, ctx, "short-" + v)
            self.assertEqual(rec.header("x-sparkgate-identity"), "short-lived")
            sessions[v] = (ctx, sess)
        expiry = short[2].not_valid_after.replace(tzinfo=datetime.timezone.utc)
        H.wait_until(lambda: _now() > expiry + datetime.timedelta(seconds=1), 10,
                     interval=0.2, what="the client certificate expired")
        ok, err = probe(port, short[0], short[1])
        self.assertFalse(ok, "control: the expired certificate still handshakes")
        failures = []
        for v, (ctx, sess) in sessions.items():
            try:
                self.assert_no_entry(port, ctx, "short-resumed-" + v, sess,
                                     "TLS %s, certificate expired since the session was made" % v)
            except AssertionError as e:
                failures.append(str(e))
        if failures:
            self.fail("\n".join(failures))


# ---------------------------------------------------------------------------
# A certificate revoked by a reload while a connection was still in its
# TLS handshake.

class HandshakeHookContext:
    """Looks like an SSLContext to H2Client: runs |before()| once the TCP
    connection is there (accepted by sparkgate) and before the handshake."""

    def __init__(self, ctx, before):
        self.ctx, self.before = ctx, before

    def wrap_socket(self, raw, server_hostname=None):
        try:
            self.before()
            return self.ctx.wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise



class RevokedDuringHandshakeTest(_ResumptionCase):
    """configuration.md, listeners[].tls "connections": "A reload applies
    it to new connections, and verifies the client certificates of open
    ones again under the new client_ca and crl". A connection accepted
    before the reload that finishes its TLS handshake after it (a client
    may take up to tls_handshake_timeout_ms) was verified under the
    accept-time CRL: it is checked again under the new one, and a revoked
    certificate authenticates nothing."""

    def test_certificate_revoked_while_handshaking_is_refused(self):
        sg = self.start([self.listener("m")])
        port = sg.port("m")
        # Control: alice works before the revocation.
        ok, err = probe(port, self.alice[0], self.alice[1])
        self.assertTrue(ok, err)

        def revoke_and_reload():
            time.sleep(0.2)  # sparkgate accepts the TCP connection
            self.ca.revoke(self.alice[2])
            self.ca.crl("rev-ca.crl")
            reload_and_wait(sg)

        ctx = HandshakeHookContext(client_ctx(self.alice[0], self.alice[1]),
                                 revoke_and_reload)
        # Control: a connection made after the reload is refused.
        r = err = None
        try:
            with H.H2Client(port, ssl_context=ctx, timeout=8) as c:
                ok2, err2 = probe(port, self.alice[0], self.alice[1])
                self.assertFalse(ok2, "control: the revoked certificate still handshakes")
                r = c.request(SERVICE + "Config", body=H.grpc_frame(b"x"),
                              extra=[("x-test-case", "mid-handshake")])
        except (ssl.SSLError, OSError, TimeoutError, AssertionError) as e:
            err = "%s: %s" % (type(e).__name__, e)
        time.sleep(0.3)
        reached = [x for x in self.up.calls() if x.header("x-test-case") == "mid-handshake"]
        self.assertFalse(reached, "a call authenticated by a client certificate revoked by "
                         "a reload (new CRL + SIGHUP) reached the backend as %r "
                         "(grpc-status %r, error %r)"
                         % (reached and reached[0].header("x-sparkgate-identity"),
                            grpc_status(r), err))


# ---------------------------------------------------------------------------
# Refusals of a client certificate say why, and count as
# certificate_verify_failed (operations.md), never as `protocol`, the bucket
# of clients that do not speak TLS.

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def tls_failures(port):
    from test_operations import http_get, parse_prometheus, series
    status, _, body = http_get(port, "/metrics")
    assert status == 200, body
    s = parse_prometheus(body.decode("utf-8"))
    return {dict(k).get("reason"): v
            for k, v in series(s, "sparkgate_tls_handshake_failures_total").items()}


def client_cert_with_names(directory, names):
    """A client certificate of the test CA with these DNS SANs."""
    p = H.pki()
    with open(p.ca_cert, "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(p.ca_key, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    k = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.UniformResourceIdentifier("spiffe://example.org/ns/a/sa/big")]
    sans += [x509.DNSName(n) for n in names]
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")]))
            .issuer_name(ca.subject).public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return H.write_cert_and_key(directory, "big-%d" % len(names), cert, k)


class ClientCertificateRefusalTest(H.SparkgateTestCase):
    """A "required" listener refuses a client that sends no certificate,
    logging that the listener requires one (OpenSSL's own words were "peer
    did not return a certificate"). A certificate over 32 KiB is refused
    while it is verified, logged with the limit: OpenSSL cannot put a
    session that large into a session ticket, and failed the handshake
    with an "internal error" counted as `protocol`. One within 32 KiB whose
    x-forwarded-client-cert element would pass 64 KiB (thousands of names
    that need quoting) is still refused with the line security.md quotes.
    All three count as certificate_verify_failed."""

    def start(self):
        p = H.pki()
        st = self.standin()
        lst = H.tls_listener("public", client_certificates="required",
                             client_ca=p.ca_cert, auth={"methods": ["mtls"]})
        self.sg = self.start_sparkgate(H.base_config(
            st.port, workers=1, listeners=[lst],
            admin={"address": "127.0.0.1", "port": 0}))
        from test_operations import admin_port
        self.admin = admin_port(self.sg)

    def attempt(self, expect_line, **ctx_kw):
        """One handshake and a preface; returns what the server sent back
        after the handshake (nothing, when it refused the client)."""
        before = tls_failures(self.admin)
        mark = self.sg.mark()
        ctx = H.client_ssl_context(**ctx_kw)
        raw = socket.create_connection(("127.0.0.1", self.sg.port("public")), timeout=5)
        got = b""
        try:
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(PREFACE)  # TLS 1.3: the verdict comes after the client's finish
            got = s.recv(100)
        except (ssl.SSLError, OSError):
            pass
        finally:
            raw.close()
        self.assertEqual(got, b"", "the refused client was served")
        self.sg.wait_for_log(expect_line, timeout=5, since=mark)
        H.wait_until(lambda: sum(tls_failures(self.admin).values()) > sum(before.values()),
                     5, what="a handshake failure counted")
        after = tls_failures(self.admin)
        moved = {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)}
        self.assertEqual(moved, {"certificate_verify_failed": 1.0}, moved)

    def test_no_certificate_on_a_required_listener(self):
        self.start()
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            self.attempt(r"TLS handshake failed: listener public requires a client "
                         r"certificate and the client sent none", max_version=version)

    def test_certificate_over_32_kib(self):
        self.start()
        d = H.tempdir("sg-bigcert-")
        cert, key = client_cert_with_names(d, ["h%05d.%s" % (i, "d" * 28) for i in range(1900)])
        self.attempt(r"TLS handshake failed: certificate verify failed: client certificate "
                     r"refused: it is over 32768 bytes",
                     cert=cert, key=key)

    def test_certificate_whose_xfcc_would_pass_64_kib(self):
        self.start()
        d = H.tempdir("sg-bigxfcc-")
        # '"' is quoted and escaped in the element: 3 bytes of DER, 9 of header.
        cert, key = client_cert_with_names(d, ['"'] * 8000)
        with open(cert, "rb") as f:
            der = x509.load_pem_x509_certificate(f.read()).public_bytes(
                serialization.Encoding.DER)
        self.assertLess(len(der), 32768)
        self.attempt(r"rejected: the client certificate's x-forwarded-client-cert would "
                     r"exceed 65536 bytes", cert=cert, key=key)


SPIFFE_SMALL = "spiffe://example.org/ns/review/sa/small"


class LargeClientCaTest(H.SparkgateTestCase):
    """The 32 KiB limit is the client's own certificate's: a session
    ticket holds that certificate, never its chain. A small client
    certificate issued by a trusted client CA of more than 32 KiB (here a
    CA scoped by name constraints to 1,300 team domains) authenticates as
    any other; the check once ran over the whole verified chain and
    refused every client of such a CA."""

    def test_small_client_certificate_of_a_large_ca_authenticates(self):
        d = H.tempdir("sg-bigca-")
        # Name constraints for 1,300 team domains: about 39 KiB of DER.
        permitted = [x509.DNSName("team-%04d.corp.example.com" % i) for i in range(1300)]
        permitted.append(x509.UniformResourceIdentifier("example.org"))
        ca = Ca(d, "constrained-ca", "constrained CA", extensions=[
            (x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), True)])
        cert, key, leaf = ca.issue("small-client", cn="small",
                                   sans=[x509.UniformResourceIdentifier(SPIFFE_SMALL)])
        ca_file = ca.cert_file
        ca_der = ca.cert.public_bytes(serialization.Encoding.DER)
        leaf_der = leaf.public_bytes(serialization.Encoding.DER)
        self.assertGreater(len(ca_der), 32768)
        self.assertLess(len(leaf_der), 2048)
        up = self.standin()
        lst = H.tls_listener("public", client_certificates="required", client_ca=ca_file,
                             auth={"methods": ["mtls"]})
        sg = self.start_sparkgate(H.base_config(up.port, workers=1, listeners=[lst]))
        ch = H.tls_channel(sg.port("public"), client_cert=cert, client_key=key)
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "AnalyzePlan", b"x", [("x-test-case", "big-ca")], timeout=5)
        self.assertEqual(r.code, grpc.StatusCode.OK,
                         "a %d-byte client certificate of a %d-byte client CA was refused: "
                         "%r" % (len(leaf_der), len(ca_der), r))
        calls = [c for c in up.calls() if c.header("x-test-case") == "big-ca"]
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].header("x-sparkgate-identity"), SPIFFE_SMALL)


if __name__ == "__main__":
    H.main()
