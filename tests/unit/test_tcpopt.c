/* The options each connection gets: TCP_NODELAY always; keepalive with
 * the configured idle time in whole seconds (rounded up), probes every
 * third of it (at least 1 s), three of them; TCP_USER_TIMEOUT at the time
 * those probes take, but not below the floor; none of these with 0. */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "sparkgate/tcpopt.h"

static int opt(int fd, int level, int name) {
  int v = -1;
  socklen_t len = sizeof v;
  if (getsockopt(fd, level, name, &v, &len) != 0)
    return -2;
  return v;
}

static void check_keepalive(uint32_t ms, uint32_t floor_ms, int idle, int interval,
                            int user_timeout_ms) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(fd >= 0);
  sg_tcpopt_apply(fd, ms, floor_ms);
  CHECK(opt(fd, IPPROTO_TCP, TCP_NODELAY) == 1);
  CHECK(opt(fd, SOL_SOCKET, SO_KEEPALIVE) == 1);
  CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPIDLE) == idle);
  CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPINTVL) == interval);
  CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPCNT) == SG_TCPOPT_KEEPALIVE_PROBES);
  CHECK(opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT) == user_timeout_ms);
  close(fd);
}

int main(void) {
  check_keepalive(60000, 60000, 60, 20, 120000); /* the defaults */
  check_keepalive(60000, 300000, 60, 20, 300000); /* write_stall_timeout_ms above */
  check_keepalive(1500, 100, 2, 1, 5000);
  check_keepalive(1, 100, 1, 1, 4000);
  check_keepalive(7200000, 3600000, 7200, 2400, 14400000);

  int fd = socket(AF_INET6, SOCK_STREAM, 0);
  if (fd >= 0) { /* IPv6 sockets take the same options */
    sg_tcpopt_apply(fd, 10000, 0);
    CHECK(opt(fd, SOL_SOCKET, SO_KEEPALIVE) == 1);
    CHECK(opt(fd, IPPROTO_TCP, TCP_KEEPIDLE) == 10);
    CHECK(opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT) == 19000);
    close(fd);
  }
  fd = socket(AF_INET, SOCK_STREAM, 0);
  sg_tcpopt_apply(fd, 0, 60000);
  CHECK(opt(fd, IPPROTO_TCP, TCP_NODELAY) == 1);
  CHECK(opt(fd, SOL_SOCKET, SO_KEEPALIVE) == 0);
  CHECK(opt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT) == 0);
  close(fd);
  return check_report("tcpopt");
}
