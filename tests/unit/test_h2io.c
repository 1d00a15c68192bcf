/* Writing frames into the output buffer: on TLS (copy_payload) a DATA
 * frame and its header are one piece of one chain, and full frames fill
 * TLS records exactly; on cleartext the payload's chains change hands;
 * the high-water mark makes nghttp2 wait; a kept copy of the payload is
 * exact; a flush through a stage reaches the output in one append; on
 * cleartext a flush writes to the socket itself when the output is empty,
 * and says when it must run again. */
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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
  /* Above the high-water mark data providers are held, and released
   * once it drains; a frame already made is written all the same (its
   * payload is counted as sent: it must not wait in the other leg's
   * buffer). */
  io.high_water = 100;
  CHECK(!sg_h2io_hold_data(&io) && !io.data_held);
  CHECK(!sg_h2io_release_data(&io));
  fill(io.out, 200, 0);
  CHECK(sg_h2io_hold_data(&io) && io.data_held);
  CHECK(!sg_h2io_release_data(&io) && io.data_held);
  fill(payload, 10, 1);
  frame.data.padlen = 0;
  CHECK(sg_h2io_send_data(&io, &frame, hd, 10, payload, NULL) == 0);
  CHECK(evbuffer_get_length(payload) == 0);
  CHECK(evbuffer_get_length(io.out) == 200 + 9 + 10);
  evbuffer_drain(io.out, evbuffer_get_length(io.out));
  CHECK(sg_h2io_release_data(&io) && !io.data_held);
  CHECK(!sg_h2io_release_data(&io));
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

typedef struct {
  int calls;
  size_t added;
} cb_count;

static void count_adds(struct evbuffer *b, const struct evbuffer_cb_info *info,
                       void *arg) {
  (void)b;
  cb_count *c = arg;
  if (info->n_added > 0) {
    c->calls++;
    c->added += info->n_added;
  }
}

/* A client session with its preface and SETTINGS, and |pings| PINGs
 * queued: 24 + 9 + 17 * pings bytes on the first flush. */
static nghttp2_session *client_with_pings(sg_h2io *io, int pings) {
  nghttp2_session_callbacks *cbs;
  nghttp2_session *session;
  CHECK(nghttp2_session_callbacks_new(&cbs) == 0);
  nghttp2_session_callbacks_set_send_callback(cbs, sg_h2io_send);
  CHECK(nghttp2_session_client_new(&session, cbs, io) == 0);
  nghttp2_session_callbacks_del(cbs);
  CHECK(nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, NULL, 0) == 0);
  for (int i = 0; i < pings; i++) {
    uint8_t opaque[8] = {(uint8_t)i};
    CHECK(nghttp2_submit_ping(session, NGHTTP2_FLAG_NONE, opaque) == 0);
  }
  return session;
}

static void test_flush_through_stage(void) {
  enum { PINGS = 6 };
  const size_t total = 24 + 9 + 17 * PINGS;
  sg_h2io io = {.out = evbuffer_new(), .high_water = 1u << 20, .stage = evbuffer_new()};
  cb_count count = {0};
  evbuffer_add_cb(io.out, count_adds, &count);
  nghttp2_session *session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  /* Every frame, in order, in one append; the stage is left empty. */
  CHECK(evbuffer_get_length(io.out) == total);
  CHECK(count.calls == 1 && count.added == total);
  CHECK(evbuffer_get_length(io.stage) == 0);
  CHECK(!io.staging);
  uint8_t *b = evbuffer_pullup(io.out, -1);
  CHECK(memcmp(b, NGHTTP2_CLIENT_MAGIC, 24) == 0);
  for (int i = 0; i < PINGS; i++) {
    const uint8_t *f = b + 24 + 9 + 17 * i;
    CHECK(f[3] == NGHTTP2_PING && f[9] == (uint8_t)i);
  }
  nghttp2_session_del(session);

  /* A stage already holding bytes (a flush further up the stack) is not
   * touched: the frames go to the output directly. */
  evbuffer_drain(io.out, evbuffer_get_length(io.out));
  count = (cb_count){0};
  evbuffer_add(io.stage, "other", 5);
  session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(evbuffer_get_length(io.out) == total);
  CHECK(count.calls > 1 && count.added == total);
  CHECK(evbuffer_get_length(io.stage) == 5);
  nghttp2_session_del(session);

  /* Past the high-water mark, output and stage counted together, nghttp2
   * waits. */
  evbuffer_drain(io.out, evbuffer_get_length(io.out));
  evbuffer_drain(io.stage, 5);
  io.high_water = 30;
  session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(evbuffer_get_length(io.out) < total);
  CHECK(evbuffer_get_length(io.stage) == 0);
  CHECK(nghttp2_session_want_write(session));
  nghttp2_session_del(session);

  /* What the output held before the flush counts too: at the mark
   * already, nothing is staged. */
  evbuffer_drain(io.out, evbuffer_get_length(io.out));
  evbuffer_add(io.out, "0123456789012345678901234567890123456789", 40);
  session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(evbuffer_get_length(io.out) == 40);
  CHECK(evbuffer_get_length(io.stage) == 0);
  CHECK(io.stopped && nghttp2_session_want_write(session));
  /* Below the mark, the flush goes on until what it staged reaches it. */
  evbuffer_drain(io.out, 25);
  CHECK(sg_h2io_flush(&io, session) == 0);
  size_t sent = evbuffer_get_length(io.out) - 15;
  CHECK(sent > 0 && sent < total);
  CHECK(evbuffer_get_length(io.stage) == 0);
  nghttp2_session_del(session);

  evbuffer_free(io.stage);
  evbuffer_free(io.out);
}

static void count_resume(void *owner) { (*(int *)owner)++; }

/* Reads what the peer of a write-through socket got so far. */
static size_t drain_socket(int fd, uint8_t *to, size_t room) {
  size_t got = 0;
  for (;;) {
    ssize_t n = read(fd, to + got, room - got);
    if (n <= 0)
      return got;
    got += (size_t)n;
  }
}

static void check_pings(const uint8_t *b, int pings) {
  CHECK(memcmp(b, NGHTTP2_CLIENT_MAGIC, 24) == 0);
  for (int i = 0; i < pings; i++) {
    const uint8_t *f = b + 24 + 9 + 17 * i;
    CHECK(f[3] == NGHTTP2_PING && f[9] == (uint8_t)i);
  }
}

static void test_write_through(void) {
  enum { PINGS = 6 };
  const size_t total = 24 + 9 + 17 * PINGS;
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  CHECK(fcntl(sv[0], F_SETFL, O_NONBLOCK) == 0 && fcntl(sv[1], F_SETFL, O_NONBLOCK) == 0);
  uint8_t got[4096];

  /* An empty output: the frames go to the socket, not to the output. */
  sg_h2io io = {.out = evbuffer_new(), .high_water = 1u << 20, .stage = evbuffer_new(),
                .write_through = true, .write_fd = sv[0]};
  nghttp2_session *session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(!sg_h2io_flush_again(&io));
  CHECK(evbuffer_get_length(io.out) == 0 && evbuffer_get_length(io.stage) == 0);
  CHECK(drain_socket(sv[1], got, sizeof got) == total);
  check_pings(got, PINGS);
  nghttp2_session_del(session);

  /* Stopped at the high-water mark, then the write made room: the flush
   * must run again (nothing else would wake the session); run as its
   * owners do, it sends everything, in order. */
  io.high_water = 30;
  session = client_with_pings(&io, PINGS);
  int flushes = 0;
  do {
    CHECK(sg_h2io_flush(&io, session) == 0);
    flushes++;
  } while (sg_h2io_flush_again(&io) && flushes < 100);
  CHECK(flushes > 1);
  CHECK(!nghttp2_session_want_write(session));
  CHECK(evbuffer_get_length(io.out) == 0);
  CHECK(drain_socket(sv[1], got, sizeof got) == total);
  check_pings(got, PINGS);
  nghttp2_session_del(session);

  /* The owners' loop: four flushes at most, then |more| asks for another
   * turn; the held streams are offered a resume before each flush. */
  enum { MANY = 10 };
  session = client_with_pings(&io, MANY);
  bool more = false;
  int resumes = 0;
  io.data_held = true; /* as if a data provider had been held */
  CHECK(sg_h2io_flush_rounds(&io, session, count_resume, &resumes, &more) == 0);
  CHECK(more);        /* 4 rounds of about 30 bytes: frames left */
  CHECK(resumes == 1); /* the mark taken once, then cleared */
  CHECK(!io.data_held);
  for (int i = 0; i < 10 && more; i++)
    CHECK(sg_h2io_flush_rounds(&io, session, count_resume, &resumes, &more) == 0);
  CHECK(!more && !nghttp2_session_want_write(session));
  CHECK(drain_socket(sv[1], got, sizeof got) == 24 + 9 + 17 * MANY);
  check_pings(got, MANY);
  nghttp2_session_del(session);

  /* Bytes already waiting in the output go first: the frames join them
   * there, and the socket gets nothing out of order. */
  io.high_water = 1u << 20;
  evbuffer_add(io.out, "early", 5);
  session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(evbuffer_get_length(io.out) == 5 + total);
  CHECK(drain_socket(sv[1], got, sizeof got) == 0);
  uint8_t *b = evbuffer_pullup(io.out, -1);
  CHECK(memcmp(b, "early", 5) == 0);
  check_pings(b + 5, PINGS);
  nghttp2_session_del(session);
  evbuffer_drain(io.out, evbuffer_get_length(io.out));

  /* A socket that takes part: the rest goes to the output, in order. */
  uint8_t filler[4096];
  memset(filler, 'f', sizeof filler);
  size_t queued_before = 0;
  for (int i = 0; i < 100000; i++) {
    ssize_t n = write(sv[0], filler, sizeof filler);
    if (n <= 0)
      break;
    queued_before += (size_t)n;
  }
  CHECK(queued_before > 0);
  session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(evbuffer_get_length(io.out) == total); /* the socket was full */
  CHECK(evbuffer_get_length(io.stage) == 0);
  check_pings(evbuffer_pullup(io.out, -1), PINGS);
  nghttp2_session_del(session);

  /* A write that fails leaves the bytes to the output, whose owner meets
   * the error on its own write. */
  evbuffer_drain(io.out, evbuffer_get_length(io.out));
  close(sv[1]);
  close(sv[0]);
  io.write_fd = sv[0];
  session = client_with_pings(&io, PINGS);
  CHECK(sg_h2io_flush(&io, session) == 0);
  CHECK(evbuffer_get_length(io.out) == total);
  nghttp2_session_del(session);

  evbuffer_free(io.stage);
  evbuffer_free(io.out);
}

int main(void) {
  test_tls_frames_fill_records();
  test_cleartext_moves_chains();
  test_flush_through_stage();
  test_write_through();
  return check_report("h2io");
}
