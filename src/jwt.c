/* JWT verification: everything around the signature check (libjwt 1.10
 * for HMAC, OpenSSL with the parsed key for RSA and EC). See jwt.h for
 * why each step exists; the short version is that libjwt trusts the token
 * for everything but the signature bytes, so we decide everything else. */
#include "sparkgate/jwt.h"

#include "sparkgate/jsonload.h"
#include "sparkgate/jwks.h"
#include "sparkgate/keyfetch.h"
#include "sparkgate/memcache.h"
#include "sparkgate/route.h"

#include <jwt.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* 9999-12-31T23:59:59Z. Larger "times" are nonsense and would make the
 * leeway arithmetic overflow-prone. */
#define SG_JWT_MAX_TIME INT64_C(253402300799)
#define SG_JWT_MAX_LIFETIME_LIMIT_S INT64_C(315360000) /* ten years */

struct claim_rule {
  char *name;
  json_t **values; /* owned references to scalars, compared with json_equal */
  size_t n_values;
};

/* An immutable set of keys, shared by reference: a verification holds one
 * for its duration, so a swap never frees keys in use. */
typedef struct keyset {
  atomic_long refs;
  sg_jwk *keys;
  size_t n_keys;
} keyset;

/* A provider's keys from the network: the set in force, swapped whole
 * under `lock`, and what workers and the fetcher need to agree on when to
 * refetch. Shared by the verifiers of successive reloads (adopt_keys). */
struct sg_jwt_keysource {
  atomic_long refs;
  pthread_mutex_t lock;
  keyset *current; /* NULL: no keys */
  /* Moves (under lock) at every swap; read without it on cache hits. */
  atomic_uint_fast64_t generation;
  char *label; /* "identity provider NAME", for logs */
  unsigned alg_mask;
  /* Everything below is under lock. */
  int64_t refetch_interval_ms;
  bool fetched; /* current came from a fetch, not a fallback file */
  bool in_flight;
  bool requested;
  bool have_success;
  bool have_refetch;
  int64_t last_success_ms;
  int64_t last_refetch_ms;
  sg_jwt_wake_fn wake;
  void *wake_arg;
  sg_jwt_key_stats stats;
};

struct provider {
  char *name;
  char *issuer;
  char **audiences;
  size_t n_audiences;
  /* Keys while loading; then they move into `fixed` (static keys) or into
   * the key source (a fallback file's keys). */
  sg_jwk *keys;
  size_t n_keys;
  keyset *fixed;            /* static providers; never changes */
  sg_jwt_keysource *src;    /* network providers */
  sg_jwt_fetch_config *fetch; /* network providers */
  unsigned alg_mask;        /* "algorithms"; 0 = any */
  int64_t leeway_s;
  int64_t max_lifetime_s; /* 0 = unbounded */
  char *identity_claim;
  struct claim_rule *rules;
  size_t n_rules;
};

struct sg_jwt_verifier {
  atomic_long refs;
  uint64_t generation;
  size_t max_token_bytes;
  struct provider *providers;
  size_t n_providers;
};

static atomic_uint_fast64_t next_generation = 1;

static const char *const reason_names[SG_JWT_REASON_COUNT] = {
    [SG_JWT_OK] = "ok",
    [SG_JWT_MALFORMED] = "malformed",
    [SG_JWT_TOO_LONG] = "too_long",
    [SG_JWT_UNKNOWN_ISSUER] = "unknown_issuer",
    [SG_JWT_BAD_ALG] = "bad_alg",
    [SG_JWT_UNKNOWN_KID] = "unknown_kid",
    [SG_JWT_BAD_SIGNATURE] = "bad_signature",
    [SG_JWT_EXPIRED] = "expired",
    [SG_JWT_NOT_YET_VALID] = "not_yet_valid",
    [SG_JWT_ISSUED_IN_FUTURE] = "issued_in_future",
    [SG_JWT_LIFETIME_TOO_LONG] = "lifetime_too_long",
    [SG_JWT_WRONG_AUDIENCE] = "wrong_audience",
    [SG_JWT_MISSING_CLAIM] = "missing_claim",
    [SG_JWT_CLAIM_MISMATCH] = "claim_mismatch",
    [SG_JWT_CRIT_UNSUPPORTED] = "crit_unsupported",
    [SG_JWT_BAD_TYP] = "bad_typ",
    [SG_JWT_BAD_IDENTITY] = "bad_identity",
    [SG_JWT_INTERNAL] = "internal",
    [SG_JWT_KEYS_UNAVAILABLE] = "keys_unavailable",
    [SG_JWT_KID_REFETCHING] = "kid_refetching",
    [SG_JWT_CNF_UNSUPPORTED] = "cnf_unsupported",
};

const char *sg_jwt_reason_name(int reason) {
  if (reason < 0 || reason >= SG_JWT_REASON_COUNT)
    return "unknown";
  return reason_names[reason];
}

/* ---- key sets and key sources -------------------------------------------- */

int64_t sg_jwt_monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void free_jwks(sg_jwk *keys, size_t n) {
  for (size_t i = 0; keys != NULL && i < n; i++)
    sg_jwk_clear(&keys[i]);
  free(keys);
}

/* Takes ownership of keys (freed on failure too). */
static keyset *keyset_new(sg_jwk *keys, size_t n) {
  keyset *k = calloc(1, sizeof *k);
  if (k == NULL) {
    free_jwks(keys, n);
    return NULL;
  }
  atomic_init(&k->refs, 1);
  k->keys = keys;
  k->n_keys = n;
  return k;
}

static keyset *keyset_ref(keyset *k) {
  if (k != NULL)
    atomic_fetch_add_explicit(&k->refs, 1, memory_order_relaxed);
  return k;
}

static void keyset_unref(keyset *k) {
  if (k != NULL &&
      atomic_fetch_sub_explicit(&k->refs, 1, memory_order_acq_rel) == 1) {
    free_jwks(k->keys, k->n_keys);
    free(k);
  }
}

static bool keyset_equal(const keyset *k, const sg_jwk *keys, size_t n) {
  if (k == NULL || k->n_keys != n)
    return false;
  for (size_t i = 0; i < n; i++)
    if (!sg_jwk_equal(&k->keys[i], &keys[i]))
      return false;
  return true;
}

static sg_jwt_keysource *keysource_new(const char *name, unsigned alg_mask,
                                       uint32_t refetch_interval_s) {
  sg_jwt_keysource *s = calloc(1, sizeof *s);
  if (s == NULL)
    return NULL;
  size_t n = strlen(name) + sizeof "identity provider ";
  s->label = malloc(n);
  if (s->label == NULL || pthread_mutex_init(&s->lock, NULL) != 0) {
    free(s->label);
    free(s);
    return NULL;
  }
  snprintf(s->label, n, "identity provider %s", name);
  atomic_init(&s->refs, 1);
  atomic_init(&s->generation, 0);
  s->alg_mask = alg_mask;
  s->refetch_interval_ms = (int64_t)refetch_interval_s * 1000;
  return s;
}

sg_jwt_keysource *sg_jwt_keysource_ref(sg_jwt_keysource *s) {
  if (s != NULL)
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
  return s;
}

void sg_jwt_keysource_unref(sg_jwt_keysource *s) {
  if (s == NULL ||
      atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
    return;
  keyset_unref(s->current);
  pthread_mutex_destroy(&s->lock);
  free(s->label);
  free(s);
}

/* The set in force (a new reference, or NULL) and its generation. */
static keyset *keysource_acquire(sg_jwt_keysource *s, uint64_t *gen) {
  pthread_mutex_lock(&s->lock);
  keyset *k = keyset_ref(s->current);
  *gen = atomic_load_explicit(&s->generation, memory_order_relaxed);
  pthread_mutex_unlock(&s->lock);
  return k;
}

/* Puts k (reference taken over) in force, not as fetched keys. */
static void keysource_install(sg_jwt_keysource *s, keyset *k) {
  pthread_mutex_lock(&s->lock);
  keyset *old = s->current;
  s->current = k;
  s->fetched = false;
  atomic_fetch_add_explicit(&s->generation, 1, memory_order_release);
  pthread_mutex_unlock(&s->lock);
  keyset_unref(old);
}

/* Whether the set in force came from a fetch (not a fallback file). */
static bool keysource_fetched(sg_jwt_keysource *s) {
  pthread_mutex_lock(&s->lock);
  bool fetched = s->current != NULL && s->fetched;
  pthread_mutex_unlock(&s->lock);
  return fetched;
}

bool sg_jwt_keysource_has_keys(sg_jwt_keysource *s) {
  pthread_mutex_lock(&s->lock);
  bool has = s->current != NULL;
  pthread_mutex_unlock(&s->lock);
  return has;
}

void sg_jwt_keysource_get_stats(sg_jwt_keysource *s, sg_jwt_key_stats *out) {
  pthread_mutex_lock(&s->lock);
  *out = s->stats;
  out->generation = atomic_load_explicit(&s->generation, memory_order_relaxed);
  out->n_keys = s->current != NULL ? s->current->n_keys : 0;
  out->fetched = s->fetched;
  pthread_mutex_unlock(&s->lock);
}

void sg_jwt_keysource_set_wake(sg_jwt_keysource *s, sg_jwt_wake_fn fn,
                               void *arg) {
  pthread_mutex_lock(&s->lock);
  s->wake = fn;
  s->wake_arg = arg;
  pthread_mutex_unlock(&s->lock);
}

bool sg_jwt_keysource_begin_fetch(sg_jwt_keysource *s, bool force) {
  pthread_mutex_lock(&s->lock);
  bool start = !s->in_flight && (force || s->requested);
  if (start) {
    s->in_flight = true;
    s->requested = false;
  }
  pthread_mutex_unlock(&s->lock);
  return start;
}

int sg_jwt_keysource_finish_fetch(sg_jwt_keysource *s, const char *jwks,
                                  size_t len, int64_t now_ms, size_t *n_keys,
                                  char *err, size_t errlen) {
  if (errlen > 0)
    err[0] = '\0';
  sg_jwk *keys = NULL;
  size_t n = 0;
  int rc = -1;
  if (jwks != NULL)
    rc = sg_jwks_parse_fetched(jwks, len, s->alg_mask, s->label, &keys, &n,
                               NULL, err, errlen);
  keyset *fresh = NULL, *old = NULL;
  pthread_mutex_lock(&s->lock);
  s->in_flight = false;
  if (rc == 0) {
    s->have_success = true;
    s->last_success_ms = now_ms;
    s->fetched = true;
    s->stats.fetches_ok++;
    if (keyset_equal(s->current, keys, n)) {
      free_jwks(keys, n);
    } else {
      /* Allocating under the lock is rare (a real change) and cheap. */
      fresh = keyset_new(keys, n);
      if (fresh != NULL) {
        old = s->current;
        s->current = fresh;
        atomic_fetch_add_explicit(&s->generation, 1, memory_order_release);
        s->stats.key_set_changes++;
        rc = 1;
      } else {
        s->stats.fetches_ok--;
        s->stats.fetches_failed++;
        s->have_success = false;
        snprintf(err, errlen, "out of memory");
        rc = -1;
      }
    }
  } else {
    s->stats.fetches_failed++;
  }
  if (n_keys != NULL)
    *n_keys = s->current != NULL ? s->current->n_keys : 0;
  pthread_mutex_unlock(&s->lock);
  keyset_unref(old);
  return rc;
}

int sg_jwt_keysource_unknown_kid(sg_jwt_keysource *s, uint64_t seen_gen,
                                 int64_t now_ms) {
  int d;
  pthread_mutex_lock(&s->lock);
  if (atomic_load_explicit(&s->generation, memory_order_relaxed) != seen_gen) {
    d = SG_JWT_KEYS_RETRY;
  } else if (s->in_flight || s->requested) {
    d = SG_JWT_KEYS_TRANSIENT;
  } else if (s->current != NULL && s->have_success &&
             now_ms - s->last_success_ms < s->refetch_interval_ms) {
    /* Fetched a moment ago and the kid is not there: it is unknown. */
    d = SG_JWT_KEYS_DENY;
    s->stats.unknown_kid_denied++;
  } else if (s->have_refetch &&
             now_ms - s->last_refetch_ms < s->refetch_interval_ms) {
    /* The last refetch failed (else the set would be fresh): we cannot
     * say the kid is unknown, and must not ask the provider again yet. */
    d = SG_JWT_KEYS_TRANSIENT;
    s->stats.refetches_limited++;
  } else {
    s->requested = true;
    s->have_refetch = true;
    s->last_refetch_ms = now_ms;
    s->stats.refetches++;
    if (s->wake != NULL)
      s->wake(s->wake_arg);
    d = SG_JWT_KEYS_TRANSIENT;
  }
  pthread_mutex_unlock(&s->lock);
  return d;
}

/* ---- lifetime ------------------------------------------------------------ */

static void fetch_config_free(sg_jwt_fetch_config *f) {
  if (f == NULL)
    return;
  free((char *)f->provider);
  free((char *)f->issuer);
  free((char *)f->jwks_url);
  free((char *)f->ca_file);
  SSL_CTX_free(f->tls);
  free(f);
}

static void provider_free(struct provider *p) {
  free(p->name);
  free(p->issuer);
  for (size_t i = 0; i < p->n_audiences; i++)
    free(p->audiences[i]);
  free(p->audiences);
  free_jwks(p->keys, p->n_keys);
  keyset_unref(p->fixed);
  sg_jwt_keysource_unref(p->src);
  fetch_config_free(p->fetch);
  free(p->identity_claim);
  for (size_t i = 0; i < p->n_rules; i++) {
    free(p->rules[i].name);
    for (size_t j = 0; j < p->rules[i].n_values; j++)
      json_decref(p->rules[i].values[j]);
    free(p->rules[i].values);
  }
  free(p->rules);
  memset(p, 0, sizeof *p);
}

static void verifier_free(sg_jwt_verifier *v) {
  for (size_t i = 0; i < v->n_providers; i++)
    provider_free(&v->providers[i]);
  free(v->providers);
  free(v);
}

sg_jwt_verifier *sg_jwt_verifier_ref(sg_jwt_verifier *v) {
  if (v != NULL)
    atomic_fetch_add_explicit(&v->refs, 1, memory_order_relaxed);
  return v;
}

void sg_jwt_verifier_unref(sg_jwt_verifier *v) {
  if (v == NULL)
    return;
  /* acq_rel: the last owner must see every other owner's reads done
   * before it frees. */
  if (atomic_fetch_sub_explicit(&v->refs, 1, memory_order_acq_rel) == 1)
    verifier_free(v);
}

uint64_t sg_jwt_verifier_generation(const sg_jwt_verifier *v) {
  return v ? v->generation : 0;
}

size_t sg_jwt_verifier_max_token_bytes(const sg_jwt_verifier *v) {
  return v ? v->max_token_bytes : 0;
}

size_t sg_jwt_verifier_provider_count(const sg_jwt_verifier *v) {
  return v ? v->n_providers : 0;
}

const char *sg_jwt_verifier_provider_name(const sg_jwt_verifier *v,
                                          size_t i) {
  return v != NULL && i < v->n_providers ? v->providers[i].name : NULL;
}

uint64_t sg_jwt_verifier_key_generation(const sg_jwt_verifier *v, size_t i) {
  if (v == NULL || i >= v->n_providers || v->providers[i].src == NULL)
    return 0;
  return atomic_load_explicit(&v->providers[i].src->generation,
                              memory_order_acquire);
}

const sg_jwt_fetch_config *sg_jwt_verifier_fetch_config(
    const sg_jwt_verifier *v, size_t i) {
  return v != NULL && i < v->n_providers ? v->providers[i].fetch : NULL;
}

sg_jwt_keysource *sg_jwt_verifier_keysource(const sg_jwt_verifier *v,
                                            size_t i) {
  return v != NULL && i < v->n_providers ? v->providers[i].src : NULL;
}

bool sg_jwt_verifier_keys_ready(const sg_jwt_verifier *v, char *missing,
                                size_t missing_len) {
  bool ready = true;
  size_t o = 0;
  if (missing != NULL && missing_len > 0)
    missing[0] = '\0';
  for (size_t i = 0; v != NULL && i < v->n_providers; i++) {
    const struct provider *p = &v->providers[i];
    if (p->src == NULL || !p->fetch->required || sg_jwt_keysource_has_keys(p->src))
      continue;
    ready = false;
    if (missing != NULL && o < missing_len) {
      int w = snprintf(missing + o, missing_len - o, "%s%s", o ? ", " : "",
                       p->name);
      if (w > 0)
        o += (size_t)w;
    }
  }
  return ready;
}

static bool same_str(const char *a, const char *b) {
  return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

void sg_jwt_verifier_adopt_keys(sg_jwt_verifier *nv,
                                const sg_jwt_verifier *old) {
  if (nv == NULL || old == NULL)
    return;
  for (size_t i = 0; i < nv->n_providers; i++) {
    struct provider *p = &nv->providers[i];
    if (p->src == NULL)
      continue;
    for (size_t j = 0; j < old->n_providers; j++) {
      const struct provider *q = &old->providers[j];
      if (q->src == NULL || strcmp(p->name, q->name) != 0 ||
          strcmp(p->issuer, q->issuer) != 0)
        continue;
      uint64_t gen;
      if (p->fetch->discovery == q->fetch->discovery &&
          same_str(p->fetch->jwks_url, q->fetch->jwks_url) &&
          p->alg_mask == q->alg_mask) {
        /* The same keys from the same place: keep them, and the refetch
         * state, rather than fetch again. */
        /* Keys from a fallback file give way to the new file's. */
        if (!keysource_fetched(q->src)) {
          keyset *fallback = keysource_acquire(p->src, &gen);
          if (fallback != NULL)
            keysource_install(q->src, fallback);
        }
        pthread_mutex_lock(&q->src->lock);
        q->src->refetch_interval_ms =
            (int64_t)p->fetch->min_refetch_interval_s * 1000;
        pthread_mutex_unlock(&q->src->lock);
        sg_jwt_keysource_unref(p->src);
        p->src = sg_jwt_keysource_ref(q->src);
      } else if (p->alg_mask == q->alg_mask &&
                 !sg_jwt_keysource_has_keys(p->src)) {
        /* A new place for the same issuer: its old keys serve until the
         * new place answers, as if they came from a fallback file. */
        keyset *prev = keysource_acquire(q->src, &gen);
        if (prev != NULL)
          keysource_install(p->src, prev);
      }
      if (p->src != q->src) {
        /* The provider's counters go on (Prometheus counters never go
         * back; a new place is not a new provider). */
        sg_jwt_key_stats st;
        sg_jwt_keysource_get_stats(q->src, &st);
        pthread_mutex_lock(&p->src->lock);
        p->src->stats.fetches_ok += st.fetches_ok;
        p->src->stats.fetches_failed += st.fetches_failed;
        p->src->stats.key_set_changes += st.key_set_changes;
        p->src->stats.refetches += st.refetches;
        p->src->stats.refetches_limited += st.refetches_limited;
        p->src->stats.unknown_kid_denied += st.unknown_kid_denied;
        pthread_mutex_unlock(&p->src->lock);
      }
      break;
    }
  }
}

void sg_jwt_result_clear(sg_jwt_result *r) {
  if (r == NULL)
    return;
  sg_memcache_free(r->identity);
  sg_memcache_free(r->provider);
  sg_memcache_free(r->cnf_x5t_s256);
  json_decref(r->claims);
  memset(r, 0, sizeof *r);
}

static char *dup_or_null(const char *s, int *oom) {
  if (s == NULL)
    return NULL;
  char *d = strdup(s);
  if (d == NULL)
    *oom = 1;
  return d;
}

/* A result's strings are copied for every call that finds its token in the
 * cache: from the worker's block cache, not glibc's bins. */
static char *result_dup(const char *s, int *oom) {
  if (s == NULL)
    return NULL;
  char *d = sg_memcache_strdup(s);
  if (d == NULL)
    *oom = 1;
  return d;
}

int sg_jwt_result_copy(sg_jwt_result *dst, const sg_jwt_result *src) {
  int oom = 0;
  memset(dst, 0, sizeof *dst);
  dst->identity = result_dup(src->identity, &oom);
  dst->provider = result_dup(src->provider, &oom);
  dst->cnf_x5t_s256 = result_dup(src->cnf_x5t_s256, &oom);
  dst->exp = src->exp;
  dst->iat = src->iat;
  dst->detail = src->detail;
  dst->provider_index = src->provider_index;
  dst->key_generation = src->key_generation;
  dst->claims = json_incref(src->claims);
  if (oom) {
    sg_jwt_result_clear(dst);
    return -1;
  }
  return 0;
}

/* ---- loading ------------------------------------------------------------- */

struct loader {
  sg_jwt_report_fn report;
  void *ctx;
  const char *base_dir;
  int errors;
};

static void lerr(struct loader *L, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void lerr(struct loader *L, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  L->errors++;
  if (L->report != NULL)
    L->report(L->ctx, msg);
}

static void jwks_report(void *ctx, const char *msg) {
  struct loader *L = ctx;
  L->errors++;
  if (L->report != NULL)
    L->report(L->ctx, msg);
}

static void lerr_oom(struct loader *L, const char *path) {
  lerr(L, "%s: out of memory while loading the JWT providers", path);
}

static void lerr_oom_at(struct loader *L, const char *path, const char *key) {
  lerr(L, "%s.%s: out of memory while loading the JWT providers", path, key);
}

static char *resolve_path(const struct loader *L, const char *name) {
  return sg_jsonload_resolve(L->base_dir, name);
}

/* Reports keys of `obj` not in `known` (NULL-terminated). */
static void check_keys(struct loader *L, const char *path, json_t *obj,
                       const char *const *known, const char *known_list) {
  void *iter = NULL;
  const char *k;
  while ((k = sg_jsonload_next_unknown_key(obj, known, &iter)) != NULL)
    lerr(L, "%s.%s: unknown key; known keys are %s", path, k, known_list);
}

static const char *get_string(struct loader *L, const char *path, json_t *obj,
                              const char *key, bool required) {
  json_t *v = json_object_get(obj, key);
  switch (sg_jsonload_check_string(v)) {
  case SG_JSONLOAD_OK:
    return json_string_value(v);
  case SG_JSONLOAD_ABSENT:
    if (required)
      lerr(L, "%s.%s: missing; it is required", path, key);
    break;
  default:
    lerr(L, "%s.%s: must be a non-empty string", path, key);
    break;
  }
  return NULL;
}

/* Returns 1 when present and valid, 0 when absent, -1 on error. */
static int get_int(struct loader *L, const char *path, json_t *obj,
                   const char *key, int64_t min, int64_t max, int64_t *out) {
  switch (sg_jsonload_check_int(json_object_get(obj, key), min, max, out)) {
  case SG_JSONLOAD_OK:
    return 1;
  case SG_JSONLOAD_ABSENT:
    return 0;
  default:
    lerr(L, "%s.%s: must be an integer from %lld to %lld", path, key,
         (long long)min, (long long)max);
    return -1;
  }
}

static const char alg_list[] =
    "RS256, RS384, RS512, ES256, ES384, HS256, HS384, HS512";

static bool alg_allowed(const json_t *algorithms, const char *alg) {
  if (algorithms == NULL)
    return true;
  size_t i;
  json_t *a;
  json_array_foreach(algorithms, i, a) {
    if (json_is_string(a) && strcmp(json_string_value(a), alg) == 0)
      return true;
  }
  return false;
}

static int push_key(struct provider *p, size_t *cap, sg_jwk *k) {
  if (p->n_keys == *cap) {
    size_t ncap = *cap ? *cap * 2 : 4;
    sg_jwk *nk = realloc(p->keys, ncap * sizeof *nk);
    if (nk == NULL)
      return -1;
    p->keys = nk;
    *cap = ncap;
  }
  p->keys[p->n_keys++] = *k;
  return 0;
}

static void load_static_key(struct loader *L, struct provider *p, size_t *cap,
                            const char *kpath, json_t *kj,
                            const json_t *algorithms) {
  static const char *const known[] = {"kid", "alg", "pem_file", "secret_file",
                                      NULL};
  if (!json_is_object(kj)) {
    lerr(L,
         "%s: must be an object {\"kid\", \"alg\", \"pem_file\" or "
         "\"secret_file\"}",
         kpath);
    return;
  }
  int before = L->errors;
  check_keys(L, kpath, kj, known, "kid, alg, pem_file, secret_file");
  const char *kid = NULL;
  if (json_object_get(kj, "kid") != NULL)
    kid = get_string(L, kpath, kj, "kid", false);
  const char *alg = get_string(L, kpath, kj, "alg", true);
  if (alg != NULL && sg_jwk_alg_parse(alg) < 0) {
    lerr(L, "%s.alg: \"%s\" is not supported; use one of %s (exact case)",
         kpath, alg, alg_list);
    alg = NULL;
  } else if (alg != NULL && !alg_allowed(algorithms, alg)) {
    lerr(L,
         "%s.alg: \"%s\" is not in this provider's \"algorithms\"; add it "
         "there or change the key",
         kpath, alg);
    alg = NULL;
  }
  json_t *pem = json_object_get(kj, "pem_file");
  json_t *sec = json_object_get(kj, "secret_file");
  if ((pem == NULL) == (sec == NULL)) {
    lerr(L,
         "%s: needs exactly one of \"pem_file\" (RS*/ES*) or "
         "\"secret_file\" (HS*)",
         kpath);
    return;
  }
  const char *fkey = pem ? "pem_file" : "secret_file";
  const char *fname = get_string(L, kpath, kj, fkey, true);
  if (fname == NULL || alg == NULL || L->errors != before)
    return;
  char *file = resolve_path(L, fname);
  if (file == NULL) {
    lerr_oom_at(L, kpath, fkey);
    return;
  }
  char err[512];
  sg_jwk k;
  int rc = pem ? sg_jwk_from_pem_file(file, alg, &k, err, sizeof err)
               : sg_jwk_from_secret_file(file, alg, &k, err, sizeof err);
  free(file);
  if (rc != 0) {
    lerr(L, "%s.%s: %s", kpath, fkey, err);
    return;
  }
  if (kid != NULL && (k.kid = strdup(kid)) == NULL) {
    sg_jwk_clear(&k);
    lerr_oom(L, kpath);
    return;
  }
  if (push_key(p, cap, &k) != 0) {
    sg_jwk_clear(&k);
    lerr_oom(L, kpath);
  }
}

static void load_rules(struct loader *L, struct provider *p, const char *path,
                       json_t *rc) {
  if (!json_is_object(rc)) {
    lerr(L,
         "%s.required_claims: must be an object {\"claim\": value or "
         "[values]}",
         path);
    return;
  }
  size_t n = json_object_size(rc);
  p->rules = calloc(n ? n : 1, sizeof *p->rules);
  if (p->rules == NULL) {
    lerr_oom_at(L, path, "required_claims");
    return;
  }
  const char *name;
  json_t *val;
  json_object_foreach(rc, name, val) {
    bool is_arr = json_is_array(val);
    size_t nv = is_arr ? json_array_size(val) : 1;
    if (is_arr && nv == 0) {
      lerr(L,
           "%s.required_claims.%s: an empty list matches nothing; give at "
           "least one value",
           path, name);
      continue;
    }
    struct claim_rule *r = &p->rules[p->n_rules];
    r->values = calloc(nv, sizeof *r->values);
    r->name = strdup(name);
    if (r->values == NULL || r->name == NULL) {
      free(r->values);
      free(r->name);
      memset(r, 0, sizeof *r);
      lerr_oom_at(L, path, "required_claims");
      continue;
    }
    p->n_rules++;
    for (size_t i = 0; i < nv; i++) {
      json_t *e = is_arr ? json_array_get(val, i) : val;
      if (!json_is_string(e) && !json_is_integer(e) && !json_is_boolean(e)) {
        lerr(L,
             "%s.required_claims.%s%s: must be a string, integer or "
             "boolean%s",
             path, name, is_arr ? "[...]" : "",
             is_arr ? "" : ", or a list of them");
        continue;
      }
      /* A private copy: the caller's JSON tree may be freed or changed
       * after loading, and the verifier must not share it. */
      json_t *c = sg_jsonload_copy(e);
      if (c == NULL) {
        lerr_oom_at(L, path, "required_claims");
        continue;
      }
      r->values[r->n_values++] = c;
    }
  }
}

static const char *const fetch_only_keys[] = {
    "ca_file",          "fallback_jwks_file", "required",
    "connect_timeout_ms", "fetch_timeout_ms", "max_response_bytes",
    "min_refresh_s",    "max_refresh_s",      "min_refetch_interval_s",
    NULL};

static uint32_t get_u32(struct loader *L, const char *path, json_t *obj,
                        const char *key, int64_t min, int64_t max,
                        uint32_t dflt) {
  int64_t v = dflt;
  get_int(L, path, obj, key, min, max, &v);
  return (uint32_t)v;
}

/* "jwks_url" / "discovery" and their options. Returns whether the provider
 * takes its keys from the network; its fallback file's keys go to p->keys
 * (the kid rules are then checked with the static ones). */
static bool load_network(struct loader *L, struct provider *p,
                         const char *path, json_t *pj,
                         const json_t *algorithms, size_t *cap) {
  json_t *url = json_object_get(pj, "jwks_url");
  json_t *disc = json_object_get(pj, "discovery");
  if (disc != NULL && !json_is_boolean(disc))
    lerr(L, "%s.discovery: must be true or false", path);
  bool discovery = json_is_true(disc);
  if (url == NULL && !discovery) {
    for (size_t i = 0; fetch_only_keys[i] != NULL; i++)
      if (json_object_get(pj, fetch_only_keys[i]) != NULL)
        lerr(L,
             "%s.%s: only applies to keys fetched over HTTPS; add "
             "\"jwks_url\" or \"discovery\": true, or remove it",
             path, fetch_only_keys[i]);
    return false;
  }
  char err[512];
  if (url != NULL && discovery)
    lerr(L,
         "%s: \"jwks_url\" and \"discovery\": true both say where the keys "
         "are; keep one",
         path);
  const char *u = url != NULL ? get_string(L, path, pj, "jwks_url", true) : NULL;
  if (u != NULL && sg_keyfetch_check_url(u, err, sizeof err) != 0)
    lerr(L, "%s.jwks_url: %s", path, err);
  if (discovery && p->issuer != NULL &&
      sg_keyfetch_check_url(p->issuer, err, sizeof err) != 0)
    lerr(L,
         "%s.issuer: with \"discovery\": true the issuer is where the "
         "discovery document is fetched: %s",
         path, err);
  static const char *const static_keys[] = {"keys", "jwks_file"};
  for (size_t i = 0; i < 2; i++)
    if (json_object_get(pj, static_keys[i]) != NULL)
      lerr(L,
           "%s.%s: not with \"jwks_url\" or \"discovery\" (the keys come "
           "from the identity provider); keys to start with go in "
           "\"fallback_jwks_file\"",
           path, static_keys[i]);
  /* JWKS documents only carry RSA and EC keys here. */
  unsigned asym = 0;
  static const char *const asym_algs[] = {"RS256", "RS384", "RS512", "ES256",
                                          "ES384"};
  for (size_t i = 0; i < sizeof asym_algs / sizeof asym_algs[0]; i++)
    asym |= SG_JWK_ALG_BIT(sg_jwk_alg_parse(asym_algs[i]));
  if (p->alg_mask != 0 && (p->alg_mask & asym) == 0)
    lerr(L,
         "%s.algorithms: keys fetched from an identity provider are RS* or "
         "ES* keys; list at least one of RS256, RS384, RS512, ES256, ES384",
         path);

  sg_jwt_fetch_config *f = calloc(1, sizeof *f);
  if (f == NULL) {
    lerr_oom(L, path);
    return true;
  }
  p->fetch = f;
  int oom = 0;
  f->provider = dup_or_null(p->name, &oom);
  f->issuer = dup_or_null(p->issuer, &oom);
  f->jwks_url = dup_or_null(u, &oom);
  f->discovery = discovery;
  json_t *req = json_object_get(pj, "required");
  if (req != NULL && !json_is_boolean(req))
    lerr(L, "%s.required: must be true or false", path);
  f->required = req == NULL || json_is_true(req);
  f->connect_timeout_ms = get_u32(L, path, pj, "connect_timeout_ms", 100,
                                  600000, SG_JWT_DEFAULT_CONNECT_TIMEOUT_MS);
  f->fetch_timeout_ms = get_u32(L, path, pj, "fetch_timeout_ms", 100, 600000,
                                SG_JWT_DEFAULT_FETCH_TIMEOUT_MS);
  f->max_response_bytes =
      get_u32(L, path, pj, "max_response_bytes", 1024, 16 * 1024 * 1024,
              SG_JWT_DEFAULT_MAX_RESPONSE_BYTES);
  f->min_refresh_s = get_u32(L, path, pj, "min_refresh_s", 1, 86400,
                             SG_JWT_DEFAULT_MIN_REFRESH_S);
  f->max_refresh_s = get_u32(L, path, pj, "max_refresh_s", 1, 7 * 86400,
                             SG_JWT_DEFAULT_MAX_REFRESH_S);
  f->min_refetch_interval_s =
      get_u32(L, path, pj, "min_refetch_interval_s", 1, 86400,
              SG_JWT_DEFAULT_MIN_REFETCH_INTERVAL_S);
  if (f->min_refresh_s > f->max_refresh_s)
    lerr(L,
         "%s.min_refresh_s: %u is above max_refresh_s (%u); the minimum "
         "must not exceed the maximum",
         path, f->min_refresh_s, f->max_refresh_s);

  const char *ca = NULL;
  if (json_object_get(pj, "ca_file") != NULL) {
    ca = get_string(L, path, pj, "ca_file", false);
    if (ca != NULL && (f->ca_file = resolve_path(L, ca)) == NULL)
      oom = 1;
  }
  /* OpenSSL opens the CA file as it is: a FIFO would block the load for
   * ever. */
  FILE *probe = f->ca_file != NULL ? sg_jsonload_fopen(f->ca_file) : NULL;
  if (f->ca_file != NULL && probe == NULL)
    lerr(L, "%s.ca_file: cannot read '%s': %s", path, f->ca_file,
         sg_jsonload_strerror(errno));
  else if (ca == NULL || f->ca_file != NULL) {
    f->tls = sg_keyfetch_tls_ctx_new(f->ca_file, err, sizeof err);
    if (f->tls == NULL)
      lerr(L, "%s.%s: %s", path, ca != NULL ? "ca_file" : "jwks_url", err);
  }
  if (probe != NULL)
    fclose(probe);

  if (json_object_get(pj, "fallback_jwks_file") != NULL) {
    const char *fname = get_string(L, path, pj, "fallback_jwks_file", false);
    char *file = fname ? resolve_path(L, fname) : NULL;
    if (fname != NULL && file == NULL)
      oom = 1;
    char fpath[600];
    snprintf(fpath, sizeof fpath, "%s.fallback_jwks_file", path);
    sg_jwk *jk = NULL;
    size_t njk = 0;
    if (file != NULL &&
        sg_jwks_load_file(file, fpath, &jk, &njk, jwks_report, L) == 0) {
      for (size_t i = 0; i < njk; i++) {
        if (!alg_allowed(algorithms, jk[i].alg)) {
          sg_jwk_clear(&jk[i]);
          continue;
        }
        if (push_key(p, cap, &jk[i]) != 0) {
          sg_jwk_clear(&jk[i]);
          oom = 1;
        }
      }
      free(jk);
      if (p->n_keys == 0)
        lerr(L,
             "%s: no usable key (keys with \"use\" other than \"sig\", "
             "unsupported or not in \"algorithms\" are ignored)",
             fpath);
    }
    free(file);
  }
  if (oom)
    lerr_oom(L, path);
  return true;
}

static void load_provider(struct loader *L, struct provider *p,
                          const char *path, json_t *pj) {
  static const char *const known[] = {
      "name",           "issuer",          "audiences", "keys",
      "jwks_file",      "algorithms",      "leeway_s",  "max_lifetime_s",
      "identity_claim", "required_claims", "jwks_url",  "discovery",
      "ca_file",        "fallback_jwks_file", "required",
      "connect_timeout_ms", "fetch_timeout_ms", "max_response_bytes",
      "min_refresh_s",  "max_refresh_s",   "min_refetch_interval_s", NULL};
  if (!json_is_object(pj)) {
    lerr(L, "%s: must be an object describing one token issuer", path);
    return;
  }
  int errors_before = L->errors;
  check_keys(L, path, pj, known,
             "name, issuer, audiences, keys, jwks_file, algorithms, "
             "leeway_s, max_lifetime_s, identity_claim, required_claims, "
             "jwks_url, discovery, ca_file, fallback_jwks_file, required, "
             "connect_timeout_ms, fetch_timeout_ms, max_response_bytes, "
             "min_refresh_s, max_refresh_s, min_refetch_interval_s");
  int oom = 0;
  p->name = dup_or_null(get_string(L, path, pj, "name", true), &oom);
  /* The name goes to backends as x-sparkgate-identity-provider and into
   * metrics labels, like a tenant name: same rule. Not echoed, since a bad
   * one may hold a line break. */
  if (p->name != NULL && !sg_route_name_is_valid(p->name))
    lerr(L, "%s.name: not a valid provider name: 1 to 64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit", path);
  p->issuer = dup_or_null(get_string(L, path, pj, "issuer", true), &oom);

  json_t *aud = json_object_get(pj, "audiences");
  if (!json_is_array(aud) || json_array_size(aud) == 0) {
    lerr(L,
         "%s.audiences: must be a non-empty list of strings (the \"aud\" "
         "values this proxy accepts)",
         path);
  } else {
    p->audiences = calloc(json_array_size(aud), sizeof *p->audiences);
    if (p->audiences == NULL)
      oom = 1;
    size_t i;
    json_t *a;
    json_array_foreach(aud, i, a) {
      if (p->audiences == NULL)
        break;
      if (!json_is_string(a) || json_string_length(a) == 0) {
        lerr(L, "%s.audiences[%zu]: must be a non-empty string", path, i);
        continue;
      }
      p->audiences[p->n_audiences] = strdup(json_string_value(a));
      if (p->audiences[p->n_audiences] == NULL)
        oom = 1;
      else
        p->n_audiences++;
    }
  }

  json_t *algorithms = json_object_get(pj, "algorithms");
  if (algorithms != NULL) {
    bool ok = json_is_array(algorithms) && json_array_size(algorithms) > 0;
    size_t i;
    json_t *a;
    json_array_foreach(algorithms, i, a) {
      if (!json_is_string(a) || sg_jwk_alg_parse(json_string_value(a)) < 0) {
        lerr(L, "%s.algorithms[%zu]: must be one of %s (exact case)", path, i,
             alg_list);
        ok = true; /* reported per element */
      }
    }
    if (!ok)
      lerr(L, "%s.algorithms: must be a non-empty list of algorithm names",
           path);
    json_array_foreach(algorithms, i, a) {
      int alg = json_is_string(a) ? sg_jwk_alg_parse(json_string_value(a)) : -1;
      if (alg >= 0)
        p->alg_mask |= SG_JWK_ALG_BIT(alg);
    }
  }

  p->leeway_s = SG_JWT_DEFAULT_LEEWAY_S;
  get_int(L, path, pj, "leeway_s", 0, SG_JWT_MAX_LEEWAY_S, &p->leeway_s);
  p->max_lifetime_s = 0;
  get_int(L, path, pj, "max_lifetime_s", 1, SG_JWT_MAX_LIFETIME_LIMIT_S,
          &p->max_lifetime_s);
  if (json_object_get(pj, "identity_claim") != NULL)
    p->identity_claim =
        dup_or_null(get_string(L, path, pj, "identity_claim", false), &oom);
  else
    p->identity_claim = dup_or_null("sub", &oom);

  json_t *rc = json_object_get(pj, "required_claims");
  if (rc != NULL)
    load_rules(L, p, path, rc);

  size_t cap = 0;
  char kpath[640];
  bool network = load_network(L, p, path, pj, algorithms, &cap);
  json_t *keys = network ? NULL : json_object_get(pj, "keys");
  size_t n_static = 0;
  if (keys != NULL && !json_is_array(keys)) {
    lerr(L, "%s.keys: must be a list of key objects", path);
  } else if (keys != NULL) {
    size_t i;
    json_t *kj;
    json_array_foreach(keys, i, kj) {
      snprintf(kpath, sizeof kpath, "%s.keys[%zu]", path, i);
      load_static_key(L, p, &cap, kpath, kj, algorithms);
    }
    n_static = p->n_keys;
  }

  size_t n_alg_dropped = 0;
  json_t *jwks = network ? NULL : json_object_get(pj, "jwks_file");
  if (jwks != NULL) {
    const char *fname = get_string(L, path, pj, "jwks_file", false);
    char *file = fname ? resolve_path(L, fname) : NULL;
    if (fname != NULL && file == NULL)
      oom = 1;
    snprintf(kpath, sizeof kpath, "%s.jwks_file", path);
    sg_jwk *jk = NULL;
    size_t njk = 0;
    if (file != NULL &&
        sg_jwks_load_file(file, kpath, &jk, &njk, jwks_report, L) == 0) {
      for (size_t i = 0; i < njk; i++) {
        if (!alg_allowed(algorithms, jk[i].alg)) {
          n_alg_dropped++;
          sg_jwk_clear(&jk[i]);
          continue;
        }
        if (push_key(p, &cap, &jk[i]) != 0) {
          sg_jwk_clear(&jk[i]);
          oom = 1;
        }
      }
      free(jk);
    }
    free(file);
  }

  /* Kid rules over the provider's whole key set. */
  for (size_t i = 0; i < p->n_keys; i++) {
    for (size_t j = 0; j < i; j++) {
      if (p->keys[i].kid && p->keys[j].kid &&
          strcmp(p->keys[i].kid, p->keys[j].kid) == 0)
        lerr(L,
             "%s.%s: kid \"%s\" is used by more than one key; kids must "
             "be unique within a provider",
             path,
             network ? "fallback_jwks_file"
                     : i < n_static ? "keys" : "jwks_file",
             p->keys[i].kid);
    }
    if (p->n_keys > 1 && p->keys[i].kid == NULL) {
      if (i < n_static)
        lerr(L,
             "%s.keys: a key without \"kid\" in a provider with %zu keys "
             "can never be chosen; give every key a kid",
             path, p->n_keys);
      else
        lerr(L,
             "%s.%s: a JWKS key without \"kid\" in a provider "
             "with %zu keys can never be chosen; give every key a kid",
             path, network ? "fallback_jwks_file" : "jwks_file", p->n_keys);
    }
  }
  if (!network && p->n_keys == 0 && L->errors == errors_before &&
      n_alg_dropped > 0)
    lerr(L,
         "%s: no usable key: the %zu key(s) of jwks_file have an alg not in "
         "\"algorithms\" (an RSA key without \"alg\" is taken as RS256); "
         "add the alg there, or \"alg\" to the JWKS keys",
         path, n_alg_dropped);
  else if (!network && p->n_keys == 0 && L->errors == errors_before)
    lerr(L,
         "%s: no usable key; add \"keys\" or a \"jwks_file\" with a "
         "signing key (JWKS keys with \"use\" other than \"sig\" or of "
         "unsupported types are ignored), or fetch them with \"jwks_url\" "
         "or \"discovery\"",
         path);
  if (oom)
    lerr_oom(L, path);
  if (L->errors != errors_before || p->name == NULL)
    return;
  /* The keys read so far become the provider's fixed set, or the first
   * set of its key source. */
  if (!network) {
    p->fixed = keyset_new(p->keys, p->n_keys);
    p->keys = NULL;
    p->n_keys = 0;
    if (p->fixed == NULL)
      lerr_oom(L, path);
    return;
  }
  p->src = keysource_new(p->name, p->alg_mask, p->fetch->min_refetch_interval_s);
  if (p->src == NULL) {
    lerr_oom(L, path);
    return;
  }
  if (p->n_keys > 0) {
    keyset *k = keyset_new(p->keys, p->n_keys);
    p->keys = NULL;
    p->n_keys = 0;
    if (k == NULL)
      lerr_oom(L, path);
    else
      keysource_install(p->src, k);
  }
}

int sg_jwt_providers_load(json_t *providers, const char *base_dir,
                          const char *json_path_prefix,
                          const sg_jwt_options *opts, sg_jwt_verifier **out,
                          sg_jwt_report_fn report, void *report_ctx) {
  struct loader L = {report, report_ctx, base_dir, 0};
  const char *prefix = json_path_prefix ? json_path_prefix : "jwt_providers";
  *out = NULL;
  if (!json_is_array(providers) || json_array_size(providers) == 0) {
    lerr(&L, "%s: must be a non-empty list of providers", prefix);
    return -1;
  }
  sg_jwt_verifier *v = calloc(1, sizeof *v);
  size_t n = json_array_size(providers);
  if (v == NULL || (v->providers = calloc(n, sizeof *v->providers)) == NULL) {
    free(v);
    lerr_oom(&L, prefix);
    return -1;
  }
  atomic_init(&v->refs, 1);
  v->max_token_bytes = opts && opts->max_token_bytes
                           ? opts->max_token_bytes
                           : SG_JWT_DEFAULT_MAX_TOKEN_BYTES;
  char path[512];
  for (size_t i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s[%zu]", prefix, i);
    struct provider *p = &v->providers[i];
    v->n_providers++;
    load_provider(&L, p, path, json_array_get(providers, i));
    for (size_t j = 0; j < i; j++) {
      const struct provider *q = &v->providers[j];
      if (p->name && q->name && strcmp(p->name, q->name) == 0)
        lerr(&L,
             "%s.name: \"%s\" is also the name of %s[%zu]; names must be "
             "unique",
             path, p->name, prefix, j);
      /* The token's iss picks the provider, so two providers for one
       * issuer would make the choice arbitrary. */
      if (p->issuer && q->issuer && strcmp(p->issuer, q->issuer) == 0)
        lerr(&L,
             "%s.issuer: \"%s\" is also the issuer of %s[%zu]; merge "
             "their keys into one provider",
             path, p->issuer, prefix, j);
    }
  }
  if (L.errors != 0) {
    verifier_free(v);
    return -1;
  }
  v->generation = atomic_fetch_add(&next_generation, 1);
  *out = v;
  return 0;
}

/* ---- verification -------------------------------------------------------- */

static int fail(sg_jwt_result *out, int reason, const char *detail) {
  out->detail = detail;
  return reason;
}

/* 1: present and sane, 0: absent, -1: not an integer or out of range. */
static int time_claim(const json_t *payload, const char *name, int64_t *out) {
  const json_t *v = json_object_get(payload, name);
  if (v == NULL)
    return 0;
  if (!json_is_integer(v))
    return -1;
  json_int_t t = json_integer_value(v);
  if (t < 0 || t > SG_JWT_MAX_TIME)
    return -1;
  *out = (int64_t)t;
  return 1;
}

static bool rule_matches(const struct claim_rule *r, const json_t *v) {
  for (size_t i = 0; i < r->n_values; i++)
    if (json_equal(r->values[i], (json_t *)v))
      return true;
  return false;
}

static int check_claims(const struct provider *p, const json_t *payload,
                        int64_t now, sg_jwt_result *out) {
  int64_t exp = 0, nbf = 0, iat = 0;
  int rc = time_claim(payload, "exp", &exp);
  if (rc == 0)
    return fail(out, SG_JWT_MISSING_CLAIM, "exp claim is missing");
  if (rc < 0)
    return fail(out, SG_JWT_MALFORMED, "exp is not an integer time");
  if (now >= exp + p->leeway_s)
    return fail(out, SG_JWT_EXPIRED, "exp has passed");
  rc = time_claim(payload, "nbf", &nbf);
  if (rc < 0)
    return fail(out, SG_JWT_MALFORMED, "nbf is not an integer time");
  if (rc > 0 && nbf - p->leeway_s > now)
    return fail(out, SG_JWT_NOT_YET_VALID, "nbf is in the future");
  int has_iat = time_claim(payload, "iat", &iat);
  if (has_iat < 0)
    return fail(out, SG_JWT_MALFORMED, "iat is not an integer time");
  if (has_iat > 0 && iat - p->leeway_s > now)
    return fail(out, SG_JWT_ISSUED_IN_FUTURE, "iat is in the future");
  if (p->max_lifetime_s > 0) {
    if (has_iat == 0)
      return fail(out, SG_JWT_MISSING_CLAIM,
                  "iat claim is missing (max_lifetime_s needs it)");
    if (exp - iat > p->max_lifetime_s)
      return fail(out, SG_JWT_LIFETIME_TOO_LONG,
                  "exp - iat exceeds max_lifetime_s");
  }

  const json_t *aud = json_object_get(payload, "aud");
  if (aud == NULL)
    return fail(out, SG_JWT_MISSING_CLAIM, "aud claim is missing");
  if (!json_is_string(aud) && !json_is_array(aud))
    return fail(out, SG_JWT_MALFORMED, "aud is neither a string nor a list");
  bool aud_ok = false;
  for (size_t i = 0; i < (json_is_array(aud) ? json_array_size(aud) : 1); i++) {
    const json_t *a = json_is_array(aud) ? json_array_get(aud, i) : aud;
    if (!json_is_string(a))
      return fail(out, SG_JWT_MALFORMED, "aud list holds a non-string");
    for (size_t j = 0; j < p->n_audiences && !aud_ok; j++)
      aud_ok = strcmp(json_string_value(a), p->audiences[j]) == 0 &&
               strlen(p->audiences[j]) == json_string_length(a);
  }
  if (!aud_ok)
    return fail(out, SG_JWT_WRONG_AUDIENCE, "aud names none of the audiences");

  for (size_t i = 0; i < p->n_rules; i++) {
    const struct claim_rule *r = &p->rules[i];
    const json_t *v = json_object_get(payload, r->name);
    if (v == NULL)
      return fail(out, SG_JWT_MISSING_CLAIM, "a required claim is missing");
    bool ok = false;
    if (json_is_array(v)) {
      for (size_t j = 0; j < json_array_size(v) && !ok; j++)
        ok = rule_matches(r, json_array_get(v, j));
    } else {
      ok = rule_matches(r, v);
    }
    if (!ok)
      return fail(out, SG_JWT_CLAIM_MISMATCH,
                  "a required claim has none of the required values");
  }

  const json_t *id = json_object_get(payload, p->identity_claim);
  if (id == NULL)
    return fail(out, SG_JWT_MISSING_CLAIM, "the identity claim is missing");
  if (!json_is_string(id) || json_string_length(id) == 0 ||
      json_string_length(id) > SG_JWT_MAX_IDENTITY_BYTES)
    return fail(out, SG_JWT_BAD_IDENTITY,
                "the identity claim is not a non-empty string of at most "
                "512 bytes");
  /* The identity goes upstream as a gRPC metadata value: printable ASCII
   * (gRPC's ASCII-Value), and no leading or trailing space or tab (RFC
   * 9113 §8.2.1), as for certificate identities. UTF-8 sent raw would be
   * read as US-ASCII by grpc-java, every non-ASCII byte becoming U+FFFD,
   * so that distinct identities would meet at the backend; a padded one
   * is reset by a strict backend (14, retried forever) or trimmed into
   * another caller's name. */
  const unsigned char *s = (const unsigned char *)json_string_value(id);
  size_t id_len = json_string_length(id);
  for (size_t i = 0; i < id_len; i++)
    if (s[i] < 0x20 || s[i] > 0x7e)
      return fail(out, SG_JWT_BAD_IDENTITY,
                  "the identity claim holds characters outside printable "
                  "ASCII");
  if (s[0] == ' ' || s[id_len - 1] == ' ')
    return fail(out, SG_JWT_BAD_IDENTITY,
                "the identity claim starts or ends with a space");

  const json_t *cnf = json_object_get(payload, "cnf");
  const char *x5t = NULL;
  if (cnf != NULL) {
    if (!json_is_object(cnf))
      return fail(out, SG_JWT_MALFORMED, "cnf is not an object");
    const json_t *t = json_object_get(cnf, "x5t#S256");
    if (t != NULL) {
      unsigned char digest[34];
      /* A SHA-256 thumbprint: exactly 43 canonical base64url characters. */
      if (!json_is_string(t) || json_string_length(t) != 43 ||
          sg_b64url_decode(json_string_value(t), 43, digest) != 32)
        return fail(out, SG_JWT_MALFORMED,
                    "cnf.x5t#S256 is not a base64url SHA-256 thumbprint");
      x5t = json_string_value(t);
    } else {
      /* A token bound to a key whose possession we cannot check (DPoP's
       * jkt, RFC 7800's jwk, ...): taking it as a bearer token would let
       * whoever stole it use it, ignoring the binding its issuer signed.
       * What is not understood fails, as for crit. */
      return fail(out, SG_JWT_CNF_UNSUPPORTED,
                  "cnf binds the token by a method other than x5t#S256");
    }
  }

  int oom = 0;
  out->identity = result_dup(json_string_value(id), &oom);
  out->provider = result_dup(p->name, &oom);
  out->cnf_x5t_s256 = result_dup(x5t, &oom);
  out->exp = exp;
  out->iat = has_iat > 0 ? iat : -1;
  if (oom) {
    sg_jwt_result_clear(out);
    return fail(out, SG_JWT_INTERNAL, "out of memory");
  }
  return SG_JWT_OK;
}

/* NULL with *reason SG_JWT_MALFORMED (not a JSON object) or
 * SG_JWT_INTERNAL (out of memory); *reason is left alone otherwise. */
static json_t *decode_json_part(const char *b64, size_t len,
                                unsigned char *buf, int *reason) {
  long n = sg_b64url_decode(b64, len, buf);
  /* Duplicate keys are refused: with {"sub":"a","sub":"b"} two parsers
   * may disagree on the value; refusing the token settles it. And a claim
   * jansson shortened when memory ran out must never be read. */
  json_error_t e;
  bool oom = false;
  json_t *j = n > 0 ? sg_jsonload_parse((const char *)buf, (size_t)n, &e, &oom)
                    : NULL;
  if (j == NULL || !json_is_object(j)) {
    json_decref(j);
    *reason = oom ? SG_JWT_INTERNAL : SG_JWT_MALFORMED;
    return NULL;
  }
  return j;
}

static const sg_jwk *select_key(const keyset *ks, const char *kid) {
  if (ks == NULL)
    return NULL;
  /* A provider's only key, configured without kid, serves any token of
   * that issuer: IdPs put a kid in every token, and demanding that the
   * operator copies it into the config would buy no safety (the key is
   * still the only one and still pinned to its alg). */
  if (ks->n_keys == 1 && (kid == NULL || ks->keys[0].kid == NULL))
    return &ks->keys[0];
  if (kid == NULL)
    return NULL;
  for (size_t i = 0; i < ks->n_keys; i++)
    if (ks->keys[i].kid != NULL && strcmp(ks->keys[i].kid, kid) == 0)
      return &ks->keys[i];
  return NULL;
}

/* Whether a token with this alg could be verified by a key the provider
 * might fetch: only then is an unknown kid worth asking the network. */
static bool fetchable_alg(const struct provider *p, const char *alg) {
  int a = sg_jwk_alg_parse(alg);
  if (a < 0 || alg[0] == 'H')
    return false;
  return p->alg_mask == 0 || (p->alg_mask & SG_JWK_ALG_BIT(a)) != 0;
}

/* HMAC tokens of typ JWT: libjwt on exactly the bytes we checked, with
 * the key we chose. */
static bool libjwt_signature_ok(const sg_jwk *k, const char *token,
                                size_t len) {
  char *copy = malloc(len + 1);
  if (copy == NULL)
    return false;
  memcpy(copy, token, len);
  copy[len] = '\0';
  jwt_t *jwt = NULL;
  int rc = jwt_decode(&jwt, copy, k->material, (int)k->material_len);
  bool ok = rc == 0 && jwt != NULL && (int)jwt_get_alg(jwt) == k->jwt_alg;
  jwt_free(jwt);
  free(copy);
  /* What OpenSSL queued under libjwt (memory ran out) is nobody's to read:
   * left on this worker thread, it would be taken for the cause of the
   * next TLS error reported here. */
  if (!ok)
    ERR_clear_error();
  return ok;
}

static const EVP_MD *alg_md(int jwt_alg) {
  switch (jwt_alg) {
  case JWT_ALG_HS256:
  case JWT_ALG_RS256:
  case JWT_ALG_ES256:
    return EVP_sha256();
  case JWT_ALG_HS384:
  case JWT_ALG_RS384:
  case JWT_ALG_ES384:
    return EVP_sha384();
  case JWT_ALG_HS512:
  case JWT_ALG_RS512:
    return EVP_sha512();
  default:
    return NULL;
  }
}

/* An HMAC token libjwt 1.10 refuses before its signature only because its
 * typ is not "JWT" (RFC 9068 access tokens: "at+jwt"): the same check as
 * libjwt's, made with OpenSSL. `sig` is decoded and fits the key. */
static bool hmac_signature_ok(const sg_jwk *k, const EVP_MD *md,
                              const char *input, size_t input_len,
                              const unsigned char *sig, size_t sig_len) {
  if (k->material_len > INT_MAX)
    return false;
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_len = 0;
  bool ok = HMAC(md, k->material, (int)k->material_len,
                 (const unsigned char *)input, input_len, mac, &mac_len) !=
                NULL &&
            mac_len == sig_len && CRYPTO_memcmp(mac, sig, sig_len) == 0;
  OPENSSL_cleanse(mac, sizeof mac);
  return ok;
}

/* RSA and EC tokens are checked with OpenSSL against the key parsed at
 * load, never by libjwt: libjwt 1.10 parses the PEM again for every
 * token, 350 us of OpenSSL 3's decoder that any forged token would cost
 * us. `input` is header.payload as sent; `sig` decoded, fitting the key. */
static bool pkey_signature_ok(const sg_jwk *k, const EVP_MD *md,
                              const char *input, size_t input_len,
                              const unsigned char *sig, size_t sig_len) {
  unsigned char *der = NULL;
  const unsigned char *vsig = sig;
  size_t vlen = sig_len;
  if (EVP_PKEY_get_base_id(k->pkey) == EVP_PKEY_EC) {
    /* JWS carries r || s (RFC 7518 §3.4); OpenSSL verifies DER. */
    size_t half = sig_len / 2;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, (int)half, NULL);
    BIGNUM *s = BN_bin2bn(sig + half, (int)half, NULL);
    int der_len = 0;
    if (es != NULL && r != NULL && s != NULL && ECDSA_SIG_set0(es, r, s) == 1) {
      r = s = NULL; /* owned by es now */
      der_len = i2d_ECDSA_SIG(es, &der);
    }
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    vsig = der;
    vlen = der_len > 0 ? (size_t)der_len : 0;
  }
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  bool ok = ctx != NULL && vsig != NULL && vlen > 0 &&
            EVP_DigestVerifyInit(ctx, NULL, md, NULL, k->pkey) == 1 &&
            EVP_DigestVerify(ctx, vsig, vlen, (const unsigned char *)input,
                             input_len) == 1;
  OPENSSL_free(der);
  EVP_MD_CTX_free(ctx);
  return ok;
}

/* `sig` is the decoded signature, whose length already fits the key. */
static bool signature_ok(const sg_jwk *k, bool typ_is_jwt, const char *token,
                         size_t len, size_t input_len,
                         const unsigned char *sig, size_t sig_len) {
  if (k->is_hmac && typ_is_jwt)
    return libjwt_signature_ok(k, token, len);
  const EVP_MD *md = alg_md(k->jwt_alg);
  if (md == NULL || sig_len != k->sig_len)
    return false;
  bool ok = k->pkey != NULL
                ? pkey_signature_ok(k, md, token, input_len, sig, sig_len)
                : k->is_hmac &&
                      hmac_signature_ok(k, md, token, input_len, sig, sig_len);
  /* A failed verification leaves OpenSSL's reasons queued on this worker
   * thread, where they would be taken for the cause of its next TLS error. */
  ERR_clear_error();
  return ok;
}

/* RFC 9068 §2.1: a JWT access token says "at+jwt" (or the media type
 * "application/at+jwt"); other issuers say "JWT" or nothing. Other typs
 * name other objects (a logout token, a DPoP proof, ...), never an
 * access token. Compared case-insensitively (RFC 7515 §4.1.9). */
static bool typ_accepted(const json_t *typ, bool *is_jwt) {
  static const char *const names[] = {"JWT", "at+jwt", "application/at+jwt",
                                      "application/jwt"};
  if (!json_is_string(typ) ||
      strlen(json_string_value(typ)) != json_string_length(typ))
    return false;
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    if (strcasecmp(json_string_value(typ), names[i]) == 0) {
      *is_jwt = i == 0;
      return true;
    }
  }
  return false;
}

int sg_jwt_verify(const sg_jwt_verifier *v, const char *token, size_t len,
                  int64_t now, sg_jwt_result *out) {
  if (out == NULL)
    return SG_JWT_INTERNAL;
  memset(out, 0, sizeof *out);
  if (v == NULL)
    return fail(out, SG_JWT_INTERNAL, "no verifier");
  if (token == NULL || len == 0)
    return fail(out, SG_JWT_MALFORMED, "empty token");
  /* First, before any work proportional to the input. */
  if (len > v->max_token_bytes)
    return fail(out, SG_JWT_TOO_LONG, "token is longer than max_token_bytes");

  const char *end = token + len;
  const char *d1 = memchr(token, '.', len);
  const char *d2 = d1 ? memchr(d1 + 1, '.', (size_t)(end - d1 - 1)) : NULL;
  if (d2 == NULL || memchr(d2 + 1, '.', (size_t)(end - d2 - 1)) != NULL)
    return fail(out, SG_JWT_MALFORMED, "not three dot-separated parts");
  size_t hlen = (size_t)(d1 - token), plen = (size_t)(d2 - d1 - 1),
         slen = (size_t)(end - d2 - 1);
  if (hlen == 0 || plen == 0)
    return fail(out, SG_JWT_MALFORMED, "empty header or payload");

  /* One scratch buffer is enough for any of the parts: len is bounded. */
  unsigned char *buf = malloc(sg_b64url_decoded_max(len) + 1);
  if (buf == NULL)
    return fail(out, SG_JWT_INTERNAL, "out of memory");
  json_t *header = NULL, *payload = NULL;
  int reason = SG_JWT_OK;
  const char *detail = NULL;
  const struct provider *p = NULL;
  keyset *ks = NULL; /* a reference when p->src: released at done */
  uint64_t key_gen = 0;

  header = decode_json_part(token, hlen, buf, &reason);
  if (header == NULL) {
    detail = reason == SG_JWT_INTERNAL
                 ? "out of memory"
                 : "header is not canonical base64url of a JSON object "
                   "without duplicate keys";
    goto done;
  }
  const json_t *alg = json_object_get(header, "alg");
  if (!json_is_string(alg)) {
    reason = SG_JWT_MALFORMED;
    detail = "header has no string alg";
    goto done;
  }
  /* Any spelling: libjwt maps "None" and "NONE" to no signature at all. */
  if (strcasecmp(json_string_value(alg), "none") == 0) {
    reason = SG_JWT_BAD_ALG;
    detail = "alg none is never accepted";
    goto done;
  }
  /* RFC 7515 §4.1.11: extensions we do not implement must fail; we
   * implement none. */
  if (json_object_get(header, "crit") != NULL) {
    reason = SG_JWT_CRIT_UNSUPPORTED;
    detail = "header has crit";
    goto done;
  }
  const json_t *typ = json_object_get(header, "typ");
  bool typ_is_jwt = true; /* what libjwt 1.10 takes: "JWT" or none */
  if (typ != NULL && !typ_accepted(typ, &typ_is_jwt)) {
    reason = SG_JWT_BAD_TYP;
    detail = "header typ is not JWT, at+jwt, application/at+jwt or "
             "application/jwt";
    goto done;
  }
  const json_t *kid = json_object_get(header, "kid");
  if (kid != NULL && !json_is_string(kid)) {
    reason = SG_JWT_MALFORMED;
    detail = "header kid is not a string";
    goto done;
  }
  /* jku, x5u, jwk, x5c are deliberately ignored: keys come from config. */

  /* Checked after alg so that an unsigned "none" token, whose signature
   * part is empty, is reported as bad_alg. */
  long sig_n = slen > 0 ? sg_b64url_decode(d2 + 1, slen, buf) : -1;
  if (sig_n <= 0) {
    reason = SG_JWT_MALFORMED;
    detail = "signature is empty or not canonical base64url";
    goto done;
  }

  payload = decode_json_part(d1 + 1, plen, buf, &reason);
  if (payload == NULL) {
    detail = reason == SG_JWT_INTERNAL
                 ? "out of memory"
                 : "payload is not canonical base64url of a JSON object "
                   "without duplicate keys";
    goto done;
  }
  const json_t *iss = json_object_get(payload, "iss");
  if (iss == NULL) {
    reason = SG_JWT_MISSING_CLAIM;
    detail = "iss claim is missing";
    goto done;
  }
  if (!json_is_string(iss)) {
    reason = SG_JWT_MALFORMED;
    detail = "iss is not a string";
    goto done;
  }
  for (size_t i = 0; i < v->n_providers && p == NULL; i++)
    if (strcmp(v->providers[i].issuer, json_string_value(iss)) == 0 &&
        strlen(v->providers[i].issuer) == json_string_length(iss))
      p = &v->providers[i];
  if (p == NULL) {
    reason = SG_JWT_UNKNOWN_ISSUER;
    detail = "no provider has this issuer";
    goto done;
  }
  const char *kid_s = kid ? json_string_value(kid) : NULL;
  const sg_jwk *key = NULL;
  for (int attempt = 0; p->src == NULL || attempt < 2; attempt++) {
    ks = p->src != NULL ? keysource_acquire(p->src, &key_gen) : p->fixed;
    key = select_key(ks, kid_s);
    if (key != NULL || p->src == NULL)
      break;
    /* Network keys without this kid (or no keys yet): the provider may
     * have rotated. Ask for a refetch, rate-limited, and never wait. */
    int d = SG_JWT_KEYS_DENY;
    if (ks == NULL || (kid_s != NULL && fetchable_alg(p, json_string_value(alg))))
      d = sg_jwt_keysource_unknown_kid(p->src, key_gen, sg_jwt_monotonic_ms());
    if (d == SG_JWT_KEYS_RETRY && attempt == 0) {
      keyset_unref(ks);
      ks = NULL;
      continue;
    }
    if (ks == NULL) {
      reason = SG_JWT_KEYS_UNAVAILABLE;
      detail = "the provider has no keys yet (fetch pending or failing)";
      goto done;
    }
    if (d != SG_JWT_KEYS_DENY) {
      reason = SG_JWT_KID_REFETCHING;
      detail = "no key of the provider has this kid; its keys are being "
               "refetched";
      goto done;
    }
    break;
  }
  if (key == NULL) {
    reason = SG_JWT_UNKNOWN_KID;
    detail = kid ? "no key of the provider has this kid"
                 : "token has no kid and the provider has several keys";
    goto done;
  }
  if (strcmp(json_string_value(alg), key->alg) != 0) {
    reason = SG_JWT_BAD_ALG;
    detail = "alg is not the algorithm the key is pinned to";
    goto done;
  }
  if ((size_t)sig_n != key->sig_len) {
    reason = SG_JWT_BAD_SIGNATURE;
    detail = "signature length does not fit the key";
    goto done;
  }
  /* buf held the payload since; the signature is decoded again. */
  if (!(sg_b64url_decode(d2 + 1, slen, buf) == sig_n &&
        signature_ok(key, typ_is_jwt, token, len, (size_t)(d2 - token), buf,
                     (size_t)sig_n))) {
    reason = SG_JWT_BAD_SIGNATURE;
    detail = "signature does not verify";
    /* A provider's only key has no kid, so it was tried for this token's
     * kid: the provider may have rotated to a key with that kid. Ask for
     * a refetch as for an unknown kid (14 while it runs, not 16 for every
     * token of the new key until the next scheduled refresh). */
    if (p->src != NULL && kid_s != NULL && key->kid == NULL &&
        fetchable_alg(p, json_string_value(alg)) &&
        sg_jwt_keysource_unknown_kid(p->src, key_gen, sg_jwt_monotonic_ms()) !=
            SG_JWT_KEYS_DENY) {
      reason = SG_JWT_KID_REFETCHING;
      detail = "the provider's only key has no kid and does not verify this "
               "token; its keys are being refetched";
    }
    goto done;
  }
  reason = check_claims(p, payload, now, out);
  if (reason == SG_JWT_OK) {
    out->claims = payload;
    out->provider_index = (size_t)(p - v->providers);
    out->key_generation = key_gen;
    payload = NULL;
  }
  detail = out->detail;

done:
  if (p != NULL && p->src != NULL)
    keyset_unref(ks);
  json_decref(header);
  json_decref(payload);
  free(buf);
  out->detail = detail;
  return reason;
}
