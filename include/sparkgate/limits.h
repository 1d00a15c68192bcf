/* Per-tenant limits as one worker enforces them: each worker counts the
 * calls it carries against the whole limit (docs/routing.md, "by each
 * worker thread"), so enforcing takes no lock and no cross-thread traffic.
 * Shares of the limit per worker would give one client connection, which
 * one worker carries, a fraction of what its tenant may do. */
#ifndef SPARKGATE_LIMITS_H
#define SPARKGATE_LIMITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sparkgate/route.h"

/* What one worker's calls of a tenant hold and have used: kept across
 * reloads, by tenant name, so that calls admitted under one configuration
 * still count (and are released) under the next, and a reload grants no
 * fresh burst. Shared by the states of every configuration the worker
 * still holds; freed with the last of them. */
typedef struct sg_tenant_usage {
  unsigned refs;
  uint32_t active_rpcs;
  uint32_t active_execs;
  sg_token_bucket requests; /* requests_per_second */
  sg_token_bucket uploads;  /* AddArtifacts bytes per minute */
} sg_tenant_usage;

typedef struct sg_tenant_state {
  const sg_route_tenant *tenant;
  uint32_t max_rpcs;  /* 0: unlimited */
  uint32_t max_execs; /* ExecutePlan + ReattachExecute; 0: unlimited */
  sg_tenant_usage *usage; /* ref */
} sg_tenant_state;

/* A tenant's state under a configuration: with |prev| NULL, no calls and
 * full buckets; else |prev| is the same tenant's state under the
 * configuration being replaced, whose usage it shares, its buckets set
 * to the new rates and keeping their levels (at most the new burst).
 * Returns -1 (out of memory) or 0; sg_tenant_state_clear in both cases. */
int sg_tenant_state_init(sg_tenant_state *st, const sg_route_tenant *t,
                         uint64_t now_ms, const sg_tenant_state *prev);
void sg_tenant_state_clear(sg_tenant_state *st);

/* Admits one call of |method| (sg_spark_method, or -1 for others) and
 * counts it, or returns the name of the limit it hit. */
const char *sg_tenant_state_admit(sg_tenant_state *st, int method,
                                  uint64_t now_ms);

/* "tenant T is over its limit L (value)" into |out|: the denial's reason,
 * the same words for every limit, with the value in force. */
void sg_tenant_limit_reason(const sg_route_tenant *t, const char *limit, char *out,
                            size_t outlen);

/* The call admitted by sg_tenant_state_admit has ended. */
void sg_tenant_state_release(sg_tenant_state *st, int method);

/* Takes |n| upload bytes from the upload quota (the calls that carry
 * data, see stream.c); false when spent. */
bool sg_tenant_state_take_upload(sg_tenant_state *st, size_t n,
                                 uint64_t now_ms);

/* Whether |method| is an execution (counted against max_concurrent_executions). */
bool sg_spark_method_is_execution(int method);

/* Whether |method| stops or frees work (Interrupt, ReleaseExecute,
 * ReleaseSession): never held back by max_concurrent_rpcs, or a tenant at
 * its limit could not stop its own runs. */
bool sg_spark_method_is_control(int method);

#endif
