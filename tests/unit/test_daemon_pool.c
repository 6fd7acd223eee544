/*
 * The daemon's pool for parked handlers (src/server/daemon/pool.c, compiled
 * into this test: it is private to kmsd).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "../../src/server/daemon/pool.c"

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static atomic_int g_ran, g_started;
static atomic_bool g_release;

static void count_cb(void *arg)
{
    (void)arg;
    atomic_fetch_add(&g_ran, 1);
}

static void block_cb(void *arg)
{
    (void)arg;
    atomic_fetch_add(&g_started, 1);
    while (!atomic_load(&g_release)) {
        sleep_ms(2);
    }
    atomic_fetch_add(&g_ran, 1);
}

static void test_runs_jobs(void **state)
{
    struct kmsd_pool *p = NULL;
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    atomic_store(&g_ran, 0);
    assert_int_equal(kmsd_pool_create("t", 4, 1000, &p, &err), 0);
    for (int i = 0; i < 500; i++) {
        assert_int_equal(kmsd_pool_submit(p, count_cb, NULL), 0);
    }
    for (int i = 0; i < 1000 && atomic_load(&g_ran) < 500; i++) {
        sleep_ms(2);
    }
    assert_int_equal(atomic_load(&g_ran), 500);
    assert_int_equal(kmsd_pool_load(p), 0);
    kmsd_pool_destroy(p);
}

/* A blocked job holds only its own thread: with every thread blocked, the
 * queue fills to max_queue and then refuses (the caller answers
 * UNAVAILABLE); stop runs what was queued, then refuses everything. */
static void test_queue_bound_and_stop(void **state)
{
    struct kmsd_pool *p = NULL;
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    atomic_store(&g_ran, 0);
    atomic_store(&g_release, false);
    atomic_store(&g_started, 0);
    assert_int_equal(kmsd_pool_create("t", 2, 3, &p, &err), 0);
    assert_int_equal(kmsd_pool_submit(p, block_cb, NULL), 0);
    assert_int_equal(kmsd_pool_submit(p, block_cb, NULL), 0);
    for (int i = 0; i < 2500 && atomic_load(&g_started) != 2; i++) {
        sleep_ms(2); /* until both threads hold a blocked job */
    }
    assert_int_equal(atomic_load(&g_started), 2);
    assert_int_equal(kmsd_pool_submit(p, count_cb, NULL), 0);
    assert_int_equal(kmsd_pool_submit(p, count_cb, NULL), 0);
    assert_int_equal(kmsd_pool_submit(p, count_cb, NULL), 0);
    assert_int_equal(kmsd_pool_submit(p, count_cb, NULL), KMS_EBUSY);
    assert_int_equal(kmsd_pool_load(p), 5);
    atomic_store(&g_release, true);
    kmsd_pool_stop(p);
    assert_int_equal(atomic_load(&g_ran), 5);
    assert_int_equal(kmsd_pool_submit(p, count_cb, NULL), KMS_ESHUTDOWN);
    kmsd_pool_stop(p); /* idempotent */
    kmsd_pool_destroy(p);
    kmsd_pool_destroy(NULL);
}

static void test_bad_args(void **state)
{
    struct kmsd_pool *p = NULL;
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kmsd_pool_create("t", 0, 10, &p, &err), KMS_EINVAL);
    assert_null(p);
    assert_int_equal(kmsd_pool_create("t", 1, 0, &p, &err), KMS_EINVAL);
    assert_null(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_runs_jobs),
        cmocka_unit_test(test_queue_bound_and_stop),
        cmocka_unit_test(test_bad_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
