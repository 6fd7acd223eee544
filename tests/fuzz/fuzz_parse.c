/* libFuzzer: the shared scalar parsers (kms_parse.h) on arbitrary text:
 * every configuration value, kmsctl's --timeout and the raft transport's
 * peer addresses go through them. The first byte picks the parser. Checks:
 * a refusal always says why (NUL-terminated, in the buffer); an accepted
 * value is inside the bounds asked for; an accepted address or CIDR formats
 * back to text that parses to the same value. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_parse.h"

static void why_check(int rc, const char *why, size_t wn)
{
    if (rc != 0 && rc != -1) {
        abort();
    }
    if (rc != 0 && (memchr(why, '\0', wn) == NULL || why[0] == '\0')) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char why[256];
    char *s;
    int rc;

    if (size == 0) {
        return 0;
    }
    s = malloc(size);
    if (s == NULL) {
        return 0;
    }
    memcpy(s, data + 1, size - 1);
    s[size - 1] = '\0';
    why[0] = '\0';

    switch (data[0] % 6) {
    case 0: {
        uint64_t v = 0;
        rc = kms_parse_u64(s, 5, 1000000, &v, why, sizeof(why));
        why_check(rc, why, sizeof(why));
        if (rc == 0 && (v < 5 || v > 1000000)) {
            abort();
        }
        break;
    }
    case 1: {
        bool b;
        rc = kms_parse_bool(s, &b, why, sizeof(why));
        why_check(rc, why, sizeof(why));
        if (rc == 0 && strcmp(s, b ? "true" : "false") != 0) {
            abort();
        }
        break;
    }
    case 2: {
        uint64_t ms = 0;
        rc = kms_parse_duration_ms(s, 1, 3600000, data[0] & 8 ? 1000 : 0, &ms, why,
                                   sizeof(why));
        why_check(rc, why, sizeof(why));
        if (rc == 0 && (ms < 1 || ms > 3600000)) {
            abort();
        }
        break;
    }
    case 3: {
        uint64_t n = 0;
        rc = kms_parse_size(s, 1, 1ull << 40, &n, why, sizeof(why));
        why_check(rc, why, sizeof(why));
        if (rc == 0 && (n < 1 || n > 1ull << 40)) {
            abort();
        }
        break;
    }
    case 4: {
        struct kms_addr a, again;
        char text[300];
        rc = kms_parse_addr(s, data[0] & 8 ? KMS_PARSE_ADDR_NEED_HOST : 0, &a, why,
                            sizeof(why));
        why_check(rc, why, sizeof(why));
        if (rc == 0) {
            if (a.port == 0 || ((data[0] & 8) && a.host[0] == '\0')) {
                abort();
            }
            snprintf(text, sizeof(text), strchr(a.host, ':') != NULL ? "[%s]:%u" : "%s:%u",
                     a.host, (unsigned)a.port);
            if (kms_parse_addr(text, 0, &again, NULL, 0) != 0 ||
                strcmp(again.host, a.host) != 0 || again.port != a.port) {
                abort();
            }
        }
        break;
    }
    default: {
        uint8_t addr[16];
        unsigned prefix = 0;
        rc = kms_parse_cidr(s, addr, &prefix, why, sizeof(why));
        why_check(rc, why, sizeof(why));
        if (rc == 0) {
            if (prefix > 128) {
                abort();
            }
            /* host bits are zero */
            for (unsigned bit = prefix; bit < 128; bit++) {
                if (addr[bit / 8] & (0x80u >> (bit % 8))) {
                    abort();
                }
            }
        }
        break;
    }
    }
    free(s);
    return 0;
}
