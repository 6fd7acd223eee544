/*
 * The cluster keyring and the peer unseal gate: their ops (applied on the
 * raft thread through store_apply.c), the rekey's in-memory wrap, and
 * their reads (any thread).
 */
#include "store_internal.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

/* The message stored under the fixed key `key` into *out (NULL when the key
 * is absent: not an error). 0, a RocksDB error, or KMS_ECORRUPT "store
 * <path>: stored <what> does not parse"; the caller frees *out. */
static int stored_load(struct kms_store *s, const char *key,
                       const ProtobufCMessageDescriptor *desc, const char *what,
                       ProtobufCMessage **out, struct kms_err *err)
{
    char *val = NULL;
    size_t vlen = 0;
    int rc;

    *out = NULL;
    rc = ks_get(s, NULL, key, strlen(key), &val, &vlen, err);
    if (rc == KMS_ENOTFOUND) {
        return 0;
    }
    if (rc == 0) {
        *out = protobuf_c_message_unpack(desc, NULL, vlen, (const uint8_t *)val);
        if (*out == NULL) {
            rc = kms_err_set(err, KMS_ECORRUPT, "store %s: stored %s does not parse", s->path,
                             what);
        }
    }
    free(val);
    return rc;
}

/* The stored keyring into *out (NULL when the cluster has none). */
static int keyring_load(struct kms_store *s, Kmsd__V1__EncryptedKeyring **out,
                        struct kms_err *err)
{
    ProtobufCMessage *m = NULL;
    int rc = stored_load(s, KS_K_KEYRING, &kmsd__v1__encrypted_keyring__descriptor, "keyring",
                         &m, err);
    *out = (Kmsd__V1__EncryptedKeyring *)m;
    return rc;
}

/* The stored peer unseal gate into *out (NULL when never set). */
static int peer_gate_load(struct kms_store *s, Kmsd__V1__PeerUnsealGate **out,
                          struct kms_err *err)
{
    ProtobufCMessage *m = NULL;
    int rc = stored_load(s, KS_K_PEER_GATE, &kmsd__v1__peer_unseal_gate__descriptor,
                         "peer unseal gate", &m, err);
    *out = (Kmsd__V1__PeerUnsealGate *)m;
    return rc;
}

static bool keyring_same_cluster(const Kmsd__V1__EncryptedKeyring *a,
                                 const Kmsd__V1__EncryptedKeyring *b)
{
    return a->cluster_id.len == b->cluster_id.len &&
           memcmp(a->cluster_id.data, b->cluster_id.data, a->cluster_id.len) == 0;
}

/* Puts nk as the stored keyring, in the entry's batch. */
static int keyring_put(struct ks_apply *c, const Kmsd__V1__EncryptedKeyring *nk)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = ks_pack(&nk->base, &buf, &len, c->err);

    if (rc == 0) {
        rocksdb_writebatch_put(c->wb, KS_K_KEYRING, strlen(KS_K_KEYRING), (const char *)buf, len);
    }
    free(buf);
    return rc;
}

int ks_op_put_keyring(struct ks_apply *c, const Kmsd__V1__PutKeyring *op)
{
    const Kmsd__V1__EncryptedKeyring *nk = op->keyring;
    Kmsd__V1__EncryptedKeyring *old = NULL;
    int rc;

    if (nk == NULL || nk->cluster_id.len == 0 || nk->ciphertext.len == 0) {
        ks_result(c, KMS_EINVAL, 0, "put keyring: missing keyring, cluster id or ciphertext");
        return 0;
    }
    if ((rc = keyring_load(c->s, &old, c->err)) != 0) {
        goto out;
    }
    if (op->init && old != NULL) {
        ks_result(c, KMS_EEXIST, 0, "cluster already initialised");
        goto out;
    }
    if (!op->init && old == NULL) {
        ks_result(c, KMS_EUNINIT, 0, "cluster not initialised: nothing to rotate");
        goto out;
    }
    if (old != NULL) {
        if (!keyring_same_cluster(old, nk)) {
            ks_result(c, KMS_EINVAL, 0, "rotate: keyring belongs to another cluster");
            goto out;
        }
        if (nk->active_term != 0 && nk->active_term <= old->active_term) {
            ks_result(c, KMS_ERANGE, 0, "rotate: active term %u is not above %u (stale rotation)",
                      (unsigned)nk->active_term, (unsigned)old->active_term);
            goto out;
        }
    }
    if ((rc = keyring_put(c, nk)) != 0) {
        goto out;
    }
    ks_result(c, 0, 1, "keyring %s, active term %u", op->init ? "initialised" : "rotated",
              (unsigned)nk->active_term);
out:
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
int ks_op_rekey_keyring(struct ks_apply *c, const Kmsd__V1__RekeyKeyring *op)
{
    const Kmsd__V1__EncryptedKeyring *nk = op->keyring;
    Kmsd__V1__EncryptedKeyring *old = NULL;
    int rc;

    /* Whatever the outcome, the entry holds a wrapped root key: shred it. */
    c->res->shred = true;
    if (nk == NULL || nk->cluster_id.len == 0 || nk->ciphertext.len == 0 ||
        op->wrapped_root.len == 0 || op->wrapped_root.len > KS_REKEY_WRAP_MAX) {
        ks_result(c, KMS_EINVAL, 0, "rekey: missing keyring or wrapped root key");
        return 0;
    }
    if (nk->threshold < 2 || nk->share_count < nk->threshold || nk->share_count > 255) {
        ks_result(c, KMS_EINVAL, 0, "rekey: %u shares with threshold %u",
                  (unsigned)nk->share_count, (unsigned)nk->threshold);
        return 0;
    }
    if ((rc = keyring_load(c->s, &old, c->err)) != 0) {
        goto out;
    }
    if (old == NULL) {
        ks_result(c, KMS_EUNINIT, 0, "cluster not initialised: nothing to rekey");
        goto out;
    }
    if (!keyring_same_cluster(old, nk)) {
        ks_result(c, KMS_EINVAL, 0, "rekey: keyring belongs to another cluster");
        goto out;
    }
    if (nk->active_term != old->active_term) {
        ks_result(c, KMS_ERANGE, 0, "rekey: active term %u differs from the current %u (stale "
                  "rekey: the keyring changed meanwhile)",
                  (unsigned)nk->active_term, (unsigned)old->active_term);
        goto out;
    }
    if ((rc = keyring_put(c, nk)) != 0) {
        goto out;
    }
    c->rekey_wrap = &op->wrapped_root;
    ks_result(c, 0, 1, "keyring rekeyed: %u shares, threshold %u", (unsigned)nk->share_count,
              (unsigned)nk->threshold);
out:
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
int ks_op_set_peer_gate(struct ks_apply *c, const Kmsd__V1__SetPeerUnsealGate *op)
{
    Kmsd__V1__PeerUnsealGate *cur = NULL;
    Kmsd__V1__PeerUnsealGate next = KMSD__V1__PEER_UNSEAL_GATE__INIT;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    if ((rc = peer_gate_load(c->s, &cur, c->err)) != 0) {
        goto out;
    }
    next.generation = cur != NULL ? cur->generation : 0;
    if (op->close) {
        next.generation++;
        next.closed = true;
    } else if (cur == NULL || !cur->closed || op->generation != cur->generation ||
               op->proof.len != 32) {
        ks_result(c, KMS_ERANGE, 0, "peer unseal gate: reopen of generation %" PRIu64
                  " refused (current %" PRIu64 ", %s)", op->generation, next.generation,
                  cur != NULL && cur->closed ? "closed" : "open");
        goto out;
    } else {
        next.closed = false;
        next.proof = op->proof;
    }
    next.at = op->at;
    next.by_node = op->by_node;
    if ((rc = ks_pack(&next.base, &buf, &len, c->err)) != 0) {
        goto out;
    }
    rocksdb_writebatch_put(c->wb, KS_K_PEER_GATE, strlen(KS_K_PEER_GATE), (const char *)buf, len);
    ks_result(c, 0, 1, "peer unseal gate %s (generation %" PRIu64 ")",
              next.closed ? "closed" : "reopened", next.generation);
out:
    free(buf);
    if (cur != NULL) {
        kmsd__v1__peer_unseal_gate__free_unpacked(cur, NULL);
    }
    return rc;
}

int ks_op_retire_term(struct ks_apply *c, const Kmsd__V1__RetireTerm *op)
{
    const Kmsd__V1__EncryptedKeyring *nk = op->keyring;
    Kmsd__V1__EncryptedKeyring *old = NULL;
    uint64_t n = 0;
    int rc;

    if (nk == NULL || nk->cluster_id.len == 0 || nk->ciphertext.len == 0 || op->term == 0) {
        ks_result(c, KMS_EINVAL, 0, "retire term: missing keyring or term");
        return 0;
    }
    if ((rc = keyring_load(c->s, &old, c->err)) != 0) {
        goto out;
    }
    if (old == NULL) {
        ks_result(c, KMS_EUNINIT, 0, "cluster not initialised");
        goto out;
    }
    if (!keyring_same_cluster(old, nk)) {
        ks_result(c, KMS_EINVAL, 0, "retire term: keyring belongs to another cluster");
        goto out;
    }
    if (nk->active_term != old->active_term) {
        ks_result(c, KMS_ERANGE, 0, "retire term: keyring has active term %u, cluster %u (stale)",
                  (unsigned)nk->active_term, (unsigned)old->active_term);
        goto out;
    }
    if (op->term == old->active_term) {
        ks_result(c, KMS_EINVAL, 0, "term %u is the active term: it cannot be retired",
                  (unsigned)op->term);
        goto out;
    }
    if ((rc = ks_records_on_term(c->s, op->term, &n, c->err)) != 0) {
        goto out;
    }
    if (n > 0) {
        ks_result(c, KMS_EBUSY, 0,
                  "term %u still protects %" PRIu64
                  " live records: run kmsctl operator rewrap first",
                  (unsigned)op->term, n);
        goto out;
    }
    if ((rc = keyring_put(c, nk)) != 0) {
        goto out;
    }
    ks_result(c, 0, 1, "term %u retired", (unsigned)op->term);
out:
    if (old != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(old, NULL);
    }
    return rc;
}

/* ---- reads ------------------------------------------------------------- */

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
    int rc;

    if (s == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "peer gate get: bad arguments");
    }
    if ((rc = peer_gate_load(s, out, err)) == 0 && *out == NULL) {
        rc = KMS_ENOTFOUND; /* never set: err untouched, as for any missing key */
    }
    return rc;
}
