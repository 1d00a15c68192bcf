#include "sparkgate/log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

sg_log_level sg_log_min_level = SG_LOG_INFO;

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

void sg_log_set_level(sg_log_level level) {
  __atomic_store_n(&sg_log_min_level, level, __ATOMIC_RELAXED);
}

/* Copies |in| to |out| with every byte outside printable ASCII written
 * as \xNN. Log lines quote what clients choose (header names in
 * nghttp2's messages, session ids, paths): none of it may start a line of
 * its own or drive the terminal that shows the log. Returns the length. */
static size_t escape_into(char *out, size_t cap, const char *in, size_t len) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)in[i];
    if (ch >= 0x20 && ch < 0x7f) {
      if (o + 1 > cap)
        break;
      out[o++] = (char)ch;
    } else {
      if (o + 4 > cap)
        break;
      out[o++] = '\\';
      out[o++] = 'x';
      out[o++] = hex[ch >> 4];
      out[o++] = hex[ch & 0xf];
    }
  }
  return o;
}

void sg_log_vwrite(sg_log_level level, const char *fmt, va_list ap) {
  /* Format the whole line first and write it with one call, so lines from
   * different worker threads never interleave. */
  char msg[2048];
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
  int m = vsnprintf(msg, sizeof msg, fmt, ap);
  size_t mlen = m < 0 ? 0 : (size_t)m;
  if (mlen > sizeof msg - 1)
    mlen = sizeof msg - 1;
  size_t len = (size_t)n + escape_into(line + n, sizeof line - (size_t)n - 1, msg, mlen);
  line[len++] = '\n';
  fwrite(line, 1, len, stderr);
}

void sg_log_write(sg_log_level level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  sg_log_vwrite(level, fmt, ap);
  va_end(ap);
}
