#include "sparkgate/h2mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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

/* Before each block of the worker's: its class (and for large blocks the
 * size asked for), padded so the block stays 16-aligned. */
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
  sg_h2mem_session *views; /* every view made, for sg_h2mem_free */
  sg_h2mem_session *spare_views;
  size_t page; /* the system's page size */
};

static inline size_t class_size(unsigned cls) { return (size_t)(cls + 1) * CLASS_BYTES; }

static void *take(sg_h2mem *m, size_t size) {
  if (size == 0)
    size = 1;
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
  if (cls == LARGE || m->cached_bytes + class_size(cls) > MAX_CACHED_BYTES) {
    free(h);
    return;
  }
  free_block *b = (free_block *)h;
  b->next = m->free[cls];
  m->free[cls] = b;
  m->cached_bytes += class_size(cls);
}

static size_t block_size(void *p) {
  block_head *h = (block_head *)p - 1;
  return h->h.cls == LARGE ? h->h.size : class_size(h->h.cls);
}

/* NULL for out of memory, |p| itself when it already fits. */
static void *regrow(sg_h2mem *m, void *p, size_t size) {
  block_head *h = (block_head *)p - 1;
  if (h->h.cls == LARGE) {
    if (size > MAX_SMALL) {
      block_head *nh = realloc(h, sizeof *h + size);
      if (nh == NULL)
        return NULL;
      nh->h.size = size;
      return nh + 1;
    }
  } else if (size <= class_size(h->h.cls) && size > 0) {
    return p;
  }
  void *q = take(m, size);
  if (q == NULL)
    return NULL;
  size_t old = block_size(p);
  memcpy(q, p, old < size ? old : size);
  give(m, p);
  return q;
}

static void *mem_malloc(size_t size, void *user) { return take(user, size); }

static void mem_free(void *p, void *user) { give(user, p); }

static void *mem_calloc(size_t n, size_t size, void *user) {
  if (size != 0 && n > SIZE_MAX / size)
    return NULL;
  void *p = take(user, n * size);
  if (p != NULL)
    memset(p, 0, n * size);
  return p;
}

static void *mem_realloc(void *p, size_t size, void *user) {
  return p == NULL ? take(user, size) : regrow(user, p, size);
}

sg_h2mem *sg_h2mem_new(void) {
  sg_h2mem *m = calloc(1, sizeof *m);
  if (m == NULL)
    return NULL;
  long page = sysconf(_SC_PAGESIZE);
  m->page = page > 0 ? (size_t)page : 4096;
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
  while (m->views != NULL) {
    sg_h2mem_session *v = m->views;
    m->views = v->next_made;
    free(v);
  }
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

/* ---- one session's blocks ------------------------------------------------ */

/* Mappings start on a page, so on 4 KiB whatever the page size; the
 * worker's blocks seldom do. A constant: this runs on every free. */
#define MAP_ALIGN_MASK ((uintptr_t)4095)

static sg_h2mem_map *find_map(sg_h2mem_session *s, const void *p) {
  if (((uintptr_t)p & MAP_ALIGN_MASK) != 0 || p == NULL)
    return NULL;
  for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++)
    if (s->maps[i].p == p)
      return &s->maps[i];
  return NULL;
}

/* A block of a page or more, while the session is being created, on a
 * mapping of its own; NULL: the heap serves (smaller, slots taken, or out
 * of mappings: vm.max_map_count). Off the path of every call. */
__attribute__((noinline, cold)) static void *map_block(sg_h2mem_session *s, size_t size,
                                                       bool zeroed) {
  size_t page = s->worker->page;
  if (size < page)
    return NULL;
  for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++) {
    sg_h2mem_map *mp = &s->maps[i];
    if (mp->p != NULL)
      continue;
    size_t len = (size + page - 1) & ~(page - 1);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      return NULL;
    *mp = (sg_h2mem_map){.p = p, .size = size, .len = len, .scratch = !zeroed};
    return p;
  }
  return NULL;
}

static void session_give(sg_h2mem_session *s, void *p) {
  sg_h2mem_map *mp = find_map(s, p);
  if (mp == NULL) {
    give(s->worker, p);
    return;
  }
  munmap(mp->p, mp->len);
  *mp = (sg_h2mem_map){0};
}

static void *session_take(sg_h2mem_session *s, size_t size, bool zeroed) {
  void *p = s->creating ? map_block(s, size, zeroed) : NULL;
  if (p != NULL)
    return p; /* fresh mappings are zero */
  p = take(s->worker, size);
  if (p != NULL && zeroed)
    memset(p, 0, size);
  return p;
}

static void *session_malloc(size_t size, void *user) { return session_take(user, size, false); }

/* Off the path of every free: a page-aligned block. */
__attribute__((noinline, cold)) static void session_give_aligned(sg_h2mem_session *s, void *p) {
  session_give(s, p);
}

static void session_free(void *p, void *user) {
  sg_h2mem_session *s = user;
  if (((uintptr_t)p & MAP_ALIGN_MASK) != 0)
    give(s->worker, p);
  else if (p != NULL) /* nghttp2 frees NULL often */
    session_give_aligned(s, p);
}

static void *session_calloc(size_t n, size_t size, void *user) {
  if (size != 0 && n > SIZE_MAX / size)
    return NULL;
  return session_take(user, n * size, true);
}

static void *session_realloc(void *p, size_t size, void *user) {
  sg_h2mem_session *s = user;
  if (p == NULL)
    return session_take(s, size, false);
  sg_h2mem_map *mp = find_map(s, p);
  if (mp == NULL)
    return regrow(s->worker, p, size);
  if (size > 0 && size <= mp->len) {
    mp->size = size;
    return p;
  }
  void *q = take(s->worker, size);
  if (q == NULL)
    return NULL;
  memcpy(q, p, mp->size < size ? mp->size : size);
  session_give(s, p);
  return q;
}

sg_h2mem_session *sg_h2mem_session_new(sg_h2mem *worker) {
  sg_h2mem_session *s = worker->spare_views;
  if (s != NULL) {
    worker->spare_views = s->next_spare;
  } else {
    s = calloc(1, sizeof *s);
    if (s == NULL)
      return NULL;
    s->next_made = worker->views;
    worker->views = s;
  }
  s->mem = (nghttp2_mem){.mem_user_data = s,
                         .malloc = session_malloc,
                         .free = session_free,
                         .calloc = session_calloc,
                         .realloc = session_realloc};
  s->worker = worker;
  s->creating = true;
  s->next_spare = NULL;
  return s;
}

nghttp2_mem *sg_h2mem_session_nghttp2(sg_h2mem_session *s) {
  return SG_H2MEM_PASSTHROUGH ? NULL : &s->mem;
}

void sg_h2mem_session_created(sg_h2mem_session *s) { s->creating = false; }

void sg_h2mem_session_release(sg_h2mem_session *s) {
  if (s == NULL)
    return;
  /* What the session still held of its mappings (none once nghttp2 has
   * deleted it) goes; the view stays valid for the blocks it allocated
   * that outlive the session. */
  for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++)
    if (s->maps[i].p != NULL)
      session_give(s, s->maps[i].p);
  s->next_spare = s->worker->spare_views;
  s->worker->spare_views = s;
}

static bool page_is_zero(const uint8_t *p, size_t len) {
  const uint64_t *w = (const uint64_t *)(const void *)p;
  uint64_t any = 0;
  for (size_t i = 0; i < len / sizeof *w; i++)
    any |= w[i];
  return any == 0;
}

void sg_h2mem_session_trim(sg_h2mem_session *s, bool output_idle) {
  size_t page = s->worker->page;
  for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++) {
    sg_h2mem_map *mp = &s->maps[i];
    if (mp->p == NULL)
      continue;
    if (mp->scratch) {
      if (output_idle)
        madvise(mp->p, mp->len, MADV_DONTNEED);
      continue;
    }
    for (size_t off = 0; off < mp->len; off += page) {
      uint8_t *pg = (uint8_t *)mp->p + off;
      if (page_is_zero(pg, page))
        madvise(pg, page, MADV_DONTNEED);
    }
  }
}
