#!/usr/bin/python3
"""An operator's common mistakes (a certificate and key swapped, a typo in
a key, a port already taken, a backend whose TLS setting does not match
the server, a piped config reloaded, a client CA that nothing reads) each
give one error or warning that says where and what to change:
configuration.md promises that "Each error names the file, the JSON path
of the key (`listeners[0].tls.cert`) and what to do about it", and a
misspelt or misplaced key "must not turn a protection off silently".
"""

import os
import signal
import socket
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
from test_config_checks import good_config  # noqa: E402

import grpc  # noqa: E402

WAIT = 10.0
JWT_FIXTURES = os.path.join(H.SOURCE_ROOT, "tests", "fixtures", "jwt")


def provider(**extra):
    p = {"name": "idp", "issuer": "https://idp.test", "audiences": ["spark"],
         "keys": [{"alg": "ES256", "pem_file": os.path.join(JWT_FIXTURES, "ec256.pub.pem")}]}
    p.update(extra)
    return p


class Base(H.SparkgateTestCase):
    def check(self, cfg):
        d = H.tempdir("sg-review-op-")
        return H.check_config(cfg, directory=d, name="sparkgate.json")

    def error_lines(self, err, path):
        """The error lines that name |path| as a JSON path (followed by ':')."""
        return [l for l in err.splitlines() if (path + ":") in l]


# ---------------------------------------------------------------------------
# Certificate and key swapped: the commonest PEM mistake

class SwappedCertAndKeyTest(Base):
    """configuration.md: each error names "the JSON path of the key
    (`listeners[0].tls.cert`) and what to do about it". A certificate and
    key given the wrong way round (or a key where the certificate goes) is
    reported under `listeners[0].tls` as `cannot load certificate chain
    'server.key': error:0480006C:PEM routines::no start line`: neither the
    key at fault nor what the file holds. The JWT loader already says
    "holds a private key; give the public key only"; the TLS loaders
    should say as much (the file holds a private key, not a certificate)
    under `.tls.cert` / `.tls.key`."""

    def test_listener_cert_and_key_swapped(self):
        p = H.pki()
        cfg = good_config()
        cfg["listeners"][0]["tls"].update(cert=p.server_key, key=p.server_cert)
        rc, out, err = self.check(cfg)
        self.assertEqual(rc, 1, err)
        hits = self.error_lines(err, "listeners[0].tls.cert")
        self.assertTrue(hits, "no error names listeners[0].tls.cert:\n" + err)
        self.assertRegex(" ".join(hits), r"(?i)private key",
                         "the error does not say that the file given as the certificate "
                         "holds a private key:\n" + err)

    def test_backend_client_cert_and_key_swapped(self):
        p = H.pki()
        cfg = good_config()
        cfg["tenants"][0]["backends"][0]["tls"] = {"ca": p.ca_cert, "cert": p.server_key,
                                                   "key": p.server_cert}
        rc, out, err = self.check(cfg)
        self.assertEqual(rc, 1, err)
        hits = self.error_lines(err, "tenants[0].backends[0].tls.cert")
        self.assertTrue(hits, "no error names tenants[0].backends[0].tls.cert:\n" + err)
        self.assertRegex(" ".join(hits), r"(?i)private key",
                         "the error does not say that the file given as the certificate "
                         "holds a private key:\n" + err)


# ---------------------------------------------------------------------------
# A typo in a JWT provider's key

class JwtProviderUnknownKeyPathTest(Base):
    """configuration.md: "Each error names the file, the JSON path of the
    key"; everywhere else an unknown key is reported at its own path
    (`listeners[0].tls.crt: unknown key`, `tenants[0].backend: unknown
    key`). In `auth.jwt_providers[]` and its `keys[]` the path stops at the
    provider (`auth.jwt_providers[0]: unknown key "audience"`), so a search
    for the path an operator typed, or a tool that reads the path before
    the colon, does not find it."""

    def test_typo_in_provider_and_key(self):
        cfg = good_config()
        cfg["listeners"][0]["auth"] = {"methods": ["jwt"]}
        p = provider()
        p["audience"] = p.pop("audiences")
        p["keys"][0]["pemfile"] = p["keys"][0].pop("pem_file")
        cfg["auth"] = {"jwt_providers": [p]}
        rc, out, err = self.check(cfg)
        self.assertEqual(rc, 1, err)
        for path in ("auth.jwt_providers[0].audience", "auth.jwt_providers[0].keys[0].pemfile"):
            self.assertTrue(self.error_lines(err, path),
                            "no error names the unknown key at its path %s:\n%s" % (path, err))


# ---------------------------------------------------------------------------
# The admin port is taken

class AdminPortInUseTest(Base):
    """A start whose admin port another process holds fails (exit 1) with
    `error sparkgate: admin: admin: cannot listen on 127.0.0.1:P: Address
    already in use`: the prefix twice, and nothing says which setting to
    change. The client listener's line is `listener NAME: ADDR:PORT is
    already in use (another sparkgate?)`; the admin one should be as clear
    and name `admin.port`."""

    def test_admin_port_in_use(self):
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        up = self.standin()
        cfg = H.base_config(up.port, listeners=[H.h2c_listener("dev")], workers=1,
                            admin={"address": "127.0.0.1", "port": port})
        sg = H.Sparkgate(cfg)
        self._started.append(sg)
        self.addCleanup(sg.stop, check=False)
        sg.spawn()
        self.assertEqual(sg.wait(15), 1, sg.log_text())
        line = sg.find_log(r"127\.0\.0\.1:%d" % port)
        self.assertIsNotNone(line, sg.log_text())
        text = sg.log_text()
        self.assertNotIn("admin: admin:", text)
        self.assertIn("admin.port", text,
                      "the error does not say which setting to change:\n" + text)


# ---------------------------------------------------------------------------
# A backend whose TLS setting does not match the server

class BackendTlsMismatchTest(Base):
    """routing.md: a backend without `tls` is h2c, with `tls` TLS. Getting
    it wrong is common (Spark Connect with or without TLS). sparkgate tells
    a client that does so exactly what to fix ("the client does not speak
    TLS ...: it should connect with TLS"); for its own backends the log
    says only `TLS handshake failed: error:0A00010B:SSL routines::wrong
    version number` (tls given, the backend is h2c) or `the backend closed
    the connection` (no tls, the backend wants TLS). Each call is 14,
    which PySpark retries for ever, so the log line is all the operator
    has: it should say the backend does not seem to speak TLS (remove
    `tls`), or that it closed before its HTTP/2 SETTINGS, perhaps because
    it expects TLS (add `tls`)."""

    def call_once(self, sg):
        ch = H.h2c_channel(sg.port("dev"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"x", timeout=10)
        self.assertEqual(r.code, grpc.StatusCode.UNAVAILABLE, r)
        return sg.wait_for_log(r"grpc-status 14: .*", timeout=WAIT).group(0)

    def test_tls_to_an_h2c_backend(self):
        up = self.standin()   # h2c
        sg = self.start_sparkgate(H.base_config(
            up.port, listeners=[H.h2c_listener("dev")], workers=1,
            backend_tls={"ca": H.pki().ca_cert, "sni": "localhost"}))
        line = self.call_once(sg)
        self.assertRegex(line, r"(?i)(not|n't)\b[^;]*\bTLS\b|h2c|cleartext",
                         "the log does not say the backend does not answer with TLS")

    def test_h2c_to_a_tls_backend(self):
        up = self.standin(tls=True)
        sg = self.start_sparkgate(H.base_config(
            up.port, listeners=[H.h2c_listener("dev")], workers=1))
        line = self.call_once(sg)
        self.assertRegex(line, r"\bTLS\b|\btls\b|SETTINGS",
                         "the log does not hint that the backend may expect TLS")


# ---------------------------------------------------------------------------
# A config given as a pipe, then reloaded

class PipedConfigReloadTest(Base):
    """configuration.md: "The config file itself may be a pipe (`-c
    <(generate-config)`)", and SIGHUP "loads the file again". A pipe
    cannot be read twice: every SIGHUP then fails with `reload: config
    error: FILE:1:0: invalid JSON: '[' or '{' expected near end of file`,
    which sends the operator looking for a JSON mistake. The reload should
    say that the configuration came from a pipe and cannot be read again
    (restart, or give a regular file)."""

    def test_reload_says_the_pipe_cannot_be_read_again(self):
        up = self.standin()
        cfg = H.base_config(up.port, listeners=[H.h2c_listener("dev")], workers=1)
        sg = H.Sparkgate(cfg)
        with open(sg.config_path, "rb") as f:
            text = f.read()
        # `-c <(generate-config)`: the config comes through a pipe (stdin here).
        sg.proc = subprocess.Popen(H._argv(["-c", "/dev/stdin"]), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=H._child_env())
        with H._lock:
            H._live_procs.add(sg.proc)
        for stream, sink in ((sg.proc.stderr, sg.lines), (sg.proc.stdout, sg.stdout_lines)):
            t = threading.Thread(target=sg._read, args=(stream, sink, H.VERBOSE), daemon=True)
            t.start()
            sg._readers.append(t)
        self._started.append(sg)
        self.addCleanup(sg.stop)
        sg.proc.stdin.write(text)
        sg.proc.stdin.close()
        sg.wait_for_log(H.READY_RE, timeout=H.START_TIMEOUT)
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload failed", timeout=WAIT, since=mark)
        errors = [l for l in sg.lines[mark:] if "reload: config error" in l]
        self.assertTrue(errors, sg.log_text())
        self.assertRegex(" ".join(errors), r"(?i)pipe|FIFO|cannot be read again|restart",
                         "the reload error does not say the config was a pipe:\n"
                         + "\n".join(errors))


# ---------------------------------------------------------------------------
# client_ca without client_certificates

class ClientCaWithoutClientCertificatesTest(Base):
    """configuration.md: "a misspelt key must not turn a protection off
    silently", and routing.md refuses a backend's `ca` with `"verify":
    false` "since it would never be read". A listener's `client_ca` (and
    `crl`) without `client_certificates` (default `none`) is the same
    contradiction: the operator who wrote a client CA expects client
    certificates, but none is asked for, and neither the load nor the
    --check-config summary says so. It should be refused (or at least
    warned about, naming `listeners[0].tls.client_ca`)."""

    def test_bad_client_ca_fails_the_load_in_every_mode(self):
        """configuration.md (tls.client_ca): with `client_certificates`
        "none" it is still "loaded and checked", so that the reload that
        later turns client certificates on cannot be the first to fail on
        it: a client_ca holding a private key fails the load at
        listeners[0].tls.client_ca, saying what it holds."""
        p = H.pki()
        cfg = good_config()
        cfg["listeners"][0]["tls"]["client_ca"] = p.server_key   # not a CA bundle
        rc, out, err = self.check(cfg)
        self.assertEqual(rc, 1, "a client_ca holding no certificate was accepted with "
                         "client_certificates none:\n%s\n%s" % (out, err))
        hits = self.error_lines(err, "listeners[0].tls.client_ca")
        self.assertTrue(hits, err)
        self.assertIn("it holds a private key, not CA certificates", hits[0])

    def test_client_ca_with_client_certificates_none(self):
        p = H.pki()
        cfg = good_config()
        cfg["listeners"][0]["tls"]["client_ca"] = p.ca_cert
        rc, out, err = self.check(cfg)
        said = (rc == 1 and "client_ca" in err) or \
            ("client_ca" in out + err and "WARN" in (out + err).upper())
        self.assertTrue(said, "a client_ca that is never used loaded silently:\nrc=%d\n%s\n%s"
                        % (rc, out, err))


if __name__ == "__main__":
    H.main()
