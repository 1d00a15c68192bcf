#include "sparkgate/observe.h"

#include <string.h>

const char *const sg_auth_failure_reasons[] = {
    "no_credentials",      "jwt_invalid",      "jwt_required",
    "cert_required",       "no_cert_identity", "token_not_bound",
    "bound_token_no_cert", "token_cert_mismatch", "duplicate_authorization",
    "internal",
};
const size_t sg_n_auth_failure_reasons =
    sizeof sg_auth_failure_reasons / sizeof sg_auth_failure_reasons[0];

const char *const sg_tls_failure_reasons[] = {
    "timeout", "no_alpn_h2", "certificate_verify_failed", "protocol", "closed",
};
const size_t sg_n_tls_failure_reasons =
    sizeof sg_tls_failure_reasons / sizeof sg_tls_failure_reasons[0];

size_t sg_auth_failure_index(const char *reason) {
  for (size_t i = 0; i < sg_n_auth_failure_reasons; i++)
    if (strcmp(sg_auth_failure_reasons[i], reason) == 0)
      return i;
  return sg_n_auth_failure_reasons; /* "other" */
}

void sg_observe_reasons(sg_metrics_reasons *out) {
  out->auth = sg_auth_failure_reasons;
  out->n_auth = sg_n_auth_failure_reasons;
  out->tls = sg_tls_failure_reasons;
  out->n_tls = sg_n_tls_failure_reasons;
}
