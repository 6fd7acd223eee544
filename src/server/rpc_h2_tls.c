/*
 * The h2 transport's TLS contexts (rpc_h2_internal.h): one SSL_CTX per
 * server built from its files with kmsd's Talos-port policy, and the swap
 * on reload. Threads and ownership: rpc_h2.c's header comment.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "kms_log.h"
#include "rpc_h2_internal.h"

static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
    static const unsigned char h2[] = "\x02h2";
    unsigned char *sel = NULL;
    (void)ssl;
    (void)arg;
    if (SSL_select_next_proto(&sel, outlen, h2, 3, in, inlen) != OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_ALERT_FATAL; /* gRPC needs h2 */
    }
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

/* A new SSL_CTX from the server's files (rpc_tls_load reads and checks
 * them). NULL with err set. Any thread. */
SSL_CTX *rpc_h2_ctx_build(struct kms_rpc_server *srv, struct kms_err *err)
{
    char *cert = NULL, *key = NULL, *roots = NULL;
    SSL_CTX *ctx = NULL, *ret = NULL;
    BIO *b = NULL;
    X509 *x = NULL;
    EVP_PKEY *pk = NULL;

    if (rpc_tls_load(srv, &cert, &key, &roots, err) != 0) {
        goto out;
    }
    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL ||
        SSL_CTX_set_min_proto_version(ctx, srv->allow_tls12 && kms_rpc_tls12_allowed()
                                               ? TLS1_2_VERSION
                                               : TLS1_3_VERSION) != 1) {
        kms_err_set(err, KMS_ETLS, "cannot create a TLS context");
        goto out;
    }
    if ((b = BIO_new_mem_buf(cert, -1)) == NULL ||
        (x = PEM_read_bio_X509(b, NULL, NULL, NULL)) == NULL ||
        SSL_CTX_use_certificate(ctx, x) != 1) {
        kms_err_set(err, KMS_ETLS, "certificate %s unusable", srv->cert_file);
        goto out;
    }
    for (;;) { /* the rest of the chain */
        X509 *ca = PEM_read_bio_X509(b, NULL, NULL, NULL);
        if (ca == NULL) {
            ERR_clear_error(); /* end of file */
            break;
        }
        if (SSL_CTX_add1_chain_cert(ctx, ca) != 1) {
            X509_free(ca);
            kms_err_set(err, KMS_ETLS, "certificate chain %s unusable", srv->cert_file);
            goto out;
        }
        X509_free(ca);
    }
    BIO_free(b);
    if ((b = BIO_new_mem_buf(key, -1)) == NULL ||
        (pk = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL)) == NULL ||
        SSL_CTX_use_PrivateKey(ctx, pk) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        kms_err_set(err, KMS_ETLS, "key %s unusable or not the certificate's", srv->key_file);
        goto out;
    }
    /* Talos never resumes: no tickets, no session cache. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, NULL);
    ret = ctx;
    ctx = NULL;
out:
    ERR_clear_error();
    EVP_PKEY_free(pk);
    X509_free(x);
    BIO_free(b);
    SSL_CTX_free(ctx);
    free(cert);
    kms_rpc_free_secret(key);
    free(roots);
    return ret;
}

/* The context for the next handshake, with a reference for the caller;
 * applies a pending reload first (the old context stays when the files are
 * unusable). Loop threads. */
SSL_CTX *rpc_h2_ctx_get(struct kms_rpc_server *srv)
{
    struct rpc_h2 *h = srv->h2;
    SSL_CTX *ctx;

    pthread_mutex_lock(&srv->tls_mu);
    if (atomic_exchange(&srv->reload, false)) {
        struct kms_err err;
        SSL_CTX *n;
        kms_err_clear(&err);
        if ((n = rpc_h2_ctx_build(srv, &err)) == NULL) {
            kms_log(KMS_LOG_ERROR, "rpc", "TLS reload failed, keeping the current certificate",
                    "addr", srv->listen, "error", err.msg, NULL);
        } else {
            SSL_CTX_free(h->ctx);
            h->ctx = n;
            kms_log(KMS_LOG_INFO, "rpc", "TLS certificate reloaded", "addr", srv->listen, NULL);
        }
    }
    ctx = h->ctx;
    SSL_CTX_up_ref(ctx);
    pthread_mutex_unlock(&srv->tls_mu);
    return ctx;
}
