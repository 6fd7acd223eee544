/*
 * Wrapping of Kubernetes KMS v2 DEK seeds under the keyring (docs/kubernetes.md).
 *
 *   K   = HKDF-SHA256(ikm = keyring[term], salt = cluster_id,
 *                     info = "kmsd/k8s-kms-v2/v1" || u32be(term))
 *   hdr = 0x01 || u32be(term)
 *   ct  = hdr || nonce(12, random) || AES-256-GCM(K, nonce, plaintext,
 *                     AAD = "kmsd/k8s-kms-v2/v1" || cluster_id || hdr) || tag(16)
 *
 * The label differs from every other use of a term key (Talos seal:
 * "kmsd/seal/v1" with a per-record salt), so a wrapped seed and a sealed
 * record never share a key. The AAD binds the ciphertext to its cluster and
 * term: a ciphertext moved to another cluster, or with its term byte edited,
 * fails authentication. key_id = "kmsd-<cluster id hex>-t<term>": the same
 * string in Status and Encrypt, and a new one after every rotation.
 *
 * Pure functions of their arguments; thread-safe; the caller holds a
 * reference to the keyring for the duration of the call. Nothing here logs.
 */
#ifndef KMS_K8S_WRAP_H
#define KMS_K8S_WRAP_H

#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"

struct kms_keyring;

#define KMS_K8S_WRAP_VERSION 1
#define KMS_K8S_MAX_PLAINTEXT 512  /* kube-apiserver sends a 32-byte seed */
#define KMS_K8S_WRAP_OVERHEAD (1 + 4 + 12 + 16)
#define KMS_K8S_MAX_CIPHERTEXT (KMS_K8S_MAX_PLAINTEXT + KMS_K8S_WRAP_OVERHEAD) /* < 1 kB */
#define KMS_K8S_KEY_ID_MAX 64      /* "kmsd-" + 32 hex + "-t" + 10 digits + NUL */

/* Writes the key id of (cluster_id, term) into out (>= KMS_K8S_KEY_ID_MAX). */
void kms_k8s_key_id(const uint8_t cluster_id[16], uint32_t term, char out[KMS_K8S_KEY_ID_MAX]);

/* The key id of kr's active term. */
void kms_k8s_active_key_id(const struct kms_keyring *kr, char out[KMS_K8S_KEY_ID_MAX]);

/* Wraps ptlen (1..KMS_K8S_MAX_PLAINTEXT) bytes under kr's active term. ct
 * receives ptlen + KMS_K8S_WRAP_OVERHEAD bytes (*ctlen), *term the term used.
 * KMS_EINVAL for a bad length. */
int kms_k8s_wrap(const struct kms_keyring *kr, const uint8_t *pt, size_t ptlen, uint8_t *ct,
                 size_t *ctlen, uint32_t *term, struct kms_err *err);

/* Unwraps a ciphertext of kms_k8s_wrap into pt (>= ctlen - overhead bytes),
 * *ptlen its length, *term the term it names. KMS_EFORMAT (length, version),
 * KMS_EVERSION (another version byte), KMS_ENOTFOUND (term not in kr: a
 * newer term this replica has not seen, or another cluster's), KMS_EAUTH
 * (tag mismatch: tampered, or another cluster's). pt is wiped on failure. */
int kms_k8s_unwrap(const struct kms_keyring *kr, const uint8_t *ct, size_t ctlen, uint8_t *pt,
                   size_t *ptlen, uint32_t *term, struct kms_err *err);

#endif /* KMS_K8S_WRAP_H */
