/* The entry-version marker of the store (kms_store.h "Xentryver"): applying
 * a version 2 entry records it, a reopen keeps it, the digest ignores it,
 * and a store whose marker is above KMS_ENTRY_VERSION (a data dir a newer
 * kmsd wrote) is refused at open with a message naming the downgrade. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>
#include <rocksdb/c.h>

#include "kms_store.h"

#include "store_fixture.h"

static void noop_at(struct kms_store *s, uint64_t index, uint32_t version, uint64_t proposer)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__Noop no = KMSD__V1__NOOP__INIT;
    e.version = version;
    e.proposer_id = proposer;
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    e.noop = &no;
    assert_int_equal(apply_code(s, index, &e, NULL), 0);
}

static void test_marker_recorded_and_kept(void **state)
{
    struct dir d;
    struct kms_store *s, *t;
    uint8_t ds[32], dt[32];
    struct kms_err err;
    (void)state;

    dir_make(&d);
    s = open_in(&d, "a");
    t = open_in(&d, "b");
    assert_int_equal(kms_store_entry_version(s), 1);
    noop_at(s, 1, 1, 0);
    noop_at(t, 1, 1, 0);
    assert_int_equal(kms_store_entry_version(s), 1);
    noop_at(s, 2, 2, 7);
    noop_at(t, 2, 1, 0);
    assert_int_equal(kms_store_entry_version(s), 2);
    assert_int_equal(kms_store_entry_version(t), 1);
    /* A later version 1 entry does not lower it. */
    noop_at(s, 3, 1, 0);
    assert_int_equal(kms_store_entry_version(s), 2);
    noop_at(t, 3, 1, 0);
    /* The marker is per data dir, not replicated state: digests agree. */
    kms_err_clear(&err);
    assert_int_equal(kms_store_digest(s, ds, &err), 0);
    assert_int_equal(kms_store_digest(t, dt, &err), 0);
    assert_memory_equal(ds, dt, 32);
    kms_store_close(s);
    s = open_in(&d, "a");
    assert_int_equal(kms_store_entry_version(s), 2);
    assert_int_equal(kms_store_applied_index(s), 3);
    kms_store_close(s);
    kms_store_close(t);
    dir_remove(&d);
}

static void test_newer_marker_refused(void **state)
{
    struct dir d;
    struct kms_store *s;
    struct kms_err err;
    char p[128], *rerr = NULL;
    rocksdb_options_t *o;
    rocksdb_writeoptions_t *wo;
    rocksdb_t *db;
    const uint8_t v[8] = {0, 0, 0, 0, 0, 0, 0, KMS_ENTRY_VERSION + 1};
    (void)state;

    dir_make(&d);
    s = open_in(&d, "a");
    noop_at(s, 1, 1, 0);
    kms_store_close(s);
    /* What a newer kmsd leaves behind. */
    snprintf(p, sizeof(p), "%s/a", d.path);
    o = rocksdb_options_create();
    wo = rocksdb_writeoptions_create();
    db = rocksdb_open(o, p, &rerr);
    assert_null(rerr);
    rocksdb_put(db, wo, "Xentryver", 9, (const char *)v, 8, &rerr);
    assert_null(rerr);
    rocksdb_close(db);
    rocksdb_writeoptions_destroy(wo);
    rocksdb_options_destroy(o);

    s = NULL;
    kms_err_clear(&err);
    assert_int_equal(kms_store_open(p, &s, &err), KMS_EVERSION);
    assert_null(s);
    assert_non_null(strstr(err.msg, "entry version 3"));
    assert_non_null(strstr(err.msg, "downgrade"));
    assert_non_null(strstr(err.msg, "newer kmsd"));
    dir_remove(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_marker_recorded_and_kept),
        cmocka_unit_test(test_newer_marker_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
