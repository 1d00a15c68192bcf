#include "sparkgate/memcache.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define SG_MEMCACHE_PASSTHROUGH 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SG_MEMCACHE_PASSTHROUGH 1
#endif
#endif
#ifndef SG_MEMCACHE_PASSTHROUGH
#define SG_MEMCACHE_PASSTHROUGH 0
#endif

/* 64-byte classes up to 16 KiB and 128 bytes: libevent's chains are a
 * power of two from 1 KiB up plus their header, a TLS record's worth of
 * DATA is 16 KiB. */
#define CLASS_BYTES 64
#define N_CLASSES 258
#define MAX_CACHED_SIZE ((size_t)CLASS_BYTES * N_CLASSES)
#define MAX_CACHED_BYTES (2u << 20)
#define UNCACHED ((unsigned)N_CLASSES)

/* Before each block: its class, padded so the block stays 16-aligned. It
 * shares a cache line with the block's first bytes, which its user has
 * just touched; malloc_usable_size, which this replaces, read the next
 * chunk's header too, and missed the cache on nearly every free. */
typedef union block_head {
  unsigned cls; /* UNCACHED: plain malloc and free */
  max_align_t align;
} block_head;

typedef struct free_block {
  struct free_block *next;
} free_block;

typedef struct thread_cache {
  free_block *free[N_CLASSES];
  size_t bytes;
  int registered; /* with the key whose destructor drains it */
} thread_cache;

static _Thread_local thread_cache tc;
static pthread_key_t drain_key;
static pthread_once_t drain_once = PTHREAD_ONCE_INIT;

static inline size_t class_size(size_t cls) { return (cls + 1) * CLASS_BYTES; }

/* A free block is the pointer malloc returned (its header's place), so
 * memory checkers follow the lists. */
static void drain(thread_cache *c) {
  for (size_t i = 0; i < N_CLASSES; i++) {
    while (c->free[i] != NULL) {
      free_block *b = c->free[i];
      c->free[i] = b->next;
      free(b);
    }
  }
  c->bytes = 0;
}

/* Blocks freed after this (by later thread-exit destructors) register the
 * lists again; glibc then runs this once more. */
static void drain_at_exit(void *arg) {
  thread_cache *c = arg;
  drain(c);
  c->registered = 0;
}

static void make_key(void) {
  if (pthread_key_create(&drain_key, drain_at_exit) != 0)
    drain_key = (pthread_key_t)-1;
}

static void *fresh(size_t size, unsigned cls) {
  if (size > SIZE_MAX - sizeof(block_head))
    return NULL;
  block_head *h = malloc(sizeof *h + size);
  if (h == NULL)
    return NULL;
  h->cls = cls;
  return h + 1;
}

void *sg_memcache_malloc(size_t size) {
  if (SG_MEMCACHE_PASSTHROUGH)
    return malloc(size);
  if (size > MAX_CACHED_SIZE)
    return fresh(size, UNCACHED);
  size_t cls = size == 0 ? 0 : (size - 1) / CLASS_BYTES;
  free_block *b = tc.free[cls];
  if (b != NULL) {
    tc.free[cls] = b->next;
    tc.bytes -= class_size(cls);
    block_head *h = (block_head *)b;
    h->cls = (unsigned)cls;
    return h + 1;
  }
  return fresh(class_size(cls), (unsigned)cls);
}

void sg_memcache_free(void *p) {
  if (SG_MEMCACHE_PASSTHROUGH || p == NULL) {
    free(p);
    return;
  }
  block_head *h = (block_head *)p - 1;
  size_t cls = h->cls;
  if (cls >= N_CLASSES || tc.bytes + class_size(cls) > MAX_CACHED_BYTES) {
    free(h);
    return;
  }
  if (!tc.registered) {
    /* The first block this thread keeps: its lists must be drained when
     * it exits. Without the key, keep nothing. */
    pthread_once(&drain_once, make_key);
    if (drain_key == (pthread_key_t)-1 || pthread_setspecific(drain_key, &tc) != 0) {
      free(h);
      return;
    }
    tc.registered = 1;
  }
  free_block *b = (free_block *)h;
  b->next = tc.free[cls];
  tc.free[cls] = b;
  tc.bytes += class_size(cls);
}

void *sg_memcache_calloc(size_t n, size_t size) {
  if (size != 0 && n > SIZE_MAX / size)
    return NULL;
  void *p = sg_memcache_malloc(n * size);
  if (p != NULL)
    memset(p, 0, n * size);
  return p;
}

char *sg_memcache_strdup(const char *s) {
  if (s == NULL)
    return NULL;
  size_t n = strlen(s) + 1;
  char *d = sg_memcache_malloc(n);
  if (d != NULL)
    memcpy(d, s, n);
  return d;
}

void *sg_memcache_realloc(void *p, size_t size) {
  if (SG_MEMCACHE_PASSTHROUGH || p == NULL)
    return p == NULL ? sg_memcache_malloc(size) : realloc(p, size);
  block_head *h = (block_head *)p - 1;
  size_t cls = h->cls;
  if (cls >= N_CLASSES) {
    if (size > MAX_CACHED_SIZE) {
      if (size > SIZE_MAX - sizeof *h)
        return NULL;
      block_head *nh = realloc(h, sizeof *h + size);
      return nh != NULL ? nh + 1 : NULL;
    }
  } else if (size > 0 && size <= class_size(cls)) {
    return p;
  }
  void *q = sg_memcache_malloc(size);
  if (q == NULL)
    return NULL;
  if (cls < N_CLASSES) {
    size_t old = class_size(cls);
    memcpy(q, p, old < size ? old : size);
  } else {
    /* An uncached block is bigger than any cached one, and size is not. */
    memcpy(q, p, size);
  }
  sg_memcache_free(p);
  return q;
}

size_t sg_memcache_cached_bytes(void) { return tc.bytes; }

void sg_memcache_release(void) { drain(&tc); }
