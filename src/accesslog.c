#include "sparkgate/accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The descriptor workers write to. Set once by the first open and never
 * changed afterwards (later opens dup2 onto it), so a writer that loaded
 * it can never write to a descriptor number that was closed and reused
 * for something else (a client socket). */
static int log_fd = -1;
/* Serializes open/reopen/close; writers never take it. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char *log_path; /* under log_lock; NULL: stderr */

static int open_destination(const char *path, char *err, size_t errlen) {
  int fd;
  if (path == NULL) {
    fd = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
      snprintf(err, errlen, "access log: cannot use stderr: %s", strerror(errno));
  } else {
    /* A file we create is 0640 whatever the umask (the shipped unit's is
     * 0077): the group LogsDirectoryMode= lets in can read it. One that
     * exists keeps its owner's choice. Twice: it may come or go between. */
    fd = -1;
    for (int attempt = 0; attempt < 2 && fd < 0; attempt++) {
      fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0640);
      if (fd >= 0) {
        (void)fchmod(fd, 0640);
      } else if (errno == EEXIST) {
        /* Not blocking: a FIFO nobody reads would hold the start (or the
         * SIGUSR1 reopen) for ever; it fails with ENXIO instead. */
        fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd >= 0) {
          int fl = fcntl(fd, F_GETFL);
          if (fl >= 0)
            (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
        }
        if (fd < 0 && errno != ENOENT)
          break;
      } else {
        break;
      }
    }
    if (fd < 0) {
      int e = errno;
      struct stat st;
      const char *why = strerror(e);
      if (e == ENXIO && stat(path, &st) == 0)
        why = S_ISFIFO(st.st_mode) ? "a FIFO that nobody reads"
              : S_ISSOCK(st.st_mode)
                  ? "a socket, which cannot be opened as a file (a null path writes "
                    "to stderr)"
                  : why;
      snprintf(err, errlen, "access log %s: %s", path, why);
    }
  }
  return fd;
}

/* Called with log_lock held. */
static int install(int fd, char *err, size_t errlen) {
  int cur = __atomic_load_n(&log_fd, __ATOMIC_ACQUIRE);
  if (cur < 0) {
    __atomic_store_n(&log_fd, fd, __ATOMIC_RELEASE);
    return 0;
  }
  int rv = dup3(fd, cur, O_CLOEXEC);
  int saved = errno;
  close(fd);
  if (rv < 0) {
    snprintf(err, errlen, "access log: dup3: %s", strerror(saved));
    return -1;
  }
  return 0;
}

int sg_accesslog_open(const char *path, char *err, size_t errlen) {
  char *copy = NULL;
  if (path != NULL && (copy = strdup(path)) == NULL) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  pthread_mutex_lock(&log_lock);
  int fd = open_destination(path, err, errlen);
  if (fd < 0 || install(fd, err, errlen) != 0) {
    pthread_mutex_unlock(&log_lock);
    free(copy);
    return -1;
  }
  free(log_path);
  log_path = copy;
  pthread_mutex_unlock(&log_lock);
  return 0;
}

int sg_accesslog_reopen(char *err, size_t errlen) {
  int rv = 0;
  pthread_mutex_lock(&log_lock);
  if (log_path != NULL && __atomic_load_n(&log_fd, __ATOMIC_ACQUIRE) >= 0) {
    int fd = open_destination(log_path, err, errlen);
    rv = fd < 0 ? -1 : install(fd, err, errlen);
  }
  pthread_mutex_unlock(&log_lock);
  return rv;
}

void sg_accesslog_close(void) {
  pthread_mutex_lock(&log_lock);
  int fd = __atomic_exchange_n(&log_fd, -1, __ATOMIC_ACQ_REL);
  if (fd >= 0)
    close(fd);
  free(log_path);
  log_path = NULL;
  pthread_mutex_unlock(&log_lock);
}

/* ---- formatting --------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at |s| (at most |n| bytes), or 0. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len;
  unsigned min;
  if (c < 0x80)
    return 1;
  if (c >= 0xc2 && c <= 0xdf) {
    len = 2;
    min = 0x80;
  } else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    min = 0x800;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    min = 0x10000;
  } else {
    return 0;
  }
  if (n < len)
    return 0;
  unsigned cp = c & (0xff >> (len + 1));
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80)
      return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return len;
}

/* Copies at most SG_ACCESSLOG_MAX_FIELD_BYTES of |s| into |buf|, invalid
 * UTF-8 bytes replaced by '?' (jansson refuses invalid UTF-8). */
static size_t sanitize(const char *s, char *buf) {
  size_t n = strnlen(s, SG_ACCESSLOG_MAX_FIELD_BYTES);
  size_t out = 0;
  for (size_t i = 0; i < n;) {
    size_t len = utf8_seq((const unsigned char *)s + i, n - i);
    if (len == 0) {
      buf[out++] = '?';
      i++;
    } else {
      memcpy(buf + out, s + i, len);
      out += len;
      i += len;
    }
  }
  return out;
}

/* Milliseconds with microsecond resolution; printed with 15 significant
 * digits so that 12.345 does not come out as 12.345000000000001. */
static double duration(double ms) {
  if (!(ms >= 0)) /* negative (clock step) or NaN */
    ms = 0;
  if (ms > 1e12)
    ms = 1e12;
  return (double)(uint64_t)(ms * 1000 + 0.5) / 1000;
}

/* One JSON object per thread, built once with every key in order and
 * updated in place for each line: a line costs jansson no allocation and
 * no hashing, where building a fresh object cost a fifth of a small RPC. */
enum {
  F_TIME, F_CONN, F_STREAM, F_CLIENT, F_IDENTITY, F_TENANT, F_METHOD,
  F_SESSION, F_BACKEND, F_STATUS, F_BYTES_IN, F_BYTES_OUT, F_DURATION,
  F_REASON, F_COUNT
};
static const char *const field_names[F_COUNT] = {
    "time", "conn_id", "stream_id", "client", "identity", "tenant", "method",
    "session_id", "backend", "grpc_status", "bytes_in", "bytes_out",
    "duration_ms", "reason"};

typedef struct line_builder {
  json_t *obj;
  json_t *v[F_COUNT]; /* borrowed from obj; v[F_REASON] NULL when absent */
} line_builder;

static pthread_key_t builder_key;
static pthread_once_t builder_once = PTHREAD_ONCE_INIT;

static void builder_free(void *p) {
  line_builder *b = p;
  json_decref(b->obj);
  free(b);
}

static void builder_key_init(void) { pthread_key_create(&builder_key, builder_free); }

static line_builder *builder_get(void) {
  pthread_once(&builder_once, builder_key_init);
  line_builder *b = pthread_getspecific(builder_key);
  if (b != NULL)
    return b;
  b = calloc(1, sizeof *b);
  if (b == NULL || (b->obj = json_object()) == NULL) {
    free(b);
    return NULL;
  }
  for (int i = 0; i < F_REASON; i++) {
    json_t *v = i == F_CONN || i == F_STREAM || i == F_BYTES_IN || i == F_BYTES_OUT
                    ? json_integer(0)
                : i == F_DURATION ? json_real(0)
                                  : json_null();
    if (json_object_set_new(b->obj, field_names[i], v) != 0) {
      builder_free(b);
      return NULL;
    }
    b->v[i] = v;
  }
  pthread_setspecific(builder_key, b);
  return b;
}

/* Puts |v| in place of field |f| (a type change: the one case that touches
 * the object's table). */
static int replace(line_builder *b, int f, json_t *v) {
  if (v == NULL || json_object_set_new(b->obj, field_names[f], v) != 0)
    return -1;
  b->v[f] = v;
  return 0;
}

static int set_string(line_builder *b, int f, const char *s) {
  if (s == NULL)
    return json_is_null(b->v[f]) ? 0 : replace(b, f, json_null());
  char buf[SG_ACCESSLOG_MAX_FIELD_BYTES];
  size_t n = sanitize(s, buf);
  if (b->v[f] != NULL && json_is_string(b->v[f]))
    return json_string_setn_nocheck(b->v[f], buf, n);
  return replace(b, f, json_stringn_nocheck(buf, n));
}

static int set_time(line_builder *b, const struct timespec *t) {
  struct timespec now;
  if (t->tv_sec == 0 && t->tv_nsec == 0) {
    clock_gettime(CLOCK_REALTIME, &now);
    t = &now;
  }
  struct tm tm;
  gmtime_r(&t->tv_sec, &tm);
  char buf[40];
  snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
           tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
           t->tv_nsec / 1000000);
  return set_string(b, F_TIME, buf);
}

/* Formats |r| into |out| (with the newline); returns the length, or 0 on
 * failure, or the size needed (> outlen) when |out| is too small. */
static size_t format_line(const sg_access_record *r, char *out, size_t outlen) {
  line_builder *b = builder_get();
  if (b == NULL)
    return 0;
  int bad = 0;
  bad |= set_time(b, &r->time);
  bad |= json_integer_set(b->v[F_CONN], (json_int_t)r->conn_id);
  bad |= json_integer_set(b->v[F_STREAM], r->stream_id);
  bad |= set_string(b, F_CLIENT, r->client);
  bad |= set_string(b, F_IDENTITY, r->identity);
  bad |= set_string(b, F_TENANT, r->tenant);
  bad |= set_string(b, F_METHOD, r->method);
  bad |= set_string(b, F_SESSION, r->session_id);
  bad |= set_string(b, F_BACKEND, r->backend);
  if (r->grpc_status < 0)
    bad |= json_is_null(b->v[F_STATUS]) ? 0 : replace(b, F_STATUS, json_null());
  else if (json_is_integer(b->v[F_STATUS]))
    bad |= json_integer_set(b->v[F_STATUS], r->grpc_status);
  else
    bad |= replace(b, F_STATUS, json_integer(r->grpc_status));
  bad |= json_integer_set(b->v[F_BYTES_IN], (json_int_t)r->bytes_in);
  bad |= json_integer_set(b->v[F_BYTES_OUT], (json_int_t)r->bytes_out);
  bad |= json_real_set(b->v[F_DURATION], duration(r->duration_ms));
  if (r->reason != NULL) {
    bad |= set_string(b, F_REASON, r->reason);
  } else if (b->v[F_REASON] != NULL) {
    json_object_del(b->obj, field_names[F_REASON]);
    b->v[F_REASON] = NULL;
  }
  if (bad)
    return 0;
  size_t n = json_dumpb(b->obj, out, outlen > 0 ? outlen - 1 : 0,
                        JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15));
  if (n == 0)
    return 0;
  if (n + 1 > outlen)
    return n + 1;
  out[n] = '\n';
  return n + 1;
}

char *sg_accesslog_format(const sg_access_record *r) {
  char stackbuf[4096];
  size_t n = format_line(r, stackbuf, sizeof stackbuf);
  if (n == 0)
    return NULL;
  char *line = malloc(n + 1);
  if (line == NULL)
    return NULL;
  if (n > sizeof stackbuf && format_line(r, line, n + 1) != n)
    n = 0;
  else if (n <= sizeof stackbuf)
    memcpy(line, stackbuf, n);
  if (n == 0) {
    free(line);
    return NULL;
  }
  line[n] = '\0';
  return line;
}

int sg_accesslog_write(const sg_access_record *r) {
  char stackbuf[4096];
  char *line = stackbuf;
  size_t len = format_line(r, stackbuf, sizeof stackbuf);
  if (len > sizeof stackbuf) {
    line = malloc(len);
    if (line == NULL || format_line(r, line, len) != len) {
      free(line);
      return -1;
    }
  }
  if (len == 0)
    return -1;
  int fd = __atomic_load_n(&log_fd, __ATOMIC_ACQUIRE);
  if (fd < 0)
    fd = STDERR_FILENO;
  size_t off = 0;
  int rv = 0;
  /* One write(2) per line; the loop only matters for a short write to a
   * pipe that was full, where atomicity is lost anyway. */
  while (off < len) {
    ssize_t n = write(fd, line + off, len - off);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      rv = -1;
      break;
    }
    off += (size_t)n;
  }
  if (line != stackbuf)
    free(line);
  return rv;
}

/* ---- config ------------------------------------------------------------- */

static void reportf(sg_config_report_fn report, void *ctx, const char *base,
                    const char *key, const char *msg) {
  char path[256];
  if (key != NULL)
    snprintf(path, sizeof path, "%s.%s", base, key);
  else
    snprintf(path, sizeof path, "%s", base);
  report(ctx, path, msg);
}

bool sg_accesslog_path_writable(const char *path) {
  struct stat st;
  if (stat(path, &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      errno = EISDIR;
      return false;
    }
    return access(path, W_OK) == 0;
  }
  if (errno != ENOENT)
    return false;
  /* A symlink whose target does not exist: open_destination never creates
   * through it (O_EXCL refuses an existing name, then the plain open finds
   * no target), so only the link's own directory being writable must not
   * pass. */
  if (lstat(path, &st) == 0) {
    errno = ENOENT;
    return false;
  }
  const char *slash = strrchr(path, '/');
  if (slash == NULL)
    return access(".", W_OK | X_OK) == 0;
  if (slash == path)
    return access("/", W_OK | X_OK) == 0;
  char dir[4096];
  size_t n = (size_t)(slash - path);
  if (n >= sizeof dir) {
    errno = ENAMETOOLONG;
    return false;
  }
  memcpy(dir, path, n);
  dir[n] = '\0';
  return access(dir, W_OK | X_OK) == 0;
}

int sg_accesslog_config_parse(const json_t *value, const char *json_path,
                              const char *base_dir, sg_accesslog_config *out,
                              sg_config_report_fn report, void *ctx) {
  memset(out, 0, sizeof *out);
  out->enabled = true;
  if (value == NULL || json_is_null(value))
    return 0;
  if (!json_is_object(value)) {
    reportf(report, ctx, json_path, NULL,
            "must be an object such as {\"path\": \"/var/log/sparkgate/access.log\"}, "
            "or null");
    return -1;
  }
  int errors = 0;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)value, key, v) {
    if (strcmp(key, "path") == 0) {
      if (json_is_null(v))
        continue;
      if (!json_is_string(v) || json_string_length(v) == 0 ||
          strlen(json_string_value(v)) != json_string_length(v)) {
        reportf(report, ctx, json_path, key,
                "must be a non-empty file name without NUL bytes, or null for stderr");
        errors++;
        continue;
      }
      const char *p = json_string_value(v);
      free(out->path);
      if (p[0] != '/' && base_dir != NULL && base_dir[0] != '\0') {
        size_t n = strlen(base_dir) + strlen(p) + 2;
        out->path = malloc(n);
        if (out->path != NULL)
          snprintf(out->path, n, "%s%s%s", base_dir,
                   base_dir[strlen(base_dir) - 1] == '/' ? "" : "/", p);
      } else {
        out->path = strdup(p);
      }
      if (out->path == NULL) {
        reportf(report, ctx, json_path, key, "out of memory");
        errors++;
      }
    } else if (strcmp(key, "enabled") == 0) {
      if (!json_is_boolean(v)) {
        reportf(report, ctx, json_path, key, "must be true or false");
        errors++;
        continue;
      }
      out->enabled = json_is_true(v);
    } else {
      reportf(report, ctx, json_path, key,
              "unknown key (check the spelling against docs/configuration.md)");
      errors++;
    }
  }
  if (errors > 0) {
    sg_accesslog_config_clear(out);
    return -1;
  }
  return 0;
}

void sg_accesslog_config_clear(sg_accesslog_config *c) {
  free(c->path);
  c->path = NULL;
}
