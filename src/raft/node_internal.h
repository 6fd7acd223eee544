/*
 * Private to the raft node (node.c, node_ops.c, node_fsm.c, node_lease.c):
 * the node and request structs and the functions the files share.
 *
 * Threads: struct kms_raft's fields are grouped by who may touch them
 * (configuration: set before the raft thread starts, then read-only; "raft
 * thread only"; "shared, under mu"; "published for other threads": atomics,
 * or under applied_mu / status_mu as marked). Every kr_* function below runs
 * on the raft thread (or on the starting thread before the raft thread
 * exists, or after it is gone) unless its comment says otherwise.
 *
 * Ownership: the node is calloc'ed by kms_raft_start and freed by
 * kms_raft_free after kms_raft_shutdown; the libuv handles it embeds
 * (async, timers, check, prepare) are closed in on_raft_closed and the loop
 * is run until their close callbacks ran, before the memory goes. A struct
 * op is shared by its caller and the raft thread (refs, under mu; see
 * node_ops.c): the last reference dropped frees it, with the proposal
 * buffer it still owns (a buffer handed to raft_apply is raft's:
 * op->buf.base is NULL then).
 */
#ifndef KMS_NODE_INTERNAL_H
#define KMS_NODE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "kms_raft.h"
#include "kms_store.h"
#include "kms_transport.h"
#include "lease.h"
#include "raft_glue.h"

#define MOD "raft"
#define TICK_MS 25u
#define MAX_PEERS 16

enum op_kind { OP_PROPOSE, OP_ADD, OP_REMOVE, OP_TRANSFER, OP_STATUS, OP_RELOAD_TLS };

struct op {
    struct kms_raft *r;
    struct op *next;              /* request queue */
    enum op_kind kind;
    int refs;                     /* under r->mu */
    bool done;                    /* under r->mu */
    pthread_cond_t cv;
    int rc;
    char msg[256];
    struct kms_raft_result res;
    struct raft_buffer buf;       /* OP_PROPOSE payload, raft_malloc'd */
    uint64_t id;                  /* target server */
    char address[256];
    int stage;                    /* OP_ADD: 0 = adding, 1 = assigning voter */
    struct raft_apply apply;
    struct raft_change change;
    struct raft_transfer transfer;
    /* OP_PROPOSE in raft (raft thread only): fsm_apply copies the store's
     * result into res when it applies this op's index. */
    struct op *inflight_next, *inflight_prev;
    bool in_flight, result_set;
};

struct kms_raft {
    /* configuration */
    uint64_t id;
    char address[256];
    char bind_address[256];
    char dir[4096];
    unsigned election_ms, heartbeat_ms;
    struct kms_store *store;
    char cert_file[4096], key_file[4096], ca_file[4096];
    bool handles_inited;
    bool started;                 /* raft_start returned: restores now come from the leader */

    /* raft thread only */
    uv_loop_t loop;
    uv_async_t async;
    uv_timer_t timer;
    uv_check_t applied_check;     /* wake applied waiters once per loop turn */
    uv_prepare_t applied_prepare; /* ... and before the loop blocks */
    bool applied_dirty;           /* applied_index moved since the last wake */
    struct raft_uv_transport transport;
    struct kms_glue glue;         /* owns the raft_io */
    struct raft raft;
    struct raft_fsm fsm;          /* the fsm handed to raft (calls the store) */
    struct op *inflight;          /* proposals raft holds (raft thread only) */
    struct kms_lease lease;
    uint64_t contact_us;          /* arrival of the last LEADER stamp of our leader */
    uint64_t vote_drops;          /* vote messages dropped by the promise rule */
    uint64_t vote_drop_log_term;  /* term of the last logged drop */
    uint64_t heard_us;            /* last AppendEntries/InstallSnapshot of our term or later */
    bool releasing;               /* leases released before a transfer */
    uv_timer_t release_timer;     /* ends the release wait */
    struct op *transfer_op;       /* OP_TRANSFER waiting for the release */
    bool release_for_stop;        /* the release is the shutdown's transfer */
    int last_state;
    uint64_t barrier_term;        /* term whose start barrier was applied */
    bool barrier_pending;
    bool notify_pending;          /* a commit-notify barrier is in the log */
    uint64_t commit_notifies;     /* commit-notify barriers proposed */
    bool stopping;                /* stop sequence started */
    bool closing;                 /* raft_close called */
    uint64_t stop_deadline_ms;
    struct raft_transfer stop_transfer;
    uint64_t elections_won, snapshots_restored;
    uint64_t elections_started, leader_changes; /* raft thread */
    uint64_t last_leader_seen;                  /* raft thread: for leader_changes */
    uint64_t snapshot_index;      /* last snapshot taken or installed */

    /* Entry versions ("entry version" below; raft thread only but emit_ev) */
    uint64_t ev_peer_id[MAX_PEERS]; /* peers heard from (0 = free slot) */
    uint32_t ev_peer[MAX_PEERS];    /* highest entry version each advertised */
    uint32_t ev_logged;             /* last emitting version logged (0 = none) */

    /* Shredding after a revocation (raft thread only; see "shred" below). */
    unsigned snap_threshold, snap_trailing; /* the configured values */
    uint64_t shred_index;         /* latest revocation not yet shredded; 0 = none */
    unsigned shred_snaps;         /* snapshots persisted at >= shred_index since */
    uint64_t shred_last_snap;     /* index of the last of them */
    uint64_t shred_drive_until_ms; /* leader: propose NOOPs until then (and done) */
    uint64_t shred_noop_ms;       /* when the last NOOP was proposed */
    uint64_t shred_begin_ms;      /* when the pending shred began */
    bool shred_compacting;        /* a compaction work item is queued */
    bool shred_compact_again;     /* another revocation finished meanwhile */
    uv_work_t shred_work;
    uint64_t shreds_done;         /* completed shred rounds (logged) */

    pthread_t thread;
    bool thread_started;

    /* shared, under mu */
    pthread_mutex_t mu;
    struct op *q_head, *q_tail;
    bool stop_requested;
    bool closed;                  /* no more requests accepted */

    /* published for other threads */
    _Atomic uint64_t lease_until_us;
    void (*lease_cb)(void *arg);  /* kms_raft_config: after a valid lease is published */
    void *lease_arg;
    _Atomic uint64_t applied_index;
    _Atomic uint32_t emit_ev;     /* entry version proposals get now */
    _Atomic int waiters;
    atomic_bool shut_down;        /* kms_raft_shutdown finished: calls fail fast */
    atomic_bool failed;           /* the raft log could not be written */
    pthread_mutex_t applied_mu;
    pthread_cond_t applied_cv;
    /* Read index (kms_raft_read_index), under applied_mu, written on the
     * raft thread: at ri_at_us (this node's clock) a leader holding its
     * lease had committed at least ri_commit. */
    uint64_t ri_at_us, ri_commit;
    pthread_mutex_t status_mu;
    struct kms_raft_status status; /* under status_mu */
};

/* Shredding after a revocation (node_fsm.c "shred"). */
#define SHRED_SNAPS 3u
#define SHRED_NOOP_MS 100u
#define SHRED_DRIVE_MS 2000u
#define SHRED_ASK_MS 60000u /* a follower asks the leader for NOOPs this long */

/* ---- node.c: helpers, status, the stop sequence ---- */

/* Any thread. */
void kr_cond_init_mono(pthread_cond_t *cv);
struct timespec kr_deadline_ts(unsigned timeout_ms);
/* Raft's current leader (0 and "" when none is known). */
void kr_leader_info(struct kms_raft *r, uint64_t *id, char *addr, size_t n);
bool kr_config_has(struct kms_raft *r, uint64_t id);
/* Copies raft's state into r->status (under status_mu) and wakes applied
 * waiters. */
void kr_status_publish(struct kms_raft *r);
/* Fails every queued request and calls raft_close (once). */
void kr_begin_close(struct kms_raft *r);
void kr_stop_transfer_cb(struct raft_transfer *req);

/* ---- node_ops.c: requests ---- */

/* Raft thread: records the outcome, wakes the caller, drops the raft
 * thread's reference. */
void kr_op_complete(struct op *op, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Raft error code to KMS_E* and back. */
int kr_code_from_raft(int rv);
int kr_code_to_raft(int kms);
/* Runs one queued request. */
void kr_dispatch(struct kms_raft *r, struct op *op);
/* Releases the leases before a leadership transfer (for_stop: the
 * shutdown's own transfer); fails a transfer still waiting for it. */
void kr_release_start(struct kms_raft *r, bool for_stop);
void kr_transfer_op_shutdown(struct kms_raft *r);

/* ---- node_fsm.c: the fsm ---- */

/* Fills r->fsm (version 3) with the store-backed callbacks. */
void kr_fsm_init(struct kms_raft *r);
/* Timer tick: the leader proposes NOOPs while a shred needs snapshots. */
void kr_shred_tick(struct kms_raft *r);
/* uv check / prepare callbacks: wake kms_raft_wait_applied callers. */
void kr_applied_check_cb(uv_check_t *h);
void kr_applied_prepare_cb(uv_prepare_t *h);

/* ---- node_lease.c: leases, io hooks, stamps, entry versions ---- */

/* Notices role changes, recomputes the lease and publishes it. */
void kr_lease_update(struct kms_raft *r);
/* kms_glue_io_wrap hooks: the vote promise filter, after each received
 * message, on a raft log write failure. */
bool kr_recv_filter_cb(void *data, const struct raft_message *m);
bool kr_send_filter_cb(void *data, const struct raft_message *m);
void kr_after_recv_cb(void *data);
void kr_io_error_cb(void *data, int status, const char *errmsg);
/* kms_transport_hooks (called by the transport on the raft thread). */
bool kr_stamp_out_cb(void *data, uint64_t peer_id, struct kms_transport_stamp *s);
void kr_stamp_in_cb(void *data, uint64_t peer_id, const struct kms_transport_stamp *s,
                    uint64_t arrival_us);
bool kr_peer_allowed_cb(void *data, uint64_t peer_id);
/* Entry versions: a peer's advertised one (0: not heard), the tick's
 * recomputation of emit_ev, and stamping an entry with it (any thread:
 * reads emit_ev). */
uint32_t kr_ev_of_peer(const struct kms_raft *r, uint64_t id);
void kr_ev_update(struct kms_raft *r);
void kr_ev_stamp_entry(struct kms_raft *r, Kmsd__V1__Entry *e);

#endif /* KMS_NODE_INTERNAL_H */
