"""Integration-test harness: the real sparkgate binary, the stand-in Spark
Connect server, gRPC and raw HTTP/2 clients, all over loopback.

Conventions
  * Each tests/integration/test_*.py is a unittest module run as a script
    by /usr/bin/python3 (`harness.main()` at the bottom); it exits non-zero
    when anything fails.
  * SPARKGATE_BIN is the binary (default: <source root>/build/sparkgate),
    SG_SOURCE_ROOT the source root (default: derived from this file).
  * SG_TEST_VERBOSE=1 copies sparkgate's stderr to ours as it arrives.
  * Every wait is bounded; every process started here is stopped by PID in
    the test's cleanup and again at exit; every temp dir is removed at exit.
  * A sanitizer report (AddressSanitizer, LeakSanitizer, UBSan's
    "runtime error:") anywhere in sparkgate's stderr fails the test.

Main API
  tempdir()                         -> new dir, removed at exit
  pki()                             -> certs.Pki made once per test process
  start_standin(tls=False, client_ca=None, host=...) -> StandIn (port 0)
  base_config(backend_port, ...)    -> config dict (TLS listener "public")
  Sparkgate(config).start()         -> running proxy; .port(name),
                                       .wait_for_log(regex, timeout), .lines,
                                       .send_signal(sig), .stop() -> exit code
  check_config(config)              -> (rc, stdout, stderr) of --check-config
  run_cli(args)                     -> (rc, stdout, stderr)
  tls_channel(port, ...) / h2c_channel(port) -> grpc.Channel
  call_unary / call_server_stream / call_client_stream / call_bidi
                                    -> CallResult (code, details, metadata, ...)
  H2Client(port, tls=True)          -> raw HTTP/2 requests, frame-level facts
  tls_probe(port, alpn=..., max_version=...) -> what a TLS handshake got
  SparkgateTestCase                 -> unittest base: self.start_sparkgate(),
                                       self.standin(), logs dumped on failure
"""

import atexit
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings

# gRPC core logs expected handshake failures to stderr; keep the output to
# what the tests say (SG_TEST_VERBOSE or GRPC_VERBOSITY=ERROR brings it back).
if os.environ.get("SG_TEST_VERBOSE") in (None, "", "0"):
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# Old TLS versions are used on purpose (to see them refused).
warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"ssl\.TLSVersion")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.environ.get("SG_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))
STANDIN_DIR = os.path.join(SOURCE_ROOT, "tests", "standin")
for _p in (HERE, STANDIN_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import grpc  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.exceptions  # noqa: E402

import certs  # noqa: E402
import spark_proto  # noqa: E402
import spark_standin  # noqa: E402
from spark_standin import StandIn, stream_bytes, stream_sha256  # noqa: E402

# Re-exported for tests: the stand-in's deterministic `stream` payload.
STREAM_HELPERS = (stream_bytes, stream_sha256)

SERVICE = spark_standin.SERVICE_PREFIX
# A bidi method for forwarding tests: Spark Connect has none, so it lives
# under a test prefix that base_config allows (not scanned as Spark).
BIDI_PATH = spark_standin.BIDI_PATH
TEST_PREFIX = spark_standin.TEST_PREFIX
MIB = 1024 * 1024

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                      "runtime error:", "WARNING: ThreadSanitizer")

LISTENER_RE = re.compile(
    r"listener (\S+) listening on (\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d+) \((tls|h2c)\)")
READY_RE = re.compile(r"sparkgate\b.*\bready\b")

START_TIMEOUT = float(os.environ.get("SG_TEST_START_TIMEOUT", "20"))
STOP_TIMEOUT = 15.0

VERBOSE = os.environ.get("SG_TEST_VERBOSE") not in (None, "", "0")


def sparkgate_bin():
    return os.environ.get("SPARKGATE_BIN") or os.path.join(SOURCE_ROOT, "build", "sparkgate")


# ---------------------------------------------------------------------------
# Cleanup of everything this process starts

_lock = threading.Lock()
_live_procs = set()
_live_standins = set()
_tempdirs = []


def _cleanup_all():
    with _lock:
        procs = list(_live_procs)
        standins = list(_live_standins)
        dirs = list(_tempdirs)
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    for s in standins:
        try:
            s.stop(grace=0)
        except Exception:
            pass
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_all)


def _on_sigterm(signum, frame):
    # meson's timeout sends SIGTERM: leave through atexit so children die too.
    raise SystemExit(128 + signum)


if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)


def tempdir(prefix="sg-test-"):
    d = tempfile.mkdtemp(prefix=prefix)
    with _lock:
        _tempdirs.append(d)
    return d


def write_cert_and_key(directory, name, cert, key):
    """Writes a `cryptography` certificate and private key as NAME.pem and
    NAME.key (PEM, PKCS#8, unencrypted) in |directory|; returns the paths."""
    from cryptography.hazmat.primitives import serialization
    cpath = os.path.join(directory, name + ".pem")
    kpath = os.path.join(directory, name + ".key")
    with open(cpath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kpath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cpath, kpath


_pki = None


def pki():
    """The test PKI, made on first use in this process (never cached on disk)."""
    global _pki
    if _pki is None:
        _pki = certs.make_pki(tempdir("sg-pki-"))
    return _pki


def free_port(host="127.0.0.1"):
    """A port nothing listens on right now (bound then closed)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError("%s not met within %.1fs" % (what, timeout))
        time.sleep(interval)


def port_is_open(port, host="127.0.0.1", timeout=1.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _established(port, side="remote"):
    """The socket inodes of this host's ESTABLISHED TCP connections whose
    remote (or local) port is |port|, one per connection side."""
    col = 2 if side == "remote" else 1
    inodes = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "01" and int(cols[col].rsplit(":", 1)[1], 16) == port:
                        inodes.append(cols[9])
        except OSError:
            pass
    return inodes


def established_connections_to(port):
    """How many ESTABLISHED TCP connections on this host have remote port
    |port| (client sides of connections to a local server on |port|)."""
    return len(_established(port))


# ---------------------------------------------------------------------------
# The stand-in server

def start_standin(tls=False, client_ca=None, host="127.0.0.1", cert=None, key=None):
    """Starts an in-process stand-in on port 0. tls=True serves the test
    PKI's server certificate (or cert/key); client_ca requires client certs."""
    if tls and cert is None:
        cert, key = pki().server_cert, pki().server_key
    s = StandIn(host=host, port=0, tls_cert=cert if tls else None,
                tls_key=key if tls else None, tls_client_ca=client_ca).start()
    with _lock:
        _live_standins.add(s)
    return s


def stop_standin(s):
    s.stop(grace=0.2)
    with _lock:
        _live_standins.discard(s)


# ---------------------------------------------------------------------------
# Config

def base_config(backend_port, backend_address="127.0.0.1", backend_tls=None,
                listeners=None, workers=2, **top):
    """A config with one TLS listener "public" on 127.0.0.1 port 0 (test
    PKI's server certificate) and one tenant "default" with one backend
    "spark-1". Extra keyword arguments become top-level keys."""
    if listeners is None:
        listeners = [tls_listener("public")]
    backend = {"name": "spark-1", "address": backend_address, "port": backend_port}
    if backend_tls is not None:
        backend["tls"] = backend_tls
    cfg = {
        "workers": workers,
        "log_level": "info",
        "drain_timeout_ms": 10000,
        "allowed_path_prefixes": [SERVICE, TEST_PREFIX],
        "listeners": listeners,
        # The core tests send raw bytes to exercise forwarding: user_id
        # "off" keeps the bytes as sent, and any caller is admitted.
        "tenants": [{"name": "default", "backends": [backend],
                     "allow": {"any_identity": True}, "user_id": "off"}],
    }
    cfg.update(top)
    return cfg


def tls_listener(name, address="127.0.0.1", port=0, auth="none", **tls_extra):
    """auth: the listener's "auth" value; "none" (the default here) is the
    explicit opt-out the core tests use, since they test forwarding."""
    p = pki()
    tls = {"cert": p.server_cert, "key": p.server_key}
    tls.update(tls_extra)
    return {"name": name, "address": address, "port": port, "tls": tls,
            "auth": auth}


def h2c_listener(name, address="127.0.0.1", port=0, auth="none"):
    return {"name": name, "address": address, "port": port, "insecure": True,
            "auth": auth}


_SYS_pidfd_open, _SYS_pidfd_getfd = 434, 438


def tcp_socket_options(pid, port, side="remote"):
    """The TCP options of |pid|'s established sockets whose remote port
    (side="remote": its connections to a server on |port|) or local port
    (side="local": connections it accepted on |port|) is |port|, read
    through copies of its descriptors (pidfd_getfd): a list of dicts with
    nodelay, keepalive, keepidle, keepintvl, keepcnt, user_timeout. None when this
    kernel or sandbox does not allow the copy."""
    inodes = set(_established(port, side))
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_SYS_pidfd_open, pid, 0)
    if pidfd < 0:
        return None
    found = []
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if not (target.startswith("socket:[") and target[8:-1] in inodes):
                continue
            mine = libc.syscall(_SYS_pidfd_getfd, pidfd, int(fd), 0)
            if mine < 0:
                return None
            s = socket.socket(fileno=mine)
            try:
                found.append({
                    "nodelay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "keepidle": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "keepintvl": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    "keepcnt": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    "user_timeout": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)})
            finally:
                s.close()
    finally:
        os.close(pidfd)
    return found


def resolver_wrap(resolv_conf):
    """An argv prefix that runs the rest in a mount namespace of its own
    whose /etc/resolv.conf is |resolv_conf| (the test's DNS server), and
    execs it: the PID stays the child's. Needs root; see
    mount_namespace_available()."""
    return ["unshare", "--mount", "--", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf]


def mount_namespace_available():
    """Whether resolver_wrap can work here (root, unshare, mount)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    try:
        r = subprocess.run(["unshare", "--mount", "--", "sh", "-c",
                            "mount --bind /etc/hostname /etc/resolv.conf"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def write_config(config, directory=None, name="sparkgate.json"):
    """Writes a dict (as JSON) or a str (verbatim) and returns the path."""
    directory = directory or tempdir("sg-conf-")
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        if isinstance(config, str):
            f.write(config)
        else:
            json.dump(config, f, indent=2)
    return path


# ---------------------------------------------------------------------------
# The sparkgate process

def sanitizer_reports(text):
    return [line for line in text.splitlines()
            if any(pat in line for pat in SANITIZER_PATTERNS)]


def _child_env(extra=None):
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "abort_on_error=0:detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    if extra:
        env.update(extra)
    return env


def _argv(args):
    argv = [sparkgate_bin()] + list(args)
    # If this test process dies hard, the kernel kills sparkgate too. setpriv
    # execs, so the PID stays sparkgate's. The death signal follows the
    # thread that forked, hence main thread only.
    if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", "--"] + argv
    return argv


def run_cli(args, timeout=20, env=None, check_sanitizers=True, cwd=None):
    """Runs sparkgate with |args| to completion: (rc, stdout, stderr)."""
    binary = sparkgate_bin()
    if not os.access(binary, os.X_OK):
        raise AssertionError("sparkgate binary not found or not executable: %s "
                             "(set SPARKGATE_BIN)" % binary)
    p = subprocess.Popen(_argv(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_child_env(env), cwd=cwd)
    with _lock:
        _live_procs.add(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=10)
        raise AssertionError("sparkgate %s did not finish within %ss; stderr:\n%s" % (
            " ".join(args), timeout, err.decode(errors="replace")))
    finally:
        with _lock:
            _live_procs.discard(p)
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    if check_sanitizers:
        reports = sanitizer_reports(err)
        if reports:
            raise AssertionError("sanitizer report from sparkgate %s:\n%s" % (
                " ".join(args), err))
    return p.returncode, out, err


def check_config(config, directory=None, name="sparkgate.json", timeout=20):
    """`sparkgate --check-config -c FILE` on a dict (or raw JSON text):
    (rc, stdout, stderr). The file goes into a fresh temp dir unless
    |directory| is given."""
    path = write_config(config, directory, name)
    return run_cli(["--check-config", "-c", path], timeout=timeout)


class Sparkgate:
    """One sparkgate process running a config. start() waits (bounded) for a
    `listener NAME listening on ADDR:PORT (...)` line for every configured
    listener and for `sparkgate ... ready`."""

    def __init__(self, config, args=(), env=None, config_dir=None, wrap=()):
        self.config = config
        self.config_path = write_config(config, config_dir)
        self.args = list(args)
        self.env = env
        self.wrap = list(wrap)   # argv prefix that execs the rest (resolver_wrap)
        self.proc = None
        self.lines = []          # stderr lines, as they came
        self.stdout_lines = []
        self.listeners = {}      # name -> (addr, port, "tls"|"h2c")
        self.returncode = None
        self._cond = threading.Condition()
        self._readers = []
        self._sanitizer_checked = False

    # -- start / stop ------------------------------------------------------
    def spawn(self):
        binary = sparkgate_bin()
        if not os.access(binary, os.X_OK):
            raise AssertionError("sparkgate binary not found or not executable: %s "
                                 "(set SPARKGATE_BIN)" % binary)
        self.proc = subprocess.Popen(
            self.wrap + _argv(["-c", self.config_path] + self.args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(self.env))
        with _lock:
            _live_procs.add(self.proc)
        for stream, sink, echo in ((self.proc.stderr, self.lines, VERBOSE),
                                   (self.proc.stdout, self.stdout_lines, False)):
            t = threading.Thread(target=self._read, args=(stream, sink, echo), daemon=True)
            t.start()
            self._readers.append(t)
        return self

    def start(self, timeout=START_TIMEOUT):
        self.spawn()
        expected = [l.get("name") for l in self.config.get("listeners", [])
                    if isinstance(l, dict)]
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._scan_listeners()
                ready = any(READY_RE.search(l) for l in self.lines)
                if ready and all(n in self.listeners for n in expected):
                    return self
                if self.proc.poll() is not None:
                    self._cond.wait(0.2)  # let the readers catch the last lines
                    raise AssertionError("sparkgate exited (%s) before it was ready; log:\n%s"
                                         % (self.proc.returncode, self.log_text()))
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise AssertionError(
                        "sparkgate not ready within %.0fs (want listeners %s and a "
                        "'sparkgate ... ready' line); log:\n%s"
                        % (timeout, expected, self.log_text()))
                self._cond.wait(min(left, 0.1))

    def _read(self, stream, sink, echo):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if echo:
                sys.stderr.write("[sparkgate] %s\n" % line)
            with self._cond:
                sink.append(line)
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    def _scan_listeners(self):
        for line in self.lines:
            m = LISTENER_RE.search(line)
            if m and m.group(1) not in self.listeners:
                addr = m.group(2).strip("[]")
                self.listeners[m.group(1)] = (addr, int(m.group(3)), m.group(4))

    @property
    def pid(self):
        return self.proc.pid

    def port(self, name="public"):
        with self._cond:
            self._scan_listeners()
        if name not in self.listeners:
            raise AssertionError("no 'listener %s listening on' line; log:\n%s"
                                 % (name, self.log_text()))
        return self.listeners[name][1]

    def address(self, name="public"):
        self.port(name)
        return self.listeners[name][0]

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        """Waits for exit; returns the exit code (negative: killed by signal)
        or raises TimeoutError. Joins the log readers (bounded)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError("sparkgate pid %d still running after %.1fs"
                               % (self.proc.pid, timeout))
        for t in self._readers:
            t.join(5)
        self.returncode = rc
        with _lock:
            _live_procs.discard(self.proc)
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            try:
                self.wait(10)
            except TimeoutError:
                pass

    def stop(self, timeout=STOP_TIMEOUT, check=True):
        """SIGTERM, bounded wait, then SIGKILL. Returns the exit code (the
        first one if it had already exited). With |check|, raises
        AssertionError on a sanitizer report or when it had to be killed."""
        if self.proc is None:
            return None
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout)
            except TimeoutError:
                killed = True
                self.kill()
        else:
            self.wait(10)
        rc = self.returncode
        if check:
            self.check_sanitizers()
            if killed:
                raise AssertionError("sparkgate did not exit within %.0fs of SIGTERM "
                                     "(killed); log:\n%s" % (timeout, self.log_text()))
        return rc

    def check_sanitizers(self):
        with self._cond:
            text = "\n".join(self.lines + self.stdout_lines)
        reports = sanitizer_reports(text)
        if reports:
            raise AssertionError("sanitizer report in sparkgate output:\n%s" % text)

    # -- logs --------------------------------------------------------------
    def log_text(self, last=None):
        with self._cond:
            lines = list(self.lines if last is None else self.lines[-last:])
        return "\n".join(lines)

    def mark(self):
        """Position in the log; pass as since= to only look at newer lines."""
        with self._cond:
            return len(self.lines)

    def find_log(self, regex, since=0):
        rx = re.compile(regex) if isinstance(regex, str) else regex
        with self._cond:
            for line in self.lines[since:]:
                m = rx.search(line)
                if m:
                    return m
        return None

    def wait_for_log(self, regex, timeout=10.0, since=0):
        """The first match of |regex| in a stderr line (from |since| on);
        raises AssertionError with the log after |timeout| seconds."""
        rx = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no log line matching %r within %.1fs; log:\n%s"
                                         % (rx.pattern, timeout, "\n".join(self.lines)))
                self._cond.wait(min(left, 0.1))


# ---------------------------------------------------------------------------
# gRPC clients

CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
    # Each channel its own connection: "on one connection" means it.
    ("grpc.use_local_subchannel_pool", 1),
]


def tls_channel(port, host="127.0.0.1", server_name="localhost", root=None,
                client_cert=None, client_key=None, options=()):
    """A gRPC channel over TLS to host:port that trusts the test CA (or the
    PEM bytes in |root|) and checks the certificate for |server_name|."""
    p = pki()
    creds = grpc.ssl_channel_credentials(
        root_certificates=root if root is not None else p.read("ca_cert"),
        private_key=open(client_key, "rb").read() if client_key else None,
        certificate_chain=open(client_cert, "rb").read() if client_cert else None)
    opts = list(CLIENT_OPTIONS) + list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    target = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    return grpc.secure_channel(target, creds, options=opts)


def h2c_channel(port, host="127.0.0.1", options=()):
    target = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    return grpc.insecure_channel(target, options=list(CLIENT_OPTIONS) + list(options))


def standin_md(mode=None, **kw):
    """Metadata for the stand-in: standin_md('stream', bytes=N, chunk=M)
    -> [('x-standin-mode','stream'), ('x-standin-bytes','N'), ...]."""
    md = []
    if mode:
        md.append(("x-standin-mode", mode))
    for k, v in kw.items():
        key = "x-standin-" + k.replace("_", "-")
        md.append((key, v if isinstance(v, bytes) else str(v)))
    return md


class CallResult:
    """What a gRPC call ended with. code is a grpc.StatusCode; responses a
    list of bytes (unary: one element, or none on error)."""

    def __init__(self, code, details, responses, initial_metadata, trailing_metadata):
        self.code = code
        self.details = details
        self.responses = responses
        self.initial_metadata = list(initial_metadata or ())
        self.trailing_metadata = list(trailing_metadata or ())

    @property
    def response(self):
        return self.responses[0] if self.responses else None

    def trailer(self, key, default=None):
        for k, v in self.trailing_metadata:
            if k == key:
                return v
        return default

    def __repr__(self):
        return "CallResult(code=%s, details=%r, %d responses, trailers=%r)" % (
            self.code, self.details, len(self.responses), self.trailing_metadata)


def _result_from_error(e, responses):
    return CallResult(e.code(), e.details(), responses,
                      e.initial_metadata() if hasattr(e, "initial_metadata") else (),
                      e.trailing_metadata() if hasattr(e, "trailing_metadata") else ())


def spark_request(payload):
    """A Spark Connect request message carrying |payload| (see spark_proto)."""
    return spark_proto.request(payload)


def _serializer(path):
    """Spark Connect calls carry real request messages (sparkgate checks
    session_id and user_context in each): the payload rides as field 15."""
    if path.startswith(SERVICE):
        return lambda payload: spark_proto.request(payload)
    return None


def call_unary(channel, method, request=b"", metadata=(), timeout=20):
    path = method if method.startswith("/") else SERVICE + method
    fn = channel.unary_unary(path, request_serializer=_serializer(path))
    try:
        resp, call = fn.with_call(request, metadata=list(metadata), timeout=timeout)
        return CallResult(call.code(), call.details(), [resp], call.initial_metadata(),
                          call.trailing_metadata())
    except grpc.RpcError as e:
        return _result_from_error(e, [])


def call_server_stream(channel, method, request=b"", metadata=(), timeout=60, sink=None):
    """Reads the whole response stream. With |sink| (a callable taking each
    message), messages are handed to it instead of being kept."""
    path = method if method.startswith("/") else SERVICE + method
    it = channel.unary_stream(path, request_serializer=_serializer(path))(
        request, metadata=list(metadata), timeout=timeout)
    got = []
    try:
        for msg in it:
            if sink is not None:
                sink(msg)
            else:
                got.append(msg)
        return CallResult(it.code(), it.details(), got, it.initial_metadata(),
                          it.trailing_metadata())
    except grpc.RpcError as e:
        return _result_from_error(e, got)


def call_client_stream(channel, method, requests, metadata=(), timeout=60):
    path = method if method.startswith("/") else SERVICE + method
    fn = channel.stream_unary(path, request_serializer=_serializer(path))
    try:
        resp, call = fn.with_call(iter(requests), metadata=list(metadata), timeout=timeout)
        return CallResult(call.code(), call.details(), [resp], call.initial_metadata(),
                          call.trailing_metadata())
    except grpc.RpcError as e:
        return _result_from_error(e, [])


def call_bidi(channel, method, requests, metadata=(), timeout=30):
    path = method if method.startswith("/") else SERVICE + method
    it = channel.stream_stream(path, request_serializer=_serializer(path))(
        iter(requests), metadata=list(metadata), timeout=timeout)
    got = []
    try:
        for msg in it:
            got.append(msg)
        return CallResult(it.code(), it.details(), got, it.initial_metadata(),
                          it.trailing_metadata())
    except grpc.RpcError as e:
        return _result_from_error(e, got)


def wait_channel_ready(channel, timeout=10):
    grpc.channel_ready_future(channel).result(timeout=timeout)


# ---------------------------------------------------------------------------
# Raw HTTP/2 (python3-h2), for facts gRPC hides

def grpc_frame(payload, compressed=False, raw=False):
    """One gRPC message. Unless |raw|, the payload is wrapped in a Spark
    Connect request message (spark_proto.request)."""
    if not raw:
        payload = spark_proto.request(payload)
    return bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload


def grpc_unframe(data):
    """Splits a gRPC body into messages; raises ValueError on a torn frame."""
    out, i = [], 0
    while i < len(data):
        if len(data) - i < 5:
            raise ValueError("torn gRPC frame header at %d" % i)
        n = int.from_bytes(data[i + 1:i + 5], "big")
        if len(data) - i - 5 < n:
            raise ValueError("torn gRPC message at %d" % i)
        out.append(data[i + 5:i + 5 + n])
        i += 5 + n
    return out


def bio_handshake(tls, out, send, receive, rounds=100):
    """Drives the TLS handshake of |tls| (an ssl.SSLObject over memory
    BIOs, |out| its outgoing one): what it writes goes out with send(bytes)
    while it waits, and receive() feeds its incoming BIO (False: the peer
    is gone). Returns whether the handshake finished. What its last step
    wrote stays in |out|, unsent, for the caller to send with what follows
    (the tests that need records arriving together)."""
    for _ in range(rounds):
        try:
            tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            if out.pending:
                send(out.read())
            if not receive():
                return False
    return False


def bio_read_all(tls):
    """All the plaintext |tls| (an ssl.SSLObject over memory BIOs) can give
    from what its incoming BIO holds, and whether the peer closed the TLS
    session (close_notify)."""
    plain = b""
    while True:
        try:
            plain += tls.read(65536)
        except ssl.SSLWantReadError:
            return plain, False
        except ssl.SSLZeroReturnError:
            return plain, True


def client_ssl_context(alpn=("h2",), root=None, cert=None, key=None,
                       min_version=None, max_version=None, seclevel0=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=root or pki().ca_cert)
    ctx.check_hostname = True
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if cert:
        ctx.load_cert_chain(cert, key)
    if seclevel0:
        # OpenSSL 3 will not even offer TLS < 1.2 above security level 0.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class H2Response:
    def __init__(self, stream_id):
        self.stream_id = stream_id
        self.status = None          # int :status
        self.headers = []           # first header block, (name, value) str pairs
        self.trailers = []          # trailer block, if any
        self.data = b""
        self.events = []            # h2 event class names for this stream, in order
        self.ended = False          # END_STREAM seen
        self.reset_code = None      # RST_STREAM error code, if reset
        self.header_blocks = 0
        self.headers_ended_stream = False  # the first header block carried END_STREAM
        self.connection_closed = False

    def header(self, name, default=None, block=None):
        for k, v in (self.headers if block is None else block):
            if k == name:
                return v
        return default

    def trailer(self, name, default=None):
        return self.header(name, default, self.trailers)

    @property
    def trailers_only(self):
        """One header block with END_STREAM and nothing else."""
        return (self.header_blocks == 1 and self.headers_ended_stream
                and not self.data and not self.trailers
                and [e for e in self.events if e != "StreamEnded"] == ["ResponseReceived"])

    def __repr__(self):
        return ("H2Response(status=%s headers=%r trailers=%r data=%d bytes events=%r "
                "reset=%r)" % (self.status, self.headers, self.trailers, len(self.data),
                                self.events, self.reset_code))


class H2Client:
    """A blocking HTTP/2 client on one connection: TLS with ALPN h2 (tls=True)
    or h2c prior knowledge (tls=False)."""

    def __init__(self, port, host="127.0.0.1", tls=True, server_name="localhost",
                 ssl_context=None, timeout=10.0):
        self.host, self.port, self.tls = host, port, tls
        self.authority = "%s:%d" % (server_name or host, port)
        self.timeout = timeout
        raw = socket.create_connection((host, port), timeout=timeout)
        if tls:
            ctx = ssl_context or client_ssl_context()
            self.sock = ctx.wrap_socket(raw, server_hostname=server_name or host)
            if self.sock.selected_alpn_protocol() != "h2":
                self.sock.close()
                raise AssertionError("ALPN did not select h2 (got %r)"
                                     % self.sock.selected_alpn_protocol())
        else:
            self.sock = raw
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * MIB)
        self._flush()
        self.responses = {}
        self.closed = False
        self.goaway = None

    def _flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def close(self):
        try:
            self.conn.close_connection()
            self._flush()
        except Exception:
            pass
        try:
            self.sock.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def grpc_headers(self, path, method="POST", content_type="application/grpc", extra=()):
        hdrs = [(":method", method), (":scheme", "https" if self.tls else "http"),
                (":path", path), (":authority", self.authority)]
        if content_type is not None:
            hdrs.append(("content-type", content_type))
        hdrs.append(("te", "trailers"))
        hdrs.extend(extra)
        return hdrs

    def start(self, headers, body=b"", end_stream=True):
        """Sends a request; returns its stream id (read it with wait())."""
        sid = self.conn.get_next_available_stream_id()
        self.responses[sid] = H2Response(sid)
        self.conn.send_headers(sid, headers, end_stream=end_stream and not body)
        self._flush()
        if body:
            self._send_body(sid, body, end_stream)
        return sid

    def _send_body(self, sid, body, end_stream):
        view = memoryview(body)
        deadline = time.monotonic() + self.timeout
        while True:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window > 0 or not view:
                n = min(window, len(view))
                last = n == len(view)
                self.conn.send_data(sid, bytes(view[:n]), end_stream=end_stream and last)
                self._flush()
                view = view[n:]
                if last:
                    return
            else:
                if time.monotonic() > deadline:
                    raise TimeoutError("no flow-control credit to send the body")
                self._pump(0.2)
                r = self.responses[sid]
                if r.ended or r.reset_code is not None or self.closed:
                    return

    def _pump(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return
        except (ConnectionError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            for r in self.responses.values():
                r.connection_closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            raise
        for ev in events:
            sid = getattr(ev, "stream_id", None)
            r = self.responses.get(sid)
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            if r is None:
                continue
            r.events.append(type(ev).__name__)
            if isinstance(ev, h2.events.ResponseReceived):
                r.header_blocks += 1
                r.headers = list(ev.headers)
                r.status = int(r.header(":status"))
                r.headers_ended_stream = ev.stream_ended is not None
            elif isinstance(ev, h2.events.TrailersReceived):
                r.header_blocks += 1
                r.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.InformationalResponseReceived):
                r.header_blocks += 1
            elif isinstance(ev, h2.events.DataReceived):
                r.data += ev.data
                if ev.flow_controlled_length:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                r.reset_code = ev.error_code
        self._flush()

    def wait(self, sid, timeout=None):
        """Reads until stream |sid| ends, is reset, or the connection closes."""
        r = self.responses[sid]
        deadline = time.monotonic() + (timeout or self.timeout)
        while not (r.ended or r.reset_code is not None or self.closed):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("stream %d not finished: %r" % (sid, r))
            self._pump(min(left, 0.5))
        return r

    def request(self, path, method="POST", content_type="application/grpc", extra=(),
                body=b"", end_stream=True, timeout=None, headers=None):
        hdrs = headers if headers is not None else self.grpc_headers(
            path, method, content_type, extra)
        sid = self.start(hdrs, body, end_stream)
        return self.wait(sid, timeout)


# ---------------------------------------------------------------------------
# TLS handshake probe

class TlsProbe:
    def __init__(self):
        self.ok = False
        self.alpn = None
        self.version = None
        self.error = None
        self.h2_settings_received = False

    def __repr__(self):
        return "TlsProbe(ok=%s alpn=%r version=%r error=%r h2=%s)" % (
            self.ok, self.alpn, self.version, self.error, self.h2_settings_received)


def tls_probe(port, host="127.0.0.1", alpn=("h2",), min_version=None, max_version=None,
              seclevel0=False, server_name="localhost", try_h2=True, timeout=5.0):
    """Handshakes and reports. If it succeeds and try_h2, sends the HTTP/2
    preface and records whether the server answered with a SETTINGS frame."""
    res = TlsProbe()
    ctx = client_ssl_context(alpn=alpn, min_version=min_version, max_version=max_version,
                             seclevel0=seclevel0)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        res.error = "connect: %s" % e
        return res
    try:
        s = ctx.wrap_socket(raw, server_hostname=server_name)
    except (ssl.SSLError, OSError) as e:
        res.error = "%s: %s" % (type(e).__name__, e)
        raw.close()
        return res
    res.ok = True
    res.alpn = s.selected_alpn_protocol()
    res.version = s.version()
    if try_h2:
        try:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            s.settimeout(timeout)
            data = b""
            while len(data) < 9:
                chunk = s.recv(9 - len(data))
                if not chunk:
                    break
                data += chunk
            res.h2_settings_received = len(data) == 9 and data[3] == 0x4
        except (OSError, ssl.SSLError):
            pass
    s.close()
    return res


# ---------------------------------------------------------------------------
# unittest glue

class SparkgateTestCase(unittest.TestCase):
    """Base class: start_sparkgate()/standin() register cleanups that stop
    (and check) what they started; on failure the sparkgate logs are printed."""

    def setUp(self):
        super().setUp()
        self._started = []
        self.addCleanup(self._dump_logs_on_failure)

    def _dump_logs_on_failure(self):
        # The result's lists, not _outcome.success: Python 3.11 resets that
        # to True for each cleanup.
        outcome = getattr(self, "_outcome", None)
        result = getattr(outcome, "result", None)
        if result is None:
            return
        if any(t is self for t, _ in list(result.failures) + list(result.errors)):
            for sg in self._started:
                sys.stderr.write("\n---- sparkgate log (pid %s, %s) ----\n%s\n----\n" % (
                    sg.proc.pid if sg.proc else "-", self.id(), sg.log_text()))

    def start_sparkgate(self, config, **kw):
        sg = Sparkgate(config, **kw)
        self._started.append(sg)
        self.addCleanup(sg.stop)
        sg.start()
        return sg

    def standin(self, **kw):
        s = start_standin(**kw)
        self.addCleanup(stop_standin, s)
        return s


def main():
    unittest.main(verbosity=2)
