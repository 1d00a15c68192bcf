"""A scripted h2c backend (python3-h2) for failing-backend tests.

Each accepted connection follows one behaviour from a plan: connection N
gets plan[N], and the last entry repeats. Behaviours:

  ok                 answer every call: the request's gRPC messages echoed
                     back byte for byte, then grpc-status 0
  goaway             on a request's HEADERS: GOAWAY(NO_ERROR, last stream 0),
                     i.e. "not processed", then wait for the peer to close
  goaway_processed   on a request's end: GOAWAY(NO_ERROR, last stream = it),
                     then close the TCP connection without answering
  refuse             on a request's HEADERS: RST_STREAM(REFUSED_STREAM)
  refuse_after_body  the same, once the whole request body has arrived
  rst                on a request's HEADERS: RST_STREAM(INTERNAL_ERROR)
  bad_headers        answer with a response header block HTTP/2 forbids
                     (an upper-case field name and a connection header)
  no_read            after a request's HEADERS, stop reading the socket
  interim            like ok, with a 103 interim response before the answer
  interim_only       a 103 interim response, then a trailers-only
                     grpc-status 5

Every request seen is recorded in `requests` as (connection index, stream
id, headers dict, body bytes so far, [(DATA frame length, END_STREAM)]);
`connections` counts accepts. Every
socket has a timeout and every loop ends when the backend is closed.
"""

import socket
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events


class RawBackend:
    def __init__(self, plan):
        self.plan = list(plan)
        self.lock = threading.Lock()
        self.requests = []
        self.connections = 0
        self.closed = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._threads = []
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self):
        self.closed.set()
        self.sock.close()
        for t in self._threads:
            t.join(timeout=5)

    def snapshot(self):
        with self.lock:
            return list(self.requests), self.connections

    # -- internals ---------------------------------------------------------

    def _accept_loop(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                index = self.connections
                self.connections += 1
            behaviour = self.plan[min(index, len(self.plan) - 1)]
            t = threading.Thread(target=self._serve, args=(conn, index, behaviour),
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _record(self, index, sid, headers):
        with self.lock:
            self.requests.append([index, sid, headers, b"", []])
            return len(self.requests) - 1

    def _serve(self, sock, index, behaviour):
        sock.settimeout(0.2)
        cfg = h2.config.H2Configuration(client_side=False, validate_outbound_headers=False,
                                        normalize_outbound_headers=False,
                                        validate_inbound_headers=False)
        h2c = h2.connection.H2Connection(config=cfg)
        h2c.initiate_connection()
        bodies = {}
        slots = {}
        try:
            sock.sendall(h2c.data_to_send())
            while not self.closed.is_set():
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        sid = ev.stream_id
                        headers = {k.decode() if isinstance(k, bytes) else k:
                                   v.decode() if isinstance(v, bytes) else v
                                   for k, v in ev.headers}
                        slots[sid] = self._record(index, sid, headers)
                        bodies[sid] = b""
                        if behaviour == "goaway":
                            h2c.close_connection(error_code=0, last_stream_id=0)
                        elif behaviour == "refuse":
                            h2c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                        elif behaviour == "rst":
                            h2c.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                        elif behaviour == "bad_headers":
                            h2c.send_headers(sid, [(":status", "200"),
                                                   ("Content-Type", "application/grpc"),
                                                   ("connection", "close")])
                        elif behaviour == "no_read":
                            sock.sendall(h2c.data_to_send())
                            self.closed.wait(120)
                            return
                    elif isinstance(ev, h2.events.DataReceived):
                        sid = ev.stream_id
                        if sid in bodies:
                            bodies[sid] += ev.data
                            with self.lock:
                                self.requests[slots[sid]][3] = bodies[sid]
                                self.requests[slots[sid]][4].append(
                                    (len(ev.data), ev.stream_ended is not None))
                        h2c.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, h2.events.StreamEnded):
                        sid = ev.stream_id
                        if behaviour in ("interim", "interim_only"):
                            h2c.send_headers(sid, [(":status", "103"), ("link", "</x>")])
                        if behaviour in ("ok", "interim"):
                            self._answer(h2c, sid, bodies.get(sid, b""))
                        elif behaviour == "interim_only":
                            h2c.send_headers(sid, [(":status", "200"),
                                                   ("content-type", "application/grpc"),
                                                   ("grpc-status", "5"),
                                                   ("grpc-message", "not here")],
                                             end_stream=True)
                        elif behaviour == "refuse_after_body":
                            h2c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                        elif behaviour == "goaway_processed":
                            h2c.close_connection(error_code=0, last_stream_id=sid)
                            sock.sendall(h2c.data_to_send())
                            return
                out = h2c.data_to_send()
                if out:
                    sock.sendall(out)
        except Exception:  # the peer went away mid-write, a protocol error: done
            return
        finally:
            sock.close()

    @staticmethod
    def _answer(h2c, sid, body):
        h2c.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        # Windows on loopback are ample for the small bodies tests send.
        while body:
            n = min(len(body), h2c.max_outbound_frame_size,
                    h2c.local_flow_control_window(sid))
            if n <= 0:
                break
            h2c.send_data(sid, body[:n])
            body = body[n:]
        h2c.send_headers(sid, [("grpc-status", "0")], end_stream=True)
