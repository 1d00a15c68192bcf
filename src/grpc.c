#include "sparkgate/grpc.h"

#include <stdio.h>
#include <string.h>

#define MAKE_NV(n, v, vlen)                                                    \
  {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, (vlen),                      \
   NGHTTP2_NV_FLAG_NO_COPY_NAME}

void sg_grpc_message_encode(const char *msg, char *out, size_t outlen) {
  static const char hex[] = "0123456789ABCDEF";
  size_t o = 0;
  if (outlen == 0)
    return;
  for (const unsigned char *p = (const unsigned char *)msg; *p != '\0'; p++) {
    if (*p >= 0x20 && *p <= 0x7e && *p != '%') {
      if (o + 1 >= outlen)
        break;
      out[o++] = (char)*p;
    } else {
      if (o + 3 >= outlen)
        break;
      out[o++] = '%';
      out[o++] = hex[*p >> 4];
      out[o++] = hex[*p & 0xf];
    }
  }
  out[o] = '\0';
}

/* grpc-status and grpc-message for |code| and |message|, into nva[0..1];
 * the strings live in |f|. */
typedef struct status_fields {
  char status[8];
  char encoded[512];
} status_fields;

static void status_nv(status_fields *f, sg_grpc_status code, const char *message,
                      nghttp2_nv *nva) {
  snprintf(f->status, sizeof f->status, "%d", (int)code);
  sg_grpc_message_encode(message, f->encoded, sizeof f->encoded);
  nva[0] = (nghttp2_nv)MAKE_NV("grpc-status", f->status, strlen(f->status));
  nva[1] = (nghttp2_nv)MAKE_NV("grpc-message", f->encoded, strlen(f->encoded));
}

int sg_grpc_submit_error(nghttp2_session *session, int32_t stream_id,
                         sg_grpc_status code, const char *message) {
  status_fields f;
  nghttp2_nv nva[4] = {
      MAKE_NV(":status", "200", 3),
      MAKE_NV("content-type", "application/grpc", 16),
  };
  status_nv(&f, code, message, nva + 2);
  int rv = nghttp2_submit_response(session, stream_id, nva, 4, NULL);
  if (rv != 0)
    /* Out of memory: a reset still ends the call, where nothing would
     * leave the client waiting. */
    nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id,
                              NGHTTP2_INTERNAL_ERROR);
  return rv;
}

int sg_grpc_submit_status_trailers(nghttp2_session *session, int32_t stream_id,
                                   sg_grpc_status code, const char *message) {
  status_fields f;
  nghttp2_nv nva[2];
  status_nv(&f, code, message, nva);
  return nghttp2_submit_trailer(session, stream_id, nva, 2);
}

int sg_http_submit_status(nghttp2_session *session, int32_t stream_id,
                          int http_status) {
  char status[8];
  snprintf(status, sizeof status, "%d", http_status);
  nghttp2_nv nva[] = {
      MAKE_NV(":status", status, strlen(status)),
      MAKE_NV("allow", "POST", 4),
  };
  /* "allow" belongs to 405 only. */
  size_t n = http_status == 405 ? 2 : 1;
  return nghttp2_submit_response(session, stream_id, nva, n, NULL);
}

bool sg_grpc_content_type_ok(const uint8_t *value, size_t len) {
  static const char base[] = "application/grpc";
  const size_t blen = sizeof base - 1;
  if (len < blen || strncasecmp((const char *)value, base, blen) != 0)
    return false;
  return len == blen || value[blen] == '+' || value[blen] == ';';
}

bool sg_header_is_hop_by_hop(const uint8_t *name, size_t len) {
  return SG_HEADER_IS(name, len, "connection") ||
         SG_HEADER_IS(name, len, "keep-alive") ||
         SG_HEADER_IS(name, len, "proxy-connection") ||
         SG_HEADER_IS(name, len, "transfer-encoding") ||
         SG_HEADER_IS(name, len, "upgrade") ||
         SG_HEADER_IS(name, len, "host") ||
         SG_HEADER_IS(name, len, "http2-settings");
}

int sg_grpc_timeout_parse(const uint8_t *value, size_t len, uint64_t *out_ms) {
  if (len < 2 || len > 9)
    return -1;
  uint64_t n = 0;
  for (size_t i = 0; i + 1 < len; i++) {
    if (value[i] < '0' || value[i] > '9')
      return -1;
    n = n * 10 + (uint64_t)(value[i] - '0');
  }
  switch (value[len - 1]) {
  case 'H': *out_ms = n * 3600000u; break;
  case 'M': *out_ms = n * 60000u; break;
  case 'S': *out_ms = n * 1000u; break;
  case 'm': *out_ms = n; break;
  case 'u': *out_ms = n / 1000u; break;
  case 'n': *out_ms = n / 1000000u; break;
  default: return -1;
  }
  return 0;
}

void sg_grpc_timeout_format(uint64_t ms, char *out, size_t outlen) {
  if (ms <= 99999999u)
    snprintf(out, outlen, "%llum", (unsigned long long)ms);
  else if (ms / 1000u <= 99999999u)
    snprintf(out, outlen, "%lluS", (unsigned long long)(ms / 1000u));
  else if (ms / 60000u <= 99999999u)
    snprintf(out, outlen, "%lluM", (unsigned long long)(ms / 60000u));
  else if (ms / 3600000u <= 99999999u)
    snprintf(out, outlen, "%lluH", (unsigned long long)(ms / 3600000u));
  else
    snprintf(out, outlen, "99999999H");
}
