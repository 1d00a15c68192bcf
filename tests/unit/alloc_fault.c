/* See alloc_fault.h. Every replacement forwards to glibc's own allocator;
 * the only state is a countdown to the failure and a block counter. */
#include "alloc_fault.h"

#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define ALLOC_FAULT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ALLOC_FAULT_ASAN 1
#endif
#endif

#ifdef ALLOC_FAULT_ASAN

bool alloc_fault_available(void) { return false; }
void alloc_fault_arm(unsigned long n) { (void)n; }
unsigned long alloc_fault_disarm(void) { return 0; }
bool alloc_fault_hit(void) { return false; }
void *alloc_fault_raw_malloc(size_t size) { return malloc(size); }
void *alloc_fault_raw_calloc(size_t n, size_t size) { return calloc(n, size); }
void *alloc_fault_raw_realloc(void *p, size_t size) { return realloc(p, size); }
void alloc_fault_raw_free(void *p) { free(p); }
long alloc_fault_outstanding(void) { return 0; }
void alloc_fault_print_site(FILE *to) { (void)to; }
bool alloc_fault_site_has(const char *symbol) {
  (void)symbol;
  return false;
}
void alloc_fault_record_begin(void) {}
unsigned long alloc_fault_record_end(void) { return 0; }
const char *alloc_fault_recorded_object(unsigned long n) {
  (void)n;
  return NULL;
}

#else

/* glibc's allocator under its exported internal names. */
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);
extern void __libc_free(void *p);
extern void *__libc_memalign(size_t alignment, size_t size);

/* The project builds with -fvisibility=hidden: the replacements must be
 * exported, or the shared libraries keep calling glibc's. */
#define AF_EXPORT __attribute__((visibility("default")))

#define SITE_FRAMES 24

static atomic_bool armed;
static atomic_ulong countdown; /* attempts left until the failing one */
static atomic_ulong attempts;  /* since arming */
static atomic_bool hit;
static atomic_long outstanding;
static void *site[SITE_FRAMES];
static int site_depth;
/* backtrace() may allocate (its unwinder); those calls must not count. */
static _Thread_local bool in_site;

/* Recorded callers: RECORD_FRAMES return addresses per attempt, from the
 * direct caller of the allocator outwards. Kept with glibc's allocator
 * directly, so recording does not record itself. */
#define RECORD_FRAMES 6
typedef struct record {
  void *frames[RECORD_FRAMES];
} record;
static bool recording;
static record *records;
static unsigned long n_records, records_cap;

static void record_attempt(void *caller) {
  if (n_records == records_cap) {
    unsigned long cap = records_cap ? records_cap * 2 : 4096;
    record *r = __libc_realloc(records, cap * sizeof *r);
    if (r == NULL)
      return;
    records = r;
    records_cap = cap;
  }
  record *r = &records[n_records++];
  memset(r, 0, sizeof *r);
  void *stack[RECORD_FRAMES + 8];
  in_site = true;
  int depth = backtrace(stack, RECORD_FRAMES + 8);
  in_site = false;
  int from = 0;
  while (from < depth && stack[from] != caller)
    from++;
  if (from == depth) {
    r->frames[0] = caller;
    return;
  }
  for (int i = 0; i < RECORD_FRAMES && from + i < depth; i++)
    r->frames[i] = stack[from + i];
}

bool alloc_fault_available(void) { return true; }

/* True when this attempt is the one to fail. */
static bool should_fail_at(void *caller) {
  if (in_site || !atomic_load_explicit(&armed, memory_order_relaxed))
    return false;
  if (recording)
    record_attempt(caller);
  atomic_fetch_add_explicit(&attempts, 1, memory_order_relaxed);
  if (atomic_fetch_sub_explicit(&countdown, 1, memory_order_relaxed) != 1)
    return false;
  atomic_store(&armed, false);
  atomic_store(&hit, true);
  in_site = true;
  site_depth = backtrace(site, SITE_FRAMES);
  in_site = false;
  errno = ENOMEM;
  return true;
}

#define should_fail() should_fail_at(__builtin_return_address(0))

static void *counted(void *p) {
  if (p != NULL)
    atomic_fetch_add_explicit(&outstanding, 1, memory_order_relaxed);
  return p;
}

AF_EXPORT void *malloc(size_t size) {
  if (should_fail())
    return NULL;
  return counted(__libc_malloc(size));
}

AF_EXPORT void *calloc(size_t n, size_t size) {
  if (should_fail())
    return NULL;
  return counted(__libc_calloc(n, size));
}

AF_EXPORT void *realloc(void *p, size_t size) {
  if (p != NULL && size == 0) {
    /* glibc frees the block and returns NULL. */
    atomic_fetch_sub_explicit(&outstanding, 1, memory_order_relaxed);
    return __libc_realloc(p, 0);
  }
  if (should_fail())
    return NULL;
  void *q = __libc_realloc(p, size);
  return p == NULL ? counted(q) : q;
}

AF_EXPORT void *reallocarray(void *p, size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  if (p != NULL && total == 0) {
    atomic_fetch_sub_explicit(&outstanding, 1, memory_order_relaxed);
    return __libc_realloc(p, 0);
  }
  if (should_fail())
    return NULL;
  void *q = __libc_realloc(p, total);
  return p == NULL ? counted(q) : q;
}

AF_EXPORT void free(void *p) {
  if (p == NULL)
    return;
  atomic_fetch_sub_explicit(&outstanding, 1, memory_order_relaxed);
  __libc_free(p);
}

AF_EXPORT void *memalign(size_t alignment, size_t size) {
  if (should_fail())
    return NULL;
  return counted(__libc_memalign(alignment, size));
}

static void *aligned(void *caller, size_t alignment, size_t size) {
  if (should_fail_at(caller))
    return NULL;
  return counted(__libc_memalign(alignment, size));
}

AF_EXPORT void *aligned_alloc(size_t alignment, size_t size) {
  return aligned(__builtin_return_address(0), alignment, size);
}

AF_EXPORT int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0)
    return EINVAL;
  void *p = aligned(__builtin_return_address(0), alignment, size);
  if (p == NULL)
    return ENOMEM;
  *out = p;
  return 0;
}

AF_EXPORT void *valloc(size_t size) {
  return aligned(__builtin_return_address(0), (size_t)sysconf(_SC_PAGESIZE),
                 size);
}

AF_EXPORT void *pvalloc(size_t size) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  return aligned(__builtin_return_address(0), page,
                 (size + page - 1) / page * page);
}

void alloc_fault_arm(unsigned long n) {
  atomic_store(&hit, false);
  atomic_store(&attempts, 0);
  atomic_store(&countdown, n);
  atomic_store(&armed, n > 0);
}

unsigned long alloc_fault_disarm(void) {
  atomic_store(&armed, false);
  return atomic_load(&attempts);
}

bool alloc_fault_hit(void) { return atomic_load(&hit); }

void *alloc_fault_raw_malloc(size_t size) { return __libc_malloc(size); }

void *alloc_fault_raw_calloc(size_t n, size_t size) {
  return __libc_calloc(n, size);
}

void *alloc_fault_raw_realloc(void *p, size_t size) {
  return __libc_realloc(p, size);
}

void alloc_fault_raw_free(void *p) { __libc_free(p); }

long alloc_fault_outstanding(void) { return atomic_load(&outstanding); }

void alloc_fault_record_begin(void) {
  n_records = 0;
  recording = true;
}

unsigned long alloc_fault_record_end(void) {
  recording = false;
  return n_records;
}

const char *alloc_fault_recorded_object(unsigned long n) {
  if (n == 0 || n > n_records)
    return NULL;
  const record *r = &records[n - 1];
  for (int i = 0; i < RECORD_FRAMES && r->frames[i] != NULL; i++) {
    Dl_info info;
    /* A return address points after the call: look one byte back. */
    if (dladdr((char *)r->frames[i] - 1, &info) == 0 || info.dli_fname == NULL)
      return NULL;
    if (strstr(info.dli_fname, "/libc.so") == NULL)
      return info.dli_fname;
  }
  return NULL;
}

void alloc_fault_print_site(FILE *to) {
  fflush(to);
  if (site_depth > 0)
    backtrace_symbols_fd(site, site_depth, fileno(to));
}

bool alloc_fault_site_has(const char *symbol) {
  for (int i = 0; i < site_depth; i++) {
    Dl_info info;
    if (dladdr((char *)site[i] - 1, &info) != 0 && info.dli_sname != NULL &&
        strcmp(info.dli_sname, symbol) == 0)
      return true;
  }
  return false;
}

#endif

void alloc_fault_require(const char *name) {
  if (!alloc_fault_available()) {
    printf("%s: SKIP (allocation-failure injection does not work under "
           "AddressSanitizer)\n", name);
    fflush(stdout);
    exit(77);
  }
#ifndef ALLOC_FAULT_ASAN
  /* backtrace() loads its unwinder on first use: do that now, outside
   * any measured region. */
  void *frames[4];
  in_site = true;
  (void)backtrace(frames, 4);
  in_site = false;
#endif
}
