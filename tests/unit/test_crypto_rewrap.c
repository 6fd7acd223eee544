/*
 * Rewrap and retire (src/crypto/rewrap.c): a record sealed under term 1 and
 * rewrapped under term 2 (then 3) unseals with the same blob to the same
 * bytes from a keyring that no longer holds term 1 (nor 2); tampering is
 * refused; pack/unpack validates the rewrapped form; revoked and active
 * records need no rewrap; retire refuses the active and unknown terms.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kms_crypto.h"

static const char uuid[] = "4c4c4544-0042-3510-8051-b4c04f4e3232";

/* rec takes over o (no copy): term, origin_term and wrapped. */
static void apply(Kmsd__V1__SealedRecord *rec, struct kms_rewrap_out *o)
{
    free(rec->nonce.data);
    free(rec->ciphertext.data);
    free(rec->wrapped.data);
    rec->nonce.data = rec->ciphertext.data = NULL;
    rec->nonce.len = rec->ciphertext.len = 0;
    rec->term = o->term;
    rec->origin_term = o->origin_term;
    rec->wrapped.data = o->wrapped;
    rec->wrapped.len = o->wrapped_len;
    o->wrapped = NULL;
}

static void test_rewrap_roundtrip(void **state)
{
    uint8_t cid[16] = {7}, data[32], blob[KMS_BLOB_MAX], out[64];
    size_t bl = 0, ol = 0;
    struct kms_keyring *k1 = NULL, *k2 = NULL, *k3 = NULL, *k2only = NULL, *k3only = NULL,
                       *tmp = NULL;
    Kmsd__V1__SealedRecord *rec = NULL, *back = NULL;
    struct kms_rewrap_out o;
    struct kms_err err;
    uint8_t *packed = NULL;
    size_t plen = 0;
    (void)state;

    memset(data, 0xa5, sizeof(data));
    assert_int_equal(kms_keyring_create(cid, 1, &k1, &err), 0);
    assert_int_equal(kms_seal(k1, uuid, data, sizeof(data), 5, NULL, 0, &rec, blob, &bl, &err), 0);
    assert_false(kms_rewrap_needed(k1, rec)); /* on the active term */
    assert_int_equal(kms_rewrap(k1, rec, &o, &err), KMS_EINVAL);
    assert_int_equal(kms_keyring_rotate(k1, 2, &k2, &err), 0);
    assert_true(kms_rewrap_needed(k2, rec));
    assert_int_equal(kms_rewrap(k2, rec, &o, &err), 0);
    assert_int_equal(o.term, 2);
    assert_int_equal(o.origin_term, 1);
    assert_true(o.wrapped_len >= kms_rewrap_len_min() && o.wrapped_len <= kms_rewrap_len_max());
    apply(rec, &o);
    assert_int_equal(kms_record_validate(rec, &err), 0);

    /* Term 1 gone from the keyring: the rewrapped record still unseals. */
    assert_int_equal(kms_keyring_retire(k2, 1, &k2only, &err), 0);
    assert_int_equal(kms_keyring_term_count(k2only), 1);
    assert_int_equal(kms_unseal(k2only, rec, uuid, blob, bl, out, &ol, &err), 0);
    assert_int_equal(ol, sizeof(data));
    assert_memory_equal(out, data, sizeof(data));

    /* Packs and unpacks as a valid record. */
    assert_int_equal(kms_record_pack(rec, &packed, &plen, &err), 0);
    assert_int_equal(kms_record_unpack(packed, plen, &back, &err), 0);
    assert_int_equal(back->origin_term, 1);
    kmsd__v1__sealed_record__free_unpacked(back, NULL);
    free(packed);

    /* A second rewrap (term 2 -> 3) keeps the origin; term 2 can go too. */
    assert_int_equal(kms_keyring_rotate(k2only, 3, &k3, &err), 0);
    assert_int_equal(kms_rewrap(k3, rec, &o, &err), 0);
    assert_int_equal(o.term, 3);
    assert_int_equal(o.origin_term, 1);
    apply(rec, &o);
    assert_int_equal(kms_keyring_retire(k3, 2, &k3only, &err), 0);
    assert_int_equal(kms_unseal(k3only, rec, uuid, blob, bl, out, &ol, &err), 0);
    assert_memory_equal(out, data, sizeof(data));
    /* ...but not with a keyring lacking the wrapping term. */
    assert_int_equal(kms_unseal(k2only, rec, uuid, blob, bl, out, &ol, &err), KMS_ENOTFOUND);

    /* Wrong blob, wrong uuid, tampered wrapping: refused, never OK. */
    blob[20] ^= 1;
    assert_int_equal(kms_unseal(k3only, rec, uuid, blob, bl, out, &ol, &err), KMS_EAUTH);
    blob[20] ^= 1;
    assert_int_equal(kms_unseal(k3only, rec, "other", blob, bl, out, &ol, &err), KMS_EDENIED);
    rec->wrapped.data[30] ^= 1;
    assert_int_not_equal(kms_unseal(k3only, rec, uuid, blob, bl, out, &ol, &err), 0);
    rec->wrapped.data[30] ^= 1;
    rec->origin_term = 2; /* inner says 1 */
    assert_int_not_equal(kms_unseal(k3only, rec, uuid, blob, bl, out, &ol, &err), 0);
    rec->origin_term = 1;
    assert_int_equal(kms_unseal(k3only, rec, uuid, blob, bl, out, &ol, &err), 0);

    /* Malformed rewrapped records do not validate. */
    rec->origin_term = 3; /* not below term */
    assert_int_equal(kms_record_validate(rec, &err), KMS_EFORMAT);
    rec->origin_term = 1;
    rec->wrapped.len = 10;
    assert_int_equal(kms_record_validate(rec, &err), KMS_EFORMAT);
    rec->wrapped.len = o.wrapped_len;

    /* Revoked records need no rewrap; retire refuses the active / unknown term. */
    rec->revoked_at = 9;
    assert_false(kms_rewrap_needed(k3, rec));
    assert_int_equal(kms_keyring_retire(k3only, 3, &tmp, &err), KMS_EINVAL);
    assert_int_equal(kms_keyring_retire(k3only, 9, &tmp, &err), KMS_ENOTFOUND);
    assert_null(tmp);

    kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    kms_keyring_unref(k1);
    kms_keyring_unref(k2);
    kms_keyring_unref(k3);
    kms_keyring_unref(k2only);
    kms_keyring_unref(k3only);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rewrap_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
