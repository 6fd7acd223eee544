/* kms_crypto primitives: HKDF-SHA256 (RFC 5869), AES-256-GCM (GCM spec test
 * cases 13-16), secure memory, randomness, constant-time hex. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

/* Test-only hex decoder (not constant time, aborts on bad input). */
static size_t unhex(const char *h, uint8_t *out, size_t cap)
{
    size_t n = strlen(h) / 2;
    assert_true(n <= cap);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        assert_int_equal(sscanf(h + 2 * i, "%2x", &v), 1);
        out[i] = (uint8_t)v;
    }
    return n;
}

static int setup(void **state)
{
    struct kms_err err;
    (void)state;
    return kms_crypto_init(&err) == 0 ? 0 : -1;
}

/* ---- HKDF ---------------------------------------------------------------- */

struct hkdf_vec {
    const char *ikm, *salt, *info, *okm;
};

static const struct hkdf_vec hkdf_vecs[] = {
    /* RFC 5869 A.1 */
    {"0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "000102030405060708090a0b0c",
     "f0f1f2f3f4f5f6f7f8f9",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"},
    /* RFC 5869 A.2 */
    {"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
     "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
     "404142434445464748494a4b4c4d4e4f",
     "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
     "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
     "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
     "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
     "d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
     "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
     "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
     "cc30c58179ec3e87c14c01d5c1f3434f1d87"},
    /* RFC 5869 A.3: empty salt and info */
    {"0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "", "",
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"},
};

static void test_hkdf_rfc5869(void **state)
{
    (void)state;
    for (size_t v = 0; v < sizeof(hkdf_vecs) / sizeof(hkdf_vecs[0]); v++) {
        uint8_t ikm[128], salt[128], info[128], okm[128], out[128];
        size_t ikml = unhex(hkdf_vecs[v].ikm, ikm, sizeof(ikm));
        size_t saltl = unhex(hkdf_vecs[v].salt, salt, sizeof(salt));
        size_t infol = unhex(hkdf_vecs[v].info, info, sizeof(info));
        size_t okml = unhex(hkdf_vecs[v].okm, okm, sizeof(okm));
        struct kms_err err;
        kms_err_clear(&err);
        assert_int_equal(kms_hkdf_sha256(ikm, ikml, saltl ? salt : NULL, saltl,
                                         infol ? info : NULL, infol, out, okml, &err),
                         0);
        assert_memory_equal(out, okm, okml);
    }
}

static void test_hkdf_invalid(void **state)
{
    uint8_t out[32];
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_hkdf_sha256(NULL, 0, NULL, 0, NULL, 0, out, 32, &err), KMS_EINVAL);
    assert_int_equal(kms_hkdf_sha256(out, 32, NULL, 0, NULL, 0, out, 0, NULL), KMS_EINVAL);
    assert_int_equal(kms_hkdf_sha256(out, 32, NULL, 0, NULL, 0, out, 255 * 32 + 1, NULL),
                     KMS_EINVAL);
}

/* ---- AES-256-GCM ----------------------------------------------------------- */

struct gcm_vec {
    const char *key, *iv, *pt, *aad, *ct, *tag;
};

/* McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13-16
 * (256-bit keys, 96-bit IVs). */
static const struct gcm_vec gcm_vecs[] = {
    {"0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
    {"0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "00000000000000000000000000000000", "",
     "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
    {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
     "cafebabefacedbaddecaf888",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
     "",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
     "b094dac5d93471bdec1a502270e3cc6c"},
    {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
     "cafebabefacedbaddecaf888",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
     "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
};

static void test_gcm_vectors(void **state)
{
    (void)state;
    for (size_t v = 0; v < sizeof(gcm_vecs) / sizeof(gcm_vecs[0]); v++) {
        uint8_t key[32], iv[12], pt[64], aad[32], ct[64], tag[16];
        uint8_t out[96], back[64];
        struct kms_err err;
        unhex(gcm_vecs[v].key, key, sizeof(key));
        unhex(gcm_vecs[v].iv, iv, sizeof(iv));
        size_t ptl = unhex(gcm_vecs[v].pt, pt, sizeof(pt));
        size_t aadl = unhex(gcm_vecs[v].aad, aad, sizeof(aad));
        size_t ctl = unhex(gcm_vecs[v].ct, ct, sizeof(ct));
        unhex(gcm_vecs[v].tag, tag, sizeof(tag));
        assert_int_equal(ptl, ctl);
        kms_err_clear(&err);
        assert_int_equal(kms_aead_seal(key, iv, aadl ? aad : NULL, aadl, ptl ? pt : NULL, ptl,
                                       out, &err),
                         0);
        assert_memory_equal(out, ct, ctl);
        assert_memory_equal(out + ctl, tag, 16);
        assert_int_equal(kms_aead_open(key, iv, aadl ? aad : NULL, aadl, out, ctl + 16, back,
                                       &err),
                         0);
        if (ptl > 0) {
            assert_memory_equal(back, pt, ptl);
        }
        /* Any flipped bit of ciphertext or tag, or of the AAD, is refused. */
        for (size_t bit = 0; bit < (ctl + 16) * 8; bit += 7) {
            out[bit / 8] ^= (uint8_t)(1u << (bit % 8));
            assert_int_equal(kms_aead_open(key, iv, aad, aadl, out, ctl + 16, back, &err),
                             KMS_EAUTH);
            out[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        }
        if (aadl > 0) {
            aad[0] ^= 1;
            assert_int_equal(kms_aead_open(key, iv, aad, aadl, out, ctl + 16, back, &err),
                             KMS_EAUTH);
            aad[0] ^= 1;
        }
    }
}

static void test_gcm_wipes_on_failure_and_in_place(void **state)
{
    uint8_t key[32] = {1}, nonce[12] = {2}, buf[48], pt[32];
    struct kms_err err;
    (void)state;
    memset(pt, 0xa5, sizeof(pt));
    memcpy(buf, pt, sizeof(pt));
    assert_int_equal(kms_aead_seal(key, nonce, NULL, 0, buf, 32, buf, NULL), 0); /* in place */
    assert_memory_not_equal(buf, pt, 32);
    key[0] ^= 1;
    uint8_t out[32];
    memset(out, 0x77, sizeof(out));
    kms_err_clear(&err);
    assert_int_equal(kms_aead_open(key, nonce, NULL, 0, buf, 48, out, &err), KMS_EAUTH);
    assert_string_equal(err.msg, "authentication failed");
    for (size_t i = 0; i < sizeof(out); i++) {
        assert_int_equal(out[i], 0);
    }
    key[0] ^= 1;
    assert_int_equal(kms_aead_open(key, nonce, NULL, 0, buf, 48, buf, NULL), 0); /* in place */
    assert_memory_equal(buf, pt, 32);
    assert_int_equal(kms_aead_open(key, nonce, NULL, 0, buf, 15, out, NULL), KMS_EINVAL);
}

/* ---- secure memory, randomness, init ---------------------------------------- */

static void test_secmem_and_rand(void **state)
{
    struct kms_err err;
    uint8_t a[32] = {0}, b[32] = {0};
    (void)state;
    assert_int_equal(kms_crypto_init(&err), 0); /* idempotent */
    uint8_t *p = kms_secmem_alloc(100);
    assert_non_null(p);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(p[i], 0);
    }
    memset(p, 0xff, 100);
    kms_secmem_free(p, 100);
    kms_secmem_free(NULL, 0);
    assert_int_equal(kms_rand_bytes(a, sizeof(a), &err), 0);
    assert_int_equal(kms_rand_bytes(b, sizeof(b), &err), 0);
    assert_memory_not_equal(a, b, sizeof(a));
    assert_int_equal(kms_rand_bytes(NULL, 0, &err), 0);
}

/* ---- constant-time hex ------------------------------------------------------ */

static void test_hex_ct(void **state)
{
    uint8_t all[256], back[256];
    char text[513];
    size_t n = 0;
    struct kms_err err;
    (void)state;
    for (int i = 0; i < 256; i++) {
        all[i] = (uint8_t)i;
    }
    assert_int_equal(kms_hex_encode_ct(all, 256, text, sizeof(text), &err), 0);
    assert_int_equal(strlen(text), 512);
    assert_memory_equal(text, "000102030405060708090a0b0c0d0e0f10", 34);
    assert_string_equal(text + 500, "fafbfcfdfeff");
    assert_int_equal(kms_hex_decode_ct(text, 512, back, sizeof(back), &n, &err), 0);
    assert_int_equal(n, 256);
    assert_memory_equal(all, back, 256);
    /* Upper case decodes too. */
    for (size_t i = 0; i < 512; i++) {
        if (text[i] >= 'a' && text[i] <= 'f') {
            text[i] = (char)(text[i] - 'a' + 'A');
        }
    }
    memset(back, 0, sizeof(back));
    assert_int_equal(kms_hex_decode_ct(text, 512, back, sizeof(back), &n, &err), 0);
    assert_memory_equal(all, back, 256);
    /* Every non-hex byte is refused, in either position. */
    for (int c = 0; c < 256; c++) {
        char pair[2];
        uint8_t one;
        bool hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
        pair[0] = (char)c;
        pair[1] = '0';
        assert_int_equal(kms_hex_decode_ct(pair, 2, &one, 1, NULL, NULL) == 0, hex);
        pair[0] = '0';
        pair[1] = (char)c;
        assert_int_equal(kms_hex_decode_ct(pair, 2, &one, 1, NULL, NULL) == 0, hex);
    }
    assert_int_equal(kms_hex_decode_ct("abc", 3, back, sizeof(back), NULL, NULL), KMS_EFORMAT);
    assert_int_equal(kms_hex_encode_ct(all, 4, text, 8, NULL), KMS_EINVAL);
}

static void test_process_harden(void **state)
{
    struct kms_err err;
    (void)state;
    /* Only effects on this test process: no core dumps. */
    assert_int_equal(kms_process_harden(&err), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hkdf_rfc5869),
        cmocka_unit_test(test_hkdf_invalid),
        cmocka_unit_test(test_gcm_vectors),
        cmocka_unit_test(test_gcm_wipes_on_failure_and_in_place),
        cmocka_unit_test(test_secmem_and_rand),
        cmocka_unit_test(test_hex_ct),
        cmocka_unit_test(test_process_harden),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
