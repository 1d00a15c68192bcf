#include "sparkgate/upstream.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/bufferevent_struct.h>
#include <event2/dns.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "sparkgate/h2io.h"
#include "sparkgate/h2mem.h"
#include "sparkgate/list.h"
#include "sparkgate/log.h"
#include "sparkgate/metrics.h"
#include "sparkgate/netaddr.h"
#include "sparkgate/stream.h"
#include "sparkgate/tcpopt.h"
#include "sparkgate/tls.h"
#include "sparkgate/worker.h"

#define SG_UPSTREAM_OUTPUT_HIGH_WATER (256 * 1024)
#define SG_UPSTREAM_OUTPUT_LOW_WATER (64 * 1024)
#define SG_IO_CHUNK_BYTES (256 * 1024)
/* Streams we put on one backend connection before opening another, even
 * when the backend would take more: spreads load over a few TCP
 * connections without opening one per call. */
#define SG_UPSTREAM_STREAMS_PER_CONN 100

typedef enum sg_upstream_state {
  SG_UPSTREAM_CONNECTING,
  SG_UPSTREAM_READY,
  SG_UPSTREAM_GOAWAY, /* takes no new streams; closes when the last ends */
} sg_upstream_state;

struct sg_upstream_pool {
  sg_worker *worker;
  const sg_config *cfg;
  sg_metrics_worker *metrics; /* may be NULL */
  const sg_tenant_config *tenant;
  const sg_backend_config *backend;
  SSL_CTX *tls_ctx; /* NULL: h2c */
  sg_list conns;    /* sg_upstream.pool_link */
  size_t n_conns;
  uint64_t next_id;
  /* Passive health: a failed connect or a broken connection marks the
   * backend down; a probe connection retries it in the background with
   * exponential backoff, and a successful connect brings it back. */
  bool down;
  uint32_t backoff_ms;
  struct event *probe;
  bool said_stream_limit; /* the backend's low stream limit was logged */
};

/* Why an h2c backend connection ended before the backend's SETTINGS:
 * the commonest cause is a backend that speaks TLS, or the wrong port. */
#define SG_UPSTREAM_CLOSED_BEFORE_SETTINGS                                       \
  "the backend closed the connection before its HTTP/2 SETTINGS (a TLS "       \
  "server? give the backend \"tls\"; or not Spark Connect on that port)"

#define SG_UPSTREAM_BACKOFF_MIN_MS 500
#define SG_UPSTREAM_BACKOFF_MAX_MS 30000

struct sg_upstream {
  sg_h2io io; /* first member: the send callbacks see it as user data */
  sg_list pool_link;
  sg_upstream_pool *pool;
  uint64_t id;
  sg_upstream_state state;
  struct bufferevent *bev;
  SSL *ssl; /* owned by bev */
  nghttp2_session *session;
  sg_h2mem_session *h2mem; /* the session's view of the worker's allocator */
  struct event *send_ev;
  bool send_scheduled; /* send_ev is active */
  struct event *timer; /* connect deadline, then idle deadline */
  bool trim_pending;   /* ... whose first step is the trim (set_idle_deadline) */
  struct event *read_ev; /* h2c: reads the socket directly (see worker.h) */
  sg_list streams;     /* OPEN legs */
  sg_list pending;     /* PENDING legs, submitted once connected */
  unsigned n_streams;  /* both lists */
  bool got_settings; /* the backend spoke HTTP/2: its first SETTINGS came */
  bool freeing;
  /* Why nghttp2 ended the session itself (the GOAWAY it sent), for the
   * log line that closes it. */
  char goaway_sent[160];
  /* The stream of the header block being received (see conn.h). */
  sg_stream *hdr_stream;
  int32_t hdr_stream_id;
  /* Connecting: a host name may resolve to several addresses of the one
   * server (IPv4 and IPv6, say); each is tried in turn until one takes
   * the TCP connection, all within upstream_connect_timeout_ms. */
  struct evdns_getaddrinfo_request *resolving;
  struct evutil_addrinfo *addrs; /* evutil_freeaddrinfo */
  struct evutil_addrinfo *addr;  /* the one being tried */
  unsigned addr_index, n_addrs;
  uint64_t connect_deadline_us; /* sg_monotonic_us: the whole connect's */
  uint32_t attempt_ms;          /* the share of it the current address has */
  char addr_text[SG_NETADDR_TEXT_MAX]; /* |addr|, for the log */
  char tried[160];                     /* earlier addresses' failures */
  /* A connect that failed before a socket could report it (no address,
   * or none would take a socket): reported from the timer, so that
   * callers of upstream_new never see the connection freed under them. */
  char connect_error[300];
};

static void upstream_free(sg_upstream *up, const char *reason);
static void upstream_flush(sg_upstream *up);
static void connect_next(sg_upstream *up, const char *why);
static void attempt_failure(const sg_upstream *up, const char *why, char *out, size_t outlen);
static sg_upstream *upstream_new(sg_upstream_pool *pool, char *err, size_t errlen);
static void schedule_send(sg_upstream *up);
static void leg_closed(sg_upstream *up, sg_stream *s, uint32_t error_code,
                       const char *reason);
static bool leg_unsent(const sg_upstream *up, const sg_stream *s);
static void cancel_unsent(sg_upstream *up, sg_stream *s);
static void attach(sg_upstream_pool *pool, sg_stream *s, const sg_upstream *avoid);
static unsigned capacity(const sg_upstream *up);
static void move_over_capacity(sg_upstream *up);

static void count_connect(sg_upstream_pool *pool, bool ok) {
  if (pool->metrics != NULL)
    sg_metrics_upstream_connect(pool->metrics, pool->tenant->index,
                                (size_t)(pool->backend - pool->tenant->backends), ok);
}

static void pool_mark_down(sg_upstream_pool *pool, const char *reason) {
  if (!pool->down) {
    pool->backoff_ms = SG_UPSTREAM_BACKOFF_MIN_MS;
    sg_warn("backend %s of tenant %s is down: %s; retrying in the background",
            pool->backend->name, pool->tenant->name, reason);
  } else if (pool->backoff_ms < SG_UPSTREAM_BACKOFF_MAX_MS) {
    pool->backoff_ms *= 2;
    if (pool->backoff_ms > SG_UPSTREAM_BACKOFF_MAX_MS)
      pool->backoff_ms = SG_UPSTREAM_BACKOFF_MAX_MS;
  }
  pool->down = true;
  if (pool->probe != NULL) {
    struct timeval tv = {pool->backoff_ms / 1000,
                         (suseconds_t)(pool->backoff_ms % 1000) * 1000};
    evtimer_add(pool->probe, &tv);
  }
}

/* A connection that ended before the backend's first SETTINGS never
 * proved the backend up: counted as a failed connect, and the pool keeps
 * (or starts) probing. Without this, a probe that reached a socket which
 * closed at once (a server restarting, a balancer with no target) left a
 * pool marked down with no probe to come. */
static void connect_failed(sg_upstream *up, const char *reason) {
  count_connect(up->pool, false);
  pool_mark_down(up->pool, reason);
}

static void pool_mark_up(sg_upstream_pool *pool) {
  if (pool->down)
    sg_info("backend %s of tenant %s is up again", pool->backend->name,
            pool->tenant->name);
  pool->down = false;
  pool->backoff_ms = 0;
  if (pool->probe != NULL)
    evtimer_del(pool->probe);
}

static void on_probe(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_upstream_pool *pool = arg;
  char err[128];
  if (upstream_new(pool, err, sizeof err) == NULL)
    pool_mark_down(pool, err);
}

static void set_timer_ms(sg_upstream *up, uint32_t ms) {
  struct timeval tv = {ms / 1000, (suseconds_t)(ms % 1000) * 1000};
  evtimer_add(up->timer, &tv);
  up->trim_pending = false;
}

/* A new call's window on the backend leg: a share of its client
 * connection's budget (http2.connection_window_bytes over
 * max_concurrent_streams), so that a client that opens every stream it may
 * and takes nothing pins at most the budget. A call whose client takes its
 * data grows to stream_window_bytes while the budget allows
 * (sg_upstream_consumed). */
static uint32_t first_stream_window(const sg_config *cfg) {
  uint32_t streams = cfg->max_concurrent_streams > 0 ? cfg->max_concurrent_streams : 1;
  uint64_t w = cfg->connection_window_bytes / streams;
  if (w < 65535)
    w = 65535;
  return w < cfg->stream_window_bytes ? (uint32_t)w : cfg->stream_window_bytes;
}

static const sg_config *pool_config(const sg_upstream_pool *pool) {
  return pool->cfg;
}

/* The idle deadline, in two steps as a client connection's (conn.c): the
 * trim of the session's memory (idle_trim_ms), then the rest of
 * upstream.idle_timeout_ms.
 * A pool keeps a connection to each backend of each tenant it served for
 * that long. */
static void set_idle_deadline(sg_upstream *up) {
  const sg_config *cfg = pool_config(up->pool);
  uint32_t idle_ms = cfg->upstream_idle_timeout_ms, trim_ms = cfg->idle_trim_ms;
  bool trim = trim_ms > 0 && idle_ms > trim_ms;
  set_timer_ms(up, trim ? trim_ms : idle_ms);
  up->trim_pending = trim;
}

/* Its last stream gone: a connection that has proved itself (the
 * backend's SETTINGS came) waits for the next call until the idle
 * deadline; one that has not keeps its connect deadline, or a backend
 * that accepts and never speaks would hold the next calls for the idle
 * timeout instead of failing them at the connect timeout. */
static void idle_or_connect_deadline(sg_upstream *up) {
  if (up->got_settings)
    set_idle_deadline(up);
}

/* ---- nghttp2 client callbacks ------------------------------------------- */

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                            void *user) {
  sg_upstream *up = user;
  up->hdr_stream = NULL;
  if (frame->hd.type != NGHTTP2_HEADERS)
    return 0;
  up->hdr_stream = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
  up->hdr_stream_id = frame->hd.stream_id;
  return 0;
}

/* The stream a HEADERS frame's fields belong to, without a lookup per
 * field. */
static sg_stream *header_block_stream(sg_upstream *up, nghttp2_session *session,
                                      int32_t stream_id) {
  if (up->hdr_stream != NULL && up->hdr_stream_id == stream_id)
    return up->hdr_stream;
  return nghttp2_session_get_stream_user_data(session, stream_id);
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     nghttp2_rcbuf *name, nghttp2_rcbuf *value, uint8_t flags,
                     void *user) {
  (void)flags;
  if (frame->hd.type != NGHTTP2_HEADERS)
    return 0;
  sg_stream *s = header_block_stream(user, session, frame->hd.stream_id);
  if (s == NULL)
    return 0;
  /* After a 1xx interim response, the final response comes as a HEADERS
   * frame nghttp2 files under HCAT_HEADERS, like trailers. */
  sg_header_list *list = frame->headers.cat == NGHTTP2_HCAT_HEADERS && s->resp_final
                             ? &s->resp_trailers
                             : &s->resp_headers;
  if (sg_header_list_add(list, name, value, SG_RESPONSE_MAX_HEADER_LIST_BYTES) != 0)
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                         void *user) {
  sg_upstream *up = user;
  sg_stream *s;
  switch (frame->hd.type) {
  case NGHTTP2_HEADERS:
    s = header_block_stream(up, session, frame->hd.stream_id);
    up->hdr_stream = NULL; /* the block is complete */
    if (s == NULL)
      return 0;
    if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE || !s->resp_final)
      sg_stream_on_response_headers(s, frame->hd.flags & NGHTTP2_FLAG_END_STREAM);
    else if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
      sg_stream_on_response_end(s);
    break;
  case NGHTTP2_DATA:
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
      s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
      if (s != NULL)
        sg_stream_on_response_end(s);
    }
    break;
  case NGHTTP2_SETTINGS:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK) && !up->got_settings) {
      /* Only now is the backend known to serve: a socket that accepts and
       * never answers (a hung server, a black hole) is caught by the
       * connect deadline still running until here. */
      up->got_settings = true;
      evtimer_del(up->timer);
      count_connect(up->pool, true);
      pool_mark_up(up->pool);
      if (up->n_streams == 0)
        set_idle_deadline(up);
    }
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK) && up->state != SG_UPSTREAM_GOAWAY &&
        nghttp2_session_get_remote_settings(
            session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) == 0) {
      /* No call can start here: the ones waiting get 14 now, not at their
       * deadline; the connection takes no more and closes. */
      sg_warn("upstream %s conn=%llu: the backend allows no streams "
              "(SETTINGS_MAX_CONCURRENT_STREAMS 0): its calls get 14",
              up->pool->backend->name, (unsigned long long)up->id);
      up->state = SG_UPSTREAM_GOAWAY;
      sg_list *n = up->streams.next;
      while (n != &up->streams) {
        sg_list *next = n->next;
        sg_stream *w = SG_CONTAINER_OF(n, sg_stream, up_link);
        if (leg_unsent(up, w)) {
          cancel_unsent(up, w);
          leg_closed(up, w, NGHTTP2_REFUSED_STREAM,
                     "the backend allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)");
        }
        n = next;
      }
      schedule_send(up);
    } else if (!(frame->hd.flags & NGHTTP2_FLAG_ACK) && up->state != SG_UPSTREAM_GOAWAY) {
      unsigned room = capacity(up);
      if (room < SG_UPSTREAM_STREAMS_PER_CONN && !up->pool->said_stream_limit) {
        /* Once per pool: why this backend gets many connections. */
        up->pool->said_stream_limit = true;
        sg_info("upstream %s: the backend takes at most %u call%s per connection "
                "(SETTINGS_MAX_CONCURRENT_STREAMS): calls beyond that open "
                "more connections", up->pool->backend->name, room, room == 1 ? "" : "s");
      }
      move_over_capacity(up);
    }
    break;
  case NGHTTP2_GOAWAY:
    if (up->state != SG_UPSTREAM_GOAWAY) {
      sg_info("upstream %s conn=%llu: GOAWAY (%s, last stream %d): no new "
              "streams on this connection",
              up->pool->backend->name, (unsigned long long)up->id,
              nghttp2_http2_strerror(frame->goaway.error_code),
              frame->goaway.last_stream_id);
      up->state = SG_UPSTREAM_GOAWAY;
    }
    break;
  default:
    break;
  }
  return 0;
}

static int on_data_chunk_recv(nghttp2_session *session, uint8_t flags,
                              int32_t stream_id, const uint8_t *data,
                              size_t len, void *user) {
  (void)flags;
  (void)user;
  sg_stream *s = nghttp2_session_get_stream_user_data(session, stream_id);
  if (s == NULL) {
    nghttp2_session_consume(session, stream_id, len);
    return 0;
  }
  sg_stream_on_response_data(s, data, len);
  return 0;
}

static void leg_closed(sg_upstream *up, sg_stream *s, uint32_t error_code,
                       const char *reason) {
  /* Bytes of this stream still waiting for the client were counted against
   * the backend connection's window: credit them now, or a few slow
   * clients would starve every other stream on this connection. */
  size_t held = evbuffer_get_length(s->resp_body);
  if (held > 0 && up->session != NULL && !up->freeing)
    nghttp2_session_consume_connection(up->session, held);
  sg_list_unlink(&s->up_link);
  up->n_streams--;
  sg_stream_on_upstream_close(s, error_code, reason);
}

/* A leg whose request HEADERS nghttp2 still holds unsent (the backend's
 * stream limit): nghttp2 reports its close only once it takes the HEADERS
 * out of its queue, which may be never (a backend that allows no
 * streams): the leg, the call and the connection then stayed for good.
 * Cancelled in nghttp2 (checked before anything of the call is read) and
 * let go here. */
static bool leg_unsent(const sg_upstream *up, const sg_stream *s) {
  return up->session != NULL && nghttp2_session_find_stream(up->session, s->up_id) == NULL;
}

static void cancel_unsent(sg_upstream *up, sg_stream *s) {
  nghttp2_submit_rst_stream(up->session, NGHTTP2_FLAG_NONE, s->up_id, NGHTTP2_CANCEL);
  nghttp2_session_set_stream_user_data(up->session, s->up_id, NULL);
}

/* Calls given to this connection before its SETTINGS, beyond the streams
 * the backend takes, and not sent yet: to other connections, where they
 * need not wait for the ones before them to end. */
static void move_over_capacity(sg_upstream *up) {
  unsigned room = capacity(up);
  if (up->n_streams <= room)
    return;
  unsigned kept = 0;
  sg_list *n = up->streams.next;
  while (n != &up->streams && up->n_streams > room) {
    sg_list *next = n->next;
    sg_stream *w = SG_CONTAINER_OF(n, sg_stream, up_link);
    if (kept < room || !leg_unsent(up, w)) {
      kept++;
    } else {
      cancel_unsent(up, w);
      sg_list_unlink(&w->up_link);
      up->n_streams--;
      w->up = NULL;
      w->up_state = SG_UPSTREAM_LEG_NONE;
      sg_stream_set_up_window(w, 0);
      attach(up->pool, w, up);
    }
    n = next;
  }
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id,
                           uint32_t error_code, void *user) {
  sg_upstream *up = user;
  if (up->hdr_stream_id == stream_id)
    up->hdr_stream = NULL;
  sg_stream *s = nghttp2_session_get_stream_user_data(session, stream_id);
  if (s == NULL || up->freeing)
    return 0;
  nghttp2_session_set_stream_user_data(session, stream_id, NULL);
  if (s->up_headers_unsent) {
    leg_closed(up, s, NGHTTP2_INTERNAL_ERROR, "the request headers could not be sent");
  } else if (error_code == NGHTTP2_REFUSED_STREAM && sg_stream_prepare_retry(s)) {
    /* RFC 9113 8.7: a refused stream, or one above the last stream id of
     * a GOAWAY, was not processed: sending it again cannot run it twice. */
    sg_list_unlink(&s->up_link);
    up->n_streams--;
    s->up = NULL;
    s->up_state = SG_UPSTREAM_LEG_NONE;
    sg_stream_set_up_window(s, 0);
    sg_info("conn=%llu stream=%d: backend %s did not process the call (%s): "
            "sending it once more on another connection",
            (unsigned long long)s->conn_id, s->id, up->pool->backend->name,
            up->state == SG_UPSTREAM_GOAWAY ? "GOAWAY" : "REFUSED_STREAM");
    if (up->pool->metrics != NULL)
      sg_metrics_upstream_retry(up->pool->metrics, up->pool->tenant->index);
    attach(up->pool, s, up);
  } else {
    const char *reason = NULL;
    if (error_code == NGHTTP2_REFUSED_STREAM)
      reason = "the backend refused the stream";
    else if (error_code != NGHTTP2_NO_ERROR)
      reason = nghttp2_http2_strerror(error_code);
    leg_closed(up, s, error_code, reason);
  }
  if (up->n_streams == 0) {
    if (up->state == SG_UPSTREAM_GOAWAY)
      schedule_send(up); /* flush, then close */
    else
      idle_or_connect_deadline(up);
  }
  return 0;
}

/* A GOAWAY with an error is nghttp2 ending the session for something the
 * backend sent: e.g. COMPRESSION_ERROR for a header field over 64 KiB
 * (nghttp2's HPACK limit), which ends every call on the connection. */
static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame,
                         void *user) {
  (void)session;
  sg_upstream *up = user;
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR)
    snprintf(up->goaway_sent, sizeof up->goaway_sent,
             "the backend's frames broke HTTP/2 (sent GOAWAY %s%s)",
             nghttp2_http2_strerror(frame->goaway.error_code),
             frame->goaway.error_code == NGHTTP2_COMPRESSION_ERROR
                 ? ": a header field over 64 KiB, or a corrupt header block"
                 : "");
  return 0;
}

/* Request HEADERS nghttp2 could not pack (over the block limit): nghttp2
 * then closes the stream as REFUSED_STREAM, which must not be taken for
 * the backend's refusal. */
static int on_frame_not_send(nghttp2_session *session, const nghttp2_frame *frame,
                             int lib_error_code, void *user) {
  sg_upstream *up = user;
  /* Only a block nghttp2 cannot pack. HEADERS that a GOAWAY or the
   * session's end kept from going are refused streams, retried. */
  if (frame->hd.type != NGHTTP2_HEADERS ||
      (lib_error_code != NGHTTP2_ERR_FRAME_SIZE_ERROR &&
       lib_error_code != NGHTTP2_ERR_HEADER_COMP))
    return 0;
  sg_stream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
  if (s == NULL)
    return 0;
  s->up_headers_unsent = true;
  sg_warn("conn=%llu stream=%d: cannot send the request headers to backend %s: %s",
          (unsigned long long)s->conn_id, s->id, up->pool->backend->name,
          nghttp2_strerror(lib_error_code));
  return 0;
}

static int send_data(nghttp2_session *session, nghttp2_frame *frame,
                     const uint8_t *framehd, size_t length,
                     nghttp2_data_source *source, void *user) {
  (void)session;
  sg_stream *s = source->ptr;
  int rv = sg_h2io_send_data(user, frame, framehd, length, s->req_body,
                             sg_stream_replay_buffer(s, length));
  if (rv == 0)
    sg_stream_request_bytes_sent(s);
  return rv;
}

static nghttp2_session_callbacks *client_cbs;
static pthread_once_t client_cbs_once = PTHREAD_ONCE_INIT;

static void client_callbacks_init(void) {
  nghttp2_session_callbacks *cbs;
  if (nghttp2_session_callbacks_new(&cbs) != 0)
    return;
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback2(cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_not_send_callback(cbs, on_frame_not_send);
  nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
  nghttp2_session_callbacks_set_send_callback(cbs, sg_h2io_send);
  nghttp2_session_callbacks_set_send_data_callback(cbs, send_data);
  client_cbs = cbs;
}

/* ---- I/O ---------------------------------------------------------------- */

/* Streams whose requests waited for the output to drain go on. */
static void resume_held_data(void *arg) {
  sg_upstream *up = arg;
  for (sg_list *n = up->streams.next; n != &up->streams; n = n->next) {
    sg_stream *s = SG_CONTAINER_OF(n, sg_stream, up_link);
    if (s->req_held) {
      s->req_held = false;
      nghttp2_session_resume_data(up->session, s->up_id);
    }
  }
}

static void upstream_flush(sg_upstream *up) {
  if (up->session == NULL || up->freeing)
    return;
  struct evbuffer *out = bufferevent_get_output(up->bev);
  bool more;
  int rv = sg_h2io_flush_rounds(&up->io, up->session, resume_held_data, up, &more);
  if (rv == 0 && more)
    schedule_send(up);
  if (rv != 0) {
    upstream_free(up, nghttp2_strerror(rv));
    return;
  }
  bool done = !nghttp2_session_want_read(up->session) &&
              !nghttp2_session_want_write(up->session);
  if ((done || (up->state == SG_UPSTREAM_GOAWAY && up->n_streams == 0)) &&
      evbuffer_get_length(out) == 0) {
    const char *why = up->goaway_sent[0] != '\0' ? up->goaway_sent : "connection finished";
    /* Ended before the backend's SETTINGS: it does not speak HTTP/2 there
     * (an HTTP/1.1 server answers with a 400): a failed connect. */
    if (!up->got_settings)
      connect_failed(up, up->goaway_sent[0] != '\0'
                             ? "the backend does not speak HTTP/2 (no SETTINGS first)"
                             : why);
    upstream_free(up, why);
  }
}

static void on_send_ev(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_upstream *up = arg;
  sg_worker *w = up->pool->worker;
  uint64_t held = sg_worker_clock_hold(w);
  up->send_scheduled = false;
  upstream_flush(up);
  sg_worker_clock_release(w, held);
}

static void schedule_send(sg_upstream *up) {
  if (up != NULL && !up->freeing && !up->send_scheduled) {
    up->send_scheduled = true;
    event_active(up->send_ev, EV_WRITE, 0);
  }
}

static void read_input(sg_upstream *up, struct evbuffer *in);

static void on_read(struct bufferevent *bev, void *arg) {
  sg_upstream *up = arg;
  sg_worker *w = up->pool->worker;
  uint64_t held = sg_worker_clock_hold(w);
  read_input(up, bufferevent_get_input(bev));
  sg_worker_clock_release(w, held); /* up may be gone */
}

static void read_input(sg_upstream *up, struct evbuffer *in) {
  if (up->session == NULL)
    return; /* not connected yet: on_connected reads what came early */
  for (;;) {
    struct evbuffer_iovec vec[8];
    int nvec = evbuffer_peek(in, -1, NULL, vec, 8);
    if (nvec <= 0)
      break;
    size_t total = 0;
    for (int i = 0; i < nvec && i < 8; i++) {
      ssize_t rv = nghttp2_session_mem_recv(up->session, vec[i].iov_base,
                                            vec[i].iov_len);
      if (rv < 0) {
        char reason[128];
        snprintf(reason, sizeof reason, "HTTP/2 protocol error from the backend: %s",
                 nghttp2_strerror((int)rv));
        if (!up->got_settings)
          connect_failed(up, reason);
        upstream_free(up, reason);
        return;
      }
      total += (size_t)rv;
    }
    evbuffer_drain(in, total);
  }
  /* TLS records the last read brought beyond the one libevent took (the
   * context reads ahead): its read event, run by hand, takes the next; the
   * socket will not wake it for them. Before the flush, which may free
   * the connection (and with it the activation). */
  if (up->ssl != NULL && SSL_has_pending(up->ssl))
    event_active(&up->bev->ev_read, EV_READ, 1);
  upstream_flush(up);
}

static void on_write(struct bufferevent *bev, void *arg) {
  (void)bev;
  upstream_flush(arg);
}

/* h2c only: large reads straight into nghttp2 (bufferevent's are 4 KiB). */
static void read_socket(sg_upstream *up, evutil_socket_t fd);

static void on_socket_readable(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  sg_upstream *up = arg;
  sg_worker *w = up->pool->worker;
  uint64_t held = sg_worker_clock_hold(w);
  read_socket(up, fd);
  sg_worker_clock_release(w, held); /* up may be gone */
}

static void read_socket(sg_upstream *up, evutil_socket_t fd) {
  sg_worker *w = up->pool->worker;
  /* A few reads per wakeup keep one busy backend from starving the loop. */
  for (int i = 0; i < 4; i++) {
    const uint8_t *data;
    ssize_t n = sg_worker_read_socket(w, fd, &data);
    if (n == -2)
      break;
    if (n <= 0) {
      char reason[192];
      bool broken = n < 0 || up->n_streams > 0;
      snprintf(reason, sizeof reason, "%s",
               n < 0 ? strerror(errno)
               : up->got_settings ? "the backend closed the connection"
                                  : SG_UPSTREAM_CLOSED_BEFORE_SETTINGS);
      if (broken)
        sg_debug("upstream %s conn=%llu: %s", up->pool->backend->name,
                 (unsigned long long)up->id, reason);
      if (!up->got_settings)
        connect_failed(up, reason);
      upstream_free(up, reason);
      return;
    }
    ssize_t rv = nghttp2_session_mem_recv(up->session, data, (size_t)n);
    if (rv < 0) {
      char reason[128];
      snprintf(reason, sizeof reason, "HTTP/2 protocol error from the backend: %s",
               nghttp2_strerror((int)rv));
      if (!up->got_settings)
        connect_failed(up, reason);
      upstream_free(up, reason);
      return;
    }
    if ((size_t)n < w->read_buf_size)
      break;
  }
  upstream_flush(up);
}

static void submit_stream(sg_upstream *up, sg_stream *s) {
  nghttp2_nv stack_nv[SG_NV_STACK];
  nghttp2_nv *nva = sg_nv_array(stack_nv, s->req_headers.count + SG_STREAM_EXTRA_UPSTREAM_HEADERS);
  int32_t id = NGHTTP2_ERR_NOMEM;
  if (nva != NULL) {
    size_t n = sg_stream_request_nv(s, up->pool->tls_ctx != NULL, nva);
    nghttp2_data_provider prd = {.source = {.ptr = s},
                                 .read_callback = sg_stream_read_request_body};
    id = nghttp2_submit_request(up->session, NULL, nva, n, &prd, s);
    sg_nv_array_free(stack_nv, nva);
  }
  sg_list_unlink(&s->up_link);
  if (id < 0) {
    up->n_streams--;
    if (id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE) {
      /* This connection's stream ids are spent: it takes no more calls
       * and closes once its own end. The call, never sent, goes on
       * another. */
      sg_info("upstream %s conn=%llu: no stream ids left: a new connection "
              "takes the next calls", up->pool->backend->name, (unsigned long long)up->id);
      up->state = SG_UPSTREAM_GOAWAY;
      s->up = NULL;
      s->up_state = SG_UPSTREAM_LEG_NONE;
      if (up->n_streams == 0)
        schedule_send(up); /* flush, then close */
      attach(up->pool, s, up);
      return;
    }
    sg_stream_on_upstream_close(s, NGHTTP2_INTERNAL_ERROR,
                                nghttp2_strerror(id));
    if (up->n_streams == 0)
      idle_or_connect_deadline(up); /* attach() stopped its idle countdown */
    return;
  }
  s->up_id = id;
  s->up_state = SG_UPSTREAM_LEG_OPEN;
  sg_stream_set_up_window(s, first_stream_window(pool_config(up->pool)));
  sg_list_push_back(&up->streams, &s->up_link);
}

static int start_session(sg_upstream *up) {
  const sg_config *cfg = pool_config(up->pool);
  pthread_once(&client_cbs_once, client_callbacks_init);
  if (client_cbs == NULL)
    return -1;
  up->h2mem = sg_h2mem_session_new(up->pool->worker->h2mem);
  nghttp2_option *opt;
  if (up->h2mem == NULL || nghttp2_option_new(&opt) != 0)
    return -1;
  nghttp2_option_set_no_auto_window_update(opt, 1);
  /* Until the backend's SETTINGS say how many streams it takes, one: a
   * backend that takes fewer than nghttp2's assumed 100 refuses the rest,
   * and a call refused twice fails. The calls waiting for those SETTINGS
   * go out then, or to other connections (on_frame_recv). */
  nghttp2_option_set_peer_max_concurrent_streams(opt, 1);
  /* Enough CONTINUATION frames (16 KiB each) for the header list we
   * advertise: at 8, a 150 KiB trailer block of one call ended the
   * connection and every call on it. */
  nghttp2_option_set_max_continuations(opt, SG_RESPONSE_MAX_HEADER_LIST_BYTES / 16384 + 4);
  /* A request's header block: what the client may send
   * (http2.max_header_list_bytes) and the identity headers we add. nghttp2
   * stops at 64 KiB by default, and refused larger requests as if the
   * backend had (REFUSED_STREAM, retried, then 14 for good). */
  nghttp2_option_set_max_send_header_block_length(
      opt, (size_t)cfg->max_header_list_bytes + SG_XFCC_MAX_BYTES + 16 * 1024);
  int rv = nghttp2_session_client_new3(&up->session, client_cbs, up, opt,
                                       sg_h2mem_session_nghttp2(up->h2mem));
  sg_h2mem_session_created(up->h2mem);
  nghttp2_option_del(opt);
  if (rv != 0)
    return -1;
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, first_stream_window(cfg)},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, SG_RESPONSE_MAX_HEADER_LIST_BYTES},
      {NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES, 1}, /* as conn.c */
  };
  if (nghttp2_submit_settings(up->session, NGHTTP2_FLAG_NONE, iv,
                              sizeof iv / sizeof iv[0]) != 0)
    return -1;
  /* Each stream is bounded by its own window; the connection window only
   * needs to be large enough that streams sharing this connection cannot
   * block each other. */
  uint64_t conn_window = (uint64_t)cfg->stream_window_bytes * SG_UPSTREAM_STREAMS_PER_CONN;
  if (conn_window > 0x7fffffff)
    conn_window = 0x7fffffff;
  if (conn_window < cfg->connection_window_bytes)
    conn_window = cfg->connection_window_bytes;
  if (nghttp2_session_set_local_window_size(up->session, NGHTTP2_FLAG_NONE, 0,
                                            (int32_t)conn_window) != 0)
    return -1;
  return 0;
}

static void on_connected(sg_upstream *up) {
  if (up->ssl != NULL && !sg_tls_alpn_is_h2(up->ssl)) {
    /* Not an HTTP/2 backend, as much as one that refuses the connection:
     * down, probed, and failover moves its sessions. */
    connect_failed(up, "the backend did not negotiate ALPN h2 over TLS");
    upstream_free(up, "the backend did not negotiate ALPN h2 over TLS");
    return;
  }
  if (start_session(up) != 0) {
    upstream_free(up, "cannot create HTTP/2 session (out of memory)");
    return;
  }
  /* A backend that takes nothing we write for this long is hung: without
   * a bound, nothing else ends the connection while it holds a stream,
   * and a cancelled call's RST_STREAM waits behind the full output for
   * ever, keeping the call, the connection and its generation. libevent's
   * write timeout runs only while output waits; for h2c, what the socket
   * does not take at once waits in the bufferevent, under that timeout. */
  uint32_t stall = pool_config(up->pool)->write_stall_timeout_ms;
  struct timeval wtv = {stall / 1000, (suseconds_t)(stall % 1000) * 1000};
  bufferevent_set_timeouts(up->bev, NULL, &wtv);
  if (up->ssl == NULL) {
    up->read_ev = event_new(up->pool->worker->base, bufferevent_getfd(up->bev),
                            EV_READ | EV_PERSIST, on_socket_readable, up);
    if (up->read_ev == NULL) {
      upstream_free(up, "out of memory");
      return;
    }
    bufferevent_disable(up->bev, EV_READ);
    event_add(up->read_ev, NULL);
  }
  up->io.write_fd = bufferevent_getfd(up->bev);
  up->io.write_tls = up->ssl;
  up->io.write_through = true;
  up->state = SG_UPSTREAM_READY;
  sg_debug("upstream %s conn=%llu: connected%s", up->pool->backend->name,
           (unsigned long long)up->id, up->ssl != NULL ? " (TLS)" : " (h2c)");
  while (!sg_list_empty(&up->pending)) {
    sg_stream *s = SG_CONTAINER_OF(up->pending.next, sg_stream, up_link);
    submit_stream(up, s);
  }
  /* Bytes that came with the connect are fed now (on_read ends with the
   * flush); for h2c, the bufferevent's read callback is done after this. */
  on_read(up->bev, up);
}

/* The TCP connection of the attempt never came up (refused, unreachable):
 * as against a server that answered and then failed TLS or HTTP/2. */
static bool tcp_never_connected(const sg_upstream *up) {
  if (up->state != SG_UPSTREAM_CONNECTING)
    return false;
  struct sockaddr_storage peer;
  socklen_t peer_len = sizeof peer;
  evutil_socket_t sock = bufferevent_getfd(up->bev);
  return sock < 0 || getpeername(sock, (struct sockaddr *)&peer, &peer_len) != 0;
}

static void on_event(struct bufferevent *bev, short events, void *arg) {
  sg_upstream *up = arg;
  if (events & BEV_EVENT_CONNECTED) {
    on_connected(up);
    return;
  }
  /* libevent restores the socket's error for a deferred callback; read it
   * before any other call can change it. */
  int sock_err = EVUTIL_SOCKET_ERROR();
  if ((events & BEV_EVENT_ERROR) && up->addr != NULL && up->addr->ai_next != NULL &&
      tcp_never_connected(up)) {
    connect_next(up, sock_err != 0 ? evutil_socket_error_to_string(sock_err)
                                   : "connection failed");
    return;
  }
  char reason[300];
  if (events & BEV_EVENT_TIMEOUT) {
    /* Its streams get 14; after the SETTINGS, not a connect failure
     * (below): the backend is not marked down, the next connect finds out.
     * Calls already cancelled, whose RST_STREAM could not go out, go too. */
    snprintf(reason, sizeof reason, "the backend read nothing for %u ms (write stall)",
             pool_config(up->pool)->write_stall_timeout_ms);
  } else if (events & BEV_EVENT_EOF) {
    /* Closing an idle connection is the backend's right, not a failure;
     * closing before its SETTINGS is (below). */
    snprintf(reason, sizeof reason, "%s",
             up->got_settings || up->ssl != NULL ? "the backend closed the connection"
                                                 : SG_UPSTREAM_CLOSED_BEFORE_SETTINGS);
  } else {
    unsigned long tls_err = up->ssl != NULL ? bufferevent_get_openssl_error(bev) : 0;
    if (tls_err != 0 && up->got_settings) {
      /* Past the handshake (its SETTINGS came: with TLS 1.3 a backend may
       * refuse our certificate only after our side finished): a backend
       * going away without close_notify (a restart) reads as an OpenSSL
       * error, but certificates are not what the operator should look at. */
      int err = EVUTIL_SOCKET_ERROR();
      bool sock = err == ECONNRESET || err == EPIPE || err == ETIMEDOUT;
      if (ERR_GET_LIB(tls_err) == 0 || ERR_GET_REASON(tls_err) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        snprintf(reason, sizeof reason, "%s",
                 sock ? evutil_socket_error_to_string(err)
                      : "the backend closed the connection (no TLS close_notify)");
      } else {
        char cause[256];
        ERR_error_string_n(tls_err, cause, sizeof cause);
        snprintf(reason, sizeof reason, "TLS error: %s", cause);
      }
    } else if (tls_err != 0) {
      char cause[256];
      long vr = SSL_get_verify_result(up->ssl);
      if (vr != X509_V_OK) {
        snprintf(cause, sizeof cause, "%s", X509_verify_cert_error_string(vr));
      } else if (ERR_GET_LIB(tls_err) == 0) {
        /* Not an OpenSSL error but libevent's SSL_ERROR_SYSCALL (5): a
         * socket error, or an end of file mid-handshake. errno may have
         * moved on since (deferred callbacks): only a socket's error is
         * taken for the cause. */
        int err = EVUTIL_SOCKET_ERROR();
        bool sock = err == ECONNRESET || err == EPIPE || err == ETIMEDOUT ||
                    err == ECONNABORTED || err == EHOSTUNREACH || err == ENETUNREACH;
        snprintf(cause, sizeof cause, "%s",
                 sock ? evutil_socket_error_to_string(err)
                      : "the backend closed (or reset) the connection during the handshake");
      } else if (ERR_GET_REASON(tls_err) == SSL_R_WRONG_VERSION_NUMBER ||
                 ERR_GET_REASON(tls_err) == SSL_R_PACKET_LENGTH_TOO_LONG) {
        snprintf(cause, sizeof cause,
                 "the backend does not answer with TLS (an h2c server?): remove "
                 "\"tls\" from the backend, or check its port");
      } else {
        ERR_error_string_n(tls_err, cause, sizeof cause);
      }
      /* A backend that refuses our expired certificate may only close the
       * connection: then the cause is on this side. */
      char dates[128];
      sg_tls_cert_dates_problem(up->ssl, dates, sizeof dates);
      snprintf(reason, sizeof reason, "TLS handshake failed: %s%s%s%s", cause,
               dates[0] != '\0' ? " (our client certificate " : "", dates,
               dates[0] != '\0' ? ")" : "");
    } else {
      attempt_failure(up, sock_err != 0 ? evutil_socket_error_to_string(sock_err)
                                        : "connection failed",
                      reason, sizeof reason);
    }
  }
  /* Only a connect that fails (up to the backend's SETTINGS) says the
   * backend is down; an established connection that breaks fails its own
   * streams, and the next connect finds out. */
  if (!up->got_settings)
    connect_failed(up, reason);
  upstream_free(up, reason);
}

static void on_timer(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_upstream *up = arg;
  if (up->connect_error[0] != '\0') {
    connect_failed(up, up->connect_error);
    upstream_free(up, up->connect_error);
    return;
  }
  if (!up->got_settings && up->connect_deadline_us != 0) {
    /* An address's share of the connect timeout (arm_attempt_timer). */
    uint64_t now = sg_monotonic_us();
    if (now + 1000 < up->connect_deadline_us) {
      if (up->state == SG_UPSTREAM_CONNECTING && up->resolving == NULL && up->addr != NULL &&
          up->addr->ai_next != NULL && tcp_never_connected(up)) {
        char why[64];
        snprintf(why, sizeof why, "no answer within %u ms", up->attempt_ms);
        connect_next(up, why);
        return;
      }
      uint64_t left = up->connect_deadline_us - now;
      struct timeval tv = {(time_t)(left / 1000000), (suseconds_t)(left % 1000000)};
      evtimer_add(up->timer, &tv);
      return;
    }
  }
  if (up->state == SG_UPSTREAM_CONNECTING || !up->got_settings) {
    const char *stage = "connected, but no HTTP/2 SETTINGS from the backend within";
    if (up->state == SG_UPSTREAM_CONNECTING) {
      /* Over TLS, CONNECTING lasts until the handshake is done: a TCP
       * connect that went through sends the operator to the TLS side
       * (a plain-TCP port, a wedged TLS terminator), not to routes. */
      struct sockaddr_storage peer;
      socklen_t peer_len = sizeof peer;
      evutil_socket_t sock = bufferevent_getfd(up->bev);
      bool tcp_up = up->ssl != NULL && sock >= 0 &&
                    getpeername(sock, (struct sockaddr *)&peer, &peer_len) == 0;
      stage = tcp_up ? "TCP connected, but the TLS handshake was not finished within"
                    : "connect timed out after";
      /* A cluster DNS that does not answer is the commonest case of a
       * connect that never started: say so, not "timed out". */
      if (up->resolving != NULL) {
        char reason[300];
        snprintf(reason, sizeof reason, "cannot resolve %s: no answer from DNS within %u ms",
                 up->pool->backend->address, pool_config(up->pool)->upstream_connect_timeout_ms);
        connect_failed(up, reason);
        upstream_free(up, reason);
        return;
      }
    }
    char reason[300];
    int n = snprintf(reason, sizeof reason, "%s %u ms", stage,
                     pool_config(up->pool)->upstream_connect_timeout_ms);
    if (up->n_addrs > 1 && n > 0 && (size_t)n < sizeof reason)
      snprintf(reason + n, sizeof reason - (size_t)n, " (at %s, address %u of %u of %s%s%s)",
               up->addr_text, up->addr_index, up->n_addrs, up->pool->backend->address,
               up->tried[0] != '\0' ? "; before it: " : "", up->tried);
    count_connect(up->pool, false);
    pool_mark_down(up->pool, reason);
    upstream_free(up, reason);
    return;
  }
  if (up->n_streams != 0)
    return;
  if (up->trim_pending) {
    sg_h2mem_session_trim(up->h2mem, !nghttp2_session_want_write(up->session) &&
                                         evbuffer_get_length(bufferevent_get_output(up->bev)) == 0);
    const sg_config *cfg = pool_config(up->pool);
    sg_debug("upstream %s conn=%llu: idle for %u ms: spare session memory given back",
             up->pool->backend->name, (unsigned long long)up->id, cfg->idle_trim_ms);
    set_timer_ms(up, cfg->upstream_idle_timeout_ms - cfg->idle_trim_ms);
    return;
  }
  upstream_free(up, "idle");
}

/* ---- pool --------------------------------------------------------------- */

/* The transport of one connect attempt: a socket bufferevent, with TLS
 * when the backend has it. A failed attempt's transport is freed and the
 * next address gets a new one: an SSL that met a failed connect cannot be
 * used again. */
static int transport_new(sg_upstream *up) {
  sg_upstream_pool *pool = up->pool;
  sg_worker *w = pool->worker;
  const sg_backend_config *b = pool->backend;
  const int opts = BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS;
  if (pool->tls_ctx != NULL) {
    up->ssl = SSL_new(pool->tls_ctx);
    if (up->ssl == NULL)
      return -1;
    const char *name = b->tls_sni != NULL ? b->tls_sni : b->address;
    /* "spark.internal." is the same name as "spark.internal", but OpenSSL
     * matches the certificate's names byte for byte, and SNI goes without
     * the dot (RFC 6066 3). */
    char undotted[256];
    size_t name_len = strlen(name);
    if (name_len > 1 && name_len < sizeof undotted && name[name_len - 1] == '.') {
      memcpy(undotted, name, name_len - 1);
      undotted[name_len - 1] = '\0';
      name = undotted;
    }
    /* A link-local address with its zone ("fe80::1%eth0"): the zone picks
     * the interface to connect on; the certificate names the address. */
    const char *zone = strchr(name, '%');
    if (zone != NULL && (size_t)(zone - name) < sizeof undotted) {
      memmove(undotted, name, (size_t)(zone - name));
      undotted[zone - name] = '\0';
      name = undotted;
    }
    if (!sg_netaddr_is_numeric(name))
      SSL_set_tlsext_host_name(up->ssl, name);
    if (b->tls_verify) {
      /* The certificate must name the backend: a CA-signed certificate for
       * some other host is not good enough. */
      if (sg_netaddr_is_numeric(name))
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(up->ssl), name);
      else
        SSL_set1_host(up->ssl, name);
    }
    up->bev = bufferevent_openssl_socket_new(w->base, -1, up->ssl,
                                             BUFFEREVENT_SSL_CONNECTING, opts);
    if (up->bev == NULL) {
      SSL_free(up->ssl);
      up->ssl = NULL;
      return -1;
    }
  } else {
    up->bev = bufferevent_socket_new(w->base, -1, opts);
    if (up->bev == NULL)
      return -1;
  }
  up->io.out = bufferevent_get_output(up->bev);
  bufferevent_setcb(up->bev, on_read, on_write, on_event, up);
  bufferevent_setwatermark(up->bev, EV_WRITE, SG_UPSTREAM_OUTPUT_LOW_WATER, 0);
  /* libevent reads and writes 16 KiB per syscall by default: at bulk rates
   * that is tens of thousands of syscalls per second for nothing. */
  bufferevent_set_max_single_read(up->bev, SG_IO_CHUNK_BYTES);
  bufferevent_set_max_single_write(up->bev, SG_IO_CHUNK_BYTES);
  bufferevent_enable(up->bev, EV_READ | EV_WRITE);
  return 0;
}

/* Fails the connection from its timer, outside the caller's stack. */
static void fail_soon(sg_upstream *up, const char *reason) {
  snprintf(up->connect_error, sizeof up->connect_error, "%s", reason);
  event_active(up->timer, EV_TIMEOUT, 1);
}

/* The reason a connect failed at the address being tried, with the
 * addresses tried before it when there were several. */
static void attempt_failure(const sg_upstream *up, const char *why, char *out, size_t outlen) {
  if (up->n_addrs > 1)
    snprintf(out, outlen, "%s: %s (address %u of %u of %s%s%s)", up->addr_text, why,
             up->addr_index, up->n_addrs, up->pool->backend->address,
             up->tried[0] != '\0' ? "; before it: " : "", up->tried);
  else
    snprintf(out, outlen, "%s", why);
}

/* An address that does not answer (its SYNs dropped: a host down, a
 * family black-holed) must not use up the whole connect timeout: each
 * address gets an equal share of what is left, the last all of it. Once
 * its TCP connection is up, an attempt has until the deadline. */
static void arm_attempt_timer(sg_upstream *up) {
  uint64_t now = sg_monotonic_us();
  uint64_t left = up->connect_deadline_us > now ? up->connect_deadline_us - now : 0;
  unsigned remaining = up->n_addrs >= up->addr_index ? up->n_addrs - up->addr_index + 1 : 1;
  uint64_t share_us = left / remaining;
  up->attempt_ms = (uint32_t)((share_us + 999) / 1000);
  struct timeval tv = {(time_t)(share_us / 1000000), (suseconds_t)(share_us % 1000000)};
  evtimer_add(up->timer, &tv);
}

/* Adds the address being tried, and why it failed, to the list of the
 * attempt's earlier addresses (cut short when long). */
static void note_tried(sg_upstream *up, const char *why) {
  size_t used = strlen(up->tried);
  if (used + 1 < sizeof up->tried)
    snprintf(up->tried + used, sizeof up->tried - used, "%s%s: %s", used > 0 ? ", " : "",
             up->addr_text, why);
}

/* Starts the attempt at up->addr, or the addresses after it when one
 * cannot even start (a family this host lacks). |why|: why the previous
 * attempt failed (NULL at the first). */
static void connect_next(sg_upstream *up, const char *why) {
  if (why != NULL) {
    note_tried(up, why);
    sg_info("upstream %s conn=%llu: %s: %s; trying the backend's next address",
            up->pool->backend->name, (unsigned long long)up->id, up->addr_text, why);
    up->addr = up->addr->ai_next;
    bufferevent_free(up->bev); /* and the SSL with it */
    up->bev = NULL;
    up->ssl = NULL;
    if (transport_new(up) != 0) {
      fail_soon(up, "out of memory");
      return;
    }
  }
  for (; up->addr != NULL; up->addr = up->addr->ai_next) {
    up->addr_index++;
    sg_netaddr_format(up->addr->ai_addr, up->addr_text, sizeof up->addr_text);
    if (bufferevent_socket_connect(up->bev, up->addr->ai_addr, (int)up->addr->ai_addrlen) == 0) {
      evutil_socket_t fd = bufferevent_getfd(up->bev);
      if (fd >= 0)
        sg_tcpopt_apply(fd, pool_config(up->pool)->tcp_keepalive_ms,
                        pool_config(up->pool)->write_stall_timeout_ms);
      arm_attempt_timer(up);
      return;
    }
    const char *err = evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR());
    if (up->addr->ai_next == NULL) {
      char reason[300];
      attempt_failure(up, err, reason, sizeof reason);
      fail_soon(up, reason);
      return;
    }
    note_tried(up, err);
  }
}

static void on_resolved(int result, struct evutil_addrinfo *addrs, void *arg) {
  if (result == EVUTIL_EAI_CANCEL)
    return; /* the connection is being freed */
  sg_upstream *up = arg;
  up->resolving = NULL;
  if (result != 0 || addrs == NULL) {
    char reason[300];
    snprintf(reason, sizeof reason, "cannot resolve %s: %s", up->pool->backend->address,
             result != 0 ? evutil_gai_strerror(result) : "no address");
    if (addrs != NULL)
      evutil_freeaddrinfo(addrs);
    fail_soon(up, reason);
    return;
  }
  up->addrs = up->addr = addrs;
  for (const struct evutil_addrinfo *a = addrs; a != NULL; a = a->ai_next)
    up->n_addrs++;
  connect_next(up, NULL);
}

static sg_upstream *upstream_new(sg_upstream_pool *pool, char *err,
                                 size_t errlen) {
  sg_worker *w = pool->worker;
  const sg_backend_config *b = pool->backend;
  sg_upstream *up = calloc(1, sizeof *up);
  if (up == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  up->pool = pool;
  up->id = ++pool->next_id;
  up->state = SG_UPSTREAM_CONNECTING;
  sg_list_init(&up->streams);
  sg_list_init(&up->pending);
  up->send_ev = event_new(w->base, -1, 0, on_send_ev, up);
  up->timer = evtimer_new(w->base, on_timer, up);
  if (up->send_ev == NULL || up->timer == NULL || transport_new(up) != 0) {
    snprintf(err, errlen, "out of memory");
    if (up->send_ev != NULL)
      event_free(up->send_ev);
    if (up->timer != NULL)
      event_free(up->timer);
    free(up);
    return NULL;
  }
  up->io.high_water = SG_UPSTREAM_OUTPUT_HIGH_WATER;
  up->io.copy_payload = up->ssl != NULL;
  up->io.stage = w->h2_stage;
  sg_list_push_back(&pool->conns, &up->pool_link);
  pool->n_conns++;
  set_timer_ms(up, pool_config(pool)->upstream_connect_timeout_ms);
  up->connect_deadline_us =
      sg_monotonic_us() + (uint64_t)pool_config(pool)->upstream_connect_timeout_ms * 1000;
  /* A numeric address or one from the hosts file is answered at once (the
   * callback runs before this returns); a host name is resolved (DNS)
   * for every connection, so a changed record is followed. */
  char port[8];
  snprintf(port, sizeof port, "%u", (unsigned)b->port);
  struct evutil_addrinfo hints = {.ai_family = AF_UNSPEC,
                                  .ai_socktype = SOCK_STREAM,
                                  .ai_protocol = IPPROTO_TCP};
  const char *name = b->address;
  struct evdns_base *dns = w->dns;
  char absolute[256];
  size_t len = strlen(name);
  if (len > 1 && name[len - 1] == '.' && len - 1 < sizeof absolute) {
    memcpy(absolute, name, len - 1);
    absolute[len - 1] = '\0';
    name = absolute;
    dns = sg_worker_dns_absolute(w);
  }
  if (dns == NULL)
    fail_soon(up, "no DNS resolver (out of memory)");
  else
    up->resolving = evdns_getaddrinfo(dns, name, port, &hints, on_resolved, up);
  return up;
}

static void upstream_free(sg_upstream *up, const char *reason) {
  if (up->freeing)
    return;
  up->freeing = true;
  sg_upstream_pool *pool = up->pool;
  bool quiet = up->n_streams == 0;
  if (quiet)
    sg_debug("upstream %s conn=%llu: closed: %s", pool->backend->name,
             (unsigned long long)up->id, reason);
  else
    sg_warn("upstream %s (%s:%u) conn=%llu: closed with %u streams: %s",
            pool->backend->name, pool->backend->address, pool->backend->port,
            (unsigned long long)up->id, up->n_streams, reason);
  while (!sg_list_empty(&up->pending)) {
    sg_stream *s = SG_CONTAINER_OF(up->pending.next, sg_stream, up_link);
    leg_closed(up, s, NGHTTP2_INTERNAL_ERROR, reason);
  }
  while (!sg_list_empty(&up->streams)) {
    sg_stream *s = SG_CONTAINER_OF(up->streams.next, sg_stream, up_link);
    leg_closed(up, s, NGHTTP2_INTERNAL_ERROR, reason);
  }
  sg_list_unlink(&up->pool_link);
  pool->n_conns--;
  if (up->session != NULL)
    nghttp2_session_del(up->session);
  sg_h2mem_session_release(up->h2mem);
  if (up->read_ev != NULL)
    event_free(up->read_ev);
  if (up->resolving != NULL)
    evdns_getaddrinfo_cancel(up->resolving);
  if (up->addrs != NULL)
    evutil_freeaddrinfo(up->addrs);
  bufferevent_free(up->bev);
  event_free(up->send_ev);
  event_free(up->timer);
  free(up);
}

sg_upstream_pool *sg_upstream_pool_new(sg_worker *w, const sg_config *cfg,
                                       const sg_tenant_config *tenant,
                                       const sg_backend_config *backend,
                                       SSL_CTX *tls_ctx,
                                       struct sg_metrics_worker *metrics) {
  sg_upstream_pool *pool = calloc(1, sizeof *pool);
  if (pool == NULL)
    return NULL;
  pool->worker = w;
  pool->cfg = cfg;
  pool->metrics = metrics;
  pool->tenant = tenant;
  pool->backend = backend;
  pool->tls_ctx = tls_ctx;
  sg_list_init(&pool->conns);
  pool->probe = evtimer_new(w->base, on_probe, pool);
  if (pool->probe == NULL) {
    free(pool);
    return NULL;
  }
  return pool;
}

void sg_upstream_pool_free(sg_upstream_pool *pool) {
  if (pool == NULL)
    return;
  while (!sg_list_empty(&pool->conns)) {
    sg_upstream *up = SG_CONTAINER_OF(pool->conns.next, sg_upstream, pool_link);
    upstream_free(up, "shutting down");
  }
  event_free(pool->probe);
  free(pool);
}

bool sg_upstream_pool_is_up(const sg_upstream_pool *pool) { return !pool->down; }

size_t sg_upstream_pool_size(const sg_upstream_pool *pool) {
  return pool->n_conns;
}

static unsigned capacity(const sg_upstream *up) {
  if (up->state == SG_UPSTREAM_GOAWAY)
    return 0;
  if (up->state == SG_UPSTREAM_CONNECTING || up->session == NULL)
    return SG_UPSTREAM_STREAMS_PER_CONN;
  /* 2^30 calls spend a connection's stream ids (RFC 9113 5.1.1). */
  if (nghttp2_session_get_next_stream_id(up->session) > INT32_MAX)
    return 0;
  uint32_t remote = nghttp2_session_get_remote_settings(
      up->session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
  return remote < SG_UPSTREAM_STREAMS_PER_CONN ? remote : SG_UPSTREAM_STREAMS_PER_CONN;
}

/* |avoid|: the connection that just refused the stream (may be NULL). */
static void attach(sg_upstream_pool *pool, sg_stream *s, const sg_upstream *avoid) {
  sg_upstream *chosen = NULL;
  for (sg_list *n = pool->conns.next; n != &pool->conns; n = n->next) {
    sg_upstream *up = SG_CONTAINER_OF(n, sg_upstream, pool_link);
    if (up != avoid && !up->freeing && up->n_streams < capacity(up)) {
      chosen = up;
      break;
    }
  }
  if (chosen == NULL) {
    char err[128];
    chosen = upstream_new(pool, err, sizeof err);
    if (chosen == NULL) {
      s->up_state = SG_UPSTREAM_LEG_OPEN; /* so the close below reports */
      sg_stream_on_upstream_close(s, NGHTTP2_INTERNAL_ERROR, err);
      return;
    }
  }
  /* A connection still proving itself keeps its connect deadline; a
   * ready one stops its idle countdown. */
  if (chosen->got_settings)
    evtimer_del(chosen->timer);
  s->up = chosen;
  s->up_state = SG_UPSTREAM_LEG_PENDING;
  chosen->n_streams++;
  sg_list_push_back(&chosen->pending, &s->up_link);
  if (chosen->state != SG_UPSTREAM_CONNECTING) {
    submit_stream(chosen, s);
    schedule_send(chosen);
  }
}

void sg_upstream_attach(sg_upstream_pool *pool, sg_stream *s) {
  attach(pool, s, NULL);
}

void sg_upstream_cancel(sg_stream *s) {
  sg_upstream *up = s->up;
  if (up == NULL)
    return;
  if (s->up_state == SG_UPSTREAM_LEG_PENDING) {
    sg_list_unlink(&s->up_link);
    up->n_streams--;
    s->up_state = SG_UPSTREAM_LEG_DONE;
    s->up = NULL;
    if (up->n_streams == 0)
      idle_or_connect_deadline(up);
    return;
  }
  if (s->up_state == SG_UPSTREAM_LEG_OPEN && leg_unsent(up, s)) {
    cancel_unsent(up, s);
    sg_list_unlink(&s->up_link);
    up->n_streams--;
    sg_stream_set_up_window(s, 0);
    s->up_state = SG_UPSTREAM_LEG_DONE;
    s->up = NULL;
    if (up->n_streams == 0)
      idle_or_connect_deadline(up);
    schedule_send(up);
    return;
  }
  if (s->up_state == SG_UPSTREAM_LEG_OPEN && up->session != NULL) {
    /* The leg stays OPEN until the library reports the close: only then
     * may the stream object go. */
    nghttp2_submit_rst_stream(up->session, NGHTTP2_FLAG_NONE, s->up_id,
                              NGHTTP2_CANCEL);
    schedule_send(up);
  }
}

void sg_upstream_resume_request(sg_stream *s) {
  if (s->up_state != SG_UPSTREAM_LEG_OPEN || s->up == NULL)
    return;
  nghttp2_session_resume_data(s->up->session, s->up_id);
  schedule_send(s->up);
}

void sg_upstream_consumed(sg_stream *s, size_t n) {
  if (s->up_state != SG_UPSTREAM_LEG_OPEN || s->up == NULL || n == 0)
    return;
  /* The client takes this call's data: once it has taken half its first
   * window (a small answer never costs a WINDOW_UPDATE), the window grows
   * to the full stream window, if its connection's budget has room. */
  const sg_config *cfg = pool_config(s->up->pool);
  uint32_t full = cfg->stream_window_bytes;
  if (s->up_window < full && s->bytes_out >= s->up_window / 2 &&
      sg_stream_up_window_fits(s, full, cfg->connection_window_bytes) &&
      nghttp2_session_set_local_window_size(s->up->session, NGHTTP2_FLAG_NONE, s->up_id,
                                            (int32_t)full) == 0)
    sg_stream_set_up_window(s, full);
  nghttp2_session_consume(s->up->session, s->up_id, n);
  schedule_send(s->up);
}
