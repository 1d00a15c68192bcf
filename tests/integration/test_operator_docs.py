#!/usr/bin/python3
"""The operator documentation against the program: configuration
handling (--check-config and a start agreeing, every error reported, a
config path that is a directory), the connection cap, the log lines the
docs promise, the access log's mode and reason values, the shipped example
and unit, reload of a bad value and of log_level, SIGUSR1 when the reopen
fails, and the metric families of docs/operations.md.

Each test quotes the promise it checks.
"""

import os
import re
import signal
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
from test_config_checks import Base as ConfigCheckBase, good_config  # noqa: E402
from test_operations import (  # noqa: E402
    ADMIN_RE, NotifySocket, http_get, parse_prometheus, sample,
    state_messages, wait_access)

import grpc  # noqa: E402

WAIT = 10.0
DOCS = os.path.join(H.SOURCE_ROOT, "docs")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def read_doc(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()




def h2c_config(backend_port, **top):
    """One h2c listener "dev" (auth none), admin on port 0."""
    top.setdefault("admin", {"address": "127.0.0.1", "port": 0})
    return H.base_config(backend_port, listeners=[H.h2c_listener("dev")], **top)


def scrape(port):
    status, _, body = http_get(port, "/metrics")
    assert status == 200, body
    return parse_prometheus(body.decode("utf-8"))


def settings_of(port):
    """The server's first SETTINGS frame on a new h2c connection:
    {id: value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(PREFACE)
        data = b""
        while len(data) < 9:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        n = int.from_bytes(data[0:3], "big")
        while len(data) < 9 + n:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data[3] == 0x4, data
    payload = data[9:9 + n]
    return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
            for i in range(0, len(payload), 6)}


class Base(ConfigCheckBase):
    """assertRejected from test_config_checks, and a start that must fail."""

    def spawn_and_wait_exit(self, cfg, timeout=15):
        sg = H.Sparkgate(cfg)
        self._started.append(sg)
        self.addCleanup(sg.stop, check=False)
        sg.spawn()
        rc = sg.wait(timeout)
        sg.check_sanitizers()
        return rc, sg


# ---------------------------------------------------------------------------
# --check-config and a start

class CheckConfigAccessLogDirectoryTest(Base):
    """operations.md: --check-config "checks that the access log path can be
    written (run it as sparkgate's user)": a path that is a directory fails
    the check as it fails a start (access(2) W_OK alone said yes)."""

    def test_access_log_path_that_is_a_directory(self):
        d = H.tempdir("sg-alog-dir-")
        cfg = good_config()
        cfg["access_log"] = {"path": d}
        rc_start, sg = self.spawn_and_wait_exit(cfg)
        self.assertNotEqual(rc_start, 0, "a start took a directory as its access log")
        self.assertIn("access_log", sg.log_text())
        err = self.assertRejected(cfg, "access_log.path")
        self.assertIn(d, err)


class CheckConfigEveryErrorTest(Base):
    """configuration.md: --check-config "prints every error, one per line":
    the access-log path is reported with the file's other errors (it was
    checked only once the rest loaded)."""

    def test_access_log_error_reported_with_other_errors(self):
        cfg = good_config()
        cfg["workers"] = 999
        cfg["access_log"] = {"path": "/nonexistent-sparkgate-review/access.log"}
        err = self.assertRejected(cfg, "workers")
        self.assertIn("access_log.path", err,
                      "the unwritable access log path was not reported:\n" + err)


class ConfigFileIsADirectoryTest(Base):
    """configuration.md: each error says "what to do about it": a -c path,
    or a file the configuration names, that is a directory is reported as
    one (fopen(3) opens a directory, and its read error reached jansson as
    an empty file)."""

    def test_directory_as_config_file(self):
        d = H.tempdir("sg-conf-dir-")
        rc, out, err = H.run_cli(["--check-config", "-c", d])
        self.assertEqual(rc, 1, err)
        self.assertIn(d, err)
        self.assertRegex(err, r"(?i)is a directory",
                         "the error does not say the path is a directory:\n" + err)

    def test_directory_as_certificate(self):
        cfg = good_config()
        d = H.tempdir("sg-cert-dir-")
        cfg["listeners"][0]["tls"]["cert"] = d
        err = self.assertRejected(cfg, "listeners[0].tls.cert")
        self.assertRegex(err, r"cannot read '%s': (?i:is a directory)" % re.escape(d))


class EmptyPathPrefixesTest(Base):
    """configuration.md: `allowed_path_prefixes` takes "at least one" prefix:
    an empty list, which would refuse every call with 12, is a
    configuration error."""

    def test_empty_list_refused(self):
        cfg = good_config()
        cfg["allowed_path_prefixes"] = []
        err = self.assertRejected(cfg, "allowed_path_prefixes")
        self.assertIn("refuses every call", err)


class AccessLogDisabledTest(Base):
    """configuration.md: `access_log.enabled` false writes no access log: the
    file is neither created nor required to be writable."""

    def test_disabled_log_opens_nothing(self):
        up = self.standin()
        d = H.tempdir("sg-alog-off-")
        path = os.path.join(d, "access.log")
        cfg = h2c_config(up.port, access_log={"path": path, "enabled": False})
        sg = self.start_sparkgate(cfg)
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        self.assertEqual(H.call_unary(ch, "Config", b"x").code, grpc.StatusCode.OK)
        self.assertFalse(os.path.exists(path))
        cfg["access_log"]["path"] = "/nonexistent-sparkgate-review/access.log"
        rc, out, err = H.check_config(cfg, directory=H.tempdir("sg-conf-"))
        self.assertEqual(rc, 0, err)


class DocumentedRangesTest(Base):
    """configuration.md gives each integer key of the top level, `http2`,
    `upstream` and `auth` a range "A–B": both ends load, one past either
    end is refused with an error naming the key (all of them reported in
    one run)."""

    SECTIONS = {"## Top level": None, "## `http2`": "http2", "## `upstream`": "upstream",
                "## `auth`": "auth"}

    def ranges(self):
        doc = read_doc("configuration.md")
        out = []
        for head, section in self.SECTIONS.items():
            body = doc.split("\n" + head + "\n", 1)[1].split("\n## ", 1)[0]
            body = body.split("\n### ", 1)[0]
            for m in re.finditer(r"^\| `(\w+)` \| integer \| [^|]* \| (\d+)\u2013(\d+)\b",
                                 body, re.M):
                out.append((section, m.group(1), int(m.group(2)), int(m.group(3))))
        self.assertGreaterEqual(len(out), 15, out)
        return out

    def config_with(self, values):
        cfg = good_config()
        for (section, key), v in values.items():
            if section is None:
                cfg[key] = v
            else:
                cfg.setdefault(section, {})[key] = v
        return cfg

    def test_ends_load_and_one_past_is_refused(self):
        rs = self.ranges()
        for pick in (lambda lo, hi: lo, lambda lo, hi: hi):
            cfg = self.config_with({(s, k): pick(lo, hi) for s, k, lo, hi in rs})
            rc, out, err = H.check_config(cfg)
            self.assertEqual(rc, 0, "documented range ends refused:\n%s" % err)
        for pick in (lambda lo, hi: lo - 1, lambda lo, hi: hi + 1):
            cfg = self.config_with({(s, k): pick(lo, hi) for s, k, lo, hi in rs})
            self.assertRejected(cfg, *[k if s is None else "%s.%s" % (s, k)
                                       for s, k, lo, hi in rs])


class DocumentedHttp2DefaultsTest(H.SparkgateTestCase):
    """configuration.md `http2` defaults, as a client sees them: 100
    concurrent streams, a 1 MiB stream window, a 16 MiB connection window,
    a 16384-byte header list."""

    def test_settings_without_an_http2_section(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port))
        with H.H2Client(sg.port("dev"), tls=False) as c:
            def got_all():
                c._pump(0.2)
                return (c.conn.remote_settings.max_concurrent_streams is not None
                        and c.conn.outbound_flow_control_window != 65535)
            H.wait_until(got_all, WAIT, what="SETTINGS and the connection WINDOW_UPDATE")
            rs = c.conn.remote_settings
            self.assertEqual(rs.max_concurrent_streams, 100)
            self.assertEqual(rs.initial_window_size, 1048576)
            self.assertEqual(rs.max_header_list_size, 16384)
            self.assertEqual(c.conn.outbound_flow_control_window, 16777216)


# ---------------------------------------------------------------------------
# Connection cap

class MaxConnectionsIsATotalTest(H.SparkgateTestCase):
    """configuration.md: max_connections counts "Client connections across
    all listeners and workers (one count for the process)": with 4 workers
    a cap of 1 admits one connection (each worker's share, the cap divided
    by `workers` rounded up, admitted up to 4), and every other one is
    counted in sparkgate_connections_refused_total."""

    def test_cap_of_one_with_four_workers(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port, workers=4, max_connections=1))
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        socks = []
        try:
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", sg.port("dev")), timeout=5)
                socks.append(s)
                try:
                    s.sendall(PREFACE)
                except OSError:
                    pass
            served = 0
            for s in socks:
                try:
                    d = s.recv(9)
                except OSError:
                    d = b""
                served += len(d) == 9 and d[3] == 0x4
            open_now = sample(scrape(admin), "sparkgate_connections_open")
            self.assertLessEqual(served, 1, "%d connections served with max_connections 1"
                                 % served)
            self.assertLessEqual(open_now, 1, "sparkgate_connections_open %d with "
                                 "max_connections 1" % open_now)
            # operations.md: each refusal is counted by the cap it was over.
            refused = sample(scrape(admin), "sparkgate_connections_refused_total",
                             reason="max_connections")
            self.assertEqual(served + refused, len(socks), (served, refused))
        finally:
            for s in socks:
                s.close()


# ---------------------------------------------------------------------------
# Operational log

class PortZeroAtLogLevelWarnTest(H.SparkgateTestCase):
    """configuration.md: listeners[].port "`0`: the kernel picks a free port;
    the log line `listener NAME listening on ADDR:PORT (tls)` tells which",
    and admin.port "`0`: kernel-chosen, logged as `admin listening on
    ADDR:PORT`", both "at every `log_level`": with "log_level": "warn" they
    are the only place that tells the chosen port."""

    def test_chosen_ports_are_logged_at_warn(self):
        up = self.standin()
        cfg = h2c_config(up.port, log_level="warn")
        ns = NotifySocket(H.tempdir("sg-notify-"))
        self.addCleanup(ns.close)
        sg = H.Sparkgate(cfg, env={"NOTIFY_SOCKET": ns.path})
        self._started.append(sg)
        self.addCleanup(sg.stop)
        sg.spawn()
        ns.collect_until(lambda got: "READY" in state_messages(got))
        # The harness reads the log as it comes: wait (bounded) for both.
        sg.wait_for_log(r"listener dev listening on 127\.0\.0\.1:\d+ \(h2c\)", timeout=5)
        sg.wait_for_log(ADMIN_RE, timeout=5)


class ReloadLogLevelTest(H.SparkgateTestCase):
    """configuration.md: log_level reloads ("yes"); "`debug` logs every
    connection"."""

    def test_reload_to_debug_logs_connections(self):
        up = self.standin()
        cfg = h2c_config(up.port, log_level="info")
        sg = self.start_sparkgate(cfg)
        mark = sg.mark()
        settings_of(sg.port("dev"))
        self.assertIsNone(sg.find_log(r" debug sparkgate: ", since=mark))
        cfg["log_level"] = "debug"
        H.write_config(cfg, os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload done", timeout=WAIT, since=mark)
        settings_of(sg.port("dev"))
        sg.wait_for_log(r" debug sparkgate: conn=\d+ peer=127\.0\.0\.1:\d+: established",
                        timeout=WAIT, since=mark)


# ---------------------------------------------------------------------------
# Reload of a bad value

class ReloadOutOfRangeKeepsConfigTest(H.SparkgateTestCase):
    """configuration.md: "A file with any error changes nothing: the running
    configuration stays in force and the errors are logged";
    operations.md: `reload: config error: FILE: JSON.PATH: what to fix` and
    sparkgate_config_reloads_total{result="failed"} goes up. A restart-only
    key (workers) fails the reload "with a message saying to restart"."""

    def test_out_of_range_and_restart_only_values(self):
        up = self.standin()
        cfg = h2c_config(up.port, http2={"max_concurrent_streams": 7})
        sg = self.start_sparkgate(cfg)
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        self.assertEqual(settings_of(sg.port("dev")).get(3), 7)
        before = scrape(admin)

        bad = dict(cfg, http2={"max_concurrent_streams": 0})
        H.write_config(bad, os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload: config error: %s: http2\.max_concurrent_streams: 0 is out "
                        r"of range \(1 to 10000\)" % re.escape(sg.config_path),
                        timeout=WAIT, since=mark)
        sg.wait_for_log(r"reload failed", timeout=WAIT, since=mark)
        self.assertEqual(settings_of(sg.port("dev")).get(3), 7, "the bad value took effect")

        bad = dict(cfg, workers=cfg["workers"] + 1)
        H.write_config(bad, os.path.dirname(sg.config_path))
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload failed: workers changed .*restart", timeout=WAIT, since=mark)

        H.wait_until(lambda: sample(scrape(admin), "sparkgate_config_reloads_total",
                                    result="failed")
                     - sample(before, "sparkgate_config_reloads_total", result="failed") >= 2,
                     WAIT, what="two failed reloads counted")
        after = scrape(admin)
        self.assertEqual(sample(after, "sparkgate_config_reloads_total", result="failed")
                         - sample(before, "sparkgate_config_reloads_total", result="failed"), 2)
        self.assertEqual(sample(after, "sparkgate_config_reloads_total", result="ok")
                         - sample(before, "sparkgate_config_reloads_total", result="ok"), 0)
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"still serving")
        self.assertEqual(r.code, grpc.StatusCode.OK, r)


# ---------------------------------------------------------------------------
# Access log

class AccessLogReopenFailureTest(H.SparkgateTestCase):
    """operations.md: "A failed reopen (say the directory is gone) keeps
    writing to the old file and logs why." """

    def test_failed_reopen_keeps_the_old_file(self):
        up = self.standin()
        d = H.tempdir("sg-alog-")
        sub = os.path.join(d, "logs")
        os.mkdir(sub)
        path = os.path.join(sub, "access.log")
        sg = self.start_sparkgate(h2c_config(up.port, access_log={"path": path}))
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"one")
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        wait_access(path, lambda x: x["method"].endswith("/Config"))
        moved = os.path.join(d, "logs.moved")
        os.rename(sub, moved)
        mark = sg.mark()
        sg.send_signal(signal.SIGUSR1)
        sg.wait_for_log(r"SIGUSR1: cannot reopen the access log: .*still writing to the old "
                        r"file", timeout=WAIT, since=mark)
        r = H.call_unary(ch, "AnalyzePlan", b"two")
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        wait_access(os.path.join(moved, "access.log"),
                    lambda x: x["method"].endswith("/AnalyzePlan"))
        self.assertFalse(os.path.exists(path))
        self.assertTrue(sg.alive())


class AccessLogModeUnderShippedUnitTest(H.SparkgateTestCase):
    """operations.md: access_log.path is "A file, created (mode 0640) if
    missing". The shipped unit (systemd/sparkgate.service.in) sets
    UMask=0077; the file must still be 0640, readable by the group that
    LogsDirectoryMode=0750 lets into /var/log/sparkgate (it was 0600)."""

    def test_created_mode_is_0640_under_the_unit_umask(self):
        with open(os.path.join(H.SOURCE_ROOT, "systemd", "sparkgate.service.in")) as f:
            m = re.search(r"^UMask=([0-7]+)\s*$", f.read(), re.M)
        self.assertIsNotNone(m, "no UMask= in the shipped unit")
        umask = int(m.group(1), 8)
        up = self.standin()
        path = os.path.join(H.tempdir("sg-alog-"), "access.log")
        sg = H.Sparkgate(h2c_config(up.port, access_log={"path": path}))
        self._started.append(sg)
        self.addCleanup(sg.stop)
        old = os.umask(umask)
        try:
            sg.spawn()
        finally:
            os.umask(old)
        sg.wait_for_log(H.READY_RE, timeout=H.START_TIMEOUT)
        mode = os.stat(path).st_mode & 0o777
        self.assertEqual(mode, 0o640, "access log created with mode %o under UMask=%s"
                         % (mode, m.group(1)))


class AccessLogReasonValuesTest(H.SparkgateTestCase):
    """operations.md, access log: `reason` says in words what failed, the
    same as the operational log's line: a call refused with
    PERMISSION_DENIED (method not in the tenant's `methods`) names the
    method and the tenant; a call without credentials starts
    `unauthenticated: no_credentials`."""

    def test_reasons_say_what_failed(self):
        up = self.standin()
        path = os.path.join(H.tempdir("sg-alog-"), "access.log")
        cfg = h2c_config(up.port, access_log={"path": path})
        cfg["tenants"][0]["methods"] = ["AnalyzePlan"]
        sg = self.start_sparkgate(cfg)
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"x")
        self.assertEqual(r.code, grpc.StatusCode.PERMISSION_DENIED, r)
        rec = wait_access(path, lambda x: x["grpc_status"] == 7)[0]
        self.assertEqual(rec.get("reason"), "method Config is not allowed for tenant default",
                         rec)
        doc = read_doc("operations.md")
        self.assertIn("`method Config is not allowed for tenant default`", doc)
        self.assertIn("`unauthenticated: no_credentials`", doc)


# ---------------------------------------------------------------------------
# Shipped files and docs

class DeploymentDocExampleTest(H.SparkgateTestCase):
    """deployment.md tells the operator who copies the example what its
    `auth` section trusts: the provider, issuer and key file it names are
    the example's own."""

    def test_what_deployment_md_says_of_the_example(self):
        import json
        doc = " ".join(read_doc("deployment.md").split())
        with open(os.path.join(H.SOURCE_ROOT, "config", "sparkgate.example.json")) as f:
            example = json.load(f)
        self.assertEqual([l.get("auth") for l in example["listeners"]], [{"methods": ["jwt"]}])
        p = example["auth"]["jwt_providers"][0]
        for what in ("`%s` provider" % p["name"], "issuer `%s`" % p["issuer"],
                     "`%s`" % p["keys"][0]["pem_file"], p["keys"][0]["alg"]):
            self.assertIn(what, doc)


class RoutingDocMethodsExampleTest(Base):
    """PySpark 3.5+ follows every ExecutePlan with ReleaseExecute, continues
    a result the server cut (every 2 minutes) with ReattachExecute, and
    calls ReleaseSession and FetchErrorDetails: routing.md's example tenant
    allows them wherever it allows ExecutePlan, and a tenant that does not
    is warned about at start and by --check-config."""

    COMPANIONS = ("ReattachExecute", "ReleaseExecute", "ReleaseSession", "FetchErrorDetails")

    def test_routing_doc_example_allows_what_pyspark_calls(self):
        import json
        m = re.search(r"## Shape\s*```json\n(.*?)```", read_doc("routing.md"), re.S)
        self.assertIsNotNone(m, "routing.md has no '## Shape' JSON example")
        for t in json.loads(m.group(1))["tenants"]:
            methods = t.get("methods")
            if methods is None or "ExecutePlan" not in methods:
                continue
            missing = [x for x in self.COMPANIONS if x not in methods]
            self.assertEqual(missing, [], "routing.md example tenant %r allows ExecutePlan "
                             "but not %s" % (t["name"], missing))

    def test_execute_plan_without_its_companions_is_warned_about(self):
        up = self.standin()
        cfg = h2c_config(up.port)
        cfg["tenants"][0]["methods"] = ["ExecutePlan", "Config", "ReleaseSession"]
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)
        self.assertRegex(out, r"WARNING: ExecutePlan without ReattachExecute, ReleaseExecute, "
                         r"FetchErrorDetails")
        sg = self.start_sparkgate(cfg)
        sg.wait_for_log(r"tenant default allows ExecutePlan but not ReattachExecute, "
                        r"ReleaseExecute, FetchErrorDetails", timeout=5)
        cfg["tenants"][0]["methods"] = ["Config", "Interrupt"]   # no ExecutePlan: nothing to say
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)
        self.assertNotIn("WARNING: ExecutePlan", out)


class DocumentedMetricFamiliesTest(H.SparkgateTestCase):
    """operations.md, "Every metric": each documented metric is served with
    its documented type, and the labels of its series are the documented
    ones (plus `le` on histogram buckets)."""

    def documented(self):
        doc = read_doc("operations.md")
        section = doc.split("### Every metric", 1)[1].split("\n## ", 1)[0]
        rows = {}
        for line in section.splitlines():
            m = re.match(r"\|\s*`([a-z_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|([^|]*)\|",
                         line)
            if m:
                # "`result` (`ok`, `failed`)": the parenthesis lists values.
                labels = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", m.group(3))))
                rows[m.group(1)] = (m.group(2), labels)
        self.assertGreater(len(rows), 20, "could not read the metric tables")
        return rows

    def test_every_documented_metric(self):
        up = self.standin()
        sg = self.start_sparkgate(h2c_config(up.port))
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"m")
        self.assertEqual(r.code, grpc.StatusCode.OK, r)
        status, _, body = http_get(admin, "/metrics")
        text = body.decode("utf-8")
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        H.wait_until(lambda: sample(scrape(admin), "sparkgate_rpcs_total", tenant="default",
                                    method="Config", grpc_status="0"),
                     WAIT, what="the call counted")
        samples = scrape(admin)
        for name, (typ, labels) in self.documented().items():
            self.assertEqual(types.get(name), typ, "%s: documented %s, served %s"
                             % (name, typ, types.get(name)))
            names = {name}
            if typ == "histogram":
                names = {name + "_bucket", name + "_sum", name + "_count"}
            for (n, lbls) in samples:
                if n not in names:
                    continue
                keys = {k for k, _ in lbls} - ({"le"} if n.endswith("_bucket") else set())
                self.assertEqual(keys, labels, "%s series %r: documented labels %r"
                                 % (n, dict(lbls), labels))


if __name__ == "__main__":
    H.main()
