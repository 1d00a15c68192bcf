/* Unit tests for the JWT verifier (src/jwt.c, src/jwks.c). Tokens are signed
 * here with OpenSSL, from JSON text written out by hand, so the tests can
 * make tokens no well-behaved library would: duplicate keys, "None",
 * padded base64, HMAC over a public key. Time is passed in (NOW), so
 * nothing expires. */
#include "check.h"
#include "sparkgate/jwks.h"
#include "sparkgate/jwt.h"
#include "sparkgate/token_cache.h"

#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef SG_SOURCE_ROOT
#define SG_SOURCE_ROOT "."
#endif
#define FIX SG_SOURCE_ROOT "/tests/fixtures/jwt"

/* Compares a verify result with the expected reason and says both names. */
#define CHECK_REASON(got, want)                                                \
  do {                                                                         \
    int got_ = (got), want_ = (want);                                          \
    check_count++;                                                             \
    if (got_ != want_) {                                                       \
      fprintf(stderr, "%s:%d: got %s, want %s\n", __FILE__, __LINE__,          \
              sg_jwt_reason_name(got_), sg_jwt_reason_name(want_));            \
      check_failures++;                                                        \
    }                                                                          \
  } while (0)

#define NOW INT64_C(1700000000)

/* ---- token minting ------------------------------------------------------- */

static char *b64url(const unsigned char *in, size_t len) {
  static const char tbl[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  char *out = malloc(len / 3 * 4 + 5);
  if (out == NULL)
    exit(2);
  size_t o = 0, i = 0;
  for (; i + 2 < len; i += 3) {
    unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
    out[o++] = tbl[v >> 18];
    out[o++] = tbl[(v >> 12) & 63];
    out[o++] = tbl[(v >> 6) & 63];
    out[o++] = tbl[v & 63];
  }
  if (len - i == 1) {
    unsigned v = (unsigned)in[i] << 16;
    out[o++] = tbl[v >> 18];
    out[o++] = tbl[(v >> 12) & 63];
  } else if (len - i == 2) {
    unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8;
    out[o++] = tbl[v >> 18];
    out[o++] = tbl[(v >> 12) & 63];
    out[o++] = tbl[(v >> 6) & 63];
  }
  out[o] = '\0';
  return out;
}

static unsigned char *read_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    printf("cannot open fixture %s\n", path);
    exit(2);
  }
  unsigned char *buf = malloc(1 << 16);
  *len = fread(buf, 1, 1 << 16, f);
  fclose(f);
  return buf;
}

typedef struct signer {
  const char *alg; /* how to sign, whatever the header claims */
  EVP_PKEY *pk;
  unsigned char *secret;
  size_t secret_len;
} signer;

static EVP_PKEY *load_private(const char *name) {
  char path[512];
  snprintf(path, sizeof path, FIX "/%s", name);
  FILE *f = fopen(path, "r");
  if (f == NULL) {
    printf("cannot open fixture %s\n", path);
    exit(2);
  }
  EVP_PKEY *pk = PEM_read_PrivateKey(f, NULL, NULL, NULL);
  fclose(f);
  if (pk == NULL) {
    printf("cannot parse %s\n", path);
    exit(2);
  }
  return pk;
}

static signer S_RSA1, S_RSA2, S_EC256, S_EC384, S_HMAC, S_HMAC_PEM;

static const EVP_MD *md_for(const char *alg) {
  if (strstr(alg, "256"))
    return EVP_sha256();
  if (strstr(alg, "384"))
    return EVP_sha384();
  return EVP_sha512();
}

static unsigned char *sign_bytes(const signer *s, const char *alg,
                                 const char *data, size_t *sig_len) {
  const EVP_MD *md = md_for(alg);
  unsigned char *sig = malloc(1024);
  if (alg[0] == 'H') {
    unsigned int n = 0;
    HMAC(md, s->secret, (int)s->secret_len, (const unsigned char *)data,
         strlen(data), sig, &n);
    *sig_len = n;
    return sig;
  }
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  size_t n = 1024;
  if (EVP_DigestSignInit(ctx, NULL, md, NULL, s->pk) != 1 ||
      EVP_DigestSign(ctx, sig, &n, (const unsigned char *)data, strlen(data)) !=
          1) {
    printf("signing failed\n");
    exit(2);
  }
  EVP_MD_CTX_free(ctx);
  if (alg[0] == 'E') {
    /* JOSE wants r || s at the curve size, OpenSSL gives DER. */
    size_t half = strstr(alg, "256") ? 32 : 48;
    const unsigned char *p = sig;
    ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)n);
    unsigned char *raw = malloc(2 * half);
    BN_bn2binpad(ECDSA_SIG_get0_r(es), raw, (int)half);
    BN_bn2binpad(ECDSA_SIG_get0_s(es), raw + half, (int)half);
    ECDSA_SIG_free(es);
    free(sig);
    *sig_len = 2 * half;
    return raw;
  }
  *sig_len = n;
  return sig;
}

/* header and payload are JSON text, used byte for byte. */
static char *mint(const signer *s, const char *header, const char *payload) {
  char *h = b64url((const unsigned char *)header, strlen(header));
  char *p = b64url((const unsigned char *)payload, strlen(payload));
  size_t dlen = strlen(h) + 1 + strlen(p);
  char *data = malloc(dlen + 1);
  snprintf(data, dlen + 1, "%s.%s", h, p);
  size_t sig_len = 0;
  unsigned char *sig = sign_bytes(s, s->alg, data, &sig_len);
  char *sg = b64url(sig, sig_len);
  size_t tlen = dlen + 1 + strlen(sg);
  char *tok = malloc(tlen + 1);
  snprintf(tok, tlen + 1, "%s.%s", data, sg);
  free(h);
  free(p);
  free(data);
  free(sig);
  free(sg);
  return tok;
}

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...) {
  va_list ap;
  va_start(ap, f);
  char *out = NULL;
  if (vasprintf(&out, f, ap) < 0)
    exit(2);
  va_end(ap);
  return out;
}

/* A header {"alg":..,"typ":"JWT","kid":..}; kid NULL leaves it out. */
static char *hdr(const char *alg, const char *kid) {
  if (kid == NULL)
    return fmt("{\"alg\":\"%s\",\"typ\":\"JWT\"}", alg);
  return fmt("{\"alg\":\"%s\",\"typ\":\"JWT\",\"kid\":\"%s\"}", alg, kid);
}

/* Standard claims for issuer corp; `extra` is appended inside the object
 * (start it with a comma). */
static char *claims(const char *iss, const char *extra) {
  return fmt("{\"iss\":\"%s\",\"sub\":\"alice\",\"aud\":\"spark\","
             "\"iat\":%lld,\"exp\":%lld%s}",
             iss, (long long)(NOW - 10), (long long)(NOW + 3600),
             extra ? extra : "");
}

#define CORP "https://idp.example"
#define JWKS "https://jwks.example"
#define SINGLE "https://single.example"

static int verify_tok(const sg_jwt_verifier *v, const char *tok,
                      sg_jwt_result *r) {
  return sg_jwt_verify(v, tok, strlen(tok), NOW, r);
}

/* Mints, verifies and frees; returns the reason. */
static int try(const sg_jwt_verifier *v, const signer *s, const char *header,
               const char *payload) {
  char *tok = mint(s, header, payload);
  sg_jwt_result r;
  int rc = verify_tok(v, tok, &r);
  if (rc != SG_JWT_OK && r.detail == NULL) {
    fprintf(stderr, "%s:%d: failure without detail\n", __FILE__, __LINE__);
    check_failures++;
  }
  sg_jwt_result_clear(&r);
  free(tok);
  return rc;
}

/* try() that frees its header and payload strings. */
static int tryf(const sg_jwt_verifier *v, const signer *s, char *header,
                char *payload) {
  int rc = try(v, s, header, payload);
  free(header);
  free(payload);
  return rc;
}

/* ---- loading helpers ----------------------------------------------------- */

struct errs {
  char msgs[32][1024];
  int n;
};

static void collect(void *ctx, const char *msg) {
  struct errs *e = ctx;
  if (e->n < 32)
    snprintf(e->msgs[e->n], sizeof e->msgs[0], "%s", msg);
  e->n++;
}

static bool errs_have(const struct errs *e, const char *needle) {
  for (int i = 0; i < e->n && i < 32; i++)
    if (strstr(e->msgs[i], needle) != NULL)
      return true;
  return false;
}

static void dump_errs(const struct errs *e) {
  for (int i = 0; i < e->n && i < 32; i++)
    fprintf(stderr, "  load error: %s\n", e->msgs[i]);
}

/* Loads providers from JSON text; returns the verifier or NULL. */
static sg_jwt_verifier *load_text(const char *text, const char *base_dir,
                                  struct errs *e) {
  json_error_t jerr;
  json_t *j = json_loads(text, 0, &jerr);
  if (j == NULL) {
    printf("bad test JSON: %s\n", jerr.text);
    exit(2);
  }
  memset(e, 0, sizeof *e);
  sg_jwt_verifier *v = NULL;
  int rc = sg_jwt_providers_load(j, base_dir, "auth.jwt_providers", NULL, &v,
                                 collect, e);
  json_decref(j);
  if ((rc == 0) != (v != NULL) || (rc == 0) != (e->n == 0)) {
    fprintf(stderr, "%s:%d: load result inconsistent\n", __FILE__, __LINE__);
    check_failures++;
  }
  return v;
}

/* Expects a load failure with an error containing `needle`. */
static void expect_load_error(int line, const char *text, const char *needle) {
  struct errs e;
  sg_jwt_verifier *v = load_text(text, FIX, &e);
  if (v != NULL || !errs_have(&e, needle)) {
    fprintf(stderr, "%s:%d: expected a load error containing \"%s\"\n",
            __FILE__, line, needle);
    dump_errs(&e);
    check_failures++;
  }
  sg_jwt_verifier_unref(v);
}
#define EXPECT_LOAD_ERROR(text, needle)                                        \
  expect_load_error(__LINE__, text, needle)

static const char *const MAIN_CONFIG =
    "[{\"name\":\"corp\",\"issuer\":\"" CORP "\","
    "  \"audiences\":[\"spark\",\"other\"],"
    "  "
    "\"keys\":[{\"kid\":\"r1\",\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}"
    ","
    "            "
    "{\"kid\":\"e1\",\"alg\":\"ES256\",\"pem_file\":\"ec256.pub.pem\"},"
    "            "
    "{\"kid\":\"h1\",\"alg\":\"HS256\",\"secret_file\":\"hmac.key\"},"
    "            "
    "{\"kid\":\"c1\",\"alg\":\"ES256\",\"pem_file\":\"ec256.crt\"}],"
    "  \"leeway_s\":60,\"max_lifetime_s\":86400},"
    " {\"name\":\"jwks\",\"issuer\":\"" JWKS "\",\"audiences\":[\"spark\"],"
    "  \"jwks_file\":\"jwks.json\"},"
    " {\"name\":\"single\",\"issuer\":\"" SINGLE "\",\"audiences\":[\"spark\"],"
    "  \"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}],"
    "  \"identity_claim\":\"email\","
    "  \"required_claims\":{\"groups\":[\"spark-users\",\"admins\"],"
    "                       \"tenant\":\"acme\",\"level\":[3,4],"
    "                       \"verified\":true}}]";

/* ---- tests --------------------------------------------------------------- */

static void test_b64url(void) {
  unsigned char out[16];
  CHECK(sg_b64url_decode("QQ", 2, out) == 1 && out[0] == 'A');
  CHECK(sg_b64url_decode("QUI", 3, out) == 2 && memcmp(out, "AB", 2) == 0);
  CHECK(sg_b64url_decode("QUJD", 4, out) == 3 && memcmp(out, "ABC", 3) == 0);
  CHECK(sg_b64url_decode("", 0, out) == 0);
  CHECK(sg_b64url_decode("QR", 2, out) == -1);   /* trailing bits set */
  CHECK(sg_b64url_decode("QUJ", 3, out) == -1);  /* trailing bits set */
  CHECK(sg_b64url_decode("QQ==", 4, out) == -1); /* padding */
  CHECK(sg_b64url_decode("Q", 1, out) == -1);    /* impossible length */
  CHECK(sg_b64url_decode("a+b/", 4, out) == -1); /* base64, not base64url */
  CHECK(sg_b64url_decode("-_-_", 4, out) == 3);
  CHECK(sg_b64url_decode("QU I", 4, out) == -1); /* whitespace */
  CHECK(sg_b64url_decode("Q\0==", 4, out) == -1);
}

static void test_reason_names(void) {
  static const char *const want[] = {
      "malformed",         "too_long",         "unknown_issuer",
      "bad_alg",           "unknown_kid",      "bad_signature",
      "expired",           "not_yet_valid",    "issued_in_future",
      "lifetime_too_long", "wrong_audience",   "missing_claim",
      "claim_mismatch",    "crit_unsupported", "bad_typ",
      "bad_identity",      "internal",         "keys_unavailable",
      "kid_refetching",    "cnf_unsupported"};
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
    CHECK(strcmp(sg_jwt_reason_name((int)i + 1), want[i]) == 0);
  CHECK(strcmp(sg_jwt_reason_name(SG_JWT_OK), "ok") == 0);
  CHECK(strcmp(sg_jwt_reason_name(-1), "unknown") == 0);
  CHECK(strcmp(sg_jwt_reason_name(SG_JWT_REASON_COUNT), "unknown") == 0);
}

static void test_valid_tokens(const sg_jwt_verifier *v) {
  /* RS256 with everything checked on the result. */
  char *h = hdr("RS256", "r1");
  char *p = fmt("{\"iss\":\"" CORP "\",\"sub\":\"alice\",\"aud\":\"spark\","
                "\"iat\":%lld,\"exp\":%lld,\"groups\":[\"a\",\"b\"],"
                "\"cnf\":{\"x5t#S256\":"
                "\"LXEWQrcmsEQBYnyp-6wy9chTD7GQPMTbAiWHF5IaSIE\"}}",
                (long long)(NOW - 10), (long long)(NOW + 3600));
  char *tok = mint(&S_RSA1, h, p);
  sg_jwt_result r;
  CHECK_REASON(verify_tok(v, tok, &r), SG_JWT_OK);
  CHECK(r.identity && strcmp(r.identity, "alice") == 0);
  CHECK(r.provider && strcmp(r.provider, "corp") == 0);
  CHECK(r.exp == NOW + 3600);
  CHECK(r.iat == NOW - 10);
  CHECK(r.detail == NULL);
  CHECK(json_is_object(r.claims));
  CHECK(json_array_size(json_object_get(r.claims, "groups")) == 2);
  CHECK(r.cnf_x5t_s256 &&
        strcmp(r.cnf_x5t_s256, "LXEWQrcmsEQBYnyp-6wy9chTD7GQPMTbAiWHF5IaSIE") ==
            0);

  /* Copies own their strings and share claims. */
  sg_jwt_result c;
  CHECK(sg_jwt_result_copy(&c, &r) == 0);
  CHECK(c.identity != r.identity && strcmp(c.identity, "alice") == 0);
  CHECK(c.claims != NULL && c.claims == r.claims && c.claims->refcount == 2);
  sg_jwt_result_clear(&r);
  CHECK(r.identity == NULL && r.claims == NULL);
  CHECK(c.provider && strcmp(c.provider, "corp") == 0 && c.claims &&
        c.claims->refcount == 1);
  sg_jwt_result_clear(&c);
  free(tok);
  free(h);
  free(p);

  CHECK_REASON(tryf(v, &S_EC256, hdr("ES256", "e1"), claims(CORP, NULL)),
               SG_JWT_OK);
  CHECK_REASON(tryf(v, &S_HMAC, hdr("HS256", "h1"), claims(CORP, NULL)),
               SG_JWT_OK);
  /* The key taken out of a certificate. */
  CHECK_REASON(tryf(v, &S_EC256, hdr("ES256", "c1"), claims(CORP, NULL)),
               SG_JWT_OK);
  /* typ is optional and case-insensitive; jku/x5u are never used. */
  CHECK_REASON(tryf(v, &S_RSA1, fmt("{\"alg\":\"RS256\",\"kid\":\"r1\"}"),
                    claims(CORP, NULL)),
               SG_JWT_OK);
  CHECK_REASON(tryf(v, &S_RSA1,
                    fmt("{\"alg\":\"RS256\",\"kid\":\"r1\",\"typ\":\"jwt\"}"),
                    claims(CORP, NULL)),
               SG_JWT_OK);
  CHECK_REASON(
      tryf(v, &S_RSA2,
           fmt("{\"alg\":\"RS256\",\"kid\":\"r1\",\"jku\":\"https://evil/"
               "jwks\",\"x5u\":\"https://evil/cert\"}"),
           claims(CORP, NULL)),
      SG_JWT_BAD_SIGNATURE);
}

static void test_jwks(const sg_jwt_verifier *v) {
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "rsa-1"), claims(JWKS, NULL)),
               SG_JWT_OK);
  /* rsa-2 has no alg in the JWKS: pinned to RS256. */
  CHECK_REASON(tryf(v, &S_RSA2, hdr("RS256", "rsa-2"), claims(JWKS, NULL)),
               SG_JWT_OK);
  CHECK_REASON(tryf(v, &S_EC256, hdr("ES256", "ec-1"), claims(JWKS, NULL)),
               SG_JWT_OK);
  /* ec-2 has no alg: its curve P-384 pins it to ES384. */
  CHECK_REASON(tryf(v, &S_EC384, hdr("ES384", "ec-2"), claims(JWKS, NULL)),
               SG_JWT_OK);
  /* The kid picks the key: the right kid with another key's signature. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "rsa-2"), claims(JWKS, NULL)),
               SG_JWT_BAD_SIGNATURE);
  CHECK_REASON(tryf(v, &S_EC384, hdr("ES384", "ec-1"), claims(JWKS, NULL)),
               SG_JWT_BAD_ALG);
  /* Ignored keys (use enc, OKP) and unknown ones. */
  CHECK_REASON(tryf(v, &S_RSA2, hdr("RS256", "enc-1"), claims(JWKS, NULL)),
               SG_JWT_UNKNOWN_KID);
  CHECK_REASON(tryf(v, &S_RSA2, hdr("RS256", "ed-1"), claims(JWKS, NULL)),
               SG_JWT_UNKNOWN_KID);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "nope"), claims(JWKS, NULL)),
               SG_JWT_UNKNOWN_KID);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "RSA-1"), claims(JWKS, NULL)),
               SG_JWT_UNKNOWN_KID);
  /* No kid with several keys. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", NULL), claims(JWKS, NULL)),
               SG_JWT_UNKNOWN_KID);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", NULL), claims(CORP, NULL)),
               SG_JWT_UNKNOWN_KID);
  /* Pinned: rsa-1 is RS256, so RS384 by the same key is refused. */
  signer rs384 = S_RSA1;
  rs384.alg = "RS384";
  CHECK_REASON(tryf(v, &rs384, hdr("RS384", "rsa-1"), claims(JWKS, NULL)),
               SG_JWT_BAD_ALG);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"), claims(CORP, NULL)),
               SG_JWT_OK);
}

static void test_times(const sg_jwt_verifier *v) {
  /* exp with 60 s leeway: now >= exp + 60 is expired. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)(NOW - 600), (long long)(NOW - 61))),
               SG_JWT_EXPIRED);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)(NOW - 600), (long long)(NOW - 60))),
               SG_JWT_EXPIRED);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)(NOW - 600), (long long)(NOW - 30))),
               SG_JWT_OK);
  /* nbf */
  char *x = fmt(",\"nbf\":%lld", (long long)(NOW + 120));
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"), claims(CORP, x)),
               SG_JWT_NOT_YET_VALID);
  free(x);
  x = fmt(",\"nbf\":%lld", (long long)(NOW + 30));
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"), claims(CORP, x)),
               SG_JWT_OK);
  free(x);
  /* iat in the future */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)(NOW + 120), (long long)(NOW + 3600))),
               SG_JWT_ISSUED_IN_FUTURE);
  /* max_lifetime_s = 86400 */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)(NOW - 10), (long long)(NOW - 10 + 86401))),
               SG_JWT_LIFETIME_TOO_LONG);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)(NOW - 10), (long long)(NOW - 10 + 86400))),
               SG_JWT_OK);
  /* iat is required when the lifetime is bounded, optional otherwise. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"exp\":%lld}",
                        (long long)(NOW + 60))),
               SG_JWT_MISSING_CLAIM);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "rsa-1"),
                    fmt("{\"iss\":\"" JWKS "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"exp\":%lld}",
                        (long long)(NOW + 60))),
               SG_JWT_OK);
  /* exp is required */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld}",
                        (long long)NOW)),
               SG_JWT_MISSING_CLAIM);
}

static void test_numeric_claims(const sg_jwt_verifier *v) {
  static const char *const bad_exp[] = {"\"1700003600\"",
                                        "1700003600.0",
                                        "1.7000036e9",
                                        "1e300",
                                        "true",
                                        "null",
                                        "-5",
                                        "99999999999999",
                                        "[1700003600]",
                                        "{}"};
  for (size_t i = 0; i < sizeof bad_exp / sizeof bad_exp[0]; i++) {
    int rc = tryf(v, &S_RSA1, hdr("RS256", "r1"),
                  fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                      "\"iat\":%lld,\"exp\":%s}",
                      (long long)NOW, bad_exp[i]));
    if (rc != SG_JWT_MALFORMED) {
      fprintf(stderr, "%s:%d: exp %s: got %s\n", __FILE__, __LINE__, bad_exp[i],
              sg_jwt_reason_name(rc));
      check_failures++;
    }
  }
  /* Beyond int64: jansson refuses to parse it at all. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":99999999999999999999999}",
                        (long long)NOW)),
               SG_JWT_MALFORMED);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    claims(CORP, ",\"nbf\":\"1699999000\"")),
               SG_JWT_MALFORMED);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":1699999999.5,\"exp\":%lld}",
                        (long long)(NOW + 60))),
               SG_JWT_MALFORMED);
}

static void test_issuer_audience(const sg_jwt_verifier *v) {
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    claims("https://evil.example", NULL)),
               SG_JWT_UNKNOWN_ISSUER);
  /* Exact match only: no trailing slash, no case folding. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"), claims(CORP "/", NULL)),
               SG_JWT_UNKNOWN_ISSUER);
  CHECK_REASON(
      tryf(v, &S_RSA1, hdr("RS256", "r1"), claims("https://IDP.example", NULL)),
      SG_JWT_UNKNOWN_ISSUER);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"sub\":\"a\",\"aud\":\"spark\",\"iat\":%lld,"
                        "\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60))),
               SG_JWT_MISSING_CLAIM);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":7,\"sub\":\"a\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60))),
               SG_JWT_MALFORMED);

  static const struct {
    const char *aud;
    int want;
  } cases[] = {
      {"\"other\"", SG_JWT_OK},
      {"[\"x\",\"spark\"]", SG_JWT_OK},
      {"[\"spark\"]", SG_JWT_OK},
      {"[\"x\",\"y\"]", SG_JWT_WRONG_AUDIENCE},
      {"\"nope\"", SG_JWT_WRONG_AUDIENCE},
      {"\"Spark\"", SG_JWT_WRONG_AUDIENCE},
      {"[]", SG_JWT_WRONG_AUDIENCE},
      {"[1,\"spark\"]", SG_JWT_MALFORMED},
      {"{\"spark\":1}", SG_JWT_MALFORMED},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int rc = tryf(v, &S_RSA1, hdr("RS256", "r1"),
                  fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"aud\":%s,"
                      "\"iat\":%lld,\"exp\":%lld}",
                      cases[i].aud, (long long)NOW, (long long)(NOW + 60)));
    if (rc != cases[i].want) {
      fprintf(stderr, "%s:%d: aud %s: got %s, want %s\n", __FILE__, __LINE__,
              cases[i].aud, sg_jwt_reason_name(rc),
              sg_jwt_reason_name(cases[i].want));
      check_failures++;
    }
  }
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"iat\":%lld,"
                        "\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60))),
               SG_JWT_MISSING_CLAIM);
}

static void test_alg_attacks(const sg_jwt_verifier *v) {
  static const char *const nones[] = {"none", "None", "NONE", "nOnE"};
  for (size_t i = 0; i < 4; i++) {
    /* Unsigned, as an attacker sends it: empty signature part. */
    char *h = fmt("{\"alg\":\"%s\",\"typ\":\"JWT\",\"kid\":\"r1\"}", nones[i]);
    char *hb = b64url((const unsigned char *)h, strlen(h));
    char *p = claims(CORP, NULL);
    char *pb = b64url((const unsigned char *)p, strlen(p));
    char *tok = fmt("%s.%s.", hb, pb);
    sg_jwt_result r;
    CHECK_REASON(verify_tok(v, tok, &r), SG_JWT_BAD_ALG);
    sg_jwt_result_clear(&r);
    /* And with a signature part. */
    CHECK_REASON(try(v, &S_HMAC, h, p), SG_JWT_BAD_ALG);
    free(tok);
    free(h);
    free(hb);
    free(p);
    free(pb);
  }
  /* The classic key confusion: HS256 keyed with the RSA public key PEM. */
  CHECK_REASON(tryf(v, &S_HMAC_PEM, hdr("HS256", "r1"), claims(CORP, NULL)),
               SG_JWT_BAD_ALG);
  CHECK_REASON(
      tryf(v, &S_HMAC_PEM, hdr("HS256", NULL),
           claims(SINGLE, ",\"email\":\"a@x\",\"groups\":\"admins\","
                          "\"tenant\":\"acme\",\"level\":3,\"verified\":true")),
      SG_JWT_BAD_ALG);
  /* Algorithm names are case-sensitive. */
  signer rs = S_RSA1;
  CHECK_REASON(tryf(v, &rs, hdr("rs256", "r1"), claims(CORP, NULL)),
               SG_JWT_BAD_ALG);
  CHECK_REASON(tryf(v, &rs, hdr("Rs256", "r1"), claims(CORP, NULL)),
               SG_JWT_BAD_ALG);
  /* Family mismatch: an ES256 token against the RSA key. */
  CHECK_REASON(tryf(v, &S_EC256, hdr("ES256", "r1"), claims(CORP, NULL)),
               SG_JWT_BAD_ALG);
  /* An RS256 token against the EC key. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "e1"), claims(CORP, NULL)),
               SG_JWT_BAD_ALG);
  /* A non-string alg, or none at all. */
  CHECK_REASON(
      tryf(v, &S_RSA1, fmt("{\"alg\":256,\"kid\":\"r1\"}"), claims(CORP, NULL)),
      SG_JWT_MALFORMED);
  CHECK_REASON(tryf(v, &S_RSA1, fmt("{\"kid\":\"r1\"}"), claims(CORP, NULL)),
               SG_JWT_MALFORMED);
  /* crit must fail whatever it names. */
  CHECK_REASON(tryf(v, &S_RSA1,
                    fmt("{\"alg\":\"RS256\",\"kid\":\"r1\",\"crit\":[\"exp\"],"
                        "\"exp\":1}"),
                    claims(CORP, NULL)),
               SG_JWT_CRIT_UNSUPPORTED);
  CHECK_REASON(tryf(v, &S_RSA1,
                    fmt("{\"alg\":\"RS256\",\"kid\":\"r1\",\"crit\":[]}"),
                    claims(CORP, NULL)),
               SG_JWT_CRIT_UNSUPPORTED);
  /* typ: what names a JWT (access token) passes, anything else fails. */
  static const char *const bad_typs[] = {
      "\"JOSE\"", "\"dpop+jwt\"", "\"logout+jwt\"", "\"at+jwt \"", "\"\"",
      "5", "[\"JWT\"]"};
  for (size_t i = 0; i < sizeof bad_typs / sizeof bad_typs[0]; i++)
    CHECK_REASON(
        tryf(v, &S_RSA1,
             fmt("{\"alg\":\"RS256\",\"kid\":\"r1\",\"typ\":%s}", bad_typs[i]),
             claims(CORP, NULL)),
        SG_JWT_BAD_TYP);
  CHECK_REASON(tryf(v, &S_RSA1, fmt("{\"alg\":\"RS256\",\"kid\":5}"),
                    claims(CORP, NULL)),
               SG_JWT_MALFORMED);
}

/* Replaces part `idx` (0..2) of token with `repl`. */
static char *replace_part(const char *tok, int idx, const char *repl) {
  const char *d1 = strchr(tok, '.'), *d2 = strchr(d1 + 1, '.');
  if (idx == 0)
    return fmt("%s%s", repl, d1);
  if (idx == 1)
    return fmt("%.*s.%s%s", (int)(d1 - tok), tok, repl, d2);
  return fmt("%.*s.%s", (int)(d2 - tok), tok, repl);
}

/* RFC 9068 access tokens ("at+jwt"), whose signature libjwt 1.10 will not
 * check, verified for every algorithm, and still refused when anything
 * signed differs. */
static void test_access_token_typ(const sg_jwt_verifier *v) {
  static const char *const typs[] = {"at+jwt", "AT+JWT", "application/at+jwt",
                                     "application/jwt", "jwt", NULL};
  for (size_t i = 0; i < sizeof typs / sizeof typs[0]; i++) {
    char *typ = typs[i] ? fmt(",\"typ\":\"%s\"", typs[i]) : fmt("%s", "");
    CHECK_REASON(tryf(v, &S_RSA1, fmt("{\"alg\":\"RS256\",\"kid\":\"r1\"%s}", typ),
                      claims(CORP, NULL)),
                 SG_JWT_OK);
    CHECK_REASON(tryf(v, &S_EC256, fmt("{\"alg\":\"ES256\",\"kid\":\"e1\"%s}", typ),
                      claims(CORP, NULL)),
                 SG_JWT_OK);
    CHECK_REASON(tryf(v, &S_HMAC, fmt("{\"alg\":\"HS256\",\"kid\":\"h1\"%s}", typ),
                      claims(CORP, NULL)),
                 SG_JWT_OK);
    free(typ);
  }
  /* Tampered payload, another key's signature, a flipped bit. */
  static const struct {
    const signer *s;
    const char *alg, *kid;
  } keys[] = {{&S_RSA1, "RS256", "r1"},
              {&S_EC256, "ES256", "e1"},
              {&S_HMAC, "HS256", "h1"}};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    char *h = fmt("{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"at+jwt\"}",
                  keys[i].alg, keys[i].kid);
    char *p = claims(CORP, NULL);
    char *tok = mint(keys[i].s, h, p);
    char *other_p = claims(CORP, ",\"x\":1");
    char *other_pb = b64url((const unsigned char *)other_p, strlen(other_p));
    char *tampered = replace_part(tok, 1, other_pb);
    sg_jwt_result r;
    CHECK_REASON(verify_tok(v, tampered, &r), SG_JWT_BAD_SIGNATURE);
    sg_jwt_result_clear(&r);
    char *flipped = strdup(tok);
    char *last = flipped + strlen(flipped) - 2;
    *last = *last == 'A' ? 'B' : 'A';
    CHECK_REASON(verify_tok(v, flipped, &r), SG_JWT_BAD_SIGNATURE);
    sg_jwt_result_clear(&r);
    free(h);
    free(p);
    free(tok);
    free(other_p);
    free(other_pb);
    free(tampered);
    free(flipped);
  }
  signer wrong = S_RSA2;
  wrong.alg = "RS256";
  CHECK_REASON(tryf(v, &wrong, fmt("{\"alg\":\"RS256\",\"kid\":\"r1\","
                                   "\"typ\":\"at+jwt\"}"),
                    claims(CORP, NULL)),
               SG_JWT_BAD_SIGNATURE);
}

/* A token of `s` with this header's alg and kid and the usual claims,
 * checked to verify before a test alters it (*h and *p: its parts). */
static char *good_token(const sg_jwt_verifier *v, const signer *s,
                        const char *alg, const char *kid, char **h, char **p) {
  *h = hdr(alg, kid);
  *p = claims(CORP, NULL);
  char *tok = mint(s, *h, *p);
  sg_jwt_result r;
  CHECK_REASON(verify_tok(v, tok, &r), SG_JWT_OK);
  sg_jwt_result_clear(&r);
  return tok;
}

static void test_tampering(const sg_jwt_verifier *v) {
  char *h, *p;
  char *tok = good_token(v, &S_RSA1, "RS256", "r1", &h, &p);
  sg_jwt_result r;

  /* Payload changed (sub alice -> mallory), signature kept. */
  char *p2 = fmt("{\"iss\":\"" CORP "\",\"sub\":\"mallory\",\"aud\":\"spark\","
                 "\"iat\":%lld,\"exp\":%lld}",
                 (long long)(NOW - 10), (long long)(NOW + 3600));
  char *p2b = b64url((const unsigned char *)p2, strlen(p2));
  char *t2 = replace_part(tok, 1, p2b);
  CHECK_REASON(verify_tok(v, t2, &r), SG_JWT_BAD_SIGNATURE);
  CHECK(r.identity == NULL && r.claims == NULL);
  sg_jwt_result_clear(&r);
  free(t2);

  /* One signature byte flipped (first character: always canonical). */
  char *t3 = strdup(tok);
  char *s = strrchr(t3, '.') + 1;
  s[0] = s[0] == 'A' ? 'B' : 'A';
  CHECK_REASON(verify_tok(v, t3, &r), SG_JWT_BAD_SIGNATURE);
  sg_jwt_result_clear(&r);
  free(t3);

  /* Signature truncated or extended by a byte. */
  char *sig = strrchr(tok, '.') + 1;
  char *t4 = replace_part(tok, 2, "");
  CHECK_REASON(verify_tok(v, t4, &r), SG_JWT_MALFORMED);
  free(t4);
  /* 340 characters: canonical, but 255 bytes. */
  char *shortsig = fmt("%.*s", (int)strlen(sig) - 2, sig);
  t4 = replace_part(tok, 2, shortsig);
  CHECK_REASON(verify_tok(v, t4, &r), SG_JWT_BAD_SIGNATURE);
  free(t4);
  free(shortsig);

  /* Non-canonical base64url: a 256-byte signature is 342 characters, so
   * its last character carries 4 unused bits; set one. */
  CHECK(strlen(sig) % 4 == 2);
  char *t5 = strdup(tok);
  char *last = t5 + strlen(t5) - 1;
  static const char tbl[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  *last = tbl[(strchr(tbl, *last) - tbl) | 1];
  CHECK_REASON(verify_tok(v, t5, &r), SG_JWT_MALFORMED);
  free(t5);
  /* Padding, base64 (not url) alphabet, whitespace. */
  char *hb = b64url((const unsigned char *)h, strlen(h));
  size_t rem = strlen(hb) % 4;
  const char *pad = rem == 2 ? "==" : rem == 3 ? "=" : "====";
  char *padded = malloc(strlen(hb) + 5);
  if (padded == NULL)
    exit(2);
  memcpy(padded, hb, strlen(hb));
  memcpy(padded + strlen(hb), pad, strlen(pad) + 1);
  t5 = replace_part(tok, 0, padded);
  CHECK_REASON(verify_tok(v, t5, &r), SG_JWT_MALFORMED);
  free(t5);
  free(padded);
  char *hb2 = strdup(hb);
  for (char *c = hb2; *c; c++)
    if (*c == 'e')
      *c = '+';
  t5 = replace_part(tok, 0, hb2);
  CHECK_REASON(verify_tok(v, t5, &r), SG_JWT_MALFORMED);
  free(t5);
  free(hb2);
  t5 = fmt("%s ", tok);
  CHECK_REASON(verify_tok(v, t5, &r), SG_JWT_MALFORMED);
  free(t5);
  /* A NUL inside the counted bytes. */
  t5 = strdup(tok);
  t5[5] = '\0';
  CHECK_REASON(sg_jwt_verify(v, t5, strlen(tok), NOW, &r), SG_JWT_MALFORMED);
  free(t5);

  /* Structure. */
  CHECK_REASON(verify_tok(v, "", &r), SG_JWT_MALFORMED);
  CHECK_REASON(sg_jwt_verify(v, NULL, 0, NOW, &r), SG_JWT_MALFORMED);
  CHECK_REASON(verify_tok(v, "abc", &r), SG_JWT_MALFORMED);
  CHECK_REASON(verify_tok(v, "abc.def", &r), SG_JWT_MALFORMED);
  CHECK_REASON(verify_tok(v, ".def.ghi", &r), SG_JWT_MALFORMED);
  char *jwe = fmt("%s.AAAA.BBBB", tok); /* five parts: JWE */
  CHECK_REASON(verify_tok(v, jwe, &r), SG_JWT_MALFORMED);
  free(jwe);
  /* Header or payload not a JSON object. */
  t5 = replace_part(tok, 1, "WzFd"); /* [1] */
  CHECK_REASON(verify_tok(v, t5, &r), SG_JWT_MALFORMED);
  free(t5);
  t5 = replace_part(tok, 0, "bm90IGpzb24"); /* "not json" */
  CHECK_REASON(verify_tok(v, t5, &r), SG_JWT_MALFORMED);
  free(t5);
  /* The cap is on the bytes given, a prefix of a valid token fails. */
  CHECK_REASON(sg_jwt_verify(v, tok, strlen(tok) - 1, NOW, &r),
               SG_JWT_MALFORMED);

  free(hb);
  free(p2);
  free(p2b);
  free(tok);
  free(h);
  free(p);
}

/* EC signatures are r || s, turned into DER for OpenSSL by sparkgate
 * itself (libjwt no longer sees RSA and EC tokens): every rearrangement
 * of a good signature, and the degenerate ones, must fail. */
static void test_ec_signature_forms(const sg_jwt_verifier *v) {
  char *h, *p;
  char *tok = good_token(v, &S_EC256, "ES256", "e1", &h, &p);
  sg_jwt_result r;
  unsigned char sig[64];
  const char *sb = strrchr(tok, '.') + 1;
  CHECK(sg_b64url_decode(sb, strlen(sb), sig) == 64);
  unsigned char forms[4][64];
  memcpy(forms[0], sig + 32, 32); /* s || r */
  memcpy(forms[0] + 32, sig, 32);
  memset(forms[1], 0, 64);        /* r = s = 0 */
  memset(forms[2], 0xff, 64);     /* both above the group order */
  memcpy(forms[3], sig, 32);      /* r || r */
  memcpy(forms[3] + 32, sig, 32);
  for (size_t i = 0; i < 4; i++) {
    char *b = b64url(forms[i], 64);
    char *t = replace_part(tok, 2, b);
    CHECK_REASON(verify_tok(v, t, &r), SG_JWT_BAD_SIGNATURE);
    sg_jwt_result_clear(&r);
    free(t);
    free(b);
  }
  /* The same signature over another payload. */
  char *p2 = claims(CORP, ",\"x\":1");
  char *p2b = b64url((const unsigned char *)p2, strlen(p2));
  char *t2 = replace_part(tok, 1, p2b);
  CHECK_REASON(verify_tok(v, t2, &r), SG_JWT_BAD_SIGNATURE);
  free(t2);
  free(p2b);
  free(p2);
  free(tok);
  free(p);
  free(h);
}

/* RSA and EC keys are parsed once, when loaded; HMAC secrets stay bytes. */
static void test_keys_parsed_at_load(void) {
  char err[256];
  sg_jwk k;
  CHECK(sg_jwk_from_pem_file(FIX "/rsa1.pub.pem", "RS256", &k, err,
                             sizeof err) == 0);
  CHECK(k.pkey != NULL && EVP_PKEY_get_base_id(k.pkey) == EVP_PKEY_RSA);
  sg_jwk_clear(&k);
  CHECK(k.pkey == NULL);
  /* A certificate's key. */
  CHECK(sg_jwk_from_pem_file(FIX "/ec256.crt", "ES256", &k, err, sizeof err) ==
        0);
  CHECK(k.pkey != NULL && EVP_PKEY_get_base_id(k.pkey) == EVP_PKEY_EC);
  sg_jwk_clear(&k);
  CHECK(sg_jwk_from_secret_file(FIX "/hmac.key", "HS256", &k, err,
                                sizeof err) == 0);
  CHECK(k.pkey == NULL && k.is_hmac);
  sg_jwk_clear(&k);
  /* A JWK built from its numbers. */
  json_t *jwk = json_pack(
      "{s:s, s:s, s:s, s:s}", "kty", "EC", "crv", "P-256", "x",
      "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y",
      "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0");
  CHECK(jwk != NULL && sg_jwk_from_json(jwk, &k, err, sizeof err) == 0);
  CHECK(k.pkey != NULL && EVP_PKEY_get_base_id(k.pkey) == EVP_PKEY_EC);
  sg_jwk_clear(&k);
  json_decref(jwk);
}

static void test_duplicates(const sg_jwt_verifier *v) {
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\",\"sub\":\"b\","
                        "\"aud\":\"spark\",\"iat\":%lld,\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60))),
               SG_JWT_MALFORMED);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"a\","
                        "\"aud\":\"spark\",\"iat\":%lld,\"exp\":%lld,"
                        "\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60),
                        (long long)(NOW + 999999))),
               SG_JWT_MALFORMED);
  CHECK_REASON(tryf(v, &S_RSA1,
                    fmt("{\"alg\":\"RS256\",\"alg\":\"HS256\",\"kid\":\"r1\"}"),
                    claims(CORP, NULL)),
               SG_JWT_MALFORMED);
  CHECK_REASON(tryf(v, &S_RSA1,
                    fmt("{\"alg\":\"RS256\",\"kid\":\"r1\",\"kid\":\"h1\"}"),
                    claims(CORP, NULL)),
               SG_JWT_MALFORMED);
  /* Nested duplicates too. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    claims(CORP, ",\"cnf\":{\"a\":1,\"a\":2}")),
               SG_JWT_MALFORMED);
}

static void test_oversized(const sg_jwt_verifier *v) {
  sg_jwt_result r;
  const size_t sizes[] = {8193, 1u << 20, 16u << 20};
  for (size_t i = 0; i < 3; i++) {
    char *big = malloc(sizes[i] + 1);
    memset(big, 'a', sizes[i]);
    big[sizes[i]] = '\0';
    /* Shaped like a token, too. */
    big[10] = '.';
    big[sizes[i] - 10] = '.';
    CHECK_REASON(sg_jwt_verify(v, big, sizes[i], NOW, &r), SG_JWT_TOO_LONG);
    CHECK(r.detail != NULL && strstr(r.detail, "aaaa") == NULL);
    free(big);
  }
  /* Exactly at the cap is not too long (it is just garbage). */
  char *edge = malloc(8192);
  memset(edge, 'a', 8192);
  CHECK_REASON(sg_jwt_verify(v, edge, 8192, NOW, &r), SG_JWT_MALFORMED);
  free(edge);

  /* The cap is configurable. */
  struct errs e;
  json_t *j = json_loads("[{\"name\":\"s\",\"issuer\":\"" CORP "\","
                         "\"audiences\":[\"spark\"],\"keys\":[{\"alg\":"
                         "\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}]}]",
                         0, NULL);
  sg_jwt_options opts = {.max_token_bytes = 100};
  sg_jwt_verifier *small = NULL;
  memset(&e, 0, sizeof e);
  CHECK(sg_jwt_providers_load(j, FIX, "p", &opts, &small, collect, &e) == 0);
  CHECK(sg_jwt_verifier_max_token_bytes(small) == 100);
  CHECK_REASON(tryf(small, &S_RSA1, hdr("RS256", NULL), claims(CORP, NULL)),
               SG_JWT_TOO_LONG);
  sg_jwt_verifier_unref(small);
  json_decref(j);
}

static void test_required_claims(const sg_jwt_verifier *v) {
  static const struct {
    const char *extra;
    int want;
  } cases[] = {
      {",\"email\":\"a@x\",\"groups\":[\"x\",\"spark-users\"],"
       "\"tenant\":\"acme\",\"level\":3,\"verified\":true",
       SG_JWT_OK},
      {",\"email\":\"a@x\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":4,\"verified\":true",
       SG_JWT_OK},
      /* Array membership on the token side, one-of on the config side. */
      {",\"email\":\"a@x\",\"groups\":[1,{},\"admins\"],"
       "\"tenant\":[\"acme\"],\"level\":[9,3],\"verified\":true",
       SG_JWT_OK},
      {",\"email\":\"a@x\",\"groups\":[\"x\"],\"tenant\":\"acme\","
       "\"level\":3,\"verified\":true",
       SG_JWT_CLAIM_MISMATCH},
      {",\"email\":\"a@x\",\"groups\":[],\"tenant\":\"acme\","
       "\"level\":3,\"verified\":true",
       SG_JWT_CLAIM_MISMATCH},
      {",\"email\":\"a@x\",\"tenant\":\"acme\",\"level\":3,\"verified\":true",
       SG_JWT_MISSING_CLAIM},
      {",\"email\":\"a@x\",\"groups\":\"admins\",\"tenant\":\"ACME\","
       "\"level\":3,\"verified\":true",
       SG_JWT_CLAIM_MISMATCH},
      /* Types are exact: "3" is not 3, 3.0 is not 3, 1 is not true. */
      {",\"email\":\"a@x\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":\"3\",\"verified\":true",
       SG_JWT_CLAIM_MISMATCH},
      {",\"email\":\"a@x\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":3.0,\"verified\":true",
       SG_JWT_CLAIM_MISMATCH},
      {",\"email\":\"a@x\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":3,\"verified\":1",
       SG_JWT_CLAIM_MISMATCH},
      {",\"email\":\"a@x\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":3,\"verified\":false",
       SG_JWT_CLAIM_MISMATCH},
      /* Identity claim is "email" here. */
      {",\"groups\":\"admins\",\"tenant\":\"acme\",\"level\":3,"
       "\"verified\":true",
       SG_JWT_MISSING_CLAIM},
      {",\"email\":\"\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":3,\"verified\":true",
       SG_JWT_BAD_IDENTITY},
      {",\"email\":42,\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":3,\"verified\":true",
       SG_JWT_BAD_IDENTITY},
      {",\"email\":\"a\\nb\",\"groups\":\"admins\",\"tenant\":\"acme\","
       "\"level\":3,\"verified\":true",
       SG_JWT_BAD_IDENTITY},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int rc =
        tryf(v, &S_RSA1, hdr("RS256", NULL), claims(SINGLE, cases[i].extra));
    if (rc != cases[i].want) {
      fprintf(stderr, "%s:%d: required_claims case %zu: got %s, want %s\n",
              __FILE__, __LINE__, i, sg_jwt_reason_name(rc),
              sg_jwt_reason_name(cases[i].want));
      check_failures++;
    }
  }
  /* The single kid-less key takes tokens with any kid. */
  char *h = hdr("RS256", "whatever");
  char *p = claims(SINGLE, ",\"email\":\"a@x\",\"groups\":\"admins\","
                           "\"tenant\":\"acme\",\"level\":3,"
                           "\"verified\":true");
  char *tok = mint(&S_RSA1, h, p);
  free(h);
  free(p);
  sg_jwt_result r;
  CHECK_REASON(verify_tok(v, tok, &r), SG_JWT_OK);
  CHECK(r.identity && strcmp(r.identity, "a@x") == 0);
  CHECK(r.provider && strcmp(r.provider, "single") == 0);
  CHECK(r.cnf_x5t_s256 == NULL);
  sg_jwt_result_clear(&r);
  free(tok);

  /* Identity in the default sub claim. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"sub\":\"\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60))),
               SG_JWT_BAD_IDENTITY);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    fmt("{\"iss\":\"" CORP "\",\"aud\":\"spark\","
                        "\"iat\":%lld,\"exp\":%lld}",
                        (long long)NOW, (long long)(NOW + 60))),
               SG_JWT_MISSING_CLAIM);
  char longid[600];
  memset(longid, 'x', sizeof longid - 1);
  longid[sizeof longid - 1] = '\0';
  CHECK_REASON(
      tryf(v, &S_RSA1, hdr("RS256", "r1"),
           fmt("{\"iss\":\"" CORP "\",\"sub\":\"%s\",\"aud\":\"spark\","
               "\"iat\":%lld,\"exp\":%lld}",
               longid, (long long)NOW, (long long)(NOW + 60))),
      SG_JWT_BAD_IDENTITY);
  /* The identity goes upstream as a gRPC ASCII metadata value: printable
   * ASCII only, and nothing RFC 9113 calls malformed (padding). */
  static const char *const bad_ids[] = {
      "alice ",       " alice",     "alice\\t",  "\\talice",
      "alic\\u00e9", "al\\u2028ice", "a\\u0085b", "a\\u007fb"};
  for (size_t i = 0; i < sizeof bad_ids / sizeof bad_ids[0]; i++)
    CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                      fmt("{\"iss\":\"" CORP "\",\"sub\":\"%s\",\"aud\":"
                          "\"spark\",\"iat\":%lld,\"exp\":%lld}",
                          bad_ids[i], (long long)NOW, (long long)(NOW + 60))),
                 SG_JWT_BAD_IDENTITY);
  static const char *const good_ids[] = {"a b", "~!", "x"};
  for (size_t i = 0; i < sizeof good_ids / sizeof good_ids[0]; i++)
    CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                      fmt("{\"iss\":\"" CORP "\",\"sub\":\"%s\",\"aud\":"
                          "\"spark\",\"iat\":%lld,\"exp\":%lld}",
                          good_ids[i], (long long)NOW, (long long)(NOW + 60))),
                 SG_JWT_OK);
  /* cnf that is not a proper thumbprint. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    claims(CORP, ",\"cnf\":{\"x5t#S256\":\"abc\"}")),
               SG_JWT_MALFORMED);
  CHECK_REASON(
      tryf(v, &S_RSA1, hdr("RS256", "r1"), claims(CORP, ",\"cnf\":\"x\"")),
      SG_JWT_MALFORMED);
  /* A token bound to a key (DPoP jkt, RFC 7800 jwk) is no bearer token:
   * without a method we check, it is refused, not taken as unbound. */
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    claims(CORP, ",\"cnf\":{\"jkt\":\"x\"}")),
               SG_JWT_CNF_UNSUPPORTED);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "r1"),
                    claims(CORP, ",\"cnf\":{\"jwk\":{\"kty\":\"EC\"}}")),
               SG_JWT_CNF_UNSUPPORTED);
  CHECK_REASON(
      tryf(v, &S_RSA1, hdr("RS256", "r1"), claims(CORP, ",\"cnf\":{}")),
      SG_JWT_CNF_UNSUPPORTED);
}

static void test_load_errors(void) {
  /* Short HMAC secret, reported with its JSON path and the fix. */
  struct errs e;
  sg_jwt_verifier *v = load_text(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],\"keys\":["
      "{\"kid\":\"k0\",\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"},"
      "{\"kid\":\"k1\",\"alg\":\"HS256\",\"secret_file\":\"hmac_short.key\"}]}"
      "]",
      FIX, &e);
  CHECK(v == NULL);
  CHECK(e.n == 1);
  CHECK(strncmp(e.msgs[0], "auth.jwt_providers[0].keys[1].secret_file: ", 43) ==
        0);
  CHECK(strstr(e.msgs[0], "16-byte") && strstr(e.msgs[0], "at least 32"));
  /* HS512 needs 64 bytes: hmac.key (64) is enough, and a 48-byte minimum
   * for HS384 too. */
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"HS384\",\"secret_file\":"
                    "\"hmac_short.key\"}]}]",
                    "at least 48");

  /* JWKS keys all outside "algorithms" (rsa-2 names no alg: RS256): the
   * error says why, not only that no key is usable. */
  /* The name goes to backends as a header value and into metrics labels:
   * the tenant-name rule, so no CR/LF (RFC 9113 8.2.1) or anything else
   * that would need escaping. */
  EXPECT_LOAD_ERROR("[{\"name\":\"corp\\r\\nx-sparkgate-identity: admin\","
                    "\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}]}]",
                    "auth.jwt_providers[0].name: not a valid provider name");
  EXPECT_LOAD_ERROR("[{\"name\":\"corp idp\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}]}]",
                    "auth.jwt_providers[0].name: ");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"jwks_file\":\"jwks.json\",\"algorithms\":[\"RS512\"]}]",
                    "an RSA key without \"alg\" is taken as RS256");
  /* The issuer's public key given as an HMAC secret: algorithm confusion
   * by configuration, refused at load whatever the key file holds. */
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"HS256\",\"secret_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "keys[0].secret_file: ");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"HS256\",\"secret_file\":"
                    "\"ec256.crt\"}]}]",
                    "holds a PEM key, not an HMAC secret");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"ES256\",\"pem_file\":\"rsa1.pub.pem\"}]"
      "}]",
      "keys[0].pem_file: ");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"ec256.pub.pem\"}]}]",
                    "needs an RSA key");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"ES384\",\"pem_file\":"
                    "\"ec256.pub.pem\"}]}]",
                    "needs P-384");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1024.pub.pem\"}]}]",
                    "1024 bits");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.key\"}]}]",
      "private key");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"hmac.key\"}]}]",
      "holds no PEM");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"nope.pem\"}]}]",
      "keys[0].pem_file: cannot open " FIX "/nope.pem");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"HS256\",\"pem_file\":\"hmac.key\"}]}]",
      "cannot be used with a PEM key");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"rs256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "keys[0].alg: \"rs256\" is not supported");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"none\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "is not supported");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\"}]}]",
                    "exactly one of");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\","
      "\"secret_file\":\"hmac.key\"}]}]",
      "exactly one of");
  /* Kid rules. */
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"kid\":\"k\",\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"},{\"kid\":\"k\",\"alg\":\"ES256\","
                    "\"pem_file\":\"ec256.pub.pem\"}]}]",
                    "kid \"k\" is used by more than one key");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"kid\":\"rsa-1\",\"alg\":\"RS256\","
                    "\"pem_file\":\"rsa1.pub.pem\"}],\"jwks_file\":"
                    "\"jwks.json\"}]",
                    "kid \"rsa-1\" is used by more than one key");
  EXPECT_LOAD_ERROR(
      "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"},"
      "{\"kid\":\"e\",\"alg\":\"ES256\",\"pem_file\":"
      "\"ec256.pub.pem\"}]}]",
      "can never be chosen");
  /* Provider-level rules. */
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}],\"leeway\":5}]",
                    "auth.jwt_providers[0].leeway: unknown key");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\",\"use\":\"sig\"}]}]",
                    "keys[0].use: unknown key");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "audiences: must be a non-empty list");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "auth.jwt_providers[0].issuer: missing");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"]}]",
                    "no usable key");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}],\"leeway_s\":-1}]",
                    "leeway_s: must be an integer from 0 to 3600");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}],\"max_lifetime_s\":\"1h\"}]",
                    "max_lifetime_s: must be an integer");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}],\"required_claims\":{\"g\":[]}}]",
                    "required_claims.g: an empty list");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}],\"required_claims\":{\"g\":1.5}}]",
                    "required_claims.g: must be a string");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"ES256\",\"pem_file\":"
                    "\"ec256.pub.pem\"}],\"algorithms\":[\"RS256\"]}]",
                    "not in this provider's \"algorithms\"");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]},"
                    "{\"name\":\"b\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "auth.jwt_providers[1].issuer: \"i\" is also the issuer");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]},"
                    "{\"name\":\"a\",\"issuer\":\"j\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]",
                    "names must be unique");
  EXPECT_LOAD_ERROR("[]", "auth.jwt_providers: must be a non-empty list");
  EXPECT_LOAD_ERROR("{}", "auth.jwt_providers: must be a non-empty list");
  EXPECT_LOAD_ERROR("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"jwks_file\":\"missing.json\"}]",
                    "auth.jwt_providers[0].jwks_file: cannot open");

  /* Every error is reported, not only the first. */
  v = load_text("[{\"name\":\"\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                "\"keys\":[{\"alg\":\"HS256\",\"secret_file\":"
                "\"hmac_short.key\"}],\"bogus\":1}]",
                FIX, &e);
  CHECK(v == NULL && e.n == 3);
  CHECK(errs_have(&e, "[0].name: must be a non-empty string"));
  CHECK(errs_have(&e, ".bogus: unknown key"));
  CHECK(errs_have(&e, "keys[0].secret_file"));

  /* One provider's errors do not hide another's. */
  v = load_text("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                "\"bogus\":1,\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                "\"rsa1.pub.pem\"}]},"
                "{\"name\":\"b\",\"issuer\":\"j\",\"audiences\":[\"s\"]}]",
                FIX, &e);
  CHECK(v == NULL && e.n == 2);
  CHECK(errs_have(&e, "auth.jwt_providers[0].bogus: unknown key"));
  CHECK(errs_have(&e, "auth.jwt_providers[1]: no usable key"));

  /* Absolute paths ignore base_dir; a NULL report callback is fine. */
  json_t *j = json_loads("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":"
                         "[\"s\"],\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                         "\"" FIX "/rsa1.pub.pem\"}]}]",
                         0, NULL);
  v = NULL;
  CHECK(sg_jwt_providers_load(j, "/nonexistent", NULL, NULL, &v, NULL, NULL) ==
        0);
  CHECK(v != NULL && sg_jwt_verifier_provider_count(v) == 1);
  sg_jwt_verifier_unref(v);
  json_decref(j);
}

/* JWKS content problems, through files written to a temporary dir. */
static void test_jwks_errors(void) {
  char dir[] = "/tmp/sg_test_jwt_XXXXXX";
  if (mkdtemp(dir) == NULL) {
    printf("mkdtemp failed\n");
    check_failures++;
    return;
  }
  size_t len;
  unsigned char *good = read_all(FIX "/jwks.json", &len);
  json_t *jwks = json_loadb((const char *)good, len, 0, NULL);
  free(good);
  json_t *keys = json_object_get(jwks, "keys");
  json_t *rsa1 = json_array_get(keys, 0), *ec1 = json_array_get(keys, 2);

  static const char *const names[] = {
      "dup.json",      "priv.json",    "badb64.json",
      "offcurve.json", "eccoord.json", "mismatch.json",
      "notjwks.json",  "dupkeys.json", "onlyenc.json"};
  char path[256];
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    json_t *arr = json_array();
    json_t *k;
    switch (i) {
    case 0: /* duplicate kid */
      json_array_append(arr, rsa1);
      k = json_deep_copy(ec1);
      json_object_set_new(k, "kid", json_string("rsa-1"));
      json_array_append_new(arr, k);
      break;
    case 1: /* private material */
      k = json_deep_copy(ec1);
      json_object_set_new(k, "d", json_string("AAAA"));
      json_array_append_new(arr, k);
      break;
    case 2: /* padded base64 */
      k = json_deep_copy(rsa1);
      json_object_set_new(k, "e", json_string("AQAB===="));
      json_array_append_new(arr, k);
      break;
    case 3: /* point not on the curve */
      k = json_deep_copy(ec1);
      json_object_set_new(
          k, "y", json_string(json_string_value(json_object_get(ec1, "x"))));
      json_array_append_new(arr, k);
      break;
    case 4: /* short coordinate */
      k = json_deep_copy(ec1);
      json_object_set_new(k, "x", json_string("AAAA"));
      json_array_append_new(arr, k);
      break;
    case 5: /* alg that does not fit the key */
      k = json_deep_copy(rsa1);
      json_object_set_new(k, "alg", json_string("ES256"));
      json_array_append_new(arr, k);
      break;
    default:
      break;
    }
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    FILE *f = fopen(path, "w");
    if (i == 6)
      fputs("[1,2,3]", f);
    else if (i == 7)
      fputs("{\"keys\":[],\"keys\":[]}", f);
    else if (i == 8) {
      k = json_deep_copy(rsa1);
      json_object_set_new(k, "use", json_string("enc"));
      json_array_append_new(arr, k);
      json_t *root = json_pack("{s:O}", "keys", arr);
      json_dumpf(root, f, 0);
      json_decref(root);
    } else {
      json_t *root = json_pack("{s:O}", "keys", arr);
      json_dumpf(root, f, 0);
      json_decref(root);
    }
    fclose(f);
    json_decref(arr);
  }
  static const char *const want[] = {
      "keys[1]: duplicate kid \"rsa-1\"",
      "keys[0]: holds private key material",
      "keys[0]: \"e\" is not canonical unpadded base64url",
      "keys[0]: \"x\"/\"y\" are not a point on P-256",
      "keys[0]: \"x\" and \"y\" of a P-256 key must be 32 bytes",
      "keys[0]: alg \"ES256\" does not fit kty RSA",
      "must be a JWKS object",
      "duplicate object key",
      "no usable key"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    char *cfg = fmt("[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"jwks_file\":\"%s\"}]",
                    names[i]);
    struct errs e;
    sg_jwt_verifier *v = load_text(cfg, dir, &e);
    if (v != NULL || !errs_have(&e, want[i]) ||
        !errs_have(&e, "auth.jwt_providers[0]")) {
      fprintf(stderr, "%s:%d: %s: expected an error containing \"%s\"\n",
              __FILE__, __LINE__, names[i], want[i]);
      dump_errs(&e);
      check_failures++;
    }
    sg_jwt_verifier_unref(v);
    free(cfg);
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    unlink(path);
  }
  rmdir(dir);
  json_decref(jwks);

  /* "algorithms" filters JWKS keys instead of failing. */
  struct errs e;
  sg_jwt_verifier *v =
      load_text("[{\"name\":\"a\",\"issuer\":\"" JWKS "\",\"audiences\":"
                "[\"spark\"],\"jwks_file\":\"jwks.json\",\"algorithms\":"
                "[\"ES256\",\"ES384\"]}]",
                FIX, &e);
  CHECK(v != NULL);
  dump_errs(&e);
  CHECK_REASON(tryf(v, &S_EC256, hdr("ES256", "ec-1"), claims(JWKS, NULL)),
               SG_JWT_OK);
  CHECK_REASON(tryf(v, &S_RSA1, hdr("RS256", "rsa-1"), claims(JWKS, NULL)),
               SG_JWT_UNKNOWN_KID);
  sg_jwt_verifier_unref(v);
}

static void test_other_algs(void) {
  /* RS384/RS512/HS384/HS512 with their own pinned keys. */
  struct errs e;
  sg_jwt_verifier *v = load_text(
      "[{\"name\":\"a\",\"issuer\":\"" CORP "\",\"audiences\":[\"spark\"],"
      "\"keys\":[{\"kid\":\"a\",\"alg\":\"RS384\",\"pem_file\":\"rsa1.pub."
      "pem\"},"
      "{\"kid\":\"b\",\"alg\":\"RS512\",\"pem_file\":\"rsa2.pub.pem\"},"
      "{\"kid\":\"c\",\"alg\":\"HS384\",\"secret_file\":\"hmac.key\"},"
      "{\"kid\":\"d\",\"alg\":\"HS512\",\"secret_file\":\"hmac.key\"},"
      "{\"kid\":\"e\",\"alg\":\"ES384\",\"pem_file\":\"ec384.pub.pem\"}]}]",
      FIX, &e);
  CHECK(v != NULL);
  dump_errs(&e);
  if (v == NULL)
    return;
  signer s = S_RSA1;
  s.alg = "RS384";
  CHECK_REASON(tryf(v, &s, hdr("RS384", "a"), claims(CORP, NULL)), SG_JWT_OK);
  s = S_RSA2;
  s.alg = "RS512";
  CHECK_REASON(tryf(v, &s, hdr("RS512", "b"), claims(CORP, NULL)), SG_JWT_OK);
  s = S_HMAC;
  s.alg = "HS384";
  CHECK_REASON(tryf(v, &s, hdr("HS384", "c"), claims(CORP, NULL)), SG_JWT_OK);
  CHECK_REASON(tryf(v, &s, hdr("HS384", "d"), claims(CORP, NULL)),
               SG_JWT_BAD_ALG);
  s.alg = "HS512";
  CHECK_REASON(tryf(v, &s, hdr("HS512", "d"), claims(CORP, NULL)), SG_JWT_OK);
  CHECK_REASON(tryf(v, &S_EC384, hdr("ES384", "e"), claims(CORP, NULL)),
               SG_JWT_OK);
  /* The same with typ at+jwt, whose signature OpenSSL checks. */
  const struct {
    const signer *base;
    const char *alg, *kid;
  } at_jwt[] = {
      {&S_EC384, "ES384", "e"},
      {&S_HMAC, "HS512", "d"},
      {&S_RSA2, "RS512", "b"},
      {&S_RSA1, "RS384", "a"},
  };
  for (size_t i = 0; i < sizeof at_jwt / sizeof at_jwt[0]; i++) {
    s = *at_jwt[i].base;
    s.alg = at_jwt[i].alg;
    CHECK_REASON(tryf(v, &s,
                      fmt("{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"at+jwt\"}",
                          at_jwt[i].alg, at_jwt[i].kid),
                      claims(CORP, NULL)),
                 SG_JWT_OK);
  }
  s = S_HMAC;
  s.alg = "HS512";
  /* Right alg, right kid, wrong secret. */
  unsigned char wrong[64];
  memset(wrong, 'k', sizeof wrong);
  s.secret = wrong;
  CHECK_REASON(tryf(v, &s, hdr("HS512", "d"), claims(CORP, NULL)),
               SG_JWT_BAD_SIGNATURE);
  sg_jwt_verifier_unref(v);
}

struct thread_arg {
  sg_jwt_verifier *v;
  char *tok;
  int ok;
};

static void *thread_main(void *p) {
  struct thread_arg *a = p;
  for (int i = 0; i < 25; i++) {
    sg_jwt_result r;
    if (sg_jwt_verify(a->v, a->tok, strlen(a->tok), NOW, &r) == SG_JWT_OK &&
        strcmp(r.identity, "alice") == 0)
      a->ok++;
    sg_jwt_result_clear(&r);
  }
  sg_jwt_verifier_unref(a->v);
  return NULL;
}

static void test_threads_and_refs(sg_jwt_verifier *v) {
  struct thread_arg args[4];
  pthread_t th[4];
  static const char *const kids[] = {"r1", "e1", "h1", "c1"};
  const signer *signers[] = {&S_RSA1, &S_EC256, &S_HMAC, &S_EC256};
  static const char *const algs[] = {"RS256", "ES256", "HS256", "ES256"};
  for (int i = 0; i < 4; i++) {
    char *h = hdr(algs[i], kids[i]);
    char *p = claims(CORP, NULL);
    args[i].tok = mint(signers[i], h, p);
    free(h);
    free(p);
    args[i].v = sg_jwt_verifier_ref(v);
    args[i].ok = 0;
    pthread_create(&th[i], NULL, thread_main, &args[i]);
  }
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    CHECK(args[i].ok == 25);
    free(args[i].tok);
  }
  CHECK(sg_jwt_verifier_generation(v) != 0);
}

static void test_generation(void) {
  struct errs e;
  const char *cfg = "[{\"name\":\"a\",\"issuer\":\"i\",\"audiences\":[\"s\"],"
                    "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":"
                    "\"rsa1.pub.pem\"}]}]";
  sg_jwt_verifier *a = load_text(cfg, FIX, &e);
  sg_jwt_verifier *b = load_text(cfg, FIX, &e);
  CHECK(a && b &&
        sg_jwt_verifier_generation(a) != sg_jwt_verifier_generation(b));
  sg_jwt_verifier_unref(a);
  sg_jwt_verifier_unref(b);
  sg_jwt_verifier_unref(NULL);
}

static void init_signers(void) {
  S_RSA1 = (signer){"RS256", load_private("rsa1.key"), NULL, 0};
  S_RSA2 = (signer){"RS256", load_private("rsa2.key"), NULL, 0};
  S_EC256 = (signer){"ES256", load_private("ec256.key"), NULL, 0};
  S_EC384 = (signer){"ES384", load_private("ec384.key"), NULL, 0};
  size_t n;
  unsigned char *sec = read_all(FIX "/hmac.key", &n);
  if (n > 0 && sec[n - 1] == '\n') /* the loader strips one newline */
    n--;
  S_HMAC = (signer){"HS256", NULL, sec, n};
  unsigned char *pem = read_all(FIX "/rsa1.pub.pem", &n);
  S_HMAC_PEM = (signer){"HS256", NULL, pem, n};
}

static void free_signers(void) {
  EVP_PKEY_free(S_RSA1.pk);
  EVP_PKEY_free(S_RSA2.pk);
  EVP_PKEY_free(S_EC256.pk);
  EVP_PKEY_free(S_EC384.pk);
  free(S_HMAC.secret);
  free(S_HMAC_PEM.secret);
}

/* ---- network keys (issue 9) --------------------------------------------- */

#define NET "https://net.example"

/* The fixture JWKS reduced to the keys with these kids, as JSON text. */
static char *jwks_with(const char *const *kids, size_t n) {
  size_t len;
  unsigned char *buf = read_all(FIX "/jwks.json", &len);
  json_t *all = json_loadb((const char *)buf, len, 0, NULL);
  free(buf);
  json_t *keys = json_array();
  size_t i;
  json_t *k;
  json_array_foreach(json_object_get(all, "keys"), i, k) {
    const char *kid = json_string_value(json_object_get(k, "kid"));
    for (size_t j = 0; j < n; j++)
      if (kid != NULL && strcmp(kid, kids[j]) == 0)
        json_array_append(keys, k);
  }
  json_t *doc = json_pack("{s:o}", "keys", keys);
  char *text = json_dumps(doc, JSON_COMPACT);
  json_decref(doc);
  json_decref(all);
  return text;
}

static int wakes;
static void count_wake(void *arg) {
  (void)arg;
  wakes++;
}

static int finish(sg_jwt_keysource *ks, const char *doc, int64_t now) {
  char err[256];
  return sg_jwt_keysource_finish_fetch(ks, doc, doc ? strlen(doc) : 0, now,
                                       NULL, err, sizeof err);
}

static int net_try(const sg_jwt_verifier *v, const signer *s, const char *alg,
                   const char *kid) {
  return tryf(v, s, hdr(alg, kid), claims(NET, NULL));
}

static const char *const NET_PROVIDER =
    "[{\"name\":\"net\",\"issuer\":\"" NET "\",\"audiences\":[\"spark\"],"
    "\"jwks_url\":\"https://idp.invalid/jwks\",\"min_refetch_interval_s\":10}]";

static void test_network_keys(void) {
  static const char *const r1[] = {"rsa-1"};
  static const char *const r12[] = {"rsa-1", "rsa-2"};
  static const char *const r2[] = {"rsa-2"};
  char *doc1 = jwks_with(r1, 1), *doc12 = jwks_with(r12, 2),
       *doc2 = jwks_with(r2, 1);
  struct errs e;
  sg_jwt_verifier *v = load_text(NET_PROVIDER, FIX, &e);
  dump_errs(&e);
  CHECK(v != NULL);
  if (v == NULL)
    return;
  sg_jwt_keysource *ks = sg_jwt_verifier_keysource(v, 0);
  const sg_jwt_fetch_config *fc = sg_jwt_verifier_fetch_config(v, 0);
  CHECK(ks != NULL && fc != NULL);
  CHECK(strcmp(fc->jwks_url, "https://idp.invalid/jwks") == 0 &&
        !fc->discovery && fc->required && fc->tls != NULL &&
        fc->min_refetch_interval_s == 10 &&
        fc->min_refresh_s == SG_JWT_DEFAULT_MIN_REFRESH_S &&
        fc->max_refresh_s == SG_JWT_DEFAULT_MAX_REFRESH_S &&
        fc->fetch_timeout_ms == SG_JWT_DEFAULT_FETCH_TIMEOUT_MS &&
        fc->max_response_bytes == SG_JWT_DEFAULT_MAX_RESPONSE_BYTES);
  char missing[64];
  CHECK(!sg_jwt_verifier_keys_ready(v, missing, sizeof missing));
  CHECK(strcmp(missing, "net") == 0);
  sg_jwt_keysource_set_wake(ks, count_wake, NULL);

  /* No keys yet: transient, and a refetch is asked for once. */
  CHECK_REASON(net_try(v, &S_RSA1, "RS256", "rsa-1"), SG_JWT_KEYS_UNAVAILABLE);
  CHECK_REASON(net_try(v, &S_RSA1, "RS256", "rsa-1"), SG_JWT_KEYS_UNAVAILABLE);
  CHECK(wakes == 1);
  CHECK(sg_jwt_keysource_begin_fetch(ks, false));
  CHECK(!sg_jwt_keysource_begin_fetch(ks, true)); /* one in flight */
  CHECK_REASON(net_try(v, &S_RSA1, "RS256", "rsa-1"), SG_JWT_KEYS_UNAVAILABLE);
  CHECK(wakes == 1);
  int64_t t = sg_jwt_monotonic_ms();
  size_t n = 0;
  char err[256];
  CHECK(sg_jwt_keysource_finish_fetch(ks, doc1, strlen(doc1), t, &n, err,
                                      sizeof err) == 1);
  CHECK(n == 1);
  CHECK(sg_jwt_verifier_keys_ready(v, NULL, 0));
  uint64_t g1 = sg_jwt_verifier_key_generation(v, 0);
  CHECK(g1 != 0);

  char *tok1 = mint(&S_RSA1, "{\"alg\":\"RS256\",\"kid\":\"rsa-1\"}",
                    "{\"iss\":\"" NET "\",\"sub\":\"bob\",\"aud\":\"spark\","
                    "\"exp\":1700003600}");
  sg_jwt_result r;
  CHECK_REASON(verify_tok(v, tok1, &r), SG_JWT_OK);
  CHECK(r.provider_index == 0 && r.key_generation == g1);
  sg_jwt_result_clear(&r);

  /* Fresh set, unknown kid: 16, no refetch. */
  CHECK_REASON(net_try(v, &S_RSA2, "RS256", "rsa-2"), SG_JWT_UNKNOWN_KID);
  CHECK(wakes == 1);
  /* Same keys again: nothing moves. A bad document: the keys stay. */
  CHECK(sg_jwt_keysource_begin_fetch(ks, true));
  CHECK(finish(ks, doc1, t) == 0);
  CHECK(sg_jwt_verifier_key_generation(v, 0) == g1);
  CHECK(sg_jwt_keysource_begin_fetch(ks, true));
  CHECK(sg_jwt_keysource_finish_fetch(ks, "{\"keys\":7}", 10, t, &n, err,
                                      sizeof err) == -1);
  CHECK_STR_CONTAINS(err, "not a JWKS document");
  CHECK(n == 1);
  CHECK_REASON(net_try(v, &S_RSA1, "RS256", "rsa-1"), SG_JWT_OK);

  /* The refetch rules, on a made-up clock (interval 10 s). */
  uint64_t g = sg_jwt_verifier_key_generation(v, 0);
  CHECK(sg_jwt_keysource_unknown_kid(ks, g - 1, t) == SG_JWT_KEYS_RETRY);
  CHECK(sg_jwt_keysource_unknown_kid(ks, g, t + 1000) == SG_JWT_KEYS_DENY);
  CHECK(sg_jwt_keysource_unknown_kid(ks, g, t + 11000) == SG_JWT_KEYS_TRANSIENT);
  CHECK(wakes == 2);
  CHECK(sg_jwt_keysource_unknown_kid(ks, g, t + 11500) == SG_JWT_KEYS_TRANSIENT);
  CHECK(wakes == 2); /* requested already */
  CHECK(sg_jwt_keysource_begin_fetch(ks, false));
  CHECK(sg_jwt_keysource_unknown_kid(ks, g, t + 11600) == SG_JWT_KEYS_TRANSIENT);
  CHECK(finish(ks, NULL, t + 12000) == -1); /* the refetch failed */
  CHECK(sg_jwt_keysource_unknown_kid(ks, g, t + 13000) == SG_JWT_KEYS_TRANSIENT);
  CHECK(wakes == 2); /* rate-limited: not fresh, but asked 2 s ago */
  CHECK(!sg_jwt_keysource_begin_fetch(ks, false));
  CHECK(sg_jwt_keysource_unknown_kid(ks, g, t + 21001) == SG_JWT_KEYS_TRANSIENT);
  CHECK(wakes == 3);
  CHECK(sg_jwt_keysource_begin_fetch(ks, false));
  /* The rotation arrives: the new key verifies. */
  CHECK(finish(ks, doc12, sg_jwt_monotonic_ms()) == 1);
  CHECK(sg_jwt_verifier_key_generation(v, 0) != g);
  CHECK_REASON(net_try(v, &S_RSA2, "RS256", "rsa-2"), SG_JWT_OK);
  /* An HS256 token with an unknown kid never triggers a fetch: JWKS keys
   * here are RS/ES only. */
  CHECK_REASON(net_try(v, &S_HMAC, "HS256", "h-new"), SG_JWT_UNKNOWN_KID);
  sg_jwt_key_stats st;
  sg_jwt_keysource_get_stats(ks, &st);
  CHECK(st.fetches_ok == 3 && st.fetches_failed == 2 &&
        st.key_set_changes == 2 && st.refetches == 3 &&
        st.refetches_limited == 1 && st.unknown_kid_denied >= 2 &&
        st.n_keys == 2 && st.fetched);

  /* The token cache drops a result once its key set is replaced. */
  sg_token_cache *c = sg_token_cache_new(16, 300);
  CHECK_REASON(sg_token_cache_verify(c, v, tok1, strlen(tok1), NOW, &r),
               SG_JWT_OK);
  sg_jwt_result_clear(&r);
  CHECK_REASON(sg_token_cache_verify(c, v, tok1, strlen(tok1), NOW, &r),
               SG_JWT_OK);
  sg_jwt_result_clear(&r);
  sg_token_cache_stats cs;
  sg_token_cache_get_stats(c, &cs);
  CHECK(cs.hits == 1 && cs.key_changes == 0);
  CHECK(sg_jwt_keysource_begin_fetch(ks, true));
  CHECK(finish(ks, doc2, sg_jwt_monotonic_ms()) == 1); /* rsa-1 is gone */
  CHECK_REASON(sg_token_cache_verify(c, v, tok1, strlen(tok1), NOW, &r),
               SG_JWT_UNKNOWN_KID);
  sg_jwt_result_clear(&r);
  sg_token_cache_get_stats(c, &cs);
  CHECK(cs.hits == 1 && cs.key_changes == 1);
  sg_token_cache_free(c);

  /* A reload with the same provider takes over its key source; one with
   * a new URL starts from its keys; another issuer gets nothing. */
  sg_jwt_verifier *v2 = load_text(
      "[{\"name\":\"net\",\"issuer\":\"" NET "\",\"audiences\":[\"spark\"],"
      "\"jwks_url\":\"https://idp.invalid/jwks\",\"min_refetch_interval_s\":"
      "20,\"fetch_timeout_ms\":500}]",
      FIX, &e);
  sg_jwt_verifier *v3 = load_text(
      "[{\"name\":\"net\",\"issuer\":\"" NET "\",\"audiences\":[\"spark\"],"
      "\"jwks_url\":\"https://idp.invalid/v2/jwks\"}]",
      FIX, &e);
  sg_jwt_verifier *v4 = load_text(
      "[{\"name\":\"net\",\"issuer\":\"https://other.example\",\"audiences\":"
      "[\"spark\"],\"jwks_url\":\"https://idp.invalid/jwks\"}]",
      FIX, &e);
  CHECK(v2 && v3 && v4);
  if (v2 && v3 && v4) {
    CHECK(!sg_jwt_verifier_keys_ready(v2, NULL, 0));
    sg_jwt_verifier_adopt_keys(v2, v);
    sg_jwt_verifier_adopt_keys(v3, v);
    sg_jwt_verifier_adopt_keys(v4, v);
    CHECK(sg_jwt_verifier_keysource(v2, 0) == ks);
    CHECK(sg_jwt_verifier_keys_ready(v2, NULL, 0));
    CHECK_REASON(net_try(v2, &S_RSA2, "RS256", "rsa-2"), SG_JWT_OK);
    sg_jwt_keysource *ks3 = sg_jwt_verifier_keysource(v3, 0);
    CHECK(ks3 != ks && sg_jwt_keysource_has_keys(ks3));
    sg_jwt_keysource_get_stats(ks3, &st);
    CHECK(!st.fetched && st.n_keys == 1);
    CHECK_REASON(net_try(v3, &S_RSA2, "RS256", "rsa-2"), SG_JWT_OK);
    CHECK(!sg_jwt_verifier_keys_ready(v4, NULL, 0));
  }
  sg_jwt_verifier_unref(v4);
  sg_jwt_verifier_unref(v3);
  /* The key source outlives the verifier that made it. */
  sg_jwt_keysource_set_wake(ks, NULL, NULL);
  sg_jwt_verifier_unref(v);
  if (v2 != NULL)
    CHECK_REASON(net_try(v2, &S_RSA2, "RS256", "rsa-2"), SG_JWT_OK);
  sg_jwt_verifier_unref(v2);
  free(tok1);
  free(doc1);
  free(doc12);
  free(doc2);
}

static void test_network_fallback_and_errors(void) {
  struct errs e;
  sg_jwt_verifier *v = load_text(
      "[{\"name\":\"fb\",\"issuer\":\"" NET "\",\"audiences\":[\"spark\"],"
      "\"discovery\":false,\"jwks_url\":\"https://idp.invalid/jwks\","
      "\"fallback_jwks_file\":\"jwks.json\",\"algorithms\":[\"RS256\"],"
      "\"required\":false,\"ca_file\":\"ec256.crt\"}]",
      FIX, &e);
  dump_errs(&e);
  CHECK(v != NULL);
  if (v != NULL) {
    sg_jwt_keysource *ks = sg_jwt_verifier_keysource(v, 0);
    sg_jwt_key_stats st;
    sg_jwt_keysource_get_stats(ks, &st);
    CHECK(st.n_keys == 2 && !st.fetched); /* rsa-1, rsa-2 (RS256 only) */
    CHECK(!sg_jwt_verifier_fetch_config(v, 0)->required);
    CHECK(sg_jwt_verifier_keys_ready(v, NULL, 0));
    CHECK_REASON(net_try(v, &S_RSA1, "RS256", "rsa-1"), SG_JWT_OK);
    /* ES256 is not in "algorithms": no refetch could help. */
    CHECK_REASON(net_try(v, &S_EC256, "ES256", "ec-1"), SG_JWT_UNKNOWN_KID);
    /* A fallback set is not fresh: an unknown kid asks for a refetch. */
    CHECK_REASON(net_try(v, &S_RSA1, "RS256", "rsa-9"), SG_JWT_KID_REFETCHING);
    sg_jwt_keysource_get_stats(ks, &st);
    CHECK(st.refetches == 1);
    sg_jwt_verifier_unref(v);
  }
  /* Discovery loads from the issuer URL. */
  v = load_text("[{\"name\":\"d\",\"issuer\":\"https://idp.example/realms/x\","
                "\"audiences\":[\"spark\"],\"discovery\":true}]",
                FIX, &e);
  dump_errs(&e);
  CHECK(v != NULL && sg_jwt_verifier_fetch_config(v, 0)->discovery &&
        sg_jwt_verifier_fetch_config(v, 0)->jwks_url == NULL);
  sg_jwt_verifier_unref(v);

#define NETP "[{\"name\":\"n\",\"issuer\":\"https://i.example\",\"audiences\":" \
             "[\"s\"],"
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"http://i.example/jwks\"}]",
                    "jwks_url: \"http://i.example/jwks\" is not an https:// URL");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j#x\"}]",
                    "has a #fragment");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":5}]", "jwks_url: must be a non-empty string");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"jwks_file\":"
                         "\"jwks.json\"}]",
                    "auth.jwt_providers[0].jwks_file: not with \"jwks_url\"");
  EXPECT_LOAD_ERROR(NETP "\"discovery\":\"yes\"}]", "discovery: must be true or false");
  EXPECT_LOAD_ERROR("[{\"name\":\"n\",\"issuer\":\"idp\",\"audiences\":[\"s\"],"
                    "\"discovery\":true}]",
                    "auth.jwt_providers[0].issuer: with \"discovery\": true");
  EXPECT_LOAD_ERROR(NETP "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}],"
                         "\"min_refresh_s\":5}]",
                    "min_refresh_s: only applies to keys fetched over HTTPS");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"min_refresh_s\":"
                         "100,\"max_refresh_s\":50}]",
                    "min_refresh_s: 100 is above max_refresh_s (50)");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"algorithms\":"
                         "[\"HS256\"]}]",
                    "keys fetched from an identity provider are RS* or ES*");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"ca_file\":"
                         "\"nope.pem\"}]",
                    "ca_file: cannot read");
  /* A file that is there but holds no certificate. */
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"ca_file\":"
                         "\"hmac.key\"}]",
                    "ca_file: cannot load CA certificates from");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"algorithms\":"
                         "[\"RS384\"],\"fallback_jwks_file\":\"jwks.json\"}]",
                    "fallback_jwks_file: no usable key");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"required\":1}]",
                    "required: must be true or false");
  EXPECT_LOAD_ERROR(NETP "\"jwks_url\":\"https://i.example/j\",\"fetch_timeout_ms\":"
                         "10}]",
                    "fetch_timeout_ms: must be an integer from 100");
#undef NETP
}

static void test_parse_fetched(void) {
  size_t len;
  unsigned char *buf = read_all(FIX "/jwks.json", &len);
  sg_jwk *keys = NULL;
  size_t n = 0, ignored = 0;
  char err[256];
  /* Encryption and OKP keys are skipped, the rest is used. */
  CHECK(sg_jwks_parse_fetched((const char *)buf, len, 0, "t", &keys, &n,
                              &ignored, err, sizeof err) == 0);
  CHECK(n == 4 && ignored == 2);
  for (size_t i = 0; i < n; i++)
    sg_jwk_clear(&keys[i]);
  free(keys);
  unsigned mask = SG_JWK_ALG_BIT(sg_jwk_alg_parse("ES256"));
  CHECK(sg_jwks_parse_fetched((const char *)buf, len, mask, "t", &keys, &n,
                              &ignored, err, sizeof err) == 0);
  CHECK(n == 1 && ignored == 5 && strcmp(keys[0].kid, "ec-1") == 0);
  sg_jwk k0 = keys[0];
  CHECK(sg_jwk_equal(&k0, &keys[0]));
  for (size_t i = 0; i < n; i++)
    sg_jwk_clear(&keys[i]);
  free(keys);
  json_t *all = json_loadb((const char *)buf, len, 0, NULL);
  free(buf);
  json_t *arr = json_object_get(all, "keys");
  json_t *rsa1 = json_array_get(arr, 0), *ec1 = json_array_get(arr, 2);

  struct {
    json_t *doc;
    int rc;
    size_t n;
    const char *err;
  } cases[8];
  json_t *k;
  /* 0: a private key refuses the whole document */
  k = json_deep_copy(ec1);
  json_object_set_new(k, "d", json_string("AAAA"));
  cases[0].doc = json_pack("{s:[O,o]}", "keys", rsa1, k);
  cases[0].rc = -1;
  cases[0].err = "keys[1] holds private key material";
  /* 1: duplicate kid among usable keys */
  k = json_deep_copy(ec1);
  json_object_set_new(k, "kid", json_string("rsa-1"));
  cases[1].doc = json_pack("{s:[O,o]}", "keys", rsa1, k);
  cases[1].rc = -1;
  cases[1].err = "keys[1]: duplicate kid \"rsa-1\"";
  /* 2: a conflicting alg and a non-object are skipped */
  k = json_deep_copy(rsa1);
  json_object_set_new(k, "alg", json_string("ES256"));
  json_object_set_new(k, "kid", json_string("bad"));
  cases[2].doc = json_pack("{s:[o,i,O]}", "keys", k, 7, ec1);
  cases[2].rc = 0;
  cases[2].n = 1;
  /* 3: without kid among several keys: dropped */
  k = json_deep_copy(rsa1);
  json_object_del(k, "kid");
  cases[3].doc = json_pack("{s:[o,O]}", "keys", k, ec1);
  cases[3].rc = 0;
  cases[3].n = 1;
  /* 4: alone without kid: kept */
  k = json_deep_copy(rsa1);
  json_object_del(k, "kid");
  cases[4].doc = json_pack("{s:[o]}", "keys", k);
  cases[4].rc = 0;
  cases[4].n = 1;
  /* 5: nothing usable */
  k = json_deep_copy(rsa1);
  json_object_set_new(k, "use", json_string("enc"));
  cases[5].doc = json_pack("{s:[o]}", "keys", k);
  cases[5].rc = -1;
  cases[5].err = "no usable signing key";
  /* 6: too many entries */
  json_t *many = json_array();
  for (int i = 0; i < 300; i++)
    json_array_append_new(many, json_integer(i));
  cases[6].doc = json_pack("{s:o}", "keys", many);
  cases[6].rc = -1;
  cases[6].err = "at most 256";
  /* 7: not a JWKS */
  cases[7].doc = json_pack("{s:s}", "issuer", "x");
  cases[7].rc = -1;
  cases[7].err = "not a JWKS document";
  for (size_t i = 0; i < 8; i++) {
    char *text = json_dumps(cases[i].doc, JSON_COMPACT);
    err[0] = '\0';
    int rc = sg_jwks_parse_fetched(text, strlen(text), 0, "t", &keys, &n, NULL,
                                   err, sizeof err);
    if (rc != cases[i].rc || (rc == 0 && n != cases[i].n) ||
        (rc != 0 && strstr(err, cases[i].err) == NULL)) {
      fprintf(stderr, "%s:%d: case %zu: rc %d n %zu err \"%s\"\n", __FILE__,
              __LINE__, i, rc, n, err);
      check_failures++;
    }
    check_count++;
    for (size_t j = 0; rc == 0 && j < n; j++)
      sg_jwk_clear(&keys[j]);
    if (rc == 0)
      free(keys);
    free(text);
    json_decref(cases[i].doc);
  }
  CHECK(sg_jwks_parse_fetched("{\"keys\":[],\"keys\":[]}", 21, 0, "t", &keys,
                              &n, NULL, err, sizeof err) == -1);
  CHECK_STR_CONTAINS(err, "not valid JSON");
  CHECK(sg_jwks_parse_fetched("{\"ke", 4, 0, "t", &keys, &n, NULL, err,
                              sizeof err) == -1 &&
        keys == NULL && n == 0);
  json_decref(all);
}

/* Workers verify while the key set is swapped under them. */
struct swap_arg {
  const sg_jwt_verifier *v;
  const char *tok;
  int ok;
};

static void *swap_verifier(void *p) {
  struct swap_arg *a = p;
  for (int i = 0; i < 300; i++) {
    sg_jwt_result r;
    if (sg_jwt_verify(a->v, a->tok, strlen(a->tok), NOW, &r) == SG_JWT_OK)
      a->ok++;
    sg_jwt_result_clear(&r);
  }
  return NULL;
}

static void test_swap_under_load(void) {
  static const char *const r1[] = {"rsa-1"};
  static const char *const r12[] = {"rsa-1", "rsa-2"};
  char *doc1 = jwks_with(r1, 1), *doc12 = jwks_with(r12, 2);
  struct errs e;
  sg_jwt_verifier *v = load_text(NET_PROVIDER, FIX, &e);
  CHECK(v != NULL);
  if (v == NULL)
    return;
  sg_jwt_keysource *ks = sg_jwt_verifier_keysource(v, 0);
  CHECK(sg_jwt_keysource_begin_fetch(ks, true));
  CHECK(finish(ks, doc1, 0) == 1);
  char *h = hdr("RS256", "rsa-1"), *c = claims(NET, NULL);
  char *tok = mint(&S_RSA1, h, c);
  free(h);
  free(c);
  struct swap_arg args[3];
  pthread_t th[3];
  for (int i = 0; i < 3; i++) {
    args[i] = (struct swap_arg){v, tok, 0};
    pthread_create(&th[i], NULL, swap_verifier, &args[i]);
  }
  int changes = 0;
  for (int i = 0; i < 200; i++) {
    if (sg_jwt_keysource_begin_fetch(ks, true))
      changes += finish(ks, i % 2 ? doc1 : doc12, 0) == 1;
  }
  for (int i = 0; i < 3; i++) {
    pthread_join(th[i], NULL);
    CHECK(args[i].ok == 300);
  }
  CHECK(changes == 200);
  free(tok);
  free(doc1);
  free(doc12);
  sg_jwt_verifier_unref(v);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  init_signers();
  test_b64url();
  test_reason_names();

  struct errs e;
  sg_jwt_verifier *v = load_text(MAIN_CONFIG, FIX, &e);
  CHECK(v != NULL);
  dump_errs(&e);
  if (v == NULL) {
    printf("cannot continue without the main verifier\n");
    return 1;
  }
  CHECK(sg_jwt_verifier_provider_count(v) == 3);
  CHECK(sg_jwt_verifier_max_token_bytes(v) == SG_JWT_DEFAULT_MAX_TOKEN_BYTES);

  test_valid_tokens(v);
  test_jwks(v);
  test_times(v);
  test_numeric_claims(v);
  test_issuer_audience(v);
  test_alg_attacks(v);
  test_tampering(v);
  test_ec_signature_forms(v);
  test_access_token_typ(v);
  test_duplicates(v);
  test_oversized(v);
  test_required_claims(v);
  test_threads_and_refs(v);
  sg_jwt_verifier_unref(v);

  test_load_errors();
  test_keys_parsed_at_load();
  test_jwks_errors();
  test_other_algs();
  test_generation();
  test_network_keys();
  test_network_fallback_and_errors();
  test_parse_fetched();
  test_swap_under_load();
  free_signers();

  return check_report("test_jwt");
}
