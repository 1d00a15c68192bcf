/* Writing frames into the output buffer: on TLS (copy_payload) a DATA
 * frame and its header are one piece of one chain, and full frames fill
 * TLS records exactly; on cleartext the payload's chains change hands;
 * the high-water mark makes nghttp2 wait; a kept copy of the payload is
 * exact. */
#include <stdint.h>
#include <string.h>

#include <event2/buffer.h>

#include "check.h"
#include "pattern.h"
#include "sparkgate/h2io.h"

static void fill(struct evbuffer *b, size_t n, uint8_t seed) {
  uint8_t chunk[4096];
  for (size_t done = 0; done < n;) {
    size_t k = n - done < sizeof chunk ? n - done : sizeof chunk;
    pattern_fill(chunk, k, (uint8_t)(seed + done));
    evbuffer_add(b, chunk, k);
    done += k;
  }
}

static int payload_ok(const uint8_t *p, size_t n, uint8_t seed, size_t from) {
  return pattern_same(p, n, (uint8_t)(seed + from));
}

static void test_tls_frames_fill_records(void) {
  sg_h2io io = {.out = evbuffer_new(), .high_water = 1u << 20, .copy_payload = true};
  struct evbuffer *payload = evbuffer_new();
  struct evbuffer *keep = evbuffer_new();
  CHECK(sg_h2io_data_max(&io, 16384) == SG_H2IO_TLS_DATA_MAX);
  CHECK(sg_h2io_data_max(&io, 1000) == 1000);
  enum { FRAMES = 5 };
  fill(payload, FRAMES * (size_t)SG_H2IO_TLS_DATA_MAX, 7);
  nghttp2_frame frame;
  memset(&frame, 0, sizeof frame);
  uint8_t hd[9] = {0x00, 0x3f, 0xf7, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01};
  for (int i = 0; i < FRAMES; i++)
    CHECK(sg_h2io_send_data(&io, &frame, hd, SG_H2IO_TLS_DATA_MAX, payload,
                            i == 0 ? keep : NULL) == 0);
  CHECK(evbuffer_get_length(payload) == 0);
  CHECK(evbuffer_get_length(io.out) == FRAMES * 16384u);
  CHECK(evbuffer_get_length(keep) == SG_H2IO_TLS_DATA_MAX);
  /* libevent writes one TLS record per chain: each chain must hold whole
   * 16 KiB frames, header first. */
  struct evbuffer_iovec v[16];
  int n = evbuffer_peek(io.out, -1, NULL, v, 16);
  CHECK(n >= 1 && n <= 16);
  size_t at = 0;
  for (int i = 0; i < n && i < 16; i++) {
    CHECK(v[i].iov_len % 16384 == 0);
    for (size_t f = 0; f + 16384 <= v[i].iov_len; f += 16384) {
      const uint8_t *p = (const uint8_t *)v[i].iov_base + f;
      CHECK(memcmp(p, hd, 9) == 0);
      CHECK(payload_ok(p + 9, SG_H2IO_TLS_DATA_MAX, 7, at));
      at += SG_H2IO_TLS_DATA_MAX;
    }
  }
  CHECK(at == FRAMES * (size_t)SG_H2IO_TLS_DATA_MAX);
  uint8_t kept[SG_H2IO_TLS_DATA_MAX];
  CHECK(evbuffer_remove(keep, kept, sizeof kept) == (int)sizeof kept);
  CHECK(payload_ok(kept, sizeof kept, 7, 0));
  /* Padding: the pad-length byte, the payload, then zeros. */
  evbuffer_drain(io.out, evbuffer_get_length(io.out));
  fill(payload, 10, 1);
  frame.data.padlen = 4;
  CHECK(sg_h2io_send_data(&io, &frame, hd, 10, payload, NULL) == 0);
  uint8_t padded[9 + 1 + 10 + 3];
  CHECK(evbuffer_get_length(io.out) == sizeof padded);
  evbuffer_remove(io.out, padded, sizeof padded);
  CHECK(padded[9] == 3);
  CHECK(payload_ok(padded + 10, 10, 1, 0));
  CHECK(padded[20] == 0 && padded[21] == 0 && padded[22] == 0);
  /* Above the high-water mark nghttp2 is told to wait. */
  io.high_water = 100;
  fill(io.out, 200, 0);
  fill(payload, 10, 1);
  frame.data.padlen = 0;
  CHECK(sg_h2io_send_data(&io, &frame, hd, 10, payload, NULL) == NGHTTP2_ERR_WOULDBLOCK);
  CHECK(evbuffer_get_length(payload) == 10);
  evbuffer_free(keep);
  evbuffer_free(payload);
  evbuffer_free(io.out);
}

static void test_cleartext_moves_chains(void) {
  sg_h2io io = {.out = evbuffer_new(), .high_water = 1u << 20, .copy_payload = false};
  CHECK(sg_h2io_data_max(&io, 16384) == 16384);
  struct evbuffer *payload = evbuffer_new();
  fill(payload, 20000, 3);
  nghttp2_frame frame;
  memset(&frame, 0, sizeof frame);
  uint8_t hd[9] = {0};
  CHECK(sg_h2io_send_data(&io, &frame, hd, 16384, payload, NULL) == 0);
  CHECK(evbuffer_get_length(payload) == 20000 - 16384);
  CHECK(evbuffer_get_length(io.out) == 9 + 16384);
  uint8_t out[9 + 16384];
  evbuffer_remove(io.out, out, sizeof out);
  CHECK(payload_ok(out + 9, 16384, 3, 0));
  evbuffer_free(payload);
  evbuffer_free(io.out);
}

int main(void) {
  test_tls_frames_fill_records();
  test_cleartext_moves_chains();
  return check_report("h2io");
}
