#include "kms_log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
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
#define LOG_TAIL 80        /* room kept for ,"fields_dropped":"N","suppressed":"N"}\n */
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

/* ---- rate limit ------------------------------------------------------
 *
 * One token bucket per message key (module + key, hashed into RL_SLOTS
 * slots; two keys sharing a slot share its bucket). A line spends one token;
 * tokens refill at RL_RATE per second up to RL_BURST. A line without a token
 * is dropped and counted; the next line of that key that gets through
 * carries "suppressed":"N", and kms_log_flush_suppressed() reports counts
 * whose key went quiet. Audit lines at info (successful seals, unseals,
 * operator calls) are never limited. */
#define RL_SLOTS 256
#define RL_BURST 20.0
#define RL_RATE 2.0 /* lines per second and key */

struct rl_slot {
    uint64_t hash;     /* 0 = unused */
    char mod[24];
    char key[96];
    double tokens;
    uint64_t last_ms;
    uint64_t suppressed;
};

static pthread_mutex_t rl_mu = PTHREAD_MUTEX_INITIALIZER;
static struct rl_slot rl[RL_SLOTS];
static atomic_ullong rl_total_suppressed;

static uint64_t rl_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t rl_hash(const char *mod, const char *key)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *p = mod; p != NULL && *p != '\0'; p++) {
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    }
    h = (h ^ 0xffu) * 1099511628211ull;
    for (const char *p = key; p != NULL && *p != '\0'; p++) {
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    }
    return h != 0 ? h : 1;
}

/* True when the line may be written; *suppressed gets the count of lines of
 * this key dropped since the last one written. */
static bool rl_admit(const char *mod, const char *key, uint64_t *suppressed)
{
    uint64_t h = rl_hash(mod, key), now = rl_now_ms();
    struct rl_slot *s = &rl[h % RL_SLOTS];
    bool ok;

    *suppressed = 0;
    pthread_mutex_lock(&rl_mu);
    if (s->hash != h) {
        if (s->hash != 0 && s->suppressed > 0) {
            /* another key takes the slot: its pending count rides on this
             * line rather than being lost */
            *suppressed = s->suppressed;
        }
        s->hash = h;
        snprintf(s->mod, sizeof(s->mod), "%s", mod != NULL ? mod : "");
        snprintf(s->key, sizeof(s->key), "%s", key != NULL ? key : "");
        s->tokens = RL_BURST;
        s->last_ms = now;
        s->suppressed = 0;
    }
    s->tokens += (double)(now - s->last_ms) * RL_RATE / 1000.0;
    if (s->tokens > RL_BURST) {
        s->tokens = RL_BURST;
    }
    s->last_ms = now;
    ok = s->tokens >= 1.0;
    if (ok) {
        s->tokens -= 1.0;
        *suppressed += s->suppressed;
        s->suppressed = 0;
    } else {
        s->suppressed++;
        atomic_fetch_add(&rl_total_suppressed, 1);
    }
    pthread_mutex_unlock(&rl_mu);
    return ok;
}

static void emit(enum kms_log_level level, const char *mod, const char *msg,
                 va_list *fields, uint64_t suppressed);

void kms_log_flush_suppressed(void)
{
    for (unsigned i = 0; i < RL_SLOTS; i++) {
        char mod[24], key[96], n[32];
        uint64_t cnt = 0;
        pthread_mutex_lock(&rl_mu);
        if (rl[i].hash != 0 && rl[i].suppressed > 0) {
            cnt = rl[i].suppressed;
            rl[i].suppressed = 0;
            memcpy(mod, rl[i].mod, sizeof(mod));
            memcpy(key, rl[i].key, sizeof(key));
        }
        pthread_mutex_unlock(&rl_mu);
        if (cnt > 0) {
            snprintf(n, sizeof(n), "%llu", (unsigned long long)cnt);
            kms_log(KMS_LOG_WARN, "log", "repeated log lines suppressed", "of_mod", mod,
                    "of_msg", key, "suppressed", n, NULL);
        }
    }
}

unsigned long long kms_log_suppressed_total(void)
{
    return atomic_load(&rl_total_suppressed);
}

static bool rl_exempt(enum kms_log_level level, const char *mod)
{
    /* "log" lines are the suppression reports themselves (one per key and
     * flush); successful audit lines are the audit trail. */
    return (mod != NULL && strcmp(mod, "log") == 0) ||
           (level <= KMS_LOG_INFO && mod != NULL && strcmp(mod, "audit") == 0);
}

static _Atomic(kms_log_audit_sink_fn) audit_sink;
static void *_Atomic audit_sink_arg;

void kms_log_set_audit_sink(kms_log_audit_sink_fn fn, void *arg)
{
    atomic_store(&audit_sink_arg, arg);
    atomic_store(&audit_sink, fn);
}

static void emit(enum kms_log_level level, const char *mod, const char *msg,
                 va_list *fields, uint64_t suppressed)
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
    if (suppressed > 0) {
        char n[32];
        snprintf(n, sizeof(n), "%llu", (unsigned long long)suppressed);
        put_str(&ln, ",\"suppressed\":\"");
        put_str(&ln, n);
        put_str(&ln, "\"");
    }
    ln.buf[ln.len++] = '}';
    ln.buf[ln.len++] = '\n';
    {
        kms_log_audit_sink_fn sink = atomic_load(&audit_sink);
        if (sink != NULL && mod != NULL && strcmp(mod, "audit") == 0) {
            /* room for the sink's chain field: LOG_TAIL is kept free */
            static _Thread_local char chained[LOG_LINE_MAX + 160];
            size_t n = sink(atomic_load(&audit_sink_arg), ln.buf, ln.len, chained,
                            sizeof(chained));
            if (n > 0) {
                ssize_t rc = write(STDERR_FILENO, chained, n);
                (void)rc;
                return;
            }
        }
    }
    /* One write per line keeps lines whole across threads. */
    ssize_t rc = write(STDERR_FILENO, ln.buf, ln.len);
    (void)rc;
}

void kms_log(enum kms_log_level level, const char *mod, const char *msg, ...)
{
    va_list ap;
    uint64_t sup = 0;

    if ((int)level < current_level()) {
        return;
    }
    if (!rl_exempt(level, mod) && !rl_admit(mod, msg, &sup)) {
        return;
    }
    va_start(ap, msg);
    emit(level, mod, msg, &ap, sup);
    va_end(ap);
}

void kms_log_keyed(enum kms_log_level level, const char *mod, const char *key,
                   const char *msg, ...)
{
    va_list ap;
    uint64_t sup = 0;

    if ((int)level < current_level()) {
        return;
    }
    if (!rl_exempt(level, mod) && !rl_admit(mod, key != NULL ? key : msg, &sup)) {
        return;
    }
    va_start(ap, msg);
    emit(level, mod, msg, &ap, sup);
    va_end(ap);
}

void kms_logf(enum kms_log_level level, const char *mod, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    uint64_t sup = 0;

    if ((int)level < current_level()) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    /* keyed by the format: the same call site shares one bucket */
    if (!rl_exempt(level, mod) && !rl_admit(mod, fmt, &sup)) {
        return;
    }
    emit(level, mod, msg, NULL, sup);
}
