/* Unit tests for the Spark Connect message scanner: hand-encoded protobuf
 * bodies in gRPC framing, fed whole, split at every byte boundary and byte
 * by byte; rewritten output is decoded again and compared field by field. */
#include "sparkgate/sparkmsg.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(c)                                                               \
  do {                                                                         \
    if (!(c)) {                                                                \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c);    \
      failures++;                                                              \
    }                                                                          \
  } while (0)

#define SID "6b7c1f0e-2d3a-4c5b-9e8f-0a1b2c3d4e5f"
#define SID2 "00000000-1111-2222-3333-444444444444"

/* ---- byte builder and protobuf encoder --------------------------------- */

typedef struct buf {
  uint8_t *p;
  size_t len, cap;
} buf;

static void b_put(buf *b, const void *p, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + n)
      cap *= 2;
    b->p = realloc(b->p, cap);
    if (b->p == NULL) {
      perror("realloc");
      exit(2);
    }
    b->cap = cap;
  }
  if (n > 0)
    memcpy(b->p + b->len, p, n);
  b->len += n;
}

static void b_byte(buf *b, uint8_t c) { b_put(b, &c, 1); }

static void b_free(buf *b) {
  free(b->p);
  *b = (buf){0};
}

static void b_varint(buf *b, uint64_t v) {
  while (v >= 0x80) {
    b_byte(b, (uint8_t)(v | 0x80));
    v >>= 7;
  }
  b_byte(b, (uint8_t)v);
}

static void b_tag(buf *b, uint32_t field, uint32_t wt) {
  b_varint(b, ((uint64_t)field << 3) | wt);
}

static void b_bytes(buf *b, uint32_t field, const void *p, size_t n) {
  b_tag(b, field, 2);
  b_varint(b, n);
  b_put(b, p, n);
}

static void b_str(buf *b, uint32_t field, const char *s) {
  b_bytes(b, field, s, strlen(s));
}

static void b_sub(buf *b, uint32_t field, const buf *sub) {
  b_bytes(b, field, sub->p, sub->len);
}

/* Appends a gRPC message (flag 0) holding body. */
static void b_frame(buf *stream, const buf *body) {
  uint8_t pre[5] = {0, (uint8_t)(body->len >> 24), (uint8_t)(body->len >> 16),
                    (uint8_t)(body->len >> 8), (uint8_t)body->len};
  b_put(stream, pre, 5);
  b_put(stream, body->p, body->len);
}

/* UserContext { user_id = 1; user_name = 2; extensions = 3 (Any) }; NULL
 * leaves a field out. */
static void make_uc(buf *uc, const char *user_id, const char *user_name,
                    bool with_ext) {
  if (user_id)
    b_str(uc, 1, user_id);
  if (user_name)
    b_str(uc, 2, user_name);
  if (with_ext) {
    buf any = {0};
    b_str(&any, 1, "type.googleapis.com/x.Ext");
    b_bytes(&any, 2, "\x08\x01\x12\x02hi", 6);
    b_sub(uc, 3, &any);
    b_free(&any);
  }
}

/* A canonical request body: session_id, user_context, then fields of every
 * other wire type (a nested plan, a string, varint, fixed64, fixed32). */
static void make_body(buf *body, const char *sid, const char *user_id,
                      const char *user_name, size_t plan_bytes) {
  if (sid)
    b_str(body, 1, sid);
  if (user_id || user_name) {
    buf uc = {0};
    make_uc(&uc, user_id, user_name, true);
    b_sub(body, 2, &uc);
    b_free(&uc);
  }
  buf plan = {0};
  b_str(&plan, 1, "SELECT 1");
  for (size_t i = plan.len; i < plan_bytes; i++)
    b_byte(&plan, (uint8_t)(i * 31));
  b_sub(body, 3, &plan);
  b_free(&plan);
  b_str(body, 4, "_SPARK_CONNECT_PYTHON");
  b_tag(body, 11, 0);
  b_varint(body, UINT64_MAX);
  b_tag(body, 9, 1);
  b_put(body, "\1\2\3\4\5\6\7\x08", 8);
  b_tag(body, 10, 5);
  b_put(body, "\xaa\xbb\xcc\xdd", 4);
}

static void frame_body(buf *stream, const char *sid, const char *user_id,
                       const char *user_name, size_t plan_bytes) {
  buf body = {0};
  make_body(&body, sid, user_id, user_name, plan_bytes);
  b_frame(stream, &body);
  b_free(&body);
}

/* ---- driving the scanner ----------------------------------------------- */

typedef struct sink {
  buf out;
  int calls;
  bool fail;
} sink;

static int sink_out(void *arg, const uint8_t *data, size_t len) {
  sink *k = arg;
  k->calls++;
  if (k->fail)
    return -1;
  b_put(&k->out, data, len);
  return 0;
}

typedef struct result {
  sg_sparkmsg_reason reason;
  buf out;
  uint64_t messages;
  bool header_known;
  char session_id[160];
  bool user_id_present;
  char user_id[160];
  char error[256];
} result;

static sg_sparkmsg_options opts_mode(sg_sparkmsg_user_mode mode) {
  sg_sparkmsg_options o = {0};
  o.user_mode = mode;
  o.identity = mode == SG_SPARKMSG_USER_OFF ? NULL : "alice";
  return o;
}

static sg_sparkmsg *new_or_die(const sg_sparkmsg_options *o) {
  char err[128];
  sg_sparkmsg *s = sg_sparkmsg_new(o, err, sizeof err);
  if (s == NULL) {
    fprintf(stderr, "sg_sparkmsg_new: %s\n", err);
    exit(2);
  }
  return s;
}

static void collect(sg_sparkmsg *s, sink *k, result *r) {
  r->reason = sg_sparkmsg_finish(s);
  snprintf(r->error, sizeof r->error, "%s", sg_sparkmsg_error(s));
  r->out = k->out;
  r->messages = sg_sparkmsg_messages(s);
  sg_sparkmsg_header h;
  r->header_known = sg_sparkmsg_header_known(s, &h);
  if (r->header_known) {
    snprintf(r->session_id, sizeof r->session_id, "%s", h.session_id);
    r->user_id_present = h.user_id_present;
    snprintf(r->user_id, sizeof r->user_id, "%s", h.user_id);
  }
}

/* Feeds in chunks: split == 0 whole, split == SIZE_MAX byte by byte,
 * otherwise [0, split) then the rest. */
static result run(const sg_sparkmsg_options *o, const buf *in, size_t split) {
  sg_sparkmsg *s = new_or_die(o);
  sink k = {0};
  if (split == SIZE_MAX) {
    for (size_t i = 0; i < in->len; i++)
      sg_sparkmsg_feed(s, in->p + i, 1, sink_out, &k);
  } else if (split == 0 || split >= in->len) {
    sg_sparkmsg_feed(s, in->p, in->len, sink_out, &k);
  } else {
    sg_sparkmsg_feed(s, in->p, split, sink_out, &k);
    sg_sparkmsg_feed(s, in->p + split, in->len - split, sink_out, &k);
  }
  result r = {0};
  collect(s, &k, &r);
  sg_sparkmsg_free(s);
  return r;
}

static bool same_bytes(const buf *a, const buf *b) {
  return a->len == b->len && (a->len == 0 || memcmp(a->p, b->p, a->len) == 0);
}

static bool is_prefix(const buf *a, const buf *of) {
  return a->len <= of->len && (a->len == 0 || memcmp(a->p, of->p, a->len) == 0);
}

static sg_sparkmsg_reason reason_of(sg_sparkmsg_user_mode mode, const buf *in) {
  sg_sparkmsg_options o = opts_mode(mode);
  result r = run(&o, in, 0);
  b_free(&r.out);
  return r.reason;
}

/* ---- a minimal decoder for checking output ----------------------------- */

typedef struct pb_field {
  uint32_t field, wt;
  size_t start, end;       /* raw bytes of the whole field, tag included */
  size_t val_off, val_len; /* wire type 2 only */
} pb_field;

static bool dec_varint(const uint8_t *p, size_t n, size_t *i, uint64_t *v) {
  *v = 0;
  for (unsigned k = 0; k < 10 && *i < n; k++) {
    uint8_t c = p[(*i)++];
    *v |= (uint64_t)(c & 0x7f) << (7 * k);
    if (!(c & 0x80))
      return true;
  }
  return false;
}

/* Splits a message body into its fields; returns the count or -1. */
static int dec_fields(const uint8_t *p, size_t n, pb_field *f, int max) {
  size_t i = 0;
  int count = 0;
  while (i < n) {
    if (count == max)
      return -1;
    pb_field *x = &f[count++];
    uint64_t tag, v;
    x->start = i;
    if (!dec_varint(p, n, &i, &tag))
      return -1;
    x->field = (uint32_t)(tag >> 3);
    x->wt = (uint32_t)(tag & 7);
    x->val_off = x->val_len = 0;
    switch (x->wt) {
    case 0:
      if (!dec_varint(p, n, &i, &v))
        return -1;
      break;
    case 1:
      i += 8;
      break;
    case 5:
      i += 4;
      break;
    case 2:
      if (!dec_varint(p, n, &i, &v) || v > n - i)
        return -1;
      x->val_off = i;
      x->val_len = (size_t)v;
      i += (size_t)v;
      break;
    default:
      return -1;
    }
    if (i > n)
      return -1;
    x->end = i;
  }
  return count;
}

typedef struct frame {
  const uint8_t *body;
  size_t len;
} frame;

/* Splits a stream into gRPC messages, checking flags and length prefixes
 * add up exactly; returns the count or -1. */
static int dec_frames(const buf *b, frame *fr, int max) {
  size_t i = 0;
  int count = 0;
  while (i < b->len) {
    if (count == max || b->len - i < 5 || b->p[i] != 0)
      return -1;
    size_t len = (size_t)b->p[i + 1] << 24 | (size_t)b->p[i + 2] << 16 |
                 (size_t)b->p[i + 3] << 8 | b->p[i + 4];
    if (len > b->len - i - 5)
      return -1;
    fr[count].body = b->p + i + 5;
    fr[count].len = len;
    count++;
    i += 5 + len;
  }
  return count;
}

static bool field_is_str(const uint8_t *body, const pb_field *f,
                         const char *want) {
  return f->wt == 2 && f->val_len == strlen(want) &&
         memcmp(body + f->val_off, want, f->val_len) == 0;
}

/* Checks one rewritten message against its original body: every field but
 * user_context byte-identical and in order, the user_context carrying the
 * identity (and user_name per mode) plus every other original sub-field. */
static void check_rewritten(const frame *orig, const frame *got,
                            const char *identity, bool name_set,
                            bool orig_has_uc) {
  pb_field of[64], gf[64], ou[16], gu[16];
  int on = dec_fields(orig->body, orig->len, of, 64);
  int gn = dec_fields(got->body, got->len, gf, 64);
  CHECK(on > 0 && gn > 0);
  if (on <= 0 || gn <= 0)
    return;
  CHECK(gn == (orig_has_uc ? on : on + 1));
  int gi = 0, uc_idx = -1;
  for (int oi = 0; oi < on && gi < gn; oi++) {
    if (of[oi].field == 2) {
      CHECK(gf[gi].field == 2);
      uc_idx = gi++;
      continue;
    }
    if (gf[gi].field == 2 && !orig_has_uc && uc_idx < 0)
      uc_idx = gi++; /* inserted */
    CHECK(gi < gn);
    if (gi >= gn)
      return;
    size_t ol = of[oi].end - of[oi].start, gl = gf[gi].end - gf[gi].start;
    CHECK(ol == gl &&
          memcmp(orig->body + of[oi].start, got->body + gf[gi].start, ol) == 0);
    gi++;
  }
  if (uc_idx < 0 && gi < gn && gf[gi].field == 2)
    uc_idx = gi++;
  CHECK(gi == gn);
  CHECK(uc_idx >= 0);
  if (uc_idx < 0)
    return;
  if (!orig_has_uc)
    CHECK(uc_idx == 0); /* inserted right after the prefix */

  const uint8_t *gub = got->body + gf[uc_idx].val_off;
  int gun = dec_fields(gub, gf[uc_idx].val_len, gu, 16);
  CHECK(gun >= 1);
  if (gun < 1)
    return;
  int ids = 0, names = 0, others = 0;
  for (int i = 0; i < gun; i++) {
    if (gu[i].field == 1) {
      ids++;
      CHECK(field_is_str(gub, &gu[i], identity));
    } else if (gu[i].field == 2) {
      names++;
      CHECK(field_is_str(gub, &gu[i], identity));
    } else {
      others++;
    }
  }
  CHECK(ids == 1);
  CHECK(names == (name_set ? 1 : 0));

  /* Other sub-fields: byte-identical and in their original order. */
  int oun = 0;
  const uint8_t *oub = NULL;
  for (int oi = 0; oi < on; oi++) {
    if (of[oi].field == 2) {
      oub = orig->body + of[oi].val_off;
      oun = dec_fields(oub, of[oi].val_len, ou, 16);
    }
  }
  int k = 0;
  for (int i = 0; i < oun; i++) {
    if (ou[i].field == 1 || ou[i].field == 2)
      continue;
    while (k < gun && (gu[k].field == 1 || gu[k].field == 2))
      k++;
    CHECK(k < gun);
    if (k >= gun)
      return;
    size_t ol = ou[i].end - ou[i].start, gl = gu[k].end - gu[k].start;
    CHECK(ol == gl && memcmp(oub + ou[i].start, gub + gu[k].start, ol) == 0);
    k++;
  }
  int orig_others = 0;
  for (int i = 0; i < oun; i++)
    orig_others += ou[i].field != 1 && ou[i].field != 2;
  CHECK(others == orig_others);
}

/* ---- tests ------------------------------------------------------------- */

static void test_valid_single(void) {
  buf in = {0};
  frame_body(&in, SID, "bob", "Bob", 40);
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  result r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_OK);
  CHECK(same_bytes(&r.out, &in));
  CHECK(r.messages == 1);
  CHECK(r.header_known);
  CHECK(strcmp(r.session_id, SID) == 0);
  CHECK(r.user_id_present && strcmp(r.user_id, "bob") == 0);
  b_free(&r.out);

  o = opts_mode(SG_SPARKMSG_USER_ENFORCE);
  o.identity = "bob";
  r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_OK);
  CHECK(same_bytes(&r.out, &in));
  b_free(&r.out);
  b_free(&in);
}

static void test_several_in_one_chunk(void) {
  buf in = {0};
  frame_body(&in, SID, "bob", NULL, 10);
  frame_body(&in, SID, "bob", "Bob", 300);
  frame_body(&in, SID, NULL, NULL, 0); /* no user_context: fine in off mode */
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  result r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_OK);
  CHECK(same_bytes(&r.out, &in));
  CHECK(r.messages == 3);
  CHECK(r.user_id_present && strcmp(r.user_id, "bob") == 0);
  b_free(&r.out);
  b_free(&in);
}

/* The same output (and verdict) however the input is cut. */
static void check_split_invariance(const sg_sparkmsg_options *o, const buf *in,
                                   const char *what) {
  result ref = run(o, in, 0);
  for (size_t k = 1; k < in->len; k++) {
    result r = run(o, in, k);
    bool ok = r.reason == ref.reason && r.messages == ref.messages &&
              r.header_known == ref.header_known &&
              (ref.reason != SG_SPARKMSG_OK || same_bytes(&r.out, &ref.out));
    if (!ok)
      fprintf(stderr, "split at %zu of %zu differs (%s)\n", k, in->len, what);
    CHECK(ok);
    b_free(&r.out);
    if (!ok)
      break;
  }
  result r = run(o, in, SIZE_MAX);
  CHECK(r.reason == ref.reason && r.messages == ref.messages);
  CHECK(ref.reason != SG_SPARKMSG_OK || same_bytes(&r.out, &ref.out));
  CHECK(strcmp(r.session_id, ref.session_id) == 0);
  CHECK(strcmp(r.user_id, ref.user_id) == 0);
  b_free(&r.out);
  b_free(&ref.out);
}

static void test_split_everywhere(void) {
  buf in = {0};
  frame_body(&in, SID, "alice", "Alice", 20);
  frame_body(&in, SID, "alice", NULL, 0);
  frame_body(&in, SID, "alice", "x", 150);

  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  check_split_invariance(&o, &in, "off");
  o = opts_mode(SG_SPARKMSG_USER_ENFORCE);
  check_split_invariance(&o, &in, "enforce");
  o = opts_mode(SG_SPARKMSG_USER_REWRITE);
  o.identity = "carol-the-identity";
  check_split_invariance(&o, &in, "rewrite drop");
  o.user_name_mode = SG_SPARKMSG_USER_NAME_IDENTITY;
  check_split_invariance(&o, &in, "rewrite set");

  /* Rewrite with user_context absent, late, and past a small window. */
  buf in2 = {0};
  frame_body(&in2, SID, NULL, NULL, 30);
  buf body = {0};
  b_str(&body, 1, SID);
  b_bytes(&body, 7, "0123456789abcdef0123456789abcdef", 32);
  buf uc = {0};
  make_uc(&uc, "mallory", NULL, true);
  b_sub(&body, 2, &uc);
  b_str(&body, 4, "tail");
  b_frame(&in2, &body);
  frame_body(&in2, SID, NULL, NULL, 600); /* > window: inserted mid-stream */
  o = opts_mode(SG_SPARKMSG_USER_REWRITE);
  o.header_window_bytes = 256;
  check_split_invariance(&o, &in2, "rewrite absent/late/window");

  /* A rejection is reached at the same message whatever the cut. */
  buf in3 = {0};
  frame_body(&in3, SID, "alice", NULL, 10);
  frame_body(&in3, SID, "eve", NULL, 10);
  o = opts_mode(SG_SPARKMSG_USER_ENFORCE);
  check_split_invariance(&o, &in3, "enforce reject");

  b_free(&uc);
  b_free(&body);
  b_free(&in);
  b_free(&in2);
  b_free(&in3);
}

static void test_hold_back_last_byte(void) {
  buf in = {0};
  frame_body(&in, SID, "alice", NULL, 100);
  size_t first_len = in.len;
  frame_body(&in, SID, "alice", NULL, 5);

  sg_sparkmsg_user_mode modes[] = {SG_SPARKMSG_USER_OFF,
                                   SG_SPARKMSG_USER_ENFORCE};
  for (size_t m = 0; m < 2; m++) {
    sg_sparkmsg_options o = opts_mode(modes[m]);
    sg_sparkmsg *s = new_or_die(&o);
    sink k = {0};
    CHECK(sg_sparkmsg_feed(s, in.p, first_len - 1, sink_out, &k) ==
          SG_SPARKMSG_OK);
    CHECK(k.out.len == first_len - 1); /* streamed, all but the final byte */
    CHECK(sg_sparkmsg_messages(s) == 0);
    CHECK(sg_sparkmsg_feed(s, in.p + first_len - 1, 1, sink_out, &k) ==
          SG_SPARKMSG_OK);
    CHECK(k.out.len == first_len && memcmp(k.out.p, in.p, first_len) == 0);
    CHECK(sg_sparkmsg_messages(s) == 1);
    CHECK(sg_sparkmsg_feed(s, in.p + first_len, in.len - first_len - 1,
                           sink_out, &k) == SG_SPARKMSG_OK);
    CHECK(k.out.len == in.len - 1);
    CHECK(sg_sparkmsg_finish(s) == SG_SPARKMSG_INCOMPLETE_MESSAGE);
    CHECK(k.out.len == in.len - 1);
    sg_sparkmsg_free(s);
    b_free(&k.out);
  }

  /* Rewrite: user_context early, so everything streams after it except the
   * final byte. */
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_REWRITE);
  result full = run(&o, &in, 0);
  CHECK(full.reason == SG_SPARKMSG_OK);
  frame fr[2];
  CHECK(dec_frames(&full.out, fr, 2) == 2);
  size_t out_first = 5 + fr[0].len;
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {0};
  sg_sparkmsg_feed(s, in.p, first_len - 1, sink_out, &k);
  CHECK(k.out.len == out_first - 1);
  CHECK(is_prefix(&k.out, &full.out));
  sg_sparkmsg_feed(s, in.p + first_len - 1, 1, sink_out, &k);
  CHECK(k.out.len == out_first);
  sg_sparkmsg_free(s);
  b_free(&k.out);
  b_free(&full.out);

  /* Rewrite with user_context as the last field: the whole message is held
   * until its final byte has been checked. */
  buf in2 = {0}, body = {0}, uc = {0};
  b_str(&body, 1, SID);
  b_str(&body, 4, "client");
  make_uc(&uc, "mallory", "M", true);
  b_sub(&body, 2, &uc);
  b_frame(&in2, &body);
  s = new_or_die(&o);
  k = (sink){0};
  sg_sparkmsg_feed(s, in2.p, in2.len - 1, sink_out, &k);
  CHECK(k.out.len == 0);
  CHECK(!sg_sparkmsg_header_known(s, NULL)); /* user_context incomplete */
  sg_sparkmsg_feed(s, in2.p + in2.len - 1, 1, sink_out, &k);
  CHECK(sg_sparkmsg_header_known(s, NULL));
  CHECK(sg_sparkmsg_messages(s) == 1);
  frame orig = {body.p, body.len}, got;
  CHECK(dec_frames(&k.out, &got, 1) == 1);
  check_rewritten(&orig, &got, "alice", false, true);
  sg_sparkmsg_free(s);
  b_free(&k.out);
  b_free(&in2);
  b_free(&body);
  b_free(&uc);
  b_free(&in);
}

/* After a rejection decided on a message's final byte, that byte is never
 * emitted, and nothing after it. */
static void test_reject_withholds_final_byte(void) {
  buf in = {0};
  frame_body(&in, SID, "alice", NULL, 10);
  size_t first_len = in.len;
  frame_body(&in, SID, NULL, NULL, 10); /* no user_context */
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_ENFORCE);
  for (int byte_by_byte = 0; byte_by_byte < 2; byte_by_byte++) {
    result r = run(&o, &in, byte_by_byte ? SIZE_MAX : 0);
    CHECK(r.reason == SG_SPARKMSG_USER_ID_MISMATCH);
    CHECK(r.messages == 1);
    CHECK(r.out.len >= first_len && r.out.len < in.len);
    CHECK(is_prefix(&r.out, &in));
    if (byte_by_byte)
      CHECK(r.out.len == in.len - 1);
    b_free(&r.out);
  }

  /* Missing session_id: rejected at the end, final byte withheld. */
  buf in2 = {0};
  frame_body(&in2, NULL, "alice", NULL, 10);
  o = opts_mode(SG_SPARKMSG_USER_OFF);
  result r = run(&o, &in2, SIZE_MAX);
  CHECK(r.reason == SG_SPARKMSG_MISSING_SESSION_ID);
  CHECK(r.out.len == in2.len - 1 && is_prefix(&r.out, &in2));
  b_free(&r.out);

  /* session_id that changes, as the last field of the second message. */
  buf in3 = {0}, body = {0};
  frame_body(&in3, SID, "alice", NULL, 0);
  size_t ok_len = in3.len;
  b_str(&body, 4, "x");
  b_str(&body, 1, SID2);
  b_frame(&in3, &body);
  for (int byte_by_byte = 0; byte_by_byte < 2; byte_by_byte++) {
    r = run(&o, &in3, byte_by_byte ? SIZE_MAX : 0);
    CHECK(r.reason == SG_SPARKMSG_SESSION_ID_CHANGED);
    CHECK(r.messages == 1);
    CHECK(r.out.len >= ok_len && r.out.len < in3.len);
    CHECK(is_prefix(&r.out, &in3));
    b_free(&r.out);
  }

  /* More input after a rejection produces nothing. */
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {0};
  CHECK(sg_sparkmsg_feed(s, in2.p, in2.len, sink_out, &k) ==
        SG_SPARKMSG_MISSING_SESSION_ID);
  size_t before = k.out.len;
  CHECK(sg_sparkmsg_feed(s, in.p, in.len, sink_out, &k) ==
        SG_SPARKMSG_MISSING_SESSION_ID);
  CHECK(k.out.len == before);
  CHECK(strstr(sg_sparkmsg_error(s), "session_id") != NULL);
  sg_sparkmsg_free(s);
  b_free(&k.out);
  b_free(&in);
  b_free(&in2);
  b_free(&in3);
  b_free(&body);
}

/* Complete gRPC messages at the start of |b| (a strict prefix of one
 * more may follow). */
static size_t complete_messages(const buf *b) {
  size_t off = 0, n = 0;
  while (b->len - off >= SG_SPARKMSG_PREFIX_BYTES) {
    size_t len = (size_t)b->p[off + 1] << 24 | (size_t)b->p[off + 2] << 16 |
                 (size_t)b->p[off + 3] << 8 | b->p[off + 4];
    if (len > b->len - off - SG_SPARKMSG_PREFIX_BYTES)
      break;
    off += SG_SPARKMSG_PREFIX_BYTES + len;
    n++;
  }
  return n;
}

/* A message approved and a later one rejected in the same call: the
 * approved one still goes out whole, in every mode (small pieces are
 * gathered before they go out; they must not be lost with the call). */
static void test_reject_in_same_feed_keeps_approved(void) {
  buf in = {0};
  frame_body(&in, SID, "alice", NULL, 0);
  frame_body(&in, SID2, "alice", NULL, 0);
  const sg_sparkmsg_user_mode modes[] = {SG_SPARKMSG_USER_OFF, SG_SPARKMSG_USER_ENFORCE,
                                         SG_SPARKMSG_USER_REWRITE};
  for (size_t i = 0; i < sizeof modes / sizeof *modes; i++) {
    sg_sparkmsg_options o = opts_mode(modes[i]);
    result r = run(&o, &in, 0);
    CHECK(r.reason == SG_SPARKMSG_SESSION_ID_CHANGED);
    CHECK(r.messages == 1);
    CHECK(complete_messages(&r.out) == 1);
    b_free(&r.out);
  }
  b_free(&in);
}

static void test_duplicates(void) {
  buf uc = {0};
  make_uc(&uc, "alice", NULL, false);

  /* A second user_context at the very end of a message. */
  buf body = {0}, in = {0};
  make_body(&body, SID, "alice", NULL, 50);
  b_sub(&body, 2, &uc);
  b_frame(&in, &body);
  for (int m = 0; m < 3; m++) {
    sg_sparkmsg_options o = opts_mode((sg_sparkmsg_user_mode)m);
    result r = run(&o, &in, SIZE_MAX);
    CHECK(r.reason == SG_SPARKMSG_DUPLICATE_USER_CONTEXT);
    CHECK(r.out.len < in.len);
    CHECK(r.messages == 0);
    b_free(&r.out);
  }
  b_free(&body);
  b_free(&in);

  /* A second session_id (same value). */
  make_body(&body, SID, "alice", NULL, 5);
  b_str(&body, 1, SID);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) ==
        SG_SPARKMSG_DUPLICATE_SESSION_ID);
  b_free(&body);
  b_free(&in);

  /* A second user_id inside user_context. */
  buf uc2 = {0};
  b_str(&uc2, 1, "alice");
  b_str(&uc2, 2, "Alice");
  b_str(&uc2, 1, "root");
  b_str(&body, 1, SID);
  b_sub(&body, 2, &uc2);
  b_frame(&in, &body);
  for (int m = 0; m < 3; m++)
    CHECK(reason_of((sg_sparkmsg_user_mode)m, &in) ==
          SG_SPARKMSG_DUPLICATE_USER_ID);
  b_free(&uc2);
  b_free(&body);
  b_free(&in);
  b_free(&uc);
}

static void test_malformed(void) {
  buf body = {0}, in = {0};

  /* An 11-byte varint value. */
  b_str(&body, 1, SID);
  b_tag(&body, 5, 0);
  for (int i = 0; i < 10; i++)
    b_byte(&body, 0x80);
  b_byte(&body, 0x01);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_VARINT);
  b_free(&body);
  b_free(&in);

  /* A 10-byte varint overflowing 64 bits. */
  b_str(&body, 1, SID);
  b_tag(&body, 5, 0);
  for (int i = 0; i < 9; i++)
    b_byte(&body, 0xff);
  b_byte(&body, 0x02);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_VARINT);
  b_free(&body);
  b_free(&in);

  /* The largest valid 10-byte varint is accepted. */
  b_str(&body, 1, SID);
  b_tag(&body, 5, 0);
  for (int i = 0; i < 9; i++)
    b_byte(&body, 0xff);
  b_byte(&body, 0x01);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_OK);
  b_free(&body);
  b_free(&in);

  /* A tag beyond 32 bits. */
  b_str(&body, 1, SID);
  b_varint(&body, (uint64_t)1 << 35 | 2);
  b_byte(&body, 0);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_VARINT);
  b_free(&body);
  b_free(&in);

  /* A varint cut by the end of the message. */
  b_str(&body, 1, SID);
  b_tag(&body, 5, 0);
  b_byte(&body, 0x80);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_TRUNCATED);
  b_free(&body);
  b_free(&in);

  /* A tag with no value, and a fixed64 cut short. */
  b_str(&body, 1, SID);
  b_tag(&body, 5, 0);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_TRUNCATED);
  b_free(&body);
  b_free(&in);
  b_str(&body, 1, SID);
  b_tag(&body, 5, 1);
  b_put(&body, "1234", 4);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_TRUNCATED);
  b_free(&body);
  b_free(&in);

  /* A length past the end of the message (the stream goes on after it). */
  b_str(&body, 1, SID);
  b_tag(&body, 3, 2);
  b_varint(&body, 100);
  b_put(&body, "abc", 3);
  b_frame(&in, &body);
  frame_body(&in, SID, NULL, NULL, 200);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_LENGTH_PAST_END);
  b_free(&body);
  b_free(&in);

  /* Group wire types, top level and inside user_context. */
  for (uint32_t wt = 3; wt <= 4; wt++) {
    b_str(&body, 1, SID);
    b_tag(&body, 6, wt);
    b_frame(&in, &body);
    CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_GROUP_WIRE_TYPE);
    b_free(&body);
    b_free(&in);
  }
  buf uc = {0};
  b_str(&uc, 1, "alice");
  b_tag(&uc, 4, 3);
  b_tag(&uc, 4, 4);
  b_str(&body, 1, SID);
  b_sub(&body, 2, &uc);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_GROUP_WIRE_TYPE);
  CHECK(reason_of(SG_SPARKMSG_USER_REWRITE, &in) ==
        SG_SPARKMSG_GROUP_WIRE_TYPE);
  b_free(&uc);
  b_free(&body);
  b_free(&in);

  /* Wire types 6 and 7; field number 0. */
  for (uint32_t wt = 6; wt <= 7; wt++) {
    b_str(&body, 1, SID);
    b_tag(&body, 6, wt);
    b_byte(&body, 0);
    b_frame(&in, &body);
    CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_WIRE_TYPE);
    b_free(&body);
    b_free(&in);
  }
  b_str(&body, 1, SID);
  b_tag(&body, 0, 0);
  b_byte(&body, 0);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_FIELD_ZERO);
  b_free(&body);
  b_free(&in);

  /* A malformed user_context: a length running past its end. */
  b_byte(&uc, 0x0a);
  b_byte(&uc, 50);
  b_put(&uc, "alice", 5);
  b_str(&body, 1, SID);
  b_sub(&body, 2, &uc);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_LENGTH_PAST_END);
  b_free(&uc);
  b_free(&body);
  b_free(&in);

  /* user_id that is not UTF-8; user_context with the wrong wire type. */
  b_bytes(&uc, 1, "\xc0\xaf", 2);
  b_str(&body, 1, SID);
  b_sub(&body, 2, &uc);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_USER_CONTEXT);
  b_free(&uc);
  b_free(&body);
  b_free(&in);
  b_str(&body, 1, SID);
  b_tag(&body, 2, 0);
  b_byte(&body, 1);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_USER_CONTEXT);
  b_free(&body);
  b_free(&in);

  /* user_context over the 4 KiB cap. */
  char big[SG_SPARKMSG_USER_CONTEXT_MAX_BYTES];
  memset(big, 'a', sizeof big);
  b_bytes(&uc, 1, big, sizeof big);
  b_str(&body, 1, SID);
  b_sub(&body, 2, &uc);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) ==
        SG_SPARKMSG_USER_CONTEXT_TOO_LARGE);
  b_free(&uc);
  b_free(&body);
  b_free(&in);
}

static void test_session_id_rules(void) {
  buf body = {0}, in = {0};

  frame_body(&in, NULL, "alice", NULL, 10);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_MISSING_SESSION_ID);
  b_free(&in);

  /* An empty message has no session_id either. */
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_MISSING_SESSION_ID);
  b_free(&in);

  /* Past eight bytes too, where ASCII is checked a word at a time: a NUL
   * in the first word, in a later one, a bad byte after ASCII words. */
  const char *bad[] = {"", "\xff\xfe", "ab\xed\xa0\x80", "a\0b",
                       "abc\0efghijklmnop", "abcdefgh\0ijk",
                       "abcdefghijklmnop\xff", "abcdefghij\xc3"};
  size_t bad_len[] = {0, 2, 5, 3, 16, 12, 17, 11};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    b_bytes(&body, 1, bad[i], bad_len[i]);
    b_frame(&in, &body);
    CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_SESSION_ID);
    b_free(&body);
    b_free(&in);
  }
  char longid[SG_SPARKMSG_SESSION_ID_MAX_BYTES + 1];
  memset(longid, '7', sizeof longid);
  b_bytes(&body, 1, longid, sizeof longid);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_SESSION_ID);
  b_free(&body);
  b_free(&in);
  b_bytes(&body, 1, longid, sizeof longid - 1); /* exactly the cap */
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_OK);
  b_free(&body);
  b_free(&in);
  b_tag(&body, 1, 0);
  b_byte(&body, 1);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_SESSION_ID);
  b_free(&body);
  b_free(&in);

  /* UTF-8 that is not ASCII is fine, before, between and after words. */
  const char *good[] = {"s\xc3\xa9ssion-\xf0\x9f\x98\x80",
                        "session-\xc3\xa9-0123456789abcdef\xf0\x9f\x98\x80x",
                        "0123456789abcdef"};
  for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
    b_str(&body, 1, good[i]);
    b_frame(&in, &body);
    CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_OK);
    b_free(&body);
    b_free(&in);
  }

  /* Changed within a stream. */
  frame_body(&in, SID, "alice", NULL, 10);
  frame_body(&in, SID2, "alice", NULL, 10);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_SESSION_ID_CHANGED);
  b_free(&in);

  /* First message: session_id past the header window. */
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  o.header_window_bytes = 1024;
  buf pad = {0};
  for (int i = 0; i < 2000; i++)
    b_byte(&pad, 'p');
  b_sub(&body, 3, &pad);
  b_str(&body, 1, SID);
  b_frame(&in, &body);
  result r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_SESSION_ID_NOT_EARLY);
  b_free(&r.out);
  /* ...which later messages may do. */
  buf in2 = {0};
  frame_body(&in2, SID, NULL, NULL, 0);
  b_frame(&in2, &body);
  r = run(&o, &in2, 0);
  CHECK(r.reason == SG_SPARKMSG_OK && r.messages == 2);
  CHECK(same_bytes(&r.out, &in2));
  b_free(&r.out);
  b_free(&in2);
  b_free(&pad);
  b_free(&body);
  b_free(&in);
}

static void test_framing(void) {
  buf body = {0}, in = {0};
  make_body(&body, SID, "alice", NULL, 10);
  b_frame(&in, &body);
  in.p[0] = 1;
  result r;
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  r = run(&o, &in, SIZE_MAX);
  CHECK(r.reason == SG_SPARKMSG_COMPRESSED);
  CHECK(r.out.len == 0);
  CHECK(sg_sparkmsg_reason_grpc_status(r.reason) == 3);
  b_free(&r.out);
  in.p[0] = 2;
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_FLAG);
  in.p[0] = 0x80;
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) == SG_SPARKMSG_BAD_FLAG);
  in.p[0] = 0;

  o.max_message_bytes = body.len - 1;
  r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_MESSAGE_TOO_LARGE);
  CHECK(strstr(r.error, "over limits.max_message_bytes") != NULL); /* what to change */
  b_free(&r.out);
  o.max_message_bytes = body.len;
  r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_OK);
  b_free(&r.out);

  /* Rewriting may push a message over the limit. */
  o = opts_mode(SG_SPARKMSG_USER_REWRITE);
  o.identity = "a-much-longer-identity-than-alice";
  o.max_message_bytes = body.len;
  r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_MESSAGE_TOO_LARGE);
  CHECK(strstr(r.error, "exceeds limits.max_message_bytes") != NULL);
  CHECK(r.out.len == 0);
  b_free(&r.out);

  /* The stream ends inside a prefix or a body. */
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {0};
  sg_sparkmsg_feed(s, in.p, 3, sink_out, &k);
  CHECK(sg_sparkmsg_finish(s) == SG_SPARKMSG_INCOMPLETE_MESSAGE);
  sg_sparkmsg_free(s);
  b_free(&k.out);
  s = new_or_die(&o);
  CHECK(sg_sparkmsg_finish(s) == SG_SPARKMSG_OK); /* no message at all */
  CHECK(!sg_sparkmsg_header_known(s, NULL));
  sg_sparkmsg_free(s);
  b_free(&body);
  b_free(&in);
}

static void test_enforce_forged_tenth(void) {
  buf in = {0};
  size_t ok_len = 0;
  for (int i = 1; i <= 12; i++) {
    frame_body(&in, SID, i == 10 ? "root" : "alice", "A", (size_t)i * 13);
    if (i == 9)
      ok_len = in.len;
  }
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_ENFORCE);
  for (int byte_by_byte = 0; byte_by_byte < 2; byte_by_byte++) {
    result r = run(&o, &in, byte_by_byte ? SIZE_MAX : 0);
    CHECK(r.reason == SG_SPARKMSG_USER_ID_MISMATCH);
    CHECK(sg_sparkmsg_reason_grpc_status(r.reason) == 7);
    CHECK(r.messages == 9);
    CHECK(r.out.len >= ok_len && is_prefix(&r.out, &in));
    frame fr[12];
    buf approved = {r.out.p, ok_len, ok_len};
    CHECK(dec_frames(&approved, fr, 12) == 9);
    CHECK(r.header_known && strcmp(r.user_id, "alice") == 0);
    b_free(&r.out);
  }
  /* The forged message alone, as the 10th of a stream. */
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {0};
  CHECK(sg_sparkmsg_feed(s, in.p, ok_len, sink_out, &k) == SG_SPARKMSG_OK);
  CHECK(sg_sparkmsg_messages(s) == 9);
  CHECK(sg_sparkmsg_feed(s, in.p + ok_len, in.len - ok_len, sink_out, &k) ==
        SG_SPARKMSG_USER_ID_MISMATCH);
  CHECK(strstr(sg_sparkmsg_error(s), "message 10") != NULL);
  CHECK(strcmp(sg_sparkmsg_reason_name(sg_sparkmsg_reason_of(s)),
               "user_id_mismatch") == 0);
  sg_sparkmsg_free(s);
  b_free(&k.out);

  /* Missing user_context or user_id is a mismatch too. */
  buf in2 = {0};
  frame_body(&in2, SID, NULL, "Alice", 5);
  CHECK(reason_of(SG_SPARKMSG_USER_ENFORCE, &in2) ==
        SG_SPARKMSG_USER_ID_MISMATCH);
  b_free(&in2);
  frame_body(&in2, SID, NULL, NULL, 5);
  CHECK(reason_of(SG_SPARKMSG_USER_ENFORCE, &in2) ==
        SG_SPARKMSG_USER_ID_MISMATCH);
  b_free(&in2);
  /* A prefix of the identity is not the identity. */
  frame_body(&in2, SID, "alic", NULL, 5);
  CHECK(reason_of(SG_SPARKMSG_USER_ENFORCE, &in2) ==
        SG_SPARKMSG_USER_ID_MISMATCH);
  b_free(&in2);
  b_free(&in);
}

static void test_rewrite(void) {
  buf in = {0};
  frame_body(&in, SID, "mallory", "Mallory", 70); /* user_name to drop */
  frame_body(&in, SID, NULL, NULL, 10);           /* inserted */
  frame_body(&in, SID, "mallory", NULL, 0);       /* no user_name */
  buf late = {0}, uc = {0};
  b_str(&late, 1, SID);
  b_bytes(&late, 3, "0123456789", 10);
  make_uc(&uc, "x", "y", true);
  b_sub(&late, 2, &uc);
  b_str(&late, 4, "after");
  b_frame(&in, &late); /* user_context after another field */
  frame orig[4];
  CHECK(dec_frames(&in, orig, 4) == 4);
  bool had_uc[4] = {true, false, true, true};

  for (int set = 0; set < 2; set++) {
    sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_REWRITE);
    o.identity = set ? "alice@example" : "a";
    o.user_name_mode =
        set ? SG_SPARKMSG_USER_NAME_IDENTITY : SG_SPARKMSG_USER_NAME_DROP;
    result r = run(&o, &in, 0);
    CHECK(r.reason == SG_SPARKMSG_OK);
    CHECK(r.messages == 4);
    /* The access log sees what the client sent. */
    CHECK(r.user_id_present && strcmp(r.user_id, "mallory") == 0);
    frame got[4];
    CHECK(dec_frames(&r.out, got, 4) == 4); /* prefixes add up exactly */
    for (int i = 0; i < 4; i++)
      check_rewritten(&orig[i], &got[i], o.identity, set, had_uc[i]);
    b_free(&r.out);
  }
  b_free(&late);
  b_free(&uc);
  b_free(&in);
}

/* Rewrite of a message far larger than the window, without user_context:
 * inserted at the window, the rest streamed through. */
static void test_rewrite_large_without_user_context(void) {
  buf in = {0};
  frame_body(&in, SID, NULL, NULL, 200 * 1024);
  frame_body(&in, SID, "bob", NULL, 100 * 1024);
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_REWRITE);
  result r = run(&o, &in, 0);
  CHECK(r.reason == SG_SPARKMSG_OK && r.messages == 2);
  CHECK(r.header_known && !r.user_id_present);
  frame orig[2], got[2];
  CHECK(dec_frames(&in, orig, 2) == 2);
  CHECK(dec_frames(&r.out, got, 2) == 2);
  check_rewritten(&orig[0], &got[0], "alice", false, false);
  check_rewritten(&orig[1], &got[1], "alice", false, true);

  /* In 1000-byte chunks: output is streamed after the window, holding only
   * the final byte of the message. */
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {0};
  size_t first = 5 + orig[0].len, out_first = 5 + got[0].len;
  for (size_t i = 0; i + 1 < first; i += 1000) {
    size_t n = first - 1 - i < 1000 ? first - 1 - i : 1000;
    sg_sparkmsg_feed(s, in.p + i, n, sink_out, &k);
  }
  CHECK(k.out.len == out_first - 1);
  CHECK(k.calls < 400); /* skipped in bulk, not byte by byte */
  CHECK(sg_sparkmsg_header_known(s, NULL));
  sg_sparkmsg_feed(s, in.p + first - 1, 1, sink_out, &k);
  CHECK(k.out.len == out_first);
  sg_sparkmsg_free(s);
  b_free(&k.out);
  b_free(&r.out);
  b_free(&in);

  /* A user_context after the window cannot be placed any more. */
  buf body = {0}, uc = {0}, pad = {0};
  for (int i = 0; i < 70 * 1024; i++)
    b_byte(&pad, 'p');
  b_str(&body, 1, SID);
  b_sub(&body, 3, &pad);
  make_uc(&uc, "alice", NULL, false);
  b_sub(&body, 2, &uc);
  b_frame(&in, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_REWRITE, &in) ==
        SG_SPARKMSG_USER_CONTEXT_NOT_EARLY);
  /* Nor, for the first message, in any mode (routing already decided). */
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in) ==
        SG_SPARKMSG_USER_CONTEXT_NOT_EARLY);
  /* Later messages in off/enforce mode may put it anywhere. */
  buf in2 = {0};
  frame_body(&in2, SID, "alice", NULL, 0);
  b_frame(&in2, &body);
  CHECK(reason_of(SG_SPARKMSG_USER_OFF, &in2) == SG_SPARKMSG_OK);
  CHECK(reason_of(SG_SPARKMSG_USER_ENFORCE, &in2) == SG_SPARKMSG_OK);
  CHECK(reason_of(SG_SPARKMSG_USER_REWRITE, &in2) ==
        SG_SPARKMSG_USER_CONTEXT_NOT_EARLY);
  b_free(&in2);
  b_free(&body);
  b_free(&uc);
  b_free(&pad);
  b_free(&in);
}

/* The header is known exactly when fields 1 and 2 of the first message are,
 * before the message is complete. */
static void test_header_known(void) {
  buf body = {0}, in = {0}, uc = {0};
  b_str(&body, 1, SID);
  make_uc(&uc, "bob", "Bob", true);
  b_sub(&body, 2, &uc);
  size_t fields12 = body.len;
  b_bytes(&body, 3, "plan-bytes", 10);
  b_frame(&in, &body);

  for (int m = 0; m < 3; m++) {
    sg_sparkmsg_options o = opts_mode((sg_sparkmsg_user_mode)m);
    o.identity = m == SG_SPARKMSG_USER_ENFORCE ? "bob" : o.identity;
    sg_sparkmsg *s = new_or_die(&o);
    sink k = {0};
    size_t known_at = 0;
    for (size_t i = 0; i < in.len; i++) {
      sg_sparkmsg_feed(s, in.p + i, 1, sink_out, &k);
      if (known_at == 0 && sg_sparkmsg_header_known(s, NULL))
        known_at = i + 1;
    }
    CHECK(known_at == 5 + fields12);
    sg_sparkmsg_header h;
    CHECK(sg_sparkmsg_header_known(s, &h));
    CHECK(strcmp(h.session_id, SID) == 0);
    CHECK(h.user_id_present && strcmp(h.user_id, "bob") == 0);
    sg_sparkmsg_free(s);
    b_free(&k.out);
  }

  /* Without a user_context: known at the end of a small message, or once
   * the window has passed in a large one. */
  b_free(&body);
  b_free(&in);
  frame_body(&in, SID, NULL, NULL, 10);
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {0};
  sg_sparkmsg_feed(s, in.p, in.len - 1, sink_out, &k);
  CHECK(!sg_sparkmsg_header_known(s, NULL));
  sg_sparkmsg_feed(s, in.p + in.len - 1, 1, sink_out, &k);
  sg_sparkmsg_header h;
  CHECK(sg_sparkmsg_header_known(s, &h));
  CHECK(!h.user_id_present && strcmp(h.user_id, "") == 0);
  sg_sparkmsg_free(s);
  b_free(&k.out);
  b_free(&in);

  frame_body(&in, SID, NULL, NULL, 5000);
  o.header_window_bytes = 1000;
  s = new_or_die(&o);
  k = (sink){0};
  size_t known_at = 0;
  for (size_t i = 0; i < in.len; i += 7) {
    size_t n = in.len - i < 7 ? in.len - i : 7;
    sg_sparkmsg_feed(s, in.p + i, n, sink_out, &k);
    if (known_at == 0 && sg_sparkmsg_header_known(s, NULL))
      known_at = i + n;
  }
  CHECK(known_at >= 5 + 1000 && known_at < 5 + 1000 + 7);
  CHECK(sg_sparkmsg_finish(s) == SG_SPARKMSG_OK);
  CHECK(same_bytes(&k.out, &in));
  sg_sparkmsg_free(s);
  b_free(&k.out);
  b_free(&uc);
  b_free(&in);
}

static void test_output_and_options(void) {
  buf in = {0};
  frame_body(&in, SID, "alice", NULL, 10);
  frame_body(&in, SID, "alice", NULL, 10);

  /* An output failure stops the scanner. */
  sg_sparkmsg_options o = opts_mode(SG_SPARKMSG_USER_OFF);
  sg_sparkmsg *s = new_or_die(&o);
  sink k = {.fail = true};
  CHECK(sg_sparkmsg_feed(s, in.p, in.len, sink_out, &k) ==
        SG_SPARKMSG_INTERNAL);
  CHECK(k.calls == 1);
  CHECK(sg_sparkmsg_reason_grpc_status(SG_SPARKMSG_INTERNAL) == 13);
  sg_sparkmsg_free(s);

  /* The evbuffer output, and a destination that changes between feeds. */
  struct evbuffer *pending = evbuffer_new(), *upstream = evbuffer_new();
  s = new_or_die(&o);
  size_t half = in.len / 2;
  CHECK(sg_sparkmsg_feed(s, in.p, half, sg_sparkmsg_output_evbuffer, pending) ==
        SG_SPARKMSG_OK);
  CHECK(sg_sparkmsg_header_known(s, NULL));
  CHECK(sg_sparkmsg_feed(s, in.p + half, in.len - half,
                         sg_sparkmsg_output_evbuffer,
                         upstream) == SG_SPARKMSG_OK);
  CHECK(evbuffer_get_length(pending) + evbuffer_get_length(upstream) == in.len);
  evbuffer_add_buffer(pending, upstream);
  CHECK(evbuffer_get_length(pending) == in.len &&
        memcmp(evbuffer_pullup(pending, -1), in.p, in.len) == 0);
  evbuffer_free(pending);
  evbuffer_free(upstream);
  sg_sparkmsg_free(s);

  /* Options. */
  char err[128] = "";
  o = opts_mode(SG_SPARKMSG_USER_ENFORCE);
  o.identity = NULL;
  CHECK(sg_sparkmsg_new(&o, err, sizeof err) == NULL && err[0] != '\0');
  o.identity = "";
  CHECK(sg_sparkmsg_new(&o, err, sizeof err) == NULL);
  o.identity = "\xff";
  CHECK(sg_sparkmsg_new(&o, err, sizeof err) == NULL);
  o = opts_mode(SG_SPARKMSG_USER_OFF);
  o.header_window_bytes = 10;
  CHECK(sg_sparkmsg_new(&o, err, sizeof err) == NULL);
  o.header_window_bytes = 0;
  o.user_mode = (sg_sparkmsg_user_mode)9;
  CHECK(sg_sparkmsg_new(&o, err, sizeof err) == NULL);
  s = sg_sparkmsg_new(NULL, err, sizeof err); /* defaults: off */
  CHECK(s != NULL);
  sg_sparkmsg_free(s);
  sg_sparkmsg_free(NULL);

  CHECK(strcmp(sg_sparkmsg_reason_name(SG_SPARKMSG_COMPRESSED), "compressed") ==
        0);
  CHECK(strcmp(sg_sparkmsg_reason_name(SG_SPARKMSG_MESSAGE_TOO_LARGE),
               "message_too_large") == 0);
  CHECK(strcmp(sg_sparkmsg_reason_name(SG_SPARKMSG_USER_CONTEXT_NOT_EARLY),
               "user_context_not_early") == 0);
  CHECK(strcmp(sg_sparkmsg_reason_name((sg_sparkmsg_reason)999), "unknown") ==
        0);
  b_free(&in);
}

/* Deterministic mutations of a valid stream, fed whole and in random
 * chunks: the verdict never depends on the cut, off-mode output is always
 * a prefix of the input (all of it when accepted), and accepted rewrite
 * output always frames correctly. Mostly a sanitizer workout. */
static uint32_t rng_state = 12345;

static uint32_t rng(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 17;
  rng_state ^= rng_state << 5;
  return rng_state;
}

static void test_random_mutations(void) {
  buf base = {0};
  frame_body(&base, SID, "alice", "Alice", 30);
  frame_body(&base, SID, NULL, NULL, 5);
  frame_body(&base, SID, "alice", NULL, 12);
  buf in = {0};
  for (int iter = 0; iter < 3000; iter++) {
    in.len = 0;
    b_put(&in, base.p, base.len);
    int flips = 1 + (int)(rng() % 3);
    for (int f = 0; f < flips; f++)
      in.p[rng() % in.len] = (uint8_t)rng();
    if (rng() % 4 == 0)
      in.len = rng() % in.len; /* cut the stream short too */
    sg_sparkmsg_user_mode mode = (sg_sparkmsg_user_mode)(rng() % 3);
    sg_sparkmsg_options o = opts_mode(mode);
    o.header_window_bytes = 256;
    result whole = run(&o, &in, 0);

    sg_sparkmsg *s = new_or_die(&o);
    sink k = {0};
    for (size_t i = 0; i < in.len;) {
      size_t n = 1 + rng() % 9;
      if (n > in.len - i)
        n = in.len - i;
      sg_sparkmsg_feed(s, in.p + i, n, sink_out, &k);
      i += n;
    }
    result chunked = {0};
    collect(s, &k, &chunked);
    sg_sparkmsg_free(s);

    bool ok =
        chunked.reason == whole.reason && chunked.messages == whole.messages;
    if (whole.reason == SG_SPARKMSG_OK)
      ok = ok && same_bytes(&whole.out, &chunked.out);
    if (mode != SG_SPARKMSG_USER_REWRITE) {
      ok = ok && is_prefix(&whole.out, &in) && is_prefix(&chunked.out, &in);
      if (whole.reason == SG_SPARKMSG_OK)
        ok = ok && same_bytes(&whole.out, &in);
    } else if (whole.reason == SG_SPARKMSG_OK) {
      frame fr[8];
      ok = ok && dec_frames(&whole.out, fr, 8) == (int)whole.messages;
    }
    if (!ok)
      fprintf(stderr, "mutation %d (mode %d) inconsistent\n", iter, mode);
    CHECK(ok);
    b_free(&whole.out);
    b_free(&chunked.out);
    if (!ok)
      break;
  }
  b_free(&in);
  b_free(&base);
}

int main(void) {
  test_valid_single();
  test_several_in_one_chunk();
  test_split_everywhere();
  test_hold_back_last_byte();
  test_reject_withholds_final_byte();
  test_reject_in_same_feed_keeps_approved();
  test_duplicates();
  test_malformed();
  test_session_id_rules();
  test_framing();
  test_enforce_forged_tenth();
  test_rewrite();
  test_rewrite_large_without_user_context();
  test_header_known();
  test_output_and_options();
  test_random_mutations();
  if (failures) {
    fprintf(stderr, "test_sparkmsg: %d check(s) failed\n", failures);
    return 1;
  }
  return 0;
}
