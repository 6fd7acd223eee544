/*
 * SSL contexts and the node identity rule of the raft TLS transport
 * (kms_transport.h).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "kms_transport.h"
#include "tls_internal.h"

void kms_tls_errstr(char *buf, size_t size)
{
    unsigned long e = ERR_peek_last_error();
    if (e == 0) {
        snprintf(buf, size, "no OpenSSL error");
    } else {
        ERR_error_string_n(e, buf, size);
    }
    ERR_clear_error();
}

int kms_tls_ctx_new(const char *cert, const char *key, const char *ca, SSL_CTX **out,
                    struct kms_err *err)
{
    SSL_CTX *ctx = NULL;
    STACK_OF(X509_NAME) *names = NULL;
    char why[256];
    int rc = 0;

    *out = NULL;
    if (cert == NULL || key == NULL || ca == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "cert_file, key_file and ca_file are required");
        goto out;
    }
    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_method());
    if (ctx == NULL) {
        kms_tls_errstr(why, sizeof why);
        rc = kms_err_set(err, KMS_ETLS, "SSL_CTX_new: %s", why);
        goto out;
    }
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1) {
        kms_tls_errstr(why, sizeof why);
        rc = kms_err_set(err, KMS_ETLS, "TLS 1.3 not available: %s", why);
        goto out;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        kms_tls_errstr(why, sizeof why);
        rc = kms_err_set(err, KMS_ETLS, "certificate %s: %s", cert, why);
        goto out;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        kms_tls_errstr(why, sizeof why);
        rc = kms_err_set(err, KMS_ETLS, "private key %s: %s", key, why);
        goto out;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        kms_tls_errstr(why, sizeof why);
        rc = kms_err_set(err, KMS_ETLS, "private key %s does not match %s: %s", key, cert, why);
        goto out;
    }
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        kms_tls_errstr(why, sizeof why);
        rc = kms_err_set(err, KMS_ETLS, "CA file %s: %s", ca, why);
        goto out;
    }
    /* Tell clients which CAs we accept (informational; verification uses the
     * store loaded above). */
    names = SSL_load_client_CA_file(ca);
    if (names != NULL) {
        SSL_CTX_set_client_CA_list(ctx, names); /* takes ownership */
    }
    ERR_clear_error();
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /* No resumption: every connection proves its certificate again, and no
     * ticket keys live in memory. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    /* Free idle record buffers: connections mostly sit idle between heartbeats. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);

    *out = ctx;
    ctx = NULL;
out:
    SSL_CTX_free(ctx);
    return rc;
}

int kms_transport_cert_matches_id(const void *cert, uint64_t id)
{
    const X509_NAME *name;
    const X509_NAME_ENTRY *entry;
    const ASN1_STRING *cn;
    char want[48];
    int idx;
    int n;

    if (cert == NULL || id == 0) {
        return 0;
    }
    name = X509_get_subject_name((const X509 *)cert);
    if (name == NULL) {
        return 0;
    }
    idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
    if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0) {
        return 0; /* none, or ambiguous */
    }
    entry = X509_NAME_get_entry(name, idx);
    cn = entry != NULL ? X509_NAME_ENTRY_get_data(entry) : NULL;
    if (cn == NULL) {
        return 0;
    }
    n = snprintf(want, sizeof want, "kmsd-node-%" PRIu64, id);
    return ASN1_STRING_length(cn) == n &&
           memcmp(ASN1_STRING_get0_data(cn), want, (size_t)n) == 0;
}

void kms_tls_subject(const X509 *cert, char *buf, size_t size)
{
    const X509_NAME *name = cert != NULL ? X509_get_subject_name(cert) : NULL;
    if (name == NULL) {
        snprintf(buf, size, "(no certificate)");
        return;
    }
    X509_NAME_oneline(name, buf, (int)size);
}
