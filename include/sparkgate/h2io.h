/* Writing an nghttp2 session's frames into a libevent output buffer.
 * Frames are serialized by nghttp2; on cleartext connections DATA payloads
 * are moved from the other leg's buffer into the output by reference
 * (evbuffer chains), not copied. A high-water mark on the output holds
 * back a slow peer: other frames wait in nghttp2 (NGHTTP2_ERR_WOULDBLOCK),
 * DATA waits in its data provider, which defers (sg_h2io_hold_data) and
 * is resumed once the output has drained. A DATA frame is never held
 * between its data provider and its send: its payload would sit at the
 * head of the other leg's buffer, counted as sent, where cancelling,
 * discarding or trimming that buffer would take it away. A flush writes
 * to the socket (or TLS) itself while the output is empty; the output
 * holds only what the socket did not take. */
#ifndef SPARKGATE_H2IO_H
#define SPARKGATE_H2IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

/* What the callbacks need; the session's user data must point at a struct
 * whose first member is this. */
typedef struct sg_h2io {
  struct evbuffer *out;
  size_t high_water;
  /* For TLS, where libevent makes one TLS record (and one write) per
   * chain of the output: DATA payloads are copied in instead of moving
   * their chains, so that frame headers and payloads share chains, and
   * each flush leaves small output in a single chain. */
  bool copy_payload;
  /* Where sg_h2io_flush has nghttp2 write, before moving it all to |out|
   * in one step: every append to a bufferevent's output runs its
   * callbacks, and a call makes a dozen frames. Empty between flushes,
   * so a worker's connections share one; NULL writes to |out| directly. */
  struct evbuffer *stage;
  bool staging; /* inside sg_h2io_flush, writing to |stage| */
  /* While staging: |out|'s length when the flush began (nothing else
   * writes to it meanwhile) and what the flush has put in |stage|, so
   * that the high-water check of every frame reads two fields instead
   * of calling into libevent twice. */
  size_t out_at_flush;
  size_t staged;
  /* A flush that finds |out| empty writes the stage itself: to
   * |write_fd| on cleartext, with SSL_write on |write_tls| when it is one
   * record's worth or less, and only what is not written goes to |out|.
   * The bufferevent would write it an event loop turn later, after asking
   * epoll for write interest and dropping it again: two epoll_ctl calls
   * and a wakeup per write. */
  bool write_through;
  int write_fd;
  SSL *write_tls;
  /* The last flush stopped at the high-water mark (frames or DATA held). */
  bool stopped;
  /* A data provider deferred because the output was full: its session's
   * owner resumes the streams it marked when the output drains. */
  bool data_held;
} sg_h2io;

/* For data providers: true when the output is full, and then marks |io|
 * so that the caller's stream is resumed later (the provider returns
 * NGHTTP2_ERR_DEFERRED and marks its stream). */
bool sg_h2io_hold_data(sg_h2io *io);

/* Whether streams held by sg_h2io_hold_data may go on: some were held and
 * the output is below its high-water mark again. Clears the mark. */
bool sg_h2io_release_data(sg_h2io *io);

ssize_t sg_h2io_send(nghttp2_session *session, const uint8_t *data,
                     size_t length, int flags, void *user);

/* Appends one DATA frame (header, payload moved from |payload|, padding)
 * to the output, whatever the output holds (its data provider checked).
 * When |keep| is not NULL, a copy of the payload is also appended to it.
 * Returns 0 or NGHTTP2_ERR_CALLBACK_FAILURE. */
int sg_h2io_send_data(sg_h2io *io, const nghttp2_frame *frame,
                      const uint8_t *framehd, size_t length,
                      struct evbuffer *payload, struct evbuffer *keep);

/* The most DATA payload to put in one frame: |length| (what nghttp2
 * allows), but on TLS no more than SG_H2IO_TLS_DATA_MAX, so that a frame
 * and its 9-byte header fill one TLS record (16 KiB) exactly instead of
 * spilling 9 bytes into a record of their own. */
#define SG_H2IO_TLS_DATA_MAX (16384 - 9)
size_t sg_h2io_data_max(const sg_h2io *io, size_t length);

/* Runs nghttp2_session_send (through |io->stage| when there is one);
 * returns its result. With |io->copy_payload|,
 * output of up to one TLS record's worth (16 KiB) spread over chains is
 * then gathered into one: the calls answered in one event loop iteration
 * reach the peer in one record and one write(), not one per chain. */
int sg_h2io_flush(sg_h2io *io, nghttp2_session *session);

/* After sg_h2io_flush: whether it stopped at the high-water mark and its
 * own write has since made room. Nothing else would wake the session
 * then (the bufferevent calls back only when output it holds drains):
 * the owner resumes what it held and flushes again. */
bool sg_h2io_flush_again(const sg_h2io *io);

/* What the owner of a session does to flush it: resumes the streams
 * sg_h2io_hold_data held, through |resume| (when the output has room
 * again), flushes, and again while sg_h2io_flush_again says so, up to
 * four times (four high-water marks' worth). Returns nghttp2's result;
 * sets |*more| when it stopped with more to write and room for it: the
 * owner schedules another flush, so that its other connections go first. */
int sg_h2io_flush_rounds(sg_h2io *io, nghttp2_session *session,
                         void (*resume)(void *owner), void *owner, bool *more);

#endif
