/* Allocation-failure injection for unit tests (nghttp2's failmalloc idea).
 *
 * A test executable that links alloc_fault.c defines malloc, calloc,
 * realloc, free and the aligned allocators itself. The executable's
 * symbols interpose for every shared library, so the count covers
 * sparkgate's own code and jansson, libjwt, OpenSSL, nghttp2, libevent and
 * libc internals (strdup, asprintf, fopen) alike. Each call forwards to
 * glibc's allocator (__libc_malloc and friends).
 *
 * A sweep arms failure n (1, 2, 3, ...), runs the code under test, and
 * disarms: exactly the n-th allocation attempt after arming returns NULL
 * with errno ENOMEM; every other one succeeds. A realloc counts as an
 * attempt; a realloc that fails keeps the old block (as C says).
 *
 * AddressSanitizer owns malloc: under it nothing is interposed and
 * alloc_fault_require() ends the test with 77 (meson: skipped). */
#ifndef SPARKGATE_TESTS_ALLOC_FAULT_H
#define SPARKGATE_TESTS_ALLOC_FAULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* Whether allocations are interposed in this build (false under ASan). */
bool alloc_fault_available(void);

/* Prints "<name>: SKIP (...)" and exits 77 when not available. */
void alloc_fault_require(const char *name);

/* The n-th allocation attempt from now (n >= 1) fails; only that one. */
void alloc_fault_arm(unsigned long n);
/* No allocation fails; returns how many attempts were made since arming. */
unsigned long alloc_fault_disarm(void);
/* Whether the armed failure has happened since the last arm. */
bool alloc_fault_hit(void);

/* For the test's own needs while a failure is armed (a client session,
 * say): glibc's allocator directly, never failed and never counted. */
void *alloc_fault_raw_malloc(size_t size);
void *alloc_fault_raw_calloc(size_t n, size_t size);
void *alloc_fault_raw_realloc(void *p, size_t size);
void alloc_fault_raw_free(void *p);

/* Blocks allocated and not yet freed, process-wide, counted from the first
 * allocation: compare before and after to find a leak. */
long alloc_fault_outstanding(void);

/* Writes the call stack of the last injected failure to |to| (symbols as
 * far as the dynamic symbol table knows them). */
void alloc_fault_print_site(FILE *to);

/* Whether exported function |symbol| is on that call stack. */
bool alloc_fault_site_has(const char *symbol);

/* Recording: where each allocation attempt made while armed comes from,
 * so that a sweep can tell sparkgate's own allocations from those deep
 * inside a library. Attempts are numbered from 1 as alloc_fault_arm
 * counts them; arm with ULONG_MAX to record a run without a failure. */
void alloc_fault_record_begin(void);
/* Stops recording; returns the number of attempts recorded. */
unsigned long alloc_fault_record_end(void);
/* The file name of the object (the test executable, "libcrypto.so.3",
 * ...) of the innermost caller of attempt |n| that is not in libc: libc's
 * strdup or fopen allocate for whoever called them. NULL when unknown. */
const char *alloc_fault_recorded_object(unsigned long n);

#endif
