/* libFuzzer target: bearer-token verification (jwt.h) and the per-worker
 * cache of verified tokens (token_cache.h), i.e. what every request's
 * authorization header goes through.
 *
 * The verifier is built once from providers with HMAC, ES256 and RS256
 * keys from tests/fixtures/jwt/ (and a JWKS file). An input is used in one
 * of two ways:
 *   - as a token, byte for byte (the usual case);
 *   - when it starts with '{': as "<header JSON>\n<payload JSON>", which
 *     this target signs with the fixture HMAC secret. The verifier checks
 *     the signature before the claims, so without this the fuzzer could
 *     never reach the claim checks (or libjwt's own parsing of a token
 *     whose signature is good).
 * Verification runs at a fixed time so that seed tokens stay valid.
 * Checked: the result is well formed (identity, provider, claims exactly
 * on success), verification is deterministic, and the cache gives the
 * same answer as the verifier, hitting on the second call. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "fuzz_support.h"
#include "sparkgate/jwt.h"
#include "sparkgate/log.h"
#include "sparkgate/token_cache.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


#define FIXTURES SG_SOURCE_ROOT "/tests/fixtures/jwt"

/* 2030-03-17T17:46:40Z: the seed tokens are issued just before it. */
#define FUZZ_NOW INT64_C(1900000000)

static const char providers_json[] =
    "[{\"name\":\"corp\",\"issuer\":\"https://idp.example\","
    "  \"audiences\":[\"spark\",\"other\"],"
    "  \"keys\":[{\"kid\":\"h1\",\"alg\":\"HS256\",\"secret_file\":\"hmac.key\"},"
    "            {\"kid\":\"h3\",\"alg\":\"HS384\",\"secret_file\":\"hmac.key\"},"
    "            {\"kid\":\"h5\",\"alg\":\"HS512\",\"secret_file\":\"hmac.key\"},"
    "            {\"kid\":\"e1\",\"alg\":\"ES256\",\"pem_file\":\"ec256.pub.pem\"},"
    "            {\"kid\":\"r1\",\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}],"
    "  \"leeway_s\":60,\"max_lifetime_s\":86400},"
    " {\"name\":\"single\",\"issuer\":\"https://single.example\","
    "  \"audiences\":[\"spark\"],"
    "  \"keys\":[{\"alg\":\"HS256\",\"secret_file\":\"hmac.key\"}],"
    "  \"identity_claim\":\"email\","
    "  \"required_claims\":{\"groups\":[\"spark-users\",\"admins\"],"
    "                       \"tenant\":\"acme\",\"level\":[3,4],"
    "                       \"verified\":true}},"
    " {\"name\":\"jwks\",\"issuer\":\"https://jwks.example\","
    "  \"audiences\":[\"spark\"],\"jwks_file\":\"jwks.json\"}]";

static sg_jwt_verifier *verifier;
static bool verbose; /* FUZZ_JWT_VERBOSE=1: print each verdict (triage) */
static unsigned char hmac_secret[256];
static size_t hmac_secret_len;

static void report(void *ctx, const char *msg) {
  (void)ctx;
  fprintf(stderr, "fuzz_jwt: provider load error: %s\n", msg);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  sg_log_set_level(SG_LOG_ERROR);
  const char *verb = getenv("FUZZ_JWT_VERBOSE");
  verbose = verb != NULL && verb[0] != '\0' && strcmp(verb, "0") != 0;
  json_error_t jerr;
  json_t *providers = json_loads(providers_json, 0, &jerr);
  if (providers == NULL) {
    fprintf(stderr, "fuzz_jwt: bad provider JSON: %s\n", jerr.text);
    abort();
  }
  if (sg_jwt_providers_load(providers, FIXTURES, "auth.jwt_providers", NULL,
                            &verifier, report, NULL) != 0)
    abort();
  json_decref(providers);

  /* The same bytes the loader keeps: the file without its final newline. */
  FILE *f = fopen(FIXTURES "/hmac.key", "rb");
  if (f == NULL)
    abort();
  hmac_secret_len = fread(hmac_secret, 1, sizeof hmac_secret, f);
  fclose(f);
  while (hmac_secret_len > 0 && (hmac_secret[hmac_secret_len - 1] == '\n' ||
                                 hmac_secret[hmac_secret_len - 1] == '\r'))
    hmac_secret_len--;
  return 0;
}

/* ---- signing mode ------------------------------------------------------- */

/* Unpadded base64url of |n| bytes into |out| (room for 4 * (n + 2) / 3 + 1);
 * returns its length. */
static size_t b64url(const unsigned char *in, size_t n, char *out) {
  int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
  FUZZ_CHECK(len >= 0);
  size_t m = (size_t)len;
  while (m > 0 && out[m - 1] == '=')
    m--;
  for (size_t i = 0; i < m; i++) {
    if (out[i] == '+')
      out[i] = '-';
    else if (out[i] == '/')
      out[i] = '_';
  }
  out[m] = '\0';
  return m;
}

/* "<header>\n<payload>" -> a token signed with the fixture secret, using
 * the HMAC the header names (HS256 unless it mentions HS384 or HS512).
 * Returns a new buffer (free it) and its length in *len. */
static char *sign_token(const uint8_t *data, size_t size, size_t *len) {
  const uint8_t *nl = memchr(data, '\n', size);
  size_t hlen = nl != NULL ? (size_t)(nl - data) : size;
  const uint8_t *payload = nl != NULL ? nl + 1 : data + size;
  size_t plen = nl != NULL ? size - hlen - 1 : 0;

  const EVP_MD *md = EVP_sha256();
  char *htext = malloc(hlen + 1);
  FUZZ_CHECK(htext != NULL);
  memcpy(htext, data, hlen);
  htext[hlen] = '\0';
  if (strstr(htext, "HS384") != NULL)
    md = EVP_sha384();
  else if (strstr(htext, "HS512") != NULL)
    md = EVP_sha512();
  free(htext);

  size_t cap = 4 * (hlen + 2) / 3 + 1 + 4 * (plen + 2) / 3 + 1 + 4 * (64 + 2) / 3 + 2;
  char *tok = malloc(cap);
  FUZZ_CHECK(tok != NULL);
  size_t n = b64url(data, hlen, tok);
  tok[n++] = '.';
  n += b64url(payload, plen, tok + n);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int maclen = 0;
  FUZZ_CHECK(HMAC(md, hmac_secret, (int)hmac_secret_len, (unsigned char *)tok, n,
                  mac, &maclen) != NULL);
  tok[n++] = '.';
  n += b64url(mac, maclen, tok + n);
  FUZZ_CHECK(n < cap);
  *len = n;
  return tok;
}

/* ---- checks ------------------------------------------------------------- */

static void check_result(int reason, const sg_jwt_result *r) {
  FUZZ_CHECK(reason >= 0 && reason < SG_JWT_REASON_COUNT);
  FUZZ_CHECK(strcmp(sg_jwt_reason_name(reason), "unknown") != 0);
  if (reason != SG_JWT_OK) {
    /* A refusal carries only its static explanation. */
    FUZZ_CHECK(r->identity == NULL && r->provider == NULL && r->claims == NULL &&
               r->cnf_x5t_s256 == NULL);
    FUZZ_CHECK(r->detail != NULL && r->detail[0] != '\0');
    return;
  }
  FUZZ_CHECK(r->detail == NULL);
  FUZZ_CHECK(r->identity != NULL && r->provider != NULL);
  size_t il = strlen(r->identity);
  FUZZ_CHECK(il >= 1 && il <= SG_JWT_MAX_IDENTITY_BYTES);
  for (size_t i = 0; i < il; i++)
    FUZZ_CHECK((unsigned char)r->identity[i] >= 0x20 && r->identity[i] != 0x7f);
  FUZZ_CHECK(strcmp(r->provider, "corp") == 0 || strcmp(r->provider, "single") == 0 ||
             strcmp(r->provider, "jwks") == 0);
  FUZZ_CHECK(json_is_object(r->claims));
  /* Not expired at the time it was checked (with at most an hour of
   * leeway, the configurable maximum). */
  FUZZ_CHECK(r->exp + SG_JWT_MAX_LEEWAY_S > FUZZ_NOW);
  FUZZ_CHECK(r->iat == -1 || r->iat >= 0);
  if (r->cnf_x5t_s256 != NULL)
    FUZZ_CHECK(strlen(r->cnf_x5t_s256) == 43);
}

static bool same_result(const sg_jwt_result *a, const sg_jwt_result *b) {
  if ((a->identity == NULL) != (b->identity == NULL))
    return false;
  if (a->identity == NULL)
    return true;
  return strcmp(a->identity, b->identity) == 0 &&
         strcmp(a->provider, b->provider) == 0 && a->exp == b->exp &&
         a->iat == b->iat &&
         (a->cnf_x5t_s256 == NULL) == (b->cnf_x5t_s256 == NULL) &&
         (a->cnf_x5t_s256 == NULL || strcmp(a->cnf_x5t_s256, b->cnf_x5t_s256) == 0) &&
         json_equal(a->claims, b->claims);
}

static void check_token(const char *tok, size_t len) {
  sg_jwt_result r1, r2;
  int rc1 = sg_jwt_verify(verifier, tok, len, FUZZ_NOW, &r1);
  if (verbose)
    fprintf(stderr, "fuzz_jwt: %s%s%s%s%s\n", sg_jwt_reason_name(rc1),
            rc1 == SG_JWT_OK ? ": " : "", rc1 == SG_JWT_OK ? r1.provider : "",
            rc1 == SG_JWT_OK ? "/" : ": ", rc1 == SG_JWT_OK ? r1.identity : r1.detail);
  check_result(rc1, &r1);
  int rc2 = sg_jwt_verify(verifier, tok, len, FUZZ_NOW, &r2);
  FUZZ_CHECK(rc1 == rc2);
  FUZZ_CHECK(same_result(&r1, &r2));
  sg_jwt_result_clear(&r2);

  if (rc1 == SG_JWT_OK) {
    sg_jwt_result copy;
    FUZZ_CHECK(sg_jwt_result_copy(&copy, &r1) == 0);
    FUZZ_CHECK(same_result(&copy, &r1));
    sg_jwt_result_clear(&copy);
  }

  /* The cache must answer exactly as the verifier does. */
  sg_token_cache *cache = sg_token_cache_new(4, 0);
  FUZZ_CHECK(cache != NULL);
  FUZZ_CHECK(sg_token_cache_lookup(cache, verifier, tok, len, FUZZ_NOW) == NULL);
  sg_jwt_result c1, c2;
  int cr1 = sg_token_cache_verify(cache, verifier, tok, len, FUZZ_NOW, &c1);
  check_result(cr1, &c1);
  FUZZ_CHECK(cr1 == rc1);
  FUZZ_CHECK(same_result(&c1, &r1));
  int cr2 = sg_token_cache_verify(cache, verifier, tok, len, FUZZ_NOW, &c2);
  FUZZ_CHECK(cr2 == rc1);
  FUZZ_CHECK(same_result(&c2, &r1));
  sg_token_cache_stats st;
  sg_token_cache_get_stats(cache, &st);
  if (rc1 == SG_JWT_OK && r1.exp > FUZZ_NOW) {
    FUZZ_CHECK(st.hits == 1 && st.inserts == 1);
    FUZZ_CHECK(sg_token_cache_size(cache) == 1);
    const sg_jwt_result *hit =
        sg_token_cache_lookup(cache, verifier, tok, len, FUZZ_NOW);
    FUZZ_CHECK(hit != NULL && same_result(hit, &r1));
  } else {
    /* Only successes are cached, and only until exp (a token accepted
     * within the leeway after its exp is verified every time). */
    FUZZ_CHECK(st.hits == 0 && st.inserts == 0);
    FUZZ_CHECK(sg_token_cache_size(cache) == 0);
  }
  /* Once the token has expired (with any leeway) the cache must not
   * answer for it any more. */
  if (rc1 == SG_JWT_OK) {
    int64_t later = r1.exp + SG_JWT_MAX_LEEWAY_S + 1;
    FUZZ_CHECK(sg_token_cache_lookup(cache, verifier, tok, len, later) == NULL);
  }
  sg_jwt_result_clear(&c1);
  sg_jwt_result_clear(&c2);
  sg_token_cache_free(cache);
  sg_jwt_result_clear(&r1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 0 && data[0] == '{') {
    size_t len;
    char *tok = sign_token(data, size, &len);
    check_token(tok, len);
    free(tok);
    return 0;
  }
  /* A copy of exactly |size| bytes: a read past the token is an error. */
  char *tok = malloc(size > 0 ? size : 1);
  FUZZ_CHECK(tok != NULL);
  if (size > 0)
    memcpy(tok, data, size);
  check_token(tok, size);
  free(tok);
  return 0;
}
