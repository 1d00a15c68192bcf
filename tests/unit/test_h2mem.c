/* The per-worker nghttp2 allocator: blocks of every size come back intact,
 * realloc keeps contents, freed blocks are reused and the cache is
 * bounded; and a real nghttp2 session runs on it. A session's view puts
 * the large blocks of its creation on mappings, and a trim gives back
 * their pages without changing what nghttp2 sends. */
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
  /* Across classes and into and out of large blocks. */
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

static size_t n_maps(const sg_h2mem_session *s) {
  size_t n = 0;
  for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++)
    n += s->maps[i].p != NULL;
  return n;
}

static bool is_map(const sg_h2mem_session *s, const void *p) {
  for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++)
    if (s->maps[i].p == p)
      return true;
  return false;
}

/* Resident pages of [p, p + len), p on a page. */
static size_t resident_pages(const void *p, size_t len) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE), n = (len + page - 1) / page, r = 0;
  unsigned char *vec = malloc(n);
  CHECK(vec != NULL && mincore((void *)(uintptr_t)p, len, vec) == 0);
  for (size_t i = 0; i < n; i++)
    r += vec[i] & 1;
  free(vec);
  return r;
}

/* While the session is being created, blocks of a page and more are
 * mappings (calloc'd ones zero); after, the worker's heap serves, and a
 * realloc moves a block across; every block stays intact. */
static void test_session_blocks(void) {
  sg_h2mem *m = sg_h2mem_new();
  sg_h2mem_session *sv = sg_h2mem_session_new(m);
  CHECK(sv != NULL);
  nghttp2_mem *mem = sg_h2mem_session_nghttp2(sv);
  CHECK(mem != NULL);
  void *ud = mem->mem_user_data;
  static const size_t sizes[] = {0, 1, 100, 1024, 4095, 4096, 5500, 16394, 70000};
  pattern_check_allocator(mem, sizes, sizeof sizes / sizeof sizes[0]);
  CHECK(n_maps(sv) == 0); /* all given back, and unmapped */
  uint8_t *table = mem->calloc(256, 16, ud);
  uint8_t *frames = mem->realloc(NULL, 16394, ud);
  uint8_t *small = mem->malloc(2000, ud);
  CHECK(is_map(sv, table) && is_map(sv, frames) && !is_map(sv, small));
  CHECK(all_zero(table, 4096));
  /* Both slots taken: the heap serves, calloc still zeroes. */
  uint8_t *third = mem->calloc(1, 8192, ud);
  CHECK(third != NULL && !is_map(sv, third) && all_zero(third, 8192));
  mem->free(third, ud);
  sg_h2mem_session_created(sv);
  pattern_fill(frames, 16394, 3);
  /* Shrinking in place, then growing out of the mapping onto the heap. */
  CHECK(mem->realloc(frames, 9000, ud) == frames && pattern_same(frames, 9000, 3));
  uint8_t *grown = mem->realloc(frames, 40000, ud);
  CHECK(grown != NULL && !is_map(sv, grown) && pattern_same(grown, 9000, 3));
  CHECK(n_maps(sv) == 1);
  /* After creation nothing is mapped any more (a large header's buffer
   * per call would be an mmap per call). */
  uint8_t *late = mem->malloc(20000, ud);
  CHECK(late != NULL && !is_map(sv, late));
  mem->free(late, ud);
  mem->free(grown, ud);
  mem->free(small, ud);
  mem->free(table, ud);
  CHECK(n_maps(sv) == 0);
  /* A block that outlives its session (a header buffer a stream keeps)
   * is freed through the view, reused by the next session. */
  uint8_t *kept = mem->malloc(300, ud);
  sg_h2mem_session_release(sv);
  sg_h2mem_session *next = sg_h2mem_session_new(m);
  CHECK(next == sv);
  mem->free(kept, ud);
  /* Out of mappings: the heap serves while creating too. */
  fail_mmap = 1;
  uint8_t *z = mem->calloc(1, 20000, ud);
  CHECK(z != NULL && n_maps(next) == 0 && all_zero(z, 20000));
  fail_mmap = 0;
  mem->free(z, ud);
  sg_h2mem_session_created(next);
  /* A mapping the session did not give back goes with the view. */
  sg_h2mem_session_release(next);
  CHECK(sg_h2mem_session_new(m) == next && n_maps(next) == 0);
  CHECK(mem->malloc(20000, ud) != NULL && n_maps(next) == 1);
  sg_h2mem_session_release(next);
  CHECK(n_maps(next) == 0);
  sg_h2mem_free(m);
}

/* Pages all zero are given back, pages holding anything stay; the frame
 * buffer goes whole, and only when the session's output is idle. */
static void test_trim_pages(void) {
  sg_h2mem *m = sg_h2mem_new();
  sg_h2mem_session *sv = sg_h2mem_session_new(m);
  nghttp2_mem *mem = sg_h2mem_session_nghttp2(sv);
  void *ud = mem->mem_user_data;
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  uint8_t *table = mem->calloc(3, page, ud);
  uint8_t *frames = mem->malloc(4 * page + 10, ud);
  sg_h2mem_session_created(sv);
  CHECK(resident_pages(table, 3 * page) == 0); /* fresh: nothing touched */
  table[0] = 1;
  table[page + 5] = 7;
  table[page + 5] = 0; /* the second page touched, zero again */
  table[2 * page + 9] = 2;
  memset(frames, 0xab, 2 * page);
  CHECK(resident_pages(table, 3 * page) == 3);
  sg_h2mem_session_trim(sv, false);
  CHECK(resident_pages(table, 3 * page) == 2);
  CHECK(table[0] == 1 && table[page + 5] == 0 && table[2 * page + 9] == 2);
  CHECK(resident_pages(frames, 5 * page) == 2); /* output busy: kept */
  CHECK(frames[page + 1] == 0xab);
  sg_h2mem_session_trim(sv, true);
  CHECK(resident_pages(frames, 5 * page) == 0);
  CHECK(resident_pages(table, 3 * page) == 2);
  frames[0] = 5; /* usable as before */
  CHECK(frames[0] == 5);
  mem->free(table, ud);
  mem->free(frames, ud);
  sg_h2mem_session_release(sv);
  sg_h2mem_free(m);
}

/* A client session on a session view, against a server session, trimmed
 * between rounds of calls once every stream is closed: it sends the very
 * bytes a client on the worker's allocator sends, and all its calls end. */
typedef struct peer_pair {
  nghttp2_session *client, *server;
  uint8_t *sent; /* everything the client sent */
  size_t sent_len, sent_cap;
  int closed;
} peer_pair;

static int pair_on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                              void *user) {
  (void)user;
  if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST &&
      (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
    nghttp2_nv nv[] = {{(uint8_t *)":status", (uint8_t *)"200", 7, 3, 0},
                       {(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1, 0}};
    CHECK(nghttp2_submit_response(session, frame->hd.stream_id, nv, 2, NULL) == 0);
  }
  return 0;
}

static int pair_on_close(nghttp2_session *session, int32_t id, uint32_t code, void *user) {
  (void)id;
  peer_pair *pp = user;
  CHECK(code == 0);
  if (session == pp->client)
    pp->closed++;
  return 0;
}

static void pair_pump(peer_pair *pp) {
  for (int i = 0; i < 100 && (nghttp2_session_want_write(pp->client) ||
                              nghttp2_session_want_write(pp->server)); i++) {
    const uint8_t *d;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(pp->client, &d)) > 0) {
      if (pp->sent_len + (size_t)n > pp->sent_cap) {
        pp->sent_cap = (pp->sent_len + (size_t)n) * 2;
        pp->sent = realloc(pp->sent, pp->sent_cap);
        CHECK(pp->sent != NULL);
      }
      memcpy(pp->sent + pp->sent_len, d, (size_t)n);
      pp->sent_len += (size_t)n;
      CHECK(nghttp2_session_mem_recv(pp->server, d, (size_t)n) == n);
    }
    while ((n = nghttp2_session_mem_send(pp->server, &d)) > 0)
      CHECK(nghttp2_session_mem_recv(pp->client, d, (size_t)n) == n);
  }
}

static void pair_calls(peer_pair *pp, int n) {
  static const char *big = "x-big";
  char value[6000];
  memset(value, 'v', sizeof value); /* a header past a page: not mapped */
  for (int i = 0; i < n; i++) {
    nghttp2_nv nv[] = {
        {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, 0},
        {(uint8_t *)":scheme", (uint8_t *)"http", 7, 4, 0},
        {(uint8_t *)":path", (uint8_t *)"/spark.connect.SparkConnectService/Config", 5, 41, 0},
        {(uint8_t *)":authority", (uint8_t *)"x", 10, 1, 0},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, 0},
        {(uint8_t *)big, (uint8_t *)value, 5, (size_t)(i == 0 ? sizeof value : 1), 0},
    };
    CHECK(nghttp2_submit_request(pp->client, NULL, nv, 6, NULL, NULL) > 0);
  }
  pair_pump(pp);
}

static void pair_open(peer_pair *pp, nghttp2_mem *client_mem) {
  memset(pp, 0, sizeof *pp);
  nghttp2_session_callbacks *cbs;
  CHECK(nghttp2_session_callbacks_new(&cbs) == 0);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, pair_on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, pair_on_close);
  CHECK(nghttp2_session_client_new3(&pp->client, cbs, pp, NULL, client_mem) == 0);
  CHECK(nghttp2_session_server_new(&pp->server, cbs, pp) == 0);
  nghttp2_session_callbacks_del(cbs);
  CHECK(nghttp2_submit_settings(pp->client, NGHTTP2_FLAG_NONE, NULL, 0) == 0);
  CHECK(nghttp2_submit_settings(pp->server, NGHTTP2_FLAG_NONE, NULL, 0) == 0);
  pair_pump(pp);
}

static void pair_close(peer_pair *pp) {
  nghttp2_session_del(pp->client);
  nghttp2_session_del(pp->server);
  free(pp->sent);
}

static void test_trim_session(void) {
  sg_h2mem *m = sg_h2mem_new();
  sg_h2mem_session *sv = sg_h2mem_session_new(m);
  peer_pair trimmed, plain;
  pair_open(&trimmed, sg_h2mem_session_nghttp2(sv));
  sg_h2mem_session_created(sv);
  pair_open(&plain, sg_h2mem_nghttp2(m));
  /* nghttp2 1.52's two: its stream table and its frame buffer. */
  CHECK(n_maps(sv) == 2);
  for (int round = 0; round < 4; round++) {
    pair_calls(&trimmed, 10 + round);
    pair_calls(&plain, 10 + round);
    CHECK(!nghttp2_session_want_write(trimmed.client));
    sg_h2mem_session_trim(sv, true);
    for (size_t i = 0; i < SG_H2MEM_SESSION_MAPS; i++)
      CHECK(resident_pages(sv->maps[i].p, sv->maps[i].len) == 0);
  }
  CHECK(trimmed.closed == 10 + 11 + 12 + 13);
  CHECK(plain.closed == trimmed.closed);
  CHECK(trimmed.sent_len == plain.sent_len && trimmed.sent_len > 0);
  CHECK(memcmp(trimmed.sent, plain.sent, plain.sent_len) == 0);
  pair_close(&trimmed);
  pair_close(&plain);
  CHECK(n_maps(sv) == 0);
  sg_h2mem_session_release(sv);
  sg_h2mem_free(m);
}
#endif

int main(void) {
  test_blocks();
  test_session();
#if !defined(__SANITIZE_ADDRESS__)
  test_session_blocks();
  test_trim_pages();
  test_trim_session();
#endif
  return check_report("h2mem");
}
