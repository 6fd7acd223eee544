/*
 * Unseal share submission (src/server/daemon/node_keys.c,
 * kmsd_unseal_submit / kmsd_unseal_progress, linked from kms_daemon) on a
 * struct kmsd whose store holds a real encrypted keyring
 * (daemon_fixture.h): the threshold unseals, a duplicate index or another
 * share length is refused, reset, a wrong set fails the key check and
 * unseals nothing, and pending shares are wiped after every outcome.
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

#include <openssl/crypto.h>
#include <raft.h>

#include "kms_crypto.h"
#include "kms_store.h"
#include "kmsd.h"

#include "kmsd/v1/entry.pb-c.h"

#include "store_fixture.h"
#include "daemon_fixture.h"

#define N DAEMON_FX_SHARES
#define K DAEMON_FX_THRESHOLD

struct step {
    int rc;
    unsigned progress, threshold;
    bool unsealed;
    struct kms_err err;
};

static struct step submit(struct kmsd *d, const char *share, bool reset)
{
    struct step s;
    memset(&s, 0, sizeof(s));
    kms_err_clear(&s.err);
    s.progress = s.threshold = 999;
    s.rc = kmsd_unseal_submit(d, share, reset, &s.progress, &s.threshold, &s.unsealed, &s.err);
    return s;
}

static void assert_progress(struct kmsd *d, unsigned want_progress)
{
    unsigned p = 999, t = 999;
    kmsd_unseal_progress(d, &p, &t);
    assert_int_equal(p, want_progress);
    assert_int_equal(t, K);
}

/* Sealed, nothing held: no root key, no keyring, no pending share. */
static void assert_sealed_clean(struct kmsd *d)
{
    assert_false(kmsd_is_unsealed(d));
    assert_null(d->root);
    assert_null(kmsd_keyring_get(d));
    assert_int_equal(d->n_pending, 0);
    assert_true(daemon_fx_pending_wiped(d));
}

static void assert_unsealed_with(struct daemon_fx *f)
{
    struct kms_keyring *kr;
    assert_true(kmsd_is_unsealed(f->d));
    assert_non_null(f->d->root);
    assert_memory_equal(f->d->root, f->root, 32);
    kr = kmsd_keyring_get(f->d);
    assert_non_null(kr);
    assert_int_equal(kms_keyring_active_term(kr), 1);
    kms_keyring_unref(kr);
    /* the shares that unsealed are gone from memory */
    assert_int_equal(f->d->n_pending, 0);
    assert_true(daemon_fx_pending_wiped(f->d));
}

/* Gives share i, which is not the k-th: accepted, progress want, sealed. */
static void give(struct daemon_fx *f, unsigned i, unsigned want)
{
    struct step s = submit(f->d, f->shares[i], false);
    assert_int_equal(s.rc, 0);
    assert_int_equal(s.progress, want);
    assert_int_equal(s.threshold, K);
    assert_false(s.unsealed);
    assert_progress(f->d, want);
    assert_false(kmsd_is_unsealed(f->d));
}

/* Gives share i, the k-th of a right set: unsealed with the root key. */
static void give_last(struct daemon_fx *f, unsigned i)
{
    struct step s = submit(f->d, f->shares[i], false);
    assert_int_equal(s.rc, 0);
    assert_int_equal(s.progress, K);
    assert_int_equal(s.threshold, K);
    assert_true(s.unsealed);
    assert_unsealed_with(f);
}

static void test_uninitialised(void **state)
{
    struct dir dir;
    struct kmsd *d;
    struct step s;
    unsigned p = 9, t = 9;
    (void)state;
    dir_make(&dir);
    d = daemon_fx_new(&dir, "empty");
    s = submit(d, "kms1-001-00-00000000", false);
    assert_int_equal(s.rc, KMS_EUNINIT);
    assert_non_null(strstr(s.err.msg, "not initialised"));
    assert_int_equal(s.threshold, 0);
    assert_false(s.unsealed);
    kmsd_unseal_progress(d, &p, &t);
    assert_int_equal(p, 0);
    assert_int_equal(t, 0);
    assert_sealed_clean(d);
    daemon_fx_free(d);
    dir_remove(&dir);
}

static void test_threshold_unseals(void **state)
{
    struct daemon_fx *f = *state;
    struct step s;

    assert_progress(f->d, 0);
    /* any k of the n, in any order */
    give(f, 4, 1);
    give(f, 1, 2);
    assert_null(kmsd_keyring_get(f->d));
    give_last(f, 3);
    assert_progress(f->d, K); /* unsealed reads k/k */

    /* more shares once unsealed change nothing */
    s = submit(f->d, f->shares[0], false);
    assert_int_equal(s.rc, 0);
    assert_true(s.unsealed);
    assert_int_equal(s.progress, K);
    assert_int_equal(f->d->n_pending, 0);

    /* seal, then unseal again with another subset */
    kmsd_seal(f->d);
    assert_sealed_clean(f->d);
    give(f, 0, 1);
    give(f, 1, 2);
    give_last(f, 2);
}

static void test_duplicate_index(void **state)
{
    struct daemon_fx *f = *state;
    struct step s;
    char upper[KMS_SHARE_TEXT_MAX + 4];

    give(f, 2, 1);
    s = submit(f->d, f->shares[2], false);
    assert_int_equal(s.rc, KMS_EDUP);
    assert_int_equal(s.progress, 1);
    assert_false(s.unsealed);
    assert_progress(f->d, 1);
    /* the same share in other case and with blanks is the same index */
    snprintf(upper, sizeof(upper), "  %s\n", f->shares[2]);
    for (char *c = upper; *c != '\0'; c++) {
        if (*c >= 'a' && *c <= 'z') {
            *c = (char)(*c - 'a' + 'A');
        }
    }
    assert_int_equal(submit(f->d, upper, false).rc, KMS_EDUP);
    assert_progress(f->d, 1);
    /* the refused duplicates do not count toward k */
    give(f, 0, 2);
    give_last(f, 1);
}

static void test_malformed_and_length(void **state)
{
    struct daemon_fx *f = *state;
    char short_shares[N][KMS_SHARE_TEXT_MAX], typo[KMS_SHARE_TEXT_MAX];
    uint8_t secret16[16];
    struct step s;
    size_t n;

    memset(secret16, 0x42, sizeof(secret16));
    daemon_fx_shares(secret16, sizeof(secret16), N, K, short_shares);

    /* no share, garbage, a typo (checksum): refused, nothing counted */
    assert_int_equal(submit(f->d, NULL, false).rc, KMS_EINVAL);
    assert_int_equal(submit(f->d, "", false).rc, KMS_EINVAL);
    assert_int_equal(submit(f->d, "not a share", false).rc, KMS_EFORMAT);
    snprintf(typo, sizeof(typo), "%s", f->shares[0]);
    n = strlen(typo);
    typo[n - 10] = typo[n - 10] == '0' ? '1' : '0'; /* a payload digit */
    assert_int_equal(submit(f->d, typo, false).rc, KMS_ECHECKSUM);
    assert_progress(f->d, 0);
    assert_true(daemon_fx_pending_wiped(f->d));

    /* a share of another length than those given is refused */
    give(f, 0, 1);
    s = submit(f->d, short_shares[1], false);
    assert_int_equal(s.rc, KMS_EFORMAT);
    assert_int_equal(s.progress, 1);
    assert_progress(f->d, 1);

    /* k shares all of the wrong length: combined, refused (not 32 bytes),
     * progress reset and wiped */
    assert_int_equal(submit(f->d, NULL, true).rc, 0);
    assert_int_equal(submit(f->d, short_shares[0], false).rc, 0);
    assert_int_equal(submit(f->d, short_shares[1], false).rc, 0);
    s = submit(f->d, short_shares[2], false);
    assert_int_equal(s.rc, KMS_EFORMAT);
    assert_non_null(strstr(s.err.msg, "progress reset"));
    assert_int_equal(s.progress, 0);
    assert_false(s.unsealed);
    assert_sealed_clean(f->d);
}

static void test_reset(void **state)
{
    struct daemon_fx *f = *state;
    struct step s;

    give(f, 0, 1);
    give(f, 1, 2);
    /* reset alone: 0, progress 0, shares wiped */
    s = submit(f->d, NULL, true);
    assert_int_equal(s.rc, 0);
    assert_int_equal(s.progress, 0);
    assert_int_equal(s.threshold, K);
    assert_progress(f->d, 0);
    assert_sealed_clean(f->d);
    /* reset with a share: it is the first of a new set, so a share given
     * before the reset may be given again */
    give(f, 0, 1);
    s = submit(f->d, f->shares[1], true);
    assert_int_equal(s.rc, 0);
    assert_int_equal(s.progress, 1);
    give(f, 0, 2);
    give_last(f, 4);
    /* a reset once unsealed does not seal */
    s = submit(f->d, NULL, true);
    assert_int_equal(s.rc, 0);
    assert_true(s.unsealed);
    assert_true(kmsd_is_unsealed(f->d));
}

static void test_wrong_set(void **state)
{
    struct daemon_fx *f = *state;
    char other[N][KMS_SHARE_TEXT_MAX];
    uint8_t other_root[32];
    struct kms_err err;
    struct step s;

    kms_err_clear(&err);
    assert_int_equal(kms_root_key_generate(other_root, &err), 0);
    daemon_fx_shares(other_root, 32, N, K, other);

    /* k shares of another cluster's root key: each is accepted (a share
     * names no cluster), the set fails the keyring check */
    assert_int_equal(submit(f->d, other[0], false).rc, 0);
    assert_int_equal(submit(f->d, other[1], false).rc, 0);
    s = submit(f->d, other[2], false);
    assert_int_equal(s.rc, KMS_EAUTH);
    assert_non_null(strstr(s.err.msg, "do not reconstruct"));
    assert_int_equal(s.progress, 0);
    assert_int_equal(s.threshold, K);
    assert_false(s.unsealed);
    assert_sealed_clean(f->d);
    assert_progress(f->d, 0);

    /* two of ours and one foreign (another index): also refused */
    give(f, 0, 1);
    give(f, 1, 2);
    s = submit(f->d, other[3], false);
    assert_int_equal(s.rc, KMS_EAUTH);
    assert_int_equal(s.progress, 0);
    assert_sealed_clean(f->d);

    /* after a failure the right shares still unseal */
    give(f, 0, 1);
    give(f, 1, 2);
    give_last(f, 2);
    OPENSSL_cleanse(other_root, sizeof(other_root));
}

int main(void)
{
#define FX(t) cmocka_unit_test_setup_teardown(t, daemon_fx_setup, daemon_fx_teardown)
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uninitialised),
        FX(test_threshold_unseals),
        FX(test_duplicate_index),
        FX(test_malformed_and_length),
        FX(test_reset),
        FX(test_wrong_set),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
