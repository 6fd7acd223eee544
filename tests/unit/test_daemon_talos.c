/*
 * The Talos API's enrolment policy (src/server/daemon/talos_api.c, linked
 * from kms_daemon): CIDR matching (kmsd_cidr_match) over CIDRs parsed by
 * the configuration's parser (kms_parse_cidr), so parse and match are
 * tested together, and the allow lists as talos_request_open applies them
 * (CIDRs, node UUIDs, both) with the refusals it counts.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_err.h"
#include "kms_parse.h"
#include "kmsd.h"
#include "talos_internal.h"

/* ---- helpers --------------------------------------------------------- */

static struct kms_config_cidr cidr(const char *s)
{
    struct kms_config_cidr c;
    char why[128];
    memset(&c, 0, sizeof(c));
    if (kms_parse_cidr(s, c.addr, &c.prefix, why, sizeof(why)) != 0) {
        fail_msg("parse %s: %s", s, why);
    }
    c.text = (char *)s;
    return c;
}

/* An address as talos_peer_addr normalises it: IPv4 v4-mapped. */
static void ip_of(const char *s, uint8_t ip[16])
{
    memset(ip, 0, 16);
    if (strchr(s, ':') == NULL) {
        ip[10] = ip[11] = 0xff;
        assert_int_equal(inet_pton(AF_INET, s, ip + 12), 1);
    } else {
        assert_int_equal(inet_pton(AF_INET6, s, ip), 1);
    }
}

static bool match(const char *c, const char *ip)
{
    struct kms_config_cidr cc = cidr(c);
    uint8_t a[16];
    ip_of(ip, a);
    return kmsd_cidr_match(&cc, a);
}

static bool bit_of(const uint8_t a[16], unsigned bit)
{
    return (a[bit / 8] & (0x80u >> (bit % 8))) != 0;
}

static void flip(uint8_t a[16], unsigned bit)
{
    a[bit / 8] ^= (uint8_t)(0x80u >> (bit % 8));
}

/* ---- CIDR matching ---------------------------------------------------- */

static void test_cidr_ipv4(void **state)
{
    (void)state;
    /* /8 */
    assert_true(match("10.0.0.0/8", "10.0.0.0"));
    assert_true(match("10.0.0.0/8", "10.1.2.3"));
    assert_true(match("10.0.0.0/8", "10.255.255.255"));
    assert_false(match("10.0.0.0/8", "11.0.0.0"));
    assert_false(match("10.0.0.0/8", "9.255.255.255"));
    /* not byte aligned: /9, /12 */
    assert_true(match("10.128.0.0/9", "10.128.0.1"));
    assert_true(match("10.128.0.0/9", "10.255.255.255"));
    assert_false(match("10.128.0.0/9", "10.127.255.255"));
    assert_true(match("172.16.0.0/12", "172.31.255.255"));
    assert_false(match("172.16.0.0/12", "172.32.0.0"));
    assert_false(match("172.16.0.0/12", "172.15.255.255"));
    /* /24 */
    assert_true(match("192.168.1.0/24", "192.168.1.200"));
    assert_false(match("192.168.1.0/24", "192.168.2.1"));
    /* /31: two addresses; the last bit is free, the one before is not */
    assert_true(match("192.168.1.4/31", "192.168.1.4"));
    assert_true(match("192.168.1.4/31", "192.168.1.5"));
    assert_false(match("192.168.1.4/31", "192.168.1.6"));
    assert_false(match("192.168.1.4/31", "192.168.1.3"));
    /* /32: one address, its last bit counts */
    assert_true(match("192.168.1.7/32", "192.168.1.7"));
    assert_false(match("192.168.1.7/32", "192.168.1.6"));
    assert_false(match("192.168.1.7/32", "192.168.1.5"));
    assert_false(match("192.168.1.7/32", "193.168.1.7"));
    /* IPv4 /0 is every IPv4 address (prefix 96 over the v4-mapped form),
     * and no IPv6 one */
    assert_int_equal(cidr("0.0.0.0/0").prefix, 96);
    assert_true(match("0.0.0.0/0", "0.0.0.0"));
    assert_true(match("0.0.0.0/0", "255.255.255.255"));
    assert_true(match("0.0.0.0/0", "10.1.2.3"));
    assert_false(match("0.0.0.0/0", "2001:db8::1"));
    assert_false(match("0.0.0.0/0", "::1"));
    /* an IPv4 CIDR does not match the IPv6 addresses with its low bits
     * (IPv4-compatible ::a.b.c.d, or a NAT64-like prefix) */
    assert_false(match("10.0.0.0/8", "::10.1.2.3"));
    assert_false(match("10.0.0.0/8", "64:ff9b::10.1.2.3"));
    assert_false(match("10.0.0.0/8", "::fffe:10.1.2.3"));
}

static void test_cidr_v4_mapped(void **state)
{
    (void)state;
    /* a caller on a dual-stack socket arrives as ::ffff:a.b.c.d, which is
     * how IPv4 callers are compared anyway */
    assert_true(match("10.0.0.0/8", "::ffff:10.1.2.3"));
    assert_false(match("10.0.0.0/8", "::ffff:11.1.2.3"));
    /* a v4-mapped CIDR written in IPv6 form is the same as the IPv4 one */
    struct kms_config_cidr a = cidr("::ffff:10.0.0.0/104"), b = cidr("10.0.0.0/8");
    assert_memory_equal(a.addr, b.addr, 16);
    assert_int_equal(a.prefix, b.prefix);
    assert_true(match("::ffff:10.0.0.0/104", "10.200.0.1"));
    assert_false(match("::ffff:10.0.0.0/104", "12.0.0.1"));
    assert_true(match("::ffff:0.0.0.0/96", "1.2.3.4"));
    assert_false(match("::ffff:0.0.0.0/96", "2001:db8::1"));
    assert_true(match("::ffff:192.168.1.7/128", "192.168.1.7"));
    assert_false(match("::ffff:192.168.1.7/128", "192.168.1.6"));
}

static void test_cidr_ipv6(void **state)
{
    (void)state;
    /* /0 over IPv6 matches everything, IPv4 callers included */
    assert_int_equal(cidr("::/0").prefix, 0);
    assert_true(match("::/0", "::"));
    assert_true(match("::/0", "2001:db8::1"));
    assert_true(match("::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert_true(match("::/0", "10.1.2.3"));
    /* /8 */
    assert_true(match("fd00::/8", "fdff:ffff::1"));
    assert_false(match("fd00::/8", "fc00::1"));
    assert_false(match("fd00::/8", "fe00::"));
    /* /32 */
    assert_true(match("2001:db8::/32", "2001:db8:ffff::1"));
    assert_false(match("2001:db8::/32", "2001:db9::"));
    /* /64 */
    assert_true(match("2001:db8:1:2::/64", "2001:db8:1:2::"));
    assert_true(match("2001:db8:1:2::/64", "2001:db8:1:2:ffff:ffff:ffff:ffff"));
    assert_false(match("2001:db8:1:2::/64", "2001:db8:1:3::"));
    assert_false(match("2001:db8:1:2::/64", "2001:db8:1:1:ffff:ffff:ffff:ffff"));
    /* /127: the last bit is free, the one before is not */
    assert_true(match("2001:db8::4/127", "2001:db8::4"));
    assert_true(match("2001:db8::4/127", "2001:db8::5"));
    assert_false(match("2001:db8::4/127", "2001:db8::6"));
    assert_false(match("2001:db8::4/127", "2001:db8::3"));
    /* /128: one address */
    assert_true(match("2001:db8::7/128", "2001:db8::7"));
    assert_false(match("2001:db8::7/128", "2001:db8::6"));
    assert_false(match("2001:db8::7/128", "2001:db8::5"));
    assert_false(match("2001:db8::7/128", "2001:db9::7"));
    /* an IPv6 CIDR over ::ffff:0:0/96 does not match IPv6 callers */
    assert_false(match("2001:db8::/32", "32.1.13.184")); /* 0x20010db8 */
}

/* Every prefix 0..128 against one address with mixed bits: the network
 * (host bits cleared), written out and parsed back, matches the address;
 * flipping one bit inside the prefix breaks the match, outside keeps it. */
static void test_cidr_every_prefix_and_bit(void **state)
{
    static const char *bases[] = {"2001:db8:a5c3:ff00:1234:5678:9abc:def1",
                                  "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"};
    (void)state;
    for (size_t bi = 0; bi < sizeof(bases) / sizeof(bases[0]); bi++) {
        uint8_t base[16];
        ip_of(bases[bi], base);
        for (unsigned p = 0; p <= 128; p++) {
            uint8_t net[16], probe[16];
            char text[INET6_ADDRSTRLEN + 8], host[INET6_ADDRSTRLEN];
            struct kms_config_cidr c;
            memcpy(net, base, 16);
            for (unsigned b = p; b < 128; b++) {
                if (bit_of(net, b)) {
                    flip(net, b);
                }
            }
            assert_non_null(inet_ntop(AF_INET6, net, host, sizeof(host)));
            snprintf(text, sizeof(text), "%s/%u", host, p);
            c = cidr(text);
            assert_int_equal(c.prefix, p);
            assert_memory_equal(c.addr, net, 16);
            assert_true(kmsd_cidr_match(&c, base));
            assert_true(kmsd_cidr_match(&c, net));
            for (unsigned b = 0; b < 128; b++) {
                memcpy(probe, base, 16);
                flip(probe, b);
                if (kmsd_cidr_match(&c, probe) != (b >= p)) {
                    fail_msg("%s: bit %u flipped: match %d", text, b, b >= p ? 0 : 1);
                }
            }
        }
    }
}

/* What the parser refuses never reaches matching. */
static void test_cidr_parse_refusals(void **state)
{
    static const char *bad[] = {
        "10.0.0.1/8",     /* host bits set */
        "192.168.1.5/31", /* host bit set */
        "2001:db8::1/64", /* host bits set */
        "10.0.0.0/33",    "::/129",       "10.0.0.0",  "10.0.0.0/",   "/8",
        "10.0.0.0/-1",    "10.0.0.0/08x", "10.0.0/8",  "2001:db8::/0128",
        "fe80::%eth0/64", "10.0.0.0/8 ",  "",
    };
    uint8_t addr[16];
    unsigned prefix;
    char why[128];
    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        why[0] = '\0';
        if (kms_parse_cidr(bad[i], addr, &prefix, why, sizeof(why)) != -1) {
            fail_msg("\"%s\" accepted", bad[i]);
        }
        assert_non_null(strstr(why, "CIDR"));
    }
}

/* ---- the enrolment policy, as Seal and Unseal apply it ----------------- */

#define UUID_A "0b9d3e58-2bd4-4e4c-9a1d-7d7a3c5c1e01"
#define UUID_B "6c1f0a8e-5a3e-4f41-8f4e-2d43b6a9f702"

struct req {
    uint8_t *buf;
    size_t len;
};

static struct req pack(const char *uuid)
{
    Sidero__Kms__Request r = SIDERO__KMS__REQUEST__INIT;
    static uint8_t data[32];
    struct req q;
    r.node_uuid = (char *)uuid;
    r.data.data = data;
    r.data.len = sizeof(data);
    q.len = sidero__kms__request__get_packed_size(&r);
    q.buf = malloc(q.len + 1);
    assert_non_null(q.buf);
    assert_int_equal(sidero__kms__request__pack(&r, q.buf), q.len);
    return q;
}

/* talos_request_open for a caller at ip with node uuid, as method m; the
 * unpacked request is checked and freed. */
static int open_as(struct kmsd *d, int m, const char *ip, const char *uuid, const char **msg)
{
    Sidero__Kms__Request *out = NULL;
    struct req q = pack(uuid);
    uint8_t a[16];
    int rc;
    ip_of(ip, a);
    *msg = NULL;
    rc = talos_request_open(d, m, a, q.buf, q.len, &out, msg);
    assert_non_null(out);
    assert_string_equal(out->node_uuid, uuid);
    assert_true(rc == 0 ? *msg == NULL : *msg != NULL);
    sidero__kms__request__free_unpacked(out, NULL);
    free(q.buf);
    return rc;
}

static void test_policy_open(void **state)
{
    struct kmsd *d = calloc(1, sizeof(*d));
    const char *msg;
    (void)state;
    assert_non_null(d);
    /* no lists: every caller */
    assert_int_equal(open_as(d, 0, "203.0.113.9", UUID_A, &msg), 0);
    assert_int_equal(open_as(d, 1, "2001:db8::9", UUID_B, &msg), 0);
    assert_int_equal(d->metrics.policy_denied[0] + d->metrics.policy_denied[1], 0);
    free(d);
}

static void test_policy_cidrs(void **state)
{
    struct kmsd *d = calloc(1, sizeof(*d));
    struct kms_config_cidr list[3];
    const char *msg;
    (void)state;
    assert_non_null(d);
    list[0] = cidr("10.0.0.0/8");
    list[1] = cidr("2001:db8:1::/48");
    list[2] = cidr("192.168.7.7/32");
    d->opt.cidrs = list;
    d->opt.n_cidrs = 3;
    /* any one of the list admits */
    assert_int_equal(open_as(d, 0, "10.9.8.7", UUID_A, &msg), 0);
    assert_int_equal(open_as(d, 0, "2001:db8:1:ffff::1", UUID_A, &msg), 0);
    assert_int_equal(open_as(d, 1, "192.168.7.7", UUID_A, &msg), 0);
    assert_int_equal(open_as(d, 1, "::ffff:10.0.0.1", UUID_A, &msg), 0);
    assert_int_equal(d->metrics.policy_denied[0] + d->metrics.policy_denied[1], 0);
    /* none admits: refused and counted per method */
    assert_int_equal(open_as(d, 0, "192.168.7.6", UUID_A, &msg), KMS_EDENIED);
    assert_string_equal(msg, "enrolment policy refuses this node");
    assert_int_equal(d->metrics.policy_denied[0], 1);
    assert_int_equal(open_as(d, 1, "2001:db8:2::1", UUID_A, &msg), KMS_EDENIED);
    assert_int_equal(open_as(d, 1, "11.0.0.1", UUID_A, &msg), KMS_EDENIED);
    assert_int_equal(d->metrics.policy_denied[0], 1);
    assert_int_equal(d->metrics.policy_denied[1], 2);
    /* an unknown caller address (all zero) is not in these lists */
    assert_int_equal(open_as(d, 0, "::", UUID_A, &msg), KMS_EDENIED);
    /* only the first n_cidrs entries count */
    d->opt.n_cidrs = 1;
    assert_int_equal(open_as(d, 0, "192.168.7.7", UUID_A, &msg), KMS_EDENIED);
    free(d);
}

static void test_policy_uuids_and_both(void **state)
{
    struct kmsd *d = calloc(1, sizeof(*d));
    struct kms_config_cidr list[1];
    char *uuids[2] = {(char *)UUID_A, (char *)"7D3A6B1E-0000-4000-8000-00000000000A"};
    const char *msg;
    (void)state;
    assert_non_null(d);
    d->opt.uuids = uuids;
    d->opt.n_uuids = 2;
    assert_int_equal(open_as(d, 0, "198.51.100.1", UUID_A, &msg), 0);
    /* compared without regard to case */
    assert_int_equal(open_as(d, 0, "198.51.100.1", "7d3a6b1e-0000-4000-8000-00000000000a", &msg),
                     0);
    assert_int_equal(open_as(d, 0, "198.51.100.1", UUID_B, &msg), KMS_EDENIED);
    assert_int_equal(d->metrics.policy_denied[0], 1);
    /* a prefix of an allowed UUID is not it */
    assert_int_equal(open_as(d, 1, "198.51.100.1", "0b9d3e58", &msg), KMS_EDENIED);

    /* both lists: both must admit */
    list[0] = cidr("198.51.100.0/24");
    d->opt.cidrs = list;
    d->opt.n_cidrs = 1;
    assert_int_equal(open_as(d, 0, "198.51.100.77", UUID_A, &msg), 0);
    assert_int_equal(open_as(d, 0, "198.51.101.77", UUID_A, &msg), KMS_EDENIED);
    assert_int_equal(open_as(d, 0, "198.51.100.77", UUID_B, &msg), KMS_EDENIED);
    assert_int_equal(d->metrics.policy_denied[0], 3);
    assert_int_equal(d->metrics.policy_denied[1], 1);
    free(d);
}

static void test_request_malformed(void **state)
{
    struct kmsd *d = calloc(1, sizeof(*d));
    Sidero__Kms__Request *out = NULL;
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff};
    const char *msg = NULL;
    struct req q;
    uint8_t a[16];
    (void)state;
    assert_non_null(d);
    ip_of("10.0.0.1", a);
    assert_int_equal(talos_request_open(d, 0, a, junk, sizeof(junk), &out, &msg), KMS_EINVAL);
    assert_null(out);
    assert_string_equal(msg, "malformed request");
    /* an empty node UUID is refused before the policy */
    q = pack("");
    assert_int_equal(talos_request_open(d, 0, a, q.buf, q.len, &out, &msg), KMS_EINVAL);
    assert_non_null(out);
    assert_string_not_equal(msg, "enrolment policy refuses this node");
    sidero__kms__request__free_unpacked(out, NULL);
    free(q.buf);
    assert_int_equal(d->metrics.policy_denied[0], 0);
    free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cidr_ipv4),
        cmocka_unit_test(test_cidr_v4_mapped),
        cmocka_unit_test(test_cidr_ipv6),
        cmocka_unit_test(test_cidr_every_prefix_and_bit),
        cmocka_unit_test(test_cidr_parse_refusals),
        cmocka_unit_test(test_policy_open),
        cmocka_unit_test(test_policy_cidrs),
        cmocka_unit_test(test_policy_uuids_and_both),
        cmocka_unit_test(test_request_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
