/*
 * kmsctl audit verify FILE: checks a kmsd hash-chained audit file offline
 * (format: src/server/daemon/kmsd_audit.h, docs/security.md "Audit log").
 *
 * Every line ends in ,"seq":"N","prev":"<sha256 hex>"}; prev is SHA-256 over
 * the previous line's bytes (newline excluded) and seq grows by one per line.
 * The first line of a file is an "audit chain start" line (its prev names
 * the previous file's head, which this file cannot check); a later chain
 * start (after a torn line or a rotation) must still carry the right prev but
 * may restart seq. The first line that breaks the chain is reported with its
 * line number: exit 0 intact, 1 broken (or unreadable).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "cli_common.h"

#define HASH_HEX 64

static void sha256_hex(const char *buf, size_t len, char out[HASH_HEX + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    static const char hx[] = "0123456789abcdef";
    memset(out, '0', HASH_HEX);
    if (EVP_Digest(buf, len, md, &n, EVP_sha256(), NULL) == 1 && n == 32) {
        for (unsigned i = 0; i < 32; i++) {
            out[2 * i] = hx[md[i] >> 4];
            out[2 * i + 1] = hx[md[i] & 15];
        }
    }
    out[HASH_HEX] = '\0';
}

/* The chain fields at the end of a line (no newline): seq and prev. */
static bool chain_fields(const char *line, size_t len, uint64_t *seq, char prev[HASH_HEX + 1])
{
    static const char pre[] = ",\"prev\":\"";
    const size_t suffix = sizeof(pre) - 1 + HASH_HEX + 2;
    const char *p, *q;
    char *end;

    if (len < suffix + 12 || memcmp(line + len - suffix, pre, sizeof(pre) - 1) != 0 ||
        memcmp(line + len - 2, "\"}", 2) != 0) {
        return false;
    }
    q = line + len - suffix + sizeof(pre) - 1;
    for (size_t i = 0; i < HASH_HEX; i++) {
        if (!((q[i] >= '0' && q[i] <= '9') || (q[i] >= 'a' && q[i] <= 'f'))) {
            return false;
        }
    }
    memcpy(prev, q, HASH_HEX);
    prev[HASH_HEX] = '\0';
    for (p = line + len - suffix - 1; p > line && *p != ':'; p--) {
    }
    if (p - line < 6 || memcmp(p - 6, ",\"seq\"", 6) != 0 || p[1] != '"' || p[2] < '0' ||
        p[2] > '9') {
        return false;
    }
    errno = 0;
    *seq = strtoull(p + 2, &end, 10);
    return errno == 0 && *end == '"' && end == line + len - suffix - 1;
}

static bool is_chain_start(const char *line)
{
    return strstr(line, "\"mod\":\"audit\",\"msg\":\"audit chain start\"") != NULL;
}

struct verdict {
    uint64_t lines, first_seq, last_seq;
    char head[HASH_HEX + 1];
    uint64_t bad_line;      /* 0 = intact */
    char why[512];
};

static int verify_file(FILE *f, struct verdict *v)
{
    char *line = NULL, prev_hash[HASH_HEX + 1] = "", prev[HASH_HEX + 1];
    size_t cap = 0;
    ssize_t n;
    uint64_t no = 0, seq = 0, last_seq = 0;

    memset(v, 0, sizeof(*v));
    while ((n = getline(&line, &cap, f)) > 0) {
        size_t len = (size_t)n;
        bool torn = line[len - 1] != '\n';
        no++;
        if (!torn) {
            line[--len] = '\0';
        }
        if (torn) {
            v->bad_line = no;
            snprintf(v->why, sizeof(v->why),
                     "torn: the file ends inside this line (truncated, or a write was cut)");
            break;
        }
        if (!chain_fields(line, len, &seq, prev)) {
            v->bad_line = no;
            snprintf(v->why, sizeof(v->why),
                     "no valid seq/prev chain fields at the end (edited, torn, or not a kmsd "
                     "audit line)");
            break;
        }
        if (no == 1) {
            if (!is_chain_start(line)) {
                v->bad_line = 1;
                snprintf(v->why, sizeof(v->why),
                         "the file does not begin with an \"audit chain start\" line "
                         "(line(s) missing at the front, seq %" PRIu64 ")", seq);
                break;
            }
            v->first_seq = seq;
        } else {
            bool start = is_chain_start(line);
            if (!start && seq != last_seq + 1) {
                v->bad_line = no;
                if (seq > last_seq + 1) {
                    snprintf(v->why, sizeof(v->why),
                             "%" PRIu64 " line(s) missing before this line (seq jumps from %"
                             PRIu64 " to %" PRIu64 ")", seq - last_seq - 1, last_seq, seq);
                } else {
                    snprintf(v->why, sizeof(v->why),
                             "seq %" PRIu64 " after %" PRIu64 " (line edited, moved or "
                             "inserted)", seq, last_seq);
                }
                break;
            }
            if (strcmp(prev, prev_hash) != 0) {
                v->bad_line = no - 1;
                snprintf(v->why, sizeof(v->why),
                         "changed: its SHA-256 is not the prev recorded by line %" PRIu64
                         " (or line %" PRIu64 "'s prev was edited)", no, no);
                break;
            }
        }
        sha256_hex(line, len, prev_hash);
        last_seq = seq;
    }
    free(line);
    if (ferror(f)) {
        v->bad_line = no + 1;
        snprintf(v->why, sizeof(v->why), "read error: %s", strerror(errno));
    } else if (no == 0 && v->bad_line == 0) {
        v->bad_line = 1;
        snprintf(v->why, sizeof(v->why), "the file is empty (no chain start line)");
    }
    v->lines = no;
    v->last_seq = last_seq;
    memcpy(v->head, prev_hash, sizeof(v->head));
    return v->bad_line == 0 ? 0 : 1;
}

static int verify_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    struct verdict v;
    char *pos[1] = {NULL};
    int npos = 0, rc;
    FILE *f;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos)) >= 0) {
        return rc;
    }
    if (npos != 1) {
        return cli_usage_error(ctx, "audit verify: expected one FILE");
    }
    f = fopen(pos[0], "r");
    if (f == NULL) {
        fprintf(ctx->err, "Error: audit verify: cannot open %s: %s\n", pos[0], strerror(errno));
        return CLI_EXIT_LOCAL;
    }
    rc = verify_file(f, &v);
    fclose(f);
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_str(&j, "file", pos[0]);
        cli_json_bool(&j, "intact", rc == 0);
        cli_json_u64(&j, "lines", v.lines);
        if (rc == 0) {
            cli_json_u64(&j, "first_seq", v.first_seq);
            cli_json_u64(&j, "last_seq", v.last_seq);
            cli_json_str(&j, "head", v.head);
        } else {
            cli_json_u64(&j, "broken_line", v.bad_line);
            cli_json_str(&j, "reason", v.why);
        }
        cli_json_doc_end(&j);
    } else if (rc == 0) {
        fprintf(ctx->out,
                "%s: intact, %" PRIu64 " lines (seq %" PRIu64 "..%" PRIu64 ")\n"
                "head %s\n",
                pos[0], v.lines, v.first_seq, v.last_seq, v.head);
    } else {
        fprintf(ctx->out, "%s: BROKEN at line %" PRIu64 ": %s\n", pos[0], v.bad_line, v.why);
    }
    return rc == 0 ? CLI_EXIT_OK : CLI_EXIT_LOCAL;
}

const char cli_audit_usage[] =
    "Usage: kmsctl audit verify FILE\n"
    "\n"
    "Offline checks of kmsd's hash-chained audit file (auditFile, default\n"
    "<dataDir>/audit.log).";

const struct cli_cmd cli_audit_subs[] = {
    CLI_CMD_LEAF("verify", "check a hash-chained audit file; name the first broken line (offline)",
                 "Usage: kmsctl audit verify FILE\n"
                 "\n"
                 "Reads FILE line by line: each line's prev must be the SHA-256 of the line\n"
                 "before it and its seq one more than that line's; the file must begin with\n"
                 "an \"audit chain start\" line and end with a complete line. Prints\n"
                 "\"intact\", the line count and the head (SHA-256 of the last line), or the\n"
                 "first line that is changed, missing, torn or not chained.\n"
                 "Exit codes: 0 intact, 1 broken or unreadable.\n"
                 "Lines removed from the end leave a shorter chain that is still intact:\n"
                 "compare the head (or the last seq) with a copy kept elsewhere (kmsd\n"
                 "writes the same lines to its journal).",
                 verify_run, NULL),
    CLI_CMD_END,
};
