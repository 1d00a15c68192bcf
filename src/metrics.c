#include "sparkgate/metrics.h"

#include <dirent.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sys/resource.h>

#include <event2/buffer.h>

#include "sg_build_config.h"

/* Counter blocks are allocated in whole cache lines so that two workers
 * never write the same line. */
#define CACHE_LINE 64

static const char *const method_names[SG_METHOD_COUNT] = {
    "ExecutePlan",    "AnalyzePlan",    "Config",         "AddArtifacts",
    "ArtifactStatus", "Interrupt",      "ReattachExecute", "ReleaseExecute",
    "ReleaseSession", "FetchErrorDetails", "other",
};

static const double duration_bounds[SG_METRICS_N_DURATION_BUCKETS] =
    SG_METRICS_DURATION_BUCKETS;
/* Finite buckets plus +Inf. */
#define N_BUCKETS (SG_METRICS_N_DURATION_BUCKETS + 1)

#define SPARK_SERVICE_PREFIX "/spark.connect.SparkConnectService/"

/* ---- single-writer counters -------------------------------------------- */

/* Only the owning worker writes a counter, so a plain load + store is
 * enough; the atomics only keep the scrape's concurrent reads defined. */
static inline void bump(uint64_t *p, uint64_t n) {
  __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

static inline uint64_t peek(const uint64_t *p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void *alloc_lines(size_t size) {
  size_t rounded = (size + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
  if (rounded == 0)
    rounded = CACHE_LINE;
  void *p = aligned_alloc(CACHE_LINE, rounded);
  if (p != NULL)
    memset(p, 0, rounded);
  return p;
}

/* Per worker, not per tenant. Indices into worker counters: */
enum {
  WC_CONNS_ACCEPTED = 0,
  WC_CONNS_CLOSED,
  WC_STREAMS_OPENED,
  WC_STREAMS_CLOSED,
  WC_CONNS_REFUSED_MAX,        /* over max_connections */
  WC_CONNS_REFUSED_PER_CLIENT, /* over max_connections_per_client */
  WC_FIXED, /* then n_tls TLS reasons, then n_auth auth reasons */
};

typedef struct tenant_block {
  uint64_t rpcs[SG_METHOD_COUNT][SG_METRICS_GRPC_STATUS_COUNT];
  uint64_t bytes_in;
  uint64_t bytes_out;
  uint64_t sessions_rehomed;
  uint64_t upstream_retries;
  uint64_t duration_buckets[SG_METHOD_COUNT][N_BUCKETS]; /* not cumulative */
  uint64_t duration_sum_ns[SG_METHOD_COUNT];
} tenant_block;

typedef struct backend_cell {
  _Alignas(CACHE_LINE) uint64_t ok;
  uint64_t failed;
} backend_cell;

typedef struct backend_slot {
  char *name;
  backend_cell *cells; /* [n_workers] */
} backend_slot;

typedef struct tenant_slot {
  char *name;
  tenant_block **blocks; /* [n_workers] */
  backend_slot **backends;
  size_t n_backends;
  size_t cap_backends;
  uint64_t render_mark; /* dedup within one render */
} tenant_slot;

typedef struct reason_list {
  char **names;
  size_t count;
} reason_list;

struct sg_metrics_worker {
  sg_metrics_gen *gen;
  unsigned index;
  uint64_t *counters; /* the worker's WC_* block */
};

typedef struct gen_tenant {
  tenant_slot *slot;
  backend_slot **backends; /* [n_backends] */
  size_t n_backends;
} gen_tenant;

struct sg_metrics_gen {
  int refcount_;
  sg_metrics *m;
  gen_tenant *tenants;
  size_t n_tenants;
  sg_metrics_worker *workers; /* [n_workers] */
};

struct sg_metrics {
  unsigned n_workers;
  sg_metrics_extra_fn extra; /* more families, rendered by their owner */
  void *extra_arg;
  pthread_mutex_t lock; /* the slot registry, current, render */
  reason_list tls;
  reason_list auth;
  uint64_t **worker_counters; /* [n_workers] */
  size_t n_worker_counters;   /* WC_FIXED + tls + auth */

  tenant_slot **slots; /* every tenant name ever configured */
  size_t n_slots;
  size_t cap_slots;
  tenant_slot *none;

  sg_metrics_gen *current; /* rendered; holds a reference */
  uint64_t render_epoch;

  uint64_t reloads_ok; /* atomic */
  uint64_t reloads_failed;
  double start_time_s;
};

/* ---- methods ------------------------------------------------------------ */

const char *sg_metrics_method_name(sg_metrics_method method) {
  return (unsigned)method < SG_METHOD_COUNT ? method_names[method] : "other";
}

sg_metrics_method sg_metrics_method_from_path(const char *path, size_t len) {
  static const size_t plen = sizeof SPARK_SERVICE_PREFIX - 1;
  if (path == NULL || len <= plen || memcmp(path, SPARK_SERVICE_PREFIX, plen) != 0)
    return SG_METHOD_OTHER;
  const char *name = path + plen;
  size_t nlen = len - plen;
  for (int i = 0; i < SG_METHOD_OTHER; i++) {
    if (strlen(method_names[i]) == nlen && memcmp(method_names[i], name, nlen) == 0)
      return (sg_metrics_method)i;
  }
  return SG_METHOD_OTHER;
}

/* ---- slots -------------------------------------------------------------- */

static void backend_slot_free(backend_slot *b) {
  if (b == NULL)
    return;
  free(b->name);
  free(b->cells);
  free(b);
}

static void tenant_slot_free(sg_metrics *m, tenant_slot *t) {
  if (t == NULL)
    return;
  if (t->blocks != NULL) {
    for (unsigned i = 0; i < m->n_workers; i++)
      free(t->blocks[i]);
    free(t->blocks);
  }
  for (size_t i = 0; i < t->n_backends; i++)
    backend_slot_free(t->backends[i]);
  free(t->backends);
  free(t->name);
  free(t);
}

static tenant_slot *tenant_slot_new(sg_metrics *m, const char *name) {
  tenant_slot *t = calloc(1, sizeof *t);
  if (t == NULL)
    return NULL;
  t->name = strdup(name);
  t->blocks = calloc(m->n_workers, sizeof *t->blocks);
  if (t->name == NULL || t->blocks == NULL)
    goto fail;
  for (unsigned i = 0; i < m->n_workers; i++) {
    t->blocks[i] = alloc_lines(sizeof(tenant_block));
    if (t->blocks[i] == NULL)
      goto fail;
  }
  return t;
fail:
  tenant_slot_free(m, t);
  return NULL;
}

/* Called with m->lock held. */
static tenant_slot *tenant_slot_get(sg_metrics *m, const char *name) {
  for (size_t i = 0; i < m->n_slots; i++) {
    if (strcmp(m->slots[i]->name, name) == 0)
      return m->slots[i];
  }
  if (m->n_slots == m->cap_slots) {
    size_t cap = m->cap_slots ? m->cap_slots * 2 : 8;
    tenant_slot **slots = realloc(m->slots, cap * sizeof *slots);
    if (slots == NULL)
      return NULL;
    m->slots = slots;
    m->cap_slots = cap;
  }
  tenant_slot *t = tenant_slot_new(m, name);
  if (t != NULL)
    m->slots[m->n_slots++] = t;
  return t;
}

/* Called with m->lock held. */
static backend_slot *backend_slot_get(sg_metrics *m, tenant_slot *t, const char *name) {
  for (size_t i = 0; i < t->n_backends; i++) {
    if (strcmp(t->backends[i]->name, name) == 0)
      return t->backends[i];
  }
  if (t->n_backends == t->cap_backends) {
    size_t cap = t->cap_backends ? t->cap_backends * 2 : 4;
    backend_slot **bs = realloc(t->backends, cap * sizeof *bs);
    if (bs == NULL)
      return NULL;
    t->backends = bs;
    t->cap_backends = cap;
  }
  backend_slot *b = calloc(1, sizeof *b);
  if (b == NULL)
    return NULL;
  b->name = strdup(name);
  b->cells = alloc_lines(m->n_workers * sizeof(backend_cell));
  if (b->name == NULL || b->cells == NULL) {
    backend_slot_free(b);
    return NULL;
  }
  t->backends[t->n_backends++] = b;
  return b;
}

/* ---- process start time ------------------------------------------------- */

/* Fields of /proc/self/stat after the command name (which may hold spaces
 * and parentheses, hence the search for the last ')'). |idx| counts from
 * field 3 (state) = 0. */
static int proc_stat_fields(unsigned long long *out, const int *idx, int n) {
  char buf[1024];
  FILE *f = fopen("/proc/self/stat", "re");
  if (f == NULL)
    return -1;
  size_t len = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[len] = '\0';
  char *p = strrchr(buf, ')');
  if (p == NULL)
    return -1;
  p++;
  int field = 0, found = 0;
  char *save = NULL;
  for (char *tok = strtok_r(p, " ", &save); tok != NULL && found < n;
       tok = strtok_r(NULL, " ", &save), field++) {
    for (int i = 0; i < n; i++) {
      if (idx[i] == field) {
        out[i] = strtoull(tok, NULL, 10);
        found++;
      }
    }
  }
  return found == n ? 0 : -1;
}

enum { STAT_UTIME = 11, STAT_STIME = 12, STAT_STARTTIME = 19, STAT_VSIZE = 20, STAT_RSS = 21 };

static double timespec_s(const struct timespec *ts) {
  return (double)ts->tv_sec + (double)ts->tv_nsec / 1e9;
}

/* /proc/stat (boot time) is hidden under systemd's ProcSubset=pid, so the
 * start time is derived from the process's boot-relative start and the
 * boot-relative clock instead. */
static double process_start_time(void) {
  struct timespec real, boot;
  clock_gettime(CLOCK_REALTIME, &real);
  unsigned long long start_ticks;
  const int idx[1] = {STAT_STARTTIME};
  long hz = sysconf(_SC_CLK_TCK);
  if (hz > 0 && clock_gettime(CLOCK_BOOTTIME, &boot) == 0 &&
      proc_stat_fields(&start_ticks, idx, 1) == 0) {
    double age = timespec_s(&boot) - (double)start_ticks / (double)hz;
    if (age >= 0)
      return timespec_s(&real) - age;
  }
  return timespec_s(&real);
}

/* ---- lifecycle ---------------------------------------------------------- */

static void reason_list_clear(reason_list *r) {
  for (size_t i = 0; i < r->count; i++)
    free(r->names[i]);
  free(r->names);
  r->names = NULL;
  r->count = 0;
}

static int reason_list_init(reason_list *r, const char *const *names, size_t n) {
  bool has_other = false;
  for (size_t i = 0; i < n; i++)
    has_other = has_other || strcmp(names[i], "other") == 0;
  r->names = calloc(n + 1, sizeof *r->names);
  if (r->names == NULL)
    return -1;
  for (size_t i = 0; i < n; i++) {
    if ((r->names[r->count] = strdup(names[i])) == NULL)
      return -1;
    r->count++;
  }
  if (!has_other) {
    if ((r->names[r->count] = strdup("other")) == NULL)
      return -1;
    r->count++;
  }
  return 0;
}

/* The index a recorded reason lands in: out of range means "other". */
static size_t reason_index(const reason_list *r, size_t idx) {
  if (idx < r->count)
    return idx;
  for (size_t i = 0; i < r->count; i++) {
    if (strcmp(r->names[i], "other") == 0)
      return i;
  }
  return r->count - 1;
}

sg_metrics *sg_metrics_new(unsigned n_workers, const sg_metrics_reasons *reasons) {
  if (n_workers == 0)
    return NULL;
  sg_metrics *m = calloc(1, sizeof *m);
  if (m == NULL)
    return NULL;
  m->n_workers = n_workers;
  pthread_mutex_init(&m->lock, NULL);
  static const sg_metrics_reasons no_reasons = {0};
  if (reasons == NULL)
    reasons = &no_reasons;
  if (reason_list_init(&m->tls, reasons->tls, reasons->n_tls) != 0 ||
      reason_list_init(&m->auth, reasons->auth, reasons->n_auth) != 0)
    goto fail;
  m->n_worker_counters = WC_FIXED + m->tls.count + m->auth.count;
  m->worker_counters = calloc(n_workers, sizeof *m->worker_counters);
  if (m->worker_counters == NULL)
    goto fail;
  for (unsigned i = 0; i < n_workers; i++) {
    m->worker_counters[i] = alloc_lines(m->n_worker_counters * sizeof(uint64_t));
    if (m->worker_counters[i] == NULL)
      goto fail;
  }
  m->none = tenant_slot_get(m, "none");
  if (m->none == NULL)
    goto fail;
  m->start_time_s = process_start_time();
  /* An empty generation, so that /metrics works before the first config. */
  sg_metrics_gen *g = sg_metrics_gen_new(m, NULL);
  if (g == NULL)
    goto fail;
  sg_metrics_publish(m, g);
  sg_metrics_gen_unref(g);
  return m;
fail:
  sg_metrics_free(m);
  return NULL;
}

static void gen_free(sg_metrics_gen *g) {
  if (g == NULL)
    return;
  if (g->tenants != NULL) {
    for (size_t i = 0; i < g->n_tenants; i++)
      free(g->tenants[i].backends);
    free(g->tenants);
  }
  free(g->workers);
  free(g);
}

void sg_metrics_free(sg_metrics *m) {
  if (m == NULL)
    return;
  sg_metrics_gen_unref(m->current);
  for (size_t i = 0; i < m->n_slots; i++)
    tenant_slot_free(m, m->slots[i]);
  free(m->slots);
  if (m->worker_counters != NULL) {
    for (unsigned i = 0; i < m->n_workers; i++)
      free(m->worker_counters[i]);
    free(m->worker_counters);
  }
  reason_list_clear(&m->tls);
  reason_list_clear(&m->auth);
  pthread_mutex_destroy(&m->lock);
  free(m);
}

sg_metrics_gen *sg_metrics_gen_new(sg_metrics *m, const sg_metrics_dims *dims) {
  sg_metrics_gen *g = calloc(1, sizeof *g);
  if (g == NULL)
    return NULL;
  g->refcount_ = 1; /* the caller's; sg_metrics_publish takes its own */
  g->m = m;
  g->workers = calloc(m->n_workers, sizeof *g->workers);
  size_t n = dims != NULL ? dims->n_tenants : 0;
  g->tenants = calloc(n + 1, sizeof *g->tenants);
  if (g->workers == NULL || g->tenants == NULL) {
    gen_free(g);
    return NULL;
  }
  for (unsigned i = 0; i < m->n_workers; i++) {
    g->workers[i].gen = g;
    g->workers[i].index = i;
    g->workers[i].counters = m->worker_counters[i];
  }

  pthread_mutex_lock(&m->lock);
  for (size_t t = 0; t < n; t++) {
    const sg_metrics_tenant_dims *td = &dims->tenants[t];
    gen_tenant *gt = &g->tenants[t];
    g->n_tenants = t + 1;
    gt->slot = tenant_slot_get(m, td->name != NULL ? td->name : "none");
    gt->backends = calloc(td->n_backends + 1, sizeof *gt->backends);
    if (gt->slot == NULL || gt->backends == NULL)
      goto fail_locked;
    for (size_t b = 0; b < td->n_backends; b++) {
      gt->backends[b] = backend_slot_get(m, gt->slot, td->backends[b]);
      if (gt->backends[b] == NULL)
        goto fail_locked;
      gt->n_backends = b + 1;
    }
  }
  pthread_mutex_unlock(&m->lock);
  return g;

fail_locked:
  /* Slots already created stay registered: harmless, they are reused. */
  pthread_mutex_unlock(&m->lock);
  gen_free(g);
  return NULL;
}

void sg_metrics_publish(sg_metrics *m, sg_metrics_gen *g) {
  sg_metrics_gen_ref(g);
  pthread_mutex_lock(&m->lock);
  sg_metrics_gen *old = m->current;
  m->current = g;
  pthread_mutex_unlock(&m->lock);
  sg_metrics_gen_unref(old);
}

sg_metrics_gen *sg_metrics_gen_new_from_config(sg_metrics *m, const sg_config *cfg) {
  sg_metrics_tenant_dims *tenants = calloc(cfg->n_tenants + 1, sizeof *tenants);
  const char **names = NULL;
  size_t n_names = 0;
  for (size_t t = 0; t < cfg->n_tenants; t++)
    n_names += cfg->tenants[t].n_backends;
  names = calloc(n_names + 1, sizeof *names);
  sg_metrics_gen *g = NULL;
  if (tenants != NULL && names != NULL) {
    size_t k = 0;
    for (size_t t = 0; t < cfg->n_tenants; t++) {
      const sg_tenant_config *tc = &cfg->tenants[t];
      tenants[t].name = tc->name;
      tenants[t].backends = &names[k];
      tenants[t].n_backends = tc->n_backends;
      for (size_t b = 0; b < tc->n_backends; b++)
        names[k++] = tc->backends[b].name;
    }
    sg_metrics_dims dims = {tenants, cfg->n_tenants};
    g = sg_metrics_gen_new(m, &dims);
  }
  free(names);
  free(tenants);
  return g;
}

sg_metrics_gen *sg_metrics_gen_ref(sg_metrics_gen *g) {
  __atomic_add_fetch(&g->refcount_, 1, __ATOMIC_RELAXED);
  return g;
}

void sg_metrics_gen_unref(sg_metrics_gen *g) {
  if (g != NULL && __atomic_sub_fetch(&g->refcount_, 1, __ATOMIC_ACQ_REL) == 0)
    gen_free(g);
}

sg_metrics_worker *sg_metrics_for_worker(sg_metrics_gen *g, unsigned index) {
  if (g == NULL || index >= g->m->n_workers)
    return NULL;
  return &g->workers[index];
}

/* ---- data path ---------------------------------------------------------- */

void sg_metrics_conn_accepted(sg_metrics_worker *mw) {
  if (mw != NULL)
    bump(&mw->counters[WC_CONNS_ACCEPTED], 1);
}

void sg_metrics_conn_closed(sg_metrics_worker *mw) {
  if (mw != NULL)
    bump(&mw->counters[WC_CONNS_CLOSED], 1);
}

void sg_metrics_conn_refused(sg_metrics_worker *mw, bool per_client) {
  if (mw != NULL)
    bump(&mw->counters[per_client ? WC_CONNS_REFUSED_PER_CLIENT : WC_CONNS_REFUSED_MAX], 1);
}

void sg_metrics_stream_opened(sg_metrics_worker *mw) {
  if (mw != NULL)
    bump(&mw->counters[WC_STREAMS_OPENED], 1);
}

void sg_metrics_stream_closed(sg_metrics_worker *mw) {
  if (mw != NULL)
    bump(&mw->counters[WC_STREAMS_CLOSED], 1);
}

void sg_metrics_tls_handshake_failed(sg_metrics_worker *mw, size_t reason_idx) {
  if (mw == NULL)
    return;
  const sg_metrics *m = mw->gen->m;
  bump(&mw->counters[WC_FIXED + reason_index(&m->tls, reason_idx)], 1);
}

void sg_metrics_auth_failure(sg_metrics_worker *mw, size_t reason_idx) {
  if (mw == NULL)
    return;
  const sg_metrics *m = mw->gen->m;
  bump(&mw->counters[WC_FIXED + m->tls.count + reason_index(&m->auth, reason_idx)], 1);
}

void sg_metrics_upstream_connect(sg_metrics_worker *mw, size_t tenant_idx,
                                 size_t backend_idx, bool ok) {
  if (mw == NULL || tenant_idx >= mw->gen->n_tenants)
    return;
  const gen_tenant *gt = &mw->gen->tenants[tenant_idx];
  if (backend_idx >= gt->n_backends)
    return;
  backend_cell *c = &gt->backends[backend_idx]->cells[mw->index];
  bump(ok ? &c->ok : &c->failed, 1);
}

void sg_metrics_session_rehomed(sg_metrics_worker *mw, size_t tenant_idx) {
  if (mw == NULL || tenant_idx >= mw->gen->n_tenants)
    return;
  bump(&mw->gen->tenants[tenant_idx].slot->blocks[mw->index]->sessions_rehomed, 1);
}

void sg_metrics_upstream_retry(sg_metrics_worker *mw, size_t tenant_idx) {
  if (mw == NULL || tenant_idx >= mw->gen->n_tenants)
    return;
  bump(&mw->gen->tenants[tenant_idx].slot->blocks[mw->index]->upstream_retries, 1);
}

void sg_metrics_rpc_done(sg_metrics_worker *mw, size_t tenant_idx,
                         sg_metrics_method method, int grpc_status,
                         double duration_s, uint64_t bytes_in,
                         uint64_t bytes_out) {
  if (mw == NULL)
    return;
  const sg_metrics_gen *g = mw->gen;
  /* An index from another configuration would be a wiring bug; count it
   * as "none" rather than write out of bounds. */
  tenant_slot *slot = tenant_idx < g->n_tenants ? g->tenants[tenant_idx].slot : g->m->none;
  tenant_block *b = slot->blocks[mw->index];
  if ((unsigned)method >= SG_METHOD_COUNT)
    method = SG_METHOD_OTHER;
  if (grpc_status < 0 || grpc_status >= SG_METRICS_GRPC_STATUS_COUNT)
    grpc_status = 2; /* UNKNOWN */
  bump(&b->rpcs[method][grpc_status], 1);
  bump(&b->bytes_in, bytes_in);
  bump(&b->bytes_out, bytes_out);
  if (!(duration_s >= 0)) /* negative or NaN: a clock step */
    duration_s = 0;
  size_t k = 0;
  while (k < SG_METRICS_N_DURATION_BUCKETS && duration_s > duration_bounds[k])
    k++;
  bump(&b->duration_buckets[method][k], 1);
  double ns = duration_s * 1e9;
  bump(&b->duration_sum_ns[method], ns < 1.8e19 ? (uint64_t)(ns + 0.5) : UINT64_MAX / 2);
}

void sg_metrics_reload(sg_metrics *m, bool ok) {
  __atomic_add_fetch(ok ? &m->reloads_ok : &m->reloads_failed, 1, __ATOMIC_RELAXED);
}

/* ---- render ------------------------------------------------------------- */

typedef struct render_ctx {
  struct evbuffer *out;
  int failed;
} render_ctx;

__attribute__((format(printf, 2, 3))) static void emit(render_ctx *r, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (evbuffer_add_vprintf(r->out, fmt, ap) < 0)
    r->failed = 1;
  va_end(ap);
}

static void family(render_ctx *r, const char *name, const char *type, const char *help) {
  emit(r, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Label values: backslash, double quote and newline are escaped (text
 * format 0.0.4). */
static void label_value(render_ctx *r, const char *s) {
  const char *run = s;
  for (const char *p = s;; p++) {
    const char *esc = NULL;
    if (*p == '\\')
      esc = "\\\\";
    else if (*p == '"')
      esc = "\\\"";
    else if (*p == '\n')
      esc = "\\n";
    if (esc == NULL && *p != '\0')
      continue;
    if (p > run && evbuffer_add(r->out, run, (size_t)(p - run)) != 0)
      r->failed = 1;
    if (*p == '\0')
      break;
    if (evbuffer_add(r->out, esc, strlen(esc)) != 0)
      r->failed = 1;
    run = p + 1;
  }
}

static void emit_u64_sample(render_ctx *r, const char *name, const char *labels,
                            uint64_t v) {
  emit(r, "%s%s %llu\n", name, labels, (unsigned long long)v);
}

static uint64_t sum_workers(const sg_metrics *m, size_t counter) {
  uint64_t v = 0;
  for (unsigned i = 0; i < m->n_workers; i++)
    v += peek(&m->worker_counters[i][counter]);
  return v;
}

/* The tenants to render: "none" and the current generation's, once each. */
static size_t render_tenants(sg_metrics *m, tenant_slot **out) {
  size_t n = 0;
  uint64_t mark = ++m->render_epoch;
  m->none->render_mark = mark;
  out[n++] = m->none;
  for (size_t i = 0; i < m->current->n_tenants; i++) {
    tenant_slot *t = m->current->tenants[i].slot;
    if (t->render_mark == mark)
      continue;
    t->render_mark = mark;
    out[n++] = t;
  }
  return n;
}

static void render_reasons(render_ctx *r, const sg_metrics *m, const char *name,
                           const reason_list *reasons, size_t base) {
  for (size_t i = 0; i < reasons->count; i++) {
    emit(r, "%s{reason=\"", name);
    label_value(r, reasons->names[i]);
    emit(r, "\"} %llu\n", (unsigned long long)sum_workers(m, base + i));
  }
}

static void render_process(render_ctx *r, const sg_metrics *m) {
  family(r, "process_start_time_seconds", "gauge",
         "Start time of the process since unix epoch in seconds.");
  emit(r, "process_start_time_seconds %.3f\n", m->start_time_s);

  unsigned long long v[4];
  const int idx[4] = {STAT_UTIME, STAT_STIME, STAT_VSIZE, STAT_RSS};
  long hz = sysconf(_SC_CLK_TCK);
  long page = sysconf(_SC_PAGESIZE);
  if (proc_stat_fields(v, idx, 4) == 0 && hz > 0 && page > 0) {
    family(r, "process_cpu_seconds_total", "counter",
           "Total user and system CPU time spent in seconds.");
    emit(r, "process_cpu_seconds_total %.2f\n", (double)(v[0] + v[1]) / (double)hz);
    family(r, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
    emit(r, "process_virtual_memory_bytes %llu\n", v[2]);
    family(r, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    emit(r, "process_resident_memory_bytes %llu\n", v[3] * (unsigned long long)page);
  }

  DIR *d = opendir("/proc/self/fd");
  if (d != NULL) {
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
      if (e->d_name[0] != '.')
        n++;
    }
    closedir(d);
    family(r, "process_open_fds", "gauge", "Number of open file descriptors.");
    emit(r, "process_open_fds %ld\n", n - 1); /* not the one reading the dir */
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    family(r, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
    emit(r, "process_max_fds %llu\n", (unsigned long long)rl.rlim_cur);
  }
}

static void render_tenant_rpcs(render_ctx *r, const sg_metrics *m, tenant_slot *const *ts,
                               size_t n_ts) {
  family(r, "sparkgate_rpcs_total", "counter",
         "Finished RPCs by tenant, method and gRPC status.");
  for (size_t t = 0; t < n_ts; t++) {
    for (int k = 0; k < SG_METHOD_COUNT; k++) {
      for (int s = 0; s < SG_METRICS_GRPC_STATUS_COUNT; s++) {
        uint64_t v = 0;
        for (unsigned w = 0; w < m->n_workers; w++)
          v += peek(&ts[t]->blocks[w]->rpcs[k][s]);
        if (v == 0)
          continue;
        emit(r, "sparkgate_rpcs_total{tenant=\"");
        label_value(r, ts[t]->name);
        emit(r, "\",method=\"%s\",grpc_status=\"%d\"} %llu\n", method_names[k], s,
             (unsigned long long)v);
      }
    }
  }
}

static void render_tenant_bytes(render_ctx *r, const sg_metrics *m, tenant_slot *const *ts,
                                size_t n_ts, bool in) {
  const char *name = in ? "sparkgate_request_bytes_total" : "sparkgate_response_bytes_total";
  family(r, name, "counter",
         in ? "Request message bytes received from clients, by tenant."
            : "Response message bytes sent to clients, by tenant.");
  for (size_t t = 0; t < n_ts; t++) {
    uint64_t v = 0;
    for (unsigned w = 0; w < m->n_workers; w++)
      v += peek(in ? &ts[t]->blocks[w]->bytes_in : &ts[t]->blocks[w]->bytes_out);
    emit(r, "%s{tenant=\"", name);
    label_value(r, ts[t]->name);
    emit(r, "\"} %llu\n", (unsigned long long)v);
  }
}

/* A per-tenant counter of tenant_block at |offset|, summed over workers. */
static void render_tenant_counter(render_ctx *r, const sg_metrics *m,
                                  tenant_slot *const *ts, size_t n_ts,
                                  const char *name, const char *help,
                                  size_t offset) {
  family(r, name, "counter", help);
  for (size_t t = 0; t < n_ts; t++) {
    uint64_t v = 0;
    for (unsigned w = 0; w < m->n_workers; w++)
      v += peek((const uint64_t *)((const char *)ts[t]->blocks[w] + offset));
    emit(r, "%s{tenant=\"", name);
    label_value(r, ts[t]->name);
    emit(r, "\"} %llu\n", (unsigned long long)v);
  }
}

static void render_durations(render_ctx *r, const sg_metrics *m, tenant_slot *const *ts,
                             size_t n_ts) {
  static const char *const name = "sparkgate_rpc_duration_seconds";
  family(r, name, "histogram", "RPC duration from request headers to the end of the call.");
  for (size_t t = 0; t < n_ts; t++) {
    for (int k = 0; k < SG_METHOD_COUNT; k++) {
      uint64_t buckets[N_BUCKETS] = {0};
      uint64_t sum_ns = 0, count = 0;
      for (unsigned w = 0; w < m->n_workers; w++) {
        const tenant_block *b = ts[t]->blocks[w];
        for (int i = 0; i < N_BUCKETS; i++)
          buckets[i] += peek(&b->duration_buckets[k][i]);
        sum_ns += peek(&b->duration_sum_ns[k]);
      }
      for (int i = 0; i < N_BUCKETS; i++)
        count += buckets[i];
      if (count == 0)
        continue;
      uint64_t cumulative = 0;
      for (int i = 0; i < N_BUCKETS; i++) {
        cumulative += buckets[i];
        emit(r, "%s_bucket{tenant=\"", name);
        label_value(r, ts[t]->name);
        if (i < SG_METRICS_N_DURATION_BUCKETS)
          emit(r, "\",method=\"%s\",le=\"%g\"} %llu\n", method_names[k],
               duration_bounds[i], (unsigned long long)cumulative);
        else
          emit(r, "\",method=\"%s\",le=\"+Inf\"} %llu\n", method_names[k],
               (unsigned long long)cumulative);
      }
      emit(r, "%s_sum{tenant=\"", name);
      label_value(r, ts[t]->name);
      emit(r, "\",method=\"%s\"} %.9f\n", method_names[k], (double)sum_ns / 1e9);
      emit(r, "%s_count{tenant=\"", name);
      label_value(r, ts[t]->name);
      emit(r, "\",method=\"%s\"} %llu\n", method_names[k], (unsigned long long)count);
    }
  }
}

static void render_upstreams(render_ctx *r, const sg_metrics *m, bool failures) {
  const char *name = failures ? "sparkgate_upstream_connect_failures_total"
                              : "sparkgate_upstream_connects_total";
  family(r, name, "counter",
         failures ? "Failed connection attempts to backends, by tenant and backend."
                  : "Connection attempts to backends, by tenant and backend.");
  const sg_metrics_gen *g = m->current;
  for (size_t t = 0; t < g->n_tenants; t++) {
    const gen_tenant *gt = &g->tenants[t];
    for (size_t b = 0; b < gt->n_backends; b++) {
      /* A duplicate name in the config would print a series twice. */
      bool dup = false;
      for (size_t e = 0; e < t && !dup; e++) {
        for (size_t f = 0; f < g->tenants[e].n_backends && !dup; f++)
          dup = g->tenants[e].backends[f] == gt->backends[b];
      }
      for (size_t f = 0; f < b && !dup; f++)
        dup = gt->backends[f] == gt->backends[b];
      if (dup)
        continue;
      uint64_t ok = 0, failed = 0;
      for (unsigned w = 0; w < m->n_workers; w++) {
        ok += peek(&gt->backends[b]->cells[w].ok);
        failed += peek(&gt->backends[b]->cells[w].failed);
      }
      emit(r, "%s{tenant=\"", name);
      label_value(r, gt->slot->name);
      emit(r, "\",backend=\"");
      label_value(r, gt->backends[b]->name);
      emit(r, "\"} %llu\n", (unsigned long long)(failures ? failed : ok + failed));
    }
  }
}

int sg_metrics_render(sg_metrics *m, struct evbuffer *out) {
  render_ctx r = {out, 0};
  pthread_mutex_lock(&m->lock);

  family(&r, "sparkgate_build_info", "gauge", "Always 1; the version is a label.");
  emit(&r, "sparkgate_build_info{version=\"%s\"} 1\n", SG_VERSION);
  render_process(&r, m);

  family(&r, "sparkgate_connections_accepted_total", "counter",
         "Client connections accepted (before the TLS handshake).");
  emit_u64_sample(&r, "sparkgate_connections_accepted_total", "",
                  sum_workers(m, WC_CONNS_ACCEPTED));
  /* Closed first: a connection accepted meanwhile makes "open" larger,
   * never negative. */
  uint64_t closed = sum_workers(m, WC_CONNS_CLOSED);
  uint64_t accepted = sum_workers(m, WC_CONNS_ACCEPTED);
  family(&r, "sparkgate_connections_open", "gauge", "Client connections open now.");
  emit_u64_sample(&r, "sparkgate_connections_open", "",
                  accepted > closed ? accepted - closed : 0);
  family(&r, "sparkgate_connections_refused_total", "counter",
         "Client connections closed at accept, by the cap they were over.");
  emit_u64_sample(&r, "sparkgate_connections_refused_total", "{reason=\"max_connections\"}",
                  sum_workers(m, WC_CONNS_REFUSED_MAX));
  emit_u64_sample(&r, "sparkgate_connections_refused_total",
                  "{reason=\"max_connections_per_client\"}",
                  sum_workers(m, WC_CONNS_REFUSED_PER_CLIENT));
  family(&r, "sparkgate_tls_handshake_failures_total", "counter",
         "Client TLS handshakes that failed, by reason.");
  render_reasons(&r, m, "sparkgate_tls_handshake_failures_total", &m->tls, WC_FIXED);

  uint64_t s_closed = sum_workers(m, WC_STREAMS_CLOSED);
  uint64_t s_opened = sum_workers(m, WC_STREAMS_OPENED);
  family(&r, "sparkgate_streams_open", "gauge", "Client HTTP/2 streams open now.");
  emit_u64_sample(&r, "sparkgate_streams_open", "",
                  s_opened > s_closed ? s_opened - s_closed : 0);

  family(&r, "sparkgate_auth_failures_total", "counter",
         "Requests refused by authentication, by reason.");
  render_reasons(&r, m, "sparkgate_auth_failures_total", &m->auth, WC_FIXED + m->tls.count);

  tenant_slot **ts = calloc(m->current->n_tenants + 1, sizeof *ts);
  if (ts == NULL) {
    r.failed = 1;
  } else {
    size_t n_ts = render_tenants(m, ts);
    render_tenant_rpcs(&r, m, ts, n_ts);
    render_durations(&r, m, ts, n_ts);
    render_tenant_bytes(&r, m, ts, n_ts, true);
    render_tenant_bytes(&r, m, ts, n_ts, false);
    render_tenant_counter(
        &r, m, ts, n_ts, "sparkgate_sessions_rehomed_total",
        "Spark sessions sent to another backend than the one this worker last "
        "saw them on (failover, backends added or removed), by tenant.",
        offsetof(tenant_block, sessions_rehomed));
    render_tenant_counter(
        &r, m, ts, n_ts, "sparkgate_upstream_retries_total",
        "Calls a backend refused unprocessed (REFUSED_STREAM, GOAWAY) and "
        "sparkgate sent once more on another connection, by tenant.",
        offsetof(tenant_block, upstream_retries));
    free(ts);
  }
  render_upstreams(&r, m, false);
  render_upstreams(&r, m, true);

  family(&r, "sparkgate_config_reloads_total", "counter",
         "Configuration reloads (SIGHUP) by result.");
  emit(&r, "sparkgate_config_reloads_total{result=\"ok\"} %llu\n",
       (unsigned long long)__atomic_load_n(&m->reloads_ok, __ATOMIC_RELAXED));
  emit(&r, "sparkgate_config_reloads_total{result=\"failed\"} %llu\n",
       (unsigned long long)__atomic_load_n(&m->reloads_failed, __ATOMIC_RELAXED));

  if (m->extra != NULL && m->extra(m->extra_arg, out) != 0)
    r.failed = 1;
  pthread_mutex_unlock(&m->lock);
  return r.failed ? -1 : 0;
}

void sg_metrics_set_extra(sg_metrics *m, sg_metrics_extra_fn fn, void *arg) {
  pthread_mutex_lock(&m->lock);
  m->extra = fn;
  m->extra_arg = arg;
  pthread_mutex_unlock(&m->lock);
}

void sg_metrics_label_value(struct evbuffer *out, const char *s) {
  render_ctx r = {out, 0};
  label_value(&r, s);
}
