/* Shared by the store fuzzers: a scratch RocksDB store under /dev/shm (or
 * /tmp), recreated after a sticky fatal error or every RESET_EVERY inputs
 * so the database stays small. Not a fuzzer itself (no fuzz_ prefix on the
 * .c glob: this is a header). */
#ifndef FUZZ_STORE_UTIL_H
#define FUZZ_STORE_UTIL_H

#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms_store.h"

#define RESET_EVERY 2000

static struct kms_store *fz_store;
static char fz_dir[256];
static unsigned fz_uses;

static int fz_rm_cb(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    remove(path);
    return 0;
}

static void fz_store_drop(void)
{
    if (fz_store != NULL) {
        kms_store_close(fz_store);
        fz_store = NULL;
    }
    if (fz_dir[0] != '\0') {
        nftw(fz_dir, fz_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
        fz_dir[0] = '\0';
    }
}

static void fz_atexit(void)
{
    fz_store_drop();
}

/* The store to use for this input (fresh when needed). */
static struct kms_store *fz_store_get(void)
{
    static int registered;
    char db[300];
    struct kms_err err;

    if (fz_store != NULL && (fz_uses++ >= RESET_EVERY || kms_store_fatal(fz_store, &err) != 0)) {
        fz_store_drop();
    }
    if (fz_store == NULL) {
        snprintf(fz_dir, sizeof(fz_dir), "%s/kms-fuzz-XXXXXX",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        if (mkdtemp(fz_dir) == NULL) {
            abort();
        }
        snprintf(db, sizeof(db), "%s/db", fz_dir);
        kms_err_clear(&err);
        if (kms_store_open(db, &fz_store, &err) != 0) {
            fprintf(stderr, "store open: %s\n", err.msg);
            abort();
        }
        fz_uses = 0;
        if (!registered) {
            atexit(fz_atexit);
            registered = 1;
        }
    }
    return fz_store;
}

#endif /* FUZZ_STORE_UTIL_H */
