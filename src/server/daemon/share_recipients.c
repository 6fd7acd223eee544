/* operator init --share-recipients (kmsd_share_recipients.h). */
#include <stdlib.h>

#include "kms_log.h"
#include "kms_share_seal.h"
#include "kmsd_share_recipients.h"

int kmsd_share_recipients_check(char *const *pems, size_t npems, unsigned n,
                                struct kms_err *err)
{
    int rc;
    if (npems != n) {
        return kms_err_set(err, KMS_EINVAL,
                           "%zu share recipients for %u key shares: give one public key per "
                           "share",
                           npems, n);
    }
    for (size_t i = 0; i < npems; i++) {
        if ((rc = kms_share_recipient_check(pems[i], err)) != 0) {
            return kms_err_wrap(err, KMS_EINVAL, "share recipient %zu", i + 1);
        }
    }
    return 0;
}

void kmsd_share_recipients_free(char **enc, unsigned n)
{
    if (enc == NULL) {
        return;
    }
    for (unsigned i = 0; i < n; i++) {
        free(enc[i]);
    }
    free(enc);
}

int kmsd_share_recipients_seal(char *const *pems, char *const *shares, unsigned n,
                               char ***out)
{
    char **enc = calloc(n + 1, sizeof(*enc));
    struct kms_err err;
    int rc = 0;

    *out = NULL;
    kms_err_clear(&err);
    if (enc == NULL) {
        rc = kms_err_set(&err, KMS_ENOMEM, "out of memory");
    }
    for (unsigned i = 0; rc == 0 && i < n; i++) {
        rc = kms_share_seal_to(pems[i], shares[i], &enc[i], &err);
    }
    if (rc != 0) {
        kms_log(KMS_LOG_ERROR, "keys", "init: could not encrypt the shares to their "
                "recipients; returning them in the clear", "error", err.msg, NULL);
        kmsd_share_recipients_free(enc, n);
        return rc;
    }
    *out = enc;
    return 0;
}
