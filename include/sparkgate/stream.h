/* One proxied gRPC call: the client leg (a stream of a client connection)
 * and the upstream leg (a stream of a pooled backend connection), with the
 * bytes in flight between them.
 *
 * Flow control is end to end: bytes received on one leg are acknowledged
 * to their sender (nghttp2_session_consume) only when the other leg has
 * taken them into a frame, so each direction buffers at most one stream
 * window, whatever the size of the call.
 *
 * Lifetime: the stream is freed when both legs are done. A leg is done when
 * its nghttp2 stream closed or its connection went away; whichever side
 * finishes second frees it. */
#ifndef SPARKGATE_STREAM_H
#define SPARKGATE_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>

#include "sparkgate/grpc.h"
#include "sparkgate/list.h"
#include "sparkgate/sparkmsg.h"
#include "sparkgate/types.h"

/* Header fields as nghttp2 decoded them, kept by reference (no copy). */
typedef struct sg_header {
  nghttp2_rcbuf *name;
  nghttp2_rcbuf *value;
  /* sg_identity_header_action of the name, worked out once by admission
   * (SG_HEADER_UNCLASSIFIED before). */
  uint8_t identity_action;
} sg_header;

#define SG_HEADER_UNCLASSIFIED 0xff

typedef struct sg_header_list {
  sg_header *items; /* |fixed| until it is outgrown, then the heap */
  size_t count;
  size_t capacity;
  size_t bytes; /* RFC 9113 accounting: name + value + 32 per field */
  sg_header *fixed; /* storage owned by the list's owner, or NULL */
  size_t fixed_capacity;
} sg_header_list;

typedef enum sg_upstream_leg_state {
  SG_UPSTREAM_LEG_NONE = 0, /* never attached: nothing to cancel */
  SG_UPSTREAM_LEG_PENDING,  /* waiting for its connection to be ready */
  SG_UPSTREAM_LEG_OPEN,     /* submitted; up_id is valid */
  SG_UPSTREAM_LEG_DONE,     /* closed, reset or its connection is gone */
} sg_upstream_leg_state;

/* The request's well-known fields, found in one walk over req_headers
 * when its header block is complete (the first of each name; NULL when
 * absent). The list no longer changes then, so they stay good until the
 * stream goes. */
typedef struct sg_request_fields {
  const sg_header *method;
  const sg_header *scheme;
  const sg_header *path;
  const sg_header *authority;
  const sg_header *host;
  const sg_header *content_type;
  const sg_header *grpc_timeout;
  const sg_header *authorization;
  unsigned n_authorization;
  /* A name with '_' that aliases an identity header (then rejected). */
  bool spoofed;
} sg_request_fields;

#define SG_STREAM_REQ_HEADER_SLOTS 16
#define SG_STREAM_RESP_HEADER_SLOTS 8
#define SG_STREAM_RESP_TRAILER_SLOTS 4

struct sg_stream {
  sg_list conn_link; /* in conn->streams while the client leg is open */
  sg_list up_link;   /* in upstream->streams or ->pending */

  sg_conn *conn; /* NULL once the client leg is done */
  int32_t id;    /* client-side stream id */
  uint64_t conn_id;

  sg_upstream *up; /* set while the upstream leg is PENDING or OPEN */
  int32_t up_id;
  sg_upstream_leg_state up_state;
  const char *backend_name; /* for logs; owned by the runtime's config */
  const struct sg_backend_config *backend;

  struct sg_generation *gen; /* held: the worker's generation it started on */
  sg_runtime *rt; /* gen's runtime (borrowed: gen is held) */

  /* Who is calling, once authenticated (owned copies, sg_memcache blocks:
   * the connection and the token cache entry may go first). */
  bool authenticated;
  char *identity;          /* NULL on an "auth": "none" listener */
  const char *auth_method; /* static: "jwt", "mtls", "jwt+mtls", "none" */
  char *identity_provider; /* the JWT provider, or NULL */
  struct json_t *claims;   /* the token's claims (ref), for routing */
  const char *tenant_name; /* owned by the runtime's config */
  const struct sg_route_tenant *tenant;
  struct sg_tenant_state *tenant_state; /* counted in its limits while set */
  int method;      /* sg_spark_method, or -1 */
  bool spark_call; /* under /spark.connect.SparkConnectService/ */
  struct sg_sparkmsg *scanner; /* request messages, for Spark calls */
  size_t req_unacked; /* client bytes received and not yet credited */

  /* For the access log and metrics, reported when the client leg ends. */
  uint64_t started_us; /* CLOCK_MONOTONIC */
  uint64_t last_activity_ms; /* bytes either way; for stream_idle_timeout_ms */
  uint64_t bytes_in;  /* request DATA payload from the client */
  uint64_t bytes_out; /* response DATA payload to the client */
  int grpc_status;    /* -1 until known */
  char reason[128];   /* why the proxy refused the call, "" otherwise */
  char session_id[SG_SPARKMSG_SESSION_ID_MAX_BYTES + 1]; /* for the log */
  char *xfcc;              /* x-forwarded-client-cert for the upstream */
  char *upstream_authorization; /* the tenant's credential, "Bearer ..." */

  sg_header_list req_headers;
  sg_request_fields req;  /* valid once req_indexed */
  bool req_indexed;
  sg_header_list req_trailers;
  sg_header_list resp_headers;
  sg_header_list resp_trailers;
  /* Room for a usual gRPC call's fields, so that a call allocates no
   * list; a longer list moves to the heap. */
  sg_header req_header_slots[SG_STREAM_REQ_HEADER_SLOTS];
  sg_header resp_header_slots[SG_STREAM_RESP_HEADER_SLOTS];
  sg_header resp_trailer_slots[SG_STREAM_RESP_TRAILER_SLOTS];

  /* grpc-timeout: enforced here (DEADLINE_EXCEEDED) and forwarded as what
   * is left of it when the upstream leg starts. */
  struct event *deadline;
  uint64_t deadline_at_ms; /* CLOCK_MONOTONIC; 0 when the call has none */
  char grpc_timeout_out[16];

  /* Bytes received on one leg and not yet taken by the other. */
  struct evbuffer *req_body;
  struct evbuffer *resp_body;
  /* Request bytes already sent upstream, kept until the backend answers:
   * a stream the backend refused unprocessed (REFUSED_STREAM, or above
   * the last stream id of its GOAWAY) is sent once more on another
   * connection. NULL while nothing is kept. */
  struct evbuffer *req_replay;
  bool replay_off;  /* too big, answered, or already retried */

  /* gRPC message boundaries of the response, so that a call the proxy
   * ends after its response started (deadline, idle) can still end with
   * a status in trailers, after the last whole message, instead of a
   * reset. */
  uint64_t resp_in_bytes;  /* response DATA payload received */
  uint64_t resp_boundary;  /* offset just after the last whole message */
  uint32_t resp_msg_left;  /* payload bytes left in the current message */
  uint8_t resp_prefix_have; /* bytes of its 5-byte prefix seen */
  uint8_t resp_prefix[5];
  bool resp_streaming;     /* response HEADERS went out with a body to come */
  bool resp_final;         /* the backend's final (non-1xx) headers came */
  bool late_status;        /* end with late_code in trailers at EOF */
  bool idle_reset;         /* reset for a client that took no more */
  /* A data provider deferred for a full output (sg_h2io_hold_data). */
  bool resp_held;
  bool req_held;
  sg_grpc_status late_code;
  char late_message[128];

  bool client_done;
  bool req_headers_done;
  bool req_eof;         /* client sent END_STREAM */
  bool resp_started;    /* response HEADERS submitted to the client */
  bool resp_eof;        /* upstream sent END_STREAM */
  bool rejected;        /* the proxy answered itself; drop what arrives */
  bool header_overflow; /* request headers exceeded the configured cap */
  bool early_reset;     /* send RST_STREAM NO_ERROR after the response ends */
  bool up_headers_unsent; /* the upstream session could not send the request
                             HEADERS: not "refused", no retry */
  /* This call's flow-control window on the backend leg: what the backend
   * may send for it that the client has not taken. Counted in its client
   * connection's resp_granted (sg_stream_set_up_window). */
  uint32_t up_window;
};

/* Header lists a backend may send us (error details ride in trailers): we
 * take them and must be able to send them on to the client. */
#define SG_RESPONSE_MAX_HEADER_LIST_BYTES (256 * 1024)
/* The x-forwarded-client-cert we build, at most: past any header a backend
 * takes (gRPC servers allow 8 KiB of metadata by default), so a
 * certificate that needs more is refused (conn.c), not forwarded without
 * its description. */
#define SG_XFCC_MAX_BYTES 65536u

sg_stream *sg_stream_new(sg_conn *conn, int32_t id);

/* Sets the call's backend-leg window to |window| (0: the leg is over),
 * keeping its client connection's sum (resp_granted) true. */
void sg_stream_set_up_window(sg_stream *s, uint32_t window);
/* Whether the call's window may be |window| with its client connection's
 * windows staying within |budget| (false once the client is gone). */
bool sg_stream_up_window_fits(const sg_stream *s, uint32_t window, uint32_t budget);

/* CLOCK_MONOTONIC in milliseconds, and in microseconds. */
uint64_t sg_monotonic_ms(void);
uint64_t sg_monotonic_us(void);
/* The same clock as of the kernel's last tick (a few ms behind, never
 * ahead), read without the timer: for the activity marks every call sets
 * several times and only second-long timeouts read. */
uint64_t sg_monotonic_coarse_ms(void);

const sg_header *sg_header_list_find(const sg_header_list *list,
                                     const char *name, size_t len);

/* Fills s->req from the complete request header block, and classifies
 * each field's name as an identity header or not (sg_header's
 * identity_action). */
void sg_stream_index_request(sg_stream *s);

/* The request's :path, shortened for a log line. */
const char *sg_stream_path(const sg_stream *s, char *buf, size_t buflen);

/* Refuses the call with a trailers-only gRPC status (or a reset when the
 * response has started) and cancels the upstream leg. |message| goes to
 * the client; |why| (may be NULL) only to the log. */
void sg_stream_reject(sg_stream *s, sg_grpc_status code, const char *message,
                      const char *why);

/* After a complete response, stops a client that is still sending. */
void sg_stream_end_request_early(sg_stream *s);

/* Request bytes of |s| moved to its upstream connection's output. */
void sg_stream_request_bytes_sent(sg_stream *s);

/* Where to keep a copy of the next |length| request bytes sent upstream,
 * or NULL when the call can no longer be retried (see req_replay). */
struct evbuffer *sg_stream_replay_buffer(sg_stream *s, size_t length);

/* The backend refused the upstream leg without processing it: if the call
 * can be sent again (nothing answered, every byte sent still kept, not
 * retried before), puts the kept bytes back in front of the request body
 * and returns true; the caller then attaches the stream again. */
bool sg_stream_prepare_retry(sg_stream *s);

/* Called about once a second: ends the call with DEADLINE_EXCEEDED when no
 * byte moved either way for stream_idle_timeout_ms. */
void sg_stream_check_idle(sg_stream *s, uint64_t now_ms);

/* The client-facing message for an unavailable backend. */
struct sg_route_tenant;
void sg_stream_backend_unavailable_message(const struct sg_route_tenant *t,
                                           const struct sg_backend_config *b,
                                           char *out, size_t outlen);

/* Refuses a request that is not gRPC at all with a bodiless HTTP status. */
void sg_stream_reject_http(sg_stream *s, int status, const char *why);

/* Header collection; |trailer| selects trailers over headers. Returns -1
 * when the list grew past |max_bytes| (the caller resets the stream). */
int sg_header_list_add(sg_header_list *list, nghttp2_rcbuf *name,
                       nghttp2_rcbuf *value, size_t max_bytes);
/* Empties the list; it keeps its |fixed| storage for reuse. */
void sg_header_list_clear(sg_header_list *list);
/* An empty list that fills |fixed| (|fixed_capacity| fields, owned by the
 * caller, may be NULL) before it allocates. */
void sg_header_list_init(sg_header_list *list, sg_header *fixed,
                         size_t fixed_capacity);

/* ---- client leg events (conn.c) ---------------------------------------- */
void sg_stream_on_request_headers(sg_stream *s);
void sg_stream_on_request_data(sg_stream *s, const uint8_t *data, size_t len);
void sg_stream_on_request_end(sg_stream *s);
void sg_stream_on_client_close(sg_stream *s, uint32_t error_code);

/* ---- upstream leg events (upstream.c) ---------------------------------- */
void sg_stream_on_response_headers(sg_stream *s, bool end_stream);
void sg_stream_on_response_data(sg_stream *s, const uint8_t *data, size_t len);
void sg_stream_on_response_end(sg_stream *s);
/* |reason| says why for the log and the client ("connection refused"). */
void sg_stream_on_upstream_close(sg_stream *s, uint32_t error_code,
                                 const char *reason);

#define SG_STREAM_EXTRA_UPSTREAM_HEADERS 10

/* Header arrays handed to nghttp2's submit calls (which copy them): on the
 * caller's stack when they fit, as they nearly always do. */
#define SG_NV_STACK 32
static inline nghttp2_nv *sg_nv_array(nghttp2_nv *stack, size_t n) {
  return n <= SG_NV_STACK ? stack : (nghttp2_nv *)malloc(n * sizeof(nghttp2_nv));
}
static inline void sg_nv_array_free(nghttp2_nv *stack, nghttp2_nv *nva) {
  if (nva != stack)
    free(nva);
}

/* Builds the request header block for the upstream into |nva| (room for
 * req_headers.count + SG_STREAM_EXTRA_UPSTREAM_HEADERS entries); the
 * strings point into |s|. Returns the number of entries. */
size_t sg_stream_request_nv(sg_stream *s, bool upstream_tls, nghttp2_nv *nva);

/* Data providers: each leg reads what the other leg received. */
ssize_t sg_stream_read_request_body(nghttp2_session *session, int32_t id,
                                    uint8_t *buf, size_t length,
                                    uint32_t *data_flags,
                                    nghttp2_data_source *source, void *user);
ssize_t sg_stream_read_response_body(nghttp2_session *session, int32_t id,
                                     uint8_t *buf, size_t length,
                                     uint32_t *data_flags,
                                     nghttp2_data_source *source, void *user);

/* Answers the call with a trailers-only gRPC error, if the response has not
 * started yet; otherwise resets the client stream. Cancels the upstream. */
void sg_stream_fail(sg_stream *s, sg_grpc_status code, const char *message);

#endif
