/* libFuzzer target: the response leg. A backend's HTTP/2 bytes, from the
 * fuzzer, through sparkgate's upstream client session (upstream.c: its
 * nghttp2 callbacks, GOAWAY and REFUSED_STREAM retry, flow control) and
 * stream.c's response side (sg_stream_on_response_*, interim responses,
 * gRPC message tracking, trailers, resets) to a real client connection.
 *
 * Built once: a listening TCP socket on 127.0.0.1 (kernel-chosen port) that
 * plays the backend for the whole process, a config with one h2c listener
 * ("auth": "none") and one tenant ("user_id": "off") whose only backend is
 * that socket, and its runtime.
 *
 * Per input, so that no state carries over between inputs: a new worker,
 * one client connection accepted through sg_conn_accept on one end of a
 * socketpair, and on the other end an nghttp2 client session of the
 * harness that sends ONE valid ExecutePlan call (a single gRPC message with
 * a session_id and a user_context) and reads what sparkgate answers. Once
 * sparkgate connects upstream, the harness accepts the connection and
 * writes a server preface (an empty SETTINGS and an ACK of sparkgate's),
 * then, once the call's HEADERS came (a backend cannot answer a stream
 * nghttp2 has not opened yet), the input in a few pieces cut at
 * input-chosen places. Retries (a GOAWAY or a REFUSED_STREAM before the
 * backend took the call) connect again: a few more connections are
 * accepted, and each gets the same bytes or is closed at once (chosen by
 * the input). The loop runs non-blocking until nothing moves or a bounded
 * number of rounds, both sockets drained, then everything is torn down
 * with sg_worker_free.
 *
 * Half the inputs (an input-chosen bit) mark the client connection as TLS
 * connections are marked for output (sg_h2io.copy_payload), so the TLS
 * framing path is checked too without a TLS handshake per input.
 *
 * Properties, besides ASan/UBSan/LeakSanitizer: no file descriptor
 * outlives the input; sparkgate's first bytes on each side are HTTP/2 (the
 * client connection starts with SETTINGS, each upstream connection with
 * the client preface and SETTINGS); whatever the backend sends, what the
 * client receives is valid HTTP/2 at the connection level (the harness's
 * client session never has to end the connection with an error code, and
 * never fails); and a call whose upstream leg is over has had its response
 * started or been answered by the proxy (a call left without either waits
 * for ever).
 *
 * FUZZ_H2_LOG=debug|info (environment) shows sparkgate's log and, at
 * debug, what the harness's client saw, while reproducing a crash. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "fuzz_conn.h"
#include "fuzz_support.h"
#include "sparkgate/accesslog.h"
#include "sparkgate/config.h"
#include "sparkgate/conn.h"
#include "sparkgate/list.h"
#include "sparkgate/log.h"
#include "sparkgate/stream.h"
#include "sparkgate/worker.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


/* Rounds of the loop at most, per input. */
#define MAX_ITERATIONS 96
/* Rounds in a row in which nothing moved (no byte either way, no
 * connection, no active event) before the input is done. */
#define QUIET_ITERATIONS 3
#define MAX_PIECES 4
/* The first connection and up to two retries: sparkgate retries a call
 * once, and a pool probe may add one more. */
#define MAX_UPSTREAMS 3

static const char client_magic[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define CLIENT_MAGIC_LEN (sizeof client_magic - 1)

/* What the harness's backend says before the input: its SETTINGS (empty:
 * the defaults; the input may send more) and the ACK of sparkgate's, which
 * are in flight from the moment its session exists. */
static const uint8_t backend_preface[] = {
    0, 0, 0, 0x4, 0x0, 0, 0, 0, 0, /* SETTINGS */
    0, 0, 0, 0x4, 0x1, 0, 0, 0, 0, /* SETTINGS ACK */
};

/* The call: ExecutePlan with one message, as PySpark sends it, in the
 * layout of tests/lib/spark_proto.py: session_id (1), user_context (2:
 * user_id 1), then a plan (3) the scanner skips. */
static const char spark_path[] = "/spark.connect.SparkConnectService/ExecutePlan";
static const uint8_t spark_message[] = {
    0x0a, 36, '0', '0', '1', '1', '2', '2', '3', '3', '-', '4', '4', '5', '5',
    '-', '6', '6', '7', '7', '-', '8', '8', '9', '9', '-', 'a', 'a', 'b', 'b',
    'c', 'c', 'd', 'd', 'e', 'e', 'f', 'f',
    0x12, 7, 0x0a, 5, 'a', 'l', 'i', 'c', 'e',
    0x1a, 10, 0x0a, 8, 'S', 'E', 'L', 'E', 'C', 'T', ' ', '1',
};

static const char config_fmt[] =
    "{\"workers\": 1, \"log_level\": \"error\","
    " \"http2\": {\"max_concurrent_streams\": 16, \"stream_window_bytes\": 65535,"
    "             \"connection_window_bytes\": 131072,"
    "             \"max_header_list_bytes\": 4096},"
    " \"upstream\": {\"connect_timeout_ms\": 1000},"
    " \"allowed_path_prefixes\": [\"/spark.connect.SparkConnectService/\"],"
    " \"listeners\": [{\"name\": \"fuzz\", \"address\": \"127.0.0.1\", \"port\": 0,"
    "                  \"insecure\": true, \"auth\": \"none\"}],"
    " \"tenants\": [{\"name\": \"default\", \"user_id\": \"off\","
    "               \"backends\": [{\"name\": \"fuzzed\", \"address\": \"127.0.0.1\","
    "                              \"port\": %u}],"
    "               \"allow\": {\"any_identity\": true}}]}";

static sg_runtime *runtime;
static int backend_listener = -1; /* the process's backend, never closed */
static bool verbose;
static nghttp2_session_callbacks *client_cbs;



/* ---- the harness's client ------------------------------------------------ */

typedef struct bytes {
  uint8_t *p;
  size_t len, cap;
} bytes;

static void bytes_add(bytes *b, const uint8_t *p, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n)
      cap *= 2;
    uint8_t *q = realloc(b->p, cap);
    FUZZ_CHECK(q != NULL);
    b->p = q;
    b->cap = cap;
  }
  if (n > 0)
    memcpy(b->p + b->len, p, n);
  b->len += n;
}

/* Two of these per input: the client of sparkgate, and a shadow that is
 * fed the backend's bytes directly (what sparkgate's upstream session
 * reads) to learn the response body the backend sent. */
typedef struct client {
  nghttp2_session *session;
  bool shadow;
  size_t body_off;     /* of the gRPC-framed request body */
  bytes out;           /* produced by the session, not yet written */
  bytes body;          /* response DATA of stream 1 */
  bool stream_closed;
  uint32_t stream_error;
} client;

static uint8_t request_body[5 + sizeof spark_message];

static ssize_t client_read_body(nghttp2_session *session, int32_t id,
                                uint8_t *buf, size_t length,
                                uint32_t *data_flags,
                                nghttp2_data_source *source, void *user) {
  (void)session;
  (void)id;
  (void)source;
  client *c = user;
  size_t left = sizeof request_body - c->body_off;
  size_t n = left < length ? left : length;
  memcpy(buf, request_body + c->body_off, n);
  c->body_off += n;
  if (c->body_off == sizeof request_body)
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

static int client_on_frame_send(nghttp2_session *session,
                                const nghttp2_frame *frame, void *user) {
  (void)session;
  const client *c = user;
  if (c->shadow)
    return 0; /* the fuzzer's bytes may well be broken */
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
    /* The client found sparkgate's side of the connection broken. */
    fprintf(stderr, "fuzz_h2_upstream: the client ends the connection: %s (%.*s)\n",
            nghttp2_http2_strerror(frame->goaway.error_code),
            (int)frame->goaway.opaque_data_len, frame->goaway.opaque_data);
    FUZZ_CHECK(frame->goaway.error_code == NGHTTP2_NO_ERROR);
  }
  if (verbose && frame->hd.type == NGHTTP2_RST_STREAM)
    fprintf(stderr, "fuzz_h2_upstream: client resets stream %d: %s\n",
            frame->hd.stream_id, nghttp2_http2_strerror(frame->rst_stream.error_code));
  return 0;
}

static int client_on_frame_recv(nghttp2_session *session,
                                const nghttp2_frame *frame, void *user) {
  (void)session;
  const client *c = user;
  if (verbose && !c->shadow)
    fprintf(stderr, "fuzz_h2_upstream: client got frame type %u flags 0x%x stream %d length %zu\n",
            frame->hd.type, frame->hd.flags, frame->hd.stream_id, frame->hd.length);
  return 0;
}

static int client_on_header(nghttp2_session *session, const nghttp2_frame *frame,
                            const uint8_t *name, size_t namelen,
                            const uint8_t *value, size_t valuelen,
                            uint8_t flags, void *user) {
  (void)session;
  (void)frame;
  (void)flags;
  const client *c = user;
  if (verbose && !c->shadow)
    fprintf(stderr, "fuzz_h2_upstream: client header %.*s: %.*s\n", (int)namelen,
            name, (int)valuelen, value);
  return 0;
}

static int client_on_invalid_frame(nghttp2_session *session,
                                   const nghttp2_frame *frame, int error,
                                   void *user) {
  (void)session;
  const client *c = user;
  if (verbose && !c->shadow)
    fprintf(stderr, "fuzz_h2_upstream: client: invalid frame type %u on stream %d: %s\n",
            frame->hd.type, frame->hd.stream_id, nghttp2_strerror(error));
  return 0;
}

static int client_on_stream_close(nghttp2_session *session, int32_t id,
                                  uint32_t error_code, void *user) {
  (void)session;
  client *c = user;
  if (id == 1) {
    c->stream_closed = true;
    c->stream_error = error_code;
  }
  return 0;
}

static int client_on_data_chunk(nghttp2_session *session, uint8_t flags,
                                int32_t id, const uint8_t *data, size_t len,
                                void *user) {
  (void)session;
  (void)flags;
  client *c = user;
  if (id == 1)
    bytes_add(&c->body, data, len);
  return 0;
}

static void client_start(client *c, bool shadow) {
  memset(c, 0, sizeof *c);
  c->shadow = shadow;
  FUZZ_CHECK(nghttp2_session_client_new(&c->session, client_cbs, c) == 0);
  if (shadow) {
    /* Takes at least what sparkgate's upstream session takes (upstream.c,
     * start_session): the same settings but the largest windows, so that
     * the body it sees is never shorter. */
    const nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, NGHTTP2_MAX_WINDOW_SIZE},
    };
    FUZZ_CHECK(nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, iv,
                                       sizeof iv / sizeof iv[0]) == 0);
    FUZZ_CHECK(nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0,
                                                     NGHTTP2_MAX_WINDOW_SIZE) == 0);
  } else {
    FUZZ_CHECK(nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, NULL, 0) == 0);
  }
  static const char ct[] = "application/grpc";
  static const char te[] = "trailers";
  static const char authority[] = "localhost";
#define NV(n, v)                                                               \
  { (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, NGHTTP2_NV_FLAG_NONE }
  const nghttp2_nv nva[] = {
      NV(":method", "POST"),   NV(":scheme", "http"),
      NV(":authority", authority), NV(":path", spark_path),
      NV("content-type", ct),  NV("te", te),
  };
#undef NV
  nghttp2_data_provider prd = {.source = {.ptr = NULL}, .read_callback = client_read_body};
  FUZZ_CHECK(nghttp2_submit_request(c->session, NULL, nva, sizeof nva / sizeof nva[0],
                                    &prd, NULL) == 1);
}

static void client_free(client *c) {
  nghttp2_session_del(c->session);
  free(c->out.p);
  free(c->body.p);
}

/* The body of stream 1 in |backend| (what one backend connection got),
 * as an nghttp2 client that sent the same call reads it. */
static void shadow_read(client *sh, const uint8_t *backend, size_t len) {
  client_start(sh, true);
  const uint8_t *p;
  ssize_t n;
  /* Sent, so that stream 1 is open and its request ended, as sparkgate's
   * is by the time the harness lets the backend answer. */
  while ((n = nghttp2_session_mem_send(sh->session, &p)) > 0)
    ;
  FUZZ_CHECK(n == 0);
  /* A fatal error ends the read; the body so far stands. */
  (void)nghttp2_session_mem_recv(sh->session, backend, len);
}

/* Writes what the socket takes; returns the bytes written, or -1 once the
 * peer has gone (EPIPE: SIGPIPE is ignored). */
static ssize_t write_some(int fd, const uint8_t *p, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = send(fd, p + done, n - done, MSG_NOSIGNAL);
    if (w > 0) {
      done += (size_t)w;
      continue;
    }
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      break;
    return -1;
  }
  return (ssize_t)done;
}

/* Moves the client's frames to the socket. Returns true when a byte moved. */
static bool client_send(client *c, int fd, bool *open) {
  for (;;) {
    const uint8_t *p;
    ssize_t n = nghttp2_session_mem_send(c->session, &p);
    FUZZ_CHECK(n >= 0);
    if (n == 0)
      break;
    bytes_add(&c->out, p, (size_t)n);
  }
  if (!*open || c->out.len == 0)
    return false;
  ssize_t w = write_some(fd, c->out.p, c->out.len);
  if (w < 0) {
    *open = false;
    return false;
  }
  memmove(c->out.p, c->out.p + w, c->out.len - (size_t)w);
  c->out.len -= (size_t)w;
  return w > 0;
}

/* Reads what sparkgate wrote to the client and hands it to the client's
 * session; keeps the first bytes. Returns true when a byte moved. */
static bool client_recv(client *c, int fd, bool *open, uint8_t *head,
                        size_t *head_len, size_t head_cap) {
  uint8_t buf[16384];
  bool moved = false;
  while (*open) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0) {
      moved = true;
      size_t take = (size_t)n;
      if (take > head_cap - *head_len)
        take = head_cap - *head_len;
      memcpy(head + *head_len, buf, take);
      *head_len += take;
      ssize_t rv = nghttp2_session_mem_recv(c->session, buf, (size_t)n);
      if (rv < 0)
        fprintf(stderr, "fuzz_h2_upstream: client: %s\n", nghttp2_strerror((int)rv));
      FUZZ_CHECK(rv == n);
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
      *open = false;
    break;
  }
  return moved;
}

/* ---- the harness's backend ----------------------------------------------- */

typedef struct backend_conn {
  int fd;
  bool open;      /* may still be written to and read from */
  bool feed;      /* gets the bytes; otherwise closed once accepted */
  size_t piece, off;
  uint8_t head[64]; /* the first bytes sparkgate sent */
  size_t head_len;
  /* Walks the frames sparkgate sends: a backend answers a call only once
   * its HEADERS came (nghttp2 has not opened the stream before). */
  uint64_t seen;     /* bytes read */
  uint64_t next_hd;  /* where the next frame header starts */
  uint8_t hd[9];
  size_t hd_have;
  bool saw_request;
} backend_conn;

static int accept_backend(void) {
  for (;;) {
    int fd = accept4(backend_listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      /* Each piece goes out at once: with Nagle, a small piece after the
       * first waits for a delayed ACK (40 ms), long after the input. */
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (fd >= 0 || errno != EINTR)
      return fd;
  }
}

/* Closes without TIME_WAIT: each input opens new loopback connections. */
static void close_reset(int fd) {
  struct linger lg = {.l_onoff = 1, .l_linger = 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  close(fd);
}

/* Connections sparkgate made that nobody accepted (more retries than
 * MAX_UPSTREAMS, or made in the last round) must not greet the next
 * input. */
static void drain_backlog(void) {
  int fd;
  while ((fd = accept_backend()) >= 0)
    close_reset(fd);
}

static void backend_walk(backend_conn *b, const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++, b->seen++) {
    if (b->seen < b->next_hd)
      continue;
    b->hd[b->hd_have++] = p[i];
    if (b->hd_have < 9)
      continue;
    b->hd_have = 0;
    uint32_t len = (uint32_t)b->hd[0] << 16 | (uint32_t)b->hd[1] << 8 | b->hd[2];
    uint32_t id = ((uint32_t)b->hd[5] & 0x7f) << 24 | (uint32_t)b->hd[6] << 16 |
                  (uint32_t)b->hd[7] << 8 | b->hd[8];
    if (verbose)
      fprintf(stderr, "fuzz_h2_upstream: backend got frame type %u flags 0x%x stream %u length %u\n",
              b->hd[3], b->hd[4], id, len);
    if (b->hd[3] == 0x1 && id == 1)
      b->saw_request = true;
    b->next_hd = b->seen + 1 + len;
  }
}

static bool backend_recv(backend_conn *b) {
  uint8_t buf[16384];
  bool moved = false;
  while (b->open) {
    ssize_t n = read(b->fd, buf, sizeof buf);
    if (n > 0) {
      moved = true;
      size_t take = (size_t)n;
      if (take > sizeof b->head - b->head_len)
        take = sizeof b->head - b->head_len;
      memcpy(b->head + b->head_len, buf, take);
      b->head_len += take;
      backend_walk(b, buf, (size_t)n);
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
      b->open = false;
    break;
  }
  return moved;
}

/* ---- set-up -------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  /* As main.c does: a peer that closed must not kill us on write. */
  signal(SIGPIPE, SIG_IGN);
  sg_log_level level = SG_LOG_ERROR;
  const char *want = getenv("FUZZ_H2_LOG");
  if (want != NULL && sg_log_level_parse(want, &level) != 0)
    level = SG_LOG_ERROR;
  sg_log_set_level(level);
  verbose = level == SG_LOG_DEBUG;
  char err[512];
  /* One JSON line per call would be most of the run's cost. */
  if (level == SG_LOG_ERROR && sg_accesslog_open("/dev/null", err, sizeof err) != 0) {
    fprintf(stderr, "fuzz_h2_upstream: access log: %s\n", err);
    abort();
  }

  backend_listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  FUZZ_CHECK(backend_listener >= 0);
  struct sockaddr_in sin;
  memset(&sin, 0, sizeof sin);
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sin.sin_port = 0;
  FUZZ_CHECK(bind(backend_listener, (struct sockaddr *)&sin, sizeof sin) == 0);
  FUZZ_CHECK(listen(backend_listener, 64) == 0);
  socklen_t slen = sizeof sin;
  FUZZ_CHECK(getsockname(backend_listener, (struct sockaddr *)&sin, &slen) == 0);
  unsigned port = ntohs(sin.sin_port);

  char json[sizeof config_fmt + 16];
  snprintf(json, sizeof json, config_fmt, port);
  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  if (sg_config_load_string("/nonexistent/fuzz-h2-upstream.json", json, &cfg,
                            &errs) != 0) {
    for (size_t i = 0; i < errs.count; i++)
      fprintf(stderr, "fuzz_h2_upstream: config: %s\n", errs.messages[i]);
    abort();
  }
  runtime = sg_runtime_new(cfg, NULL, err, sizeof err);
  sg_config_unref(cfg);
  if (runtime == NULL) {
    fprintf(stderr, "fuzz_h2_upstream: runtime: %s\n", err);
    abort();
  }

  request_body[0] = 0;
  request_body[1] = 0;
  request_body[2] = 0;
  request_body[3] = (uint8_t)(sizeof spark_message >> 8);
  request_body[4] = (uint8_t)(sizeof spark_message & 0xff);
  memcpy(request_body + 5, spark_message, sizeof spark_message);

  FUZZ_CHECK(nghttp2_session_callbacks_new(&client_cbs) == 0);
  nghttp2_session_callbacks_set_on_frame_send_callback(client_cbs, client_on_frame_send);
  nghttp2_session_callbacks_set_on_frame_recv_callback(client_cbs, client_on_frame_recv);
  nghttp2_session_callbacks_set_on_header_callback(client_cbs, client_on_header);
  nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(client_cbs,
                                                               client_on_invalid_frame);
  nghttp2_session_callbacks_set_on_stream_close_callback(client_cbs,
                                                         client_on_stream_close);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(client_cbs,
                                                            client_on_data_chunk);
  return 0;
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

/* ---- one input ----------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Counted per input: libFuzzer itself opens descriptors between inputs
   * (the symbolizer it starts to print NEW_FUNC lines). */
  int baseline_fds = fuzz_count_fds();
  drain_backlog();

  /* The backend's bytes: the preface, then the input. */
  size_t total = sizeof backend_preface + size;
  uint8_t *stream = malloc(total);
  FUZZ_CHECK(stream != NULL);
  memcpy(stream, backend_preface, sizeof backend_preface);
  if (size > 0)
    memcpy(stream + sizeof backend_preface, data, size);

  /* Split points from the input itself: frames arrive across reads. The
   * preface is a piece of its own. */
  size_t cuts[MAX_PIECES + 2];
  size_t n_pieces = 1;
  uint64_t h = fnv1a(data, size);
  cuts[0] = 0;
  cuts[1] = sizeof backend_preface;
  for (size_t i = 1; i < MAX_PIECES && size > 1; i++) {
    h = h * 6364136223846793005ull + 1442695040888963407ull;
    size_t c = sizeof backend_preface + (size_t)(h >> 33) % size;
    if (c > cuts[n_pieces])
      cuts[++n_pieces] = c;
  }
  if (total > cuts[n_pieces])
    cuts[++n_pieces] = total;
  /* Retried calls' connections: fed the same bytes, or closed at once. */
  h = h * 6364136223846793005ull + 1442695040888963407ull;
  unsigned retry_modes = (unsigned)(h >> 40);

  int client_fd;
  sg_worker *w = fuzz_worker_with_client(runtime, "fuzz_h2_upstream", &client_fd);
  /* Half the inputs: the client connection writes as a TLS one does
   * (payloads copied, DATA frames cut to fill 16 KiB records, each flush
   * gathered into one chain), so that framing is held to the body
   * property below too. */
  h = h * 6364136223846793005ull + 1442695040888963407ull;
  if ((h >> 37) & 1)
    fuzz_only_conn(w)->io.copy_payload = true;

  client cl;
  client_start(&cl, false);
  bool client_open = true;
  uint8_t head[64];
  size_t head_len = 0;

  backend_conn ups[MAX_UPSTREAMS];
  size_t n_ups = 0;
  int quiet = 0;
  for (int iter = 0; iter < MAX_ITERATIONS; iter++) {
    bool moved = client_send(&cl, client_fd, &client_open);
    event_base_loop(w->base, EVLOOP_NONBLOCK);
    if (n_ups < MAX_UPSTREAMS) {
      int fd = accept_backend();
      if (fd >= 0) {
        backend_conn *b = &ups[n_ups];
        memset(b, 0, sizeof *b);
        b->fd = fd;
        b->open = true;
        b->next_hd = CLIENT_MAGIC_LEN;
        b->feed = n_ups == 0 || (retry_modes >> n_ups & 1) == 0;
        if (verbose)
          fprintf(stderr, "fuzz_h2_upstream: backend connection %zu %s\n", n_ups,
                  b->feed ? "gets the input" : "is closed at once");
        if (!b->feed) {
          close_reset(fd);
          b->fd = -1;
          b->open = false;
        }
        n_ups++;
        moved = true;
      }
    }
    for (size_t i = 0; i < n_ups; i++) {
      backend_conn *b = &ups[i];
      if (!b->open || b->piece >= n_pieces || (b->piece > 0 && !b->saw_request))
        continue;
      size_t end = cuts[b->piece + 1];
      ssize_t wr = write_some(b->fd, stream + b->off, end - b->off);
      if (wr < 0) {
        b->open = false;
        continue;
      }
      moved |= wr > 0;
      if (verbose)
        fprintf(stderr, "fuzz_h2_upstream: backend %zu writes %zd bytes (piece %zu)\n",
                i, wr, b->piece);
      b->off += (size_t)wr;
      if (b->off == end)
        b->piece++;
    }
    event_base_loop(w->base, EVLOOP_NONBLOCK);
    moved |= client_recv(&cl, client_fd, &client_open, head, &head_len, sizeof head);
    for (size_t i = 0; i < n_ups; i++)
      moved |= backend_recv(&ups[i]);

    bool pending = n_ups == 0;
    for (size_t i = 0; i < n_ups; i++)
      pending |= ups[i].open && ups[i].piece < n_pieces &&
                 (ups[i].piece == 0 || ups[i].saw_request);
    if (moved || pending ||
        event_base_get_num_events(w->base, EVENT_BASE_COUNT_ACTIVE) > 0)
      quiet = 0;
    else if (++quiet >= QUIET_ITERATIONS)
      break;
  }
  if (verbose)
    fprintf(stderr, "fuzz_h2_upstream: %zu backend connection(s); client stream %s (%s)\n",
            n_ups, cl.stream_closed ? "closed" : "open",
            nghttp2_http2_strerror(cl.stream_error));

  /* sparkgate's preface on the client connection: a SETTINGS frame on
   * stream 0. */
  if (head_len >= 9) {
    FUZZ_CHECK(head[3] == 0x4);
    FUZZ_CHECK((head[5] & 0x7f) == 0 && head[6] == 0 && head[7] == 0 && head[8] == 0);
  }
  /* And on each upstream connection: the client magic, then SETTINGS. */
  for (size_t i = 0; i < n_ups; i++) {
    const backend_conn *b = &ups[i];
    size_t n = b->head_len < CLIENT_MAGIC_LEN ? b->head_len : CLIENT_MAGIC_LEN;
    FUZZ_CHECK(memcmp(b->head, client_magic, n) == 0);
    if (b->head_len >= CLIENT_MAGIC_LEN + 9)
      FUZZ_CHECK(b->head[CLIENT_MAGIC_LEN + 3] == 0x4);
  }

  /* A call whose upstream leg is over has its answer on the way to the
   * client: the backend's response, or one the proxy made (a rejection or
   * a reset). Otherwise the client waits for ever: the stream's idle check
   * gives up on calls whose response has ended. */
  for (sg_list *cn = w->conns.next; cn != &w->conns; cn = cn->next) {
    sg_conn *c = SG_CONTAINER_OF(cn, sg_conn, worker_link);
    for (sg_list *sn = c->streams.next; sn != &c->streams; sn = sn->next) {
      const sg_stream *st = SG_CONTAINER_OF(sn, sg_stream, conn_link);
      if (st->up_state == SG_UPSTREAM_LEG_DONE && !st->resp_started && !st->rejected)
        fprintf(stderr, "fuzz_h2_upstream: stream %d: the upstream leg is done "
                        "(response %s) but the client got no answer\n",
                st->id, st->resp_eof ? "ended" : "not ended");
      FUZZ_CHECK(st->up_state != SG_UPSTREAM_LEG_DONE || st->resp_started ||
                 st->rejected);
    }
  }

  /* The client got (a prefix of) the body the backend sent: nothing lost
   * in the middle, duplicated, reordered or changed. Every backend
   * connection got the same bytes, and a call is retried only before its
   * response started, so there is one body to compare with. Not for a
   * stream that was reset: nghttp2 hands a DATA frame's payload over as it
   * arrives, so a frame found invalid at its end (by the proxy's session,
   * read in pieces) may have had part of it forwarded before the reset,
   * while the shadow session, reading everything at once, never takes it;
   * the client is told by the reset that the body is incomplete. */
  if (cl.body.len > 0 && !(cl.stream_closed && cl.stream_error != NGHTTP2_NO_ERROR)) {
    client sh;
    shadow_read(&sh, stream, total);
    bool prefix = cl.body.len <= sh.body.len &&
                  memcmp(cl.body.p, sh.body.p, cl.body.len) == 0;
    if (verbose)
      fprintf(stderr, "fuzz_h2_upstream: body: client %zu bytes, backend %zu\n",
              cl.body.len, sh.body.len);
    if (!prefix)
      fprintf(stderr, "fuzz_h2_upstream: the client got %zu body bytes, not a "
                      "prefix of the %zu the backend sent\n",
              cl.body.len, sh.body.len);
    client_free(&sh);
    FUZZ_CHECK(prefix);
  }

  client_free(&cl);
  sg_worker_free(w);
  close(client_fd);
  for (size_t i = 0; i < n_ups; i++)
    if (ups[i].fd >= 0)
      close_reset(ups[i].fd);
  drain_backlog();
  free(stream);
  /* Every socket, timer and event fd went with the worker. */
  if (baseline_fds >= 0 && fuzz_count_fds() != baseline_fds) {
    fprintf(stderr, "fuzz_h2_upstream: %d open descriptors, %d before the input\n",
            fuzz_count_fds(), baseline_fds);
    fuzz_list_fds("fuzz_h2_upstream");
    FUZZ_CHECK(fuzz_count_fds() == baseline_fds);
  }
  return 0;
}
