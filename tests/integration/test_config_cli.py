#!/usr/bin/python3
"""The command line and config validation: --version, --help,
--check-config on good and bad configs (every error printed, one per line,
each naming the file and the JSON path), and a bad config keeping the
process from starting at all."""

import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402


def project_version():
    with open(os.path.join(H.SOURCE_ROOT, "meson.build")) as f:
        m = re.search(r"version:\s*'([^']+)'", f.read())
    return m.group(1)


def good_config():
    """Valid; its listener ports are free right now (and never bound by
    --check-config)."""
    p = H.pki()
    return {
        "workers": 1,
        "log_level": "info",
        "listeners": [
            {"name": "public", "address": "127.0.0.1", "port": H.free_port(),
             "tls": {"cert": p.server_cert, "key": p.server_key}, "auth": "none"},
            {"name": "dev", "address": "127.0.0.1", "port": H.free_port(), "insecure": True,
             "auth": "none"},
        ],
        "tenants": [{"name": "default", "allow": {"any_identity": True}, "backends": [
            {"name": "spark-1", "address": "127.0.0.1", "port": 15002},
            {"name": "spark-2", "address": "127.0.0.1", "port": 15003,
             "tls": {"ca": p.ca_cert, "sni": "localhost"}},
        ]}],
    }


class CliTest(H.SparkgateTestCase):
    def test_version(self):
        rc, out, err = H.run_cli(["--version"])
        self.assertEqual(rc, 0, err)
        self.assertIn("sparkgate", out)
        self.assertIn(project_version(), out)

    def test_help(self):
        rc, out, err = H.run_cli(["--help"])
        self.assertEqual(rc, 0, err)
        for word in ("-c", "--check-config", "--version", "--help"):
            self.assertIn(word, out, "--help does not mention %s:\n%s" % (word, out))

    def test_unknown_option_fails(self):
        rc, out, err = H.run_cli(["--no-such-option"])
        self.assertNotEqual(rc, 0)
        self.assertIn("--no-such-option", out + err)

    def test_check_config_good(self):
        cfg = good_config()
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, "stdout:\n%s\nstderr:\n%s" % (out, err))
        for name in ("public", "dev", "spark-1", "spark-2"):
            self.assertIn(name, out, "summary does not list %s:\n%s" % (name, out))
        # Checking is not running.
        for listener in cfg["listeners"]:
            self.assertFalse(H.port_is_open(listener["port"]))

    def test_relative_paths_are_relative_to_the_config_file(self):
        p = H.pki()
        d = H.tempdir("sg-conf-")
        os.makedirs(os.path.join(d, "certs"))
        for src, dst in ((p.server_cert, "server.pem"), (p.server_key, "server.key"),
                         (p.ca_cert, "ca.pem")):
            shutil.copy(src, os.path.join(d, "certs", dst))
        cfg = good_config()
        cfg["listeners"][0]["tls"] = {"cert": "certs/server.pem", "key": "certs/server.key"}
        cfg["tenants"][0]["backends"][1]["tls"]["ca"] = "certs/ca.pem"
        path = H.write_config(cfg, d)
        rc, out, err = H.run_cli(["--check-config", "-c", path], cwd="/")
        self.assertEqual(rc, 0, "stdout:\n%s\nstderr:\n%s" % (out, err))


def mutate(fn):
    cfg = good_config()
    fn(cfg)
    return cfg


class BadConfigTest(H.SparkgateTestCase):
    def assertRejected(self, cfg, *paths):
        """--check-config exits 1 and names each JSON path (and the file)
        on some line of stderr."""
        d = H.tempdir("sg-conf-")
        rc, out, err = H.check_config(cfg, directory=d, name="bad-config.json")
        self.assertEqual(rc, 1, "want exit 1; stdout:\n%s\nstderr:\n%s" % (out, err))
        lines = err.splitlines()
        for path in paths:
            hits = [l for l in lines if path in l]
            self.assertTrue(hits, "no error names %r; stderr:\n%s" % (path, err))
            self.assertTrue(any("bad-config.json" in l for l in hits),
                            "the error for %r does not name the file; stderr:\n%s" % (path, err))
        return err

    def test_missing_cert_file(self):
        def f(c):
            c["listeners"][0]["tls"]["cert"] = "/nonexistent/sparkgate-test/server.pem"
        self.assertRejected(mutate(f), "listeners[0].tls.cert")

    def test_missing_key_file(self):
        def f(c):
            c["listeners"][0]["tls"]["key"] = "no-such-key.pem"
        self.assertRejected(mutate(f), "listeners[0].tls.key")

    def test_missing_backend_ca_file(self):
        def f(c):
            c["tenants"][0]["backends"][1]["tls"]["ca"] = "/nonexistent/ca.pem"
        self.assertRejected(mutate(f), "tenants[0].backends[1].tls.ca")

    def test_unknown_keys(self):
        self.assertRejected(mutate(lambda c: c.update(bogus_key=1)), "bogus_key")
        self.assertRejected(mutate(lambda c: c["listeners"][1].update(colour="red")),
                            "listeners[1].colour")
        self.assertRejected(mutate(lambda c: c["tenants"][0]["backends"][0].update(wieght=3)),
                            "tenants[0].backends[0].wieght")
        self.assertRejected(mutate(lambda c: c["listeners"][0]["tls"].update(ciphers="x")),
                            "listeners[0].tls.ciphers")

    def test_wrong_types(self):
        self.assertRejected(mutate(lambda c: c["listeners"][0].update(port="8443")),
                            "listeners[0].port")
        self.assertRejected(mutate(lambda c: c.update(workers="two")), "workers")
        self.assertRejected(mutate(lambda c: c.update(tenants={"name": "x"})), "tenants")
        self.assertRejected(mutate(lambda c: c["listeners"][1].update(insecure="yes")),
                            "listeners[1].insecure")

    def test_port_out_of_range(self):
        self.assertRejected(mutate(lambda c: c["listeners"][0].update(port=70000)),
                            "listeners[0].port")
        self.assertRejected(mutate(lambda c: c["listeners"][0].update(port=-1)),
                            "listeners[0].port")
        self.assertRejected(mutate(lambda c: c["tenants"][0]["backends"][0].update(port=65536)),
                            "tenants[0].backends[0].port")

    def test_listener_without_tls_needs_insecure_true(self):
        def no_tls(c):
            del c["listeners"][0]["tls"]
        self.assertRejected(mutate(no_tls), "listeners[0]")

        def insecure_false(c):
            c["listeners"][1]["insecure"] = False
        self.assertRejected(mutate(insecure_false), "listeners[1]")

        def both(c):
            c["listeners"][0]["insecure"] = True
        self.assertRejected(mutate(both), "listeners[0]")

    def test_listener_without_auth_needs_a_provider(self):
        # Safe by default: no "auth" means JWT, which needs a provider.
        self.assertRejected(mutate(lambda c: c["listeners"][0].pop("auth")),
                            "listeners[0].auth")

    def test_mtls_needs_client_certificates(self):
        self.assertRejected(
            mutate(lambda c: c["listeners"][0].update(auth={"methods": ["mtls"]})),
            "listeners[0].auth")

    def test_no_listeners(self):
        self.assertRejected(mutate(lambda c: c.update(listeners=[])), "listeners")

        def gone(c):
            del c["listeners"]
        self.assertRejected(mutate(gone), "listeners")

    def test_no_tenants(self):
        self.assertRejected(mutate(lambda c: c.update(tenants=[])), "tenants")

        def gone(c):
            del c["tenants"]
        self.assertRejected(mutate(gone), "tenants")
        self.assertRejected(mutate(lambda c: c["tenants"][0].update(backends=[])),
                            "tenants[0].backends")

    def test_every_error_is_printed(self):
        def two(c):
            c["listeners"][0]["port"] = 70000
            c["tenants"][0]["backends"][1]["port"] = "x"
        err = self.assertRejected(mutate(two), "listeners[0].port",
                                  "tenants[0].backends[1].port")
        lines = err.splitlines()
        a = [i for i, l in enumerate(lines) if "listeners[0].port" in l]
        b = [i for i, l in enumerate(lines) if "tenants[0].backends[1].port" in l]
        self.assertTrue(set(a).isdisjoint(b), "both errors on one line:\n%s" % err)

    def test_malformed_json(self):
        d = H.tempdir("sg-conf-")
        rc, out, err = H.check_config('{"listeners": [ {"name": "x",, } ]', directory=d,
                                      name="broken.json")
        self.assertEqual(rc, 1, err)
        self.assertIn("broken.json", err)

    def test_missing_config_file(self):
        path = os.path.join(H.tempdir(), "does-not-exist.json")
        rc, out, err = H.run_cli(["--check-config", "-c", path])
        self.assertEqual(rc, 1, err)
        self.assertIn("does-not-exist.json", err)


class ConfigFileIsAFifoTest(H.SparkgateTestCase):
    """Nothing sparkgate reads at load blocks on a FIFO nobody writes to (a
    left-over named pipe, a wrong path under /run), which would hang
    --check-config, a start, or a SIGHUP reload on the main loop (which
    also serves /healthz). The configuration file itself may be a pipe
    (`-c <(generate-config)`): one without a writer reads as empty, an
    invalid JSON error. A file named inside the configuration must be a
    regular file."""

    def test_config_file_fifo_without_writer_is_an_error(self):
        d = H.tempdir("sg-fifo-")
        fifo = os.path.join(d, "sparkgate.json")
        os.mkfifo(fifo)
        rc, out, err = H.run_cli(["--check-config", "-c", fifo], timeout=5)
        self.assertEqual(rc, 1, "stdout:\n%s\nstderr:\n%s" % (out, err))
        self.assertIn(fifo, err)
        self.assertIn("invalid JSON", err)

    def test_config_from_a_pipe_is_read(self):
        cfg = good_config()
        p = subprocess.run([H.sparkgate_bin(), "--check-config", "-c", "/dev/stdin"],
                           input=json.dumps(cfg), capture_output=True, text=True,
                           timeout=10)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("OK", p.stdout)

    def test_fifo_named_in_the_config_is_refused(self):
        d = H.tempdir("sg-fifo-")
        fifo = os.path.join(d, "server.pem")
        os.mkfifo(fifo)
        cfg = good_config()
        cfg["listeners"][0]["tls"]["cert"] = fifo
        rc, out, err = H.check_config(cfg, timeout=5)
        self.assertEqual(rc, 1, "stdout:\n%s\nstderr:\n%s" % (out, err))
        self.assertIn("listeners[0].tls.cert: cannot read '%s': is not a regular file"
                      % fifo, err)

    def test_fifo_as_identity_provider_ca_file_is_refused(self):
        d = H.tempdir("sg-fifo-")
        fifo = os.path.join(d, "idp-ca.pem")
        os.mkfifo(fifo)
        cfg = good_config()
        cfg["auth"] = {"jwt_providers": [{
            "name": "idp", "issuer": "https://idp.test", "audiences": ["spark"],
            "jwks_url": "https://idp.test/jwks", "ca_file": fifo}]}
        rc, out, err = H.check_config(cfg, timeout=5)
        self.assertEqual(rc, 1, "stdout:\n%s\nstderr:\n%s" % (out, err))
        self.assertIn("auth.jwt_providers[0].ca_file: cannot read '%s': is not a regular "
                      "file" % fifo, err)

    def test_fifo_nobody_reads_as_access_log_fails_the_start(self):
        d = H.tempdir("sg-fifo-")
        fifo = os.path.join(d, "access.fifo")
        os.mkfifo(fifo)
        cfg = good_config()
        cfg["access_log"] = {"path": fifo}
        rc, out, err = H.run_cli(["-c", H.write_config(cfg)], timeout=10)
        self.assertEqual(rc, 1, "stdout:\n%s\nstderr:\n%s" % (out, err))
        self.assertIn("a FIFO that nobody reads", err)


class WorkersFollowAffinityTest(H.SparkgateTestCase):
    def test_workers_0_counts_the_cpus_the_process_may_use(self):
        """configuration.md: `"workers": 0` is one worker per CPU the
        process may run on (its affinity: taskset, a container's cpuset),
        not every CPU of the machine."""
        cfg = good_config()
        cfg["workers"] = 0
        path = H.write_config(cfg)
        cpu = min(os.sched_getaffinity(0))
        p = subprocess.run([H.sparkgate_bin(), "--check-config", "-c", path],
                           capture_output=True, text=True, timeout=20,
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("workers: 1,", p.stdout)


class RefuseToStartTest(H.SparkgateTestCase):
    def test_bad_config_never_listens(self):
        port = H.free_port()
        cfg = good_config()
        cfg["listeners"] = [cfg["listeners"][0]]
        cfg["listeners"][0]["port"] = port
        cfg["listeners"][0]["tls"]["cert"] = "/nonexistent/sparkgate-test/server.pem"
        sg = H.Sparkgate(cfg)
        self._started.append(sg)
        self.addCleanup(sg.stop, check=False)
        sg.spawn()
        rc = sg.wait(15)
        sg.check_sanitizers()
        self.assertNotEqual(rc, 0, sg.log_text())
        self.assertIsNone(sg.find_log(r"listening on"), sg.log_text())
        self.assertIsNone(sg.find_log(r"\bready\b"), sg.log_text())
        self.assertIn("listeners[0].tls.cert", sg.log_text())
        self.assertFalse(H.port_is_open(port))


class SecondProcessOnTheSamePortTest(H.SparkgateTestCase):
    """A second sparkgate with a listener on an address:port that a running
    one serves refuses to start (exit 1, "already in use"), as any server
    does. Listeners set SO_REUSEPORT, with which the kernel would let it
    bind, say `ready` and get part of that port's clients, whatever its
    TLS, auth and tenants (a debugging copy with "auth": "none", an old
    binary left running)."""

    def test_second_process_refuses_a_port_in_use(self):
        up = self.standin()
        port = H.free_port()
        cfg = H.base_config(up.port, listeners=[H.h2c_listener("dev", port=port)],
                            workers=1)
        first = self.start_sparkgate(cfg)
        self.assertEqual(first.port("dev"), port)

        second = H.Sparkgate(cfg)
        self._started.append(second)
        self.addCleanup(second.stop, check=False)
        second.spawn()
        H.wait_until(lambda: not second.alive() or second.find_log(H.READY_RE), 15,
                     what="the second sparkgate to exit or be ready")
        self.assertIsNone(second.find_log(H.READY_RE),
                          "a second sparkgate took 127.0.0.1:%d, which the first one "
                          "serves; log:\n%s" % (port, second.log_text()))
        self.assertEqual(second.wait(5), 1, second.log_text())
        self.assertIsNotNone(
            second.find_log(r"listener dev: 127\.0\.0\.1:%d is already in use" % port),
            second.log_text())
        self.assertTrue(first.alive())


if __name__ == "__main__":
    H.main()
