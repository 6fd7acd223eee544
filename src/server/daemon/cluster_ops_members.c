/*
 * The cluster's members and its leadership, as the operator sees and
 * changes them (kmsd_cluster.h): Status, MembersList, MembersAdd,
 * MembersRemove, StepDown, TransferLeader; and the member metadata the
 * leader replicates (kmsd_publish_self). Operator pool threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kmsd.h"
#include "kmsd_cluster.h"
#include "kmsd_peer.h"
#include "kmsd_seal.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

/* kmsd_cluster.h */
bool kmsd_raft_has_member(struct kmsd *d, uint64_t id)
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

/* ---- status and members ------------------------------------------------ */

int kmsd_op_status_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
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
    kmsd_call_reply(c, &resp.base);
    members_free(&mc, ptrs);
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return 0;
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


int kmsd_op_members_list_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    Kmsd__V1__MembersListResponse resp = KMSD__V1__MEMBERS_LIST_RESPONSE__INIT;
    struct kms_raft_status st;
    struct members_ctx mc = {NULL, 0};
    Kmsd__V1__MemberStatus **ptrs;

    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    ptrs = members_build(d, &st, &mc);
    resp.n_members = ptrs != NULL ? mc.n : 0;
    resp.members = ptrs;
    kmsd_call_reply(c, &resp.base);
    members_free(&mc, ptrs);
    return 0;
}

int kmsd_op_members_add_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__MembersAddRequest *r = (const Kmsd__V1__MembersAddRequest *)c->req;
    Kmsd__V1__MembersAddResponse resp = KMSD__V1__MEMBERS_ADD_RESPONSE__INIT;
    bool was_member;
    int rc;

    if (r->id == 0 || r->raft_address == NULL || r->raft_address[0] == '\0') {
        return kms_err_set(&c->err, KMS_EINVAL, "id and raft address are required");
    }
    kmsd_call_note(c, "id=%llu raft=%.100s", (unsigned long long)r->id, r->raft_address);
    was_member = kmsd_raft_has_member(d, r->id);
    /* Metadata first so the new node's cluster address is known to whoever
     * forwards to it once it leads. */
    rc = put_member(d, r->id, r->raft_address, r->cluster_address, r->talos_address, "",
                    &c->err);
    if (rc == 0) {
        rc = kms_raft_add(d->raft, r->id, r->raft_address, 60000, &c->err);
        if (rc != 0 && !was_member) {
            /* No partial add: withdraw what this call committed (the spare
             * raft may hold, then the metadata), so a failed add leaves the
             * cluster as it was. */
            char msg[sizeof(c->err.msg) * 2 + 200];
            struct kms_err uerr;
            int urc = 0;
            kms_err_clear(&uerr);
            if (kmsd_raft_has_member(d, r->id)) {
                urc = kms_raft_remove(d->raft, r->id, d->opt.request_wait_ms, &uerr);
            }
            if (urc == 0) {
                urc = remove_member_meta(d, r->id, &uerr);
            }
            if (urc == 0) {
                snprintf(msg, sizeof(msg), "%s (nothing kept: its member metadata was withdrawn)",
                         c->err.msg);
            } else {
                snprintf(msg, sizeof(msg),
                         "%s; withdrawing its member metadata failed too (%s): run kmsctl "
                         "operator members remove --id %llu",
                         c->err.msg, uerr.msg, (unsigned long long)r->id);
            }
            kmsd_call_fail(c, rc, msg); /* longer than c->err holds */
            return 0;
        }
    }
    if (rc != 0) {
        return rc;
    }
    kmsd_call_reply(c, &resp.base);
    return 0;
}

int kmsd_op_members_remove_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__MembersRemoveRequest *r = (const Kmsd__V1__MembersRemoveRequest *)c->req;
    Kmsd__V1__MembersRemoveResponse resp = KMSD__V1__MEMBERS_REMOVE_RESPONSE__INIT;
    int rc;

    if (r->id == 0) {
        return kms_err_set(&c->err, KMS_EINVAL, "member id is required");
    }
    kmsd_call_note(c, "id=%llu", (unsigned long long)r->id);
    rc = kms_raft_remove(d->raft, r->id, d->opt.request_wait_ms * 2, &c->err);
    if (rc == 0) {
        rc = remove_member_meta(d, r->id, &c->err);
    }
    if (rc != 0) {
        return rc;
    }
    kmsd_call_reply(c, &resp.base);
    return 0;
}

/* ---- leadership ---------------------------------------------------------- */

/* Hands leadership to id (0: raft picks); the new leader in *leader. */
static int leader_transfer(struct kmsd_call *c, uint64_t id, uint64_t *leader)
{
    struct kms_raft_status st;
    int rc;

    if ((rc = kms_raft_transfer(c->d->raft, id, c->d->opt.request_wait_ms, &c->err)) != 0) {
        return rc;
    }
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(c->d->raft, &st);
    *leader = st.leader_id;
    return 0;
}

int kmsd_op_step_down_cb(struct kmsd_call *c)
{
    Kmsd__V1__StepDownResponse resp = KMSD__V1__STEP_DOWN_RESPONSE__INIT;
    struct kms_raft_status st;
    int rc;

    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(c->d->raft, &st);
    if (st.role != KMS_RAFT_LEADER) {
        return kms_err_set(&c->err, KMS_ENOTLEADER,
                           "this node is not the leader (run step-down against the leader)");
    }
    if ((rc = leader_transfer(c, 0, &resp.new_leader_id)) != 0) {
        return rc;
    }
    kmsd_call_reply(c, &resp.base);
    return 0;
}

int kmsd_op_transfer_leader_cb(struct kmsd_call *c)
{
    const Kmsd__V1__TransferLeaderRequest *r = (const Kmsd__V1__TransferLeaderRequest *)c->req;
    Kmsd__V1__TransferLeaderResponse resp = KMSD__V1__TRANSFER_LEADER_RESPONSE__INIT;
    int rc;

    kmsd_call_note(c, "id=%llu", (unsigned long long)r->id);
    if ((rc = leader_transfer(c, r->id, &resp.new_leader_id)) != 0) {
        return rc;
    }
    kmsd_call_reply(c, &resp.base);
    return 0;
}
