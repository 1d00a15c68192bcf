/* Routing: which tenant a call belongs to, whether its caller may use that
 * tenant, and which of the tenant's backends serves its Spark session.
 *
 * The routing table is a JSON file of its own (docs/routing.md). It is
 * loaded into an immutable, refcounted sg_route_table: a reload builds a new
 * table and swaps it in whole, and a call keeps the table it started with.
 *
 * Backend choice is weighted rendezvous hashing of (tenant, user_id,
 * session_id) over the tenant's backends. It is a pure function of the
 * table's contents, so every worker and every replica sends a session to
 * the same backend without talking to each other, and a change to the
 * backend list moves only the sessions it has to. */
#ifndef SPARKGATE_ROUTE_H
#define SPARKGATE_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "sparkgate/backend.h"

/* ---- SparkConnectService methods ---------------------------------------- */

typedef enum sg_spark_method {
  SG_SPARK_EXECUTE_PLAN = 0,
  SG_SPARK_ANALYZE_PLAN,
  SG_SPARK_CONFIG,
  SG_SPARK_ADD_ARTIFACTS,
  SG_SPARK_ARTIFACT_STATUS,
  SG_SPARK_INTERRUPT,
  SG_SPARK_REATTACH_EXECUTE,
  SG_SPARK_RELEASE_EXECUTE,
  SG_SPARK_RELEASE_SESSION,
  SG_SPARK_FETCH_ERROR_DETAILS,
  SG_SPARK_N_METHODS
} sg_spark_method;

#define SG_SPARK_SERVICE_PREFIX "/spark.connect.SparkConnectService/"
#define SG_SPARK_ALL_METHODS ((1u << SG_SPARK_N_METHODS) - 1u)

/* "ExecutePlan" etc.; NULL when out of range. */
const char *sg_spark_method_name(sg_spark_method m);
/* The method of a gRPC :path ("/spark.connect.SparkConnectService/Config"),
 * or -1 when the path names no SparkConnectService method. */
int sg_spark_method_from_path(const char *path, size_t len);

/* ---- names --------------------------------------------------------------- */

/* The rule for a configured name that is sent to backends as a header
 * value and used as a metrics label (a tenant, a JWT provider): 1 to 64
 * letters, digits, '.', '_' or '-', starting with a letter or digit. Such a
 * name needs no escaping anywhere and cannot carry a CR/LF into a header. */
#define SG_ROUTE_MAX_NAME_LEN 64
bool sg_route_name_is_valid(const char *s);

/* ---- the table ----------------------------------------------------------- */

typedef enum sg_route_selector_kind {
  SG_ROUTE_SEL_JWT_CLAIM = 0, /* a string claim of the verified JWT names it */
  SG_ROUTE_SEL_HEADER,        /* a request header names it */
  SG_ROUTE_SEL_AUTHORITY,     /* :authority host is in a tenant's "hosts" */
  SG_ROUTE_SEL_IDENTITY,      /* the one tenant whose "allow" admits the caller */
} sg_route_selector_kind;

typedef struct sg_route_selector {
  sg_route_selector_kind kind;
  char *arg;  /* claim name, or header name in lower case; NULL otherwise */
  char *text; /* as written in the table ("header:x-spark-tenant"), for logs */
} sg_route_selector;

/* What the proxy does with user_context.user_id in Spark requests. */
typedef enum sg_route_user_id_mode {
  SG_ROUTE_USER_ID_REWRITE = 0, /* replace it with the caller's identity */
  SG_ROUTE_USER_ID_ENFORCE,     /* deny a call whose user_id differs */
  SG_ROUTE_USER_ID_OFF,         /* pass it through unchanged */
} sg_route_user_id_mode;

typedef enum sg_route_credential_source {
  SG_ROUTE_CREDENTIAL_NONE = 0,
  SG_ROUTE_CREDENTIAL_FILE,
  SG_ROUTE_CREDENTIAL_ENV,
} sg_route_credential_source;

/* A claim rule of "allow": claim |name| has one of |values| (or, for an
 * array claim, one of its elements does). */
typedef struct sg_route_claim_rule {
  char *name;
  json_t *values; /* a non-empty array of strings, integers or booleans */
} sg_route_claim_rule;

typedef struct sg_route_allow {
  bool any_identity; /* every caller with an identity */
  char **identities; /* exact */
  size_t n_identities;
  char **identity_prefixes;
  size_t n_identity_prefixes;
  sg_route_claim_rule *claims;
  size_t n_claims;
} sg_route_allow;

/* 0 in any field means "no limit". Enforced by the caller (per worker). */
typedef struct sg_route_limits {
  uint32_t max_concurrent_rpcs;
  uint32_t max_concurrent_executions; /* ExecutePlan + ReattachExecute */
  uint32_t requests_per_second;
  uint32_t burst; /* defaults to requests_per_second */
  uint64_t upload_bytes_per_minute;
  int over_limit_status; /* gRPC status: 8 (default) or 14 */
  uint32_t max_message_bytes; /* largest request message (gRPC framing) */
} sg_route_limits;

/* Spark's own client and server default to 128 MiB messages. */
#define SG_ROUTE_DEFAULT_MAX_MESSAGE_BYTES (128u * 1024u * 1024u)

typedef struct sg_route_tenant {
  char *name;
  size_t index; /* in the table's tenants[] */
  char **hosts; /* lower case, no brackets, no trailing dot */
  size_t n_hosts;
  sg_backend_config *backends; /* same shape as the main config's backends */
  size_t n_backends;
  sg_route_allow allow;
  sg_route_user_id_mode user_id;
  bool failover;
  uint32_t methods; /* bit (1u << sg_spark_method) set: allowed */
  sg_route_limits limits;

  sg_route_credential_source credential_source;
  char *credential_origin; /* the file name or the variable name: printable */
  char *credential;        /* the secret itself: NEVER log or print it */
  size_t credential_len;
} sg_route_tenant;

typedef struct sg_route_table {
  int refcount_; /* atomic; use sg_route_table_ref/unref */
  char *path;    /* file it came from; NULL when loaded from a json_t */
  sg_route_selector *selectors;
  size_t n_selectors;
  sg_route_tenant *tenants;
  size_t n_tenants;
  /* Indexes for lookups on the request path (private). */
  struct sg_route_ix_ *by_name_; /* n_tenants entries, sorted */
  struct sg_route_ix_ *by_host_; /* n_hosts_ entries, sorted */
  size_t n_hosts_;
} sg_route_table;

/* Called once per problem found. |json_path| is like
 * "tenants[1].backends[0].port" ("" for the document as a whole); |msg|
 * says what is wrong and what to do, and never contains a secret. */
typedef void (*sg_route_report_fn)(void *ctx, const char *json_path,
                                   const char *msg);

/* Loads and validates a table. Relative file names inside it resolve
 * against |base_dir| (NULL: "."). Returns NULL after reporting every
 * problem (it keeps going after the first). Secrets are read now, so a
 * missing credential fails the load and not the first call. */
sg_route_table *sg_route_table_from_json(const json_t *root,
                                         const char *base_dir,
                                         sg_route_report_fn report, void *ctx);

/* Same from a file. A relative |path| resolves against |base_dir| (the main
 * config's directory; NULL: the working directory); relative names inside
 * the table resolve against the table file's own directory. */
sg_route_table *sg_route_table_load(const char *path, const char *base_dir,
                                    sg_route_report_fn report, void *ctx);

sg_route_table *sg_route_table_ref(sg_route_table *t);
void sg_route_table_unref(sg_route_table *t); /* NULL is fine */

const sg_route_tenant *sg_route_table_find(const sg_route_table *t,
                                           const char *name, size_t len);

/* What --check-config shows; names where credentials come from, never the
 * credentials. */
void sg_route_table_print_summary(const sg_route_table *t, FILE *f);

/* ---- tenant selection ---------------------------------------------------- */

typedef struct sg_route_request {
  const char *identity; /* authenticated caller; NULL: none (admitted nowhere) */
  const json_t *claims; /* verified JWT claims object; NULL for mTLS */
  const char *authority; /* :authority, port allowed; NULL: absent */
  size_t authority_len;
  /* Value of request header |name| (lower case) or NULL; its length in
   * |*len| (the value need not be NUL-terminated). NULL callback: none. */
  const char *(*header)(void *ctx, const char *name, size_t *len);
  void *header_ctx;
} sg_route_request;

typedef enum sg_route_outcome {
  SG_ROUTE_OK = 0,
  SG_ROUTE_NO_TENANT,          /* no selector yielded a tenant */
  SG_ROUTE_AMBIGUOUS_IDENTITY, /* ... and "identity" found several */
  SG_ROUTE_UNKNOWN_TENANT,     /* a claim or header named no tenant */
  SG_ROUTE_NOT_ALLOWED,        /* the tenant does not admit the caller */
} sg_route_outcome;

typedef struct sg_route_decision {
  sg_route_outcome outcome;
  /* The tenant to route to; NULL unless outcome is SG_ROUTE_OK. */
  const sg_route_tenant *tenant;
  /* NOT_ALLOWED: the tenant the caller asked for, for the log only. */
  const sg_route_tenant *denied_tenant;
  /* The selector that decided ("header:x-spark-tenant"), or NULL. */
  const char *selector;
  /* Stable short name for logs and metrics: "ok", "no_tenant",
   * "ambiguous_identity", "unknown_tenant", "not_allowed". */
  const char *reason;
  /* Safe to send to the client as grpc-message: it names no tenant and
   * does not tell an unknown tenant from a forbidden one. */
  const char *message;
} sg_route_decision;

/* Returns 0 with out->tenant set, or -1 (every denial: the caller answers
 * grpc-status 7 PERMISSION_DENIED). Never allocates. */
int sg_route_select(const sg_route_table *t, const sg_route_request *req,
                    sg_route_decision *out);

const char *sg_route_outcome_reason(sg_route_outcome o);

/* Whether the tenant's "allow" admits this caller (identity and claims). */
bool sg_route_tenant_admits(const sg_route_tenant *t, const char *identity,
                            const json_t *claims);

static inline bool sg_route_tenant_allows_method(const sg_route_tenant *t,
                                                 int method) {
  return method >= 0 && method < SG_SPARK_N_METHODS &&
         (t->methods & (1u << method)) != 0;
}

/* The methods PySpark (3.5+) calls along with ExecutePlan that |t| refuses,
 * as "ReattachExecute, ReleaseExecute" in buf ("" when none): without
 * them a result streamed longer than the server's 2-minute cut fails with
 * PERMISSION_DENIED, and executions are never released. */
const char *sg_route_tenant_missing_companions(const sg_route_tenant *t, char *buf,
                                               size_t buflen);

/* For a tenant whose user_id is "off": the first tenant of |tenants| that
 * rewrites or enforces user_id and lists one of |t|'s backends too (the
 * same address, as written or as the same numeric IP, and port), with
 * that backend in *shared; NULL when there is none. Spark keys sessions
 * by user_id and session_id and believes the user_id it is sent, so the
 * off tenant's callers could reach the other tenant's sessions there. */
const sg_route_tenant *sg_route_tenant_off_shares_backend(const sg_route_tenant *tenants,
                                                          size_t n_tenants,
                                                          const sg_route_tenant *t,
                                                          const sg_backend_config **shared);

/* ---- backend choice (weighted rendezvous hashing) ------------------------ */

#define SG_ROUTE_PICK_OK 0
#define SG_ROUTE_PICK_DOWN 1 /* *out_index is the session's backend; it is down */
#define SG_ROUTE_PICK_NONE (-1) /* no backend has weight > 0 */

/* Picks the backend of a session. |backend_up| has n_backends entries
 * (NULL: all up). When the session's backend is down: without "failover"
 * returns SG_ROUTE_PICK_DOWN with that backend (answer 14: its state lives
 * there); with failover the up backend ranked next, or SG_ROUTE_PICK_DOWN
 * with the first choice when none is up. NULL user_id / session_id hash as
 * "". Never allocates. */
int sg_route_pick_backend(const sg_route_tenant *t, const char *user_id,
                          const char *session_id, const bool *backend_up,
                          size_t *out_index);

typedef struct sg_route_rank_entry {
  size_t index; /* into t->backends */
  double score;
} sg_route_rank_entry;

/* The backends with weight > 0 in the session's order of preference (best
 * first), at most |cap| of them; returns how many were written. */
size_t sg_route_rank_backends(const sg_route_tenant *t, const char *user_id,
                              const char *session_id, sg_route_rank_entry *out,
                              size_t cap);

/* Score of one backend for a session: sg_route_hrw_score of SipHash-2-4
 * (key 00 01 .. 0f) of tenant "\0" user_id "\0" session_id "\0"
 * backend_name. 0 for weight 0. */
double sg_route_backend_score(const sg_route_tenant *t, size_t backend,
                              const char *user_id, const char *session_id);

/* -weight / ln(u), u = ((hash >> 12) + 0.5) / 2^52, with a logarithm built
 * from IEEE-754 basic operations so that every platform gets the same bits
 * (docs/routing.md). 0 for weight 0. */
double sg_route_hrw_score(uint64_t hash, uint32_t weight);

/* SipHash-2-4 (Aumasson & Bernstein), exposed for its test vectors. */
uint64_t sg_siphash24(const uint8_t key[16], const void *data, size_t len);

/* ---- token bucket -------------------------------------------------------- */

/* |rate| tokens per |per_ms| milliseconds, holding at most |burst|. Kept in
 * integers (tokens scaled by per_ms) so it never drifts. Not thread-safe:
 * one bucket per worker. A zeroed bucket, or rate 0, never limits. */
typedef struct sg_token_bucket {
  uint64_t level;    /* tokens * per_ms */
  uint64_t capacity; /* burst * per_ms */
  uint64_t rate;     /* added per ms, in the same scaled unit */
  uint64_t per_ms;
  uint64_t last_ms;
} sg_token_bucket;

/* Starts full. */
void sg_token_bucket_init(sg_token_bucket *b, uint64_t rate, uint64_t per_ms,
                          uint64_t burst, uint64_t now_ms);
/* Takes |n| tokens if there are that many; returns whether it did. A clock
 * that goes backwards adds nothing. */
bool sg_token_bucket_take(sg_token_bucket *b, uint64_t now_ms, uint64_t n);
/* Milliseconds until |n| tokens would be there (0: now; UINT64_MAX: never,
 * n exceeds the burst). For a retry hint. */
uint64_t sg_token_bucket_wait_ms(const sg_token_bucket *b, uint64_t now_ms,
                                 uint64_t n);

#endif
