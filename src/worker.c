#include "sparkgate/worker.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <event2/thread.h>

#include "sparkgate/accept_backoff.h"
#include "sparkgate/affinity.h"
#include "sparkgate/clientcount.h"
#include "sparkgate/conn.h"
#include "sparkgate/h2mem.h"
#include "sparkgate/limits.h"
#include "sparkgate/stream.h"
#include "sparkgate/log.h"
#include "sparkgate/metrics.h"
#include "sparkgate/tls.h"
#include "sparkgate/token_cache.h"
#include "sparkgate/upstream.h"

/* A burst of new connections (a gateway restart, a notebook fleet) waits
 * in the kernel rather than being dropped; the kernel caps it at
 * net.core.somaxconn. */
#define SG_LISTEN_BACKLOG 4096

/* ---- runtime ------------------------------------------------------------ */

static void runtime_free(sg_runtime *rt) {
  const sg_config *cfg = rt->config;
  if (rt->listener_tls != NULL) {
    for (size_t i = 0; i < cfg->n_listeners; i++)
      SSL_CTX_free(rt->listener_tls[i]);
    free(rt->listener_tls);
  }
  if (rt->backend_tls != NULL) {
    for (size_t t = 0; t < cfg->n_tenants; t++) {
      if (rt->backend_tls[t] == NULL)
        continue;
      for (size_t b = 0; b < cfg->tenants[t].n_backends; b++)
        SSL_CTX_free(rt->backend_tls[t][b]);
      free(rt->backend_tls[t]);
    }
    free(rt->backend_tls);
  }
  if (rt->metrics != NULL)
    sg_metrics_gen_unref(rt->metrics);
  sg_config_unref(rt->config);
  free(rt);
}

sg_runtime *sg_runtime_new(sg_config *cfg, sg_metrics *metrics, char *err,
                           size_t errlen) {
  sg_runtime *rt = calloc(1, sizeof *rt);
  if (rt == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  rt->refcount_ = 1;
  rt->config = sg_config_ref(cfg);
  rt->listener_tls = calloc(cfg->n_listeners + 1, sizeof(SSL_CTX *));
  rt->backend_tls = calloc(cfg->n_tenants + 1, sizeof(SSL_CTX **));
  if (rt->listener_tls == NULL || rt->backend_tls == NULL) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *l = &cfg->listeners[i];
    if (l->insecure)
      continue;
    char terr[512];
    rt->listener_tls[i] = sg_tls_server_ctx_new(l, NULL, terr, sizeof terr);
    if (rt->listener_tls[i] == NULL) {
      snprintf(err, errlen, "listeners[%zu].tls: %s", i, terr);
      goto fail;
    }
  }
  for (size_t t = 0; t < cfg->n_tenants; t++) {
    const sg_tenant_config *tc = &cfg->tenants[t];
    rt->backend_tls[t] = calloc(tc->n_backends + 1, sizeof(SSL_CTX *));
    if (rt->backend_tls[t] == NULL) {
      snprintf(err, errlen, "out of memory");
      goto fail;
    }
    for (size_t b = 0; b < tc->n_backends; b++) {
      if (!tc->backends[b].tls)
        continue;
      char terr[512];
      rt->backend_tls[t][b] = sg_tls_client_ctx_new(&tc->backends[b], NULL, terr, sizeof terr);
      if (rt->backend_tls[t][b] == NULL) {
        snprintf(err, errlen, "tenants[%zu].backends[%zu].tls: %s", t, b, terr);
        goto fail;
      }
    }
  }
  /* Built, not published: /metrics shows this config's tenants once the
   * caller puts it in force (sg_metrics_publish). */
  if (metrics != NULL) {
    rt->metrics = sg_metrics_gen_new_from_config(metrics, cfg);
    if (rt->metrics == NULL) {
      snprintf(err, errlen, "out of memory");
      goto fail;
    }
  }
  return rt;
fail:
  runtime_free(rt);
  return NULL;
}

sg_runtime *sg_runtime_ref(sg_runtime *rt) {
  __atomic_add_fetch(&rt->refcount_, 1, __ATOMIC_RELAXED);
  return rt;
}

void sg_runtime_unref(sg_runtime *rt) {
  if (rt != NULL && __atomic_sub_fetch(&rt->refcount_, 1, __ATOMIC_ACQ_REL) == 0)
    runtime_free(rt);
}

/* ---- listeners ---------------------------------------------------------- */

/* A socket for listener |l| on |port| with the listeners' options, and its
 * address in |ss|; -1 (errno) when there is none. */
static int listener_socket(const sg_listener_config *l, uint16_t port, bool reuseport,
                           struct sockaddr_storage *ss, socklen_t *sslen) {
  memset(ss, 0, sizeof *ss);
  if (strchr(l->address, ':') != NULL) {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(port);
    inet_pton(AF_INET6, l->address, &in6->sin6_addr);
    *sslen = sizeof *in6;
  } else {
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
    inet_pton(AF_INET, l->address, &in->sin_addr);
    *sslen = sizeof *in;
  }
  int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  /* One socket per worker on the same port: the kernel spreads new
   * connections over the workers without a shared accept lock. */
  if (reuseport)
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (ss->ss_family == AF_INET6) /* an IPv4 listener on the port is no conflict */
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  return fd;
}

bool sg_listener_port_in_use(const sg_listener_config *l) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  int fd = listener_socket(l, l->port, false, &ss, &sslen);
  if (fd < 0)
    return false;
  bool in_use = bind(fd, (struct sockaddr *)&ss, sslen) != 0 && errno == EADDRINUSE;
  close(fd);
  return in_use;
}

static int bind_listener(const sg_listener_config *l, uint16_t *port, char *err,
                         size_t errlen) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  int fd = listener_socket(l, *port, true, &ss, &sslen);
  if (fd < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    return -1;
  }
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 ||
      listen(fd, SG_LISTEN_BACKLOG) != 0) {
    snprintf(err, errlen, "cannot listen on %s%s%s:%u: %s",
             ss.ss_family == AF_INET6 ? "[" : "", l->address,
             ss.ss_family == AF_INET6 ? "]" : "", *port, strerror(errno));
    close(fd);
    return -1;
  }
  if (*port == 0) {
    struct sockaddr_storage bound;
    socklen_t blen = sizeof bound;
    getsockname(fd, (struct sockaddr *)&bound, &blen);
    *port = ntohs(bound.ss_family == AF_INET6
                      ? ((struct sockaddr_in6 *)&bound)->sin6_port
                      : ((struct sockaddr_in *)&bound)->sin_port);
  }
  return fd;
}

/* ---- client listeners ---------------------------------------------------- */

struct sg_listener_ctx {
  sg_worker *worker;
  size_t index;
  sg_accept_backoff backoff;
};
typedef struct sg_listener_ctx listener_ctx;

static void on_accept(struct evconnlistener *listener, evutil_socket_t fd,
                      struct sockaddr *addr, int addrlen, void *arg) {
  (void)listener;
  listener_ctx *lc = arg;
  sg_accept_backoff_accepted(&lc->backoff);
  sg_conn_accept(lc->worker, lc->index, fd, addr, addrlen);
}

static void on_accept_error(struct evconnlistener *listener, void *arg) {
  listener_ctx *lc = arg;
  sg_accept_backoff_failed(&lc->backoff, listener, EVUTIL_SOCKET_ERROR());
}

/* The back-off's pause is over. A drain freed the listeners (and cleared
 * the timer): nothing to enable then. */
static void on_accept_resume(void *arg) {
  listener_ctx *lc = arg;
  sg_worker *w = lc->worker;
  if (!w->draining && w->listeners[lc->index] != NULL)
    evconnlistener_enable(w->listeners[lc->index]);
}

/* ---- generations ------------------------------------------------------ */

static void generation_free(sg_generation *g) {
  if (g == NULL)
    return;
  sg_list_unlink(&g->link);
  for (size_t i = 0; i < g->n_pools; i++)
    sg_upstream_pool_free(g->pools[i]);
  free(g->pools);
  if (g->token_cache != NULL)
    sg_token_cache_free(g->token_cache);
  for (size_t t = 0; t < g->n_tenant_states; t++)
    sg_tenant_state_clear(&g->tenant_states[t]);
  free(g->tenant_states);
  sg_runtime_unref(g->rt);
  free(g);
}

/* |prev|: the configuration this one replaces (NULL at start). */
static const sg_tenant_state *tenant_state_in(const sg_generation *g, const char *name) {
  if (g->rt->config->routes == NULL)
    return NULL;
  const sg_route_tenant *t = sg_route_table_find(g->rt->config->routes, name, strlen(name));
  return t != NULL && t->index < g->n_tenant_states ? &g->tenant_states[t->index] : NULL;
}

/* What a tenant's calls hold and have used, by name: in the configuration
 * being replaced, or else in the newest older one that still has calls (a
 * tenant removed by one reload and put back by the next keeps counting
 * the calls it still has in flight). */
static const sg_tenant_state *tenant_state_before(const sg_worker *w,
                                                  const sg_generation *prev,
                                                  const char *name) {
  if (prev == NULL)
    return NULL;
  const sg_tenant_state *was = tenant_state_in(prev, name);
  for (const sg_list *n = w->retired.prev; was == NULL && n != &w->retired; n = n->prev)
    was = tenant_state_in(SG_CONTAINER_OF(n, sg_generation, link), name);
  return was;
}

static sg_generation *generation_new(sg_worker *w, sg_runtime *rt,
                                     const sg_generation *prev) {
  const sg_config *cfg = rt->config;
  sg_generation *g = calloc(1, sizeof *g);
  if (g == NULL)
    return NULL;
  sg_list_init(&g->link);
  g->worker = w;
  g->rt = sg_runtime_ref(rt);
  if (rt->metrics != NULL)
    g->metrics = sg_metrics_for_worker(rt->metrics, w->index);
  if (cfg->jwt != NULL && cfg->token_cache_entries > 0) {
    g->token_cache = sg_token_cache_new(cfg->token_cache_entries,
                                        (int64_t)cfg->token_cache_max_ttl_s);
    if (g->token_cache == NULL) {
      generation_free(g);
      return NULL;
    }
  }
  g->tenant_states = calloc(cfg->n_tenants + 1, sizeof *g->tenant_states);
  if (g->tenant_states == NULL) {
    generation_free(g);
    return NULL;
  }
  g->n_tenant_states = cfg->n_tenants;
  uint64_t now = sg_monotonic_ms();
  for (size_t t = 0; t < cfg->n_tenants; t++) {
    /* A tenant the replaced configuration had too (by name) keeps what its
     * calls hold and have used: a reload lifts no limit. */
    const sg_tenant_state *was = tenant_state_before(w, prev, cfg->tenants[t].name);
    if (sg_tenant_state_init(&g->tenant_states[t], &cfg->tenants[t], now, was) != 0) {
      generation_free(g);
      return NULL;
    }
  }
  size_t n_pools = 0;
  for (size_t t = 0; t < cfg->n_tenants; t++)
    n_pools += cfg->tenants[t].n_backends;
  g->pools = calloc(n_pools + 1, sizeof *g->pools);
  if (g->pools == NULL) {
    generation_free(g);
    return NULL;
  }
  for (size_t t = 0; t < cfg->n_tenants; t++) {
    for (size_t b = 0; b < cfg->tenants[t].n_backends; b++) {
      g->pools[g->n_pools] =
          sg_upstream_pool_new(w, cfg, &cfg->tenants[t],
                               &cfg->tenants[t].backends[b], rt->backend_tls[t][b],
                               g->metrics);
      if (g->pools[g->n_pools] == NULL) {
        generation_free(g);
        return NULL;
      }
      g->n_pools++;
    }
  }
  return g;
}

sg_upstream_pool *sg_generation_pool(sg_generation *g, size_t tenant,
                                     size_t backend) {
  const sg_config *cfg = g->rt->config;
  size_t p = 0;
  for (size_t t = 0; t < tenant; t++)
    p += cfg->tenants[t].n_backends;
  return g->pools[p + backend];
}

sg_tenant_state *sg_generation_tenant_state(sg_generation *g, size_t tenant) {
  return &g->tenant_states[tenant];
}

void sg_generation_conn_opened(sg_generation *g) { g->n_conns++; }

static void finish_if_drained(sg_worker *w);

static void schedule_reap(sg_worker *w) { event_active(w->reap_ev, 0, 0); }

static void generation_maybe_free(sg_generation *g) {
  sg_worker *w = g->worker;
  if (g != w->current && g->n_conns == 0 && g->n_streams == 0)
    schedule_reap(w);
}

void sg_generation_conn_closed(sg_generation *g) {
  sg_worker *w = g->worker;
  g->n_conns--;
  generation_maybe_free(g);
  if (w->draining && w->n_conns == 0)
    schedule_reap(w);
}

void sg_generation_hold(sg_generation *g) { g->n_streams++; }

void sg_generation_release(sg_generation *g) {
  g->n_streams--;
  generation_maybe_free(g);
}

static void take_reload(sg_worker *w) {
  pthread_mutex_lock(&w->reload_lock);
  sg_runtime *rt = w->reload_rt;
  w->reload_rt = NULL;
  pthread_mutex_unlock(&w->reload_lock);
  if (rt == NULL)
    return;
  sg_generation *g = generation_new(w, rt, w->current);
  sg_runtime_unref(rt);
  if (g == NULL) {
    sg_error("worker %u: reload: out of memory; keeping the previous configuration",
             w->index);
    return;
  }
  sg_generation *old = w->current;
  w->current = g;
  if (old->n_conns == 0 && old->n_streams == 0)
    generation_free(old);
  else
    sg_list_push_back(&w->retired, &old->link);
  /* Open connections' certificates against the new client CAs and CRLs:
   * a certificate revoked by this reload stops authenticating calls now,
   * not when its client reconnects. */
  sg_list *n = w->conns.next;
  while (n != &w->conns) {
    sg_list *next = n->next;
    sg_conn_recheck_certificate(SG_CONTAINER_OF(n, sg_conn, worker_link), g->rt);
    n = next;
  }
}

/* Any thread. The counter only wakes the loop: what to do is in
 * drain_requested and reload_rt. */
static void wake(sg_worker *w) {
  uint64_t one = 1;
  ssize_t rv = write(w->wake_fd, &one, sizeof one);
  (void)rv; /* EAGAIN: the counter is far from zero already, a wake is due */
}

void sg_worker_post_runtime(sg_worker *w, sg_runtime *rt) {
  pthread_mutex_lock(&w->reload_lock);
  if (w->reload_rt != NULL)
    sg_runtime_unref(w->reload_rt);
  w->reload_rt = sg_runtime_ref(rt);
  pthread_mutex_unlock(&w->reload_lock);
  wake(w);
}

static void on_reap(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_worker *w = arg;
  sg_list *n = w->retired.next;
  while (n != &w->retired) {
    sg_list *next = n->next;
    sg_generation *g = SG_CONTAINER_OF(n, sg_generation, link);
    if (g->n_conns == 0 && g->n_streams == 0)
      generation_free(g); /* may only schedule another reap, never free */
    n = next;
  }
  finish_if_drained(w);
}

/* ---- drain -------------------------------------------------------------- */

static void finish_if_drained(sg_worker *w) {
  if (!w->draining || w->n_conns > 0)
    return;
  /* Backend connections only serve client connections: with none left,
   * close them so the loop runs out of events. */
  while (!sg_list_empty(&w->retired))
    generation_free(SG_CONTAINER_OF(w->retired.next, sg_generation, link));
  for (size_t i = 0; i < w->current->n_pools; i++)
    sg_upstream_pool_free(w->current->pools[i]);
  w->current->n_pools = 0;
  evtimer_del(w->sweep_timer);
  event_base_loopexit(w->base, NULL);
}

static void on_drain_timeout(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_worker *w = arg;
  if (w->n_conns > 0)
    sg_warn("worker %u: drain timeout: closing %zu connections with streams "
            "still in flight",
            w->index, w->n_conns);
  while (!sg_list_empty(&w->conns)) {
    sg_conn *c = SG_CONTAINER_OF(w->conns.next, sg_conn, worker_link);
    sg_conn_close_now(c, "drain timeout");
  }
  finish_if_drained(w);
}

static void start_drain(sg_worker *w) {
  if (w->draining)
    return;
  w->draining = true;
  for (size_t i = 0; i < w->n_listeners; i++) {
    sg_accept_backoff_clear(&w->listener_ctxs[i].backoff);
    if (w->listeners[i] != NULL) {
      evconnlistener_free(w->listeners[i]);
      w->listeners[i] = NULL;
    }
  }
  uint32_t ms = w->current->rt->config->drain_timeout_ms;
  struct timeval tv = {ms / 1000, (suseconds_t)(ms % 1000) * 1000};
  evtimer_add(w->drain_timer, &tv);
  /* sg_conn_start_drain may free a connection that had no session yet. */
  sg_list *n = w->conns.next;
  while (n != &w->conns) {
    sg_list *next = n->next;
    sg_conn_start_drain(SG_CONTAINER_OF(n, sg_conn, worker_link));
    n = next;
  }
  finish_if_drained(w);
}

static void on_wake(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  sg_worker *w = arg;
  uint64_t n;
  ssize_t rv = read(fd, &n, sizeof n);
  (void)rv; /* EAGAIN: another wake took the count; the requests are read below */
  take_reload(w);
  if (__atomic_exchange_n(&w->drain_requested, false, __ATOMIC_ACQ_REL))
    start_drain(w);
}

/* ---- clock --------------------------------------------------------------- */

uint64_t sg_worker_clock_hold(sg_worker *w) {
  uint64_t held = w->clock_us;
  if (held == 0)
    w->clock_us = sg_monotonic_us();
  return held;
}

void sg_worker_clock_release(sg_worker *w, uint64_t held) { w->clock_us = held; }

uint64_t sg_worker_now_us(const sg_worker *w) {
  return w->clock_us != 0 ? w->clock_us : sg_monotonic_us();
}

/* ---- resolvers ----------------------------------------------------------- */

struct evdns_base *sg_worker_dns_absolute(sg_worker *w) {
  if (w->dns_absolute == NULL) {
    w->dns_absolute = evdns_base_new(w->base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
                                                  EVDNS_BASE_DISABLE_WHEN_INACTIVE);
    if (w->dns_absolute == NULL)
      w->dns_absolute = evdns_base_new(w->base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
    if (w->dns_absolute != NULL)
      evdns_base_search_clear(w->dns_absolute);
  }
  return w->dns_absolute;
}

/* ---- socket reads -------------------------------------------------------- */

#define SG_WORKER_READ_BUF_BYTES (256 * 1024)

ssize_t sg_worker_read_socket(sg_worker *w, int fd, const uint8_t **data) {
  ssize_t n;
  do {
    n = recv(fd, w->read_buf, w->read_buf_size, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0)
    return errno == EAGAIN || errno == EWOULDBLOCK ? -2 : -1;
  *data = w->read_buf;
  return n;
}

/* ---- sweep -------------------------------------------------------------- */

/* One timer per worker instead of one per stream: idle calls are rare and a
 * second of slack on an hour-long limit does not matter. */
static void on_sweep(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_worker *w = arg;
  uint64_t now = sg_monotonic_ms();
  for (sg_list *n = w->conns.next; n != &w->conns; n = n->next) {
    sg_conn *c = SG_CONTAINER_OF(n, sg_conn, worker_link);
    for (sg_list *m = c->streams.next; m != &c->streams; m = m->next)
      sg_stream_check_idle(SG_CONTAINER_OF(m, sg_stream, conn_link), now);
  }
}

/* ---- worker ------------------------------------------------------------- */

sg_worker *sg_worker_new(unsigned index, sg_runtime *rt, uint16_t *ports,
                         char *err, size_t errlen) {
  const sg_config *cfg = rt->config;
  sg_worker *w = calloc(1, sizeof *w);
  if (w == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  w->index = index;
  w->wake_fd = -1;
  w->read_buf_size = SG_WORKER_READ_BUF_BYTES;
  w->read_buf = malloc(w->read_buf_size);
  if (w->read_buf == NULL) {
    free(w);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  w->affinity = sg_affinity_new(SG_AFFINITY_DEFAULT_ENTRIES);
  w->clients = sg_clientcount_process();
  w->h2mem = sg_h2mem_new();
  w->h2_stage = evbuffer_new();
  if (w->affinity == NULL || w->clients == NULL || w->h2mem == NULL ||
      w->h2_stage == NULL) {
    sg_affinity_free(w->affinity);
    sg_h2mem_free(w->h2mem);
    if (w->h2_stage != NULL)
      evbuffer_free(w->h2_stage);
    free(w->read_buf);
    free(w);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  sg_list_init(&w->conns);
  sg_list_init(&w->retired);
  pthread_mutex_init(&w->reload_lock, NULL);
  struct event_config *ecfg = event_config_new();
  if (ecfg != NULL) {
    /* Only this thread touches the base: other threads write to wake_fd. */
    event_config_set_flag(ecfg, EVENT_BASE_FLAG_NOLOCK);
    w->base = event_base_new_with_config(ecfg);
    event_config_free(ecfg);
  }
  if (w->base == NULL) {
    snprintf(err, errlen, "cannot create an event loop");
    goto fail;
  }
  w->dns = evdns_base_new(w->base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
                                       EVDNS_BASE_DISABLE_WHEN_INACTIVE);
  if (w->dns == NULL) {
    /* No resolv.conf (a minimal container): numeric backends still work. */
    w->dns = evdns_base_new(w->base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
  }
  w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (w->wake_fd < 0) {
    snprintf(err, errlen, "eventfd: %s", strerror(errno));
    goto fail;
  }
  w->wake_ev = event_new(w->base, w->wake_fd, EV_READ | EV_PERSIST, on_wake, w);
  w->drain_timer = evtimer_new(w->base, on_drain_timeout, w);
  w->sweep_timer = event_new(w->base, -1, EV_PERSIST, on_sweep, w);
  w->reap_ev = event_new(w->base, -1, 0, on_reap, w);
  if (w->wake_ev == NULL || w->drain_timer == NULL || w->sweep_timer == NULL ||
      w->reap_ev == NULL || event_add(w->wake_ev, NULL) != 0) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }

  w->n_listeners = cfg->n_listeners;
  w->listeners = calloc(cfg->n_listeners + 1, sizeof *w->listeners);
  w->listener_ctxs = calloc(cfg->n_listeners + 1, sizeof *w->listener_ctxs);
  if (w->listeners == NULL || w->listener_ctxs == NULL) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    char berr[256];
    int fd = bind_listener(&cfg->listeners[i], &ports[i], berr, sizeof berr);
    if (fd < 0) {
      snprintf(err, errlen, "listener %s: %s", cfg->listeners[i].name, berr);
      goto fail;
    }
    listener_ctx *lc = &w->listener_ctxs[i];
    lc->worker = w;
    lc->index = i;
    char what[80];
    snprintf(what, sizeof what, "listener %s", cfg->listeners[i].name);
    if (sg_accept_backoff_init(&lc->backoff, w->base, what, on_accept_resume, lc) != 0) {
      close(fd);
      snprintf(err, errlen, "out of memory");
      goto fail;
    }
    w->listeners[i] = evconnlistener_new(w->base, on_accept, lc,
                                         LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC,
                                         0 /* listening already: keep its backlog */, fd);
    if (w->listeners[i] == NULL) {
      close(fd);
      snprintf(err, errlen, "listener %s: cannot create listener",
               cfg->listeners[i].name);
      goto fail;
    }
    evconnlistener_set_error_cb(w->listeners[i], on_accept_error);
  }

  w->current = generation_new(w, rt, NULL);
  if (w->current == NULL) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  struct timeval second = {1, 0};
  evtimer_add(w->sweep_timer, &second);
  return w;
fail:
  sg_worker_free(w);
  return NULL;
}

static void *worker_main(void *arg) {
  sg_worker *w = arg;
  event_base_dispatch(w->base);
  __atomic_store_n(&w->exited, true, __ATOMIC_RELEASE);
  if (w->on_exit != NULL)
    w->on_exit(w->on_exit_arg);
  return NULL;
}

int sg_worker_start(sg_worker *w) {
  int rv = pthread_create(&w->thread, NULL, worker_main, w);
  if (rv != 0)
    return rv;
  w->thread_started = true;
  return 0;
}

void sg_worker_request_drain(sg_worker *w) {
  __atomic_store_n(&w->drain_requested, true, __ATOMIC_RELEASE);
  wake(w);
}

void sg_worker_join(sg_worker *w) {
  if (w->thread_started) {
    pthread_join(w->thread, NULL);
    w->thread_started = false;
  }
}

void sg_worker_free(sg_worker *w) {
  if (w == NULL)
    return;
  while (!sg_list_empty(&w->conns)) {
    sg_conn *c = SG_CONTAINER_OF(w->conns.next, sg_conn, worker_link);
    sg_conn_close_now(c, "shutting down");
  }
  while (!sg_list_empty(&w->retired))
    generation_free(SG_CONTAINER_OF(w->retired.next, sg_generation, link));
  generation_free(w->current);
  for (size_t i = 0; i < w->n_listeners; i++) {
    if (w->listener_ctxs != NULL)
      sg_accept_backoff_clear(&w->listener_ctxs[i].backoff);
    if (w->listeners != NULL && w->listeners[i] != NULL)
      evconnlistener_free(w->listeners[i]);
  }
  free(w->listeners);
  free(w->listener_ctxs);
  if (w->wake_ev != NULL)
    event_free(w->wake_ev);
  if (w->wake_fd >= 0)
    close(w->wake_fd);
  if (w->drain_timer != NULL)
    event_free(w->drain_timer);
  if (w->sweep_timer != NULL)
    event_free(w->sweep_timer);
  if (w->reap_ev != NULL)
    event_free(w->reap_ev);
  if (w->reload_rt != NULL)
    sg_runtime_unref(w->reload_rt);
  pthread_mutex_destroy(&w->reload_lock);
  if (w->dns != NULL)
    evdns_base_free(w->dns, 1);
  if (w->dns_absolute != NULL)
    evdns_base_free(w->dns_absolute, 1);
  if (w->base != NULL)
    event_base_free(w->base);
  free(w->read_buf);
  sg_affinity_free(w->affinity);
  evbuffer_free(w->h2_stage);
  /* Last: every nghttp2 session and header buffer of this worker is gone. */
  sg_h2mem_free(w->h2mem);
  free(w);
}
