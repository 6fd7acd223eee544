#include "kms_log.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static atomic_int level_min = -1;

static const char *level_names[] = {"debug", "info", "warn", "error"};

int kms_log_level_parse(const char *s, enum kms_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (s != NULL && strcasecmp(s, level_names[i]) == 0) {
            *out = (enum kms_log_level)i;
            return 0;
        }
    }
    return -1;
}

void kms_log_set_level(enum kms_log_level level)
{
    atomic_store(&level_min, (int)level);
}

static int current_level(void)
{
    int l = atomic_load(&level_min);
    if (l < 0) {
        enum kms_log_level parsed = KMS_LOG_INFO;
        (void)kms_log_level_parse(getenv("KMSD_LOG_LEVEL"), &parsed);
        l = (int)parsed;
        atomic_store(&level_min, l);
    }
    return l;
}

/*
 * One log line. Every line is valid JSON whatever the fields hold: strings
 * are escaped (quotes, backslashes, control characters, DEL), invalid UTF-8
 * becomes U+FFFD, a field longer than its cap is cut at a character
 * boundary and ends with "...(+N bytes)", and a field that no longer fits
 * in the line is dropped and counted in "fields_dropped". Lines are never
 * cut.
 */
#define LOG_LINE_MAX 8192
#define LOG_VALUE_MAX 1024 /* input bytes kept per field value */
#define LOG_MSG_MAX 2048   /* input bytes kept of the message */
#define LOG_TAIL 40        /* room kept for ,"fields_dropped":"N"}\n */
#define LOG_MARK 32        /* room kept for ...(+N bytes)" */

struct line {
    char buf[LOG_LINE_MAX];
    size_t len;
    unsigned dropped;
};

static bool fits(const struct line *ln, size_t n)
{
    return ln->len + n + LOG_TAIL <= sizeof(ln->buf);
}

static void put(struct line *ln, const char *s, size_t n)
{
    if (ln->len + n > sizeof(ln->buf)) {
        n = sizeof(ln->buf) - ln->len; /* callers reserve room: never reached */
    }
    memcpy(ln->buf + ln->len, s, n);
    ln->len += n;
}

static void put_str(struct line *ln, const char *s)
{
    put(ln, s, strlen(s));
}

/* Length of the valid UTF-8 sequence at s (1..4), 0 when invalid
 * (overlong forms, surrogates and code points above U+10FFFF included). */
static size_t utf8_len(const unsigned char *s)
{
    unsigned char c = s[0];
    size_t n;
    unsigned cp;
    if (c < 0x80) {
        return 1;
    } else if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            return 0; /* also stops at the terminating NUL */
        }
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10ffff))) {
        return 0;
    }
    return n;
}

/* Appends s as a JSON string (with quotes), at most max input bytes. */
static void put_json(struct line *ln, const char *s, size_t max)
{
    const unsigned char *p = (const unsigned char *)(s != NULL ? s : "");
    size_t used = 0;
    char esc[LOG_MARK];

    put(ln, "\"", 1);
    while (*p != '\0') {
        size_t in = utf8_len(p);
        const char *out = (const char *)p;
        size_t n = in;
        if (in == 0) {
            out = "\\ufffd";
            n = 6;
            in = 1;
        } else if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            out = esc;
            n = 2;
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof(esc), "\\u%04x", *p);
            out = esc;
            n = 6;
        }
        if (used + in > max || !fits(ln, n + LOG_MARK)) {
            snprintf(esc, sizeof(esc), "...(+%zu bytes)", strlen((const char *)p));
            put_str(ln, esc);
            break;
        }
        put(ln, out, n);
        p += in;
        used += in;
    }
    put(ln, "\"", 1);
}

/* Appends ,"k":"v" if at least the key and a cut value fit; else counts it. */
static void put_field(struct line *ln, const char *k, const char *v)
{
    if (!fits(ln, strlen(k) * 6 + 8 + LOG_MARK * 2)) {
        ln->dropped++;
        return;
    }
    put_str(ln, ",");
    put_json(ln, k, 256);
    put_str(ln, ":");
    put_json(ln, v, LOG_VALUE_MAX);
}

static void emit(enum kms_log_level level, const char *mod, const char *msg,
                 va_list *fields)
{
    struct line ln;
    struct timespec ts;
    struct tm tm;
    char tbuf[64];

    ln.len = 0;
    ln.dropped = 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(tbuf, sizeof(tbuf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ",
             tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
             tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    put_str(&ln, "{\"ts\":\"");
    put_str(&ln, tbuf);
    put_str(&ln, "\",\"level\":\"");
    put_str(&ln, level_names[level]);
    put_str(&ln, "\",\"mod\":");
    put_json(&ln, mod, 64);
    put_str(&ln, ",\"msg\":");
    put_json(&ln, msg, LOG_MSG_MAX);
    if (fields != NULL) {
        for (;;) {
            const char *k = va_arg(*fields, const char *);
            const char *v;
            if (k == NULL) {
                break;
            }
            v = va_arg(*fields, const char *);
            put_field(&ln, k, v);
        }
    }
    if (ln.dropped > 0) {
        char n[32];
        snprintf(n, sizeof(n), "%u", ln.dropped);
        put_str(&ln, ",\"fields_dropped\":\"");
        put_str(&ln, n);
        put_str(&ln, "\"");
    }
    ln.buf[ln.len++] = '}';
    ln.buf[ln.len++] = '\n';
    /* One write per line keeps lines whole across threads. */
    ssize_t rc = write(STDERR_FILENO, ln.buf, ln.len);
    (void)rc;
}

void kms_log(enum kms_log_level level, const char *mod, const char *msg, ...)
{
    va_list ap;

    if ((int)level < current_level()) {
        return;
    }
    va_start(ap, msg);
    emit(level, mod, msg, &ap);
    va_end(ap);
}

void kms_logf(enum kms_log_level level, const char *mod, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;

    if ((int)level < current_level()) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    emit(level, mod, msg, NULL);
}
