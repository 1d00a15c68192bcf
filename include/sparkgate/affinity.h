/* A worker's memory of where it last sent each Spark session. Routing does
 * not need it (rendezvous hashing agrees across replicas without state);
 * it adds two things hashing alone cannot: a backend drained to weight 0
 * keeps the sessions it already has, and sessions that move are counted.
 * Bounded: a fixed table per worker; an entry is forgotten when it has
 * not been used for SG_AFFINITY_TTL_MS or a busier session needs its slot. */
#ifndef SPARKGATE_AFFINITY_H
#define SPARKGATE_AFFINITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Spark's own session timeout is an hour by default: two leave margin. */
#define SG_AFFINITY_TTL_MS (2u * 3600u * 1000u)
#define SG_AFFINITY_DEFAULT_ENTRIES 65536u

typedef struct sg_affinity sg_affinity;

sg_affinity *sg_affinity_new(size_t entries);
void sg_affinity_free(sg_affinity *a);

/* The key of a session: tenant, user and session id, hashed. */
uint64_t sg_affinity_key(const char *tenant, const char *user_id,
                         const char *session_id);
/* The same key, remembered with |*memo| (a connection's: a client sends
 * its session's calls on one connection) and computed again only for
 * another tenant, user or session: the keyed hash was 1.2% of a unary
 * call's instructions. |*memo| starts NULL; sg_affinity_memo_free. */
typedef struct sg_affinity_memo sg_affinity_memo;
uint64_t sg_affinity_key_memo(sg_affinity_memo **memo, const char *tenant,
                              const char *user_id, const char *session_id);
void sg_affinity_memo_free(sg_affinity_memo *memo);

/* A backend's identity for the memory: its name, hashed (names survive a
 * reload that reorders backends; indexes do not). */
uint64_t sg_affinity_backend_id(const char *backend_name);

/* The backend remembered for |key|, or 0 when none. */
uint64_t sg_affinity_get(sg_affinity *a, uint64_t key, uint64_t now_ms);
void sg_affinity_put(sg_affinity *a, uint64_t key, uint64_t backend_id,
                     uint64_t now_ms);

#endif
