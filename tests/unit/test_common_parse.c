/*
 * kms_parse: the shared scalar grammars (durations, sizes, addresses,
 * CIDRs, integers, booleans) and their one-line reasons.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "kms_parse.h"

static void test_u64(void **state)
{
    uint64_t v = 0;
    char why[128];
    (void)state;
    assert_int_equal(kms_parse_u64("42", 0, 100, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 42);
    assert_int_equal(kms_parse_u64("007", 0, 100, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 7);
    assert_int_equal(kms_parse_u64("18446744073709551615", 0, UINT64_MAX, &v, why,
                                   sizeof(why)), 0);
    assert_int_equal(kms_parse_u64("18446744073709551616", 0, UINT64_MAX, &v, why,
                                   sizeof(why)), -1);
    assert_string_equal(why, "invalid number \"18446744073709551616\"");
    assert_int_equal(kms_parse_u64("4050x", 0, 65535, &v, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid number \"4050x\"");
    assert_int_equal(kms_parse_u64("-1", 0, 10, &v, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_u64("+1", 0, 10, &v, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_u64(" 1", 0, 10, &v, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_u64("", 0, 10, &v, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_u64("11", 0, 10, &v, why, sizeof(why)), -1);
    assert_string_equal(why, "11 out of range 0..10");
    assert_int_equal(kms_parse_u64("0", 1, 10, &v, NULL, 0), -1); /* why may be NULL */
}

static void test_bool(void **state)
{
    bool b = false;
    char why[128];
    (void)state;
    assert_int_equal(kms_parse_bool("true", &b, why, sizeof(why)), 0);
    assert_true(b);
    assert_int_equal(kms_parse_bool("false", &b, why, sizeof(why)), 0);
    assert_false(b);
    assert_int_equal(kms_parse_bool("yes", &b, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid boolean \"yes\" (true or false)");
    assert_int_equal(kms_parse_bool("True", &b, why, sizeof(why)), -1);
}

static void test_duration(void **state)
{
    static const struct {
        const char *s;
        uint64_t ms;
    } ok[] = {{"0ms", 0},   {"500ms", 500}, {"3s", 3000},        {"1m", 60000},
              {"2h", 7200000}, {"1.5s", 1500}, {"0.25m", 15000}, {"1.000s", 1000}};
    static const char *const bad[] = {"",    "5",   "1sec", "1 s", "s",  "1.s", ".5s",
                                      "1..5s", "0.5ms", "1.0005s", "1s1", "-1s", "1.5.5s",
                                      "99999999999999999999ms"};
    uint64_t v;
    char why[128];
    (void)state;
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        v = UINT64_MAX;
        if (kms_parse_duration_ms(ok[i].s, 0, UINT64_MAX, 0, &v, why, sizeof(why)) != 0 ||
            v != ok[i].ms) {
            fail_msg("\"%s\": got %llu (%s)", ok[i].s, (unsigned long long)v, why);
        }
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (kms_parse_duration_ms(bad[i], 0, UINT64_MAX, 0, &v, why, sizeof(why)) == 0) {
            fail_msg("\"%s\" accepted as %llu ms", bad[i], (unsigned long long)v);
        }
    }
    assert_int_equal(kms_parse_duration_ms("1sec", 0, 10, 0, &v, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid duration \"1sec\" (e.g. 500ms, 3s, 1m)");
    assert_int_equal(kms_parse_duration_ms("1h", 10, 10000, 0, &v, why, sizeof(why)), -1);
    assert_string_equal(why, "duration 1h out of range 10ms..10000ms");
    /* A bare number counts in the caller's unit, when it names one. */
    assert_int_equal(kms_parse_duration_ms("5", 0, UINT64_MAX, 1000, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 5000);
    assert_int_equal(kms_parse_duration_ms("2.5", 0, UINT64_MAX, 1000, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 2500);
}

static void test_size(void **state)
{
    uint64_t v;
    char why[128];
    (void)state;
    assert_int_equal(kms_parse_size("4096", 0, UINT64_MAX, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 4096);
    assert_int_equal(kms_parse_size("8B", 0, UINT64_MAX, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 8);
    assert_int_equal(kms_parse_size("4KiB", 0, UINT64_MAX, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 4096);
    assert_int_equal(kms_parse_size("64MiB", 0, UINT64_MAX, &v, why, sizeof(why)), 0);
    assert_int_equal(v, 64u << 20);
    assert_int_equal(kms_parse_size("2GiB", 0, UINT64_MAX, &v, why, sizeof(why)), 0);
    assert_int_equal(v, UINT64_C(2) << 30);
    assert_int_equal(kms_parse_size("4kb", 0, UINT64_MAX, &v, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid size \"4kb\" (e.g. 4096, 4KiB, 1MiB)");
    assert_int_equal(kms_parse_size("1.5KiB", 0, UINT64_MAX, &v, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_size("17179869184GiB", 0, UINT64_MAX, &v, why, sizeof(why)),
                     -1);
    assert_int_equal(kms_parse_size("1KiB", 2048, 4096, &v, why, sizeof(why)), -1);
    assert_string_equal(why, "size 1KiB out of range 2048..4096 bytes");
}

static void test_addr(void **state)
{
    struct kms_addr a;
    char why[160];
    (void)state;
    assert_int_equal(kms_parse_addr("10.0.0.1:4050", 0, &a, why, sizeof(why)), 0);
    assert_string_equal(a.host, "10.0.0.1");
    assert_int_equal(a.port, 4050);
    assert_int_equal(kms_parse_addr("kms-1.example.com:1", 0, &a, why, sizeof(why)), 0);
    assert_string_equal(a.host, "kms-1.example.com");
    assert_int_equal(a.port, 1);
    assert_int_equal(kms_parse_addr("[fd00::2]:65535", 0, &a, why, sizeof(why)), 0);
    assert_string_equal(a.host, "fd00::2");
    assert_int_equal(a.port, 65535);
    assert_int_equal(kms_parse_addr(":4052", 0, &a, why, sizeof(why)), 0);
    assert_string_equal(a.host, "");
    assert_int_equal(kms_parse_addr(":4052", 0, NULL, why, sizeof(why)), 0);

    assert_int_equal(kms_parse_addr(":4052", KMS_PARSE_ADDR_NEED_HOST, &a, why, sizeof(why)),
                     -1);
    assert_string_equal(why, "address \":4052\" needs a host");
    assert_int_equal(kms_parse_addr("host:4050x", 0, &a, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid port \"4050x\"");
    assert_int_equal(kms_parse_addr("host:0", 0, &a, why, sizeof(why)), -1);
    /* a listener may ask for any free port (rpc_h2.c) */
    assert_int_equal(kms_parse_addr("127.0.0.1:0", KMS_PARSE_ADDR_PORT0, &a, why, sizeof(why)), 0);
    assert_int_equal(a.port, 0);
    assert_int_equal(kms_parse_addr("host:65536", KMS_PARSE_ADDR_PORT0, &a, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_addr("host:65536", 0, &a, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_addr("host:000080", 0, &a, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_addr("host:", 0, &a, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_addr("host", 0, &a, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid address \"host\" (host:port, :port or [v6]:port)");
    assert_int_equal(kms_parse_addr("fd00::2:4050", 0, &a, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_addr("[fd00::zz]:4050", 0, &a, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid IPv6 address \"fd00::zz\"");
    assert_int_equal(kms_parse_addr("[fd00::2]4050", 0, &a, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_addr("ho st:4050", 0, &a, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid host in \"ho st:4050\"");
}

static void test_cidr(void **state)
{
    uint8_t a[16];
    unsigned prefix = 0;
    char why[128];
    (void)state;
    assert_int_equal(kms_parse_cidr("10.0.0.0/8", a, &prefix, why, sizeof(why)), 0);
    assert_int_equal(prefix, 104);
    assert_int_equal(a[10], 0xff);
    assert_int_equal(a[11], 0xff);
    assert_int_equal(a[12], 10);
    assert_int_equal(kms_parse_cidr("fd00::/8", a, &prefix, why, sizeof(why)), 0);
    assert_int_equal(prefix, 8);
    assert_int_equal(a[0], 0xfd);
    assert_int_equal(kms_parse_cidr("0.0.0.0/0", a, &prefix, why, sizeof(why)), 0);
    assert_int_equal(prefix, 96);
    assert_int_equal(kms_parse_cidr("10.0.0.1/32", a, &prefix, why, sizeof(why)), 0);
    assert_int_equal(prefix, 128);

    assert_int_equal(kms_parse_cidr("10.0.0.1/8", a, &prefix, why, sizeof(why)), -1);
    assert_string_equal(why, "CIDR \"10.0.0.1/8\" has host bits set");
    assert_int_equal(kms_parse_cidr("10.0.0.0/33", a, &prefix, why, sizeof(why)), -1);
    assert_string_equal(why, "invalid CIDR \"10.0.0.0/33\"");
    assert_int_equal(kms_parse_cidr("10.0.0.0", a, &prefix, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_cidr("10.0.0.0/", a, &prefix, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_cidr("10.0.0.0/0008", a, &prefix, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_cidr("fd00::/129", a, &prefix, why, sizeof(why)), -1);
    assert_int_equal(kms_parse_cidr("host/8", a, &prefix, why, sizeof(why)), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_u64),      cmocka_unit_test(test_bool),
        cmocka_unit_test(test_duration), cmocka_unit_test(test_size),
        cmocka_unit_test(test_addr),     cmocka_unit_test(test_cidr),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
