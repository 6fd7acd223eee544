/*
 * The hash-chained audit log (audit.c).
 *
 * Every kms_log line of module "audit" (Talos Seal/Unseal outcomes, one line
 * per operator call after its outcome) is appended to the audit file with
 * two more fields at its end:
 *
 *   ...,"seq":"N","prev":"<64 hex>"}
 *
 * seq counts lines across restarts; prev is SHA-256 over the bytes of the
 * previous line of the file (without its newline), 64 zeros before the
 * first line. The first line of a file is an "audit chain start" line
 * (its field previous_head names the previous chain's last hash when
 * known, e.g. after a reopen on SIGHUP into a rotated file, else "none").
 * A restart reads the last line of the existing file and continues the
 * chain with an "audit log reopened" line; a torn last line (crash mid
 * write) is closed with a newline and stays visible to kmsctl audit verify.
 * The same chained line goes to stderr (the journal), so a copy kept
 * elsewhere anchors the file's end.
 *
 * Threads: open/close from main before/after the other threads; the sink
 * itself serialises writers under its own mutex.
 */
#ifndef KMSD_AUDIT_H
#define KMSD_AUDIT_H

#include <stdint.h>

#include "kms_err.h"

/* Opens (creating 0600) path for appending, continues or starts the chain
 * and installs the kms_log audit sink. path is copied. */
int kmsd_audit_open(const char *path, struct kms_err *err);

/* Reopens the file at the same path (after logrotate moved it): a new
 * chain in a new file starts with a chain start line naming the old
 * chain's head. Supervisor thread. 0 or a negative KMS_E*. */
int kmsd_audit_reopen(struct kms_err *err);

/* Removes the sink and closes the file. */
void kmsd_audit_close(void);

/* Counters for /metrics (any thread). */
uint64_t kmsd_audit_lines_total(void);
uint64_t kmsd_audit_write_failures_total(void);

#endif /* KMSD_AUDIT_H */
