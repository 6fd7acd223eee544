/*
 * Rewrap of sealed records and retiring of keyring terms (kmsctl operator
 * rewrap / retire-term; docs/security.md "Rewrap and retire").
 *
 * The blob Talos holds (0x01 || key_id || client_half) never changes, and
 * the KEK that encrypts the passphrase is HKDF(origin term key,
 * client_half, ...): without client_half the server cannot re-encrypt the
 * passphrase itself. A rewrap therefore moves the *record's* dependency on
 * the origin term key into the record, encrypted under the active term:
 *
 *   W       = HKDF-SHA256(keyring[term], salt = "", "kmsd/rewrap/v1" || key_id)
 *   inner   = u32be(origin_term) || origin term key[32] || nonce[12] || ciphertext
 *   wrapped = wnonce[12] || AES-256-GCM(W, wnonce, inner,
 *                         AAD = "kmsd/rewrap/v1" || key_id || u32be(term) || node_uuid)
 *
 * After it, opening the record needs keyring[term] (the active term at the
 * time of the rewrap) and the blob; a leaked origin term key alone opens
 * nothing in the current store, and the origin term can leave the keyring.
 * Rewrapping a rewrapped record unwraps with its term and wraps again with
 * the active one (the inner layer, and so the origin, is kept).
 * Secrets (W, inner) are wiped before returning.
 */
#include "crypto_internal.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#define RW_LABEL "kmsd/rewrap/v1"
#define RW_LABEL_LEN (sizeof(RW_LABEL) - 1)
#define RW_INFO_LEN (RW_LABEL_LEN + KMS_KEY_ID_LEN)
#define RW_AAD_MAX (RW_LABEL_LEN + KMS_KEY_ID_LEN + 4 + KMS_NODE_UUID_MAX)
#define RW_INNER_MAX (4 + KMS_TERM_KEY_LEN + KMS_AEAD_NONCE_LEN + KMS_SEAL_MAX_DATA + KMS_AEAD_TAG_LEN)
#define RW_INNER_MIN (4 + KMS_TERM_KEY_LEN + KMS_AEAD_NONCE_LEN + KMS_SEAL_MIN_DATA + KMS_AEAD_TAG_LEN)

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int wrap_key(const uint8_t term_key[32], const uint8_t key_id[16], uint8_t w[32],
                    struct kms_err *err)
{
    uint8_t info[RW_INFO_LEN];

    memcpy(info, RW_LABEL, RW_LABEL_LEN);
    memcpy(info + RW_LABEL_LEN, key_id, KMS_KEY_ID_LEN);
    return kms_hkdf_sha256(term_key, KMS_TERM_KEY_LEN, NULL, 0, info, sizeof(info), w,
                           KMS_AEAD_KEY_LEN, err);
}

static size_t wrap_aad(const uint8_t key_id[16], uint32_t term, const char *uuid,
                       uint8_t aad[RW_AAD_MAX])
{
    size_t n = strlen(uuid);

    if (n > KMS_NODE_UUID_MAX) {
        n = KMS_NODE_UUID_MAX;
    }
    memcpy(aad, RW_LABEL, RW_LABEL_LEN);
    memcpy(aad + RW_LABEL_LEN, key_id, KMS_KEY_ID_LEN);
    put_be32(aad + RW_LABEL_LEN + KMS_KEY_ID_LEN, term);
    memcpy(aad + RW_LABEL_LEN + KMS_KEY_ID_LEN + 4, uuid, n);
    return RW_LABEL_LEN + KMS_KEY_ID_LEN + 4 + n;
}

size_t kms_rewrap_len_min(void)
{
    return KMS_AEAD_NONCE_LEN + RW_INNER_MIN + KMS_AEAD_TAG_LEN;
}

size_t kms_rewrap_len_max(void)
{
    return KMS_AEAD_NONCE_LEN + RW_INNER_MAX + KMS_AEAD_TAG_LEN;
}

/* Opens rec->wrapped (rec->origin_term != 0) into inner (RW_INNER_MAX
 * bytes, secret: the caller wipes it); *innerlen receives its length. */
static int unwrap_inner(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
                        uint8_t *inner, size_t *innerlen, struct kms_err *err)
{
    const uint8_t *tk = kms_keyring_term_key(kr, rec->term);
    uint8_t w[KMS_AEAD_KEY_LEN]; /* wiped */
    uint8_t aad[RW_AAD_MAX];
    size_t aadlen, n;
    int rc;

    if (tk == NULL) {
        return kms_err_set(err, KMS_ENOTFOUND, "keyring has no term %u", rec->term);
    }
    if (rec->wrapped.len < kms_rewrap_len_min() || rec->wrapped.len > kms_rewrap_len_max()) {
        return kms_err_set(err, KMS_EFORMAT, "rewrapped record: %zu bytes", rec->wrapped.len);
    }
    if ((rc = wrap_key(tk, rec->key_id.data, w, err)) != 0) {
        goto out;
    }
    n = rec->wrapped.len - KMS_AEAD_NONCE_LEN - KMS_AEAD_TAG_LEN;
    aadlen = wrap_aad(rec->key_id.data, rec->term, rec->node_uuid, aad);
    rc = kms_aead_open_framed(w, aad, aadlen, rec->wrapped.data, rec->wrapped.len, inner, err);
    if (rc == KMS_EAUTH) {
        rc = kms_err_set(err, KMS_EAUTH, "rewrapped record does not open under term %u",
                         rec->term);
        goto out;
    }
    if (rc != 0) {
        goto out;
    }
    if (get_be32(inner) != rec->origin_term) {
        rc = kms_err_set(err, KMS_ECORRUPT, "rewrapped record: origin term %u, inner says %u",
                         rec->origin_term, get_be32(inner));
        goto out;
    }
    *innerlen = n;
    rc = 0;
out:
    OPENSSL_cleanse(w, sizeof(w));
    if (rc != 0) {
        OPENSSL_cleanse(inner, RW_INNER_MAX);
    }
    return rc;
}

int kms_rewrap_open(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
                    uint8_t origin_key[32], uint8_t nonce[12], uint8_t *ct, size_t *ctlen,
                    struct kms_err *err)
{
    uint8_t inner[RW_INNER_MAX]; /* wiped */
    size_t n = 0;
    int rc;

    if ((rc = unwrap_inner(kr, rec, inner, &n, err)) != 0) {
        goto out;
    }
    memcpy(origin_key, inner + 4, KMS_TERM_KEY_LEN);
    memcpy(nonce, inner + 4 + KMS_TERM_KEY_LEN, KMS_AEAD_NONCE_LEN);
    *ctlen = n - 4 - KMS_TERM_KEY_LEN - KMS_AEAD_NONCE_LEN;
    memcpy(ct, inner + 4 + KMS_TERM_KEY_LEN + KMS_AEAD_NONCE_LEN, *ctlen);
out:
    OPENSSL_cleanse(inner, sizeof(inner));
    return rc;
}

bool kms_rewrap_needed(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec)
{
    if (kr == NULL || rec == NULL || rec->revoked_at != 0) {
        return false;
    }
    if (rec->ciphertext.len == 0 && rec->wrapped.len == 0) {
        return false; /* shredded: nothing to protect */
    }
    return rec->term != kr->active_term;
}

int kms_rewrap(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
               struct kms_rewrap_out *out, struct kms_err *err)
{
    uint8_t inner[RW_INNER_MAX]; /* wiped */
    uint8_t w[KMS_AEAD_KEY_LEN];  /* wiped */
    uint8_t aad[RW_AAD_MAX];
    const uint8_t *active_key, *origin_key;
    size_t n = 0, aadlen;
    uint8_t *buf = NULL;
    int rc;

    memset(out, 0, sizeof(*out));
    if (kr == NULL || rec == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "rewrap: invalid argument");
        goto out;
    }
    if ((rc = kms_record_validate(rec, err)) != 0) {
        kms_err_wrap(err, rc, "rewrap");
        goto out;
    }
    if (!kms_rewrap_needed(kr, rec)) {
        rc = kms_err_set(err, KMS_EINVAL, "rewrap: record needs no rewrap");
        goto out;
    }
    active_key = kms_keyring_term_key(kr, kr->active_term);
    if (active_key == NULL) {
        rc = kms_err_set(err, KMS_ECORRUPT, "rewrap: active term %u missing", kr->active_term);
        goto out;
    }
    if (rec->origin_term != 0) {
        if ((rc = unwrap_inner(kr, rec, inner, &n, err)) != 0) {
            kms_err_wrap(err, rc, "rewrap");
            goto out;
        }
        out->origin_term = rec->origin_term;
    } else {
        origin_key = kms_keyring_term_key(kr, rec->term);
        if (origin_key == NULL) {
            rc = kms_err_set(err, KMS_ENOTFOUND, "rewrap: keyring has no term %u", rec->term);
            goto out;
        }
        put_be32(inner, rec->term);
        memcpy(inner + 4, origin_key, KMS_TERM_KEY_LEN);
        memcpy(inner + 4 + KMS_TERM_KEY_LEN, rec->nonce.data, KMS_AEAD_NONCE_LEN);
        memcpy(inner + 4 + KMS_TERM_KEY_LEN + KMS_AEAD_NONCE_LEN, rec->ciphertext.data,
               rec->ciphertext.len);
        n = 4 + KMS_TERM_KEY_LEN + KMS_AEAD_NONCE_LEN + rec->ciphertext.len;
        out->origin_term = rec->term;
    }
    buf = malloc(KMS_AEAD_NONCE_LEN + n + KMS_AEAD_TAG_LEN);
    if (buf == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "rewrap: out of memory");
        goto out;
    }
    aadlen = wrap_aad(rec->key_id.data, kr->active_term, rec->node_uuid, aad);
    if ((rc = wrap_key(active_key, rec->key_id.data, w, err)) != 0 ||
        (rc = kms_aead_seal_framed(w, aad, aadlen, inner, n, buf, err)) != 0) {
        kms_err_wrap(err, rc, "rewrap");
        goto out;
    }
    out->term = kr->active_term;
    out->wrapped = buf;
    out->wrapped_len = KMS_AEAD_NONCE_LEN + n + KMS_AEAD_TAG_LEN;
    buf = NULL;
    rc = 0;
out:
    OPENSSL_cleanse(inner, sizeof(inner));
    OPENSSL_cleanse(w, sizeof(w));
    free(buf);
    return rc;
}

void kms_rewrap_out_free(struct kms_rewrap_out *o)
{
    if (o != NULL) {
        free(o->wrapped);
        memset(o, 0, sizeof(*o));
    }
}

int kms_keyring_retire(const struct kms_keyring *old, uint32_t term, struct kms_keyring **out,
                       struct kms_err *err)
{
    struct kms_keyring *kr = NULL;
    size_t j = 0;
    int rc;

    if (old == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "keyring retire: invalid argument");
        goto out;
    }
    if (term == old->active_term) {
        rc = kms_err_set(err, KMS_EINVAL, "term %u is the active term: it cannot be retired",
                         term);
        goto out;
    }
    if (kms_keyring_term_key(old, term) == NULL) {
        rc = kms_err_set(err, KMS_ENOTFOUND, "term %u is not in the keyring", term);
        goto out;
    }
    kr = kms_keyring_alloc(old->nterms - 1);
    if (kr == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring retire: out of secure memory");
        goto out;
    }
    memcpy(kr->cluster_id, old->cluster_id, KMS_CLUSTER_ID_LEN);
    for (size_t i = 0; i < old->nterms; i++) {
        if (old->terms[i].term != term) {
            kr->terms[j++] = old->terms[i];
        }
    }
    kr->active_term = old->active_term;
    *out = kr;
    kr = NULL;
    rc = 0;
out:
    kms_keyring_unref(kr);
    return rc;
}

size_t kms_keyring_terms(const struct kms_keyring *kr, uint32_t *terms, size_t max)
{
    size_t n = 0;

    for (; kr != NULL && n < kr->nterms && n < max; n++) {
        terms[n] = kr->terms[n].term;
    }
    return n;
}
