#!/usr/bin/python3
"""Configuration loads, at start and at reload, at their edges: a CPU
affinity that changed since the start, certificates outside their dates
(warned at every load), keys that would ask for a passphrase (refused, never
a prompt), an access-log path that is a socket, an IPv6 backend address
with its zone.
"""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import grpc  # noqa: E402
import harness as H  # noqa: E402
import test_auth_jwt as AJ  # noqa: E402
import test_upstream_tls as UT  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

WAIT = 10.0


def h2c_config(backend_port, **top):
    return H.base_config(backend_port, listeners=[H.h2c_listener("dev")], **top)


def reload_and_wait(sg):
    mark = sg.mark()
    sg.send_signal(signal.SIGHUP)
    sg.wait_for_log(r"reload (done|failed)", timeout=WAIT, since=mark)
    return mark


def expired_cert(directory):
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(k.public_key()).serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2021, 1, 1))
            .sign(k, hashes.SHA256()))
    return H.write_cert_and_key(directory, "expired", cert, k)


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class WorkersZeroReloadTest(H.SparkgateTestCase):
    """configuration.md: `workers` 0 is "one per CPU the process may run
    on", and `workers` is a restart-only key: a reload refuses a *changed*
    value. With `workers` 0 (the default) in the file and nothing changed,
    a reload must succeed even when the process's CPU affinity changed since
    the start (Kubernetes' static CPU manager shrinks and grows the shared
    cpuset of running pods, `taskset -p`, systemd's AllowedCPUs=): the
    value written is what is compared, not the count derived from it."""

    def test_reload_with_auto_workers_survives_an_affinity_change(self):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self.skipTest("needs 2 CPUs in this process's affinity")
        up = self.standin()
        cfg = h2c_config(up.port)
        cfg["workers"] = 0
        sg = self.start_sparkgate(cfg)
        m = sg.wait_for_log(r"ready: (\d+) workers", timeout=10)
        self.assertEqual(int(m.group(1)), len(cpus))
        # The main thread (TID == PID) is the one that reloads.
        os.sched_setaffinity(sg.pid, {cpus[0]})
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        line = sg.wait_for_log(r"reload (done|failed.*)", timeout=10, since=mark)
        self.assertEqual(line.group(1), "done",
                         "a reload of an unchanged file with \"workers\": 0 failed "
                         "after the CPU affinity changed: %s" % line.group(0))


class CertificateDateWarningTest(H.SparkgateTestCase):
    """security.md: "A certificate outside its dates (a listener's
    `tls.cert`, ...) loads with a warning naming the file and the date
    (`... expired on 2021-01-01 00:00:00 UTC: ...`), at start and at each
    reload", also a reload right after the start: an operator who reloads
    to see whether the certificate is still a problem is told."""

    def test_expired_listener_certificate_is_warned_at_the_reload_too(self):
        cert, key = expired_cert(H.tempdir())
        st = self.standin()
        listener = {"name": "public", "address": "127.0.0.1", "port": 0,
                    "tls": {"cert": cert, "key": key}, "auth": "none"}
        sg = self.start_sparkgate(H.base_config(st.port, listeners=[listener]))
        sg.wait_for_log(r"expired on 2021-01-01 00:00:00 UTC", timeout=WAIT)
        mark = reload_and_wait(sg)
        self.assertIsNotNone(sg.find_log(r"reload done", since=mark), sg.log_text())
        self.assertIsNotNone(
            sg.find_log(r"expired\.pem' expired on 2021-01-01 00:00:00 UTC", since=mark),
            "no certificate-date warning at the reload")


class EncryptedJwtPemFileTest(H.SparkgateTestCase):
    """An encrypted private key given as a JWT provider's pem_file (a
    mistake: it must be the issuer's public key) must fail the load at
    once, like an encrypted TLS key (docs/security.md: "fails the load at
    once ..., at start or reload, instead of waiting for a passphrase"):
    OpenSSL's default would prompt and read stdin, and with stdin an open
    pipe (a supervisor's, docker -i) a reload would block the main loop for
    ever."""

    def test_reload_to_encrypted_private_key_as_pem_file_fails_without_prompting(self):
        d = H.tempdir("sg-rev3-pem-")
        ec = AJ.new_ec()
        good = AJ.write_file(os.path.join(d, "idp.pub.pem"), AJ.public_pem(ec))
        plain = os.path.join(d, "idp.key")
        with open(plain, "wb") as f:
            f.write(_private_pem(ec))
        enc = os.path.join(d, "idp-enc.key")
        subprocess.run(["openssl", "pkey", "-in", plain, "-out", enc, "-aes256",
                        "-passout", "pass:secret"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        up = self.standin()
        providers = [{"name": "p", "issuer": AJ.ISS_EC, "audiences": [AJ.AUD],
                      "keys": [{"alg": "ES256", "pem_file": good}]}]
        cfg = H.base_config(up.port, workers=1, listeners=[AJ.jwt_listener()],
                            auth=AJ.auth_section(providers))
        sg = UT.StdinPipeSparkgate(cfg)
        self.addCleanup(sg.stop, check=False)
        sg.start()
        providers[0]["keys"][0]["pem_file"] = enc
        with open(sg.config_path, "w") as f:
            json.dump(cfg, f)
        mark = sg.mark()
        sg.send_signal(signal.SIGHUP)
        sg.wait_for_log(r"reload failed", timeout=5, since=mark)
        self.assertIsNone(sg.find_log(r"pass phrase", since=mark))
        self.assertIsNotNone(sg.find_log(r"idp-enc\.key", since=mark))


class AccessLogSocketMessageTest(unittest.TestCase):
    """open(2) of a UNIX socket file fails with ENXIO, the errno a FIFO
    without a reader gives under O_NONBLOCK. access_log.path naming a
    socket (`/dev/log`, or `/dev/stdout`/`/dev/stderr` under systemd, whose
    journal streams are sockets) fails the start with a message that says
    what the path is (a socket), not "a FIFO that nobody reads"."""

    def test_socket_as_access_log_is_not_called_a_fifo(self):
        d = H.tempdir("sg-sock-")
        path = os.path.join(d, "log.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(srv.close)
        srv.bind(path)
        srv.listen(1)
        cfg = h2c_config(9, access_log={"path": path})
        conf = H.write_config(cfg, d)
        rc, _, err = H.run_cli(["-c", conf], timeout=20)
        self.assertNotEqual(rc, 0, "started with a socket as the access log:\n" + err)
        lines = [l for l in err.splitlines() if "access log" in l and path in l]
        self.assertTrue(lines, "no line names the access log path:\n" + err)
        self.assertNotIn("FIFO", lines[0],
                         "a UNIX socket is reported as a FIFO: %s" % lines[0])


class ScopedIpv6BackendAddressTest(H.SparkgateTestCase):
    """A backend address is "an IP address or a host name" (docs/routing.md);
    an IPv6 address with a zone ("fe80::1%eth0", the only way to name a
    link-local backend) is an IP address, which libevent's resolver takes:
    it loads and routes. Shown on loopback: "::1%lo"."""

    def test_ipv6_address_with_zone_loads_and_routes(self):
        up = H.start_standin(host="::1")
        self.addCleanup(H.stop_standin, up)
        cfg = H.base_config(up.port, backend_address="::1%lo", workers=1)
        rc, out, err = H.check_config(cfg)
        self.assertEqual(rc, 0, err)
        sg = self.start_sparkgate(cfg)
        ch = H.tls_channel(sg.port("public"))
        self.addCleanup(ch.close)
        r = H.call_unary(ch, "Config", b"zone", timeout=10)
        self.assertEqual(r.code, grpc.StatusCode.OK, r)


if __name__ == "__main__":
    H.main()
