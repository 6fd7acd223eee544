/*
 * The keyring: one 32-byte data key per term, term 1 created at init, one
 * more per rotation. In memory it is a single secure-heap block, immutable
 * once built and shared by reference count, so request threads can seal and
 * unseal with it while a rotation builds its successor.
 *
 * On the wire (replicated) it is an EncryptedKeyring: the packed Keyring
 * message encrypted with AES-256-GCM under the root key R, with
 * AAD = "kmsd/keyring" || u32be(version) || cluster_id, so a keyring cannot
 * be replayed into another cluster or reinterpreted under another format
 * version. The packed and unpacked plaintext only ever exist in secure
 * memory.
 */
#include "crypto_internal.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#define KEYRING_AAD_LABEL "kmsd/keyring"
#define KEYRING_AAD_LEN (sizeof(KEYRING_AAD_LABEL) - 1 + 4 + KMS_CLUSTER_ID_LEN)
/* A packed keyring term is < 64 bytes; this bounds what decrypt accepts. */
#define KEYRING_MAX_CIPHERTEXT (KMS_KEYRING_MAX_TERMS * 64 + 64 + KMS_AEAD_TAG_LEN)

/* ---- allocation and references ------------------------------------------ */

struct kms_keyring *kms_keyring_alloc(size_t nterms)
{
    size_t size = sizeof(struct kms_keyring) + nterms * sizeof(struct kms_keyring_term);
    struct kms_keyring *kr = kms_secmem_alloc(size);

    if (kr == NULL) {
        return NULL;
    }
    atomic_init(&kr->refs, 1);
    kr->alloc_size = size;
    kr->nterms = nterms;
    return kr;
}

struct kms_keyring *kms_keyring_ref(struct kms_keyring *kr)
{
    if (kr != NULL) {
        /* Taking a reference needs no ordering: the caller already sees
         * the keyring through a reference it holds. */
        atomic_fetch_add_explicit(&kr->refs, 1, memory_order_relaxed);
    }
    return kr;
}

void kms_keyring_unref(struct kms_keyring *kr)
{
    if (kr == NULL) {
        return;
    }
    /* Release our reads; the last owner acquires everyone's before the
     * wipe. acq_rel on the decrement rather than release + an acquire
     * fence: same ordering, and ThreadSanitizer understands it. */
    if (atomic_fetch_sub_explicit(&kr->refs, 1, memory_order_acq_rel) == 1) {
        kms_secmem_free(kr, kr->alloc_size);
    }
}

uint32_t kms_keyring_active_term(const struct kms_keyring *kr)
{
    return kr != NULL ? kr->active_term : 0;
}

size_t kms_keyring_term_count(const struct kms_keyring *kr)
{
    return kr != NULL ? kr->nterms : 0;
}

const uint8_t *kms_keyring_cluster_id(const struct kms_keyring *kr)
{
    return kr != NULL ? kr->cluster_id : NULL;
}

const uint8_t *kms_keyring_term_key(const struct kms_keyring *kr, uint32_t term)
{
    size_t lo = 0, hi;

    if (kr == NULL) {
        return NULL;
    }
    /* Terms are sorted and strictly increasing: binary search. */
    hi = kr->nterms;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (kr->terms[mid].term == term) {
            return kr->terms[mid].key;
        }
        if (kr->terms[mid].term < term) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return NULL;
}

int kms_root_key_generate(uint8_t root[32], struct kms_err *err)
{
    int rc;

    if (root == NULL) {
        return kms_err_set(err, KMS_EINVAL, "root key: invalid argument");
    }
    if ((rc = kms_rand_bytes(root, KMS_ROOT_KEY_LEN, err)) != 0) {
        return kms_err_wrap(err, rc, "root key");
    }
    return 0;
}

/* ---- create / rotate / import ------------------------------------------- */

int kms_keyring_create(const uint8_t cluster_id[16], int64_t now_ms, struct kms_keyring **out,
                       struct kms_err *err)
{
    struct kms_keyring *kr = NULL;
    int rc;

    if (cluster_id == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "keyring create: invalid argument");
        goto out;
    }
    kr = kms_keyring_alloc(1);
    if (kr == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring create: out of secure memory");
        goto out;
    }
    memcpy(kr->cluster_id, cluster_id, KMS_CLUSTER_ID_LEN);
    kr->active_term = 1;
    kr->terms[0].term = 1;
    kr->terms[0].created_at = now_ms;
    if ((rc = kms_rand_bytes(kr->terms[0].key, KMS_TERM_KEY_LEN, err)) != 0) {
        kms_err_wrap(err, rc, "keyring create");
        goto out;
    }
    *out = kr;
    kr = NULL;
    rc = 0;
out:
    kms_keyring_unref(kr);
    return rc;
}

int kms_keyring_rotate(const struct kms_keyring *old, int64_t now_ms, struct kms_keyring **out,
                       struct kms_err *err)
{
    struct kms_keyring *kr = NULL;
    struct kms_keyring_term *t;
    int rc;

    if (old == NULL || out == NULL || old->nterms == 0) {
        rc = kms_err_set(err, KMS_EINVAL, "keyring rotate: invalid argument");
        goto out;
    }
    if (old->nterms >= KMS_KEYRING_MAX_TERMS ||
        old->terms[old->nterms - 1].term == UINT32_MAX) {
        rc = kms_err_set(err, KMS_ERANGE, "keyring rotate: keyring already holds %zu terms",
                         old->nterms);
        goto out;
    }
    kr = kms_keyring_alloc(old->nterms + 1);
    if (kr == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring rotate: out of secure memory");
        goto out;
    }
    memcpy(kr->cluster_id, old->cluster_id, KMS_CLUSTER_ID_LEN);
    memcpy(kr->terms, old->terms, old->nterms * sizeof(old->terms[0]));
    t = &kr->terms[old->nterms];
    t->term = old->terms[old->nterms - 1].term + 1;
    t->created_at = now_ms;
    if ((rc = kms_rand_bytes(t->key, KMS_TERM_KEY_LEN, err)) != 0) {
        kms_err_wrap(err, rc, "keyring rotate");
        goto out;
    }
    kr->active_term = t->term;
    *out = kr;
    kr = NULL;
    rc = 0;
out:
    kms_keyring_unref(kr);
    return rc;
}

int kms_keyring_import(const uint8_t cluster_id[16], const Kmsd__V1__Keyring *plain,
                       struct kms_keyring **out, struct kms_err *err)
{
    struct kms_keyring *kr = NULL;
    bool active_found = false;
    int rc;

    if (cluster_id == NULL || plain == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "keyring: invalid argument");
        goto out;
    }
    if (plain->version != KMS_KEYRING_VERSION) {
        rc = kms_err_set(err, KMS_EVERSION, "keyring: unsupported version %u", plain->version);
        goto out;
    }
    if (plain->n_terms == 0 || plain->n_terms > KMS_KEYRING_MAX_TERMS) {
        rc = kms_err_set(err, KMS_EFORMAT, "keyring: %zu terms (expected 1..%d)",
                         plain->n_terms, KMS_KEYRING_MAX_TERMS);
        goto out;
    }
    for (size_t i = 0; i < plain->n_terms; i++) {
        const Kmsd__V1__KeyringTerm *t = plain->terms[i];
        if (t == NULL || t->key.len != KMS_TERM_KEY_LEN || t->key.data == NULL) {
            rc = kms_err_set(err, KMS_EFORMAT, "keyring: term #%zu has no 32-byte key", i + 1);
            goto out;
        }
        if (t->term == 0 || (i > 0 && t->term <= plain->terms[i - 1]->term)) {
            rc = kms_err_set(err, KMS_EFORMAT, "keyring: terms not strictly increasing at #%zu",
                             i + 1);
            goto out;
        }
        if (t->term == plain->active_term) {
            active_found = true;
        }
    }
    if (!active_found) {
        rc = kms_err_set(err, KMS_EFORMAT, "keyring: active term %u is not in the keyring",
                         plain->active_term);
        goto out;
    }
    kr = kms_keyring_alloc(plain->n_terms);
    if (kr == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring: out of secure memory");
        goto out;
    }
    memcpy(kr->cluster_id, cluster_id, KMS_CLUSTER_ID_LEN);
    kr->active_term = plain->active_term;
    for (size_t i = 0; i < plain->n_terms; i++) {
        kr->terms[i].term = plain->terms[i]->term;
        kr->terms[i].created_at = plain->terms[i]->created_at;
        memcpy(kr->terms[i].key, plain->terms[i]->key.data, KMS_TERM_KEY_LEN);
    }
    *out = kr;
    kr = NULL;
    rc = 0;
out:
    kms_keyring_unref(kr);
    return rc;
}

/* ---- encrypt / decrypt --------------------------------------------------- */

static void keyring_aad(const uint8_t cluster_id[16], uint32_t version,
                        uint8_t aad[KEYRING_AAD_LEN])
{
    size_t l = sizeof(KEYRING_AAD_LABEL) - 1;

    memcpy(aad, KEYRING_AAD_LABEL, l);
    aad[l + 0] = (uint8_t)(version >> 24);
    aad[l + 1] = (uint8_t)(version >> 16);
    aad[l + 2] = (uint8_t)(version >> 8);
    aad[l + 3] = (uint8_t)version;
    memcpy(aad + l + 4, cluster_id, KMS_CLUSTER_ID_LEN);
}

static void *dup_bytes(const void *p, size_t n)
{
    void *q = malloc(n == 0 ? 1 : n);
    if (q != NULL && n > 0) {
        memcpy(q, p, n);
    }
    return q;
}

int kms_keyring_encrypt(const struct kms_keyring *kr, const uint8_t root[32], unsigned shares,
                        unsigned threshold, Kmsd__V1__EncryptedKeyring **out,
                        struct kms_err *err)
{
    Kmsd__V1__Keyring msg = KMSD__V1__KEYRING__INIT;
    Kmsd__V1__KeyringTerm *tmsgs = NULL;   /* malloc; point into kr's keys */
    Kmsd__V1__KeyringTerm **tptrs = NULL;  /* malloc */
    Kmsd__V1__EncryptedKeyring *ek = NULL; /* malloc, moved to *out */
    uint8_t *plain = NULL;                 /* secure memory: packed keyring */
    size_t plainlen = 0;
    uint8_t aad[KEYRING_AAD_LEN];
    int rc;

    if (kr == NULL || root == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "keyring encrypt: invalid argument");
        goto out;
    }
    if (threshold < 1 || threshold > shares || shares > KMS_SHAMIR_MAX_SHARES) {
        rc = kms_err_set(err, KMS_EINVAL,
                         "keyring encrypt: invalid share count %u / threshold %u", shares,
                         threshold);
        goto out;
    }
    tmsgs = calloc(kr->nterms, sizeof(*tmsgs));
    tptrs = calloc(kr->nterms, sizeof(*tptrs));
    ek = malloc(sizeof(*ek));
    if (tmsgs == NULL || tptrs == NULL || ek == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring encrypt: out of memory");
        goto out;
    }
    kmsd__v1__encrypted_keyring__init(ek);
    for (size_t i = 0; i < kr->nterms; i++) {
        kmsd__v1__keyring_term__init(&tmsgs[i]);
        tmsgs[i].term = kr->terms[i].term;
        tmsgs[i].created_at = kr->terms[i].created_at;
        tmsgs[i].key.len = KMS_TERM_KEY_LEN;
        tmsgs[i].key.data = (uint8_t *)kr->terms[i].key;
        tptrs[i] = &tmsgs[i];
    }
    msg.version = KMS_KEYRING_VERSION;
    msg.active_term = kr->active_term;
    msg.n_terms = kr->nterms;
    msg.terms = tptrs;
    plainlen = kmsd__v1__keyring__get_packed_size(&msg);
    plain = kms_secmem_alloc(plainlen);
    if (plain == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring encrypt: out of secure memory");
        goto out;
    }
    if (kmsd__v1__keyring__pack(&msg, plain) != plainlen) {
        rc = kms_err_set(err, KMS_ECRYPTO, "keyring encrypt: packing failed");
        goto out;
    }
    ek->version = KMS_KEYRING_VERSION;
    ek->share_count = shares;
    ek->threshold = threshold;
    ek->active_term = kr->active_term;
    ek->cluster_id.data = dup_bytes(kr->cluster_id, KMS_CLUSTER_ID_LEN);
    ek->nonce.data = malloc(KMS_AEAD_NONCE_LEN);
    ek->ciphertext.data = malloc(plainlen + KMS_AEAD_TAG_LEN);
    if (ek->cluster_id.data == NULL || ek->nonce.data == NULL || ek->ciphertext.data == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring encrypt: out of memory");
        goto out;
    }
    ek->cluster_id.len = KMS_CLUSTER_ID_LEN;
    ek->nonce.len = KMS_AEAD_NONCE_LEN;
    ek->ciphertext.len = plainlen + KMS_AEAD_TAG_LEN;
    /* A fresh random nonce per encryption; R encrypts one keyring per
     * rotation, far below GCM's 2^32 random-nonce bound. */
    if ((rc = kms_rand_bytes(ek->nonce.data, KMS_AEAD_NONCE_LEN, err)) != 0) {
        kms_err_wrap(err, rc, "keyring encrypt");
        goto out;
    }
    keyring_aad(kr->cluster_id, KMS_KEYRING_VERSION, aad);
    if ((rc = kms_aead_seal(root, ek->nonce.data, aad, sizeof(aad), plain, plainlen,
                            ek->ciphertext.data, err)) != 0) {
        kms_err_wrap(err, rc, "keyring encrypt");
        goto out;
    }
    *out = ek;
    ek = NULL;
    rc = 0;
out:
    kms_secmem_free(plain, plainlen);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    free(tptrs);
    free(tmsgs);
    return rc;
}

/* protobuf-c allocator on the secure heap, for unpacking the plaintext
 * keyring: every block it makes (the message, the term array, each key's
 * bytes) is mlocked and cleared on free. A 16-byte header keeps the size so
 * the free can clear exactly what was allocated. */
#define SECALLOC_HDR 16

static void *secalloc_alloc(void *data, size_t size)
{
    uint8_t *p;

    (void)data;
    if (size > SIZE_MAX - SECALLOC_HDR) {
        return NULL;
    }
    p = kms_secmem_alloc(size + SECALLOC_HDR);
    if (p == NULL) {
        return NULL;
    }
    memcpy(p, &size, sizeof(size));
    return p + SECALLOC_HDR;
}

static void secalloc_free(void *data, void *ptr)
{
    uint8_t *p;
    size_t size;

    (void)data;
    if (ptr == NULL) {
        return;
    }
    p = (uint8_t *)ptr - SECALLOC_HDR;
    memcpy(&size, p, sizeof(size));
    kms_secmem_free(p, size + SECALLOC_HDR);
}

static ProtobufCAllocator secure_allocator = {
    .alloc = secalloc_alloc,
    .free = secalloc_free,
    .allocator_data = NULL,
};

int kms_keyring_decrypt(const Kmsd__V1__EncryptedKeyring *ek, const uint8_t root[32],
                        struct kms_keyring **out, struct kms_err *err)
{
    Kmsd__V1__Keyring *msg = NULL; /* secure allocator */
    struct kms_keyring *kr = NULL;
    uint8_t *plain = NULL;         /* secure memory: packed keyring */
    size_t plainlen = 0;
    uint8_t aad[KEYRING_AAD_LEN];
    int rc;

    if (ek == NULL || root == NULL || out == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "keyring decrypt: invalid argument");
        goto out;
    }
    if (ek->version != KMS_KEYRING_VERSION) {
        rc = kms_err_set(err, KMS_EVERSION, "keyring decrypt: unsupported version %u",
                         ek->version);
        goto out;
    }
    if (ek->cluster_id.len != KMS_CLUSTER_ID_LEN || ek->nonce.len != KMS_AEAD_NONCE_LEN ||
        ek->ciphertext.len < KMS_AEAD_TAG_LEN || ek->ciphertext.len > KEYRING_MAX_CIPHERTEXT ||
        ek->cluster_id.data == NULL || ek->nonce.data == NULL || ek->ciphertext.data == NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "keyring decrypt: malformed encrypted keyring");
        goto out;
    }
    plainlen = ek->ciphertext.len - KMS_AEAD_TAG_LEN;
    plain = kms_secmem_alloc(plainlen);
    if (plain == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "keyring decrypt: out of secure memory");
        goto out;
    }
    keyring_aad(ek->cluster_id.data, ek->version, aad);
    rc = kms_aead_open(root, ek->nonce.data, aad, sizeof(aad), ek->ciphertext.data,
                       ek->ciphertext.len, plain, err);
    if (rc == KMS_EAUTH) {
        rc = kms_err_set(err, KMS_EAUTH,
                         "keyring decrypt: wrong root key, or keyring not of this cluster");
        goto out;
    }
    if (rc != 0) {
        kms_err_wrap(err, rc, "keyring decrypt");
        goto out;
    }
    msg = kmsd__v1__keyring__unpack(&secure_allocator, plainlen, plain);
    if (msg == NULL) {
        /* Authentic but unparsable: written by a buggy or newer kmsd. */
        rc = kms_err_set(err, KMS_ECORRUPT, "keyring decrypt: plaintext keyring is malformed");
        goto out;
    }
    if ((rc = kms_keyring_import(ek->cluster_id.data, msg, &kr, err)) != 0) {
        kms_err_wrap(err, rc, "keyring decrypt");
        goto out;
    }
    if (ek->active_term != kr->active_term) {
        rc = kms_err_set(err, KMS_ECORRUPT,
                         "keyring decrypt: active term %u outside, %u inside the ciphertext",
                         ek->active_term, kr->active_term);
        goto out;
    }
    *out = kr;
    kr = NULL;
    rc = 0;
out:
    if (msg != NULL) {
        kmsd__v1__keyring__free_unpacked(msg, &secure_allocator);
    }
    kms_secmem_free(plain, plainlen);
    kms_keyring_unref(kr);
    return rc;
}
