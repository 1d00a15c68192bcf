/* Admission: everything a request must pass before any upstream work
 * starts, in order: it is gRPC, it targets what it says, it is
 * authenticated, it belongs to a tenant that admits its caller and this
 * method, and the tenant has room for it. Each refusal is answered and
 * logged once, here, where the reason is known. */
#include "sparkgate/admission.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#include "sparkgate/conn.h"
#include "sparkgate/identity.h"
#include "sparkgate/jwt.h"
#include "sparkgate/limits.h"
#include "sparkgate/log.h"
#include "sparkgate/memcache.h"
#include "sparkgate/metrics.h"
#include "sparkgate/observe.h"
#include "sparkgate/route.h"
#include "sparkgate/token_cache.h"
#include "sparkgate/upstream.h"
#include "sparkgate/worker.h"


static nghttp2_vec header_value(const sg_header *h) {
  return nghttp2_rcbuf_get_buf(h->value);
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

/* A request a proxy must not pass on: the stream is reset, as nghttp2 does
 * for the malformed requests it catches itself (RFC 9113 8.1.1). */
static void reject_malformed(sg_stream *s, const char *why) {
  char pathbuf[256];
  s->rejected = true;
  snprintf(s->reason, sizeof s->reason, "malformed: %s", why);
  sg_conn_charge(s->conn, 5, "malformed requests");
  s->resp_started = true;
  s->resp_eof = true;
  sg_info("conn=%llu stream=%d peer=%s path=%s: rejected (stream reset): %s",
          (unsigned long long)s->conn_id, s->id, s->conn->peer,
          sg_stream_path(s, pathbuf, sizeof pathbuf), why);
  nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                            NGHTTP2_PROTOCOL_ERROR);
  sg_conn_schedule_send(s->conn);
}

/* A call on a connection whose client certificate a reload no longer
 * trusts: refused unprocessed, so that the client retries it on a new
 * connection, whose handshake verifies the certificate afresh. */
static void refuse_stale_certificate(sg_stream *s) {
  char pathbuf[256];
  s->rejected = true;
  snprintf(s->reason, sizeof s->reason,
           "refused: the connection's client certificate no longer verifies");
  s->resp_started = true;
  s->resp_eof = true;
  sg_info("conn=%llu stream=%d peer=%s path=%s: rejected (REFUSED_STREAM): the "
          "connection's client certificate no longer verifies (reload)",
          (unsigned long long)s->conn_id, s->id, s->conn->peer,
          sg_stream_path(s, pathbuf, sizeof pathbuf));
  nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                            NGHTTP2_REFUSED_STREAM);
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
  const sg_header *scheme = s->req.scheme;
  const sg_header *authority = s->req.authority;
  const sg_header *host = s->req.host;
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
          sg_stream_path(s, pathbuf, sizeof pathbuf), reason,
          detail != NULL ? ": " : "", detail != NULL ? detail : "");
  s->resp_started = true;
  s->resp_eof = true;
  s->grpc_status = SG_GRPC_UNAUTHENTICATED;
  snprintf(s->reason, sizeof s->reason, "unauthenticated: %s%s%s", reason,
           detail != NULL ? ": " : "", detail != NULL ? detail : "");
  if (s->gen->metrics != NULL)
    sg_metrics_auth_failure(s->gen->metrics, sg_auth_failure_index(reason));
  sg_conn_charge(s->conn, 2, "unauthenticated requests");
  sg_grpc_submit_error(s->conn->session, s->id, SG_GRPC_UNAUTHENTICATED,
                       "sparkgate: authentication required or failed");
  sg_stream_end_request_early(s);
  sg_conn_schedule_send(s->conn);
}

/* |want|, owned by the stream: the JWT result's own copy when that is what
 * the decision picked (the result no longer owns it), else a copy; a
 * memcache block either way, as the stream frees it. */
static char *take_or_dup(char **owned, const char *want) {
  if (want == NULL)
    return NULL;
  if (want == *owned) {
    *owned = NULL;
    return (char *)want;
  }
  return sg_memcache_strdup(want);
}

/* Every RPC proves who it is before any upstream work starts: a bearer
 * token (verified, or found in this worker's cache of verified tokens),
 * the connection's client certificate, or both, as the listener asks. */
static bool authenticate(sg_stream *s) {
  sg_conn *c = s->conn;
  const sg_config *cfg = s->rt->config;
  if (c->cert_stale) {
    refuse_stale_certificate(s);
    return false;
  }
  /* The listener's auth as this call's configuration has it ("calls" in
   * docs/configuration.md): a reload reaches connections already open.
   * Its index and name cannot change by reload. */
  const sg_listener_config *l = &cfg->listeners[c->listener_index];
  if (l->auth_none) {
    /* Development only: everyone is "anonymous", and tenants decide
     * whether they admit that name like any other. */
    s->identity = sg_memcache_strdup("anonymous");
    s->authenticated = s->identity != NULL;
    s->auth_method = "none";
    if (!s->authenticated)
      sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
    return s->authenticated;
  }
  const sg_header *authz = s->req.authorization;
  if (s->req.n_authorization > 1) {
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
      /* No cache ("token_cache_entries": 0): every call verifies. */
      int rv = cfg->jwt == NULL
                   ? SG_JWT_UNKNOWN_ISSUER
                   : sg_token_cache_verify(s->gen->token_cache, cfg->jwt, p,
                                           len, (int64_t)time(NULL), &jwt);
      if (rv == SG_JWT_INTERNAL) {
        /* Out of memory while verifying: no verdict on the token, so not
         * a denial (16 would make PySpark give up). */
        sg_stream_reject(s, SG_GRPC_RESOURCE_EXHAUSTED,
                         "sparkgate: out of resources, retry later",
                         jwt.detail != NULL ? jwt.detail : "jwt: internal error");
        sg_jwt_result_clear(&jwt);
        return false;
      }
      if (rv == SG_JWT_KEYS_UNAVAILABLE || rv == SG_JWT_KID_REFETCHING) {
        /* The token cannot be judged yet (the provider's keys are not
         * fetched, or are being refetched for this kid): not a denial. A
         * client that retries UNAVAILABLE finds the keys in place. */
        char why[192];
        snprintf(why, sizeof why, "jwt: %s: %s", sg_jwt_reason_name(rv),
                 jwt.detail != NULL ? jwt.detail : "-");
        sg_stream_reject(s, SG_GRPC_UNAVAILABLE,
                         "sparkgate: identity provider keys unavailable, retry",
                         why);
        sg_jwt_result_clear(&jwt);
        return false;
      }
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
  s->identity = take_or_dup(&jwt.identity, d.identity);
  s->identity_provider = take_or_dup(&jwt.provider, d.provider);
  s->auth_method = d.method;
  if (jin.state == SG_IDENTITY_JWT_VALID && jwt.claims != NULL &&
      d.provider != NULL)
    s->claims = json_incref(jwt.claims);
  if (c->xfcc != NULL)
    s->xfcc = sg_memcache_strdup(c->xfcc);
  sg_jwt_result_clear(&jwt);
  /* Every identity header the backend is told must be there, or none. */
  if (s->identity == NULL || (d.provider != NULL && s->identity_provider == NULL) ||
      (c->xfcc != NULL && s->xfcc == NULL)) {
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
  return s->req.spoofed ? "a header name with '_' aliases an identity header" : NULL;
}

/* ---- tenant ------------------------------------------------------------- */

static const char *request_header(void *ctx, const char *name, size_t *len) {
  const sg_stream *s = ctx;
  const sg_header *h = sg_header_list_find(&s->req_headers, name, strlen(name));
  if (h == NULL)
    return NULL;
  nghttp2_vec v = header_value(h);
  *len = v.len;
  return (const char *)v.base;
}

static bool admit_route(sg_stream *s) {
  const sg_config *cfg = s->rt->config;
  const sg_header *authority = s->req.authority;
  if (authority == NULL)
    authority = s->req.host;
  nghttp2_vec av = authority != NULL ? header_value(authority) : (nghttp2_vec){NULL, 0};
  sg_route_request rq = {
      .identity = s->identity,
      .claims = s->claims,
      .authority = (const char *)av.base,
      .authority_len = av.len,
      .header = request_header,
      .header_ctx = s,
  };
  sg_route_decision d;
  if (sg_route_select(cfg->routes, &rq, &d) != 0) {
    char why[256];
    snprintf(why, sizeof why, "%s (selector %s, tenant %s, identity %s)",
             d.reason, d.selector != NULL ? d.selector : "-",
             d.denied_tenant != NULL ? d.denied_tenant->name : "-",
             s->identity != NULL ? s->identity : "-");
    sg_stream_reject(s, SG_GRPC_PERMISSION_DENIED, d.message, why);
    return false;
  }
  s->tenant = d.tenant;
  s->tenant_name = d.tenant->name;

  const sg_header *path = s->req.path;
  nghttp2_vec p = header_value(path);
  static const char prefix[] = SG_SPARK_SERVICE_PREFIX;
  bool spark = p.len >= sizeof prefix - 1 &&
               memcmp(p.base, prefix, sizeof prefix - 1) == 0;
  s->method = sg_spark_method_from_path((const char *)p.base, p.len);
  s->spark_call = spark;
  if (spark && s->method < 0) {
    sg_stream_reject(s, SG_GRPC_UNIMPLEMENTED,
                     "sparkgate: not a Spark Connect method", NULL);
    return false;
  }
  if (spark && !sg_route_tenant_allows_method(d.tenant, s->method)) {
    char why[128];
    snprintf(why, sizeof why, "method %s is not allowed for tenant %s",
             sg_spark_method_name((sg_spark_method)s->method), d.tenant->name);
    sg_stream_reject(s, SG_GRPC_PERMISSION_DENIED,
                     "sparkgate: this method is not allowed", why);
    return false;
  }
  return true;
}

static bool admit_limits(sg_stream *s) {
  /* The call's configuration, which chose its tenant: the connection's
   * may be older, with other tenants or none of this one. */
  sg_tenant_state *st = sg_generation_tenant_state(s->gen, s->tenant->index);
  const char *limit = sg_tenant_state_admit(st, s->method, sg_worker_now_us(s->gen->worker) / 1000u);
  if (limit != NULL) {
    char why[192];
    sg_tenant_limit_reason(s->tenant, limit, why, sizeof why);
    sg_stream_reject(s, (sg_grpc_status)s->tenant->limits.over_limit_status,
                     "sparkgate: tenant over its limit, retry later", why);
    return false;
  }
  s->tenant_state = st;
  return true;
}

bool sg_admit(sg_stream *s) {
  const sg_config *cfg = s->rt->config;
  sg_stream_index_request(s);
  const sg_header *method = s->req.method;
  const sg_header *path = s->req.path;
  const sg_header *ctype = s->req.content_type;

  /* nghttp2 has already checked the pseudo-header rules of RFC 9113 8.3. */
  nghttp2_vec m = method != NULL ? header_value(method) : (nghttp2_vec){NULL, 0};
  if (m.len != 4 || memcmp(m.base, "POST", 4) != 0) {
    sg_stream_reject_http(s, 405, "method is not POST (gRPC needs POST)");
    return false;
  }
  if (ctype == NULL) {
    sg_stream_reject_http(s, 415, "no content-type (gRPC needs application/grpc)");
    return false;
  }
  nghttp2_vec ct = header_value(ctype);
  if (!sg_grpc_content_type_ok(ct.base, ct.len)) {
    sg_stream_reject_http(s, 415, "content-type is not application/grpc");
    return false;
  }
  const char *problem = request_target_problem(s);
  if (problem != NULL) {
    reject_malformed(s, problem);
    return false;
  }
  nghttp2_vec p = path != NULL ? header_value(path) : (nghttp2_vec){NULL, 0};
  if (p.len == 0 || !path_allowed(cfg, p.base, p.len)) {
    sg_stream_fail(s, SG_GRPC_UNIMPLEMENTED,
                   "sparkgate: method not served here (path outside the allowed prefixes)");
    return false;
  }

  const char *spoof = spoofed_header(s);
  if (spoof != NULL) {
    sg_stream_reject(s, SG_GRPC_INVALID_ARGUMENT, "sparkgate: invalid request header name",
                spoof);
    return false;
  }
  if (!authenticate(s))
    return false;

  const sg_header *timeout = s->req.grpc_timeout;
  if (timeout != NULL) {
    nghttp2_vec tv = header_value(timeout);
    uint64_t ms;
    if (sg_grpc_timeout_parse(tv.base, tv.len, &ms) != 0) {
      sg_stream_fail(s, SG_GRPC_INTERNAL, "sparkgate: malformed grpc-timeout");
      return false;
    }
    if (ms > cfg->max_grpc_timeout_ms)
      ms = cfg->max_grpc_timeout_ms;
    s->deadline = evtimer_new(s->conn->worker->base, on_deadline, s);
    if (s->deadline == NULL) {
      sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
      return false;
    }
    s->deadline_at_ms = sg_worker_now_us(s->gen->worker) / 1000u + ms;
    struct timeval when = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(s->deadline, &when);
  }

  return admit_route(s) && admit_limits(s);
}
