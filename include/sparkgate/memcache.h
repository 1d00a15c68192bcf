/* A thread's cache of freed blocks, by size class, for the buffers that
 * come and go with every call: libevent's evbuffer chains (1 KiB and a
 * header, just past glibc's per-thread cache, so each one took glibc's
 * slower path with its bin searches and coalescing) and the per-call
 * Spark message scanner (7 KiB). Blocks up to 16 KiB and a little are
 * kept in per-thread free lists, at most 2 MiB per thread; larger ones,
 * and whatever is over the bound, go to malloc and free. No locks: a
 * block freed by another thread joins that thread's lists. Under
 * AddressSanitizer it is plain malloc, so that use-after-free stays
 * visible. */
#ifndef SPARKGATE_MEMCACHE_H
#define SPARKGATE_MEMCACHE_H

#include <stddef.h>

void *sg_memcache_malloc(size_t size);
void *sg_memcache_calloc(size_t n, size_t size);
void *sg_memcache_realloc(void *p, size_t size);
/* A copy of |s| in a cached block (NULL for |s| NULL or out of memory):
 * for the strings every call copies (its identity, from the token cache). */
char *sg_memcache_strdup(const char *s);
/* Only for blocks from these functions. */
void sg_memcache_free(void *p);
/* The same for a block asked for with exactly |size| bytes (malloc or
 * calloc, never realloc): the class comes from the size, not from the
 * allocator's chunk header, which a block gone cold misses in the cache. */
void sg_memcache_free_sized(void *p, size_t size);
/* The same for a string from sg_memcache_strdup (NULL is fine): a call's
 * identity strings, whose chunk-header read was 0.8% of a unary call's
 * cycles. */
void sg_memcache_free_str(char *s);

/* Bytes kept in this thread's lists (tests). */
size_t sg_memcache_cached_bytes(void);
/* Gives this thread's cached blocks back to malloc (also done when a
 * thread exits). */
void sg_memcache_release(void);

#endif
