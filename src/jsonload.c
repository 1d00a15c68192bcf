#include "sparkgate/jsonload.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- parsing ----------------------------------------------------------- */

/* jansson's allocations go through these, so that a failure jansson
 * itself ignores is still seen. Per thread: workers parse tokens while the
 * main thread loads a configuration. */
static _Thread_local bool jansson_failed;
static pthread_once_t hook_once = PTHREAD_ONCE_INIT;

static void *hooked_malloc(size_t size) {
  void *p = malloc(size);
  if (p == NULL) {
    jansson_failed = true;
    /* The result is refused anyway; memory to finish with keeps jansson
     * 2.14 off its own broken paths (its string lexer asserts when a
     * buffer it grew short of a byte is scanned again). */
    p = malloc(size);
  }
  return p;
}

static void hooked_free(void *p) { free(p); }

/* The blocks stay malloc's: ones jansson took before the hook was set
 * are freed by it just the same. */
static void install_hook(void) { json_set_alloc_funcs(hooked_malloc, hooked_free); }

static void guard_begin(void) {
  pthread_once(&hook_once, install_hook);
  jansson_failed = false;
}

static json_t *guard_end(json_t *v, const json_error_t *e, bool *oom) {
  /* An empty text: jansson gave up on an allocation without saying so. */
  *oom = jansson_failed ||
         (v == NULL && e != NULL &&
          (json_error_code(e) == json_error_out_of_memory || e->text[0] == '\0'));
  if (*oom) {
    json_decref(v);
    return NULL;
  }
  return v;
}

json_t *sg_jsonload_parse(const char *buf, size_t len, json_error_t *e,
                          bool *oom) {
  guard_begin();
  json_t *v = json_loadb(buf, len, JSON_REJECT_DUPLICATES, e);
  return guard_end(v, e, oom);
}

json_t *sg_jsonload_parse_file(FILE *f, json_error_t *e, bool *oom) {
  guard_begin();
  json_t *v = json_loadf(f, JSON_REJECT_DUPLICATES, e);
  return guard_end(v, e, oom);
}

json_t *sg_jsonload_parse_doc(const char *buf, size_t len, char *err,
                              size_t errlen) {
  json_error_t e;
  bool oom;
  json_t *v = sg_jsonload_parse(buf, len, &e, &oom);
  if (oom)
    snprintf(err, errlen, "out of memory");
  else if (v == NULL)
    snprintf(err, errlen, "not valid JSON (line %d, column %d: %s)", e.line,
             e.column, e.text);
  return v;
}

json_t *sg_jsonload_copy(const json_t *v) {
  bool oom;
  guard_begin();
  json_t *c = json_deep_copy(v);
  return guard_end(c, NULL, &oom);
}

/* ---- classification ---------------------------------------------------- */

const char *sg_jsonload_type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER: return "an integer";
  case JSON_REAL: return "a number with a fraction";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  case JSON_NULL: return "null";
  }
  return "?";
}

sg_jsonload_status sg_jsonload_check_string(const json_t *v) {
  if (v == NULL)
    return SG_JSONLOAD_ABSENT;
  if (!json_is_string(v))
    return SG_JSONLOAD_WRONG_TYPE;
  /* An embedded NUL would make the C string say less than the JSON. */
  if (json_string_length(v) == 0 ||
      strlen(json_string_value(v)) != json_string_length(v))
    return SG_JSONLOAD_BAD_VALUE;
  return SG_JSONLOAD_OK;
}

sg_jsonload_status sg_jsonload_check_int(const json_t *v, int64_t min,
                                         int64_t max, int64_t *out) {
  if (v == NULL)
    return SG_JSONLOAD_ABSENT;
  if (!json_is_integer(v))
    return SG_JSONLOAD_WRONG_TYPE;
  json_int_t n = json_integer_value(v);
  if (n < min || n > max)
    return SG_JSONLOAD_BAD_VALUE;
  *out = (int64_t)n;
  return SG_JSONLOAD_OK;
}

const char *sg_jsonload_next_unknown_key(const json_t *obj,
                                         const char *const *known,
                                         void **iter) {
  void *it = *iter == NULL ? json_object_iter((json_t *)obj)
                           : json_object_iter_next((json_t *)obj, *iter);
  for (; it != NULL; it = json_object_iter_next((json_t *)obj, it)) {
    const char *key = json_object_iter_key(it);
    bool found = false;
    for (size_t i = 0; known[i] != NULL && !found; i++)
      found = strcmp(known[i], key) == 0;
    if (!found) {
      *iter = it;
      return key;
    }
  }
  *iter = NULL;
  return NULL;
}

void sg_jsonload_key_path(char *out, size_t outlen, const char *path,
                          const char *key) {
  if (path[0] == '\0')
    snprintf(out, outlen, "%s", key);
  else
    snprintf(out, outlen, "%s.%s", path, key);
}

char *sg_jsonload_resolve(const char *base_dir, const char *name) {
  if (name[0] == '/' || base_dir == NULL || base_dir[0] == '\0')
    return strdup(name);
  size_t bl = strlen(base_dir), nl = strlen(name);
  char *p = malloc(bl + 1 + nl + 1);
  if (p == NULL)
    return NULL;
  memcpy(p, base_dir, bl);
  size_t o = bl;
  if (base_dir[bl - 1] != '/')
    p[o++] = '/';
  memcpy(p + o, name, nl + 1);
  return p;
}

/* No open() or read() of a file gives this errno on Linux: it stands for
 * "opened, but a FIFO, a device or a socket" (see sg_jsonload_fopen). */
#define ERR_NOT_REGULAR EMEDIUMTYPE

const char *sg_jsonload_strerror(int errnum) {
  if (errnum == ERR_NOT_REGULAR)
    return "is not a regular file (a FIFO, a device or a socket)";
  return errnum == ENOMEM ? "out of memory" : strerror(errnum);
}

/* ---- reporting --------------------------------------------------------- */

void sg_jsonload_error(sg_jsonload *ld, const char *json_path,
                       const char *fmt, ...) {
  char msg[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  ld->errors++;
  if (ld->report != NULL)
    ld->report(ld->ctx, json_path, msg);
}

void sg_jsonload_oom(sg_jsonload *ld, const char *json_path) {
  sg_jsonload_error(ld, json_path, "out of memory while loading %s",
                    ld->what != NULL ? ld->what : "the configuration");
}

void sg_jsonload_check_keys(sg_jsonload *ld, const json_t *obj,
                            const char *path, const char *const *known) {
  const char *doc = ld->doc != NULL ? ld->doc : "docs/configuration.md";
  void *iter = NULL;
  const char *key;
  while ((key = sg_jsonload_next_unknown_key(obj, known, &iter)) != NULL) {
    char kp[256];
    sg_jsonload_key_path(kp, sizeof kp, path, key);
    if (!ld->list_known_keys) {
      sg_jsonload_error(ld, kp, "unknown key (check the spelling against %s)",
                        doc);
      continue;
    }
    char list[256] = "";
    size_t used = 0;
    for (size_t i = 0; known[i] != NULL && used < sizeof list; i++)
      used += (size_t)snprintf(list + used, sizeof list - used, "%s%s",
                               i ? ", " : "", known[i]);
    sg_jsonload_error(ld, kp, "unknown key (the keys here are: %s; see %s)",
                      list, doc);
  }
}

const char *sg_jsonload_string_value(sg_jsonload *ld, const json_t *v,
                                     const char *json_path) {
  switch (sg_jsonload_check_string(v)) {
  case SG_JSONLOAD_OK:
    return json_string_value(v);
  case SG_JSONLOAD_ABSENT:
    sg_jsonload_error(ld, json_path, "missing (a string is required)");
    break;
  case SG_JSONLOAD_WRONG_TYPE:
    sg_jsonload_error(ld, json_path, "must be a string, not %s",
                      sg_jsonload_type_name(v));
    break;
  case SG_JSONLOAD_BAD_VALUE:
    sg_jsonload_error(ld, json_path,
                      "must be a non-empty string without NUL bytes");
    break;
  }
  return NULL;
}

const char *sg_jsonload_string(sg_jsonload *ld, const json_t *obj,
                               const char *path, const char *key,
                               bool required) {
  json_t *v = json_object_get(obj, key);
  if (v == NULL && !required)
    return NULL;
  char kp[256];
  sg_jsonload_key_path(kp, sizeof kp, path, key);
  return sg_jsonload_string_value(ld, v, kp);
}

uint64_t sg_jsonload_uint(sg_jsonload *ld, const json_t *obj, const char *path,
                          const char *key, uint64_t min, uint64_t max,
                          uint64_t dflt) {
  json_t *v = json_object_get(obj, key);
  int64_t n = 0;
  sg_jsonload_status st = sg_jsonload_check_int(v, (int64_t)min, (int64_t)max, &n);
  if (st == SG_JSONLOAD_OK)
    return (uint64_t)n;
  if (st == SG_JSONLOAD_ABSENT)
    return dflt;
  char kp[256];
  sg_jsonload_key_path(kp, sizeof kp, path, key);
  if (st == SG_JSONLOAD_WRONG_TYPE)
    sg_jsonload_error(ld, kp, "must be an integer, not %s",
                      sg_jsonload_type_name(v));
  else
    sg_jsonload_error(ld, kp, "%lld is out of range (%llu to %llu)",
                      (long long)json_integer_value(v),
                      (unsigned long long)min, (unsigned long long)max);
  return dflt;
}

bool sg_jsonload_bool(sg_jsonload *ld, const json_t *obj, const char *path,
                      const char *key, bool dflt) {
  json_t *v = json_object_get(obj, key);
  if (v == NULL)
    return dflt;
  if (!json_is_boolean(v)) {
    char kp[256];
    sg_jsonload_key_path(kp, sizeof kp, path, key);
    sg_jsonload_error(ld, kp, "must be true or false, not %s",
                      sg_jsonload_type_name(v));
    return dflt;
  }
  return json_is_true(v);
}

static json_t *get_typed(sg_jsonload *ld, const json_t *obj, const char *path,
                         const char *key, json_type type, bool required) {
  json_t *v = json_object_get(obj, key);
  if (v != NULL && json_typeof(v) == type)
    return v;
  if (v == NULL && !required)
    return NULL;
  char kp[256];
  sg_jsonload_key_path(kp, sizeof kp, path, key);
  const char *want = type == JSON_OBJECT ? "an object" : "an array";
  if (v == NULL)
    sg_jsonload_error(ld, kp, "missing (%s is required)", want);
  else
    sg_jsonload_error(ld, kp, "must be %s, not %s", want,
                      sg_jsonload_type_name(v));
  return NULL;
}

json_t *sg_jsonload_object(sg_jsonload *ld, const json_t *obj,
                           const char *path, const char *key, bool required) {
  return get_typed(ld, obj, path, key, JSON_OBJECT, required);
}

json_t *sg_jsonload_array(sg_jsonload *ld, const json_t *obj,
                          const char *path, const char *key, bool required) {
  return get_typed(ld, obj, path, key, JSON_ARRAY, required);
}

char *sg_jsonload_strdup(sg_jsonload *ld, const char *json_path,
                         const char *s) {
  if (s == NULL)
    return NULL;
  char *d = strdup(s);
  if (d == NULL)
    sg_jsonload_oom(ld, json_path);
  return d;
}

/* O_NONBLOCK: opening a FIFO nobody writes to would block for ever (the
 * main loop too, at a reload). What is opened is then checked by fstat. */
static FILE *open_checked(const char *path, bool pipes_too) {
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0)
    return NULL;
  struct stat st;
  int err = 0;
  if (fstat(fd, &st) != 0)
    err = errno;
  else if (S_ISDIR(st.st_mode))
    err = EISDIR;
  else if (!S_ISREG(st.st_mode) && !pipes_too)
    err = ERR_NOT_REGULAR;
  /* Reads block again: on a FIFO they wait for its writer, and one that
   * has none gives end of file at once. */
  else if (!S_ISREG(st.st_mode) && fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0)
    err = errno;
  FILE *f = err == 0 ? fdopen(fd, "rb") : NULL;
  if (f == NULL) {
    if (err == 0)
      err = errno;
    close(fd);
    errno = err;
  }
  return f;
}

FILE *sg_jsonload_fopen(const char *path) {
  return open_checked(path, false);
}

FILE *sg_jsonload_fopen_config(const char *path) {
  return open_checked(path, true);
}

char *sg_jsonload_readable(sg_jsonload *ld, const char *json_path,
                           const char *name) {
  char *resolved = sg_jsonload_resolve(ld->base_dir, name);
  if (resolved == NULL) {
    sg_jsonload_oom(ld, json_path);
    return NULL;
  }
  FILE *f = sg_jsonload_fopen(resolved);
  if (f == NULL)
    sg_jsonload_error(ld, json_path, "cannot read '%s': %s", resolved,
                      sg_jsonload_strerror(errno));
  else
    fclose(f);
  return resolved;
}

char *sg_jsonload_file(sg_jsonload *ld, const json_t *obj, const char *path,
                       const char *key, bool required) {
  const char *name = sg_jsonload_string(ld, obj, path, key, required);
  if (name == NULL)
    return NULL;
  char kp[256];
  sg_jsonload_key_path(kp, sizeof kp, path, key);
  return sg_jsonload_readable(ld, kp, name);
}
