/*
 * Kubernetes KMS v2 DEK-seed wrapping under a term key (kms_k8s_wrap.h).
 */
#include "crypto_internal.h"
#include "kms_k8s_wrap.h"

#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>

#define K8S_LABEL "kmsd/k8s-kms-v2/v1"
#define K8S_LABEL_LEN (sizeof(K8S_LABEL) - 1)
#define K8S_HDR_LEN 5
#define K8S_AAD_LEN (K8S_LABEL_LEN + KMS_CLUSTER_ID_LEN + K8S_HDR_LEN)

void kms_k8s_key_id(const uint8_t cluster_id[16], uint32_t term, char out[KMS_K8S_KEY_ID_MAX])
{
    static const char hex[] = "0123456789abcdef";
    char cid[2 * KMS_CLUSTER_ID_LEN + 1];

    for (size_t i = 0; i < KMS_CLUSTER_ID_LEN; i++) {
        cid[2 * i] = hex[cluster_id[i] >> 4];
        cid[2 * i + 1] = hex[cluster_id[i] & 0xf];
    }
    cid[sizeof(cid) - 1] = '\0';
    snprintf(out, KMS_K8S_KEY_ID_MAX, "kmsd-%s-t%u", cid, (unsigned)term);
}

void kms_k8s_active_key_id(const struct kms_keyring *kr, char out[KMS_K8S_KEY_ID_MAX])
{
    kms_k8s_key_id(kr->cluster_id, kr->active_term, out);
}

static void put_u32be(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* K = HKDF(term key, cluster id, label || u32be(term)); aad built from hdr. */
static int derive(const struct kms_keyring *kr, const uint8_t *term_key, const uint8_t *hdr,
                  uint8_t key[32], uint8_t aad[K8S_AAD_LEN], struct kms_err *err)
{
    uint8_t info[K8S_LABEL_LEN + 4];

    memcpy(info, K8S_LABEL, K8S_LABEL_LEN);
    memcpy(info + K8S_LABEL_LEN, hdr + 1, 4);
    memcpy(aad, K8S_LABEL, K8S_LABEL_LEN);
    memcpy(aad + K8S_LABEL_LEN, kr->cluster_id, KMS_CLUSTER_ID_LEN);
    memcpy(aad + K8S_LABEL_LEN + KMS_CLUSTER_ID_LEN, hdr, K8S_HDR_LEN);
    return kms_hkdf_sha256(term_key, KMS_TERM_KEY_LEN, kr->cluster_id, KMS_CLUSTER_ID_LEN, info,
                           sizeof(info), key, KMS_AEAD_KEY_LEN, err);
}

int kms_k8s_wrap(const struct kms_keyring *kr, const uint8_t *pt, size_t ptlen, uint8_t *ct,
                 size_t *ctlen, uint32_t *term, struct kms_err *err)
{
    uint8_t key[KMS_AEAD_KEY_LEN], aad[K8S_AAD_LEN];
    const uint8_t *tk;
    int rc;

    if (kr == NULL || pt == NULL || ct == NULL || ctlen == NULL || term == NULL) {
        return kms_err_set(err, KMS_EINVAL, "k8s wrap: invalid argument");
    }
    if (ptlen == 0 || ptlen > KMS_K8S_MAX_PLAINTEXT) {
        return kms_err_set(err, KMS_EINVAL, "k8s wrap: plaintext must be 1..%d bytes, got %zu",
                           KMS_K8S_MAX_PLAINTEXT, ptlen);
    }
    if ((tk = kms_keyring_term_key(kr, kr->active_term)) == NULL) {
        return kms_err_set(err, KMS_ENOTFOUND, "k8s wrap: active term %u missing",
                           kr->active_term);
    }
    ct[0] = KMS_K8S_WRAP_VERSION;
    put_u32be(ct + 1, kr->active_term);
    if ((rc = derive(kr, tk, ct, key, aad, err)) != 0 ||
        (rc = kms_aead_seal_framed(key, aad, sizeof(aad), pt, ptlen, ct + K8S_HDR_LEN, err)) != 0) {
        rc = kms_err_wrap(err, rc, "k8s wrap");
        goto out;
    }
    *ctlen = ptlen + KMS_K8S_WRAP_OVERHEAD;
    *term = kr->active_term;
    rc = 0;
out:
    OPENSSL_cleanse(key, sizeof(key));
    return rc;
}

int kms_k8s_unwrap(const struct kms_keyring *kr, const uint8_t *ct, size_t ctlen, uint8_t *pt,
                   size_t *ptlen, uint32_t *term, struct kms_err *err)
{
    uint8_t key[KMS_AEAD_KEY_LEN], aad[K8S_AAD_LEN];
    const uint8_t *tk;
    uint32_t t;
    int rc;

    if (kr == NULL || ct == NULL || pt == NULL || ptlen == NULL || term == NULL) {
        return kms_err_set(err, KMS_EINVAL, "k8s unwrap: invalid argument");
    }
    if (ctlen <= KMS_K8S_WRAP_OVERHEAD || ctlen > KMS_K8S_MAX_CIPHERTEXT) {
        return kms_err_set(err, KMS_EFORMAT, "k8s unwrap: ciphertext must be %d..%d bytes, got %zu",
                           KMS_K8S_WRAP_OVERHEAD + 1, KMS_K8S_MAX_CIPHERTEXT, ctlen);
    }
    if (ct[0] != KMS_K8S_WRAP_VERSION) {
        return kms_err_set(err, KMS_EVERSION, "k8s unwrap: ciphertext version %u (want %u)",
                           ct[0], KMS_K8S_WRAP_VERSION);
    }
    t = ((uint32_t)ct[1] << 24) | ((uint32_t)ct[2] << 16) | ((uint32_t)ct[3] << 8) | ct[4];
    if ((tk = kms_keyring_term_key(kr, t)) == NULL) {
        return kms_err_set(err, KMS_ENOTFOUND, "k8s unwrap: term %u is not in this keyring "
                           "(active %u)", t, kr->active_term);
    }
    if ((rc = derive(kr, tk, ct, key, aad, err)) != 0 ||
        (rc = kms_aead_open_framed(key, aad, sizeof(aad), ct + K8S_HDR_LEN, ctlen - K8S_HDR_LEN,
                                   pt, err)) != 0) {
        rc = kms_err_wrap(err, rc, "k8s unwrap (term %u)", t);
        goto out;
    }
    *ptlen = ctlen - KMS_K8S_WRAP_OVERHEAD;
    *term = t;
    rc = 0;
out:
    OPENSSL_cleanse(key, sizeof(key));
    return rc;
}
