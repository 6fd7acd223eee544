#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_authz.h"

#include "kmsd/v1/entry.pb-c.h"
#include "kmsd/v1/record.pb-c.h"

/* Certificates that verified recently. Every Forward (one per Seal sent to
 * a follower) arrives on the same few connections with the same peer
 * certificate; parsing the PEM and running X509_verify_cert for each one
 * was the largest CPU cost of a Seal on the leader (bench/bench_seal.py
 * profile). A hit needs the exact same PEM bytes, the same store, an entry
 * younger than VCACHE_TTL_MS and a certificate not yet expired. Only
 * successes are kept. The cache belongs to one kmsd_authz, so a reload of
 * the CA files (kmsd_authz_load) starts with an empty one. */
#define VCACHE_N 8
#define VCACHE_TTL_MS 10000u

struct vcache_entry {
    char *pem;        /* owned; NULL = empty slot */
    bool cluster;     /* verified against the cluster store (else operator) */
    char cn[256];
    uint64_t at_ms;   /* kms_mono_ms() of the verification */
    time_t not_after; /* the certificate's notAfter */
};

struct kmsd_authz {
    X509_STORE *cluster;
    X509_STORE *operator;
    pthread_mutex_t vc_mu;
    struct vcache_entry vc[VCACHE_N];
    unsigned vc_next;
};

static pthread_rwlock_t authz_lock = PTHREAD_RWLOCK_INITIALIZER;

static int store_load(const char *file, X509_STORE **out, struct kms_err *err)
{
    X509_STORE *st = X509_STORE_new();
    if (st == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    if (X509_STORE_load_file(st, file) != 1) {
        X509_STORE_free(st);
        return kms_err_set(err, KMS_ETLS, "cannot load CA file %s", file);
    }
    *out = st;
    return 0;
}

static void authz_destroy(struct kmsd_authz *a)
{
    if (a != NULL) {
        X509_STORE_free(a->cluster);
        X509_STORE_free(a->operator);
        for (size_t i = 0; i < VCACHE_N; i++) {
            free(a->vc[i].pem);
        }
        pthread_mutex_destroy(&a->vc_mu);
        free(a);
    }
}

int kmsd_authz_load(struct kmsd *d, struct kms_err *err)
{
    struct kmsd_authz *a = calloc(1, sizeof(*a)), *old;
    int rc;

    if (a == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&a->vc_mu, NULL);
    if ((rc = store_load(d->opt.cluster_ca, &a->cluster, err)) != 0 ||
        (rc = store_load(d->opt.operator_ca, &a->operator, err)) != 0) {
        authz_destroy(a);
        return rc;
    }
    pthread_rwlock_wrlock(&authz_lock);
    old = d->authz;
    d->authz = a;
    pthread_rwlock_unlock(&authz_lock);
    authz_destroy(old);
    return 0;
}

void kmsd_authz_free(struct kmsd *d)
{
    pthread_rwlock_wrlock(&authz_lock);
    authz_destroy(d->authz);
    d->authz = NULL;
    pthread_rwlock_unlock(&authz_lock);
}

/* ---- certificate names -------------------------------------------------- */

int kmsd_authz_node_cn_parse(const char *cn, uint64_t *id)
{
    static const char prefix[] = "kmsd-node-";
    const size_t plen = sizeof(prefix) - 1;
    uint64_t v = 0;
    size_t i;

    if (cn == NULL || strncmp(cn, prefix, plen) != 0) {
        return KMS_EDENIED;
    }
    cn += plen;
    if (cn[0] < '1' || cn[0] > '9') { /* no empty id, no leading zero, no sign */
        return KMS_EDENIED;
    }
    for (i = 0; cn[i] != '\0'; i++) {
        unsigned digit;
        if (cn[i] < '0' || cn[i] > '9' || i >= 20) {
            return KMS_EDENIED;
        }
        digit = (unsigned)(cn[i] - '0');
        if (v > (UINT64_MAX - digit) / 10) {
            return KMS_EDENIED;
        }
        v = v * 10 + digit;
    }
    *id = v;
    return 0;
}

/* The subject's only CN, into cn; KMS_EDENIED for none or several, or one
 * with an embedded NUL. */
static int cert_single_cn(X509 *cert, char *cn, size_t cnlen)
{
    X509_NAME *name = X509_get_subject_name(cert);
    int first, more;
    X509_NAME_ENTRY *ent;
    ASN1_STRING *data;
    unsigned char *utf8 = NULL;
    int n;

    cn[0] = '\0';
    if (name == NULL || (first = X509_NAME_get_index_by_NID(name, NID_commonName, -1)) < 0) {
        return KMS_EDENIED;
    }
    more = X509_NAME_get_index_by_NID(name, NID_commonName, first);
    if (more >= 0) {
        return KMS_EDENIED;
    }
    ent = X509_NAME_get_entry(name, first);
    data = ent != NULL ? X509_NAME_ENTRY_get_data(ent) : NULL;
    if (data == NULL || (n = ASN1_STRING_to_UTF8(&utf8, data)) < 0) {
        return KMS_EDENIED;
    }
    if ((size_t)n >= cnlen || memchr(utf8, '\0', (size_t)n) != NULL) {
        OPENSSL_free(utf8);
        return KMS_EDENIED;
    }
    memcpy(cn, utf8, (size_t)n);
    cn[n] = '\0';
    OPENSSL_free(utf8);
    return 0;
}

static X509 *pem_cert(const char *pem)
{
    BIO *bio = pem != NULL ? BIO_new_mem_buf(pem, -1) : NULL;
    X509 *cert = bio != NULL ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    return cert;
}

int kmsd_authz_pem_node_id(const char *pem, uint64_t *id)
{
    X509 *cert = pem_cert(pem);
    char cn[256];
    int rc;

    if (cert == NULL) {
        return KMS_EFORMAT;
    }
    rc = cert_single_cn(cert, cn, sizeof(cn));
    if (rc == 0) {
        rc = kmsd_authz_node_cn_parse(cn, id);
    }
    X509_free(cert);
    return rc;
}

/* Caller holds authz_lock (read) and a != NULL. True with cn filled on a
 * hit. */
static bool vcache_get(struct kmsd_authz *a, const char *pem, bool cluster, char *cn,
                       size_t cnlen)
{
    uint64_t now = kms_mono_ms();
    time_t wall = time(NULL);
    bool hit = false;

    pthread_mutex_lock(&a->vc_mu);
    for (size_t i = 0; i < VCACHE_N && !hit; i++) {
        struct vcache_entry *e = &a->vc[i];
        if (e->pem != NULL && e->cluster == cluster && now - e->at_ms < VCACHE_TTL_MS &&
            wall < e->not_after && strcmp(e->pem, pem) == 0) {
            snprintf(cn, cnlen, "%s", e->cn);
            hit = true;
        }
    }
    pthread_mutex_unlock(&a->vc_mu);
    return hit;
}

/* Caller holds authz_lock (read). Remembers a certificate that verified. */
static void vcache_put(struct kmsd_authz *a, const char *pem, bool cluster, const char *cn,
                       X509 *cert)
{
    struct tm tm;
    struct vcache_entry *e;
    char *copy;

    memset(&tm, 0, sizeof(tm));
    if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1 || (copy = strdup(pem)) == NULL) {
        return; /* not cached: verified again next time */
    }
    pthread_mutex_lock(&a->vc_mu);
    e = &a->vc[a->vc_next++ % VCACHE_N];
    free(e->pem);
    e->pem = copy;
    e->cluster = cluster;
    snprintf(e->cn, sizeof(e->cn), "%s", cn);
    e->at_ms = kms_mono_ms();
    e->not_after = timegm(&tm);
    pthread_mutex_unlock(&a->vc_mu);
}

/* Verifies the caller's leaf certificate against one store; returns the
 * certificate's only CN in cn (empty when it has none or several). */
static bool verify(struct kmsd *d, struct kms_rpc_call *call, bool cluster, char *cn,
                   size_t cnlen)
{
    const char *pem = kms_rpc_call_peer_cert_pem(call);
    X509 *cert = NULL;
    X509_STORE_CTX *ctx = NULL;
    bool ok = false;

    cn[0] = '\0';
    if (pem == NULL) {
        return false;
    }
    pthread_rwlock_rdlock(&authz_lock);
    if (d->authz == NULL) {
        goto out;
    }
    if (vcache_get(d->authz, pem, cluster, cn, cnlen)) {
        ok = true;
        goto out;
    }
    cert = pem_cert(pem);
    if (cert == NULL) {
        goto out;
    }
    if (cert_single_cn(cert, cn, cnlen) != 0) {
        cn[0] = '\0';
    }
    if ((ctx = X509_STORE_CTX_new()) != NULL &&
        X509_STORE_CTX_init(ctx, cluster ? d->authz->cluster : d->authz->operator, cert,
                            NULL) == 1) {
        X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
        ok = X509_verify_cert(ctx) == 1;
    }
    if (ok) {
        vcache_put(d->authz, pem, cluster, cn, cert);
    }
out:
    pthread_rwlock_unlock(&authz_lock);
    X509_STORE_CTX_free(ctx);
    X509_free(cert);
    return ok;
}

bool kmsd_authz_node(struct kmsd *d, struct kms_rpc_call *call, uint64_t *id)
{
    char cn[256];
    if (!verify(d, call, true, cn, sizeof(cn))) {
        return false;
    }
    return kmsd_authz_node_cn_parse(cn, id) == 0;
}

bool kmsd_authz_operator(struct kmsd *d, struct kms_rpc_call *call)
{
    char cn[256];
    if (!verify(d, call, false, cn, sizeof(cn))) {
        return false;
    }
    /* A node or plugin certificate never acts as an operator, even from a
     * shared CA. */
    return strncmp(cn, "kmsd-node-", 10) != 0 &&
           strncmp(cn, KMSD_K8S_CN_PREFIX, sizeof(KMSD_K8S_CN_PREFIX) - 1) != 0;
}

bool kmsd_authz_k8s_cn_valid(const char *cn)
{
    const size_t plen = sizeof(KMSD_K8S_CN_PREFIX) - 1;
    size_t n = 0;

    if (cn == NULL || strncmp(cn, KMSD_K8S_CN_PREFIX, plen) != 0) {
        return false;
    }
    for (cn += plen; cn[n] != '\0'; n++) {
        char c = cn[n];
        if (n >= 64 || !((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                         c == '-')) {
            return false;
        }
    }
    return n > 0;
}

bool kmsd_authz_k8s(struct kmsd *d, struct kms_rpc_call *call)
{
    char cn[256];
    if (!verify(d, call, false, cn, sizeof(cn))) {
        return false;
    }
    return kmsd_authz_k8s_cn_valid(cn);
}

/* ---- the method table ---------------------------------------------------- */

static const struct kmsd_method_policy methods[] = {
    /* node to node: only what a follower needs */
    {"/kmsd.v1.Cluster/Forward", KMSD_AUTH_NODE},
    /* peer unseal (kmsd_peer.h): membership, gate and limits in the handler */
    {"/kmsd.v1.Cluster/PeerUnseal", KMSD_AUTH_NODE | KMSD_RUN_PARK},
    /* reads and per-replica actions: the replica that was called */
    {"/kmsd.v1.Operator/Status", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    {"/kmsd.v1.Operator/Unseal", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    {"/kmsd.v1.Operator/Seal", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    {"/kmsd.v1.Operator/MembersList", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    {"/kmsd.v1.Operator/KeysList", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    {"/kmsd.v1.Operator/KeysShow", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    /* online snapshot: any replica, reads its own applied state */
    {"/kmsd.v1.Operator/SnapshotBegin", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    {"/kmsd.v1.Operator/SnapshotChunk", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_NO_AUDIT},
    {"/kmsd.v1.Operator/SnapshotEnd", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK},
    /* writes and leadership: on the leader, under the operator's identity */
    {"/kmsd.v1.Operator/Initialize", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/Rotate", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/SealMigrate", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/Rewrap", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/RetireTerm", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/KeysRevoke", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/MembersAdd", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/MembersRemove", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/StepDown", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/TransferLeader", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    /* rekey (rekey.c): the session lives on the leader */
    {"/kmsd.v1.Operator/RekeyInit", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/RekeyStatus", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/RekeyUpdate", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    {"/kmsd.v1.Operator/RekeyCancel", KMSD_AUTH_OPERATOR | KMSD_RUN_PARK | KMSD_RUN_LEADER},
    /* Kubernetes KMS v2 (kmsd-k8s-plugin): the replica that was called; lock-free
     * health and in-memory crypto, so they run on the worker (kms_v2_api.c) */
    {"/kmsd.v1.KubernetesKms/Status", KMSD_AUTH_K8S},
    {"/kmsd.v1.KubernetesKms/Encrypt", KMSD_AUTH_K8S},
    {"/kmsd.v1.KubernetesKms/Decrypt", KMSD_AUTH_K8S},
};

const struct kmsd_method_policy *kmsd_authz_methods(size_t *n)
{
    *n = sizeof(methods) / sizeof(methods[0]);
    return methods;
}

const struct kmsd_method_policy *kmsd_authz_method(const char *path)
{
    for (size_t i = 0; path != NULL && i < sizeof(methods) / sizeof(methods[0]); i++) {
        if (strcmp(methods[i].path, path) == 0) {
            return &methods[i];
        }
    }
    return NULL;
}

/* ---- entries ------------------------------------------------------------- */

bool kmsd_authz_entry_forwardable(int op_case)
{
    /* The peer unseal gate: closed by an operator seal of a follower,
     * reopened by a follower unsealed with k shares; checked by the leader
     * (kmsd_peer_gate_forward_check) and, for a reopen, by every peer.
     * TouchBatch: checked by kmsd_authz_touch_check. */
    return op_case == KMSD__V1__ENTRY__OP_PUT_RECORD ||
           op_case == KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE ||
           op_case == KMSD__V1__ENTRY__OP_TOUCH_BATCH;
}

int kmsd_authz_touch_check(const Kmsd__V1__TouchBatch *tb, size_t max, int64_t now_ms,
                           struct kms_err *err)
{
    if (tb == NULL || tb->n_touches == 0) {
        return kms_err_set(err, KMS_EFORMAT, "touch batch: no touches");
    }
    if (tb->n_touches > max) {
        return kms_err_set(err, KMS_EFORMAT, "touch batch: %zu touches, at most %zu",
                           tb->n_touches, max);
    }
    for (size_t i = 0; i < tb->n_touches; i++) {
        const Kmsd__V1__Touch *t = tb->touches[i];
        if (t == NULL || t->key_id.len != 16 || t->key_id.data == NULL) {
            return kms_err_set(err, KMS_EFORMAT, "touch batch: touch #%zu has no 16-byte key id",
                               i + 1);
        }
        /* A batch holds unseals of the last interval (at most 24 h), kept a
         * little longer when no leader took it: nothing older than 25 h. */
        if (t->at <= 0 || t->at > now_ms + 60000 || t->at < now_ms - 25 * 3600000LL) {
            return kms_err_set(err, KMS_EFORMAT,
                               "touch batch: touch #%zu has time %" PRId64 " (now %" PRId64 ")",
                               i + 1, t->at, now_ms);
        }
    }
    return 0;
}

int kmsd_authz_record_check(const Kmsd__V1__SealedRecord *rec, uint32_t max_term,
                            struct kms_err *err)
{
    size_t n = 0;
    int rc;

    if ((rc = kms_record_validate(rec, err)) != 0) {
        return rc;
    }
    for (; rec->node_uuid[n] != '\0'; n++) {
        unsigned char c = (unsigned char)rec->node_uuid[n];
        if (c < 0x21 || c > 0x7e || n >= KMS_NODE_UUID_MAX) {
            return kms_err_set(err, KMS_EFORMAT,
                               "record: node uuid must be 1..%d printable ASCII bytes",
                               KMS_NODE_UUID_MAX);
        }
    }
    if (max_term == 0) {
        return kms_err_set(err, KMS_EFORMAT, "record: the cluster has no keyring yet");
    }
    if (rec->term > max_term) {
        return kms_err_set(err, KMS_EFORMAT, "record: term %u does not exist (keyring has 1..%u)",
                           rec->term, max_term);
    }
    if (rec->revoked_at != 0 || rec->last_access_at != 0) {
        return kms_err_set(err, KMS_EFORMAT, "record: a new record cannot be revoked or used");
    }
    if (rec->origin_term != 0 || rec->wrapped.len != 0) {
        return kms_err_set(err, KMS_EFORMAT, "record: a new record cannot be rewrapped");
    }
    return 0;
}

int kmsd_authz_keyring_check(const Kmsd__V1__EncryptedKeyring *ek, const uint8_t root[32],
                             const Kmsd__V1__EncryptedKeyring *cur, bool init,
                             struct kms_err *err)
{
    struct kms_keyring *kr = NULL;
    int rc;

    if (ek == NULL || root == NULL) {
        return kms_err_set(err, KMS_EINVAL, "keyring: invalid argument");
    }
    if (init && cur != NULL) {
        return kms_err_set(err, KMS_EEXIST, "cluster is already initialised");
    }
    if (!init && cur == NULL) {
        return kms_err_set(err, KMS_EUNINIT, "keyring: no keyring to replace");
    }
    if ((rc = kms_keyring_decrypt(ek, root, &kr, err)) != 0) {
        return kms_err_wrap(err, rc, "keyring does not decrypt under the root key held");
    }
    if (ek->active_term == 0 || kms_keyring_active_term(kr) != ek->active_term) {
        rc = kms_err_set(err, KMS_EFORMAT, "keyring: active term %u (plaintext %u)",
                         ek->active_term, kms_keyring_active_term(kr));
        goto out;
    }
    if (cur != NULL) {
        if (cur->cluster_id.len != ek->cluster_id.len ||
            memcmp(cur->cluster_id.data, ek->cluster_id.data, ek->cluster_id.len) != 0) {
            rc = kms_err_set(err, KMS_EFORMAT, "keyring: cluster id differs from the cluster's");
            goto out;
        }
        if (ek->active_term < cur->active_term) {
            rc = kms_err_set(err, KMS_EFORMAT, "keyring: active term %u is below the current %u",
                             ek->active_term, cur->active_term);
            goto out;
        }
        if (ek->share_count != cur->share_count || ek->threshold != cur->threshold) {
            rc = kms_err_set(err, KMS_EFORMAT, "keyring: share count or threshold changed");
            goto out;
        }
    }
    rc = 0;
out:
    kms_keyring_unref(kr);
    return rc;
}
