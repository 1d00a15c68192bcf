#include "sparkgate/config.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>

#include "sparkgate/jwt.h"
#include "sparkgate/tls.h"

/* Defaults carry their unit in the name, as the keys do. */
#define SG_DEFAULT_MAX_CONCURRENT_STREAMS 100
#define SG_DEFAULT_STREAM_WINDOW_BYTES (1u << 20)
#define SG_DEFAULT_CONNECTION_WINDOW_BYTES (16u << 20)
#define SG_DEFAULT_MAX_HEADER_LIST_BYTES 16384
#define SG_DEFAULT_DRAIN_TIMEOUT_MS 30000
#define SG_DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS 10000
#define SG_DEFAULT_IDLE_TIMEOUT_MS 300000
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
  const char *file;
  sg_config *cfg;
  sg_config_errors *errs;
  size_t errors_at_start;
} loader;

#define LOAD_ERR(ld, path, ...) load_error((ld), (path), __VA_ARGS__)

__attribute__((format(printf, 3, 4))) static void
load_error(loader *ld, const char *path, const char *fmt, ...) {
  char what[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  sg_config_errors_add(ld->errs, "%s: %s: %s", ld->file, path, what);
}

static char *xstrdup(const char *s) {
  char *d = strdup(s);
  if (d == NULL)
    abort(); /* a config that cannot be copied cannot be served either */
  return d;
}

static const char *json_type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER: return "an integer";
  case JSON_REAL: return "a number with a fraction";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  case JSON_NULL: return "null";
  }
  return "?";
}

/* Every key the loader does not know is an error: a typo such as
 * "client_certificate" for "client_certificates" must not silently turn a
 * security feature off. */
static void check_keys(loader *ld, json_t *obj, const char *path,
                       const char *const *known) {
  const char *key;
  json_t *value;
  json_object_foreach(obj, key, value) {
    bool found = false;
    for (size_t i = 0; known[i] != NULL; i++) {
      if (strcmp(known[i], key) == 0) {
        found = true;
        break;
      }
    }
    if (!found) {
      if (path[0] == '\0')
        LOAD_ERR(ld, key, "unknown key (check the spelling against docs/configuration.md)");
      else {
        char full[256];
        snprintf(full, sizeof full, "%s.%s", path, key);
        LOAD_ERR(ld, full, "unknown key (check the spelling against docs/configuration.md)");
      }
    }
  }
}

static void key_path(char *out, size_t outlen, const char *path,
                     const char *key) {
  if (path[0] == '\0')
    snprintf(out, outlen, "%s", key);
  else
    snprintf(out, outlen, "%s.%s", path, key);
}

/* Returns the string or NULL (absent, or wrong type: then an error is added
 * when |required| or when present with a wrong type). */
static const char *get_string(loader *ld, json_t *obj, const char *path,
                              const char *key, bool required) {
  char kp[256];
  key_path(kp, sizeof kp, path, key);
  json_t *v = json_object_get(obj, key);
  if (v == NULL) {
    if (required)
      LOAD_ERR(ld, kp, "missing (a string is required)");
    return NULL;
  }
  if (!json_is_string(v)) {
    LOAD_ERR(ld, kp, "must be a string, not %s", json_type_name(v));
    return NULL;
  }
  if (json_string_length(v) == 0 || strlen(json_string_value(v)) != json_string_length(v)) {
    LOAD_ERR(ld, kp, "must be a non-empty string without NUL bytes");
    return NULL;
  }
  return json_string_value(v);
}

static uint32_t get_uint(loader *ld, json_t *obj, const char *path,
                         const char *key, uint32_t min, uint32_t max,
                         uint32_t dflt) {
  char kp[256];
  key_path(kp, sizeof kp, path, key);
  json_t *v = json_object_get(obj, key);
  if (v == NULL)
    return dflt;
  if (!json_is_integer(v)) {
    LOAD_ERR(ld, kp, "must be an integer, not %s", json_type_name(v));
    return dflt;
  }
  json_int_t n = json_integer_value(v);
  if (n < (json_int_t)min || n > (json_int_t)max) {
    LOAD_ERR(ld, kp, "%lld is out of range (%u to %u)", (long long)n, min, max);
    return dflt;
  }
  return (uint32_t)n;
}

static bool get_bool(loader *ld, json_t *obj, const char *path,
                     const char *key, bool dflt) {
  char kp[256];
  key_path(kp, sizeof kp, path, key);
  json_t *v = json_object_get(obj, key);
  if (v == NULL)
    return dflt;
  if (!json_is_boolean(v)) {
    LOAD_ERR(ld, kp, "must be true or false, not %s", json_type_name(v));
    return dflt;
  }
  return json_is_true(v);
}

static json_t *get_object(loader *ld, json_t *obj, const char *path,
                          const char *key) {
  char kp[256];
  key_path(kp, sizeof kp, path, key);
  json_t *v = json_object_get(obj, key);
  if (v == NULL)
    return NULL;
  if (!json_is_object(v)) {
    LOAD_ERR(ld, kp, "must be an object, not %s", json_type_name(v));
    return NULL;
  }
  return v;
}

static json_t *get_array(loader *ld, json_t *obj, const char *path,
                         const char *key, bool required) {
  char kp[256];
  key_path(kp, sizeof kp, path, key);
  json_t *v = json_object_get(obj, key);
  if (v == NULL) {
    if (required)
      LOAD_ERR(ld, kp, "missing (an array is required)");
    return NULL;
  }
  if (!json_is_array(v)) {
    LOAD_ERR(ld, kp, "must be an array, not %s", json_type_name(v));
    return NULL;
  }
  return v;
}

/* Resolves |name| against the config file's directory. */
static char *resolve_path(const sg_config *cfg, const char *name) {
  if (name[0] == '/' || cfg->base_dir == NULL)
    return xstrdup(name);
  char *out = NULL;
  if (asprintf(&out, "%s/%s", cfg->base_dir, name) < 0)
    abort();
  return out;
}

/* A file named in the config must be readable now: finding out on the first
 * connection is too late. Returns the resolved name either way. */
static char *readable_file(loader *ld, const char *kp, const char *name) {
  char *resolved = resolve_path(ld->cfg, name);
  FILE *f = fopen(resolved, "rb");
  if (f == NULL)
    LOAD_ERR(ld, kp, "cannot read '%s': %s", resolved, strerror(errno));
  else
    fclose(f);
  return resolved;
}

static char *get_file(loader *ld, json_t *obj, const char *path,
                      const char *key, bool required) {
  const char *name = get_string(ld, obj, path, key, required);
  if (name == NULL)
    return NULL;
  char kp[256];
  key_path(kp, sizeof kp, path, key);
  return readable_file(ld, kp, name);
}

static bool is_numeric_address(const char *addr) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, addr, buf) == 1 || inet_pton(AF_INET6, addr, buf) == 1;
}

/* ---- sections ----------------------------------------------------------- */

static void report_identity_error(void *ctx, const char *json_path,
                                  const char *msg) {
  loader *ld = ctx;
  sg_config_errors_add(ld->errs, "%s: %s: %s", ld->file, json_path, msg);
}

static void load_listener_auth(loader *ld, json_t *obj, const char *path,
                               sg_listener_config *l) {
  char apath[256];
  key_path(apath, sizeof apath, path, "auth");
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
  sg_listener_auth_parse(auth, apath, &l->auth, report_identity_error, ld);
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
    if ((l->auth.methods & SG_LISTENER_AUTH_JWT) && cfg->jwt == NULL &&
        !(l->auth.methods & SG_LISTENER_AUTH_MTLS))
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
        (l->auth.methods & SG_LISTENER_AUTH_JWT) && cfg->jwt == NULL)
      LOAD_ERR(ld, apath, "requires a JWT but no auth.jwt_providers are configured");
  }
}

static void load_listener(loader *ld, json_t *obj, const char *path,
                          sg_listener_config *l, size_t index) {
  static const char *const keys[] = {"name", "address", "port", "tls",
                                     "insecure", "auth", NULL};
  static const char *const tls_keys[] = {"cert", "key", "client_certificates",
                                         "client_ca", "crl", NULL};
  check_keys(ld, obj, path, keys);

  const char *name = get_string(ld, obj, path, "name", false);
  if (name != NULL) {
    l->name = xstrdup(name);
  } else if (asprintf(&l->name, "listener-%zu", index) < 0) {
    abort();
  }

  const char *addr = get_string(ld, obj, path, "address", false);
  l->address = xstrdup(addr != NULL ? addr : "127.0.0.1");
  if (!is_numeric_address(l->address)) {
    char kp[256];
    key_path(kp, sizeof kp, path, "address");
    LOAD_ERR(ld, kp, "'%s' is not a numeric IPv4 or IPv6 address", l->address);
  }
  char kp[256];
  key_path(kp, sizeof kp, path, "port");
  if (json_object_get(obj, "port") == NULL)
    LOAD_ERR(ld, kp, "missing (an integer from 0 to 65535 is required)");
  l->port = (uint16_t)get_uint(ld, obj, path, "port", 0, 65535, 0);

  l->insecure = get_bool(ld, obj, path, "insecure", false);
  load_listener_auth(ld, obj, path, l);
  json_t *tls = get_object(ld, obj, path, "tls");
  if (tls == NULL) {
    if (!l->insecure && json_object_get(obj, "tls") == NULL) {
      key_path(kp, sizeof kp, path, "tls");
      LOAD_ERR(ld, kp,
               "missing: a listener needs TLS (cert and key), or \"insecure\": "
               "true for a cleartext h2c listener (local development only)");
    }
    return;
  }
  if (l->insecure) {
    key_path(kp, sizeof kp, path, "insecure");
    LOAD_ERR(ld, kp, "cannot be true together with \"tls\": choose one");
  }
  char tpath[256];
  key_path(tpath, sizeof tpath, path, "tls");
  check_keys(ld, tls, tpath, tls_keys);
  l->tls_cert_file = get_file(ld, tls, tpath, "cert", true);
  l->tls_key_file = get_file(ld, tls, tpath, "key", true);

  const char *mode = get_string(ld, tls, tpath, "client_certificates", false);
  l->client_cert_mode = SG_CLIENT_CERT_NONE;
  if (mode != NULL) {
    if (strcmp(mode, "none") == 0)
      l->client_cert_mode = SG_CLIENT_CERT_NONE;
    else if (strcmp(mode, "optional") == 0)
      l->client_cert_mode = SG_CLIENT_CERT_OPTIONAL;
    else if (strcmp(mode, "required") == 0)
      l->client_cert_mode = SG_CLIENT_CERT_REQUIRED;
    else {
      key_path(kp, sizeof kp, tpath, "client_certificates");
      LOAD_ERR(ld, kp, "'%s' is not one of none, optional, required", mode);
    }
  }
  l->client_ca_file = get_file(ld, tls, tpath, "client_ca",
                               l->client_cert_mode != SG_CLIENT_CERT_NONE);
  json_t *crls = get_array(ld, tls, tpath, "crl", false);
  if (crls != NULL) {
    l->n_crl_files = json_array_size(crls);
    l->crl_files = calloc(l->n_crl_files ? l->n_crl_files : 1, sizeof(char *));
    if (l->crl_files == NULL)
      abort();
    for (size_t i = 0; i < l->n_crl_files; i++) {
      char cpath[256];
      snprintf(cpath, sizeof cpath, "%s.crl[%zu]", tpath, i);
      json_t *item = json_array_get(crls, i);
      if (!json_is_string(item)) {
        LOAD_ERR(ld, cpath, "must be a file name string");
        continue;
      }
      l->crl_files[i] = readable_file(ld, cpath, json_string_value(item));
    }
  }

  /* Build the TLS context once now so that a key that does not match its
   * certificate, or an unparsable CA, fails at load and not at accept. */
  if (l->tls_cert_file != NULL && l->tls_key_file != NULL &&
      ld->errs->count == ld->errors_at_start) {
    char err[512];
    SSL_CTX *ctx = sg_tls_server_ctx_new(l, err, sizeof err);
    if (ctx == NULL)
      LOAD_ERR(ld, tpath, "%s", err);
    else
      SSL_CTX_free(ctx);
  }
}

static void report_route_error(void *ctx, const char *json_path,
                               const char *msg) {
  loader *ld = ctx;
  if (json_path == NULL || json_path[0] == '\0')
    sg_config_errors_add(ld->errs, "%s: %s", ld->file, msg);
  else
    sg_config_errors_add(ld->errs, "%s: %s: %s", ld->file, json_path, msg);
}

/* Tenants come from a separate routing table file, or inline from the
 * main file; the same loader validates both. */
static void load_routes(loader *ld, json_t *root) {
  sg_config *cfg = ld->cfg;
  const char *table = get_string(ld, root, "", "routing_table", false);
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
    char *table_path = resolve_path(cfg, table);
    loader table_ld = *ld;
    table_ld.file = table_path;
    size_t before = ld->errs->count;
    cfg->routes = sg_route_table_load(table, cfg->base_dir, report_route_error,
                                      &table_ld);
    free(table_path);
    if (cfg->routes == NULL && ld->errs->count == before)
      LOAD_ERR(ld, "routing_table", "cannot load '%s'", table);
  } else if (tenants == NULL) {
    LOAD_ERR(ld, "tenants", "missing: give \"tenants\" (an array) or "
                            "\"routing_table\" (a file name)");
    return;
  } else {
    json_t *inline_table = json_object();
    json_object_set(inline_table, "tenants", tenants);
    if (selectors != NULL)
      json_object_set(inline_table, "tenant_selectors", selectors);
    size_t before = ld->errs->count;
    cfg->routes = sg_route_table_from_json(inline_table, cfg->base_dir,
                                           report_route_error, ld);
    json_decref(inline_table);
    if (cfg->routes == NULL && ld->errs->count == before)
      LOAD_ERR(ld, "tenants", "invalid");
  }
  if (cfg->routes != NULL) {
    cfg->tenants = cfg->routes->tenants;
    cfg->n_tenants = cfg->routes->n_tenants;
  }
}

static void report_jwt_error(void *ctx, const char *msg) {
  loader *ld = ctx;
  sg_config_errors_add(ld->errs, "%s: %s", ld->file, msg);
}

static void load_auth(loader *ld, json_t *root) {
  static const char *const keys[] = {"jwt_providers", "max_token_bytes",
                                     "token_cache_entries",
                                     "token_cache_max_ttl_s", NULL};
  sg_config *cfg = ld->cfg;
  json_t *empty = json_object();
  json_t *auth = get_object(ld, root, "", "auth");
  if (auth == NULL)
    auth = empty;
  check_keys(ld, auth, "auth", keys);
  uint32_t max_token = get_uint(ld, auth, "auth", "max_token_bytes", 256,
                                1u << 20, SG_JWT_DEFAULT_MAX_TOKEN_BYTES);
  cfg->token_cache_entries = get_uint(ld, auth, "auth", "token_cache_entries",
                                      0, 10000000, 10000);
  cfg->token_cache_max_ttl_s = get_uint(ld, auth, "auth", "token_cache_max_ttl_s",
                                        1, 86400, 300);
  json_t *providers = get_array(ld, auth, "auth", "jwt_providers", false);
  if (providers != NULL && json_array_size(providers) > 0) {
    sg_jwt_options opts = {.max_token_bytes = max_token};
    if (sg_jwt_providers_load(providers, cfg->base_dir, "auth.jwt_providers",
                              &opts, &cfg->jwt, report_jwt_error, ld) != 0)
      cfg->jwt = NULL;
  }
  json_decref(empty);
}

static void load_root(loader *ld, json_t *root) {
  static const char *const keys[] = {
      "workers", "log_level", "drain_timeout_ms", "idle_timeout_ms",
      "tls_handshake_timeout_ms", "max_grpc_timeout_ms", "write_stall_timeout_ms",
      "stream_idle_timeout_ms", "max_connections", "max_connections_per_client",
      "http2", "upstream", "allowed_path_prefixes",
      "listeners", "tenants", "tenant_selectors", "routing_table", "auth",
      "identity_headers", "admin", "access_log", NULL};
  static const char *const http2_keys[] = {
      "max_concurrent_streams", "stream_window_bytes",
      "connection_window_bytes", "max_header_list_bytes", NULL};
  static const char *const upstream_keys[] = {"connect_timeout_ms",
                                               "idle_timeout_ms", NULL};
  sg_config *cfg = ld->cfg;
  check_keys(ld, root, "", keys);

  cfg->workers = get_uint(ld, root, "", "workers", 0, 256, 0);
  if (cfg->workers == 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cfg->workers = n > 0 ? (unsigned)n : 1;
  }
  cfg->log_level = SG_LOG_INFO;
  const char *level = get_string(ld, root, "", "log_level", false);
  if (level != NULL && sg_log_level_parse(level, &cfg->log_level) != 0)
    LOAD_ERR(ld, "log_level", "'%s' is not one of debug, info, warn, error", level);

  cfg->drain_timeout_ms = get_uint(ld, root, "", "drain_timeout_ms", 0,
                                   3600000, SG_DEFAULT_DRAIN_TIMEOUT_MS);
  cfg->idle_timeout_ms = get_uint(ld, root, "", "idle_timeout_ms", 1000,
                                  86400000, SG_DEFAULT_IDLE_TIMEOUT_MS);
  cfg->max_grpc_timeout_ms = get_uint(ld, root, "", "max_grpc_timeout_ms", 1,
                                      0xffffffffu, SG_DEFAULT_MAX_GRPC_TIMEOUT_MS);
  cfg->write_stall_timeout_ms = get_uint(ld, root, "", "write_stall_timeout_ms",
                                         100, 3600000, SG_DEFAULT_WRITE_STALL_TIMEOUT_MS);
  cfg->stream_idle_timeout_ms = get_uint(ld, root, "", "stream_idle_timeout_ms",
                                         1000, 0xffffffffu,
                                         SG_DEFAULT_STREAM_IDLE_TIMEOUT_MS);
  cfg->max_connections = get_uint(ld, root, "", "max_connections", 0, 10000000,
                                  SG_DEFAULT_MAX_CONNECTIONS);
  cfg->max_connections_per_client =
      get_uint(ld, root, "", "max_connections_per_client", 0, 10000000, 0);
  cfg->tls_handshake_timeout_ms =
      get_uint(ld, root, "", "tls_handshake_timeout_ms", 100, 600000,
               SG_DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS);

  json_t *http2 = get_object(ld, root, "", "http2");
  json_t *empty = json_object();
  if (http2 == NULL)
    http2 = empty;
  check_keys(ld, http2, "http2", http2_keys);
  cfg->max_concurrent_streams =
      get_uint(ld, http2, "http2", "max_concurrent_streams", 1, 10000,
               SG_DEFAULT_MAX_CONCURRENT_STREAMS);
  cfg->stream_window_bytes =
      get_uint(ld, http2, "http2", "stream_window_bytes", 65535,
               SG_MAX_WINDOW_BYTES, SG_DEFAULT_STREAM_WINDOW_BYTES);
  cfg->connection_window_bytes =
      get_uint(ld, http2, "http2", "connection_window_bytes", 65535,
               SG_MAX_WINDOW_BYTES, SG_DEFAULT_CONNECTION_WINDOW_BYTES);
  cfg->max_header_list_bytes =
      get_uint(ld, http2, "http2", "max_header_list_bytes", 1024, 1u << 20,
               SG_DEFAULT_MAX_HEADER_LIST_BYTES);

  json_t *upstream = get_object(ld, root, "", "upstream");
  if (upstream == NULL)
    upstream = empty;
  check_keys(ld, upstream, "upstream", upstream_keys);
  cfg->upstream_connect_timeout_ms =
      get_uint(ld, upstream, "upstream", "connect_timeout_ms", 10, 600000,
               SG_DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS);
  cfg->upstream_idle_timeout_ms =
      get_uint(ld, upstream, "upstream", "idle_timeout_ms", 100, 86400000,
               SG_DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS);
  json_decref(empty);

  json_t *prefixes = get_array(ld, root, "", "allowed_path_prefixes", false);
  if (prefixes != NULL) {
    cfg->n_allowed_path_prefixes = json_array_size(prefixes);
    cfg->allowed_path_prefixes =
        calloc(cfg->n_allowed_path_prefixes + 1, sizeof(char *));
    if (cfg->allowed_path_prefixes == NULL)
      abort();
    for (size_t i = 0; i < cfg->n_allowed_path_prefixes; i++) {
      json_t *p = json_array_get(prefixes, i);
      char ppath[64];
      snprintf(ppath, sizeof ppath, "allowed_path_prefixes[%zu]", i);
      if (!json_is_string(p) || json_string_value(p)[0] != '/') {
        LOAD_ERR(ld, ppath, "must be a string starting with '/'");
        cfg->allowed_path_prefixes[i] = xstrdup("/");
        continue;
      }
      cfg->allowed_path_prefixes[i] = xstrdup(json_string_value(p));
    }
  } else {
    cfg->n_allowed_path_prefixes = 1;
    cfg->allowed_path_prefixes = calloc(2, sizeof(char *));
    if (cfg->allowed_path_prefixes == NULL)
      abort();
    cfg->allowed_path_prefixes[0] = xstrdup(SG_DEFAULT_PATH_PREFIX);
  }

  json_t *listeners = get_array(ld, root, "", "listeners", true);
  if (listeners != NULL) {
    cfg->n_listeners = json_array_size(listeners);
    if (cfg->n_listeners == 0)
      LOAD_ERR(ld, "listeners", "needs at least one listener");
    cfg->listeners = calloc(cfg->n_listeners + 1, sizeof *cfg->listeners);
    if (cfg->listeners == NULL)
      abort();
    for (size_t i = 0; i < cfg->n_listeners; i++) {
      char lpath[64];
      snprintf(lpath, sizeof lpath, "listeners[%zu]", i);
      json_t *l = json_array_get(listeners, i);
      if (!json_is_object(l)) {
        LOAD_ERR(ld, lpath, "must be an object, not %s", json_type_name(l));
        continue;
      }
      load_listener(ld, l, lpath, &cfg->listeners[i], i);
      for (size_t j = 0; j < i; j++) {
        if (cfg->listeners[j].name != NULL &&
            strcmp(cfg->listeners[j].name, cfg->listeners[i].name) == 0)
          LOAD_ERR(ld, lpath, "duplicate listener name '%s' (also listeners[%zu])",
                   cfg->listeners[i].name, j);
        else if (cfg->listeners[i].port != 0 &&
                 cfg->listeners[j].port == cfg->listeners[i].port &&
                 cfg->listeners[j].address != NULL &&
                 strcmp(cfg->listeners[j].address, cfg->listeners[i].address) == 0)
          LOAD_ERR(ld, lpath, "%s:%u is already used by listeners[%zu]",
                   cfg->listeners[i].address, cfg->listeners[i].port, j);
      }
    }
  }

  load_auth(ld, root);
  sg_identity_headers_parse(json_object_get(root, "identity_headers"),
                            "identity_headers", &cfg->identity_headers,
                            report_identity_error, ld);
  check_listener_auth(ld);

  load_routes(ld, root);

  sg_admin_config_parse(json_object_get(root, "admin"), "admin", &cfg->admin,
                        report_identity_error, ld);
  if (cfg->admin.enabled && cfg->listeners != NULL)
    sg_admin_config_check_listeners(&cfg->admin, cfg->listeners, cfg->n_listeners,
                                    "admin", report_identity_error, ld);
  sg_accesslog_config_parse(json_object_get(root, "access_log"), "access_log",
                            cfg->base_dir, &cfg->access_log,
                            report_identity_error, ld);
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
  sg_config *cfg = calloc(1, sizeof *cfg);
  if (cfg == NULL)
    abort();
  cfg->refcount_ = 1;
  cfg->path = xstrdup(path);
  const char *slash = strrchr(path, '/');
  cfg->base_dir = slash != NULL ? strndup(path, (size_t)(slash - path))
                                : xstrdup(".");
  if (slash == path) {
    free(cfg->base_dir);
    cfg->base_dir = xstrdup("/");
  }

  loader ld = {.file = path, .cfg = cfg, .errs = errs,
               .errors_at_start = errs->count};
  if (!json_is_object(root)) {
    sg_config_errors_add(errs, "%s: the top level must be a JSON object", path);
  } else {
    load_root(&ld, root);
  }
  if (errs->count > ld.errors_at_start) {
    config_free(cfg);
    return -1;
  }
  *out = cfg;
  return 0;
}

int sg_config_load_string(const char *path, const char *json, sg_config **out,
                          sg_config_errors *errs) {
  json_error_t jerr;
  /* Duplicate keys are rejected: with "last one wins" a reviewer can read a
   * setting that is not the one in force. */
  json_t *root = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL) {
    sg_config_errors_add(errs, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                         jerr.column, jerr.text);
    return -1;
  }
  int rv = load_json(path, root, out, errs);
  json_decref(root);
  return rv;
}

int sg_config_load(const char *path, sg_config **out, sg_config_errors *errs) {
  json_error_t jerr;
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    sg_config_errors_add(errs, "%s: cannot open: %s", path, strerror(errno));
    return -1;
  }
  json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
  fclose(f);
  if (root == NULL) {
    sg_config_errors_add(errs, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                         jerr.column, jerr.text);
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
