/* gRPC helpers: message encoding, content types, hop-by-hop headers. */
#include "check.h"
#include "sparkgate/grpc.h"

static void test_message_encode(void) {
  char out[64];
  sg_grpc_message_encode("plain text", out, sizeof out);
  CHECK(strcmp(out, "plain text") == 0);
  sg_grpc_message_encode("100% \xc3\xa9\n", out, sizeof out);
  CHECK(strcmp(out, "100%25 %C3%A9%0A") == 0);
  /* Truncation never splits an escape and always terminates. */
  sg_grpc_message_encode("\xff\xff\xff", out, 5);
  CHECK(strcmp(out, "%FF") == 0);
}

static void test_content_type(void) {
#define CT(s) sg_grpc_content_type_ok((const uint8_t *)(s), sizeof(s) - 1)
  CHECK(CT("application/grpc"));
  CHECK(CT("application/grpc+proto"));
  CHECK(CT("application/grpc;charset=utf-8"));
  CHECK(!CT("application/grpcx"));
  CHECK(!CT("application/json"));
  CHECK(!CT("text/plain"));
  CHECK(!CT(""));
#undef CT
}

static void test_hop_by_hop(void) {
#define H(s) sg_header_is_hop_by_hop((const uint8_t *)(s), sizeof(s) - 1)
  CHECK(H("connection"));
  CHECK(H("keep-alive"));
  CHECK(H("transfer-encoding"));
  CHECK(H("upgrade"));
  CHECK(H("host"));
  CHECK(!H("te"));
  CHECK(!H("grpc-timeout"));
  CHECK(!H("content-type"));
#undef H
}

static void test_timeout(void) {
  uint64_t ms = 0;
#define TP(s) sg_grpc_timeout_parse((const uint8_t *)(s), sizeof(s) - 1, &ms)
  CHECK(TP("100m") == 0 && ms == 100);
  CHECK(TP("2S") == 0 && ms == 2000);
  CHECK(TP("1M") == 0 && ms == 60000);
  CHECK(TP("1H") == 0 && ms == 3600000);
  /* Rounded down: upstream never gets more than the client gave. */
  CHECK(TP("1500u") == 0 && ms == 1);
  CHECK(TP("1999999u") == 0 && ms == 1999);
  CHECK(TP("1n") == 0 && ms == 0);
  CHECK(TP("99999999S") == 0 && ms == 99999999000ull);
  CHECK(TP("123456789S") == -1); /* nine digits */
  CHECK(TP("m") == -1);
  CHECK(TP("10") == -1);
  CHECK(TP("10x") == -1);
  CHECK(TP("-1S") == -1);
  CHECK(TP("1 S") == -1);
#undef TP
  char buf[16];
  sg_grpc_timeout_format(250, buf, sizeof buf);
  CHECK(strcmp(buf, "250m") == 0);
  sg_grpc_timeout_format(100000000ull, buf, sizeof buf);
  CHECK(strcmp(buf, "100000S") == 0);
  /* Found by fuzz_grpc_timeout: hours must not round up past the budget. */
  sg_grpc_timeout_format(22228391ull * 3600000ull, buf, sizeof buf);
  CHECK(strcmp(buf, "22228391H") == 0);
}

int main(void) {
  test_timeout();
  test_message_encode();
  test_content_type();
  test_hop_by_hop();
  return check_report("grpc");
}
