/* Forward declarations of the objects on the request path, so that module
 * headers never include each other in a cycle. */
#ifndef SPARKGATE_TYPES_H
#define SPARKGATE_TYPES_H

typedef struct sg_runtime sg_runtime;   /* worker.h: config + TLS contexts */
typedef struct sg_worker sg_worker;     /* worker.h: one thread, one loop */
typedef struct sg_conn sg_conn;         /* conn.h: a client connection */
typedef struct sg_stream sg_stream;     /* stream.h: one proxied call */
typedef struct sg_upstream sg_upstream; /* upstream.h: a connection to a backend */
typedef struct sg_upstream_pool sg_upstream_pool; /* upstream.h: per backend */

#endif
