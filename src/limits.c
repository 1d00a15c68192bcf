#include "sparkgate/limits.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A bucket under its new rate and burst; what it held (up to the new
 * burst) stays, unless it did not limit before. */
static void bucket_configure(sg_token_bucket *b, uint64_t rate, uint64_t per_ms,
                             uint64_t burst, uint64_t now_ms) {
  sg_token_bucket was = *b;
  sg_token_bucket_init(b, rate, per_ms, burst, now_ms);
  if (b->rate == 0 || was.rate == 0 || was.per_ms != b->per_ms)
    return;
  b->level = was.level < b->capacity ? was.level : b->capacity;
  b->last_ms = was.last_ms;
}

int sg_tenant_state_init(sg_tenant_state *st, const sg_route_tenant *t,
                         uint64_t now_ms, const sg_tenant_state *prev) {
  const sg_route_limits *l = &t->limits;
  *st = (sg_tenant_state){.tenant = t};
  st->max_rpcs = l->max_concurrent_rpcs;
  st->max_execs = l->max_concurrent_executions;
  if (prev != NULL && prev->usage != NULL) {
    st->usage = prev->usage;
  } else {
    st->usage = calloc(1, sizeof *st->usage);
    if (st->usage == NULL)
      return -1;
  }
  st->usage->refs++;
  uint64_t burst = l->burst > 0 ? l->burst : l->requests_per_second;
  bucket_configure(&st->usage->requests, l->requests_per_second, 1000, burst, now_ms);
  uint64_t bytes = l->upload_bytes_per_minute;
  bucket_configure(&st->usage->uploads, bytes, 60000, bytes, now_ms);
  return 0;
}

void sg_tenant_state_clear(sg_tenant_state *st) {
  if (st->usage != NULL && --st->usage->refs == 0)
    free(st->usage);
  st->usage = NULL;
}

bool sg_spark_method_is_execution(int method) {
  return method == SG_SPARK_EXECUTE_PLAN || method == SG_SPARK_REATTACH_EXECUTE;
}

bool sg_spark_method_is_control(int method) {
  return method == SG_SPARK_INTERRUPT || method == SG_SPARK_RELEASE_EXECUTE ||
         method == SG_SPARK_RELEASE_SESSION;
}

const char *sg_tenant_state_admit(sg_tenant_state *st, int method,
                                  uint64_t now_ms) {
  sg_tenant_usage *u = st->usage;
  if (st->max_rpcs > 0 && u->active_rpcs >= st->max_rpcs &&
      !sg_spark_method_is_control(method))
    return "max_concurrent_rpcs";
  bool exec = sg_spark_method_is_execution(method);
  if (exec && st->max_execs > 0 && u->active_execs >= st->max_execs)
    return "max_concurrent_executions";
  if (st->tenant->limits.requests_per_second > 0 &&
      !sg_token_bucket_take(&u->requests, now_ms, 1))
    return "requests_per_second";
  u->active_rpcs++;
  if (exec)
    u->active_execs++;
  return NULL;
}

void sg_tenant_state_release(sg_tenant_state *st, int method) {
  sg_tenant_usage *u = st->usage;
  if (u->active_rpcs > 0)
    u->active_rpcs--;
  if (sg_spark_method_is_execution(method) && u->active_execs > 0)
    u->active_execs--;
}

bool sg_tenant_state_take_upload(sg_tenant_state *st, size_t n,
                                 uint64_t now_ms) {
  if (st->tenant->limits.upload_bytes_per_minute == 0)
    return true;
  return sg_token_bucket_take(&st->usage->uploads, now_ms, n);
}

void sg_tenant_limit_reason(const sg_route_tenant *t, const char *limit, char *out,
                            size_t outlen) {
  const sg_route_limits *l = &t->limits;
  char value[64] = "";
  if (strcmp(limit, "max_concurrent_rpcs") == 0)
    snprintf(value, sizeof value, " (%u calls per worker)", l->max_concurrent_rpcs);
  else if (strcmp(limit, "max_concurrent_executions") == 0)
    snprintf(value, sizeof value, " (%u per worker)", l->max_concurrent_executions);
  else if (strcmp(limit, "requests_per_second") == 0)
    snprintf(value, sizeof value, " (%u/s, burst %u, per worker)", l->requests_per_second,
             l->burst);
  else if (strcmp(limit, "upload_bytes_per_minute") == 0)
    snprintf(value, sizeof value, " (%llu bytes per worker)",
             (unsigned long long)l->upload_bytes_per_minute);
  snprintf(out, outlen, "tenant %s is over its limit %s%s", t->name, limit, value);
}
