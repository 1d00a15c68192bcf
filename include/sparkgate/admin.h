/* Admin listener: plain HTTP/1.1 (libevent evhttp) on the main thread's
 * event loop, on its own address and port, never the client port:
 *
 *   GET /metrics  200, Prometheus text (sg_metrics_render)
 *   GET /healthz  200 "ok" while the process serves its loop (liveness)
 *   GET /readyz   200 "ready" when the flag set by sg_admin_set_ready is
 *                 true (config loaded, listeners up, not draining), else
 *                 503 "not ready" (readiness: take the pod out of the
 *                 Service endpoints while draining)
 *   other paths   404;  methods other than GET and HEAD: 405
 *
 * It has no authentication: bind it to loopback (the default) or to a
 * pod-internal address, never to a public interface. Binding happens once
 * at start; a reload that changes "admin" needs a restart (like the
 * listeners). */
#ifndef SPARKGATE_ADMIN_H
#define SPARKGATE_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct sg_listener_config;

struct event_base;
typedef struct sg_metrics sg_metrics;

#ifndef SG_CONFIG_REPORT_FN_DEFINED
#define SG_CONFIG_REPORT_FN_DEFINED
/* Receives one config error: the JSON path of the key ("admin.port") and
 * what is wrong with it. */
typedef void (*sg_config_report_fn)(void *ctx, const char *json_path, const char *msg);
#endif

#define SG_ADMIN_DEFAULT_ADDRESS "127.0.0.1"
#define SG_ADMIN_DEFAULT_PORT 9901

/* Open admin connections at most: at the cap the listener stops
 * accepting (further connects wait in the kernel's backlog) until one
 * closes. Probes and scrapes need a handful; the cap keeps whoever reaches
 * the port from taking the descriptors client connections need. */
#define SG_ADMIN_MAX_CONNECTIONS 64
/* Seconds a connection has, from its accept or its last request, to send
 * a complete request; then it is closed (however slowly bytes trickle). */
#define SG_ADMIN_REQUEST_DEADLINE_S 10

/* Root "admin": {"address": "127.0.0.1", "port": 9901}
 * Absent "admin" (or null): no admin listener. Present: "address" (numeric
 * IPv4 or IPv6) defaults to 127.0.0.1, "port" to 9901; port 0 lets the
 * kernel pick (the log line says which). */
typedef struct sg_admin_config {
  bool enabled;
  char *address;
  uint16_t port;
} sg_admin_config;

/* Parses |value| (the value of the "admin" key, NULL when absent) into
 * |out|. Every problem goes to |report| with its JSON path under
 * |json_path|; unknown keys are errors. Returns 0, or -1 when anything was
 * reported (|out| is then cleared). */
int sg_admin_config_parse(const json_t *value, const char *json_path, sg_admin_config *out,
                          sg_config_report_fn report, void *ctx);
void sg_admin_config_clear(sg_admin_config *c);

/* The admin listener must not share a client listener's port on an
 * overlapping address (same address, or either one a wildcard). Reports
 * each clash at |json_path|.port. Returns 0 or -1. */
int sg_admin_config_check_listeners(const sg_admin_config *a,
                                    const struct sg_listener_config *listeners,
                                    size_t n_listeners, const char *json_path,
                                    sg_config_report_fn report, void *ctx);

typedef struct sg_admin sg_admin;

/* Binds |cfg->address|:|cfg->port| and serves on |base| (the main loop),
 * at most SG_ADMIN_MAX_CONNECTIONS connections at a time. accept() failing
 * for want of descriptors pauses the listener (sg_accept_backoff).
 * |metrics| may be NULL (then /metrics is 404) and must outlive the
 * server. Logs "admin listening on ADDR:PORT" with the real port ([::1]
 * style for IPv6). Not ready until sg_admin_set_ready(a, true). Returns
 * NULL with a message in |err| on failure. */
sg_admin *sg_admin_new(struct event_base *base, const sg_admin_config *cfg,
                       sg_metrics *metrics, char *err, size_t errlen);

/* The bound port (the kernel's choice for port 0). */
uint16_t sg_admin_port(const sg_admin *a);

/* Other limits than SG_ADMIN_MAX_CONNECTIONS and the request deadline
 * (tests); applies to connections accepted from now on. */
void sg_admin_set_limits(sg_admin *a, size_t max_connections, unsigned deadline_ms);

/* /readyz answers 200 when true, 503 when false. Set true once every
 * worker runs; false when a drain starts. Any thread. */
void sg_admin_set_ready(sg_admin *a, bool ready);
bool sg_admin_ready(const sg_admin *a);

/* Closes the listener and open admin connections. */
void sg_admin_free(sg_admin *a);

#endif
