/* Connections per client address: what max_connections_per_client is
 * enforced against. One table for the process, shared by the workers
 * under a lock (accept and close only): a client's connections land on
 * any worker. Fixed size (no growth under attack); when it is full, new
 * addresses are not limited. */
#ifndef SPARKGATE_CLIENTCOUNT_H
#define SPARKGATE_CLIENTCOUNT_H

#include <stdbool.h>
#include <stdint.h>

#include <sys/socket.h>

#define SG_CLIENTCOUNT_SLOTS 16384u

typedef struct sg_client_key {
  uint8_t addr[16]; /* IPv4 mapped into IPv6 */
} sg_client_key;

typedef struct sg_clientcount sg_clientcount;

/* The process's table (workers); never freed. */
sg_clientcount *sg_clientcount_process(void);
/* A table of one's own (tests). */
sg_clientcount *sg_clientcount_new(void);
void sg_clientcount_free(sg_clientcount *cc);

/* The key of a peer address (the port is not part of it). */
sg_client_key sg_client_key_of(const struct sockaddr *addr);

/* Counts one more connection from |key| unless it already has |limit|
 * (0: no limit); returns false (and counts nothing) when it has. Every
 * connection is counted, also without a limit, so that a limit a reload
 * sets finds the connections already open. |*counted| (may be NULL) says
 * whether it was: not when the table is full, and then it is not limited
 * either. */
bool sg_clientcount_take(sg_clientcount *cc, const sg_client_key *key,
                         uint32_t limit, bool *counted);
/* A connection counted by sg_clientcount_take has closed. */
void sg_clientcount_release(sg_clientcount *cc, const sg_client_key *key);

#endif
