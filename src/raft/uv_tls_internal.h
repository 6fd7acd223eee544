/*
 * Private to the raft TLS transport (uv_tls.c, uv_tls_connect.c,
 * uv_tls_listen.c, uv_tls_proxy.c): the transport and connection structs
 * and the functions the files share.
 *
 * Threads: everything here runs on the raft loop's thread (the loop given to
 * kms_transport_tls_init), called by raft through raft_uv_transport or by
 * libuv callbacks; nothing takes a lock. The only fields read elsewhere are
 * the _Atomic counters (kms_transport_tls_stats, any thread).
 *
 * Ownership (libuv: a handle's memory must outlive its close callback):
 *  - struct tls_transport is malloc'ed by kms_transport_tls_init, owned by
 *    the caller's raft_uv_transport (t->impl) and freed by
 *    kms_transport_tls_close once raft closed it; it owns `ctx` (one
 *    reference), the listener handle (embedded; closed by transport close,
 *    tt_listener_closed clears listener_open) and the list of conns;
 *  - struct conn is calloc'ed by tt_conn_new and linked into tt->conns; it
 *    embeds its handles (timer, tcp, inner) and counts the open ones in
 *    n_open; tt_conn_close closes them all and the last close callback frees
 *    the conn (tt_conn_finish). raft_pipe is raft_malloc'ed; it is the
 *    conn's (closed and raft_free'd with it) until tt_conn_deliver, then
 *    raft's, passed in the connect or accept callback and never touched
 *    again;
 *  - raft's struct raft_uv_connect (req) stays raft's: the conn only calls
 *    its callback, once.
 */
#ifndef KMS_UV_TLS_INTERNAL_H
#define KMS_UV_TLS_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>
#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "frame.h"
#include "kms_log.h"
#include "kms_transport.h"

#define MOD "raft"
#define ADDRESS_MAX 256         /* own and dialled addresses, NUL included */
#define PREAMBLE_ADDRESS_MAX 1024 /* address field accepted from peers */
#define BUF_SIZE (64 * 1024)    /* per-direction read buffer */
#define HIGH_WATER (4u * 1024 * 1024)
#define LOW_WATER (1u * 1024 * 1024)
#define DEFAULT_HANDSHAKE_MS 10000u /* incoming: TLS + preamble */
#define DEFAULT_CONNECT_MS 2000u    /* outgoing: TCP connect + TLS; short, so a
                                       partitioned peer is retried soon after
                                       it heals (raft retries 250 ms after a
                                       failed connect) */
#define DEFAULT_TCP_USER_TIMEOUT_MS 5000u /* unacknowledged data for this long
                                              closes a connection (a silent
                                              partition), so raft redials
                                              instead of waiting on TCP's
                                              retransmission back-off */
#define HOLD_KEEP (64u * 1024)      /* hold buffers larger than this are
                                       released once empty */
#define LISTEN_BACKLOG 128
#define WARN_WINDOW_MS 10000u   /* rejection warnings: at most WARN_BURST */
#define WARN_BURST 10u          /* per window, the rest are counted */

enum phase { PH_RESOLVE, PH_CONNECT, PH_HANDSHAKE, PH_PREAMBLE, PH_PROXY };

struct tls_transport;

/* One connection. Owned by the transport's list; freed by conn_finish() once
 * every handle below is closed and no getaddrinfo request is pending. */
struct conn {
    struct tls_transport *tt;
    struct conn *prev, *next;
    bool outgoing;
    enum phase phase;
    bool closing;
    bool delivered;          /* raft_pipe handed to raft: no longer ours */
    bool rejected_logged;    /* a rejection was already counted */
    unsigned n_open;         /* open handles + pending getaddrinfo */

    /* Outgoing only: raft's request, owned by raft. */
    struct raft_uv_connect *req;
    raft_uv_connect_cb cb;

    raft_id peer_id;         /* dialled (outgoing) or claimed (incoming) */
    char peer[ADDRESS_MAX];  /* for logs: dialled address or remote ip:port */

    uv_getaddrinfo_t gai;
    bool gai_pending;
    uv_connect_t connect_req;
    uv_tcp_t tcp;
    bool tcp_init, tcp_paused;
    uv_timer_t timer;        /* setup deadline (connect + TLS + preamble) */
    bool timer_init;
    uv_pipe_t inner;         /* our end of the socketpair */
    bool inner_init, inner_paused;
    uv_pipe_t *raft_pipe;    /* raft's end; ours until delivered */

    SSL *ssl;
    BIO *rbio, *wbio;        /* owned by ssl */

    /* Frame walk of the proxied stream: raft's outbound bytes (outgoing) or
     * the peer's (incoming). */
    struct kms_frame_parser parser;
    bool stamps;             /* outgoing: write stamps; incoming: "kmsd-raft/2" */
    /* Incoming: bytes read from TLS not yet queued to raft. The first
     * hold_ok are validated (complete headers, payload); the rest belong to
     * a preamble/header still being checked. malloc'ed, owned by the conn. */
    uint8_t *hold;
    size_t hold_len, hold_ok, hold_cap;

    /* Incoming preamble. */
    unsigned char pre[3 * 8];
    size_t pre_got;
    char pre_addr[PREAMBLE_ADDRESS_MAX];
    size_t pre_addr_len, pre_addr_got;

    char tcp_buf[BUF_SIZE];
    char inner_buf[BUF_SIZE];
};

struct tls_transport {
    struct raft_uv_transport *t;
    uv_loop_t *loop;
    SSL_CTX *ctx;            /* one reference; each SSL holds its own */
    raft_id id;
    char address[ADDRESS_MAX];
    char bind_address[ADDRESS_MAX]; /* "" = use address */
    unsigned handshake_ms;   /* incoming set-up deadline */
    unsigned connect_ms;     /* outgoing set-up deadline */
    unsigned tcp_user_timeout_ms;
    struct kms_transport_hooks hooks; /* all NULL = none */
    raft_uv_accept_cb accept_cb;
    uv_tcp_t listener;
    bool listener_open;
    bool closing;
    raft_uv_transport_close_cb close_cb;
    struct conn *conns;
    uint64_t warn_window_start;  /* uv_now() of the current window */
    unsigned warn_in_window;
    unsigned warn_suppressed;
    _Atomic uint64_t accepted, rejected, connected, connect_failed, active;
    _Atomic uint64_t malformed, malformed_out, stamps_in, stamps_out;
};

/* ---- uv_tls.c: helpers, teardown, set-up ---- */

void tt_count(_Atomic uint64_t *v, int64_t d);
/* Whether the TLS handshake of ssl selected "kmsd-raft/2". */
bool tt_alpn_has_stamps(const SSL *ssl);
/* Splits "host:port" or "[v6]:port" into host and port strings (0 or -1). */
int tt_parse_address(const char *address, char *host, size_t host_size, char *port,
                     size_t port_size);
/* Numeric host to sockaddr; -1 when host is not a literal address. */
int tt_numeric_sockaddr(const char *host, const char *port, struct sockaddr_storage *ss);
/* Fires raft's close callback once the transport is closing and nothing is
 * left open. */
void tt_maybe_fire_close(struct tls_transport *tt);
/* Last handle of c closed: unlinks and frees c, reports to raft. */
void tt_conn_finish(struct conn *c);
/* Closes every handle c owns (idempotent); c is freed after the last close
 * callback, so c stays valid until the callbacks ran. */
void tt_conn_close(struct conn *c);
/* Rate limit for warnings about peers: whether to log now. */
bool tt_warn_allowed(struct tls_transport *tt);
/* Closes c because of reason (logged and counted as its phase asks). */
void tt_conn_fail(struct conn *c, enum kms_log_level level, const char *reason);
/* Same, with the OpenSSL error queue (and verify result) appended. */
void tt_conn_fail_tls(struct conn *c, const char *what);
/* Starts proxying and gives raft_pipe up to the caller, who hands it to raft
 * at once. Returns 0, or -1 after closing c. */
int tt_conn_deliver(struct conn *c);
/* A new conn linked into tt with its set-up timer running; NULL when out of
 * memory. */
struct conn *tt_conn_new(struct tls_transport *tt, bool outgoing);
/* TCP is up: creates the SSL object and starts the handshake. */
void tt_tls_start(struct conn *c);
/* TCP_USER_TIMEOUT on c's socket (best effort). */
void tt_tcp_tune(struct conn *c);

/* ---- uv_tls_proxy.c: the TLS pump ---- */

/* Sends what OpenSSL produced to the peer. 0, or -1 after closing c. */
int tt_flush_tls(struct conn *c);
/* uv_read_start on raft's side (inner) / on the peer's side (tcp). */
int tt_inner_start_reading(struct conn *c);
int tt_tcp_start_reading(struct conn *c);
/* Advances c's state machine with whatever the read BIO holds. */
void tt_conn_drive(struct conn *c);

/* ---- uv_tls_connect.c / uv_tls_listen.c ---- */

/* Outgoing, handshake done: checks the server, sends the preamble, hands
 * the pipe to raft. */
void tt_outgoing_established(struct conn *c);
/* Incoming, handshake done: reads and checks the preamble, hands the pipe
 * to raft. */
void tt_incoming_preamble(struct conn *c);
/* raft_uv_transport->connect and ->listen. */
int tt_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
               const char *address, raft_uv_connect_cb cb);
int tt_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb);
/* Close callback of tt->listener: clears listener_open, may fire raft's
 * close callback. */
void tt_listener_closed(uv_handle_t *h);

#endif /* KMS_UV_TLS_INTERNAL_H */
