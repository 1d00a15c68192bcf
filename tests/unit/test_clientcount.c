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
  CHECK(sg_clientcount_take(cc, &a1, 2));
  CHECK(sg_clientcount_take(cc, &a2, 2));
  CHECK(!sg_clientcount_take(cc, &a1, 2)); /* third from the same address */
  CHECK(sg_clientcount_take(cc, &b, 2));   /* another address is not affected */
  sg_clientcount_release(cc, &a1);
  CHECK(sg_clientcount_take(cc, &a1, 2)); /* a slot came free */
  /* Many addresses come and go without the table filling up. */
  char ip[32];
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 10000; i++) {
      snprintf(ip, sizeof ip, "10.1.%d.%d", i / 256, i % 256);
      sg_client_key k = v4(ip, 1);
      CHECK(sg_clientcount_take(cc, &k, 1));
    }
    for (int i = 0; i < 10000; i++) {
      snprintf(ip, sizeof ip, "10.1.%d.%d", i / 256, i % 256);
      sg_client_key k = v4(ip, 1);
      sg_clientcount_release(cc, &k);
    }
  }
  CHECK(!sg_clientcount_take(cc, &a1, 2)); /* still counted: 2 */
  sg_clientcount_free(cc);
  return check_report("clientcount");
}
