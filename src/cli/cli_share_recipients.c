/*
 * Share recipients for kmsctl (cmd_init.c, cmd_unseal.c): `operator init
 * --share-recipients FILE` reads one PEM public key per share holder;
 * `operator unseal --share-key KEY.pem` decrypts an encrypted share
 * (kms_share_seal.h) locally before it is sent.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "cli_common.h"
#include "kms_crypto.h"
#include "kms_share_seal.h"

#define SHARE_KEYS_FILE_MAX (1u << 20)

/* Whole file into a NUL-terminated malloc'd buffer (wiped and freed by the
 * caller); NULL with errbuf filled. */
static char *file_read(const char *path, size_t *len, char *errbuf, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0;

    if (f == NULL) {
        snprintf(errbuf, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    buf = malloc(SHARE_KEYS_FILE_MAX + 1);
    if (buf == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        fclose(f);
        return NULL;
    }
    n = fread(buf, 1, SHARE_KEYS_FILE_MAX + 1, f);
    if (ferror(f) || n > SHARE_KEYS_FILE_MAX) {
        snprintf(errbuf, errlen, "%s: %s", path,
                 ferror(f) ? "read error" : "larger than 1 MiB");
        OPENSSL_cleanse(buf, n > SHARE_KEYS_FILE_MAX ? SHARE_KEYS_FILE_MAX : n);
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

int cli_share_recipients_load(const char *path, char ***pems, size_t *n, char *errbuf,
                              size_t errlen)
{
    static const char begin[] = "-----BEGIN PUBLIC KEY-----";
    static const char end[] = "-----END PUBLIC KEY-----";
    size_t len = 0, cnt = 0;
    char *buf = file_read(path, &len, errbuf, errlen), *p;
    char **out = NULL;
    int rc = CLI_EXIT_LOCAL;

    *pems = NULL;
    *n = 0;
    if (buf == NULL) {
        return CLI_EXIT_LOCAL;
    }
    for (p = buf; (p = strstr(p, begin)) != NULL; p += sizeof(begin) - 1) {
        cnt++;
    }
    if (cnt == 0 || cnt > 255) {
        snprintf(errbuf, errlen, "%s: %zu PEM public keys (%s), expected 1 per share holder",
                 path, cnt, begin);
        goto out;
    }
    out = calloc(cnt + 1, sizeof(*out));
    if (out == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        goto out;
    }
    p = buf;
    for (size_t i = 0; i < cnt; i++) {
        char *b = strstr(p, begin), *e = b != NULL ? strstr(b, end) : NULL;
        struct kms_err err;
        if (e == NULL || (strstr(b + 1, begin) != NULL && strstr(b + 1, begin) < e)) {
            snprintf(errbuf, errlen, "%s: key %zu has no %s line", path, i + 1, end);
            goto out;
        }
        e += sizeof(end) - 1;
        out[i] = strndup(b, (size_t)(e - b));
        if (out[i] == NULL) {
            snprintf(errbuf, errlen, "out of memory");
            goto out;
        }
        kms_err_clear(&err);
        if (kms_share_recipient_check(out[i], &err) != 0) {
            snprintf(errbuf, errlen, "%s: key %zu: %s", path, i + 1, err.msg);
            goto out;
        }
        p = e;
    }
    *pems = out;
    *n = cnt;
    out = NULL;
    rc = 0;
out:
    if (out != NULL) {
        for (size_t i = 0; i < cnt; i++) {
            free(out[i]);
        }
        free(out);
    }
    free(buf);
    return rc;
}

int cli_share_key_open(const char *key_path, char *share, size_t cap, char *errbuf,
                       size_t errlen)
{
    size_t len = 0;
    char *pem = file_read(key_path, &len, errbuf, errlen);
    char *enc = NULL;
    struct kms_err err;
    int rc;

    if (pem == NULL) {
        OPENSSL_cleanse(share, cap);
        return CLI_EXIT_LOCAL;
    }
    enc = strdup(share);
    OPENSSL_cleanse(share, cap);
    kms_err_clear(&err);
    rc = enc != NULL ? kms_share_open_with(pem, enc, share, cap, &err) : KMS_ENOMEM;
    if (rc != 0) {
        snprintf(errbuf, errlen, "%s: %s", key_path, err.msg[0] ? err.msg : kms_strerror(rc));
        rc = CLI_EXIT_LOCAL;
    }
    if (enc != NULL) {
        OPENSSL_cleanse(enc, strlen(enc));
        free(enc);
    }
    OPENSSL_cleanse(pem, len);
    free(pem);
    return rc;
}
