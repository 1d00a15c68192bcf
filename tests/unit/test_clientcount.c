/* Connections per client address: counted, capped, released. */
#include <arpa/inet.h>
#include <netinet/in.h>

#include "check.h"
#include "sparkgate/clientcount.h"

static sg_client_key v4(const char *ip, int port) {
  struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, ip, &in.sin_addr);
  return sg_client_key_of((struct sockaddr *)&in);
}

int main(void) {
  sg_clientcount *cc = sg_clientcount_new();
  CHECK(cc != NULL);
  sg_client_key a1 = v4("10.0.0.1", 1000), a2 = v4("10.0.0.1", 2000);
  sg_client_key b = v4("10.0.0.2", 1000);
  /* The port is not part of the key. */
  CHECK(memcmp(&a1, &a2, sizeof a1) == 0);
  CHECK(sg_clientcount_take(cc, &a1, 2, NULL));
  CHECK(sg_clientcount_take(cc, &a2, 2, NULL));
  CHECK(!sg_clientcount_take(cc, &a1, 2, NULL)); /* third from the same address */
  CHECK(sg_clientcount_take(cc, &b, 2, NULL));   /* another address is not affected */
  sg_clientcount_release(cc, &a1);
  CHECK(sg_clientcount_take(cc, &a1, 2, NULL)); /* a slot came free */
  /* Many addresses come and go without the table filling up. */
  char ip[32];
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 10000; i++) {
      snprintf(ip, sizeof ip, "10.1.%d.%d", i / 256, i % 256);
      sg_client_key k = v4(ip, 1);
      CHECK(sg_clientcount_take(cc, &k, 1, NULL));
    }
    for (int i = 0; i < 10000; i++) {
      snprintf(ip, sizeof ip, "10.1.%d.%d", i / 256, i % 256);
      sg_client_key k = v4(ip, 1);
      sg_clientcount_release(cc, &k);
    }
  }
  CHECK(!sg_clientcount_take(cc, &a1, 2, NULL)); /* still counted: 2 */
  /* Without a limit every connection is counted too (a limit set later
   * finds them), until the table is full: then nothing is counted and
   * nothing limited. */
  sg_clientcount_free(cc);
  cc = sg_clientcount_new();
  CHECK(cc != NULL);
  bool counted = false;
  CHECK(sg_clientcount_take(cc, &a1, 0, &counted) && counted);
  CHECK(sg_clientcount_take(cc, &a1, 0, &counted) && counted);
  CHECK(!sg_clientcount_take(cc, &a1, 2, &counted) && !counted);
  unsigned n_counted = 0, n_admitted = 0;
  for (unsigned i = 0; i < SG_CLIENTCOUNT_SLOTS + 100; i++) {
    snprintf(ip, sizeof ip, "10.%u.%u.%u", 2 + i / 65536, (i / 256) % 256, i % 256);
    sg_client_key k = v4(ip, 1);
    n_admitted += sg_clientcount_take(cc, &k, 1, &counted);
    n_counted += counted;
  }
  CHECK(n_admitted == SG_CLIENTCOUNT_SLOTS + 100);
  CHECK(n_counted < n_admitted && n_counted >= SG_CLIENTCOUNT_SLOTS / 2);
  sg_clientcount_free(cc);
  return check_report("clientcount");
}
