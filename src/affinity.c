#include "sparkgate/affinity.h"

#include <stdlib.h>
#include <string.h>

#include "sparkgate/route.h"

/* Entries live in buckets of this many slots: a lookup touches one cache
 * line or two, and a full bucket evicts its least recently used entry. */
#define SG_AFFINITY_WAYS 8u

typedef struct entry {
  uint64_t key; /* 0: empty */
  uint64_t backend_id;
  uint64_t used_ms;
} entry;

struct sg_affinity {
  entry *slots;
  size_t n_buckets;
};

static const uint8_t affinity_key[16] = {'s', 'p', 'a', 'r', 'k', 'g', 'a', 't',
                                         'e', '-', 'a', 'f', 'f', 'i', 'n', 'y'};

sg_affinity *sg_affinity_new(size_t entries) {
  sg_affinity *a = calloc(1, sizeof *a);
  if (a == NULL)
    return NULL;
  a->n_buckets = (entries + SG_AFFINITY_WAYS - 1) / SG_AFFINITY_WAYS;
  if (a->n_buckets == 0)
    a->n_buckets = 1;
  a->slots = calloc(a->n_buckets * SG_AFFINITY_WAYS, sizeof *a->slots);
  if (a->slots == NULL) {
    free(a);
    return NULL;
  }
  return a;
}

void sg_affinity_free(sg_affinity *a) {
  if (a == NULL)
    return;
  free(a->slots);
  free(a);
}

static uint64_t nonzero(uint64_t h) { return h != 0 ? h : 1; }

/* What is hashed: the three strings with their NULs, which keep
 * ("ab","c") and ("a","bc") apart. */
static size_t key_text_len(const char *tenant, const char *user_id, const char *session_id,
                           size_t lens[3]) {
  lens[0] = strlen(tenant);
  lens[1] = strlen(user_id);
  lens[2] = strlen(session_id);
  return lens[0] + lens[1] + lens[2] + 3;
}

static void key_text(char *buf, const char *tenant, const char *user_id,
                     const char *session_id, const size_t lens[3]) {
  memcpy(buf, tenant, lens[0] + 1);
  memcpy(buf + lens[0] + 1, user_id, lens[1] + 1);
  memcpy(buf + lens[0] + lens[1] + 2, session_id, lens[2] + 1);
}

uint64_t sg_affinity_key(const char *tenant, const char *user_id,
                         const char *session_id) {
  size_t lens[3];
  char small[512];
  size_t n = key_text_len(tenant, user_id, session_id, lens);
  char *buf = n <= sizeof small ? small : malloc(n);
  if (buf == NULL)
    return 1;
  key_text(buf, tenant, user_id, session_id, lens);
  uint64_t h = sg_siphash24(affinity_key, buf, n);
  if (buf != small)
    free(buf);
  return nonzero(h);
}

/* Longer texts are not remembered (session ids are UUIDs). */
#define MEMO_MAX_TEXT 256u

struct sg_affinity_memo {
  uint64_t key;
  size_t len, cap;
  char text[];
};

uint64_t sg_affinity_key_memo(sg_affinity_memo **memo, const char *tenant,
                              const char *user_id, const char *session_id) {
  size_t lens[3];
  char buf[MEMO_MAX_TEXT];
  size_t n = key_text_len(tenant, user_id, session_id, lens);
  if (n > sizeof buf)
    return sg_affinity_key(tenant, user_id, session_id);
  key_text(buf, tenant, user_id, session_id, lens);
  sg_affinity_memo *m = *memo;
  if (m != NULL && m->len == n && memcmp(m->text, buf, n) == 0)
    return m->key;
  uint64_t key = nonzero(sg_siphash24(affinity_key, buf, n));
  if (m == NULL || m->cap < n) {
    sg_affinity_memo *bigger = malloc(sizeof *bigger + n);
    if (bigger == NULL)
      return key; /* the old memo stays, for what it names */
    free(m);
    m = *memo = bigger;
    m->cap = n;
  }
  m->key = key;
  m->len = n;
  memcpy(m->text, buf, n);
  return key;
}

void sg_affinity_memo_free(sg_affinity_memo *memo) { free(memo); }

uint64_t sg_affinity_backend_id(const char *backend_name) {
  return nonzero(sg_siphash24(affinity_key, backend_name, strlen(backend_name)));
}

static entry *bucket(sg_affinity *a, uint64_t key) {
  return &a->slots[(key % a->n_buckets) * SG_AFFINITY_WAYS];
}

uint64_t sg_affinity_get(sg_affinity *a, uint64_t key, uint64_t now_ms) {
  entry *b = bucket(a, key);
  for (unsigned i = 0; i < SG_AFFINITY_WAYS; i++) {
    if (b[i].key == key) {
      if (now_ms - b[i].used_ms > SG_AFFINITY_TTL_MS) {
        b[i].key = 0;
        return 0;
      }
      return b[i].backend_id;
    }
  }
  return 0;
}

void sg_affinity_put(sg_affinity *a, uint64_t key, uint64_t backend_id,
                     uint64_t now_ms) {
  entry *b = bucket(a, key);
  entry *victim = &b[0];
  for (unsigned i = 0; i < SG_AFFINITY_WAYS; i++) {
    if (b[i].key == key || b[i].key == 0) {
      victim = &b[i];
      break;
    }
    if (b[i].used_ms < victim->used_ms)
      victim = &b[i];
  }
  victim->key = key;
  victim->backend_id = backend_id;
  victim->used_ms = now_ms;
}
