/*
 * PKCS#11 seal (src/crypto/pkcs11.c) against a real SoftHSM2 token: each
 * run makes its own token directory and softhsm2.conf (SOFTHSM2_CONF) and
 * initialises a token with softhsm2-util. Skipped (77) when SoftHSM2 is not
 * installed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kms_crypto.h"
#include "kms_pkcs11.h"

static const char *const modules[] = {"/usr/lib/softhsm/libsofthsm2.so",
                                      "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so", NULL};
static const char *module;
static char dir[] = "/tmp/kmsd-p11-unit-XXXXXX";
static char tokdir[256], tokaway[256];

#define TOKEN "kmsd-unit"
#define PIN "1234"

__attribute__((format(printf, 1, 2))) static int sh(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd);
}

static struct kms_p11 *open_p11(const char *token, const char *key, const char *pin)
{
    struct kms_p11_params pp = {module, token, key, pin};
    struct kms_p11 *p = NULL;
    struct kms_err err;
    kms_err_clear(&err);
    assert_int_equal(kms_p11_open(&pp, &p, &err), 0);
    return p;
}

static const uint8_t cid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static void roundtrip(unsigned mech, const char *key)
{
    struct kms_p11 *p = open_p11(TOKEN, key, PIN);
    Kmsd__V1__HsmWrap *w = NULL;
    uint8_t root[32], back[32];
    struct kms_err err;
    bool found = true;
    unsigned m = 0;

    kms_err_clear(&err);
    for (int i = 0; i < 32; i++) {
        root[i] = (uint8_t)(i * 7 + 3);
    }
    assert_int_equal(kms_p11_check(p, &found, &m, &err), 0);
    assert_false(found);
    assert_int_equal(m, KMS_P11_MECH_GCM); /* SoftHSM 2.6 offers GCM */
    /* Without create_key a missing key is a clear error. */
    assert_int_equal(kms_p11_wrap(p, cid, root, false, mech, &w, &err), KMS_ENOTFOUND);
    assert_non_null(strstr(err.msg, key));
    assert_int_equal(kms_p11_wrap(p, cid, root, true, mech, &w, &err), 0);
    assert_int_equal(w->mechanism, mech);
    assert_int_equal(w->ciphertext.len, mech == KMS_P11_MECH_GCM ? 48 : 40);
    assert_int_equal(kms_p11_check(p, &found, NULL, &err), 0);
    assert_true(found);
    memset(back, 0, sizeof(back));
    assert_int_equal(kms_p11_unwrap(p, w, cid, back, &err), 0);
    assert_memory_equal(root, back, 32);
    /* A second wrap reuses the key (create_key false now works). */
    {
        Kmsd__V1__HsmWrap *w2 = NULL;
        assert_int_equal(kms_p11_wrap(p, cid, root, false, mech, &w2, &err), 0);
        assert_int_equal(kms_p11_unwrap(p, w2, cid, back, &err), 0);
        assert_memory_equal(root, back, 32);
        kmsd__v1__hsm_wrap__free_unpacked(w2, NULL);
    }
    /* Tampered ciphertext: authentication fails, output wiped. */
    w->ciphertext.data[3] ^= 1;
    assert_int_equal(kms_p11_unwrap(p, w, cid, back, &err), KMS_EAUTH);
    w->ciphertext.data[3] ^= 1;
    if (mech == KMS_P11_MECH_GCM) {
        uint8_t other[16];
        memcpy(other, cid, 16);
        other[0] ^= 0x80;
        /* GCM binds the cluster id. */
        assert_int_equal(kms_p11_unwrap(p, w, other, back, &err), KMS_EAUTH);
    }
    kmsd__v1__hsm_wrap__free_unpacked(w, NULL);
    kms_p11_close(p);
}

static void test_gcm_roundtrip(void **state)
{
    (void)state;
    roundtrip(KMS_P11_MECH_GCM, "wrap-gcm");
}

static void test_kwp_roundtrip(void **state)
{
    (void)state;
    roundtrip(KMS_P11_MECH_KWP, "wrap-kwp");
}

static void test_wrong_pin(void **state)
{
    struct kms_p11 *p = open_p11(TOKEN, "wrap-gcm", "9999");
    struct kms_err err;
    bool found;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_p11_check(p, &found, NULL, &err), KMS_EDENIED);
    assert_non_null(strstr(err.msg, "wrong PIN"));
    assert_null(strstr(err.msg, "9999"));
    kms_p11_close(p);
}

static void test_missing_token_and_key(void **state)
{
    struct kms_p11 *p = open_p11("no-such-token", "k", PIN);
    struct kms_err err;
    Kmsd__V1__HsmWrap w = KMSD__V1__HSM_WRAP__INIT;
    uint8_t iv[12] = {0}, ct[48] = {0}, root[32];
    bool found;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_p11_check(p, &found, NULL, &err), KMS_EUNAVAIL);
    assert_non_null(strstr(err.msg, "no-such-token"));
    kms_p11_close(p);
    p = open_p11(TOKEN, "never-created", PIN);
    w.version = 1;
    w.mechanism = KMS_P11_MECH_GCM;
    w.iv.data = iv;
    w.iv.len = 12;
    w.ciphertext.data = ct;
    w.ciphertext.len = 48;
    assert_int_equal(kms_p11_unwrap(p, &w, cid, root, &err), KMS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "never-created"));
    w.ciphertext.len = 47;
    assert_int_equal(kms_p11_unwrap(p, &w, cid, root, &err), KMS_EFORMAT);
    kms_p11_close(p);
}

static void test_bad_module(void **state)
{
    struct kms_p11_params pp = {"/nonexistent/libp11.so", TOKEN, "k", PIN};
    struct kms_p11 *p = NULL;
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_p11_open(&pp, &p, &err), KMS_EIO);
    assert_null(p);
    pp.module = "/lib/x86_64-linux-gnu/libc.so.6";
    assert_int_equal(kms_p11_open(&pp, &p, &err), KMS_EIO);
    assert_non_null(strstr(err.msg, "C_GetFunctionList"));
}

/* The token directory moved away and back: each call re-initialises the
 * module, so the token is found again without reopening anything. */
static void test_token_away_and_back(void **state)
{
    struct kms_p11 *p = open_p11(TOKEN, "wrap-gcm", PIN);
    struct kms_err err;
    bool found = false;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_p11_check(p, &found, NULL, &err), 0);
    assert_true(found);
    assert_int_equal(rename(tokdir, tokaway), 0);
    assert_int_equal(mkdir(tokdir, 0700), 0);
    assert_int_equal(kms_p11_check(p, &found, NULL, &err), KMS_EUNAVAIL);
    assert_int_equal(rmdir(tokdir), 0);
    assert_int_equal(rename(tokaway, tokdir), 0);
    assert_int_equal(kms_p11_check(p, &found, NULL, &err), 0);
    assert_true(found);
    kms_p11_close(p);
}

static void test_pin_file(void **state)
{
    char path[300], pin[KMS_P11_PIN_MAX];
    struct kms_err err;
    FILE *f;
    (void)state;
    kms_err_clear(&err);
    snprintf(path, sizeof(path), "%s/pin", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("s3cret\n", f);
    fclose(f);
    assert_int_equal(kms_p11_pin_read(path, pin, &err), 0);
    assert_string_equal(pin, "s3cret");
    f = fopen(path, "w");
    fclose(f);
    assert_int_equal(kms_p11_pin_read(path, pin, &err), KMS_EFORMAT);
    assert_int_equal(kms_p11_pin_read("/nonexistent/pin", pin, &err), KMS_EIO);
}

int main(void)
{
    char conf[300];
    FILE *f;
    int rc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gcm_roundtrip),     cmocka_unit_test(test_kwp_roundtrip),
        cmocka_unit_test(test_wrong_pin),         cmocka_unit_test(test_missing_token_and_key),
        cmocka_unit_test(test_bad_module),        cmocka_unit_test(test_token_away_and_back),
        cmocka_unit_test(test_pin_file),
    };

    for (int i = 0; modules[i] != NULL && module == NULL; i++) {
        if (access(modules[i], R_OK) == 0) {
            module = modules[i];
        }
    }
    if (module == NULL || access("/usr/bin/softhsm2-util", X_OK) != 0) {
        fprintf(stderr, "SKIP: SoftHSM2 not installed (apt-get install softhsm2)\n");
        return 77;
    }
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(tokdir, sizeof(tokdir), "%s/tokens", dir);
    snprintf(tokaway, sizeof(tokaway), "%s/tokens.away", dir);
    snprintf(conf, sizeof(conf), "%s/softhsm2.conf", dir);
    if (mkdir(tokdir, 0700) != 0 || (f = fopen(conf, "w")) == NULL) {
        perror("setup");
        return 1;
    }
    fprintf(f, "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
               "slots.removable = false\n", tokdir);
    fclose(f);
    setenv("SOFTHSM2_CONF", conf, 1);
    if (sh("softhsm2-util --init-token --free --label %s --pin %s --so-pin 5678 >/dev/null",
           TOKEN, PIN) != 0) {
        fprintf(stderr, "softhsm2-util --init-token failed\n");
        return 1;
    }
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    sh("rm -rf %s", dir);
    return rc;
}
