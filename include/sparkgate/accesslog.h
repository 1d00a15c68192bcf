/* Access log: one JSON object per line, one line per RPC (answered by a
 * backend or rejected by the proxy), compact, in the order below:
 *
 *   {"time":"2026-11-26T12:00:00.123Z","conn_id":12,"stream_id":3,
 *    "client":"10.0.0.7:51234","identity":"alice","tenant":"default",
 *    "method":"/spark.connect.SparkConnectService/ExecutePlan",
 *    "session_id":"6f1c...","backend":"spark-1","grpc_status":0,
 *    "bytes_in":120,"bytes_out":40960,"duration_ms":12.345}
 *
 * plus "reason":"..." for a call the proxy rejected. Unknown values are
 * null (never left out), so every line has the same keys. The record has
 * no field for tokens or other secrets, by design.
 *
 * Destination: stderr (journald) by default, or a file opened with
 * O_APPEND. Each line is written with a single write(2) on one file
 * descriptor number that never changes for the life of the process, so
 * lines from different workers never interleave, and a reopen (SIGUSR1,
 * for logrotate) replaces the file under that number with dup2(2), which
 * is atomic for concurrent writers: a line goes wholly to the old file or
 * wholly to the new one. */
#ifndef SPARKGATE_ACCESSLOG_H
#define SPARKGATE_ACCESSLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <jansson.h>

#ifndef SG_CONFIG_REPORT_FN_DEFINED
#define SG_CONFIG_REPORT_FN_DEFINED
/* Receives one config error: the JSON path of the key ("admin.port") and
 * what is wrong with it. */
typedef void (*sg_config_report_fn)(void *ctx, const char *json_path, const char *msg);
#endif

/* String fields are copied into the line, each cut at a bounded length
 * (SG_ACCESSLOG_MAX_FIELD_BYTES) so that a line stays well under the 4 KiB
 * a pipe writes atomically; invalid UTF-8 bytes become '?'. NULL -> null. */
#define SG_ACCESSLOG_MAX_FIELD_BYTES 256

typedef struct sg_access_record {
  struct timespec time; /* CLOCK_REALTIME; {0,0}: now */
  uint64_t conn_id;
  int32_t stream_id;
  const char *client;     /* peer "addr:port" */
  const char *identity;   /* authenticated identity, NULL when none */
  const char *tenant;     /* NULL when not routed */
  const char *method;     /* the request :path */
  const char *session_id; /* Spark session_id, NULL when not seen */
  const char *backend;    /* NULL when no backend was chosen */
  int grpc_status;        /* -1: none (stream reset) -> null */
  uint64_t bytes_in;      /* request DATA payload bytes from the client */
  uint64_t bytes_out;     /* response DATA payload bytes to the client */
  double duration_ms;
  const char *reason;     /* why the proxy rejected the call; NULL otherwise */
} sg_access_record;

/* Whether |path| is a file we may append to, or one we may create (the
 * configuration's check, before anything opens it); sets errno when not.
 * A symlink must point to an existing file: a dangling one (its target or
 * the target's directory missing) is refused with ENOENT, as opening it
 * would be. */
bool sg_accesslog_path_writable(const char *path);

/* Where the log goes: |path| NULL for stderr, else a file created if
 * missing (mode 0640) and appended to. The first call creates the log's
 * descriptor; later calls (a reload naming another file) switch it in
 * place, thread-safe. On failure returns -1 with a message in |err| and
 * the log keeps its previous destination. */
int sg_accesslog_open(const char *path, char *err, size_t errlen);

/* SIGUSR1: opens the configured file again by name (after logrotate moved
 * it) and swaps it in. A no-op returning 0 for stderr. Thread-safe
 * against concurrent sg_accesslog_write. On failure returns -1 with a
 * message in |err| and keeps writing to the old file. */
int sg_accesslog_reopen(char *err, size_t errlen);

/* Writes one line. Any thread. Before the first sg_accesslog_open the
 * line goes to stderr. Returns 0, or -1 when the line could not be built or
 * written (the caller may count it; it is not logged, to avoid a storm). */
int sg_accesslog_write(const sg_access_record *r);

/* Builds the line (with its trailing newline) into a new string the caller
 * frees; NULL when out of memory. For tests and tools. */
char *sg_accesslog_format(const sg_access_record *r);

/* Closes the descriptor (at exit, after the workers stopped). */
void sg_accesslog_close(void);

/* ---- config: root "access_log" -------------------------------------- */

/* "access_log": {"path": "/var/log/sparkgate/access.log"}
 * Absent "access_log", or "path" absent or null: stderr. A relative path is
 * resolved against |base_dir| (the config file's directory; may be NULL). */
typedef struct sg_accesslog_config {
  char *path;   /* NULL: stderr */
  bool enabled; /* "enabled": false turns the access log off */
} sg_accesslog_config;

/* Parses |value| (the value of the "access_log" key, NULL when absent) into
 * |out|. Every problem goes to |report| with its JSON path under
 * |json_path|; unknown keys are errors. Returns 0, or -1 when anything was
 * reported (|out| is then cleared). */
int sg_accesslog_config_parse(const json_t *value, const char *json_path,
                              const char *base_dir, sg_accesslog_config *out,
                              sg_config_report_fn report, void *ctx);
void sg_accesslog_config_clear(sg_accesslog_config *c);

#endif
