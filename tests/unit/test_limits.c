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
  sg_tenant_state_init(&st, &t, 2, 0);
  for (int i = 0; i < 10000; i++)
    CHECK(sg_tenant_state_admit(&st, SG_SPARK_EXECUTE_PLAN, 0) == NULL);
  CHECK(sg_tenant_state_take_upload(&st, 1u << 30, 0));
}

static void test_concurrency_shares(void) {
  /* 5 RPCs over 2 workers: each worker holds 3 (rounded up). */
  sg_route_tenant t = tenant_with((sg_route_limits){.max_concurrent_rpcs = 5,
                                                    .max_concurrent_executions = 2});
  sg_tenant_state st;
  sg_tenant_state_init(&st, &t, 2, 0);
  CHECK(st.max_rpcs == 3);
  CHECK(st.max_execs == 1);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_EXECUTE_PLAN, 0) == NULL);
  const char *r = sg_tenant_state_admit(&st, SG_SPARK_REATTACH_EXECUTE, 0);
  CHECK(r != NULL && strcmp(r, "max_concurrent_executions") == 0);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 0) == NULL);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_ANALYZE_PLAN, 0) == NULL);
  r = sg_tenant_state_admit(&st, SG_SPARK_CONFIG, 0);
  CHECK(r != NULL && strcmp(r, "max_concurrent_rpcs") == 0);
  sg_tenant_state_release(&st, SG_SPARK_EXECUTE_PLAN);
  CHECK(sg_tenant_state_admit(&st, SG_SPARK_REATTACH_EXECUTE, 0) == NULL);
  CHECK(st.active_rpcs == 3 && st.active_execs == 1);
}

static void test_rate(void) {
  /* 10 per second, burst 4, one worker. */
  sg_route_tenant t = tenant_with((sg_route_limits){.requests_per_second = 10, .burst = 4});
  sg_tenant_state st;
  sg_tenant_state_init(&st, &t, 1, 1000);
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
}

static void test_uploads(void) {
  sg_route_tenant t = tenant_with((sg_route_limits){.upload_bytes_per_minute = 1000});
  sg_tenant_state st;
  sg_tenant_state_init(&st, &t, 1, 0);
  CHECK(sg_tenant_state_take_upload(&st, 600, 0));
  CHECK(!sg_tenant_state_take_upload(&st, 600, 0));
  CHECK(sg_tenant_state_take_upload(&st, 600, 60000)); /* a minute later */
  CHECK(sg_spark_method_is_execution(SG_SPARK_EXECUTE_PLAN));
  CHECK(!sg_spark_method_is_execution(SG_SPARK_ADD_ARTIFACTS));
}

int main(void) {
  test_unlimited();
  test_concurrency_shares();
  test_rate();
  test_uploads();
  return check_report("limits");
}
