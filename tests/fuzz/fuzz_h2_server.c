/* libFuzzer target: a client connection end to end through sparkgate's own
 * HTTP/2 server side: conn.c (nghttp2 session and callbacks, abuse
 * budget), stream.c (header lists, request body, flow-control credit),
 * admission.c (gRPC shape, request target, auth "none", grpc-timeout,
 * tenant, method, limits), sparkmsg (Spark request bodies) and upstream.c
 * (a backend that refuses connections).
 *
 * Built once: a config with one h2c listener ("auth": "none") and one
 * tenant whose only backend is 127.0.0.1:1 (nothing listens there: every
 * call that gets that far fails over loopback with UNAVAILABLE), and its
 * runtime. Per input, so that no state carries over between inputs: a new
 * worker (its own event_base; its listener is bound on 127.0.0.1 port 0 but
 * never used), one connection accepted through sg_conn_accept on one end of
 * a socketpair, the input written into the other end (after the HTTP/2
 * client preface, added when the input does not start with it) in a few
 * pieces, the event loop run non-blocking a bounded number of times while
 * the client end is drained, then everything torn down with
 * sg_worker_free. LeakSanitizer checks each input for leaks; the target
 * checks for leaked file descriptors and that the server spoke HTTP/2
 * (its first frame is SETTINGS).
 *
 * FUZZ_H2_LOG=debug|info (environment) shows sparkgate's log while
 * reproducing a crash. */
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
#include <sys/socket.h>

#include <event2/event.h>

#include "fuzz_conn.h"
#include "fuzz_support.h"
#include "sparkgate/accesslog.h"
#include "sparkgate/config.h"
#include "sparkgate/conn.h"
#include "sparkgate/log.h"
#include "sparkgate/worker.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


/* Loop iterations after the last piece of input was written. Each one runs
 * what is ready; deferred bufferevent callbacks and the flushes they
 * schedule need a few rounds. */
#define SETTLE_ITERATIONS 24
#define MAX_PIECES 4

static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define PREFACE_LEN (sizeof preface - 1)

/* Spark calls (scanned, rewrite mode: the default) and a non-Spark prefix
 * (forwarded without scanning) are both allowed. Small windows make flow
 * control reachable with small inputs. */
static const char config_json[] =
    "{\"workers\": 1, \"log_level\": \"error\","
    " \"http2\": {\"max_concurrent_streams\": 16, \"stream_window_bytes\": 65535,"
    "             \"connection_window_bytes\": 131072,"
    "             \"max_header_list_bytes\": 4096},"
    " \"upstream\": {\"connect_timeout_ms\": 1000},"
    " \"allowed_path_prefixes\": [\"/spark.connect.SparkConnectService/\","
    "                             \"/grpc.health.v1.Health/\"],"
    " \"listeners\": [{\"name\": \"fuzz\", \"address\": \"127.0.0.1\", \"port\": 0,"
    "                  \"insecure\": true, \"auth\": \"none\"}],"
    " \"tenants\": [{\"name\": \"default\","
    "               \"backends\": [{\"name\": \"refused\", \"address\": \"127.0.0.1\","
    "                              \"port\": 1}],"
    "               \"allow\": {\"any_identity\": true}}]}";

static sg_runtime *runtime;



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
  char err[512];
  /* One JSON line per call would be most of the run's cost. */
  if (level == SG_LOG_ERROR && sg_accesslog_open("/dev/null", err, sizeof err) != 0) {
    fprintf(stderr, "fuzz_h2_server: access log: %s\n", err);
    abort();
  }

  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  if (sg_config_load_string("/nonexistent/fuzz-h2.json", config_json, &cfg,
                            &errs) != 0) {
    for (size_t i = 0; i < errs.count; i++)
      fprintf(stderr, "fuzz_h2_server: config: %s\n", errs.messages[i]);
    abort();
  }
  runtime = sg_runtime_new(cfg, NULL, err, sizeof err);
  sg_config_unref(cfg);
  if (runtime == NULL) {
    fprintf(stderr, "fuzz_h2_server: runtime: %s\n", err);
    abort();
  }
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

/* Reads and keeps the first bytes the server wrote; discards the rest.
 * Returns false once the server has closed its end. */
static bool drain(int fd, uint8_t *head, size_t *head_len, size_t head_cap) {
  uint8_t buf[16384];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0) {
      size_t take = (size_t)n;
      if (take > head_cap - *head_len)
        take = head_cap - *head_len;
      memcpy(head + *head_len, buf, take);
      *head_len += take;
      continue;
    }
    if (n == 0)
      return false;
    if (errno == EINTR)
      continue;
    return errno == EAGAIN || errno == EWOULDBLOCK;
  }
}

/* Writes what the socket takes; returns the bytes written, or -1 once the
 * server has gone (EPIPE: SIGPIPE is ignored). */
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Counted per input: libFuzzer itself opens descriptors between inputs
   * (the symbolizer it starts to print NEW_FUNC lines). */
  int baseline_fds = fuzz_count_fds();
  /* The client's bytes: the preface unless the input brings it. */
  bool has_preface = size >= PREFACE_LEN && memcmp(data, preface, PREFACE_LEN) == 0;
  size_t total = has_preface ? size : PREFACE_LEN + size;
  uint8_t *stream = malloc(total > 0 ? total : 1);
  FUZZ_CHECK(stream != NULL);
  if (has_preface) {
    memcpy(stream, data, size);
  } else {
    memcpy(stream, preface, PREFACE_LEN);
    if (size > 0)
      memcpy(stream + PREFACE_LEN, data, size);
  }

  /* Split points from the input itself: frames arrive across reads. */
  size_t cuts[MAX_PIECES + 1];
  size_t n_pieces = 1;
  uint64_t h = fnv1a(data, size);
  cuts[0] = 0;
  for (size_t i = 1; i < MAX_PIECES && total > 1; i++) {
    h = h * 6364136223846793005ull + 1442695040888963407ull;
    size_t c = (size_t)(h >> 33) % total;
    if (c > cuts[n_pieces - 1])
      cuts[n_pieces++] = c;
  }
  cuts[n_pieces] = total;

  int client_fd;
  sg_worker *w = fuzz_worker_with_client(runtime, "fuzz_h2_server", &client_fd);

  uint8_t head[64];
  size_t head_len = 0;
  bool open = true;
  size_t piece = 0, off = 0;
  for (int iter = 0; iter < 4 * MAX_PIECES + SETTLE_ITERATIONS; iter++) {
    if (open && piece < n_pieces) {
      size_t end = cuts[piece + 1];
      ssize_t wr = write_some(client_fd, stream + off, end - off);
      if (wr < 0) {
        open = false;
      } else {
        off += (size_t)wr;
        if (off == end)
          piece++;
      }
    }
    event_base_loop(w->base, EVLOOP_NONBLOCK);
    if (!drain(client_fd, head, &head_len, sizeof head))
      open = false;
    if (w->n_conns == 0 && (!open || piece == n_pieces))
      break;
  }

  /* The server's preface comes first: a SETTINGS frame on stream 0. */
  if (head_len >= 9) {
    FUZZ_CHECK(head[3] == 0x4);
    FUZZ_CHECK((head[5] & 0x7f) == 0 && head[6] == 0 && head[7] == 0 && head[8] == 0);
  }

  sg_worker_free(w);
  close(client_fd);
  free(stream);
  /* Every socket, timer and event fd went with the worker. */
  if (baseline_fds >= 0 && fuzz_count_fds() != baseline_fds) {
    fprintf(stderr, "fuzz_h2_server: %d open descriptors, %d before the input\n",
            fuzz_count_fds(), baseline_fds);
    fuzz_list_fds("fuzz_h2_server");
    FUZZ_CHECK(fuzz_count_fds() == baseline_fds);
  }
  return 0;
}
