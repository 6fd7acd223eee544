/*
 * kmsctl's JSON writer (-o json): pretty printed, keys in the order
 * written, strings escaped per RFC 8259. See cli_common.h.
 */
#include "cli_common.h"

#include <string.h>

/* JSON */

void cli_json_init(struct cli_json *j, FILE *f)
{
    memset(j, 0, sizeof(*j));
    j->f = f;
    j->first[0] = true;
}

void cli_json_escape(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s != NULL ? s : "");
    fputc('"', f);
    while (*p != '\0') {
        uint32_t cp;
        int n = cli_utf8_next(p, &cp);
        if (n == 0) {
            fputs("\\ufffd", f);
            p++;
            continue;
        }
        /* The two-character escapes of RFC 8259, then \u00XX. */
        static const char shorts[] = "\"\\\b\f\n\r\t";
        static const char *const escaped[] = {"\\\"", "\\\\", "\\b", "\\f",
                                              "\\n",  "\\r",  "\\t"};
        const char *hit = cp != 0 && cp < 0x80 ? strchr(shorts, (int)cp) : NULL;
        if (hit != NULL) {
            fputs(escaped[hit - shorts], f);
        } else if (cp < 0x20 || cp == 0x7f || cp == 0x2028 || cp == 0x2029) {
            fprintf(f, "\\u%04x", (unsigned)cp);
        } else {
            fwrite(p, 1, (size_t)n, f);
        }
        p += n;
    }
    fputc('"', f);
}

static void json_indent(struct cli_json *j)
{
    for (int i = 0; i < j->depth; i++) {
        fputs("  ", j->f);
    }
}

/* Separator, newline, indentation and key for the next value. */
static void json_pre(struct cli_json *j, const char *key)
{
    int d = j->depth < CLI_JSON_MAX_DEPTH ? j->depth : CLI_JSON_MAX_DEPTH - 1;
    if (j->depth > 0) {
        if (!j->first[d]) {
            fputc(',', j->f);
        }
        fputc('\n', j->f);
        json_indent(j);
    }
    j->first[d] = false;
    if (key != NULL && j->depth > 0) {
        cli_json_escape(j->f, key);
        fputs(": ", j->f);
    }
}

static void json_open(struct cli_json *j, const char *key, char c)
{
    json_pre(j, key);
    fputc(c, j->f);
    if (j->depth < CLI_JSON_MAX_DEPTH - 1) {
        j->depth++;
        j->first[j->depth] = true;
    }
}

static void json_close(struct cli_json *j, char c)
{
    bool empty = j->first[j->depth];
    if (j->depth > 0) {
        j->depth--;
    }
    if (!empty) {
        fputc('\n', j->f);
        json_indent(j);
    }
    fputc(c, j->f);
}

void cli_json_obj_begin(struct cli_json *j, const char *key)
{
    json_open(j, key, '{');
}

void cli_json_obj_end(struct cli_json *j)
{
    json_close(j, '}');
}

void cli_json_arr_begin(struct cli_json *j, const char *key)
{
    json_open(j, key, '[');
}

void cli_json_arr_end(struct cli_json *j)
{
    json_close(j, ']');
}

void cli_json_str(struct cli_json *j, const char *key, const char *v)
{
    json_pre(j, key);
    cli_json_escape(j->f, v);
}

void cli_json_u64(struct cli_json *j, const char *key, uint64_t v)
{
    json_pre(j, key);
    fprintf(j->f, "%llu", (unsigned long long)v);
}

void cli_json_i64(struct cli_json *j, const char *key, int64_t v)
{
    json_pre(j, key);
    fprintf(j->f, "%lld", (long long)v);
}

void cli_json_bool(struct cli_json *j, const char *key, bool v)
{
    json_pre(j, key);
    fputs(v ? "true" : "false", j->f);
}

void cli_json_null(struct cli_json *j, const char *key)
{
    json_pre(j, key);
    fputs("null", j->f);
}

void cli_json_time(struct cli_json *j, const char *key, int64_t ms)
{
    char buf[48];
    if (ms == 0) {
        cli_json_null(j, key);
        return;
    }
    cli_format_time(ms, true, buf, sizeof(buf));
    cli_json_str(j, key, buf);
}

void cli_json_end(struct cli_json *j)
{
    fputc('\n', j->f);
}

void cli_json_doc_begin(struct cli_json *j, FILE *f)
{
    cli_json_init(j, f);
    cli_json_obj_begin(j, NULL);
}

void cli_json_doc_end(struct cli_json *j)
{
    cli_json_obj_end(j);
    cli_json_end(j);
}

void cli_json_str_array(struct cli_json *j, const char *key, char *const *v, size_t n)
{
    cli_json_arr_begin(j, key);
    for (size_t i = 0; i < n; i++) {
        cli_json_str(j, NULL, v[i]);
    }
    cli_json_arr_end(j);
}

void cli_json_u32_array(struct cli_json *j, const char *key, const uint32_t *v, size_t n)
{
    cli_json_arr_begin(j, key);
    for (size_t i = 0; i < n; i++) {
        cli_json_u64(j, NULL, v[i]);
    }
    cli_json_arr_end(j);
}

void cli_json_print_u64(FILE *f, const char *key, uint64_t v)
{
    struct cli_json j;
    cli_json_doc_begin(&j, f);
    cli_json_u64(&j, key, v);
    cli_json_doc_end(&j);
}

void cli_json_print_bool(FILE *f, const char *key, bool v)
{
    struct cli_json j;
    cli_json_doc_begin(&j, f);
    cli_json_bool(&j, key, v);
    cli_json_doc_end(&j);
}
