/* The hash-chained audit log: see kmsd_audit.h. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "kms_log.h"
#include "kmsd_audit.h"

#define AUDIT_TAIL_MAX 65536 /* bytes read back from the end at open */
#define HASH_HEX 64

static pthread_mutex_t audit_mu = PTHREAD_MUTEX_INITIALIZER;
static int audit_fd = -1;                 /* under audit_mu */
static char *audit_path;                  /* under audit_mu */
static char audit_prev[HASH_HEX + 1];     /* hash of the last line written */
static uint64_t audit_seq;                /* seq of the next line */
static atomic_ullong audit_lines, audit_failures;

static void hash_hex(const char *buf, size_t len, char out[HASH_HEX + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    static const char hx[] = "0123456789abcdef";
    if (EVP_Digest(buf, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32) {
        memset(out, '0', HASH_HEX); /* never reached with OpenSSL's SHA-256 */
        out[HASH_HEX] = '\0';
        return;
    }
    for (unsigned i = 0; i < 32; i++) {
        out[2 * i] = hx[md[i] >> 4];
        out[2 * i + 1] = hx[md[i] & 15];
    }
    out[HASH_HEX] = '\0';
}

static bool write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return false;
        }
        buf += n;
        len -= (size_t)n;
    }
    return true;
}

/* kms_log_audit_sink_fn: line ends in "}\n". */
static size_t sink_cb(void *arg, const char *line, size_t len, char *out, size_t outcap)
{
    size_t n = 0;
    int w;
    (void)arg;

    if (len < 2 || line[len - 1] != '\n' || line[len - 2] != '}') {
        return 0;
    }
    pthread_mutex_lock(&audit_mu);
    w = snprintf(out, outcap, "%.*s,\"seq\":\"%" PRIu64 "\",\"prev\":\"%s\"}\n", (int)(len - 2),
                 line, audit_seq, audit_prev);
    if (w < 0 || (size_t)w >= outcap) {
        goto out;
    }
    n = (size_t)w;
    if (audit_fd >= 0) {
        if (write_all(audit_fd, out, n)) {
            atomic_fetch_add(&audit_lines, 1);
        } else {
            atomic_fetch_add(&audit_failures, 1);
        }
    }
    /* the chain advances even when the write failed: the file then shows
     * the gap (verify names it) instead of silently joining around it */
    hash_hex(out, n - 1, audit_prev);
    audit_seq++;
out:
    pthread_mutex_unlock(&audit_mu);
    return n;
}

/* Parses the chain fields at the end of a line (without newline): seq. */
static bool tail_seq(const char *line, size_t len, uint64_t *seq)
{
    static const char pre[] = ",\"prev\":\"";
    const size_t suffix = sizeof(pre) - 1 + HASH_HEX + 2; /* ,"prev":"<hex>"} */
    const char *p;
    char *end;

    if (len < suffix + 12 || memcmp(line + len - suffix, pre, sizeof(pre) - 1) != 0) {
        return false;
    }
    /* ,"seq":"N" right before */
    for (p = line + len - suffix - 1; p > line && *p != ':'; p--) {
    }
    if (p - line < 6 || memcmp(p - 6, ",\"seq\"", 6) != 0 || p[1] != '"') {
        return false;
    }
    errno = 0;
    *seq = strtoull(p + 2, &end, 10);
    return errno == 0 && *end == '"' && end == line + len - suffix - 1;
}

/* Reads the end of the open file: sets audit_prev/audit_seq from its last
 * line. *torn: the file does not end in a newline. *empty: nothing in it.
 * *parsed: the last line carries chain fields. Under audit_mu. */
static int tail_read(int fd, bool *empty, bool *torn, bool *parsed, struct kms_err *err)
{
    struct stat sb;
    char *buf = NULL;
    size_t len, start, end;
    off_t off;
    int rc = 0;

    *empty = *torn = *parsed = false;
    memset(audit_prev, '0', HASH_HEX);
    audit_prev[HASH_HEX] = '\0';
    audit_seq = 0;
    if (fstat(fd, &sb) != 0) {
        rc = kms_err_set(err, KMS_EIO, "audit file: fstat: %s", strerror(errno));
        goto out;
    }
    if (sb.st_size == 0) {
        *empty = true;
        goto out;
    }
    len = sb.st_size > AUDIT_TAIL_MAX ? AUDIT_TAIL_MAX : (size_t)sb.st_size;
    off = sb.st_size - (off_t)len;
    if ((buf = malloc(len)) == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    if (pread(fd, buf, len, off) != (ssize_t)len) {
        rc = kms_err_set(err, KMS_EIO, "audit file: cannot read its tail: %s",
                         strerror(errno));
        goto out;
    }
    end = len;
    *torn = buf[len - 1] != '\n';
    if (!*torn) {
        end--;
    }
    start = end;
    while (start > 0 && buf[start - 1] != '\n') {
        start--;
    }
    if (start == 0 && off > 0) {
        /* a last line longer than the tail read: treat as unparseable */
        hash_hex(buf, end, audit_prev);
        goto out;
    }
    hash_hex(buf + start, end - start, audit_prev);
    if (!*torn && tail_seq(buf + start, end - start, &audit_seq)) {
        audit_seq++;
        *parsed = true;
    }
out:
    free(buf);
    return rc;
}

/* Opens path and writes the start/reopen line. previous_head: the head of
 * the chain this one follows when the file is new, or NULL. Under no lock
 * (it logs through the sink, which takes audit_mu). */
static int audit_open_path(const char *path, const char *previous_head, struct kms_err *err)
{
    bool empty, torn, parsed;
    char head[HASH_HEX + 1];
    int fd, rc;

    fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) {
        return kms_err_set(err, KMS_EIO, "audit file %s: %s", path, strerror(errno));
    }
    pthread_mutex_lock(&audit_mu);
    rc = tail_read(fd, &empty, &torn, &parsed, err);
    if (rc == 0 && torn && !write_all(fd, "\n", 1)) {
        rc = kms_err_set(err, KMS_EIO, "audit file %s: %s", path, strerror(errno));
    }
    if (rc != 0) {
        pthread_mutex_unlock(&audit_mu);
        close(fd);
        return rc;
    }
    if (audit_fd >= 0) {
        close(audit_fd);
    }
    audit_fd = fd;
    memcpy(head, audit_prev, sizeof(head));
    pthread_mutex_unlock(&audit_mu);
    kms_log_set_audit_sink(sink_cb, NULL);
    if (empty || !parsed) {
        /* a new chain: an empty file, or one whose last line is torn or not
         * ours (verify reports that line; the chain goes on from its hash) */
        kms_log(KMS_LOG_INFO, "audit", "audit chain start", "file", path, "previous_head",
                empty ? (previous_head != NULL ? previous_head : "none") : head, "reason",
                empty ? "new file" : (torn ? "last line torn" : "last line not chained"),
                NULL);
    } else {
        kms_log(KMS_LOG_INFO, "audit", "audit log reopened", "file", path, NULL);
    }
    return 0;
}

int kmsd_audit_open(const char *path, struct kms_err *err)
{
    char *copy = strdup(path);
    int rc;
    if (copy == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    if ((rc = audit_open_path(copy, NULL, err)) != 0) {
        free(copy);
        return rc;
    }
    pthread_mutex_lock(&audit_mu);
    free(audit_path);
    audit_path = copy;
    pthread_mutex_unlock(&audit_mu);
    return 0;
}

int kmsd_audit_reopen(struct kms_err *err)
{
    char head[HASH_HEX + 1], path[4096];
    pthread_mutex_lock(&audit_mu);
    if (audit_path == NULL) {
        pthread_mutex_unlock(&audit_mu);
        return 0;
    }
    snprintf(path, sizeof(path), "%s", audit_path);
    memcpy(head, audit_prev, sizeof(head));
    pthread_mutex_unlock(&audit_mu);
    return audit_open_path(path, head, err);
}

void kmsd_audit_close(void)
{
    kms_log_set_audit_sink(NULL, NULL);
    pthread_mutex_lock(&audit_mu);
    if (audit_fd >= 0) {
        close(audit_fd);
        audit_fd = -1;
    }
    free(audit_path);
    audit_path = NULL;
    pthread_mutex_unlock(&audit_mu);
}

uint64_t kmsd_audit_lines_total(void)
{
    return atomic_load(&audit_lines);
}

uint64_t kmsd_audit_write_failures_total(void)
{
    return atomic_load(&audit_failures);
}
