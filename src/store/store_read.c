/*
 * Reads (any thread, concurrently with the raft thread's writes): record
 * get, the record and member lists, live counts, the retire-term walk, and
 * the state digest. Each walk goes through ks_scan (store_scan.c); the
 * readers' walks are over one RocksDB snapshot. The keyring and peer gate
 * reads are in store_keyring.c.
 */
#include "store_internal.h"
#include "kms_bytes.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

int kms_store_record_get(struct kms_store *s, const uint8_t key_id[16],
                         Kmsd__V1__SealedRecord **out, struct kms_err *err)
{
    int rc;
    char hx[33];

    if (s == NULL || key_id == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "record get: bad arguments");
    }
    rc = ks_record_read(s, NULL, key_id, out, err);
    if (rc == KMS_ENOTFOUND) {
        ks_hex16(key_id, hx);
        rc = kms_err_set(err, KMS_ENOTFOUND, "key %s not found", hx);
    }
    return rc;
}

int kms_store_records_list(struct kms_store *s, const char *node_uuid,
                           int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r), void *arg,
                           struct kms_err *err)
{
    return kms_store_records_list_after(s, node_uuid, NULL, cb, arg, err);
}

struct list_walk {
    struct kms_store *s;
    bool by_node; /* the 'U' index (point read per key) rather than the 'R' range */
    size_t plen;
    const uint8_t *after;
    int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r);
    void *arg;
};

static int list_cb(void *arg, const struct ks_item *item, struct kms_err *err)
{
    struct list_walk *w = arg;
    Kmsd__V1__SealedRecord *r = NULL;
    int rc;

    if (w->after != NULL && item->klen == w->plen + 16 &&
        memcmp(item->k + w->plen, w->after, 16) == 0) {
        return 0; /* strictly after */
    }
    if (!w->by_node) {
        rc = ks_item_record(w->s, item, &r, err);
    } else {
        rc = ks_item_indexed(w->s, item, w->plen, false, &r, err);
    }
    if (rc != 0) {
        return rc;
    }
    rc = w->cb(w->arg, r);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    return rc;
}

int kms_store_records_list_after(struct kms_store *s, const char *node_uuid,
                                 const uint8_t *after,
                                 int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r),
                                 void *arg, struct kms_err *err)
{
    uint8_t prefix[1 + KS_UUID_MAX + 1];
    /* Keys sort by key id within the prefix: start at prefix||after. */
    uint8_t start[sizeof(prefix) + 16];
    size_t ulen = 0;
    struct list_walk w = {s, node_uuid != NULL, 0, after, cb, arg};

    if (s == NULL || cb == NULL) {
        return kms_err_set(err, KMS_EINVAL, "records list: bad arguments");
    }
    if (node_uuid != NULL) {
        if (!ks_uuid_valid(node_uuid, &ulen)) {
            return kms_err_set(err, KMS_EINVAL, "records list: node uuid must be 1..128 bytes");
        }
        w.plen = ks_uuid_key(prefix, node_uuid, ulen, NULL);
    } else {
        prefix[0] = KS_P_RECORD;
        w.plen = 1;
    }
    if (after != NULL) {
        memcpy(start, prefix, w.plen);
        memcpy(start + w.plen, after, 16);
    }
    return ks_scan_view(s, prefix, w.plen, after != NULL ? start : NULL, w.plen + 16, list_cb,
                        &w, err);
}

struct count_walk {
    struct kms_store *s;
    size_t plen;
    uint64_t max;
    uint64_t *live;
};

static int count_live_cb(void *arg, const struct ks_item *item, struct kms_err *err)
{
    struct count_walk *w = arg;
    Kmsd__V1__SealedRecord *r = NULL;
    int rc;

    if (*w->live >= w->max) {
        return KS_SCAN_STOP;
    }
    if ((rc = ks_item_indexed(w->s, item, w->plen, true, &r, err)) != 0 || r == NULL) {
        return rc;
    }
    *w->live += r->revoked_at == 0;
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    return 0;
}

int kms_store_records_count_live(struct kms_store *s, const char *node_uuid, uint64_t max,
                                 uint64_t *live, struct kms_err *err)
{
    uint8_t prefix[1 + KS_UUID_MAX + 1];
    size_t ulen = 0;
    struct count_walk w = {s, 0, max, live};
    int rc;

    if (s == NULL || live == NULL || !ks_uuid_valid(node_uuid, &ulen)) {
        return kms_err_set(err, KMS_EINVAL, "records count: node uuid must be 1..128 bytes");
    }
    *live = 0;
    w.plen = ks_uuid_key(prefix, node_uuid, ulen, NULL);
    rc = ks_scan_view(s, prefix, w.plen, NULL, 0, count_live_cb, &w, err);
    return rc == KS_SCAN_STOP ? 0 : rc;
}

struct term_walk {
    struct kms_store *s;
    uint32_t term;
    uint64_t *n;
};

static int on_term_cb(void *arg, const struct ks_item *item, struct kms_err *err)
{
    struct term_walk *w = arg;
    Kmsd__V1__SealedRecord *r;
    int rc;

    if ((rc = ks_item_record(w->s, item, &r, err)) != 0) {
        return rc;
    }
    if (r->term == w->term && r->revoked_at == 0 &&
        (r->ciphertext.len != 0 || r->wrapped.len != 0)) {
        (*w->n)++;
    }
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    return 0;
}

/* A full walk of the record range through the shared read options: on the
 * raft thread (the only writer) it sees exactly the state before the entry
 * being applied. */
int ks_records_on_term(struct kms_store *s, uint32_t term, uint64_t *n, struct kms_err *err)
{
    const char prefix = KS_P_RECORD;
    struct term_walk w = {s, term, n};

    *n = 0;
    return ks_scan(s, NULL, &prefix, 1, NULL, 0, on_term_cb, &w, err);
}

int kms_store_records_on_term(struct kms_store *s, uint32_t term, uint64_t *n,
                              struct kms_err *err)
{
    return ks_records_on_term(s, term, n, err);
}

struct member_walk {
    struct kms_store *s;
    int (*cb)(void *arg, const Kmsd__V1__Member *m);
    void *arg;
};

static int member_cb(void *arg, const struct ks_item *item, struct kms_err *err)
{
    struct member_walk *w = arg;
    Kmsd__V1__Member *m;
    int rc;

    m = kmsd__v1__member__unpack(NULL, item->vlen, (const uint8_t *)item->v);
    if (m == NULL) {
        return kms_err_set(err, KMS_ECORRUPT, "store %s: a member does not parse", w->s->path);
    }
    rc = w->cb(w->arg, m);
    kmsd__v1__member__free_unpacked(m, NULL);
    return rc;
}

int kms_store_members_list(struct kms_store *s,
                           int (*cb)(void *arg, const Kmsd__V1__Member *m), void *arg,
                           struct kms_err *err)
{
    const char prefix = KS_P_MEMBER;
    struct member_walk w = {s, cb, arg};

    if (s == NULL || cb == NULL) {
        return kms_err_set(err, KMS_EINVAL, "members list: bad arguments");
    }
    return ks_scan_view(s, &prefix, 1, NULL, 0, member_cb, &w, err);
}

static int key_is(const struct ks_item *item, const char *key)
{
    return item->klen == strlen(key) && memcmp(item->k, key, item->klen) == 0;
}

static int digest_cb(void *arg, const struct ks_item *item, struct kms_err *err)
{
    EVP_MD_CTX *md = arg;
    uint8_t h[8];

    (void)err;
    if (key_is(item, KS_K_APPLIED) || key_is(item, KS_K_RESTORING) ||
        key_is(item, KS_K_ENTRYVER)) {
        return 0;
    }
    kms_put_be64(h, item->klen);
    EVP_DigestUpdate(md, h, 8);
    EVP_DigestUpdate(md, item->k, item->klen);
    kms_put_be64(h, item->vlen);
    EVP_DigestUpdate(md, h, 8);
    EVP_DigestUpdate(md, item->v, item->vlen);
    return 0;
}

int kms_store_digest(struct kms_store *s, uint8_t out[32], struct kms_err *err)
{
    EVP_MD_CTX *md = NULL;
    unsigned int dl = 0;
    int rc;

    if (s == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "digest: bad arguments");
    }
    md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        rc = kms_err_set(err, KMS_ECRYPTO, "digest: SHA-256 unavailable");
        goto out;
    }
    if ((rc = ks_scan_view(s, NULL, 0, NULL, 0, digest_cb, md, err)) != 0) {
        goto out;
    }
    if (EVP_DigestFinal_ex(md, out, &dl) != 1 || dl != 32) {
        rc = kms_err_set(err, KMS_ECRYPTO, "digest: SHA-256 failed");
    }
out:
    EVP_MD_CTX_free(md);
    return rc;
}
