/*
 * Writes through raft (src/server/daemon/node_propose.c, linked from
 * kms_daemon), without a raft node: kmsd_write's decisions after an
 * attempt (kmsd_write_next: which raft results are retried, forwarded,
 * redirected or returned; kmsd_write_outcome: when KMS_EEXIST means the
 * write succeeded), and kmsd_record_readback against a real store
 * (daemon_fixture.h), which tells a retried write of our own record from a
 * key id some other record holds.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>

#include "kms_crypto.h"
#include "kms_store.h"
#include "kmsd.h"

#include "kmsd/v1/entry.pb-c.h"
#include "kmsd/v1/record.pb-c.h"

#include "store_fixture.h"
#include "daemon_fixture.h"

#define SELF 2
#define OTHER 3

/* ---- kmsd_write_next ------------------------------------------------- */

static void test_next_applied(void **state)
{
    (void)state;
    /* 0 is applied, whatever raft says of the leader */
    assert_int_equal(kmsd_write_next(0, 0, SELF, false), KMSD_WRITE_APPLIED);
    assert_int_equal(kmsd_write_next(0, SELF, SELF, true), KMSD_WRITE_APPLIED);
    assert_int_equal(kmsd_write_next(0, OTHER, SELF, true), KMSD_WRITE_APPLIED);
}

static void test_next_not_leader(void **state)
{
    (void)state;
    /* another node leads: a forwardable entry goes to it, any other is
     * refused naming it */
    assert_int_equal(kmsd_write_next(KMS_ENOTLEADER, OTHER, SELF, true), KMSD_WRITE_FORWARD);
    assert_int_equal(kmsd_write_next(KMS_ENOTLEADER, OTHER, SELF, false), KMSD_WRITE_REDIRECT);
    /* no leader known yet, or raft names this node (a stale view during an
     * election): wait and propose again, forwardable or not */
    assert_int_equal(kmsd_write_next(KMS_ENOTLEADER, 0, SELF, true), KMSD_WRITE_RETRY);
    assert_int_equal(kmsd_write_next(KMS_ENOTLEADER, 0, SELF, false), KMSD_WRITE_RETRY);
    assert_int_equal(kmsd_write_next(KMS_ENOTLEADER, SELF, SELF, true), KMSD_WRITE_RETRY);
    assert_int_equal(kmsd_write_next(KMS_ENOTLEADER, SELF, SELF, false), KMSD_WRITE_RETRY);
}

static void test_next_retry_and_fail(void **state)
{
    static const int fatal[] = {KMS_ESHUTDOWN, KMS_EINVAL, KMS_ENOMEM, KMS_ERAFT,
                                KMS_EFORMAT,   KMS_EEXIST, KMS_EDENIED};
    (void)state;
    /* leadership lost in flight: retried, and the write may have committed */
    assert_int_equal(kmsd_write_next(KMS_EUNAVAIL, 0, SELF, true), KMSD_WRITE_RETRY_UNCERTAIN);
    assert_int_equal(kmsd_write_next(KMS_EUNAVAIL, OTHER, SELF, true),
                     KMSD_WRITE_RETRY_UNCERTAIN);
    assert_int_equal(kmsd_write_next(KMS_EUNAVAIL, OTHER, SELF, false),
                     KMSD_WRITE_RETRY_UNCERTAIN);
    /* a timed-out proposal may commit later (kms_raft_propose): retried as
     * uncertain, so its own late commit (EEXIST) is not a failure */
    assert_int_equal(kmsd_write_next(KMS_ETIMEDOUT, 0, SELF, true), KMSD_WRITE_RETRY_UNCERTAIN);
    assert_int_equal(kmsd_write_next(KMS_ETIMEDOUT, OTHER, SELF, false),
                     KMSD_WRITE_RETRY_UNCERTAIN);
    /* anything else is returned as it is, also with a leader named */
    for (size_t i = 0; i < sizeof(fatal) / sizeof(fatal[0]); i++) {
        assert_int_equal(kmsd_write_next(fatal[i], 0, SELF, true), KMSD_WRITE_FAIL);
        assert_int_equal(kmsd_write_next(fatal[i], OTHER, SELF, true), KMSD_WRITE_FAIL);
        assert_int_equal(kmsd_write_next(fatal[i], OTHER, SELF, false), KMSD_WRITE_FAIL);
    }
}

/* ---- kmsd_write_outcome ---------------------------------------------- */

static void test_outcome(void **state)
{
    Kmsd__V1__Entry put = KMSD__V1__ENTRY__INIT, keyring = KMSD__V1__ENTRY__INIT,
                    member = KMSD__V1__ENTRY__INIT;
    (void)state;
    put.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
    keyring.op_case = KMSD__V1__ENTRY__OP_PUT_KEYRING;
    member.op_case = KMSD__V1__ENTRY__OP_PUT_MEMBER;
    /* a PutRecord's EEXIST after an uncertain attempt: that attempt
     * committed, success */
    assert_int_equal(kmsd_write_outcome(&put, KMS_EEXIST, true), 0);
    /* without an uncertain attempt the key id was someone else's */
    assert_int_equal(kmsd_write_outcome(&put, KMS_EEXIST, false), KMS_EEXIST);
    /* other entries keep EEXIST (an init keyring: "already initialised") */
    assert_int_equal(kmsd_write_outcome(&keyring, KMS_EEXIST, true), KMS_EEXIST);
    assert_int_equal(kmsd_write_outcome(&member, KMS_EEXIST, true), KMS_EEXIST);
    /* other codes are kept, uncertain or not */
    assert_int_equal(kmsd_write_outcome(&put, 0, true), 0);
    assert_int_equal(kmsd_write_outcome(&put, 0, false), 0);
    assert_int_equal(kmsd_write_outcome(&put, KMS_EQUOTA, true), KMS_EQUOTA);
    assert_int_equal(kmsd_write_outcome(&put, KMS_EDENIED, true), KMS_EDENIED);
    assert_int_equal(kmsd_write_outcome(&keyring, KMS_ERANGE, true), KMS_ERANGE);
}

/* ---- kmsd_record_readback -------------------------------------------- */

#define UUID "5f0c7a52-8d6e-4b1a-9c3f-1e2d3c4b5a69"

/* The record store_fixture.h put_record(n, uuid) writes, built again in
 * caller storage (the byte strings point into it). */
struct rec {
    Kmsd__V1__SealedRecord r;
    uint8_t id[16], nonce[12], ct[48];
};

static void rec_like(struct rec *x, unsigned n, const char *uuid)
{
    Kmsd__V1__SealedRecord init = KMSD__V1__SEALED_RECORD__INIT;
    x->r = init;
    key_id(x->id, n);
    memset(x->nonce, (int)n, sizeof(x->nonce));
    memset(x->ct, 0xc7, sizeof(x->ct));
    x->r.version = 1;
    x->r.key_id.data = x->id;
    x->r.key_id.len = 16;
    x->r.node_uuid = (char *)uuid;
    x->r.term = 1;
    x->r.nonce.data = x->nonce;
    x->r.nonce.len = 12;
    x->r.ciphertext.data = x->ct;
    x->r.ciphertext.len = sizeof(x->ct);
    x->r.created_at = 1000 + n;
}

static int put_rec(struct kms_store *s, uint64_t index, const struct rec *x)
{
    Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    pr.record = (Kmsd__V1__SealedRecord *)&x->r;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
    e.put_record = &pr;
    return apply_code(s, index, &e, NULL);
}

/* readback of x: its code, the failure counter's increase, the message */
static int readback(struct daemon_fx *f, const struct rec *x, unsigned long long *failed,
                    struct kms_err *err)
{
    unsigned long long before = f->d->metrics.seal_readback_failures;
    int rc;
    kms_err_clear(err);
    rc = kmsd_record_readback(f->d, &x->r, err);
    *failed = f->d->metrics.seal_readback_failures - before;
    return rc;
}

static void assert_readback_refused(struct daemon_fx *f, const struct rec *x, const char *reason)
{
    unsigned long long failed = 0;
    struct kms_err why;
    assert_int_equal(readback(f, x, &failed, &why), KMS_EUNAVAIL);
    assert_int_equal(failed, 1);
    if (strstr(why.msg, reason) == NULL) {
        fail_msg("readback refused with \"%s\", expected \"%s\"", why.msg, reason);
    }
}

static void test_readback(void **state)
{
    struct daemon_fx *f = *state;
    struct rec mine, x;
    unsigned long long failed = 9;
    struct kms_err why;

    rec_like(&mine, 7, UUID);
    assert_int_equal(put_rec(f->d->store, ++f->index, &mine), 0);
    /* exactly as sealed: 0, nothing counted */
    assert_int_equal(readback(f, &mine, &failed, &why), 0);
    assert_int_equal(failed, 0);
    /* created_at and version are not compared */
    x = mine;
    x.r.created_at = 5;
    assert_int_equal(readback(f, &x, &failed, &why), 0);

    /* absent */
    rec_like(&x, 8, UUID);
    assert_readback_refused(f, &x, "record absent from the applied state");
    /* each compared field, one byte or value off */
#define OFF(stmt)                                                             \
    do {                                                                      \
        rec_like(&x, 7, UUID);                                                \
        stmt;                                                                 \
        assert_readback_refused(f, &x, "stored record differs from the one sealed"); \
    } while (0)
    OFF(x.ct[47] ^= 1);
    OFF(x.ct[0] ^= 0x80);
    OFF(x.r.ciphertext.len = 47);
    OFF(x.nonce[11] ^= 1);
    OFF(x.r.nonce.len = 11);
    OFF(x.r.term = 2);
    OFF(x.r.node_uuid = (char *)"5f0c7a52-8d6e-4b1a-9c3f-1e2d3c4b5a6a");
    OFF(x.r.node_uuid = (char *)"5F0C7A52-8D6E-4B1A-9C3F-1E2D3C4B5A69"); /* byte for byte */
    OFF(x.r.node_uuid = NULL);
#undef OFF
    /* a key id that is not 16 bytes is not looked up */
    rec_like(&x, 7, UUID);
    x.r.key_id.len = 15;
    assert_readback_refused(f, &x, "bad key id");
    x.r.key_id.len = 0;
    assert_readback_refused(f, &x, "bad key id");
    /* the refusals above did not change the stored record */
    assert_int_equal(readback(f, &mine, &failed, &why), 0);
}

/* A retried Seal, as kmsd_write and the Seal handler decide it: the store
 * answers EEXIST for a key id already present; after an uncertain attempt
 * that is success, and the read-back then accepts only our own bytes. */
static void test_retry_eexist(void **state)
{
    struct daemon_fx *f = *state;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
    struct rec mine, theirs;
    unsigned long long failed;
    struct kms_err why;
    int code;

    rec_like(&mine, 11, UUID);
    e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
    e.put_record = &pr;
    pr.record = &mine.r;

    /* the first attempt committed, its answer was lost (EUNAVAIL): the
     * retry is refused EEXIST by the store, reported as success, and the
     * record reads back as ours */
    assert_int_equal(put_rec(f->d->store, ++f->index, &mine), 0);
    assert_int_equal(kmsd_write_next(KMS_EUNAVAIL, 0, SELF, true), KMSD_WRITE_RETRY_UNCERTAIN);
    code = put_rec(f->d->store, ++f->index, &mine);
    assert_int_equal(code, KMS_EEXIST);
    assert_int_equal(kmsd_write_outcome(&e, code, true), 0);
    assert_int_equal(readback(f, &mine, &failed, &why), 0);
    assert_int_equal(failed, 0);

    /* the key id is held by another record (a conflict): after an uncertain
     * attempt EEXIST still reads as success, and the read-back catches it */
    rec_like(&theirs, 12, UUID);
    theirs.ct[3] ^= 0x55;
    assert_int_equal(put_rec(f->d->store, ++f->index, &theirs), 0);
    rec_like(&mine, 12, UUID);
    pr.record = &mine.r;
    code = put_rec(f->d->store, ++f->index, &mine);
    assert_int_equal(code, KMS_EEXIST);
    assert_int_equal(kmsd_write_outcome(&e, code, true), 0);
    assert_readback_refused(f, &mine, "stored record differs from the one sealed");
    /* without an uncertain attempt the conflict is the write's result */
    assert_int_equal(kmsd_write_outcome(&e, code, false), KMS_EEXIST);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_next_applied),
        cmocka_unit_test(test_next_not_leader),
        cmocka_unit_test(test_next_retry_and_fail),
        cmocka_unit_test(test_outcome),
        cmocka_unit_test_setup_teardown(test_readback, daemon_fx_setup, daemon_fx_teardown),
        cmocka_unit_test_setup_teardown(test_retry_eexist, daemon_fx_setup, daemon_fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
