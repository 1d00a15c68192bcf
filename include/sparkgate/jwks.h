/* Key material for JWT verification: PEM public keys, HMAC secret files and
 * JWKS files, each pinned to one algorithm and held as what verifies it:
 * an RSA/EC key parsed once (with its "PUBLIC KEY" PEM, by which reloads
 * compare keys), or the raw HMAC secret libjwt 1.10 takes. Also the strict
 * base64url decoder the verifier uses, because libjwt's own decoder
 * accepts padding, garbage and non-canonical input.
 *
 * Everything here runs at load time except sg_b64url_decode. Nothing here
 * logs key bytes. */
#ifndef SPARKGATE_JWKS_H
#define SPARKGATE_JWKS_H

#include <jansson.h>
#include <openssl/types.h>
#include <stddef.h>

/* Largest file we read as a PEM key or HMAC secret, and as a JWKS. */
#define SG_JWK_MAX_KEY_FILE_BYTES (64u * 1024u)
#define SG_JWKS_MAX_FILE_BYTES (1024u * 1024u)
/* RSA moduli below this are refused: 1024-bit RSA is breakable. */
#define SG_JWK_MIN_RSA_BITS 2048

/* One verification key, pinned to exactly one algorithm. */
typedef struct sg_jwk {
  char *kid;               /* owned; NULL when the key has none */
  char alg[8];             /* exact JOSE name: "RS256", "ES384", "HS512", ... */
  int jwt_alg;             /* the same as libjwt's jwt_alg_t */
  int is_hmac;             /* material is a secret, not a PEM */
  unsigned char *material; /* owned; PEM text (NUL-terminated) or secret */
  size_t material_len;     /* PEM without its NUL, or the secret */
  size_t sig_len;          /* exact raw signature length for this key */
  /* Owned; the public key parsed once, at load (NULL for HMAC): parsing
   * the PEM is 350 us of OpenSSL 3's decoder, verifying with it 25-100. */
  EVP_PKEY *pkey;
} sg_jwk;

/* Same shape as sg_jwt_report_fn: receives one complete error message. */
typedef void (*sg_jwks_report_fn)(void *ctx, const char *msg);

/* Frees what *k owns and zeroes it (HMAC secrets are wiped first). */
void sg_jwk_clear(sg_jwk *k);

/* Maps an exact, case-sensitive JOSE name among the supported ones
 * (RS256/384/512, ES256/384, HS256/384/512) to libjwt's jwt_alg_t; -1 for
 * anything else, including "none" and "rs256". */
int sg_jwk_alg_parse(const char *name);

/* Reads a PEM "PUBLIC KEY" (or a "CERTIFICATE", whose key is taken) and
 * checks it fits `alg`: RSA of at least SG_JWK_MIN_RSA_BITS for RS*, EC
 * P-256 for ES256, P-384 for ES384. On error fills err with what is wrong
 * and how to fix it, and returns -1. */
int sg_jwk_from_pem_file(const char *path, const char *alg, sg_jwk *out,
                         char *err, size_t errlen);

/* Reads an HMAC secret: the file's bytes, minus one trailing "\n" or
 * "\r\n" (so `openssl rand -hex 32 > file` works). Refused when shorter
 * than the hash output of `alg` (32/48/64 bytes for HS256/384/512). */
int sg_jwk_from_secret_file(const char *path, const char *alg, sg_jwk *out,
                            char *err, size_t errlen);

/* Converts one JWK object (kty RSA with n/e, or EC P-256/P-384 with
 * crv/x/y) to a pinned key. Returns 0 on success, 1 when the key is to be
 * ignored (use other than "sig", unsupported kty/crv/alg) with the reason
 * in err, -1 on an error in err. The alg is the JWK's "alg" when present
 * (it must agree with the key); without one, EC keys take their curve's
 * algorithm and RSA keys RS256. */
int sg_jwk_from_json(const json_t *jwk, sg_jwk *out, char *err, size_t errlen);

/* Loads every usable key of a JWKS file ({"keys":[...]}) into a new array
 * (*keys, *n_keys; free each with sg_jwk_clear, then the array). Each
 * problem is reported as "<path_for_errors>: <file>: keys[i]: ...".
 * Duplicate kids among the usable keys are errors. Returns 0, or -1 when
 * anything was reported (then nothing is returned). */
int sg_jwks_load_file(const char *file, const char *path_for_errors,
                      sg_jwk **keys, size_t *n_keys, sg_jwks_report_fn report,
                      void *report_ctx);

/* Most entries of a fetched JWKS we look at: a bound on the work one
 * document can cause (each usable key costs a public-key check). */
#define SG_JWKS_MAX_FETCHED_KEYS 256u

/* The bit of `jwt_alg` (libjwt's jwt_alg_t, as sg_jwk_alg_parse returns)
 * in an algorithm mask. A mask of 0 allows every algorithm. */
#define SG_JWK_ALG_BIT(jwt_alg) (1u << (unsigned)(jwt_alg))

/* True when both keys are the same key: kid, alg and material. */
int sg_jwk_equal(const sg_jwk *a, const sg_jwk *b);

/* Parses a JWKS document fetched from an identity provider (`len` bytes,
 * no NUL needed). Unlike a file the operator wrote, an identity provider's
 * set routinely holds keys we cannot use (encryption keys, EdDSA, RSA
 * below 2048 bits, an "alg" that does not fit the key, one outside
 * alg_mask): those are ignored, each logged under `label`, and the rest
 * is used. "x5c" and "x5t" are never used: the key is "n","e" or "x","y". In
 * a set of several usable keys, keys without "kid" can never be chosen and
 * are ignored too. The whole document fails (-1, reason in err) when it is
 * not JSON (duplicate member names included), not {"keys": [...]}, holds
 * more than SG_JWKS_MAX_FETCHED_KEYS entries, publishes private key
 * material, gives one kid to two usable keys, or leaves no usable key.
 * On success *keys and *n_keys receive the keys (free each with sg_jwk_clear,
 * then the array) and *n_ignored (may be NULL) how many were skipped. */
int sg_jwks_parse_fetched(const char *buf, size_t len, unsigned alg_mask,
                          const char *label, sg_jwk **keys, size_t *n_keys,
                          size_t *n_ignored, char *err, size_t errlen);

/* Strict base64url (RFC 7515 §2): alphabet A-Z a-z 0-9 - _, no padding,
 * no whitespace, length % 4 != 1, and the unused low bits of the last
 * character must be zero, so every byte string has exactly one accepted
 * encoding. Writes at most sg_b64url_decoded_max(len) bytes to out.
 * Returns the decoded length, or -1 when the input is not canonical. */
long sg_b64url_decode(const char *in, size_t len, unsigned char *out);
size_t sg_b64url_decoded_max(size_t len);

#endif
