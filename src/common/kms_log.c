#include "kms_log.h"

#include <pthread.h>
#include <stdarg.h>
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

static void emit(enum kms_log_level level, const char *mod, const char *msg,
                 va_list *fields, uint64_t suppressed)
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
    if (suppressed > 0) {
        char n[32];
        snprintf(n, sizeof(n), "%llu", (unsigned long long)suppressed);
        put_str(&ln, ",\"suppressed\":");
        put_json(&ln, n);
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
