/*
 * The RocksDB state machine: open/close, applying entries, reads, digest.
 * Snapshots, restore and the raft_fsm glue are in snapshot.c.
 */
#include "store_internal.h"
#include "kms_bytes.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "kms_log.h"

#define UUID_MAX 128
#define TOUCH_MAX 65536
#define REWRAP_MAX 1024

/* ---- small helpers ------------------------------------------------------ */

static void hex16(const uint8_t *id, char out[33])
{
    static const char hx[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hx[id[i] >> 4];
        out[2 * i + 1] = hx[id[i] & 15];
    }
    out[32] = '\0';
}

/* Takes ownership of a RocksDB error string and turns it into KMS_ESTORE. */
static int rdb_err(struct kms_store *s, char *rerr, const char *what, struct kms_err *err)
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
        return rdb_err(s, rerr, what, err);
    }
    return 0;
}

/* Point read. 0 with *val (free()) / KMS_ENOTFOUND / KMS_ESTORE. */
static int db_get(struct kms_store *s, const rocksdb_readoptions_t *ro, const void *key,
                  size_t klen, char **val, size_t *vlen, struct kms_err *err)
{
    char *rerr = NULL;
    *val = rocksdb_get(s->db, ro != NULL ? ro : s->ropts, key, klen, vlen, &rerr);
    if (rerr != NULL) {
        *val = NULL;
        return rdb_err(s, rerr, "get", err);
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
    int rc = db_get(s, NULL, key, strlen(key), &val, &vlen, err);
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

static void record_key(uint8_t k[17], const uint8_t *id)
{
    k[0] = KS_P_RECORD;
    memcpy(k + 1, id, 16);
}

/* 'U' uuid '\0' [key_id]: returns the length (prefix only when id NULL). */
static size_t uuid_key(uint8_t *k, const char *uuid, size_t ulen, const uint8_t *id)
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

static int uuid_valid(const char *uuid, size_t *ulen)
{
    if (uuid == NULL) {
        return 0;
    }
    *ulen = strlen(uuid);
    return *ulen >= 1 && *ulen <= UUID_MAX;
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
        rc = rdb_err(s, rerr, "open", err);
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

/* ---- applying ------------------------------------------------------------ */

struct apply_ctx {
    struct kms_store *s;
    rocksdb_writebatch_t *wb;
    struct kms_store_result *res;
    uint64_t index;
    int64_t count_delta;
    struct kms_err *err;
    const ProtobufCBinaryData *rekey_wrap; /* published once the batch is written */
};

static void result(struct apply_ctx *c, int code, uint64_t count, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void result(struct apply_ctx *c, int code, uint64_t count, const char *fmt, ...)
{
    va_list ap;
    c->res->code = code;
    c->res->count = count;
    va_start(ap, fmt);
    vsnprintf(c->res->msg, sizeof(c->res->msg), fmt, ap);
    va_end(ap);
}

/* Packs a protobuf message into a malloc()ed buffer. */
static int pack_msg(const ProtobufCMessage *m, uint8_t **buf, size_t *len, struct kms_err *err)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    *buf = malloc(n > 0 ? n : 1);
    if (*buf == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    *len = protobuf_c_message_pack(m, *buf);
    return 0;
}

/* Reads and unpacks the record key_id; KMS_ENOTFOUND, KMS_ECORRUPT, KMS_ESTORE. */
static int record_read(struct kms_store *s, const rocksdb_readoptions_t *ro, const uint8_t *id,
                       Kmsd__V1__SealedRecord **out, struct kms_err *err)
{
    uint8_t k[17];
    char *val = NULL;
    size_t vlen = 0;
    char hx[33];
    int rc;

    *out = NULL;
    record_key(k, id);
    rc = db_get(s, ro, k, sizeof(k), &val, &vlen, err);
    if (rc != 0) {
        goto out;
    }
    *out = kmsd__v1__sealed_record__unpack(NULL, vlen, (const uint8_t *)val);
    if (*out == NULL) {
        hex16(id, hx);
        rc = kms_err_set(err, KMS_ECORRUPT, "store %s: record %s does not parse", s->path, hx);
    }
out:
    free(val);
    return rc;
}

static int record_write(struct apply_ctx *c, const Kmsd__V1__SealedRecord *r)
{
    uint8_t k[17];
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = pack_msg(&r->base, &buf, &len, c->err);
    if (rc != 0) {
        return rc;
    }
    record_key(k, r->key_id.data);
    rocksdb_writebatch_put(c->wb, (const char *)k, sizeof(k), (const char *)buf, len);
    free(buf);
    return 0;
}

static int op_put_record(struct apply_ctx *c, const Kmsd__V1__PutRecord *op)
{
    const Kmsd__V1__SealedRecord *r = op->record;
    uint8_t k[17], uk[1 + UUID_MAX + 1 + 16];
    char *val = NULL;
    size_t vlen, ulen = 0;
    char hx[33];
    int rc;

    if (r == NULL || r->key_id.len != 16 || !uuid_valid(r->node_uuid, &ulen)) {
        result(c, KMS_EINVAL, 0, "put record: missing record, key id or node uuid");
        return 0;
    }
    hex16(r->key_id.data, hx);
    record_key(k, r->key_id.data);
    rc = db_get(c->s, NULL, k, sizeof(k), &val, &vlen, c->err);
    free(val);
    if (rc == 0) {
        result(c, KMS_EEXIST, 0, "key %s already exists", hx);
        return 0;
    }
    if (rc != KMS_ENOTFOUND) {
        return rc;
    }
    if ((rc = record_write(c, r)) != 0) {
        return rc;
    }
    rocksdb_writebatch_put(c->wb, (const char *)uk, uuid_key(uk, r->node_uuid, ulen, r->key_id.data),
                           "", 0);
    c->count_delta = 1;
    result(c, 0, 1, "key %s stored", hx);
    return 0;
}

/* Writes r revoked at `at` (if not yet revoked) and without its nonce and
 * ciphertext: only the audit metadata stays. r keeps its own buffers (they
 * are wiped here and freed by the caller's free_unpacked). Returns 0 and
 * sets *changed when something was written. */
static int record_shred(struct apply_ctx *c, Kmsd__V1__SealedRecord *r, int64_t at, bool *changed)
{
    ProtobufCBinaryData nonce = r->nonce, ct = r->ciphertext, wr = r->wrapped;
    int rc = 0;

    *changed = false;
    if (r->revoked_at != 0 && nonce.len == 0 && ct.len == 0 && wr.len == 0) {
        goto out; /* already revoked and shredded */
    }
    if (r->revoked_at == 0) {
        r->revoked_at = at;
    }
    r->nonce.len = 0;
    r->nonce.data = NULL;
    r->ciphertext.len = 0;
    r->ciphertext.data = NULL;
    r->wrapped.len = 0; /* a rewrapped record (origin_term stays, as metadata) */
    r->wrapped.data = NULL;
    rc = record_write(c, r);
    r->nonce = nonce;
    r->ciphertext = ct;
    r->wrapped = wr;
    if (ct.data != NULL) {
        OPENSSL_cleanse(ct.data, ct.len);
    }
    if (wr.data != NULL) {
        OPENSSL_cleanse(wr.data, wr.len);
    }
    if (rc == 0) {
        *changed = true;
        c->res->shred = true;
    }
out:
    return rc;
}

static int op_revoke_key(struct apply_ctx *c, const Kmsd__V1__RevokeKey *op)
{
    Kmsd__V1__SealedRecord *r = NULL;
    bool was, changed = false;
    char hx[33];
    int rc;

    if (op->key_id.len != 16 || op->revoked_at <= 0) {
        result(c, KMS_EINVAL, 0, "revoke: key id must be 16 bytes and revoked_at positive");
        return 0;
    }
    hex16(op->key_id.data, hx);
    rc = record_read(c->s, NULL, op->key_id.data, &r, c->err);
    if (rc == KMS_ENOTFOUND) {
        result(c, KMS_ENOTFOUND, 0, "key %s not found", hx);
        rc = 0;
        goto out;
    }
    if (rc != 0) {
        goto out;
    }
    was = r->revoked_at != 0;
    if ((rc = record_shred(c, r, op->revoked_at, &changed)) != 0) {
        goto out;
    }
    if (was) {
        /* Revoked before shredding existed: shredded now. */
        result(c, 0, 0, "key %s already revoked%s", hx, changed ? "; ciphertext shredded" : "");
        goto out;
    }
    result(c, 0, 1, "key %s revoked", hx);
out:
    if (r != NULL) {
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
    }
    return rc;
}

static int op_revoke_node(struct apply_ctx *c, const Kmsd__V1__RevokeNode *op)
{
    uint8_t prefix[1 + UUID_MAX + 1];
    size_t ulen = 0, plen;
    rocksdb_iterator_t *it = NULL;
    uint64_t seen = 0, revoked = 0;
    char *rerr = NULL;
    int rc = 0;

    if (!uuid_valid(op->node_uuid, &ulen) || op->revoked_at <= 0) {
        result(c, KMS_EINVAL, 0, "revoke node: node uuid must be 1..128 bytes, revoked_at positive");
        return 0;
    }
    plen = uuid_key(prefix, op->node_uuid, ulen, NULL);
    /* The raft thread is the only writer, so reading the DB while building
     * the batch sees exactly the state before this entry. */
    it = rocksdb_create_iterator(c->s->db, c->s->ropts);
    if (it == NULL) {
        return kms_err_set(c->err, KMS_ENOMEM, "out of memory");
    }
    for (rocksdb_iter_seek(it, (const char *)prefix, plen); rocksdb_iter_valid(it);
         rocksdb_iter_next(it)) {
        size_t klen;
        const char *k = rocksdb_iter_key(it, &klen);
        Kmsd__V1__SealedRecord *r = NULL;
        if (klen < plen || memcmp(k, prefix, plen) != 0) {
            break;
        }
        if (klen != plen + 16) {
            rc = kms_err_set(c->err, KMS_ECORRUPT, "store %s: bad node index key", c->s->path);
            goto out;
        }
        seen++;
        rc = record_read(c->s, NULL, (const uint8_t *)k + plen, &r, c->err);
        if (rc != 0) {
            if (rc == KMS_ENOTFOUND) {
                rc = kms_err_set(c->err, KMS_ECORRUPT,
                                 "store %s: node index names a missing record", c->s->path);
            }
            goto out;
        }
        {
            bool was = r->revoked_at != 0, changed = false;
            rc = record_shred(c, r, op->revoked_at, &changed);
            revoked += !was && changed;
        }
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
        if (rc != 0) {
            goto out;
        }
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = rdb_err(c->s, rerr, "iterate", c->err);
        goto out;
    }
    if (seen == 0) {
        result(c, KMS_ENOTFOUND, 0, "no keys for node %.64s", op->node_uuid);
    } else {
        result(c, 0, revoked, "%" PRIu64 " of %" PRIu64 " keys of node %.64s revoked", revoked,
               seen, op->node_uuid);
    }
out:
    rocksdb_iter_destroy(it);
    return rc;
}

/* The stored keyring into *out (NULL when the cluster has none: not an
 * error). 0, a RocksDB error, or KMS_ECORRUPT when it does not parse; the
 * caller frees *out. */
static int keyring_load(struct kms_store *s, Kmsd__V1__EncryptedKeyring **out,
                        struct kms_err *err)
{
    char *val = NULL;
    size_t vlen = 0;
    int rc;

    *out = NULL;
    rc = db_get(s, NULL, KS_K_KEYRING, strlen(KS_K_KEYRING), &val, &vlen, err);
    if (rc == KMS_ENOTFOUND) {
        return 0;
    }
    if (rc == 0) {
        *out = kmsd__v1__encrypted_keyring__unpack(NULL, vlen, (const uint8_t *)val);
        if (*out == NULL) {
            rc = kms_err_set(err, KMS_ECORRUPT, "store %s: stored keyring does not parse",
                             s->path);
        }
    }
    free(val);
    return rc;
}

static bool keyring_same_cluster(const Kmsd__V1__EncryptedKeyring *a,
                                 const Kmsd__V1__EncryptedKeyring *b)
{
    return a->cluster_id.len == b->cluster_id.len &&
           memcmp(a->cluster_id.data, b->cluster_id.data, a->cluster_id.len) == 0;
}

static int op_put_keyring(struct apply_ctx *c, const Kmsd__V1__PutKeyring *op)
{
    const Kmsd__V1__EncryptedKeyring *nk = op->keyring;
    Kmsd__V1__EncryptedKeyring *old = NULL;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    if (nk == NULL || nk->cluster_id.len == 0 || nk->ciphertext.len == 0) {
        result(c, KMS_EINVAL, 0, "put keyring: missing keyring, cluster id or ciphertext");
        return 0;
    }
    if ((rc = keyring_load(c->s, &old, c->err)) != 0) {
        goto out;
    }
    if (op->init && old != NULL) {
        result(c, KMS_EEXIST, 0, "cluster already initialised");
        goto out;
    }
    if (!op->init && old == NULL) {
        result(c, KMS_EUNINIT, 0, "cluster not initialised: nothing to rotate");
        goto out;
    }
    if (old != NULL) {
        if (!keyring_same_cluster(old, nk)) {
            result(c, KMS_EINVAL, 0, "rotate: keyring belongs to another cluster");
            goto out;
        }
        if (nk->active_term != 0 && nk->active_term <= old->active_term) {
            result(c, KMS_ERANGE, 0, "rotate: active term %u is not above %u (stale rotation)",
                   (unsigned)nk->active_term, (unsigned)old->active_term);
            goto out;
        }
    }
    if ((rc = pack_msg(&nk->base, &buf, &len, c->err)) != 0) {
        goto out;
    }
    rocksdb_writebatch_put(c->wb, KS_K_KEYRING, strlen(KS_K_KEYRING), (const char *)buf, len);
    result(c, 0, 1, "keyring %s, active term %u", op->init ? "initialised" : "rotated",
           (unsigned)nk->active_term);
out:
    free(buf);
    if (old != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(old, NULL);
    }
    return rc;
}

/* Rekey: the same keyring under a new root key (kms_store.h). The store
 * cannot decrypt either keyring; it checks what it can see: the cluster id,
 * the active term (a rekey never changes terms, so a rotation committed in
 * between makes a stale rekey fail here), the share parameters, the wrap's
 * size. */
static int op_rekey_keyring(struct apply_ctx *c, const Kmsd__V1__RekeyKeyring *op)
{
    const Kmsd__V1__EncryptedKeyring *nk = op->keyring;
    Kmsd__V1__EncryptedKeyring *old = NULL;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    /* Whatever the outcome, the entry holds a wrapped root key: shred it. */
    c->res->shred = true;
    if (nk == NULL || nk->cluster_id.len == 0 || nk->ciphertext.len == 0 ||
        op->wrapped_root.len == 0 || op->wrapped_root.len > KS_REKEY_WRAP_MAX) {
        result(c, KMS_EINVAL, 0, "rekey: missing keyring or wrapped root key");
        return 0;
    }
    if (nk->threshold < 2 || nk->share_count < nk->threshold || nk->share_count > 255) {
        result(c, KMS_EINVAL, 0, "rekey: %u shares with threshold %u",
               (unsigned)nk->share_count, (unsigned)nk->threshold);
        return 0;
    }
    if ((rc = keyring_load(c->s, &old, c->err)) != 0) {
        goto out;
    }
    if (old == NULL) {
        result(c, KMS_EUNINIT, 0, "cluster not initialised: nothing to rekey");
        goto out;
    }
    if (!keyring_same_cluster(old, nk)) {
        result(c, KMS_EINVAL, 0, "rekey: keyring belongs to another cluster");
        goto out;
    }
    if (nk->active_term != old->active_term) {
        result(c, KMS_ERANGE, 0, "rekey: active term %u differs from the current %u (stale "
               "rekey: the keyring changed meanwhile)",
               (unsigned)nk->active_term, (unsigned)old->active_term);
        goto out;
    }
    if ((rc = pack_msg(&nk->base, &buf, &len, c->err)) != 0) {
        goto out;
    }
    rocksdb_writebatch_put(c->wb, KS_K_KEYRING, strlen(KS_K_KEYRING), (const char *)buf, len);
    c->rekey_wrap = &op->wrapped_root;
    result(c, 0, 1, "keyring rekeyed: %u shares, threshold %u", (unsigned)nk->share_count,
           (unsigned)nk->threshold);
out:
    free(buf);
    if (old != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(old, NULL);
    }
    return rc;
}

void kms_store_rekey_wrap_take(struct kms_store *s, uint8_t *out, size_t cap, size_t *len,
                               uint64_t *index)
{
    *len = 0;
    *index = 0;
    pthread_mutex_lock(&s->rekey_mu);
    if (s->rekey_wrap_len > 0 && s->rekey_wrap_len <= cap) {
        memcpy(out, s->rekey_wrap, s->rekey_wrap_len);
        *len = s->rekey_wrap_len;
        *index = s->rekey_index;
    }
    OPENSSL_cleanse(s->rekey_wrap, sizeof(s->rekey_wrap));
    s->rekey_wrap_len = 0;
    pthread_mutex_unlock(&s->rekey_mu);
}

/* The peer unseal gate: close bumps the generation; reopen needs the
 * current generation and a 32-byte proof, which the store cannot check (it
 * has no key): every peer checks it before it serves (peer_unseal.c), so a
 * forged reopen only keeps the gate shut. */
static int op_set_peer_gate(struct apply_ctx *c, const Kmsd__V1__SetPeerUnsealGate *op)
{
    Kmsd__V1__PeerUnsealGate *cur = NULL;
    Kmsd__V1__PeerUnsealGate next = KMSD__V1__PEER_UNSEAL_GATE__INIT;
    char *val = NULL;
    size_t vlen = 0;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    rc = db_get(c->s, NULL, KS_K_PEER_GATE, strlen(KS_K_PEER_GATE), &val, &vlen, c->err);
    if (rc != 0 && rc != KMS_ENOTFOUND) {
        goto out;
    }
    if (rc == 0) {
        cur = kmsd__v1__peer_unseal_gate__unpack(NULL, vlen, (const uint8_t *)val);
        if (cur == NULL) {
            rc = kms_err_set(c->err, KMS_ECORRUPT, "store %s: stored peer unseal gate does not "
                             "parse", c->s->path);
            goto out;
        }
    }
    rc = 0;
    next.generation = cur != NULL ? cur->generation : 0;
    if (op->close) {
        next.generation++;
        next.closed = true;
    } else if (cur == NULL || !cur->closed || op->generation != cur->generation ||
               op->proof.len != 32) {
        result(c, KMS_ERANGE, 0, "peer unseal gate: reopen of generation %" PRIu64
               " refused (current %" PRIu64 ", %s)", op->generation, next.generation,
               cur != NULL && cur->closed ? "closed" : "open");
        goto out;
    } else {
        next.closed = false;
        next.proof = op->proof;
    }
    next.at = op->at;
    next.by_node = op->by_node;
    if ((rc = pack_msg(&next.base, &buf, &len, c->err)) != 0) {
        goto out;
    }
    rocksdb_writebatch_put(c->wb, KS_K_PEER_GATE, strlen(KS_K_PEER_GATE), (const char *)buf, len);
    result(c, 0, 1, "peer unseal gate %s (generation %" PRIu64 ")",
           next.closed ? "closed" : "reopened", next.generation);
out:
    free(val);
    free(buf);
    if (cur != NULL) {
        kmsd__v1__peer_unseal_gate__free_unpacked(cur, NULL);
    }
    return rc;
}

static void member_key(uint8_t k[9], uint64_t id)
{
    k[0] = KS_P_MEMBER;
    kms_put_be64(k + 1, id);
}

static int op_put_member(struct apply_ctx *c, const Kmsd__V1__PutMember *op)
{
    uint8_t k[9];
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    if (op->member == NULL || op->member->id == 0) {
        result(c, KMS_EINVAL, 0, "put member: missing member or id 0");
        return 0;
    }
    if ((rc = pack_msg(&op->member->base, &buf, &len, c->err)) != 0) {
        return rc;
    }
    member_key(k, op->member->id);
    rocksdb_writebatch_put(c->wb, (const char *)k, sizeof(k), (const char *)buf, len);
    free(buf);
    result(c, 0, 1, "member %" PRIu64 " stored", op->member->id);
    return 0;
}

static int op_remove_member(struct apply_ctx *c, const Kmsd__V1__RemoveMember *op)
{
    uint8_t k[9];
    char *val = NULL;
    size_t vlen;
    int rc;

    member_key(k, op->id);
    rc = db_get(c->s, NULL, k, sizeof(k), &val, &vlen, c->err);
    free(val);
    if (rc == KMS_ENOTFOUND) {
        result(c, KMS_ENOTFOUND, 0, "member %" PRIu64 " not found", op->id);
        return 0;
    }
    if (rc != 0) {
        return rc;
    }
    rocksdb_writebatch_delete(c->wb, (const char *)k, sizeof(k));
    result(c, 0, 1, "member %" PRIu64 " removed", op->id);
    return 0;
}

struct touch {
    const uint8_t *id;
    int64_t at;
};

static int touch_cmp(const void *a, const void *b)
{
    const struct touch *x = a, *y = b;
    return memcmp(x->id, y->id, 16);
}

static int op_touch_batch(struct apply_ctx *c, const Kmsd__V1__TouchBatch *op)
{
    struct touch *t = NULL;
    size_t n = 0;
    uint64_t updated = 0;
    int rc = 0;

    if (op->n_touches > TOUCH_MAX) {
        result(c, KMS_ERANGE, 0, "touch batch: %zu touches, limit %d", op->n_touches, TOUCH_MAX);
        return 0;
    }
    t = calloc(op->n_touches + 1, sizeof(*t));
    if (t == NULL) {
        return kms_err_set(c->err, KMS_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < op->n_touches; i++) {
        const Kmsd__V1__Touch *x = op->touches[i];
        if (x != NULL && x->key_id.len == 16) {
            t[n].id = x->key_id.data;
            t[n].at = x->at;
            n++;
        }
    }
    /* Sort so duplicates of one key collapse to their maximum and each key
     * is read and written once in the batch. */
    qsort(t, n, sizeof(*t), touch_cmp);
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        int64_t at = t[i].at;
        Kmsd__V1__SealedRecord *r = NULL;
        while (j < n && memcmp(t[j].id, t[i].id, 16) == 0) {
            at = t[j].at > at ? t[j].at : at;
            j++;
        }
        rc = record_read(c->s, NULL, t[i].id, &r, c->err);
        if (rc == KMS_ENOTFOUND) {
            rc = 0; /* revoked-and-gone or never existed: nothing to touch */
        } else if (rc == 0) {
            if (at > r->last_access_at) {
                r->last_access_at = at;
                rc = record_write(c, r);
                updated++;
            }
            kmsd__v1__sealed_record__free_unpacked(r, NULL);
        }
        if (rc != 0) {
            goto out;
        }
        i = j;
    }
    result(c, 0, updated, "%" PRIu64 " records touched", updated);
out:
    free(t);
    return rc;
}

/* Rewrap (kmsctl operator rewrap): each item replaces the wrapping of one
 * live record still at from_term; anything else (revoked, gone, already
 * moved by another rewrap) is skipped. Timestamps and the node index are
 * kept: only term, origin_term, nonce, ciphertext and wrapped change. */
static int op_rewrap_batch(struct apply_ctx *c, const Kmsd__V1__RewrapBatch *op)
{
    uint64_t done = 0, skipped = 0;
    int rc = 0;

    if (op->n_items > REWRAP_MAX) {
        result(c, KMS_ERANGE, 0, "rewrap: %zu items, limit %d", op->n_items, REWRAP_MAX);
        return 0;
    }
    for (size_t i = 0; i < op->n_items; i++) {
        const Kmsd__V1__RewrapItem *it = op->items[i];
        Kmsd__V1__SealedRecord *r = NULL;
        ProtobufCBinaryData nonce, ct, wr;
        if (it == NULL || it->key_id.len != 16 || it->origin_term == 0 ||
            it->origin_term >= it->term || it->wrapped.len == 0) {
            skipped++;
            continue;
        }
        rc = record_read(c->s, NULL, it->key_id.data, &r, c->err);
        if (rc == KMS_ENOTFOUND) {
            skipped++;
            rc = 0;
            continue;
        }
        if (rc != 0) {
            goto out;
        }
        if (r->revoked_at != 0 || r->term != it->from_term || r->term == it->term ||
            (r->origin_term != 0 && r->origin_term != it->origin_term)) {
            skipped++;
            kmsd__v1__sealed_record__free_unpacked(r, NULL);
            continue;
        }
        nonce = r->nonce;
        ct = r->ciphertext;
        wr = r->wrapped;
        r->term = it->term;
        r->origin_term = it->origin_term;
        r->nonce.len = 0;
        r->nonce.data = NULL;
        r->ciphertext.len = 0;
        r->ciphertext.data = NULL;
        r->wrapped = it->wrapped;
        rc = record_write(c, r);
        r->nonce = nonce;
        r->ciphertext = ct;
        r->wrapped = wr;
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
        if (rc != 0) {
            goto out;
        }
        done++;
    }
    result(c, 0, done, "%" PRIu64 " records rewrapped, %" PRIu64 " skipped", done, skipped);
out:
    return rc;
}

/* Live records (not revoked, holding ciphertext) on `term`: a full walk of
 * the record range (the raft thread is the only writer, so it sees exactly
 * the state before this entry). */
static int records_on_term(struct kms_store *s, uint32_t term, uint64_t *n, struct kms_err *err)
{
    rocksdb_iterator_t *it = rocksdb_create_iterator(s->db, s->ropts);
    char *rerr = NULL;
    const char prefix = KS_P_RECORD;
    int rc = 0;

    *n = 0;
    if (it == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    for (rocksdb_iter_seek(it, &prefix, 1); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t klen, vlen;
        const char *k = rocksdb_iter_key(it, &klen);
        const char *v;
        Kmsd__V1__SealedRecord *r;
        if (klen < 1 || k[0] != KS_P_RECORD) {
            break;
        }
        v = rocksdb_iter_value(it, &vlen);
        r = kmsd__v1__sealed_record__unpack(NULL, vlen, (const uint8_t *)v);
        if (r == NULL) {
            rc = kms_err_set(err, KMS_ECORRUPT, "store %s: a record does not parse", s->path);
            goto out;
        }
        if (r->term == term && r->revoked_at == 0 &&
            (r->ciphertext.len != 0 || r->wrapped.len != 0)) {
            (*n)++;
        }
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = rdb_err(s, rerr, "iterate", err);
    }
out:
    rocksdb_iter_destroy(it);
    return rc;
}

int kms_store_records_on_term(struct kms_store *s, uint32_t term, uint64_t *n,
                              struct kms_err *err)
{
    return records_on_term(s, term, n, err);
}

static int op_retire_term(struct apply_ctx *c, const Kmsd__V1__RetireTerm *op)
{
    const Kmsd__V1__EncryptedKeyring *nk = op->keyring;
    Kmsd__V1__EncryptedKeyring *old = NULL;
    size_t len = 0;
    uint8_t *buf = NULL;
    uint64_t n = 0;
    int rc;

    if (nk == NULL || nk->cluster_id.len == 0 || nk->ciphertext.len == 0 || op->term == 0) {
        result(c, KMS_EINVAL, 0, "retire term: missing keyring or term");
        return 0;
    }
    if ((rc = keyring_load(c->s, &old, c->err)) != 0) {
        goto out;
    }
    if (old == NULL) {
        result(c, KMS_EUNINIT, 0, "cluster not initialised");
        goto out;
    }
    if (!keyring_same_cluster(old, nk)) {
        result(c, KMS_EINVAL, 0, "retire term: keyring belongs to another cluster");
        goto out;
    }
    if (nk->active_term != old->active_term) {
        result(c, KMS_ERANGE, 0, "retire term: keyring has active term %u, cluster %u (stale)",
               (unsigned)nk->active_term, (unsigned)old->active_term);
        goto out;
    }
    if (op->term == old->active_term) {
        result(c, KMS_EINVAL, 0, "term %u is the active term: it cannot be retired",
               (unsigned)op->term);
        goto out;
    }
    if ((rc = records_on_term(c->s, op->term, &n, c->err)) != 0) {
        goto out;
    }
    if (n > 0) {
        result(c, KMS_EBUSY, 0,
               "term %u still protects %" PRIu64 " live records: run kmsctl operator rewrap first",
               (unsigned)op->term, n);
        goto out;
    }
    if ((rc = pack_msg(&nk->base, &buf, &len, c->err)) != 0) {
        goto out;
    }
    rocksdb_writebatch_put(c->wb, KS_K_KEYRING, strlen(KS_K_KEYRING), (const char *)buf, len);
    result(c, 0, 1, "term %u retired", (unsigned)op->term);
out:
    free(buf);
    if (old != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(old, NULL);
    }
    return rc;
}

/* Applies into a caller-provided result. Fatal errors are made sticky. */
static int apply_entry(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                       struct kms_store_result *res, struct kms_err *err)
{
    struct apply_ctx c;
    Kmsd__V1__Entry *e = NULL;
    uint8_t ab[8], cb[8];
    uint64_t applied = atomic_load(&s->applied);
    uint64_t count = atomic_load(&s->count);
    struct kms_err local;
    int rc;

    if (err == NULL) {
        kms_err_clear(&local);
        err = &local;
    }
    memset(res, 0, sizeof(*res));
    memset(&c, 0, sizeof(c));
    if ((rc = kms_store_fatal(s, err)) != 0) {
        return rc;
    }
    if (atomic_load(&s->restoring)) {
        rc = kms_err_set(err, KMS_ECORRUPT,
                         "apply entry %" PRIu64 ": store %s holds a half-restored snapshot", index,
                         s->path);
        return ks_set_fatal(s, rc, err);
    }
    if (index == 0) {
        return kms_err_set(err, KMS_EINVAL, "apply: index 0");
    }
    if (index <= applied) {
        res->skipped = true;
        /* A replayed revocation (after a crash or restart) may not have
         * finished shredding the old copies: report it so the caller
         * compacts and snapshots again. */
        if (kms_entry_decode(buf, len, &e, NULL) == 0) {
            res->shred = e->op_case == KMSD__V1__ENTRY__OP_REVOKE_KEY ||
                         e->op_case == KMSD__V1__ENTRY__OP_REVOKE_NODE ||
                         e->op_case == KMSD__V1__ENTRY__OP_REKEY_KEYRING;
            kmsd__v1__entry__free_unpacked(e, NULL);
            e = NULL;
        }
        snprintf(res->msg, sizeof(res->msg), "entry %" PRIu64 " already applied (applied %" PRIu64 ")",
                 index, applied);
        return 0;
    }
    if ((rc = kms_entry_decode(buf, len, &e, err)) != 0) {
        kms_err_wrap(err, rc, "raft entry %" PRIu64, index);
        return ks_set_fatal(s, rc, err);
    }
    c.s = s;
    c.res = res;
    c.index = index;
    c.err = err;
    c.wb = rocksdb_writebatch_create();
    if (c.wb == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    switch (e->op_case) {
    case KMSD__V1__ENTRY__OP_PUT_RECORD:
        rc = op_put_record(&c, e->put_record);
        break;
    case KMSD__V1__ENTRY__OP_REVOKE_KEY:
        rc = op_revoke_key(&c, e->revoke_key);
        break;
    case KMSD__V1__ENTRY__OP_REVOKE_NODE:
        rc = op_revoke_node(&c, e->revoke_node);
        break;
    case KMSD__V1__ENTRY__OP_PUT_KEYRING:
        rc = op_put_keyring(&c, e->put_keyring);
        break;
    case KMSD__V1__ENTRY__OP_PUT_MEMBER:
        rc = op_put_member(&c, e->put_member);
        break;
    case KMSD__V1__ENTRY__OP_REMOVE_MEMBER:
        rc = op_remove_member(&c, e->remove_member);
        break;
    case KMSD__V1__ENTRY__OP_TOUCH_BATCH:
        rc = op_touch_batch(&c, e->touch_batch);
        break;
    case KMSD__V1__ENTRY__OP_REWRAP_BATCH:
        rc = op_rewrap_batch(&c, e->rewrap_batch);
        break;
    case KMSD__V1__ENTRY__OP_RETIRE_TERM:
        rc = op_retire_term(&c, e->retire_term);
        break;
    case KMSD__V1__ENTRY__OP_NOOP:
        result(&c, 0, 0, "noop");
        break;
    case KMSD__V1__ENTRY__OP_REKEY_KEYRING:
        rc = op_rekey_keyring(&c, e->rekey_keyring);
        break;
    case KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE:
        rc = op_set_peer_gate(&c, e->set_peer_unseal_gate);
        break;
    default:
        rc = kms_err_set(err, KMS_ECORRUPT, "unknown op (case %d)", (int)e->op_case);
        break;
    }
    if (rc != 0) {
        goto out;
    }
    if (c.count_delta != 0) {
        count += (uint64_t)c.count_delta;
        kms_put_be64(cb, count);
        rocksdb_writebatch_put(c.wb, KS_K_COUNT, strlen(KS_K_COUNT), (const char *)cb, 8);
    }
    /* The applied index goes in the same batch as the state change: after a
     * crash RocksDB recovers a prefix of batches, so the stored index always
     * describes exactly the stored state. */
    kms_put_be64(ab, index);
    rocksdb_writebatch_put(c.wb, KS_K_APPLIED, strlen(KS_K_APPLIED), (const char *)ab, 8);
    /* The first entry of a higher version also records it (same batch): a
     * later downgrade finds the marker at open and refuses. */
    if (e->version > 1 && e->version > atomic_load(&s->entry_version)) {
        uint8_t vb[8];
        kms_put_be64(vb, e->version);
        rocksdb_writebatch_put(c.wb, KS_K_ENTRYVER, strlen(KS_K_ENTRYVER), (const char *)vb, 8);
    }
    if ((rc = ks_write(s, c.wb, "write", err)) != 0) {
        goto out;
    }
    if (e->version > atomic_load(&s->entry_version)) {
        atomic_store(&s->entry_version, e->version);
    }
    atomic_store(&s->count, count);
    atomic_store(&s->applied, index);
    if (c.rekey_wrap != NULL) {
        /* After the write: whoever takes the wrap reads the new keyring. */
        pthread_mutex_lock(&s->rekey_mu);
        memcpy(s->rekey_wrap, c.rekey_wrap->data, c.rekey_wrap->len);
        s->rekey_wrap_len = c.rekey_wrap->len;
        s->rekey_index = index;
        pthread_mutex_unlock(&s->rekey_mu);
    }
out:
    if (c.wb != NULL) {
        rocksdb_writebatch_destroy(c.wb);
    }
    if (e != NULL) {
        kmsd__v1__entry__free_unpacked(e, NULL);
    }
    if (rc != 0) {
        kms_err_wrap(err, rc, "apply raft entry %" PRIu64, index);
        memset(res, 0, sizeof(*res));
        return ks_set_fatal(s, rc, err);
    }
    return 0;
}

int kms_store_apply(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                    struct kms_store_result **result_out, struct kms_err *err)
{
    int rc;
    struct kms_store_result *res;

    if (result_out == NULL || s == NULL) {
        return kms_err_set(err, KMS_EINVAL, "apply: missing store or result");
    }
    *result_out = NULL;
    res = calloc(1, sizeof(*res));
    if (res == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "apply raft entry %" PRIu64 ": out of memory", index);
    }
    rc = apply_entry(s, index, buf, len, res, err);
    if (rc != 0) {
        free(res);
        return rc;
    }
    *result_out = res;
    return 0;
}

/* Exposed to snapshot.c without a header entry of its own. */
int ks_apply_into(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                  struct kms_store_result *res, struct kms_err *err);
int ks_apply_into(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                  struct kms_store_result *res, struct kms_err *err)
{
    return apply_entry(s, index, buf, len, res, err);
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
        rc = rdb_err(s, rerr, "flush", err);
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

/* ---- reads ------------------------------------------------------------- */

int kms_store_record_get(struct kms_store *s, const uint8_t key_id[16],
                         Kmsd__V1__SealedRecord **out, struct kms_err *err)
{
    int rc;
    char hx[33];

    if (s == NULL || key_id == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "record get: bad arguments");
    }
    rc = record_read(s, NULL, key_id, out, err);
    if (rc == KMS_ENOTFOUND) {
        hex16(key_id, hx);
        rc = kms_err_set(err, KMS_ENOTFOUND, "key %s not found", hx);
    }
    return rc;
}

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

int kms_store_records_list(struct kms_store *s, const char *node_uuid,
                           int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r), void *arg,
                           struct kms_err *err)
{
    return kms_store_records_list_after(s, node_uuid, NULL, cb, arg, err);
}

int kms_store_records_list_after(struct kms_store *s, const char *node_uuid,
                                 const uint8_t *after,
                                 int (*cb)(void *arg, const Kmsd__V1__SealedRecord *r),
                                 void *arg, struct kms_err *err)
{
    struct view v = {NULL, NULL};
    rocksdb_iterator_t *it = NULL;
    uint8_t prefix[1 + UUID_MAX + 1];
    size_t plen, ulen = 0;
    char *rerr = NULL;
    int rc;

    if (s == NULL || cb == NULL) {
        return kms_err_set(err, KMS_EINVAL, "records list: bad arguments");
    }
    if (node_uuid != NULL) {
        if (!uuid_valid(node_uuid, &ulen)) {
            return kms_err_set(err, KMS_EINVAL, "records list: node uuid must be 1..128 bytes");
        }
        plen = uuid_key(prefix, node_uuid, ulen, NULL);
    } else {
        prefix[0] = KS_P_RECORD;
        plen = 1;
    }
    if ((rc = view_open(s, &v, err)) != 0) {
        goto out;
    }
    it = rocksdb_create_iterator(s->db, v.ro);
    if (after != NULL) {
        /* Keys sort by key id within the prefix: start at prefix||after. */
        uint8_t start[sizeof(prefix) + 16];
        memcpy(start, prefix, plen);
        memcpy(start + plen, after, 16);
        rocksdb_iter_seek(it, (const char *)start, plen + 16);
    } else {
        rocksdb_iter_seek(it, (const char *)prefix, plen);
    }
    for (; rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t klen, vlen;
        const char *k = rocksdb_iter_key(it, &klen);
        Kmsd__V1__SealedRecord *r = NULL;
        if (klen < plen || memcmp(k, prefix, plen) != 0) {
            break;
        }
        if (after != NULL && klen == plen + 16 && memcmp(k + plen, after, 16) == 0) {
            continue; /* strictly after */
        }
        if (node_uuid == NULL) {
            const char *val = rocksdb_iter_value(it, &vlen);
            r = kmsd__v1__sealed_record__unpack(NULL, vlen, (const uint8_t *)val);
            if (r == NULL) {
                rc = kms_err_set(err, KMS_ECORRUPT, "store %s: a record does not parse", s->path);
                goto out;
            }
        } else {
            if (klen != plen + 16) {
                rc = kms_err_set(err, KMS_ECORRUPT, "store %s: bad node index key", s->path);
                goto out;
            }
            rc = record_read(s, v.ro, (const uint8_t *)k + plen, &r, err);
            if (rc == KMS_ENOTFOUND) {
                rc = kms_err_set(err, KMS_ECORRUPT, "store %s: node index names a missing record",
                                 s->path);
            }
            if (rc != 0) {
                goto out;
            }
        }
        rc = cb(arg, r);
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
        if (rc != 0) {
            goto out;
        }
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = rdb_err(s, rerr, "iterate", err);
    }
out:
    if (it != NULL) {
        rocksdb_iter_destroy(it);
    }
    view_close(s, &v);
    return rc;
}

int kms_store_records_count_live(struct kms_store *s, const char *node_uuid, uint64_t max,
                                 uint64_t *live, struct kms_err *err)
{
    struct view v = {NULL, NULL};
    rocksdb_iterator_t *it = NULL;
    uint8_t prefix[1 + UUID_MAX + 1];
    size_t plen, ulen = 0;
    char *rerr = NULL;
    int rc;

    if (s == NULL || live == NULL || !uuid_valid(node_uuid, &ulen)) {
        return kms_err_set(err, KMS_EINVAL, "records count: node uuid must be 1..128 bytes");
    }
    *live = 0;
    plen = uuid_key(prefix, node_uuid, ulen, NULL);
    if ((rc = view_open(s, &v, err)) != 0) {
        goto out;
    }
    it = rocksdb_create_iterator(s->db, v.ro);
    for (rocksdb_iter_seek(it, (const char *)prefix, plen); rocksdb_iter_valid(it) && *live < max;
         rocksdb_iter_next(it)) {
        size_t klen;
        const char *k = rocksdb_iter_key(it, &klen);
        Kmsd__V1__SealedRecord *r = NULL;
        if (klen < plen || memcmp(k, prefix, plen) != 0) {
            break;
        }
        if (klen != plen + 16) {
            rc = kms_err_set(err, KMS_ECORRUPT, "store %s: bad node index key", s->path);
            goto out;
        }
        rc = record_read(s, v.ro, (const uint8_t *)k + plen, &r, err);
        if (rc == KMS_ENOTFOUND) {
            rc = 0;
            continue;
        }
        if (rc != 0) {
            goto out;
        }
        *live += r->revoked_at == 0;
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = rdb_err(s, rerr, "iterate", err);
    }
out:
    if (it != NULL) {
        rocksdb_iter_destroy(it);
    }
    view_close(s, &v);
    return rc;
}

int kms_store_keyring_get(struct kms_store *s, Kmsd__V1__EncryptedKeyring **out,
                          struct kms_err *err)
{
    int rc;

    if (s == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "keyring get: bad arguments");
    }
    if ((rc = keyring_load(s, out, err)) == 0 && *out == NULL) {
        rc = kms_err_set(err, KMS_EUNINIT, "cluster not initialised: no keyring");
    }
    return rc;
}

int kms_store_peer_gate_get(struct kms_store *s, Kmsd__V1__PeerUnsealGate **out,
                            struct kms_err *err)
{
    char *val = NULL;
    size_t vlen = 0;
    int rc;

    if (s == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "peer gate get: bad arguments");
    }
    *out = NULL;
    rc = db_get(s, NULL, KS_K_PEER_GATE, strlen(KS_K_PEER_GATE), &val, &vlen, err);
    if (rc != 0) {
        goto out;
    }
    *out = kmsd__v1__peer_unseal_gate__unpack(NULL, vlen, (const uint8_t *)val);
    if (*out == NULL) {
        rc = kms_err_set(err, KMS_ECORRUPT, "store %s: stored peer unseal gate does not parse",
                         s->path);
    }
out:
    free(val);
    return rc;
}

int kms_store_members_list(struct kms_store *s,
                           int (*cb)(void *arg, const Kmsd__V1__Member *m), void *arg,
                           struct kms_err *err)
{
    struct view v = {NULL, NULL};
    rocksdb_iterator_t *it = NULL;
    const char prefix = KS_P_MEMBER;
    char *rerr = NULL;
    int rc;

    if (s == NULL || cb == NULL) {
        return kms_err_set(err, KMS_EINVAL, "members list: bad arguments");
    }
    if ((rc = view_open(s, &v, err)) != 0) {
        goto out;
    }
    it = rocksdb_create_iterator(s->db, v.ro);
    for (rocksdb_iter_seek(it, &prefix, 1); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t klen, vlen;
        const char *k = rocksdb_iter_key(it, &klen);
        const char *val;
        Kmsd__V1__Member *m;
        if (klen < 1 || k[0] != prefix) {
            break;
        }
        val = rocksdb_iter_value(it, &vlen);
        m = kmsd__v1__member__unpack(NULL, vlen, (const uint8_t *)val);
        if (m == NULL) {
            rc = kms_err_set(err, KMS_ECORRUPT, "store %s: a member does not parse", s->path);
            goto out;
        }
        rc = cb(arg, m);
        kmsd__v1__member__free_unpacked(m, NULL);
        if (rc != 0) {
            goto out;
        }
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = rdb_err(s, rerr, "iterate", err);
    }
out:
    if (it != NULL) {
        rocksdb_iter_destroy(it);
    }
    view_close(s, &v);
    return rc;
}

static void digest_item(EVP_MD_CTX *md, const char *k, size_t klen, const char *v, size_t vlen)
{
    uint8_t h[8];
    kms_put_be64(h, klen);
    EVP_DigestUpdate(md, h, 8);
    EVP_DigestUpdate(md, k, klen);
    kms_put_be64(h, vlen);
    EVP_DigestUpdate(md, h, 8);
    EVP_DigestUpdate(md, v, vlen);
}

int kms_store_digest(struct kms_store *s, uint8_t out[32], struct kms_err *err)
{
    struct view v = {NULL, NULL};
    rocksdb_iterator_t *it = NULL;
    EVP_MD_CTX *md = NULL;
    char *rerr = NULL;
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
    if ((rc = view_open(s, &v, err)) != 0) {
        goto out;
    }
    it = rocksdb_create_iterator(s->db, v.ro);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t klen, vlen;
        const char *k = rocksdb_iter_key(it, &klen);
        const char *val;
        if ((klen == strlen(KS_K_APPLIED) && memcmp(k, KS_K_APPLIED, klen) == 0) ||
            (klen == strlen(KS_K_RESTORING) && memcmp(k, KS_K_RESTORING, klen) == 0) ||
            (klen == strlen(KS_K_ENTRYVER) && memcmp(k, KS_K_ENTRYVER, klen) == 0)) {
            continue;
        }
        val = rocksdb_iter_value(it, &vlen);
        digest_item(md, k, klen, val, vlen);
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = rdb_err(s, rerr, "iterate", err);
        goto out;
    }
    if (EVP_DigestFinal_ex(md, out, &dl) != 1 || dl != 32) {
        rc = kms_err_set(err, KMS_ECRYPTO, "digest: SHA-256 failed");
    }
out:
    if (it != NULL) {
        rocksdb_iter_destroy(it);
    }
    view_close(s, &v);
    EVP_MD_CTX_free(md);
    return rc;
}
