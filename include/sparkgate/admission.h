/* Admission of one request, before any upstream work: gRPC shape, request
 * target, authentication, grpc-timeout, tenant, method and tenant limits. */
#ifndef SPARKGATE_ADMISSION_H
#define SPARKGATE_ADMISSION_H

#include <stdbool.h>

#include "sparkgate/stream.h"

/* Returns true when |s| may go on (its identity, tenant and deadline are
 * set); otherwise the request has been answered and logged. */
bool sg_admit(sg_stream *s);

#endif
