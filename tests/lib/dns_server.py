"""A tiny DNS server for tests: answers A and AAAA questions over UDP on
127.0.0.1 from a table the test sets, NXDOMAIN for names not in it, and
counts the questions. Enough for libevent's resolver (evdns), which sends
one question per query and may randomize the case of the name (0x20):
names are matched without case and the question is echoed as it came.

resolv_conf() writes a resolv.conf naming it ("nameserver 127.0.0.1:PORT",
a form evdns reads), for a process whose /etc/resolv.conf is bind-mounted
over in a mount namespace of its own (harness.resolver_wrap)."""

import ipaddress
import os
import socket
import struct
import threading

TYPE_A, TYPE_AAAA = 1, 28
RCODE_NXDOMAIN = 3


def _read_name(msg, off):
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            return ".".join(labels), off
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n


class DnsServer:
    def __init__(self):
        self.records = {}        # name (lower case, no trailing dot) -> {"A": [...], "AAAA": [...]}
        self.questions = []      # (name as asked, type)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def set(self, name, a=(), aaaa=()):
        with self._lock:
            self.records[name.lower().rstrip(".")] = {"A": list(a), "AAAA": list(aaaa)}

    def ignore(self, name):
        """Questions about |name| get no answer at all (a DNS server that
        is down or cut off)."""
        with self._lock:
            self.records[name.lower().rstrip(".")] = None

    def asked(self, name):
        """How many questions named |name| (any type, any case)."""
        name = name.lower().rstrip(".")
        with self._lock:
            return sum(1 for q, _ in self.questions if q.lower().rstrip(".") == name)

    def resolv_conf(self, directory, search=(), ndots=None):
        """Writes DIRECTORY/resolv.conf naming this server; |search| and
        |ndots| as a Kubernetes pod's ("search ns.svc.cluster.local ...",
        "options ndots:5")."""
        path = os.path.join(directory, "resolv.conf")
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.1:%d\n" % self.port)
            if search:
                f.write("search %s\n" % " ".join(search))
            f.write("options timeout:2 attempts:1%s\n" % (
                " ndots:%d" % ndots if ndots is not None else ""))
        return path

    def _serve(self):
        while not self._stop.is_set():
            try:
                msg, peer = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                reply = self._answer(msg)
            except (ValueError, IndexError, struct.error):
                continue
            if reply is not None:
                self._sock.sendto(reply, peer)

    def _answer(self, msg):
        qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
        if qdcount != 1:
            raise ValueError("one question expected")
        name, off = _read_name(msg, 12)
        qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
        question = msg[12:off + 4]
        with self._lock:
            self.questions.append((name, qtype))
            known = name.lower().rstrip(".") in self.records
            entry = self.records.get(name.lower().rstrip("."))
        if known and entry is None:
            return None
        answers = []
        if entry is not None:
            key = {TYPE_A: "A", TYPE_AAAA: "AAAA"}.get(qtype)
            for addr in entry.get(key, []) if key else []:
                rdata = ipaddress.ip_address(addr).packed
                # The name: a pointer to the question's (offset 12).
                answers.append(struct.pack("!HHHIH", 0xC00C, qtype, qclass, 60, len(rdata)) + rdata)
        rcode = RCODE_NXDOMAIN if entry is None else 0
        rflags = 0x8000 | (flags & 0x0100) | 0x0080 | rcode  # QR, RD echoed, RA
        header = struct.pack("!HHHHHH", qid, rflags, 1, len(answers), 0, 0)
        return header + question + b"".join(answers)
