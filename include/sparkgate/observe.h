/* The fixed reason lists that label failure metrics, shared by the code
 * that counts (admission, conn) and the code that registers them (main). */
#ifndef SPARKGATE_OBSERVE_H
#define SPARKGATE_OBSERVE_H

#include <stddef.h>

#include "sparkgate/metrics.h"

/* sparkgate_auth_failures_total{reason}: the identity module's denials,
 * plus checks made before it runs. */
extern const char *const sg_auth_failure_reasons[];
extern const size_t sg_n_auth_failure_reasons;

/* sparkgate_tls_handshake_failures_total{reason}. */
enum {
  SG_TLS_FAIL_TIMEOUT = 0,
  SG_TLS_FAIL_NO_H2,
  SG_TLS_FAIL_CERT_VERIFY,
  SG_TLS_FAIL_PROTOCOL,
  SG_TLS_FAIL_CLOSED,
};
extern const char *const sg_tls_failure_reasons[];
extern const size_t sg_n_tls_failure_reasons;

/* Index of |reason| in sg_auth_failure_reasons (out of range: "other"). */
size_t sg_auth_failure_index(const char *reason);

/* Both lists, ready for sg_metrics_new. */
void sg_observe_reasons(sg_metrics_reasons *out);

#endif
