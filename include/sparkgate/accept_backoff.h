#ifndef SPARKGATE_ACCEPT_BACKOFF_H
#define SPARKGATE_ACCEPT_BACKOFF_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/listener.h>

/* Accept back-off. When accept() fails for want of descriptors or memory
 * (EMFILE, ENFILE, ENOBUFS, ENOMEM) the connection stays queued and the
 * level-triggered listener fires again at once: retrying then is a busy
 * loop that takes a core and floods the log. Instead the listener is
 * disabled and, SG_ACCEPT_PAUSE_MS later, |resume| is called to enable it
 * again (its owner may keep it disabled for a reason of its own: a drain,
 * a connection cap). Logged once when an episode starts, once a minute
 * while it lasts, and once with the count when an accept succeeds again.
 * Used by the client listeners and the admin listener; loop thread only. */
#define SG_ACCEPT_PAUSE_MS 200

typedef struct sg_accept_backoff {
  struct event *timer; /* NULL: cleared */
  char what[80];       /* "listener NAME", for the log */
  void (*resume)(void *arg);
  void *arg;
  uint64_t failures;   /* in this episode; 0: no episode */
  uint64_t started_ms; /* CLOCK_MONOTONIC */
  uint64_t logged_ms;
  int last_error;
  bool paused; /* disabled by the back-off, the timer pending */
} sg_accept_backoff;

int sg_accept_backoff_init(sg_accept_backoff *b, struct event_base *base,
                           const char *what, void (*resume)(void *arg), void *arg);
/* Stops the timer (a drain or a free: |resume| is not called any more). */
void sg_accept_backoff_clear(sg_accept_backoff *b);
/* From the listener's error callback, with the socket error. */
void sg_accept_backoff_failed(sg_accept_backoff *b, struct evconnlistener *l, int err);
/* On every accepted connection: ends an episode. */
void sg_accept_backoff_accepted(sg_accept_backoff *b);

#endif
