/*
 * The cluster API (:4051, mutual TLS): kmsd.v1.Cluster (node to node),
 * kmsd.v1.Operator (kmsctl) and kmsd.v1.KubernetesKms (kmsd-k8s-plugin):
 * the handler table and its one trampoline (kmsd_cluster.h).
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
 * The handlers: cluster_forward.c (Forward), cluster_ops_members.c (status,
 * members, leadership), cluster_ops_seal.c (init, unseal, seal, rotate,
 * seal migration), cluster_ops_keys.c (sealed records), rewrap.c, rekey.c,
 * snapshot_api.c, peer_unseal.c, kms_v2_api.c.
 *
 * Error details carry the whole kms_err chain so kmsctl can show it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_cluster.h"
#include "kmsd_k8s.h"
#include "kmsd_peer.h"
#include "kmsd_pool.h"
#include "kmsd_rekey.h"
#include "kmsd_rewrap.h"
#include "kmsd_snapshot.h"

#include "kmsd/v1/cluster.pb-c.h"

/* ---- the handler table ------------------------------------------------ */

/* In registration order (the index of a method's metrics). Who may call
 * each and how it runs: its row of kmsd_authz_method(). */
static const struct kmsd_cluster_method methods[] = {
    {"/kmsd.v1.Cluster/Forward", &kmsd__v1__forward_request__descriptor, "forward",
     "malformed forward request", 0, kmsd_forward_cb},
    /* unseal.peer off answers before the request is read: kmsd_peer_serve_cb unpacks */
    {"/kmsd.v1.Cluster/PeerUnseal", NULL, "peer-unseal", NULL, 0, kmsd_peer_serve_cb},
    {"/kmsd.v1.Operator/Status", NULL, "status", NULL, 0, kmsd_op_status_cb},
    {"/kmsd.v1.Operator/Initialize", &kmsd__v1__init_request__descriptor, "init", NULL, 0,
     kmsd_op_init_cb},
    {"/kmsd.v1.Operator/Unseal", &kmsd__v1__unseal_request__descriptor, "unseal", NULL,
     KMSD_CALL_WIPE, kmsd_op_unseal_cb},
    {"/kmsd.v1.Operator/Seal", NULL, "seal", NULL, 0, kmsd_op_seal_cb},
    {"/kmsd.v1.Operator/StepDown", NULL, "step-down", NULL, 0, kmsd_op_step_down_cb},
    {"/kmsd.v1.Operator/Rotate", NULL, "rotate", NULL, 0, kmsd_op_rotate_cb},
    {"/kmsd.v1.Operator/Rewrap", &kmsd__v1__rewrap_request__descriptor, "rewrap",
     "malformed request (cursor must be 16 bytes)", KMSD_CALL_BUSY_PRECOND, kmsd_rewrap_cb},
    {"/kmsd.v1.Operator/RetireTerm", &kmsd__v1__retire_term_request__descriptor,
     "retire-term", "malformed request (term must be >= 1)", KMSD_CALL_BUSY_PRECOND,
     kmsd_retire_term_cb},
    {"/kmsd.v1.Operator/MembersList", NULL, "members-list", NULL, 0, kmsd_op_members_list_cb},
    {"/kmsd.v1.Operator/MembersAdd", &kmsd__v1__members_add_request__descriptor, "members-add",
     "id and raft address are required", 0, kmsd_op_members_add_cb},
    {"/kmsd.v1.Operator/MembersRemove", &kmsd__v1__members_remove_request__descriptor,
     "members-remove", "member id is required", 0, kmsd_op_members_remove_cb},
    {"/kmsd.v1.Operator/TransferLeader", &kmsd__v1__transfer_leader_request__descriptor,
     "transfer-leader", NULL, 0, kmsd_op_transfer_leader_cb},
    {"/kmsd.v1.Operator/KeysList", &kmsd__v1__keys_list_request__descriptor, "keys-list", NULL,
     0, kmsd_op_keys_list_cb},
    {"/kmsd.v1.Operator/KeysShow", &kmsd__v1__keys_show_request__descriptor, "keys-show",
     "key id must be 32 hex digits", 0, kmsd_op_keys_show_cb},
    {"/kmsd.v1.Operator/KeysRevoke", &kmsd__v1__keys_revoke_request__descriptor, "keys-revoke",
     NULL, 0, kmsd_op_keys_revoke_cb},
    {"/kmsd.v1.Operator/SnapshotBegin", NULL, "snapshot-save", NULL, 0, kmsd_snapshot_begin_cb},
    {"/kmsd.v1.Operator/SnapshotChunk", &kmsd__v1__snapshot_chunk_request__descriptor,
     "snapshot-chunk", "bad request", 0, kmsd_snapshot_chunk_cb},
    {"/kmsd.v1.Operator/SnapshotEnd", &kmsd__v1__snapshot_end_request__descriptor,
     "snapshot-end", "bad request", 0, kmsd_snapshot_end_cb},
    {"/kmsd.v1.Operator/RekeyInit", &kmsd__v1__rekey_init_request__descriptor, "rekey-init",
     NULL, 0, kmsd_rekey_init_cb},
    {"/kmsd.v1.Operator/RekeyStatus", NULL, "rekey-status", NULL, 0, kmsd_rekey_status_cb},
    {"/kmsd.v1.Operator/RekeyUpdate", &kmsd__v1__rekey_update_request__descriptor,
     "rekey-update", NULL, KMSD_CALL_WIPE, kmsd_rekey_update_cb},
    {"/kmsd.v1.Operator/RekeyCancel", &kmsd__v1__rekey_cancel_request__descriptor,
     "rekey-cancel", NULL, 0, kmsd_rekey_cancel_cb},
    /* kms_v2_api.c reads its requests (its failures are logged as "k8s") */
    {"/kmsd.v1.KubernetesKms/Status", NULL, "k8s-status", NULL, 0, kmsd_k8s_status_cb},
    {"/kmsd.v1.KubernetesKms/Encrypt", NULL, "encrypt", NULL, 0, kmsd_k8s_encrypt_cb},
    {"/kmsd.v1.KubernetesKms/Decrypt", NULL, "decrypt", NULL, 0, kmsd_k8s_decrypt_cb},
    {"/kmsd.v1.Operator/SealMigrate", &kmsd__v1__seal_migrate_request__descriptor,
     "seal-migrate", NULL, KMSD_CALL_WIPE, kmsd_op_seal_migrate_cb},
};

const struct kmsd_cluster_method *kmsd_cluster_methods(size_t *n)
{
    *n = sizeof(methods) / sizeof(methods[0]);
    return methods;
}

/* ---- answers ------------------------------------------------------------ */

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

/* kmsd_cluster.h */
void kmsd_call_reply(struct kmsd_call *c, const ProtobufCMessage *m)
{
    kmsd_call_finish_msg(c->call, m);
}

static void fail_status(struct kms_rpc_call *call, const char *op, int code, int status,
                        const char *msg)
{
    kms_log(KMS_LOG_INFO, "operator", "request failed", "op", op, "error", kms_errname(code),
            "detail", msg, "peer", kms_rpc_call_peer(call), NULL);
    kms_rpc_call_finish(call, status, msg, NULL, 0);
}

static void finish_err(struct kms_rpc_call *call, const char *op, int code, const char *msg)
{
    fail_status(call, op, code, kmsd_grpc_status(code), msg);
}

/* kmsd_cluster.h */
void kmsd_call_fail(struct kmsd_call *c, int code, const char *msg)
{
    fail_status(c->call, c->m->op, code,
                code == KMS_EBUSY && (c->m->call_flags & KMSD_CALL_BUSY_PRECOND)
                    ? GRPC_STATUS_FAILED_PRECONDITION
                    : kmsd_grpc_status(code),
                msg);
}

/* kmsd_cluster.h */
void kmsd_call_note(struct kmsd_call *c, const char *fmt, ...)
{
    char note[KMS_RPC_NOTE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(note, sizeof(note), fmt, ap);
    va_end(ap);
    kms_rpc_call_note_set(c->call, note);
}

/* ---- the trampoline ----------------------------------------------------- */

/* kmsd_cluster.h */
void kmsd_msg_wipe(ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *desc = m->descriptor;

    for (unsigned i = 0; i < desc->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &desc->fields[i];
        char *field = (char *)m + f->offset;
        size_t n = 1;

        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*(const uint32_t *)((const char *)m + f->quantifier_offset) != f->id) {
                continue; /* another member of the oneof */
            }
        }
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            n = *(const size_t *)((const char *)m + f->quantifier_offset);
            field = *(char **)field;
            if (field == NULL) {
                continue;
            }
        }
        for (size_t k = 0; k < n; k++) {
            if (f->type == PROTOBUF_C_TYPE_STRING) {
                char *s = ((char **)field)[k];
                if (s != NULL && s[0] != '\0') {
                    OPENSSL_cleanse(s, strlen(s));
                }
            } else if (f->type == PROTOBUF_C_TYPE_BYTES) {
                ProtobufCBinaryData *b = &((ProtobufCBinaryData *)field)[k];
                if (b->data != NULL && b->len > 0) {
                    OPENSSL_cleanse(b->data, b->len);
                }
            } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                ProtobufCMessage *sub = ((ProtobufCMessage **)field)[k];
                if (sub != NULL) {
                    kmsd_msg_wipe(sub);
                }
            }
        }
    }
}

/* Unpacks the request, runs the handler, answers its failure, frees the
 * request. The caller is authorised already. The handler's thread. */
static void call_run(struct kmsd_op_method *m, struct kms_rpc_call *call, const uint8_t *req,
                     size_t len, uint64_t node_id)
{
    const struct kmsd_cluster_method *row = m->row;
    struct kmsd_call c;
    int rc;

    memset(&c, 0, sizeof(c));
    c.d = m->d;
    c.call = call;
    c.m = row;
    c.raw = req;
    c.len = len;
    c.node_id = node_id;
    kms_err_clear(&c.err);
    if (row->req != NULL && (c.req = protobuf_c_message_unpack(row->req, NULL, len, req)) == NULL) {
        kmsd_call_fail(&c, KMS_EINVAL, row->malformed != NULL ? row->malformed
                                                              : "malformed request");
        return;
    }
    if ((rc = row->fn(&c)) != 0) {
        kmsd_call_fail(&c, rc, c.err.msg);
    }
    if (c.req != NULL) {
        if (row->call_flags & KMSD_CALL_WIPE) {
            kmsd_msg_wipe(c.req);
        }
        protobuf_c_message_free_unpacked(c.req, NULL);
    }
}

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
    uint64_t node_id;
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
        call_run(j->m, j->call, j->req, j->len, j->node_id);
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
            if (m->row->fn == kmsd_peer_serve_cb) {
                kmsd_peer_refuse(d, call, GRPC_STATUS_PERMISSION_DENIED, why);
            } else {
                kmsd_forward_refuse(d, call, why);
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
        call_run(m, call, req, len, node_id);
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
    j->node_id = node_id;
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
    size_t n = sizeof(methods) / sizeof(methods[0]), npol = 0;
    int rc;

    (void)kmsd_authz_methods(&npol);
    if (n > KMSD_OP_METHODS || n != npol) {
        return KMS_ERANGE; /* a handler without a policy row, or the reverse */
    }
    if (!atomic_load_explicit(&d->op_methods_ready, memory_order_acquire)) {
        for (size_t i = 0; i < n; i++) {
            const struct kmsd_method_policy *pol = kmsd_authz_method(methods[i].path);
            if (pol == NULL) {
                return KMS_ERANGE;
            }
            d->op_methods[i].d = d;
            d->op_methods[i].row = &methods[i];
            d->op_methods[i].path = pol->path;
            d->op_methods[i].flags = pol->flags;
        }
        atomic_store_explicit(&d->op_methods_ready, true, memory_order_release);
    }
    for (size_t i = 0; i < n; i++) {
        rc = kms_rpc_server_add_method(srv, methods[i].path, dispatch_cb, &d->op_methods[i]);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}
