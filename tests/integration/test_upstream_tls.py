#!/usr/bin/python3
"""Backends over TLS: sparkgate verifies the backend's certificate against
tenants[].backends[].tls.ca and the expected name (sni, else the address),
and any failure to do so is UNAVAILABLE (14) to the client, with the
backend never seeing the call."""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
from test_backend_faults import unary  # noqa: E402
from threaded_server import ResettingServer  # noqa: E402
import grpc  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.exceptions  # noqa: E402
from raw_backend import RawBackend  # noqa: E402


class TlsRawBackend(RawBackend):
    """RawBackend behind TLS (python ssl), recording the SNI of each
    handshake."""

    def __init__(self, plan, cert, key):
        self.snis = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["h2"])
        ctx.sni_callback = lambda sslobj, name, c: self.snis.append(name)
        self.ctx = ctx
        super().__init__(plan)

    def _serve(self, sock, index, behaviour):
        sock.settimeout(5)
        try:
            tls = self.ctx.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError):
            sock.close()
            return
        return super()._serve(tls, index, behaviour)


class ResetInHandshakeBackend(ResettingServer):
    """Accepts, reads the ClientHello, resets the connection (RST): a TLS
    backend (or a balancer in front of one) that drops the handshake."""


def encrypted_copy(key):
    """|key| encrypted with a passphrase, in a new file named *-enc.key."""
    out = os.path.join(H.tempdir(), os.path.basename(key).replace(".key", "-enc.key"))
    subprocess.run(["openssl", "pkey", "-in", key, "-out", out, "-aes256",
                    "-passout", "pass:secret"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


class StdinPipeSparkgate(H.Sparkgate):
    """A sparkgate whose stdin is a pipe kept open (a supervisor's, docker
    -i): OpenSSL's default passphrase prompt would read it for ever. Its
    own session, so no terminal either."""

    def spawn(self):
        self.proc = subprocess.Popen(
            H._argv(["-c", self.config_path] + self.args), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=H._child_env(self.env),
            start_new_session=True)
        with H._lock:
            H._live_procs.add(self.proc)
        for stream, sink in ((self.proc.stderr, self.lines),
                             (self.proc.stdout, self.stdout_lines)):
            t = threading.Thread(target=self._read, args=(stream, sink, H.VERBOSE),
                                 daemon=True)
            t.start()
            self._readers.append(t)
        return self


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


    def test_sni_with_trailing_dot_matches_the_certificate(self):
        """A host name with a trailing dot is the same (absolute) name, and
        "sni" defaults to the address: the certificate for "localhost"
        verifies against "localhost.", and the SNI goes without the dot
        (RFC 6066 3)."""
        p = H.pki()
        b = TlsRawBackend(["ok"], p.server_cert, p.server_key)
        self.addCleanup(b.close)
        sg, ch = self.proxy(b, {"ca": p.ca_cert, "sni": "localhost."})
        r = H.call_unary(ch, "Config", b"dot", timeout=15)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual(b.snis, ["localhost"])


class UpstreamTlsDiagnosticsTest(H.SparkgateTestCase):
    """What the log says when TLS to a backend (or a key) cannot work."""

    def proxy(self, port, tls, connect_timeout_ms=3000):
        cfg = H.base_config(port, backend_tls=tls, workers=1)
        cfg["upstream"] = {"connect_timeout_ms": connect_timeout_ms}
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        return sg, ch

    def down_reason(self, sg):
        return sg.wait_for_log(r"backend spark-1 of tenant default is down: (.*); retrying",
                               timeout=5).group(1)

    def test_encrypted_client_key_fails_the_load_without_prompting(self):
        """An encrypted backend "key" cannot be used (there is no passphrase
        setting): the start fails at once naming the file, and never waits
        on OpenSSL's passphrase prompt, even with stdin open."""
        p = H.pki()
        enc = encrypted_copy(p.client_cn_key)
        cfg = H.base_config(1234, backend_tls={"ca": p.ca_cert, "cert": p.client_cn_cert,
                                               "key": enc})
        sg = StdinPipeSparkgate(cfg)
        self.addCleanup(sg.stop, check=False)
        with self.assertRaisesRegex(AssertionError, "exited") as cm:
            sg.start(timeout=5)
        self.assertIn("client-cn-enc.key' is encrypted", str(cm.exception))
        self.assertNotIn("pass phrase", str(cm.exception))

    def test_encrypted_listener_key_fails_a_reload_without_prompting(self):
        """A reload to an encrypted listener key fails (naming the file)
        and keeps the configuration in force: the main loop never waits on
        a passphrase prompt, so signals and calls go on."""
        p = H.pki()
        up = self.standin()
        cfg = H.base_config(up.port, workers=1)
        sg = StdinPipeSparkgate(cfg)
        self.addCleanup(sg.stop, check=False)
        sg.start()
        cfg["listeners"][0]["tls"]["key"] = encrypted_copy(p.server_key)
        with open(sg.config_path, "w") as f:
            json.dump(cfg, f)
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"server-enc\.key' is encrypted", timeout=5, since=mark)
        sg.wait_for_log(r"reload failed", timeout=5, since=mark)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"still here", timeout=10)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)

    def test_expired_client_certificate_is_reported_at_load(self):
        """A backend client certificate ("cert") outside its dates loads
        with a warning naming the file and the date (refusing it would stop
        every tenant on a restart), and a handshake that then fails says
        that our certificate has expired."""
        p = H.pki()
        up = self.standin(tls=True, client_ca=p.ca_cert)
        sg, ch = self.proxy(up.port, {"ca": p.ca_cert, "sni": "localhost",
                                      "cert": p.client_expired_cert,
                                      "key": p.client_expired_key})
        sg.wait_for_log(r"warn.*client certificate '.*client-expired\.pem' expired on "
                        r"2021-01-01", timeout=3)
        r = H.call_unary(ch, "Config", b"x", timeout=15)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        self.assertRegex(self.down_reason(sg), r"our client certificate expired on 2021-01-01")

    def test_backend_resetting_during_handshake_is_logged_with_a_cause(self):
        """A backend that resets the connection in the middle of the TLS
        handshake: 14, and the log says the connection was reset (not
        libevent's SSL_ERROR_SYSCALL code as an OpenSSL error)."""
        b = ResetInHandshakeBackend()
        self.addCleanup(b.close)
        sg, ch = self.proxy(b.port, {"ca": H.pki().ca_cert, "sni": "localhost"})
        r = H.call_unary(ch, "Config", b"x", timeout=15)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        reason = self.down_reason(sg)
        self.assertNotRegex(reason, r"lib\(0\)|reason\(\d+\)")
        self.assertRegex(reason, r"(?i)reset")

    def test_tls_handshake_timeout_is_not_called_a_connect_timeout(self):
        """A backend that accepts TCP and never answers the ClientHello is
        cut at connect_timeout_ms, and the log names the TLS handshake,
        not the connect."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        self.addCleanup(s.close)
        sg, ch = self.proxy(s.getsockname()[1], {"ca": H.pki().ca_cert, "sni": "localhost"},
                            connect_timeout_ms=1000)
        r = H.call_unary(ch, "Config", b"x", timeout=15)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        reason = self.down_reason(sg)
        self.assertRegex(reason, r"TLS handshake")
        self.assertNotIn("connect timed out", reason)


# ---------------------------------------------------------------------------
# What the log says when an established TLS backend connection breaks

class RecordPerFrameTlsBackend(RawBackend):
    """An h2 backend behind TLS (python ssl over memory BIOs) that puts
    every frame in a TLS record of its own and sends what each step made
    in one TCP send: its SETTINGS with the session tickets that follow the
    handshake, and each answer's HEADERS, DATA and trailers together. Every
    call is echoed with grpc-status 0 (RawBackend's accept loop, its own
    serving)."""

    def __init__(self):
        p = H.pki()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(p.server_cert, p.server_key)
        self.ctx.set_alpn_protocols(["h2"])
        self.answered = 0
        super().__init__(["ok"])

    def _serve(self, sock, index, behaviour):
        try:
            self._serve_tls(sock)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            sock.close()

    def _recv(self, conn, inc):
        while not self.closed.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return False
            inc.write(data)
            return True
        return False

    def _serve_tls(self, conn):
        conn.settimeout(0.2)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(inc, out, server_side=True)
        if not H.bio_handshake(tls, out, conn.sendall, lambda: self._recv(conn, inc)):
            return
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        tls.write(h2c.data_to_send())
        conn.sendall(out.read())  # the tickets and the SETTINGS, in one send
        bodies = {}
        while self._recv(conn, inc):
            plain, closed = H.bio_read_all(tls)
            if closed:
                return
            for ev in h2c.receive_data(plain):
                if isinstance(ev, h2.events.RequestReceived):
                    bodies[ev.stream_id] = b""
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                    h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    sid = ev.stream_id
                    tls.write(h2c.data_to_send())
                    h2c.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                    tls.write(h2c.data_to_send())
                    h2c.send_data(sid, bodies.pop(sid, b""))
                    tls.write(h2c.data_to_send())
                    h2c.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                    with self.lock:
                        self.answered += 1
            pending = h2c.data_to_send()
            if pending:
                tls.write(pending)
            if out.pending:
                conn.sendall(out.read())


class RecordsReadTogetherFromATlsBackendTest(H.SparkgateTestCase):
    def test_records_arriving_together_from_a_tls_backend_are_all_read(self):
        """A TLS backend reads ahead several records per read(): a backend
        whose SETTINGS come with its session tickets, and whose answers
        come as three records in one TCP send, has every call answered,
        none left waiting in the TLS layer for bytes that will not come."""
        be = RecordPerFrameTlsBackend()
        self.addCleanup(be.close)
        p = H.pki()
        cfg = H.base_config(be.port, workers=1, backend_tls={"ca": p.ca_cert, "sni": "localhost"})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        for i in range(20):
            payload = b"call %d " % i + bytes(range(200))
            r = H.call_unary(ch, "Config", payload, timeout=10)
            self.assertEqual(r.code, grpc.StatusCode.OK, (i, r))
            self.assertIn(payload, r.response, i)  # the request message, echoed
        self.assertEqual(be.answered, 20)


class TlsConnectionBreaksMidCall(H.SparkgateTestCase):
    def test_established_tls_connection_closing_is_not_called_a_handshake_failure(self):
        """A TLS backend whose handshake went through, and that carried the
        call (it was read by the backend), closes the connection without
        an answer (a server process going away: GOAWAY, then close, with
        no TLS close_notify). The call gets 14, and the warn line
        "closed with 1 streams: <reason>" (also the access log's reason)
        must say what happened: the backend closed (or reset) the
        connection, not "TLS handshake failed: ... unexpected eof while
        reading", which sent the operator to certificates and TLS settings
        for a backend restart."""
        p = H.pki()
        be = TlsRawBackend(["goaway_processed", "ok"], p.server_cert, p.server_key)
        self.addCleanup(be.close)
        cfg = H.base_config(be.port, workers=1, backend_tls={"ca": p.ca_cert})
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        r = unary(ch, "AnalyzePlan", b"x", timeout=10)
        self.assertEqual(r.code.value[0], 14, r)
        self.assertEqual(len(be.snapshot()[0]), 1, "the backend did not get the call")
        m = sg.wait_for_log(r"conn=\d+: closed with 1 streams: (.*)", timeout=5)
        self.assertNotRegex(m.group(1), re.compile("handshake", re.I),
                            "an established TLS connection's close is logged as a "
                            "handshake failure: %s" % m.group(0))


if __name__ == "__main__":
    H.main()
