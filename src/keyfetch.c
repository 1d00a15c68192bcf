/* HTTPS fetches of JWT providers' keys on the main loop. See keyfetch.h
 * for the policy; this file is the state machine of one fetcher:
 *
 *   idle --(timer: scheduled refresh | wake: a worker's refetch request)-->
 *   [discovery document] --> JWKS document --> idle (next refresh, or a
 *   backoff after a failure)
 *
 * One request at a time per fetcher, each on its own connection (TLS
 * state is never reused across fetches). libevent's HTTP callbacks only
 * record what happened and activate `done_ev`; the connection is freed and
 * the result handled from there, outside evhttp's own call stack. */
#include "sparkgate/keyfetch.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "sg_build_config.h"
#include "sparkgate/jsonload.h"
#include "sparkgate/log.h"
#include "sparkgate/netaddr.h"
#include "sparkgate/tls.h"

#define MAX_HEADERS_BYTES (64 * 1024)
#define MAX_BACKOFF_S 300u

enum stage { STAGE_IDLE, STAGE_DISCOVERY, STAGE_JWKS };

/* What one request ended with, recorded by the evhttp callbacks. */
struct response {
  bool done;        /* the request callback ran */
  int status;       /* 0: no HTTP response at all */
  bool too_big;
  bool have_error;
  enum evhttp_request_error error;
  char *body;
  size_t len;
  char *content_type;
  char *cache_control;
  char *location;
  char tls_err[192]; /* from certificate verification */
  char net_err[192]; /* from OpenSSL's error queue */
  int dns_err;       /* the URL's host did not resolve (EVUTIL_EAI_*) */
};

struct fetcher {
  sg_keyfetch *kf;
  sg_jwt_keysource *src; /* ref */
  char *name;
  char *issuer;
  char *jwks_url;      /* configured; NULL with discovery */
  char *discovery_url; /* with discovery */
  bool discovery;
  char *jwks_uri;      /* from the last good discovery document */
  bool need_discovery;
  struct ssl_ctx_st *tls; /* ref */
  uint32_t connect_timeout_ms;
  uint32_t fetch_timeout_ms;
  uint32_t max_response_bytes;
  uint32_t min_refresh_s;
  uint32_t max_refresh_s;

  struct event *timer;    /* next scheduled refresh or retry */
  struct event *wake_ev;  /* activated by workers (any thread) */
  struct event *done_ev;  /* a request ended */
  struct event *deadline; /* fetch_timeout_ms of the request in flight */

  enum stage stage;
  char *url; /* of the document in flight (a copy: a reload may replace
                the strings above meanwhile) */
  struct evhttp_connection *conn;
  struct evhttp_request *req; /* owned by evhttp; NULL once it ended */
  struct response res;
  uint32_t backoff_s;
  bool had_keys;
  bool mark;
};

struct sg_keyfetch {
  struct event_base *base;
  struct evdns_base *dns;
  struct fetcher **f;
  size_t n;
  sg_keyfetch_change_fn on_change;
  void *arg;
};

/* ---- pure helpers ------------------------------------------------------- */

int sg_keyfetch_check_url(const char *url, char *err, size_t errlen) {
  errno = 0;
  struct evhttp_uri *u = evhttp_uri_parse_with_flags(url, 0);
  if (u == NULL && errno == ENOMEM) {
    snprintf(err, errlen, "out of memory while checking \"%s\"", url);
    return -1;
  }
  if (u == NULL) {
    snprintf(err, errlen,
             "\"%s\" is not a valid URL; give an absolute https:// URL", url);
    return -1;
  }
  int rc = -1;
  const char *scheme = evhttp_uri_get_scheme(u);
  const char *host = evhttp_uri_get_host(u);
  int port = evhttp_uri_get_port(u);
  if (scheme == NULL || strcasecmp(scheme, "https") != 0)
    snprintf(err, errlen,
             "\"%s\" is not an https:// URL; keys are only fetched over TLS",
             url);
  else if (host == NULL || host[0] == '\0')
    snprintf(err, errlen, "\"%s\" has no host", url);
  else if (evhttp_uri_get_userinfo(u) != NULL)
    snprintf(err, errlen,
             "\"%s\" carries user information (user@); credentials do not "
             "belong in a key URL",
             url);
  else if (evhttp_uri_get_fragment(u) != NULL)
    snprintf(err, errlen, "\"%s\" has a #fragment; remove it", url);
  else if (port == 0)
    snprintf(err, errlen, "\"%s\" has port 0", url);
  else
    rc = 0;
  evhttp_uri_free(u);
  return rc;
}

struct ssl_ctx_st *sg_keyfetch_tls_ctx_new(const char *ca_file, char *err,
                                           size_t errlen) {
  errno = 0;
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
    char buf[160];
    snprintf(err, errlen, "cannot create a TLS context: %s",
             sg_tls_last_error(buf, sizeof buf));
    SSL_CTX_free(ctx);
    return NULL;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  int ok = ca_file != NULL ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL)
                           : SSL_CTX_set_default_verify_paths(ctx);
  if (ok != 1) {
    /* The last error says most about a file; memory may have run out
     * anywhere (see sg_tls_last_error). */
    bool oom = errno == ENOMEM;
    unsigned long last = ERR_peek_last_error(), e;
    char buf[160] = "";
    if (last != 0)
      ERR_error_string_n(last, buf, sizeof buf);
    while ((e = ERR_get_error()) != 0)
      if (ERR_GET_REASON(e) == ERR_R_MALLOC_FAILURE)
        oom = true;
    if (oom)
      snprintf(buf, sizeof buf, "out of memory");
    if (ca_file != NULL)
      snprintf(err, errlen,
               "cannot load CA certificates from %s (%s); give a readable "
               "PEM file with the identity provider's CA",
               ca_file, buf[0] ? buf : "no certificate found");
    else
      snprintf(err, errlen,
               "cannot load the system trust store (%s); give \"ca_file\"",
               buf[0] ? buf : "unknown error");
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

long sg_keyfetch_max_age(const char *cc) {
  if (cc == NULL)
    return -1;
  long result = -1;
  const char *p = cc;
  while (*p != '\0') {
    while (*p == ' ' || *p == '\t' || *p == ',')
      p++;
    const char *name = p;
    while (*p != '\0' && *p != '=' && *p != ',' && *p != ' ' && *p != '\t')
      p++;
    size_t nlen = (size_t)(p - name);
    while (*p == ' ' || *p == '\t')
      p++;
    const char *val = NULL;
    size_t vlen = 0;
    if (*p == '=') {
      p++;
      while (*p == ' ' || *p == '\t')
        p++;
      if (*p == '"') {
        val = ++p;
        while (*p != '\0' && *p != '"') {
          if (*p == '\\' && p[1] != '\0')
            p++;
          p++;
        }
        vlen = (size_t)(p - val);
        if (*p == '"')
          p++;
      } else {
        val = p;
        while (*p != '\0' && *p != ',' && *p != ' ' && *p != '\t')
          p++;
        vlen = (size_t)(p - val);
      }
    }
    /* Skip to the next directive (tolerates junk after a value). */
    while (*p != '\0' && *p != ',')
      p++;
    if (nlen == 0)
      continue;
    if ((nlen == 8 && strncasecmp(name, "no-cache", 8) == 0) ||
        (nlen == 8 && strncasecmp(name, "no-store", 8) == 0))
      return 0;
    if (nlen == 7 && strncasecmp(name, "max-age", 7) == 0 && val != NULL &&
        vlen > 0) {
      long v = 0;
      size_t i = 0;
      for (; i < vlen && isdigit((unsigned char)val[i]); i++)
        v = v > (LONG_MAX - 9) / 10 ? LONG_MAX : v * 10 + (val[i] - '0');
      if (i == vlen && result < 0)
        result = v;
    }
  }
  return result;
}

uint32_t sg_keyfetch_refresh_delay(long max_age, uint32_t min_refresh_s,
                                   uint32_t max_refresh_s) {
  if (max_age < 0 || (unsigned long)max_age > max_refresh_s)
    return max_refresh_s;
  if ((unsigned long)max_age < min_refresh_s)
    return min_refresh_s;
  return (uint32_t)max_age;
}

char *sg_keyfetch_discovery_url(const char *issuer) {
  static const char suffix[] = "/.well-known/openid-configuration";
  size_t n = strlen(issuer);
  if (n > 0 && issuer[n - 1] == '/')
    n--;
  char *u = malloc(n + sizeof suffix);
  if (u == NULL)
    return NULL;
  memcpy(u, issuer, n);
  memcpy(u + n, suffix, sizeof suffix);
  return u;
}

int sg_keyfetch_parse_discovery(const char *body, size_t len,
                                const char *issuer, char **jwks_uri,
                                char *err, size_t errlen) {
  *jwks_uri = NULL;
  json_t *root = sg_jsonload_parse_doc(body, len, err, errlen);
  if (root == NULL)
    return -1;
  int rc = -1;
  const json_t *iss = json_object_get(root, "issuer");
  const json_t *uri = json_object_get(root, "jwks_uri");
  char why[300];
  if (!json_is_object(root)) {
    snprintf(err, errlen, "not a JSON object");
  } else if (!json_is_string(iss)) {
    snprintf(err, errlen, "no \"issuer\" string");
  } else if (json_string_length(iss) != strlen(issuer) ||
             strcmp(json_string_value(iss), issuer) != 0) {
    /* OpenID Connect Discovery 1.0 section 4.3: exact equality, so that
     * one issuer cannot hand out another's keys. */
    snprintf(err, errlen,
             "its \"issuer\" \"%.200s\" is not the configured issuer \"%s\" "
             "(they must be equal byte for byte)",
             json_string_value(iss), issuer);
  } else if (!json_is_string(uri) ||
             strlen(json_string_value(uri)) != json_string_length(uri)) {
    snprintf(err, errlen, "no \"jwks_uri\" string");
  } else if (sg_keyfetch_check_url(json_string_value(uri), why, sizeof why) !=
             0) {
    snprintf(err, errlen, "jwks_uri: %s", why);
  } else if ((*jwks_uri = strdup(json_string_value(uri))) == NULL) {
    snprintf(err, errlen, "out of memory");
  } else {
    rc = 0;
  }
  json_decref(root);
  return rc;
}

bool sg_keyfetch_json_content_type(const char *ct) {
  if (ct == NULL)
    return false;
  while (*ct == ' ' || *ct == '\t')
    ct++;
  size_t n = strcspn(ct, "; \t");
  static const char app[] = "application/";
  if (n < sizeof app - 1 || strncasecmp(ct, app, sizeof app - 1) != 0)
    return false;
  const char *sub = ct + sizeof app - 1;
  size_t sn = n - (sizeof app - 1);
  if (sn == 4 && strncasecmp(sub, "json", 4) == 0)
    return true;
  return sn > 5 && strncasecmp(sub + sn - 5, "+json", 5) == 0;
}

/* ---- one request -------------------------------------------------------- */

static void response_clear(struct response *r) {
  free(r->body);
  free(r->content_type);
  free(r->cache_control);
  free(r->location);
  memset(r, 0, sizeof *r);
}

static char *header_dup(struct evkeyvalq *h, const char *name, size_t max) {
  const char *v = evhttp_find_header(h, name);
  return v != NULL ? strndup(v, max) : NULL;
}

/* Frees the connection, and with it a request still pending, whose
 * callbacks then never run. Never called from inside an evhttp callback. */
static void conn_close(struct fetcher *f) {
  if (f->deadline != NULL)
    event_del(f->deadline);
  if (f->conn != NULL)
    evhttp_connection_free(f->conn);
  f->conn = NULL;
  f->req = NULL;
}

static int verify_cb(int ok, X509_STORE_CTX *x) {
  if (!ok) {
    SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
    struct fetcher *f = ssl != NULL ? SSL_get_app_data(ssl) : NULL;
    if (f != NULL && f->res.tls_err[0] == '\0') {
      int e = X509_STORE_CTX_get_error(x);
      snprintf(f->res.tls_err, sizeof f->res.tls_err,
               "certificate verify failed: %s (depth %d)",
               X509_verify_cert_error_string(e),
               X509_STORE_CTX_get_error_depth(x));
    }
  }
  return ok;
}

static void on_request_error(enum evhttp_request_error error, void *arg) {
  struct fetcher *f = arg;
  f->res.have_error = true;
  f->res.error = error;
  struct bufferevent *bev =
      f->conn != NULL ? evhttp_connection_get_bufferevent(f->conn) : NULL;
  unsigned long e, last = 0;
  /* libevent also queues bare SSL_get_error() codes here (library 0):
   * they say nothing a reader could use. */
  while (bev != NULL && (e = bufferevent_get_openssl_error(bev)) != 0)
    if (ERR_GET_LIB(e) != 0)
      last = e;
  if (last != 0)
    ERR_error_string_n(last, f->res.net_err, sizeof f->res.net_err);
  /* evhttp resolves the host itself and reports a failure as any other
   * failed connect: a mistyped issuer host must not read as a refusal. */
  if (bev != NULL)
    f->res.dns_err = bufferevent_socket_get_dns_error(bev);
}

static void on_request_done(struct evhttp_request *req, void *arg) {
  struct fetcher *f = arg;
  struct response *r = &f->res;
  f->req = NULL; /* evhttp frees it when we return */
  r->done = true;
  int code = req != NULL ? evhttp_request_get_response_code(req) : 0;
  if (code != 0) {
    r->status = code;
    struct evkeyvalq *h = evhttp_request_get_input_headers(req);
    r->content_type = header_dup(h, "Content-Type", 200);
    r->cache_control = header_dup(h, "Cache-Control", 500);
    r->location = header_dup(h, "Location", 200);
    struct evbuffer *b = evhttp_request_get_input_buffer(req);
    size_t n = evbuffer_get_length(b);
    if (n > f->max_response_bytes) {
      r->too_big = true;
    } else if ((r->body = malloc(n + 1)) != NULL) {
      evbuffer_remove(b, r->body, n);
      r->body[n] = '\0';
      r->len = n;
    }
  }
  event_active(f->done_ev, EV_TIMEOUT, 0);
}

static int request_start(struct fetcher *f, const char *url, char *err,
                         size_t errlen) {
  response_clear(&f->res);
  free(f->url);
  f->url = strdup(url);
  if (f->url == NULL) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  struct evhttp_uri *u = evhttp_uri_parse_with_flags(url, 0);
  if (u == NULL || evhttp_uri_get_host(u) == NULL) {
    snprintf(err, errlen, "not a valid URL");
    evhttp_uri_free(u);
    return -1;
  }
  char host[256];
  const char *h = evhttp_uri_get_host(u);
  size_t hl = strlen(h);
  if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']')
    snprintf(host, sizeof host, "%.*s", (int)(hl - 2), h + 1);
  else
    snprintf(host, sizeof host, "%s", h);
  int port = evhttp_uri_get_port(u);
  char hosthdr[300];
  if (port < 0)
    snprintf(hosthdr, sizeof hosthdr, "%s", h);
  else
    snprintf(hosthdr, sizeof hosthdr, "%s:%d", h, port);
  if (port < 0)
    port = 443;
  const char *path = evhttp_uri_get_path(u);
  const char *query = evhttp_uri_get_query(u);
  size_t plen = (path ? strlen(path) : 0) + (query ? strlen(query) + 1 : 0) + 2;
  char *target = malloc(plen);
  if (target == NULL) {
    evhttp_uri_free(u);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  snprintf(target, plen, "%s%s%s", path && path[0] ? path : "/",
           query ? "?" : "", query ? query : "");
  evhttp_uri_free(u);

  SSL *ssl = SSL_new(f->tls);
  if (ssl == NULL) {
    free(target);
    snprintf(err, errlen, "cannot create a TLS session");
    return -1;
  }
  /* Which name the certificate must carry: the URL's host. SNI only for
   * names (RFC 6066 forbids IP literals there). */
  int ok = 1;
  if (sg_netaddr_is_numeric(host)) {
    ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host);
  } else {
    ok = SSL_set_tlsext_host_name(ssl, host) == 1 && SSL_set1_host(ssl, host) == 1;
  }
  SSL_set_verify(ssl, SSL_VERIFY_PEER, verify_cb);
  SSL_set_app_data(ssl, f);
  if (!ok) {
    SSL_free(ssl);
    free(target);
    ERR_clear_error();
    snprintf(err, errlen, "cannot set the TLS peer name");
    return -1;
  }
  struct bufferevent *bev = bufferevent_openssl_socket_new(
      f->kf->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
      BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
  if (bev == NULL) {
    SSL_free(ssl);
    free(target);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  /* The body's end is known from Content-Length or chunking; a truncated
   * document fails to parse anyway. */
  bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
  f->conn = evhttp_connection_base_bufferevent_new(f->kf->base, f->kf->dns,
                                                   bev, host, (unsigned short)port);
  if (f->conn == NULL) {
    bufferevent_free(bev);
    free(target);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  struct timeval io = {(time_t)(f->connect_timeout_ms / 1000),
                       (suseconds_t)(f->connect_timeout_ms % 1000) * 1000};
  evhttp_connection_set_timeout_tv(f->conn, &io);
  evhttp_connection_set_retries(f->conn, 0);
  evhttp_connection_set_max_body_size(f->conn, (ev_ssize_t)f->max_response_bytes);
  evhttp_connection_set_max_headers_size(f->conn, MAX_HEADERS_BYTES);

  struct evhttp_request *req = evhttp_request_new(on_request_done, f);
  if (req == NULL) {
    conn_close(f);
    free(target);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  evhttp_request_set_error_cb(req, on_request_error);
  struct evkeyvalq *oh = evhttp_request_get_output_headers(req);
  evhttp_add_header(oh, "Host", hosthdr);
  evhttp_add_header(oh, "Accept", "application/jwk-set+json, application/json");
  evhttp_add_header(oh, "User-Agent", "sparkgate/" SG_VERSION);
  evhttp_add_header(oh, "Connection", "close");
  f->req = req;
  struct timeval total = {(time_t)(f->fetch_timeout_ms / 1000),
                          (suseconds_t)(f->fetch_timeout_ms % 1000) * 1000};
  evtimer_add(f->deadline, &total);
  /* May call on_request_done at once (a refused local connect); that only
   * records and activates done_ev. */
  if (evhttp_make_request(f->conn, req, EVHTTP_REQ_GET, target) != 0) {
    if (f->req != NULL)
      evhttp_request_free(req);
    f->req = NULL;
    conn_close(f);
    free(target);
    snprintf(err, errlen, "cannot start the request");
    return -1;
  }
  free(target);
  return 0;
}

/* Why the request in f->res failed, or NULL when it is a 200 with JSON. */
static const char *response_problem(const struct fetcher *f, char *why,
                                    size_t n) {
  const struct response *r = &f->res;
  if (r->status == 0) {
    if (r->tls_err[0] != '\0') {
      snprintf(why, n, "TLS: %s", r->tls_err);
    } else if (r->dns_err != 0) {
      snprintf(why, n, "cannot resolve the URL's host name: %s",
               evutil_gai_strerror(r->dns_err));
    } else if (r->have_error) {
      switch (r->error) {
      case EVREQ_HTTP_TIMEOUT:
        snprintf(why, n, "no progress for %u ms (connect_timeout_ms)",
                 f->connect_timeout_ms);
        break;
      case EVREQ_HTTP_DATA_TOO_LONG:
        snprintf(why, n, "response larger than max_response_bytes (%u)",
                 f->max_response_bytes);
        break;
      case EVREQ_HTTP_INVALID_HEADER:
        snprintf(why, n, "not a valid HTTP response%s%s",
                 r->net_err[0] ? ": " : "", r->net_err);
        break;
      default:
        snprintf(why, n, "connection failed or closed before a response%s%s",
                 r->net_err[0] ? ": " : "", r->net_err);
        break;
      }
    } else {
      snprintf(why, n, "cannot connect (refused, unreachable, or closed)");
    }
    return why;
  }
  if (r->status >= 300 && r->status < 400) {
    snprintf(why, n,
             "HTTP %d redirect%s%.200s refused (redirects are not followed: "
             "configure the final URL)",
             r->status, r->location ? " to " : "",
             r->location ? r->location : "");
    return why;
  }
  if (r->status != 200) {
    snprintf(why, n, "HTTP %d", r->status);
    return why;
  }
  if (r->too_big) {
    snprintf(why, n, "response larger than max_response_bytes (%u)",
             f->max_response_bytes);
    return why;
  }
  if (r->body == NULL) {
    snprintf(why, n, "out of memory");
    return why;
  }
  if (!sg_keyfetch_json_content_type(r->content_type)) {
    snprintf(why, n, "content-type \"%.80s\" is not JSON",
             r->content_type ? r->content_type : "(none)");
    return why;
  }
  return NULL;
}

/* ---- the fetcher -------------------------------------------------------- */

static void schedule(struct fetcher *f, uint32_t secs) {
  struct timeval tv = {(time_t)secs, 0};
  evtimer_add(f->timer, &tv);
}

static void notify_change(struct fetcher *f) {
  if (f->kf->on_change != NULL)
    f->kf->on_change(f->kf->arg);
}

/* The attempt failed: the keys in force stay; retry with backoff. When
 * `finished` the key source already knows (the document was refused). */
static void attempt_failed(struct fetcher *f, const char *why, bool finished) {
  conn_close(f);
  if (!finished) {
    char ignored[8];
    sg_jwt_keysource_finish_fetch(f->src, NULL, 0, sg_jwt_monotonic_ms(), NULL,
                                  ignored, sizeof ignored);
  }
  f->stage = STAGE_IDLE;
  f->need_discovery = f->discovery;
  uint32_t cap = f->min_refresh_s < MAX_BACKOFF_S ? f->min_refresh_s : MAX_BACKOFF_S;
  if (cap < 1)
    cap = 1;
  f->backoff_s = f->backoff_s == 0 ? 1 : f->backoff_s * 2;
  if (f->backoff_s > cap)
    f->backoff_s = cap;
  bool has = sg_jwt_keysource_has_keys(f->src);
  sg_warn("identity provider %s: fetching %s failed: %s; %s; retry in %u s",
          f->name, f->url != NULL ? f->url : "-", why,
          has ? "the keys in force stay"
              : "no keys yet: its calls get UNAVAILABLE (14)",
          f->backoff_s);
  response_clear(&f->res);
  free(f->url);
  f->url = NULL;
  schedule(f, f->backoff_s);
}

static void fetch_begin(struct fetcher *f, bool force) {
  if (f->stage != STAGE_IDLE)
    return;
  if (!sg_jwt_keysource_begin_fetch(f->src, force))
    return;
  evtimer_del(f->timer);
  /* A scheduled refresh reads the discovery document again (the provider
   * may move its keys); a refetch for an unknown kid goes straight to the
   * keys it already knows the place of. */
  bool disc = f->discovery && (force || f->need_discovery || f->jwks_uri == NULL);
  f->stage = disc ? STAGE_DISCOVERY : STAGE_JWKS;
  const char *url = disc ? f->discovery_url
                         : f->discovery ? f->jwks_uri : f->jwks_url;
  sg_debug("identity provider %s: fetching %s%s", f->name, url,
           force ? "" : " (refetch for an unknown kid)");
  char err[256];
  if (request_start(f, url, err, sizeof err) != 0)
    attempt_failed(f, err, false);
}

static void on_done(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  struct fetcher *f = arg;
  if (f->stage == STAGE_IDLE || !f->res.done)
    return;
  conn_close(f);
  char why[512], err[400];
  if (response_problem(f, why, sizeof why) != NULL) {
    attempt_failed(f, why, false);
    return;
  }
  struct response *r = &f->res;
  if (f->stage == STAGE_DISCOVERY) {
    char *uri = NULL;
    if (sg_keyfetch_parse_discovery(r->body, r->len, f->issuer, &uri, err,
                                    sizeof err) != 0) {
      snprintf(why, sizeof why, "discovery document: %s", err);
      attempt_failed(f, why, false);
      return;
    }
    if (f->jwks_uri == NULL || strcmp(f->jwks_uri, uri) != 0)
      sg_info("identity provider %s: discovery: jwks_uri is %s", f->name, uri);
    free(f->jwks_uri);
    f->jwks_uri = uri;
    f->need_discovery = false;
    f->stage = STAGE_JWKS;
    if (request_start(f, f->jwks_uri, err, sizeof err) != 0)
      attempt_failed(f, err, false);
    return;
  }
  size_t n_keys = 0;
  int rc = sg_jwt_keysource_finish_fetch(f->src, r->body, r->len,
                                         sg_jwt_monotonic_ms(), &n_keys, err,
                                         sizeof err);
  if (rc < 0) {
    snprintf(why, sizeof why, "JWKS: %s", err);
    attempt_failed(f, why, true);
    return;
  }
  uint32_t next = sg_keyfetch_refresh_delay(sg_keyfetch_max_age(r->cache_control),
                                            f->min_refresh_s, f->max_refresh_s);
  if (rc == 1)
    sg_info("identity provider %s: %zu key%s from %s (key set changed); next "
            "refresh in %u s",
            f->name, n_keys, n_keys == 1 ? "" : "s", f->url, next);
  else
    sg_debug("identity provider %s: %zu key%s from %s (unchanged); next "
             "refresh in %u s",
             f->name, n_keys, n_keys == 1 ? "" : "s", f->url, next);
  f->stage = STAGE_IDLE;
  free(f->url);
  f->url = NULL;
  f->backoff_s = 0;
  response_clear(&f->res);
  schedule(f, next);
  bool first = !f->had_keys;
  f->had_keys = true;
  if (rc == 1 || first)
    notify_change(f);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  struct fetcher *f = arg;
  /* The request ended just before: on_done has it. */
  if (f->stage == STAGE_IDLE || f->res.done)
    return;
  char why[128];
  snprintf(why, sizeof why, "timed out after %u ms (fetch_timeout_ms)",
           f->fetch_timeout_ms);
  attempt_failed(f, why, false);
}

static void on_timer(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  fetch_begin(arg, true);
}

static void on_wake(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  fetch_begin(arg, false);
}

/* Runs on a worker thread, under the key source's lock. */
static void wake_from_worker(void *arg) {
  struct fetcher *f = arg;
  event_active(f->wake_ev, EV_TIMEOUT, 0);
}

static int replace_str(char **dst, const char *src) {
  char *c = NULL;
  if (src != NULL && (c = strdup(src)) == NULL)
    return -1;
  free(*dst);
  *dst = c;
  return 0;
}

static int apply_config(struct fetcher *f, const sg_jwt_fetch_config *c) {
  char *disc = c->discovery ? sg_keyfetch_discovery_url(c->issuer) : NULL;
  if ((c->discovery && disc == NULL) || replace_str(&f->name, c->provider) != 0 ||
      replace_str(&f->issuer, c->issuer) != 0 ||
      replace_str(&f->jwks_url, c->jwks_url) != 0) {
    free(disc);
    return -1;
  }
  free(f->discovery_url);
  f->discovery_url = disc;
  f->discovery = c->discovery;
  if (c->tls != f->tls) {
    SSL_CTX_up_ref(c->tls);
    SSL_CTX_free(f->tls);
    f->tls = c->tls;
  }
  f->connect_timeout_ms = c->connect_timeout_ms;
  f->fetch_timeout_ms = c->fetch_timeout_ms;
  f->max_response_bytes = c->max_response_bytes;
  f->min_refresh_s = c->min_refresh_s;
  f->max_refresh_s = c->max_refresh_s;
  return 0;
}

static void fetcher_free(struct fetcher *f) {
  if (f == NULL)
    return;
  if (f->src != NULL) {
    /* After this returns no worker can reach wake_ev any more. */
    sg_jwt_keysource_set_wake(f->src, NULL, NULL);
    if (f->stage != STAGE_IDLE) {
      char ignored[8];
      sg_jwt_keysource_finish_fetch(f->src, NULL, 0, sg_jwt_monotonic_ms(),
                                    NULL, ignored, sizeof ignored);
    }
  }
  conn_close(f);
  response_clear(&f->res);
  if (f->timer != NULL)
    event_free(f->timer);
  if (f->wake_ev != NULL)
    event_free(f->wake_ev);
  if (f->done_ev != NULL)
    event_free(f->done_ev);
  if (f->deadline != NULL)
    event_free(f->deadline);
  sg_jwt_keysource_unref(f->src);
  SSL_CTX_free(f->tls);
  free(f->name);
  free(f->issuer);
  free(f->jwks_url);
  free(f->discovery_url);
  free(f->jwks_uri);
  free(f->url);
  free(f);
}

static struct fetcher *fetcher_new(sg_keyfetch *kf, sg_jwt_keysource *src,
                                   const sg_jwt_fetch_config *c) {
  struct fetcher *f = calloc(1, sizeof *f);
  if (f == NULL)
    return NULL;
  f->kf = kf;
  f->timer = evtimer_new(kf->base, on_timer, f);
  f->wake_ev = event_new(kf->base, -1, 0, on_wake, f);
  f->done_ev = event_new(kf->base, -1, 0, on_done, f);
  f->deadline = evtimer_new(kf->base, on_deadline, f);
  if (f->timer == NULL || f->wake_ev == NULL || f->done_ev == NULL ||
      f->deadline == NULL || apply_config(f, c) != 0) {
    fetcher_free(f);
    return NULL;
  }
  f->src = sg_jwt_keysource_ref(src);
  f->had_keys = sg_jwt_keysource_has_keys(src);
  f->need_discovery = f->discovery;
  sg_jwt_keysource_set_wake(src, wake_from_worker, f);
  return f;
}

sg_keyfetch *sg_keyfetch_new(struct event_base *base,
                             sg_keyfetch_change_fn on_change, void *arg) {
  sg_keyfetch *kf = calloc(1, sizeof *kf);
  if (kf == NULL)
    return NULL;
  kf->base = base;
  kf->on_change = on_change;
  kf->arg = arg;
  kf->dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
                                     EVDNS_BASE_DISABLE_WHEN_INACTIVE);
  if (kf->dns == NULL) /* no resolv.conf: IP literals still work */
    kf->dns = evdns_base_new(base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
  if (kf->dns == NULL) {
    free(kf);
    return NULL;
  }
  return kf;
}

void sg_keyfetch_update(sg_keyfetch *kf, const sg_jwt_verifier *v) {
  for (size_t i = 0; i < kf->n; i++)
    kf->f[i]->mark = false;
  size_t np = sg_jwt_verifier_provider_count(v);
  for (size_t i = 0; i < np; i++) {
    sg_jwt_keysource *src = sg_jwt_verifier_keysource(v, i);
    const sg_jwt_fetch_config *c = sg_jwt_verifier_fetch_config(v, i);
    if (src == NULL || c == NULL)
      continue;
    struct fetcher *f = NULL;
    for (size_t j = 0; j < kf->n && f == NULL; j++)
      if (kf->f[j]->src == src)
        f = kf->f[j];
    if (f != NULL) {
      if (apply_config(f, c) != 0)
        sg_error("identity provider %s: out of memory applying the new "
                 "settings; the old ones stay",
                 c->provider);
      f->mark = true;
      continue;
    }
    struct fetcher **nf = realloc(kf->f, (kf->n + 1) * sizeof *nf);
    if (nf != NULL)
      kf->f = nf;
    f = nf != NULL ? fetcher_new(kf, src, c) : NULL;
    if (f == NULL) {
      sg_error("identity provider %s: out of memory: its keys will not be "
               "fetched",
               c->provider);
      continue;
    }
    f->mark = true;
    kf->f[kf->n++] = f;
    sg_info("identity provider %s: keys from %s%s", f->name,
            f->discovery ? f->discovery_url : f->jwks_url,
            f->had_keys ? " (a fallback key set is in force until then)" : "");
    schedule(f, 0);
  }
  size_t w = 0;
  for (size_t i = 0; i < kf->n; i++) {
    if (kf->f[i]->mark)
      kf->f[w++] = kf->f[i];
    else
      fetcher_free(kf->f[i]);
  }
  kf->n = w;
}

size_t sg_keyfetch_count(const sg_keyfetch *kf) { return kf ? kf->n : 0; }

void sg_keyfetch_free(sg_keyfetch *kf) {
  if (kf == NULL)
    return;
  for (size_t i = 0; i < kf->n; i++)
    fetcher_free(kf->f[i]);
  free(kf->f);
  if (kf->dns != NULL)
    evdns_base_free(kf->dns, 1);
  free(kf);
}
