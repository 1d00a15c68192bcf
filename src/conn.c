#include "sparkgate/conn.h"

#include <errno.h>
#include <time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>
#include <event2/bufferevent_struct.h>
#include <openssl/err.h>
#include <openssl/x509.h>

#include "sparkgate/affinity.h"
#include "sparkgate/h2io.h"
#include "sparkgate/h2mem.h"
#include "sparkgate/identity.h"
#include "sparkgate/log.h"
#include "sparkgate/metrics.h"
#include "sparkgate/netaddr.h"
#include "sparkgate/observe.h"
#include "sparkgate/stream.h"
#include "sparkgate/tcpopt.h"
#include "sparkgate/tls.h"
#include "sparkgate/worker.h"

/* Stop asking nghttp2 for frames once this much waits in the socket's
 * output buffer; resume when it drains to the low mark. This is what keeps
 * a client that does not read from costing more than a bounded amount. */
#define SG_CONN_OUTPUT_HIGH_WATER (256 * 1024)
#define SG_CONN_OUTPUT_LOW_WATER (64 * 1024)
#define SG_IO_CHUNK_BYTES (256 * 1024)

/* Between the shutdown notice and the final GOAWAY: long enough for
 * requests already in flight from the client to arrive. */
#define SG_CONN_GOAWAY_GRACE_MS 500

/* The abuse budget: a burst of this many costly frames, refilled at this
 * rate. A well-behaved gRPC client stays far below: it pings rarely, and
 * its small WINDOW_UPDATEs answer DATA frames we sent (free, see
 * window_update_credits). */
#define SG_CONN_ABUSE_BURST 1000u
#define SG_CONN_ABUSE_REFILL_PER_S 200u
/* A WINDOW_UPDATE smaller than this is a dribble (RFC 9113 10.5). */
#define SG_CONN_MIN_WINDOW_UPDATE 1024

static void conn_free(sg_conn *c);
static bool conn_flush(sg_conn *c);

static void set_timer_ms(sg_conn *c, uint32_t ms) {
  struct timeval tv = {ms / 1000, (suseconds_t)(ms % 1000) * 1000};
  evtimer_add(c->timer, &tv);
  c->idle_timer_set = false;
  c->trim_pending = false;
}

/* The first cause wins: a GOAWAY the abuse budget asked for is sent, and
 * then the write stall may close the connection; its calls were cut by
 * the budget. Both strings are static (literals, nghttp2's messages). */
static void set_close_reason(sg_conn *c, const char *reason, const char *detail) {
  if (c->close_reason != NULL)
    return;
  c->close_reason = reason;
  c->close_detail = detail;
}

/* The idle deadline comes in two steps: first the trim of the session's
 * memory (idle_trim_ms), then the rest of idle_timeout_ms. */
static void set_idle_timer(sg_conn *c) {
  uint32_t idle_ms = c->rt->config->idle_timeout_ms, trim_ms = c->rt->config->idle_trim_ms;
  bool trim = trim_ms > 0 && idle_ms > trim_ms;
  set_timer_ms(c, trim ? trim_ms : idle_ms);
  c->idle_timer_set = true;
  c->trim_pending = trim;
}

static void trim_idle(sg_conn *c) {
  bool output_idle = !nghttp2_session_want_write(c->session) &&
                     evbuffer_get_length(bufferevent_get_output(c->bev)) == 0;
  sg_h2mem_session_trim(c->h2mem, output_idle);
  sg_affinity_memo_free(c->affinity_memo); /* the next call hashes again */
  c->affinity_memo = NULL;
  uint32_t idle_ms = c->rt->config->idle_timeout_ms, trim_ms = c->rt->config->idle_trim_ms;
  sg_debug("conn=%llu peer=%s: idle for %u ms: spare session memory given back%s",
           (unsigned long long)c->id, c->peer, trim_ms,
           output_idle ? "" : " (frame buffer kept: output pending)");
  set_timer_ms(c, idle_ms - trim_ms);
  c->idle_timer_set = true;
}

void sg_conn_stream_opened(sg_conn *c) {
  /* Only the idle deadline goes: a drain's deadline for its final GOAWAY
   * must survive calls the client opens after the shutdown notice. */
  if (c->idle_timer_set) {
    evtimer_del(c->timer);
    c->idle_timer_set = false;
    c->trim_pending = false;
  }
}

static void count_tls_failure(sg_conn *c, size_t reason) {
  if (c->gen->metrics != NULL)
    sg_metrics_tls_handshake_failed(c->gen->metrics, reason);
}

static void log_peer_closed(sg_conn *c, const char *why) {
  sg_debug("conn=%llu peer=%s: closed: %s", (unsigned long long)c->id, c->peer,
           why);
}

/* ---- nghttp2 server callbacks ------------------------------------------- */

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                            void *user) {
  sg_conn *c = user;
  c->hdr_stream = NULL;
  if (frame->hd.type != NGHTTP2_HEADERS)
    return 0;
  sg_stream *s;
  if (frame->headers.cat != NGHTTP2_HCAT_REQUEST) {
    s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
  } else {
    s = sg_stream_new(c, frame->hd.stream_id);
    if (s == NULL)
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    nghttp2_session_set_stream_user_data(session, frame->hd.stream_id, s);
  }
  c->hdr_stream = s;
  c->hdr_stream_id = frame->hd.stream_id;
  return 0;
}

/* The stream a HEADERS frame's fields belong to, without a lookup per
 * field. */
static sg_stream *header_block_stream(sg_conn *c, nghttp2_session *session,
                                      int32_t stream_id) {
  if (c->hdr_stream != NULL && c->hdr_stream_id == stream_id)
    return c->hdr_stream;
  return nghttp2_session_get_stream_user_data(session, stream_id);
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     nghttp2_rcbuf *name, nghttp2_rcbuf *value, uint8_t flags,
                     void *user) {
  (void)flags;
  sg_conn *c = user;
  if (frame->hd.type != NGHTTP2_HEADERS)
    return 0;
  sg_stream *s = header_block_stream(c, session, frame->hd.stream_id);
  if (s == NULL)
    return 0;
  sg_header_list *list = frame->headers.cat == NGHTTP2_HCAT_REQUEST
                             ? &s->req_headers
                             : &s->req_trailers;
  if (sg_header_list_add(list, name, value,
                         c->rt->config->max_header_list_bytes) != 0) {
    /* Past the cap the block is not worth decoding further: the library
     * resets the stream and we answer nothing (RFC 9113 10.5.1). */
    if (!s->header_overflow) {
      s->header_overflow = true;
      snprintf(s->reason, sizeof s->reason,
               "request header list exceeds %u bytes (stream reset)",
               c->rt->config->max_header_list_bytes);
      sg_conn_charge(c, 5, "oversized header lists");
      sg_info("conn=%llu stream=%d peer=%s: rejected: request header list "
              "exceeds %u bytes",
              (unsigned long long)c->id, s->id, c->peer,
              c->rt->config->max_header_list_bytes);
    }
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  }
  return 0;
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void sg_conn_charge(sg_conn *c, unsigned cost, const char *what) {
  /* nghttp2 may have queued a GOAWAY of its own (its rapid-reset limiter):
   * a second one would raise the last stream id (RFC 9113 6.8). */
  if (c->freeing || c->closing || c->session == NULL ||
      !nghttp2_session_want_read(c->session))
    return;
  uint64_t now = now_ms();
  uint64_t cap = (uint64_t)SG_CONN_ABUSE_BURST * 1000u;
  c->abuse_tokens_ms += (now - c->abuse_last_ms) * SG_CONN_ABUSE_REFILL_PER_S;
  if (c->abuse_tokens_ms > cap)
    c->abuse_tokens_ms = cap;
  c->abuse_last_ms = now;
  uint64_t need = (uint64_t)cost * 1000u;
  if (c->abuse_tokens_ms >= need) {
    c->abuse_tokens_ms -= need;
    return;
  }
  sg_warn("conn=%llu peer=%s: closing: too many %s (abuse budget spent): "
          "GOAWAY ENHANCE_YOUR_CALM",
          (unsigned long long)c->id, c->peer, what);
  set_close_reason(c, "abuse budget spent on", what);
  nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                        nghttp2_session_get_last_proc_stream_id(c->session),
                        NGHTTP2_ENHANCE_YOUR_CALM, NULL, 0);
  c->closing = true;
  c->goaway_sent = true;
  sg_conn_schedule_send(c);
}

/* PRIORITY frames are charged as they begin: with RFC 7540 priorities
 * off (SETTINGS_NO_RFC7540_PRIORITIES), nghttp2 skips them without a
 * frame-received callback, and a flood of them would go unseen. */
static int on_begin_frame(nghttp2_session *session, const nghttp2_frame_hd *hd,
                          void *user) {
  (void)session;
  if (hd->type == NGHTTP2_PRIORITY)
    sg_conn_charge(user, 1, "PRIORITY frames");
  return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                         void *user) {
  sg_conn *c = user;
  sg_stream *s;
  switch (frame->hd.type) {
  case NGHTTP2_PING:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK))
      sg_conn_charge(c, 1, "PING frames");
    break;
  case NGHTTP2_SETTINGS:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK)) {
      sg_conn_charge(c, 1, "SETTINGS frames");
      if (!c->got_settings) {
        c->got_settings = true;
        if (c->n_streams == 0 && !c->draining)
          set_idle_timer(c);
      }
    }
    break;
  case NGHTTP2_RST_STREAM:
    /* Two tokens: the budget (500 resets in a burst) runs out before
     * nghttp2's own limiter (1000), so the client learns why. */
    sg_conn_charge(c, 2, "stream resets (rapid reset)");
    break;
  case NGHTTP2_WINDOW_UPDATE:
    /* Small updates that give back what our DATA frames took are how
     * grpcio reads small responses (two per call); only the others cost. */
    if (frame->window_update.window_size_increment < SG_CONN_MIN_WINDOW_UPDATE) {
      if (c->window_update_credits > 0)
        c->window_update_credits--;
      else
        sg_conn_charge(c, 1, "tiny WINDOW_UPDATE frames");
    }
    break;
  default:
    break;
  }
  switch (frame->hd.type) {
  case NGHTTP2_HEADERS:
    s = header_block_stream(c, session, frame->hd.stream_id);
    c->hdr_stream = NULL; /* the block is complete */
    if (s == NULL)
      return 0;
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
      s->req_headers_done = true;
      sg_stream_on_request_headers(s);
      /* A request with no body at all still ends: Spark calls need a
       * message, and the end is where that is found missing. */
      if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
        sg_stream_on_request_end(s);
    } else if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
      sg_stream_on_request_end(s);
    }
    break;
  case NGHTTP2_DATA:
    if (frame->hd.length == 0 && !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
      sg_conn_charge(c, 1, "empty DATA frames");
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
      s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
      if (s != NULL)
        sg_stream_on_request_end(s);
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
    /* Nobody will forward these bytes: give the window back now. */
    nghttp2_session_consume(session, stream_id, len);
    return 0;
  }
  sg_stream_on_request_data(s, data, len);
  return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id,
                           uint32_t error_code, void *user) {
  sg_conn *c = user;
  if (c->hdr_stream_id == stream_id)
    c->hdr_stream = NULL;
  sg_stream *s = nghttp2_session_get_stream_user_data(session, stream_id);
  if (s == NULL || c->freeing)
    return 0;
  nghttp2_session_set_stream_user_data(session, stream_id, NULL);
  sg_stream_on_client_close(s, error_code);
  if (c->n_streams == 0 && !c->draining && !c->closing)
    set_idle_timer(c);
  return 0;
}

/* A GOAWAY written past a session that can no longer send (after a fatal
 * nghttp2 error): nine bytes of frame header, last stream id, code. */
static void write_final_goaway(sg_conn *c, uint32_t code) {
  if (c->goaway_sent)
    return;
  uint32_t last = (uint32_t)nghttp2_session_get_last_proc_stream_id(c->session);
  uint8_t f[17] = {0, 0, 8, NGHTTP2_GOAWAY, 0, 0, 0, 0, 0};
  for (int i = 0; i < 4; i++) {
    f[9 + i] = (uint8_t)(last >> (24 - 8 * i));
    f[13 + i] = (uint8_t)(code >> (24 - 8 * i));
  }
  if (evbuffer_add(bufferevent_get_output(c->bev), f, sizeof f) == 0) {
    c->goaway_sent = true;
    sg_info("conn=%llu peer=%s: sent GOAWAY %s (last stream %u)",
            (unsigned long long)c->id, c->peer, nghttp2_http2_strerror(code), last);
  }
}

/* A request nghttp2 resets as malformed (RFC 9113 8.1.1): one line with
 * the call's path, a reason for the access log, and a charge to the abuse
 * budget, as for the malformed requests sparkgate refuses itself: each one
 * may have started a backend call that is now cancelled. */
static void reject_library_reset(sg_conn *c, sg_stream *s, const char *why) {
  char pathbuf[256];
  s->rejected = true;
  s->grpc_status = -1; /* the client gets a reset, no status */
  snprintf(s->reason, sizeof s->reason, "malformed: %s", why);
  sg_info("conn=%llu stream=%d peer=%s path=%s: rejected (stream reset): %s",
          (unsigned long long)c->id, s->id, c->peer,
          sg_stream_path(s, pathbuf, sizeof pathbuf), why);
  sg_conn_charge(c, 5, "malformed requests");
}

/* A PROTOCOL_ERROR reset sparkgate did not ask for: nghttp2 sends it
 * straight away, with no callback, for a body that does not agree with
 * its content-length. */
static void on_library_reset(sg_conn *c, int32_t stream_id) {
  sg_stream *s = nghttp2_session_get_stream_user_data(c->session, stream_id);
  if (s == NULL || s->rejected || s->header_overflow)
    return;
  char why[128];
  snprintf(why, sizeof why, "the request body does not agree with its content-length "
           "(reset after %llu bytes)", (unsigned long long)s->bytes_in);
  reject_library_reset(c, s, why);
}

static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame,
                         void *user) {
  sg_conn *c = user;
  if ((frame->hd.type == NGHTTP2_HEADERS || frame->hd.type == NGHTTP2_DATA) &&
      (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
    sg_stream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (s != NULL && s->early_reset && !s->req_eof) {
      /* The response is out; the request never ended: stop the client. */
      s->early_reset = false;
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                NGHTTP2_NO_ERROR);
    }
  }
  if (frame->hd.type == NGHTTP2_DATA && frame->hd.length > 0 &&
      c->window_update_credits < SG_CONN_ABUSE_BURST)
    c->window_update_credits += 2; /* the stream's update and the connection's */
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
    /* A connection error nghttp2 found: it ends the connection without
     * an error from mem_recv, and the calls still open are cut by it. */
    set_close_reason(c, "sent GOAWAY", nghttp2_http2_strerror(frame->goaway.error_code));
    /* nghttp2 says why in the GOAWAY's debug data ("DATA: stream in
     * idle"): the client is told, so is the operator. */
    sg_info("conn=%llu peer=%s: sent GOAWAY %s (last stream %d)%s%.*s",
            (unsigned long long)c->id, c->peer,
            nghttp2_http2_strerror(frame->goaway.error_code),
            frame->goaway.last_stream_id, frame->goaway.opaque_data_len > 0 ? ": " : "",
            (int)(frame->goaway.opaque_data_len > 200 ? 200 : frame->goaway.opaque_data_len),
            (const char *)frame->goaway.opaque_data);
  }
  if (frame->hd.type == NGHTTP2_RST_STREAM &&
      frame->rst_stream.error_code == NGHTTP2_PROTOCOL_ERROR)
    on_library_reset(c, frame->hd.stream_id);
  return 0;
}

/* A response's HEADERS or trailers nghttp2 could not pack (over the block
 * limit): the client would wait for a status that never comes. The stream
 * is reset instead. */
static int on_frame_not_send(nghttp2_session *session, const nghttp2_frame *frame,
                             int lib_error_code, void *user) {
  sg_conn *c = user;
  /* Only a block nghttp2 cannot pack; not a session that is closing. */
  if (frame->hd.type != NGHTTP2_HEADERS ||
      (lib_error_code != NGHTTP2_ERR_FRAME_SIZE_ERROR &&
       lib_error_code != NGHTTP2_ERR_HEADER_COMP))
    return 0;
  sg_stream *s = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
  sg_warn("conn=%llu stream=%d peer=%s: cannot send the response headers: %s: "
          "stream reset (INTERNAL_ERROR)",
          (unsigned long long)c->id, frame->hd.stream_id, c->peer,
          nghttp2_strerror(lib_error_code));
  if (s != NULL) {
    s->rejected = true;
    s->grpc_status = -1; /* the client gets none (access log: null) */
    snprintf(s->reason, sizeof s->reason, "the response headers could not be sent: %s",
             nghttp2_strerror(lib_error_code));
  }
  nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                            NGHTTP2_INTERNAL_ERROR);
  return 0;
}

static int send_data(nghttp2_session *session, nghttp2_frame *frame,
                     const uint8_t *framehd, size_t length,
                     nghttp2_data_source *source, void *user) {
  (void)session;
  sg_stream *s = source->ptr;
  return sg_h2io_send_data(user, frame, framehd, length, s->resp_body, NULL);
}

static int on_invalid_frame_recv(nghttp2_session *session,
                                 const nghttp2_frame *frame, int lib_error,
                                 void *user) {
  sg_conn *c = user;
  /* Only the two stream-level errors reset the stream; for the others
   * (a HEADERS on a closed stream) nghttp2 ends the connection. */
  bool stream_error = lib_error == NGHTTP2_ERR_HTTP_HEADER ||
                      lib_error == NGHTTP2_ERR_HTTP_MESSAGING;
  sg_stream *s = frame->hd.type == NGHTTP2_HEADERS && stream_error
                     ? nghttp2_session_get_stream_user_data(session, frame->hd.stream_id)
                     : NULL;
  if (s != NULL && !s->rejected && !s->header_overflow) {
    char why[128];
    if (c->worker->bad_header[0] != '\0')
      snprintf(why, sizeof why, "invalid header field '%s'", c->worker->bad_header);
    else
      snprintf(why, sizeof why, "%s", nghttp2_strerror(lib_error));
    c->worker->bad_header[0] = '\0';
    reject_library_reset(c, s, why);
    return 0;
  }
  c->worker->bad_header[0] = '\0';
  sg_conn_charge(c, 5, "invalid frames");
  sg_info("conn=%llu peer=%s: invalid frame (type %u, stream %d): %s",
          (unsigned long long)c->id, c->peer, frame->hd.type,
          frame->hd.stream_id, nghttp2_strerror(lib_error));
  return 0;
}

/* nghttp2's messages about a header field quote its value, and that value
 * may be a bearer token: only the name is kept (for the reset that
 * follows) and logged. */
static int on_error(nghttp2_session *session, int lib_error_code,
                    const char *msg, size_t len, void *user) {
  (void)session;
  (void)lib_error_code;
  sg_conn *c = user;
  static const char name_tag[] = ", name: [", value_tag[] = "], value: [";
  const char *name = memmem(msg, len, name_tag, sizeof name_tag - 1);
  if (name == NULL) {
    sg_info("conn=%llu peer=%s: protocol error: %.*s", (unsigned long long)c->id,
            c->peer, (int)(len > 300 ? 300 : len), msg);
    return 0;
  }
  size_t head = (size_t)(name - msg);
  name += sizeof name_tag - 1;
  const char *end = memmem(name, len - (size_t)(name - msg), value_tag, sizeof value_tag - 1);
  size_t nlen = end != NULL ? (size_t)(end - name) : 0;
  char *bad = c->worker->bad_header;
  snprintf(bad, sizeof c->worker->bad_header, "%.*s", (int)nlen, name);
  /* A field nghttp2 drops (and the call goes on) is a debug matter; one it
   * resets the stream for is logged with the call (on_invalid_frame_recv). */
  sg_debug("conn=%llu peer=%s: %.*s: header field '%s' (value not logged)",
           (unsigned long long)c->id, c->peer, (int)head, msg, bad);
  return 0;
}

/* Built once and shared: nghttp2 copies the struct into every session. */
static nghttp2_session_callbacks *server_cbs;
static pthread_once_t server_cbs_once = PTHREAD_ONCE_INIT;

static void server_callbacks_init(void) {
  nghttp2_session_callbacks *cbs;
  if (nghttp2_session_callbacks_new(&cbs) != 0)
    return;
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback2(cbs, on_header);
  nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, on_begin_frame);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, on_invalid_frame_recv);
  nghttp2_session_callbacks_set_error_callback2(cbs, on_error);
  nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
  nghttp2_session_callbacks_set_on_frame_not_send_callback(cbs, on_frame_not_send);
  nghttp2_session_callbacks_set_send_callback(cbs, sg_h2io_send);
  nghttp2_session_callbacks_set_send_data_callback(cbs, send_data);
  server_cbs = cbs;
}

static nghttp2_session_callbacks *server_callbacks(void) {
  pthread_once(&server_cbs_once, server_callbacks_init);
  return server_cbs;
}

/* ---- I/O ---------------------------------------------------------------- */

/* Streams whose responses waited for the output to drain go on. */
static void resume_held_data(void *arg) {
  sg_conn *c = arg;
  for (sg_list *n = c->streams.next; n != &c->streams; n = n->next) {
    sg_stream *s = SG_CONTAINER_OF(n, sg_stream, conn_link);
    if (s->resp_held) {
      s->resp_held = false;
      nghttp2_session_resume_data(c->session, s->id);
    }
  }
}

/* Moves frames from nghttp2 to the socket until the output buffer holds
 * the high-water mark; the write callback resumes below the low mark.
 * Returns true when it freed the connection. */
static bool conn_flush(sg_conn *c) {
  if (c->session == NULL || c->freeing)
    return false;
  struct evbuffer *out = bufferevent_get_output(c->bev);
  bool more;
  int rv = sg_h2io_flush_rounds(&c->io, c->session, resume_held_data, c, &more);
  if (rv == 0 && more)
    sg_conn_schedule_send(c);
  if (rv != 0) {
    sg_conn_close_now(c, nghttp2_strerror(rv));
    return true;
  }
  bool want_write = nghttp2_session_want_write(c->session);
  if (!want_write && !nghttp2_session_want_read(c->session))
    c->closing = true;
  /* A closing connection goes once its last bytes are written; when the
   * flush wrote them itself (write-through), the bufferevent has nothing
   * to write and will not call on_write to say so. */
  if (c->closing && !want_write && evbuffer_get_length(out) == 0) {
    conn_free(c);
    return true;
  }
  return false;
}

static void on_send_ev(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_conn *c = arg;
  sg_worker *w = c->worker;
  uint64_t held = sg_worker_clock_hold(w);
  c->send_scheduled = false;
  conn_flush(c);
  sg_worker_clock_release(w, held);
}

/* Called several times per call: a flag is cheaper than event_active's
 * walk through the base's queues. */
void sg_conn_schedule_send(sg_conn *c) {
  if (c != NULL && !c->freeing && !c->send_scheduled) {
    c->send_scheduled = true;
    event_active(c->send_ev, EV_WRITE, 0);
  }
}

/* TLS records the socket's last read brought (the listener reads ahead,
 * several records per read) but libevent left in OpenSSL: it reads one
 * record per wakeup, and the socket will not wake it for bytes already
 * read. Its read event, run by hand, takes the next. */
static void read_buffered_records(sg_conn *c) {
  if (c->ssl != NULL && !c->closing && SSL_has_pending(c->ssl))
    event_active(&c->bev->ev_read, EV_READ, 1);
}

static void read_input(sg_conn *c, struct evbuffer *in);

static void on_read(struct bufferevent *bev, void *arg) {
  sg_conn *c = arg;
  sg_worker *w = c->worker;
  uint64_t held = sg_worker_clock_hold(w);
  read_input(c, bufferevent_get_input(bev));
  sg_worker_clock_release(w, held); /* c may be gone */
}

static void read_input(sg_conn *c, struct evbuffer *in) {
  /* A closing connection reads nothing more: after a fatal error nghttp2
   * stopped in the middle of a frame, and the same bytes fed again would
   * be parsed out of step (a SETTINGS flood read as DATA on stream 0). */
  if (c->closing) {
    evbuffer_drain(in, evbuffer_get_length(in));
    return;
  }
  /* Feed nghttp2 straight from libevent's chain segments: no pullup copy. */
  for (;;) {
    struct evbuffer_iovec vec[8];
    int nvec = evbuffer_peek(in, -1, NULL, vec, 8);
    if (nvec <= 0)
      break;
    size_t total = 0;
    for (int i = 0; i < nvec && i < 8; i++) {
      ssize_t rv = nghttp2_session_mem_recv(c->session, vec[i].iov_base,
                                            vec[i].iov_len);
      if (rv < 0) {
        if (rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC && c->ssl == NULL && vec[i].iov_len > 0 &&
            ((const uint8_t *)vec[i].iov_base)[0] == 0x16)
          /* A TLS record (handshake) where the preface should be. */
          sg_info("conn=%llu peer=%s: closing: a TLS ClientHello on cleartext (h2c) "
                  "listener %s: the client uses TLS; it should connect without "
                  "it (PySpark: no use_ssl), or to a TLS listener",
                  (unsigned long long)c->id, c->peer, c->listener->name);
        else
          sg_info("conn=%llu peer=%s: closing: %s", (unsigned long long)c->id,
                  c->peer, nghttp2_strerror((int)rv));
        set_close_reason(c, "protocol error:", nghttp2_strerror((int)rv));
        evbuffer_drain(in, evbuffer_get_length(in));
        /* On these floods nghttp2 stops at once and says nothing: tell the
         * client why before closing. */
        if (rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS || rv == NGHTTP2_ERR_FLOODED)
          write_final_goaway(c, NGHTTP2_ENHANCE_YOUR_CALM);
        /* Let nghttp2 queue its GOAWAY for the protocol error, then go. */
        if (conn_flush(c))
          return;
        c->closing = true;
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
          conn_free(c);
        return;
      }
      total += (size_t)rv;
    }
    evbuffer_drain(in, total);
  }
  if (!conn_flush(c))
    read_buffered_records(c);
}

static void on_write(struct bufferevent *bev, void *arg) {
  sg_conn *c = arg;
  if (c->closing) {
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
      conn_free(c);
    return;
  }
  conn_flush(c);
}

static int start_session(sg_conn *c) {
  const sg_config *cfg = c->rt->config;
  c->h2mem = sg_h2mem_session_new(c->worker->h2mem);
  nghttp2_option *opt;
  if (c->h2mem == NULL || nghttp2_option_new(&opt) != 0)
    return -1;
  /* Window credit goes back to the client only when the upstream has taken
   * the bytes: that is the whole of our memory bound. */
  nghttp2_option_set_no_auto_window_update(opt, 1);
  /* What a backend may send us, we must be able to pass on: at nghttp2's
   * default of 64 KiB, larger response headers or trailers were dropped
   * and the call hung without a status. */
  nghttp2_option_set_max_send_header_block_length(opt, SG_RESPONSE_MAX_HEADER_LIST_BYTES);
  /* Debian's 1.52.0-1+deb12u3 carries the rapid-reset and CONTINUATION
   * limits; make them explicit. The CONTINUATION cap leaves room for the
   * largest header list we accept in 16 KiB frames (an HPACK block is no
   * larger than the list it decodes to) and 8 more: at a flat 8, a list
   * over 144 KiB ended the connection whatever max_header_list_bytes said,
   * and grpcio reported UNAVAILABLE, which PySpark retries. */
  nghttp2_option_set_stream_reset_rate_limit(opt, 1000, 33);
  nghttp2_option_set_max_continuations(opt, cfg->max_header_list_bytes / 16384 + 8);
  int rv = nghttp2_session_server_new3(&c->session, server_callbacks(), c, opt,
                                       sg_h2mem_session_nghttp2(c->h2mem));
  sg_h2mem_session_created(c->h2mem);
  nghttp2_option_del(opt);
  if (rv != 0)
    return -1;
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, cfg->max_concurrent_streams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, cfg->stream_window_bytes},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, cfg->max_header_list_bytes},
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      /* gRPC calls need no RFC 7540 priority tree: nghttp2 then keeps no
       * closed streams for it and schedules more simply. */
      {NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES, 1},
  };
  if (nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, iv,
                              sizeof iv / sizeof iv[0]) != 0)
    return -1;
  if (nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0,
                                            (int32_t)cfg->connection_window_bytes) != 0)
    return -1;
  return 0;
}

/* TLS has already verified the chain (a certificate that fails
 * verification fails the handshake); here we only read what it says. */
static int read_client_certificate(sg_conn *c) {
  X509 *cert = SSL_get0_peer_certificate(c->ssl);
  if (cert == NULL)
    return 0;
  c->has_cert = true;
  char identity[SG_IDENTITY_MAX_BYTES + 1];
  const char *reason = NULL;
  if (sg_identity_from_cert(cert, c->listener->auth.client_identity, identity,
                            sizeof identity, &reason) == 0) {
    c->cert_identity = strdup(identity);
    if (c->cert_identity == NULL)
      return -1;
  } else {
    c->cert_identity_reason = reason;
  }
  if (sg_identity_cert_thumbprint(cert, c->cert_thumbprint,
                                  sizeof c->cert_thumbprint) != 0)
    return -1;
  /* Every verified certificate gets its x-forwarded-client-cert: one with
   * many names gets a bigger buffer, never a call without the header. */
  char xfcc[4096];
  if (sg_identity_xfcc(cert, xfcc, sizeof xfcc) == 0) {
    c->xfcc = strdup(xfcc);
    return c->xfcc == NULL ? -1 : 0;
  }
  c->xfcc = malloc(SG_XFCC_MAX_BYTES);
  if (c->xfcc == NULL)
    return -1;
  if (sg_identity_xfcc(cert, c->xfcc, SG_XFCC_MAX_BYTES) != 0)
    return -2;
  char *fit = realloc(c->xfcc, strlen(c->xfcc) + 1);
  if (fit != NULL)
    c->xfcc = fit;
  return 0;
}

/* 1 when the connection's client certificate (if any) verifies under
 * |rt|'s listener settings, 0 when not (|*why|), -1 out of memory. */
static int certificate_verdict(sg_conn *c, sg_runtime *rt, const char **why) {
  const sg_listener_config *l = &rt->config->listeners[c->listener_index];
  SSL_CTX *ctx = rt->listener_tls[c->listener_index];
  if (!c->has_cert || ctx == NULL || l->client_cert_mode == SG_CLIENT_CERT_NONE)
    return 1; /* certificates no longer count there */
  return sg_tls_reverify_client(ctx, c->ssl, why);
}

static void on_established(sg_conn *c) {
  if (c->ssl != NULL && !sg_tls_alpn_is_h2(c->ssl)) {
    sg_info("conn=%llu peer=%s: rejected: client did not negotiate ALPN h2",
            (unsigned long long)c->id, c->peer);
    count_tls_failure(c, SG_TLS_FAIL_NO_H2);
    conn_free(c);
    return;
  }
  int cert_rv = c->ssl != NULL ? read_client_certificate(c) : 0;
  if (cert_rv == -2) {
    sg_warn("conn=%llu peer=%s: rejected: the client certificate's "
            "x-forwarded-client-cert would exceed %u bytes (too many names)",
            (unsigned long long)c->id, c->peer, (unsigned)SG_XFCC_MAX_BYTES);
    count_tls_failure(c, SG_TLS_FAIL_CERT_VERIFY);
    conn_free(c);
    return;
  }
  if (cert_rv != 0) {
    sg_error("conn=%llu peer=%s: cannot read the client certificate (out of memory)",
             (unsigned long long)c->id, c->peer);
    conn_free(c);
    return;
  }
  /* A reload while the handshake ran re-checked the connections open then,
   * not this one (no certificate yet): its certificate was verified under
   * the configuration of its accept, which may trust what is now revoked. */
  const char *why = NULL;
  if (c->ssl != NULL && c->rt != c->worker->current->rt &&
      (cert_rv = certificate_verdict(c, c->worker->current->rt, &why)) != 1) {
    sg_info("conn=%llu peer=%s: rejected: client certificate refused under the "
            "reloaded configuration: %s", (unsigned long long)c->id, c->peer,
            cert_rv == 0 && why != NULL ? why : "cannot check it: out of memory");
    count_tls_failure(c, SG_TLS_FAIL_CERT_VERIFY);
    conn_free(c);
    return;
  }
  if (start_session(c) != 0) {
    sg_error("conn=%llu peer=%s: cannot create HTTP/2 session (out of memory)",
             (unsigned long long)c->id, c->peer);
    conn_free(c);
    return;
  }
  c->established = true;
  c->abuse_tokens_ms = (uint64_t)SG_CONN_ABUSE_BURST * 1000u;
  c->abuse_last_ms = now_ms();
  /* A peer that takes nothing we write for this long is gone or hostile
   * (slow read): libevent's write timeout runs only while output waits. */
  uint32_t stall = c->rt->config->write_stall_timeout_ms;
  struct timeval wtv = {stall / 1000, (suseconds_t)(stall % 1000) * 1000};
  bufferevent_set_timeouts(c->bev, NULL, &wtv);
  evtimer_del(c->timer);
  /* Until the client's preface and SETTINGS arrive, the handshake deadline
   * still applies: a client that connects and says nothing is slowloris. */
  set_timer_ms(c, c->rt->config->tls_handshake_timeout_ms);
  sg_debug("conn=%llu peer=%s: established (%s)", (unsigned long long)c->id,
           c->peer, c->ssl != NULL ? SSL_get_version(c->ssl) : "h2c");
  if (c->worker->draining)
    sg_conn_start_drain(c);
  /* The client's first frames may have come with its last handshake
   * message, in the same read. */
  if (!conn_flush(c))
    read_buffered_records(c);
}

/* A client gone before its TLS handshake ended: |sock_err| its socket's
 * error, 0 for an end of file. */
static void handshake_abandoned(sg_conn *c, int sock_err) {
  bool reset = sock_err == ECONNRESET || sock_err == EPIPE || sock_err == ECONNABORTED ||
               sock_err == ETIMEDOUT;
  if (reset)
    sg_info("conn=%llu peer=%s: TLS handshake failed: the client reset the "
            "connection (%s)", (unsigned long long)c->id, c->peer,
            evutil_socket_error_to_string(sock_err));
  else
    sg_info("conn=%llu peer=%s: TLS handshake failed: the client closed the "
            "connection", (unsigned long long)c->id, c->peer);
  count_tls_failure(c, SG_TLS_FAIL_CLOSED);
}

static void on_event(struct bufferevent *bev, short events, void *arg) {
  (void)bev;
  sg_conn *c = arg;
  if (events & BEV_EVENT_CONNECTED) {
    on_established(c);
    return;
  }
  if (events & BEV_EVENT_EOF) {
    if (!c->established)
      handshake_abandoned(c, 0);
    else
      log_peer_closed(c, "end of stream");
  } else if (events & BEV_EVENT_ERROR) {
    char err[256] = "";
    unsigned long e = c->ssl != NULL ? bufferevent_get_openssl_error(c->bev) : 0;
    if (e != 0 && !c->established &&
        (ERR_GET_LIB(e) == 0 || ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING) &&
        SSL_get_verify_result(c->ssl) == X509_V_OK) {
      /* libevent's SSL_ERROR_SYSCALL (5) or an end of file: the client went
       * away (a load balancer's TCP check, a killed client). */
      handshake_abandoned(c, EVUTIL_SOCKET_ERROR());
    } else if (e != 0) {
      ERR_error_string_n(e, err, sizeof err);
      long vr = SSL_get_verify_result(c->ssl);
      if (!c->established && vr == X509_V_ERR_APPLICATION_VERIFICATION) {
        sg_info("conn=%llu peer=%s: TLS handshake failed: certificate verify "
                "failed: client certificate refused: it is over %d bytes (DER)",
                (unsigned long long)c->id, c->peer, SG_TLS_CLIENT_CERT_MAX_BYTES);
        count_tls_failure(c, SG_TLS_FAIL_CERT_VERIFY);
      } else if (!c->established && vr != X509_V_OK) {
        /* Say why the client certificate was refused: expired, revoked
         * and unknown issuer all read "certificate verify failed". */
        sg_info("conn=%llu peer=%s: TLS handshake failed: certificate verify "
                "failed: client certificate refused: %s",
                (unsigned long long)c->id, c->peer, X509_verify_cert_error_string(vr));
        count_tls_failure(c, SG_TLS_FAIL_CERT_VERIFY);
      } else if (!c->established &&
                 ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
        sg_info("conn=%llu peer=%s: TLS handshake failed: listener %s requires a "
                "client certificate and the client sent none",
                (unsigned long long)c->id, c->peer, c->listener->name);
        count_tls_failure(c, SG_TLS_FAIL_CERT_VERIFY);
      } else if (!c->established &&
                 ERR_GET_REASON(e) == SSL_R_NO_APPLICATION_PROTOCOL) {
        sg_info("conn=%llu peer=%s: TLS handshake failed: the client does not "
                "offer ALPN h2 (gRPC needs HTTP/2)",
                (unsigned long long)c->id, c->peer);
        count_tls_failure(c, SG_TLS_FAIL_NO_H2);
      } else if (!c->established && (ERR_GET_REASON(e) == SSL_R_WRONG_VERSION_NUMBER ||
                                      ERR_GET_REASON(e) == SSL_R_HTTP_REQUEST)) {
        sg_info("conn=%llu peer=%s: TLS handshake failed: the client does not "
                "speak TLS (cleartext HTTP/2 or HTTP/1.1?) on TLS listener %s: it "
                "should connect with TLS (PySpark: sc://HOST:PORT/;use_ssl=true)",
                (unsigned long long)c->id, c->peer, c->listener->name);
        count_tls_failure(c, SG_TLS_FAIL_PROTOCOL);
      } else if (!c->established) {
        sg_info("conn=%llu peer=%s: TLS handshake failed: %s",
                (unsigned long long)c->id, c->peer, err);
        count_tls_failure(c, SG_TLS_FAIL_PROTOCOL);
      }
      else /* most clients just close the socket without close_notify */
        sg_debug("conn=%llu peer=%s: TLS error: %s", (unsigned long long)c->id,
                 c->peer, err);
    } else if (!c->established) {
      sg_info("conn=%llu peer=%s: TLS handshake failed: %s",
              (unsigned long long)c->id, c->peer,
              errno != 0 ? strerror(errno) : "connection closed");
      count_tls_failure(c, SG_TLS_FAIL_CLOSED);
    } else {
      log_peer_closed(c, errno != 0 ? strerror(errno) : "socket error");
    }
  } else if (events & BEV_EVENT_TIMEOUT) {
    sg_info("conn=%llu peer=%s: closed: the client read nothing for %u ms "
            "(write stall)",
            (unsigned long long)c->id, c->peer, c->rt->config->write_stall_timeout_ms);
    set_close_reason(c, "write stall (the client read nothing)", NULL);
  }
  conn_free(c);
}

static void on_timer(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_conn *c = arg;
  if (!c->established) {
    sg_info("conn=%llu peer=%s: closed: TLS handshake not finished in %u ms",
            (unsigned long long)c->id, c->peer,
            c->rt->config->tls_handshake_timeout_ms);
    count_tls_failure(c, SG_TLS_FAIL_TIMEOUT);
    conn_free(c);
    return;
  }
  if (!c->got_settings) {
    if (c->draining) /* the drain's short grace, not the handshake deadline */
      sg_info("conn=%llu peer=%s: closed: draining, and the client had not sent "
              "its HTTP/2 preface and SETTINGS", (unsigned long long)c->id, c->peer);
    else
      sg_info("conn=%llu peer=%s: closed: no HTTP/2 preface and SETTINGS within %u ms",
              (unsigned long long)c->id, c->peer, c->rt->config->tls_handshake_timeout_ms);
    conn_free(c);
    return;
  }
  if (c->trim_pending) {
    trim_idle(c);
    return;
  }
  if (c->draining && !c->goaway_sent) {
    c->goaway_sent = true;
    nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                          nghttp2_session_get_last_proc_stream_id(c->session),
                          NGHTTP2_NO_ERROR, NULL, 0);
    conn_flush(c);
    return;
  }
  /* Not after a GOAWAY of another kind (abuse): one is the last word. */
  if (c->n_streams == 0 && !c->draining && !c->goaway_sent && !c->closing) {
    sg_debug("conn=%llu peer=%s: idle for %u ms, closing",
             (unsigned long long)c->id, c->peer, c->rt->config->idle_timeout_ms);
    c->draining = true;
    c->goaway_sent = true;
    nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                          nghttp2_session_get_last_proc_stream_id(c->session),
                          NGHTTP2_NO_ERROR, NULL, 0);
    conn_flush(c);
  }
}

/* ---- lifecycle ---------------------------------------------------------- */

/* Client connections open in the process, every worker's: max_connections
 * is one total, whichever worker the kernel hands a connection to (shares
 * per worker refused connections on a busy worker while another had room,
 * and let the total pass the cap by up to a connection per worker).
 * Touched at accept and close only. */
static _Atomic uint32_t client_conns_open;

static bool take_conn_slot(uint32_t max) {
  uint32_t n = atomic_load_explicit(&client_conns_open, memory_order_relaxed);
  do {
    if (max > 0 && n >= max)
      return false;
  } while (!atomic_compare_exchange_weak_explicit(&client_conns_open, &n, n + 1,
                                                  memory_order_relaxed,
                                                  memory_order_relaxed));
  return true;
}

static void release_conn_slot(void) {
  atomic_fetch_sub_explicit(&client_conns_open, 1, memory_order_relaxed);
}

/* Closes a connection over max_connections (or, |per_client|,
 * max_connections_per_client) of |cap|, logged and counted. */
static void refuse_at_accept(sg_generation *gen, const sg_listener_config *l, int fd,
                             const struct sockaddr *addr, bool per_client, uint32_t cap) {
  char peer[SG_NETADDR_TEXT_MAX];
  sg_netaddr_format(addr, peer, sizeof peer);
  sg_warn("listener %s: refused connection from %s: %s (%u) reached", l->name, peer,
          per_client ? "max_connections_per_client" : "max_connections", cap);
  /* Counted before the close: a client that sees its connection closed
   * and then reads the metrics finds the refusal there. */
  if (gen->metrics != NULL)
    sg_metrics_conn_refused(gen->metrics, per_client);
  evutil_closesocket(fd);
}

void sg_conn_accept(sg_worker *w, size_t listener_index, int fd,
                    const struct sockaddr *addr, int addrlen) {
  (void)addrlen;
  sg_generation *gen = w->current;
  sg_runtime *rt = gen->rt;
  const sg_listener_config *l = &rt->config->listeners[listener_index];
  uint32_t max = rt->config->max_connections;
  if (!take_conn_slot(max)) {
    refuse_at_accept(gen, l, fd, addr, false, max);
    return;
  }
  uint32_t per_client = rt->config->max_connections_per_client;
  sg_client_key key = sg_client_key_of(addr);
  bool counted = false;
  if (!sg_clientcount_take(w->clients, &key, per_client, &counted)) {
    refuse_at_accept(gen, l, fd, addr, true, per_client);
    release_conn_slot();
    return;
  }
  sg_conn *c = calloc(1, sizeof *c);
  if (c == NULL) {
    if (counted)
      sg_clientcount_release(w->clients, &key);
    evutil_closesocket(fd);
    release_conn_slot();
    return;
  }
  c->client = key;
  c->client_counted = counted;
  c->worker = w;
  c->gen = gen;
  c->rt = rt;
  c->listener = l;
  c->listener_index = listener_index;
  c->id = ++w->next_conn_id * 256 + w->index;
  sg_netaddr_format(addr, c->peer, sizeof c->peer);
  sg_list_init(&c->streams);

  sg_tcpopt_apply(fd, rt->config->tcp_keepalive_ms, rt->config->write_stall_timeout_ms);

  const int bev_opts = BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS;
  if (l->insecure) {
    c->bev = bufferevent_socket_new(w->base, fd, bev_opts);
  } else {
    c->ssl = SSL_new(rt->listener_tls[listener_index]);
    if (c->ssl != NULL)
      c->bev = bufferevent_openssl_socket_new(w->base, fd, c->ssl,
                                              BUFFEREVENT_SSL_ACCEPTING, bev_opts);
    if (c->bev == NULL && c->ssl != NULL)
      SSL_free(c->ssl);
  }
  c->send_ev = event_new(w->base, -1, 0, on_send_ev, c);
  c->timer = evtimer_new(w->base, on_timer, c);
  if (c->bev == NULL || c->send_ev == NULL || c->timer == NULL) {
    sg_error("conn peer=%s: cannot set up connection (out of memory)", c->peer);
    if (c->bev == NULL)
      evutil_closesocket(fd);
    else
      bufferevent_free(c->bev);
    if (c->send_ev != NULL)
      event_free(c->send_ev);
    if (c->timer != NULL)
      event_free(c->timer);
    if (c->client_counted)
      sg_clientcount_release(w->clients, &c->client);
    free(c);
    release_conn_slot();
    return;
  }
  sg_list_push_back(&w->conns, &c->worker_link);
  w->n_conns++;
  sg_generation_conn_opened(gen);
  if (gen->metrics != NULL)
    sg_metrics_conn_accepted(gen->metrics);

  c->io.out = bufferevent_get_output(c->bev);
  c->io.high_water = SG_CONN_OUTPUT_HIGH_WATER;
  c->io.copy_payload = c->ssl != NULL;
  c->io.stage = c->worker->h2_stage;
  c->io.write_fd = fd;
  c->io.write_tls = c->ssl; /* used once established: flushes need a session */
  c->io.write_through = true;
  bufferevent_setcb(c->bev, on_read, on_write, on_event, c);
  bufferevent_setwatermark(c->bev, EV_WRITE, SG_CONN_OUTPUT_LOW_WATER, 0);
  /* libevent reads and writes 16 KiB per syscall by default: at bulk rates
   * that is tens of thousands of syscalls per second for nothing. */
  bufferevent_set_max_single_read(c->bev, SG_IO_CHUNK_BYTES);
  bufferevent_set_max_single_write(c->bev, SG_IO_CHUNK_BYTES);
  if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) != 0) {
    /* Not polled, the socket would sit until a timeout. */
    sg_error("conn peer=%s: cannot set up connection (out of memory)", c->peer);
    conn_free(c);
    return;
  }
  if (l->insecure) {
    on_established(c);
  } else {
    set_timer_ms(c, rt->config->tls_handshake_timeout_ms);
  }
}

void sg_conn_start_drain(sg_conn *c) {
  if (!c->established) {
    /* Nothing of it started: the client retries elsewhere (gRPC 14). */
    sg_info("conn=%llu peer=%s: closed: draining, and its TLS handshake had not "
            "finished", (unsigned long long)c->id, c->peer);
    conn_free(c);
    return;
  }
  if (c->draining)
    return;
  c->draining = true;
  nghttp2_submit_shutdown_notice(c->session);
  evtimer_del(c->timer);
  set_timer_ms(c, SG_CONN_GOAWAY_GRACE_MS);
  conn_flush(c);
}

void sg_conn_recheck_certificate(sg_conn *c, sg_runtime *rt) {
  if (!c->has_cert || c->cert_stale || c->freeing || c->ssl == NULL)
    return;
  const char *why = NULL;
  int ok = certificate_verdict(c, rt, &why);
  if (ok == 1)
    return;
  c->cert_stale = true;
  sg_warn("conn=%llu peer=%s: client certificate no longer verifies under the "
          "reloaded configuration (%s): new calls refused, the connection "
          "closes after its calls in flight",
          (unsigned long long)c->id, c->peer,
          ok == 0 && why != NULL ? why : "cannot check it: out of memory");
  sg_conn_start_drain(c);
}

void sg_conn_close_now(sg_conn *c, const char *reason) {
  if (c->freeing)
    return;
  sg_info("conn=%llu peer=%s: closed: %s", (unsigned long long)c->id, c->peer,
          reason);
  set_close_reason(c, reason, NULL);
  conn_free(c);
}

static void conn_free(sg_conn *c) {
  if (c->freeing)
    return;
  c->freeing = true;
  /* Every stream still here loses its client leg: the upstream side is
   * cancelled so the backend stops working for nobody. */
  while (!sg_list_empty(&c->streams)) {
    sg_stream *s = SG_CONTAINER_OF(c->streams.next, sg_stream, conn_link);
    if (c->close_reason == NULL) {
      sg_stream_on_client_close(s, NGHTTP2_CANCEL); /* the client went away */
      continue;
    }
    if (s->reason[0] == '\0')
      snprintf(s->reason, sizeof s->reason, "connection closed by the proxy: %s%s%s",
               c->close_reason, c->close_detail != NULL ? " " : "",
               c->close_detail != NULL ? c->close_detail : "");
    sg_stream_on_client_close(s, NGHTTP2_INTERNAL_ERROR);
  }
  sg_list_unlink(&c->worker_link);
  if (c->session != NULL)
    nghttp2_session_del(c->session);
  sg_h2mem_session_release(c->h2mem);
  sg_affinity_memo_free(c->affinity_memo);
  bufferevent_free(c->bev); /* frees c->ssl too */
  free(c->cert_identity);
  free(c->xfcc);
  event_free(c->send_ev);
  event_free(c->timer);
  sg_worker *w = c->worker;
  sg_generation *gen = c->gen;
  if (c->client_counted)
    sg_clientcount_release(w->clients, &c->client);
  if (gen->metrics != NULL)
    sg_metrics_conn_closed(gen->metrics);
  free(c);
  w->n_conns--;
  release_conn_slot();
  sg_generation_conn_closed(gen);
}
