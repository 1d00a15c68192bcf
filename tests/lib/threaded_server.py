"""A loopback TCP listener for hand-made backends: each accepted
connection is served by serve(sock) in a thread of its own. Subclasses
define serve(); accepted(sock) may answer first (or refuse: return
False). close() stops accepting, and every serving loop is expected to
watch self.closed. Every wait is bounded."""

import socket
import struct
import threading


class ThreadedServer:
    def __init__(self, backlog=64, rcvbuf=None, port=0):
        """|port| 0: the kernel picks one (self.port)."""
        self.sock = socket.socket()
        if port:  # a port a backend used before, maybe in TIME_WAIT
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:  # accepted sockets inherit it: a small one backs up sooner
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self.closed = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def accepted(self, sock):
        """Called on the accept thread before serve(); False drops it."""
        return True

    def serve(self, sock):
        raise NotImplementedError

    def _accept(self):
        while not self.closed.is_set():
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            if not self.accepted(c):
                c.close()
                continue
            self.accepts += 1
            t = threading.Thread(target=self.serve, args=(c,), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self):
        self.closed.set()
        self.sock.close()
        for t in self.threads:
            t.join(timeout=3)


class ResettingServer(ThreadedServer):
    """Reads what the client sends first (a preface, a ClientHello), then
    resets the connection (RST, no TIME_WAIT): a backend that drops every
    connection before it says anything."""

    def serve(self, c):
        c.settimeout(0.5)
        try:
            c.recv(4096)
        except OSError:
            pass
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
