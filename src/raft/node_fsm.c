/*
 * The raft node's fsm (see node.c): apply into the store, the applied-index
 * wake-ups (kms_raft_wait_applied), snapshots and restores, and shredding
 * the old copies after a revocation. Raft thread, except snapshot_async (an
 * io worker) and kms_raft_wait_applied (any thread).
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
#include "node_internal.h"
#include "raft_glue.h"

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
void kr_shred_tick(struct kms_raft *r)
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
    kr_ev_stamp_entry(r, &e);
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
        return kr_code_to_raft(rc);
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

void kr_applied_check_cb(uv_check_t *h)
{
    applied_wake(h->data);
}

void kr_applied_prepare_cb(uv_prepare_t *h)
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
        return kr_code_to_raft(rc);
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
        return kr_code_to_raft(rc);
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

void kr_fsm_init(struct kms_raft *r)
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

int kms_raft_wait_applied(struct kms_raft *r, uint64_t index, unsigned timeout_ms)
{
    struct timespec ts;
    int rc = 0;
    if (atomic_load(&r->applied_index) >= index) {
        return 0;
    }
    ts = kr_deadline_ts(timeout_ms);
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
