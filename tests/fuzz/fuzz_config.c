/* libFuzzer target: the configuration loader (config.h) on arbitrary JSON
 * text. Configs come from operators, not attackers, but the loader must
 * still never crash, leak or accept something inconsistent: a reload runs
 * it inside a live proxy.
 *
 * The config "lives" in tests/fixtures/ (the file itself need not exist:
 * only its directory matters), so relative names in the seeds
 * ("tls/server.pem", "jwt/hmac.key", "route/tenants.json") resolve to real
 * fixture files and loading gets past the readability checks into TLS,
 * JWT provider and routing-table loading. Checked: success and failure are
 * reported consistently (at least one message per failure, none on
 * success, none empty), and an accepted snapshot is internally
 * consistent; its summary is printed (to /dev/null) too. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_support.h"
#include "sparkgate/config.h"
#include "sparkgate/jwt.h"
#include "sparkgate/log.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


#define CONFIG_PATH SG_SOURCE_ROOT "/tests/fixtures/fuzz-config.json"

static FILE *devnull;
static bool verbose; /* FUZZ_CONFIG_VERBOSE=1: print load errors (triage) */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  sg_log_set_level(SG_LOG_ERROR);
  devnull = fopen("/dev/null", "w");
  if (devnull == NULL)
    abort();
  const char *v = getenv("FUZZ_CONFIG_VERBOSE");
  verbose = v != NULL && v[0] != '\0' && strcmp(v, "0") != 0;
  return 0;
}

static void check_snapshot(const sg_config *cfg) {
  FUZZ_CHECK(cfg->workers >= 1);
  FUZZ_CHECK(cfg->path != NULL && strcmp(cfg->path, CONFIG_PATH) == 0);
  FUZZ_CHECK(cfg->base_dir != NULL);
  FUZZ_CHECK(cfg->n_listeners >= 1 && cfg->listeners != NULL);
  for (size_t i = 0; i < cfg->n_listeners; i++) {
    const sg_listener_config *l = &cfg->listeners[i];
    FUZZ_CHECK(l->name != NULL && l->address != NULL);
    /* h2c only when asked for, and then without TLS files. */
    if (l->insecure)
      FUZZ_CHECK(l->tls_cert_file == NULL && l->tls_key_file == NULL);
    else
      FUZZ_CHECK(l->tls_cert_file != NULL && l->tls_key_file != NULL);
    if (l->client_cert_mode != SG_CLIENT_CERT_NONE)
      FUZZ_CHECK(l->client_ca_file != NULL);
  }
  FUZZ_CHECK(cfg->n_allowed_path_prefixes >= 1);
  for (size_t i = 0; i < cfg->n_allowed_path_prefixes; i++)
    FUZZ_CHECK(cfg->allowed_path_prefixes[i] != NULL &&
               cfg->allowed_path_prefixes[i][0] == '/');
  FUZZ_CHECK(cfg->routes != NULL);
  FUZZ_CHECK(cfg->n_tenants == cfg->routes->n_tenants);
  FUZZ_CHECK(cfg->n_tenants >= 1);
  for (size_t t = 0; t < cfg->n_tenants; t++) {
    const sg_tenant_config *tc = &cfg->tenants[t];
    FUZZ_CHECK(tc->name != NULL && tc->index == t);
    FUZZ_CHECK(tc->n_backends >= 1);
    FUZZ_CHECK(sg_route_table_find(cfg->routes, tc->name, strlen(tc->name)) == tc);
  }
  if (cfg->jwt != NULL)
    FUZZ_CHECK(sg_jwt_verifier_provider_count(cfg->jwt) >= 1);
  FUZZ_CHECK(cfg->stream_window_bytes >= 65535);
  FUZZ_CHECK(cfg->connection_window_bytes >= 65535);
  FUZZ_CHECK(cfg->max_concurrent_streams >= 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  FUZZ_CHECK(text != NULL);
  memcpy(text, data, size);
  text[size] = '\0';

  sg_config *cfg = NULL;
  sg_config_errors errs = {0};
  int rv = sg_config_load_string(CONFIG_PATH, text, &cfg, &errs);
  FUZZ_CHECK(rv == 0 || rv == -1);
  if (rv == 0) {
    FUZZ_CHECK(cfg != NULL);
    FUZZ_CHECK(errs.count == 0);
    check_snapshot(cfg);
    sg_config_print_summary(cfg, devnull);
    /* Another reference, as a worker holds one across a reload. */
    sg_config *again = sg_config_ref(cfg);
    FUZZ_CHECK(again == cfg);
    sg_config_unref(again);
    sg_config_unref(cfg);
  } else {
    FUZZ_CHECK(cfg == NULL);
    FUZZ_CHECK(errs.count >= 1);
  }
  for (size_t i = 0; i < errs.count; i++) {
    const char *m = errs.messages[i];
    FUZZ_CHECK(m != NULL && m[0] != '\0');
    if (verbose)
      fprintf(stderr, "fuzz_config: %s\n", m);
  }
  sg_config_errors_clear(&errs);
  free(text);
  return 0;
}
