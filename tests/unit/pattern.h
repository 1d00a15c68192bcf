/* A byte pattern for tests that check blocks and buffers come back
 * intact: byte i of a block filled with seed s is (uint8_t)(s + i). */
#ifndef SG_TEST_PATTERN_H
#define SG_TEST_PATTERN_H

#include <stddef.h>
#include <stdint.h>

static inline void pattern_fill(uint8_t *p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; i++)
    p[i] = (uint8_t)(seed + i);
}

static inline int pattern_same(const uint8_t *p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != (uint8_t)(seed + i))
      return 0;
  return 1;
}

/* What every allocator here promises, through nghttp2's interface (the
 * shape h2mem has; memcache is wrapped in it): blocks of each size come
 * back 16-aligned and intact, and realloc up to 3x and down to half keeps
 * the contents. The blocks are freed. Needs check.h. */
#ifdef CHECK
#include <nghttp2/nghttp2.h>
static inline void pattern_check_allocator(nghttp2_mem *mem, const size_t *sizes,
                                           size_t n) {
  for (size_t i = 0; i < n; i++) {
    uint8_t *p = mem->malloc(sizes[i], mem->mem_user_data);
    CHECK(p != NULL);
    CHECK(((uintptr_t)p % 16) == 0);
    pattern_fill(p, sizes[i], (uint8_t)i);
    CHECK(pattern_same(p, sizes[i], (uint8_t)i));
    uint8_t *q = mem->realloc(p, sizes[i] * 3 + 7, mem->mem_user_data);
    CHECK(q != NULL);
    CHECK(pattern_same(q, sizes[i], (uint8_t)i));
    size_t down = sizes[i] / 2 + 1;
    uint8_t *r = mem->realloc(q, down, mem->mem_user_data);
    CHECK(r != NULL);
    CHECK(sizes[i] == 0 || pattern_same(r, down < sizes[i] ? down : sizes[i], (uint8_t)i));
    mem->free(r, mem->mem_user_data);
  }
}
#endif

#endif
