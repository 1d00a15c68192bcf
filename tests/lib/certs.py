"""A throw-away PKI for sparkgate's tests, made with the openssl CLI.

make_pki(dir) -> Pki with paths (all PEM, EC P-256 keys):
  ca_cert / ca_key           the test CA ("sparkgate test CA")
  crl                        CRL of the test CA, revoking client_revoked
  server_cert / server_key   CN localhost, SAN DNS:localhost, IP:127.0.0.1, IP:::1
  client_spiffe_*            CN spiffe-client, SAN URI:spiffe://example.org/ns/team-a/sa/alice
  client_dns_*               CN dns-client, SAN DNS:client.example.org
  client_cn_*                CN alice (no SAN)
  client_expired_*           CN expired-client, valid 2020-01-01..2021-01-01
  client_revoked_*           CN revoked-client, revoked in crl
  server_expired_*           server names as above, expired
  other_ca_cert / other_ca_key   an unrelated CA
  other_server_*             server names as above, signed by other_ca
  other_client_*             CN other-client, signed by other_ca
  ca_bundle                  ca_cert + other_ca_cert
Nothing is cached: each call makes fresh keys in |dir|.
"""

import os
import subprocess

_CA_CNF = """\
[ ca ]
default_ca = test_ca

[ test_ca ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 3650
default_crl_days = 3650
policy = policy_any
unique_subject = no
copy_extensions = none
email_in_dn = no

[ policy_any ]
commonName = supplied

[ req ]
distinguished_name = req_dn
prompt = no

[ req_dn ]
CN = placeholder

[ v3_ca ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_SERVER_EXT = """\
[ ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""

_CLIENT_EXT = """\
[ ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
{san_line}
"""

SERVER_SAN = "DNS:localhost, IP:127.0.0.1, IP:::1"
SPIFFE_ID = "spiffe://example.org/ns/team-a/sa/alice"
CLIENT_DNS = "client.example.org"


def _run(args, cwd):
    env = dict(os.environ)
    env.pop("OPENSSL_CONF", None)
    p = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("openssl failed (%d): %s\n%s%s" % (
            p.returncode, " ".join(args), p.stdout.decode(errors="replace"),
            p.stderr.decode(errors="replace")))
    return p


class _Ca:
    def __init__(self, root, name, cn):
        self.dir = os.path.join(root, name + "-db")
        os.makedirs(os.path.join(self.dir, "newcerts"))
        open(os.path.join(self.dir, "index.txt"), "w").close()
        with open(os.path.join(self.dir, "serial"), "w") as f:
            f.write("1000\n")
        with open(os.path.join(self.dir, "crlnumber"), "w") as f:
            f.write("01\n")
        self.cnf = os.path.join(self.dir, "ca.cnf")
        with open(self.cnf, "w") as f:
            f.write(_CA_CNF.format(dir=self.dir))
        self.root = root
        self.cert = os.path.join(root, name + ".pem")
        self.key = os.path.join(root, name + ".key")
        _run(["openssl", "req", "-x509", "-config", self.cnf, "-extensions", "v3_ca",
              "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-keyout", self.key, "-out", self.cert,
              "-subj", "/CN=" + cn, "-days", "3650", "-sha256"], root)

    def issue(self, name, cn, ext, startdate=None, enddate=None):
        key = os.path.join(self.root, name + ".key")
        csr = os.path.join(self.dir, name + ".csr")
        cert = os.path.join(self.root, name + ".pem")
        extfile = os.path.join(self.dir, name + ".ext")
        with open(extfile, "w") as f:
            f.write(ext)
        _run(["openssl", "req", "-new", "-config", self.cnf,
              "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + cn], self.root)
        args = ["openssl", "ca", "-batch", "-notext", "-config", self.cnf,
                "-cert", self.cert, "-keyfile", self.key, "-in", csr, "-out", cert,
                "-extfile", extfile, "-extensions", "ext"]
        if startdate:
            args += ["-startdate", startdate]
        if enddate:
            args += ["-enddate", enddate]
        else:
            args += ["-days", "3650"]
        _run(args, self.root)
        return cert, key

    def revoke(self, cert):
        _run(["openssl", "ca", "-batch", "-config", self.cnf, "-cert", self.cert,
              "-keyfile", self.key, "-revoke", cert, "-crl_reason", "keyCompromise"],
             self.root)

    def gencrl(self, path):
        _run(["openssl", "ca", "-batch", "-config", self.cnf, "-cert", self.cert,
              "-keyfile", self.key, "-gencrl", "-crldays", "3650", "-out", path],
             self.root)
        return path


def _server_ext(san=SERVER_SAN):
    return _SERVER_EXT.format(san=san)


def _client_ext(san=None):
    return _CLIENT_EXT.format(san_line=("subjectAltName = " + san) if san else "")


class Pki:
    def __init__(self, root):
        root = os.path.abspath(root)
        self.dir = root
        ca = _Ca(root, "ca", "sparkgate test CA")
        self.ca_cert, self.ca_key = ca.cert, ca.key
        self.server_cert, self.server_key = ca.issue("server", "localhost", _server_ext())
        self.client_spiffe_cert, self.client_spiffe_key = ca.issue(
            "client-spiffe", "spiffe-client", _client_ext("URI:" + SPIFFE_ID))
        self.client_dns_cert, self.client_dns_key = ca.issue(
            "client-dns", "dns-client", _client_ext("DNS:" + CLIENT_DNS))
        self.client_cn_cert, self.client_cn_key = ca.issue(
            "client-cn", "alice", _client_ext())
        self.client_expired_cert, self.client_expired_key = ca.issue(
            "client-expired", "expired-client", _client_ext(),
            startdate="20200101000000Z", enddate="20210101000000Z")
        self.client_revoked_cert, self.client_revoked_key = ca.issue(
            "client-revoked", "revoked-client", _client_ext())
        self.server_expired_cert, self.server_expired_key = ca.issue(
            "server-expired", "localhost", _server_ext(),
            startdate="20200101000000Z", enddate="20210101000000Z")
        ca.revoke(self.client_revoked_cert)
        self.crl = ca.gencrl(os.path.join(root, "ca.crl"))

        other = _Ca(root, "other-ca", "unrelated test CA")
        self.other_ca_cert, self.other_ca_key = other.cert, other.key
        self.other_server_cert, self.other_server_key = other.issue(
            "other-server", "localhost", _server_ext())
        self.other_client_cert, self.other_client_key = other.issue(
            "other-client", "other-client", _client_ext())

        self.ca_bundle = os.path.join(root, "ca-bundle.pem")
        with open(self.ca_bundle, "w") as out:
            for p in (self.ca_cert, self.other_ca_cert):
                with open(p) as f:
                    out.write(f.read())

    def read(self, attr):
        """The bytes of a file named by attribute, e.g. pki.read('ca_cert')."""
        with open(getattr(self, attr), "rb") as f:
            return f.read()


def make_pki(root):
    """Makes the whole PKI under |root| (an existing, empty-ish directory)."""
    return Pki(root)


if __name__ == "__main__":
    import sys
    import tempfile
    d = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="sg-pki-")
    pki = make_pki(d)
    for k, v in sorted(vars(pki).items()):
        print("%-22s %s" % (k, v))
