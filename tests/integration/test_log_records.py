#!/usr/bin/python3
"""What the operational log and the JSON access log say about refused,
reset and cancelled calls, and that no client can forge a log line or get
a secret written into one.

Promises (docs/operations.md "Logs" and the status table, docs/security.md
"Denials"):
  * operational log: one line per event; tokens, keys and secrets are never
    logged; bytes a client chooses (header names, session ids) are written
    escaped when they are not printable ASCII;
  * access log: one JSON object per call, answered by a backend or refused
    by the proxy; grpc_status null when the stream was reset without one;
    reason on every call the proxy refused, reset or cut; bytes_in counts
    the request bytes received;
  * a request malformed per RFC 9113 (reset by nghttp2) is logged
    `rejected (stream reset): …`.
"""

import json
import os
import re
import secrets
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
import spark_proto  # noqa: E402
from test_attacks import (RawH2, frame, window_update, DATA, PING, PROTOCOL_ERROR,  # noqa: E402
                          SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW, headers_frames,
                          hpack_block)

import grpc  # noqa: E402
import jwt as pyjwt  # noqa: E402

SERVICE = H.SERVICE
END_STREAM = 0x1
ISS = "https://idp-logs.test"
AUD = "spark"

# What every operational log line starts with (docs/operations.md, "Logs").
LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warn|error) sparkgate: ")
FORGED = "2026-01-01T00:00:00.000Z error sparkgate: FORGED by the client"


def access_lines(path):
    """Every access-log line, each parsed with json.loads (a line that does
    not parse fails the test)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for raw in f:
            out.append(json.loads(raw.decode("utf-8")))
    return out


def wait_access(path, pred, timeout=5.0):
    """The first access-log record matching |pred|, or None after |timeout|."""
    deadline = time.monotonic() + timeout
    while True:
        for rec in access_lines(path):
            if pred(rec):
                return rec
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def raw_client(port, tls=True):
    """An H2Client that sends what it is given: no header validation or
    lower-casing (h2 would refuse the bad requests these tests need)."""
    c = H.H2Client(port, tls=tls)
    c.conn.config.validate_outbound_headers = False
    c.conn.config.normalize_outbound_headers = False
    return c


class Base(H.SparkgateTestCase):
    def setUp(self):
        super().setUp()
        self.dir = H.tempdir("sg-logrec-")
        self.alog = os.path.join(self.dir, "access.log")

    def config(self, backend_port, **top):
        cfg = H.base_config(backend_port, workers=1, **top)
        cfg["access_log"] = {"path": self.alog}
        return cfg

    def assert_lines_well_formed(self, sg, since):
        """Every operational log line from |since| on is one event line:
        the timestamp prefix, and no terminal escape."""
        with sg._cond:
            lines = list(sg.lines[since:])
        bad = [l for l in lines
               if not LINE_RE.match(l) or "\x1b" in l or l.startswith(FORGED[:24])]
        self.assertEqual(bad, [], "log lines a client forged or decorated:\n%s"
                         % "\n".join(repr(l) for l in lines))


# ---------------------------------------------------------------------------
# Log injection and secrets through nghttp2's error callback (conn.c on_error)

class NghttpErrorCallback(Base):

    def test_invalid_header_value_cannot_forge_log_lines(self):
        """A request header value holding a newline (or a :path holding an
        ANSI escape) is malformed and the stream is reset; the log line that
        says so must not copy the raw bytes: one event, one line, no
        terminal escapes (nghttp2's message quotes the offending name and
        value)."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port))
        mark = sg.mark()
        c = raw_client(sg.port())
        self.addCleanup(c.close)
        r = c.request(SERVICE + "AnalyzePlan", extra=[("x-note", "a\n" + FORGED)],
                      body=H.grpc_frame(b"x"))
        self.assertIsNotNone(r.reset_code, r)
        r = c.request(SERVICE + "Analyze\x1b[31mPlan", body=H.grpc_frame(b"x"))
        self.assertIsNotNone(r.reset_code, r)
        sg.wait_for_log(r"stream[ =:]+3\b", since=mark)
        time.sleep(0.2)
        self.assert_lines_well_formed(sg, mark)

    def test_token_in_malformed_authorization_field_is_not_logged(self):
        """security.md: "The token is never echoed or logged". A client
        whose authorization field HTTP/2 forbids (an upper-case name from a
        hand-rolled client, a trailing space from a token file) is refused;
        the log may say the field was malformed, but must not print the
        bearer token or any part of it, at any level (debug here), although
        nghttp2's message quotes the field's value."""
        up = self.standin()
        secret = secrets.token_hex(24).encode()
        key = os.path.join(self.dir, "hmac.key")
        with open(key, "wb") as f:
            f.write(secret)
        cfg = self.config(
            up.port, log_level="debug",
            listeners=[H.tls_listener("public", auth={"methods": ["jwt"]})],
            auth={"jwt_providers": [{"name": "idp", "issuer": ISS, "audiences": [AUD],
                                     "keys": [{"alg": "HS256", "secret_file": key}]}]})
        sg = self.start_sparkgate(cfg)
        now = int(time.time())
        token = pyjwt.encode({"iss": ISS, "sub": "alice", "aud": AUD, "iat": now,
                              "exp": now + 600}, secret, algorithm="HS256")
        token = token if isinstance(token, str) else token.decode()
        signature = token.split(".")[2]
        c = raw_client(sg.port())
        self.addCleanup(c.close)
        for field in (("Authorization", "Bearer " + token),
                      ("authorization", "Bearer " + token + " ")):
            r = c.request(SERVICE + "AnalyzePlan", extra=[field], body=H.grpc_frame(b"x"))
            self.assertTrue(r.reset_code is not None or r.trailer("grpc-status") or
                            r.header("grpc-status"), r)
        time.sleep(0.3)
        sg.stop()
        text = sg.log_text() + "\n" + "\n".join(json.dumps(x) for x in access_lines(self.alog))
        self.assertNotIn(signature, text, "the bearer token's signature is in the log")
        self.assertNotIn(token.split(".")[1], text, "the bearer token's payload is in the log")


# ---------------------------------------------------------------------------
# Calls nghttp2 itself refuses: no access-log line

class MalformedRequestRecord(Base):

    def test_request_reset_by_nghttp2_has_access_log_line(self):
        """docs/operations.md: one access-log line "per call — answered by a
        backend or refused by the proxy", and the status table logs a
        request "malformed per RFC 9113 (nghttp2)" as `rejected (stream
        reset): …`. A request with an upper-case header name is reset with
        PROTOCOL_ERROR: it gets its access-log line, and the operational
        log's line names the path and the field."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port))
        mark = sg.mark()
        c = raw_client(sg.port())
        self.addCleanup(c.close)
        r = c.request(SERVICE + "AnalyzePlan", extra=[("X-Upper", "v")],
                      body=H.grpc_frame(b"x"))
        self.assertEqual(r.reset_code, 1, r)  # PROTOCOL_ERROR
        rec = wait_access(self.alog, lambda x: x["stream_id"] == r.stream_id)
        self.assertIsNotNone(rec, "no access-log line for the reset request; access log: %r"
                             % access_lines(self.alog))
        self.assertIsNone(rec["grpc_status"], rec)
        self.assertIn("reason", rec, rec)
        sg.wait_for_log(r"stream=%d .*rejected \(stream reset\)" % r.stream_id,
                        timeout=2, since=mark)


# ---------------------------------------------------------------------------
# Session ids in the operational log

class SessionIdInLog(Base):

    def test_session_id_newline_cannot_forge_debug_lines(self):
        """A Spark session_id is any UTF-8 without NUL (sparkmsg.c
        utf8_valid), newlines included, and the debug line `session S of
        tenant T re-homed to backend B` quotes it: escaped, so that every
        line is one event."""
        up1 = self.standin()
        up2 = self.standin()
        cfg = self.config(up1.port, log_level="debug")
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port())
        self.addCleanup(ch.close)
        sid = "s-1\n" + FORGED
        path = SERVICE + "AnalyzePlan"
        call = ch.unary_unary(
            path, request_serializer=lambda p: spark_proto.request(p, session_id=sid))
        self.assertEqual(call(b"a", timeout=10), b"a")
        # The session's backend goes away: its next call is re-homed.
        cfg2 = json.loads(json.dumps(cfg))
        cfg2["tenants"][0]["backends"] = [
            {"name": "spark-2", "address": "127.0.0.1", "port": up2.port}]
        H.write_config(cfg2, os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", since=mark)
        self.assertEqual(call(b"b", timeout=10), b"b")
        sg.wait_for_log(r"re-homed", since=mark)
        self.assert_lines_well_formed(sg, mark)


# ---------------------------------------------------------------------------
# What the access log says about calls the proxy ended

class AccessLogEndings(Base):

    def test_backend_reset_after_response_started_has_reason(self):
        """The backend's connection dies after two response messages: the
        proxy resets the client stream (INTERNAL_ERROR) and logs why. The
        access log must carry `reason` ("Only on calls the proxy refused or
        reset: why ... The operational log's line for the call says the
        same")."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port))
        ch = H.tls_channel(sg.port())
        self.addCleanup(ch.close)
        r = H.call_server_stream(ch, "ExecutePlan", b"z",
                                 metadata=H.standin_md("reset", count=2), timeout=10)
        self.assertNotEqual(r.code, grpc.StatusCode.OK, r)
        rec = wait_access(self.alog, lambda x: x["method"].endswith("/ExecutePlan"))
        self.assertIsNotNone(rec, access_lines(self.alog))
        self.assertIsNone(rec["grpc_status"], rec)
        self.assertIn("reason", rec, "a call the proxy reset has no reason: %r" % rec)

    def test_call_cut_by_drain_timeout_is_not_logged_as_client_cancel(self):
        """SIGTERM with a call still streaming: after drain_timeout_ms the
        proxy closes the connection. The client got no status, so the
        access log must say grpc_status null with a reason naming the drain
        timeout, not grpc_status 1 (CANCELLED, "the client gave up") with
        no reason. The same holds for a write stall or an abuse-budget
        close."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port, drain_timeout_ms=300))
        ch = H.tls_channel(sg.port())
        self.addCleanup(ch.close)
        path = SERVICE + "ExecutePlan"
        it = ch.unary_stream(path, request_serializer=H._serializer(path))(
            b"x", metadata=H.standin_md("stall", count=1), timeout=20)
        self.addCleanup(it.cancel)
        next(it)  # the call is in flight, the backend holds it open
        sg.send_signal(signal.SIGTERM)
        self.assertEqual(sg.wait(10), 0)
        rec = wait_access(self.alog, lambda x: x["method"] == path, timeout=1)
        self.assertIsNotNone(rec, access_lines(self.alog))
        self.assertNotEqual(rec["grpc_status"], 1,
                            "a call the proxy cut at the drain timeout is logged as "
                            "cancelled by the client: %r" % rec)
        self.assertIn("drain", rec.get("reason", ""), rec)

    def test_refused_call_counts_the_request_bytes_it_received(self):
        """A call refused at its headers (path outside the allowed
        prefixes: grpc-status 12) whose body arrived with them: bytes_in
        ("Request message bytes from the client") and
        sparkgate_request_bytes_total ("received from clients") must count
        what the client sent (an operator looking for refused uploads
        must see them)."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port))
        c = H.H2Client(sg.port())
        self.addCleanup(c.close)
        body = H.grpc_frame(b"u" * 3000, raw=True)
        path = "/not.served.Here/Upload"
        sid = c.conn.get_next_available_stream_id()
        c.responses[sid] = H.H2Response(sid)
        # Headers and body in one write: they arrive together, before the
        # refusal is sent.
        c.conn.send_headers(sid, c.grpc_headers(path), end_stream=False)
        c.conn.send_data(sid, body, end_stream=True)
        c._flush()
        r = c.wait(sid)
        self.assertEqual(r.header("grpc-status"), "12", r)
        rec = wait_access(self.alog, lambda x: x["method"] == path)
        self.assertIsNotNone(rec, access_lines(self.alog))
        self.assertEqual(rec["grpc_status"], 12, rec)
        self.assertEqual(rec["bytes_in"], len(body), rec)


# ---------------------------------------------------------------------------
# Calls the proxy cuts: one cause, and only stream errors are stream resets

class CallsCutByProxy(Base):

    def test_call_cut_by_protocol_error_goaway_is_not_a_client_cancel(self):
        """docs/operations.md (access log): grpc_status `1` (CANCELLED) is
        for a call the client cancelled or went away from; a call the proxy
        cut when nghttp2 ended the connection (here for DATA on stream 0:
        GOAWAY PROTOCOL_ERROR, with no error from mem_recv) is null with
        reason `connection closed by the proxy: ...`."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port, listeners=[H.h2c_listener("dev")]))
        with RawH2(sg.port("dev"), tls=False) as c:
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            sid = c.live_call()
            c.send(frame(DATA, END_STREAM, 0, b"abc"))  # a connection error
            c.wait(lambda: c.goaway is not None, 5, "GOAWAY")
            self.assertEqual(c.goaway[1], PROTOCOL_ERROR, c.goaway)
            c.wait_closed(5)
        rec = wait_access(self.alog, lambda x: x["stream_id"] == sid)
        self.assertIsNotNone(rec, access_lines(self.alog))
        self.assertIsNone(rec["grpc_status"],
                          "a call the proxy cut (GOAWAY PROTOCOL_ERROR) is logged as a "
                          "client cancel: %r" % rec)
        self.assertIn("connection closed by the proxy", rec.get("reason") or "", rec)


    def test_close_reason_does_not_mix_two_causes(self):
        """The access-log reason of a call cut by the proxy names one
        cause, the first: here the abuse budget (a client that reads nothing
        floods PINGs), then the write stall that ends the connection."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(
            up.port, listeners=[H.h2c_listener("dev")], write_stall_timeout_ms=1000))
        mark = sg.mark()
        c = RawH2(sg.port("dev"), tls=False, rcvbuf=4096,
                  settings=[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)], auto_window=False)
        self.addCleanup(c.close)
        c.send(window_update(0, MAX_WINDOW - 65535))
        sid = c.grpc_call(b"big result", extra=H.standin_md(
            "stream", bytes=256 * H.MIB, chunk=64 * 1024))
        up.wait_for_call(SERVICE + "ExecutePlan", timeout=10)
        time.sleep(0.5)  # the proxy's output to this client fills up
        c.send(b"".join(frame(PING, 0, 0, i.to_bytes(8, "big")) for i in range(1500)))
        sg.wait_for_log(r"closed: the client read nothing", timeout=15, since=mark)
        rec = wait_access(self.alog, lambda x: x["stream_id"] == sid)
        self.assertIsNotNone(rec, access_lines(self.alog))
        reason = rec.get("reason") or ""
        self.assertIn("connection closed by the proxy", reason, rec)
        mixed = "write stall" in reason and ("PING" in reason or "Flooding" in reason)
        self.assertFalse(mixed, "the reason glues two causes together: %r" % reason)


class InvalidHeadersConnectionError(Base):

    def test_connection_error_on_headers_is_not_logged_as_stream_reset(self):
        """A second HEADERS on a stream the client already ended is a
        connection error (GOAWAY STREAM_CLOSED, no RST_STREAM): it is not
        logged as `rejected (stream reset)` nor recorded as a malformed
        request; only nghttp2's stream errors are stream resets."""
        up = self.standin()
        sg = self.start_sparkgate(self.config(up.port, listeners=[H.h2c_listener("dev")]))
        mark = sg.mark()
        with RawH2(sg.port("dev"), tls=False) as c:
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            sid = c.live_call()
            c.send(headers_frames(sid, hpack_block([("x-late", "1")]), end_stream=True))
            c.wait(lambda: c.goaway is not None, 5, "GOAWAY")
            c.wait_closed(5)
            self.assertIsNone(c.streams[sid].reset, c.streams[sid])
        rec = wait_access(self.alog, lambda x: x["stream_id"] == sid)
        self.assertIsNotNone(rec, access_lines(self.alog))
        sg.wait_for_log(r"sent GOAWAY STREAM_CLOSED", timeout=5, since=mark)
        claims = [l for l in sg.lines[mark:]
                  if "stream=%d " % sid in l and "rejected (stream reset)" in l]
        self.assertEqual(claims, [], "the log says the stream was reset; the client got "
                         "no RST_STREAM but GOAWAY %r" % (c.goaway,))
        self.assertFalse(rec["grpc_status"] == 1 and
                         (rec.get("reason") or "").startswith("malformed"),
                         "access log: cancelled by the client and malformed at once: %r"
                         % rec)


if __name__ == "__main__":
    H.main()
