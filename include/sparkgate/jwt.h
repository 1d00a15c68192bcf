/* JWT bearer-token verification (issue 4).
 *
 * libjwt 1.10 only checks a signature, and it does that with the algorithm
 * the token names, case-insensitively, after parsing JSON that may hold
 * duplicate keys, and with an alloca sized by the token. This module does
 * everything around it: a length cap first, a strict parse of header and
 * payload, exact per-key algorithm pinning, and all claim checks. The
 * signature is checked last, with the one key we chose: by libjwt for
 * HMAC keys; for RSA and EC keys by OpenSSL, with the key parsed once at
 * load (libjwt would parse its PEM again for every token, 350 us).
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
 *     "jwks_url": "https://idp/jwks",      or keys fetched over HTTPS (see
 *     "discovery": true,                   "Network keys" below); these two
 *                                          exclude keys and jwks_file
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
 * At least one key in all (keys + jwks_file), unless the keys come from
 * the network (then a provider may start with none). A provider with
 * several keys needs a kid on each; a token without kid is accepted only
 * when its provider has exactly one key (and a provider's single key
 * configured without kid takes any kid). Relative file names are resolved
 * against base_dir. Supported algorithms (exact spelling): RS256 RS384
 * RS512 ES256 ES384 HS256 HS384 HS512.
 *
 * Network keys (issue 9). With "jwks_url", or "discovery": true (the JWKS
 * URL is the "jwks_uri" of ISSUER/.well-known/openid-configuration, whose
 * "issuer" must equal ours exactly), the provider's keys come from its
 * identity provider, fetched by keyfetch.c on the main thread. Options,
 * only with one of those two:
 *     "ca_file": "idp-ca.pem"              trust for the HTTPS fetch
 *                                          (default: the system store)
 *     "fallback_jwks_file": "f.json"       keys in force until the first
 *                                          successful fetch
 *     "required": true                     /readyz waits for its keys
 *     "connect_timeout_ms": 5000, "fetch_timeout_ms": 10000,
 *     "max_response_bytes": 1048576,
 *     "min_refresh_s": 60, "max_refresh_s": 600,  Cache-Control max-age,
 *                                          clamped to these; else max
 *     "min_refetch_interval_s": 30         at most one refetch for an
 *                                          unknown kid per interval
 * Such a provider owns a key source (sg_jwt_keysource): its current key
 * set behind a mutex, swapped whole by the fetcher, referenced by a
 * verification only for its duration. A verifier built by a reload adopts
 * the key source of the running one when the provider's name, issuer,
 * URL/discovery and algorithms are unchanged (sg_jwt_verifier_adopt_keys),
 * so a reload neither refetches nor drops keys.
 *
 * Header "typ": absent, "JWT", "at+jwt", "application/at+jwt" or
 * "application/jwt" (case-insensitive; RFC 9068 access tokens say
 * "at+jwt"); any other is refused (reason "bad_typ"). libjwt 1.10 refuses
 * every typ but "JWT" before checking the signature, so HMAC tokens of
 * the others are checked with OpenSSL directly, the same check.
 *
 * Tokens are never logged, copied into messages or kept, only their
 * verified result. */
#ifndef SPARKGATE_JWT_H
#define SPARKGATE_JWT_H

#include <jansson.h>
#include <stdbool.h>
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
  SG_JWT_BAD_TYP,           /* "bad_typ": header typ not a JWT's */
  SG_JWT_BAD_IDENTITY,      /* "bad_identity": identity claim not a
                               non-empty string of printable ASCII without
                               leading or trailing space, or too long */
  SG_JWT_INTERNAL,          /* "internal": out of memory, bad arguments */
  SG_JWT_KEYS_UNAVAILABLE,  /* "keys_unavailable": the provider has no keys
                               yet (network keys not fetched so far):
                               transient, answer UNAVAILABLE (14) */
  SG_JWT_KID_REFETCHING,    /* "kid_refetching": kid unknown, and a refetch
                               of the provider's keys was triggered or is
                               in flight, or the last one failed: transient,
                               answer UNAVAILABLE (14) */
  SG_JWT_CNF_UNSUPPORTED,   /* "cnf_unsupported": cnf present without
                               x5t#S256 (bound to a key, e.g. DPoP jkt,
                               whose possession is not checked) */
  SG_JWT_REASON_COUNT
} sg_jwt_reason;

typedef struct sg_jwt_verifier sg_jwt_verifier;
typedef struct sg_jwt_keysource sg_jwt_keysource;

struct ssl_ctx_st;

/* Defaults and bounds of the network-key options. */
#define SG_JWT_DEFAULT_CONNECT_TIMEOUT_MS 5000u
#define SG_JWT_DEFAULT_FETCH_TIMEOUT_MS 10000u
#define SG_JWT_DEFAULT_MAX_RESPONSE_BYTES (1024u * 1024u)
#define SG_JWT_DEFAULT_MIN_REFRESH_S 60u
#define SG_JWT_DEFAULT_MAX_REFRESH_S 600u
#define SG_JWT_DEFAULT_MIN_REFETCH_INTERVAL_S 30u

/* How a provider fetches its keys. Owned by the verifier; the strings and
 * `tls` live as long as it does (SSL_CTX_up_ref to keep `tls` longer). */
typedef struct sg_jwt_fetch_config {
  const char *provider;        /* provider name */
  const char *issuer;
  const char *jwks_url;        /* NULL with discovery */
  bool discovery;              /* jwks_uri from the issuer's discovery doc */
  const char *ca_file;         /* resolved path; NULL: system trust store */
  struct ssl_ctx_st *tls;      /* client context with that trust, built at
                                  load so that a bad ca_file fails the load */
  uint32_t connect_timeout_ms; /* connect, and any wait for more bytes */
  uint32_t fetch_timeout_ms;   /* whole request, per document */
  uint32_t max_response_bytes; /* larger bodies fail the fetch */
  uint32_t min_refresh_s;      /* bounds on Cache-Control max-age ... */
  uint32_t max_refresh_s;      /* ... and the interval without one */
  uint32_t min_refetch_interval_s;
  bool required;               /* readiness waits for this provider's keys */
} sg_jwt_fetch_config;

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
/* Its strings are sg_memcache blocks (sg_jwt_result_clear frees them; one
 * taken out of a result is freed with sg_memcache_free). */
typedef struct sg_jwt_result {
  char *identity;     /* value of the provider's identity claim */
  char *provider;     /* provider name */
  int64_t exp;        /* token expiry, seconds since the epoch */
  int64_t iat;        /* issued-at, or -1 when absent */
  json_t *claims;     /* the whole payload object */
  char *cnf_x5t_s256; /* "cnf":{"x5t#S256":...} (RFC 8705), else NULL */
  const char *detail; /* on failure: static text saying which check failed
                         (never token content); NULL on success */
  size_t provider_index;   /* which provider of the verifier */
  uint64_t key_generation; /* its key set's generation when verified: the
                              token cache drops the result once the
                              provider's keys change */
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

/* ---- providers and their keys ---------------------------------------- */

const char *sg_jwt_verifier_provider_name(const sg_jwt_verifier *v, size_t i);

/* The generation of provider i's current key set: 0 for static keys (they
 * never change), else a counter of the key source that moves at every
 * swap. Lock-free; any thread. */
uint64_t sg_jwt_verifier_key_generation(const sg_jwt_verifier *v, size_t i);

/* Provider i's fetch configuration and key source, or NULL for a provider
 * with static keys (borrowed: valid while v is). */
const sg_jwt_fetch_config *sg_jwt_verifier_fetch_config(
    const sg_jwt_verifier *v, size_t i);
sg_jwt_keysource *sg_jwt_verifier_keysource(const sg_jwt_verifier *v,
                                            size_t i);

/* True when every provider with "required" network keys has keys. When
 * not, the names of those without go to `missing` (may be NULL), comma-
 * separated. Any thread. */
bool sg_jwt_verifier_keys_ready(const sg_jwt_verifier *v, char *missing,
                                size_t missing_len);

/* Call on a reload, before `nv` is shared with any other thread: each
 * network provider of `nv` whose name, issuer, jwks_url/discovery and
 * algorithms equal those of a provider of `old` takes over old's key
 * source (its keys, its refetch state), with nv's min_refetch_interval_s.
 * A provider with the same name and issuer whose URL changed starts from
 * old's keys (not fresh: an unknown kid refetches at once) unless it has
 * a fallback_jwks_file. Either way, a reload never leaves a provider that
 * had keys without keys. */
void sg_jwt_verifier_adopt_keys(sg_jwt_verifier *nv,
                                const sg_jwt_verifier *old);

/* ---- key sources (network keys) ---------------------------------------- */

sg_jwt_keysource *sg_jwt_keysource_ref(sg_jwt_keysource *s);
void sg_jwt_keysource_unref(sg_jwt_keysource *s);

/* What a key source has seen. Counters only grow. */
typedef struct sg_jwt_key_stats {
  uint64_t fetches_ok;         /* fetches that produced a usable key set */
  uint64_t fetches_failed;     /* failed fetches: old keys stayed */
  uint64_t key_set_changes;    /* swaps to a different key set */
  uint64_t refetches;          /* refetches requested for an unknown kid */
  uint64_t refetches_limited;  /* unknown kids while rate-limited (14) */
  uint64_t unknown_kid_denied; /* unknown kids with a fresh set (16) */
  uint64_t generation;         /* of the current key set */
  size_t n_keys;               /* in the current set; 0: no keys */
  bool fetched;                /* the current set came from a fetch */
} sg_jwt_key_stats;

void sg_jwt_keysource_get_stats(sg_jwt_keysource *s, sg_jwt_key_stats *out);
bool sg_jwt_keysource_has_keys(sg_jwt_keysource *s);

/* Called (from any thread, under the key source's lock: it must only
 * wake something, e.g. event_active) when a worker asks for a refetch. */
typedef void (*sg_jwt_wake_fn)(void *arg);
/* Installs (or with fn NULL removes) the waker; after removal returns, the
 * old one is never called again. */
void sg_jwt_keysource_set_wake(sg_jwt_keysource *s, sg_jwt_wake_fn fn,
                               void *arg);

/* The fetcher's side. begin_fetch marks a fetch in flight: with `force`
 * always (a scheduled refresh), without only when a refetch was requested.
 * Returns false, changing nothing, when one is already in flight or (not
 * forced) none was requested. now_ms below: sg_jwt_monotonic_ms(). */
bool sg_jwt_keysource_begin_fetch(sg_jwt_keysource *s, bool force);
/* Ends the fetch in flight. jwks (len bytes) is the document fetched, or
 * NULL when the fetch failed. A document with a usable key set replaces
 * the current set when it differs (the generation moves) and makes the
 * set fresh. Returns 1 (new keys), 0 (same keys, now fresh) or -1: nothing
 * changed, the old keys stay, the reason is in err (empty for jwks NULL).
 * *n_keys (may be NULL) gets the size of the set in force after the call. */
int sg_jwt_keysource_finish_fetch(sg_jwt_keysource *s, const char *jwks,
                                  size_t len, int64_t now_ms, size_t *n_keys,
                                  char *err, size_t errlen);

/* The verifier's side, for a token whose kid the key set of generation
 * `seen_gen` lacks (or when there were no keys):
 *   SG_JWT_KEYS_RETRY      the keys changed since: look again
 *   SG_JWT_KEYS_TRANSIENT  a refetch is in flight, or was requested now,
 *                          or the set is stale and refetching is
 *                          rate-limited, or there are no keys: 14
 *   SG_JWT_KEYS_DENY       the set is fresh (fetched successfully within
 *                          min_refetch_interval_s): the kid is unknown, 16
 * Requests at most one refetch per min_refetch_interval_s, and none while
 * one is requested or in flight. */
enum { SG_JWT_KEYS_RETRY = 0, SG_JWT_KEYS_TRANSIENT, SG_JWT_KEYS_DENY };
int sg_jwt_keysource_unknown_kid(sg_jwt_keysource *s, uint64_t seen_gen,
                                 int64_t now_ms);

/* CLOCK_MONOTONIC in milliseconds: the clock of the key sources. */
int64_t sg_jwt_monotonic_ms(void);

/* "malformed", "too_long", ...; "unknown" for values out of range. */
const char *sg_jwt_reason_name(int reason);

/* Releases what *r owns and zeroes it. */
void sg_jwt_result_clear(sg_jwt_result *r);
/* Deep-copies the strings and takes a new reference to claims. 0 or -1. */
int sg_jwt_result_copy(sg_jwt_result *dst, const sg_jwt_result *src);

#endif
