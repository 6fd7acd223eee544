/*
 * Share recipients (operator init --share-recipients, operator unseal
 * --share-key): each key share encrypted to one holder's RSA public key
 * (RSA-OAEP, SHA-256, via OpenSSL EVP_PKEY), so no terminal shows all
 * shares. Text form:
 *   kmsenc1-<base64 of the RSA-OAEP ciphertext of the share text>
 * Conventions as in kms_crypto.h. Pure: any thread.
 */
#ifndef KMS_SHARE_SEAL_H
#define KMS_SHARE_SEAL_H

#include <stddef.h>

#include "kms_err.h"

#define KMS_SHARE_SEAL_PREFIX "kmsenc1-"
#define KMS_SHARE_SEAL_MIN_BITS 2048
#define KMS_SHARE_SEAL_MAX_TEXT 2200 /* up to RSA-8192: 8 + 4*ceil(1024/3) + NUL */

/* Checks that pem holds one RSA public key of at least 2048 bits
 * (KMS_EFORMAT otherwise, saying why). */
int kms_share_recipient_check(const char *pem, struct kms_err *err);
/* Encrypts share (a share text) to the RSA public key in pem. *out is
 * malloc'd text (free with free()). */
int kms_share_seal_to(const char *pem, const char *share, char **out, struct kms_err *err);
/* Decrypts an encrypted share text with the private key in pem (PEM, not
 * password protected) into out (cap >= KMS_SHARE_TEXT_MAX). KMS_EFORMAT for
 * a text that is not kmsenc1-..., KMS_EAUTH when this key cannot decrypt
 * it (another holder's share). out is wiped on failure. */
int kms_share_open_with(const char *key_pem, const char *enc, char *out, size_t cap,
                        struct kms_err *err);

#endif /* KMS_SHARE_SEAL_H */
