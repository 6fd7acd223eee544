/*
 * Last access batching (kmsd_touch.h).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms_log.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_touch.h"

#include "kmsd/v1/entry.pb-c.h"

struct touch_slot {
    uint8_t id[16];
    int64_t at; /* 0: empty */
};

struct kmsd_touch {
    pthread_mutex_t mu;
    pthread_cond_t cv;   /* signalled by stop */
    bool stop;
    struct touch_slot *slots; /* open addressing, cap = 2 * max batch (power of 2) */
    size_t cap, used, max;
    pthread_t thread;
    bool started;
};

static uint64_t slot_hash(const uint8_t id[16])
{
    uint64_t h;
    memcpy(&h, id, sizeof(h)); /* key ids are random: their bytes are a hash */
    return h;
}

/* Inserts or raises; false when the table is full (at most `max` keys). */
static bool table_put(struct kmsd_touch *t, const uint8_t id[16], int64_t at)
{
    size_t mask = t->cap - 1, i = (size_t)slot_hash(id) & mask;

    for (size_t n = 0; n < t->cap; n++, i = (i + 1) & mask) {
        struct touch_slot *s = &t->slots[i];
        if (s->at == 0) {
            if (t->used >= t->max) {
                return false;
            }
            memcpy(s->id, id, 16);
            s->at = at;
            t->used++;
            return true;
        }
        if (memcmp(s->id, id, 16) == 0) {
            if (at > s->at) {
                s->at = at;
            }
            return true;
        }
    }
    return false;
}

void kmsd_touch_note(struct kmsd *d, const uint8_t key_id[16])
{
    struct kmsd_touch *t = d->touch;
    bool ok;

    if (t == NULL) {
        return;
    }
    pthread_mutex_lock(&t->mu);
    ok = table_put(t, key_id, kms_wall_ms());
    pthread_mutex_unlock(&t->mu);
    if (!ok) {
        atomic_fetch_add(&d->metrics.touch_dropped, 1);
    }
}

/* Takes the table's contents (the table is left empty). */
static struct touch_slot *table_take(struct kmsd_touch *t, size_t *n)
{
    struct touch_slot *out = NULL;
    size_t k = 0;

    *n = 0;
    if (t->used == 0) {
        return NULL;
    }
    out = malloc(t->used * sizeof(*out));
    if (out == NULL) {
        return NULL; /* kept for the next interval */
    }
    for (size_t i = 0; i < t->cap && k < t->used; i++) {
        if (t->slots[i].at != 0) {
            out[k++] = t->slots[i];
        }
    }
    memset(t->slots, 0, t->cap * sizeof(*t->slots));
    t->used = 0;
    *n = k;
    return out;
}

static int flush_once(struct kmsd *d, struct touch_slot *v, size_t n)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__TouchBatch tb = KMSD__V1__TOUCH_BATCH__INIT;
    Kmsd__V1__Touch *touches = NULL, **ptrs = NULL;
    struct kmsd_write_result res;
    struct kms_err err;
    int rc;

    touches = calloc(n, sizeof(*touches));
    ptrs = calloc(n, sizeof(*ptrs));
    if (touches == NULL || ptrs == NULL) {
        rc = KMS_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        kmsd__v1__touch__init(&touches[i]);
        touches[i].key_id.data = v[i].id;
        touches[i].key_id.len = 16;
        touches[i].at = v[i].at;
        ptrs[i] = &touches[i];
    }
    tb.n_touches = n;
    tb.touches = ptrs;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_TOUCH_BATCH;
    e.touch_batch = &tb;
    kms_err_clear(&err);
    memset(&res, 0, sizeof(res));
    rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, &err);
    if (rc == 0) {
        atomic_fetch_add(&d->metrics.touch_writes, 1);
        atomic_fetch_add(&d->metrics.touch_keys, n);
    } else {
        kms_log(KMS_LOG_DEBUG, "keys", "last-access batch not written; retried next interval",
                "error", err.msg, NULL);
    }
out:
    free(touches);
    free(ptrs);
    return rc;
}

static void *touch_main(void *arg)
{
    struct kmsd *d = arg;
    struct kmsd_touch *t = d->touch;

    (void)pthread_setname_np(pthread_self(), "kmsd-touch");
    pthread_mutex_lock(&t->mu);
    while (!t->stop) {
        struct timespec ts;
        struct touch_slot *v;
        size_t n = 0;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += d->opt.last_access_interval_ms / 1000;
        ts.tv_nsec += (long)(d->opt.last_access_interval_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        while (!t->stop && pthread_cond_timedwait(&t->cv, &t->mu, &ts) == 0) {
        }
        if (t->stop) {
            break;
        }
        if (t->used == 0 || !kmsd_is_unsealed(d)) {
            continue;
        }
        v = table_take(t, &n);
        pthread_mutex_unlock(&t->mu);
        if (v != NULL && flush_once(d, v, n) != 0) {
            /* Not written: put back what fits (newer notes win). */
            pthread_mutex_lock(&t->mu);
            for (size_t i = 0; i < n; i++) {
                (void)table_put(t, v[i].id, v[i].at);
            }
            pthread_mutex_unlock(&t->mu);
        }
        free(v);
        pthread_mutex_lock(&t->mu);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

int kmsd_touch_start(struct kmsd *d, struct kms_err *err)
{
    struct kmsd_touch *t;
    pthread_condattr_t ca;

    if (d->opt.last_access_interval_ms == 0) {
        return 0;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "last access: out of memory");
    }
    t->max = d->opt.last_access_max_batch == 0 ? 4096 : d->opt.last_access_max_batch;
    if (t->max > KMSD_TOUCH_MAX) {
        t->max = KMSD_TOUCH_MAX;
    }
    for (t->cap = 16; t->cap < 2 * t->max; t->cap *= 2) {
    }
    t->slots = calloc(t->cap, sizeof(*t->slots));
    if (t->slots == NULL) {
        free(t);
        return kms_err_set(err, KMS_ENOMEM, "last access: out of memory");
    }
    pthread_mutex_init(&t->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    d->touch = t;
    if (pthread_create(&t->thread, NULL, touch_main, d) != 0) {
        d->touch = NULL;
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
        free(t->slots);
        free(t);
        return kms_err_set(err, KMS_ENOMEM, "cannot start the last-access thread");
    }
    t->started = true;
    return 0;
}

void kmsd_touch_stop(struct kmsd *d)
{
    struct kmsd_touch *t = d->touch;

    if (t == NULL) {
        return;
    }
    pthread_mutex_lock(&t->mu);
    t->stop = true;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    if (t->started) {
        pthread_join(t->thread, NULL);
    }
    d->touch = NULL;
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t->slots);
    free(t);
}
