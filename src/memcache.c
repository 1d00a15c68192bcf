#include "sparkgate/memcache.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SG_MEMCACHE_PASSTHROUGH 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SG_MEMCACHE_PASSTHROUGH 1
#endif
#endif
#if !defined(SG_MEMCACHE_PASSTHROUGH) && !defined(__GLIBC__)
#define SG_MEMCACHE_PASSTHROUGH 1 /* the class comes from malloc_usable_size */
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
/* Larger blocks are asked for at least this big, so that their usable
 * size can never be taken for a class. */
#define MIN_UNCACHED (MAX_CACHED_SIZE + CLASS_BYTES)

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

/* Blocks carry no header: every cached size is a multiple of 64 handed
 * to malloc as such, and malloc_usable_size gives it back (glibc adds
 * under 16 bytes; valgrind gives the size asked for). So each block is
 * the pointer malloc returned, which memory checkers follow, and which
 * plain free() takes: libevent 2.1.12 frees a string it got from its
 * allocator with free() (evutil_inet_pton_scope, for a backend address
 * with a zone). A class in a header before the block saved an L1 miss
 * per free (malloc_usable_size reads the next chunk too), about 0.2% of
 * a call, and crashed there. */
static size_t usable_size(void *p) {
#ifdef __GLIBC__
  return malloc_usable_size(p);
#else
  (void)p;
  return MIN_UNCACHED;
#endif
}

/* N_CLASSES or more: not a cached size. */
static size_t block_class(void *p) { return usable_size(p) / CLASS_BYTES - 1; }

static size_t uncached_request(size_t size) { return size < MIN_UNCACHED ? MIN_UNCACHED : size; }

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

void *sg_memcache_malloc(size_t size) {
  if (SG_MEMCACHE_PASSTHROUGH)
    return malloc(size);
  if (size > MAX_CACHED_SIZE)
    return malloc(uncached_request(size));
  size_t cls = size == 0 ? 0 : (size - 1) / CLASS_BYTES;
  free_block *b = tc.free[cls];
  if (b != NULL) {
    /* The next block of the class is the next call's: its line is
     * fetched now, not missed then (a block freed a while ago is cold). */
    tc.free[cls] = b->next;
    if (b->next != NULL)
      __builtin_prefetch(b->next, 1);
    tc.bytes -= class_size(cls);
    return b;
  }
  return malloc(class_size(cls));
}

static void keep(void *p, size_t cls);

void sg_memcache_free(void *p) {
  if (SG_MEMCACHE_PASSTHROUGH || p == NULL) {
    free(p);
    return;
  }
  keep(p, block_class(p));
}

void sg_memcache_free_sized(void *p, size_t size) {
  if (SG_MEMCACHE_PASSTHROUGH || p == NULL || size > MAX_CACHED_SIZE) {
    free(p);
    return;
  }
  keep(p, size == 0 ? 0 : (size - 1) / CLASS_BYTES);
}

void sg_memcache_free_str(char *s) {
  if (s != NULL)
    sg_memcache_free_sized(s, strlen(s) + 1); /* a string cut short: a smaller class, still safe */
}

/* Onto the free list of class |cls| (N_CLASSES or more: to malloc). */
static void keep(void *p, size_t cls) {
  if (cls >= N_CLASSES || tc.bytes + class_size(cls) > MAX_CACHED_BYTES) {
    free(p);
    return;
  }
  if (!tc.registered) {
    /* The first block this thread keeps: its lists must be drained when
     * it exits. Without the key, keep nothing. */
    pthread_once(&drain_once, make_key);
    if (drain_key == (pthread_key_t)-1 || pthread_setspecific(drain_key, &tc) != 0) {
      free(p);
      return;
    }
    tc.registered = 1;
  }
  free_block *b = p;
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
  size_t cls = block_class(p);
  if (cls >= N_CLASSES) {
    if (size > MAX_CACHED_SIZE)
      return realloc(p, uncached_request(size));
  } else if (size > 0 && size <= class_size(cls)) {
    return p;
  }
  void *q = sg_memcache_malloc(size);
  if (q == NULL)
    return NULL;
  size_t old = cls >= N_CLASSES ? usable_size(p) : class_size(cls);
  memcpy(q, p, old < size ? old : size);
  sg_memcache_free(p);
  return q;
}

size_t sg_memcache_cached_bytes(void) { return tc.bytes; }

void sg_memcache_release(void) { drain(&tc); }
