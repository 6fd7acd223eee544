/*
 * kmsctl output: terminal-safe writing of server strings (control bytes and
 * invalid UTF-8 become '?'), RFC 3339 times, aligned tables and the
 * numbered key-share lines. See cli_common.h.
 */
#include "cli_common.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Length of the valid UTF-8 sequence at s (1..4) with its code point, or 0. */
int cli_utf8_next(const unsigned char *s, uint32_t *cp)
{
    unsigned char c = s[0];
    int n;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xe0) == 0xc0) {
        n = 2, v = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        n = 3, v = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            return 0;
        }
        v = v << 6 | (s[i] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) {
        return 0;
    }
    *cp = v;
    return n;
}

/* Writes s, replacing control characters (C0, DEL, C1) and invalid UTF-8
 * with '?'. Returns the number of characters written (display width
 * approximation: one per code point). */
static size_t safe_write(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s != NULL ? s : "");
    size_t w = 0;
    while (*p != '\0') {
        uint32_t cp;
        int n = cli_utf8_next(p, &cp);
        if (n == 0 || cp < 0x20 || (cp >= 0x7f && cp < 0xa0)) {
            fputc('?', f);
            p += n == 0 ? 1 : n;
        } else {
            fwrite(p, 1, (size_t)n, f);
            p += n;
        }
        w++;
    }
    return w;
}

void cli_write_safe(FILE *f, const char *s)
{
    (void)safe_write(f, s);
}

char *cli_safe_dup(const char *s)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    if (m == NULL) {
        return NULL;
    }
    safe_write(m, s);
    if (fclose(m) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* ---- output ---------------------------------------------------------- */

void cli_format_time(int64_t ms, bool with_ms, char *buf, size_t len)
{
    struct tm tm;
    time_t secs;
    int64_t frac;

    if (ms == 0) {
        snprintf(buf, len, "-");
        return;
    }
    secs = (time_t)(ms / 1000);
    frac = ms % 1000;
    if (frac < 0) {
        frac += 1000;
        secs -= 1;
    }
    if (gmtime_r(&secs, &tm) == NULL) {
        snprintf(buf, len, "%lld", (long long)ms);
        return;
    }
    if (with_ms) {
        snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
    } else {
        snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
    }
}

struct cli_table {
    unsigned ncols;
    size_t nrows, cap;
    char **cells; /* nrows * ncols, sanitised */
};

struct cli_table *cli_table_new(unsigned ncols, const char *const *header)
{
    struct cli_table *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        return NULL;
    }
    t->ncols = ncols;
    if (header != NULL) {
        cli_table_row(t, header);
    }
    return t;
}

void cli_table_row(struct cli_table *t, const char *const *cells)
{
    if (t == NULL) {
        return;
    }
    if (t->nrows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        char **c = realloc(t->cells, cap * t->ncols * sizeof(*c));
        if (c == NULL) {
            return;
        }
        t->cells = c;
        t->cap = cap;
    }
    for (unsigned i = 0; i < t->ncols; i++) {
        t->cells[t->nrows * t->ncols + i] = cli_safe_dup(cells[i] != NULL ? cells[i] : "");
    }
    t->nrows++;
}

static size_t display_width(const char *s)
{
    size_t w = 0;
    for (const unsigned char *p = (const unsigned char *)s; p != NULL && *p; p++) {
        w += (*p & 0xc0) != 0x80;
    }
    return w;
}

void cli_table_print(FILE *f, const struct cli_table *t)
{
    size_t width[16] = {0};
    if (t == NULL) {
        return;
    }
    unsigned nc = t->ncols < 16 ? t->ncols : 16;
    for (size_t r = 0; r < t->nrows; r++) {
        for (unsigned c = 0; c < nc; c++) {
            size_t w = display_width(t->cells[r * t->ncols + c]);
            if (w > width[c]) {
                width[c] = w;
            }
        }
    }
    for (size_t r = 0; r < t->nrows; r++) {
        /* Last non-empty column: no trailing padding. */
        unsigned last = 0;
        for (unsigned c = 0; c < nc; c++) {
            const char *cell = t->cells[r * t->ncols + c];
            if (cell != NULL && cell[0] != '\0') {
                last = c;
            }
        }
        for (unsigned c = 0; c <= last; c++) {
            const char *cell = t->cells[r * t->ncols + c];
            cell = cell != NULL ? cell : "";
            fputs(cell, f);
            if (c < last) {
                for (size_t k = display_width(cell); k < width[c] + 2; k++) {
                    fputc(' ', f);
                }
            }
        }
        fputc('\n', f);
    }
}

struct cli_table *cli_table_new_kv(void)
{
    static const char *const hdr[2] = {"Key", "Value"};
    static const char *const dashes[2] = {"---", "-----"};
    struct cli_table *t = cli_table_new(2, hdr);
    cli_table_row(t, dashes);
    return t;
}

void cli_table_kv(struct cli_table *t, const char *k, const char *v)
{
    const char *row[2] = {k, v};
    cli_table_row(t, row);
}

void cli_table_free(struct cli_table *t)
{
    if (t == NULL) {
        return;
    }
    for (size_t i = 0; i < t->nrows * t->ncols; i++) {
        free(t->cells[i]);
    }
    free(t->cells);
    free(t);
}

void cli_print_shares(FILE *f, const char *label, char *const *shares, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        fprintf(f, "%s %zu: ", label, i + 1);
        cli_write_safe(f, shares[i]);
        fputc('\n', f);
    }
}

const char *cli_dash(const char *s)
{
    return s != NULL && s[0] != '\0' ? s : "-";
}
