/* The per-worker nghttp2 allocator: blocks of every size come back intact,
 * realloc keeps contents, freed blocks are reused and the cache is
 * bounded; and a real nghttp2 session runs on it. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "check.h"
#include "pattern.h"
#include "sparkgate/h2mem.h"

static bool all_zero(const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != 0)
      return false;
  return true;
}

static void test_blocks(void) {
  sg_h2mem *m = sg_h2mem_new();
  CHECK(m != NULL);
  nghttp2_mem *mem = sg_h2mem_nghttp2(m);
  if (mem == NULL) { /* AddressSanitizer build: nghttp2's default */
    sg_h2mem_free(m);
    return;
  }
  static const size_t sizes[] = {0, 1, 15, 16, 17, 31, 32, 33, 100, 500,
                                 1023, 1024, 1025, 4096, 5500, 16384,
                                 20000, 70000};
  /* Across classes and into and out of large and mapped (16 KiB and up)
   * blocks: 5500 grows from the heap into a mapping, 20000 shrinks from a
   * mapping into the heap. */
  pattern_check_allocator(mem, sizes, sizeof sizes / sizeof sizes[0]);
  uint8_t *z = mem->calloc(10, 50, mem->mem_user_data);
  CHECK(z != NULL && all_zero(z, 500));
  uint8_t *zm = mem->calloc(2, 40000, mem->mem_user_data);
  CHECK(zm != NULL && all_zero(zm, 80000));
  mem->free(zm, mem->mem_user_data);
  CHECK(mem->calloc(SIZE_MAX / 2, 4, mem->mem_user_data) == NULL);
  mem->free(z, mem->mem_user_data);
  mem->free(NULL, mem->mem_user_data);
  CHECK(sg_h2mem_cached_bytes(m) > 0);
  /* A freed small block is what the next allocation of its class gets. */
  void *a = mem->malloc(40, mem->mem_user_data);
  mem->free(a, mem->mem_user_data);
  void *b = mem->malloc(50, mem->mem_user_data);
  CHECK(a == b);
  mem->free(b, mem->mem_user_data);
  /* The cache is bounded, however much was freed at once. */
  enum { MANY = 20000 };
  void **many = malloc(MANY * sizeof *many);
  for (size_t i = 0; i < MANY; i++)
    many[i] = mem->malloc(1000, mem->mem_user_data);
  for (size_t i = 0; i < MANY; i++)
    mem->free(many[i], mem->mem_user_data);
  free(many);
  CHECK(sg_h2mem_cached_bytes(m) <= (2u << 20));
  sg_h2mem_free(m);
}

static ssize_t to_buffer(nghttp2_session *s, const uint8_t *data, size_t len,
                         int flags, void *user) {
  (void)s;
  (void)flags;
  size_t *total = user;
  *total += len;
  (void)data;
  return (ssize_t)len;
}

static void test_session(void) {
  sg_h2mem *m = sg_h2mem_new();
  nghttp2_session_callbacks *cbs;
  CHECK(nghttp2_session_callbacks_new(&cbs) == 0);
  nghttp2_session_callbacks_set_send_callback(cbs, to_buffer);
  size_t total = 0;
  nghttp2_session *s;
  CHECK(nghttp2_session_client_new3(&s, cbs, &total, NULL, sg_h2mem_nghttp2(m)) == 0);
  nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, NULL, 0);
  for (int i = 0; i < 200; i++) {
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, 0},
        {(uint8_t *)":scheme", (uint8_t *)"http", 7, 4, 0},
        {(uint8_t *)":path", (uint8_t *)"/a/b", 5, 4, 0},
        {(uint8_t *)":authority", (uint8_t *)"x", 10, 1, 0},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, 0},
    };
    CHECK(nghttp2_submit_request(s, NULL, nv, 5, NULL, NULL) > 0);
  }
  CHECK(nghttp2_session_send(s) == 0);
  CHECK(total > 200 * 9);
  nghttp2_session_del(s);
  nghttp2_session_callbacks_del(cbs);
  sg_h2mem_free(m);
}

#if !defined(__SANITIZE_ADDRESS__)
/* This binary's mmap, so that h2mem's can be made to fail as it does when
 * a process reaches vm.max_map_count. glibc's malloc maps memory through
 * its own internal entry point, not this one. */
static int fail_mmap;
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  if (fail_mmap) {
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

/* Without mappings the heap serves large blocks, and calloc still zeroes
 * them (only fresh mappings come zeroed). */
static void test_no_mappings(void) {
  sg_h2mem *m = sg_h2mem_new();
  nghttp2_mem *mem = sg_h2mem_nghttp2(m);
  CHECK(mem != NULL);
  fail_mmap = 1;
  uint8_t *dirty = mem->malloc(20000, mem->mem_user_data);
  CHECK(dirty != NULL);
  memset(dirty, 0xff, 20000);
  mem->free(dirty, mem->mem_user_data);
  uint8_t *z = mem->calloc(1, 20000, mem->mem_user_data);
  CHECK(z != NULL && all_zero(z, 20000));
  pattern_fill(z, 20000, 9);
  uint8_t *g = mem->realloc(z, 50000, mem->mem_user_data);
  CHECK(g != NULL);
  CHECK(pattern_same(g, 20000, 9));
  mem->free(g, mem->mem_user_data);
  fail_mmap = 0;
  sg_h2mem_free(m);
}
#endif

int main(void) {
  test_blocks();
  test_session();
#if !defined(__SANITIZE_ADDRESS__)
  test_no_mappings();
#endif
  return check_report("h2mem");
}
