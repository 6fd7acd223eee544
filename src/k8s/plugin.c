/*
 * kmsd-k8s-plugin core (kms_k8s_plugin.h).
 *
 * kube-apiserver calls v2.KeyManagementService on the unix socket:
 *  - Status: answered from the cache the health thread keeps (never waits
 *    for kmsd: kube-apiserver gives Status 3 s and polls it every minute,
 *    every 10 s while unhealthy). healthz "ok" only when the last poll, at
 *    most stale_ms ago, found a replica that says "ok" (unsealed, read
 *    lease held: it hears a quorum).
 *  - Encrypt, Decrypt: parked on the pool, sent as they are (the kmsd
 *    service takes the same messages) to the replica that answered last,
 *    then to each other one in turn. Only OK and INVALID_ARGUMENT (the
 *    request itself is wrong: it would be wrong everywhere) end the round;
 *    anything else (refused connection, deadline, sealed, no quorum, a term
 *    the replica has not applied yet, a certificate refused by one replica)
 *    moves on to the next replica, within the call's deadline.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_k8s_plugin.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_time.h"
#include "kmsd_pool.h"

#include "k8s/kms/v2/api.pb-c.h"

#define M_STATUS "/kmsd.v1.KubernetesKms/Status"
#define M_ENCRYPT "/kmsd.v1.KubernetesKms/Encrypt"
#define M_DECRYPT "/kmsd.v1.KubernetesKms/Decrypt"
#define HEALTH_MAX 240
#define KEY_ID_MAX 1024

struct kms_k8s_plugin {
    struct kms_k8s_plugin_options opt;
    char *sock_path;                       /* file path of the socket */
    char *listen;                          /* "unix:PATH" */
    struct kms_rpc_channel *ch[KMS_K8S_MAX_ENDPOINTS];
    atomic_uint preferred;                 /* index of the replica that answered last */
    struct kms_rpc_server *srv;
    struct kmsd_pool *pool;
    unsigned stale_ms;

    pthread_mutex_t mu;                    /* guards the cache and the stop flag */
    pthread_cond_t cv;                     /* wakes the health thread to stop */
    bool stopping;
    bool health_started;
    pthread_t health;
    char healthz[HEALTH_MAX];              /* last poll's verdict */
    char key_id[KEY_ID_MAX];               /* active key id seen last */
    uint64_t checked_ms;                   /* kms_mono_ms() of the last finished poll */
};

/* One call to kmsd over the replicas, starting at the preferred one.
 * budget_ms bounds the whole round. Returns the last answer's status; resp
 * (malloc'd) only with OK. *answered: index of the replica that gave it. */
static int upstream_call(struct kms_k8s_plugin *p, const char *method, const uint8_t *req,
                         size_t len, unsigned budget_ms, uint8_t **resp, size_t *resplen,
                         char *details, size_t dlen, size_t *answered)
{
    uint64_t end = kms_mono_ms() + budget_ms;
    size_t n = p->opt.n_endpoints, start = atomic_load(&p->preferred) % n;
    int status = GRPC_STATUS_UNAVAILABLE;

    snprintf(details, dlen, "no kmsd replica answered within %u ms", budget_ms);
    *resp = NULL;
    *resplen = 0;
    for (size_t k = 0; k < n; k++) {
        size_t i = (start + k) % n;
        uint64_t now = kms_mono_ms();
        unsigned dl;
        char *det = NULL;
        struct kms_err err;
        int st = GRPC_STATUS_UNAVAILABLE;

        if (now >= end) {
            break;
        }
        dl = (unsigned)(end - now);
        if (dl > p->opt.attempt_timeout_ms) {
            dl = p->opt.attempt_timeout_ms;
        }
        kms_err_clear(&err);
        if (kms_rpc_unary(p->ch[i], method, req, len, dl, resp, resplen, &st, &det, &err) != 0) {
            snprintf(details, dlen, "%.100s: %.200s", p->opt.endpoints[i], err.msg);
            status = GRPC_STATUS_INTERNAL;
            continue;
        }
        status = st;
        snprintf(details, dlen, "kmsd %s: %s", p->opt.endpoints[i],
                 det != NULL ? det : kms_rpc_status_name(st));
        free(det);
        if (st == GRPC_STATUS_OK || st == GRPC_STATUS_INVALID_ARGUMENT) {
            *answered = i;
            if (st == GRPC_STATUS_OK) {
                atomic_store(&p->preferred, (unsigned)i);
            }
            return st;
        }
        kms_log(KMS_LOG_DEBUG, "k8s-plugin", "replica failed, trying the next", "method", method,
                "endpoint", p->opt.endpoints[i], "status", kms_rpc_status_name(st), NULL);
        free(*resp);
        *resp = NULL;
        *resplen = 0;
    }
    return status;
}

/* ---- health ---------------------------------------------------------- */

/* One poll: the first replica (preferred first) whose Status says "ok"
 * wins; otherwise the reason of the best answer. */
static void health_poll(struct kms_k8s_plugin *p)
{
    char healthz[HEALTH_MAX] = "", key_id[KEY_ID_MAX] = "";
    size_t n = p->opt.n_endpoints, start = atomic_load(&p->preferred) % n;
    bool ok = false;

    for (size_t k = 0; k < n && !ok; k++) {
        size_t i = (start + k) % n;
        uint8_t *resp = NULL;
        size_t rlen = 0;
        char *det = NULL;
        int st = GRPC_STATUS_UNAVAILABLE;
        V2__StatusResponse *sr = NULL;
        struct kms_err err;

        kms_err_clear(&err);
        if (kms_rpc_unary(p->ch[i], M_STATUS, NULL, 0, p->opt.attempt_timeout_ms, &resp, &rlen,
                          &st, &det, &err) != 0) {
            st = GRPC_STATUS_INTERNAL;
        }
        if (st == GRPC_STATUS_OK && (sr = v2__status_response__unpack(NULL, rlen, resp)) != NULL) {
            ok = strcmp(sr->healthz, "ok") == 0 && sr->key_id[0] != '\0';
            if (ok) {
                snprintf(healthz, sizeof(healthz), "ok");
            } else if (k == 0 || strncmp(healthz, "kmsd ", 5) != 0 ||
                       strstr(healthz, " unreachable: ") != NULL) {
                /* an answer says more than a refused connection */
                snprintf(healthz, sizeof(healthz), "kmsd %s: %s", p->opt.endpoints[i],
                         sr->healthz);
            }
            if (ok || key_id[0] == '\0') {
                snprintf(key_id, sizeof(key_id), "%s", sr->key_id);
            }
            if (ok) {
                atomic_store(&p->preferred, (unsigned)i);
            }
            v2__status_response__free_unpacked(sr, NULL);
        } else if (healthz[0] == '\0' || k == 0) {
            snprintf(healthz, sizeof(healthz), "kmsd %s unreachable: %s", p->opt.endpoints[i],
                     st == GRPC_STATUS_OK ? "malformed StatusResponse"
                                          : (det != NULL ? det : kms_rpc_status_name(st)));
        }
        free(det);
        free(resp);
    }
    pthread_mutex_lock(&p->mu);
    if (ok != (strcmp(p->healthz, "ok") == 0) || p->checked_ms == 0) {
        kms_log(ok ? KMS_LOG_INFO : KMS_LOG_WARN, "k8s-plugin", ok ? "healthy" : "unhealthy",
                "healthz", healthz, "key_id", key_id, NULL);
    } else if (ok && strcmp(key_id, p->key_id) != 0) {
        kms_log(KMS_LOG_INFO, "k8s-plugin", "key id changed", "key_id", key_id, NULL);
    }
    snprintf(p->healthz, sizeof(p->healthz), "%s", healthz);
    if (key_id[0] != '\0') {
        snprintf(p->key_id, sizeof(p->key_id), "%s", key_id);
    }
    p->checked_ms = kms_mono_ms();
    pthread_mutex_unlock(&p->mu);
}

static void *health_main(void *arg)
{
    struct kms_k8s_plugin *p = arg;

    for (;;) {
        struct timespec ts;
        bool stop;

        health_poll(p);
        ts = kms_mono_ts_in(p->opt.health_interval_ms);
        pthread_mutex_lock(&p->mu);
        while (!p->stopping &&
               pthread_cond_timedwait(&p->cv, &p->mu, &ts) != ETIMEDOUT) {
        }
        stop = p->stopping;
        pthread_mutex_unlock(&p->mu);
        if (stop) {
            break;
        }
    }
    return NULL;
}

/* ---- v2.KeyManagementService ------------------------------------------ */

static void status_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kms_k8s_plugin *p = arg;
    V2__StatusResponse resp = V2__STATUS_RESPONSE__INIT;
    char healthz[HEALTH_MAX], key_id[KEY_ID_MAX];
    uint64_t age;
    uint8_t *buf;
    size_t n;

    (void)req;
    (void)len;
    pthread_mutex_lock(&p->mu);
    age = kms_mono_ms() - p->checked_ms;
    if (p->checked_ms == 0) {
        snprintf(healthz, sizeof(healthz), "starting: kmsd not polled yet");
    } else if (age > p->stale_ms) {
        snprintf(healthz, sizeof(healthz), "health is stale: last kmsd poll %llu ms ago",
                 (unsigned long long)age);
    } else {
        snprintf(healthz, sizeof(healthz), "%s", p->healthz);
    }
    snprintf(key_id, sizeof(key_id), "%s", p->key_id);
    pthread_mutex_unlock(&p->mu);
    resp.version = "v2";
    resp.healthz = healthz;
    resp.key_id = key_id;
    n = protobuf_c_message_get_packed_size(&resp.base);
    if ((buf = malloc(n > 0 ? n : 1)) == NULL) {
        kms_rpc_call_finish(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    protobuf_c_message_pack(&resp.base, buf);
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, buf, n);
    free(buf);
}

struct job {
    struct kms_k8s_plugin *p;
    struct kms_rpc_call *call;
    const char *method;      /* kmsd method */
    bool encrypt;            /* Encrypt (its answer carries the active key_id) */
    const char *op;          /* "encrypt" | "decrypt", for logs */
    uint8_t *req;
    size_t len;
};

static void job_free(struct job *j)
{
    OPENSSL_cleanse(j->req, j->len); /* Encrypt requests carry the seed */
    free(j->req);
    free(j);
}

static void job_run_cb(void *arg)
{
    struct job *j = arg;
    struct kms_k8s_plugin *p = j->p;
    uint64_t left = kms_rpc_call_deadline_ms(j->call);
    unsigned budget = p->opt.max_call_ms;
    uint8_t *resp = NULL;
    size_t rlen = 0, who = 0;
    char details[400];
    int st;

    /* leave kube-apiserver 50 ms to receive our answer before its deadline */
    if (left != UINT64_MAX) {
        budget = left > 50 + budget ? budget : (left > 100 ? (unsigned)(left - 50) : 50);
    }
    st = upstream_call(p, j->method, j->req, j->len, budget, &resp, &rlen, details,
                       sizeof(details), &who);
    if (st == GRPC_STATUS_OK) {
        if (j->encrypt) {
            /* a rotation shows in Encrypt's key_id first: let Status follow */
            V2__EncryptResponse *er = v2__encrypt_response__unpack(NULL, rlen, resp);
            if (er != NULL && er->key_id[0] != '\0') {
                pthread_mutex_lock(&p->mu);
                if (strcmp(p->healthz, "ok") == 0) {
                    snprintf(p->key_id, sizeof(p->key_id), "%s", er->key_id);
                }
                pthread_mutex_unlock(&p->mu);
            }
            if (er != NULL) {
                v2__encrypt_response__free_unpacked(er, NULL);
            }
        }
        kms_rpc_call_finish(j->call, GRPC_STATUS_OK, NULL, resp, rlen);
        OPENSSL_cleanse(resp, rlen); /* Decrypt answers carry the seed */
    } else {
        kms_log(KMS_LOG_WARN, "k8s-plugin", "request failed", "op", j->op, "status",
                kms_rpc_status_name(st), "detail", details, NULL);
        kms_rpc_call_finish(j->call, st, details, NULL, 0);
    }
    free(resp);
    job_free(j);
}

static void park(struct kms_k8s_plugin *p, struct kms_rpc_call *call, const char *method,
                 const char *op, const uint8_t *req, size_t len)
{
    struct job *j = calloc(1, sizeof(*j));
    int rc;

    if (j == NULL || (j->req = malloc(len > 0 ? len : 1)) == NULL) {
        free(j);
        kms_rpc_call_finish(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    memcpy(j->req, req, len);
    j->p = p;
    j->call = call;
    j->method = method;
    j->encrypt = strcmp(method, M_ENCRYPT) == 0;
    j->op = op;
    j->len = len;
    if ((rc = kmsd_pool_submit(p->pool, job_run_cb, j)) != 0) {
        kms_rpc_call_finish(call, GRPC_STATUS_UNAVAILABLE,
                            rc == KMS_EBUSY ? "too many calls waiting for kmsd; retry"
                                            : "shutting down",
                            NULL, 0);
        job_free(j);
    }
}

static void encrypt_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    park(arg, call, M_ENCRYPT, "encrypt", req, len);
}

static void decrypt_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    park(arg, call, M_DECRYPT, "decrypt", req, len);
}

/* ---- lifecycle ------------------------------------------------------- */

/* Removes a stale socket at path; ENOENT is fine; anything but a socket is
 * refused (never delete an operator's file). */
static int socket_clear(const char *path, struct kms_err *err)
{
    struct stat sb;

    if (lstat(path, &sb) != 0) {
        if (errno == ENOENT) {
            return 0;
        }
        return kms_err_set(err, KMS_EIO, "socket %s: %s", path, strerror(errno));
    }
    if (!S_ISSOCK(sb.st_mode)) {
        return kms_err_set(err, KMS_ECONFIG, "socket %s: exists and is not a socket", path);
    }
    if (unlink(path) != 0) {
        return kms_err_set(err, KMS_EIO, "cannot remove stale socket %s: %s", path,
                           strerror(errno));
    }
    return 0;
}

int kms_k8s_plugin_start(const struct kms_k8s_plugin_options *opt, struct kms_k8s_plugin **out,
                         struct kms_err *err)
{
    struct kms_k8s_plugin *p = NULL;
    struct kms_rpc_server_config sc;
    struct kms_rpc_client_tls tls;
    struct kms_rpc_channel_options co;
    const char *path;
    mode_t old_umask;
    int rc;

    *out = NULL;
    if (opt->listen == NULL || opt->n_endpoints == 0 || opt->n_endpoints > KMS_K8S_MAX_ENDPOINTS ||
        opt->ca_file == NULL || opt->cert_file == NULL || opt->key_file == NULL) {
        rc = kms_err_set(err, KMS_ECONFIG, "k8s plugin: need a socket, 1..%d endpoints, "
                         "a CA, a certificate and a key", KMS_K8S_MAX_ENDPOINTS);
        goto out;
    }
    path = strncmp(opt->listen, "unix://", 7) == 0 ? opt->listen + 7
           : strncmp(opt->listen, "unix:", 5) == 0 ? opt->listen + 5 : opt->listen;
    if (path[0] != '/') {
        rc = kms_err_set(err, KMS_ECONFIG, "k8s plugin: socket path must be absolute: %s",
                         opt->listen);
        goto out;
    }
    if ((p = calloc(1, sizeof(*p))) == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    p->opt = *opt;
    if (p->opt.health_interval_ms == 0) {
        p->opt.health_interval_ms = 1000;
    }
    if (p->opt.attempt_timeout_ms == 0) {
        p->opt.attempt_timeout_ms = 1500;
    }
    if (p->opt.max_call_ms == 0) {
        p->opt.max_call_ms = 10000;
    }
    if (p->opt.threads == 0) {
        p->opt.threads = 4;
    }
    /* a poll round may try every replica; three missed rounds are stale */
    p->stale_ms = 3 * p->opt.health_interval_ms +
                  (unsigned)p->opt.n_endpoints * p->opt.attempt_timeout_ms;
    pthread_mutex_init(&p->mu, NULL);
    kms_cond_init_mono(&p->cv);
    p->sock_path = strdup(path);
    p->listen = malloc(strlen(path) + 6);
    if (p->sock_path == NULL || p->listen == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    snprintf(p->listen, strlen(path) + 6, "unix:%s", path);

    tls.ca_file = opt->ca_file;
    tls.cert_file = opt->cert_file;
    tls.key_file = opt->key_file;
    memset(&co, 0, sizeof(co));
    co.connect_timeout_ms = p->opt.attempt_timeout_ms;
    for (size_t i = 0; i < opt->n_endpoints; i++) {
        if ((rc = kms_rpc_channel_create_opts(opt->endpoints[i], &tls, &co, &p->ch[i], err)) != 0) {
            rc = kms_err_wrap(err, rc, "k8s plugin: kmsd endpoint %s", opt->endpoints[i]);
            goto out;
        }
        kms_rpc_channel_set_max_message(p->ch[i], 64 * 1024);
    }
    if ((rc = kmsd_pool_create("k8s-plugin", p->opt.threads, 256, &p->pool, err)) != 0) {
        rc = kms_err_wrap(err, rc, "k8s plugin");
        goto out;
    }
    if (pthread_create(&p->health, NULL, health_main, p) != 0) {
        rc = kms_err_set(err, KMS_ENOMEM, "k8s plugin: cannot start the health thread");
        goto out;
    }
    p->health_started = true;

    memset(&sc, 0, sizeof(sc));
    sc.listen = p->listen;
    sc.mode = KMS_RPC_INSECURE; /* a local unix socket: its file mode is the access control */
    sc.workers = 2;
    sc.max_message = 64 * 1024;
    if ((rc = kms_rpc_server_create(&sc, &p->srv, err)) != 0 ||
        (rc = kms_rpc_server_add_method(p->srv, "/v2.KeyManagementService/Status", status_cb,
                                        p)) != 0 ||
        (rc = kms_rpc_server_add_method(p->srv, "/v2.KeyManagementService/Encrypt", encrypt_cb,
                                        p)) != 0 ||
        (rc = kms_rpc_server_add_method(p->srv, "/v2.KeyManagementService/Decrypt", decrypt_cb,
                                        p)) != 0) {
        rc = kms_err_wrap(err, rc, "k8s plugin");
        goto out;
    }
    if ((rc = socket_clear(p->sock_path, err)) != 0) {
        goto out;
    }
    old_umask = umask(0177); /* the socket is born 0600; chmod below sets the asked mode */
    rc = kms_rpc_server_start(p->srv, err);
    umask(old_umask);
    if (rc != 0) {
        rc = kms_err_wrap(err, rc, "k8s plugin");
        goto out;
    }
    if (chmod(p->sock_path, (mode_t)(opt->socket_mode & 07777)) != 0) {
        rc = kms_err_set(err, KMS_EIO, "k8s plugin: chmod %o %s: %s", opt->socket_mode,
                         p->sock_path, strerror(errno));
        goto out;
    }
    kms_log(KMS_LOG_INFO, "k8s-plugin", "listening", "socket", p->sock_path, NULL);
    *out = p;
    p = NULL;
    rc = 0;
out:
    kms_k8s_plugin_stop(p, 0);
    return rc;
}

void kms_k8s_plugin_stop(struct kms_k8s_plugin *p, unsigned grace_ms)
{
    if (p == NULL) {
        return;
    }
    if (p->srv != NULL) {
        kms_rpc_server_stop(p->srv, grace_ms);
    }
    kmsd_pool_stop(p->pool);
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    if (p->health_started) {
        pthread_join(p->health, NULL);
    }
    kms_rpc_server_destroy(p->srv);
    kmsd_pool_destroy(p->pool);
    for (size_t i = 0; i < KMS_K8S_MAX_ENDPOINTS; i++) {
        if (p->ch[i] != NULL) {
            kms_rpc_channel_destroy(p->ch[i]);
        }
    }
    if (p->sock_path != NULL && p->srv != NULL) {
        struct stat sb;
        if (lstat(p->sock_path, &sb) == 0 && S_ISSOCK(sb.st_mode)) {
            (void)unlink(p->sock_path);
        }
    }
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->sock_path);
    free(p->listen);
    free(p);
}
