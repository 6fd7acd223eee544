/*
 * Structured logging: one JSON object per line on stderr.
 *
 *   {"ts":"2026-11-22T18:00:00.123Z","level":"info","mod":"raft","msg":"..."}
 *
 * Extra fields are passed as "key", value pairs of strings terminated by NULL:
 *   kms_log(KMS_LOG_INFO, "server", "listening", "addr", "0.0.0.0:4050", NULL);
 *
 * Never pass a secret, share, passphrase or blob to these functions: callers
 * log identifiers (key ids in hex, node UUIDs, addresses) only.
 * Thread-safe: each line is written with one write(2).
 *
 * Rate limit: every line goes through a token bucket keyed by its module and
 * message (kms_logf: its format; kms_log_keyed: an explicit key): a burst of
 * 20 lines, then 2 lines per second per key. Dropped lines are counted; the
 * next line of the key that is written carries "suppressed":"N", and
 * kms_log_flush_suppressed() writes one "repeated log lines suppressed" line
 * per key with a pending count. Audit lines at info level are never limited.
 */
#ifndef KMS_LOG_H
#define KMS_LOG_H

enum kms_log_level {
    KMS_LOG_DEBUG = 0,
    KMS_LOG_INFO = 1,
    KMS_LOG_WARN = 2,
    KMS_LOG_ERROR = 3,
};

/* Lines below this level are dropped. Default KMS_LOG_INFO; the environment
 * variable KMSD_LOG_LEVEL (debug|info|warn|error) overrides at first use. */
void kms_log_set_level(enum kms_log_level level);
int kms_log_level_parse(const char *s, enum kms_log_level *out);

/* Writes one line. Pairs of (const char *key, const char *value), NULL-ended. */
void kms_log(enum kms_log_level level, const char *mod, const char *msg, ...);

/* Like kms_log with a printf-formatted message and no extra fields. */
void kms_logf(enum kms_log_level level, const char *mod, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* kms_log with an explicit rate-limit key (for messages whose text varies,
 * e.g. gRPC's, keyed by source location). */
void kms_log_keyed(enum kms_log_level level, const char *mod, const char *key,
                   const char *msg, ...);

/* Writes one line per key whose dropped lines have not been reported yet.
 * Call periodically (the daemon's supervisor does, every 10 s). */
void kms_log_flush_suppressed(void);

/* Lines dropped by the rate limit since start (all keys). */
unsigned long long kms_log_suppressed_total(void);

/* The audit sink: every line of module "audit" (any level) is handed to it
 * complete (JSON object, ending in "}\n"); the sink writes it where the
 * audit trail lives and may rewrite it into out (cap outcap, e.g. to add a
 * hash-chain field), returning the length of the line to write to stderr
 * instead (0: write the original). Called from any logging thread; the sink
 * serialises itself. NULL removes it. Set before the threads start or
 * after they stopped (the pointer is atomic, the sink's state is not
 * reference-counted). */
#include <stddef.h>
typedef size_t (*kms_log_audit_sink_fn)(void *arg, const char *line, size_t len, char *out,
                                         size_t outcap);
void kms_log_set_audit_sink(kms_log_audit_sink_fn fn, void *arg);

#endif /* KMS_LOG_H */
