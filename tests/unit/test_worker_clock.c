/* The worker's held clock: inside a hold every reading is the hold's,
 * however much time passes; a nested hold keeps the outer reading; after
 * the last release the clock is read again. */
#include <time.h>

#include "check.h"
#include "sparkgate/stream.h"
#include "sparkgate/worker.h"

static void pause_ms(long ms) {
  struct timespec ts = {0, ms * 1000000L};
  nanosleep(&ts, NULL);
}

int main(void) {
  sg_worker w = {0};
  uint64_t a = sg_worker_now_us(&w);
  pause_ms(2);
  uint64_t b = sg_worker_now_us(&w);
  CHECK(a > 0 && b >= a + 1000); /* no hold: the clock itself */

  uint64_t outer = sg_worker_clock_hold(&w);
  CHECK(outer == 0);
  uint64_t held = sg_worker_now_us(&w);
  CHECK(held >= b);
  pause_ms(2);
  CHECK(sg_worker_now_us(&w) == held);

  uint64_t inner = sg_worker_clock_hold(&w);
  CHECK(inner == held);
  CHECK(sg_worker_now_us(&w) == held); /* the outer reading stays */
  sg_worker_clock_release(&w, inner);
  CHECK(sg_worker_now_us(&w) == held);

  sg_worker_clock_release(&w, outer);
  CHECK(w.clock_us == 0);
  CHECK(sg_worker_now_us(&w) >= held + 2000);
  CHECK(sg_monotonic_us() / 1000u <= sg_monotonic_ms());
  return check_report("worker_clock");
}
