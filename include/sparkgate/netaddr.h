/* Addresses as the configuration writes them and as sockets report them:
 * the checks and spellings several modules share, so that a listener, the
 * admin socket, a backend and the key fetcher agree on what an IP address
 * is and every log line writes one the same way. */
#ifndef SPARKGATE_NETADDR_H
#define SPARKGATE_NETADDR_H

#include <stdbool.h>
#include <stddef.h>

#include <sys/socket.h>

/* "a.b.c.d:port" or "[v6]:port", enough for either with its port. */
#define SG_NETADDR_TEXT_MAX 64

/* An IPv4 or IPv6 address as text (no brackets, no zone, no port), as
 * against a host name to resolve. */
bool sg_netaddr_is_numeric(const char *s);

/* "::ffff:a.b.c.d": true, with "a.b.c.d" in |v4|. */
bool sg_netaddr_v4_mapped(const char *s, char *v4, size_t v4_size);

/* |sa| with its port, "a.b.c.d:port" or "[v6]:port"; "unknown" for
 * another family. Always NUL-terminated. */
void sg_netaddr_format(const struct sockaddr *sa, char *out, size_t outlen);

#endif
