/* Unit tests for the verified-token cache (src/token_cache.c): hit, miss,
 * expiry at exp and at max_ttl_s, LRU eviction, no confusion between
 * tokens, flush on a new verifier, and a long random run checked against a
 * naive model to exercise the open-addressing deletions. */
#include "check.h"
#include "hs256_token.h"
#include "sparkgate/jwt.h"
#include "sparkgate/memcache.h"
#include "sparkgate/token_cache.h"

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SG_SOURCE_ROOT
#define SG_SOURCE_ROOT "."
#endif
#define FIX SG_SOURCE_ROOT "/tests/fixtures/jwt"

#define NOW INT64_C(1700000000)

static sg_jwt_verifier *load_verifier(void) {
  json_t *j = json_loads(
      "[{\"name\":\"p\",\"issuer\":\"https://idp.example\",\"audiences\":"
      "[\"spark\"],\"keys\":[{\"alg\":\"HS256\",\"secret_file\":"
      "\"hmac.key\"}]}]",
      0, NULL);
  sg_jwt_verifier *v = NULL;
  if (sg_jwt_providers_load(j, FIX, "auth.jwt_providers", NULL, &v, NULL,
                            NULL) != 0) {
    printf("cannot load the test verifier\n");
    exit(2);
  }
  json_decref(j);
  return v;
}

/* A fake verified result; only the cache's handling of it matters here.
 * Its strings come from the block cache, as sg_jwt_result_clear expects. */
static sg_jwt_result fake(const char *identity, int64_t exp) {
  sg_jwt_result r = {0};
  r.identity = sg_memcache_strdup(identity);
  r.provider = sg_memcache_strdup("p");
  r.exp = exp;
  r.iat = -1;
  r.claims = json_pack("{s:s}", "sub", identity);
  return r;
}

static bool hit_is(const sg_jwt_result *r, const char *identity) {
  return r != NULL && r->identity != NULL &&
         strcmp(r->identity, identity) == 0 &&
         strcmp(json_string_value(json_object_get(r->claims, "sub")),
                identity) == 0;
}

static int insert(sg_token_cache *c, const sg_jwt_verifier *v, const char *tok,
                  const char *identity, int64_t exp, int64_t now) {
  sg_jwt_result r = fake(identity, exp);
  int rc = sg_token_cache_insert(c, v, tok, strlen(tok), &r, now);
  sg_jwt_result_clear(&r);
  return rc;
}

static const sg_jwt_result *lookup(sg_token_cache *c, const sg_jwt_verifier *v,
                                   const char *tok, int64_t now) {
  return sg_token_cache_lookup(c, v, tok, strlen(tok), now);
}

static void test_new(void) {
  sg_token_cache *c = sg_token_cache_new(0, 0);
  CHECK(c != NULL);
  CHECK(sg_token_cache_size(c) == 0);
  sg_token_cache_free(c);
  CHECK(sg_token_cache_new(SG_TOKEN_CACHE_MAX_ENTRIES + 1, 10) == NULL);
  sg_token_cache_free(NULL);
}

static void test_hit_miss(const sg_jwt_verifier *v) {
  sg_token_cache *c = sg_token_cache_new(16, 300);
  sg_token_cache_stats st;
  CHECK(lookup(c, v, "tokA", NOW) == NULL);
  CHECK(insert(c, v, "tokA", "alice", NOW + 100, NOW) == 0);
  CHECK(insert(c, v, "tokB", "bob", NOW + 100, NOW) == 0);
  CHECK(sg_token_cache_size(c) == 2);
  const sg_jwt_result *r = lookup(c, v, "tokA", NOW + 1);
  CHECK(hit_is(r, "alice"));
  CHECK(r && strcmp(r->provider, "p") == 0 && r->exp == NOW + 100);
  CHECK(hit_is(lookup(c, v, "tokB", NOW + 1), "bob"));
  /* Near misses: one byte changed, a prefix, an extension. */
  CHECK(lookup(c, v, "tokC", NOW) == NULL);
  CHECK(lookup(c, v, "tok", NOW) == NULL);
  CHECK(lookup(c, v, "tokAA", NOW) == NULL);
  CHECK(sg_token_cache_lookup(c, v, "tokA", 3, NOW) == NULL);
  sg_token_cache_get_stats(c, &st);
  CHECK(st.hits == 2 && st.misses == 5 && st.inserts == 2);

  /* Re-inserting replaces the entry instead of adding one. */
  CHECK(insert(c, v, "tokA", "alice2", NOW + 100, NOW) == 0);
  CHECK(sg_token_cache_size(c) == 2);
  CHECK(hit_is(lookup(c, v, "tokA", NOW), "alice2"));

  /* The cache holds its own copy and its own claims reference. */
  sg_jwt_result mine = fake("carol", NOW + 100);
  CHECK(sg_token_cache_insert(c, v, "tokC", 4, &mine, NOW) == 0);
  CHECK(mine.claims->refcount == 2);
  sg_jwt_result_clear(&mine);
  CHECK(hit_is(lookup(c, v, "tokC", NOW), "carol"));

  sg_token_cache_clear(c);
  CHECK(sg_token_cache_size(c) == 0);
  CHECK(lookup(c, v, "tokA", NOW) == NULL);
  sg_token_cache_free(c);
}

static void test_expiry(const sg_jwt_verifier *v) {
  sg_token_cache *c = sg_token_cache_new(16, 300);
  sg_token_cache_stats st;
  /* Ends at exp. */
  CHECK(insert(c, v, "t1", "a", NOW + 100, NOW) == 0);
  CHECK(hit_is(lookup(c, v, "t1", NOW + 99), "a"));
  CHECK(lookup(c, v, "t1", NOW + 100) == NULL);
  CHECK(sg_token_cache_size(c) == 0);
  sg_token_cache_get_stats(c, &st);
  CHECK(st.expirations == 1);
  /* Ends at max_ttl_s when that comes first. */
  CHECK(insert(c, v, "t2", "b", NOW + 100000, NOW) == 0);
  CHECK(hit_is(lookup(c, v, "t2", NOW + 299), "b"));
  CHECK(lookup(c, v, "t2", NOW + 300) == NULL);
  /* Already expired: not stored. */
  CHECK(insert(c, v, "t3", "c", NOW, NOW) == 0);
  CHECK(insert(c, v, "t4", "d", NOW - 5, NOW) == 0);
  CHECK(sg_token_cache_size(c) == 0);
  sg_token_cache_free(c);
}

static void test_eviction(const sg_jwt_verifier *v) {
  sg_token_cache *c = sg_token_cache_new(3, 300);
  sg_token_cache_stats st;
  CHECK(insert(c, v, "A", "a", NOW + 100, NOW) == 0);
  CHECK(insert(c, v, "B", "b", NOW + 100, NOW) == 0);
  CHECK(insert(c, v, "C", "c", NOW + 100, NOW) == 0);
  CHECK(hit_is(lookup(c, v, "A", NOW), "a")); /* B is now the oldest */
  CHECK(insert(c, v, "D", "d", NOW + 100, NOW) == 0);
  CHECK(sg_token_cache_size(c) == 3);
  CHECK(lookup(c, v, "B", NOW) == NULL);
  CHECK(hit_is(lookup(c, v, "A", NOW), "a"));
  CHECK(hit_is(lookup(c, v, "C", NOW), "c"));
  CHECK(hit_is(lookup(c, v, "D", NOW), "d"));
  sg_token_cache_get_stats(c, &st);
  CHECK(st.evictions == 1);
  /* Order is now A, C, D (oldest first): E evicts A. */
  CHECK(insert(c, v, "E", "e", NOW + 100, NOW) == 0);
  CHECK(lookup(c, v, "A", NOW) == NULL);
  CHECK(hit_is(lookup(c, v, "E", NOW), "e"));
  sg_token_cache_free(c);
}

static void test_generation(const sg_jwt_verifier *v) {
  sg_jwt_verifier *v2 = load_verifier();
  sg_token_cache *c = sg_token_cache_new(8, 300);
  sg_token_cache_stats st;
  CHECK(insert(c, v, "A", "a", NOW + 100, NOW) == 0);
  CHECK(hit_is(lookup(c, v, "A", NOW), "a"));
  /* Verified under the old configuration: not valid under the new one. */
  CHECK(lookup(c, v2, "A", NOW) == NULL);
  CHECK(sg_token_cache_size(c) == 0);
  sg_token_cache_get_stats(c, &st);
  CHECK(st.flushes == 1);
  CHECK(insert(c, v2, "A", "a2", NOW + 100, NOW) == 0);
  CHECK(hit_is(lookup(c, v2, "A", NOW), "a2"));
  sg_token_cache_free(c);
  sg_jwt_verifier_unref(v2);
}

/* A naive LRU with the same rules, to compare against. */
struct model_entry {
  int key;
  int64_t expires;
  uint64_t used;
  int version;
};

static void test_random_against_model(const sg_jwt_verifier *v) {
  enum { CAP = 64, KEYS = 200, OPS = 20000 };
  sg_token_cache *c = sg_token_cache_new(CAP, 50);
  struct model_entry m[CAP];
  int n = 0;
  uint64_t clock = 0, rng = 12345;
  int version = 0;
  int64_t now = NOW;
  int mismatches = 0;
  for (int op = 0; op < OPS; op++) {
    rng = rng * 6364136223846793005u + 1442695040888963407u;
    int key = (int)((rng >> 33) % KEYS);
    bool do_insert = ((rng >> 20) & 3) == 0;
    if (((rng >> 40) & 15) == 0)
      now++;
    char tok[32], id[32];
    snprintf(tok, sizeof tok, "token-%d", key);
    int found = -1;
    for (int i = 0; i < n; i++)
      if (m[i].key == key)
        found = i;
    if (found >= 0 && now >= m[found].expires) {
      m[found] = m[--n];
      found = -1;
    }
    if (do_insert) {
      int64_t exp = now + 1 + (int64_t)((rng >> 50) % 80);
      snprintf(id, sizeof id, "id-%d-%d", key, ++version);
      if (insert(c, v, tok, id, exp, now) != 0)
        mismatches++;
      int64_t until = exp < now + 50 ? exp : now + 50;
      if (found < 0) {
        if (n == CAP) {
          int old = 0;
          for (int i = 1; i < n; i++)
            if (m[i].used < m[old].used)
              old = i;
          m[old] = m[--n];
        }
        found = n++;
      }
      m[found] = (struct model_entry){key, until, ++clock, version};
    } else {
      const sg_jwt_result *r = lookup(c, v, tok, now);
      if (found < 0) {
        if (r != NULL)
          mismatches++;
      } else {
        snprintf(id, sizeof id, "id-%d-%d", key, m[found].version);
        if (!hit_is(r, id))
          mismatches++;
        m[found].used = ++clock;
      }
    }
  }
  CHECK(mismatches == 0);
  CHECK(sg_token_cache_size(c) <= CAP);
  /* The run must have exercised every path, or it proves little. */
  sg_token_cache_stats st;
  sg_token_cache_get_stats(c, &st);
  printf("random run: hits %llu misses %llu evictions %llu expirations %llu\n",
         (unsigned long long)st.hits, (unsigned long long)st.misses,
         (unsigned long long)st.evictions, (unsigned long long)st.expirations);
  CHECK(st.hits > 1000 && st.misses > 1000);
  CHECK(st.evictions > 100 && st.expirations > 100);
  sg_token_cache_free(c);
}

/* An HS256 token for the test verifier, signed with the fixture secret. */
static char *mint_hs256(const char *sub, int64_t exp) {
  FILE *f = fopen(FIX "/hmac.key", "rb");
  unsigned char key[256];
  size_t kl = f ? fread(key, 1, sizeof key, f) : 0;
  if (f)
    fclose(f);
  if (kl > 0 && key[kl - 1] == '\n')
    kl--;
  char p[256];
  snprintf(p, sizeof p,
           "{\"iss\":\"https://idp.example\",\"aud\":\"spark\",\"sub\":\"%s\","
           "\"exp\":%lld}",
           sub, (long long)exp);
  char *tok = malloc(1024);
  if (tok == NULL)
    exit(2);
  test_hs256_token(key, kl, p, tok, 1024);
  return tok;
}

static void test_verify_through_cache(const sg_jwt_verifier *v) {
  sg_token_cache *c = sg_token_cache_new(8, 300);
  sg_token_cache_stats st;
  char *tok = mint_hs256("alice", NOW + 60);
  sg_jwt_result r;
  CHECK(sg_token_cache_verify(c, v, tok, strlen(tok), NOW, &r) == SG_JWT_OK);
  CHECK(r.identity && strcmp(r.identity, "alice") == 0);
  sg_jwt_result_clear(&r);
  CHECK(sg_token_cache_verify(c, v, tok, strlen(tok), NOW + 1, &r) ==
        SG_JWT_OK);
  CHECK(r.identity && strcmp(r.identity, "alice") == 0);
  CHECK(r.provider && strcmp(r.provider, "p") == 0);
  CHECK(r.exp == NOW + 60);
  sg_jwt_result_clear(&r);
  sg_token_cache_get_stats(c, &st);
  CHECK(st.hits == 1 && st.misses == 1 && st.inserts == 1);
  /* Past exp the cache no longer answers and the verifier decides: within
   * its 60 s leeway it accepts, but the result is not cached again since
   * cache entries never outlive exp. */
  CHECK(sg_token_cache_verify(c, v, tok, strlen(tok), NOW + 61, &r) ==
        SG_JWT_OK);
  sg_jwt_result_clear(&r);
  CHECK(sg_token_cache_size(c) == 0);
  CHECK(sg_token_cache_verify(c, v, tok, strlen(tok), NOW + 120, &r) ==
        SG_JWT_EXPIRED);
  CHECK(r.detail != NULL);
  sg_jwt_result_clear(&r);
  /* Failures are not cached. */
  tok[strlen(tok) - 2] = tok[strlen(tok) - 2] == 'A' ? 'B' : 'A';
  CHECK(sg_token_cache_verify(c, v, tok, strlen(tok), NOW, &r) ==
        SG_JWT_BAD_SIGNATURE);
  CHECK(sg_token_cache_size(c) == 0);
  free(tok);
  /* Over-long tokens are refused without being hashed or looked up. */
  sg_token_cache_get_stats(c, &st);
  uint64_t lookups = st.hits + st.misses;
  size_t big_len = 1u << 20;
  char *big = malloc(big_len);
  memset(big, 'a', big_len);
  CHECK(sg_token_cache_verify(c, v, big, big_len, NOW, &r) == SG_JWT_TOO_LONG);
  sg_token_cache_get_stats(c, &st);
  CHECK(st.hits + st.misses == lookups);
  free(big);
  sg_token_cache_free(c);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  sg_jwt_verifier *v = load_verifier();
  test_new();
  test_hit_miss(v);
  test_expiry(v);
  test_eviction(v);
  test_generation(v);
  test_random_against_model(v);
  test_verify_through_cache(v);
  sg_jwt_verifier_unref(v);
  return check_report("test_token_cache");
}
