/* Fetching JWT providers' keys over HTTPS (issue 9): a JWKS URL, or the
 * jwks_uri of an OpenID Connect discovery document.
 *
 * Everything runs on the main thread's event loop (libevent's HTTP client
 * over bufferevent_openssl), never on a worker: one fetcher per provider
 * whose keys come from the network, so there is one fetch in flight per
 * provider for all workers together. Workers ask for a refetch through
 * the provider's key source (jwt.h: sg_jwt_keysource_unknown_kid), which
 * wakes the fetcher with event_active; the call that asked does not wait.
 *
 * Each fetch: https only; the server certificate is verified against the
 * provider's ca_file (default: the system trust store) and must name the
 * URL's host (SSL_set1_host, or the IP address for an IP literal), with
 * SNI for host names; TLS 1.2 at least; connect and total timeouts; a cap
 * on the response size; redirects are refused (a 3xx fails the fetch);
 * HTTP proxies are not supported, so proxy settings (HTTPS_PROXY, ...)
 * are never used; the response must be 200 with a JSON content type.
 *
 * A fetch that fails in any way leaves the keys in force, is logged with
 * its reason and counted (sg_jwt_key_stats), and is retried with backoff
 * (1 s, doubling, at most min(min_refresh_s, 300 s)). A good one is next
 * refreshed after the response's Cache-Control max-age clamped to
 * [min_refresh_s, max_refresh_s], or after max_refresh_s without one.
 * With discovery, every scheduled refresh reads the discovery document
 * again; a refetch for an unknown kid goes straight to the known
 * jwks_uri. */
#ifndef SPARKGATE_KEYFETCH_H
#define SPARKGATE_KEYFETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sparkgate/jwt.h"

struct event_base;
struct ssl_ctx_st;

typedef struct sg_keyfetch sg_keyfetch;

/* Told (on the main thread) when a provider's key state changed: it got
 * its first keys, or its keys changed. */
typedef void (*sg_keyfetch_change_fn)(void *arg);

/* Fetchers run on `base` (the main loop). NULL when out of memory. */
sg_keyfetch *sg_keyfetch_new(struct event_base *base,
                             sg_keyfetch_change_fn on_change, void *arg);

/* Makes the fetchers match the network providers of `v` (may be NULL):
 * a provider whose key source already has a fetcher keeps it, with v's
 * settings from now on (timeouts, ca_file, refresh bounds; a fetch in
 * flight finishes with the old ones); a new one starts fetching at once;
 * fetchers of key sources v no longer has are stopped. Main thread. */
void sg_keyfetch_update(sg_keyfetch *kf, const sg_jwt_verifier *v);

/* Stops every fetch (in flight ones are abandoned) and frees. Before the
 * event base is freed. */
void sg_keyfetch_free(sg_keyfetch *kf);

/* How many fetchers run. */
size_t sg_keyfetch_count(const sg_keyfetch *kf);

/* ---- pieces, exposed for config loading and unit tests ----------------- */

/* 0 when `url` is an absolute https URL with a host, no userinfo and no
 * fragment; else -1 with what is wrong and how to fix it in err. */
int sg_keyfetch_check_url(const char *url, char *err, size_t errlen);

/* A TLS client context for fetches: TLS 1.2+, peer verification on,
 * trusting the PEM certificates of ca_file, or the system store when
 * ca_file is NULL. NULL with the reason in err. */
struct ssl_ctx_st *sg_keyfetch_tls_ctx_new(const char *ca_file, char *err,
                                           size_t errlen);

/* The refresh delay a Cache-Control value asks for: max-age=N gives N,
 * no-cache / no-store give 0; -1 when it says nothing about it (or is
 * NULL). Directive names are case-insensitive; "max-age" inside another
 * directive's quoted value does not count. */
long sg_keyfetch_max_age(const char *cache_control);

/* Seconds until the next refresh after a good fetch: max_age (from
 * sg_keyfetch_max_age; -1 = none -> max_refresh_s) within the bounds. */
uint32_t sg_keyfetch_refresh_delay(long max_age, uint32_t min_refresh_s,
                                   uint32_t max_refresh_s);

/* ISSUER (a trailing "/" dropped) + "/.well-known/openid-configuration",
 * in a new string; NULL when out of memory. */
char *sg_keyfetch_discovery_url(const char *issuer);

/* Checks an OpenID Connect discovery document: a JSON object (duplicate
 * names refused) whose "issuer" equals `issuer` byte for byte and whose
 * "jwks_uri" passes sg_keyfetch_check_url. 0 with *jwks_uri (new string),
 * or -1 with the reason in err. */
int sg_keyfetch_parse_discovery(const char *body, size_t len,
                                const char *issuer, char **jwks_uri,
                                char *err, size_t errlen);

/* True for a JSON media type: application/json, application/jwk-set+json,
 * any application/...+json, parameters (charset) allowed. */
bool sg_keyfetch_json_content_type(const char *content_type);

#endif
