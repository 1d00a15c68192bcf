#include "sparkgate/clientcount.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <netinet/in.h>

typedef struct slot {
  sg_client_key key;
  uint32_t count; /* 0: free */
} slot;

struct sg_clientcount {
  /* Taken at accept and close only, never on the data path. */
  pthread_mutex_t lock;
  slot slots[SG_CLIENTCOUNT_SLOTS];
};

/* In zeroed static storage: its pages are touched only by the addresses
 * counted. */
static sg_clientcount process_counts = {.lock = PTHREAD_MUTEX_INITIALIZER};

sg_clientcount *sg_clientcount_process(void) { return &process_counts; }

sg_clientcount *sg_clientcount_new(void) {
  sg_clientcount *cc = calloc(1, sizeof(sg_clientcount));
  if (cc != NULL && pthread_mutex_init(&cc->lock, NULL) != 0) {
    free(cc);
    return NULL;
  }
  return cc;
}

void sg_clientcount_free(sg_clientcount *cc) {
  if (cc == NULL)
    return;
  pthread_mutex_destroy(&cc->lock);
  free(cc);
}

sg_client_key sg_client_key_of(const struct sockaddr *addr) {
  sg_client_key k;
  memset(&k, 0, sizeof k);
  if (addr->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)addr;
    k.addr[10] = 0xff;
    k.addr[11] = 0xff;
    memcpy(&k.addr[12], &in->sin_addr, 4);
  } else if (addr->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)addr;
    memcpy(k.addr, &in6->sin6_addr, 16);
  }
  return k;
}

static uint32_t hash(const sg_client_key *k) {
  /* FNV-1a: the table only spreads addresses; an attacker who collides
   * them only shares a count with itself. */
  uint32_t h = 2166136261u;
  for (int i = 0; i < 16; i++)
    h = (h ^ k->addr[i]) * 16777619u;
  return h;
}

/* Linear probing without deletion markers: a freed slot keeps its key with
 * count 0, so probe chains stay intact; the key is reused by the same
 * address or overwritten when a probe finds it free and the address is
 * not further along. */
static slot *find(sg_clientcount *cc, const sg_client_key *k, bool insert) {
  uint32_t i = hash(k) % SG_CLIENTCOUNT_SLOTS;
  slot *free_slot = NULL;
  for (uint32_t n = 0; n < SG_CLIENTCOUNT_SLOTS; n++, i = (i + 1) % SG_CLIENTCOUNT_SLOTS) {
    slot *s = &cc->slots[i];
    if (memcmp(&s->key, k, sizeof *k) == 0 && s->count > 0)
      return s;
    if (s->count == 0) {
      if (free_slot == NULL)
        free_slot = s;
      if (memcmp(&s->key, &(sg_client_key){{0}}, sizeof *k) == 0)
        break; /* never used: the address is not further along */
    }
  }
  if (!insert || free_slot == NULL)
    return NULL;
  free_slot->key = *k;
  return free_slot;
}

bool sg_clientcount_take(sg_clientcount *cc, const sg_client_key *key,
                         uint32_t limit, bool *counted) {
  pthread_mutex_lock(&cc->lock);
  slot *s = find(cc, key, true);
  bool ok = s == NULL /* full: not limited (documented) */ ||
            limit == 0 || s->count < limit;
  if (s != NULL && ok)
    s->count++;
  pthread_mutex_unlock(&cc->lock);
  if (counted != NULL)
    *counted = s != NULL && ok;
  return ok;
}

void sg_clientcount_release(sg_clientcount *cc, const sg_client_key *key) {
  pthread_mutex_lock(&cc->lock);
  slot *s = find(cc, key, false);
  if (s != NULL && s->count > 0)
    s->count--;
  pthread_mutex_unlock(&cc->lock);
}
