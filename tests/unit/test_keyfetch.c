/* Unit tests for the pieces of src/keyfetch.c that need no network: URL
 * checks, Cache-Control, refresh delays, discovery documents, content
 * types, TLS contexts; and a fetcher set driven by configuration changes
 * on an event base that never runs (no fetch happens). The fetches
 * themselves are tested end to end in tests/integration/test_jwks_fetch.py. */
#include "check.h"
#include "sparkgate/jwt.h"
#include "sparkgate/keyfetch.h"

#include <event2/event.h>
#include <event2/thread.h>
#include <jansson.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SG_SOURCE_ROOT
#define SG_SOURCE_ROOT "."
#endif
#define FIX SG_SOURCE_ROOT "/tests/fixtures"

static void test_urls(void) {
  char err[256];
  static const char *const good[] = {
      "https://idp.example/jwks", "https://idp.example",
      "HTTPS://idp.example:8443/a/b?x=1", "https://[::1]:9443/keys",
      "https://127.0.0.1:1/x"};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    int rc = sg_keyfetch_check_url(good[i], err, sizeof err);
    if (rc != 0)
      fprintf(stderr, "%s:%d: %s refused: %s\n", __FILE__, __LINE__, good[i],
              err);
    CHECK(rc == 0);
  }
  struct {
    const char *url, *want;
  } bad[] = {
      {"http://idp.example/jwks", "is not an https:// URL"},
      {"ftp://idp.example/jwks", "is not an https:// URL"},
      {"//idp.example/jwks", "is not an https:// URL"},
      {"idp.example", "is not an https:// URL"},
      {"https:///jwks", "has no host"},
      {"https://user:pw@idp.example/", "user information"},
      {"https://idp.example/#frag", "#fragment"},
      {"https://idp.example:0/", "port 0"},
      {"https://idp.example:99999/", "not a valid URL"},
      {"https://idp example/", "not a valid URL"},
      {"", "is not an https:// URL"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    err[0] = '\0';
    CHECK(sg_keyfetch_check_url(bad[i].url, err, sizeof err) == -1);
    CHECK_STR_CONTAINS(err, bad[i].want);
  }
}

static void test_max_age(void) {
  CHECK(sg_keyfetch_max_age(NULL) == -1);
  CHECK(sg_keyfetch_max_age("") == -1);
  CHECK(sg_keyfetch_max_age("public") == -1);
  CHECK(sg_keyfetch_max_age("max-age=300") == 300);
  CHECK(sg_keyfetch_max_age("public, max-age=3600, must-revalidate") == 3600);
  CHECK(sg_keyfetch_max_age("Max-Age=12") == 12);
  CHECK(sg_keyfetch_max_age("max-age = 7") == 7);
  CHECK(sg_keyfetch_max_age("max-age=\"60\"") == 60);
  CHECK(sg_keyfetch_max_age("max-age=0") == 0);
  CHECK(sg_keyfetch_max_age("no-cache") == 0);
  CHECK(sg_keyfetch_max_age("max-age=600, no-store") == 0);
  CHECK(sg_keyfetch_max_age("NO-CACHE=\"set-cookie\"") == 0);
  CHECK(sg_keyfetch_max_age("max-age=abc") == -1);
  CHECK(sg_keyfetch_max_age("max-age=-5") == -1);
  CHECK(sg_keyfetch_max_age("max-age=") == -1);
  CHECK(sg_keyfetch_max_age("s-maxage=50") == -1);
  CHECK(sg_keyfetch_max_age("x-max-age=50") == -1);
  /* "max-age" inside another directive's quoted value does not count. */
  CHECK(sg_keyfetch_max_age("private=\"max-age=5, x\", max-age=9") == 9);
  CHECK(sg_keyfetch_max_age("max-age=99999999999999999999999") > 0);
  /* The first max-age wins. */
  CHECK(sg_keyfetch_max_age("max-age=5, max-age=6") == 5);
}

static void test_refresh_delay(void) {
  CHECK(sg_keyfetch_refresh_delay(-1, 60, 600) == 600);
  CHECK(sg_keyfetch_refresh_delay(0, 60, 600) == 60);
  CHECK(sg_keyfetch_refresh_delay(30, 60, 600) == 60);
  CHECK(sg_keyfetch_refresh_delay(300, 60, 600) == 300);
  CHECK(sg_keyfetch_refresh_delay(86400, 60, 600) == 600);
  CHECK(sg_keyfetch_refresh_delay(5, 1, 1) == 1);
}

static void test_discovery(void) {
  char *u = sg_keyfetch_discovery_url("https://idp.example/realms/a");
  CHECK(u && strcmp(u, "https://idp.example/realms/a/.well-known/"
                       "openid-configuration") == 0);
  free(u);
  u = sg_keyfetch_discovery_url("https://idp.example/");
  CHECK(u && strcmp(u, "https://idp.example/.well-known/openid-configuration") == 0);
  free(u);

  const char *iss = "https://idp.example/realms/a";
  char err[512];
  char *jwks = NULL;
  const char *ok = "{\"issuer\":\"https://idp.example/realms/a\","
                   "\"jwks_uri\":\"https://keys.example/certs\","
                   "\"token_endpoint\":\"https://idp.example/t\"}";
  CHECK(sg_keyfetch_parse_discovery(ok, strlen(ok), iss, &jwks, err, sizeof err) == 0);
  CHECK(jwks && strcmp(jwks, "https://keys.example/certs") == 0);
  free(jwks);
  struct {
    const char *doc, *want;
  } bad[] = {
      {"{\"issuer\":\"https://idp.example/realms/a/\",\"jwks_uri\":"
       "\"https://k/c\"}",
       "is not the configured issuer"},
      {"{\"issuer\":\"https://IDP.example/realms/a\",\"jwks_uri\":"
       "\"https://k/c\"}",
       "is not the configured issuer"},
      {"{\"jwks_uri\":\"https://k/c\"}", "no \"issuer\" string"},
      {"{\"issuer\":\"https://idp.example/realms/a\"}", "no \"jwks_uri\" string"},
      {"{\"issuer\":\"https://idp.example/realms/a\",\"jwks_uri\":"
       "\"http://k/c\"}",
       "jwks_uri: \"http://k/c\" is not an https:// URL"},
      {"{\"issuer\":\"https://idp.example/realms/a\",\"jwks_uri\":7}",
       "no \"jwks_uri\" string"},
      {"{\"issuer\":\"x\",\"issuer\":\"https://idp.example/realms/a\","
       "\"jwks_uri\":\"https://k/c\"}",
       "not valid JSON"},
      {"[1]", "not a JSON object"},
      {"<html>", "not valid JSON"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    err[0] = '\0';
    jwks = NULL;
    CHECK(sg_keyfetch_parse_discovery(bad[i].doc, strlen(bad[i].doc), iss,
                                      &jwks, err, sizeof err) == -1);
    CHECK(jwks == NULL);
    CHECK_STR_CONTAINS(err, bad[i].want);
  }
  /* An embedded NUL in the issuer is not equality. */
  static const char nul[] = "{\"issuer\":\"https://idp.example/realms/a\\u0000x\","
                            "\"jwks_uri\":\"https://k/c\"}";
  CHECK(sg_keyfetch_parse_discovery(nul, sizeof nul - 1, iss, &jwks, err,
                                    sizeof err) == -1);
}

static void test_content_types(void) {
  CHECK(sg_keyfetch_json_content_type("application/json"));
  CHECK(sg_keyfetch_json_content_type("application/json; charset=utf-8"));
  CHECK(sg_keyfetch_json_content_type("Application/JSON"));
  CHECK(sg_keyfetch_json_content_type("application/jwk-set+json"));
  CHECK(sg_keyfetch_json_content_type(" application/jwk-set+json;charset=UTF-8"));
  CHECK(!sg_keyfetch_json_content_type(NULL));
  CHECK(!sg_keyfetch_json_content_type(""));
  CHECK(!sg_keyfetch_json_content_type("text/html"));
  CHECK(!sg_keyfetch_json_content_type("text/json"));
  CHECK(!sg_keyfetch_json_content_type("application/jsonp"));
  CHECK(!sg_keyfetch_json_content_type("application/+json"));
  CHECK(!sg_keyfetch_json_content_type("application/octet-stream"));
}

static void test_tls_ctx(void) {
  char err[512];
  SSL_CTX *c = sg_keyfetch_tls_ctx_new(NULL, err, sizeof err);
  CHECK(c != NULL);
  if (c != NULL) {
    CHECK(SSL_CTX_get_verify_mode(c) == SSL_VERIFY_PEER);
    CHECK(SSL_CTX_get_min_proto_version(c) == TLS1_2_VERSION);
  }
  SSL_CTX_free(c);
  c = sg_keyfetch_tls_ctx_new(FIX "/jwt/ec256.crt", err, sizeof err);
  CHECK(c != NULL);
  SSL_CTX_free(c);
  err[0] = '\0';
  CHECK(sg_keyfetch_tls_ctx_new(FIX "/nope.pem", err, sizeof err) == NULL);
  CHECK_STR_CONTAINS(err, "cannot load CA certificates from");
  err[0] = '\0';
  /* A file without a certificate. */
  CHECK(sg_keyfetch_tls_ctx_new(FIX "/jwt/hmac.key", err, sizeof err) == NULL);
  CHECK_STR_CONTAINS(err, "hmac.key");
}

static sg_jwt_verifier *load(const char *text) {
  json_t *j = json_loads(text, 0, NULL);
  sg_jwt_verifier *v = NULL;
  if (j == NULL || sg_jwt_providers_load(j, FIX "/jwt", "p", NULL, &v, NULL,
                                         NULL) != 0)
    v = NULL;
  json_decref(j);
  return v;
}

static int changes;
static void on_change(void *arg) {
  (void)arg;
  changes++;
}

/* Fetchers follow the configuration: kept for adopted key sources, made
 * for new ones, stopped for dropped ones. The base never runs, so nothing
 * is fetched; freeing with requests scheduled must be clean (ASan). */
static void test_fetcher_set(void) {
  struct event_base *base = event_base_new();
  sg_keyfetch *kf = sg_keyfetch_new(base, on_change, NULL);
  CHECK(kf != NULL);
  if (kf == NULL)
    return;
  sg_keyfetch_update(kf, NULL);
  CHECK(sg_keyfetch_count(kf) == 0);
  sg_jwt_verifier *a = load(
      "[{\"name\":\"a\",\"issuer\":\"https://a.example\",\"audiences\":[\"s\"],"
      "\"jwks_url\":\"https://127.0.0.1:9/jwks\"},"
      " {\"name\":\"b\",\"issuer\":\"https://b.example\",\"audiences\":[\"s\"],"
      "\"discovery\":true},"
      " {\"name\":\"c\",\"issuer\":\"https://c.example\",\"audiences\":[\"s\"],"
      "\"keys\":[{\"alg\":\"RS256\",\"pem_file\":\"rsa1.pub.pem\"}]}]");
  CHECK(a != NULL);
  sg_keyfetch_update(kf, a);
  CHECK(sg_keyfetch_count(kf) == 2);
  /* A worker's refetch request reaches the fetcher through the waker. */
  sg_jwt_keysource *ks = sg_jwt_verifier_keysource(a, 0);
  CHECK(sg_jwt_keysource_unknown_kid(ks, 0, sg_jwt_monotonic_ms()) ==
        SG_JWT_KEYS_TRANSIENT);
  /* Reload: "a" unchanged (adopted, same fetcher), "b" gone, "d" new. */
  sg_jwt_verifier *b = load(
      "[{\"name\":\"a\",\"issuer\":\"https://a.example\",\"audiences\":[\"s\"],"
      "\"jwks_url\":\"https://127.0.0.1:9/jwks\",\"fetch_timeout_ms\":200},"
      " {\"name\":\"d\",\"issuer\":\"https://d.example\",\"audiences\":[\"s\"],"
      "\"jwks_url\":\"https://127.0.0.1:9/d\"}]");
  CHECK(b != NULL);
  sg_jwt_verifier_adopt_keys(b, a);
  CHECK(sg_jwt_verifier_keysource(b, 0) == ks);
  sg_keyfetch_update(kf, b);
  CHECK(sg_keyfetch_count(kf) == 2);
  sg_jwt_verifier_unref(a);
  sg_keyfetch_update(kf, NULL);
  CHECK(sg_keyfetch_count(kf) == 0);
  sg_keyfetch_update(kf, b);
  CHECK(sg_keyfetch_count(kf) == 2);
  sg_keyfetch_free(kf);
  sg_jwt_verifier_unref(b);
  event_base_free(base);
  CHECK(changes == 0);
}

int main(void) {
  setvbuf(stdout, NULL, _IONBF, 0);
  evthread_use_pthreads();
  test_urls();
  test_max_age();
  test_refresh_delay();
  test_discovery();
  test_content_types();
  test_tls_ctx();
  test_fetcher_set();
  return check_report("test_keyfetch");
}
