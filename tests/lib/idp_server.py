"""A local HTTPS identity provider for sparkgate's tests (issue 9).

IdpServer(cert, key).start() serves on 127.0.0.1, port 0 (the kernel's
choice), over TLS with the given certificate (by default the test PKI's
server certificate: names localhost, 127.0.0.1, ::1). What it answers is
set per path at run time and can be changed while sparkgate fetches:

    idp.set("/jwks", json_obj={"keys": [...]})            # 200, JSON
    idp.set("/jwks", body=b"<html>", content_type="text/html")
    idp.set("/jwks", status=503)                           # empty body
    idp.set("/jwks", delay=30)     # answers after 30 s (or at release())
    idp.set("/jwks", drop=True)    # closes the connection, no response
    idp.set("/jwks", headers={"Cache-Control": "max-age=5"}, ...)
    idp.count("/jwks")             # GET requests seen for that path
    idp.url("/jwks")               # https://127.0.0.1:PORT/jwks
    idp.wait_count("/jwks", 2, timeout=10)

Unknown paths answer 404. Every request is counted (per path, query
string dropped) before it is answered. stop() releases delayed answers and
closes the socket. Also here: key and token helpers (jwk_of, mint,
claims) and cert_for_names(), a certificate of the test CA for other
names (for host-name checks).
"""

import base64
import datetime
import http.server
import json
import os
import socket
import ssl
import threading
import time

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


# ---------------------------------------------------------------------------
# Keys and tokens

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def int_b64url(n, length=None):
    length = length or (n.bit_length() + 7) // 8
    return b64url(n.to_bytes(length, "big"))


def new_rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_ec():
    return ec.generate_private_key(ec.SECP256R1())


def jwk_of(key, kid, alg=None, use="sig"):
    """The public JWK of a private key (RSA or EC P-256)."""
    pub = key.public_key()
    nums = pub.public_numbers()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = {"kty": "RSA", "kid": kid, "n": int_b64url(nums.n),
               "e": int_b64url(nums.e)}
    else:
        jwk = {"kty": "EC", "kid": kid, "crv": "P-256",
               "x": int_b64url(nums.x, 32), "y": int_b64url(nums.y, 32)}
    if use is not None:
        jwk["use"] = use
    if alg:
        jwk["alg"] = alg
    return jwk


def claims(iss, sub="alice", aud="spark", lifetime=600, **extra):
    now = int(time.time())
    c = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + lifetime}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def mint(key, alg, payload, kid=None):
    tok = pyjwt.encode(payload, key, algorithm=alg,
                       headers={"kid": kid} if kid is not None else None)
    return tok if isinstance(tok, str) else tok.decode()


def cert_for_names(pki, directory, names, ips=()):
    """A server certificate signed by the test CA for DNS |names| and IP
    addresses |ips| only: (cert_path, key_path)."""
    import ipaddress
    with open(pki.ca_key, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    with open(pki.ca_cert, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    key = new_ec()
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        names[0] if names else "x")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    stem = os.path.join(directory, "idp-" + (names[0] if names else "ip"))
    with open(stem + ".pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(stem + ".key", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return stem + ".pem", stem + ".key"


# ---------------------------------------------------------------------------
# The server

class _Route:
    def __init__(self, status=200, body=b"", content_type="application/json",
                 headers=None, delay=0.0, drop=False):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = dict(headers or {})
        self.delay = delay
        self.drop = drop


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-idp"

    def log_message(self, fmt, *args):  # quiet
        pass

    def do_GET(self):
        idp = self.server.idp
        path = self.path.split("?", 1)[0]
        with idp.lock:
            idp.counts[path] = idp.counts.get(path, 0) + 1
            idp.cond.notify_all()
            route = idp.routes.get(path)
        if route is None:
            route = _Route(status=404, body=b"not found", content_type="text/plain")
        if route.delay:
            idp.released.wait(route.delay)
        if route.drop:
            self.close_connection = True
            return
        try:
            self.send_response(route.status)
            if route.content_type is not None:
                self.send_header("Content-Type", route.content_type)
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)
        except (OSError, ssl.SSLError):
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # Failed handshakes (untrusted CA, wrong name) are the point of
        # some tests: not worth a traceback.
        pass


class IdpServer:
    def __init__(self, cert, key, host="127.0.0.1"):
        self.cert, self.key, self.host = cert, key, host
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.routes = {}
        self.counts = {}
        self.released = threading.Event()
        self.httpd = None
        self.thread = None
        self.port = None

    def start(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self.httpd = _Server((self.host, 0), _Handler)
        self.httpd.idp = self
        # The handshake runs in the handler thread, not in accept(): a
        # client that stalls its handshake must not stop the server.
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True,
                                            do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.released.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.thread is not None:
            self.thread.join(5)

    def release(self):
        """Lets delayed answers go now."""
        self.released.set()

    def url(self, path="", host=None):
        return "https://%s:%d%s" % (host or self.host, self.port, path)

    def set(self, path, json_obj=None, body=None, status=200,
            content_type="application/json", headers=None, delay=0.0, drop=False):
        if json_obj is not None:
            body = json.dumps(json_obj).encode()
        if isinstance(body, str):
            body = body.encode()
        with self.lock:
            self.routes[path] = _Route(status, body or b"", content_type, headers,
                                       delay, drop)

    def count(self, path):
        with self.lock:
            return self.counts.get(path, 0)

    def wait_count(self, path, n, timeout=10.0):
        """Waits (bounded) until |path| was requested at least n times."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.counts.get(path, 0) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%s requested %d times, not %d, within %.0fs"
                                         % (path, self.counts.get(path, 0), n, timeout))
                self.cond.wait(min(left, 0.1))
        return self.count(path)


def free_port_closed(host="127.0.0.1"):
    """A port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
