#include "sparkgate/h2io.h"

#include <string.h>

#include <openssl/err.h>

static struct evbuffer *dest(const sg_h2io *io) {
  return io->staging ? io->stage : io->out;
}

static size_t queued(const sg_h2io *io) {
  return io->staging ? io->out_at_flush + io->staged : evbuffer_get_length(io->out);
}

ssize_t sg_h2io_send(nghttp2_session *session, const uint8_t *data,
                     size_t length, int flags, void *user) {
  (void)session;
  (void)flags;
  sg_h2io *io = user;
  if (queued(io) >= io->high_water) {
    io->stopped = true;
    return NGHTTP2_ERR_WOULDBLOCK;
  }
  if (evbuffer_add(dest(io), data, length) != 0)
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (io->staging)
    io->staged += length;
  return (ssize_t)length;
}

/* Appends a copy of the first |length| bytes of |from| to |to|, which
 * stay in |from|. */
static int copy_prefix(struct evbuffer *to, struct evbuffer *from, size_t length) {
  struct evbuffer_iovec v;
  if (evbuffer_reserve_space(to, (ev_ssize_t)length, &v, 1) != 1 ||
      evbuffer_copyout(from, v.iov_base, length) != (ev_ssize_t)length)
    return -1;
  v.iov_len = length;
  return evbuffer_commit_space(to, &v, 1);
}

bool sg_h2io_hold_data(sg_h2io *io) {
  if (queued(io) < io->high_water)
    return false;
  io->data_held = true;
  io->stopped = true;
  return true;
}

bool sg_h2io_release_data(sg_h2io *io) {
  if (!io->data_held || queued(io) >= io->high_water)
    return false;
  io->data_held = false;
  return true;
}

int sg_h2io_send_data(sg_h2io *io, const nghttp2_frame *frame,
                      const uint8_t *framehd, size_t length,
                      struct evbuffer *payload, struct evbuffer *keep) {
  struct evbuffer *out = dest(io);
  if (keep != NULL && length > 0 && copy_prefix(keep, payload, length) != 0)
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  size_t padlen = frame->data.padlen;
  size_t total = 9 + (padlen > 0 ? 1 : 0) + length + (padlen > 1 ? padlen - 1 : 0);
  if (io->staging)
    io->staged += total; /* on failure the session is done for anyway */
  if (io->copy_payload) {
    /* The whole frame in one piece of one chain: with frames of
     * SG_H2IO_TLS_DATA_MAX, every chain then holds whole records. */
    struct evbuffer_iovec v;
    if (evbuffer_reserve_space(out, (ev_ssize_t)total, &v, 1) != 1)
      return NGHTTP2_ERR_CALLBACK_FAILURE;
    uint8_t *p = v.iov_base;
    memcpy(p, framehd, 9);
    p += 9;
    if (padlen > 0)
      *p++ = (uint8_t)(padlen - 1);
    if (length > 0 && evbuffer_remove(payload, p, length) != (int)length)
      return NGHTTP2_ERR_CALLBACK_FAILURE;
    p += length;
    if (padlen > 1)
      memset(p, 0, padlen - 1);
    v.iov_len = total;
    return evbuffer_commit_space(out, &v, 1) == 0 ? 0 : NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  if (evbuffer_add(out, framehd, 9) != 0)
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (padlen > 0) {
    uint8_t padlen_byte = (uint8_t)(padlen - 1);
    if (evbuffer_add(out, &padlen_byte, 1) != 0)
      return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  /* The zero-copy step: chains change hands. */
  if (length > 0 && evbuffer_remove_buffer(payload, out, length) != (int)length)
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (padlen > 1) {
    static const uint8_t zeros[256];
    if (evbuffer_add(out, zeros, padlen - 1) != 0)
      return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  return 0;
}

bool sg_h2io_flush_again(const sg_h2io *io) {
  return io->stopped && queued(io) < io->high_water;
}

/* A connection's flushes in a row before it lets the worker's other
 * connections go: four high-water marks' worth of output. */
#define FLUSH_ROUNDS 4

int sg_h2io_flush_rounds(sg_h2io *io, nghttp2_session *session,
                         void (*resume)(void *owner), void *owner, bool *more) {
  int rv;
  int rounds = 0;
  do {
    if (sg_h2io_release_data(io))
      resume(owner);
    rv = sg_h2io_flush(io, session);
  } while (rv == 0 && sg_h2io_flush_again(io) && ++rounds < FLUSH_ROUNDS);
  *more = rv == 0 && rounds == FLUSH_ROUNDS;
  return rv;
}

size_t sg_h2io_data_max(const sg_h2io *io, size_t length) {
  return io->copy_payload && length > SG_H2IO_TLS_DATA_MAX ? SG_H2IO_TLS_DATA_MAX : length;
}

/* TLS's largest record payload. */
#define RECORD_MAX 16384
_Static_assert(SG_H2IO_TLS_DATA_MAX + 9 == RECORD_MAX, "a DATA frame fills one record");

/* Writes the stage to the socket, draining what went out. A failed or
 * short write leaves the rest staged, to go to the output: the
 * bufferevent meets an error on its own write and reports it. On TLS only
 * output of up to one record (a flush of small calls' frames) is written
 * here: more is DATA in bulk, which libevent writes chain by chain, cutting
 * full records across frames. A record that could not be written stays
 * at the head of the stage and so becomes the head of the output:
 * OpenSSL holds what it encrypted of it and takes the retry libevent
 * makes with the same bytes (libevent lets the buffer move,
 * SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, and offers at least as many). */
static void write_through(sg_h2io *io) {
  if (io->write_tls == NULL) {
    (void)evbuffer_write(io->stage, io->write_fd);
    return;
  }
  size_t n = evbuffer_get_length(io->stage);
  if (n > RECORD_MAX)
    return;
  uint8_t *p = evbuffer_pullup(io->stage, -1);
  if (p == NULL)
    return;
  ERR_clear_error();
  int r = SSL_write(io->write_tls, p, (int)n);
  if (r > 0)
    evbuffer_drain(io->stage, (size_t)r);
  else
    ERR_clear_error(); /* libevent's own write gets the same result */
}

int sg_h2io_flush(sg_h2io *io, nghttp2_session *session) {
  /* A stage holding bytes belongs to a flush further up the stack: write
   * straight to the output then. */
  io->staging = io->stage != NULL && evbuffer_get_length(io->stage) == 0;
  if (io->staging) {
    io->out_at_flush = evbuffer_get_length(io->out);
    io->staged = 0;
  }
  io->stopped = false;
  int rv = nghttp2_session_send(session);
  if (io->staging) {
    io->staging = false;
    if (io->write_through && evbuffer_get_length(io->out) == 0 &&
        evbuffer_get_length(io->stage) > 0)
      write_through(io);
    if (evbuffer_add_buffer(io->out, io->stage) != 0) {
      /* The stage is shared: it must be left empty whatever happens. */
      evbuffer_drain(io->stage, evbuffer_get_length(io->stage));
      return rv != 0 ? rv : NGHTTP2_ERR_CALLBACK_FAILURE;
    }
  }
  if (rv != 0 || !io->copy_payload)
    return rv;
  size_t n = evbuffer_get_length(io->out);
  /* The copy is at most 16 KiB; the write and the record it saves cost
   * more. A failed pullup leaves the output as it was. */
  if (n > 1 && n <= RECORD_MAX && evbuffer_peek(io->out, -1, NULL, NULL, 0) > 1)
    evbuffer_pullup(io->out, -1);
  return 0;
}
