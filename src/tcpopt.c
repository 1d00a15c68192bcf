#include "sparkgate/tcpopt.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

void sg_tcpopt_apply(int fd, uint32_t keepalive_ms, uint32_t user_timeout_floor_ms) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (keepalive_ms == 0)
    return;
  int idle = (int)((keepalive_ms + 999) / 1000);
  int interval = idle >= 3 ? idle / 3 : 1;
  int probes = SG_TCPOPT_KEEPALIVE_PROBES;
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  unsigned user_timeout = (unsigned)(idle + interval * probes) * 1000u;
  if (user_timeout < user_timeout_floor_ms)
    user_timeout = user_timeout_floor_ms;
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
}
