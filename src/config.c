#include "sparkgate/config.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>

#include "sparkgate/jsonload.h"
#include "sparkgate/jwt.h"
#include "sparkgate/netaddr.h"
#include "sparkgate/tls.h"

/* Defaults carry their unit in the name, as the keys do. */
#define SG_DEFAULT_MAX_CONCURRENT_STREAMS 100
#define SG_DEFAULT_STREAM_WINDOW_BYTES (1u << 20)
#define SG_DEFAULT_CONNECTION_WINDOW_BYTES (16u << 20)
#define SG_DEFAULT_MAX_HEADER_LIST_BYTES 16384
#define SG_DEFAULT_DRAIN_TIMEOUT_MS 30000
#define SG_DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS 10000
#define SG_DEFAULT_IDLE_TIMEOUT_MS 300000
/* Ten seconds: a trim costs two madvise calls, each a TLB shootdown of the
 * other workers' CPUs (about 20 us each on a 2-vCPU VM with both workers
 * busy), so a client calling every few seconds should not pay it per
 * call; a connection idle longer than that, a gateway's usual one, does
 * once per idle period. */
#define SG_DEFAULT_IDLE_TRIM_MS 10000
#define SG_DEFAULT_TCP_KEEPALIVE_MS 60000
#define SG_DEFAULT_MAX_GRPC_TIMEOUT_MS (24u * 3600u * 1000u)
#define SG_DEFAULT_WRITE_STALL_TIMEOUT_MS 60000
/* An hour: room for a query that computes for many minutes before its
 * first batch (Spark's reattachable streams end every 2 minutes anyway). */
#define SG_DEFAULT_STREAM_IDLE_TIMEOUT_MS 3600000
#define SG_DEFAULT_MAX_CONNECTIONS 10000
#define SG_DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS 5000
#define SG_DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS 60000
#define SG_DEFAULT_PATH_PREFIX "/spark.connect.SparkConnectService/"

/* HTTP/2 caps the flow-control window at 2^31-1 (RFC 9113 6.9.1). */
#define SG_MAX_WINDOW_BYTES 0x7fffffffu

void sg_config_errors_add(sg_config_errors *errs, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *msg = NULL;
  if (vasprintf(&msg, fmt, ap) < 0)
    msg = NULL;
  va_end(ap);
  if (msg == NULL)
    return;
  char **grown = realloc(errs->messages, (errs->count + 1) * sizeof *grown);
  if (grown == NULL) {
    free(msg);
    return;
  }
  errs->messages = grown;
  errs->messages[errs->count++] = msg;
}

void sg_config_errors_clear(sg_config_errors *errs) {
  for (size_t i = 0; i < errs->count; i++)
    free(errs->messages[i]);
  free(errs->messages);
  errs->messages = NULL;
  errs->count = 0;
}

/* ---- loading context ---------------------------------------------------- */

typedef struct loader {
  sg_jsonload j;    /* counts every problem, stored or not */
  const char *file; /* named by each message */
  sg_config *cfg;
  sg_config_errors *errs;
  /* auth.jwt_providers is there but did not load: its own errors say why,
   * so "no providers are configured" would be wrong advice. */
  bool jwt_providers_failed;
} loader;

#define LOAD_ERR(ld, path, ...) sg_jsonload_error(&(ld)->j, (path), __VA_ARGS__)

static void add_error(loader *ld, const char *json_path, const char *msg) {
  if (json_path == NULL || json_path[0] == '\0')
    sg_config_errors_add(ld->errs, "%s: %s", ld->file, msg);
  else
    sg_config_errors_add(ld->errs, "%s: %s: %s", ld->file, json_path, msg);
}

/* The sg_jsonload report function: it already counted the problem. */
static void report_counted(void *ctx, const char *json_path, const char *msg) {
  add_error(ctx, json_path, msg);
}

/* For the section parsers of other modules, which count on their own. */
static void report_error(void *ctx, const char *json_path, const char *msg) {
  loader *ld = ctx;
  ld->j.errors++;
  add_error(ld, json_path, msg);
}

/* Every number in the main file fits 32 bits (milliseconds, counts, bytes). */
static uint32_t get_u32(loader *ld, const json_t *obj, const char *path,
                        const char *key, uint32_t min, uint32_t max,
                        uint32_t dflt) {
  return (uint32_t)sg_jsonload_uint(&ld->j, obj, path, key, min, max, dflt);
}


/* ---- sections ----------------------------------------------------------- */

static void load_listener_auth(loader *ld, json_t *obj, const char *path,
                               sg_listener_config *l) {
  char apath[256];
  sg_jsonload_key_path(apath, sizeof apath, path, "auth");
  json_t *auth = json_object_get(obj, "auth");
  if (json_is_string(auth) && strcmp(json_string_value(auth), "none") == 0) {
    l->auth_none = true;
    sg_listener_auth_default(&l->auth);
    return;
  }
  if (auth != NULL && !json_is_object(auth)) {
    LOAD_ERR(ld, apath, "must be an object (methods, require, client_identity) "
                        "or the string \"none\"");
    sg_listener_auth_default(&l->auth);
    return;
  }
  sg_listener_auth_parse(auth, apath, &l->auth, report_error, ld);
}

/* Checks that need the whole file: a listener may only ask for a method
 * that something else in the config makes possible. */
static void check_listener_auth(loader *ld) {
  sg_config *cfg = ld->cfg;
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *l = &cfg->listeners[i];
    char apath[64];
    snprintf(apath, sizeof apath, "listeners[%zu].auth", i);
    if (l->auth_none || l->name == NULL)
      continue;
    /* With "mtls" too and "require": "any", certificates alone do. */
    bool no_jwt = cfg->jwt == NULL && !ld->jwt_providers_failed;
    if ((l->auth.methods & SG_LISTENER_AUTH_JWT) && no_jwt &&
        (!(l->auth.methods & SG_LISTENER_AUTH_MTLS) ||
         l->auth.require == SG_LISTENER_AUTH_REQUIRE_ALL))
      LOAD_ERR(ld, apath,
               "accepts JWT but no auth.jwt_providers are configured: add a "
               "provider, use \"methods\": [\"mtls\"] with client certificates, "
               "or \"auth\": \"none\" for local development only");
    if ((l->auth.methods & SG_LISTENER_AUTH_MTLS) &&
        (l->insecure || l->client_cert_mode == SG_CLIENT_CERT_NONE))
      LOAD_ERR(ld, apath,
               "accepts mtls but the listener asks for no client certificate: "
               "set tls.client_certificates to \"optional\" or \"required\"");
    if (l->auth.require == SG_LISTENER_AUTH_REQUIRE_ALL &&
        (l->auth.methods & SG_LISTENER_AUTH_JWT) && no_jwt)
      LOAD_ERR(ld, apath, "requires a JWT but no auth.jwt_providers are configured");
  }
}

/* Two spellings of one address ("::1", "0::1") bind the same socket:
 * compared as addresses, not as text. */
static bool same_address(const char *a, const char *b) {
  if (a == NULL || b == NULL)
    return false;
  unsigned char x[16], y[16];
  if (inet_pton(AF_INET, a, x) == 1 && inet_pton(AF_INET, b, y) == 1)
    return memcmp(x, y, 4) == 0;
  if (inet_pton(AF_INET6, a, x) == 1 && inet_pton(AF_INET6, b, y) == 1)
    return memcmp(x, y, 16) == 0;
  return strcmp(a, b) == 0;
}

static void load_listener(loader *ld, json_t *obj, const char *path,
                          sg_listener_config *l, size_t index) {
  size_t errors_before = ld->j.errors;
  static const char *const keys[] = {"name", "address", "port", "tls",
                                     "insecure", "auth", NULL};
  static const char *const tls_keys[] = {"cert", "key", "client_certificates",
                                         "client_ca", "crl", NULL};
  sg_jsonload_check_keys(&ld->j, obj, path, keys);

  const char *name = sg_jsonload_string(&ld->j, obj, path, "name", false);
  char kp[256];
  sg_jsonload_key_path(kp, sizeof kp, path, "name");
  if (name != NULL) {
    l->name = sg_jsonload_strdup(&ld->j, kp, name);
  } else if (asprintf(&l->name, "listener-%zu", index) < 0) {
    l->name = NULL;
    sg_jsonload_oom(&ld->j, kp);
  }

  const char *addr = sg_jsonload_string(&ld->j, obj, path, "address", false);
  sg_jsonload_key_path(kp, sizeof kp, path, "address");
  l->address = sg_jsonload_strdup(&ld->j, kp, addr != NULL ? addr : "127.0.0.1");
  char v4[INET_ADDRSTRLEN];
  if (l->address != NULL && !sg_netaddr_is_numeric(l->address))
    LOAD_ERR(ld, kp, "'%s' is not a numeric IPv4 or IPv6 address", l->address);
  else if (l->address != NULL && sg_netaddr_v4_mapped(l->address, v4, sizeof v4))
    LOAD_ERR(ld, kp, "'%s' is an IPv4-mapped IPv6 address, which an IPv6-only listener "
             "cannot bind: write it as the IPv4 address %s", l->address, v4);
  sg_jsonload_key_path(kp, sizeof kp, path, "port");
  if (json_object_get(obj, "port") == NULL)
    LOAD_ERR(ld, kp, "missing (an integer from 0 to 65535 is required)");
  l->port = (uint16_t)sg_jsonload_uint(&ld->j, obj, path, "port", 0, 65535, 0);

  l->insecure = sg_jsonload_bool(&ld->j, obj, path, "insecure", false);
  load_listener_auth(ld, obj, path, l);
  json_t *tls = sg_jsonload_object(&ld->j, obj, path, "tls", false);
  if (tls == NULL) {
    if (!l->insecure && json_object_get(obj, "tls") == NULL) {
      sg_jsonload_key_path(kp, sizeof kp, path, "tls");
      LOAD_ERR(ld, kp,
               "missing: a listener needs TLS (cert and key), or \"insecure\": "
               "true for a cleartext h2c listener (local development only)");
    }
    return;
  }
  if (l->insecure) {
    sg_jsonload_key_path(kp, sizeof kp, path, "insecure");
    LOAD_ERR(ld, kp, "cannot be true together with \"tls\": choose one");
  }
  char tpath[256];
  sg_jsonload_key_path(tpath, sizeof tpath, path, "tls");
  sg_jsonload_check_keys(&ld->j, tls, tpath, tls_keys);
  l->tls_cert_file = sg_jsonload_file(&ld->j, tls, tpath, "cert", true);
  l->tls_key_file = sg_jsonload_file(&ld->j, tls, tpath, "key", true);

  const char *mode =
      sg_jsonload_string(&ld->j, tls, tpath, "client_certificates", false);
  l->client_cert_mode = SG_CLIENT_CERT_NONE;
  if (mode != NULL) {
    if (strcmp(mode, "none") == 0)
      l->client_cert_mode = SG_CLIENT_CERT_NONE;
    else if (strcmp(mode, "optional") == 0)
      l->client_cert_mode = SG_CLIENT_CERT_OPTIONAL;
    else if (strcmp(mode, "required") == 0)
      l->client_cert_mode = SG_CLIENT_CERT_REQUIRED;
    else {
      sg_jsonload_key_path(kp, sizeof kp, tpath, "client_certificates");
      LOAD_ERR(ld, kp, "'%s' is not one of none, optional, required", mode);
    }
  }
  l->client_ca_file = sg_jsonload_file(&ld->j, tls, tpath, "client_ca",
                                       l->client_cert_mode != SG_CLIENT_CERT_NONE);
  json_t *crls = sg_jsonload_array(&ld->j, tls, tpath, "crl", false);
  if (crls != NULL) {
    size_t n = json_array_size(crls);
    l->crl_files = calloc(n ? n : 1, sizeof(char *));
    if (l->crl_files == NULL) {
      sg_jsonload_key_path(kp, sizeof kp, tpath, "crl");
      sg_jsonload_oom(&ld->j, kp);
    } else {
      l->n_crl_files = n;
    }
    for (size_t i = 0; i < l->n_crl_files; i++) {
      char cpath[256];
      snprintf(cpath, sizeof cpath, "%s.crl[%zu]", tpath, i);
      json_t *item = json_array_get(crls, i);
      if (!json_is_string(item)) {
        LOAD_ERR(ld, cpath, "must be a file name string");
        continue;
      }
      l->crl_files[i] =
          sg_jsonload_readable(&ld->j, cpath, json_string_value(item));
    }
  }

  /* Build the TLS context once now so that a key that does not match its
   * certificate, or an unparsable CA, fails at load and not at accept;
   * whenever this listener's keys themselves were fine, so that the file's
   * other errors do not hide this one. */
  if (l->tls_cert_file != NULL && l->tls_key_file != NULL &&
      ld->j.errors == errors_before) {
    char err[512], keypath[300];
    const char *key = NULL;
    SSL_CTX *ctx = sg_tls_server_ctx_new(l, &key, err, sizeof err);
    if (ctx == NULL) {
      if (key != NULL)
        sg_jsonload_key_path(keypath, sizeof keypath, tpath, key);
      LOAD_ERR(ld, key != NULL ? keypath : tpath, "%s", err);
    } else {
      SSL_CTX_free(ctx);
    }
  }
}

/* Tenants come from a separate routing table file, or inline from the
 * main file; the same loader validates both. */
static void load_routes(loader *ld, json_t *root) {
  sg_config *cfg = ld->cfg;
  const char *table =
      sg_jsonload_string(&ld->j, root, "", "routing_table", false);
  json_t *tenants = json_object_get(root, "tenants");
  json_t *selectors = json_object_get(root, "tenant_selectors");
  if (table != NULL && (tenants != NULL || selectors != NULL)) {
    LOAD_ERR(ld, "routing_table",
             "give tenants either in the routing table file or inline "
             "(\"tenants\"), not both");
    return;
  }
  if (table != NULL) {
    /* Problems inside the table name the table file, not this one. */
    char *table_path = sg_jsonload_resolve(cfg->base_dir, table);
    if (table_path == NULL) {
      sg_jsonload_oom(&ld->j, "routing_table");
      return;
    }
    const char *main_file = ld->file;
    ld->file = table_path;
    size_t before = ld->j.errors;
    cfg->routes = sg_route_table_load(table, cfg->base_dir, report_error, ld);
    ld->file = main_file;
    free(table_path);
    if (cfg->routes == NULL && ld->j.errors == before)
      LOAD_ERR(ld, "routing_table", "cannot load '%s'", table);
  } else if (tenants == NULL) {
    LOAD_ERR(ld, "tenants", "missing: give \"tenants\" (an array) or "
                            "\"routing_table\" (a file name)");
    return;
  } else {
    json_t *inline_table = json_object();
    if (inline_table == NULL ||
        json_object_set(inline_table, "tenants", tenants) != 0 ||
        (selectors != NULL &&
         json_object_set(inline_table, "tenant_selectors", selectors) != 0)) {
      json_decref(inline_table);
      sg_jsonload_oom(&ld->j, "tenants");
      return;
    }
    size_t before = ld->j.errors;
    cfg->routes = sg_route_table_from_json(inline_table, cfg->base_dir,
                                           report_error, ld);
    json_decref(inline_table);
    if (cfg->routes == NULL && ld->j.errors == before)
      LOAD_ERR(ld, "tenants", "invalid");
  }
  if (cfg->routes != NULL) {
    cfg->tenants = cfg->routes->tenants;
    cfg->n_tenants = cfg->routes->n_tenants;
  }
}

static void report_jwt_error(void *ctx, const char *msg) {
  report_error(ctx, NULL, msg);
}

static void load_auth(loader *ld, json_t *root) {
  static const char *const keys[] = {"jwt_providers", "max_token_bytes",
                                     "token_cache_entries",
                                     "token_cache_max_ttl_s", NULL};
  sg_config *cfg = ld->cfg;
  /* Absent (NULL) reads as an empty object. */
  json_t *auth = sg_jsonload_object(&ld->j, root, "", "auth", false);
  sg_jsonload_check_keys(&ld->j, auth, "auth", keys);
  uint32_t max_token =
      sg_jsonload_uint(&ld->j, auth, "auth", "max_token_bytes", 256, 1u << 20,
                       SG_JWT_DEFAULT_MAX_TOKEN_BYTES);
  cfg->token_cache_entries = sg_jsonload_uint(
      &ld->j, auth, "auth", "token_cache_entries", 0, 10000000, 10000);
  cfg->token_cache_max_ttl_s = sg_jsonload_uint(
      &ld->j, auth, "auth", "token_cache_max_ttl_s", 1, 86400, 300);
  json_t *providers =
      sg_jsonload_array(&ld->j, auth, "auth", "jwt_providers", false);
  if (providers != NULL && json_array_size(providers) > 0) {
    sg_jwt_options opts = {.max_token_bytes = max_token};
    if (sg_jwt_providers_load(providers, cfg->base_dir, "auth.jwt_providers",
                              &opts, &cfg->jwt, report_jwt_error, ld) != 0) {
      cfg->jwt = NULL;
      ld->jwt_providers_failed = true;
    }
  }
}

static void load_root(loader *ld, json_t *root) {
  static const char *const keys[] = {
      "workers", "log_level", "drain_timeout_ms", "idle_timeout_ms", "idle_trim_ms",
      "tls_handshake_timeout_ms", "max_grpc_timeout_ms", "write_stall_timeout_ms",
      "stream_idle_timeout_ms", "max_connections", "max_connections_per_client",
      "tcp_keepalive_ms",
      "http2", "upstream", "allowed_path_prefixes",
      "listeners", "tenants", "tenant_selectors", "routing_table", "auth",
      "identity_headers", "admin", "access_log", NULL};
  static const char *const http2_keys[] = {
      "max_concurrent_streams", "stream_window_bytes",
      "connection_window_bytes", "max_header_list_bytes", NULL};
  static const char *const upstream_keys[] = {"connect_timeout_ms",
                                               "idle_timeout_ms", NULL};
  sg_config *cfg = ld->cfg;
  sg_jsonload_check_keys(&ld->j, root, "", keys);

  cfg->workers = get_u32(ld, root, "", "workers", 0, 256, 0);
  cfg->workers_configured = cfg->workers;
  if (cfg->workers == 0) {
    /* The CPUs this process may run on (taskset, a container's cpuset,
     * systemd's CPUAffinity=), not every CPU of the machine; capped at
     * the documented maximum. */
    cpu_set_t cpus;
    long n = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus)
                                                          : sysconf(_SC_NPROCESSORS_ONLN);
    cfg->workers = n > 256 ? 256 : n > 0 ? (unsigned)n : 1;
  }
  cfg->log_level = SG_LOG_INFO;
  const char *level = sg_jsonload_string(&ld->j, root, "", "log_level", false);
  if (level != NULL && sg_log_level_parse(level, &cfg->log_level) != 0)
    LOAD_ERR(ld, "log_level", "'%s' is not one of debug, info, warn, error", level);

  cfg->drain_timeout_ms = get_u32(ld, root, "", "drain_timeout_ms", 0, 3600000,
                                  SG_DEFAULT_DRAIN_TIMEOUT_MS);
  cfg->idle_timeout_ms = get_u32(ld, root, "", "idle_timeout_ms", 1000, 86400000,
                                 SG_DEFAULT_IDLE_TIMEOUT_MS);
  cfg->idle_trim_ms = get_u32(ld, root, "", "idle_trim_ms", 0, 86400000,
                              SG_DEFAULT_IDLE_TRIM_MS);
  cfg->max_grpc_timeout_ms = get_u32(ld, root, "", "max_grpc_timeout_ms", 1,
                                     0xffffffffu, SG_DEFAULT_MAX_GRPC_TIMEOUT_MS);
  cfg->write_stall_timeout_ms =
      get_u32(ld, root, "", "write_stall_timeout_ms", 100, 3600000,
              SG_DEFAULT_WRITE_STALL_TIMEOUT_MS);
  cfg->stream_idle_timeout_ms =
      get_u32(ld, root, "", "stream_idle_timeout_ms", 1000, 0xffffffffu,
              SG_DEFAULT_STREAM_IDLE_TIMEOUT_MS);
  cfg->max_connections = get_u32(ld, root, "", "max_connections", 0, 10000000,
                                 SG_DEFAULT_MAX_CONNECTIONS);
  cfg->max_connections_per_client =
      get_u32(ld, root, "", "max_connections_per_client", 0, 10000000, 0);
  cfg->tcp_keepalive_ms = get_u32(ld, root, "", "tcp_keepalive_ms", 0, 7200000,
                                  SG_DEFAULT_TCP_KEEPALIVE_MS);
  cfg->tls_handshake_timeout_ms =
      get_u32(ld, root, "", "tls_handshake_timeout_ms", 100, 600000,
              SG_DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS);

  /* An absent section (NULL) reads as an empty object. */
  json_t *http2 = sg_jsonload_object(&ld->j, root, "", "http2", false);
  sg_jsonload_check_keys(&ld->j, http2, "http2", http2_keys);
  cfg->max_concurrent_streams =
      get_u32(ld, http2, "http2", "max_concurrent_streams", 1, 10000,
              SG_DEFAULT_MAX_CONCURRENT_STREAMS);
  cfg->stream_window_bytes =
      get_u32(ld, http2, "http2", "stream_window_bytes", 65535,
              SG_MAX_WINDOW_BYTES, SG_DEFAULT_STREAM_WINDOW_BYTES);
  cfg->connection_window_bytes =
      get_u32(ld, http2, "http2", "connection_window_bytes", 65535,
              SG_MAX_WINDOW_BYTES, SG_DEFAULT_CONNECTION_WINDOW_BYTES);
  cfg->max_header_list_bytes =
      get_u32(ld, http2, "http2", "max_header_list_bytes", 1024, 1u << 20,
              SG_DEFAULT_MAX_HEADER_LIST_BYTES);

  json_t *upstream = sg_jsonload_object(&ld->j, root, "", "upstream", false);
  sg_jsonload_check_keys(&ld->j, upstream, "upstream", upstream_keys);
  cfg->upstream_connect_timeout_ms =
      get_u32(ld, upstream, "upstream", "connect_timeout_ms", 10, 600000,
              SG_DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS);
  cfg->upstream_idle_timeout_ms =
      get_u32(ld, upstream, "upstream", "idle_timeout_ms", 100, 86400000,
              SG_DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS);

  json_t *prefixes =
      sg_jsonload_array(&ld->j, root, "", "allowed_path_prefixes", false);
  size_t n_prefixes = prefixes != NULL ? json_array_size(prefixes) : 1;
  cfg->allowed_path_prefixes = calloc(n_prefixes + 1, sizeof(char *));
  if (cfg->allowed_path_prefixes == NULL) {
    sg_jsonload_oom(&ld->j, "allowed_path_prefixes");
  } else if (prefixes == NULL) {
    cfg->n_allowed_path_prefixes = 1;
    cfg->allowed_path_prefixes[0] = sg_jsonload_strdup(
        &ld->j, "allowed_path_prefixes", SG_DEFAULT_PATH_PREFIX);
  } else {
    if (n_prefixes == 0)
      LOAD_ERR(ld, "allowed_path_prefixes",
               "is empty, which refuses every call; list at least one prefix "
               "(\"" SG_DEFAULT_PATH_PREFIX "\" for Spark Connect), or leave "
               "the key out");
    cfg->n_allowed_path_prefixes = n_prefixes;
    for (size_t i = 0; i < n_prefixes; i++) {
      json_t *p = json_array_get(prefixes, i);
      char ppath[64];
      snprintf(ppath, sizeof ppath, "allowed_path_prefixes[%zu]", i);
      if (!json_is_string(p) || json_string_value(p)[0] != '/') {
        LOAD_ERR(ld, ppath, "must be a string starting with '/'");
        continue;
      }
      cfg->allowed_path_prefixes[i] =
          sg_jsonload_strdup(&ld->j, ppath, json_string_value(p));
    }
  }

  json_t *listeners = sg_jsonload_array(&ld->j, root, "", "listeners", true);
  if (listeners != NULL) {
    size_t n = json_array_size(listeners);
    if (n == 0)
      LOAD_ERR(ld, "listeners", "needs at least one listener");
    cfg->listeners = calloc(n + 1, sizeof *cfg->listeners);
    if (cfg->listeners == NULL) {
      sg_jsonload_oom(&ld->j, "listeners");
      n = 0;
    }
    cfg->n_listeners = n;
    for (size_t i = 0; i < cfg->n_listeners; i++) {
      char lpath[64];
      snprintf(lpath, sizeof lpath, "listeners[%zu]", i);
      json_t *l = json_array_get(listeners, i);
      if (!json_is_object(l)) {
        LOAD_ERR(ld, lpath, "must be an object, not %s", sg_jsonload_type_name(l));
        continue;
      }
      const sg_listener_config *li = &cfg->listeners[i];
      load_listener(ld, l, lpath, &cfg->listeners[i], i);
      for (size_t j = 0; j < i; j++) {
        const sg_listener_config *lj = &cfg->listeners[j];
        if (lj->name != NULL && li->name != NULL && strcmp(lj->name, li->name) == 0)
          LOAD_ERR(ld, lpath, "duplicate listener name '%s' (also listeners[%zu])",
                   li->name, j);
        else if (li->port != 0 && lj->port == li->port &&
                 same_address(lj->address, li->address))
          LOAD_ERR(ld, lpath, "%s:%u is already used by listeners[%zu]",
                   li->address, li->port, j);
      }
    }
  }

  load_auth(ld, root);
  sg_identity_headers_parse(json_object_get(root, "identity_headers"),
                            "identity_headers", &cfg->identity_headers,
                            report_error, ld);
  check_listener_auth(ld);

  load_routes(ld, root);

  sg_admin_config_parse(json_object_get(root, "admin"), "admin", &cfg->admin,
                        report_error, ld);
  if (cfg->admin.enabled && cfg->listeners != NULL)
    sg_admin_config_check_listeners(&cfg->admin, cfg->listeners, cfg->n_listeners,
                                    "admin", report_error, ld);
  if (sg_accesslog_config_parse(json_object_get(root, "access_log"), "access_log",
                                cfg->base_dir, &cfg->access_log, report_error,
                                ld) == 0 &&
      cfg->access_log.enabled && cfg->access_log.path != NULL &&
      !sg_accesslog_path_writable(cfg->access_log.path))
    /* What a start, a reload or --check-config would find opening it,
     * reported with the file's other errors. */
    sg_jsonload_error(&ld->j, "access_log.path",
                      "cannot write '%s': %s (the directory must exist and be "
                      "writable by sparkgate's user)",
                      cfg->access_log.path, sg_jsonload_strerror(errno));
}

static void config_free(sg_config *cfg) {
  if (cfg == NULL)
    return;
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    sg_listener_config *l = &cfg->listeners[i];
    free(l->name);
    free(l->address);
    free(l->tls_cert_file);
    free(l->tls_key_file);
    free(l->client_ca_file);
    for (size_t j = 0; j < l->n_crl_files; j++)
      free(l->crl_files[j]);
    free(l->crl_files);
  }
  free(cfg->listeners);
  sg_route_table_unref(cfg->routes);
  sg_admin_config_clear(&cfg->admin);
  sg_accesslog_config_clear(&cfg->access_log);
  for (size_t i = 0; i < cfg->n_allowed_path_prefixes; i++)
    free(cfg->allowed_path_prefixes[i]);
  free(cfg->allowed_path_prefixes);
  if (cfg->jwt != NULL)
    sg_jwt_verifier_unref(cfg->jwt);
  free(cfg->path);
  free(cfg->base_dir);
  free(cfg);
}

static int load_json(const char *path, json_t *root, sg_config **out,
                     sg_config_errors *errs) {
  loader ld = {
      .j = {.report = report_counted, .what = "the configuration"},
      .file = path,
      .errs = errs,
  };
  ld.j.ctx = &ld;
  sg_config *cfg = calloc(1, sizeof *cfg);
  if (cfg == NULL) {
    sg_jsonload_oom(&ld.j, "");
    return -1;
  }
  ld.cfg = cfg;
  cfg->refcount_ = 1;
  cfg->path = sg_jsonload_strdup(&ld.j, "", path);
  const char *slash = strrchr(path, '/');
  if (slash == NULL)
    cfg->base_dir = sg_jsonload_strdup(&ld.j, "", ".");
  else if (slash == path)
    cfg->base_dir = sg_jsonload_strdup(&ld.j, "", "/");
  else if ((cfg->base_dir = strndup(path, (size_t)(slash - path))) == NULL)
    sg_jsonload_oom(&ld.j, "");
  ld.j.base_dir = cfg->base_dir;

  if (ld.j.errors > 0) {
    /* Nothing to resolve file names against: stop here. */
  } else if (!json_is_object(root)) {
    LOAD_ERR(&ld, "", "the top level must be a JSON object");
  } else {
    load_root(&ld, root);
  }
  if (ld.j.errors > 0) {
    config_free(cfg);
    return -1;
  }
  *out = cfg;
  return 0;
}

static void parse_error(const char *path, const json_error_t *jerr, bool oom,
                        sg_config_errors *errs) {
  if (oom)
    sg_config_errors_add(errs, "%s: out of memory while loading the "
                         "configuration", path);
  else
    sg_config_errors_add(errs, "%s:%d:%d: invalid JSON: %s", path, jerr->line,
                         jerr->column, jerr->text);
}

int sg_config_load_string(const char *path, const char *json, sg_config **out,
                          sg_config_errors *errs) {
  sg_tls_new_load();
  json_error_t jerr;
  bool oom;
  json_t *root = sg_jsonload_parse(json, strlen(json), &jerr, &oom);
  if (root == NULL) {
    parse_error(path, &jerr, oom, errs);
    return -1;
  }
  int rv = load_json(path, root, out, errs);
  json_decref(root);
  return rv;
}

int sg_config_load(const char *path, sg_config **out, sg_config_errors *errs) {
  sg_tls_new_load();
  json_error_t jerr;
  FILE *f = sg_jsonload_fopen_config(path);
  if (f == NULL) {
    sg_config_errors_add(errs, "%s: cannot open: %s", path,
                         sg_jsonload_strerror(errno));
    return -1;
  }
  bool oom;
  json_t *root = sg_jsonload_parse_file(f, &jerr, &oom);
  fclose(f);
  if (root == NULL) {
    parse_error(path, &jerr, oom, errs);
    return -1;
  }
  int rv = load_json(path, root, out, errs);
  json_decref(root);
  return rv;
}

sg_config *sg_config_ref(sg_config *cfg) {
  __atomic_add_fetch(&cfg->refcount_, 1, __ATOMIC_RELAXED);
  return cfg;
}

void sg_config_unref(sg_config *cfg) {
  if (cfg == NULL)
    return;
  if (__atomic_sub_fetch(&cfg->refcount_, 1, __ATOMIC_ACQ_REL) == 0)
    config_free(cfg);
}

static const char *client_cert_mode_name(sg_client_cert_mode m) {
  switch (m) {
  case SG_CLIENT_CERT_NONE: return "none";
  case SG_CLIENT_CERT_OPTIONAL: return "optional";
  case SG_CLIENT_CERT_REQUIRED: return "required";
  }
  return "?";
}

void sg_config_print_summary(const sg_config *cfg, void *stdio_file) {
  FILE *f = stdio_file;
  fprintf(f, "config %s: OK\n", cfg->path);
  fprintf(f, "workers: %u, log level: %s, drain timeout: %u ms\n",
          cfg->workers, sg_log_level_name(cfg->log_level),
          cfg->drain_timeout_ms);
  fprintf(f, "listeners:\n");
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *l = &cfg->listeners[i];
    bool v6 = strchr(l->address, ':') != NULL;
    if (l->insecure)
      fprintf(f, "  %s  %s%s%s:%u  h2c (INSECURE: cleartext, no TLS)\n",
              l->name, v6 ? "[" : "", l->address, v6 ? "]" : "", l->port);
    else
      fprintf(f, "  %s  %s%s%s:%u  tls cert=%s client-certificates=%s\n",
              l->name, v6 ? "[" : "", l->address, v6 ? "]" : "", l->port,
              l->tls_cert_file, client_cert_mode_name(l->client_cert_mode));
    if (sg_listener_client_ca_unused(l))
      fprintf(f, "    WARNING: tls.client_ca is set but client_certificates is "
                 "\"none\": no client certificate is asked for\n");
    if (l->auth_none)
      fprintf(f, "    auth: NONE (every request is forwarded unauthenticated)\n");
    else
      fprintf(f, "    auth: %s%s%s (require %s, certificate identity from %s)\n",
              (l->auth.methods & SG_LISTENER_AUTH_JWT) ? "jwt" : "",
              (l->auth.methods & SG_LISTENER_AUTH_JWT) &&
                      (l->auth.methods & SG_LISTENER_AUTH_MTLS) ? "+" : "",
              (l->auth.methods & SG_LISTENER_AUTH_MTLS) ? "mtls" : "",
              l->auth.require == SG_LISTENER_AUTH_REQUIRE_ALL ? "all" : "any",
              sg_cert_identity_mode_name(l->auth.client_identity));
  }
  if (cfg->routes != NULL)
    sg_route_table_print_summary(cfg->routes, f);
  if (cfg->admin.enabled)
    fprintf(f, "admin: %s%s%s:%u (/metrics, /healthz, /readyz)\n",
            strchr(cfg->admin.address, ':') ? "[" : "", cfg->admin.address,
            strchr(cfg->admin.address, ':') ? "]" : "", cfg->admin.port);
  else
    fprintf(f, "admin: off\n");
  fprintf(f, "access log: %s\n",
          cfg->access_log.path != NULL ? cfg->access_log.path : "stderr");
  fprintf(f, "jwt providers: %zu\n",
          cfg->jwt != NULL ? sg_jwt_verifier_provider_count(cfg->jwt) : (size_t)0);
  fprintf(f, "allowed path prefixes:");
  for (size_t i = 0; i < cfg->n_allowed_path_prefixes; i++)
    fprintf(f, " %s", cfg->allowed_path_prefixes[i]);
  fprintf(f, "\n");
}
