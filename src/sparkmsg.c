#include "sparkgate/sparkmsg.h"

#include <event2/buffer.h>
#include <stdarg.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "sparkgate/memcache.h"

/* Field numbers in every Spark Connect request and in UserContext. */
#define FIELD_SESSION_ID 1u
#define FIELD_USER_CONTEXT 2u
#define UC_FIELD_USER_ID 1u
#define UC_FIELD_USER_NAME 2u

#define WT_VARINT 0u
#define WT_I64 1u
#define WT_LEN 2u
#define WT_SGROUP 3u
#define WT_EGROUP 4u
#define WT_I32 5u

/* The rewrite hold buffer starts small and doubles: a canonical message
 * holds only its session_id field before user_context arrives. */
#define HOLD_INITIAL_BYTES 256u

typedef enum sg_sm_state {
  SG_SM_PREFIX,       /* reading the 5-byte gRPC prefix */
  SG_SM_TAG,          /* reading a top-level tag */
  SG_SM_VARINT,       /* checking a wire-type-0 value */
  SG_SM_LENGTH,       /* reading a wire-type-2 length */
  SG_SM_SKIP,         /* passing over a payload of known size */
  SG_SM_SESSION_ID,   /* copying field 1 */
  SG_SM_USER_CONTEXT, /* copying field 2 */
  SG_SM_REJECTED,     /* terminal */
} sg_sm_state;

/* Per-message knowledge of fields 1 and 2. */
typedef enum sg_field_state {
  FIELD_PENDING, /* not seen (yet) */
  FIELD_READING, /* tag seen, value being copied */
  FIELD_SEEN,
  FIELD_ABSENT, /* decided absent (window passed or message ended) */
} sg_field_state;

/* Where a consumed input byte goes. */
typedef enum sg_disposition {
  DISP_PASS, /* part of the pending output run */
  DISP_HOLD, /* copied into the rewrite hold buffer */
  DISP_DROP, /* replaced by bytes the scanner re-encodes */
} sg_disposition;

typedef struct sg_varint {
  uint64_t value;
  unsigned bytes;
} sg_varint;

/* What a parse of the copied user_context found. */
typedef struct sg_uc_info {
  bool user_id_present;
  size_t user_id_off, user_id_len;
  size_t others_len; /* bytes of fields other than user_id/user_name */
} sg_uc_info;

struct sg_sparkmsg {
  /* configuration */
  sg_sparkmsg_user_mode user_mode;
  sg_sparkmsg_user_name_mode user_name_mode;
  size_t identity_len;
  uint64_t max_message_bytes;
  uint64_t window_bytes;

  /* stream */
  sg_sm_state state;
  sg_sparkmsg_reason reason;
  uint64_t messages; /* approved */
  bool header_known;
  bool first_user_id_present;
  char *first_user_id; /* first_user_id_small or owned; NULL until known */

  /* current message */
  uint8_t prefix[SG_SPARKMSG_PREFIX_BYTES];
  size_t prefix_got;
  uint64_t msg_len, msg_left;
  bool window_done; /* the header window was passed or is not needed */
  sg_varint v;
  uint32_t field, wire;
  size_t field_hdr_bytes; /* tag + length bytes of the current field */
  uint64_t field_left;
  sg_field_state sid_state, uc_state;
  size_t sid_len;
  size_t uc_len, uc_field_len;
  sg_uc_info uc_info;

  /* rewrite: bytes held until the new length is known */
  bool holding;
  uint8_t *hold;
  size_t hold_len, hold_cap, hold_limit;
  size_t tag_start_hold; /* hold_len when the current tag began */
  size_t uc_at;          /* where user_context sits in the held bytes */

  /* valid during sg_sparkmsg_feed() only */
  sg_sparkmsg_output_fn out;
  void *out_arg;
  size_t stage_len;    /* bytes in stage, below */
  const uint8_t *run; /* start of input bytes scanned but not yet emitted */

  /* Buffers last: sg_sparkmsg_new zeroes only what comes before them (the
   * scanner is made for every Spark call, and zeroing 5 KiB of buffers was
   * a tenth of a small call's instructions). Each is valid up to its
   * length field or its NUL. */
  char identity[SG_SPARKMSG_IDENTITY_MAX_BYTES + 1];
  char error[SG_SPARKMSG_ERROR_BYTES];
  /* Small approved pieces (a rewritten field, a prefix) gathered into one
   * output call per feed: the output is an evbuffer append, not free. */
  uint8_t stage[256];
  char first_user_id_small[128]; /* a usual user_id, without a malloc */
  char first_session_id[SG_SPARKMSG_SESSION_ID_MAX_BYTES + 1];
  uint8_t sid[SG_SPARKMSG_SESSION_ID_MAX_BYTES + 1];
  uint8_t uc[SG_SPARKMSG_USER_CONTEXT_MAX_BYTES];
};

static const char *const reason_names[] = {
    [SG_SPARKMSG_OK] = "ok",
    [SG_SPARKMSG_BAD_FLAG] = "bad_flag",
    [SG_SPARKMSG_COMPRESSED] = "compressed",
    [SG_SPARKMSG_MESSAGE_TOO_LARGE] = "message_too_large",
    [SG_SPARKMSG_BAD_VARINT] = "bad_varint",
    [SG_SPARKMSG_TRUNCATED] = "truncated",
    [SG_SPARKMSG_LENGTH_PAST_END] = "length_past_end",
    [SG_SPARKMSG_GROUP_WIRE_TYPE] = "group_wire_type",
    [SG_SPARKMSG_BAD_WIRE_TYPE] = "bad_wire_type",
    [SG_SPARKMSG_FIELD_ZERO] = "field_zero",
    [SG_SPARKMSG_MISSING_SESSION_ID] = "missing_session_id",
    [SG_SPARKMSG_DUPLICATE_SESSION_ID] = "duplicate_session_id",
    [SG_SPARKMSG_BAD_SESSION_ID] = "bad_session_id",
    [SG_SPARKMSG_SESSION_ID_CHANGED] = "session_id_changed",
    [SG_SPARKMSG_SESSION_ID_NOT_EARLY] = "session_id_not_early",
    [SG_SPARKMSG_DUPLICATE_USER_CONTEXT] = "duplicate_user_context",
    [SG_SPARKMSG_BAD_USER_CONTEXT] = "bad_user_context",
    [SG_SPARKMSG_USER_CONTEXT_TOO_LARGE] = "user_context_too_large",
    [SG_SPARKMSG_USER_CONTEXT_NOT_EARLY] = "user_context_not_early",
    [SG_SPARKMSG_DUPLICATE_USER_ID] = "duplicate_user_id",
    [SG_SPARKMSG_USER_ID_MISMATCH] = "user_id_mismatch",
    [SG_SPARKMSG_INCOMPLETE_MESSAGE] = "incomplete_message",
    [SG_SPARKMSG_INTERNAL] = "internal",
};

const char *sg_sparkmsg_reason_name(sg_sparkmsg_reason r) {
  if ((unsigned)r < sizeof reason_names / sizeof reason_names[0] &&
      reason_names[r] != NULL)
    return reason_names[r];
  return "unknown";
}

int sg_sparkmsg_reason_grpc_status(sg_sparkmsg_reason r) {
  switch (r) {
  case SG_SPARKMSG_OK:
    return 0;
  case SG_SPARKMSG_USER_ID_MISMATCH:
    return 7;
  case SG_SPARKMSG_INTERNAL:
    return 13;
  default:
    return 3;
  }
}

/* ---- small pure helpers ------------------------------------------------ */

/* Adds one byte; returns 1 when the varint is complete, 0 when more bytes
 * follow, -1 when it is longer than 10 bytes or overflows 64 bits (the 10th
 * byte may only carry bit 63 and must end the varint). */
static int varint_push(sg_varint *v, uint8_t b) {
  if (v->bytes == SG_SPARKMSG_VARINT_MAX_BYTES - 1 && b > 1)
    return -1;
  v->value |= (uint64_t)(b & 0x7f) << (7 * v->bytes);
  v->bytes++;
  return (b & 0x80) ? 0 : 1;
}

static size_t varint_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

static size_t varint_put(uint8_t *out, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    out[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  out[n++] = (uint8_t)v;
  return n;
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF), as proto3
 * parsers require for string fields. NUL is refused too when no_nul: the
 * value is handed on as a C string. */
static bool utf8_valid(const uint8_t *p, size_t n, bool no_nul) {
  const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
  size_t i = 0;
  while (i < n) {
    /* ASCII eight bytes at a time: session ids, user names, most strings. */
    while (n - i >= 8) {
      uint64_t w;
      memcpy(&w, p + i, 8);
      if (w & highs)
        break;
      if (no_nul && ((w - ones) & ~w & highs)) /* a zero byte */
        return false;
      i += 8;
    }
    if (i == n)
      break;
    uint8_t c = p[i];
    if (c < 0x80) {
      if (c == 0 && no_nul)
        return false;
      i++;
      continue;
    }
    size_t extra;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) {
      extra = 1, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      extra = 2, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      extra = 3, cp = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (n - i <= extra)
      return false;
    for (size_t k = 1; k <= extra; k++) {
      if ((p[i + k] & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += extra + 1;
  }
  return true;
}

/* ---- rejection and output ---------------------------------------------- */

static void reject(sg_sparkmsg *s, sg_sparkmsg_reason r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void reject(sg_sparkmsg *s, sg_sparkmsg_reason r, const char *fmt, ...) {
  if (s->state == SG_SM_REJECTED)
    return;
  s->state = SG_SM_REJECTED;
  s->reason = r;
  int n = snprintf(s->error, sizeof s->error,
                   "message %llu: ", (unsigned long long)(s->messages + 1));
  if (n < 0 || (size_t)n >= sizeof s->error)
    n = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s->error + n, sizeof s->error - (size_t)n, fmt, ap);
  va_end(ap);
  /* Whatever is still pending belongs to the rejected message (approved
   * messages are flushed at approval): it is never emitted. */
  s->run = NULL;
  s->hold_len = 0;
}

static bool output(sg_sparkmsg *s, const uint8_t *p, size_t n) {
  if (s->out(s->out_arg, p, n) != 0) {
    reject(s, SG_SPARKMSG_INTERNAL, "output failed");
    return false;
  }
  return true;
}

static bool stage_flush(sg_sparkmsg *s) {
  size_t n = s->stage_len;
  s->stage_len = 0;
  return n == 0 || output(s, s->stage, n);
}

#define STAGE_PIECE_MAX 128

static bool emit(sg_sparkmsg *s, const uint8_t *p, size_t n) {
  if (n == 0 || s->state == SG_SM_REJECTED)
    return s->state != SG_SM_REJECTED;
  if (n <= STAGE_PIECE_MAX && s->stage_len + n <= sizeof s->stage) {
    memcpy(s->stage + s->stage_len, p, n);
    s->stage_len += n;
    return true;
  }
  return stage_flush(s) && output(s, p, n);
}

static void flush_run(sg_sparkmsg *s, const uint8_t *end) {
  if (s->run != NULL && end > s->run) {
    const uint8_t *start = s->run;
    s->run = end;
    emit(s, start, (size_t)(end - start));
  }
}

static bool hold_append(sg_sparkmsg *s, const uint8_t *p, size_t n) {
  if (s->hold_len + n > s->hold_cap) {
    size_t cap = s->hold_cap ? s->hold_cap : HOLD_INITIAL_BYTES;
    while (cap < s->hold_len + n)
      cap *= 2;
    if (cap > s->hold_limit)
      cap = s->hold_limit;
    uint8_t *nh = cap >= s->hold_len + n ? sg_memcache_realloc(s->hold, cap) : NULL;
    if (nh == NULL) {
      reject(s, SG_SPARKMSG_INTERNAL, "hold buffer exhausted");
      return false;
    }
    s->hold = nh;
    s->hold_cap = cap;
  }
  memcpy(s->hold + s->hold_len, p, n);
  s->hold_len += n;
  return true;
}

/* Accounts for n consumed body or prefix bytes at p. */
static void take(sg_sparkmsg *s, const uint8_t *p, size_t n, sg_disposition d) {
  if (d == DISP_PASS)
    return; /* already inside the run [s->run, p + n) */
  flush_run(s, p);
  if (d == DISP_HOLD && !hold_append(s, p, n))
    return;
  s->run = p + n;
}

static sg_disposition body_disposition(const sg_sparkmsg *s) {
  return s->holding ? DISP_HOLD : DISP_PASS;
}

/* ---- user_context ------------------------------------------------------ */

/* Walks the copied user_context. Validates it and fills s->uc_info when
 * emit_others is false; otherwise (already validated) emits the fields other
 * than user_id and user_name, byte for byte and in order. */
static sg_sparkmsg_reason uc_walk(sg_sparkmsg *s, bool emit_others,
                                  const char **why) {
  const uint8_t *b = s->uc;
  size_t n = s->uc_len, i = 0;
  bool name_seen = false;
  sg_uc_info info = {0};

  while (i < n) {
    size_t start = i;
    sg_varint v = {0};
    int r = 0;
    while (i < n && (r = varint_push(&v, b[i++])) == 0)
      ;
    if (r < 0) {
      *why = "bad varint in user_context";
      return SG_SPARKMSG_BAD_VARINT;
    }
    if (r == 0) {
      *why = "user_context ends inside a tag";
      return SG_SPARKMSG_BAD_USER_CONTEXT;
    }
    uint64_t tag = v.value;
    uint32_t field = (uint32_t)(tag >> 3), wt = (uint32_t)(tag & 7);
    if (tag > UINT32_MAX) {
      *why = "user_context tag exceeds 32 bits";
      return SG_SPARKMSG_BAD_VARINT;
    }
    if (field == 0) {
      *why = "field 0 in user_context";
      return SG_SPARKMSG_FIELD_ZERO;
    }
    size_t val_off = i, val_len = 0;
    switch (wt) {
    case WT_VARINT:
      v = (sg_varint){0};
      r = 0;
      while (i < n && (r = varint_push(&v, b[i++])) == 0)
        ;
      if (r <= 0) {
        *why = "bad varint value in user_context";
        return r < 0 ? SG_SPARKMSG_BAD_VARINT : SG_SPARKMSG_BAD_USER_CONTEXT;
      }
      break;
    case WT_I64:
    case WT_I32:
      val_len = wt == WT_I64 ? 8 : 4;
      if (n - i < val_len) {
        *why = "fixed-size value past the end of user_context";
        return SG_SPARKMSG_BAD_USER_CONTEXT;
      }
      i += val_len;
      break;
    case WT_LEN:
      v = (sg_varint){0};
      r = 0;
      while (i < n && (r = varint_push(&v, b[i++])) == 0)
        ;
      if (r <= 0) {
        *why = "bad length in user_context";
        return r < 0 ? SG_SPARKMSG_BAD_VARINT : SG_SPARKMSG_BAD_USER_CONTEXT;
      }
      if (v.value > n - i) {
        *why = "length past the end of user_context";
        return SG_SPARKMSG_LENGTH_PAST_END;
      }
      val_off = i;
      val_len = (size_t)v.value;
      i += val_len;
      break;
    case WT_SGROUP:
    case WT_EGROUP:
      *why = "group wire type in user_context";
      return SG_SPARKMSG_GROUP_WIRE_TYPE;
    default:
      *why = "wire type 6/7 in user_context";
      return SG_SPARKMSG_BAD_WIRE_TYPE;
    }

    if (field == UC_FIELD_USER_ID || field == UC_FIELD_USER_NAME) {
      if (wt != WT_LEN) {
        *why = "user_id/user_name is not a string";
        return SG_SPARKMSG_BAD_USER_CONTEXT;
      }
      bool is_id = field == UC_FIELD_USER_ID;
      if (!utf8_valid(b + val_off, val_len, is_id)) {
        *why = is_id ? "user_id is not UTF-8 without NUL"
                     : "user_name is not UTF-8";
        return SG_SPARKMSG_BAD_USER_CONTEXT;
      }
      if (is_id) {
        if (info.user_id_present) {
          *why = "second user_id in user_context";
          return SG_SPARKMSG_DUPLICATE_USER_ID;
        }
        info.user_id_present = true;
        info.user_id_off = val_off;
        info.user_id_len = val_len;
      } else {
        if (name_seen) {
          *why = "second user_name in user_context";
          return SG_SPARKMSG_BAD_USER_CONTEXT;
        }
        name_seen = true;
      }
    } else {
      info.others_len += i - start;
      if (emit_others && !emit(s, b + start, i - start))
        return SG_SPARKMSG_INTERNAL;
    }
  }
  if (!emit_others)
    s->uc_info = info;
  return SG_SPARKMSG_OK;
}

/* Size of the re-encoded user_context body for rewrite mode. */
static uint64_t uc_new_body_len(const sg_sparkmsg *s, bool have_uc) {
  uint64_t id_field = 1 + varint_size(s->identity_len) + s->identity_len;
  uint64_t len = id_field;
  if (s->user_name_mode == SG_SPARKMSG_USER_NAME_IDENTITY)
    len += id_field;
  if (have_uc)
    len += s->uc_info.others_len;
  return len;
}

static bool emit_string_field(sg_sparkmsg *s, uint32_t field) {
  uint8_t hdr[1 + SG_SPARKMSG_VARINT_MAX_BYTES];
  hdr[0] = (uint8_t)((field << 3) | WT_LEN);
  size_t h = 1 + varint_put(hdr + 1, s->identity_len);
  return emit(s, hdr, h) &&
         emit(s, (const uint8_t *)s->identity, s->identity_len);
}

/* Rewrite mode: the new length is known now. Emits the new prefix, the held
 * bytes and the re-encoded user_context at its original place (or right
 * after the prefix when the message has none), then lets the rest of the
 * message stream through. */
static void commit(sg_sparkmsg *s) {
  bool have_uc = s->uc_state == FIELD_SEEN;
  uint64_t body = uc_new_body_len(s, have_uc);
  uint64_t field_len = 1 + varint_size(body) + body;
  uint64_t new_len = s->msg_len - (have_uc ? s->uc_field_len : 0) + field_len;
  if (new_len > s->max_message_bytes || new_len > UINT32_MAX) {
    reject(s, SG_SPARKMSG_MESSAGE_TOO_LARGE,
           "rewritten message exceeds limits.max_message_bytes (%llu)",
           (unsigned long long)s->max_message_bytes);
    return;
  }
  uint8_t hdr[SG_SPARKMSG_PREFIX_BYTES];
  hdr[0] = 0;
  hdr[1] = (uint8_t)(new_len >> 24);
  hdr[2] = (uint8_t)(new_len >> 16);
  hdr[3] = (uint8_t)(new_len >> 8);
  hdr[4] = (uint8_t)new_len;
  uint8_t uc_hdr[1 + SG_SPARKMSG_VARINT_MAX_BYTES];
  uc_hdr[0] = (uint8_t)((FIELD_USER_CONTEXT << 3) | WT_LEN);
  size_t uc_hdr_len = 1 + varint_put(uc_hdr + 1, body);
  size_t at = have_uc ? s->uc_at : 0;
  const char *why = NULL;
  static const uint8_t none[1];
  const uint8_t *held = s->hold != NULL ? s->hold : none;

  if (!emit(s, hdr, SG_SPARKMSG_PREFIX_BYTES) || !emit(s, held, at) ||
      !emit(s, uc_hdr, uc_hdr_len) || !emit_string_field(s, UC_FIELD_USER_ID) ||
      (s->user_name_mode == SG_SPARKMSG_USER_NAME_IDENTITY &&
       !emit_string_field(s, UC_FIELD_USER_NAME)) ||
      (have_uc && uc_walk(s, true, &why) != SG_SPARKMSG_OK) ||
      !emit(s, held + at, s->hold_len - at))
    return;
  s->holding = false;
  s->hold_len = 0;
}

/* ---- message life cycle ------------------------------------------------ */

static void maybe_header_known(sg_sparkmsg *s) {
  if (s->messages == 0 && s->sid_state == FIELD_SEEN &&
      (s->uc_state == FIELD_SEEN || s->uc_state == FIELD_ABSENT))
    s->header_known = true;
}

static void start_message(sg_sparkmsg *s) {
  s->prefix_got = 0;
  s->msg_len = s->msg_left = 0;
  s->v = (sg_varint){0};
  s->sid_state = s->uc_state = FIELD_PENDING;
  s->sid_len = s->uc_len = s->uc_field_len = 0;
  s->uc_info = (sg_uc_info){0};
  s->holding = false;
  s->hold_len = s->tag_start_hold = s->uc_at = 0;
  /* Only rewrite (every message) and routing (the first) need a decision
   * about fields 1 and 2 before the message ends. */
  s->window_done =
      !(s->user_mode == SG_SPARKMSG_USER_REWRITE || s->messages == 0);
  s->state = SG_SM_PREFIX;
}

/* The message's last byte (at final, already consumed) has been scanned. */
static void end_message(sg_sparkmsg *s, const uint8_t *final) {
  if (s->sid_state != FIELD_SEEN) {
    reject(s, SG_SPARKMSG_MISSING_SESSION_ID, "no session_id");
    return;
  }
  if (s->uc_state == FIELD_PENDING)
    s->uc_state = FIELD_ABSENT;
  if (s->user_mode == SG_SPARKMSG_USER_ENFORCE &&
      (s->uc_state != FIELD_SEEN || !s->uc_info.user_id_present)) {
    reject(s, SG_SPARKMSG_USER_ID_MISMATCH, "no user_id (enforced)");
    return;
  }
  if (s->holding) {
    commit(s);
  } else {
    /* The run ends with the final byte: approval releases it. */
    flush_run(s, final + 1);
  }
  if (s->state == SG_SM_REJECTED)
    return;
  if (s->messages == 0)
    s->header_known = true;
  s->messages++;
  start_message(s);
}

static void field_done(sg_sparkmsg *s, const uint8_t *end) {
  s->state = SG_SM_TAG;
  s->v = (sg_varint){0};
  if (s->msg_left == 0)
    end_message(s, end - 1);
}

/* The first header_window_bytes of the body have been scanned. */
static void window_passed(sg_sparkmsg *s) {
  s->window_done = true;
  if (s->messages == 0 && s->sid_state == FIELD_PENDING) {
    reject(s, SG_SPARKMSG_SESSION_ID_NOT_EARLY,
           "no session_id in the first %llu bytes",
           (unsigned long long)s->window_bytes);
    return;
  }
  if (s->uc_state == FIELD_PENDING) {
    s->uc_state = FIELD_ABSENT;
    if (s->user_mode == SG_SPARKMSG_USER_ENFORCE) {
      reject(s, SG_SPARKMSG_USER_ID_MISMATCH,
             "no user_context in the first %llu bytes (enforced)",
             (unsigned long long)s->window_bytes);
      return;
    }
    if (s->holding)
      commit(s);
  }
  maybe_header_known(s);
}

static void session_id_done(sg_sparkmsg *s, const uint8_t *end) {
  if (!utf8_valid(s->sid, s->sid_len, true)) {
    reject(s, SG_SPARKMSG_BAD_SESSION_ID, "session_id is not UTF-8 w/o NUL");
    return;
  }
  s->sid[s->sid_len] = '\0';
  s->sid_state = FIELD_SEEN;
  if (s->messages == 0) {
    memcpy(s->first_session_id, s->sid, s->sid_len + 1);
  } else if (strcmp(s->first_session_id, (const char *)s->sid) != 0) {
    reject(s, SG_SPARKMSG_SESSION_ID_CHANGED,
           "session_id differs from the stream's first message");
    return;
  }
  maybe_header_known(s);
  field_done(s, end);
}

static void free_first_user_id(sg_sparkmsg *s) {
  if (s->first_user_id != s->first_user_id_small)
    free(s->first_user_id);
  s->first_user_id = NULL;
}

static void user_context_done(sg_sparkmsg *s, const uint8_t *end) {
  const char *why = "";
  sg_sparkmsg_reason r = uc_walk(s, false, &why);
  if (r != SG_SPARKMSG_OK) {
    reject(s, r, "%s", why);
    return;
  }
  s->uc_state = FIELD_SEEN;
  const sg_uc_info *u = &s->uc_info;
  if (s->messages == 0 && u->user_id_present) {
    char *copy = u->user_id_len < sizeof s->first_user_id_small
                     ? s->first_user_id_small
                     : malloc(u->user_id_len + 1);
    if (copy == NULL) {
      reject(s, SG_SPARKMSG_INTERNAL, "out of memory");
      return;
    }
    memcpy(copy, s->uc + u->user_id_off, u->user_id_len);
    copy[u->user_id_len] = '\0';
    free_first_user_id(s);
    s->first_user_id = copy;
    s->first_user_id_present = true;
  }
  if (s->user_mode == SG_SPARKMSG_USER_ENFORCE &&
      (!u->user_id_present || u->user_id_len != s->identity_len ||
       memcmp(s->uc + u->user_id_off, s->identity, s->identity_len) != 0)) {
    reject(s, SG_SPARKMSG_USER_ID_MISMATCH,
           u->user_id_present ? "user_id is not the authenticated identity"
                              : "no user_id (enforced)");
    return;
  }
  maybe_header_known(s);
  /* A user_context ending the message is committed by end_message, after
   * the message-level checks: the final byte must wait for them. */
  if (s->holding && s->msg_left > 0)
    commit(s);
  if (s->state != SG_SM_REJECTED)
    field_done(s, end);
}

/* ---- the state machine ------------------------------------------------- */

static void on_prefix(sg_sparkmsg *s, const uint8_t *end, bool emit_copy) {
  uint8_t flag = s->prefix[0];
  uint64_t len = (uint64_t)s->prefix[1] << 24 | (uint64_t)s->prefix[2] << 16 |
                 (uint64_t)s->prefix[3] << 8 | s->prefix[4];
  if (flag == 1) {
    reject(s, SG_SPARKMSG_COMPRESSED, "compressed message refused");
    return;
  }
  if (flag != 0) {
    reject(s, SG_SPARKMSG_BAD_FLAG, "flag byte %u", (unsigned)flag);
    return;
  }
  if (len > s->max_message_bytes) {
    reject(s, SG_SPARKMSG_MESSAGE_TOO_LARGE, "%llu bytes, over limits.max_message_bytes (%llu)",
           (unsigned long long)len, (unsigned long long)s->max_message_bytes);
    return;
  }
  s->msg_len = s->msg_left = len;
  s->holding = s->user_mode == SG_SPARKMSG_USER_REWRITE;
  s->state = SG_SM_TAG;
  /* An empty body has no session_id: end_message rejects it, so the prefix
   * (whose last byte is the message's final byte) is never emitted. */
  if (len == 0)
    end_message(s, end - 1);
  else if (emit_copy)
    emit(s, s->prefix, SG_SPARKMSG_PREFIX_BYTES);
}

static void on_tag(sg_sparkmsg *s, uint64_t tag) {
  if (tag > UINT32_MAX) {
    reject(s, SG_SPARKMSG_BAD_VARINT, "tag exceeds 32 bits");
    return;
  }
  s->field = (uint32_t)(tag >> 3);
  s->wire = (uint32_t)(tag & 7);
  if (s->field == 0) {
    reject(s, SG_SPARKMSG_FIELD_ZERO, "field number 0");
    return;
  }
  if (s->wire == WT_SGROUP || s->wire == WT_EGROUP) {
    reject(s, SG_SPARKMSG_GROUP_WIRE_TYPE, "group in field %u", s->field);
    return;
  }
  if (s->wire > WT_I32) {
    reject(s, SG_SPARKMSG_BAD_WIRE_TYPE, "wire type %u in field %u", s->wire,
           s->field);
    return;
  }
  if (s->field == FIELD_SESSION_ID) {
    if (s->wire != WT_LEN) {
      reject(s, SG_SPARKMSG_BAD_SESSION_ID, "session_id is not a string");
      return;
    }
    if (s->sid_state != FIELD_PENDING) {
      reject(s, SG_SPARKMSG_DUPLICATE_SESSION_ID, "second session_id");
      return;
    }
    s->sid_state = FIELD_READING;
  } else if (s->field == FIELD_USER_CONTEXT) {
    if (s->wire != WT_LEN) {
      reject(s, SG_SPARKMSG_BAD_USER_CONTEXT, "user_context is not a message");
      return;
    }
    if (s->uc_state == FIELD_ABSENT) {
      reject(s, SG_SPARKMSG_USER_CONTEXT_NOT_EARLY,
             "user_context after the first %llu bytes",
             (unsigned long long)s->window_bytes);
      return;
    }
    if (s->uc_state != FIELD_PENDING) {
      reject(s, SG_SPARKMSG_DUPLICATE_USER_CONTEXT, "second user_context");
      return;
    }
    s->uc_state = FIELD_READING;
  }
  if (s->msg_left == 0) {
    reject(s, SG_SPARKMSG_TRUNCATED, "field %u has no value", s->field);
    return;
  }
  switch (s->wire) {
  case WT_VARINT:
    s->state = SG_SM_VARINT;
    break;
  case WT_LEN:
    s->state = SG_SM_LENGTH;
    break;
  default:
    s->field_left = s->wire == WT_I64 ? 8 : 4;
    if (s->field_left > s->msg_left) {
      reject(s, SG_SPARKMSG_TRUNCATED, "fixed-size field %u past the end",
             s->field);
      return;
    }
    s->state = SG_SM_SKIP;
  }
}

static void on_length(sg_sparkmsg *s, uint64_t len, const uint8_t *end) {
  if (len > s->msg_left) {
    reject(s, SG_SPARKMSG_LENGTH_PAST_END, "field %u length past the end",
           s->field);
    return;
  }
  s->field_left = len;
  if (s->field == FIELD_SESSION_ID) {
    if (len == 0 || len > SG_SPARKMSG_SESSION_ID_MAX_BYTES) {
      reject(s, SG_SPARKMSG_BAD_SESSION_ID, "session_id of %llu bytes",
             (unsigned long long)len);
      return;
    }
    s->state = SG_SM_SESSION_ID;
  } else if (s->field == FIELD_USER_CONTEXT) {
    if (len > SG_SPARKMSG_USER_CONTEXT_MAX_BYTES) {
      reject(s, SG_SPARKMSG_USER_CONTEXT_TOO_LARGE,
             "user_context of %llu bytes, limit %u", (unsigned long long)len,
             SG_SPARKMSG_USER_CONTEXT_MAX_BYTES);
      return;
    }
    s->uc_field_len = s->field_hdr_bytes + (size_t)len;
    if (s->holding) {
      /* Its tag and length were held; the field is re-encoded instead. */
      s->hold_len = s->tag_start_hold;
      s->uc_at = s->tag_start_hold;
    }
    s->state = SG_SM_USER_CONTEXT;
    if (len == 0)
      user_context_done(s, end);
  } else {
    s->state = SG_SM_SKIP;
    if (len == 0)
      field_done(s, end);
  }
}

/* Bytes that may be consumed before the header window decision is due. */
static uint64_t window_room(const sg_sparkmsg *s) {
  if (s->window_done)
    return UINT64_MAX;
  return s->window_bytes - (s->msg_len - s->msg_left);
}

static size_t step_prefix(sg_sparkmsg *s, const uint8_t *p, size_t avail) {
  /* Nothing of a prefix is emitted before it is checked. One that arrives
   * in one piece stays in the run (a rejection discards the run); pieces of
   * a split one are dropped and the copy is emitted once it is checked. In
   * rewrite mode the prefix is re-made once the new length is known. */
  bool whole = s->prefix_got == 0 && avail >= SG_SPARKMSG_PREFIX_BYTES;
  size_t n = SG_SPARKMSG_PREFIX_BYTES - s->prefix_got;
  if (n > avail)
    n = avail;
  memcpy(s->prefix + s->prefix_got, p, n);
  s->prefix_got += n;
  bool pass = whole && s->user_mode != SG_SPARKMSG_USER_REWRITE;
  take(s, p, n, pass ? DISP_PASS : DISP_DROP);
  if (s->prefix_got == SG_SPARKMSG_PREFIX_BYTES && s->state != SG_SM_REJECTED)
    on_prefix(s, p + n, !pass && s->user_mode != SG_SPARKMSG_USER_REWRITE);
  return n;
}

/* Tags, lengths and wire-type-0 values: one byte at a time (<= 10). */
static size_t step_varint(sg_sparkmsg *s, const uint8_t *p) {
  if (s->state == SG_SM_TAG && s->v.bytes == 0) {
    s->tag_start_hold = s->hold_len;
    s->field_hdr_bytes = 0;
  }
  if (s->state != SG_SM_VARINT)
    s->field_hdr_bytes++;
  take(s, p, 1, body_disposition(s));
  s->msg_left--;
  if (s->state == SG_SM_REJECTED)
    return 1;
  int r = varint_push(&s->v, p[0]);
  if (r < 0) {
    reject(s, SG_SPARKMSG_BAD_VARINT, "varint longer than 10 bytes");
    return 1;
  }
  if (r == 0) {
    if (s->msg_left == 0)
      reject(s, SG_SPARKMSG_TRUNCATED, "varint past the end");
    return 1;
  }
  uint64_t value = s->v.value;
  s->v = (sg_varint){0};
  switch (s->state) {
  case SG_SM_TAG:
    on_tag(s, value);
    break;
  case SG_SM_LENGTH:
    on_length(s, value, p + 1);
    break;
  default:
    field_done(s, p + 1);
  }
  return 1;
}

/* Payloads: skipped or copied in one go, never byte by byte. */
static size_t step_payload(sg_sparkmsg *s, const uint8_t *p, size_t avail) {
  uint64_t n = s->field_left;
  if (n > avail)
    n = avail;
  uint64_t room = window_room(s);
  if (n > room)
    n = room;
  sg_disposition d = body_disposition(s);
  if (s->state == SG_SM_SESSION_ID) {
    memcpy(s->sid + s->sid_len, p, (size_t)n);
    s->sid_len += (size_t)n;
  } else if (s->state == SG_SM_USER_CONTEXT) {
    memcpy(s->uc + s->uc_len, p, (size_t)n);
    s->uc_len += (size_t)n;
    if (s->holding)
      d = DISP_DROP;
  }
  take(s, p, (size_t)n, d);
  s->msg_left -= n;
  s->field_left -= n;
  if (s->state == SG_SM_REJECTED || s->field_left > 0)
    return (size_t)n;
  switch (s->state) {
  case SG_SM_SESSION_ID:
    session_id_done(s, p + n);
    break;
  case SG_SM_USER_CONTEXT:
    user_context_done(s, p + n);
    break;
  default:
    field_done(s, p + n);
  }
  return (size_t)n;
}

static size_t step(sg_sparkmsg *s, const uint8_t *p, size_t avail) {
  size_t n;
  switch (s->state) {
  case SG_SM_PREFIX:
    return step_prefix(s, p, avail);
  case SG_SM_TAG:
  case SG_SM_VARINT:
  case SG_SM_LENGTH:
    n = step_varint(s, p);
    break;
  case SG_SM_SKIP:
  case SG_SM_SESSION_ID:
  case SG_SM_USER_CONTEXT:
    n = step_payload(s, p, avail);
    break;
  default:
    return 0;
  }
  /* end_message() resets window_done for the next message, so this fires
   * only inside a message that continues. */
  if (s->state != SG_SM_REJECTED && s->state != SG_SM_PREFIX &&
      !s->window_done && s->msg_len - s->msg_left >= s->window_bytes)
    window_passed(s);
  return n;
}

/* ---- public API -------------------------------------------------------- */

#define SG_STR_(x) #x
#define SG_STR(x) SG_STR_(x)

static void set_err(char *err, size_t errlen, const char *msg) {
  if (err != NULL && errlen > 0)
    snprintf(err, errlen, "%s", msg);
}

sg_sparkmsg *sg_sparkmsg_new(const sg_sparkmsg_options *opts, char *err,
                             size_t errlen) {
  sg_sparkmsg_options o = opts ? *opts : (sg_sparkmsg_options){0};
  if (o.user_mode != SG_SPARKMSG_USER_OFF &&
      o.user_mode != SG_SPARKMSG_USER_ENFORCE &&
      o.user_mode != SG_SPARKMSG_USER_REWRITE) {
    set_err(err, errlen, "sparkmsg: unknown user_id mode");
    return NULL;
  }
  size_t id_len = 0;
  if (o.user_mode != SG_SPARKMSG_USER_OFF) {
    id_len = o.identity ? strlen(o.identity) : 0;
    if (id_len == 0 || id_len > SG_SPARKMSG_IDENTITY_MAX_BYTES ||
        !utf8_valid((const uint8_t *)o.identity, id_len, true)) {
      set_err(err, errlen, "sparkmsg: identity must be 1 to " SG_STR(SG_SPARKMSG_IDENTITY_MAX_BYTES)
                           " bytes of UTF-8");
      return NULL;
    }
  }
  if (o.max_message_bytes == 0)
    o.max_message_bytes = SG_SPARKMSG_DEFAULT_MAX_MESSAGE_BYTES;
  if ((uint64_t)o.max_message_bytes > UINT32_MAX) {
    set_err(err, errlen, "sparkmsg: max_message_bytes exceeds 4 GiB - 1");
    return NULL;
  }
  if (o.header_window_bytes == 0)
    o.header_window_bytes = SG_SPARKMSG_DEFAULT_HEADER_WINDOW_BYTES;
  if (o.header_window_bytes < SG_SPARKMSG_MIN_HEADER_WINDOW_BYTES ||
      o.header_window_bytes > SG_SPARKMSG_MAX_HEADER_WINDOW_BYTES) {
    set_err(err, errlen,
            "sparkmsg: header_window_bytes must be 256 B to 16 MiB");
    return NULL;
  }

  /* One per Spark call, 7 KiB: from the thread's cache, not glibc's slow
   * path for blocks of this size. */
  sg_sparkmsg *s = sg_memcache_malloc(sizeof *s);
  if (s == NULL) {
    set_err(err, errlen, "sparkmsg: out of memory");
    return NULL;
  }
  memset(s, 0, offsetof(sg_sparkmsg, identity));
  s->identity[0] = '\0';
  s->error[0] = '\0';
  s->first_session_id[0] = '\0';
  s->sid[0] = 0;
  s->user_mode = o.user_mode;
  s->user_name_mode = o.user_name_mode;
  if (id_len > 0)
    memcpy(s->identity, o.identity, id_len + 1);
  s->identity_len = id_len;
  s->max_message_bytes = o.max_message_bytes;
  s->window_bytes = o.header_window_bytes;
  /* Held bytes: the window, plus the tag and length of a user_context that
   * straddles its end (they are dropped again right after). */
  s->hold_limit = o.header_window_bytes + 2 * SG_SPARKMSG_VARINT_MAX_BYTES;
  start_message(s);
  return s;
}

void sg_sparkmsg_free(sg_sparkmsg *s) {
  if (s == NULL)
    return;
  sg_memcache_free(s->hold);
  free_first_user_id(s);
  sg_memcache_free_sized(s, sizeof *s);
}

sg_sparkmsg_reason sg_sparkmsg_feed(sg_sparkmsg *s, const uint8_t *data,
                                    size_t len, sg_sparkmsg_output_fn out,
                                    void *out_arg) {
  if (s->state == SG_SM_REJECTED || len == 0)
    return s->reason;
  s->out = out;
  s->out_arg = out_arg;
  s->run = data;
  size_t pos = 0;
  while (pos < len && s->state != SG_SM_REJECTED)
    pos += step(s, data + pos, len - pos);
  /* Everything up to here is approved output, except a message's final
   * byte, which is never left in the run (end_message flushes it). */
  if (s->state != SG_SM_REJECTED)
    flush_run(s, data + len);
  /* Staged bytes were approved before anything after them was rejected:
   * they go out either way, as they would have unstaged. */
  if (s->stage_len > 0) {
    size_t n = s->stage_len;
    s->stage_len = 0;
    if (s->out(s->out_arg, s->stage, n) != 0 && s->state != SG_SM_REJECTED)
      reject(s, SG_SPARKMSG_INTERNAL, "output failed");
  }
  s->out = NULL;
  s->out_arg = NULL;
  s->run = NULL;
  return s->reason;
}

sg_sparkmsg_reason sg_sparkmsg_finish(sg_sparkmsg *s) {
  if (s->state == SG_SM_REJECTED)
    return s->reason;
  if (s->state != SG_SM_PREFIX || s->prefix_got != 0)
    reject(s, SG_SPARKMSG_INCOMPLETE_MESSAGE, "stream ended inside a message");
  return s->reason;
}

int sg_sparkmsg_output_evbuffer(void *evbuffer, const uint8_t *data,
                                size_t len) {
  return evbuffer_add((struct evbuffer *)evbuffer, data, len);
}

bool sg_sparkmsg_header_known(const sg_sparkmsg *s, sg_sparkmsg_header *out) {
  if (!s->header_known)
    return false;
  if (out != NULL) {
    out->session_id = s->first_session_id;
    out->user_id_present = s->first_user_id_present;
    out->user_id = s->first_user_id_present ? s->first_user_id : "";
  }
  return true;
}

const char *sg_sparkmsg_session_id(const sg_sparkmsg *s) {
  return s->first_session_id[0] != '\0' ? s->first_session_id : NULL;
}

uint64_t sg_sparkmsg_messages(const sg_sparkmsg *s) { return s->messages; }

sg_sparkmsg_reason sg_sparkmsg_reason_of(const sg_sparkmsg *s) {
  return s->reason;
}

const char *sg_sparkmsg_error(const sg_sparkmsg *s) { return s->error; }
