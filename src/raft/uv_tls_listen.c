/*
 * Mutual-TLS raft transport: incoming connections (raft_uv_transport
 * listen): the listener, HANDSHAKE -> PREAMBLE, the checks of the claimed
 * raft id and the hand-over to raft's accept callback. See uv_tls.c for the
 * design, uv_tls_internal.h for threads and ownership.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <openssl/err.h>

#include "kms_log.h"
#include "tls_internal.h"
#include "uv_tls_internal.h"

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

/* Incoming: reads the preamble; once complete checks it against the client
 * certificate and hands the pipe to raft. */
void tt_incoming_preamble(struct conn *c)
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
                tt_flush_tls(c);
                return;
            }
            if (e == SSL_ERROR_ZERO_RETURN) {
                tt_conn_fail(c, KMS_LOG_WARN, "peer closed before sending its preamble");
            } else {
                tt_conn_fail_tls(c, "TLS read of the preamble");
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
                tt_conn_fail(c, KMS_LOG_WARN, reason);
                return;
            }
            if (n != 0) {
                tt_conn_fail(c, KMS_LOG_WARN, why);
                return;
            }
        } else {
            c->pre_addr_got += (size_t)n;
        }
    }
    if (!kms_preamble_address_ok(c->pre_addr, c->pre_addr_len)) {
        tt_conn_fail(c, KMS_LOG_WARN, "malformed address in preamble");
        return;
    }
    peer = SSL_get0_peer_certificate(c->ssl);
    if (!kms_transport_cert_matches_id(peer, c->peer_id)) {
        kms_tls_subject(peer, subject, sizeof subject);
        snprintf(reason, sizeof reason, "certificate %s claims raft id %" PRIu64, subject,
                 (uint64_t)c->peer_id);
        tt_conn_fail(c, KMS_LOG_WARN, reason);
        return;
    }
    if (tt->hooks.peer_allowed != NULL && !tt->hooks.peer_allowed(tt->hooks.data, c->peer_id)) {
        snprintf(reason, sizeof reason, "raft id %" PRIu64 " is not in the configuration",
                 (uint64_t)c->peer_id);
        tt_conn_fail(c, KMS_LOG_WARN, reason);
        return;
    }
    /* Stamp frames are legal only if this side selected "kmsd-raft/2". */
    c->stamps = tt_alpn_has_stamps(c->ssl);
    kms_frame_parser_init(&c->parser, c->stamps);
    if (tt_conn_deliver(c) != 0) {
        return;
    }
    tt_count(&tt->accepted, 1);
    {
        char id[24];
        snprintf(id, sizeof id, "%" PRIu64, (uint64_t)c->peer_id);
        kms_log(KMS_LOG_DEBUG, MOD, "raft transport: connection accepted", "peer", c->peer,
                "peer_id", id, "address", c->pre_addr, NULL);
    }
    tt->accept_cb(tt->t, c->peer_id, c->pre_addr, (uv_stream_t *)c->raft_pipe);
}

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
    c = tt_conn_new(tt, false);
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
        tt_conn_fail(c, KMS_LOG_WARN, "accept failed");
        return;
    }
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
        sockaddr_str((struct sockaddr *)&ss, c->peer, sizeof c->peer);
    }
    uv_tcp_nodelay(&c->tcp, 1);
    tt_tcp_tune(c);
    tt_tls_start(c);
}

void tt_listener_closed(uv_handle_t *h)
{
    struct tls_transport *tt = h->data;
    tt->listener_open = false;
    tt_maybe_fire_close(tt);
}

int tt_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb)
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

    if (tt_parse_address(address, host, sizeof host, port, sizeof port) != 0) {
        snprintf(t->errmsg, RAFT_ERRMSG_BUF_SIZE, "invalid listen address '%.200s'", address);
        rv = RAFT_INVALID;
        goto out;
    }
    if (tt_numeric_sockaddr(host, port, &ss) != 0) {
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
        uv_close((uv_handle_t *)&tt->listener, tt_listener_closed);
        rv = RAFT_IOERR;
        goto out;
    }
    kms_log(KMS_LOG_INFO, MOD, "raft transport: listening (mutual TLS 1.3)", "addr", address,
            NULL);
out:
    return rv;
}
