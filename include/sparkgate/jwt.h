/* JWT bearer-token verification (issue 4).
 *
 * libjwt 1.10 only checks a signature, and it does that with the algorithm
 * the token names, case-insensitively, after parsing JSON that may hold
 * duplicate keys, and with an alloca sized by the token. This module does
 * everything around it: a length cap first, a strict parse of header and
 * payload, exact per-key algorithm pinning, and all claim checks. libjwt is
 * called last, only to check the signature with the one key we chose.
 *
 * A verifier is built once from configuration, never changes, and is shared
 * read-only by all worker threads (refcounted). A reload builds a new one
 * and swaps it; loading has no side effect but debug log lines, so a failed
 * load leaves the running one untouched.
 *
 * Provider JSON (one element of the array given to sg_jwt_providers_load):
 *   {
 *     "name": "corp",                      required, unique
 *     "issuer": "https://idp.example",     required, exact "iss", unique
 *     "audiences": ["spark"],              required, non-empty; "aud" must
 *                                          contain (or be) one of them
 *     "keys": [                            optional list of static keys
 *       {"kid": "k1", "alg": "RS256", "pem_file": "k1.pem"},
 *       {"alg": "HS256", "secret_file": "hmac.key"}
 *     ],
 *     "jwks_file": "jwks.json",            optional local JWKS file
 *     "algorithms": ["RS256", "ES256"],    optional: keys[] must use these;
 *                                          JWKS keys with others are ignored
 *     "leeway_s": 60,                      clock skew, 0..3600, default 60
 *     "max_lifetime_s": 86400,             optional bound on exp - iat
 *     "identity_claim": "sub",             default "sub"
 *     "required_claims": {                 optional; name -> value or
 *       "groups": ["spark-users"],         [one-of values]; a claim that is
 *       "tenant": "acme"                   an array matches if any element
 *     }                                    does. Values: strings, integers
 *   }                                      or booleans, compared exactly.
 * At least one key in all (keys + jwks_file). A provider with several keys
 * needs a kid on each; a token without kid is accepted only when its
 * provider has exactly one key (and a provider's single key configured
 * without kid takes any kid). Relative file names are resolved against
 * base_dir. Supported algorithms (exact spelling): RS256 RS384 RS512 ES256
 * ES384 HS256 HS384 HS512.
 *
 * Known limit of libjwt 1.10: a header "typ" other than "JWT"
 * (case-insensitive), e.g. "at+jwt", is refused (reason "bad_typ").
 *
 * Tokens are never logged, copied into messages or kept, only their
 * verified result. */
#ifndef SPARKGATE_JWT_H
#define SPARKGATE_JWT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define SG_JWT_DEFAULT_MAX_TOKEN_BYTES 8192u
#define SG_JWT_DEFAULT_LEEWAY_S 60
#define SG_JWT_MAX_LEEWAY_S 3600
/* Longest identity we accept; it ends up in logs and upstream headers. */
#define SG_JWT_MAX_IDENTITY_BYTES 512u

/* Why a token was refused. 0 is success; every other value has a stable
 * short name (sg_jwt_reason_name) for logs and metric labels. New reasons
 * are appended, so values stay stable too. */
typedef enum sg_jwt_reason {
  SG_JWT_OK = 0,
  SG_JWT_MALFORMED,         /* "malformed": not three canonical base64url
                               parts of JSON objects, bad claim types */
  SG_JWT_TOO_LONG,          /* "too_long": over max_token_bytes */
  SG_JWT_UNKNOWN_ISSUER,    /* "unknown_issuer": no provider has this iss */
  SG_JWT_BAD_ALG,           /* "bad_alg": none, or not the key's alg */
  SG_JWT_UNKNOWN_KID,       /* "unknown_kid": no such key (or no kid and
                               several keys) */
  SG_JWT_BAD_SIGNATURE,     /* "bad_signature" */
  SG_JWT_EXPIRED,           /* "expired": now >= exp + leeway */
  SG_JWT_NOT_YET_VALID,     /* "not_yet_valid": now + leeway < nbf */
  SG_JWT_ISSUED_IN_FUTURE,  /* "issued_in_future": iat > now + leeway */
  SG_JWT_LIFETIME_TOO_LONG, /* "lifetime_too_long": exp - iat > max */
  SG_JWT_WRONG_AUDIENCE,    /* "wrong_audience" */
  SG_JWT_MISSING_CLAIM,     /* "missing_claim": exp, iss, aud, iat when
                               bounded, a required claim, the identity */
  SG_JWT_CLAIM_MISMATCH,    /* "claim_mismatch": a required claim differs */
  SG_JWT_CRIT_UNSUPPORTED,  /* "crit_unsupported": header has "crit" */
  SG_JWT_BAD_TYP,           /* "bad_typ": header typ is not "JWT" */
  SG_JWT_BAD_IDENTITY,      /* "bad_identity": identity claim not a
                               non-empty printable string, or too long */
  SG_JWT_INTERNAL,          /* "internal": out of memory, bad arguments */
  SG_JWT_REASON_COUNT
} sg_jwt_reason;

typedef struct sg_jwt_verifier sg_jwt_verifier;

/* Receives one complete error message (JSON path, problem, fix). */
typedef void (*sg_jwt_report_fn)(void *ctx, const char *msg);

/* Settings that are not per provider. Zeroed fields take the defaults. */
typedef struct sg_jwt_options {
  size_t max_token_bytes; /* 0 -> SG_JWT_DEFAULT_MAX_TOKEN_BYTES */
} sg_jwt_options;

/* What a verified token says. Every pointer member is owned by the result
 * and released by sg_jwt_result_clear. `claims` is a jansson reference
 * that may be shared with copies (sg_jwt_result_copy, the token cache):
 * treat it as read-only, and only within the thread that owns the result.
 */
typedef struct sg_jwt_result {
  char *identity;     /* value of the provider's identity claim */
  char *provider;     /* provider name */
  int64_t exp;        /* token expiry, seconds since the epoch */
  int64_t iat;        /* issued-at, or -1 when absent */
  json_t *claims;     /* the whole payload object */
  char *cnf_x5t_s256; /* "cnf":{"x5t#S256":...} (RFC 8705), else NULL */
  const char *detail; /* on failure: static text saying which check failed
                         (never token content); NULL on success */
} sg_jwt_result;

/* Builds a verifier from a JSON array of providers. Each problem is passed
 * to report (may be NULL) as "<json_path_prefix>[i].<key>...: problem;
 * fix", and loading goes on so that all problems are reported. base_dir
 * (may be NULL = current directory) resolves relative file names; opts may
 * be NULL. Returns 0 with *out holding one reference, or -1 (then *out is
 * NULL) when anything was reported. */
int sg_jwt_providers_load(json_t *providers, const char *base_dir,
                          const char *json_path_prefix,
                          const sg_jwt_options *opts, sg_jwt_verifier **out,
                          sg_jwt_report_fn report, void *report_ctx);

/* Thread-safe (atomic) reference counting. _ref returns v. */
sg_jwt_verifier *sg_jwt_verifier_ref(sg_jwt_verifier *v);
void sg_jwt_verifier_unref(sg_jwt_verifier *v);

/* A number unique to each successfully loaded verifier in this process;
 * caches use it to drop results verified under an older configuration. */
uint64_t sg_jwt_verifier_generation(const sg_jwt_verifier *v);
size_t sg_jwt_verifier_max_token_bytes(const sg_jwt_verifier *v);
size_t sg_jwt_verifier_provider_count(const sg_jwt_verifier *v);

/* Verifies `len` bytes of `token` (no NUL needed; the bytes after
 * "Bearer "), as of `now` (seconds since the epoch). Returns SG_JWT_OK and
 * fills *out, or a reason (then *out holds only `detail`). *out is
 * overwritten without being cleared first: clear it before reuse. Safe to
 * call from many threads on one verifier. Costs a public-key operation;
 * see token_cache.h to avoid repeating it. */
int sg_jwt_verify(const sg_jwt_verifier *v, const char *token, size_t len,
                  int64_t now, sg_jwt_result *out);

/* "malformed", "too_long", ...; "unknown" for values out of range. */
const char *sg_jwt_reason_name(int reason);

/* Releases what *r owns and zeroes it. */
void sg_jwt_result_clear(sg_jwt_result *r);
/* Deep-copies the strings and takes a new reference to claims. 0 or -1. */
int sg_jwt_result_copy(sg_jwt_result *dst, const sg_jwt_result *src);

#endif
