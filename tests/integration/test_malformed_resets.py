#!/usr/bin/python3
"""Resets the proxy sends for requests that break HTTP/2 messaging, and
connection errors: charged and logged.

nghttp2 resets a stream whose body does not agree with its content-length
(RFC 9113 8.1.1) by itself, with no callback. Each such reset may cancel a
backend call that had started: the "MadeYouReset" variant of rapid reset
(CVE-2025-8671). It costs the abuse budget as a client reset does, and is
logged with its reason; so is a later message the Spark scanner refuses.
Connection errors nghttp2 finds while parsing are logged with the reason
the client is told in the GOAWAY's debug data.

Frames are hand-made (RawH2 from test_attacks.py). Every wait is bounded;
no test asserts a duration.
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
from test_attacks import (  # noqa: E402
    AttackCase, RawH2, Stream, DATA, ENHANCE_YOUR_CALM, PROTOCOL_ERROR, SERVICE, frame,
    hpack_block, headers_frames, data_frames)

PADDED = 0x8
END_STREAM = 0x1


class MessagingResetBudgetTest(AttackCase):
    """A request whose body does not match its content-length is malformed
    (RFC 9113 8.1.1): nghttp2 resets the stream (RST_STREAM PROTOCOL_ERROR)
    by itself, without the invalid-frame callback. Unless the proxy charges
    its own resets, a client can have it reset streams whose backend call
    has started as fast as it likes: the rapid-reset attack without a
    single client RST_STREAM."""

    def flood(self, extra, ending, count, what):
        """Rounds of 90 live ExecutePlan calls on one h2c connection: each
        sends one whole message and gets its first response message (the
        backend is running it), then |ending| is sent on every stream.
        Until the budget ends the connection (asserted: GOAWAY
        ENHANCE_YOUR_CALM); |count(stream)| picks the streams the proxy
        refused, of which there must be some."""
        mark = self.sg.mark()
        md = H.standin_md("stall", count=1, stall_ms=30000)
        rounds, per_round, streams = 20, 90, 0
        with RawH2(self.h2c_port, tls=False) as c:
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            block = hpack_block(c.request_headers(extra=md + extra))
            body = H.grpc_frame(b"first message")
            for _ in range(rounds):
                sids = []
                out = []
                for _ in range(per_round):
                    sid = c.next_sid
                    c.next_sid += 2
                    c.streams[sid] = Stream(sid)
                    sids.append(sid)
                    out.append(headers_frames(sid, block) +
                               data_frames(sid, body, end_stream=False))
                if not c.send(b"".join(out)):
                    break
                c.wait(lambda: c.goaway is not None or
                       all(c.streams[s].data or c.streams[s].done for s in sids),
                       15, "the backend answering every call of the round")
                if c.goaway is not None or c.closed:
                    break
                if not c.send(b"".join(frame(DATA, END_STREAM, s, ending) for s in sids)):
                    break
                c.wait(lambda: c.goaway is not None or
                       all(c.streams[s].done for s in sids), 15, "the refusals")
                streams += per_round
                if c.goaway is not None or c.closed:
                    break
            refused = sum(1 for s in c.streams.values() if count(s))
            self.assertGreater(refused, 0, "no call was refused: %r" % (c.goaway,))
            self.assertIsNotNone(
                c.goaway, "%d calls started at the backend, then %s and cancelled there "
                "(%d rounds), and the connection goes on: the abuse budget does not see "
                "them" % (refused, what, streams // per_round))
            self.assertEqual(c.goaway[1], ENHANCE_YOUR_CALM, c.goaway)
        self.sg.wait_for_log(r"closing: too many .*\(abuse budget spent\)", timeout=5,
                             since=mark)
        self.assert_same_process()
        self.control("after the flood")

    def test_server_reset_for_content_length_spends_the_budget(self):
        """Rounds of 90 live ExecutePlan calls (each declares content-length
        99999, sends one whole message without END_STREAM, and gets its first
        response message: the backend is running it), then an empty DATA with
        END_STREAM on each: the proxy resets all 90 and cancels their backend
        calls. Client resets are cut off after ~500 (two tokens each of a
        1000-token burst, refilled at 200/s); these must be cut off too,
        with GOAWAY(ENHANCE_YOUR_CALM) and the budget's log line, well before
        1800 backend calls have been started and cancelled."""
        # Each body ends short of its declared content-length.
        self.flood([("content-length", "99999")], b"",
                   lambda s: s.reset == PROTOCOL_ERROR,
                   "reset by the proxy for a content-length mismatch (MadeYouReset)")

    def test_malformed_later_message_spends_the_budget(self):
        """The same at the gRPC level: a valid first ExecutePlan message
        starts the backend call, then a second message with an invalid
        flag byte is refused by the Spark scanner (grpc-status 3) and the
        backend call is cancelled. docs/security.md: "malformed ...
        requests take from" the budget, so a client cannot start and
        cancel backend calls this way without end."""
        bad = b"\x02\x00\x00\x00\x01x"  # flag byte 2: not a gRPC message
        self.flood([], bad, lambda s: s.grpc_status == 3,
                   "refused as malformed (grpc-status 3)")


class MessagingResetLoggedTest(AttackCase):
    def test_content_length_mismatch_reset_is_logged(self):
        """A request reset for a body shorter than its content-length gets
        RST_STREAM(PROTOCOL_ERROR) and no answer; docs/operations.md ("What
        clients see") promises a `rejected (stream reset): …` line for a
        request reset as malformed per RFC 9113, and the access log gives
        the reason."""
        mark = self.sg.mark()
        with RawH2(self.h2c_port, tls=False) as c:
            sid = c.new_sid()
            hdrs = c.request_headers(SERVICE + "Config", extra=[("content-length", "500")])
            c.send(headers_frames(sid, hpack_block(hdrs)) +
                   data_frames(sid, H.grpc_frame(b"short body"), end_stream=True))
            s = c.wait_stream(sid)
            self.assertEqual((s.reset, s.headers), (PROTOCOL_ERROR, []), s)
        try:
            self.sg.wait_for_log(r"stream=%d .*(rejected|reset).*content-length" % sid,
                                 timeout=2, since=mark)
        except AssertionError:
            self.fail("no log line says why stream %d was reset (content-length 500, "
                      "body %d bytes); log since the request:\n%s"
                      % (sid, len(H.grpc_frame(b"short body")),
                         "\n".join(self.sg.lines[mark:])))
        self.assert_upstream_saw_nothing()


class ConnectionErrorReasonLoggedTest(AttackCase):
    """nghttp2 ends the connection with GOAWAY(PROTOCOL_ERROR) for frames it
    finds malformed as it parses them, and says why in the GOAWAY's debug
    data ("DATA: invalid padding", "request HEADERS: max concurrent streams
    exceeded", ...). sparkgate's log only says `sent GOAWAY PROTOCOL_ERROR
    (last stream N)` (at most preceded by `invalid frame (type 1, stream 5):
    Protocol error`): the operator is not told what the client did wrong,
    although the client was told."""

    config_overrides = {"http2": {"max_concurrent_streams": 2}}

    def _case(self, what, send, expect_debug):
        mark = self.sg.mark()
        with RawH2(self.h2c_port, tls=False) as c:
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            send(c)
            c.wait(lambda: c.goaway is not None, 5, "GOAWAY after " + what)
            self.assertIsNotNone(c.goaway, what)
            self.assertEqual(c.goaway[1], PROTOCOL_ERROR, (what, c.goaway))
            self.assertIn(expect_debug, c.goaway[2], (what, c.goaway))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if any(expect_debug.decode() in line for line in self.sg.lines[mark:]):
                return None
            time.sleep(0.05)
        return "%s: the client was told %r, the log says only:\n  %s" % (
            what, c.goaway[2].decode(), "\n  ".join(self.sg.lines[mark:]))

    def test_goaway_reason_is_logged(self):
        def bad_padding(c):
            sid = c.new_sid()
            c.send(headers_frames(sid, hpack_block(c.request_headers())) +
                   frame(DATA, PADDED | END_STREAM, sid, bytes([50]) + b"abc"))

        def data_on_idle_stream(c):
            c.send(frame(DATA, END_STREAM, 9, b"abc"))

        def over_max_concurrent_streams(c):
            # Spark calls waiting for their message: open, nothing upstream.
            for _ in range(3):
                c.request(c.request_headers(), end_stream=False)

        missing = [m for m in (
            self._case("padding longer than the frame", bad_padding, b"invalid padding"),
            self._case("DATA on an idle stream", data_on_idle_stream, b"stream in idle"),
            self._case("a third stream over max_concurrent_streams 2",
                       over_max_concurrent_streams, b"max concurrent streams exceeded"),
        ) if m is not None]
        self.assertEqual(missing, [], "\n".join(missing))
        self.assert_same_process()
        self.control("after the connection errors")
        self.assert_upstream_saw_nothing()


if __name__ == "__main__":
    H.main()
