/*
 * docs/configuration.md's options table is generated from the option table
 * (kmsd --print-config-table): fails when the two disagree, i.e. when an
 * option row in src/server/config/config_options.h changed and the docs were not
 * regenerated, or the docs table was edited by hand.
 *
 * Regenerate: replace the lines between the BEGIN/END markers with the
 * output of `kmsd --print-config-table`.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kms_config.h"

#ifndef KMS_SOURCE_DIR
#error "KMS_SOURCE_DIR must name the source tree"
#endif

#define BEGIN_MARK "<!-- BEGIN options table"
#define END_MARK "<!-- END options table -->"

/* The whole of path, NUL-terminated; NULL on failure. */
static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t len = 0;
    FILE *m;
    int c;
    if (f == NULL) {
        return NULL;
    }
    m = open_memstream(&buf, &len);
    while (m != NULL && (c = fgetc(f)) != EOF) {
        fputc(c, m);
    }
    if (m != NULL) {
        fclose(m);
    }
    fclose(f);
    return buf;
}

/* The table lines between the markers (the BEGIN comment may span lines:
 * the table starts at the first line beginning with '|'). */
static char *docs_table(const char *md)
{
    const char *b = strstr(md, BEGIN_MARK);
    const char *e;
    if (b == NULL || (b = strstr(b, "\n|")) == NULL || (e = strstr(b, END_MARK)) == NULL) {
        return NULL;
    }
    b++;
    return strndup(b, (size_t)(e - b));
}

static void test_docs_table_matches_code(void **state)
{
    char *md = slurp(KMS_SOURCE_DIR "/docs/configuration.md");
    char *want = NULL;
    size_t want_len = 0;
    FILE *m;
    char *have;
    (void)state;
    assert_non_null(md);
    have = docs_table(md);
    if (have == NULL) {
        fail_msg("docs/configuration.md: no \"%s ... %s\" block", BEGIN_MARK, END_MARK);
    }
    m = open_memstream(&want, &want_len);
    assert_non_null(m);
    assert_int_equal(kms_config_print_table(m), 0);
    fclose(m);
    if (strcmp(have, want) != 0) {
        const char *h = have, *w = want;
        unsigned line = 1;
        while (*h != '\0' && *h == *w) {
            line += *h == '\n';
            h++;
            w++;
        }
        fail_msg("docs/configuration.md options table differs from the code at table line %u:\n"
                 "  docs: %.160s\n  code: %.160s\nregenerate it with kmsd --print-config-table",
                 line, h, w);
    }
    free(have);
    free(want);
    free(md);
}

/* Options appear in the table once (their rows), with env and flag. */
static void test_table_lists_every_option(void **state)
{
    char *out = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&out, &len);
    const char *keys[] = {"| `nodeId` |", "| `talos.listen` |", "| `initialCluster` |",
                          "| `enrolment.allowedCIDRs` |", "| `seal.pin` |", "| `auditFile` |",
                          "`KMSD_PKCS11_PIN`", "`--rate-limit-records-per-node`"};
    (void)state;
    assert_non_null(m);
    assert_int_equal(kms_config_print_table(m), 0);
    fclose(m);
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        const char *p = strstr(out, keys[i]);
        assert_non_null(p);
        if (keys[i][0] == '|') {
            assert_null(strstr(p + 1, keys[i]));
        }
    }
    /* seal.pin is the one sensitive option. */
    assert_non_null(strstr(out, "| `--seal-pin` | I S |"));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_docs_table_matches_code),
        cmocka_unit_test(test_table_lists_every_option),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
