/*
 * kmsd.v1.KubernetesKms (kmsd_k8s.h): wrap and unwrap Kubernetes KMS v2 DEK
 * seeds under a key derived from the keyring's terms (kms_k8s_wrap.h).
 *
 * Revocation does not apply here: the seeds are not records (nothing is
 * stored per seed), so `keys revoke` and node revocation cannot reach them;
 * a ciphertext stays decryptable for as long as its term is in the keyring,
 * which is until an operator retires it (kmsctl operator retire-term; the
 * procedure in docs/operations.md rewrites Kubernetes' data first).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_k8s_wrap.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kmsd.h"
#include "kmsd_cluster.h"
#include "kmsd_k8s.h"

#include "k8s/kms/v2/api.pb-c.h"

static void finish_err(struct kms_rpc_call *call, const char *op, const char *uid, int code,
                       const char *msg)
{
    kms_log(KMS_LOG_INFO, "k8s", "request failed", "op", op, "error", kms_errname(code),
            "detail", msg, "uid", uid != NULL ? uid : "", "peer", kms_rpc_call_peer(call),
            "cn", kms_rpc_call_peer_cn(call) != NULL ? kms_rpc_call_peer_cn(call) : "", NULL);
    kms_rpc_call_finish(call, kmsd_grpc_status(code), msg, NULL, 0);
}

/* The replica's own health for the plugin; "ok" or the reason. */
static const char *health(struct kmsd *d, const struct kms_keyring *kr)
{
    if (atomic_load(&d->stopping)) {
        return "kmsd is shutting down";
    }
    if (kr == NULL) {
        return kmsd_is_initialized(d) ? "kmsd replica is sealed" : "kmsd is not initialised";
    }
    if (!kms_raft_lease_valid(d->raft)) {
        return "kmsd replica has no quorum (read lease not held)";
    }
    return "ok";
}

int kmsd_k8s_status_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    struct kms_rpc_call *call = c->call;
    V2__StatusResponse resp = V2__STATUS_RESPONSE__INIT;
    struct kms_keyring *kr = kmsd_keyring_get(d);
    char key_id[KMS_K8S_KEY_ID_MAX] = "";

    if (kr != NULL) {
        kms_k8s_active_key_id(kr, key_id);
    }
    resp.version = "v2";
    resp.healthz = (char *)health(d, kr);
    resp.key_id = key_id;
    kmsd_call_finish_msg(call, &resp.base);
    kms_keyring_unref(kr);
    return 0;
}

int kmsd_k8s_encrypt_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    struct kms_rpc_call *call = c->call;
    V2__EncryptRequest *rq = v2__encrypt_request__unpack(NULL, c->len, c->raw);
    V2__EncryptResponse resp = V2__ENCRYPT_RESPONSE__INIT;
    struct kms_keyring *kr = NULL;
    uint8_t ct[KMS_K8S_MAX_CIPHERTEXT];
    size_t ctlen = 0;
    uint32_t term = 0;
    char key_id[KMS_K8S_KEY_ID_MAX];
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    if (rq == NULL) {
        finish_err(call, "encrypt", NULL, KMS_EFORMAT, "malformed EncryptRequest");
        goto out;
    }
    if ((kr = kmsd_keyring_get(d)) == NULL) {
        finish_err(call, "encrypt", rq->uid, KMS_ESEALED, "kmsd replica is sealed");
        goto out;
    }
    if ((rc = kms_k8s_wrap(kr, rq->plaintext.data, rq->plaintext.len, ct, &ctlen, &term,
                           &err)) != 0) {
        finish_err(call, "encrypt", rq->uid, rc, err.msg);
        goto out;
    }
    kms_k8s_key_id(kms_keyring_cluster_id(kr), term, key_id);
    resp.ciphertext.data = ct;
    resp.ciphertext.len = ctlen;
    resp.key_id = key_id;
    kmsd_call_finish_msg(call, &resp.base);
    kms_log(KMS_LOG_DEBUG, "k8s", "encrypt", "uid", rq->uid, "key_id", key_id, NULL);
out:
    kms_keyring_unref(kr);
    if (rq != NULL) {
        OPENSSL_cleanse(rq->plaintext.data, rq->plaintext.len);
        v2__encrypt_request__free_unpacked(rq, NULL);
    }
    return 0;
}

int kmsd_k8s_decrypt_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    struct kms_rpc_call *call = c->call;
    V2__DecryptRequest *rq = v2__decrypt_request__unpack(NULL, c->len, c->raw);
    V2__DecryptResponse resp = V2__DECRYPT_RESPONSE__INIT;
    struct kms_keyring *kr = NULL;
    uint8_t pt[KMS_K8S_MAX_CIPHERTEXT];
    size_t ptlen = 0;
    uint32_t term = 0;
    char key_id[KMS_K8S_KEY_ID_MAX], msg[200];
    struct kms_err err;
    int rc;

    kms_err_clear(&err);
    if (rq == NULL) {
        finish_err(call, "decrypt", NULL, KMS_EFORMAT, "malformed DecryptRequest");
        goto out;
    }
    if ((kr = kmsd_keyring_get(d)) == NULL) {
        finish_err(call, "decrypt", rq->uid, KMS_ESEALED, "kmsd replica is sealed");
        goto out;
    }
    if ((rc = kms_k8s_unwrap(kr, rq->ciphertext.data, rq->ciphertext.len, pt, &ptlen, &term,
                             &err)) != 0) {
        /* every replica holds the same keyring: a ciphertext that does not
         * authenticate here is wrong everywhere (INVALID_ARGUMENT ends the
         * plugin's failover); a missing term may only be missing here yet */
        finish_err(call, "decrypt", rq->uid,
                   rc == KMS_EAUTH || rc == KMS_EVERSION ? KMS_EFORMAT : rc, err.msg);
        goto out;
    }
    kms_k8s_key_id(kms_keyring_cluster_id(kr), term, key_id);
    if (rq->key_id != NULL && rq->key_id[0] != '\0' && strcmp(rq->key_id, key_id) != 0) {
        snprintf(msg, sizeof(msg), "key_id %.80s does not match the ciphertext's (%s)",
                 rq->key_id, key_id);
        finish_err(call, "decrypt", rq->uid, KMS_EFORMAT, msg);
        goto out;
    }
    resp.plaintext.data = pt;
    resp.plaintext.len = ptlen;
    kmsd_call_finish_msg(call, &resp.base); /* wipes its packed copy */
    kms_log(KMS_LOG_DEBUG, "k8s", "decrypt", "uid", rq->uid, "key_id", key_id, NULL);
out:
    OPENSSL_cleanse(pt, sizeof(pt));
    kms_keyring_unref(kr);
    if (rq != NULL) {
        v2__decrypt_request__free_unpacked(rq, NULL);
    }
    return 0;
}
