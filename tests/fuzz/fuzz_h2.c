/* libFuzzer: what the h2 server transport (src/server/rpc_h2.c, the Talos
 * port's default) reads from a client: HTTP/2 frames (nghttp2) and what
 * kmsd checks itself in a request (:method, :path, content-type,
 * grpc-encoding, grpc-timeout, the 5-byte message prefix, the size limit),
 * through the real event loop and call object.
 *
 * One plaintext h2 server (KMS_RPC_INSECURE, one loop, 64-byte messages)
 * with an echo method runs for the whole session. Each input is sent on a
 * new TCP connection, its write side shut down, and the answer read until
 * the server closes.
 *
 * Input: u8 mode. Mode even: the rest is raw bytes after the client
 * preface. Mode odd: a request built with nghttp2's client from the input
 * (u8 flags, u8 path choice, u8 timeout length + timeout text, u16 body
 * length + body, then raw bytes appended after it: more frames, resets).
 *
 * Invariants: no crash or sanitizer report; the server closes the
 * connection by itself within 2 s of the client's half close, whatever the
 * bytes (a request that can no longer complete is not kept).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "kms_rpc.h"

static struct kms_rpc_server *g_srv;
static int g_port;

static void echo_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    (void)arg;
    kms_rpc_call_finish(call, len > 0 && req[0] == 0xff ? GRPC_STATUS_NOT_FOUND : 0,
                        "not\nfound %", req, len);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    struct kms_rpc_server_config cfg = {0};
    struct kms_err err;
    (void)argc;
    (void)argv;
    cfg.listen = "127.0.0.1:0";
    cfg.mode = KMS_RPC_INSECURE;
    cfg.transport = KMS_RPC_H2;
    cfg.workers = 1;
    cfg.max_message = 64;
    cfg.max_conns_per_addr = 1024;
    kms_err_clear(&err);
    if (kms_rpc_server_create(&cfg, &g_srv, &err) != 0 ||
        kms_rpc_server_add_method(g_srv, "/sidero.kms.KMSService/Unseal", echo_cb, NULL) != 0 ||
        kms_rpc_server_start(g_srv, &err) != 0) {
        fprintf(stderr, "fuzz_h2: server: %s\n", err.msg);
        abort();
    }
    g_port = kms_rpc_server_port(g_srv);
    return 0;
}

struct buf {
    uint8_t *p;
    size_t n, cap;
};

static void buf_add(struct buf *b, const void *p, size_t n)
{
    if (n == 0) {
        return;
    }
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) {
            cap *= 2;
        }
        b->p = realloc(b->p, cap);
        if (b->p == NULL) {
            abort();
        }
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static ssize_t cli_send_cb(nghttp2_session *s, const uint8_t *d, size_t n, int flags, void *ud)
{
    (void)s;
    (void)flags;
    buf_add(ud, d, n);
    return (ssize_t)n;
}

struct body {
    const uint8_t *p;
    size_t n, off;
};

static ssize_t cli_body_cb(nghttp2_session *s, int32_t id, uint8_t *out, size_t len,
                           uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    struct body *b = src->ptr;
    size_t k = b->n - b->off < len ? b->n - b->off : len;
    (void)s;
    (void)id;
    (void)ud;
    memcpy(out, b->p + b->off, k);
    b->off += k;
    if (b->off == b->n) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    }
    return (ssize_t)k;
}

#define NVS(n, v) {(uint8_t *)(n), (uint8_t *)(v), strlen(n), strlen(v), NGHTTP2_NV_FLAG_NONE}

/* Mode odd: a request from the input's fields; returns bytes used. */
static size_t build_request(const uint8_t *d, size_t n, struct buf *out)
{
    static const char *paths[] = {"/sidero.kms.KMSService/Unseal",
                                  "/sidero.kms.KMSService/Seal", "/x", "", "/sidero.kms."};
    nghttp2_session_callbacks *cb = NULL;
    nghttp2_session *s = NULL;
    nghttp2_nv nv[8];
    char timeout[16] = "";
    size_t used = 0, k = 0, tlen, blen;
    uint8_t flags, path;
    struct body body = {0};
    nghttp2_data_provider prd = {.source.ptr = &body, .read_callback = cli_body_cb};

    if (n < 4) {
        return n;
    }
    flags = d[used++];
    path = d[used++];
    tlen = d[used++] % sizeof(timeout);
    if (tlen > n - used) {
        tlen = n - used;
    }
    memcpy(timeout, d + used, tlen);
    timeout[tlen] = '\0';
    used += tlen;
    blen = 0;
    if (n - used >= 2) {
        blen = ((size_t)d[used] << 8 | d[used + 1]) % 256;
        used += 2;
    }
    if (blen > n - used) {
        blen = n - used;
    }
    body.p = d + used;
    body.n = blen;
    used += blen;

    nv[k++] = (nghttp2_nv)NVS(":method", flags & 1 ? "GET" : "POST");
    nv[k++] = (nghttp2_nv)NVS(":scheme", "http");
    nv[k++] = (nghttp2_nv)NVS(":authority", "kmsd");
    nv[k++] = (nghttp2_nv)NVS(":path", paths[path % 5]);
    nv[k++] = (nghttp2_nv)NVS("content-type", flags & 2 ? "text/plain" : "application/grpc");
    if (flags & 4) {
        nv[k++] = (nghttp2_nv)NVS("grpc-encoding", flags & 8 ? "gzip" : "identity");
    }
    if (flags & 16) {
        nv[k] = (nghttp2_nv)NVS("grpc-timeout", "");
        nv[k].value = (uint8_t *)timeout;
        nv[k].valuelen = strlen(timeout);
        k++;
    }
    if (nghttp2_session_callbacks_new(&cb) != 0) {
        abort();
    }
    nghttp2_session_callbacks_set_send_callback(cb, cli_send_cb);
    if (nghttp2_session_client_new(&s, cb, out) != 0) {
        abort();
    }
    nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, NULL, 0);
    nghttp2_submit_request(s, NULL, nv, k, flags & 32 ? NULL : &prd, NULL);
    (void)nghttp2_session_send(s);
    nghttp2_session_del(s);
    nghttp2_session_callbacks_del(cb);
    return used;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    struct sockaddr_in sa = {.sin_family = AF_INET};
    struct buf out = {0};
    uint8_t rd[4096];
    double t0;
    int fd;

    if (size < 1) {
        return 0;
    }
    if (data[0] & 1) {
        size_t used = build_request(data + 1, size - 1, &out);
        buf_add(&out, data + 1 + used, size - 1 - used);
    } else {
        buf_add(&out, preface, sizeof(preface) - 1);
        buf_add(&out, data + 1, size - 1);
    }
    sa.sin_port = htons((uint16_t)g_port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
        connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        abort(); /* the server must accept */
    }
    for (size_t off = 0; off < out.n;) {
        ssize_t w = send(fd, out.p + off, out.n - off, MSG_NOSIGNAL);
        if (w <= 0) {
            break; /* the server may close early on a protocol error */
        }
        off += (size_t)w;
    }
    shutdown(fd, SHUT_WR);
    t0 = now_s();
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        double left = 2.0 - (now_s() - t0);
        if (left <= 0) {
            fprintf(stderr, "fuzz_h2: the server kept a half-closed connection open 2 s\n");
            abort();
        }
        if (poll(&p, 1, (int)(left * 1000) + 1) > 0) {
            ssize_t r = recv(fd, rd, sizeof(rd), 0);
            if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) {
                break; /* closed (or reset) by the server */
            }
        }
    }
    close(fd);
    free(out.p);
    return 0;
}
