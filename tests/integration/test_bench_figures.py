#!/usr/bin/python3
"""bench/benchlib.py, which turns h2load's output into the figures of
docs/performance.md: a run counts only when its figures mean what they
say. On canned inputs: no proxy, no h2load run; each test feeds
benchlib.py what bench/run would and checks the figure or verdict it
prints.

The h2load outputs below are real ones (nghttp2 1.52's h2load on this
machine), trimmed to the lines benchlib reads.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BENCHLIB = os.path.join(ROOT, "bench", "benchlib.py")
PY = "/usr/bin/python3"

# `bench/run --quick --scenarios unary --peers sparkgate`: 1 s warm-up, 3 s
# measured, sparkgate at 100% of its core.
UNARY_OUT = """\
spawning thread #0: 50 total client(s). Timing-based test with 1s of warm-up time and 3s of main duration for measurements.
Warm-up started for thread #0.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Application protocol: h2
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 4.00s, 77315.33 req/s, 8.41MB/s
requests: 231946 total, 231946 started, 231946 done, 231946 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 231946 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 25.22MB (26445294) total, 1.79MB (1873428) headers (space savings 96.14%), 23.71MB (24859040) data
                     min         max         mean         sd        +/- sd
time for request:     1.53ms     21.42ms      5.86ms      1.70ms    92.16%
"""

# h2load -D 2 --warm-up-time 2 against nghttpd with two URIs, /Config (the
# 80-byte reply) and /Empty (a 200 with no body: what a proxy-made gRPC
# error looks like to h2load): half of the measured calls had no body.
UNARY_HALF_EMPTY_OUT = """\
spawning thread #0: 2 total client(s). Timing-based test with 2s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
Application protocol: h2c
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 4.00s, 61444.00 req/s, 4.34MB/s
requests: 122888 total, 122888 started, 122888 done, 122888 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 122888 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 8.67MB (9093830) total, 2.52MB (2640547) headers (space savings 93.88%), 9.59MB (10057680) data
                     min         max         mean         sd        +/- sd
time for request:       27us       237us        51us        12us    97.34%
"""

# A run where 5 requests timed out: h2load counts each of them in
# `failed`, `errored` and `timeout` (each is a subset of the one before,
# h2load(1)).
UNARY_5_TIMEOUTS_OUT = """\
finished in 10.00s, 99500.00 req/s, 8.41MB/s
requests: 1000 total, 1000 started, 1000 done, 995 succeeded, 5 failed, 5 errored, 5 timeout
status codes: 995 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.00MB (100000) total, 0.01MB (10000) headers (space savings 96.14%), 0.08MB (79600) data
                     min         max         mean         sd        +/- sd
time for request:     1.53ms     21.42ms      5.86ms      1.70ms    92.16%
"""


def run_lib(*args, stdin=None):
    p = subprocess.run([PY, BENCHLIB] + [str(a) for a in args], input=stdin,
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise AssertionError("benchlib %s failed: %s" % (args[0], p.stderr))
    return p.stdout


class BenchCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def path(self, name, text=None):
        p = os.path.join(self.tmp.name, name)
        if text is not None:
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
        return p

    def result(self, out_text, *extra):
        out = self.path("h2load.out", out_text)
        return json.loads(run_lib("result", "--peer", "sparkgate", "--scenario", "unary",
                                  "--run", 1, "--out", out, *extra))

    def table(self, rows):
        res = self.path("results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return run_lib("table", res)


class ResultParsing(BenchCase):
    def test_cpu_read_over_part_of_the_run_does_not_count(self):
        """CPU per unary call is the proxy's CPU over h2load's run divided
        by the run's calls: a reading that spans only part of the run (here
        2.55 s of 4 s) would make the proxy look cheaper, so the run is
        refused, saying why."""
        r = self.result(UNARY_OUT, "--cpu-s", "2.553737", "--wall-s", "2.554185")
        self.assertFalse(r["ok"], r)
        self.assertIn("CPU was read over", r.get("note", ""))

    def test_bodyless_replies_hidden_by_warmup_bytes(self):
        """A run in which half of the measured calls got a 200 without the
        upstream's body (a proxy-made gRPC error) must not count. h2load's
        `data` byte count includes the warm-up's replies while `succeeded`
        counts only the measured period, so with --warm-up-time the byte
        check cannot see them: such a run is refused (bench/run warms up
        in a run of its own)."""
        r = self.result(UNARY_HALF_EMPTY_OUT, "--expect-body-bytes", 80)
        self.assertFalse(r["ok"], "half the calls without a body, yet ok: %s" % r)

    def test_failed_requests_counted_once(self):
        """h2load's `errored` is a subset of `failed`, and `timeout` of
        `errored` (h2load(1)): 5 timed-out requests of 1000 are 0.5%, under
        the 1% limit, so the run counts (with a note saying 5). cmd_result
        must not add the three counters (15 failures, 1.5%, the run thrown
        away)."""
        r = self.result(UNARY_5_TIMEOUTS_OUT, "--expect-body-bytes", 80)
        self.assertTrue(r["ok"], r.get("note"))
        self.assertIn("5 of 1000", r.get("note", ""))


class Tables(BenchCase):
    def test_failed_bulk_peer_shows_failed_in_download_column(self):
        """A peer that does not start (or fails its probe) in the `bulk`
        scenario is recorded by with_peer as scenario "bulk" (likewise
        "auth"), which no column reads: the Figures table leaves the peer
        out, or shows "-" (not measured), instead of "failed": `failed
        --scenario bulk` records the scenarios the tables read (download,
        upload; auth-*)."""
        failed = json.loads(run_lib("failed", "--peer", "nghttpx", "--scenario", "bulk",
                                    "--run", 1, "--note", "exited with status 1").splitlines()[0])
        rows = [{"peer": "direct", "scenario": "download", "run": 1, "ok": True, "mbps": 1000.0},
                {"peer": "sparkgate", "scenario": "download", "run": 1, "ok": True, "mbps": 900.0},
                failed]
        text = self.table(rows)
        line = [l for l in text.splitlines() if l.startswith("| nghttpx")]
        self.assertTrue(line, "nghttpx has no row in:\n" + text)
        self.assertIn("failed", line[0], "nghttpx's download cell: " + line[0])

    def test_scaling_ceiling_is_not_below_the_measured_ratio(self):
        """The scaling table prints a ceiling for 2 workers ÷ 1 worker
        "whatever the proxy does": the two-core bound ÷ the measured
        1-worker req/s, never below what was measured (with direct 86,377,
        1 worker 68,200 req/s at 0.938 cores and 2 workers 75,600, it is
        1.16×, not the 1.09× an idealised 1-worker rate gave)."""
        rows = [{"peer": "direct", "scenario": "unary", "run": 1, "ok": True, "rps": 86377.0},
                {"peer": "sparkgate-1w", "scenario": "scaling", "run": 1, "ok": True,
                 "rps": 68200.0, "proxy_cores": 68200.0 / 72700.0},
                {"peer": "sparkgate-2w", "scenario": "scaling", "run": 1, "ok": True,
                 "rps": 75600.0, "proxy_cores": 75600.0 / 69500.0}]
        text = self.table(rows)
        m = re.search(r"can reach at most \*\*([\d.]+)×\*\*", text)
        self.assertIsNotNone(m, text)
        self.assertGreaterEqual(float(m.group(1)), 75600.0 / 68200.0,
                                "printed ceiling below the measured ratio:\n" + text)

    def test_bulk_target_has_no_verdict_when_direct_ran_below_a_tls_peer(self):
        """A run where direct's download is slower than a proxy doing TLS
        (614 MB/s against 1150: its file read from the disk) is no ceiling,
        and the target row must not read "met" at 187%; with direct the
        fastest, the verdict stands."""
        rows = [{"peer": "direct", "scenario": "download", "run": 1, "ok": True, "mbps": 614.0},
                {"peer": "sparkgate", "scenario": "download", "run": 1, "ok": True,
                 "mbps": 1150.0},
                {"peer": "nghttpx", "scenario": "download", "run": 1, "ok": True,
                 "mbps": 1200.0}]
        line = [l for l in self.table(rows).splitlines()
                if l.startswith("| download MB/s vs direct")]
        self.assertEqual(len(line), 1)
        self.assertNotIn("| met", line[0])
        self.assertIn("no verdict", line[0])
        self.assertIn("nghttpx (1200)", line[0])
        rows[0]["mbps"] = 1389.0
        line = [l for l in self.table(rows).splitlines()
                if l.startswith("| download MB/s vs direct")]
        self.assertIn("83%", line[0])
        self.assertIn("**not met**", line[0])

    def test_idle_cost_after_100_calls_has_its_column_and_target_row(self):
        """The idle scenario's third figure (connections that have worked)
        shows in the main table and is held against the best peer's, here
        HAProxy's 21.6 KiB, not nginx's, which is the best only with no
        call."""
        rows = []
        for peer, settings, call, busy in (("sparkgate", 29.9, 32.2, 33.4),
                                           ("nginx", 15.2, 20.4, 29.1),
                                           ("haproxy", 21.5, 21.5, 21.6)):
            rows.append({"peer": peer, "scenario": "idle", "run": 1, "ok": True,
                         "kib_per_conn_settings": settings, "kib_per_conn_call": call,
                         "kib_per_conn_busy": busy})
        text = self.table(rows)
        self.assertIn("idle KiB/conn, 100 calls", text)
        line = [l for l in text.splitlines()
                if l.startswith("| idle TLS h2 conn after 100 calls RSS vs best peer")]
        self.assertEqual(len(line), 1, text)
        self.assertIn("(haproxy)", line[0])
        self.assertIn("33.4 vs 21.6 KiB", line[0])
        self.assertIn("**not met**", line[0])
        rows[0]["kib_per_conn_busy"] = 21.0
        line = [l for l in self.table(rows).splitlines()
                if l.startswith("| idle TLS h2 conn after 100 calls RSS vs best peer")]
        self.assertRegex(line[0], r"\|\s*met\s*\|$")

    def test_tls_each_peer_negotiated_is_shown_and_a_mismatch_flagged(self):
        """What TLS each peer negotiated comes from h2load's output; a proxy
        that negotiated another version or cipher than the others (nginx
        1.22 offers TLS 1.3 only when told) gets a warning, the baselines
        do not."""
        r = self.result(UNARY_OUT)
        self.assertEqual(r["tls"], "TLSv1.3 TLS_AES_128_GCM_SHA256")
        rows = [dict(r, peer="sparkgate"),
                dict(r, peer="direct-tls", tls="TLSv1.3 TLS_AES_256_GCM_SHA384"),
                dict(r, peer="nginx")]
        text = self.table(rows)
        self.assertIn("TLS negotiated: sparkgate TLSv1.3 TLS_AES_128_GCM_SHA256; "
                      "direct-tls TLSv1.3 TLS_AES_256_GCM_SHA384; "
                      "nginx TLSv1.3 TLS_AES_128_GCM_SHA256.", text)
        self.assertNotIn("Warning", text)
        rows[2]["tls"] = "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256"
        text = self.table(rows)
        self.assertIn("nginx TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256", text)
        self.assertIn("did not all negotiate the same TLS", text)


if __name__ == "__main__":
    harness.main()
