#!/usr/bin/python3
"""The core proxy, end to end: a gRPC client over TLS (test CA) -> sparkgate
-> the stand-in Spark Connect server over h2c.

Covers every method kind, large transfers byte for byte, status and trailer
passthrough (including trailers-only at the frame level), cancellation
reaching the upstream, the proxy's own replies (upstream down, path outside
the allowed prefixes, non-POST, non-gRPC content type), TLS front-end policy
(ALPN h2 only, no TLS 1.1), graceful SIGTERM with a stream in flight,
100 concurrent streams on one connection, and the h2c insecure listener.
"""

import base64
import concurrent.futures
import hashlib
import json
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import spark_proto  # noqa: E402
import grpc  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402

SERVICE = H.SERVICE
MIB = H.MIB
UNARY_METHODS = ["AnalyzePlan", "Config", "ArtifactStatus", "Interrupt",
                 "ReleaseExecute", "ReleaseSession", "FetchErrorDetails"]


def b64_any(text):
    """Decodes a -bin header value as it appears on the wire (padding optional)."""
    return base64.b64decode(text + "=" * (-len(text) % 4))


class ProxyTest(H.SparkgateTestCase):
    """One stand-in, one sparkgate with a TLS listener, per test."""

    def setUp(self):
        super().setUp()
        self.up = self.standin()
        self.sg = self.start_sparkgate(H.base_config(self.up.port))
        self.port = self.sg.port("public")
        self.ch = H.tls_channel(self.port)
        self.addCleanup(self.ch.close)

    # -- every method kind ---------------------------------------------------
    def test_unary_methods_echo(self):
        rng = random.Random(1)
        for name in UNARY_METHODS:
            payload = name.encode() + rng.randbytes(1000 + len(name))
            r = H.call_unary(self.ch, name, payload)
            self.assertEqual(r.code, grpc.StatusCode.OK, (name, r))
            self.assertEqual(r.response, payload, name)
            rec = self.up.wait_for_call(SERVICE + name, timeout=5)
            self.assertEqual(rec.messages, 1, rec)
            self.assertEqual(rec.sha256, hashlib.sha256(payload).hexdigest(), rec)

    def test_unary_empty_and_larger_than_windows(self):
        r = H.call_unary(self.ch, "Config", b"")
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, b""), r)
        # 8 MiB each way: many times the default stream and connection
        # windows, so flow-control credit must be handed back on both legs.
        big = random.Random(2).randbytes(8 * MIB)
        r = H.call_unary(self.ch, "AnalyzePlan", big, timeout=60)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual(hashlib.sha256(r.response).hexdigest(),
                         hashlib.sha256(big).hexdigest())

    def test_server_streaming(self):
        for name in ("ExecutePlan", "ReattachExecute"):
            req = b"plan for " + name.encode()
            r = H.call_server_stream(self.ch, name, req, H.standin_md(count=5))
            self.assertEqual(r.code, grpc.StatusCode.OK, r)
            self.assertEqual(r.responses, [i.to_bytes(4, "big") + req for i in range(5)])
            rec = self.up.wait_for_call(SERVICE + name, timeout=5)
            self.assertEqual((rec.kind, rec.messages, rec.bytes), ("server", 1, len(req)))

    def test_client_streaming_add_artifacts(self):
        rng = random.Random(3)
        chunks = [rng.randbytes(n) for n in (0, 1, 100, 70000, 5, 300000, 17)]
        r = H.call_client_stream(self.ch, "AddArtifacts", chunks)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        got = json.loads(r.response)
        self.assertEqual(got, {"messages": len(chunks), "bytes": sum(map(len, chunks)),
                               "sha256": hashlib.sha256(b"".join(chunks)).hexdigest()})

    def test_bidi_is_full_duplex(self):
        # Ping-pong: each reply must arrive while the request stream is still
        # open, so the proxy may buffer neither direction until end of stream.
        q = queue.Queue()

        def requests():
            while True:
                item = q.get(timeout=20)
                if item is None:
                    return
                yield item

        it = self.ch.stream_stream(H.BIDI_PATH)(requests(), timeout=30)
        try:
            for i in range(10):
                msg = b"ping %d " % i + os.urandom(64 + i * 1000)
                q.put(msg)
                self.assertEqual(next(it), msg)
            q.put(None)
            self.assertEqual(list(it), [])
            self.assertEqual(it.code(), grpc.StatusCode.OK)
        finally:
            q.put(None)
            it.cancel()
        rec = self.up.wait_for_call(H.BIDI_PATH, timeout=5)
        self.assertEqual((rec.kind, rec.messages), ("bidi", 10))

    # -- large transfers -----------------------------------------------------
    def test_256mib_server_stream_byte_exact(self):
        total, chunk, seed = 256 * MIB, MIB - 3, 42
        h = hashlib.sha256()
        count = [0, 0]

        def sink(msg):
            h.update(msg)
            count[0] += 1
            count[1] += len(msg)

        r = H.call_server_stream(self.ch, "ExecutePlan", b"big",
                                 H.standin_md("stream", bytes=total, chunk=chunk, seed=seed),
                                 timeout=150, sink=sink)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual(count[1], total)
        self.assertEqual(count[0], (total + chunk - 1) // chunk)
        want = H.stream_sha256(seed, total, chunk)
        self.assertEqual(h.hexdigest(), want)
        self.assertEqual(r.trailer("x-standin-sha256"), want)

    def test_64mib_client_stream_byte_exact(self):
        data = random.Random(4).randbytes(64 * MIB)
        chunk = 1 << 20
        parts = (data[i:i + chunk] for i in range(0, len(data), chunk))
        r = H.call_client_stream(self.ch, "AddArtifacts", parts, timeout=120)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        want = hashlib.sha256(data).hexdigest()
        self.assertEqual(json.loads(r.response),
                         {"messages": 64, "bytes": 64 * MIB, "sha256": want})
        self.assertEqual(r.trailer("x-standin-received-sha256"), want)

    # -- status and trailers -------------------------------------------------
    def test_status_codes_and_messages_pass_through(self):
        for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                     grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            msg = "upstream says %s" % code.name
            r = H.call_unary(self.ch, "AnalyzePlan", b"x",
                             H.standin_md("fail", code=code.value[0], message=msg))
            self.assertEqual((r.code, r.details), (code, msg), r)

    def test_binary_trailers_and_encoded_message_pass_through(self):
        details = bytes(range(256)) * 3
        trace = b"\x00\x01trace\xff\xfe"
        message = "Fehler: 100% ünïcödé\nzweite Zeile ✓"
        md = H.standin_md("fail", code=9, message_bin=message.encode(),
                          details_bin=details) + [("x-trace-bin", trace)]
        r = H.call_unary(self.ch, "AnalyzePlan", b"x", md)
        self.assertEqual(r.code, grpc.StatusCode.FAILED_PRECONDITION, r)
        self.assertEqual(r.details, message)
        self.assertEqual(r.trailer("grpc-status-details-bin"), details)
        self.assertEqual(r.trailer("x-trace-bin"), trace)

        # The same after response messages, on a stream.
        r = H.call_server_stream(self.ch, "ExecutePlan", b"y",
                                 md + H.standin_md(count=3))
        self.assertEqual(r.code, grpc.StatusCode.FAILED_PRECONDITION, r)
        self.assertEqual(r.responses, [b"standin 0", b"standin 1", b"standin 2"])
        self.assertEqual(r.details, message)
        self.assertEqual(r.trailer("grpc-status-details-bin"), details)
        self.assertEqual(r.trailer("x-trace-bin"), trace)

        # And on the wire, the trailer block arrives as the upstream wrote it.
        with H.H2Client(self.port) as c:
            resp = c.request(SERVICE + "AnalyzePlan", body=H.grpc_frame(b"z"), extra=[
                ("x-standin-mode", "fail"), ("x-standin-code", "9"),
                ("x-standin-message", "plain 100%"),
                ("x-standin-details-bin", base64.b64encode(details).decode())])
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.trailer("grpc-status"), "9", resp)
        self.assertEqual(resp.trailer("grpc-message"), "plain 100%25", resp)
        self.assertEqual(b64_any(resp.trailer("grpc-status-details-bin")), details)

    def test_trailers_only_passthrough_is_one_headers_frame(self):
        details = b"\x08\x07\x12\x05denied"
        extra = [("x-standin-mode", "trailers-only"), ("x-standin-code", "7"),
                 ("x-standin-message", "denied by spark"),
                 ("x-standin-details-bin", base64.b64encode(details).decode())]
        # Frame level: the stand-in (gRPC core) answers with a single HEADERS
        # frame carrying END_STREAM; the proxy must not turn it into
        # HEADERS + trailers or add DATA.
        with H.H2Client(self.port) as c:
            resp = c.request(SERVICE + "ExecutePlan", body=H.grpc_frame(b"q"), extra=extra)
        self.assertTrue(resp.trailers_only, resp)
        self.assertEqual(resp.status, 200, resp)
        self.assertTrue(resp.header("content-type", "").startswith("application/grpc"), resp)
        self.assertEqual(resp.header("grpc-status"), "7", resp)
        self.assertEqual(resp.header("grpc-message"), "denied by spark", resp)
        self.assertEqual(b64_any(resp.header("grpc-status-details-bin")), details)
        # And through a gRPC client.
        r = H.call_unary(self.ch, "AnalyzePlan", b"q", H.standin_md(
            "trailers-only", code=7, message="denied by spark", details_bin=details))
        self.assertEqual((r.code, r.details), (grpc.StatusCode.PERMISSION_DENIED,
                                               "denied by spark"), r)
        self.assertEqual(r.trailer("grpc-status-details-bin"), details)

    # -- cancellation --------------------------------------------------------
    def test_client_cancel_reaches_upstream(self):
        it = self.ch.unary_stream(SERVICE + "ExecutePlan", request_serializer=H.spark_request)(
            b"long query", metadata=H.standin_md("stall", count=1), timeout=30)
        try:
            self.assertEqual(next(it), b"standin 0")  # the call is live end to end
            rec = self.up.wait_for_call(SERVICE + "ExecutePlan", timeout=5)
            self.assertFalse(rec.cancelled)
        finally:
            it.cancel()
        self.up.wait_for(lambda _: rec.cancelled, timeout=10)
        self.assertTrue(rec.cancelled, rec)
        # The proxy is fine afterwards.
        r = H.call_unary(self.ch, "Config", b"after cancel")
        self.assertEqual(r.response, b"after cancel", r)

    def test_client_cancel_during_upload_reaches_upstream(self):
        q = queue.Queue()

        def requests():
            while True:
                item = q.get(timeout=20)
                if item is None:
                    return
                yield item

        fut = self.ch.stream_unary(SERVICE + "AddArtifacts", request_serializer=H.spark_request).future(requests(), timeout=30)
        q.put(b"a" * 1000)
        rec = self.up.wait_for_call(SERVICE + "AddArtifacts", timeout=10,
                                    where=lambda r: r.messages >= 1)
        fut.cancel()
        q.put(None)
        self.up.wait_for(lambda _: rec.cancelled, timeout=10)
        self.assertFalse(rec.request_done, rec)

    # -- the proxy's own answers ---------------------------------------------
    def test_path_outside_prefix_is_unimplemented(self):
        for path in ("/other.Service/Method", "/spark.connect.SparkConnectServiceX/ExecutePlan",
                     "/grpc.health.v1.Health/Check", "/"):
            r = H.call_unary(self.ch, path, b"x")
            self.assertEqual(r.code, grpc.StatusCode.UNIMPLEMENTED, (path, r))
        # The upstream never heard of them.
        r = H.call_unary(self.ch, "Config", b"marker")
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        self.assertEqual([c.method for c in self.up.calls()], [SERVICE + "Config"])

    def test_path_outside_prefix_is_trailers_only(self):
        with H.H2Client(self.port) as c:
            resp = c.request("/other.Service/Method", body=H.grpc_frame(b"x"))
        self.assertTrue(resp.trailers_only, resp)
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.header("content-type", "").startswith("application/grpc"), resp)
        self.assertEqual(resp.header("grpc-status"), "12", resp)

    def test_non_post_is_405(self):
        with H.H2Client(self.port) as c:
            for method in ("GET", "PUT"):
                resp = c.request(SERVICE + "Config", method=method,
                                 body=b"" if method == "GET" else H.grpc_frame(b"x"))
                self.assertEqual(resp.status, 405, (method, resp))
        self.assertEqual(self.up.calls(), [])

    def test_non_grpc_content_type_is_415(self):
        with H.H2Client(self.port) as c:
            for ctype in ("text/plain", "application/json", "application/grpc-web", None):
                resp = c.request(SERVICE + "Config", content_type=ctype,
                                 body=H.grpc_frame(b"x"))
                self.assertEqual(resp.status, 415, (ctype, resp))
            self.assertEqual(self.up.calls(), [])
            # application/grpc+proto is gRPC.
            resp = c.request(SERVICE + "Config", content_type="application/grpc+proto",
                             body=H.grpc_frame(b"proto"))
            self.assertEqual(resp.status, 200, resp)
            self.assertEqual(H.grpc_unframe(resp.data), [b"proto"], resp)
            self.assertEqual(resp.trailer("grpc-status"), "0", resp)

    # -- TLS front end -------------------------------------------------------
    def test_alpn_h2_only(self):
        ok = H.tls_probe(self.port, alpn=("h2",))
        self.assertTrue(ok.ok and ok.alpn == "h2" and ok.h2_settings_received, ok)
        for alpn in (("http/1.1",), ("spdy/3", "http/1.0")):
            p = H.tls_probe(self.port, alpn=alpn)
            # Refused: the handshake fails (no_application_protocol), or at
            # least no h2 is negotiated and no HTTP/2 is spoken.
            self.assertFalse(p.ok and (p.alpn == "h2" or p.h2_settings_received), (alpn, p))
        # openssl s_client agrees.
        out = subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % self.port,
             "-servername", "localhost", "-alpn", "http/1.1", "-CAfile", H.pki().ca_cert],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=20).stdout.decode(errors="replace")
        self.assertNotIn("ALPN protocol: h2", out)

    def test_tls11_client_refused(self):
        # Control: this client really can speak TLS 1.1 (to a Python server
        # that allows it), so a failure below is sparkgate refusing.
        tls11 = dict(min_version=ssl.TLSVersion.TLSv1_1,
                     max_version=ssl.TLSVersion.TLSv1_1, seclevel0=True)
        ctrl_port, stop = _legacy_tls_server()
        try:
            ctrl = H.tls_probe(ctrl_port, alpn=None, try_h2=False, **tls11)
        finally:
            stop()
        self.assertTrue(ctrl.ok and ctrl.version == "TLSv1.1", ctrl)
        p = H.tls_probe(self.port, try_h2=False, **tls11)
        self.assertFalse(p.ok, p)

    def _s_client(self, args, stdin=b""):
        return subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % self.port,
             "-servername", "localhost", "-alpn", "h2", "-CAfile", H.pki().ca_cert] + args,
            input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=20).stdout.decode(errors="replace")

    def test_tls12_renegotiation_refused(self):
        # "R" on s_client's stdin asks for a renegotiation: the proxy
        # answers with a no_renegotiation alert, and keeps serving.
        # "R" goes only once the proxy's SETTINGS frame has been read (it
        # follows the handshake), so that the answer to the new ClientHello
        # is the only record in flight.
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % self.port,
             "-servername", "localhost", "-alpn", "h2", "-CAfile", H.pki().ca_cert,
             "-tls1_2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        got = bytearray()

        def read_all():
            for _ in range(1 << 20):  # bounded: s_client's output is a few KiB
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    return
                got.extend(chunk)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        try:
            # SETTINGS: a 9-byte frame header of type 4 on stream 0, after
            # the session summary's last "---".
            H.wait_until(lambda: b"\x04\x00\x00\x00\x00\x00" in bytes(got).rsplit(b"---", 1)[-1],
                         10, what="the proxy's SETTINGS frame")
            proc.stdin.write(b"R\n")
            proc.stdin.close()
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()
        out = bytes(got).decode(errors="replace")
        self.assertIn("RENEGOTIATING", out)
        self.assertIn("no renegotiation", out)
        r = H.call_unary(self.ch, "Config", b"after renegotiation", timeout=15)
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, b"after renegotiation"), r)

    def test_session_resumption(self):
        # TLS 1.2 (session cache) and TLS 1.3 (ticket): a second connection
        # resumes the first one's session and still negotiates h2.
        d = H.tempdir("sg-resume-")
        for version in ("-tls1_2", "-tls1_3"):
            sess = os.path.join(d, "session" + version)
            # Kept open until the session is saved: a TLS 1.3 ticket comes
            # after the handshake, and s_client quits at stdin's end.
            proc = subprocess.Popen(
                ["openssl", "s_client", "-connect", "127.0.0.1:%d" % self.port,
                 "-servername", "localhost", "-alpn", "h2", "-CAfile", H.pki().ca_cert,
                 version, "-sess_out", sess],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                H.wait_until(lambda: os.path.exists(sess) and os.path.getsize(sess) > 0,
                             10, what="s_client saved the session")
            finally:
                first = proc.communicate(b"", timeout=20)[0].decode(errors="replace")
            self.assertRegex(first, r"New, TLSv1\.[23]", first)
            again = self._s_client([version, "-sess_in", sess])
            self.assertRegex(again, r"Reused, TLSv1\.[23]", again)
            self.assertIn("ALPN protocol: h2", again)

    def test_tls12_accepted(self):
        p = H.tls_probe(self.port, min_version=ssl.TLSVersion.TLSv1_2,
                        max_version=ssl.TLSVersion.TLSv1_2)
        self.assertTrue(p.ok and p.version == "TLSv1.2" and p.alpn == "h2", p)

    # -- many streams ----------------------------------------------------------
    def test_100_concurrent_streams_one_connection(self):
        H.wait_channel_ready(self.ch)
        rng = random.Random(5)
        payloads = [b"%03d:" % i + rng.randbytes(rng.randrange(1, 40000)) for i in range(100)]
        md = H.standin_md(count=4, interval_ms=50)
        gate = threading.Barrier(100, timeout=20)

        def one(i):
            gate.wait()
            return H.call_server_stream(self.ch, "ExecutePlan", payloads[i], md, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
            results = list(pool.map(one, range(100)))
        for i, r in enumerate(results):
            self.assertEqual(r.code, grpc.StatusCode.OK, (i, r))
            self.assertEqual(r.responses, [k.to_bytes(4, "big") + payloads[i] for k in range(4)],
                             "stream %d got someone else's bytes" % i)
        self.assertEqual(H.established_connections_to(self.port), 1)
        self.assertEqual(len(self.up.calls(SERVICE + "ExecutePlan")), 100)
        self.assertGreater(self.up.max_in_flight, 1)

    # -- the upstream going away mid-call ----------------------------------------
    def test_upstream_abort_mid_stream_ends_the_call(self):
        r = H.call_server_stream(self.ch, "ExecutePlan", b"x",
                                 H.standin_md("reset", count=2), timeout=20)
        self.assertNotEqual(r.code, grpc.StatusCode.OK, r)
        self.assertNotEqual(r.code, grpc.StatusCode.DEADLINE_EXCEEDED, r)
        self.assertEqual(r.responses, [b"standin 0", b"standin 1"])
        # sparkgate survives and reconnects.
        r = H.call_unary(self.ch, "Config", b"still here")
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, b"still here"), r)


def _legacy_tls_server():
    """A TLS 1.0-1.1 capable Python server on port 0 (for control checks)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(H.pki().server_cert, H.pki().server_key)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    ls.settimeout(10)

    def serve():
        try:
            c, _ = ls.accept()
            c.settimeout(10)
            try:
                ctx.wrap_socket(c, server_side=True).close()
            except (ssl.SSLError, OSError):
                c.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def stop():
        ls.close()
        t.join(10)

    return ls.getsockname()[1], stop


class UpstreamDownTest(H.SparkgateTestCase):
    def test_backend_not_listening_is_unavailable_naming_it(self):
        port = H.free_port()
        cfg = H.base_config(port)
        cfg["tenants"][0]["backends"][0]["name"] = "spark-down"
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        for call in (lambda: H.call_unary(ch, "AnalyzePlan", b"x", timeout=30),
                     lambda: H.call_server_stream(ch, "ExecutePlan", b"x", timeout=30)):
            r = call()
            self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
            self.assertTrue("spark-down" in r.details or "127.0.0.1:%d" % port in r.details,
                            "message does not name the upstream: %r" % r.details)


class ShutdownTest(H.SparkgateTestCase):
    def test_sigterm_lets_inflight_stream_finish_then_exits_0(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port))
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        total, chunk, seed = 20 * 65536, 65536, 9
        md = H.standin_md("stream", bytes=total, chunk=chunk, seed=seed, interval_ms=100)
        it = ch.unary_stream(SERVICE + "ExecutePlan", request_serializer=H.spark_request)(b"q", metadata=md, timeout=60)
        h = hashlib.sha256()
        first = next(it)
        h.update(first)
        sg.send_signal(signal.SIGTERM)
        n = len(first)
        try:
            for msg in it:
                h.update(msg)
                n += len(msg)
        except grpc.RpcError as e:
            self.fail("in-flight stream broken by SIGTERM: %s %s" % (e.code(), e.details()))
        self.assertEqual(it.code(), grpc.StatusCode.OK)
        self.assertEqual(n, total)
        self.assertEqual(h.hexdigest(), H.stream_sha256(seed, total, chunk))
        rc = sg.wait(20)
        self.assertEqual(rc, 0, sg.log_text())

    def test_sigterm_idle_exits_0(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port))
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        self.assertEqual(H.call_unary(ch, "Config", b"x").code, grpc.StatusCode.OK)
        self.assertEqual(sg.stop(), 0, sg.log_text())
        self.assertFalse(H.port_is_open(sg.port("public")))


class TlsRecordsReadTogetherTest(H.SparkgateTestCase):
    """A TLS listener reads several records per read(): records that arrive
    together must all be served at once, none left waiting in the TLS
    layer for bytes that will not come."""

    def setUp(self):
        super().setUp()
        self.up = self.standin()
        self.sg = self.start_sparkgate(H.base_config(self.up.port, workers=1))
        self.port = self.sg.port("public")

    def connect(self):
        """A handshake done except for sending the client's last flight,
        which is left in the returned outgoing buffer."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(sock.close)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = H.client_ssl_context().wrap_bio(inc, out, server_hostname="localhost")

        def receive():
            data = sock.recv(65536)
            inc.write(data)
            return bool(data)

        self.assertTrue(H.bio_handshake(tls, out, sock.sendall, receive),
                        "TLS handshake did not finish")
        self.assertEqual(tls.selected_alpn_protocol(), "h2")
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        tls.write(conn.data_to_send())
        return sock, inc, out, tls, conn

    def queue_calls(self, tls, conn, n, tag):
        """Each frame of |n| Config calls written as a TLS record of its
        own; returns {stream id: payload}."""
        calls = {}
        for i in range(n):
            sid = conn.get_next_available_stream_id()
            payload = b"%s-%d-" % (tag, i) + bytes(range(64))
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"),
                                    (":path", SERVICE + "Config"),
                                    (":authority", "localhost:%d" % self.port),
                                    ("content-type", "application/grpc"), ("te", "trailers")])
            tls.write(conn.data_to_send())
            conn.send_data(sid, H.grpc_frame(payload), end_stream=True)
            tls.write(conn.data_to_send())
            calls[sid] = payload
        return calls

    def serve(self, sock, inc, out, tls, conn, calls):
        """Reads until every call in |calls| has ended; returns, per stream,
        (response data, trailers)."""
        data, trailers, ended = {}, {}, set()
        sock.settimeout(10)
        for _ in range(1000):
            if ended >= set(calls):
                break
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                self.fail("calls %s not answered within 10 s (answered: %s): records "
                          "left unread in the proxy's TLS buffer" %
                          (sorted(set(calls) - ended), sorted(ended)))
            self.assertTrue(chunk, "the server closed the connection")
            inc.write(chunk)
            plain, _ = H.bio_read_all(tls)
            for ev in conn.receive_data(plain):
                sid = getattr(ev, "stream_id", None)
                if isinstance(ev, h2.events.DataReceived):
                    data[sid] = data.get(sid, b"") + ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers[sid] = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended.add(sid)
                elif isinstance(ev, h2.events.StreamReset):
                    self.fail("stream %d reset: %r" % (sid, ev))
            pending = conn.data_to_send()
            if pending:
                tls.write(pending)
            if out.pending:
                sock.sendall(out.read())
        self.assertEqual(ended, set(calls))
        return data, trailers

    def check(self, calls, data, trailers):
        for sid, payload in calls.items():
            self.assertEqual(trailers.get(sid, {}).get("grpc-status"), "0", (sid, trailers.get(sid)))
            self.assertIn(payload, data.get(sid, b""), sid)

    def test_calls_sent_with_the_last_handshake_message_are_answered(self):
        """The client's Finished, the HTTP/2 preface and the frames of five
        calls, each in a record of its own, in one TCP send: every call is
        answered without the client sending anything more."""
        sock, inc, out, tls, conn = self.connect()
        calls = self.queue_calls(tls, conn, 5, b"first")
        sock.sendall(out.read())
        self.check(calls, *self.serve(sock, inc, out, tls, conn, calls))

    def test_many_records_in_one_send_are_all_answered(self):
        """On an established connection, 40 calls (80 records, more than one
        read's worth) sent in one TCP send are all answered, and so is a
        second such batch."""
        sock, inc, out, tls, conn = self.connect()
        sock.sendall(out.read())
        for batch in (b"a", b"b"):
            calls = self.queue_calls(tls, conn, 40, batch)
            sock.sendall(out.read())
            self.check(calls, *self.serve(sock, inc, out, tls, conn, calls))


class TlsClientThatStopsReadingTest(H.SparkgateTestCase):
    """A TLS client that stops reading a stream of small messages: the
    proxy writes what the socket takes (a record it could not finish is
    finished later, from the same bytes) and the rest waits; once the
    client reads again the stream arrives whole, byte for byte."""

    def test_small_messages_to_a_paused_reader_arrive_byte_exact(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, workers=1))
        c = H.H2Client(sg.port("public"), timeout=60)
        self.addCleanup(c.close)
        # A small receive buffer and a large stream window: the proxy's
        # socket fills while the client sleeps, not its flow control.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 * MIB})
        c._flush()
        total, chunk, seed = 4 * MIB, 1000, 7
        md = H.standin_md("stream", bytes=total, chunk=chunk, seed=seed)
        sid = c.start(c.grpc_headers(SERVICE + "ExecutePlan", extra=list(md)),
                      H.grpc_frame(b"paused"))
        time.sleep(2.0)
        r = c.wait(sid)
        self.assertEqual(r.trailer("grpc-status"), "0", r)
        self.assertEqual(sum(len(m) for m in H.grpc_unframe(r.data)), total)
        h = hashlib.sha256(b"".join(H.grpc_unframe(r.data)))
        self.assertEqual(h.hexdigest(), H.stream_sha256(seed, total, chunk))
        self.assertEqual(r.trailer("x-standin-sha256"), h.hexdigest())

    def test_stream_through_a_window_smaller_than_a_record_arrives_byte_exact(self):
        """A stream window of 7,001 bytes cuts every DATA frame to a TLS
        client short of a record (16,375 bytes of payload): the proxy sends
        each backend frame's bytes in pieces, each with its own header in
        the same record, and the stream of 64 KiB messages arrives whole,
        byte for byte."""
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, workers=1))
        c = H.H2Client(sg.port("public"), timeout=60)
        self.addCleanup(c.close)
        c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 7001})
        c._flush()
        total, chunk, seed = 3 * MIB + 17, 65536 - 5, 9
        md = H.standin_md("stream", bytes=total, chunk=chunk, seed=seed)
        sid = c.start(c.grpc_headers(SERVICE + "ExecutePlan", extra=list(md)),
                      H.grpc_frame(b"narrow"))
        r = c.wait(sid)
        self.assertEqual(r.trailer("grpc-status"), "0", r)
        messages = H.grpc_unframe(r.data)
        self.assertEqual(sum(len(m) for m in messages), total)
        h = hashlib.sha256(b"".join(messages))
        self.assertEqual(h.hexdigest(), H.stream_sha256(seed, total, chunk))
        self.assertEqual(r.trailer("x-standin-sha256"), h.hexdigest())


class IdleConnectionTrimTest(H.SparkgateTestCase):
    """A connection with no call for idle_trim_ms (here a second) gives its session's spare
    memory back: the pages of its stream table and frame buffer; so does
    the pooled backend connection. What stays in the sessions (HPACK
    tables, windows, settings) must come through: calls before and after
    each trim arrive intact, on the same two connections."""

    def test_calls_after_each_idle_trim_arrive_intact(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, log_level="debug",
                                                idle_trim_ms=1000))
        rng = random.Random(7)
        # Indexed by the client's HPACK encoder: later calls send it as an
        # index into the table sparkgate's session keeps.
        note = ("x-note", "n" * 3000)
        sessions = ["00112233-4455-6677-8899-aabbccddee%02d" % i for i in range(3)]
        with H.H2Client(sg.port("public")) as c:
            for rnd in range(3):
                mark = sg.mark()
                # The stand-in answers with the request's payload.
                payload = rng.randbytes(20000 + rnd)
                r = c.request(SERVICE + "Config", body=H.grpc_frame(payload), extra=[note])
                self.assertEqual((r.status, r.trailer("grpc-status")), (200, "0"), r)
                self.assertEqual(H.grpc_unframe(r.data), [payload])
                req = b"plan %d" % rnd
                r = c.request(SERVICE + "ExecutePlan", body=H.grpc_frame(req),
                              extra=[note] + H.standin_md(count=5))
                self.assertEqual((r.status, r.trailer("grpc-status")), (200, "0"), r)
                self.assertEqual(H.grpc_unframe(r.data),
                                 [i.to_bytes(4, "big") + req for i in range(5)])
                # Calls naming Spark sessions, one after the other and back:
                # the connection remembers its last session's affinity key,
                # and gives it up at each trim.
                for sid in sessions[rnd:] + sessions[:rnd]:
                    msg = spark_proto.request(b"s%d" % rnd, session_id=sid)
                    r = c.request(SERVICE + "Config", body=H.grpc_frame(msg))
                    self.assertEqual((r.status, r.trailer("grpc-status")), (200, "0"), r)
                    self.assertEqual(H.grpc_unframe(r.data), [msg])
                sg.wait_for_log(r"conn=\d+ peer=\S+: idle for 1000 ms: spare session "
                                r"memory given back$", since=mark, timeout=10)
                sg.wait_for_log(r"upstream spark-1 conn=\d+: idle for 1000 ms: spare "
                                r"session memory given back$", since=mark, timeout=10)
            self.assertFalse(c.closed)
        calls = up.calls()
        self.assertEqual(len(calls), 15)
        # One backend connection, trimmed three times, carried them all.
        self.assertEqual(len({rec.peer for rec in calls}), 1, calls)

    def test_zero_never_trims_and_the_idle_timeout_still_closes(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, log_level="debug", idle_trim_ms=0,
                                                idle_timeout_ms=1500))
        mark = sg.mark()
        with H.H2Client(sg.port("public")) as c:
            r = c.request(SERVICE + "Config", body=H.grpc_frame(b"once"))
            self.assertEqual((r.status, r.trailer("grpc-status")), (200, "0"), r)
            self.assertEqual(H.grpc_unframe(r.data), [b"once"])
            sg.wait_for_log(r"conn=\d+ peer=\S+: idle for 1500 ms, closing", since=mark,
                            timeout=10)
        self.assertIsNone(sg.find_log(r"spare session memory given back", since=mark))


class InsecureListenerTest(H.SparkgateTestCase):
    def test_h2c_listener_works_and_is_logged_insecure(self):
        up = self.standin()
        cfg = H.base_config(up.port, listeners=[H.tls_listener("public"),
                                                H.h2c_listener("dev")])
        sg = self.start_sparkgate(cfg)
        self.assertEqual(sg.listeners["dev"][2], "h2c")
        self.assertEqual(sg.listeners["public"][2], "tls")
        self.assertIsNotNone(sg.find_log(r"(?i)\binsecure\b"), sg.log_text())
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"cleartext")
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, b"cleartext"), r)
        r = H.call_server_stream(ch, "ExecutePlan", b"p", H.standin_md(count=2))
        self.assertEqual(r.responses, [b"\x00\x00\x00\x00p", b"\x00\x00\x00\x01p"], r)
        # The TLS listener next to it still only speaks TLS.
        tch = H.tls_channel(sg.port("public"))
        self.addCleanup(tch.close)
        self.assertEqual(H.call_unary(tch, "Config", b"tls").response, b"tls")
        with H.H2Client(sg.port("dev"), tls=False) as c:
            resp = c.request(SERVICE + "Config", body=H.grpc_frame(b"raw"))
        self.assertEqual(H.grpc_unframe(resp.data), [b"raw"], resp)


class Ipv6ListenerTest(H.SparkgateTestCase):
    def test_ipv6_listener_logged_in_brackets_and_serving(self):
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(up.port, listeners=[
            H.tls_listener("v6", address="::1")]))
        self.assertIsNotNone(sg.find_log(r"listener v6 listening on \[::1\]:%d \(tls\)"
                                         % sg.port("v6")), sg.log_text())
        ch = H.tls_channel(sg.port("v6"), host="::1")
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"over v6")
        self.assertEqual((r.code, r.response), (grpc.StatusCode.OK, b"over v6"), r)


if __name__ == "__main__":
    H.main()
