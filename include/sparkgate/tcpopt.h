/* The options every TCP connection of sparkgate's gets, a client's and a
 * backend's alike. */
#ifndef SPARKGATE_TCPOPT_H
#define SPARKGATE_TCPOPT_H

#include <stdint.h>

/* Keepalive probes: after |keepalive_ms| without a byte either way (in
 * whole seconds, rounded up), then every third of that, three in all. */
#define SG_TCPOPT_KEEPALIVE_PROBES 3

/* TCP_NODELAY: a call is small writes that must not wait for the ACK of
 * the last one (Nagle). Keepalive, unless |keepalive_ms| is 0: a peer
 * whose host died or was cut off without a reset (a node lost, a
 * partition) answers nothing, and a call waiting on it (a query that
 * computes for minutes, a client gone mid-query) would otherwise hold its
 * stream, and the backend's work, until stream_idle_timeout_ms. The
 * kernel probes; the connection then fails with ETIMEDOUT after about
 * twice |keepalive_ms|. Failures are ignored: the connection works
 * without either. */
void sg_tcpopt_apply(int fd, uint32_t keepalive_ms);

#endif
