/*
 * Keyed-hash, bounded-table limiter (kmsd_limit.h).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "kmsd_limit.h"

struct limit_entry {
    uint64_t tag;          /* SipHash of the key; 0 = free */
    uint64_t window_start; /* ms */
    uint64_t last;         /* ms of the last event (LRU) */
    unsigned count;
};

struct kmsd_limiter {
    pthread_mutex_t mu;
    EVP_MAC_CTX *mac; /* initialised with the random key; dup'ed per hash */
    struct limit_entry *e;
    size_t n_sets;
    unsigned per_key, global;
    uint64_t window_ms;
    uint64_t g_start;
    unsigned g_count;
};

int kmsd_limiter_new(size_t capacity, unsigned per_key, unsigned global, uint64_t window_ms,
                     struct kmsd_limiter **out, struct kms_err *err)
{
    struct kmsd_limiter *l = NULL;
    EVP_MAC *mac = NULL;
    unsigned char key[16];
    OSSL_PARAM params[2];
    size_t outsize = 8;
    int rc = 0;

    if (out == NULL || window_ms == 0 || capacity > (1u << 24)) {
        return kms_err_set(err, KMS_EINVAL, "limiter: bad arguments");
    }
    *out = NULL;
    if (capacity < KMSD_LIMIT_WAYS) {
        capacity = KMSD_LIMIT_WAYS;
    }
    l = calloc(1, sizeof(*l));
    if (l == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "limiter: out of memory");
        goto out;
    }
    pthread_mutex_init(&l->mu, NULL);
    l->n_sets = (capacity + KMSD_LIMIT_WAYS - 1) / KMSD_LIMIT_WAYS;
    l->e = calloc(l->n_sets * KMSD_LIMIT_WAYS, sizeof(*l->e));
    l->per_key = per_key;
    l->global = global;
    l->window_ms = window_ms;
    if (l->e == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "limiter: out of memory");
        goto out;
    }
    mac = EVP_MAC_fetch(NULL, "SIPHASH", NULL);
    if (mac == NULL || (l->mac = EVP_MAC_CTX_new(mac)) == NULL ||
        RAND_bytes(key, sizeof(key)) != 1) {
        rc = kms_err_set(err, KMS_ECRYPTO, "limiter: SipHash unavailable");
        goto out;
    }
    params[0] = OSSL_PARAM_construct_size_t(OSSL_MAC_PARAM_SIZE, &outsize);
    params[1] = OSSL_PARAM_construct_end();
    if (EVP_MAC_init(l->mac, key, sizeof(key), params) != 1) {
        rc = kms_err_set(err, KMS_ECRYPTO, "limiter: SipHash init failed");
        goto out;
    }
    *out = l;
    l = NULL;
out:
    OPENSSL_cleanse(key, sizeof(key));
    EVP_MAC_free(mac);
    kmsd_limiter_free(l);
    return rc;
}

void kmsd_limiter_free(struct kmsd_limiter *l)
{
    if (l == NULL) {
        return;
    }
    EVP_MAC_CTX_free(l->mac);
    free(l->e);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

/* SipHash-2-4 of key under the limiter's secret; never 0. */
static uint64_t limit_hash(struct kmsd_limiter *l, const void *key, size_t len)
{
    EVP_MAC_CTX *c = EVP_MAC_CTX_dup(l->mac);
    unsigned char h[8] = {0};
    size_t hl = 0;
    uint64_t v = 0;

    if (c != NULL && EVP_MAC_update(c, key, len) == 1 &&
        EVP_MAC_final(c, h, &hl, sizeof(h)) == 1) {
        memcpy(&v, h, sizeof(v));
    } else {
        /* No allocation possible: fall back to FNV-1a (still bounded). */
        const unsigned char *p = key;
        v = 1469598103934665603ull;
        for (size_t i = 0; i < len; i++) {
            v = (v ^ p[i]) * 1099511628211ull;
        }
    }
    EVP_MAC_CTX_free(c);
    return v != 0 ? v : 1;
}

static void global_roll(struct kmsd_limiter *l, uint64_t now)
{
    if (now - l->g_start >= l->window_ms || now < l->g_start) {
        l->g_start = now;
        l->g_count = 0;
    }
}

/* The live entry of tag, or NULL. Under mu. */
static struct limit_entry *entry_find(struct kmsd_limiter *l, uint64_t tag, uint64_t now)
{
    struct limit_entry *set = &l->e[(tag % l->n_sets) * KMSD_LIMIT_WAYS];
    for (unsigned i = 0; i < KMSD_LIMIT_WAYS; i++) {
        if (set[i].tag == tag) {
            if (now - set[i].window_start >= l->window_ms || now < set[i].window_start) {
                set[i].window_start = now;
                set[i].count = 0;
            }
            return &set[i];
        }
    }
    return NULL;
}

/* The entry of tag, taking a free, expired or least recently used one. */
static struct limit_entry *entry_get(struct kmsd_limiter *l, uint64_t tag, uint64_t now)
{
    struct limit_entry *set, *victim;
    struct limit_entry *e = entry_find(l, tag, now);
    if (e != NULL) {
        return e;
    }
    set = &l->e[(tag % l->n_sets) * KMSD_LIMIT_WAYS];
    victim = &set[0];
    for (unsigned i = 0; i < KMSD_LIMIT_WAYS; i++) {
        if (set[i].tag == 0 || now - set[i].window_start >= l->window_ms) {
            victim = &set[i];
            break;
        }
        if (set[i].last < victim->last) {
            victim = &set[i];
        }
    }
    victim->tag = tag;
    victim->window_start = now;
    victim->last = now;
    victim->count = 0;
    return victim;
}

static bool over_locked(struct kmsd_limiter *l, const struct limit_entry *e, bool *global_hit)
{
    bool g = l->global > 0 && l->g_count >= l->global;
    bool k = e != NULL && l->per_key > 0 && e->count >= l->per_key;
    if (global_hit != NULL) {
        *global_hit = g && !k;
    }
    return g || k;
}

bool kmsd_limiter_over(struct kmsd_limiter *l, const void *key, size_t len, uint64_t now_ms,
                       bool *global_hit)
{
    uint64_t tag = limit_hash(l, key, len);
    bool over;
    pthread_mutex_lock(&l->mu);
    global_roll(l, now_ms);
    over = over_locked(l, entry_find(l, tag, now_ms), global_hit);
    pthread_mutex_unlock(&l->mu);
    return over;
}

bool kmsd_limiter_take(struct kmsd_limiter *l, const void *key, size_t len, uint64_t now_ms,
                       bool *global_hit)
{
    uint64_t tag = limit_hash(l, key, len);
    struct limit_entry *e;
    bool ok;
    pthread_mutex_lock(&l->mu);
    global_roll(l, now_ms);
    e = entry_get(l, tag, now_ms);
    ok = !over_locked(l, e, global_hit);
    if (ok) {
        e->count++;
        e->last = now_ms;
        l->g_count++;
    }
    pthread_mutex_unlock(&l->mu);
    return ok;
}

void kmsd_limiter_count(struct kmsd_limiter *l, const void *key, size_t len, uint64_t now_ms)
{
    uint64_t tag = limit_hash(l, key, len);
    struct limit_entry *e;
    pthread_mutex_lock(&l->mu);
    global_roll(l, now_ms);
    e = entry_get(l, tag, now_ms);
    if (e->count < UINT32_MAX) {
        e->count++;
    }
    e->last = now_ms;
    if (l->g_count < UINT32_MAX) {
        l->g_count++;
    }
    pthread_mutex_unlock(&l->mu);
}

size_t kmsd_limit_addr_key(const uint8_t ip16[16], uint8_t out[16])
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    memset(out, 0, 16);
    if (memcmp(ip16, mapped, sizeof(mapped)) == 0) {
        memcpy(out, ip16 + 12, 4);
        return 4;
    }
    memcpy(out, ip16, 8);
    return 8;
}
