/* A per-worker allocator for nghttp2 (nghttp2_mem): small blocks come from
 * free lists kept by size class, so the dozens of allocations nghttp2 makes
 * per call (header buffers, stream objects, outbound frames) seldom reach
 * malloc. One worker thread uses it: no locks. Larger blocks go to malloc,
 * and blocks of 16 KiB and more (nghttp2's outbound frame buffer, one per
 * session) to mappings of their own, so that an idle connection keeps
 * resident only the pages its frames touched.
 * Under AddressSanitizer it is plain malloc, so that use-after-free stays
 * visible. */
#ifndef SPARKGATE_H2MEM_H
#define SPARKGATE_H2MEM_H

#include <stddef.h>

#include <nghttp2/nghttp2.h>

typedef struct sg_h2mem sg_h2mem;

sg_h2mem *sg_h2mem_new(void);
/* Every block taken from it must have been given back: after the worker's
 * sessions and the header buffers its streams hold are gone. */
void sg_h2mem_free(sg_h2mem *m);

/* For nghttp2_session_*_new3; NULL for |m| NULL (nghttp2's default). */
nghttp2_mem *sg_h2mem_nghttp2(sg_h2mem *m);

/* Bytes kept in free lists (tests). */
size_t sg_h2mem_cached_bytes(const sg_h2mem *m);

#endif
