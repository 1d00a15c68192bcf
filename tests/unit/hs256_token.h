/* An HS256 JWT for tests: base64url(header).base64url(payload).signature,
 * encoded with OpenSSL's EVP_EncodeBlock (base64, then the URL alphabet
 * and no padding) and signed with its HMAC. */
#ifndef SG_TEST_HS256_TOKEN_H
#define SG_TEST_HS256_TOKEN_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

/* Appends base64url of in to out (room for 4/3 of len and 3 more). */
static inline size_t test_b64url(const unsigned char *in, size_t len, char *out) {
  int n = EVP_EncodeBlock((unsigned char *)out, in, (int)len);
  while (n > 0 && out[n - 1] == '=')
    n--;
  for (int i = 0; i < n; i++)
    out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
  out[n] = '\0';
  return (size_t)n;
}

/* Writes the token for payload (JSON) signed with key into out; exits 2
 * when it does not fit. */
static inline void test_hs256_token(const void *key, size_t keylen, const char *payload,
                                    char *out, size_t outlen) {
  static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
  size_t plen = strlen(payload);
  if ((sizeof header + plen) / 3 * 4 + 64 + 8 > outlen)
    exit(2);
  size_t n = test_b64url((const unsigned char *)header, sizeof header - 1, out);
  out[n++] = '.';
  n += test_b64url((const unsigned char *)payload, plen, out + n);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned maclen = 0;
  if (HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)out, n, mac, &maclen) ==
      NULL)
    exit(2);
  out[n++] = '.';
  test_b64url(mac, maclen, out + n);
}

#endif
