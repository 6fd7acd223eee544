/*
 * Mutual-TLS raft transport (see kms_transport.h for the contract): the
 * transport object, the life of a connection and its teardown. Connecting
 * is in uv_tls_connect.c, accepting in uv_tls_listen.c, the TLS pump of an
 * established connection in uv_tls_proxy.c; they share uv_tls_internal.h.
 * Threads and ownership: uv_tls_internal.h.
 *
 * Every connection is a `struct conn` living on the raft loop. Its life:
 *
 *   outgoing: RESOLVE (hostnames only) -> CONNECT -> HANDSHAKE -> PROXY
 *   incoming:                             HANDSHAKE -> PREAMBLE -> PROXY
 *
 * In HANDSHAKE the SSL object runs over two memory BIOs: bytes read from TCP
 * are written into the read BIO, and whatever OpenSSL leaves in the write
 * BIO is sent with uv_write (tt_flush_tls). On reaching PROXY the connection
 * gets an AF_UNIX socketpair: raft owns one end (a uv_pipe_t allocated with
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
 * Teardown: tt_conn_close() closes every handle the conn owns; the last
 * close callback frees the conn (tt_conn_finish) and, for an outgoing conn
 * that never reached raft, fires raft's connect callback with RAFT_NOCONNECTION, or
 * RAFT_CANCELED when the transport is closing. Raft's end of the socketpair
 * is never touched after hand-over: raft closing it shows up as EOF on
 * `inner`, and the conn closing `inner` shows up as EOF/EPIPE to raft.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>

#include "kms_log.h"
#include "kms_parse.h"
#include "tls_internal.h"
#include "uv_tls_internal.h"

/* ALPN (kms_transport.h, "Lease stamps"): wire format of the client's offer,
 * and the protocol names. */
static const unsigned char ALPN_OFFER[] = "\x0bkmsd-raft/2\x0bkmsd-raft/1";
#define ALPN_STAMPS "kmsd-raft/2"
#define ALPN_PLAIN "kmsd-raft/1"
#define ALPN_NAME_LEN 11u

void tt_count(_Atomic uint64_t *v, int64_t d)
{
    atomic_fetch_add_explicit(v, (uint64_t)d, memory_order_relaxed);
}

/* Whether the TLS handshake of c selected "kmsd-raft/2". */
bool tt_alpn_has_stamps(const SSL *ssl)
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
int tt_parse_address(const char *address, char *host, size_t host_size, char *port,
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
int tt_numeric_sockaddr(const char *host, const char *port, struct sockaddr_storage *ss)
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

/* ---- connection teardown ------------------------------------------------ */

void tt_maybe_fire_close(struct tls_transport *tt)
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
void tt_conn_finish(struct conn *c)
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
    tt_count(&tt->active, -1);
    if (c->outgoing && !c->delivered) {
        req = c->req;
        cb = c->cb;
        if (tt->closing) {
            status = RAFT_CANCELED;
        } else {
            status = RAFT_NOCONNECTION;
            tt_count(&tt->connect_failed, 1);
        }
    }
    SSL_free(c->ssl);
    free(c->hold);
    free(c);
    if (cb != NULL) {
        cb(req, NULL, status);
    }
    tt_maybe_fire_close(tt);
}

static void conn_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    c->n_open--;
    if (c->n_open == 0) {
        tt_conn_finish(c);
    }
}

static void raft_pipe_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    raft_free(h);
    c->n_open--;
    if (c->n_open == 0) {
        tt_conn_finish(c);
    }
}

/* Closes every handle the conn owns. Idempotent. The conn is freed
 * asynchronously, after the last close callback. */
void tt_conn_close(struct conn *c)
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
bool tt_warn_allowed(struct tls_transport *tt)
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
void tt_conn_fail(struct conn *c, enum kms_log_level level, const char *reason)
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
        tt_count(&tt->rejected, 1);
        if (tt_warn_allowed(tt)) {
            kms_log(KMS_LOG_WARN, MOD, "raft transport: connection rejected", "peer", c->peer,
                    "reason", reason, NULL);
        }
    } else if (level < KMS_LOG_WARN || tt_warn_allowed(tt)) {
        snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
        kms_log(level, MOD, "raft transport: connect failed", "peer", c->peer, "peer_id", id,
                "reason", reason, NULL);
    }
    tt_conn_close(c);
}

/* Same, with the OpenSSL error queue (and verify result) appended. */
void tt_conn_fail_tls(struct conn *c, const char *what)
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
    tt_conn_fail(c, KMS_LOG_WARN, reason);
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
    if (tt_inner_start_reading(c) != 0) {
        return "cannot read from raft's side";
    }
    c->phase = PH_PROXY;
    uv_timer_stop(&c->timer);
    return NULL;
}

/* Starts the proxy (proxy_start) and gives raft_pipe up: the caller hands
 * it to raft right after. Returns 0, or -1 after closing the conn. */
int tt_conn_deliver(struct conn *c)
{
    const char *why = proxy_start(c);
    if (why != NULL) {
        tt_conn_fail(c, KMS_LOG_ERROR, why);
        return -1;
    }
    c->delivered = true;
    c->n_open--; /* raft_pipe is raft's now; its close is not ours to wait for */
    return 0;
}

static void timer_cb(uv_timer_t *timer)
{
    struct conn *c = timer->data;
    tt_conn_fail(c, KMS_LOG_WARN, "timed out before the connection was established");
}

struct conn *tt_conn_new(struct tls_transport *tt, bool outgoing)
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
    tt_count(&tt->active, 1);
    uv_timer_init(tt->loop, &c->timer);
    c->timer.data = c;
    c->timer_init = true;
    c->n_open++;
    uv_timer_start(&c->timer, timer_cb, outgoing ? tt->connect_ms : tt->handshake_ms, 0);
    return c;
}

/* TCP is up: create the SSL object and start the handshake. */
void tt_tls_start(struct conn *c)
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
        tt_conn_fail_tls(c, "SSL_new");
        return;
    }
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    if (c->outgoing) {
        if (SSL_set_alpn_protos(c->ssl, ALPN_OFFER, sizeof ALPN_OFFER - 1) != 0) {
            tt_conn_fail_tls(c, "SSL_set_alpn_protos");
            return;
        }
        SSL_set_connect_state(c->ssl);
    } else {
        SSL_set_accept_state(c->ssl);
    }
    c->phase = PH_HANDSHAKE;
    if (tt_tcp_start_reading(c) != 0) {
        tt_conn_fail(c, KMS_LOG_DEBUG, "cannot read from peer");
        return;
    }
    tt_conn_drive(c); /* the client speaks first */
}

/* TCP_USER_TIMEOUT on the conn's socket (best effort: a failure only costs
 * slower detection of a dead peer). */
void tt_tcp_tune(struct conn *c)
{
    uv_os_fd_t fd;
    unsigned ms = c->tt->tcp_user_timeout_ms;
    if (ms == 0 || uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0) {
        return;
    }
    (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
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
        uv_close((uv_handle_t *)&tt->listener, tt_listener_closed);
    }
    for (c = tt->conns; c != NULL; c = next) {
        next = c->next;
        tt_conn_close(c);
    }
    tt_maybe_fire_close(tt);
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
    t->listen = tt_listen;
    t->connect = tt_connect;
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
