/* Operational log: levelled, one line per event, to stderr (journald) by
 * default. Lines are tagged with the object they concern
 * ("conn=12 stream=3") so an operator can follow one request. */
#ifndef SPARKGATE_LOG_H
#define SPARKGATE_LOG_H

#include <stdarg.h>

typedef enum sg_log_level {
  SG_LOG_DEBUG = 0,
  SG_LOG_INFO = 1,
  SG_LOG_WARN = 2,
  SG_LOG_ERROR = 3,
} sg_log_level;

/* The level is global, set by the main thread (reload) and read by every
 * worker on every log call: a relaxed atomic, which costs a plain load. */
extern sg_log_level sg_log_min_level;

/* Parses "debug", "info", "warn", "error"; returns -1 when unknown. */
int sg_log_level_parse(const char *name, sg_log_level *out);
const char *sg_log_level_name(sg_log_level level);

void sg_log_set_level(sg_log_level level);

/* Checks the level before the arguments are evaluated (Redis does the same):
 * debug lines on the data path cost a compare when disabled. */
#define sg_log(level, ...)                                                     \
  do {                                                                         \
    if ((level) >= __atomic_load_n(&sg_log_min_level, __ATOMIC_RELAXED))      \
      sg_log_write((level), __VA_ARGS__);                                      \
  } while (0)

#define sg_debug(...) sg_log(SG_LOG_DEBUG, __VA_ARGS__)
#define sg_info(...) sg_log(SG_LOG_INFO, __VA_ARGS__)
#define sg_warn(...) sg_log(SG_LOG_WARN, __VA_ARGS__)
#define sg_error(...) sg_log(SG_LOG_ERROR, __VA_ARGS__)
/* An info line written whatever the level: where the process listens
 * (with port 0, only the log says which port the kernel chose). */
#define sg_notice(...) sg_log_write(SG_LOG_INFO, __VA_ARGS__)

void sg_log_write(sg_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void sg_log_vwrite(sg_log_level level, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

#endif
