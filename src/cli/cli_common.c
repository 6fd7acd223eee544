/*
 * kmsctl internals: flags, environment, dispatch, output, errors, RPC.
 * See cli_common.h.
 */
#include "cli_common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_err.h"
#include "kms_log.h"
#include "kms_parse.h"
#include "kms_rpc.h"
#include "kms_tls_check.h"

/* ---- global flags ---------------------------------------------------- */

void cli_global_init(struct cli_global *g)
{
    memset(g, 0, sizeof(*g));
    g->endpoint = CLI_DEFAULT_ENDPOINT;
    g->endpoint_src = "default";
    g->output = "table";
    g->output_src = "default";
    g->timeout = "10s";
    g->timeout_src = "default";
    g->out = CLI_OUT_TABLE;
    g->timeout_ms = CLI_DEFAULT_TIMEOUT_MS;
}

static void env_one(cli_getenv_fn ge, const char *name, const char **val, const char **src)
{
    const char *v = ge(name);
    if (v != NULL && v[0] != '\0') {
        *val = v;
        *src = name;
    }
}

static const char *real_getenv(const char *name)
{
    return getenv(name);
}

void cli_global_env(struct cli_global *g, cli_getenv_fn ge)
{
    if (ge == NULL) {
        ge = real_getenv;
    }
    env_one(ge, "KMSCTL_ENDPOINTS", &g->endpoint, &g->endpoint_src);
    env_one(ge, "KMSCTL_ENDPOINT", &g->endpoint, &g->endpoint_src);
    env_one(ge, "KMSCTL_CACERT", &g->cacert, &g->cacert_src);
    env_one(ge, "KMSCTL_CERT", &g->cert, &g->cert_src);
    env_one(ge, "KMSCTL_KEY", &g->key, &g->key_src);
    env_one(ge, "KMSCTL_OUTPUT", &g->output, &g->output_src);
    env_one(ge, "KMSCTL_TIMEOUT", &g->timeout, &g->timeout_src);
}

/* One endpoint of the list: scheme split off, host:port checked, copied to
 * g->targets[g->n_targets]. shown is the whole option value for messages. */
static int endpoint_one(struct cli_global *g, const char *e, size_t len, char *errbuf,
                        size_t errlen)
{
    char one[CLI_TARGET_MAX];
    bool insecure = false;
    const char *colon;
    unsigned long port;

    if (len >= sizeof(one)) {
        snprintf(errbuf, errlen, "invalid endpoint in '%.60s' from %s (too long)", g->endpoint,
                 g->endpoint_src);
        return CLI_EXIT_LOCAL;
    }
    memcpy(one, e, len);
    one[len] = '\0';
    e = one;
    if (strncmp(e, "grpc://", 7) == 0) {
        insecure = true;
        e += 7;
    } else if (strncmp(e, "https://", 8) == 0) {
        e += 8;
    } else if (strstr(e, "://") != NULL) {
        snprintf(errbuf, errlen,
                 "invalid endpoint '%s' from %s (want host:port, https://host:port or "
                 "grpc://host:port)",
                 g->endpoint, g->endpoint_src);
        return CLI_EXIT_LOCAL;
    }
    /* host:port, [v6]:port; the port is required. */
    colon = strrchr(e, ':');
    if (e[0] == '\0' || colon == NULL || colon == e ||
        cli_parse_ulong(colon + 1, 1, 65535, &port) != 0 ||
        (e[0] == '[' && colon[-1] != ']') || strchr(e, '/') != NULL) {
        snprintf(errbuf, errlen, "invalid endpoint '%s' from %s (want host:port)", g->endpoint,
                 g->endpoint_src);
        return CLI_EXIT_LOCAL;
    }
    if (g->n_targets > 0 && insecure != g->insecure) {
        snprintf(errbuf, errlen,
                 "invalid endpoints '%s' from %s: mixes grpc:// (plaintext) and TLS endpoints",
                 g->endpoint, g->endpoint_src);
        return CLI_EXIT_LOCAL;
    }
    if (g->n_targets >= CLI_MAX_ENDPOINTS) {
        snprintf(errbuf, errlen, "too many endpoints from %s (at most %d)", g->endpoint_src,
                 CLI_MAX_ENDPOINTS);
        return CLI_EXIT_LOCAL;
    }
    g->insecure = insecure;
    snprintf(g->targets[g->n_targets++], CLI_TARGET_MAX, "%s", e);
    return 0;
}

int cli_global_finish(struct cli_global *g, char *errbuf, size_t errlen)
{
    const char *e = g->endpoint;
    int rc;

    if (strcmp(g->output, "table") == 0) {
        g->out = CLI_OUT_TABLE;
    } else if (strcmp(g->output, "json") == 0) {
        g->out = CLI_OUT_JSON;
    } else {
        snprintf(errbuf, errlen, "invalid output format '%s' from %s (want table or json)",
                 g->output, g->output_src);
        return CLI_EXIT_LOCAL;
    }
    if (cli_parse_duration_ms(g->timeout, &g->timeout_ms) != 0) {
        snprintf(errbuf, errlen,
                 "invalid timeout '%s' from %s (want a duration such as 10s, 500ms, 2m)",
                 g->timeout, g->timeout_src);
        return CLI_EXIT_LOCAL;
    }
    g->insecure = false;
    g->n_targets = 0;
    g->cur_target = 0;
    for (;;) {
        size_t len = strcspn(e, ",");
        if ((rc = endpoint_one(g, e, len, errbuf, errlen)) != 0) {
            return rc;
        }
        if (e[len] == '\0') {
            break;
        }
        e += len + 1;
    }
    g->target = g->targets[0];
    if ((g->cert == NULL) != (g->key == NULL)) {
        snprintf(errbuf, errlen, "a client certificate needs its key: give both %s and %s",
                 g->cert == NULL ? "--cert (KMSCTL_CERT)" : g->cert_src,
                 g->key == NULL ? "--key (KMSCTL_KEY)" : g->key_src);
        return CLI_EXIT_LOCAL;
    }
    if (g->insecure && (g->cacert != NULL || g->cert != NULL)) {
        snprintf(errbuf, errlen, "endpoint %s is plaintext (grpc://) but TLS files were given",
                 g->endpoint);
        return CLI_EXIT_LOCAL;
    }
    return 0;
}

/* ---- argument parsing ----------------------------------------------- */

enum gflag { GF_ENDPOINT, GF_ENDPOINTS, GF_CACERT, GF_CERT, GF_KEY, GF_OUTPUT, GF_TIMEOUT, GF_HELP };

static const struct {
    const char *name;
    char short_name;
    const char *src; /* for messages */
    const char *metavar, *help;
} gflags[] = {
    [GF_ENDPOINT] = {"endpoint", 0, "--endpoint", "HOST:PORT",
                     "cluster API of a kmsd replica (KMSCTL_ENDPOINT, default "
                     CLI_DEFAULT_ENDPOINT "; grpc://HOST:PORT = plaintext)"},
    [GF_ENDPOINTS] = {"endpoints", 0, "--endpoints", "A,B,C",
                      "replicas to try in order: the next one when a connection fails "
                      "(KMSCTL_ENDPOINTS; --endpoint takes a list too)"},
    [GF_CACERT] = {"cacert", 0, "--cacert", "FILE",
                   "CA bundle that signed the server certificate (KMSCTL_CACERT; default: "
                   "system roots)"},
    [GF_CERT] = {"cert", 0, "--cert", "FILE", "operator client certificate (KMSCTL_CERT)"},
    [GF_KEY] = {"key", 0, "--key", "FILE", "operator client key (KMSCTL_KEY)"},
    [GF_OUTPUT] = {"output", 'o', "-o", "FORMAT",
                   "table or json (KMSCTL_OUTPUT, default table)"},
    [GF_TIMEOUT] = {"timeout", 0, "--timeout", "DURATION",
                    "deadline of each call (KMSCTL_TIMEOUT, default 10s)"},
    [GF_HELP] = {"help", 'h', "-h", NULL, "show help"},
};
#define N_GFLAGS (sizeof(gflags) / sizeof(gflags[0]))

static void set_global(struct cli_global *g, enum gflag f, const char *v)
{
    const char *src = gflags[f].src;
    switch (f) {
    case GF_ENDPOINT:
    case GF_ENDPOINTS:
        g->endpoint = v;
        g->endpoint_src = src;
        break;
    case GF_CACERT:
        g->cacert = v;
        g->cacert_src = src;
        break;
    case GF_CERT:
        g->cert = v;
        g->cert_src = src;
        break;
    case GF_KEY:
        g->key = v;
        g->key_src = src;
        break;
    case GF_OUTPUT:
        g->output = v;
        g->output_src = src;
        break;
    case GF_TIMEOUT:
        g->timeout = v;
        g->timeout_src = src;
        break;
    case GF_HELP:
        g->help = true;
        break;
    }
}

int cli_parse_ulong(const char *s, unsigned long min, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;
    if (s == NULL || s[0] == '\0' || strlen(s) > 20) {
        return -1;
    }
    for (const char *p = s; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
        unsigned d = (unsigned)(*p - '0');
        if (v > (~0UL - d) / 10) {
            return -1;
        }
        v = v * 10 + d;
    }
    if (v < min || v > max) {
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_duration_ms(const char *s, unsigned *out_ms)
{
    /* kms_parse.h's duration grammar; a bare number is seconds. */
    uint64_t ms;
    if (s == NULL || kms_parse_duration_ms(s, 1, 3600000, 1000, &ms, NULL, 0) != 0) {
        return -1;
    }
    *out_ms = (unsigned)ms;
    return 0;
}

bool cli_is_key_id(const char *s)
{
    size_t n = 0;
    if (s == NULL) {
        return false;
    }
    for (; s[n] != '\0'; n++) {
        char c = s[n];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return false;
        }
    }
    return n == 32;
}

static const struct cli_flag *find_cmd_flag(const struct cli_flag *flags, const char *name,
                                            size_t namelen, char short_name)
{
    for (const struct cli_flag *f = flags; f != NULL && f->name != NULL; f++) {
        if (short_name != 0 ? f->short_name == short_name
                            : (strlen(f->name) == namelen && strncmp(f->name, name, namelen) == 0)) {
            return f;
        }
    }
    return NULL;
}

static int find_gflag(const char *name, size_t namelen, char short_name)
{
    for (size_t i = 0; i < N_GFLAGS; i++) {
        if (short_name != 0 ? gflags[i].short_name == short_name
                            : (strlen(gflags[i].name) == namelen &&
                               strncmp(gflags[i].name, name, namelen) == 0)) {
            return (int)i;
        }
    }
    return -1;
}

/* stop: parse leading flags only, *npos receives the index of the first word. */
static int parse_impl(int argc, char **argv, const struct cli_flag *flags, struct cli_global *g,
                      char **pos, int maxpos, int *npos, bool stop, char *errbuf,
                      size_t errlen)
{
    bool dashdash = false;
    int np = 0;

    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *name, *inl = NULL;
        size_t namelen;
        char sn = 0;
        char shown[80];

        if (dashdash || a[0] != '-' || a[1] == '\0') {
            if (stop) {
                *npos = i;
                return 0;
            }
            if (np >= maxpos) {
                snprintf(errbuf, errlen, "unexpected argument '%.60s'", a);
                return CLI_EXIT_LOCAL;
            }
            pos[np++] = argv[i];
            continue;
        }
        if (strcmp(a, "--") == 0) {
            if (stop) {
                *npos = i + 1 < argc ? i + 1 : argc;
                return 0;
            }
            dashdash = true;
            continue;
        }
        if (a[1] == '-') {
            name = a + 2;
            const char *eq = strchr(name, '=');
            namelen = eq != NULL ? (size_t)(eq - name) : strlen(name);
            inl = eq != NULL ? eq + 1 : NULL;
            snprintf(shown, sizeof(shown), "--%.*s", (int)(namelen > 60 ? 60 : namelen), name);
        } else {
            sn = a[1];
            name = a + 1;
            namelen = 1;
            inl = a[2] != '\0' ? a + 2 : NULL;
            snprintf(shown, sizeof(shown), "-%c", sn);
        }
        const struct cli_flag *cf = stop ? NULL : find_cmd_flag(flags, name, namelen, sn);
        int gf = cf == NULL ? find_gflag(name, namelen, sn) : -1;
        if (cf == NULL && gf < 0) {
            snprintf(errbuf, errlen, "unknown flag %s", shown);
            return CLI_EXIT_LOCAL;
        }
        bool is_bool = cf != NULL ? cf->kind == CLI_FLAG_BOOL : gf == GF_HELP;
        const char *val = NULL;
        if (is_bool) {
            if (inl != NULL) {
                snprintf(errbuf, errlen, "flag %s takes no value", shown);
                return CLI_EXIT_LOCAL;
            }
        } else if (inl != NULL) {
            val = inl;
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            snprintf(errbuf, errlen, "flag %s needs a value", shown);
            return CLI_EXIT_LOCAL;
        }
        if (gf >= 0) {
            set_global(g, (enum gflag)gf, val);
            continue;
        }
        switch (cf->kind) {
        case CLI_FLAG_BOOL:
            *(bool *)cf->dest = true;
            break;
        case CLI_FLAG_STRING:
            *(const char **)cf->dest = val;
            break;
        case CLI_FLAG_UINT:
            if (cli_parse_ulong(val, cf->min, cf->max, (unsigned long *)cf->dest) != 0) {
                if (cf->max == ~0UL) {
                    snprintf(errbuf, errlen, "invalid value '%.40s' for %s (want a number)", val,
                             shown);
                } else {
                    snprintf(errbuf, errlen,
                             "invalid value '%.40s' for %s (want a number from %lu to %lu)", val,
                             shown, cf->min, cf->max);
                }
                return CLI_EXIT_LOCAL;
            }
            break;
        }
        if (cf->seen != NULL) {
            *cf->seen = true;
        }
    }
    *npos = stop ? argc : np;
    return 0;
}

int cli_parse(int argc, char **argv, const struct cli_flag *flags, struct cli_global *g,
              char **pos, int maxpos, int *npos, char *errbuf, size_t errlen)
{
    return parse_impl(argc, argv, flags, g, pos, maxpos, npos, false, errbuf, errlen);
}

int cli_parse_leading(int argc, char **argv, struct cli_global *g, int *cmd_index,
                      char *errbuf, size_t errlen)
{
    return parse_impl(argc, argv, NULL, g, NULL, 0, cmd_index, true, errbuf, errlen);
}

/* ---- dispatch and help ---------------------------------------------- */

void cli_ctx_init(struct cli_ctx *ctx, FILE *out, FILE *err)
{
    memset(ctx, 0, sizeof(*ctx));
    cli_global_init(&ctx->g);
    ctx->out = out;
    ctx->err = err;
    ctx->path = "";
}

void cli_ctx_close(struct cli_ctx *ctx)
{
    if (ctx->ch != NULL) {
        kms_rpc_channel_destroy(ctx->ch);
        ctx->ch = NULL;
    }
    if (ctx->rpc_inited) {
        kms_rpc_global_shutdown();
        ctx->rpc_inited = false;
    }
}

int cli_usage_error(struct cli_ctx *ctx, const char *fmt, ...)
{
    char msg[CLI_ERRBUF];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fputs("Error: ", ctx->err);
    cli_write_safe(ctx->err, msg);
    fprintf(ctx->err, " (see 'kmsctl%s%s -h')\n", ctx->path[0] ? " " : "", ctx->path);
    return CLI_EXIT_LOCAL;
}

static void print_flag_line(FILE *f, char short_name, const char *name, const char *metavar,
                            const char *help)
{
    char left[64];
    if (short_name != 0) {
        snprintf(left, sizeof(left), "-%c, --%s%s%s", short_name, name, metavar ? " " : "",
                 metavar ? metavar : "");
    } else {
        snprintf(left, sizeof(left), "    --%s%s%s", name, metavar ? " " : "",
                 metavar ? metavar : "");
    }
    fprintf(f, "  %-30s %s\n", left, help);
}

void cli_print_help(FILE *f, const struct cli_cmd *cmd, const char *path)
{
    fprintf(f, "%s\n", cmd->usage != NULL ? cmd->usage : cmd->summary);
    if (cmd->subs != NULL) {
        fprintf(f, "\nCommands:\n");
        for (const struct cli_cmd *s = cmd->subs; s->name != NULL; s++) {
            if (!s->hidden) {
                fprintf(f, "  %-18s %s\n", s->name, s->summary);
            }
        }
        fprintf(f, "\nRun 'kmsctl%s%s COMMAND -h' for a command's flags.\n", path[0] ? " " : "",
                path);
    }
    bool any = false;
    for (const struct cli_flag *fl = cmd->flags; fl != NULL && fl->name != NULL; fl++) {
        if (fl->hidden) {
            continue;
        }
        if (!any) {
            fprintf(f, "\nFlags:\n");
            any = true;
        }
        print_flag_line(f, fl->short_name, fl->name,
                        fl->kind == CLI_FLAG_BOOL ? NULL : (fl->metavar ? fl->metavar : "VALUE"),
                        fl->help);
    }
    fprintf(f, "\nGlobal flags (each has an environment twin; flags win):\n");
    for (size_t i = 0; i < N_GFLAGS; i++) {
        print_flag_line(f, gflags[i].short_name, gflags[i].name, gflags[i].metavar,
                        gflags[i].help);
    }
}

static const struct cli_cmd *find_sub(const struct cli_cmd *cmd, const char *name)
{
    for (const struct cli_cmd *s = cmd->subs; s != NULL && s->name != NULL; s++) {
        if (strcmp(s->name, name) == 0) {
            return s;
        }
    }
    return NULL;
}

static void path_append(char *path, size_t len, const char *word)
{
    size_t n = strlen(path);
    snprintf(path + n, len - n, "%s%s", n > 0 ? " " : "", word);
}

/* "kmsctl help [cmd...]" */
static int run_help(struct cli_ctx *ctx, const struct cli_cmd *root, int argc, char **argv)
{
    static char path[128];
    const struct cli_cmd *cmd = root;
    path[0] = '\0';
    for (int i = 0; i < argc; i++) {
        if (argv[i][0] == '-') {
            continue; /* "help -h" and the like */
        }
        const struct cli_cmd *s = find_sub(cmd, argv[i]);
        if (s == NULL) {
            ctx->path = path;
            return cli_usage_error(ctx, "unknown command '%.60s'", argv[i]);
        }
        cmd = s;
        path_append(path, sizeof(path), argv[i]);
    }
    cli_print_help(ctx->out, cmd, path);
    return CLI_EXIT_OK;
}

int cli_main(const struct cli_cmd *root, struct cli_ctx *ctx, int argc, char **argv,
             cli_getenv_fn getenv_fn)
{
    static char path[128];
    char errbuf[CLI_ERRBUF];
    const struct cli_cmd *cmd = root;
    int idx = 0;

    path[0] = '\0';
    ctx->path = path;
    ctx->root = root;
    cli_global_init(&ctx->g);
    cli_global_env(&ctx->g, getenv_fn);
    argc--; /* program name */
    argv++;
    while (cmd->subs != NULL) {
        if (cli_parse_leading(argc, argv, &ctx->g, &idx, errbuf, sizeof(errbuf)) != 0) {
            return cli_usage_error(ctx, "%s", errbuf);
        }
        if (idx >= argc) {
            break;
        }
        if (cmd == root && strcmp(argv[idx], "help") == 0) {
            return run_help(ctx, root, argc - idx - 1, argv + idx + 1);
        }
        const struct cli_cmd *s = find_sub(cmd, argv[idx]);
        if (s == NULL) {
            return cli_usage_error(ctx, "unknown command '%.60s'", argv[idx]);
        }
        cmd = s;
        path_append(path, sizeof(path), argv[idx]);
        argc -= idx + 1;
        argv += idx + 1;
        idx = 0;
    }
    if (cmd->run == NULL) {
        /* A group without a subcommand. */
        if (ctx->g.help) {
            cli_print_help(ctx->out, cmd, path);
            return CLI_EXIT_OK;
        }
        if (idx < argc) {
            return cli_usage_error(ctx, "unexpected argument '%.60s'", argv[idx]);
        }
        cli_print_help(ctx->err, cmd, path);
        return CLI_EXIT_LOCAL;
    }
    return cmd->run(ctx, cmd, argc, argv);
}

int cli_leaf_parse(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                   char **pos, int maxpos, int *npos)
{
    char errbuf[CLI_ERRBUF];
    char *dummy[1];
    if (pos == NULL) {
        pos = dummy;
        maxpos = 0;
    }
    if (cli_parse(argc, argv, cmd->flags, &ctx->g, pos, maxpos, npos, errbuf,
                  sizeof(errbuf)) != 0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    if (ctx->g.help) {
        cli_print_help(ctx->out, cmd, ctx->path);
        return CLI_EXIT_OK;
    }
    if (cli_global_finish(&ctx->g, errbuf, sizeof(errbuf)) != 0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    return -1;
}

/* ---- errors ---------------------------------------------------------- */

int cli_share_take_arg(char *arg, char *share, size_t cap)
{
    size_t n = strlen(arg);
    int len = -1;
    if (n < cap) {
        memcpy(share, arg, n);
        len = (int)n;
    }
    OPENSSL_cleanse(arg, n);
    return len;
}

const char *cli_grpc_code_name(int s)
{
    return kms_rpc_status_camel(s);
}

int cli_exit_for_grpc(int s)
{
    return s == GRPC_STATUS_OK ? CLI_EXIT_OK : CLI_EXIT_REMOTE;
}

/* Length of the valid UTF-8 sequence at s (1..4) with its code point, or 0. */
static int utf8_next(const unsigned char *s, uint32_t *cp)
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
        int n = utf8_next(p, &cp);
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

static char *safe_dup(const char *s)
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

void cli_format_rpc_error(char *buf, size_t len, const char *op, int s, const char *details)
{
    const char *desc = kms_rpc_status_desc(s);
    char *safe = safe_dup(details != NULL && details[0] != '\0' ? details
                          : desc != NULL                         ? desc
                                                                 : "unknown error");
    snprintf(buf, len, "Error: %s%s%s (code %s)", op != NULL ? op : "",
             op != NULL && op[0] ? ": " : "", safe != NULL ? safe : "?", cli_grpc_code_name(s));
    free(safe);
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
        t->cells[t->nrows * t->ncols + i] = safe_dup(cells[i] != NULL ? cells[i] : "");
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
        int n = utf8_next(p, &cp);
        if (n == 0) {
            fputs("\\ufffd", f);
            p++;
            continue;
        }
        switch (cp) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\b':
            fputs("\\b", f);
            break;
        case '\f':
            fputs("\\f", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (cp < 0x20 || cp == 0x7f || cp == 0x2028 || cp == 0x2029) {
                fprintf(f, "\\u%04x", (unsigned)cp);
            } else {
                fwrite(p, 1, (size_t)n, f);
            }
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

/* ---- RPC ------------------------------------------------------------- */

static int connect_once(struct cli_ctx *ctx, const char *op)
{
    struct kms_err err;
    kms_err_clear(&err);
    if (!ctx->rpc_inited) {
        /* gRPC's own log lines go through kms_log: keep the terminal clean
         * unless the operator asks for them (KMSD_LOG_LEVEL=debug). */
        const char *lv = getenv("KMSD_LOG_LEVEL");
        enum kms_log_level level;
        if (lv == NULL || kms_log_level_parse(lv, &level) != 0) {
            kms_log_set_level(KMS_LOG_ERROR);
        }
        if (kms_rpc_global_init(false, &err) != 0) {
            fprintf(ctx->err, "Error: %s: ", op);
            cli_write_safe(ctx->err, err.msg);
            fputc('\n', ctx->err);
            return CLI_EXIT_LOCAL;
        }
        ctx->rpc_inited = true;
    }
    if (ctx->ch == NULL && !ctx->g.insecure && !ctx->tls_checked) {
        /* gRPC 1.51 says little when a handshake fails: check locally what
         * can be checked first. (Without a client certificate the
         * handshake fails; the error then says none was configured.) */
        struct kms_check_report rep = {ctx->err, op, 0, 0, true};
        if (ctx->g.cert != NULL) {
            (void)kms_tls_check_pair(&rep, ctx->g.cert_src, ctx->g.cert, ctx->g.key,
                                     KMS_CERT_CLIENT, NULL);
        }
        if (ctx->g.cacert != NULL) {
            (void)kms_tls_check_ca(&rep, ctx->g.cacert_src, ctx->g.cacert, NULL, NULL);
        }
        if (rep.errors > 0) {
            return CLI_EXIT_LOCAL;
        }
        ctx->tls_checked = true;
    }
    if (ctx->ch == NULL) {
        struct kms_rpc_client_tls tls = {ctx->g.cacert, ctx->g.cert, ctx->g.key};
        /* One connection attempt may take the whole --timeout (a lossy or
         * slow link), not gRPC's reconnect backoff. */
        struct kms_rpc_channel_options copts = {ctx->g.timeout_ms, NULL};
        if (kms_rpc_channel_create_opts(ctx->g.target, ctx->g.insecure ? NULL : &tls, &copts,
                                        &ctx->ch, &err) != 0) {
            fprintf(ctx->err, "Error: %s: ", op);
            cli_write_safe(ctx->err, err.msg);
            fputc('\n', ctx->err);
            return CLI_EXIT_LOCAL;
        }
    }
    return 0;
}

bool cli_leader_redirect_parse(const char *details, uint64_t *id, char *addr, size_t addrlen)
{
    static const char pre[] = "not the leader; the leader is node ";
    static const char mid[] = ", cluster API at ";
    const char *p;
    char *end = NULL;
    unsigned long long v;
    size_t n;

    if (details == NULL || (p = strstr(details, pre)) == NULL) {
        return false;
    }
    p += sizeof(pre) - 1;
    if (*p < '1' || *p > '9') {
        return false;
    }
    errno = 0;
    v = strtoull(p, &end, 10);
    if (errno != 0 || end == NULL || strncmp(end, mid, sizeof(mid) - 1) != 0) {
        return false;
    }
    p = end + sizeof(mid) - 1;
    n = strcspn(p, " \t\r\n;,");
    if (n == 0 || n >= addrlen) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c >= 0x7f) {
            return false;
        }
    }
    memcpy(addr, p, n);
    addr[n] = '\0';
    *id = (uint64_t)v;
    return true;
}

enum cli_fail_kind cli_fail_classify(int s, const char *details)
{
    const char *d = details != NULL ? details : "";
    if (s == GRPC_STATUS_DEADLINE_EXCEEDED) {
        /* gRPC core's own deadline text; kmsd's deadlines carry their own
         * words ("timed out waiting for ..."). */
        return strcmp(d, "") == 0 || strcmp(d, "Deadline Exceeded") == 0 ? CLI_FAIL_TIMEOUT
                                                                           : CLI_FAIL_APP;
    }
    if (s != GRPC_STATUS_UNAVAILABLE) {
        return CLI_FAIL_APP;
    }
    if (strstr(d, "Connection refused") != NULL) {
        return CLI_FAIL_REFUSED;
    }
    if (strstr(d, "Timeout occurred") != NULL || strstr(d, "timed out") != NULL ||
        strstr(d, "Connection timed out") != NULL) {
        return strstr(d, "failed to connect") != NULL || strstr(d, "Timeout occurred") != NULL
                   ? CLI_FAIL_TIMEOUT
                   : CLI_FAIL_APP;
    }
    if (strstr(d, "Socket closed") != NULL || strstr(d, "andshake") != NULL ||
        strstr(d, "SSL") != NULL || strstr(d, "Ssl") != NULL || strstr(d, "TLS") != NULL ||
        strstr(d, "Connection reset") != NULL || strstr(d, "Broken pipe") != NULL) {
        return CLI_FAIL_TLS;
    }
    if (strstr(d, "failed to connect") != NULL || strstr(d, "DNS resolution failed") != NULL ||
        strstr(d, "empty address list") != NULL || strstr(d, "No route to host") != NULL ||
        strstr(d, "Network is unreachable") != NULL || strstr(d, "Connect Failed") != NULL ||
        strstr(d, "Failed to connect") != NULL || d[0] == '\0') {
        return CLI_FAIL_TRANSPORT;
    }
    return CLI_FAIL_APP;
}

/* An operator-readable line for a failure gRPC core reported (kind !=
 * CLI_FAIL_APP), or for the server refusing the client certificate. */
static void explain_failure(struct cli_ctx *ctx, char *buf, size_t len, const char *op,
                            enum cli_fail_kind kind, int s, const char *details)
{
    const char *t = ctx->g.target != NULL ? ctx->g.target : "";
    char *safe = safe_dup(details != NULL ? details : "");
    switch (kind) {
    case CLI_FAIL_REFUSED:
        snprintf(buf, len,
                 "Error: %s: %s: connection refused: nothing listens there (is kmsd running, "
                 "and is this its cluster API port?)",
                 op, t);
        break;
    case CLI_FAIL_TIMEOUT:
        snprintf(buf, len,
                 "Error: %s: %s: no answer within %u ms (--timeout): host down, a firewall "
                 "dropping packets, or a wrong address",
                 op, t, ctx->g.timeout_ms);
        break;
    case CLI_FAIL_TLS:
        if (ctx->g.cert == NULL && !ctx->g.insecure) {
            snprintf(buf, len,
                     "Error: %s: %s: the TLS handshake failed (%s): no client certificate "
                     "configured: the cluster API needs an operator certificate: give --cert "
                     "and --key (KMSCTL_CERT, KMSCTL_KEY)",
                     op, t, safe != NULL ? safe : "?");
            break;
        }
        if (safe != NULL && (strstr(safe, "0A000086") != NULL ||
                             strstr(safe, "certificate verify failed") != NULL ||
                             strstr(safe, "CERTIFICATE_VERIFY_FAILED") != NULL)) {
            snprintf(buf, len,
                     "Error: %s: %s: the server certificate is not signed by the CA %s (TLS "
                     "certificate verify failed): give --cacert the CA of the cluster API",
                     op, t, ctx->g.cacert != NULL ? ctx->g.cacert : "(system roots)");
            break;
        }
        snprintf(buf, len,
                 "Error: %s: %s: the TLS handshake failed (%s): likely the server certificate "
                 "is not signed by the CA %s, or the server refused the client certificate %s "
                 "(not signed by its operator CA)",
                 op, t, safe != NULL ? safe : "?",
                 ctx->g.cacert != NULL ? ctx->g.cacert : "(system roots: give --cacert)",
                 ctx->g.cert != NULL ? ctx->g.cert : "(none)");
        break;
    case CLI_FAIL_TRANSPORT:
        snprintf(buf, len, "Error: %s: %s: cannot connect: %s (code %s)", op, t,
                 safe != NULL && safe[0] ? safe : "unavailable", cli_grpc_code_name(s));
        break;
    case CLI_FAIL_APP:
        if (s == GRPC_STATUS_PERMISSION_DENIED || s == GRPC_STATUS_UNAUTHENTICATED) {
            snprintf(buf, len,
                     "Error: %s: %s refused the client certificate %s: not an operator "
                     "certificate this cluster accepts (%s) (code %s)",
                     op, t, ctx->g.cert != NULL ? ctx->g.cert : "(none)",
                     safe != NULL && safe[0] ? safe : "permission denied",
                     cli_grpc_code_name(s));
        } else {
            cli_format_rpc_error(buf, len, op, s, details);
        }
        break;
    }
    free(safe);
}

static void rpc_fail(struct cli_ctx *ctx, const char *msg)
{
    size_t l = strlen(msg);
    if (l >= sizeof(ctx->last_error)) {
        l = sizeof(ctx->last_error) - 1;
    }
    memcpy(ctx->last_error, msg, l);
    ctx->last_error[l] = '\0';
    if (!ctx->quiet) {
        fprintf(ctx->err, "%s\n", msg);
    }
}

/* Writes run on the leader: a follower answers "not the leader; the leader
 * is node N, cluster API at ADDR" having changed nothing, and the call is
 * sent again there, at most CLI_MAX_REDIRECTS times. */
#define CLI_MAX_REDIRECTS 2

int cli_rpc(struct cli_ctx *ctx, const char *op, const char *method,
            const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
            ProtobufCMessage **resp, bool secret)
{
    char path[96];
    uint8_t *buf = NULL, *rbuf = NULL;
    size_t n, rlen = 0;
    int status = GRPC_STATUS_UNKNOWN, rc, ex = CLI_EXIT_OK;
    char *details = NULL;
    struct kms_err err;
    unsigned hops = 0;

    *resp = NULL;
    kms_err_clear(&err);
    ctx->last_unreachable = false;
    ctx->last_error[0] = '\0';
    snprintf(path, sizeof(path), "/kmsd.v1.Operator/%s", method);
    n = protobuf_c_message_get_packed_size(req);
    buf = malloc(n > 0 ? n : 1);
    if (buf == NULL) {
        fprintf(ctx->err, "Error: %s: out of memory\n", op);
        return CLI_EXIT_LOCAL;
    }
    protobuf_c_message_pack(req, buf);
again:
    if (ctx->fake_rpc == NULL && (rc = connect_once(ctx, op)) != 0) {
        ex = rc;
        goto out;
    }
    if (ctx->fake_rpc != NULL) {
        rc = ctx->fake_rpc(ctx->fake_arg, path, buf, n, &rbuf, &rlen, &status, &details);
        if (rc != 0) {
            kms_err_set(&err, rc, "%s", "fake transport failed");
        }
    } else {
        rc = kms_rpc_unary(ctx->ch, path, buf, n, ctx->g.timeout_ms, &rbuf, &rlen, &status,
                           &details, &err);
    }
    if (rc != 0) {
        fprintf(ctx->err, "Error: %s: ", op);
        cli_write_safe(ctx->err, err.msg[0] ? err.msg : kms_strerror(rc));
        fputc('\n', ctx->err);
        ex = CLI_EXIT_LOCAL;
        goto out;
    }
    if (status != GRPC_STATUS_OK) {
        enum cli_fail_kind kind = cli_fail_classify(status, details);
        char msg[1024];
        if (kind != CLI_FAIL_APP && ctx->g.cur_target + 1 < ctx->g.n_targets &&
            ctx->g.target == ctx->g.targets[ctx->g.cur_target]) {
            /* The call never reached this replica: try the next one. */
            explain_failure(ctx, msg, sizeof(msg), op, kind, status, details);
            if (!ctx->quiet) {
                fprintf(ctx->err, "%s\nNote: trying the next endpoint, %s\n", msg,
                        ctx->g.targets[ctx->g.cur_target + 1]);
            }
            ctx->g.cur_target++;
            ctx->g.target = ctx->g.targets[ctx->g.cur_target];
            goto retry;
        }
        char where[160];
        uint64_t lid = 0;
        char laddr[sizeof(ctx->redirect_target)];

        if (hops < CLI_MAX_REDIRECTS &&
            cli_leader_redirect_parse(details, &lid, laddr, sizeof(laddr)) &&
            (ctx->g.target == NULL || strcmp(laddr, ctx->g.target) != 0)) {
            hops++;
            fprintf(ctx->err, "Note: %s is not the leader; sending %s to leader %llu at ",
                    ctx->g.target != NULL ? ctx->g.target : "", op, (unsigned long long)lid);
            cli_write_safe(ctx->err, laddr);
            fputc('\n', ctx->err);
            memcpy(ctx->redirect_target, laddr, sizeof(laddr));
            ctx->g.target = ctx->redirect_target;
            goto retry;
        }
        /* Transport failures: say which endpoint could not be reached. */
        if (status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED) {
            snprintf(where, sizeof(where), "%s: %s", op, ctx->g.target ? ctx->g.target : "");
        } else {
            snprintf(where, sizeof(where), "%s", op);
        }
        ctx->last_unreachable = kind != CLI_FAIL_APP;
        if (kind != CLI_FAIL_APP || status == GRPC_STATUS_PERMISSION_DENIED ||
            status == GRPC_STATUS_UNAUTHENTICATED) {
            explain_failure(ctx, msg, sizeof(msg), op, kind, status, details);
        } else {
            cli_format_rpc_error(msg, sizeof(msg), where, status, details);
        }
        rpc_fail(ctx, msg);
        ex = cli_exit_for_grpc(status);
        goto out;
    }
    *resp = protobuf_c_message_unpack(resp_desc, NULL, rlen, rbuf);
    if (*resp == NULL) {
        fprintf(ctx->err, "Error: %s: malformed response from the server\n", op);
        ex = CLI_EXIT_REMOTE;
    }
    goto out;
retry:
    /* The call goes to another endpoint (fail-over or leader redirect). */
    if (ctx->ch != NULL) {
        kms_rpc_channel_destroy(ctx->ch);
        ctx->ch = NULL;
    }
    if (rbuf != NULL && secret) {
        OPENSSL_cleanse(rbuf, rlen);
    }
    free(details);
    details = NULL;
    free(rbuf);
    rbuf = NULL;
    goto again;
out:
    if (secret) {
        OPENSSL_cleanse(buf, n);
    }
    free(buf);
    if (rbuf != NULL && secret) {
        OPENSSL_cleanse(rbuf, rlen);
    }
    free(rbuf);
    free(details);
    return ex;
}

void cli_json_print_u64(FILE *f, const char *key, uint64_t v)
{
    struct cli_json j;
    cli_json_init(&j, f);
    cli_json_obj_begin(&j, NULL);
    cli_json_u64(&j, key, v);
    cli_json_obj_end(&j);
    cli_json_end(&j);
}
