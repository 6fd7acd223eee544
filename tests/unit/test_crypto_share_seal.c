/* Key shares encrypted to their holders (kms_share_seal.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include "kms_crypto.h"
#include "kms_share_seal.h"

static char *bio_text(BIO *b)
{
    char *data = NULL;
    long n = BIO_get_mem_data(b, &data);
    char *s = malloc((size_t)n + 1);
    assert_non_null(s);
    memcpy(s, data, (size_t)n);
    s[n] = '\0';
    return s;
}

static void keypair(int bits, const char *type, char **pub, char **priv)
{
    EVP_PKEY *k = strcmp(type, "RSA") == 0 ? EVP_RSA_gen((unsigned)bits)
                                           : EVP_PKEY_Q_keygen(NULL, NULL, type);
    BIO *b1 = BIO_new(BIO_s_mem()), *b2 = BIO_new(BIO_s_mem());
    assert_non_null(k);
    assert_int_equal(PEM_write_bio_PUBKEY(b1, k), 1);
    assert_int_equal(PEM_write_bio_PrivateKey(b2, k, NULL, NULL, 0, NULL, NULL), 1);
    *pub = bio_text(b1);
    *priv = bio_text(b2);
    BIO_free(b1);
    BIO_free(b2);
    EVP_PKEY_free(k);
}

static void test_round_trip_and_refusals(void **state)
{
    char *pub1, *priv1, *pub2, *priv2, *pubs, *privs, *pubx, *privx;
    char *enc = NULL, *enc2 = NULL, out[KMS_SHARE_TEXT_MAX];
    const char *share = "kms1-001-00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff-"
                        "01234567";
    struct kms_err err;
    (void)state;

    keypair(2048, "RSA", &pub1, &priv1);
    keypair(3072, "RSA", &pub2, &priv2);
    keypair(1024, "RSA", &pubs, &privs);
    keypair(0, "X25519", &pubx, &privx);
    kms_err_clear(&err);
    assert_int_equal(kms_share_recipient_check(pub1, &err), 0);
    assert_int_equal(kms_share_recipient_check(pub2, &err), 0);
    assert_int_equal(kms_share_recipient_check(pubs, &err), KMS_EFORMAT);
    assert_non_null(strstr(err.msg, "1024 bits"));
    assert_int_equal(kms_share_recipient_check(pubx, &err), KMS_EFORMAT);
    assert_non_null(strstr(err.msg, "only RSA"));
    assert_int_equal(kms_share_recipient_check("garbage", &err), KMS_EFORMAT);
    assert_int_equal(kms_share_recipient_check(priv1, &err), KMS_EFORMAT);

    assert_int_equal(kms_share_seal_to(pub1, share, &enc, &err), 0);
    assert_int_equal(strncmp(enc, KMS_SHARE_SEAL_PREFIX, 8), 0);
    assert_null(strstr(enc, "00112233")); /* the share is not in the clear */
    assert_int_equal(kms_share_seal_to(pub1, share, &enc2, &err), 0);
    assert_string_not_equal(enc, enc2); /* OAEP is randomised */
    assert_int_equal(kms_share_open_with(priv1, enc, out, sizeof(out), &err), 0);
    assert_string_equal(out, share);
    assert_int_equal(kms_share_open_with(priv1, enc2, out, sizeof(out), &err), 0);
    assert_string_equal(out, share);
    /* another holder's key */
    assert_int_equal(kms_share_open_with(priv2, enc, out, sizeof(out), &err), KMS_EAUTH);
    assert_int_equal(out[0], '\0');
    /* not a key, not an encrypted share, altered, truncated */
    assert_int_equal(kms_share_open_with("nope", enc, out, sizeof(out), &err), KMS_EFORMAT);
    assert_int_equal(kms_share_open_with(priv1, share, out, sizeof(out), &err), KMS_EFORMAT);
    assert_int_equal(kms_share_open_with(priv1, "kmsenc1-", out, sizeof(out), &err),
                     KMS_EFORMAT);
    assert_int_equal(kms_share_open_with(priv1, "kmsenc1-!!!!", out, sizeof(out), &err),
                     KMS_EFORMAT);
    enc[20] = enc[20] == 'A' ? 'B' : 'A';
    assert_int_equal(kms_share_open_with(priv1, enc, out, sizeof(out), &err), KMS_EAUTH);
    enc2[strlen(enc2) - 8] = '\0';
    assert_int_not_equal(kms_share_open_with(priv1, enc2, out, sizeof(out), &err), 0);
    /* too small an output buffer */
    free(enc);
    assert_int_equal(kms_share_seal_to(pub1, share, &enc, &err), 0);
    assert_int_equal(kms_share_open_with(priv1, enc, out, 10, &err), KMS_EFORMAT);
    /* sealing to a bad key */
    free(enc2);
    enc2 = NULL;
    assert_int_equal(kms_share_seal_to(pubs, share, &enc2, &err), KMS_EFORMAT);
    assert_null(enc2);
    free(enc);
    free(pub1);
    free(priv1);
    free(pub2);
    free(priv2);
    free(pubs);
    free(privs);
    free(pubx);
    free(privx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_and_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
