/* libFuzzer: kms_blob_parse on arbitrary bytes (the Unseal request's data
 * field comes straight from the network). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t key_id[KMS_KEY_ID_LEN], half[KMS_CLIENT_HALF_LEN];
    struct kms_err err;

    kms_err_clear(&err);
    int rc = kms_blob_parse(data, size, key_id, half, &err);
    if (rc == 0) {
        /* Accepted exactly when the format says so, and copied faithfully. */
        if (size != KMS_BLOB_V1_LEN || data[0] != KMS_BLOB_VERSION ||
            memcmp(key_id, data + 1, KMS_KEY_ID_LEN) != 0 ||
            memcmp(half, data + 1 + KMS_KEY_ID_LEN, KMS_CLIENT_HALF_LEN) != 0) {
            abort();
        }
    } else if (rc != KMS_EFORMAT || err.code != KMS_EFORMAT ||
               (size == KMS_BLOB_V1_LEN && data[0] == KMS_BLOB_VERSION)) {
        abort();
    }
    return 0;
}
