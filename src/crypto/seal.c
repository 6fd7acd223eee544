/*
 * Sealing Talos passphrases (docs/security.md, proto/README.md).
 *
 *   key_id      = 16 random bytes (record key, public)
 *   client_half = 32 random bytes (only in the blob Talos keeps)
 *   KEK         = HKDF-SHA256(ikm = keyring[term], salt = client_half,
 *                             info = "kmsd/seal/v1" || key_id)
 *   ciphertext  = AES-256-GCM(KEK, random nonce, data,
 *                             AAD = key_id || node_uuid) || tag
 *   blob        = 0x01 || key_id || client_half
 *
 * Split knowledge: the replicated record (even with R and the keyring) lacks
 * client_half; the blob lacks the term key. KEKs, client halves and
 * plaintexts are wiped with OPENSSL_cleanse before returning.
 */
#include "crypto_internal.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#define SEAL_INFO_LABEL "kmsd/seal/v1"
#define SEAL_INFO_LABEL_LEN (sizeof(SEAL_INFO_LABEL) - 1)
#define SEAL_INFO_LEN (SEAL_INFO_LABEL_LEN + KMS_KEY_ID_LEN)
#define SEAL_AAD_MAX (KMS_KEY_ID_LEN + KMS_NODE_UUID_MAX)

/* 1..128 bytes of printable ASCII (0x20..0x7e). Returns the length, 0 if
 * invalid. */
static size_t node_uuid_len(const char *uuid)
{
    size_t n = 0;

    if (uuid == NULL) {
        return 0;
    }
    for (; uuid[n] != '\0'; n++) {
        unsigned char c = (unsigned char)uuid[n];
        if (n >= KMS_NODE_UUID_MAX || c < 0x20 || c > 0x7e) {
            return 0;
        }
    }
    return n;
}

bool kms_node_uuid_valid(const char *uuid)
{
    return node_uuid_len(uuid) != 0;
}

/* KEK = HKDF-SHA256(term key, client_half, "kmsd/seal/v1" || key_id). */
static int derive_kek(const uint8_t term_key[32], const uint8_t client_half[32],
                      const uint8_t key_id[16], uint8_t kek[32], struct kms_err *err)
{
    uint8_t info[SEAL_INFO_LEN];

    memcpy(info, SEAL_INFO_LABEL, SEAL_INFO_LABEL_LEN);
    memcpy(info + SEAL_INFO_LABEL_LEN, key_id, KMS_KEY_ID_LEN);
    return kms_hkdf_sha256(term_key, KMS_TERM_KEY_LEN, client_half, KMS_CLIENT_HALF_LEN, info,
                           sizeof(info), kek, KMS_AEAD_KEY_LEN, err);
}

/* AAD = key_id || node_uuid; returns its length. */
static size_t seal_aad(const uint8_t key_id[16], const char *uuid, size_t uuidlen,
                       uint8_t aad[SEAL_AAD_MAX])
{
    memcpy(aad, key_id, KMS_KEY_ID_LEN);
    memcpy(aad + KMS_KEY_ID_LEN, uuid, uuidlen);
    return KMS_KEY_ID_LEN + uuidlen;
}

static void *dup_bytes(const void *p, size_t n)
{
    void *q = malloc(n == 0 ? 1 : n);
    if (q != NULL && n > 0) {
        memcpy(q, p, n);
    }
    return q;
}

int kms_seal(const struct kms_keyring *kr, const char *node_uuid, const uint8_t *data,
             size_t datalen, int64_t now_ms, const uint8_t *source_ip, size_t iplen,
             Kmsd__V1__SealedRecord **rec_out, uint8_t blob[KMS_BLOB_MAX], size_t *bloblen,
             struct kms_err *err)
{
    Kmsd__V1__SealedRecord *rec = NULL; /* malloc, moved to *rec_out */
    const uint8_t *term_key;
    uint8_t key_id[KMS_KEY_ID_LEN];
    uint8_t client_half[KMS_CLIENT_HALF_LEN]; /* wiped */
    uint8_t kek[KMS_AEAD_KEY_LEN];            /* wiped */
    uint8_t aad[SEAL_AAD_MAX];
    size_t uuidlen, aadlen;
    int rc;

    if (kr == NULL || rec_out == NULL || blob == NULL || bloblen == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "seal: invalid argument");
        goto out;
    }
    if (data == NULL || datalen < KMS_SEAL_MIN_DATA || datalen > KMS_SEAL_MAX_DATA) {
        rc = kms_err_set(err, KMS_EINVAL, "seal: data must be %d..%d bytes, not %zu",
                         KMS_SEAL_MIN_DATA, KMS_SEAL_MAX_DATA, data == NULL ? 0 : datalen);
        goto out;
    }
    uuidlen = node_uuid_len(node_uuid);
    if (uuidlen == 0) {
        rc = kms_err_set(err, KMS_EINVAL,
                         "seal: node uuid must be 1..%d printable ASCII characters",
                         KMS_NODE_UUID_MAX);
        goto out;
    }
    if ((iplen != 0 && iplen != 4 && iplen != 16) || (iplen > 0 && source_ip == NULL)) {
        rc = kms_err_set(err, KMS_EINVAL, "seal: source address must be 4 or 16 bytes");
        goto out;
    }
    term_key = kms_keyring_term_key(kr, kr->active_term);
    if (term_key == NULL) {
        rc = kms_err_set(err, KMS_ECORRUPT, "seal: active term %u missing from keyring",
                         kr->active_term);
        goto out;
    }
    rec = malloc(sizeof(*rec));
    if (rec == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "seal: out of memory");
        goto out;
    }
    kmsd__v1__sealed_record__init(rec);
    rec->key_id.data = malloc(KMS_KEY_ID_LEN);
    rec->nonce.data = malloc(KMS_AEAD_NONCE_LEN);
    rec->ciphertext.data = malloc(datalen + KMS_AEAD_TAG_LEN);
    rec->node_uuid = dup_bytes(node_uuid, uuidlen + 1);
    if (rec->key_id.data == NULL || rec->nonce.data == NULL || rec->ciphertext.data == NULL ||
        rec->node_uuid == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "seal: out of memory");
        goto out;
    }
    rec->key_id.len = KMS_KEY_ID_LEN;
    rec->nonce.len = KMS_AEAD_NONCE_LEN;
    rec->ciphertext.len = datalen + KMS_AEAD_TAG_LEN;
    if (iplen > 0) {
        rec->source_ip.data = dup_bytes(source_ip, iplen);
        if (rec->source_ip.data == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "seal: out of memory");
            goto out;
        }
        rec->source_ip.len = iplen;
    }
    rec->version = KMS_RECORD_VERSION;
    rec->term = kr->active_term;
    rec->created_at = now_ms;
    if ((rc = kms_rand_bytes(key_id, sizeof(key_id), err)) != 0 ||
        (rc = kms_rand_bytes(client_half, sizeof(client_half), err)) != 0 ||
        (rc = kms_rand_bytes(rec->nonce.data, KMS_AEAD_NONCE_LEN, err)) != 0) {
        kms_err_wrap(err, rc, "seal");
        goto out;
    }
    memcpy(rec->key_id.data, key_id, KMS_KEY_ID_LEN);
    if ((rc = derive_kek(term_key, client_half, key_id, kek, err)) != 0) {
        kms_err_wrap(err, rc, "seal");
        goto out;
    }
    aadlen = seal_aad(key_id, node_uuid, uuidlen, aad);
    if ((rc = kms_aead_seal(kek, rec->nonce.data, aad, aadlen, data, datalen,
                            rec->ciphertext.data, err)) != 0) {
        kms_err_wrap(err, rc, "seal");
        goto out;
    }
    blob[0] = KMS_BLOB_VERSION;
    memcpy(blob + 1, key_id, KMS_KEY_ID_LEN);
    memcpy(blob + 1 + KMS_KEY_ID_LEN, client_half, KMS_CLIENT_HALF_LEN);
    *bloblen = KMS_BLOB_V1_LEN;
    *rec_out = rec;
    rec = NULL;
    rc = 0;
out:
    OPENSSL_cleanse(client_half, sizeof(client_half));
    OPENSSL_cleanse(kek, sizeof(kek));
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    return rc;
}

int kms_blob_parse(const uint8_t *blob, size_t len, uint8_t key_id[16], uint8_t client_half[32],
                   struct kms_err *err)
{
    if (key_id == NULL || client_half == NULL) {
        return kms_err_set(err, KMS_EINVAL, "blob: invalid argument");
    }
    if (blob == NULL || len != KMS_BLOB_V1_LEN) {
        return kms_err_set(err, KMS_EFORMAT, "blob: %zu bytes, expected %d",
                           blob == NULL ? 0 : len, KMS_BLOB_V1_LEN);
    }
    if (blob[0] != KMS_BLOB_VERSION) {
        return kms_err_set(err, KMS_EFORMAT, "blob: unsupported version %u", blob[0]);
    }
    memcpy(key_id, blob + 1, KMS_KEY_ID_LEN);
    memcpy(client_half, blob + 1 + KMS_KEY_ID_LEN, KMS_CLIENT_HALF_LEN);
    return 0;
}

int kms_record_validate(const Kmsd__V1__SealedRecord *rec, struct kms_err *err)
{
    if (rec == NULL) {
        return kms_err_set(err, KMS_EINVAL, "record: invalid argument");
    }
    if (rec->version != KMS_RECORD_VERSION) {
        return kms_err_set(err, KMS_EFORMAT, "record: unsupported version %u", rec->version);
    }
    if (rec->key_id.len != KMS_KEY_ID_LEN || rec->key_id.data == NULL) {
        return kms_err_set(err, KMS_EFORMAT, "record: key_id is %zu bytes, expected %d",
                           rec->key_id.len, KMS_KEY_ID_LEN);
    }
    if (node_uuid_len(rec->node_uuid) == 0) {
        return kms_err_set(err, KMS_EFORMAT, "record: invalid node uuid");
    }
    if (rec->term == 0) {
        return kms_err_set(err, KMS_EFORMAT, "record: term 0");
    }
    if (rec->revoked_at > 0 && rec->nonce.len == 0 && rec->ciphertext.len == 0 &&
        rec->wrapped.len == 0) {
        /* A revoked record is shredded on apply (kms_store.h): metadata only. */
        goto meta;
    }
    if (rec->origin_term != 0 || rec->wrapped.len != 0) {
        /* Rewrapped (rewrap.c): no nonce or ciphertext of its own. */
        if (rec->origin_term == 0 || rec->origin_term >= rec->term) {
            return kms_err_set(err, KMS_EFORMAT, "record: origin term %u with term %u",
                               rec->origin_term, rec->term);
        }
        if (rec->nonce.len != 0 || rec->ciphertext.len != 0 || rec->wrapped.data == NULL ||
            rec->wrapped.len < kms_rewrap_len_min() || rec->wrapped.len > kms_rewrap_len_max()) {
            return kms_err_set(err, KMS_EFORMAT, "record: rewrapped record of %zu bytes",
                               rec->wrapped.len);
        }
        goto meta;
    }
    if (rec->nonce.len != KMS_AEAD_NONCE_LEN || rec->nonce.data == NULL) {
        return kms_err_set(err, KMS_EFORMAT, "record: nonce is %zu bytes, expected %d",
                           rec->nonce.len, KMS_AEAD_NONCE_LEN);
    }
    if (rec->ciphertext.len < KMS_SEAL_MIN_DATA + KMS_AEAD_TAG_LEN ||
        rec->ciphertext.len > KMS_SEAL_MAX_DATA + KMS_AEAD_TAG_LEN ||
        rec->ciphertext.data == NULL) {
        return kms_err_set(err, KMS_EFORMAT, "record: ciphertext is %zu bytes, expected %d..%d",
                           rec->ciphertext.len, KMS_SEAL_MIN_DATA + KMS_AEAD_TAG_LEN,
                           KMS_SEAL_MAX_DATA + KMS_AEAD_TAG_LEN);
    }
meta:
    if ((rec->source_ip.len != 0 && rec->source_ip.len != 4 && rec->source_ip.len != 16) ||
        (rec->source_ip.len > 0 && rec->source_ip.data == NULL)) {
        return kms_err_set(err, KMS_EFORMAT, "record: source ip is %zu bytes",
                           rec->source_ip.len);
    }
    if (rec->created_at < 0 || rec->last_access_at < 0 || rec->revoked_at < 0) {
        return kms_err_set(err, KMS_EFORMAT, "record: negative timestamp");
    }
    return 0;
}

int kms_record_pack(const Kmsd__V1__SealedRecord *rec, uint8_t **out, size_t *len,
                    struct kms_err *err)
{
    uint8_t *buf = NULL; /* malloc, moved to *out */
    size_t n = 0;
    int rc;

    if (out == NULL || len == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "record pack: invalid argument");
        goto out;
    }
    if ((rc = kms_record_validate(rec, err)) != 0) {
        kms_err_wrap(err, rc, "record pack");
        goto out;
    }
    n = kmsd__v1__sealed_record__get_packed_size(rec);
    buf = malloc(n == 0 ? 1 : n);
    if (buf == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "record pack: out of memory");
        goto out;
    }
    if (kmsd__v1__sealed_record__pack(rec, buf) != n) {
        rc = kms_err_set(err, KMS_EFORMAT, "record pack: packing failed");
        goto out;
    }
    *out = buf;
    buf = NULL;
    *len = n;
    rc = 0;
out:
    free(buf);
    return rc;
}

int kms_record_unpack(const uint8_t *buf, size_t len, Kmsd__V1__SealedRecord **out,
                      struct kms_err *err)
{
    Kmsd__V1__SealedRecord *rec = NULL; /* malloc (protobuf-c), moved to *out */
    int rc;

    if (out == NULL || (buf == NULL && len > 0)) {
        rc = kms_err_set(err, KMS_EINVAL, "record unpack: invalid argument");
        goto out;
    }
    rec = kmsd__v1__sealed_record__unpack(NULL, len, buf);
    if (rec == NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "record unpack: not a valid SealedRecord");
        goto out;
    }
    if ((rc = kms_record_validate(rec, err)) != 0) {
        kms_err_wrap(err, rc, "record unpack");
        goto out;
    }
    *out = rec;
    rec = NULL;
    rc = 0;
out:
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    return rc;
}

int kms_unseal(const struct kms_keyring *kr, const Kmsd__V1__SealedRecord *rec,
               const char *node_uuid, const uint8_t *blob, size_t bloblen, uint8_t *out,
               size_t *outlen, struct kms_err *err)
{
    const uint8_t *term_key;
    uint8_t key_id[KMS_KEY_ID_LEN];
    uint8_t client_half[KMS_CLIENT_HALF_LEN]; /* wiped */
    uint8_t kek[KMS_AEAD_KEY_LEN];            /* wiped */
    uint8_t origin_key[KMS_TERM_KEY_LEN];     /* wiped: rewrapped records only */
    uint8_t nonce[KMS_AEAD_NONCE_LEN];
    uint8_t ct[KMS_SEAL_MAX_DATA + KMS_AEAD_TAG_LEN]; /* wiped */
    uint8_t aad[SEAL_AAD_MAX];
    size_t uuidlen, reclen, aadlen, ctlen = 0;
    int rc;

    memset(origin_key, 0, sizeof(origin_key));
    memset(ct, 0, sizeof(ct));
    memset(client_half, 0, sizeof(client_half));
    memset(kek, 0, sizeof(kek));
    if (kr == NULL || rec == NULL || out == NULL || outlen == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "unseal: invalid argument");
        goto out;
    }
    *outlen = 0;
    if ((rc = kms_blob_parse(blob, bloblen, key_id, client_half, err)) != 0) {
        kms_err_wrap(err, rc, "unseal");
        goto out;
    }
    if ((rc = kms_record_validate(rec, err)) != 0) {
        kms_err_wrap(err, rc, "unseal");
        goto out;
    }
    if (CRYPTO_memcmp(key_id, rec->key_id.data, KMS_KEY_ID_LEN) != 0) {
        rc = kms_err_set(err, KMS_EDENIED, "unseal: blob belongs to another record");
        goto out;
    }
    /* The uuid is also bound by the AAD; checking it first gives a clear
     * error instead of "authentication failed". */
    uuidlen = node_uuid_len(node_uuid);
    reclen = strlen(rec->node_uuid);
    if (uuidlen == 0 || uuidlen != reclen ||
        CRYPTO_memcmp(node_uuid, rec->node_uuid, reclen) != 0) {
        rc = kms_err_set(err, KMS_EDENIED, "unseal: key was sealed for another node");
        goto out;
    }
    if (rec->revoked_at != 0) {
        rc = kms_err_set(err, KMS_EREVOKED, "unseal: key was revoked");
        goto out;
    }
    if (rec->origin_term != 0) {
        /* Rewrapped: the origin term key, nonce and ciphertext come out of
         * the wrapping under rec->term (rewrap.c). */
        if ((rc = kms_rewrap_open(kr, rec, origin_key, nonce, ct, &ctlen, err)) != 0) {
            kms_err_wrap(err, rc, "unseal");
            goto out;
        }
        term_key = origin_key;
    } else {
        term_key = kms_keyring_term_key(kr, rec->term);
        if (term_key == NULL) {
            rc = kms_err_set(err, KMS_ENOTFOUND, "unseal: keyring has no term %u", rec->term);
            goto out;
        }
        memcpy(nonce, rec->nonce.data, KMS_AEAD_NONCE_LEN);
        memcpy(ct, rec->ciphertext.data, rec->ciphertext.len);
        ctlen = rec->ciphertext.len;
    }
    if ((rc = derive_kek(term_key, client_half, key_id, kek, err)) != 0) {
        kms_err_wrap(err, rc, "unseal");
        goto out;
    }
    aadlen = seal_aad(key_id, rec->node_uuid, reclen, aad);
    rc = kms_aead_open(kek, nonce, aad, aadlen, ct, ctlen, out, err);
    if (rc == KMS_EAUTH) {
        rc = kms_err_set(err, KMS_EAUTH,
                         "unseal: authentication failed (wrong blob or corrupt record)");
        goto out;
    }
    if (rc != 0) {
        kms_err_wrap(err, rc, "unseal");
        goto out;
    }
    *outlen = ctlen - KMS_AEAD_TAG_LEN;
    rc = 0;
out:
    if (rc != 0 && out != NULL) {
        OPENSSL_cleanse(out, KMS_SEAL_MAX_DATA);
    }
    OPENSSL_cleanse(origin_key, sizeof(origin_key));
    OPENSSL_cleanse(ct, sizeof(ct));
    OPENSSL_cleanse(client_half, sizeof(client_half));
    OPENSSL_cleanse(kek, sizeof(kek));
    return rc;
}
