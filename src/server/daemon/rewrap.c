/*
 * kmsd.v1.Operator/Rewrap and RetireTerm (kmsd_rewrap.h; record format in
 * proto/kmsd/v1/record.proto, procedure in docs/operations.md "Rewrap and
 * retire a term").
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_cluster.h"
#include "kmsd_rewrap.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

static void rw_audit(struct kms_rpc_call *call, const char *op)
{
    const char *cn = kms_rpc_call_peer_cn(call);
    kms_log(KMS_LOG_INFO, "audit", "operator", "op", op, "operator", cn != NULL ? cn : "",
            "peer", kms_rpc_call_peer(call), NULL);
}

/* The keyring held must be the replicated one: a rewrap under a term some
 * replica has not picked up yet would make its records unreadable there
 * until it does (the supervisor refreshes every second). */
static int keyring_current(struct kmsd *d, struct kms_keyring *kr, struct kms_err *err)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    int rc;

    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0) {
        return rc;
    }
    if (ek->active_term != kms_keyring_active_term(kr)) {
        rc = kms_err_set(err, KMS_EUNAVAIL,
                         "keyring not refreshed yet (replicated active term %u, held %u): retry",
                         ek->active_term, kms_keyring_active_term(kr));
    }
    kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    return rc;
}

struct rw_walk {
    struct kms_keyring *kr;
    Kmsd__V1__RewrapItem *items; /* batch entries, each owning its key_id and wrapped */
    size_t n, batch;
    uint64_t scanned, failed;
    uint8_t last[16];
    bool have_last;
    struct kms_err *err;
};

#define RW_STOP 1 /* walk callback: step full */

static int rw_each(void *arg, const Kmsd__V1__SealedRecord *rec)
{
    struct rw_walk *w = arg;
    struct kms_rewrap_out o;
    Kmsd__V1__RewrapItem *it;
    int rc;

    if (w->n == w->batch || w->scanned == KMSD_REWRAP_SCAN) {
        return RW_STOP;
    }
    w->scanned++;
    memcpy(w->last, rec->key_id.data, 16);
    w->have_last = true;
    if (!kms_rewrap_needed(w->kr, rec)) {
        return 0;
    }
    if ((rc = kms_rewrap(w->kr, rec, &o, w->err)) != 0) {
        char hx[33];
        if (rc == KMS_ENOMEM) {
            return rc;
        }
        /* A record this keyring cannot open (its term is not held, or it
         * does not authenticate) stays as it is: counted, logged, and the
         * walk goes on (it keeps its term pinned against retire-term). */
        if (kms_hex_encode_ct(rec->key_id.data, 16, hx, sizeof(hx), NULL) != 0) {
            hx[0] = '\0';
        }
        kms_log(KMS_LOG_ERROR, "keys", "rewrap: record left as it is", "key_id", hx, "error",
                w->err->msg, NULL);
        kms_err_clear(w->err);
        w->failed++;
        return 0;
    }
    it = &w->items[w->n];
    kmsd__v1__rewrap_item__init(it);
    it->key_id.data = malloc(16);
    if (it->key_id.data == NULL) {
        kms_rewrap_out_free(&o);
        return kms_err_set(w->err, KMS_ENOMEM, "out of memory");
    }
    memcpy(it->key_id.data, rec->key_id.data, 16);
    it->key_id.len = 16;
    it->from_term = rec->term;
    it->term = o.term;
    it->origin_term = o.origin_term;
    it->wrapped.data = o.wrapped; /* moved */
    it->wrapped.len = o.wrapped_len;
    w->n++;
    return 0;
}

/* "term still in use" (KMS_EBUSY) answers FAILED_PRECONDITION: a
 * precondition the operator must fix, not a transient failure kmsctl should
 * retry (KMSD_CALL_BUSY_PRECOND in both rows). */
int kmsd_rewrap_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__RewrapRequest *r = (const Kmsd__V1__RewrapRequest *)c->req;
    Kmsd__V1__RewrapResponse resp = KMSD__V1__REWRAP_RESPONSE__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__RewrapBatch rb = KMSD__V1__REWRAP_BATCH__INIT;
    Kmsd__V1__RewrapItem **ptrs = NULL;
    struct rw_walk w;
    struct kmsd_write_result res;
    struct kms_err *err = &c->err;
    int rc;

    memset(&w, 0, sizeof(w));
    w.err = err;
    if (r->after.len != 0 && r->after.len != 16) {
        rc = kms_err_set(err, KMS_EINVAL, "malformed request (cursor must be 16 bytes)");
        goto out;
    }
    w.batch = r->batch == 0 ? KMSD_REWRAP_BATCH : r->batch;
    if (w.batch > KMSD_REWRAP_BATCH_MAX) {
        w.batch = KMSD_REWRAP_BATCH_MAX;
    }
    if (r->after.len == 0) {
        rw_audit(c->call, "rewrap"); /* once per run, not once per step */
    }
    w.kr = kmsd_keyring_get(d);
    if (w.kr == NULL) {
        rc = kms_err_set(err, KMS_ESEALED, "node is sealed");
        goto out;
    }
    if ((rc = keyring_current(d, w.kr, err)) != 0) {
        goto out;
    }
    w.items = calloc(w.batch, sizeof(*w.items));
    ptrs = calloc(w.batch, sizeof(*ptrs));
    if (w.items == NULL || ptrs == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    rc = kms_store_records_list_after(d->store, NULL, r->after.len == 16 ? r->after.data : NULL,
                                      rw_each, &w, err);
    resp.done = rc == 0;
    if (rc == RW_STOP) {
        rc = 0;
    }
    if (rc != 0) {
        kms_err_wrap(err, rc, "rewrap");
        goto out;
    }
    if (w.n > 0) {
        for (size_t i = 0; i < w.n; i++) {
            ptrs[i] = &w.items[i];
        }
        rb.n_items = w.n;
        rb.items = ptrs;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_REWRAP_BATCH;
        e.rewrap_batch = &rb;
        memset(&res, 0, sizeof(res));
        if ((rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, err)) != 0) {
            kms_err_wrap(err, rc, "rewrap: replicate batch");
            goto out;
        }
        if (res.code != 0) {
            rc = kms_err_set(err, res.code, "rewrap: apply batch: %s", res.msg);
            goto out;
        }
        resp.rewrapped = res.count;
        resp.index = res.index;
        kms_logf(KMS_LOG_INFO, "keys", "rewrap: %" PRIu64 " records rewrapped to term %u",
                 res.count, kms_keyring_active_term(w.kr));
    }
    resp.active_term = kms_keyring_active_term(w.kr);
    resp.scanned = w.scanned;
    resp.failed = w.failed;
    resp.records = kms_store_count(d->store);
    if (w.have_last) {
        resp.next.data = w.last;
        resp.next.len = 16;
    } else if (r->after.len == 16) {
        resp.next = r->after;
    }
    kmsd_call_reply(c, &resp.base);
    rc = 0;
out:
    for (size_t i = 0; i < w.n; i++) {
        free(w.items[i].key_id.data);
        free(w.items[i].wrapped.data);
    }
    free(w.items);
    free(ptrs);
    if (w.kr != NULL) {
        kms_keyring_unref(w.kr);
    }
    return rc;
}

/* Builds the keyring without `term` (from the replicated one, under R) and
 * commits it in one RetireTerm entry; the store refuses it while a live
 * record uses the term. */
static int retire_term(struct kmsd *d, uint32_t term, uint32_t *terms, size_t *nterms,
                       uint32_t *active, struct kms_err *err)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL, *nek = NULL;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__RetireTerm rt = KMSD__V1__RETIRE_TERM__INIT;
    struct kms_keyring *kr = NULL, *next = NULL;
    struct kmsd_write_result res;
    uint64_t n = 0;
    int rc;

    pthread_mutex_lock(&d->mu);
    if (!d->unsealed || d->root == NULL) {
        pthread_mutex_unlock(&d->mu);
        rc = kms_err_set(err, KMS_ESEALED, "node is sealed");
        goto out;
    }
    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0 ||
        (rc = kms_keyring_decrypt(ek, d->root, &kr, err)) != 0 ||
        (rc = kms_keyring_retire(kr, term, &next, err)) != 0 ||
        (rc = kms_keyring_encrypt(next, d->root, ek->share_count, ek->threshold, &nek,
                                  err)) != 0) {
        pthread_mutex_unlock(&d->mu);
        goto out;
    }
    pthread_mutex_unlock(&d->mu);
    /* A clear answer before proposing anything (the store checks again on
     * apply, which is what counts). */
    if ((rc = kms_store_records_on_term(d->store, term, &n, err)) != 0) {
        goto out;
    }
    if (n > 0) {
        rc = kms_err_set(err, KMS_EBUSY,
                         "term %u still protects %" PRIu64
                         " live records: run kmsctl operator rewrap first",
                         term, n);
        goto out;
    }
    e.version = 1;
    rt.keyring = nek;
    rt.term = term;
    e.op_case = KMSD__V1__ENTRY__OP_RETIRE_TERM;
    e.retire_term = &rt;
    memset(&res, 0, sizeof(res));
    if ((rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, err)) != 0) {
        kms_err_wrap(err, rc, "replicate keyring");
        goto out;
    }
    if (res.code != 0) {
        rc = kms_err_set(err, res.code, "%s", res.msg);
        goto out;
    }
    kmsd_keyring_refresh(d); /* the other replicas pick it up within a second */
    *nterms = kms_keyring_terms(next, terms, *nterms);
    *active = kms_keyring_active_term(next);
    kms_logf(KMS_LOG_WARN, "keys", "keyring term %u retired: its key is gone from the keyring",
             term);
    rc = 0;
out:
    kmsd_keyrings_release(ek, nek, kr, next);
    return rc;
}

int kmsd_retire_term_cb(struct kmsd_call *c)
{
    const Kmsd__V1__RetireTermRequest *r = (const Kmsd__V1__RetireTermRequest *)c->req;
    Kmsd__V1__RetireTermResponse resp = KMSD__V1__RETIRE_TERM_RESPONSE__INIT;
    uint32_t terms[KMS_KEYRING_MAX_TERMS];
    size_t n = KMS_KEYRING_MAX_TERMS;
    uint32_t active = 0;
    int rc;

    if (r->term == 0) {
        return kms_err_set(&c->err, KMS_EINVAL, "malformed request (term must be >= 1)");
    }
    rw_audit(c->call, "retire-term");
    if ((rc = retire_term(c->d, r->term, terms, &n, &active, &c->err)) != 0) {
        kms_err_wrap(&c->err, rc, "retire term %u", r->term);
        return rc;
    }
    resp.active_term = active;
    resp.terms = terms;
    resp.n_terms = n;
    kmsd_call_reply(c, &resp.base);
    return 0;
}
