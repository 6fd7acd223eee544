/*
 * The Talos API's Unseal (talos_api.c has the overview, Seal and what both
 * share).
 *
 * The handler (talos_unseal_cb) runs on a gRPC worker and answers there
 * when it can: read lease valid and the record found, or a definitive
 * refusal. Otherwise it parks the call on the wait pool (unseal_run_cb),
 * which owns the job from then on and waits within the request budget for
 * a read lease, catches up with the leader's commit index before it
 * believes a miss, and answers.
 *
 * Waiting for a lease (unseal_wait_lease) sleeps on d->lease_wake, never
 * polls. What it waits for and who signals it:
 *  - a lease: the raft thread publishes it, then calls kmsd_talos_lease_cb,
 *    which broadcasts when some thread waits;
 *  - the call answered by the server (Talos listener closed): the server's
 *    stop sets the call's `finished`, then runs its abort hook, which
 *    broadcasts (kmsd_talos_wake);
 *  - the daemon stopping: kmsd_stop sets `stopping`, then broadcasts;
 *  - the budget's end: the timed wait itself.
 * No wake-up is lost. The waiter checks its condition with lease_wake.mu
 * held and sleeps by releasing it atomically (pthread_cond_timedwait).
 * The stop and abort signallers change their state before they take mu to
 * broadcast, so either the waiter's check comes after (and sees the state)
 * or the waiter is already asleep (and is woken). The raft thread does not
 * take mu unless someone waits: the waiter increments `waiters` (a seq_cst
 * read-modify-write), then tests the lease; the raft thread stores the
 * lease, then reads `waiters` with a read-modify-write too (fetch_add 0:
 * no fences, which TSAN cannot check). Both RMWs are in the one
 * modification order of `waiters`: if the raft thread's comes later it
 * reads the waiter's increment and broadcasts under mu (as above); if it
 * comes first, the waiter's RMW reads from it and synchronises with it, so
 * the waiter's test sees the lease stored before it.
 *
 * Shutdown order (kmsd_stop): `stopping` + wake, Talos server stopped,
 * wait pool stopped (joins the waiters: they all return at once), raft
 * shut down (no more lease_cb), then kmsd_talos_free destroys lease_wake.
 */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_limit.h"
#include "kmsd_pool.h"
#include "kmsd_touch.h"
#include "talos_internal.h"

#include "kmsd/v1/entry.pb-c.h"
#include "sidero/kms/kms.pb-c.h"

static struct talos_limit_log unseal_limit_log;

/* ---- the failed-unseal limiter ------------------------------------ */

/* True when failing unseals from ip are being refused (its address or the
 * global bound is over the limit). */
static bool unseal_fail_limited(struct kmsd *d, const uint8_t ip[16], bool *global_hit)
{
    uint8_t k[16];
    size_t kl = kmsd_limit_addr_key(ip, k);
    return kmsd_limiter_over(d->unseal_fail_lim, k, kl, kms_mono_ms(), global_hit);
}

static void unseal_fail_count(struct kmsd *d, const uint8_t ip[16])
{
    uint8_t k[16];
    size_t kl = kmsd_limit_addr_key(ip, k);
    kmsd_limiter_count(d->unseal_fail_lim, k, kl, kms_mono_ms());
}

/* ---- Unseal --------------------------------------------------------- */

/* An Unseal in progress (on the worker, then parked on the wait pool). */
struct unseal_job {
    struct kmsd *d;
    struct kms_rpc_call *call;
    Sidero__Kms__Request *r;
    uint8_t key_id[16];
    uint8_t ip[16];
    char kid[33];
    uint64_t t0; /* arrival, kms_mono_ms() */
    int first;   /* result of the read on the worker: KMS_ENOTFOUND or KMS_EUNAVAIL */
    bool counted; /* this request's failure is already counted by the limiter */
};

/* Counts this request's failure once. */
static void unseal_job_failed(struct unseal_job *j)
{
    if (!j->counted) {
        j->counted = true;
        unseal_fail_count(j->d, j->ip);
    }
}

/* A failing unseal from a limited address (or while the global bound is
 * reached) is refused at once: no read barrier, no detail. Valid keys never
 * get here (a record that decrypts is always served). */
static void unseal_refuse_limited(struct unseal_job *j, bool global_hit)
{
    struct kmsd *d = j->d;
    const char *peer = kms_rpc_call_peer(j->call);
    const char *msg = global_hit ? "too many failed unseals on this replica; retry later"
                                 : "too many failed unseals from this address; retry later";
    atomic_fetch_add(&d->metrics.unseal_limited, 1);
    talos_limit_log(&unseal_limit_log, "failing unseal refused by the limiter", peer, msg);
    if (kms_rpc_call_done(j->call)) {
        kms_rpc_call_finish(j->call, GRPC_STATUS_UNAVAILABLE, NULL, NULL, 0);
        return;
    }
    talos_count(d, j->call, "unseal", GRPC_STATUS_UNAVAILABLE);
    kms_rpc_call_finish(j->call, GRPC_STATUS_UNAVAILABLE, msg, NULL, 0);
}

static void unseal_job_free(struct unseal_job *j)
{
    if (j->r != NULL) {
        sidero__kms__request__free_unpacked(j->r, NULL);
    }
    OPENSSL_cleanse(j->key_id, sizeof(j->key_id));
    free(j);
}

/* One local read under the lease deadline rule (kms_raft.h): take the
 * deadline d, require now < d, read the record and decrypt, require now < d
 * again with the same d. A read that may have finished after the lease
 * ended is KMS_EUNAVAIL and its result is discarded (a process paused
 * between the check and the read must not answer from stale state).
 * With unsealReads: local there is no lease to respect.
 * Returns 0 (data filled), KMS_ENOTFOUND (no record: a miss, not yet proven
 * fresh), KMS_EUNAVAIL (no lease, or it ended during the read), or the
 * definitive errors of kms_unseal (KMS_EDENIED...) with err set. *stale is
 * set when the KMS_EUNAVAIL is the lease's (worth waiting for). */
static int unseal_read(struct unseal_job *j, uint8_t *data, size_t *datalen, bool *stale,
                       struct kms_err *err)
{
    struct kmsd *d = j->d;
    Kmsd__V1__SealedRecord *rec = NULL;
    struct kms_keyring *kr = NULL;
    uint64_t lease_end = UINT64_MAX;
    int rc;

    *datalen = 0;
    *stale = false;
    if (!d->opt.unseal_reads_local) {
        lease_end = kms_raft_lease_deadline_ms(d->raft);
        if (kms_mono_ms() >= lease_end) {
            *stale = true;
            rc = kms_err_set(err, KMS_EUNAVAIL, "no read lease: cluster quorum unreachable");
            goto out;
        }
    }
    if (d->test_read_pause_ms > 0) {
        kms_sleep_ms(d->test_read_pause_ms); /* test fault hook (kmsd.h) */
    }
    rc = kms_store_record_get(d->store, j->key_id, &rec, err);
    if (rc == 0) {
        for (int attempt = 0; attempt < 2; attempt++) {
            kr = kmsd_keyring_get(d);
            if (kr == NULL) {
                rc = kms_err_set(err, KMS_EUNAVAIL, "node is sealed");
                break;
            }
            rc = kms_unseal(kr, rec, j->r->node_uuid, j->r->data.data, j->r->data.len, data,
                            datalen, err);
            if (rc != KMS_ENOTFOUND || attempt == 1) {
                break;
            }
            /* The record's term came from a rotation this node has not
             * loaded yet: pick the new keyring up and try once more. */
            kms_keyring_unref(kr);
            kr = NULL;
            kms_err_clear(err);
            kmsd_keyring_refresh(d);
        }
        /* kms_err_wrap keeps the lower code in err; the mapped one is rc. */
        if (rc == KMS_ENOTFOUND) {
            (void)kms_err_wrap(err, rc, "keyring term of the record not loaded");
            rc = KMS_EUNAVAIL;
        } else if (rc == KMS_EAUTH) {
            rc = KMS_EDENIED;
        }
    } else if (rc != KMS_ENOTFOUND) {
        (void)kms_err_wrap(err, rc, "record read failed");
        rc = KMS_EUNAVAIL;
    }
    if (kms_mono_ms() >= lease_end) {
        /* The lease ended while we read: nothing read may be answered. */
        OPENSSL_cleanse(data, KMS_BLOB_MAX);
        *datalen = 0;
        *stale = true;
        kms_err_clear(err);
        rc = kms_err_set(err, KMS_EUNAVAIL, "read lease ended during the read");
    }
    if (rc == 0) {
        kmsd_touch_note(d, j->key_id); /* last access, batched (touch.c) */
    }
out:
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    return rc;
}

/* Answers the call from a final unseal_read() result. */
static void unseal_answer(struct unseal_job *j, int rc, const uint8_t *data, size_t datalen,
                          const struct kms_err *err)
{
    struct kmsd *d = j->d;
    const char *peer = kms_rpc_call_peer(j->call);

    if (rc == 0) {
        kms_log(KMS_LOG_INFO, "audit", "unseal", "key_id", j->kid, "node_uuid",
                j->r->node_uuid, "peer", peer, NULL);
        talos_reply(d, j->call, "unseal", data, datalen);
        return;
    }
    if (rc != KMS_EUNAVAIL) {
        bool global_hit = false;
        unseal_job_failed(j);
        if (unseal_fail_limited(d, j->ip, &global_hit)) {
            unseal_refuse_limited(j, global_hit);
            return;
        }
    }
    if (rc == KMS_ENOTFOUND) {
        char msg[64];
        snprintf(msg, sizeof(msg), "unknown key %s", j->kid);
        talos_fail(d, j->call, "unseal", KMS_ENOTFOUND, msg, peer);
        return;
    }
    if (rc != KMS_EUNAVAIL) {
        kms_log(KMS_LOG_WARN, "audit", "unseal refused", "key_id", j->kid, "node_uuid",
                j->r->node_uuid, "peer", peer, "error", kms_errname(rc), NULL);
    }
    talos_fail(d, j->call, "unseal", rc, err->msg, peer);
}

/* ---- waiting for a lease (see the top of this file) -------------------- */

void kmsd_talos_wake(struct kmsd *d)
{
    if (!d->lease_wake.made) {
        return;
    }
    pthread_mutex_lock(&d->lease_wake.mu);
    pthread_cond_broadcast(&d->lease_wake.cv);
    pthread_mutex_unlock(&d->lease_wake.mu);
}

void kmsd_talos_lease_cb(void *arg)
{
    struct kmsd *d = arg;
    /* An RMW, not a load: it orders the lease stored before this call
     * against the waiters' increments (see the top of this file). */
    if (atomic_fetch_add(&d->lease_wake.waiters, 0) > 0) {
        kmsd_talos_wake(d);
    }
}

/* True when a read may be tried now: the lease test unseal_read starts
 * with (always with unsealReads: local). */
static bool unseal_lease_held(struct kmsd *d)
{
    return d->opt.unseal_reads_local || kms_raft_lease_deadline_ms(d->raft) != 0;
}

/* Wait pool thread: the budget left once a read may be tried, or 0 when
 * the budget is spent, the daemon stops or the server answered the call,
 * whichever comes first. */
static unsigned unseal_wait_lease(struct unseal_job *j)
{
    struct kmsd *d = j->d;
    unsigned left = talos_budget_left(d, j->call, j->t0);

    if (left == 0 || unseal_lease_held(d)) {
        return left;
    }
    pthread_mutex_lock(&d->lease_wake.mu);
    atomic_fetch_add(&d->lease_wake.waiters, 1); /* before the tests below */
    for (;;) {
        struct timespec end;
        left = talos_budget_left(d, j->call, j->t0);
        if (left == 0 || unseal_lease_held(d)) {
            break;
        }
        end = kms_mono_ts_in(left);
        (void)pthread_cond_timedwait(&d->lease_wake.cv, &d->lease_wake.mu, &end);
    }
    atomic_fetch_sub(&d->lease_wake.waiters, 1);
    pthread_mutex_unlock(&d->lease_wake.mu);
    return left;
}

/* Wait pool thread: waits for a lease, reads; on a miss catches up with the
 * leader's commit index (read barrier) and reads again. NOT_FOUND only for
 * a miss read under a valid lease after a successful barrier; every other
 * way out of the budget is UNAVAILABLE. */
static void unseal_run_cb(void *arg)
{
    struct unseal_job *j = arg;
    struct kmsd *d = j->d;
    uint8_t data[KMS_BLOB_MAX];
    size_t datalen = 0;
    bool caught_up = false, stale = false;
    struct kms_err err;
    int rc = j->first;

    kms_err_clear(&err);
    kms_err_set(&err, KMS_EUNAVAIL, "no read lease within the request budget");
    for (;;) {
        unsigned left = unseal_wait_lease(j);
        if (left == 0) {
            if (rc == KMS_ENOTFOUND) {
                kms_err_clear(&err);
                kms_err_set(&err, KMS_EUNAVAIL,
                            "key not found locally and the leader's commit index could not "
                            "be reached in time; retry");
            }
            rc = KMS_EUNAVAIL;
            break;
        }
        if (rc == KMS_ENOTFOUND && !caught_up) {
            bool global_hit = false;
            unseal_job_failed(j); /* counted now, not after the barrier */
            if (unseal_fail_limited(d, j->ip, &global_hit)) {
                unseal_refuse_limited(j, global_hit);
                goto done;
            }
            /* Sealed through another replica a moment ago? Catch up with
             * the leader's commit index before believing the miss. */
            if (kmsd_read_barrier(d, left) != 0) {
                continue;
            }
            caught_up = true;
        }
        kms_err_clear(&err);
        rc = unseal_read(j, data, &datalen, &stale, &err);
        if (rc == KMS_EUNAVAIL && stale) {
            continue; /* no lease or it ended during the read: wait again */
        }
        if (rc == KMS_ENOTFOUND && !caught_up) {
            continue;
        }
        break;
    }
    unseal_answer(j, rc, data, datalen, &err);
done:
    OPENSSL_cleanse(data, sizeof(data));
    unseal_job_free(j);
}

/* CQ worker: answers at once when it can (lease valid and the record found,
 * or a definitive refusal); otherwise parks the call on the wait pool. */
void talos_unseal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t reqlen)
{
    struct kmsd *d = arg;
    struct unseal_job *j = NULL;
    uint8_t client_half[32];
    uint8_t ipraw[16];
    uint8_t data[KMS_BLOB_MAX];
    size_t datalen = 0, iplen = 0;
    const char *peer = kms_rpc_call_peer(call);
    const char *why;
    struct kms_err err;
    bool stale = false;
    int rc;

    kms_err_clear(&err);
    j = calloc(1, sizeof(*j));
    if (j == NULL) {
        talos_fail(d, call, "unseal", KMS_ENOMEM, "out of memory", peer);
        goto out;
    }
    j->d = d;
    j->call = call;
    j->t0 = kms_mono_ms();
    talos_peer_addr(call, ipraw, &iplen, j->ip);
    /* No limiter check before the read: a request whose blob decrypts is
     * always served, whatever its address did before (NAT). The enrolment
     * policy holds for Unseal as for Seal (docs/security.md): a node
     * outside it cannot use a blob it (or a thief) holds. */
    if ((rc = talos_request_open(d, 1, j->ip, req, reqlen, &j->r, &why)) != 0) {
        unseal_job_failed(j);
        talos_fail(d, call, "unseal", rc, why, peer);
        goto out;
    }
    rc = kms_blob_parse(j->r->data.data, j->r->data.len, j->key_id, client_half, &err);
    if (rc != 0) {
        unseal_job_failed(j);
        talos_fail(d, call, "unseal", KMS_EINVAL, err.msg, peer);
        goto out;
    }
    talos_key_hex(j->key_id, 16, j->kid);
    rc = unseal_read(j, data, &datalen, &stale, &err);
    if (rc != KMS_ENOTFOUND && !(rc == KMS_EUNAVAIL && stale)) {
        unseal_answer(j, rc, data, datalen, &err);
        goto out;
    }
    if (rc == KMS_ENOTFOUND) {
        bool global_hit = false;
        /* Count the miss at once; a limited address gets no read barrier. */
        unseal_job_failed(j);
        if (unseal_fail_limited(d, j->ip, &global_hit)) {
            unseal_refuse_limited(j, global_hit);
            goto out;
        }
    }
    j->first = rc;
    if ((rc = kmsd_pool_submit(d->wait_pool, unseal_run_cb, j)) != 0) {
        kms_err_clear(&err);
        kms_err_set(&err, KMS_EUNAVAIL, "%s",
                    rc == KMS_EBUSY ? "too many unseals waiting; retry later" : "shutting down");
        unseal_answer(j, KMS_EUNAVAIL, NULL, 0, &err);
        goto out;
    }
    j = NULL; /* parked: the pool owns it */
out:
    OPENSSL_cleanse(data, sizeof(data));
    OPENSSL_cleanse(client_half, sizeof(client_half));
    if (j != NULL) {
        unseal_job_free(j);
    }
}
