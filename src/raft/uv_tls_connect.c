/*
 * Mutual-TLS raft transport: outgoing connections (raft_uv_transport
 * connect): RESOLVE (hostnames only) -> CONNECT -> HANDSHAKE, then the
 * server check, the preamble and the hand-over to raft's connect callback.
 * See uv_tls.c for the design, uv_tls_internal.h for threads and ownership.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>

#include "kms_bytes.h"
#include "kms_log.h"
#include "tls_internal.h"
#include "uv_tls_internal.h"

/* Outgoing: handshake done. Check the server is who we dialled, send the
 * preamble and hand the pipe to raft. */
void tt_outgoing_established(struct conn *c)
{
    struct tls_transport *tt = c->tt;
    X509 *peer = SSL_get0_peer_certificate(c->ssl);
    unsigned char pre[3 * 8 + ADDRESS_MAX + 8];
    size_t alen = (strlen(tt->address) + 1 + 7) & ~(size_t)7;
    size_t len = 3 * 8 + alen;
    char subject[256];
    char reason[400];
    uv_stream_t *stream;

    if (!kms_transport_cert_matches_id(peer, c->peer_id)) {
        kms_tls_subject(peer, subject, sizeof subject);
        snprintf(reason, sizeof reason,
                 "server certificate %s is not kmsd-node-%" PRIu64, subject,
                 (uint64_t)c->peer_id);
        tt_conn_fail(c, KMS_LOG_WARN, reason);
        return;
    }
    /* Stamps only if the server selected "kmsd-raft/2" and there is
     * someone to ask for them; an older server selects nothing. */
    c->stamps = tt->hooks.stamp_out != NULL && tt_alpn_has_stamps(c->ssl);
    kms_frame_parser_init(&c->parser, false); /* raft never writes stamps */
    memset(pre, 0, sizeof pre);
    kms_put_le64(pre, KMS_TRANSPORT_PROTOCOL);
    kms_put_le64(pre + 8, tt->id);
    kms_put_le64(pre + 16, alen);
    memcpy(pre + 24, tt->address, strlen(tt->address));
    ERR_clear_error();
    if (SSL_write(c->ssl, pre, (int)len) != (int)len) {
        tt_conn_fail_tls(c, "TLS write of the preamble");
        return;
    }
    if (tt_flush_tls(c) != 0) {
        return;
    }
    if (tt_conn_deliver(c) != 0) {
        return;
    }
    tt_count(&tt->connected, 1);
    stream = (uv_stream_t *)c->raft_pipe;
    c->cb(c->req, stream, 0); /* raft owns stream from now on */
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct conn *c = req->data;
    if (c->closing || status == UV_ECANCELED) {
        return;
    }
    if (status != 0) {
        tt_conn_fail(c, KMS_LOG_DEBUG, uv_strerror(status));
        return;
    }
    tt_tcp_tune(c);
    tt_tls_start(c);
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
        tt_conn_fail(c, KMS_LOG_DEBUG, uv_strerror(rv));
    }
}

static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct conn *c = req->data;
    c->gai_pending = false;
    c->n_open--;
    if (c->closing) {
        if (c->n_open == 0) {
            tt_conn_finish(c);
        }
    } else if (status != 0 || res == NULL) {
        tt_conn_fail(c, KMS_LOG_DEBUG, status != 0 ? uv_strerror(status) : "no address");
    } else {
        tcp_connect(c, res->ai_addr);
    }
    uv_freeaddrinfo(res);
}

int tt_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
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
    if (tt_parse_address(address, host, sizeof host, port, sizeof port) != 0 ||
        strlen(address) >= ADDRESS_MAX) {
        snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "invalid address '%.200s'", address);
        rv = RAFT_NOCONNECTION;
        goto out;
    }
    c = tt_conn_new(tt, true);
    if (c == NULL) {
        rv = RAFT_NOMEM;
        goto out;
    }
    c->req = req;
    c->cb = cb;
    c->peer_id = id;
    snprintf(c->peer, sizeof c->peer, "%s", address);
    /* From here on, failures are reported through cb (asynchronously). */
    if (tt_numeric_sockaddr(host, port, &ss) == 0) {
        tcp_connect(c, (const struct sockaddr *)&ss);
        goto out;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    c->gai.data = c;
    c->phase = PH_RESOLVE;
    if (uv_getaddrinfo(tt->loop, &c->gai, gai_cb, host, port, &hints) != 0) {
        tt_conn_fail(c, KMS_LOG_DEBUG, "cannot resolve");
        goto out;
    }
    c->gai_pending = true;
    c->n_open++;
out:
    return rv;
}
