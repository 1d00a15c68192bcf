#include "sparkgate/limits.h"

static uint64_t share(uint64_t limit, unsigned n_workers) {
  if (limit == 0 || n_workers <= 1)
    return limit;
  return (limit + n_workers - 1) / n_workers;
}

void sg_tenant_state_init(sg_tenant_state *st, const sg_route_tenant *t,
                          unsigned n_workers, uint64_t now_ms) {
  const sg_route_limits *l = &t->limits;
  *st = (sg_tenant_state){.tenant = t};
  st->max_rpcs = (uint32_t)share(l->max_concurrent_rpcs, n_workers);
  st->max_execs = (uint32_t)share(l->max_concurrent_executions, n_workers);
  if (l->requests_per_second > 0) {
    uint64_t burst = l->burst > 0 ? l->burst : l->requests_per_second;
    sg_token_bucket_init(&st->requests, share(l->requests_per_second, n_workers),
                         1000, share(burst, n_workers), now_ms);
  }
  if (l->upload_bytes_per_minute > 0) {
    uint64_t bytes = share(l->upload_bytes_per_minute, n_workers);
    sg_token_bucket_init(&st->uploads, bytes, 60000, bytes, now_ms);
  }
}

bool sg_spark_method_is_execution(int method) {
  return method == SG_SPARK_EXECUTE_PLAN || method == SG_SPARK_REATTACH_EXECUTE;
}

const char *sg_tenant_state_admit(sg_tenant_state *st, int method,
                                  uint64_t now_ms) {
  if (st->max_rpcs > 0 && st->active_rpcs >= st->max_rpcs)
    return "max_concurrent_rpcs";
  bool exec = sg_spark_method_is_execution(method);
  if (exec && st->max_execs > 0 && st->active_execs >= st->max_execs)
    return "max_concurrent_executions";
  if (st->tenant->limits.requests_per_second > 0 &&
      !sg_token_bucket_take(&st->requests, now_ms, 1))
    return "requests_per_second";
  st->active_rpcs++;
  if (exec)
    st->active_execs++;
  return NULL;
}

void sg_tenant_state_release(sg_tenant_state *st, int method) {
  if (st->active_rpcs > 0)
    st->active_rpcs--;
  if (sg_spark_method_is_execution(method) && st->active_execs > 0)
    st->active_execs--;
}

bool sg_tenant_state_take_upload(sg_tenant_state *st, size_t n,
                                 uint64_t now_ms) {
  if (st->tenant->limits.upload_bytes_per_minute == 0)
    return true;
  return sg_token_bucket_take(&st->uploads, now_ms, n);
}
