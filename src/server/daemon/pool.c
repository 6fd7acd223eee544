/*
 * Thread pool for parked handlers (kmsd_pool.h): a mutex-protected FIFO of
 * jobs and a fixed set of threads that take jobs from it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms_log.h"
#include "kms_time.h"
#include "kmsd_pool.h"

struct job {
    kmsd_pool_fn fn;
    void *arg;
    struct job *next;
};

struct kmsd_pool {
    char name[32];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_cond_t idle_cv; /* CLOCK_MONOTONIC; nothing queued or running */
    struct job *head, *tail;
    size_t queued, running, max_queue;
    bool stopping;
    pthread_t *threads;
    unsigned n_threads;
};

static void *pool_main(void *arg)
{
    struct kmsd_pool *p = arg;

    pthread_mutex_lock(&p->mu);
    for (;;) {
        struct job *j;
        while (p->head == NULL && !p->stopping) {
            pthread_cond_wait(&p->cv, &p->mu);
        }
        if (p->head == NULL) {
            break; /* stopping and drained */
        }
        j = p->head;
        p->head = j->next;
        if (p->head == NULL) {
            p->tail = NULL;
        }
        p->queued--;
        p->running++;
        pthread_mutex_unlock(&p->mu);
        j->fn(j->arg);
        free(j);
        pthread_mutex_lock(&p->mu);
        p->running--;
        if (p->running == 0 && p->head == NULL) {
            pthread_cond_broadcast(&p->idle_cv);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int kmsd_pool_create(const char *name, unsigned threads, size_t max_queue,
                     struct kmsd_pool **out, struct kms_err *err)
{
    struct kmsd_pool *p;
    int rc = 0;

    *out = NULL;
    if (threads == 0 || max_queue == 0) {
        return kms_err_set(err, KMS_EINVAL, "pool %s: needs threads and a queue", name);
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL || (p->threads = calloc(threads, sizeof(*p->threads))) == NULL) {
        free(p);
        return kms_err_set(err, KMS_ENOMEM, "pool %s: out of memory", name);
    }
    snprintf(p->name, sizeof(p->name), "%s", name);
    p->max_queue = max_queue;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    kms_cond_init_mono(&p->idle_cv);
    for (unsigned i = 0; i < threads; i++) {
        if (pthread_create(&p->threads[i], NULL, pool_main, p) != 0) {
            rc = kms_err_set(err, KMS_ENOMEM, "pool %s: cannot start thread %u of %u", name,
                             i + 1, threads);
            goto out;
        }
        (void)pthread_setname_np(p->threads[i], p->name);
        p->n_threads++;
    }
out:
    if (rc != 0) {
        kmsd_pool_destroy(p);
        return rc;
    }
    *out = p;
    return 0;
}

int kmsd_pool_submit(struct kmsd_pool *p, kmsd_pool_fn fn, void *arg)
{
    struct job *j;
    int rc = 0;

    j = malloc(sizeof(*j));
    if (j == NULL) {
        return KMS_ENOMEM;
    }
    j->fn = fn;
    j->arg = arg;
    j->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->stopping) {
        rc = KMS_ESHUTDOWN;
        goto out;
    }
    if (p->queued >= p->max_queue) {
        rc = KMS_EBUSY;
        goto out;
    }
    if (p->tail != NULL) {
        p->tail->next = j;
    } else {
        p->head = j;
    }
    p->tail = j;
    p->queued++;
    j = NULL;
    pthread_cond_signal(&p->cv);
out:
    pthread_mutex_unlock(&p->mu);
    free(j);
    return rc;
}

size_t kmsd_pool_load(struct kmsd_pool *p)
{
    size_t n;
    pthread_mutex_lock(&p->mu);
    n = p->queued + p->running;
    pthread_mutex_unlock(&p->mu);
    return n;
}

bool kmsd_pool_wait_idle(struct kmsd_pool *p, unsigned timeout_ms)
{
    struct timespec end;
    bool idle;

    if (p == NULL) {
        return true;
    }
    end = kms_mono_ts_in(timeout_ms);
    pthread_mutex_lock(&p->mu);
    while (p->running > 0 || p->head != NULL) {
        if (pthread_cond_timedwait(&p->idle_cv, &p->mu, &end) == ETIMEDOUT) {
            break;
        }
    }
    idle = p->running == 0 && p->head == NULL;
    pthread_mutex_unlock(&p->mu);
    return idle;
}

void kmsd_pool_stop(struct kmsd_pool *p)
{
    if (p == NULL) {
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->n_threads; i++) {
        pthread_join(p->threads[i], NULL);
    }
    p->n_threads = 0;
}

void kmsd_pool_destroy(struct kmsd_pool *p)
{
    if (p == NULL) {
        return;
    }
    kmsd_pool_stop(p);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    pthread_cond_destroy(&p->idle_cv);
    free(p->threads);
    free(p);
}
