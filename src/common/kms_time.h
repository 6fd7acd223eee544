/* Clocks. Monotonic for timeouts and leases, wall clock for record times. */
#ifndef KMS_TIME_H
#define KMS_TIME_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

static inline uint64_t kms_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static inline uint64_t kms_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Sleeps about ms milliseconds (a signal may cut it short). */
static inline void kms_sleep_ms(unsigned ms)
{
    struct timespec ts = {(time_t)(ms / 1000u), (long)(ms % 1000u) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Adds ms milliseconds to t. */
static inline void kms_ts_add_ms(struct timespec *t, unsigned ms)
{
    t->tv_sec += (time_t)(ms / 1000u);
    t->tv_nsec += (long)(ms % 1000u) * 1000000L;
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}

/* The CLOCK_MONOTONIC time ms milliseconds from now: the absolute deadline
 * of a pthread_cond_timedwait on a kms_cond_init_mono() variable. */
static inline struct timespec kms_mono_ts_in(unsigned ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    kms_ts_add_ms(&ts, ms);
    return ts;
}

/* pthread_cond_init on CLOCK_MONOTONIC (timed waits immune to wall-clock
 * steps). */
static inline void kms_cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &ca);
    pthread_condattr_destroy(&ca);
}

static inline int64_t kms_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + (int64_t)ts.tv_nsec / 1000000;
}

#endif /* KMS_TIME_H */
