#include "sparkgate/log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

volatile sg_log_level sg_log_min_level = SG_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int sg_log_level_parse(const char *name, sg_log_level *out) {
  for (int i = 0; i < 4; i++) {
    if (strcmp(name, level_names[i]) == 0) {
      *out = (sg_log_level)i;
      return 0;
    }
  }
  return -1;
}

const char *sg_log_level_name(sg_log_level level) {
  return (unsigned)level < 4 ? level_names[level] : "?";
}

void sg_log_set_level(sg_log_level level) { sg_log_min_level = level; }

void sg_log_vwrite(sg_log_level level, const char *fmt, va_list ap) {
  /* Format the whole line first and write it with one call, so lines from
   * different worker threads never interleave. */
  char line[2048];
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(line, sizeof line,
                   "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s sparkgate: ",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                   tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                   sg_log_level_name(level));
  if (n < 0)
    return;
  int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
  if (len > sizeof line - 2)
    len = sizeof line - 2;
  line[len++] = '\n';
  fwrite(line, 1, len, stderr);
}

void sg_log_write(sg_log_level level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  sg_log_vwrite(level, fmt, ap);
  va_end(ap);
}
