/* Metrics: per-worker recording from two threads, the Prometheus text
 * (parsed back: grammar, HELP/TYPE once per family, exact values,
 * cumulative histogram buckets, label escaping), bounded labels, and what
 * a reload does to counters. */
#include <pthread.h>
#include <stdlib.h>

#include <event2/buffer.h>

#include "check.h"
#include "sparkgate/metrics.h"

static const char *const auth_reasons[] = {"missing_token", "bad_signature", "expired"};
static const char *const tls_reasons[] = {"no_alpn_h2", "handshake_timeout"};

static char *render(sg_metrics *m) {
  struct evbuffer *b = evbuffer_new();
  CHECK(sg_metrics_render(m, b) == 0);
  size_t len = evbuffer_get_length(b);
  char *s = malloc(len + 2);
  s[0] = '\n'; /* so that every line, the first too, follows a newline */
  evbuffer_remove(b, s + 1, len);
  s[len + 1] = '\0';
  evbuffer_free(b);
  return s;
}

/* The value of the sample whose name and labels are exactly |series|, or
 * -1 when there is no such line. */
static double sample(const char *text, const char *series) {
  size_t n = strlen(series);
  for (const char *p = text; (p = strstr(p, series)) != NULL; p++) {
    if (p[-1] == '\n' && p[n] == ' ')
      return strtod(p + n + 1, NULL);
  }
  return -1;
}

static int count_occurrences(const char *text, const char *needle) {
  int n = 0;
  for (const char *p = text; (p = strstr(p, needle)) != NULL; p += strlen(needle))
    n++;
  return n;
}

static bool name_char(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
         (!first && c >= '0' && c <= '9');
}

/* Checks the text format 0.0.4 grammar line by line, and that every
 * sample belongs to a family announced once, by HELP then TYPE, before
 * its first sample. Returns the number of problems. */
static int check_exposition(const char *text) {
  int problems = 0;
  char families[128][96];
  int n_families = 0;
  const char *line = text + 1;
  while (*line != '\0') {
    const char *eol = strchr(line, '\n');
    if (eol == NULL) {
      fprintf(stderr, "last line has no newline\n");
      return problems + 1;
    }
    char buf[1024];
    size_t len = (size_t)(eol - line);
    if (len >= sizeof buf)
      len = sizeof buf - 1;
    memcpy(buf, line, len);
    buf[len] = '\0';
    line = eol + 1;
    if (strncmp(buf, "# HELP ", 7) == 0) {
      char name[96];
      if (sscanf(buf + 7, "%95s", name) != 1)
        problems++;
      for (int i = 0; i < n_families; i++) {
        if (strcmp(families[i], name) == 0) {
          fprintf(stderr, "family %s announced twice\n", name);
          problems++;
        }
      }
      /* The TYPE line must follow. */
      char want[160];
      snprintf(want, sizeof want, "# TYPE %s ", name);
      if (strncmp(line, want, strlen(want)) != 0) {
        fprintf(stderr, "HELP %s not followed by its TYPE\n", name);
        problems++;
      }
      if (n_families < 128)
        snprintf(families[n_families++], sizeof families[0], "%s", name);
      continue;
    }
    if (strncmp(buf, "# TYPE ", 7) == 0) {
      char name[96], type[32];
      if (sscanf(buf + 7, "%95s %31s", name, type) != 2 ||
          (strcmp(type, "counter") != 0 && strcmp(type, "gauge") != 0 &&
           strcmp(type, "histogram") != 0)) {
        fprintf(stderr, "bad TYPE line: %s\n", buf);
        problems++;
      }
      continue;
    }
    if (buf[0] == '#') {
      fprintf(stderr, "unexpected comment: %s\n", buf);
      problems++;
      continue;
    }
    /* name */
    const char *p = buf;
    if (!name_char(*p, true)) {
      fprintf(stderr, "bad metric name: %s\n", buf);
      problems++;
      continue;
    }
    while (name_char(*p, false))
      p++;
    char name[96];
    snprintf(name, sizeof name, "%.*s", (int)(p - buf), buf);
    /* labels */
    if (*p == '{') {
      p++;
      while (*p != '}') {
        if (!name_char(*p, true))
          break;
        while (name_char(*p, false))
          p++;
        if (p[0] != '=' || p[1] != '"')
          break;
        p += 2;
        while (*p != '"' && *p != '\0') {
          if (*p == '\\') {
            if (p[1] != '\\' && p[1] != '"' && p[1] != 'n')
              break;
            p++;
          }
          p++;
        }
        if (*p != '"')
          break;
        p++;
        if (*p == ',')
          p++;
      }
      if (*p != '}') {
        fprintf(stderr, "bad labels: %s\n", buf);
        problems++;
        continue;
      }
      p++;
    }
    if (*p != ' ') {
      fprintf(stderr, "no value: %s\n", buf);
      problems++;
      continue;
    }
    char *end;
    strtod(p + 1, &end);
    if (end == p + 1 || *end != '\0') {
      fprintf(stderr, "bad value: %s\n", buf);
      problems++;
    }
    /* Its family: the name itself, or a histogram's name without the
     * _bucket/_sum/_count suffix. */
    bool known = false;
    for (int i = 0; i < n_families && !known; i++) {
      size_t fl = strlen(families[i]);
      if (strncmp(name, families[i], fl) != 0)
        continue;
      const char *rest = name + fl;
      known = *rest == '\0' || strcmp(rest, "_bucket") == 0 ||
              strcmp(rest, "_sum") == 0 || strcmp(rest, "_count") == 0;
    }
    if (!known) {
      fprintf(stderr, "sample of an unannounced family: %s\n", buf);
      problems++;
    }
  }
  return problems;
}

static void test_method_from_path(void) {
#define M(s) sg_metrics_method_from_path((s), strlen(s))
  CHECK(M("/spark.connect.SparkConnectService/ExecutePlan") == SG_METHOD_EXECUTE_PLAN);
  CHECK(M("/spark.connect.SparkConnectService/AnalyzePlan") == SG_METHOD_ANALYZE_PLAN);
  CHECK(M("/spark.connect.SparkConnectService/Config") == SG_METHOD_CONFIG);
  CHECK(M("/spark.connect.SparkConnectService/AddArtifacts") == SG_METHOD_ADD_ARTIFACTS);
  CHECK(M("/spark.connect.SparkConnectService/ArtifactStatus") == SG_METHOD_ARTIFACT_STATUS);
  CHECK(M("/spark.connect.SparkConnectService/Interrupt") == SG_METHOD_INTERRUPT);
  CHECK(M("/spark.connect.SparkConnectService/ReattachExecute") == SG_METHOD_REATTACH_EXECUTE);
  CHECK(M("/spark.connect.SparkConnectService/ReleaseExecute") == SG_METHOD_RELEASE_EXECUTE);
  CHECK(M("/spark.connect.SparkConnectService/ReleaseSession") == SG_METHOD_RELEASE_SESSION);
  CHECK(M("/spark.connect.SparkConnectService/FetchErrorDetails") ==
        SG_METHOD_FETCH_ERROR_DETAILS);
  CHECK(M("/spark.connect.SparkConnectService/Configx") == SG_METHOD_OTHER);
  CHECK(M("/spark.connect.SparkConnectService/Confi") == SG_METHOD_OTHER);
  CHECK(M("/spark.connect.SparkConnectService/") == SG_METHOD_OTHER);
  CHECK(M("/other.Service/Config") == SG_METHOD_OTHER);
  CHECK(M("") == SG_METHOD_OTHER);
  CHECK(sg_metrics_method_from_path(NULL, 0) == SG_METHOD_OTHER);
  /* Not NUL-terminated: only |len| bytes count. */
  CHECK(sg_metrics_method_from_path("/spark.connect.SparkConnectService/ConfigXYZ", 41) ==
        SG_METHOD_CONFIG);
  CHECK(strcmp(sg_metrics_method_name(SG_METHOD_FETCH_ERROR_DETAILS), "FetchErrorDetails") == 0);
  CHECK(strcmp(sg_metrics_method_name(SG_METHOD_OTHER), "other") == 0);
#undef M
}

#define ROUNDS 1000

typedef struct thread_arg {
  sg_metrics_worker *mw;
  int which;
} thread_arg;

/* Each worker thread records ROUNDS rounds into its own block. */
static void *record_thread(void *p) {
  thread_arg *a = p;
  for (int i = 0; i < ROUNDS; i++) {
    sg_metrics_conn_accepted(a->mw);
    sg_metrics_stream_opened(a->mw);
    /* tenant 0 ("alpha"): Config OK, 3 ms (bucket le=0.005) */
    sg_metrics_rpc_done(a->mw, 0, SG_METHOD_CONFIG, 0, 0.003, 10, 20);
    sg_metrics_stream_closed(a->mw);
    if (a->which == 1) {
      /* worker 1 also: ExecutePlan on the weird tenant, 2 s -> le=2.5 */
      sg_metrics_rpc_done(a->mw, 1, SG_METHOD_EXECUTE_PLAN, 14, 2.0, 1, 1000);
      sg_metrics_auth_failure(a->mw, 1);
      sg_metrics_rpc_done(a->mw, SG_METRICS_TENANT_NONE, SG_METHOD_CONFIG, 16, 0.0001, 0, 0);
    }
    if (i % 2 == 0)
      sg_metrics_conn_closed(a->mw);
  }
  sg_metrics_upstream_connect(a->mw, 0, 1, true);
  sg_metrics_upstream_connect(a->mw, 0, 1, false);
  sg_metrics_tls_handshake_failed(a->mw, 0);
  return NULL;
}

static const char weird_name[] = "we\"ird\\name\nx";

static void test_two_workers(void) {
  sg_metrics_reasons reasons = {auth_reasons, 3, tls_reasons, 2};
  sg_metrics *m = sg_metrics_new(2, &reasons);
  CHECK(m != NULL);
  const char *const alpha_backends[] = {"spark-1", "spark-2"};
  const char *const weird_backends[] = {"b\"1"};
  sg_metrics_tenant_dims tenants[] = {
      {"alpha", alpha_backends, 2},
      {weird_name, weird_backends, 1},
  };
  sg_metrics_dims dims = {tenants, 2};
  sg_metrics_gen *g = sg_metrics_gen_new(m, &dims);
  CHECK(g != NULL);
  sg_metrics_publish(m, g);
  CHECK(sg_metrics_for_worker(g, 2) == NULL);

  pthread_t th[2];
  thread_arg args[2];
  for (int i = 0; i < 2; i++) {
    args[i].mw = sg_metrics_for_worker(g, (unsigned)i);
    args[i].which = i;
    pthread_create(&th[i], NULL, record_thread, &args[i]);
  }
  /* A scrape while the workers record must not disturb them (TSan/ASan
   * see the concurrent reads). */
  char *during = render(m);
  free(during);
  for (int i = 0; i < 2; i++)
    pthread_join(th[i], NULL);

  /* Main-thread events. */
  sg_metrics_reload(m, true);
  sg_metrics_reload(m, false);
  sg_metrics_reload(m, false);
  /* Out-of-range indices and codes land in bounded labels. */
  sg_metrics_worker *w0 = sg_metrics_for_worker(g, 0);
  sg_metrics_auth_failure(w0, 99);
  sg_metrics_tls_handshake_failed(w0, 99);
  sg_metrics_rpc_done(w0, 0, SG_METHOD_ANALYZE_PLAN, 99, 0.5, 0, 0);
  sg_metrics_rpc_done(w0, 0, (sg_metrics_method)42, 0, 1e6, 0, 0);
  sg_metrics_upstream_connect(w0, 7, 0, true); /* ignored */
  sg_metrics_upstream_connect(w0, 0, 7, true); /* ignored */

  char *t = render(m);
  CHECK(check_exposition(t) == 0);

  CHECK(sample(t, "sparkgate_connections_accepted_total") == 2 * ROUNDS);
  CHECK(sample(t, "sparkgate_connections_open") == ROUNDS); /* half closed */
  CHECK(sample(t, "sparkgate_streams_open") == 0);
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"alpha\",method=\"Config\",grpc_status=\"0\"}") ==
        2 * ROUNDS);
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"none\",method=\"Config\",grpc_status=\"16\"}") ==
        ROUNDS);
  /* Escaped label value: backslash, quote and newline. */
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"we\\\"ird\\\\name\\nx\",method=\"ExecutePlan\","
                  "grpc_status=\"14\"}") == ROUNDS);
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"alpha\",method=\"AnalyzePlan\","
                  "grpc_status=\"2\"}") == 1);
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"alpha\",method=\"other\",grpc_status=\"0\"}") ==
        1);
  /* Zero series of data-driven labels are left out. */
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"alpha\",method=\"Config\",grpc_status=\"1\"}") ==
        -1);
  CHECK(strstr(t, "grpc_status=\"99\"") == NULL);

  CHECK(sample(t, "sparkgate_request_bytes_total{tenant=\"alpha\"}") == 2 * ROUNDS * 10);
  CHECK(sample(t, "sparkgate_response_bytes_total{tenant=\"alpha\"}") == 2 * ROUNDS * 20);
  CHECK(sample(t, "sparkgate_response_bytes_total{tenant=\"we\\\"ird\\\\name\\nx\"}") ==
        ROUNDS * 1000);
  CHECK(sample(t, "sparkgate_request_bytes_total{tenant=\"none\"}") == 0);

  /* Histogram: cumulative buckets. Config on alpha: all 2*ROUNDS at 3 ms. */
  CHECK(sample(t, "sparkgate_rpc_duration_seconds_bucket{tenant=\"alpha\",method=\"Config\","
                  "le=\"0.005\"}") == 2 * ROUNDS);
  CHECK(sample(t, "sparkgate_rpc_duration_seconds_bucket{tenant=\"alpha\",method=\"Config\","
                  "le=\"1800\"}") == 2 * ROUNDS);
  CHECK(sample(t, "sparkgate_rpc_duration_seconds_bucket{tenant=\"alpha\",method=\"Config\","
                  "le=\"+Inf\"}") == 2 * ROUNDS);
  CHECK(sample(t, "sparkgate_rpc_duration_seconds_count{tenant=\"alpha\",method=\"Config\"}") ==
        2 * ROUNDS);
  double sum = sample(t, "sparkgate_rpc_duration_seconds_sum{tenant=\"alpha\",method=\"Config\"}");
  CHECK(sum > 2 * ROUNDS * 0.003 - 1e-6 && sum < 2 * ROUNDS * 0.003 + 1e-6);
  /* ExecutePlan at 2 s: 0 up to le=1, all from le=2.5 on. */
#define EP "sparkgate_rpc_duration_seconds_bucket{tenant=\"we\\\"ird\\\\name\\nx\"," \
           "method=\"ExecutePlan\",le=\"%s\"}"
  char series[256];
  snprintf(series, sizeof series, EP, "1");
  CHECK(sample(t, series) == 0);
  snprintf(series, sizeof series, EP, "2.5");
  CHECK(sample(t, series) == ROUNDS);
  snprintf(series, sizeof series, EP, "+Inf");
  CHECK(sample(t, series) == ROUNDS);
#undef EP
  /* A duration beyond the last bound is only in +Inf. */
  CHECK(sample(t, "sparkgate_rpc_duration_seconds_bucket{tenant=\"alpha\",method=\"other\","
                  "le=\"1800\"}") == 0);
  CHECK(sample(t, "sparkgate_rpc_duration_seconds_bucket{tenant=\"alpha\",method=\"other\","
                  "le=\"+Inf\"}") == 1);
  /* Methods without calls have no histogram series. */
  CHECK(strstr(t, "method=\"Interrupt\"") == NULL);

  CHECK(sample(t, "sparkgate_auth_failures_total{reason=\"bad_signature\"}") == ROUNDS);
  CHECK(sample(t, "sparkgate_auth_failures_total{reason=\"missing_token\"}") == 0);
  CHECK(sample(t, "sparkgate_auth_failures_total{reason=\"other\"}") == 1);
  CHECK(sample(t, "sparkgate_tls_handshake_failures_total{reason=\"no_alpn_h2\"}") == 2);
  CHECK(sample(t, "sparkgate_tls_handshake_failures_total{reason=\"handshake_timeout\"}") == 0);
  CHECK(sample(t, "sparkgate_tls_handshake_failures_total{reason=\"other\"}") == 1);

  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"alpha\",backend=\"spark-2\"}") == 4);
  CHECK(sample(t, "sparkgate_upstream_connect_failures_total{tenant=\"alpha\","
                  "backend=\"spark-2\"}") == 2);
  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"alpha\",backend=\"spark-1\"}") == 0);
  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"we\\\"ird\\\\name\\nx\","
                  "backend=\"b\\\"1\"}") == 0);

  CHECK(sample(t, "sparkgate_config_reloads_total{result=\"ok\"}") == 1);
  CHECK(sample(t, "sparkgate_config_reloads_total{result=\"failed\"}") == 2);

  CHECK(sample(t, "process_start_time_seconds") > 1e9);
  CHECK(sample(t, "process_resident_memory_bytes") > 0);
  CHECK(sample(t, "process_open_fds") >= 3);
  CHECK_STR_CONTAINS(t, "sparkgate_build_info{version=\"");

  /* HELP and TYPE once per family. */
  CHECK(count_occurrences(t, "# TYPE sparkgate_rpcs_total counter\n") == 1);
  CHECK(count_occurrences(t, "# TYPE sparkgate_rpc_duration_seconds histogram\n") == 1);
  CHECK(count_occurrences(t, "# HELP sparkgate_rpc_duration_seconds ") == 1);
  CHECK(count_occurrences(t, "# TYPE sparkgate_request_bytes_total counter\n") == 1);

  free(t);
  sg_metrics_gen_unref(g);
  sg_metrics_free(m);
}

static void test_reload(void) {
  sg_metrics *m = sg_metrics_new(1, NULL);
  CHECK(m != NULL);
  const char *const a_backends[] = {"a1"};
  const char *const b_backends[] = {"b1"};
  sg_metrics_tenant_dims t1[] = {{"a", a_backends, 1}, {"b", b_backends, 1}};
  sg_metrics_dims d1 = {t1, 2};
  sg_metrics_gen *g1 = sg_metrics_gen_new(m, &d1);
  sg_metrics_publish(m, g1);
  sg_metrics_worker *w1 = sg_metrics_for_worker(g1, 0);
  sg_metrics_rpc_done(w1, 0, SG_METHOD_CONFIG, 0, 0.01, 5, 5);
  sg_metrics_rpc_done(w1, 1, SG_METHOD_CONFIG, 0, 0.01, 7, 7);
  sg_metrics_upstream_connect(w1, 0, 0, true);

  /* Reload: "b" removed, "c" added, "a" moved to index 1. */
  const char *const c_backends[] = {"c1"};
  sg_metrics_tenant_dims t2[] = {{"c", c_backends, 1}, {"a", a_backends, 1}};
  sg_metrics_dims d2 = {t2, 2};
  sg_metrics_gen *g2 = sg_metrics_gen_new(m, &d2);
  CHECK(g2 != NULL);
  sg_metrics_publish(m, g2);
  sg_metrics_worker *w2 = sg_metrics_for_worker(g2, 0);
  sg_metrics_rpc_done(w2, 1, SG_METHOD_CONFIG, 0, 0.01, 1, 1); /* "a" */
  /* A stream still on the old configuration records with its indices. */
  sg_metrics_rpc_done(w1, 0, SG_METHOD_CONFIG, 0, 0.01, 1, 1); /* "a" */
  sg_metrics_rpc_done(w1, 1, SG_METHOD_CONFIG, 0, 0.01, 1, 1); /* "b": hidden */
  sg_metrics_upstream_connect(w2, 1, 0, false);
  sg_metrics_gen_unref(g1); /* the old runtime is gone */

  char *t = render(m);
  CHECK(check_exposition(t) == 0);
  /* "a" kept its counts across the reload. */
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"a\",method=\"Config\",grpc_status=\"0\"}") == 3);
  CHECK(sample(t, "sparkgate_request_bytes_total{tenant=\"a\"}") == 7);
  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"a\",backend=\"a1\"}") == 2);
  CHECK(sample(t, "sparkgate_upstream_connect_failures_total{tenant=\"a\",backend=\"a1\"}") == 1);
  /* "b" is gone from the page; "c" is there at zero. */
  CHECK(strstr(t, "tenant=\"b\"") == NULL);
  CHECK(sample(t, "sparkgate_request_bytes_total{tenant=\"c\"}") == 0);
  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"c\",backend=\"c1\"}") == 0);
  free(t);

  /* "b" comes back: its counts were kept, so its counter did not reset. */
  sg_metrics_tenant_dims t3[] = {{"b", b_backends, 1}};
  sg_metrics_dims d3 = {t3, 1};
  sg_metrics_gen *g3 = sg_metrics_gen_new(m, &d3);
  sg_metrics_publish(m, g3);
  t = render(m);
  CHECK(sample(t, "sparkgate_request_bytes_total{tenant=\"b\"}") == 8);
  CHECK(sample(t, "sparkgate_rpcs_total{tenant=\"b\",method=\"Config\",grpc_status=\"0\"}") == 2);
  CHECK(strstr(t, "tenant=\"a\"") == NULL);
  free(t);

  sg_metrics_gen_unref(g2);
  sg_metrics_gen_unref(g3);
  sg_metrics_free(m);
}

/* A generation built for a configuration that is then rejected (a reload
 * that fails after building its runtime) never shows: /metrics keeps the
 * tenants of the published one until sg_metrics_publish. */
static void test_unpublished_generation_is_not_rendered(void) {
  sg_metrics *m = sg_metrics_new(1, NULL);
  CHECK(m != NULL);
  const char *const k_backends[] = {"k1"};
  sg_metrics_tenant_dims t1[] = {{"keep", k_backends, 1}};
  sg_metrics_dims d1 = {t1, 1};
  sg_metrics_gen *g1 = sg_metrics_gen_new(m, &d1);
  CHECK(g1 != NULL);
  char *t = render(m);
  CHECK(strstr(t, "tenant=\"keep\"") == NULL); /* built, not yet in force */
  free(t);
  sg_metrics_publish(m, g1);

  const char *const r_backends[] = {"r1"};
  sg_metrics_tenant_dims t2[] = {{"rejected", r_backends, 1}};
  sg_metrics_dims d2 = {t2, 1};
  sg_metrics_gen *g2 = sg_metrics_gen_new(m, &d2);
  CHECK(g2 != NULL);
  sg_metrics_gen_unref(g2); /* the reload failed: its runtime is dropped */
  t = render(m);
  CHECK(check_exposition(t) == 0);
  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"keep\",backend=\"k1\"}") == 0);
  CHECK(strstr(t, "rejected") == NULL);
  free(t);

  /* The published generation outlives its runtime's reference. */
  sg_metrics_gen_unref(g1);
  t = render(m);
  CHECK(strstr(t, "tenant=\"keep\"") != NULL);
  free(t);
  sg_metrics_free(m);
}

static void test_from_config(void) {
  sg_backend_config backends[2] = {{.name = "s1"}, {.name = "s2"}};
  sg_tenant_config tenants[1] = {{.name = "default", .backends = backends, .n_backends = 2}};
  sg_config cfg = {.tenants = tenants, .n_tenants = 1};
  sg_metrics *m = sg_metrics_new(3, NULL);
  sg_metrics_gen *g = sg_metrics_gen_new_from_config(m, &cfg);
  CHECK(g != NULL);
  sg_metrics_publish(m, g);
  sg_metrics_upstream_connect(sg_metrics_for_worker(g, 2), 0, 1, false);
  char *t = render(m);
  CHECK(sample(t, "sparkgate_upstream_connect_failures_total{tenant=\"default\","
                  "backend=\"s2\"}") == 1);
  CHECK(sample(t, "sparkgate_upstream_connects_total{tenant=\"default\",backend=\"s1\"}") == 0);
  /* No reasons registered: each family still has its "other". */
  CHECK(sample(t, "sparkgate_auth_failures_total{reason=\"other\"}") == 0);
  free(t);
  sg_metrics_gen_unref(g);
  sg_metrics_free(m);
}

int main(void) {
  test_method_from_path();
  test_two_workers();
  test_reload();
  test_unpublished_generation_is_not_rendered();
  test_from_config();
  return check_report("test_metrics");
}
