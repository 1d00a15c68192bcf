#include "sparkgate/notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sys/socket.h>
#include <sys/un.h>

#include "sg_build_config.h"

#if SG_HAVE_LIBSYSTEMD
#include <systemd/sd-daemon.h>
#endif

int sg_notify_send_to(const char *notify_socket, const char *state) {
  if (notify_socket == NULL || notify_socket[0] == '\0')
    return 0;
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t len = strlen(notify_socket);
  /* A path must be absolute; '@' names an abstract socket (leading NUL,
   * no terminating NUL counted). Other forms (vsock:) are not ours. */
  if (notify_socket[0] != '/' && notify_socket[0] != '@')
    return -EAFNOSUPPORT;
  if (len < 2 || len >= sizeof sa.sun_path)
    return -EINVAL;
  memcpy(sa.sun_path, notify_socket, len);
  socklen_t salen;
  if (notify_socket[0] == '@') {
    sa.sun_path[0] = '\0';
    salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  } else {
    salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
  }
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  ssize_t n;
  do {
    n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  } while (n < 0 && errno == EINTR);
  int rv = n < 0 ? -errno : 1;
  close(fd);
  return rv;
}

int sg_notify_send(const char *state) {
#if SG_HAVE_LIBSYSTEMD
  return sd_notify(0, state);
#else
  return sg_notify_send_to(getenv("NOTIFY_SOCKET"), state);
#endif
}

int sg_notify_ready(void) { return sg_notify_send("READY=1"); }

int sg_notify_stopping(void) { return sg_notify_send("STOPPING=1"); }

int sg_notify_reloading(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  char msg[64];
  snprintf(msg, sizeof msg, "RELOADING=1\nMONOTONIC_USEC=%llu",
           (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000);
  return sg_notify_send(msg);
}

int sg_notify_status(const char *fmt, ...) {
  char msg[512];
  memcpy(msg, "STATUS=", 7);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg + 7, sizeof msg - 7, fmt, ap);
  va_end(ap);
  /* A newline would start another KEY=value assignment. */
  for (char *p = msg; *p != '\0'; p++) {
    if (*p == '\n')
      *p = ' ';
  }
  return sg_notify_send(msg);
}
