/* kms_log: every line is one valid JSON object whatever the fields hold
 * (quotes, control characters, invalid UTF-8, 10 KB values); long fields
 * are cut with a marker, lines never. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms_log.h"

/* Captures what kms_log writes to fd 2 during fn(). */
static size_t capture(void (*fn)(const char *arg), const char *arg, char *out, size_t cap)
{
    FILE *tmp = tmpfile();
    int saved = dup(STDERR_FILENO);
    size_t n;

    assert_non_null(tmp);
    assert_true(saved >= 0);
    fflush(stderr);
    assert_true(dup2(fileno(tmp), STDERR_FILENO) >= 0);
    fn(arg);
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    rewind(tmp);
    n = fread(out, 1, cap - 1, tmp);
    out[n] = '\0';
    fclose(tmp);
    return n;
}

/* Minimal strict validator for {"k":"v",...}\n with string values only:
 * RFC 8259 escapes, no raw control characters, valid UTF-8. */
static bool valid_utf8_at(const unsigned char **pp)
{
    const unsigned char *p = *pp;
    unsigned cp;
    size_t n;
    if (p[0] < 0x80) {
        *pp = p + 1;
        return true;
    }
    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        n = 2, cp = p[0] & 0x1f;
    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        n = 3, cp = p[0] & 0x0f;
    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        n = 4, cp = p[0] & 0x07;
    } else {
        return false;
    }
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) {
            return false;
        }
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10ffff))) {
        return false;
    }
    *pp = p + n;
    return true;
}

static bool json_string(const unsigned char **pp)
{
    const unsigned char *p = *pp;
    if (*p++ != '"') {
        return false;
    }
    while (*p != '"') {
        if (*p == '\0' || *p < 0x20) {
            return false;
        }
        if (*p == '\\') {
            p++;
            if (*p == 'u') {
                for (int i = 1; i <= 4; i++) {
                    if (strchr("0123456789abcdefABCDEF", p[i]) == NULL || p[i] == '\0') {
                        return false;
                    }
                }
                p += 5;
            } else if (*p != '\0' && strchr("\"\\/bfnrt", *p) != NULL) {
                p++;
            } else {
                return false;
            }
        } else if (!valid_utf8_at(&p)) {
            return false;
        }
    }
    *pp = p + 1;
    return true;
}

static bool json_line(const char *line)
{
    const unsigned char *p = (const unsigned char *)line;
    if (*p++ != '{') {
        return false;
    }
    for (;;) {
        if (!json_string(&p) || *p++ != ':' || !json_string(&p)) {
            return false;
        }
        if (*p == ',') {
            p++;
            continue;
        }
        break;
    }
    return p[0] == '}' && p[1] == '\n' && p[2] == '\0';
}

static char big[10 * 1024 + 1];
static char out[64 * 1024];

static void log_field(const char *v)
{
    kms_log(KMS_LOG_WARN, "test", "hostile field", "uuid", v, "after", "kept", NULL);
}

static void log_msg(const char *v)
{
    kms_log(KMS_LOG_WARN, "test", v, NULL);
}

static void log_many(const char *v)
{
    kms_log(KMS_LOG_WARN, "test", v, "a", v, "b", v, "c", v, "d", v, "e", v, "f", v, "g", v,
            "h", v, "i", v, "j", v, "k", v, NULL);
}

static void log_fmt(const char *v)
{
    kms_logf(KMS_LOG_WARN, "test", "formatted %s", v);
}

static void check(void (*fn)(const char *), const char *v)
{
    size_t n = capture(fn, v, out, sizeof(out));
    assert_true(n > 0);
    if (!json_line(out)) {
        fail_msg("not one valid JSON line: %.300s", out);
    }
}

static void test_hostile_strings(void **state)
{
    static const char *const hostile[] = {
        "a\"b\\c", "\"}\n{\"level\":\"info\"", "tab\tnl\ncr\rbell\a", "\x01\x1f\x7f",
        "\xff\xfe invalid", "\xc0\xaf overlong", "\xed\xa0\x80 surrogate", "\xe2\x82",
        "\xf4\x90\x80\x80 too big", "ok \xc3\xa9\xe2\x82\xac\xf0\x9f\x94\x91", "",
    };
    (void)state;
    for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++) {
        check(log_field, hostile[i]);
        check(log_msg, hostile[i]);
        check(log_fmt, hostile[i]);
    }
    check(log_field, NULL);
}

static void test_escapes_exact(void **state)
{
    (void)state;
    capture(log_field, "q\"b\\\n\x7f\xff", out, sizeof(out));
    assert_non_null(strstr(out, "\"uuid\":\"q\\\"b\\\\\\u000a\\u007f\\ufffd\""));
    /* valid multibyte UTF-8 passes unchanged */
    capture(log_field, "\xc3\xa9\xf0\x9f\x94\x91", out, sizeof(out));
    assert_non_null(strstr(out, "\"uuid\":\"\xc3\xa9\xf0\x9f\x94\x91\""));
}

static void test_long_values_cut_not_line(void **state)
{
    (void)state;
    memset(big, 'x', sizeof(big) - 1);
    check(log_field, big);
    assert_non_null(strstr(out, "...(+"));
    assert_non_null(strstr(out, "\"after\":\"kept\"")); /* later fields survive */
    assert_true(strlen(out) < 8192);

    /* 10 KB of bytes that each expand to six: still one valid line */
    memset(big, '\x01', sizeof(big) - 1);
    check(log_field, big);
    check(log_msg, big);
    check(log_fmt, big);
    memset(big, '\xff', sizeof(big) - 1);
    check(log_field, big);
    /* a cut never splits a multibyte character */
    for (size_t i = 0; i + 2 < sizeof(big) - 1; i += 3) {
        memcpy(big + i, "\xe2\x82\xac", 3);
    }
    big[sizeof(big) - 2] = 'y';
    check(log_field, big);
}

static void test_too_many_fields_dropped_and_counted(void **state)
{
    (void)state;
    memset(big, '"', sizeof(big) - 1);
    check(log_many, big);
    assert_non_null(strstr(out, "\"fields_dropped\":\""));
}

/* The audit sink: only "audit" lines reach it, complete ("}\n"), even a
 * maximal one; what it returns replaces the stderr copy. */
static char sink_seen[16384];
static size_t sink_calls;

static size_t sink_cb(void *arg, const char *line, size_t len, char *o, size_t cap)
{
    (void)arg;
    sink_calls++;
    assert_true(len >= 2 && line[len - 2] == '}' && line[len - 1] == '\n');
    assert_true(len < sizeof(sink_seen));
    memcpy(sink_seen, line, len);
    sink_seen[len] = '\0';
    assert_true(len - 2 + 20 < cap); /* room for the chain fields */
    memcpy(o, line, len - 2);
    memcpy(o + len - 2, ",\"chained\":\"1\"}\n", 16);
    return len - 2 + 16;
}

static void log_audit(const char *arg)
{
    kms_log(KMS_LOG_INFO, "audit", "operator", "op", arg, NULL);
    kms_log(KMS_LOG_INFO, "server", "not audit", "op", arg, NULL);
}

static void test_audit_sink(void **state)
{
    (void)state;
    sink_calls = 0;
    kms_log_set_audit_sink(sink_cb, NULL);
    capture(log_audit, "Status", out, sizeof(out));
    assert_int_equal(sink_calls, 1);
    assert_non_null(strstr(sink_seen, "\"op\":\"Status\"}\n"));
    assert_non_null(strstr(out, "\"op\":\"Status\",\"chained\":\"1\"}\n"));
    assert_non_null(strstr(out, "\"msg\":\"not audit\""));
    memset(big, 'x', sizeof(big) - 1);
    capture(log_audit, big, out, sizeof(out)); /* a cut line is still whole */
    assert_int_equal(sink_calls, 2);
    assert_true(json_line(sink_seen));
    kms_log_set_audit_sink(NULL, NULL);
    capture(log_audit, "after", out, sizeof(out));
    assert_int_equal(sink_calls, 2);
    assert_null(strstr(out, "chained"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hostile_strings),
        cmocka_unit_test(test_escapes_exact),
        cmocka_unit_test(test_long_values_cut_not_line),
        cmocka_unit_test(test_too_many_fields_dropped_and_counted),
        cmocka_unit_test(test_audit_sink),
    };
    kms_log_set_level(KMS_LOG_DEBUG);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
