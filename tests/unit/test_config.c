/* Config loader: every error names the file, the JSON path and the fix. */
#include <stddef.h>
#include <stdlib.h>

#include "check.h"
#include "sparkgate/config.h"

#define FIX SG_SOURCE_ROOT "/tests/fixtures/tls/"

static int load(const char *json, sg_config **cfg, sg_config_errors *errs) {
  *cfg = NULL;
  return sg_config_load_string("/etc/sparkgate/test.json", json, cfg, errs);
}

static const char *find_error(const sg_config_errors *errs, const char *needle) {
  for (size_t i = 0; i < errs->count; i++)
    if (strstr(errs->messages[i], needle) != NULL)
      return errs->messages[i];
  return NULL;
}

static void test_minimal_h2c(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  int rv = load("{\"listeners\":[{\"port\":0,\"insecure\":true,\"auth\":\"none\"}],"
                "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":15002}]}]}",
                &cfg, &errs);
  CHECK(rv == 0);
  CHECK(errs.count == 0);
  if (cfg != NULL) {
    CHECK(cfg->n_listeners == 1);
    CHECK(cfg->listeners[0].insecure);
    CHECK(strcmp(cfg->listeners[0].address, "127.0.0.1") == 0);
    CHECK(cfg->workers >= 1);
    CHECK(cfg->n_tenants == 1);
    CHECK(strcmp(cfg->tenants[0].backends[0].name, "127.0.0.1:15002") == 0);
    CHECK(cfg->tenants[0].backends[0].weight == 1);
    CHECK(!cfg->tenants[0].backends[0].tls);
    CHECK(cfg->n_allowed_path_prefixes == 1);
    CHECK(strcmp(cfg->allowed_path_prefixes[0],
                 "/spark.connect.SparkConnectService/") == 0);
    CHECK(cfg->stream_window_bytes == 1u << 20);
    CHECK(cfg->idle_trim_ms == 10000); /* docs/configuration.md */
    CHECK(strcmp(cfg->base_dir, "/etc/sparkgate") == 0);
    sg_config_unref(cfg);
  }
  sg_config_errors_clear(&errs);
}

static void test_tls_listener(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  int rv = load("{\"listeners\":[{\"name\":\"pub\",\"address\":\"::1\",\"port\":8443,"
                "\"tls\":{\"cert\":\"" FIX "server.pem\",\"key\":\"" FIX "server.key\"},\"auth\":\"none\"}],"
                "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"localhost\",\"port\":1,"
                "\"tls\":{\"ca\":\"" FIX "server.pem\"}}]}]}",
                &cfg, &errs);
  CHECK(rv == 0);
  for (size_t i = 0; i < errs.count; i++)
    fprintf(stderr, "unexpected: %s\n", errs.messages[i]);
  if (cfg != NULL) {
    CHECK(cfg->listeners[0].port == 8443);
    CHECK(!cfg->listeners[0].insecure);
    CHECK(cfg->tenants[0].backends[0].tls);
    CHECK(cfg->tenants[0].backends[0].tls_verify);
    sg_config_unref(cfg);
  }
  sg_config_errors_clear(&errs);
}

static void test_errors_name_paths(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  int rv = load("{\"listeners\":[{\"port\":8443,\"tls\":{\"cert\":\"/nonexistent/c.pem\","
                "\"key\":\"/nonexistent/k.pem\"}},{\"port\":70000,\"insecure\":true,\"bogus\":1}],"
                "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\"}]}],"
                "\"workres\":2}",
                &cfg, &errs);
  CHECK(rv == -1);
  CHECK(cfg == NULL);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].tls.cert"), "cannot read '/nonexistent/c.pem'");
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].tls.key"), "No such file");
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[1].port"), "out of range");
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[1].bogus"), "unknown key");
  CHECK_STR_CONTAINS(find_error(&errs, "workres"), "unknown key");
  CHECK_STR_CONTAINS(find_error(&errs, "tenants[0].backends[0].port"), "missing");
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0]"), "/etc/sparkgate/test.json");
  sg_config_errors_clear(&errs);
}

static void test_listener_needs_tls_or_insecure(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  CHECK(load("{\"listeners\":[{\"port\":1}],\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},"
             "\"backends\":[{\"address\":\"127.0.0.1\",\"port\":1}]}]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].tls"), "insecure");
  sg_config_errors_clear(&errs);

  CHECK(load("{\"listeners\":[{\"port\":1,\"insecure\":\"yes\"}],\"tenants\":[]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].insecure"), "true or false");
  CHECK(find_error(&errs, "tenants") != NULL);
  sg_config_errors_clear(&errs);
}

static void test_mismatched_key(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  CHECK(load("{\"listeners\":[{\"port\":1,\"tls\":{\"cert\":\"" FIX "server.pem\","
             "\"key\":\"" FIX "other.key\"}}],\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},"
             "\"backends\":[{\"address\":\"127.0.0.1\",\"port\":1}]}]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].tls"), "does not match");
  sg_config_errors_clear(&errs);
}

static void test_invalid_json_and_duplicates(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  CHECK(load("{\"listeners\": [", &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "invalid JSON"), "test.json:1:");
  sg_config_errors_clear(&errs);
  CHECK(load("{\"workers\":1,\"workers\":2}", &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "invalid JSON"), "duplicate");
  sg_config_errors_clear(&errs);
  CHECK(load("[]", &cfg, &errs) == -1);
  CHECK(find_error(&errs, "top level") != NULL);
  sg_config_errors_clear(&errs);
}

static void test_duplicates(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  CHECK(load("{\"listeners\":[{\"name\":\"a\",\"port\":5,\"insecure\":true},"
             "{\"name\":\"a\",\"port\":6,\"insecure\":true}],"
             "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":1}]},"
             "{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":1}]}]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[1]"), "duplicate listener name");
  CHECK_STR_CONTAINS(find_error(&errs, "tenants[1]"), "duplicate");
  sg_config_errors_clear(&errs);
}

static void test_auth_defaults_are_safe(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  /* No "auth" means JWT, and JWT without a provider cannot work. */
  CHECK(load("{\"listeners\":[{\"port\":0,\"insecure\":true}],"
             "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":2}]}]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].auth"), "jwt_providers");
  sg_config_errors_clear(&errs);
  CHECK(load("{\"listeners\":[{\"port\":0,\"insecure\":true,\"auth\":\"nope\"}],"
             "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":2}]}]}",
             &cfg, &errs) == -1);
  CHECK(find_error(&errs, "listeners[0].auth") != NULL);
  sg_config_errors_clear(&errs);
  CHECK(load("{\"listeners\":[{\"port\":0,\"insecure\":true,\"auth\":{\"methods\":[\"mtls\"]}}],"
             "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":2}]}]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].auth"), "client_certificates");
  sg_config_errors_clear(&errs);
}

static void test_refcount(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  CHECK(load("{\"listeners\":[{\"port\":0,\"insecure\":true,\"auth\":\"none\"}],"
             "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},\"backends\":[{\"address\":\"127.0.0.1\",\"port\":2}]}]}",
             &cfg, &errs) == 0);
  sg_config *again = sg_config_ref(cfg);
  CHECK(again == cfg);
  sg_config_unref(cfg);
  CHECK(again->n_listeners == 1); /* still alive: one reference left */
  sg_config_unref(again);
}

static void test_v4_mapped_listener_address(void) {
  sg_config *cfg;
  sg_config_errors errs = {0};
  CHECK(load("{\"listeners\":[{\"address\":\"::ffff:127.0.0.1\",\"port\":1,"
             "\"insecure\":true}],\"tenants\":[{\"name\":\"t\","
             "\"allow\":{\"any_identity\":true},"
             "\"backends\":[{\"address\":\"127.0.0.1\",\"port\":1}]}]}",
             &cfg, &errs) == -1);
  CHECK_STR_CONTAINS(find_error(&errs, "listeners[0].address"),
                     "write it as the IPv4 address 127.0.0.1");
  sg_config_errors_clear(&errs);
}

/* A top-level integer key: each case loads to its value, or is refused
 * with an error naming the key. A NULL value leaves the key out. */
typedef struct u32_case {
  const char *value;
  int rv;
  uint32_t want;
} u32_case;

static void check_u32_key(const char *key, size_t offset, const u32_case *cases, size_t n) {
  static const char fmt[] =
      "{%s\"listeners\":[{\"port\":0,\"insecure\":true,\"auth\":\"none\"}],"
      "\"tenants\":[{\"name\":\"t\",\"allow\":{\"any_identity\":true},"
      "\"backends\":[{\"address\":\"127.0.0.1\",\"port\":15002}]}]}";
  for (size_t i = 0; i < n; i++) {
    char member[96] = "", json[512];
    if (cases[i].value != NULL)
      snprintf(member, sizeof member, "\"%s\":%s,", key, cases[i].value);
    snprintf(json, sizeof json, fmt, member);
    sg_config *cfg;
    sg_config_errors errs = {0};
    CHECK(load(json, &cfg, &errs) == cases[i].rv);
    if (cases[i].rv == 0) {
      uint32_t got = 0;
      if (cfg != NULL)
        memcpy(&got, (const char *)cfg + offset, sizeof got);
      CHECK(cfg != NULL && got == cases[i].want);
    } else {
      CHECK(cfg == NULL);
      CHECK(find_error(&errs, key) != NULL);
    }
    if (cfg != NULL)
      sg_config_unref(cfg);
    sg_config_errors_clear(&errs);
  }
}

/* idle_trim_ms: 0 (never) is a value, above a day is refused by name. */
static void test_idle_trim_ms(void) {
  static const u32_case cases[] = {{"0", 0, 0},         {"1000", 0, 1000},
                                   {"86400000", 0, 86400000}, {"86400001", -1, 0},
                                   {"-1", -1, 0},       {"\"10s\"", -1, 0}};
  check_u32_key("idle_trim_ms", offsetof(sg_config, idle_trim_ms), cases,
                sizeof cases / sizeof cases[0]);
}

/* tcp_keepalive_ms: 60 s by default, 0 (off) to 2 h; above, or not a
 * number, is refused by name. */
static void test_tcp_keepalive_ms(void) {
  static const u32_case cases[] = {{NULL, 0, 60000},        {"0", 0, 0},
                                   {"1", 0, 1},             {"7200000", 0, 7200000},
                                   {"7200001", -1, 0},      {"-1", -1, 0},
                                   {"true", -1, 0}};
  check_u32_key("tcp_keepalive_ms", offsetof(sg_config, tcp_keepalive_ms), cases,
                sizeof cases / sizeof cases[0]);
}

int main(void) {
  test_minimal_h2c();
  test_tls_listener();
  test_errors_name_paths();
  test_listener_needs_tls_or_insecure();
  test_mismatched_key();
  test_invalid_json_and_duplicates();
  test_duplicates();
  test_auth_defaults_are_safe();
  test_refcount();
  test_v4_mapped_listener_address();
  test_idle_trim_ms();
  test_tcp_keepalive_ms();
  return check_report("config");
}
