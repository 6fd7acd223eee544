/*
 * Applying committed raft entries (raft thread only): the dispatcher, the
 * applied index and count bookkeeping, and the record, member, touch and
 * rewrap ops. The keyring and peer unseal gate ops are in store_keyring.c.
 */
#include "store_internal.h"
#include "kms_bytes.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#define TOUCH_MAX 65536
#define REWRAP_MAX 1024

void ks_result(struct ks_apply *c, int code, uint64_t count, const char *fmt, ...)
{
    va_list ap;
    c->res->code = code;
    c->res->count = count;
    va_start(ap, fmt);
    vsnprintf(c->res->msg, sizeof(c->res->msg), fmt, ap);
    va_end(ap);
}

int ks_pack(const ProtobufCMessage *m, uint8_t **buf, size_t *len, struct kms_err *err)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    *buf = malloc(n > 0 ? n : 1);
    if (*buf == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    *len = protobuf_c_message_pack(m, *buf);
    return 0;
}

static int record_write(struct ks_apply *c, const Kmsd__V1__SealedRecord *r)
{
    uint8_t k[17];
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = ks_pack(&r->base, &buf, &len, c->err);
    if (rc != 0) {
        return rc;
    }
    ks_record_key(k, r->key_id.data);
    rocksdb_writebatch_put(c->wb, (const char *)k, sizeof(k), (const char *)buf, len);
    free(buf);
    return 0;
}

static int op_put_record(struct ks_apply *c, const Kmsd__V1__PutRecord *op)
{
    const Kmsd__V1__SealedRecord *r = op->record;
    uint8_t k[17], uk[1 + KS_UUID_MAX + 1 + 16];
    char *val = NULL;
    size_t vlen, ulen = 0;
    char hx[33];
    int rc;

    if (r == NULL || r->key_id.len != 16 || !ks_uuid_valid(r->node_uuid, &ulen)) {
        ks_result(c, KMS_EINVAL, 0, "put record: missing record, key id or node uuid");
        return 0;
    }
    ks_hex16(r->key_id.data, hx);
    ks_record_key(k, r->key_id.data);
    rc = ks_get(c->s, NULL, k, sizeof(k), &val, &vlen, c->err);
    free(val);
    if (rc == 0) {
        ks_result(c, KMS_EEXIST, 0, "key %s already exists", hx);
        return 0;
    }
    if (rc != KMS_ENOTFOUND) {
        return rc;
    }
    if ((rc = record_write(c, r)) != 0) {
        return rc;
    }
    rocksdb_writebatch_put(c->wb, (const char *)uk,
                           ks_uuid_key(uk, r->node_uuid, ulen, r->key_id.data), "", 0);
    c->count_delta = 1;
    ks_result(c, 0, 1, "key %s stored", hx);
    return 0;
}

/* Writes r revoked at `at` (if not yet revoked) and without its nonce and
 * ciphertext: only the audit metadata stays. r keeps its own buffers (they
 * are wiped here and freed by the caller's free_unpacked). Returns 0 and
 * sets *changed when something was written. */
static int record_shred(struct ks_apply *c, Kmsd__V1__SealedRecord *r, int64_t at, bool *changed)
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

static int op_revoke_key(struct ks_apply *c, const Kmsd__V1__RevokeKey *op)
{
    Kmsd__V1__SealedRecord *r = NULL;
    bool was, changed = false;
    char hx[33];
    int rc;

    if (op->key_id.len != 16 || op->revoked_at <= 0) {
        ks_result(c, KMS_EINVAL, 0, "revoke: key id must be 16 bytes and revoked_at positive");
        return 0;
    }
    ks_hex16(op->key_id.data, hx);
    rc = ks_record_read(c->s, NULL, op->key_id.data, &r, c->err);
    if (rc == KMS_ENOTFOUND) {
        ks_result(c, KMS_ENOTFOUND, 0, "key %s not found", hx);
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
        ks_result(c, 0, 0, "key %s already revoked%s", hx, changed ? "; ciphertext shredded" : "");
        goto out;
    }
    ks_result(c, 0, 1, "key %s revoked", hx);
out:
    if (r != NULL) {
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
    }
    return rc;
}

struct revoke_node_walk {
    struct ks_apply *c;
    int64_t revoked_at;
    size_t plen;
    uint64_t seen, revoked;
};

static int revoke_node_cb(void *arg, const struct ks_item *item, struct kms_err *err)
{
    struct revoke_node_walk *w = arg;
    Kmsd__V1__SealedRecord *r = NULL;
    bool was, changed = false;
    int rc;

    if ((rc = ks_item_indexed(w->c->s, item, w->plen, false, &r, err)) != 0) {
        return rc;
    }
    w->seen++;
    was = r->revoked_at != 0;
    rc = record_shred(w->c, r, w->revoked_at, &changed);
    w->revoked += !was && changed;
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    return rc;
}

static int op_revoke_node(struct ks_apply *c, const Kmsd__V1__RevokeNode *op)
{
    uint8_t prefix[1 + KS_UUID_MAX + 1];
    size_t ulen = 0;
    struct revoke_node_walk w = {c, op->revoked_at, 0, 0, 0};
    int rc;

    if (!ks_uuid_valid(op->node_uuid, &ulen) || op->revoked_at <= 0) {
        ks_result(c, KMS_EINVAL, 0,
                  "revoke node: node uuid must be 1..128 bytes, revoked_at positive");
        return 0;
    }
    w.plen = ks_uuid_key(prefix, op->node_uuid, ulen, NULL);
    /* The raft thread is the only writer, so reading the DB while building
     * the batch sees exactly the state before this entry. */
    if ((rc = ks_scan(c->s, NULL, prefix, w.plen, NULL, 0, revoke_node_cb, &w, c->err)) != 0) {
        return rc;
    }
    if (w.seen == 0) {
        ks_result(c, KMS_ENOTFOUND, 0, "no keys for node %.64s", op->node_uuid);
    } else {
        ks_result(c, 0, w.revoked, "%" PRIu64 " of %" PRIu64 " keys of node %.64s revoked",
                  w.revoked, w.seen, op->node_uuid);
    }
    return 0;
}

static void member_key(uint8_t k[9], uint64_t id)
{
    k[0] = KS_P_MEMBER;
    kms_put_be64(k + 1, id);
}

static int op_put_member(struct ks_apply *c, const Kmsd__V1__PutMember *op)
{
    uint8_t k[9];
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    if (op->member == NULL || op->member->id == 0) {
        ks_result(c, KMS_EINVAL, 0, "put member: missing member or id 0");
        return 0;
    }
    if ((rc = ks_pack(&op->member->base, &buf, &len, c->err)) != 0) {
        return rc;
    }
    member_key(k, op->member->id);
    rocksdb_writebatch_put(c->wb, (const char *)k, sizeof(k), (const char *)buf, len);
    free(buf);
    ks_result(c, 0, 1, "member %" PRIu64 " stored", op->member->id);
    return 0;
}

static int op_remove_member(struct ks_apply *c, const Kmsd__V1__RemoveMember *op)
{
    uint8_t k[9];
    char *val = NULL;
    size_t vlen;
    int rc;

    member_key(k, op->id);
    rc = ks_get(c->s, NULL, k, sizeof(k), &val, &vlen, c->err);
    free(val);
    if (rc == KMS_ENOTFOUND) {
        ks_result(c, KMS_ENOTFOUND, 0, "member %" PRIu64 " not found", op->id);
        return 0;
    }
    if (rc != 0) {
        return rc;
    }
    rocksdb_writebatch_delete(c->wb, (const char *)k, sizeof(k));
    ks_result(c, 0, 1, "member %" PRIu64 " removed", op->id);
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

static int op_touch_batch(struct ks_apply *c, const Kmsd__V1__TouchBatch *op)
{
    struct touch *t = NULL;
    size_t n = 0;
    uint64_t updated = 0;
    int rc = 0;

    if (op->n_touches > TOUCH_MAX) {
        ks_result(c, KMS_ERANGE, 0, "touch batch: %zu touches, limit %d", op->n_touches, TOUCH_MAX);
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
        rc = ks_record_read(c->s, NULL, t[i].id, &r, c->err);
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
    ks_result(c, 0, updated, "%" PRIu64 " records touched", updated);
out:
    free(t);
    return rc;
}

/* Rewrap (kmsctl operator rewrap): each item replaces the wrapping of one
 * live record still at from_term; anything else (revoked, gone, already
 * moved by another rewrap) is skipped. Timestamps and the node index are
 * kept: only term, origin_term, nonce, ciphertext and wrapped change. */
static int op_rewrap_batch(struct ks_apply *c, const Kmsd__V1__RewrapBatch *op)
{
    uint64_t done = 0, skipped = 0;
    int rc = 0;

    if (op->n_items > REWRAP_MAX) {
        ks_result(c, KMS_ERANGE, 0, "rewrap: %zu items, limit %d", op->n_items, REWRAP_MAX);
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
        rc = ks_record_read(c->s, NULL, it->key_id.data, &r, c->err);
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
    ks_result(c, 0, done, "%" PRIu64 " records rewrapped, %" PRIu64 " skipped", done, skipped);
out:
    return rc;
}

/* Applies into a caller-provided result. Fatal errors are made sticky. */
static int apply_entry(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                       struct kms_store_result *res, struct kms_err *err)
{
    struct ks_apply c;
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
        rc = ks_op_put_keyring(&c, e->put_keyring);
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
        rc = ks_op_retire_term(&c, e->retire_term);
        break;
    case KMSD__V1__ENTRY__OP_NOOP:
        ks_result(&c, 0, 0, "noop");
        break;
    case KMSD__V1__ENTRY__OP_REKEY_KEYRING:
        rc = ks_op_rekey_keyring(&c, e->rekey_keyring);
        break;
    case KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE:
        rc = ks_op_set_peer_gate(&c, e->set_peer_unseal_gate);
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

int ks_apply_into(struct kms_store *s, uint64_t index, const void *buf, size_t len,
                  struct kms_store_result *res, struct kms_err *err)
{
    return apply_entry(s, index, buf, len, res, err);
}
