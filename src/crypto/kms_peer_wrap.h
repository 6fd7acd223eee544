/*
 * Peer unseal wrap (docs/security.md "Peer unseal"): an unsealed member
 * hands the root key R to a sealed member, encrypted to an X25519 key pair
 * that the requester generated for this one request and keeps only in its
 * own memory.
 *
 *   shared = X25519(peer ephemeral private, requester public)
 *   KEK    = HKDF-SHA256(ikm = shared, salt = requester_pub ‖ peer_pub,
 *                        info = "kmsd/peer-unseal/v1" ‖ binding)
 *   wrap   = AES-256-GCM(KEK, random 96-bit nonce, R, AAD = "kmsd/peer-unseal/v1" ‖ binding)
 *   binding = cluster_id (16) ‖ u64be(requester id) ‖ u64be(peer id)
 *
 * The peer's key pair is ephemeral too (forgotten after the wrap), so a
 * recorded exchange is useless once the requester dropped its private key.
 * The binding makes a wrap for one (cluster, requester, peer) fail
 * authentication for any other.
 *
 * Threads: every function may be called from any thread; a kms_peer_eph is
 * used by one thread at a time. Errors: negative KMS_E* with err filled.
 */
#ifndef KMS_PEER_WRAP_H
#define KMS_PEER_WRAP_H

#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"

#define KMS_PEER_PUB_LEN 32
#define KMS_PEER_NONCE_LEN 12
#define KMS_PEER_WRAP_LEN (32 + 16) /* R ‖ GCM tag */
#define KMS_PEER_PROOF_LEN 32

/* Who a wrap is for; cluster_id is 16 bytes (KMS_CLUSTER_ID_LEN). */
struct kms_peer_binding {
    const uint8_t *cluster_id;
    uint64_t requester_id;
    uint64_t peer_id;
};

/* An X25519 key pair generated in this process; owned by the creator and
 * released with kms_peer_eph_free (which frees the private key). */
struct kms_peer_eph;

/* Generates a key pair; its public key goes to pub. */
int kms_peer_eph_new(struct kms_peer_eph **out, uint8_t pub[KMS_PEER_PUB_LEN],
                     struct kms_err *err);
void kms_peer_eph_free(struct kms_peer_eph *eph);

/* Serving side: wraps root (32 bytes) to requester_pub under a fresh key
 * pair of its own (public half to peer_pub), a random nonce and the
 * binding. KMS_EFORMAT for a public key X25519 refuses (low order). */
int kms_peer_wrap(const uint8_t requester_pub[KMS_PEER_PUB_LEN],
                  const struct kms_peer_binding *b, const uint8_t root[32],
                  uint8_t peer_pub[KMS_PEER_PUB_LEN], uint8_t nonce[KMS_PEER_NONCE_LEN],
                  uint8_t wrapped[KMS_PEER_WRAP_LEN], struct kms_err *err);

/* Requesting side: opens a wrap with its own key pair into root (32 bytes,
 * the caller's secure memory). KMS_EAUTH when the wrap was not made for
 * this key pair and binding (root is wiped), KMS_EFORMAT for bad lengths. */
int kms_peer_unwrap(const struct kms_peer_eph *eph, const uint8_t *peer_pub, size_t peer_pub_len,
                    const struct kms_peer_binding *b, const uint8_t *nonce, size_t nonce_len,
                    const uint8_t *wrapped, size_t wrapped_len, uint8_t root[32],
                    struct kms_err *err);

/* The proof a node unsealed with k shares puts in the entry that reopens
 * the gate: HKDF-SHA256(ikm = R, salt = cluster_id,
 * info = "kmsd/peer-unseal/reopen/v1" ‖ u64be(generation)). Only a holder
 * of R can make it; every peer checks it before it serves. */
int kms_peer_reopen_proof(const uint8_t root[32], const uint8_t cluster_id[16],
                          uint64_t generation, uint8_t out[KMS_PEER_PROOF_LEN],
                          struct kms_err *err);

#endif /* KMS_PEER_WRAP_H */
