/* Session memory: remembers, forgets after the TTL, stays bounded; a
 * connection's remembered key is always the key of what it is asked. */
#include <string.h>

#include "check.h"
#include "sparkgate/affinity.h"

static void test_remember_and_forget(void) {
  sg_affinity *a = sg_affinity_new(64);
  CHECK(a != NULL);
  uint64_t k = sg_affinity_key("acme", "alice", "s-1");
  uint64_t b1 = sg_affinity_backend_id("spark-1");
  CHECK(sg_affinity_get(a, k, 1000) == 0);
  sg_affinity_put(a, k, b1, 1000);
  CHECK(sg_affinity_get(a, k, 2000) == b1);
  /* Other tenant, user or session: other keys. */
  CHECK(sg_affinity_key("acme", "alice", "s-2") != k);
  CHECK(sg_affinity_key("acme", "bob", "s-1") != k);
  CHECK(sg_affinity_key("beta", "alice", "s-1") != k);
  CHECK(sg_affinity_key("acm", "ealice", "s-1") != k);
  /* Forgotten after the TTL. */
  CHECK(sg_affinity_get(a, k, 1000 + SG_AFFINITY_TTL_MS + 1) == 0);
  sg_affinity_free(a);
}

static void test_bounded(void) {
  sg_affinity *a = sg_affinity_new(16);
  char sid[32];
  for (int i = 0; i < 1000; i++) {
    snprintf(sid, sizeof sid, "s-%d", i);
    sg_affinity_put(a, sg_affinity_key("t", "u", sid), 7, (uint64_t)i + 1);
  }
  /* The most recent one is there; the table did not grow. */
  CHECK(sg_affinity_get(a, sg_affinity_key("t", "u", "s-999"), 1001) == 7);
  int found = 0;
  for (int i = 0; i < 1000; i++) {
    snprintf(sid, sizeof sid, "s-%d", i);
    found += sg_affinity_get(a, sg_affinity_key("t", "u", sid), 1001) != 0;
  }
  CHECK(found <= 16);
  sg_affinity_free(a);
}

static void test_memo(void) {
  char long_session[400];
  memset(long_session, 'x', sizeof long_session - 1);
  long_session[sizeof long_session - 1] = '\0';
  char mid_session[120];
  memset(mid_session, 'm', sizeof mid_session - 1);
  mid_session[sizeof mid_session - 1] = '\0';
  /* Repeats, a change of each part, the parts' boundary moved, a longer
   * text (a bigger memo), one too long to remember, and back. */
  const char *asks[][3] = {
      {"acme", "alice", "s-1"}, {"acme", "alice", "s-1"}, {"acme", "alice", "s-2"},
      {"acme", "bob", "s-2"},   {"beta", "bob", "s-2"},   {"bet", "abob", "s-2"},
      {"beta", "", "s-2"},      {"acme", "alice", mid_session},
      {"acme", "alice", "s-1"}, {"acme", "alice", long_session},
      {"acme", "alice", long_session}, {"acme", "alice", "s-1"},
  };
  sg_affinity_memo *memo = NULL;
  for (size_t i = 0; i < sizeof asks / sizeof asks[0]; i++) {
    uint64_t want = sg_affinity_key(asks[i][0], asks[i][1], asks[i][2]);
    CHECK(want != 0);
    CHECK(sg_affinity_key_memo(&memo, asks[i][0], asks[i][1], asks[i][2]) == want);
    CHECK(memo != NULL);
  }
  CHECK(sg_affinity_key("bet", "abob", "s-2") != sg_affinity_key("beta", "bob", "s-2"));
  sg_affinity_memo_free(memo);
  sg_affinity_memo_free(NULL);
}

int main(void) {
  test_remember_and_forget();
  test_bounded();
  test_memo();
  return check_report("affinity");
}
