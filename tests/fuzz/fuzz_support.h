/* What every fuzz target shares: the property check and, for the targets
 * that open sockets, a count of the process's open file descriptors. */
#ifndef SPARKGATE_FUZZ_SUPPORT_H
#define SPARKGATE_FUZZ_SUPPORT_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* A property of the code under test does not hold: a finding, like a
 * sanitizer report (libFuzzer keeps the input). */
#define FUZZ_CHECK(cond)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: property violated: %s\n", __FILE__, __LINE__,    \
              #cond);                                                          \
      abort();                                                                 \
    }                                                                          \
  } while (0)

/* Open descriptors of this process, or -1. */
static inline int fuzz_count_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL)
    return -1;
  int n = 0;
  while (readdir(d) != NULL)
    n++;
  closedir(d);
  return n;
}

/* Prints every open descriptor and what it is, for a leak report. */
static inline void fuzz_list_fds(const char *who) {
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL)
    return;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    char link[300], target[256];
    snprintf(link, sizeof link, "/proc/self/fd/%s", e->d_name);
    ssize_t n = readlink(link, target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    fprintf(stderr, "%s: fd %s -> %s\n", who, e->d_name, target);
  }
  closedir(d);
}

#endif
