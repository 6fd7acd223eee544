/*
 * AES-256-GCM and HKDF-SHA256 through OpenSSL 3 EVP. Nothing here allocates
 * memory that the caller owns; EVP contexts are freed (and thereby cleansed
 * by OpenSSL) before returning.
 */
#include "kms_crypto.h"

#include <limits.h>
#include <pthread.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

/* OpenSSL takes int lengths. */
static bool len_ok(size_t n)
{
    return n <= (size_t)INT_MAX - KMS_AEAD_TAG_LEN;
}

int kms_aead_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aadlen, const uint8_t *pt, size_t ptlen, uint8_t *ct,
                  struct kms_err *err)
{
    EVP_CIPHER_CTX *ctx = NULL;
    int outl = 0;
    int rc;

    if (key == NULL || nonce == NULL || ct == NULL || (aad == NULL && aadlen > 0) ||
        (pt == NULL && ptlen > 0) || !len_ok(aadlen) || !len_ok(ptlen)) {
        rc = kms_err_set(err, KMS_EINVAL, "aead seal: invalid argument");
        goto out;
    }
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "aead seal: out of memory");
        goto out;
    }
    /* 12-byte IV is GCM's default length, no EVP_CTRL_GCM_SET_IVLEN needed. */
    if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, nonce) != 1 ||
        (aadlen > 0 && EVP_EncryptUpdate(ctx, NULL, &outl, aad, (int)aadlen) != 1) ||
        (ptlen > 0 && EVP_EncryptUpdate(ctx, ct, &outl, pt, (int)ptlen) != 1) ||
        EVP_EncryptFinal_ex(ctx, ct + ptlen, &outl) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, KMS_AEAD_TAG_LEN, ct + ptlen) != 1) {
        OPENSSL_cleanse(ct, ptlen + KMS_AEAD_TAG_LEN);
        rc = kms_err_set(err, KMS_ECRYPTO, "aead seal: AES-256-GCM failed");
        goto out;
    }
    rc = 0;
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int kms_aead_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad,
                  size_t aadlen, const uint8_t *ct, size_t ctlen, uint8_t *pt,
                  struct kms_err *err)
{
    EVP_CIPHER_CTX *ctx = NULL;
    uint8_t tag[KMS_AEAD_TAG_LEN];
    size_t ptlen;
    int outl = 0;
    int rc;

    if (key == NULL || nonce == NULL || ct == NULL || (aad == NULL && aadlen > 0) ||
        ctlen < KMS_AEAD_TAG_LEN || (pt == NULL && ctlen > KMS_AEAD_TAG_LEN) ||
        !len_ok(aadlen) || !len_ok(ctlen)) {
        rc = kms_err_set(err, KMS_EINVAL, "aead open: invalid argument");
        goto out;
    }
    ptlen = ctlen - KMS_AEAD_TAG_LEN;
    /* Copy the tag first: with pt == ct decryption overwrites nothing past
     * ptlen, but keep it independent of that detail. */
    memcpy(tag, ct + ptlen, sizeof(tag));
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "aead open: out of memory");
        goto out;
    }
    if (EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, nonce) != 1 ||
        (aadlen > 0 && EVP_DecryptUpdate(ctx, NULL, &outl, aad, (int)aadlen) != 1) ||
        (ptlen > 0 && EVP_DecryptUpdate(ctx, pt, &outl, ct, (int)ptlen) != 1) ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, KMS_AEAD_TAG_LEN, tag) != 1) {
        rc = kms_err_set(err, KMS_ECRYPTO, "aead open: AES-256-GCM failed");
        goto wipe;
    }
    /* Final compares the tag (constant time inside OpenSSL). */
    if (EVP_DecryptFinal_ex(ctx, pt != NULL ? pt + ptlen : tag, &outl) != 1) {
        rc = kms_err_set(err, KMS_EAUTH, "authentication failed");
        goto wipe;
    }
    rc = 0;
    goto out;
wipe:
    /* Unauthenticated plaintext must never reach the caller. */
    if (pt != NULL) {
        OPENSSL_cleanse(pt, ptlen);
    }
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int kms_aead_seal_framed(const uint8_t key[32], const uint8_t *aad, size_t aadlen,
                         const uint8_t *pt, size_t ptlen, uint8_t *out, struct kms_err *err)
{
    int rc;

    if (out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "aead seal: invalid argument");
    }
    if ((rc = kms_rand_bytes(out, KMS_AEAD_NONCE_LEN, err)) != 0) {
        return rc;
    }
    return kms_aead_seal(key, out, aad, aadlen, pt, ptlen, out + KMS_AEAD_NONCE_LEN, err);
}

int kms_aead_open_framed(const uint8_t key[32], const uint8_t *aad, size_t aadlen,
                         const uint8_t *in, size_t inlen, uint8_t *pt, struct kms_err *err)
{
    if (in == NULL || inlen < KMS_AEAD_NONCE_LEN + KMS_AEAD_TAG_LEN) {
        return kms_err_set(err, KMS_EINVAL, "aead open: invalid argument");
    }
    return kms_aead_open(key, in, aad, aadlen, in + KMS_AEAD_NONCE_LEN, inlen - KMS_AEAD_NONCE_LEN,
                         pt, err);
}

/* The HKDF implementation is fetched once and shared: EVP_KDF objects are
 * reference counted and safe to use from many threads. It is never freed
 * (one object for the life of the process). */
static pthread_once_t hkdf_once = PTHREAD_ONCE_INIT;
static EVP_KDF *hkdf_impl;

static void hkdf_fetch(void)
{
    hkdf_impl = EVP_KDF_fetch(NULL, OSSL_KDF_NAME_HKDF, NULL);
}

int kms_hkdf_sha256(const uint8_t *ikm, size_t ikmlen, const uint8_t *salt, size_t saltlen,
                    const uint8_t *info, size_t infolen, uint8_t *out, size_t outlen,
                    struct kms_err *err)
{
    EVP_KDF_CTX *kctx = NULL;
    OSSL_PARAM params[5];
    size_t np = 0;
    int rc;

    if (ikm == NULL || ikmlen == 0 || out == NULL || outlen == 0 || outlen > 255 * 32 ||
        (salt == NULL && saltlen > 0) || (info == NULL && infolen > 0)) {
        rc = kms_err_set(err, KMS_EINVAL, "hkdf: invalid argument");
        goto out;
    }
    if (pthread_once(&hkdf_once, hkdf_fetch) != 0 || hkdf_impl == NULL) {
        rc = kms_err_set(err, KMS_ECRYPTO, "hkdf: HKDF not available");
        goto out;
    }
    kctx = EVP_KDF_CTX_new(hkdf_impl);
    if (kctx == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "hkdf: out of memory");
        goto out;
    }
    /* OSSL_PARAM wants non-const pointers; OpenSSL only reads them. An empty
     * salt is left out: HKDF then uses HashLen zero bytes, which is what
     * RFC 5869 specifies for "not provided". */
    params[np++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
    params[np++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikmlen);
    if (saltlen > 0) {
        params[np++] =
            OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, saltlen);
    }
    if (infolen > 0) {
        params[np++] =
            OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, infolen);
    }
    params[np] = OSSL_PARAM_construct_end();
    if (EVP_KDF_derive(kctx, out, outlen, params) != 1) {
        OPENSSL_cleanse(out, outlen);
        rc = kms_err_set(err, KMS_ECRYPTO, "hkdf: derive failed");
        goto out;
    }
    rc = 0;
out:
    EVP_KDF_CTX_free(kctx);
    return rc;
}
