/*
 * Private helpers of the raft TLS transport (uv_tls*.c, tls_ctx.c).
 */
#ifndef KMS_TLS_INTERNAL_H
#define KMS_TLS_INTERNAL_H

#include <stddef.h>

#include <openssl/ssl.h>

#include "kms_err.h"

/* Builds a TLS 1.3-only, mutual-auth SSL_CTX from PEM files. On success *out
 * holds one reference the caller releases with SSL_CTX_free(). */
int kms_tls_ctx_new(const char *cert, const char *key, const char *ca, SSL_CTX **out,
                    struct kms_err *err);

/* Writes the last OpenSSL error of this thread into buf and clears the
 * thread's error queue. */
void kms_tls_errstr(char *buf, size_t size);

/* One-line subject of cert ("/CN=kmsd-node-1") for logs. */
void kms_tls_subject(const X509 *cert, char *buf, size_t size);

#endif /* KMS_TLS_INTERNAL_H */
