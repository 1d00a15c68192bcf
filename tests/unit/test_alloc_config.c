/* Allocation-failure sweeps over configuration loading (issue 7): for
 * n = 1, 2, ... the n-th allocation of a load fails (alloc_fault.h), in
 * sparkgate or in any library under it. Every run must end without a
 * crash, either failing with a message that says memory ran out, or
 * succeeding with exactly the configuration of a run without failures;
 * and it must leave no block behind. A sweep ends at the first n the load
 * never reaches.
 *
 * Each sweep loads one file written for it: the main file with every
 * section but certificates and keys; a TLS listener with client
 * certificates; a TLS backend with a client certificate; JWT keys from
 * PEM files and the network; a JWKS file; a routing table file; and the
 * reload path of main.c (a new snapshot, its runtime with TLS contexts and
 * metrics, keys adopted from the running one). "The same configuration"
 * is the same --check-config summary, and for the reload the same
 * certificates, keys, trust, ciphers and options in every TLS context.
 *
 * OpenSSL makes thousands of allocations per certificate or key, and
 * sweeping each one of them takes minutes: by default every allocation
 * made outside libcrypto and libssl is swept, and OPENSSL_SAMPLES of
 * theirs, evenly spread. SG_ALLOC_SWEEP=full in the environment sweeps
 * them all. */
#include <limits.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "alloc_fault.h"
#include "check.h"
#include "sparkgate/config.h"
#include "sparkgate/jwt.h"
#include "sparkgate/log.h"
#include "sparkgate/metrics.h"
#include "sparkgate/observe.h"
#include "sparkgate/worker.h"

#define FIX SG_SOURCE_ROOT "/tests/fixtures/"

/* Far above what one load takes: only a runaway loop gets here. */
#define MAX_N 200000
#define OPENSSL_SAMPLES 64
/* Detailed reports for the first few failures only. */
#define MAX_REPORTS 12

#define H2C_LISTENER(auth)                                                     \
  "{\"name\": \"dev\", \"address\": \"::1\", \"port\": 0, \"insecure\": true," \
  " \"auth\": " auth "}"
#define SIMPLE_TENANT                                                          \
  "{\"name\": \"t\", \"allow\": {\"any_identity\": true},"                     \
  " \"backends\": [{\"address\": \"127.0.0.1\", \"port\": 15002}]}"
#define NET_PROVIDER(extra)                                                    \
  "{\"name\": \"net\", \"issuer\": \"https://idp2.example\","                  \
  " \"audiences\": [\"spark\"], \"jwks_url\": \"https://127.0.0.1:9/jwks\","   \
  " \"required\": false, \"ca_file\": \"" FIX "tls/server.pem\","              \
  " \"algorithms\": [\"RS256\", \"ES256\"], \"min_refresh_s\": 30" extra "}"

/* Every section of the main file, without certificates and keys. */
static const char main_json[] =
    "{\"workers\": 2, \"log_level\": \"error\", \"drain_timeout_ms\": 1000,"
    " \"http2\": {\"max_concurrent_streams\": 50, \"stream_window_bytes\": 65535},"
    " \"upstream\": {\"connect_timeout_ms\": 1000, \"idle_timeout_ms\": 5000},"
    " \"allowed_path_prefixes\": [\"/spark.connect.SparkConnectService/\","
    "                             \"/grpc.health.v1.Health/\"],"
    " \"listeners\": [" H2C_LISTENER("{\"methods\": [\"jwt\"]}") ","
    "  {\"name\": \"local\", \"address\": \"127.0.0.1\", \"port\": 0,"
    "   \"insecure\": true, \"auth\": \"none\"}],"
    " \"auth\": {\"max_token_bytes\": 4096, \"token_cache_entries\": 100,"
    "  \"jwt_providers\": ["
    "   {\"name\": \"corp\", \"issuer\": \"https://idp.example\","
    "    \"audiences\": [\"spark\", \"spark-2\"],"
    "    \"keys\": [{\"alg\": \"HS256\", \"secret_file\": \"" FIX "jwt/hmac.key\"}],"
    "    \"leeway_s\": 30, \"max_lifetime_s\": 3600, \"identity_claim\": \"email\","
    "    \"required_claims\": {\"groups\": [\"spark-users\", \"admins\"],"
    "                         \"tenant\": \"acme\", \"level\": 3}}]},"
    " \"identity_headers\": {\"identity\": \"x-sg-identity\", \"tenant\": \"x-sg-tenant\"},"
    " \"tenant_selectors\": [\"jwt_claim:tenant\", \"header:X-Spark-Tenant\","
    "                        \"authority\", \"identity\"],"
    " \"tenants\": ["
    "  {\"name\": \"acme\", \"hosts\": [\"Acme.Example.\", \"[::1]\"],"
    "   \"backends\": [{\"name\": \"a1\", \"address\": \"127.0.0.1\", \"port\": 15002,"
    "                   \"weight\": 2},"
    "                  {\"address\": \"localhost\", \"port\": 15003}],"
    "   \"allow\": {\"identities\": [\"alice\", \"bob\"], \"identity_prefixes\": [\"svc-\"],"
    "             \"claims\": {\"groups\": [\"analysts\"], \"level\": [1, 2]}},"
    "   \"user_id\": \"enforce\", \"failover\": true,"
    "   \"methods\": [\"ExecutePlan\", \"Config\", \"AnalyzePlan\"],"
    "   \"upstream_credential\": {\"file\": \"" FIX "route/secrets/acme-token\"},"
    "   \"limits\": {\"max_concurrent_rpcs\": 10, \"max_concurrent_executions\": 2,"
    "              \"requests_per_second\": 5, \"burst\": 10,"
    "              \"upload_bytes_per_minute\": 1000000,"
    "              \"over_limit_status\": \"unavailable\", \"max_message_bytes\": 1048576}},"
    "  {\"name\": \"beta\", \"backends\": [{\"address\": \"127.0.0.2\", \"port\": 15002}],"
    "   \"allow\": {\"any_identity\": true},"
    "   \"upstream_credential\": {\"env\": \"SG_ALLOC_TEST_TOKEN\"}}],"
    " \"admin\": {\"address\": \"127.0.0.1\", \"port\": 0},"
    " \"access_log\": {\"path\": \"access.log\"}}";

/* A TLS listener that asks for client certificates. */
static const char tls_listener_json[] =
    "{\"listeners\": ["
    "  {\"name\": \"public\", \"address\": \"127.0.0.1\", \"port\": 0,"
    "   \"tls\": {\"cert\": \"" FIX "tls/server.pem\", \"key\": \"" FIX "tls/server.key\","
    "            \"client_certificates\": \"optional\","
    "            \"client_ca\": \"" FIX "identity/ca.pem\"},"
    "   \"auth\": {\"methods\": [\"mtls\"], \"client_identity\": \"uri_san\"}}],"
    " \"tenants\": [" SIMPLE_TENANT "]}";

/* A backend reached over TLS with a client certificate. */
static const char tls_backend_json[] =
    "{\"listeners\": [" H2C_LISTENER("\"none\"") "],"
    " \"tenants\": [{\"name\": \"t\", \"allow\": {\"any_identity\": true},"
    "  \"backends\": [{\"address\": \"localhost\", \"port\": 15003,"
    "   \"tls\": {\"ca\": \"" FIX "route/certs/upstream-ca.pem\", \"sni\": \"spark.internal\","
    "            \"cert\": \"" FIX "identity/alice.pem\","
    "            \"key\": \"" FIX "identity/client.key\"}}]}]}";

/* JWKS files written for the sweeps from keys of tests/fixtures/jwt/
 * jwks.json: OpenSSL takes milliseconds to check each RSA key, at every
 * run, so one RSA key in all; the others are ignored (not for signing,
 * unsupported) or EC. */
#define JWK_EC_1                                                               \
  "{\"kty\": \"EC\", \"use\": \"sig\", \"kid\": \"ec-1\", \"alg\": \"ES256\","      \
  " \"crv\": \"P-256\", \"x\": \"vLhZ4lrzs7AgdlA4pSXmnUatc6bcHKBl42dxIwbRUWI\","   \
  " \"y\": \"7kjGa4qp6D9Sg6Y06_0eSBRA4AT2e49nnK6RqD-bpK0\"}"
static const char jwks[] =
    "{\"keys\": ["
    "{\"kty\": \"RSA\", \"use\": \"sig\", \"kid\": \"rsa-1\", \"alg\": \"RS256\","
    " \"n\": \"jXOq1wEuOuUZrmDvOvQeABm0dGW5cwm3SVis4SjInny1ExWV_vfQxwCGlsPgt7GqtxClKvy"
    "9r80-JI104pOjgLdyx7c2yv68B0kpTZ4CLM-eyDiL6dBdpQsu_8rpvEtPIm9FSq9l44K1CTo0qXMB"
    "ZY_VChUP2yBbFGXUjWzRtpjDagmgcws5teVKahnXAJzzddQcUZSxwPZpis0M3-mLTSojn_0omT6q"
    "kO9Kfn_y2JtrI_7ZZDp8UlezBvhms9x11YGfKT4fHt2UnI3cj8fx9A2Mr1Lugzua9MayT9dkSBhP-"
    "G3OeUbi9FbCPO25Z3i3PPjc8EjLau1KaxHqVyFjqw\", \"e\": \"AQAB\"}, "
    JWK_EC_1 ", "
    "{\"kty\": \"RSA\", \"use\": \"enc\", \"kid\": \"enc-1\", \"n\": \"AQAB\","
    " \"e\": \"AQAB\"}, "
    "{\"kty\": \"OKP\", \"use\": \"sig\", \"kid\": \"ed-1\", \"crv\": \"Ed25519\","
    " \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}]}";
static const char fallback_jwks[] = "{\"keys\": [" JWK_EC_1 "]}";

/* JWT keys from PEM files and from the network (a fallback file, a CA
 * for the fetch). A format: %s is the fallback file. */
#define JWT_KEYS_JSON                                                          \
  "{\"listeners\": [" H2C_LISTENER("{\"methods\": [\"jwt\"]}") "],"           \
  " \"auth\": {\"jwt_providers\": ["                                            \
  "   {\"name\": \"corp\", \"issuer\": \"https://idp.example\","                \
  "    \"audiences\": [\"spark\"],"                                              \
  "    \"keys\": [{\"kid\": \"k-rsa\", \"alg\": \"RS256\","                      \
  "              \"pem_file\": \"" FIX "jwt/rsa1.pub.pem\"},"                     \
  "             {\"kid\": \"k-ec\", \"alg\": \"ES256\","                        \
  "              \"pem_file\": \"" FIX "jwt/ec256.pub.pem\"}]},"                  \
  "   " NET_PROVIDER(", \"fallback_jwks_file\": \"%s\"") "]},"                  \
  " \"tenants\": [" SIMPLE_TENANT "]}"

/* JWT keys from a JWKS file: a sweep of its own, as every run pays for
 * the RSA key's check. A format: %s is the file. */
#define JWKS_JSON                                                              \
  "{\"listeners\": [" H2C_LISTENER("{\"methods\": [\"jwt\"]}") "],"           \
  " \"auth\": {\"jwt_providers\": ["                                            \
  "   {\"name\": \"corp\", \"issuer\": \"https://idp.example\","                \
  "    \"audiences\": [\"spark\"], \"jwks_file\": \"%s\"}]},"                     \
  " \"tenants\": [" SIMPLE_TENANT "]}"

/* Tenants in a file of their own. */
static const char table_json[] =
    "{\"listeners\": [" H2C_LISTENER("\"none\"") "],"
    " \"routing_table\": \"" FIX "route/tenants.json\"}";

/* What a reload rebuilds besides the snapshot: TLS contexts of backends,
 * and the key source of a network provider, adopted from the running
 * configuration. */
static const char reload_json[] =
    "{\"listeners\": ["
    "  {\"name\": \"public\", \"address\": \"127.0.0.1\", \"port\": 0,"
    "   \"tls\": {\"cert\": \"" FIX "tls/server.pem\", \"key\": \"" FIX "tls/server.key\"},"
    "   \"auth\": {\"methods\": [\"jwt\"]}}],"
    " \"auth\": {\"jwt_providers\": [" NET_PROVIDER("") "]},"
    " \"tenants\": [{\"name\": \"t\", \"allow\": {\"any_identity\": true},"
    "  \"backends\": [{\"address\": \"localhost\", \"port\": 15003,"
    "   \"tls\": {\"ca\": \"" FIX "route/certs/upstream-ca.pem\"}}]}]}";

static int reports;
static bool full_sweep;
static bool verbose; /* SG_ALLOC_VERBOSE: where failures were tolerated */

static void write_file(char *path, size_t len, const char *text) {
  snprintf(path, len, "/tmp/sg-alloc-config-XXXXXX");
  int fd = mkstemp(path);
  FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
  if (f == NULL || fputs(text, f) == EOF || fclose(f) != 0) {
    fprintf(stderr, "cannot write %s\n", path);
    exit(1);
  }
}


/* What a TLS context holds that a failure could quietly leave out. */
static void describe_tls(FILE *f, const char *what, SSL_CTX *ctx) {
  if (ctx == NULL) {
    fprintf(f, "%s: none\n", what);
    return;
  }
  X509 *cert = SSL_CTX_get0_certificate(ctx);
  STACK_OF(X509) *chain = NULL;
  SSL_CTX_get0_chain_certs(ctx, &chain);
  STACK_OF(X509_NAME) *cas = SSL_CTX_get_client_CA_list(ctx);
  STACK_OF(X509_OBJECT) *trusted =
      X509_STORE_get0_objects(SSL_CTX_get_cert_store(ctx));
  fprintf(f, "%s: cert %lx, key %d, chain %d, client CAs %d, trusted %d, "
          "verify %d, min version %ld, options %llx, ciphers",
          what, cert != NULL ? X509_subject_name_hash(cert) : 0ul,
          SSL_CTX_get0_privatekey(ctx) != NULL, sk_X509_num(chain),
          sk_X509_NAME_num(cas), sk_X509_OBJECT_num(trusted),
          SSL_CTX_get_verify_mode(ctx), SSL_CTX_get_min_proto_version(ctx),
          (unsigned long long)SSL_CTX_get_options(ctx));
  STACK_OF(SSL_CIPHER) *ciphers = SSL_CTX_get_ciphers(ctx);
  for (int i = 0; i < sk_SSL_CIPHER_num(ciphers); i++)
    fprintf(f, " %s", SSL_CIPHER_get_name(sk_SSL_CIPHER_value(ciphers, i)));
  fprintf(f, "\n");
}

/* The one-screen summary of --check-config, and with a runtime its TLS
 * contexts: two loads that describe the same made the same
 * configuration, as far as an operator can tell. */
static char *summary_of(const sg_config *cfg, const sg_runtime *rt) {
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  if (f == NULL)
    exit(1);
  sg_config_print_summary(cfg, f);
  for (size_t i = 0; rt != NULL && i < cfg->n_listeners; i++)
    describe_tls(f, cfg->listeners[i].name, rt->listener_tls[i]);
  for (size_t t = 0; rt != NULL && t < cfg->n_tenants; t++)
    for (size_t b = 0; b < cfg->tenants[t].n_backends; b++)
      describe_tls(f, cfg->tenants[t].backends[b].name, rt->backend_tls[t][b]);
  fclose(f);
  return text;
}

static bool names_oom(const sg_config_errors *errs) {
  for (size_t i = 0; i < errs->count; i++)
    if (strstr(errs->messages[i], "out of memory") != NULL)
      return true;
  return false;
}

static void report(const char *sweep, unsigned long n, const char *what,
                   const sg_config_errors *errs) {
  if (++reports > MAX_REPORTS)
    return;
  fprintf(stderr, "%s: n=%lu: %s\n", sweep, n, what);
  for (size_t i = 0; errs != NULL && i < errs->count; i++)
    fprintf(stderr, "  error: %s\n", errs->messages[i]);
  fprintf(stderr, "  the failed allocation:\n");
  alloc_fault_print_site(stderr);
}

/* What the code under test did in one run. */
typedef struct outcome {
  bool ok;       /* it succeeded */
  char *summary; /* of the configuration it produced, when ok */
  sg_config_errors errs;
} outcome;

typedef void (*step_fn)(const char *path, outcome *out);

static void load_step(const char *path, outcome *out) {
  sg_config *cfg = NULL;
  out->ok = sg_config_load(path, &cfg, &out->errs) == 0;
  if (out->ok) {
    alloc_fault_disarm();
    out->summary = summary_of(cfg, NULL);
    sg_config_unref(cfg);
  }
}

/* The reload of main.c: the new snapshot, its runtime (TLS contexts,
 * metrics), the network keys of the running configuration adopted. */
static sg_runtime *running;
static sg_metrics *metrics;

static void reload_step(const char *path, outcome *out) {
  sg_config *cfg = NULL;
  out->ok = false;
  if (sg_config_load(path, &cfg, &out->errs) != 0)
    return;
  char err[512];
  sg_runtime *rt = sg_runtime_new(cfg, metrics, err, sizeof err);
  sg_config_unref(cfg);
  if (rt == NULL) {
    alloc_fault_disarm();
    sg_config_errors_add(&out->errs, "runtime: %s", err);
    return;
  }
  sg_jwt_verifier_adopt_keys(rt->config->jwt, running->config->jwt);
  out->ok = true;
  alloc_fault_disarm();
  out->summary = summary_of(rt->config, rt);
  sg_runtime_unref(rt);
}

static void outcome_clear(outcome *o) {
  free(o->summary);
  sg_config_errors_clear(&o->errs);
  memset(o, 0, sizeof *o);
}

/* What one run with failure n did. */
typedef struct verdict {
  bool hit;       /* the failure happened */
  bool ok;        /* the step succeeded */
  bool same;      /* ... with the configuration of the reference run */
  bool oom_named; /* ... or failed saying memory ran out */
  long left;      /* blocks left behind */
} verdict;

/* Runs step with failure n (0: none); *ref_summary gets the summary of a
 * successful run when it is NULL. */
static void run_once(const char *name, step_fn step, const char *path,
                     unsigned long n, char **ref_summary, verdict *v) {
  long before = alloc_fault_outstanding();
  outcome o;
  memset(&o, 0, sizeof o);
  alloc_fault_arm(n);
  step(path, &o);
  alloc_fault_disarm();
  v->hit = alloc_fault_hit();
  v->ok = o.ok;
  v->oom_named = names_oom(&o.errs);
  v->same = o.ok && *ref_summary != NULL && strcmp(o.summary, *ref_summary) == 0;
  if (o.ok && *ref_summary == NULL) {
    *ref_summary = o.summary;
    o.summary = NULL;
  }
  if (n > 0 && v->hit && !o.ok && !v->oom_named)
    report(name, n, "failed without saying memory ran out", &o.errs);
  if (n > 0 && v->hit && o.ok && !v->same) {
    report(name, n, "succeeded with another configuration", NULL);
    if (reports <= MAX_REPORTS)
      fprintf(stderr, "  got:\n%s  want:\n%s", o.summary, *ref_summary);
  }
  if (!v->hit && !o.ok)
    report(name, n, "fails without an injected failure", &o.errs);
  outcome_clear(&o);
  /* What a failed OpenSSL call queued is not ours to keep (the next
   * error report clears it), and it holds blocks. */
  ERR_clear_error();
  v->left = alloc_fault_outstanding() - before;
}

static bool in_openssl(unsigned long n) {
  const char *obj = alloc_fault_recorded_object(n);
  return obj != NULL &&
         (strstr(obj, "/libcrypto.so") != NULL || strstr(obj, "/libssl.so") != NULL);
}

static void sweep(const char *name, step_fn step, const char *json) {
  char path[64];
  write_file(path, sizeof path, json);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  char *ref = NULL;
  verdict v;
  /* Twice: library caches (OpenSSL's algorithm store, error strings)
   * fill on first use and are no leak. The second run counts the
   * allocations and where they come from. */
  run_once(name, step, path, 0, &ref, &v);
  alloc_fault_record_begin();
  run_once(name, step, path, ULONG_MAX, &ref, &v);
  unsigned long total = alloc_fault_record_end();
  CHECK(v.ok && v.same);
  if (!v.ok) {
    free(ref);
    unlink(path);
    return;
  }
  unsigned long n_openssl = 0;
  for (unsigned long n = 1; n <= total; n++)
    n_openssl += in_openssl(n);
  unsigned long stride = full_sweep || n_openssl <= OPENSSL_SAMPLES
                             ? 1
                             : n_openssl / OPENSSL_SAMPLES;
  unsigned long n, k = 0, swept = 0, failed = 0, tolerated = 0;
  for (n = 1; n <= MAX_N; n++) {
    /* Past the recorded total the load should no longer fail: it must
     * succeed, and that ends the sweep. */
    if (n <= total && in_openssl(n) && k++ % stride != 0)
      continue;
    swept++;
    run_once(name, step, path, n, &ref, &v);
    if (v.left != 0) {
      /* A cache that a failure emptied fills again on this run; a leak
       * leaks again. */
      verdict again;
      run_once(name, step, path, n, &ref, &again);
      if (again.left != 0) {
        char what[96];
        snprintf(what, sizeof what,
                 "%ld block(s) left behind (%ld on a second run)", v.left,
                 again.left);
        report(name, n, what, NULL);
      }
      CHECK(again.left == 0);
    }
    if (!v.hit) {
      CHECK(v.ok && v.same);
      break;
    }
    if (v.ok) {
      tolerated++;
      CHECK(v.same);
      if (verbose) {
        fprintf(stderr, "%s: n=%lu: tolerated at\n", name, n);
        alloc_fault_print_site(stderr);
      }
    } else {
      failed++;
      CHECK(v.oom_named);
    }
  }
  CHECK(n <= MAX_N);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%s: %lu allocations, %lu swept (every %lu. of OpenSSL's %lu, all "
         "others) in %.1f s: %lu failed saying so, %lu tolerated\n",
         name, total, swept - 1, stride, n_openssl,
         (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
         failed, tolerated);
  free(ref);
  unlink(path);
}

static void sweep_reload(void) {
  char path[64];
  write_file(path, sizeof path, reload_json);
  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  char err[512];
  sg_metrics_reasons reasons;
  sg_observe_reasons(&reasons);
  metrics = sg_metrics_new(2, &reasons);
  CHECK(metrics != NULL);
  CHECK(metrics != NULL && sg_config_load(path, &cfg, &errs) == 0);
  if (cfg != NULL) {
    running = sg_runtime_new(cfg, metrics, err, sizeof err);
    sg_config_unref(cfg);
    CHECK(running != NULL);
  }
  if (running != NULL) {
    sweep("reload", reload_step, reload_json);
    sg_runtime_unref(running);
  }
  sg_config_errors_clear(&errs);
  sg_metrics_free(metrics);
  unlink(path);
}

int main(void) {
  alloc_fault_require("test_alloc_config");
  sg_log_set_level(SG_LOG_ERROR);
  const char *mode = getenv("SG_ALLOC_SWEEP");
  full_sweep = mode != NULL && strcmp(mode, "full") == 0;
  verbose = getenv("SG_ALLOC_VERBOSE") != NULL;
  setenv("SG_ALLOC_TEST_TOKEN", "beta-secret-token", 1);

  sweep("main file", load_step, main_json);
  sweep("tls listener", load_step, tls_listener_json);
  sweep("tls backend", load_step, tls_backend_json);
  char key_file[64], json[4096];
  write_file(key_file, sizeof key_file, fallback_jwks);
  snprintf(json, sizeof json, JWT_KEYS_JSON, key_file);
  sweep("jwt keys", load_step, json);
  unlink(key_file);
  write_file(key_file, sizeof key_file, jwks);
  snprintf(json, sizeof json, JWKS_JSON, key_file);
  sweep("jwks file", load_step, json);
  unlink(key_file);
  sweep("routing table file", load_step, table_json);
  sweep_reload();
  return check_report("test_alloc_config");
}
