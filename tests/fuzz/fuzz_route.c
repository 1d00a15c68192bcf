/* libFuzzer target: the routing table (route.h): loading a table from JSON
 * and, when it loads, tenant selection and backend choice for a few fixed
 * requests.
 *
 * The input is parsed as JSON the way the loader reads a table file
 * (duplicate keys rejected); relative names resolve in
 * tests/fixtures/route/, so seeds can name its secrets and CA. Checked:
 *   - a failed load reported at least one problem, each with a JSON path
 *     and a message; a loaded table is consistent (indexes, names, find);
 *   - tenant selection never grants access: whatever selector decided, the
 *     chosen tenant admits the caller; outcome, return value and pointers
 *     agree;
 *   - backend choice: the pick is the first of the ranking, has weight > 0,
 *     is up when reported OK, and the ranking is ordered by score. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "fuzz_support.h"
#include "sparkgate/log.h"
#include "sparkgate/route.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


#define BASE_DIR SG_SOURCE_ROOT "/tests/fixtures/route"

static FILE *devnull;
static json_t *claims_acme, *claims_other;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  sg_log_set_level(SG_LOG_ERROR);
  devnull = fopen("/dev/null", "w");
  claims_acme = json_pack("{s:s, s:[s,s], s:i, s:b}", "tenant", "acme", "groups",
                          "acme-analysts", "spark-users", "level", 3, "verified", 1);
  claims_other = json_pack("{s:s, s:s}", "tenant", "solo", "team", "other");
  if (devnull == NULL || claims_acme == NULL || claims_other == NULL)
    abort();
  return 0;
}

typedef struct report_ctx {
  size_t n;
} report_ctx;

static void report(void *ctx, const char *json_path, const char *msg) {
  report_ctx *r = ctx;
  FUZZ_CHECK(json_path != NULL);
  FUZZ_CHECK(msg != NULL && msg[0] != '\0');
  r->n++;
}

/* ---- requests ------------------------------------------------------------ */

typedef struct headers {
  const char *tenant; /* x-spark-tenant */
  const char *other;  /* any other name */
} headers;

static const char *get_header(void *ctx, const char *name, size_t *len) {
  const headers *h = ctx;
  const char *v = strcmp(name, "x-spark-tenant") == 0 ? h->tenant : h->other;
  if (v != NULL)
    *len = strlen(v);
  return v;
}

static bool tenant_in_table(const sg_route_table *t, const sg_route_tenant *x) {
  return x >= t->tenants && x < t->tenants + t->n_tenants;
}

static void check_select(const sg_route_table *t, const sg_route_request *rq) {
  sg_route_decision d;
  memset(&d, 0xa5, sizeof d); /* every field must be written */
  int rv = sg_route_select(t, rq, &d);
  FUZZ_CHECK(rv == 0 || rv == -1);
  FUZZ_CHECK((rv == 0) == (d.outcome == SG_ROUTE_OK));
  FUZZ_CHECK(d.reason != NULL &&
             strcmp(d.reason, sg_route_outcome_reason(d.outcome)) == 0);
  FUZZ_CHECK(d.message != NULL);
  if (rv == 0) {
    FUZZ_CHECK(d.tenant != NULL && tenant_in_table(t, d.tenant));
    FUZZ_CHECK(d.selector != NULL);
    /* A selector chooses among the tenants the caller may use; it never
     * grants access. */
    FUZZ_CHECK(sg_route_tenant_admits(d.tenant, rq->identity, rq->claims));
  } else {
    FUZZ_CHECK(d.tenant == NULL);
    FUZZ_CHECK(d.outcome == SG_ROUTE_NO_TENANT ||
               d.outcome == SG_ROUTE_AMBIGUOUS_IDENTITY ||
               d.outcome == SG_ROUTE_UNKNOWN_TENANT ||
               d.outcome == SG_ROUTE_NOT_ALLOWED);
    if (d.outcome == SG_ROUTE_NOT_ALLOWED) {
      FUZZ_CHECK(d.denied_tenant != NULL && tenant_in_table(t, d.denied_tenant));
      FUZZ_CHECK(!sg_route_tenant_admits(d.denied_tenant, rq->identity, rq->claims));
    }
  }
  /* Nobody without an identity gets anywhere. */
  if (rq->identity == NULL)
    FUZZ_CHECK(rv != 0);
}

static void check_backends(const sg_route_tenant *t, const char *user,
                           const char *session, uint64_t up_bits) {
  size_t n = t->n_backends;
  sg_route_rank_entry *rank = calloc(n + 1, sizeof *rank);
  bool *up = calloc(n + 1, sizeof *up);
  FUZZ_CHECK(rank != NULL && up != NULL);
  size_t nr = sg_route_rank_backends(t, user, session, rank, n);
  size_t weighted = 0;
  for (size_t i = 0; i < n; i++)
    weighted += t->backends[i].weight > 0;
  FUZZ_CHECK(nr == weighted);
  for (size_t i = 0; i < nr; i++) {
    FUZZ_CHECK(rank[i].index < n);
    FUZZ_CHECK(t->backends[rank[i].index].weight > 0);
    FUZZ_CHECK(rank[i].score > 0.0);
    FUZZ_CHECK(rank[i].score ==
               sg_route_backend_score(t, rank[i].index, user, session));
    if (i > 0)
      FUZZ_CHECK(rank[i - 1].score >= rank[i].score);
    for (size_t j = 0; j < i; j++)
      FUZZ_CHECK(rank[j].index != rank[i].index);
  }

  /* Everything up: the first of the ranking. */
  size_t idx = SIZE_MAX;
  int rv = sg_route_pick_backend(t, user, session, NULL, &idx);
  if (weighted == 0) {
    FUZZ_CHECK(rv == SG_ROUTE_PICK_NONE);
  } else {
    FUZZ_CHECK(rv == SG_ROUTE_PICK_OK && idx == rank[0].index);
  }

  /* Some down. */
  for (size_t i = 0; i < n; i++)
    up[i] = (up_bits >> (i % 64)) & 1;
  idx = SIZE_MAX;
  rv = sg_route_pick_backend(t, user, session, up, &idx);
  if (weighted == 0) {
    FUZZ_CHECK(rv == SG_ROUTE_PICK_NONE);
  } else if (up[rank[0].index]) {
    FUZZ_CHECK(rv == SG_ROUTE_PICK_OK && idx == rank[0].index);
  } else {
    /* The first ranked backend that is up, with failover; else the
     * session's own backend, reported down. */
    size_t first_up = SIZE_MAX;
    for (size_t i = 0; i < nr && first_up == SIZE_MAX; i++)
      if (up[rank[i].index])
        first_up = rank[i].index;
    if (t->failover && first_up != SIZE_MAX)
      FUZZ_CHECK(rv == SG_ROUTE_PICK_OK && idx == first_up);
    else
      FUZZ_CHECK(rv == SG_ROUTE_PICK_DOWN && idx == rank[0].index);
  }
  free(rank);
  free(up);
}

static void exercise(const sg_route_table *t) {
  FUZZ_CHECK(t->n_tenants >= 1 && t->tenants != NULL);
  for (size_t i = 0; i < t->n_tenants; i++) {
    const sg_route_tenant *x = &t->tenants[i];
    FUZZ_CHECK(x->index == i && x->name != NULL);
    FUZZ_CHECK(sg_route_table_find(t, x->name, strlen(x->name)) == x);
    FUZZ_CHECK(x->n_backends >= 1);
    FUZZ_CHECK(x->limits.over_limit_status == 8 || x->limits.over_limit_status == 14);
    for (size_t b = 0; b < x->n_backends; b++)
      FUZZ_CHECK(x->backends[b].name != NULL && x->backends[b].address != NULL);
    if (x->credential != NULL)
      FUZZ_CHECK(x->credential_len > 0 && x->credential_origin != NULL);
  }
  FUZZ_CHECK(sg_route_table_find(t, "", 0) == NULL);
  sg_route_table_print_summary(t, devnull);

  const char *first = t->tenants[0].name;
  const char *last = t->tenants[t->n_tenants - 1].name;
  headers h_none = {NULL, NULL};
  headers h_first = {first, "x"};
  headers h_unknown = {"no-such-tenant", NULL};
  static const char acme_host[] = "acme.spark.example.com:443";
  static const char v6_host[] = "[::1]:8443";
  static const char bare_host[] = "10.0.0.5";
  const sg_route_request requests[] = {
      {.identity = "alice"},
      {.identity = "alice", .claims = claims_acme, .authority = acme_host,
       .authority_len = sizeof acme_host - 1, .header = get_header,
       .header_ctx = &h_first},
      {.identity = NULL, .claims = claims_acme, .header = get_header,
       .header_ctx = &h_first},
      {.identity = "spiffe://example.org/ns/acme/sa/etl", .authority = v6_host,
       .authority_len = sizeof v6_host - 1, .header = get_header,
       .header_ctx = &h_none},
      {.identity = "bob", .claims = claims_other, .authority = bare_host,
       .authority_len = sizeof bare_host - 1, .header = get_header,
       .header_ctx = &h_unknown},
      {.identity = last, .header = get_header, .header_ctx = &h_first},
      {.identity = "anonymous", .authority = first, .authority_len = strlen(first)},
  };
  for (size_t i = 0; i < sizeof requests / sizeof requests[0]; i++)
    check_select(t, &requests[i]);

  for (size_t i = 0; i < t->n_tenants && i < 8; i++) {
    const sg_route_tenant *x = &t->tenants[i];
    check_backends(x, "alice", "6f1c2a9e-0000-4000-8000-000000000001", 0x5555555555555555ull);
    check_backends(x, NULL, NULL, 0);
    check_backends(x, "", "s", ~0ull);

    /* The tenant's rate limit as the worker would run it. */
    sg_token_bucket b;
    sg_token_bucket_init(&b, x->limits.requests_per_second, 1000, x->limits.burst, 1000);
    for (int k = 0; k < 4; k++)
      (void)sg_token_bucket_take(&b, 1000 + (uint64_t)k * 10, 1);
    (void)sg_token_bucket_wait_ms(&b, 1040, 1);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  json_error_t jerr;
  json_t *root = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL)
    return 0;
  report_ctx rc = {0};
  sg_route_table *t = sg_route_table_from_json(root, BASE_DIR, report, &rc);
  if (t == NULL) {
    FUZZ_CHECK(rc.n >= 1);
  } else {
    FUZZ_CHECK(rc.n == 0);
    FUZZ_CHECK(sg_route_table_ref(t) == t);
    sg_route_table_unref(t);
    exercise(t);
    sg_route_table_unref(t);
  }
  json_decref(root);
  return 0;
}
