/* The address helpers every module shares: what counts as an IP address
 * (as against a host name to resolve), the IPv4-mapped spelling, and how
 * a socket address is written in logs. */
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include "check.h"
#include "sparkgate/netaddr.h"

static void numeric(void) {
  const char *yes[] = {"127.0.0.1", "0.0.0.0", "::1", "::", "fe80::1", "::ffff:10.0.0.1",
                       "2001:db8::8a2e:370:7334"};
  const char *no[] = {"localhost", "spark-0.spark.ns.svc.cluster.local.", "10.0.0.256",
                      "[::1]", "127.0.0.1:15002", " 127.0.0.1", "", "fe80::1%eth0", "1.2.3"};
  for (size_t i = 0; i < sizeof yes / sizeof *yes; i++)
    CHECK(sg_netaddr_is_numeric(yes[i]));
  for (size_t i = 0; i < sizeof no / sizeof *no; i++)
    CHECK(!sg_netaddr_is_numeric(no[i]));
}

static void v4_mapped(void) {
  char v4[INET_ADDRSTRLEN] = "";
  CHECK(sg_netaddr_v4_mapped("::ffff:10.1.2.3", v4, sizeof v4));
  CHECK(strcmp(v4, "10.1.2.3") == 0);
  CHECK(sg_netaddr_v4_mapped("::FFFF:7f00:1", v4, sizeof v4));
  CHECK(strcmp(v4, "127.0.0.1") == 0);
  CHECK(!sg_netaddr_v4_mapped("10.1.2.3", v4, sizeof v4));
  CHECK(!sg_netaddr_v4_mapped("::1", v4, sizeof v4));
  CHECK(!sg_netaddr_v4_mapped("localhost", v4, sizeof v4));
  char small[4];
  CHECK(!sg_netaddr_v4_mapped("::ffff:10.1.2.3", small, sizeof small)); /* no room */
}

static void format(void) {
  char out[SG_NETADDR_TEXT_MAX];
  struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(15002)};
  inet_pton(AF_INET, "10.0.0.5", &in.sin_addr);
  sg_netaddr_format((struct sockaddr *)&in, out, sizeof out);
  CHECK(strcmp(out, "10.0.0.5:15002") == 0);

  struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons(443)};
  inet_pton(AF_INET6, "2001:db8:ffff:ffff:ffff:ffff:255.255.255.255", &in6.sin6_addr);
  sg_netaddr_format((struct sockaddr *)&in6, out, sizeof out);
  CHECK(strcmp(out, "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:443") == 0);
  in6.sin6_port = htons(65535);
  inet_pton(AF_INET6, "::ffff:255.255.255.255", &in6.sin6_addr);
  sg_netaddr_format((struct sockaddr *)&in6, out, sizeof out);
  CHECK(strcmp(out, "[::ffff:255.255.255.255]:65535") == 0);
  /* The longest IPv6 text with the longest port fits. */
  inet_pton(AF_INET6, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", &in6.sin6_addr);
  sg_netaddr_format((struct sockaddr *)&in6, out, sizeof out);
  CHECK(strlen(out) < sizeof out - 1);

  struct sockaddr other = {.sa_family = AF_UNIX};
  sg_netaddr_format(&other, out, sizeof out);
  CHECK(strcmp(out, "unknown") == 0);
  char tiny[6];
  sg_netaddr_format((struct sockaddr *)&in, tiny, sizeof tiny);
  CHECK(strcmp(tiny, "10.0.") == 0); /* cut, still a string */
}

int main(void) {
  numeric();
  v4_mapped();
  format();
  return check_report("netaddr");
}
