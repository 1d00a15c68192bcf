/* Streaming scanner and rewriter of Spark Connect request messages inside
 * gRPC length-prefixed framing (one scanner per request stream).
 *
 * Every Spark Connect request carries `session_id` (field 1, string) and
 * `user_context` (field 2: user_id = 1, user_name = 2, anything else, e.g.
 * extensions = 3, is kept). Spark keys sessions by user_id + session_id and
 * believes the user_id written into the body, so the proxy must read, check
 * and (per tenant) enforce or overwrite it in EVERY message of a stream.
 *
 * Feed the request bytes in chunks of any size (DATA frames split gRPC
 * messages anywhere). The scanner walks the top-level fields of each message
 * without buffering payloads; it copies only the 5-byte prefix, the varint in
 * progress, session_id (<= SG_SPARKMSG_SESSION_ID_MAX_BYTES) and user_context
 * (<= SG_SPARKMSG_USER_CONTEXT_MAX_BYTES). Approved bytes go to an output
 * callback as they are scanned, except that the LAST byte of each message is
 * emitted only once that message has been checked: the upstream never holds
 * a complete message the scanner did not approve. After a rejection nothing
 * more is emitted (bytes of the rejected message already emitted are a strict
 * prefix of it; the caller resets the upstream stream).
 *
 * Compressed messages (flag byte 1) are refused ("compressed"): the fields
 * cannot be checked without inflating them, and Spark clients do not
 * compress requests by default.
 *
 * The header window (why a user_context must come early). The gRPC length
 * prefix comes first, yet in rewrite mode the new length depends on the
 * user_context, and routing needs session_id + user_id before the upstream
 * is chosen. Real encoders serialise fields in number order, so fields 1 and
 * 2 lead every Spark message, but any order is valid protobuf. We stay
 * bounded this way: a message body is "decided" after `header_window_bytes`
 * (default 64 KiB) or at its end, whichever comes first.
 *   - rewrite mode, every message: the scanner holds the prefix and the body
 *     bytes (at most the window) until user_context has been read, then emits
 *     the new prefix, the held bytes and the re-encoded user_context in its
 *     original place, and streams the rest through unchanged. If the window
 *     passes (or the message ends) without one, a user_context is inserted
 *     right after the prefix; a user_context that turns up after that point
 *     is rejected with "user_context_not_early".
 *   - first message, every mode: session_id must start within the window
 *     ("session_id_not_early"), and a user_context that starts after the
 *     window is rejected ("user_context_not_early"), because the header was
 *     already reported as known without it.
 * Consequence for the caller: sg_sparkmsg_header_known() turns true, or the
 * scanner rejects, by the time 5 + header_window_bytes bytes (+ at most one
 * user_context, <= 4 KiB + 10) of the stream have been fed, so keeping the
 * output in an evbuffer until then is bounded and cannot deadlock against a
 * stream window larger than that.
 *
 * Typical use on the data path:
 *     sg_sparkmsg_feed(s, data, len, sg_sparkmsg_output_evbuffer, pending);
 *     if rejected: reply grpc-status sg_sparkmsg_reason_grpc_status(r),
 *                  log sg_sparkmsg_error(s), reset the upstream stream;
 *     else if no upstream yet and sg_sparkmsg_header_known(s, &h):
 *                  route on h, open the upstream, move `pending` to it;
 *     at END_STREAM: sg_sparkmsg_finish(s).
 */
#ifndef SPARKGATE_SPARKMSG_H
#define SPARKGATE_SPARKMSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SG_SPARKMSG_PREFIX_BYTES 5
#define SG_SPARKMSG_VARINT_MAX_BYTES 10
#define SG_SPARKMSG_SESSION_ID_MAX_BYTES 128
#define SG_SPARKMSG_USER_CONTEXT_MAX_BYTES 4096
/* The longest identity either source makes: a certificate's (SPIFFE IDs
 * run to 2048 bytes, identity.h) or a token's (jwt.h); stream.c checks. */
#define SG_SPARKMSG_IDENTITY_MAX_BYTES 2048
#define SG_SPARKMSG_ERROR_BYTES 160
#define SG_SPARKMSG_DEFAULT_MAX_MESSAGE_BYTES (128u * 1024u * 1024u)
#define SG_SPARKMSG_DEFAULT_HEADER_WINDOW_BYTES (64u * 1024u)
#define SG_SPARKMSG_MIN_HEADER_WINDOW_BYTES 256u
#define SG_SPARKMSG_MAX_HEADER_WINDOW_BYTES (16u * 1024u * 1024u)

typedef enum sg_sparkmsg_user_mode {
  SG_SPARKMSG_USER_OFF = 0, /* structural checks only */
  SG_SPARKMSG_USER_ENFORCE, /* user_id must equal the identity */
  SG_SPARKMSG_USER_REWRITE, /* the proxy writes the identity into user_id */
} sg_sparkmsg_user_mode;

/* What rewrite mode does with user_context.user_name. */
typedef enum sg_sparkmsg_user_name_mode {
  SG_SPARKMSG_USER_NAME_DROP = 0,
  SG_SPARKMSG_USER_NAME_IDENTITY, /* set it to the identity as well */
} sg_sparkmsg_user_name_mode;

/* Why a stream was rejected. Every reason maps to grpc-status 3
 * INVALID_ARGUMENT except USER_ID_MISMATCH (7 PERMISSION_DENIED) and
 * INTERNAL (13); see sg_sparkmsg_reason_grpc_status(). */
typedef enum sg_sparkmsg_reason {
  SG_SPARKMSG_OK = 0,
  SG_SPARKMSG_BAD_FLAG,               /* "bad_flag": flag byte not 0/1 */
  SG_SPARKMSG_COMPRESSED,             /* "compressed" */
  SG_SPARKMSG_MESSAGE_TOO_LARGE,      /* "message_too_large" */
  SG_SPARKMSG_BAD_VARINT,             /* "bad_varint": > 10 bytes, overflow */
  SG_SPARKMSG_TRUNCATED,              /* "truncated": field cut by msg end */
  SG_SPARKMSG_LENGTH_PAST_END,        /* "length_past_end" */
  SG_SPARKMSG_GROUP_WIRE_TYPE,        /* "group_wire_type": 3 or 4 */
  SG_SPARKMSG_BAD_WIRE_TYPE,          /* "bad_wire_type": 6 or 7 */
  SG_SPARKMSG_FIELD_ZERO,             /* "field_zero" */
  SG_SPARKMSG_MISSING_SESSION_ID,     /* "missing_session_id" */
  SG_SPARKMSG_DUPLICATE_SESSION_ID,   /* "duplicate_session_id" */
  SG_SPARKMSG_BAD_SESSION_ID,         /* "bad_session_id": empty, not UTF-8,
                                         NUL, > 128 bytes, not wire type 2 */
  SG_SPARKMSG_SESSION_ID_CHANGED,     /* "session_id_changed" in a stream */
  SG_SPARKMSG_SESSION_ID_NOT_EARLY,   /* "session_id_not_early" */
  SG_SPARKMSG_DUPLICATE_USER_CONTEXT, /* "duplicate_user_context" */
  SG_SPARKMSG_BAD_USER_CONTEXT,       /* "bad_user_context": malformed */
  SG_SPARKMSG_USER_CONTEXT_TOO_LARGE, /* "user_context_too_large" */
  SG_SPARKMSG_USER_CONTEXT_NOT_EARLY, /* "user_context_not_early" */
  SG_SPARKMSG_DUPLICATE_USER_ID,      /* "duplicate_user_id" */
  SG_SPARKMSG_USER_ID_MISMATCH,       /* "user_id_mismatch" (enforce) */
  SG_SPARKMSG_INCOMPLETE_MESSAGE,     /* "incomplete_message" at finish */
  SG_SPARKMSG_INTERNAL,               /* "internal": output or memory */
} sg_sparkmsg_reason;

typedef struct sg_sparkmsg_options {
  sg_sparkmsg_user_mode user_mode;
  /* enforce/rewrite: the authenticated identity (copied; UTF-8, 1 to
   * SG_SPARKMSG_IDENTITY_MAX_BYTES bytes). Ignored in off mode. */
  const char *identity;
  sg_sparkmsg_user_name_mode user_name_mode; /* rewrite only */
  size_t max_message_bytes;   /* 0 = default 128 MiB; at most UINT32_MAX */
  size_t header_window_bytes; /* 0 = default 64 KiB; see above */
} sg_sparkmsg_options;

/* Receives approved output bytes in order. Returns 0, or -1 to fail the
 * scanner (reason "internal"). */
typedef int (*sg_sparkmsg_output_fn)(void *arg, const uint8_t *data,
                                     size_t len);

/* What the first message of the stream said, for routing and the access
 * log. Pointers stay valid until sg_sparkmsg_free(). */
typedef struct sg_sparkmsg_header {
  const char *session_id; /* 1..128 bytes of UTF-8, no NUL */
  bool user_id_present;
  const char *user_id; /* as the client sent it (before any rewrite);
                          "" when !user_id_present */
} sg_sparkmsg_header;

typedef struct sg_sparkmsg sg_sparkmsg;

/* Returns NULL with a message in err when the options are invalid or memory
 * runs out. */
sg_sparkmsg *sg_sparkmsg_new(const sg_sparkmsg_options *opts, char *err,
                             size_t errlen);
void sg_sparkmsg_free(sg_sparkmsg *s);

/* Scans len bytes and passes approved output to out(out_arg, ...), possibly
 * several times. The destination may change between calls (e.g. a pending
 * evbuffer before routing, the upstream's afterwards). Returns SG_SPARKMSG_OK
 * or the (sticky) rejection reason; after a rejection further calls emit
 * nothing and return the same reason. */
sg_sparkmsg_reason sg_sparkmsg_feed(sg_sparkmsg *s, const uint8_t *data,
                                    size_t len, sg_sparkmsg_output_fn out,
                                    void *out_arg);

/* The client ended the stream: rejects ("incomplete_message") when it ended
 * inside a message. Emits nothing. */
sg_sparkmsg_reason sg_sparkmsg_finish(sg_sparkmsg *s);

/* An sg_sparkmsg_output_fn appending to the struct evbuffer * in arg. */
int sg_sparkmsg_output_evbuffer(void *evbuffer, const uint8_t *data,
                                size_t len);

/* True once the first message's session_id is read and its user_context was
 * read or is known to be absent; fills *out (may be NULL) then. */
bool sg_sparkmsg_header_known(const sg_sparkmsg *s, sg_sparkmsg_header *out);

/* The first message's session_id once it was read whole and valid, even if
 * the scanner then rejected the message (for the log); else NULL. */
const char *sg_sparkmsg_session_id(const sg_sparkmsg *s);

/* Messages approved (and fully emitted) so far. */
uint64_t sg_sparkmsg_messages(const sg_sparkmsg *s);

sg_sparkmsg_reason sg_sparkmsg_reason_of(const sg_sparkmsg *s);
/* Short text for the operational log, "" when not rejected. Never contains
 * field contents. */
const char *sg_sparkmsg_error(const sg_sparkmsg *s);
/* The reason's snake_case name ("user_id_mismatch", ...). */
const char *sg_sparkmsg_reason_name(sg_sparkmsg_reason r);
/* 3 INVALID_ARGUMENT, 7 PERMISSION_DENIED (user_id_mismatch), 13 INTERNAL,
 * 0 for SG_SPARKMSG_OK. */
int sg_sparkmsg_reason_grpc_status(sg_sparkmsg_reason r);

#endif
