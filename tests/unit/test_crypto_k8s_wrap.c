/* Kubernetes KMS v2 seed wrapping (kms_k8s_wrap.h): round trip, old terms
 * after rotation, key ids, size bound, and every tampering case. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "kms_crypto.h"
#include "kms_k8s_wrap.h"

static const uint8_t cid[16] = {0xc1, 0xc2, 0xc3, 0xc4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static const uint8_t cid2[16] = {0xd1, 0xc2, 0xc3, 0xc4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static int setup(void **state)
{
    (void)state;
    return kms_crypto_init(NULL) == 0 ? 0 : -1;
}

static void test_roundtrip_and_rotation(void **state)
{
    struct kms_keyring *kr1 = NULL, *kr2 = NULL;
    uint8_t seed[32], ct1[KMS_K8S_MAX_CIPHERTEXT], ct2[KMS_K8S_MAX_CIPHERTEXT];
    uint8_t pt[KMS_K8S_MAX_CIPHERTEXT];
    size_t ct1len = 0, ct2len = 0, ptlen = 0;
    uint32_t term = 0;
    char id1[KMS_K8S_KEY_ID_MAX], id2[KMS_K8S_KEY_ID_MAX];
    struct kms_err err;
    (void)state;

    assert_int_equal(kms_rand_bytes(seed, sizeof(seed), NULL), 0);
    assert_int_equal(kms_keyring_create(cid, 1000, &kr1, &err), 0);
    assert_int_equal(kms_k8s_wrap(kr1, seed, 32, ct1, &ct1len, &term, &err), 0);
    assert_int_equal(term, 1);
    assert_int_equal(ct1len, 32 + KMS_K8S_WRAP_OVERHEAD);
    assert_int_equal(kms_k8s_unwrap(kr1, ct1, ct1len, pt, &ptlen, &term, &err), 0);
    assert_int_equal(ptlen, 32);
    assert_memory_equal(pt, seed, 32);

    kms_k8s_active_key_id(kr1, id1);
    assert_string_equal(id1, "kmsd-c1c2c3c405060708090a0b0c0d0e0f10-t1");

    /* after rotation: new term, new key id, old ciphertext still opens */
    assert_int_equal(kms_keyring_rotate(kr1, 2000, &kr2, &err), 0);
    kms_k8s_active_key_id(kr2, id2);
    assert_string_not_equal(id1, id2);
    assert_string_equal(id2, "kmsd-c1c2c3c405060708090a0b0c0d0e0f10-t2");
    assert_int_equal(kms_k8s_wrap(kr2, seed, 32, ct2, &ct2len, &term, &err), 0);
    assert_int_equal(term, 2);
    assert_int_equal(kms_k8s_unwrap(kr2, ct1, ct1len, pt, &ptlen, &term, &err), 0);
    assert_int_equal(term, 1);
    assert_memory_equal(pt, seed, 32);
    assert_int_equal(kms_k8s_unwrap(kr2, ct2, ct2len, pt, &ptlen, &term, &err), 0);
    assert_memory_equal(pt, seed, 32);
    /* a replica that has not seen term 2 yet says so (the plugin fails over) */
    assert_int_equal(kms_k8s_unwrap(kr1, ct2, ct2len, pt, &ptlen, &term, &err), KMS_ENOTFOUND);

    /* two wraps of the same seed differ (random nonce) */
    assert_int_equal(kms_k8s_wrap(kr2, seed, 32, ct1, &ct1len, &term, &err), 0);
    assert_memory_not_equal(ct1, ct2, ct1len);
    kms_keyring_unref(kr1);
    kms_keyring_unref(kr2);
}

static void test_bounds_and_tampering(void **state)
{
    struct kms_keyring *kr = NULL, *other = NULL;
    uint8_t big[KMS_K8S_MAX_PLAINTEXT + 1] = {0}, ct[KMS_K8S_MAX_CIPHERTEXT + 8];
    uint8_t pt[KMS_K8S_MAX_CIPHERTEXT + 8];
    size_t ctlen = 0, ptlen = 7;
    uint32_t term = 0;
    struct kms_err err;
    (void)state;

    assert_true(KMS_K8S_MAX_CIPHERTEXT <= 1024);
    assert_int_equal(kms_keyring_create(cid, 1000, &kr, &err), 0);
    assert_int_equal(kms_keyring_create(cid2, 1000, &other, &err), 0);
    assert_int_equal(kms_k8s_wrap(kr, big, 0, ct, &ctlen, &term, &err), KMS_EINVAL);
    assert_int_equal(kms_k8s_wrap(kr, big, sizeof(big), ct, &ctlen, &term, &err), KMS_EINVAL);
    assert_int_equal(kms_k8s_wrap(kr, big, KMS_K8S_MAX_PLAINTEXT, ct, &ctlen, &term, &err), 0);
    assert_int_equal(ctlen, KMS_K8S_MAX_CIPHERTEXT);

    assert_int_equal(kms_k8s_wrap(kr, big, 32, ct, &ctlen, &term, &err), 0);
    /* too short, too long */
    assert_int_equal(kms_k8s_unwrap(kr, ct, KMS_K8S_WRAP_OVERHEAD, pt, &ptlen, &term, &err),
                     KMS_EFORMAT);
    assert_int_equal(kms_k8s_unwrap(kr, ct, KMS_K8S_MAX_CIPHERTEXT + 1, pt, &ptlen, &term, &err),
                     KMS_EFORMAT);
    /* another cluster's keyring (term 1 exists there too) */
    assert_int_equal(kms_k8s_unwrap(other, ct, ctlen, pt, &ptlen, &term, &err), KMS_EAUTH);
    /* every byte flipped fails: version, term, nonce, ciphertext, tag */
    for (size_t i = 0; i < ctlen; i++) {
        int rc;
        ct[i] ^= 0x01;
        rc = kms_k8s_unwrap(kr, ct, ctlen, pt, &ptlen, &term, &err);
        assert_true(rc == KMS_EAUTH || rc == KMS_EVERSION || rc == KMS_ENOTFOUND);
        ct[i] ^= 0x01;
    }
    /* truncated by one byte */
    assert_int_equal(kms_k8s_unwrap(kr, ct, ctlen - 1, pt, &ptlen, &term, &err), KMS_EAUTH);
    assert_int_equal(ptlen, 7); /* untouched on failure */
    assert_int_equal(kms_k8s_unwrap(kr, ct, ctlen, pt, &ptlen, &term, &err), 0);
    kms_keyring_unref(kr);
    kms_keyring_unref(other);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_and_rotation),
        cmocka_unit_test(test_bounds_and_tampering),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
