/* Admin listener: served on port 0 inside this process and fetched with raw
 * HTTP/1.1 over loopback: /metrics (content type, body), /healthz,
 * /readyz following the ready flag, 404, 405, HEAD; the "listening" log
 * line; bind errors; the "admin" config sub-object and its clash check
 * against client listeners. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "check.h"
#include "sparkgate/admin.h"
#include "sparkgate/metrics.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sends |request| to |port| and runs |base| until the server closes the
 * connection (requests say "Connection: close") or 5 s pass. Returns the
 * whole response in a malloc'd string, or NULL. */
static char *fetch(struct event_base *base, int family, uint16_t port, const char *request) {
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_storage ss = {0};
  socklen_t sslen;
  if (family == AF_INET6) {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    in6->sin6_addr = in6addr_loopback;
    sslen = sizeof *in6;
  } else {
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
    in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sslen = sizeof *in;
  }
  /* The kernel completes a loopback connect from the listen backlog; the
   * server's loop only has to run for the accept and the answer. */
  if (connect(fd, (struct sockaddr *)&ss, sslen) != 0 ||
      send(fd, request, strlen(request), MSG_NOSIGNAL) != (ssize_t)strlen(request)) {
    close(fd);
    return NULL;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  double deadline = now_s() + 5;
  bool closed = false;
  while (!closed && now_s() < deadline) {
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 10) <= 0)
      continue;
    for (;;) {
      if (len + 1 >= cap) {
        cap *= 2;
        buf = realloc(buf, cap);
      }
      ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
      if (n > 0) {
        len += (size_t)n;
        continue;
      }
      if (n == 0)
        closed = true;
      else if (errno != EAGAIN && errno != EWOULDBLOCK)
        closed = true;
      break;
    }
  }
  close(fd);
  buf[len] = '\0';
  if (!closed) {
    fprintf(stderr, "no complete response within 5 s\n");
    free(buf);
    return NULL;
  }
  return buf;
}

static char *get(struct event_base *base, uint16_t port, const char *method, const char *path) {
  char req[256];
  snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n",
           method, path, strcmp(method, "POST") == 0 ? "Content-Length: 0\r\n" : "");
  return fetch(base, AF_INET, port, req);
}

static int status_of(const char *resp) {
  int code = 0;
  if (resp == NULL || sscanf(resp, "HTTP/1.%*d %d", &code) != 1)
    return -1;
  return code;
}

static const char *body_of(const char *resp) {
  const char *p = resp != NULL ? strstr(resp, "\r\n\r\n") : NULL;
  return p != NULL ? p + 4 : "";
}

/* Runs |fn| with stderr going to a temp file; returns what it wrote. */
static char *capture_stderr_begin(int *saved) {
  fflush(stderr);
  *saved = dup(STDERR_FILENO);
  char *path = strdup("/tmp/sg-admin-stderr-XXXXXX");
  int fd = mkstemp(path);
  dup2(fd, STDERR_FILENO);
  close(fd);
  return path;
}

static char *capture_stderr_end(int saved, char *path) {
  fflush(stderr);
  dup2(saved, STDERR_FILENO);
  close(saved);
  FILE *f = fopen(path, "r");
  char *s = calloc(1, 4096);
  if (f != NULL) {
    size_t n = fread(s, 1, 4095, f);
    s[n] = '\0';
    fclose(f);
  }
  unlink(path);
  free(path);
  return s;
}

static void test_server(void) {
  struct event_base *base = event_base_new();
  sg_metrics *m = sg_metrics_new(1, NULL);
  sg_admin_config cfg = {.enabled = true, .address = "127.0.0.1", .port = 0};
  char err[256] = "";
  int saved;
  char *tmp = capture_stderr_begin(&saved);
  sg_admin *a = sg_admin_new(base, &cfg, m, err, sizeof err);
  char *log = capture_stderr_end(saved, tmp);
  CHECK(a != NULL);
  if (a == NULL) {
    fprintf(stderr, "sg_admin_new: %s\n", err);
    free(log);
    sg_metrics_free(m);
    event_base_free(base);
    return;
  }
  uint16_t port = sg_admin_port(a);
  CHECK(port != 0);
  char want[64];
  snprintf(want, sizeof want, "admin listening on 127.0.0.1:%u\n", (unsigned)port);
  CHECK_STR_CONTAINS(log, want);
  free(log);

  char *r = get(base, port, "GET", "/metrics");
  CHECK(status_of(r) == 200);
  CHECK_STR_CONTAINS(r, "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n");
  CHECK_STR_CONTAINS(body_of(r), "# TYPE sparkgate_build_info gauge\n");
  CHECK_STR_CONTAINS(body_of(r), "sparkgate_config_reloads_total{result=\"ok\"} 0\n");
  free(r);

  /* A query string does not change the resource. */
  r = get(base, port, "GET", "/metrics?debug=1");
  CHECK(status_of(r) == 200);
  free(r);

  /* HEAD: the headers of GET, no body. */
  r = get(base, port, "HEAD", "/metrics");
  CHECK(status_of(r) == 200);
  CHECK_STR_CONTAINS(r, "text/plain; version=0.0.4");
  CHECK(strcmp(body_of(r), "") == 0);
  free(r);
  r = get(base, port, "HEAD", "/healthz");
  CHECK(status_of(r) == 200);
  CHECK_STR_CONTAINS(r, "Content-Length: 3\r\n");
  CHECK(strcmp(body_of(r), "") == 0);
  free(r);

  r = get(base, port, "GET", "/healthz");
  CHECK(status_of(r) == 200);
  CHECK(strcmp(body_of(r), "ok\n") == 0);
  free(r);

  /* Not ready until the flag says so; 503 again while draining. */
  r = get(base, port, "GET", "/readyz");
  CHECK(status_of(r) == 503);
  free(r);
  sg_admin_set_ready(a, true);
  CHECK(sg_admin_ready(a));
  r = get(base, port, "GET", "/readyz");
  CHECK(status_of(r) == 200);
  CHECK(strcmp(body_of(r), "ready\n") == 0);
  free(r);
  sg_admin_set_ready(a, false);
  r = get(base, port, "GET", "/readyz");
  CHECK(status_of(r) == 503);
  CHECK(strcmp(body_of(r), "not ready\n") == 0);
  free(r);
  r = get(base, port, "GET", "/healthz");
  CHECK(status_of(r) == 200); /* alive while draining */
  free(r);

  r = get(base, port, "GET", "/nope");
  CHECK(status_of(r) == 404);
  free(r);
  r = get(base, port, "GET", "/");
  CHECK(status_of(r) == 404);
  free(r);
  r = get(base, port, "GET", "/metrics/");
  CHECK(status_of(r) == 404);
  free(r);

  r = get(base, port, "POST", "/metrics");
  CHECK(status_of(r) == 405);
  CHECK_STR_CONTAINS(r, "Allow: GET, HEAD\r\n");
  free(r);
  r = get(base, port, "DELETE", "/readyz");
  CHECK(status_of(r) == 405);
  free(r);
  r = get(base, port, "PUT", "/healthz");
  CHECK(status_of(r) == 405);
  free(r);

  /* The port is taken: a second server there fails with a message. */
  sg_admin_config again = {.enabled = true, .address = "127.0.0.1", .port = port};
  tmp = capture_stderr_begin(&saved);
  sg_admin *b = sg_admin_new(base, &again, m, err, sizeof err);
  free(capture_stderr_end(saved, tmp));
  CHECK(b == NULL);
  CHECK_STR_CONTAINS(err, "admin.port: 127.0.0.1:");
  CHECK_STR_CONTAINS(err, "is already in use");

  sg_admin_free(a);
  sg_metrics_free(m);
  event_base_free(base);
}

static void test_ipv6_and_no_metrics(void) {
  /* Skipped where the machine has no IPv6 loopback. */
  int probe = socket(AF_INET6, SOCK_STREAM, 0);
  struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
  bool have_v6 = probe >= 0 && bind(probe, (struct sockaddr *)&in6, sizeof in6) == 0;
  if (probe >= 0)
    close(probe);
  if (!have_v6) {
    printf("test_admin: no IPv6 loopback, IPv6 case skipped\n");
    return;
  }
  struct event_base *base = event_base_new();
  sg_admin_config cfg = {.enabled = true, .address = "::1", .port = 0};
  char err[256];
  int saved;
  char *tmp = capture_stderr_begin(&saved);
  sg_admin *a = sg_admin_new(base, &cfg, NULL, err, sizeof err);
  char *log = capture_stderr_end(saved, tmp);
  CHECK(a != NULL);
  if (a != NULL) {
    char want[64];
    snprintf(want, sizeof want, "admin listening on [::1]:%u\n", (unsigned)sg_admin_port(a));
    CHECK_STR_CONTAINS(log, want);
    const char *req = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    char *r = fetch(base, AF_INET6, sg_admin_port(a), req);
    CHECK(status_of(r) == 200);
    free(r);
    /* Without metrics, /metrics does not exist. */
    req = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    r = fetch(base, AF_INET6, sg_admin_port(a), req);
    CHECK(status_of(r) == 404);
    free(r);
    sg_admin_free(a);
  }
  free(log);
  event_base_free(base);
}

typedef struct report_log {
  char text[2048];
  int count;
} report_log;

static void collect(void *ctx, const char *json_path, const char *msg) {
  report_log *l = ctx;
  size_t used = strlen(l->text);
  snprintf(l->text + used, sizeof l->text - used, "%s: %s\n", json_path, msg);
  l->count++;
}

static int parse(const char *json, sg_admin_config *c, report_log *log) {
  memset(log, 0, sizeof *log);
  json_t *root = json_loads(json, 0, NULL);
  CHECK(root != NULL);
  int rv = sg_admin_config_parse(json_object_get(root, "admin"), "admin", c, collect, log);
  json_decref(root);
  return rv;
}

static void test_config(void) {
  sg_admin_config c;
  report_log log;
  CHECK(parse("{}", &c, &log) == 0 && !c.enabled && c.address == NULL);
  CHECK(parse("{\"admin\": null}", &c, &log) == 0 && !c.enabled);
  CHECK(parse("{\"admin\": {}}", &c, &log) == 0);
  CHECK(c.enabled && strcmp(c.address, "127.0.0.1") == 0 && c.port == 9901);
  sg_admin_config_clear(&c);
  CHECK(parse("{\"admin\": {\"address\": \"::1\", \"port\": 0}}", &c, &log) == 0);
  CHECK(c.enabled && strcmp(c.address, "::1") == 0 && c.port == 0);
  sg_admin_config_clear(&c);
  CHECK(parse("{\"admin\": {\"address\": \"0.0.0.0\", \"port\": 9090}}", &c, &log) == 0);
  CHECK(c.port == 9090);

  /* Clash with a client listener. */
  sg_listener_config ls[3] = {
      {.name = "public", .address = "0.0.0.0", .port = 8443},
      {.name = "dev", .address = "127.0.0.1", .port = 9090},
      {.name = "v6", .address = "::1", .port = 9090},
  };
  memset(&log, 0, sizeof log);
  CHECK(sg_admin_config_check_listeners(&c, ls, 3, "admin", collect, &log) == -1);
  CHECK(log.count == 1); /* 0.0.0.0 overlaps 127.0.0.1, not ::1 */
  CHECK_STR_CONTAINS(log.text, "admin.port: 9090 is the port of listeners[1] (\"dev\")");
  sg_admin_config_clear(&c);
  sg_admin_config local = {.enabled = true, .address = "127.0.0.2", .port = 9090};
  memset(&log, 0, sizeof log);
  CHECK(sg_admin_config_check_listeners(&local, ls, 3, "admin", collect, &log) == 0);
  sg_admin_config any6 = {.enabled = true, .address = "::", .port = 8443};
  CHECK(sg_admin_config_check_listeners(&any6, ls, 3, "admin", collect, &log) == -1);
  sg_admin_config off = {0};
  CHECK(sg_admin_config_check_listeners(&off, ls, 3, "admin", collect, &log) == 0);

  CHECK(parse("{\"admin\": {\"address\": \"localhost\"}}", &c, &log) == -1);
  CHECK(!c.enabled && c.address == NULL);
  CHECK_STR_CONTAINS(log.text, "admin.address: must be a numeric IPv4 or IPv6 address");
  CHECK(parse("{\"admin\": {\"address\": \"::ffff:127.0.0.1\"}}", &c, &log) == -1);
  CHECK(!c.enabled && c.address == NULL);
  CHECK_STR_CONTAINS(log.text, "admin.address: '::ffff:127.0.0.1' is an IPv4-mapped");
  CHECK_STR_CONTAINS(log.text, "write it as the IPv4 address 127.0.0.1");
  CHECK(parse("{\"admin\": {\"port\": 70000}}", &c, &log) == -1);
  CHECK_STR_CONTAINS(log.text, "admin.port: must be an integer from 0 to 65535");
  CHECK(parse("{\"admin\": {\"port\": \"9901\"}}", &c, &log) == -1);
  CHECK_STR_CONTAINS(log.text, "admin.port: ");
  CHECK(parse("{\"admin\": {\"port\": -1}}", &c, &log) == -1);
  CHECK(parse("{\"admin\": {\"bind\": \"127.0.0.1\", \"port\": 1, \"x\": 2}}", &c, &log) == -1);
  CHECK(log.count == 2);
  CHECK_STR_CONTAINS(log.text, "admin.bind: unknown key");
  CHECK_STR_CONTAINS(log.text, "admin.x: unknown key");
  CHECK(parse("{\"admin\": 9901}", &c, &log) == -1);
  CHECK_STR_CONTAINS(log.text, "admin: must be an object");
}

static int count_fds(void) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL)
    return -1;
  while (readdir(d) != NULL)
    n++;
  closedir(d);
  return n;
}

static void run_for(struct event_base *base, double seconds) {
  double end = now_s() + seconds;
  while (now_s() < end) {
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    usleep(2000);
  }
}

static int connect_loopback(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(port)};
  in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&in, sizeof in) != 0) {
    close(fd);
    return -1;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

/* Whoever reaches the admin port holds at most the cap of connections
 * (the rest wait in the kernel's backlog), and a client that trickles its
 * request a byte at a time (never idle long enough for evhttp's timeout)
 * is closed at the request deadline; freed slots let the next ones in. */
static void test_connection_cap_and_deadline(void) {
  struct event_base *base = event_base_new();
  sg_admin_config cfg = {.enabled = true, .address = "127.0.0.1", .port = 0};
  char err[256];
  int saved;
  char *tmp = capture_stderr_begin(&saved);
  sg_admin *a = sg_admin_new(base, &cfg, NULL, err, sizeof err);
  CHECK(a != NULL);
  if (a == NULL) {
    free(capture_stderr_end(saved, tmp));
    event_base_free(base);
    return;
  }
  enum { CAP = 3, CLIENTS = 6 };
  sg_admin_set_limits(a, CAP, 400);
  uint16_t port = sg_admin_port(a);
  int before = count_fds();
  int cl[CLIENTS];
  for (int i = 0; i < CLIENTS; i++)
    cl[i] = connect_loopback(port);
  run_for(base, 0.1);
  /* Server side: exactly the cap accepted. */
  CHECK(count_fds() - before - CLIENTS == CAP);

  /* cl[0] trickles a request for 1.5 s: closed at the 400 ms deadline. */
  bool closed = false;
  const char *req = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa";
  for (size_t i = 0; !closed && i < 30; i++) {
    send(cl[0], req + (i % strlen(req)), 1, MSG_NOSIGNAL);
    run_for(base, 0.05);
    char buf[64];
    ssize_t n = recv(cl[0], buf, sizeof buf, 0);
    closed = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }
  CHECK(closed);

  /* Once the clients are gone, nothing is held and the listener serves. */
  for (int i = 0; i < CLIENTS; i++)
    if (cl[i] >= 0)
      close(cl[i]);
  run_for(base, 0.2);
  CHECK(count_fds() == before);
  char *r = get(base, port, "GET", "/healthz");
  CHECK(status_of(r) == 200);
  free(r);
  char *log = capture_stderr_end(saved, tmp);
  CHECK_STR_CONTAINS(log, "admin: 3 connections open, the most it takes");
  free(log);
  sg_admin_free(a);
  event_base_free(base);
}

int main(void) {
  test_server();
  test_connection_cap_and_deadline();
  test_ipv6_and_no_metrics();
  test_config();
  return check_report("test_admin");
}
