"""A loopback TCP listener for hand-made backends: each accepted
connection is served by serve(sock) in a thread of its own. Subclasses
define serve(); accepted(sock) may answer first (or refuse: return
False). close() stops accepting, and every serving loop is expected to
watch self.closed. Every wait is bounded."""

import socket
import threading


class ThreadedServer:
    def __init__(self, backlog=64, rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:  # accepted sockets inherit it: a small one backs up sooner
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
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
