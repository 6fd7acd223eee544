/*
 * kmsd: entry point. Loads the configuration, hardens the process, starts
 * the daemon and waits for signals:
 *   SIGTERM/SIGINT  graceful stop (a leader transfers leadership first)
 *   SIGHUP          reload TLS certificates and keys (new connections)
 * Under systemd (kmsd.service, Type=notify) it reports READY/STATUS/WATCHDOG
 * through kmsd_notify.h.
 * Exit codes: 0 clean stop, 1 configuration error, 2 start-up failure.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "kms_config.h"
#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_tls_check.h"
#include "kmsd_seal.h"
#include "kmsd.h"
#include "kmsd_dr.h"
#include "kmsd_http.h"
#include "kmsd_notify.h"

/* Sanitizer runtimes reserve terabytes of shadow memory: locking it all
 * cannot work, so those test builds skip mlockall (and say so). */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KMSD_SANITIZER_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define KMSD_SANITIZER_BUILD 1
#endif
#endif

static void unknown_env_cb(void *arg, const char *entry, size_t len)
{
    char name[128];
    bool to_stderr = *(bool *)arg;
    snprintf(name, sizeof(name), "%.*s", (int)(len < sizeof(name) - 1 ? len : sizeof(name) - 1),
             entry);
    if (to_stderr) {
        fprintf(stderr, "kmsd: warning: unknown environment variable %s ignored (misspelt "
                        "option? see kmsd --help)\n", name);
    } else {
        kms_log(KMS_LOG_WARN, "config",
                "unknown KMSD_* environment variable ignored (misspelt option? see kmsd --help)",
                "name", name, NULL);
    }
}

/* Locks every page the process has and will fault in, so no key, share or
 * passphrase in any buffer (gRPC, TLS, protobuf) ever reaches swap.
 * MCL_ONFAULT locks pages as they are touched instead of populating every
 * mapping (32 MiB of pool thread stacks would otherwise become resident).
 * A failure is a warning: the secure heap is still locked on its own. */
static void memory_lock(bool enabled)
{
    int flags = MCL_CURRENT | MCL_FUTURE;
    if (!enabled) {
        kms_log(KMS_LOG_WARN, "kmsd",
                "memoryLock is false: request buffers holding shares and passphrases may be "
                "swapped out", NULL);
        return;
    }
#ifdef KMSD_SANITIZER_BUILD
    (void)flags;
    kms_log(KMS_LOG_WARN, "kmsd", "sanitizer build: mlockall skipped", NULL);
#else
#ifdef MCL_ONFAULT
    flags |= MCL_ONFAULT;
#endif
    if (mlockall(flags) != 0) {
        int e = errno;
        kms_log(KMS_LOG_WARN, "kmsd",
                "mlockall failed: memory outside the secure heap (request buffers holding "
                "shares and passphrases) may be swapped out; give the service "
                "LimitMEMLOCK=infinity (systemd) or CAP_IPC_LOCK, or set memoryLock: false "
                "to silence this",
                "error", strerror(e), NULL);
        return;
    }
    kms_log(KMS_LOG_INFO, "kmsd", "all process memory locked (mlockall)", NULL);
#endif
}

static int options_from_config(const struct kms_config *c, struct kmsd_options *o,
                               struct kms_err *err)
{
    memset(o, 0, sizeof(*o));
    o->node_id = c->node_id;
    o->data_dir = c->data_dir;
    o->version = KMSD_VERSION;
    o->audit_file = c->audit_file;
    o->talos_listen = c->talos.listen;
    o->talos_advertise = c->talos.advertise;
    o->talos_cert = c->talos.cert_file;
    o->talos_key = c->talos.key_file;
    o->talos_plaintext = c->talos.plaintext;
    o->talos_tls12 = c->talos.tls12;
    o->talos_max_message = (size_t)c->talos.max_message_bytes;
    o->workers = c->talos.workers;
    o->cluster_listen = c->cluster.listen;
    o->cluster_advertise = c->cluster.advertise;
    o->raft_listen = c->raft.listen;
    o->raft_advertise = c->raft.advertise;
    o->http_listen = c->http.listen;
    o->node_cert = c->tls.node_cert_file;
    o->node_key = c->tls.node_key_file;
    o->cluster_ca = c->tls.cluster_ca_file;
    o->operator_ca = c->tls.operator_ca_file;
    if (c->n_initial_cluster > KMSD_MAX_PEERS) {
        return kms_err_set(err, KMS_ECONFIG, "initialCluster: at most %d members",
                           KMSD_MAX_PEERS);
    }
    for (size_t i = 0; i < c->n_initial_cluster; i++) {
        o->peers[i].id = c->initial_cluster[i].id;
        snprintf(o->peers[i].raft_address, sizeof(o->peers[i].raft_address), "%s",
                 c->initial_cluster[i].raft);
        snprintf(o->peers[i].cluster_address, sizeof(o->peers[i].cluster_address), "%s",
                 c->initial_cluster[i].cluster);
    }
    o->n_peers = c->n_initial_cluster;
    o->election_timeout_ms = c->raft.election_timeout_ms;
    o->heartbeat_timeout_ms = c->raft.heartbeat_timeout_ms;
    o->snapshot_threshold = c->raft.snapshot_threshold;
    o->snapshot_trailing = c->raft.snapshot_trailing;
    o->unseal_reads_local = c->unseal_reads == KMS_UNSEAL_READS_LOCAL;
    o->lease_grace_ms = c->lease_grace_ms;
    o->request_wait_ms = c->request_wait_ms;
    o->peer_unseal = c->unseal.peer;
    o->failed_unseals_per_minute = c->failed_unseals_per_minute;
    o->failed_unseals_global_per_minute = c->failed_unseals_global_per_minute;
    o->seals_per_minute = c->seals_per_minute;
    o->seals_per_node_per_minute = c->seals_per_node_per_minute;
    o->records_per_node = c->records_per_node;
    o->last_access_interval_ms = c->last_access_interval_ms;
    o->last_access_max_batch = c->last_access_max_batch;
    o->max_conns = c->limits.max_connections;
    o->max_conns_per_addr = c->limits.max_connections_per_address;
    o->handshake_timeout_ms = c->limits.handshake_timeout_ms;
    o->max_streams = c->limits.max_concurrent_streams;
    o->grpc_memory = (size_t)c->limits.grpc_memory;
    o->conn_idle_ms = c->limits.connection_idle_ms;
    o->conn_max_age_ms = c->limits.connection_max_age_ms;
    o->http_max_conns = c->limits.http_max_connections;
    o->http_max_conns_per_addr = c->limits.http_max_connections_per_address;
    o->probe_interval_ms = c->limits.listener_probe_interval_ms;
    o->talos_conn_bytes = c->limits.talos_connection_bytes;
    o->abuse_ban_after = c->limits.abuse_ban_after;
    o->abuse_ban_ms = c->limits.abuse_ban_ms;
    for (size_t i = 0; i < c->n_allowed_cidrs && i < KMSD_MAX_CIDRS; i++) {
        memcpy(o->cidrs[i].addr, c->allowed_cidrs[i].addr, 16);
        o->cidrs[i].prefix = c->allowed_cidrs[i].prefix;
        o->n_cidrs++;
    }
    for (size_t i = 0; i < c->n_uuid_allow_list && i < KMSD_MAX_UUIDS; i++) {
        o->uuids[o->n_uuids++] = c->uuid_allow_list[i];
    }
    o->seal_pkcs11 = c->seal.type == KMS_SEAL_PKCS11;
    o->seal_module = c->seal.module;
    o->seal_token_label = c->seal.token_label;
    o->seal_key_label = c->seal.key_label;
    o->seal_pin_file = c->seal.pin_file;
    o->seal_pin = c->seal.pin;
    o->seal_retry_max_ms = c->seal.retry_max_ms;
    if (!o->talos_plaintext && (o->talos_cert[0] == '\0' || o->talos_key[0] == '\0')) {
        return kms_err_set(err, KMS_ECONFIG,
                           "talos.certFile and talos.keyFile are required unless "
                           "talos.plaintext is true");
    }
    if (o->node_cert[0] == '\0' || o->node_key[0] == '\0' || o->cluster_ca[0] == '\0' ||
        o->operator_ca[0] == '\0') {
        return kms_err_set(err, KMS_ECONFIG,
                           "tls.nodeCertFile, tls.nodeKeyFile, tls.clusterCAFile and "
                           "tls.operatorCAFile are required");
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct kms_config cfg;
    struct kmsd_options opt;
    struct kmsd *d = NULL;
    struct kms_err err;
    sigset_t set;
    int sig = 0;
    int code = 0;

    memset(&cfg, 0, sizeof(cfg));
    kms_err_clear(&err);
    /* Everything kmsd creates (RocksDB, raft log, the CA bundle, the TLS
     * policy file) is for kmsd alone. */
    umask(077);
    /* Block the signals we wait for before any thread starts, so every
     * thread inherits the mask and sigwait below receives them. SIGPIPE is
     * ignored: a peer vanishing mid-write must not kill the process
     * (canonical raft followers die otherwise when the leader dies). */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    if (kmsd_dr_is_subcommand(argc, argv)) {
        /* Offline subcommands (recover): no daemon, no signals waited for. */
        code = kmsd_dr_main(argc, argv, environ);
        goto out;
    }
    if (kms_config_load(&cfg, argc, argv, environ, &err) != 0) {
        fprintf(stderr, "kmsd: %s\n", err.msg);
        code = 1;
        goto out;
    }
    if (cfg.help) {
        goto out;
    }
    if (cfg.version) {
        printf("kmsd %s\n", KMSD_BUILD_VERSION);
        goto out;
    }
    if (options_from_config(&cfg, &opt, &err) != 0) {
        fprintf(stderr, "kmsd: config: %s\n", err.msg);
        code = 1;
        goto out;
    }
    if (cfg.dump_only) {
        /* Effective configuration (file + env + flags), sensitive values
         * redacted; --check-config accepts it back. */
        if (kms_config_dump(&cfg, stdout) != 0) {
            fprintf(stderr, "kmsd: --dump-config: cannot write to stdout\n");
            code = 1;
        }
        goto out;
    }
    if (cfg.check_only) {
        /* What start-up will need from the files: certificates, keys, CAs,
         * dataDir (kms_tls_check.h); findings on stderr. */
        struct kms_check_report rep = {stderr, "kmsd: check-config", 0, 0, false};
        bool to_stderr = true;
        (void)kms_config_unknown_env(environ, unknown_env_cb, &to_stderr);
        if (opt.seal_pkcs11 && kmsd_hsm_check_config(&opt, stderr) != 0) {
            rep.errors++;
        }
        if (kms_config_check_startup(&cfg, &rep) != 0 || rep.errors > 0) {
            fprintf(stderr, "kmsd: check-config: %u error(s), %u warning(s): kmsd would not "
                    "start\n", rep.errors, rep.warnings);
            code = 1;
            goto out;
        }
        printf("kmsd: configuration OK%s\n", rep.warnings > 0 ? " (with warnings)" : "");
        goto out;
    }
    kms_log_set_level((enum kms_log_level)cfg.log_level);
    {
        bool to_stderr = false;
        (void)kms_config_unknown_env(environ, unknown_env_cb, &to_stderr);
    }
    memory_lock(cfg.memory_lock);

    if (kms_crypto_init(&err) != 0 || kms_process_harden(&err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "cannot secure the process", "error", err.msg, NULL);
        code = 2;
        goto out;
    }
    if (kms_rpc_global_init(opt.talos_tls12, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "gRPC init failed", "error", err.msg, NULL);
        code = 2;
        goto out;
    }
    kmsd_notify_init();
    d = calloc(1, sizeof(*d));
    if (d == NULL) {
        code = 2;
        goto out;
    }
    {
        char id[32];
        snprintf(id, sizeof(id), "%llu", (unsigned long long)opt.node_id);
        kms_log(KMS_LOG_INFO, "kmsd", "starting", "version", KMSD_VERSION, "node_id", id,
                NULL);
    }
    if (kmsd_start(d, &opt, &err) != 0 || kmsd_http_start(d, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "kmsd", "start-up failed", "error", err.msg, NULL);
        code = 2;
        goto stop;
    }
    kmsd_notify_ready(d); /* serving, or waiting for init / unseal shares */
    for (;;) {
        if (sigwait(&set, &sig) != 0) {
            continue;
        }
        if (sig == SIGHUP) {
            kmsd_reload_tls(d);
            continue;
        }
        kms_log(KMS_LOG_INFO, "kmsd", "stopping", "signal", sig == SIGTERM ? "TERM" : "INT",
                NULL);
        break;
    }
stop:
    kmsd_notify_stopping();
    kmsd_http_stop(d);
    kmsd_stop(d);
    kms_rpc_global_shutdown();
    if (d->raft_failed) {
        /* The disk is failing and the raft thread may be left behind stuck
         * on it: leave now (keys are already wiped by kmsd_stop) rather than
         * run library destructors that may block on the same disk. */
        kms_log(KMS_LOG_ERROR, "kmsd", "stopped after a raft log write failure", NULL);
        fflush(NULL);
        _exit(3);
    } else if (atomic_load(&d->removed)) {
        kms_log(KMS_LOG_ERROR, "kmsd",
                "stopped: this node is no longer a member of the cluster (exit status 4)", NULL);
        code = 4;
    } else {
        kms_log(KMS_LOG_INFO, "kmsd", "stopped", NULL);
    }
out:
    free(d);
    kms_config_free(&cfg);
    return code;
}
