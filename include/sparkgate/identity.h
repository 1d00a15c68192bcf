/* Client identities that do not come from a JWT (issue 4): the identity
 * in a verified client certificate, its RFC 8705 thumbprint, the
 * x-forwarded-client-cert element the proxy sends upstream, the rules for
 * identity headers a client must not send, the per-listener "auth" policy
 * and the decision that combines a token result with a certificate result.
 *
 * Nothing here does I/O, allocates beyond a call, logs, or keeps state:
 * every function is safe to call from any worker thread.
 *
 * Listener JSON (sg_listener_auth_parse), every key optional:
 *   "auth": {
 *     "methods": ["jwt", "mtls"],        non-empty, no repeats; default
 *                                        ["jwt"]
 *     "require": "any",                  any: one accepted credential is
 *                                        enough; all: a token AND a
 *                                        certificate. "all" needs both
 *                                        methods. Default "any".
 *     "client_identity": "uri_san",      uri_san | dns_san | cn; only with
 *                                        "mtls". Default "uri_san"; "cn"
 *                                        is never chosen by default.
 *     "bind_token_to_certificate": false true: a token is accepted only if
 *                                        it is bound (cnf.x5t#S256) to the
 *                                        certificate of its connection.
 *                                        Needs both methods.
 *   }
 * Whether the listener asks for client certificates at all
 * (tls.client_certificates) is the caller's check: "mtls" on a listener
 * that never requests one can never succeed.
 *
 * Root JSON (sg_identity_headers_parse), every key optional:
 *   "identity_headers": {
 *     "identity": "x-sparkgate-identity",
 *     "tenant": "x-sparkgate-tenant",
 *     "auth_method": "x-sparkgate-auth-method",
 *     "provider": "x-sparkgate-identity-provider"
 *   }
 * Names: 1..64 lowercase token characters without "_", distinct, and not
 * a pseudo-header, a hop-by-hop header, authorization, host, content-type,
 * content-length, user-agent, te, grpc-*, forwarded, x-forwarded-*,
 * x-real-ip, client-cert or client-cert-chain. */
#ifndef SPARKGATE_IDENTITY_H
#define SPARKGATE_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <openssl/x509.h>

/* ---- identity from a client certificate -------------------------------- */

/* Longest identity taken from a certificate (the SPIFFE limit); an output
 * buffer of SG_IDENTITY_MAX_BYTES + 1 always suffices. */
#define SG_IDENTITY_MAX_BYTES 2048u

typedef enum sg_cert_identity_mode {
  /* The SPIFFE ID: the certificate must hold exactly one URI SAN (as
   * X509-SVID requires) and it must be a valid SPIFFE ID with a path. */
  SG_CERT_IDENTITY_URI_SAN = 0,
  /* The DNS SAN, only when there is exactly one: with several, which one
   * names the client is a guess, so there is no identity. Returned in
   * lowercase, because DNS names compare case-insensitively. */
  SG_CERT_IDENTITY_DNS_SAN,
  /* The subject CN, only when the subject has exactly one CN. Printable
   * ASCII, no leading or trailing space. */
  SG_CERT_IDENTITY_CN,
} sg_cert_identity_mode;

/* "uri_san", "dns_san", "cn" (exact spelling). Returns 0, or -1. */
int sg_cert_identity_mode_parse(const char *name, sg_cert_identity_mode *out);
const char *sg_cert_identity_mode_name(sg_cert_identity_mode mode);

/* Whether len bytes of s are a SPIFFE ID this proxy accepts as a client
 * identity: "spiffe://", a trust domain of 1..255 of [a-z0-9._-], then one
 * or more "/segment" with segments of [A-Za-z0-9._-], none empty, "." or
 * "..", so no trailing "/", query, fragment, port, userinfo or percent
 * encoding; at most 2048 bytes. A bare trust domain ID is refused: it
 * names no workload. */
bool sg_identity_spiffe_id_is_valid(const char *s, size_t len);

/* Writes the identity of an already verified certificate, as mode says,
 * NUL-terminated into out. Returns 0, or -1 with *reason (reason may be
 * NULL) set to a static, stable name for logs and metrics:
 *   "no_uri_san", "multiple_uri_sans", "not_spiffe", "invalid_spiffe_id",
 *   "no_dns_san", "multiple_dns_sans", "invalid_dns_name",
 *   "no_cn", "multiple_cns",
 *   "embedded_nul"  the value holds a NUL byte (its ASN.1 length is not its
 *                   C string length: the classic CN/SAN spoofing trick),
 *   "bad_chars"     non-ASCII or control characters, or (cn) an edge space,
 *   "empty", "too_long" (over SG_IDENTITY_MAX_BYTES or outlen - 1),
 *   "invalid_san"   the SAN extension cannot be decoded or is repeated,
 *   "internal"      bad arguments or out of memory.
 * Other SAN types (email, IP) are ignored in every mode. */
int sg_identity_from_cert(const X509 *cert, sg_cert_identity_mode mode,
                          char *out, size_t outlen, const char **reason);

/* ---- thumbprint and x-forwarded-client-cert ------------------------------ */

/* base64url (no padding) of a SHA-256 digest. */
#define SG_IDENTITY_THUMBPRINT_LEN 43u

/* The RFC 8705 "x5t#S256" of cert: base64url without padding of the
 * SHA-256 of its DER encoding, NUL-terminated. outlen must be at least
 * SG_IDENTITY_THUMBPRINT_LEN + 1. Returns 0, or -1. */
int sg_identity_cert_thumbprint(const X509 *cert, char *out, size_t outlen);

#define SG_IDENTITY_HEADER_XFCC "x-forwarded-client-cert"

/* One x-forwarded-client-cert element in Envoy's format, describing cert:
 *   Hash=<lowercase hex SHA-256 of DER>;Subject="<RFC 2253 subject>";
 *   URI=<first URI SAN>;DNS=<DNS SAN>;DNS=<DNS SAN>...
 * (no newlines; parts that do not exist are left out). As in Envoy, URI is
 * the first URI SAN only and every DNS SAN gets its own DNS= pair. Subject
 * is always quoted; URI and DNS are quoted when they hold , ; = " \ or a
 * space; inside quotes " and \ are escaped with a backslash. A SAN that is
 * not printable ASCII (e.g. holds a NUL) cannot be put in a header and is
 * left out. The proxy builds the whole header itself: an inbound one is
 * stripped (see below), never appended to. Returns 0, or -1 (out too
 * small, or out of memory). */
int sg_identity_xfcc(const X509 *cert, char *out, size_t outlen);

/* ---- headers a client must not send ---------------------------------- */

#define SG_IDENTITY_HEADER_NAME_MAX 64u
#define SG_IDENTITY_HEADER_IDENTITY_DEFAULT "x-sparkgate-identity"
#define SG_IDENTITY_HEADER_TENANT_DEFAULT "x-sparkgate-tenant"
#define SG_IDENTITY_HEADER_AUTH_METHOD_DEFAULT "x-sparkgate-auth-method"
#define SG_IDENTITY_HEADER_PROVIDER_DEFAULT "x-sparkgate-identity-provider"

/* The names of the headers the proxy adds upstream. */
typedef struct sg_identity_header_names {
  char identity[SG_IDENTITY_HEADER_NAME_MAX + 1];
  char tenant[SG_IDENTITY_HEADER_NAME_MAX + 1];
  char auth_method[SG_IDENTITY_HEADER_NAME_MAX + 1];
  char provider[SG_IDENTITY_HEADER_NAME_MAX + 1];
} sg_identity_header_names;

void sg_identity_header_names_default(sg_identity_header_names *out);

/* Whether a request header named name (len bytes, no NUL needed) claims
 * something only the proxy may state, compared case-insensitively and
 * with "_" read as "-": the proxy's own identity headers (the names in own,
 * or the defaults when own is NULL, and the four default names always, so
 * a backend still reading a default name after a rename cannot be fooled),
 * x-forwarded-client-cert, client-cert, client-cert-chain, forwarded, every
 * x-forwarded-*, and x-real-ip. Such headers are never forwarded. */
bool sg_identity_header_is_spoofable(const uint8_t *name, size_t len,
                                     const sg_identity_header_names *own);

/* Whether name contains "_" and, read with "_" as "-", is spoofable
 * (x_forwarded_for, x-sparkgate_identity). Some servers and frameworks
 * (CGI, WSGI, nginx with underscores_in_headers) fold "_" and "-" into one
 * name, so stripping only the exact spelling would let the alias through:
 * such a request is rejected instead (grpc-status 3, INVALID_ARGUMENT). */
bool sg_identity_header_has_underscore(const uint8_t *name, size_t len,
                                       const sg_identity_header_names *own);

typedef enum sg_identity_header_action {
  SG_IDENTITY_HEADER_PASS = 0, /* forward it */
  SG_IDENTITY_HEADER_STRIP,    /* spoofable: drop it, go on */
  SG_IDENTITY_HEADER_REJECT,   /* underscore alias: refuse the request */
} sg_identity_header_action;

/* The two predicates above in one call. */
sg_identity_header_action
sg_identity_header_classify(const uint8_t *name, size_t len,
                            const sg_identity_header_names *own);

/* ---- configuration ------------------------------------------------------ */

/* Receives one configuration problem: the JSON path it is at
 * ("listeners[0].auth.methods[1]") and what is wrong and how to fix it. */
typedef void (*sg_identity_report_fn)(void *ctx, const char *json_path,
                                      const char *msg);

#define SG_LISTENER_AUTH_JWT (1u << 0)
#define SG_LISTENER_AUTH_MTLS (1u << 1)

typedef enum sg_listener_auth_require {
  SG_LISTENER_AUTH_REQUIRE_ANY = 0,
  SG_LISTENER_AUTH_REQUIRE_ALL,
} sg_listener_auth_require;

typedef struct sg_listener_auth {
  unsigned methods; /* SG_LISTENER_AUTH_JWT | SG_LISTENER_AUTH_MTLS */
  sg_listener_auth_require require;
  sg_cert_identity_mode client_identity;
  bool bind_token_to_certificate;
} sg_listener_auth;

/* methods jwt, require any, client_identity uri_san, no binding. */
void sg_listener_auth_default(sg_listener_auth *out);

/* Parses a listener's "auth" object (NULL: absent, the defaults). path is
 * the object's JSON path, e.g. "listeners[0].auth". Every problem goes to
 * report (may be NULL) and parsing goes on. Returns 0, or -1 when anything
 * was reported; *out is always filled (defaults where a value was bad). */
int sg_listener_auth_parse(json_t *obj, const char *path,
                           sg_listener_auth *out, sg_identity_report_fn report,
                           void *ctx);

/* Parses the root "identity_headers" object (NULL: the defaults), the
 * same way. */
int sg_identity_headers_parse(json_t *obj, const char *path,
                              sg_identity_header_names *out,
                              sg_identity_report_fn report, void *ctx);

/* ---- the decision ----------------------------------------------------- */

typedef enum sg_identity_jwt_state {
  SG_IDENTITY_JWT_NONE = 0, /* no bearer token in the request */
  SG_IDENTITY_JWT_VALID,
  SG_IDENTITY_JWT_INVALID, /* a token was sent and refused */
} sg_identity_jwt_state;

typedef struct sg_identity_jwt_input {
  sg_identity_jwt_state state;
  const char *identity;     /* VALID: the token's identity */
  const char *provider;     /* VALID: provider name (passed through) */
  const char *cnf_x5t_s256; /* VALID: cnf.x5t#S256, NULL if unbound */
  const char *reason;       /* INVALID: sg_jwt_reason_name(), for detail */
} sg_identity_jwt_input;

typedef enum sg_identity_cert_state {
  SG_IDENTITY_CERT_NONE = 0, /* no client certificate on the connection */
  /* TLS verified the chain. There is no "invalid" state: a certificate
   * that fails verification fails the handshake. */
  SG_IDENTITY_CERT_VERIFIED,
} sg_identity_cert_state;

typedef struct sg_identity_cert_input {
  sg_identity_cert_state state;
  const char *identity;        /* from sg_identity_from_cert, NULL if none */
  const char *identity_reason; /* why identity is NULL, for detail */
  const char *thumbprint;      /* sg_identity_cert_thumbprint */
} sg_identity_cert_input;

/* Why a request is refused: a short stable name (sg_identity_deny_name)
 * for logs and metric labels. Every denial is gRPC UNAUTHENTICATED (16).
 * New values are appended. */
typedef enum sg_identity_deny {
  SG_IDENTITY_DENY_NONE = 0,         /* "none": allowed */
  SG_IDENTITY_DENY_NO_CREDENTIALS,   /* "no_credentials": nothing the
                                        listener accepts was presented */
  SG_IDENTITY_DENY_JWT_INVALID,      /* "jwt_invalid": a token was sent and
                                        refused (detail: the jwt reason) */
  SG_IDENTITY_DENY_JWT_REQUIRED,     /* "jwt_required": require all, no
                                        token */
  SG_IDENTITY_DENY_CERT_REQUIRED,    /* "cert_required": require all, no
                                        certificate */
  SG_IDENTITY_DENY_NO_CERT_IDENTITY, /* "no_cert_identity": a certificate
                                        was needed but yields no identity
                                        (detail: the identity reason) */
  SG_IDENTITY_DENY_TOKEN_NOT_BOUND,  /* "token_not_bound": binding required
                                        and the token has no cnf.x5t#S256 */
  SG_IDENTITY_DENY_BOUND_TOKEN_NO_CERT, /* "bound_token_no_cert": the token
                                        is bound to a certificate and the
                                        connection presented none */
  SG_IDENTITY_DENY_TOKEN_CERT_MISMATCH, /* "token_cert_mismatch": bound to
                                        another certificate */
  SG_IDENTITY_DENY_INTERNAL,         /* "internal": inconsistent input */
  SG_IDENTITY_DENY_COUNT
} sg_identity_deny;

#define SG_IDENTITY_METHOD_JWT "jwt"
#define SG_IDENTITY_METHOD_MTLS "mtls"
#define SG_IDENTITY_METHOD_JWT_MTLS "jwt+mtls"

typedef struct sg_identity_decision {
  bool allow;
  /* allow: the identity (points into the inputs, lives as long as they
   * do) and the method: "jwt", "mtls", or "jwt+mtls" when the identity is
   * backed by both (require all, or a token whose binding to this
   * connection's certificate was checked). */
  const char *identity;
  const char *provider; /* the token's provider when identity is the
                           token's, else NULL */
  const char *method;
  sg_identity_deny deny; /* SG_IDENTITY_DENY_NONE when allowed */
  const char *reason;    /* sg_identity_deny_name(deny) */
  const char *detail;    /* jwt or certificate reason, or NULL */
} sg_identity_decision;

/* The authentication decision for one request. jwt and cert may be NULL
 * (= NONE). Rules, in this order:
 *  - A token counts only when "jwt" is a method, and a certificate counts
 *    as a credential only when "mtls" is; a certificate is still used to
 *    check a token's binding.
 *  - A token that was sent and refused denies ("jwt_invalid"): never a
 *    silent fall-back to the certificate.
 *  - A valid token carrying cnf.x5t#S256 must match the thumbprint of the
 *    connection's certificate, and is refused without one (RFC 8705 3,
 *    always, whatever bind_token_to_certificate says). With
 *    bind_token_to_certificate, a token without it is refused.
 *  - require any: a valid token gives the identity; else the certificate
 *    gives it; a certificate without identity denies ("no_cert_identity").
 *  - require all: a valid token and a certificate with an identity are
 *    both needed; the identity is the token's (the certificate proves the
 *    client's machine or workload, the token the user: the user is who
 *    routing and upstream need), method "jwt+mtls".
 * Returns out->allow. */
bool sg_identity_decide(const sg_listener_auth *policy,
                        const sg_identity_jwt_input *jwt,
                        const sg_identity_cert_input *cert,
                        sg_identity_decision *out);

/* "no_credentials", ...; "unknown" for values out of range. */
const char *sg_identity_deny_name(sg_identity_deny deny);

#endif
