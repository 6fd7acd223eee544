/*
 * Online snapshot sessions (kmsd_snapshot.h). The session table is
 * process-wide (one daemon per process) under `snap_mu`; a session being
 * read by a Chunk call is marked busy so neither End nor the reaper frees it
 * underneath.
 */
#include "kmsd_snapshot.h"

#include <grpc/status.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_cluster.h"

#include "kmsd/v1/cluster.pb-c.h"

struct snap_session {
    bool used, busy;
    char handle[33];
    struct kms_store_export *x;
    uint64_t next_seq;
    uint64_t last_use_ms;
    bool done;
};

static pthread_mutex_t snap_mu = PTHREAD_MUTEX_INITIALIZER;
/* The reaper (a periodic job: idle handles go after KMSD_SNAP_IDLE_MS)
 * waits on snap_cv for 5 s at a time; kmsd_snapshot_shutdown sets
 * snap_stopping and broadcasts it under snap_mu. CLOCK_MONOTONIC, set up
 * once by snap_cv_once before either uses it. */
static pthread_cond_t snap_cv;
static pthread_once_t snap_cv_once = PTHREAD_ONCE_INIT;
static struct snap_session snap_sessions[KMSD_SNAP_SESSIONS];
static bool snap_reaper_started, snap_stopping;
static pthread_t snap_reaper;

/* snap_mu held. Frees idle (or all, when `all`) sessions that are not busy. */
static void snap_reap_locked(bool all)
{
    uint64_t now = kms_mono_ms();
    for (size_t i = 0; i < KMSD_SNAP_SESSIONS; i++) {
        struct snap_session *s = &snap_sessions[i];
        if (!s->used || s->busy) {
            continue;
        }
        if (all || now - s->last_use_ms >= KMSD_SNAP_IDLE_MS) {
            if (!all) {
                kms_log(KMS_LOG_WARN, "operator", "snapshot handle released after idle timeout",
                        NULL);
            }
            kms_store_export_close(s->x);
            memset(s, 0, sizeof(*s));
        }
    }
}

static void snap_cv_init(void)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&snap_cv, &ca);
    pthread_condattr_destroy(&ca);
}

static void *snap_reaper_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&snap_mu);
    while (!snap_stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += 5;
        (void)pthread_cond_timedwait(&snap_cv, &snap_mu, &ts);
        snap_reap_locked(false);
    }
    pthread_mutex_unlock(&snap_mu);
    return NULL;
}

void kmsd_snapshot_shutdown(void)
{
    bool join;
    (void)pthread_once(&snap_cv_once, snap_cv_init);
    pthread_mutex_lock(&snap_mu);
    snap_stopping = true;
    join = snap_reaper_started;
    pthread_cond_broadcast(&snap_cv);
    pthread_mutex_unlock(&snap_mu);
    if (join) {
        pthread_join(snap_reaper, NULL);
    }
    pthread_mutex_lock(&snap_mu);
    snap_reap_locked(true);
    snap_reaper_started = false;
    snap_stopping = false; /* a later daemon in this process (tests) starts clean */
    pthread_mutex_unlock(&snap_mu);
}

int kmsd_snapshot_begin_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    Kmsd__V1__SnapshotBeginResponse resp = KMSD__V1__SNAPSHOT_BEGIN_RESPONSE__INIT;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_store_export *x = NULL;
    struct snap_session *slot = NULL;
    struct kms_err *err = &c->err;
    uint8_t rnd[16];
    char handle[33];
    int rc;

    if (kms_store_restoring(d->store)) {
        rc = kms_err_set(err, KMS_EBUSY, "a snapshot restore is half-way");
        goto out;
    }
    if ((rc = kms_store_export_open(d->store, &x, err)) != 0) {
        goto out;
    }
    /* The keyring read after the pin is at least as new as the pinned one;
     * its cluster id never changes. */
    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0) {
        kms_err_set(err, rc, "this replica has no keyring yet (cluster not initialised here)");
        goto out;
    }
    if (kms_rand_bytes(rnd, sizeof(rnd), err) != 0 ||
        kms_hex_encode_ct(rnd, sizeof(rnd), handle, sizeof(handle), err) != 0) {
        rc = kms_err_set(err, KMS_ECRYPTO, "cannot make a handle");
        goto out;
    }
    resp.handle = handle;
    pthread_mutex_lock(&snap_mu);
    if (snap_stopping) {
        pthread_mutex_unlock(&snap_mu);
        rc = kms_err_set(err, KMS_ESHUTDOWN, "kmsd is stopping");
        goto out;
    }
    snap_reap_locked(false);
    for (size_t i = 0; i < KMSD_SNAP_SESSIONS && slot == NULL; i++) {
        if (!snap_sessions[i].used) {
            slot = &snap_sessions[i];
        }
    }
    if (slot == NULL) {
        pthread_mutex_unlock(&snap_mu);
        rc = kms_err_set(err, KMS_EBUSY,
                         "too many snapshots in progress on this replica; retry later");
        goto out;
    }
    (void)pthread_once(&snap_cv_once, snap_cv_init);
    if (!snap_reaper_started &&
        pthread_create(&snap_reaper, NULL, snap_reaper_main, NULL) == 0) {
        snap_reaper_started = true;
    }
    memset(slot, 0, sizeof(*slot));
    slot->used = true;
    snprintf(slot->handle, sizeof(slot->handle), "%s", resp.handle);
    slot->x = x;
    slot->last_use_ms = kms_mono_ms();
    x = NULL;
    resp.applied_index = kms_store_export_applied(slot->x);
    pthread_mutex_unlock(&snap_mu);

    resp.cluster_id.data = ek->cluster_id.data;
    resp.cluster_id.len = ek->cluster_id.len;
    resp.node_id = d->opt.node_id;
    resp.records = kms_store_count(d->store);
    resp.active_term = ek->active_term;
    resp.share_count = ek->share_count;
    resp.threshold = ek->threshold;
    kmsd_call_note(c, "index %llu", (unsigned long long)resp.applied_index);
    kmsd_call_reply(c, &resp.base);
    rc = 0;
out:
    kms_store_export_close(x);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return rc;
}

/* snap_mu held. */
static struct snap_session *snap_find_locked(const char *handle)
{
    if (handle == NULL || strlen(handle) != 32) {
        return NULL;
    }
    for (size_t i = 0; i < KMSD_SNAP_SESSIONS; i++) {
        if (snap_sessions[i].used && strcmp(snap_sessions[i].handle, handle) == 0) {
            return &snap_sessions[i];
        }
    }
    return NULL;
}

int kmsd_snapshot_chunk_cb(struct kmsd_call *c)
{
    const Kmsd__V1__SnapshotChunkRequest *r = (const Kmsd__V1__SnapshotChunkRequest *)c->req;
    Kmsd__V1__SnapshotChunkResponse resp = KMSD__V1__SNAPSHOT_CHUNK_RESPONSE__INIT;
    struct snap_session *s = NULL;
    uint8_t *buf = NULL;
    size_t used = 0;
    uint64_t entries = 0;
    bool done = false, ok = false;
    int rc;

    pthread_mutex_lock(&snap_mu);
    s = snap_find_locked(r->handle);
    if (s == NULL || s->busy) {
        pthread_mutex_unlock(&snap_mu);
        rc = kms_err_set(&c->err, KMS_ENOTFOUND, "%s",
                         s == NULL ? "unknown or expired snapshot handle (start the save again)"
                                   : "snapshot handle in use by another call");
        goto out;
    }
    if (r->seq != s->next_seq || s->done) {
        uint64_t want = s->next_seq;
        pthread_mutex_unlock(&snap_mu);
        rc = kms_err_set(&c->err, KMS_EINVAL,
                         "snapshot chunk %llu asked, %llu expected (chunks are read once, in "
                         "order; start the save again)",
                         (unsigned long long)r->seq, (unsigned long long)want);
        goto out;
    }
    s->busy = true;
    pthread_mutex_unlock(&snap_mu);

    buf = malloc(KMSD_SNAP_CHUNK);
    if (buf == NULL) {
        kmsd_call_fail(c, KMS_ENOMEM, "out of memory");
        goto release;
    }
    rc = kms_store_export_next(s->x, buf, KMSD_SNAP_CHUNK, &used, &entries, &done, &c->err);
    if (rc != 0) {
        kmsd_call_fail(c, rc, c->err.msg);
        goto release;
    }
    resp.data.data = buf;
    resp.data.len = used;
    resp.entries = entries;
    resp.done = done;
    ok = true;
release:
    pthread_mutex_lock(&snap_mu);
    s->busy = false;
    s->last_use_ms = kms_mono_ms();
    s->next_seq++;
    s->done = done || !ok; /* a failed chunk ends the session: start again */
    pthread_mutex_unlock(&snap_mu);
    /* Answered only once the session is free again: the client sends the
     * next chunk as soon as it has this one, and on a busy machine that
     * request reached another pool thread while this one had not yet
     * cleared `busy` ("snapshot handle in use by another call"). */
    if (ok) {
        kmsd_call_reply(c, &resp.base);
    }
    rc = 0;
out:
    free(buf);
    return rc;
}

int kmsd_snapshot_end_cb(struct kmsd_call *c)
{
    const Kmsd__V1__SnapshotEndRequest *r = (const Kmsd__V1__SnapshotEndRequest *)c->req;
    Kmsd__V1__SnapshotEndResponse resp = KMSD__V1__SNAPSHOT_END_RESPONSE__INIT;
    struct snap_session *s;

    pthread_mutex_lock(&snap_mu);
    s = snap_find_locked(r->handle);
    if (s != NULL && !s->busy) {
        kms_store_export_close(s->x);
        memset(s, 0, sizeof(*s));
    }
    pthread_mutex_unlock(&snap_mu);
    kmsd_call_reply(c, &resp.base);
    return 0;
}
