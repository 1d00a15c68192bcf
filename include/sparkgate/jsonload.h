/* What every configuration loader (config, route, jwt) does with a jansson
 * tree: typed lookups, unknown-key checks, file names relative to the
 * config, and error messages that name the JSON path and the fix; and the
 * parsing of every JSON text sparkgate reads (configuration, key sets,
 * discovery documents, token parts), safe when memory runs out.
 *
 * Two levels. The sg_jsonload_check_* functions only classify a value and
 * report nothing, for a loader with its own wording (jwt.c). The rest
 * report through an sg_jsonload context, in the wording config.c and
 * route.c share ("must be a string, not an integer"). Every problem counts
 * in ld->errors, also when its message cannot be stored, so a load whose
 * error message was lost to a failed allocation still fails. */
#ifndef SPARKGATE_JSONLOAD_H
#define SPARKGATE_JSONLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

/* ---- classification ---------------------------------------------------- */

typedef enum sg_jsonload_status {
  SG_JSONLOAD_ABSENT = 0,  /* NULL: the key is not there */
  SG_JSONLOAD_OK,          /* present and acceptable */
  SG_JSONLOAD_WRONG_TYPE,  /* another JSON type */
  SG_JSONLOAD_BAD_VALUE,   /* the right type, an unacceptable value */
} sg_jsonload_status;

/* "an object", "a string", ... for messages. */
const char *sg_jsonload_type_name(const json_t *v);

/* A non-empty string without NUL bytes. */
sg_jsonload_status sg_jsonload_check_string(const json_t *v);

/* An integer from min to max; *out is set only when OK. */
sg_jsonload_status sg_jsonload_check_int(const json_t *v, int64_t min,
                                         int64_t max, int64_t *out);

/* The next key of |obj| that is not in |known| (NULL-terminated), or NULL.
 * |*iter| starts as NULL. |obj| may be NULL or not an object: no keys. */
const char *sg_jsonload_next_unknown_key(const json_t *obj,
                                         const char *const *known,
                                         void **iter);

/* "path.key", or "key" at the top level (path ""). */
void sg_jsonload_key_path(char *out, size_t outlen, const char *path,
                          const char *key);

/* |name| resolved against |base_dir| (NULL or "": as given), in a new
 * string; NULL only when out of memory. */
char *sg_jsonload_resolve(const char *base_dir, const char *name);

/* ---- parsing ----------------------------------------------------------- */

/* json_loadb / json_loadf with JSON_REJECT_DUPLICATES (with "last one
 * wins" a reviewer can read a setting that is not the one in force), that
 * also fail when jansson ran short of memory anywhere on the way: jansson
 * 2.14 drops a character from a string or key when growing its buffer
 * fails, and goes on. On failure *oom says whether memory was the cause;
 * otherwise |e| says what is wrong with the text. Any thread. */
json_t *sg_jsonload_parse(const char *buf, size_t len, json_error_t *e,
                          bool *oom);
json_t *sg_jsonload_parse_file(FILE *f, json_error_t *e, bool *oom);

/* The same for a document fetched over the network: on failure, |err|
 * says "out of memory" or "not valid JSON (line L, column C: what)". */
json_t *sg_jsonload_parse_doc(const char *buf, size_t len, char *err,
                              size_t errlen);

/* json_deep_copy, or NULL when any part could not be copied (jansson may
 * otherwise return a copy with elements missing). */
json_t *sg_jsonload_copy(const json_t *v);

/* strerror(), but "out of memory" for ENOMEM: a file that cannot be
 * opened for want of memory is not the file's fault. */
const char *sg_jsonload_strerror(int errnum);

/* ---- reporting --------------------------------------------------------- */

/* One problem at a JSON path ("" for the document as a whole). */
typedef void (*sg_jsonload_report_fn)(void *ctx, const char *json_path,
                                      const char *msg);

typedef struct sg_jsonload {
  sg_jsonload_report_fn report; /* may be NULL: only count */
  void *ctx;
  const char *base_dir; /* relative file names resolve here */
  /* Unknown-key errors point the reader to |doc|, and list the keys the
   * object may have when |list_known_keys|. */
  const char *doc;
  bool list_known_keys;
  /* Out-of-memory errors say "out of memory while loading <what>". */
  const char *what;
  size_t errors; /* problems reported so far */
} sg_jsonload;

void sg_jsonload_error(sg_jsonload *ld, const char *json_path,
                       const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Reports that an allocation for |json_path| failed. */
void sg_jsonload_oom(sg_jsonload *ld, const char *json_path);

/* Reports every key of |obj| not in |known| (NULL-terminated): a typo
 * such as "client_certificate" for "client_certificates" must not
 * silently turn a security feature off. */
void sg_jsonload_check_keys(sg_jsonload *ld, const json_t *obj,
                            const char *path, const char *const *known);

/* The string at |json_path|, or NULL after reporting why not. */
const char *sg_jsonload_string_value(sg_jsonload *ld, const json_t *v,
                                     const char *json_path);

/* obj[key] as a string; NULL when absent (reported when |required|) or
 * invalid (reported). */
const char *sg_jsonload_string(sg_jsonload *ld, const json_t *obj,
                               const char *path, const char *key,
                               bool required);

/* obj[key] as an integer from min to max; |dflt| when absent or invalid
 * (reported). */
uint64_t sg_jsonload_uint(sg_jsonload *ld, const json_t *obj, const char *path,
                          const char *key, uint64_t min, uint64_t max,
                          uint64_t dflt);

bool sg_jsonload_bool(sg_jsonload *ld, const json_t *obj, const char *path,
                      const char *key, bool dflt);

/* obj[key] when it is an object (an array); NULL when absent (reported
 * when |required|) or of another type (reported). */
json_t *sg_jsonload_object(sg_jsonload *ld, const json_t *obj,
                           const char *path, const char *key, bool required);
json_t *sg_jsonload_array(sg_jsonload *ld, const json_t *obj,
                          const char *path, const char *key, bool required);

/* A copy of |s| (NULL: NULL), or NULL after reporting out of memory. */
char *sg_jsonload_strdup(sg_jsonload *ld, const char *json_path,
                         const char *s);

/* fopen(path, "rb") for a regular file to read, without blocking: fails
 * with errno EISDIR on a directory (which fopen opens, and whose read
 * error would reach the parser as an empty file), and on a FIFO, a device
 * or a socket with an errno that sg_jsonload_strerror calls "is not a
 * regular file" (a FIFO nobody writes to would block for ever). */
FILE *sg_jsonload_fopen(const char *path);

/* The same for the configuration file named on the command line, which
 * may also be a pipe (`-c <(generate-config)`): one without a writer reads
 * as empty (invalid JSON) instead of blocking. */
FILE *sg_jsonload_fopen_config(const char *path);

/* |name| resolved against ld->base_dir, after checking that the file can
 * be read now (reported when not: finding out on first use is too late).
 * NULL only after reporting out of memory. */
char *sg_jsonload_readable(sg_jsonload *ld, const char *json_path,
                           const char *name);

/* obj[key] as a file name, resolved and checked as above; NULL when
 * absent (reported when |required|), invalid or out of memory. */
char *sg_jsonload_file(sg_jsonload *ld, const json_t *obj, const char *path,
                       const char *key, bool required);

#endif
