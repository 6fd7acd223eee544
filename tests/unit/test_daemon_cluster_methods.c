/*
 * The cluster API's handler table (src/server/daemon/cluster_api.c,
 * kmsd_cluster.h) against its policy table (authz.c, kmsd_authz_method):
 * every handler row has exactly one policy row (a role, a way to run, an
 * audit class) and the reverse, so the trampoline never runs a handler
 * whose caller it did not check; a node certificate reaches exactly what a
 * follower needs; requests that carry shares are wiped, and the wipe
 * (kmsd_msg_wipe) reaches every string and bytes field, repeated and nested.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_cluster.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"
#include "kmsd/v1/record.pb-c.h"

#define AUTH_MASK (KMSD_AUTH_NODE | KMSD_AUTH_OPERATOR | KMSD_AUTH_K8S)

static void test_rows_match_policy(void **state)
{
    size_t n = 0, npol = 0;
    const struct kmsd_cluster_method *t = kmsd_cluster_methods(&n);
    const struct kmsd_method_policy *pol = kmsd_authz_methods(&npol);
    (void)state;

    /* kmsd_cluster_register refuses a table that does not fit these */
    assert_int_equal(n, npol);
    assert_true(n <= KMSD_OP_METHODS);
    for (size_t i = 0; i < n; i++) {
        const struct kmsd_method_policy *p = kmsd_authz_method(t[i].path);
        unsigned auth;

        assert_non_null(t[i].path);
        assert_non_null(t[i].fn);
        assert_non_null(t[i].op);
        assert_true(t[i].op[0] != '\0');
        /* a role: exactly one identity may call it */
        assert_non_null(p);
        auth = p->flags & AUTH_MASK;
        assert_true(auth == KMSD_AUTH_NODE || auth == KMSD_AUTH_OPERATOR ||
                    auth == KMSD_AUTH_K8S);
        for (size_t j = i + 1; j < n; j++) {
            assert_string_not_equal(t[i].path, t[j].path);
        }
        /* a request type of the method's own package */
        if (t[i].req != NULL) {
            assert_int_equal(t[i].req->magic, PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC);
            assert_string_equal(t[i].req->package_name, "kmsd.v1");
        }
    }
    /* and every policy row has its handler */
    for (size_t i = 0; i < npol; i++) {
        size_t hits = 0;
        for (size_t j = 0; j < n; j++) {
            hits += strcmp(pol[i].path, t[j].path) == 0;
        }
        assert_int_equal(hits, 1);
    }
}

/* The audit class: every operator call gets its audit line after its
 * outcome but SnapshotChunk (one per chunk; Begin and End are audited);
 * node calls are not operator calls (Forward is counted and timed,
 * PeerUnseal writes its own peer-unseal audit line); plugin calls neither. */
static void test_audit_class(void **state)
{
    size_t n = 0;
    const struct kmsd_cluster_method *t = kmsd_cluster_methods(&n);
    unsigned silent = 0;
    (void)state;

    for (size_t i = 0; i < n; i++) {
        const struct kmsd_method_policy *p = kmsd_authz_method(t[i].path);
        if ((p->flags & AUTH_MASK) == KMSD_AUTH_OPERATOR && (p->flags & KMSD_NO_AUDIT)) {
            assert_string_equal(t[i].path, "/kmsd.v1.Operator/SnapshotChunk");
            silent++;
        }
        if ((p->flags & AUTH_MASK) != KMSD_AUTH_OPERATOR) {
            assert_false(p->flags & KMSD_NO_AUDIT);
        }
    }
    assert_int_equal(silent, 1);
}

/* Peers may ask only for what a follower needs: Forward (its Seals, touch
 * batches and the peer unseal gate) and PeerUnseal. */
static void test_node_rows(void **state)
{
    static const char *const follower_needs[] = {
        "/kmsd.v1.Cluster/Forward",
        "/kmsd.v1.Cluster/PeerUnseal",
    };
    size_t n = 0, found = 0;
    const struct kmsd_cluster_method *t = kmsd_cluster_methods(&n);
    (void)state;

    for (size_t i = 0; i < n; i++) {
        const struct kmsd_method_policy *p = kmsd_authz_method(t[i].path);
        bool listed = false;
        for (size_t j = 0; j < sizeof(follower_needs) / sizeof(follower_needs[0]); j++) {
            listed = listed || strcmp(t[i].path, follower_needs[j]) == 0;
        }
        assert_int_equal((p->flags & AUTH_MASK) == KMSD_AUTH_NODE, listed);
        /* nothing a node calls is a leader-only operator write */
        if (listed) {
            assert_false(p->flags & KMSD_RUN_LEADER);
            found++;
        }
    }
    assert_int_equal(found, sizeof(follower_needs) / sizeof(follower_needs[0]));
}

/* A request type with a share field is wiped before it is freed. */
static void test_shares_wiped(void **state)
{
    size_t n = 0, wiped = 0;
    const struct kmsd_cluster_method *t = kmsd_cluster_methods(&n);
    (void)state;

    for (size_t i = 0; i < n; i++) {
        bool share = false;
        if (t[i].req == NULL) {
            continue;
        }
        for (unsigned f = 0; f < t[i].req->n_fields; f++) {
            const char *name = t[i].req->fields[f].name;
            share = share || strcmp(name, "share") == 0 || strcmp(name, "shares") == 0;
        }
        if (share) {
            assert_true(t[i].call_flags & KMSD_CALL_WIPE);
            wiped++;
        }
    }
    assert_int_equal(wiped, 3); /* Unseal, RekeyUpdate, SealMigrate */
}

static bool all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        if (b[i] != 0) {
            return false;
        }
    }
    return true;
}

/* Unpacks what m packs to (the trampoline's copy of a request). */
static ProtobufCMessage *roundtrip(const ProtobufCMessage *m)
{
    uint8_t buf[512];
    size_t n = protobuf_c_message_get_packed_size(m);
    assert_true(n <= sizeof(buf));
    protobuf_c_message_pack(m, buf);
    return protobuf_c_message_unpack(m->descriptor, NULL, n, buf);
}

static void test_msg_wipe(void **state)
{
    char s1[] = "share-one-aaaaaaaa", s2[] = "share-two-bbbbbbbbbbbb";
    char *shares[] = {s1, s2};
    Kmsd__V1__SealMigrateRequest sm = KMSD__V1__SEAL_MIGRATE_REQUEST__INIT;
    Kmsd__V1__SealMigrateRequest *smu;
    uint8_t ct[40], kid[16];
    Kmsd__V1__SealedRecord rec = KMSD__V1__SEALED_RECORD__INIT;
    Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__ForwardRequest fr = KMSD__V1__FORWARD_REQUEST__INIT;
    Kmsd__V1__ForwardRequest *fru;
    const Kmsd__V1__SealedRecord *ru;
    Kmsd__V1__UnsealRequest un = KMSD__V1__UNSEAL_REQUEST__INIT;
    Kmsd__V1__UnsealRequest *unu;
    (void)state;

    /* repeated strings */
    sm.to = "pkcs11";
    sm.shares = shares;
    sm.n_shares = 2;
    smu = (Kmsd__V1__SealMigrateRequest *)roundtrip(&sm.base);
    assert_non_null(smu);
    assert_int_equal(smu->n_shares, 2);
    kmsd_msg_wipe(&smu->base);
    assert_true(all_zero(smu->shares[0], sizeof(s1) - 1));
    assert_true(all_zero(smu->shares[1], sizeof(s2) - 1));
    assert_true(all_zero(smu->to, 6));
    protobuf_c_message_free_unpacked(&smu->base, NULL);

    /* bytes and strings in a message held by the set member of a oneof */
    memset(ct, 0xa5, sizeof(ct));
    memset(kid, 0x5a, sizeof(kid));
    rec.version = 1;
    rec.key_id.data = kid;
    rec.key_id.len = sizeof(kid);
    rec.ciphertext.data = ct;
    rec.ciphertext.len = sizeof(ct);
    rec.node_uuid = "uuid-1";
    pr.record = &rec;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
    e.put_record = &pr;
    fr.entry = &e;
    fr.from_id = 7;
    fru = (Kmsd__V1__ForwardRequest *)roundtrip(&fr.base);
    assert_non_null(fru);
    kmsd_msg_wipe(&fru->base);
    ru = fru->entry->put_record->record;
    assert_int_equal(fru->entry->op_case, KMSD__V1__ENTRY__OP_PUT_RECORD);
    assert_true(all_zero(ru->ciphertext.data, ru->ciphertext.len));
    assert_true(all_zero(ru->key_id.data, ru->key_id.len));
    assert_true(all_zero(ru->node_uuid, 6));
    assert_int_equal(fru->from_id, 7); /* numbers are left alone */
    protobuf_c_message_free_unpacked(&fru->base, NULL);

    /* empty fields: nothing to wipe, nothing written */
    unu = (Kmsd__V1__UnsealRequest *)roundtrip(&un.base);
    assert_non_null(unu);
    kmsd_msg_wipe(&unu->base);
    assert_string_equal(unu->share, "");
    protobuf_c_message_free_unpacked(&unu->base, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_match_policy),
        cmocka_unit_test(test_audit_class),
        cmocka_unit_test(test_node_rows),
        cmocka_unit_test(test_shares_wiped),
        cmocka_unit_test(test_msg_wipe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
