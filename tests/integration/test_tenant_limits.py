#!/usr/bin/python3
"""Tenant limits and their accounting, against docs/routing.md "Limits",
docs/operations.md (reload, status table) and docs/configuration.md
(connection caps): counts that survive reloads, caps that see the
connections already open, denial lines that name the limit and its value,
and slots a finished call gives back.
"""

import copy
import json
import os
import re
import signal
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402
import spark_proto as P  # noqa: E402

SERVICE = H.SERVICE
WAIT = 10.0


def frame(body, flag=0):
    return bytes([flag]) + len(body).to_bytes(4, "big") + body


def message(payload=b"p", session_id=None, user="tester"):
    return P.request(payload, session_id=session_id or str(uuid.uuid4()), user_id=user)


def grpc_status(r):
    """The grpc-status the client got (trailers, or a trailers-only answer)."""
    if r.trailers:
        return r.trailer("grpc-status")
    if r.headers:
        return r.header("grpc-status")
    return None


def rewrite_config(sg, cfg):
    tmp = sg.config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, sg.config_path)


def reload_and_wait(sg, cfg):
    rewrite_config(sg, cfg)
    mark = sg.mark()
    sg.send_signal(signal.SIGHUP)
    sg.wait_for_log(r"reload done", timeout=WAIT, since=mark)
    time.sleep(0.3)  # the worker picks the new generation up


def tenant(name, port, limits=None, user_id="off"):
    t = {"name": name, "backends": [{"name": "b", "address": "127.0.0.1", "port": port}],
         "allow": {"any_identity": True}, "user_id": user_id}
    if limits is not None:
        t["limits"] = limits
    return t


def h2c_config(up_port, tenants, **top):
    cfg = H.base_config(up_port, listeners=[H.h2c_listener("public")], workers=1, **top)
    cfg["tenant_selectors"] = ["header:x-t"]
    cfg["tenants"] = tenants
    return cfg


class _Case(H.SparkgateTestCase):
    def client(self):
        c = H.H2Client(self.port, tls=False, timeout=WAIT)
        self.addCleanup(c.close)
        return c

    def headers(self, c, method, tenant_name, extra=()):
        return c.grpc_headers(SERVICE + method, extra=[("x-t", tenant_name)] + list(extra))

    def stall(self, tenant_name):
        """A call the stand-in holds open, once its response has started."""
        c = self.client()
        sid = c.start(self.headers(c, "AnalyzePlan", tenant_name,
                                   [("x-standin-mode", "stall"), ("x-standin-stall-ms", "20000")]),
                      frame(message()))
        r = c.responses[sid]
        deadline = time.monotonic() + WAIT
        while r.status is None and not r.ended and r.reset_code is None:
            self.assertLess(time.monotonic(), deadline, "the stalled call never started")
            c._pump(0.1)
        self.assertEqual((r.status, r.header("grpc-status")), (200, None),
                         "the stalled call was not admitted: %r" % r)
        return c, sid

    def call(self, tenant_name, method="AnalyzePlan"):
        c = H.H2Client(self.port, tls=False, timeout=WAIT)
        try:
            r = c.request(SERVICE + method, extra=[("x-t", tenant_name)],
                          body=frame(message()), timeout=WAIT)
        finally:
            c.close()
        return grpc_status(r), r


# ---------------------------------------------------------------------------

class TenantReaddedKeepsCountTest(_Case):
    """docs/operations.md, reload: "Tenant limits carry over by tenant name:
    calls in flight still count against max_concurrent_rpcs /
    max_concurrent_executions, and the rate and upload buckets keep their
    level (a reload grants no fresh burst)". A tenant taken out by one
    reload (a typo, a rename undone) and put back by the next, while its
    long ExecutePlan calls still run, still counts them."""

    def test_calls_in_flight_count_after_remove_and_readd(self):
        up = self.standin()
        cfg = h2c_config(up.port, [tenant("t", up.port, {"max_concurrent_rpcs": 1}),
                                   tenant("other", up.port)])
        self.sg = self.start_sparkgate(cfg)
        self.port = self.sg.port()
        c, sid = self.stall("t")
        # Control: at the limit before any reload.
        st, r = self.call("t")
        self.assertEqual(st, "8", r)

        without = copy.deepcopy(cfg)
        without["tenants"] = [t for t in without["tenants"] if t["name"] != "t"]
        reload_and_wait(self.sg, without)
        reload_and_wait(self.sg, cfg)
        c._pump(0.2)
        self.assertFalse(c.responses[sid].ended or c.responses[sid].reset_code is not None,
                         "the call in flight ended: %r" % c.responses[sid])
        st, r = self.call("t")
        self.assertEqual(
            st, "8",
            "tenant t (max_concurrent_rpcs 1) has one call in flight; after it was "
            "removed and added back by two reloads, a second call was admitted "
            "(grpc-status %s): the call in flight no longer counts" % st)


class PerClientCapAfterReloadTest(_Case):
    """docs/configuration.md: max_connections_per_client is "Client
    connections from one IP address (any port), counted for the whole
    process". An operator turns it on by SIGHUP when one address opens too
    many connections: the connections it already has count (an address
    with 3 open connections gets none more under a cap of 2)."""

    def test_open_connections_count_toward_a_cap_set_by_reload(self):
        up = self.standin()
        cfg = h2c_config(up.port, [tenant("t", up.port)])
        self.sg = self.start_sparkgate(cfg)
        self.port = self.sg.port()
        old = [self.client() for _ in range(3)]
        for c in old:
            r = c.request(SERVICE + "Config", extra=[("x-t", "t")], body=frame(message()))
            self.assertEqual(grpc_status(r), "0", r)

        capped = copy.deepcopy(cfg)
        capped["max_connections_per_client"] = 2
        mark = self.sg.mark()
        reload_and_wait(self.sg, capped)
        admitted = 0
        try:
            c = H.H2Client(self.port, tls=False, timeout=5)
            try:
                r = c.request(SERVICE + "Config", extra=[("x-t", "t")],
                              body=frame(message()), timeout=5)
                admitted = grpc_status(r) == "0"
            finally:
                c.close()
        except (OSError, TimeoutError):
            pass
        self.assertFalse(
            admitted,
            "127.0.0.1 has 3 connections open and max_connections_per_client was "
            "set to 2 by reload: a 4th connection was admitted")
        self.sg.wait_for_log(r"refused connection from 127\.0\.0\.1:\d+: "
                             r"max_connections_per_client \(2\) reached",
                             timeout=5, since=mark)


class LimitDenialLogTest(_Case):
    """The brief of sparkgate's logs: a refused request has a log line that
    says why and what to fix. For a tenant limit that is the tenant, the
    limit and its configured value (the operator compares it with what the
    tenant needs without opening the configuration of the right
    generation). docs/operations.md's status table promises `tenant T is
    over its limit L` for every tenant limit, upload bytes included."""

    @classmethod
    def limits_config(cls, up):
        return h2c_config(up.port, [
            tenant("lim-rpcs", up.port, {"max_concurrent_rpcs": 1}),
            tenant("lim-exec", up.port, {"max_concurrent_executions": 1}),
            tenant("lim-rate", up.port, {"requests_per_second": 1, "burst": 2}),
            tenant("lim-upload", up.port, {"upload_bytes_per_minute": 5000}),
        ])

    def setUp(self):
        super().setUp()
        up = self.standin()
        self.sg = self.start_sparkgate(self.limits_config(up))
        self.port = self.sg.port()

    def denial_line(self, mark, tenant_name):
        m = self.sg.wait_for_log(r"grpc-status 8: .*tenant %s\b.*" % re.escape(tenant_name),
                                 timeout=5, since=mark)
        return m.group(0)

    def assert_names(self, line, tenant_name, key, value):
        self.assertIn("tenant %s" % tenant_name, line)
        self.assertIn(key, line, "the denial's log line does not name the limit %s: %r"
                      % (key, line))
        after = line[line.index(key) + len(key):]
        self.assertRegex(after, r"\b%d\b" % value,
                         "the denial's log line does not say the configured value "
                         "%s %d: %r" % (key, value, line))

    def test_upload_denial_names_its_limit(self):
        c = self.client()
        sess = str(uuid.uuid4())
        mark = self.sg.mark()
        body = b"".join(frame(message(b"q" * 1000, session_id=sess)) for _ in range(8))
        r = c.request(SERVICE + "AddArtifacts", extra=[("x-t", "lim-upload")], body=body)
        self.assertEqual(grpc_status(r), "8", r)
        self.assert_names(self.denial_line(mark, "lim-upload"), "lim-upload",
                          "upload_bytes_per_minute", 5000)

    def test_concurrency_and_rate_denials_say_the_value(self):
        mark = self.sg.mark()
        self.stall("lim-rpcs")
        st, r = self.call("lim-rpcs")
        self.assertEqual(st, "8", r)
        self.assert_names(self.denial_line(mark, "lim-rpcs"), "lim-rpcs",
                          "max_concurrent_rpcs", 1)

        mark = self.sg.mark()
        c = self.client()
        first = c.start(self.headers(c, "ExecutePlan", "lim-exec",
                                     [("x-standin-mode", "stall"),
                                      ("x-standin-stall-ms", "20000")]),
                        frame(message()))
        deadline = time.monotonic() + WAIT
        while c.responses[first].status is None and time.monotonic() < deadline:
            c._pump(0.1)
        st, r = self.call("lim-exec", "ExecutePlan")
        self.assertEqual(st, "8", r)
        self.assert_names(self.denial_line(mark, "lim-exec"), "lim-exec",
                          "max_concurrent_executions", 1)

        mark = self.sg.mark()
        codes = [self.call("lim-rate")[0] for _ in range(6)]
        self.assertIn("8", codes)
        self.assert_names(self.denial_line(mark, "lim-rate"), "lim-rate",
                          "requests_per_second", 1)


class TrailersOnlyEndsRequestTest(_Case):
    """A backend that answers at once with an error (trailers-only: one
    HEADERS frame with END_STREAM) while the client's request is still
    open, e.g. an AddArtifacts upload the backend refuses. Every other way
    a call's response ends, the proxy then resets the client's request
    side (RST_STREAM NO_ERROR, RFC 9113 8.1), which ends the stream and
    gives the tenant's max_concurrent_rpcs slot back; so also after a
    trailers-only answer (else the slot stays taken until the client
    closes the stream, or stream_idle_timeout_ms, 1 h by default)."""

    def test_slot_freed_after_trailers_only_answer(self):
        up = self.standin()
        cfg = h2c_config(up.port, [tenant("t", up.port, {"max_concurrent_rpcs": 1})])
        self.sg = self.start_sparkgate(cfg)
        self.port = self.sg.port()
        c = self.client()
        sid = c.start(self.headers(c, "AddArtifacts", "t",
                                   [("x-standin-mode", "trailers-only"),
                                    ("x-standin-code", "7")]),
                      frame(message(b"a")), end_stream=False)
        r = c.responses[sid]
        deadline = time.monotonic() + WAIT
        while not r.ended and r.reset_code is None and time.monotonic() < deadline:
            c._pump(0.1)
        self.assertEqual(r.header("grpc-status"), "7", r)
        # The proxy's reset follows the answer at once when it comes.
        deadline = time.monotonic() + 2.0
        while r.reset_code is None and time.monotonic() < deadline:
            c._pump(0.1)
        st, r2 = self.call("t")
        self.assertEqual(
            st, "0",
            "the first call was answered (trailers-only, 7) and the proxy left its "
            "request side open (reset %r): a fresh call of the tenant "
            "(max_concurrent_rpcs 1) got grpc-status %s" % (r.reset_code, st))
        self.assertEqual(r.reset_code, 0,
                         "no RST_STREAM NO_ERROR after the trailers-only answer: %r" % r)


if __name__ == "__main__":
    H.main()
