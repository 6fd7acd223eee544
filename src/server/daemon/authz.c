#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "kmsd.h"
#include "kmsd_authz.h"

struct kmsd_authz {
    X509_STORE *cluster;
    X509_STORE *operator;
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

/* Verifies the caller's leaf certificate against one store; returns the
 * certificate's CN in cn (may be empty). */
static bool verify(struct kmsd *d, struct kms_rpc_call *call, bool cluster, char *cn,
                   size_t cnlen)
{
    const char *pem = kms_rpc_call_peer_cert_pem(call);
    BIO *bio = NULL;
    X509 *cert = NULL;
    X509_STORE_CTX *ctx = NULL;
    bool ok = false;

    cn[0] = '\0';
    if (pem == NULL) {
        return false;
    }
    bio = BIO_new_mem_buf(pem, -1);
    cert = bio != NULL ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    if (cert == NULL) {
        goto out;
    }
    X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, (int)cnlen);
    pthread_rwlock_rdlock(&authz_lock);
    if (d->authz != NULL && (ctx = X509_STORE_CTX_new()) != NULL &&
        X509_STORE_CTX_init(ctx, cluster ? d->authz->cluster : d->authz->operator, cert,
                            NULL) == 1) {
        X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
        ok = X509_verify_cert(ctx) == 1;
    }
    pthread_rwlock_unlock(&authz_lock);
out:
    X509_STORE_CTX_free(ctx);
    X509_free(cert);
    BIO_free(bio);
    return ok;
}

bool kmsd_authz_node(struct kmsd *d, struct kms_rpc_call *call)
{
    char cn[256];
    if (!verify(d, call, true, cn, sizeof(cn))) {
        return false;
    }
    return strncmp(cn, "kmsd-node-", 10) == 0 && cn[10] != '\0';
}

bool kmsd_authz_operator(struct kmsd *d, struct kms_rpc_call *call)
{
    char cn[256];
    return verify(d, call, false, cn, sizeof(cn));
}
