/* Key shares encrypted to their holders (kms_share_seal.h). */
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include "kms_crypto.h"
#include "kms_share_seal.h"

static EVP_PKEY *pem_public(const char *pem)
{
    BIO *b = pem != NULL ? BIO_new_mem_buf(pem, -1) : NULL;
    EVP_PKEY *k = b != NULL ? PEM_read_bio_PUBKEY(b, NULL, NULL, NULL) : NULL;
    BIO_free(b);
    return k;
}

static int key_usable(EVP_PKEY *k, struct kms_err *err)
{
    if (k == NULL) {
        return kms_err_set(err, KMS_EFORMAT, "not a PEM public key (-----BEGIN PUBLIC KEY-----)");
    }
    if (EVP_PKEY_get_base_id(k) != EVP_PKEY_RSA) {
        return kms_err_set(err, KMS_EFORMAT, "only RSA public keys are supported (RSA-OAEP)");
    }
    if (EVP_PKEY_get_bits(k) < KMS_SHARE_SEAL_MIN_BITS || EVP_PKEY_get_bits(k) > 8192) {
        return kms_err_set(err, KMS_EFORMAT, "RSA key of %d bits: %d to 8192 required",
                           EVP_PKEY_get_bits(k), KMS_SHARE_SEAL_MIN_BITS);
    }
    return 0;
}

int kms_share_recipient_check(const char *pem, struct kms_err *err)
{
    EVP_PKEY *k = pem_public(pem);
    int rc = key_usable(k, err);
    EVP_PKEY_free(k);
    return rc;
}

static int oaep_ctx(EVP_PKEY *k, bool enc, EVP_PKEY_CTX **out, struct kms_err *err)
{
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, k, NULL);
    if (c == NULL || (enc ? EVP_PKEY_encrypt_init(c) : EVP_PKEY_decrypt_init(c)) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_oaep_md(c, EVP_sha256()) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(c, EVP_sha256()) != 1) {
        EVP_PKEY_CTX_free(c);
        return kms_err_set(err, KMS_ECRYPTO, "RSA-OAEP setup failed");
    }
    *out = c;
    return 0;
}

int kms_share_seal_to(const char *pem, const char *share, char **out, struct kms_err *err)
{
    EVP_PKEY *k = pem_public(pem);
    EVP_PKEY_CTX *c = NULL;
    unsigned char *ct = NULL;
    char *txt = NULL;
    size_t ctlen = 0, plen = strlen(KMS_SHARE_SEAL_PREFIX);
    int rc;

    *out = NULL;
    if ((rc = key_usable(k, err)) != 0 || (rc = oaep_ctx(k, true, &c, err)) != 0) {
        goto out;
    }
    if (EVP_PKEY_encrypt(c, NULL, &ctlen, (const unsigned char *)share, strlen(share)) != 1 ||
        (ct = malloc(ctlen)) == NULL ||
        EVP_PKEY_encrypt(c, ct, &ctlen, (const unsigned char *)share, strlen(share)) != 1) {
        rc = kms_err_set(err, KMS_ECRYPTO, "RSA-OAEP encryption failed");
        goto out;
    }
    txt = malloc(plen + 4 * ((ctlen + 2) / 3) + 1);
    if (txt == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    memcpy(txt, KMS_SHARE_SEAL_PREFIX, plen);
    EVP_EncodeBlock((unsigned char *)txt + plen, ct, (int)ctlen);
    *out = txt;
    rc = 0;
out:
    free(ct);
    EVP_PKEY_CTX_free(c);
    EVP_PKEY_free(k);
    return rc;
}

int kms_share_open_with(const char *key_pem, const char *enc, char *out, size_t cap,
                        struct kms_err *err)
{
    size_t plen = strlen(KMS_SHARE_SEAL_PREFIX), elen, ptlen = 0;
    BIO *b = NULL;
    EVP_PKEY *k = NULL;
    EVP_PKEY_CTX *c = NULL;
    unsigned char *ct = NULL, *pt = NULL;
    int ctlen, rc;

    if (enc == NULL || strncmp(enc, KMS_SHARE_SEAL_PREFIX, plen) != 0) {
        rc = kms_err_set(err, KMS_EFORMAT, "not an encrypted key share (%s...)",
                         KMS_SHARE_SEAL_PREFIX);
        goto out;
    }
    enc += plen;
    elen = strlen(enc);
    if (elen == 0 || elen % 4 != 0 || elen > KMS_SHARE_SEAL_MAX_TEXT) {
        rc = kms_err_set(err, KMS_EFORMAT, "encrypted key share: bad base64 length %zu", elen);
        goto out;
    }
    ct = malloc(elen / 4 * 3);
    if (ct == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    ctlen = EVP_DecodeBlock(ct, (const unsigned char *)enc, (int)elen);
    if (ctlen < 0) {
        rc = kms_err_set(err, KMS_EFORMAT, "encrypted key share: not base64");
        goto out;
    }
    while (elen > 0 && enc[elen - 1] == '=') { /* DecodeBlock keeps the padding bytes */
        ctlen--;
        elen--;
    }
    b = BIO_new_mem_buf(key_pem, -1);
    k = b != NULL ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    if (k == NULL || EVP_PKEY_get_base_id(k) != EVP_PKEY_RSA) {
        rc = kms_err_set(err, KMS_EFORMAT,
                         "share key: not an unencrypted PEM RSA private key");
        goto out;
    }
    if ((rc = oaep_ctx(k, false, &c, err)) != 0) {
        goto out;
    }
    if (EVP_PKEY_decrypt(c, NULL, &ptlen, ct, (size_t)ctlen) != 1 ||
        (pt = kms_secmem_alloc(ptlen + 1)) == NULL ||
        EVP_PKEY_decrypt(c, pt, &ptlen, ct, (size_t)ctlen) != 1) {
        rc = kms_err_set(err, KMS_EAUTH,
                         "this key cannot decrypt the share (encrypted to another holder?)");
        goto out;
    }
    if (ptlen + 1 > cap || memchr(pt, '\0', ptlen) != NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "decrypted share is not a share text");
        goto out;
    }
    memcpy(out, pt, ptlen);
    out[ptlen] = '\0';
    rc = 0;
out:
    if (rc != 0 && out != NULL && cap > 0) {
        OPENSSL_cleanse(out, cap);
    }
    if (pt != NULL) {
        kms_secmem_free(pt, ptlen + 1);
    }
    free(ct);
    EVP_PKEY_CTX_free(c);
    EVP_PKEY_free(k);
    BIO_free(b);
    return rc;
}
