/*
 * kms-h2-echo-server: a second ceiling for bench/bench_unseal.py, answering
 * the Talos port's two unary methods WITHOUT the gRPC C core.
 *
 * One thread, one epoll loop, non-blocking sockets; OpenSSL 3 for TLS
 * (TLS 1.3 only, ALPN "h2" required, no session tickets: kmsd's Talos-port
 * policy) and nghttp2 (Debian's libnghttp2) for HTTP/2 framing and HPACK.
 * /sidero.kms.KMSService/Unseal and /Seal answer the same fixed
 * Response{data = 32 bytes 0x00..0x1f} as kms-echo-server; any other path
 * gets grpc-status 12 (UNIMPLEMENTED), a compressed or oversized message
 * grpc-status 8 / 3. It parses no protobuf and does no kmsd work: it
 * measures what a Talos port outside gRPC's per-connection machinery would
 * cost (docs/benchmarks.md, "Unseal: server CPU per call"). It is a
 * benchmark, not a server: no connection limits, no reload, no idle
 * timeouts.
 *
 *   kms-h2-echo-server --listen 127.0.0.1:27290 --cert node1.pem --key node1-key.pem
 *
 * Prints "listening on PORT" on stdout once bound; stops on SIGINT/SIGTERM.
 * Ownership: each struct h2e_conn owns its fd, SSL and nghttp2 session and
 * is freed by h2e_conn_close; each struct h2e_stream is owned by its
 * nghttp2 stream and freed in on_stream_close_cb.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define H2E_MAX_MESSAGE 4096 /* kmsd's talos.maxMessageBytes default */

struct h2e_conn {
    int fd;
    SSL *ssl;
    nghttp2_session *h2; /* NULL until the handshake is done */
    bool want_out;       /* EPOLLOUT registered */
};

struct h2e_stream {
    int32_t id;
    bool path_ok, bad_type, compressed, too_big;
    size_t len;
    uint8_t buf[5 + H2E_MAX_MESSAGE];
    uint8_t out[5 + 2 + 32];
    size_t out_off;
};

static uint8_t fixed_resp[5 + 2 + 32]; /* gRPC frame + Response{data} */

static void h2e_conn_close(int ep, struct h2e_conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->h2 != NULL) {
        nghttp2_session_del(c->h2);
    }
    SSL_free(c->ssl);
    close(c->fd);
    free(c);
}

static ssize_t send_cb(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud)
{
    struct h2e_conn *c = ud;
    (void)s;
    (void)flags;
    int n = SSL_write(c->ssl, data, (int)len);
    if (n > 0) {
        return n;
    }
    int e = SSL_get_error(c->ssl, n);
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
        return NGHTTP2_ERR_WOULDBLOCK;
    }
    return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int on_begin_headers_cb(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    (void)ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) {
        return 0;
    }
    struct h2e_stream *st = calloc(1, sizeof(*st));
    if (st == NULL) {
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    st->id = f->hd.stream_id;
    nghttp2_session_set_stream_user_data(s, st->id, st);
    return 0;
}

static bool hdr_is(const uint8_t *p, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

static int on_header_cb(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *ud)
{
    (void)flags;
    (void)ud;
    struct h2e_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st == NULL || f->hd.type != NGHTTP2_HEADERS) {
        return 0;
    }
    if (hdr_is(name, namelen, ":path")) {
        st->path_ok = hdr_is(value, valuelen, "/sidero.kms.KMSService/Unseal") ||
                      hdr_is(value, valuelen, "/sidero.kms.KMSService/Seal");
    } else if (hdr_is(name, namelen, "content-type")) {
        st->bad_type = valuelen < 16 || memcmp(value, "application/grpc", 16) != 0;
    }
    return 0;
}

static int on_data_chunk_cb(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                            size_t len, void *ud)
{
    (void)flags;
    (void)ud;
    struct h2e_stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st == NULL) {
        return 0;
    }
    if (len > sizeof(st->buf) - st->len) {
        st->too_big = true;
        return 0;
    }
    memcpy(st->buf + st->len, data, len);
    st->len += len;
    return 0;
}

static ssize_t resp_read_cb(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len,
                            uint32_t *data_flags, nghttp2_data_source *src, void *ud)
{
    (void)ud;
    struct h2e_stream *st = src->ptr;
    size_t n = sizeof(st->out) - st->out_off;
    if (n > len) {
        n = len;
    }
    memcpy(buf, st->out + st->out_off, n);
    st->out_off += n;
    if (st->out_off == sizeof(st->out)) {
        static const nghttp2_nv ok[] = {
            {(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1, NGHTTP2_NV_FLAG_NONE}};
        *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        if (nghttp2_submit_trailer(s, id, ok, 1) != 0) {
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
    }
    return (ssize_t)n;
}

static int h2e_stream_answer(nghttp2_session *s, struct h2e_stream *st)
{
    const char *code = NULL;
    uint32_t mlen = 0;

    if (!st->path_ok) {
        code = "12"; /* UNIMPLEMENTED */
    } else if (st->bad_type || st->len < 5) {
        code = "13"; /* INTERNAL: not a gRPC request */
    } else if (st->too_big) {
        code = "8"; /* RESOURCE_EXHAUSTED */
    } else if (st->buf[0] != 0) {
        code = "12"; /* compressed: we accept identity only */
    } else {
        mlen = (uint32_t)st->buf[1] << 24 | (uint32_t)st->buf[2] << 16 |
               (uint32_t)st->buf[3] << 8 | st->buf[4];
        if (mlen != st->len - 5) {
            code = "13";
        }
    }
    if (code != NULL) {
        nghttp2_nv nv[] = {
            {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
            {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16,
             NGHTTP2_NV_FLAG_NONE},
            {(uint8_t *)"grpc-status", (uint8_t *)code, 11, strlen(code), NGHTTP2_NV_FLAG_NONE}};
        return nghttp2_submit_response(s, st->id, nv, 3, NULL);
    }
    static const nghttp2_nv hdr[] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16,
         NGHTTP2_NV_FLAG_NONE}};
    nghttp2_data_provider prd = {.source.ptr = st, .read_callback = resp_read_cb};
    memcpy(st->out, fixed_resp, sizeof(st->out));
    return nghttp2_submit_response(s, st->id, hdr, 2, &prd);
}

static int on_frame_recv_cb(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    (void)ud;
    if ((f->hd.type != NGHTTP2_DATA && f->hd.type != NGHTTP2_HEADERS) ||
        !(f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        return 0;
    }
    struct h2e_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st == NULL) {
        return 0;
    }
    return h2e_stream_answer(s, st) == 0 ? 0 : NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int on_stream_close_cb(nghttp2_session *s, int32_t id, uint32_t err, void *ud)
{
    (void)err;
    (void)ud;
    free(nghttp2_session_get_stream_user_data(s, id));
    nghttp2_session_set_stream_user_data(s, id, NULL);
    return 0;
}

static nghttp2_session_callbacks *h2e_callbacks(void)
{
    nghttp2_session_callbacks *cb = NULL;
    if (nghttp2_session_callbacks_new(&cb) != 0) {
        return NULL;
    }
    nghttp2_session_callbacks_set_send_callback(cb, send_cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers_cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header_cb);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk_cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv_cb);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close_cb);
    return cb;
}

static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    static const unsigned char h2[] = "\x02h2";
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, h2, 3, in, inlen) != OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_ALERT_FATAL; /* grpc-go requires h2; so do we */
    }
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

/* Drives one connection after a readiness event; returns false to close. */
static bool h2e_conn_io(int ep, struct h2e_conn *c, const nghttp2_session_callbacks *cb)
{
    if (c->h2 == NULL) {
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
        }
        nghttp2_settings_entry set[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
                                        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 8192}};
        if (nghttp2_session_server_new(&c->h2, cb, c) != 0 ||
            nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, set, 2) != 0) {
            return false;
        }
    }
    for (;;) {
        uint8_t buf[16384];
        int n = SSL_read(c->ssl, buf, sizeof(buf));
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                break;
            }
            return false; /* EOF, close_notify or error */
        }
        if (nghttp2_session_mem_recv(c->h2, buf, (size_t)n) < 0) {
            return false;
        }
    }
    if (nghttp2_session_send(c->h2) != 0) {
        return false;
    }
    if (!nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2)) {
        return false;
    }
    bool out = nghttp2_session_want_write(c->h2) != 0;
    if (out != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
        c->want_out = out;
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
    return true;
}

static int h2e_listen(const char *spec, int *port)
{
    char host[64];
    const char *colon = strrchr(spec, ':');
    struct sockaddr_in sa = {.sin_family = AF_INET};
    socklen_t sl = sizeof(sa);
    int one = 1, fd;

    if (colon == NULL || (size_t)(colon - spec) >= sizeof(host)) {
        return -1;
    }
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = '\0';
    sa.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        return -1;
    }
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 1024) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

static void usage(void)
{
    fprintf(stderr, "usage: kms-h2-echo-server --listen IPV4:PORT --cert FILE --key FILE\n");
    exit(64);
}

int main(int argc, char **argv)
{
    const char *listen_spec = NULL, *cert = NULL, *key = NULL;
    nghttp2_session_callbacks *cb = NULL;
    SSL_CTX *ctx = NULL;
    int lfd = -1, ep = -1, sfd = -1, port = 0, rc = 1;
    sigset_t set;

    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--listen") == 0) {
            listen_spec = argv[i + 1];
        } else if (strcmp(argv[i], "--cert") == 0) {
            cert = argv[i + 1];
        } else if (strcmp(argv[i], "--key") == 0) {
            key = argv[i + 1];
        } else {
            usage();
        }
    }
    if (listen_spec == NULL || cert == NULL || key == NULL || argc % 2 == 0) {
        usage();
    }
    memcpy(fixed_resp, "\x00\x00\x00\x00\x22\x0a\x20", 7); /* uncompressed, 34 bytes */
    for (int i = 0; i < 32; i++) {
        fixed_resp[7 + i] = (uint8_t)i;
    }
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL);

    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL || SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        fprintf(stderr, "kms-h2-echo-server: TLS set-up failed\n");
        ERR_print_errors_fp(stderr);
        goto out;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, NULL);
    if ((cb = h2e_callbacks()) == NULL || (lfd = h2e_listen(listen_spec, &port)) < 0 ||
        (ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
        (sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
        fprintf(stderr, "kms-h2-echo-server: cannot listen on %s: %s\n", listen_spec,
                strerror(errno));
        goto out;
    }
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &lfd};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &sfd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) != 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &sev) != 0) {
        goto out;
    }
    printf("listening on %d\n", port);
    fflush(stdout);

    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            goto out;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &sfd) {
                rc = 0;
                goto out;
            }
            if (evs[i].data.ptr == &lfd) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    int one = 1;
                    struct h2e_conn *c = calloc(1, sizeof(*c));
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    if (c == NULL || (c->ssl = SSL_new(ctx)) == NULL) {
                        free(c);
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    SSL_set_fd(c->ssl, fd);
                    SSL_set_accept_state(c->ssl);
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
                        SSL_free(c->ssl);
                        close(fd);
                        free(c);
                    }
                }
                continue;
            }
            struct h2e_conn *c = evs[i].data.ptr;
            if (!h2e_conn_io(ep, c, cb)) {
                h2e_conn_close(ep, c);
            }
        }
    }
out:
    /* Connections still open at exit are left to the kernel. */
    if (sfd >= 0) {
        close(sfd);
    }
    if (ep >= 0) {
        close(ep);
    }
    if (lfd >= 0) {
        close(lfd);
    }
    nghttp2_session_callbacks_del(cb);
    SSL_CTX_free(ctx);
    return rc;
}
