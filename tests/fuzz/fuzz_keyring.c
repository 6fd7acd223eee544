/* libFuzzer: the replicated keyring (kms_keyring_decrypt) and the plaintext
 * keyring import (kms_keyring_import). The encrypted keyring comes from the
 * raft log / RocksDB; its plaintext is trusted only after the tag checks,
 * but a buggy or newer writer may still produce odd plaintext.
 *
 * Input: u8 mode, then bytes.
 *   mode % 3 == 0: bytes = packed EncryptedKeyring, decrypted under a fixed
 *                  root key (almost always KMS_EAUTH: the framing checks);
 *   mode % 3 == 1: bytes = packed plaintext Keyring, sealed by the harness
 *                  under the fixed root (valid tag), then decrypted: the
 *                  parser and the import checks behind the tag;
 *   mode % 3 == 2: bytes = packed plaintext Keyring, imported directly.
 * Invariants: no crash; success only with a keyring whose active term is
 * one of its terms; failures return negative codes.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

static const uint8_t ROOT[32] = "fuzz root key, thirty-two bytes";
static const uint8_t CID[16] = "fuzz-cluster-id";

static void check_keyring(struct kms_keyring *kr)
{
    if (kms_keyring_term_count(kr) == 0 || kms_keyring_active_term(kr) == 0) {
        abort();
    }
    kms_keyring_unref(kr);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int init;
    struct kms_keyring *kr = NULL;
    struct kms_err err;
    int rc;

    if (!init) {
        if (kms_crypto_init(NULL) != 0) {
            abort();
        }
        init = 1;
    }
    if (size < 1 || size > 4096) {
        return 0;
    }
    kms_err_clear(&err);
    switch (data[0] % 3) {
    case 0: {
        Kmsd__V1__EncryptedKeyring *ek =
            kmsd__v1__encrypted_keyring__unpack(NULL, size - 1, data + 1);
        if (ek == NULL) {
            return 0;
        }
        rc = kms_keyring_decrypt(ek, ROOT, &kr, &err);
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
        break;
    }
    case 1: {
        static uint8_t ct[4096 + 16];
        static const uint8_t nonce[12] = "fuzz-nonce12";
        uint8_t aad[12 + 4 + 16];
        Kmsd__V1__EncryptedKeyring ek = KMSD__V1__ENCRYPTED_KEYRING__INIT;
        Kmsd__V1__Keyring *plain = kmsd__v1__keyring__unpack(NULL, size - 1, data + 1);
        memcpy(aad, "kmsd/keyring", 12);
        aad[12] = aad[13] = aad[14] = 0;
        aad[15] = KMS_KEYRING_VERSION;
        memcpy(aad + 16, CID, 16);
        if (kms_aead_seal(ROOT, nonce, aad, sizeof(aad), data + 1, size - 1, ct, NULL) != 0) {
            abort();
        }
        ek.version = KMS_KEYRING_VERSION;
        ek.cluster_id.data = (uint8_t *)CID;
        ek.cluster_id.len = 16;
        ek.nonce.data = (uint8_t *)nonce;
        ek.nonce.len = 12;
        ek.ciphertext.data = ct;
        ek.ciphertext.len = size - 1 + 16;
        ek.active_term = plain != NULL ? plain->active_term : 1;
        if (plain != NULL) {
            kmsd__v1__keyring__free_unpacked(plain, NULL);
        }
        rc = kms_keyring_decrypt(&ek, ROOT, &kr, &err);
        break;
    }
    default: {
        Kmsd__V1__Keyring *plain = kmsd__v1__keyring__unpack(NULL, size - 1, data + 1);
        if (plain == NULL) {
            return 0;
        }
        rc = kms_keyring_import(CID, plain, &kr, &err);
        kmsd__v1__keyring__free_unpacked(plain, NULL);
        break;
    }
    }
    if (rc == 0) {
        if (kr == NULL) {
            abort();
        }
        check_keyring(kr);
    } else if (rc > 0 || kr != NULL) {
        abort();
    }
    return 0;
}
