/*
 * raft 0.22.1 frame parser (src/raft/frame.h): valid frames of every type in
 * one chunk, byte by byte and split at every position; every malformed case.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "frame_build.h"
#include "kms_err.h"

/* What a walk over a stream saw. */
struct walk {
    unsigned headers, stamps, ends;
    uint8_t types[64];
    uint64_t terms[64];
    uint64_t payloads[64];
    uint64_t n_entries[64];
    struct kms_frame_stamp stamp;
    size_t payload_bytes; /* bytes consumed while in a payload */
    int rc;
    const char *error;
};

static void walk_event(struct walk *w, const struct kms_frame_parser *p, enum kms_frame_event ev)
{
    unsigned k = w->headers + w->stamps;
    if (ev == KMS_FRAME_EV_HEADER || ev == KMS_FRAME_EV_STAMP) {
        assert_true(k < 64);
        w->types[k] = p->info.type;
        w->terms[k] = p->info.term;
        w->payloads[k] = p->info.payload_len;
        w->n_entries[k] = p->info.n_entries;
        if (ev == KMS_FRAME_EV_STAMP) {
            w->stamp = p->info.stamp;
            w->stamps++;
        } else {
            w->headers++;
        }
    } else if (ev == KMS_FRAME_EV_END) {
        w->ends++;
    }
}

/* Feeds data in chunks of `chunk` bytes (0 = all at once), or split once at
 * `split` if split > 0 and chunk == 0. */
static struct walk walk_stream(const uint8_t *data, size_t len, size_t chunk, size_t split,
                               bool allow_stamp)
{
    struct kms_frame_parser p;
    struct walk w;
    size_t off = 0;

    memset(&w, 0, sizeof w);
    kms_frame_parser_init(&p, allow_stamp);
    while (off < len) {
        size_t end = len;
        if (chunk > 0 && off + chunk < len) {
            end = off + chunk;
        } else if (chunk == 0 && split > 0 && off < split) {
            end = split;
        }
        while (off < end) {
            size_t used = 0;
            enum kms_frame_event ev;
            bool payload = kms_frame_parser_in_payload(&p);
            w.rc = kms_frame_parser_feed(&p, data + off, end - off, &used, &ev);
            if (w.rc != 0) {
                w.error = kms_frame_parser_error(&p);
                assert_non_null(w.error);
                assert_true(used <= end - off);
                return w;
            }
            assert_true(used > 0);
            if (payload) {
                w.payload_bytes += used;
            }
            off += used;
            walk_event(&w, &p, ev);
        }
    }
    assert_true(kms_frame_parser_at_start(&p));
    return w;
}

/* A stream with one frame of every type (and a stamp). */
static size_t build_all(uint8_t *buf, bool with_stamp)
{
    uint32_t lens[3] = {8, 0, 24};
    struct kms_frame_stamp st = {11, 22, 33, 1, 55, 66};
    size_t n = 0;

    if (with_stamp) {
        kms_frame_stamp_encode(&st, buf + n);
        n += KMS_FRAME_STAMP_SIZE;
    }
    n += fb_request_vote(buf + n, 3);
    n += fb_request_vote_result(buf + n, 4);
    n += fb_append_entries(buf + n, 5, 3, lens);
    memset(buf + n, 0xAB, 32);
    n += 32;
    n += fb_append_entries(buf + n, 6, 0, NULL); /* heartbeat */
    n += fb_append_entries_result(buf + n, 7);
    n += fb_install_snapshot(buf + n, 8, 40);
    memset(buf + n, 0xCD, 40);
    n += 40;
    n += fb_timeout_now(buf + n, 9);
    if (with_stamp) {
        kms_frame_stamp_encode(&st, buf + n);
        n += KMS_FRAME_STAMP_SIZE;
    }
    return n;
}

static void check_all(const struct walk *w, bool with_stamp)
{
    static const uint8_t types[7] = {3, 4, 1, 1, 2, 5, 6};
    static const uint64_t payloads[7] = {0, 0, 32, 0, 0, 40, 0};
    unsigned o = with_stamp ? 1 : 0;

    assert_int_equal(w->rc, 0);
    assert_int_equal(w->headers, 7);
    assert_int_equal(w->stamps, with_stamp ? 2 : 0);
    assert_int_equal(w->ends, 2); /* the two frames with a payload */
    assert_int_equal(w->payload_bytes, 72);
    for (unsigned i = 0; i < 7; i++) {
        assert_int_equal(w->types[i + o], types[i]);
        assert_int_equal(w->terms[i + o], 3 + i);
        assert_int_equal(w->payloads[i + o], payloads[i]);
    }
    assert_int_equal(w->n_entries[2 + o], 3);
    if (with_stamp) {
        assert_int_equal(w->types[0], KMS_FRAME_STAMP);
        assert_int_equal(w->stamp.sent_us, 11);
        assert_int_equal(w->stamp.echo_us, 22);
        assert_int_equal(w->stamp.term, 33);
        assert_int_equal(w->stamp.flags, 1);
        assert_int_equal(w->stamp.lease_rem_us, 55);
        assert_int_equal(w->stamp.commit, 66);
    }
}

static void test_valid_frames(void **state)
{
    uint8_t buf[2048];
    struct walk w;
    size_t n;
    (void)state;

    for (int s = 0; s < 2; s++) {
        n = build_all(buf, s == 1);
        w = walk_stream(buf, n, 0, 0, s == 1);
        check_all(&w, s == 1);
        w = walk_stream(buf, n, 1, 0, s == 1);
        check_all(&w, s == 1);
        w = walk_stream(buf, n, 7, 0, s == 1);
        check_all(&w, s == 1);
        for (size_t split = 1; split < n; split++) {
            w = walk_stream(buf, n, 0, split, s == 1);
            check_all(&w, s == 1);
        }
    }
}

/* The maximum sizes are accepted. */
static void test_limits(void **state)
{
    size_t max_n = (KMS_FRAME_HEADER_MAX - 48) / 16;
    uint32_t *lens = calloc(max_n, sizeof *lens);
    uint8_t *buf = malloc(16 + KMS_FRAME_HEADER_MAX);
    struct kms_frame_parser p;
    enum kms_frame_event ev;
    size_t used, n;
    (void)state;

    assert_non_null(lens);
    assert_non_null(buf);
    for (size_t i = 0; i < max_n; i++) {
        lens[i] = (i % 64 == 0) ? 64 : 0;
    }
    n = fb_append_entries(buf, 9, (unsigned)max_n, lens);
    kms_frame_parser_init(&p, false);
    assert_int_equal(kms_frame_parser_feed(&p, buf, n, &used, &ev), 0);
    assert_int_equal(used, n);
    assert_int_equal(ev, KMS_FRAME_EV_HEADER);
    assert_int_equal(p.info.n_entries, max_n);
    assert_int_equal(p.info.payload_len, ((max_n + 63) / 64) * 64);

    /* InstallSnapshot of exactly 1 GiB of data. */
    n = fb_install_snapshot(buf, 2, KMS_FRAME_IS_PAYLOAD_MAX);
    kms_frame_parser_init(&p, false);
    assert_int_equal(kms_frame_parser_feed(&p, buf, n, &used, &ev), 0);
    assert_int_equal(ev, KMS_FRAME_EV_HEADER);
    assert_true(kms_frame_parser_in_payload(&p));
    free(lens);
    free(buf);
}

/* Feeds a whole buffer; returns the parser's error (NULL = accepted). */
static const char *parse_one(const uint8_t *buf, size_t n, bool allow_stamp)
{
    struct walk w = walk_stream(buf, n, 0, 0, allow_stamp);
    struct walk w1 = walk_stream(buf, n, 1, 0, allow_stamp);
    assert_int_equal(w.rc, w1.rc);
    if (w.rc == 0) {
        return NULL;
    }
    assert_int_equal(w.rc, KMS_EFORMAT);
    assert_string_equal(w.error, w1.error);
    return w.error;
}

#define REFUSED(buf, n, allow) assert_non_null(parse_one((buf), (n), (allow)))

static void test_malformed_preamble(void **state)
{
    uint8_t b[256];
    size_t n;
    struct kms_frame_stamp st = {1, 2, 3, 4, 5, 6};
    (void)state;

    for (unsigned t = 0; t < 256; t++) {
        if ((t >= 1 && t <= 6)) {
            continue;
        }
        n = fb_fixed(b, (uint8_t)t, 0, 24, 1);
        REFUSED(b, n, false); /* unknown type (0xC8 without stamps) */
    }
    n = fb_request_vote(b, 1);
    b[1] = 1;
    REFUSED(b, n, false); /* reserved byte 1 */
    n = fb_request_vote(b, 1);
    b[3] = 1;
    REFUSED(b, n, false);
    n = fb_request_vote(b, 1);
    b[6] = 1;
    REFUSED(b, n, false);
    /* Versions above what 0.22.1 sends. */
    n = fb_fixed(b, 3, 3, 40, 1);
    REFUSED(b, n, false);
    n = fb_fixed(b, 4, 3, 24, 1);
    REFUSED(b, n, false);
    n = fb_fixed(b, 2, 3, 32, 1);
    REFUSED(b, n, false);
    n = fb_fixed(b, 6, 1, 24, 1);
    REFUSED(b, n, false);
    n = fb_append_entries(b, 1, 0, NULL);
    b[2] = 1;
    REFUSED(b, n, false);
    n = fb_install_snapshot(b, 1, 8);
    b[2] = 1;
    REFUSED(b, n, false);
    /* Lower versions at the 0.22.1 sizes are fine. */
    n = fb_fixed(b, 3, 0, 40, 1);
    assert_null(parse_one(b, n, false));
    n = fb_fixed(b, 4, 1, 24, 1);
    assert_null(parse_one(b, n, false));
    /* Fixed-size messages with the wrong header length, including 0. */
    const struct { uint8_t type, version; uint64_t len; } wrong[] = {
        {3, 2, 32}, {3, 2, 48}, {3, 2, 0}, {4, 2, 16}, {4, 2, 32}, {2, 2, 24},
        {2, 2, 40}, {6, 0, 16}, {6, 0, 32}, {2, 2, UINT64_MAX},
    };
    for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; i++) {
        fb_preamble(b, wrong[i].type, wrong[i].version, wrong[i].len);
        memset(b + 16, 0, 64);
        REFUSED(b, 16 + 64, false);
    }
    /* Stamps: fine when allowed, wrong version or length refused. */
    kms_frame_stamp_encode(&st, b);
    assert_null(parse_one(b, KMS_FRAME_STAMP_SIZE, true));
    REFUSED(b, KMS_FRAME_STAMP_SIZE, false);
    b[2] = 2;
    REFUSED(b, KMS_FRAME_STAMP_SIZE, true);
    kms_frame_stamp_encode(&st, b);
    fb_put64(b + 8, 40);
    REFUSED(b, KMS_FRAME_STAMP_SIZE, true);
    kms_frame_stamp_encode(&st, b);
    fb_put64(b + 8, 56);
    REFUSED(b, KMS_FRAME_STAMP_SIZE + 8, true);
}

static void test_malformed_append_entries(void **state)
{
    uint8_t *b = calloc(1, 8192);
    uint32_t lens[4] = {8, 16, 24, 32};
    struct kms_frame_parser p;
    enum kms_frame_event ev;
    size_t n, used;
    (void)state;

    assert_non_null(b);
    /* The crash case: 1,000,000 entries claimed in a 48-byte header. */
    n = fb_append_entries(b, 1, 0, NULL);
    fb_put64(b + 16 + 32, 1000000);
    REFUSED(b, n, false);
    /* Count one more or one less than the header holds. */
    n = fb_append_entries(b, 1, 2, lens);
    fb_put64(b + 16 + 32, 3);
    REFUSED(b, n, false);
    n = fb_append_entries(b, 1, 2, lens);
    fb_put64(b + 16 + 32, 1);
    REFUSED(b, n, false);
    /* Header lengths that are not 48 + 16n, or too large. */
    const uint64_t bad_len[] = {0, 8, 40, 47, 49, 56, 72, 1u << 21, UINT64_MAX - 7,
                                KMS_FRAME_HEADER_MAX + 16};
    for (size_t i = 0; i < sizeof bad_len / sizeof bad_len[0]; i++) {
        n = fb_append_entries(b, 1, 0, NULL);
        fb_put64(b + 8, bad_len[i]);
        REFUSED(b, 4096, false);
    }
    /* Entry types outside COMMAND/BARRIER/CHANGE. */
    for (unsigned t = 0; t < 256; t++) {
        if (t >= 1 && t <= 3) {
            continue;
        }
        n = fb_append_entries(b, 1, 4, lens);
        b[16 + 40 + 16 * 2 + 8] = (uint8_t)t;
        REFUSED(b, n + 80, false);
    }
    n = fb_append_entries(b, 1, 4, lens);
    b[16 + 40 + 16 * 3 + 8] = 3; /* RAFT_CHANGE is fine */
    b[16 + 40 + 8] = 2;          /* RAFT_BARRIER too */
    memset(b + n, 0, 80);
    assert_null(parse_one(b, n + 80, false));
    /* Unpadded entry length. */
    lens[1] = 17;
    n = fb_append_entries(b, 1, 4, lens);
    REFUSED(b, n + 81, false);
    lens[1] = 16;
    /* Payload cap: exactly KMS_FRAME_AE_PAYLOAD_MAX passes, 8 bytes more
     * does not (headers only are enough: the cap is checked as the batch
     * header is read). */
    {
        uint32_t big[64];
        unsigned k = 0;
        uint64_t left = KMS_FRAME_AE_PAYLOAD_MAX;
        while (left > 0) {
            big[k] = left > (16u << 20) ? (16u << 20) : (uint32_t)left;
            left -= big[k];
            k++;
        }
        big[k] = 8;
        n = fb_append_entries(b, 1, k, big);
        kms_frame_parser_init(&p, false);
        assert_int_equal(kms_frame_parser_feed(&p, b, n, &used, &ev), 0);
        assert_int_equal(ev, KMS_FRAME_EV_HEADER);
        assert_int_equal(p.info.payload_len, KMS_FRAME_AE_PAYLOAD_MAX);
        n = fb_append_entries(b, 1, k + 1, big);
        REFUSED(b, n, false);
    }
    /* Failures stick. */
    n = fb_append_entries(b, 1, 0, NULL);
    fb_put64(b + 16 + 32, 5);
    kms_frame_parser_init(&p, false);
    assert_int_equal(kms_frame_parser_feed(&p, b, n, &used, &ev), KMS_EFORMAT);
    assert_int_equal(used, 16 + 40);
    assert_int_equal(kms_frame_parser_feed(&p, b, n, &used, &ev), KMS_EFORMAT);
    assert_int_equal(used, 0);
    assert_false(kms_frame_parser_at_start(&p));
    free(b);
}

/* Builds an InstallSnapshot with a custom configuration blob. */
static size_t build_is_conf(uint8_t *b, const uint8_t *conf, size_t conf_len,
                            uint64_t conf_len_field, uint64_t data_len)
{
    size_t off = fb_preamble(b, 5, 0, 56 + conf_len);
    fb_put64(b + off, 1);
    fb_put64(b + off + 8, 2);
    fb_put64(b + off + 16, 1);
    fb_put64(b + off + 24, 1);
    fb_put64(b + off + 32, conf_len_field);
    off += 40;
    memcpy(b + off, conf, conf_len);
    off += conf_len;
    fb_put64(b + off, data_len);
    fb_put64(b + off + 8, 0);
    return off + 16;
}

static size_t conf_server(uint8_t *c, uint64_t id, const char *addr, uint8_t role)
{
    size_t l = strlen(addr) + 1;
    fb_put64(c, id);
    memcpy(c + 8, addr, l);
    c[8 + l] = role;
    return 8 + l + 1;
}

static void test_malformed_install_snapshot(void **state)
{
    uint8_t b[1024];
    uint8_t conf[256];
    size_t n, cl;
    (void)state;

    /* Baseline: two servers, padded. */
#define CONF2(fmt, count, id2, role2)                                         \
    do {                                                                       \
        memset(conf, 0, sizeof conf);                                          \
        conf[0] = (fmt);                                                       \
        fb_put64(conf + 1, (count));                                           \
        cl = 9;                                                                \
        cl += conf_server(conf + cl, 1, "10.0.0.1:7000", 1);                   \
        cl += conf_server(conf + cl, (id2), "10.0.0.2:7000", (role2));         \
        cl = (cl + 7) & ~(size_t)7;                                            \
    } while (0)
    CONF2(1, 2, 2, 2);
    n = build_is_conf(b, conf, cl, cl, 16);
    assert_null(parse_one(b, n + 16, false));
    /* Configuration length field not matching the header length. */
    n = build_is_conf(b, conf, cl, cl + 8, 16);
    REFUSED(b, n + 16, false);
    n = build_is_conf(b, conf, cl, cl - 8, 16);
    REFUSED(b, n + 16, false);
    /* Empty or too short configuration (raft asserts on an empty one). */
    n = build_is_conf(b, conf, 0, 0, 16);
    REFUSED(b, n + 16, false);
    n = build_is_conf(b, conf, 8, 8, 16);
    REFUSED(b, n + 16, false);
    /* Bad format byte, zero or too many servers. */
    CONF2(2, 2, 2, 1);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    CONF2(1, 0, 2, 1);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    CONF2(1, 3, 2, 1);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    CONF2(1, 1000000, 2, 1);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    /* One server fewer than the bytes hold: more than 7 bytes left over. */
    CONF2(1, 1, 2, 1);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    /* Server id 0, role 3. */
    CONF2(1, 2, 0, 1);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    CONF2(1, 2, 2, 3);
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    /* Non-zero padding. */
    CONF2(1, 2, 2, 1);
    conf[cl - 1] = 1;
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    /* Address running to the end of the configuration (no NUL). */
    memset(conf, 'a', sizeof conf);
    conf[0] = 1;
    fb_put64(conf + 1, 1);
    fb_put64(conf + 9, 1);
    n = build_is_conf(b, conf, 32, 32, 16);
    REFUSED(b, n + 16, false);
    /* Empty address. */
    memset(conf, 0, sizeof conf);
    conf[0] = 1;
    fb_put64(conf + 1, 1);
    cl = 9 + conf_server(conf + 9, 1, "", 1);
    cl = (cl + 7) & ~(size_t)7;
    n = build_is_conf(b, conf, cl, cl, 16);
    REFUSED(b, n + 16, false);
    /* Role byte missing: address NUL is the configuration's last byte. */
    memset(conf, 0, sizeof conf);
    conf[0] = 1;
    fb_put64(conf + 1, 1);
    fb_put64(conf + 9, 1);
    memset(conf + 17, 'x', 6);
    conf[23] = 0;
    n = build_is_conf(b, conf, 24, 24, 16);
    REFUSED(b, n + 16, false);
    /* Snapshot data over 1 GiB. */
    n = fb_install_snapshot(b, 1, KMS_FRAME_IS_PAYLOAD_MAX + 1);
    REFUSED(b, n, false);
    /* Header too long overall. */
    n = fb_install_snapshot(b, 1, 8);
    fb_put64(b + 8, KMS_FRAME_HEADER_MAX + 8);
    REFUSED(b, n, false);
#undef CONF2
}

/* A stamp between two frames split across many chunks is reported once, and
 * at_start is true exactly at frame boundaries. */
static void test_boundaries(void **state)
{
    uint8_t buf[2048];
    size_t n = build_all(buf, true);
    struct kms_frame_parser p;
    size_t starts = 0;
    (void)state;

    kms_frame_parser_init(&p, true);
    for (size_t i = 0; i < n; i++) {
        size_t used;
        enum kms_frame_event ev;
        if (kms_frame_parser_at_start(&p)) {
            starts++;
            /* Every boundary begins with a known type byte. */
            assert_true((buf[i] >= 1 && buf[i] <= 6) || buf[i] == KMS_FRAME_STAMP);
        }
        assert_int_equal(kms_frame_parser_feed(&p, buf + i, 1, &used, &ev), 0);
        assert_int_equal(used, 1);
    }
    assert_int_equal(starts, 9);
    assert_true(kms_frame_parser_at_start(&p));
    assert_null(kms_frame_parser_error(&p));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_frames),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_malformed_preamble),
        cmocka_unit_test(test_malformed_append_entries),
        cmocka_unit_test(test_malformed_install_snapshot),
        cmocka_unit_test(test_boundaries),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
