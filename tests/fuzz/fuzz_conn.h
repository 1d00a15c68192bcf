/* For the targets that drive a real sparkgate worker: a new worker of
 * |rt| with one client connection accepted over a socketpair. */
#ifndef SPARKGATE_FUZZ_CONN_H
#define SPARKGATE_FUZZ_CONN_H

#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "fuzz_support.h"
#include "sparkgate/conn.h"
#include "sparkgate/worker.h"

/* Returns the worker (free it with sg_worker_free); *client_fd is the
 * client's end of the connection (close it). */
static inline sg_worker *fuzz_worker_with_client(sg_runtime *rt, const char *who,
                                                 int *client_fd) {
  char err[256];
  uint16_t ports[1] = {0};
  sg_worker *w = sg_worker_new(0, rt, ports, err, sizeof err);
  if (w == NULL) {
    fprintf(stderr, "%s: worker: %s\n", who, err);
    abort();
  }
  int sv[2];
  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  /* A made-up TCP peer, for the log lines. */
  struct sockaddr_in peer;
  memset(&peer, 0, sizeof peer);
  peer.sin_family = AF_INET;
  peer.sin_port = htons(40000);
  peer.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sg_conn_accept(w, 0, sv[0], (const struct sockaddr *)&peer, (int)sizeof peer);
  FUZZ_CHECK(w->n_conns == 1);
  *client_fd = sv[1];
  return w;
}

/* The one connection fuzz_worker_with_client accepted. */
static inline sg_conn *fuzz_only_conn(sg_worker *w) {
  FUZZ_CHECK(!sg_list_empty(&w->conns));
  return SG_CONTAINER_OF(w->conns.next, sg_conn, worker_link);
}

#endif
