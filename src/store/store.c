/*
 * The RocksDB state machine: open/close, the small helpers every store file
 * shares (store_internal.h), point record reads, shred compaction. Applying
 * entries is in store_apply.c and store_keyring.c, walks in store_scan.c,
 * reads in store_read.c; snapshots, restore and the raft_fsm glue in
 * snapshot.c.
 */
#include "store_internal.h"
#include "kms_bytes.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms_log.h"

/* ---- small helpers ------------------------------------------------------ */

void ks_hex16(const uint8_t *id, char out[33])
{
    static const char hx[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hx[id[i] >> 4];
        out[2 * i + 1] = hx[id[i] & 15];
    }
    out[32] = '\0';
}

/* Takes ownership of a RocksDB error string and turns it into KMS_ESTORE. */
int ks_rdb_err(struct kms_store *s, char *rerr, const char *what, struct kms_err *err)
{
    int rc = kms_err_set(err, KMS_ESTORE, "rocksdb %s at %s: %s", what, s->path,
                         rerr != NULL ? rerr : "unknown error");
    free(rerr);
    return rc;
}

int ks_set_fatal(struct kms_store *s, int code, struct kms_err *err)
{
    pthread_mutex_lock(&s->fatal_mu);
    if (s->fatal.code == 0) {
        s->fatal.code = code;
        snprintf(s->fatal.msg, sizeof(s->fatal.msg), "%s",
                 err != NULL && err->msg[0] ? err->msg : kms_strerror(code));
    }
    pthread_mutex_unlock(&s->fatal_mu);
    kms_log(KMS_LOG_ERROR, "store", "state machine stopped", "error",
            err != NULL && err->msg[0] ? err->msg : kms_strerror(code), "code", kms_errname(code),
            NULL);
    return code;
}

int kms_store_fatal(struct kms_store *s, struct kms_err *err)
{
    int code;
    pthread_mutex_lock(&s->fatal_mu);
    code = s->fatal.code;
    if (code != 0 && err != NULL) {
        *err = s->fatal;
    }
    pthread_mutex_unlock(&s->fatal_mu);
    return code;
}

int ks_write(struct kms_store *s, rocksdb_writebatch_t *wb, const char *what, struct kms_err *err)
{
    char *rerr = NULL;
    rocksdb_write(s->db, s->wopts, wb, &rerr);
    if (rerr != NULL) {
        return ks_rdb_err(s, rerr, what, err);
    }
    return 0;
}

/* Point read. 0 with *val (free()) / KMS_ENOTFOUND / KMS_ESTORE. */
int ks_get(struct kms_store *s, const rocksdb_readoptions_t *ro, const void *key, size_t klen,
           char **val, size_t *vlen, struct kms_err *err)
{
    char *rerr = NULL;
    *val = rocksdb_get(s->db, ro != NULL ? ro : s->ropts, key, klen, vlen, &rerr);
    if (rerr != NULL) {
        *val = NULL;
        return ks_rdb_err(s, rerr, "get", err);
    }
    if (*val == NULL) {
        return KMS_ENOTFOUND;
    }
    return 0;
}

static int get_u64(struct kms_store *s, const char *key, uint64_t *v, bool *found,
                   struct kms_err *err)
{
    char *val = NULL;
    size_t vlen = 0;
    int rc = ks_get(s, NULL, key, strlen(key), &val, &vlen, err);
    *v = 0;
    *found = false;
    if (rc == KMS_ENOTFOUND) {
        rc = 0;
        goto out;
    }
    if (rc != 0) {
        goto out;
    }
    if (vlen != 8) {
        rc = kms_err_set(err, KMS_ECORRUPT, "store %s: meta key %s has %zu bytes, want 8", s->path,
                         key, vlen);
        goto out;
    }
    *v = kms_get_be64((const uint8_t *)val);
    *found = true;
out:
    free(val);
    return rc;
}

void ks_record_key(uint8_t k[17], const uint8_t *id)
{
    k[0] = KS_P_RECORD;
    memcpy(k + 1, id, 16);
}

/* 'U' uuid '\0' [key_id]: returns the length (prefix only when id NULL). */
size_t ks_uuid_key(uint8_t *k, const char *uuid, size_t ulen, const uint8_t *id)
{
    k[0] = KS_P_UUID;
    memcpy(k + 1, uuid, ulen);
    k[1 + ulen] = '\0';
    if (id == NULL) {
        return ulen + 2;
    }
    memcpy(k + 2 + ulen, id, 16);
    return ulen + 18;
}

int ks_uuid_valid(const char *uuid, size_t *ulen)
{
    if (uuid == NULL) {
        return 0;
    }
    *ulen = strlen(uuid);
    return *ulen >= 1 && *ulen <= KS_UUID_MAX;
}

/* ---- open / close -------------------------------------------------------- */

static void store_free(struct kms_store *s)
{
    if (s == NULL) {
        return;
    }
    if (s->db != NULL) {
        if (s->snap_pending != NULL) {
            rocksdb_release_snapshot(s->db, s->snap_pending);
        }
        rocksdb_close(s->db);
    }
    if (s->opts != NULL) {
        rocksdb_options_destroy(s->opts);
    }
    if (s->bbopts != NULL) {
        rocksdb_block_based_options_destroy(s->bbopts);
    }
    if (s->cache != NULL) {
        rocksdb_cache_destroy(s->cache);
    }
    if (s->wopts != NULL) {
        rocksdb_writeoptions_destroy(s->wopts);
    }
    if (s->ropts != NULL) {
        rocksdb_readoptions_destroy(s->ropts);
    }
    OPENSSL_cleanse(s->rekey_wrap, sizeof(s->rekey_wrap));
    pthread_mutex_destroy(&s->rekey_mu);
    pthread_mutex_destroy(&s->fatal_mu);
    free(s->path);
    free(s);
}

int kms_store_open(const char *dir, struct kms_store **out, struct kms_err *err)
{
    int rc = 0;
    struct kms_store *s = NULL;
    char *rerr = NULL;
    uint64_t v;
    bool found;

    if (out == NULL || dir == NULL || dir[0] == '\0') {
        return kms_err_set(err, KMS_EINVAL, "store open: no directory");
    }
    *out = NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL || (s->path = strdup(dir)) == NULL) {
        free(s);
        return kms_err_set(err, KMS_ENOMEM, "store open %s: out of memory", dir);
    }
    pthread_mutex_init(&s->fatal_mu, NULL);
    pthread_mutex_init(&s->rekey_mu, NULL);
    atomic_init(&s->applied, 0);
    atomic_init(&s->count, 0);
    atomic_init(&s->restoring, false);
    atomic_init(&s->entry_version, 0);

    s->opts = rocksdb_options_create();
    s->bbopts = rocksdb_block_based_options_create();
    s->cache = rocksdb_cache_create_lru(32u << 20);
    s->wopts = rocksdb_writeoptions_create();
    s->ropts = rocksdb_readoptions_create();
    if (s->opts == NULL || s->bbopts == NULL || s->cache == NULL || s->wopts == NULL ||
        s->ropts == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "store open %s: out of memory", dir);
        goto out;
    }
    /* Point lookups by key_id dominate (every unseal): whole-key bloom filter
     * so a miss rarely touches a data block. */
    rocksdb_block_based_options_set_filter_policy(s->bbopts,
                                                  rocksdb_filterpolicy_create_bloom_full(10));
    rocksdb_block_based_options_set_block_cache(s->bbopts, s->cache);
    rocksdb_block_based_options_set_cache_index_and_filter_blocks(s->bbopts, 1);
    rocksdb_block_based_options_set_pin_l0_filter_and_index_blocks_in_cache(s->bbopts, 1);
    rocksdb_options_set_block_based_table_factory(s->opts, s->bbopts);
    rocksdb_options_set_create_if_missing(s->opts, 1);
    rocksdb_options_set_paranoid_checks(s->opts, 1);
    /* A torn WAL tail after a power cut is expected (no per-write fsync):
     * recover the consistent prefix; raft replays the rest. */
    rocksdb_options_set_wal_recovery_mode(s->opts, 2 /* kPointInTimeRecovery */);
    rocksdb_options_set_keep_log_file_num(s->opts, 4);
    rocksdb_options_set_max_log_file_size(s->opts, 8u << 20);
    /* Sealed ciphertext does not compress; keys are small. */
    rocksdb_options_set_compression(s->opts, rocksdb_no_compression);
    rocksdb_options_set_skip_stats_update_on_db_open(s->opts, 1);
    rocksdb_writeoptions_set_sync(s->wopts, 0);
    rocksdb_writeoptions_disable_WAL(s->wopts, 0);

    s->db = rocksdb_open(s->opts, dir, &rerr);
    if (rerr != NULL) {
        s->db = NULL;
        rc = ks_rdb_err(s, rerr, "open", err);
        goto out;
    }
    if ((rc = get_u64(s, KS_K_APPLIED, &v, &found, err)) != 0) {
        goto out;
    }
    atomic_store(&s->applied, v);
    if ((rc = get_u64(s, KS_K_COUNT, &v, &found, err)) != 0) {
        goto out;
    }
    atomic_store(&s->count, v);
    if ((rc = get_u64(s, KS_K_ENTRYVER, &v, &found, err)) != 0) {
        goto out;
    }
    if (found && v > KMS_ENTRY_VERSION) {
        /* Refuse before raft replays anything: the log and the state hold
         * entries this software would refuse or misread. */
        rc = kms_err_set(err, KMS_EVERSION,
                         "data dir %s holds raft entries of entry version %" PRIu64
                         ", written by a newer kmsd; this kmsd (" KMSD_VERSION
                         ") understands entry versions up to %u: a downgrade past an entry "
                         "version is not supported (run the newer kmsd, or restore a snapshot "
                         "taken before the upgrade; docs/operations.md \"Upgrades\")",
                         dir, v, (unsigned)KMS_ENTRY_VERSION);
        goto out;
    }
    atomic_store(&s->entry_version, found ? (uint32_t)v : 0);
    if ((rc = get_u64(s, KS_K_RESTORING, &v, &found, err)) != 0) {
        goto out;
    }
    if (found) {
        /* A restore was interrupted: the contents are a mix. Claim nothing
         * applied so the next restore (raft calls it at start with the same
         * snapshot) rewrites everything. */
        kms_logf(KMS_LOG_WARN, "store",
                 "%s: interrupted snapshot restore (to index %" PRIu64 ") found; "
                 "waiting for raft to restore again",
                 dir, v);
        atomic_store(&s->restoring, true);
        atomic_store(&s->applied, 0);
    }
    *out = s;
    s = NULL;
out:
    if (s != NULL) {
        store_free(s);
    }
    return rc;
}

void kms_store_close(struct kms_store *s)
{
    if (s == NULL) {
        return;
    }
    if (s->db != NULL) {
        /* Flush so the next open has no WAL to replay (fast restart). Best
         * effort: the WAL still holds everything if this fails. */
        rocksdb_flushoptions_t *fo = rocksdb_flushoptions_create();
        char *rerr = NULL;
        if (fo != NULL) {
            rocksdb_flushoptions_set_wait(fo, 1);
            rocksdb_flush(s->db, fo, &rerr);
            rocksdb_flushoptions_destroy(fo);
        }
        if (rerr != NULL) {
            kms_logf(KMS_LOG_WARN, "store", "flush at close of %s: %s", s->path, rerr);
            free(rerr);
        }
    }
    store_free(s);
}

uint32_t kms_store_entry_version(struct kms_store *s)
{
    uint32_t v = atomic_load(&s->entry_version);
    return v == 0 ? 1 : v;
}

uint64_t kms_store_applied_index(struct kms_store *s)
{
    return atomic_load(&s->applied);
}

bool kms_store_restoring(struct kms_store *s)
{
    return atomic_load(&s->restoring);
}

uint64_t kms_store_count(struct kms_store *s)
{
    return atomic_load(&s->count);
}

void kms_store_result_free(struct kms_store_result *r)
{
    free(r);
}

/* ---- point reads, compaction --------------------------------------------- */

/* Reads and unpacks the record key_id; KMS_ENOTFOUND, KMS_ECORRUPT, KMS_ESTORE. */
int ks_record_read(struct kms_store *s, const rocksdb_readoptions_t *ro, const uint8_t *id,
                   Kmsd__V1__SealedRecord **out, struct kms_err *err)
{
    uint8_t k[17];
    char *val = NULL;
    size_t vlen = 0;
    char hx[33];
    int rc;

    *out = NULL;
    ks_record_key(k, id);
    rc = ks_get(s, ro, k, sizeof(k), &val, &vlen, err);
    if (rc != 0) {
        goto out;
    }
    *out = kmsd__v1__sealed_record__unpack(NULL, vlen, (const uint8_t *)val);
    if (*out == NULL) {
        ks_hex16(id, hx);
        rc = kms_err_set(err, KMS_ECORRUPT, "store %s: record %s does not parse", s->path, hx);
    }
out:
    free(val);
    return rc;
}

int kms_store_shred_compact(struct kms_store *s, struct kms_err *err)
{
    rocksdb_flushoptions_t *fo = NULL;
    rocksdb_compactoptions_t *co = NULL;
    char *rerr = NULL;
    const char start[1] = {KS_P_RECORD}, limit[1] = {KS_P_RECORD + 1};
    int rc = 0;

    if (s == NULL) {
        return kms_err_set(err, KMS_EINVAL, "shred compact: no store");
    }
    fo = rocksdb_flushoptions_create();
    co = rocksdb_compactoptions_create();
    if (fo == NULL || co == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "shred compact: out of memory");
        goto out;
    }
    /* The memtable (and so the WAL that backs it) holds the old record
     * value: flush it to an SST, which makes the WAL obsolete (RocksDB
     * deletes obsolete WAL files: no archive TTL is set). */
    rocksdb_flushoptions_set_wait(fo, 1);
    rocksdb_flush(s->db, fo, &rerr);
    if (rerr != NULL) {
        rc = ks_rdb_err(s, rerr, "flush", err);
        goto out;
    }
    /* Rewrite every SST holding record keys, the bottommost level too, so no
     * older version of a record survives; the replaced files are deleted. */
    rocksdb_compactoptions_set_exclusive_manual_compaction(co, 0);
    rocksdb_compactoptions_set_bottommost_level_compaction(co, 2 /* kForce */);
    rocksdb_compact_range_opt(s->db, co, start, sizeof(start), limit, sizeof(limit));
    /* And the keyring key: after a rekey, its older value is the keyring
     * under the old root key (docs/security.md "Rekey"). */
    rocksdb_compact_range_opt(s->db, co, KS_K_KEYRING, strlen(KS_K_KEYRING), KS_K_KEYRING "\x01",
                              strlen(KS_K_KEYRING) + 1);
out:
    if (fo != NULL) {
        rocksdb_flushoptions_destroy(fo);
    }
    if (co != NULL) {
        rocksdb_compactoptions_destroy(co);
    }
    return rc;
}

