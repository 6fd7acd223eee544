/*
 * Streaming export of a consistent point-in-time copy of the state
 * (kms_store_export_*, kms_store.h), for online backups: a RocksDB snapshot
 * is pinned at open and read in bounded chunks, so the whole state is never
 * held in memory. Entries use the body encoding of snapshot.c ({u32le klen,
 * u32le vlen, key, value, zero pad to 8}) without the 'X' meta keys, so a
 * backup body is a valid kms_store_snapshot() body.
 */
#include "store_internal.h"
#include "kms_bytes.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kms_store_export {
    struct kms_store *s;
    const rocksdb_snapshot_t *snap;
    rocksdb_readoptions_t *ro;
    rocksdb_iterator_t *it;
    uint64_t applied;
    bool done;
};

static size_t export_pad8(size_t n)
{
    return (n + 7u) & ~(size_t)7u;
}

int kms_store_export_open(struct kms_store *s, struct kms_store_export **out,
                          struct kms_err *err)
{
    struct kms_store_export *x;
    char *rerr = NULL, *v;
    size_t vlen = 0;
    int rc = 0;

    *out = NULL;
    x = calloc(1, sizeof(*x));
    if (x == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    x->s = s;
    x->snap = rocksdb_create_snapshot(s->db);
    x->ro = rocksdb_readoptions_create();
    if (x->snap == NULL || x->ro == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "export: cannot pin a RocksDB snapshot");
        goto out;
    }
    rocksdb_readoptions_set_snapshot(x->ro, x->snap);
    rocksdb_readoptions_set_fill_cache(x->ro, 0);
    v = rocksdb_get(s->db, x->ro, KS_K_RESTORING, strlen(KS_K_RESTORING), &vlen, &rerr);
    if (rerr == NULL && v != NULL) {
        free(v);
        rc = kms_err_set(err, KMS_EBUSY, "export of %s: a snapshot restore is half-way",
                         s->path);
        goto out;
    }
    free(rerr);
    rerr = NULL;
    v = rocksdb_get(s->db, x->ro, KS_K_APPLIED, strlen(KS_K_APPLIED), &vlen, &rerr);
    if (rerr != NULL) {
        rc = kms_err_set(err, KMS_ESTORE, "export of %s: %s", s->path, rerr);
        free(rerr);
        goto out;
    }
    if (v != NULL && vlen == 8) {
        x->applied = kms_get_be64((const uint8_t *)v);
    }
    free(v);
    x->it = rocksdb_create_iterator(s->db, x->ro);
    if (x->it == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "export: cannot create an iterator");
        goto out;
    }
    rocksdb_iter_seek_to_first(x->it);
    *out = x;
    x = NULL;
out:
    kms_store_export_close(x);
    return rc;
}

uint64_t kms_store_export_applied(const struct kms_store_export *x)
{
    return x->applied;
}

int kms_store_export_next(struct kms_store_export *x, uint8_t *buf, size_t cap, size_t *used,
                          uint64_t *entries, bool *done, struct kms_err *err)
{
    char *rerr = NULL;

    *used = 0;
    *entries = 0;
    *done = false;
    for (; rocksdb_iter_valid(x->it); rocksdb_iter_next(x->it)) {
        size_t klen, vlen, need;
        const char *k = rocksdb_iter_key(x->it, &klen);
        const char *v = rocksdb_iter_value(x->it, &vlen);
        if (klen > 0 && k[0] == KS_P_META) {
            continue;
        }
        if (klen > UINT32_MAX || vlen > UINT32_MAX) {
            return kms_err_set(err, KMS_ECORRUPT, "export of %s: oversized entry", x->s->path);
        }
        need = export_pad8(8 + klen + vlen);
        if (need > cap - *used) {
            if (*used == 0) {
                return kms_err_set(err, KMS_ERANGE,
                                   "export of %s: a %zu-byte entry exceeds the %zu-byte chunk",
                                   x->s->path, need, cap);
            }
            return 0; /* this entry starts the next chunk */
        }
        kms_put_le32(buf + *used, (uint32_t)klen);
        kms_put_le32(buf + *used + 4, (uint32_t)vlen);
        memcpy(buf + *used + 8, k, klen);
        memcpy(buf + *used + 8 + klen, v, vlen);
        memset(buf + *used + 8 + klen + vlen, 0, need - (8 + klen + vlen));
        *used += need;
        (*entries)++;
    }
    rocksdb_iter_get_error(x->it, &rerr);
    if (rerr != NULL) {
        int rc = kms_err_set(err, KMS_ESTORE, "rocksdb iterate at %s: %s", x->s->path, rerr);
        free(rerr);
        return rc;
    }
    *done = true;
    return 0;
}

void kms_store_export_close(struct kms_store_export *x)
{
    if (x == NULL) {
        return;
    }
    if (x->it != NULL) {
        rocksdb_iter_destroy(x->it);
    }
    if (x->ro != NULL) {
        rocksdb_readoptions_destroy(x->ro);
    }
    if (x->snap != NULL) {
        rocksdb_release_snapshot(x->s->db, x->snap);
    }
    free(x);
}
