/*
 * Rekey (kmsctl operator rekey), Vault's shape, on the leader.
 *
 * RekeyInit starts a rekey in this process's memory (one at a time: another
 * init is refused while it runs) and returns a random nonce. Holders of the
 * CURRENT shares each send one with RekeyUpdate against that nonce, from any
 * workstation; the server keeps them in secure memory. The update that
 * reaches the current threshold:
 *   1. combines them into R and checks R against the replicated keyring (a
 *      wrong set resets the progress; the rekey stays open);
 *   2. draws R', encrypts the same keyring (same terms and keys) under R'
 *      with the new share count and threshold, splits R' into the new
 *      shares, and wraps R' under R (kms_rekey_root_wrap);
 *   3. commits both in ONE replicated RekeyKeyring entry; every replica
 *      unsealed with R opens the wrap and switches to R' without a restart
 *      (kmsd_rekey_follow_locked, from the supervisor's keyring refresh);
 *      sealed or restarted replicas need the new shares;
 *   4. returns the new shares once (they are never stored).
 * Applying the entry starts the revocation shredding (raft snapshots, log
 * compaction, RocksDB compaction; node.c), so the wrap, which the OLD shares
 * could open, leaves every disk within seconds (docs/security.md "Rekey").
 *
 * The rekey is bound to the raft term it started in: a leader change
 * cancels it cleanly (the next call says so), and the holders start again.
 *
 * Threads: operator pool threads; rk_mu serialises every call on the
 * session. Lock order: rk_mu, then kr_write_mu, then d->mu.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rekey.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_cluster.h"
#include "kmsd_rekey.h"
#include "kmsd_seal.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

/* One daemon per process: the session is module state. Secure memory,
 * allocated on first use, guarded by rk_mu. */
static pthread_mutex_t rk_mu = PTHREAD_MUTEX_INITIALIZER;
static struct kms_rekey_session *rk;

static pthread_mutex_t kr_write_mu = PTHREAD_MUTEX_INITIALIZER;

void kmsd_keyring_write_lock(void)
{
    pthread_mutex_lock(&kr_write_mu);
}

void kmsd_keyring_write_unlock(void)
{
    pthread_mutex_unlock(&kr_write_mu);
}

void kmsd_rekey_stop(void)
{
    pthread_mutex_lock(&rk_mu);
    if (rk != NULL) {
        kms_rekey_session_clear(rk);
        kms_secmem_free(rk, sizeof(*rk));
        rk = NULL;
    }
    pthread_mutex_unlock(&rk_mu);
}

/* The call's audit line is written when it finishes (cluster_api.c's finish
 * hook); this adds the rekey's nonce and progress to it. */
static void audit(struct kms_rpc_call *call, const char *op, const char *nonce,
                  unsigned progress, unsigned required)
{
    char note[KMS_RPC_NOTE_MAX];
    snprintf(note, sizeof(note), "%s nonce=%s progress=%u/%u", op, nonce != NULL ? nonce : "",
             progress, required);
    kms_rpc_call_note_set(call, note);
}

static uint64_t raft_term(struct kmsd *d)
{
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    return st.term;
}

/* rk_mu held. Allocates the session; cancels a rekey begun in an earlier
 * raft term (a leader change). KMS_ENOMEM. */
static int session_get_locked(struct kmsd *d)
{
    if (rk == NULL && (rk = kms_secmem_alloc(sizeof(*rk))) == NULL) {
        return KMS_ENOMEM;
    }
    if (rk->active && rk->tag != raft_term(d)) {
        kms_log(KMS_LOG_WARN, "keys", "rekey cancelled: leadership changed since it began",
                "nonce", rk->nonce, NULL);
        kms_rekey_session_clear(rk);
    }
    return 0;
}

/* The current threshold (0 when not initialised). */
static unsigned current_threshold(struct kmsd *d)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    unsigned k = 0;
    if (kms_store_keyring_get(d->store, &ek, NULL) == 0) {
        k = ek->threshold;
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return k;
}

/* rk_mu held. Fills resp from the session; nonce: caller's buffer. */
static void status_fill(Kmsd__V1__RekeyStatusResponse *resp, char nonce[KMS_REKEY_NONCE_HEX],
                        unsigned required)
{
    nonce[0] = '\0';
    resp->nonce = nonce;
    resp->required = required;
    if (rk == NULL || !rk->active) {
        return;
    }
    memcpy(nonce, rk->nonce, KMS_REKEY_NONCE_HEX);
    resp->started = true;
    resp->progress = (uint32_t)rk->n_given;
    resp->new_shares = rk->new_shares;
    resp->new_threshold = rk->new_threshold;
    resp->started_at = rk->started_at;
}

int kmsd_rekey_init_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__RekeyInitRequest *r = (const Kmsd__V1__RekeyInitRequest *)c->req;
    Kmsd__V1__RekeyStatusResponse resp = KMSD__V1__REKEY_STATUS_RESPONSE__INIT;
    char nonce[KMS_REKEY_NONCE_HEX];
    unsigned k;
    int rc;

    audit(c->call, "rekey-init", "", 0, 0);
    if ((rc = kms_rekey_params_check(r->key_shares, r->key_threshold, &c->err)) != 0) {
        return rc;
    }
    if ((k = current_threshold(d)) == 0) {
        return kms_err_set(&c->err, KMS_EUNINIT,
                           "cluster is not initialised (run kmsctl operator init)");
    }
    pthread_mutex_lock(&rk_mu);
    if ((rc = session_get_locked(d)) == 0) {
        rc = kms_rekey_session_begin(rk, r->key_shares, r->key_threshold, kms_wall_ms(),
                                     raft_term(d), &c->err);
    } else {
        kms_err_set(&c->err, rc, "rekey: out of secure memory");
    }
    if (rc == 0) {
        status_fill(&resp, nonce, k);
        kms_logf(KMS_LOG_WARN, "keys", "rekey started: %u shares, threshold %u; waiting for %u "
                 "current shares", r->key_shares, r->key_threshold, k);
    }
    pthread_mutex_unlock(&rk_mu);
    if (rc != 0) {
        return rc;
    }
    kms_log(KMS_LOG_INFO, "audit", "rekey started", "nonce", nonce, NULL);
    kmsd_call_reply(c, &resp.base);
    return 0;
}

int kmsd_rekey_status_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    Kmsd__V1__RekeyStatusResponse resp = KMSD__V1__REKEY_STATUS_RESPONSE__INIT;
    char nonce[KMS_REKEY_NONCE_HEX] = "";
    unsigned k = current_threshold(d);
    int rc;

    pthread_mutex_lock(&rk_mu);
    rc = session_get_locked(d);
    status_fill(&resp, nonce, k);
    pthread_mutex_unlock(&rk_mu);
    audit(c->call, "rekey-status", nonce, resp.progress, k);
    if (rc != 0) {
        return kms_err_set(&c->err, rc, "rekey: out of secure memory");
    }
    kmsd_call_reply(c, &resp.base);
    return 0;
}

int kmsd_rekey_cancel_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__RekeyCancelRequest *r = (const Kmsd__V1__RekeyCancelRequest *)c->req;
    Kmsd__V1__RekeyCancelResponse resp = KMSD__V1__REKEY_CANCEL_RESPONSE__INIT;
    int rc = 0;
    char nonce[KMS_REKEY_NONCE_HEX] = "";

    audit(c->call, "rekey-cancel", r->nonce, 0, 0);
    pthread_mutex_lock(&rk_mu);
    if (session_get_locked(d) != 0 || !rk->active) {
        rc = KMS_ENOTFOUND;
    } else if (r->nonce != NULL && r->nonce[0] != '\0' && strcmp(r->nonce, rk->nonce) != 0) {
        rc = KMS_EINVAL;
    } else {
        memcpy(nonce, rk->nonce, sizeof(nonce));
        kms_rekey_session_clear(rk);
    }
    pthread_mutex_unlock(&rk_mu);
    if (rc == KMS_ENOTFOUND) {
        return kms_err_set(&c->err, rc, "no rekey in progress (a leader change cancels one)");
    }
    if (rc == KMS_EINVAL) {
        return kms_err_set(&c->err, rc,
                           "wrong rekey nonce: the rekey in progress has another one (see "
                           "kmsctl operator rekey status)");
    }
    kms_log(KMS_LOG_WARN, "keys", "rekey cancelled; shares given were wiped", "nonce", nonce,
            NULL);
    kmsd_call_reply(c, &resp.base);
    return 0;
}

/* True once the replicated keyring decrypts under root. */
static bool keyring_under(struct kmsd *d, const uint8_t *root)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_keyring *kr = NULL;
    bool ok = false;
    if (kms_store_keyring_get(d->store, &ek, NULL) == 0) {
        ok = kms_keyring_decrypt(ek, root, &kr, NULL) == 0;
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    kms_keyring_unref(kr);
    return ok;
}

struct rekey_out {
    char **texts;      /* n new share texts (malloc, wiped by the caller) */
    unsigned n;
    char note[KMS_ERR_MSG_MAX + 256]; /* non-empty: the commit was not confirmed */
};

/* rk_mu held, the session has `threshold` shares: steps 1-4 of the header.
 * On failure the session keeps running (shares reset when they were the
 * wrong ones); on success (or an unconfirmed commit) it ends. */
static int rekey_complete_locked(struct kmsd *d, const Kmsd__V1__EncryptedKeyring *ek,
                                 struct rekey_out *o, struct kms_err *err)
{
    uint8_t *root = kms_secmem_alloc(KMS_ROOT_KEY_LEN);
    uint8_t *nroot = kms_secmem_alloc(KMS_ROOT_KEY_LEN);
    struct kms_share *shares = NULL;
    struct kms_keyring *kr = NULL;
    Kmsd__V1__EncryptedKeyring *nek = NULL;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__RekeyKeyring rke = KMSD__V1__REKEY_KEYRING__INIT;
    struct kmsd_write_result res;
    uint8_t wrap[KMS_REKEY_WRAP_LEN];
    unsigned n = rk->new_shares, k = rk->new_threshold;
    int rc;

    o->texts = NULL;
    o->n = 0;
    o->note[0] = '\0';
    shares = kms_secmem_alloc(sizeof(*shares) * n);
    if (root == NULL || nroot == NULL || shares == NULL ||
        (o->texts = calloc(n + 1, sizeof(*o->texts))) == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "rekey: out of memory");
        goto out;
    }
    if (ek->cluster_id.len != KMS_CLUSTER_ID_LEN) {
        rc = kms_err_set(err, KMS_ECORRUPT, "rekey: replicated keyring has no cluster id");
        goto out;
    }
    if ((rc = kms_rekey_session_combine(rk, ek->threshold, root, err)) == 0) {
        rc = kms_keyring_decrypt(ek, root, &kr, err);
    }
    if (rc != 0) {
        kms_rekey_session_reset_shares(rk);
        rc = kms_err_set(err, KMS_EAUTH,
                         "the %u shares given do not reconstruct this cluster's current root key "
                         "(a wrong or mistyped share, another cluster's, or one replaced by an "
                         "earlier rekey); progress reset, the rekey stays open (nonce %s)",
                         ek->threshold, rk->nonce);
        kms_log(KMS_LOG_WARN, "keys", "rekey: wrong set of shares; progress reset", NULL);
        goto out;
    }
    if ((rc = kms_root_key_generate(nroot, err)) != 0 ||
        (rc = kms_keyring_encrypt(kr, nroot, n, k, &nek, err)) != 0 ||
        (rc = kms_shamir_split(nroot, KMS_ROOT_KEY_LEN, n, k, false, shares, err)) != 0 ||
        (rc = kms_rekey_root_wrap(root, ek->cluster_id.data, nroot, wrap, err)) != 0) {
        kms_err_wrap(err, rc, "rekey");
        goto out;
    }
    /* PKCS#11 seal: the new root key must be wrapped by the token too, or
     * no replica could unseal itself after the rekey. */
    if (ek->hsm != NULL) {
        if (!kmsd_hsm_enabled(d)) {
            rc = kms_err_set(err, KMS_ECONFIG,
                             "rekey: the cluster uses the PKCS#11 seal but this leader has no "
                             "seal.type pkcs11: move leadership to a replica configured with "
                             "the token (kmsctl operator transfer-leader) and start again");
            goto out;
        }
        if ((rc = kmsd_hsm_wrap(d, ek->cluster_id.data, nroot, &nek->hsm, err)) != 0) {
            kms_err_wrap(err, rc, "rekey: wrapping the new root key in the token");
            goto out;
        }
    }
    for (unsigned i = 0; i < n; i++) {
        char buf[KMS_SHARE_TEXT_MAX];
        if ((rc = kms_share_format(&shares[i], buf, sizeof(buf), err)) != 0) {
            kms_err_wrap(err, rc, "rekey: share %u", i + 1);
            goto out;
        }
        o->texts[i] = strdup(buf);
        OPENSSL_cleanse(buf, sizeof(buf));
        if (o->texts[i] == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "rekey: out of memory");
            goto out;
        }
        o->n = i + 1;
    }
    rke.keyring = nek;
    rke.wrapped_root.data = wrap;
    rke.wrapped_root.len = sizeof(wrap);
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_REKEY_KEYRING;
    e.rekey_keyring = &rke;
    memset(&res, 0, sizeof(res));
    kmsd_keyring_write_lock();
    rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, err);
    kmsd_keyring_write_unlock();
    if (rc == 0 && res.code != 0) {
        /* Refused by the state machine (a rotation in between): nothing changed. */
        kms_rekey_session_reset_shares(rk);
        rc = kms_err_set(err, res.code, "rekey refused: %s; progress reset, the rekey stays "
                         "open (nonce %s)", res.msg, rk->nonce);
        goto out;
    }
    if (rc != 0) {
        /* Unknown outcome: the entry may still commit. Watch for it a while,
         * and hand the new shares out in any case: losing them once the
         * entry commits would lose every disk. */
        uint64_t until = kms_mono_ms() + d->opt.request_wait_ms;
        bool committed = false;
        for (;;) {
            /* The mark before the check: an entry applied after it ends the
             * wait at once. Each wait still ends after 100 ms, a re-check
             * as the sleep it replaces did. */
            uint64_t mark = kmsd_applied_mark(d), now;
            if ((committed = keyring_under(d, nroot)) || (now = kms_mono_ms()) >= until ||
                atomic_load(&d->stopping)) {
                break;
            }
            (void)kmsd_wait_applied_past(d, mark, until - now < 100 ? (unsigned)(until - now)
                                                                    : 100u);
        }
        if (!committed) {
            snprintf(o->note, sizeof(o->note),
                     "the rekey was not confirmed (%s): it may still commit. Keep BOTH the old "
                     "and these new shares until kmsctl status shows %u shares, threshold %u",
                     err->msg, n, k);
            kms_log(KMS_LOG_ERROR, "keys", "rekey commit not confirmed; new shares handed out",
                    "error", err->msg, NULL);
        }
        kms_err_clear(err);
    }
    pthread_mutex_lock(&d->mu);
    if (o->note[0] == '\0' && d->unsealed && d->root != NULL) {
        memcpy(d->root, nroot, KMS_ROOT_KEY_LEN);
    }
    pthread_mutex_unlock(&d->mu);
    if (o->note[0] == '\0') {
        /* This node switched above: wipe the in-memory wrap now. */
        uint8_t w[64];
        size_t wl = 0;
        uint64_t wi = 0;
        kms_store_rekey_wrap_take(d->store, w, sizeof(w), &wl, &wi);
        OPENSSL_cleanse(w, sizeof(w));
        kms_logf(KMS_LOG_WARN, "keys", "rekeyed: new root key with %u shares, threshold %u; "
                 "the old shares no longer unseal", n, k);
    }
    kms_rekey_session_clear(rk);
    rc = 0;
out:
    if (rc != 0 && o->texts != NULL) {
        for (unsigned i = 0; i < o->n; i++) {
            OPENSSL_cleanse(o->texts[i], strlen(o->texts[i]));
            free(o->texts[i]);
        }
        free(o->texts);
        o->texts = NULL;
        o->n = 0;
    }
    OPENSSL_cleanse(wrap, sizeof(wrap));
    if (nek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(nek, NULL);
    }
    kms_keyring_unref(kr);
    kms_secmem_free(shares, shares != NULL ? sizeof(*shares) * n : 0);
    kms_secmem_free(nroot, KMS_ROOT_KEY_LEN);
    kms_secmem_free(root, KMS_ROOT_KEY_LEN);
    return rc;
}

/* The share is wiped by the trampoline (KMSD_CALL_WIPE). */
int kmsd_rekey_update_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__RekeyUpdateRequest *r = (const Kmsd__V1__RekeyUpdateRequest *)c->req;
    Kmsd__V1__RekeyUpdateResponse resp = KMSD__V1__REKEY_UPDATE_RESPONSE__INIT;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct rekey_out o = {NULL, 0, ""};
    char nonce[KMS_REKEY_NONCE_HEX] = "";
    unsigned progress = 0;
    bool locked = false;
    int rc;

    if (kms_store_keyring_get(d->store, &ek, NULL) != 0) {
        rc = kms_err_set(&c->err, KMS_EUNINIT, "cluster is not initialised");
        goto out;
    }
    pthread_mutex_lock(&rk_mu);
    locked = true;
    if ((rc = session_get_locked(d)) != 0) {
        kms_err_set(&c->err, rc, "rekey: out of secure memory");
        goto out;
    }
    rc = kms_rekey_session_add(rk, r->nonce, r->share, ek->threshold, &progress, &c->err);
    audit(c->call, "rekey-update", r->nonce, progress, ek->threshold);
    if (rc != 0) {
        goto out;
    }
    snprintf(nonce, sizeof(nonce), "%s", rk->nonce);
    resp.nonce = nonce;
    resp.progress = progress;
    resp.required = ek->threshold;
    if (progress < ek->threshold) {
        kms_logf(KMS_LOG_INFO, "keys", "rekey progress %u/%u", progress, ek->threshold);
        kmsd_call_reply(c, &resp.base);
        goto out;
    }
    resp.threshold = rk->new_threshold;
    if ((rc = rekey_complete_locked(d, ek, &o, &c->err)) != 0) {
        goto out;
    }
    pthread_mutex_unlock(&rk_mu);
    locked = false;
    kms_log(KMS_LOG_INFO, "audit", o.note[0] ? "rekey commit unconfirmed" : "rekey completed",
            "nonce", nonce, NULL);
    resp.complete = o.note[0] == '\0';
    resp.note = o.note;
    resp.n_shares = o.n;
    resp.shares = o.texts;
    kmsd_call_reply(c, &resp.base);
out:
    if (locked) {
        pthread_mutex_unlock(&rk_mu);
    }
    if (o.texts != NULL) {
        for (unsigned i = 0; i < o.n; i++) {
            OPENSSL_cleanse(o.texts[i], strlen(o.texts[i]));
            free(o.texts[i]);
        }
        free(o.texts);
    }
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return rc;
}

int kmsd_rekey_follow_locked(struct kmsd *d, const Kmsd__V1__EncryptedKeyring *ek,
                             struct kms_keyring **out, struct kms_err *err)
{
    uint8_t wrap[64];
    uint8_t *nroot = kms_secmem_alloc(KMS_ROOT_KEY_LEN);
    size_t wl = 0;
    uint64_t index = 0;
    int rc;

    *out = NULL;
    kms_store_rekey_wrap_take(d->store, wrap, sizeof(wrap), &wl, &index);
    if (wl == 0) {
        rc = kms_err_set(err, KMS_ENOTFOUND, "no rekey to follow");
        goto out;
    }
    if (nroot == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "rekey: out of secure memory");
        goto out;
    }
    if (ek->cluster_id.len != KMS_CLUSTER_ID_LEN ||
        (rc = kms_rekey_root_unwrap(d->root, ek->cluster_id.data, wrap, wl, nroot, err)) != 0 ||
        (rc = kms_keyring_decrypt(ek, nroot, out, err)) != 0) {
        rc = kms_err_set(err, KMS_EAUTH,
                         "rekey at index %" PRIu64 " cannot be followed from this node's root "
                         "key: seal it and unseal it with the new shares",
                         index);
        goto out;
    }
    memcpy(d->root, nroot, KMS_ROOT_KEY_LEN);
    kms_logf(KMS_LOG_WARN, "keys", "rekey at index %" PRIu64 " applied: switched to the new "
             "root key without a restart", index);
    rc = 0;
out:
    OPENSSL_cleanse(wrap, sizeof(wrap));
    kms_secmem_free(nroot, KMS_ROOT_KEY_LEN);
    return rc;
}
