/* sparkgate: command line, signals, and the start and stop of workers. */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

#include "sg_build_config.h"
#include "sparkgate/accesslog.h"
#include "sparkgate/admin.h"
#include "sparkgate/config.h"
#include "sparkgate/jwt.h"
#include "sparkgate/keyfetch.h"
#include "sparkgate/log.h"
#include "sparkgate/memcache.h"
#include "sparkgate/metrics.h"
#include "sparkgate/notify.h"
#include "sparkgate/observe.h"
#include "sparkgate/worker.h"

typedef struct sg_main {
  struct event_base *base;
  sg_runtime *rt;
  sg_metrics *metrics;
  sg_admin *admin; /* NULL without an "admin" section */
  sg_worker **workers;
  unsigned n_workers;
  unsigned workers_running;
  struct event *worker_exit_ev; /* activated from worker threads */
  bool draining;
  /* JWT providers' keys fetched over HTTPS, on this loop (issue 9). */
  sg_keyfetch *keyfetch;
  bool started;          /* every worker runs */
  bool keys_gate_passed; /* every required provider had keys once */
  bool keys_wait_logged;
} sg_main;

static void usage(FILE *f) {
  fprintf(f,
          "Usage: sparkgate -c FILE [--check-config]\n"
          "\n"
          "An authenticating HTTP/2 reverse proxy for Apache Spark Connect.\n"
          "\n"
          "  -c, --config FILE   configuration file (JSON); see docs/configuration.md\n"
          "  -t, --check-config  validate FILE, print a summary and exit: 0 when\n"
          "                      valid, 1 with every error otherwise\n"
          "  -v, --version       print the version and exit\n"
          "  -h, --help          print this help and exit\n"
          "\n"
          "Signals: SIGTERM/SIGINT drain and exit 0 (a second one exits at once),\n"
          "SIGHUP reloads the configuration, SIGUSR1 reopens the access log.\n");
}

static void print_errors(const sg_config_errors *errs) {
  for (size_t i = 0; i < errs->count; i++)
    fprintf(stderr, "sparkgate: config error: %s\n", errs->messages[i]);
}

/* Ready: every worker runs, no drain, and every required identity
 * provider has had keys. The key gate is passed once, at start: a reload
 * that adds a provider whose keys are not there yet must not take a
 * serving proxy out of rotation (that provider's calls get 14 until
 * then). Once keys exist they are never dropped (the last good ones stay),
 * so the gate cannot close again anyway for the providers it checked. */
static void update_readiness(sg_main *m) {
  if (!m->keys_gate_passed) {
    char missing[256];
    const sg_jwt_verifier *v = m->rt->config->jwt;
    if (v == NULL || sg_jwt_verifier_keys_ready(v, missing, sizeof missing)) {
      m->keys_gate_passed = true;
      if (m->keys_wait_logged)
        sg_info("identity provider keys: every required provider has keys: "
                "ready");
    } else if (m->started && !m->keys_wait_logged) {
      m->keys_wait_logged = true;
      sg_info("not ready (/readyz 503) until the keys of every required "
              "identity provider are fetched: waiting for %s",
              missing);
    }
  }
  if (m->admin != NULL)
    sg_admin_set_ready(m->admin,
                       m->started && !m->draining && m->keys_gate_passed);
}

static void on_keys_changed(void *arg) { update_readiness(arg); }

/* Identity-provider key fetches, per provider with network keys. */
static int render_key_metrics(void *arg, struct evbuffer *out) {
  sg_main *m = arg;
  const sg_jwt_verifier *v = m->rt != NULL ? m->rt->config->jwt : NULL;
  static const struct {
    const char *name, *type, *help;
  } fam[] = {
      {"sparkgate_jwks_fetches_total", "counter",
       "Key fetches from identity providers, by provider and result."},
      {"sparkgate_jwks_key_set_changes_total", "counter",
       "Times a provider's key set was replaced by a different one."},
      {"sparkgate_jwks_refetches_total", "counter",
       "Tokens with an unknown kid, by what followed: a refetch, none "
       "(rate-limited, 14) or a refusal (fresh set, 16)."},
      {"sparkgate_jwks_keys", "gauge",
       "Keys in force per provider (0: none yet; its calls get 14)."},
  };
  size_t n = v != NULL ? sg_jwt_verifier_provider_count(v) : 0;
  for (size_t f = 0; f < sizeof fam / sizeof fam[0]; f++) {
    if (evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", fam[f].name,
                            fam[f].help, fam[f].name, fam[f].type) < 0)
      return -1;
    for (size_t i = 0; i < n; i++) {
      sg_jwt_keysource *ks = sg_jwt_verifier_keysource(v, i);
      if (ks == NULL)
        continue;
      sg_jwt_key_stats st;
      sg_jwt_keysource_get_stats(ks, &st);
      const char *name = sg_jwt_verifier_provider_name(v, i);
      typedef struct {
        const char *extra;
        uint64_t value;
      } row;
      row rows[3];
      size_t nrows = 0;
      switch (f) {
      case 0:
        rows[nrows++] = (row){",result=\"ok\"", st.fetches_ok};
        rows[nrows++] = (row){",result=\"failed\"", st.fetches_failed};
        break;
      case 1:
        rows[nrows++] = (row){"", st.key_set_changes};
        break;
      case 2:
        rows[nrows++] = (row){",outcome=\"requested\"", st.refetches};
        rows[nrows++] = (row){",outcome=\"rate_limited\"", st.refetches_limited};
        rows[nrows++] = (row){",outcome=\"denied_fresh\"", st.unknown_kid_denied};
        break;
      default:
        rows[nrows++] = (row){"", (uint64_t)st.n_keys};
        break;
      }
      for (size_t k = 0; k < nrows; k++) {
        evbuffer_add_printf(out, "%s{provider=\"", fam[f].name);
        sg_metrics_label_value(out, name);
        if (evbuffer_add_printf(out, "\"%s} %llu\n", rows[k].extra,
                                (unsigned long long)rows[k].value) < 0)
          return -1;
      }
    }
  }
  return 0;
}

static void start_drain(sg_main *m) {
  m->draining = true;
  sg_info("draining: no new connections; in-flight streams have %u ms",
          m->rt->config->drain_timeout_ms);
  /* Not ready any more, but alive: probes keep answering during the drain
   * so that Kubernetes does not kill a pod that is finishing its work. */
  if (m->admin != NULL)
    sg_admin_set_ready(m->admin, false);
  sg_notify_stopping();
  sg_notify_status("draining: no new connections; calls in flight have %u ms",
                   m->rt->config->drain_timeout_ms);
  for (unsigned i = 0; i < m->n_workers; i++)
    sg_worker_request_drain(m->workers[i]);
}

/* Worker threads call this as their loops end. */
static void on_worker_exit(void *arg) {
  sg_main *m = arg;
  event_active(m->worker_exit_ev, 0, 0);
}

static void on_worker_exit_ev(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_main *m = arg;
  /* One activation may stand for several exits: count the threads. */
  unsigned running = 0;
  for (unsigned i = 0; i < m->n_workers; i++)
    running += !__atomic_load_n(&m->workers[i]->exited, __ATOMIC_ACQUIRE);
  m->workers_running = running;
  if (running == 0)
    event_base_loopexit(m->base, NULL);
}

/* Listeners are bound once at start: a reload may change everything about
 * them but where they listen. */
static bool listeners_compatible(const sg_config *old, sg_config *cfg,
                                 char *err, size_t errlen) {
  if (old->n_listeners != cfg->n_listeners) {
    snprintf(err, errlen, "the number of listeners changed (%zu -> %zu): "
             "restart to change listeners", old->n_listeners, cfg->n_listeners);
    return false;
  }
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *a = &old->listeners[i], *b = &cfg->listeners[i];
    if (strcmp(a->name, b->name) != 0 || strcmp(a->address, b->address) != 0 ||
        a->port != b->port || a->insecure != b->insecure) {
      snprintf(err, errlen, "listeners[%zu] changed its name, address, port or "
               "insecure flag: restart to change those", i);
      return false;
    }
  }
  /* "workers": 0 again is no change, even if the process's CPU affinity
   * changed since the start: the workers running stay. */
  if (old->workers_configured == 0 && cfg->workers_configured == 0)
    cfg->workers = old->workers;
  if (old->workers != cfg->workers) {
    snprintf(err, errlen, "workers changed (%u -> %u): restart to change it",
             old->workers, cfg->workers);
    return false;
  }
  return true;
}

/* Said at every start and successful reload, like an insecure listener:
 * without verification anyone on the path gets every token and query. A
 * large routing table could hold thousands: the first few name the
 * problem, --check-config lists them all. */
static void warn_unverified_backends(const sg_config *cfg) {
  enum { SHOWN = 16 };
  size_t n = 0;
  for (size_t i = 0; i < cfg->n_tenants; i++) {
    const sg_tenant_config *t = &cfg->tenants[i];
    for (size_t j = 0; j < t->n_backends; j++) {
      const sg_backend_config *b = &t->backends[j];
      if (!b->tls || b->tls_verify)
        continue;
      if (n++ < SHOWN)
        sg_warn("backend %s of tenant %s: TLS verification is OFF (\"verify\": false): "
                "anyone on the path can impersonate it", b->name, t->name);
    }
  }
  if (n > SHOWN)
    sg_warn("%zu more backends have TLS verification OFF; sparkgate --check-config "
            "lists them (\"NOT VERIFIED\")", n - SHOWN);
}

/* Said at every start and reload, as --check-config marks it. */
static void warn_unused_client_cas(const sg_config *cfg) {
  for (size_t i = 0; i < cfg->n_listeners; i++)
    if (sg_listener_client_ca_unused(&cfg->listeners[i]))
      sg_warn("listener %s: tls.client_ca is set but client_certificates is "
              "\"none\": no client certificate is asked for; set \"optional\" or "
              "\"required\", or remove client_ca", cfg->listeners[i].name);
}

/* Said at every start and reload: a methods list copied from an older
 * client's needs breaks PySpark 3.5+ only on long results, in production. */
static void warn_missing_companions(const sg_config *cfg) {
  enum { SHOWN = 16 };
  size_t n = 0;
  for (size_t i = 0; i < cfg->n_tenants; i++) {
    char missing[128];
    if (sg_route_tenant_missing_companions(&cfg->tenants[i], missing, sizeof missing)[0] ==
        '\0')
      continue;
    if (n++ < SHOWN)
      sg_warn("tenant %s allows ExecutePlan but not %s: PySpark calls them for every "
              "query and session (a result streamed past the server's 2-minute cut "
              "fails with 7, executions are never released); add them to its "
              "\"methods\"",
              cfg->tenants[i].name, missing);
  }
  if (n > SHOWN)
    sg_warn("%zu more tenants allow ExecutePlan without the methods PySpark calls "
            "with it; sparkgate --check-config lists them", n - SHOWN);
}

/* Warned at every start and reload, not refused: a trusted service
 * account's tenant may be meant to act for everyone on a shared server. */
static void warn_off_tenants_sharing_backends(const sg_config *cfg) {
  static const char *const uid_names[] = {"rewrite", "enforce", "off"};
  for (size_t i = 0; i < cfg->n_tenants; i++) {
    const sg_route_tenant *t = &cfg->tenants[i];
    const sg_backend_config *shared = NULL;
    const sg_route_tenant *other =
        sg_route_tenant_off_shares_backend(cfg->tenants, cfg->n_tenants, t, &shared);
    if (other != NULL)
      sg_warn("tenant %s (user_id off) shares backend %s:%u with tenant %s (user_id %s): "
              "its callers can write %s's users into user_context.user_id and reach "
              "their Spark sessions there; give %s Spark servers of its own, or set "
              "its user_id to rewrite",
              t->name, shared->address, (unsigned)shared->port, other->name,
              uid_names[other->user_id], other->name, t->name);
  }
}

static bool reload_config(sg_main *m);

static void reload(sg_main *m) {
  sg_notify_reloading();
  bool ok = reload_config(m);
  sg_metrics_reload(m->metrics, ok);
  sg_notify_ready();
  sg_notify_status("%s", ok ? "serving (configuration reloaded)"
                            : "serving (last reload failed; previous configuration in force)");
}

static bool reload_config(sg_main *m) {
  const char *path = m->rt->config->path;
  sg_info("reloading configuration from %s", path);
  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  if (sg_config_load(path, &cfg, &errs) != 0) {
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
      /* `-c <(generate-config)`: what the pipe held was read at start. */
      sg_error("reload: config error: %s is not a regular file (a pipe?): what it "
               "held was read at start and cannot be read again; restart sparkgate "
               "to change the configuration, or give -c a regular file", path);
    for (size_t i = 0; i < errs.count; i++)
      sg_error("reload: config error: %s", errs.messages[i]);
    if (errs.count == 0)
      sg_error("reload failed (out of memory): keeping the configuration in force");
    else
      sg_error("reload failed (%zu error%s): keeping the configuration in force",
               errs.count, errs.count == 1 ? "" : "s");
    sg_config_errors_clear(&errs);
    return false;
  }
  char err[512];
  if (!listeners_compatible(m->rt->config, cfg, err, sizeof err)) {
    sg_error("reload failed: %s: keeping the configuration in force", err);
    sg_config_unref(cfg);
    return false;
  }
  /* Adding or removing it counts as a change too: nothing would serve a
   * newly added one. */
  if ((m->admin != NULL) != cfg->admin.enabled ||
      (m->admin != NULL &&
       (cfg->admin.port != m->rt->config->admin.port ||
        strcmp(cfg->admin.address, m->rt->config->admin.address) != 0))) {
    sg_error("reload failed: the admin listener changed: restart to change it; "
             "keeping the configuration in force");
    sg_config_unref(cfg);
    return false;
  }
  sg_runtime *rt = sg_runtime_new(cfg, m->metrics, err, sizeof err);
  sg_config_unref(cfg);
  if (rt == NULL) {
    sg_error("reload failed: %s: keeping the configuration in force", err);
    return false;
  }
  /* Last, as it takes effect at once: a reload that fails before must
   * leave the log where it was. */
  char aerr[256];
  if (rt->config->access_log.enabled &&
      sg_accesslog_open(rt->config->access_log.path, aerr, sizeof aerr) != 0) {
    sg_error("reload failed: access_log: %s; keeping the configuration in force", aerr);
    sg_runtime_unref(rt);
    return false;
  }
  sg_log_set_level(rt->config->log_level);
  /* Before any worker sees the new verifier: providers whose keys come
   * from the same place keep the keys fetched so far (no refetch, never
   * "no keys" because of a reload). */
  sg_jwt_verifier_adopt_keys(rt->config->jwt, m->rt->config->jwt);
  /* Only now, with nothing left to fail: a rejected configuration's tenants
   * must never show on /metrics. */
  sg_metrics_publish(m->metrics, rt->metrics);
  for (unsigned i = 0; i < m->n_workers; i++)
    sg_worker_post_runtime(m->workers[i], rt);
  sg_runtime_unref(m->rt);
  m->rt = rt;
  sg_keyfetch_update(m->keyfetch, rt->config->jwt);
  update_readiness(m);
  warn_unverified_backends(rt->config);
  warn_missing_companions(rt->config);
  warn_off_tenants_sharing_backends(rt->config);
  warn_unused_client_cas(rt->config);
  sg_info("reload done: new calls use the new configuration; calls in "
          "flight finish on the one they started with");
  return true;
}

/* The signals whose default action would end a process that is asked to
 * reload or reopen: main() holds them until run() handles them on its
 * loop. SIGTERM and SIGINT are not held: a start that is told to stop
 * (or that hangs) ends at once, as before it serves anything. */
static void startup_signals(sigset_t *set) {
  sigemptyset(set);
  sigaddset(set, SIGHUP);
  sigaddset(set, SIGUSR1);
}

static void on_second_signal(int sig) {
  (void)sig;
  static const char msg[] = "sparkgate: second signal while draining: exiting now\n";
  ssize_t rv = write(STDERR_FILENO, msg, sizeof msg - 1);
  (void)rv;
  _exit(1);
}

static void on_signal(evutil_socket_t sig, short what, void *arg) {
  (void)what;
  sg_main *m = arg;
  switch (sig) {
  case SIGTERM:
  case SIGINT:
    if (m->draining) /* docs/operations.md: the operator insists */
      on_second_signal((int)sig);
    sg_info("received %s", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    start_drain(m);
    break;
  case SIGHUP:
    /* The calls still running keep the configuration they started with;
     * say so, or the operator cannot tell whether the new file is in force. */
    if (m->draining)
      sg_warn("SIGHUP ignored: draining; the configuration in force stays until exit");
    else
      reload(m);
    break;
  case SIGUSR1: {
    char err[256];
    if (sg_accesslog_reopen(err, sizeof err) != 0)
      sg_error("SIGUSR1: cannot reopen the access log: %s; still writing to the old file",
               err);
    else if (m->rt->config->access_log.path == NULL)
      sg_info("SIGUSR1: the access log goes to stderr: nothing to reopen");
    else
      sg_info("SIGUSR1: access log reopened");
    break;
  }
  default:
    break;
  }
}

/* A second SIGTERM/SIGINT while draining ends the process at once: an
 * operator who asks twice does not want to wait for the drain timeout. */

static int run(sg_config *cfg) {
  sg_main m = {0};
  char err[512];
  int status = 1;
  struct event *sigs[4] = {NULL};
  const int signos[4] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1};
  uint16_t *ports = NULL;

  sg_log_set_level(cfg->log_level);
  if (cfg->access_log.enabled &&
      sg_accesslog_open(cfg->access_log.path, err, sizeof err) != 0) {
    fprintf(stderr, "sparkgate: %s: access_log: %s\n", cfg->path, err);
    return 1;
  }
  sg_metrics_reasons reasons;
  sg_observe_reasons(&reasons);
  m.metrics = sg_metrics_new(cfg->workers, &reasons);
  if (m.metrics != NULL)
    sg_metrics_set_extra(m.metrics, render_key_metrics, &m);
  if (m.metrics == NULL) {
    fprintf(stderr, "sparkgate: out of memory\n");
    goto out;
  }
  m.rt = sg_runtime_new(cfg, m.metrics, err, sizeof err);
  if (m.rt == NULL) {
    fprintf(stderr, "sparkgate: %s: %s\n", cfg->path, err);
    goto out;
  }
  sg_metrics_publish(m.metrics, m.rt->metrics);
  m.base = event_base_new();
  m.n_workers = cfg->workers;
  m.workers = calloc(m.n_workers, sizeof *m.workers);
  ports = calloc(cfg->n_listeners + 1, sizeof *ports);
  if (m.base == NULL || m.workers == NULL || ports == NULL) {
    fprintf(stderr, "sparkgate: out of memory\n");
    goto out;
  }
  m.worker_exit_ev = event_new(m.base, -1, 0, on_worker_exit_ev, &m);
  m.keyfetch = sg_keyfetch_new(m.base, on_keys_changed, &m);
  if (m.keyfetch == NULL) {
    fprintf(stderr, "sparkgate: out of memory\n");
    goto out;
  }
  /* The first fetches start once the loop runs; calls that need those
   * keys get UNAVAILABLE (14) until they are in. */
  sg_keyfetch_update(m.keyfetch, cfg->jwt);
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *l = &cfg->listeners[i];
    if (l->port != 0 && sg_listener_port_in_use(l)) {
      bool v6 = strchr(l->address, ':') != NULL;
      sg_error("listener %s: %s%s%s:%u is already in use (another sparkgate?)", l->name,
               v6 ? "[" : "", l->address, v6 ? "]" : "", l->port);
      goto out;
    }
    ports[i] = l->port;
  }
  for (unsigned i = 0; i < m.n_workers; i++) {
    m.workers[i] = sg_worker_new(i, m.rt, ports, err, sizeof err);
    if (m.workers[i] == NULL) {
      sg_error("%s", err);
      goto out;
    }
    m.workers[i]->on_exit = on_worker_exit;
    m.workers[i]->on_exit_arg = &m;
  }
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *l = &cfg->listeners[i];
    bool v6 = strchr(l->address, ':') != NULL;
    sg_notice("listener %s listening on %s%s%s:%u (%s)", l->name, v6 ? "[" : "",
            l->address, v6 ? "]" : "", ports[i], l->insecure ? "h2c" : "tls");
    if (l->insecure)
      sg_warn("listener %s is INSECURE: cleartext h2c, no TLS, credentials "
              "travel in clear; use it for local development only",
              l->name);
    if (l->auth_none)
      sg_warn("listener %s has \"auth\": \"none\": every caller is "
              "\"anonymous\"; use it for local development only",
              l->name);
  }
  warn_unverified_backends(cfg);
  warn_missing_companions(cfg);
  warn_off_tenants_sharing_backends(cfg);
  warn_unused_client_cas(cfg);
  /* The admin server runs on this (main) loop: it stays up while workers
   * drain, so probes keep answering. */
  if (cfg->admin.enabled) {
    m.admin = sg_admin_new(m.base, &cfg->admin, m.metrics, err, sizeof err);
    if (m.admin == NULL) {
      sg_error("%s", err); /* it names admin */
      goto out;
    }
  }
  for (int i = 0; i < 4; i++) {
    sigs[i] = evsignal_new(m.base, signos[i], on_signal, &m);
    evsignal_add(sigs[i], NULL);
  }
  /* main() held these since before the configuration was loaded; one that
   * came in meanwhile is now delivered to the loop as a normal reload or
   * reopen. Threads started below block every signal. */
  sigset_t startup;
  startup_signals(&startup);
  pthread_sigmask(SIG_UNBLOCK, &startup, NULL);

  /* Workers must not take process signals: the main loop handles them. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  for (unsigned i = 0; i < m.n_workers; i++) {
    int rv = sg_worker_start(m.workers[i]);
    if (rv != 0) {
      pthread_sigmask(SIG_SETMASK, &old, NULL);
      sg_error("cannot start worker thread %u of %u: %s: raise the task limit "
               "(systemd TasksMax=, the pod's pids limit, ulimit -u) or the memory "
               "limit, or lower \"workers\" (0: one per CPU)",
               i, m.n_workers, strerror(rv));
      goto out;
    }
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  m.workers_running = m.n_workers;
  m.started = true;
  update_readiness(&m);
  sg_info("sparkgate %s ready: %u workers, config %s", SG_VERSION, m.n_workers,
          cfg->path);
  sg_notify_ready();
  sg_notify_status("serving");

  event_base_dispatch(m.base);

  if (m.draining) {
    signal(SIGTERM, on_second_signal);
    signal(SIGINT, on_second_signal);
  }
  for (unsigned i = 0; i < m.n_workers; i++)
    sg_worker_join(m.workers[i]);
  sg_info("stopped");
  status = 0;

out:
  for (int i = 0; i < 4; i++)
    if (sigs[i] != NULL)
      event_free(sigs[i]);
  if (m.workers != NULL) {
    for (unsigned i = 0; i < m.n_workers; i++) {
      if (m.workers[i] != NULL && m.workers[i]->thread_started) {
        sg_worker_request_drain(m.workers[i]);
        sg_worker_join(m.workers[i]);
      }
      sg_worker_free(m.workers[i]);
    }
  }
  free(m.workers);
  free(ports);
  /* After the workers: none of them can ask for a refetch any more. */
  sg_keyfetch_free(m.keyfetch);
  if (m.admin != NULL)
    sg_admin_free(m.admin);
  if (m.worker_exit_ev != NULL)
    event_free(m.worker_exit_ev);
  if (m.base != NULL)
    event_base_free(m.base);
  sg_runtime_unref(m.rt);
  if (m.metrics != NULL)
    sg_metrics_free(m.metrics);
  sg_accesslog_close();
  return status;
}

int main(int argc, char **argv) {
  static const struct option options[] = {
      {"config", required_argument, NULL, 'c'},
      {"check-config", no_argument, NULL, 't'},
      {"version", no_argument, NULL, 'v'},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0},
  };
  const char *config_path = NULL;
  bool check_only = false;
  int opt;
  while ((opt = getopt_long(argc, argv, "c:tvh", options, NULL)) != -1) {
    switch (opt) {
    case 'c':
      config_path = optarg;
      break;
    case 't':
      check_only = true;
      break;
    case 'v':
      printf("sparkgate %s (nghttp2 %s, %s, libevent %s)\n", SG_VERSION,
             NGHTTP2_VERSION, OpenSSL_version(OPENSSL_VERSION),
             event_get_version());
      return 0;
    case 'h':
      usage(stdout);
      return 0;
    default:
      usage(stderr);
      return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "sparkgate: unexpected argument '%s'\n", argv[optind]);
    usage(stderr);
    return 2;
  }
  if (config_path == NULL) {
    fprintf(stderr, "sparkgate: no configuration file: use -c FILE\n");
    usage(stderr);
    return 2;
  }

  signal(SIGPIPE, SIG_IGN);
  /* Loading a large configuration, building TLS contexts and binding take
   * a while, and config-reloaders send SIGHUP at any moment: until run()
   * has its handlers, the default action would kill the process. Held
   * here, delivered by run() (a check only exits: they mean nothing). */
  sigset_t startup;
  startup_signals(&startup);
  pthread_sigmask(SIG_BLOCK, &startup, NULL);
#ifdef __GLIBC__
  /* Stream buffers come and go in 16 KiB pieces at gigabytes per second:
   * without these, glibc hands freed memory back to the kernel and takes
   * it again, and page faults cost a sixth of bulk throughput. The cap on
   * what is kept stays small next to the flow-control bounds. */
  mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
  mallopt(M_TOP_PAD, 4 * 1024 * 1024);
#endif
  /* Before libevent allocates anything: its buffers' chains come and go
   * with every call (see memcache.h). */
  event_set_mem_functions(sg_memcache_malloc, sg_memcache_realloc, sg_memcache_free);
  /* Cross-thread event_active (drain requests) needs libevent's locks. */
  if (evthread_use_pthreads() != 0) {
    fprintf(stderr, "sparkgate: libevent has no pthreads support\n");
    return 1;
  }

  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  if (sg_config_load(config_path, &cfg, &errs) != 0) {
    print_errors(&errs);
    if (errs.count == 0) /* even the message could not be kept */
      fprintf(stderr, "sparkgate: out of memory while loading %s; not starting\n",
              config_path);
    else
      fprintf(stderr, "sparkgate: %zu error%s in %s; not starting\n", errs.count,
              errs.count == 1 ? "" : "s", config_path);
    sg_config_errors_clear(&errs);
    return 1;
  }
  if (check_only) {
    sg_config_print_summary(cfg, stdout);
    sg_config_unref(cfg);
    return 0;
  }
  int status = run(cfg);
  sg_config_unref(cfg);
  sg_memcache_release();
  return status;
}
