/* Access log: every line is one JSON object with every field; bounded,
 * valid-UTF-8 fields; lines from two threads never interleave; a reopen
 * after logrotate's rename sends new lines to the new file; the config
 * sub-object parser. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "sparkgate/accesslog.h"

static char tmpdir[64];

static char *read_file(const char *path) {
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *s = malloc((size_t)n + 1);
  size_t got = fread(s, 1, (size_t)n, f);
  s[got] = '\0';
  fclose(f);
  return s;
}

/* Parses every line as a JSON object with the fixed key set; returns the
 * number of lines, or -1 on the first bad line. Counts lines whose
 * "identity" equals |who| into |*matching| when non-NULL. */
static int check_lines(const char *text, const char *who, int *matching) {
  int n = 0;
  const char *line = text;
  while (*line != '\0') {
    const char *eol = strchr(line, '\n');
    if (eol == NULL) {
      fprintf(stderr, "unterminated line: %s\n", line);
      return -1;
    }
    json_error_t e;
    json_t *o = json_loadb(line, (size_t)(eol - line), 0, &e);
    if (!json_is_object(o)) {
      fprintf(stderr, "bad line (%s): %.*s\n", e.text, (int)(eol - line), line);
      json_decref(o);
      return -1;
    }
    static const char *const keys[] = {"time", "conn_id", "stream_id", "client", "identity",
                                       "tenant", "method", "session_id", "backend",
                                       "grpc_status", "bytes_in", "bytes_out", "duration_ms"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
      if (json_object_get(o, keys[i]) == NULL) {
        fprintf(stderr, "line without %s\n", keys[i]);
        json_decref(o);
        return -1;
      }
    }
    if (matching != NULL && who != NULL &&
        strcmp(json_string_value(json_object_get(o, "identity")), who) == 0)
      (*matching)++;
    json_decref(o);
    n++;
    line = eol + 1;
  }
  return n;
}

static void test_format(void) {
  struct tm tm = {.tm_year = 2026 - 1900, .tm_mon = 10, .tm_mday = 26, .tm_hour = 12};
  sg_access_record r = {
      .time = {timegm(&tm), 123456789},
      .conn_id = 12,
      .stream_id = 3,
      .client = "10.0.0.7:51234",
      .identity = "al\"ice\n",
      .tenant = "default",
      .method = "/spark.connect.SparkConnectService/ExecutePlan",
      .session_id = "6f1c2b7e-0000-4000-8000-000000000001",
      .backend = "spark-1",
      .grpc_status = 0,
      .bytes_in = 120,
      .bytes_out = 40960,
      .duration_ms = 12.3456,
  };
  char *line = sg_accesslog_format(&r);
  CHECK(line != NULL);
  size_t len = strlen(line);
  CHECK(len > 0 && line[len - 1] == '\n');
  CHECK(strchr(line, '\n') == line + len - 1); /* one line, escapes inside */
  CHECK(strncmp(line, "{\"time\":\"2026-11-26T12:00:00.123Z\",\"conn_id\":12,", 48) == 0);
  json_t *o = json_loads(line, 0, NULL);
  CHECK(json_is_object(o));
  CHECK(strcmp(json_string_value(json_object_get(o, "time")), "2026-11-26T12:00:00.123Z") == 0);
  CHECK(json_integer_value(json_object_get(o, "conn_id")) == 12);
  CHECK(json_integer_value(json_object_get(o, "stream_id")) == 3);
  CHECK(strcmp(json_string_value(json_object_get(o, "client")), "10.0.0.7:51234") == 0);
  CHECK(strcmp(json_string_value(json_object_get(o, "identity")), "al\"ice\n") == 0);
  CHECK(strcmp(json_string_value(json_object_get(o, "tenant")), "default") == 0);
  CHECK(strcmp(json_string_value(json_object_get(o, "method")),
               "/spark.connect.SparkConnectService/ExecutePlan") == 0);
  CHECK(strcmp(json_string_value(json_object_get(o, "session_id")),
               "6f1c2b7e-0000-4000-8000-000000000001") == 0);
  CHECK(strcmp(json_string_value(json_object_get(o, "backend")), "spark-1") == 0);
  CHECK(json_integer_value(json_object_get(o, "grpc_status")) == 0);
  CHECK(json_integer_value(json_object_get(o, "bytes_in")) == 120);
  CHECK(json_integer_value(json_object_get(o, "bytes_out")) == 40960);
  CHECK(json_is_real(json_object_get(o, "duration_ms")));
  CHECK(json_real_value(json_object_get(o, "duration_ms")) == 12.346);
  CHECK_STR_CONTAINS(line, "\"duration_ms\":12.346}");
  CHECK(json_object_get(o, "reason") == NULL);
  CHECK(json_object_size(o) == 13);
  json_decref(o);
  free(line);

  /* A rejection: unknowns are null, the reason is there. */
  sg_access_record rej = {.conn_id = 1, .stream_id = 1, .client = "[::1]:40000",
                          .method = "/spark.connect.SparkConnectService/Config",
                          .grpc_status = 16, .reason = "missing_token"};
  line = sg_accesslog_format(&rej);
  o = json_loads(line, 0, NULL);
  CHECK(json_is_object(o));
  CHECK(json_is_null(json_object_get(o, "identity")));
  CHECK(json_is_null(json_object_get(o, "tenant")));
  CHECK(json_is_null(json_object_get(o, "session_id")));
  CHECK(json_is_null(json_object_get(o, "backend")));
  CHECK(json_integer_value(json_object_get(o, "grpc_status")) == 16);
  CHECK(strcmp(json_string_value(json_object_get(o, "reason")), "missing_token") == 0);
  /* time {0,0} means now: a well-formed RFC 3339 UTC time with ms. */
  const char *t = json_string_value(json_object_get(o, "time"));
  CHECK(t != NULL && strlen(t) == 24 && t[10] == 'T' && t[19] == '.' && t[23] == 'Z');
  json_decref(o);
  free(line);

  /* No status (reset), invalid UTF-8, an over-long field, a bad duration. */
  char big[1000];
  memset(big, 'a', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  sg_access_record odd = {.identity = "b\xff\xc3(d\xe2\x82\xac", .session_id = big,
                          .grpc_status = -1, .duration_ms = -5};
  line = sg_accesslog_format(&odd);
  CHECK(line != NULL);
  o = json_loads(line, 0, NULL);
  CHECK(json_is_object(o));
  CHECK(json_is_null(json_object_get(o, "grpc_status")));
  CHECK(strcmp(json_string_value(json_object_get(o, "identity")), "b?" "?(d\xe2\x82\xac") == 0);
  CHECK(json_string_length(json_object_get(o, "session_id")) == SG_ACCESSLOG_MAX_FIELD_BYTES);
  CHECK(json_real_value(json_object_get(o, "duration_ms")) == 0);
  json_decref(o);
  free(line);
}

#define LINES_PER_THREAD 300

static void *writer_thread(void *p) {
  const char *who = p;
  for (int i = 0; i < LINES_PER_THREAD; i++) {
    sg_access_record r = {.conn_id = (uint64_t)i, .stream_id = 1, .identity = who,
                          .client = "127.0.0.1:1", .grpc_status = 0, .duration_ms = 1};
    if (sg_accesslog_write(&r) != 0)
      fprintf(stderr, "write failed\n");
  }
  return NULL;
}

static void test_file_and_reopen(void) {
  char path[128], rotated[128], err[256];
  snprintf(path, sizeof path, "%s/access.log", tmpdir);
  snprintf(rotated, sizeof rotated, "%s/access.log.1", tmpdir);
  CHECK(sg_accesslog_open(path, err, sizeof err) == 0);
  struct stat st;
  CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0640);

  /* Two writer threads; logrotate renames the file and we reopen while
   * they write. */
  pthread_t th[2];
  pthread_create(&th[0], NULL, writer_thread, "thread-a");
  pthread_create(&th[1], NULL, writer_thread, "thread-b");
  usleep(1000);
  CHECK(rename(path, rotated) == 0);
  CHECK(sg_accesslog_reopen(err, sizeof err) == 0);
  pthread_join(th[0], NULL);
  pthread_join(th[1], NULL);
  sg_access_record after = {.identity = "after-reopen", .grpc_status = 0};
  CHECK(sg_accesslog_write(&after) == 0);

  char *old_text = read_file(rotated);
  char *new_text = read_file(path);
  CHECK(old_text != NULL && new_text != NULL);
  if (old_text != NULL && new_text != NULL) {
    int a = 0, b = 0, late_old = 0, late_new = 0;
    int n_old = check_lines(old_text, "thread-a", &a);
    int n_new = check_lines(new_text, "thread-a", &a);
    check_lines(old_text, "thread-b", &b);
    check_lines(new_text, "thread-b", &b);
    check_lines(old_text, "after-reopen", &late_old);
    check_lines(new_text, "after-reopen", &late_new);
    CHECK(n_old >= 0 && n_new >= 1);
    /* Every line arrived whole in one of the two files. */
    CHECK(n_old + n_new == 2 * LINES_PER_THREAD + 1);
    CHECK(a == LINES_PER_THREAD);
    CHECK(b == LINES_PER_THREAD);
    /* The line written after the reopen went to the new file only. */
    CHECK(late_old == 0 && late_new == 1);
  }
  free(old_text);
  free(new_text);

  /* A failed open keeps the current destination. */
  char bad[160];
  snprintf(bad, sizeof bad, "%s/no-such-dir/access.log", tmpdir);
  err[0] = '\0';
  CHECK(sg_accesslog_open(bad, err, sizeof err) == -1);
  CHECK_STR_CONTAINS(err, "no-such-dir");
  sg_access_record still = {.identity = "still-here", .grpc_status = 0};
  CHECK(sg_accesslog_write(&still) == 0);
  new_text = read_file(path);
  int still_n = 0;
  CHECK(new_text != NULL && check_lines(new_text, "still-here", &still_n) > 0 && still_n == 1);
  free(new_text);

  /* Switching to another file in place (a reload) keeps working. */
  char other[128];
  snprintf(other, sizeof other, "%s/other.log", tmpdir);
  CHECK(sg_accesslog_open(other, err, sizeof err) == 0);
  sg_access_record moved = {.identity = "moved", .grpc_status = 0};
  CHECK(sg_accesslog_write(&moved) == 0);
  char *other_text = read_file(other);
  int moved_n = 0;
  CHECK(other_text != NULL && check_lines(other_text, "moved", &moved_n) == 1 && moved_n == 1);
  free(other_text);

  /* Back to stderr: a reopen is then a no-op. */
  CHECK(sg_accesslog_open(NULL, err, sizeof err) == 0);
  CHECK(sg_accesslog_reopen(err, sizeof err) == 0);
  sg_accesslog_close();
  unlink(path);
  unlink(rotated);
  unlink(other);
}

typedef struct report_log {
  char text[2048];
  int count;
} report_log;

static void collect(void *ctx, const char *json_path, const char *msg) {
  report_log *l = ctx;
  size_t used = strlen(l->text);
  snprintf(l->text + used, sizeof l->text - used, "%s: %s\n", json_path, msg);
  l->count++;
}

static int parse(const char *json, const char *base_dir, sg_accesslog_config *c,
                 report_log *log) {
  memset(log, 0, sizeof *log);
  json_t *root = json_loads(json, 0, NULL);
  CHECK(root != NULL);
  int rv = sg_accesslog_config_parse(json_object_get(root, "access_log"), "access_log",
                                     base_dir, c, collect, log);
  json_decref(root);
  return rv;
}

static void test_config(void) {
  sg_accesslog_config c;
  report_log log;
  CHECK(parse("{}", "/etc/sparkgate", &c, &log) == 0 && c.path == NULL && log.count == 0);
  CHECK(parse("{\"access_log\": null}", NULL, &c, &log) == 0 && c.path == NULL);
  CHECK(parse("{\"access_log\": {}}", NULL, &c, &log) == 0 && c.path == NULL);
  CHECK(parse("{\"access_log\": {\"path\": null}}", NULL, &c, &log) == 0 && c.path == NULL);
  CHECK(parse("{\"access_log\": {\"path\": \"/var/log/sparkgate/access.log\"}}", "/etc", &c,
              &log) == 0);
  CHECK(c.path != NULL && strcmp(c.path, "/var/log/sparkgate/access.log") == 0);
  sg_accesslog_config_clear(&c);
  CHECK(parse("{\"access_log\": {\"path\": \"logs/a.log\"}}", "/etc/sparkgate", &c, &log) == 0);
  CHECK(c.path != NULL && strcmp(c.path, "/etc/sparkgate/logs/a.log") == 0);
  sg_accesslog_config_clear(&c);

  CHECK(parse("{\"access_log\": {\"path\": \"a.log\", \"rotate\": true}}", NULL, &c, &log) == -1);
  CHECK(c.path == NULL);
  CHECK(log.count == 1);
  CHECK_STR_CONTAINS(log.text, "access_log.rotate: unknown key");
  CHECK(parse("{\"access_log\": {\"path\": 5}}", NULL, &c, &log) == -1);
  CHECK_STR_CONTAINS(log.text, "access_log.path: must be a non-empty file name");
  CHECK(parse("{\"access_log\": {\"path\": \"\"}}", NULL, &c, &log) == -1);
  CHECK_STR_CONTAINS(log.text, "access_log.path: ");
  CHECK(parse("{\"access_log\": \"/tmp/x\"}", NULL, &c, &log) == -1);
  CHECK_STR_CONTAINS(log.text, "access_log: must be an object");
}

/* The load-time check agrees with sg_accesslog_open about symlinks: a
 * link to a file that can be opened passes; a dangling one (its target's
 * directory missing, or only the target missing) is refused at load, not
 * first found out by the open at start or reload. */
static void test_path_writable_follows_symlinks(void) {
  char file[128], good[128], missing_dir[128], missing_file[128], target[160];
  snprintf(file, sizeof file, "%s/real.log", tmpdir);
  snprintf(good, sizeof good, "%s/good-link.log", tmpdir);
  snprintf(missing_dir, sizeof missing_dir, "%s/dangling-dir.log", tmpdir);
  snprintf(missing_file, sizeof missing_file, "%s/dangling-file.log", tmpdir);
  FILE *f = fopen(file, "w");
  CHECK(f != NULL);
  if (f != NULL)
    fclose(f);
  CHECK(symlink(file, good) == 0);
  snprintf(target, sizeof target, "%s/no-such-dir/access.log", tmpdir);
  CHECK(symlink(target, missing_dir) == 0);
  CHECK(symlink("not-there.log", missing_file) == 0); /* relative, same dir */

  CHECK(sg_accesslog_path_writable(file));
  CHECK(sg_accesslog_path_writable(good));
  errno = 0;
  CHECK(!sg_accesslog_path_writable(missing_dir) && errno == ENOENT);
  errno = 0;
  CHECK(!sg_accesslog_path_writable(missing_file) && errno == ENOENT);
  /* What the open would find: neither can be opened. */
  char err[256];
  CHECK(sg_accesslog_open(missing_dir, err, sizeof err) == -1);
  CHECK(sg_accesslog_open(missing_file, err, sizeof err) == -1);
  sg_accesslog_close();
  unlink(good);
  unlink(missing_dir);
  unlink(missing_file);
  unlink(file);
}

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/sg-accesslog-XXXXXX");
  if (mkdtemp(tmpdir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  test_format();
  test_file_and_reopen();
  test_config();
  test_path_writable_follows_symlinks();
  rmdir(tmpdir);
  return check_report("test_accesslog");
}
