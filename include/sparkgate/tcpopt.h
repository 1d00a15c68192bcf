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
 * twice |keepalive_ms|.
 *
 * Probes only go out while nothing is unacknowledged: a call written to a
 * peer already gone would wait for TCP's retransmission limit (about 15
 * minutes). TCP_USER_TIMEOUT bounds that at the same time the probes
 * take, but never below |user_timeout_floor_ms|: it also ends a
 * connection whose peer keeps its window closed, a peer alive but not
 * reading, which write_stall_timeout_ms (the floor) is there to judge.
 * Failures are ignored: the connection works without these options. */
void sg_tcpopt_apply(int fd, uint32_t keepalive_ms, uint32_t user_timeout_floor_ms);

#endif
