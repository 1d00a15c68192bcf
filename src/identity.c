/* Client identities that do not come from a JWT: see identity.h. */
#include "sparkgate/identity.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

/* ---- small helpers ----------------------------------------------------- */

static char lower_ascii(char c) {
  return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

static bool is_lower_alnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static bool is_alnum(char c) {
  return is_lower_alnum(c) || (c >= 'A' && c <= 'Z');
}

/* Copies n bytes and a NUL, or fails with "too_long". */
static int put_identity(const char *s, size_t n, bool lower, char *out,
                        size_t outlen, const char **reason) {
  if (n > SG_IDENTITY_MAX_BYTES || n + 1 > outlen) {
    *reason = "too_long";
    return -1;
  }
  for (size_t i = 0; i < n; i++)
    out[i] = lower ? lower_ascii(s[i]) : s[i];
  out[n] = '\0';
  return 0;
}

/* A SAN or CN value must be plain ASCII without controls before anything
 * else looks at it; the NUL check comes first because a NUL is how a
 * certificate makes C code see a shorter, different name. */
static const char *check_plain(const unsigned char *p, size_t n,
                               bool allow_space) {
  if (n == 0)
    return "empty";
  if (memchr(p, '\0', n) != NULL)
    return "embedded_nul";
  for (size_t i = 0; i < n; i++) {
    unsigned char c = p[i];
    if (c > 0x7e || c < 0x20 || (c == ' ' && !allow_space))
      return "bad_chars";
  }
  return NULL;
}

/* ---- SPIFFE ID and DNS name ------------------------------------------- */

bool sg_identity_spiffe_id_is_valid(const char *s, size_t len) {
  static const char scheme[] = "spiffe://";
  const size_t slen = sizeof scheme - 1;
  if (s == NULL || len > SG_IDENTITY_MAX_BYTES || len <= slen ||
      memcmp(s, scheme, slen) != 0)
    return false;
  const char *p = s + slen, *end = s + len, *td = p;
  for (; p < end && *p != '/'; p++)
    if (!is_lower_alnum(*p) && *p != '.' && *p != '-' && *p != '_')
      return false;
  size_t tdlen = (size_t)(p - td);
  if (tdlen == 0 || tdlen > 255 || p == end)
    return false;
  while (p < end) { /* *p == '/' */
    const char *seg = ++p;
    for (; p < end && *p != '/'; p++)
      if (!is_alnum(*p) && *p != '.' && *p != '-' && *p != '_')
        return false;
    size_t n = (size_t)(p - seg);
    if (n == 0 || (n == 1 && seg[0] == '.') ||
        (n == 2 && seg[0] == '.' && seg[1] == '.'))
      return false;
  }
  return true;
}

/* A host name: LDH labels of 1..63 that neither start nor end with "-",
 * at most 253 bytes. No wildcard: "*" names no single client. */
static bool dns_name_is_valid(const char *s, size_t n) {
  if (n == 0 || n > 253)
    return false;
  size_t start = 0;
  for (size_t i = 0; i <= n; i++) {
    if (i < n && s[i] != '.') {
      if (!is_alnum(s[i]) && s[i] != '-')
        return false;
      continue;
    }
    size_t lablen = i - start;
    if (lablen == 0 || lablen > 63 || s[start] == '-' || s[i - 1] == '-')
      return false;
    start = i + 1;
  }
  return true;
}

/* ---- identity from a certificate ---------------------------------------- */

int sg_cert_identity_mode_parse(const char *name, sg_cert_identity_mode *out) {
  if (name == NULL || out == NULL)
    return -1;
  if (strcmp(name, "uri_san") == 0)
    *out = SG_CERT_IDENTITY_URI_SAN;
  else if (strcmp(name, "dns_san") == 0)
    *out = SG_CERT_IDENTITY_DNS_SAN;
  else if (strcmp(name, "cn") == 0)
    *out = SG_CERT_IDENTITY_CN;
  else
    return -1;
  return 0;
}

const char *sg_cert_identity_mode_name(sg_cert_identity_mode mode) {
  switch (mode) {
  case SG_CERT_IDENTITY_URI_SAN:
    return "uri_san";
  case SG_CERT_IDENTITY_DNS_SAN:
    return "dns_san";
  case SG_CERT_IDENTITY_CN:
    return "cn";
  }
  return "unknown";
}

/* The SAN extension, or NULL in *out when there is none. A repeated or
 * undecodable extension is an error, not "no SAN": treating it as absent
 * would hide names the issuer put there. */
static int get_sans(const X509 *cert, GENERAL_NAMES **out,
                    const char **reason) {
  int crit = -1;
  *out = X509_get_ext_d2i(cert, NID_subject_alt_name, &crit, NULL);
  if (*out == NULL && crit != -1) {
    *reason = "invalid_san";
    return -1;
  }
  return 0;
}

/* The only SAN of the given type (GEN_URI or GEN_DNS). */
static int single_san(const X509 *cert, int type, const ASN1_IA5STRING **val,
                      GENERAL_NAMES **sans, const char **reason) {
  *val = NULL;
  if (get_sans(cert, sans, reason) != 0)
    return -1;
  int count = 0;
  for (int i = 0; *sans != NULL && i < sk_GENERAL_NAME_num(*sans); i++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(*sans, i);
    if (gn->type != type)
      continue;
    if (++count > 1) {
      *reason = type == GEN_URI ? "multiple_uri_sans" : "multiple_dns_sans";
      return -1;
    }
    *val = type == GEN_URI ? gn->d.uniformResourceIdentifier : gn->d.dNSName;
  }
  if (count == 0) {
    *reason = type == GEN_URI ? "no_uri_san" : "no_dns_san";
    return -1;
  }
  return 0;
}

static int identity_from_san(const X509 *cert, int type, char *out,
                             size_t outlen, const char **reason) {
  GENERAL_NAMES *sans = NULL;
  const ASN1_IA5STRING *val;
  int rv = -1;
  if (single_san(cert, type, &val, &sans, reason) != 0)
    goto done;
  const unsigned char *p = ASN1_STRING_get0_data(val);
  int n = ASN1_STRING_length(val);
  if (p == NULL || n < 0) {
    *reason = "internal";
    goto done;
  }
  if ((*reason = check_plain(p, (size_t)n, false)) != NULL)
    goto done;
  const char *s = (const char *)p;
  if (type == GEN_URI) {
    if ((size_t)n < 9 || memcmp(s, "spiffe://", 9) != 0) {
      *reason = "not_spiffe";
      goto done;
    }
    if ((size_t)n > SG_IDENTITY_MAX_BYTES) {
      *reason = "too_long";
      goto done;
    }
    if (!sg_identity_spiffe_id_is_valid(s, (size_t)n)) {
      *reason = "invalid_spiffe_id";
      goto done;
    }
    rv = put_identity(s, (size_t)n, false, out, outlen, reason);
  } else {
    if (!dns_name_is_valid(s, (size_t)n)) {
      *reason = "invalid_dns_name";
      goto done;
    }
    rv = put_identity(s, (size_t)n, true, out, outlen, reason);
  }
done:
  GENERAL_NAMES_free(sans);
  return rv;
}

static int identity_from_cn(const X509 *cert, char *out, size_t outlen,
                            const char **reason) {
  const X509_NAME *name = X509_get_subject_name(cert);
  if (name == NULL) {
    *reason = "no_cn";
    return -1;
  }
  int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (idx < 0) {
    *reason = "no_cn";
    return -1;
  }
  if (X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0) {
    *reason = "multiple_cns";
    return -1;
  }
  const ASN1_STRING *data =
      X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
  /* Decoding to UTF-8 first catches a NUL hidden in a BMPString or
   * UniversalString as well as in a UTF8String. */
  unsigned char *utf8 = NULL;
  int n = data != NULL ? ASN1_STRING_to_UTF8(&utf8, data) : -1;
  if (n < 0) {
    *reason = "bad_chars";
    return -1;
  }
  int rv = -1;
  if ((*reason = check_plain(utf8, (size_t)n, true)) != NULL)
    goto done;
  if (utf8[0] == ' ' || utf8[n - 1] == ' ') {
    *reason = "bad_chars";
    goto done;
  }
  rv = put_identity((const char *)utf8, (size_t)n, false, out, outlen, reason);
done:
  OPENSSL_free(utf8);
  return rv;
}

int sg_identity_from_cert(const X509 *cert, sg_cert_identity_mode mode,
                          char *out, size_t outlen, const char **reason) {
  const char *unused;
  if (reason == NULL)
    reason = &unused;
  *reason = NULL;
  if (out != NULL && outlen > 0)
    out[0] = '\0';
  if (cert == NULL || out == NULL || outlen == 0) {
    *reason = "internal";
    return -1;
  }
  int rv;
  switch (mode) {
  case SG_CERT_IDENTITY_URI_SAN:
    rv = identity_from_san(cert, GEN_URI, out, outlen, reason);
    break;
  case SG_CERT_IDENTITY_DNS_SAN:
    rv = identity_from_san(cert, GEN_DNS, out, outlen, reason);
    break;
  case SG_CERT_IDENTITY_CN:
    rv = identity_from_cn(cert, out, outlen, reason);
    break;
  default:
    *reason = "internal";
    rv = -1;
  }
  if (rv != 0) {
    out[0] = '\0';
    if (*reason == NULL)
      *reason = "internal";
  }
  return rv;
}

/* ---- thumbprint and XFCC --------------------------------------------- */

static int cert_sha256(const X509 *cert, unsigned char md[32]) {
  unsigned int mdlen = 0;
  if (cert == NULL || !X509_digest(cert, EVP_sha256(), md, &mdlen) ||
      mdlen != 32)
    return -1;
  return 0;
}

int sg_identity_cert_thumbprint(const X509 *cert, char *out, size_t outlen) {
  unsigned char md[32];
  unsigned char b64[48]; /* 44 characters and a NUL */
  if (out == NULL || outlen < SG_IDENTITY_THUMBPRINT_LEN + 1)
    return -1;
  out[0] = '\0';
  if (cert_sha256(cert, md) != 0)
    return -1;
  if (EVP_EncodeBlock(b64, md, (int)sizeof md) != 44)
    return -1;
  /* base64 to base64url; the 44th character is the one "=" of padding. */
  for (size_t i = 0; i < SG_IDENTITY_THUMBPRINT_LEN; i++) {
    char c = (char)b64[i];
    out[i] = c == '+' ? '-' : c == '/' ? '_' : c;
  }
  out[SG_IDENTITY_THUMBPRINT_LEN] = '\0';
  return 0;
}

typedef struct outbuf {
  char *p;
  size_t cap, len;
  bool overflow;
} outbuf;

static void ob_put(outbuf *b, const char *s, size_t n) {
  if (n == 0)
    return;
  if (b->overflow || n >= b->cap - b->len) {
    b->overflow = true;
    return;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void ob_puts(outbuf *b, const char *s) { ob_put(b, s, strlen(s)); }

/* Quotes when needed (always when force), escaping " and \ inside. */
static void ob_value(outbuf *b, const char *s, size_t n, bool force) {
  bool quote = force;
  for (size_t i = 0; i < n && !quote; i++)
    quote = strchr(",;=\"\\ ", s[i]) != NULL;
  if (quote)
    ob_put(b, "\"", 1);
  for (size_t i = 0; i < n; i++) {
    if (quote && (s[i] == '"' || s[i] == '\\'))
      ob_put(b, "\\", 1);
    ob_put(b, s + i, 1);
  }
  if (quote)
    ob_put(b, "\"", 1);
}

static void ob_san(outbuf *b, const char *key, const ASN1_IA5STRING *v) {
  const unsigned char *p = ASN1_STRING_get0_data(v);
  int n = ASN1_STRING_length(v);
  /* A header value cannot carry NUL, CR, LF or non-ASCII safely. */
  if (p == NULL || n <= 0 || check_plain(p, (size_t)n, true) != NULL)
    return;
  ob_put(b, ";", 1);
  ob_puts(b, key);
  ob_value(b, (const char *)p, (size_t)n, false);
}

int sg_identity_xfcc(const X509 *cert, char *out, size_t outlen) {
  unsigned char md[32];
  if (out == NULL || outlen == 0)
    return -1;
  out[0] = '\0';
  if (cert_sha256(cert, md) != 0)
    return -1;

  outbuf b = {.p = out, .cap = outlen};
  static const char hex[] = "0123456789abcdef";
  char hash[65];
  for (size_t i = 0; i < sizeof md; i++) {
    hash[2 * i] = hex[md[i] >> 4];
    hash[2 * i + 1] = hex[md[i] & 15];
  }
  hash[64] = '\0';
  ob_puts(&b, "Hash=");
  ob_puts(&b, hash);

  const X509_NAME *subject = X509_get_subject_name(cert);
  if (subject != NULL && X509_NAME_entry_count(subject) > 0) {
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL)
      return -1;
    /* XN_FLAG_RFC2253 escapes controls and bytes over 0x7f as \XX, so the
     * text is ASCII; Envoy prints the subject the same way. */
    int n = X509_NAME_print_ex(bio, subject, 0, XN_FLAG_RFC2253);
    char *text = NULL;
    long tlen = BIO_get_mem_data(bio, &text);
    if (n < 0 || tlen < 0 ||
        (tlen > 0 && check_plain((const unsigned char *)text, (size_t)tlen,
                                 true) != NULL)) {
      BIO_free(bio);
      return -1;
    }
    ob_puts(&b, ";Subject=");
    ob_value(&b, text, (size_t)tlen, true);
    BIO_free(bio);
  }

  GENERAL_NAMES *sans = NULL;
  const char *reason = NULL;
  if (get_sans(cert, &sans, &reason) != 0)
    return -1;
  bool have_uri = false;
  for (int i = 0; sans != NULL && i < sk_GENERAL_NAME_num(sans); i++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
    if (gn->type == GEN_URI && !have_uri) {
      have_uri = true;
      ob_san(&b, "URI=", gn->d.uniformResourceIdentifier);
    }
  }
  for (int i = 0; sans != NULL && i < sk_GENERAL_NAME_num(sans); i++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
    if (gn->type == GEN_DNS)
      ob_san(&b, "DNS=", gn->d.dNSName);
  }
  GENERAL_NAMES_free(sans);
  if (b.overflow) {
    out[0] = '\0';
    return -1;
  }
  return 0;
}

/* ---- headers a client must not send ---------------------------------- */

void sg_identity_header_names_default(sg_identity_header_names *out) {
  if (out == NULL)
    return;
  memset(out, 0, sizeof *out);
  strcpy(out->identity, SG_IDENTITY_HEADER_IDENTITY_DEFAULT);
  strcpy(out->tenant, SG_IDENTITY_HEADER_TENANT_DEFAULT);
  strcpy(out->auth_method, SG_IDENTITY_HEADER_AUTH_METHOD_DEFAULT);
  strcpy(out->provider, SG_IDENTITY_HEADER_PROVIDER_DEFAULT);
}

static char fold(uint8_t c) {
  return c == '_' ? '-' : lower_ascii((char)c);
}

/* The first |n| bytes of name, folded, equal lit folded. */
static bool folded_eq(const uint8_t *name, const char *lit, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (fold(name[i]) != fold((uint8_t)lit[i]))
      return false;
  return true;
}

typedef struct spoofable_name {
  const char *name;
  size_t len;
} spoofable_name;

#define SPOOFABLE(lit) {lit, sizeof(lit) - 1}
static const spoofable_name fixed_spoofable[] = {
    SPOOFABLE(SG_IDENTITY_HEADER_XFCC),
    SPOOFABLE("client-cert"),
    SPOOFABLE("client-cert-chain"),
    SPOOFABLE("forwarded"),
    SPOOFABLE("x-real-ip"),
    SPOOFABLE(SG_IDENTITY_HEADER_IDENTITY_DEFAULT),
    SPOOFABLE(SG_IDENTITY_HEADER_TENANT_DEFAULT),
    SPOOFABLE(SG_IDENTITY_HEADER_AUTH_METHOD_DEFAULT),
    SPOOFABLE(SG_IDENTITY_HEADER_PROVIDER_DEFAULT),
};
#undef SPOOFABLE

/* The lengths of those names, one bit each: most request headers (every
 * content-type, user-agent, authorization) are told apart by this alone. */
#define LEN_BIT(lit) (UINT64_C(1) << (sizeof(lit) - 1))
static const uint64_t fixed_spoofable_lengths =
    LEN_BIT(SG_IDENTITY_HEADER_XFCC) | LEN_BIT("client-cert") | LEN_BIT("client-cert-chain") |
    LEN_BIT("forwarded") | LEN_BIT("x-real-ip") | LEN_BIT(SG_IDENTITY_HEADER_IDENTITY_DEFAULT) |
    LEN_BIT(SG_IDENTITY_HEADER_TENANT_DEFAULT) | LEN_BIT(SG_IDENTITY_HEADER_AUTH_METHOD_DEFAULT) |
    LEN_BIT(SG_IDENTITY_HEADER_PROVIDER_DEFAULT);
#undef LEN_BIT
_Static_assert(sizeof SG_IDENTITY_HEADER_PROVIDER_DEFAULT <= 64 &&
                   sizeof "client-cert-chain" <= 64 && sizeof SG_IDENTITY_HEADER_XFCC <= 64,
               "fixed_spoofable_lengths holds lengths under 64");

#define FORWARDED_PREFIX "x-forwarded-"

bool sg_identity_header_is_spoofable(const uint8_t *name, size_t len,
                                     const sg_identity_header_names *own) {
  if (name == NULL || len == 0)
    return false;
  /* Every request header comes through here: length and first letter
   * tell almost all of them apart before any byte is folded. */
  char first = fold(name[0]);
  if (first == ':')
    return false; /* a pseudo-header: no identity header is one */
  if (first == 'x' && len >= sizeof FORWARDED_PREFIX - 1 &&
      folded_eq(name, FORWARDED_PREFIX, sizeof FORWARDED_PREFIX - 1))
    return true;
  /* Every fixed name starts with one of these letters. */
  if ((first == 'x' || first == 'c' || first == 'f') && len < 64 &&
      (fixed_spoofable_lengths >> len & 1) != 0) {
    for (size_t i = 0; i < sizeof fixed_spoofable / sizeof *fixed_spoofable; i++) {
      const spoofable_name *f = &fixed_spoofable[i];
      if (f->len == len && f->name[0] == first && folded_eq(name, f->name, len))
        return true;
    }
  }
  if (own != NULL) {
    const char *names[] = {own->identity, own->tenant, own->auth_method,
                           own->provider};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
      if (names[i][0] != '\0' && fold((uint8_t)names[i][0]) == first &&
          strlen(names[i]) == len && folded_eq(name, names[i], len))
        return true;
  }
  return false;
}

bool sg_identity_header_has_underscore(const uint8_t *name, size_t len,
                                       const sg_identity_header_names *own) {
  return name != NULL && len > 0 && memchr(name, '_', len) != NULL &&
         sg_identity_header_is_spoofable(name, len, own);
}

sg_identity_header_action
sg_identity_header_classify(const uint8_t *name, size_t len,
                            const sg_identity_header_names *own) {
  if (!sg_identity_header_is_spoofable(name, len, own))
    return SG_IDENTITY_HEADER_PASS;
  return memchr(name, '_', len) != NULL ? SG_IDENTITY_HEADER_REJECT
                                        : SG_IDENTITY_HEADER_STRIP;
}

/* ---- configuration ------------------------------------------------------ */

typedef struct reporter {
  sg_identity_report_fn fn;
  void *ctx;
  int count;
} reporter;

__attribute__((format(printf, 4, 5))) static void
report_at(reporter *r, const char *path, const char *key, const char *fmt,
          ...) {
  char full[512], msg[512];
  if (key != NULL)
    snprintf(full, sizeof full, "%s.%s", path, key);
  else
    snprintf(full, sizeof full, "%s", path);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  r->count++;
  if (r->fn != NULL)
    r->fn(r->ctx, full, msg);
}

void sg_listener_auth_default(sg_listener_auth *out) {
  if (out == NULL)
    return;
  *out = (sg_listener_auth){
      .methods = SG_LISTENER_AUTH_JWT,
      .require = SG_LISTENER_AUTH_REQUIRE_ANY,
      .client_identity = SG_CERT_IDENTITY_URI_SAN,
      .bind_token_to_certificate = false,
  };
}

static void parse_methods(json_t *v, const char *path, sg_listener_auth *out,
                          reporter *r) {
  static const char fix[] =
      "must be a non-empty array of \"jwt\" and/or \"mtls\", e.g. "
      "[\"jwt\", \"mtls\"]";
  if (!json_is_array(v) || json_array_size(v) == 0) {
    report_at(r, path, "methods", "%s", fix);
    return;
  }
  unsigned methods = 0;
  bool bad = false;
  size_t i;
  json_t *e;
  json_array_foreach(v, i, e) {
    char at[64];
    snprintf(at, sizeof at, "methods[%zu]", i);
    const char *s = json_string_value(e);
    unsigned m = 0;
    if (s != NULL && strcmp(s, "jwt") == 0)
      m = SG_LISTENER_AUTH_JWT;
    else if (s != NULL && strcmp(s, "mtls") == 0)
      m = SG_LISTENER_AUTH_MTLS;
    if (m == 0) {
      if (s != NULL)
        report_at(r, path, at,
                  "unknown method \"%.40s\"; use \"jwt\" or \"mtls\"", s);
      else
        report_at(r, path, at, "must be the string \"jwt\" or \"mtls\"");
      bad = true;
    } else if (methods & m) {
      report_at(r, path, at, "\"%s\" is listed twice; list it once", s);
      bad = true;
    }
    methods |= m;
  }
  if (!bad)
    out->methods = methods;
}

static void parse_choice(json_t *v, const char *path, const char *key,
                         const char *const *names, size_t n, int *out,
                         reporter *r) {
  const char *s = json_string_value(v);
  for (size_t i = 0; s != NULL && i < n; i++)
    if (strcmp(s, names[i]) == 0) {
      *out = (int)i;
      return;
    }
  char choices[128] = "";
  for (size_t i = 0; i < n; i++) {
    size_t l = strlen(choices);
    snprintf(choices + l, sizeof choices - l, "%s\"%s\"",
             i == 0 ? "" : (i + 1 == n ? " or " : ", "), names[i]);
  }
  if (s != NULL)
    report_at(r, path, key, "unknown value \"%.40s\"; use %s", s, choices);
  else
    report_at(r, path, key, "must be a string: %s", choices);
}

int sg_listener_auth_parse(json_t *obj, const char *path,
                           sg_listener_auth *out, sg_identity_report_fn report,
                           void *ctx) {
  reporter r = {.fn = report, .ctx = ctx};
  sg_listener_auth tmp;
  sg_listener_auth_default(&tmp);
  if (path == NULL)
    path = "auth";
  if (obj == NULL)
    goto done;
  if (!json_is_object(obj)) {
    report_at(&r, path, NULL,
              "must be an object, e.g. {\"methods\": [\"jwt\", \"mtls\"], "
              "\"require\": \"any\"}");
    goto done;
  }

  static const char *const requires[] = {"any", "all"};
  static const char *const modes[] = {"uri_san", "dns_san", "cn"};
  bool methods_ok = true, require_ok = true, bind_ok = true;
  bool identity_given = false;
  const char *key;
  json_t *v;
  json_object_foreach(obj, key, v) {
    int before = r.count;
    if (strcmp(key, "methods") == 0) {
      parse_methods(v, path, &tmp, &r);
      methods_ok = r.count == before;
    } else if (strcmp(key, "require") == 0) {
      int i = (int)tmp.require;
      parse_choice(v, path, key, requires, 2, &i, &r);
      tmp.require = (sg_listener_auth_require)i;
      require_ok = r.count == before;
    } else if (strcmp(key, "client_identity") == 0) {
      int i = (int)tmp.client_identity;
      parse_choice(v, path, key, modes, 3, &i, &r);
      tmp.client_identity = (sg_cert_identity_mode)i;
      identity_given = true;
    } else if (strcmp(key, "bind_token_to_certificate") == 0) {
      if (json_is_boolean(v))
        tmp.bind_token_to_certificate = json_is_true(v);
      else
        report_at(&r, path, key, "must be true or false");
      bind_ok = r.count == before;
    } else {
      report_at(&r, path, key,
                "unknown key; the keys are methods, require, "
                "client_identity and bind_token_to_certificate");
    }
  }

  /* Settings that cannot take effect are mistakes worth stopping for: an
   * operator who wrote them expects a protection that would not exist. */
  const unsigned both = SG_LISTENER_AUTH_JWT | SG_LISTENER_AUTH_MTLS;
  if (methods_ok && require_ok &&
      tmp.require == SG_LISTENER_AUTH_REQUIRE_ALL && tmp.methods != both)
    report_at(&r, path, "require",
              "\"all\" needs both methods; set \"methods\": [\"jwt\", "
              "\"mtls\"] or use \"any\"");
  if (methods_ok && bind_ok && tmp.bind_token_to_certificate &&
      tmp.methods != both)
    report_at(&r, path, "bind_token_to_certificate",
              "needs both methods; set \"methods\": [\"jwt\", \"mtls\"]");
  if (methods_ok && identity_given && !(tmp.methods & SG_LISTENER_AUTH_MTLS))
    report_at(&r, path, "client_identity",
              "only applies with \"mtls\" in methods; add \"mtls\" or remove "
              "this key");

done:
  if (out != NULL)
    *out = tmp;
  return r.count == 0 ? 0 : -1;
}

static bool is_lower_tchar(char c) {
  /* RFC 9110 tchar without upper case and without "_" (see below). */
  return is_lower_alnum(c) || (c != '\0' && strchr("!#$%&'*+-.^`|~", c));
}

/* Why name cannot be one of the proxy's headers, or NULL. */
static const char *header_name_problem(const char *s, size_t n) {
  static const char *const hop_by_hop[] = {
      "connection", "keep-alive", "proxy-connection", "transfer-encoding",
      "upgrade",    "te",         "trailer",          "proxy-authenticate",
      "proxy-authorization"};
  static const char *const reserved[] = {
      "authorization", "host", "content-type", "content-length", "user-agent",
      "forwarded", "x-real-ip", "client-cert", "client-cert-chain"};
  if (n == 0 || n > SG_IDENTITY_HEADER_NAME_MAX)
    return "must be 1 to 64 characters long";
  if (s[0] == ':')
    return "is a pseudo-header name; use a regular name such as "
           "\"x-sparkgate-identity\"";
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '_')
      return "must not contain \"_\" (clients sending names with \"_\" are "
             "refused); use \"-\"";
    if (!is_lower_tchar(s[i]))
      return "must hold only lowercase letters, digits and \"-\" (HTTP/2 "
             "header names are lowercase tokens)";
  }
  for (size_t i = 0; i < sizeof hop_by_hop / sizeof *hop_by_hop; i++)
    if (strcmp(s, hop_by_hop[i]) == 0)
      return "is a hop-by-hop header, never forwarded; choose another name";
  for (size_t i = 0; i < sizeof reserved / sizeof *reserved; i++)
    if (strcmp(s, reserved[i]) == 0)
      return "is a standard header with its own meaning; choose another name";
  if (strncmp(s, "grpc-", 5) == 0)
    return "grpc-* names are reserved by gRPC; choose another name";
  if (strncmp(s, "x-forwarded-", 12) == 0)
    return "x-forwarded-* names carry proxy information with their own "
           "meaning; choose another name";
  return NULL;
}

int sg_identity_headers_parse(json_t *obj, const char *path,
                              sg_identity_header_names *out,
                              sg_identity_report_fn report, void *ctx) {
  reporter r = {.fn = report, .ctx = ctx};
  sg_identity_header_names tmp;
  sg_identity_header_names_default(&tmp);
  if (path == NULL)
    path = "identity_headers";
  if (obj == NULL)
    goto done;
  if (!json_is_object(obj)) {
    report_at(&r, path, NULL,
              "must be an object, e.g. {\"identity\": "
              "\"x-sparkgate-identity\"}");
    goto done;
  }
  struct {
    const char *key;
    char *dst;
  } fields[] = {{"identity", tmp.identity},
                {"tenant", tmp.tenant},
                {"auth_method", tmp.auth_method},
                {"provider", tmp.provider}};
  const size_t nf = sizeof fields / sizeof *fields;
  const char *key;
  json_t *v;
  json_object_foreach(obj, key, v) {
    size_t f = 0;
    while (f < nf && strcmp(key, fields[f].key) != 0)
      f++;
    if (f == nf) {
      report_at(&r, path, key,
                "unknown key; the keys are identity, tenant, auth_method "
                "and provider");
      continue;
    }
    const char *s = json_string_value(v);
    if (s == NULL) {
      report_at(&r, path, key, "must be a string (a header name)");
      continue;
    }
    size_t n = json_string_length(v);
    const char *problem =
        strlen(s) != n ? "must not contain NUL" : header_name_problem(s, n);
    if (problem != NULL) {
      report_at(&r, path, key, "\"%.64s\" %s", s, problem);
      continue;
    }
    memcpy(fields[f].dst, s, n + 1);
  }
  /* Two roles in one header would let one value be read as the other. */
  for (size_t i = 1; i < nf; i++)
    for (size_t j = 0; j < i; j++)
      if (strcmp(fields[i].dst, fields[j].dst) == 0)
        report_at(&r, path, fields[i].key,
                  "\"%s\" is also the %s header; every header needs its own "
                  "name",
                  fields[i].dst, fields[j].key);
done:
  if (out != NULL)
    *out = tmp;
  return r.count == 0 ? 0 : -1;
}

/* ---- the decision ----------------------------------------------------- */

static const char *const deny_names[SG_IDENTITY_DENY_COUNT] = {
    [SG_IDENTITY_DENY_NONE] = "none",
    [SG_IDENTITY_DENY_NO_CREDENTIALS] = "no_credentials",
    [SG_IDENTITY_DENY_JWT_INVALID] = "jwt_invalid",
    [SG_IDENTITY_DENY_JWT_REQUIRED] = "jwt_required",
    [SG_IDENTITY_DENY_CERT_REQUIRED] = "cert_required",
    [SG_IDENTITY_DENY_NO_CERT_IDENTITY] = "no_cert_identity",
    [SG_IDENTITY_DENY_TOKEN_NOT_BOUND] = "token_not_bound",
    [SG_IDENTITY_DENY_BOUND_TOKEN_NO_CERT] = "bound_token_no_cert",
    [SG_IDENTITY_DENY_TOKEN_CERT_MISMATCH] = "token_cert_mismatch",
    [SG_IDENTITY_DENY_INTERNAL] = "internal",
};

const char *sg_identity_deny_name(sg_identity_deny deny) {
  if ((unsigned)deny >= SG_IDENTITY_DENY_COUNT)
    return "unknown";
  return deny_names[deny];
}

static bool deny(sg_identity_decision *out, sg_identity_deny why,
                 const char *detail) {
  *out = (sg_identity_decision){
      .allow = false,
      .deny = why,
      .reason = sg_identity_deny_name(why),
      .detail = detail,
  };
  return false;
}

static bool allow(sg_identity_decision *out, const char *identity,
                  const char *provider, const char *method) {
  *out = (sg_identity_decision){
      .allow = true,
      .identity = identity,
      .provider = provider,
      .method = method,
      .deny = SG_IDENTITY_DENY_NONE,
      .reason = sg_identity_deny_name(SG_IDENTITY_DENY_NONE),
  };
  return true;
}

bool sg_identity_decide(const sg_listener_auth *policy,
                        const sg_identity_jwt_input *jwt,
                        const sg_identity_cert_input *cert,
                        sg_identity_decision *out) {
  sg_identity_decision scratch;
  if (out == NULL)
    out = &scratch;
  if (policy == NULL)
    return deny(out, SG_IDENTITY_DENY_INTERNAL, NULL);

  const bool jwt_on = (policy->methods & SG_LISTENER_AUTH_JWT) != 0;
  const bool mtls_on = (policy->methods & SG_LISTENER_AUTH_MTLS) != 0;
  const sg_identity_jwt_state js =
      jwt_on && jwt != NULL ? jwt->state : SG_IDENTITY_JWT_NONE;
  const bool cert_present =
      cert != NULL && cert->state == SG_IDENTITY_CERT_VERIFIED;
  const bool cert_counts = mtls_on && cert_present;

  if (js == SG_IDENTITY_JWT_INVALID)
    return deny(out, SG_IDENTITY_DENY_JWT_INVALID, jwt->reason);
  if (js == SG_IDENTITY_JWT_VALID &&
      (jwt->identity == NULL || jwt->identity[0] == '\0'))
    return deny(out, SG_IDENTITY_DENY_INTERNAL, "token without identity");
  if (js != SG_IDENTITY_JWT_NONE && js != SG_IDENTITY_JWT_VALID)
    return deny(out, SG_IDENTITY_DENY_INTERNAL, "unknown token state");

  bool bound = false;
  if (js == SG_IDENTITY_JWT_VALID) {
    if (jwt->cnf_x5t_s256 != NULL) {
      if (!cert_present)
        return deny(out, SG_IDENTITY_DENY_BOUND_TOKEN_NO_CERT, NULL);
      /* Both are public values: no need for a constant-time compare. */
      if (cert->thumbprint == NULL ||
          strcmp(jwt->cnf_x5t_s256, cert->thumbprint) != 0)
        return deny(out, SG_IDENTITY_DENY_TOKEN_CERT_MISMATCH, NULL);
      bound = true;
    } else if (policy->bind_token_to_certificate) {
      return deny(out, SG_IDENTITY_DENY_TOKEN_NOT_BOUND, NULL);
    }
  }

  const bool cert_has_identity =
      cert_counts && cert->identity != NULL && cert->identity[0] != '\0';

  if (policy->require == SG_LISTENER_AUTH_REQUIRE_ALL) {
    if (js == SG_IDENTITY_JWT_NONE && !cert_counts)
      return deny(out, SG_IDENTITY_DENY_NO_CREDENTIALS, NULL);
    if (js == SG_IDENTITY_JWT_NONE)
      return deny(out, SG_IDENTITY_DENY_JWT_REQUIRED, NULL);
    if (!cert_counts)
      return deny(out, SG_IDENTITY_DENY_CERT_REQUIRED, NULL);
    if (!cert_has_identity)
      return deny(out, SG_IDENTITY_DENY_NO_CERT_IDENTITY,
                  cert->identity_reason);
    return allow(out, jwt->identity, jwt->provider,
                 SG_IDENTITY_METHOD_JWT_MTLS);
  }

  if (js == SG_IDENTITY_JWT_VALID)
    return allow(out, jwt->identity, jwt->provider,
                 bound ? SG_IDENTITY_METHOD_JWT_MTLS : SG_IDENTITY_METHOD_JWT);
  if (cert_counts) {
    if (!cert_has_identity)
      return deny(out, SG_IDENTITY_DENY_NO_CERT_IDENTITY,
                  cert->identity_reason);
    return allow(out, cert->identity, NULL, SG_IDENTITY_METHOD_MTLS);
  }
  return deny(out, SG_IDENTITY_DENY_NO_CREDENTIALS, NULL);
}
