/*
 * The cluster API's authorisation (src/server/daemon/authz.c, compiled into
 * this test: it is private to kmsd): node certificate names, the method
 * policy table, which entries a node may forward, the leader's checks of a
 * forwarded record and of a keyring it proposes; and the forward client's
 * server-identity check (kms_rpc_peer_cn_check, rpc_client.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "../../src/server/daemon/authz.c"

/* ---- helpers --------------------------------------------------------- */

/* A self-signed certificate whose subject has the given CN entries
 * (n may be 0), as a malloc'd PEM string. */
static char *cert_pem(const char *const *cns, size_t n)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL, *out;
    long len;

    assert_non_null(key);
    assert_non_null(x);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"kmsd", -1, -1,
                               0);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                                    (const unsigned char *)cns[i], -1, -1, 0),
                         1);
    }
    X509_set_subject_name(x, name);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, key);
    assert_true(X509_sign(x, key, EVP_sha256()) > 0);
    PEM_write_bio_X509(bio, x);
    len = BIO_get_mem_data(bio, &data);
    out = calloc(1, (size_t)len + 1);
    memcpy(out, data, (size_t)len);
    BIO_free(bio);
    X509_NAME_free(name);
    X509_free(x);
    EVP_PKEY_free(key);
    return out;
}

/* A CN with an embedded NUL: "kmsd-node-1\0evil". */
static char *cert_pem_nul_cn(void)
{
    static const unsigned char cn[] = {'k', 'm', 's', 'd', '-', 'n', 'o', 'd', 'e', '-', '1',
                                       0,   'x', 'x'};
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL, *out;
    long len;

    X509_set_version(x, 2);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_NAME_add_entry_by_txt(name, "CN", V_ASN1_UTF8STRING, cn, (int)sizeof(cn), -1, 0);
    X509_set_subject_name(x, name);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, key);
    X509_sign(x, key, EVP_sha256());
    PEM_write_bio_X509(bio, x);
    len = BIO_get_mem_data(bio, &data);
    out = calloc(1, (size_t)len + 1);
    memcpy(out, data, (size_t)len);
    BIO_free(bio);
    X509_NAME_free(name);
    X509_free(x);
    EVP_PKEY_free(key);
    return out;
}

/* ---- names ----------------------------------------------------------- */

static void test_node_cn_parse(void **state)
{
    static const char *const bad[] = {
        "", "kmsd-node-", "kmsd-node-0", "kmsd-node-01", "kmsd-node-1 ", " kmsd-node-1",
        "kmsd-node-+1", "kmsd-node--1", "kmsd-node-1a", "kmsd-node-evil", "KMSD-NODE-1",
        "kmsd-node1", "xkmsd-node-1", "kmsd-node-18446744073709551616",
        "kmsd-node-100000000000000000000", "kmsd-node-1,CN=kmsd-node-2", "kmsctl-operator",
    };
    uint64_t id = 7;
    (void)state;

    assert_int_equal(kmsd_authz_node_cn_parse("kmsd-node-1", &id), 0);
    assert_int_equal(id, 1);
    assert_int_equal(kmsd_authz_node_cn_parse("kmsd-node-42", &id), 0);
    assert_int_equal(id, 42);
    assert_int_equal(kmsd_authz_node_cn_parse("kmsd-node-18446744073709551615", &id), 0);
    assert_true(id == UINT64_MAX);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        id = 7;
        assert_int_equal(kmsd_authz_node_cn_parse(bad[i], &id), KMS_EDENIED);
        assert_int_equal(id, 7); /* untouched on refusal */
    }
    assert_int_equal(kmsd_authz_node_cn_parse(NULL, &id), KMS_EDENIED);
}

static void test_pem_node_id_and_peer_cn(void **state)
{
    static const char *const one[] = {"kmsd-node-3"};
    static const char *const two[] = {"kmsd-node-3", "kmsd-node-4"};
    static const char *const same_twice[] = {"kmsd-node-3", "kmsd-node-3"};
    static const char *const evil[] = {"kmsd-node-evil"};
    char *p_one = cert_pem(one, 1), *p_two = cert_pem(two, 2);
    char *p_twice = cert_pem(same_twice, 2), *p_none = cert_pem(NULL, 0);
    char *p_evil = cert_pem(evil, 1), *p_nul = cert_pem_nul_cn();
    struct kms_err err;
    uint64_t id = 0;
    (void)state;

    assert_int_equal(kmsd_authz_pem_node_id(p_one, &id), 0);
    assert_int_equal(id, 3);
    assert_int_equal(kmsd_authz_pem_node_id(p_two, &id), KMS_EDENIED);
    assert_int_equal(kmsd_authz_pem_node_id(p_twice, &id), KMS_EDENIED);
    assert_int_equal(kmsd_authz_pem_node_id(p_none, &id), KMS_EDENIED);
    assert_int_equal(kmsd_authz_pem_node_id(p_evil, &id), KMS_EDENIED);
    assert_int_equal(kmsd_authz_pem_node_id(p_nul, &id), KMS_EDENIED);
    assert_int_equal(kmsd_authz_pem_node_id("not a certificate", &id), KMS_EFORMAT);
    assert_int_equal(kmsd_authz_pem_node_id(NULL, &id), KMS_EFORMAT);

    /* The forward client's check of the leader's server certificate. */
    kms_err_clear(&err);
    assert_int_equal(kms_rpc_peer_cn_check(p_one, "kmsd-node-3", &err), 0);
    assert_int_equal(kms_rpc_peer_cn_check(p_one, "kmsd-node-1", &err), KMS_EDENIED);
    assert_non_null(strstr(err.msg, "kmsd-node-3"));
    assert_int_equal(kms_rpc_peer_cn_check(p_one, "kmsd-node-", &err), KMS_EDENIED);
    assert_int_equal(kms_rpc_peer_cn_check(p_two, "kmsd-node-3", &err), KMS_EDENIED);
    assert_int_equal(kms_rpc_peer_cn_check(p_twice, "kmsd-node-3", &err), KMS_EDENIED);
    assert_int_equal(kms_rpc_peer_cn_check(p_none, "kmsd-node-3", &err), KMS_EDENIED);
    assert_int_equal(kms_rpc_peer_cn_check(p_nul, "kmsd-node-1", &err), KMS_EDENIED);
    assert_int_equal(kms_rpc_peer_cn_check("garbage", "kmsd-node-3", &err), KMS_EFORMAT);
    assert_int_equal(kms_rpc_peer_cn_check(NULL, "kmsd-node-3", &err), KMS_EFORMAT);
    free(p_one);
    free(p_two);
    free(p_twice);
    free(p_none);
    free(p_evil);
    free(p_nul);
}

/* ---- the method table ------------------------------------------------ */

static void test_method_table(void **state)
{
    static const char *const writes[] = {
        "/kmsd.v1.Operator/Initialize",    "/kmsd.v1.Operator/Rotate",
        "/kmsd.v1.Operator/KeysRevoke",    "/kmsd.v1.Operator/MembersAdd",
        "/kmsd.v1.Operator/MembersRemove", "/kmsd.v1.Operator/StepDown",
        "/kmsd.v1.Operator/TransferLeader", "/kmsd.v1.Operator/SealMigrate",
        "/kmsd.v1.Operator/RekeyInit",     "/kmsd.v1.Operator/RekeyStatus",
        "/kmsd.v1.Operator/RekeyUpdate",   "/kmsd.v1.Operator/RekeyCancel",
        "/kmsd.v1.Operator/Rewrap",        "/kmsd.v1.Operator/RetireTerm",
    };
    static const char *const local[] = {
        "/kmsd.v1.Operator/Status",      "/kmsd.v1.Operator/Unseal",
        "/kmsd.v1.Operator/Seal",        "/kmsd.v1.Operator/MembersList",
        "/kmsd.v1.Operator/KeysList",    "/kmsd.v1.Operator/KeysShow",
        "/kmsd.v1.Operator/SnapshotBegin", "/kmsd.v1.Operator/SnapshotChunk",
        "/kmsd.v1.Operator/SnapshotEnd",
    };
    static const char *const k8s[] = {
        "/kmsd.v1.KubernetesKms/Status", "/kmsd.v1.KubernetesKms/Encrypt",
        "/kmsd.v1.KubernetesKms/Decrypt",
    };
    size_t n = 0;
    const struct kmsd_method_policy *t = kmsd_authz_methods(&n);
    const struct kmsd_method_policy *fwd;
    unsigned node_rows = 0, k8s_rows = 0;
    (void)state;

    assert_int_equal(n, 2 + sizeof(writes) / sizeof(writes[0]) +
                            sizeof(local) / sizeof(local[0]) + sizeof(k8s) / sizeof(k8s[0]));
    assert_true(n <= KMSD_OP_METHODS);
    for (size_t i = 0; i < n; i++) {
        unsigned auth = t[i].flags & (KMSD_AUTH_NODE | KMSD_AUTH_OPERATOR | KMSD_AUTH_K8S);
        /* exactly one identity per method */
        assert_true(auth == KMSD_AUTH_NODE || auth == KMSD_AUTH_OPERATOR ||
                    auth == KMSD_AUTH_K8S);
        if (auth == KMSD_AUTH_K8S) {
            /* the plugin role reaches its own service only, and nothing else does */
            assert_int_equal(strncmp(t[i].path, "/kmsd.v1.KubernetesKms/", 23), 0);
            assert_int_equal(t[i].flags, KMSD_AUTH_K8S);
            k8s_rows++;
        } else {
            assert_int_not_equal(strncmp(t[i].path, "/kmsd.v1.KubernetesKms/", 23), 0);
        }
        for (size_t j = i + 1; j < n; j++) {
            assert_string_not_equal(t[i].path, t[j].path);
        }
        assert_ptr_equal(kmsd_authz_method(t[i].path), &t[i]);
        if (auth == KMSD_AUTH_NODE) {
            node_rows++;
        }
        if (strncmp(t[i].path, "/kmsd.v1.Operator/", 18) == 0) {
            assert_int_equal(auth, KMSD_AUTH_OPERATOR);
            assert_true(t[i].flags & KMSD_RUN_PARK);
        }
    }
    /* a node certificate reaches two methods only: Forward and PeerUnseal */
    assert_int_equal(node_rows, 2);
    assert_int_equal(k8s_rows, sizeof(k8s) / sizeof(k8s[0]));
    for (size_t i = 0; i < sizeof(k8s) / sizeof(k8s[0]); i++) {
        assert_non_null(kmsd_authz_method(k8s[i]));
    }
    fwd = kmsd_authz_method("/kmsd.v1.Cluster/Forward");
    assert_non_null(fwd);
    assert_int_equal(fwd->flags, KMSD_AUTH_NODE);
    fwd = kmsd_authz_method("/kmsd.v1.Cluster/PeerUnseal");
    assert_non_null(fwd);
    assert_int_equal(fwd->flags, KMSD_AUTH_NODE | KMSD_RUN_PARK);
    for (size_t i = 0; i < sizeof(writes) / sizeof(writes[0]); i++) {
        const struct kmsd_method_policy *m = kmsd_authz_method(writes[i]);
        assert_non_null(m);
        assert_true(m->flags & KMSD_RUN_LEADER);
    }
    for (size_t i = 0; i < sizeof(local) / sizeof(local[0]); i++) {
        const struct kmsd_method_policy *m = kmsd_authz_method(local[i]);
        assert_non_null(m);
        assert_false(m->flags & KMSD_RUN_LEADER);
    }
    /* unknown methods have no row: the dispatcher cannot register them */
    assert_null(kmsd_authz_method("/kmsd.v1.Cluster/Propose"));
    assert_null(kmsd_authz_method("/kmsd.v1.Operator/status"));
    assert_null(kmsd_authz_method("/kmsd.v1.Operator/Status/"));
    assert_null(kmsd_authz_method(""));
    assert_null(kmsd_authz_method(NULL));
}

static void test_k8s_cn(void **state)
{
    static const char *const good[] = {"kmsd-k8s-plugin", "kmsd-k8s-a", "kmsd-k8s-cp1.prod-eu"};
    static const char *const bad[] = {
        NULL, "", "kmsd-k8s-", "kmsd-k8s", "kmsd-node-1", "kmsctl-operator", "Kmsd-k8s-x",
        "kmsd-k8s-Plugin", "kmsd-k8s-a b", "kmsd-k8s-a/b", " kmsd-k8s-a",
        "kmsd-k8s-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", /* 65 */
    };
    (void)state;
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_true(kmsd_authz_k8s_cn_valid(good[i]));
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_false(kmsd_authz_k8s_cn_valid(bad[i]));
    }
}

static void test_entry_forwardable(void **state)
{
    static const int others[] = {
        KMSD__V1__ENTRY__OP__NOT_SET,       KMSD__V1__ENTRY__OP_REVOKE_KEY,
        KMSD__V1__ENTRY__OP_REVOKE_NODE,    KMSD__V1__ENTRY__OP_PUT_KEYRING,
        KMSD__V1__ENTRY__OP_PUT_MEMBER,     KMSD__V1__ENTRY__OP_REMOVE_MEMBER,
        KMSD__V1__ENTRY__OP_NOOP,           KMSD__V1__ENTRY__OP_REWRAP_BATCH,
        KMSD__V1__ENTRY__OP_RETIRE_TERM,
    };
    (void)state;
    /* Seals, and each follower's batched last-access times (touch.c). */
    assert_true(kmsd_authz_entry_forwardable(KMSD__V1__ENTRY__OP_PUT_RECORD));
    assert_true(kmsd_authz_entry_forwardable(KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE));
    assert_true(kmsd_authz_entry_forwardable(KMSD__V1__ENTRY__OP_TOUCH_BATCH));
    for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++) {
        assert_false(kmsd_authz_entry_forwardable(others[i]));
    }
    for (int op = 0; op < 64; op++) {
        assert_true(kmsd_authz_entry_forwardable(op) ==
                    (op == KMSD__V1__ENTRY__OP_PUT_RECORD ||
                     op == KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE ||
                     op == KMSD__V1__ENTRY__OP_TOUCH_BATCH));
    }
}

static void test_touch_check(void **state)
{
    uint8_t id[16] = {1};
    Kmsd__V1__Touch t[3], *p[3];
    Kmsd__V1__TouchBatch tb = KMSD__V1__TOUCH_BATCH__INIT;
    const int64_t now = 1700000000000;
    struct kms_err err;
    (void)state;

    for (int i = 0; i < 3; i++) {
        kmsd__v1__touch__init(&t[i]);
        t[i].key_id.data = id;
        t[i].key_id.len = 16;
        t[i].at = now - 1000;
        p[i] = &t[i];
    }
    tb.touches = p;
    tb.n_touches = 3;
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), 0);
    assert_int_equal(kmsd_authz_touch_check(&tb, 2, now, &err), KMS_EFORMAT); /* too many */
    tb.n_touches = 0;
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), KMS_EFORMAT); /* empty */
    tb.n_touches = 3;
    t[1].key_id.len = 15;
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), KMS_EFORMAT);
    t[1].key_id.len = 16;
    t[2].at = now + 3600000; /* from the future */
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), KMS_EFORMAT);
    t[2].at = 0;
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), KMS_EFORMAT);
    t[2].at = now - 26 * 3600000LL; /* older than any interval allows */
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), KMS_EFORMAT);
    t[2].at = now - 24 * 3600000LL;
    assert_int_equal(kmsd_authz_touch_check(&tb, 3, now, &err), 0);
    assert_int_equal(kmsd_authz_touch_check(NULL, 3, now, &err), KMS_EFORMAT);
}

/* ---- a forwarded record ---------------------------------------------- */

static uint8_t g_kid[16], g_nonce[12], g_ct[48];

static void good_record(Kmsd__V1__SealedRecord *r)
{
    kmsd__v1__sealed_record__init(r);
    memset(g_kid, 0x11, sizeof(g_kid));
    memset(g_nonce, 0x22, sizeof(g_nonce));
    memset(g_ct, 0x33, sizeof(g_ct));
    r->version = 1;
    r->key_id.data = g_kid;
    r->key_id.len = sizeof(g_kid);
    r->node_uuid = (char *)"4c4c4544-0032-3510-8047-b4c04f4b4c32";
    r->term = 2;
    r->nonce.data = g_nonce;
    r->nonce.len = sizeof(g_nonce);
    r->ciphertext.data = g_ct;
    r->ciphertext.len = sizeof(g_ct);
    r->created_at = 1700000000000;
}

static void test_record_check(void **state)
{
    Kmsd__V1__SealedRecord r;
    struct kms_err err;
    char longuuid[200];
    uint8_t big[200];
    (void)state;

    kms_err_clear(&err);
    good_record(&r);
    assert_int_equal(kmsd_authz_record_check(&r, 2, &err), 0);
    assert_int_equal(kmsd_authz_record_check(&r, 5, &err), 0);
    r.ciphertext.len = 32; /* 16-byte passphrase + tag */
    assert_int_equal(kmsd_authz_record_check(&r, 2, &err), 0);

#define REFUSED(mutate)                                                                    \
    do {                                                                                   \
        good_record(&r);                                                                   \
        mutate;                                                                            \
        kms_err_clear(&err);                                                               \
        assert_int_equal(kmsd_authz_record_check(&r, 2, &err), KMS_EFORMAT);               \
        assert_true(err.msg[0] != '\0');                                                   \
    } while (0)
    REFUSED(r.version = 2);
    REFUSED(r.key_id.len = 15);
    REFUSED(r.key_id.len = 0);
    REFUSED(r.nonce.len = 11);
    REFUSED(r.nonce.len = 16);
    REFUSED(r.ciphertext.len = 31);
    REFUSED((r.ciphertext.data = big, r.ciphertext.len = 81));
    REFUSED(r.node_uuid = (char *)"");
    REFUSED(r.node_uuid = (char *)"has space");
    REFUSED(r.node_uuid = (char *)"tab\there");
    REFUSED(r.node_uuid = (char *)"caf\xc3\xa9");
    REFUSED((memset(longuuid, 'a', sizeof(longuuid) - 1), longuuid[sizeof(longuuid) - 1] = 0,
             r.node_uuid = longuuid));
    REFUSED(r.term = 0);
    REFUSED(r.term = 3); /* keyring has 1..2 */
    REFUSED(r.revoked_at = 1);
    REFUSED(r.last_access_at = 1);
    REFUSED(r.created_at = -1);
    REFUSED((r.source_ip.data = big, r.source_ip.len = 5));
#undef REFUSED
    /* no keyring yet: nothing can be sealed */
    good_record(&r);
    assert_int_equal(kmsd_authz_record_check(&r, 0, &err), KMS_EFORMAT);
    assert_int_equal(kmsd_authz_record_check(NULL, 2, &err), KMS_EINVAL);
}

/* ---- a keyring the leader proposes ----------------------------------- */

static void test_keyring_check(void **state)
{
    static const uint8_t cid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    static const uint8_t cid2[16] = {9};
    struct kms_keyring *k1 = NULL, *k2 = NULL, *other = NULL;
    Kmsd__V1__EncryptedKeyring *e1 = NULL, *e2 = NULL, *e2_wrong = NULL, *e2_shares = NULL;
    Kmsd__V1__EncryptedKeyring *e_other = NULL;
    uint8_t root[32], root2[32];
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    assert_int_equal(kms_crypto_init(&err), 0);
    assert_int_equal(kms_root_key_generate(root, &err), 0);
    assert_int_equal(kms_root_key_generate(root2, &err), 0);
    assert_int_equal(kms_keyring_create(cid, 1000, &k1, &err), 0);
    assert_int_equal(kms_keyring_rotate(k1, 2000, &k2, &err), 0);
    assert_int_equal(kms_keyring_create(cid2, 1000, &other, &err), 0);
    assert_int_equal(kms_keyring_encrypt(k1, root, 5, 3, &e1, &err), 0);
    assert_int_equal(kms_keyring_encrypt(k2, root, 5, 3, &e2, &err), 0);
    assert_int_equal(kms_keyring_encrypt(k2, root2, 5, 3, &e2_wrong, &err), 0);
    assert_int_equal(kms_keyring_encrypt(k2, root, 4, 2, &e2_shares, &err), 0);
    assert_int_equal(kms_keyring_encrypt(other, root, 5, 3, &e_other, &err), 0);

    /* init: the first keyring, under the root that was split */
    assert_int_equal(kmsd_authz_keyring_check(e1, root, NULL, true, &err), 0);
    assert_int_equal(kmsd_authz_keyring_check(e1, root2, NULL, true, &err), KMS_EAUTH);
    assert_int_equal(kmsd_authz_keyring_check(e1, root, e1, true, &err), KMS_EEXIST);
    /* rotation: one more term under the same root, same cluster and split */
    assert_int_equal(kmsd_authz_keyring_check(e2, root, e1, false, &err), 0);
    assert_int_equal(kmsd_authz_keyring_check(e2, root, e2, false, &err), 0);
    assert_int_equal(kmsd_authz_keyring_check(e2, root, NULL, false, &err), KMS_EUNINIT);
    assert_int_equal(kmsd_authz_keyring_check(e2_wrong, root, e1, false, &err), KMS_EAUTH);
    assert_int_equal(kmsd_authz_keyring_check(e1, root, e2, false, &err), KMS_EFORMAT);
    assert_int_equal(kmsd_authz_keyring_check(e2_shares, root, e1, false, &err), KMS_EFORMAT);
    assert_int_equal(kmsd_authz_keyring_check(e_other, root, e1, false, &err), KMS_EFORMAT);
    /* the clear active term must match the sealed one, and not be 0 */
    e2->active_term = 0;
    assert_int_not_equal(kmsd_authz_keyring_check(e2, root, e1, false, &err), 0);
    e2->active_term = 3;
    assert_int_not_equal(kmsd_authz_keyring_check(e2, root, e1, false, &err), 0);
    e2->active_term = 2;
    /* tampered ciphertext */
    e2->ciphertext.data[0] ^= 1;
    assert_int_equal(kmsd_authz_keyring_check(e2, root, e1, false, &err), KMS_EAUTH);
    e2->ciphertext.data[0] ^= 1;
    assert_int_equal(kmsd_authz_keyring_check(e2, root, e1, false, &err), 0);
    assert_int_equal(kmsd_authz_keyring_check(NULL, root, e1, false, &err), KMS_EINVAL);

    kmsd__v1__encrypted_keyring__free_unpacked(e1, NULL);
    kmsd__v1__encrypted_keyring__free_unpacked(e2, NULL);
    kmsd__v1__encrypted_keyring__free_unpacked(e2_wrong, NULL);
    kmsd__v1__encrypted_keyring__free_unpacked(e2_shares, NULL);
    kmsd__v1__encrypted_keyring__free_unpacked(e_other, NULL);
    kms_keyring_unref(k1);
    kms_keyring_unref(k2);
    kms_keyring_unref(other);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_node_cn_parse),
        cmocka_unit_test(test_pem_node_id_and_peer_cn),
        cmocka_unit_test(test_method_table),
        cmocka_unit_test(test_k8s_cn),
        cmocka_unit_test(test_entry_forwardable),
        cmocka_unit_test(test_touch_check),
        cmocka_unit_test(test_record_check),
        cmocka_unit_test(test_keyring_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
