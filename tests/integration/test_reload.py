#!/usr/bin/python3
"""Reload (SIGHUP) and signals, on connections and calls that were there
before: what a reload promises (docs/configuration.md, "Reload") reaches
them, and what it cannot change is refused.

RawH2 and AttackCase come from test_attacks.py. Every wait is bounded;
every port is chosen by the kernel.
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
from test_attacks import AttackCase, RawH2  # noqa: E402

SERVICE = H.SERVICE


def rewrite_config(sg, cfg):
    """Writes |cfg| over the running process's config file (atomically)."""
    path = sg.config_path
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, path)


def reload_and_wait(test, sg, ok=True, timeout=10):
    mark = sg.mark()
    sg.send_signal(signal.SIGHUP)
    if ok:
        sg.wait_for_log(r"reload done", timeout=timeout, since=mark)
    else:
        sg.wait_for_log(r"reload failed", timeout=timeout, since=mark)
    time.sleep(0.3)  # workers pick the new generation up
    return mark


# ---------------------------------------------------------------------------
# Reload: a listener's "auth" is documented as "calls" (configuration.md:
# "every call that starts after the reload uses the new value, also on
# connections accepted before it").

class ReloadListenerAuthOnOpenConnectionTest(AttackCase):
    """Turning authentication on for a listener by SIGHUP applies to the
    next call on a connection accepted before the reload (listener "auth"
    is "calls"). It used to be read from the connection's configuration:
    an open connection stayed unauthenticated for as long as it lasted."""

    config_overrides = {"workers": 1, "idle_timeout_ms": 60000}

    def test_auth_turned_on_by_reload_applies_to_open_connection(self):
        with RawH2(self.h2c_port, tls=False) as c:
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            sid = c.grpc_call(b"before reload", path=SERVICE + "Config")
            s = c.wait_stream(sid, 10)
            self.assertEqual(s.grpc_status, 0, s)

            cfg = json.loads(json.dumps(self.sg.config))
            for l in cfg["listeners"]:
                if l["name"] == "dev":
                    l["auth"] = {"methods": ["jwt"]}
            rewrite_config(self.sg, cfg)
            reload_and_wait(self, self.sg)

            # A new connection gets the new policy: 16 without a token.
            with RawH2(self.h2c_port, tls=False) as fresh:
                fresh.wait(lambda: fresh.settings_acked, 5, "SETTINGS ACK")
                fsid = fresh.grpc_call(b"new conn, no token", path=SERVICE + "Config")
                fs = fresh.wait_stream(fsid, 10)
                self.assertEqual(fs.grpc_status, 16, fs)

            # The open connection: a call that starts after the reload.
            before = len(self.upstream_calls())
            sid2 = c.grpc_call(b"after reload, no token", path=SERVICE + "Config")
            s2 = c.wait_stream(sid2, 10)
            self.assertEqual(
                s2.grpc_status, 16,
                "a call without a token on a connection opened before the reload "
                "that turned on JWT auth was not refused: %r; upstream calls: %d -> %d"
                % (s2, before, len(self.upstream_calls())))


# ---------------------------------------------------------------------------
# Drain: operations.md, "Signals": "SIGTERM, SIGINT: Drain, then exit 0. A
# second one while draining exits at once (status 1)."

class SecondSigtermWhileDrainingTest(AttackCase):
    """A second SIGTERM while draining exits at once with status 1
    (operations.md). It used to start the drain again, and the process
    waited out drain_timeout_ms."""

    config_overrides = {"workers": 1, "drain_timeout_ms": 20000}

    def test_second_sigterm_exits_at_once(self):
        with RawH2(self.h2c_port, tls=False) as c:
            sid = c.live_call()
            mark = self.sg.mark()
            self.sg.send_signal(signal.SIGTERM)
            self.sg.wait_for_log(r"draining", timeout=10, since=mark)
            time.sleep(0.3)
            self.sg.send_signal(signal.SIGTERM)
            try:
                rc = self.sg.wait(5)
            except TimeoutError:
                rc = None
            if rc is None:
                self.sg.kill()
            self.assertEqual(rc, 1, "a second SIGTERM while draining did not exit at "
                             "once with status 1 (exit status %r after 5 s; drain "
                             "timeout is 20 s)" % rc)


class SighupWhileDrainingIsLoggedTest(AttackCase):
    """A SIGHUP while draining does not reload (the calls still running
    keep the configuration in force until exit), and the log says so at
    warn level: the operator (or a config-reloader that logged sending
    it) can tell the new file is not in force."""

    config_overrides = {"workers": 1, "drain_timeout_ms": 20000}

    def test_sighup_during_drain_is_logged(self):
        with RawH2(self.h2c_port, tls=False) as c:
            c.live_call()
            mark = self.sg.mark()
            self.sg.send_signal(signal.SIGTERM)
            self.sg.wait_for_log(r"draining", timeout=10, since=mark)
            mark = self.sg.mark()
            self.sg.send_signal(signal.SIGHUP)
            self.sg.wait_for_log(r"warn.*SIGHUP ignored: draining", timeout=5, since=mark)
            self.assertTrue(self.sg.alive(), "sparkgate exited on SIGHUP while draining")
            self.assertIsNone(self.sg.find_log(r"reload", since=mark), self.sg.log_text(10))


class SighupDuringStartupTest(H.SparkgateTestCase):
    """Config-reloaders send SIGHUP whenever a watched file changes,
    whatever sparkgate is doing. A SIGHUP that arrives while sparkgate
    still starts (here: loading a large routing table) is held until the
    start is done and then taken as a normal reload; it never kills the
    process."""

    def test_sighup_while_loading_is_a_reload_once_started(self):
        d = H.tempdir("sg-start-hup-")
        up = self.standin()
        tenants = [{"name": "t%d" % i, "hosts": ["h%d.example" % i],
                    "backends": [{"name": "b%d" % i, "address": "127.0.0.1",
                                  "port": up.port}],
                    "allow": {"any_identity": True}, "user_id": "off"}
                   for i in range(20000)]
        rt = os.path.join(d, "routes.json")
        with open(rt, "w") as f:
            json.dump({"tenants": tenants, "tenant_selectors": ["authority"]}, f)
        cfg = {"workers": 1, "listeners": [H.h2c_listener("dev")], "routing_table": rt,
               "allowed_path_prefixes": [SERVICE]}
        sg = H.Sparkgate(cfg, config_dir=d)
        sg.spawn()
        self.addCleanup(sg.kill)
        time.sleep(0.1)  # exec'd, loading the routing table
        sg.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sg.alive() and not sg.find_log(H.READY_RE):
            time.sleep(0.05)
        rc = sg.proc.poll()
        self.assertIsNone(rc, "sparkgate was killed by a SIGHUP sent while it started "
                          "(exit status %r, -1 = SIGHUP); log:\n%s" % (rc, sg.log_text()))
        self.assertTrue(sg.find_log(H.READY_RE), sg.log_text())
        sg.wait_for_log(r"reload done", timeout=20)


# ---------------------------------------------------------------------------
# Reload and tenant limits.

class _H2cCase(H.SparkgateTestCase):
    """A stand-in and a sparkgate with one h2c listener "dev" (no auth) and
    one worker; |tweak(cfg)| edits the config before the start."""

    def start_h2c(self, tweak=None, **top):
        self.up = self.standin()
        cfg = H.base_config(self.up.port, listeners=[H.h2c_listener("dev")],
                            workers=1, idle_timeout_ms=60000, **top)
        if tweak is not None:
            tweak(cfg)
        self.sg = self.start_sparkgate(cfg)
        self.h2c_port = self.sg.port("dev")
        return cfg


class ReloadResetsConcurrencyLimitTest(_H2cCase):
    """max_concurrent_rpcs counts "calls of this tenant in progress at
    once", also across a reload: calls admitted under the old configuration
    still count. A reload used to start every tenant's counters (and rate
    buckets) afresh, so any SIGHUP, even of an unchanged file, gave a
    tenant its limit again on top of the calls it already ran."""

    def test_calls_in_flight_still_count_after_reload(self):
        def tweak(cfg):
            cfg["tenants"][0]["limits"] = {"max_concurrent_rpcs": 1}
        self.start_h2c(tweak)
        with RawH2(self.h2c_port, tls=False) as c:
            sid = c.live_call()
            # Control: the limit holds before the reload.
            sid2 = c.grpc_call(b"second", path=SERVICE + "Config")
            s2 = c.wait_stream(sid2, 10)
            self.assertEqual(s2.grpc_status, 8, s2)
            # The same file again.
            reload_and_wait(self, self.sg)
            self.assertFalse(c.streams[sid].done, "the long call ended: %r" % c.streams[sid])
            # Same connection: still refused (it uses the old counters).
            sid3 = c.grpc_call(b"third", path=SERVICE + "Config")
            self.assertEqual(c.wait_stream(sid3, 10).grpc_status, 8)
            # A new connection (same worker: workers is 1).
            with RawH2(self.h2c_port, tls=False) as c2:
                sid4 = c2.grpc_call(b"fourth", path=SERVICE + "Config")
                s3 = c2.wait_stream(sid4, 10)
            self.assertEqual(
                s3.grpc_status, 8,
                "with max_concurrent_rpcs 1 and one call in progress, a second "
                "call (new connection) was admitted after a reload of an unchanged "
                "file: %r" % s3)


class ReloadAddsTenantOnOpenConnectionTest(_H2cCase):
    """A reload that adds a tenant, then a call for it on a connection
    opened before: the call's limits are its own configuration's. They
    were looked up by the new tenant's index in the connection's older
    configuration, sized for fewer tenants (a crash, or another tenant's
    limits)."""

    def test_call_for_a_tenant_added_by_reload_on_an_open_connection(self):
        cfg = self.start_h2c()
        with RawH2(self.h2c_port, tls=False) as c:
            c.wait(lambda: c.settings_acked, 5, "SETTINGS ACK")
            sid = c.grpc_call(b"before reload", path=SERVICE + "Config")
            self.assertEqual(c.wait_stream(sid, 10).grpc_status, 0)

            new = json.loads(json.dumps(cfg))
            t0 = new["tenants"][0]
            second = json.loads(json.dumps(t0))
            second["name"] = "second"
            second["limits"] = {"requests_per_second": 1000}
            new["tenants"].append(second)
            rewrite_config(self.sg, new)
            reload_and_wait(self, self.sg)

            sid2 = c.grpc_call(b"for the new tenant", path=SERVICE + "Config",
                               extra=[("x-spark-tenant", "second")])
            try:
                s2 = c.wait_stream(sid2, 10)
            except TimeoutError:
                s2 = c.streams[sid2]
            time.sleep(0.3)
            self.assertTrue(self.sg.alive(),
                            "sparkgate died (exit status %r) on a call for a tenant "
                            "added by a reload, on a connection opened before it"
                            % self.sg.proc.poll())
            self.assertEqual(s2.grpc_status, 0, s2)


class ReloadAddsAdminListenerTest(_H2cCase):
    """operations.md, "Reload": "A reload cannot change what is bound at
    start: ... the admin listener. Such a change fails the reload with a
    message saying to restart." Adding an "admin" section to a process
    started without one is such a change: it used to be reported as done
    while nothing served /metrics, /healthz or /readyz."""

    def test_adding_admin_by_reload_fails_the_reload(self):
        cfg = self.start_h2c()
        new = json.loads(json.dumps(cfg))
        new["admin"] = {"address": "127.0.0.1", "port": 0}
        rewrite_config(self.sg, new)
        mark = self.sg.mark()
        self.sg.send_signal(signal.SIGHUP)
        m = self.sg.wait_for_log(r"reload done|reload failed", timeout=10, since=mark)
        self.assertIn("reload failed", m.group(0),
                      "a reload that adds an admin listener (which cannot be bound "
                      "by a reload) was reported as done; log:\n%s"
                      % self.sg.log_text(10))


class VerifyFalseIsLoggedTest(H.SparkgateTestCase):
    """A backend with "verify": false (no certificate or host name check: a
    man in the middle gets every token and query) is named at warn level at
    the start and after every successful reload, like an insecure
    listener; not only in --check-config's summary."""

    def test_verify_false_is_logged_at_start_and_reload(self):
        up = self.standin(tls=True)
        cfg = H.base_config(up.port, backend_tls={"verify": False}, workers=1)
        sg = self.start_sparkgate(cfg)
        want = r"warn.*backend spark-1 of tenant \S+: TLS verification is OFF"
        sg.wait_for_log(want, timeout=5)
        mark = reload_and_wait(self, sg)
        sg.wait_for_log(want, timeout=5, since=mark)


if __name__ == "__main__":
    H.main()
