/*
 * kmsd: the daemon's core. One `struct kmsd` per process ties together the
 * store (RocksDB), the raft node, the key material and the gRPC servers.
 *
 * Threads:
 *  - gRPC worker threads run the Talos API and cluster API handlers; a
 *    handler that must wait (leader, lease, commit, apply) parks its call on
 *    a pool instead of blocking the worker (kmsd_pool.h):
 *      write_pool  Seal and forwarded proposals (Forward on the leader);
 *      wait_pool   Unseals that wait for a lease or a read barrier;
 *      op_pool     every kmsd.v1.Operator call (writes, members add...);
 *    so a Seal blocked without quorum never delays an Unseal;
 *  - the raft thread (owned by kms_raft) applies entries to the store;
 *  - the supervisor thread opens and closes the Talos listener as the node's
 *    state changes (sealed/unsealed, read lease held/lost), picks up rotated
 *    keyrings, and publishes this node's member metadata;
 *  - main waits for signals.
 *
 * Key material: the root key R and pending unseal shares live in secure
 * memory under `mu`. The keyring handed to RPC handlers is an immutable
 * refcounted snapshot: a handler takes a reference under the read side of
 * `kr_lock` (held for a pointer copy and an atomic increment, never across
 * crypto), so sealing or rotating never frees a keyring in use. The design
 * asks for no global lock on the hot path; a reader-writer lock held for a
 * few nanoseconds is the simplest safe form of that (an unlocked atomic
 * pointer would race the final unref).
 */
#ifndef KMSD_H
#define KMSD_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_config.h"
#include "kms_err.h"
#include "kmsd_wake.h"

struct kms_store;
struct kms_raft;
struct kms_rpc_server;
struct kms_rpc_channel;
struct kms_rpc_call;
struct kms_keyring;
struct kms_share;
struct kmsd_authz;
struct kmsd_pool;
struct kmsd_hsm;
struct MHD_Daemon;

/* A registered cluster API method: its handler table row (kmsd_cluster.h)
 * joined with its policy row (cluster_api.c). */
#define KMSD_OP_METHODS 32
struct kmsd;
struct kmsd_cluster_method;
struct kmsd_op_method {
    struct kmsd *d;
    const struct kmsd_cluster_method *row; /* static table row: request type, handler */
    const char *path;   /* method path, for messages */
    unsigned flags;     /* KMSD_AUTH_* | KMSD_RUN_* from the policy table (kmsd_authz.h) */
};

/* A latency histogram: fixed buckets (KMSD_HIST_BOUNDS_US, upper bounds in
 * microseconds), one atomic add per observation and no lock; /metrics
 * renders them cumulative, in seconds. Any thread. */
#define KMSD_HIST_BUCKETS 13
#define KMSD_HIST_BOUNDS_US                                                          \
    {1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, \
     5000000, 10000000}
struct kmsd_hist {
    atomic_ullong bucket[KMSD_HIST_BUCKETS + 1]; /* per bucket, not cumulative; last +Inf */
    atomic_ullong count;
    atomic_ullong sum_us;
};
void kmsd_hist_observe(struct kmsd_hist *h, uint64_t us);

/* Talos API request counters: [0] Seal, [1] Unseal, by gRPC status code;
 * and the refusals of the limits (talos_api.c). Every metric is rendered
 * by one row of the table in http.c (docs/metrics.md: how to add one). */
#define KMSD_METRIC_CODES 17
struct kmsd_metrics {
    struct kmsd_hist talos_latency[2];  /* Talos Seal, Unseal: arrival to answer */
    struct kmsd_hist forward_latency;   /* Cluster/Forward served here: arrival to answer */
    struct kmsd_hist raft_apply_latency; /* proposal on this leader until applied */
    /* cluster API calls by method (index in kmsd.op_methods) and gRPC code */
    atomic_ullong cluster_calls[KMSD_OP_METHODS][KMSD_METRIC_CODES];
    atomic_ullong requests[2][KMSD_METRIC_CODES];
    atomic_ullong unseal_limited;       /* failing unseals refused by the limiter */
    atomic_ullong seal_quota[3];        /* Seals refused: [0] address rate, [1] UUID
                                         * rate, [2] live records per UUID */
    atomic_ullong policy_denied[2];     /* enrolment policy refusals: [0] Seal, [1] Unseal */
    atomic_ullong keyring_refresh_failures; /* replicated keyring did not decrypt */
    atomic_ullong forward_refused;          /* Forward calls refused (identity or entry) */
    atomic_ullong seal_readback_failures;   /* sealed record not found as written */
    atomic_ullong touch_writes;   /* last-access batches replicated (touch.c) */
    atomic_ullong touch_keys;     /* keys in them */
    atomic_ullong touch_dropped;  /* unseals not noted: batch table full */
};

struct kmsd_limiter;
struct kmsd_peer_unseal;
struct kmsd_touch;

struct kmsd {
    bool raft_failed;            /* set by kmsd_stop: the raft log could not be written */
    atomic_bool removed;         /* kmsd_removal_tick found this node removed: exit 4 */
    atomic_bool removal_probing; /* a removal probe job is queued or running */
    /* The validated configuration (kms_config.h), a copy whose strings and
     * lists stay owned by main's struct kms_config, which outlives the
     * daemon. Read-only after kmsd_start; d->opt.<alias> names an option as
     * config_options.h does (d->opt.talos_listen is talos.listen). */
    struct kms_config opt;
    struct kmsd_metrics metrics;
    struct MHD_Daemon *http;             /* HTTP endpoints (http.c) */
    struct kms_store *store;
    struct kms_raft *raft;
    struct kms_rpc_server *cluster_srv;
    struct kmsd_authz *authz;            /* CA stores, swapped on reload (authz.c) */
    struct kmsd_hsm *hsm;                /* PKCS#11 seal, NULL with Shamir (seal_pkcs11.c) */
    struct kmsd_pool *write_pool;        /* parked Seals and Forwards (pool.c) */
    struct kmsd_pool *wait_pool;         /* parked Unseals */
    struct kmsd_pool *op_pool;           /* operator calls (cluster_api.c) */
    struct kmsd_touch *touch;            /* last-access batches (touch.c); NULL when off.
                                          * Set before the Talos API opens, cleared after
                                          * it closed. */
    /* Handler args: filled by the first kmsd_cluster_register (supervisor
     * thread), never written again (a TLS reload registers the same ones);
     * op_methods_ready (release) publishes them to /metrics readers. */
    struct kmsd_op_method op_methods[KMSD_OP_METHODS];
    atomic_bool op_methods_ready;

    /* Talos API server: created/destroyed only by the supervisor thread
     * (which also rebuilds cluster_srv). srv_mu guards both pointers for
     * readers on other threads (TLS reload); the supervisor swaps a pointer
     * under it and stops the old server outside it. */
    pthread_mutex_t srv_mu;
    struct kms_rpc_server *talos_srv;
    atomic_bool talos_listening;         /* open and its last probe accepted */
    atomic_bool cluster_listening;       /* cluster API's last probe accepted */
    unsigned max_conns_effective;        /* per gRPC port, after the fd-limit default */
    unsigned long long fd_limit;         /* RLIMIT_NOFILE soft limit after start */
    unsigned long long listener_rebuilds; /* supervisor thread writes, metrics read */

    pthread_mutex_t mu;                  /* guards the fields below */
    bool unsealed;
    uint8_t *root;                       /* 32 bytes secure memory, while unsealed */
    struct kms_share *pending;           /* secure memory, KMSD_MAX_SHARES entries */
    size_t n_pending;
    uint32_t threshold_seen;             /* k from the replicated keyring meta */

    /* Set while the replicated keyring does not decrypt under R (a keyring
     * the cluster committed that this node cannot read): the reason, shown
     * by kmsctl status. Guarded by mu. */
    char keyring_error[160];

    pthread_rwlock_t kr_lock;            /* guards `keyring` pointer swaps */
    struct kms_keyring *keyring;         /* NULL while sealed; one reference */

    /* Forwarding channels, one per leader id seen, created lazily and kept
     * until kmsd_stop: gRPC channels are thread-safe, and never destroying
     * one while running means no call can race its destruction. */
    pthread_mutex_t fwd_mu;              /* guards the cache slots */
    struct {
        uint64_t id;
        struct kms_rpc_channel *ch;
    } fwd[KMS_CONFIG_MAX_PEERS * 2];

    /* Talos API limits (kmsd_limit.h), created at start, freed at stop. */
    struct kmsd_limiter *unseal_fail_lim; /* failed unseals per address + global */
    struct kmsd_limiter *seal_addr_lim;   /* seals per address */
    struct kmsd_limiter *seal_uuid_lim;   /* seals per node UUID */

    /* Peer unseal state (kmsd_peer.h), created at start, freed at stop. */
    struct kmsd_peer_unseal *peer;

    /* Test-only fault hook (KMSD_TEST_READ_PAUSE_MS, read at start): each
     * local read sleeps this long between its lease check and the RocksDB
     * get, to test the lease deadline rule. 0 in production. */
    unsigned test_read_pause_ms;

    /* Parked Unseals waiting for a read lease sleep on lease_wake.cv
     * (talos_unseal.c); woken by the raft thread when it publishes a lease
     * (kmsd_talos_lease_cb), by kmsd_stop and by the Talos server's stop
     * (kmsd_talos_wake). Made by kmsd_talos_init, freed by kmsd_talos_free. */
    struct {
        pthread_mutex_t mu;
        pthread_cond_t cv;  /* CLOCK_MONOTONIC */
        atomic_int waiters; /* threads inside the wait (changed under mu) */
        bool made;
    } lease_wake;

    /* TLS reload (SIGHUP): main only sets reload_requested; the supervisor
     * thread, which owns the Talos server, runs the reload, so nothing
     * touches a server another thread may be destroying. */
    atomic_bool reload_requested;
    atomic_ullong tls_reloads_ok;        /* reloads that took every file */
    atomic_ullong tls_reloads_failed;    /* reloads that kept (some) old material */
    atomic_bool tls_reload_last_failed;  /* the latest reload failed */

    atomic_bool stopping;
    /* Signalled after `stopping`, `reload_requested` and every key state
     * change; the supervisor, PKCS#11 and peer unseal threads wait on it
     * (kmsd_wake.h). Initialised first in kmsd_start; lives as long as d. */
    struct kmsd_wake wake;
    pthread_t supervisor;
    bool supervisor_started;
    uint64_t lease_lost_at_ms;           /* supervisor thread only */
};

#define KMSD_MAX_SHARES 255

/* Lifecycle (main_kmsd.c). */
int kmsd_start(struct kmsd *d, const struct kms_config *opt, struct kms_err *err);
void kmsd_stop(struct kmsd *d);
/* Asks the supervisor thread to reload TLS certificates, keys and CA
 * bundles (the supervisor wakes at once); any thread, async-signal context excluded. The
 * outcome is logged and counted in tls_reloads_ok/failed (/metrics). */
void kmsd_reload_tls(struct kmsd *d);

/* Makes dataDir private: creates it 0700 when missing, otherwise removes
 * group and other access from it and everything under it (logged). */
int kmsd_data_dir_secure(const char *dir, struct kms_err *err);

/* Key state (node_keys.c). All take d->mu themselves. */
bool kmsd_is_initialized(struct kmsd *d);
bool kmsd_is_unsealed(struct kmsd *d);
int kmsd_init_cluster(struct kmsd *d, unsigned shares, unsigned threshold,
                      char ***share_text, char cluster_id_hex[33],
                      struct kms_err *err);
int kmsd_unseal_submit(struct kmsd *d, const char *share, bool reset,
                       unsigned *progress, unsigned *threshold, bool *unsealed,
                       struct kms_err *err);
void kmsd_seal(struct kmsd *d);
/* Unseals with a root key obtained otherwise (PKCS#11 seal, peer unseal):
 * takes `root` (secure memory, KMS_SHAMIR_MAX_SECRET bytes, first 32 used)
 * in every case; checks it by decrypting the replicated keyring, else
 * nothing changes. `how` goes to the log ("via"). 0 also when already
 * unsealed. */
int kmsd_unseal_root(struct kmsd *d, uint8_t *root, const char *how, struct kms_err *err);
/* Checks and commits an encrypted keyring (init or a replacement with a
 * higher active term) under `root`; blocking, leader for non-init. */
struct Kmsd__V1__EncryptedKeyring;
int kmsd_keyring_commit(struct kmsd *d, struct Kmsd__V1__EncryptedKeyring *ek,
                        const uint8_t *root, bool init, struct kms_err *err);
/* Releases what a keyring change holds (rotate, retire term, seal
 * migration): the stored and the new encrypted keyring, the current and the
 * new keyring. Any may be NULL. */
void kmsd_keyrings_release(struct Kmsd__V1__EncryptedKeyring *ek,
                           struct Kmsd__V1__EncryptedKeyring *nek, struct kms_keyring *kr,
                           struct kms_keyring *next);
int kmsd_rotate(struct kmsd *d, uint32_t *active_term, struct kms_err *err);
void kmsd_unseal_progress(struct kmsd *d, unsigned *progress, unsigned *threshold);
/* kmsd_unseal_root with a copy of root (32 bytes, the caller's, not
 * retained): for a key that is not already in secure memory. */
int kmsd_unseal_with_root(struct kmsd *d, const uint8_t *root, const char *via,
                          struct kms_err *err);
/* Refreshes the published keyring from the store when a rotation was
 * applied (supervisor). */
void kmsd_keyring_refresh(struct kmsd *d);
/* Returns a referenced keyring or NULL when sealed; release with
 * kms_keyring_unref. */
struct kms_keyring *kmsd_keyring_get(struct kmsd *d);

/* Writes (node_propose.c): propose locally when leader, else forward to the
 * leader over the cluster API, then wait until this node applied the entry.
 * Waits up to wait_ms for a leader; a forward abandons a leader that is no
 * longer leader and retries the new one within the same budget. Blocking:
 * from pool threads (or rare operator calls), never the Talos API workers. */
struct Kmsd__V1__Entry;
struct Kmsd__V1__SealedRecord;
struct kmsd_write_result {
    uint64_t index;
    int code;          /* apply result (KMS_E*) */
    uint64_t count;
    char msg[128];
};
int kmsd_write(struct kmsd *d, const struct Kmsd__V1__Entry *e, unsigned wait_ms,
               struct kmsd_write_result *res, struct kms_err *err);
/* kmsd_write's decisions, pure (exposed for the unit tests). What it does
 * after a proposal returned rc, with leader_id the leader raft named (0:
 * none known) and forwardable kmsd_authz_entry_forwardable(the entry): */
enum kmsd_write_next {
    KMSD_WRITE_APPLIED,         /* rc 0: committed and applied here */
    KMSD_WRITE_FORWARD,         /* another node leads: forward the entry to it */
    KMSD_WRITE_REDIRECT,        /* another node leads an entry it alone proposes:
                                 * KMS_ENOTLEADER naming it (KMS_EUNAVAIL when an
                                 * earlier attempt may have committed) */
    KMSD_WRITE_RETRY,           /* no other leader known: propose again */
    KMSD_WRITE_RETRY_UNCERTAIN, /* KMS_EUNAVAIL, KMS_ETIMEDOUT: it may have committed;
                                 * propose again */
    KMSD_WRITE_FAIL,            /* any other error, returned as it is */
};
enum kmsd_write_next kmsd_write_next(int rc, uint64_t leader_id, uint64_t self_id,
                                     bool forwardable);
/* The apply code kmsd_write reports for the one it got (code): KMS_EEXIST
 * for a PutRecord after an uncertain attempt (uncertain: a proposal or a
 * forward returned KMS_EUNAVAIL) means that attempt committed, so 0; the
 * Seal then reads the record back (kmsd_record_readback) to tell it from a
 * key id another record holds. Otherwise code. */
int kmsd_write_outcome(const struct Kmsd__V1__Entry *e, int code, bool uncertain);
/* Only entries kmsd_authz_entry_forwardable() allows (PutRecord, TouchBatch) are
 * forwarded. Any other entry is proposed only by the leader: on a follower
 * kmsd_write returns KMS_ENOTLEADER with the message
 * "not the leader; leader is N at ADDR" (ADDR: the leader's cluster API) as
 * soon as a leader is known, having proposed nothing; kmsctl follows it. */
/* The same message for the operator dispatcher: fills msg and returns true
 * when another node is known to lead. Blocking up to 500 ms (raft status). */
bool kmsd_leader_redirect(struct kmsd *d, char *msg, size_t msglen);
/* Cluster API address of member id: the replicated member metadata first,
 * then initialCluster. 0 or KMS_ENOTFOUND. Any thread. */
int kmsd_member_cluster_address(struct kmsd *d, uint64_t id, char out[256]);

/* Membership probe (membership.c): asks member `peer_id`'s cluster API,
 * with a Forward that changes nothing (a NOOP, which no node accepts), whether
 * it still counts this node as a member. *denied = true when the peer
 * answered that this node is not a member of the cluster; 0 then or when it
 * answered anything else; KMS_EUNAVAIL when it could not be asked. Any
 * thread but the raft thread; blocks up to timeout_ms. */
int kmsd_member_probe(struct kmsd *d, uint64_t peer_id, unsigned timeout_ms, bool *denied,
                      struct kms_err *err);

/* Removed-node detection, called about once a second by the supervisor
 * thread only (st is its own state, zeroed before the first call; the
 * probes themselves run as a job on the operator pool). Sets
 * d->removed, logs why and sends this process SIGTERM when this node was a
 * member and (a) its raft configuration no longer lists it, or (b) it has
 * heard no leader for several election timeouts and a majority of the
 * members it knows answer that it is not a member (a removed follower
 * never receives the configuration that drops it). */
struct kmsd_removal {
    bool was_member;
    uint64_t last_probe_ms;
};
void kmsd_removal_tick(struct kmsd *d, struct kmsd_removal *st, uint64_t now_ms);
/* Reads rec's key back from this node's applied state and compares key id,
 * term, nonce, ciphertext and node uuid byte for byte. 0, or KMS_EUNAVAIL
 * (absent or different; logged at error level). */
int kmsd_record_readback(struct kmsd *d, const struct Kmsd__V1__SealedRecord *rec,
                         struct kms_err *err);
/* True when this node may serve a local read now (lease, or any applied
 * state with unsealReads: local). Lock-free. A read must still follow the
 * lease deadline rule (talos_unseal.c unseal_read). */
bool kmsd_readable(struct kmsd *d);
/* Read barrier: waits until this node applied every write acknowledged
 * anywhere before the call started (kms_raft_read_index: on a follower one
 * heartbeat round trip to the leader). Used before answering NOT_FOUND, so
 * a key sealed through another replica and acknowledged is found here too.
 * 0, or KMS_EUNAVAIL / KMS_ESHUTDOWN when it could not be done within
 * wait_ms (the caller then answers UNAVAILABLE, never NOT_FOUND).
 * Blocking: pool threads only. */
/* True when this node is in the raft configuration it holds (false for a
 * node started outside initialCluster that waits for `members add`). Any
 * thread. */
bool kmsd_raft_is_member(struct kmsd *d);
/* With unsealReads: local, a warn-level log line saying so (when: "start",
 * "unseal"). Any thread. */
void kmsd_warn_local_reads(struct kmsd *d, const char *when);
int kmsd_read_barrier(struct kmsd *d, unsigned wait_ms);
/* Commit notification, for a thread waiting for the replicated state to
 * change (an entry committed and applied here; a new leader's barrier is
 * one). kmsd_applied_mark: this node's applied index, taken BEFORE the
 * caller reads the state it waits on. kmsd_wait_applied_past: waits until
 * an entry past `mark` is applied here (raft's applied condition variable,
 * signalled by the raft thread), at most timeout_ms: 0 when one was (at
 * once if already), KMS_ETIMEDOUT, KMS_ESHUTDOWN. Any thread but raft's. */
uint64_t kmsd_applied_mark(struct kmsd *d);
int kmsd_wait_applied_past(struct kmsd *d, uint64_t mark, unsigned timeout_ms);

/* RPC services. */
/* Packs m and finishes the call OK with it (RESOURCE_EXHAUSTED when out of
 * memory); the packed copy is wiped before it is freed. Any thread. */
struct ProtobufCMessage;
void kmsd_call_finish_msg(struct kms_rpc_call *call, const struct ProtobufCMessage *m);
int kmsd_talos_register(struct kmsd *d, struct kms_rpc_server *srv);
int kmsd_cluster_register(struct kmsd *d, struct kms_rpc_server *srv);

/* Proposes this node's own member metadata (addresses, version). */
int kmsd_publish_self(struct kmsd *d, struct kms_err *err);

/* Maps a KMS_E* code to a gRPC status code. */
int kmsd_grpc_status(int code);
/* Canonical name of a gRPC status code ("OK", "UNAVAILABLE"...), "UNKNOWN"
 * outside 0..16. Static string. */
const char *kmsd_grpc_code_name(int grpc_code);

/* Talos API state (talos_api.c): d's limiters (from d->opt) and the lease
 * wake-up. Init in kmsd_start before raft starts; free at the end of
 * kmsd_stop, once raft, the pools and the servers are gone. */
int kmsd_talos_init(struct kmsd *d, struct kms_err *err);
void kmsd_talos_free(struct kmsd *d);
/* Wakes every parked Unseal so that it checks again its call, `stopping`
 * and the lease. Any thread; kmsd_stop calls it after setting `stopping`.
 * A no-op before kmsd_talos_init. */
void kmsd_talos_wake(struct kmsd *d);
/* kms_raft_config.lease_cb (arg: the kmsd): raft thread. Wakes the parked
 * Unseals only when some wait: one atomic read-modify-write otherwise. */
void kmsd_talos_lease_cb(void *arg);

#endif /* KMSD_H */
