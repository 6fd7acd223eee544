/*
 * Peer unseal wrap (src/crypto/peer_wrap.c, kms_peer_wrap.h): round trip,
 * the binding (cluster id, requester id, peer id), tampering, a wrong key
 * pair, malformed lengths, low-order public keys, fresh keys and nonces
 * per wrap, and the gate reopen proof.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "kms_crypto.h"
#include "kms_peer_wrap.h"

static const uint8_t cid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

struct wrapped {
    uint8_t peer_pub[KMS_PEER_PUB_LEN], nonce[KMS_PEER_NONCE_LEN], ct[KMS_PEER_WRAP_LEN];
};

static void make(const uint8_t pub[32], const struct kms_peer_binding *b, const uint8_t root[32],
                 struct wrapped *w)
{
    struct kms_err err;
    kms_err_clear(&err);
    assert_int_equal(kms_peer_wrap(pub, b, root, w->peer_pub, w->nonce, w->ct, &err), 0);
}

static int open_w(const struct kms_peer_eph *eph, const struct kms_peer_binding *b,
                  const struct wrapped *w, uint8_t out[32])
{
    struct kms_err err;
    kms_err_clear(&err);
    return kms_peer_unwrap(eph, w->peer_pub, sizeof(w->peer_pub), b, w->nonce, sizeof(w->nonce),
                           w->ct, sizeof(w->ct), out, &err);
}

static void test_roundtrip(void **state)
{
    struct kms_peer_eph *eph = NULL;
    uint8_t pub[32], root[32], out[32];
    struct kms_peer_binding b = {cid, 3, 1};
    struct wrapped w;
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    assert_int_equal(kms_rand_bytes(root, sizeof(root), &err), 0);
    assert_int_equal(kms_peer_eph_new(&eph, pub, &err), 0);
    make(pub, &b, root, &w);
    /* the key itself never travels in the clear */
    assert_memory_not_equal(w.ct, root, 32);
    assert_int_equal(open_w(eph, &b, &w, out), 0);
    assert_memory_equal(out, root, 32);
    kms_peer_eph_free(eph);
}

static void test_binding(void **state)
{
    struct kms_peer_eph *eph = NULL;
    uint8_t pub[32], root[32], out[32], other_cid[16];
    struct kms_peer_binding b = {cid, 3, 1}, x;
    struct wrapped w;
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    memset(root, 0x5a, sizeof(root));
    assert_int_equal(kms_peer_eph_new(&eph, pub, &err), 0);
    make(pub, &b, root, &w);
    memcpy(other_cid, cid, 16);
    other_cid[15] ^= 1;
    x = b;
    x.cluster_id = other_cid;
    assert_int_equal(open_w(eph, &x, &w, out), KMS_EAUTH);
    x = b;
    x.requester_id = 2;
    assert_int_equal(open_w(eph, &x, &w, out), KMS_EAUTH);
    x = b;
    x.peer_id = 2;
    assert_int_equal(open_w(eph, &x, &w, out), KMS_EAUTH);
    x = b; /* requester and peer swapped */
    x.requester_id = 1;
    x.peer_id = 3;
    assert_int_equal(open_w(eph, &x, &w, out), KMS_EAUTH);
    assert_int_equal(open_w(eph, &b, &w, out), 0);
    kms_peer_eph_free(eph);
}

static void test_tamper_and_wrong_key(void **state)
{
    struct kms_peer_eph *eph = NULL, *other = NULL;
    uint8_t pub[32], pub2[32], root[32], out[32];
    struct kms_peer_binding b = {cid, 7, 9};
    struct wrapped w, t;
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    memset(root, 0xa5, sizeof(root));
    assert_int_equal(kms_peer_eph_new(&eph, pub, &err), 0);
    assert_int_equal(kms_peer_eph_new(&other, pub2, &err), 0);
    assert_memory_not_equal(pub, pub2, 32);
    make(pub, &b, root, &w);
    /* every single-bit flip of ciphertext, tag or nonce is caught */
    for (size_t i = 0; i < sizeof(w.ct) * 8; i += 7) {
        t = w;
        t.ct[i / 8] ^= (uint8_t)(1u << (i % 8));
        assert_int_equal(open_w(eph, &b, &t, out), KMS_EAUTH);
    }
    for (size_t i = 0; i < sizeof(w.nonce); i++) {
        t = w;
        t.nonce[i] ^= 0x80;
        assert_int_equal(open_w(eph, &b, &t, out), KMS_EAUTH);
    }
    /* another peer key: a different shared secret */
    t = w;
    t.peer_pub[0] ^= 0x01;
    assert_int_not_equal(open_w(eph, &b, &t, out), 0);
    /* a key pair the wrap was not made for (an eavesdropper's) */
    assert_int_equal(open_w(other, &b, &w, out), KMS_EAUTH);
    kms_peer_eph_free(eph);
    kms_peer_eph_free(other);
}

static void test_fresh_per_wrap(void **state)
{
    struct kms_peer_eph *eph = NULL;
    uint8_t pub[32], root[32], out[32];
    struct kms_peer_binding b = {cid, 2, 1};
    struct wrapped a, c;
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    memset(root, 0x11, sizeof(root));
    assert_int_equal(kms_peer_eph_new(&eph, pub, &err), 0);
    make(pub, &b, root, &a);
    make(pub, &b, root, &c);
    assert_memory_not_equal(a.peer_pub, c.peer_pub, 32);
    assert_memory_not_equal(a.nonce, c.nonce, 12);
    assert_memory_not_equal(a.ct, c.ct, sizeof(a.ct));
    assert_int_equal(open_w(eph, &b, &a, out), 0);
    assert_int_equal(open_w(eph, &b, &c, out), 0);
    assert_memory_equal(out, root, 32);
    kms_peer_eph_free(eph);
}

static void test_malformed(void **state)
{
    struct kms_peer_eph *eph = NULL;
    uint8_t pub[32], root[32], out[32], zero[32] = {0};
    uint8_t pp[32], nonce[12], ct[48];
    struct kms_peer_binding b = {cid, 2, 1};
    struct wrapped w;
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    memset(root, 0x22, sizeof(root));
    assert_int_equal(kms_peer_eph_new(&eph, pub, &err), 0);
    make(pub, &b, root, &w);
    assert_int_equal(kms_peer_unwrap(eph, w.peer_pub, 31, &b, w.nonce, 12, w.ct, 48, out, &err),
                     KMS_EFORMAT);
    assert_int_equal(kms_peer_unwrap(eph, w.peer_pub, 32, &b, w.nonce, 11, w.ct, 48, out, &err),
                     KMS_EFORMAT);
    assert_int_equal(kms_peer_unwrap(eph, w.peer_pub, 32, &b, w.nonce, 12, w.ct, 47, out, &err),
                     KMS_EFORMAT);
    assert_int_equal(kms_peer_unwrap(eph, NULL, 32, &b, w.nonce, 12, w.ct, 48, out, &err),
                     KMS_EFORMAT);
    assert_int_equal(kms_peer_unwrap(NULL, w.peer_pub, 32, &b, w.nonce, 12, w.ct, 48, out, &err),
                     KMS_EINVAL);
    /* a low-order requester key (all zero: the shared secret would be zero) is refused */
    assert_int_equal(kms_peer_wrap(zero, &b, root, pp, nonce, ct, &err), KMS_EFORMAT);
    /* and so is a low-order peer key on the requesting side */
    assert_int_equal(kms_peer_unwrap(eph, zero, 32, &b, w.nonce, 12, w.ct, 48, out, &err),
                     KMS_EFORMAT);
    kms_peer_eph_free(eph);
}

static void test_reopen_proof(void **state)
{
    uint8_t r1[32], r2[32], p1[32], p2[32], p3[32], other_cid[16];
    struct kms_err err;
    (void)state;

    kms_err_clear(&err);
    memset(r1, 1, sizeof(r1));
    memset(r2, 2, sizeof(r2));
    memcpy(other_cid, cid, 16);
    other_cid[0] ^= 0xff;
    assert_int_equal(kms_peer_reopen_proof(r1, cid, 5, p1, &err), 0);
    assert_int_equal(kms_peer_reopen_proof(r1, cid, 5, p2, &err), 0);
    assert_memory_equal(p1, p2, 32); /* deterministic: every peer recomputes it */
    assert_int_equal(kms_peer_reopen_proof(r1, cid, 6, p3, &err), 0);
    assert_memory_not_equal(p1, p3, 32); /* bound to the generation */
    assert_int_equal(kms_peer_reopen_proof(r2, cid, 5, p3, &err), 0);
    assert_memory_not_equal(p1, p3, 32); /* needs R */
    assert_int_equal(kms_peer_reopen_proof(r1, other_cid, 5, p3, &err), 0);
    assert_memory_not_equal(p1, p3, 32); /* bound to the cluster */
}

int main(void)
{
    struct kms_err err;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),          cmocka_unit_test(test_binding),
        cmocka_unit_test(test_tamper_and_wrong_key), cmocka_unit_test(test_fresh_per_wrap),
        cmocka_unit_test(test_malformed),          cmocka_unit_test(test_reopen_proof),
    };
    kms_err_clear(&err);
    if (kms_crypto_init(&err) != 0) {
        return 1;
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
