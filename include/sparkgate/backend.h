/* One Spark Connect endpoint of a tenant, as the configuration names it. */
#ifndef SPARKGATE_BACKEND_H
#define SPARKGATE_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

typedef struct sg_backend_config {
  char *name;    /* defaults to "address:port"; used in logs and metrics */
  uint64_t affinity_id; /* sg_affinity_backend_id(name), set with the name */
  char *address; /* numeric IP or host name */
  uint16_t port;
  uint32_t weight; /* 0: takes no new sessions (drain) */
  bool tls;        /* false: h2c */
  bool tls_verify; /* CA verification and host name check; default true */
  char *tls_ca_file;   /* NULL: the system trust store */
  char *tls_sni;       /* NULL: address when it is a host name */
  char *tls_cert_file; /* optional client certificate to the backend */
  char *tls_key_file;
} sg_backend_config;

#endif
