#include "sparkgate/accept_backoff.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <event2/util.h>

#include "sparkgate/log.h"

static uint64_t backoff_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static const char *backoff_hint(int err) {
  if (err == EMFILE || err == ENFILE)
    return "; raise the descriptor limit (LimitNOFILE=, ulimit -n) or lower "
           "max_connections";
  return "";
}

static void on_backoff_timer(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  sg_accept_backoff *b = arg;
  b->paused = false;
  b->resume(b->arg);
}

int sg_accept_backoff_init(sg_accept_backoff *b, struct event_base *base,
                           const char *what, void (*resume)(void *arg), void *arg) {
  memset(b, 0, sizeof *b);
  snprintf(b->what, sizeof b->what, "%s", what);
  b->resume = resume;
  b->arg = arg;
  b->timer = evtimer_new(base, on_backoff_timer, b);
  return b->timer != NULL ? 0 : -1;
}

void sg_accept_backoff_clear(sg_accept_backoff *b) {
  if (b->timer != NULL)
    event_free(b->timer);
  b->timer = NULL;
  b->paused = false;
}

void sg_accept_backoff_failed(sg_accept_backoff *b, struct evconnlistener *l, int err) {
  uint64_t now = backoff_now_ms();
  b->last_error = err;
  if (b->failures++ == 0) {
    b->started_ms = b->logged_ms = now;
    sg_warn("%s: accept failed: %s; retrying every %d ms until it succeeds%s", b->what,
            evutil_socket_error_to_string(err), SG_ACCEPT_PAUSE_MS, backoff_hint(err));
  } else if (now - b->logged_ms >= 60000) {
    b->logged_ms = now;
    sg_warn("%s: accept failed %llu times in %llu s: %s%s", b->what,
            (unsigned long long)b->failures,
            (unsigned long long)((now - b->started_ms) / 1000),
            evutil_socket_error_to_string(err), backoff_hint(err));
  }
  if (b->timer == NULL)
    return; /* cleared: the listener is going away */
  evconnlistener_disable(l);
  b->paused = true;
  struct timeval tv = {0, SG_ACCEPT_PAUSE_MS * 1000};
  evtimer_add(b->timer, &tv);
}

void sg_accept_backoff_accepted(sg_accept_backoff *b) {
  if (b->failures == 0)
    return;
  sg_info("%s: accepting again; accept failed %llu times over %.1f s: %s", b->what,
          (unsigned long long)b->failures,
          (double)(backoff_now_ms() - b->started_ms) / 1000.0,
          evutil_socket_error_to_string(b->last_error));
  b->failures = 0;
}
