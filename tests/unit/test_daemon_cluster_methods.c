/*
 * The cluster API's handler table (src/server/daemon/cluster_api.c,
 * kmsd_cluster.h) against its policy table (authz.c, kmsd_authz_method):
 * every handler row has exactly one policy row (a role, a way to run, an
 * audit class) and the reverse, so the trampoline never runs a handler
 * whose caller it did not check; a node certificate reaches exactly what a
 * follower needs; requests that carry shares are wiped.
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rows_match_policy),
        cmocka_unit_test(test_audit_class),
        cmocka_unit_test(test_node_rows),
        cmocka_unit_test(test_shares_wiped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
