/*
 * The supervisor thread (kmsd_supervisor.h): opens and closes the Talos API
 * as the node's state allows, probes both listeners and rebuilds a dead one,
 * runs the periodic jobs and applies TLS reloads.
 *
 * The Talos listener is open only while the node is unsealed and can serve
 * reads; when the read lease has been gone for longer than lease_grace_ms
 * the server is shut down, which closes the port, so Talos's grpc-go client
 * gets "connection refused" and moves on to the next address. Shorter gaps
 * (an election) are absorbed by handlers parked up to request_wait_ms.
 */
#define TALOS_CLOSE_GRACE_MS 500    /* lease lost / sealed: nothing to wait for */
#define PROBE_TIMEOUT_MS 500        /* the accept filter sees a live loop's accept in ~1 ms */
#include <malloc.h>
#include <stdio.h>
#include <string.h>

#include "kms_connlimit.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_notify.h"
#include "kmsd_peer.h"
#include "kmsd_seal.h"
#include "kmsd_supervisor.h"
#include "kmsd_touch.h"

static int talos_open(struct kmsd *d, struct kms_err *err)
{
    struct kms_rpc_server_config cfg;
    struct kms_rpc_server *srv = NULL;
    int rc;

    memset(&cfg, 0, sizeof(cfg));
    cfg.listen = d->opt.talos_listen;
    cfg.workers = d->opt.workers;
    cfg.max_message = d->opt.talos_max_message;
    cfg.allow_tls12 = d->opt.talos_tls12; /* the cluster API stays TLS 1.3-only */
    cfg.transport = d->opt.talos_transport == 1 ? KMS_RPC_H2 : KMS_RPC_GRPC;
    kmsd_rpc_limits_fill(d, &cfg);
    /* Talos connections carry one small call each: police their bytes
     * (rapid reset). The cluster API needs a client certificate before any
     * HTTP/2 frame, so it is not policed. */
    cfg.max_conn_bytes = d->opt.talos_conn_bytes;
    if (cfg.max_conn_bytes != 0 &&
        cfg.max_conn_bytes < 4ull * d->opt.talos_max_message + 16384ull) {
        /* never below a few full-size calls plus the TLS handshake */
        cfg.max_conn_bytes = 4ull * d->opt.talos_max_message + 16384ull;
    }
    cfg.ban_after = d->opt.abuse_ban_after;
    cfg.ban_ms = d->opt.abuse_ban_ms;
    if (d->opt.talos_plaintext) {
        cfg.mode = KMS_RPC_INSECURE;
    } else {
        cfg.mode = KMS_RPC_TLS;
        cfg.cert_file = d->opt.talos_cert;
        cfg.key_file = d->opt.talos_key;
    }
    if ((rc = kms_rpc_server_create(&cfg, &srv, err)) != 0 ||
        (rc = kmsd_talos_register(d, srv)) != 0 ||
        (rc = kms_rpc_server_start(srv, err)) != 0) {
        if (srv != NULL) {
            kms_rpc_server_destroy(srv);
        }
        return kms_err_wrap(err, rc, "talos API on %s", d->opt.talos_listen);
    }
    pthread_mutex_lock(&d->srv_mu);
    d->talos_srv = srv;
    pthread_mutex_unlock(&d->srv_mu);
    /* ready only once the listener is seen accepting (probe), not on intent */
    atomic_store(&d->talos_listening,
                 d->opt.probe_interval_ms == 0 ||
                     kms_rpc_server_probe(srv, PROBE_TIMEOUT_MS) == KMS_PROBE_OK);
    kms_log(KMS_LOG_INFO, "talos", "Talos API listening", "addr", d->opt.talos_listen,
            "transport", cfg.transport == KMS_RPC_H2 ? "h2" : "grpc",
            "tls", d->opt.talos_plaintext ? "off" : (d->opt.talos_tls12 ? "1.2+" : "1.3"),
            NULL);
    if (d->opt.talos_plaintext) {
        kms_log(KMS_LOG_WARN, "talos",
                "PLAINTEXT Talos API: sealed blobs and passphrases cross the network "
                "unencrypted; use only on an isolated network for the STATE partition",
                NULL);
    }
    return 0;
}

/* kmsd_supervisor.h */
void kmsd_talos_close(struct kmsd *d, const char *why, unsigned grace_ms)
{
    uint64_t t0 = kms_mono_ms();
    char took[32];

    if (d->talos_srv == NULL) {
        return;
    }
    struct kms_rpc_server *srv;

    atomic_store(&d->talos_listening, false);
    pthread_mutex_lock(&d->srv_mu);
    srv = d->talos_srv;
    d->talos_srv = NULL;
    pthread_mutex_unlock(&d->srv_mu);
    kms_rpc_server_stop(srv, grace_ms);
    kms_rpc_server_destroy(srv);
    snprintf(took, sizeof(took), "%llu", (unsigned long long)(kms_mono_ms() - t0));
    kms_log(KMS_LOG_WARN, "talos", "Talos API closed", "reason", why, "close_ms", took, NULL);
}

struct self_meta {
    uint64_t id;
    bool found;
    bool same;
    const struct kmsd *d;
};

static int self_meta_cb(void *arg, const Kmsd__V1__Member *m)
{
    struct self_meta *sm = arg;
    if (m->id == sm->id) {
        sm->found = true;
        sm->same = strcmp(m->version, KMSD_VERSION) == 0 &&
                   strcmp(m->cluster_address, sm->d->opt.cluster_advertise) == 0 &&
                   strcmp(m->talos_address, sm->d->opt.talos_advertise) == 0 &&
                   strcmp(m->raft_address, sm->d->opt.raft_advertise) == 0;
    }
    return 0;
}

#define PROBE_FAILS_REBUILD 2 /* consecutive failed probes before a rebuild */
#define LOG_FLUSH_MS 10000   /* suppressed-line reports */
#define TALOS_RETRY_MS 500   /* after the Talos API failed to open */
#define CLUSTER_RETRY_MS 500 /* after the cluster API failed to (re)open */
#define SLOW_TICK_MS 1000    /* keyring refresh, removal check, self metadata */
/* The read lease has no notification: kms_raft publishes it as an atomic
 * deadline that a leadership transfer or a lost quorum may end early. While
 * it matters here (this node is unsealed, or holds it: its loss starts the
 * grace period) the supervisor samples it this often. */
#define LEASE_SAMPLE_MS 50

/* One probe of a listener; true when it accepted. Rebuilds are decided by
 * the caller from *fails. */
static bool listener_probe(struct kms_rpc_server *srv, const char *what, unsigned *fails,
                           bool *was_ok)
{
    int r = kms_rpc_server_probe(srv, PROBE_TIMEOUT_MS);
    if (r == KMS_PROBE_OK) {
        if (!*was_ok) {
            kms_log(KMS_LOG_INFO, "kmsd", "listener accepts again", "listener", what, NULL);
        }
        *fails = 0;
        *was_ok = true;
        return true;
    }
    (*fails)++;
    *was_ok = false;
    {
        char n[16];
        snprintf(n, sizeof(n), "%u", *fails);
        kms_log(KMS_LOG_ERROR, "kmsd", "listener probe failed: not serving new connections",
                "listener", what, "result", kms_probe_result_name((enum kms_probe_result)r),
                "consecutive", n, NULL);
    }
    /* Out of descriptors: a rebuild would not help (and needs fds itself). */
    if (r == KMS_PROBE_NO_FD) {
        *fails = 0;
    }
    return false;
}

static uint64_t due_min(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* The supervisor: waits on d->wake (kmsd_stop, kmsd_reload_tls and the key
 * state changes signal it) or until its next periodic job is due. */
/* kmsd_supervisor.h */
void *kmsd_supervisor_main(void *arg)
{
    struct kmsd *d = arg;
    uint64_t last_slow = 0, last_probe = 0, last_flush = 0;
    uint64_t last_cluster_try = 0;
    unsigned talos_fails = 0, cluster_fails = 0;
    bool talos_ok = true, cluster_ok = true;
    bool self_published = false;
    bool lease_seen = false;
    uint64_t talos_retry_at = 0;
    struct kmsd_removal removal;

    memset(&removal, 0, sizeof(removal));

    for (;;) {
        /* The ticket before any state is read: a signal from here on cuts
         * the wait at the bottom short (kmsd_wake.h). */
        uint64_t ticket = kmsd_wake_ticket(&d->wake);
        uint64_t now = kms_mono_ms(), until;
        bool unsealed, readable, want;

        if (atomic_load(&d->stopping)) {
            break;
        }
        unsealed = kmsd_is_unsealed(d);
        readable = kmsd_readable(d);

        if (readable) {
            d->lease_lost_at_ms = 0;
            lease_seen = true;
        } else if (d->lease_lost_at_ms == 0) {
            d->lease_lost_at_ms = now;
        }
        want = unsealed && lease_seen &&
               (readable || now - d->lease_lost_at_ms < d->opt.lease_grace_ms);
        if (want && d->talos_srv == NULL) {
            struct kms_err err;
            kms_err_clear(&err);
            if (now >= talos_retry_at && talos_open(d, &err) != 0) {
                kms_log(KMS_LOG_ERROR, "talos", "cannot open Talos API", "error", err.msg,
                        NULL);
                talos_retry_at = now + TALOS_RETRY_MS;
            }
        } else if (!want && d->talos_srv != NULL) {
            kmsd_talos_close(d, !unsealed ? "sealed" : "no read lease for longer than the grace period",
                        TALOS_CLOSE_GRACE_MS);
        }

        if (atomic_exchange(&d->reload_requested, false)) {
            kmsd_tls_reload_apply(d);
        }
        if (d->cluster_srv == NULL && now - last_cluster_try >= CLUSTER_RETRY_MS) {
            struct kms_err err;
            kms_err_clear(&err);
            last_cluster_try = now; /* a rebuild on reload could not reopen it */
            if (kmsd_cluster_open(d, &err) != 0) {
                kms_log(KMS_LOG_ERROR, "cluster", "cannot reopen the cluster API", "error",
                        err.msg, NULL);
            }
        }
        /* Listener truth: a listener whose accept loop stopped (gRPC 1.51
         * gives up on some accept errors) is rebuilt; /readyz and kmsctl
         * status report the probe, not the intent. */
        if (d->opt.probe_interval_ms > 0 && now - last_probe >= d->opt.probe_interval_ms) {
            last_probe = now;
            if (d->talos_srv != NULL) {
                bool ok = listener_probe(d->talos_srv, "talos", &talos_fails, &talos_ok);
                atomic_store(&d->talos_listening, ok);
                if (talos_fails >= PROBE_FAILS_REBUILD) {
                    talos_fails = 0;
                    d->listener_rebuilds++;
                    kmsd_talos_close(d, "listener probe failed: rebuilding it", 0);
                    continue; /* reopened by the next pass (still wanted) */
                }
            } else {
                talos_fails = 0;
                talos_ok = true;
            }
            if (d->cluster_srv != NULL) {
                bool ok = listener_probe(d->cluster_srv, "cluster", &cluster_fails,
                                         &cluster_ok);
                atomic_store(&d->cluster_listening, ok);
                if (cluster_fails >= PROBE_FAILS_REBUILD) {
                    struct kms_err err;
                    cluster_fails = 0;
                    d->listener_rebuilds++;
                    kms_log(KMS_LOG_WARN, "cluster",
                            "cluster API listener probe failed: rebuilding it", NULL);
                    struct kms_rpc_server *old;
                    pthread_mutex_lock(&d->srv_mu);
                    old = d->cluster_srv;
                    d->cluster_srv = NULL;
                    pthread_mutex_unlock(&d->srv_mu);
                    kms_rpc_server_stop(old, 0);
                    kms_rpc_server_destroy(old);
                    kms_err_clear(&err);
                    if (kmsd_cluster_open(d, &err) != 0) {
                        kms_log(KMS_LOG_ERROR, "cluster", "cannot reopen the cluster API",
                                "error", err.msg, NULL);
                    }
                }
            }
        }
        if (now - last_flush >= LOG_FLUSH_MS) {
            last_flush = now;
            kms_log_flush_suppressed();
            /* gRPC's per-call garbage from a flood is freed but stays in
             * malloc's arenas; hand it back so RSS reflects live memory */
            (void)malloc_trim(0);
        }

        if (now - last_slow >= SLOW_TICK_MS) {
            last_slow = now;
            if (unsealed) {
                kmsd_keyring_refresh(d);
            }
            kmsd_removal_tick(d, &removal, now);
            if (!self_published && readable) {
                struct self_meta sm = {d->opt.node_id, false, false, d};
                (void)kms_store_members_list(d->store, self_meta_cb, &sm, NULL);
                if (sm.found && sm.same) {
                    self_published = true;
                } else {
                    struct kms_err err;
                    kms_err_clear(&err);
                    if (kmsd_publish_self(d, &err) == 0) {
                        self_published = true;
                    }
                }
            }
        }
        kmsd_notify_tick(d, now); /* systemd STATUS= on change, WATCHDOG=1 */

        /* Sleep until the next job is due, or d->wake: stop, TLS reload,
         * unseal, seal, share progress. */
        until = due_min(last_slow + SLOW_TICK_MS, last_flush + LOG_FLUSH_MS);
        until = due_min(until, kmsd_notify_due_ms());
        if (d->opt.probe_interval_ms > 0) {
            until = due_min(until, last_probe + d->opt.probe_interval_ms);
        }
        if (d->cluster_srv == NULL) {
            until = due_min(until, last_cluster_try + CLUSTER_RETRY_MS);
        }
        if (want && d->talos_srv == NULL) {
            until = due_min(until, talos_retry_at);
        }
        if (unsealed || readable) {
            until = due_min(until, now + LEASE_SAMPLE_MS);
        }
        (void)kmsd_wake_wait_until(&d->wake, ticket, until);
    }
    return NULL;
}
