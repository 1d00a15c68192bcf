/* The per-thread block cache: blocks of every size come back intact and
 * aligned, realloc keeps contents, a freed block is what the next
 * allocation of its class gets, the cache is bounded, and a thread's
 * blocks are given back when it exits. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "sparkgate/memcache.h"

#if defined(__SANITIZE_ADDRESS__)
#define PASSTHROUGH 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PASSTHROUGH 1
#endif
#endif
#ifndef PASSTHROUGH
#define PASSTHROUGH 0
#endif

static void fill(uint8_t *p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)(seed + i);
}

static int same(const uint8_t *p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != (uint8_t)(seed + i))
      return 0;
  return 1;
}

static void test_blocks(void) {
  static const size_t sizes[] = {0,    1,    63,   64,   65,    1000,  1056, 2104,
                                 5832, 8192, 16384, 16511, 16512, 16513, 70000};
  enum { N = sizeof sizes / sizeof sizes[0] };
  uint8_t *p[N];
  for (size_t i = 0; i < N; i++) {
    p[i] = sg_memcache_malloc(sizes[i]);
    CHECK(p[i] != NULL);
    CHECK(((uintptr_t)p[i] % 16) == 0);
    fill(p[i], sizes[i], (uint8_t)i);
  }
  for (size_t i = 0; i < N; i++)
    CHECK(same(p[i], sizes[i], (uint8_t)i));
  /* Grow and shrink across classes and into and out of uncached sizes. */
  for (size_t i = 0; i < N; i++) {
    size_t to = sizes[i] * 3 + 7;
    uint8_t *q = sg_memcache_realloc(p[i], to);
    CHECK(q != NULL);
    CHECK(same(q, sizes[i], (uint8_t)i));
    size_t down = sizes[i] / 2 + 1;
    uint8_t *r = sg_memcache_realloc(q, down);
    CHECK(r != NULL);
    CHECK(sizes[i] == 0 || same(r, down < sizes[i] ? down : sizes[i], (uint8_t)i));
    p[i] = r;
  }
  uint8_t *z = sg_memcache_calloc(10, 500);
  CHECK(z != NULL);
  int zero = 1;
  for (size_t i = 0; i < 5000; i++)
    zero &= z[i] == 0;
  CHECK(zero);
  CHECK(sg_memcache_calloc(SIZE_MAX / 2, 4) == NULL);
  sg_memcache_free(z);
  for (size_t i = 0; i < N; i++)
    sg_memcache_free(p[i]);
  sg_memcache_free(NULL);
  if (PASSTHROUGH)
    return;
  CHECK(sg_memcache_cached_bytes() > 0);
  /* A freed block is what the next allocation of its class gets: calloc
   * zeroes what the cache hands back. */
  uint8_t *a = sg_memcache_malloc(1056);
  memset(a, 0xab, 1056);
  sg_memcache_free(a);
  uint8_t *b = sg_memcache_calloc(1, 1040);
  CHECK(a == b);
  CHECK(b[0] == 0 && b[1039] == 0);
  sg_memcache_free(b);
  /* The cache is bounded, however much was freed at once. */
  enum { MANY = 5000 };
  void **many = malloc(MANY * sizeof *many);
  for (size_t i = 0; i < MANY; i++)
    many[i] = sg_memcache_malloc(2000);
  for (size_t i = 0; i < MANY; i++)
    sg_memcache_free(many[i]);
  free(many);
  CHECK(sg_memcache_cached_bytes() <= (2u << 20));
  sg_memcache_release();
  CHECK(sg_memcache_cached_bytes() == 0);
}

/* A thread's own lists: what another thread frees stays there. */
static void *other_thread(void *arg) {
  sg_memcache_free(arg);
  size_t *kept = malloc(sizeof *kept);
  *kept = sg_memcache_cached_bytes();
  void *mine = sg_memcache_malloc(300);
  sg_memcache_free(mine);
  return kept;
}

static void test_threads(void) {
  void *block = sg_memcache_malloc(4000);
  CHECK(block != NULL);
  pthread_t t;
  CHECK(pthread_create(&t, NULL, other_thread, block) == 0);
  void *ret = NULL;
  CHECK(pthread_join(t, &ret) == 0);
  size_t *kept = ret;
  CHECK(PASSTHROUGH || *kept > 0);
  free(kept);
  CHECK(sg_memcache_cached_bytes() == 0);
}

int main(void) {
  test_blocks();
  test_threads();
  return check_report("memcache");
}
