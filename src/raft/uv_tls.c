/*
 * Mutual-TLS raft transport (see kms_transport.h for the contract).
 *
 * Every connection is a `struct conn` living on the raft loop. Its life:
 *
 *   outgoing: RESOLVE (hostnames only) -> CONNECT -> HANDSHAKE -> PROXY
 *   incoming:                             HANDSHAKE -> PREAMBLE -> PROXY
 *
 * In HANDSHAKE the SSL object runs over two memory BIOs: bytes read from TCP
 * are written into the read BIO, and whatever OpenSSL leaves in the write
 * BIO is sent with uv_write (flush_tls). On reaching PROXY the connection gets
 * an AF_UNIX socketpair: raft owns one end (a uv_pipe_t allocated with
 * raft_malloc and handed over through accept_cb / the connect callback), the
 * conn owns the other end (`inner`). From then on:
 *
 *   TCP read  -> BIO -> SSL_read  -> uv_write(inner)    (peer to raft)
 *   inner read -> SSL_write -> BIO -> uv_write(tcp)     (raft to peer)
 *
 * Both directions also run through a frame parser (frame.h). Raft to peer,
 * it finds frame starts: with stamps negotiated (ALPN "kmsd-raft/2"
 * selected by the server, hooks with stamp_out installed) a stamp frame is
 * handed to SSL_write right before each raft frame (proxy_to_peer). Peer to
 * raft, decrypted bytes collect in `hold` until the frame's header has been
 * validated; stamp frames are cut out there and given to stamp_in; a
 * malformed frame closes the conn before any of its bytes reach raft
 * (proxy_deliver).
 *
 * Back-pressure: when the write queue of one side grows past HIGH_WATER the
 * conn stops reading the other side, and resumes once the queue has drained
 * below LOW_WATER (checked in the write callbacks).
 *
 * Teardown: conn_close() closes every handle the conn owns; the last close
 * callback frees the conn (conn_finish) and, for an outgoing conn that never
 * reached raft, fires raft's connect callback with RAFT_NOCONNECTION, or
 * RAFT_CANCELED when the transport is closing. Raft's end of the socketpair
 * is never touched after hand-over: raft closing it shows up as EOF on
 * `inner`, and the conn closing `inner` shows up as EOF/EPIPE to raft.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <uv.h>

#include "frame.h"
#include "kms_bytes.h"
#include "kms_log.h"
#include "kms_parse.h"
#include "kms_time.h"
#include "kms_transport.h"
#include "tls_internal.h"

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

/* ALPN (kms_transport.h, "Lease stamps"): wire format of the client's offer,
 * and the protocol names. */
static const unsigned char ALPN_OFFER[] = "\x0bkmsd-raft/2\x0bkmsd-raft/1";
#define ALPN_STAMPS "kmsd-raft/2"
#define ALPN_PLAIN "kmsd-raft/1"
#define ALPN_NAME_LEN 11u

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

/* A write request with its payload; freed in the write callback. */
struct wreq {
    uv_write_t req;
    struct conn *c;
    char data[];
};

static void conn_close(struct conn *c);
static void conn_drive(struct conn *c);
static int inner_start_reading(struct conn *c);

static void count(_Atomic uint64_t *v, int64_t d)
{
    atomic_fetch_add_explicit(v, (uint64_t)d, memory_order_relaxed);
}

/* Whether the TLS handshake of c selected "kmsd-raft/2". */
static bool alpn_has_stamps(const SSL *ssl)
{
    const unsigned char *p = NULL;
    unsigned len = 0;
    SSL_get0_alpn_selected(ssl, &p, &len);
    return len == ALPN_NAME_LEN && memcmp(p, ALPN_STAMPS, ALPN_NAME_LEN) == 0;
}

/* Server side ALPN (OpenSSL callback, loop thread): "kmsd-raft/2" when
 * offered, else "kmsd-raft/1"; a client offering neither still gets in
 * (NOACK: no protocol selected), as does one offering no ALPN at all (then
 * OpenSSL does not call this). *out points into `in`. */
static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
    const char *want[2] = {ALPN_STAMPS, ALPN_PLAIN};
    unsigned i, k;
    (void)ssl;
    (void)arg;

    for (k = 0; k < 2; k++) {
        for (i = 0; i < inlen; i += 1u + in[i]) {
            if (in[i] == ALPN_NAME_LEN && i + 1u + in[i] <= inlen &&
                memcmp(in + i + 1, want[k], ALPN_NAME_LEN) == 0) {
                *out = in + i + 1;
                *outlen = (unsigned char)ALPN_NAME_LEN;
                return SSL_TLSEXT_ERR_OK;
            }
        }
    }
    return SSL_TLSEXT_ERR_NOACK;
}

/* Splits "host:port" or "[v6]:port" into host and port strings
 * (kms_parse.h's address grammar, host required). */
static int parse_address(const char *address, char *host, size_t host_size, char *port,
                         size_t port_size)
{
    struct kms_addr a;
    if (address == NULL || kms_parse_addr(address, KMS_PARSE_ADDR_NEED_HOST, &a, NULL, 0) != 0 ||
        strlen(a.host) >= host_size ||
        (size_t)snprintf(port, port_size, "%u", (unsigned)a.port) >= port_size) {
        return -1;
    }
    memcpy(host, a.host, strlen(a.host) + 1);
    return 0;
}

/* Numeric host to sockaddr; returns -1 when host is not a literal address. */
static int numeric_sockaddr(const char *host, const char *port, struct sockaddr_storage *ss)
{
    int p = atoi(port);
    memset(ss, 0, sizeof *ss);
    if (uv_ip4_addr(host, p, (struct sockaddr_in *)ss) == 0) {
        return 0;
    }
    if (strchr(host, ':') != NULL && uv_ip6_addr(host, p, (struct sockaddr_in6 *)ss) == 0) {
        return 0;
    }
    return -1;
}

static void sockaddr_str(const struct sockaddr *sa, char *buf, size_t size)
{
    char ip[64] = "?";
    int port = 0;
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        uv_ip6_name(s6, ip, sizeof ip);
        port = ntohs(s6->sin6_port);
        snprintf(buf, size, "[%s]:%d", ip, port);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        uv_ip4_name(s4, ip, sizeof ip);
        port = ntohs(s4->sin_port);
        snprintf(buf, size, "%s:%d", ip, port);
    }
}

/* ---- connection teardown ------------------------------------------------ */

static void maybe_fire_close(struct tls_transport *tt)
{
    raft_uv_transport_close_cb cb;
    if (!tt->closing || tt->conns != NULL || tt->listener_open || tt->close_cb == NULL) {
        return;
    }
    cb = tt->close_cb;
    tt->close_cb = NULL;
    cb(tt->t);
}

/* Last handle closed: unlink, free, report to raft. */
static void conn_finish(struct conn *c)
{
    struct tls_transport *tt = c->tt;
    struct raft_uv_connect *req = NULL;
    raft_uv_connect_cb cb = NULL;
    int status = 0;

    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        tt->conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    count(&tt->active, -1);
    if (c->outgoing && !c->delivered) {
        req = c->req;
        cb = c->cb;
        if (tt->closing) {
            status = RAFT_CANCELED;
        } else {
            status = RAFT_NOCONNECTION;
            count(&tt->connect_failed, 1);
        }
    }
    SSL_free(c->ssl);
    free(c->hold);
    free(c);
    if (cb != NULL) {
        cb(req, NULL, status);
    }
    maybe_fire_close(tt);
}

static void conn_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    c->n_open--;
    if (c->n_open == 0) {
        conn_finish(c);
    }
}

static void raft_pipe_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    raft_free(h);
    c->n_open--;
    if (c->n_open == 0) {
        conn_finish(c);
    }
}

/* Closes every handle the conn owns. Idempotent. The conn is freed
 * asynchronously, after the last close callback. */
static void conn_close(struct conn *c)
{
    if (c->closing) {
        return;
    }
    c->closing = true;
    if (c->gai_pending) {
        uv_cancel((uv_req_t *)&c->gai); /* its callback still runs */
    }
    if (c->timer_init) {
        uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    }
    if (c->tcp_init) {
        uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
    }
    if (c->inner_init) {
        uv_close((uv_handle_t *)&c->inner, conn_handle_closed);
    }
    if (c->raft_pipe != NULL && !c->delivered) {
        uv_close((uv_handle_t *)c->raft_pipe, raft_pipe_closed);
    }
}

/* Rate limit for warnings about peers (a misconfigured node retries every
 * connect_retry_delay). Returns whether to log now; logs how many were
 * suppressed in the previous window when a new one starts. */
static bool warn_allowed(struct tls_transport *tt)
{
    uint64_t now = uv_now(tt->loop);
    char n[24];
    if (now - tt->warn_window_start >= WARN_WINDOW_MS) {
        if (tt->warn_suppressed > 0) {
            snprintf(n, sizeof n, "%u", tt->warn_suppressed);
            kms_log(KMS_LOG_WARN, MOD, "raft transport: connection warnings suppressed",
                    "count", n, NULL);
        }
        tt->warn_window_start = now;
        tt->warn_in_window = 0;
        tt->warn_suppressed = 0;
    }
    if (tt->warn_in_window >= WARN_BURST) {
        tt->warn_suppressed++;
        return false;
    }
    tt->warn_in_window++;
    return true;
}

/* Closes a conn because of `reason`. Before hand-over to raft, an incoming
 * conn counts as rejected and is logged as a warning; an outgoing one is
 * logged at `level` (its connect callback reports the failure). */
static void conn_fail(struct conn *c, enum kms_log_level level, const char *reason)
{
    struct tls_transport *tt = c->tt;
    char id[24];

    if (c->closing) {
        return;
    }
    if (tt->closing) {
        /* Transport shutdown: nothing to report. */
    } else if (c->delivered) {
        kms_log(KMS_LOG_DEBUG, MOD, "raft transport: connection closed", "peer", c->peer,
                "reason", reason, NULL);
    } else if (!c->outgoing) {
        count(&tt->rejected, 1);
        if (warn_allowed(tt)) {
            kms_log(KMS_LOG_WARN, MOD, "raft transport: connection rejected", "peer", c->peer,
                    "reason", reason, NULL);
        }
    } else if (level < KMS_LOG_WARN || warn_allowed(tt)) {
        snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
        kms_log(level, MOD, "raft transport: connect failed", "peer", c->peer, "peer_id", id,
                "reason", reason, NULL);
    }
    conn_close(c);
}

/* Same, with the OpenSSL error queue (and verify result) appended. */
static void conn_fail_tls(struct conn *c, const char *what)
{
    char why[256];
    char reason[512];
    long vr = c->ssl != NULL ? SSL_get_verify_result(c->ssl) : X509_V_OK;

    kms_tls_errstr(why, sizeof why);
    if (vr != X509_V_OK) {
        snprintf(reason, sizeof reason, "%s: %s (certificate: %s)", what, why,
                 X509_verify_cert_error_string(vr));
    } else {
        snprintf(reason, sizeof reason, "%s: %s", what, why);
    }
    conn_fail(c, KMS_LOG_WARN, reason);
}

/* ---- writes --------------------------------------------------------------- */

static void tcp_write_cb(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;
    struct conn *c = w->c;
    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED) {
            conn_fail(c, KMS_LOG_DEBUG, uv_strerror(status));
        }
        return;
    }
    if (c->closing || !c->inner_paused ||
        uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > LOW_WATER) {
        return;
    }
    c->inner_paused = false;
    if (inner_start_reading(c) != 0) {
        conn_fail(c, KMS_LOG_DEBUG, "cannot read from raft's side");
    }
}

static void inner_write_cb(uv_write_t *req, int status);

/* Queues len bytes on `stream`. Returns 0 or a libuv error (conn not closed). */
static int queue_write(struct conn *c, uv_stream_t *stream, const void *data, size_t len,
                       uv_write_cb cb)
{
    struct wreq *w = malloc(sizeof *w + len);
    uv_buf_t buf;
    int rv;
    if (w == NULL) {
        return UV_ENOMEM;
    }
    w->c = c;
    memcpy(w->data, data, len);
    buf = uv_buf_init(w->data, (unsigned)len);
    rv = uv_write(&w->req, stream, &buf, 1, cb);
    if (rv != 0) {
        free(w);
    }
    return rv;
}

/* Sends whatever OpenSSL produced to the TCP peer. Returns 0, or -1 after
 * closing the conn. */
static int flush_tls(struct conn *c)
{
    char chunk[16 * 1024];
    int n;
    int rv;

    if (c->closing) {
        return -1;
    }
    while (BIO_ctrl_pending(c->wbio) > 0) {
        n = BIO_read(c->wbio, chunk, sizeof chunk);
        if (n <= 0) {
            break;
        }
        rv = queue_write(c, (uv_stream_t *)&c->tcp, chunk, (size_t)n, tcp_write_cb);
        if (rv != 0) {
            conn_fail(c, KMS_LOG_DEBUG, uv_strerror(rv));
            return -1;
        }
    }
    if (c->inner_init && !c->inner_paused &&
        uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > HIGH_WATER) {
        c->inner_paused = true;
        uv_read_stop((uv_stream_t *)&c->inner);
    }
    return 0;
}

/* ---- raft to peer ---------------------------------------------------------- */

static void inner_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct conn *c = h->data;
    *buf = uv_buf_init(c->inner_buf, sizeof c->inner_buf);
}

/* Hands len bytes to SSL. Returns 0, or -1 after closing the conn. */
static int ssl_write_all(struct conn *c, const void *data, size_t len)
{
    if (len == 0) {
        return 0;
    }
    ERR_clear_error();
    if (SSL_write(c->ssl, data, (int)len) != (int)len) {
        conn_fail_tls(c, "TLS write");
        return -1;
    }
    return 0;
}

/* Asks the hooks for a stamp and hands its frame to SSL, just before the
 * raft frame starting now. Returns 0, or -1 after closing the conn. */
static int stamp_write(struct conn *c)
{
    struct tls_transport *tt = c->tt;
    struct kms_transport_stamp s;
    struct kms_frame_stamp fs;
    uint8_t frame[KMS_FRAME_STAMP_SIZE];

    memset(&s, 0, sizeof s);
    if (!tt->hooks.stamp_out(tt->hooks.data, c->peer_id, &s)) {
        return 0;
    }
    fs.sent_us = s.sent_us;
    fs.echo_us = s.echo_us;
    fs.term = s.term;
    fs.flags = s.flags;
    fs.lease_rem_us = s.lease_rem_us;
    fs.commit = s.commit;
    kms_frame_stamp_encode(&fs, frame);
    if (ssl_write_all(c, frame, sizeof frame) != 0) {
        return -1;
    }
    count(&tt->stamps_out, 1);
    return 0;
}

/* Raft to peer: walks raft's bytes with the parser (raft's own output is
 * checked like a peer's, so a frame the receiver would refuse is stopped
 * here) and, when stamps were negotiated, writes a stamp before each frame.
 * Returns 0, or -1 after closing the conn. */
static int proxy_to_peer(struct conn *c, const uint8_t *data, size_t len)
{
    struct tls_transport *tt = c->tt;
    enum kms_frame_event ev;
    size_t seg = 0; /* first byte not yet handed to SSL */
    size_t i = 0;
    size_t used;
    char id[24];

    while (i < len) {
        if (c->stamps && kms_frame_parser_at_start(&c->parser)) {
            if (ssl_write_all(c, data + seg, i - seg) != 0 || stamp_write(c) != 0) {
                return -1;
            }
            seg = i;
        }
        if (kms_frame_parser_feed(&c->parser, data + i, len - i, &used, &ev) != 0) {
            count(&tt->malformed_out, 1);
            if (warn_allowed(tt)) {
                snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
                kms_log(KMS_LOG_ERROR, MOD, "raft transport: raft sent a frame peers refuse",
                        "peer", c->peer, "peer_id", id, "reason",
                        kms_frame_parser_error(&c->parser), NULL);
            }
            conn_close(c);
            return -1;
        }
        i += used;
    }
    return ssl_write_all(c, data + seg, len - seg);
}

static void inner_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = stream->data;

    if (nread == 0 || c->closing) {
        return;
    }
    if (nread < 0) {
        /* Raft closed its end (or it broke): say goodbye and tear down. */
        ERR_clear_error();
        SSL_shutdown(c->ssl);
        flush_tls(c);
        conn_fail(c, KMS_LOG_DEBUG, nread == UV_EOF ? "closed by raft" : uv_strerror((int)nread));
        return;
    }
    if (proxy_to_peer(c, (const uint8_t *)buf->base, (size_t)nread) != 0) {
        return;
    }
    flush_tls(c);
}

static int inner_start_reading(struct conn *c)
{
    return uv_read_start((uv_stream_t *)&c->inner, inner_alloc_cb, inner_read_cb);
}

/* ---- peer to raft ------------------------------------------------------------ */

static void inner_write_cb(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;
    struct conn *c = w->c;
    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED) {
            conn_fail(c, KMS_LOG_DEBUG, "raft end of the socketpair broke");
        }
        return;
    }
    if (c->closing || !c->tcp_paused ||
        uv_stream_get_write_queue_size((uv_stream_t *)&c->inner) > LOW_WATER) {
        return;
    }
    conn_drive(c); /* consume what the read BIO holds; proxy_to_raft resumes reads */
}

static void tcp_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct conn *c = h->data;
    *buf = uv_buf_init(c->tcp_buf, sizeof c->tcp_buf);
}

static void tcp_read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = stream->data;

    if (nread == 0 || c->closing) {
        return;
    }
    if (nread < 0) {
        conn_fail(c, KMS_LOG_DEBUG,
                  nread == UV_EOF ? "peer closed the connection" : uv_strerror((int)nread));
        return;
    }
    if (BIO_write(c->rbio, buf->base, (int)nread) != (int)nread) {
        conn_fail_tls(c, "BIO_write");
        return;
    }
    conn_drive(c);
}

/* A peer sent a frame raft must not see: close, count, warn (rate limited). */
static void conn_malformed(struct conn *c, const char *why)
{
    struct tls_transport *tt = c->tt;
    char id[24];

    count(&tt->malformed, 1);
    if (!tt->closing && warn_allowed(tt)) {
        snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
        kms_log(KMS_LOG_WARN, MOD, "raft transport: malformed frame, connection closed",
                "peer", c->peer, "peer_id", id, "reason", why, NULL);
    }
    conn_close(c);
}

/* Appends n bytes to the hold buffer. Returns 0 or -1 (out of memory). */
static int hold_append(struct conn *c, const uint8_t *data, size_t n)
{
    size_t cap = c->hold_cap;
    uint8_t *p;

    if (c->hold_len + n > cap) {
        if (cap == 0) {
            cap = 16 * 1024;
        }
        while (cap < c->hold_len + n) {
            cap *= 2;
        }
        p = realloc(c->hold, cap);
        if (p == NULL) {
            return -1;
        }
        c->hold = p;
        c->hold_cap = cap;
    }
    memcpy(c->hold + c->hold_len, data, n);
    c->hold_len += n;
    return 0;
}

/* Delivers the stamp the parser just decoded. */
static void stamp_deliver(struct conn *c, uint64_t arrival_us)
{
    struct tls_transport *tt = c->tt;
    const struct kms_frame_stamp *fs = &c->parser.info.stamp;
    struct kms_transport_stamp s;

    count(&tt->stamps_in, 1);
    if (tt->hooks.stamp_in == NULL) {
        return;
    }
    s.sent_us = fs->sent_us;
    s.echo_us = fs->echo_us;
    s.term = fs->term;
    s.flags = fs->flags;
    s.lease_rem_us = fs->lease_rem_us;
    s.commit = fs->commit;
    tt->hooks.stamp_in(tt->hooks.data, c->peer_id, &s, arrival_us);
}

/* Peer to raft: runs len decrypted bytes through the parser. Raft frames'
 * bytes are held until their header is validated, then queued to raft with
 * their payload; stamp frames are cut out and given to stamp_in. Returns 0,
 * or -1 after closing the conn. */
static int proxy_deliver(struct conn *c, const uint8_t *data, size_t len)
{
    enum kms_frame_event ev;
    size_t used;
    bool payload;
    int rv = 0;

    while (len > 0) {
        payload = kms_frame_parser_in_payload(&c->parser);
        if (kms_frame_parser_feed(&c->parser, data, len, &used, &ev) != 0) {
            conn_malformed(c, kms_frame_parser_error(&c->parser));
            rv = -1;
            goto out;
        }
        if (hold_append(c, data, used) != 0) {
            conn_fail(c, KMS_LOG_ERROR, "out of memory");
            rv = -1;
            goto out;
        }
        data += used;
        len -= used;
        if (payload || ev == KMS_FRAME_EV_HEADER) {
            c->hold_ok = c->hold_len; /* validated: may go to raft */
        } else if (ev == KMS_FRAME_EV_STAMP) {
            c->hold_len = c->hold_ok; /* cut out: raft never sees it */
            stamp_deliver(c, kms_mono_us());
        }
    }
    if (c->hold_ok > 0) {
        rv = queue_write(c, (uv_stream_t *)&c->inner, c->hold, c->hold_ok, inner_write_cb);
        if (rv != 0) {
            conn_fail(c, KMS_LOG_DEBUG, uv_strerror(rv));
            rv = -1;
            goto out;
        }
        memmove(c->hold, c->hold + c->hold_ok, c->hold_len - c->hold_ok);
        c->hold_len -= c->hold_ok;
        c->hold_ok = 0;
    }
    if (c->hold_len == 0 && c->hold_cap > HOLD_KEEP) {
        free(c->hold);
        c->hold = NULL;
        c->hold_cap = 0;
    }
out:
    return rv;
}

/* Decrypts what is available and hands it to proxy_deliver, stopping TCP
 * reads while raft's side is backed up. */
static void proxy_to_raft(struct conn *c)
{
    char chunk[16 * 1024];
    int n;

    for (;;) {
        if (uv_stream_get_write_queue_size((uv_stream_t *)&c->inner) > HIGH_WATER) {
            if (!c->tcp_paused) {
                c->tcp_paused = true;
                uv_read_stop((uv_stream_t *)&c->tcp);
            }
            return;
        }
        ERR_clear_error();
        n = SSL_read(c->ssl, chunk, sizeof chunk);
        if (n > 0) {
            if (proxy_deliver(c, (const uint8_t *)chunk, (size_t)n) != 0) {
                return;
            }
            continue;
        }
        switch (SSL_get_error(c->ssl, n)) {
        case SSL_ERROR_WANT_READ:
            if (c->tcp_paused) {
                c->tcp_paused = false;
                if (uv_read_start((uv_stream_t *)&c->tcp, tcp_alloc_cb, tcp_read_cb) != 0) {
                    conn_fail(c, KMS_LOG_DEBUG, "cannot read from peer");
                }
            }
            return;
        case SSL_ERROR_ZERO_RETURN:
            conn_fail(c, KMS_LOG_DEBUG, "peer sent close_notify");
            return;
        default:
            conn_fail_tls(c, "TLS read");
            return;
        }
    }
}

/* ---- set-up ------------------------------------------------------------------ */

/* Creates the socketpair and both pipe handles, and starts reading raft's
 * side. Returns 0, or an error message (the conn is left for the caller to
 * close; whatever was created is registered in it). */
static const char *proxy_start(struct conn *c)
{
    uv_loop_t *loop = c->tt->loop;
    int fds[2];

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        return "socketpair failed";
    }
    c->raft_pipe = raft_malloc(sizeof *c->raft_pipe);
    if (c->raft_pipe == NULL) {
        close(fds[0]);
        close(fds[1]);
        return "out of memory";
    }
    uv_pipe_init(loop, c->raft_pipe, 0);
    c->raft_pipe->data = c;
    c->n_open++;
    if (uv_pipe_open(c->raft_pipe, fds[0]) != 0) {
        close(fds[0]);
        close(fds[1]);
        return "uv_pipe_open failed";
    }
    uv_pipe_init(loop, &c->inner, 0);
    c->inner.data = c;
    c->inner_init = true;
    c->n_open++;
    if (uv_pipe_open(&c->inner, fds[1]) != 0) {
        close(fds[1]);
        return "uv_pipe_open failed";
    }
    if (inner_start_reading(c) != 0) {
        return "cannot read from raft's side";
    }
    c->phase = PH_PROXY;
    uv_timer_stop(&c->timer);
    return NULL;
}

/* Outgoing: handshake done. Check the server is who we dialled, send the
 * preamble and hand the pipe to raft. */
static void outgoing_established(struct conn *c)
{
    struct tls_transport *tt = c->tt;
    X509 *peer = SSL_get0_peer_certificate(c->ssl);
    unsigned char pre[3 * 8 + ADDRESS_MAX + 8];
    size_t alen = (strlen(tt->address) + 1 + 7) & ~(size_t)7;
    size_t len = 3 * 8 + alen;
    char subject[256];
    char reason[400];
    const char *why;
    uv_stream_t *stream;

    if (!kms_transport_cert_matches_id(peer, c->peer_id)) {
        kms_tls_subject(peer, subject, sizeof subject);
        snprintf(reason, sizeof reason,
                 "server certificate %s is not kmsd-node-%" PRIu64, subject,
                 (uint64_t)c->peer_id);
        conn_fail(c, KMS_LOG_WARN, reason);
        return;
    }
    /* Stamps only if the server selected "kmsd-raft/2" and there is
     * someone to ask for them; an older server selects nothing. */
    c->stamps = tt->hooks.stamp_out != NULL && alpn_has_stamps(c->ssl);
    kms_frame_parser_init(&c->parser, false); /* raft never writes stamps */
    memset(pre, 0, sizeof pre);
    kms_put_le64(pre, KMS_TRANSPORT_PROTOCOL);
    kms_put_le64(pre + 8, tt->id);
    kms_put_le64(pre + 16, alen);
    memcpy(pre + 24, tt->address, strlen(tt->address));
    ERR_clear_error();
    if (SSL_write(c->ssl, pre, (int)len) != (int)len) {
        conn_fail_tls(c, "TLS write of the preamble");
        return;
    }
    if (flush_tls(c) != 0) {
        return;
    }
    why = proxy_start(c);
    if (why != NULL) {
        conn_fail(c, KMS_LOG_ERROR, why);
        return;
    }
    c->delivered = true;
    c->n_open--; /* raft_pipe is raft's now; its close is not ours to wait for */
    count(&tt->connected, 1);
    stream = (uv_stream_t *)c->raft_pipe;
    c->cb(c->req, stream, 0); /* raft owns stream from now on */
}

/* Incoming: reads the preamble; once complete checks it against the client
 * certificate and hands the pipe to raft. */
static void incoming_preamble(struct conn *c)
{
    struct tls_transport *tt = c->tt;
    X509 *peer;
    char subject[256];
    char reason[400];
    const char *why;
    uint64_t proto, claimed;
    int n;

    while (c->pre_got < sizeof c->pre || c->pre_addr_got < c->pre_addr_len) {
        ERR_clear_error();
        if (c->pre_got < sizeof c->pre) {
            n = SSL_read(c->ssl, c->pre + c->pre_got, (int)(sizeof c->pre - c->pre_got));
        } else {
            n = SSL_read(c->ssl, c->pre_addr + c->pre_addr_got,
                         (int)(c->pre_addr_len - c->pre_addr_got));
        }
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_READ) {
                flush_tls(c);
                return;
            }
            if (e == SSL_ERROR_ZERO_RETURN) {
                conn_fail(c, KMS_LOG_WARN, "peer closed before sending its preamble");
            } else {
                conn_fail_tls(c, "TLS read of the preamble");
            }
            return;
        }
        if (c->pre_got < sizeof c->pre) {
            c->pre_got += (size_t)n;
            if (c->pre_got < sizeof c->pre) {
                continue;
            }
            n = kms_preamble_parse(c->pre, KMS_TRANSPORT_PROTOCOL, sizeof c->pre_addr, &proto,
                                   &claimed, &c->pre_addr_len, &why);
            c->peer_id = (raft_id)claimed;
            if (n == KMS_EVERSION) {
                snprintf(reason, sizeof reason, "%s %" PRIu64, why, proto);
                conn_fail(c, KMS_LOG_WARN, reason);
                return;
            }
            if (n != 0) {
                conn_fail(c, KMS_LOG_WARN, why);
                return;
            }
        } else {
            c->pre_addr_got += (size_t)n;
        }
    }
    if (!kms_preamble_address_ok(c->pre_addr, c->pre_addr_len)) {
        conn_fail(c, KMS_LOG_WARN, "malformed address in preamble");
        return;
    }
    peer = SSL_get0_peer_certificate(c->ssl);
    if (!kms_transport_cert_matches_id(peer, c->peer_id)) {
        kms_tls_subject(peer, subject, sizeof subject);
        snprintf(reason, sizeof reason, "certificate %s claims raft id %" PRIu64, subject,
                 (uint64_t)c->peer_id);
        conn_fail(c, KMS_LOG_WARN, reason);
        return;
    }
    if (tt->hooks.peer_allowed != NULL && !tt->hooks.peer_allowed(tt->hooks.data, c->peer_id)) {
        snprintf(reason, sizeof reason, "raft id %" PRIu64 " is not in the configuration",
                 (uint64_t)c->peer_id);
        conn_fail(c, KMS_LOG_WARN, reason);
        return;
    }
    /* Stamp frames are legal only if this side selected "kmsd-raft/2". */
    c->stamps = alpn_has_stamps(c->ssl);
    kms_frame_parser_init(&c->parser, c->stamps);
    why = proxy_start(c);
    if (why != NULL) {
        conn_fail(c, KMS_LOG_ERROR, why);
        return;
    }
    c->delivered = true;
    c->n_open--; /* raft_pipe is raft's now; its close is not ours to wait for */
    count(&tt->accepted, 1);
    {
        char id[24];
        snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
        kms_log(KMS_LOG_DEBUG, MOD, "raft transport: connection accepted", "peer", c->peer,
                "peer_id", id, "address", c->pre_addr, NULL);
    }
    tt->accept_cb(tt->t, c->peer_id, c->pre_addr, (uv_stream_t *)c->raft_pipe);
}

/* Advances the state machine with whatever the read BIO holds. */
static void conn_drive(struct conn *c)
{
    int rv;

    if (c->closing) {
        return;
    }
    if (c->phase == PH_HANDSHAKE) {
        ERR_clear_error();
        rv = SSL_do_handshake(c->ssl);
        if (rv != 1) {
            if (SSL_get_error(c->ssl, rv) == SSL_ERROR_WANT_READ) {
                flush_tls(c);
                return;
            }
            flush_tls(c); /* the alert, if any */
            conn_fail_tls(c, "TLS handshake");
            return;
        }
        if (flush_tls(c) != 0) {
            return;
        }
        if (c->outgoing) {
            outgoing_established(c);
        } else {
            c->phase = PH_PREAMBLE;
        }
    }
    if (c->closing) {
        return;
    }
    if (c->phase == PH_PREAMBLE) {
        incoming_preamble(c);
        if (c->closing || c->phase != PH_PROXY) {
            return;
        }
    }
    if (c->phase == PH_PROXY) {
        proxy_to_raft(c);
        if (!c->closing) {
            flush_tls(c);
        }
    }
}

static void timer_cb(uv_timer_t *timer)
{
    struct conn *c = timer->data;
    conn_fail(c, KMS_LOG_WARN, "timed out before the connection was established");
}

static struct conn *conn_new(struct tls_transport *tt, bool outgoing)
{
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        return NULL;
    }
    c->tt = tt;
    c->outgoing = outgoing;
    c->next = tt->conns;
    if (tt->conns != NULL) {
        tt->conns->prev = c;
    }
    tt->conns = c;
    count(&tt->active, 1);
    uv_timer_init(tt->loop, &c->timer);
    c->timer.data = c;
    c->timer_init = true;
    c->n_open++;
    uv_timer_start(&c->timer, timer_cb, outgoing ? tt->connect_ms : tt->handshake_ms, 0);
    return c;
}

/* TCP is up: create the SSL object and start the handshake. */
static void tls_start(struct conn *c)
{
    struct tls_transport *tt = c->tt;

    ERR_clear_error();
    c->ssl = SSL_new(tt->ctx);
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (c->ssl == NULL || c->rbio == NULL || c->wbio == NULL) {
        BIO_free(c->rbio);
        BIO_free(c->wbio);
        c->rbio = c->wbio = NULL;
        conn_fail_tls(c, "SSL_new");
        return;
    }
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    if (c->outgoing) {
        if (SSL_set_alpn_protos(c->ssl, ALPN_OFFER, sizeof ALPN_OFFER - 1) != 0) {
            conn_fail_tls(c, "SSL_set_alpn_protos");
            return;
        }
        SSL_set_connect_state(c->ssl);
    } else {
        SSL_set_accept_state(c->ssl);
    }
    c->phase = PH_HANDSHAKE;
    if (uv_read_start((uv_stream_t *)&c->tcp, tcp_alloc_cb, tcp_read_cb) != 0) {
        conn_fail(c, KMS_LOG_DEBUG, "cannot read from peer");
        return;
    }
    conn_drive(c); /* the client speaks first */
}

/* ---- outgoing -------------------------------------------------------------- */

/* TCP_USER_TIMEOUT on the conn's socket (best effort: a failure only costs
 * slower detection of a dead peer). */
static void tcp_tune(struct conn *c)
{
    uv_os_fd_t fd;
    unsigned ms = c->tt->tcp_user_timeout_ms;
    if (ms == 0 || uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0) {
        return;
    }
    (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct conn *c = req->data;
    if (c->closing || status == UV_ECANCELED) {
        return;
    }
    if (status != 0) {
        conn_fail(c, KMS_LOG_DEBUG, uv_strerror(status));
        return;
    }
    tcp_tune(c);
    tls_start(c);
}

static void tcp_connect(struct conn *c, const struct sockaddr *sa)
{
    int rv;
    uv_tcp_init(c->tt->loop, &c->tcp);
    c->tcp.data = c;
    c->tcp_init = true;
    c->n_open++;
    uv_tcp_nodelay(&c->tcp, 1);
    c->connect_req.data = c;
    c->phase = PH_CONNECT;
    rv = uv_tcp_connect(&c->connect_req, &c->tcp, sa, connect_cb);
    if (rv != 0) {
        conn_fail(c, KMS_LOG_DEBUG, uv_strerror(rv));
    }
}

static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct conn *c = req->data;
    c->gai_pending = false;
    c->n_open--;
    if (c->closing) {
        if (c->n_open == 0) {
            conn_finish(c);
        }
    } else if (status != 0 || res == NULL) {
        conn_fail(c, KMS_LOG_DEBUG, status != 0 ? uv_strerror(status) : "no address");
    } else {
        tcp_connect(c, res->ai_addr);
    }
    uv_freeaddrinfo(res);
}

static int tls_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
                       const char *address, raft_uv_connect_cb cb)
{
    struct tls_transport *tt = t->impl;
    struct sockaddr_storage ss;
    struct addrinfo hints;
    char host[ADDRESS_MAX];
    char port[8];
    struct conn *c;
    int rv = 0;

    if (tt->closing) {
        rv = RAFT_CANCELED;
        goto out;
    }
    if (parse_address(address, host, sizeof host, port, sizeof port) != 0 ||
        strlen(address) >= ADDRESS_MAX) {
        snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "invalid address '%.200s'", address);
        rv = RAFT_NOCONNECTION;
        goto out;
    }
    c = conn_new(tt, true);
    if (c == NULL) {
        rv = RAFT_NOMEM;
        goto out;
    }
    c->req = req;
    c->cb = cb;
    c->peer_id = id;
    snprintf(c->peer, sizeof c->peer, "%s", address);
    /* From here on, failures are reported through cb (asynchronously). */
    if (numeric_sockaddr(host, port, &ss) == 0) {
        tcp_connect(c, (const struct sockaddr *)&ss);
        goto out;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    c->gai.data = c;
    c->phase = PH_RESOLVE;
    if (uv_getaddrinfo(tt->loop, &c->gai, gai_cb, host, port, &hints) != 0) {
        conn_fail(c, KMS_LOG_DEBUG, "cannot resolve");
        goto out;
    }
    c->gai_pending = true;
    c->n_open++;
out:
    return rv;
}

/* ---- incoming -------------------------------------------------------------- */

static void listen_cb(uv_stream_t *server, int status)
{
    struct tls_transport *tt = server->data;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    struct conn *c;

    if (tt->closing) {
        return;
    }
    if (status != 0) {
        kms_log(KMS_LOG_WARN, MOD, "raft transport: accept failed", "reason",
                uv_strerror(status), NULL);
        return;
    }
    c = conn_new(tt, false);
    if (c == NULL) {
        kms_logf(KMS_LOG_ERROR, MOD, "raft transport: out of memory accepting a connection");
        return;
    }
    snprintf(c->peer, sizeof c->peer, "?");
    uv_tcp_init(tt->loop, &c->tcp);
    c->tcp.data = c;
    c->tcp_init = true;
    c->n_open++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        conn_fail(c, KMS_LOG_WARN, "accept failed");
        return;
    }
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
        sockaddr_str((struct sockaddr *)&ss, c->peer, sizeof c->peer);
    }
    uv_tcp_nodelay(&c->tcp, 1);
    tcp_tune(c);
    tls_start(c);
}

static void listener_closed(uv_handle_t *h)
{
    struct tls_transport *tt = h->data;
    tt->listener_open = false;
    maybe_fire_close(tt);
}

static int tls_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb)
{
    struct tls_transport *tt = t->impl;
    const char *address = tt->bind_address[0] != '\0' ? tt->bind_address : tt->address;
    struct sockaddr_storage ss;
    struct addrinfo hints;
    uv_getaddrinfo_t gai;
    char host[ADDRESS_MAX];
    char port[8];
    int rv = 0;
    int uvrv;

    if (parse_address(address, host, sizeof host, port, sizeof port) != 0) {
        snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "invalid listen address '%.200s'", address);
        rv = RAFT_INVALID;
        goto out;
    }
    if (numeric_sockaddr(host, port, &ss) != 0) {
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE;
        uvrv = uv_getaddrinfo(tt->loop, &gai, NULL, host, port, &hints); /* synchronous */
        if (uvrv != 0) {
            snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "resolve %.150s: %.80s", address,
                     uv_strerror(uvrv));
            rv = RAFT_IOERR;
            goto out;
        }
        memcpy(&ss, gai.addrinfo->ai_addr, gai.addrinfo->ai_addrlen);
        uv_freeaddrinfo(gai.addrinfo);
    }
    tt->accept_cb = cb;
    uv_tcp_init(tt->loop, &tt->listener);
    tt->listener.data = tt;
    tt->listener_open = true;
    uvrv = uv_tcp_bind(&tt->listener, (const struct sockaddr *)&ss, 0);
    if (uvrv == 0) {
        uvrv = uv_listen((uv_stream_t *)&tt->listener, LISTEN_BACKLOG, listen_cb);
    }
    if (uvrv != 0) {
        snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "listen on %.150s: %.80s", address,
                 uv_strerror(uvrv));
        uv_close((uv_handle_t *)&tt->listener, listener_closed);
        rv = RAFT_IOERR;
        goto out;
    }
    kms_log(KMS_LOG_INFO, MOD, "raft transport: listening (mutual TLS 1.3)", "addr", address,
            NULL);
out:
    return rv;
}

/* ---- transport interface ------------------------------------------------ */

static int tls_init(struct raft_uv_transport *t, raft_id id, const char *address)
{
    struct tls_transport *tt = t->impl;
    if (id == 0 || address == NULL || strlen(address) >= sizeof tt->address) {
        snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "invalid id or address");
        return RAFT_INVALID;
    }
    tt->id = id;
    snprintf(tt->address, sizeof tt->address, "%s", address);
    return 0;
}

static void tls_transport_close(struct raft_uv_transport *t, raft_uv_transport_close_cb cb)
{
    struct tls_transport *tt = t->impl;
    struct conn *c, *next;

    tt->closing = true;
    tt->close_cb = cb;
    if (tt->listener_open && !uv_is_closing((uv_handle_t *)&tt->listener)) {
        uv_close((uv_handle_t *)&tt->listener, listener_closed);
    }
    for (c = tt->conns; c != NULL; c = next) {
        next = c->next;
        conn_close(c);
    }
    maybe_fire_close(tt);
}

int kms_transport_tls_init(struct raft_uv_transport *t, struct uv_loop_s *loop,
                           const struct kms_transport_tls_config *cfg, struct kms_err *err)
{
    struct tls_transport *tt = NULL;
    int rc = 0;

    if (t == NULL || loop == NULL || cfg == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "transport, loop and config are required");
        goto out;
    }
    if (cfg->bind_address != NULL && strlen(cfg->bind_address) >= ADDRESS_MAX) {
        rc = kms_err_set(err, KMS_EINVAL, "bind address too long");
        goto out;
    }
    tt = calloc(1, sizeof *tt);
    if (tt == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, NULL);
        goto out;
    }
    rc = kms_tls_ctx_new(cfg->cert_file, cfg->key_file, cfg->ca_file, &tt->ctx, err);
    if (rc != 0) {
        goto out;
    }
    SSL_CTX_set_alpn_select_cb(tt->ctx, alpn_select_cb, NULL);
    tt->t = t;
    tt->loop = loop;
    tt->handshake_ms = cfg->handshake_timeout_ms != 0 ? cfg->handshake_timeout_ms
                                                      : DEFAULT_HANDSHAKE_MS;
    tt->connect_ms = cfg->connect_timeout_ms != 0 ? cfg->connect_timeout_ms
                                                  : DEFAULT_CONNECT_MS;
    tt->tcp_user_timeout_ms = cfg->tcp_user_timeout_ms != 0 ? cfg->tcp_user_timeout_ms
                                                            : DEFAULT_TCP_USER_TIMEOUT_MS;
    if (cfg->bind_address != NULL) {
        snprintf(tt->bind_address, sizeof tt->bind_address, "%s", cfg->bind_address);
    }
    t->version = 1; /* raft 0.22 checks it */
    t->impl = tt;
    t->errmsg[0] = '\0';
    t->init = tls_init;
    t->listen = tls_listen;
    t->connect = tls_connect;
    t->close = tls_transport_close;
    tt = NULL;
out:
    free(tt);
    return rc;
}

void kms_transport_tls_close(struct raft_uv_transport *t)
{
    struct tls_transport *tt = t != NULL ? t->impl : NULL;
    if (tt == NULL) {
        return;
    }
    if (tt->conns != NULL || tt->listener_open) {
        /* Raft did not close the transport: freeing now would leave libuv
         * with dangling handles. Leak instead of corrupting the loop. */
        kms_logf(KMS_LOG_ERROR, MOD, "raft transport released while open; leaking it");
        return;
    }
    SSL_CTX_free(tt->ctx);
    free(tt);
    t->impl = NULL;
}

int kms_transport_tls_reload(struct raft_uv_transport *t, const char *cert, const char *key,
                             const char *ca, struct kms_err *err)
{
    struct tls_transport *tt = t != NULL ? t->impl : NULL;
    SSL_CTX *ctx = NULL;
    int rc;

    if (tt == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "transport not initialised");
        goto out;
    }
    rc = kms_tls_ctx_new(cert, key, ca, &ctx, err);
    if (rc != 0) {
        rc = kms_err_wrap(err, rc, "reload raft TLS");
        goto out;
    }
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, NULL);
    SSL_CTX_free(tt->ctx); /* live SSL objects keep their own reference */
    tt->ctx = ctx;
    kms_log(KMS_LOG_INFO, MOD, "raft transport: certificates reloaded", "cert", cert, NULL);
out:
    return rc;
}

void kms_transport_tls_stats(const struct raft_uv_transport *t, struct kms_transport_stats *out)
{
    struct tls_transport *tt = t != NULL ? t->impl : NULL;
    memset(out, 0, sizeof *out);
    if (tt == NULL) {
        return;
    }
    out->accepted = atomic_load_explicit(&tt->accepted, memory_order_relaxed);
    out->rejected = atomic_load_explicit(&tt->rejected, memory_order_relaxed);
    out->connected = atomic_load_explicit(&tt->connected, memory_order_relaxed);
    out->connect_failed = atomic_load_explicit(&tt->connect_failed, memory_order_relaxed);
    out->active = atomic_load_explicit(&tt->active, memory_order_relaxed);
    out->malformed = atomic_load_explicit(&tt->malformed, memory_order_relaxed);
    out->malformed_out = atomic_load_explicit(&tt->malformed_out, memory_order_relaxed);
    out->stamps_in = atomic_load_explicit(&tt->stamps_in, memory_order_relaxed);
    out->stamps_out = atomic_load_explicit(&tt->stamps_out, memory_order_relaxed);
}

void kms_transport_tls_set_hooks(struct raft_uv_transport *t,
                                 const struct kms_transport_hooks *hooks)
{
    struct tls_transport *tt = t != NULL ? t->impl : NULL;
    if (tt == NULL) {
        return;
    }
    if (hooks != NULL) {
        tt->hooks = *hooks;
    } else {
        memset(&tt->hooks, 0, sizeof tt->hooks);
    }
}
