/*
 * Unary gRPC server over the gRPC C core async API.
 *
 * Each worker thread owns one completion queue registered with the server.
 * For every (method, queue) pair SLOTS_PER_METHOD requests are armed with
 * grpc_server_request_registered_call (payload read by gRPC). When a request
 * completes, its data moves into a fresh `struct kms_rpc_call`, the slot is
 * re-armed at once (so a handler that parks a call does not block accepting
 * the next), and the handler runs on the worker. kms_rpc_call_finish() starts
 * one batch (initial metadata, message, status, close) tagged with the call;
 * the worker that sees it complete releases the gRPC side of the call.
 *
 * Tags: every tag points to a struct whose first member is `enum tag_kind`.
 *
 * Call lifetime: a kms_rpc_call holds two references, one for the handler
 * (dropped by kms_rpc_call_finish) and one for gRPC (dropped when the finish
 * batch completes on a worker, together with the grpc_call and the server's
 * live count). The call can be finished by its handler or, while the server
 * stops, by the server itself (UNAVAILABLE); whoever comes first sends the
 * status, the handler's later kms_rpc_call_finish only drops its reference.
 * So a handler parked on another thread never holds a stop up, and the call
 * shell it still points to stays valid (it never reaches back into the
 * server once the server has finished it).
 *
 * Stop, in this order (kms_rpc_server_stop):
 *  1. stop accepting: the listening socket is shut down by us (gRPC 1.51 has
 *     no call for it; see close_listeners) - new connections are refused;
 *  2. admitted work: connections already accepted still deliver their call
 *     and every open call may finish normally, until no call is open and
 *     none arrived for QUIET_MS, bounded by grace_ms;
 *  3. calls still open are finished by the server with UNAVAILABLE, and any
 *     call that still arrives is answered UNAVAILABLE without a handler;
 *  4. only then grpc_server_shutdown_and_notify() (GOAWAY); when the finish
 *     batches have not all completed within SHUTDOWN_WAIT_MS,
 *     grpc_server_cancel_all_calls(); destroy, join the workers.
 * Calls that arrive after step 4 on an already accepted connection are
 * failed by gRPC itself with CANCELLED, which is why step 2 waits for a
 * quiet period first.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "kms_connlimit.h"
#include "kms_log.h"
#include "kms_tsan.h"
#include "kms_rpc.h"
#include "rpc_internal.h"

#define SLOTS_PER_METHOD 4
#define MAX_METHODS 64
#define MAX_WORKERS 256
#define DEFAULT_MAX_MESSAGE (4u * 1024u * 1024u)
#define QUIET_MS 250          /* stop: no new call for this long = accepted ones are in */
#define SHUTDOWN_WAIT_MS 1000 /* stop: finish batches, before cancel_all_calls */
/* Limit defaults (kms_rpc_server_config; docs/security.md "Limits"). */
#define DEFAULT_MAX_CONNS 1024
#define DEFAULT_MAX_CONNS_PER_ADDR 64
#define DEFAULT_HANDSHAKE_MS 10000
#define DEFAULT_MAX_STREAMS 16
#define DEFAULT_MEMORY_QUOTA (64u * 1024u * 1024u)
#define DEFAULT_MAX_IDLE_MS (5u * 60u * 1000u)
#define DEFAULT_MAX_AGE_MS (30u * 60u * 1000u)
#define MAX_AGE_GRACE_MS 10000   /* calls in flight when max age hits may finish */
#define KEEPALIVE_TIME_MS 120000 /* server pings an idle peer to find dead ones */
#define KEEPALIVE_TIMEOUT_MS 20000
#define MAX_METADATA_BYTES 8192

enum tag_kind { TAG_REQUEST = 1, TAG_FINISH, TAG_SHUTDOWN };

enum srv_state { ST_CREATED, ST_RUNNING, ST_STOPPED };

struct method {
    char *path;
    kms_rpc_handler_fn fn;
    void *arg;
    void *handle; /* grpc_server_register_method() */
};

struct slot {
    enum tag_kind kind; /* TAG_REQUEST; first member */
    struct kms_rpc_server *srv;
    bool generic;               /* unregistered methods: UNIMPLEMENTED */
    grpc_call_details details;  /* generic only */
    unsigned method;
    unsigned cq;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
};

struct kms_rpc_call {
    enum tag_kind kind; /* TAG_FINISH; first member */
    struct kms_rpc_server *srv; /* used only while the gRPC side is live */
    grpc_call *call;
    char method[128];
    char *peer;
    char *cn;
    char *cert_pem;
    gpr_timespec deadline; /* monotonic */
    size_t max_message;
    atomic_int refs;       /* handler + gRPC side */
    atomic_bool finished;  /* status sent (by the handler or the server) */
    bool by_server;        /* finished by the server while stopping */
    struct kms_rpc_call *prev, *next; /* srv->calls, under srv->mu */
    /* batch state */
    grpc_byte_buffer *send;
    grpc_slice details;
    bool has_details;
    int cancelled;
};

struct kms_rpc_server {
    /* configuration (owned copies) */
    char *listen;
    enum kms_rpc_mode mode;
    char *cert_file, *key_file, *ca_file;
    unsigned workers;
    size_t max_message;
    bool allow_tls12;
    struct kms_connlimit conn_limit;
    unsigned handshake_timeout_ms, max_streams, max_idle_ms, max_age_ms;
    size_t memory_quota;
    grpc_resource_quota *quota; /* one reference, released at destroy */
    bool limit_registered;      /* port registered with kms_connlimit */

    struct method methods[MAX_METHODS];
    unsigned n_methods;

    grpc_server *server;
    grpc_completion_queue **cqs;
    pthread_t *threads;
    unsigned n_threads;
    struct slot *slots;
    size_t n_slots;
    int port;

    /* TLS material for the certificate-config fetcher */
    pthread_mutex_t tls_mu;
    atomic_bool reload;
    atomic_bool tls_given; /* the fetcher returned an initial config */

    struct { enum tag_kind kind; } shutdown_tag;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    enum srv_state state;
    bool shutdown_done;
    size_t live_calls;          /* calls whose gRPC side is live (finish batch pending) */
    size_t open_calls;          /* calls not finished yet */
    struct kms_rpc_call *calls; /* every call with a live gRPC side */
    bool refusing;              /* stop step 3: new calls get UNAVAILABLE */
    struct timespec last_call;  /* CLOCK_MONOTONIC of the last call's arrival */
};

static char *xstrdup(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

/* ---- TLS ------------------------------------------------------------- */

/* Reads cert, key and roots. For server-only TLS without a CA, the server's
 * own chain stands in as roots: gRPC 1.51 aborts on NULL pem_root_certs in
 * fetched configs, and they are unused when no client cert is requested. */
static int load_tls(struct kms_rpc_server *srv, char **cert, char **key, char **roots,
                    struct kms_err *err)
{
    int rc;
    *cert = *key = *roots = NULL;
    if ((rc = kms_rpc_read_pem(srv->cert_file, "certificate", cert, err)) != 0 ||
        (rc = kms_rpc_read_pem(srv->key_file, "private key", key, err)) != 0) {
        goto fail;
    }
    if (srv->ca_file != NULL) {
        if ((rc = kms_rpc_read_pem(srv->ca_file, "CA", roots, err)) != 0) {
            goto fail;
        }
    } else if ((*roots = strdup(*cert)) == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = kms_rpc_check_tls(*cert, *key, srv->ca_file != NULL ? *roots : NULL, err)) != 0) {
        rc = kms_err_wrap(err, rc, "%s / %s", srv->cert_file, srv->key_file);
        goto fail;
    }
    return 0;
fail:
    free(*cert);
    kms_rpc_free_secret(*key);
    free(*roots);
    *cert = *key = *roots = NULL;
    return rc;
}

/* gRPC 1.51 calls this at every handshake. */
static grpc_ssl_certificate_config_reload_status fetch_cert_config(
    void *user_data, grpc_ssl_server_certificate_config **config)
{
    struct kms_rpc_server *srv = user_data;
    grpc_ssl_certificate_config_reload_status st = GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED;
    char *cert, *key, *roots;
    struct kms_err err;

    *config = NULL;
    if (srv->tls_given && !atomic_load(&srv->reload)) {
        return st;
    }
    pthread_mutex_lock(&srv->tls_mu);
    if (!srv->tls_given || atomic_exchange(&srv->reload, false)) {
        kms_err_clear(&err);
        if (load_tls(srv, &cert, &key, &roots, &err) != 0) {
            kms_log(KMS_LOG_ERROR, "rpc",
                    srv->tls_given ? "TLS reload failed, keeping the current certificate"
                                   : "cannot load TLS certificate",
                    "addr", srv->listen, "error", err.msg, NULL);
            st = srv->tls_given ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED
                                : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
        } else {
            grpc_ssl_pem_key_cert_pair pair = {key, cert};
            *config = grpc_ssl_server_certificate_config_create(roots, &pair, 1);
            kms_rpc_free_secret(key);
            free(cert);
            free(roots);
            if (*config == NULL) {
                st = srv->tls_given ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED
                                    : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
            } else {
                if (srv->tls_given) {
                    kms_log(KMS_LOG_INFO, "rpc", "TLS certificate reloaded", "addr",
                            srv->listen, NULL);
                }
                srv->tls_given = true;
                st = GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_NEW;
            }
        }
    }
    pthread_mutex_unlock(&srv->tls_mu);
    return st;
}

void kms_rpc_server_reload_tls(struct kms_rpc_server *srv)
{
    if (srv != NULL && srv->mode != KMS_RPC_INSECURE) {
        atomic_store(&srv->reload, true);
    }
}

/* ---- calls ----------------------------------------------------------- */

/* Drops one reference; the last one frees the shell. Touches no server. */
static void call_unref(struct kms_rpc_call *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1) {
        return;
    }
    free(c->peer);
    free(c->cn);
    free(c->cert_pem);
    free(c);
}

/* The gRPC side is over (finish batch completed, or never started): release
 * the gRPC objects and the server's accounting, then the gRPC reference. */
static void call_grpc_done(struct kms_rpc_call *c)
{
    struct kms_rpc_server *srv = c->srv;
    if (c->send != NULL) {
        grpc_byte_buffer_destroy(c->send);
        c->send = NULL;
    }
    if (c->has_details) {
        grpc_slice_unref(c->details);
        c->has_details = false;
    }
    if (c->call != NULL) {
        grpc_call_unref(c->call);
        c->call = NULL;
    }
    pthread_mutex_lock(&srv->mu);
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else if (srv->calls == c) {
        srv->calls = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    c->prev = c->next = NULL;
    c->srv = NULL;
    srv->live_calls--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
    call_unref(c);
}

static char *auth_prop(grpc_auth_context *ctx, const char *name)
{
    grpc_auth_property_iterator it = grpc_auth_context_find_properties_by_name(ctx, name);
    const grpc_auth_property *p = grpc_auth_property_iterator_next(&it);
    char *s;
    if (p == NULL || p->value == NULL) {
        return NULL;
    }
    s = malloc(p->value_length + 1);
    if (s != NULL) {
        memcpy(s, p->value, p->value_length);
        s[p->value_length] = '\0';
    }
    return s;
}

/* Sends the status (and message). The caller won the `finished` exchange,
 * so the gRPC side is live and c->srv valid. */
static void call_send(struct kms_rpc_call *c, int grpc_status, const char *details,
                      const uint8_t *resp, size_t resplen)
{
    grpc_op ops[4];
    size_t n = 0;
    grpc_call_error ce;
    grpc_call *gcall;
    struct kms_rpc_server *srv = c->srv;

    pthread_mutex_lock(&srv->mu);
    srv->open_calls--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
    if (grpc_status == GRPC_STATUS_OK && resp != NULL && resplen > c->max_message) {
        grpc_status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        details = "response larger than the maximum message size";
    }
    memset(ops, 0, sizeof(ops));
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = 0;
    n++;
    if (grpc_status == GRPC_STATUS_OK) {
        grpc_slice s = grpc_slice_from_copied_buffer((const char *)resp, resplen);
        c->send = grpc_raw_byte_buffer_create(&s, 1);
        grpc_slice_unref(s);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->send;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = (grpc_status_code)grpc_status;
    if (details != NULL && details[0] != '\0') {
        c->details = grpc_slice_from_copied_string(details);
        c->has_details = true;
        ops[n].data.send_status_from_server.status_details = &c->details;
    }
    n++;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n].data.recv_close_on_server.cancelled = &c->cancelled;
    n++;
    /* Once the batch is started a worker may complete it and clear
     * c->call: read it before. */
    gcall = c->call;
    KMS_TSAN_RELEASE(c);
    ce = grpc_call_start_batch(gcall, ops, n, c, NULL);
    if (ce != GRPC_CALL_OK) {
        kms_logf(KMS_LOG_ERROR, "rpc", "grpc_call_start_batch failed: %d", (int)ce);
        grpc_call_cancel(gcall, NULL);
        call_grpc_done(c);
    }
}

void kms_rpc_call_finish(struct kms_rpc_call *c, int grpc_status, const char *details,
                         const uint8_t *resp, size_t resplen)
{
    if (atomic_exchange(&c->finished, true)) {
        if (!c->by_server) {
            kms_log(KMS_LOG_ERROR, "rpc", "kms_rpc_call_finish called twice", "method",
                    c->method, NULL);
            return;
        }
        /* The server answered UNAVAILABLE while stopping: drop the
         * handler's reference only. */
        call_unref(c);
        return;
    }
    call_send(c, grpc_status, details, resp, resplen);
    call_unref(c);
}

bool kms_rpc_call_done(const struct kms_rpc_call *c)
{
    return atomic_load(&c->finished);
}

/* Stop step 3: the server finishes every open call with UNAVAILABLE and
 * refuses calls that still arrive. Returns how many it finished. */
static size_t calls_abort(struct kms_rpc_server *srv)
{
    size_t n = 0;
    pthread_mutex_lock(&srv->mu);
    srv->refusing = true;
    for (;;) {
        struct kms_rpc_call *c;
        for (c = srv->calls; c != NULL; c = c->next) {
            if (!atomic_load(&c->finished)) {
                break;
            }
        }
        if (c == NULL) {
            break;
        }
        /* by_server is written before the exchange publishes `finished`;
         * the handler reads it only after seeing finished == true. */
        c->by_server = true;
        if (atomic_exchange(&c->finished, true)) {
            c->by_server = false; /* the handler won the race */
            continue;
        }
        pthread_mutex_unlock(&srv->mu);
        call_send(c, GRPC_STATUS_UNAVAILABLE, "server is closing this listener; retry", NULL,
                  0);
        n++;
        pthread_mutex_lock(&srv->mu);
    }
    pthread_mutex_unlock(&srv->mu);
    return n;
}

const char *kms_rpc_call_method(const struct kms_rpc_call *c)
{
    return c->method;
}

const char *kms_rpc_call_peer(const struct kms_rpc_call *c)
{
    return c->peer != NULL ? c->peer : "unknown";
}

int kms_rpc_call_peer_ip(const struct kms_rpc_call *c, uint8_t ip[16], size_t *iplen)
{
    char host[128];
    const char *p = c->peer;
    const char *start, *end;
    size_t n;

    if (p == NULL) {
        return KMS_ENOTFOUND;
    }
    if (strncmp(p, "ipv4:", 5) == 0) {
        start = p + 5;
        end = strrchr(start, ':');
        if (end == NULL) {
            end = start + strlen(start);
        }
    } else if (strncmp(p, "ipv6:", 5) == 0) {
        start = p + 5;
        if (start[0] == '[') {
            start++;
            end = strchr(start, ']');
        } else if (strncmp(start, "%5B", 3) == 0 || strncmp(start, "%5b", 3) == 0) {
            start += 3;
            end = strstr(start, "%5D");
            if (end == NULL) {
                end = strstr(start, "%5d");
            }
        } else {
            end = strrchr(start, ':');
        }
        if (end == NULL) {
            return KMS_ENOTFOUND;
        }
    } else {
        return KMS_ENOTFOUND;
    }
    n = (size_t)(end - start);
    if (n == 0 || n >= sizeof(host)) {
        return KMS_ENOTFOUND;
    }
    memcpy(host, start, n);
    host[n] = '\0';
    {
        char *pct = strchr(host, '%'); /* zone id: fe80::1%eth0 or %25eth0 */
        if (pct != NULL) {
            *pct = '\0';
        }
    }
    if (inet_pton(AF_INET, host, ip) == 1) {
        *iplen = 4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, ip) == 1) {
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(ip, mapped, 12) == 0) {
            memmove(ip, ip + 12, 4);
            *iplen = 4;
        } else {
            *iplen = 16;
        }
        return 0;
    }
    return KMS_ENOTFOUND;
}

const char *kms_rpc_call_peer_cn(const struct kms_rpc_call *c)
{
    return c->cn;
}

const char *kms_rpc_call_peer_cert_pem(const struct kms_rpc_call *c)
{
    return c->cert_pem;
}

uint64_t kms_rpc_call_deadline_ms(const struct kms_rpc_call *c)
{
    gpr_timespec now, left;
    int64_t ms;
    if (c->deadline.tv_sec == INT64_MAX) {
        return UINT64_MAX;
    }
    now = gpr_now(GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(c->deadline, now) <= 0) {
        return 0;
    }
    left = gpr_time_sub(c->deadline, now);
    ms = gpr_time_to_millis(left);
    return ms < 0 ? 0 : (uint64_t)ms;
}

/* ---- request slots and workers ---------------------------------------- */

static void arm(struct slot *s)
{
    struct kms_rpc_server *srv = s->srv;
    grpc_call_error ce;
    s->call = NULL;
    s->payload = NULL;
    grpc_metadata_array_init(&s->md);
    KMS_TSAN_RELEASE(s);
    if (s->generic) {
        grpc_call_details_init(&s->details);
        ce = grpc_server_request_call(srv->server, &s->call, &s->details, &s->md,
                                      srv->cqs[s->cq], srv->cqs[s->cq], s);
    } else {
        ce = grpc_server_request_registered_call(srv->server, srv->methods[s->method].handle,
                                                 &s->call, &s->deadline, &s->md, &s->payload,
                                                 srv->cqs[s->cq], srv->cqs[s->cq], s);
    }
    if (ce != GRPC_CALL_OK) {
        /* Only after shutdown began. */
        grpc_metadata_array_destroy(&s->md);
        if (s->generic) {
            grpc_call_details_destroy(&s->details);
        }
        s->kind = 0;
    }
}

static void on_request(struct slot *s, bool ok)
{
    struct kms_rpc_server *srv = s->srv;
    struct method *m = s->generic ? NULL : &srv->methods[s->method];
    struct kms_rpc_call *c;
    grpc_byte_buffer *payload = s->payload;
    grpc_call *call = s->call;
    gpr_timespec deadline = s->generic ? s->details.deadline : s->deadline;
    uint8_t *req = NULL;
    size_t reqlen = 0;
    bool refusing;

    grpc_metadata_array_destroy(&s->md);
    if (s->generic) {
        grpc_call_details_destroy(&s->details);
    }
    if (!ok) {
        /* Server shutting down: the slot is dead. */
        s->kind = 0;
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        if (call != NULL) {
            grpc_call_unref(call);
        }
        return;
    }
    pthread_mutex_lock(&srv->mu);
    srv->live_calls++;
    pthread_mutex_unlock(&srv->mu);
    /* Re-arm even while stopping: calls that reach the server between
     * grpc_server_shutdown_and_notify() and the GOAWAY would otherwise sit
     * unmatched and be failed with CANCELLED instead of being served in the
     * grace period. After shutdown the request fails with ok=false. */
    arm(s);

    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
                                     NULL);
        grpc_call_unref(call);
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        pthread_mutex_lock(&srv->mu);
        srv->live_calls--;
        pthread_cond_broadcast(&srv->cv);
        pthread_mutex_unlock(&srv->mu);
        return;
    }
    c->kind = TAG_FINISH;
    c->srv = srv;
    c->call = call;
    snprintf(c->method, sizeof(c->method), "%s", m != NULL ? m->path : "(unregistered)");
    c->max_message = srv->max_message;
    atomic_init(&c->refs, 2);
    atomic_init(&c->finished, false);
    c->peer = NULL;
    {
        char *p = grpc_call_get_peer(call);
        if (p != NULL) {
            c->peer = strdup(p);
            gpr_free(p);
        }
    }
    c->deadline = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
    if (deadline.tv_sec == INT64_MAX) {
        c->deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    }
    if (srv->mode == KMS_RPC_MTLS) {
        grpc_auth_context *ctx = grpc_call_auth_context(call);
        if (ctx != NULL) {
            if (grpc_auth_context_peer_is_authenticated(ctx)) {
                c->cn = auth_prop(ctx, GRPC_X509_CN_PROPERTY_NAME);
                c->cert_pem = auth_prop(ctx, GRPC_X509_PEM_CERT_PROPERTY_NAME);
            }
            grpc_auth_context_release(ctx);
        }
    }

    pthread_mutex_lock(&srv->mu);
    c->next = srv->calls;
    if (srv->calls != NULL) {
        srv->calls->prev = c;
    }
    srv->calls = c;
    srv->open_calls++;
    clock_gettime(CLOCK_MONOTONIC, &srv->last_call);
    refusing = srv->refusing;
    pthread_mutex_unlock(&srv->mu);

    if (refusing) {
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        kms_rpc_call_finish(c, GRPC_STATUS_UNAVAILABLE, "server is closing this listener; retry",
                            NULL, 0);
        return;
    }
    if (m == NULL) {
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        kms_rpc_call_finish(c, GRPC_STATUS_UNIMPLEMENTED, "unknown method", NULL, 0);
        return;
    }
    if (payload == NULL) {
        /* No message: the client half-closed without one, or gRPC already
         * failed the call (e.g. over the size limit). */
        kms_rpc_call_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "missing request message", NULL, 0);
        return;
    }
    {
        grpc_byte_buffer_reader rd;
        grpc_slice all;
        if (!grpc_byte_buffer_reader_init(&rd, payload)) {
            grpc_byte_buffer_destroy(payload);
            kms_rpc_call_finish(c, GRPC_STATUS_INTERNAL, "cannot read request", NULL, 0);
            return;
        }
        all = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
        grpc_byte_buffer_destroy(payload);
        reqlen = GRPC_SLICE_LENGTH(all);
        req = malloc(reqlen > 0 ? reqlen : 1);
        if (req == NULL) {
            grpc_slice_unref(all);
            kms_rpc_call_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
            return;
        }
        memcpy(req, GRPC_SLICE_START_PTR(all), reqlen);
        /* Requests may hold secrets (Seal data). */
        memset(GRPC_SLICE_START_PTR(all), 0, reqlen);
        grpc_slice_unref(all);
    }
    m->fn(m->arg, c, req, reqlen);
    memset(req, 0, reqlen);
    free(req);
}

static void *worker_main(void *arg)
{
    struct kms_rpc_server *srv = ((void **)arg)[0];
    grpc_completion_queue *cq = ((void **)arg)[1];
    free(arg);

    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            break;
        }
        if (ev.type != GRPC_OP_COMPLETE || ev.tag == NULL) {
            continue;
        }
        KMS_TSAN_ACQUIRE(ev.tag);
        switch (*(enum tag_kind *)ev.tag) {
        case TAG_REQUEST:
            on_request(ev.tag, ev.success != 0);
            break;
        case TAG_FINISH:
            call_grpc_done(ev.tag);
            break;
        case TAG_SHUTDOWN:
            pthread_mutex_lock(&srv->mu);
            srv->shutdown_done = true;
            pthread_cond_broadcast(&srv->cv);
            pthread_mutex_unlock(&srv->mu);
            break;
        default:
            break;
        }
    }
    return NULL;
}

/* ---- lifecycle -------------------------------------------------------- */

int kms_rpc_server_create(const struct kms_rpc_server_config *cfg,
                          struct kms_rpc_server **out, struct kms_err *err)
{
    struct kms_rpc_server *srv;
    int rc;

    *out = NULL;
    if (cfg == NULL || cfg->listen == NULL || cfg->listen[0] == '\0') {
        return kms_err_set(err, KMS_EINVAL, "rpc server: no listen address");
    }
    if (cfg->mode != KMS_RPC_TLS && cfg->mode != KMS_RPC_MTLS && cfg->mode != KMS_RPC_INSECURE) {
        return kms_err_set(err, KMS_EINVAL, "rpc server: bad mode %d", (int)cfg->mode);
    }
    if (cfg->mode == KMS_RPC_MTLS && (cfg->ca_file == NULL || cfg->ca_file[0] == '\0')) {
        return kms_err_set(err, KMS_ECONFIG, "rpc server %s: mutual TLS needs a CA file",
                           cfg->listen);
    }
    if (cfg->mode != KMS_RPC_INSECURE &&
        (cfg->cert_file == NULL || cfg->key_file == NULL)) {
        return kms_err_set(err, KMS_ECONFIG, "rpc server %s: TLS needs a certificate and a key",
                           cfg->listen);
    }
    srv = calloc(1, sizeof(*srv));
    if (srv == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    srv->listen = xstrdup(cfg->listen);
    srv->mode = cfg->mode;
    if (cfg->mode != KMS_RPC_INSECURE) {
        srv->cert_file = xstrdup(cfg->cert_file);
        srv->key_file = xstrdup(cfg->key_file);
        if (cfg->ca_file != NULL && cfg->ca_file[0] != '\0') {
            srv->ca_file = xstrdup(cfg->ca_file);
        }
    }
    srv->allow_tls12 = cfg->allow_tls12;
    srv->workers = cfg->workers;
    if (srv->workers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        srv->workers = n > 0 ? (unsigned)n : 2;
    }
    if (srv->workers > MAX_WORKERS) {
        srv->workers = MAX_WORKERS;
    }
    srv->max_message = cfg->max_message != 0 ? cfg->max_message : DEFAULT_MAX_MESSAGE;
    if (srv->max_message > INT32_MAX) {
        srv->max_message = INT32_MAX;
    }
#define DEF(v, d) ((v) != 0 ? (v) : (d))
    srv->conn_limit.max_total = DEF(cfg->max_conns, DEFAULT_MAX_CONNS);
    srv->conn_limit.max_per_addr = DEF(cfg->max_conns_per_addr, DEFAULT_MAX_CONNS_PER_ADDR);
    srv->conn_limit.max_conn_bytes = cfg->max_conn_bytes;
    srv->conn_limit.ban_after = cfg->ban_after;
    srv->conn_limit.ban_ms = cfg->ban_ms;
    srv->handshake_timeout_ms = DEF(cfg->handshake_timeout_ms, DEFAULT_HANDSHAKE_MS);
    srv->max_streams = DEF(cfg->max_streams, DEFAULT_MAX_STREAMS);
    srv->memory_quota = DEF(cfg->memory_quota, DEFAULT_MEMORY_QUOTA);
    srv->max_idle_ms = DEF(cfg->max_idle_ms, DEFAULT_MAX_IDLE_MS);
    srv->max_age_ms = DEF(cfg->max_age_ms, DEFAULT_MAX_AGE_MS);
#undef DEF
    if (srv->handshake_timeout_ms > INT32_MAX || srv->max_idle_ms > INT32_MAX ||
        srv->max_age_ms > INT32_MAX || srv->max_streams > INT32_MAX) {
        kms_rpc_server_destroy(srv);
        return kms_err_set(err, KMS_EINVAL, "rpc server %s: limit out of range", cfg->listen);
    }
    pthread_mutex_init(&srv->tls_mu, NULL);
    pthread_mutex_init(&srv->mu, NULL);
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&srv->cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    srv->shutdown_tag.kind = TAG_SHUTDOWN;
    srv->state = ST_CREATED;
    if (srv->listen == NULL) {
        kms_rpc_server_destroy(srv);
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    if (srv->mode != KMS_RPC_INSECURE) {
        char *c, *k, *r;
        if ((rc = load_tls(srv, &c, &k, &r, err)) != 0) {
            kms_rpc_server_destroy(srv);
            return kms_err_wrap(err, rc, "rpc server %s", cfg->listen);
        }
        free(c);
        kms_rpc_free_secret(k);
        free(r);
    }
    *out = srv;
    return 0;
}

int kms_rpc_server_add_method(struct kms_rpc_server *srv, const char *path,
                              kms_rpc_handler_fn fn, void *arg)
{
    if (srv == NULL || path == NULL || path[0] != '/' || fn == NULL ||
        srv->state != ST_CREATED) {
        return KMS_EINVAL;
    }
    if (srv->n_methods >= MAX_METHODS) {
        return KMS_ERANGE;
    }
    for (unsigned i = 0; i < srv->n_methods; i++) {
        if (strcmp(srv->methods[i].path, path) == 0) {
            return KMS_EEXIST;
        }
    }
    if ((srv->methods[srv->n_methods].path = strdup(path)) == NULL) {
        return KMS_ENOMEM;
    }
    srv->methods[srv->n_methods].fn = fn;
    srv->methods[srv->n_methods].arg = arg;
    srv->n_methods++;
    return 0;
}

/* gRPC 1.51 has no C API for a per-server TLS version floor (the process
 * policy from kms_rpc_global_init is the only knob), but its credentials
 * object has one: grpc_ssl_server_credentials::set_min_tls_version, an
 * exported non-virtual member (Itanium ABI: `this` first). Only static
 * credentials honour it: with a certificate-config fetcher, every config
 * the fetcher returns builds an SSL_CTX with the default versions. So a
 * server that must stay TLS 1.3-only while the process allows 1.2
 * (talos.tls12) gets static credentials, and its owner reloads it by
 * rebuilding it (kms_rpc_server_reload_needs_rebuild).
 * tests/integration/test_adv_hygiene.py checks both ports with s_client. */
extern void _ZN27grpc_ssl_server_credentials19set_min_tls_versionE16grpc_tls_version(
    grpc_server_credentials *self, grpc_tls_version v);

static bool needs_static_tls(const struct kms_rpc_server *srv)
{
    return srv->mode != KMS_RPC_INSECURE && !srv->allow_tls12 && kms_rpc_tls12_allowed();
}

bool kms_rpc_server_reload_needs_rebuild(const struct kms_rpc_server *srv)
{
    return srv != NULL && needs_static_tls(srv);
}

static grpc_server_credentials *make_creds(struct kms_rpc_server *srv)
{
    grpc_ssl_server_credentials_options *opts;
    grpc_server_credentials *creds = NULL;
    grpc_ssl_client_certificate_request_type req =
        srv->mode == KMS_RPC_MTLS ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    if (srv->mode == KMS_RPC_INSECURE) {
        return grpc_insecure_server_credentials_create();
    }
    if (needs_static_tls(srv)) {
        char *cert, *key, *roots;
        struct kms_err err;
        kms_err_clear(&err);
        if (load_tls(srv, &cert, &key, &roots, &err) != 0) {
            kms_log(KMS_LOG_ERROR, "rpc", "cannot load TLS certificate", "addr", srv->listen,
                    "error", err.msg, NULL);
            return NULL;
        }
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_server_credentials_create_ex(roots, &pair, 1, req, NULL);
        kms_rpc_free_secret(key);
        free(cert);
        free(roots);
        if (creds != NULL) {
            _ZN27grpc_ssl_server_credentials19set_min_tls_versionE16grpc_tls_version(creds,
                                                                                    TLS1_3);
        }
        return creds;
    }
    opts = grpc_ssl_server_credentials_create_options_using_config_fetcher(req, fetch_cert_config,
                                                                           srv);
    if (opts == NULL) {
        return NULL;
    }
    return grpc_ssl_server_credentials_create_with_options(opts); /* takes opts */
}

static void arg_int(grpc_arg *a, const char *key, int v)
{
    a->type = GRPC_ARG_INTEGER;
    a->key = (char *)key;
    a->value.integer = v;
}

int kms_rpc_server_start(struct kms_rpc_server *srv, struct kms_err *err)
{
    grpc_arg args[16];
    grpc_channel_args cargs;
    grpc_server_credentials *creds;
    size_t na = 0;
    int rc;

    if (srv == NULL || srv->state != ST_CREATED) {
        return kms_err_set(err, KMS_EINVAL, "rpc server: already started");
    }
    arg_int(&args[na++], GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, (int)srv->max_message);
    arg_int(&args[na++], GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, (int)srv->max_message);
    /* No SO_REUSEPORT: a second process on the same port must fail to bind
     * instead of silently sharing the traffic. */
    arg_int(&args[na++], GRPC_ARG_ALLOW_REUSEPORT, 0);
    /* Few streams per connection: unary calls, one or two at a time. */
    arg_int(&args[na++], GRPC_ARG_MAX_CONCURRENT_STREAMS, (int)srv->max_streams);
    /* Identity only: gRPC 1.51 inflates a compressed message before the
     * size limit applies; with gzip/deflate disabled a request that names
     * them is failed UNIMPLEMENTED from its headers, never inflated (see
     * tests/integration/test_adv_net.py). */
    arg_int(&args[na++], GRPC_COMPRESSION_CHANNEL_ENABLED_ALGORITHMS_BITSET, 1);
    arg_int(&args[na++], GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS, (int)srv->handshake_timeout_ms);
    arg_int(&args[na++], GRPC_ARG_MAX_CONNECTION_IDLE_MS, (int)srv->max_idle_ms);
    arg_int(&args[na++], GRPC_ARG_MAX_CONNECTION_AGE_MS, (int)srv->max_age_ms);
    arg_int(&args[na++], GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, MAX_AGE_GRACE_MS);
    arg_int(&args[na++], GRPC_ARG_KEEPALIVE_TIME_MS, KEEPALIVE_TIME_MS);
    arg_int(&args[na++], GRPC_ARG_KEEPALIVE_TIMEOUT_MS, KEEPALIVE_TIMEOUT_MS);
    arg_int(&args[na++], GRPC_ARG_MAX_METADATA_SIZE, MAX_METADATA_BYTES);
    /* Memory bound for transport buffers of all connections of this
     * server; under pressure gRPC shrinks read buffers and refuses new
     * streams' memory instead of growing. */
    srv->quota = grpc_resource_quota_create(srv->listen);
    if (srv->quota == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "rpc server: cannot create resource quota");
    }
    grpc_resource_quota_resize(srv->quota, srv->memory_quota);
    args[na].type = GRPC_ARG_POINTER;
    args[na].key = (char *)GRPC_ARG_RESOURCE_QUOTA;
    args[na].value.pointer.p = srv->quota;
    args[na].value.pointer.vtable = grpc_resource_quota_arg_vtable();
    na++;
    cargs.num_args = na;
    cargs.args = args;

    srv->server = grpc_server_create(&cargs, NULL);
    if (srv->server == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "rpc server: grpc_server_create failed");
    }
    for (unsigned i = 0; i < srv->n_methods; i++) {
        srv->methods[i].handle = grpc_server_register_method(
            srv->server, srv->methods[i].path, NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        if (srv->methods[i].handle == NULL) {
            return kms_err_set(err, KMS_EINVAL, "rpc server: cannot register %s",
                               srv->methods[i].path);
        }
    }
    srv->cqs = calloc(srv->workers, sizeof(*srv->cqs));
    srv->threads = calloc(srv->workers, sizeof(*srv->threads));
    srv->n_slots = (size_t)srv->workers * (srv->n_methods * SLOTS_PER_METHOD + 1);
    srv->slots = calloc(srv->n_slots > 0 ? srv->n_slots : 1, sizeof(*srv->slots));
    if (srv->cqs == NULL || srv->threads == NULL || srv->slots == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    for (unsigned i = 0; i < srv->workers; i++) {
        srv->cqs[i] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(srv->server, srv->cqs[i], NULL);
    }
    creds = make_creds(srv);
    if (creds == NULL) {
        return kms_err_set(err, KMS_ETLS, "rpc server %s: cannot create credentials",
                           srv->listen);
    }
    srv->port = grpc_server_add_http2_port(srv->server, srv->listen, creds);
    grpc_server_credentials_release(creds);
    if (srv->port == 0) {
        return kms_err_set(err, KMS_EIO,
                           "cannot listen on %s (address in use, not local, or invalid%s)",
                           srv->listen, srv->mode != KMS_RPC_INSECURE ? ", or TLS material unusable" : "");
    }
    /* Caps apply from the first accept (grpc_server_start arms it). A unix
     * socket ("unix:PATH", kmsd-k8s-plugin) has no TCP port to filter: its
     * access control is the socket file's mode. */
    if (strncmp(srv->listen, "unix:", 5) != 0) {
        if ((rc = kms_connlimit_register(srv->port, &srv->conn_limit, err)) != 0) {
            return kms_err_wrap(err, rc, "rpc server %s", srv->listen);
        }
        srv->limit_registered = true;
    }
    grpc_server_start(srv->server);
    pthread_mutex_lock(&srv->mu);
    srv->state = ST_RUNNING;
    pthread_mutex_unlock(&srv->mu);

    for (unsigned w = 0, n = 0; w < srv->workers; w++) {
        for (unsigned m = 0; m < srv->n_methods; m++) {
            for (unsigned j = 0; j < SLOTS_PER_METHOD; j++, n++) {
                struct slot *s = &srv->slots[n];
                s->kind = TAG_REQUEST;
                s->srv = srv;
                s->method = m;
                s->cq = w;
                arm(s);
            }
        }
        srv->slots[n].kind = TAG_REQUEST;
        srv->slots[n].srv = srv;
        srv->slots[n].generic = true;
        srv->slots[n].cq = w;
        arm(&srv->slots[n]);
        n++;
    }
    for (unsigned i = 0; i < srv->workers; i++) {
        void **a = malloc(2 * sizeof(void *));
        if (a == NULL) {
            break;
        }
        a[0] = srv;
        a[1] = srv->cqs[i];
        if (pthread_create(&srv->threads[i], NULL, worker_main, a) != 0) {
            free(a);
            break;
        }
        srv->n_threads++;
    }
    if (srv->n_threads < srv->workers) {
        kms_rpc_server_stop(srv, 0);
        return kms_err_set(err, KMS_ENOMEM, "rpc server %s: cannot start worker threads",
                           srv->listen);
    }
    return 0;
}

int kms_rpc_server_port(const struct kms_rpc_server *srv)
{
    return srv != NULL ? srv->port : 0;
}

int kms_rpc_server_probe(const struct kms_rpc_server *srv, unsigned timeout_ms)
{
    if (srv == NULL || srv->port <= 0 || !srv->limit_registered) {
        return KMS_PROBE_REFUSED;
    }
    return (int)kms_connlimit_probe(srv->listen, srv->port, timeout_ms);
}

void kms_rpc_server_conn_stats(const struct kms_rpc_server *srv,
                               struct kms_connlimit_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (srv != NULL && srv->limit_registered) {
        kms_connlimit_stats(srv->port, out);
    }
}

/* Stop step 1. gRPC 1.51 fails with CANCELLED every call that arrives on an
 * accepted connection after grpc_server_shutdown_and_notify() (a client
 * whose TLS handshake was under way when we stopped), and has no call to
 * stop accepting without that shutdown. Talos opens a new connection per
 * RPC and treats CANCELLED as a failed unseal (next key slot, then a 30 s
 * retry), while a refused connection makes grpc-go fail over to the next
 * address at once. So we shut the listening socket down ourselves (found by
 * port in /proc/self/fd; new connections are refused; gRPC's accept loop
 * sees EINVAL, logs one "Failed accept4" line and deactivates the port) and
 * start gRPC's shutdown only once the accepted connections have delivered
 * their calls. Returns the number of listening sockets shut down. */
static int close_listeners(int port)
{
    DIR *d;
    struct dirent *de;
    int n = 0;

    if (port <= 0 || (d = opendir("/proc/self/fd")) == NULL) {
        return 0;
    }
    while ((de = readdir(d)) != NULL) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd, acc = 0;
        socklen_t al = sizeof(acc);
        char *end;
        long v = strtol(de->d_name, &end, 10);
        if (*end != '\0' || v < 0 || v == dirfd(d)) {
            continue;
        }
        fd = (int)v;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) != 0 || acc != 1 ||
            getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
            continue;
        }
        if ((ss.ss_family == AF_INET &&
             ntohs(((struct sockaddr_in *)&ss)->sin_port) == (uint16_t)port) ||
            (ss.ss_family == AF_INET6 &&
             ntohs(((struct sockaddr_in6 *)&ss)->sin6_port) == (uint16_t)port)) {
            if (shutdown(fd, SHUT_RDWR) == 0) {
                n++;
            }
        }
    }
    closedir(d);
    return n;
}

static void ts_add_ms(struct timespec *t, unsigned ms)
{
    t->tv_sec += ms / 1000;
    t->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}

static bool ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* Caller holds srv->mu. Waits for gRPC's shutdown tag and for every finish
 * batch to complete, until abs (CLOCK_MONOTONIC) or forever (abs NULL). */
static bool wait_grpc_idle(struct kms_rpc_server *srv, const struct timespec *abs)
{
    while (!srv->shutdown_done || srv->live_calls > 0) {
        if (abs == NULL) {
            pthread_cond_wait(&srv->cv, &srv->mu);
        } else if (pthread_cond_timedwait(&srv->cv, &srv->mu, abs) == ETIMEDOUT) {
            return srv->shutdown_done && srv->live_calls == 0;
        }
    }
    return true;
}

/* Stop step 2: caller holds srv->mu. Returns when no call is open and none
 * arrived for QUIET_MS, or at `end` (CLOCK_MONOTONIC). */
static void wait_admitted(struct kms_rpc_server *srv, const struct timespec *end)
{
    for (;;) {
        struct timespec now, quiet_end = srv->last_call, wake;
        clock_gettime(CLOCK_MONOTONIC, &now);
        ts_add_ms(&quiet_end, QUIET_MS);
        if (!ts_before(&now, end) || (srv->open_calls == 0 && !ts_before(&now, &quiet_end))) {
            return;
        }
        wake = srv->open_calls == 0 && ts_before(&quiet_end, end) ? quiet_end : *end;
        (void)pthread_cond_timedwait(&srv->cv, &srv->mu, &wake);
    }
}

void kms_rpc_server_stop(struct kms_rpc_server *srv, unsigned grace_ms)
{
    struct timespec end;
    size_t aborted;
    bool idle;

    if (srv == NULL) {
        return;
    }
    pthread_mutex_lock(&srv->mu);
    if (srv->state != ST_RUNNING) {
        enum srv_state st = srv->state;
        srv->state = ST_STOPPED;
        pthread_mutex_unlock(&srv->mu);
        if (st == ST_CREATED && srv->server != NULL) {
            /* start failed half way: never started, no workers */
            grpc_server_destroy(srv->server);
            srv->server = NULL;
            for (unsigned i = 0; srv->cqs != NULL && i < srv->workers; i++) {
                if (srv->cqs[i] != NULL) {
                    grpc_completion_queue_shutdown(srv->cqs[i]);
                    while (grpc_completion_queue_next(srv->cqs[i],
                                                      gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
                               .type != GRPC_QUEUE_SHUTDOWN) {
                    }
                    grpc_completion_queue_destroy(srv->cqs[i]);
                    srv->cqs[i] = NULL;
                }
            }
        }
        return;
    }
    srv->state = ST_STOPPED;
    /* the quiet period counts from the moment we stop accepting */
    clock_gettime(CLOCK_MONOTONIC, &srv->last_call);
    pthread_mutex_unlock(&srv->mu);

    /* 1. stop accepting */
    (void)close_listeners(srv->port);

    /* 2. admitted connections deliver their call; open calls may finish */
    clock_gettime(CLOCK_MONOTONIC, &end);
    ts_add_ms(&end, grace_ms);
    pthread_mutex_lock(&srv->mu);
    if (grace_ms > 0) {
        wait_admitted(srv, &end);
    }
    pthread_mutex_unlock(&srv->mu);

    /* 3. what is still open gets UNAVAILABLE from us, not CANCELLED */
    aborted = calls_abort(srv);
    if (aborted > 0) {
        kms_logf(KMS_LOG_INFO, "rpc", "stopping %s: answered %zu open call(s) UNAVAILABLE",
                 srv->listen, aborted);
    }

    /* 4. gRPC's own shutdown */
    KMS_TSAN_RELEASE(&srv->shutdown_tag);
    grpc_server_shutdown_and_notify(srv->server, srv->cqs[0], &srv->shutdown_tag);
    clock_gettime(CLOCK_MONOTONIC, &end);
    ts_add_ms(&end, SHUTDOWN_WAIT_MS);
    pthread_mutex_lock(&srv->mu);
    idle = wait_grpc_idle(srv, &end);
    pthread_mutex_unlock(&srv->mu);
    if (!idle) {
        kms_log(KMS_LOG_WARN, "rpc", "shutdown slow, cancelling the remaining calls", "addr",
                srv->listen, NULL);
        grpc_server_cancel_all_calls(srv->server);
        (void)calls_abort(srv); /* calls that arrived after step 3 */
        pthread_mutex_lock(&srv->mu);
        wait_grpc_idle(srv, NULL);
        pthread_mutex_unlock(&srv->mu);
    }
    grpc_server_destroy(srv->server);
    srv->server = NULL;
    if (srv->limit_registered) {
        kms_connlimit_unregister(srv->port);
        srv->limit_registered = false;
    }
    for (unsigned i = 0; i < srv->workers; i++) {
        grpc_completion_queue_shutdown(srv->cqs[i]);
    }
    for (unsigned i = 0; i < srv->n_threads; i++) {
        pthread_join(srv->threads[i], NULL);
    }
    for (unsigned i = 0; i < srv->workers; i++) {
        /* queues whose worker never started still need draining */
        if (i >= srv->n_threads) {
            while (grpc_completion_queue_next(srv->cqs[i], gpr_inf_future(GPR_CLOCK_REALTIME),
                                              NULL)
                       .type != GRPC_QUEUE_SHUTDOWN) {
            }
        }
        grpc_completion_queue_destroy(srv->cqs[i]);
        srv->cqs[i] = NULL;
    }
    srv->n_threads = 0;
}

void kms_rpc_server_destroy(struct kms_rpc_server *srv)
{
    if (srv == NULL) {
        return;
    }
    kms_rpc_server_stop(srv, 0);
    /* The certificate fetcher runs on whichever gRPC thread polls (often
     * another server's worker) and reads srv under tls_mu: take it once so
     * a fetch that was still running has finished before srv goes. */
    pthread_mutex_lock(&srv->tls_mu);
    pthread_mutex_unlock(&srv->tls_mu);
    for (unsigned i = 0; i < srv->n_methods; i++) {
        free(srv->methods[i].path);
    }
    free(srv->cqs);
    free(srv->threads);
    free(srv->slots);
    free(srv->listen);
    free(srv->cert_file);
    free(srv->key_file);
    free(srv->ca_file);
    if (srv->quota != NULL) {
        grpc_resource_quota_unref(srv->quota);
    }
    pthread_mutex_destroy(&srv->tls_mu);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->cv);
    free(srv);
}
