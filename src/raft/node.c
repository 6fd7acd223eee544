/*
 * The raft node: cowsql/raft 0.22 on a dedicated libuv thread.
 *
 * Threads:
 *  - the raft thread runs `loop`; it alone touches struct raft, raft_io, the
 *    transport and the store's fsm callbacks;
 *  - any other thread calls kms_raft_*: a request (struct op) is queued under
 *    `mu`, the raft thread is woken with uv_async_send (also under `mu`, so the
 *    handle cannot be closed concurrently), and the caller waits on the op's
 *    own condition variable (CLOCK_MONOTONIC) with its timeout. An op is
 *    reference counted (caller + raft thread) so a caller that times out can
 *    leave while raft still holds the embedded raft_apply/raft_change.
 *
 * Hooks into raft (all on the raft thread; the library's internals are
 * touched only through raft_glue.c):
 *  - the fsm is a wrapper around the store's: apply publishes the applied
 *    index (wakes kms_raft_wait_applied), restore counts snapshot installs;
 *  - the transport stamps every frame and reports every stamp it receives
 *    (kms_transport.h); lease.c turns them into vote promises and read
 *    leases. The lease is recomputed after each stamp and on a 25 ms timer
 *    and published as a monotonic deadline in an atomic;
 *  - RequestVote messages in and out pass the promise rule (lease.h): a
 *    node that promised a leader not to help elect anyone else drops them;
 *  - on becoming leader the node appends a barrier; the leader lease is only
 *    granted once that barrier (hence every earlier entry) is applied;
 *  - a leadership transfer first releases the leases (stamps lose their
 *    LEADER flag) and waits until every promise made on their strength has
 *    ended, so the new leader can only be elected after no old lease runs.
 */
#include "kms_raft.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "kms_log.h"
#include "kms_tsan.h"
#include "kms_store.h"
#include "kms_time.h"
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

static void raft_thread_stop_step(struct kms_raft *r);
static uint32_t ev_of_peer(const struct kms_raft *r, uint64_t id);
static void ev_stamp_entry(struct kms_raft *r, Kmsd__V1__Entry *e);

/* ------------------------------------------------------------------ helpers */

static void cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

static struct timespec deadline_ts(unsigned timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ms / 1000u;
    ts.tv_nsec += (long)(timeout_ms % 1000u) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static int mkdir_p(const char *path)
{
    char tmp[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof(tmp)) {
        return -1;
    }
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p != '\0'; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
                return -1;
            }
            *p = '/';
        }
    }
    if (mkdir(tmp, 0700) != 0 && errno != EEXIST) {
        return -1;
    }
    return 0;
}


static void leader_info(struct kms_raft *r, uint64_t *id, char *addr, size_t n)
{
    raft_id lid = 0;
    const char *la = NULL;
    raft_leader(&r->raft, &lid, &la);
    *id = lid;
    snprintf(addr, n, "%s", la != NULL ? la : "");
}

static bool config_has(struct kms_raft *r, uint64_t id)
{
    return kms_glue_member_find(&r->raft, id, NULL, NULL);
}

/* ------------------------------------------------------------------ ops */

static struct op *op_new(struct kms_raft *r, enum op_kind kind)
{
    struct op *op = calloc(1, sizeof(*op));
    if (op == NULL) {
        return NULL;
    }
    op->r = r;
    op->kind = kind;
    op->refs = 2; /* caller + raft thread */
    cond_init_mono(&op->cv);
    return op;
}

/* Under r->mu. */
static void op_unref_locked(struct op *op)
{
    if (--op->refs == 0) {
        if (op->buf.base != NULL) {
            raft_free(op->buf.base);
        }
        pthread_cond_destroy(&op->cv);
        free(op);
    }
}

/* Raft thread: finishes an op (drops the raft thread's reference). */
static void op_complete(struct op *op, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void op_complete(struct op *op, int rc, const char *fmt, ...)
{
    struct kms_raft *r = op->r;
    pthread_mutex_lock(&r->mu);
    op->rc = rc;
    if (fmt != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(op->msg, sizeof(op->msg), fmt, ap);
        va_end(ap);
    }
    op->done = true;
    pthread_cond_signal(&op->cv);
    op_unref_locked(op);
    pthread_mutex_unlock(&r->mu);
}

static void op_not_leader(struct op *op)
{
    struct kms_raft *r = op->r;
    leader_info(r, &op->res.leader_id, op->res.leader_address, sizeof(op->res.leader_address));
    if (op->res.leader_id != 0) {
        op_complete(op, KMS_ENOTLEADER, "not the leader; leader is %" PRIu64 " at %s",
                    op->res.leader_id, op->res.leader_address);
    } else {
        op_complete(op, KMS_ENOTLEADER, "not the leader; no leader known");
    }
}

/* Caller side: queue, wake the raft thread, wait. Consumes the caller's
 * reference. Copies the outcome into res/err. */
static int op_run(struct kms_raft *r, struct op *op, unsigned timeout_ms,
                  struct kms_raft_result *res, struct kms_err *err)
{
    struct timespec ts = deadline_ts(timeout_ms);
    int rc;

    pthread_mutex_lock(&r->mu);
    if (r->closed || r->stop_requested) {
        op->refs = 1; /* the raft thread never saw it */
        op_unref_locked(op);
        pthread_mutex_unlock(&r->mu);
        return kms_err_set(err, KMS_ESHUTDOWN, "raft node is shutting down");
    }
    op->next = NULL;
    if (r->q_tail != NULL) {
        r->q_tail->next = op;
    } else {
        r->q_head = op;
    }
    r->q_tail = op;
    uv_async_send(&r->async);
    while (!op->done) {
        if (pthread_cond_timedwait(&op->cv, &r->mu, &ts) == ETIMEDOUT && !op->done) {
            break;
        }
    }
    if (op->done) {
        rc = op->rc;
        if (res != NULL) {
            *res = op->res;
        }
        if (rc != 0) {
            kms_err_set(err, rc, "%s", op->msg[0] != '\0' ? op->msg : kms_strerror(rc));
        }
    } else {
        rc = kms_err_set(err, KMS_ETIMEDOUT, "no outcome within %u ms", timeout_ms);
        if (res != NULL) {
            res->index = op->res.index;
        }
    }
    op_unref_locked(op);
    pthread_mutex_unlock(&r->mu);
    return rc;
}

static int map_raft_rc(int rv)
{
    switch (rv) {
    case RAFT_NOTLEADER:
        return KMS_ENOTLEADER;
    case RAFT_LEADERSHIPLOST:
        return KMS_EUNAVAIL;
    case RAFT_SHUTDOWN:
        return KMS_ESHUTDOWN;
    case RAFT_NOMEM:
        return KMS_ENOMEM;
    case RAFT_CANTCHANGE:
    case RAFT_BUSY:
        return KMS_EBUSY;
    case RAFT_BADID:
    case RAFT_BADROLE:
    case RAFT_INVALID:
        return KMS_EINVAL;
    case RAFT_DUPLICATEID:
    case RAFT_DUPLICATEADDRESS:
        return KMS_EEXIST;
    case RAFT_NOTFOUND:
        return KMS_ENOTFOUND;
    case RAFT_NOCONNECTION:
        return KMS_EUNAVAIL;
    default:
        return KMS_ERAFT;
    }
}

/* ------------------------------------------------------------------ fsm */

/* The raft_fsm (version 3), the only one: raft calls it on the raft thread
 * (snapshot_async on an io worker) and it calls the store directly.
 *
 * apply: raft passes no index; the entry is at raft_last_applied() + 1. The
 * store's result (store-owned, reused by the next apply) is copied into the
 * proposal of that index, if this node has one; raft gets no result
 * pointer. A store error is fatal to this node: raft
 * gets RAFT_CORRUPT (RAFT_IOERR for storage, RAFT_NOMEM) and stops applying,
 * the store keeps the error sticky (kms_store_fatal).
 * snapshot: pins a RocksDB snapshot at last_applied and returns no buffers;
 * snapshot_async (worker) serialises it while applies go on; finalize
 * (raft thread) frees the buffers and unpins. restore: kms_store_restore,
 * then frees buf->base with raft_free() as raft's contract asks. */

static int fsm_raft_code(int kms)
{
    switch (kms) {
    case KMS_ENOMEM:
        return RAFT_NOMEM;
    case KMS_ESTORE:
    case KMS_EIO:
        return RAFT_IOERR;
    case KMS_EBUSY:
        return RAFT_BUSY;
    default:
        return RAFT_CORRUPT;
    }
}

/* ------------------------------------------------------------------ shred
 *
 * A revocation rewrites the record without its ciphertext (kms_store.h), but
 * the old bytes stay in three places: the raft log (the PutRecord entry),
 * raft snapshots taken before the revocation, and RocksDB's WAL/SST files.
 * When the store reports result.shred for an applied (or replayed)
 * revocation at index I, this node:
 *  1. lowers the snapshot threshold to 1 and the trailing to 1, so every
 *     newly committed entry triggers a snapshot and keeps one entry;
 *  2. (leader only) proposes a NOOP every SHRED_NOOP_MS for SHRED_DRIVE_MS
 *     after the revocation and until its own shred is done, so that entries
 *     exist to snapshot even on an idle cluster (followers apply the same
 *     NOOPs and snapshot too). A follower whose shred is still pending (it
 *     was down, or installed a snapshot) sets KMS_STAMP_SHRED on its raft
 *     frames for up to SHRED_ASK_MS, and the leader keeps proposing NOOPs
 *     while such stamps arrive;
 *  3. counts persisted snapshots at an index >= I. libraft closes the open
 *     segments at each snapshot, deletes closed segments ending before the
 *     snapshot index and keeps the two newest snapshots: after SHRED_SNAPS
 *     such snapshots no segment holding an entry <= I nor any snapshot older
 *     than I remains;
 *  4. then restores the configured threshold/trailing and runs
 *     kms_store_shred_compact() on a libuv worker (no RocksDB snapshot
 *     older than I is pinned any more: each was released at finalize).
 * The bound this gives is documented in docs/security.md "Revocation". */

#define SHRED_SNAPS 3u
#define SHRED_NOOP_MS 100u
#define SHRED_DRIVE_MS 2000u
#define SHRED_ASK_MS 60000u /* a follower asks the leader for NOOPs this long */

static void shred_begin(struct kms_raft *r, uint64_t index)
{
    if (r->shred_index == 0) {
        raft_set_snapshot_threshold(&r->raft, 1);
        raft_set_snapshot_trailing(&r->raft, 1);
    }
    r->shred_index = index;
    r->shred_snaps = 0;
    r->shred_begin_ms = kms_mono_ms();
    r->shred_drive_until_ms = kms_mono_ms() + SHRED_DRIVE_MS;
    kms_logf(KMS_LOG_INFO, MOD,
             "revocation at index %" PRIu64 ": shredding the old copies (snapshots, "
             "compaction)",
             index);
}

static void shred_work_cb(uv_work_t *w)
{
    struct kms_raft *r;
    struct kms_err err;
    /* Queued from the raft thread through libuv's (uninstrumented) work
     * queue: tell TSAN about that hand-off (kms_tsan.h). */
    KMS_TSAN_ACQUIRE(w);
    r = w->data;
    kms_err_clear(&err);
    if (kms_store_shred_compact(r->store, &err) != 0) {
        kms_logf(KMS_LOG_ERROR, MOD, "shred: compaction failed: %s", err.msg);
    }
    KMS_TSAN_RELEASE(w);
}

static void shred_compact_start(struct kms_raft *r);

static void shred_after_work_cb(uv_work_t *w, int status)
{
    struct kms_raft *r;
    KMS_TSAN_ACQUIRE(w);
    r = w->data;
    (void)status;
    r->shred_compacting = false;
    r->shreds_done++;
    kms_logf(KMS_LOG_INFO, MOD, "shred: revoked ciphertext removed from the raft log, "
                                "snapshots and store files (%" PRIu64 " rounds)",
             r->shreds_done);
    if (r->shred_compact_again && !r->closing) {
        r->shred_compact_again = false;
        shred_compact_start(r);
    }
}

static void shred_compact_start(struct kms_raft *r)
{
    if (r->shred_compacting) {
        r->shred_compact_again = true;
        return;
    }
    r->shred_work.data = r;
    KMS_TSAN_RELEASE(&r->shred_work);
    if (uv_queue_work(&r->loop, &r->shred_work, shred_work_cb, shred_after_work_cb) != 0) {
        kms_logf(KMS_LOG_ERROR, MOD, "shred: cannot queue the compaction");
        return;
    }
    r->shred_compacting = true;
}

/* After a snapshot was persisted (raft has already deleted old segments and
 * snapshots): count it towards the pending shred. */
static void shred_snapshot_done(struct kms_raft *r, uint64_t index)
{
    if (r->shred_index == 0 || index < r->shred_index || index <= r->shred_last_snap) {
        return;
    }
    r->shred_last_snap = index;
    if (++r->shred_snaps < SHRED_SNAPS) {
        return;
    }
    raft_set_snapshot_threshold(&r->raft, r->snap_threshold);
    raft_set_snapshot_trailing(&r->raft, r->snap_trailing);
    r->shred_index = 0;
    shred_compact_start(r);
}

static void shred_noop_cb(struct raft_apply *req, int status, void *result)
{
    (void)status;
    (void)result;
    free(req);
}

/* Timer tick: the leader proposes NOOPs while a shred needs snapshots. */
static void shred_tick(struct kms_raft *r)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__Noop noop = KMSD__V1__NOOP__INIT;
    struct raft_buffer buf;
    struct raft_apply *req;
    uint64_t now = kms_mono_ms();

    if (r->closing || r->stopping || kms_glue_role(&r->raft) != KMS_RAFT_LEADER ||
        (r->shred_index == 0 && now >= r->shred_drive_until_ms) ||
        now - r->shred_noop_ms < SHRED_NOOP_MS) {
        return;
    }
    r->shred_noop_ms = now;
    ev_stamp_entry(r, &e);
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    e.noop = &noop;
    if (kms_entry_encode(&e, &buf, NULL) != 0) {
        return;
    }
    req = calloc(1, sizeof(*req));
    if (req == NULL || raft_apply(&r->raft, req, &buf, 1, shred_noop_cb) != 0) {
        free(req);
        raft_free(buf.base);
    }
}

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result)
{
    struct kms_raft *r = fsm->data;
    raft_index index = raft_last_applied(&r->raft) + 1;
    const struct kms_store_result *sr = NULL;
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    *result = NULL;
    rc = kms_store_apply_borrowed(r->store, index, buf->base, buf->len, &sr, &err);
    if (rc != 0) {
        kms_logf(KMS_LOG_ERROR, MOD, "store refused entry %llu: %s: node halts applying",
                 (unsigned long long)index, err.msg);
        return fsm_raft_code(rc);
    }
    /* raft 0.22 queues apply callbacks and fires them after a whole batch
     * is applied, so a result the store reuses would be overwritten by the
     * next entry's before apply_cb runs: copy it into the op now. */
    for (struct op *op = r->inflight; op != NULL; op = op->inflight_next) {
        if (op->apply.index == index) {
            op->res.code = sr->code;
            op->res.count = sr->count;
            snprintf(op->res.msg, sizeof(op->res.msg), "%s", sr->msg);
            op->result_set = true;
            break;
        }
    }
    if (sr->shred) {
        shred_begin(r, index);
    }
    atomic_store(&r->applied_index, index);
    /* Waiters are woken by applied_wake_cb once the whole batch raft is
     * applying now is done: a broadcast per entry woke every waiting
     * thread once per entry (a follower with 20 forwarded seals in flight
     * did 20 futex wakes and context switches per applied entry). */
    r->applied_dirty = true;
    return 0;
}

/* uv check + prepare (raft thread): after every loop turn's callbacks and
 * before it blocks, wake the threads waiting for an applied index. */
static void applied_wake(struct kms_raft *r)
{
    if (!r->applied_dirty) {
        return;
    }
    r->applied_dirty = false;
    if (atomic_load(&r->waiters) > 0) {
        pthread_mutex_lock(&r->applied_mu);
        pthread_cond_broadcast(&r->applied_cv);
        pthread_mutex_unlock(&r->applied_mu);
    }
}

static void applied_check_cb(uv_check_t *h)
{
    applied_wake(h->data);
}

static void applied_prepare_cb(uv_prepare_t *h)
{
    applied_wake(h->data);
}

static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    struct kms_raft *r = fsm->data;
    struct kms_err err;
    uint64_t index = raft_last_applied(&r->raft);
    int rc;

    kms_err_clear(&err);
    *bufs = NULL;
    *n_bufs = 0;
    rc = kms_store_snapshot_pin(r->store, index, &err);
    if (rc != 0) {
        return fsm_raft_code(rc);
    }
    /* raft 0.22 keeps its snapshot index in the opaque raft_log. */
    r->snapshot_index = index;
    return 0;
}

static int fsm_snapshot_async(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    struct kms_raft *r = fsm->data;
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    rc = kms_store_snapshot_pinned(r->store, bufs, n_bufs, &err);
    if (rc != 0) {
        kms_logf(KMS_LOG_ERROR, MOD, "%s", err.msg);
        return rc == KMS_ENOMEM ? RAFT_NOMEM : RAFT_IOERR;
    }
    return 0;
}

static int fsm_snapshot_finalize(struct raft_fsm *fsm, struct raft_buffer *bufs[],
                                 unsigned *n_bufs)
{
    struct kms_raft *r = fsm->data;
    kms_store_snapshot_free(*bufs, *n_bufs);
    *bufs = NULL;
    *n_bufs = 0;
    kms_store_snapshot_unpin(r->store);
    shred_snapshot_done(r, r->snapshot_index);
    return 0;
}

static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    struct kms_raft *r = fsm->data;
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    rc = kms_store_restore(r->store, buf->base, buf->len, NULL, &err);
    if (rc != 0) {
        kms_logf(KMS_LOG_ERROR, MOD, "snapshot restore failed: %s", err.msg);
        return fsm_raft_code(rc);
    }
    raft_free(buf->base);
    buf->base = NULL;
    buf->len = 0;
    r->snapshot_index = kms_store_applied_index(r->store);
    if (!r->started) {
        kms_logf(KMS_LOG_INFO, MOD, "restored the local snapshot at start-up");
    } else {
        r->snapshots_restored++;
        /* The store's old values (replaced by range deletes) stay in its
         * files until compacted, and the old local snapshots until two new
         * ones exist: shred as after a revocation. */
        shred_begin(r, r->snapshot_index);
        kms_logf(KMS_LOG_INFO, MOD, "restored a snapshot from the leader (%" PRIu64 " so far)",
                 r->snapshots_restored);
    }
    return 0;
}

static void fsm_init(struct kms_raft *r)
{
    memset(&r->fsm, 0, sizeof(r->fsm));
    r->fsm.version = 3;
    r->fsm.data = r;
    r->fsm.apply = fsm_apply;
    r->fsm.snapshot = fsm_snapshot;
    r->fsm.restore = fsm_restore;
    r->fsm.snapshot_finalize = fsm_snapshot_finalize;
    r->fsm.snapshot_async = fsm_snapshot_async;
}

/* ------------------------------------------------------------------ lease */

static void start_barrier(struct kms_raft *r);

/* raft's state as lease.c sees it. `voters` must hold MAX_PEERS ids. */
static void lease_view(struct kms_raft *r, struct kms_lease_view *v, uint64_t *voters)
{
    memset(v, 0, sizeof(*v));
    v->role = kms_glue_role(&r->raft);
    v->term = kms_glue_term(&r->raft);
    v->leader_id = v->role == KMS_RAFT_LEADER ? r->id : kms_glue_follower_leader(&r->raft);
    v->applied = raft_last_applied(&r->raft);
    v->commit = kms_glue_commit(&r->raft);
    v->barrier_applied = r->barrier_term == v->term;
    v->releasing = r->releasing || r->stopping || kms_glue_transfer_pending(&r->raft);
    v->voters = voters;
    v->n_voters = kms_glue_voters(&r->raft, voters, MAX_PEERS);
}

/* Recomputes the lease from view v and publishes its deadline (none while
 * closing or after a disk failure). */
/* Raft thread: a leader holding its lease had committed `commit` at
 * `at_us` (this node's clock). Wakes kms_raft_read_index callers. */
static void read_index_note(struct kms_raft *r, uint64_t at_us, uint64_t commit)
{
    pthread_mutex_lock(&r->applied_mu);
    if (at_us > r->ri_at_us) {
        r->ri_at_us = at_us;
    }
    if (commit > r->ri_commit) {
        r->ri_commit = commit;
    }
    if (atomic_load(&r->waiters) > 0) {
        pthread_cond_broadcast(&r->applied_cv);
    }
    pthread_mutex_unlock(&r->applied_mu);
}

static void lease_publish(struct kms_raft *r, const struct kms_lease_view *v)
{
    uint64_t until = 0, now = kms_mono_us();
    if (!r->closing && !atomic_load(&r->failed)) {
        until = kms_lease_compute(&r->lease, now, v);
    }
    atomic_store_explicit(&r->lease_until_us, until, memory_order_release);
    if (until > now && r->lease_cb != NULL) {
        r->lease_cb(r->lease_arg);
    }
    if (v->role == KMS_RAFT_LEADER && until > now) {
        /* Commit only advances on this thread and every write is
         * acknowledged after its commit: v->commit covers every write
         * acknowledged before now, and no later leader exists yet. */
        read_index_note(r, now, v->commit);
    }
}

/* Raft thread: notice role changes, recompute the lease and publish it. */
static void lease_update(struct kms_raft *r)
{
    uint64_t voters[MAX_PEERS];
    struct kms_lease_view v;
    int state = kms_glue_role(&r->raft);

    if (state != r->last_state) {
        if (state == KMS_RAFT_LEADER) {
            r->elections_won++;
            if (r->last_state != KMS_RAFT_CANDIDATE) {
                r->elections_started++; /* its candidacy fell between two looks */
            }
            kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " is leader for term %" PRIu64, r->id,
                     kms_glue_term(&r->raft));
            start_barrier(r);
        } else if (r->last_state == KMS_RAFT_LEADER) {
            kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " is no longer leader (term %" PRIu64 ")",
                     r->id, kms_glue_term(&r->raft));
        }
        if (state == KMS_RAFT_CANDIDATE) {
            r->elections_started++;
            kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " stands for election (term %" PRIu64 ")",
                     r->id, kms_glue_term(&r->raft));
        }
        r->last_state = state;
    }
    lease_view(r, &v, voters);
    lease_publish(r, &v);
}

static void barrier_cb(struct raft_barrier *req, int status)
{
    struct kms_raft *r = req->data;
    if (status == 0 && kms_glue_role(&r->raft) == KMS_RAFT_LEADER) {
        r->barrier_term = kms_glue_term(&r->raft);
        lease_update(r);
    }
    r->barrier_pending = false;
    free(req);
}

static void start_barrier(struct kms_raft *r)
{
    struct raft_barrier *req;
    int rv;
    if (r->barrier_pending || r->closing) {
        /* A barrier of an older term is failed by raft on step-down before
         * we can be leader again; if one is still pending it is ours. */
        return;
    }
    req = calloc(1, sizeof(*req));
    if (req == NULL) {
        return;
    }
    req->data = r;
    rv = raft_barrier(&r->raft, req, barrier_cb);
    if (rv != 0) {
        kms_logf(KMS_LOG_WARN, MOD, "term-start barrier: %s", raft_strerror(rv));
        free(req);
        return;
    }
    r->barrier_pending = true;
}

/* ------------------------------------------------------------------ status */

static void status_publish(struct kms_raft *r)
{
    struct kms_raft_status st;
    uint64_t now_us = kms_mono_us();
    raft_index applied = raft_last_applied(&r->raft);

    memset(&st, 0, sizeof(st));
    st.id = r->id;
    st.role = kms_glue_role(&r->raft);
    st.term = kms_glue_term(&r->raft);
    st.commit_index = kms_glue_commit(&r->raft);
    st.applied_index = applied;
    leader_info(r, &st.leader_id, st.leader_address, sizeof(st.leader_address));
    if (st.leader_id != r->last_leader_seen) {
        if (r->last_leader_seen != 0 || st.leader_id != 0) {
            r->leader_changes++;
        }
        r->last_leader_seen = st.leader_id;
    }
    for (size_t i = 0; i < kms_glue_n_members(&r->raft) && st.n_members < 16; i++) {
        const char *addr;
        if (!kms_glue_member_at(&r->raft, i, &st.members[st.n_members].id, &addr,
                                &st.members[st.n_members].role)) {
            break;
        }
        snprintf(st.members[st.n_members].address, sizeof(st.members[0].address), "%s", addr);
        st.member_entry_version[st.n_members] = st.members[st.n_members].id == r->id
                                                    ? KMS_ENTRY_VERSION
                                                    : ev_of_peer(r, st.members[st.n_members].id);
        st.n_members++;
    }
    if (st.role == KMS_RAFT_LEADER) {
        st.last_leader_contact_ms = 0;
    } else if (r->contact_us != 0) {
        st.last_leader_contact_ms = (now_us - r->contact_us) / 1000u;
    } else {
        st.last_leader_contact_ms = UINT64_MAX;
    }
    st.last_index = raft_last_index(&r->raft);
    st.snapshot_index = r->snapshot_index;
    st.snapshots_restored = r->snapshots_restored;
    st.elections_won = r->elections_won;
    st.entry_version = atomic_load(&r->emit_ev);
    st.elections_started = r->elections_started;
    st.leader_changes = r->leader_changes;

    if (applied > atomic_load(&r->applied_index)) {
        atomic_store(&r->applied_index, applied); /* e.g. after a snapshot install */
    }
    if (atomic_load(&r->waiters) > 0) {
        pthread_mutex_lock(&r->applied_mu);
        pthread_cond_broadcast(&r->applied_cv);
        pthread_mutex_unlock(&r->applied_mu);
    }
    pthread_mutex_lock(&r->status_mu);
    r->status = st;
    pthread_mutex_unlock(&r->status_mu);
}

/* ------------------------------------------------------------------ io hooks */

/* Every vote message, in or out, passes the promise rule (lease.h). A
 * RequestVote that may pass reaches raft, whose own rule rejects votes
 * while a leader is known; once our promise has ended (no LEADER stamp for
 * a full election timeout) and no AppendEntries has arrived for as long,
 * we forget the leader (raft thesis 4.2.3: refuse votes only "within the
 * minimum election timeout of hearing from a current leader"). */
static bool vote_filter(struct kms_raft *r, const struct raft_message *m, bool incoming)
{
    uint64_t term, now = kms_mono_us();
    bool pre_vote, disrupt;

    if (kms_glue_msg_from_leader(m, &term)) {
        if (incoming && term >= kms_glue_term(&r->raft)) {
            r->heard_us = now;
        }
        return true;
    }
    if (!kms_glue_msg_vote(m, &term, &pre_vote, &disrupt)) {
        return true;
    }
    if (!kms_lease_vote_allowed(&r->lease, term, now)) {
        uint64_t left = r->lease.promise_end_us - now;
        bool held = false;
        if (incoming && left <= (uint64_t)r->election_ms * 500u) {
            /* Ends soon: look at it again then rather than losing a round. */
            kms_glue_hold_vote(&r->glue, m, (unsigned)(left / 1000u) + 2u);
            held = true;
        }
        /* The first drop of each term is logged (an election episode),
         * then every 64th. */
        if (r->vote_drops++ % 64 == 0 || term != r->vote_drop_log_term) {
            r->vote_drop_log_term = term;
            kms_logf(KMS_LOG_INFO, MOD,
                     "%s for term %" PRIu64 " %s node %llu %s: promised no votes above term "
                     "%" PRIu64 " for %" PRIu64 " ms more (%" PRIu64 " so far)",
                     pre_vote ? "pre-vote" : "vote request", term, incoming ? "from" : "to",
                     (unsigned long long)m->server_id, held ? "held" : "dropped",
                     r->lease.promise_term, left / 1000u, r->vote_drops);
        }
        return false;
    }
    /* Also silent at the raft level for a full election timeout: a leader
     * that sends no stamps (an older kmsd during a rolling upgrade) relies
     * on raft's own "no votes while a leader is heard" rule. */
    if (incoming && !disrupt && kms_glue_follower_leader(&r->raft) != 0 &&
        now - r->heard_us >= (uint64_t)r->election_ms * 1000u) {
        kms_logf(KMS_LOG_INFO, MOD,
                 "leader %" PRIu64 " silent past its promise: considering %s from %llu",
                 kms_glue_follower_leader(&r->raft), pre_vote ? "pre-vote" : "vote request",
                 (unsigned long long)m->server_id);
        kms_glue_forget_leader(&r->raft);
    }
    return true;
}

static bool recv_filter_cb(void *data, const struct raft_message *m)
{
    return vote_filter(data, m, true);
}

static bool send_filter_cb(void *data, const struct raft_message *m)
{
    return vote_filter(data, m, false);
}

/* The raft log could not be written (EIO, ENOSPC): this node must not go
 * on as if it had. It keeps no lease, refuses every request, and asks the
 * process to stop (SIGTERM to itself: kmsd's main thread handles it and
 * exits non-zero, see kms_raft_failed). */
static void io_error_cb(void *data, int status, const char *errmsg)
{
    struct kms_raft *r = data;
    kms_logf(KMS_LOG_ERROR, MOD,
             "raft log write failed: %s (%s); node %" PRIu64 " stops: it cannot keep its log",
             raft_strerror(status), errmsg != NULL && errmsg[0] != '\0' ? errmsg : "no detail",
             r->id);
    atomic_store(&r->failed, true);
    atomic_store(&r->lease_until_us, 0);
    kill(getpid(), SIGTERM);
}

/* Role changes (and the term-start barrier) are noticed right after raft
 * processed the message that caused them. */
static void after_recv_cb(void *data)
{
    lease_update(data);
}

/* ------------------------------------------------------------- entry version
 *
 * Every stamp carries the highest Entry.version its sender applies
 * (KMS_STAMP_EV_SHIFT; a kmsd without it sends 0, counted as 1). Each node
 * keeps the newest value per peer; the version proposals get is the lowest
 * over the members of the current configuration (itself: KMS_ENTRY_VERSION;
 * a member not heard from yet: 1), raised to the highest version the store
 * already applied: once a version is in the log it is emitted from then on,
 * so a replica downgraded later meets it and stops instead of the cluster
 * silently going back. Computed on the raft thread at every tick. */

static uint32_t ev_of_peer(const struct kms_raft *r, uint64_t id)
{
    for (size_t i = 0; i < MAX_PEERS; i++) {
        if (r->ev_peer_id[i] == id) {
            return r->ev_peer[i];
        }
    }
    return 0;
}

static void ev_note(struct kms_raft *r, uint64_t id, uint32_t ev)
{
    size_t free_slot = MAX_PEERS;
    for (size_t i = 0; i < MAX_PEERS; i++) {
        if (r->ev_peer_id[i] == id) {
            r->ev_peer[i] = ev;
            return;
        }
        if (r->ev_peer_id[i] == 0 && free_slot == MAX_PEERS) {
            free_slot = i;
        }
    }
    if (free_slot == MAX_PEERS) {
        /* Full of peers no longer in the configuration: reuse one. */
        for (size_t i = 0; i < MAX_PEERS; i++) {
            if (!config_has(r, r->ev_peer_id[i])) {
                free_slot = i;
                break;
            }
        }
    }
    if (free_slot < MAX_PEERS) {
        r->ev_peer_id[free_slot] = id;
        r->ev_peer[free_slot] = ev;
    }
}

static void ev_update(struct kms_raft *r)
{
    uint32_t ev = KMS_ENTRY_VERSION, applied = kms_store_entry_version(r->store);
    uint64_t low_id = 0;

    for (size_t i = 0; i < kms_glue_n_members(&r->raft); i++) {
        uint64_t id;
        const char *addr;
        int role;
        uint32_t pv;
        if (!kms_glue_member_at(&r->raft, i, &id, &addr, &role) || id == r->id) {
            continue;
        }
        pv = ev_of_peer(r, id);
        pv = pv == 0 ? 1 : pv;
        if (pv < ev) {
            ev = pv;
            low_id = id;
        }
    }
    bool held = false;
    if (applied > ev) {
        ev = applied > KMS_ENTRY_VERSION ? KMS_ENTRY_VERSION : applied;
        held = true;
    }
    atomic_store(&r->emit_ev, ev);
    if (kms_glue_role(&r->raft) == KMS_RAFT_LEADER && ev != r->ev_logged) {
        if (held && low_id != 0) {
            kms_logf(KMS_LOG_WARN, MOD,
                     "emitting raft entry version %u: the log already holds it, though member "
                     "%llu advertises less (it will stop at the first such entry: upgrade it)",
                     (unsigned)ev, (unsigned long long)low_id);
        } else if (low_id != 0) {
            kms_logf(KMS_LOG_INFO, MOD,
                     "emitting raft entry version %u: member %llu advertises no higher "
                     "(this kmsd supports %u)",
                     (unsigned)ev, (unsigned long long)low_id, (unsigned)KMS_ENTRY_VERSION);
        } else {
            kms_logf(KMS_LOG_INFO, MOD, "emitting raft entry version %u%s", (unsigned)ev,
                     held ? ": the log already holds it" : ": every member advertises it");
        }
        r->ev_logged = ev;
    }
}

/* Sets e's version (and proposer) to what this node emits now. */
static void ev_stamp_entry(struct kms_raft *r, Kmsd__V1__Entry *e)
{
    uint32_t ev = atomic_load(&r->emit_ev);
    e->version = ev == 0 ? 1 : ev;
    e->proposer_id = e->version >= 2 ? r->id : 0;
}

static bool stamp_out_cb(void *data, uint64_t peer_id, struct kms_transport_stamp *s)
{
    struct kms_raft *r = data;
    uint64_t voters[MAX_PEERS];
    struct kms_lease_view v;
    if (r->closing) {
        return false;
    }
    lease_view(r, &v, voters);
    if (!kms_lease_stamp_out(&r->lease, peer_id, kms_mono_us(), &v, s)) {
        return false;
    }
    if (r->shred_index != 0 && kms_mono_ms() - r->shred_begin_ms < SHRED_ASK_MS) {
        s->flags |= KMS_STAMP_SHRED;
    }
    s->flags |= (uint64_t)(KMS_ENTRY_VERSION & KMS_STAMP_EV_MASK) << KMS_STAMP_EV_SHIFT;
    return true;
}

static void stamp_in_cb(void *data, uint64_t peer_id, const struct kms_transport_stamp *s,
                        uint64_t arrival_us)
{
    struct kms_raft *r = data;
    uint64_t voters[MAX_PEERS];
    struct kms_lease_view v;
    if (r->closing) {
        return;
    }
    lease_view(r, &v, voters);
    ev_note(r, peer_id, (uint32_t)((s->flags >> KMS_STAMP_EV_SHIFT) & KMS_STAMP_EV_MASK));
    kms_lease_on_stamp(&r->lease, peer_id, s, arrival_us, &v);
    if ((s->flags & KMS_STAMP_LEADER) != 0 && s->term >= v.term) {
        r->contact_us = arrival_us;
        if (s->lease_rem_us > 0 && s->echo_us != 0 && s->echo_us <= arrival_us) {
            /* The leader sent this after receiving our frame sent at
             * echo_us, while it held its lease (rem > 0 needs its
             * term-start barrier applied): its commit then covers every
             * write acknowledged before echo_us on our clock. */
            read_index_note(r, s->echo_us, s->commit);
        }
    }
    if ((s->flags & KMS_STAMP_SHRED) != 0) {
        /* A follower (restarted, or lagging) still shreds: keep proposing
         * NOOPs for a little while (shred_tick, leader only). */
        uint64_t until = kms_mono_ms() + 3u * SHRED_NOOP_MS;
        if (until > r->shred_drive_until_ms) {
            r->shred_drive_until_ms = until;
        }
    }
    /* Inside the transport's read callback: only recompute and publish
     * (lease_update may start a barrier, which must not happen here). */
    lease_publish(r, &v);
}

/* Incoming raft connections only from members, or from anyone while this
 * node has no configuration yet (it waits to be added). */
static bool peer_allowed_cb(void *data, uint64_t peer_id)
{
    struct kms_raft *r = data;
    return kms_glue_n_members(&r->raft) == 0 || config_has(r, peer_id);
}

/* ------------------------------------------------------------------ dispatch */

static void inflight_add(struct kms_raft *r, struct op *op)
{
    op->inflight_prev = NULL;
    op->inflight_next = r->inflight;
    if (r->inflight != NULL) {
        r->inflight->inflight_prev = op;
    }
    r->inflight = op;
    op->in_flight = true;
}

static void inflight_remove(struct kms_raft *r, struct op *op)
{
    if (!op->in_flight) {
        return;
    }
    if (op->inflight_prev != NULL) {
        op->inflight_prev->inflight_next = op->inflight_next;
    } else {
        r->inflight = op->inflight_next;
    }
    if (op->inflight_next != NULL) {
        op->inflight_next->inflight_prev = op->inflight_prev;
    }
    op->inflight_next = op->inflight_prev = NULL;
    op->in_flight = false;
}

static void notify_cb(struct raft_barrier *req, int status)
{
    struct kms_raft *r = req->data;
    (void)status; /* nobody waits for it: it only carried a commit index */
    r->notify_pending = false;
    free(req);
}

/* Leader, raft thread: the last proposal in flight just committed. A
 * follower learns a commit index only from the leader's next AppendEntries,
 * which, with nothing more to replicate, is the next heartbeat (up to two
 * heartbeat timeouts away: raft ticks once per heartbeat timeout). A
 * forwarded Seal waits on its follower until that follower applied it, so
 * an idle leader would add ~1-2 heartbeats to every forwarded write. A
 * barrier (an empty entry) is replicated at once and carries the new commit
 * index to every follower; it costs one batched append and is proposed only
 * when nothing else is in flight (under load the next proposals carry the
 * commit index anyway), and never for a barrier's own commit. */
static void commit_notify(struct kms_raft *r)
{
    struct raft_barrier *req;
    if (r->inflight != NULL || r->notify_pending || r->closing || r->stopping ||
        kms_glue_role(&r->raft) != KMS_RAFT_LEADER || kms_glue_n_members(&r->raft) < 2) {
        return;
    }
    req = calloc(1, sizeof(*req));
    if (req == NULL) {
        return;
    }
    req->data = r;
    if (raft_barrier(&r->raft, req, notify_cb) != 0) {
        free(req);
        return;
    }
    r->notify_pending = true;
    r->commit_notifies++;
}

static void apply_cb(struct raft_apply *req, int status, void *result)
{
    struct op *op = req->data;
    struct kms_raft *r = op->r;
    (void)result; /* fsm_apply copied the store's result into op->res */
    inflight_remove(r, op);
    if (status == 0) {
        op->res.index = req->index;
        if (!op->result_set) {
            op_complete(op, KMS_EUNAVAIL,
                        "entry %llu applied but its result was not recorded; outcome unknown",
                        (unsigned long long)req->index);
            return;
        }
        op_complete(op, 0, NULL);
        commit_notify(r);
        return;
    }
    leader_info(r, &op->res.leader_id, op->res.leader_address, sizeof(op->res.leader_address));
    op->res.index = req->index;
    if (status == RAFT_LEADERSHIPLOST) {
        op_complete(op, r->closing ? KMS_ESHUTDOWN : KMS_EUNAVAIL,
                    "leadership lost before entry %llu committed; outcome unknown",
                    (unsigned long long)req->index);
    } else {
        op_complete(op, map_raft_rc(status), "entry %llu: %s", (unsigned long long)req->index,
                    raft_strerror(status));
    }
}

static void change_cb(struct raft_change *req, int status)
{
    struct op *op = req->data;
    struct kms_raft *r = op->r;
    int rv;

    if (status != 0) {
        op_complete(op, map_raft_rc(status), "membership change for %" PRIu64 ": %s", op->id,
                    raft_strerror(status));
        return;
    }
    if (op->kind == OP_ADD && op->stage == 0) {
        op->stage = 1;
        if (r->closing) {
            op_complete(op, KMS_ESHUTDOWN, "shutting down");
            return;
        }
        rv = raft_assign(&r->raft, &op->change, op->id, RAFT_VOTER, change_cb);
        if (rv != 0) {
            op_complete(op, map_raft_rc(rv), "promote %" PRIu64 " to voter: %s (%s)", op->id,
                        raft_strerror(rv), raft_errmsg(&r->raft));
        }
        return;
    }
    kms_logf(KMS_LOG_INFO, MOD, "membership: %s %" PRIu64 " committed",
             op->kind == OP_ADD ? "added voter" : "removed", op->id);
    status_publish(r);
    op_complete(op, 0, NULL);
}

static void transfer_cb(struct raft_transfer *req)
{
    struct op *op = req->data;
    struct kms_raft *r = op->r;
    uint64_t lid;
    char addr[256];
    r->releasing = false;
    leader_info(r, &lid, addr, sizeof(addr));
    op->res.leader_id = lid;
    snprintf(op->res.leader_address, sizeof(op->res.leader_address), "%s", addr);
    lease_update(r);
    status_publish(r);
    if (lid != 0 && lid != r->id && (op->id == 0 || lid == op->id)) {
        kms_logf(KMS_LOG_INFO, MOD, "leadership transferred to %" PRIu64, lid);
        op_complete(op, 0, NULL);
    } else {
        op_complete(op, KMS_ETIMEDOUT, "leadership transfer did not complete (leader now %" PRIu64 ")",
                    lid);
    }
}

/* Leadership transfer, in two steps. First release: stamps lose their
 * LEADER flag, our lease ends at once, and we wait until every promise a
 * follower made on the strength of our stamps (and our own) has ended
 * (kms_lease_release_wait_us). Only then raft_transfer: the new leader's
 * election can then not overlap any lease granted under us. */
static void stop_transfer_cb(struct raft_transfer *req);
static void begin_close(struct kms_raft *r);

/* Fails a transfer still waiting for its release (shutdown). */
static void transfer_op_shutdown(struct kms_raft *r)
{
    struct op *t = r->transfer_op;
    if (t != NULL) {
        r->transfer_op = NULL;
        op_complete(t, KMS_ESHUTDOWN, "raft node is shutting down");
    }
}

static void release_timer_cb(uv_timer_t *t)
{
    struct kms_raft *r = t->data;
    uint64_t wait = kms_lease_release_wait_us(&r->lease, kms_mono_us());
    struct op *op;
    int rv;

    if (r->closing) {
        return;
    }
    if (wait > 0) {
        uv_timer_start(&r->release_timer, release_timer_cb, wait / 1000u + 1u, 0);
        return;
    }
    if (r->release_for_stop) {
        memset(&r->stop_transfer, 0, sizeof(r->stop_transfer));
        r->stop_transfer.data = r;
        rv = kms_glue_role(&r->raft) == KMS_RAFT_LEADER
                 ? raft_transfer(&r->raft, &r->stop_transfer, 0, stop_transfer_cb)
                 : RAFT_NOTLEADER;
        if (rv != 0) {
            kms_logf(KMS_LOG_WARN, MOD, "shutting down: leadership transfer not started: %s",
                     raft_strerror(rv));
            begin_close(r);
            return;
        }
        r->stop_deadline_ms = kms_mono_ms() + r->election_ms + 500u;
        kms_logf(KMS_LOG_INFO, MOD, "shutting down: leases released, transferring leadership");
        return;
    }
    op = r->transfer_op;
    r->transfer_op = NULL;
    if (op == NULL) {
        r->releasing = false;
        return;
    }
    if (kms_glue_role(&r->raft) != KMS_RAFT_LEADER) {
        r->releasing = false;
        op_not_leader(op);
        return;
    }
    op->transfer.data = op;
    rv = raft_transfer(&r->raft, &op->transfer, op->id, transfer_cb);
    if (rv != 0) {
        r->releasing = false;
        lease_update(r);
        op_complete(op, rv == RAFT_NOTFOUND ? KMS_EUNAVAIL : map_raft_rc(rv),
                    "transfer to %" PRIu64 ": %s (%s)", op->id, raft_strerror(rv),
                    raft_errmsg(&r->raft));
    }
}

static void release_start(struct kms_raft *r, bool for_stop)
{
    uint64_t wait;
    r->releasing = true;
    r->release_for_stop = for_stop;
    lease_update(r); /* no lease from now on */
    wait = kms_lease_release_wait_us(&r->lease, kms_mono_us());
    kms_logf(KMS_LOG_INFO, MOD, "releasing read leases for a leadership transfer (%" PRIu64 " ms)",
             wait / 1000u);
    uv_timer_start(&r->release_timer, release_timer_cb, wait / 1000u + 1u, 0);
}

static void dispatch(struct kms_raft *r, struct op *op)
{
    int rv;

    if (op->kind == OP_RELOAD_TLS) {
        struct kms_err e;
        kms_err_clear(&e);
        if (kms_transport_tls_reload(&r->transport, r->cert_file, r->key_file, r->ca_file,
                                            &e) != 0) {
            op_complete(op, e.code != 0 ? e.code : KMS_ETLS, "%s", e.msg);
        } else {
            kms_logf(KMS_LOG_INFO, MOD, "raft transport certificates reloaded");
            op_complete(op, 0, NULL);
        }
        return;
    }
    if (op->kind == OP_STATUS) {
        lease_update(r);
        status_publish(r);
        op_complete(op, 0, NULL);
        return;
    }
    if (r->stopping) {
        op_complete(op, KMS_ESHUTDOWN, "raft node is shutting down");
        return;
    }
    if (atomic_load(&r->failed)) {
        op_complete(op, KMS_EIO, "the raft log of this node could not be written");
        return;
    }
    if (kms_glue_role(&r->raft) != KMS_RAFT_LEADER) {
        op_not_leader(op);
        return;
    }
    switch (op->kind) {
    case OP_PROPOSE: {
        struct raft_buffer buf = op->buf;
        op->apply.data = op;
        rv = raft_apply(&r->raft, &op->apply, &buf, 1, apply_cb);
        if (rv != 0) {
            if (rv == RAFT_NOTLEADER) {
                op_not_leader(op);
            } else {
                op_complete(op, map_raft_rc(rv), "raft_apply: %s", raft_strerror(rv));
            }
            return;
        }
        op->buf.base = NULL; /* owned by raft now */
        op->res.index = op->apply.index;
        inflight_add(r, op);
        return;
    }
    case OP_ADD: {
        const char *maddr;
        int mrole;
        op->change.data = op;
        if (kms_glue_member_find(&r->raft, op->id, &maddr, &mrole)) {
            if (strcmp(maddr, op->address) != 0) {
                op_complete(op, KMS_EEXIST, "server %" PRIu64 " is already a member at %s", op->id,
                            maddr);
                return;
            }
            if (mrole == KMS_RAFT_VOTER) {
                op_complete(op, 0, NULL);
                return;
            }
            op->stage = 1;
            rv = raft_assign(&r->raft, &op->change, op->id, RAFT_VOTER, change_cb);
        } else {
            op->stage = 0;
            rv = raft_add(&r->raft, &op->change, op->id, op->address, change_cb);
        }
        if (rv != 0) {
            op_complete(op, map_raft_rc(rv), "add %" PRIu64 " at %s: %s (%s)", op->id, op->address,
                        raft_strerror(rv), raft_errmsg(&r->raft));
        }
        return;
    }
    case OP_REMOVE:
        if (!config_has(r, op->id)) {
            op_complete(op, KMS_ENOTFOUND, "server %" PRIu64 " is not a member", op->id);
            return;
        }
        op->change.data = op;
        rv = raft_remove(&r->raft, &op->change, op->id, change_cb);
        if (rv != 0) {
            op_complete(op, map_raft_rc(rv), "remove %" PRIu64 ": %s (%s)", op->id,
                        raft_strerror(rv), raft_errmsg(&r->raft));
        }
        return;
    case OP_STATUS:
    case OP_RELOAD_TLS:
        return;
    case OP_TRANSFER:
        if (r->transfer_op != NULL || r->releasing || kms_glue_transfer_pending(&r->raft)) {
            op_complete(op, KMS_EBUSY, "a leadership transfer is already in progress");
            return;
        }
        r->transfer_op = op;
        release_start(r, false);
        return;
    }
}

/* ------------------------------------------------------------------ loop callbacks */

static void handle_closed_cb(uv_handle_t *h)
{
    (void)h;
}

static void on_raft_closed(struct raft *raft)
{
    struct kms_raft *r = raft->data;
    raft_uv_close(&r->glue.io);
    kms_transport_tls_close(&r->transport);
    kms_glue_io_close(&r->glue);
    if (r->handles_inited) {
        uv_close((uv_handle_t *)&r->release_timer, handle_closed_cb);
        uv_close((uv_handle_t *)&r->timer, handle_closed_cb);
        uv_close((uv_handle_t *)&r->async, handle_closed_cb);
        uv_close((uv_handle_t *)&r->applied_check, handle_closed_cb);
        uv_close((uv_handle_t *)&r->applied_prepare, handle_closed_cb);
    }
}

static void begin_close(struct kms_raft *r)
{
    struct op *q;
    if (r->closing) {
        return;
    }
    r->closing = true;
    atomic_store(&r->lease_until_us, 0);
    uv_timer_stop(&r->release_timer);
    transfer_op_shutdown(r);
    pthread_mutex_lock(&r->mu);
    r->closed = true;
    q = r->q_head;
    r->q_head = r->q_tail = NULL;
    pthread_mutex_unlock(&r->mu);
    while (q != NULL) {
        struct op *next = q->next;
        op_complete(q, KMS_ESHUTDOWN, "raft node is shutting down");
        q = next;
    }
    uv_timer_stop(&r->timer);
    kms_logf(KMS_LOG_INFO, MOD, "closing raft node %" PRIu64, r->id);
    raft_close(&r->raft, on_raft_closed);
}

static void stop_transfer_cb(struct raft_transfer *req)
{
    struct kms_raft *r = req->data;
    uint64_t lid;
    char addr[256];
    leader_info(r, &lid, addr, sizeof(addr));
    kms_logf(KMS_LOG_INFO, MOD, "shutdown leadership transfer finished; leader %" PRIu64, lid);
    begin_close(r);
}

static void raft_thread_stop_step(struct kms_raft *r)
{
    unsigned others = 0;

    if (r->stopping) {
        return;
    }
    r->stopping = true;
    if (kms_glue_role(&r->raft) == KMS_RAFT_LEADER && !kms_glue_transfer_pending(&r->raft) &&
        !atomic_load(&r->failed)) {
        uint64_t voters[MAX_PEERS];
        size_t nv = kms_glue_voters(&r->raft, voters, MAX_PEERS);
        for (size_t i = 0; i < nv; i++) {
            if (voters[i] != r->id) {
                others++;
            }
        }
    }
    if (others > 0) {
        transfer_op_shutdown(r);
        release_start(r, true);
        r->stop_deadline_ms = kms_mono_ms() +
                              kms_lease_release_wait_us(&r->lease, kms_mono_us()) / 1000u +
                              r->election_ms + 500u;
        kms_logf(KMS_LOG_INFO, MOD, "shutting down: releasing leases before transferring leadership");
        return; /* release_timer_cb, stop_transfer_cb or the timer closes */
    }
    begin_close(r);
}

static void async_cb(uv_async_t *h)
{
    struct kms_raft *r = h->data;
    struct op *q;
    bool stop;

    pthread_mutex_lock(&r->mu);
    q = r->q_head;
    r->q_head = r->q_tail = NULL;
    stop = r->stop_requested;
    pthread_mutex_unlock(&r->mu);

    while (q != NULL) {
        struct op *next = q->next;
        bool abandoned;
        pthread_mutex_lock(&r->mu);
        abandoned = q->refs == 1; /* the caller timed out before we got to it */
        pthread_mutex_unlock(&r->mu);
        if (abandoned) {
            op_complete(q, KMS_ETIMEDOUT, NULL);
        } else if (r->closing) {
            op_complete(q, KMS_ESHUTDOWN, "raft node is shutting down");
        } else {
            dispatch(r, q);
        }
        q = next;
    }
    if (stop && !r->closing) {
        raft_thread_stop_step(r);
    }
}

static void timer_cb(uv_timer_t *h)
{
    struct kms_raft *r = h->data;
    if (r->closing) {
        return;
    }
    lease_update(r);
    ev_update(r);
    status_publish(r);
    shred_tick(r);
    if (r->stopping && r->stop_deadline_ms != 0 && kms_mono_ms() >= r->stop_deadline_ms) {
        kms_logf(KMS_LOG_WARN, MOD, "shutdown leadership transfer timed out");
        begin_close(r);
    }
}

static void *raft_thread_main(void *arg)
{
    struct kms_raft *r = arg;
    uv_run(&r->loop, UV_RUN_DEFAULT);
    return NULL;
}

/* ------------------------------------------------------------------ public */

static void raft_free_all(struct kms_raft *r)
{
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->applied_mu);
    pthread_cond_destroy(&r->applied_cv);
    pthread_mutex_destroy(&r->status_mu);
    free(r);
}

static int transport_init(struct kms_raft *r, const struct kms_raft_config *cfg,
                          struct kms_err *err)
{
    struct kms_transport_tls_config tc;
    struct kms_transport_hooks hooks;
    int rv;

    if (cfg->cert_file == NULL || cfg->key_file == NULL || cfg->ca_file == NULL) {
        /* Leases need the transport's stamps: there is no plain-TCP mode. */
        return kms_err_set(err, KMS_ECONFIG,
                           "raft needs cert_file, key_file and ca_file (mutual TLS)");
    }
    memset(&tc, 0, sizeof(tc));
    tc.cert_file = cfg->cert_file;
    tc.key_file = cfg->key_file;
    tc.ca_file = cfg->ca_file;
    tc.bind_address = r->bind_address;
    rv = kms_transport_tls_init(&r->transport, &r->loop, &tc, err);
    if (rv != 0) {
        return kms_err_wrap(err, rv, "raft TLS transport");
    }
    memset(&hooks, 0, sizeof(hooks));
    hooks.data = r;
    hooks.stamp_out = stamp_out_cb;
    hooks.stamp_in = stamp_in_cb;
    hooks.peer_allowed = peer_allowed_cb;
    kms_transport_tls_set_hooks(&r->transport, &hooks);
    snprintf(r->cert_file, sizeof(r->cert_file), "%s", cfg->cert_file);
    snprintf(r->key_file, sizeof(r->key_file), "%s", cfg->key_file);
    snprintf(r->ca_file, sizeof(r->ca_file), "%s", cfg->ca_file);
    return 0;
}

/* Runs the loop until nothing is pending; used to release the transport and
 * io after a failed start. */
static void drain_loop(struct kms_raft *r)
{
    uv_run(&r->loop, UV_RUN_DEFAULT);
    uv_loop_close(&r->loop);
}

int kms_raft_start(const struct kms_raft_config *cfg, struct kms_store *store,
                   struct kms_raft **out, struct kms_err *err)
{
    struct kms_raft *r;
    char raft_dir[4096];
    int rv, rc;
    bool self_listed = false;

    *out = NULL;
    signal(SIGPIPE, SIG_IGN);
    if (cfg == NULL || store == NULL || cfg->id == 0 || cfg->data_dir == NULL ||
        cfg->raft_address == NULL || cfg->raft_address[0] == '\0') {
        return kms_err_set(err, KMS_EINVAL, "raft: id, data_dir and raft_address are required");
    }
    if (strlen(cfg->raft_address) >= 256 ||
        (cfg->bind_address != NULL && strlen(cfg->bind_address) >= 256)) {
        return kms_err_set(err, KMS_EINVAL, "raft address too long");
    }
    if (snprintf(raft_dir, sizeof(raft_dir), "%s/raft", cfg->data_dir) >= (int)sizeof(raft_dir)) {
        return kms_err_set(err, KMS_EINVAL, "raft: data_dir too long");
    }
    if (cfg->n_initial > MAX_PEERS) {
        return kms_err_set(err, KMS_EINVAL, "raft: at most %d initial members", MAX_PEERS);
    }
    for (size_t i = 0; i < cfg->n_initial; i++) {
        if (cfg->initial_cluster[i].id == 0) {
            return kms_err_set(err, KMS_EINVAL, "raft: initial member id 0");
        }
        for (size_t j = 0; j < i; j++) {
            if (cfg->initial_cluster[j].id == cfg->initial_cluster[i].id) {
                return kms_err_set(err, KMS_EINVAL, "raft: initial member %" PRIu64 " twice",
                                   cfg->initial_cluster[i].id);
            }
        }
        if (cfg->initial_cluster[i].id == cfg->id) {
            self_listed = true;
            if (strcmp(cfg->initial_cluster[i].address, cfg->raft_address) != 0) {
                return kms_err_set(err, KMS_ECONFIG,
                                   "raft: initial_cluster lists node %" PRIu64
                                   " at %s but raft_address is %s",
                                   cfg->id, cfg->initial_cluster[i].address, cfg->raft_address);
            }
        }
    }
    if (mkdir_p(raft_dir) != 0) {
        return kms_err_set(err, KMS_EIO, "raft: cannot create %s: %s", raft_dir, strerror(errno));
    }

    r = calloc(1, sizeof(*r));
    if (r == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    r->id = cfg->id;
    r->lease_cb = cfg->lease_cb;
    r->lease_arg = cfg->lease_arg;
    snprintf(r->address, sizeof(r->address), "%s", cfg->raft_address);
    snprintf(r->bind_address, sizeof(r->bind_address), "%s",
             cfg->bind_address != NULL && cfg->bind_address[0] != '\0' ? cfg->bind_address
                                                                       : cfg->raft_address);
    snprintf(r->dir, sizeof(r->dir), "%s", raft_dir);
    r->election_ms = cfg->election_timeout_ms != 0 ? cfg->election_timeout_ms : 1000;
    r->heartbeat_ms = cfg->heartbeat_timeout_ms != 0 ? cfg->heartbeat_timeout_ms : 100;
    r->store = store;
    r->last_state = RAFT_UNAVAILABLE;
    pthread_mutex_init(&r->mu, NULL);
    pthread_mutex_init(&r->applied_mu, NULL);
    cond_init_mono(&r->applied_cv);
    pthread_mutex_init(&r->status_mu, NULL);

    if (uv_loop_init(&r->loop) != 0) {
        raft_free_all(r);
        return kms_err_set(err, KMS_ERAFT, "raft: uv_loop_init failed");
    }
    if ((rc = transport_init(r, cfg, err)) != 0) {
        drain_loop(r);
        raft_free_all(r);
        return rc;
    }
    rv = raft_uv_init(&r->glue.io, &r->loop, r->dir, &r->transport);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "raft: raft_uv_init(%s): %s", r->dir,
                         r->glue.io.errmsg[0] != '\0' ? r->glue.io.errmsg : raft_strerror(rv));
        goto fail_transport;
    }
    raft_uv_set_connect_retry_delay(&r->glue.io, 250);
    kms_glue_io_wrap(&r->glue, &r->loop, r, recv_filter_cb, send_filter_cb, after_recv_cb,
                     io_error_cb);
    {
        struct kms_lease_config lc;
        memset(&lc, 0, sizeof(lc));
        lc.self_id = r->id;
        lc.election_us = (uint64_t)r->election_ms * 1000u;
        kms_lease_init(&r->lease, &lc, kms_mono_us());
    }

    fsm_init(r);

    rv = raft_init(&r->raft, &r->glue.io, &r->fsm, r->id, r->address);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "raft_init: %s", raft_errmsg(&r->raft));
        goto fail_io;
    }
    r->raft.data = r;
    r->glue.raft = &r->raft;
    raft_set_election_timeout(&r->raft, r->election_ms);
    raft_set_heartbeat_timeout(&r->raft, r->heartbeat_ms);
    r->snap_threshold =
        (unsigned)(cfg->snapshot_threshold != 0 ? cfg->snapshot_threshold : 8192);
    r->snap_trailing = (unsigned)(cfg->snapshot_trailing != 0 ? cfg->snapshot_trailing : 2048);
    raft_set_snapshot_threshold(&r->raft, r->snap_threshold);
    raft_set_snapshot_trailing(&r->raft, r->snap_trailing);
    raft_set_pre_vote(&r->raft, true);

    if (cfg->n_initial > 0 && self_listed) {
        struct raft_configuration conf;
        raft_configuration_init(&conf);
        for (size_t i = 0; i < cfg->n_initial; i++) {
            rv = raft_configuration_add(&conf, cfg->initial_cluster[i].id,
                                        cfg->initial_cluster[i].address, RAFT_VOTER);
            if (rv != 0) {
                raft_configuration_close(&conf);
                rc = kms_err_set(err, KMS_EINVAL, "raft: initial member %" PRIu64 ": %s",
                                 cfg->initial_cluster[i].id, raft_strerror(rv));
                goto fail_raft;
            }
        }
        rv = raft_bootstrap(&r->raft, &conf);
        raft_configuration_close(&conf);
        if (rv == 0) {
            kms_logf(KMS_LOG_INFO, MOD, "bootstrapped a %zu-member cluster in %s", cfg->n_initial,
                     r->dir);
        } else if (rv != RAFT_CANTBOOTSTRAP) {
            rc = kms_err_set(err, KMS_ERAFT, "raft_bootstrap: %s (%s)", raft_strerror(rv),
                             raft_errmsg(&r->raft));
            goto fail_raft;
        }
    } else if (cfg->n_initial > 0) {
        kms_logf(KMS_LOG_INFO, MOD, "node %" PRIu64 " not in initial_cluster: waiting to be added",
                 r->id);
    }

    rv = raft_start(&r->raft);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "raft_start: %s (%s)", raft_strerror(rv),
                         raft_errmsg(&r->raft));
        goto fail_raft;
    }
    r->started = true;
    atomic_store(&r->applied_index, raft_last_applied(&r->raft));

    uv_async_init(&r->loop, &r->async, async_cb);
    r->async.data = r;
    uv_timer_init(&r->loop, &r->timer);
    r->timer.data = r;
    uv_timer_init(&r->loop, &r->release_timer);
    r->release_timer.data = r;
    uv_timer_start(&r->timer, timer_cb, TICK_MS, TICK_MS);
    uv_check_init(&r->loop, &r->applied_check);
    r->applied_check.data = r;
    uv_check_start(&r->applied_check, applied_check_cb);
    uv_prepare_init(&r->loop, &r->applied_prepare);
    r->applied_prepare.data = r;
    uv_prepare_start(&r->applied_prepare, applied_prepare_cb);
    r->handles_inited = true;
    status_publish(r);

    if (pthread_create(&r->thread, NULL, raft_thread_main, r) != 0) {
        /* Close everything on this thread instead. */
        r->stopping = true;
        begin_close(r);
        drain_loop(r);
        raft_free_all(r);
        return kms_err_set(err, KMS_ENOMEM, "raft: cannot create thread");
    }
    r->thread_started = true;
    kms_logf(KMS_LOG_INFO, MOD, "raft node %" PRIu64 " started on %s (mutual TLS transport)", r->id,
             r->address);
    *out = r;
    return 0;

fail_raft:
    r->closing = true;
    raft_close(&r->raft, on_raft_closed);
    drain_loop(r);
    raft_free_all(r);
    return rc;
fail_io:
    raft_uv_close(&r->glue.io);
    kms_glue_io_close(&r->glue);
fail_transport:
    kms_transport_tls_close(&r->transport);
    drain_loop(r);
    raft_free_all(r);
    return rc;
}

void kms_raft_shutdown(struct kms_raft *r)
{
    if (r == NULL || atomic_load(&r->shut_down)) {
        return;
    }
    pthread_mutex_lock(&r->mu);
    r->stop_requested = true;
    if (!r->closed) {
        uv_async_send(&r->async);
    }
    pthread_mutex_unlock(&r->mu);
    if (r->thread_started) {
        /* Bounded: a transport that never reports its close would otherwise
         * hang the daemon's shutdown forever. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        /* A node whose disk failed may never finish raft's close (an
         * append that never completes): do not wait long for it. */
        ts.tv_sec += atomic_load(&r->failed) ? 2 : (time_t)(r->election_ms / 1000u) + 10;
        if (pthread_timedjoin_np(r->thread, NULL, &ts) != 0) {
            kms_logf(KMS_LOG_ERROR, MOD,
                     "raft thread of node %" PRIu64 " did not stop in time (raft close never "
                     "completed); leaving it behind",
                     r->id);
            return; /* r stays allocated for good: the thread may still use it */
        }
    }
    if (uv_loop_close(&r->loop) != 0) {
        kms_logf(KMS_LOG_WARN, MOD, "raft loop closed with handles still open");
    }
    /* Wake wait_applied callers: they see shut_down and return. */
    pthread_mutex_lock(&r->applied_mu);
    atomic_store(&r->shut_down, true);
    pthread_cond_broadcast(&r->applied_cv);
    pthread_mutex_unlock(&r->applied_mu);
    kms_logf(KMS_LOG_INFO, MOD, "raft node %" PRIu64 " stopped", r->id);
}

bool kms_raft_failed(struct kms_raft *r)
{
    return r != NULL && atomic_load(&r->failed);
}

void kms_raft_free(struct kms_raft *r)
{
    if (r == NULL) {
        return;
    }
    if (!atomic_load(&r->shut_down)) {
        kms_logf(KMS_LOG_ERROR, MOD, "raft node %" PRIu64 " not stopped: not freed", r->id);
        return;
    }
    raft_free_all(r);
}

void kms_raft_stop(struct kms_raft *r)
{
    kms_raft_shutdown(r);
    kms_raft_free(r);
}

int kms_raft_propose(struct kms_raft *r, const Kmsd__V1__Entry *e, unsigned timeout_ms,
                     struct kms_raft_result *res, struct kms_err *err)
{
    struct kms_raft_result local;
    Kmsd__V1__Entry ve;
    struct op *op;
    int rc;

    if (res == NULL) {
        res = &local;
    }
    memset(res, 0, sizeof(*res));
    if (r == NULL || e == NULL) {
        return kms_err_set(err, KMS_EINVAL, "propose: no node or entry");
    }
    op = op_new(r, OP_PROPOSE);
    if (op == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    ve = *e; /* shallow: only the version fields differ */
    ev_stamp_entry(r, &ve);
    if (ve.version < kms_entry_op_min_version(ve.op_case)) {
        pthread_mutex_lock(&r->mu);
        op->refs = 1;
        op_unref_locked(op);
        pthread_mutex_unlock(&r->mu);
        return kms_err_set(err, KMS_EVERSION,
                           "this operation needs entry version %u, and the cluster still "
                           "writes version %u: a member runs an older kmsd (or has not been "
                           "heard from yet); upgrade every member first (kmsctl status "
                           "--cluster shows each member's entry version)",
                           kms_entry_op_min_version(ve.op_case), ve.version);
    }
    if ((rc = kms_entry_encode(&ve, &op->buf, err)) != 0) {
        pthread_mutex_lock(&r->mu);
        op->refs = 1;
        op_unref_locked(op);
        pthread_mutex_unlock(&r->mu);
        return kms_err_wrap(err, rc, "propose: encode entry");
    }
    return op_run(r, op, timeout_ms, res, err);
}

int kms_raft_wait_applied(struct kms_raft *r, uint64_t index, unsigned timeout_ms)
{
    struct timespec ts;
    int rc = 0;
    if (atomic_load(&r->applied_index) >= index) {
        return 0;
    }
    ts = deadline_ts(timeout_ms);
    atomic_fetch_add(&r->waiters, 1);
    pthread_mutex_lock(&r->applied_mu);
    while (atomic_load(&r->applied_index) < index) {
        if (atomic_load(&r->shut_down)) {
            rc = KMS_ESHUTDOWN;
            break;
        }
        if (pthread_cond_timedwait(&r->applied_cv, &r->applied_mu, &ts) == ETIMEDOUT) {
            rc = atomic_load(&r->applied_index) >= index ? 0 : KMS_ETIMEDOUT;
            break;
        }
    }
    pthread_mutex_unlock(&r->applied_mu);
    atomic_fetch_sub(&r->waiters, 1);
    return rc;
}

int kms_raft_read_index(struct kms_raft *r, uint64_t since_us, unsigned timeout_ms,
                        uint64_t *index)
{
    struct timespec ts;
    int rc = 0;

    *index = 0;
    ts = deadline_ts(timeout_ms);
    atomic_fetch_add(&r->waiters, 1);
    pthread_mutex_lock(&r->applied_mu);
    while (r->ri_at_us < since_us) {
        if (atomic_load(&r->shut_down)) {
            rc = KMS_ESHUTDOWN;
            goto out;
        }
        if (pthread_cond_timedwait(&r->applied_cv, &r->applied_mu, &ts) == ETIMEDOUT &&
            r->ri_at_us < since_us) {
            rc = KMS_ETIMEDOUT;
            goto out;
        }
    }
    *index = r->ri_commit;
out:
    pthread_mutex_unlock(&r->applied_mu);
    atomic_fetch_sub(&r->waiters, 1);
    return rc;
}

bool kms_raft_lease_valid(struct kms_raft *r)
{
    if (r == NULL) {
        return false;
    }
    return kms_mono_us() < atomic_load_explicit(&r->lease_until_us, memory_order_acquire);
}

uint64_t kms_raft_lease_deadline_ms(struct kms_raft *r)
{
    uint64_t until;
    if (r == NULL) {
        return 0;
    }
    /* Rounded down to whole milliseconds: never later than the lease. */
    until = atomic_load_explicit(&r->lease_until_us, memory_order_acquire) / 1000u;
    return kms_mono_ms() < until ? until : 0;
}

int kms_raft_status(struct kms_raft *r, struct kms_raft_status *st)
{
    /* Fresh figures from the raft thread when it answers quickly; otherwise
     * (busy, stopping) the copy it published at its last tick. */
    struct op *op = op_new(r, OP_STATUS);
    if (op != NULL) {
        (void)op_run(r, op, 500, NULL, NULL);
    }
    pthread_mutex_lock(&r->status_mu);
    *st = r->status;
    pthread_mutex_unlock(&r->status_mu);
    st->lease = kms_raft_lease_valid(r);
    if (atomic_load(&r->applied_index) > st->applied_index) {
        st->applied_index = atomic_load(&r->applied_index);
    }
    return 0;
}

int kms_raft_add(struct kms_raft *r, uint64_t id, const char *address, unsigned timeout_ms,
                 struct kms_err *err)
{
    struct kms_raft_result res;
    struct op *op;
    if (id == 0 || address == NULL || address[0] == '\0' || strlen(address) >= 256) {
        return kms_err_set(err, KMS_EINVAL, "add: id and address (host:port) are required");
    }
    op = op_new(r, OP_ADD);
    if (op == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    op->id = id;
    snprintf(op->address, sizeof(op->address), "%s", address);
    return op_run(r, op, timeout_ms, &res, err);
}

int kms_raft_remove(struct kms_raft *r, uint64_t id, unsigned timeout_ms, struct kms_err *err)
{
    struct kms_raft_result res;
    struct op *op;
    if (id == 0) {
        return kms_err_set(err, KMS_EINVAL, "remove: id is required");
    }
    op = op_new(r, OP_REMOVE);
    if (op == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    op->id = id;
    return op_run(r, op, timeout_ms, &res, err);
}

int kms_raft_transfer(struct kms_raft *r, uint64_t id, unsigned timeout_ms, struct kms_err *err)
{
    struct kms_raft_result res;
    struct op *op = op_new(r, OP_TRANSFER);
    if (op == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    op->id = id;
    return op_run(r, op, timeout_ms, &res, err);
}

int kms_raft_reload_tls(struct kms_raft *r, struct kms_err *err)
{
    struct op *op = op_new(r, OP_RELOAD_TLS);
    if (op == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    return op_run(r, op, 5000, NULL, err);
}

const char *kms_raft_role_name(int role)
{
    switch (role) {
    case KMS_RAFT_LEADER:
        return "leader";
    case KMS_RAFT_FOLLOWER:
        return "follower";
    case KMS_RAFT_CANDIDATE:
        return "candidate";
    default:
        return "unavailable";
    }
}

const char *kms_raft_member_role_name(int role)
{
    switch (role) {
    case KMS_RAFT_VOTER:
        return "voter";
    case KMS_RAFT_STANDBY:
        return "standby";
    case KMS_RAFT_SPARE:
        return "spare";
    default:
        return "unknown";
    }
}
