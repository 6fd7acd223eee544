/* kms_store state machine on a real RocksDB in temp dirs: every op and its
 * result, fatal entries, idempotent replay, reopen, snapshot/restore, digest
 * equality, concurrent readers, the raft fsm's store side. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>

#include "kms_crypto.h"
#include "kms_store.h"

/* ---- fixtures ----------------------------------------------------------- */

#include "store_fixture.h"
static int revoke_key(struct kms_store *s, uint64_t index, unsigned n, int64_t at)
{
    Kmsd__V1__RevokeKey rk = KMSD__V1__REVOKE_KEY__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    uint8_t id[16];
    key_id(id, n);
    rk.key_id.data = id;
    rk.key_id.len = 16;
    rk.revoked_at = at;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REVOKE_KEY;
    e.revoke_key = &rk;
    return apply_code(s, index, &e, NULL);
}

static int revoke_node(struct kms_store *s, uint64_t index, const char *uuid, uint64_t *count)
{
    Kmsd__V1__RevokeNode rn = KMSD__V1__REVOKE_NODE__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    rn.node_uuid = (char *)uuid;
    rn.revoked_at = 777;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REVOKE_NODE;
    e.revoke_node = &rn;
    return apply_code(s, index, &e, count);
}


static int put_member(struct kms_store *s, uint64_t index, uint64_t id, const char *addr)
{
    Kmsd__V1__Member m = KMSD__V1__MEMBER__INIT;
    Kmsd__V1__PutMember pm = KMSD__V1__PUT_MEMBER__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    m.id = id;
    m.raft_address = (char *)addr;
    m.version = (char *)"0.1.0";
    pm.member = &m;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_MEMBER;
    e.put_member = &pm;
    return apply_code(s, index, &e, NULL);
}

static int remove_member(struct kms_store *s, uint64_t index, uint64_t id)
{
    Kmsd__V1__RemoveMember rm = KMSD__V1__REMOVE_MEMBER__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    rm.id = id;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REMOVE_MEMBER;
    e.remove_member = &rm;
    return apply_code(s, index, &e, NULL);
}

static int noop(struct kms_store *s, uint64_t index)
{
    Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    e.noop = &no;
    return apply_code(s, index, &e, NULL);
}

static Kmsd__V1__SealedRecord *get_rec(struct kms_store *s, unsigned n)
{
    uint8_t id[16];
    Kmsd__V1__SealedRecord *r = NULL;
    struct kms_err err;
    key_id(id, n);
    if (kms_store_record_get(s, id, &r, &err) != 0) {
        return NULL;
    }
    return r;
}

static void digest(struct kms_store *s, uint8_t out[32])
{
    struct kms_err err;
    if (kms_store_digest(s, out, &err) != 0) {
        fail_msg("digest: %s", err.msg);
    }
}

static int count_cb(void *arg, const Kmsd__V1__SealedRecord *r)
{
    (void)r;
    (*(unsigned *)arg)++;
    return 0;
}

static unsigned list_count(struct kms_store *s, const char *uuid)
{
    unsigned n = 0;
    struct kms_err err;
    assert_int_equal(kms_store_records_list(s, uuid, count_cb, &n, &err), 0);
    return n;
}

static int member_cb(void *arg, const Kmsd__V1__Member *m)
{
    uint64_t *ids = arg;
    ids[ids[0] + 1] = m->id;
    ids[0]++;
    return 0;
}

/* A deterministic mixed workload: entries 1..n. */
static void workload(struct kms_store *s, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i <= to; i++) {
        switch (i % 7) {
        case 0:
            (void)revoke_key(s, i, (unsigned)(i / 2), (int64_t)i);
            break;
        case 1:
            (void)put_member(s, i, i % 5 + 1, "10.0.0.1:4052");
            break;
        case 2:
            (void)noop(s, i);
            break;
        default:
            (void)put_record(s, i, (unsigned)i, i % 2 ? "uuid-odd" : "uuid-even");
            break;
        }
    }
}

/* ---- tests -------------------------------------------------------------- */

static void test_ops_and_results(void **state)
{
    struct dir d;
    struct kms_store *s;
    Kmsd__V1__SealedRecord *r;
    Kmsd__V1__EncryptedKeyring *k = NULL;
    struct kms_err err;
    uint64_t count = 0, ids[8] = {0};
    uint64_t ix = 0;
    (void)state;

    dir_make(&d);
    s = open_in(&d, "s");
    assert_int_equal(kms_store_applied_index(s), 0);

    /* put_record, duplicate refused without overwrite */
    assert_int_equal(put_record(s, ++ix, 1, "node-a"), 0);
    assert_int_equal(put_record(s, ++ix, 2, "node-a"), 0);
    assert_int_equal(put_record(s, ++ix, 3, "node-a"), 0);
    assert_int_equal(put_record(s, ++ix, 4, "node-b"), 0);
    assert_int_equal(put_record(s, ++ix, 1, "node-z"), KMS_EEXIST);
    assert_int_equal(kms_store_count(s), 4);
    r = get_rec(s, 1);
    assert_non_null(r);
    assert_string_equal(r->node_uuid, "node-a");
    assert_int_equal(r->created_at, 1001);
    assert_int_equal(r->revoked_at, 0);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    assert_null(get_rec(s, 99));
    {
        uint8_t id[16];
        key_id(id, 99);
        assert_int_equal(kms_store_record_get(s, id, &r, &err), KMS_ENOTFOUND);
    }
    assert_int_equal(list_count(s, NULL), 4);
    assert_int_equal(list_count(s, "node-a"), 3);
    assert_int_equal(list_count(s, "node-b"), 1);
    assert_int_equal(list_count(s, "node-"), 0); /* prefix of a uuid is not a uuid */
    assert_int_equal(list_count(s, "node-c"), 0);

    /* revoke by key id: keeps the record, sets revoked_at once */
    assert_int_equal(revoke_key(s, ++ix, 99, 5000), KMS_ENOTFOUND);
    assert_int_equal(revoke_key(s, ++ix, 2, 5000), 0);
    assert_int_equal(revoke_key(s, ++ix, 2, 6000), 0); /* already revoked: no change */
    r = get_rec(s, 2);
    assert_non_null(r);
    assert_int_equal(r->revoked_at, 5000);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);

    /* revoke by node: counts the newly revoked */
    assert_int_equal(revoke_node(s, ++ix, "node-a", &count), 0);
    assert_int_equal(count, 2);
    assert_int_equal(revoke_node(s, ++ix, "node-a", &count), 0);
    assert_int_equal(count, 0);
    assert_int_equal(revoke_node(s, ++ix, "node-nope", &count), KMS_ENOTFOUND);
    r = get_rec(s, 3);
    assert_int_equal(r->revoked_at, 777);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    r = get_rec(s, 4);
    assert_int_equal(r->revoked_at, 0);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    assert_int_equal(kms_store_count(s), 4);

    /* keyring: init, rotate, errors */
    assert_int_equal(kms_store_keyring_get(s, &k, &err), KMS_EUNINIT);
    assert_null(k);
    assert_int_equal(put_keyring(s, ++ix, false, 1, 0xc1), KMS_EUNINIT);
    assert_int_equal(put_keyring(s, ++ix, true, 1, 0xc1), 0);
    assert_int_equal(put_keyring(s, ++ix, true, 1, 0xc1), KMS_EEXIST);
    assert_int_equal(put_keyring(s, ++ix, false, 2, 0xc1), 0);
    assert_int_equal(put_keyring(s, ++ix, false, 2, 0xc1), KMS_ERANGE); /* stale */
    assert_int_equal(put_keyring(s, ++ix, false, 3, 0xee), KMS_EINVAL); /* other cluster */
    assert_int_equal(kms_store_keyring_get(s, &k, &err), 0);
    assert_int_equal(k->active_term, 2);
    assert_int_equal(k->share_count, 5);
    assert_int_equal(k->threshold, 3);
    assert_int_equal(k->cluster_id.len, 16);
    assert_int_equal(k->cluster_id.data[0], 0xc1);
    kmsd__v1__encrypted_keyring__free_unpacked(k, NULL);

    /* members */
    assert_int_equal(put_member(s, ++ix, 3, "c:4052"), 0);
    assert_int_equal(put_member(s, ++ix, 1, "a:4052"), 0);
    assert_int_equal(put_member(s, ++ix, 2, "b:4052"), 0);
    assert_int_equal(put_member(s, ++ix, 2, "b2:4052"), 0); /* update */
    assert_int_equal(remove_member(s, ++ix, 3), 0);
    assert_int_equal(remove_member(s, ++ix, 3), KMS_ENOTFOUND);
    assert_int_equal(kms_store_members_list(s, member_cb, ids, &err), 0);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 1);
    assert_int_equal(ids[2], 2);

    /* touch batch: max(old, at), duplicates collapse, unknown keys ignored */
    {
        Kmsd__V1__Touch t[4] = {KMSD__V1__TOUCH__INIT, KMSD__V1__TOUCH__INIT,
                                KMSD__V1__TOUCH__INIT, KMSD__V1__TOUCH__INIT};
        Kmsd__V1__Touch *tp[4] = {&t[0], &t[1], &t[2], &t[3]};
        Kmsd__V1__TouchBatch tb = KMSD__V1__TOUCH_BATCH__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        uint8_t id1[16], id4[16], id99[16];
        key_id(id1, 1);
        key_id(id4, 4);
        key_id(id99, 99);
        t[0].key_id.data = id1, t[0].key_id.len = 16, t[0].at = 50;
        t[1].key_id.data = id4, t[1].key_id.len = 16, t[1].at = 70;
        t[2].key_id.data = id1, t[2].key_id.len = 16, t[2].at = 60;
        t[3].key_id.data = id99, t[3].key_id.len = 16, t[3].at = 80;
        tb.touches = tp;
        tb.n_touches = 4;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_TOUCH_BATCH;
        e.touch_batch = &tb;
        assert_int_equal(apply_code(s, ++ix, &e, &count), 0);
        assert_int_equal(count, 2);
        r = get_rec(s, 1);
        assert_int_equal(r->last_access_at, 60);
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
        /* older touch never moves it back */
        t[0].at = 10;
        t[2].at = 20;
        tb.n_touches = 1;
        assert_int_equal(apply_code(s, ++ix, &e, &count), 0);
        assert_int_equal(count, 0);
        r = get_rec(s, 1);
        assert_int_equal(r->last_access_at, 60);
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
    }

    /* invalid op arguments are results, not failures */
    {
        Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
        e.put_record = &pr;
        assert_int_equal(apply_code(s, ++ix, &e, NULL), KMS_EINVAL);
    }
    assert_int_equal(noop(s, ++ix), 0);
    assert_int_equal(kms_store_applied_index(s), ix);
    assert_int_equal(kms_store_fatal(s, NULL), 0);
    kms_store_close(s);
    dir_remove(&d);
}

static void test_fatal_entries(void **state)
{
    struct dir d;
    struct kms_store *s;
    struct kms_store_result *res = NULL;
    struct kms_err err;
    uint8_t bad[16] = {'K', 'E', 1, 0, 2, 0, 0, 0, 0x08, 0x03, 0, 0, 0, 0, 0, 0}; /* version 3 */
    uint8_t junk[16] = {'K', 'X', 1, 0, 2, 0, 0, 0, 0x08, 0x01, 0, 0, 0, 0, 0, 0};
    uint8_t noop_only_version[16] = {'K', 'E', 1, 0, 2, 0, 0, 0, 0x08, 0x01, 0, 0, 0, 0, 0, 0};
    (void)state;

    dir_make(&d);
    s = open_in(&d, "a");
    assert_int_equal(noop(s, 1), 0);
    kms_err_clear(&err);
    assert_int_equal(kms_store_apply(s, 2, bad, sizeof(bad), &res, &err), KMS_EVERSION);
    assert_null(res);
    assert_non_null(strstr(err.msg, "entry 2"));
    /* sticky: the next (valid) entry is refused too, nothing skipped */
    kms_err_clear(&err);
    {
        Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        int rc = 0;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_NOOP;
        e.noop = &no;
        assert_null(apply_e(s, 3, &e, &rc, &err));
        assert_int_equal(rc, KMS_EVERSION);
    }
    assert_int_equal(kms_store_applied_index(s), 1);
    assert_int_equal(kms_store_fatal(s, &err), KMS_EVERSION);
    kms_store_close(s);

    s = open_in(&d, "b");
    assert_int_equal(kms_store_apply(s, 7, junk, sizeof(junk), &res, &err), KMS_ECORRUPT);
    assert_non_null(strstr(err.msg, "entry 7"));
    kms_store_close(s);

    s = open_in(&d, "c");
    assert_int_equal(kms_store_apply(s, 1, noop_only_version, sizeof(noop_only_version), &res,
                                     &err),
                     KMS_ECORRUPT); /* no op */
    assert_non_null(strstr(err.msg, "unknown op"));
    assert_int_equal(kms_store_apply(s, 1, junk, 13, &res, NULL), KMS_ECORRUPT);
    kms_store_close(s);
    dir_remove(&d);
}

static void test_idempotent_replay(void **state)
{
    struct dir d;
    struct kms_store *s;
    struct kms_store_result *res = NULL;
    struct kms_err err;
    uint8_t d1[32], d2[32];
    (void)state;

    dir_make(&d);
    s = open_in(&d, "s");
    workload(s, 1, 60);
    digest(s, d1);
    assert_int_equal(kms_store_applied_index(s), 60);
    /* replaying old indexes (even with other content) does nothing */
    for (uint64_t i = 1; i <= 60; i++) {
        Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
        Kmsd__V1__RevokeNode rn = KMSD__V1__REVOKE_NODE__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        e.version = 1;
        if (i % 2) {
            e.op_case = KMSD__V1__ENTRY__OP_NOOP;
            e.noop = &no;
        } else {
            rn.node_uuid = (char *)"uuid-odd";
            rn.revoked_at = 1;
            e.op_case = KMSD__V1__ENTRY__OP_REVOKE_NODE;
            e.revoke_node = &rn;
        }
        res = apply_e(s, i, &e, NULL, &err);
        assert_true(res->skipped);
        assert_int_equal(res->code, 0);
        kms_store_result_free(res);
    }
    digest(s, d2);
    assert_memory_equal(d1, d2, 32);
    assert_int_equal(kms_store_applied_index(s), 60);
    /* the same index twice in a row */
    assert_int_equal(put_record(s, 61, 500, "x"), 0);
    digest(s, d1);
    {
        struct kms_store_result *r2;
        Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_NOOP;
        e.noop = &no;
        r2 = apply_e(s, 61, &e, NULL, &err);
        assert_true(r2->skipped);
        kms_store_result_free(r2);
    }
    digest(s, d2);
    assert_memory_equal(d1, d2, 32);
    kms_store_close(s);
    dir_remove(&d);
}

static void test_reopen(void **state)
{
    struct dir d;
    struct kms_store *s;
    uint8_t d1[32], d2[32];
    uint64_t count;
    Kmsd__V1__EncryptedKeyring *k = NULL;
    uint64_t ids[8] = {0};
    (void)state;

    dir_make(&d);
    s = open_in(&d, "s");
    workload(s, 1, 100);
    assert_int_equal(put_keyring(s, 101, true, 1, 0xab), 0);
    digest(s, d1);
    count = kms_store_count(s);
    kms_store_close(s);

    s = open_in(&d, "s");
    assert_int_equal(kms_store_applied_index(s), 101);
    assert_int_equal(kms_store_count(s), count);
    digest(s, d2);
    assert_memory_equal(d1, d2, 32);
    assert_int_equal(kms_store_keyring_get(s, &k, NULL), 0);
    kmsd__v1__encrypted_keyring__free_unpacked(k, NULL);
    assert_int_equal(kms_store_members_list(s, member_cb, ids, NULL), 0);
    assert_int_equal(ids[0], 5);
    assert_int_equal(list_count(s, NULL), count);
    /* replay after restart is skipped, new entries apply */
    assert_int_equal(noop(s, 102), 0);
    kms_store_close(s);
    dir_remove(&d);
}

/* Concatenates snapshot buffers into one raft_malloc()ed buffer, as raft
 * hands it to restore. */
static void *snap_flat(struct kms_store *s, uint64_t raft_index, size_t *len)
{
    struct raft_buffer *bufs = NULL;
    unsigned n = 0;
    size_t total = 0, off = 0;
    uint8_t *p;
    struct kms_err err;
    if (kms_store_snapshot(s, raft_index, &bufs, &n, &err) != 0) {
        fail_msg("snapshot: %s", err.msg);
    }
    for (unsigned i = 0; i < n; i++) {
        assert_int_equal(bufs[i].len % 8, 0);
        total += bufs[i].len;
    }
    p = raft_malloc(total);
    assert_non_null(p);
    for (unsigned i = 0; i < n; i++) {
        memcpy(p + off, bufs[i].base, bufs[i].len);
        off += bufs[i].len;
    }
    kms_store_snapshot_free(bufs, n);
    *len = total;
    return p;
}

static void test_snapshot_restore(void **state)
{
    struct dir d;
    struct kms_store *a, *b, *c;
    uint8_t da[32], db[32];
    void *snap;
    size_t len;
    bool skipped = true;
    struct kms_err err;
    (void)state;

    dir_make(&d);
    a = open_in(&d, "a");
    workload(a, 1, 200);
    assert_int_equal(put_keyring(a, 201, true, 1, 0x42), 0);
    digest(a, da);
    snap = snap_flat(a, 205, &len);

    /* into a fresh store */
    b = open_in(&d, "b");
    assert_int_equal(kms_store_restore(b, snap, len, &skipped, &err), 0);
    assert_false(skipped);
    assert_int_equal(kms_store_applied_index(b), 201);
    assert_int_equal(kms_store_count(b), kms_store_count(a));
    digest(b, db);
    assert_memory_equal(da, db, 32);

    /* into a store with other, older state: replaced entirely */
    c = open_in(&d, "c");
    assert_int_equal(put_record(c, 1, 9999, "stale"), 0);
    assert_int_equal(put_member(c, 2, 42, "old"), 0);
    assert_int_equal(kms_store_restore(c, snap, len, &skipped, &err), 0);
    assert_false(skipped);
    digest(c, db);
    assert_memory_equal(da, db, 32);
    assert_null(get_rec(c, 9999));
    assert_int_equal(list_count(c, "stale"), 0);
    kms_store_close(c);
    /* survives reopen, and the same snapshot at start is then skipped */
    c = open_in(&d, "c");
    digest(c, db);
    assert_memory_equal(da, db, 32);
    assert_int_equal(kms_store_restore(c, snap, len, &skipped, &err), 0);
    assert_true(skipped);

    /* both continue identically */
    workload(a, 202, 260);
    workload(b, 202, 260);
    digest(a, da);
    digest(b, db);
    assert_memory_equal(da, db, 32);

    /* a corrupt snapshot is refused before anything is touched */
    kms_store_close(c);
    c = open_in(&d, "fresh");
    assert_int_equal(put_record(c, 1, 1, "keep"), 0);
    digest(c, da);
    ((uint8_t *)snap)[len - 3] ^= 1;
    assert_int_equal(kms_store_restore(c, snap, len, &skipped, &err), KMS_ECHECKSUM);
    ((uint8_t *)snap)[len - 3] ^= 1;
    ((uint8_t *)snap)[2] = 9;
    assert_int_equal(kms_store_restore(c, snap, len, &skipped, &err), KMS_EVERSION);
    assert_int_equal(kms_store_restore(c, snap, 40, &skipped, &err), KMS_ECORRUPT);
    ((uint8_t *)snap)[2] = 1;
    assert_int_equal(kms_store_restore(c, snap, len - 8, &skipped, &err), KMS_ECORRUPT);
    assert_int_equal(kms_store_fatal(c, NULL), 0);
    digest(c, db);
    assert_memory_equal(da, db, 32);
    assert_int_equal(kms_store_applied_index(c), 1);

    raft_free(snap);
    kms_store_close(a);
    kms_store_close(b);
    kms_store_close(c);
    dir_remove(&d);
}

static void test_restore_older_skipped(void **state)
{
    struct dir d;
    struct kms_store *a;
    uint8_t d1[32], d2[32];
    void *snap;
    size_t len;
    bool skipped = false;
    struct kms_err err;
    (void)state;

    dir_make(&d);
    a = open_in(&d, "a");
    workload(a, 1, 50);
    snap = snap_flat(a, 0, &len);
    workload(a, 51, 120);
    digest(a, d1);
    assert_int_equal(kms_store_restore(a, snap, len, &skipped, &err), 0);
    assert_true(skipped);
    assert_int_equal(kms_store_applied_index(a), 120);
    digest(a, d2);
    assert_memory_equal(d1, d2, 32);
    raft_free(snap);
    kms_store_close(a);
    dir_remove(&d);
}

static void test_same_entries_same_digest(void **state)
{
    struct dir d;
    struct kms_store *a, *b;
    uint8_t da[32], db[32];
    (void)state;

    dir_make(&d);
    a = open_in(&d, "a");
    b = open_in(&d, "b");
    workload(a, 1, 150);
    workload(b, 1, 150);
    digest(a, da);
    digest(b, db);
    assert_memory_equal(da, db, 32);
    assert_int_equal(put_record(a, 151, 7777, "n"), 0);
    assert_int_equal(put_record(b, 151, 7778, "n"), 0);
    digest(a, da);
    digest(b, db);
    assert_memory_not_equal(da, db, 32);
    kms_store_close(a);
    kms_store_close(b);
    dir_remove(&d);
}

/* ---- concurrent readers ----------------------------------------------------- */

#define CONC_N 1500

struct conc {
    struct kms_store *s;
    atomic_bool stop;
    atomic_int errors;
    atomic_ulong reads;
};

static int conc_list_cb(void *arg, const Kmsd__V1__SealedRecord *r)
{
    (void)arg;
    return r->key_id.len == 16 ? 0 : KMS_ECORRUPT;
}

static void *reader(void *arg)
{
    struct conc *c = arg;
    uint64_t last = 0;
    unsigned seed = (unsigned)(uintptr_t)&last;
    while (!atomic_load(&c->stop)) {
        uint64_t a = kms_store_applied_index(c->s);
        struct kms_err err;
        if (a < last) {
            atomic_fetch_add(&c->errors, 1); /* applied index went back */
        }
        last = a;
        if (a > 0) {
            /* entry i put record i: every index <= applied must be readable */
            unsigned i = (unsigned)(rand_r(&seed) % a) + 1;
            uint8_t id[16];
            Kmsd__V1__SealedRecord *r = NULL;
            key_id(id, i);
            if (kms_store_record_get(c->s, id, &r, &err) != 0 || r->created_at != 1000 + i) {
                atomic_fetch_add(&c->errors, 1);
            }
            if (r != NULL) {
                kmsd__v1__sealed_record__free_unpacked(r, NULL);
            }
        }
        if (rand_r(&seed) % 64 == 0) {
            uint8_t dg[32];
            if (kms_store_records_list(c->s, "uuid-odd", conc_list_cb, NULL, &err) != 0 ||
                kms_store_digest(c->s, dg, &err) != 0) {
                atomic_fetch_add(&c->errors, 1);
            }
        }
        atomic_fetch_add(&c->reads, 1);
    }
    return NULL;
}

static void test_concurrent_readers(void **state)
{
    struct dir d;
    struct conc c;
    pthread_t th[4];
    (void)state;

    dir_make(&d);
    memset(&c, 0, sizeof(c));
    c.s = open_in(&d, "s");
    atomic_init(&c.stop, false);
    atomic_init(&c.errors, 0);
    atomic_init(&c.reads, 0);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_create(&th[i], NULL, reader, &c), 0);
    }
    for (unsigned i = 1; i <= CONC_N; i++) {
        assert_int_equal(put_record(c.s, i, i, i % 2 ? "uuid-odd" : "uuid-even"), 0);
    }
    atomic_store(&c.stop, true);
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
    }
    assert_int_equal(atomic_load(&c.errors), 0);
    assert_true(atomic_load(&c.reads) > 0);
    assert_int_equal(kms_store_count(c.s), CONC_N);
    kms_store_close(c.s);
    dir_remove(&d);
}

/* ---- the raft fsm's store side (src/raft/node_fsm.c drives it) ---------- */

static void test_fsm_store_side(void **state)
{
    struct dir d;
    struct kms_store *a, *b;
    struct raft_buffer *bufs = NULL;
    unsigned n = 0;
    const struct kms_store_result *result = NULL;
    uint8_t da[32], db[32];
    size_t total = 0, off = 0;
    uint8_t *one;
    struct kms_err err;
    (void)state;

    dir_make(&d);
    a = open_in(&d, "a");
    b = open_in(&d, "b");
    for (unsigned i = 1; i <= 20; i++) {
        Kmsd__V1__SealedRecord r = KMSD__V1__SEALED_RECORD__INIT;
        Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        struct raft_buffer buf;
        uint8_t id[16];
        key_id(id, i % 15); /* 5 duplicates */
        r.key_id.data = id;
        r.key_id.len = 16;
        r.node_uuid = (char *)"n1";
        pr.record = &r;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
        e.put_record = &pr;
        assert_int_equal(kms_entry_encode(&e, &buf, NULL), 0);
        assert_int_equal(kms_store_apply_borrowed(a, i, buf.base, buf.len, &result, NULL), 0);
        assert_non_null(result);
        assert_int_equal(result->code, i > 15 ? KMS_EEXIST : 0);
        raft_free(buf.base);
    }
    assert_int_equal(kms_store_applied_index(a), 20);
    {
        uint8_t bad[8] = {'K', 'E', 1, 0, 0, 0, 0, 0}; /* empty Entry: version 0 */
        assert_int_equal(kms_store_apply_borrowed(b, 1, bad, sizeof(bad), &result, NULL),
                         KMS_EVERSION);
        assert_null(result);
        assert_int_equal(kms_store_fatal(b, NULL), KMS_EVERSION);
        kms_store_close(b);
        b = open_in(&d, "b2");
    }

    /* The raft thread pins, a worker serialises, entries keep coming. */
    kms_err_clear(&err);
    assert_int_equal(kms_store_snapshot_pin(a, 20, &err), 0);
    assert_int_equal(kms_store_snapshot_pin(a, 20, &err), KMS_EBUSY);
    {
        Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        struct raft_buffer buf;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_NOOP;
        e.noop = &no;
        assert_int_equal(kms_entry_encode(&e, &buf, NULL), 0);
        assert_int_equal(kms_store_apply_borrowed(a, 21, buf.base, buf.len, &result, NULL), 0);
        raft_free(buf.base);
    }
    assert_int_equal(kms_store_snapshot_pinned(a, &bufs, &n, NULL), 0);
    assert_true(n > 0);
    for (unsigned i = 0; i < n; i++) {
        total += bufs[i].len;
    }
    one = malloc(total);
    assert_non_null(one);
    for (unsigned i = 0; i < n; i++) {
        memcpy(one + off, bufs[i].base, bufs[i].len);
        off += bufs[i].len;
    }
    kms_store_snapshot_free(bufs, n);
    kms_store_snapshot_unpin(a);
    assert_int_equal(kms_store_snapshot_pinned(a, &bufs, &n, NULL), KMS_EINVAL);
    assert_int_equal(kms_store_restore(b, one, total, NULL, NULL), 0);
    free(one);
    assert_int_equal(kms_store_applied_index(b), 20); /* the pinned state */
    digest(a, da);
    digest(b, db);
    assert_memory_equal(da, db, 32);
    kms_store_close(a);
    kms_store_close(b);
    dir_remove(&d);
}

static int ids_cb(void *arg, const Kmsd__V1__SealedRecord *r)
{
    unsigned *v = arg;
    v[++v[0]] = r->key_id.data[15];
    return 0;
}

/* True when some file under dir holds n bytes of value b in a row. */
static bool files_hold(const char *dir, uint8_t b, size_t n);
static const char *fh_dir;
static uint8_t fh_b;
static size_t fh_n;
static bool fh_found;

static int fh_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)ftw;
    if (flag != FTW_F || sb->st_size == 0) {
        return 0;
    }
    FILE *f = fopen(p, "rb");
    size_t run = 0;
    int c;
    if (f == NULL) {
        return 0;
    }
    while ((c = fgetc(f)) != EOF) {
        run = c == fh_b ? run + 1 : 0;
        if (run >= fh_n) {
            fh_found = true;
            break;
        }
    }
    fclose(f);
    return 0;
}

static bool files_hold(const char *dir, uint8_t b, size_t n)
{
    fh_dir = dir;
    fh_b = b;
    fh_n = n;
    fh_found = false;
    nftw(dir, fh_cb, 16, FTW_PHYS);
    return fh_found;
}

/* Revocation shreds: nonce and ciphertext leave the record (metadata stays),
 * result->shred is set (also on replay), and after kms_store_shred_compact
 * no RocksDB file holds the old ciphertext. Plus the live count per UUID
 * and paging with records_list_after. */
static void test_revoke_shreds(void **state)
{
    (void)state;
    struct dir d;
    struct kms_store *s;
    struct kms_store_result *res;
    struct kms_err err;
    Kmsd__V1__SealedRecord *r;
    uint64_t live = 0, count = 0;
    unsigned ids[8];
    uint8_t after[16];
    int rc;

    dir_make(&d);
    s = open_in(&d, "db");
    assert_int_equal(put_record(s, 1, 1, "node-a"), 0);
    assert_int_equal(put_record(s, 2, 2, "node-a"), 0);
    assert_int_equal(put_record(s, 3, 3, "node-b"), 0);
    assert_int_equal(put_record(s, 4, 4, "node-b"), 0);
    /* flushed to an SST: the old values must be compacted away later */
    assert_int_equal(kms_store_shred_compact(s, &err), 0);
    assert_true(files_hold(d.path, 0xc7, 48));
    assert_int_equal(kms_store_records_count_live(s, "node-a", 100, &live, &err), 0);
    assert_int_equal(live, 2);
    assert_int_equal(kms_store_records_count_live(s, "node-a", 1, &live, &err), 0);
    assert_int_equal(live, 1); /* bounded by max */

    {
        Kmsd__V1__RevokeKey rk = KMSD__V1__REVOKE_KEY__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        uint8_t id[16];
        key_id(id, 1);
        rk.key_id.data = id;
        rk.key_id.len = 16;
        rk.revoked_at = 555;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_REVOKE_KEY;
        e.revoke_key = &rk;
        kms_err_clear(&err);
        res = apply_e(s, 5, &e, NULL, &err);
        assert_int_equal(res->code, 0);
        assert_true(res->shred);
        kms_store_result_free(res);
        res = apply_e(s, 5, &e, NULL, &err); /* replay */
        assert_true(res->skipped);
        assert_true(res->shred);
        kms_store_result_free(res);
    }
    r = get_rec(s, 1);
    assert_non_null(r);
    assert_int_equal(r->revoked_at, 555);
    assert_int_equal(r->ciphertext.len, 0);
    assert_int_equal(r->nonce.len, 0);
    assert_string_equal(r->node_uuid, "node-a");
    assert_int_equal(r->created_at, 1001);
    assert_int_equal(kms_record_validate(r, &err), 0); /* a shredded record is valid */
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    assert_int_equal(revoke_key(s, 6, 1, 999), 0); /* again: nothing changes */
    r = get_rec(s, 1);
    assert_int_equal(r->revoked_at, 555);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);

    assert_int_equal(revoke_node(s, 7, "node-a", &count), 0);
    assert_int_equal(count, 1); /* key 2 newly revoked */
    r = get_rec(s, 2);
    assert_int_equal(r->ciphertext.len, 0);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    assert_int_equal(kms_store_records_count_live(s, "node-a", 100, &live, &err), 0);
    assert_int_equal(live, 0);
    assert_int_equal(revoke_node(s, 8, "node-b", &count), 0);
    assert_int_equal(count, 2);

    /* paging */
    memset(ids, 0, sizeof(ids));
    key_id(after, 2);
    assert_int_equal(kms_store_records_list_after(s, NULL, after, ids_cb, ids, &err), 0);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 3);
    assert_int_equal(ids[2], 4);
    memset(ids, 0, sizeof(ids));
    key_id(after, 3);
    assert_int_equal(kms_store_records_list_after(s, "node-b", after, ids_cb, ids, &err), 0);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 4);

    /* the 48-byte 0xc7 ciphertexts: in the WAL/SSTs until compacted */
    rc = kms_store_shred_compact(s, &err);
    assert_int_equal(rc, 0);
    kms_store_close(s);
    assert_false(files_hold(d.path, 0xc7, 48));
    s = open_in(&d, "db");
    assert_int_equal(kms_store_count(s), 4);
    kms_store_close(s);
    dir_remove(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ops_and_results),
        cmocka_unit_test(test_fatal_entries),
        cmocka_unit_test(test_idempotent_replay),
        cmocka_unit_test(test_reopen),
        cmocka_unit_test(test_snapshot_restore),
        cmocka_unit_test(test_restore_older_skipped),
        cmocka_unit_test(test_same_entries_same_digest),
        cmocka_unit_test(test_concurrent_readers),
        cmocka_unit_test(test_fsm_store_side),
        cmocka_unit_test(test_revoke_shreds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
