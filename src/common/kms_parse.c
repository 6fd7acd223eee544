/*
 * Strict scalar parsers (kms_parse.h).
 */
#include "kms_parse.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static void why_set(char *why, size_t wn, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void why_set(char *why, size_t wn, const char *fmt, ...)
{
    va_list ap;
    if (why == NULL || wn == 0) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(why, wn, fmt, ap);
    va_end(ap);
}

/* Leading digits of s as a u64 (*ndigits of them); *end after them. -1 on
 * none or overflow. */
static int parse_digits(const char *s, uint64_t *out, const char **end, size_t *ndigits)
{
    uint64_t v = 0;
    const char *p = s;
    if (!isdigit((unsigned char)*p)) {
        return -1;
    }
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) {
            return -1;
        }
        v = v * 10 + d;
    }
    *out = v;
    *end = p;
    if (ndigits != NULL) {
        *ndigits = (size_t)(p - s);
    }
    return 0;
}

int kms_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                  size_t wn)
{
    const char *end;
    uint64_t v;
    if (parse_digits(s, &v, &end, NULL) != 0 || *end != '\0') {
        why_set(why, wn, "invalid number \"%s\"", s);
        return -1;
    }
    if (v < min || v > max) {
        why_set(why, wn, "%s out of range %llu..%llu", s, (unsigned long long)min,
                (unsigned long long)max);
        return -1;
    }
    *out = v;
    return 0;
}

int kms_parse_bool(const char *s, bool *out, char *why, size_t wn)
{
    if (strcmp(s, "true") == 0) {
        *out = true;
        return 0;
    }
    if (strcmp(s, "false") == 0) {
        *out = false;
        return 0;
    }
    why_set(why, wn, "invalid boolean \"%s\" (true or false)", s);
    return -1;
}

/* <digits>[.<digits>] times mul, when the product is a whole number; *end
 * after the number. -1 otherwise (or on overflow). */
static int parse_decimal_times(const char *s, uint64_t mul, uint64_t *out, const char **end)
{
    uint64_t whole, frac = 0, scale = 1;
    size_t nfrac = 0;
    const char *p;
    if (parse_digits(s, &whole, &p, NULL) != 0) {
        return -1;
    }
    if (*p == '.') {
        if (parse_digits(p + 1, &frac, &p, &nfrac) != 0 || nfrac > 9) {
            return -1;
        }
        for (size_t i = 0; i < nfrac; i++) {
            scale *= 10;
        }
    }
    if (whole > UINT64_MAX / mul || frac > UINT64_MAX / mul || (frac * mul) % scale != 0 ||
        whole * mul > UINT64_MAX - (frac * mul) / scale) {
        return -1;
    }
    *out = whole * mul + (frac * mul) / scale;
    *end = p;
    return 0;
}

int kms_parse_duration_ms(const char *s, uint64_t min_ms, uint64_t max_ms,
                          uint64_t bare_unit_ms, uint64_t *out, char *why, size_t wn)
{
    static const struct {
        const char *unit;
        uint64_t ms;
    } units[] = {{"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}};
    const char *unit = s;
    uint64_t mul = 0, v;
    /* The unit decides the multiplier, so find it first. */
    while (isdigit((unsigned char)*unit) || *unit == '.') {
        unit++;
    }
    if (*unit == '\0') {
        mul = bare_unit_ms;
    }
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]) && mul == 0; i++) {
        if (strcmp(unit, units[i].unit) == 0) {
            mul = units[i].ms;
        }
    }
    const char *end;
    if (mul == 0 || parse_decimal_times(s, mul, &v, &end) != 0 || end != unit) {
        why_set(why, wn, "invalid duration \"%s\" (e.g. 500ms, 3s, 1m)", s);
        return -1;
    }
    if (v < min_ms || v > max_ms) {
        why_set(why, wn, "duration %s out of range %llums..%llums", s,
                (unsigned long long)min_ms, (unsigned long long)max_ms);
        return -1;
    }
    *out = v;
    return 0;
}

int kms_parse_size(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                   size_t wn)
{
    static const struct {
        const char *unit;
        uint64_t mul;
    } units[] = {{"", 1}, {"B", 1}, {"KiB", 1024}, {"MiB", 1024 * 1024},
                 {"GiB", 1024 * 1024 * 1024}};
    const char *end;
    uint64_t v;
    if (parse_digits(s, &v, &end, NULL) == 0) {
        for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
            if (strcmp(end, units[i].unit) == 0) {
                if (v > UINT64_MAX / units[i].mul) {
                    break;
                }
                v *= units[i].mul;
                if (v < min || v > max) {
                    why_set(why, wn, "size %s out of range %llu..%llu bytes", s,
                            (unsigned long long)min, (unsigned long long)max);
                    return -1;
                }
                *out = v;
                return 0;
            }
        }
    }
    why_set(why, wn, "invalid size \"%s\" (e.g. 4096, 4KiB, 1MiB)", s);
    return -1;
}

/* A DNS name or IPv4 literal: letters, digits, '-', '.', '_'. */
static bool valid_hostname(const char *h, size_t n)
{
    if (n == 0 || n > 253) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)h[i];
        if (!isalnum(c) && c != '-' && c != '.' && c != '_') {
            return false;
        }
    }
    return true;
}

int kms_parse_addr(const char *s, unsigned flags, struct kms_addr *out, char *why, size_t wn)
{
    const char *host = s;
    const char *colon;
    const char *end;
    size_t host_len;
    uint64_t port;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        char v6[64];
        struct in6_addr a;
        if (rb == NULL || rb[1] != ':' || (size_t)(rb - s - 1) >= sizeof(v6)) {
            goto bad;
        }
        memcpy(v6, s + 1, (size_t)(rb - s - 1));
        v6[rb - s - 1] = '\0';
        if (inet_pton(AF_INET6, v6, &a) != 1) {
            why_set(why, wn, "invalid IPv6 address \"%s\"", v6);
            return -1;
        }
        host = s + 1;
        host_len = (size_t)(rb - host);
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL || memchr(s, ':', (size_t)(colon - s)) != NULL) {
            goto bad; /* no port, or a bare IPv6 literal */
        }
        host_len = (size_t)(colon - s);
        if (host_len == 0) {
            if (flags & KMS_PARSE_ADDR_NEED_HOST) {
                why_set(why, wn, "address \"%s\" needs a host", s);
                return -1;
            }
        } else if (!valid_hostname(s, host_len)) {
            why_set(why, wn, "invalid host in \"%s\"", s);
            return -1;
        }
    }
    if (parse_digits(colon + 1, &port, &end, NULL) != 0 || *end != '\0' ||
        port < ((flags & KMS_PARSE_ADDR_PORT0) ? 0u : 1u) || port > 65535 ||
        strlen(colon + 1) > 5) {
        why_set(why, wn, "invalid port \"%s\"", colon + 1);
        return -1;
    }
    if (out != NULL) {
        memcpy(out->host, host, host_len); /* < 256: 253 or 63 at most */
        out->host[host_len] = '\0';
        out->port = (uint16_t)port;
    }
    return 0;
bad:
    why_set(why, wn, "invalid address \"%s\" (host:port, :port or [v6]:port)", s);
    return -1;
}

int kms_parse_cidr(const char *s, uint8_t addr[16], unsigned *prefix, char *why, size_t wn)
{
    char host[64];
    const char *slash = strchr(s, '/');
    uint64_t bits;
    const char *end;
    bool v4;
    if (slash == NULL || (size_t)(slash - s) >= sizeof(host)) {
        goto bad;
    }
    memcpy(host, s, (size_t)(slash - s));
    host[slash - s] = '\0';
    memset(addr, 0, 16);
    v4 = strchr(host, ':') == NULL;
    if (v4) {
        addr[10] = 0xff;
        addr[11] = 0xff;
        if (inet_pton(AF_INET, host, addr + 12) != 1) {
            goto bad;
        }
    } else if (inet_pton(AF_INET6, host, addr) != 1) {
        goto bad;
    }
    if (parse_digits(slash + 1, &bits, &end, NULL) != 0 || *end != '\0' ||
        strlen(slash + 1) > 3 || bits > (v4 ? 32u : 128u)) {
        goto bad;
    }
    *prefix = (unsigned)bits + (v4 ? 96u : 0u);
    /* Host bits must be zero: "10.0.0.1/8" is more likely a typo than an
     * intent, and matching would silently use 10.0.0.0/8 anyway. */
    for (unsigned bit = *prefix; bit < 128; bit++) {
        if (addr[bit / 8] & (0x80u >> (bit % 8))) {
            why_set(why, wn, "CIDR \"%s\" has host bits set", s);
            return -1;
        }
    }
    return 0;
bad:
    why_set(why, wn, "invalid CIDR \"%s\"", s);
    return -1;
}
