#include "sparkgate/tls.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "sparkgate/log.h"

/* TLS 1.2 suites: forward secrecy and AEAD only, which is also what RFC 9113
 * 9.2.2 asks of HTTP/2. TLS 1.3 suites are OpenSSL's defaults. */
static const char sg_tls12_ciphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

static const unsigned char sg_alpn_h2[] = {2, 'h', '2'};

/* OpenSSL 3.0 queues ERR_R_MALLOC_FAILURE for most allocation failures,
 * but not for all: its decoders drop the errors of the attempts they
 * retry, and some paths return failure without a word. malloc's ENOMEM in
 * errno tells those apart, so the context builders clear errno first. */
const char *sg_tls_last_error(char *buf, size_t buflen) {
  unsigned long first = ERR_peek_error(), e;
  bool oom = errno == ENOMEM;
  while ((e = ERR_get_error()) != 0)
    if (ERR_GET_REASON(e) == ERR_R_MALLOC_FAILURE)
      oom = true;
  if (oom)
    snprintf(buf, buflen, "out of memory");
  else if (first == 0)
    snprintf(buf, buflen, "unknown TLS error");
  else
    ERR_error_string_n(first, buf, buflen);
  return buf;
}

static void set_error(char *err, size_t errlen, const char *what,
                      const char *file) {
  char ossl[256];
  sg_tls_last_error(ossl, sizeof ossl);
  snprintf(err, errlen, "%s '%s': %s", what, file, ossl);
}

typedef enum pem_want { PEM_WANT_CERT, PEM_WANT_KEY, PEM_WANT_CA } pem_want;

/* What a PEM file the wrong way round holds, said plainly: OpenSSL only
 * says "no start line". NULL when the file looks right (or cannot be read:
 * OpenSSL's message says why). */
static const char *pem_mixup(const char *file, pem_want want) {
  struct stat st;
  if (stat(file, &st) != 0 || !S_ISREG(st.st_mode))
    return NULL;
  FILE *f = fopen(file, "re");
  if (f == NULL)
    return NULL;
  static const size_t cap = 256 * 1024;
  char *text = malloc(cap + 1);
  size_t n = text != NULL ? fread(text, 1, cap, f) : 0;
  fclose(f);
  if (text == NULL)
    return NULL;
  text[n] = '\0';
  bool pem = strstr(text, "-----BEGIN ") != NULL;
  bool has_key = strstr(text, "PRIVATE KEY-----") != NULL;
  bool has_cert = strstr(text, "CERTIFICATE-----") != NULL;
  free(text);
  if (!pem && n > 0)
    return "it is not PEM text (DER? convert it: openssl x509 -inform der, or "
           "openssl pkey -inform der)";
  if (want == PEM_WANT_CERT && has_key && !has_cert)
    return "it holds a private key, not a certificate: are cert and key swapped?";
  if (want == PEM_WANT_KEY && has_cert && !has_key)
    return "it holds a certificate, not a private key: are cert and key swapped?";
  if (want == PEM_WANT_CA && has_key && !has_cert)
    return "it holds a private key, not CA certificates";
  return NULL;
}

/* set_error, saying what the file holds when it is the wrong kind. */
static void set_file_error(char *err, size_t errlen, const char *what,
                           const char *file, pem_want want) {
  const char *mixup = pem_mixup(file, want);
  if (mixup == NULL) {
    set_error(err, errlen, what, file);
    return;
  }
  ERR_clear_error();
  snprintf(err, errlen, "%s '%s': %s", what, file, mixup);
}

static void set_ctx_error(char *err, size_t errlen, const char *what) {
  char ossl[256];
  sg_tls_last_error(ossl, sizeof ossl);
  snprintf(err, errlen, "%s: %s", what, ossl);
}

/* There is no passphrase setting, so an encrypted key is refused. */
int sg_tls_no_passphrase_cb(char *buf, int size, int rwflag, void *u) {
  (void)buf;
  (void)size;
  (void)rwflag;
  if (u != NULL)
    *(bool *)u = true;
  return -1;
}

/* SSL_CTX_use_PrivateKey_file without a prompt. Returns its result, and
 * whether the key turned out to be encrypted. */
static int use_key_file(SSL_CTX *ctx, const char *path, bool *encrypted) {
  *encrypted = false;
  SSL_CTX_set_default_passwd_cb_userdata(ctx, encrypted);
  int rv = SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM);
  /* |encrypted| lives on the caller's stack; the callback stays. */
  SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL);
  return rv;
}

static void set_encrypted_key_error(char *err, size_t errlen, const char *what,
                                    const char *file) {
  ERR_clear_error();
  snprintf(err, errlen, "%s '%s' is encrypted: give an unencrypted PEM key (e.g. "
           "openssl pkey -in K -out K.plain)", what, file);
}

/* "expired on <date>" or "is not valid before <date>" when |x| is outside its
 * dates now, else "" (also when the dates cannot be read: the handshake
 * will say). */
static const char *cert_dates_problem(X509 *x, char *buf, size_t buflen) {
  const ASN1_TIME *when = NULL;
  const char *what = NULL;
  if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0) {
    when = X509_get0_notAfter(x);
    what = "expired on";
  } else if (X509_cmp_current_time(X509_get0_notBefore(x)) > 0) {
    when = X509_get0_notBefore(x);
    what = "is not valid before";
  }
  buf[0] = '\0';
  struct tm tm;
  if (when != NULL && ASN1_TIME_to_tm(when, &tm) == 1) {
    char date[64];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", &tm);
    snprintf(buf, buflen, "%s %s", what, date);
  }
  ERR_clear_error();
  return buf;
}

const char *sg_tls_cert_dates_problem(const SSL *ssl, char *buf, size_t buflen) {
  X509 *own = SSL_get_certificate(ssl);
  if (own == NULL) {
    buf[0] = '\0';
    return buf;
  }
  return cert_dates_problem(own, buf, buflen);
}

/* A certificate or CRL outside its dates is kept, with a warning: refusing
 * it would make a configuration that loaded yesterday fail today, on a
 * restart (every listener and tenant down, not just this one) or on a
 * reload (an unrelated change refused). A load builds each TLS context
 * twice (checked, then built for the workers): each warning is said once
 * per load, and again at the next load, a reload that should remind the
 * operator. */
static pthread_mutex_t warned_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long load_number = 1;
static struct {
  char line[512];
  unsigned long load;
} warned[64]; /* distinct warnings of one load; more are said again */

void sg_tls_new_load(void) {
  pthread_mutex_lock(&warned_lock);
  load_number++;
  pthread_mutex_unlock(&warned_lock);
}

static void warn_once_per_load(const char *line) {
  bool seen = false;
  size_t next = 0;
  pthread_mutex_lock(&warned_lock);
  for (size_t i = 0; i < sizeof warned / sizeof warned[0] && !seen; i++) {
    if (warned[i].load == load_number && strcmp(warned[i].line, line) == 0)
      seen = true;
    else if (warned[i].load < warned[next].load)
      next = i;
  }
  if (!seen) {
    snprintf(warned[next].line, sizeof warned[next].line, "%s", line);
    warned[next].load = load_number;
  }
  pthread_mutex_unlock(&warned_lock);
  if (!seen)
    sg_warn("%s", line);
}

static void warn_cert_dates(SSL_CTX *ctx, const char *what, const char *file,
                            const char *consequence) {
  char problem[128];
  X509 *x = SSL_CTX_get0_certificate(ctx);
  if (x == NULL || cert_dates_problem(x, problem, sizeof problem)[0] == '\0')
    return;
  char line[512];
  snprintf(line, sizeof line, "%s '%s' %s: %s", what, file, problem, consequence);
  warn_once_per_load(line);
}

/* OpenSSL refuses every certificate a CRL covers while the CRL is outside
 * its dates ("CRL has expired"): the whole listener, not one client. */
static void warn_crl_dates(const X509_CRL *crl, const char *file,
                           const sg_listener_config *l) {
  const ASN1_TIME *next = X509_CRL_get0_nextUpdate(crl);
  const ASN1_TIME *when = NULL;
  const char *what = NULL, *refusal = NULL;
  if (next != NULL && X509_cmp_current_time(next) < 0) {
    when = next;
    what = "expired on";
    refusal = "CRL has expired";
  } else if (X509_cmp_current_time(X509_CRL_get0_lastUpdate(crl)) > 0) {
    when = X509_CRL_get0_lastUpdate(crl);
    what = "is not valid before";
    refusal = "CRL is not yet valid";
  }
  struct tm tm;
  if (when != NULL && ASN1_TIME_to_tm(when, &tm) == 1) {
    char date[64], issuer[160], line[512];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", &tm);
    X509_NAME_oneline(X509_CRL_get_issuer(crl), issuer, sizeof issuer);
    snprintf(line, sizeof line,
             "CRL of '%s' in '%s' %s %s: listener %s refuses every client "
             "certificate under that CA (\"%s\") until the file is replaced and "
             "sparkgate reloaded",
             issuer, file, what, date, l->name, refusal);
    warn_once_per_load(line);
  }
  ERR_clear_error();
}

/* Only h2: a client that cannot speak HTTP/2 cannot speak gRPC, and
 * answering it over HTTP/1.1 would only widen the attack surface. */
static int alpn_select_cb(SSL *ssl, const unsigned char **out,
                          unsigned char *outlen, const unsigned char *in,
                          unsigned int inlen, void *arg) {
  (void)ssl;
  (void)arg;
  for (unsigned int i = 0; i < inlen;) {
    unsigned int len = in[i];
    if (i + 1 + len > inlen)
      break;
    if (len == 2 && memcmp(in + i + 1, "h2", 2) == 0) {
      *out = in + i + 1;
      *outlen = 2;
      return SSL_TLSEXT_ERR_OK;
    }
    i += 1 + len;
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* A new context with the settings of both legs, or NULL with err set.
 * Each setting is checked: a cipher list that did not take (memory) would
 * leave OpenSSL's defaults in force, weaker than ours. */
static SSL_CTX *ctx_new(const SSL_METHOD *method, char *err, size_t errlen) {
  errno = 0;
  SSL_CTX *ctx = SSL_CTX_new(method);
  if (ctx == NULL) {
    set_ctx_error(err, errlen, "cannot create a TLS context");
    return NULL;
  }
  /* No renegotiation (a DoS and a confusion vector), no compression
   * (CRIME), a fresh ECDHE key per handshake. */
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                               SSL_OP_CIPHER_SERVER_PREFERENCE |
                               SSL_OP_SINGLE_ECDH_USE);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_default_passwd_cb(ctx, sg_tls_no_passphrase_cb);
  /* AES-128-GCM first: as safe in practice and a third cheaper per byte,
   * which is what a proxy of Arrow batches spends its time on. */
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_cipher_list(ctx, sg_tls12_ciphers) != 1 ||
      SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:"
                                    "TLS_CHACHA20_POLY1305_SHA256:"
                                    "TLS_AES_256_GCM_SHA384") != 1) {
    set_ctx_error(err, errlen, "cannot set the TLS versions and ciphers");
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

/* A CRL whose authorityKeyIdentifier names another certificate than |ca|
 * (by key id, or issuer and serial): OpenSSL does not use it for |ca|'s
 * certificates (X509_check_akid, as its CRL lookup does). */
static bool crl_names_another_ca(X509_CRL *crl, X509 *ca) {
  AUTHORITY_KEYID *akid = X509_CRL_get_ext_d2i(crl, NID_authority_key_identifier, NULL, NULL);
  bool other = akid != NULL && X509_check_akid(ca, akid) != X509_V_OK;
  AUTHORITY_KEYID_free(akid);
  return other;
}

/* A CRL under the name of a client CA but from another key (the CA
 * re-keyed, an old file) fails every handshake under that CA ("CRL
 * signature failure"). True, with err set, for such a CRL. */
static bool crl_from_another_key(X509_STORE *store, X509_CRL *crl, const char *path,
                                 const sg_listener_config *l, char *err, size_t errlen) {
  STACK_OF(X509_OBJECT) *objs = X509_STORE_get0_objects(store);
  bool named = false, signed_by_ca = false;
  for (int i = 0; i < sk_X509_OBJECT_num(objs) && !signed_by_ca; i++) {
    X509 *ca = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i));
    if (ca == NULL || X509_NAME_cmp(X509_get_subject_name(ca), X509_CRL_get_issuer(crl)) != 0 ||
        crl_names_another_ca(crl, ca))
      continue;
    named = true;
    EVP_PKEY *key = X509_get0_pubkey(ca);
    signed_by_ca = key != NULL && X509_CRL_verify(crl, key) == 1;
  }
  ERR_clear_error();
  if (!named || signed_by_ca)
    return false;
  char issuer[256];
  X509_NAME_oneline(X509_CRL_get_issuer(crl), issuer, sizeof issuer);
  snprintf(err, errlen,
           "CRL file '%s': its CRL of '%s' is not signed by the key of that CA in "
           "'%s': every client under it would be refused (\"CRL signature "
           "failure\"); list the CRL this CA issued",
           path, issuer, l->client_ca_file);
  return true;
}

/* Only CRLs, and at least one: X509_STORE_load_file would take a
 * certificate listed here as one more trusted certificate, silently. */
static int load_crl_file(X509_STORE *store, const char *path,
                         const sg_listener_config *l, char *err, size_t errlen) {
  BIO *bio = BIO_new_file(path, "r");
  if (bio == NULL) {
    set_error(err, errlen, "cannot read CRL file", path);
    return -1;
  }
  int n = 0, rv = 0;
  X509_CRL *crl;
  while ((crl = PEM_read_bio_X509_CRL(bio, NULL, sg_tls_no_passphrase_cb, NULL)) != NULL) {
    bool foreign = false;
    if (l->client_cert_mode != SG_CLIENT_CERT_NONE) {
      foreign = crl_from_another_key(store, crl, path, l, err, errlen);
      if (!foreign)
        warn_crl_dates(crl, path, l);
    }
    if (!foreign && X509_STORE_add_crl(store, crl) != 1)
      rv = -1;
    X509_CRL_free(crl);
    n++;
    if (foreign) {
      BIO_free(bio);
      return -1;
    }
  }
  ERR_clear_error(); /* the end of the file reads as "no start line" */
  BIO_free(bio);
  if (n == 0) {
    snprintf(err, errlen, "CRL file '%s' holds no PEM CRL (\"-----BEGIN X509 "
             "CRL-----\"): list only CRL files here", path);
    return -1;
  }
  if (rv != 0) {
    set_error(err, errlen, "cannot add a CRL of", path);
    return -1;
  }
  return 0;
}

/* With CRLs, every CA of a client's chain needs one (CRL_CHECK_ALL:
 * revoking an intermediate must work too); a CA of the client_ca bundle
 * without a CRL would refuse every client under it at the handshake
 * ("unable to get certificate CRL"). Said here instead. */
static bool ca_without_crl(X509_STORE *store, const sg_listener_config *l,
                           char *err, size_t errlen) {
  STACK_OF(X509_OBJECT) *objs = X509_STORE_get0_objects(store);
  for (int i = 0; i < sk_X509_OBJECT_num(objs); i++) {
    X509 *ca = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i));
    if (ca == NULL)
      continue;
    const X509_NAME *name = X509_get_subject_name(ca);
    EVP_PKEY *key = X509_get0_pubkey(ca);
    bool found = false, foreign = false;
    for (int j = 0; j < sk_X509_OBJECT_num(objs); j++) {
      X509_CRL *crl = X509_OBJECT_get0_X509_CRL(sk_X509_OBJECT_value(objs, j));
      if (crl == NULL || X509_NAME_cmp(X509_CRL_get_issuer(crl), name) != 0 ||
          crl_names_another_ca(crl, ca))
        continue;
      /* OpenSSL may check this CA's clients against any CRL under its
       * name (a CA re-keyed under the same name, both trusted during the
       * roll-over): one signed by the other key refuses them all. */
      if (key != NULL && X509_CRL_verify(crl, key) == 1)
        found = true;
      else
        foreign = true;
    }
    ERR_clear_error();
    if (!found || foreign) {
      char subject[256];
      X509_NAME_oneline(name, subject, sizeof subject);
      if (foreign)
        snprintf(err, errlen,
                 "client CA '%s' in '%s': tls.crl holds a CRL under its name that "
                 "this CA did not sign (another CA of the same name did?), and "
                 "OpenSSL may check its clients against it (\"CRL signature "
                 "failure\"): CRLs of CAs that share a name need an "
                 "authorityKeyIdentifier",
                 subject, l->client_ca_file);
      else
        snprintf(err, errlen,
                 "client CA '%s' in '%s' has no CRL in tls.crl: with CRLs, every CA "
                 "of a client's chain needs its CRL listed, or its clients are "
                 "refused",
                 subject, l->client_ca_file);
      return true;
    }
  }
  return false;
}

/* A resumed session skips certificate verification: the certificate it
 * carries was verified when the session was made, perhaps hours ago. One
 * that has expired since (or, with a clock set back, is not yet valid)
 * gets a full handshake instead, which verifies it again and fails. */
static bool session_certificate_current(const SSL_SESSION *sess) {
  X509 *peer = SSL_SESSION_get0_peer((SSL_SESSION *)sess);
  if (peer == NULL)
    return true;
  return X509_cmp_current_time(X509_get0_notBefore(peer)) < 0 &&
         X509_cmp_current_time(X509_get0_notAfter(peer)) > 0;
}

static SSL_TICKET_RETURN ticket_decrypted(SSL *ssl, SSL_SESSION *sess,
                                          const unsigned char *keyname,
                                          size_t keyname_len,
                                          SSL_TICKET_STATUS status, void *arg) {
  (void)ssl;
  (void)keyname;
  (void)keyname_len;
  (void)arg;
  switch (status) {
  case SSL_TICKET_SUCCESS:
    return session_certificate_current(sess) ? SSL_TICKET_RETURN_USE
                                             : SSL_TICKET_RETURN_IGNORE_RENEW;
  case SSL_TICKET_SUCCESS_RENEW:
    return session_certificate_current(sess) ? SSL_TICKET_RETURN_USE_RENEW
                                             : SSL_TICKET_RETURN_IGNORE_RENEW;
  default: /* no ticket, or not one of ours: a full handshake, a new ticket */
    return SSL_TICKET_RETURN_IGNORE_RENEW;
  }
}

/* SG_TLS_CLIENT_CERT_MAX_BYTES, for the client's own certificate only: a
 * session ticket holds it, never its chain, so a large CA or intermediate
 * (name constraints for many domains) is no reason to refuse. The only
 * source of X509_V_ERR_APPLICATION_VERIFICATION, which conn.c logs as
 * such. */
static int verify_client_cert_size(int ok, X509_STORE_CTX *st) {
  X509 *cert = X509_STORE_CTX_get_current_cert(st);
  if (ok && X509_STORE_CTX_get_error_depth(st) == 0 && cert != NULL &&
      i2d_X509(cert, NULL) > SG_TLS_CLIENT_CERT_MAX_BYTES) {
    X509_STORE_CTX_set_error(st, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  return ok;
}

SSL_CTX *sg_tls_server_ctx_new(const sg_listener_config *l, const char **key,
                               char *err, size_t errlen) {
  const char *unused_key;
  if (key == NULL)
    key = &unused_key;
  *key = NULL;
  SSL_CTX *ctx = ctx_new(TLS_server_method(), err, errlen);
  if (ctx == NULL)
    return NULL;
  /* Several records per read(): an upload arrives in 16 KiB records, and
   * without it OpenSSL reads each record's 5-byte header, then its body,
   * and libevent waits for the socket again between records. The buffer
   * goes back between reads (SSL_MODE_RELEASE_BUFFERS); conn.c takes the
   * records a read left. */
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, SG_TLS_READ_AHEAD_BYTES);
  if (SSL_CTX_use_certificate_chain_file(ctx, l->tls_cert_file) != 1) {
    set_file_error(err, errlen, "cannot load certificate chain", l->tls_cert_file,
                   PEM_WANT_CERT);
    *key = "cert";
    goto fail;
  }
  bool encrypted;
  if (use_key_file(ctx, l->tls_key_file, &encrypted) != 1) {
    *key = "key";
    if (encrypted)
      set_encrypted_key_error(err, errlen, "private key", l->tls_key_file);
    else if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH &&
        errno != ENOMEM) {
      snprintf(err, errlen, "private key '%s' does not match certificate '%s'",
               l->tls_key_file, l->tls_cert_file);
      ERR_clear_error();
    } else {
      set_file_error(err, errlen, "cannot load private key", l->tls_key_file, PEM_WANT_KEY);
    }
    goto fail;
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    *key = "key";
    if (errno == ENOMEM)
      set_error(err, errlen, "cannot check private key", l->tls_key_file);
    else
      snprintf(err, errlen, "private key '%s' does not match certificate '%s'",
               l->tls_key_file, l->tls_cert_file);
    ERR_clear_error();
    goto fail;
  }
  char what[128];
  snprintf(what, sizeof what, "listener %s certificate", l->name);
  warn_cert_dates(ctx, what, l->tls_cert_file,
                  "clients that check it refuse every connection to this listener");
  SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, NULL);

  /* Sessions resume only on the listener that made them: the id context is
   * the listener's name, so a session from a listener with other client
   * certificate rules is never accepted here. */
  SSL_CTX_set_session_id_context(ctx, (const unsigned char *)l->name,
                                 (unsigned)strnlen(l->name, SSL_MAX_SID_CTX_LENGTH));
  /* Tickets only (TLS 1.2 and 1.3): each resumption passes through
   * ticket_decrypted, which sends a session whose client certificate is no
   * longer within its dates to a full handshake. A server-side cache would
   * resume by session id without asking, and hold every TLS 1.2 client's
   * session and certificate for hours. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_session_ticket_cb(ctx, NULL, ticket_decrypted, NULL);
  /* One TLS 1.3 ticket per connection, not OpenSSL's two: a gRPC client
   * keeps one connection and resumes at most once; the second ticket is a
   * signature-free but real cost on every new connection. */
  SSL_CTX_set_num_tickets(ctx, 1);

  if (l->client_cert_mode != SG_CLIENT_CERT_NONE) {
    if (SSL_CTX_load_verify_locations(ctx, l->client_ca_file, NULL) != 1) {
      set_file_error(err, errlen, "cannot load client CA bundle", l->client_ca_file,
                     PEM_WANT_CA);
      *key = "client_ca";
      goto fail;
    }
    /* The names a client picks its certificate by: the file loaded just
     * above, so NULL here is memory. */
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(l->client_ca_file);
    if (names == NULL) {
      set_error(err, errlen, "cannot load client CA names", l->client_ca_file);
      *key = "client_ca";
      goto fail;
    }
    SSL_CTX_set_client_CA_list(ctx, names);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    if (l->n_crl_files > 0)
      X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    /* A presented certificate that fails verification fails the
     * handshake in both modes; "optional" only allows presenting none. */
    int mode = SSL_VERIFY_PEER;
    if (l->client_cert_mode == SG_CLIENT_CERT_REQUIRED)
      mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    SSL_CTX_set_verify(ctx, mode, verify_client_cert_size);
  }
  /* Read in every mode, so that a bad file fails the load even where no
   * client certificate is asked for yet. */
  if (l->client_cert_mode == SG_CLIENT_CERT_NONE && l->client_ca_file != NULL) {
    X509_STORE *check = X509_STORE_new();
    if (check == NULL || X509_STORE_load_file(check, l->client_ca_file) != 1) {
      set_file_error(err, errlen, "cannot load client CA bundle", l->client_ca_file,
                     PEM_WANT_CA);
      *key = "client_ca";
      X509_STORE_free(check);
      goto fail;
    }
    X509_STORE_free(check);
  }
  for (size_t i = 0; i < l->n_crl_files; i++) {
    if (load_crl_file(SSL_CTX_get_cert_store(ctx), l->crl_files[i], l, err, errlen) != 0) {
      *key = "crl";
      goto fail;
    }
  }
  if (l->n_crl_files > 0 && l->client_cert_mode != SG_CLIENT_CERT_NONE &&
      ca_without_crl(SSL_CTX_get_cert_store(ctx), l, err, errlen)) {
    *key = "crl";
    goto fail;
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

SSL_CTX *sg_tls_client_ctx_new(const sg_backend_config *b, const char **key,
                               char *err, size_t errlen) {
  const char *unused_key;
  if (key == NULL)
    key = &unused_key;
  *key = NULL;
  SSL_CTX *ctx = ctx_new(TLS_client_method(), err, errlen);
  if (ctx == NULL)
    return NULL;
  /* Several records per read(), as on listeners: Spark's results come
   * this way. upstream.c takes the records a read left. */
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, SG_TLS_READ_AHEAD_BYTES);
  /* 0 is success here. */
  if (SSL_CTX_set_alpn_protos(ctx, sg_alpn_h2, sizeof sg_alpn_h2) != 0) {
    set_ctx_error(err, errlen, "cannot offer ALPN h2");
    goto fail;
  }
  if (b->tls_verify) {
    if (b->tls_ca_file != NULL) {
      if (SSL_CTX_load_verify_locations(ctx, b->tls_ca_file, NULL) != 1) {
        set_file_error(err, errlen, "cannot load CA bundle", b->tls_ca_file, PEM_WANT_CA);
        *key = "ca";
        goto fail;
      }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
      set_error(err, errlen, "cannot load the system trust store", "default");
      goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  }
  if (b->tls_cert_file != NULL) {
    if (SSL_CTX_use_certificate_chain_file(ctx, b->tls_cert_file) != 1) {
      set_file_error(err, errlen, "cannot load client certificate", b->tls_cert_file,
                     PEM_WANT_CERT);
      *key = "cert";
      goto fail;
    }
    bool encrypted;
    int used = use_key_file(ctx, b->tls_key_file, &encrypted);
    *key = "key";
    if (used != 1 && encrypted) {
      set_encrypted_key_error(err, errlen, "client key", b->tls_key_file);
      goto fail;
    }
    if (used != 1 || SSL_CTX_check_private_key(ctx) != 1) {
      set_file_error(err, errlen, "cannot load client key (or it does not match)",
                     b->tls_key_file, PEM_WANT_KEY);
      goto fail;
    }
    *key = NULL;
    warn_cert_dates(ctx, "client certificate", b->tls_cert_file,
                    "backends that ask for one refuse every connection");
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

int sg_tls_alpn_is_h2(const SSL *ssl) {
  const unsigned char *proto = NULL;
  unsigned int len = 0;
  SSL_get0_alpn_selected(ssl, &proto, &len);
  return proto != NULL && len == 2 && memcmp(proto, "h2", 2) == 0;
}

int sg_tls_reverify_client(SSL_CTX *ctx, SSL *ssl, const char **why) {
  *why = NULL;
  X509 *leaf = SSL_get0_peer_certificate(ssl);
  if (leaf == NULL)
    return 1;
  X509_STORE_CTX *vctx = X509_STORE_CTX_new();
  if (vctx == NULL)
    return -1;
  int rv = -1;
  /* Server side, the chain the client sent without its leaf; NULL after
   * a resumption. */
  STACK_OF(X509) *sent = SSL_get_peer_cert_chain(ssl);
  if (X509_STORE_CTX_init(vctx, SSL_CTX_get_cert_store(ctx), leaf, sent) == 1 &&
      X509_STORE_CTX_set_default(vctx, "ssl_client") == 1 &&
      X509_VERIFY_PARAM_set1(X509_STORE_CTX_get0_param(vctx),
                             SSL_CTX_get0_param(ctx)) == 1) {
    int ok = X509_verify_cert(vctx);
    if (ok == 1) {
      rv = 1;
    } else if (ok == 0) {
      *why = X509_verify_cert_error_string(X509_STORE_CTX_get_error(vctx));
      rv = 0;
    }
  }
  X509_STORE_CTX_free(vctx);
  ERR_clear_error();
  return rv;
}
