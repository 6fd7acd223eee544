/*
 * kmsd.v1.KubernetesKms: the cluster API service behind kmsd-k8s-plugin
 * (kms_v2_api.c, docs/kubernetes.md). The messages are those of the
 * Kubernetes KMS v2 API (proto/k8s/kms/v2/api.proto).
 *
 * Registered by kmsd_cluster_register() through the policy table: only a
 * plugin certificate (kmsd_authz_k8s) reaches these handlers. They run on
 * the cluster API worker that received the call: they never wait (lock-free
 * health, the keyring snapshot, in-memory AES-GCM). arg is the struct kmsd.
 */
#ifndef KMSD_K8S_H
#define KMSD_K8S_H

#include <stddef.h>
#include <stdint.h>

struct kms_rpc_call;

/* Handlers of kmsd.v1.KubernetesKms (kmsd_cluster.h); they read their
 * requests themselves (c->raw). Cluster API workers. */
/* healthz "ok" only when this replica is unsealed, holds the keyring and a
 * quorum read lease (it hears a majority, or the leader that does); else
 * the reason. key_id: the active term's (kms_k8s_key_id). */
struct kmsd_call;
int kmsd_k8s_status_cb(struct kmsd_call *c);
/* Wraps the plaintext (1..512 bytes) under the active term. */
int kmsd_k8s_encrypt_cb(struct kmsd_call *c);
/* Unwraps under the term the ciphertext names; a key_id that is not that
 * term's is INVALID_ARGUMENT; a term this replica does not hold yet is
 * NOT_FOUND (the plugin tries another replica). */
int kmsd_k8s_decrypt_cb(struct kmsd_call *c);

#endif /* KMSD_K8S_H */
