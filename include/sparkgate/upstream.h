/* Connections to backends: per worker and backend, a small pool of nghttp2
 * client sessions over h2c or TLS that many client streams share. A new
 * connection opens when every open one is at the backend's
 * MAX_CONCURRENT_STREAMS or has received GOAWAY. */
#ifndef SPARKGATE_UPSTREAM_H
#define SPARKGATE_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "sparkgate/config.h"
#include "sparkgate/types.h"

struct sg_metrics_worker;

/* |cfg| must outlive the pool (the generation holds it). */
sg_upstream_pool *sg_upstream_pool_new(sg_worker *w, const sg_config *cfg,
                                       const sg_tenant_config *tenant,
                                       const sg_backend_config *backend,
                                       SSL_CTX *tls_ctx,
                                       struct sg_metrics_worker *metrics);
/* Closes every connection; their streams fail with UNAVAILABLE. */
void sg_upstream_pool_free(sg_upstream_pool *pool);

/* Starts the upstream leg of |s| on a connection of |pool|: submitted now
 * if one is ready, or when the one being opened is. Failure is reported
 * through sg_stream_on_upstream_close. */
void sg_upstream_attach(sg_upstream_pool *pool, sg_stream *s);

/* The client leg is gone: reset the upstream stream (CANCEL) or drop it
 * from the pending queue. */
void sg_upstream_cancel(sg_stream *s);

/* More request body (or its end) is ready for the upstream leg. */
void sg_upstream_resume_request(sg_stream *s);

/* The client leg took |n| response bytes: return that much window credit
 * to the backend. */
void sg_upstream_consumed(sg_stream *s, size_t n);

/* Passive health: false after a failed connect or a broken connection,
 * until a background probe connects again. */
bool sg_upstream_pool_is_up(const sg_upstream_pool *pool);

/* Number of open upstream connections in |pool| (tests, metrics). */
size_t sg_upstream_pool_size(const sg_upstream_pool *pool);

#endif
