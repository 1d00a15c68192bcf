#include "sparkgate/stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#include "sparkgate/conn.h"
#include "sparkgate/identity.h"
#include "sparkgate/jwt.h"
#include "sparkgate/token_cache.h"
#include "sparkgate/log.h"
#include "sparkgate/upstream.h"
#include "sparkgate/worker.h"

/* ---- header lists ------------------------------------------------------- */

int sg_header_list_add(sg_header_list *list, nghttp2_rcbuf *name,
                       nghttp2_rcbuf *value, size_t max_bytes) {
  nghttp2_vec n = nghttp2_rcbuf_get_buf(name);
  nghttp2_vec v = nghttp2_rcbuf_get_buf(value);
  size_t cost = n.len + v.len + 32;
  if (list->bytes + cost > max_bytes)
    return -1;
  if (list->count == list->capacity) {
    size_t cap = list->capacity ? list->capacity * 2 : 16;
    sg_header *items = realloc(list->items, cap * sizeof *items);
    if (items == NULL)
      return -1;
    list->items = items;
    list->capacity = cap;
  }
  nghttp2_rcbuf_incref(name);
  nghttp2_rcbuf_incref(value);
  list->items[list->count].name = name;
  list->items[list->count].value = value;
  list->count++;
  list->bytes += cost;
  return 0;
}

void sg_header_list_clear(sg_header_list *list) {
  for (size_t i = 0; i < list->count; i++) {
    nghttp2_rcbuf_decref(list->items[i].name);
    nghttp2_rcbuf_decref(list->items[i].value);
  }
  free(list->items);
  memset(list, 0, sizeof *list);
}

static const sg_header *header_find(const sg_header_list *list,
                                    const char *name, size_t len) {
  for (size_t i = 0; i < list->count; i++) {
    nghttp2_vec n = nghttp2_rcbuf_get_buf(list->items[i].name);
    if (n.len == len && memcmp(n.base, name, len) == 0)
      return &list->items[i];
  }
  return NULL;
}
#define HEADER_FIND(list, lit) header_find((list), (lit), sizeof(lit) - 1)

static nghttp2_vec header_value(const sg_header *h) {
  return nghttp2_rcbuf_get_buf(h->value);
}

/* ---- lifecycle ---------------------------------------------------------- */

sg_stream *sg_stream_new(sg_conn *conn, int32_t id) {
  sg_stream *s = calloc(1, sizeof *s);
  if (s == NULL)
    return NULL;
  s->req_body = evbuffer_new();
  s->resp_body = evbuffer_new();
  if (s->req_body == NULL || s->resp_body == NULL) {
    if (s->req_body != NULL)
      evbuffer_free(s->req_body);
    if (s->resp_body != NULL)
      evbuffer_free(s->resp_body);
    free(s);
    return NULL;
  }
  s->conn = conn;
  s->id = id;
  s->conn_id = conn->id;
  s->rt = sg_runtime_ref(conn->rt);
  sg_list_init(&s->up_link);
  sg_list_push_back(&conn->streams, &s->conn_link);
  conn->n_streams++;
  evtimer_del(conn->timer); /* not idle any more */
  return s;
}

static uint64_t monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void stream_free(sg_stream *s) {
  if (s->deadline != NULL)
    event_free(s->deadline);
  sg_header_list_clear(&s->req_headers);
  sg_header_list_clear(&s->req_trailers);
  sg_header_list_clear(&s->resp_headers);
  sg_header_list_clear(&s->resp_trailers);
  evbuffer_free(s->req_body);
  evbuffer_free(s->resp_body);
  free(s->identity);
  free(s->identity_provider);
  free(s->xfcc);
  if (s->claims != NULL)
    json_decref(s->claims);
  sg_runtime_unref(s->rt);
  free(s);
}

static bool upstream_leg_done(const sg_stream *s) {
  return s->up_state == SG_UPSTREAM_LEG_NONE ||
         s->up_state == SG_UPSTREAM_LEG_DONE;
}

static void maybe_free(sg_stream *s) {
  if (s->client_done && upstream_leg_done(s))
    stream_free(s);
}

static const char *stream_path(const sg_stream *s, char *buf, size_t buflen) {
  const sg_header *h = HEADER_FIND(&s->req_headers, ":path");
  if (h == NULL)
    return "-";
  nghttp2_vec v = header_value(h);
  snprintf(buf, buflen, "%.*s", (int)(v.len > 200 ? 200 : v.len), v.base);
  return buf;
}

/* ---- client leg --------------------------------------------------------- */

/* Gives the client back window credit for bytes nobody will forward. */
static void client_consume(sg_stream *s, size_t n) {
  if (s->conn == NULL || n == 0)
    return;
  nghttp2_session_consume(s->conn->session, s->id, n);
  sg_conn_schedule_send(s->conn);
}

/* |why| is for the log only, when it says more than the client may hear. */
static void stream_fail(sg_stream *s, sg_grpc_status code, const char *message,
                        const char *why) {
  char pathbuf[256];
  s->rejected = true;
  if (s->conn != NULL) {
    sg_info("conn=%llu stream=%d peer=%s path=%s: grpc-status %d: %s%s%s",
            (unsigned long long)s->conn_id, s->id, s->conn->peer,
            stream_path(s, pathbuf, sizeof pathbuf), (int)code, message,
            why != NULL ? ": " : "", why != NULL ? why : "");
    if (!s->resp_started) {
      s->resp_started = true;
      s->resp_eof = true;
      sg_grpc_submit_error(s->conn->session, s->id, code, message);
    } else {
      nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                                NGHTTP2_INTERNAL_ERROR);
    }
    /* What the client already sent will never be forwarded. */
    size_t pending = evbuffer_get_length(s->req_body);
    evbuffer_drain(s->req_body, pending);
    client_consume(s, pending);
    sg_conn_schedule_send(s->conn);
  }
  if (s->up_state == SG_UPSTREAM_LEG_PENDING ||
      s->up_state == SG_UPSTREAM_LEG_OPEN)
    sg_upstream_cancel(s);
}

void sg_stream_fail(sg_stream *s, sg_grpc_status code, const char *message) {
  stream_fail(s, code, message, NULL);
}

static void reject_http(sg_stream *s, int status, const char *why) {
  char pathbuf[256];
  s->rejected = true;
  s->resp_started = true;
  s->resp_eof = true;
  sg_info("conn=%llu stream=%d peer=%s path=%s: HTTP %d: %s",
          (unsigned long long)s->conn_id, s->id, s->conn->peer,
          stream_path(s, pathbuf, sizeof pathbuf), status, why);
  sg_http_submit_status(s->conn->session, s->id, status);
}

static bool path_allowed(const sg_config *cfg, const uint8_t *path, size_t len) {
  for (size_t i = 0; i < cfg->n_allowed_path_prefixes; i++) {
    const char *p = cfg->allowed_path_prefixes[i];
    size_t plen = strlen(p);
    if (len >= plen && memcmp(path, p, plen) == 0)
      return true;
  }
  return false;
}

/* Backend selection until tenant routing exists: the first tenant, its
 * first backend that takes new sessions. */
static bool choose_backend(const sg_config *cfg, size_t *tenant,
                           size_t *backend) {
  for (size_t t = 0; t < cfg->n_tenants; t++) {
    for (size_t b = 0; b < cfg->tenants[t].n_backends; b++) {
      if (cfg->tenants[t].backends[b].weight > 0) {
        *tenant = t;
        *backend = b;
        return true;
      }
    }
  }
  return false;
}

/* A request a proxy must not pass on: the stream is reset, as nghttp2 does
 * for the malformed requests it catches itself (RFC 9113 8.1.1). */
static void reject_malformed(sg_stream *s, const char *why) {
  char pathbuf[256];
  s->rejected = true;
  s->resp_started = true;
  s->resp_eof = true;
  sg_info("conn=%llu stream=%d peer=%s path=%s: rejected (stream reset): %s",
          (unsigned long long)s->conn_id, s->id, s->conn->peer,
          stream_path(s, pathbuf, sizeof pathbuf), why);
  nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                            NGHTTP2_PROTOCOL_ERROR);
  sg_conn_schedule_send(s->conn);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_stream *s = arg;
  if (s->resp_eof)
    return; /* the backend answered in time; the client is still reading */
  sg_stream_fail(s, SG_GRPC_DEADLINE_EXCEEDED,
                 "sparkgate: deadline exceeded (grpc-timeout)");
}

/* The request-line checks that would let two parties read one request two
 * ways: where it goes (authority, host) and how it came (scheme). */
static const char *request_target_problem(const sg_stream *s) {
  const sg_header *scheme = HEADER_FIND(&s->req_headers, ":scheme");
  const sg_header *authority = HEADER_FIND(&s->req_headers, ":authority");
  const sg_header *host = HEADER_FIND(&s->req_headers, "host");
  const char *want = s->conn->listener->insecure ? "http" : "https";
  if (scheme != NULL) {
    nghttp2_vec v = header_value(scheme);
    if (v.len != strlen(want) || memcmp(v.base, want, v.len) != 0)
      return s->conn->listener->insecure
                 ? ":scheme is not http on a cleartext listener"
                 : ":scheme is not https on a TLS listener";
  }
  if (authority != NULL && memchr(header_value(authority).base, '@',
                                  header_value(authority).len) != NULL)
    return ":authority carries userinfo";
  if (host != NULL && memchr(header_value(host).base, '@', header_value(host).len) != NULL)
    return "host carries userinfo";
  if (authority != NULL && host != NULL) {
    nghttp2_vec a = header_value(authority), h = header_value(host);
    if (a.len != h.len || strncasecmp((const char *)a.base, (const char *)h.base, a.len) != 0)
      return "host differs from :authority";
  }
  if (authority == NULL && host == NULL)
    return "no :authority and no host";
  return NULL;
}

static void deny_unauthenticated(sg_stream *s, const char *reason,
                                 const char *detail) {
  char pathbuf[256];
  s->rejected = true;
  /* The client hears one generic sentence: telling an attacker which
   * check failed helps only the attacker. The log says which. */
  sg_info("conn=%llu stream=%d peer=%s path=%s: rejected: unauthenticated: "
          "%s%s%s",
          (unsigned long long)s->conn_id, s->id, s->conn->peer,
          stream_path(s, pathbuf, sizeof pathbuf), reason,
          detail != NULL ? ": " : "", detail != NULL ? detail : "");
  s->resp_started = true;
  s->resp_eof = true;
  sg_grpc_submit_error(s->conn->session, s->id, SG_GRPC_UNAUTHENTICATED,
                       "sparkgate: authentication required or failed");
  sg_conn_schedule_send(s->conn);
}

/* Every RPC proves who it is before any upstream work starts: a bearer
 * token (verified, or found in this worker's cache of verified tokens),
 * the connection's client certificate, or both, as the listener asks. */
static bool authenticate(sg_stream *s) {
  sg_conn *c = s->conn;
  const sg_listener_config *l = c->listener;
  const sg_config *cfg = s->rt->config;
  if (l->auth_none) {
    s->authenticated = true;
    s->auth_method = "none";
    return true;
  }
  const sg_header *authz = NULL;
  unsigned n_authz = 0;
  for (size_t i = 0; i < s->req_headers.count; i++) {
    nghttp2_vec n = nghttp2_rcbuf_get_buf(s->req_headers.items[i].name);
    if (SG_HEADER_IS(n.base, n.len, "authorization")) {
      authz = &s->req_headers.items[i];
      n_authz++;
    }
  }
  if (n_authz > 1) {
    deny_unauthenticated(s, "duplicate_authorization",
                         "more than one authorization field");
    return false;
  }
  sg_identity_jwt_input jin = {.state = SG_IDENTITY_JWT_NONE};
  sg_jwt_result jwt = {0};
  if (authz != NULL && (l->auth.methods & SG_LISTENER_AUTH_JWT)) {
    nghttp2_vec v = header_value(authz);
    const char *p = (const char *)v.base;
    size_t len = v.len;
    if (len < 7 || strncasecmp(p, "Bearer ", 7) != 0) {
      jin.state = SG_IDENTITY_JWT_INVALID;
      jin.reason = "not_bearer";
    } else {
      p += 7;
      len -= 7;
      while (len > 0 && *p == ' ') {
        p++;
        len--;
      }
      int rv = cfg->jwt == NULL || c->gen->token_cache == NULL
                   ? SG_JWT_UNKNOWN_ISSUER
                   : sg_token_cache_verify(c->gen->token_cache, cfg->jwt, p,
                                           len, (int64_t)time(NULL), &jwt);
      if (rv == SG_JWT_OK) {
        jin.state = SG_IDENTITY_JWT_VALID;
        jin.identity = jwt.identity;
        jin.provider = jwt.provider;
        jin.cnf_x5t_s256 = jwt.cnf_x5t_s256;
      } else {
        jin.state = SG_IDENTITY_JWT_INVALID;
        jin.reason = sg_jwt_reason_name(rv);
      }
    }
  }
  sg_identity_cert_input cin = {.state = SG_IDENTITY_CERT_NONE};
  if (c->has_cert) {
    cin.state = SG_IDENTITY_CERT_VERIFIED;
    cin.identity = c->cert_identity;
    cin.identity_reason = c->cert_identity_reason;
    cin.thumbprint = c->cert_thumbprint;
  }
  sg_identity_decision d;
  if (!sg_identity_decide(&l->auth, &jin, &cin, &d)) {
    deny_unauthenticated(s, d.reason, d.detail);
    sg_jwt_result_clear(&jwt);
    return false;
  }
  s->identity = strdup(d.identity);
  s->identity_provider = d.provider != NULL ? strdup(d.provider) : NULL;
  s->auth_method = d.method;
  if (jin.state == SG_IDENTITY_JWT_VALID && jwt.claims != NULL &&
      d.provider != NULL)
    s->claims = json_incref(jwt.claims);
  if (c->xfcc != NULL)
    s->xfcc = strdup(c->xfcc);
  sg_jwt_result_clear(&jwt);
  if (s->identity == NULL) {
    sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
    return false;
  }
  s->authenticated = true;
  return true;
}

/* Identity headers a client could send to be taken for someone else are
 * never forwarded; a spelling with "_" that some servers fold into the
 * same name is refused outright. */
static const char *spoofed_header(const sg_stream *s) {
  const sg_identity_header_names *own = &s->rt->config->identity_headers;
  for (size_t i = 0; i < s->req_headers.count; i++) {
    nghttp2_vec n = nghttp2_rcbuf_get_buf(s->req_headers.items[i].name);
    if (sg_identity_header_classify(n.base, n.len, own) == SG_IDENTITY_HEADER_REJECT)
      return "a header name with '_' aliases an identity header";
  }
  return NULL;
}

void sg_stream_on_request_headers(sg_stream *s) {
  const sg_config *cfg = s->rt->config;
  const sg_header *method = HEADER_FIND(&s->req_headers, ":method");
  const sg_header *path = HEADER_FIND(&s->req_headers, ":path");
  const sg_header *ctype = HEADER_FIND(&s->req_headers, "content-type");

  /* nghttp2 has already checked the pseudo-header rules of RFC 9113 8.3. */
  nghttp2_vec m = method != NULL ? header_value(method) : (nghttp2_vec){NULL, 0};
  if (m.len != 4 || memcmp(m.base, "POST", 4) != 0) {
    reject_http(s, 405, "method is not POST (gRPC needs POST)");
    return;
  }
  if (ctype == NULL) {
    reject_http(s, 415, "no content-type (gRPC needs application/grpc)");
    return;
  }
  nghttp2_vec ct = header_value(ctype);
  if (!sg_grpc_content_type_ok(ct.base, ct.len)) {
    reject_http(s, 415, "content-type is not application/grpc");
    return;
  }
  const char *problem = request_target_problem(s);
  if (problem != NULL) {
    reject_malformed(s, problem);
    return;
  }
  nghttp2_vec p = path != NULL ? header_value(path) : (nghttp2_vec){NULL, 0};
  if (p.len == 0 || !path_allowed(cfg, p.base, p.len)) {
    sg_stream_fail(s, SG_GRPC_UNIMPLEMENTED,
                   "sparkgate: method not served here (path outside the allowed prefixes)");
    return;
  }

  const char *spoof = spoofed_header(s);
  if (spoof != NULL) {
    stream_fail(s, SG_GRPC_INVALID_ARGUMENT, "sparkgate: invalid request header name",
                spoof);
    return;
  }
  if (!authenticate(s))
    return;

  const sg_header *timeout = HEADER_FIND(&s->req_headers, "grpc-timeout");
  if (timeout != NULL) {
    nghttp2_vec tv = header_value(timeout);
    uint64_t ms;
    if (sg_grpc_timeout_parse(tv.base, tv.len, &ms) != 0) {
      sg_stream_fail(s, SG_GRPC_INTERNAL, "sparkgate: malformed grpc-timeout");
      return;
    }
    if (ms > cfg->max_grpc_timeout_ms)
      ms = cfg->max_grpc_timeout_ms;
    s->deadline = evtimer_new(s->conn->worker->base, on_deadline, s);
    if (s->deadline == NULL) {
      sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
      return;
    }
    s->deadline_at_ms = monotonic_ms() + ms;
    struct timeval when = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(s->deadline, &when);
  }

  size_t tenant, backend;
  if (!choose_backend(cfg, &tenant, &backend)) {
    sg_stream_fail(s, SG_GRPC_UNAVAILABLE,
                   "sparkgate: no backend takes new sessions (all drained)");
    return;
  }
  s->backend_name = cfg->tenants[tenant].backends[backend].name;
  s->tenant_name = cfg->tenants[tenant].name;
  sg_upstream_attach(sg_generation_pool(s->conn->gen, tenant, backend), s);
}

void sg_stream_on_request_data(sg_stream *s, const uint8_t *data, size_t len) {
  if (s->rejected || s->up_state == SG_UPSTREAM_LEG_DONE ||
      s->up_state == SG_UPSTREAM_LEG_NONE) {
    client_consume(s, len);
    return;
  }
  if (evbuffer_add(s->req_body, data, len) != 0) {
    client_consume(s, len);
    sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
    return;
  }
  sg_upstream_resume_request(s);
}

void sg_stream_on_request_end(sg_stream *s) {
  s->req_eof = true;
  if (!s->rejected && HEADER_FIND(&s->req_trailers, "authorization") != NULL) {
    /* Credentials count only in the request headers, where they were
     * checked before anything went upstream. */
    sg_stream_fail(s, SG_GRPC_UNAUTHENTICATED,
                   "sparkgate: authentication required or failed");
    return;
  }
  if (s->up_state == SG_UPSTREAM_LEG_OPEN || s->up_state == SG_UPSTREAM_LEG_PENDING)
    sg_upstream_resume_request(s);
}

void sg_stream_on_client_close(sg_stream *s, uint32_t error_code) {
  sg_conn *c = s->conn;
  if (c != NULL) {
    /* Bytes received and never forwarded still count against the client's
     * connection window. */
    size_t pending = evbuffer_get_length(s->req_body);
    if (pending > 0 && !c->freeing) {
      evbuffer_drain(s->req_body, pending);
      nghttp2_session_consume_connection(c->session, pending);
    }
    sg_list_unlink(&s->conn_link);
    c->n_streams--;
  }
  s->conn = NULL;
  s->client_done = true;
  if (s->deadline != NULL)
    evtimer_del(s->deadline);
  if (s->up_state == SG_UPSTREAM_LEG_PENDING ||
      s->up_state == SG_UPSTREAM_LEG_OPEN) {
    if (error_code != NGHTTP2_NO_ERROR || !s->resp_eof)
      sg_debug("conn=%llu stream=%d: client leg closed (%s), cancelling upstream",
               (unsigned long long)s->conn_id, s->id,
               nghttp2_http2_strerror(error_code));
    sg_upstream_cancel(s);
  }
  maybe_free(s);
}

/* ---- upstream leg ------------------------------------------------------- */

static bool response_header_forwarded(const uint8_t *name, size_t len) {
  return !sg_header_is_hop_by_hop(name, len) && !SG_HEADER_IS(name, len, "te");
}

static size_t build_nv(const sg_header_list *list, nghttp2_nv *nva) {
  size_t n = 0;
  for (size_t i = 0; i < list->count; i++) {
    nghttp2_vec name = nghttp2_rcbuf_get_buf(list->items[i].name);
    nghttp2_vec value = nghttp2_rcbuf_get_buf(list->items[i].value);
    if (!response_header_forwarded(name.base, name.len))
      continue;
    nva[n].name = name.base;
    nva[n].namelen = name.len;
    nva[n].value = value.base;
    nva[n].valuelen = value.len;
    nva[n].flags = NGHTTP2_NV_FLAG_NONE;
    n++;
  }
  return n;
}

void sg_stream_on_response_headers(sg_stream *s, bool end_stream) {
  const sg_header *status = HEADER_FIND(&s->resp_headers, ":status");
  nghttp2_vec st = status != NULL ? header_value(status) : (nghttp2_vec){NULL, 0};
  if (st.len == 3 && st.base[0] == '1') {
    /* An interim response: gRPC has no use for it; wait for the final one. */
    sg_header_list_clear(&s->resp_headers);
    return;
  }
  if (s->conn == NULL || s->rejected)
    return;
  nghttp2_nv *nva = malloc((s->resp_headers.count + 1) * sizeof *nva);
  if (nva == NULL) {
    sg_stream_fail(s, SG_GRPC_INTERNAL, "sparkgate: out of memory");
    return;
  }
  size_t n = build_nv(&s->resp_headers, nva);
  nghttp2_data_provider prd = {.source = {.ptr = s},
                               .read_callback = sg_stream_read_response_body};
  s->resp_started = true;
  if (end_stream)
    s->resp_eof = true;
  /* A trailers-only response stays trailers-only: one HEADERS frame with
   * END_STREAM, as gRPC clients expect for immediate errors. */
  int rv = nghttp2_submit_response(s->conn->session, s->id, nva, n,
                                   end_stream ? NULL : &prd);
  free(nva);
  sg_header_list_clear(&s->resp_headers);
  if (rv != 0) {
    nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                              NGHTTP2_INTERNAL_ERROR);
  }
  sg_conn_schedule_send(s->conn);
}

void sg_stream_on_response_data(sg_stream *s, const uint8_t *data, size_t len) {
  if (s->conn == NULL || s->rejected) {
    sg_upstream_consumed(s, len);
    return;
  }
  if (evbuffer_add(s->resp_body, data, len) != 0) {
    sg_upstream_consumed(s, len);
    sg_stream_fail(s, SG_GRPC_INTERNAL, "sparkgate: out of memory");
    return;
  }
  nghttp2_session_resume_data(s->conn->session, s->id);
  sg_conn_schedule_send(s->conn);
}

void sg_stream_on_response_end(sg_stream *s) {
  s->resp_eof = true;
  if (s->conn != NULL && s->resp_started && !s->rejected) {
    nghttp2_session_resume_data(s->conn->session, s->id);
    sg_conn_schedule_send(s->conn);
  }
}

void sg_stream_on_upstream_close(sg_stream *s, uint32_t error_code,
                                 const char *reason) {
  bool was_open = s->up_state == SG_UPSTREAM_LEG_OPEN ||
                  s->up_state == SG_UPSTREAM_LEG_PENDING;
  s->up_state = SG_UPSTREAM_LEG_DONE;
  s->up = NULL;
  sg_list_unlink(&s->up_link);
  /* Response bytes still held here were credited to the backend
   * connection's window by upstream.c before calling us. */
  if (was_open && s->conn != NULL && !s->rejected) {
    if (!s->resp_eof) {
      if (!s->resp_started) {
        char msg[256];
        snprintf(msg, sizeof msg, "sparkgate: upstream %s unavailable: %s",
                 s->backend_name != NULL ? s->backend_name : "?",
                 reason != NULL ? reason : nghttp2_http2_strerror(error_code));
        sg_stream_fail(s, SG_GRPC_UNAVAILABLE, msg);
      } else {
        sg_info("conn=%llu stream=%d: upstream %s reset the stream after the "
                "response started (%s): resetting the client stream",
                (unsigned long long)s->conn_id, s->id,
                s->backend_name != NULL ? s->backend_name : "?",
                reason != NULL ? reason : nghttp2_http2_strerror(error_code));
        s->rejected = true;
        nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                                  error_code == NGHTTP2_CANCEL
                                      ? NGHTTP2_CANCEL
                                      : NGHTTP2_INTERNAL_ERROR);
        sg_conn_schedule_send(s->conn);
      }
    } else if (evbuffer_get_length(s->req_body) > 0) {
      /* The backend answered in full before taking the whole request:
       * what the client still sends goes nowhere. */
      size_t pending = evbuffer_get_length(s->req_body);
      evbuffer_drain(s->req_body, pending);
      client_consume(s, pending);
    }
  }
  maybe_free(s);
}

/* ---- data providers ----------------------------------------------------- */

size_t sg_stream_request_nv(sg_stream *s, bool upstream_tls, nghttp2_nv *nva) {
  const sg_identity_header_names *own = &s->rt->config->identity_headers;
  size_t n = 0;
  const sg_header *authority = HEADER_FIND(&s->req_headers, ":authority");
  const sg_header *host = HEADER_FIND(&s->req_headers, "host");
#define ADD_NV(nm, nmlen, val, vallen)                                         \
  do {                                                                         \
    nva[n].name = (uint8_t *)(nm);                                             \
    nva[n].namelen = (nmlen);                                                  \
    nva[n].value = (uint8_t *)(val);                                           \
    nva[n].valuelen = (vallen);                                                \
    nva[n].flags = NGHTTP2_NV_FLAG_NONE;                                       \
    n++;                                                                       \
  } while (0)
  ADD_NV(":method", 7, "POST", 4);
  if (upstream_tls)
    ADD_NV(":scheme", 7, "https", 5);
  else
    ADD_NV(":scheme", 7, "http", 4);
  /* host is folded into :authority (RFC 9113 8.3.1). */
  const sg_header *auth = authority != NULL ? authority : host;
  if (auth != NULL) {
    nghttp2_vec v = header_value(auth);
    ADD_NV(":authority", 10, v.base, v.len);
  }
  nghttp2_vec p = header_value(HEADER_FIND(&s->req_headers, ":path"));
  ADD_NV(":path", 5, p.base, p.len);
  for (size_t i = 0; i < s->req_headers.count; i++) {
    nghttp2_vec name = nghttp2_rcbuf_get_buf(s->req_headers.items[i].name);
    nghttp2_vec value = nghttp2_rcbuf_get_buf(s->req_headers.items[i].value);
    if (name.len > 0 && name.base[0] == ':')
      continue;
    if (sg_header_is_hop_by_hop(name.base, name.len) ||
        SG_HEADER_IS(name.base, name.len, "authorization") ||
        sg_identity_header_classify(name.base, name.len, own) != SG_IDENTITY_HEADER_PASS)
      continue;
    if (SG_HEADER_IS(name.base, name.len, "grpc-timeout"))
      continue; /* replaced by what is left of the budget, below */
    /* te is only legal as "trailers", which gRPC requires. */
    if (SG_HEADER_IS(name.base, name.len, "te") &&
        !(value.len == 8 && memcmp(value.base, "trailers", 8) == 0))
      continue;
    ADD_NV(name.base, name.len, value.base, value.len);
  }
  /* What the proxy vouches for, under names only it may set. */
  if (s->identity != NULL)
    ADD_NV(own->identity, strlen(own->identity), s->identity, strlen(s->identity));
  if (s->auth_method != NULL)
    ADD_NV(own->auth_method, strlen(own->auth_method), s->auth_method,
           strlen(s->auth_method));
  if (s->identity_provider != NULL)
    ADD_NV(own->provider, strlen(own->provider), s->identity_provider,
           strlen(s->identity_provider));
  if (s->tenant_name != NULL)
    ADD_NV(own->tenant, strlen(own->tenant), s->tenant_name, strlen(s->tenant_name));
  if (s->xfcc != NULL)
    ADD_NV(SG_IDENTITY_HEADER_XFCC, sizeof SG_IDENTITY_HEADER_XFCC - 1, s->xfcc,
           strlen(s->xfcc));
  if (s->deadline_at_ms != 0) {
    uint64_t now = monotonic_ms();
    uint64_t left = s->deadline_at_ms > now ? s->deadline_at_ms - now : 1;
    sg_grpc_timeout_format(left, s->grpc_timeout_out, sizeof s->grpc_timeout_out);
    ADD_NV("grpc-timeout", 12, s->grpc_timeout_out, strlen(s->grpc_timeout_out));
  }
#undef ADD_NV
  return n;
}

ssize_t sg_stream_read_request_body(nghttp2_session *session, int32_t id,
                                    uint8_t *buf, size_t length,
                                    uint32_t *data_flags,
                                    nghttp2_data_source *source, void *user) {
  (void)id;
  (void)user;
  sg_stream *s = source->ptr;
  size_t avail = evbuffer_get_length(s->req_body);
  if (avail == 0) {
    if (!s->req_eof)
      return NGHTTP2_ERR_DEFERRED;
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
    if (s->req_trailers.count > 0) {
      nghttp2_nv *nva = malloc(s->req_trailers.count * sizeof *nva);
      if (nva != NULL) {
        size_t n = build_nv(&s->req_trailers, nva);
        if (n > 0 && nghttp2_submit_trailer(session, s->up_id, nva, n) == 0)
          *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        free(nva);
      }
    }
    return 0;
  }
  size_t n = avail < length ? avail : length;
  evbuffer_remove(s->req_body, buf, n);
  /* The backend has taken the bytes: now the client may send more. */
  client_consume(s, n);
  return (ssize_t)n;
}

ssize_t sg_stream_read_response_body(nghttp2_session *session, int32_t id,
                                     uint8_t *buf, size_t length,
                                     uint32_t *data_flags,
                                     nghttp2_data_source *source, void *user) {
  (void)id;
  (void)user;
  sg_stream *s = source->ptr;
  size_t avail = evbuffer_get_length(s->resp_body);
  if (avail == 0) {
    if (!s->resp_eof)
      return NGHTTP2_ERR_DEFERRED;
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
    if (s->resp_trailers.count > 0) {
      nghttp2_nv *nva = malloc(s->resp_trailers.count * sizeof *nva);
      if (nva != NULL) {
        size_t n = build_nv(&s->resp_trailers, nva);
        if (n > 0 && nghttp2_submit_trailer(session, s->id, nva, n) == 0)
          *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        free(nva);
      }
      sg_header_list_clear(&s->resp_trailers);
    }
    return 0;
  }
  size_t n = avail < length ? avail : length;
  evbuffer_remove(s->resp_body, buf, n);
  /* The client leg has taken the bytes: the backend may send more. */
  sg_upstream_consumed(s, n);
  return (ssize_t)n;
}
