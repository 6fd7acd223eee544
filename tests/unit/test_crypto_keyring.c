/* Keyring (create, rotate, encrypt, decrypt, references) and sealed records
 * (seal, unseal, blob, pack/unpack) with every tampering case. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

static const uint8_t cid[16] = {0xc1, 0xc2, 0xc3, 0xc4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static const char *uuid = "4c4c4544-0032-3510-8047-b4c04f4b4c32";

static int setup(void **state)
{
    (void)state;
    return kms_crypto_init(NULL) == 0 ? 0 : -1;
}

static struct kms_keyring *new_keyring(void)
{
    struct kms_keyring *kr = NULL;
    struct kms_err err;
    assert_int_equal(kms_keyring_create(cid, 1000, &kr, &err), 0);
    assert_non_null(kr);
    return kr;
}

/* Seals data and returns record + blob. */
static void seal(const struct kms_keyring *kr, const uint8_t *data, size_t len,
                 Kmsd__V1__SealedRecord **rec, uint8_t blob[KMS_BLOB_MAX])
{
    size_t bloblen = 0;
    struct kms_err err;
    const uint8_t ip[4] = {10, 0, 0, 7};
    kms_err_clear(&err);
    assert_int_equal(kms_seal(kr, uuid, data, len, 12345, ip, 4, rec, blob, &bloblen, &err), 0);
    assert_int_equal(bloblen, KMS_BLOB_V1_LEN);
}

/* ---- keyring ----------------------------------------------------------- */

static void test_keyring_lifecycle(void **state)
{
    struct kms_keyring *kr = new_keyring(), *kr2 = NULL, *kr3 = NULL, *back = NULL;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    uint8_t root[32], data[32];
    struct kms_err err;
    (void)state;

    assert_int_equal(kms_keyring_active_term(kr), 1);
    assert_int_equal(kms_keyring_term_count(kr), 1);
    assert_memory_equal(kms_keyring_cluster_id(kr), cid, 16);

    assert_int_equal(kms_keyring_rotate(kr, 2000, &kr2, &err), 0);
    assert_int_equal(kms_keyring_rotate(kr2, 3000, &kr3, &err), 0);
    assert_int_equal(kms_keyring_active_term(kr), 1); /* old one untouched */
    assert_int_equal(kms_keyring_active_term(kr3), 3);
    assert_int_equal(kms_keyring_term_count(kr3), 3);

    assert_int_equal(kms_root_key_generate(root, &err), 0);
    assert_int_equal(kms_keyring_encrypt(kr3, root, 5, 3, &ek, &err), 0);
    assert_int_equal(ek->version, 1);
    assert_int_equal(ek->share_count, 5);
    assert_int_equal(ek->threshold, 3);
    assert_int_equal(ek->active_term, 3);
    assert_int_equal(ek->cluster_id.len, 16);
    assert_memory_equal(ek->cluster_id.data, cid, 16);
    assert_int_equal(ek->nonce.len, 12);

    /* Round trip through the wire format as the store would do it. */
    size_t plen = kmsd__v1__encrypted_keyring__get_packed_size(ek);
    uint8_t *packed = malloc(plen);
    assert_non_null(packed);
    kmsd__v1__encrypted_keyring__pack(ek, packed);
    Kmsd__V1__EncryptedKeyring *ek2 = kmsd__v1__encrypted_keyring__unpack(NULL, plen, packed);
    assert_non_null(ek2);
    free(packed);
    kms_err_clear(&err);
    assert_int_equal(kms_keyring_decrypt(ek2, root, &back, &err), 0);
    assert_int_equal(kms_keyring_active_term(back), 3);
    assert_int_equal(kms_keyring_term_count(back), 3);
    assert_memory_equal(kms_keyring_cluster_id(back), cid, 16);

    /* Same keys: a record sealed under each term opens with the decrypted
     * keyring. */
    memset(data, 0x5a, sizeof(data));
    struct kms_keyring *all[3] = {kr, kr2, kr3};
    for (int i = 0; i < 3; i++) {
        Kmsd__V1__SealedRecord *rec = NULL;
        uint8_t blob[KMS_BLOB_MAX], out[64];
        size_t outlen = 0;
        seal(all[i], data, sizeof(data), &rec, blob);
        assert_int_equal(rec->term, (uint32_t)i + 1);
        assert_int_equal(kms_unseal(back, rec, uuid, blob, KMS_BLOB_V1_LEN, out, &outlen, &err),
                         0);
        assert_int_equal(outlen, 32);
        assert_memory_equal(out, data, 32);
        /* Older keyrings lack the newer terms. */
        if (i > 0) {
            assert_int_equal(kms_unseal(kr, rec, uuid, blob, KMS_BLOB_V1_LEN, out, &outlen,
                                        &err),
                             KMS_ENOTFOUND);
        }
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }

    /* Wrong root key. */
    uint8_t wrong[32];
    memcpy(wrong, root, 32);
    wrong[31] ^= 0x80;
    struct kms_keyring *nope = NULL;
    kms_err_clear(&err);
    assert_int_equal(kms_keyring_decrypt(ek2, wrong, &nope, &err), KMS_EAUTH);
    assert_null(nope);

    /* Another cluster id in the AAD. */
    ek2->cluster_id.data[0] ^= 1;
    assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), KMS_EAUTH);
    ek2->cluster_id.data[0] ^= 1;
    /* Another format version. */
    ek2->version = 2;
    assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), KMS_EVERSION);
    ek2->version = 1;
    /* The mirrored active term disagrees with the authenticated one. */
    ek2->active_term = 2;
    assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), KMS_ECORRUPT);
    ek2->active_term = 3;
    /* Every flipped bit in ciphertext or nonce. */
    for (size_t bit = 0; bit < ek2->ciphertext.len * 8; bit += 3) {
        ek2->ciphertext.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), KMS_EAUTH);
        ek2->ciphertext.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    ek2->nonce.data[5] ^= 4;
    assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), KMS_EAUTH);
    ek2->nonce.data[5] ^= 4;
    /* Truncated fields. */
    ek2->nonce.len = 11;
    assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), KMS_EFORMAT);
    ek2->nonce.len = 12;
    assert_int_equal(kms_keyring_decrypt(ek2, root, &nope, &err), 0);
    kms_keyring_unref(nope);

    /* Bad share parameters. */
    Kmsd__V1__EncryptedKeyring *ek3 = NULL;
    assert_int_equal(kms_keyring_encrypt(kr, root, 2, 3, &ek3, &err), KMS_EINVAL);
    assert_int_equal(kms_keyring_encrypt(kr, root, 256, 3, &ek3, &err), KMS_EINVAL);
    assert_int_equal(kms_keyring_encrypt(kr, root, 3, 0, &ek3, &err), KMS_EINVAL);
    assert_null(ek3);

    kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    kmsd__v1__encrypted_keyring__free_unpacked(ek2, NULL);
    kms_keyring_unref(back);
    kms_keyring_unref(kr3);
    kms_keyring_unref(kr2);
    kms_keyring_unref(kr);
}

static void test_keyring_import_validation(void **state)
{
    uint8_t k1[32] = {1}, k2[32] = {2};
    Kmsd__V1__KeyringTerm t1 = KMSD__V1__KEYRING_TERM__INIT, t2 = KMSD__V1__KEYRING_TERM__INIT;
    Kmsd__V1__KeyringTerm *terms[2] = {&t1, &t2};
    Kmsd__V1__Keyring msg = KMSD__V1__KEYRING__INIT;
    struct kms_keyring *kr = NULL;
    (void)state;
    t1.term = 1;
    t1.key.data = k1;
    t1.key.len = 32;
    t2.term = 5;
    t2.key.data = k2;
    t2.key.len = 32;
    msg.version = 1;
    msg.active_term = 5;
    msg.n_terms = 2;
    msg.terms = terms;
    assert_int_equal(kms_keyring_import(cid, &msg, &kr, NULL), 0);
    assert_int_equal(kms_keyring_active_term(kr), 5);
    kms_keyring_unref(kr);
    kr = NULL;
    msg.active_term = 4;
    assert_int_equal(kms_keyring_import(cid, &msg, &kr, NULL), KMS_EFORMAT);
    msg.active_term = 5;
    t2.term = 1;
    assert_int_equal(kms_keyring_import(cid, &msg, &kr, NULL), KMS_EFORMAT);
    t2.term = 5;
    t2.key.len = 31;
    assert_int_equal(kms_keyring_import(cid, &msg, &kr, NULL), KMS_EFORMAT);
    t2.key.len = 32;
    msg.version = 2;
    assert_int_equal(kms_keyring_import(cid, &msg, &kr, NULL), KMS_EVERSION);
    msg.version = 1;
    msg.n_terms = 0;
    assert_int_equal(kms_keyring_import(cid, &msg, &kr, NULL), KMS_EFORMAT);
    assert_null(kr);
}

static void *ref_worker(void *arg)
{
    struct kms_keyring *kr = arg;
    uint8_t data[16] = {9};
    for (int i = 0; i < 200; i++) {
        struct kms_keyring *r = kms_keyring_ref(kr);
        Kmsd__V1__SealedRecord *rec = NULL;
        uint8_t blob[KMS_BLOB_MAX], out[64];
        size_t bl, ol;
        if (kms_seal(r, uuid, data, 16, 1, NULL, 0, &rec, blob, &bl, NULL) != 0 ||
            kms_unseal(r, rec, uuid, blob, bl, out, &ol, NULL) != 0 || ol != 16 ||
            memcmp(out, data, 16) != 0) {
            abort();
        }
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
        kms_keyring_unref(r);
    }
    kms_keyring_unref(kr); /* the reference main handed over */
    return NULL;
}

static void test_keyring_refcount_threads(void **state)
{
    struct kms_keyring *kr = new_keyring();
    pthread_t th[4];
    (void)state;
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_create(&th[i], NULL, ref_worker, kms_keyring_ref(kr)), 0);
    }
    kms_keyring_unref(kr); /* workers may now hold the last reference */
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
    }
    kms_keyring_ref(NULL);
    kms_keyring_unref(NULL);
}

/* ---- seal / unseal ------------------------------------------------------ */

static void test_seal_round_trip_and_args(void **state)
{
    struct kms_keyring *kr = new_keyring();
    Kmsd__V1__SealedRecord *rec = NULL;
    uint8_t data[64], blob[KMS_BLOB_MAX], out[64], kid[16], half[32];
    size_t outlen = 0, bl = 0;
    struct kms_err err;
    (void)state;

    for (size_t len = 16; len <= 64; len++) {
        assert_int_equal(kms_rand_bytes(data, len, NULL), 0);
        seal(kr, data, len, &rec, blob);
        assert_int_equal(rec->version, 1);
        assert_int_equal(rec->key_id.len, 16);
        assert_int_equal(rec->nonce.len, 12);
        assert_int_equal(rec->ciphertext.len, len + 16);
        assert_int_equal(rec->created_at, 12345);
        assert_int_equal(rec->source_ip.len, 4);
        assert_string_equal(rec->node_uuid, uuid);
        assert_int_equal(blob[0], 1);
        assert_memory_equal(blob + 1, rec->key_id.data, 16);
        assert_int_equal(kms_blob_parse(blob, KMS_BLOB_V1_LEN, kid, half, &err), 0);
        assert_memory_equal(kid, rec->key_id.data, 16);
        /* The record never contains the client half. */
        uint8_t *packed = NULL;
        size_t plen = 0;
        assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), 0);
        assert_null(memmem(packed, plen, half, 32));
        free(packed);
        kms_err_clear(&err);
        assert_int_equal(kms_unseal(kr, rec, uuid, blob, KMS_BLOB_V1_LEN, out, &outlen, &err), 0);
        assert_int_equal(outlen, len);
        assert_memory_equal(out, data, len);
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
        rec = NULL;
    }

    /* Argument validation. */
    assert_int_equal(kms_seal(kr, uuid, data, 15, 0, NULL, 0, &rec, blob, &bl, &err), KMS_EINVAL);
    assert_int_equal(kms_seal(kr, uuid, data, 65, 0, NULL, 0, &rec, blob, &bl, &err), KMS_EINVAL);
    assert_int_equal(kms_seal(kr, "", data, 32, 0, NULL, 0, &rec, blob, &bl, &err), KMS_EINVAL);
    assert_int_equal(kms_seal(kr, NULL, data, 32, 0, NULL, 0, &rec, blob, &bl, &err), KMS_EINVAL);
    assert_int_equal(kms_seal(kr, "bad\nuuid", data, 32, 0, NULL, 0, &rec, blob, &bl, &err),
                     KMS_EINVAL);
    char longu[130];
    memset(longu, 'a', 129);
    longu[129] = '\0';
    assert_int_equal(kms_seal(kr, longu, data, 32, 0, NULL, 0, &rec, blob, &bl, &err), KMS_EINVAL);
    longu[128] = '\0';
    assert_int_equal(kms_seal(kr, longu, data, 32, 0, NULL, 0, &rec, blob, &bl, &err), 0);
    assert_int_equal(kms_unseal(kr, rec, longu, blob, bl, out, &outlen, &err), 0);
    kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    rec = NULL;
    assert_int_equal(kms_seal(kr, uuid, data, 32, 0, data, 5, &rec, blob, &bl, &err), KMS_EINVAL);
    assert_null(rec);
    kms_keyring_unref(kr);
}

static void test_blob_parse(void **state)
{
    uint8_t blob[64] = {1}, kid[16], half[32];
    (void)state;
    assert_int_equal(kms_blob_parse(blob, 49, kid, half, NULL), 0);
    assert_int_equal(kms_blob_parse(blob, 48, kid, half, NULL), KMS_EFORMAT);
    assert_int_equal(kms_blob_parse(blob, 50, kid, half, NULL), KMS_EFORMAT);
    assert_int_equal(kms_blob_parse(blob, 0, kid, half, NULL), KMS_EFORMAT);
    assert_int_equal(kms_blob_parse(NULL, 49, kid, half, NULL), KMS_EFORMAT);
    blob[0] = 2;
    assert_int_equal(kms_blob_parse(blob, 49, kid, half, NULL), KMS_EFORMAT);
}

/* Asserts that a failed unseal left no plaintext behind. */
static void assert_wiped(const uint8_t *out, size_t outlen)
{
    assert_int_equal(outlen, 0);
    for (int i = 0; i < 64; i++) {
        assert_int_equal(out[i], 0);
    }
}

static void test_unseal_refusals(void **state)
{
    struct kms_keyring *kr = new_keyring(), *other = new_keyring();
    Kmsd__V1__SealedRecord *rec = NULL, *rec2 = NULL;
    uint8_t data[40], blob[KMS_BLOB_MAX], blob2[KMS_BLOB_MAX], out[64];
    size_t outlen;
    struct kms_err err;
    (void)state;
    memset(data, 0x3c, sizeof(data));
    seal(kr, data, sizeof(data), &rec, blob);
    seal(kr, data, sizeof(data), &rec2, blob2);

    /* Wrong node uuid. */
    memset(out, 0xee, sizeof(out));
    outlen = 99;
    assert_int_equal(kms_unseal(kr, rec, "someone-else", blob, 49, out, &outlen, &err),
                     KMS_EDENIED);
    assert_wiped(out, outlen);
    assert_int_equal(kms_unseal(kr, rec, "4c4c4544-0032-3510-8047-b4c04f4b4c3", blob, 49, out,
                                &outlen, &err),
                     KMS_EDENIED);
    /* Blob of another record. */
    assert_int_equal(kms_unseal(kr, rec, uuid, blob2, 49, out, &outlen, &err), KMS_EDENIED);
    /* Wrong client half: right key_id, another record's client half. */
    uint8_t mixed[KMS_BLOB_MAX];
    memcpy(mixed, blob, 17);
    memcpy(mixed + 17, blob2 + 17, 32);
    memset(out, 0xee, sizeof(out));
    assert_int_equal(kms_unseal(kr, rec, uuid, mixed, 49, out, &outlen, &err), KMS_EAUTH);
    assert_wiped(out, outlen);
    /* Wrong term key: another keyring with a term 1. */
    assert_int_equal(kms_unseal(other, rec, uuid, blob, 49, out, &outlen, &err), KMS_EAUTH);
    /* Term missing. */
    rec->term = 2;
    assert_int_equal(kms_unseal(kr, rec, uuid, blob, 49, out, &outlen, &err), KMS_ENOTFOUND);
    rec->term = 1;
    /* Revoked. */
    rec->revoked_at = 99;
    kms_err_clear(&err);
    assert_int_equal(kms_unseal(kr, rec, uuid, blob, 49, out, &outlen, &err), KMS_EREVOKED);
    assert_non_null(strstr(err.msg, "revoked"));
    rec->revoked_at = 0;
    /* Bad blob length. */
    assert_int_equal(kms_unseal(kr, rec, uuid, blob, 48, out, &outlen, &err), KMS_EFORMAT);
    /* Still fine after all that. */
    assert_int_equal(kms_unseal(kr, rec, uuid, blob, 49, out, &outlen, &err), 0);
    assert_memory_equal(out, data, sizeof(data));

    /* Every flipped bit of the blob. */
    for (size_t bit = 0; bit < 49 * 8; bit++) {
        blob[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        memset(out, 0xee, sizeof(out));
        int rc = kms_unseal(kr, rec, uuid, blob, 49, out, &outlen, &err);
        assert_true(rc == KMS_EFORMAT || rc == KMS_EDENIED || rc == KMS_EAUTH);
        assert_wiped(out, outlen);
        blob[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }

    /* Every flipped bit of the packed record: either an error, or the
     * change hit a field that is not part of the seal (timestamps, source
     * ip) and the original plaintext comes out. Never other bytes. */
    uint8_t *packed = NULL;
    size_t plen = 0;
    size_t ok_unauth = 0, errors = 0;
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), 0);
    for (size_t bit = 0; bit < plen * 8; bit++) {
        Kmsd__V1__SealedRecord *t = NULL;
        packed[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        int rc = kms_record_unpack(packed, plen, &t, &err);
        if (rc == 0) {
            memset(out, 0xee, sizeof(out));
            rc = kms_unseal(kr, t, uuid, blob, 49, out, &outlen, &err);
            if (rc == 0) {
                assert_int_equal(outlen, sizeof(data));
                assert_memory_equal(out, data, sizeof(data));
                /* Only unauthenticated fields may differ. */
                assert_int_equal(t->term, rec->term);
                assert_memory_equal(t->key_id.data, rec->key_id.data, 16);
                assert_memory_equal(t->nonce.data, rec->nonce.data, 12);
                assert_int_equal(t->ciphertext.len, rec->ciphertext.len);
                assert_memory_equal(t->ciphertext.data, rec->ciphertext.data,
                                    rec->ciphertext.len);
                assert_string_equal(t->node_uuid, rec->node_uuid);
                ok_unauth++;
            } else {
                assert_wiped(out, outlen);
                errors++;
            }
            kmsd__v1__sealed_record__free_unpacked(t, NULL);
        } else {
            assert_int_equal(rc, KMS_EFORMAT);
            assert_null(t);
            errors++;
        }
        packed[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    assert_true(errors > ok_unauth);
    free(packed);

    kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    kmsd__v1__sealed_record__free_unpacked(rec2, NULL);
    kms_keyring_unref(kr);
    kms_keyring_unref(other);
}

static void test_record_pack_unpack(void **state)
{
    struct kms_keyring *kr = new_keyring();
    Kmsd__V1__SealedRecord *rec = NULL, *back = NULL;
    uint8_t data[16] = {1}, blob[KMS_BLOB_MAX], *packed = NULL;
    size_t plen = 0;
    struct kms_err err;
    (void)state;
    seal(kr, data, 16, &rec, blob);
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), 0);
    assert_int_equal(kms_record_unpack(packed, plen, &back, &err), 0);
    assert_memory_equal(back->key_id.data, rec->key_id.data, 16);
    assert_int_equal(back->created_at, rec->created_at);
    kmsd__v1__sealed_record__free_unpacked(back, NULL);
    back = NULL;
    free(packed);
    packed = NULL;

    /* Field validation on pack and unpack. */
    rec->nonce.len = 8;
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), KMS_EFORMAT);
    rec->nonce.len = 12;
    rec->ciphertext.len = 20;
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), KMS_EFORMAT);
    rec->ciphertext.len = 32;
    rec->version = 2;
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), KMS_EFORMAT);
    rec->version = 1;
    rec->term = 0;
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), KMS_EFORMAT);
    rec->term = 1;
    assert_null(packed);

    /* Garbage and empty input. */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    assert_int_equal(kms_record_unpack(junk, sizeof(junk), &back, &err), KMS_EFORMAT);
    assert_int_equal(kms_record_unpack(junk, 0, &back, &err), KMS_EFORMAT);
    assert_null(back);

    kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    kms_keyring_unref(kr);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keyring_lifecycle),
        cmocka_unit_test(test_keyring_import_validation),
        cmocka_unit_test(test_keyring_refcount_threads),
        cmocka_unit_test(test_seal_round_trip_and_args),
        cmocka_unit_test(test_blob_parse),
        cmocka_unit_test(test_unseal_refusals),
        cmocka_unit_test(test_record_pack_unpack),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
