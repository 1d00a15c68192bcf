#include "sparkgate/netaddr.h"

#include <stdio.h>

#include <arpa/inet.h>
#include <netinet/in.h>

bool sg_netaddr_is_numeric(const char *s) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

bool sg_netaddr_v4_mapped(const char *s, char *v4, size_t v4_size) {
  struct in6_addr a6;
  if (inet_pton(AF_INET6, s, &a6) != 1 || !IN6_IS_ADDR_V4MAPPED(&a6))
    return false;
  return inet_ntop(AF_INET, &a6.s6_addr[12], v4, (socklen_t)v4_size) != NULL;
}

void sg_netaddr_format(const struct sockaddr *sa, char *out, size_t outlen) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    snprintf(out, outlen, "%s:%u", host, (unsigned)ntohs(in->sin_port));
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    snprintf(out, outlen, "[%s]:%u", host, (unsigned)ntohs(in6->sin6_port));
  } else {
    snprintf(out, outlen, "unknown");
  }
}
