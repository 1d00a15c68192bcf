/* Per-worker verified-token cache: a linear-probing table of entry indices
 * over a fixed array of entries, with an intrusive LRU list. The table has
 * at least twice as many slots as entries, so probes stay short; deletion
 * shifts followers back instead of leaving tombstones, so a long-running
 * cache never degrades. */
#include "sparkgate/token_cache.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define DIGEST_LEN 32
#define NIL UINT32_MAX
#define LAST_TOKEN_MAX 2048

struct entry {
  unsigned char digest[DIGEST_LEN];
  uint64_t hash;
  int64_t expires_at;
  uint32_t prev, next; /* LRU neighbours; `next` chains the free list */
  uint32_t slot;       /* where the table points at this entry */
  sg_jwt_result res;
};

struct sg_token_cache {
  size_t max_entries;
  int64_t max_ttl_s;
  uint64_t generation;
  struct entry *entries;
  uint32_t *table; /* entry index + 1; 0 = empty */
  size_t mask;
  size_t used;
  uint32_t free_head;
  uint32_t lru_head; /* most recently used */
  uint32_t lru_tail;
  EVP_MD *md;
  EVP_MD_CTX *mdctx;
  sg_token_cache_stats stats;
  /* The last token digested, byte for byte, and its digest: a client
   * sends the same token on every call, and comparing it costs far less
   * than hashing it again. */
  char last_token[LAST_TOKEN_MAX];
  size_t last_len; /* 0: none */
  unsigned char last_digest[DIGEST_LEN];
};

sg_token_cache *sg_token_cache_new(size_t max_entries, int64_t max_ttl_s) {
  if (max_entries == 0)
    max_entries = SG_TOKEN_CACHE_DEFAULT_ENTRIES;
  if (max_entries > SG_TOKEN_CACHE_MAX_ENTRIES)
    return NULL;
  if (max_ttl_s <= 0)
    max_ttl_s = SG_TOKEN_CACHE_DEFAULT_MAX_TTL_S;
  size_t slots = 16;
  while (slots < max_entries * 2)
    slots *= 2;
  sg_token_cache *c = calloc(1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->max_entries = max_entries;
  c->max_ttl_s = max_ttl_s;
  c->entries = calloc(max_entries, sizeof *c->entries);
  c->table = calloc(slots, sizeof *c->table);
  c->mask = slots - 1;
  /* Fetched once: the implicit fetch behind EVP_sha256() costs a lookup
   * on every digest in OpenSSL 3. */
  c->md = EVP_MD_fetch(NULL, "SHA256", NULL);
  c->mdctx = EVP_MD_CTX_new();
  if (c->entries == NULL || c->table == NULL || c->md == NULL ||
      c->mdctx == NULL) {
    sg_token_cache_free(c);
    return NULL;
  }
  for (size_t i = 0; i < max_entries; i++)
    c->entries[i].next = i + 1 < max_entries ? (uint32_t)(i + 1) : NIL;
  c->free_head = 0;
  c->lru_head = c->lru_tail = NIL;
  return c;
}

static void lru_unlink(sg_token_cache *c, struct entry *e) {
  if (e->prev != NIL)
    c->entries[e->prev].next = e->next;
  else
    c->lru_head = e->next;
  if (e->next != NIL)
    c->entries[e->next].prev = e->prev;
  else
    c->lru_tail = e->prev;
}

static void lru_push_front(sg_token_cache *c, uint32_t idx) {
  struct entry *e = &c->entries[idx];
  e->prev = NIL;
  e->next = c->lru_head;
  if (c->lru_head != NIL)
    c->entries[c->lru_head].prev = idx;
  c->lru_head = idx;
  if (c->lru_tail == NIL)
    c->lru_tail = idx;
}

static void remove_entry(sg_token_cache *c, uint32_t idx) {
  struct entry *e = &c->entries[idx];
  lru_unlink(c, e);
  /* Backward-shift deletion: move later members of the probe run into
   * the hole when their home slot does not lie between hole and them. */
  size_t i = e->slot, j = i;
  c->table[i] = 0;
  for (;;) {
    j = (j + 1) & c->mask;
    if (c->table[j] == 0)
      break;
    size_t home = c->entries[c->table[j] - 1].hash & c->mask;
    bool stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
    if (stays)
      continue;
    c->table[i] = c->table[j];
    c->entries[c->table[i] - 1].slot = (uint32_t)i;
    c->table[j] = 0;
    i = j;
  }
  sg_jwt_result_clear(&e->res);
  e->next = c->free_head;
  c->free_head = idx;
  c->used--;
}

void sg_token_cache_clear(sg_token_cache *c) {
  if (c == NULL)
    return;
  while (c->lru_head != NIL)
    remove_entry(c, c->lru_head);
}

void sg_token_cache_free(sg_token_cache *c) {
  if (c == NULL)
    return;
  if (c->entries != NULL && c->table != NULL)
    sg_token_cache_clear(c);
  free(c->entries);
  free(c->table);
  EVP_MD_free(c->md);
  EVP_MD_CTX_free(c->mdctx);
  free(c);
}

size_t sg_token_cache_size(const sg_token_cache *c) { return c ? c->used : 0; }

void sg_token_cache_get_stats(const sg_token_cache *c,
                              sg_token_cache_stats *out) {
  if (c != NULL)
    *out = c->stats;
  else
    memset(out, 0, sizeof *out);
}

static int digest_token(sg_token_cache *c, const char *token, size_t len,
                        unsigned char out[DIGEST_LEN], uint64_t *hash) {
  unsigned int n = 0;
  if (len > 0 && len == c->last_len && memcmp(token, c->last_token, len) == 0) {
    memcpy(out, c->last_digest, DIGEST_LEN);
    memcpy(hash, out, sizeof *hash);
    return 0;
  }
  if (EVP_DigestInit_ex(c->mdctx, c->md, NULL) != 1 ||
      EVP_DigestUpdate(c->mdctx, token, len) != 1 ||
      EVP_DigestFinal_ex(c->mdctx, out, &n) != 1 || n != DIGEST_LEN) {
    c->last_len = 0;
    /* Out of memory, most likely: what OpenSSL queued about it must not
     * be read later as the cause of a TLS error on this thread. */
    ERR_clear_error();
    return -1;
  }
  if (len <= LAST_TOKEN_MAX) {
    memcpy(c->last_token, token, len);
    memcpy(c->last_digest, out, DIGEST_LEN);
    c->last_len = len;
  }
  memcpy(hash, out, sizeof *hash);
  return 0;
}

/* Entry index for this digest, or NIL; *slot gets the slot where it is,
 * or the empty slot where it would go. */
static uint32_t find(const sg_token_cache *c, const unsigned char *digest,
                     uint64_t hash, size_t *slot) {
  size_t i = hash & c->mask;
  while (c->table[i] != 0) {
    const struct entry *e = &c->entries[c->table[i] - 1];
    if (e->hash == hash && memcmp(e->digest, digest, DIGEST_LEN) == 0) {
      *slot = i;
      return c->table[i] - 1;
    }
    i = (i + 1) & c->mask;
  }
  *slot = i;
  return NIL;
}

static void sync_generation(sg_token_cache *c, const sg_jwt_verifier *v) {
  uint64_t g = sg_jwt_verifier_generation(v);
  if (g != c->generation) {
    if (c->used > 0)
      c->stats.flushes++;
    sg_token_cache_clear(c);
    c->generation = g;
  }
}

const sg_jwt_result *sg_token_cache_lookup(sg_token_cache *c,
                                           const sg_jwt_verifier *v,
                                           const char *token, size_t len,
                                           int64_t now) {
  if (c == NULL || v == NULL || token == NULL)
    return NULL;
  sync_generation(c, v);
  unsigned char digest[DIGEST_LEN];
  uint64_t hash;
  size_t slot;
  if (c->used == 0 || digest_token(c, token, len, digest, &hash) != 0) {
    c->stats.misses++;
    return NULL;
  }
  uint32_t idx = find(c, digest, hash, &slot);
  if (idx == NIL) {
    c->stats.misses++;
    return NULL;
  }
  struct entry *e = &c->entries[idx];
  if (now >= e->expires_at) {
    remove_entry(c, idx);
    c->stats.expirations++;
    c->stats.misses++;
    return NULL;
  }
  /* The provider's keys were swapped since: the key that signed this
   * token may be gone, so it is verified again (one atomic load). */
  if (e->res.key_generation !=
      sg_jwt_verifier_key_generation(v, e->res.provider_index)) {
    remove_entry(c, idx);
    c->stats.key_changes++;
    c->stats.misses++;
    return NULL;
  }
  lru_unlink(c, e);
  lru_push_front(c, idx);
  c->stats.hits++;
  return &e->res;
}

int sg_token_cache_insert(sg_token_cache *c, const sg_jwt_verifier *v,
                          const char *token, size_t len,
                          const sg_jwt_result *res, int64_t now) {
  if (c == NULL || v == NULL || token == NULL || res == NULL)
    return -1;
  sync_generation(c, v);
  int64_t expires_at = res->exp;
  if (now <= INT64_MAX - c->max_ttl_s && now + c->max_ttl_s < expires_at)
    expires_at = now + c->max_ttl_s;
  if (expires_at <= now)
    return 0;
  unsigned char digest[DIGEST_LEN];
  uint64_t hash;
  if (digest_token(c, token, len, digest, &hash) != 0)
    return -1;
  sg_jwt_result copy;
  if (sg_jwt_result_copy(&copy, res) != 0)
    return -1;
  size_t slot;
  uint32_t idx = find(c, digest, hash, &slot);
  if (idx != NIL) {
    struct entry *e = &c->entries[idx];
    sg_jwt_result_clear(&e->res);
    e->res = copy;
    e->expires_at = expires_at;
    lru_unlink(c, e);
    lru_push_front(c, idx);
    return 0;
  }
  if (c->used == c->max_entries) {
    remove_entry(c, c->lru_tail);
    c->stats.evictions++;
    /* The removal may have shifted the run our empty slot belonged to. */
    find(c, digest, hash, &slot);
  }
  idx = c->free_head;
  struct entry *e = &c->entries[idx];
  c->free_head = e->next;
  memcpy(e->digest, digest, DIGEST_LEN);
  e->hash = hash;
  e->expires_at = expires_at;
  e->res = copy;
  e->slot = (uint32_t)slot;
  c->table[slot] = idx + 1;
  lru_push_front(c, idx);
  c->used++;
  c->stats.inserts++;
  return 0;
}

int sg_token_cache_verify(sg_token_cache *c, const sg_jwt_verifier *v,
                          const char *token, size_t len, int64_t now,
                          sg_jwt_result *out) {
  if (c != NULL && v != NULL && token != NULL &&
      len <= sg_jwt_verifier_max_token_bytes(v)) {
    const sg_jwt_result *hit = sg_token_cache_lookup(c, v, token, len, now);
    if (hit != NULL) {
      if (sg_jwt_result_copy(out, hit) != 0) {
        out->detail = "out of memory";
        return SG_JWT_INTERNAL;
      }
      return SG_JWT_OK;
    }
  }
  int rc = sg_jwt_verify(v, token, len, now, out);
  if (rc == SG_JWT_OK && c != NULL)
    (void)sg_token_cache_insert(c, v, token, len, out, now);
  return rc;
}
