/* The pure parts of a rekey (kms_rekey.h). */
#include <string.h>

#include <openssl/crypto.h>

#include "kms_rekey.h"

static const char wrap_info[] = "kmsd/rekey-wrap/v1";
static const char wrap_aad[] = "kmsd/rekey-root";

static void wrap_aad_build(const uint8_t cluster_id[16], uint8_t *aad, size_t *len)
{
    size_t n = sizeof(wrap_aad) - 1;
    memcpy(aad, wrap_aad, n);
    memcpy(aad + n, cluster_id, KMS_CLUSTER_ID_LEN);
    *len = n + KMS_CLUSTER_ID_LEN;
}

/* The key that wraps the new root key: HKDF of the old one. */
static int wrap_kek(const uint8_t old_root[32], uint8_t kek[KMS_AEAD_KEY_LEN],
                    struct kms_err *err)
{
    return kms_hkdf_sha256(old_root, KMS_ROOT_KEY_LEN, NULL, 0, (const uint8_t *)wrap_info,
                           sizeof(wrap_info) - 1, kek, KMS_AEAD_KEY_LEN, err);
}

int kms_rekey_root_wrap(const uint8_t old_root[32], const uint8_t cluster_id[16],
                        const uint8_t new_root[32], uint8_t out[KMS_REKEY_WRAP_LEN],
                        struct kms_err *err)
{
    uint8_t kek[KMS_AEAD_KEY_LEN], aad[64];
    size_t aadlen;
    int rc;

    wrap_aad_build(cluster_id, aad, &aadlen);
    if ((rc = wrap_kek(old_root, kek, err)) != 0 ||
        (rc = kms_aead_seal_framed(kek, aad, aadlen, new_root, KMS_ROOT_KEY_LEN, out, err)) != 0) {
        OPENSSL_cleanse(out, KMS_REKEY_WRAP_LEN);
        kms_err_wrap(err, rc, "rekey: wrap the new root key");
        goto out;
    }
    rc = 0;
out:
    OPENSSL_cleanse(kek, sizeof(kek));
    return rc;
}

int kms_rekey_root_unwrap(const uint8_t old_root[32], const uint8_t cluster_id[16],
                          const uint8_t *wrap, size_t len, uint8_t new_root[32],
                          struct kms_err *err)
{
    uint8_t kek[KMS_AEAD_KEY_LEN], aad[64];
    size_t aadlen;
    int rc;

    if (wrap == NULL || len != KMS_REKEY_WRAP_LEN) {
        rc = kms_err_set(err, KMS_EFORMAT, "rekey: wrapped root key is %zu bytes, expected %d",
                         len, KMS_REKEY_WRAP_LEN);
        goto out;
    }
    wrap_aad_build(cluster_id, aad, &aadlen);
    if ((rc = wrap_kek(old_root, kek, err)) != 0 ||
        (rc = kms_aead_open_framed(kek, aad, aadlen, wrap, len, new_root, err)) != 0) {
        OPENSSL_cleanse(new_root, KMS_ROOT_KEY_LEN);
        kms_err_wrap(err, rc, "rekey: unwrap the new root key");
        goto out;
    }
    rc = 0;
out:
    OPENSSL_cleanse(kek, sizeof(kek));
    return rc;
}

int kms_rekey_params_check(unsigned n, unsigned k, struct kms_err *err)
{
    if (n < 2 || n > KMS_SHAMIR_MAX_SHARES || k < 2 || k > n) {
        return kms_err_set(err, KMS_EINVAL,
                           "key shares and threshold must satisfy 2 <= threshold <= shares "
                           "<= 255 (got %u shares, threshold %u)",
                           n, k);
    }
    return 0;
}

int kms_rekey_session_begin(struct kms_rekey_session *s, unsigned n, unsigned k,
                            int64_t now_ms, uint64_t tag, struct kms_err *err)
{
    uint8_t raw[16];
    int rc;

    if (s->active) {
        return kms_err_set(err, KMS_EEXIST,
                           "a rekey is already in progress (nonce %s): finish it or cancel it "
                           "(kmsctl operator rekey cancel)",
                           s->nonce);
    }
    if ((rc = kms_rekey_params_check(n, k, err)) != 0) {
        return rc;
    }
    if ((rc = kms_rand_bytes(raw, sizeof(raw), err)) != 0 ||
        (rc = kms_hex_encode_ct(raw, sizeof(raw), s->nonce, sizeof(s->nonce), err)) != 0) {
        kms_rekey_session_clear(s);
        return kms_err_wrap(err, rc, "rekey: nonce");
    }
    s->active = true;
    s->new_shares = n;
    s->new_threshold = k;
    s->started_at = now_ms;
    s->tag = tag;
    s->n_given = 0;
    return 0;
}

int kms_rekey_session_add(struct kms_rekey_session *s, const char *nonce, const char *share,
                          unsigned threshold, unsigned *progress, struct kms_err *err)
{
    struct kms_share parsed;
    int rc;

    memset(&parsed, 0, sizeof(parsed));
    *progress = (unsigned)s->n_given;
    if (!s->active) {
        rc = kms_err_set(err, KMS_ENOTFOUND,
                         "no rekey in progress (start one with kmsctl operator rekey init; a "
                         "leader change cancels a rekey)");
        goto out;
    }
    if (nonce == NULL || strlen(nonce) != KMS_REKEY_NONCE_HEX - 1 ||
        strcmp(nonce, s->nonce) != 0) {
        rc = kms_err_set(err, KMS_EINVAL,
                         "wrong rekey nonce: the rekey in progress has another one (see kmsctl "
                         "operator rekey status)");
        goto out;
    }
    if (share == NULL || share[0] == '\0') {
        rc = kms_err_set(err, KMS_EINVAL, "no share given");
        goto out;
    }
    if (s->n_given >= threshold || s->n_given >= KMS_SHAMIR_MAX_SHARES) {
        rc = kms_err_set(err, KMS_ERANGE, "the rekey has %zu shares already", s->n_given);
        goto out;
    }
    rc = kms_share_parse_next(share, s->given, s->n_given, "rekey share", &parsed, err);
    if (rc != 0) {
        goto out;
    }
    s->given[s->n_given++] = parsed;
    *progress = (unsigned)s->n_given;
    rc = 0;
out:
    OPENSSL_cleanse(&parsed, sizeof(parsed));
    return rc;
}

int kms_rekey_session_combine(const struct kms_rekey_session *s, unsigned threshold,
                              uint8_t root[32], struct kms_err *err)
{
    uint8_t secret[KMS_SHAMIR_MAX_SECRET];
    size_t len = 0;
    int rc;

    if (!s->active || threshold == 0 || s->n_given < threshold) {
        rc = kms_err_set(err, KMS_ETOOFEW, "rekey: %zu of %u shares given", s->n_given,
                         threshold);
        goto out;
    }
    if ((rc = kms_shamir_combine(s->given, s->n_given, threshold, secret, &len, err)) != 0) {
        kms_err_wrap(err, rc, "rekey: combine");
        goto out;
    }
    if (len != KMS_ROOT_KEY_LEN) {
        rc = kms_err_set(err, KMS_EFORMAT, "rekey: shares hold a %zu-byte secret, expected 32",
                         len);
        goto out;
    }
    memcpy(root, secret, KMS_ROOT_KEY_LEN);
    rc = 0;
out:
    OPENSSL_cleanse(secret, sizeof(secret));
    return rc;
}

void kms_rekey_session_reset_shares(struct kms_rekey_session *s)
{
    OPENSSL_cleanse(s->given, sizeof(s->given));
    s->n_given = 0;
}

void kms_rekey_session_clear(struct kms_rekey_session *s)
{
    OPENSSL_cleanse(s, sizeof(*s));
}
