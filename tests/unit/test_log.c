/* The operational log: every line one event, whatever bytes a message
 * quotes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "sparkgate/log.h"

/* Logs |msg| with stderr sent to a file; returns what was written. */
static char *captured(const char *msg) {
  static char out[4096];
  FILE *f = tmpfile();
  if (f == NULL)
    return NULL;
  fflush(stderr);
  int saved = dup(2);
  dup2(fileno(f), 2);
  sg_log_write(SG_LOG_INFO, "%s", msg);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  rewind(f);
  size_t n = fread(out, 1, sizeof out - 1, f);
  out[n] = '\0';
  fclose(f);
  return out;
}

static size_t count_char(const char *s, char ch) {
  size_t n = 0;
  for (; *s != '\0'; s++)
    n += *s == ch;
  return n;
}

int main(void) {
  sg_log_set_level(SG_LOG_DEBUG);

  char *line = captured("plain text");
  CHECK_STR_CONTAINS(line, " info sparkgate: plain text\n");

  /* A newline and a terminal escape a client put in a session id. */
  line = captured("session s-1\n2026-01-01T00:00:00.000Z error sparkgate: "
                  "FORGED\x1b[31m re-homed");
  CHECK(line != NULL && count_char(line, '\n') == 1);
  CHECK(line != NULL && strchr(line, '\x1b') == NULL);
  CHECK_STR_CONTAINS(line, "session s-1\\x0a2026-01-01T00:00:00.000Z error sparkgate: "
                           "FORGED\\x1b[31m re-homed\n");

  /* Bytes past ASCII (an RTL override, U+202E) are written as hex too. */
  line = captured("a\xe2\x80\xae" "b\x7f");
  CHECK_STR_CONTAINS(line, "sparkgate: a\\xe2\\x80\\xaeb\\x7f\n");

  /* A message longer than a line is cut, and still ends the line. */
  char *big = malloc(5000);
  if (big != NULL) {
    memset(big, '\n', 4999);
    big[4999] = '\0';
    line = captured(big);
    CHECK(line != NULL && count_char(line, '\n') == 1);
    CHECK(line != NULL && strlen(line) <= 2048);
    CHECK(line != NULL && line[strlen(line) - 1] == '\n');
    free(big);
  }
  return check_report("test_log");
}
