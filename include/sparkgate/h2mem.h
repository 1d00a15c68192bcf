/* nghttp2's memory (nghttp2_mem). A per-worker allocator: small blocks
 * come from free lists kept by size class, so the dozens of allocations
 * nghttp2 makes per call (header buffers, stream objects, outbound frames)
 * seldom reach malloc; larger ones go to malloc. One worker thread uses
 * it: no locks.
 * Each session gets a view of it (sg_h2mem_session) that puts the blocks
 * of a page and more nghttp2 allocates while creating the session (in
 * 1.52: its stream table, 4 KiB, and its outbound frame buffer, 16 KiB)
 * on mappings of their own. Only the pages a connection touches are then
 * resident, and an idle connection can give them back (trim).
 * Under AddressSanitizer it is plain malloc, so that use-after-free stays
 * visible. */
#ifndef SPARKGATE_H2MEM_H
#define SPARKGATE_H2MEM_H

#include <stdbool.h>
#include <stddef.h>

#include <nghttp2/nghttp2.h>

typedef struct sg_h2mem sg_h2mem;

sg_h2mem *sg_h2mem_new(void);
/* Every block taken from it must have been given back: after the worker's
 * sessions and the header buffers its streams hold are gone. */
void sg_h2mem_free(sg_h2mem *m);

/* The worker's allocator itself, no mappings; NULL for |m| NULL
 * (nghttp2's default). */
nghttp2_mem *sg_h2mem_nghttp2(sg_h2mem *m);

/* Bytes kept in free lists (tests). */
size_t sg_h2mem_cached_bytes(const sg_h2mem *m);

#define SG_H2MEM_SESSION_MAPS 2

typedef struct sg_h2mem_map {
  void *p; /* NULL: slot free */
  size_t size, len; /* asked for; mapped (whole pages) */
  /* malloc'd, not calloc'd: in 1.52 the outbound frame buffer, which
   * holds nothing once the session has nothing to send (a frame is
   * packed whole into it, and nghttp2 resets it after each frame). */
  bool scratch;
} sg_h2mem_map;

/* A session's view of the worker's allocator. It stays valid until
 * sg_h2mem_free, and is reused after _release: nghttp2's header buffers
 * keep a pointer to it, and the streams that hold them may outlive the
 * session. */
typedef struct sg_h2mem_session {
  nghttp2_mem mem;
  sg_h2mem *worker;
  bool creating;
  sg_h2mem_map maps[SG_H2MEM_SESSION_MAPS];
  struct sg_h2mem_session *next_made, *next_spare;
} sg_h2mem_session;

/* NULL: out of memory. The view is in its creating phase: blocks of a
 * page and more it serves until _created are mappings. */
sg_h2mem_session *sg_h2mem_session_new(sg_h2mem *worker);
/* For nghttp2_session_*_new3; NULL under AddressSanitizer (nghttp2's
 * default). */
nghttp2_mem *sg_h2mem_session_nghttp2(sg_h2mem_session *s);
/* The session exists: later blocks come from the worker's heap. */
void sg_h2mem_session_created(sg_h2mem_session *s);
/* After nghttp2_session_del; NULL is a no-op. */
void sg_h2mem_session_release(sg_h2mem_session *s);

/* Gives the kernel back the pages of the session's mappings that hold
 * nothing: those all zero (an empty stream table) and, when
 * |output_idle| (nghttp2 wants to write nothing: no frame in progress),
 * the frame buffer's. Their contents stay what nghttp2 expects: pages
 * given back read as zeros. Not while nghttp2 runs on the session. */
void sg_h2mem_session_trim(sg_h2mem_session *s, bool output_idle);

#endif
