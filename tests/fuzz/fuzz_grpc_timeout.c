/* libFuzzer target: the grpc-timeout parser and the grpc-message encoder,
 * both fed bytes straight from a client's (or our own) header fields.
 *
 * The input is used three ways: as a grpc-timeout value, as a message to
 * percent-encode (into a buffer of exactly the size the first byte asks
 * for, so ASan sees any write past it), and as a content-type / header
 * name for the small header predicates. Properties are checked and a
 * violation aborts (libFuzzer reports it as a crash). */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_support.h"
#include "sparkgate/grpc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

static void check_timeout(const uint8_t *data, size_t size) {
  uint64_t ms = 12345;
  int rv = sg_grpc_timeout_parse(data, size, &ms);
  FUZZ_CHECK(rv == 0 || rv == -1);
  if (rv != 0)
    return;
  /* The grammar: 1 to 8 digits and one unit letter. */
  FUZZ_CHECK(size >= 2 && size <= 9);
  for (size_t i = 0; i + 1 < size; i++)
    FUZZ_CHECK(data[i] >= '0' && data[i] <= '9');
  FUZZ_CHECK(memchr("HMSmun", data[size - 1], 6) != NULL);
  /* Rounding down: never more than the client gave; 0 only for a zero
   * budget or one under a millisecond. */
  uint64_t n = 0;
  for (size_t i = 0; i + 1 < size; i++)
    n = n * 10 + (uint64_t)(data[i] - '0');
  char unit = (char)data[size - 1];
  uint64_t per_ms = unit == 'u' ? 1000u : unit == 'n' ? 1000000u : 1u;
  if (per_ms > 1)
    FUZZ_CHECK(ms == n / per_ms);
  else
    FUZZ_CHECK((n != 0) == (ms != 0));
  /* 99999999 hours is the largest value the grammar can name. */
  FUZZ_CHECK(ms <= 99999999ull * 3600000ull);

  /* What we forward is a valid value again, and never more than we got. */
  char out[10];
  sg_grpc_timeout_format(ms, out, sizeof out);
  size_t olen = strnlen(out, sizeof out);
  FUZZ_CHECK(olen < sizeof out);
  uint64_t back = 0;
  FUZZ_CHECK(sg_grpc_timeout_parse((const uint8_t *)out, olen, &back) == 0);
  FUZZ_CHECK(back <= ms);
  if (ms <= 99999999u)
    FUZZ_CHECK(back == ms);
}

static void check_encode(const uint8_t *data, size_t size) {
  if (size == 0)
    return;
  /* Output buffer of exactly 0..1023 bytes, sized by the first two bytes. */
  size_t outlen = size >= 2 ? (((size_t)data[0] << 8) | data[1]) % 1024 : data[0];
  char *msg = malloc(size + 1);
  char *out = malloc(outlen > 0 ? outlen : 1);
  FUZZ_CHECK(msg != NULL && out != NULL);
  memcpy(msg, data, size);
  msg[size] = '\0';
  if (outlen == 0) {
    out[0] = 'x';
    sg_grpc_message_encode(msg, out, 0);
    FUZZ_CHECK(out[0] == 'x'); /* nothing written, not even the NUL */
    free(msg);
    free(out);
    return;
  }
  sg_grpc_message_encode(msg, out, outlen);
  size_t elen = strnlen(out, outlen);
  FUZZ_CHECK(elen < outlen);
  /* Only printable ASCII, '%' only as %XX, and decoding gives back a
   * prefix of the message (truncation happens on whole characters). */
  size_t mlen = strlen(msg), m = 0;
  for (size_t i = 0; i < elen;) {
    unsigned char c = (unsigned char)out[i];
    FUZZ_CHECK(c >= 0x20 && c <= 0x7e);
    unsigned char decoded;
    if (c == '%') {
      FUZZ_CHECK(i + 2 < elen);
      int hi = hexval(out[i + 1]), lo = hexval(out[i + 2]);
      FUZZ_CHECK(hi >= 0 && lo >= 0);
      decoded = (unsigned char)(hi << 4 | lo);
      /* Only bytes that needed it are escaped. */
      FUZZ_CHECK(decoded < 0x20 || decoded > 0x7e || decoded == '%');
      i += 3;
    } else {
      decoded = c;
      i++;
    }
    FUZZ_CHECK(m < mlen && (unsigned char)msg[m] == decoded);
    m++;
  }
  /* Whatever was dropped did not fit: the next character needed more
   * room than was left. */
  if (m < mlen) {
    unsigned char next = (unsigned char)msg[m];
    size_t need = (next >= 0x20 && next <= 0x7e && next != '%') ? 1 : 3;
    FUZZ_CHECK(elen + need >= outlen);
  }
  free(msg);
  free(out);
}

static void check_predicates(const uint8_t *data, size_t size) {
  /* Copies of exactly |size| bytes, so a read past the value is seen. */
  uint8_t *copy = malloc(size > 0 ? size : 1);
  FUZZ_CHECK(copy != NULL);
  memcpy(copy, data, size);
  bool ct = sg_grpc_content_type_ok(copy, size);
  if (ct)
    FUZZ_CHECK(size >= 16 && (size == 16 || copy[16] == '+' || copy[16] == ';'));
  bool hop = sg_header_is_hop_by_hop(copy, size);
  if (hop)
    FUZZ_CHECK(size >= 4 && size <= 17);
  free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  check_timeout(data, size);
  check_encode(data, size);
  check_predicates(data, size);
  return 0;
}
