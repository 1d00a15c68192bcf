#include "sparkgate/admin.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>

#include "sparkgate/list.h"
#include "sparkgate/log.h"
#include "sparkgate/metrics.h"
#include "sparkgate/accept_backoff.h"
#include "sparkgate/netaddr.h"

/* Scrapes and probes are small and local: keep what a stuck or hostile
 * client can hold small too. evhttp's timeout restarts with every byte,
 * so a client trickling its headers is never idle: a deadline bounds the
 * whole request, and a cap what all clients hold together (see admin.h). */
#define ADMIN_TIMEOUT_S 10
#define ADMIN_MAX_HEADERS_BYTES 8192
#define ADMIN_MAX_BODY_BYTES 1024

/* One accepted connection, counted from evhttp's bufferevent callback to
 * its close callback. */
typedef struct admin_conn {
  sg_list link; /* in sg_admin.conns */
  sg_admin *admin;
  /* Until bound: a reference to the bufferevent made for evhttp, whose
   * callback argument is the evhttp_connection once evhttp set it up. */
  struct bufferevent *bev;
  struct evhttp_connection *evcon; /* once bound */
  struct event *ev;                /* bind at once, then the deadline */
} admin_conn;

struct sg_admin {
  struct evhttp *http;
  sg_metrics *metrics;
  uint16_t port;
  int ready; /* atomic bool */
  struct evconnlistener *listener; /* evhttp's; borrowed */
  sg_list conns;                   /* admin_conn.link */
  size_t n_conns;
  size_t max_conns;     /* SG_ADMIN_MAX_CONNECTIONS */
  unsigned deadline_ms; /* SG_ADMIN_REQUEST_DEADLINE_S */
  bool capped; /* listener disabled at max_conns */
  bool freeing;
  sg_accept_backoff backoff;
  sg_list live_link; /* in live_admins */
};

/* evhttp gives its listener's error callback the evhttp as argument: the
 * admin servers of this process (main thread), to find ours by it. */
static sg_list live_admins = {&live_admins, &live_admins};

/* ---- config ------------------------------------------------------------- */

static void report_at(sg_config_report_fn report, void *ctx, const char *base,
                      const char *key, const char *msg) {
  char path[256];
  if (key != NULL)
    snprintf(path, sizeof path, "%s.%s", base, key);
  else
    snprintf(path, sizeof path, "%s", base);
  report(ctx, path, msg);
}


int sg_admin_config_parse(const json_t *value, const char *json_path, sg_admin_config *out,
                          sg_config_report_fn report, void *ctx) {
  memset(out, 0, sizeof *out);
  if (value == NULL || json_is_null(value))
    return 0;
  if (!json_is_object(value)) {
    report_at(report, ctx, json_path, NULL,
              "must be an object such as {\"address\": \"127.0.0.1\", \"port\": 9901}, "
              "or null for no admin listener");
    return -1;
  }
  int errors = 0;
  const char *address = SG_ADMIN_DEFAULT_ADDRESS;
  out->port = SG_ADMIN_DEFAULT_PORT;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)value, key, v) {
    if (strcmp(key, "address") == 0) {
      if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v) ||
          !sg_netaddr_is_numeric(json_string_value(v))) {
        report_at(report, ctx, json_path, key,
                  "must be a numeric IPv4 or IPv6 address such as \"127.0.0.1\" or \"::1\"");
        errors++;
        continue;
      }
      char v4[INET_ADDRSTRLEN], msg[160];
      /* "::ffff:a.b.c.d" is refused: the admin socket is dual-stack, so it
       * is a.b.c.d, and the overlap check with the client listeners would
       * have to know that. One spelling per address is simpler. */
      if (sg_netaddr_v4_mapped(json_string_value(v), v4, sizeof v4)) {
        snprintf(msg, sizeof msg, "'%s' is an IPv4-mapped IPv6 address: write it as the "
                 "IPv4 address %s", json_string_value(v), v4);
        report_at(report, ctx, json_path, key, msg);
        errors++;
        continue;
      }
      address = json_string_value(v);
    } else if (strcmp(key, "port") == 0) {
      if (!json_is_integer(v) || json_integer_value(v) < 0 ||
          json_integer_value(v) > 65535) {
        report_at(report, ctx, json_path, key,
                  "must be an integer from 0 to 65535 (0: the kernel picks one)");
        errors++;
        continue;
      }
      out->port = (uint16_t)json_integer_value(v);
    } else {
      report_at(report, ctx, json_path, key,
                "unknown key (check the spelling against docs/configuration.md)");
      errors++;
    }
  }
  if (errors == 0 && (out->address = strdup(address)) == NULL) {
    report_at(report, ctx, json_path, NULL, "out of memory");
    errors++;
  }
  if (errors > 0) {
    sg_admin_config_clear(out);
    return -1;
  }
  out->enabled = true;
  return 0;
}

void sg_admin_config_clear(sg_admin_config *c) {
  free(c->address);
  memset(c, 0, sizeof *c);
}

typedef struct parsed_addr {
  int family;
  unsigned char bytes[sizeof(struct in6_addr)];
  bool wildcard;
} parsed_addr;

static bool parse_addr(const char *s, parsed_addr *a) {
  memset(a, 0, sizeof *a);
  static const unsigned char zero[sizeof(struct in6_addr)] = {0};
  if (inet_pton(AF_INET, s, a->bytes) == 1) {
    a->family = AF_INET;
    a->wildcard = memcmp(a->bytes, zero, 4) == 0;
    return true;
  }
  if (inet_pton(AF_INET6, s, a->bytes) == 1) {
    a->family = AF_INET6;
    a->wildcard = memcmp(a->bytes, zero, 16) == 0;
    return true;
  }
  return false;
}

/* Could a connection to one reach the other? "::" is dual-stack on Linux
 * by default, so it overlaps IPv4 addresses too. */
static bool addresses_overlap(const char *x, const char *y) {
  parsed_addr a, b;
  if (!parse_addr(x, &a) || !parse_addr(y, &b))
    return strcmp(x, y) == 0;
  if ((a.family == AF_INET6 && a.wildcard) || (b.family == AF_INET6 && b.wildcard))
    return true;
  if (a.family != b.family)
    return false;
  return a.wildcard || b.wildcard ||
         memcmp(a.bytes, b.bytes, a.family == AF_INET ? 4 : 16) == 0;
}

int sg_admin_config_check_listeners(const sg_admin_config *a,
                                    const sg_listener_config *listeners,
                                    size_t n_listeners, const char *json_path,
                                    sg_config_report_fn report, void *ctx) {
  if (!a->enabled || a->port == 0)
    return 0;
  int errors = 0;
  for (size_t i = 0; i < n_listeners; i++) {
    const sg_listener_config *l = &listeners[i];
    if (l->port != a->port || !addresses_overlap(a->address, l->address))
      continue;
    char msg[256];
    snprintf(msg, sizeof msg,
             "%u is the port of listeners[%zu] (\"%s\") on an overlapping address: the "
             "admin listener must never serve on a client port",
             (unsigned)a->port, i, l->name != NULL ? l->name : "?");
    report_at(report, ctx, json_path, "port", msg);
    errors++;
  }
  return errors > 0 ? -1 : 0;
}

/* ---- server ------------------------------------------------------------- */

/* libevent 2.1 writes the body of a HEAD response too (and no
 * Content-Length): send the length GET would have, and no body. */
static void send_reply(struct evhttp_request *req, int code, const char *reason,
                       struct evbuffer *body) {
  if (evhttp_request_get_command(req) == EVHTTP_REQ_HEAD) {
    char len[32];
    snprintf(len, sizeof len, "%zu", body != NULL ? evbuffer_get_length(body) : 0);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Length", len);
    evhttp_send_reply(req, code, reason, NULL);
    return;
  }
  evhttp_send_reply(req, code, reason, body);
}

static void reply_text(struct evhttp_request *req, int code, const char *reason,
                       const char *body) {
  struct evkeyvalq *h = evhttp_request_get_output_headers(req);
  evhttp_add_header(h, "Content-Type", "text/plain; charset=utf-8");
  evhttp_add_header(h, "Cache-Control", "no-store");
  struct evbuffer *b = evbuffer_new();
  if (b != NULL)
    evbuffer_add_printf(b, "%s\n", body);
  send_reply(req, code, reason, b);
  if (b != NULL)
    evbuffer_free(b);
}

static void serve_metrics(sg_admin *a, struct evhttp_request *req) {
  struct evbuffer *b = evbuffer_new();
  if (b == NULL || sg_metrics_render(a->metrics, b) != 0) {
    if (b != NULL)
      evbuffer_free(b);
    reply_text(req, 500, "Internal Server Error", "out of memory");
    return;
  }
  struct evkeyvalq *h = evhttp_request_get_output_headers(req);
  evhttp_add_header(h, "Content-Type", SG_METRICS_CONTENT_TYPE);
  evhttp_add_header(h, "Cache-Control", "no-store");
  send_reply(req, 200, "OK", b);
  evbuffer_free(b);
}

/* ---- connections: cap and deadline --------------------------------------- */

static void listener_update(sg_admin *a) {
  if (a->freeing || a->listener == NULL || a->backoff.paused)
    return;
  if (a->capped)
    evconnlistener_disable(a->listener);
  else
    evconnlistener_enable(a->listener);
}

static void conn_gone(admin_conn *c) {
  sg_admin *a = c->admin;
  sg_list_unlink(&c->link);
  event_free(c->ev);
  free(c);
  a->n_conns--;
  if (a->capped && a->n_conns < a->max_conns) {
    a->capped = false;
    listener_update(a);
  }
}

static void on_conn_close(struct evhttp_connection *evcon, void *arg) {
  (void)evcon;
  conn_gone(arg);
}

static void arm_deadline(admin_conn *c) {
  unsigned ms = c->admin->deadline_ms;
  struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
  evtimer_add(c->ev, &tv);
}

static void on_conn_event(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  admin_conn *c = arg;
  if (c->evcon == NULL) {
    /* evhttp has set the connection up since the bufferevent callback:
     * its callbacks' argument is the connection. None any more: evhttp
     * freed it already (out of memory), and our reference kept it. */
    struct bufferevent *bev = c->bev;
    void *evcon = NULL;
    bufferevent_getcb(bev, NULL, NULL, NULL, &evcon);
    c->bev = NULL;
    if (evcon == NULL) {
      conn_gone(c);
    } else {
      c->evcon = evcon;
      evhttp_connection_set_closecb(c->evcon, on_conn_close, c);
      arm_deadline(c);
    }
    bufferevent_decref(bev);
    return;
  }
  sg_debug("admin: closing a connection that sent no complete request for %u ms",
           c->admin->deadline_ms);
  struct evhttp_connection *evcon = c->evcon;
  evhttp_connection_set_closecb(evcon, NULL, NULL);
  conn_gone(c);
  evhttp_connection_free(evcon);
}

/* evhttp calls this for each accepted connection, before it makes the
 * connection object: counted here, bound to that object just after. */
static struct bufferevent *on_new_conn(struct event_base *base, void *arg) {
  sg_admin *a = arg;
  sg_accept_backoff_accepted(&a->backoff);
  struct bufferevent *bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
  admin_conn *c = calloc(1, sizeof *c);
  if (bev == NULL || c == NULL || (c->ev = evtimer_new(base, on_conn_event, c)) == NULL) {
    /* Out of memory: evhttp makes its own bufferevent (or drops the
     * connection); this one goes uncounted. */
    free(c);
    if (bev != NULL)
      bufferevent_free(bev);
    return NULL;
  }
  c->admin = a;
  c->bev = bev;
  bufferevent_incref(bev);
  sg_list_push_back(&a->conns, &c->link);
  event_active(c->ev, EV_TIMEOUT, 0);
  if (++a->n_conns >= a->max_conns && !a->capped) {
    a->capped = true;
    listener_update(a);
    sg_warn("admin: %zu connections open, the most it takes: not accepting more until "
            "one closes (each gets %u ms for a request)",
            a->max_conns, a->deadline_ms);
  }
  return bev;
}

static admin_conn *conn_of(sg_admin *a, struct evhttp_connection *evcon) {
  for (sg_list *n = a->conns.next; n != &a->conns; n = n->next) {
    admin_conn *c = SG_CONTAINER_OF(n, admin_conn, link);
    if (c->evcon == evcon)
      return c;
  }
  return NULL;
}

static void on_accept_error(struct evconnlistener *l, void *arg) {
  int err = EVUTIL_SOCKET_ERROR();
  for (sg_list *n = live_admins.next; n != &live_admins; n = n->next) {
    sg_admin *a = SG_CONTAINER_OF(n, sg_admin, live_link);
    if (a->http == arg) {
      sg_accept_backoff_failed(&a->backoff, l, err);
      return;
    }
  }
}

static void on_accept_resume(void *arg) { listener_update(arg); }

/* ---- requests ------------------------------------------------------------ */

static void on_request(struct evhttp_request *req, void *arg) {
  sg_admin *a = arg;
  /* A request came in whole: the connection gets a new deadline for its
   * next one (keep-alive scrapes). */
  admin_conn *c = conn_of(a, evhttp_request_get_connection(req));
  if (c != NULL)
    arm_deadline(c);
  const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
  const char *path = uri != NULL ? evhttp_uri_get_path(uri) : NULL;
  if (path == NULL || path[0] == '\0')
    path = "/";
  enum { P_METRICS, P_HEALTHZ, P_READYZ, P_NONE } which = P_NONE;
  if (strcmp(path, "/metrics") == 0 && a->metrics != NULL)
    which = P_METRICS;
  else if (strcmp(path, "/healthz") == 0)
    which = P_HEALTHZ;
  else if (strcmp(path, "/readyz") == 0)
    which = P_READYZ;
  if (which == P_NONE) {
    reply_text(req, 404, "Not Found", "not found: try /metrics, /healthz or /readyz");
    return;
  }
  enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
  if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
    reply_text(req, 405, "Method Not Allowed", "method not allowed: use GET or HEAD");
    return;
  }
  switch (which) {
  case P_METRICS:
    serve_metrics(a, req);
    break;
  case P_HEALTHZ:
    /* Answering at all is the check: the main loop runs. */
    reply_text(req, 200, "OK", "ok");
    break;
  case P_READYZ:
    if (sg_admin_ready(a))
      reply_text(req, 200, "OK", "ready");
    else
      reply_text(req, 503, "Service Unavailable", "not ready");
    break;
  case P_NONE:
    break;
  }
}

sg_admin *sg_admin_new(struct event_base *base, const sg_admin_config *cfg,
                       sg_metrics *metrics, char *err, size_t errlen) {
  sg_admin *a = calloc(1, sizeof *a);
  if (a == NULL) {
    snprintf(err, errlen, "admin: out of memory");
    return NULL;
  }
  a->metrics = metrics;
  a->max_conns = SG_ADMIN_MAX_CONNECTIONS;
  a->deadline_ms = SG_ADMIN_REQUEST_DEADLINE_S * 1000;
  sg_list_init(&a->conns);
  sg_list_init(&a->live_link);
  if (sg_accept_backoff_init(&a->backoff, base, "admin listener", on_accept_resume, a) != 0) {
    snprintf(err, errlen, "admin: out of memory");
    goto fail;
  }
  a->http = evhttp_new(base);
  if (a->http == NULL) {
    snprintf(err, errlen, "admin: cannot create the HTTP server");
    goto fail;
  }
  /* Every method reaches on_request, so that the answer is 405 (with
   * Allow) rather than libevent's 501. */
  evhttp_set_allowed_methods(a->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                          EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                          EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE |
                                          EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
  evhttp_set_timeout(a->http, ADMIN_TIMEOUT_S);
  evhttp_set_max_headers_size(a->http, ADMIN_MAX_HEADERS_BYTES);
  evhttp_set_max_body_size(a->http, ADMIN_MAX_BODY_BYTES);
  evhttp_set_gencb(a->http, on_request, a);
  evhttp_set_bevcb(a->http, on_new_conn, a);

  bool v6 = strchr(cfg->address, ':') != NULL;
  struct evhttp_bound_socket *bound =
      evhttp_bind_socket_with_handle(a->http, cfg->address, cfg->port);
  if (bound == NULL) {
    int e = EVUTIL_SOCKET_ERROR();
    if (e == EADDRINUSE)
      snprintf(err, errlen, "admin.port: %s%s%s:%u is already in use (another "
               "sparkgate?): change admin.port or stop the other process",
               v6 ? "[" : "", cfg->address, v6 ? "]" : "", (unsigned)cfg->port);
    else
      snprintf(err, errlen, "admin: cannot listen on %s%s%s:%u: %s", v6 ? "[" : "",
               cfg->address, v6 ? "]" : "", (unsigned)cfg->port,
               evutil_socket_error_to_string(e));
    goto fail;
  }
  a->listener = evhttp_bound_socket_get_listener(bound);
  evconnlistener_set_error_cb(a->listener, on_accept_error);
  sg_list_push_back(&live_admins, &a->live_link);
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;
  if (getsockname(evhttp_bound_socket_get_fd(bound), (struct sockaddr *)&ss, &sslen) != 0) {
    snprintf(err, errlen, "admin: getsockname failed");
    goto fail;
  }
  a->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                           : ((struct sockaddr_in *)&ss)->sin_port);
  sg_notice("admin listening on %s%s%s:%u", v6 ? "[" : "", cfg->address, v6 ? "]" : "",
          (unsigned)a->port);
  return a;
fail:
  sg_admin_free(a);
  return NULL;
}

uint16_t sg_admin_port(const sg_admin *a) { return a->port; }

void sg_admin_set_limits(sg_admin *a, size_t max_connections, unsigned deadline_ms) {
  a->max_conns = max_connections > 0 ? max_connections : 1;
  a->deadline_ms = deadline_ms > 0 ? deadline_ms : 1;
}

void sg_admin_set_ready(sg_admin *a, bool ready) {
  __atomic_store_n(&a->ready, ready ? 1 : 0, __ATOMIC_RELEASE);
}

bool sg_admin_ready(const sg_admin *a) {
  return __atomic_load_n(&a->ready, __ATOMIC_ACQUIRE) != 0;
}

void sg_admin_free(sg_admin *a) {
  if (a == NULL)
    return;
  a->freeing = true;
  sg_list_unlink(&a->live_link);
  sg_accept_backoff_clear(&a->backoff);
  /* Frees the listener, then each connection (their close callbacks
   * uncount the bound ones). */
  if (a->http != NULL)
    evhttp_free(a->http);
  while (!sg_list_empty(&a->conns)) {
    admin_conn *c = SG_CONTAINER_OF(a->conns.next, admin_conn, link);
    struct bufferevent *bev = c->bev; /* not bound yet: our reference */
    conn_gone(c);
    if (bev != NULL)
      bufferevent_decref(bev);
  }
  free(a);
}
