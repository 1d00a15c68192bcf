#include "sparkgate/route.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <net/if.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sparkgate/affinity.h"
#include "sparkgate/jsonload.h"
#include "sparkgate/netaddr.h"
#include "sparkgate/tls.h"

/* Sorted (key, tenant) pairs: tenant names and hosts are looked up on every
 * call, and a table may hold thousands of tenants. Sorting is also what
 * finds duplicates and overlaps across tenants without comparing every
 * pair of them. */
struct sg_route_ix_ {
  const char *key;
  size_t tenant;
  size_t item;  /* which of the tenant's hosts, identities or prefixes */
  bool prefix;  /* identity rules: one of identity_prefixes */
};

#define SG_ROUTE_MAX_CREDENTIAL_BYTES 65536
#define SG_ROUTE_MAX_HOST_LEN 253

static const char *const default_selectors[] = {
    "jwt_claim:tenant", "header:x-spark-tenant", "authority", "identity", NULL};

/* ---- SparkConnectService methods ---------------------------------------- */

static const char *const method_names[SG_SPARK_N_METHODS] = {
    [SG_SPARK_EXECUTE_PLAN] = "ExecutePlan",
    [SG_SPARK_ANALYZE_PLAN] = "AnalyzePlan",
    [SG_SPARK_CONFIG] = "Config",
    [SG_SPARK_ADD_ARTIFACTS] = "AddArtifacts",
    [SG_SPARK_ARTIFACT_STATUS] = "ArtifactStatus",
    [SG_SPARK_INTERRUPT] = "Interrupt",
    [SG_SPARK_REATTACH_EXECUTE] = "ReattachExecute",
    [SG_SPARK_RELEASE_EXECUTE] = "ReleaseExecute",
    [SG_SPARK_RELEASE_SESSION] = "ReleaseSession",
    [SG_SPARK_FETCH_ERROR_DETAILS] = "FetchErrorDetails",
};

const char *sg_spark_method_name(sg_spark_method m) {
  if ((int)m < 0 || m >= SG_SPARK_N_METHODS)
    return NULL;
  return method_names[m];
}

static int method_lookup(const char *name, size_t len) {
  for (int i = 0; i < SG_SPARK_N_METHODS; i++)
    if (strlen(method_names[i]) == len && memcmp(method_names[i], name, len) == 0)
      return i;
  return -1;
}

const char *sg_route_tenant_missing_companions(const sg_route_tenant *t, char *buf,
                                               size_t buflen) {
  static const sg_spark_method companions[] = {
      SG_SPARK_REATTACH_EXECUTE, SG_SPARK_RELEASE_EXECUTE, SG_SPARK_RELEASE_SESSION,
      SG_SPARK_FETCH_ERROR_DETAILS};
  size_t used = 0;
  buf[0] = '\0';
  if (!sg_route_tenant_allows_method(t, SG_SPARK_EXECUTE_PLAN))
    return buf;
  for (size_t i = 0; i < sizeof companions / sizeof companions[0]; i++) {
    if (sg_route_tenant_allows_method(t, (int)companions[i]))
      continue;
    int n = snprintf(buf + used, buflen - used, "%s%s", used > 0 ? ", " : "",
                     method_names[companions[i]]);
    if (n < 0 || (size_t)n >= buflen - used)
      break;
    used += (size_t)n;
  }
  return buf;
}

/* One spelling of the server an address names, for comparing two: an
 * IPv4-mapped IPv6 address ("::ffff:10.0.0.5") is its IPv4 address, and a
 * host name's trailing dot goes ("spark.internal." is "spark.internal"). */
static const char *address_key(const char *address, char *buf, size_t buflen) {
  if (sg_netaddr_v4_mapped(address, buf, buflen))
    return buf;
  size_t n = strlen(address);
  if (n > 1 && address[n - 1] == '.' && n - 1 < buflen && !sg_netaddr_is_numeric(address)) {
    memcpy(buf, address, n - 1);
    buf[n - 1] = '\0';
    return buf;
  }
  return address;
}

static bool same_backend_address(const sg_backend_config *a, const sg_backend_config *b) {
  if (a->port != b->port)
    return false;
  char abuf[256], bbuf[256];
  const char *ka = address_key(a->address, abuf, sizeof abuf);
  const char *kb = address_key(b->address, bbuf, sizeof bbuf);
  unsigned char na[16], nb[16];
  int fam[] = {AF_INET, AF_INET6};
  for (size_t i = 0; i < 2; i++)
    if (inet_pton(fam[i], ka, na) == 1)
      return inet_pton(fam[i], kb, nb) == 1 && memcmp(na, nb, fam[i] == AF_INET ? 4 : 16) == 0;
  return strcasecmp(ka, kb) == 0;
}

const sg_route_tenant *sg_route_tenant_off_shares_backend(const sg_route_tenant *tenants,
                                                          size_t n_tenants,
                                                          const sg_route_tenant *t,
                                                          const sg_backend_config **shared) {
  if (t->user_id != SG_ROUTE_USER_ID_OFF)
    return NULL;
  for (size_t i = 0; i < n_tenants; i++) {
    const sg_route_tenant *o = &tenants[i];
    if (o == t || o->user_id == SG_ROUTE_USER_ID_OFF)
      continue;
    for (size_t a = 0; a < t->n_backends; a++)
      for (size_t b = 0; b < o->n_backends; b++)
        if (same_backend_address(&t->backends[a], &o->backends[b])) {
          *shared = &t->backends[a];
          return o;
        }
  }
  return NULL;
}

int sg_spark_method_from_path(const char *path, size_t len) {
  size_t plen = sizeof SG_SPARK_SERVICE_PREFIX - 1;
  if (path == NULL || len <= plen || memcmp(path, SG_SPARK_SERVICE_PREFIX, plen) != 0)
    return -1;
  return method_lookup(path + plen, len - plen);
}

/* ---- SipHash-2-4 ---------------------------------------------------------
 * Incremental, so a session's prefix is hashed once and each backend name
 * is fed into a copy of the state. Bytes are read little-endian explicitly:
 * replicas on any architecture must compute the same value. */

typedef struct siphash_state {
  uint64_t v0, v1, v2, v3;
  uint8_t buf[8];
  size_t buflen;
  uint64_t total;
} siphash_state;

#define ROTL64(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static inline void sip_round(siphash_state *s) {
  s->v0 += s->v1;
  s->v1 = ROTL64(s->v1, 13);
  s->v1 ^= s->v0;
  s->v0 = ROTL64(s->v0, 32);
  s->v2 += s->v3;
  s->v3 = ROTL64(s->v3, 16);
  s->v3 ^= s->v2;
  s->v0 += s->v3;
  s->v3 = ROTL64(s->v3, 21);
  s->v3 ^= s->v0;
  s->v2 += s->v1;
  s->v1 = ROTL64(s->v1, 17);
  s->v1 ^= s->v2;
  s->v2 = ROTL64(s->v2, 32);
}

static uint64_t load_le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--)
    v = (v << 8) | p[i];
  return v;
}

static void sip_block(siphash_state *s, uint64_t m) {
  s->v3 ^= m;
  sip_round(s);
  sip_round(s);
  s->v0 ^= m;
}

static void sip_init(siphash_state *s, const uint8_t key[16]) {
  uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
  s->v0 = k0 ^ 0x736f6d6570736575ULL;
  s->v1 = k1 ^ 0x646f72616e646f6dULL;
  s->v2 = k0 ^ 0x6c7967656e657261ULL;
  s->v3 = k1 ^ 0x7465646279746573ULL;
  s->buflen = 0;
  s->total = 0;
}

static void sip_update(siphash_state *s, const void *data, size_t len) {
  const uint8_t *p = data;
  s->total += len;
  while (len > 0) {
    size_t take = 8 - s->buflen;
    if (take > len)
      take = len;
    memcpy(s->buf + s->buflen, p, take);
    s->buflen += take;
    p += take;
    len -= take;
    if (s->buflen == 8) {
      sip_block(s, load_le64(s->buf));
      s->buflen = 0;
    }
  }
}

static uint64_t sip_final(siphash_state s) {
  uint64_t b = (uint64_t)(s.total & 0xff) << 56;
  for (size_t i = 0; i < s.buflen; i++)
    b |= (uint64_t)s.buf[i] << (8 * i);
  sip_block(&s, b);
  s.v2 ^= 0xff;
  for (int i = 0; i < 4; i++)
    sip_round(&s);
  return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

uint64_t sg_siphash24(const uint8_t key[16], const void *data, size_t len) {
  siphash_state s;
  sip_init(&s, key);
  sip_update(&s, data, len);
  return sip_final(s);
}

/* The key is fixed and public on purpose: the hash spreads sessions, it
 * does not protect anything, and every replica must use the same one. */
static const uint8_t route_hash_key[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                           8, 9, 10, 11, 12, 13, 14, 15};

/* ---- loading --------------------------------------------------------------*/

/* The shared loader (jsonload.h): errors name the JSON path, unknown
 * keys list the keys of their object and point to docs/routing.md. */
typedef sg_jsonload loader;

#define lerr(ld, path, ...) sg_jsonload_error((ld), (path), __VA_ARGS__)

#define LOADER(report_fn, report_ctx, dir)                                     \
  ((loader){.report = (report_fn),                                             \
            .ctx = (report_ctx),                                               \
            .base_dir = (dir),                                                 \
            .doc = "docs/routing.md",                                          \
            .list_known_keys = true,                                           \
            .what = "the routing table"})

/* Reads an array of non-empty strings; NULL entries stay where an element
 * was invalid (already reported). */
static char **get_strings(loader *ld, const json_t *obj, const char *path,
                          const char *key, size_t *n) {
  *n = 0;
  json_t *arr = sg_jsonload_array(ld, obj, path, key, false);
  if (arr == NULL)
    return NULL;
  size_t count = json_array_size(arr);
  char **out = calloc(count ? count : 1, sizeof *out);
  if (out == NULL) {
    char kp[256];
    sg_jsonload_key_path(kp, sizeof kp, path, key);
    sg_jsonload_oom(ld, kp);
    return NULL;
  }
  *n = count;
  for (size_t i = 0; i < count; i++) {
    char ep[256];
    snprintf(ep, sizeof ep, "%s%s%s[%zu]", path, path[0] ? "." : "", key, i);
    const char *v = sg_jsonload_string_value(ld, json_array_get(arr, i), ep);
    if (v != NULL)
      out[i] = sg_jsonload_strdup(ld, ep, v);
  }
  return out;
}

static void str_lower(char *s) {
  for (; *s; s++)
    *s = (char)tolower((unsigned char)*s);
}

/* ---- backends (the shape of the main config's backends) ------------------ */

/* A backend address is an IP address or a DNS name, nothing else: anything
 * else would load, then fail to resolve on every call with 14, which
 * PySpark retries without end. Returns NULL when |a| is fine, else what to
 * fix. '_' is allowed in labels: Kubernetes and SRV-style names use it and
 * resolvers accept it. */
/* An IPv6 address with a zone ("fe80::1%eth0", for a link-local address):
 * the zone is an interface name or number. */
static bool is_scoped_ipv6(const char *a) {
  const char *pct = strchr(a, '%');
  char head[INET6_ADDRSTRLEN];
  unsigned char buf[sizeof(struct in6_addr)];
  if (pct == NULL || (size_t)(pct - a) >= sizeof head)
    return false;
  memcpy(head, a, (size_t)(pct - a));
  head[pct - a] = '\0';
  size_t zlen = strlen(pct + 1);
  if (inet_pton(AF_INET6, head, buf) != 1 || zlen == 0 || zlen >= IF_NAMESIZE)
    return false;
  for (const char *z = pct + 1; *z != '\0'; z++)
    if (!isalnum((unsigned char)*z) && *z != '.' && *z != '_' && *z != '-')
      return false;
  return true;
}

static const char *backend_address_problem(const char *a) {
  unsigned char buf[sizeof(struct in6_addr)];
  if (inet_pton(AF_INET, a, buf) == 1 || inet_pton(AF_INET6, a, buf) == 1 ||
      is_scoped_ipv6(a))
    return NULL;
  size_t n = strlen(a);
  if (isspace((unsigned char)a[0]) || isspace((unsigned char)a[n - 1]))
    return "remove the white space around it";
  if (strstr(a, "://") != NULL)
    return "write the host only, without a scheme (\"http://\") or path";
  if (a[0] == '[')
    return "write an IPv6 address without brackets; the port goes in \"port\"";
  const char *colon = strchr(a, ':');
  if (colon != NULL)
    return strchr(colon + 1, ':') == NULL
               ? "write the host without a port; the port goes in \"port\""
               : "not a valid IPv6 address";
  if (strchr(a, '/') != NULL)
    return "write the host only, without a path";
  /* The trailing dot of a fully qualified name is not part of its length. */
  if (n > 1 && a[n - 1] == '.')
    n--;
  if (n > SG_ROUTE_MAX_HOST_LEN)
    return "a host name is at most 253 characters";
  size_t label = 0;
  bool all_digits = true;
  for (size_t i = 0; i <= n; i++) {
    unsigned char c = i < n ? (unsigned char)a[i] : '.';
    if (c == '.') {
      if (label == 0 || label > 63)
        return "each dot-separated part of a host name is 1 to 63 characters";
      if (i < n) {
        label = 0;
        all_digits = true;
      }
    } else if (isalnum(c) || c == '-' || c == '_') {
      label++;
      all_digits = all_digits && isdigit(c);
    } else {
      return "must be an IP address or a host name (letters, digits, '-', '_' "
             "and dots; no spaces, scheme, port or path)";
    }
  }
  /* No top-level domain is all digits: "10.0.0.256" or "10.1" is a
   * mistyped IPv4 address, which resolvers would read their own way. */
  if (all_digits)
    return "not a valid IPv4 address (four numbers 0 to 255: a.b.c.d)";
  return NULL;
}

static void load_backend(loader *ld, const json_t *obj, const char *path,
                         sg_backend_config *b) {
  static const char *const keys[] = {"name", "address", "port", "weight",
                                     "tls", NULL};
  static const char *const tls_keys[] = {"ca", "sni", "cert", "key", "verify",
                                         NULL};
  size_t errors_before = ld->errors;
  sg_jsonload_check_keys(ld, obj, path, keys);
  const char *addr = sg_jsonload_string(ld, obj, path, "address", true);
  char kp[256];
  sg_jsonload_key_path(kp, sizeof kp, path, "address");
  b->address = sg_jsonload_strdup(ld, kp, addr != NULL ? addr : "");
  const char *why = addr != NULL ? backend_address_problem(addr) : NULL;
  if (why != NULL)
    lerr(ld, kp, "'%s': %s", addr, why);
  sg_jsonload_key_path(kp, sizeof kp, path, "port");
  if (json_object_get(obj, "port") == NULL)
    lerr(ld, kp, "missing (an integer from 1 to 65535 is required)");
  b->port = (uint16_t)sg_jsonload_uint(ld, obj, path, "port", 0, 65535, 15002);
  if (b->port == 0)
    lerr(ld, kp, "0 is not a backend port (1 to 65535)");
  b->weight = (uint32_t)sg_jsonload_uint(ld, obj, path, "weight", 0, 1000000, 1);
  const char *name = sg_jsonload_string(ld, obj, path, "name", false);
  sg_jsonload_key_path(kp, sizeof kp, path, "name");
  if (name != NULL) {
    b->name = sg_jsonload_strdup(ld, kp, name);
  } else if (b->address != NULL &&
             asprintf(&b->name, "%s:%u", b->address, b->port) < 0) {
    b->name = NULL;
    sg_jsonload_oom(ld, kp);
  }
  if (b->name != NULL)
    b->affinity_id = sg_affinity_backend_id(b->name);

  b->tls_verify = true;
  json_t *tls = sg_jsonload_object(ld, obj, path, "tls", false);
  if (tls == NULL)
    return;
  b->tls = true;
  char tpath[256];
  sg_jsonload_key_path(tpath, sizeof tpath, path, "tls");
  sg_jsonload_check_keys(ld, tls, tpath, tls_keys);
  b->tls_ca_file = sg_jsonload_file(ld, tls, tpath, "ca", false);
  const char *sni = sg_jsonload_string(ld, tls, tpath, "sni", false);
  sg_jsonload_key_path(kp, sizeof kp, tpath, "sni");
  b->tls_sni = sg_jsonload_strdup(ld, kp, sni);
  /* The name the certificate must carry: one that is no host name (a URL,
   * a host with a port) matches no certificate, so every call would get 14. */
  why = sni != NULL ? backend_address_problem(sni) : NULL;
  if (why != NULL)
    lerr(ld, kp, "'%s': %s", sni, why);
  b->tls_cert_file = sg_jsonload_file(ld, tls, tpath, "cert", false);
  b->tls_key_file = sg_jsonload_file(ld, tls, tpath, "key", false);
  if ((b->tls_cert_file == NULL) != (b->tls_key_file == NULL))
    lerr(ld, tpath, "\"cert\" and \"key\" go together: give both or neither");
  b->tls_verify = sg_jsonload_bool(ld, tls, tpath, "verify", true);
  /* Without verification the CA is never read: a wrong file would load
   * now and fail only the day "verify" is turned back on. */
  if (!b->tls_verify && json_object_get(tls, "ca") != NULL) {
    sg_jsonload_key_path(kp, sizeof kp, tpath, "ca");
    lerr(ld, kp, "\"ca\" has no effect with \"verify\": false: remove one");
  }
  /* Build the context once so a bad CA or a key that does not match its
   * certificate fails the load, not the first call to this backend. */
  if (ld->errors == errors_before) {
    char err[512];
    const char *key = NULL;
    SSL_CTX *ctx = sg_tls_client_ctx_new(b, &key, err, sizeof err);
    if (ctx == NULL) {
      if (key != NULL)
        sg_jsonload_key_path(kp, sizeof kp, tpath, key);
      lerr(ld, key != NULL ? kp : tpath, "%s", err);
    } else {
      SSL_CTX_free(ctx);
    }
  }
}

static void backend_free(sg_backend_config *b) {
  free(b->name);
  free(b->address);
  free(b->tls_ca_file);
  free(b->tls_sni);
  free(b->tls_cert_file);
  free(b->tls_key_file);
}

/* ---- tenant sections ---------------------------------------------------- */

bool sg_route_name_is_valid(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > SG_ROUTE_MAX_NAME_LEN || !isalnum((unsigned char)s[0]))
    return false;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!isalnum(c) && c != '.' && c != '_' && c != '-')
      return false;
  }
  return true;
}

/* Hosts are compared the way :authority arrives, minus port, brackets and
 * a trailing dot, in lower case. Returns false when it is no host name. */
static bool normalize_host_entry(char *h, const char **why) {
  size_t n = strlen(h);
  if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
    memmove(h, h + 1, n - 2);
    h[n - 2] = '\0';
    n -= 2;
  }
  if (n > 1 && h[n - 1] == '.')
    h[--n] = '\0';
  if (n == 0 || n > SG_ROUTE_MAX_HOST_LEN) {
    *why = "must be a host name of 1 to 253 characters";
    return false;
  }
  size_t colons = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)h[i];
    if (c == ':')
      colons++;
    else if (!isalnum(c) && c != '.' && c != '-' && c != '_') {
      *why = c == '*' ? "wildcards are not supported: list each host name"
                      : "must be a host name or IP address (letters, digits, "
                        "'.', '-', '_'; no scheme, path or spaces)";
      return false;
    }
  }
  if (colons == 1) {
    *why = "write the host without a port (any port matches)";
    return false;
  }
  str_lower(h);
  return true;
}

static void load_selectors(loader *ld, const json_t *root, sg_route_table *t) {
  json_t *arr = sg_jsonload_array(ld, root, "", "tenant_selectors", false);
  size_t n = 0;
  if (arr != NULL) {
    n = json_array_size(arr);
    if (n == 0)
      lerr(ld, "tenant_selectors",
           "needs at least one selector (jwt_claim:NAME, header:NAME, "
           "authority, identity)");
  } else if (json_object_get(root, "tenant_selectors") == NULL) {
    while (default_selectors[n] != NULL)
      n++;
  }
  t->selectors = calloc(n ? n : 1, sizeof *t->selectors);
  if (t->selectors == NULL) {
    sg_jsonload_oom(ld, "tenant_selectors");
    return;
  }
  for (size_t i = 0; i < n; i++) {
    char sp[64];
    snprintf(sp, sizeof sp, "tenant_selectors[%zu]", i);
    const char *text;
    if (arr != NULL) {
      json_t *v = json_array_get(arr, i);
      if (sg_jsonload_string_value(ld, v, sp) == NULL)
        continue;
      text = json_string_value(v);
    } else {
      text = default_selectors[i];
    }
    sg_route_selector sel = {0};
    if (strcmp(text, "authority") == 0) {
      sel.kind = SG_ROUTE_SEL_AUTHORITY;
    } else if (strcmp(text, "identity") == 0) {
      sel.kind = SG_ROUTE_SEL_IDENTITY;
    } else if (strncmp(text, "jwt_claim:", 10) == 0 && text[10] != '\0') {
      sel.kind = SG_ROUTE_SEL_JWT_CLAIM;
      if ((sel.arg = sg_jsonload_strdup(ld, sp, text + 10)) == NULL)
        continue;
    } else if (strncmp(text, "header:", 7) == 0 && text[7] != '\0') {
      sel.kind = SG_ROUTE_SEL_HEADER;
      const char *h = text + 7;
      bool ok = true;
      for (const char *c = h; *c; c++)
        if (!isalnum((unsigned char)*c) && strchr("!#$%&'*+-.^_`|~", *c) == NULL)
          ok = false;
      if (!ok) {
        lerr(ld, sp, "'%s' is not a valid header name (pseudo-headers such "
                     "as :authority are selected with \"authority\")", h);
        continue;
      }
      if ((sel.arg = sg_jsonload_strdup(ld, sp, h)) == NULL)
        continue;
      str_lower(sel.arg);
    } else {
      lerr(ld, sp, "unknown selector '%s': use jwt_claim:CLAIM, header:NAME, "
                   "authority or identity", text);
      continue;
    }
    if ((sel.text = sg_jsonload_strdup(ld, sp, text)) == NULL) {
      free(sel.arg);
      continue;
    }
    bool dup = false;
    for (size_t j = 0; j < t->n_selectors; j++) {
      const sg_route_selector *o = &t->selectors[j];
      if (o->kind == sel.kind &&
          (o->arg == NULL ? sel.arg == NULL
                          : sel.arg != NULL && strcmp(o->arg, sel.arg) == 0)) {
        lerr(ld, sp, "selector '%s' is listed twice", text);
        dup = true;
      }
    }
    if (dup) {
      free(sel.arg);
      free(sel.text);
      continue;
    }
    t->selectors[t->n_selectors++] = sel;
  }
}

static void load_allow(loader *ld, const json_t *obj, const char *path,
                       sg_route_allow *a) {
  static const char *const keys[] = {"any_identity", "identities",
                                     "identity_prefixes", "claims", NULL};
  char ap[256];
  sg_jsonload_key_path(ap, sizeof ap, path, "allow");
  json_t *allow = sg_jsonload_object(ld, obj, path, "allow", false);
  if (allow == NULL) {
    if (json_object_get(obj, "allow") == NULL)
      lerr(ld, ap, "missing: a tenant without \"allow\" admits no one (give "
                   "identities, identity_prefixes, claims or \"any_identity\": true)");
    return;
  }
  size_t errors_before = ld->errors;
  sg_jsonload_check_keys(ld, allow, ap, keys);
  a->any_identity = sg_jsonload_bool(ld, allow, ap, "any_identity", false);
  a->identities = get_strings(ld, allow, ap, "identities", &a->n_identities);
  a->identity_prefixes =
      get_strings(ld, allow, ap, "identity_prefixes", &a->n_identity_prefixes);
  json_t *claims = sg_jsonload_object(ld, allow, ap, "claims", false);
  if (claims != NULL) {
    size_t n = json_object_size(claims);
    a->claims = calloc(n ? n : 1, sizeof *a->claims);
    if (a->claims == NULL) {
      char cp[300];
      sg_jsonload_key_path(cp, sizeof cp, ap, "claims");
      sg_jsonload_oom(ld, cp);
      return;
    }
    const char *name;
    json_t *vals;
    json_object_foreach(claims, name, vals) {
      char cp[512];
      snprintf(cp, sizeof cp, "%s.claims.%s", ap, name);
      bool ok = json_is_array(vals) && json_array_size(vals) > 0;
      size_t i;
      json_t *v;
      json_array_foreach(vals, i, v) {
        if (!json_is_string(v) && !json_is_integer(v) && !json_is_boolean(v))
          ok = false;
      }
      if (!ok || name[0] == '\0') {
        lerr(ld, cp, "must be a non-empty array of accepted values (strings, "
                     "integers or booleans), e.g. [\"analysts\"]");
        continue;
      }
      sg_route_claim_rule *r = &a->claims[a->n_claims];
      r->name = sg_jsonload_strdup(ld, cp, name);
      /* A private copy: the table outlives the JSON it came from. */
      r->values = r->name != NULL ? sg_jsonload_copy(vals) : NULL;
      if (r->values == NULL) {
        if (r->name != NULL)
          sg_jsonload_oom(ld, cp);
        free(r->name);
        r->name = NULL;
        continue;
      }
      a->n_claims++;
    }
  }
  if (ld->errors == errors_before && !a->any_identity && a->n_identities == 0 &&
      a->n_identity_prefixes == 0 && a->n_claims == 0)
    lerr(ld, ap, "admits no one: give identities, identity_prefixes, claims "
                 "or \"any_identity\": true");
}

static void load_credential(loader *ld, const json_t *obj, const char *path,
                            sg_route_tenant *t) {
  static const char *const keys[] = {"file", "env", NULL};
  char cp[256];
  sg_jsonload_key_path(cp, sizeof cp, path, "upstream_credential");
  json_t *c = sg_jsonload_object(ld, obj, path, "upstream_credential", false);
  if (c == NULL)
    return;
  sg_jsonload_check_keys(ld, c, cp, keys);
  const char *file = sg_jsonload_string(ld, c, cp, "file", false);
  const char *env = sg_jsonload_string(ld, c, cp, "env", false);
  if ((file != NULL) == (env != NULL)) {
    if (json_object_get(c, "file") == NULL && json_object_get(c, "env") == NULL)
      lerr(ld, cp, "give either \"file\" (a file holding the token) or \"env\" "
                   "(an environment variable holding it)");
    else if (file != NULL)
      lerr(ld, cp, "give \"file\" or \"env\", not both");
    return;
  }
  char *secret = NULL;
  size_t len = 0, secret_size = 0;
  char vp[256];
  if (file != NULL) {
    sg_jsonload_key_path(vp, sizeof vp, cp, "file");
    t->credential_source = SG_ROUTE_CREDENTIAL_FILE;
    t->credential_origin = sg_jsonload_resolve(ld->base_dir, file);
    if (t->credential_origin == NULL) {
      sg_jsonload_oom(ld, vp);
      return;
    }
    FILE *f = sg_jsonload_fopen(t->credential_origin);
    if (f == NULL) {
      lerr(ld, vp, "cannot read '%s': %s", t->credential_origin,
           sg_jsonload_strerror(errno));
      return;
    }
    /* Room for white space around a token of the largest size; the
     * token itself is checked once trimmed, below. */
    size_t room = SG_ROUTE_MAX_CREDENTIAL_BYTES + 4096;
    secret_size = room + 1;
    secret = calloc(secret_size, 1);
    if (secret == NULL) {
      fclose(f);
      sg_jsonload_oom(ld, vp);
      return;
    }
    len = fread(secret, 1, room + 1, f);
    bool failed = ferror(f) != 0;
    fclose(f);
    if (failed || len > room) {
      lerr(ld, vp, failed ? "cannot read '%s'"
                          : "'%s' is larger than 64 KiB: it must hold the token only",
           t->credential_origin);
      explicit_bzero(secret, secret_size);
      free(secret);
      return;
    }
  } else {
    sg_jsonload_key_path(vp, sizeof vp, cp, "env");
    t->credential_source = SG_ROUTE_CREDENTIAL_ENV;
    t->credential_origin = sg_jsonload_strdup(ld, vp, env);
    if (t->credential_origin == NULL)
      return;
    const char *value = getenv(env);
    if (value == NULL || value[0] == '\0') {
      lerr(ld, vp, "environment variable %s is %s: export it to the sparkgate "
                   "process (systemd: Environment= or EnvironmentFile=)",
           env, value == NULL ? "not set" : "empty");
      return;
    }
    len = strlen(value);
    secret_size = len + 1;
    secret = calloc(secret_size, 1);
    if (secret == NULL) {
      sg_jsonload_oom(ld, vp);
      return;
    }
    memcpy(secret, value, len);
  }
  /* Files end in a newline more often than not; the token does not. */
  size_t start = 0;
  while (start < len && isspace((unsigned char)secret[start]))
    start++;
  while (len > start && isspace((unsigned char)secret[len - 1]))
    len--;
  /* A gRPC header value is printable ASCII: anything else (a UTF-8 byte
   * order mark an editor added, a pasted typographic quote) would go to the
   * backend and be refused on every call. */
  bool printable = true, ascii = true;
  for (size_t i = start; i < len; i++) {
    unsigned char ch = (unsigned char)secret[i];
    if (ch < 0x21 || ch == 0x7f)
      printable = false;
    else if (ch > 0x7e)
      ascii = false;
  }
  static const char bom[] = "\xef\xbb\xbf";
  const char *what = file != NULL ? "file" : "variable";
  if (len - start >= 3 && memcmp(secret + start, bom, 3) == 0)
    lerr(ld, vp, "the %s '%s' starts with a UTF-8 byte order mark: %s", what,
         t->credential_origin,
         file != NULL ? "save the file without it" : "remove it from the value");
  else if (len == start)
    lerr(ld, vp, "the %s '%s' is empty: it must hold the backend token", what,
         t->credential_origin);
  else if (len - start > SG_ROUTE_MAX_CREDENTIAL_BYTES)
    lerr(ld, vp, "the %s '%s' holds a token over 64 KiB: it must hold the token only",
         what, t->credential_origin);
  else if (!printable)
    lerr(ld, vp, "the %s '%s' holds spaces or control characters inside the "
                 "token: it must hold the token only (it goes into a header)",
         what, t->credential_origin);
  else if (!ascii)
    lerr(ld, vp, "the %s '%s' holds non-ASCII bytes inside the token: it must "
                 "hold the token only, in printable ASCII (it goes into a header)",
         what, t->credential_origin);
  else {
    t->credential_len = len - start;
    t->credential = calloc(t->credential_len + 1, 1);
    if (t->credential == NULL) {
      t->credential_len = 0;
      sg_jsonload_oom(ld, vp);
    } else {
      memcpy(t->credential, secret + start, t->credential_len);
    }
  }
  explicit_bzero(secret, secret_size);
  free(secret);
}

static void load_limits(loader *ld, const json_t *obj, const char *path,
                        sg_route_limits *l) {
  static const char *const keys[] = {
      "max_concurrent_rpcs", "max_concurrent_executions", "requests_per_second",
      "burst", "upload_bytes_per_minute", "over_limit_status",
      "max_message_bytes", NULL};
  l->over_limit_status = 8;
  l->max_message_bytes = SG_ROUTE_DEFAULT_MAX_MESSAGE_BYTES;
  json_t *lim = sg_jsonload_object(ld, obj, path, "limits", false);
  if (lim == NULL)
    return;
  char lp[256];
  sg_jsonload_key_path(lp, sizeof lp, path, "limits");
  sg_jsonload_check_keys(ld, lim, lp, keys);
  l->max_concurrent_rpcs = (uint32_t)sg_jsonload_uint(
      ld, lim, lp, "max_concurrent_rpcs", 0, 10000000, 0);
  l->max_concurrent_executions = (uint32_t)sg_jsonload_uint(
      ld, lim, lp, "max_concurrent_executions", 0, 10000000, 0);
  l->requests_per_second = (uint32_t)sg_jsonload_uint(
      ld, lim, lp, "requests_per_second", 0, 10000000, 0);
  l->burst = (uint32_t)sg_jsonload_uint(ld, lim, lp, "burst", 0, 100000000, 0);
  l->upload_bytes_per_minute = sg_jsonload_uint(
      ld, lim, lp, "upload_bytes_per_minute", 0, (uint64_t)1 << 50, 0);
  l->max_message_bytes = (uint32_t)sg_jsonload_uint(
      ld, lim, lp, "max_message_bytes", 0, (uint64_t)1 << 31,
      SG_ROUTE_DEFAULT_MAX_MESSAGE_BYTES);
  if (l->max_message_bytes < 1024) {
    char mp[256];
    sg_jsonload_key_path(mp, sizeof mp, lp, "max_message_bytes");
    lerr(ld, mp, "must be at least 1024 bytes");
  }
  if (l->burst != 0 && l->requests_per_second == 0) {
    char bp[256];
    sg_jsonload_key_path(bp, sizeof bp, lp, "burst");
    lerr(ld, bp, "needs \"requests_per_second\" (burst is the size of its bucket)");
  }
  if (l->burst == 0)
    l->burst = l->requests_per_second;
  const char *st = sg_jsonload_string(ld, lim, lp, "over_limit_status", false);
  if (st != NULL) {
    if (strcmp(st, "resource_exhausted") == 0)
      l->over_limit_status = 8;
    else if (strcmp(st, "unavailable") == 0)
      l->over_limit_status = 14;
    else {
      char sp[256];
      sg_jsonload_key_path(sp, sizeof sp, lp, "over_limit_status");
      lerr(ld, sp, "'%s' is not one of resource_exhausted, unavailable", st);
    }
  }
}

static void load_tenant(loader *ld, const json_t *obj, const char *path,
                        sg_route_tenant *t) {
  static const char *const keys[] = {
      "name", "hosts", "backends", "allow", "user_id", "failover",
      "upstream_credential", "methods", "limits", NULL};
  sg_jsonload_check_keys(ld, obj, path, keys);
  char kp[256];

  const char *name = sg_jsonload_string(ld, obj, path, "name", true);
  sg_jsonload_key_path(kp, sizeof kp, path, "name");
  t->name = sg_jsonload_strdup(ld, kp, name != NULL ? name : "");
  if (name != NULL && !sg_route_name_is_valid(name)) {
    lerr(ld, kp, "'%s' is not a valid tenant name: 1 to 64 letters, digits, "
                 "'.', '_' or '-', starting with a letter or digit", name);
  } else if (name != NULL && strcmp(name, "none") == 0) {
    /* Metrics label calls refused before a tenant was known tenant="none"
     * (docs/operations.md): a tenant of that name would merge with them. */
    lerr(ld, kp, "'none' is reserved: it labels calls refused before a tenant "
                 "was chosen; pick another name");
  }

  t->hosts = get_strings(ld, obj, path, "hosts", &t->n_hosts);
  for (size_t i = 0; i < t->n_hosts; i++) {
    if (t->hosts[i] == NULL)
      continue;
    snprintf(kp, sizeof kp, "%s.hosts[%zu]", path, i);
    const char *why = NULL;
    char *orig = sg_jsonload_strdup(ld, kp, t->hosts[i]);
    if (orig == NULL)
      continue;
    if (!normalize_host_entry(t->hosts[i], &why)) {
      lerr(ld, kp, "'%s': %s", orig, why);
      free(t->hosts[i]);
      t->hosts[i] = NULL;
    } else {
      for (size_t j = 0; j < i; j++)
        if (t->hosts[j] != NULL && strcmp(t->hosts[j], t->hosts[i]) == 0)
          lerr(ld, kp, "host '%s' is listed twice (also hosts[%zu])", orig, j);
    }
    free(orig);
  }

  json_t *backends = sg_jsonload_array(ld, obj, path, "backends", true);
  if (backends != NULL) {
    size_t n = json_array_size(backends);
    sg_jsonload_key_path(kp, sizeof kp, path, "backends");
    if (n == 0)
      lerr(ld, kp, "needs at least one backend");
    t->backends = calloc(n ? n : 1, sizeof *t->backends);
    if (t->backends == NULL)
      sg_jsonload_oom(ld, kp);
    else
      t->n_backends = n;
    bool any_weight = false;
    for (size_t i = 0; i < t->n_backends; i++) {
      char bp[256];
      snprintf(bp, sizeof bp, "%s.backends[%zu]", path, i);
      json_t *b = json_array_get(backends, i);
      if (!json_is_object(b)) {
        lerr(ld, bp, "must be an object, not %s", sg_jsonload_type_name(b));
        continue;
      }
      load_backend(ld, b, bp, &t->backends[i]);
      if (t->backends[i].weight > 0)
        any_weight = true;
      for (size_t j = 0; j < i; j++)
        if (t->backends[j].name != NULL && t->backends[i].name != NULL &&
            strcmp(t->backends[j].name, t->backends[i].name) == 0) {
          char np[300];
          snprintf(np, sizeof np, "%s.name", bp);
          lerr(ld, np, "duplicate backend name '%s' (also backends[%zu]): the "
                       "name is the backend's identity for session affinity, "
                       "give each backend its own", t->backends[i].name, j);
        }
    }
    if (t->n_backends > 0 && !any_weight)
      lerr(ld, kp, "every backend has weight 0: no new session could start "
                   "(give at least one backend a weight above 0)");
  }

  load_allow(ld, obj, path, &t->allow);

  t->user_id = SG_ROUTE_USER_ID_REWRITE;
  const char *uid = sg_jsonload_string(ld, obj, path, "user_id", false);
  if (uid != NULL) {
    if (strcmp(uid, "rewrite") == 0)
      t->user_id = SG_ROUTE_USER_ID_REWRITE;
    else if (strcmp(uid, "enforce") == 0)
      t->user_id = SG_ROUTE_USER_ID_ENFORCE;
    else if (strcmp(uid, "off") == 0)
      t->user_id = SG_ROUTE_USER_ID_OFF;
    else {
      sg_jsonload_key_path(kp, sizeof kp, path, "user_id");
      lerr(ld, kp, "'%s' is not one of rewrite, enforce, off", uid);
    }
  }
  t->failover = sg_jsonload_bool(ld, obj, path, "failover", false);

  t->methods = SG_SPARK_ALL_METHODS;
  json_t *methods = sg_jsonload_array(ld, obj, path, "methods", false);
  if (methods != NULL) {
    t->methods = 0;
    sg_jsonload_key_path(kp, sizeof kp, path, "methods");
    if (json_array_size(methods) == 0)
      lerr(ld, kp, "is empty and would refuse every call: leave it out to "
                   "allow every method");
    size_t i;
    json_t *m;
    json_array_foreach(methods, i, m) {
      char mp[300];
      snprintf(mp, sizeof mp, "%s[%zu]", kp, i);
      if (sg_jsonload_string_value(ld, m, mp) == NULL)
        continue;
      int idx = method_lookup(json_string_value(m), json_string_length(m));
      if (idx < 0) {
        lerr(ld, mp, "'%s' is not a SparkConnectService method: use ExecutePlan, "
                     "AnalyzePlan, Config, AddArtifacts, ArtifactStatus, "
                     "Interrupt, ReattachExecute, ReleaseExecute, "
                     "ReleaseSession, FetchErrorDetails",
             json_string_value(m));
        continue;
      }
      t->methods |= 1u << idx;
    }
  }

  load_credential(ld, obj, path, t);
  load_limits(ld, obj, path, &t->limits);
}

static void tenant_free(sg_route_tenant *t) {
  free(t->name);
  for (size_t i = 0; i < t->n_hosts; i++)
    free(t->hosts[i]);
  free(t->hosts);
  for (size_t i = 0; i < t->n_backends; i++)
    backend_free(&t->backends[i]);
  free(t->backends);
  sg_route_allow *a = &t->allow;
  for (size_t i = 0; i < a->n_identities; i++)
    free(a->identities[i]);
  free(a->identities);
  for (size_t i = 0; i < a->n_identity_prefixes; i++)
    free(a->identity_prefixes[i]);
  free(a->identity_prefixes);
  for (size_t i = 0; i < a->n_claims; i++) {
    free(a->claims[i].name);
    json_decref(a->claims[i].values);
  }
  free(a->claims);
  free(t->credential_origin);
  if (t->credential != NULL) {
    explicit_bzero(t->credential, t->credential_len);
    free(t->credential);
  }
}

static void table_free(sg_route_table *t) {
  if (t == NULL)
    return;
  for (size_t i = 0; i < t->n_selectors; i++) {
    free(t->selectors[i].arg);
    free(t->selectors[i].text);
  }
  free(t->selectors);
  for (size_t i = 0; i < t->n_tenants; i++)
    tenant_free(&t->tenants[i]);
  free(t->tenants);
  free(t->by_name_);
  free(t->by_host_);
  free(t->path);
  free(t);
}

/* Equal keys stay in file order, and a prefix comes before an identity
 * equal to it, so that the walk in check_identity_rules sees it first. */
static int ix_cmp(const void *x, const void *y) {
  const struct sg_route_ix_ *a = x, *b = y;
  int c = strcmp(a->key, b->key);
  if (c != 0)
    return c;
  if (a->prefix != b->prefix)
    return a->prefix ? -1 : 1;
  if (a->tenant != b->tenant)
    return a->tenant < b->tenant ? -1 : 1;
  return (a->item > b->item) - (a->item < b->item);
}

static int build_indexes(sg_route_table *t) {
  size_t nh = 0;
  for (size_t i = 0; i < t->n_tenants; i++)
    nh += t->tenants[i].n_hosts;
  t->by_name_ = calloc(t->n_tenants ? t->n_tenants : 1, sizeof *t->by_name_);
  t->by_host_ = calloc(nh ? nh : 1, sizeof *t->by_host_);
  if (t->by_name_ == NULL || t->by_host_ == NULL)
    return -1;
  for (size_t i = 0; i < t->n_tenants; i++) {
    t->by_name_[i].key = t->tenants[i].name;
    t->by_name_[i].tenant = i;
  }
  qsort(t->by_name_, t->n_tenants, sizeof *t->by_name_, ix_cmp);
  for (size_t i = 0; i < t->n_tenants; i++)
    for (size_t h = 0; h < t->tenants[i].n_hosts; h++) {
      t->by_host_[t->n_hosts_].key = t->tenants[i].hosts[h];
      t->by_host_[t->n_hosts_].tenant = i;
      t->by_host_[t->n_hosts_].item = h;
      t->n_hosts_++;
    }
  qsort(t->by_host_, t->n_hosts_, sizeof *t->by_host_, ix_cmp);
  return 0;
}

/* ---- checks across tenants ----------------------------------------------- */

static bool has_selector(const sg_route_table *t, sg_route_selector_kind k) {
  for (size_t i = 0; i < t->n_selectors; i++)
    if (t->selectors[i].kind == k)
      return true;
  return false;
}

static bool starts_with(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

static void selector_list(const sg_route_table *t, char *out, size_t outlen) {
  size_t used = 0;
  out[0] = '\0';
  for (size_t i = 0; i < t->n_selectors && used < outlen; i++)
    used += (size_t)snprintf(out + used, outlen - used, "%s%s", i ? ", " : "",
                             t->selectors[i].text);
}

static const char *const overlap_fix =
    "add a selector that can tell them apart (header:NAME, jwt_claim:CLAIM, "
    "or authority with hosts) or allow it on one tenant only";

/* A tenant with "any_identity" shares every caller with every other tenant
 * that "identity" alone can pick. One error per such tenant, against the
 * first one it collides with, keeps a table of thousands readable. */
static void check_any_identity(loader *ld, const sg_route_table *t,
                               const bool *eligible, const char *sels) {
  size_t first = t->n_tenants, first_any = t->n_tenants;
  for (size_t i = 0; i < t->n_tenants; i++) {
    if (!eligible[i])
      continue;
    if (first == t->n_tenants)
      first = i;
    if (t->tenants[i].allow.any_identity && first_any == t->n_tenants)
      first_any = i;
  }
  if (first_any == t->n_tenants)
    return;
  char p[64];
  for (size_t b = 0; b < t->n_tenants; b++) {
    if (!eligible[b] || b == first)
      continue;
    const sg_route_tenant *any, *other;
    if (t->tenants[b].allow.any_identity) {
      any = &t->tenants[b];
      other = &t->tenants[first];
    } else if (first_any < b) {
      any = &t->tenants[first_any];
      other = &t->tenants[b];
    } else {
      continue;
    }
    snprintf(p, sizeof p, "tenants[%zu].allow", b);
    lerr(ld, p, "tenant '%s' has \"any_identity\" and tenant '%s' admits "
                "callers too; with tenant_selectors [%s] no caller admitted by "
                "'%s' can be routed to either: %s",
         any->name, other->name, sels, other->name, overlap_fix);
  }
}

static void rule_path(const struct sg_route_ix_ *e, char *p, size_t plen) {
  snprintf(p, plen, "tenants[%zu].allow.%s[%zu]", e->tenant,
           e->prefix ? "identity_prefixes" : "identities", e->item);
}

/* Identity rules of two tenants that admit the same caller, when nothing
 * but "identity" can pick the tenant: that caller is ambiguous on every
 * call and reaches neither, which is a configuration error, not a runtime
 * surprise. The rules are sorted once; in that order every prefix of a
 * rule comes before it, and the prefixes still on |open| are exactly those
 * of the current rule. Each rule is reported once, against the closest
 * rule of another tenant. Returns -1 when out of memory. */
static int check_identity_rules(loader *ld, const sg_route_table *t,
                                const bool *eligible, const char *sels) {
  size_t n = 0;
  for (size_t i = 0; i < t->n_tenants; i++)
    if (eligible[i] && !t->tenants[i].allow.any_identity)
      n += t->tenants[i].allow.n_identities +
           t->tenants[i].allow.n_identity_prefixes;
  struct sg_route_ix_ *rules = calloc(n ? n : 1, sizeof *rules);
  size_t *open = calloc(n ? n : 1, sizeof *open);
  if (rules == NULL || open == NULL) {
    free(rules);
    free(open);
    return -1;
  }
  size_t nr = 0;
  for (size_t i = 0; i < t->n_tenants; i++) {
    const sg_route_allow *a = &t->tenants[i].allow;
    if (!eligible[i] || a->any_identity)
      continue;
    for (size_t j = 0; j < a->n_identities; j++)
      if (a->identities[j] != NULL)
        rules[nr++] = (struct sg_route_ix_){a->identities[j], i, j, false};
    for (size_t j = 0; j < a->n_identity_prefixes; j++)
      if (a->identity_prefixes[j] != NULL)
        rules[nr++] = (struct sg_route_ix_){a->identity_prefixes[j], i, j, true};
  }
  qsort(rules, nr, sizeof *rules, ix_cmp);

  char p[256];
  size_t n_open = 0;
  const struct sg_route_ix_ *same = NULL; /* first identity with this key */
  for (size_t r = 0; r < nr; r++) {
    const struct sg_route_ix_ *e = &rules[r];
    const sg_route_tenant *te = &t->tenants[e->tenant];
    while (n_open > 0 && !starts_with(e->key, rules[open[n_open - 1]].key))
      n_open--;
    if (same != NULL && strcmp(same->key, e->key) != 0)
      same = NULL;
    if (!e->prefix && same == NULL)
      same = e;
    else if (!e->prefix && same->tenant != e->tenant) {
      rule_path(e, p, sizeof p);
      lerr(ld, p, "identity '%s' is allowed on tenant '%s' and on tenant "
                  "'%s' (tenants[%zu].allow.identities[%zu]); with "
                  "tenant_selectors [%s] it reaches neither: %s",
           e->key, te->name, t->tenants[same->tenant].name, same->tenant,
           same->item, sels, overlap_fix);
    }
    const struct sg_route_ix_ *o = NULL;
    for (size_t k = n_open; k > 0 && o == NULL; k--)
      if (rules[open[k - 1]].tenant != e->tenant)
        o = &rules[open[k - 1]];
    if (o != NULL) {
      rule_path(e, p, sizeof p);
      if (e->prefix)
        lerr(ld, p, "prefix '%s' of tenant '%s' overlaps prefix '%s' of "
                    "tenant '%s'; with tenant_selectors [%s] identities "
                    "starting with '%s' reach neither: %s",
             e->key, te->name, o->key, t->tenants[o->tenant].name, sels,
             e->key, overlap_fix);
      else
        lerr(ld, p, "identity '%s' is allowed on tenant '%s' and matches "
                    "prefix '%s' of tenant '%s'; with tenant_selectors [%s] "
                    "it reaches neither: %s",
             e->key, te->name, o->key, t->tenants[o->tenant].name, sels,
             overlap_fix);
    }
    if (e->prefix)
      open[n_open++] = r;
  }
  free(rules);
  free(open);
  return 0;
}

/* After build_indexes: equal names and hosts are neighbours there, the
 * first in file order first. Returns -1 when out of memory. */
static int check_table(loader *ld, sg_route_table *t) {
  bool by_name = has_selector(t, SG_ROUTE_SEL_JWT_CLAIM) ||
                 has_selector(t, SG_ROUTE_SEL_HEADER);
  bool by_authority = has_selector(t, SG_ROUTE_SEL_AUTHORITY);
  bool by_identity = has_selector(t, SG_ROUTE_SEL_IDENTITY);
  char sels[256];
  selector_list(t, sels, sizeof sels);
  char p[256];

  for (size_t i = 1, first = 0; i < t->n_tenants; i++) {
    const struct sg_route_ix_ *e = &t->by_name_[i], *f = &t->by_name_[first];
    if (strcmp(e->key, f->key) != 0) {
      first = i;
      continue;
    }
    snprintf(p, sizeof p, "tenants[%zu].name", e->tenant);
    lerr(ld, p, "duplicate tenant name '%s' (also tenants[%zu].name)", e->key,
         f->tenant);
  }
  for (size_t i = 1, first = 0; i < t->n_hosts_; i++) {
    const struct sg_route_ix_ *e = &t->by_host_[i], *f = &t->by_host_[first];
    if (strcmp(e->key, f->key) != 0) {
      first = i;
      continue;
    }
    if (e->tenant == f->tenant) /* listed twice by one tenant: reported */
      continue;
    snprintf(p, sizeof p, "tenants[%zu].hosts[%zu]", e->tenant, e->item);
    lerr(ld, p, "host '%s' is already used by tenant '%s' "
                "(tenants[%zu].hosts[%zu]): a host selects one tenant",
         e->key, t->tenants[f->tenant].name, f->tenant, f->item);
  }

  for (size_t i = 0; i < t->n_tenants; i++) {
    const sg_route_tenant *ti = &t->tenants[i];
    if (ti->n_hosts > 0 && !by_authority) {
      snprintf(p, sizeof p, "tenants[%zu].hosts", i);
      lerr(ld, p, "hosts are never consulted: tenant_selectors [%s] has no "
                  "\"authority\" (add it, or remove hosts)", sels);
    }
    if (!by_name && !(by_authority && ti->n_hosts > 0) && !by_identity) {
      snprintf(p, sizeof p, "tenants[%zu]", i);
      lerr(ld, p, "tenant '%s' can never be selected with tenant_selectors "
                  "[%s]: give it hosts (with \"authority\"), or add "
                  "\"identity\", header:NAME or jwt_claim:CLAIM",
           ti->name, sels);
    }
  }

  if (by_name || !by_identity)
    return 0;
  /* With hosts (and "authority") a tenant has another way in, and an
   * overlap is only a question of which host the client used. */
  bool *eligible = calloc(t->n_tenants ? t->n_tenants : 1, sizeof *eligible);
  if (eligible == NULL)
    return -1;
  for (size_t i = 0; i < t->n_tenants; i++)
    eligible[i] = !(by_authority && t->tenants[i].n_hosts > 0);
  check_any_identity(ld, t, eligible, sels);
  int rc = check_identity_rules(ld, t, eligible, sels);
  free(eligible);
  return rc;
}

sg_route_table *sg_route_table_from_json(const json_t *root,
                                         const char *base_dir,
                                         sg_route_report_fn report, void *ctx) {
  loader ld = LOADER(report, ctx, base_dir ? base_dir : ".");
  if (!json_is_object(root)) {
    lerr(&ld, "", "the routing table must be a JSON object with \"tenants\"");
    return NULL;
  }
  static const char *const keys[] = {"tenant_selectors", "tenants", NULL};
  sg_route_table *t = calloc(1, sizeof *t);
  if (t == NULL) {
    sg_jsonload_oom(&ld, "");
    return NULL;
  }
  t->refcount_ = 1;
  sg_jsonload_check_keys(&ld, root, "", keys);
  load_selectors(&ld, root, t);

  json_t *tenants = sg_jsonload_array(&ld, root, "", "tenants", true);
  if (tenants != NULL) {
    size_t n = json_array_size(tenants);
    if (n == 0)
      lerr(&ld, "tenants", "needs at least one tenant");
    t->tenants = calloc(n ? n : 1, sizeof *t->tenants);
    if (t->tenants == NULL) {
      sg_jsonload_oom(&ld, "tenants");
      n = 0;
    }
    for (size_t i = 0; i < n; i++) {
      char tp[64];
      snprintf(tp, sizeof tp, "tenants[%zu]", i);
      json_t *o = json_array_get(tenants, i);
      if (!json_is_object(o)) {
        lerr(&ld, tp, "must be an object, not %s", sg_jsonload_type_name(o));
        continue;
      }
      sg_route_tenant *ten = &t->tenants[t->n_tenants];
      ten->index = t->n_tenants++;
      load_tenant(&ld, o, tp, ten);
    }
  }
  if (ld.errors == 0 && (build_indexes(t) != 0 || check_table(&ld, t) != 0))
    sg_jsonload_oom(&ld, "tenants");
  if (ld.errors > 0) {
    table_free(t);
    return NULL;
  }
  return t;
}

sg_route_table *sg_route_table_load(const char *path, const char *base_dir,
                                    sg_route_report_fn report, void *ctx) {
  loader ld = LOADER(report, ctx, base_dir);
  char *resolved = sg_jsonload_resolve(base_dir, path);
  if (resolved == NULL) {
    sg_jsonload_oom(&ld, "");
    return NULL;
  }
  FILE *f = sg_jsonload_fopen(resolved);
  if (f == NULL) {
    lerr(&ld, "", "cannot open routing table '%s': %s", resolved,
         sg_jsonload_strerror(errno));
    free(resolved);
    return NULL;
  }
  json_error_t jerr;
  bool oom;
  json_t *root = sg_jsonload_parse_file(f, &jerr, &oom);
  fclose(f);
  if (oom) {
    sg_jsonload_oom(&ld, "");
    free(resolved);
    return NULL;
  }
  if (root == NULL) {
    lerr(&ld, "", "%s:%d:%d: invalid JSON: %s", resolved, jerr.line,
         jerr.column, jerr.text);
    free(resolved);
    return NULL;
  }
  char *dir;
  const char *slash = strrchr(resolved, '/');
  if (slash == NULL)
    dir = strdup(".");
  else if (slash == resolved)
    dir = strdup("/");
  else
    dir = strndup(resolved, (size_t)(slash - resolved));
  if (dir == NULL) {
    sg_jsonload_oom(&ld, "");
    json_decref(root);
    free(resolved);
    return NULL;
  }
  sg_route_table *t = sg_route_table_from_json(root, dir, report, ctx);
  json_decref(root);
  free(dir);
  if (t != NULL)
    t->path = resolved;
  else
    free(resolved);
  return t;
}

sg_route_table *sg_route_table_ref(sg_route_table *t) {
  __atomic_add_fetch(&t->refcount_, 1, __ATOMIC_RELAXED);
  return t;
}

void sg_route_table_unref(sg_route_table *t) {
  if (t == NULL)
    return;
  if (__atomic_sub_fetch(&t->refcount_, 1, __ATOMIC_ACQ_REL) == 0)
    table_free(t);
}

/* ---- lookups ------------------------------------------------------------- */

static int key_cmp_len(const char *key, size_t len, const char *s) {
  int c = strncmp(key, s, len);
  if (c != 0)
    return c;
  return s[len] == '\0' ? 0 : -1;
}

static const struct sg_route_ix_ *ix_find(const struct sg_route_ix_ *ix,
                                          size_t n, const char *key,
                                          size_t len) {
  if (memchr(key, '\0', len) != NULL)
    return NULL;
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = key_cmp_len(key, len, ix[mid].key);
    if (c == 0)
      return &ix[mid];
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return NULL;
}

const sg_route_tenant *sg_route_table_find(const sg_route_table *t,
                                           const char *name, size_t len) {
  const struct sg_route_ix_ *e = ix_find(t->by_name_, t->n_tenants, name, len);
  return e != NULL ? &t->tenants[e->tenant] : NULL;
}

static const sg_route_tenant *find_by_authority(const sg_route_table *t,
                                                const char *auth, size_t len) {
  const char *host = auth;
  size_t hlen = len;
  if (len > 0 && auth[0] == '[') {
    const char *end = memchr(auth, ']', len);
    if (end == NULL)
      return NULL;
    host = auth + 1;
    hlen = (size_t)(end - host);
  } else {
    const char *colon = memchr(auth, ':', len);
    if (colon != NULL && memchr(colon + 1, ':', len - (size_t)(colon + 1 - auth)) == NULL)
      hlen = (size_t)(colon - auth);
  }
  if (hlen > 1 && host[hlen - 1] == '.')
    hlen--;
  if (hlen == 0 || hlen > SG_ROUTE_MAX_HOST_LEN)
    return NULL;
  char buf[SG_ROUTE_MAX_HOST_LEN + 1];
  for (size_t i = 0; i < hlen; i++)
    buf[i] = (char)tolower((unsigned char)host[i]);
  const struct sg_route_ix_ *e = ix_find(t->by_host_, t->n_hosts_, buf, hlen);
  return e != NULL ? &t->tenants[e->tenant] : NULL;
}

static bool claim_matches(const json_t *claim, const json_t *values) {
  size_t i;
  json_t *v;
  if (json_is_array(claim)) {
    size_t k;
    json_t *elem;
    json_array_foreach((json_t *)claim, k, elem) {
      json_array_foreach((json_t *)values, i, v) {
        if (json_equal(elem, v))
          return true;
      }
    }
    return false;
  }
  json_array_foreach((json_t *)values, i, v) {
    if (json_equal((json_t *)claim, v))
      return true;
  }
  return false;
}

bool sg_route_tenant_admits(const sg_route_tenant *t, const char *identity,
                            const json_t *claims) {
  /* A caller without an identity is admitted nowhere: the listener's auth
   * decides who is anonymous, routing never widens that. */
  if (identity == NULL)
    return false;
  const sg_route_allow *a = &t->allow;
  if (a->any_identity)
    return true;
  for (size_t i = 0; i < a->n_identities; i++)
    if (strcmp(a->identities[i], identity) == 0)
      return true;
  for (size_t i = 0; i < a->n_identity_prefixes; i++)
    if (starts_with(identity, a->identity_prefixes[i]))
      return true;
  if (claims != NULL && json_is_object(claims)) {
    for (size_t i = 0; i < a->n_claims; i++) {
      const json_t *c = json_object_get(claims, a->claims[i].name);
      if (c != NULL && claim_matches(c, a->claims[i].values))
        return true;
    }
  }
  return false;
}

const char *sg_route_outcome_reason(sg_route_outcome o) {
  switch (o) {
  case SG_ROUTE_OK: return "ok";
  case SG_ROUTE_NO_TENANT: return "no_tenant";
  case SG_ROUTE_AMBIGUOUS_IDENTITY: return "ambiguous_identity";
  case SG_ROUTE_UNKNOWN_TENANT: return "unknown_tenant";
  case SG_ROUTE_NOT_ALLOWED: return "not_allowed";
  }
  return "?";
}

/* One message for "unknown" and "forbidden", so a caller cannot probe which
 * tenants exist; the log has the reason. */
#define MSG_NO_TENANT "sparkgate: no tenant is configured for this caller"
#define MSG_DENIED "sparkgate: the caller is not allowed to use the requested tenant"

static int decide(sg_route_decision *out, sg_route_outcome o,
                  const sg_route_tenant *tenant, const char *selector) {
  out->outcome = o;
  out->reason = sg_route_outcome_reason(o);
  out->selector = selector;
  out->tenant = o == SG_ROUTE_OK ? tenant : NULL;
  out->denied_tenant = o == SG_ROUTE_NOT_ALLOWED ? tenant : NULL;
  switch (o) {
  case SG_ROUTE_OK: out->message = "ok"; break;
  case SG_ROUTE_NO_TENANT:
  case SG_ROUTE_AMBIGUOUS_IDENTITY: out->message = MSG_NO_TENANT; break;
  case SG_ROUTE_UNKNOWN_TENANT:
  case SG_ROUTE_NOT_ALLOWED: out->message = MSG_DENIED; break;
  }
  return o == SG_ROUTE_OK ? 0 : -1;
}

static int by_name(const sg_route_table *t, const sg_route_request *req,
                   const char *name, size_t len, const char *selector,
                   sg_route_decision *out) {
  const sg_route_tenant *tenant = sg_route_table_find(t, name, len);
  if (tenant == NULL)
    return decide(out, SG_ROUTE_UNKNOWN_TENANT, NULL, selector);
  if (!sg_route_tenant_admits(tenant, req->identity, req->claims))
    return decide(out, SG_ROUTE_NOT_ALLOWED, tenant, selector);
  return decide(out, SG_ROUTE_OK, tenant, selector);
}

int sg_route_select(const sg_route_table *t, const sg_route_request *req,
                    sg_route_decision *out) {
  bool ambiguous = false;
  for (size_t s = 0; s < t->n_selectors; s++) {
    const sg_route_selector *sel = &t->selectors[s];
    switch (sel->kind) {
    case SG_ROUTE_SEL_JWT_CLAIM: {
      if (req->claims == NULL || !json_is_object(req->claims))
        break;
      const json_t *v = json_object_get(req->claims, sel->arg);
      if (v == NULL || !json_is_string(v) || json_string_length(v) == 0)
        break;
      return by_name(t, req, json_string_value(v), json_string_length(v),
                     sel->text, out);
    }
    case SG_ROUTE_SEL_HEADER: {
      if (req->header == NULL)
        break;
      size_t len = 0;
      const char *v = req->header(req->header_ctx, sel->arg, &len);
      if (v == NULL || len == 0)
        break;
      return by_name(t, req, v, len, sel->text, out);
    }
    case SG_ROUTE_SEL_AUTHORITY: {
      if (req->authority == NULL)
        break;
      const sg_route_tenant *tenant =
          find_by_authority(t, req->authority, req->authority_len);
      if (tenant == NULL)
        break;
      if (!sg_route_tenant_admits(tenant, req->identity, req->claims))
        return decide(out, SG_ROUTE_NOT_ALLOWED, tenant, sel->text);
      return decide(out, SG_ROUTE_OK, tenant, sel->text);
    }
    case SG_ROUTE_SEL_IDENTITY: {
      const sg_route_tenant *found = NULL;
      size_t count = 0;
      for (size_t i = 0; i < t->n_tenants && count < 2; i++)
        if (sg_route_tenant_admits(&t->tenants[i], req->identity, req->claims)) {
          found = &t->tenants[i];
          count++;
        }
      if (count == 1)
        return decide(out, SG_ROUTE_OK, found, sel->text);
      if (count > 1)
        ambiguous = true;
      break;
    }
    }
  }
  return decide(out, ambiguous ? SG_ROUTE_AMBIGUOUS_IDENTITY : SG_ROUTE_NO_TENANT,
                NULL, NULL);
}

/* ---- rendezvous hashing -------------------------------------------------- */

static void session_state(siphash_state *st, const sg_route_tenant *t,
                          const char *user_id, const char *session_id) {
  static const uint8_t zero = 0;
  sip_init(st, route_hash_key);
  sip_update(st, t->name, strlen(t->name));
  sip_update(st, &zero, 1);
  if (user_id != NULL)
    sip_update(st, user_id, strlen(user_id));
  sip_update(st, &zero, 1);
  if (session_id != NULL)
    sip_update(st, session_id, strlen(session_id));
  sip_update(st, &zero, 1);
}

/* ln(u) for u = (k + 0.5) / 2^52, k the top 52 bits of |h|: u is exactly
 * x / 2^53 with x = 2k + 1 odd, so it is strictly inside (0, 1) and exact
 * in a double.
 *
 * Not libm's log(): libm implementations may differ in the last bit, and
 * replicas must rank backends identically. This uses only IEEE-754 basic
 * operations (each correctly rounded, so the same everywhere), one per
 * statement so that no compiler fuses a multiply-add. */
static double ln_unit(uint64_t h) {
  static const double ln2 = 0x1.62e42fefa39efp-1;
  static const double sqrt2 = 0x1.6a09e667f3bcdp+0;
  uint64_t x = ((h >> 12) << 1) | 1; /* odd, < 2^53 */
  int e = 63 - __builtin_clzll(x);   /* x = m * 2^e, m in [1, 2) */
  double m = (double)x;
  for (int i = 0; i < e; i++)
    m *= 0.5; /* exact */
  if (m > sqrt2) {
    m *= 0.5; /* m in (0.707, 1.415): the series below converges fast */
    e++;
  }
  /* ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m-1)/(m+1),
   * |s| < 0.172: 14 terms leave an error far below one ulp. */
  double num = m - 1.0;
  double den = m + 1.0;
  double sv = num / den;
  double z = sv * sv;
  double p = 1.0 / 27.0;
  for (int k = 12; k >= 0; k--) {
    p = p * z;
    p = p + 1.0 / (double)(2 * k + 1);
  }
  double ln_m = 2.0 * sv;
  ln_m = ln_m * p;
  double ln_pow = (double)(e - 53) * ln2;
  return ln_pow + ln_m;
}

/* Weighted HRW (Schindelhauer & Schomaker; "logarithmic method"): the
 * backend with the highest -w/ln(u) wins, which makes backend i win with
 * probability w_i / sum(w), and adding or removing one backend moves only
 * the sessions that go to or come from it. */
double sg_route_hrw_score(uint64_t hash, uint32_t weight) {
  if (weight == 0)
    return 0.0;
  double l = ln_unit(hash); /* < 0 */
  return -(double)weight / l;
}

static double score_from(const siphash_state *prefix, const sg_backend_config *b) {
  if (b->weight == 0)
    return 0.0;
  siphash_state st = *prefix;
  sip_update(&st, b->name, strlen(b->name));
  return sg_route_hrw_score(sip_final(st), b->weight);
}

double sg_route_backend_score(const sg_route_tenant *t, size_t backend,
                              const char *user_id, const char *session_id) {
  if (backend >= t->n_backends)
    return 0.0;
  siphash_state st;
  session_state(&st, t, user_id, session_id);
  return score_from(&st, &t->backends[backend]);
}

/* Ties (practically impossible) go to the smaller name, not the smaller
 * index, so the order of backends in the file does not matter. */
static bool ranks_before(const sg_route_tenant *t, double s, size_t i,
                         double bs, size_t bi) {
  if (s != bs)
    return s > bs;
  return strcmp(t->backends[i].name, t->backends[bi].name) < 0;
}

size_t sg_route_rank_backends(const sg_route_tenant *t, const char *user_id,
                              const char *session_id, sg_route_rank_entry *out,
                              size_t cap) {
  siphash_state st;
  session_state(&st, t, user_id, session_id);
  size_t n = 0;
  for (size_t i = 0; i < t->n_backends; i++) {
    if (t->backends[i].weight == 0)
      continue;
    double s = score_from(&st, &t->backends[i]);
    size_t pos = n;
    while (pos > 0 && ranks_before(t, s, i, out[pos - 1].score, out[pos - 1].index))
      pos--;
    if (pos >= cap)
      continue;
    size_t last = n < cap ? n : cap - 1;
    for (size_t k = last; k > pos; k--)
      out[k] = out[k - 1];
    out[pos].index = i;
    out[pos].score = s;
    if (n < cap)
      n++;
  }
  return n;
}

int sg_route_pick_backend(const sg_route_tenant *t, const char *user_id,
                          const char *session_id, const bool *backend_up,
                          size_t *out_index) {
  /* One backend with a weight wins every ranking: no need to hash. */
  size_t weighted = 0, only = 0;
  for (size_t i = 0; i < t->n_backends && weighted < 2; i++)
    if (t->backends[i].weight > 0) {
      weighted++;
      only = i;
    }
  if (weighted == 0)
    return SG_ROUTE_PICK_NONE;
  if (weighted == 1) {
    *out_index = only;
    return backend_up == NULL || backend_up[only] ? SG_ROUTE_PICK_OK
                                                  : SG_ROUTE_PICK_DOWN;
  }
  siphash_state st;
  session_state(&st, t, user_id, session_id);
  size_t best = SIZE_MAX, best_up = SIZE_MAX;
  double bs = 0.0, bus = 0.0;
  for (size_t i = 0; i < t->n_backends; i++) {
    if (t->backends[i].weight == 0)
      continue;
    double s = score_from(&st, &t->backends[i]);
    if (best == SIZE_MAX || ranks_before(t, s, i, bs, best)) {
      best = i;
      bs = s;
    }
    if ((backend_up == NULL || backend_up[i]) &&
        (best_up == SIZE_MAX || ranks_before(t, s, i, bus, best_up))) {
      best_up = i;
      bus = s;
    }
  }
  if (best == SIZE_MAX)
    return SG_ROUTE_PICK_NONE;
  if (best_up == best) {
    *out_index = best;
    return SG_ROUTE_PICK_OK;
  }
  if (t->failover && best_up != SIZE_MAX) {
    *out_index = best_up;
    return SG_ROUTE_PICK_OK;
  }
  *out_index = best;
  return SG_ROUTE_PICK_DOWN;
}

/* ---- token bucket -------------------------------------------------------- */

void sg_token_bucket_init(sg_token_bucket *b, uint64_t rate, uint64_t per_ms,
                          uint64_t burst, uint64_t now_ms) {
  memset(b, 0, sizeof *b);
  if (rate == 0)
    return;
  if (per_ms == 0)
    per_ms = 1;
  if (burst == 0)
    burst = rate;
  b->per_ms = per_ms;
  b->rate = rate;
  b->capacity = burst > UINT64_MAX / per_ms ? UINT64_MAX : burst * per_ms;
  b->level = b->capacity;
  b->last_ms = now_ms;
}

static uint64_t bucket_level_at(const sg_token_bucket *b, uint64_t now_ms) {
  if (now_ms <= b->last_ms)
    return b->level;
  uint64_t elapsed = now_ms - b->last_ms;
  uint64_t room = b->capacity - b->level;
  if (elapsed > room / b->rate)
    return b->capacity;
  return b->level + elapsed * b->rate; /* <= capacity: no overflow */
}

bool sg_token_bucket_take(sg_token_bucket *b, uint64_t now_ms, uint64_t n) {
  if (b->rate == 0)
    return true;
  b->level = bucket_level_at(b, now_ms);
  if (now_ms > b->last_ms)
    b->last_ms = now_ms;
  if (n > b->capacity / b->per_ms)
    return false;
  uint64_t need = n * b->per_ms;
  if (b->level < need)
    return false;
  b->level -= need;
  return true;
}

uint64_t sg_token_bucket_wait_ms(const sg_token_bucket *b, uint64_t now_ms,
                                 uint64_t n) {
  if (b->rate == 0)
    return 0;
  if (n > b->capacity / b->per_ms)
    return UINT64_MAX;
  uint64_t need = n * b->per_ms;
  uint64_t level = bucket_level_at(b, now_ms);
  if (level >= need)
    return 0;
  return (need - level + b->rate - 1) / b->rate;
}

/* ---- summary ------------------------------------------------------------- */

void sg_route_table_print_summary(const sg_route_table *t, FILE *f) {
  static const char *const uid_names[] = {"rewrite", "enforce", "off"};
  char sels[256];
  selector_list(t, sels, sizeof sels);
  fprintf(f, "routing table %s: %zu tenant%s\n", t->path ? t->path : "(inline)",
          t->n_tenants, t->n_tenants == 1 ? "" : "s");
  fprintf(f, "tenant selectors: %s\n", sels);
  for (size_t i = 0; i < t->n_tenants; i++) {
    const sg_route_tenant *ten = &t->tenants[i];
    fprintf(f, "  tenant %s\n", ten->name);
    if (ten->n_hosts > 0) {
      fprintf(f, "    hosts:");
      for (size_t h = 0; h < ten->n_hosts; h++)
        fprintf(f, " %s", ten->hosts[h]);
      fprintf(f, "\n");
    }
    const sg_route_allow *a = &ten->allow;
    if (a->any_identity)
      fprintf(f, "    allow: any identity\n");
    else {
      fprintf(f, "    allow: %zu identit%s, %zu prefix%s", a->n_identities,
              a->n_identities == 1 ? "y" : "ies", a->n_identity_prefixes,
              a->n_identity_prefixes == 1 ? "" : "es");
      for (size_t c = 0; c < a->n_claims; c++)
        fprintf(f, "%s%s", c == 0 ? ", claims: " : ", ", a->claims[c].name);
      fprintf(f, "\n");
    }
    fprintf(f, "    user_id: %s, failover: %s, methods:", uid_names[ten->user_id],
            ten->failover ? "yes" : "no");
    if (ten->methods == SG_SPARK_ALL_METHODS)
      fprintf(f, " all\n");
    else {
      for (int m = 0; m < SG_SPARK_N_METHODS; m++)
        if (ten->methods & (1u << m))
          fprintf(f, " %s", method_names[m]);
      fprintf(f, "\n");
      char missing[128];
      if (sg_route_tenant_missing_companions(ten, missing, sizeof missing)[0] != '\0')
        fprintf(f, "    WARNING: ExecutePlan without %s: PySpark calls them for "
                   "every query and session\n", missing);
    }
    const sg_backend_config *shared = NULL;
    const sg_route_tenant *other =
        sg_route_tenant_off_shares_backend(t->tenants, t->n_tenants, ten, &shared);
    if (other != NULL)
      fprintf(f, "    WARNING: tenant %s (user_id off) shares backend %s:%u with tenant %s "
                 "(user_id %s): its callers can reach %s's Spark sessions there\n",
              ten->name, shared->address, (unsigned)shared->port, other->name,
              uid_names[other->user_id], other->name);
    switch (ten->credential_source) {
    case SG_ROUTE_CREDENTIAL_NONE: fprintf(f, "    credential: none\n"); break;
    case SG_ROUTE_CREDENTIAL_FILE:
      fprintf(f, "    credential: file %s\n", ten->credential_origin);
      break;
    case SG_ROUTE_CREDENTIAL_ENV:
      fprintf(f, "    credential: env %s\n", ten->credential_origin);
      break;
    }
    const sg_route_limits *l = &ten->limits;
    if (l->max_concurrent_rpcs || l->max_concurrent_executions ||
        l->requests_per_second || l->upload_bytes_per_minute)
      fprintf(f, "    limits: rpcs=%u executions=%u rps=%u burst=%u "
                 "upload_bytes_per_minute=%llu (0 = none), over limit: %s\n",
              l->max_concurrent_rpcs, l->max_concurrent_executions,
              l->requests_per_second, l->burst,
              (unsigned long long)l->upload_bytes_per_minute,
              l->over_limit_status == 14 ? "unavailable" : "resource_exhausted");
    else
      fprintf(f, "    limits: none\n");
    fprintf(f, "    largest request message: %u bytes\n", l->max_message_bytes);
    for (size_t j = 0; j < ten->n_backends; j++) {
      const sg_backend_config *b = &ten->backends[j];
      fprintf(f, "    upstream %s  %s:%u  %s weight=%u%s\n", b->name, b->address,
              b->port,
              b->tls ? (b->tls_verify ? "tls (verified)" : "tls (NOT VERIFIED)")
                     : "h2c",
              b->weight, b->weight == 0 ? " (takes no sessions)" : "");
    }
  }
}
