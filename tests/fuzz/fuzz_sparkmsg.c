/* libFuzzer target: the streaming Spark Connect message scanner/rewriter
 * (sparkmsg.h), which reads request bodies straight from clients.
 *
 * Each input is one request stream, run through a scanner in each of the
 * three user modes. The stream is fed in chunks whose sizes come from a
 * hash of the input (DATA frames split gRPC messages anywhere), and so do
 * the scanner options (header window, size limit, identity, user_name
 * mode). Checked for every run:
 *   - a rejection is sticky: later feeds and finish return the same reason
 *     and emit nothing;
 *   - off and enforce modes never change a byte: the output is always a
 *     prefix of the input, and all of it when the stream is approved;
 *   - the output holds every approved message in full and never a complete
 *     message that was not approved;
 *   - approved output parses again: in rewrite mode, rewriting it again
 *     gives the same bytes and enforce mode accepts it;
 *   - the header (session_id, user_id) is known once a message is approved.
 * A violation aborts; libFuzzer reports it as a crash. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_support.h"
#include "sparkgate/sparkmsg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


/* ---- output collection -------------------------------------------------- */

typedef struct sink {
  uint8_t *buf;
  size_t len, cap;
  bool closed; /* set after a rejection: any further output is a bug */
} sink;

static int sink_out(void *arg, const uint8_t *p, size_t n) {
  sink *k = arg;
  FUZZ_CHECK(!k->closed);
  FUZZ_CHECK(n > 0);
  if (k->len + n > k->cap) {
    size_t cap = k->cap ? k->cap : 256;
    while (cap < k->len + n)
      cap *= 2;
    uint8_t *nb = realloc(k->buf, cap);
    FUZZ_CHECK(nb != NULL);
    k->buf = nb;
    k->cap = cap;
  }
  memcpy(k->buf + k->len, p, n);
  k->len += n;
  return 0;
}

/* ---- deterministic choices from the input ------------------------------- */

static uint64_t fnv1a(const uint8_t *p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

static uint64_t next_rand(uint64_t *state) {
  /* xorshift64*: small, and the same on every platform. */
  uint64_t x = *state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return x * 2685821657736338717ull;
}

/* ---- one run ------------------------------------------------------------ */

typedef struct run_result {
  sg_sparkmsg_reason reason;
  uint64_t messages;
  bool header_known;
  char session_id[SG_SPARKMSG_SESSION_ID_MAX_BYTES + 1];
  bool user_id_present;
  char user_id[SG_SPARKMSG_USER_CONTEXT_MAX_BYTES + 1];
} run_result;

/* Feeds |data| in chunks drawn from |rng| (NULL: one piece) to a new
 * scanner, checking stickiness of rejection; the output goes to |out|. */
static void run(const sg_sparkmsg_options *opts, const uint8_t *data,
                size_t size, uint64_t *rng, sink *out, run_result *res) {
  char err[128];
  sg_sparkmsg *s = sg_sparkmsg_new(opts, err, sizeof err);
  FUZZ_CHECK(s != NULL);
  memset(res, 0, sizeof *res);
  size_t pos = 0;
  sg_sparkmsg_reason r = SG_SPARKMSG_OK;
  while (pos < size) {
    size_t n = size - pos;
    if (rng != NULL) {
      uint64_t x = next_rand(rng);
      /* Mostly small pieces (frame splits inside prefixes and varints),
       * sometimes large ones (whole messages in one call). */
      size_t want = (x & 3) == 0 ? (size_t)(x >> 8) % 4096 + 1
                                 : (size_t)(x >> 8) % 17 + 1;
      if (want < n)
        n = want;
    }
    bool was_rejected = r != SG_SPARKMSG_OK;
    size_t before = out->len;
    sg_sparkmsg_reason nr = sg_sparkmsg_feed(s, data + pos, n, sink_out, out);
    if (was_rejected) {
      FUZZ_CHECK(nr == r);
      FUZZ_CHECK(out->len == before);
    }
    if (nr != SG_SPARKMSG_OK && !was_rejected) {
      FUZZ_CHECK(sg_sparkmsg_reason_of(s) == nr);
      FUZZ_CHECK(sg_sparkmsg_error(s)[0] != '\0');
      FUZZ_CHECK(strcmp(sg_sparkmsg_reason_name(nr), "unknown") != 0);
      int st = sg_sparkmsg_reason_grpc_status(nr);
      FUZZ_CHECK(st == 3 || st == 7 || st == 13);
      out->closed = true;
    }
    r = nr;
    pos += n;
  }
  size_t before = out->len;
  sg_sparkmsg_reason fr = sg_sparkmsg_finish(s);
  FUZZ_CHECK(out->len == before); /* finish emits nothing */
  if (r != SG_SPARKMSG_OK)
    FUZZ_CHECK(fr == r);
  FUZZ_CHECK(sg_sparkmsg_finish(s) == fr);
  if (fr == SG_SPARKMSG_OK)
    FUZZ_CHECK(sg_sparkmsg_error(s)[0] == '\0');
  res->reason = fr;
  res->messages = sg_sparkmsg_messages(s);
  sg_sparkmsg_header h;
  res->header_known = sg_sparkmsg_header_known(s, &h);
  /* Approving a message decides the header. */
  if (res->messages > 0)
    FUZZ_CHECK(res->header_known);
  if (res->header_known) {
    size_t sl = strlen(h.session_id);
    FUZZ_CHECK(sl >= 1 && sl <= SG_SPARKMSG_SESSION_ID_MAX_BYTES);
    memcpy(res->session_id, h.session_id, sl + 1);
    res->user_id_present = h.user_id_present;
    if (!h.user_id_present)
      FUZZ_CHECK(h.user_id[0] == '\0');
    size_t ul = strlen(h.user_id);
    FUZZ_CHECK(ul <= SG_SPARKMSG_USER_CONTEXT_MAX_BYTES);
    memcpy(res->user_id, h.user_id, ul + 1);
  }
  sg_sparkmsg_free(s);
}

/* Offset just past message |k| (0-based) of a gRPC stream, or SIZE_MAX
 * when the stream does not hold that many complete prefixes. */
static size_t message_end(const uint8_t *p, size_t n, uint64_t k) {
  size_t off = 0;
  for (uint64_t i = 0; i <= k; i++) {
    if (n - off < SG_SPARKMSG_PREFIX_BYTES)
      return SIZE_MAX;
    uint64_t len = (uint64_t)p[off + 1] << 24 | (uint64_t)p[off + 2] << 16 |
                   (uint64_t)p[off + 3] << 8 | p[off + 4];
    if (len > n - off - SG_SPARKMSG_PREFIX_BYTES)
      return SIZE_MAX;
    off += SG_SPARKMSG_PREFIX_BYTES + (size_t)len;
  }
  return off;
}

/* The output holds exactly |messages| complete messages, then at most a
 * strict prefix of one more. */
static void check_message_count(const uint8_t *out, size_t len,
                                uint64_t messages) {
  size_t approved = messages == 0 ? 0 : message_end(out, len, messages - 1);
  FUZZ_CHECK(approved != SIZE_MAX && approved <= len);
  FUZZ_CHECK(message_end(out, len, messages) == SIZE_MAX);
}

static const char *const identities[] = {
    "alice",
    "spiffe://example.org/ns/acme/sa/etl",
    "\xc3\xa9milie@\xe4\xbe\x8b.example", /* multi-byte UTF-8 */
    /* 150 bytes: its length varint takes two bytes */
    "0123456789012345678901234567890123456789012345678901234567890123456789"
    "0123456789012345678901234567890123456789012345678901234567890123456789"
    "0123456789",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint64_t h = fnv1a(data, size);
  uint64_t pick = h;
  sg_sparkmsg_options base = {0};
  base.identity = identities[next_rand(&pick) % 4];
  base.header_window_bytes = (next_rand(&pick) & 1) ? SG_SPARKMSG_MIN_HEADER_WINDOW_BYTES : 0;
  base.max_message_bytes = (next_rand(&pick) & 3) == 0 ? 300 : 0;
  base.user_name_mode = (next_rand(&pick) & 1) ? SG_SPARKMSG_USER_NAME_IDENTITY
                                               : SG_SPARKMSG_USER_NAME_DROP;

  static const sg_sparkmsg_user_mode modes[] = {
      SG_SPARKMSG_USER_OFF, SG_SPARKMSG_USER_ENFORCE, SG_SPARKMSG_USER_REWRITE};
  for (size_t m = 0; m < 3; m++) {
    sg_sparkmsg_options o = base;
    o.user_mode = modes[m];
    uint64_t rng = h ^ (0x9e3779b97f4a7c15ull * (m + 1));
    sink out = {0};
    run_result res;
    run(&o, data, size, &rng, &out, &res);

    check_message_count(out.buf, out.len, res.messages);

    if (o.user_mode != SG_SPARKMSG_USER_REWRITE) {
      /* Pass-through modes never change a byte. */
      FUZZ_CHECK(out.len <= size);
      FUZZ_CHECK(out.len == 0 || memcmp(out.buf, data, out.len) == 0);
      if (res.reason == SG_SPARKMSG_OK)
        FUZZ_CHECK(out.len == size);
      /* Approved messages are emitted whole, the rejected one never is. */
      size_t approved = res.messages == 0 ? 0 : message_end(data, size, res.messages - 1);
      FUZZ_CHECK(approved != SIZE_MAX && out.len >= approved);
      if (res.reason != SG_SPARKMSG_OK) {
        size_t rejected_end = message_end(data, size, res.messages);
        FUZZ_CHECK(rejected_end == SIZE_MAX || out.len < rejected_end);
      }
      if (o.user_mode == SG_SPARKMSG_USER_ENFORCE && res.header_known) {
        FUZZ_CHECK(res.user_id_present);
        FUZZ_CHECK(strcmp(res.user_id, o.identity) == 0);
      }
    }

    if (res.reason == SG_SPARKMSG_OK) {
      /* The same stream in one piece gets the same verdict and bytes:
       * chunking must not matter. */
      sink whole = {0};
      run_result wres;
      run(&o, data, size, NULL, &whole, &wres);
      FUZZ_CHECK(wres.reason == SG_SPARKMSG_OK);
      FUZZ_CHECK(wres.messages == res.messages);
      FUZZ_CHECK(whole.len == out.len &&
                 (out.len == 0 || memcmp(whole.buf, out.buf, out.len) == 0));
      free(whole.buf);
    }

    if (res.reason == SG_SPARKMSG_OK && o.user_mode == SG_SPARKMSG_USER_REWRITE &&
        res.messages > 0) {
      /* What went upstream parses again. The window is widened: a
       * user_context inserted before session_id may move it past the
       * original window, which matters for routing, not for validity. */
      sg_sparkmsg_options again = o;
      again.header_window_bytes = SG_SPARKMSG_MAX_HEADER_WINDOW_BYTES;
      uint64_t rng2 = h ^ 0x5bd1e995u;
      sink out2 = {0};
      run_result res2;
      run(&again, out.buf, out.len, &rng2, &out2, &res2);
      FUZZ_CHECK(res2.reason == SG_SPARKMSG_OK);
      FUZZ_CHECK(res2.messages == res.messages);
      /* Rewriting is idempotent. */
      FUZZ_CHECK(out2.len == out.len && memcmp(out2.buf, out.buf, out.len) == 0);
      FUZZ_CHECK(strcmp(res2.session_id, res.session_id) == 0);
      FUZZ_CHECK(res2.user_id_present && strcmp(res2.user_id, o.identity) == 0);
      free(out2.buf);

      /* And the identity it wrote is what enforce mode demands. */
      again.user_mode = SG_SPARKMSG_USER_ENFORCE;
      sink out3 = {0};
      run_result res3;
      run(&again, out.buf, out.len, NULL, &out3, &res3);
      FUZZ_CHECK(res3.reason == SG_SPARKMSG_OK);
      FUZZ_CHECK(res3.messages == res.messages);
      FUZZ_CHECK(out3.len == out.len && memcmp(out3.buf, out.buf, out.len) == 0);
      free(out3.buf);
    }
    free(out.buf);
  }
  return 0;
}
