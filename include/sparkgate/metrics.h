/* Metrics: counters on the data path, Prometheus text at scrape time.
 *
 * Cost on the data path: every worker thread writes only its own counter
 * blocks (a relaxed load and store of a uint64_t, no lock, no atomic
 * read-modify-write); the scrape (admin thread = main loop) sums the
 * blocks of all workers with relaxed loads. Counters are monotonic per
 * worker, so a scrape that races a record misses at most that record.
 *
 * Label values are bounded by construction: methods come from the fixed
 * SparkConnectService list plus "other", gRPC status is 0..16, auth and TLS
 * failure reasons come from lists registered at sg_metrics_new (plus
 * "other"), tenants and backends come from the configuration plus the
 * tenant "none" (no tenant known yet, e.g. an authentication failure).
 * Nothing from the wire (session ids, user ids, paths) ever becomes a
 * label.
 *
 * Reload: tenants and backends live in a dimension generation
 * (sg_metrics_gen) built from one configuration. A stream records with the
 * tenant and backend indices of the configuration it started on, through a
 * handle of that configuration's generation, so old and new streams can
 * run side by side after a reload. Counters are kept per tenant NAME (and
 * per tenant + backend name) for the life of the process:
 *   - a tenant or backend that exists before and after a reload keeps its
 *     counts (no reset);
 *   - a tenant or backend that a reload removed disappears from /metrics
 *     (only the newest generation's tenants are rendered); its counts are
 *     kept, hidden, and reappear if a later reload adds it back;
 *   - the memory of a removed tenant is kept until exit (a few KiB per
 *     tenant and worker: bounded by the names ever configured).
 * Counts recorded by streams still running on an old generation for a
 * tenant the new one removed are kept the same way.
 *
 * Threads: sg_metrics_new/free, sg_metrics_gen_new*, sg_metrics_publish,
 * sg_metrics_reload and sg_metrics_render are called from the main thread
 * (render, gen_new and publish take a lock, so tests may call them from
 * elsewhere). The record
 * functions are called only by the worker thread a handle belongs to. */
#ifndef SPARKGATE_METRICS_H
#define SPARKGATE_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sparkgate/config.h"

struct evbuffer;

/* SparkConnectService methods, in the order of the "method" label. The
 * same order as sg_spark_method (route.h): a value of that enum converts
 * directly, and its -1 ("not a SparkConnectService method") is
 * SG_METHOD_OTHER. */
typedef enum sg_metrics_method {
  SG_METHOD_EXECUTE_PLAN = 0,
  SG_METHOD_ANALYZE_PLAN,
  SG_METHOD_CONFIG,
  SG_METHOD_ADD_ARTIFACTS,
  SG_METHOD_ARTIFACT_STATUS,
  SG_METHOD_INTERRUPT,
  SG_METHOD_REATTACH_EXECUTE,
  SG_METHOD_RELEASE_EXECUTE,
  SG_METHOD_RELEASE_SESSION,
  SG_METHOD_FETCH_ERROR_DETAILS,
  SG_METHOD_OTHER, /* any other :path, including other services */
  SG_METHOD_COUNT
} sg_metrics_method;

/* gRPC status codes 0..16; anything else is recorded as 2 (UNKNOWN), as
 * gRPC clients treat unknown codes. */
#define SG_METRICS_GRPC_STATUS_COUNT 17

/* The tenant index for "no tenant known". A configured tenant named
 * "none" shares its series. */
#define SG_METRICS_TENANT_NONE ((size_t)-1)

/* Upper bounds (seconds) of the RPC duration histogram buckets, +Inf not
 * included. Spark calls range from a Config round trip (ms) to an
 * ExecutePlan stream that runs for many minutes. */
#define SG_METRICS_DURATION_BUCKETS                                            \
  {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800}
#define SG_METRICS_N_DURATION_BUCKETS 15

/* "ExecutePlan", ..., "other". */
const char *sg_metrics_method_name(sg_metrics_method method);

/* The method of a gRPC :path ("/spark.connect.SparkConnectService/Config"
 * -> SG_METHOD_CONFIG); SG_METHOD_OTHER for anything else. |path| need not
 * be NUL-terminated (nghttp2 rcbuf). */
sg_metrics_method sg_metrics_method_from_path(const char *path, size_t len);

typedef struct sg_metrics sg_metrics;
typedef struct sg_metrics_gen sg_metrics_gen;
typedef struct sg_metrics_worker sg_metrics_worker;

/* Failure reasons: fixed for the life of the process. Strings are copied.
 * A reason index out of range counts as "other" (appended to each list
 * unless the list already has it). */
typedef struct sg_metrics_reasons {
  const char *const *auth; /* sparkgate_auth_failures_total{reason} */
  size_t n_auth;
  const char *const *tls; /* sparkgate_tls_handshake_failures_total{reason} */
  size_t n_tls;
} sg_metrics_reasons;

typedef struct sg_metrics_tenant_dims {
  const char *name;
  const char *const *backends; /* backend names, in config order */
  size_t n_backends;
} sg_metrics_tenant_dims;

/* Tenants in config order: index i here is the tenant index the data path
 * passes for this configuration. Strings are copied. */
typedef struct sg_metrics_dims {
  const sg_metrics_tenant_dims *tenants;
  size_t n_tenants;
} sg_metrics_dims;

/* Returns NULL when out of memory. Call before the workers start. */
sg_metrics *sg_metrics_new(unsigned n_workers, const sg_metrics_reasons *reasons);
/* Every generation must have been released before. */
void sg_metrics_free(sg_metrics *m);

/* A new dimension generation. Returns a reference for the caller (keep it
 * with the runtime it was built for: sg_runtime is the natural owner), or
 * NULL when out of memory. /metrics goes on rendering the published
 * generation until sg_metrics_publish: a configuration that is built but
 * then rejected (a reload that fails later) never shows. */
sg_metrics_gen *sg_metrics_gen_new(sg_metrics *m, const sg_metrics_dims *dims);
/* Same, with tenants and backends named as in |cfg|. */
sg_metrics_gen *sg_metrics_gen_new_from_config(sg_metrics *m, const sg_config *cfg);
/* From now on /metrics renders |g|'s tenants and backends (it takes a
 * reference; the one published before is released). Call once the
 * configuration |g| was built for is in force. */
void sg_metrics_publish(sg_metrics *m, sg_metrics_gen *g);
sg_metrics_gen *sg_metrics_gen_ref(sg_metrics_gen *g);
/* Any thread. */
void sg_metrics_gen_unref(sg_metrics_gen *g);

/* The handle worker |index| records through for this generation. Borrowed:
 * valid while the caller holds a reference to |g|. */
sg_metrics_worker *sg_metrics_for_worker(sg_metrics_gen *g, unsigned index);

/* ---- data path: only the handle's worker thread calls these ------------ */

void sg_metrics_conn_accepted(sg_metrics_worker *mw);
void sg_metrics_conn_closed(sg_metrics_worker *mw);
/* A connection closed at accept: over max_connections, or over
 * max_connections_per_client when |per_client|. */
void sg_metrics_conn_refused(sg_metrics_worker *mw, bool per_client);
void sg_metrics_tls_handshake_failed(sg_metrics_worker *mw, size_t reason_idx);
void sg_metrics_stream_opened(sg_metrics_worker *mw);
void sg_metrics_stream_closed(sg_metrics_worker *mw);
void sg_metrics_auth_failure(sg_metrics_worker *mw, size_t reason_idx);
/* One connection attempt to a backend; |ok| false for refused, timed out,
 * TLS failure. */
void sg_metrics_upstream_connect(sg_metrics_worker *mw, size_t tenant_idx,
                                 size_t backend_idx, bool ok);
/* A Spark session went to another backend than the one this worker last
 * sent it to. */
void sg_metrics_session_rehomed(sg_metrics_worker *mw, size_t tenant_idx);
/* A call the backend refused unprocessed was sent again. */
void sg_metrics_upstream_retry(sg_metrics_worker *mw, size_t tenant_idx);

/* One finished RPC (answered by the backend or rejected by the proxy).
 * |tenant_idx| may be SG_METRICS_TENANT_NONE; |bytes_in| is what the client
 * sent (request DATA payload), |bytes_out| what it received. Bytes are
 * counted when the call ends. */
void sg_metrics_rpc_done(sg_metrics_worker *mw, size_t tenant_idx,
                         sg_metrics_method method, int grpc_status,
                         double duration_s, uint64_t bytes_in,
                         uint64_t bytes_out);

/* ---- main thread ------------------------------------------------------- */

/* One reload attempt (SIGHUP): |ok| false when the old config stayed. */
void sg_metrics_reload(sg_metrics *m, bool ok);

/* Appends the Prometheus text exposition (format 0.0.4) to |out|. Returns
 * 0, or -1 when out of memory (|out| then holds a partial page). */
int sg_metrics_render(sg_metrics *m, struct evbuffer *out);

/* Families kept by other modules (e.g. identity-provider fetches): |fn|
 * appends them to |out| at the end of every render, on the rendering
 * (main) thread, and returns 0 or -1. */
typedef int (*sg_metrics_extra_fn)(void *arg, struct evbuffer *out);
void sg_metrics_set_extra(sg_metrics *m, sg_metrics_extra_fn fn, void *arg);

/* Appends |s| escaped as a label value. */
void sg_metrics_label_value(struct evbuffer *out, const char *s);

/* The Content-Type of what sg_metrics_render writes. */
#define SG_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
