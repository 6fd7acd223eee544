/*
 * Offline restore from a backup file (kms_backup_load; the file format and
 * its verification are in backup_file.c).
 */
#include "store_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct bk_load {
    struct kms_store *s;
    rocksdb_writebatch_t *wb;
    size_t batch_bytes;
    uint64_t records;
    struct kms_err *err;
};

static int bk_flush(struct bk_load *l)
{
    char *rerr = NULL;
    rocksdb_write(l->s->db, l->s->wopts, l->wb, &rerr);
    rocksdb_writebatch_clear(l->wb);
    l->batch_bytes = 0;
    if (rerr != NULL) {
        int rc = kms_err_set(l->err, KMS_ESTORE, "rocksdb write at %s: %s", l->s->path, rerr);
        free(rerr);
        return rc;
    }
    return 0;
}

static int bk_load_cb(void *arg, const uint8_t *k, size_t klen, const uint8_t *v, size_t vlen)
{
    struct bk_load *l = arg;
    /* Member metadata describes the old cluster's hosts: the new members
     * publish their own. Meta keys never appear in a body. */
    if (k[0] == KS_P_MEMBER || k[0] == KS_P_META) {
        return 0;
    }
    if (k[0] == KS_P_RECORD) {
        l->records++;
    }
    rocksdb_writebatch_put(l->wb, (const char *)k, klen, (const char *)v, vlen);
    l->batch_bytes += klen + vlen;
    return l->batch_bytes >= (4u << 20) ? bk_flush(l) : 0;
}

int kms_backup_load(struct kms_store *s, const char *path, struct kms_backup_info *info,
                    struct kms_err *err)
{
    struct bk_load l;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    uint8_t cnt[8];
    int rc;

    if (kms_store_applied_index(s) != 0 || kms_store_count(s) != 0 ||
        kms_store_keyring_get(s, &ek, NULL) == 0) {
        if (ek != NULL) {
            kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
        }
        return kms_err_set(err, KMS_EEXIST, "restore into %s: the store is not empty", s->path);
    }
    memset(&l, 0, sizeof(l));
    l.s = s;
    l.err = err;
    l.wb = rocksdb_writebatch_create();
    if (l.wb == NULL) {
        return kms_err_set(err, KMS_ENOMEM, NULL);
    }
    rc = kms_backup_verify(path, info, bk_load_cb, &l, err);
    if (rc == 0) {
        /* Applied index stays 0: the new cluster's raft log starts at 1 on
         * top of this state (every new member restores the same file). */
        kms_put_be64(cnt, l.records);
        rocksdb_writebatch_put(l.wb, KS_K_COUNT, strlen(KS_K_COUNT), (const char *)cnt, 8);
        rc = bk_flush(&l);
    }
    if (rc == 0) {
        atomic_store(&s->count, l.records);
    }
    rocksdb_writebatch_destroy(l.wb);
    return rc;
}
