/*
 * Daemon lifecycle: start, TLS reload, stop. The supervisor thread that
 * runs between them is in supervisor.c (kmsd_supervisor.h).
 *
 * Closing never waits for parked handlers: kms_rpc_server_stop() refuses new
 * connections, lets the accepted ones deliver their calls, answers what is
 * still open UNAVAILABLE (a parked handler's later finish only releases its
 * call) and returns, so the supervisor can reopen the listener as soon as
 * the lease is back.
 */
#define TALOS_STOP_GRACE_MS 2000    /* SIGTERM: let admitted calls finish */
#define POOL_THREADS 32             /* per pool; they mostly sleep in waits */
/* Writes in flight on one node = write pool threads: each waits (asleep) for
 * its entry to commit. The leader's pool holds its own seals AND every
 * forwarded one, and raft batches only what is in flight: with 32, a
 * three-node cluster stalled near 32 entries per two fsyncs whatever the
 * number of clients (bench/bench_seal.py). A sleeping thread costs its
 * touched stack pages only. */
#define WRITE_POOL_THREADS 256
#define POOL_QUEUE 4096
#define OP_POOL_THREADS 4           /* operator calls: rare, may block long */
#define OP_POOL_QUEUE 256
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <unistd.h>


#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd_seal.h"
#include "kmsd.h"
#include "kmsd_peer.h"
#include "kmsd_audit.h"
#include "kmsd_touch.h"
#include "kmsd_snapshot.h"
#include "kmsd_authz.h"
#include "kmsd_notify.h"
#include "kmsd_pool.h"
#include "kmsd_rekey.h"
#include "kmsd_supervisor.h"


/* RocksDB (Debian's build has assertions on) aborts when it opens on a
 * full filesystem, and raft preallocates 8 MiB log segments: refuse to
 * start with a clear message instead. */
#define KMSD_MIN_FREE_BYTES (64ull * 1024 * 1024)

static int data_dir_space_check(const char *dir, struct kms_err *err)
{
    struct statvfs v;
    unsigned long long avail;
    if (statvfs(dir, &v) != 0) {
        return 0; /* not there yet: created later, errors reported there */
    }
    avail = (unsigned long long)v.f_bavail * (unsigned long long)v.f_frsize;
    if (avail < KMSD_MIN_FREE_BYTES) {
        return kms_err_set(err, KMS_EIO,
                           "dataDir %s: only %llu MiB free, kmsd needs at least %llu MiB "
                           "(raft log segments and the RocksDB WAL are preallocated); free "
                           "space and start again",
                           dir, avail / (1024 * 1024), KMSD_MIN_FREE_BYTES / (1024 * 1024));
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* dataDir permissions.                                                 */

static unsigned long perm_fixed;

static int perm_fix_cb(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)type;
    (void)ftw;
    if (!S_ISLNK(st->st_mode) && (st->st_mode & 077) != 0 &&
        chmod(path, st->st_mode & 07700) == 0) {
        perm_fixed++;
    }
    return 0;
}

int kmsd_data_dir_secure(const char *dir, struct kms_err *err)
{
    struct stat st;
    char tmp[4096];
    char fixed[32];

    if (stat(dir, &st) != 0) {
        if (errno != ENOENT) {
            return kms_err_set(err, KMS_EIO, "dataDir %s: %s", dir, strerror(errno));
        }
        snprintf(tmp, sizeof(tmp), "%s", dir);
        for (char *p = tmp + 1; *p != '\0'; p++) {
            if (*p == '/') {
                *p = '\0';
                if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
                    return kms_err_set(err, KMS_EIO, "cannot create %s: %s", tmp,
                                       strerror(errno));
                }
                *p = '/';
            }
        }
        if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
            return kms_err_set(err, KMS_EIO, "cannot create dataDir %s: %s", dir,
                               strerror(errno));
        }
        return 0;
    }
    if (!S_ISDIR(st.st_mode)) {
        return kms_err_set(err, KMS_ECONFIG, "dataDir %s is not a directory", dir);
    }
    /* Startup only (single-threaded here): nftw's callback has no argument. */
    perm_fixed = 0;
    if (nftw(dir, perm_fix_cb, 16, FTW_PHYS) != 0) {
        return kms_err_set(err, KMS_EIO, "dataDir %s: cannot walk it: %s", dir,
                           strerror(errno));
    }
    if (perm_fixed > 0) {
        snprintf(fixed, sizeof(fixed), "%lu", perm_fixed);
        kms_log(KMS_LOG_WARN, "kmsd",
                "dataDir was readable by group or others: removed their access (it holds the "
                "sealed records and the encrypted keyring)",
                "dir", dir, "paths_fixed", fixed, NULL);
    }
    return 0;
}

/* Raises the soft RLIMIT_NOFILE to the hard limit (a 1,024 soft limit is
 * easily exhausted by idle connections) and derives the default total
 * connection cap per gRPC port from it: two gRPC ports, the HTTP port, raft
 * and RocksDB must all fit, so each gRPC port gets a quarter of what is left
 * after 128 descriptors for everything else, at most 1024. */
static void fd_limit_raise(struct kmsd *d)
{
    struct rlimit rl;
    char soft[32], hard[32], cap[32];
    unsigned long long lim = 1024;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        unsigned long long before = rl.rlim_cur;
        if (rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
                (void)getrlimit(RLIMIT_NOFILE, &rl);
            }
        }
        lim = rl.rlim_cur == RLIM_INFINITY ? 1048576ull : (unsigned long long)rl.rlim_cur;
        snprintf(soft, sizeof(soft), "%llu", before);
        snprintf(hard, sizeof(hard), "%llu", lim);
    } else {
        snprintf(soft, sizeof(soft), "?");
        snprintf(hard, sizeof(hard), "?");
    }
    d->fd_limit = lim;
    if (d->opt.max_conns != 0) {
        d->max_conns_effective = d->opt.max_conns;
    } else {
        unsigned long long auto_cap = lim > 128 + 64 ? (lim - 128) / 4 : 16;
        d->max_conns_effective = auto_cap > 1024 ? 1024 : (unsigned)auto_cap;
    }
    snprintf(cap, sizeof(cap), "%u", d->max_conns_effective);
    kms_log(KMS_LOG_INFO, "kmsd", "file descriptor limit", "soft_before", soft, "soft", hard,
            "max_connections_per_grpc_port", cap, NULL);
    if (2ull * d->max_conns_effective + d->opt.http_max_conns + 128 > lim) {
        kms_log(KMS_LOG_WARN, "kmsd",
                "limits.maxConnections leaves too few file descriptors: connections beyond "
                "the fd limit are reset at accept",
                "fd_limit", hard, "max_connections", cap, NULL);
    }
}

/* kmsd_supervisor.h */
void kmsd_rpc_limits_fill(const struct kmsd *d, struct kms_rpc_server_config *cfg)
{
    cfg->max_conns = d->max_conns_effective;
    cfg->max_conns_per_addr = d->opt.max_conns_per_addr;
    cfg->handshake_timeout_ms = d->opt.handshake_timeout_ms;
    cfg->max_streams = d->opt.max_streams;
    cfg->memory_quota = d->opt.grpc_memory;
    cfg->max_idle_ms = d->opt.conn_idle_ms;
    cfg->max_age_ms = d->opt.conn_max_age_ms;
}

/* Writes cluster CA + operator CA into one bundle for the cluster API's
 * client verification (gRPC takes one PEM root bundle). Written to a
 * temporary file and renamed, so a handshake that re-reads it mid-reload
 * sees the old or the new bundle, never half of one. */
static int client_ca_bundle(struct kmsd *d, char *path, size_t pathlen, struct kms_err *err)
{
    const char *files[2] = {d->opt.cluster_ca, d->opt.operator_ca};
    char tmp[4200];
    FILE *out;
    int rc = 0;

    snprintf(path, pathlen, "%s/client-ca-bundle.pem", d->opt.data_dir);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    out = fopen(tmp, "w");
    if (out == NULL) {
        return kms_err_set(err, KMS_EIO, "cannot write %s: %s", tmp, strerror(errno));
    }
    for (int i = 0; i < 2; i++) {
        char buf[4096];
        size_t n;
        FILE *in = fopen(files[i], "r");
        if (in == NULL) {
            rc = kms_err_set(err, KMS_EIO, "cannot read CA file %s: %s", files[i],
                             strerror(errno));
            break;
        }
        while ((n = fread(buf, 1, sizeof(buf), in)) > 0) {
            if (fwrite(buf, 1, n, out) != n && rc == 0) {
                rc = kms_err_set(err, KMS_EIO, "cannot write %s", tmp);
            }
        }
        fputc('\n', out);
        fclose(in);
    }
    if (fclose(out) != 0 && rc == 0) {
        rc = kms_err_set(err, KMS_EIO, "cannot write %s", tmp);
    }
    if (rc == 0 && rename(tmp, path) != 0) {
        rc = kms_err_set(err, KMS_EIO, "cannot rename %s to %s: %s", tmp, path,
                         strerror(errno));
    }
    if (rc != 0) {
        unlink(tmp);
    }
    return rc;
}

/* Writes the CA bundle and opens the cluster API (start-up; the
 * supervisor when a probe found its accept loop dead, or on a reload that
 * cannot update the server in place). */
/* kmsd_supervisor.h */
int kmsd_cluster_open(struct kmsd *d, struct kms_err *err)
{
    struct kms_rpc_server_config ccfg;
    struct kms_rpc_server *srv = NULL;
    char bundle[4096];
    int rc;

    if ((rc = client_ca_bundle(d, bundle, sizeof(bundle), err)) != 0) {
        return rc;
    }
    memset(&ccfg, 0, sizeof(ccfg));
    ccfg.listen = d->opt.cluster_listen;
    ccfg.workers = d->opt.workers;
    ccfg.max_message = 4 * 1024 * 1024;
    ccfg.mode = KMS_RPC_MTLS;
    ccfg.cert_file = d->opt.node_cert;
    ccfg.key_file = d->opt.node_key;
    ccfg.ca_file = bundle;
    kmsd_rpc_limits_fill(d, &ccfg);
    if ((rc = kms_rpc_server_create(&ccfg, &srv, err)) != 0 ||
        (rc = kmsd_cluster_register(d, srv)) != 0 ||
        (rc = kms_rpc_server_start(srv, err)) != 0) {
        if (srv != NULL) {
            kms_rpc_server_destroy(srv);
        }
        return kms_err_wrap(err, rc, "cluster API on %s", d->opt.cluster_listen);
    }
    pthread_mutex_lock(&d->srv_mu);
    d->cluster_srv = srv;
    pthread_mutex_unlock(&d->srv_mu);
    atomic_store(&d->cluster_listening, true);
    kms_log(KMS_LOG_INFO, "cluster", "cluster API listening", "addr", d->opt.cluster_listen,
            "tls", "1.3", NULL);
    return 0;
}

int kmsd_start(struct kmsd *d, const struct kms_config *opt, struct kms_err *err)
{
    struct kms_raft_config rc_cfg;
    struct kms_raft_peer peers[KMS_CONFIG_MAX_PEERS];
    char path[4096];
    int rc;

    memset(d, 0, sizeof(*d));
    d->opt = *opt;
    pthread_mutex_init(&d->mu, NULL);
    pthread_mutex_init(&d->fwd_mu, NULL);
    pthread_mutex_init(&d->srv_mu, NULL);
    pthread_rwlock_init(&d->kr_lock, NULL);
    if ((rc = kmsd_wake_init(&d->wake, err)) != 0 || (rc = kmsd_talos_init(d, err)) != 0) {
        return rc;
    }
    fd_limit_raise(d);

    {
        const char *pause = getenv("KMSD_TEST_READ_PAUSE_MS");
        if (pause != NULL && pause[0] != '\0') {
            d->test_read_pause_ms = (unsigned)strtoul(pause, NULL, 10);
            kms_log(KMS_LOG_WARN, "kmsd",
                    "TEST FAULT HOOK: every local read pauses between its lease check and "
                    "the read (KMSD_TEST_READ_PAUSE_MS); never set this in production",
                    "pause_ms", pause, NULL);
        }
    }
    d->pending = kms_secmem_alloc(sizeof(struct kms_share) * KMSD_MAX_SHARES);
    if (d->pending == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "cannot allocate secure memory for shares");
    }
    if ((rc = kmsd_authz_load(d, err)) != 0) {
        return kms_err_wrap(err, rc, "cluster API CAs");
    }

    if ((rc = kmsd_data_dir_secure(d->opt.data_dir, err)) != 0 ||
        (rc = data_dir_space_check(d->opt.data_dir, err)) != 0) {
        return rc;
    }
    if (d->opt.audit_file != NULL && d->opt.audit_file[0] != '\0') {
        snprintf(path, sizeof(path), "%s", d->opt.audit_file);
    } else {
        snprintf(path, sizeof(path), "%s/audit.log", d->opt.data_dir);
    }
    if ((rc = kmsd_audit_open(path, err)) != 0) {
        return kms_err_wrap(err, rc, "auditFile");
    }
    snprintf(path, sizeof(path), "%s/store", d->opt.data_dir);
    if ((rc = kms_store_open(path, &d->store, err)) != 0) {
        return kms_err_wrap(err, rc, "store");
    }

    memset(&rc_cfg, 0, sizeof(rc_cfg));
    for (size_t i = 0; i < d->opt.n_peers; i++) {
        peers[i].id = d->opt.peers[i].id;
        snprintf(peers[i].address, sizeof(peers[i].address), "%s",
                 d->opt.peers[i].raft_address);
    }
    rc_cfg.id = d->opt.node_id;
    rc_cfg.data_dir = d->opt.data_dir;
    rc_cfg.raft_address = d->opt.raft_advertise;
    rc_cfg.bind_address = d->opt.raft_listen;
    rc_cfg.initial_cluster = peers;
    rc_cfg.n_initial = d->opt.n_peers;
    rc_cfg.election_timeout_ms = d->opt.election_timeout_ms;
    rc_cfg.heartbeat_timeout_ms = d->opt.heartbeat_timeout_ms;
    rc_cfg.snapshot_threshold = d->opt.snapshot_threshold;
    rc_cfg.snapshot_trailing = d->opt.snapshot_trailing;
    rc_cfg.cert_file = d->opt.node_cert;
    rc_cfg.key_file = d->opt.node_key;
    rc_cfg.ca_file = d->opt.cluster_ca;
    rc_cfg.lease_cb = kmsd_talos_lease_cb; /* wakes Unseals parked for a lease */
    rc_cfg.lease_arg = d;
    if ((rc = kms_raft_start(&rc_cfg, d->store, &d->raft, err)) != 0) {
        return kms_err_wrap(err, rc, "raft");
    }

    if ((rc = kmsd_pool_create("kmsd-write", WRITE_POOL_THREADS, POOL_QUEUE, &d->write_pool, err)) !=
            0 ||
        (rc = kmsd_pool_create("kmsd-wait", POOL_THREADS, POOL_QUEUE, &d->wait_pool, err)) !=
            0 ||
        (rc = kmsd_pool_create("kmsd-op", OP_POOL_THREADS, OP_POOL_QUEUE, &d->op_pool, err)) !=
            0) {
        return kms_err_wrap(err, rc, "handler pools");
    }
    /* Before the cluster API: its handlers read d->hsm. */
    if ((rc = kmsd_hsm_start(d, err)) != 0) {
        return kms_err_wrap(err, rc, "PKCS#11 seal");
    }
    if ((rc = kmsd_cluster_open(d, err)) != 0) {
        return rc;
    }

    if ((rc = kmsd_touch_start(d, err)) != 0) {
        return rc;
    }
    if (pthread_create(&d->supervisor, NULL, kmsd_supervisor_main, d) != 0) {
        return kms_err_set(err, KMS_ENOMEM, "cannot start supervisor thread");
    }
    d->supervisor_started = true;
    if ((rc = kmsd_peer_start(d, err)) != 0) {
        return kms_err_wrap(err, rc, "peer unseal");
    }
    kms_log(KMS_LOG_INFO, "kmsd",
            kmsd_is_initialized(d) ? (kmsd_hsm_enabled(d) ? "started sealed: unsealing through "
                                                            "the PKCS#11 token"
                                                          : "started sealed: waiting for unseal "
                                                            "key shares")
            : kmsd_raft_is_member(d)
                ? "started uninitialised: waiting for kmsctl operator init"
                : "started outside the cluster: waiting to be added (kmsctl operator members "
                  "add on the leader), then for unseal key shares",
            NULL);
    kmsd_warn_local_reads(d, "start");
    return 0;
}

void kmsd_reload_tls(struct kmsd *d)
{
    atomic_store(&d->reload_requested, true);
    kmsd_wake_signal(&d->wake);
}

/* Supervisor thread only (it owns talos_srv). Every piece is validated
 * before it replaces the old one: the CA stores (authz) first, and the
 * cluster API's CA bundle is rewritten only when both CA files loaded, so a
 * broken file leaves the old bundle, stores and certificates in use. */
/* kmsd_supervisor.h */
void kmsd_tls_reload_apply(struct kmsd *d)
{
    struct kms_err err;
    char bundle[4096];
    bool failed = false;

    kms_err_clear(&err);
    if (kmsd_audit_reopen(&err) != 0) {
        /* the old file descriptor stays in use */
        kms_log(KMS_LOG_ERROR, "kmsd", "reload: cannot reopen the audit file", "error",
                err.msg, NULL);
    }
    kms_err_clear(&err);
    if (kmsd_authz_load(d, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "TLS reload: CA files invalid, keeping the old CAs",
                "error", err.msg, NULL);
        failed = true;
    } else if (client_ca_bundle(d, bundle, sizeof(bundle), &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "TLS reload: cluster API keeps the old CA bundle",
                "error", err.msg, NULL);
        failed = true;
    }
    kms_err_clear(&err);
    if (d->raft != NULL && kms_raft_reload_tls(d->raft, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "TLS reload: raft transport keeps old certificates",
                "error", err.msg, NULL);
        failed = true;
    }
    /* The servers re-read their files at the next handshake and keep the
     * old material when the new one is unreadable or mismatched; check the
     * pairs here too so the outcome reported below is honest. */
    kms_err_clear(&err);
    if (kms_rpc_check_tls_files(d->opt.node_cert, d->opt.node_key, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "TLS reload: node certificate invalid, keeping the old one",
                "error", err.msg, NULL);
        failed = true;
    }
    kms_err_clear(&err);
    if (!d->opt.talos_plaintext &&
        kms_rpc_check_tls_files(d->opt.talos_cert, d->opt.talos_key, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd",
                "TLS reload: Talos certificate invalid, keeping the old one", "error", err.msg,
                NULL);
        failed = true;
    }
    if (d->cluster_srv != NULL && kms_rpc_server_reload_needs_rebuild(d->cluster_srv)) {
        /* talos.tls12: the cluster API has static TLS 1.3-only credentials;
         * new files mean a new server (the port is closed for the grace
         * period; open calls get UNAVAILABLE and are retried). Only after
         * the files checked out, so a broken file keeps the old server. */
        if (!failed) {
            struct kms_rpc_server *old;
            pthread_mutex_lock(&d->srv_mu);
            old = d->cluster_srv;
            d->cluster_srv = NULL;
            pthread_mutex_unlock(&d->srv_mu);
            kms_rpc_server_stop(old, 500);
            kms_rpc_server_destroy(old);
            kms_err_clear(&err);
            if (kmsd_cluster_open(d, &err) != 0) {
                kms_log(KMS_LOG_ERROR, "kmsd", "TLS reload: cannot reopen the cluster API",
                        "error", err.msg, NULL);
                failed = true;
            }
        }
    }
    pthread_mutex_lock(&d->srv_mu);
    if (d->cluster_srv != NULL && !kms_rpc_server_reload_needs_rebuild(d->cluster_srv)) {
        kms_rpc_server_reload_tls(d->cluster_srv);
    }
    /* The Talos server is recreated from files on every open; ask the live
     * one to pick the new files up for new handshakes too. */
    if (d->talos_srv != NULL) {
        kms_rpc_server_reload_tls(d->talos_srv);
    }
    pthread_mutex_unlock(&d->srv_mu);
    /* Counter and log line first, the gauge last: whoever sees the gauge
     * change also sees the count and the line. */
    if (failed) {
        atomic_fetch_add(&d->tls_reloads_failed, 1);
        kms_log(KMS_LOG_ERROR, "kmsd",
                "TLS reload failed: the files named above are not in use, the previous "
                "material keeps serving", NULL);
    } else {
        atomic_fetch_add(&d->tls_reloads_ok, 1);
        kms_log(KMS_LOG_INFO, "kmsd",
                "TLS certificates and CA bundles reloaded for new connections", NULL);
    }
    atomic_store(&d->tls_reload_last_failed, failed);
}

void kmsd_stop(struct kmsd *d)
{
    atomic_store(&d->stopping, true);
    kmsd_talos_wake(d); /* parked Unseals see `stopping` now, not at their budget */
    kmsd_wake_signal(&d->wake); /* supervisor, PKCS#11 and peer threads */
    if (d->supervisor_started) {
        pthread_join(d->supervisor, NULL);
        d->supervisor_started = false;
    }
    kmsd_peer_stop(d);
    /* Close the Talos port first so clients move on; in-flight calls get
     * the grace period, then UNAVAILABLE. */
    kmsd_talos_close(d, "shutting down", TALOS_STOP_GRACE_MS);
    /* Parked jobs see `stopping` and finish their calls; they use raft, so
     * the pools go before it. */
    kmsd_pool_stop(d->write_pool);
    kmsd_pool_stop(d->wait_pool);
    /* No unseal notes any more (Talos API closed); its flusher uses raft. */
    kmsd_touch_stop(d);
    /* Operator jobs may sit in a long raft call (members add waits up to a
     * minute): give them requestWait, then stop raft anyway, which fails
     * their pending raft requests with KMS_ESHUTDOWN (queued ones see
     * `stopping` and do not start). */
    if (!kmsd_pool_wait_idle(d->op_pool, d->opt.request_wait_ms)) {
        kms_log(KMS_LOG_WARN, "kmsd", "operator calls still running; stopping raft under them",
                NULL);
    }
    /* Transfers leadership first when leader. d->raft stays allocated
     * (calls fail fast) until every thread that may use it is gone. */
    d->raft_failed = kms_raft_failed(d->raft);
    kms_raft_shutdown(d->raft);
    kmsd_pool_stop(d->op_pool);
    if (d->cluster_srv != NULL) {
        kms_rpc_server_stop(d->cluster_srv, 1000);
        kms_rpc_server_destroy(d->cluster_srv);
        d->cluster_srv = NULL;
    }
    /* Nothing submits any more (both servers are gone). */
    kmsd_pool_destroy(d->write_pool);
    d->write_pool = NULL;
    kmsd_pool_destroy(d->wait_pool);
    d->wait_pool = NULL;
    kmsd_pool_destroy(d->op_pool);
    d->op_pool = NULL;
    kms_raft_free(d->raft);
    d->raft = NULL;
    for (size_t i = 0; i < sizeof(d->fwd) / sizeof(d->fwd[0]); i++) {
        if (d->fwd[i].ch != NULL) {
            kms_rpc_channel_destroy(d->fwd[i].ch);
            d->fwd[i].ch = NULL;
        }
    }
    /* Every server that reads d->hsm is gone; the thread sees `stopping`
     * (it may have unsealed meanwhile: kmsd_seal below wipes that). */
    kmsd_hsm_stop(d);
    kmsd_seal(d);
    kmsd_peer_free(d);
    kmsd_snapshot_shutdown(); /* pinned snapshots before the store closes */
    kmsd_audit_close();
    if (d->store != NULL) {
        kms_store_close(d->store);
        d->store = NULL;
    }
    kmsd_authz_free(d);
    kmsd_rekey_stop();
    kmsd_talos_free(d);
    kms_secmem_free(d->pending, sizeof(struct kms_share) * KMSD_MAX_SHARES);
    d->pending = NULL;
}
