/*
 * kms_connlimit: connection caps for gRPC listeners, enforced at accept.
 *
 * gRPC 1.51's C core has no per-address or total connection limit, and its
 * accept loop stops for good on EMFILE. grpc_server_add_channel_from_fd()
 * (kmsd accepting itself and handing fds over) accepts insecure credentials
 * only and takes no channel args, so it cannot serve TLS or mTLS. What is
 * left is an accept filter: this module defines accept4() in the kmsd
 * executable, which the dynamic linker binds libgrpc's accept4 calls to
 * (symbol interposition; the executable comes first in the lookup scope).
 * The filter calls the kernel directly (syscall SYS_accept4) and, for a
 * listening socket whose port was registered here:
 *   - closes (RST) a connection beyond the per-address or total cap before
 *     gRPC ever sees it (no TLS handshake, no memory), and goes on with the
 *     next pending one;
 *   - on EMFILE/ENFILE frees a reserve descriptor, accepts and resets the
 *     pending connection, re-takes the reserve and reports EAGAIN, so the
 *     backlog drains and gRPC's accept loop never sees EMFILE;
 *   - answers listener probes (kms_connlimit_probe) itself;
 *   - turns accept errors that gRPC 1.51 would stop its accept loop on but
 *     that concern one pending connection (ECONNRESET, EPROTO, ENETDOWN,
 *     EHOSTUNREACH, ...) into "take the next one", and ENOBUFS/ENOMEM into
 *     EAGAIN; EINVAL (the socket shut down by kms_rpc_server_stop) passes.
 * Test fault hook: KMSD_TEST_ACCEPT_FAULT_PORT=<port> (read at the first
 * registration) fails the first accept on that port with EBADFD, which
 * stops gRPC's accept loop for good (tests the supervisor's rebuild).
 * Every other socket (raft's libuv listener, libmicrohttpd) passes through
 * unchanged. Connections are tracked as (fd, socket inode): gRPC closes its
 * fds itself, so a tracked entry whose fd no longer refers to the same
 * socket inode is gone (inodes of live sockets are unique).
 *
 * Thread-safety: every function may be called from any thread.
 */
#ifndef KMS_CONNLIMIT_H
#define KMS_CONNLIMIT_H

#include <stdbool.h>
#include <stdint.h>

#include "kms_err.h"

/* Caps for a listener; 0 in a field = no cap on it.
 *
 * max_conn_bytes polices HTTP/2 abuse that gRPC 1.51 does not bound, rapid
 * reset above all (HEADERS + RST_STREAM: the streams never reach kmsd's
 * handlers, but gRPC creates and cancels a call for each and falls behind):
 * a police thread reads every tracked connection's received byte count
 * (TCP_INFO) every POLICE_MS and shuts down a connection that received more
 * than max_conn_bytes in total; an address whose connections were shut
 * down ban_after times within 10 s is refused at accept for ban_ms. */
struct kms_connlimit {
    unsigned max_total;
    unsigned max_per_addr;
    unsigned long long max_conn_bytes; /* per connection, lifetime; 0 = no police */
    unsigned ban_after;                /* kills within 10 s before a ban; 0 = never ban */
    unsigned ban_ms;
};

/* Applies caps to the listening socket(s) bound to TCP port `port` (IPv4
 * and IPv6). Registering a port again replaces its caps and keeps its
 * tracked connections. KMS_ERANGE when too many ports are registered. */
int kms_connlimit_register(int port, const struct kms_connlimit *lim, struct kms_err *err);

/* Stops filtering `port`; tracked connections are forgotten. */
void kms_connlimit_unregister(int port);

/* Counters of a registered port (0s when not registered). */
struct kms_connlimit_stats {
    unsigned open;                   /* tracked connections still open */
    unsigned long long accepted;     /* passed to gRPC */
    unsigned long long rejected;     /* closed for a cap */
    unsigned long long emfile;       /* dropped because the process was out of fds */
    unsigned long long killed;       /* shut down by the byte police */
    unsigned long long banned;       /* refused at accept: address banned */
};
void kms_connlimit_stats(int port, struct kms_connlimit_stats *out);

/* Probe outcome. */
enum kms_probe_result {
    KMS_PROBE_OK = 0,        /* the listener's accept loop took our connection */
    KMS_PROBE_NO_ACCEPT = 1, /* connected, but nothing accepted it in time */
    KMS_PROBE_REFUSED = 2,   /* connection refused or failed */
    KMS_PROBE_NO_FD = 3,     /* this process has no descriptor left for a socket */
};

/* Connects to the registered listener on `port` through `listen`'s host
 * (0.0.0.0 / empty -> 127.0.0.1, :: -> ::1) and waits up to timeout_ms for
 * the accept filter to see that very connection; the filter closes it, so
 * gRPC never handles probes. Blocks the caller up to timeout_ms. */
enum kms_probe_result kms_connlimit_probe(const char *listen, int port, unsigned timeout_ms);

/* Name of a probe result ("ok", "not accepting", ...). */
const char *kms_probe_result_name(enum kms_probe_result r);

#endif /* KMS_CONNLIMIT_H */
