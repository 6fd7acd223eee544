/* clockrate.so: LD_PRELOAD shim that makes CLOCK_MONOTONIC (and
 * CLOCK_MONOTONIC_COARSE / _RAW / BOOTTIME) run at JP_CLOCK_RATE times real
 * speed from process start: fake(t) = t0 + (t - t0) * rate.
 * Waits are converted back so the process is self-consistent (its timers
 * fire after the fake duration): absolute pthread_cond_timedwait deadlines on
 * CLOCK_MONOTONIC condvars, pthread_cond_clockwait, clock_nanosleep; relative
 * nanosleep / epoll_wait / poll timeouts are divided by the rate.
 * The wall clock (CLOCK_REALTIME) is left alone. libfaketime is not used: it
 * breaks CLOCK_MONOTONIC condvars (docs/reliability.md).
 * Build: gcc -O2 -Wno-nonnull-compare -shared -fPIC -o clockrate.so clockrate.c -ldl -lpthread */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double rate = 1.0;
static int64_t t0[16];
static int inited;

static int64_t ts_ns(const struct timespec *t) { return (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec; }
static void ns_ts(int64_t n, struct timespec *t) { t->tv_sec = n / 1000000000LL; t->tv_nsec = n % 1000000000LL; }

static int scaled(clockid_t c)
{
    return c == CLOCK_MONOTONIC || c == CLOCK_MONOTONIC_RAW || c == CLOCK_MONOTONIC_COARSE ||
           c == CLOCK_BOOTTIME;
}

static int raw_gettime(clockid_t c, struct timespec *t) { return (int)syscall(SYS_clock_gettime, c, t); }

__attribute__((constructor)) static void init(void)
{
    const char *r = getenv("JP_CLOCK_RATE");
    if (r) rate = strtod(r, NULL);
    if (rate <= 0.01 || rate > 100) rate = 1.0;
    for (int c = 0; c < 16; c++) {
        struct timespec t;
        if (scaled(c) && raw_gettime(c, &t) == 0) t0[c] = ts_ns(&t);
    }
    inited = 1;
}

static int64_t fake_of(clockid_t c, int64_t real) { return t0[c] + (int64_t)((double)(real - t0[c]) * rate); }
static int64_t real_of(clockid_t c, int64_t fake) { return t0[c] + (int64_t)((double)(fake - t0[c]) / rate); }

int clock_gettime(clockid_t c, struct timespec *t)
{
    int rc = raw_gettime(c, t);
    if (rc == 0 && inited && scaled(c) && c < 16) ns_ts(fake_of(c, ts_ns(t)), t);
    return rc;
}

int pthread_cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *mu, const struct timespec *abs)
{
    static int (*real)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);
    if (!real) real = dlvsym(RTLD_NEXT, "pthread_cond_timedwait", "GLIBC_2.3.2");
    if (!real) real = dlsym(RTLD_NEXT, "pthread_cond_timedwait");
    /* glibc keeps the condvar's clock in bit 1 of __wrefs */
    if (abs && (cv->__data.__wrefs & 2)) {
        struct timespec r;
        ns_ts(real_of(CLOCK_MONOTONIC, ts_ns(abs)), &r);
        return real(cv, mu, &r);
    }
    return real(cv, mu, abs);
}

int pthread_cond_clockwait(pthread_cond_t *cv, pthread_mutex_t *mu, clockid_t c, const struct timespec *abs)
{
    static int (*real)(pthread_cond_t *, pthread_mutex_t *, clockid_t, const struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "pthread_cond_clockwait");
    if (abs && scaled(c) && c < 16) {
        struct timespec r;
        ns_ts(real_of(c, ts_ns(abs)), &r);
        return real(cv, mu, c, &r);
    }
    return real(cv, mu, c, abs);
}

int clock_nanosleep(clockid_t c, int flags, const struct timespec *req, struct timespec *rem)
{
    struct timespec r = *req;
    if (scaled(c) && c < 16) {
        if (flags & TIMER_ABSTIME) ns_ts(real_of(c, ts_ns(req)), &r);
        else ns_ts((int64_t)(ts_ns(req) / rate), &r);
    }
    long rc = syscall(SYS_clock_nanosleep, c, flags, &r, rem);
    return rc == 0 ? 0 : errno;
}

int nanosleep(const struct timespec *req, struct timespec *rem)
{
    struct timespec r;
    ns_ts((int64_t)(ts_ns(req) / rate), &r);
    return (int)syscall(SYS_nanosleep, &r, rem);
}

int epoll_wait(int fd, struct epoll_event *ev, int n, int ms)
{
    if (ms > 0) ms = (int)(ms / rate) + 1;
    return (int)syscall(SYS_epoll_wait, fd, ev, n, ms);
}

int poll(struct pollfd *fds, nfds_t n, int ms)
{
    if (ms > 0) ms = (int)(ms / rate) + 1;
    return (int)syscall(SYS_poll, fds, n, ms);
}

int usleep(useconds_t us)
{
    struct timespec r;
    ns_ts((int64_t)((double)us * 1000.0 / rate), &r);
    return (int)syscall(SYS_nanosleep, &r, NULL);
}
