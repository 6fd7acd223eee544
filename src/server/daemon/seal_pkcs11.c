/*
 * The PKCS#11 seal in the daemon (kmsd_seal.h): the auto-unseal thread,
 * init's wrap, seal migration and --check-config.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_pkcs11.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_seal.h"

#include "kmsd/v1/entry.pb-c.h"

#define RETRY_MIN_MS 250u
/* Pace of the attempts while there is nothing to do (unsealed, or no
 * keyring yet) and after a success: the replicated keyring that would make
 * an attempt worth it arrives through raft, which no notification reports,
 * so the thread looks again after this long (twice it when idle). */
#define IDLE_POLL_MS 100u
#define LOG_REPEAT_MS 60000u

struct kmsd_hsm {
    struct kms_p11 *p11;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;          /* guards error and admin_sealed */
    char error[KMS_ERR_MSG_MAX]; /* why the auto-unseal fails now; "" otherwise */
    bool admin_sealed;           /* operator seal: no auto-unseal */
    atomic_ullong attempts;      /* unwrap attempts */
    atomic_ullong failures;      /* failed attempts */
    atomic_int state;            /* 1 unsealed through the HSM, 0 failing, -1 not tried */
    uint64_t started_ms;         /* kms_mono_ms at start, for the unseal time */
};

bool kmsd_hsm_enabled(struct kmsd *d)
{
    return d->hsm != NULL;
}

static void hsm_set_error(struct kmsd_hsm *h, const char *msg)
{
    pthread_mutex_lock(&h->mu);
    snprintf(h->error, sizeof(h->error), "%s", msg);
    pthread_mutex_unlock(&h->mu);
}

void kmsd_hsm_status(struct kmsd *d, char *buf, size_t buflen)
{
    if (buflen == 0) {
        return;
    }
    buf[0] = '\0';
    if (d->hsm == NULL) {
        return;
    }
    pthread_mutex_lock(&d->hsm->mu);
    snprintf(buf, buflen, "%s", d->hsm->error);
    pthread_mutex_unlock(&d->hsm->mu);
}

void kmsd_hsm_admin_sealed(struct kmsd *d, bool sealed)
{
    if (d->hsm == NULL) {
        return;
    }
    pthread_mutex_lock(&d->hsm->mu);
    d->hsm->admin_sealed = sealed;
    if (sealed) {
        snprintf(d->hsm->error, sizeof(d->hsm->error),
                 "sealed by an operator: no auto-unseal until k recovery shares are given "
                 "(kmsctl operator unseal) or kmsd restarts");
    }
    pthread_mutex_unlock(&d->hsm->mu);
}

void kmsd_hsm_metric_values(struct kmsd *d, struct kmsd_hsm_metrics *m)
{
    struct kmsd_hsm *h = d->hsm;

    memset(m, 0, sizeof(*m));
    if (h == NULL) {
        return;
    }
    m->enabled = true;
    pthread_mutex_lock(&h->mu);
    m->failing = h->error[0] != '\0';
    pthread_mutex_unlock(&h->mu);
    m->attempts = atomic_load(&h->attempts);
    m->failures = atomic_load(&h->failures);
}

int kmsd_hsm_wrap(struct kmsd *d, const uint8_t cluster_id[16], const uint8_t root[32],
                  Kmsd__V1__HsmWrap **out, struct kms_err *err)
{
    if (d->hsm == NULL) {
        return kms_err_set(err, KMS_ECONFIG, "this node is not configured with seal.type pkcs11");
    }
    return kms_p11_wrap(d->hsm->p11, cluster_id, root, true, KMS_P11_MECH_AUTO, out, err);
}

/* One auto-unseal attempt. 0 unsealed (or nothing to do: *idle set), else
 * the error. */
static int hsm_try(struct kmsd *d, bool *idle, struct kms_err *err)
{
    struct kmsd_hsm *h = d->hsm;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    uint8_t *root = NULL; /* secure memory, handed to kmsd_unseal_root */
    bool admin;
    int rc;

    *idle = true;
    pthread_mutex_lock(&h->mu);
    admin = h->admin_sealed;
    pthread_mutex_unlock(&h->mu);
    if (admin || kmsd_is_unsealed(d)) {
        rc = 0;
        goto out;
    }
    if (kms_store_keyring_get(d->store, &ek, NULL) != 0) {
        hsm_set_error(h, "cluster not initialised (kmsctl operator init)");
        rc = 0;
        goto out;
    }
    if (ek->hsm == NULL) {
        hsm_set_error(h, "the cluster uses the Shamir seal: give k shares (kmsctl operator "
                         "unseal) or migrate (kmsctl operator seal-migrate --to pkcs11)");
        rc = 0;
        goto out;
    }
    *idle = false;
    atomic_fetch_add(&h->attempts, 1);
    root = kms_secmem_alloc(KMS_SHAMIR_MAX_SECRET);
    if (root == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "no secure memory");
        goto out;
    }
    if ((rc = kms_p11_unwrap(h->p11, ek->hsm, ek->cluster_id.data, root, err)) != 0) {
        goto out;
    }
    rc = kmsd_unseal_root(d, root, "pkcs11", err);
    root = NULL; /* taken */
out:
    kms_secmem_free(root, KMS_SHAMIR_MAX_SECRET);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return rc;
}

static void *hsm_main(void *arg)
{
    struct kmsd *d = arg;
    struct kmsd_hsm *h = d->hsm;
    unsigned delay = 0;
    uint64_t next = 0, last_log = 0;
    char last_msg[sizeof(h->error)] = "";
    bool stopped_retrying = false;

    for (;;) {
        /* The ticket before `stopping` is read: kmsd_stop's signal then
         * always ends the wait below (kmsd_wake.h). */
        uint64_t ticket = kmsd_wake_ticket(&d->wake);
        uint64_t now = kms_mono_ms();
        struct kms_err err;
        bool idle = true;
        int rc;

        if (atomic_load(&d->stopping)) {
            break;
        }
        if (now < next) {
            /* Paced (the idle re-check, or the retry backoff against the
             * token): other signals on d->wake only make it wait again. */
            (void)kmsd_wake_wait_until(&d->wake, ticket, next);
            continue;
        }
        if (stopped_retrying) {
            /* A wrong PIN: never guessed again (HSMs lock a PIN). */
            next = now + 1000;
            continue;
        }
        kms_err_clear(&err);
        rc = hsm_try(d, &idle, &err);
        if (rc == 0) {
            if (!idle) {
                char ms[32];
                snprintf(ms, sizeof(ms), "%llu", (unsigned long long)(now - h->started_ms));
                atomic_store(&h->state, 1);
                hsm_set_error(h, "");
                last_msg[0] = '\0';
                kms_log(KMS_LOG_INFO, "seal", "unsealed through the PKCS#11 token",
                        "ms_since_hsm_start", ms, NULL);
            } else if (kmsd_is_unsealed(d)) {
                hsm_set_error(h, "");
            }
            delay = 0;
            next = now + (idle ? IDLE_POLL_MS * 2 : IDLE_POLL_MS);
            continue;
        }
        atomic_fetch_add(&h->failures, 1);
        atomic_store(&h->state, 0);
        hsm_set_error(h, err.msg);
        if (rc == KMS_EDENIED) {
            stopped_retrying = true;
            kms_log(KMS_LOG_ERROR, "seal",
                    "PKCS#11 auto-unseal stopped: the token refused the PIN; not retried "
                    "(fix seal.pinFile / KMSD_PKCS11_PIN and restart)", "error", err.msg, NULL);
            continue;
        }
        delay = delay == 0 ? RETRY_MIN_MS : delay * 2;
        if (delay > d->opt.seal_retry_max_ms) {
            delay = d->opt.seal_retry_max_ms;
        }
        next = now + delay;
        if (strcmp(last_msg, err.msg) != 0 || now - last_log >= LOG_REPEAT_MS) {
            char ms[32];
            snprintf(ms, sizeof(ms), "%u", delay);
            kms_log(KMS_LOG_WARN, "seal", "PKCS#11 auto-unseal failed: staying sealed, retrying",
                    "error", err.msg, "retry_ms", ms, NULL);
            snprintf(last_msg, sizeof(last_msg), "%s", err.msg);
            last_log = now;
        }
    }
    return NULL;
}

int kmsd_hsm_start(struct kmsd *d, struct kms_err *err)
{
    struct kmsd_hsm *h = NULL;
    char *pin = NULL; /* secure memory */
    struct kms_p11_params pp;
    int rc;

    if (!d->opt.seal_pkcs11) {
        return 0;
    }
    h = calloc(1, sizeof(*h));
    pin = kms_secmem_alloc(KMS_P11_PIN_MAX);
    if (h == NULL || pin == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "seal: out of memory");
        goto out;
    }
    pthread_mutex_init(&h->mu, NULL);
    atomic_init(&h->state, -1);
    h->started_ms = kms_mono_ms();
    if (d->opt.seal_pin != NULL && d->opt.seal_pin[0] != '\0') {
        snprintf(pin, KMS_P11_PIN_MAX, "%s", d->opt.seal_pin);
    } else if ((rc = kms_p11_pin_read(d->opt.seal_pin_file, pin, err)) != 0) {
        kms_err_wrap(err, rc, "seal.pinFile");
        goto out;
    }
    pp.module = d->opt.seal_module;
    pp.token_label = d->opt.seal_token_label;
    pp.key_label = d->opt.seal_key_label;
    pp.pin = pin;
    if ((rc = kms_p11_open(&pp, &h->p11, err)) != 0) {
        kms_err_wrap(err, rc, "seal.module");
        goto out;
    }
    snprintf(h->error, sizeof(h->error), "not tried yet");
    d->hsm = h;
    if (pthread_create(&h->thread, NULL, hsm_main, d) != 0) {
        d->hsm = NULL;
        rc = kms_err_set(err, KMS_ENOMEM, "seal: cannot start the auto-unseal thread");
        goto out;
    }
    h->started = true;
    h = NULL;
    kms_log(KMS_LOG_INFO, "seal", "PKCS#11 seal: this node unseals itself through the token",
            "module", d->opt.seal_module, "token", d->opt.seal_token_label, "key",
            d->opt.seal_key_label, NULL);
    rc = 0;
out:
    kms_secmem_free(pin, KMS_P11_PIN_MAX);
    if (h != NULL) {
        kms_p11_close(h->p11);
        pthread_mutex_destroy(&h->mu);
        free(h);
    }
    return rc;
}

void kmsd_hsm_stop(struct kmsd *d)
{
    struct kmsd_hsm *h = d->hsm;
    if (h == NULL) {
        return;
    }
    /* d->stopping is set by kmsd_stop before this. */
    if (h->started) {
        pthread_join(h->thread, NULL);
    }
    d->hsm = NULL;
    kms_p11_close(h->p11);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* Combines k share texts into R (secure memory, KMS_SHAMIR_MAX_SECRET) and
 * checks it against ek. *kr_out receives the decrypted keyring. */
static int root_from_shares(const Kmsd__V1__EncryptedKeyring *ek, char *const *texts, size_t n,
                            uint8_t **root_out, struct kms_keyring **kr_out, struct kms_err *err)
{
    struct kms_share *sh = NULL; /* secure memory */
    uint8_t *root = NULL;
    size_t len = 0;
    int rc;

    if (n < ek->threshold) {
        rc = kms_err_set(err, KMS_ETOOFEW, "%zu share(s) given, the cluster needs %u", n,
                         ek->threshold);
        goto out;
    }
    if (n > KMSD_MAX_SHARES) {
        rc = kms_err_set(err, KMS_ERANGE, "too many shares");
        goto out;
    }
    sh = kms_secmem_alloc(sizeof(*sh) * n);
    root = kms_secmem_alloc(KMS_SHAMIR_MAX_SECRET);
    if (sh == NULL || root == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "no secure memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if ((rc = kms_share_parse(texts[i], &sh[i], err)) != 0) {
            kms_err_wrap(err, rc, "share %zu", i + 1);
            goto out;
        }
    }
    if ((rc = kms_shamir_combine(sh, n, ek->threshold, root, &len, err)) != 0) {
        goto out;
    }
    if (len != KMS_ROOT_KEY_LEN ||
        kms_keyring_decrypt(ek, root, kr_out, NULL) != 0) {
        rc = kms_err_set(err, KMS_EAUTH,
                         "the %u shares given do not reconstruct this cluster's root key",
                         ek->threshold);
        goto out;
    }
    *root_out = root;
    root = NULL;
    rc = 0;
out:
    kms_secmem_free(sh, sh != NULL ? sizeof(*sh) * n : 0);
    kms_secmem_free(root, KMS_SHAMIR_MAX_SECRET);
    return rc;
}

int kmsd_seal_migrate(struct kmsd *d, const char *to, char *const *shares, size_t n_shares,
                      uint32_t *active_term, struct kms_err *err)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL, *nek = NULL;
    struct kms_keyring *kr = NULL, *next = NULL;
    uint8_t *root = NULL;
    bool to_hsm;
    int rc;

    if (to == NULL || (strcmp(to, "pkcs11") != 0 && strcmp(to, "shamir") != 0)) {
        rc = kms_err_set(err, KMS_EINVAL, "seal migrate: --to must be pkcs11 or shamir");
        goto out;
    }
    to_hsm = strcmp(to, "pkcs11") == 0;
    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0) {
        rc = kms_err_set(err, KMS_EUNINIT, "seal migrate: cluster is not initialised");
        goto out;
    }
    if (to_hsm && ek->hsm != NULL) {
        rc = kms_err_set(err, KMS_EEXIST, "seal migrate: the cluster already uses the PKCS#11 "
                                          "seal");
        goto out;
    }
    if (!to_hsm && ek->hsm == NULL) {
        rc = kms_err_set(err, KMS_EEXIST, "seal migrate: the cluster already uses the Shamir "
                                          "seal");
        goto out;
    }
    if (to_hsm && d->hsm == NULL) {
        rc = kms_err_set(err, KMS_EINVAL,
                         "seal migrate: this node has seal.type shamir; configure seal.type "
                         "pkcs11 on every node (rolling restart) first");
        goto out;
    }
    if ((rc = root_from_shares(ek, shares, n_shares, &root, &kr, err)) != 0) {
        kms_err_wrap(err, rc, "seal migrate");
        goto out;
    }
    /* A fresh term marks the custody change (and gives the store a newer
     * keyring to accept); every older term stays in the keyring. */
    if ((rc = kms_keyring_rotate(kr, kms_wall_ms(), &next, err)) != 0 ||
        (rc = kms_keyring_encrypt(next, root, ek->share_count, ek->threshold, &nek, err)) != 0) {
        kms_err_wrap(err, rc, "seal migrate");
        goto out;
    }
    if (to_hsm && (rc = kms_p11_wrap(d->hsm->p11, ek->cluster_id.data, root, true,
                                     KMS_P11_MECH_AUTO, &nek->hsm, err)) != 0) {
        kms_err_wrap(err, rc, "seal migrate");
        goto out;
    }
    if ((rc = kmsd_keyring_commit(d, nek, root, false, err)) != 0) {
        kms_err_wrap(err, rc, "seal migrate");
        goto out;
    }
    *active_term = kms_keyring_active_term(next);
    kms_log(KMS_LOG_WARN, "seal",
            to_hsm ? "seal migrated to PKCS#11: replicas unseal themselves through the token; "
                     "the shares are now recovery shares"
                   : "seal migrated to Shamir: every replica needs k shares at start again",
            NULL);
    rc = 0;
out:
    kms_secmem_free(root, KMS_SHAMIR_MAX_SECRET);
    kmsd_keyrings_release(ek, nek, kr, next);
    return rc;
}

int kmsd_hsm_check_config(const struct kms_config *o, FILE *f)
{
    struct kms_p11 *p = NULL;
    struct kms_p11_params pp;
    struct kms_err err;
    char *pin = NULL;
    bool found = false;
    unsigned mech = 0;
    int rc;

    kms_err_clear(&err);
    pin = kms_secmem_alloc(KMS_P11_PIN_MAX);
    if (pin == NULL) {
        rc = kms_err_set(&err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    if (o->seal_pin != NULL && o->seal_pin[0] != '\0') {
        snprintf(pin, KMS_P11_PIN_MAX, "%s", o->seal_pin);
    } else if ((rc = kms_p11_pin_read(o->seal_pin_file, pin, &err)) != 0) {
        goto out;
    }
    pp.module = o->seal_module;
    pp.token_label = o->seal_token_label;
    pp.key_label = o->seal_key_label;
    pp.pin = pin;
    if ((rc = kms_p11_open(&pp, &p, &err)) != 0 ||
        (rc = kms_p11_check(p, &found, &mech, &err)) != 0) {
        goto out;
    }
    fprintf(f, "kmsd: check-config: seal: token \"%s\" reachable, PIN accepted, key \"%s\" %s "
               "(%s)\n", o->seal_token_label, o->seal_key_label,
            found ? "present" : "absent (operator init or seal-migrate creates it)",
            mech == KMS_P11_MECH_GCM ? "CKM_AES_GCM" : "CKM_AES_KEY_WRAP_PAD");
    rc = 0;
out:
    if (rc != 0) {
        fprintf(f, "kmsd: check-config: seal: %s\n", err.msg);
    }
    kms_p11_close(p);
    kms_secmem_free(pin, KMS_P11_PIN_MAX);
    return rc;
}
