/*
 * The cluster API (:4051, mutual TLS): kmsd.v1.Cluster (node to node) and
 * kmsd.v1.Operator (kmsctl).
 *
 * The gRPC server verifies client certificates against the union of the
 * cluster CA and the operator CA. Who may call which method is one table,
 * kmsd_authz_method() (authz.c), applied by dispatch_cb below before any
 * handler runs: Forward needs a node certificate of a current member (one
 * CN, exactly kmsd-node-<id>, cluster CA) and carries only PutRecord
 * entries, which the leader validates; operator methods need an operator
 * certificate that is not a node certificate. Every other write (keyring,
 * members, revocations) is proposed by the leader itself for an operator
 * call; a follower answers such calls "not the leader; ..." and kmsctl
 * follows it to the leader.
 *
 * Error details carry the whole kms_err chain so kmsctl can show it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd_seal.h"
#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_k8s.h"
#include "kmsd_peer.h"
#include "kmsd_pool.h"
#include "kmsd_rewrap.h"
#include "kmsd_touch.h"
#include "kmsd_rekey.h"
#include "kmsd_share_recipients.h"
#include "kmsd_snapshot.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

/* kmsd.h */
void kmsd_call_finish_msg(struct kms_rpc_call *call, const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n > 0 ? n : 1);
    if (buf == NULL) {
        kms_rpc_call_finish(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    protobuf_c_message_pack(m, buf);
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, buf, n);
    OPENSSL_cleanse(buf, n);
    free(buf);
}

static void finish_err(struct kms_rpc_call *call, const char *op, int code, const char *msg)
{
    kms_log(KMS_LOG_INFO, "operator", "request failed", "op", op, "error", kms_errname(code),
            "detail", msg, "peer", kms_rpc_call_peer(call), NULL);
    kms_rpc_call_finish(call, kmsd_grpc_status(code), msg, NULL, 0);
}

/* Extra fields for the call's audit line (written after its outcome by
 * call_finish_cb). Handler's thread. */
static void audit_note(struct kms_rpc_call *call, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void audit_note(struct kms_rpc_call *call, const char *fmt, ...)
{
    char note[KMS_RPC_NOTE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(note, sizeof(note), fmt, ap);
    va_end(ap);
    kms_rpc_call_note_set(call, note);
}

/* True when the call's node certificate names a current member of the raft
 * configuration (pool threads: kms_raft_status may wait). */
static bool node_is_member(struct kmsd *d, uint64_t id)
{
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    for (size_t i = 0; i < st.n_members && i < sizeof(st.members) / sizeof(st.members[0]);
         i++) {
        if (st.members[i].id == id) {
            return true;
        }
    }
    return false;
}

static void forward_refuse(struct kmsd *d, struct kms_rpc_call *call, const char *why)
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
    if (!node_is_member(d, j->caller_id)) {
        char why[96];
        snprintf(why, sizeof(why), "node %llu is not a member of the cluster",
                 (unsigned long long)j->caller_id);
        forward_refuse(d, j->call, why);
        goto out;
    }
    if (j->r->from_id != j->caller_id) {
        forward_refuse(d, j->call, "from_id differs from the certificate's node id");
        goto out;
    }
    if (!kmsd_authz_entry_forwardable(j->r->entry->op_case)) {
        forward_refuse(d, j->call,
                       "a node may forward only sealed records (PutRecord), last-access "
                       "batches (TouchBatch) and the peer unseal gate (SetPeerUnsealGate)");
        goto out;
    }
    if (j->r->entry->op_case == KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE) {
        if (kmsd_peer_gate_forward_check(d, j->r->entry, j->caller_id, &err) != 0) {
            char why[sizeof(err.msg) + 32];
            snprintf(why, sizeof(why), "peer unseal gate: %s", err.msg);
            forward_refuse(d, j->call, why);
            goto out;
        }
    } else if (j->r->entry->op_case == KMSD__V1__ENTRY__OP_TOUCH_BATCH) {
        if (kmsd_authz_touch_check(j->r->entry->touch_batch, KMSD_TOUCH_MAX, kms_wall_ms(),
                                   &err) != 0) {
            char why[sizeof(err.msg) + 32];
            snprintf(why, sizeof(why), "malformed touch batch: %s", err.msg);
            forward_refuse(d, j->call, why);
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
            forward_refuse(d, j->call, why);
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

static void forward_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    struct forward_job *j = NULL;
    uint64_t caller_id = 0;
    int rc;

    /* The dispatcher checked the certificate already; its id is needed here. */
    if (!kmsd_authz_node(d, call, &caller_id)) {
        forward_refuse(d, call, "certificate is not a cluster node certificate");
        goto out;
    }
    j = calloc(1, sizeof(*j));
    if (j == NULL) {
        finish_err(call, "forward", KMS_ENOMEM, "out of memory");
        goto out;
    }
    j->d = d;
    j->call = call;
    j->t0 = kms_mono_ms();
    j->caller_id = caller_id;
    j->r = kmsd__v1__forward_request__unpack(NULL, len, req);
    if (j->r == NULL || j->r->entry == NULL) {
        finish_err(call, "forward", KMS_EINVAL, "malformed forward request");
        goto out;
    }
    if ((rc = kmsd_pool_submit(d->write_pool, forward_run_cb, j)) != 0) {
        kms_rpc_call_finish(call, GRPC_STATUS_UNAVAILABLE,
                            rc == KMS_EBUSY ? "leader busy: too many proposals waiting"
                                            : "shutting down",
                            NULL, 0);
        goto out;
    }
    j = NULL; /* parked */
out:
    if (j != NULL) {
        if (j->r != NULL) {
            kmsd__v1__forward_request__free_unpacked(j->r, NULL);
        }
        free(j);
    }
}

/* ---- kmsd.v1.Operator ------------------------------------------------ */

struct members_ctx {
    Kmsd__V1__MemberStatus *ms;
    size_t n;
};

static int members_meta_cb(void *arg, const Kmsd__V1__Member *m)
{
    struct members_ctx *c = arg;
    for (size_t i = 0; i < c->n; i++) {
        if (c->ms[i].id == m->id) {
            if (m->cluster_address != NULL && m->cluster_address[0] != '\0') {
                c->ms[i].cluster_address = strdup(m->cluster_address);
            }
            if (m->talos_address != NULL) {
                c->ms[i].talos_address = strdup(m->talos_address);
            }
            if (m->version != NULL) {
                c->ms[i].version = strdup(m->version);
            }
        }
    }
    return 0;
}

/* Fills members from raft's configuration plus replicated metadata. Strings
 * that are strdup'ed are released by members_free. */
static Kmsd__V1__MemberStatus **members_build(struct kmsd *d, const struct kms_raft_status *st,
                                              struct members_ctx *c)
{
    Kmsd__V1__MemberStatus **ptrs;
    c->n = st->n_members;
    c->ms = calloc(c->n + 1, sizeof(*c->ms));
    ptrs = calloc(c->n + 1, sizeof(*ptrs));
    if (c->ms == NULL || ptrs == NULL) {
        free(c->ms);
        free(ptrs);
        c->ms = NULL;
        c->n = 0;
        return NULL;
    }
    for (size_t i = 0; i < c->n; i++) {
        kmsd__v1__member_status__init(&c->ms[i]);
        c->ms[i].id = st->members[i].id;
        c->ms[i].raft_address = (char *)st->members[i].address;
        c->ms[i].role = (char *)kms_raft_member_role_name(st->members[i].role);
        c->ms[i].is_leader = st->members[i].id == st->leader_id;
        c->ms[i].entry_version = st->member_entry_version[i];
        ptrs[i] = &c->ms[i];
    }
    (void)kms_store_members_list(d->store, members_meta_cb, c, NULL);
    for (size_t i = 0; i < c->n; i++) {
        if (c->ms[i].cluster_address == protobuf_c_empty_string || c->ms[i].cluster_address == NULL) {
            c->ms[i].cluster_address = NULL;
            for (size_t j = 0; j < d->opt.n_peers; j++) {
                if (d->opt.peers[j].id == c->ms[i].id) {
                    c->ms[i].cluster_address = strdup(d->opt.peers[j].cluster_address);
                }
            }
            if (c->ms[i].cluster_address == NULL) {
                c->ms[i].cluster_address = strdup("");
            }
        }
        if (c->ms[i].talos_address == protobuf_c_empty_string) {
            c->ms[i].talos_address = strdup("");
        }
        if (c->ms[i].version == protobuf_c_empty_string) {
            c->ms[i].version = strdup("");
        }
    }
    return ptrs;
}

static void members_free(struct members_ctx *c, Kmsd__V1__MemberStatus **ptrs)
{
    for (size_t i = 0; i < c->n; i++) {
        free(c->ms[i].cluster_address);
        free(c->ms[i].talos_address);
        free(c->ms[i].version);
    }
    free(c->ms);
    free(ptrs);
}

static void status_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__StatusResponse resp = KMSD__V1__STATUS_RESPONSE__INIT;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_raft_status st;
    struct members_ctx mc = {NULL, 0};
    Kmsd__V1__MemberStatus **ptrs = NULL;
    struct kms_keyring *kr = NULL;
    char cid[33] = "";
    char kerr[sizeof(d->keyring_error)];
    char serr[KMS_ERR_MSG_MAX];
    uint32_t kterms[KMS_KEYRING_MAX_TERMS];
    unsigned progress = 0, threshold = 0;

    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    if (kms_store_keyring_get(d->store, &ek, NULL) == 0) {
        resp.initialized = true;
        resp.shares = ek->share_count;
        resp.threshold = ek->threshold;
        resp.hsm_wrapped = ek->hsm != NULL;
        if (kms_hex_encode_ct(ek->cluster_id.data, ek->cluster_id.len, cid, sizeof(cid),
                              NULL) != 0) {
            cid[0] = '\0';
        }
    }
    kmsd_unseal_progress(d, &progress, &threshold);
    resp.sealed = !kmsd_is_unsealed(d);
    resp.progress = progress;
    resp.node_id = d->opt.node_id;
    resp.role = (char *)kms_raft_role_name(st.role);
    resp.leader_id = st.leader_id;
    resp.term = st.term;
    resp.commit_index = st.commit_index;
    resp.applied_index = st.applied_index;
    resp.version = (char *)KMSD_VERSION;
    /* The quorum read lease only: with unsealReads: local the node serves
     * without one, and says so in unseal_reads. */
    resp.lease = kms_raft_lease_valid(d->raft);
    resp.unseal_reads = d->opt.unseal_reads_local ? "local" : "lease";
    resp.member = kmsd_raft_is_member(d);
    resp.peer_unseal = d->opt.peer_unseal;
    resp.peer_unseal_gate = (char *)kmsd_peer_gate_state(d);
    resp.entry_version_supported = KMS_ENTRY_VERSION;
    resp.entry_version_emitting = st.role == KMS_RAFT_LEADER ? st.entry_version : 0;
    resp.entry_version_applied = kms_store_entry_version(d->store);
    resp.talos_listening = atomic_load(&d->talos_listening);
    resp.cluster_id = cid;
    kr = kmsd_keyring_get(d);
    resp.active_term = kr != NULL ? kms_keyring_active_term(kr) : 0;
    resp.n_keyring_terms = kms_keyring_terms(kr, kterms, KMS_KEYRING_MAX_TERMS);
    resp.keyring_terms = kterms;
    pthread_mutex_lock(&d->mu);
    snprintf(kerr, sizeof(kerr), "%s", d->keyring_error);
    pthread_mutex_unlock(&d->mu);
    resp.keyring_error = kerr;
    resp.seal_type = kmsd_hsm_enabled(d) ? "pkcs11" : "shamir";
    kmsd_hsm_status(d, serr, sizeof(serr));
    resp.seal_error = resp.sealed ? serr : "";
    ptrs = members_build(d, &st, &mc);
    resp.n_members = ptrs != NULL ? mc.n : 0;
    resp.members = ptrs;
    kmsd_call_finish_msg(call, &resp.base);
    members_free(&mc, ptrs);
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
}

static void init_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__InitRequest *r = NULL;
    Kmsd__V1__InitResponse resp = KMSD__V1__INIT_RESPONSE__INIT;
    struct kms_err err;
    char **shares = NULL, **enc = NULL;
    char cid[33];
    unsigned n = 0;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__init_request__unpack(NULL, len, req);
    if (r == NULL) {
        finish_err(call, "init", KMS_EINVAL, "malformed request");
        goto out;
    }
    n = r->key_shares;
    if (n < 1 || n > 255 || r->key_threshold < 1 || r->key_threshold > n ||
        (r->key_threshold < 2 && !(n == 1 && r->key_threshold == 1))) {
        finish_err(call, "init", KMS_EINVAL,
                   "key shares and threshold must satisfy 2 <= threshold <= shares <= 255");
        goto out;
    }
    if (!kmsd_is_initialized(d) && !kmsd_raft_is_member(d)) {
        /* Started outside initialCluster: no configuration to commit the
         * keyring to (it would wait for a leader that never comes). */
        finish_err(call, "init", KMS_EUNINIT,
                   "this node is not a member of a cluster: it waits to be added (run kmsctl "
                   "operator members add on the cluster's leader), or run init against a "
                   "member of initialCluster");
        goto out;
    }
    if (r->n_share_recipients > 0 &&
        (rc = kmsd_share_recipients_check(r->share_recipients, r->n_share_recipients, n,
                                          &err)) != 0) {
        finish_err(call, "init", rc, err.msg); /* before init: nothing changed */
        goto out;
    }
    rc = kmsd_init_cluster(d, n, r->key_threshold, &shares, cid, &err);
    if (rc != 0) {
        finish_err(call, "init", rc, err.msg);
        goto out;
    }
    resp.n_shares = n;
    resp.shares = shares;
    resp.threshold = r->key_threshold;
    resp.cluster_id = cid;
    if (r->n_share_recipients > 0 &&
        kmsd_share_recipients_seal(r->share_recipients, shares, n, &enc) == 0) {
        resp.n_shares = 0;
        resp.n_encrypted_shares = n;
        resp.encrypted_shares = enc;
    }
    resp.recovery = kmsd_hsm_enabled(d);
    kmsd_call_finish_msg(call, &resp.base);
out:
    kmsd_share_recipients_free(enc, n);
    if (shares != NULL) {
        for (unsigned i = 0; i < n; i++) {
            OPENSSL_cleanse(shares[i], strlen(shares[i]));
            free(shares[i]);
        }
        free(shares);
    }
    if (r != NULL) {
        kmsd__v1__init_request__free_unpacked(r, NULL);
    }
}

static void unseal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__UnsealRequest *r = NULL;
    Kmsd__V1__UnsealResponse resp = KMSD__V1__UNSEAL_RESPONSE__INIT;
    struct kms_err err;
    unsigned progress = 0, threshold = 0;
    bool unsealed = false;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__unseal_request__unpack(NULL, len, req);
    if (r == NULL) {
        finish_err(call, "unseal", KMS_EINVAL, "malformed request");
        goto out;
    }
    if (r->reset) {
        audit_note(call, "reset");
    }
    rc = kmsd_unseal_submit(d, r->share, r->reset, &progress, &threshold, &unsealed, &err);
    if (rc != 0) {
        finish_err(call, "unseal", rc, err.msg);
        goto out;
    }
    if (unsealed) {
        kmsd_hsm_admin_sealed(d, false);
    }
    resp.sealed = !unsealed;
    resp.progress = progress;
    resp.threshold = threshold;
    kmsd_call_finish_msg(call, &resp.base);
out:
    if (r != NULL) {
        if (r->share != NULL) {
            OPENSSL_cleanse(r->share, strlen(r->share));
        }
        kmsd__v1__unseal_request__free_unpacked(r, NULL);
    }
}

static void seal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__SealResponse resp = KMSD__V1__SEAL_RESPONSE__INIT;
    struct kms_err err;
    kms_err_clear(&err);
    /* PKCS#11 seal: no auto-unseal until k recovery shares or a restart. */
    kmsd_hsm_admin_sealed(d, true);
    /* Seals; with unseal.peer this also closes the cluster's peer unseal gate. */
    if (kmsd_peer_operator_seal(d, &err) != 0) {
        finish_err(call, "seal", KMS_EUNAVAIL, err.msg);
        return;
    }
    kmsd_call_finish_msg(call, &resp.base);
}

static void stepdown_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__StepDownResponse resp = KMSD__V1__STEP_DOWN_RESPONSE__INIT;
    struct kms_raft_status st;
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    if (st.role != KMS_RAFT_LEADER) {
        finish_err(call, "step-down", KMS_ENOTLEADER,
                   "this node is not the leader (run step-down against the leader)");
        return;
    }
    rc = kms_raft_transfer(d->raft, 0, d->opt.request_wait_ms, &err);
    if (rc != 0) {
        finish_err(call, "step-down", rc, err.msg);
        return;
    }
    (void)kms_raft_status(d->raft, &st);
    resp.new_leader_id = st.leader_id;
    kmsd_call_finish_msg(call, &resp.base);
}

static void transfer_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__TransferLeaderRequest *r = NULL;
    Kmsd__V1__TransferLeaderResponse resp = KMSD__V1__TRANSFER_LEADER_RESPONSE__INIT;
    struct kms_raft_status st;
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__transfer_leader_request__unpack(NULL, len, req);
    if (r == NULL) {
        finish_err(call, "transfer-leader", KMS_EINVAL, "malformed request");
        return;
    }
    audit_note(call, "id=%llu", (unsigned long long)r->id);
    rc = kms_raft_transfer(d->raft, r->id, d->opt.request_wait_ms, &err);
    if (rc != 0) {
        finish_err(call, "transfer-leader", rc, err.msg);
    } else {
        memset(&st, 0, sizeof(st));
        (void)kms_raft_status(d->raft, &st);
        resp.new_leader_id = st.leader_id;
        kmsd_call_finish_msg(call, &resp.base);
    }
    kmsd__v1__transfer_leader_request__free_unpacked(r, NULL);
}

static void rotate_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__RotateResponse resp = KMSD__V1__ROTATE_RESPONSE__INIT;
    struct kms_err err;
    uint32_t term = 0;
    int rc;

    kms_err_clear(&err);
    rc = kmsd_rotate(d, &term, &err);
    if (rc != 0) {
        finish_err(call, "rotate", rc, err.msg);
        return;
    }
    resp.active_term = term;
    kmsd_call_finish_msg(call, &resp.base);
}

static void seal_migrate_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req,
                            size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__SealMigrateRequest *r = NULL;
    Kmsd__V1__SealMigrateResponse resp = KMSD__V1__SEAL_MIGRATE_RESPONSE__INIT;
    struct kms_err err;
    uint32_t term = 0;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__seal_migrate_request__unpack(NULL, len, req);
    if (r == NULL) {
        finish_err(call, "seal-migrate", KMS_EINVAL, "malformed request");
        goto out;
    }
    rc = kmsd_seal_migrate(d, r->to, r->shares, r->n_shares, &term, &err);
    if (rc != 0) {
        finish_err(call, "seal-migrate", rc, err.msg);
        goto out;
    }
    resp.seal_type = r->to;
    resp.active_term = term;
    kmsd_call_finish_msg(call, &resp.base);
out:
    if (r != NULL) {
        for (size_t i = 0; i < r->n_shares; i++) {
            OPENSSL_cleanse(r->shares[i], strlen(r->shares[i]));
        }
        kmsd__v1__seal_migrate_request__free_unpacked(r, NULL);
    }
}

static void members_list_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req,
                            size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__MembersListResponse resp = KMSD__V1__MEMBERS_LIST_RESPONSE__INIT;
    struct kms_raft_status st;
    struct members_ctx mc = {NULL, 0};
    Kmsd__V1__MemberStatus **ptrs;

    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    ptrs = members_build(d, &st, &mc);
    resp.n_members = ptrs != NULL ? mc.n : 0;
    resp.members = ptrs;
    kmsd_call_finish_msg(call, &resp.base);
    members_free(&mc, ptrs);
}

static int put_member(struct kmsd *d, uint64_t id, const char *raft, const char *cluster,
                      const char *talos, const char *version, struct kms_err *err)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__PutMember pm = KMSD__V1__PUT_MEMBER__INIT;
    Kmsd__V1__Member m = KMSD__V1__MEMBER__INIT;
    struct kmsd_write_result res;

    m.id = id;
    m.raft_address = (char *)raft;
    m.cluster_address = (char *)cluster;
    m.talos_address = (char *)talos;
    m.version = (char *)version;
    pm.member = &m;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_MEMBER;
    e.put_member = &pm;
    return kmsd_write(d, &e, d->opt.request_wait_ms, &res, err);
}

/* Only the leader publishes its own metadata: member entries are never
 * forwarded (a node certificate could otherwise re-point a member's cluster
 * address). A follower's entry comes from `members add` or the configured
 * peers until it leads. */
int kmsd_publish_self(struct kmsd *d, struct kms_err *err)
{
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    if (st.role != KMS_RAFT_LEADER) {
        return kms_err_set(err, KMS_ENOTLEADER, "member metadata is published by the leader");
    }
    return put_member(d, d->opt.node_id, d->opt.raft_advertise, d->opt.cluster_advertise,
                      d->opt.talos_advertise, KMSD_VERSION, err);
}

static int remove_member_meta(struct kmsd *d, uint64_t id, struct kms_err *err)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__RemoveMember rm = KMSD__V1__REMOVE_MEMBER__INIT;
    struct kmsd_write_result res;
    rm.id = id;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REMOVE_MEMBER;
    e.remove_member = &rm;
    return kmsd_write(d, &e, d->opt.request_wait_ms, &res, err);
}

static void members_add_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req,
                           size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__MembersAddRequest *r = NULL;
    Kmsd__V1__MembersAddResponse resp = KMSD__V1__MEMBERS_ADD_RESPONSE__INIT;
    struct kms_err err;
    bool was_member;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__members_add_request__unpack(NULL, len, req);
    if (r == NULL || r->id == 0 || r->raft_address == NULL || r->raft_address[0] == '\0') {
        finish_err(call, "members-add", KMS_EINVAL, "id and raft address are required");
        goto out;
    }
    audit_note(call, "id=%llu raft=%.100s", (unsigned long long)r->id, r->raft_address);
    was_member = node_is_member(d, r->id);
    /* Metadata first so the new node's cluster address is known to whoever
     * forwards to it once it leads. */
    rc = put_member(d, r->id, r->raft_address, r->cluster_address, r->talos_address, "", &err);
    if (rc == 0) {
        rc = kms_raft_add(d->raft, r->id, r->raft_address, 60000, &err);
        if (rc != 0 && !was_member) {
            /* No partial add: withdraw what this call committed (the spare
             * raft may hold, then the metadata), so a failed add leaves the
             * cluster as it was. */
            char msg[sizeof(err.msg) * 2 + 200];
            struct kms_err uerr;
            int urc = 0;
            kms_err_clear(&uerr);
            if (node_is_member(d, r->id)) {
                urc = kms_raft_remove(d->raft, r->id, d->opt.request_wait_ms, &uerr);
            }
            if (urc == 0) {
                urc = remove_member_meta(d, r->id, &uerr);
            }
            if (urc == 0) {
                snprintf(msg, sizeof(msg), "%s (nothing kept: its member metadata was withdrawn)",
                         err.msg);
            } else {
                snprintf(msg, sizeof(msg),
                         "%s; withdrawing its member metadata failed too (%s): run kmsctl "
                         "operator members remove --id %llu",
                         err.msg, uerr.msg, (unsigned long long)r->id);
            }
            finish_err(call, "members-add", rc, msg);
            goto out;
        }
    }
    if (rc != 0) {
        finish_err(call, "members-add", rc, err.msg);
        goto out;
    }
    kmsd_call_finish_msg(call, &resp.base);
out:
    if (r != NULL) {
        kmsd__v1__members_add_request__free_unpacked(r, NULL);
    }
}

static void members_remove_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req,
                              size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__MembersRemoveRequest *r = NULL;
    Kmsd__V1__MembersRemoveResponse resp = KMSD__V1__MEMBERS_REMOVE_RESPONSE__INIT;
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__members_remove_request__unpack(NULL, len, req);
    if (r == NULL || r->id == 0) {
        finish_err(call, "members-remove", KMS_EINVAL, "member id is required");
        goto out;
    }
    audit_note(call, "id=%llu", (unsigned long long)r->id);
    rc = kms_raft_remove(d->raft, r->id, d->opt.request_wait_ms * 2, &err);
    if (rc == 0) {
        rc = remove_member_meta(d, r->id, &err);
    }
    if (rc != 0) {
        finish_err(call, "members-remove", rc, err.msg);
        goto out;
    }
    kmsd_call_finish_msg(call, &resp.base);
out:
    if (r != NULL) {
        kmsd__v1__members_remove_request__free_unpacked(r, NULL);
    }
}

static int hex_decode16(const char *s, uint8_t out[16])
{
    size_t n = 0;
    if (s == NULL || strlen(s) != 32 || kms_hex_decode_ct(s, 32, out, 16, &n, NULL) != 0 ||
        n != 16) {
        return -1;
    }
    return 0;
}

static char *ip_text(const ProtobufCBinaryData *ip)
{
    char buf[64] = "";
    if (ip->len == 4) {
        snprintf(buf, sizeof(buf), "%u.%u.%u.%u", ip->data[0], ip->data[1], ip->data[2],
                 ip->data[3]);
    } else if (ip->len == 16) {
        size_t o = 0;
        for (int i = 0; i < 16; i += 2) {
            o += (size_t)snprintf(buf + o, sizeof(buf) - o, i ? ":%x" : "%x",
                                  (ip->data[i] << 8) | ip->data[i + 1]);
        }
    }
    return strdup(buf);
}

static int key_info_fill(Kmsd__V1__KeyInfo *ki, const Kmsd__V1__SealedRecord *rec)
{
    char *hex = malloc(33);
    if (hex == NULL) {
        return KMS_ENOMEM;
    }
    if (kms_hex_encode_ct(rec->key_id.data, rec->key_id.len, hex, 33, NULL) != 0) {
        hex[0] = '\0';
    }
    kmsd__v1__key_info__init(ki);
    ki->key_id = hex;
    ki->node_uuid = strdup(rec->node_uuid != NULL ? rec->node_uuid : "");
    ki->term = rec->term;
    ki->created_at = rec->created_at;
    ki->source_ip = ip_text(&rec->source_ip);
    ki->last_access_at = rec->last_access_at;
    ki->revoked_at = rec->revoked_at;
    ki->origin_term = rec->origin_term;
    return 0;
}

static void key_info_clear(Kmsd__V1__KeyInfo *ki)
{
    free(ki->key_id);
    free(ki->node_uuid);
    free(ki->source_ip);
}

/* KeysList paging (cluster.proto): default and maximum page size. */
#define KEYS_PAGE_MAX 1000u
#define KEYS_LIST_MORE 1 /* keys_list_each: page full, one more key exists */

struct keys_ctx {
    Kmsd__V1__KeyInfo *ki;
    size_t n, cap;
    size_t limit; /* page size; 0 = unbounded (KeysRevoke and friends) */
    /* KeysList filters (cluster.proto); 0/false = off */
    int64_t unused_since;
    bool revoked;
    uint32_t term;
};

/* KeysList filters: unused since (last access, or creation when never
 * used, before the bound), revoked only, on one term only. */
static bool keys_filter_match(const struct keys_ctx *c, const Kmsd__V1__SealedRecord *rec)
{
    int64_t used = rec->last_access_at != 0 ? rec->last_access_at : rec->created_at;

    if (c->unused_since > 0 && used >= c->unused_since) {
        return false;
    }
    if (c->revoked && rec->revoked_at == 0) {
        return false;
    }
    if (c->term != 0 && rec->term != c->term) {
        return false;
    }
    return true;
}

static int keys_list_each(void *arg, const Kmsd__V1__SealedRecord *rec)
{
    struct keys_ctx *c = arg;
    if (!keys_filter_match(c, rec)) {
        return 0;
    }
    if (c->limit > 0 && c->n == c->limit) {
        return KEYS_LIST_MORE;
    }
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        Kmsd__V1__KeyInfo *ki = realloc(c->ki, cap * sizeof(*ki));
        if (ki == NULL) {
            return KMS_ENOMEM;
        }
        c->ki = ki;
        c->cap = cap;
    }
    if (key_info_fill(&c->ki[c->n], rec) != 0) {
        return KMS_ENOMEM;
    }
    c->n++;
    return 0;
}

static void keys_list_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__KeysListRequest *r = NULL;
    Kmsd__V1__KeysListResponse resp = KMSD__V1__KEYS_LIST_RESPONSE__INIT;
    Kmsd__V1__KeyInfo **ptrs = NULL;
    struct keys_ctx c = {NULL, 0, 0, KEYS_PAGE_MAX, 0, false, 0};
    uint8_t after[16];
    char next[33] = "";
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__keys_list_request__unpack(NULL, len, req);
    if (r == NULL) {
        finish_err(call, "keys-list", KMS_EINVAL, "malformed request");
        goto out;
    }
    if (r->page_size > 0 && r->page_size < KEYS_PAGE_MAX) {
        c.limit = r->page_size;
    }
    c.unused_since = r->unused_since;
    c.revoked = r->revoked;
    c.term = r->term;
    if (r->page_token != NULL && r->page_token[0] != '\0' &&
        (strlen(r->page_token) != 32 ||
         kms_hex_decode_ct(r->page_token, 32, after, sizeof(after), NULL, NULL) != 0)) {
        finish_err(call, "keys-list", KMS_EINVAL, "invalid page token");
        goto out;
    }
    /* Operator reads reflect every write acknowledged before the call,
     * whichever replica acknowledged it. */
    (void)kmsd_read_barrier(d, d->opt.request_wait_ms);
    rc = kms_store_records_list_after(
        d->store, r->node_uuid != NULL && r->node_uuid[0] ? r->node_uuid : NULL,
        r->page_token != NULL && r->page_token[0] != '\0' ? after : NULL, keys_list_each, &c,
        &err);
    if (rc == KEYS_LIST_MORE) {
        rc = 0;
        snprintf(next, sizeof(next), "%s", c.ki[c.n - 1].key_id);
    }
    if (rc != 0) {
        finish_err(call, "keys-list", rc, err.msg[0] ? err.msg : kms_strerror(rc));
        goto out;
    }
    ptrs = calloc(c.n + 1, sizeof(*ptrs));
    if (ptrs == NULL) {
        finish_err(call, "keys-list", KMS_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < c.n; i++) {
        ptrs[i] = &c.ki[i];
    }
    resp.n_keys = c.n;
    resp.keys = ptrs;
    resp.next_page_token = next;
    kmsd_call_finish_msg(call, &resp.base);
out:
    for (size_t i = 0; i < c.n; i++) {
        key_info_clear(&c.ki[i]);
    }
    free(c.ki);
    free(ptrs);
    if (r != NULL) {
        kmsd__v1__keys_list_request__free_unpacked(r, NULL);
    }
}

static void keys_show_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__KeysShowRequest *r = NULL;
    Kmsd__V1__KeysShowResponse resp = KMSD__V1__KEYS_SHOW_RESPONSE__INIT;
    Kmsd__V1__SealedRecord *rec = NULL;
    Kmsd__V1__KeyInfo ki;
    uint8_t id[16];
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    kmsd__v1__key_info__init(&ki);
    ki.key_id = ki.node_uuid = ki.source_ip = NULL;
    r = kmsd__v1__keys_show_request__unpack(NULL, len, req);
    if (r == NULL || hex_decode16(r->key_id, id) != 0) {
        finish_err(call, "keys-show", KMS_EINVAL, "key id must be 32 hex digits");
        goto out;
    }
    audit_note(call, "key_id=%.32s", r->key_id);
    (void)kmsd_read_barrier(d, d->opt.request_wait_ms);
    rc = kms_store_record_get(d->store, id, &rec, &err);
    if (rc != 0) {
        finish_err(call, "keys-show", rc, rc == KMS_ENOTFOUND ? "no such key" : err.msg);
        goto out;
    }
    if (key_info_fill(&ki, rec) != 0) {
        finish_err(call, "keys-show", KMS_ENOMEM, "out of memory");
        goto out;
    }
    resp.key = &ki;
    kmsd_call_finish_msg(call, &resp.base);
out:
    key_info_clear(&ki);
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    if (r != NULL) {
        kmsd__v1__keys_show_request__free_unpacked(r, NULL);
    }
}

static void keys_revoke_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req,
                           size_t len)
{
    struct kmsd *d = arg;
    Kmsd__V1__KeysRevokeRequest *r = NULL;
    Kmsd__V1__KeysRevokeResponse resp = KMSD__V1__KEYS_REVOKE_RESPONSE__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__RevokeKey rk = KMSD__V1__REVOKE_KEY__INIT;
    Kmsd__V1__RevokeNode rn = KMSD__V1__REVOKE_NODE__INIT;
    struct kmsd_write_result res;
    uint8_t id[16];
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    r = kmsd__v1__keys_revoke_request__unpack(NULL, len, req);
    if (r == NULL) {
        finish_err(call, "keys-revoke", KMS_EINVAL, "malformed request");
        goto out;
    }
    e.version = 1;
    if (r->key_id != NULL && r->key_id[0] != '\0') {
        if (hex_decode16(r->key_id, id) != 0) {
            finish_err(call, "keys-revoke", KMS_EINVAL, "key id must be 32 hex digits");
            goto out;
        }
        rk.key_id.data = id;
        rk.key_id.len = 16;
        rk.revoked_at = kms_wall_ms();
        e.op_case = KMSD__V1__ENTRY__OP_REVOKE_KEY;
        e.revoke_key = &rk;
    } else if (r->node_uuid != NULL && r->node_uuid[0] != '\0') {
        rn.node_uuid = r->node_uuid;
        rn.revoked_at = kms_wall_ms();
        e.op_case = KMSD__V1__ENTRY__OP_REVOKE_NODE;
        e.revoke_node = &rn;
    } else {
        finish_err(call, "keys-revoke", KMS_EINVAL, "give a key id or a node UUID");
        goto out;
    }
    if (e.op_case == KMSD__V1__ENTRY__OP_REVOKE_KEY) {
        audit_note(call, "key_id=%.32s", r->key_id);
    } else {
        audit_note(call, "node_uuid=%.100s", r->node_uuid);
    }
    rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, &err);
    if (rc != 0) {
        finish_err(call, "keys-revoke", rc, err.msg);
        goto out;
    }
    if (res.code != 0) {
        finish_err(call, "keys-revoke", res.code,
                   res.code == KMS_ENOTFOUND ? "no such key" : res.msg);
        goto out;
    }
    resp.revoked = e.op_case == KMSD__V1__ENTRY__OP_REVOKE_KEY ? 1 : res.count;
    kmsd_call_finish_msg(call, &resp.base);
out:
    if (r != NULL) {
        kmsd__v1__keys_revoke_request__free_unpacked(r, NULL);
    }
}

/* ---- dispatch: the one place that authorises ------------------------- */

/* Every cluster API method is registered through dispatch_cb with its row of
 * the policy table (kmsd_authz_method): the caller's certificate is checked
 * there, before any handler runs. Operator handlers may block for long (a
 * write waiting for quorum, members add catching a new node up for up to a
 * minute): they run on the operator pool (KMSD_RUN_PARK), so the cluster API
 * workers stay free for Forward (which parks on the write pool) and the next
 * operator call. A KMSD_RUN_LEADER method on a follower is answered "not the
 * leader; the leader is node N, cluster API at ADDR" before its handler
 * runs: writes and leadership changes run on the leader, under the
 * operator's own identity (kmsctl follows the answer). */
struct op_job {
    struct kmsd_op_method *m;
    struct kms_rpc_call *call;
    uint8_t *req;
    size_t len;
};

static void op_run_cb(void *arg)
{
    struct op_job *j = arg;
    struct kmsd *d = j->m->d;
    char msg[400];

    if (atomic_load(&d->stopping)) {
        /* raft may be gone: do not start operator work while stopping */
        kms_rpc_call_finish(j->call, GRPC_STATUS_UNAVAILABLE, "shutting down", NULL, 0);
    } else if ((j->m->flags & KMSD_RUN_LEADER) && kmsd_leader_redirect(d, msg, sizeof(msg))) {
        finish_err(j->call, j->m->path, KMS_ENOTLEADER, msg);
    } else {
        j->m->fn(d, j->call, j->req, j->len);
    }
    OPENSSL_cleanse(j->req, j->len); /* shares travel in operator requests */
    free(j->req);
    free(j);
}

/* kms_rpc_finish_hook_fn for every cluster API call: counts it by method
 * and code, times Forward, and writes the operator call's audit line now
 * that its outcome is known (unless its row says KMSD_NO_AUDIT). */
static void call_finish_cb(void *arg, struct kms_rpc_call *call, int grpc_status,
                           const char *details)
{
    struct kmsd_op_method *m = arg;
    struct kmsd *d = m->d;
    size_t idx = (size_t)(m - d->op_methods);
    uint64_t us = kms_rpc_call_age_us(call);

    if (idx < KMSD_OP_METHODS && grpc_status >= 0 && grpc_status < KMSD_METRIC_CODES) {
        atomic_fetch_add(&d->metrics.cluster_calls[idx][grpc_status], 1);
    }
    if (m->flags & KMSD_AUTH_NODE) {
        kmsd_hist_observe(&d->metrics.forward_latency, us);
        return;
    }
    if (!(m->flags & KMSD_NO_AUDIT)) {
        const char *cn = kms_rpc_call_peer_cn(call), *op = strrchr(m->path, '/');
        char ms[32];
        snprintf(ms, sizeof(ms), "%llu", (unsigned long long)(us / 1000u));
        kms_log(KMS_LOG_INFO, "audit", "operator", "op", op != NULL ? op + 1 : m->path,
                "result", grpc_status == 0 ? "ok" : kmsd_grpc_code_name(grpc_status),
                "operator", cn != NULL ? cn : "", "peer", kms_rpc_call_peer(call), "note",
                kms_rpc_call_note(call), "detail",
                grpc_status != 0 && details != NULL ? details : "", "duration_ms", ms, NULL);
    }
}

static void dispatch_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct kmsd_op_method *m = arg;
    struct kmsd *d = m->d;
    struct op_job *j = NULL;
    uint64_t node_id = 0;
    int rc;

    /* first: refusals below are counted and audited too */
    kms_rpc_call_set_finish_hook(call, call_finish_cb, m);

    if (m->flags & KMSD_AUTH_NODE) {
        if (!kmsd_authz_node(d, call, &node_id)) {
            static const char why[] = "certificate is not a cluster node certificate "
                                      "(one CN kmsd-node-<id>, cluster CA)";
            if (m->fn == kmsd_peer_serve_cb) {
                kmsd_peer_refuse(d, call, GRPC_STATUS_PERMISSION_DENIED, why);
            } else {
                forward_refuse(d, call, why);
            }
            goto out;
        }
    } else if (m->flags & KMSD_AUTH_K8S) {
        if (!kmsd_authz_k8s(d, call)) {
            finish_err(call, m->path, KMS_EDENIED,
                       "certificate is not a Kubernetes KMS plugin certificate "
                       "(one CN " KMSD_K8S_CN_PREFIX "<name>, operator CA)");
            goto out;
        }
    } else if (!(m->flags & KMSD_AUTH_OPERATOR) || !kmsd_authz_operator(d, call)) {
        finish_err(call, m->path, KMS_EDENIED, "certificate is not an operator certificate");
        goto out;
    }
    if (!(m->flags & KMSD_RUN_PARK)) {
        m->fn(d, call, req, len);
        goto out;
    }
    j = calloc(1, sizeof(*j));
    if (j == NULL || (j->req = malloc(len > 0 ? len : 1)) == NULL) {
        free(j);
        finish_err(call, "operator", KMS_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(j->req, req, len);
    j->m = m;
    j->call = call;
    j->len = len;
    if ((rc = kmsd_pool_submit(d->op_pool, op_run_cb, j)) != 0) {
        finish_err(call, "operator", KMS_EUNAVAIL,
                   rc == KMS_EBUSY ? "too many operator calls waiting; retry later"
                                   : "shutting down");
        OPENSSL_cleanse(j->req, len);
        free(j->req);
        free(j);
        goto out;
    }
out:
    return;
}

int kmsd_cluster_register(struct kmsd *d, struct kms_rpc_server *srv)
{
    static const struct {
        const char *path;
        kms_rpc_handler_fn fn;
    } handlers[] = {
        {"/kmsd.v1.Cluster/Forward", forward_cb},
        {"/kmsd.v1.Cluster/PeerUnseal", kmsd_peer_serve_cb},
        {"/kmsd.v1.Operator/Status", status_cb},
        {"/kmsd.v1.Operator/Initialize", init_cb},
        {"/kmsd.v1.Operator/Unseal", unseal_cb},
        {"/kmsd.v1.Operator/Seal", seal_cb},
        {"/kmsd.v1.Operator/StepDown", stepdown_cb},
        {"/kmsd.v1.Operator/Rotate", rotate_cb},
        {"/kmsd.v1.Operator/Rewrap", kmsd_rewrap_cb},
        {"/kmsd.v1.Operator/RetireTerm", kmsd_retire_term_cb},
        {"/kmsd.v1.Operator/MembersList", members_list_cb},
        {"/kmsd.v1.Operator/MembersAdd", members_add_cb},
        {"/kmsd.v1.Operator/MembersRemove", members_remove_cb},
        {"/kmsd.v1.Operator/TransferLeader", transfer_cb},
        {"/kmsd.v1.Operator/KeysList", keys_list_cb},
        {"/kmsd.v1.Operator/KeysShow", keys_show_cb},
        {"/kmsd.v1.Operator/KeysRevoke", keys_revoke_cb},
        {"/kmsd.v1.Operator/SnapshotBegin", kmsd_snapshot_begin_cb},
        {"/kmsd.v1.Operator/SnapshotChunk", kmsd_snapshot_chunk_cb},
        {"/kmsd.v1.Operator/SnapshotEnd", kmsd_snapshot_end_cb},
        {"/kmsd.v1.Operator/RekeyInit", kmsd_rekey_init_cb},
        {"/kmsd.v1.Operator/RekeyStatus", kmsd_rekey_status_cb},
        {"/kmsd.v1.Operator/RekeyUpdate", kmsd_rekey_update_cb},
        {"/kmsd.v1.Operator/RekeyCancel", kmsd_rekey_cancel_cb},
        {"/kmsd.v1.KubernetesKms/Status", kmsd_k8s_status_cb},
        {"/kmsd.v1.KubernetesKms/Encrypt", kmsd_k8s_encrypt_cb},
        {"/kmsd.v1.KubernetesKms/Decrypt", kmsd_k8s_decrypt_cb},
        {"/kmsd.v1.Operator/SealMigrate", seal_migrate_cb},
    };
    size_t n = sizeof(handlers) / sizeof(handlers[0]), npol = 0;
    int rc;

    (void)kmsd_authz_methods(&npol);
    if (n > KMSD_OP_METHODS || n != npol) {
        return KMS_ERANGE; /* a handler without a policy row, or the reverse */
    }
    if (!atomic_load_explicit(&d->op_methods_ready, memory_order_acquire)) {
        for (size_t i = 0; i < n; i++) {
            const struct kmsd_method_policy *pol = kmsd_authz_method(handlers[i].path);
            if (pol == NULL) {
                return KMS_ERANGE;
            }
            d->op_methods[i].d = d;
            d->op_methods[i].fn = handlers[i].fn;
            d->op_methods[i].path = pol->path;
            d->op_methods[i].flags = pol->flags;
        }
        atomic_store_explicit(&d->op_methods_ready, true, memory_order_release);
    }
    for (size_t i = 0; i < n; i++) {
        rc = kms_rpc_server_add_method(srv, handlers[i].path, dispatch_cb, &d->op_methods[i]);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}
