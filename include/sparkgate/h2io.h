/* Writing an nghttp2 session's frames into a libevent output buffer.
 * Frames are serialized by nghttp2; on cleartext connections DATA payloads
 * are moved from the other leg's buffer into the output by reference
 * (evbuffer chains), not copied, and a high-water mark on the output makes
 * nghttp2 wait (NGHTTP2_ERR_WOULDBLOCK) for a slow peer. */
#ifndef SPARKGATE_H2IO_H
#define SPARKGATE_H2IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>

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
} sg_h2io;

ssize_t sg_h2io_send(nghttp2_session *session, const uint8_t *data,
                     size_t length, int flags, void *user);

/* Appends one DATA frame (header, payload moved from |payload|, padding)
 * to the output. When |keep| is not NULL, a copy of the payload is also
 * appended to it (only when the frame is written). Returns 0,
 * NGHTTP2_ERR_WOULDBLOCK, or NGHTTP2_ERR_CALLBACK_FAILURE. */
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

#endif
