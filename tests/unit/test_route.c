/* Routing table: loading and validation (every error with its JSON path),
 * tenant selection, rendezvous backend choice and the token bucket. */
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "sparkgate/route.h"

#define FIXDIR SG_SOURCE_ROOT "/tests/fixtures/route"
#define EXAMPLE SG_SOURCE_ROOT "/config/tenants.example.json"

/* ---- helpers ------------------------------------------------------------- */

/* No libm: the core library does not link it. */
static double dabs(double x) { return x < 0 ? -x : x; }
static bool close_rel(double got, double want) {
  return dabs(got - want) <= 1e-14 * dabs(want);
}

#define MAX_REPORTS 64

typedef struct reports {
  char *path[MAX_REPORTS];
  char *msg[MAX_REPORTS];
  size_t n;
} reports;

static void collect(void *ctx, const char *json_path, const char *msg) {
  reports *r = ctx;
  if (r->n < MAX_REPORTS) {
    r->path[r->n] = strdup(json_path);
    r->msg[r->n] = strdup(msg);
    r->n++;
  }
}

static void reports_clear(reports *r) {
  for (size_t i = 0; i < r->n; i++) {
    free(r->path[i]);
    free(r->msg[i]);
  }
  r->n = 0;
}

static void reports_dump(const reports *r) {
  for (size_t i = 0; i < r->n; i++)
    fprintf(stderr, "  report: %s: %s\n", r->path[i], r->msg[i]);
}

static sg_route_table *load_text(const char *text, reports *r) {
  json_error_t jerr;
  json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL) {
    fprintf(stderr, "test JSON does not parse: %s: %s\n", jerr.text, text);
    return NULL;
  }
  sg_route_table *t = sg_route_table_from_json(root, FIXDIR, collect, r);
  json_decref(root);
  return t;
}

/* The table must fail to load with an error at exactly |path| whose
 * message contains |needle|. */
static int expect_error_at(const char *text, const char *path,
                           const char *needle, int line) {
  reports r = {0};
  sg_route_table *t = load_text(text, &r);
  int ok = t == NULL;
  bool found = false;
  for (size_t i = 0; i < r.n; i++)
    if (strcmp(r.path[i], path) == 0 && strstr(r.msg[i], needle) != NULL)
      found = true;
  if (!ok || !found) {
    fprintf(stderr, "test_route.c:%d: expected error at '%s' containing '%s'%s\n",
            line, path, needle, ok ? "" : " (but the table loaded)");
    reports_dump(&r);
  }
  sg_route_table_unref(t);
  reports_clear(&r);
  return ok && found;
}

#define EXPECT_ERROR(text, path, needle)                                       \
  CHECK(expect_error_at((text), (path), (needle), __LINE__))

static const char *hdr_lookup(void *ctx, const char *name, size_t *len) {
  const char *const *h = ctx;
  for (; h[0] != NULL; h += 2)
    if (strcmp(h[0], name) == 0) {
      *len = strlen(h[1]);
      return h[1];
    }
  return NULL;
}

/* Deterministic PRNG for session ids: the test must not depend on time. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t rng_next(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  rng_state = x;
  return x;
}

static void random_session(char *buf, size_t len) {
  uint64_t a = rng_next(), b = rng_next();
  snprintf(buf, len, "%08x-%04x-4%03x-a%03x-%012llx", (unsigned)(a >> 32),
           (unsigned)(a >> 16) & 0xffff, (unsigned)a & 0xfff,
           (unsigned)(b >> 48) & 0xfff,
           (unsigned long long)(b & 0xffffffffffffULL));
}

/* A tenant whose backends are given as (name, weight) pairs. */
static char *backends_table(const char *const *names, const int *weights,
                            size_t n, bool failover) {
  char *buf = malloc(8192);
  size_t used = (size_t)snprintf(
      buf, 8192,
      "{\"tenant_selectors\":[\"identity\"],\"tenants\":[{\"name\":\"acme\","
      "\"allow\":{\"identities\":[\"alice\"]},\"failover\":%s,\"backends\":[",
      failover ? "true" : "false");
  for (size_t i = 0; i < n; i++)
    used += (size_t)snprintf(buf + used, 8192 - used,
                             "%s{\"name\":\"%s\",\"address\":\"127.0.0.1\","
                             "\"port\":%zu,\"weight\":%d}",
                             i ? "," : "", names[i], 15000 + i, weights[i]);
  snprintf(buf + used, 8192 - used, "]}]}");
  return buf;
}

static sg_route_table *load_backends(const char *const *names,
                                     const int *weights, size_t n,
                                     bool failover) {
  char *text = backends_table(names, weights, n, failover);
  reports r = {0};
  sg_route_table *t = load_text(text, &r);
  if (t == NULL)
    reports_dump(&r);
  reports_clear(&r);
  free(text);
  return t;
}

static size_t pick(const sg_route_table *t, const char *session) {
  size_t idx = SIZE_MAX;
  int rv = sg_route_pick_backend(&t->tenants[0], "alice", session, NULL, &idx);
  return rv == SG_ROUTE_PICK_OK ? idx : SIZE_MAX;
}

static const char *pick_name(const sg_route_table *t, const char *session) {
  size_t idx = pick(t, session);
  return idx == SIZE_MAX ? "(none)" : t->tenants[0].backends[idx].name;
}

/* ---- hashing ------------------------------------------------------------- */

static void test_siphash_vectors(void) {
  /* The reference vectors of the SipHash paper (key 00..0f, message
   * 00 01 02 ... of each length). */
  uint8_t key[16], msg[64];
  for (int i = 0; i < 16; i++)
    key[i] = (uint8_t)i;
  for (int i = 0; i < 64; i++)
    msg[i] = (uint8_t)i;
  CHECK(sg_siphash24(key, msg, 0) == 0x726fdb47dd0e0e31ULL);
  CHECK(sg_siphash24(key, msg, 1) == 0x74f839c593dc67fdULL);
  CHECK(sg_siphash24(key, msg, 7) == 0xab0200f58b01d137ULL);
  CHECK(sg_siphash24(key, msg, 8) == 0x93f5f5799a932462ULL);
  CHECK(sg_siphash24(key, msg, 15) == 0xa129ca6149be45e5ULL);
  CHECK(sg_siphash24(key, msg, 63) == 0x958a324ceb064572ULL);
}

static void test_score_is_the_documented_formula(void) {
  /* Expected values computed independently (Python: SipHash-2-4 and
   * -w / math.log(((h >> 12) + 0.5) / 2**52)). */
  static const struct {
    uint64_t h;
    double w1, w1m;
  } cases[] = {
      {0x0ULL, 0.027220661148848368, 27220.661148848365},
      {0x1000ULL, 0.02805978777919201, 28059.787779192007},
      {0xffffffffffffffffULL, 9007199254740992.0, 9.007199254740992e+21},
      {0x8000000000000000ULL, 1.4426950408889638, 1442695.040888964},
      {0x79e7c7a066d7f49cULL, 1.3478320635512337, 1347832.0635512336},
      {0x0123456789abcdefULL, 0.1846346865344269, 184634.6865344269},
      {0xb504f333f9de6484ULL, 2.885390081777927, 2885390.0817779275},
      {0xb504f333f9de7000ULL, 2.8853900817779303, 2885390.0817779303},
      {0xfffffffffffff000ULL, 9007199254740992.0, 9.007199254740992e+21},
      {0x00000000deadbeefULL, 0.04480255064203319, 44802.55064203319},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    double a = sg_route_hrw_score(cases[i].h, 1);
    double b = sg_route_hrw_score(cases[i].h, 1000000);
    if (!close_rel(a, cases[i].w1) || !close_rel(b, cases[i].w1m))
      fprintf(stderr, "hrw_score(%#llx): %.17g %.17g\n",
              (unsigned long long)cases[i].h, a, b);
    CHECK(close_rel(a, cases[i].w1));
    CHECK(close_rel(b, cases[i].w1m));
  }
  CHECK(sg_route_hrw_score(0x1234, 0) == 0.0);
  /* Monotone in the hash, as a uniform deviate's score must be. */
  double prev = 0.0;
  for (uint64_t h = 0; h < 4096; h++) {
    double sc = sg_route_hrw_score(h << 52, 1);
    CHECK(sc > prev);
    prev = sc;
  }

  const char *names[] = {"acme-1", "acme-2"};
  int weights[] = {1, 3};
  sg_route_table *t = load_backends(names, weights, 2, false);
  CHECK(t != NULL);
  if (t == NULL)
    return;
  uint8_t key[16];
  for (int i = 0; i < 16; i++)
    key[i] = (uint8_t)i;
  /* What docs/routing.md promises, so another implementation can agree. */
  static const char input[] = "acme\0alice\0sess-1\0acme-1";
  CHECK(sg_siphash24(key, input, sizeof input - 1) == 0x79e7c7a066d7f49cULL);
  CHECK(close_rel(sg_route_backend_score(&t->tenants[0], 0, "alice", "sess-1"),
                  1.3478320635512337));
  static const char input2[] = "acme\0alice\0sess-1\0acme-2";
  CHECK(sg_siphash24(key, input2, sizeof input2 - 1) == 0x89c8b664aab8ad84ULL);
  CHECK(close_rel(sg_route_backend_score(&t->tenants[0], 1, "alice", "sess-1"),
                  4.842693474557001));
  /* NULL user_id hashes as "". */
  CHECK(close_rel(sg_route_backend_score(&t->tenants[0], 0, NULL, "s"),
                  0.6669980726371384));
  CHECK(sg_route_backend_score(&t->tenants[0], 5, "alice", "s") == 0.0);
  sg_route_table_unref(t);
}

/* ---- loading ------------------------------------------------------------- */

static void test_load_example(void) {
  setenv("BETA_SPARK_TOKEN", "beta-env-token-xyz", 1);
  json_error_t jerr;
  json_t *root = json_load_file(EXAMPLE, JSON_REJECT_DUPLICATES, &jerr);
  CHECK(root != NULL);
  if (root == NULL)
    return;
  reports r = {0};
  /* The example names secrets/ and certs/ relative to its directory; the
   * fixture directory holds stand-ins for them. */
  sg_route_table *t = sg_route_table_from_json(root, FIXDIR, collect, &r);
  json_decref(root);
  CHECK(t != NULL);
  CHECK(r.n == 0);
  reports_dump(&r);
  reports_clear(&r);
  if (t == NULL)
    return;
  CHECK(t->n_selectors == 4);
  CHECK(t->selectors[0].kind == SG_ROUTE_SEL_JWT_CLAIM);
  CHECK(strcmp(t->selectors[0].arg, "tenant") == 0);
  CHECK(t->selectors[1].kind == SG_ROUTE_SEL_HEADER);
  CHECK(strcmp(t->selectors[1].arg, "x-spark-tenant") == 0);
  CHECK(t->selectors[2].kind == SG_ROUTE_SEL_AUTHORITY);
  CHECK(t->selectors[3].kind == SG_ROUTE_SEL_IDENTITY);
  CHECK(t->n_tenants == 2);

  const sg_route_tenant *acme = sg_route_table_find(t, "acme", 4);
  const sg_route_tenant *beta = sg_route_table_find(t, "beta", 4);
  CHECK(acme == &t->tenants[0]);
  CHECK(beta == &t->tenants[1]);
  CHECK(sg_route_table_find(t, "acm", 3) == NULL);
  CHECK(sg_route_table_find(t, "acmee", 5) == NULL);
  if (acme == NULL || beta == NULL) {
    sg_route_table_unref(t);
    return;
  }
  CHECK(acme->n_backends == 3);
  CHECK(acme->backends[2].weight == 0);
  CHECK(acme->backends[1].port == 15003);
  CHECK(!acme->backends[0].tls);
  CHECK(acme->user_id == SG_ROUTE_USER_ID_REWRITE);
  CHECK(!acme->failover);
  CHECK(acme->methods == SG_SPARK_ALL_METHODS);
  CHECK(acme->allow.n_identities == 2);
  CHECK(acme->allow.n_identity_prefixes == 1);
  CHECK(acme->allow.n_claims == 1);
  CHECK(acme->credential_source == SG_ROUTE_CREDENTIAL_FILE);
  CHECK(acme->credential != NULL &&
        strcmp(acme->credential, "acme-test-token-0123456789") == 0);
  CHECK(acme->credential_len == strlen("acme-test-token-0123456789"));
  CHECK(acme->limits.max_concurrent_rpcs == 200);
  CHECK(acme->limits.max_concurrent_executions == 20);
  CHECK(acme->limits.requests_per_second == 50);
  CHECK(acme->limits.burst == 100);
  CHECK(acme->limits.upload_bytes_per_minute == 1073741824ULL);
  CHECK(acme->limits.over_limit_status == 8);

  CHECK(beta->user_id == SG_ROUTE_USER_ID_ENFORCE);
  CHECK(beta->failover);
  CHECK(beta->backends[0].tls && beta->backends[0].tls_verify);
  CHECK_STR_CONTAINS(beta->backends[0].tls_ca_file, "/tests/fixtures/route/certs/upstream-ca.pem");
  CHECK(strcmp(beta->backends[0].tls_sni, "spark-beta-1.internal") == 0);
  CHECK(beta->credential_source == SG_ROUTE_CREDENTIAL_ENV);
  CHECK(strcmp(beta->credential, "beta-env-token-xyz") == 0);
  CHECK(!sg_route_tenant_allows_method(beta, SG_SPARK_ADD_ARTIFACTS));
  CHECK(!sg_route_tenant_allows_method(beta, SG_SPARK_ARTIFACT_STATUS));
  CHECK(sg_route_tenant_allows_method(beta, SG_SPARK_EXECUTE_PLAN));
  CHECK(sg_route_tenant_allows_method(acme, SG_SPARK_ADD_ARTIFACTS));
  CHECK(!sg_route_tenant_allows_method(acme, -1));
  CHECK(!sg_route_tenant_allows_method(acme, SG_SPARK_N_METHODS));
  CHECK(beta->limits.burst == 20); /* defaults to requests_per_second */
  CHECK(beta->limits.over_limit_status == 14);
  CHECK(beta->n_hosts == 2);

  /* --check-config: where credentials come from, never what they are. */
  char *out = NULL;
  size_t outlen = 0;
  FILE *f = open_memstream(&out, &outlen);
  sg_route_table_print_summary(t, f);
  fclose(f);
  CHECK_STR_CONTAINS(out, "tenant acme");
  CHECK_STR_CONTAINS(out, "credential: file " FIXDIR "/secrets/acme-token");
  CHECK_STR_CONTAINS(out, "credential: env BETA_SPARK_TOKEN");
  CHECK_STR_CONTAINS(out, "upstream acme-3  127.0.0.1:15004  h2c weight=0");
  CHECK(strstr(out, "acme-test-token") == NULL);
  CHECK(strstr(out, "beta-env-token") == NULL);
  free(out);

  /* Refcounting: the table lives until the last reference goes. */
  CHECK(sg_route_table_ref(t) == t);
  sg_route_table_unref(t);
  CHECK(t->n_tenants == 2);
  sg_route_table_unref(t);
  sg_route_table_unref(NULL);
}

static void test_load_by_path(void) {
  reports r = {0};
  /* Relative path against the base dir; relative names inside against the
   * table file's own directory. */
  sg_route_table *t = sg_route_table_load("tests/fixtures/route/tenants.json",
                                          SG_SOURCE_ROOT, collect, &r);
  CHECK(t != NULL);
  reports_dump(&r);
  reports_clear(&r);
  if (t != NULL) {
    CHECK_STR_CONTAINS(t->path, "tests/fixtures/route/tenants.json");
    CHECK(strcmp(t->tenants[0].credential, "acme-test-token-0123456789") == 0);
    CHECK(strcmp(t->tenants[0].credential_origin, FIXDIR "/secrets/acme-token") == 0);
    sg_route_table_unref(t);
  }

  t = sg_route_table_load("no-such-tenants.json", FIXDIR, collect, &r);
  CHECK(t == NULL);
  CHECK(r.n == 1 && strcmp(r.path[0], "") == 0);
  if (r.n == 1)
    CHECK_STR_CONTAINS(r.msg[0], "no-such-tenants.json");
  reports_clear(&r);

  t = sg_route_table_load(FIXDIR "/README", NULL, collect, &r);
  CHECK(t == NULL);
  CHECK(r.n == 1);
  if (r.n == 1)
    CHECK_STR_CONTAINS(r.msg[0], "invalid JSON");
  reports_clear(&r);
}

#define B1 "{\"name\":\"b1\",\"address\":\"127.0.0.1\",\"port\":15002}"
#define ALLOW_ALICE "\"allow\":{\"identities\":[\"alice\"]}"
#define T(name, extra) "{\"name\":\"" name "\",\"backends\":[" B1 "]," ALLOW_ALICE extra "}"

static void test_validation_errors(void) {
  /* Sanity: the building blocks load. */
  reports r = {0};
  sg_route_table *t = load_text("{\"tenants\":[" T("a", "") "]}", &r);
  CHECK(t != NULL);
  reports_dump(&r);
  reports_clear(&r);
  sg_route_table_unref(t);

  EXPECT_ERROR("[]", "", "must be a JSON object");
  EXPECT_ERROR("{}", "tenants", "missing");
  EXPECT_ERROR("{\"tenants\":[]}", "tenants", "at least one tenant");
  EXPECT_ERROR("{\"tenants\":[" T("a", "") "],\"tenant\":1}", "tenant",
               "unknown key");
  EXPECT_ERROR("{\"tenants\":[3]}", "tenants[0]", "must be an object");

  /* duplicates */
  EXPECT_ERROR("{\"tenants\":[" T("a", "") "," T("a", "") "]}",
               "tenants[1].name", "duplicate tenant name 'a'");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               B1 "," B1 "]}]}",
               "tenants[0].backends[1].name", "duplicate backend name 'b1'");
  /* Unnamed backends are named address:port: the same address twice is a
   * duplicate too. */
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1},{\"address\":\"h\",\"port\":1}]}]}",
               "tenants[0].backends[1].name", "'h:1'");

  /* unknown keys at each level */
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"allwo\":{}") "]}", "tenants[0].allwo",
               "unknown key");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"wieght\":2}]}]}",
               "tenants[0].backends[0].wieght", "unknown key");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "],"
               "\"allow\":{\"identity_prefix\":[\"x\"]}}]}",
               "tenants[0].allow.identity_prefix", "identity_prefixes");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"limits\":{\"rps\":5}") "]}",
               "tenants[0].limits.rps", "requests_per_second");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"path\":\"x\"}") "]}",
               "tenants[0].upstream_credential.path", "unknown key");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"verfy\":false}}]}]}",
               "tenants[0].backends[0].tls.verfy", "unknown key");

  /* wrong types and values */
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"failover\":\"yes\"") "]}",
               "tenants[0].failover", "true or false");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":{}}]}",
               "tenants[0].backends", "must be an array");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":\"15002\"}]}]}",
               "tenants[0].backends[0].port", "must be an integer");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":70000}]}]}",
               "tenants[0].backends[0].port", "out of range");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\"}]}]}",
               "tenants[0].backends[0].port", "missing");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"weight\":-1}]}]}",
               "tenants[0].backends[0].weight", "out of range");
  EXPECT_ERROR("{\"tenants\":[{\"name\":7," ALLOW_ALICE ",\"backends\":[" B1 "]}]}",
               "tenants[0].name", "must be a string");
  EXPECT_ERROR("{\"tenants\":[" T("a b", "") "]}", "tenants[0].name",
               "not a valid tenant name");
  /* Metrics label refused calls tenant="none": no tenant may share it. */
  EXPECT_ERROR("{\"tenants\":[" T("none", "") "]}", "tenants[0].name",
               "'none' is reserved");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"user_id\":\"replace\"") "]}",
               "tenants[0].user_id", "rewrite, enforce, off");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"limits\":{\"over_limit_status\":\"busy\"}") "]}",
               "tenants[0].limits.over_limit_status", "resource_exhausted, unavailable");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"limits\":{\"burst\":5}") "]}",
               "tenants[0].limits.burst", "requests_per_second");

  /* backends */
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":[]}]}",
               "tenants[0].backends", "at least one backend");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE "}]}",
               "tenants[0].backends", "missing");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"weight\":0}]}]}",
               "tenants[0].backends", "weight 0");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"ca\":\"nope.pem\"}}]}]}",
               "tenants[0].backends[0].tls.ca", "cannot read");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"cert\":\"certs/upstream-ca.pem\"}}]}]}",
               "tenants[0].backends[0].tls", "\"cert\" and \"key\" go together");
  /* A file that exists but is no CA bundle fails at load, not on use. */
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"ca\":\"secrets/acme-token\"}}]}]}",
               "tenants[0].backends[0].tls.ca", "not PEM");
  /* "sni" is a name a certificate can carry: a URL or a host with a port
   * would match none, and every call would get 14. */
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"sni\":\"https://s.internal:15002\"}}]}]}",
               "tenants[0].backends[0].tls.sni", "without a scheme");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"sni\":\"s.internal:15002\"}}]}]}",
               "tenants[0].backends[0].tls.sni", "without a port");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"sni\":\"s internal\"}}]}]}",
               "tenants[0].backends[0].tls.sni", "host name");
  /* "ca" is never read without verification: the contradiction is refused
   * rather than a bad file loading until "verify" is turned back on. */
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"ca\":\"certs/upstream-ca.pem\","
               "\"verify\":false}}]}]}",
               "tenants[0].backends[0].tls.ca", "no effect with \"verify\": false");
  {
    static const char *const good_sni[] = {"s.internal", "s.internal.", "10.0.0.1", "::1",
                                           "spark_0.ns", NULL};
    for (const char *const *g = good_sni; *g != NULL; g++) {
      char text[512];
      snprintf(text, sizeof text,
               "{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
               "{\"address\":\"h\",\"port\":1,\"tls\":{\"sni\":\"%s\"}}]}]}", *g);
      reports gr = {0};
      sg_route_table *gt = load_text(text, &gr);
      CHECK(gt != NULL);
      if (gt == NULL)
        reports_dump(&gr);
      sg_route_table_unref(gt);
      reports_clear(&gr);
    }
    /* verify false alone is allowed (said loudly elsewhere). */
    reports gr = {0};
    sg_route_table *gt = load_text(
        "{\"tenants\":[{\"name\":\"a\"," ALLOW_ALICE ",\"backends\":["
        "{\"address\":\"h\",\"port\":1,\"tls\":{\"verify\":false}}]}]}", &gr);
    CHECK(gt != NULL);
    sg_route_table_unref(gt);
    reports_clear(&gr);
  }

  /* selectors */
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\",\"cookie:x\"],\"tenants\":["
               T("a", "") "]}",
               "tenant_selectors[1]", "unknown selector 'cookie:x'");
  EXPECT_ERROR("{\"tenant_selectors\":[\"jwt_claim:\"],\"tenants\":[" T("a", "") "]}",
               "tenant_selectors[0]", "unknown selector");
  EXPECT_ERROR("{\"tenant_selectors\":[\"header::authority\"],\"tenants\":[" T("a", "") "]}",
               "tenant_selectors[0]", "not a valid header name");
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\",\"identity\"],\"tenants\":["
               T("a", "") "]}",
               "tenant_selectors[1]", "listed twice");
  EXPECT_ERROR("{\"tenant_selectors\":[\"header:X-Tenant\",\"header:x-tenant\"],"
               "\"tenants\":[" T("a", "") "]}",
               "tenant_selectors[1]", "listed twice");
  EXPECT_ERROR("{\"tenant_selectors\":[],\"tenants\":[" T("a", "") "]}",
               "tenant_selectors", "at least one selector");
  EXPECT_ERROR("{\"tenant_selectors\":\"identity\",\"tenants\":[" T("a", "") "]}",
               "tenant_selectors", "must be an array");

  /* methods */
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"methods\":[\"ExecutePlan\",\"Execute\"]") "]}",
               "tenants[0].methods[1]", "'Execute' is not a SparkConnectService method");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"methods\":[]") "]}", "tenants[0].methods",
               "refuse every call");

  /* hosts */
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"hosts\":[\"x.example.com\"]") ","
               T("b", ",\"hosts\":[\"y.example.com\",\"X.Example.com.\"]") "]}",
               "tenants[1].hosts[1]", "already used by tenant 'a'");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"hosts\":[\"x.example.com:443\"]") "]}",
               "tenants[0].hosts[0]", "without a port");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"hosts\":[\"*.example.com\"]") "]}",
               "tenants[0].hosts[0]", "wildcards");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"hosts\":[\"a.example\",\"A.example\"]") "]}",
               "tenants[0].hosts[1]", "listed twice");
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\"],\"tenants\":["
               T("a", ",\"hosts\":[\"a.example\"]") "]}",
               "tenants[0].hosts", "no \"authority\"");

  /* allow */
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "]}]}",
               "tenants[0].allow", "admits no one");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "],\"allow\":{}}]}",
               "tenants[0].allow", "admits no one");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "],"
               "\"allow\":{\"identities\":[]}}]}",
               "tenants[0].allow", "admits no one");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "],"
               "\"allow\":{\"identities\":[\"\"]}}]}",
               "tenants[0].allow.identities[0]", "non-empty");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "],"
               "\"allow\":{\"claims\":{\"groups\":\"x\"}}}]}",
               "tenants[0].allow.claims.groups", "non-empty array");
  EXPECT_ERROR("{\"tenants\":[{\"name\":\"a\",\"backends\":[" B1 "],"
               "\"allow\":{\"claims\":{\"groups\":[{\"x\":1}]}}}]}",
               "tenants[0].allow.claims.groups", "strings, integers or booleans");

  /* credentials: unreadable, unset, empty; the value never in a message */
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"file\":\"secrets/nope\"}") "]}",
               "tenants[0].upstream_credential.file", "cannot read '" FIXDIR "/secrets/nope'");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"file\":\"secrets/empty-token\"}") "]}",
               "tenants[0].upstream_credential.file", "is empty");
  unsetenv("SG_TEST_ROUTE_UNSET");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"SG_TEST_ROUTE_UNSET\"}") "]}",
               "tenants[0].upstream_credential.env", "SG_TEST_ROUTE_UNSET is not set");
  setenv("SG_TEST_ROUTE_EMPTY", "", 1);
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"SG_TEST_ROUTE_EMPTY\"}") "]}",
               "tenants[0].upstream_credential.env", "SG_TEST_ROUTE_EMPTY is empty");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"X\",\"file\":\"y\"}") "]}",
               "tenants[0].upstream_credential", "not both");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{}") "]}",
               "tenants[0].upstream_credential", "either");
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"file\":\"secrets/spaced-token\"}") "]}",
               "tenants[0].upstream_credential.file", "token only");
  /* A header value is printable ASCII: a byte order mark (said as such)
   * or any other non-ASCII byte is refused, the value never shown. */
  setenv("SG_TEST_ROUTE_BOM", "\xef\xbb\xbf" "bom-very-secret", 1);
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"SG_TEST_ROUTE_BOM\"}") "]}",
               "tenants[0].upstream_credential.env", "UTF-8 byte order mark");
  setenv("SG_TEST_ROUTE_UTF8", "caf\xc3\xa9-very-secret", 1);
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"SG_TEST_ROUTE_UTF8\"}") "]}",
               "tenants[0].upstream_credential.env", "non-ASCII");
  setenv("SG_TEST_ROUTE_HIGH", "x\xff", 1);
  EXPECT_ERROR("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"SG_TEST_ROUTE_HIGH\"}") "]}",
               "tenants[0].upstream_credential.env", "non-ASCII");
  for (const char *const *var = (const char *const[]){"SG_TEST_ROUTE_BOM", "SG_TEST_ROUTE_UTF8",
                                                       NULL};
       *var != NULL; var++) {
    char text[512];
    snprintf(text, sizeof text,
             "{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"%s\"}") "]}", *var);
    r.n = 0;
    t = load_text(text, &r);
    CHECK(t == NULL);
    for (size_t i = 0; i < r.n; i++)
      CHECK(strstr(r.msg[i], "very-secret") == NULL);
    reports_clear(&r);
  }
  setenv("SG_TEST_ROUTE_SECRET", "pass word-very-secret", 1);
  r.n = 0;
  t = load_text("{\"tenants\":[" T("a", ",\"upstream_credential\":{\"env\":\"SG_TEST_ROUTE_SECRET\"}") "]}", &r);
  CHECK(t == NULL);
  CHECK(r.n == 1);
  for (size_t i = 0; i < r.n; i++) {
    CHECK(strstr(r.msg[i], "very-secret") == NULL);
    CHECK(strstr(r.msg[i], "pass") == NULL);
  }
  reports_clear(&r);

  /* unreachable by construction */
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\"],\"tenants\":["
               T("acme", "") "," T("beta", "") "]}",
               "tenants[1].allow.identities[0]",
               "identity 'alice' is allowed on tenant 'beta' and on tenant 'acme'");
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\"],\"tenants\":["
               "{\"name\":\"acme\",\"backends\":[" B1 "],\"allow\":{\"identity_prefixes\":[\"spiffe://x/\"]}},"
               "{\"name\":\"beta\",\"backends\":[" B1 "],\"allow\":{\"identities\":[\"spiffe://x/y\"]}}]}",
               "tenants[1].allow.identities[0]", "prefix 'spiffe://x/' of tenant 'acme'");
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\"],\"tenants\":["
               "{\"name\":\"acme\",\"backends\":[" B1 "],\"allow\":{\"identity_prefixes\":[\"spiffe://x/\"]}},"
               "{\"name\":\"beta\",\"backends\":[" B1 "],\"allow\":{\"identity_prefixes\":[\"spiffe://x/ns/b/\"]}}]}",
               "tenants[1].allow.identity_prefixes[0]", "overlaps prefix 'spiffe://x/' of tenant 'acme'");
  EXPECT_ERROR("{\"tenant_selectors\":[\"identity\"],\"tenants\":["
               "{\"name\":\"acme\",\"backends\":[" B1 "],\"allow\":{\"any_identity\":true}},"
               "{\"name\":\"beta\",\"backends\":[" B1 "],\"allow\":{\"claims\":{\"g\":[\"b\"]}}}]}",
               "tenants[1].allow", "'acme' has \"any_identity\"");
  EXPECT_ERROR("{\"tenant_selectors\":[\"authority\"],\"tenants\":[" T("a", "") "]}",
               "tenants[0]", "tenant 'a' can never be selected");
  /* With a selector that names tenants, the same overlap is fine. */
  r.n = 0;
  t = load_text("{\"tenant_selectors\":[\"header:x-spark-tenant\",\"identity\"],"
                "\"tenants\":[" T("acme", "") "," T("beta", "") "]}", &r);
  CHECK(t != NULL);
  reports_dump(&r);
  reports_clear(&r);
  sg_route_table_unref(t);
  /* Every problem is reported, not just the first. */
  t = load_text("{\"tenants\":[{\"name\":\"a\",\"backends\":[],\"failover\":1,"
                "\"user_id\":\"x\"}]}", &r);
  CHECK(t == NULL);
  CHECK(r.n >= 4);
  reports_clear(&r);
}

/* A table of thousands of tenants is checked by sorting, not by comparing
 * every pair: every overlap is still found, each rule is reported once. */
static json_t *many_tenants(size_t n) {
  json_t *tenants = json_array();
  for (size_t i = 0; i < n; i++) {
    char name[32], id[32], pre[48];
    snprintf(name, sizeof name, "t-%zu", i);
    snprintf(id, sizeof id, "user-%zu", i);
    snprintf(pre, sizeof pre, "spiffe://x/ns/t-%zu/", i);
    json_array_append_new(
        tenants,
        json_pack("{s:s, s:[{s:s, s:s, s:i}], s:{s:[s], s:[s]}}", "name", name,
                  "backends", "name", "b1", "address", "127.0.0.1", "port",
                  15002, "allow", "identities", id, "identity_prefixes", pre));
  }
  return json_pack("{s:[s], s:o}", "tenant_selectors", "identity", "tenants",
                   tenants);
}

static void add_rule(json_t *root, size_t tenant, const char *kind,
                     const char *value) {
  json_t *ten = json_array_get(json_object_get(root, "tenants"), tenant);
  json_array_append_new(json_object_get(json_object_get(ten, "allow"), kind),
                        json_string(value));
}

static bool reported(const reports *r, const char *path, const char *needle) {
  for (size_t i = 0; i < r->n; i++)
    if (strcmp(r->path[i], path) == 0 && strstr(r->msg[i], needle) != NULL)
      return true;
  return false;
}

static void test_overlaps_across_many_tenants(void) {
  reports r = {0};
  json_t *root = many_tenants(3000);
  sg_route_table *t = sg_route_table_from_json(root, FIXDIR, collect, &r);
  CHECK(t != NULL);
  CHECK(r.n == 0);
  reports_dump(&r);
  reports_clear(&r);
  sg_route_table_unref(t);

  add_rule(root, 2999, "identities", "user-7");
  add_rule(root, 1500, "identity_prefixes", "spiffe://x/ns/t-42/sub/");
  /* The identity in the earlier tenant, the prefix in the later one. */
  add_rule(root, 10, "identities", "svc://late/a");
  add_rule(root, 2000, "identity_prefixes", "svc://late/");
  add_rule(root, 100, "identities", "shared");
  add_rule(root, 200, "identities", "shared");
  add_rule(root, 300, "identities", "shared");
  /* A tenant's own rules may nest. */
  add_rule(root, 5, "identity_prefixes", "spiffe://x/ns/t-5/deeper/");
  t = sg_route_table_from_json(root, FIXDIR, collect, &r);
  CHECK(t == NULL);
  CHECK(r.n == 5);
  CHECK(reported(&r, "tenants[2999].allow.identities[1]",
                 "identity 'user-7' is allowed on tenant 't-2999' and on "
                 "tenant 't-7' (tenants[7].allow.identities[0])"));
  CHECK(reported(&r, "tenants[1500].allow.identity_prefixes[1]",
                 "prefix 'spiffe://x/ns/t-42/sub/' of tenant 't-1500' overlaps "
                 "prefix 'spiffe://x/ns/t-42/' of tenant 't-42'"));
  CHECK(reported(&r, "tenants[10].allow.identities[1]",
                 "matches prefix 'svc://late/' of tenant 't-2000'"));
  CHECK(reported(&r, "tenants[200].allow.identities[1]",
                 "tenant 't-100' (tenants[100].allow.identities[1])"));
  CHECK(reported(&r, "tenants[300].allow.identities[1]",
                 "tenant 't-100' (tenants[100].allow.identities[1])"));
  reports_dump(&r);
  reports_clear(&r);
  json_decref(root);

  /* "any_identity": one error per tenant it collides with. */
  root = many_tenants(4);
  json_object_set_new(json_object_get(json_array_get(json_object_get(root, "tenants"), 1),
                                      "allow"),
                      "any_identity", json_true());
  json_object_set_new(json_object_get(json_array_get(json_object_get(root, "tenants"), 3),
                                      "allow"),
                      "any_identity", json_true());
  t = sg_route_table_from_json(root, FIXDIR, collect, &r);
  CHECK(t == NULL);
  CHECK(r.n == 3);
  CHECK(reported(&r, "tenants[1].allow", "tenant 't-1' has \"any_identity\" and tenant 't-0'"));
  CHECK(reported(&r, "tenants[2].allow", "tenant 't-1' has \"any_identity\" and tenant 't-2'"));
  CHECK(reported(&r, "tenants[3].allow", "tenant 't-3' has \"any_identity\" and tenant 't-0'"));
  reports_dump(&r);
  reports_clear(&r);
  json_decref(root);
}

/* A table with one backend at |address|; returns whether it loads, and
 * with |needle| set, whether the error at its address contains it. */
static bool address_loads(const char *address, const char *needle) {
  json_t *root = json_pack(
      "{s:[{s:s, s:{s:b}, s:[{s:s, s:i}]}]}", "tenants", "name", "a", "allow",
      "any_identity", 1, "backends", "address", address, "port", 15002);
  reports r = {0};
  sg_route_table *t = sg_route_table_from_json(root, FIXDIR, collect, &r);
  bool loaded = t != NULL;
  if (loaded == (needle != NULL) ||
      (needle != NULL && !reported(&r, "tenants[0].backends[0].address", needle))) {
    fprintf(stderr, "address '%s': expected %s%s\n", address,
            needle ? "an error containing " : "it to load", needle ? needle : "");
    reports_dump(&r);
  }
  if (needle != NULL && !reported(&r, "tenants[0].backends[0].address", needle))
    loaded = true;
  reports_clear(&r);
  sg_route_table_unref(t);
  json_decref(root);
  return loaded;
}

/* A backend address is an IP address or a host name: anything else is a
 * load error at its path, not a backend that fails every call with 14. */
/* The rule shared by tenant and JWT provider names (header values and
 * metrics labels). */
static void test_name_rule(void) {
  CHECK(sg_route_name_is_valid("acme"));
  CHECK(sg_route_name_is_valid("0.corp_idp-2"));
  char longest[SG_ROUTE_MAX_NAME_LEN + 2];
  memset(longest, 'a', SG_ROUTE_MAX_NAME_LEN);
  longest[SG_ROUTE_MAX_NAME_LEN] = '\0';
  CHECK(sg_route_name_is_valid(longest));
  longest[SG_ROUTE_MAX_NAME_LEN] = 'a';
  longest[SG_ROUTE_MAX_NAME_LEN + 1] = '\0';
  CHECK(!sg_route_name_is_valid(longest));
  static const char *const bad[] = {"", "-a", ".a", "a b", "corp\r\nx: y", "a\n", "caf\xc3\xa9",
                                    "a:b", "a/b", NULL};
  for (const char *const *b = bad; *b != NULL; b++)
    CHECK(!sg_route_name_is_valid(*b));
}

static void test_backend_address(void) {
  static const char *const good[] = {
      "127.0.0.1", "::1", "fe80::1", "::ffff:10.0.0.1", "h", "localhost",
      "spark-1.internal", "spark.internal.", "Spark_Connect-0.ns.svc.cluster.local",
      "a1.b2.c3", "fe80::1%eth0", "::1%lo", "fe80::1%2", NULL};
  static const char *const bad[][2] = {
      {"[::1]", "without brackets"},
      {"127.0.0.1:15002", "without a port"},
      {"spark.internal:15002", "without a port"},
      {" 127.0.0.1", "white space"},
      {"spark.internal ", "white space"},
      {"http://x", "without a scheme"},
      {"grpc://spark:15002/", "without a scheme"},
      {"x/y", "without a path"},
      {"1:2:3", "not a valid IPv6"},
      {"fe80::1%", "not a valid IPv6"},
      {"fe80::1%e th0", "not a valid IPv6"},
      {"fe80::1%0123456789abcdef", "not a valid IPv6"},
      {"10.0.0.1%eth0", "must be an IP address or a host name"},
      {"10.0.0.256", "not a valid IPv4"},
      {"10.1", "not a valid IPv4"},
      {"1.2.3.4.", "not a valid IPv4"},
      {"a..b", "1 to 63"},
      {".a", "1 to 63"},
      {".", "1 to 63"},
      {"a*b", "must be an IP address or a host name"},
      {"sp\xc3\xa4rk", "must be an IP address or a host name"},
  };
  for (size_t i = 0; good[i] != NULL; i++)
    CHECK(address_loads(good[i], NULL));
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    CHECK(!address_loads(bad[i][0], bad[i][1]));

  char name[300];
  memset(name, 'a', 63);
  strcpy(name + 63, ".x");
  CHECK(address_loads(name, NULL)); /* a label of 63 */
  memset(name, 'a', 64);
  strcpy(name + 64, ".x");
  CHECK(!address_loads(name, "1 to 63"));
  for (size_t i = 0; i < 252; i += 2)
    memcpy(name + i, "a.", 2);
  strcpy(name + 252, "a");
  CHECK(address_loads(name, NULL)); /* 253 characters */
  strcpy(name + 252, "a.");
  CHECK(address_loads(name, NULL)); /* and its trailing dot */
  strcpy(name + 252, "aa");
  CHECK(!address_loads(name, "at most 253"));
}

/* ---- selection ----------------------------------------------------------- */

static const char *const selection_table =
    "{\"tenant_selectors\":[\"jwt_claim:tenant\",\"header:x-spark-tenant\","
    "\"authority\",\"identity\"],"
    "\"tenants\":["
    " {\"name\":\"acme\",\"hosts\":[\"acme.spark.example.com\",\"[::1]\"],"
    "  \"backends\":[" B1 "],"
    "  \"allow\":{\"identities\":[\"alice\",\"carol\"],"
    "            \"identity_prefixes\":[\"spiffe://example.org/ns/acme/\"],"
    "            \"claims\":{\"groups\":[\"acme-analysts\"],\"org\":[42]}}},"
    " {\"name\":\"beta\",\"hosts\":[\"beta.spark.example.com\"],"
    "  \"backends\":[" B1 "],"
    "  \"allow\":{\"identities\":[\"bob\",\"carol\"]}},"
    " {\"name\":\"gamma\",\"backends\":[" B1 "],"
    "  \"allow\":{\"claims\":{\"groups\":[\"gamma-users\"]}}}"
    "]}";

static sg_route_decision select_with(const sg_route_table *t, const char *identity,
                                     const char *claims_json, const char *authority,
                                     const char *const *headers) {
  json_t *claims = claims_json ? json_loads(claims_json, 0, NULL) : NULL;
  sg_route_request req = {
      .identity = identity,
      .claims = claims,
      .authority = authority,
      .authority_len = authority ? strlen(authority) : 0,
      .header = headers ? hdr_lookup : NULL,
      .header_ctx = (void *)headers,
  };
  sg_route_decision d;
  memset(&d, 0xa5, sizeof d);
  int rv = sg_route_select(t, &req, &d);
  CHECK((rv == 0) == (d.outcome == SG_ROUTE_OK));
  CHECK((d.tenant != NULL) == (d.outcome == SG_ROUTE_OK));
  CHECK(d.reason != NULL && d.message != NULL);
  /* The client never learns tenant names from a denial. */
  if (d.outcome != SG_ROUTE_OK) {
    CHECK(strstr(d.message, "acme") == NULL);
    CHECK(strstr(d.message, "beta") == NULL);
    CHECK(strstr(d.message, "gamma") == NULL);
    CHECK(strstr(d.message, "nosuch") == NULL);
  }
  json_decref(claims);
  return d;
}

static const char *tname(const sg_route_decision *d) {
  return d->tenant ? d->tenant->name : "(none)";
}

static void test_selection(void) {
  reports r = {0};
  sg_route_table *t = load_text(selection_table, &r);
  CHECK(t != NULL);
  reports_dump(&r);
  reports_clear(&r);
  if (t == NULL)
    return;
  sg_route_decision d;

  /* each selector alone */
  d = select_with(t, "carol", "{\"tenant\":\"beta\"}", NULL, NULL);
  CHECK(strcmp(tname(&d), "beta") == 0);
  CHECK(strcmp(d.selector, "jwt_claim:tenant") == 0);
  CHECK(strcmp(d.reason, "ok") == 0);
  const char *h_acme[] = {"x-spark-tenant", "acme", NULL};
  d = select_with(t, "carol", NULL, NULL, h_acme);
  CHECK(strcmp(tname(&d), "acme") == 0);
  CHECK(strcmp(d.selector, "header:x-spark-tenant") == 0);
  d = select_with(t, "carol", NULL, "beta.spark.example.com:443", NULL);
  CHECK(strcmp(tname(&d), "beta") == 0);
  CHECK(strcmp(d.selector, "authority") == 0);
  d = select_with(t, "bob", NULL, NULL, NULL);
  CHECK(strcmp(tname(&d), "beta") == 0);
  CHECK(strcmp(d.selector, "identity") == 0);

  /* authority: case, port, trailing dot, IPv6; unknown host falls through */
  d = select_with(t, "alice", NULL, "ACME.Spark.Example.COM", NULL);
  CHECK(strcmp(tname(&d), "acme") == 0 && strcmp(d.selector, "authority") == 0);
  d = select_with(t, "alice", NULL, "acme.spark.example.com.:8443", NULL);
  CHECK(strcmp(tname(&d), "acme") == 0 && strcmp(d.selector, "authority") == 0);
  d = select_with(t, "alice", NULL, "[::1]:8443", NULL);
  CHECK(strcmp(tname(&d), "acme") == 0 && strcmp(d.selector, "authority") == 0);
  d = select_with(t, "alice", NULL, "acme.spark.example.com.evil:1", NULL);
  CHECK(strcmp(tname(&d), "acme") == 0 && strcmp(d.selector, "identity") == 0);
  d = select_with(t, "alice", NULL, "spark.example.com", NULL);
  CHECK(strcmp(d.selector, "identity") == 0);

  /* precedence: claim over header over authority over identity */
  const char *h_beta[] = {"x-spark-tenant", "beta", NULL};
  d = select_with(t, "carol", "{\"tenant\":\"acme\"}", "beta.spark.example.com", h_beta);
  CHECK(strcmp(tname(&d), "acme") == 0);
  d = select_with(t, "carol", "{\"sub\":\"carol\"}", "acme.spark.example.com", h_beta);
  CHECK(strcmp(tname(&d), "beta") == 0);
  d = select_with(t, "carol", NULL, "acme.spark.example.com", NULL);
  CHECK(strcmp(tname(&d), "acme") == 0);
  /* a non-string or empty claim, or an empty header, yields nothing */
  const char *h_empty[] = {"x-spark-tenant", "", NULL};
  d = select_with(t, "carol", "{\"tenant\":[\"acme\"]}", "beta.spark.example.com", h_empty);
  CHECK(strcmp(tname(&d), "beta") == 0 && strcmp(d.selector, "authority") == 0);
  d = select_with(t, "carol", "{\"tenant\":\"\"}", NULL, h_acme);
  CHECK(strcmp(tname(&d), "acme") == 0 && strcmp(d.selector, "header:x-spark-tenant") == 0);

  /* the selected tenant must admit the caller */
  d = select_with(t, "alice", NULL, NULL, h_beta);
  CHECK(d.outcome == SG_ROUTE_NOT_ALLOWED);
  CHECK(strcmp(d.reason, "not_allowed") == 0);
  CHECK(d.denied_tenant != NULL && strcmp(d.denied_tenant->name, "beta") == 0);
  CHECK(d.tenant == NULL);
  d = select_with(t, "alice", NULL, "beta.spark.example.com", NULL);
  CHECK(d.outcome == SG_ROUTE_NOT_ALLOWED && strcmp(d.selector, "authority") == 0);
  d = select_with(t, "bob", "{\"tenant\":\"acme\"}", NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_NOT_ALLOWED);
  /* ... and a denial does not fall through to a selector that would admit */
  d = select_with(t, "bob", NULL, "acme.spark.example.com", NULL);
  CHECK(d.outcome == SG_ROUTE_NOT_ALLOWED);

  /* unknown tenant: stops there, same client message as not_allowed */
  const char *h_nosuch[] = {"x-spark-tenant", "nosuch", NULL};
  d = select_with(t, "alice", NULL, "acme.spark.example.com", h_nosuch);
  CHECK(d.outcome == SG_ROUTE_UNKNOWN_TENANT);
  CHECK(strcmp(d.reason, "unknown_tenant") == 0);
  CHECK(strcmp(d.selector, "header:x-spark-tenant") == 0);
  sg_route_decision d2 = select_with(t, "alice", NULL, NULL, h_beta);
  CHECK(strcmp(d.message, d2.message) == 0);
  const char *h_prefix[] = {"x-spark-tenant", "acm", NULL};
  d = select_with(t, "alice", NULL, NULL, h_prefix);
  CHECK(d.outcome == SG_ROUTE_UNKNOWN_TENANT);

  /* no tenant at all */
  d = select_with(t, "mallory", NULL, NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_NO_TENANT);
  CHECK(strcmp(d.reason, "no_tenant") == 0);
  CHECK(d.selector == NULL);
  d = select_with(t, NULL, NULL, NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_NO_TENANT);
  d = select_with(t, NULL, NULL, "acme.spark.example.com", NULL);
  CHECK(d.outcome == SG_ROUTE_NOT_ALLOWED); /* no identity: admitted nowhere */

  /* identity: exactly one tenant must admit */
  d = select_with(t, "carol", NULL, NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_AMBIGUOUS_IDENTITY);
  CHECK(strcmp(d.reason, "ambiguous_identity") == 0);

  /* prefix and claim matches */
  d = select_with(t, "spiffe://example.org/ns/acme/sa/etl", NULL, NULL, NULL);
  CHECK(strcmp(tname(&d), "acme") == 0);
  d = select_with(t, "spiffe://example.org/ns/acmex/sa/etl", NULL, NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_NO_TENANT);
  d = select_with(t, "dave", "{\"groups\":[\"x\",\"gamma-users\"]}", NULL, NULL);
  CHECK(strcmp(tname(&d), "gamma") == 0);
  d = select_with(t, "dave", "{\"groups\":\"gamma-users\"}", NULL, NULL);
  CHECK(strcmp(tname(&d), "gamma") == 0);
  d = select_with(t, "dave", "{\"groups\":[\"gamma\"]}", NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_NO_TENANT);
  d = select_with(t, "dave", "{\"org\":42}", NULL, NULL);
  CHECK(strcmp(tname(&d), "acme") == 0);
  d = select_with(t, "dave", "{\"org\":\"42\"}", NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_NO_TENANT);
  d = select_with(t, "dave", "{\"groups\":[\"acme-analysts\",\"gamma-users\"]}", NULL, NULL);
  CHECK(d.outcome == SG_ROUTE_AMBIGUOUS_IDENTITY);
  d = select_with(t, "dave", "{\"groups\":[\"acme-analysts\",\"gamma-users\"],\"tenant\":\"gamma\"}",
                  NULL, NULL);
  CHECK(strcmp(tname(&d), "gamma") == 0);
  /* claims grant nothing without a JWT (mTLS callers) */
  CHECK(!sg_route_tenant_admits(&t->tenants[2], "dave", NULL));
  CHECK(sg_route_tenant_admits(&t->tenants[0], "alice", NULL));

  sg_route_table_unref(t);
}

static void test_methods(void) {
  static const char p1[] = "/spark.connect.SparkConnectService/ExecutePlan";
  static const char p2[] = "/spark.connect.SparkConnectService/FetchErrorDetails";
  static const char p3[] = "/spark.connect.SparkConnectService/ExecutePlanX";
  static const char p4[] = "/other.Service/ExecutePlan";
  static const char p5[] = "/spark.connect.SparkConnectService/";
  CHECK(sg_spark_method_from_path(p1, sizeof p1 - 1) == SG_SPARK_EXECUTE_PLAN);
  CHECK(sg_spark_method_from_path(p2, sizeof p2 - 1) == SG_SPARK_FETCH_ERROR_DETAILS);
  CHECK(sg_spark_method_from_path(p1, sizeof p1 - 2) == -1);
  CHECK(sg_spark_method_from_path(p3, sizeof p3 - 1) == -1);
  CHECK(sg_spark_method_from_path(p4, sizeof p4 - 1) == -1);
  CHECK(sg_spark_method_from_path(p5, sizeof p5 - 1) == -1);
  CHECK(strcmp(sg_spark_method_name(SG_SPARK_ADD_ARTIFACTS), "AddArtifacts") == 0);
  CHECK(sg_spark_method_name(SG_SPARK_N_METHODS) == NULL);
}

/* An "off" tenant is matched with a rewrite/enforce tenant listing the same
 * server: the same port and the same address as written (host names in any
 * case, with or without the trailing dot) or as the same numeric IP (any
 * IPv6 spelling, and an IPv4 address as IPv4-mapped IPv6). Off tenants are
 * not matched with each other, nor with a server on another port. */
static void test_off_tenant_shares_backend(void) {
  static const char text[] =
      "{\"tenant_selectors\": [\"header:x-t\"], \"tenants\": ["
      " {\"name\": \"rw\", \"allow\": {\"identities\": [\"a\"]},"
      "  \"backends\": [{\"address\": \"::1\", \"port\": 15002},"
      "                 {\"address\": \"Spark.Example\", \"port\": 15002}]},"
      " {\"name\": \"off-ip\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"b\"]},"
      "  \"backends\": [{\"address\": \"0:0::1\", \"port\": 15002}]},"
      " {\"name\": \"off-host\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"c\"]},"
      "  \"backends\": [{\"address\": \"spark.example\", \"port\": 15002}]},"
      " {\"name\": \"off-port\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"d\"]},"
      "  \"backends\": [{\"address\": \"::1\", \"port\": 15003}]},"
      " {\"name\": \"off-twin\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"e\"]},"
      "  \"backends\": [{\"address\": \"::1\", \"port\": 15003}]},"
      " {\"name\": \"rw4\", \"allow\": {\"identities\": [\"f\"]},"
      "  \"backends\": [{\"address\": \"10.0.0.5\", \"port\": 15004}]},"
      " {\"name\": \"off-mapped\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"g\"]},"
      "  \"backends\": [{\"address\": \"::ffff:10.0.0.5\", \"port\": 15004}]},"
      " {\"name\": \"off-dot\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"h\"]},"
      "  \"backends\": [{\"address\": \"SPARK.example.\", \"port\": 15002}]},"
      " {\"name\": \"off-other\", \"user_id\": \"off\", \"allow\": {\"identities\": [\"i\"]},"
      "  \"backends\": [{\"address\": \"::ffff:10.0.0.6\", \"port\": 15004},"
      "                 {\"address\": \"spark.example.org.\", \"port\": 15002}]}]}";
  reports r = {0};
  sg_route_table *t = load_text(text, &r);
  CHECK(t != NULL);
  if (t == NULL) {
    reports_dump(&r);
    reports_clear(&r);
    return;
  }
  const sg_backend_config *shared = NULL;
  const sg_route_tenant *o =
      sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[1], &shared);
  CHECK(o == &t->tenants[0] && shared == &t->tenants[1].backends[0]);
  shared = NULL;
  o = sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[2], &shared);
  CHECK(o == &t->tenants[0] && shared == &t->tenants[2].backends[0]);
  CHECK(sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[3],
                                           &shared) == NULL);
  CHECK(sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[4],
                                           &shared) == NULL);
  shared = NULL;
  o = sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[6], &shared);
  CHECK(o == &t->tenants[5] && shared == &t->tenants[6].backends[0]);
  shared = NULL;
  o = sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[7], &shared);
  CHECK(o == &t->tenants[0] && shared == &t->tenants[7].backends[0]);
  CHECK(sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[8],
                                           &shared) == NULL);
  /* Only an off tenant is asked about. */
  CHECK(sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, &t->tenants[0],
                                           &shared) == NULL);
  sg_route_table_unref(t);
  reports_clear(&r);
}

/* ---- rendezvous ---------------------------------------------------------- */

#define N_SESSIONS 10000

static void test_spread_and_stability(void) {
  const char *names[] = {"spark-a", "spark-b", "spark-c"};
  int weights[] = {1, 1, 1};
  sg_route_table *t1 = load_backends(names, weights, 3, false);
  sg_route_table *t2 = load_backends(names, weights, 3, false);
  /* Same backends listed in another order: the choice follows names. */
  const char *rnames[] = {"spark-c", "spark-a", "spark-b"};
  sg_route_table *t3 = load_backends(rnames, weights, 3, false);
  CHECK(t1 != NULL && t2 != NULL && t3 != NULL);
  if (t1 == NULL || t2 == NULL || t3 == NULL)
    return;
  size_t count[3] = {0};
  size_t same_12 = 0, same_13 = 0, same_again = 0;
  for (int i = 0; i < N_SESSIONS; i++) {
    char sid[64];
    random_session(sid, sizeof sid);
    size_t a = pick(t1, sid);
    if (a < 3)
      count[a]++;
    same_12 += pick(t2, sid) == a;
    same_again += pick(t1, sid) == a;
    same_13 += strcmp(pick_name(t3, sid), pick_name(t1, sid)) == 0;
  }
  CHECK(same_12 == N_SESSIONS);
  CHECK(same_again == N_SESSIONS);
  CHECK(same_13 == N_SESSIONS);
  for (int i = 0; i < 3; i++) {
    double share = (double)count[i] / N_SESSIONS;
    if (dabs(share - 1.0 / 3) >= 0.025)
      fprintf(stderr, "backend %d share %.4f\n", i, share);
    CHECK(dabs(share - 1.0 / 3) < 0.025);
  }
  /* The user is part of the key: the same session id of another user is
   * placed independently (here: not all on one backend). */
  size_t per_user[3] = {0};
  for (int u = 0; u < 300; u++) {
    char user[32];
    snprintf(user, sizeof user, "user-%d", u);
    size_t idx = 0;
    CHECK(sg_route_pick_backend(&t1->tenants[0], user, "same-session", NULL,
                                &idx) == SG_ROUTE_PICK_OK);
    per_user[idx % 3]++;
  }
  CHECK(per_user[0] > 50 && per_user[1] > 50 && per_user[2] > 50);

  /* The ranking starts with the pick and holds every weighted backend. */
  sg_route_rank_entry rank[4];
  size_t n = sg_route_rank_backends(&t1->tenants[0], "alice", "s-1", rank, 4);
  CHECK(n == 3);
  CHECK(rank[0].index == pick(t1, "s-1"));
  CHECK(rank[0].score >= rank[1].score && rank[1].score >= rank[2].score);
  CHECK(rank[0].index != rank[1].index && rank[1].index != rank[2].index &&
        rank[0].index != rank[2].index);
  sg_route_rank_entry top[1];
  CHECK(sg_route_rank_backends(&t1->tenants[0], "alice", "s-1", top, 1) == 1);
  CHECK(top[0].index == rank[0].index);
  CHECK(sg_route_rank_backends(&t1->tenants[0], "alice", "s-1", top, 0) == 0);

  sg_route_table_unref(t1);
  sg_route_table_unref(t2);
  sg_route_table_unref(t3);
}

static void test_weights(void) {
  const char *names[] = {"heavy", "light"};
  int weights[] = {2, 1};
  sg_route_table *t = load_backends(names, weights, 2, false);
  CHECK(t != NULL);
  if (t == NULL)
    return;
  size_t heavy = 0;
  for (int i = 0; i < N_SESSIONS; i++) {
    char sid[64];
    random_session(sid, sizeof sid);
    heavy += pick(t, sid) == 0;
  }
  double share = (double)heavy / N_SESSIONS;
  CHECK(dabs(share - 2.0 / 3) < 0.025);
  sg_route_table_unref(t);

  /* weight 0 takes nothing and is not ranked */
  const char *names3[] = {"a", "b", "drained"};
  int w3[] = {1, 1, 0};
  t = load_backends(names3, w3, 3, true);
  CHECK(t != NULL);
  if (t == NULL)
    return;
  size_t drained = 0;
  for (int i = 0; i < N_SESSIONS; i++) {
    char sid[64];
    random_session(sid, sizeof sid);
    drained += pick(t, sid) == 2;
    bool up[3] = {false, false, true};
    size_t idx = 99;
    int rv = sg_route_pick_backend(&t->tenants[0], "alice", sid, up, &idx);
    /* even with failover and everything else down, never onto weight 0 */
    CHECK(rv == SG_ROUTE_PICK_DOWN && idx != 2);
  }
  CHECK(drained == 0);
  sg_route_rank_entry rank[3];
  CHECK(sg_route_rank_backends(&t->tenants[0], "alice", "s", rank, 3) == 2);
  CHECK(sg_route_backend_score(&t->tenants[0], 2, "alice", "s") == 0.0);
  sg_route_table_unref(t);

  /* no backend with weight (only reachable by hand: the loader refuses it) */
  sg_backend_config b = {.name = "x", .weight = 0};
  sg_route_tenant manual = {.name = "m", .backends = &b, .n_backends = 1};
  size_t idx = 7;
  CHECK(sg_route_pick_backend(&manual, "u", "s", NULL, &idx) == SG_ROUTE_PICK_NONE);
  CHECK(idx == 7);
}

static void test_membership_changes(void) {
  const char *names4[] = {"spark-a", "spark-b", "spark-c", "spark-d"};
  int weights[] = {1, 1, 1, 1};
  sg_route_table *t3 = load_backends(names4, weights, 3, false);
  sg_route_table *t4 = load_backends(names4, weights, 4, false);
  const char *names_no_b[] = {"spark-a", "spark-c"};
  sg_route_table *t2 = load_backends(names_no_b, weights, 2, false);
  CHECK(t3 != NULL && t4 != NULL && t2 != NULL);
  if (t3 == NULL || t4 == NULL || t2 == NULL)
    return;
  size_t moved_add = 0, moved_elsewhere = 0;
  size_t moved_remove = 0, removed_sessions = 0, wrongly_moved = 0;
  for (int i = 0; i < N_SESSIONS; i++) {
    char sid[64];
    random_session(sid, sizeof sid);
    const char *before = pick_name(t3, sid);
    const char *after = pick_name(t4, sid);
    if (strcmp(before, after) != 0) {
      moved_add++;
      if (strcmp(after, "spark-d") != 0)
        moved_elsewhere++;
    }
    /* remove spark-b from a, b, c */
    const char *without = pick_name(t2, sid);
    if (strcmp(before, "spark-b") == 0) {
      removed_sessions++;
      moved_remove++;
    } else if (strcmp(before, without) != 0) {
      wrongly_moved++;
    }
  }
  double frac = (double)moved_add / N_SESSIONS;
  if (frac < 0.15 || frac > 0.35)
    fprintf(stderr, "adding a 4th backend moved %.3f\n", frac);
  CHECK(frac >= 0.15 && frac <= 0.35);
  CHECK(moved_elsewhere == 0);
  CHECK(wrongly_moved == 0);
  CHECK(removed_sessions > N_SESSIONS / 4 && removed_sessions < N_SESSIONS * 5 / 12);
  CHECK(moved_remove == removed_sessions);
  sg_route_table_unref(t2);
  sg_route_table_unref(t3);
  sg_route_table_unref(t4);
}

static void test_down_backends(void) {
  const char *names[] = {"spark-a", "spark-b", "spark-c"};
  int weights[] = {1, 1, 1};
  sg_route_table *nofo = load_backends(names, weights, 3, false);
  sg_route_table *fo = load_backends(names, weights, 3, true);
  CHECK(nofo != NULL && fo != NULL);
  if (nofo == NULL || fo == NULL)
    return;
  for (int i = 0; i < 200; i++) {
    char sid[64];
    random_session(sid, sizeof sid);
    sg_route_rank_entry rank[3];
    CHECK(sg_route_rank_backends(&fo->tenants[0], "alice", sid, rank, 3) == 3);
    size_t first = rank[0].index, second = rank[1].index, third = rank[2].index;
    bool up[3] = {true, true, true};
    size_t idx = 99;
    CHECK(sg_route_pick_backend(&nofo->tenants[0], "alice", sid, up, &idx) ==
              SG_ROUTE_PICK_OK && idx == first);
    /* another backend down: no effect on this session */
    up[second] = false;
    CHECK(sg_route_pick_backend(&nofo->tenants[0], "alice", sid, up, &idx) ==
              SG_ROUTE_PICK_OK && idx == first);
    up[second] = true;
    /* its own backend down, no failover: that backend, flagged down */
    up[first] = false;
    idx = 99;
    CHECK(sg_route_pick_backend(&nofo->tenants[0], "alice", sid, up, &idx) ==
              SG_ROUTE_PICK_DOWN && idx == first);
    /* with failover: the next in its ranking */
    idx = 99;
    CHECK(sg_route_pick_backend(&fo->tenants[0], "alice", sid, up, &idx) ==
              SG_ROUTE_PICK_OK && idx == second);
    up[second] = false;
    CHECK(sg_route_pick_backend(&fo->tenants[0], "alice", sid, up, &idx) ==
              SG_ROUTE_PICK_OK && idx == third);
    up[third] = false;
    idx = 99;
    CHECK(sg_route_pick_backend(&fo->tenants[0], "alice", sid, up, &idx) ==
              SG_ROUTE_PICK_DOWN && idx == first);
  }
  sg_route_table_unref(nofo);
  sg_route_table_unref(fo);
}

/* ---- token bucket -------------------------------------------------------- */

static void test_token_bucket(void) {
  sg_token_bucket b;
  /* 10 per second, burst 5, starting full at t=1000 */
  sg_token_bucket_init(&b, 10, 1000, 5, 1000);
  for (int i = 0; i < 5; i++)
    CHECK(sg_token_bucket_take(&b, 1000, 1));
  CHECK(!sg_token_bucket_take(&b, 1000, 1));
  CHECK(sg_token_bucket_wait_ms(&b, 1000, 1) == 100);
  CHECK(!sg_token_bucket_take(&b, 1099, 1));
  CHECK(sg_token_bucket_take(&b, 1100, 1));
  CHECK(!sg_token_bucket_take(&b, 1100, 1));
  /* refill caps at the burst */
  CHECK(sg_token_bucket_wait_ms(&b, 1100, 5) == 500);
  CHECK(sg_token_bucket_take(&b, 100000, 5));
  CHECK(!sg_token_bucket_take(&b, 100000, 1));
  /* more than the burst never fits */
  CHECK(!sg_token_bucket_take(&b, 1000000, 6));
  CHECK(sg_token_bucket_wait_ms(&b, 1000000, 6) == UINT64_MAX);
  CHECK(sg_token_bucket_take(&b, 1000000, 5)); /* the failed take cost nothing */
  /* a clock that goes backwards adds nothing and does not rewind */
  CHECK(!sg_token_bucket_take(&b, 500, 1));
  CHECK(!sg_token_bucket_take(&b, 1000050, 1));
  CHECK(sg_token_bucket_take(&b, 1000100, 1));
  /* taking 0 always works */
  CHECK(sg_token_bucket_take(&b, 1000100, 0));

  /* fractional rates accumulate exactly: 1 per 3 ms over 3000 ms */
  sg_token_bucket_init(&b, 1, 3, 1, 0);
  CHECK(sg_token_bucket_take(&b, 0, 1));
  int got = 0;
  for (uint64_t now = 1; now <= 3000; now++)
    got += sg_token_bucket_take(&b, now, 1);
  CHECK(got == 1000);

  /* bytes per minute: 1 GiB burst, 1 GiB per 60000 ms */
  sg_token_bucket_init(&b, 1073741824ULL, 60000, 0, 0);
  CHECK(sg_token_bucket_take(&b, 0, 1073741824ULL));
  CHECK(!sg_token_bucket_take(&b, 0, 16384));
  CHECK(sg_token_bucket_take(&b, 1, 16384)); /* ~17895 bytes per ms */
  CHECK(!sg_token_bucket_take(&b, 1, 16384));
  /* a minute after the last take it is full again */
  CHECK(!sg_token_bucket_take(&b, 60000, 1073741824ULL));
  CHECK(sg_token_bucket_take(&b, 60001, 1073741824ULL));

  /* zeroed or rate 0: unlimited */
  sg_token_bucket z = {0};
  CHECK(sg_token_bucket_take(&z, 0, 1000000));
  CHECK(sg_token_bucket_wait_ms(&z, 0, 1000000) == 0);
  sg_token_bucket_init(&b, 0, 1000, 10, 0);
  CHECK(sg_token_bucket_take(&b, 0, 1000000));

  /* a huge gap does not overflow */
  sg_token_bucket_init(&b, 1000000, 1, 1000, 0);
  CHECK(sg_token_bucket_take(&b, 0, 1000));
  CHECK(sg_token_bucket_take(&b, UINT64_MAX - 1, 1000));
  CHECK(!sg_token_bucket_take(&b, UINT64_MAX - 1, 1));
}

int main(void) {
  test_siphash_vectors();
  test_score_is_the_documented_formula();
  test_load_example();
  test_load_by_path();
  test_validation_errors();
  test_overlaps_across_many_tenants();
  test_name_rule();
  test_backend_address();
  test_selection();
  test_methods();
  test_off_tenant_shares_backend();
  test_spread_and_stability();
  test_weights();
  test_membership_changes();
  test_down_backends();
  test_token_bucket();
  return check_report("test_route");
}
