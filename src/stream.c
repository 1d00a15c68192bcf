#include "sparkgate/stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#include "sparkgate/admission.h"
#include "sparkgate/conn.h"
#include "sparkgate/accesslog.h"
#include "sparkgate/affinity.h"
#include "sparkgate/limits.h"
#include "sparkgate/metrics.h"
#include "sparkgate/route.h"
#include "sparkgate/sparkmsg.h"
#include "sparkgate/identity.h"
#include "sparkgate/jwt.h"
#include "sparkgate/token_cache.h"
#include "sparkgate/log.h"
#include "sparkgate/memcache.h"
#include "sparkgate/upstream.h"
#include "sparkgate/worker.h"

_Static_assert(SG_SPARKMSG_IDENTITY_MAX_BYTES >= SG_IDENTITY_MAX_BYTES &&
                   SG_SPARKMSG_IDENTITY_MAX_BYTES >= SG_JWT_MAX_IDENTITY_BYTES,
               "every identity a caller can have fits the Spark scanner");

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
    sg_header *items;
    if (list->items != NULL && list->items == list->fixed) {
      items = malloc(cap * sizeof *items);
      if (items != NULL)
        memcpy(items, list->items, list->count * sizeof *items);
    } else {
      items = realloc(list->items, cap * sizeof *items);
    }
    if (items == NULL)
      return -1;
    list->items = items;
    list->capacity = cap;
  }
  nghttp2_rcbuf_incref(name);
  nghttp2_rcbuf_incref(value);
  sg_header *h = &list->items[list->count];
  h->name = name;
  h->value = value;
  h->identity_action = SG_HEADER_UNCLASSIFIED;
  list->count++;
  list->bytes += cost;
  return 0;
}

void sg_header_list_clear(sg_header_list *list) {
  for (size_t i = 0; i < list->count; i++) {
    nghttp2_rcbuf_decref(list->items[i].name);
    nghttp2_rcbuf_decref(list->items[i].value);
  }
  if (list->items != list->fixed)
    free(list->items);
  sg_header_list_init(list, list->fixed, list->fixed_capacity);
}

void sg_header_list_init(sg_header_list *list, sg_header *fixed,
                         size_t fixed_capacity) {
  memset(list, 0, sizeof *list);
  if (fixed != NULL && fixed_capacity > 0) {
    list->items = list->fixed = fixed;
    list->capacity = list->fixed_capacity = fixed_capacity;
  }
}

const sg_header *sg_header_list_find(const sg_header_list *list,
                                     const char *name, size_t len) {
  for (size_t i = 0; i < list->count; i++) {
    nghttp2_vec n = nghttp2_rcbuf_get_buf(list->items[i].name);
    if (n.len == len && memcmp(n.base, name, len) == 0)
      return &list->items[i];
  }
  return NULL;
}
#define HEADER_FIND(list, lit) sg_header_list_find((list), (lit), sizeof(lit) - 1)

static nghttp2_vec header_value(const sg_header *h) {
  return nghttp2_rcbuf_get_buf(h->value);
}

/* One walk for what admission, routing, forwarding and logging look up
 * (it was ten searches of the list a call). */
void sg_stream_index_request(sg_stream *s) {
  const sg_identity_header_names *own = &s->rt->config->identity_headers;
  sg_request_fields *f = &s->req;
  memset(f, 0, sizeof *f);
  for (size_t i = 0; i < s->req_headers.count; i++) {
    sg_header *h = &s->req_headers.items[i];
    nghttp2_vec n = nghttp2_rcbuf_get_buf(h->name);
    const sg_header **slot = NULL;
    switch (n.len) {
    case 4:
      if (memcmp(n.base, "host", 4) == 0)
        slot = &f->host;
      break;
    case 5:
      if (memcmp(n.base, ":path", 5) == 0)
        slot = &f->path;
      break;
    case 7:
      if (memcmp(n.base, ":method", 7) == 0)
        slot = &f->method;
      else if (memcmp(n.base, ":scheme", 7) == 0)
        slot = &f->scheme;
      break;
    case 10:
      if (memcmp(n.base, ":authority", 10) == 0)
        slot = &f->authority;
      break;
    case 12:
      if (memcmp(n.base, "content-type", 12) == 0)
        slot = &f->content_type;
      else if (memcmp(n.base, "grpc-timeout", 12) == 0)
        slot = &f->grpc_timeout;
      break;
    case 13:
      if (memcmp(n.base, "authorization", 13) == 0) {
        slot = &f->authorization;
        f->n_authorization++;
      }
      break;
    default:
      break;
    }
    if (slot != NULL && *slot == NULL)
      *slot = h;
    /* Kept with the field: forwarding reads it instead of asking again. */
    h->identity_action = (uint8_t)sg_identity_header_classify(n.base, n.len, own);
    if (h->identity_action == SG_IDENTITY_HEADER_REJECT)
      f->spoofed = true;
  }
  s->req_indexed = true;
}

/* ---- lifecycle ---------------------------------------------------------- */

sg_stream *sg_stream_new(sg_conn *conn, int32_t id) {
  /* Streams come and go with every call, and are past glibc's per-thread
   * cache in size. */
  sg_stream *s = sg_memcache_calloc(1, sizeof *s);
  if (s == NULL)
    return NULL;
  sg_header_list_init(&s->req_headers, s->req_header_slots,
                      SG_STREAM_REQ_HEADER_SLOTS);
  sg_header_list_init(&s->resp_headers, s->resp_header_slots,
                      SG_STREAM_RESP_HEADER_SLOTS);
  sg_header_list_init(&s->resp_trailers, s->resp_trailer_slots,
                      SG_STREAM_RESP_TRAILER_SLOTS);
  s->req_body = evbuffer_new();
  s->resp_body = evbuffer_new();
  if (s->req_body == NULL || s->resp_body == NULL) {
    if (s->req_body != NULL)
      evbuffer_free(s->req_body);
    if (s->resp_body != NULL)
      evbuffer_free(s->resp_body);
    sg_memcache_free_sized(s, sizeof *s);
    return NULL;
  }
  s->conn = conn;
  s->id = id;
  s->conn_id = conn->id;
  s->method = -1;
  /* A new call uses the configuration in force now, even on a connection
   * accepted before a reload: rotated keys and a new routing table apply
   * to it at once. */
  s->gen = conn->worker->current;
  sg_generation_hold(s->gen);
  /* Borrowed: the generation held above keeps its runtime, and an atomic
   * count per call is two locked instructions for nothing. */
  s->rt = s->gen->rt;
  s->grpc_status = -1;
  s->started_us = sg_worker_now_us(conn->worker);
  s->last_activity_ms = s->started_us / 1000u;
  if (s->gen->metrics != NULL)
    sg_metrics_stream_opened(s->gen->metrics);
  sg_list_init(&s->up_link);
  sg_list_push_back(&conn->streams, &s->conn_link);
  conn->n_streams++;
  sg_conn_stream_opened(conn);
  return s;
}

uint64_t sg_monotonic_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t sg_monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t sg_monotonic_coarse_ms(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_MONOTONIC_COARSE, &ts) != 0)
    return sg_monotonic_ms();
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
  if (s->req_replay != NULL)
    evbuffer_free(s->req_replay);
  sg_memcache_free_str(s->identity); /* all three from sg_memcache_strdup */
  sg_memcache_free_str(s->identity_provider);
  sg_memcache_free_str(s->xfcc);
  free(s->upstream_authorization);
  if (s->scanner != NULL)
    sg_sparkmsg_free(s->scanner);
  if (s->claims != NULL)
    json_decref(s->claims);
  sg_generation *gen = s->gen;
  if (gen->metrics != NULL)
    sg_metrics_stream_closed(gen->metrics);
  sg_memcache_free_sized(s, sizeof *s);
  sg_generation_release(gen);
}

static bool upstream_leg_done(const sg_stream *s) {
  return s->up_state == SG_UPSTREAM_LEG_NONE ||
         s->up_state == SG_UPSTREAM_LEG_DONE;
}

static void maybe_free(sg_stream *s) {
  if (s->client_done && upstream_leg_done(s))
    stream_free(s);
}

static const sg_header *request_path(const sg_stream *s) {
  return s->req_indexed ? s->req.path : HEADER_FIND(&s->req_headers, ":path");
}

const char *sg_stream_path(const sg_stream *s, char *buf, size_t buflen) {
  const sg_header *h = request_path(s);
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

/* Request bytes are credited back to the client once what waits for the
 * upstream is below this mark. The scanner may hold bytes back or rewrite
 * them to another length, so credit follows what was received, and the
 * mark bounds what is buffered: one stream window plus this. */
#define SG_STREAM_REQUEST_HIGH_WATER (64 * 1024)

static void credit_client(sg_stream *s, bool all) {
  if (s->req_unacked == 0)
    return;
  if (!all && evbuffer_get_length(s->req_body) >= SG_STREAM_REQUEST_HIGH_WATER)
    return;
  client_consume(s, s->req_unacked);
  s->req_unacked = 0;
}

/* The response is complete while the client is still sending: tell it to
 * stop (RST_STREAM NO_ERROR, RFC 9113 8.1), or the half-open stream would
 * keep the connection busy for nothing. */
static void end_request_early(sg_stream *s) {
  /* Only marked here: conn.c sends the reset once the frame that ends the
   * response has gone out, or the reset could overtake it. */
  if (!s->req_eof)
    s->early_reset = true;
}

void sg_stream_end_request_early(sg_stream *s) { end_request_early(s); }

/* Drops what waits for the upstream and credits it all back. */
static void discard_request_body(sg_stream *s) {
  evbuffer_drain(s->req_body, evbuffer_get_length(s->req_body));
  credit_client(s, true);
}

/* Response bytes are parsed as gRPC messages (5-byte prefix, then the
 * payload) only far enough to know where each one ends. */
static void track_response_messages(sg_stream *s, const uint8_t *data, size_t len) {
  uint64_t at = s->resp_in_bytes;
  s->resp_in_bytes += len;
  while (len > 0) {
    if (s->resp_prefix_have < 5) {
      s->resp_prefix[s->resp_prefix_have++] = *data;
      data++;
      len--;
      at++;
      if (s->resp_prefix_have == 5) {
        s->resp_msg_left = (uint32_t)s->resp_prefix[1] << 24 |
                           (uint32_t)s->resp_prefix[2] << 16 |
                           (uint32_t)s->resp_prefix[3] << 8 | s->resp_prefix[4];
        if (s->resp_msg_left == 0) {
          s->resp_prefix_have = 0;
          s->resp_boundary = at;
        }
      }
      continue;
    }
    size_t take = len < s->resp_msg_left ? len : s->resp_msg_left;
    s->resp_msg_left -= (uint32_t)take;
    data += take;
    len -= take;
    at += take;
    if (s->resp_msg_left == 0) {
      s->resp_prefix_have = 0;
      s->resp_boundary = at;
    }
  }
}

/* The response has started: if what the client got so far ends at or
 * before a message boundary, drop what follows that boundary and end the
 * call there with |code| in trailers. Returns false when the client is
 * mid-message (only a reset can end the stream then). */
static bool end_with_late_status(sg_stream *s, sg_grpc_status code, const char *message) {
  if (!s->resp_streaming || s->resp_eof || s->late_status)
    return false;
  if (s->resp_boundary < s->bytes_out)
    return false;
  size_t held = evbuffer_get_length(s->resp_body);
  size_t keep = (size_t)(s->resp_boundary - s->bytes_out);
  if (keep > held)
    return false;
  /* A client that gives no window for the rest of the message would hold
   * the stream open for ever. */
  if (keep > 0 &&
      nghttp2_session_get_stream_remote_window_size(s->conn->session, s->id) < (int32_t)keep)
    return false;
  if (keep < held) {
    struct evbuffer *kept = evbuffer_new();
    if (kept == NULL || evbuffer_remove_buffer(s->resp_body, kept, keep) != (int)keep) {
      if (kept != NULL)
        evbuffer_free(kept);
      return false;
    }
    evbuffer_free(s->resp_body);
    s->resp_body = kept;
    /* The dropped bytes were counted against the backend's windows. */
    sg_upstream_consumed(s, held - keep);
  }
  s->late_status = true;
  s->late_code = code;
  snprintf(s->late_message, sizeof s->late_message, "%s", message);
  s->resp_eof = true;
  s->last_activity_ms = sg_monotonic_coarse_ms(); /* stuck again: reset (check_idle) */
  nghttp2_session_resume_data(s->conn->session, s->id);
  return true;
}

void sg_stream_reject(sg_stream *s, sg_grpc_status code, const char *message,
                        const char *why) {
  char pathbuf[256];
  s->rejected = true;
  if (s->reason[0] == '\0') {
    s->grpc_status = (int)code;
    snprintf(s->reason, sizeof s->reason, "%s", why != NULL ? why : message);
  }
  if (s->conn != NULL) {
    sg_info("conn=%llu stream=%d peer=%s path=%s: grpc-status %d: %s%s%s",
            (unsigned long long)s->conn_id, s->id, s->conn->peer,
            sg_stream_path(s, pathbuf, sizeof pathbuf), (int)code, message,
            why != NULL ? ": " : "", why != NULL ? why : "");
    if (!s->resp_started) {
      s->resp_started = true;
      s->resp_eof = true;
      sg_grpc_submit_error(s->conn->session, s->id, code, message);
      end_request_early(s);
    } else if (!end_with_late_status(s, code, message)) {
      /* In the middle of a response message: no status can follow it. */
      sg_info("conn=%llu stream=%d: the response is in the middle of a "
              "message: stream reset (INTERNAL_ERROR) instead",
              (unsigned long long)s->conn_id, s->id);
      s->grpc_status = -1; /* the client gets none (access log: null) */
      nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                                NGHTTP2_INTERNAL_ERROR);
    }
    /* What the client already sent will never be forwarded. */
    discard_request_body(s);
    sg_conn_schedule_send(s->conn);
  }
  if (s->up_state == SG_UPSTREAM_LEG_PENDING ||
      s->up_state == SG_UPSTREAM_LEG_OPEN)
    sg_upstream_cancel(s);
}

void sg_stream_fail(sg_stream *s, sg_grpc_status code, const char *message) {
  sg_stream_reject(s, code, message, NULL);
}

void sg_stream_reject_http(sg_stream *s, int status, const char *why) {
  char pathbuf[256];
  s->rejected = true;
  snprintf(s->reason, sizeof s->reason, "HTTP %d: %s", status, why);
  s->resp_started = true;
  s->resp_eof = true;
  sg_info("conn=%llu stream=%d peer=%s path=%s: HTTP %d: %s",
          (unsigned long long)s->conn_id, s->id, s->conn->peer,
          sg_stream_path(s, pathbuf, sizeof pathbuf), status, why);
  sg_http_submit_status(s->conn->session, s->id, status);
  end_request_early(s);
}


/* Names the tenant and the backend, but never an internal address: a
 * backend without a configured name is called by its position. */
void sg_stream_backend_unavailable_message(const sg_route_tenant *t,
                                           const sg_backend_config *b,
                                           char *out, size_t outlen) {
  char addr[300];
  snprintf(addr, sizeof addr, "%s:%u", b->address, b->port);
  if (strcmp(addr, b->name) == 0)
    snprintf(out, outlen,
             "sparkgate: tenant \"%s\": backend #%zu is unavailable",
             t->name, (size_t)(b - t->backends) + 1);
  else
    snprintf(out, outlen, "sparkgate: tenant \"%s\": backend \"%s\" is unavailable",
             t->name, b->name);
}
#define backend_unavailable_message sg_stream_backend_unavailable_message

static sg_upstream_pool *pool_of(sg_stream *s, size_t backend) {
  return sg_generation_pool(s->gen, s->tenant->index, backend);
}

/* The worker's session memory refines the pick: a session already on a
 * backend drained to weight 0 stays there (it "takes no new sessions"),
 * also while that backend is down, unless the tenant fails over: its
 * state lives there, as for any session whose backend is down. A session
 * that lands elsewhere than last time is counted. */
static int remember_session(sg_stream *s, const char *user_id,
                            const char *session_id, const bool *up, int rv,
                            size_t *backend) {
  const sg_route_tenant *t = s->tenant;
  sg_affinity *mem = s->gen->worker->affinity;
  uint64_t now = sg_monotonic_coarse_ms(); /* for a TTL of minutes */
  const char *user = user_id != NULL ? user_id : "";
  uint64_t key = s->conn != NULL
                     ? sg_affinity_key_memo(&s->conn->affinity_memo, t->name, user, session_id)
                     : sg_affinity_key(t->name, user, session_id);
  uint64_t last = sg_affinity_get(mem, key, now);
  uint64_t picked = t->backends[*backend].affinity_id;
  if (last != 0 && last != picked) {
    for (size_t b = 0; b < t->n_backends; b++) {
      if (t->backends[b].affinity_id != last)
        continue;
      if (t->backends[b].weight == 0 && (up[b] || !t->failover)) {
        *backend = b; /* draining: keeps its sessions */
        picked = last;
        rv = up[b] ? SG_ROUTE_PICK_OK : SG_ROUTE_PICK_DOWN;
      }
      break;
    }
    /* Only a call that goes somewhere moves its session: one answered 14
     * leaves the memory as it was. */
    if (picked != last && rv == SG_ROUTE_PICK_OK) {
      sg_debug("conn=%llu stream=%d: session %s of tenant %s re-homed to backend %s",
               (unsigned long long)s->conn_id, s->id, session_id, t->name,
               t->backends[*backend].name);
      if (s->gen->metrics != NULL)
        sg_metrics_session_rehomed(s->gen->metrics, t->index);
    }
  }
  if (rv == SG_ROUTE_PICK_OK)
    sg_affinity_put(mem, key, picked, now);
  return rv;
}

/* Chooses the session's backend (rendezvous hashing of tenant, user and
 * session, so every replica agrees) and starts the upstream leg. */
static void attach_upstream(sg_stream *s, const char *user_id,
                            const char *session_id) {
  const sg_route_tenant *t = s->tenant;
  bool up_small[32] = {false};
  bool *up = t->n_backends <= 32 ? up_small : malloc(t->n_backends * sizeof *up);
  if (up == NULL) {
    sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
    return;
  }
  for (size_t b = 0; b < t->n_backends; b++)
    up[b] = sg_upstream_pool_is_up(pool_of(s, b));
  size_t backend = 0;
  int rv = sg_route_pick_backend(t, user_id, session_id, up, &backend);
  /* Also with a single backend: a reload that adds a second one and
   * drains the first (weight 0) must find where its sessions are. */
  if (session_id != NULL && rv != SG_ROUTE_PICK_NONE)
    rv = remember_session(s, user_id, session_id, up, rv, &backend);
  if (up != up_small)
    free(up);
  char msg[160];
  if (rv == SG_ROUTE_PICK_NONE) {
    snprintf(msg, sizeof msg,
             "sparkgate: tenant \"%s\": no backend takes new sessions", t->name);
    sg_stream_reject(s, SG_GRPC_UNAVAILABLE, msg, "every backend has weight 0");
    return;
  }
  s->backend = &t->backends[backend];
  s->backend_name = t->backends[backend].name;
  if (rv == SG_ROUTE_PICK_DOWN) {
    /* The session's state lives on that server: moving it would lose it,
     * and PySpark retries 14 with backoff. */
    backend_unavailable_message(t, &t->backends[backend], msg, sizeof msg);
    char why[160];
    snprintf(why, sizeof why, "backend %s is down (failover %s)", s->backend_name,
             t->failover ? "found no backend up" : "off");
    sg_stream_reject(s, SG_GRPC_UNAVAILABLE, msg, why);
    return;
  }
  sg_upstream_attach(pool_of(s, backend), s);
}

static void start_spark_call(sg_stream *s) {
  const sg_route_tenant *t = s->tenant;
  sg_sparkmsg_options opts = {
      .user_mode = t->user_id == SG_ROUTE_USER_ID_REWRITE   ? SG_SPARKMSG_USER_REWRITE
                   : t->user_id == SG_ROUTE_USER_ID_ENFORCE ? SG_SPARKMSG_USER_ENFORCE
                                                            : SG_SPARKMSG_USER_OFF,
      .identity = s->identity,
      .user_name_mode = SG_SPARKMSG_USER_NAME_IDENTITY,
      .max_message_bytes = t->limits.max_message_bytes,
  };
  char err[128];
  s->scanner = sg_sparkmsg_new(&opts, err, sizeof err);
  if (s->scanner == NULL)
    sg_stream_reject(s, SG_GRPC_INTERNAL, "sparkgate: internal error", err);
  /* The upstream leg starts once the first message names its session. */
}

void sg_stream_on_request_headers(sg_stream *s) {
  /* Answered already: the stream idle timeout can answer a request whose
   * header block is still arriving (CONTINUATION frames that come late). */
  if (s->rejected)
    return;
  if (!sg_admit(s))
    return;
  if (s->tenant->credential != NULL &&
      asprintf(&s->upstream_authorization, "Bearer %.*s",
               (int)s->tenant->credential_len, s->tenant->credential) < 0) {
    s->upstream_authorization = NULL;
    sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
    return;
  }
  if (s->spark_call)
    start_spark_call(s);
  else
    attach_upstream(s, s->identity, NULL);
}

/* The call's Spark session, for its log line: known once the scanner
 * read it, whether the call then goes upstream or is refused. */
static void note_session_id(sg_stream *s) {
  const char *sid = s->scanner != NULL ? sg_sparkmsg_session_id(s->scanner) : NULL;
  if (sid == NULL || s->session_id[0] != '\0')
    return;
  size_t n = strnlen(sid, sizeof s->session_id - 1);
  memcpy(s->session_id, sid, n);
  s->session_id[n] = '\0';
}

/* A message the scanner refuses may come after the backend call started
 * (a later message of a stream): refusing it cancels that call, so it
 * costs the connection's abuse budget like any malformed request. */
static void reject_scan(sg_stream *s, sg_sparkmsg_reason r) {
  note_session_id(s);
  if (r != SG_SPARKMSG_INTERNAL && s->conn != NULL)
    sg_conn_charge(s->conn, 5, "malformed requests");
  sg_stream_reject(s, (sg_grpc_status)sg_sparkmsg_reason_grpc_status(r),
                   r == SG_SPARKMSG_USER_ID_MISMATCH
                       ? "sparkgate: user_id does not match the authenticated identity"
                       : "sparkgate: invalid Spark Connect request message",
                   sg_sparkmsg_error(s->scanner));
}

void sg_stream_on_request_data(sg_stream *s, const uint8_t *data, size_t len) {
  s->bytes_in += len; /* received, also when it goes nowhere */
  if (s->rejected || s->up_state == SG_UPSTREAM_LEG_DONE ||
      (s->up_state == SG_UPSTREAM_LEG_NONE && s->scanner == NULL)) {
    client_consume(s, len);
    return;
  }
  s->req_unacked += len;
  s->last_activity_ms = sg_monotonic_coarse_ms();
  /* The calls that carry data: AddArtifacts uploads, and plans with local
   * data (createDataFrame sends its rows inside ExecutePlan, AnalyzePlan
   * asks for their schema). Control calls stay free, so that a tenant
   * over its quota can still interrupt and release. */
  if ((s->method == SG_SPARK_ADD_ARTIFACTS || s->method == SG_SPARK_EXECUTE_PLAN ||
       s->method == SG_SPARK_ANALYZE_PLAN) &&
      s->tenant_state != NULL &&
      !sg_tenant_state_take_upload(s->tenant_state, len, s->last_activity_ms)) {
    char why[192];
    sg_tenant_limit_reason(s->tenant, "upload_bytes_per_minute", why, sizeof why);
    sg_stream_reject(s, (sg_grpc_status)s->tenant->limits.over_limit_status,
                     "sparkgate: tenant over its upload quota, retry later", why);
    return;
  }
  if (s->scanner != NULL) {
    sg_sparkmsg_reason r = sg_sparkmsg_feed(s->scanner, data, len,
                                            sg_sparkmsg_output_evbuffer, s->req_body);
    if (r != SG_SPARKMSG_OK) {
      reject_scan(s, r);
      return;
    }
    sg_sparkmsg_header h;
    if (s->up_state == SG_UPSTREAM_LEG_NONE && sg_sparkmsg_header_known(s->scanner, &h)) {
      /* In rewrite and enforce modes the session belongs to the
       * authenticated identity, whatever the client wrote. */
      note_session_id(s);
      const char *user = s->tenant->user_id == SG_ROUTE_USER_ID_OFF
                             ? (h.user_id_present ? h.user_id : "")
                             : s->identity;
      attach_upstream(s, user, h.session_id);
      if (s->rejected)
        return;
    }
  } else if (evbuffer_add(s->req_body, data, len) != 0) {
    sg_stream_fail(s, SG_GRPC_RESOURCE_EXHAUSTED, "sparkgate: out of memory");
    return;
  }
  credit_client(s, false);
  sg_upstream_resume_request(s);
}

void sg_stream_on_request_end(sg_stream *s) {
  s->req_eof = true;
  if (s->rejected)
    return;
  if (HEADER_FIND(&s->req_trailers, "authorization") != NULL) {
    /* Credentials count only in the request headers, where they were
     * checked before anything went upstream. */
    sg_stream_reject(s, SG_GRPC_UNAUTHENTICATED,
                     "sparkgate: authentication required or failed",
                     "authorization in request trailers");
    return;
  }
  if (s->scanner != NULL) {
    sg_sparkmsg_reason r = sg_sparkmsg_finish(s->scanner);
    if (r != SG_SPARKMSG_OK) {
      reject_scan(s, r);
      return;
    }
    if (s->up_state == SG_UPSTREAM_LEG_NONE) {
      sg_stream_reject(s, SG_GRPC_INVALID_ARGUMENT,
                       "sparkgate: invalid Spark Connect request message",
                       "the request ended without a complete message");
      return;
    }
    /* Everything it approved is in req_body, and nothing more can come:
     * its 7 KiB go back now, not when the response ends, so that calls
     * waiting on their backend do not hold one each. */
    sg_sparkmsg_free(s->scanner);
    s->scanner = NULL;
  }
  if (s->up_state == SG_UPSTREAM_LEG_OPEN || s->up_state == SG_UPSTREAM_LEG_PENDING)
    sg_upstream_resume_request(s);
}

void sg_stream_request_bytes_sent(sg_stream *s) {
  /* The backend's connection has taken them: the client may send more. */
  credit_client(s, false);
}

/* A unary Spark call's request is a few hundred bytes; an upload bigger
 * than this is not worth holding on to for a retry that rarely happens. */
#define SG_STREAM_REPLAY_MAX_BYTES (64 * 1024)

static void replay_stop(sg_stream *s) {
  s->replay_off = true;
  if (s->req_replay != NULL) {
    evbuffer_free(s->req_replay);
    s->req_replay = NULL;
  }
}

struct evbuffer *sg_stream_replay_buffer(sg_stream *s, size_t length) {
  if (s->replay_off)
    return NULL;
  if (s->req_replay == NULL) {
    s->req_replay = evbuffer_new();
    if (s->req_replay == NULL) {
      replay_stop(s);
      return NULL;
    }
  }
  if (evbuffer_get_length(s->req_replay) + length > SG_STREAM_REPLAY_MAX_BYTES) {
    replay_stop(s);
    return NULL;
  }
  return s->req_replay;
}

bool sg_stream_prepare_retry(sg_stream *s) {
  if (s->replay_off || s->conn == NULL || s->rejected || s->resp_started ||
      s->resp_headers.count > 0)
    return false;
  if (s->req_replay != NULL &&
      evbuffer_prepend_buffer(s->req_body, s->req_replay) != 0)
    return false;
  replay_stop(s); /* once only */
  return true;
}

void sg_stream_check_idle(sg_stream *s, uint64_t now_ms) {
  uint32_t limit = s->rt->config->stream_idle_timeout_ms;
  if (now_ms - s->last_activity_ms < limit)
    return;
  if ((s->late_status || (s->resp_eof && s->resp_started && !s->rejected)) &&
      s->conn != NULL) {
    /* The response is complete here, and the client has taken none of
     * what is left for that long: it gives no window for it. Nothing
     * else would end the call (no bytes wait in the socket for the write
     * timeout, and the backend is done). */
    if (s->idle_reset)
      return;
    s->idle_reset = true;
    size_t left = evbuffer_get_length(s->resp_body);
    sg_info("conn=%llu stream=%d: reset: the last %zu bytes of the response "
            "found no flow-control window from the client for %u ms",
            (unsigned long long)s->conn_id, s->id, left, limit);
    snprintf(s->reason, sizeof s->reason,
             "client gave no window for the rest of the response for %u ms", limit);
    nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                              NGHTTP2_INTERNAL_ERROR);
    sg_conn_schedule_send(s->conn);
    return;
  }
  if (s->rejected || s->resp_eof)
    return;
  char why[96];
  snprintf(why, sizeof why, "no bytes either way for %u ms", limit);
  sg_stream_reject(s, SG_GRPC_DEADLINE_EXCEEDED, "sparkgate: the call was idle too long",
                   why);
}

/* One access-log line and one metrics observation per call, when its
 * client leg ends. */
static void report_call(sg_stream *s, const sg_conn *c, uint32_t error_code) {
  if (s->grpc_status < 0 && error_code == NGHTTP2_CANCEL)
    s->grpc_status = SG_GRPC_CANCELLED;
  uint64_t now_us = sg_worker_now_us(s->gen->worker);
  double ms = now_us > s->started_us ? (double)(now_us - s->started_us) / 1000.0 : 0.0;
  const sg_header *path = request_path(s);
  nghttp2_vec p = path != NULL ? header_value(path) : (nghttp2_vec){(uint8_t *)"", 0};
  if (s->gen->metrics != NULL)
    sg_metrics_rpc_done(s->gen->metrics,
                        s->tenant != NULL ? s->tenant->index : SG_METRICS_TENANT_NONE,
                        sg_metrics_method_from_path((const char *)p.base, p.len),
                        s->grpc_status, ms / 1000.0, s->bytes_in, s->bytes_out);
  if (!s->rt->config->access_log.enabled)
    return;
  char pathbuf[SG_ACCESSLOG_MAX_FIELD_BYTES + 1]; /* the log cuts it there */
  snprintf(pathbuf, sizeof pathbuf, "%.*s",
           (int)(p.len < SG_ACCESSLOG_MAX_FIELD_BYTES ? p.len : SG_ACCESSLOG_MAX_FIELD_BYTES),
           p.base);
  sg_access_record r = {
      .conn_id = s->conn_id,
      .stream_id = s->id,
      .client = c != NULL ? c->peer : NULL,
      .identity = s->identity,
      .tenant = s->tenant_name,
      .method = pathbuf,
      .session_id = s->session_id[0] != '\0' ? s->session_id : NULL,
      .backend = s->backend_name,
      .grpc_status = s->grpc_status,
      .bytes_in = s->bytes_in,
      .bytes_out = s->bytes_out,
      .duration_ms = ms,
      .reason = s->reason[0] != '\0' ? s->reason : NULL,
  };
  sg_accesslog_write(&r);
}

void sg_stream_on_client_close(sg_stream *s, uint32_t error_code) {
  sg_conn *c = s->conn;
  /* Every call the client made and the proxy answered or reset, also
   * one whose header block never completed (over the size cap, or cut
   * short and answered at the stream idle timeout). */
  if (c != NULL && (s->req_headers_done || s->rejected || s->header_overflow))
    report_call(s, c, error_code);
  if (c != NULL) {
    /* Bytes received and not yet credited still count against the
     * client's connection window. */
    if (s->req_unacked > 0 && !c->freeing)
      nghttp2_session_consume_connection(c->session, s->req_unacked);
    s->req_unacked = 0;
    evbuffer_drain(s->req_body, evbuffer_get_length(s->req_body));
    sg_list_unlink(&s->conn_link);
    c->n_streams--;
  }
  sg_stream_set_up_window(s, 0); /* the budget is the connection's */
  s->conn = NULL;
  s->client_done = true;
  if (s->tenant_state != NULL) {
    sg_tenant_state_release(s->tenant_state, s->method);
    s->tenant_state = NULL;
  }
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

/* content-length goes too: HTTP/2 frames the body anyway, and a call the
 * proxy ends early (late trailers) would contradict it. */
static bool response_header_forwarded(const uint8_t *name, size_t len) {
  return !sg_header_is_hop_by_hop(name, len) && !SG_HEADER_IS(name, len, "te") &&
         !SG_HEADER_IS(name, len, "content-length");
}

/* Header fields go to nghttp2 uncopied (NO_COPY_NAME | NO_COPY_VALUE):
 * copying and lowercasing them again was a twentieth of a unary call. What
 * they point at lives until stream_free: the stream's header lists keep
 * their buffers to the end, and its own strings and its configuration
 * (s->rt) stay with it. The stream outlives every frame that reads them,
 * since it goes only once both legs' streams are closed in nghttp2 (or
 * their sessions deleted), and nghttp2 packs no frame of a closed stream.
 * Names are lowercase: nghttp2 refuses others from either peer, and the
 * configuration's identity header names are checked so. */
#define SG_NV_BORROWED (NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE)

/* |own| non-NULL: the list goes upstream (request trailers), so identity
 * claims and credentials are dropped as from request headers. */
static size_t build_nv(const sg_header_list *list, nghttp2_nv *nva,
                       const sg_identity_header_names *own) {
  size_t n = 0;
  for (size_t i = 0; i < list->count; i++) {
    nghttp2_vec name = nghttp2_rcbuf_get_buf(list->items[i].name);
    nghttp2_vec value = nghttp2_rcbuf_get_buf(list->items[i].value);
    if (!response_header_forwarded(name.base, name.len))
      continue;
    if (own != NULL &&
        (SG_HEADER_IS(name.base, name.len, "authorization") ||
         sg_identity_header_classify(name.base, name.len, own) != SG_IDENTITY_HEADER_PASS))
      continue;
    nva[n].name = name.base;
    nva[n].namelen = name.len;
    nva[n].value = value.base;
    nva[n].valuelen = value.len;
    nva[n].flags = SG_NV_BORROWED;
    n++;
  }
  return n;
}

static void record_grpc_status(sg_stream *s, const sg_header_list *list) {
  const sg_header *st = HEADER_FIND(list, "grpc-status");
  if (st == NULL)
    return;
  nghttp2_vec v = header_value(st);
  /* Empty, or longer than any code: the client sees UNKNOWN, so the call
   * stays without a status (null in the log, 2 in the metrics), not 0 or
   * the first digits of it. */
  if (v.len == 0 || v.len > 3)
    return;
  int code = 0;
  for (size_t i = 0; i < v.len; i++) {
    if (v.base[i] < '0' || v.base[i] > '9')
      return;
    code = code * 10 + (v.base[i] - '0');
  }
  s->grpc_status = code;
}

void sg_stream_on_response_headers(sg_stream *s, bool end_stream) {
  replay_stop(s); /* the backend took the call: never send it twice */
  const sg_header *status = HEADER_FIND(&s->resp_headers, ":status");
  nghttp2_vec st = status != NULL ? header_value(status) : (nghttp2_vec){NULL, 0};
  if (st.len == 3 && st.base[0] == '1') {
    /* An interim response: gRPC has no use for it; wait for the final one. */
    sg_header_list_clear(&s->resp_headers);
    return;
  }
  s->resp_final = true;
  if (s->conn == NULL || s->rejected)
    return;
  nghttp2_nv stack_nv[SG_NV_STACK];
  nghttp2_nv *nva = sg_nv_array(stack_nv, s->resp_headers.count + 1);
  if (nva == NULL) {
    sg_stream_fail(s, SG_GRPC_INTERNAL, "sparkgate: out of memory");
    return;
  }
  size_t n = build_nv(&s->resp_headers, nva, NULL);
  nghttp2_data_provider prd = {.source = {.ptr = s},
                               .read_callback = sg_stream_read_response_body};
  s->resp_started = true;
  s->resp_streaming = !end_stream;
  if (end_stream) {
    s->resp_eof = true;
    record_grpc_status(s, &s->resp_headers);
    end_request_early(s); /* a client still sending holds its slots otherwise */
  }
  /* A trailers-only response stays trailers-only: one HEADERS frame with
   * END_STREAM, as gRPC clients expect for immediate errors. */
  int rv = nghttp2_submit_response(s->conn->session, s->id, nva, n,
                                   end_stream ? NULL : &prd);
  sg_nv_array_free(stack_nv, nva);
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
  track_response_messages(s, data, len);
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

void sg_stream_set_up_window(sg_stream *s, uint32_t window) {
  if (s->conn != NULL) {
    s->conn->resp_granted -= s->up_window;
    s->conn->resp_granted += window;
  }
  s->up_window = window;
}

bool sg_stream_up_window_fits(const sg_stream *s, uint32_t window, uint32_t budget) {
  return s->conn != NULL && s->conn->resp_granted - s->up_window + window <= budget;
}

void sg_stream_on_upstream_close(sg_stream *s, uint32_t error_code,
                                 const char *reason) {
  bool was_open = s->up_state == SG_UPSTREAM_LEG_OPEN ||
                  s->up_state == SG_UPSTREAM_LEG_PENDING;
  sg_stream_set_up_window(s, 0);
  s->up_state = SG_UPSTREAM_LEG_DONE;
  s->up = NULL;
  sg_list_unlink(&s->up_link);
  /* Response bytes still held here were credited to the backend
   * connection's window by upstream.c before calling us. */
  if (was_open && s->conn != NULL && !s->rejected) {
    if (!s->resp_eof) {
      if (!s->resp_started) {
        char msg[256], why[256];
        /* 14 for a backend that is failing (clients retry it); not for a
         * call the backend cancelled (gRPC: CANCEL is CANCELLED), nor for
         * one we could not send, which would fail the same way again. */
        sg_grpc_status code = SG_GRPC_UNAVAILABLE;
        if (s->up_headers_unsent) {
          code = SG_GRPC_INTERNAL;
          snprintf(msg, sizeof msg,
                   "sparkgate: the request's headers are too large to forward");
        } else if (error_code == NGHTTP2_CANCEL) {
          code = SG_GRPC_CANCELLED;
          snprintf(msg, sizeof msg, "sparkgate: the backend cancelled the call");
        } else if (s->tenant != NULL && s->backend != NULL) {
          backend_unavailable_message(s->tenant, s->backend, msg, sizeof msg);
        } else {
          snprintf(msg, sizeof msg, "sparkgate: backend unavailable");
        }
        snprintf(why, sizeof why, "backend %s: %s",
                 s->backend_name != NULL ? s->backend_name : "?",
                 reason != NULL ? reason : nghttp2_http2_strerror(error_code));
        sg_stream_reject(s, code, msg, why);
      } else {
        sg_info("conn=%llu stream=%d: upstream %s reset the stream after the "
                "response started (%s): resetting the client stream",
                (unsigned long long)s->conn_id, s->id,
                s->backend_name != NULL ? s->backend_name : "?",
                reason != NULL ? reason : nghttp2_http2_strerror(error_code));
        s->rejected = true;
        snprintf(s->reason, sizeof s->reason,
                 "backend %s reset the stream after the response started: %s",
                 s->backend_name != NULL ? s->backend_name : "?",
                 reason != NULL ? reason : nghttp2_http2_strerror(error_code));
        nghttp2_submit_rst_stream(s->conn->session, NGHTTP2_FLAG_NONE, s->id,
                                  error_code == NGHTTP2_CANCEL
                                      ? NGHTTP2_CANCEL
                                      : NGHTTP2_INTERNAL_ERROR);
        sg_conn_schedule_send(s->conn);
      }
    } else {
      /* The backend answered in full before taking the whole request:
       * what the client still sends goes nowhere. */
      discard_request_body(s);
    }
  }
  maybe_free(s);
}

/* ---- data providers ----------------------------------------------------- */

size_t sg_stream_request_nv(sg_stream *s, bool upstream_tls, nghttp2_nv *nva) {
  const sg_identity_header_names *own = &s->rt->config->identity_headers;
  size_t n = 0;
  const sg_header *authority = s->req.authority;
  const sg_header *host = s->req.host;
#define ADD_NV(nm, nmlen, val, vallen)                                         \
  do {                                                                         \
    nva[n].name = (uint8_t *)(nm);                                             \
    nva[n].namelen = (nmlen);                                                  \
    nva[n].value = (uint8_t *)(val);                                           \
    nva[n].valuelen = (vallen);                                                \
    nva[n].flags = SG_NV_BORROWED;                                             \
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
  const sg_header *path = s->req.path;
  if (path != NULL) { /* always: admission checked it */
    nghttp2_vec p = header_value(path);
    ADD_NV(":path", 5, p.base, p.len);
  }
  for (size_t i = 0; i < s->req_headers.count; i++) {
    nghttp2_vec name = nghttp2_rcbuf_get_buf(s->req_headers.items[i].name);
    nghttp2_vec value = nghttp2_rcbuf_get_buf(s->req_headers.items[i].value);
    if (name.len > 0 && name.base[0] == ':')
      continue;
    /* content-length is dropped: the user_id rewrite may change the body's
     * length, and HTTP/2 frames the body anyway. */
    if (sg_header_is_hop_by_hop(name.base, name.len) ||
        SG_HEADER_IS(name.base, name.len, "content-length") ||
        SG_HEADER_IS(name.base, name.len, "authorization") ||
        (s->req_headers.items[i].identity_action == SG_HEADER_UNCLASSIFIED
             ? sg_identity_header_classify(name.base, name.len, own)
             : s->req_headers.items[i].identity_action) != SG_IDENTITY_HEADER_PASS)
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
  if (s->upstream_authorization != NULL)
    ADD_NV("authorization", 13, s->upstream_authorization,
           strlen(s->upstream_authorization));
  if (s->xfcc != NULL)
    ADD_NV(SG_IDENTITY_HEADER_XFCC, sizeof SG_IDENTITY_HEADER_XFCC - 1, s->xfcc,
           strlen(s->xfcc));
  if (s->deadline_at_ms != 0) {
    uint64_t now = sg_monotonic_ms();
    uint64_t left = s->deadline_at_ms > now ? s->deadline_at_ms - now : 1;
    sg_grpc_timeout_format(left, s->grpc_timeout_out, sizeof s->grpc_timeout_out);
    ADD_NV("grpc-timeout", 12, s->grpc_timeout_out, strlen(s->grpc_timeout_out));
  }
#undef ADD_NV
  return n;
}

/* The request is complete: END_STREAM goes on this DATA frame, or on the
 * request trailers submitted here. */
static void end_request_body(sg_stream *s, nghttp2_session *session,
                             uint32_t *data_flags) {
  *data_flags |= NGHTTP2_DATA_FLAG_EOF;
  if (s->req_trailers.count == 0)
    return;
  nghttp2_nv stack_nv[SG_NV_STACK];
  nghttp2_nv *nva = sg_nv_array(stack_nv, s->req_trailers.count);
  if (nva == NULL)
    return;
  size_t n = build_nv(&s->req_trailers, nva, &s->rt->config->identity_headers);
  if (n > 0 && nghttp2_submit_trailer(session, s->up_id, nva, n) == 0)
    *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
  sg_nv_array_free(stack_nv, nva);
}

ssize_t sg_stream_read_request_body(nghttp2_session *session, int32_t id,
                                    uint8_t *buf, size_t length,
                                    uint32_t *data_flags,
                                    nghttp2_data_source *source, void *user) {
  (void)id;
  sg_stream *s = source->ptr;
  size_t avail = evbuffer_get_length(s->req_body);
  if (avail == 0) {
    if (!s->req_eof)
      return NGHTTP2_ERR_DEFERRED;
    end_request_body(s, session, data_flags);
    return 0;
  }
  if (sg_h2io_hold_data(user)) {
    s->req_held = true; /* upstream.c resumes it */
    return NGHTTP2_ERR_DEFERRED;
  }
  length = sg_h2io_data_max(user, length);
  size_t n = avail < length ? avail : length;
  /* The client's END_STREAM is often already here: a unary call's body
   * then goes upstream as one DATA frame, not one plus an empty one. */
  if (n == avail && s->req_eof)
    end_request_body(s, session, data_flags);
  /* send_data (upstream.c) moves the bytes without copying them. */
  *data_flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  (void)buf;
  return (ssize_t)n;
}

ssize_t sg_stream_read_response_body(nghttp2_session *session, int32_t id,
                                     uint8_t *buf, size_t length,
                                     uint32_t *data_flags,
                                     nghttp2_data_source *source, void *user) {
  (void)id;
  sg_stream *s = source->ptr;
  size_t avail = evbuffer_get_length(s->resp_body);
  if (avail == 0) {
    if (!s->resp_eof)
      return NGHTTP2_ERR_DEFERRED;
    *data_flags |= NGHTTP2_DATA_FLAG_EOF;
    end_request_early(s);
    if (s->late_status) {
      if (sg_grpc_submit_status_trailers(session, s->id, s->late_code,
                                         s->late_message) == 0)
        *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    } else if (s->resp_trailers.count > 0) {
      record_grpc_status(s, &s->resp_trailers);
      nghttp2_nv stack_nv[SG_NV_STACK];
      nghttp2_nv *nva = sg_nv_array(stack_nv, s->resp_trailers.count);
      if (nva != NULL) {
        size_t n = build_nv(&s->resp_trailers, nva, NULL);
        if (n > 0 && nghttp2_submit_trailer(session, s->id, nva, n) == 0)
          *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        sg_nv_array_free(stack_nv, nva);
      }
    }
    return 0;
  }
  if (sg_h2io_hold_data(user)) {
    s->resp_held = true; /* conn.c resumes it */
    return NGHTTP2_ERR_DEFERRED;
  }
  length = sg_h2io_data_max(user, length);
  size_t n = avail < length ? avail : length;
  /* send_data (conn.c) moves the bytes without copying them. */
  *data_flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  (void)buf;
  s->bytes_out += n;
  s->last_activity_ms = sg_monotonic_coarse_ms();
  /* The client leg has taken the bytes: the backend may send more. */
  sg_upstream_consumed(s, n);
  return (ssize_t)n;
}
