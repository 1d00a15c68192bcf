/* sd_notify: without NOTIFY_SOCKET nothing is sent; with it, the messages
 * arrive in order on a datagram socket the test owns, for a path and an
 * abstract ('@') socket, through the build's path (libsystemd or not) and
 * through the fallback datagram code. */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "sparkgate/notify.h"

/* A bound datagram socket; |name| is a path or "@abstract". */
static int listen_dgram(const char *name) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  size_t len = strlen(name);
  memcpy(sa.sun_path, name, len);
  socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
  if (name[0] == '@')
    sa.sun_path[0] = '\0';
  else
    salen++;
  if (bind(fd, (struct sockaddr *)&sa, salen) != 0) {
    perror("bind");
    close(fd);
    return -1;
  }
  /* Every wait is bounded. */
  struct timeval tv = {2, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

static const char *next_message(int fd, char *buf, size_t len) {
  ssize_t n = recv(fd, buf, len - 1, 0);
  if (n < 0) {
    snprintf(buf, len, "(nothing: %s)", strerror(errno));
    return buf;
  }
  buf[n] = '\0';
  return buf;
}

static unsigned long long monotonic_usec(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000;
}

/* The sequence main.c sends over a process's life. */
static void check_sequence(int fd) {
  char buf[512];
  unsigned long long before = monotonic_usec();
  CHECK(sg_notify_ready() > 0);
  CHECK(sg_notify_status("sparkgate %s ready: %u workers\nsecond line", "0.1.0", 2u) > 0);
  CHECK(sg_notify_reloading() > 0);
  CHECK(sg_notify_ready() > 0);
  CHECK(sg_notify_stopping() > 0);
  unsigned long long after = monotonic_usec();

  CHECK(strcmp(next_message(fd, buf, sizeof buf), "READY=1") == 0);
  CHECK(strcmp(next_message(fd, buf, sizeof buf),
               "STATUS=sparkgate 0.1.0 ready: 2 workers second line") == 0);
  next_message(fd, buf, sizeof buf);
  unsigned long long usec = 0;
  CHECK(sscanf(buf, "RELOADING=1\nMONOTONIC_USEC=%llu", &usec) == 1);
  CHECK(usec >= before && usec <= after);
  CHECK(strchr(buf, '\n') != NULL && strchr(strchr(buf, '\n') + 1, '\n') == NULL);
  CHECK(strcmp(next_message(fd, buf, sizeof buf), "READY=1") == 0);
  CHECK(strcmp(next_message(fd, buf, sizeof buf), "STOPPING=1") == 0);
}

int main(void) {
  char dir[] = "/tmp/sg-notify-XXXXXX";
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  char path[128];
  snprintf(path, sizeof path, "%s/notify", dir);

  /* Not under systemd: no-ops. */
  unsetenv("NOTIFY_SOCKET");
  CHECK(sg_notify_ready() == 0);
  CHECK(sg_notify_reloading() == 0);
  CHECK(sg_notify_stopping() == 0);
  CHECK(sg_notify_status("x") == 0);

  /* A path socket. */
  int fd = listen_dgram(path);
  CHECK(fd >= 0);
  if (fd >= 0) {
    setenv("NOTIFY_SOCKET", path, 1);
    check_sequence(fd);
    /* The fallback protocol directly, whatever the build uses. */
    char buf[64];
    CHECK(sg_notify_send_to(path, "READY=1") == 1);
    CHECK(strcmp(next_message(fd, buf, sizeof buf), "READY=1") == 0);
    close(fd);
  }

  /* An abstract socket. */
  char abstract[64];
  snprintf(abstract, sizeof abstract, "@sg-notify-test-%ld", (long)getpid());
  fd = listen_dgram(abstract);
  CHECK(fd >= 0);
  if (fd >= 0) {
    setenv("NOTIFY_SOCKET", abstract, 1);
    check_sequence(fd);
    char buf[64];
    CHECK(sg_notify_send_to(abstract, "STOPPING=1") == 1);
    CHECK(strcmp(next_message(fd, buf, sizeof buf), "STOPPING=1") == 0);
    close(fd);
  }

  /* Errors come back as negative errno values. */
  CHECK(sg_notify_send_to("relative/path", "READY=1") == -EAFNOSUPPORT);
  CHECK(sg_notify_send_to(path, "READY=1") < 0); /* nobody bound there now */
  CHECK(sg_notify_send_to(NULL, "READY=1") == 0);
  CHECK(sg_notify_send_to("", "READY=1") == 0);

  unsetenv("NOTIFY_SOCKET");
  unlink(path);
  rmdir(dir);
  return check_report("test_notify");
}
