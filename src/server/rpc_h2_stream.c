/*
 * The h2 transport's HTTP/2 side (rpc_h2_internal.h): nghttp2's server
 * callbacks for one connection, the checks kmsd makes on a gRPC request
 * before a handler sees it (:method, :path, content-type, grpc-encoding,
 * grpc-timeout, the message prefix, the size limit), the call that a
 * complete request becomes, and the answers. Everything here runs on the
 * connection's loop thread (rpc_h2.c has the threads and ownership).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/support/time.h>

#include "kms_rpc.h"
#include "kms_time.h"
#include "kms_tsan.h"
#include "rpc_h2_internal.h"

static int on_begin_headers_cb(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    struct h2_conn *c = ud;
    struct h2_stream *st;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) {
        return 0;
    }
    if ((st = calloc(1, sizeof(*st))) == NULL) {
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* resets this stream */
    }
    st->id = f->hd.stream_id;
    st->timeout_ms = -1;
    st->next = c->slist;
    if (c->slist != NULL) {
        c->slist->prev = st;
    }
    c->slist = st;
    c->streams++;
    nghttp2_session_set_stream_user_data(s, st->id, st);
    return 0;
}

static bool is(const uint8_t *p, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

/* grpc-timeout: 1-8 digits and a unit (H M S m u n). -1 when malformed. */
static int64_t parse_timeout(const uint8_t *v, size_t n)
{
    int64_t x = 0;
    if (n < 2 || n > 9) {
        return -1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        if (v[i] < '0' || v[i] > '9') {
            return -1;
        }
        x = x * 10 + (v[i] - '0');
    }
    switch (v[n - 1]) {
    case 'H': return x * 3600000;
    case 'M': return x * 60000;
    case 'S': return x * 1000;
    case 'm': return x;
    case 'u': return (x + 999) / 1000;
    case 'n': return (x + 999999) / 1000000;
    default: return -1;
    }
}

static int on_header_cb(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *ud)
{
    struct h2_stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    (void)flags;
    (void)ud;
    if (st == NULL || f->hd.type != NGHTTP2_HEADERS || st->answered) {
        return 0;
    }
    st->hdr_bytes += namelen + valuelen + 32;
    if (st->hdr_bytes > H2_MAX_HEADER_BYTES) {
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    if (is(name, namelen, ":path")) {
        if (valuelen >= sizeof(st->path)) {
            valuelen = sizeof(st->path) - 1; /* no method is this long: unknown */
        }
        memcpy(st->path, value, valuelen);
        st->path[valuelen] = '\0';
        st->path_set = true;
    } else if (is(name, namelen, ":method")) {
        st->bad_method = !is(value, valuelen, "POST");
    } else if (is(name, namelen, "content-type")) {
        st->bad_type = valuelen < 16 || memcmp(value, "application/grpc", 16) != 0 ||
                       (valuelen > 16 && value[16] != '+' && value[16] != ';');
    } else if (is(name, namelen, "grpc-encoding")) {
        st->compressed_hdr = !is(value, valuelen, "identity");
    } else if (is(name, namelen, "grpc-timeout")) {
        st->timeout_ms = parse_timeout(value, valuelen);
    }
    return 0;
}

static int on_data_chunk_cb(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                            size_t len, void *ud)
{
    struct h2_conn *c = ud;
    struct h2_stream *st = nghttp2_session_get_stream_user_data(s, id);
    size_t cap = 5 + c->loop->srv->max_message;
    (void)flags;
    if (st == NULL || st->too_big || st->compressed_hdr) {
        return 0;
    }
    if (len > cap - st->len) {
        st->too_big = true; /* answered at END_STREAM; nothing more is kept */
        free(st->buf);
        st->buf = NULL;
        return 0;
    }
    if (st->buf == NULL && (st->buf = malloc(cap)) == NULL) {
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    memcpy(st->buf + st->len, data, len);
    st->len += len;
    return 0;
}

static ssize_t body_read_cb(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len,
                            uint32_t *data_flags, nghttp2_data_source *src, void *ud)
{
    struct h2_stream *st = src->ptr;
    size_t n = st->outlen - st->outoff;
    (void)ud;
    if (n > len) {
        n = len;
    }
    memcpy(buf, st->out + st->outoff, n);
    st->outoff += n;
    if (st->outoff == st->outlen) {
        static const nghttp2_nv ok[] = {
            {(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1, NGHTTP2_NV_FLAG_NONE}};
        *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        if (nghttp2_submit_trailer(s, id, ok, 1) != 0) {
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
    }
    return (ssize_t)n;
}

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}

/* grpc-message is percent-encoded (gRPC spec): printable ASCII but '%'. */
char *rpc_h2_pct_encode(const char *s)
{
    size_t n = strlen(s);
    char *o = malloc(3 * n + 1), *p = o;
    if (o == NULL) {
        return NULL;
    }
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch >= 0x20 && ch <= 0x7e && ch != '%') {
            *p++ = (char)ch;
        } else {
            p += sprintf(p, "%%%02X", ch);
        }
    }
    *p = '\0';
    return o;
}

/* Writes the answer of stream st: OK with body st->out, or a trailers-only
 * status. Loop thread; st stays owned by nghttp2. */
void rpc_h2_stream_answer(nghttp2_session *s, struct h2_stream *st)
{
    char code[12];
    st->answered = true;
    st->call = NULL;
    if (st->status == 0 && st->out != NULL) {
        nghttp2_nv hdr[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                            NV("grpc-accept-encoding", "identity")};
        nghttp2_data_provider prd = {.source.ptr = st, .read_callback = body_read_cb};
        if (nghttp2_submit_response(s, st->id, hdr, 3, &prd) != 0) {
            nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
        }
        return;
    }
    snprintf(code, sizeof(code), "%d", st->status);
    nghttp2_nv nv[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                       NV("grpc-accept-encoding", "identity"), NV("grpc-status", code),
                       NV("grpc-message", st->details != NULL ? st->details : "")};
    if (nghttp2_submit_response(s, st->id, nv, st->details != NULL ? 5 : 4, NULL) != 0) {
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    }
}

static void stream_fail(nghttp2_session *s, struct h2_stream *st, int status, const char *msg)
{
    st->status = status;
    free(st->details);
    st->details = msg != NULL ? rpc_h2_pct_encode(msg) : NULL;
    rpc_h2_stream_answer(s, st);
}

static const struct rpc_method *method_find(const struct kms_rpc_server *srv, const char *path)
{
    for (unsigned i = 0; i < srv->n_methods; i++) {
        if (strcmp(srv->methods[i].path, path) == 0) {
            return &srv->methods[i];
        }
    }
    return NULL;
}

/* A request stream ended: check it, then make the call and run the
 * handler (inline, this loop's thread). */
static void stream_request(struct h2_conn *conn, struct h2_stream *st)
{
    struct kms_rpc_server *srv = conn->loop->srv;
    nghttp2_session *s = conn->h2;
    const struct rpc_method *m;
    struct kms_rpc_call *c;
    gpr_timespec deadline;
    bool refusing;
    uint32_t mlen;

    if (st->bad_method || !st->path_set) {
        stream_fail(s, st, GRPC_STATUS_UNIMPLEMENTED, "not a gRPC request");
        return;
    }
    if (st->bad_type) {
        /* gRPC spec: HTTP 415 for a content type it does not serve */
        nghttp2_nv nv[] = {NV(":status", "415"), NV("content-type", "text/plain")};
        st->answered = true;
        nghttp2_submit_response(s, st->id, nv, 2, NULL);
        return;
    }
    if (st->compressed_hdr || (st->len >= 5 && st->buf[0] != 0)) {
        /* Identity only, decided from the headers: a compressed message is
         * never buffered or inflated (on_data_chunk_cb drops its bytes), as
         * the gRPC transport refuses it from its algorithm set. */
        stream_fail(s, st, GRPC_STATUS_UNIMPLEMENTED,
                    "compressed messages are not accepted; send identity");
        return;
    }
    if (st->too_big) {
        stream_fail(s, st, GRPC_STATUS_RESOURCE_EXHAUSTED,
                    "request larger than the maximum message size");
        return;
    }
    if (st->len < 5) {
        stream_fail(s, st, GRPC_STATUS_INVALID_ARGUMENT, "missing request message");
        return;
    }
    mlen = (uint32_t)st->buf[1] << 24 | (uint32_t)st->buf[2] << 16 | (uint32_t)st->buf[3] << 8 |
           st->buf[4];
    if ((size_t)mlen != st->len - 5) {
        stream_fail(s, st, GRPC_STATUS_INTERNAL,
                    mlen > st->len - 5 ? "request message cut short"
                                       : "more than one request message on a unary call");
        return;
    }
    m = method_find(srv, st->path);
    deadline = st->timeout_ms >= 0
                   ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                  gpr_time_from_millis(st->timeout_ms, GPR_TIMESPAN))
                   : gpr_inf_future(GPR_CLOCK_MONOTONIC);
    pthread_mutex_lock(&srv->mu);
    srv->live_calls++;
    pthread_mutex_unlock(&srv->mu);
    c = rpc_call_new(srv, m != NULL ? m->path : "(unregistered)", conn->peer, deadline);
    if (c == NULL) {
        pthread_mutex_lock(&srv->mu);
        srv->live_calls--;
        pthread_cond_broadcast(&srv->cv);
        pthread_mutex_unlock(&srv->mu);
        stream_fail(s, st, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    c->h2_conn = conn;
    c->h2_stream = st->id;
    conn->refs++;
    st->call = c;
    rpc_call_link(c, &refusing);
    if (refusing) {
        kms_rpc_call_finish(c, GRPC_STATUS_UNAVAILABLE, "server is closing this listener; retry",
                            NULL, 0);
        return;
    }
    if (m == NULL) {
        kms_rpc_call_finish(c, GRPC_STATUS_UNIMPLEMENTED, "unknown method", NULL, 0);
        return;
    }
    m->fn(m->arg, c, st->buf + 5, mlen);
    /* st may be gone only through nghttp2; it is not touched here again */
}

static int on_frame_recv_cb(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    struct h2_conn *c = ud;
    struct h2_stream *st;
    if (f->hd.type == NGHTTP2_SETTINGS && !(f->hd.flags & NGHTTP2_FLAG_ACK)) {
        c->ready = true;
    }
    if ((f->hd.type != NGHTTP2_DATA && f->hd.type != NGHTTP2_HEADERS) ||
        !(f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        return 0;
    }
    st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st != NULL && !st->answered && st->call == NULL) {
        stream_request(c, st);
    }
    return 0;
}

void rpc_h2_stream_free(struct h2_conn *c, struct h2_stream *st)
{
    if (st->prev != NULL) {
        st->prev->next = st->next;
    } else {
        c->slist = st->next;
    }
    if (st->next != NULL) {
        st->next->prev = st->prev;
    }
    free(st->buf);
    free(st->out);
    free(st->details);
    free(st);
}

static int on_stream_close_cb(nghttp2_session *s, int32_t id, uint32_t code, void *ud)
{
    struct h2_conn *c = ud;
    struct h2_stream *st = nghttp2_session_get_stream_user_data(s, id);
    (void)code;
    if (st == NULL) {
        return 0;
    }
    nghttp2_session_set_stream_user_data(s, id, NULL);
    if (c->streams > 0) {
        c->streams--;
    }
    if (c->streams == 0) {
        c->idle_since_ms = kms_mono_ms();
    }
    rpc_h2_stream_free(c, st);
    return 0;
}

/* ---- answers from handlers (any thread) ------------------------------ */

/* rpc_internal.h. The caller won the `finished` exchange. */
void rpc_h2_call_send(struct kms_rpc_call *c, int grpc_status, const char *details,
                      const uint8_t *resp, size_t resplen)
{
    struct h2_loop *l = c->h2_conn->loop;
    bool wake;

    c->h2_status = grpc_status;
    c->h2_details = NULL;
    c->h2_resp = NULL;
    c->h2_resplen = 0;
    if (grpc_status == GRPC_STATUS_OK) {
        if ((c->h2_resp = malloc(5 + resplen)) == NULL) {
            c->h2_status = GRPC_STATUS_RESOURCE_EXHAUSTED;
            details = "out of memory";
        } else {
            c->h2_resp[0] = 0;
            c->h2_resp[1] = (uint8_t)(resplen >> 24);
            c->h2_resp[2] = (uint8_t)(resplen >> 16);
            c->h2_resp[3] = (uint8_t)(resplen >> 8);
            c->h2_resp[4] = (uint8_t)resplen;
            if (resplen > 0) {
                memcpy(c->h2_resp + 5, resp, resplen);
            }
            c->h2_resplen = 5 + resplen;
        }
    }
    if (c->h2_status != GRPC_STATUS_OK && details != NULL && details[0] != '\0') {
        c->h2_details = rpc_h2_pct_encode(details);
    }
    c->h2_qnext = NULL;
    pthread_mutex_lock(&l->qmu);
    wake = l->q == NULL;
    if (l->q_tail != NULL) {
        l->q_tail->h2_qnext = c;
    } else {
        l->q = c;
    }
    l->q_tail = c;
    KMS_TSAN_RELEASE(c);
    pthread_mutex_unlock(&l->qmu);
    if (wake && rpc_h2_loop_self() != l) { /* the loop itself drains after its handlers */
        uint64_t one = 1;
        ssize_t n = write(l->evfd, &one, sizeof(one));
        (void)n; /* a full counter (EAGAIN) still wakes the loop */
    }
}

/* Writes the queued answers. Loop thread (or, once the loop is gone, the
 * stopping thread: then every connection is dead and answers are dropped). */
void rpc_h2_loop_drain(struct h2_loop *l)
{
    struct kms_rpc_call *c;

    pthread_mutex_lock(&l->qmu);
    c = l->q;
    l->q = l->q_tail = NULL;
    pthread_mutex_unlock(&l->qmu);
    while (c != NULL) {
        struct kms_rpc_call *next = c->h2_qnext;
        struct h2_conn *conn = c->h2_conn;
        KMS_TSAN_ACQUIRE(c);
        if (!conn->dead) {
            struct h2_stream *st = nghttp2_session_get_stream_user_data(conn->h2, c->h2_stream);
            if (st != NULL && st->call == c) {
                st->status = c->h2_status;
                st->out = c->h2_resp;
                st->outlen = c->h2_resplen;
                st->details = c->h2_details;
                c->h2_resp = NULL;
                c->h2_details = NULL;
                rpc_h2_stream_answer(conn->h2, st);
            }
        }
        free(c->h2_resp);
        free(c->h2_details);
        c->h2_resp = NULL;
        c->h2_details = NULL;
        c->h2_conn = NULL;
        rpc_call_grpc_done(c); /* may free c */
        if (!conn->dead) {
            rpc_h2_conn_flush(conn);
        }
        rpc_h2_conn_unref(conn);
        c = next;
    }
}

void rpc_h2_callbacks_init(nghttp2_session_callbacks *cb)
{
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers_cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header_cb);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk_cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv_cb);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close_cb);
}
