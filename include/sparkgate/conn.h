/* A client connection: a bufferevent (TLS or cleartext h2c) and one
 * nghttp2 server session. Created on accept, after the TLS handshake has
 * chosen ALPN h2; no HTTP/2 state exists before that. */
#ifndef SPARKGATE_CONN_H
#define SPARKGATE_CONN_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/bufferevent.h>
#include <event2/event.h>
#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

#include "sparkgate/clientcount.h"
#include "sparkgate/config.h"
#include "sparkgate/h2io.h"
#include "sparkgate/h2mem.h"
#include "sparkgate/list.h"
#include "sparkgate/netaddr.h"
#include "sparkgate/types.h"

struct sg_conn {
  sg_h2io io;          /* first member: the send callbacks see it as user data */
  sg_list worker_link; /* in worker->conns */
  sg_worker *worker;
  struct sg_generation *gen; /* the generation it was accepted under */
  sg_runtime *rt;            /* gen->rt, for short */
  const sg_listener_config *listener;
  size_t listener_index;
  uint64_t id;
  char peer[SG_NETADDR_TEXT_MAX]; /* "addr:port", for logs */
  sg_client_key client;  /* counted in worker->clients while open */
  bool client_counted;

  struct bufferevent *bev;
  SSL *ssl; /* owned by bev; NULL for h2c */
  nghttp2_session *session;
  struct event *send_ev; /* deferred flush, so sessions never re-enter */
  bool send_scheduled;   /* send_ev is active: no need to activate it again */
  /* The stream whose header block is being received, from its
   * begin_headers to its end or its close: every field of the block
   * finds it here instead of in nghttp2's stream map. */
  struct sg_stream *hdr_stream;
  int32_t hdr_stream_id;
  struct event *timer;   /* handshake, idle and drain deadlines */
  bool idle_timer_set;   /* |timer| is the idle deadline (no stream open) */
  bool trim_pending;     /* ... and first the trim of the session's memory */
  sg_h2mem_session *h2mem; /* the session's view of the worker's allocator */
  struct sg_affinity_memo *affinity_memo; /* its last session's key; NULL */

  /* The client certificate, verified by TLS, read once per connection. */
  bool has_cert;
  char *cert_identity;             /* NULL when the certificate names none */
  const char *cert_identity_reason; /* why not (static text) */
  char cert_thumbprint[48];        /* RFC 8705 x5t#S256 */
  char *xfcc;                      /* x-forwarded-client-cert we build */
  /* A reload's trust store (client CA, CRLs) no longer verifies it: new
   * calls are refused (REFUSED_STREAM, which clients retry on a new
   * connection, whose handshake decides) and the connection drains. */
  bool cert_stale;

  /* Abuse budget: frames that cost us and serve no request (PING,
   * SETTINGS, empty DATA, tiny WINDOW_UPDATE, PRIORITY, requests we had to
   * reset) take from it; it refills slowly; empty means GOAWAY
   * (ENHANCE_YOUR_CALM) and close. */
  uint64_t abuse_tokens_ms; /* tokens scaled by 1000 */
  uint64_t abuse_last_ms;
  /* Small WINDOW_UPDATEs the client may send for free: two per DATA frame
   * we sent (the stream's and the connection's), up to the burst. */
  uint32_t window_update_credits;

  sg_list streams; /* sg_stream.conn_link */
  unsigned n_streams;
  /* The backend-leg windows of its calls (sg_stream.up_window): what
   * backends may send for this connection that its client has not taken.
   * Kept within http2.connection_window_bytes, so that a client that takes
   * nothing pins at most that much (upstream.c). */
  uint64_t resp_granted;

  bool established; /* handshake done, session created */
  bool got_settings; /* the client's preface and first SETTINGS arrived */
  bool draining;    /* shutdown notice sent, final GOAWAY pending or sent */
  bool goaway_sent;
  bool closing;     /* flush what is queued, then free */
  bool freeing;     /* inside sg_conn_free: ignore library callbacks */
  /* Why the proxy ends the connection, when it is the proxy: the calls
   * still open are logged with it instead of as cancelled by the client.
   * Static strings: an idle connection carries two pointers, not text. */
  const char *close_reason;
  const char *close_detail;
};

/* Takes ownership of |fd|. */
void sg_conn_accept(sg_worker *w, size_t listener_index, int fd,
                    const struct sockaddr *addr, int addrlen);

/* Queues a flush of the session at the end of this loop iteration. Other
 * connections' callbacks use it: calling nghttp2_session_send of a session
 * from inside its own callbacks is not allowed. */
void sg_conn_schedule_send(sg_conn *c);

/* A stream opened: the connection is no longer idle. Other deadlines
 * (the final GOAWAY of a drain) keep running. */
void sg_conn_stream_opened(sg_conn *c);

/* SIGTERM: shutdown notice now, final GOAWAY shortly after, close when the
 * last stream ends. */
void sg_conn_start_drain(sg_conn *c);

/* After a reload to |rt|: verifies the connection's client certificate
 * again under the listener's new TLS context; one that no longer verifies
 * marks the connection cert_stale and drains it. */
void sg_conn_recheck_certificate(sg_conn *c, sg_runtime *rt);

/* A frame or event that costs us and serves no request: |cost| tokens from
 * the connection's abuse budget. */
void sg_conn_charge(sg_conn *c, unsigned cost, const char *what);

/* Drops the connection now (drain deadline, fatal error). |reason| must
 * outlive the connection (a string literal or nghttp2_strerror). */
void sg_conn_close_now(sg_conn *c, const char *reason);

#endif
