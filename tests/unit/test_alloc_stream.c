/* Allocation-failure sweeps over a client connection and its first call
 * (issue 7), driven the way tests/fuzz/fuzz_h2_server.c drives the server
 * side: a config with one h2c listener ("auth": "none") and one tenant
 * with one backend, a worker per run, one connection accepted with
 * sg_conn_accept on a socketpair, and the worker's event loop run by the
 * test, for a bounded time.
 *
 * The client (an nghttp2 client session, on allocations the sweep neither
 * fails nor counts) sends the preface, SETTINGS, and a gRPC call to
 * /spark.connect.SparkConnectService/Config: HEADERS, then one DATA frame
 * with a small ConfigRequest and END_STREAM. Three sweeps:
 *   refused backend  127.0.0.1:1, where nothing listens: the proxy answers
 *                    the call UNAVAILABLE (14);
 *   live backend     a child process speaking h2c that answers every call
 *                    with one message and grpc-status 0: this sweeps the
 *                    upstream leg too (pool, client session, forwarding,
 *                    relaying, trailers);
 *   jwt              the same with "methods": ["jwt"] on the listener and
 *                    an HS256 bearer token: verification, token cache.
 *
 * For n = 1, 2, ... the n-th allocation from the accept on fails. nghttp2
 * and libevent may turn that into a reset stream or a closed connection,
 * which is fine; a crash, a block or a descriptor left behind after
 * sg_worker_free, or a client left waiting, is not. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <event2/event.h>
#include <nghttp2/nghttp2.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "alloc_fault.h"
#include "check.h"
#include "hs256_token.h"
#include "sparkgate/accesslog.h"
#include "sparkgate/config.h"
#include "sparkgate/conn.h"
#include "sparkgate/log.h"
#include "sparkgate/worker.h"

/* Far above what one call takes: only a runaway loop gets here. */
#define MAX_N 200000
/* Loop iterations without waiting; a call to the refused backend is over
 * well before. */
#define FAST_ITERATIONS 48
/* Then the loop waits for events in ticks of this long... */
#define TICK_MS 5
/* ... for at most this long. A failure that leaves the client waiting must
 * be ended by a timer of the proxy (idle connection, idle stream, write
 * stall), all set to their shortest below. */
#define SETTLE_MS 6000
/* Settling later than this took a timer of the proxy (a note only: a
 * loaded machine may be slow too). */
#define TIMER_MS 500
#define MAX_REPORTS 12

/* A format: the listener's "auth", more top-level keys, the backend's
 * port. */
#define CONFIG_FORMAT                                                          \
  "{\"workers\": 1, \"log_level\": \"error\","                                 \
  " \"idle_timeout_ms\": 1000, \"stream_idle_timeout_ms\": 1000,"              \
  " \"write_stall_timeout_ms\": 100, \"tls_handshake_timeout_ms\": 1000,"      \
  " \"upstream\": {\"connect_timeout_ms\": 1000},"                             \
  " \"listeners\": [{\"name\": \"alloc\", \"address\": \"127.0.0.1\","         \
  "                  \"port\": 0, \"insecure\": true, \"auth\": %s}],%s"        \
  " \"tenants\": [{\"name\": \"default\","                                     \
  "               \"backends\": [{\"name\": \"spark\","                        \
  "                              \"address\": \"127.0.0.1\", \"port\": %u}],"  \
  "               \"allow\": {\"any_identity\": true}}]}"

/* Tokens of this issuer are signed with tests/fixtures/jwt/hmac.key. */
#define JWT_AUTH                                                               \
  " \"auth\": {\"jwt_providers\": [{\"name\": \"corp\","                       \
  "  \"issuer\": \"https://idp.example\", \"audiences\": [\"spark\"],"          \
  "  \"keys\": [{\"alg\": \"HS256\", \"secret_file\": \""                       \
  SG_SOURCE_ROOT "/tests/fixtures/jwt/hmac.key\"}]}]},"

static int reports;

/* Bytes either way, in static buffers. */
static uint8_t to_server[4096];
static size_t to_server_len;
static uint8_t from_server[1 << 18];
static size_t from_server_len;

static int count_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL)
    return -1;
  int n = 0;
  while (readdir(d) != NULL)
    n++;
  closedir(d);
  return n;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#define NV(n, v)                                                               \
  {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1,               \
   NGHTTP2_NV_FLAG_NONE}

/* nghttp2 sessions of the test itself (client and backend) allocate
 * beside the sweep: never failed, never counted. */
static void *raw_malloc(size_t size, void *ud) {
  (void)ud;
  return alloc_fault_raw_malloc(size);
}
static void raw_free(void *p, void *ud) {
  (void)ud;
  alloc_fault_raw_free(p);
}
static void *raw_calloc(size_t n, size_t size, void *ud) {
  (void)ud;
  return alloc_fault_raw_calloc(n, size);
}
static void *raw_realloc(void *p, size_t size, void *ud) {
  (void)ud;
  return alloc_fault_raw_realloc(p, size);
}
static nghttp2_mem raw_mem = {NULL, raw_malloc, raw_free, raw_calloc,
                              raw_realloc};

/* ---- the backend (a child process) ---------------------------------------- */

/* A ConfigResponse (session_id "s") in one gRPC message. */
static const uint8_t config_response[] = {0, 0, 0, 0, 3, 0x0a, 1, 's'};

typedef struct backend_stream {
  size_t off;
} backend_stream;

static ssize_t backend_read(nghttp2_session *session, int32_t stream_id,
                            uint8_t *buf, size_t length, uint32_t *flags,
                            nghttp2_data_source *source, void *user_data) {
  (void)user_data;
  backend_stream *bs = source->ptr;
  size_t n = sizeof config_response - bs->off;
  if (n > length)
    n = length;
  memcpy(buf, config_response + bs->off, n);
  bs->off += n;
  if (bs->off == sizeof config_response) {
    nghttp2_nv trailers[] = {NV("grpc-status", "0")};
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    nghttp2_submit_trailer(session, stream_id, trailers, 1);
  }
  return (ssize_t)n;
}

static int backend_on_frame_recv(nghttp2_session *session,
                                 const nghttp2_frame *frame, void *user_data) {
  (void)user_data;
  if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
      !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  static backend_stream streams[64];
  backend_stream *bs = &streams[frame->hd.stream_id % 64];
  bs->off = 0;
  nghttp2_nv hdrs[] = {NV(":status", "200"), NV("content-type", "application/grpc")};
  nghttp2_data_provider dp = {.source.ptr = bs, .read_callback = backend_read};
  nghttp2_submit_response(session, frame->hd.stream_id, hdrs, 2, &dp);
  return 0;
}

/* One connection: requests in, answers out, until the proxy closes it. */
static void backend_serve(int fd) {
  nghttp2_session_callbacks *cbs;
  nghttp2_session *session;
  if (nghttp2_session_callbacks_new(&cbs) != 0)
    return;
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, backend_on_frame_recv);
  int rv = nghttp2_session_server_new3(&session, cbs, NULL, NULL, &raw_mem);
  nghttp2_session_callbacks_del(cbs);
  if (rv != 0)
    return;
  nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, NULL, 0);
  for (;;) {
    const uint8_t *out;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(session, &out)) > 0)
      if (send(fd, out, (size_t)n, MSG_NOSIGNAL) != n)
        goto done;
    if (n < 0 || (!nghttp2_session_want_read(session) &&
                  !nghttp2_session_want_write(session)))
      break;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 10000) <= 0)
      break;
    uint8_t buf[16384];
    n = read(fd, buf, sizeof buf);
    if (n <= 0 || nghttp2_session_mem_recv(session, buf, (size_t)n) < 0)
      break;
  }
done:
  nghttp2_session_del(session);
}

/* Starts the backend; returns its pid and its port. */
static pid_t backend_start(uint16_t *port) {
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) != 0 ||
      listen(lfd, 16) != 0 ||
      getsockname(lfd, (struct sockaddr *)&a, &alen) != 0) {
    printf("backend: cannot listen: %s\n", strerror(errno));
    exit(1);
  }
  *port = ntohs(a.sin_port);
  pid_t pid = fork();
  if (pid < 0) {
    printf("backend: cannot fork: %s\n", strerror(errno));
    exit(1);
  }
  if (pid == 0) {
    /* Gone with the test, whatever happens to it. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
      int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR)
          continue;
        _exit(0);
      }
      backend_serve(fd);
      close(fd);
    }
  }
  close(lfd);
  return pid;
}

/* ---- the client ------------------------------------------------------------ */

typedef struct client {
  nghttp2_session *session;
  const uint8_t *body;
  size_t body_len, body_off;
  char grpc_status[8]; /* of stream 1, "" until seen */
  size_t message_bytes; /* DATA of stream 1 */
  bool closed;          /* stream 1 ended: answered or reset */
  bool goaway;          /* the server said it closes the connection */
  size_t fed;           /* bytes of from_server given to the session */
  bool broken;          /* the server's bytes were not HTTP/2 */
} client;

static ssize_t read_body(nghttp2_session *session, int32_t stream_id,
                         uint8_t *buf, size_t length, uint32_t *flags,
                         nghttp2_data_source *source, void *user_data) {
  (void)session;
  (void)stream_id;
  (void)source;
  client *c = user_data;
  size_t n = c->body_len - c->body_off;
  if (n > length)
    n = length;
  memcpy(buf, c->body + c->body_off, n);
  c->body_off += n;
  if (c->body_off == c->body_len)
    *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *user_data) {
  (void)session;
  (void)flags;
  client *c = user_data;
  if (frame->hd.stream_id == 1 && namelen == 11 &&
      memcmp(name, "grpc-status", 11) == 0 && valuelen < sizeof c->grpc_status) {
    memcpy(c->grpc_status, value, valuelen);
    c->grpc_status[valuelen] = '\0';
  }
  return 0;
}

static int on_data(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                   const uint8_t *data, size_t len, void *user_data) {
  (void)session;
  (void)flags;
  (void)data;
  client *c = user_data;
  if (stream_id == 1)
    c->message_bytes += len;
  return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                         void *user_data) {
  (void)session;
  client *c = user_data;
  if (frame->hd.type == NGHTTP2_GOAWAY)
    c->goaway = true;
  return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id,
                           uint32_t error_code, void *user_data) {
  (void)session;
  (void)error_code;
  client *c = user_data;
  if (stream_id == 1)
    c->closed = true;
  return 0;
}

/* A ConfigRequest: session_id (1) and user_context (2) { user_id (1) },
 * in a gRPC frame (uncompressed, 4-byte big-endian length). */
static const uint8_t config_request[] = {
    0, 0, 0, 0, 47,
    0x0a, 36, '0', '0', '1', '1', '2', '2', '3', '3', '-', '4', '4', '5', '5',
    '-', '6', '6', '7', '7', '-', '8', '8', '9', '9', '-', 'a', 'a', 'b', 'b',
    'c', 'c', 'd', 'd', 'e', 'e', 'f', 'f',
    0x12, 7, 0x0a, 5, 'a', 'l', 'i', 'c', 'e'};

/* A client session that has sent the call; its bytes go to to_server. */
static void client_start(client *c, const char *authorization) {
  memset(c, 0, sizeof *c);
  c->body = config_request;
  c->body_len = sizeof config_request;
  nghttp2_session_callbacks *cbs;
  if (nghttp2_session_callbacks_new(&cbs) != 0)
    exit(2);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  int rv = nghttp2_session_client_new3(&c->session, cbs, c, NULL, &raw_mem);
  nghttp2_session_callbacks_del(cbs);
  if (rv != 0)
    exit(2);
  nghttp2_nv hdrs[] = {
      NV(":method", "POST"),
      NV(":scheme", "http"),
      NV(":authority", "127.0.0.1"),
      NV(":path", "/spark.connect.SparkConnectService/Config"),
      NV("content-type", "application/grpc"),
      NV("te", "trailers"),
      NV("authorization", ""),
  };
  size_t n_hdrs = sizeof hdrs / sizeof *hdrs - 1;
  if (authorization != NULL) {
    hdrs[n_hdrs].value = (uint8_t *)authorization;
    hdrs[n_hdrs].valuelen = strlen(authorization);
    n_hdrs++;
  }
  nghttp2_data_provider body = {.read_callback = read_body};
  if (nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, NULL, 0) != 0 ||
      nghttp2_submit_request(c->session, NULL, hdrs, n_hdrs, &body, NULL) != 1)
    exit(2);
  to_server_len = 0;
  for (;;) {
    const uint8_t *out;
    ssize_t n = nghttp2_session_mem_send(c->session, &out);
    if (n < 0 || to_server_len + (size_t)n > sizeof to_server)
      exit(2);
    if (n == 0)
      break;
    memcpy(to_server + to_server_len, out, (size_t)n);
    to_server_len += (size_t)n;
  }
}

/* Hands the client what the server wrote since the last call. */
static void client_feed(client *c) {
  if (c->fed < from_server_len &&
      nghttp2_session_mem_recv(c->session, from_server + c->fed,
                               from_server_len - c->fed) < 0)
    c->broken = true;
  c->fed = from_server_len;
}

/* ---- a token ---------------------------------------------------------------- */

/* "Bearer " and an HS256 token for alice, valid for an hour. */
static void bearer_token(char *out, size_t outlen) {
  uint8_t key[128];
  FILE *f = fopen(SG_SOURCE_ROOT "/tests/fixtures/jwt/hmac.key", "rb");
  size_t keylen = f != NULL ? fread(key, 1, sizeof key, f) : 0;
  if (f != NULL)
    fclose(f);
  while (keylen > 0 && (key[keylen - 1] == '\n' || key[keylen - 1] == '\r'))
    keylen--;
  if (keylen == 0)
    exit(1);
  char payload[256];
  long now = (long)time(NULL);
  snprintf(payload, sizeof payload,
           "{\"iss\":\"https://idp.example\",\"aud\":\"spark\",\"sub\":\"alice\","
           "\"iat\":%ld,\"exp\":%ld}",
           now, now + 3600);
  char token[1024];
  test_hs256_token(key, keylen, payload, token, sizeof token);
  snprintf(out, outlen, "Bearer %s", token);
}

/* ---- one run -------------------------------------------------------------- */

/* Reads what the server wrote; false once it has closed its end. */
static bool drain(int fd) {
  for (;;) {
    uint8_t scratch[4096];
    uint8_t *to = from_server + from_server_len;
    size_t room = sizeof from_server - from_server_len;
    if (room == 0) {
      to = scratch;
      room = sizeof scratch;
    }
    ssize_t n = read(fd, to, room);
    if (n > 0) {
      if (to != scratch)
        from_server_len += (size_t)n;
      continue;
    }
    if (n == 0)
      return false;
    if (errno == EINTR)
      continue;
    return errno == EAGAIN || errno == EWOULDBLOCK;
  }
}

typedef struct verdict {
  bool hit;      /* the failure happened */
  bool answered; /* the client got the answer of a run without failures */
  /* The client knows where it stands: its call ended (answered or
   * reset), or the server said goodbye or closed the connection. A client
   * left waiting on a live connection is a hang. */
  bool settled;
  bool by_timer; /* ... only after a timer of the proxy fired */
  bool broken;   /* the client could not read the server's bytes */
  /* libevent 2.1's bufferevent_socket_new goes on when it cannot add its
   * output callback: nothing written to the client is ever sent, so no
   * timeout of the proxy can say goodbye either, until the client gives
   * up. Not ours to mend. */
  bool libevent_lost_output;
  long left;    /* blocks left behind */
  int fds_left; /* descriptors left behind */
} verdict;

typedef struct scenario {
  const char *name;
  sg_runtime *rt;
  const char *authorization; /* the header's value; NULL: none */
  const char *want_status;    /* the answer without failures */
  size_t want_message_bytes;
} scenario;

/* The access log keeps one line's JSON object per thread, whose values
 * change type (a string here, null there) with each call: a line of one
 * shape before each count makes the counts comparable. */
static void settle_access_log(void) {
  sg_access_record r = {.conn_id = 1, .stream_id = 1, .client = "c",
                        .identity = "i", .tenant = "t", .method = "m",
                        .session_id = "s", .backend = "b", .grpc_status = 0,
                        .reason = "r"};
  sg_accesslog_write(&r);
}

static void run_once(const scenario *sc, unsigned long n, verdict *v) {
  memset(v, 0, sizeof *v);
  int fds = count_fds();
  settle_access_log();
  long before = alloc_fault_outstanding();
  client c;
  client_start(&c, sc->authorization);

  char err[256];
  uint16_t ports[1] = {0};
  sg_worker *w = sg_worker_new(0, sc->rt, ports, err, sizeof err);
  if (w == NULL) {
    printf("worker: %s\n", err);
    exit(1);
  }
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
    exit(1);
  /* A made-up TCP peer, for the log lines. */
  struct sockaddr_in peer;
  memset(&peer, 0, sizeof peer);
  peer.sin_family = AF_INET;
  peer.sin_port = htons(40000);
  peer.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  from_server_len = 0;

  alloc_fault_arm(n);
  int64_t start = now_ms();
  sg_conn_accept(w, 0, sv[0], (const struct sockaddr *)&peer, (int)sizeof peer);
  /* The client connection's bufferevent lost its output callback? (The
   * upstream leg's would be ended by the proxy's timers.) */
  v->libevent_lost_output = alloc_fault_hit() &&
                            alloc_fault_site_has("evbuffer_add_cb") &&
                            alloc_fault_site_has("bufferevent_socket_new");
  size_t off = 0;
  bool open = true;
  for (int i = 0;; i++) {
    while (open && off < to_server_len) {
      ssize_t wr = send(sv[1], to_server + off, to_server_len - off, MSG_NOSIGNAL);
      if (wr > 0)
        off += (size_t)wr;
      else if (wr < 0 && errno == EINTR)
        continue;
      else if (wr < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        break;
      else
        open = false;
    }
    /* Waiting by sleeping, not with a libevent timer: adding one
     * allocates, and the harness must not take the failure for itself. */
    if (i >= FAST_ITERATIONS) {
      struct timespec tick = {0, TICK_MS * 1000000L};
      nanosleep(&tick, NULL);
    }
    event_base_loop(w->base, EVLOOP_NONBLOCK);
    if (!drain(sv[1]))
      open = false;
    client_feed(&c);
    if (c.closed || c.goaway || !open || w->n_conns == 0 ||
        v->libevent_lost_output || now_ms() - start > SETTLE_MS)
      break;
  }
  v->settled = c.closed || c.goaway || !open || w->n_conns == 0;
  v->by_timer = now_ms() - start > TIMER_MS;
  alloc_fault_disarm();
  v->hit = alloc_fault_hit();
  v->answered = c.closed && strcmp(c.grpc_status, sc->want_status) == 0 &&
                c.message_bytes == sc->want_message_bytes;
  v->broken = c.broken;
  nghttp2_session_del(c.session);

  sg_worker_free(w);
  close(sv[1]);
  settle_access_log();
  v->left = alloc_fault_outstanding() - before;
  v->fds_left = count_fds() - fds;
}

static void report(const scenario *sc, unsigned long n, const char *what) {
  if (++reports > MAX_REPORTS)
    return;
  printf("%s: n=%lu: %s\n", sc->name, n, what);
  alloc_fault_print_site(stdout);
}

static void sweep(const scenario *sc) {
  /* Twice: what libraries set up once is no leak. */
  verdict v;
  run_once(sc, 0, &v);
  run_once(sc, 0, &v);
  bool reference_ok = v.answered && v.settled && v.left == 0 && v.fds_left == 0;
  CHECK(reference_ok);
  if (!reference_ok) {
    printf("%s: without failures: answered %d, settled %d, by timer %d, "
           "%ld blocks and %d descriptors left\n",
           sc->name, v.answered, v.settled, v.by_timer, v.left, v.fds_left);
    return;
  }

  unsigned long n, answered = 0, ended = 0, by_timer = 0, lost = 0;
  int notes = 0;
  for (n = 1; n <= MAX_N; n++) {
    run_once(sc, n, &v);
    if (v.left != 0) {
      /* A cache that a failure emptied fills again on this run; a leak
       * leaks again. */
      verdict again;
      run_once(sc, n, &again);
      if (again.left != 0) {
        char what[96];
        snprintf(what, sizeof what,
                 "%ld block(s) left behind (%ld on a second run)", v.left,
                 again.left);
        report(sc, n, what);
      }
      CHECK(again.left == 0);
    }
    if (v.fds_left != 0) {
      char what[64];
      snprintf(what, sizeof what, "%d descriptor(s) left behind", v.fds_left);
      report(sc, n, what);
    }
    CHECK(v.fds_left == 0);
    if (v.broken)
      report(sc, n, "the server's bytes were not HTTP/2");
    CHECK(!v.broken);
    if (!v.settled && v.libevent_lost_output) {
      lost++;
    } else {
      if (!v.settled)
        report(sc, n, "the client was left waiting on a live connection");
      CHECK(v.settled);
    }
    if (!v.hit) {
      /* Past the last allocation: the call must go as without failures. */
      if (!v.answered)
        report(sc, n, "no failure left to inject, yet the call was not answered");
      CHECK(v.answered);
      break;
    }
    if (v.settled && v.by_timer) {
      /* Not wrong, but slow: the client waited for a timeout. */
      by_timer++;
      if (++notes <= MAX_REPORTS) {
        printf("%s: n=%lu: note: the call ended only by a timeout of the "
               "proxy\n", sc->name, n);
        alloc_fault_print_site(stdout);
      }
    }
    if (v.answered)
      answered++;
    else
      ended++;
  }
  if (n > MAX_N)
    printf("%s: still failing allocations after %d runs\n", sc->name, MAX_N);
  CHECK(n <= MAX_N);
  printf("%s: %lu allocations swept: %lu calls answered as without failures, "
         "%lu ended otherwise (%lu only by a timeout), %lu lost to libevent's "
         "bufferevent_socket_new\n",
         sc->name, n - 1, answered, ended, by_timer, lost);
}

static sg_runtime *runtime_for(const char *listener_auth, const char *more,
                               uint16_t backend_port) {
  char json[2048];
  snprintf(json, sizeof json, CONFIG_FORMAT, listener_auth, more, backend_port);
  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  if (sg_config_load_string("/nonexistent/alloc-stream.json", json, &cfg,
                            &errs) != 0) {
    for (size_t i = 0; i < errs.count; i++)
      printf("config: %s\n", errs.messages[i]);
    exit(1);
  }
  char err[512];
  sg_runtime *rt = sg_runtime_new(cfg, NULL, err, sizeof err);
  sg_config_unref(cfg);
  if (rt == NULL) {
    printf("runtime: %s\n", err);
    exit(1);
  }
  return rt;
}

int main(void) {
  alloc_fault_require("test_alloc_stream");
  signal(SIGPIPE, SIG_IGN);
  sg_log_set_level(SG_LOG_ERROR);
  char err[512];
  /* One JSON line per call; not what this test looks at. */
  if (sg_accesslog_open("/dev/null", err, sizeof err) != 0) {
    printf("access log: %s\n", err);
    return 1;
  }
  uint16_t port;
  pid_t backend = backend_start(&port);
  char authorization[1024];
  bearer_token(authorization, sizeof authorization);
  scenario refused = {"refused backend", runtime_for("\"none\"", "", 1), NULL,
                      "14", 0};
  scenario live = {"live backend", runtime_for("\"none\"", "", port), NULL,
                   "0", sizeof config_response};
  scenario jwt = {"jwt, live backend",
                  runtime_for("{\"methods\": [\"jwt\"]}", JWT_AUTH, port),
                  authorization, "0", sizeof config_response};

  /* sparkgate logs what each failure did to the connection: thousands of
   * lines that say nothing about the result. Every failed check is
   * reported on stdout. */
  fflush(stderr);
  int saved_stderr = dup(STDERR_FILENO);
  int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (saved_stderr < 0 || devnull < 0 || dup2(devnull, STDERR_FILENO) < 0)
    return 1;
  close(devnull);

  sweep(&refused);
  sweep(&live);
  sweep(&jwt);

  dup2(saved_stderr, STDERR_FILENO);
  close(saved_stderr);
  kill(backend, SIGTERM);
  waitpid(backend, NULL, 0);
  sg_runtime_unref(refused.rt);
  sg_runtime_unref(live.rt);
  sg_runtime_unref(jwt.rt);
  return check_report("test_alloc_stream");
}
