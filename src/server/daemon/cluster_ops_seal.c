/*
 * Initialisation, seal and keyring calls of kmsd.v1.Operator
 * (kmsd_cluster.h): Initialize, Unseal, Seal, Rotate, SealMigrate. Operator
 * pool threads; Initialize, Rotate and SealMigrate on the leader.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms_rpc.h"
#include "kmsd.h"
#include "kmsd_cluster.h"
#include "kmsd_peer.h"
#include "kmsd_seal.h"
#include "kmsd_share_recipients.h"

#include "kmsd/v1/cluster.pb-c.h"

int kmsd_op_init_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__InitRequest *r = (const Kmsd__V1__InitRequest *)c->req;
    Kmsd__V1__InitResponse resp = KMSD__V1__INIT_RESPONSE__INIT;
    char **shares = NULL, **enc = NULL;
    char cid[33];
    unsigned n = r->key_shares;
    int rc;

    if (n < 1 || n > 255 || r->key_threshold < 1 || r->key_threshold > n ||
        (r->key_threshold < 2 && !(n == 1 && r->key_threshold == 1))) {
        rc = kms_err_set(&c->err, KMS_EINVAL,
                         "key shares and threshold must satisfy 2 <= threshold <= shares <= 255");
        goto out;
    }
    if (!kmsd_is_initialized(d) && !kmsd_raft_is_member(d)) {
        /* Started outside initialCluster: no configuration to commit the
         * keyring to (it would wait for a leader that never comes). */
        rc = kms_err_set(&c->err, KMS_EUNINIT,
                         "this node is not a member of a cluster: it waits to be added (run "
                         "kmsctl operator members add on the cluster's leader), or run init "
                         "against a member of initialCluster");
        goto out;
    }
    if (r->n_share_recipients > 0 &&
        (rc = kmsd_share_recipients_check(r->share_recipients, r->n_share_recipients, n,
                                          &c->err)) != 0) {
        goto out; /* before init: nothing changed */
    }
    if ((rc = kmsd_init_cluster(d, n, r->key_threshold, &shares, cid, &c->err)) != 0) {
        goto out;
    }
    resp.n_shares = n;
    resp.shares = shares;
    resp.threshold = r->key_threshold;
    resp.cluster_id = cid;
    if (r->n_share_recipients > 0 &&
        kmsd_share_recipients_seal(r->share_recipients, shares, n, &enc) == 0) {
        resp.n_shares = 0;
        resp.n_encrypted_shares = n;
        resp.encrypted_shares = enc;
    }
    resp.recovery = kmsd_hsm_enabled(d);
    kmsd_call_reply(c, &resp.base);
    rc = 0;
out:
    kmsd_share_recipients_free(enc, n);
    if (shares != NULL) {
        for (unsigned i = 0; i < n; i++) {
            OPENSSL_cleanse(shares[i], strlen(shares[i]));
            free(shares[i]);
        }
        free(shares);
    }
    return rc;
}

/* The share is wiped by the trampoline (KMSD_CALL_WIPE). */
int kmsd_op_unseal_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__UnsealRequest *r = (const Kmsd__V1__UnsealRequest *)c->req;
    Kmsd__V1__UnsealResponse resp = KMSD__V1__UNSEAL_RESPONSE__INIT;
    unsigned progress = 0, threshold = 0;
    bool unsealed = false;
    int rc;

    if (r->reset) {
        kmsd_call_note(c, "reset");
    }
    rc = kmsd_unseal_submit(d, r->share, r->reset, &progress, &threshold, &unsealed, &c->err);
    if (rc != 0) {
        return rc;
    }
    if (unsealed) {
        kmsd_hsm_admin_sealed(d, false);
    }
    resp.sealed = !unsealed;
    resp.progress = progress;
    resp.threshold = threshold;
    kmsd_call_reply(c, &resp.base);
    return 0;
}

int kmsd_op_seal_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    Kmsd__V1__SealResponse resp = KMSD__V1__SEAL_RESPONSE__INIT;

    /* PKCS#11 seal: no auto-unseal until k recovery shares or a restart. */
    kmsd_hsm_admin_sealed(d, true);
    /* Seals; with unseal.peer this also closes the cluster's peer unseal gate. */
    if (kmsd_peer_operator_seal(d, &c->err) != 0) {
        return KMS_EUNAVAIL;
    }
    kmsd_call_reply(c, &resp.base);
    return 0;
}

int kmsd_op_rotate_cb(struct kmsd_call *c)
{
    Kmsd__V1__RotateResponse resp = KMSD__V1__ROTATE_RESPONSE__INIT;
    uint32_t term = 0;
    int rc;

    if ((rc = kmsd_rotate(c->d, &term, &c->err)) != 0) {
        return rc;
    }
    resp.active_term = term;
    kmsd_call_reply(c, &resp.base);
    return 0;
}

/* The shares are wiped by the trampoline (KMSD_CALL_WIPE). */
int kmsd_op_seal_migrate_cb(struct kmsd_call *c)
{
    const Kmsd__V1__SealMigrateRequest *r = (const Kmsd__V1__SealMigrateRequest *)c->req;
    Kmsd__V1__SealMigrateResponse resp = KMSD__V1__SEAL_MIGRATE_RESPONSE__INIT;
    uint32_t term = 0;
    int rc;

    rc = kmsd_seal_migrate(c->d, r->to, r->shares, r->n_shares, &term, &c->err);
    if (rc != 0) {
        return rc;
    }
    resp.seal_type = r->to;
    resp.active_term = term;
    kmsd_call_reply(c, &resp.base);
    return 0;
}
