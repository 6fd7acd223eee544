/*
 * The Talos API limiter (src/server/daemon/limit.c): per-key and global
 * windows, keyed hash, bounded table, address keys (IPv6 /64).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>

#include "../../src/server/daemon/limit.c"

static struct kmsd_limiter *mk(size_t cap, unsigned per_key, unsigned global)
{
    struct kmsd_limiter *l = NULL;
    struct kms_err err;
    kms_err_clear(&err);
    assert_int_equal(kmsd_limiter_new(cap, per_key, global, 60000, &l, &err), 0);
    assert_non_null(l);
    return l;
}

static void ip4(uint8_t ip[16], unsigned a, unsigned b, unsigned c, unsigned d)
{
    memset(ip, 0, 16);
    ip[10] = ip[11] = 0xff;
    ip[12] = (uint8_t)a;
    ip[13] = (uint8_t)b;
    ip[14] = (uint8_t)c;
    ip[15] = (uint8_t)d;
}

/* Seal-style: take() allows exactly per_key events per window. */
static void test_take_per_key(void **state)
{
    (void)state;
    struct kmsd_limiter *l = mk(64, 5, 0);
    for (int i = 0; i < 5; i++) {
        assert_true(kmsd_limiter_take(l, "a", 1, 1000, NULL));
    }
    assert_false(kmsd_limiter_take(l, "a", 1, 1001, NULL));
    assert_true(kmsd_limiter_take(l, "b", 1, 1002, NULL)); /* other key unaffected */
    assert_true(kmsd_limiter_take(l, "a", 1, 1000 + 60000, NULL)); /* new window */
    kmsd_limiter_free(l);
}

/* Unseal-style: failures counted; over() tells; a valid request is never
 * asked (the daemon checks only failing ones), and a key that did not fail
 * is not over. */
static void test_count_over(void **state)
{
    (void)state;
    struct kmsd_limiter *l = mk(1024, 30, 0);
    uint8_t ip[16], k[16], k2[16];
    size_t kl, kl2;
    bool g = true;
    ip4(ip, 10, 0, 0, 1);
    kl = kmsd_limit_addr_key(ip, k);
    for (int i = 0; i < 29; i++) {
        kmsd_limiter_count(l, k, kl, 5000);
    }
    assert_false(kmsd_limiter_over(l, k, kl, 5000, &g));
    kmsd_limiter_count(l, k, kl, 5000);
    assert_true(kmsd_limiter_over(l, k, kl, 5000, &g));
    assert_false(g); /* the address, not the global bound */
    ip4(ip, 10, 0, 0, 2);
    kl2 = kmsd_limit_addr_key(ip, k2);
    assert_false(kmsd_limiter_over(l, k2, kl2, 5000, NULL));
    assert_false(kmsd_limiter_over(l, k, kl, 5000 + 60000, NULL)); /* window over */
    kmsd_limiter_free(l);
}

/* Rotating addresses cannot exceed the global bound. */
static void test_global_bound(void **state)
{
    (void)state;
    struct kmsd_limiter *l = mk(4096, 30, 100);
    uint8_t ip[16], k[16];
    size_t kl;
    bool g = false;
    int refused_at = -1;
    for (int i = 0; i < 1000; i++) {
        ip4(ip, 127, 0, (unsigned)(i >> 8), (unsigned)(i & 255));
        kl = kmsd_limit_addr_key(ip, k);
        if (kmsd_limiter_over(l, k, kl, 7000, &g)) {
            refused_at = i;
            break;
        }
        kmsd_limiter_count(l, k, kl, 7000);
    }
    assert_int_equal(refused_at, 100);
    assert_true(g);
    kmsd_limiter_free(l);
}

/* The table never grows: a million distinct keys in 64 entries; an address
 * that keeps failing stays limited while others come and go in other sets
 * (and a full set evicts the least recently used entry). */
static void test_bounded_table(void **state)
{
    (void)state;
    struct kmsd_limiter *l = mk(64, 3, 0);
    uint8_t ip[16], k[16];
    size_t kl;
    assert_int_equal(l->n_sets * KMSD_LIMIT_WAYS, 64);
    for (unsigned i = 0; i < 1000000; i++) {
        kmsd_limiter_count(l, &i, sizeof(i), 9000);
    }
    ip4(ip, 192, 0, 2, 7);
    kl = kmsd_limit_addr_key(ip, k);
    for (int i = 0; i < 3; i++) {
        kmsd_limiter_count(l, k, kl, 9001);
    }
    assert_true(kmsd_limiter_over(l, k, kl, 9001, NULL));
    kmsd_limiter_free(l);
}

/* Keyed: two limiters (two processes) hash the same key differently, so
 * which keys share a set cannot be predicted from outside. */
static void test_keyed_hash(void **state)
{
    (void)state;
    struct kmsd_limiter *a = mk(64, 1, 0), *b = mk(64, 1, 0);
    assert_int_not_equal(limit_hash(a, "10.0.0.1", 8), limit_hash(b, "10.0.0.1", 8));
    assert_int_equal(limit_hash(a, "10.0.0.1", 8), limit_hash(a, "10.0.0.1", 8));
    assert_int_not_equal(limit_hash(a, "10.0.0.1", 8), limit_hash(a, "10.0.0.2", 8));
    kmsd_limiter_free(a);
    kmsd_limiter_free(b);
}

/* IPv4 keys are the address; IPv6 keys are the /64. */
static void test_addr_key(void **state)
{
    (void)state;
    uint8_t a[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1};
    uint8_t b[16], ka[16], kb[16], ip[16];
    memcpy(b, a, 16);
    b[15] = 0x99;
    b[9] = 0x42;
    assert_int_equal(kmsd_limit_addr_key(a, ka), 8);
    assert_int_equal(kmsd_limit_addr_key(b, kb), 8);
    assert_memory_equal(ka, kb, 8); /* same /64 */
    b[7] ^= 1;
    kmsd_limit_addr_key(b, kb);
    assert_memory_not_equal(ka, kb, 8); /* another /64 */
    ip4(ip, 127, 0, 0, 2);
    assert_int_equal(kmsd_limit_addr_key(ip, ka), 4);
    assert_int_equal(ka[0], 127);
    assert_int_equal(ka[3], 2);
}

/* Seal quota per UUID and per address together (the daemon takes the
 * address first, then the UUID). */
static void test_seal_quotas(void **state)
{
    (void)state;
    struct kmsd_limiter *addr = mk(4096, 120, 0), *uuid = mk(4096, 10, 0);
    int ok = 0;
    for (int i = 0; i < 25000; i++) {
        char u[40];
        snprintf(u, sizeof(u), "uuid-%d", i % 50);
        if (kmsd_limiter_take(addr, "\x7f\0\0\1", 4, 100, NULL) &&
            kmsd_limiter_take(uuid, u, strlen(u), 100, NULL)) {
            ok++;
        }
    }
    assert_int_equal(ok, 120); /* a 25,000-seal flood from one address: 120 per minute */
    kmsd_limiter_free(addr);
    kmsd_limiter_free(uuid);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_take_per_key),  cmocka_unit_test(test_count_over),
        cmocka_unit_test(test_global_bound),  cmocka_unit_test(test_bounded_table),
        cmocka_unit_test(test_keyed_hash),    cmocka_unit_test(test_addr_key),
        cmocka_unit_test(test_seal_quotas),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
