/* gRPC on the wire: the replies the proxy makes itself, and which header
 * fields may cross the proxy. */
#ifndef SPARKGATE_GRPC_H
#define SPARKGATE_GRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

typedef enum sg_grpc_status {
  SG_GRPC_OK = 0,
  SG_GRPC_CANCELLED = 1,
  SG_GRPC_UNKNOWN = 2,
  SG_GRPC_INVALID_ARGUMENT = 3,
  SG_GRPC_DEADLINE_EXCEEDED = 4,
  SG_GRPC_PERMISSION_DENIED = 7,
  SG_GRPC_RESOURCE_EXHAUSTED = 8,
  SG_GRPC_UNIMPLEMENTED = 12,
  SG_GRPC_INTERNAL = 13,
  SG_GRPC_UNAVAILABLE = 14,
  SG_GRPC_UNAUTHENTICATED = 16,
} sg_grpc_status;

/* Percent-encodes |msg| as grpc-message requires (bytes outside 0x20-0x7e
 * and '%'). Always NUL-terminates; truncates to |outlen|. */
void sg_grpc_message_encode(const char *msg, char *out, size_t outlen);

/* Submits a trailers-only gRPC response (one HEADERS frame with
 * END_STREAM): :status 200, content-type, grpc-status, grpc-message.
 * When that fails (nghttp2's error code is returned), the stream is reset
 * instead. */
int sg_grpc_submit_error(nghttp2_session *session, int32_t stream_id,
                         sg_grpc_status code, const char *message);

/* Submits trailers (grpc-status, grpc-message) that end a response the
 * proxy cuts short at a message boundary; call from the data provider
 * that returns EOF with NGHTTP2_DATA_FLAG_NO_END_STREAM. */
int sg_grpc_submit_status_trailers(nghttp2_session *session, int32_t stream_id,
                                   sg_grpc_status code, const char *message);

/* Submits a plain HTTP response with no body, for requests that are not
 * gRPC at all (405, 415). */
int sg_http_submit_status(nghttp2_session *session, int32_t stream_id,
                          int http_status);

/* application/grpc, optionally followed by "+codec" or ";params". */
bool sg_grpc_content_type_ok(const uint8_t *value, size_t len);

/* Fields that describe one hop and must never be forwarded (RFC 9113
 * 8.2.2), plus "host", which the proxy folds into :authority. */
bool sg_header_is_hop_by_hop(const uint8_t *name, size_t len);

/* Parses a grpc-timeout value ("1-8 digits" then one of H M S m u n) into
 * milliseconds, rounding down: the budget forwarded upstream is never
 * more than the client's (under 1 ms is 0: expired at once). Returns -1
 * when malformed. */
int sg_grpc_timeout_parse(const uint8_t *value, size_t len, uint64_t *out_ms);

/* Formats |ms| as a grpc-timeout value (at most 8 digits, so large values
 * move to a coarser unit). |out| needs 10 bytes. */
void sg_grpc_timeout_format(uint64_t ms, char *out, size_t outlen);

/* Header names as nghttp2 hands them over are lowercase; compares |name|
 * with a lowercase literal. */
static inline bool sg_header_name_is(const uint8_t *name, size_t len,
                                     const char *lit, size_t litlen) {
  return len == litlen && __builtin_memcmp(name, lit, len) == 0;
}
#define SG_HEADER_IS(name, len, lit) \
  sg_header_name_is((name), (len), (lit), sizeof(lit) - 1)

#endif
