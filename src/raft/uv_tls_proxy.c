/*
 * Mutual-TLS raft transport: the TLS pump of an established connection
 * (writes, raft to peer, peer to raft) and the state machine step
 * (tt_conn_drive). See uv_tls.c for the design, uv_tls_internal.h for
 * threads and ownership.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

#include "kms_log.h"
#include "kms_time.h"
#include "uv_tls_internal.h"

/* A write request with its payload; freed in the write callback. */
struct wreq {
    uv_write_t req;
    struct conn *c;
    char data[];
};

/* ---- writes --------------------------------------------------------------- */

/* Common start of both write callbacks: frees the request and returns its
 * conn, or NULL when the write failed (then the conn is failed with `why`,
 * or uv_strerror(status) when why is NULL, unless it was cancelled by a
 * close already under way). */
static struct conn *wreq_done(uv_write_t *req, int status, const char *why)
{
    struct wreq *w = (struct wreq *)req;
    struct conn *c = w->c;
    free(w);
    if (status < 0) {
        if (status != UV_ECANCELED) {
            tt_conn_fail(c, KMS_LOG_DEBUG, why != NULL ? why : uv_strerror(status));
        }
        return NULL;
    }
    return c;
}

static void tcp_write_cb(uv_write_t *req, int status)
{
    struct conn *c = wreq_done(req, status, NULL);
    if (c == NULL) {
        return;
    }
    if (c->closing || !c->inner_paused ||
        uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > LOW_WATER) {
        return;
    }
    c->inner_paused = false;
    if (tt_inner_start_reading(c) != 0) {
        tt_conn_fail(c, KMS_LOG_DEBUG, "cannot read from raft's side");
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
int tt_flush_tls(struct conn *c)
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
            tt_conn_fail(c, KMS_LOG_DEBUG, uv_strerror(rv));
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
        tt_conn_fail_tls(c, "TLS write");
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
    tt_count(&tt->stamps_out, 1);
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
            tt_count(&tt->malformed_out, 1);
            if (tt_warn_allowed(tt)) {
                snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
                kms_log(KMS_LOG_ERROR, MOD, "raft transport: raft sent a frame peers refuse",
                        "peer", c->peer, "peer_id", id, "reason",
                        kms_frame_parser_error(&c->parser), NULL);
            }
            tt_conn_close(c);
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
        tt_flush_tls(c);
        tt_conn_fail(c, KMS_LOG_DEBUG,
                     nread == UV_EOF ? "closed by raft" : uv_strerror((int)nread));
        return;
    }
    if (proxy_to_peer(c, (const uint8_t *)buf->base, (size_t)nread) != 0) {
        return;
    }
    tt_flush_tls(c);
}

int tt_inner_start_reading(struct conn *c)
{
    return uv_read_start((uv_stream_t *)&c->inner, inner_alloc_cb, inner_read_cb);
}

/* ---- peer to raft ------------------------------------------------------------ */

static void inner_write_cb(uv_write_t *req, int status)
{
    struct conn *c = wreq_done(req, status, "raft end of the socketpair broke");
    if (c == NULL) {
        return;
    }
    if (c->closing || !c->tcp_paused ||
        uv_stream_get_write_queue_size((uv_stream_t *)&c->inner) > LOW_WATER) {
        return;
    }
    tt_conn_drive(c); /* consume what the read BIO holds; proxy_to_raft resumes reads */
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
        tt_conn_fail(c, KMS_LOG_DEBUG,
                     nread == UV_EOF ? "peer closed the connection" : uv_strerror((int)nread));
        return;
    }
    if (BIO_write(c->rbio, buf->base, (int)nread) != (int)nread) {
        tt_conn_fail_tls(c, "BIO_write");
        return;
    }
    tt_conn_drive(c);
}

int tt_tcp_start_reading(struct conn *c)
{
    return uv_read_start((uv_stream_t *)&c->tcp, tcp_alloc_cb, tcp_read_cb);
}

/* A peer sent a frame raft must not see: close, count, warn (rate limited). */
static void conn_malformed(struct conn *c, const char *why)
{
    struct tls_transport *tt = c->tt;
    char id[24];

    tt_count(&tt->malformed, 1);
    if (!tt->closing && tt_warn_allowed(tt)) {
        snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
        kms_log(KMS_LOG_WARN, MOD, "raft transport: malformed frame, connection closed",
                "peer", c->peer, "peer_id", id, "reason", why, NULL);
    }
    tt_conn_close(c);
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

    tt_count(&tt->stamps_in, 1);
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
            tt_conn_fail(c, KMS_LOG_ERROR, "out of memory");
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
            tt_conn_fail(c, KMS_LOG_DEBUG, uv_strerror(rv));
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
                if (tt_tcp_start_reading(c) != 0) {
                    tt_conn_fail(c, KMS_LOG_DEBUG, "cannot read from peer");
                }
            }
            return;
        case SSL_ERROR_ZERO_RETURN:
            tt_conn_fail(c, KMS_LOG_DEBUG, "peer sent close_notify");
            return;
        default:
            tt_conn_fail_tls(c, "TLS read");
            return;
        }
    }
}

/* Advances the state machine with whatever the read BIO holds. */
void tt_conn_drive(struct conn *c)
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
                tt_flush_tls(c);
                return;
            }
            tt_flush_tls(c); /* the alert, if any */
            tt_conn_fail_tls(c, "TLS handshake");
            return;
        }
        if (tt_flush_tls(c) != 0) {
            return;
        }
        if (c->outgoing) {
            tt_outgoing_established(c);
        } else {
            c->phase = PH_PREAMBLE;
        }
    }
    if (c->closing) {
        return;
    }
    if (c->phase == PH_PREAMBLE) {
        tt_incoming_preamble(c);
        if (c->closing || c->phase != PH_PROXY) {
            return;
        }
    }
    if (c->phase == PH_PROXY) {
        proxy_to_raft(c);
        if (!c->closing) {
            tt_flush_tls(c);
        }
    }
}
