/*
 * Error codes and wrapped error messages.
 *
 * Every fallible function returns 0 or a negative KMS_E* code, and when the
 * caller passes a `struct kms_err *` it also fills a human-readable message.
 * Each layer prepends its own context with kms_err_wrap(), so an operator sees
 * the whole chain: "unseal: share 2: checksum mismatch".
 *
 * The struct is caller-allocated (usually on the stack) and holds no heap
 * memory, so there is nothing to free. A NULL `err` is accepted everywhere and
 * means "the caller only wants the code".
 */
#ifndef KMS_ERR_H
#define KMS_ERR_H

#include <stddef.h>

/* X(name, value, default message). Values are stable: they cross the wire in
 * the operator API and appear in logs. Add at the end only. */
#define KMS_ERRORS(X)                                                 \
    X(KMS_OK, 0, "ok")                                                \
    X(KMS_EINVAL, -1, "invalid argument")                             \
    X(KMS_ENOMEM, -2, "out of memory")                                \
    X(KMS_EIO, -3, "I/O error")                                       \
    X(KMS_ECRYPTO, -4, "cryptographic library error")                 \
    X(KMS_EFORMAT, -5, "malformed input")                             \
    X(KMS_ECHECKSUM, -6, "checksum mismatch")                         \
    X(KMS_EAUTH, -7, "authentication failed")                         \
    X(KMS_ENOTFOUND, -8, "not found")                                 \
    X(KMS_EDENIED, -9, "permission denied")                           \
    X(KMS_EUNAVAIL, -10, "unavailable")                               \
    X(KMS_ENOTLEADER, -11, "not the leader")                          \
    X(KMS_ESEALED, -12, "sealed")                                     \
    X(KMS_EUNINIT, -13, "not initialised")                            \
    X(KMS_EEXIST, -14, "already exists")                              \
    X(KMS_ETIMEDOUT, -15, "timed out")                                \
    X(KMS_EVERSION, -16, "unsupported version")                       \
    X(KMS_ECONFIG, -17, "invalid configuration")                      \
    X(KMS_ESHUTDOWN, -18, "shutting down")                            \
    X(KMS_ETOOFEW, -19, "not enough shares")                          \
    X(KMS_EDUP, -20, "duplicate")                                     \
    X(KMS_ERANGE, -21, "out of range")                                \
    X(KMS_ETLS, -22, "TLS error")                                     \
    X(KMS_ERAFT, -23, "raft error")                                   \
    X(KMS_ESTORE, -24, "storage error")                               \
    X(KMS_EREVOKED, -25, "revoked")                                   \
    X(KMS_EBUSY, -26, "busy")                                         \
    X(KMS_ECORRUPT, -27, "corrupt data")                              \
    X(KMS_EQUOTA, -28, "quota exceeded")

enum kms_errcode {
#define KMS_ERR_ENUM(name, value, msg) name = value,
    KMS_ERRORS(KMS_ERR_ENUM)
#undef KMS_ERR_ENUM
};

#define KMS_ERR_MSG_MAX 512

struct kms_err {
    int code;                    /* 0 or a negative KMS_E* code */
    char msg[KMS_ERR_MSG_MAX];   /* NUL-terminated, may be empty */
};

/* Static description of a code ("checksum mismatch"); never NULL. */
const char *kms_strerror(int code);

/* Symbolic name of a code ("KMS_ECHECKSUM"); never NULL. */
const char *kms_errname(int code);

/* Sets err (if non-NULL) to code with a formatted message; returns code so
 * callers can write `return kms_err_set(err, KMS_EINVAL, "...")`. A NULL or
 * empty fmt uses kms_strerror(code). */
int kms_err_set(struct kms_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "<context>: " to err->msg and returns err->code. When err is NULL,
 * or nothing below set it, `code` is used (and its kms_strerror text starts
 * the chain). */
int kms_err_wrap(struct kms_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Resets err to KMS_OK with an empty message. */
void kms_err_clear(struct kms_err *err);

#endif /* KMS_ERR_H */
