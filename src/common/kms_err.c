#include "kms_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

struct errdesc {
    int code;
    const char *name;
    const char *msg;
};

static const struct errdesc errtab[] = {
#define KMS_ERR_ROW(name, value, msg) {value, #name, msg},
    KMS_ERRORS(KMS_ERR_ROW)
#undef KMS_ERR_ROW
};

static const struct errdesc *lookup(int code)
{
    for (size_t i = 0; i < sizeof(errtab) / sizeof(errtab[0]); i++) {
        if (errtab[i].code == code) {
            return &errtab[i];
        }
    }
    return NULL;
}

const char *kms_strerror(int code)
{
    const struct errdesc *d = lookup(code);
    return d != NULL ? d->msg : "unknown error";
}

const char *kms_errname(int code)
{
    const struct errdesc *d = lookup(code);
    return d != NULL ? d->name : "KMS_E?";
}

int kms_err_set(struct kms_err *err, int code, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL) {
        return code;
    }
    err->code = code;
    if (fmt == NULL || fmt[0] == '\0') {
        snprintf(err->msg, sizeof(err->msg), "%s", kms_strerror(code));
        return code;
    }
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

int kms_err_wrap(struct kms_err *err, int code, const char *fmt, ...)
{
    char ctx[KMS_ERR_MSG_MAX];
    char old[KMS_ERR_MSG_MAX];
    va_list ap;

    if (err == NULL) {
        return code;
    }
    if (err->code == 0) {
        /* Nothing below set a message: start the chain here. */
        err->code = code;
        snprintf(err->msg, sizeof(err->msg), "%s", kms_strerror(code));
    }
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof(ctx), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    /* Truncation keeps the outermost context, which is what an operator
     * reads first; the tail of a very long chain may be cut. */
    size_t n = strnlen(ctx, sizeof(err->msg) - 1);
    memcpy(err->msg, ctx, n);
    if (n + 2 < sizeof(err->msg)) {
        memcpy(err->msg + n, ": ", 2);
        n += 2;
    }
    size_t m = strnlen(old, sizeof(old));
    if (m > sizeof(err->msg) - 1 - n) {
        m = sizeof(err->msg) - 1 - n;
    }
    memcpy(err->msg + n, old, m);
    err->msg[n + m] = '\0';
    return err->code;
}

void kms_err_clear(struct kms_err *err)
{
    if (err != NULL) {
        err->code = 0;
        err->msg[0] = '\0';
    }
}
