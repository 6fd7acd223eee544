/*
 * The node's key lifecycle: uninitialised -> sealed -> unsealed.
 *
 * Init (any node): generates R and keyring term 1, commits the keyring
 * encrypted under R together with (n, k), and returns the n shares once.
 * Nothing of R or the shares is stored; the node stays sealed like every
 * other node until it is given k shares.
 *
 * Unseal: shares are gathered in secure memory under d->mu. When k are in,
 * they are combined and R is checked by decrypting the replicated keyring
 * (AES-GCM authenticates it). A wrong set resets progress.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_rekey.h"
#include "kmsd_peer.h"
#include "kmsd_seal.h"
#include "kms_pkcs11.h"

#include "kmsd/v1/entry.pb-c.h"

bool kmsd_is_initialized(struct kmsd *d)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    bool ok = kms_store_keyring_get(d->store, &ek, NULL) == 0;
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return ok;
}

bool kmsd_is_unsealed(struct kmsd *d)
{
    bool u;
    pthread_mutex_lock(&d->mu);
    u = d->unsealed;
    pthread_mutex_unlock(&d->mu);
    return u;
}

struct kms_keyring *kmsd_keyring_get(struct kmsd *d)
{
    struct kms_keyring *kr = NULL;
    pthread_rwlock_rdlock(&d->kr_lock);
    if (d->keyring != NULL) {
        kr = kms_keyring_ref(d->keyring);
    }
    pthread_rwlock_unlock(&d->kr_lock);
    return kr;
}

/* Swaps the published keyring; takes ownership of `kr` (may be NULL). */
static void keyring_publish(struct kmsd *d, struct kms_keyring *kr)
{
    struct kms_keyring *old;
    pthread_rwlock_wrlock(&d->kr_lock);
    old = d->keyring;
    d->keyring = kr;
    pthread_rwlock_unlock(&d->kr_lock);
    if (old != NULL) {
        kms_keyring_unref(old);
    }
}

static void pending_wipe(struct kmsd *d)
{
    if (d->pending != NULL) {
        OPENSSL_cleanse(d->pending, sizeof(struct kms_share) * KMSD_MAX_SHARES);
    }
    d->n_pending = 0;
}

/* The unseal itself, once the root key decrypted the keyring: installs root
 * (secure memory) and kr, both taken, drops the pending shares and logs
 * `via`. d->mu held. */
static void unseal_install(struct kmsd *d, uint8_t *root, struct kms_keyring *kr,
                           const char *via)
{
    pending_wipe(d);
    d->root = root;
    d->unsealed = true;
    keyring_publish(d, kr);
    kms_log(KMS_LOG_INFO, "keys", "unsealed", "via", via, NULL);
    kmsd_warn_local_reads(d, "unseal");
}

/* Commits an encrypted keyring (init: the first one; else a rotation) and
 * maps the store's apply result to an error. The keyring is checked first
 * (kmsd_authz_keyring_check): it must decrypt under root, the key this node
 * holds, and extend the replicated one; a keyring no holder of the shares
 * could read is never proposed. */
int kmsd_keyring_commit(struct kmsd *d, Kmsd__V1__EncryptedKeyring *ek, const uint8_t *root,
                        bool init, struct kms_err *err)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__PutKeyring pk = KMSD__V1__PUT_KEYRING__INIT;
    Kmsd__V1__EncryptedKeyring *cur = NULL;
    struct kmsd_write_result res;
    int rc;

    (void)kms_store_keyring_get(d->store, &cur, NULL);
    rc = kmsd_authz_keyring_check(ek, root, cur, init, err);
    if (cur != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(cur, NULL);
    }
    if (rc != 0) {
        kms_log(KMS_LOG_ERROR, "keys", "refusing to propose an invalid keyring", "error",
                err != NULL ? err->msg : "", NULL);
        return rc == KMS_EEXIST ? rc : kms_err_wrap(err, rc, "keyring check");
    }
    e.version = 1;
    pk.keyring = ek;
    pk.init = init;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_KEYRING;
    e.put_keyring = &pk;
    if ((rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, err)) != 0) {
        return kms_err_wrap(err, rc, "commit keyring");
    }
    if (init && res.code == KMS_EEXIST) {
        return kms_err_set(err, KMS_EEXIST, "cluster is already initialised");
    }
    if (res.code != 0) {
        return kms_err_set(err, res.code, "apply keyring: %s", res.msg);
    }
    return 0;
}

int kmsd_init_cluster(struct kmsd *d, unsigned n, unsigned k, char ***share_text,
                      char cluster_id_hex[33], struct kms_err *err)
{
    uint8_t *root = NULL;
    struct kms_share *shares = NULL;
    struct kms_keyring *kr = NULL;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    char **texts = NULL;
    uint8_t cluster_id[16];
    int rc;

    *share_text = NULL;
    if (kmsd_is_initialized(d)) {
        rc = kms_err_set(err, KMS_EEXIST, "cluster is already initialised");
        goto out;
    }
    root = kms_secmem_alloc(32);
    shares = kms_secmem_alloc(sizeof(*shares) * n);
    texts = calloc(n + 1, sizeof(*texts));
    if (root == NULL || shares == NULL || texts == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "init: out of memory");
        goto out;
    }
    if ((rc = kms_root_key_generate(root, err)) != 0 ||
        (rc = kms_rand_bytes(cluster_id, sizeof(cluster_id), err)) != 0 ||
        (rc = kms_keyring_create(cluster_id, kms_wall_ms(), &kr, err)) != 0 ||
        (rc = kms_keyring_encrypt(kr, root, n, k, &ek, err)) != 0 ||
        (rc = kms_shamir_split(root, 32, n, k, false, shares, err)) != 0) {
        kms_err_wrap(err, rc, "init");
        goto out;
    }
    /* PKCS#11 seal: R also goes into the keyring wrapped by the token's
     * key (created when missing); the shares become recovery shares. */
    if (kmsd_hsm_enabled(d) && (rc = kmsd_hsm_wrap(d, cluster_id, root, &ek->hsm, err)) != 0) {
        kms_err_wrap(err, rc, "init");
        goto out;
    }
    for (unsigned i = 0; i < n; i++) {
        char buf[512];
        if ((rc = kms_share_format(&shares[i], buf, sizeof(buf), err)) != 0) {
            kms_err_wrap(err, rc, "init: share %u", i + 1);
            goto out;
        }
        texts[i] = strdup(buf);
        OPENSSL_cleanse(buf, sizeof(buf));
        if (texts[i] == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "init: out of memory");
            goto out;
        }
    }

    if ((rc = kmsd_keyring_commit(d, ek, root, true, err)) != 0) {
        if (rc != KMS_EEXIST) {
            kms_err_wrap(err, rc, "init");
        }
        goto out;
    }
    (void)kms_hex_encode_ct(cluster_id, sizeof(cluster_id), cluster_id_hex, 33, NULL);
    kms_log(KMS_LOG_WARN, "keys",
            kmsd_hsm_enabled(d) ? "cluster initialised with the PKCS#11 seal; recovery shares "
                                  "handed out once"
                                : "cluster initialised; shares handed out once",
            "cluster_id", cluster_id_hex, NULL);
    *share_text = texts;
    texts = NULL;
    rc = 0;
out:
    if (texts != NULL) {
        for (unsigned i = 0; i < n; i++) {
            if (texts[i] != NULL) {
                OPENSSL_cleanse(texts[i], strlen(texts[i]));
                free(texts[i]);
            }
        }
        free(texts);
    }
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    kms_secmem_free(shares, shares != NULL ? sizeof(*shares) * n : 0);
    kms_secmem_free(root, 32);
    return rc;
}

void kmsd_unseal_progress(struct kmsd *d, unsigned *progress, unsigned *threshold)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    unsigned k = 0;
    if (kms_store_keyring_get(d->store, &ek, NULL) == 0) {
        k = ek->threshold;
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    pthread_mutex_lock(&d->mu);
    *progress = d->unsealed ? k : (unsigned)d->n_pending;
    pthread_mutex_unlock(&d->mu);
    *threshold = k;
}

int kmsd_unseal_submit(struct kmsd *d, const char *share, bool reset,
                       unsigned *progress, unsigned *threshold, bool *unsealed,
                       struct kms_err *err)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_share parsed;
    uint8_t *root = NULL;
    struct kms_keyring *kr = NULL;
    size_t len = 0;
    bool combined = false;
    int rc;

    memset(&parsed, 0, sizeof(parsed));
    pthread_mutex_lock(&d->mu);
    *unsealed = d->unsealed;
    *progress = (unsigned)d->n_pending;
    *threshold = 0;
    rc = kms_store_keyring_get(d->store, &ek, err);
    if (rc != 0) {
        rc = kms_err_set(err, KMS_EUNINIT,
                         "cluster is not initialised (run kmsctl operator init)");
        goto out;
    }
    *threshold = ek->threshold;
    if (d->unsealed) {
        *progress = ek->threshold;
        rc = 0;
        goto out;
    }
    if (reset) {
        pending_wipe(d);
        *progress = 0;
        kms_log(KMS_LOG_INFO, "keys", "unseal progress reset", NULL);
    }
    if (share == NULL || share[0] == '\0') {
        rc = reset ? 0 : kms_err_set(err, KMS_EINVAL, "no share given");
        goto out;
    }
    if ((rc = kms_share_parse_next(share, d->pending, d->n_pending, "share", &parsed, err)) != 0) {
        goto out;
    }
    if (d->n_pending >= KMSD_MAX_SHARES) {
        rc = kms_err_set(err, KMS_ERANGE, "too many shares");
        goto out;
    }
    d->pending[d->n_pending++] = parsed;
    *progress = (unsigned)d->n_pending;
    if (d->n_pending < ek->threshold) {
        kms_logf(KMS_LOG_INFO, "keys", "unseal progress %zu/%u", d->n_pending,
                 ek->threshold);
        rc = 0;
        goto out;
    }

    root = kms_secmem_alloc(KMS_SHAMIR_MAX_SECRET);
    if (root == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "unseal: out of memory");
        goto out;
    }
    rc = kms_shamir_combine(d->pending, d->n_pending, ek->threshold, root, &len, err);
    if (rc == 0 && len != 32) {
        rc = kms_err_set(err, KMS_EFORMAT, "shares hold a %zu-byte secret, expected 32", len);
    }
    if (rc == 0) {
        rc = kms_keyring_decrypt(ek, root, &kr, err);
    }
    if (rc != 0) {
        pending_wipe(d);
        *progress = 0;
        kms_err_set(err, rc == KMS_EAUTH ? KMS_EAUTH : rc,
                    "the %u shares given do not reconstruct this cluster's root key "
                    "(a wrong or mistyped share, another cluster's, or a share replaced by "
                    "a rekey); progress reset",
                    ek->threshold);
        kms_log(KMS_LOG_WARN, "keys", "unseal failed: wrong set of shares; progress reset", NULL);
        goto out;
    }
    unseal_install(d, root, kr, "key shares");
    root = NULL;
    kr = NULL;
    *unsealed = true;
    *progress = ek->threshold;
    combined = true;
    rc = 0;
out:
    pthread_mutex_unlock(&d->mu);
    kmsd_wake_signal(&d->wake); /* unsealed, or the progress STATUS= shows */
    if (combined) {
        kmsd_peer_shares_unsealed(d); /* this call unsealed the node with k shares */
    }
    OPENSSL_cleanse(&parsed, sizeof(parsed));
    kms_secmem_free(root, KMS_SHAMIR_MAX_SECRET);
    kmsd_keyrings_release(ek, NULL, kr, NULL);
    return rc;
}

int kmsd_unseal_with_root(struct kmsd *d, const uint8_t *root, const char *via,
                          struct kms_err *err)
{
    uint8_t *mine = kms_secmem_alloc(KMS_SHAMIR_MAX_SECRET);

    if (mine == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "unseal: out of memory");
    }
    memcpy(mine, root, KMS_ROOT_KEY_LEN);
    return kmsd_unseal_root(d, mine, via, err); /* takes mine */
}

int kmsd_unseal_root(struct kmsd *d, uint8_t *root, const char *how, struct kms_err *err)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_keyring *kr = NULL;
    int rc;

    pthread_mutex_lock(&d->mu);
    if (d->unsealed) {
        rc = 0;
        goto out;
    }
    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0) {
        rc = kms_err_set(err, KMS_EUNINIT, "cluster is not initialised");
        goto out;
    }
    if ((rc = kms_keyring_decrypt(ek, root, &kr, err)) != 0) {
        kms_err_wrap(err, rc, "the root key from %s does not decrypt the replicated keyring",
                     how);
        goto out;
    }
    unseal_install(d, root, kr, how);
    root = NULL;
    kr = NULL;
    rc = 0;
out:
    pthread_mutex_unlock(&d->mu);
    if (rc == 0) {
        kmsd_wake_signal(&d->wake); /* the supervisor opens the Talos API */
    }
    kms_secmem_free(root, KMS_SHAMIR_MAX_SECRET);
    kmsd_keyrings_release(ek, NULL, kr, NULL);
    return rc;
}

void kmsd_seal(struct kmsd *d)
{
    pthread_mutex_lock(&d->mu);
    pending_wipe(d);
    if (d->root != NULL) {
        kms_secmem_free(d->root, KMS_SHAMIR_MAX_SECRET);
        d->root = NULL;
    }
    d->unsealed = false;
    d->keyring_error[0] = '\0';
    keyring_publish(d, NULL);
    pthread_mutex_unlock(&d->mu);
    kmsd_wake_signal(&d->wake); /* the supervisor closes the Talos API */
    kms_log(KMS_LOG_WARN, "keys", "sealed: key material wiped from memory", NULL);
}

void kmsd_keyring_refresh(struct kmsd *d)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_keyring *cur = NULL, *kr = NULL;
    struct kms_err err;

    pthread_mutex_lock(&d->mu);
    if (!d->unsealed || d->root == NULL) {
        goto out;
    }
    if (kms_store_keyring_get(d->store, &ek, NULL) != 0) {
        goto out;
    }
    cur = kmsd_keyring_get(d);
    /* Decrypted every time (one small AES-GCM per second), so a replicated
     * keyring that cannot be read is noticed even at an unchanged term. */
    kms_err_clear(&err);
    if (kms_keyring_decrypt(ek, d->root, &kr, &err) != 0 &&
        kmsd_rekey_follow_locked(d, ek, &kr, NULL) == 0) {
        /* A rekey was applied: d->root is the new root key now (rekey.c). */
        kms_err_clear(&err);
    }
    if (kr != NULL && cur != NULL &&
        kms_keyring_active_term(cur) == kms_keyring_active_term(kr) &&
        kms_keyring_term_count(cur) == kms_keyring_term_count(kr)) {
        d->keyring_error[0] = '\0';
    } else if (kr != NULL) {
        kms_logf(KMS_LOG_INFO, "keys", "keyring updated: active term %u",
                 kms_keyring_active_term(kr));
        keyring_publish(d, kr);
        kr = NULL;
        d->keyring_error[0] = '\0';
    } else {
        /* The cluster committed a keyring this node's R cannot read: keep
         * serving from the keyring held, but say so loudly: an error log
         * when it starts, a counter in /metrics (+1 per check, each second)
         * and the reason in kmsctl status while it lasts. */
        bool first = d->keyring_error[0] == '\0';
        snprintf(d->keyring_error, sizeof(d->keyring_error),
                 "replicated keyring (active term %u) does not decrypt under this node's "
                 "root key", ek->active_term);
        atomic_fetch_add(&d->metrics.keyring_refresh_failures, 1);
        if (first) {
            kms_log(KMS_LOG_ERROR, "keys", "keyring refresh failed: replicated keyring does "
                    "not decrypt; serving from the keyring held", "error", err.msg, NULL);
        }
    }
out:
    pthread_mutex_unlock(&d->mu);
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    if (cur != NULL) {
        kms_keyring_unref(cur);
    }
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
}

int kmsd_rotate(struct kmsd *d, uint32_t *active_term, struct kms_err *err)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL, *nek = NULL;
    struct kms_keyring *kr = NULL, *next = NULL;
    uint8_t *root = NULL; /* secure memory: a copy of R for the commit check */
    bool locked = true;
    int rc;

    /* Not concurrently with a rekey (kmsd_rekey.h): a rotation built under
     * the old root key must not commit after it. */
    kmsd_keyring_write_lock();
    pthread_mutex_lock(&d->mu);
    if (!d->unsealed) {
        rc = kms_err_set(err, KMS_ESEALED, "node is sealed");
        goto out;
    }
    /* Rotate from the replicated keyring, not the cached one, so two
     * rotations in a row each add a term. */
    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0 ||
        (rc = kms_keyring_decrypt(ek, d->root, &kr, err)) != 0 ||
        (rc = kms_keyring_rotate(kr, kms_wall_ms(), &next, err)) != 0 ||
        (rc = kms_keyring_encrypt(next, d->root, ek->share_count, ek->threshold, &nek,
                                  err)) != 0 ||
        (ek->hsm != NULL && (rc = kms_p11_wrap_dup(ek->hsm, &nek->hsm, err)) != 0)) {
        kms_err_wrap(err, rc, "rotate");
        goto out;
    }
    /* The replicated write may take up to requestWait: not under d->mu
     * (unseal progress, status and seal would wait for it). keyring_commit
     * checks the keyring against a copy of R in locked memory (kmsd_seal may
     * wipe d->root meanwhile); two concurrent rotations are ordered by the
     * store, which refuses the stale one. */
    root = kms_secmem_alloc(KMS_ROOT_KEY_LEN);
    if (root == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "rotate: no secure memory");
        goto out;
    }
    memcpy(root, d->root, KMS_ROOT_KEY_LEN);
    pthread_mutex_unlock(&d->mu);
    locked = false;
    if ((rc = kmsd_keyring_commit(d, nek, root, false, err)) != 0) {
        kms_err_wrap(err, rc, "rotate");
        goto out;
    }
    *active_term = kms_keyring_active_term(next);
    pthread_mutex_lock(&d->mu);
    locked = true;
    if (d->unsealed) {
        /* Sealed meanwhile: nothing to publish (kmsd_seal dropped it). */
        keyring_publish(d, next);
        next = NULL;
    }
    kms_logf(KMS_LOG_INFO, "keys", "keyring rotated: active term %u", *active_term);
    rc = 0;
out:
    if (locked) {
        pthread_mutex_unlock(&d->mu);
    }
    kmsd_keyring_write_unlock();
    kms_secmem_free(root, KMS_ROOT_KEY_LEN);
    kmsd_keyrings_release(ek, nek, kr, next);
    return rc;
}

void kmsd_keyrings_release(Kmsd__V1__EncryptedKeyring *ek, Kmsd__V1__EncryptedKeyring *nek,
                           struct kms_keyring *kr, struct kms_keyring *next)
{
    kms_keyring_unref(kr);
    kms_keyring_unref(next);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    if (nek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(nek, NULL);
    }
}
