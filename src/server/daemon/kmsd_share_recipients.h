/*
 * operator init --share-recipients (share_recipients.c): each share
 * returned encrypted to one holder's public key (kms_share_seal.h).
 * Operator pool threads; pure apart from allocation.
 */
#ifndef KMSD_SHARE_RECIPIENTS_H
#define KMSD_SHARE_RECIPIENTS_H

#include <stddef.h>

#include "kms_err.h"

/* Exactly n keys, each a usable RSA public key: KMS_EINVAL naming the first
 * bad one. Called before init, so a bad file changes nothing. */
int kmsd_share_recipients_check(char *const *pems, size_t npems, unsigned n,
                                struct kms_err *err);
/* *out = n malloc'd kmsenc1 texts (share i to key i); free with
 * kmsd_share_recipients_free. On failure (logged) *out is NULL and the
 * caller returns the plain shares instead: they must not be lost. */
int kmsd_share_recipients_seal(char *const *pems, char *const *shares, unsigned n,
                               char ***out);
void kmsd_share_recipients_free(char **enc, unsigned n);

#endif /* KMSD_SHARE_RECIPIENTS_H */
