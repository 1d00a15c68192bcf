/* Cache of verified tokens, so a client that sends the same bearer token
 * on every call pays for one signature check, not one per call.
 *
 * One cache per worker thread: it has no locks and must only be used by
 * the thread that created it. Entries are keyed by the SHA-256 of the
 * token (the full digest is compared, the token itself is not kept), hold
 * a copy of the verified result, and end at the token's exp or after
 * max_ttl_s, whichever is first. When full, the least recently used entry
 * goes. Lookups are O(1): open addressing over the digest plus an LRU
 * list. Only successes are cached.
 *
 * Results depend on the verifier's configuration, so every call names the
 * verifier; when its generation differs from the one the cache was filled
 * under (a reload happened), the cache empties itself first. Results also
 * depend on the provider's keys, which change without a reload when they
 * come from the network: each entry keeps the generation of the key set
 * that verified it, and a hit under another generation is dropped and
 * verified again. */
#ifndef SPARKGATE_TOKEN_CACHE_H
#define SPARKGATE_TOKEN_CACHE_H

#include "sparkgate/jwt.h"

#include <stddef.h>
#include <stdint.h>

#define SG_TOKEN_CACHE_DEFAULT_ENTRIES 10000u
#define SG_TOKEN_CACHE_MAX_ENTRIES (1u << 24)
#define SG_TOKEN_CACHE_DEFAULT_MAX_TTL_S 300

typedef struct sg_token_cache sg_token_cache;

typedef struct sg_token_cache_stats {
  uint64_t hits;
  uint64_t misses;
  uint64_t inserts;
  uint64_t evictions;   /* dropped to make room */
  uint64_t expirations; /* dropped because exp or max_ttl_s passed */
  uint64_t flushes;     /* emptied because the verifier changed */
  uint64_t key_changes; /* dropped on a hit because the provider's key set
                           changed since (network keys, issue 9) */
} sg_token_cache_stats;

/* max_entries 0 -> SG_TOKEN_CACHE_DEFAULT_ENTRIES, max_ttl_s <= 0 ->
 * SG_TOKEN_CACHE_DEFAULT_MAX_TTL_S. NULL when max_entries exceeds
 * SG_TOKEN_CACHE_MAX_ENTRIES or memory is short. */
sg_token_cache *sg_token_cache_new(size_t max_entries, int64_t max_ttl_s);
void sg_token_cache_free(sg_token_cache *c);

/* The cached result for this token, or NULL. The pointer is borrowed: it
 * stays valid until the next insert, lookup, clear or free on this cache
 * (copy it with sg_jwt_result_copy to keep it longer). */
const sg_jwt_result *sg_token_cache_lookup(sg_token_cache *c,
                                           const sg_jwt_verifier *v,
                                           const char *token, size_t len,
                                           int64_t now);

/* Remembers a successful result of sg_jwt_verify(v, token, ...). A result
 * already expired at `now` is not stored. Returns 0, or -1 when out of
 * memory (the cache is unchanged apart from a possible eviction). */
int sg_token_cache_insert(sg_token_cache *c, const sg_jwt_verifier *v,
                          const char *token, size_t len,
                          const sg_jwt_result *res, int64_t now);

/* Lookup, else sg_jwt_verify and insert on success (|c| NULL: no cache,
 * verify only). Same contract as
 * sg_jwt_verify: *out is owned by the caller afterwards. Over-long tokens
 * are refused before they are hashed. */
int sg_token_cache_verify(sg_token_cache *c, const sg_jwt_verifier *v,
                          const char *token, size_t len, int64_t now,
                          sg_jwt_result *out);

void sg_token_cache_clear(sg_token_cache *c);
size_t sg_token_cache_size(const sg_token_cache *c);
void sg_token_cache_get_stats(const sg_token_cache *c,
                              sg_token_cache_stats *out);

#endif
