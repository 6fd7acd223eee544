/*
 * The daemon's event count (kmsd_wake.h).
 */
#include <errno.h>
#include <time.h>

#include "kmsd_wake.h"

int kmsd_wake_init(struct kmsd_wake *w, struct kms_err *err)
{
    pthread_condattr_t ca;
    int rc = 0;

    w->count = 0;
    if (pthread_mutex_init(&w->mu, NULL) != 0) {
        return kms_err_set(err, KMS_ENOMEM, "cannot create the wake mutex");
    }
    if (pthread_condattr_init(&ca) != 0) {
        rc = kms_err_set(err, KMS_ENOMEM, "cannot create the wake condition variable");
        goto out;
    }
    if (pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&w->cv, &ca) != 0) {
        rc = kms_err_set(err, KMS_ENOMEM, "cannot create the wake condition variable");
    }
    pthread_condattr_destroy(&ca);
out:
    if (rc != 0) {
        pthread_mutex_destroy(&w->mu);
    }
    return rc;
}

void kmsd_wake_destroy(struct kmsd_wake *w)
{
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
}

uint64_t kmsd_wake_ticket(struct kmsd_wake *w)
{
    uint64_t t;
    pthread_mutex_lock(&w->mu);
    t = w->count;
    pthread_mutex_unlock(&w->mu);
    return t;
}

void kmsd_wake_signal(struct kmsd_wake *w)
{
    pthread_mutex_lock(&w->mu);
    w->count++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

bool kmsd_wake_wait_until(struct kmsd_wake *w, uint64_t ticket, uint64_t until_ms)
{
    struct timespec ts;
    bool woken;

    ts.tv_sec = (time_t)(until_ms / 1000u);
    ts.tv_nsec = (long)(until_ms % 1000u) * 1000000L;
    pthread_mutex_lock(&w->mu);
    while (w->count == ticket) {
        if (until_ms == KMSD_WAKE_NEVER) {
            pthread_cond_wait(&w->cv, &w->mu);
        } else if (pthread_cond_timedwait(&w->cv, &w->mu, &ts) == ETIMEDOUT) {
            break;
        }
    }
    woken = w->count != ticket;
    pthread_mutex_unlock(&w->mu);
    return woken;
}
