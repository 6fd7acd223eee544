/*
 * The second server transport of kms_rpc (kms_rpc_server_config.transport =
 * KMS_RPC_H2): unary gRPC over OpenSSL + nghttp2, without the gRPC C core.
 * For the Talos port (server TLS or plaintext h2c; no client certificates):
 * bench/bench_unseal.py measured gRPC's per-connection machinery at about
 * twice a bare TLS handshake, this stack at about one (docs/benchmarks.md).
 *
 * What it shares with the gRPC transport (rpc_server.c, rpc_call.c): the
 * public API, struct kms_rpc_call and its accounting (srv->calls,
 * open_calls, live_calls, refusing, last_call), stop steps 1-3 and the
 * accept filter (rpc_limit.c: connection caps, EMFILE survival, byte police,
 * bans and probes apply because our accept4() calls are the interposed ones).
 * What is its own: the listener, the event loops, TLS contexts, HTTP/2
 * framing (nghttp2), and stop step 4 (rpc_h2_shutdown). This file has the
 * loops, connections and lifecycle; rpc_h2_stream.c the nghttp2 callbacks,
 * request checks and answers; rpc_h2_tls.c the TLS contexts; the structs
 * are in rpc_h2_internal.h.
 *
 * Threads. srv->workers loops, each one thread with its own epoll set; the
 * listening socket is in every set with EPOLLEXCLUSIVE, so one loop takes
 * each new connection and keeps it for life. A loop runs the handlers of
 * its connections inline (handlers must not block, kms_rpc.h). A handler
 * may finish from any thread: rpc_h2_call_send() queues the call on its
 * connection's loop (loop->q, under loop->qmu) and wakes it (eventfd); the
 * loop writes the answer. Everything else of a loop (its connections, their
 * SSL and nghttp2 objects, streams) is touched by that loop's thread only.
 *
 * Ownership. A loop owns its connections (loop->conns). A connection that
 * closes while calls still point to it (conn->refs > 0) leaves the list but
 * stays allocated until the loop has drained the last of those calls. A
 * stream (struct h2_stream) is owned by its nghttp2 stream: freed in
 * on_stream_close_cb. A call holds no stream pointer, only the stream id:
 * an answer to a stream the client reset finds no stream and is dropped.
 * srv->h2_ctx is the current SSL_CTX (one reference); a reload builds a new
 * one and swaps it under srv->tls_mu (connections hold their own reference
 * through their SSL).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <grpc/support/time.h>

#include "kms_connlimit.h"
#include "kms_log.h"
#include "kms_parse.h"
#include "kms_time.h"
#include "kms_tsan.h"
#include "rpc_internal.h"
#include "rpc_h2_internal.h"

/* The loop the calling thread runs, NULL on other threads. */
static _Thread_local struct h2_loop *tl_loop;

struct h2_loop *rpc_h2_loop_self(void)
{
    return tl_loop;
}

/* ---- connections ----------------------------------------------------- */

/* Not freed at once: an event for c may still be in the loop's current
 * epoll batch (loop_reap frees the graveyard after it). */
static void conn_free(struct h2_conn *c)
{
    free(c->obuf);
    c->obuf = NULL;
    c->next = c->loop->grave;
    c->loop->grave = c;
}

static void loop_reap(struct h2_loop *l)
{
    while (l->grave != NULL) {
        struct h2_conn *c = l->grave;
        l->grave = c->next;
        free(c);
    }
}

/* Closes c (loop thread). Calls that still point to it keep the struct. */
static void conn_close(struct h2_conn *c)
{
    struct h2_loop *l = c->loop;
    if (c->dead) {
        return;
    }
    c->dead = true;
    epoll_ctl(l->ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->h2 != NULL) {
        nghttp2_session_del(c->h2); /* no stream-close callbacks from here */
        c->h2 = NULL;
    }
    while (c->slist != NULL) {
        rpc_h2_stream_free(c, c->slist);
    }
    if (c->ssl != NULL) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd);
    c->fd = -1;
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        l->conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    c->prev = c->next = NULL;
    if (c->refs == 0) {
        conn_free(c);
    }
}

void rpc_h2_conn_unref(struct h2_conn *c)
{
    if (--c->refs == 0 && c->dead) {
        conn_free(c);
    }
}

static void peer_format(const struct sockaddr_storage *ss, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const void *)ss;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        snprintf(out, n, "ipv4:%s:%u", host, ntohs(s4->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const void *)ss;
        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
            inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], host, sizeof(host));
            snprintf(out, n, "ipv4:%s:%u", host, ntohs(s6->sin6_port));
        } else {
            inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
            snprintf(out, n, "ipv6:[%s]:%u", host, ntohs(s6->sin6_port));
        }
    } else {
        snprintf(out, n, "unknown");
    }
}

/* ---- socket output ---------------------------------------------------- */

/* Writes len bytes; returns bytes written, 0 when the socket would block,
 * -1 on error. */
static ssize_t conn_write(struct h2_conn *c, const uint8_t *data, size_t len)
{
    if (c->ssl != NULL) {
        int n = SSL_write(c->ssl, data, len > INT32_MAX ? INT32_MAX : (int)len);
        if (n > 0) {
            return n;
        }
        int e = SSL_get_error(c->ssl, n);
        ERR_clear_error();
        return e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ ? 0 : -1;
    }
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n >= 0) {
        return n;
    }
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
}

/* ---- the loop -------------------------------------------------------- */

/* Collects what nghttp2 has to send into c->obuf and writes it in one
 * SSL_write (one TLS record, one syscall: an answer is HEADERS + DATA +
 * trailers). 1 when all is written, 0 when the socket would block (the rest
 * stays in obuf, retried with the same bytes), -1 on error. */
static int conn_send(struct h2_conn *c)
{
    for (;;) {
        while (c->ooff < c->olen) {
            ssize_t n = conn_write(c, c->obuf + c->ooff, c->olen - c->ooff);
            if (n < 0) {
                return -1;
            }
            if (n == 0) {
                return 0;
            }
            c->ooff += (size_t)n;
        }
        c->olen = c->ooff = 0;
        for (;;) {
            const uint8_t *p;
            ssize_t n = nghttp2_session_mem_send(c->h2, &p);
            if (n < 0) {
                return -1;
            }
            if (n == 0) {
                break;
            }
            if (c->olen + (size_t)n > c->ocap) {
                size_t cap = c->ocap != 0 ? c->ocap : 4096;
                uint8_t *nb;
                while (cap < c->olen + (size_t)n) {
                    cap *= 2;
                }
                if ((nb = realloc(c->obuf, cap)) == NULL) {
                    return -1;
                }
                c->obuf = nb;
                c->ocap = cap;
            }
            memcpy(c->obuf + c->olen, p, (size_t)n);
            c->olen += (size_t)n;
            if (c->olen >= 16384) {
                break; /* one full record at a time */
            }
        }
        if (c->olen == 0) {
            return 1;
        }
    }
}

void rpc_h2_conn_flush(struct h2_conn *c)
{
    bool out;
    int r;
    if (c->dead || c->h2 == NULL) {
        return;
    }
    if ((r = conn_send(c)) < 0 ||
        (r == 1 && !nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2))) {
        conn_close(c);
        return;
    }
    out = r == 0 || nghttp2_session_want_write(c->h2) != 0;
    if (c->eof && !out && c->refs == 0) {
        /* Everything the client asked for is answered, and no handler
         * still holds a call here; a stream whose request never ended can
         * no longer end: it is dropped with the connection. */
        conn_close(c);
        return;
    }
    if (out != c->want_out) {
        /* at EOF the socket stays readable: stop polling for input */
        struct epoll_event ev = {.events = (c->eof ? 0 : EPOLLIN) | (out ? EPOLLOUT : 0),
                                 .data.ptr = c};
        c->want_out = out;
        epoll_ctl(c->loop->ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static bool conn_start_h2(struct h2_conn *c)
{
    struct kms_rpc_server *srv = c->loop->srv;
    nghttp2_settings_entry set[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, srv->max_streams},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, H2_MAX_HEADER_BYTES},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, (uint32_t)(srv->max_message + 5 + 1024)}};
    if (c->ssl != NULL) {
        const unsigned char *alpn = NULL;
        unsigned alen = 0;
        SSL_get0_alpn_selected(c->ssl, &alpn, &alen);
        if (alen != 2 || memcmp(alpn, "h2", 2) != 0) {
            return false; /* the client offered no ALPN at all */
        }
    }
    return nghttp2_session_server_new2(&c->h2, c->loop->srv->h2->cb, c,
                                       c->loop->srv->h2->opt) == 0 &&
           nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, set, 3) == 0;
}

/* Writes the loop's queued answers, then flushes c. The drain may close c
 * (it holds a reference meanwhile, so c is not freed under us). */
static void conn_drain_flush(struct h2_conn *c)
{
    c->refs++;
    rpc_h2_loop_drain(c->loop);
    c->refs--;
    if (c->dead) {
        if (c->refs == 0) {
            conn_free(c);
        }
        return;
    }
    rpc_h2_conn_flush(c);
}

/* The client will send nothing more: answer the streams already complete
 * (their handlers may still run), then close (conn_flush). */
static void h2_conn_eof(struct h2_conn *c)
{
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    c->eof = true;
    c->want_out = true; /* one EPOLLOUT round: conn_flush then decides */
    epoll_ctl(c->loop->ep, EPOLL_CTL_MOD, c->fd, &ev);
    conn_drain_flush(c);
}

/* One readiness event on c. */
static void conn_io(struct h2_conn *c)
{
    uint8_t buf[H2_READ_CHUNK];

    if (c->eof) {
        /* output only (or EPOLLERR/EPOLLHUP): write what is answered */
        conn_drain_flush(c);
        return;
    }

    if (c->h2 == NULL) {
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                ERR_clear_error();
            }
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                char why[160];
                unsigned long ec = ERR_peek_last_error();
                if (ec != 0) {
                    ERR_error_string_n(ec, why, sizeof(why));
                } else {
                    snprintf(why, sizeof(why), "%s",
                             e == SSL_ERROR_SYSCALL ? "connection closed" : "protocol error");
                }
                ERR_clear_error();
                /* rate-limited per message by kms_log, like gRPC's lines */
                kms_log(KMS_LOG_WARN, "rpc", "TLS handshake failed", "peer", c->peer,
                        "error", why, NULL);
                conn_close(c);
            } else if (e == SSL_ERROR_WANT_WRITE && !c->want_out) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT,
                                         .data.ptr = c};
                c->want_out = true;
                epoll_ctl(c->loop->ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
            return;
        }
        if (!conn_start_h2(c)) {
            conn_close(c);
            return;
        }
    }
    for (;;) {
        ssize_t n;
        if (c->ssl != NULL) {
            int r = SSL_read(c->ssl, buf, sizeof(buf));
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                ERR_clear_error();
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                    break;
                }
                if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && c->streams > 0)) {
                    h2_conn_eof(c); /* close_notify or EOF: a half close */
                } else {
                    conn_close(c); /* error */
                }
                return;
            }
            n = r;
        } else {
            n = recv(c->fd, buf, sizeof(buf), 0);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
                break;
            }
            if (n == 0) {
                h2_conn_eof(c);
                return;
            }
            if (n < 0) {
                conn_close(c);
                return;
            }
        }
        if (nghttp2_session_mem_recv(c->h2, buf, (size_t)n) < 0) {
            conn_close(c); /* protocol error: nghttp2 queued a GOAWAY we skip */
            return;
        }
        if (c->dead) {
            return;
        }
    }
    /* answers the handlers gave inline are in the queue: write them now */
    conn_drain_flush(c);
}

static void loop_accept(struct h2_loop *l)
{
    struct kms_rpc_server *srv = l->srv;
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        struct h2_conn *c;
        int one = 1;
        /* accept4 is rpc_limit.c's filter (caps, bans, EMFILE, probes) */
        int fd = accept4(srv->h2->lfd, (struct sockaddr *)&ss, &sl,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINVAL || errno == EBADF) {
                /* stop step 1 shut the listener down */
                epoll_ctl(l->ep, EPOLL_CTL_DEL, srv->h2->lfd, NULL);
                l->lfd_in = false;
            }
            return; /* EAGAIN, or one connection's error: the next event retries */
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if ((c = calloc(1, sizeof(*c))) == NULL) {
            close(fd);
            continue;
        }
        c->loop = l;
        c->fd = fd;
        c->born_ms = c->idle_since_ms = kms_mono_ms();
        peer_format(&ss, c->peer, sizeof(c->peer));
        if (srv->mode != KMS_RPC_INSECURE) {
            SSL_CTX *ctx = rpc_h2_ctx_get(srv);
            c->ssl = SSL_new(ctx);
            SSL_CTX_free(ctx);
            if (c->ssl == NULL || SSL_set_fd(c->ssl, fd) != 1) {
                SSL_free(c->ssl);
                free(c);
                close(fd);
                continue;
            }
            SSL_set_accept_state(c->ssl);
        } else if (!conn_start_h2(c)) {
            if (c->h2 != NULL) {
                nghttp2_session_del(c->h2);
            }
            free(c);
            close(fd);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(l->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            if (c->h2 != NULL) {
                nghttp2_session_del(c->h2);
            }
            SSL_free(c->ssl);
            free(c);
            close(fd);
            continue;
        }
        c->next = l->conns;
        if (l->conns != NULL) {
            l->conns->prev = c;
        }
        l->conns = c;
        if (c->h2 != NULL) {
            rpc_h2_conn_flush(c); /* plaintext: our SETTINGS */
        }
    }
}

/* Timeouts: handshake, idle, age. */
static void loop_tick(struct h2_loop *l)
{
    struct kms_rpc_server *srv = l->srv;
    uint64_t now = kms_mono_ms();
    struct h2_conn *c = l->conns;
    while (c != NULL) {
        struct h2_conn *next = c->next;
        uint64_t age = now - c->born_ms;
        if (!c->ready && age >= srv->handshake_timeout_ms) {
            conn_close(c);
        } else if (c->ready && c->streams == 0 && now - c->idle_since_ms >= srv->max_idle_ms) {
            nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
            rpc_h2_conn_flush(c);
        } else if (c->ready && age >= srv->max_age_ms) {
            if (!c->goaway) {
                c->goaway = true;
                nghttp2_submit_shutdown_notice(c->h2);
                rpc_h2_conn_flush(c);
            } else if (c->streams == 0 || age >= srv->max_age_ms + H2_MAX_AGE_GRACE_MS) {
                nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
                rpc_h2_conn_flush(c);
            }
        }
        c = next;
    }
}

static void *loop_main(void *arg)
{
    struct h2_loop *l = arg;
    struct rpc_h2 *h = l->srv->h2;
    uint64_t last_tick = kms_mono_ms();

    tl_loop = l;
    while (!atomic_load(&h->quit)) {
        struct epoll_event evs[64];
        int n = epoll_wait(l->ep, evs, 64, H2_TICK_MS);
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &h->lfd) {
                loop_accept(l);
            } else if (p == &l->evfd) {
                uint64_t v;
                ssize_t r = read(l->evfd, &v, sizeof(v));
                (void)r;
            } else {
                struct h2_conn *c = p;
                if (!c->dead) {
                    conn_io(c);
                }
            }
        }
        rpc_h2_loop_drain(l);
        if (kms_mono_ms() - last_tick >= H2_TICK_MS) {
            last_tick = kms_mono_ms();
            loop_tick(l);
        }
        loop_reap(l);
    }
    /* quit: best-effort GOAWAY, then close everything */
    rpc_h2_loop_drain(l);
    while (l->conns != NULL) {
        struct h2_conn *c = l->conns;
        if (c->h2 != NULL) {
            nghttp2_session_terminate_session(c->h2, NGHTTP2_NO_ERROR);
            (void)conn_send(c);
        }
        conn_close(c);
    }
    loop_reap(l);
    return NULL;
}

/* ---- lifecycle (rpc_server.c calls these) ---------------------------- */

static int h2_listen(struct kms_rpc_server *srv, struct kms_err *err)
{
    struct kms_addr a;
    char why[160], port[8];
    struct addrinfo hints, *res = NULL;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = -1, one = 1, zero = 0, rc;

    /* the configuration's address grammar (kms_parse.h), plus port 0 */
    if (kms_parse_addr(srv->listen, KMS_PARSE_ADDR_PORT0, &a, why, sizeof(why)) != 0) {
        return kms_err_set(err, KMS_EINVAL, "cannot listen on %s: %s", srv->listen, why);
    }
    snprintf(port, sizeof(port), "%u", (unsigned)a.port);
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    /* ":4050": dual stack, like gRPC */
    hints.ai_family = a.host[0] == '\0' ? AF_INET6 : AF_UNSPEC;
    if ((rc = getaddrinfo(a.host[0] == '\0' ? NULL : a.host, port, &hints, &res)) != 0) {
        return kms_err_set(err, KMS_EIO, "cannot listen on %s: %s", srv->listen,
                           gai_strerror(rc));
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        (res->ai_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) != 0) ||
        bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 1024) != 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        rc = errno;
        if (fd >= 0) {
            close(fd);
        }
        freeaddrinfo(res);
        return kms_err_set(err, KMS_EIO, "cannot listen on %s: %s", srv->listen, strerror(rc));
    }
    freeaddrinfo(res);
    srv->h2->lfd = fd;
    srv->port = ss.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&ss)->sin_port)
                                        : ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

int rpc_h2_start(struct kms_rpc_server *srv, struct kms_err *err)
{
    struct rpc_h2 *h;
    int rc;

    if ((h = calloc(1, sizeof(*h))) == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    h->lfd = -1;
    atomic_init(&h->quit, false);
    srv->h2 = h;
    if (nghttp2_session_callbacks_new(&h->cb) != 0 || nghttp2_option_new(&h->opt) != 0) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    rpc_h2_callbacks_init(h->cb);
    /* HPACK table and stream resets bounded (Debian's 1.52 carries the
     * CVE-2023-44487 rate limit; Talos sends one stream per connection) */
    nghttp2_option_set_max_deflate_dynamic_table_size(h->opt, 4096);
    nghttp2_option_set_stream_reset_rate_limit(h->opt, 64, 10);
    if (srv->mode != KMS_RPC_INSECURE) {
        if ((h->ctx = rpc_h2_ctx_build(srv, err)) == NULL) {
            return kms_err_wrap(err, KMS_ETLS, "rpc server %s", srv->listen);
        }
        atomic_store(&srv->reload, false);
    }
    if ((rc = h2_listen(srv, err)) != 0) {
        return rc;
    }
    if ((rc = kms_connlimit_register(srv->port, &srv->conn_limit, err)) != 0) {
        return kms_err_wrap(err, rc, "rpc server %s", srv->listen);
    }
    srv->limit_registered = true;
    if ((h->loops = calloc(srv->workers, sizeof(*h->loops))) == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    h->n_loops = srv->workers;
    for (unsigned i = 0; i < h->n_loops; i++) {
        struct h2_loop *l = &h->loops[i];
        l->srv = srv;
        l->ep = l->evfd = -1;
        pthread_mutex_init(&l->qmu, NULL);
    }
    for (unsigned i = 0; i < h->n_loops; i++) {
        struct h2_loop *l = &h->loops[i];
        struct epoll_event lev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = &h->lfd};
        struct epoll_event eev = {.events = EPOLLIN, .data.ptr = &l->evfd};
        if ((l->ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
            (l->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
            epoll_ctl(l->ep, EPOLL_CTL_ADD, h->lfd, &lev) != 0 ||
            epoll_ctl(l->ep, EPOLL_CTL_ADD, l->evfd, &eev) != 0) {
            return kms_err_set(err, KMS_EIO, "rpc server %s: epoll: %s", srv->listen,
                               strerror(errno));
        }
        l->lfd_in = true;
    }
    pthread_mutex_lock(&srv->mu);
    srv->state = RPC_ST_RUNNING;
    pthread_mutex_unlock(&srv->mu);
    for (unsigned i = 0; i < h->n_loops; i++) {
        if (pthread_create(&h->loops[i].th, NULL, loop_main, &h->loops[i]) != 0) {
            return kms_err_set(err, KMS_ENOMEM, "rpc server %s: cannot start its threads",
                               srv->listen);
        }
        h->loops[i].started = true;
    }
    return 0;
}

/* Stop step 4 (and the clean-up of a start that failed half way): waits
 * up to wait_ms for the answers already given to be written, then closes
 * every connection and joins the loops. Answers still queued after that
 * are dropped (their calls released) here. Stopping thread. */
void rpc_h2_shutdown(struct kms_rpc_server *srv, unsigned wait_ms)
{
    struct rpc_h2 *h = srv->h2;
    struct timespec end = kms_mono_ts_in(wait_ms);

    if (h == NULL) {
        return;
    }
    pthread_mutex_lock(&srv->mu);
    while (srv->live_calls > 0 &&
           pthread_cond_timedwait(&srv->cv, &srv->mu, &end) != ETIMEDOUT) {
    }
    pthread_mutex_unlock(&srv->mu);
    atomic_store(&h->quit, true);
    for (unsigned i = 0; i < h->n_loops; i++) {
        struct h2_loop *l = &h->loops[i];
        if (l->started) {
            uint64_t one = 1;
            ssize_t n = write(l->evfd, &one, sizeof(one));
            (void)n;
            pthread_join(l->th, NULL);
            l->started = false;
        }
    }
    /* A handler that won its `finished` exchange before stop step 3 may
     * still be about to queue its answer: wait for every call's transport
     * side, dropping the answers (every connection is closed now). */
    for (;;) {
        for (unsigned i = 0; i < h->n_loops; i++) {
            rpc_h2_loop_drain(&h->loops[i]);
            loop_reap(&h->loops[i]);
        }
        pthread_mutex_lock(&srv->mu);
        if (srv->live_calls == 0) {
            pthread_mutex_unlock(&srv->mu);
            break;
        }
        end = kms_mono_ts_in(10);
        (void)pthread_cond_timedwait(&srv->cv, &srv->mu, &end);
        pthread_mutex_unlock(&srv->mu);
    }
    if (h->lfd >= 0) {
        close(h->lfd);
        h->lfd = -1;
    }
}

/* After rpc_h2_shutdown: frees the transport. Destroy only. */
void rpc_h2_free(struct kms_rpc_server *srv)
{
    struct rpc_h2 *h = srv->h2;
    if (h == NULL) {
        return;
    }
    for (unsigned i = 0; h->loops != NULL && i < h->n_loops; i++) {
        struct h2_loop *l = &h->loops[i];
        if (l->ep >= 0) {
            close(l->ep);
        }
        if (l->evfd >= 0) {
            close(l->evfd);
        }
        pthread_mutex_destroy(&l->qmu);
    }
    free(h->loops);
    if (h->lfd >= 0) {
        close(h->lfd);
    }
    nghttp2_session_callbacks_del(h->cb);
    nghttp2_option_del(h->opt);
    SSL_CTX_free(h->ctx);
    free(h);
    srv->h2 = NULL;
}
