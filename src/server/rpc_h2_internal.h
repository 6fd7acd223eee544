/*
 * Private to the h2 server transport (rpc_h2.c: listener, loops,
 * connections, lifecycle; rpc_h2_stream.c: nghttp2 callbacks, request
 * checks, answers). Threads and ownership: rpc_h2.c's header comment.
 */
#ifndef KMS_RPC_H2_INTERNAL_H
#define KMS_RPC_H2_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

#include "rpc_internal.h"

#define H2_TICK_MS 100           /* housekeeping: timeouts, idle, age */
#define H2_MAX_AGE_GRACE_MS 10000 /* like the gRPC transport's MAX_AGE_GRACE_MS */
#define H2_MAX_HEADER_BYTES 8192  /* like GRPC_ARG_MAX_METADATA_SIZE there */
#define H2_READ_CHUNK 16384

struct h2_loop;

struct h2_conn {
    struct h2_loop *loop;
    int fd;
    SSL *ssl;            /* NULL for plaintext */
    nghttp2_session *h2; /* NULL until the TLS handshake is done */
    char peer[96];       /* "ipv4:a.b.c.d:port" */
    uint64_t born_ms, idle_since_ms;
    bool ready;          /* client SETTINGS received */
    bool dead;           /* closed; waits for refs to drop */
    bool want_out;       /* EPOLLOUT registered */
    bool goaway;         /* GOAWAY sent (max age) */
    bool eof;            /* the client closed its side: answer what is open, then close */
    unsigned streams;    /* open request streams */
    unsigned refs;       /* calls that still point here */
    struct h2_stream *slist; /* streams with user data (freed at close: nghttp2's
                              * session_del calls no stream-close callback) */
    uint8_t *obuf;       /* output not yet written (one TLS record per flush) */
    size_t olen, ooff, ocap;
    struct h2_conn *prev, *next; /* loop->conns while !dead */
};

struct h2_stream {
    int32_t id;
    struct h2_stream *prev, *next; /* conn->slist */
    struct kms_rpc_call *call; /* while unanswered; never dereferenced after */
    char path[128];
    bool path_set, bad_type, bad_method, compressed_hdr, too_big, answered;
    size_t hdr_bytes;
    int64_t timeout_ms; /* grpc-timeout; -1 none */
    uint8_t *buf;       /* 5-byte prefix + message, up to 5 + max_message */
    size_t len;
    uint8_t *out;       /* answer body (gRPC frame), owned */
    size_t outlen, outoff;
    int status;
    char *details;      /* owned, percent-encoded */
};

struct h2_loop {
    struct kms_rpc_server *srv;
    pthread_t th;
    bool started;
    int ep, evfd;
    bool lfd_in;                 /* listener in this loop's epoll set */
    struct h2_conn *conns;
    struct h2_conn *grave;       /* closed, unreferenced: freed after the batch */
    pthread_mutex_t qmu;
    struct kms_rpc_call *q, *q_tail; /* calls to answer, under qmu */
};

struct rpc_h2 {
    int lfd;
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    struct h2_loop *loops;
    unsigned n_loops;
    atomic_bool quit;
    SSL_CTX *ctx; /* under srv->tls_mu */
};

/* rpc_h2_stream.c. Installs the server session callbacks (the connection
 * is the session's user data). */
void rpc_h2_callbacks_init(nghttp2_session_callbacks *cb);

/* rpc_h2_stream.c. Submits the answer of stream st (status, details,
 * body: set by the caller) on session s. Loop thread. */
void rpc_h2_stream_answer(nghttp2_session *s, struct h2_stream *st);

/* rpc_h2_stream.c. Unlinks st from c->slist and frees it. Loop thread. */
void rpc_h2_stream_free(struct h2_conn *c, struct h2_stream *st);

/* rpc_h2_stream.c. grpc-message percent-encoding; malloc'd, NULL when out
 * of memory. Any thread. */
char *rpc_h2_pct_encode(const char *s);

/* rpc_h2_tls.c. A new SSL_CTX from srv's files (TLS 1.3 floor unless
 * allow_tls12, ALPN h2, no tickets); NULL with err set. Any thread. */
SSL_CTX *rpc_h2_ctx_build(struct kms_rpc_server *srv, struct kms_err *err);

/* rpc_h2_tls.c. The context for the next handshake, with a reference for
 * the caller; applies a pending reload first. Loop threads. */
SSL_CTX *rpc_h2_ctx_get(struct kms_rpc_server *srv);

/* rpc_h2_stream.c. Writes the answers queued on l (rpc_h2_call_send). Loop
 * thread, or the stopping thread once the loop is gone. */
void rpc_h2_loop_drain(struct h2_loop *l);

/* rpc_h2.c. The loop the calling thread runs; NULL on any other thread. */
struct h2_loop *rpc_h2_loop_self(void);

/* rpc_h2.c. Sends what nghttp2 has for c, closes c when it is done; updates
 * its epoll interest. Loop thread. */
void rpc_h2_conn_flush(struct h2_conn *c);

/* rpc_h2.c. Drops a call's reference on c; frees a closed c with none
 * left (after the loop's current batch). Loop thread. */
void rpc_h2_conn_unref(struct h2_conn *c);

#endif /* KMS_RPC_H2_INTERNAL_H */
