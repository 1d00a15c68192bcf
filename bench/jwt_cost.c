/* Per-RPC cost of authentication: a signature verification (every call
 * with a fresh token, or the first call of a token) against a lookup in the
 * verified-token cache (every later call with the same token). Prints
 * microseconds per call for RS256, ES256 and HS256.
 *
 *   build/bench/jwt_cost [iterations]
 *
 * Keys come from tests/fixtures/jwt/ (run from the source root). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jwt.h>

#include "sparkgate/jwt.h"
#include "sparkgate/token_cache.h"

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  char *buf = malloc(1 << 16);
  *len = fread(buf, 1, (1 << 16) - 1, f);
  buf[*len] = '\0';
  fclose(f);
  return buf;
}

/* Signs a token with libjwt's encoder (benchmark input only). */
static char *mint(jwt_alg_t alg, const char *key_path, const char *sub) {
  size_t len;
  char *key = read_file(key_path, &len);
  if (key == NULL)
    return NULL;
  if (alg == JWT_ALG_HS256 && len > 0 && key[len - 1] == '\n')
    len--;
  jwt_t *j;
  jwt_new(&j);
  long now = (long)time(NULL);
  jwt_add_grant(j, "iss", "bench");
  jwt_add_grant(j, "aud", "spark-connect");
  jwt_add_grant(j, "sub", sub);
  jwt_add_grant_int(j, "iat", now);
  jwt_add_grant_int(j, "exp", now + 3600);
  jwt_set_alg(j, alg, (const unsigned char *)key, (int)len);
  char *tok = jwt_encode_str(j);
  jwt_free(j);
  free(key);
  return tok;
}

static void measure(const char *name, const char *alg, const char *key_json,
                    jwt_alg_t signer, const char *signing_key, int n) {
  char provider[1024];
  snprintf(provider, sizeof provider,
           "[{\"name\":\"bench\",\"issuer\":\"bench\",\"audiences\":[\"spark-connect\"],"
           "\"keys\":[{\"alg\":\"%s\",%s}]}]",
           alg, key_json);
  json_t *providers = json_loads(provider, 0, NULL);
  sg_jwt_verifier *v = NULL;
  if (sg_jwt_providers_load(providers, "tests/fixtures/jwt", "bench", NULL, &v, NULL,
                            NULL) != 0) {
    printf("%-6s cannot load the key (run from the source root)\n", name);
    json_decref(providers);
    return;
  }
  json_decref(providers);
  char *tok = mint(signer, signing_key, "alice");
  if (tok == NULL) {
    printf("%-6s cannot mint a token\n", name);
    sg_jwt_verifier_unref(v);
    return;
  }
  size_t len = strlen(tok);
  int64_t t = (int64_t)time(NULL);

  double a = now_us();
  for (int i = 0; i < n; i++) {
    sg_jwt_result r = {0};
    if (sg_jwt_verify(v, tok, len, t, &r) != 0)
      printf("%s: verify failed\n", name);
    sg_jwt_result_clear(&r);
  }
  double verify_us = (now_us() - a) / n;

  sg_token_cache *c = sg_token_cache_new(1000, 300);
  sg_jwt_result first = {0};
  sg_token_cache_verify(c, v, tok, len, t, &first);
  sg_jwt_result_clear(&first);
  int hits = n * 20;
  a = now_us();
  for (int i = 0; i < hits; i++) {
    if (sg_token_cache_lookup(c, v, tok, len, t) == NULL)
      printf("%s: cache miss\n", name);
  }
  double hit_us = (now_us() - a) / hits;
  printf("%-6s verify %8.2f us   cached %6.3f us   (%.0fx)\n", name, verify_us,
         hit_us, verify_us / hit_us);
  sg_token_cache_free(c);
  free(tok);
  sg_jwt_verifier_unref(v);
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 2000;
  if (n <= 0)
    n = 2000;
  printf("per-call cost of JWT authentication (%d verifications each)\n", n);
  measure("RS256", "RS256", "\"pem_file\":\"rsa1.pub.pem\"", JWT_ALG_RS256,
          "tests/fixtures/jwt/rsa1.key", n);
  measure("ES256", "ES256", "\"pem_file\":\"ec256.pub.pem\"", JWT_ALG_ES256,
          "tests/fixtures/jwt/ec256.key", n);
  measure("HS256", "HS256", "\"secret_file\":\"hmac.key\"", JWT_ALG_HS256,
          "tests/fixtures/jwt/hmac.key", n);
  return 0;
}
