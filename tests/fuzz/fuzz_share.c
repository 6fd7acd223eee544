/* libFuzzer: kms_share_parse on arbitrary text (operators paste shares into
 * kmsctl, which sends them to kmsd). Every accepted share must format back
 * to the canonical text and parse again to the same share. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kms_share s, again;
    char text[KMS_SHARE_TEXT_MAX];
    char *copy = malloc(size + 1);
    struct kms_err err;

    if (copy == NULL) {
        return 0;
    }
    memcpy(copy, data, size);
    copy[size] = '\0';
    kms_err_clear(&err);
    int rc = kms_share_parse(copy, &s, &err);
    if (rc == 0) {
        if (s.index == 0 || s.len < KMS_SHAMIR_MIN_SECRET || s.len > KMS_SHAMIR_MAX_SECRET) {
            abort();
        }
        if (kms_share_format(&s, text, sizeof(text), NULL) != 0 ||
            kms_share_parse(text, &again, NULL) != 0 || again.index != s.index ||
            again.len != s.len || memcmp(again.y, s.y, s.len) != 0) {
            abort();
        }
    } else if (rc != KMS_EFORMAT && rc != KMS_ECHECKSUM && rc != KMS_EVERSION) {
        abort();
    } else if (err.code != rc || err.msg[0] == '\0') {
        abort();
    }
    free(copy);
    return 0;
}
