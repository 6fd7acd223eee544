/*
 * The daemon's event count (src/server/daemon/wake.c, from kms_daemon):
 * a signal after the ticket ends the wait at once, none before the
 * deadline lets it time out on CLOCK_MONOTONIC, a signal from another
 * thread wakes a waiter without a deadline, and a state handed back and
 * forth many times under the ticket protocol never loses a wake-up.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "kms_time.h"
#include "kmsd_wake.h"

static struct kmsd_wake *mk(void)
{
    static struct kmsd_wake w;
    struct kms_err err;
    kms_err_clear(&err);
    assert_int_equal(kmsd_wake_init(&w, &err), 0);
    return &w;
}

static void test_signal_after_ticket(void **state)
{
    struct kmsd_wake *w = mk();
    uint64_t t0, ticket;
    (void)state;
    ticket = kmsd_wake_ticket(w);
    kmsd_wake_signal(w);
    t0 = kms_mono_ms();
    assert_true(kmsd_wake_wait_until(w, ticket, KMSD_WAKE_NEVER));
    assert_true(kmsd_wake_wait_until(w, ticket, t0 + 5000));
    assert_true(kms_mono_ms() - t0 < 1000);
    kmsd_wake_destroy(w);
}

static void test_timeout(void **state)
{
    struct kmsd_wake *w = mk();
    uint64_t t0, ticket;
    (void)state;
    kmsd_wake_signal(w); /* before the ticket: not a wake for it */
    ticket = kmsd_wake_ticket(w);
    t0 = kms_mono_ms();
    assert_false(kmsd_wake_wait_until(w, ticket, t0 + 60));
    assert_true(kms_mono_ms() >= t0 + 60);
    assert_true(kms_mono_ms() - t0 < 2000);
    /* A deadline already past returns at once. */
    assert_false(kmsd_wake_wait_until(w, ticket, t0));
    kmsd_wake_destroy(w);
}

struct pingpong {
    struct kmsd_wake *w;
    atomic_int turn;     /* 0: main's move, 1: the thread's */
    atomic_int rounds;   /* moves the thread made */
    atomic_bool missed;  /* a wait timed out: a wake-up was lost */
    int n;
};

/* Waits for its turn under the ticket protocol, hands it back, n times. */
static void *pong_main(void *arg)
{
    struct pingpong *pp = arg;
    for (int i = 0; i < pp->n; i++) {
        for (;;) {
            uint64_t ticket = kmsd_wake_ticket(pp->w);
            if (atomic_load(&pp->turn) == 1) {
                break;
            }
            if (!kmsd_wake_wait_until(pp->w, ticket, kms_mono_ms() + 5000)) {
                atomic_store(&pp->missed, true);
                return NULL;
            }
        }
        atomic_store(&pp->turn, 0);
        atomic_fetch_add(&pp->rounds, 1);
        kmsd_wake_signal(pp->w);
    }
    return NULL;
}

static void test_no_lost_wakeup(void **state)
{
    struct pingpong pp;
    pthread_t th;
    (void)state;
    pp.w = mk();
    atomic_init(&pp.turn, 0);
    atomic_init(&pp.rounds, 0);
    atomic_init(&pp.missed, false);
    pp.n = 20000;
    assert_int_equal(pthread_create(&th, NULL, pong_main, &pp), 0);
    for (int i = 0; i < pp.n && !atomic_load(&pp.missed); i++) {
        atomic_store(&pp.turn, 1);
        kmsd_wake_signal(pp.w);
        for (;;) {
            uint64_t ticket = kmsd_wake_ticket(pp.w);
            if (atomic_load(&pp.turn) == 0 || atomic_load(&pp.missed)) {
                break;
            }
            if (!kmsd_wake_wait_until(pp.w, ticket, kms_mono_ms() + 5000)) {
                atomic_store(&pp.missed, true);
            }
        }
    }
    pthread_join(th, NULL);
    assert_false(atomic_load(&pp.missed));
    assert_int_equal(atomic_load(&pp.rounds), pp.n);
    kmsd_wake_destroy(pp.w);
}

struct late {
    struct kmsd_wake *w;
    atomic_bool stop;
};

static void *late_signal_main(void *arg)
{
    struct late *l = arg;
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
    atomic_store(&l->stop, true);
    kmsd_wake_signal(l->w);
    return NULL;
}

/* The shutdown pattern: a waiter with no deadline ends as soon as another
 * thread sets the flag and signals. */
static void test_stop_wakes_waiter(void **state)
{
    struct late l;
    pthread_t th;
    uint64_t t0 = kms_mono_ms();
    (void)state;
    l.w = mk();
    atomic_init(&l.stop, false);
    assert_int_equal(pthread_create(&th, NULL, late_signal_main, &l), 0);
    for (;;) {
        uint64_t ticket = kmsd_wake_ticket(l.w);
        if (atomic_load(&l.stop)) {
            break;
        }
        (void)kmsd_wake_wait_until(l.w, ticket, KMSD_WAKE_NEVER);
    }
    pthread_join(th, NULL);
    assert_true(kms_mono_ms() - t0 < 2000);
    kmsd_wake_destroy(l.w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_signal_after_ticket),
        cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_no_lost_wakeup),
        cmocka_unit_test(test_stop_wakes_waiter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
