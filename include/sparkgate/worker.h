/* Workers: one thread, one event_base, one SO_REUSEPORT socket per
 * listener. Nothing on the data path is shared between workers but the
 * read-only runtime (config and TLS contexts), so the data path takes no
 * lock. */
#ifndef SPARKGATE_WORKER_H
#define SPARKGATE_WORKER_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <openssl/ssl.h>

#include "sparkgate/config.h"
#include "sparkgate/list.h"
#include "sparkgate/types.h"


/* One config generation and what serving it needs: TLS contexts are built
 * once and shared by every worker (SSL_CTX is safe to share for SSL_new). */
struct sg_runtime {
  int refcount_;
  sg_config *config;
  SSL_CTX **listener_tls;   /* [listener]; NULL for h2c listeners */
  SSL_CTX ***backend_tls;   /* [tenant][backend]; NULL for h2c backends */
  struct sg_metrics_gen *metrics; /* this config's metric dimensions (ref) */
};

/* |metrics| may be NULL (unit tests); otherwise the runtime records into a
 * new dimension generation of it (rt->metrics), which the caller publishes
 * (sg_metrics_publish) once the runtime is in force. */
sg_runtime *sg_runtime_new(sg_config *cfg, struct sg_metrics *metrics,
                           char *err, size_t errlen);
sg_runtime *sg_runtime_ref(sg_runtime *rt);
void sg_runtime_unref(sg_runtime *rt);

/* A worker's view of one runtime: the upstream pools built for it and the
 * client connections accepted under it. A reload makes a new generation
 * current; the old one serves its connections to the end and is freed
 * with the last of them. */
typedef struct sg_generation {
  sg_list link; /* in worker->retired */
  sg_worker *worker;
  sg_runtime *rt; /* ref */
  /* One pool per backend, flattened [tenant][backend] in config order. */
  sg_upstream_pool **pools;
  size_t n_pools;
  size_t n_conns;
  size_t n_streams; /* streams that started on this generation */
  /* Verified tokens of this worker under this config (no locks: one
   * thread). NULL when no JWT provider is configured. */
  struct sg_token_cache *token_cache;
  /* This worker's share of each tenant's limits, [tenant index]. */
  struct sg_tenant_state *tenant_states;
  size_t n_tenant_states;
  struct sg_metrics_worker *metrics; /* this worker's counters (borrowed from rt) */
} sg_generation;

struct sg_worker {
  unsigned index;
  pthread_t thread;
  bool thread_started;
  bool exited; /* atomic: set by the thread when its loop has ended */
  struct event_base *base;
  struct evdns_base *dns;
  struct evdns_base *dns_absolute; /* sg_worker_dns_absolute; NULL until used */
  sg_generation *current; /* new connections start here */
  sg_list retired;        /* older generations with connections left */

  struct evconnlistener **listeners; /* [listener] */
  struct sg_listener_ctx *listener_ctxs; /* [listener]: callback arguments */
  size_t n_listeners;

  /* Scratch space for cleartext socket reads: libevent 2.1 reads at most
   * 4 KiB per call, so h2c sockets are read here directly, in large
   * chunks, and handed to nghttp2 without another copy. */
  uint8_t *read_buf;
  size_t read_buf_size;

  struct sg_affinity *affinity; /* where this worker sent each session */
  struct sg_h2mem *h2mem;       /* nghttp2's allocations on this thread */
  struct evbuffer *h2_stage;    /* sg_h2io.stage of every session here */
  struct sg_clientcount *clients; /* connections per client address: the process table */
  /* The header field nghttp2 just refused, between its error message and
   * the stream's reset (one nghttp2_session_mem_recv on this thread): the
   * name only, never the value, which may be a token. */
  char bad_header[64];
  /* The clock as read when the running callback began (0: none held);
   * see sg_worker_clock_hold. */
  uint64_t clock_us;

  sg_list conns; /* sg_conn.worker_link */
  size_t n_conns;
  uint64_t next_conn_id;

  /* Told (from the worker thread) when its loop has ended. */
  void (*on_exit)(void *arg);
  void *on_exit_arg;

  /* The main thread's requests (a drain, a new configuration) arrive
   * through this eventfd: the loop's base has no lock (libevent takes a
   * base's lock on every event_add, event_del and event_active, several
   * times a call), so no other thread may touch its events. */
  int wake_fd;
  struct event *wake_ev;
  bool drain_requested;      /* atomic: set by the main thread */
  pthread_mutex_t reload_lock;
  sg_runtime *reload_rt;     /* handed over under reload_lock */
  struct event *drain_timer; /* drain deadline */
  struct event *sweep_timer; /* once a second: idle streams */
  /* Frees retired generations that ran out of connections and streams,
   * and ends a finished drain, from the top of the loop: the last
   * release often comes from deep inside a connection's callbacks (a
   * stream freed by a backend session's close callback), where freeing
   * the generation's backend connections would pull that very session
   * from under nghttp2. */
  struct event *reap_ev;
  bool draining;
};

/* The workers bind their listeners with SO_REUSEPORT (one socket each), so
 * the kernel would let any process of this user bind the same address and
 * port too and split the clients between both without a word. A plain
 * bind (SO_REUSEADDR as the listeners have it, so that connections left in
 * TIME_WAIT do not count) fails where a socket listens already. Other
 * errors are left to the real bind, which says them. */
bool sg_listener_port_in_use(const sg_listener_config *l);

/* Binds the listeners of |rt| for worker |index|. |ports| holds the port of
 * each listener: 0 the first time (the kernel picks, and the chosen port is
 * written back), so that every worker binds the same port. */
sg_worker *sg_worker_new(unsigned index, sg_runtime *rt, uint16_t *ports,
                         char *err, size_t errlen);
/* 0, or pthread_create's error number. */
int sg_worker_start(sg_worker *w);
/* Thread-safe: asks the worker to stop accepting and drain. */
void sg_worker_request_drain(sg_worker *w);
void sg_worker_join(sg_worker *w);
void sg_worker_free(sg_worker *w);

/* Thread-safe: new connections of |w| will use |rt| (takes a reference). */
void sg_worker_post_runtime(sg_worker *w, sg_runtime *rt);

/* One reading of the clock for a whole callback: the calls that start,
 * are admitted and end inside it take it as their time. A read that
 * carries ten calls then costs one clock_gettime instead of thirty, which
 * were 1% of a unary call's CPU on a VM. Returns what to give back to
 * sg_worker_clock_release; a nested hold keeps the outer reading. */
uint64_t sg_worker_clock_hold(sg_worker *w);
void sg_worker_clock_release(sg_worker *w, uint64_t held);
/* The held reading, or else the clock (CLOCK_MONOTONIC, microseconds). */
uint64_t sg_worker_now_us(const sg_worker *w);

/* The resolver for a name written with a trailing dot, an absolute name:
 * asked as written, never completed with resolv.conf's search domains.
 * libevent's resolver ignores the dot and tries those first (a pod's
 * ndots:5 makes that every name of fewer than five dots), so a record
 * under a search domain would win over the name the operator wrote. Made
 * on first use; NULL when it cannot be. */
struct evdns_base *sg_worker_dns_absolute(sg_worker *w);

/* Reads from cleartext socket |fd| into the worker's scratch buffer.
 * Returns the number of bytes (> 0) with *data pointing at them, 0 at end
 * of stream, -1 on error (errno set), or -2 when nothing is there. */
ssize_t sg_worker_read_socket(sg_worker *w, int fd, const uint8_t **data);

/* The pool of backend |backend| of tenant |tenant| in generation |g|. */
sg_upstream_pool *sg_generation_pool(sg_generation *g, size_t tenant,
                                     size_t backend);

struct sg_tenant_state *sg_generation_tenant_state(sg_generation *g,
                                                  size_t tenant);

/* Connection accounting, so that retired generations and a draining
 * worker know when they are done. */
void sg_generation_conn_opened(sg_generation *g);
void sg_generation_conn_closed(sg_generation *g);
/* Streams hold their generation too: a call started on a connection
 * accepted before a reload uses the newer generation. */
void sg_generation_hold(sg_generation *g);
void sg_generation_release(sg_generation *g);

#endif
