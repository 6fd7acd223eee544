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

int main(int argc, char **argv)
{
    struct kms_config cfg;
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
    if (cfg.print_table) {
        /* The options table of docs/configuration.md (test_config_docs). */
        if (kms_config_print_table(stdout) != 0) {
            fprintf(stderr, "kmsd: --print-config-table: cannot write to stdout\n");
            code = 1;
        }
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
        if (cfg.seal_pkcs11 && kmsd_hsm_check_config(&cfg, stderr) != 0) {
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
    if (kms_rpc_global_init(cfg.talos.tls12, &err) != 0) {
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
        snprintf(id, sizeof(id), "%llu", (unsigned long long)cfg.node_id);
        kms_log(KMS_LOG_INFO, "kmsd", "starting", "version", KMSD_VERSION, "node_id", id,
                NULL);
    }
    if (kmsd_start(d, &cfg, &err) != 0 || kmsd_http_start(d, &err) != 0) {
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
