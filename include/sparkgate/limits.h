/* Per-tenant limits as one worker enforces them. Each worker holds its
 * share of every limit (the limit divided by the number of workers,
 * rounded up), so enforcing takes no lock and no cross-thread traffic; the
 * sum over workers is the configured limit. */
#ifndef SPARKGATE_LIMITS_H
#define SPARKGATE_LIMITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sparkgate/route.h"

typedef struct sg_tenant_state {
  const sg_route_tenant *tenant;
  uint32_t max_rpcs;  /* this worker's share; 0: unlimited */
  uint32_t max_execs; /* ExecutePlan + ReattachExecute; 0: unlimited */
  uint32_t active_rpcs;
  uint32_t active_execs;
  sg_token_bucket requests; /* requests_per_second */
  sg_token_bucket uploads;  /* AddArtifacts bytes per minute */
} sg_tenant_state;

void sg_tenant_state_init(sg_tenant_state *st, const sg_route_tenant *t,
                          unsigned n_workers, uint64_t now_ms);

/* Admits one call of |method| (sg_spark_method, or -1 for others) and
 * counts it, or returns the name of the limit it hit. */
const char *sg_tenant_state_admit(sg_tenant_state *st, int method,
                                  uint64_t now_ms);

/* The call admitted by sg_tenant_state_admit has ended. */
void sg_tenant_state_release(sg_tenant_state *st, int method);

/* Takes |n| upload bytes from the AddArtifacts quota; false when spent. */
bool sg_tenant_state_take_upload(sg_tenant_state *st, size_t n,
                                 uint64_t now_ms);

/* Whether |method| is an execution (counted against max_concurrent_executions). */
bool sg_spark_method_is_execution(int method);

#endif
