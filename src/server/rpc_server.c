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
 * the worker that sees it complete frees the call.
 *
 * Tags: every tag points to a struct whose first member is `enum tag_kind`.
 *
 * Stop: grpc_server_shutdown_and_notify() closes the listening sockets at
 * once (new connections are refused) and sends GOAWAY to open connections;
 * the shutdown tag arrives when no call is left. After grace_ms we call
 * grpc_server_cancel_all_calls() (clients see UNAVAILABLE), wait for the tag
 * and for every kms_rpc_call to be finished, then shut the queues down and
 * join the workers.
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

#include "kms_log.h"
#include "kms_rpc.h"
#include "rpc_internal.h"

#define SLOTS_PER_METHOD 4
#define MAX_METHODS 64
#define MAX_WORKERS 256
#define DEFAULT_MAX_MESSAGE (4u * 1024u * 1024u)
#define DRAIN_MS 250 /* after closing the listener, before gRPC's shutdown */

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
    struct kms_rpc_server *srv;
    grpc_call *call;
    const char *method;
    char *peer;
    char *cn;
    char *cert_pem;
    gpr_timespec deadline; /* monotonic */
    atomic_bool finished;
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
    size_t live_calls; /* kms_rpc_call objects not yet freed */
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

static void call_free(struct kms_rpc_call *c)
{
    struct kms_rpc_server *srv = c->srv;
    if (c->send != NULL) {
        grpc_byte_buffer_destroy(c->send);
    }
    if (c->has_details) {
        grpc_slice_unref(c->details);
    }
    if (c->call != NULL) {
        grpc_call_unref(c->call);
    }
    free(c->peer);
    free(c->cn);
    free(c->cert_pem);
    free(c);
    pthread_mutex_lock(&srv->mu);
    srv->live_calls--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
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

void kms_rpc_call_finish(struct kms_rpc_call *c, int grpc_status, const char *details,
                         const uint8_t *resp, size_t resplen)
{
    grpc_op ops[4];
    size_t n = 0;
    grpc_call_error ce;

    if (atomic_exchange(&c->finished, true)) {
        kms_log(KMS_LOG_ERROR, "rpc", "kms_rpc_call_finish called twice", "method", c->method,
                NULL);
        return;
    }
    if (grpc_status == GRPC_STATUS_OK && resp != NULL && resplen > c->srv->max_message) {
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
    ce = grpc_call_start_batch(c->call, ops, n, c, NULL);
    if (ce != GRPC_CALL_OK) {
        kms_logf(KMS_LOG_ERROR, "rpc", "grpc_call_start_batch failed: %d", (int)ce);
        grpc_call_cancel(c->call, NULL);
        call_free(c);
    }
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
    c->method = m != NULL ? m->path : "(unregistered)";
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

    if (m == NULL) {
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
        switch (*(enum tag_kind *)ev.tag) {
        case TAG_REQUEST:
            on_request(ev.tag, ev.success != 0);
            break;
        case TAG_FINISH:
            call_free(ev.tag);
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
    pthread_mutex_init(&srv->tls_mu, NULL);
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cv, NULL);
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

static grpc_server_credentials *make_creds(struct kms_rpc_server *srv)
{
    grpc_ssl_server_credentials_options *opts;
    if (srv->mode == KMS_RPC_INSECURE) {
        return grpc_insecure_server_credentials_create();
    }
    opts = grpc_ssl_server_credentials_create_options_using_config_fetcher(
        srv->mode == KMS_RPC_MTLS ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        fetch_cert_config, srv);
    if (opts == NULL) {
        return NULL;
    }
    return grpc_ssl_server_credentials_create_with_options(opts); /* takes opts */
}

int kms_rpc_server_start(struct kms_rpc_server *srv, struct kms_err *err)
{
    grpc_arg args[3];
    grpc_channel_args cargs;
    grpc_server_credentials *creds;

    if (srv == NULL || srv->state != ST_CREATED) {
        return kms_err_set(err, KMS_EINVAL, "rpc server: already started");
    }
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)srv->max_message;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)srv->max_message;
    /* No SO_REUSEPORT: a second process on the same port must fail to bind
     * instead of silently sharing the traffic. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[2].value.integer = 0;
    cargs.num_args = 3;
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

/* gRPC 1.51 fails with CANCELLED every call that arrives on an accepted
 * connection after grpc_server_shutdown_and_notify() (a client whose TLS
 * handshake was under way when we stopped). Talos opens a new connection per
 * RPC and treats CANCELLED as a failed unseal (next key slot, then a 30 s
 * retry), while a refused connection makes grpc-go fail over to the next
 * address at once. So stop first shuts the listening socket down (new
 * connections are refused; gRPC's accept loop sees EINVAL, logs nothing at
 * our level and deactivates the port), lets the connections already accepted
 * send their call, and only then starts gRPC's own shutdown. Returns the
 * number of listening sockets shut down. */
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

static bool wait_until(struct kms_rpc_server *srv, const struct timespec *abs)
{
    /* caller holds srv->mu */
    while (!srv->shutdown_done || srv->live_calls > 0) {
        if (abs == NULL) {
            pthread_cond_wait(&srv->cv, &srv->mu);
        } else if (pthread_cond_timedwait(&srv->cv, &srv->mu, abs) == ETIMEDOUT) {
            return srv->shutdown_done && srv->live_calls == 0;
        }
    }
    return true;
}

void kms_rpc_server_stop(struct kms_rpc_server *srv, unsigned grace_ms)
{
    struct timespec abs;
    bool drained;

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
    pthread_mutex_unlock(&srv->mu);

    /* Drain phase: close the listening socket ourselves, keep serving the
     * connections already accepted for a moment, then shut gRPC down. */
    if (close_listeners(srv->port) > 0 && grace_ms > 0) {
        unsigned drain = grace_ms < DRAIN_MS ? grace_ms : DRAIN_MS;
        struct timespec ts = {drain / 1000, (long)(drain % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    grpc_server_shutdown_and_notify(srv->server, srv->cqs[0], &srv->shutdown_tag);

    clock_gettime(CLOCK_REALTIME, &abs);
    abs.tv_sec += grace_ms / 1000;
    abs.tv_nsec += (long)(grace_ms % 1000) * 1000000L;
    if (abs.tv_nsec >= 1000000000L) {
        abs.tv_sec++;
        abs.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&srv->mu);
    drained = wait_until(srv, &abs);
    pthread_mutex_unlock(&srv->mu);
    if (!drained) {
        kms_log(KMS_LOG_WARN, "rpc", "grace period over, cancelling in-flight calls", "addr",
                srv->listen, NULL);
        grpc_server_cancel_all_calls(srv->server);
        pthread_mutex_lock(&srv->mu);
        wait_until(srv, NULL);
        pthread_mutex_unlock(&srv->mu);
    }
    grpc_server_destroy(srv->server);
    srv->server = NULL;
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
    pthread_mutex_destroy(&srv->tls_mu);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->cv);
    free(srv);
}
