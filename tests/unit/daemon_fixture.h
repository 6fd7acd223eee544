/*
 * A `struct kmsd` for unit tests of daemon logic that needs a store but no
 * raft node, servers, pools or threads (test_daemon_unseal.c,
 * test_daemon_write.c). Include after <cmocka.h>, <ftw.h>, <raft.h>,
 * "kms_crypto.h", "kms_store.h", "kmsd.h" and "store_fixture.h".
 *
 * daemon_fx_new fills only these fields:
 *   store     a kms_store opened in dir/<sub> (store_fixture.h open_in);
 *   pending   KMSD_MAX_SHARES shares in secure memory (node_keys.c);
 *   mu        the key state mutex; kr_lock the keyring rwlock;
 *   wake      the event count key state changes signal (kmsd_wake.h);
 * and leaves the rest zero: opt all defaults-off (no peer unseal, lease
 * reads, node_id 0), raft NULL (a function that reaches kms_raft_* would
 * crash: only test functions that do not), unsealed false, root and
 * keyring NULL, metrics zero. daemon_fx_free seals (wipes root, keyring,
 * pending) and frees what daemon_fx_new made. daemon_fx_setup and
 * daemon_fx_teardown are cmocka setup/teardown around them, with an
 * initialised cluster. All static inline; the struct kmsd is the test's,
 * one thread.
 */
#ifndef KMS_TEST_DAEMON_FIXTURE_H
#define KMS_TEST_DAEMON_FIXTURE_H

static inline struct kmsd *daemon_fx_new(struct dir *dir, const char *sub)
{
    struct kmsd *d = calloc(1, sizeof(*d));
    assert_non_null(d);
    d->store = open_in(dir, sub);
    d->pending = kms_secmem_alloc(sizeof(struct kms_share) * KMSD_MAX_SHARES);
    assert_non_null(d->pending);
    memset(d->pending, 0, sizeof(struct kms_share) * KMSD_MAX_SHARES);
    assert_int_equal(pthread_mutex_init(&d->mu, NULL), 0);
    assert_int_equal(pthread_rwlock_init(&d->kr_lock, NULL), 0);
    assert_int_equal(kmsd_wake_init(&d->wake, NULL), 0);
    return d;
}

static inline void daemon_fx_free(struct kmsd *d)
{
    kmsd_seal(d);
    kmsd_wake_destroy(&d->wake);
    kms_secmem_free(d->pending, sizeof(struct kms_share) * KMSD_MAX_SHARES);
    pthread_rwlock_destroy(&d->kr_lock);
    pthread_mutex_destroy(&d->mu);
    kms_store_close(d->store);
    free(d);
}

/* True when no byte of the pending shares is set (wiped). */
static inline bool daemon_fx_pending_wiped(const struct kmsd *d)
{
    const uint8_t *p = (const uint8_t *)d->pending;
    for (size_t i = 0; i < sizeof(struct kms_share) * KMSD_MAX_SHARES; i++) {
        if (p[i] != 0) {
            return false;
        }
    }
    return true;
}

/* Shamir shares of secret (len bytes, 16..64) as text: n shares,
 * threshold k, into texts[0..n-1]. */
static inline void daemon_fx_shares(const uint8_t *secret, size_t len, unsigned n, unsigned k,
                                    char texts[][KMS_SHARE_TEXT_MAX])
{
    struct kms_share *sh = kms_secmem_alloc(sizeof(*sh) * n);
    struct kms_err err;
    kms_err_clear(&err);
    assert_non_null(sh);
    assert_int_equal(kms_shamir_split(secret, len, n, k, false, sh, &err), 0);
    for (unsigned i = 0; i < n; i++) {
        assert_int_equal(kms_share_format(&sh[i], texts[i], KMS_SHARE_TEXT_MAX, &err), 0);
    }
    kms_secmem_free(sh, sizeof(*sh) * n);
}

/* What kmsd_init_cluster commits, without raft: a keyring (term 1, a
 * random cluster id) encrypted under a fresh root key with (n, k), applied
 * to d->store as an init PutKeyring at raft index `index`; the root key's
 * n shares as text in texts[0..n-1], and the root key in root[32]. */
static inline void daemon_fx_init_cluster(struct kmsd *d, uint64_t index, unsigned n, unsigned k,
                                          char texts[][KMS_SHARE_TEXT_MAX], uint8_t root[32])
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    Kmsd__V1__PutKeyring pk = KMSD__V1__PUT_KEYRING__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    struct kms_keyring *kr = NULL;
    uint8_t cluster_id[16];
    struct kms_err err;

    kms_err_clear(&err);
    assert_int_equal(kms_root_key_generate(root, &err), 0);
    assert_int_equal(kms_rand_bytes(cluster_id, sizeof(cluster_id), &err), 0);
    assert_int_equal(kms_keyring_create(cluster_id, 1000, &kr, &err), 0);
    assert_int_equal(kms_keyring_encrypt(kr, root, n, k, &ek, &err), 0);
    daemon_fx_shares(root, 32, n, k, texts);
    pk.keyring = ek;
    pk.init = true;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_KEYRING;
    e.put_keyring = &pk;
    assert_int_equal(apply_code(d->store, index, &e, NULL), 0);
    kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    kms_keyring_unref(kr);
}

/* A cmocka fixture (*state): a struct kmsd over a store in a temp dir,
 * with an initialised cluster (daemon_fx_init_cluster at index 1). */
#define DAEMON_FX_SHARES 5 /* n */
#define DAEMON_FX_THRESHOLD 3 /* k */
struct daemon_fx {
    struct dir dir;
    struct kmsd *d;
    uint64_t index; /* the last raft index applied to d->store */
    uint8_t root[32];
    char shares[DAEMON_FX_SHARES][KMS_SHARE_TEXT_MAX];
};

static inline int daemon_fx_setup(void **state)
{
    struct daemon_fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    dir_make(&f->dir);
    f->d = daemon_fx_new(&f->dir, "db");
    daemon_fx_init_cluster(f->d, ++f->index, DAEMON_FX_SHARES, DAEMON_FX_THRESHOLD, f->shares,
                           f->root);
    *state = f;
    return 0;
}

static inline int daemon_fx_teardown(void **state)
{
    struct daemon_fx *f = *state;
    daemon_fx_free(f->d);
    dir_remove(&f->dir);
    free(f);
    return 0;
}

#endif
