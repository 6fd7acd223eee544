/*
 * The one key-range walk every scan of the store goes through (apply's
 * revoke-node and retire-term checks, the readers' lists, counts and
 * digest): iterator, seek, prefix check, iterator error, cleanup.
 */
#include "store_internal.h"

#include <stdlib.h>
#include <string.h>

/* A read-only view: readoptions bound to a fresh RocksDB snapshot. */
struct view {
    const rocksdb_snapshot_t *snap;
    rocksdb_readoptions_t *ro;
};

static int view_open(struct kms_store *s, struct view *v, struct kms_err *err)
{
    v->ro = rocksdb_readoptions_create();
    if (v->ro == NULL) {
        v->snap = NULL;
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    v->snap = rocksdb_create_snapshot(s->db);
    rocksdb_readoptions_set_snapshot(v->ro, v->snap);
    return 0;
}

static void view_close(struct kms_store *s, struct view *v)
{
    if (v->ro != NULL) {
        rocksdb_readoptions_destroy(v->ro);
    }
    if (v->snap != NULL) {
        rocksdb_release_snapshot(s->db, v->snap);
    }
}

int ks_scan(struct kms_store *s, const rocksdb_readoptions_t *ro, const void *prefix,
            size_t plen, const void *start, size_t slen, ks_scan_cb cb, void *arg,
            struct kms_err *err)
{
    struct ks_item item;
    rocksdb_iterator_t *it;
    char *rerr = NULL;
    int rc = 0;

    item.ro = ro != NULL ? ro : s->ropts;
    it = rocksdb_create_iterator(s->db, item.ro);
    if (it == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    if (start == NULL) {
        start = prefix;
        slen = plen;
    }
    if (slen == 0) {
        rocksdb_iter_seek_to_first(it);
    } else {
        rocksdb_iter_seek(it, (const char *)start, slen);
    }
    for (; rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        item.k = rocksdb_iter_key(it, &item.klen);
        if (item.klen < plen || (plen > 0 && memcmp(item.k, prefix, plen) != 0)) {
            break;
        }
        item.v = rocksdb_iter_value(it, &item.vlen);
        if ((rc = cb(arg, &item, err)) != 0) {
            goto out;
        }
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = ks_rdb_err(s, rerr, "iterate", err);
    }
out:
    rocksdb_iter_destroy(it);
    return rc;
}

int ks_scan_view(struct kms_store *s, const void *prefix, size_t plen, const void *start,
                 size_t slen, ks_scan_cb cb, void *arg, struct kms_err *err)
{
    struct view v = {NULL, NULL};
    int rc;

    if ((rc = view_open(s, &v, err)) == 0) {
        rc = ks_scan(s, v.ro, prefix, plen, start, slen, cb, arg, err);
    }
    view_close(s, &v);
    return rc;
}

int ks_item_record(struct kms_store *s, const struct ks_item *item, Kmsd__V1__SealedRecord **r,
                   struct kms_err *err)
{
    *r = kmsd__v1__sealed_record__unpack(NULL, item->vlen, (const uint8_t *)item->v);
    if (*r == NULL) {
        return kms_err_set(err, KMS_ECORRUPT, "store %s: a record does not parse", s->path);
    }
    return 0;
}

int ks_item_indexed(struct kms_store *s, const struct ks_item *item, size_t plen,
                    bool skip_missing, Kmsd__V1__SealedRecord **r, struct kms_err *err)
{
    int rc;

    *r = NULL;
    if (item->klen != plen + 16) {
        return kms_err_set(err, KMS_ECORRUPT, "store %s: bad node index key", s->path);
    }
    rc = ks_record_read(s, item->ro, (const uint8_t *)item->k + plen, r, err);
    if (rc == KMS_ENOTFOUND) {
        rc = skip_missing ? 0
                          : kms_err_set(err, KMS_ECORRUPT,
                                        "store %s: node index names a missing record", s->path);
    }
    return rc;
}
