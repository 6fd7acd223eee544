/*
 * Who may call what on the cluster API, and what a node may propose.
 *
 * Which CA a cluster-API client certificate chains to:
 *
 * The gRPC server has already verified the client certificate against the
 * union of the cluster CA and the operator CA; these checks re-verify the
 * leaf (grpc's "x509_pem_cert" auth property) against one CA at a time.
 */
#ifndef KMSD_AUTHZ_H
#define KMSD_AUTHZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"

struct kmsd;
struct kms_rpc_call;
struct kmsd_authz;

/* Loads both CA files. Replaces d->authz atomically on reload. */
int kmsd_authz_load(struct kmsd *d, struct kms_err *err);
void kmsd_authz_free(struct kmsd *d);

/* A node certificate: chains to the cluster CA and its subject holds
 * exactly one CN, exactly "kmsd-node-<id>" (kmsd_authz_node_cn_parse). The
 * id goes to *id. Whether the id is a current member is the caller's check
 * (it needs the raft status: pool threads only). Any thread. */
bool kmsd_authz_node(struct kmsd *d, struct kms_rpc_call *call, uint64_t *id);
/* A certificate from the operator CA that is not a node certificate (a CN
 * "kmsd-node-*" is refused even when one CA signs both). Any thread. */
bool kmsd_authz_operator(struct kmsd *d, struct kms_rpc_call *call);

/* A Kubernetes KMS v2 plugin certificate (kmsd-k8s-plugin): chains to the
 * operator CA and its subject holds exactly one CN, "kmsd-k8s-<name>"
 * (kmsd_authz_k8s_cn_valid). Such a certificate is neither a node nor an
 * operator: it may call kmsd.v1.KubernetesKms only. Any thread. */
bool kmsd_authz_k8s(struct kmsd *d, struct kms_rpc_call *call);

/* ---- pure checks (no daemon state; unit-tested) ------------------------ */

/* "kmsd-k8s-<name>": name 1..64 bytes of [a-z0-9.-]. */
#define KMSD_K8S_CN_PREFIX "kmsd-k8s-"
bool kmsd_authz_k8s_cn_valid(const char *cn);

/* "kmsd-node-<id>": id decimal, 1..UINT64_MAX, no sign, no leading zero,
 * nothing after it. 0, or KMS_EDENIED for anything else. */
int kmsd_authz_node_cn_parse(const char *cn, uint64_t *id);
/* The node id of a PEM certificate's subject: exactly one CN, and that CN
 * parses as above. No chain check. 0 or KMS_EDENIED / KMS_EFORMAT. */
int kmsd_authz_pem_node_id(const char *pem, uint64_t *id);

/* ---- the cluster API's method policy ----------------------------------
 *
 * One row per method of the cluster API (:4051): which identity may call it
 * and how it runs. cluster_api.c registers a method only with its row here
 * (and its handler), and checks the caller in one dispatcher before the
 * handler runs, so a handler never decides who may call it. Like OpenSSH's
 * monitor table: whatever is not listed is refused. */
#define KMSD_AUTH_NODE     (1u << 0) /* node certificate of a current member */
#define KMSD_AUTH_OPERATOR (1u << 1) /* operator certificate */
#define KMSD_AUTH_K8S      (1u << 2) /* Kubernetes KMS plugin certificate (kmsd_authz_k8s) */
#define KMSD_RUN_LEADER    (1u << 4) /* changes replicated state: runs on the leader; a
                                        follower answers "not the leader; leader is N at
                                        ADDR" and changes nothing (kmsctl follows it) */
#define KMSD_RUN_PARK      (1u << 5) /* handler runs on the operator pool */
#define KMSD_NO_AUDIT      (1u << 6) /* operator method without its own audit line (every
                                        other operator call gets one after its outcome,
                                        op = the method's name: cluster_api.c) */

struct kmsd_method_policy {
    const char *path;   /* "/kmsd.v1.Operator/Rotate" */
    unsigned flags;     /* exactly one KMSD_AUTH_* plus KMSD_RUN_* */
};

/* The row for a method, or NULL (refused). */
const struct kmsd_method_policy *kmsd_authz_method(const char *path);
/* The whole table (for registration and tests); *n rows. */
const struct kmsd_method_policy *kmsd_authz_methods(size_t *n);

/* ---- what a node certificate may propose (Forward) -------------------- */

struct Kmsd__V1__Entry;
struct Kmsd__V1__SealedRecord;
struct Kmsd__V1__EncryptedKeyring;

/* True only for entry kinds a follower forwards on its own: PutRecord (a
 * Talos Seal), TouchBatch (its batched last-access times, touch.c) and
 * SetPeerUnsealGate (an operator seal or a k-share unseal with
 * unseal.peer). Every other entry is proposed by the leader itself, for an
 * operator call it authorised. op_case: Kmsd__V1__Entry__OpCase. */
bool kmsd_authz_entry_forwardable(int op_case);

struct Kmsd__V1__TouchBatch;
/* A forwarded TouchBatch: 1..max touches, each a 16-byte key id and a time
 * now_ms - 25 h <= at <= now_ms + 60 s (nothing from the future, nothing
 * older than the longest lastAccess.interval allows). It can only move
 * last_access_at forward on existing records; nothing else. 0 or
 * KMS_EFORMAT naming the problem. Pure: any thread. */
int kmsd_authz_touch_check(const struct Kmsd__V1__TouchBatch *tb, size_t max, int64_t now_ms,
                           struct kms_err *err);

/* A PutRecord the leader is about to propose: kms_record_validate (version,
 * key id 16, nonce 12, ciphertext 32..80 bytes, source ip), plus a node uuid
 * of 1..128 printable ASCII bytes, term 1..max_term (max_term = the active
 * term of the replicated keyring; 0 = not initialised), never revoked or
 * accessed yet, not a rewrapped record. 0 or KMS_EFORMAT naming the field. */
int kmsd_authz_record_check(const struct Kmsd__V1__SealedRecord *rec, uint32_t max_term,
                            struct kms_err *err);

/* A keyring about to be proposed: it must decrypt under root (the key the
 * proposer holds), carry a non-zero active term that matches its plaintext,
 * and, when cur (the replicated keyring, NULL before init) is given, keep
 * its cluster id, share count and threshold and not go below its active
 * term. init: cur must be NULL. 0 or KMS_EAUTH / KMS_EFORMAT / KMS_EEXIST. */
int kmsd_authz_keyring_check(const struct Kmsd__V1__EncryptedKeyring *ek,
                             const uint8_t root[32],
                             const struct Kmsd__V1__EncryptedKeyring *cur, bool init,
                             struct kms_err *err);

#endif
