/* libFuzzer: kms_record_unpack on arbitrary bytes (records come from the
 * raft log and RocksDB), then kms_unseal against a fixed keyring.
 *
 * Input: flags (1 byte) || blob length L (1 byte, taken mod 65) || blob (L
 * bytes) || packed SealedRecord. flags bit 0: unseal with the record's own
 * node_uuid instead of FUZZ_UUID.
 *
 * The keyring is fixed (term 1 and term 2 keys below) so seed records sealed
 * under it by the seed generator decrypt; every seed seals FUZZ_DATA. Unseal
 * must never crash and must never return 0 with bytes other than FUZZ_DATA.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

#define FUZZ_UUID "fuzz-node-0001"
static const uint8_t FUZZ_DATA[32] = "kmsd fuzz sealed passphrase 32b";
static const uint8_t FUZZ_CID[16] = "fuzz-cluster-id";

static struct kms_keyring *fixed_keyring(void)
{
    static uint8_t k1[32], k2[32];
    Kmsd__V1__KeyringTerm t1 = KMSD__V1__KEYRING_TERM__INIT, t2 = KMSD__V1__KEYRING_TERM__INIT;
    Kmsd__V1__KeyringTerm *terms[2] = {&t1, &t2};
    Kmsd__V1__Keyring msg = KMSD__V1__KEYRING__INIT;
    struct kms_keyring *kr = NULL;

    memset(k1, 0x11, sizeof(k1));
    memset(k2, 0x22, sizeof(k2));
    t1.term = 1;
    t1.key.data = k1;
    t1.key.len = 32;
    t2.term = 2;
    t2.key.data = k2;
    t2.key.len = 32;
    msg.version = 1;
    msg.active_term = 2;
    msg.n_terms = 2;
    msg.terms = terms;
    if (kms_crypto_init(NULL) != 0 || kms_keyring_import(FUZZ_CID, &msg, &kr, NULL) != 0) {
        abort();
    }
    return kr;
}

/* Seed generator: with KMS_FUZZ_WRITE_SEEDS=<dir>, `fuzz_record -runs=0`
 * writes three seeds sealed under the fixed keyring (valid, valid with the
 * record's own uuid, revoked). That is how corpus/fuzz_record was made. */
static void write_seeds(struct kms_keyring *kr, const char *dir)
{
    for (int i = 0; i < 3; i++) {
        Kmsd__V1__SealedRecord *rec = NULL;
        uint8_t blob[KMS_BLOB_MAX], *packed = NULL;
        size_t bl = 0, plen = 0;
        const uint8_t ip[16] = {0x20, 0x01, 0x0d, 0xb8};
        char path[512];
        FILE *f;
        if (kms_seal(kr, FUZZ_UUID, FUZZ_DATA, sizeof(FUZZ_DATA), 1700000000000, ip,
                     i == 0 ? 0 : (i == 1 ? 4 : 16), &rec, blob, &bl, NULL) != 0) {
            abort();
        }
        if (i == 2) {
            rec->revoked_at = 1700000001000;
        }
        if (kms_record_pack(rec, &packed, &plen, NULL) != 0) {
            abort();
        }
        snprintf(path, sizeof(path), "%s/seed-%d", dir, i);
        f = fopen(path, "wb");
        if (f == NULL) {
            abort();
        }
        uint8_t hdr[2] = {(uint8_t)(i == 1), (uint8_t)bl};
        fwrite(hdr, 1, 2, f);
        fwrite(blob, 1, bl, f);
        fwrite(packed, 1, plen, f);
        fclose(f);
        free(packed);
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *dir = getenv("KMS_FUZZ_WRITE_SEEDS");
    if (dir != NULL) {
        struct kms_keyring *kr = fixed_keyring();
        write_seeds(kr, dir);
        kms_keyring_unref(kr);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct kms_keyring *kr;
    Kmsd__V1__SealedRecord *rec = NULL;
    uint8_t out[KMS_SEAL_MAX_DATA];
    size_t outlen = 0, bloblen;
    struct kms_err err;
    int rc;

    if (kr == NULL) {
        kr = fixed_keyring(); /* kept for the life of the process */
    }
    if (size < 2) {
        return 0;
    }
    bloblen = data[1] % (KMS_BLOB_MAX + 1);
    if (size < 2 + bloblen) {
        return 0;
    }
    const uint8_t *blob = data + 2;
    kms_err_clear(&err);
    rc = kms_record_unpack(data + 2 + bloblen, size - 2 - bloblen, &rec, &err);
    if (rc != 0) {
        if (rc != KMS_EFORMAT || rec != NULL) {
            abort();
        }
        return 0;
    }
    const char *uuid = (data[0] & 1) ? rec->node_uuid : FUZZ_UUID;
    rc = kms_unseal(kr, rec, uuid, blob, bloblen, out, &outlen, &err);
    if (rc == 0) {
        if (outlen != sizeof(FUZZ_DATA) || memcmp(out, FUZZ_DATA, sizeof(FUZZ_DATA)) != 0) {
            abort();
        }
    } else {
        if (rc != KMS_EFORMAT && rc != KMS_EDENIED && rc != KMS_EREVOKED &&
            rc != KMS_ENOTFOUND && rc != KMS_EAUTH) {
            abort();
        }
        for (size_t i = 0; i < sizeof(out); i++) {
            if (out[i] != 0) {
                abort();
            }
        }
    }
    kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    return 0;
}
