/*
 * Snapshots of the whole state, restore, and the raft_fsm glue.
 *
 * Snapshot format, version 1 (all integers little endian, everything
 * 8-byte aligned so canonical raft 0.15 keeps it intact):
 *   0  2  magic "KS"
 *   2  1  version = 1
 *   3  5  reserved, 0
 *   8  8  raft_index: raft index the snapshot was taken at
 *  16  8  state_index: the store's applied index the contents correspond to
 *  24  8  entry count
 *  32  8  body length in bytes
 *  40 32  SHA-256 of the body
 *  72     body: entries {u32 klen, u32 vlen, key, value, zero pad to 8}
 * The 'X' meta keys (applied index, record count, restore marker) are not in
 * the body: the header carries the index and restore recounts the records.
 */
#include "store_internal.h"
#include "kms_bytes.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "kms_log.h"

#define SNAP_VERSION 1
#define SNAP_HDR_LEN 72
#define SNAP_CHUNK (4u << 20)
#define RESTORE_BATCH_BYTES (8u << 20)

static size_t pad8(size_t n)
{
    return (n + 7u) & ~(size_t)7u;
}

static bool is_meta_key(const char *k, size_t klen)
{
    return klen >= 1 && k[0] == KS_P_META;
}

/* ---- writing ------------------------------------------------------------ */

struct snapw {
    struct raft_buffer *bufs; /* raft_malloc()ed array */
    unsigned n, cap;
    size_t used; /* bytes used in bufs[n - 1] */
    size_t size; /* capacity of bufs[n - 1] */
    EVP_MD_CTX *md;
    uint64_t entries;
    uint64_t body_len;
};

void kms_store_snapshot_free(struct raft_buffer *bufs, unsigned n_bufs)
{
    if (bufs == NULL) {
        return;
    }
    for (unsigned i = 0; i < n_bufs; i++) {
        raft_free(bufs[i].base);
    }
    raft_free(bufs);
}

static int snapw_chunk(struct snapw *w, size_t need)
{
    size_t size = need > SNAP_CHUNK ? need : SNAP_CHUNK;
    void *p;
    if (w->n > 0) {
        w->bufs[w->n - 1].len = w->used;
    }
    if (w->n == w->cap) {
        unsigned cap = w->cap ? w->cap * 2 : 8;
        struct raft_buffer *nb = raft_realloc(w->bufs, cap * sizeof(*nb));
        if (nb == NULL) {
            return KMS_ENOMEM;
        }
        w->bufs = nb;
        w->cap = cap;
    }
    p = raft_malloc(size);
    if (p == NULL) {
        return KMS_ENOMEM;
    }
    w->bufs[w->n].base = p;
    w->bufs[w->n].len = 0;
    w->n++;
    w->used = 0;
    w->size = size;
    return 0;
}

static int snapw_add(struct snapw *w, const char *k, size_t klen, const char *v, size_t vlen)
{
    size_t need = 8 + pad8(klen + vlen);
    uint8_t *p;
    int rc;

    if (klen > UINT32_MAX || vlen > UINT32_MAX) {
        return KMS_ERANGE;
    }
    if (w->used + need > w->size && (rc = snapw_chunk(w, need)) != 0) {
        return rc;
    }
    p = (uint8_t *)w->bufs[w->n - 1].base + w->used;
    memset(p, 0, need);
    kms_put_le32(p, (uint32_t)klen);
    kms_put_le32(p + 4, (uint32_t)vlen);
    memcpy(p + 8, k, klen);
    memcpy(p + 8 + klen, v, vlen);
    if (EVP_DigestUpdate(w->md, p, need) != 1) {
        return KMS_ECRYPTO;
    }
    w->used += need;
    w->body_len += need;
    w->entries++;
    return 0;
}

/* Serialises the state as of RocksDB snapshot `snap` (not released here). */
static int snapshot_from(struct kms_store *s, const rocksdb_snapshot_t *snap, uint64_t raft_index,
                         struct raft_buffer **bufs, unsigned *n_bufs, struct kms_err *err);

int kms_store_snapshot(struct kms_store *s, uint64_t raft_index, struct raft_buffer **bufs,
                       unsigned *n_bufs, struct kms_err *err)
{
    const rocksdb_snapshot_t *snap;
    int rc;

    if (s == NULL || bufs == NULL || n_bufs == NULL) {
        return kms_err_set(err, KMS_EINVAL, "snapshot: bad arguments");
    }
    snap = rocksdb_create_snapshot(s->db);
    rc = snapshot_from(s, snap, raft_index, bufs, n_bufs, err);
    rocksdb_release_snapshot(s->db, snap);
    return rc;
}

static int snapshot_from(struct kms_store *s, const rocksdb_snapshot_t *snap, uint64_t raft_index,
                         struct raft_buffer **bufs, unsigned *n_bufs, struct kms_err *err)
{
    struct snapw w;
    rocksdb_readoptions_t *ro = NULL;
    rocksdb_iterator_t *it = NULL;
    uint64_t state_index = 0;
    uint8_t *h;
    unsigned int dl = 0;
    char *rerr = NULL;
    int rc = 0;

    *bufs = NULL;
    *n_bufs = 0;
    memset(&w, 0, sizeof(w));
    w.md = EVP_MD_CTX_new();
    if (w.md == NULL || EVP_DigestInit_ex(w.md, EVP_sha256(), NULL) != 1) {
        rc = kms_err_set(err, KMS_ECRYPTO, "snapshot: SHA-256 unavailable");
        goto out;
    }
    if ((rc = snapw_chunk(&w, SNAP_CHUNK)) != 0) {
        rc = kms_err_set(err, rc, "snapshot: out of memory");
        goto out;
    }
    w.used = SNAP_HDR_LEN; /* header filled in at the end */

    ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_snapshot(ro, snap);
    rocksdb_readoptions_set_fill_cache(ro, 0);
    it = rocksdb_create_iterator(s->db, ro);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t klen, vlen;
        const char *k = rocksdb_iter_key(it, &klen);
        const char *v = rocksdb_iter_value(it, &vlen);
        if (is_meta_key(k, klen)) {
            if (klen == strlen(KS_K_APPLIED) && memcmp(k, KS_K_APPLIED, klen) == 0 && vlen == 8) {
                state_index = kms_get_be64((const uint8_t *)v);
            } else if (klen == strlen(KS_K_RESTORING) && memcmp(k, KS_K_RESTORING, klen) == 0) {
                rc = kms_err_set(err, KMS_EBUSY, "snapshot of %s: a restore is half-way", s->path);
                goto out;
            }
            continue;
        }
        if ((rc = snapw_add(&w, k, klen, v, vlen)) != 0) {
            rc = kms_err_set(err, rc, "snapshot of %s: %s", s->path, kms_strerror(rc));
            goto out;
        }
    }
    rocksdb_iter_get_error(it, &rerr);
    if (rerr != NULL) {
        rc = kms_err_set(err, KMS_ESTORE, "rocksdb iterate at %s: %s", s->path, rerr);
        free(rerr);
        goto out;
    }
    w.bufs[w.n - 1].len = w.used;

    h = w.bufs[0].base;
    memset(h, 0, SNAP_HDR_LEN);
    h[0] = 'K';
    h[1] = 'S';
    h[2] = SNAP_VERSION;
    kms_put_le64(h + 8, raft_index != 0 ? raft_index : state_index);
    kms_put_le64(h + 16, state_index);
    kms_put_le64(h + 24, w.entries);
    kms_put_le64(h + 32, w.body_len);
    if (EVP_DigestFinal_ex(w.md, h + 40, &dl) != 1 || dl != 32) {
        rc = kms_err_set(err, KMS_ECRYPTO, "snapshot: SHA-256 failed");
        goto out;
    }
    *bufs = w.bufs;
    *n_bufs = w.n;
    w.bufs = NULL;
    w.n = 0;
out:
    if (it != NULL) {
        rocksdb_iter_destroy(it);
    }
    if (ro != NULL) {
        rocksdb_readoptions_destroy(ro);
    }
    kms_store_snapshot_free(w.bufs, w.n);
    EVP_MD_CTX_free(w.md);
    return rc;
}

/* ---- restoring ------------------------------------------------------------ */

struct snap_hdr {
    uint64_t raft_index;
    uint64_t state_index;
    uint64_t entries;
    uint64_t body_len;
};

/* Verifies the header, then (unless header_only) the body digest and the
 * body's structure. */
static int snap_check(const uint8_t *p, size_t len, bool header_only, struct snap_hdr *h,
                      struct kms_err *err)
{
    uint8_t md[32];
    unsigned int dl = 0;
    size_t off;
    uint64_t n = 0;

    if (p == NULL || len < SNAP_HDR_LEN || p[0] != 'K' || p[1] != 'S') {
        return kms_err_set(err, KMS_ECORRUPT, "snapshot: bad header (%zu bytes)", len);
    }
    if (p[2] != SNAP_VERSION) {
        return kms_err_set(err, KMS_EVERSION, "snapshot: format version %u, supported %u", p[2],
                           (unsigned)SNAP_VERSION);
    }
    for (int i = 3; i < 8; i++) {
        if (p[i] != 0) {
            return kms_err_set(err, KMS_ECORRUPT, "snapshot: reserved header bytes set");
        }
    }
    h->raft_index = kms_get_le64(p + 8);
    h->state_index = kms_get_le64(p + 16);
    h->entries = kms_get_le64(p + 24);
    h->body_len = kms_get_le64(p + 32);
    if (h->body_len != len - SNAP_HDR_LEN) {
        return kms_err_set(err, KMS_ECORRUPT, "snapshot: body is %zu bytes, header says %" PRIu64,
                           len - SNAP_HDR_LEN, h->body_len);
    }
    if (header_only) {
        return 0;
    }
    if (EVP_Digest(p + SNAP_HDR_LEN, len - SNAP_HDR_LEN, md, &dl, EVP_sha256(), NULL) != 1 ||
        dl != 32) {
        return kms_err_set(err, KMS_ECRYPTO, "snapshot: SHA-256 failed");
    }
    if (CRYPTO_memcmp(md, p + 40, 32) != 0) {
        return kms_err_set(err, KMS_ECHECKSUM, "snapshot: body checksum mismatch");
    }
    for (off = SNAP_HDR_LEN; off < len; n++) {
        size_t klen, vlen;
        if (len - off < 8) {
            return kms_err_set(err, KMS_ECORRUPT, "snapshot: truncated entry %" PRIu64, n);
        }
        klen = kms_get_le32(p + off);
        vlen = kms_get_le32(p + off + 4);
        if (klen == 0 || pad8(klen + vlen) > len - off - 8) {
            return kms_err_set(err, KMS_ECORRUPT, "snapshot: bad entry %" PRIu64, n);
        }
        off += 8 + pad8(klen + vlen);
    }
    if (n != h->entries) {
        return kms_err_set(err, KMS_ECORRUPT, "snapshot: %" PRIu64 " entries, header says %" PRIu64,
                           n, h->entries);
    }
    return 0;
}

int kms_store_restore(struct kms_store *s, const void *buf, size_t len, bool *skipped,
                      struct kms_err *err)
{
    const uint8_t *p = buf;
    struct snap_hdr h;
    rocksdb_writebatch_t *wb = NULL;
    uint8_t v8[8];
    uint64_t records = 0;
    size_t off, batch_bytes = 0;
    struct kms_err local;
    int rc;

    if (err == NULL) {
        kms_err_clear(&local);
        err = &local;
    }
    if (skipped != NULL) {
        *skipped = false;
    }
    if (s == NULL) {
        return kms_err_set(err, KMS_EINVAL, "restore: no store");
    }
    if ((rc = kms_store_fatal(s, err)) != 0) {
        return rc;
    }
    /* The header alone decides whether the body is needed: a start-up with
     * a DB at or past the snapshot does not read the body at all. */
    if ((rc = snap_check(p, len, true, &h, err)) != 0) {
        return rc; /* nothing was touched: the store is still good */
    }
    if (!atomic_load(&s->restoring) && h.state_index <= atomic_load(&s->applied)) {
        kms_logf(KMS_LOG_INFO, "store",
                 "snapshot at index %" PRIu64 " (state %" PRIu64 ") not restored: %s already "
                 "holds index %" PRIu64,
                 h.raft_index, h.state_index, s->path, atomic_load(&s->applied));
        if (skipped != NULL) {
            *skipped = true;
        }
        return 0;
    }
    if ((rc = snap_check(p, len, false, &h, err)) != 0) {
        return rc;
    }
    kms_logf(KMS_LOG_INFO, "store",
             "restoring snapshot at index %" PRIu64 " (state %" PRIu64 ", %" PRIu64
             " keys) into %s",
             h.raft_index, h.state_index, h.entries, s->path);

    /* From here a failure leaves a half-restored store: fatal. */
    atomic_store(&s->restoring, true);
    atomic_store(&s->applied, 0);
    wb = rocksdb_writebatch_create();
    kms_put_be64(v8, h.state_index);
    rocksdb_writebatch_put(wb, KS_K_RESTORING, strlen(KS_K_RESTORING), (const char *)v8, 8);
    rocksdb_writebatch_delete_range(wb, "", 0, "X", 1);
    rocksdb_writebatch_delete_range(wb, "Y", 1, "\xff\xff\xff\xff\xff\xff\xff\xff", 8);
    rocksdb_writebatch_delete(wb, KS_K_COUNT, strlen(KS_K_COUNT));
    if ((rc = ks_write(s, wb, "restore (clear)", err)) != 0) {
        goto out;
    }
    rocksdb_writebatch_clear(wb);
    for (off = SNAP_HDR_LEN; off < len;) {
        size_t klen = kms_get_le32(p + off), vlen = kms_get_le32(p + off + 4);
        const char *k = (const char *)p + off + 8;
        off += 8 + pad8(klen + vlen);
        if (is_meta_key(k, klen)) {
            continue; /* recomputed below */
        }
        if (k[0] == KS_P_RECORD) {
            records++;
        }
        rocksdb_writebatch_put(wb, k, klen, k + klen, vlen);
        batch_bytes += klen + vlen;
        if (batch_bytes >= RESTORE_BATCH_BYTES) {
            if ((rc = ks_write(s, wb, "restore (load)", err)) != 0) {
                goto out;
            }
            rocksdb_writebatch_clear(wb);
            batch_bytes = 0;
        }
    }
    kms_put_be64(v8, records);
    rocksdb_writebatch_put(wb, KS_K_COUNT, strlen(KS_K_COUNT), (const char *)v8, 8);
    kms_put_be64(v8, h.state_index);
    rocksdb_writebatch_put(wb, KS_K_APPLIED, strlen(KS_K_APPLIED), (const char *)v8, 8);
    rocksdb_writebatch_delete(wb, KS_K_RESTORING, strlen(KS_K_RESTORING));
    if ((rc = ks_write(s, wb, "restore (commit)", err)) != 0) {
        goto out;
    }
    atomic_store(&s->count, records);
    atomic_store(&s->applied, h.state_index);
    atomic_store(&s->restoring, false);
    kms_logf(KMS_LOG_INFO, "store", "restored %" PRIu64 " records at index %" PRIu64, records,
             h.state_index);
out:
    if (wb != NULL) {
        rocksdb_writebatch_destroy(wb);
    }
    if (rc != 0) {
        kms_err_wrap(err, rc, "restore snapshot %" PRIu64, h.raft_index);
        return ks_set_fatal(s, rc, err);
    }
    return 0;
}

/* ---- the raft fsm's store side (the fsm itself is in src/raft/node.c) ---- */

int kms_store_apply_borrowed(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                             const struct kms_store_result **result, struct kms_err *err)
{
    int rc;
    *result = NULL;
    rc = ks_apply_into(s, index, buf, len, &s->fsm_result, err);
    if (rc != 0) {
        return rc; /* logged with the index by ks_set_fatal() */
    }
    *result = &s->fsm_result;
    return 0;
}

int kms_store_snapshot_pin(struct kms_store *s, uint64_t index, struct kms_err *err)
{
    if (s->snap_pending != NULL) {
        return kms_err_set(err, KMS_EBUSY, "a snapshot is already being taken");
    }
    s->snap_pending = rocksdb_create_snapshot(s->db);
    if (s->snap_pending == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "rocksdb_create_snapshot");
    }
    s->snap_pending_index = index;
    return 0;
}

int kms_store_snapshot_pinned(struct kms_store *s, struct raft_buffer **bufs, unsigned *n_bufs,
                              struct kms_err *err)
{
    int rc;
    if (s->snap_pending == NULL) {
        return kms_err_set(err, KMS_EINVAL, "no snapshot pinned");
    }
    rc = snapshot_from(s, s->snap_pending, s->snap_pending_index, bufs, n_bufs, err);
    if (rc != 0) {
        return kms_err_wrap(err, rc, "snapshot at raft index %" PRIu64, s->snap_pending_index);
    }
    return 0;
}

void kms_store_snapshot_unpin(struct kms_store *s)
{
    if (s->snap_pending != NULL) {
        rocksdb_release_snapshot(s->db, s->snap_pending);
        s->snap_pending = NULL;
    }
}
