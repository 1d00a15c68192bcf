/* A minimal check harness for unit tests: each failed check prints its
 * place and the test exits non-zero at the end. */
#ifndef SPARKGATE_TESTS_CHECK_H
#define SPARKGATE_TESTS_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_failures;
static int check_count;

#define CHECK(cond)                                                            \
  do {                                                                         \
    check_count++;                                                             \
    if (!(cond)) {                                                             \
      check_failures++;                                                        \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                          \
  } while (0)

#define CHECK_STR_CONTAINS(haystack, needle)                                   \
  do {                                                                         \
    check_count++;                                                             \
    const char *h_ = (haystack);                                               \
    if (h_ == NULL || strstr(h_, (needle)) == NULL) {                          \
      check_failures++;                                                        \
      fprintf(stderr, "%s:%d: '%s' does not contain '%s'\n", __FILE__,        \
              __LINE__, h_ ? h_ : "(null)", (needle));                         \
    }                                                                          \
  } while (0)

static inline int check_report(const char *name) {
  if (check_failures == 0) {
    printf("%s: %d checks passed\n", name, check_count);
    return 0;
  }
  printf("%s: %d of %d checks failed\n", name, check_failures, check_count);
  return 1;
}

#endif
