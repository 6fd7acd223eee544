/* Rekey: the root key wrap, the share-gathering session (kms_rekey.h) and
 * the store's RekeyKeyring apply (kms_store.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <raft.h>

#include "kms_crypto.h"
#include "kms_rekey.h"
#include "kms_store.h"
#include "store_fixture.h"

#include "kmsd/v1/entry.pb-c.h"

static int setup(void **state)
{
    (void)state;
    return kms_crypto_init(NULL) == 0 ? 0 : -1;
}

static void rnd(void *p, size_t n)
{
    assert_int_equal(kms_rand_bytes(p, n, NULL), 0);
}

static void test_wrap_round_trip_and_refusals(void **state)
{
    uint8_t r[32], r2[32], other[32], cid[16], cid2[16], out[32];
    uint8_t w[KMS_REKEY_WRAP_LEN], w2[KMS_REKEY_WRAP_LEN];
    struct kms_err err;
    (void)state;
    rnd(r, 32);
    rnd(r2, 32);
    rnd(other, 32);
    rnd(cid, 16);
    memcpy(cid2, cid, 16);
    cid2[0] ^= 1;
    kms_err_clear(&err);
    assert_int_equal(kms_rekey_root_wrap(r, cid, r2, w, &err), 0);
    assert_int_equal(kms_rekey_root_unwrap(r, cid, w, sizeof(w), out, &err), 0);
    assert_memory_equal(out, r2, 32);
    /* R' never appears in the clear in the wrap */
    for (size_t i = 0; i + 32 <= sizeof(w); i++) {
        assert_memory_not_equal(w + i, r2, 32);
    }
    /* two wraps of the same key differ (random nonce) */
    assert_int_equal(kms_rekey_root_wrap(r, cid, r2, w2, &err), 0);
    assert_memory_not_equal(w, w2, sizeof(w));
    /* another root key (e.g. another cluster's shares), another cluster id */
    memset(out, 0xaa, 32);
    assert_int_equal(kms_rekey_root_unwrap(other, cid, w, sizeof(w), out, &err), KMS_EAUTH);
    for (int i = 0; i < 32; i++) {
        assert_int_equal(out[i], 0); /* wiped */
    }
    assert_int_equal(kms_rekey_root_unwrap(r, cid2, w, sizeof(w), out, &err), KMS_EAUTH);
    /* any flipped byte */
    for (size_t i = 0; i < sizeof(w); i++) {
        w[i] ^= 0x40;
        assert_int_equal(kms_rekey_root_unwrap(r, cid, w, sizeof(w), out, &err), KMS_EAUTH);
        w[i] ^= 0x40;
    }
    assert_int_equal(kms_rekey_root_unwrap(r, cid, w, sizeof(w) - 1, out, &err), KMS_EFORMAT);
    assert_int_equal(kms_rekey_root_unwrap(r, cid, NULL, 0, out, &err), KMS_EFORMAT);
}

static void test_params(void **state)
{
    (void)state;
    assert_int_equal(kms_rekey_params_check(4, 2, NULL), 0);
    assert_int_equal(kms_rekey_params_check(255, 255, NULL), 0);
    assert_int_equal(kms_rekey_params_check(1, 1, NULL), KMS_EINVAL); /* no dev 1-of-1 */
    assert_int_equal(kms_rekey_params_check(4, 1, NULL), KMS_EINVAL);
    assert_int_equal(kms_rekey_params_check(3, 4, NULL), KMS_EINVAL);
    assert_int_equal(kms_rekey_params_check(256, 2, NULL), KMS_EINVAL);
    assert_int_equal(kms_rekey_params_check(0, 0, NULL), KMS_EINVAL);
}

/* Splits a fresh 32-byte secret 5/3 into share texts. */
static void split5(uint8_t secret[32], char texts[5][KMS_SHARE_TEXT_MAX])
{
    struct kms_share sh[5];
    rnd(secret, 32);
    assert_int_equal(kms_shamir_split(secret, 32, 5, 3, false, sh, NULL), 0);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kms_share_format(&sh[i], texts[i], KMS_SHARE_TEXT_MAX, NULL), 0);
    }
}

static void test_session(void **state)
{
    static struct kms_rekey_session s; /* big: not on the stack */
    char t[5][KMS_SHARE_TEXT_MAX], o[5][KMS_SHARE_TEXT_MAX];
    char nonce[KMS_REKEY_NONCE_HEX], short_len[KMS_SHARE_TEXT_MAX];
    uint8_t secret[32], osecret[32], root[32];
    struct kms_share sh16[3];
    uint8_t s16[16];
    unsigned p = 99;
    struct kms_err err;
    (void)state;

    split5(secret, t);
    split5(osecret, o);
    memset(&s, 0, sizeof(s));
    kms_err_clear(&err);
    /* nothing started */
    assert_int_equal(kms_rekey_session_add(&s, "00", t[0], 3, &p, &err), KMS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "no rekey in progress"));
    assert_int_equal(kms_rekey_session_combine(&s, 3, root, NULL), KMS_ETOOFEW);
    /* bad parameters start nothing */
    assert_int_equal(kms_rekey_session_begin(&s, 4, 1, 1, 7, NULL), KMS_EINVAL);
    assert_false(s.active);
    assert_int_equal(kms_rekey_session_begin(&s, 4, 2, 1000, 7, &err), 0);
    assert_true(s.active);
    assert_int_equal(strlen(s.nonce), 32);
    assert_int_equal(s.tag, 7);
    memcpy(nonce, s.nonce, sizeof(nonce));
    /* a second begin is refused, the first rekey unchanged */
    assert_int_equal(kms_rekey_session_begin(&s, 5, 3, 2000, 8, &err), KMS_EEXIST);
    assert_non_null(strstr(err.msg, nonce));
    assert_string_equal(s.nonce, nonce);
    assert_int_equal(s.new_shares, 4);
    /* wrong nonces */
    assert_int_equal(kms_rekey_session_add(&s, "ffffffffffffffffffffffffffffffff", t[0], 3, &p,
                                           &err),
                     KMS_EINVAL);
    assert_int_equal(kms_rekey_session_add(&s, NULL, t[0], 3, &p, &err), KMS_EINVAL);
    assert_int_equal(kms_rekey_session_add(&s, "", t[0], 3, &p, &err), KMS_EINVAL);
    assert_int_equal(s.n_given, 0);
    /* a typo (checksum) and an empty share */
    memcpy(short_len, t[0], sizeof(short_len));
    short_len[10] = short_len[10] == 'a' ? 'b' : 'a';
    assert_int_equal(kms_rekey_session_add(&s, nonce, short_len, 3, &p, &err), KMS_ECHECKSUM);
    assert_int_equal(kms_rekey_session_add(&s, nonce, "", 3, &p, &err), KMS_EINVAL);
    /* progress, duplicates, mixed lengths */
    assert_int_equal(kms_rekey_session_add(&s, nonce, t[0], 3, &p, &err), 0);
    assert_int_equal(p, 1);
    assert_int_equal(kms_rekey_session_add(&s, nonce, t[0], 3, &p, &err), KMS_EDUP);
    assert_int_equal(p, 1);
    rnd(s16, 16);
    assert_int_equal(kms_shamir_split(s16, 16, 3, 2, false, sh16, NULL), 0);
    sh16[1].index = 9;
    assert_int_equal(kms_share_format(&sh16[1], short_len, sizeof(short_len), NULL), 0);
    assert_int_equal(kms_rekey_session_add(&s, nonce, short_len, 3, &p, &err), KMS_EFORMAT);
    /* too few */
    assert_int_equal(kms_rekey_session_add(&s, nonce, t[3], 3, &p, &err), 0);
    assert_int_equal(p, 2);
    assert_int_equal(kms_rekey_session_combine(&s, 3, root, &err), KMS_ETOOFEW);
    assert_int_equal(kms_rekey_session_add(&s, nonce, t[4], 3, &p, &err), 0);
    assert_int_equal(p, 3);
    /* full: a fourth is refused */
    assert_int_equal(kms_rekey_session_add(&s, nonce, t[1], 3, &p, &err), KMS_ERANGE);
    assert_int_equal(kms_rekey_session_combine(&s, 3, root, &err), 0);
    assert_memory_equal(root, secret, 32);
    /* another cluster's shares combine to some other secret (the caller's
     * keyring check refuses it); reset keeps the rekey */
    kms_rekey_session_reset_shares(&s);
    assert_int_equal(s.n_given, 0);
    assert_true(s.active);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kms_rekey_session_add(&s, nonce, o[i], 3, &p, &err), 0);
    }
    assert_int_equal(kms_rekey_session_combine(&s, 3, root, &err), 0);
    assert_memory_not_equal(root, secret, 32);
    assert_memory_equal(root, osecret, 32);
    /* clear ends it */
    kms_rekey_session_clear(&s);
    assert_false(s.active);
    assert_int_equal(kms_rekey_session_add(&s, nonce, t[0], 3, &p, &err), KMS_ENOTFOUND);
    assert_int_equal(kms_rekey_session_begin(&s, 4, 2, 1000, 9, &err), 0);
    assert_string_not_equal(s.nonce, nonce);
    kms_rekey_session_clear(&s);
}

static int rekey_apply(struct kms_store *s, uint64_t index, uint32_t term, uint8_t cid,
                       unsigned n, unsigned k, size_t wraplen, bool *shred)
{
    Kmsd__V1__EncryptedKeyring ek = KMSD__V1__ENCRYPTED_KEYRING__INIT;
    Kmsd__V1__RekeyKeyring rk = KMSD__V1__REKEY_KEYRING__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    struct kms_store_result *r;
    uint8_t cluster[16], nonce[12], ct[80], wrap[80];
    struct kms_err err;
    int code;

    memset(cluster, cid, sizeof(cluster));
    memset(nonce, 0x77, sizeof(nonce));
    memset(ct, 0x99, sizeof(ct));
    memset(wrap, 0x5c, sizeof(wrap));
    ek.version = 1;
    ek.cluster_id.data = cluster;
    ek.cluster_id.len = 16;
    ek.nonce.data = nonce;
    ek.nonce.len = 12;
    ek.ciphertext.data = ct;
    ek.ciphertext.len = sizeof(ct);
    ek.share_count = n;
    ek.threshold = k;
    ek.active_term = term;
    rk.keyring = &ek;
    rk.wrapped_root.data = wrap;
    rk.wrapped_root.len = wraplen;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REKEY_KEYRING;
    e.rekey_keyring = &rk;
    kms_err_clear(&err);
    r = apply_e(s, index, &e, NULL, &err);
    assert_non_null(r);
    code = r->code;
    *shred = r->shred;
    kms_store_result_free(r);
    return code;
}

static void test_store_rekey_apply(void **state)
{
    struct dir d;
    struct kms_store *s;
    Kmsd__V1__EncryptedKeyring *k = NULL;
    uint8_t w[64];
    size_t wl = 0;
    uint64_t wi = 0;
    bool shred = false;
    (void)state;

    dir_make(&d);
    s = open_in(&d, "a");
    /* nothing to rekey yet */
    assert_int_equal(rekey_apply(s, 1, 1, 0xc1, 4, 2, 60, &shred), KMS_EUNINIT);
    assert_true(shred);
    assert_int_equal(put_keyring(s, 2, true, 1, 0xc1), 0);
    assert_int_equal(put_keyring(s, 3, false, 2, 0xc1), 0);
    kms_store_rekey_wrap_take(s, w, sizeof(w), &wl, &wi);
    assert_int_equal(wl, 0);
    /* refusals: stale (active term differs), other cluster, bad params, no wrap */
    assert_int_equal(rekey_apply(s, 4, 1, 0xc1, 4, 2, 60, &shred), KMS_ERANGE);
    assert_int_equal(rekey_apply(s, 5, 3, 0xc1, 4, 2, 60, &shred), KMS_ERANGE);
    assert_int_equal(rekey_apply(s, 6, 2, 0xee, 4, 2, 60, &shred), KMS_EINVAL);
    assert_int_equal(rekey_apply(s, 7, 2, 0xc1, 4, 1, 60, &shred), KMS_EINVAL);
    assert_int_equal(rekey_apply(s, 8, 2, 0xc1, 2, 3, 60, &shred), KMS_EINVAL);
    assert_int_equal(rekey_apply(s, 9, 2, 0xc1, 4, 2, 0, &shred), KMS_EINVAL);
    assert_int_equal(rekey_apply(s, 10, 2, 0xc1, 4, 2, 65, &shred), KMS_EINVAL);
    assert_true(shred);
    kms_store_rekey_wrap_take(s, w, sizeof(w), &wl, &wi);
    assert_int_equal(wl, 0); /* nothing kept from a refused rekey */
    assert_int_equal(kms_store_keyring_get(s, &k, NULL), 0);
    assert_int_equal(k->share_count, 5);
    assert_int_equal(k->threshold, 3);
    kmsd__v1__encrypted_keyring__free_unpacked(k, NULL);
    /* the rekey */
    shred = false;
    assert_int_equal(rekey_apply(s, 11, 2, 0xc1, 4, 2, 60, &shred), 0);
    assert_true(shred);
    assert_int_equal(kms_store_keyring_get(s, &k, NULL), 0);
    assert_int_equal(k->share_count, 4);
    assert_int_equal(k->threshold, 2);
    assert_int_equal(k->active_term, 2);
    assert_int_equal(k->ciphertext.data[0], 0x99);
    kmsd__v1__encrypted_keyring__free_unpacked(k, NULL);
    /* the wrap is in memory only, taken once */
    kms_store_rekey_wrap_take(s, w, sizeof(w), &wl, &wi);
    assert_int_equal(wl, 60);
    assert_int_equal(wi, 11);
    assert_int_equal(w[0], 0x5c);
    kms_store_rekey_wrap_take(s, w, sizeof(w), &wl, &wi);
    assert_int_equal(wl, 0);
    /* a rotation after it still works */
    assert_int_equal(put_keyring(s, 12, false, 3, 0xc1), 0);
    kms_store_close(s);
    /* reopened: the keyring persisted, the wrap did not */
    s = open_in(&d, "a");
    kms_store_rekey_wrap_take(s, w, sizeof(w), &wl, &wi);
    assert_int_equal(wl, 0);
    assert_int_equal(kms_store_applied_index(s), 12);
    kms_store_close(s);
    dir_remove(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wrap_round_trip_and_refusals),
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_session),
        cmocka_unit_test(test_store_rekey_apply),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
