/*
 * Unary gRPC server over the gRPC C core async API: lifecycle (create,
 * start, stop, destroy). Its other parts: rpc_tls.c (credentials, reload),
 * rpc_worker.c (request slots, workers), rpc_call.c (calls); the structs
 * and the locking rules are in rpc_internal.h.
 *
 * Stop, in this order (kms_rpc_server_stop):
 *  1. stop accepting: the listening socket is shut down by us (gRPC 1.51 has
 *     no call for it; see close_listeners) - new connections are refused;
 *  2. admitted work: connections already accepted still deliver their call
 *     and every open call may finish normally, until no call is open and
 *     none arrived for QUIET_MS, bounded by grace_ms;
 *  3. calls still open are finished by the server with UNAVAILABLE, and any
 *     call that still arrives is answered UNAVAILABLE without a handler
 *     (rpc_calls_abort; then the abort hook wakes parked handlers);
 *  4. only then grpc_server_shutdown_and_notify() (GOAWAY); when the finish
 *     batches have not all completed within SHUTDOWN_WAIT_MS,
 *     grpc_server_cancel_all_calls(); destroy, join the workers.
 * Calls that arrive after step 4 on an already accepted connection are
 * failed by gRPC itself with CANCELLED, which is why step 2 waits for a
 * quiet period first. The workers run until step 4's queue shutdown, so
 * every finish batch started before (by a handler or by step 3) completes
 * on a worker and releases its call.
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

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "kms_connlimit.h"
#include "kms_log.h"
#include "kms_time.h"
#include "kms_tsan.h"
#include "kms_rpc.h"
#include "rpc_internal.h"

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

static char *xstrdup(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

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
    if (cfg->transport != KMS_RPC_GRPC &&
        (cfg->transport != KMS_RPC_H2 || cfg->mode == KMS_RPC_MTLS ||
         strncmp(cfg->listen, "unix:", 5) == 0)) {
        return kms_err_set(err, KMS_EINVAL,
                           "rpc server %s: the h2 transport serves TCP with server TLS or "
                           "plaintext only", cfg->listen);
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
    srv->transport = cfg->transport;
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
    kms_cond_init_mono(&srv->cv);
    srv->shutdown_tag.kind = RPC_TAG_SHUTDOWN;
    srv->state = RPC_ST_CREATED;
    if (srv->listen == NULL) {
        kms_rpc_server_destroy(srv);
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    if (srv->mode != KMS_RPC_INSECURE) {
        char *c, *k, *r;
        if ((rc = rpc_tls_load(srv, &c, &k, &r, err)) != 0) {
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
        srv->state != RPC_ST_CREATED) {
        return KMS_EINVAL;
    }
    if (srv->n_methods >= RPC_MAX_METHODS) {
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

void kms_rpc_server_set_abort_hook(struct kms_rpc_server *srv, kms_rpc_abort_hook_fn fn,
                                   void *arg)
{
    if (srv != NULL && srv->state == RPC_ST_CREATED) {
        srv->abort_hook = fn;
        srv->abort_hook_arg = arg;
    }
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

    if (srv == NULL || srv->state != RPC_ST_CREATED) {
        return kms_err_set(err, KMS_EINVAL, "rpc server: already started");
    }
    if (srv->transport == KMS_RPC_H2) {
        if ((rc = rpc_h2_start(srv, err)) != 0) {
            kms_rpc_server_stop(srv, 0);
        }
        return rc;
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
    srv->n_slots = (size_t)srv->workers * (srv->n_methods * RPC_SLOTS_PER_METHOD + 1);
    srv->slots = calloc(srv->n_slots > 0 ? srv->n_slots : 1, sizeof(*srv->slots));
    if (srv->cqs == NULL || srv->threads == NULL || srv->slots == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    for (unsigned i = 0; i < srv->workers; i++) {
        srv->cqs[i] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(srv->server, srv->cqs[i], NULL);
    }
    creds = rpc_tls_creds_create(srv);
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
    srv->state = RPC_ST_RUNNING;
    pthread_mutex_unlock(&srv->mu);

    rpc_slots_arm_all(srv);
    if (rpc_workers_start(srv) != 0) {
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
        kms_ts_add_ms(&quiet_end, QUIET_MS);
        if (!ts_before(&now, end) || (srv->open_calls == 0 && !ts_before(&now, &quiet_end))) {
            return;
        }
        wake = srv->open_calls == 0 && ts_before(&quiet_end, end) ? quiet_end : *end;
        (void)pthread_cond_timedwait(&srv->cv, &srv->mu, &wake);
    }
}

/* The port leaves the accept filter (kms_connlimit.h); idempotent. */
static void limits_release(struct kms_rpc_server *srv)
{
    if (srv->limit_registered) {
        kms_connlimit_unregister(srv->port);
        srv->limit_registered = false;
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
    if (srv->state != RPC_ST_RUNNING) {
        enum rpc_srv_state st = srv->state;
        srv->state = RPC_ST_STOPPED;
        pthread_mutex_unlock(&srv->mu);
        if (st == RPC_ST_CREATED && srv->server != NULL) {
            /* start failed half way: never started, no workers */
            grpc_server_destroy(srv->server);
            srv->server = NULL;
            rpc_workers_join(srv);
        }
        if (st == RPC_ST_CREATED && srv->h2 != NULL) {
            rpc_h2_shutdown(srv, 0); /* no loop ran: closes the listener */
        }
        if (st == RPC_ST_CREATED) {
            limits_release(srv);
        }
        return;
    }
    srv->state = RPC_ST_STOPPED;
    /* the quiet period counts from the moment we stop accepting */
    clock_gettime(CLOCK_MONOTONIC, &srv->last_call);
    pthread_mutex_unlock(&srv->mu);

    /* 1. stop accepting */
    (void)close_listeners(srv->port);

    /* 2. admitted connections deliver their call; open calls may finish */
    end = kms_mono_ts_in(grace_ms);
    pthread_mutex_lock(&srv->mu);
    if (grace_ms > 0) {
        wait_admitted(srv, &end);
    }
    pthread_mutex_unlock(&srv->mu);

    /* 3. what is still open gets UNAVAILABLE from us, not CANCELLED */
    aborted = rpc_calls_abort(srv);
    if (aborted > 0) {
        kms_logf(KMS_LOG_INFO, "rpc", "stopping %s: answered %zu open call(s) UNAVAILABLE",
                 srv->listen, aborted);
    }

    /* 4. the transport's own shutdown */
    if (srv->transport == KMS_RPC_H2) {
        rpc_h2_shutdown(srv, SHUTDOWN_WAIT_MS);
        limits_release(srv);
        return;
    }
    KMS_TSAN_RELEASE(&srv->shutdown_tag);
    grpc_server_shutdown_and_notify(srv->server, srv->cqs[0], &srv->shutdown_tag);
    end = kms_mono_ts_in(SHUTDOWN_WAIT_MS);
    pthread_mutex_lock(&srv->mu);
    idle = wait_grpc_idle(srv, &end);
    pthread_mutex_unlock(&srv->mu);
    if (!idle) {
        kms_log(KMS_LOG_WARN, "rpc", "shutdown slow, cancelling the remaining calls", "addr",
                srv->listen, NULL);
        grpc_server_cancel_all_calls(srv->server);
        (void)rpc_calls_abort(srv); /* calls that arrived after step 3 */
        pthread_mutex_lock(&srv->mu);
        wait_grpc_idle(srv, NULL);
        pthread_mutex_unlock(&srv->mu);
    }
    grpc_server_destroy(srv->server);
    srv->server = NULL;
    limits_release(srv);
    rpc_workers_join(srv);
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
    rpc_h2_free(srv);
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
