/* GF(2^8), Shamir split/combine and the share text format. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

static int setup(void **state)
{
    (void)state;
    return kms_crypto_init(NULL) == 0 ? 0 : -1;
}

static void rnd(void *p, size_t n)
{
    assert_int_equal(kms_rand_bytes(p, n, NULL), 0);
}

/* ---- GF(2^8) ----------------------------------------------------------- */

/* Schoolbook carry-less multiply then reduction by 0x11b: slow, obviously
 * right, independent of the code under test. */
static uint8_t ref_mul(uint8_t a, uint8_t b)
{
    unsigned p = 0;
    for (int i = 0; i < 8; i++) {
        if (b & (1u << i)) {
            p ^= (unsigned)a << i;
        }
    }
    for (int i = 14; i >= 8; i--) {
        if (p & (1u << i)) {
            p ^= 0x11bu << (i - 8);
        }
    }
    return (uint8_t)p;
}

static void test_gf256_all_products(void **state)
{
    (void)state;
    for (unsigned a = 0; a < 256; a++) {
        for (unsigned b = 0; b < 256; b++) {
            if (kms_gf256_mul((uint8_t)a, (uint8_t)b) != ref_mul((uint8_t)a, (uint8_t)b)) {
                fail_msg("mul(%u, %u) = %u, expected %u", a, b,
                         kms_gf256_mul((uint8_t)a, (uint8_t)b), ref_mul((uint8_t)a, (uint8_t)b));
            }
        }
    }
    /* A known AES value: {57} x {83} = {c1} (FIPS-197 4.2). */
    assert_int_equal(kms_gf256_mul(0x57, 0x83), 0xc1);
}

static void test_gf256_inverses(void **state)
{
    (void)state;
    assert_int_equal(kms_gf256_inv(0), 0);
    for (unsigned a = 1; a < 256; a++) {
        uint8_t inv = kms_gf256_inv((uint8_t)a);
        assert_int_equal(ref_mul((uint8_t)a, inv), 1);
    }
    assert_int_equal(kms_gf256_inv(0x53), 0xca); /* FIPS-197 S-box derivation */
}

/* ---- Shamir -------------------------------------------------------------- */

static void test_shamir_every_subset(void **state)
{
    (void)state;
    struct kms_share *sh = kms_secmem_alloc(sizeof(*sh) * 6);
    struct kms_share pick[6];
    uint8_t secret[32], got[KMS_SHAMIR_MAX_SECRET];
    size_t len;
    struct kms_err err;

    assert_non_null(sh);
    for (unsigned n = 2; n <= 6; n++) {
        for (unsigned k = 2; k <= n; k++) {
            rnd(secret, sizeof(secret));
            assert_int_equal(kms_shamir_split(secret, sizeof(secret), n, k, false, sh, &err), 0);
            for (unsigned i = 0; i < n; i++) {
                assert_int_equal(sh[i].index, i + 1);
                assert_int_equal(sh[i].len, 32);
            }
            for (unsigned mask = 1; mask < (1u << n); mask++) {
                unsigned c = 0;
                for (unsigned i = 0; i < n; i++) {
                    if (mask & (1u << i)) {
                        pick[c++] = sh[i];
                    }
                }
                int rc = kms_shamir_combine(pick, c, k, got, &len, &err);
                if (c >= k) {
                    assert_int_equal(rc, 0);
                    assert_int_equal(len, 32);
                    assert_memory_equal(got, secret, 32);
                } else {
                    assert_int_equal(rc, KMS_ETOOFEW);
                    /* Interpolating k-1 shares as if the threshold were k-1
                     * gives some other value, never the secret. */
                    if (c == k - 1 && c >= 1) {
                        assert_int_equal(kms_shamir_combine(pick, c, k - 1, got, &len, &err), 0);
                        assert_memory_not_equal(got, secret, 32);
                    }
                }
            }
        }
    }
    kms_secmem_free(sh, sizeof(*sh) * 6);
}

static void test_shamir_splits_differ(void **state)
{
    struct kms_share a[3], b[3];
    uint8_t secret[16] = {1, 2, 3};
    (void)state;
    assert_int_equal(kms_shamir_split(secret, 16, 3, 2, false, a, NULL), 0);
    assert_int_equal(kms_shamir_split(secret, 16, 3, 2, false, b, NULL), 0);
    for (int i = 0; i < 3; i++) {
        assert_memory_not_equal(a[i].y, b[i].y, 16);
        /* With k >= 2 no share equals the secret (prob. 2^-128). */
        assert_memory_not_equal(a[i].y, secret, 16);
    }
}

static void test_shamir_random_1000(void **state)
{
    struct kms_share sh[10];
    uint8_t secret[64], got[64];
    size_t len;
    (void)state;
    for (int t = 0; t < 1000; t++) {
        uint8_t r[4];
        rnd(r, sizeof(r));
        size_t slen = 16 + r[0] % 49;
        unsigned n = 2 + r[1] % 9;
        unsigned k = 2 + r[2] % (n - 1);
        rnd(secret, slen);
        assert_int_equal(kms_shamir_split(secret, slen, n, k, false, sh, NULL), 0);
        /* A rotating window of k shares, in a scrambled order. */
        struct kms_share pick[10];
        for (unsigned i = 0; i < k; i++) {
            pick[i] = sh[(r[3] + i * 7) % n];
        }
        /* (r[3] + i*7) % n may repeat when gcd(7, n) > 1: n = 7 only. */
        if (n == 7) {
            for (unsigned i = 0; i < k; i++) {
                pick[i] = sh[(r[3] + i) % n];
            }
        }
        assert_int_equal(kms_shamir_combine(pick, k, k, got, &len, NULL), 0);
        assert_int_equal(len, slen);
        assert_memory_equal(got, secret, slen);
    }
}

static void test_shamir_split_params(void **state)
{
    struct kms_share sh[256];
    uint8_t secret[65] = {0};
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_shamir_split(secret, 15, 3, 2, false, sh, &err), KMS_EINVAL);
    assert_int_equal(kms_shamir_split(secret, 65, 3, 2, false, sh, &err), KMS_EINVAL);
    assert_int_equal(kms_shamir_split(secret, 32, 3, 1, false, sh, &err), KMS_EINVAL);
    assert_int_equal(kms_shamir_split(secret, 32, 3, 1, true, sh, &err), KMS_EINVAL);
    assert_int_equal(kms_shamir_split(secret, 32, 2, 3, false, sh, &err), KMS_EINVAL);
    assert_int_equal(kms_shamir_split(secret, 32, 256, 3, false, sh, &err), KMS_EINVAL);
    assert_int_equal(kms_shamir_split(secret, 32, 1, 1, false, sh, &err), KMS_EINVAL);
    assert_non_null(strstr(err.msg, "development"));
    /* 1-of-1 for development: the share carries the secret itself. */
    uint8_t got[64];
    size_t len;
    secret[0] = 42;
    assert_int_equal(kms_shamir_split(secret, 32, 1, 1, true, sh, &err), 0);
    assert_int_equal(kms_shamir_combine(sh, 1, 1, got, &len, &err), 0);
    assert_memory_equal(got, secret, 32);
    /* The widest split. */
    assert_int_equal(kms_shamir_split(secret, 64, 255, 255, false, sh, &err), 0);
    assert_int_equal(kms_shamir_combine(sh, 255, 255, got, &len, &err), 0);
    assert_memory_equal(got, secret, 64);
}

static void test_shamir_combine_errors(void **state)
{
    struct kms_share sh[4], bad[4];
    uint8_t secret[32] = {7}, got[64];
    size_t len = 99;
    struct kms_err err;
    (void)state;
    assert_int_equal(kms_shamir_split(secret, 32, 4, 3, false, sh, NULL), 0);

    memcpy(bad, sh, sizeof(bad));
    bad[1].index = bad[0].index; /* duplicate */
    kms_err_clear(&err);
    assert_int_equal(kms_shamir_combine(bad, 3, 3, got, &len, &err), KMS_EDUP);
    assert_non_null(strstr(err.msg, "duplicate"));

    memcpy(bad, sh, sizeof(bad));
    bad[2].len = 31; /* mixed lengths */
    kms_err_clear(&err);
    assert_int_equal(kms_shamir_combine(bad, 3, 3, got, &len, &err), KMS_EFORMAT);

    kms_err_clear(&err);
    assert_int_equal(kms_shamir_combine(sh, 2, 3, got, &len, &err), KMS_ETOOFEW);
    assert_string_equal(err.msg, "need 3 shares, got 2");
    assert_int_equal(kms_shamir_combine(sh, 0, 3, got, &len, &err), KMS_ETOOFEW);

    memcpy(bad, sh, sizeof(bad));
    bad[0].index = 0; /* index 0 would be the secret itself */
    kms_err_clear(&err);
    assert_int_equal(kms_shamir_combine(bad, 3, 3, got, &len, &err), KMS_EFORMAT);

    memcpy(bad, sh, sizeof(bad));
    bad[0].len = 200;
    assert_int_equal(kms_shamir_combine(bad, 3, 3, got, &len, &err), KMS_EFORMAT);
    assert_int_equal(kms_shamir_combine(sh, 3, 0, got, &len, &err), KMS_EINVAL);
    assert_int_equal(len, 99); /* untouched on error */
}

static void test_shamir_corrupted_share(void **state)
{
    struct kms_share sh[3], bad[3];
    uint8_t secret[48], got[64];
    size_t len;
    (void)state;
    rnd(secret, sizeof(secret));
    assert_int_equal(kms_shamir_split(secret, 48, 3, 2, false, sh, NULL), 0);
    /* Every single-bit flip of a share's bytes (index, len, each y byte). */
    for (size_t off = 0; off < offsetof(struct kms_share, y) + 48; off++) {
        for (int bit = 0; bit < 8; bit++) {
            memcpy(bad, sh, sizeof(bad));
            ((uint8_t *)&bad[1])[off] ^= (uint8_t)(1u << bit);
            int rc = kms_shamir_combine(bad, 2, 2, got, &len, NULL);
            if (rc == 0) {
                assert_true(len != 48 || memcmp(got, secret, 48) != 0);
            } else {
                assert_true(rc == KMS_EFORMAT || rc == KMS_EDUP);
            }
        }
    }
}

/* ---- share text ------------------------------------------------------------ */

static void test_share_text_round_trip(void **state)
{
    struct kms_share sh[5], back;
    uint8_t secret[64];
    char text[KMS_SHARE_TEXT_MAX], padded[KMS_SHARE_TEXT_MAX + 16];
    struct kms_err err;
    (void)state;
    for (size_t slen = 16; slen <= 64; slen += 16) {
        rnd(secret, slen);
        assert_int_equal(kms_shamir_split(secret, slen, 5, 3, false, sh, NULL), 0);
        for (int i = 0; i < 5; i++) {
            kms_err_clear(&err);
            assert_int_equal(kms_share_format(&sh[i], text, sizeof(text), &err), 0);
            assert_int_equal(strlen(text), 5 + 3 + 1 + 2 * slen + 1 + 8);
            char want[16];
            snprintf(want, sizeof(want), "kms1-%03d-", i + 1);
            assert_memory_equal(text, want, 9);
            assert_int_equal(kms_share_parse(text, &back, &err), 0);
            assert_int_equal(back.index, sh[i].index);
            assert_int_equal(back.len, sh[i].len);
            assert_memory_equal(back.y, sh[i].y, slen);
            /* Surrounding whitespace and upper case are fine. */
            snprintf(padded, sizeof(padded), " \t%s\r\n", text);
            for (char *c = padded; *c; c++) {
                if (*c >= 'a' && *c <= 'z') {
                    *c = (char)(*c - 'a' + 'A');
                }
            }
            memset(&back, 0, sizeof(back));
            assert_int_equal(kms_share_parse(padded, &back, &err), 0);
            assert_memory_equal(back.y, sh[i].y, slen);
        }
    }
    /* Too small a buffer. */
    assert_int_equal(kms_share_format(&sh[0], text, 20, NULL), KMS_EINVAL);
}

static char lc(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static void test_share_text_every_typo_caught(void **state)
{
    struct kms_share sh[2], back;
    uint8_t secret[32];
    char text[KMS_SHARE_TEXT_MAX], typo[KMS_SHARE_TEXT_MAX];
    struct kms_err err;
    size_t checked = 0, checksum = 0;
    (void)state;
    rnd(secret, sizeof(secret));
    assert_int_equal(kms_shamir_split(secret, 32, 2, 2, false, sh, NULL), 0);
    assert_int_equal(kms_share_format(&sh[1], text, sizeof(text), NULL), 0);
    size_t n = strlen(text);
    for (size_t pos = 0; pos < n; pos++) {
        for (int c = 1; c < 256; c++) {
            /* Case changes are the same share, not a typo. */
            if (lc((char)c) == lc(text[pos])) {
                continue;
            }
            memcpy(typo, text, n + 1);
            typo[pos] = (char)c;
            kms_err_clear(&err);
            int rc = kms_share_parse(typo, &back, &err);
            if (rc == 0) {
                fail_msg("typo at %zu (0x%02x) accepted: %s", pos, c, typo);
            }
            assert_true(rc == KMS_ECHECKSUM || rc == KMS_EFORMAT || rc == KMS_EVERSION);
            if (rc == KMS_ECHECKSUM) {
                assert_string_equal(err.msg, "checksum mismatch");
                checksum++;
            }
            checked++;
        }
    }
    /* Hex-for-hex typos in payload, index and checksum are the common case. */
    assert_true(checksum > 0);
    assert_true(checked > 100 * n);
    /* The message the caller builds. */
    memcpy(typo, text, n + 1);
    typo[20] = typo[20] == '0' ? '1' : '0';
    kms_err_clear(&err);
    assert_int_equal(kms_share_parse(typo, &back, &err), KMS_ECHECKSUM);
    kms_err_wrap(&err, KMS_EINVAL, "share %d", 2);
    assert_string_equal(err.msg, "share 2: checksum mismatch");
    /* Wiped on failure. */
    for (size_t i = 0; i < sizeof(back.y); i++) {
        assert_int_equal(back.y[i], 0);
    }
}

static void test_share_text_malformed(void **state)
{
    struct kms_share s;
    (void)state;
    const char *bad[] = {
        "",
        "   ",
        "kms1",
        "kms1-",
        "kms1-001",
        "kms1-001-",
        "kms1-001--00000000",
        "kms1-000-00112233445566778899aabbccddeeff-00000000",
        "kms1-256-00112233445566778899aabbccddeeff-00000000",
        "kms1-01-00112233445566778899aabbccddeeff-00000000",
        "kms1-001-00112233445566778899aabbccddeef-00000000",
        "kms1-001-00112233445566778899aabbccddeeff-0000000",
        "kms1-001-00112233445566778899aabbccddeeff 00000000",
        "kms1-001-0011223344556677 8899aabbccddeeff-00000000",
        "kms1-001-00112233445566778899aabbccddeegg-00000000",
        "xms1-001-00112233445566778899aabbccddeeff-00000000",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = kms_share_parse(bad[i], &s, NULL);
        if (rc != KMS_EFORMAT) {
            fail_msg("'%s': %d", bad[i], rc);
        }
    }
    assert_int_equal(
        kms_share_parse("kms2-001-00112233445566778899aabbccddeeff-00000000", &s, NULL),
        KMS_EVERSION);
    assert_int_equal(
        kms_share_parse("kms1-001-00112233445566778899aabbccddeeff-00000000", &s, NULL),
        KMS_ECHECKSUM);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gf256_all_products),
        cmocka_unit_test(test_gf256_inverses),
        cmocka_unit_test(test_shamir_every_subset),
        cmocka_unit_test(test_shamir_splits_differ),
        cmocka_unit_test(test_shamir_random_1000),
        cmocka_unit_test(test_shamir_split_params),
        cmocka_unit_test(test_shamir_combine_errors),
        cmocka_unit_test(test_shamir_corrupted_share),
        cmocka_unit_test(test_share_text_round_trip),
        cmocka_unit_test(test_share_text_every_typo_caught),
        cmocka_unit_test(test_share_text_malformed),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
