/*
 * Writes from any node: propose on the leader, or forward to it.
 *
 * Only a sealed record (PutRecord, for a Talos Seal) is ever forwarded
 * (kmsd_authz_entry_forwardable). Every other entry is proposed on the
 * leader by the leader's own code for an operator call it authorised; on a
 * follower kmsd_write refuses it with "not the leader; ..." naming the
 * leader's cluster API, and proposes nothing. A forward goes only to a
 * server whose certificate's single CN is kmsd-node-<leader id>.
 *
 * A follower never answers "sealed" for a record that is not committed: it
 * replies only after the leader reported the entry committed and applied AND
 * this node's own applied index reached it (read-your-writes: an Unseal on
 * this node right after sees the record).
 *
 * When the outcome of an attempt is unknown (leadership lost mid-flight, the
 * forward call failed after sending), the entry is proposed again. Entries
 * are built so a second apply is harmless: a PutRecord for a key_id already
 * present is refused with KMS_EEXIST, which for a retry means "the first
 * attempt committed" and is reported as success.
 *
 * A forward follows leader changes: while the call to the leader is in
 * flight, this node's raft status is polled (every FORWARD_POLL_MS); when
 * it names another leader (or this node became leader) the call is
 * abandoned - its outcome is unknown, so the retry rule above applies - and
 * the entry is sent to the new leader within the same budget. A leader that
 * stalls (paused, partitioned) therefore costs about one election, not the
 * whole request budget.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/status.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_authz.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"
#include "kmsd/v1/record.pb-c.h"


bool kmsd_readable(struct kmsd *d)
{
    if (d->opt.unseal_reads_local) {
        return true;
    }
    return kms_raft_lease_valid(d->raft);
}

bool kmsd_raft_is_member(struct kmsd *d)
{
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    for (size_t i = 0; i < st.n_members && i < sizeof(st.members) / sizeof(st.members[0]); i++) {
        if (st.members[i].id == d->opt.node_id) {
            return true;
        }
    }
    return false;
}

void kmsd_warn_local_reads(struct kmsd *d, const char *when)
{
    if (d->opt.unseal_reads_local) {
        kms_log(KMS_LOG_WARN, "kmsd",
                "unsealReads: local: unseals are served from this node's applied state without "
                "a quorum read lease (a partitioned node may unseal revoked keys); switch back "
                "to unsealReads: lease once a quorum is available",
                "when", when, NULL);
    }
}

int kmsd_read_barrier(struct kmsd *d, unsigned wait_ms)
{
    uint64_t t0 = kms_mono_ms(), end = t0 + wait_ms, index = 0, now;
    int rc;

    /* Every write acknowledged before this call has an index the read
     * index covers (kms_raft.h); then wait until this node applied it. */
    rc = kms_raft_read_index(d->raft, kms_mono_us(), wait_ms, &index);
    if (rc != 0) {
        return rc == KMS_ESHUTDOWN ? rc : KMS_EUNAVAIL;
    }
    now = kms_mono_ms();
    return kms_raft_wait_applied(d->raft, index, now < end ? (unsigned)(end - now) : 1);
}

uint64_t kmsd_applied_mark(struct kmsd *d)
{
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    return st.applied_index; /* never past the index kms_raft_wait_applied waits on */
}

int kmsd_wait_applied_past(struct kmsd *d, uint64_t mark, unsigned timeout_ms)
{
    return kms_raft_wait_applied(d->raft, mark + 1, timeout_ms);
}

/* Cluster API address of a member: the replicated member metadata first,
 * then the initial cluster list from the config. */
struct member_lookup {
    uint64_t id;
    char addr[256];
};

static int member_cb(void *arg, const Kmsd__V1__Member *m)
{
    struct member_lookup *ml = arg;
    if (m->id == ml->id && m->cluster_address != NULL && m->cluster_address[0] != '\0') {
        snprintf(ml->addr, sizeof(ml->addr), "%s", m->cluster_address);
    }
    return 0;
}

int kmsd_member_cluster_address(struct kmsd *d, uint64_t id, char out[256])
{
    struct member_lookup ml;
    ml.id = id;
    ml.addr[0] = '\0';
    (void)kms_store_members_list(d->store, member_cb, &ml, NULL);
    if (ml.addr[0] == '\0') {
        for (size_t i = 0; i < d->opt.n_peers; i++) {
            if (d->opt.peers[i].id == id) {
                snprintf(ml.addr, sizeof(ml.addr), "%s", d->opt.peers[i].cluster_address);
            }
        }
    }
    if (ml.addr[0] == '\0') {
        return KMS_ENOTFOUND;
    }
    memcpy(out, ml.addr, sizeof(ml.addr));
    return 0;
}

static int forward_channel(struct kmsd *d, uint64_t id, const char *addr,
                           struct kms_rpc_channel **out, struct kms_err *err)
{
    size_t n = sizeof(d->fwd) / sizeof(d->fwd[0]);
    int rc = 0;

    pthread_mutex_lock(&d->fwd_mu);
    for (size_t i = 0; i < n; i++) {
        if (d->fwd[i].ch != NULL && d->fwd[i].id == id) {
            *out = d->fwd[i].ch;
            goto out;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (d->fwd[i].ch == NULL) {
            struct kms_rpc_client_tls tls = {d->opt.cluster_ca, d->opt.node_cert,
                                              d->opt.node_key};
            struct kms_rpc_channel_options copts;
            char cn[40];
            /* The leader proves it is that node: a server certificate with
             * another id (or a fake server at a wrong address) fails the
             * handshake, so no answer from it is ever believed. */
            snprintf(cn, sizeof(cn), "kmsd-node-%llu", (unsigned long long)id);
            memset(&copts, 0, sizeof(copts));
            copts.expect_peer_cn = cn;
            rc = kms_rpc_channel_create_opts(addr, &tls, &copts, &d->fwd[i].ch, err);
            if (rc != 0) {
                d->fwd[i].ch = NULL;
                rc = kms_err_wrap(err, KMS_EUNAVAIL, "forward to leader %llu at %s",
                                  (unsigned long long)id, addr);
                rc = KMS_EUNAVAIL;
                goto out;
            }
            d->fwd[i].id = id;
            *out = d->fwd[i].ch;
            goto out;
        }
    }
    rc = kms_err_set(err, KMS_EUNAVAIL, "forward: too many distinct leaders seen");
out:
    pthread_mutex_unlock(&d->fwd_mu);
    return rc;
}

bool kmsd_leader_redirect(struct kmsd *d, char *msg, size_t msglen)
{
    struct kms_raft_status st;
    char addr[256];

    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    if (st.role == KMS_RAFT_LEADER || st.leader_id == 0 || st.leader_id == d->opt.node_id) {
        return false;
    }
    if (kmsd_member_cluster_address(d, st.leader_id, addr) == 0) {
        snprintf(msg, msglen, "not the leader; the leader is node %llu, cluster API at %s",
                 (unsigned long long)st.leader_id, addr);
    } else {
        snprintf(msg, msglen,
                 "not the leader; the leader is node %llu (its cluster API address is unknown)",
                 (unsigned long long)st.leader_id);
    }
    return true;
}

#define FORWARD_POLL_MS 100

struct forward_watch {
    struct kmsd *d;
    uint64_t leader_id; /* the node the call went to */
};

/* Polled while a forward is in flight: keep waiting only while this node
 * still believes leader_id leads (or knows no leader yet). */
static bool forward_keep_cb(void *arg)
{
    struct forward_watch *w = arg;
    struct kms_raft_status st;

    if (atomic_load(&w->d->stopping)) {
        return false;
    }
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(w->d->raft, &st);
    if (st.role == KMS_RAFT_LEADER) {
        return false;
    }
    return st.leader_id == 0 || st.leader_id == w->leader_id;
}

/* Forwards `e` to the leader `leader_id`. Returns 0 with *res filled when the
 * leader committed it, KMS_ENOTLEADER when the callee is not (or no longer)
 * leader, KMS_EUNAVAIL when it could not be reached. */
static int forward(struct kmsd *d, uint64_t leader_id, const Kmsd__V1__Entry *e,
                   unsigned deadline_ms, struct kmsd_write_result *res,
                   struct kms_err *err)
{
    Kmsd__V1__ForwardRequest req = KMSD__V1__FORWARD_REQUEST__INIT;
    Kmsd__V1__ForwardResponse *resp = NULL;
    uint8_t *buf = NULL, *out = NULL;
    size_t len, outlen = 0;
    char *details = NULL;
    int status = 0;
    char addr[256];
    struct kms_rpc_channel *ch = NULL;
    int rc;

    if (kmsd_member_cluster_address(d, leader_id, addr) != 0) {
        rc = kms_err_set(err, KMS_EUNAVAIL, "no cluster address known for leader %llu",
                         (unsigned long long)leader_id);
        goto out;
    }
    req.entry = (Kmsd__V1__Entry *)e;
    req.from_id = d->opt.node_id;
    len = protobuf_c_message_get_packed_size(&req.base);
    buf = malloc(len > 0 ? len : 1);
    if (buf == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "forward: out of memory");
        goto out;
    }
    protobuf_c_message_pack(&req.base, buf);

    if ((rc = forward_channel(d, leader_id, addr, &ch, err)) != 0) {
        goto out;
    }
    {
        struct forward_watch w = {d, leader_id};
        rc = kms_rpc_unary_watch(ch, "/kmsd.v1.Cluster/Forward", buf, len, deadline_ms,
                                 FORWARD_POLL_MS, forward_keep_cb, &w, &out, &outlen, &status,
                                 &details, err);
    }
    /* CANCELLED: abandoned by forward_keep_cb (the leader changed), or gRPC
     * 1.51 cancelled a call racing a server shutdown on an existing
     * connection; either way the entry may or may not have been proposed. */
    if (rc != 0 || status == GRPC_STATUS_UNAVAILABLE ||
        status == GRPC_STATUS_DEADLINE_EXCEEDED || status == GRPC_STATUS_CANCELLED) {
        rc = kms_err_set(err, KMS_EUNAVAIL, "forward to leader %llu at %s: %s",
                         (unsigned long long)leader_id, addr,
                         details != NULL ? details : "unreachable");
        goto out;
    }
    if (status == GRPC_STATUS_FAILED_PRECONDITION) {
        rc = kms_err_set(err, KMS_ENOTLEADER, "node %llu is no longer leader",
                         (unsigned long long)leader_id);
        goto out;
    }
    if (status != GRPC_STATUS_OK) {
        rc = kms_err_set(err, KMS_EUNAVAIL, "forward to leader %llu: status %d: %s",
                         (unsigned long long)leader_id, status,
                         details != NULL ? details : "");
        goto out;
    }
    resp = kmsd__v1__forward_response__unpack(NULL, outlen, out);
    if (resp == NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "forward: malformed reply from leader");
        goto out;
    }
    res->index = resp->index;
    res->code = resp->result_code;
    res->count = resp->count;
    snprintf(res->msg, sizeof(res->msg), "%s", resp->result_msg != NULL ? resp->result_msg : "");
    rc = 0;
out:
    if (resp != NULL) {
        kmsd__v1__forward_response__free_unpacked(resp, NULL);
    }
    free(buf);
    free(out);
    free(details);
    return rc;
}

int kmsd_member_probe(struct kmsd *d, uint64_t peer_id, unsigned timeout_ms, bool *denied,
                      struct kms_err *err)
{
    Kmsd__V1__ForwardRequest req = KMSD__V1__FORWARD_REQUEST__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__Noop noop = KMSD__V1__NOOP__INIT;
    uint8_t *buf = NULL, *out = NULL;
    size_t len, outlen = 0;
    char *details = NULL, addr[256];
    struct kms_rpc_channel *ch = NULL;
    int status = 0, rc;

    *denied = false;
    if (kmsd_member_cluster_address(d, peer_id, addr) != 0) {
        rc = kms_err_set(err, KMS_EUNAVAIL, "no cluster address known for node %llu",
                         (unsigned long long)peer_id);
        goto out;
    }
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    e.noop = &noop;
    req.entry = &e;
    req.from_id = d->opt.node_id;
    len = protobuf_c_message_get_packed_size(&req.base);
    buf = malloc(len > 0 ? len : 1);
    if (buf == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "member probe: out of memory");
        goto out;
    }
    protobuf_c_message_pack(&req.base, buf);
    /* A channel of its own, not the forward cache: that one is keyed by node
     * id and keeps the first address it was made for, and a probe runs
     * before the leader published the members' cluster addresses. */
    {
        struct kms_rpc_client_tls tls = {d->opt.cluster_ca, d->opt.node_cert, d->opt.node_key};
        struct kms_rpc_channel_options copts;
        char cn[40];
        snprintf(cn, sizeof(cn), "kmsd-node-%llu", (unsigned long long)peer_id);
        memset(&copts, 0, sizeof(copts));
        copts.expect_peer_cn = cn;
        if ((rc = kms_rpc_channel_create_opts(addr, &tls, &copts, &ch, err)) != 0) {
            rc = kms_err_wrap(err, KMS_EUNAVAIL, "member probe of node %llu at %s",
                              (unsigned long long)peer_id, addr);
            ch = NULL;
            goto out;
        }
    }
    rc = kms_rpc_unary(ch, "/kmsd.v1.Cluster/Forward", buf, len, timeout_ms, &out, &outlen,
                       &status, &details, err);
    if (rc != 0 || status == GRPC_STATUS_UNAVAILABLE ||
        status == GRPC_STATUS_DEADLINE_EXCEEDED) {
        rc = kms_err_set(err, KMS_EUNAVAIL, "member probe of node %llu at %s: %s",
                         (unsigned long long)peer_id, addr,
                         details != NULL ? details : "unreachable");
        goto out;
    }
    /* cluster_forward.c forward_run_cb: "node N is not a member of the cluster". */
    *denied = status == GRPC_STATUS_PERMISSION_DENIED && details != NULL &&
              strstr(details, "is not a member of the cluster") != NULL;
    rc = 0;
out:
    if (ch != NULL) {
        kms_rpc_channel_destroy(ch);
    }
    free(buf);
    free(out);
    free(details);
    return rc;
}

enum kmsd_write_next kmsd_write_next(int rc, uint64_t leader_id, uint64_t self_id,
                                     bool forwardable)
{
    if (rc == 0) {
        return KMSD_WRITE_APPLIED;
    }
    if (rc == KMS_ENOTLEADER && leader_id != 0 && leader_id != self_id) {
        return forwardable ? KMSD_WRITE_FORWARD : KMSD_WRITE_REDIRECT;
    }
    if (rc == KMS_EUNAVAIL || rc == KMS_ETIMEDOUT) {
        /* kms_raft_propose: the entry may or may not commit later */
        return KMSD_WRITE_RETRY_UNCERTAIN;
    }
    if (rc == KMS_ENOTLEADER) {
        return KMSD_WRITE_RETRY;
    }
    return KMSD_WRITE_FAIL;
}

int kmsd_write_outcome(const Kmsd__V1__Entry *e, int code, bool uncertain)
{
    if (uncertain && code == KMS_EEXIST && e->op_case == KMSD__V1__ENTRY__OP_PUT_RECORD) {
        /* The earlier attempt committed: the key_id is ours alone. */
        return 0;
    }
    return code;
}

#define WRITE_RETRY_MS 25u

int kmsd_write(struct kmsd *d, const Kmsd__V1__Entry *e, unsigned wait_ms,
               struct kmsd_write_result *res, struct kms_err *err)
{
    uint64_t deadline = kms_mono_ms() + wait_ms;
    bool uncertain = false;
    enum kmsd_write_next next;
    int rc;

    memset(res, 0, sizeof(*res));
    if (e->op_case == KMSD__V1__ENTRY__OP_PUT_RECORD) {
        /* What a leader proposes is checked like what it accepts by Forward. */
        Kmsd__V1__EncryptedKeyring *ek = NULL;
        uint32_t max_term = 0;
        if (kms_store_keyring_get(d->store, &ek, NULL) == 0) {
            max_term = ek->active_term;
            kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
        }
        if (e->put_record == NULL ||
            (rc = kmsd_authz_record_check(e->put_record->record, max_term, err)) != 0) {
            return kms_err_wrap(err, KMS_EFORMAT, "refusing to propose a malformed record");
        }
    }
    for (;;) {
        uint64_t now = kms_mono_ms();
        unsigned left = now < deadline ? (unsigned)(deadline - now) : 0;
        struct kms_raft_result rr;
        struct kms_err e2;

        if (left == 0 || atomic_load(&d->stopping)) {
            return kms_err_set(err, KMS_EUNAVAIL,
                               "no leader committed the write within %u ms", wait_ms);
        }
        kms_err_clear(&e2);
        memset(&rr, 0, sizeof(rr));
        uint64_t t_us = kms_mono_us();
        rc = kms_raft_propose(d->raft, e, left, &rr, &e2);
        next = kmsd_write_next(rc, rr.leader_id, d->opt.node_id,
                               kmsd_authz_entry_forwardable(e->op_case));
        if (next == KMSD_WRITE_APPLIED) {
            kmsd_hist_observe(&d->metrics.raft_apply_latency, kms_mono_us() - t_us);
            res->index = rr.index;
            res->code = rr.code;
            res->count = rr.count;
            memcpy(res->msg, rr.msg, sizeof(res->msg));
            res->msg[sizeof(res->msg) - 1] = '\0';
            goto done;
        }
        if (next == KMSD_WRITE_REDIRECT) {
            char msg[400];
            if (uncertain) {
                /* An earlier attempt on this node may have committed: the
                 * caller must not blindly send it to the new leader. */
                return kms_err_set(err, KMS_EUNAVAIL,
                                   "leadership moved to node %llu while the write was in "
                                   "flight; it may or may not have been applied (check "
                                   "before retrying)",
                                   (unsigned long long)rr.leader_id);
            }
            if (!kmsd_leader_redirect(d, msg, sizeof(msg))) {
                snprintf(msg, sizeof(msg), "not the leader; the leader is node %llu",
                         (unsigned long long)rr.leader_id);
            }
            return kms_err_set(err, KMS_ENOTLEADER, "%s", msg);
        }
        if (next == KMSD_WRITE_FORWARD) {
            rc = forward(d, rr.leader_id, e, left, res, &e2);
            if (rc == 0) {
                now = kms_mono_ms();
                left = now < deadline ? (unsigned)(deadline - now) : 1;
                if (kms_raft_wait_applied(d->raft, res->index, left) != 0) {
                    return kms_err_set(err, KMS_EUNAVAIL,
                                       "entry %llu committed but not applied on this node in time",
                                       (unsigned long long)res->index);
                }
                goto done;
            }
            if (rc == KMS_EUNAVAIL) {
                uncertain = true;
            }
        } else if (next == KMSD_WRITE_RETRY_UNCERTAIN) {
            uncertain = true;
        } else if (next == KMSD_WRITE_FAIL) {
            if (err != NULL) {
                *err = e2;
            }
            return rc;
        }
        kms_log(KMS_LOG_DEBUG, "write", "retrying write", "reason", e2.msg, NULL);
        /* What a retry waits for is a leader (a new leader's barrier
         * commits) or a commit: woken by the next entry applied here, at
         * most WRITE_RETRY_MS later (the pace against an unreachable
         * leader, and the bound on noticing `stopping`: kmsd_stop stops
         * the write pool before raft, so no raft wake comes then). An entry
         * applied between the failed attempt and the mark costs one pace,
         * as the plain sleep this replaces always did. */
        now = kms_mono_ms();
        if (now < deadline) {
            uint64_t mark = kmsd_applied_mark(d);
            unsigned pause = deadline - now < WRITE_RETRY_MS ? (unsigned)(deadline - now)
                                                             : WRITE_RETRY_MS;
            (void)kmsd_wait_applied_past(d, mark, pause);
        }
    }
done:
    res->code = kmsd_write_outcome(e, res->code, uncertain);
    return 0;
}

/* Both byte strings equal (lengths first). Not secret: ciphertext, ids. */
static bool bytes_eq(const ProtobufCBinaryData *a, const ProtobufCBinaryData *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

int kmsd_record_readback(struct kmsd *d, const Kmsd__V1__SealedRecord *rec,
                         struct kms_err *err)
{
    Kmsd__V1__SealedRecord *got = NULL;
    struct kms_err e2;
    char kid[33] = "";
    const char *why = NULL;
    int rc;

    kms_err_clear(&e2);
    (void)kms_hex_encode_ct(rec->key_id.data, rec->key_id.len, kid, sizeof(kid), NULL);
    if (rec->key_id.len != KMS_KEY_ID_LEN) {
        why = "bad key id";
    } else if ((rc = kms_store_record_get(d->store, rec->key_id.data, &got, &e2)) != 0) {
        why = rc == KMS_ENOTFOUND ? "record absent from the applied state" : e2.msg;
    } else if (!bytes_eq(&got->key_id, &rec->key_id) || got->term != rec->term ||
               !bytes_eq(&got->nonce, &rec->nonce) ||
               !bytes_eq(&got->ciphertext, &rec->ciphertext) || got->node_uuid == NULL ||
               rec->node_uuid == NULL || strcmp(got->node_uuid, rec->node_uuid) != 0) {
        why = "stored record differs from the one sealed";
    }
    if (got != NULL) {
        kmsd__v1__sealed_record__free_unpacked(got, NULL);
    }
    if (why == NULL) {
        return 0;
    }
    atomic_fetch_add(&d->metrics.seal_readback_failures, 1);
    kms_log(KMS_LOG_ERROR, "write", "seal not acknowledged: read-back failed", "key_id", kid,
            "reason", why, NULL);
    return kms_err_set(err, KMS_EUNAVAIL, "seal could not be verified in the replicated state: %s",
                       why);
}
