/* TLS contexts for both legs. The client-facing context speaks TLS 1.2+
 * with ALPN "h2" only; the upstream context verifies the backend's
 * certificate and host name unless the operator turned that off by name. */
#ifndef SPARKGATE_TLS_H
#define SPARKGATE_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>

#include "sparkgate/config.h"

/* The largest client certificate (DER) a listener takes (the client's
 * own; its chain is not held to it): real ones are a few KiB. OpenSSL cannot put a session whose
 * certificate nears 64 KiB in a session ticket and then fails the
 * handshake with an "internal error"; refused at verification instead,
 * with a verify result of X509_V_ERR_APPLICATION_VERIFICATION. */
#define SG_TLS_CLIENT_CERT_MAX_BYTES 32768

/* How much a TLS connection (client or backend) reads per read(): four
 * full records. The buffer exists only while it holds bytes. */
#define SG_TLS_READ_AHEAD_BYTES (64 * 1024)

/* Builds the server context of a TLS listener. Returns NULL with a message
 * in |err| that names the file at fault, and in |*key| (when |key| is not
 * NULL) the "tls" key that names it ("cert", "key", "client_ca", "crl"),
 * or NULL when no one file is at fault. */
SSL_CTX *sg_tls_server_ctx_new(const sg_listener_config *l, const char **key,
                               char *err, size_t errlen);

/* Builds the context used to connect to a TLS backend; |key| as above
 * ("ca", "cert", "key"). */
SSL_CTX *sg_tls_client_ctx_new(const sg_backend_config *b, const char **key,
                               char *err, size_t errlen);

/* Whether |ssl| negotiated "h2" through ALPN. */
int sg_tls_alpn_is_h2(const SSL *ssl);

/* Verifies the client certificate of |ssl|'s connection again, as a
 * handshake on |ctx| (a listener's context, e.g. built by a reload with
 * another client CA or new CRLs) would: its trust store, CRLs and checks.
 * A resumed session has only the leaf, so a chain that needs an
 * intermediate the client sent fails here. Returns 1 when it verifies, 0
 * when not (|why| says why), -1 when it could not be checked (memory). */
int sg_tls_reverify_client(SSL_CTX *ctx, SSL *ssl, const char **why);

/* Why |ssl|'s own certificate (a client certificate to a backend) is not
 * valid now: "expired on <date>" or "is not valid before <date>"; "" when
 * it is, or there is none. For a failed handshake's log line. */
const char *sg_tls_cert_dates_problem(const SSL *ssl, char *buf, size_t buflen);

/* The first queued OpenSSL error as text (and clears the queue), for logs. */
const char *sg_tls_last_error(char *buf, size_t buflen);

/* A pem_password_cb for every PEM read: OpenSSL's default would prompt on
 * the terminal (or read stdin) for an encrypted key and stop the start,
 * or the main loop in a reload, for ever. It refuses; |u|, when set, is a
 * bool set to true when a passphrase was asked for. */
int sg_tls_no_passphrase_cb(char *buf, int size, int rwflag, void *u);

/* A configuration load begins: warnings about certificates (outside their
 * dates) are said again, once for this load. */
void sg_tls_new_load(void);

#endif
