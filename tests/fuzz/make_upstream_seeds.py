#!/usr/bin/python3
"""Writes the seed corpus of fuzz_h2_upstream: what a backend says on its
connection to sparkgate, after the server preface the harness sends itself
(an empty SETTINGS and the ACK of sparkgate's SETTINGS). The call is always
stream 1 (one ExecutePlan per input).

    /usr/bin/python3 tests/fuzz/make_upstream_seeds.py [OUTDIR]

OUTDIR defaults to tests/fuzz/corpus/fuzz_h2_upstream next to this script.
The output is deterministic: running it again rewrites the same bytes.
"""

import os
import struct
import sys

import hpack

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 7, 8, 11

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, \
    SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, \
    SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = range(1, 7)

GRPC = [(":status", "200"), ("content-type", "application/grpc")]
OK = [("grpc-status", "0")]


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream & 0x7FFFFFFF) + payload


class Backend:
    """One connection's frames; a single HPACK encoder for all of them, as a
    real server has."""

    def __init__(self):
        self.enc = hpack.Encoder()
        self.out = b""

    def headers(self, fields, end_stream=False, stream=1, flags=END_HEADERS):
        block = self.enc.encode(fields)
        self.out += frame(HEADERS, flags | (END_STREAM if end_stream else 0),
                          stream, block)
        return self

    def headers_split(self, fields, end_stream=False, stream=1, pieces=3):
        """HEADERS and CONTINUATION frames for one header block."""
        block = self.enc.encode(fields)
        step = max(1, -(-len(block) // pieces))
        chunks = [block[i:i + step] for i in range(0, len(block), step)]
        for i, c in enumerate(chunks):
            last = END_HEADERS if i == len(chunks) - 1 else 0
            if i == 0:
                self.out += frame(HEADERS, last | (END_STREAM if end_stream else 0),
                                  stream, c)
            else:
                self.out += frame(CONTINUATION, last, stream, c)
        return self

    def data(self, payload, end_stream=False, stream=1, pad=None):
        flags = END_STREAM if end_stream else 0
        if pad is not None:
            payload = bytes([pad]) + payload + b"\0" * pad
            flags |= PADDED
        self.out += frame(DATA, flags, stream, payload)
        return self

    def raw(self, b):
        self.out += b
        return self

    def rst(self, code, stream=1):
        self.out += frame(RST_STREAM, 0, stream, struct.pack(">I", code))
        return self

    def goaway(self, last, code=NO_ERROR, debug=b""):
        self.out += frame(GOAWAY, 0, 0, struct.pack(">II", last, code) + debug)
        return self

    def settings(self, pairs, ack=False):
        body = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
        self.out += frame(SETTINGS, ACK if ack else 0, 0, body)
        return self

    def window_update(self, increment, stream=0):
        self.out += frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))
        return self

    def ping(self, opaque=b"fuzzping", ack=False):
        self.out += frame(PING, ACK if ack else 0, 0, opaque)
        return self


def grpc_message(payload, compressed=False):
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(payload)) + payload


# ExecutePlanResponse-shaped payloads: session_id (1), operation_id (12),
# response_id (13); what is inside does not matter to sparkgate.
SESSION = b"00112233-4455-6677-8899-aabbccddeeff"


def response_payload(n):
    op = b"op-%d" % n
    return b"\x0a" + bytes([len(SESSION)]) + SESSION + b"\x62" + bytes([len(op)]) + op


def seeds():
    s = {}
    m1, m2 = grpc_message(response_payload(1)), grpc_message(response_payload(2))

    s["ok_two_messages"] = (Backend().headers(GRPC).data(m1 + m2)
                            .headers(OK, end_stream=True).out)
    s["ok_end_on_data"] = (Backend().headers(GRPC).data(m1).data(b"", end_stream=True)
                           .out)
    s["trailers_only"] = (Backend().headers(GRPC + [("grpc-status", "5"),
                                                    ("grpc-message", "not found")],
                                            end_stream=True).out)
    s["trailers_with_details"] = (
        Backend().headers(GRPC).data(m1)
        .headers([("grpc-status", "13"), ("grpc-message", "boom%20here"),
                  ("grpc-status-details-bin", "CAISBGJvb20")], end_stream=True).out)
    s["rst_refused"] = Backend().rst(REFUSED_STREAM).out
    s["rst_cancel"] = Backend().rst(CANCEL).out
    s["goaway_last_0"] = Backend().goaway(0).out
    s["goaway_last_0_then_close"] = Backend().goaway(0, ENHANCE_YOUR_CALM, b"bye").out
    s["goaway_last_1_then_answer"] = (Backend().goaway(1).headers(GRPC).data(m1)
                                      .headers(OK, end_stream=True).out)
    s["goaway_error_mid_response"] = (Backend().headers(GRPC).data(m1[:7])
                                      .goaway(1, PROTOCOL_ERROR, b"oops").out)

    # One message cut into frames of 1, 2 and 3 bytes: the 5-byte prefix
    # too. Then a second message whole, and trailers.
    b = Backend().headers(GRPC)
    i, step = 0, 1
    while i < len(m1):
        b.data(m1[i:i + step])
        i += step
        step = step % 3 + 1
    s["split_small_data"] = b.data(m2).headers(OK, end_stream=True).out

    s["huge_declared_length"] = (
        Backend().headers(GRPC).data(b"\x00\xff\xff\xff\xf0" + b"x" * 32)
        .headers(OK, end_stream=True).out)
    s["huge_length_then_reset"] = (
        Backend().headers(GRPC).data(b"\x00\x7f\xff\xff\xff" + b"y" * 64)
        .rst(INTERNAL_ERROR).out)
    s["zero_length_messages"] = (Backend().headers(GRPC)
                                 .data(grpc_message(b"") * 4 + m1)
                                 .headers(OK, end_stream=True).out)
    s["compressed_flag"] = (Backend().headers(GRPC + [("grpc-encoding", "gzip")])
                            .data(grpc_message(b"\x1f\x8b\x08\x00", compressed=True))
                            .headers(OK, end_stream=True).out)
    s["interim_100_then_final"] = (Backend().headers([(":status", "100")])
                                   .headers(GRPC).data(m1)
                                   .headers(OK, end_stream=True).out)
    s["interim_103_twice"] = (Backend().headers([(":status", "103"), ("link", "</a>")])
                              .headers([(":status", "103")])
                              .headers(GRPC + OK, end_stream=True).out)
    s["uppercase_header_name"] = (Backend().headers([(":status", "200"),
                                                     ("Content-Type", "application/grpc")])
                                  .data(m1).headers(OK, end_stream=True).out)
    s["uppercase_trailer_name"] = (Backend().headers(GRPC).data(m1)
                                   .headers([("Grpc-Status", "0")], end_stream=True).out)
    s["pseudo_header_in_trailers"] = (Backend().headers(GRPC).data(m1)
                                      .headers([(":status", "200"), ("grpc-status", "0")],
                                               end_stream=True).out)
    s["hop_by_hop_headers"] = (
        Backend().headers(GRPC + [("connection", "close"), ("te", "trailers"),
                                  ("keep-alive", "5"), ("x-backend", "spark-1")])
        .data(m1).headers(OK + [("transfer-encoding", "chunked")], end_stream=True).out)
    s["no_status"] = (Backend().headers([("content-type", "application/grpc")])
                      .data(m1).headers(OK, end_stream=True).out)
    s["status_500"] = Backend().headers([(":status", "500")], end_stream=True).out
    s["content_length_mismatch"] = (
        Backend().headers(GRPC + [("content-length", "100")]).data(m1)
        .headers(OK, end_stream=True).out)
    s["continuation_headers"] = (
        Backend().headers_split(GRPC + [("x-long", "v" * 200)]).data(m1)
        .headers_split(OK + [("grpc-message", "m" * 100)], end_stream=True).out)
    s["padded_data"] = (Backend().headers(GRPC).data(m1, pad=7).data(m2, pad=0)
                        .headers(OK, end_stream=True).out)
    s["settings_window_ping"] = (
        Backend().settings([(SETTINGS_INITIAL_WINDOW_SIZE, 0),
                            (SETTINGS_MAX_CONCURRENT_STREAMS, 1),
                            (SETTINGS_MAX_FRAME_SIZE, 16384),
                            (SETTINGS_HEADER_TABLE_SIZE, 0)])
        .ping().window_update(65535, 1).window_update(1 << 20)
        .headers(GRPC).data(m1).headers(OK, end_stream=True).out)
    s["max_concurrent_zero"] = (Backend().settings([(SETTINGS_MAX_CONCURRENT_STREAMS, 0)])
                                .rst(REFUSED_STREAM).out)
    s["data_before_headers"] = Backend().data(m1).headers(GRPC + OK, end_stream=True).out
    s["frames_on_other_streams"] = (
        Backend().headers(GRPC, stream=3).data(m1, stream=5).rst(CANCEL, stream=7)
        .window_update(100, stream=9).headers(GRPC).data(m1)
        .headers(OK, end_stream=True).out)
    s["push_promise"] = (Backend().raw(frame(PUSH_PROMISE, END_HEADERS, 1,
                                             struct.pack(">I", 2) + b"\x82\x86\x84"))
                         .headers(GRPC + OK, end_stream=True).out)
    s["data_after_end"] = (Backend().headers(GRPC + OK, end_stream=True).data(m1)
                           .headers(OK, end_stream=True).out)
    s["window_overflow"] = (Backend().headers(GRPC)
                            .data(grpc_message(b"z" * 16000))
                            .data(b"z" * 16384).data(b"z" * 16384).data(b"z" * 16384)
                            .data(b"z" * 16384).headers(OK, end_stream=True).out)
    s["bad_frame_size"] = Backend().raw(frame(RST_STREAM, 0, 1, b"\0\0\0")).out
    s["trailers_without_end_stream"] = (Backend().headers(GRPC).data(m1)
                                        .headers(OK).data(b"", end_stream=True).out)
    return s


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        here, "corpus", "fuzz_h2_upstream")
    os.makedirs(out, exist_ok=True)
    all_seeds = seeds()
    for name, body in sorted(all_seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(body)
    print("%d seeds in %s" % (len(all_seeds), out))


if __name__ == "__main__":
    main()
