#include "sparkgate/h2mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#define SG_H2MEM_PASSTHROUGH 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SG_H2MEM_PASSTHROUGH 1
#endif
#endif
#ifndef SG_H2MEM_PASSTHROUGH
#define SG_H2MEM_PASSTHROUGH 0
#endif

/* Classes of 32 bytes up to 1 KiB cover what nghttp2 allocates per frame
 * and per header field; the cap bounds what a burst of calls leaves
 * cached once it is over. */
#define CLASS_BYTES 32
#define N_CLASSES 32
#define MAX_SMALL (CLASS_BYTES * N_CLASSES)
#define MAX_CACHED_BYTES (2u << 20)
#define LARGE 0xffu
#define MAPPED 0xfeu
/* nghttp2's outbound frame buffer, 16 KiB and a frame header, is the one
 * block of this size a session holds all its life. Frames seldom fill it
 * (DATA payloads are not copied into it), so on fresh pages of its own
 * an idle connection has one of them resident, where from the heap it
 * would reuse pages other buffers (TLS handshakes) already touched. */
#define MAP_MIN (16u << 10)

/* Before each block: its class (and for large and mapped blocks the size
 * asked for), padded so the block stays 16-aligned. */
typedef union block_head {
  struct {
    unsigned cls;
    size_t size;
  } h;
  max_align_t align;
} block_head;

typedef struct free_block {
  struct free_block *next;
} free_block;

struct sg_h2mem {
  nghttp2_mem mem;
  free_block *free[N_CLASSES];
  size_t cached_bytes;
};

static inline size_t class_size(unsigned cls) { return (size_t)(cls + 1) * CLASS_BYTES; }

static void *take(sg_h2mem *m, size_t size) {
  if (size == 0)
    size = 1;
  if (size >= MAP_MIN) {
    size_t len = sizeof(block_head) + size;
    void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map != MAP_FAILED) {
      block_head *h = map;
      h->h.cls = MAPPED;
      h->h.size = size;
      return h + 1;
    }
    /* Out of mappings (vm.max_map_count, with very many connections):
     * the heap still serves, at the memory cost this saves. */
  }
  if (size > MAX_SMALL) {
    block_head *h = malloc(sizeof *h + size);
    if (h == NULL)
      return NULL;
    h->h.cls = LARGE;
    h->h.size = size;
    return h + 1;
  }
  unsigned cls = (unsigned)((size - 1) / CLASS_BYTES);
  free_block *b = m->free[cls];
  if (b != NULL) {
    m->free[cls] = b->next;
    if (b->next != NULL)
      __builtin_prefetch(b->next, 1); /* the next take's block: see memcache.c */
    m->cached_bytes -= class_size(cls);
    block_head *h = (block_head *)b;
    h->h.cls = cls;
    return h + 1;
  }
  block_head *h = malloc(sizeof *h + class_size(cls));
  if (h == NULL)
    return NULL;
  h->h.cls = cls;
  return h + 1;
}

static void give(sg_h2mem *m, void *p) {
  if (p == NULL)
    return;
  block_head *h = (block_head *)p - 1;
  unsigned cls = h->h.cls;
  if (cls == MAPPED) {
    munmap(h, sizeof *h + h->h.size);
    return;
  }
  if (cls == LARGE || m->cached_bytes + class_size(cls) > MAX_CACHED_BYTES) {
    free(h);
    return;
  }
  free_block *b = (free_block *)h;
  b->next = m->free[cls];
  m->free[cls] = b;
  m->cached_bytes += class_size(cls);
}

static void *mem_malloc(size_t size, void *user) { return take(user, size); }

static void mem_free(void *p, void *user) { give(user, p); }

static void *mem_calloc(size_t n, size_t size, void *user) {
  if (size != 0 && n > SIZE_MAX / size)
    return NULL;
  void *p = take(user, n * size);
  if (p != NULL && ((block_head *)p - 1)->h.cls != MAPPED) /* fresh mappings are zero */
    memset(p, 0, n * size);
  return p;
}

static void *mem_realloc(void *p, size_t size, void *user) {
  sg_h2mem *m = user;
  if (p == NULL)
    return take(m, size);
  block_head *h = (block_head *)p - 1;
  if (h->h.cls == LARGE) {
    if (size > MAX_SMALL && size < MAP_MIN) {
      block_head *nh = realloc(h, sizeof *h + size);
      if (nh == NULL)
        return NULL;
      nh->h.size = size;
      return nh + 1;
    }
  } else if (h->h.cls == MAPPED) {
    if (size >= MAP_MIN && size <= h->h.size)
      return p;
  } else if (size <= class_size(h->h.cls) && size > 0) {
    return p;
  }
  void *q = take(m, size);
  if (q == NULL)
    return NULL;
  size_t old = h->h.cls == LARGE || h->h.cls == MAPPED ? h->h.size : class_size(h->h.cls);
  memcpy(q, p, old < size ? old : size);
  give(m, p);
  return q;
}

sg_h2mem *sg_h2mem_new(void) {
  sg_h2mem *m = calloc(1, sizeof *m);
  if (m == NULL)
    return NULL;
  m->mem = (nghttp2_mem){.mem_user_data = m,
                         .malloc = mem_malloc,
                         .free = mem_free,
                         .calloc = mem_calloc,
                         .realloc = mem_realloc};
  return m;
}

void sg_h2mem_free(sg_h2mem *m) {
  if (m == NULL)
    return;
  for (unsigned c = 0; c < N_CLASSES; c++) {
    while (m->free[c] != NULL) {
      free_block *b = m->free[c];
      m->free[c] = b->next;
      free(b);
    }
  }
  free(m);
}

nghttp2_mem *sg_h2mem_nghttp2(sg_h2mem *m) {
  if (m == NULL || SG_H2MEM_PASSTHROUGH)
    return NULL;
  return &m->mem;
}

size_t sg_h2mem_cached_bytes(const sg_h2mem *m) { return m != NULL ? m->cached_bytes : 0; }
