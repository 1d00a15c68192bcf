/* Service manager notifications (systemd Type=notify): READY=1 once the
 * listeners are up, RELOADING=1 ... READY=1 around a SIGHUP reload,
 * STOPPING=1 when a drain starts, STATUS= for `systemctl status`.
 *
 * Through libsystemd's sd_notify when built with it (SG_HAVE_LIBSYSTEMD),
 * else through the documented datagram protocol: one AF_UNIX datagram to
 * $NOTIFY_SOCKET (a path, or '@' for an abstract socket). Without
 * $NOTIFY_SOCKET (not started by systemd) every call is a no-op returning
 * 0. The variable is left in the environment: later calls need it.
 *
 * Each function returns > 0 when the message was sent, 0 when there is no
 * $NOTIFY_SOCKET, or a negative errno. Callers log a failure; this module
 * does not (it has nothing to add). */
#ifndef SPARKGATE_NOTIFY_H
#define SPARKGATE_NOTIFY_H

int sg_notify_ready(void);
/* "RELOADING=1" with "MONOTONIC_USEC=<now>", which systemd >= 253 requires
 * to accept the reload (older versions ignore the extra field). Follow it
 * with sg_notify_ready() when the reload is done, failed or not. */
int sg_notify_reloading(void);
int sg_notify_stopping(void);
int sg_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Sends |state| ("KEY=value" lines) as one message. */
int sg_notify_send(const char *state);

/* The datagram protocol itself, to |notify_socket| (the value of
 * $NOTIFY_SOCKET), used when libsystemd is absent; exposed for tests. */
int sg_notify_send_to(const char *notify_socket, const char *state);

#endif
