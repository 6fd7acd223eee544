/*
 * The cluster API's handler table and its one trampoline (cluster_api.c).
 *
 * Like OpenSSH's monitor table: one row per method of the cluster API
 * (:4051) names the method, the protobuf-c descriptor of its request, the
 * name its failures are logged under and the handler. Who may call it, how
 * it runs and whether the call gets an audit line is the method's row of the
 * policy table (kmsd_authz_method(), authz.c), joined to this row by path
 * when the methods are registered; a method missing from either table is
 * not registered at all (kmsd_cluster_register fails).
 *
 * The trampoline authorises the caller (kmsd_authz_node / _operator / _k8s),
 * moves a parked call to the operator pool, answers "not the leader" for a
 * KMSD_RUN_LEADER row on a follower, unpacks the request, runs the handler,
 * answers its failure, wipes (KMSD_CALL_WIPE) and frees the request, and
 * writes the call's audit line and metrics once its outcome is known. A
 * handler is only its method's logic.
 */
#ifndef KMSD_CLUSTER_H
#define KMSD_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "kms_err.h"

struct kmsd;
struct kms_rpc_call;

/* One cluster API call as its handler sees it. Built by the trampoline on
 * the thread that runs the handler; valid until the handler returns. */
struct kmsd_call {
    struct kmsd *d;
    struct kms_rpc_call *call;
    const struct kmsd_cluster_method *m;
    /* The unpacked request (m->req), owned by the trampoline, which frees it
     * after the handler returns; a handler that keeps it sets req = NULL.
     * NULL for a row without a descriptor. */
    ProtobufCMessage *req;
    const uint8_t *raw; /* the request's bytes (rows without a descriptor) */
    size_t len;
    uint64_t node_id;   /* KMSD_AUTH_NODE rows: the id in the caller's certificate */
    struct kms_err err; /* the message of a failure the handler returns */
};

/* A handler: 0 once it has answered the call (kmsd_call_reply, or a
 * refusal of its own), or a negative KMS_E* code with c->err holding the
 * message: the trampoline answers that failure (kmsd_call_fail). */
typedef int (*kmsd_call_fn)(struct kmsd_call *c);

/* Row flags (call_flags). */
#define KMSD_CALL_WIPE (1u << 0)          /* the request carries secrets (shares): every
                                             string and bytes field is wiped before it
                                             is freed */
#define KMSD_CALL_BUSY_PRECOND (1u << 1)  /* KMS_EBUSY answers FAILED_PRECONDITION ("term
                                             still in use" is for the operator to fix,
                                             not for kmsctl to retry) */

struct kmsd_cluster_method {
    const char *path;                       /* "/kmsd.v1.Operator/Rotate" */
    const ProtobufCMessageDescriptor *req;  /* request type; NULL: the handler reads
                                               c->raw (or nothing) */
    const char *op;                         /* "rotate": the op of its failure log line */
    const char *malformed;                  /* answer (KMS_EINVAL) for a request that does
                                               not unpack; NULL = "malformed request" */
    unsigned call_flags;                    /* KMSD_CALL_* */
    kmsd_call_fn fn;
};

/* The whole handler table (registration and tests); *n rows. */
const struct kmsd_cluster_method *kmsd_cluster_methods(size_t *n);

/* Answers the call with m packed (the one place a response is packed; the
 * packed copy is wiped). Handler's thread. */
void kmsd_call_reply(struct kmsd_call *c, const ProtobufCMessage *m);
/* Answers the call with a failure of the row's op: an "operator request
 * failed" log line and the gRPC status of code. For a message longer than
 * c->err holds; otherwise return the code. Handler's thread. */
void kmsd_call_fail(struct kmsd_call *c, int code, const char *msg);
/* Extra fields for the call's audit line, written after its outcome ("key_id=..."; never
 * a secret). Handler's thread. */
void kmsd_call_note(struct kmsd_call *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Wipes every string and bytes field of m and of the messages it holds
 * (set members of a oneof only), in place, before m is freed
 * (KMSD_CALL_WIPE: shares travel in operator requests). Pure: any thread. */
void kmsd_msg_wipe(ProtobufCMessage *m);

/* ---- handlers (cluster_forward.c, cluster_ops_*.c) -------------------- */

/* kmsd.v1.Cluster/Forward: the leader validates and proposes what a
 * follower forwards (cluster_forward.c). */
int kmsd_forward_cb(struct kmsd_call *c);
/* Refuses a Forward (or a node call the trampoline did not authorise):
 * counted in forward_refused, logged, PERMISSION_DENIED. Any thread. */
void kmsd_forward_refuse(struct kmsd *d, struct kms_rpc_call *call, const char *why);

/* Status, members and leadership (cluster_ops_members.c). */
int kmsd_op_status_cb(struct kmsd_call *c);
int kmsd_op_members_list_cb(struct kmsd_call *c);
int kmsd_op_members_add_cb(struct kmsd_call *c);
int kmsd_op_members_remove_cb(struct kmsd_call *c);
int kmsd_op_step_down_cb(struct kmsd_call *c);
int kmsd_op_transfer_leader_cb(struct kmsd_call *c);
/* True when id is in this node's raft configuration (pool threads:
 * kms_raft_status may wait). */
bool kmsd_raft_has_member(struct kmsd *d, uint64_t id);

/* Initialisation, seal and keyring (cluster_ops_seal.c). */
int kmsd_op_init_cb(struct kmsd_call *c);
int kmsd_op_unseal_cb(struct kmsd_call *c);
int kmsd_op_seal_cb(struct kmsd_call *c);
int kmsd_op_rotate_cb(struct kmsd_call *c);
int kmsd_op_seal_migrate_cb(struct kmsd_call *c);

/* Sealed records (cluster_ops_keys.c). */
int kmsd_op_keys_list_cb(struct kmsd_call *c);
int kmsd_op_keys_show_cb(struct kmsd_call *c);
int kmsd_op_keys_revoke_cb(struct kmsd_call *c);

#endif
