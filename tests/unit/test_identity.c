/* Unit tests for client identities from certificates, the RFC 8705
 * thumbprint, x-forwarded-client-cert, the identity-header sanitizer, the
 * listener auth / identity_headers JSON parsers and the auth decision.
 * Certificates come from tests/fixtures/identity (see its README); expected
 * digests were computed there with the openssl CLI, not by this code. */
#include "sparkgate/identity.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/pem.h>

#include "check.h"

#ifndef SG_SOURCE_ROOT
#define SG_SOURCE_ROOT "."
#endif

#define FIXTURES SG_SOURCE_ROOT "/tests/fixtures/identity/"
#define ALICE_SPIFFE "spiffe://example.org/ns/team-a/sa/alice"
#define ALICE_DNS "alice.clients.example.org"

/* basenc --base64url of the DER SHA-256, padding removed (README). */
#define ALICE_X5T "7pkKe_Mxk3-kg7-oqTa4EVLn31rPwMiF0DTWkew35xk"
#define TWO_URI_X5T "ajz-tvOpqeM_b8PRmOTNWLcCUll-OC7TlH7CXTxRCew"
#define NUL_X5T "UHLdfNlYd0vzIkbDxAcErN4kZjPgGbynpknspF2-d40"
/* openssl dgst -sha256 -r of the DER. */
#define ALICE_HEX "ee990a7bf331937fa483bfa8a936b81152e7df5acfc0c885d034d691ec37e719"
#define XFCC_HEX "e3cb3903f4124aad6afc3d0d229163a67958f2fdf6812a35ecf7ec4b277d5e49"
#define NUL_HEX "5072dd7cd958774bf32246c3c40704acde246633e019bca7a649eca45dbe778d"

static X509 *load_cert(const char *name) {
  char path[512];
  snprintf(path, sizeof path, FIXTURES "%s", name);
  FILE *f = fopen(path, "r");
  if (f == NULL) {
    fprintf(stderr, "cannot open %s\n", path);
    exit(2);
  }
  X509 *x = PEM_read_X509(f, NULL, NULL, NULL);
  fclose(f);
  if (x == NULL) {
    fprintf(stderr, "cannot parse %s\n", path);
    exit(2);
  }
  return x;
}

/* ---- identity from certificates ---------------------------------------- */

typedef struct mode_case {
  const char *cert;
  sg_cert_identity_mode mode;
  const char *identity; /* expected identity, or NULL for failure */
  const char *reason;   /* expected reason when identity is NULL */
} mode_case;

static const mode_case mode_cases[] = {
    {"alice.pem", SG_CERT_IDENTITY_URI_SAN, ALICE_SPIFFE, NULL},
    {"alice.pem", SG_CERT_IDENTITY_DNS_SAN, ALICE_DNS, NULL},
    {"alice.pem", SG_CERT_IDENTITY_CN, "alice", NULL},

    {"two_uri.pem", SG_CERT_IDENTITY_URI_SAN, NULL, "multiple_uri_sans"},
    {"two_uri.pem", SG_CERT_IDENTITY_DNS_SAN, ALICE_DNS, NULL},
    {"two_uri.pem", SG_CERT_IDENTITY_CN, "alice", NULL},

    {"no_san.pem", SG_CERT_IDENTITY_URI_SAN, NULL, "no_uri_san"},
    {"no_san.pem", SG_CERT_IDENTITY_DNS_SAN, NULL, "no_dns_san"},
    {"no_san.pem", SG_CERT_IDENTITY_CN, "alice", NULL},

    {"two_dns_cn.pem", SG_CERT_IDENTITY_URI_SAN, ALICE_SPIFFE, NULL},
    {"two_dns_cn.pem", SG_CERT_IDENTITY_DNS_SAN, NULL, "multiple_dns_sans"},
    {"two_dns_cn.pem", SG_CERT_IDENTITY_CN, NULL, "multiple_cns"},

    /* DNS names are returned lowercased. */
    {"not_spiffe.pem", SG_CERT_IDENTITY_URI_SAN, NULL, "not_spiffe"},
    {"not_spiffe.pem", SG_CERT_IDENTITY_DNS_SAN, ALICE_DNS, NULL},
    {"not_spiffe.pem", SG_CERT_IDENTITY_CN, NULL, "bad_chars"},

    {"bad_spiffe.pem", SG_CERT_IDENTITY_URI_SAN, NULL, "invalid_spiffe_id"},
    {"bad_spiffe.pem", SG_CERT_IDENTITY_DNS_SAN, NULL, "invalid_dns_name"},
    {"bad_spiffe.pem", SG_CERT_IDENTITY_CN, "alice", NULL},

    {"xfcc.pem", SG_CERT_IDENTITY_URI_SAN, ALICE_SPIFFE, NULL},
    {"xfcc.pem", SG_CERT_IDENTITY_DNS_SAN, NULL, "multiple_dns_sans"},
    {"xfcc.pem", SG_CERT_IDENTITY_CN, "alice", NULL},

    {"no_cn.pem", SG_CERT_IDENTITY_URI_SAN, ALICE_SPIFFE, NULL},
    {"no_cn.pem", SG_CERT_IDENTITY_DNS_SAN, NULL, "no_dns_san"},
    {"no_cn.pem", SG_CERT_IDENTITY_CN, NULL, "no_cn"},

    {"ctl_cn.pem", SG_CERT_IDENTITY_CN, NULL, "bad_chars"},

    /* strlen() of each of these is a valid-looking "alice" identity. */
    {"nul.pem", SG_CERT_IDENTITY_URI_SAN, NULL, "embedded_nul"},
    {"nul.pem", SG_CERT_IDENTITY_DNS_SAN, NULL, "embedded_nul"},
    {"nul.pem", SG_CERT_IDENTITY_CN, NULL, "embedded_nul"},
};

static void test_cert_modes(void) {
  for (size_t i = 0; i < sizeof mode_cases / sizeof *mode_cases; i++) {
    const mode_case *c = &mode_cases[i];
    X509 *x = load_cert(c->cert);
    char out[SG_IDENTITY_MAX_BYTES + 1];
    memset(out, 'Z', sizeof out);
    const char *reason = "unset";
    int rv = sg_identity_from_cert(x, c->mode, out, sizeof out, &reason);
    if (c->identity != NULL) {
      CHECK(rv == 0);
      CHECK(reason == NULL);
      CHECK(strcmp(out, c->identity) == 0);
      if (rv != 0 || strcmp(out, c->identity) != 0)
        fprintf(stderr, "  %s/%s: got rv %d '%s' reason %s\n", c->cert,
                sg_cert_identity_mode_name(c->mode), rv, out,
                reason ? reason : "-");
      /* An exact fit works, one byte less does not. */
      size_t n = strlen(c->identity);
      CHECK(sg_identity_from_cert(x, c->mode, out, n + 1, &reason) == 0);
      CHECK(strcmp(out, c->identity) == 0);
      CHECK(sg_identity_from_cert(x, c->mode, out, n, &reason) == -1);
      CHECK(reason != NULL && strcmp(reason, "too_long") == 0);
      CHECK(out[0] == '\0');
    } else {
      CHECK(rv == -1);
      CHECK(out[0] == '\0');
      CHECK(reason != NULL && strcmp(reason, c->reason) == 0);
      if (reason == NULL || strcmp(reason, c->reason) != 0)
        fprintf(stderr, "  %s/%s: reason %s, expected %s\n", c->cert,
                sg_cert_identity_mode_name(c->mode), reason ? reason : "-",
                c->reason);
    }
    /* reason may be NULL. */
    CHECK(sg_identity_from_cert(x, c->mode, out, sizeof out, NULL) ==
          (c->identity != NULL ? 0 : -1));
    X509_free(x);
  }

  /* Bad arguments. */
  char out[64];
  const char *reason = NULL;
  CHECK(sg_identity_from_cert(NULL, SG_CERT_IDENTITY_CN, out, sizeof out,
                              &reason) == -1);
  CHECK(reason != NULL && strcmp(reason, "internal") == 0);
  X509 *x = load_cert("alice.pem");
  CHECK(sg_identity_from_cert(x, SG_CERT_IDENTITY_CN, NULL, 10, &reason) ==
        -1);
  CHECK(sg_identity_from_cert(x, SG_CERT_IDENTITY_CN, out, 0, &reason) == -1);
  CHECK(sg_identity_from_cert(x, (sg_cert_identity_mode)42, out, sizeof out,
                              &reason) == -1);
  CHECK(reason != NULL && strcmp(reason, "internal") == 0);
  X509_free(x);
}

static void test_mode_names(void) {
  sg_cert_identity_mode m = SG_CERT_IDENTITY_CN;
  CHECK(sg_cert_identity_mode_parse("uri_san", &m) == 0 &&
        m == SG_CERT_IDENTITY_URI_SAN);
  CHECK(sg_cert_identity_mode_parse("dns_san", &m) == 0 &&
        m == SG_CERT_IDENTITY_DNS_SAN);
  CHECK(sg_cert_identity_mode_parse("cn", &m) == 0 &&
        m == SG_CERT_IDENTITY_CN);
  CHECK(sg_cert_identity_mode_parse("CN", &m) == -1);
  CHECK(sg_cert_identity_mode_parse("uri", &m) == -1);
  CHECK(sg_cert_identity_mode_parse("", &m) == -1);
  CHECK(sg_cert_identity_mode_parse(NULL, &m) == -1);
  CHECK(strcmp(sg_cert_identity_mode_name(SG_CERT_IDENTITY_URI_SAN),
               "uri_san") == 0);
  CHECK(strcmp(sg_cert_identity_mode_name(SG_CERT_IDENTITY_DNS_SAN),
               "dns_san") == 0);
  CHECK(strcmp(sg_cert_identity_mode_name(SG_CERT_IDENTITY_CN), "cn") == 0);
}

static bool spiffe_ok(const char *s) {
  return sg_identity_spiffe_id_is_valid(s, strlen(s));
}

static void test_spiffe_ids(void) {
  CHECK(spiffe_ok(ALICE_SPIFFE));
  CHECK(spiffe_ok("spiffe://example.org/a"));
  CHECK(spiffe_ok("spiffe://td-1_x.example/A.b-c_D/9"));
  CHECK(spiffe_ok("spiffe://x/..a/a../.a."));

  CHECK(!spiffe_ok(""));
  CHECK(!spiffe_ok("spiffe://"));
  CHECK(!spiffe_ok("spiffe://example.org"));     /* trust domain only */
  CHECK(!spiffe_ok("spiffe://example.org/"));    /* empty path segment */
  CHECK(!spiffe_ok("spiffe:///ns/a"));           /* empty trust domain */
  CHECK(!spiffe_ok("SPIFFE://example.org/a"));   /* scheme case */
  CHECK(!spiffe_ok("spiffe:/example.org/a"));
  CHECK(!spiffe_ok("https://example.org/a"));
  CHECK(!spiffe_ok("spiffe://Example.org/a"));   /* upper-case trust domain */
  CHECK(!spiffe_ok("spiffe://example.org:8443/a")); /* port */
  CHECK(!spiffe_ok("spiffe://user@example.org/a")); /* userinfo */
  CHECK(!spiffe_ok("spiffe://example.org//a"));
  CHECK(!spiffe_ok("spiffe://example.org/a/"));
  CHECK(!spiffe_ok("spiffe://example.org/a/./b"));
  CHECK(!spiffe_ok("spiffe://example.org/a/../b"));
  CHECK(!spiffe_ok("spiffe://example.org/."));
  CHECK(!spiffe_ok("spiffe://example.org/.."));
  CHECK(!spiffe_ok("spiffe://example.org/a?b=c"));
  CHECK(!spiffe_ok("spiffe://example.org/a#frag"));
  CHECK(!spiffe_ok("spiffe://example.org/a%20b"));
  CHECK(!spiffe_ok("spiffe://example.org/a b"));
  CHECK(!spiffe_ok("spiffe://exa mple.org/a"));
  CHECK(!spiffe_ok("spiffe://example.org/caf\xc3\xa9"));
  CHECK(!sg_identity_spiffe_id_is_valid("spiffe://example.org/a\0b", 24));
  CHECK(!sg_identity_spiffe_id_is_valid(NULL, 0));

  /* Length limits: trust domain 255, whole ID 2048. */
  char buf[2100];
  memcpy(buf, "spiffe://", 9);
  memset(buf + 9, 'a', 255);
  memcpy(buf + 9 + 255, "/x", 3);
  CHECK(spiffe_ok(buf));
  memset(buf + 9, 'a', 256);
  memcpy(buf + 9 + 256, "/x", 3);
  CHECK(!spiffe_ok(buf));
  /* "spiffe://a/" + path: 11 + 2037 = 2048 bytes. */
  memcpy(buf, "spiffe://a/", 11);
  memset(buf + 11, 'p', 2037);
  buf[2048] = '\0';
  CHECK(spiffe_ok(buf));
  buf[2048] = 'p';
  buf[2049] = '\0';
  CHECK(!spiffe_ok(buf));
}

/* ---- thumbprint ------------------------------------------------------- */

static void test_thumbprint(void) {
  static const struct {
    const char *cert, *x5t;
  } cases[] = {{"alice.pem", ALICE_X5T},
               {"two_uri.pem", TWO_URI_X5T},
               {"nul.pem", NUL_X5T}};
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    X509 *x = load_cert(cases[i].cert);
    char out[SG_IDENTITY_THUMBPRINT_LEN + 1];
    CHECK(sg_identity_cert_thumbprint(x, out, sizeof out) == 0);
    CHECK(strcmp(out, cases[i].x5t) == 0);
    CHECK(strlen(out) == SG_IDENTITY_THUMBPRINT_LEN);
    CHECK(strpbrk(out, "+/=") == NULL);
    CHECK(sg_identity_cert_thumbprint(x, out, sizeof out - 1) == -1);
    X509_free(x);
  }
  char out[64];
  CHECK(sg_identity_cert_thumbprint(NULL, out, sizeof out) == -1);
}

/* ---- x-forwarded-client-cert ------------------------------------------ */

static void check_xfcc(const char *cert, const char *expected) {
  X509 *x = load_cert(cert);
  char out[4096];
  CHECK(sg_identity_xfcc(x, out, sizeof out) == 0);
  CHECK(strcmp(out, expected) == 0);
  if (strcmp(out, expected) != 0)
    fprintf(stderr, "  %s:\n    got      %s\n    expected %s\n", cert, out,
            expected);
  /* Every buffer too small fails cleanly (ASan watches the writes); an
   * exact fit succeeds. */
  size_t n = strlen(expected);
  char *tight = malloc(n + 1);
  if (tight == NULL)
    exit(2);
  for (size_t len = 1; len <= n; len++) {
    char *small = malloc(len);
    if (small == NULL)
      exit(2);
    int rv = sg_identity_xfcc(x, small, len);
    CHECK(rv == -1);
    CHECK(small[0] == '\0');
    free(small);
  }
  CHECK(sg_identity_xfcc(x, tight, n + 1) == 0);
  CHECK(strcmp(tight, expected) == 0);
  free(tight);
  X509_free(x);
}

static void test_xfcc(void) {
  check_xfcc("alice.pem", "Hash=" ALICE_HEX ";Subject=\"CN=alice,O=Example\""
                          ";URI=" ALICE_SPIFFE ";DNS=" ALICE_DNS);
  /* RFC 2253 gives CN=alice,O=Acme\, \"Inc\"\; a\\b; inside the quoted
   * XFCC value every " and \ gets one more backslash. Only the first URI
   * SAN is sent (as Envoy does), every DNS SAN is. */
  check_xfcc("xfcc.pem",
             "Hash=" XFCC_HEX
             ";Subject=\"CN=alice,O=Acme\\\\, \\\\\\\"Inc\\\\\\\"\\\\; "
             "a\\\\\\\\b\";URI=" ALICE_SPIFFE ";DNS=" ALICE_DNS
             ";DNS=alice2.clients.example.org");
  /* SANs holding a NUL cannot go into a header and are left out; the
   * subject shows the NUL as the RFC 2253 escape \00. */
  check_xfcc("nul.pem",
             "Hash=" NUL_HEX ";Subject=\"CN=alice\\\\00@evil,O=Example\"");
  X509 *x = load_cert("no_san.pem");
  char out[512];
  CHECK(sg_identity_xfcc(x, out, sizeof out) == 0);
  CHECK(strstr(out, ";Subject=\"CN=alice,O=Example\"") != NULL);
  CHECK(strstr(out, "URI=") == NULL && strstr(out, "DNS=") == NULL);
  X509_free(x);
  x = load_cert("two_uri.pem");
  CHECK(sg_identity_xfcc(x, out, sizeof out) == 0);
  CHECK_STR_CONTAINS(out, ";URI=" ALICE_SPIFFE ";DNS=" ALICE_DNS);
  CHECK(strstr(out, "sa/bob") == NULL);
  X509_free(x);
  x = load_cert("not_spiffe.pem");
  CHECK(sg_identity_xfcc(x, out, sizeof out) == 0);
  /* Non-ASCII in the subject is escaped, never passed as raw bytes. */
  CHECK_STR_CONTAINS(out, "Subject=\"CN=al\\\\C3\\\\AFce,O=Example\"");
  CHECK_STR_CONTAINS(out, ";URI=https://example.org/alice");
  CHECK_STR_CONTAINS(out, ";DNS=Alice.Clients.Example.ORG");
  for (const unsigned char *p = (const unsigned char *)out; *p; p++)
    CHECK(*p >= 0x20 && *p < 0x7f);
  X509_free(x);
  CHECK(sg_identity_xfcc(NULL, out, sizeof out) == -1);
}

/* ---- header sanitizer --------------------------------------------------- */

static sg_identity_header_action classify(const char *name,
                                          const sg_identity_header_names *own) {
  return sg_identity_header_classify((const uint8_t *)name, strlen(name), own);
}

static bool spoofable(const char *name, const sg_identity_header_names *own) {
  return sg_identity_header_is_spoofable((const uint8_t *)name, strlen(name),
                                         own);
}

static bool underscore(const char *name, const sg_identity_header_names *own) {
  return sg_identity_header_has_underscore((const uint8_t *)name,
                                           strlen(name), own);
}

static void test_sanitizer(void) {
  sg_identity_header_names def;
  sg_identity_header_names_default(&def);
  CHECK(strcmp(def.identity, "x-sparkgate-identity") == 0);
  CHECK(strcmp(def.tenant, "x-sparkgate-tenant") == 0);
  CHECK(strcmp(def.auth_method, "x-sparkgate-auth-method") == 0);
  CHECK(strcmp(def.provider, "x-sparkgate-identity-provider") == 0);

  static const char *const strip[] = {
      "x-forwarded-for",
      "X-Forwarded-For",
      "x-forwarded-proto",
      "x-forwarded-host",
      "x-forwarded-client-cert",
      "X-FORWARDED-CLIENT-CERT",
      "x-forwarded-",
      "x-forwarded-anything-at-all",
      "forwarded",
      "Forwarded",
      "x-real-ip",
      "client-cert",
      "client-cert-chain",
      "x-sparkgate-identity",
      "X-SPARKGATE-IDENTITY",
      "x-sparkgate-tenant",
      "x-sparkgate-auth-method",
      "x-sparkgate-identity-provider",
  };
  for (size_t i = 0; i < sizeof strip / sizeof *strip; i++) {
    const sg_identity_header_names *owns[] = {&def, NULL};
    for (size_t j = 0; j < 2; j++) {
      CHECK(spoofable(strip[i], owns[j]));
      CHECK(!underscore(strip[i], owns[j]));
      CHECK(classify(strip[i], owns[j]) == SG_IDENTITY_HEADER_STRIP);
    }
  }

  static const char *const reject[] = {
      "x_forwarded_for", "X_Forwarded_For",        "x-forwarded_for",
      "x_forwarded-for", "x-sparkgate_identity",   "X_SPARKGATE_IDENTITY",
      "x_real_ip",       "client_cert",            "client-cert_chain",
      "x_forwarded_client_cert", "x-sparkgate-identity_provider",
  };
  for (size_t i = 0; i < sizeof reject / sizeof *reject; i++) {
    CHECK(spoofable(reject[i], &def));
    CHECK(underscore(reject[i], &def));
    CHECK(classify(reject[i], &def) == SG_IDENTITY_HEADER_REJECT);
  }

  static const char *const pass[] = {
      "x-spark-tenant", /* the tenant selector: the client's to send */
      "authorization",
      "content-type",
      "te",
      "grpc-timeout",
      "user-agent",
      "x-custom_header", /* underscore, but aliases nothing of ours */
      "x-forwarded",     /* not the x-forwarded- family */
      "xforwarded-for",
      "forwarded-for",
      "forwardedx",
      "x-real-ip2",
      "client-certs",
      "client-cert-chain-x",
      "x-sparkgate-identityx",
      "x-sparkgate-identit",
      "x-sparkgate",
      "x-sparkgate-other",
      ":authority",
      "x",
  };
  for (size_t i = 0; i < sizeof pass / sizeof *pass; i++) {
    CHECK(!spoofable(pass[i], &def));
    CHECK(!underscore(pass[i], &def));
    CHECK(classify(pass[i], &def) == SG_IDENTITY_HEADER_PASS);
  }
  CHECK(!sg_identity_header_is_spoofable((const uint8_t *)"", 0, &def));
  CHECK(!sg_identity_header_is_spoofable(NULL, 0, &def));
  /* Length-delimited: a NUL or extra bytes after a spoofable prefix do not
   * match, and only len bytes are read. */
  CHECK(!sg_identity_header_is_spoofable((const uint8_t *)"x-real-ip\0x", 11,
                                         &def));
  CHECK(sg_identity_header_is_spoofable((const uint8_t *)"x-real-ipXYZ", 9,
                                        &def));

  /* Renamed headers: the new names and the defaults are all spoofable. */
  sg_identity_header_names own = def;
  strcpy(own.identity, "x-user");
  strcpy(own.tenant, "x-org");
  CHECK(classify("x-user", &own) == SG_IDENTITY_HEADER_STRIP);
  CHECK(classify("X-User", &own) == SG_IDENTITY_HEADER_STRIP);
  CHECK(classify("x_user", &own) == SG_IDENTITY_HEADER_REJECT);
  CHECK(classify("x-org", &own) == SG_IDENTITY_HEADER_STRIP);
  CHECK(classify("x-sparkgate-identity", &own) == SG_IDENTITY_HEADER_STRIP);
  CHECK(classify("x-sparkgate-tenant", &own) == SG_IDENTITY_HEADER_STRIP);
  CHECK(classify("x-user", &def) == SG_IDENTITY_HEADER_PASS);
  CHECK(classify("x-user", NULL) == SG_IDENTITY_HEADER_PASS);
  CHECK(classify("x-spark-tenant", &own) == SG_IDENTITY_HEADER_PASS);
}

/* ---- JSON parsers --------------------------------------------------------- */

typedef struct reports {
  int count;
  char text[8192];
} reports;

static void collect(void *ctx, const char *path, const char *msg) {
  reports *r = ctx;
  size_t l = strlen(r->text);
  snprintf(r->text + l, sizeof r->text - l, "\n%s: %s", path, msg);
  r->count++;
}

static json_t *parse_json(const char *text) {
  json_error_t err;
  json_t *j = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
  if (j == NULL) {
    fprintf(stderr, "bad test JSON %s: %s\n", text, err.text);
    exit(2);
  }
  return j;
}

/* Parses text as a listener auth object; returns the parser's result. */
static int auth_parse(const char *text, sg_listener_auth *out, reports *r) {
  memset(r, 0, sizeof *r);
  json_t *j = text != NULL ? parse_json(text) : NULL;
  int rv = sg_listener_auth_parse(j, "listeners[0].auth", out, collect, r);
  json_decref(j);
  return rv;
}

static void auth_error(const char *text, const char *path_and_msg) {
  sg_listener_auth a;
  reports r;
  CHECK(auth_parse(text, &a, &r) == -1);
  CHECK(r.count >= 1);
  CHECK_STR_CONTAINS(r.text, path_and_msg);
}

static void test_listener_auth_parse(void) {
  sg_listener_auth a;
  reports r;

  CHECK(auth_parse(NULL, &a, &r) == 0 && r.count == 0);
  CHECK(a.methods == SG_LISTENER_AUTH_JWT);
  CHECK(a.require == SG_LISTENER_AUTH_REQUIRE_ANY);
  CHECK(a.client_identity == SG_CERT_IDENTITY_URI_SAN);
  CHECK(!a.bind_token_to_certificate);

  CHECK(auth_parse("{}", &a, &r) == 0 && r.count == 0);
  CHECK(a.methods == SG_LISTENER_AUTH_JWT);

  CHECK(auth_parse("{\"methods\": [\"jwt\", \"mtls\"], \"require\": \"all\", "
                   "\"client_identity\": \"cn\", "
                   "\"bind_token_to_certificate\": true}",
                   &a, &r) == 0);
  CHECK(r.count == 0);
  CHECK(a.methods == (SG_LISTENER_AUTH_JWT | SG_LISTENER_AUTH_MTLS));
  CHECK(a.require == SG_LISTENER_AUTH_REQUIRE_ALL);
  CHECK(a.client_identity == SG_CERT_IDENTITY_CN);
  CHECK(a.bind_token_to_certificate);

  CHECK(auth_parse("{\"methods\": [\"mtls\"], \"client_identity\": "
                   "\"dns_san\"}",
                   &a, &r) == 0);
  CHECK(a.methods == SG_LISTENER_AUTH_MTLS);
  CHECK(a.client_identity == SG_CERT_IDENTITY_DNS_SAN);
  CHECK(auth_parse("{\"methods\": [\"mtls\", \"jwt\"], \"require\": \"any\","
                   " \"bind_token_to_certificate\": false}",
                   &a, &r) == 0);
  CHECK(a.methods == (SG_LISTENER_AUTH_JWT | SG_LISTENER_AUTH_MTLS));
  CHECK(a.client_identity == SG_CERT_IDENTITY_URI_SAN);

  auth_error("[]", "\nlisteners[0].auth: must be an object");
  auth_error("null", "\nlisteners[0].auth: must be an object");
  auth_error("{\"methods\": \"jwt\"}",
             "\nlisteners[0].auth.methods: must be a non-empty array");
  auth_error("{\"methods\": []}",
             "\nlisteners[0].auth.methods: must be a non-empty array");
  auth_error("{\"methods\": [\"jwt\", \"saml\"]}",
             "\nlisteners[0].auth.methods[1]: unknown method \"saml\"");
  auth_error("{\"methods\": [\"JWT\"]}",
             "\nlisteners[0].auth.methods[0]: unknown method \"JWT\"");
  auth_error("{\"methods\": [1]}",
             "\nlisteners[0].auth.methods[0]: must be the string");
  auth_error("{\"methods\": [\"mtls\", \"mtls\"]}",
             "\nlisteners[0].auth.methods[1]: \"mtls\" is listed twice");
  auth_error("{\"require\": \"some\"}",
             "\nlisteners[0].auth.require: unknown value \"some\"; use "
             "\"any\" or \"all\"");
  auth_error("{\"require\": true}",
             "\nlisteners[0].auth.require: must be a string");
  auth_error("{\"methods\": [\"mtls\"], \"client_identity\": \"CN\"}",
             "\nlisteners[0].auth.client_identity: unknown value \"CN\"; "
             "use \"uri_san\", \"dns_san\" or \"cn\"");
  auth_error("{\"methods\": [\"jwt\", \"mtls\"], "
             "\"bind_token_to_certificate\": \"yes\"}",
             "\nlisteners[0].auth.bind_token_to_certificate: must be true or "
             "false");
  auth_error("{\"method\": [\"jwt\"]}",
             "\nlisteners[0].auth.method: unknown key");
  /* Settings that cannot take effect. */
  auth_error("{\"require\": \"all\"}",
             "\nlisteners[0].auth.require: \"all\" needs both methods");
  auth_error("{\"methods\": [\"mtls\"], \"require\": \"all\"}",
             "\nlisteners[0].auth.require: \"all\" needs both methods");
  auth_error("{\"bind_token_to_certificate\": true}",
             "\nlisteners[0].auth.bind_token_to_certificate: needs both "
             "methods");
  auth_error("{\"methods\": [\"mtls\"], \"bind_token_to_certificate\": true}",
             "\nlisteners[0].auth.bind_token_to_certificate: needs both");
  /* "cn" is never implied, and needs mtls. */
  auth_error("{\"client_identity\": \"cn\"}",
             "\nlisteners[0].auth.client_identity: only applies with \"mtls\"");

  /* All problems are reported in one pass; a bad value leaves the
   * default. */
  CHECK(auth_parse("{\"methods\": [\"x\"], \"require\": \"x\", "
                   "\"client_identity\": 3, \"extra\": 1, "
                   "\"bind_token_to_certificate\": 0}",
                   &a, &r) == -1);
  CHECK(r.count == 5);
  CHECK_STR_CONTAINS(r.text, "\nlisteners[0].auth.methods[0]: ");
  CHECK_STR_CONTAINS(r.text, "\nlisteners[0].auth.require: ");
  CHECK_STR_CONTAINS(r.text, "\nlisteners[0].auth.client_identity: ");
  CHECK_STR_CONTAINS(r.text, "\nlisteners[0].auth.extra: ");
  CHECK_STR_CONTAINS(r.text, "\nlisteners[0].auth.bind_token_to_certificate: ");
  CHECK(a.methods == SG_LISTENER_AUTH_JWT);
  CHECK(a.require == SG_LISTENER_AUTH_REQUIRE_ANY);

  /* No callback: still counted as failure. */
  json_t *j = parse_json("{\"nope\": 1}");
  CHECK(sg_listener_auth_parse(j, "a", &a, NULL, NULL) == -1);
  json_decref(j);
}

static int headers_parse(const char *text, sg_identity_header_names *out,
                         reports *r) {
  memset(r, 0, sizeof *r);
  json_t *j = text != NULL ? parse_json(text) : NULL;
  int rv = sg_identity_headers_parse(j, "identity_headers", out, collect, r);
  json_decref(j);
  return rv;
}

static void header_error(const char *text, const char *path_and_msg) {
  sg_identity_header_names h;
  reports r;
  CHECK(headers_parse(text, &h, &r) == -1);
  CHECK(r.count == 1);
  CHECK_STR_CONTAINS(r.text, path_and_msg);
}

static void test_identity_headers_parse(void) {
  sg_identity_header_names h;
  reports r;
  CHECK(headers_parse(NULL, &h, &r) == 0 && r.count == 0);
  CHECK(strcmp(h.identity, SG_IDENTITY_HEADER_IDENTITY_DEFAULT) == 0);
  CHECK(strcmp(h.provider, SG_IDENTITY_HEADER_PROVIDER_DEFAULT) == 0);
  CHECK(headers_parse("{}", &h, &r) == 0 && r.count == 0);
  CHECK(strcmp(h.tenant, SG_IDENTITY_HEADER_TENANT_DEFAULT) == 0);

  CHECK(headers_parse("{\"identity\": \"x-user\", \"tenant\": \"x-org\", "
                      "\"auth_method\": \"x-auth.method\", "
                      "\"provider\": \"x-idp~1\"}",
                      &h, &r) == 0);
  CHECK(r.count == 0);
  CHECK(strcmp(h.identity, "x-user") == 0);
  CHECK(strcmp(h.tenant, "x-org") == 0);
  CHECK(strcmp(h.auth_method, "x-auth.method") == 0);
  CHECK(strcmp(h.provider, "x-idp~1") == 0);
  CHECK(headers_parse("{\"tenant\": \"x-org\"}", &h, &r) == 0);
  CHECK(strcmp(h.identity, SG_IDENTITY_HEADER_IDENTITY_DEFAULT) == 0);
  CHECK(strcmp(h.tenant, "x-org") == 0);

  /* 64 characters fit, 65 do not. */
  char text[256];
  snprintf(text, sizeof text, "{\"identity\": \"x-%062d\"}", 0);
  CHECK(headers_parse(text, &h, &r) == 0);
  CHECK(strlen(h.identity) == 64);
  snprintf(text, sizeof text, "{\"identity\": \"x-%063d\"}", 0);
  header_error(text, "\nidentity_headers.identity: ");

  header_error("[]", "\nidentity_headers: must be an object");
  header_error("{\"user\": \"x-user\"}",
               "\nidentity_headers.user: unknown key");
  header_error("{\"identity\": 1}",
               "\nidentity_headers.identity: must be a string");
  header_error("{\"identity\": \"\"}",
               "\nidentity_headers.identity: \"\" must be 1 to 64");
  header_error("{\"identity\": \"X-User\"}",
               "\nidentity_headers.identity: \"X-User\" must hold only "
               "lowercase");
  header_error("{\"tenant\": \"x_org\"}",
               "\nidentity_headers.tenant: \"x_org\" must not contain \"_\"");
  header_error("{\"tenant\": \"x org\"}",
               "\nidentity_headers.tenant: \"x org\" must hold only");
  header_error("{\"tenant\": \"x:org\"}",
               "\nidentity_headers.tenant: \"x:org\" must hold only");
  header_error("{\"identity\": \":authority\"}",
               "\nidentity_headers.identity: \":authority\" is a "
               "pseudo-header");
  header_error("{\"identity\": \"x-u\\u0000ser\"}",
               "\nidentity_headers.identity: ");
  static const char *const hop[] = {"connection", "keep-alive",
                                    "proxy-connection", "transfer-encoding",
                                    "upgrade", "te", "trailer",
                                    "proxy-authenticate",
                                    "proxy-authorization"};
  for (size_t i = 0; i < sizeof hop / sizeof *hop; i++) {
    snprintf(text, sizeof text, "{\"provider\": \"%s\"}", hop[i]);
    header_error(text, "is a hop-by-hop header");
  }
  header_error("{\"identity\": \"authorization\"}",
               "\nidentity_headers.identity: \"authorization\" is a standard "
               "header");
  header_error("{\"identity\": \"content-type\"}", "is a standard header");
  header_error("{\"identity\": \"host\"}", "is a standard header");
  header_error("{\"identity\": \"forwarded\"}", "is a standard header");
  header_error("{\"identity\": \"x-real-ip\"}", "is a standard header");
  header_error("{\"identity\": \"client-cert\"}", "is a standard header");
  header_error("{\"identity\": \"grpc-user\"}", "reserved by gRPC");
  header_error("{\"identity\": \"x-forwarded-user\"}", "x-forwarded-* names");
  header_error("{\"identity\": \"x-forwarded-client-cert\"}",
               "x-forwarded-* names");
  header_error("{\"tenant\": \"x-sparkgate-identity\"}",
               "\nidentity_headers.tenant: \"x-sparkgate-identity\" is also "
               "the identity header");
  header_error("{\"identity\": \"x-a\", \"provider\": \"x-a\"}",
               "\nidentity_headers.provider: \"x-a\" is also the identity "
               "header");
}

/* ---- the decision ------------------------------------------------------ */

#define TOKEN_ID "tok-alice"
#define CERT_ID ALICE_SPIFFE
#define OTHER_X5T "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

/* Token inputs: N none, I invalid, U valid unbound, M valid with a cnf
 * equal to the certificate's thumbprint, X valid with another cnf. */
static sg_identity_jwt_input jwt_input(char k) {
  sg_identity_jwt_input j = {0};
  switch (k) {
  case 'N':
    break;
  case 'I':
    j.state = SG_IDENTITY_JWT_INVALID;
    j.reason = "expired";
    break;
  case 'U':
  case 'M':
  case 'X':
    j.state = SG_IDENTITY_JWT_VALID;
    j.identity = TOKEN_ID;
    j.provider = "corp";
    j.cnf_x5t_s256 = k == 'U' ? NULL : k == 'M' ? ALICE_X5T : OTHER_X5T;
    break;
  }
  return j;
}

/* Certificate inputs: 0 none, C verified with identity, c verified
 * without. */
static sg_identity_cert_input cert_input(char k) {
  sg_identity_cert_input c = {0};
  if (k == 'C' || k == 'c') {
    c.state = SG_IDENTITY_CERT_VERIFIED;
    c.thumbprint = ALICE_X5T;
    c.identity = k == 'C' ? CERT_ID : NULL;
    c.identity_reason = k == 'C' ? NULL : "no_uri_san";
  }
  return c;
}

/* Outcomes: J allow jwt, B allow jwt+mtls (token identity), T allow mtls
 * (certificate identity); denials n no_credentials, i jwt_invalid,
 * q jwt_required, r cert_required, d no_cert_identity, u token_not_bound,
 * k bound_token_no_cert, m token_cert_mismatch. */
typedef struct policy_row {
  unsigned methods;
  sg_listener_auth_require require;
  bool bind;
  /* For tokens N I U M X, outcomes with certificates 0 C c. */
  const char *outcomes[5];
} policy_row;

#define JWT SG_LISTENER_AUTH_JWT
#define MTLS SG_LISTENER_AUTH_MTLS
#define ANY SG_LISTENER_AUTH_REQUIRE_ANY
#define ALL SG_LISTENER_AUTH_REQUIRE_ALL

static const policy_row decision_table[] = {
    /* jwt only: a certificate is never an identity, but still checks a
     * bound token. */
    {JWT, ANY, false, {"nnn", "iii", "JJJ", "kBB", "kmm"}},
    /* mtls only: tokens are not looked at, even broken ones. */
    {MTLS, ANY, false, {"nTd", "nTd", "nTd", "nTd", "nTd"}},
    /* either: a valid token wins, a broken one never falls back. */
    {JWT | MTLS, ANY, false, {"nTd", "iii", "JJJ", "kBB", "kmm"}},
    {JWT | MTLS, ANY, true, {"nTd", "iii", "uuu", "kBB", "kmm"}},
    /* both. */
    {JWT | MTLS, ALL, false, {"nqq", "iii", "rBd", "kBd", "kmm"}},
    {JWT | MTLS, ALL, true, {"nqq", "iii", "uuu", "kBd", "kmm"}},
};

static sg_identity_deny deny_for(char o) {
  switch (o) {
  case 'n':
    return SG_IDENTITY_DENY_NO_CREDENTIALS;
  case 'i':
    return SG_IDENTITY_DENY_JWT_INVALID;
  case 'q':
    return SG_IDENTITY_DENY_JWT_REQUIRED;
  case 'r':
    return SG_IDENTITY_DENY_CERT_REQUIRED;
  case 'd':
    return SG_IDENTITY_DENY_NO_CERT_IDENTITY;
  case 'u':
    return SG_IDENTITY_DENY_TOKEN_NOT_BOUND;
  case 'k':
    return SG_IDENTITY_DENY_BOUND_TOKEN_NO_CERT;
  case 'm':
    return SG_IDENTITY_DENY_TOKEN_CERT_MISMATCH;
  }
  return SG_IDENTITY_DENY_NONE;
}

static void test_decision_table(void) {
  static const char tokens[] = "NIUMX";
  static const char certs[] = "0Cc";
  int cases = 0;
  for (size_t p = 0; p < sizeof decision_table / sizeof *decision_table;
       p++) {
    const policy_row *row = &decision_table[p];
    sg_listener_auth pol = {.methods = row->methods,
                            .require = row->require,
                            .client_identity = SG_CERT_IDENTITY_URI_SAN,
                            .bind_token_to_certificate = row->bind};
    for (size_t t = 0; t < 5; t++) {
      for (size_t c = 0; c < 3; c++) {
        sg_identity_jwt_input j = jwt_input(tokens[t]);
        sg_identity_cert_input ce = cert_input(certs[c]);
        sg_identity_decision d;
        memset(&d, 0xA5, sizeof d);
        bool allowed = sg_identity_decide(&pol, &j, &ce, &d);
        char want = row->outcomes[t][c];
        bool ok = allowed == d.allow;
        if (want == 'J' || want == 'B' || want == 'T') {
          ok = ok && d.allow && d.deny == SG_IDENTITY_DENY_NONE &&
               strcmp(d.reason, "none") == 0 && d.detail == NULL;
          const char *want_method = want == 'J'   ? SG_IDENTITY_METHOD_JWT
                                    : want == 'B' ? SG_IDENTITY_METHOD_JWT_MTLS
                                                  : SG_IDENTITY_METHOD_MTLS;
          ok = ok && d.method != NULL && strcmp(d.method, want_method) == 0;
          if (want == 'T')
            ok = ok && d.identity != NULL &&
                 strcmp(d.identity, CERT_ID) == 0 && d.provider == NULL;
          else
            ok = ok && d.identity != NULL &&
                 strcmp(d.identity, TOKEN_ID) == 0 && d.provider != NULL &&
                 strcmp(d.provider, "corp") == 0;
        } else {
          sg_identity_deny want_deny = deny_for(want);
          ok = ok && !d.allow && d.deny == want_deny &&
               d.identity == NULL && d.method == NULL &&
               strcmp(d.reason, sg_identity_deny_name(want_deny)) == 0;
          if (want == 'i')
            ok = ok && d.detail != NULL && strcmp(d.detail, "expired") == 0;
          else if (want == 'd')
            ok = ok && d.detail != NULL &&
                 strcmp(d.detail, "no_uri_san") == 0;
          else
            ok = ok && d.detail == NULL;
        }
        CHECK(ok);
        if (!ok)
          fprintf(stderr,
                  "  policy %zu token %c cert %c: want %c, got allow=%d "
                  "reason=%s method=%s identity=%s\n",
                  p, tokens[t], certs[c], want, d.allow,
                  d.allow ? "-" : d.reason, d.allow ? d.method : "-",
                  d.allow ? d.identity : "-");
        cases++;
      }
    }
  }
  CHECK(cases == 90);
}

static void test_decision_edges(void) {
  sg_listener_auth pol;
  sg_listener_auth_default(&pol);
  sg_identity_decision d;

  /* NULL inputs are "nothing presented". */
  CHECK(!sg_identity_decide(&pol, NULL, NULL, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_NO_CREDENTIALS);
  CHECK(strcmp(d.reason, "no_credentials") == 0);
  CHECK(!sg_identity_decide(NULL, NULL, NULL, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_INTERNAL);
  CHECK(!sg_identity_decide(NULL, NULL, NULL, NULL));

  sg_identity_jwt_input j = jwt_input('U');
  CHECK(sg_identity_decide(&pol, &j, NULL, &d));
  CHECK(strcmp(d.identity, TOKEN_ID) == 0);
  CHECK(strcmp(d.method, "jwt") == 0);

  /* A "valid" token without identity is a caller bug: deny. */
  j.identity = "";
  CHECK(!sg_identity_decide(&pol, &j, NULL, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_INTERNAL);
  j.identity = NULL;
  CHECK(!sg_identity_decide(&pol, &j, NULL, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_INTERNAL);
  j = jwt_input('U');
  j.state = (sg_identity_jwt_state)7;
  CHECK(!sg_identity_decide(&pol, &j, NULL, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_INTERNAL);

  /* A bound token against a certificate whose thumbprint is unknown. */
  j = jwt_input('M');
  sg_identity_cert_input c = cert_input('C');
  c.thumbprint = NULL;
  CHECK(!sg_identity_decide(&pol, &j, &c, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_TOKEN_CERT_MISMATCH);
  /* Comparison is exact: padding or case differences do not match. */
  c = cert_input('C');
  j.cnf_x5t_s256 = ALICE_X5T "=";
  CHECK(!sg_identity_decide(&pol, &j, &c, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_TOKEN_CERT_MISMATCH);

  /* An empty certificate identity counts as none. */
  pol.methods = SG_LISTENER_AUTH_MTLS;
  c.identity = "";
  c.identity_reason = "bad_chars";
  CHECK(!sg_identity_decide(&pol, NULL, &c, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_NO_CERT_IDENTITY);
  CHECK(strcmp(d.detail, "bad_chars") == 0);

  /* Combinations the parser refuses still decide safely. */
  pol.methods = SG_LISTENER_AUTH_JWT;
  pol.require = SG_LISTENER_AUTH_REQUIRE_ALL;
  j = jwt_input('U');
  c = cert_input('C');
  CHECK(!sg_identity_decide(&pol, &j, &c, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_CERT_REQUIRED);
  pol.require = SG_LISTENER_AUTH_REQUIRE_ANY;
  pol.bind_token_to_certificate = true;
  CHECK(!sg_identity_decide(&pol, &j, &c, &d));
  CHECK(d.deny == SG_IDENTITY_DENY_TOKEN_NOT_BOUND);

  /* With the real certificate and its computed thumbprint. */
  X509 *x = load_cert("alice.pem");
  char id[SG_IDENTITY_MAX_BYTES + 1], x5t[SG_IDENTITY_THUMBPRINT_LEN + 1];
  const char *why = NULL;
  CHECK(sg_identity_from_cert(x, SG_CERT_IDENTITY_URI_SAN, id, sizeof id,
                              &why) == 0);
  CHECK(sg_identity_cert_thumbprint(x, x5t, sizeof x5t) == 0);
  X509_free(x);
  sg_listener_auth both = {.methods = JWT | MTLS,
                           .require = ALL,
                           .client_identity = SG_CERT_IDENTITY_URI_SAN,
                           .bind_token_to_certificate = true};
  c = (sg_identity_cert_input){.state = SG_IDENTITY_CERT_VERIFIED,
                               .identity = id,
                               .thumbprint = x5t};
  j = jwt_input('M');
  CHECK(sg_identity_decide(&both, &j, &c, &d));
  CHECK(strcmp(d.method, "jwt+mtls") == 0);
  CHECK(strcmp(d.identity, TOKEN_ID) == 0);
  j.cnf_x5t_s256 = TWO_URI_X5T;
  CHECK(!sg_identity_decide(&both, &j, &c, &d));
  CHECK(strcmp(d.reason, "token_cert_mismatch") == 0);
}

static void test_deny_names(void) {
  static const char *const names[] = {
      "none",          "no_credentials",      "jwt_invalid",
      "jwt_required",  "cert_required",       "no_cert_identity",
      "token_not_bound", "bound_token_no_cert", "token_cert_mismatch",
      "internal"};
  CHECK(sizeof names / sizeof *names == SG_IDENTITY_DENY_COUNT);
  for (int i = 0; i < SG_IDENTITY_DENY_COUNT; i++)
    CHECK(strcmp(sg_identity_deny_name((sg_identity_deny)i), names[i]) == 0);
  CHECK(strcmp(sg_identity_deny_name(SG_IDENTITY_DENY_COUNT), "unknown") ==
        0);
  CHECK(strcmp(sg_identity_deny_name((sg_identity_deny)-1), "unknown") == 0);
}

int main(void) {
  test_cert_modes();
  test_mode_names();
  test_spiffe_ids();
  test_thumbprint();
  test_xfcc();
  test_sanitizer();
  test_listener_auth_parse();
  test_identity_headers_parse();
  test_decision_table();
  test_decision_edges();
  test_deny_names();
  return check_report("test_identity");
}
