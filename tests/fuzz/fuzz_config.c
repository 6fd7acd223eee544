/* libFuzzer: the YAML configuration file (libcyaml schema + kmsd's strict
 * value parsers and cross-field checks), through kms_config_load exactly as
 * `kmsd --config FILE` runs it, then the YAML dump of what loaded.
 *
 * Input: the file's bytes. Invariants: no crash, no leak (ASan); success or
 * KMS_ECONFIG with a one-line message; a loaded config dumps.
 *
 * Seeds: corpus/fuzz_config holds deploy/examples-like files.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char path[64];
    static FILE *devnull;
    struct kms_config cfg;
    struct kms_err err;
    char *argv[] = {"kmsd", "--config", path, NULL};
    FILE *f;
    int rc;

    if (path[0] == '\0') {
        snprintf(path, sizeof(path), "%s/kms-fuzz-config-%d.yaml",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (int)getpid());
        devnull = fopen("/dev/null", "w");
    }
    if (size > 65536 || (f = fopen(path, "wb")) == NULL) {
        return 0;
    }
    fwrite(data, 1, size, f);
    fclose(f);
    kms_err_clear(&err);
    rc = kms_config_load(&cfg, 3, argv, NULL, &err);
    if (rc == 0) {
        (void)kms_config_dump(&cfg, devnull);
        kms_config_free(&cfg);
    } else if (rc != KMS_ECONFIG && rc != KMS_ENOMEM) {
        abort();
    } else if (strchr(err.msg, '\n') != NULL) {
        abort(); /* errors are one line */
    }
    unlink(path);
    return 0;
}
