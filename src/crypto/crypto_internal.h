/*
 * Private to src/crypto: shared between keyring.c and seal.c. Not installed,
 * not included by other modules.
 */
#ifndef KMS_CRYPTO_INTERNAL_H
#define KMS_CRYPTO_INTERNAL_H

#include <stdatomic.h>

#include "kms_crypto.h"

struct kms_keyring_term {
    uint32_t term;
    int64_t created_at;
    uint8_t key[KMS_TERM_KEY_LEN];
};

/* Allocated in one piece in secure memory; `alloc_size` is what
 * kms_secmem_free needs. Terms are sorted by strictly increasing term. */
struct kms_keyring {
    atomic_size_t refs;
    size_t alloc_size;
    uint8_t cluster_id[KMS_CLUSTER_ID_LEN];
    uint32_t active_term;
    size_t nterms;
    struct kms_keyring_term terms[];
};

/* Term key of `term`, or NULL when the keyring does not hold it. The pointer
 * stays valid while the caller holds a reference to kr. */
const uint8_t *kms_keyring_term_key(const struct kms_keyring *kr, uint32_t term);

/* A zeroed keyring of nterms terms in secure memory, one reference; NULL
 * when out of secure memory (keyring.c, used by rewrap.c). */
struct kms_keyring *kms_keyring_alloc(size_t nterms);

/* Opens a rewrapped record (origin_term != 0) with keyring[rec->term]:
 * the origin term key, the original nonce and ciphertext (ct: room for
 * KMS_SEAL_MAX_DATA + 16). Secret outputs; the caller wipes them.
 * KMS_ENOTFOUND (term not held), KMS_EFORMAT, KMS_EAUTH, KMS_ECORRUPT. */
int kms_rewrap_open(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
                    uint8_t origin_key[32], uint8_t nonce[12], uint8_t *ct, size_t *ctlen,
                    struct kms_err *err);

#endif /* KMS_CRYPTO_INTERNAL_H */
