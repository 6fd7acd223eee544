/* kms_store entry framing: round trip, 8-byte padding, bad frames, versions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>

#include "kms_store.h"

static uint32_t rd_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void test_round_trip(void **state)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT, *d = NULL;
    Kmsd__V1__RevokeKey rk = KMSD__V1__REVOKE_KEY__INIT;
    uint8_t id[16];
    struct raft_buffer b;
    struct kms_err err;
    (void)state;

    memset(id, 0xab, sizeof(id));
    rk.key_id.data = id;
    rk.key_id.len = 16;
    rk.revoked_at = 1234;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REVOKE_KEY;
    e.revoke_key = &rk;
    assert_int_equal(kms_entry_encode(&e, &b, &err), 0);
    assert_non_null(b.base);
    assert_int_equal(b.len % 8, 0);
    assert_memory_equal(b.base, "KE\x01\x00", 4);
    assert_int_equal(kms_entry_decode(b.base, b.len, &d, &err), 0);
    assert_int_equal(d->version, 1);
    assert_int_equal(d->op_case, KMSD__V1__ENTRY__OP_REVOKE_KEY);
    assert_int_equal(d->revoke_key->key_id.len, 16);
    assert_memory_equal(d->revoke_key->key_id.data, id, 16);
    assert_int_equal(d->revoke_key->revoked_at, 1234);
    kmsd__v1__entry__free_unpacked(d, NULL);
    raft_free(b.base);
}

/* Every payload size an Entry can have up to 64 bytes (4..64: the version
 * field and an op take at least 4) gives a frame whose length is a multiple
 * of 8, with the exact header length and zero padding. */
static void check_frame(const Kmsd__V1__Entry *e, int seen[65])
{
    struct raft_buffer b;
    struct kms_err err;
    Kmsd__V1__Entry *d = NULL;
    const uint8_t *p;
    size_t n;

    assert_int_equal(kms_entry_encode(e, &b, &err), 0);
    p = b.base;
    n = rd_le32(p + 4);
    assert_int_equal(n, kmsd__v1__entry__get_packed_size(e));
    assert_int_equal(b.len % 8, 0);
    assert_int_equal(b.len, 8 + ((n + 7) & ~(size_t)7));
    for (size_t i = 8 + n; i < b.len; i++) {
        assert_int_equal(p[i], 0);
    }
    if (n <= 64) {
        seen[n] = 1;
    }
    assert_int_equal(kms_entry_decode(b.base, b.len, &d, &err), 0);
    assert_int_equal(d->op_case, e->op_case);
    kmsd__v1__entry__free_unpacked(d, NULL);
    raft_free(b.base);
}

static void test_padding_all_sizes(void **state)
{
    char uuid[80];
    int seen[65] = {0};
    static const int64_t ats[] = {0, 1, 128, 16384};
    (void)state;

    {
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_NOOP;
        e.noop = &no;
        check_frame(&e, seen);
    }
    for (size_t l = 0; l < 70; l++) {
        for (size_t a = 0; a < sizeof(ats) / sizeof(ats[0]); a++) {
            Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
            Kmsd__V1__RevokeNode rn = KMSD__V1__REVOKE_NODE__INIT;
            memset(uuid, 'u', l);
            uuid[l] = '\0';
            rn.node_uuid = uuid;
            rn.revoked_at = ats[a];
            e.version = 1;
            e.op_case = KMSD__V1__ENTRY__OP_REVOKE_NODE;
            e.revoke_node = &rn;
            check_frame(&e, seen);
        }
    }
    for (size_t n = 4; n <= 64; n++) {
        if (!seen[n]) {
            fail_msg("no entry of payload size %zu was produced", n);
        }
    }
}

static void frame(uint8_t *buf, size_t *len, const uint8_t *payload, size_t n)
{
    memset(buf, 0, 8 + ((n + 7) & ~(size_t)7));
    buf[0] = 'K';
    buf[1] = 'E';
    buf[2] = 1;
    buf[4] = (uint8_t)n;
    buf[5] = (uint8_t)(n >> 8);
    memcpy(buf + 8, payload, n);
    *len = 8 + ((n + 7) & ~(size_t)7);
}

/* Every frame built by hand from a raw payload of 0..64 bytes has a length
 * that is a multiple of 8 and decodes or fails cleanly (never crashes). */
static void test_payload_sizes_0_to_64(void **state)
{
    uint8_t payload[64], buf[8 + 64];
    struct kms_err err;
    (void)state;
    for (size_t n = 0; n <= 64; n++) {
        size_t len;
        Kmsd__V1__Entry *d = NULL;
        memset(payload, 0, sizeof(payload));
        frame(buf, &len, payload, n);
        assert_int_equal(len % 8, 0);
        int rc = kms_entry_decode(buf, len, &d, &err);
        /* All-zero payloads parse as an Entry with version 0: refused. */
        assert_true(rc == KMS_EVERSION || rc == KMS_ECORRUPT);
        assert_null(d);
    }
}

static void encode_noop(struct raft_buffer *b, uint32_t version)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
    uint8_t *p;
    size_t n;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    e.noop = &no;
    e.version = version;
    n = kmsd__v1__entry__get_packed_size(&e);
    p = calloc(1, 8 + ((n + 7) & ~(size_t)7));
    assert_non_null(p);
    p[0] = 'K';
    p[1] = 'E';
    p[2] = 1;
    p[4] = (uint8_t)n;
    kmsd__v1__entry__pack(&e, p + 8);
    b->base = p;
    b->len = 8 + ((n + 7) & ~(size_t)7);
}

static void test_bad_frames(void **state)
{
    struct raft_buffer b;
    Kmsd__V1__Entry *d = NULL;
    struct kms_err err;
    uint8_t *p;
    (void)state;

    encode_noop(&b, 1);
    p = b.base;
    assert_int_equal(kms_entry_decode(p, b.len, &d, &err), 0);
    kmsd__v1__entry__free_unpacked(d, NULL);
    d = NULL;

    assert_int_equal(kms_entry_decode(p, 7, &d, &err), KMS_ECORRUPT); /* short */
    assert_int_equal(kms_entry_decode(NULL, 0, &d, &err), KMS_ECORRUPT);
    p[0] = 'X';
    assert_int_equal(kms_entry_decode(p, b.len, &d, &err), KMS_ECORRUPT); /* magic */
    p[0] = 'K';
    p[2] = 2;
    assert_int_equal(kms_entry_decode(p, b.len, &d, &err), KMS_EVERSION); /* framing version */
    p[2] = 1;
    p[3] = 1;
    assert_int_equal(kms_entry_decode(p, b.len, &d, &err), KMS_ECORRUPT); /* reserved */
    p[3] = 0;
    p[4] = 200;
    assert_int_equal(kms_entry_decode(p, b.len, &d, &err), KMS_ECORRUPT); /* length */
    free(p);

    /* Non-zero padding. */
    encode_noop(&b, 1);
    p = b.base;
    if (b.len > 8 + (size_t)p[4]) {
        p[b.len - 1] = 1;
        assert_int_equal(kms_entry_decode(p, b.len, &d, &err), KMS_ECORRUPT);
    }
    /* Frame length not a multiple of 8. */
    assert_int_equal(kms_entry_decode(p, b.len + 1, &d, &err), KMS_ECORRUPT);
    free(p);

    /* Garbage payload. */
    {
        uint8_t buf[16] = {'K', 'E', 1, 0, 8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
        assert_int_equal(kms_entry_decode(buf, sizeof(buf), &d, &err), KMS_ECORRUPT);
    }
    assert_null(d);
}

static void test_future_version_and_unknown_op(void **state)
{
    struct raft_buffer b;
    Kmsd__V1__Entry *d = NULL;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    struct kms_err err;
    (void)state;

    encode_noop(&b, KMS_ENTRY_VERSION + 1);
    assert_int_equal(kms_entry_decode(b.base, b.len, &d, &err), KMS_EVERSION);
    assert_non_null(strstr(err.msg, "version 3"));
    free(b.base);
    /* Every version up to KMS_ENTRY_VERSION decodes. */
    encode_noop(&b, KMS_ENTRY_VERSION);
    assert_int_equal(kms_entry_decode(b.base, b.len, &d, &err), 0);
    kmsd__v1__entry__free_unpacked(d, NULL);
    d = NULL;
    free(b.base);

    /* Version 1 without an op (e.g. an op field this build does not know):
     * fields 1 (version) = 1 and 99 (unknown, varint) = 1. */
    {
        uint8_t buf[16] = {'K', 'E', 1, 0, 5, 0, 0, 0, 0x08, 0x01, 0x98, 0x06, 0x01, 0, 0, 0};
        assert_int_equal(kms_entry_decode(buf, sizeof(buf), &d, &err), KMS_ECORRUPT);
        assert_non_null(strstr(err.msg, "unknown op"));
    }
    /* Encode refuses what decode would refuse. */
    e.version = 1;
    assert_int_equal(kms_entry_encode(&e, &b, &err), KMS_EINVAL);
    assert_null(b.base);
    e.version = KMS_ENTRY_VERSION + 1;
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    assert_int_equal(kms_entry_encode(&e, &b, &err), KMS_EINVAL);
    assert_null(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_padding_all_sizes),
        cmocka_unit_test(test_payload_sizes_0_to_64),
        cmocka_unit_test(test_bad_frames),
        cmocka_unit_test(test_future_version_and_unknown_op),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
