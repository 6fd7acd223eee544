/*
 * The raft node's requests (see node.c): other threads queue a struct op
 * and wait on it (op_run); the raft thread dispatches it (kr_dispatch)
 * and completes it from raft's callbacks: proposals (raft_apply, with the
 * commit-notify barrier), membership changes (raft_add/assign/remove),
 * leadership transfers (after the lease release) and the status refresh.
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
    kr_cond_init_mono(&op->cv);
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
void kr_op_complete(struct op *op, int rc, const char *fmt, ...)
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
    kr_leader_info(r, &op->res.leader_id, op->res.leader_address, sizeof(op->res.leader_address));
    if (op->res.leader_id != 0) {
        kr_op_complete(op, KMS_ENOTLEADER, "not the leader; leader is %" PRIu64 " at %s",
                       op->res.leader_id, op->res.leader_address);
    } else {
        kr_op_complete(op, KMS_ENOTLEADER, "not the leader; no leader known");
    }
}

/* Caller side: queue, wake the raft thread, wait. Consumes the caller's
 * reference. Copies the outcome into res/err. */
static int op_run(struct kms_raft *r, struct op *op, unsigned timeout_ms,
                  struct kms_raft_result *res, struct kms_err *err)
{
    struct timespec ts = kr_deadline_ts(timeout_ms);
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

/* raft's error codes to ours (kr_code_from_raft: a request's outcome) and
 * ours to raft's (kr_code_to_raft: the fsm's). A row counts in the
 * directions it is marked for, the first match wins; others map to
 * KMS_ERAFT and RAFT_CORRUPT. */
static const struct {
    int raft, kms;
    bool from_raft, to_raft;
} CODES[] = {
    {RAFT_NOTLEADER, KMS_ENOTLEADER, true, false},
    {RAFT_LEADERSHIPLOST, KMS_EUNAVAIL, true, false},
    {RAFT_SHUTDOWN, KMS_ESHUTDOWN, true, false},
    {RAFT_NOMEM, KMS_ENOMEM, true, true},
    {RAFT_CANTCHANGE, KMS_EBUSY, true, false},
    {RAFT_BUSY, KMS_EBUSY, true, true},
    {RAFT_BADID, KMS_EINVAL, true, false},
    {RAFT_BADROLE, KMS_EINVAL, true, false},
    {RAFT_INVALID, KMS_EINVAL, true, false},
    {RAFT_DUPLICATEID, KMS_EEXIST, true, false},
    {RAFT_DUPLICATEADDRESS, KMS_EEXIST, true, false},
    {RAFT_NOTFOUND, KMS_ENOTFOUND, true, false},
    {RAFT_NOCONNECTION, KMS_EUNAVAIL, true, false},
    {RAFT_IOERR, KMS_ESTORE, false, true},
    {RAFT_IOERR, KMS_EIO, false, true},
};

static int code_map(int code, bool from_raft)
{
    for (size_t i = 0; i < sizeof(CODES) / sizeof(CODES[0]); i++) {
        if (from_raft ? CODES[i].from_raft && CODES[i].raft == code
                      : CODES[i].to_raft && CODES[i].kms == code) {
            return from_raft ? CODES[i].kms : CODES[i].raft;
        }
    }
    return from_raft ? KMS_ERAFT : RAFT_CORRUPT;
}

int kr_code_from_raft(int rv)
{
    return code_map(rv, true);
}

int kr_code_to_raft(int kms)
{
    return code_map(kms, false);
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
            kr_op_complete(op, KMS_EUNAVAIL,
                           "entry %llu applied but its result was not recorded; outcome unknown",
                           (unsigned long long)req->index);
            return;
        }
        kr_op_complete(op, 0, NULL);
        commit_notify(r);
        return;
    }
    kr_leader_info(r, &op->res.leader_id, op->res.leader_address, sizeof(op->res.leader_address));
    op->res.index = req->index;
    if (status == RAFT_LEADERSHIPLOST) {
        kr_op_complete(op, r->closing ? KMS_ESHUTDOWN : KMS_EUNAVAIL,
                       "leadership lost before entry %llu committed; outcome unknown",
                       (unsigned long long)req->index);
    } else {
        kr_op_complete(op, kr_code_from_raft(status), "entry %llu: %s",
                       (unsigned long long)req->index, raft_strerror(status));
    }
}

static void change_cb(struct raft_change *req, int status)
{
    struct op *op = req->data;
    struct kms_raft *r = op->r;
    int rv;

    if (status != 0) {
        kr_op_complete(op, kr_code_from_raft(status), "membership change for %" PRIu64 ": %s",
                       op->id, raft_strerror(status));
        return;
    }
    if (op->kind == OP_ADD && op->stage == 0) {
        op->stage = 1;
        if (r->closing) {
            kr_op_complete(op, KMS_ESHUTDOWN, "shutting down");
            return;
        }
        rv = raft_assign(&r->raft, &op->change, op->id, RAFT_VOTER, change_cb);
        if (rv != 0) {
            kr_op_complete(op, kr_code_from_raft(rv), "promote %" PRIu64 " to voter: %s (%s)",
                           op->id, raft_strerror(rv), raft_errmsg(&r->raft));
        }
        return;
    }
    kms_logf(KMS_LOG_INFO, MOD, "membership: %s %" PRIu64 " committed",
             op->kind == OP_ADD ? "added voter" : "removed", op->id);
    kr_status_publish(r);
    kr_op_complete(op, 0, NULL);
}

static void transfer_cb(struct raft_transfer *req)
{
    struct op *op = req->data;
    struct kms_raft *r = op->r;
    uint64_t lid;
    char addr[256];
    r->releasing = false;
    kr_leader_info(r, &lid, addr, sizeof(addr));
    op->res.leader_id = lid;
    snprintf(op->res.leader_address, sizeof(op->res.leader_address), "%s", addr);
    kr_lease_update(r);
    kr_status_publish(r);
    if (lid != 0 && lid != r->id && (op->id == 0 || lid == op->id)) {
        kms_logf(KMS_LOG_INFO, MOD, "leadership transferred to %" PRIu64, lid);
        kr_op_complete(op, 0, NULL);
    } else {
        kr_op_complete(op, KMS_ETIMEDOUT,
                       "leadership transfer did not complete (leader now %" PRIu64 ")", lid);
    }
}

/* Leadership transfer, in two steps. First release: stamps lose their
 * LEADER flag, our lease ends at once, and we wait until every promise a
 * follower made on the strength of our stamps (and our own) has ended
 * (kms_lease_release_wait_us). Only then raft_transfer: the new leader's
 * election can then not overlap any lease granted under us. */

/* Fails a transfer still waiting for its release (shutdown). */
void kr_transfer_op_shutdown(struct kms_raft *r)
{
    struct op *t = r->transfer_op;
    if (t != NULL) {
        r->transfer_op = NULL;
        kr_op_complete(t, KMS_ESHUTDOWN, "raft node is shutting down");
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
                 ? raft_transfer(&r->raft, &r->stop_transfer, 0, kr_stop_transfer_cb)
                 : RAFT_NOTLEADER;
        if (rv != 0) {
            kms_logf(KMS_LOG_WARN, MOD, "shutting down: leadership transfer not started: %s",
                     raft_strerror(rv));
            kr_begin_close(r);
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
        kr_lease_update(r);
        kr_op_complete(op, rv == RAFT_NOTFOUND ? KMS_EUNAVAIL : kr_code_from_raft(rv),
                       "transfer to %" PRIu64 ": %s (%s)", op->id, raft_strerror(rv),
                       raft_errmsg(&r->raft));
    }
}

void kr_release_start(struct kms_raft *r, bool for_stop)
{
    uint64_t wait;
    r->releasing = true;
    r->release_for_stop = for_stop;
    kr_lease_update(r); /* no lease from now on */
    wait = kms_lease_release_wait_us(&r->lease, kms_mono_us());
    kms_logf(KMS_LOG_INFO, MOD, "releasing read leases for a leadership transfer (%" PRIu64 " ms)",
             wait / 1000u);
    uv_timer_start(&r->release_timer, release_timer_cb, wait / 1000u + 1u, 0);
}

void kr_dispatch(struct kms_raft *r, struct op *op)
{
    int rv;

    if (op->kind == OP_RELOAD_TLS) {
        struct kms_err e;
        kms_err_clear(&e);
        if (kms_transport_tls_reload(&r->transport, r->cert_file, r->key_file, r->ca_file,
                                            &e) != 0) {
            kr_op_complete(op, e.code != 0 ? e.code : KMS_ETLS, "%s", e.msg);
        } else {
            kms_logf(KMS_LOG_INFO, MOD, "raft transport certificates reloaded");
            kr_op_complete(op, 0, NULL);
        }
        return;
    }
    if (op->kind == OP_STATUS) {
        kr_lease_update(r);
        kr_status_publish(r);
        kr_op_complete(op, 0, NULL);
        return;
    }
    if (r->stopping) {
        kr_op_complete(op, KMS_ESHUTDOWN, "raft node is shutting down");
        return;
    }
    if (atomic_load(&r->failed)) {
        kr_op_complete(op, KMS_EIO, "the raft log of this node could not be written");
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
                kr_op_complete(op, kr_code_from_raft(rv), "raft_apply: %s", raft_strerror(rv));
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
                kr_op_complete(op, KMS_EEXIST, "server %" PRIu64 " is already a member at %s",
                               op->id, maddr);
                return;
            }
            if (mrole == KMS_RAFT_VOTER) {
                kr_op_complete(op, 0, NULL);
                return;
            }
            op->stage = 1;
            rv = raft_assign(&r->raft, &op->change, op->id, RAFT_VOTER, change_cb);
        } else {
            op->stage = 0;
            rv = raft_add(&r->raft, &op->change, op->id, op->address, change_cb);
        }
        if (rv != 0) {
            kr_op_complete(op, kr_code_from_raft(rv), "add %" PRIu64 " at %s: %s (%s)", op->id,
                           op->address, raft_strerror(rv), raft_errmsg(&r->raft));
        }
        return;
    }
    case OP_REMOVE:
        if (!kr_config_has(r, op->id)) {
            kr_op_complete(op, KMS_ENOTFOUND, "server %" PRIu64 " is not a member", op->id);
            return;
        }
        op->change.data = op;
        rv = raft_remove(&r->raft, &op->change, op->id, change_cb);
        if (rv != 0) {
            kr_op_complete(op, kr_code_from_raft(rv), "remove %" PRIu64 ": %s (%s)", op->id,
                           raft_strerror(rv), raft_errmsg(&r->raft));
        }
        return;
    case OP_STATUS:
    case OP_RELOAD_TLS:
        return;
    case OP_TRANSFER:
        if (r->transfer_op != NULL || r->releasing || kms_glue_transfer_pending(&r->raft)) {
            kr_op_complete(op, KMS_EBUSY, "a leadership transfer is already in progress");
            return;
        }
        r->transfer_op = op;
        kr_release_start(r, false);
        return;
    }
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
    kr_ev_stamp_entry(r, &ve);
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
