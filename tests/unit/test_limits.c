/* Per-worker tenant limits: shares, concurrency, rate and upload quota. */
#include "check.h"
#include "sparkgate/limits.h"

static sg_route_tenant tenant_with(sg_route_limits l) {
  sg_route_tenant t;
  memset(&t, 0, sizeof t);
  t.name = (char *)"acme";
  t.limits = l;
  return t;
}

static void test_unlimited(void) {
  sg_route_tenant t = tenant_with((sg_route_limits){.over_limit_status = 8});
  sg_tenant_state st;
  CHECK(sg_tenant_state_init(&st, &t, 0, NULL) == 0);
  for (int i = 0; i < 10000; i++)
    CHECK(sg_tenant_state_admit(&st, SG_SPARK_EXECUTE_PLAN, 0) == NULL);
  CHECK(sg_tenant_state_take_upload(&st, 1u << 30, 0));
  sg_tenant_state_clear(&st);
}

static void test_concurrency(void) {
  /* Each worker counts against the whole limit (docs/routing.md). */
  sg_route_tenant t = tenant_with((sg_route_limits){.max_concurrent_rpcs = 3,
                                                    .max_concurrent_executions = 1});
  sg_tenant_state st;
  CHECK(sg_tenant_state_init(&st, &t, 0, NULL) == 0);
  CHECK(st.max_rpcs == 3);
  CHECK(st.max_execs == 1);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_EXECUTE_PLAN, 0) == NULL);
  const char *r = sg_tenant_state_admit(&st, SG_SPARK_REATTACH_EXECUTE, 0);
  CHECK(r != NULL && strcmp(r, "max_concurrent_executions") == 0);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 0) == NULL);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_ANALYZE_PLAN, 0) == NULL);
  r = sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 0);
  CHECK(r != NULL && strcmp(r, "max_concurrent_rpcs") == 0);
  /* Stopping work is never held back by the limit. */
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_INTERRUPT, 0) == NULL);
  sg_tenant_state_release(&st, SG_SPARK_INTERRUPT);
  sg_tenant_state_release(&st, SG_SPARK_EXECUTE_PLAN);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_REATTACH_EXECUTE, 0) == NULL);
  CHECK(st.usage->active_rpcs == 3 && st.usage->active_execs == 1);
  sg_tenant_state_clear(&st);
}

static void test_rate(void) {
  /* 10 per second, burst 4. */
  sg_route_tenant t = tenant_with((sg_route_limits){.requests_per_second = 10, .burst = 4});
  sg_tenant_state st;
  CHECK(sg_tenant_state_init(&st, &t, 1000, NULL) == 0);
  int ok = 0;
  for (int i = 0; i < 10; i++) {
    if (sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 1000) == NULL) {
      ok++;
      sg_tenant_state_release(&st, SG_SPARK_CONFIG);
    }
  }
  CHECK(ok == 4);
  /* 100 ms later one more token. */
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 1100) == NULL);
  const char *r = sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 1100);
  CHECK(r != NULL && strcmp(r, "requests_per_second") == 0);
  sg_tenant_state_clear(&st);
}

static void test_uploads(void) {
  sg_route_tenant t = tenant_with((sg_route_limits){.upload_bytes_per_minute = 1000});
  sg_tenant_state st;
  CHECK(sg_tenant_state_init(&st, &t, 0, NULL) == 0);
  CHECK(sg_tenant_state_take_upload(&st, 600, 0));
  CHECK(!sg_tenant_state_take_upload(&st, 600, 0));
  CHECK(sg_tenant_state_take_upload(&st, 600, 60000)); /* a minute later */
  CHECK(sg_spark_method_is_execution(SG_SPARK_EXECUTE_PLAN));
  CHECK(!sg_spark_method_is_execution(SG_SPARK_ADD_ARTIFACTS));
  sg_tenant_state_clear(&st);
}

static void test_reload_keeps_usage(void) {
  /* One call running and the burst spent under the old configuration. */
  sg_route_tenant t1 = tenant_with((sg_route_limits){
      .max_concurrent_rpcs = 1, .requests_per_second = 10, .burst = 2});
  sg_tenant_state old;
  CHECK(sg_tenant_state_init(&old, &t1, 1000, NULL) == 0);
  CHECK(sg_tenant_state_admit(&old, SG_SPARK_CONFIG, 1000) == NULL);
  /* The reload: same limits (a certificate rotation, say). */
  sg_route_tenant t2 = t1;
  sg_tenant_state now;
  CHECK(sg_tenant_state_init(&now, &t2, 1000, &old) == 0);
  CHECK(now.usage == old.usage && now.usage->refs == 2);
  const char *r = sg_tenant_state_admit(&now, SG_SPARK_CONFIG, 1000);
  CHECK(r != NULL && strcmp(r, "max_concurrent_rpcs") == 0);
  /* The old call ends, released where it was admitted: room again, and
   * one token left of the burst of 2, not a fresh burst. */
  sg_tenant_state_release(&old, SG_SPARK_CONFIG);
  CHECK(sg_tenant_state_admit(&now, SG_SPARK_CONFIG, 1000) == NULL);
  sg_tenant_state_release(&now, SG_SPARK_CONFIG);
  r = sg_tenant_state_admit(&now, SG_SPARK_CONFIG, 1000);
  CHECK(r != NULL && strcmp(r, "requests_per_second") == 0);
  sg_tenant_state_clear(&old);
  CHECK(now.usage != NULL && now.usage->refs == 1);
  /* A smaller burst caps what is kept; no limit any more lets all pass. */
  sg_route_tenant t3 = tenant_with((sg_route_limits){.requests_per_second = 10, .burst = 1});
  sg_tenant_state capped;
  CHECK(sg_tenant_state_init(&capped, &t3, 5000, &now) == 0);
  CHECK(sg_tenant_state_admit(&capped, SG_SPARK_CONFIG, 5000) == NULL);
  r = sg_tenant_state_admit(&capped, SG_SPARK_CONFIG, 5000);
  CHECK(r != NULL && strcmp(r, "requests_per_second") == 0);
  sg_route_tenant t4 = tenant_with((sg_route_limits){.over_limit_status = 8});
  sg_tenant_state open;
  CHECK(sg_tenant_state_init(&open, &t4, 5000, &capped) == 0);
  for (int i = 0; i < 100; i++)
    CHECK(sg_tenant_state_admit(&open, SG_SPARK_CONFIG, 5000) == NULL);
  sg_tenant_state_clear(&now);
  sg_tenant_state_clear(&capped);
  sg_tenant_state_clear(&open);
}

int main(void) {
  test_unlimited();
  test_concurrency();
  test_rate();
  test_uploads();
  test_reload_keeps_usage();
  return check_report("limits");
}
