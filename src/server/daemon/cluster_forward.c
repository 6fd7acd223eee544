/*
 * kmsd.v1.Cluster/Forward (kmsd_cluster.h): what a follower forwards to the
 * leader. The trampoline (cluster_api.c) has checked the node certificate;
 * the leader checks here that its id is a current member, that the entry is
 * one a follower may forward (kmsd_authz_entry_forwardable) and that it is
 * well formed, then proposes it on the write pool.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>

#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_cluster.h"
#include "kmsd_peer.h"
#include "kmsd_pool.h"
#include "kmsd_touch.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

/* kmsd_cluster.h */
void kmsd_forward_refuse(struct kmsd *d, struct kms_rpc_call *call, const char *why)
{
    atomic_fetch_add(&d->metrics.forward_refused, 1);
    kms_log(KMS_LOG_WARN, "authz", "forward refused", "reason", why, "peer",
            kms_rpc_call_peer(call), "cn",
            kms_rpc_call_peer_cn(call) != NULL ? kms_rpc_call_peer_cn(call) : "", NULL);
    kms_rpc_call_finish(call, GRPC_STATUS_PERMISSION_DENIED, why, NULL, 0);
}

/* ---- kmsd.v1.Cluster ------------------------------------------------- */

/* A parked Forward (leader side): the proposal waits for a commit on the
 * write pool, not on a cluster API worker. */
struct forward_job {
    struct kmsd *d;
    struct kms_rpc_call *call;
    Kmsd__V1__ForwardRequest *r;
    uint64_t t0;
    uint64_t caller_id; /* from the certificate's CN */
};

static void forward_run_cb(void *arg)
{
    struct forward_job *j = arg;
    struct kmsd *d = j->d;
    Kmsd__V1__ForwardResponse resp = KMSD__V1__FORWARD_RESPONSE__INIT;
    struct kms_raft_result rr;
    struct kms_err err;
    uint64_t now = kms_mono_ms(), left_call = kms_rpc_call_deadline_ms(j->call), t_us;
    unsigned wait_ms;
    int rc;

    kms_err_clear(&err);
    /* The budget: requestWait from arrival, never past the caller's deadline. */
    wait_ms = now - j->t0 < d->opt.request_wait_ms
                  ? (unsigned)(d->opt.request_wait_ms - (now - j->t0))
                  : 0;
    if (left_call < wait_ms) {
        wait_ms = (unsigned)left_call;
    }
    if (wait_ms == 0 || kms_rpc_call_done(j->call) || atomic_load(&d->stopping)) {
        kms_rpc_call_finish(j->call, GRPC_STATUS_UNAVAILABLE, "no time left to propose", NULL,
                            0);
        goto out;
    }
    if (!kmsd_raft_has_member(d, j->caller_id)) {
        char why[96];
        snprintf(why, sizeof(why), "node %llu is not a member of the cluster",
                 (unsigned long long)j->caller_id);
        kmsd_forward_refuse(d, j->call, why);
        goto out;
    }
    if (j->r->from_id != j->caller_id) {
        kmsd_forward_refuse(d, j->call, "from_id differs from the certificate's node id");
        goto out;
    }
    if (!kmsd_authz_entry_forwardable(j->r->entry->op_case)) {
        kmsd_forward_refuse(d, j->call,
                       "a node may forward only sealed records (PutRecord), last-access "
                       "batches (TouchBatch) and the peer unseal gate (SetPeerUnsealGate)");
        goto out;
    }
    if (j->r->entry->op_case == KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE) {
        if (kmsd_peer_gate_forward_check(d, j->r->entry, j->caller_id, &err) != 0) {
            char why[sizeof(err.msg) + 32];
            snprintf(why, sizeof(why), "peer unseal gate: %s", err.msg);
            kmsd_forward_refuse(d, j->call, why);
            goto out;
        }
    } else if (j->r->entry->op_case == KMSD__V1__ENTRY__OP_TOUCH_BATCH) {
        if (kmsd_authz_touch_check(j->r->entry->touch_batch, KMSD_TOUCH_MAX, kms_wall_ms(),
                                   &err) != 0) {
            char why[sizeof(err.msg) + 32];
            snprintf(why, sizeof(why), "malformed touch batch: %s", err.msg);
            kmsd_forward_refuse(d, j->call, why);
            goto out;
        }
    } else {
        Kmsd__V1__EncryptedKeyring *ek = NULL;
        uint32_t max_term = 0;
        if (kms_store_keyring_get(d->store, &ek, NULL) == 0) {
            max_term = ek->active_term;
            kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
        }
        /* Any version this node applies (the leader restamps it: kms_raft_propose). */
        if (j->r->entry->version == 0 || j->r->entry->version > KMS_ENTRY_VERSION ||
            j->r->entry->put_record == NULL ||
            kmsd_authz_record_check(j->r->entry->put_record->record, max_term, &err) != 0) {
            char why[sizeof(err.msg) + 32];
            snprintf(why, sizeof(why), "malformed record: %s",
                     err.msg[0] ? err.msg : "bad entry version");
            kmsd_forward_refuse(d, j->call, why);
            goto out;
        }
    }
    memset(&rr, 0, sizeof(rr));
    t_us = kms_mono_us();
    rc = kms_raft_propose(d->raft, j->r->entry, wait_ms, &rr, &err);
    if (rc == 0) {
        kmsd_hist_observe(&d->metrics.raft_apply_latency, kms_mono_us() - t_us);
    }
    if (rc == KMS_ENOTLEADER) {
        kms_rpc_call_finish(j->call, GRPC_STATUS_FAILED_PRECONDITION, "not the leader", NULL,
                            0);
        goto out;
    }
    if (rc != 0) {
        kms_rpc_call_finish(j->call, GRPC_STATUS_UNAVAILABLE, err.msg, NULL, 0);
        goto out;
    }
    resp.index = rr.index;
    resp.result_code = rr.code;
    resp.result_msg = rr.msg;
    resp.count = rr.count;
    kmsd_call_finish_msg(j->call, &resp.base);
out:
    kmsd__v1__forward_request__free_unpacked(j->r, NULL);
    free(j);
}

/* kmsd_cluster.h. The job takes the request (c->req) with it. */
int kmsd_forward_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    struct forward_job *j = NULL;
    int rc;

    if (((Kmsd__V1__ForwardRequest *)c->req)->entry == NULL) {
        rc = kms_err_set(&c->err, KMS_EINVAL, "malformed forward request");
        goto out;
    }
    j = calloc(1, sizeof(*j));
    if (j == NULL) {
        rc = kms_err_set(&c->err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    j->d = d;
    j->call = c->call;
    j->t0 = kms_mono_ms();
    j->caller_id = c->node_id;
    j->r = (Kmsd__V1__ForwardRequest *)c->req;
    if ((rc = kmsd_pool_submit(d->write_pool, forward_run_cb, j)) != 0) {
        kms_rpc_call_finish(c->call, GRPC_STATUS_UNAVAILABLE,
                            rc == KMS_EBUSY ? "leader busy: too many proposals waiting"
                                            : "shutting down",
                            NULL, 0);
        rc = 0;
        goto out;
    }
    c->req = NULL; /* moved: the job frees it */
    j = NULL;      /* parked */
    rc = 0;
out:
    free(j);
    return rc;
}
