/*
 * Private helpers shared by rpc_server.c, rpc_client.c and tls_policy.c.
 * Not part of the kms_rpc API.
 */
#ifndef KMS_RPC_INTERNAL_H
#define KMS_RPC_INTERNAL_H

#include <stddef.h>

#include "kms_err.h"

/* Reads a whole (PEM) file into a NUL-terminated malloc'd string; limit 1 MiB.
 * `what` names the file in the error ("certificate"). */
int kms_rpc_read_pem(const char *path, const char *what, char **out, struct kms_err *err);

/* Checks that cert_pem parses as at least one certificate, key_pem as a
 * private key, and that they match. ca_pem (optional) must hold at least
 * one certificate. */
int kms_rpc_check_tls(const char *cert_pem, const char *key_pem, const char *ca_pem,
                      struct kms_err *err);

/* Wipes (OPENSSL_cleanse) and frees a key PEM. NULL is accepted. */
void kms_rpc_free_secret(char *pem);

#endif /* KMS_RPC_INTERNAL_H */
