#include "kms_log.h"

#include <stdarg.h>
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

/* Appends s to buf as a JSON string body (without quotes). */
struct line {
    char buf[4096];
    size_t len;
};

static void put(struct line *ln, const char *s, size_t n)
{
    if (ln->len + n >= sizeof(ln->buf) - 2) {
        n = sizeof(ln->buf) - 2 - ln->len;
    }
    memcpy(ln->buf + ln->len, s, n);
    ln->len += n;
}

static void put_str(struct line *ln, const char *s)
{
    put(ln, s, strlen(s));
}

static void put_json(struct line *ln, const char *s)
{
    char esc[8];

    put(ln, "\"", 1);
    for (; s != NULL && *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            put(ln, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            put(ln, esc, 6);
        } else {
            put(ln, (const char *)&c, 1);
        }
    }
    put(ln, "\"", 1);
}

static void emit(enum kms_log_level level, const char *mod, const char *msg,
                 va_list *fields)
{
    struct line ln;
    struct timespec ts;
    struct tm tm;
    char tbuf[64];

    ln.len = 0;
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
    put_json(&ln, mod);
    put_str(&ln, ",\"msg\":");
    put_json(&ln, msg);
    if (fields != NULL) {
        for (;;) {
            const char *k = va_arg(*fields, const char *);
            const char *v;
            if (k == NULL) {
                break;
            }
            v = va_arg(*fields, const char *);
            put_str(&ln, ",");
            put_json(&ln, k);
            put_str(&ln, ":");
            put_json(&ln, v != NULL ? v : "");
        }
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
