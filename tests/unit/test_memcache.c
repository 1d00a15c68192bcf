/* The per-thread block cache: blocks of every size come back intact and
 * aligned, realloc keeps contents, a freed block is what the next
 * allocation of its class gets, the cache is bounded, and a thread's
 * blocks are given back when it exits. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pattern.h"
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

static void *mc_malloc(size_t size, void *user) {
  (void)user;
  return sg_memcache_malloc(size);
}
static void *mc_realloc(void *p, size_t size, void *user) {
  (void)user;
  return sg_memcache_realloc(p, size);
}
static void mc_free(void *p, void *user) {
  (void)user;
  sg_memcache_free(p);
}

static void test_blocks(void) {
  static const size_t sizes[] = {0,    1,    63,   64,   65,    1000,  1056, 2104,
                                 5832, 8192, 16384, 16511, 16512, 16513, 70000};
  /* Across classes and into and out of uncached sizes. */
  nghttp2_mem mem = {.malloc = mc_malloc, .realloc = mc_realloc, .free = mc_free};
  pattern_check_allocator(&mem, sizes, sizeof sizes / sizeof sizes[0]);
  uint8_t *z = sg_memcache_calloc(10, 500);
  CHECK(z != NULL);
  int zero = 1;
  for (size_t i = 0; i < 5000; i++)
    zero &= z[i] == 0;
  CHECK(zero);
  CHECK(sg_memcache_calloc(SIZE_MAX / 2, 4) == NULL);
  sg_memcache_free(z);
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

/* A block freed with its size lands in the class the allocation came
 * from, as sg_memcache_free would put it, whatever that size. */
static void test_free_sized(void) {
  static const size_t sizes[] = {0, 1, 64, 65, 1648, 7000, 16512, 16513, 70000};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    size_t n = sizes[i];
    uint8_t *a = sg_memcache_calloc(1, n);
    CHECK(a != NULL);
    if (n > 0)
      a[n - 1] = 0x5a; /* the whole block is usable */
    size_t before = sg_memcache_cached_bytes();
    sg_memcache_free_sized(a, n);
    if (PASSTHROUGH)
      continue;
    if (n > 16512) {
      CHECK(sg_memcache_cached_bytes() == before); /* to malloc */
      continue;
    }
    CHECK(sg_memcache_cached_bytes() > before);
    uint8_t *b = sg_memcache_malloc(n);
    CHECK(b == a);
    sg_memcache_free(b); /* the same class either way */
    uint8_t *c = sg_memcache_malloc(n);
    CHECK(c == a);
    sg_memcache_free_sized(c, n);
  }
  sg_memcache_free_sized(NULL, 10);
  /* Strings: by their length; one cut short lands in a smaller class,
   * where its block is more than big enough. */
  char text[70];
  memset(text, 's', sizeof text - 1);
  text[sizeof text - 1] = '\0'; /* 70 bytes: the second class */
  char *str = sg_memcache_strdup(text);
  CHECK(str != NULL);
  sg_memcache_free_str(str);
  void *again = sg_memcache_malloc(70);
  CHECK(PASSTHROUGH || again == (void *)str);
  sg_memcache_free(again);
  char *cut = sg_memcache_strdup(text);
  CHECK(cut != NULL);
  cut[3] = '\0';
  sg_memcache_free_str(cut); /* the first class */
  uint8_t *small = sg_memcache_malloc(4);
  CHECK(PASSTHROUGH || small == (uint8_t *)cut);
  sg_memcache_free(small);
  sg_memcache_free_str(NULL);
  sg_memcache_release();
  CHECK(sg_memcache_cached_bytes() == 0);
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
  test_free_sized();
  test_threads();
  return check_report("memcache");
}
