/* Configuration: one JSON file parsed with jansson into one immutable,
 * validated snapshot. Workers share a snapshot read-only; a reload builds a
 * new one and swaps it in whole, so a stream always sees one consistent
 * config from start to end (it holds a reference). */
#ifndef SPARKGATE_CONFIG_H
#define SPARKGATE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sparkgate/accesslog.h"
#include "sparkgate/admin.h"
#include "sparkgate/backend.h"
#include "sparkgate/identity.h"
#include "sparkgate/log.h"
#include "sparkgate/route.h"

struct sg_jwt_verifier;

typedef enum sg_client_cert_mode {
  SG_CLIENT_CERT_NONE = 0,
  SG_CLIENT_CERT_OPTIONAL,
  SG_CLIENT_CERT_REQUIRED,
} sg_client_cert_mode;

typedef struct sg_listener_config {
  char *name;
  char *address; /* numeric IPv4 or IPv6 */
  uint16_t port; /* 0: the kernel picks one; the log says which */
  /* Cleartext h2c. Only when the operator wrote "insecure": true and gave
   * no "tls" object: there is no way to get it by omission. */
  bool insecure;
  char *tls_cert_file;
  char *tls_key_file;
  sg_client_cert_mode client_cert_mode;
  char *client_ca_file; /* required unless client_cert_mode is none */
  char **crl_files;
  size_t n_crl_files;
  /* Who may call through this listener. auth_none is only set by an
   * explicit "auth": "none" (local development): never by omission. */
  bool auth_none;
  sg_listener_auth auth;
} sg_listener_config;

/* Tenants and their backends live in the routing table (route.h). The
 * old name stays for code that only reads name and backends. */
typedef sg_route_tenant sg_tenant_config;



typedef struct sg_config {
  int refcount_; /* atomic; use sg_config_ref/unref */
  char *path;    /* the file it was loaded from */
  char *base_dir; /* relative file names in the config resolve here */

  unsigned workers; /* resolved: never 0 after load */
  unsigned workers_configured; /* as written: 0 means "the CPUs of the affinity" */
  sg_log_level log_level;

  /* HTTP/2 front end */
  uint32_t max_concurrent_streams;   /* per client connection */
  uint32_t stream_window_bytes;      /* per-stream flow-control budget */
  uint32_t connection_window_bytes;  /* per-connection budget */
  uint32_t max_header_list_bytes;
  uint32_t drain_timeout_ms;         /* SIGTERM: in-flight streams get this long */
  uint32_t tls_handshake_timeout_ms;
  uint32_t idle_timeout_ms;          /* client connection with no streams */
  /* A connection, client or backend, with no streams for this long gives
   * back its session's spare pages (sg_h2mem_session_trim); 0: never. */
  uint32_t idle_trim_ms;
  uint32_t max_grpc_timeout_ms;      /* longer grpc-timeout values are clamped */
  uint32_t write_stall_timeout_ms;   /* a peer that reads nothing for this long */
  uint32_t stream_idle_timeout_ms;   /* a call with no bytes either way */
  uint32_t max_connections;          /* client connections, all workers; 0: no cap */
  uint32_t max_connections_per_client; /* per client address; 0: no cap */
  uint32_t tcp_keepalive_ms;         /* client and backend sockets; 0: off */

  /* upstream */
  uint32_t upstream_connect_timeout_ms;
  uint32_t upstream_idle_timeout_ms; /* pooled connection with no streams */

  /* Requests whose :path starts with none of these get grpc-status 12. */
  char **allowed_path_prefixes;
  size_t n_allowed_path_prefixes;

  sg_listener_config *listeners;
  size_t n_listeners;

  /* The routing table: from "routing_table" (a file) or from "tenants"
   * and "tenant_selectors" inline. tenants/n_tenants view its tenants. */
  sg_route_table *routes;
  sg_route_tenant *tenants;
  size_t n_tenants;

  /* "auth": JWT providers (NULL when none are configured), and the
   * per-worker cache of verified tokens. */
  sg_admin_config admin;           /* "admin": /metrics, /healthz, /readyz */
  sg_accesslog_config access_log;  /* "access_log": one JSON line per RPC */

  struct sg_jwt_verifier *jwt;
  sg_identity_header_names identity_headers;
  uint32_t token_cache_entries;
  uint32_t token_cache_max_ttl_s;
} sg_config;

/* Collected load errors: each one names the file, the JSON path of the key
 * and what to fix, ready to print one per line. */
typedef struct sg_config_errors {
  char **messages;
  size_t count;
} sg_config_errors;

void sg_config_errors_add(sg_config_errors *errs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void sg_config_errors_clear(sg_config_errors *errs);

/* Loads and validates |path|. Returns 0 and a new snapshot in |*out|, or -1
 * with every problem found in |errs| (it keeps going after the first). Files
 * the config names (certificates, keys) are checked for readability here, so
 * a bad path fails at start and at reload, never on first use. */
int sg_config_load(const char *path, sg_config **out, sg_config_errors *errs);

/* Same, from a JSON text; |path| is only used in messages and to resolve
 * relative file names. */
int sg_config_load_string(const char *path, const char *json, sg_config **out,
                          sg_config_errors *errs);

/* Snapshots are shared between threads and outlive a reload while streams
 * still use them. */
sg_config *sg_config_ref(sg_config *cfg);
void sg_config_unref(sg_config *cfg);

/* Writes the one-screen summary that --check-config prints. */
void sg_config_print_summary(const sg_config *cfg, void *stdio_file);

/* A client CA that nothing reads: client_certificates "none". Loaded and
 * checked anyway (so that turning the mode on later cannot fail on it),
 * but an operator who wrote it expects client certificates. */
static inline bool sg_listener_client_ca_unused(const sg_listener_config *l) {
  return !l->insecure && l->client_ca_file != NULL &&
         l->client_cert_mode == SG_CLIENT_CERT_NONE;
}

#endif
