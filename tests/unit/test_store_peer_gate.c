/*
 * The peer unseal gate in the store (SetPeerUnsealGate entries,
 * kms_store_peer_gate_get): absent until closed; close bumps the
 * generation; a reopen needs the current generation of a closed gate and a
 * 32-byte proof, else it is an op result (ERANGE) that changes nothing;
 * the state survives a reopen of the store and is the same on replay.
 */
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

#include "kms_store.h"

#include "store_fixture.h"

static int gate_op(struct kms_store *s, uint64_t index, bool close, uint64_t gen,
                   size_t prooflen)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__SetPeerUnsealGate g = KMSD__V1__SET_PEER_UNSEAL_GATE__INIT;
    uint8_t proof[40];
    memset(proof, 0x77, sizeof(proof));
    g.close = close;
    g.generation = gen;
    g.proof.data = proof;
    g.proof.len = prooflen;
    g.at = 1000 + (int64_t)index;
    g.by_node = 2;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE;
    e.set_peer_unseal_gate = &g;
    return apply_code(s, index, &e, NULL);
}

static void expect_gate(struct kms_store *s, bool closed, uint64_t gen)
{
    Kmsd__V1__PeerUnsealGate *g = NULL;
    struct kms_err err;
    kms_err_clear(&err);
    assert_int_equal(kms_store_peer_gate_get(s, &g, &err), 0);
    assert_int_equal(g->closed, closed);
    assert_int_equal(g->generation, gen);
    assert_int_equal(g->by_node, 2);
    if (!closed) {
        assert_int_equal(g->proof.len, 32);
    } else {
        assert_int_equal(g->proof.len, 0);
    }
    kmsd__v1__peer_unseal_gate__free_unpacked(g, NULL);
}

static void test_gate(void **state)
{
    struct dir d;
    struct kms_store *s;
    Kmsd__V1__PeerUnsealGate *g = NULL;
    (void)state;

    dir_make(&d);
    s = open_in(&d, "db");
    assert_int_equal(kms_store_peer_gate_get(s, &g, NULL), KMS_ENOTFOUND);
    assert_null(g);
    /* reopening a gate that was never closed is refused */
    assert_int_equal(gate_op(s, 1, false, 0, 32), KMS_ERANGE);
    assert_int_equal(kms_store_peer_gate_get(s, &g, NULL), KMS_ENOTFOUND);
    assert_int_equal(gate_op(s, 2, true, 0, 0), 0);
    expect_gate(s, true, 1);
    /* wrong generation, bad proof length: refused, nothing changes */
    assert_int_equal(gate_op(s, 3, false, 0, 32), KMS_ERANGE);
    assert_int_equal(gate_op(s, 4, false, 2, 32), KMS_ERANGE);
    assert_int_equal(gate_op(s, 5, false, 1, 31), KMS_ERANGE);
    assert_int_equal(gate_op(s, 6, false, 1, 0), KMS_ERANGE);
    expect_gate(s, true, 1);
    assert_int_equal(gate_op(s, 7, false, 1, 32), 0);
    expect_gate(s, false, 1);
    /* a second reopen of the same generation: already open */
    assert_int_equal(gate_op(s, 8, false, 1, 32), KMS_ERANGE);
    /* close twice: the generation counts closes; a reopen needs the last */
    assert_int_equal(gate_op(s, 9, true, 0, 0), 0);
    assert_int_equal(gate_op(s, 10, true, 0, 0), 0);
    expect_gate(s, true, 3);
    assert_int_equal(gate_op(s, 11, false, 2, 32), KMS_ERANGE);
    expect_gate(s, true, 3);
    kms_store_close(s);
    /* persisted */
    s = open_in(&d, "db");
    expect_gate(s, true, 3);
    assert_int_equal(gate_op(s, 12, false, 3, 32), 0);
    expect_gate(s, false, 3);
    kms_store_close(s);
    dir_remove(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_gate)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
