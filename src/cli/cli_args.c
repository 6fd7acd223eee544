/*
 * kmsctl arguments: the global flags and their environment twins
 * (KMSCTL_*), the endpoint list, the flag parser every command uses, strict
 * number and duration parsing, and the flag lines of the help text.
 * Pure: no globals, no I/O beyond the FILE * given. See cli_common.h.
 */
#include "cli_common.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "kms_parse.h"

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

#define GF_FIELDS(f) offsetof(struct cli_global, f), offsetof(struct cli_global, f##_src)

/* val / src: where in struct cli_global the value and its source go (both
 * const char *); help has neither. */
static const struct {
    const char *name;
    char short_name;
    const char *src; /* for messages */
    const char *metavar, *help;
    size_t val, val_src;
} gflags[] = {
    [GF_ENDPOINT] = {"endpoint", 0, "--endpoint", "HOST:PORT",
                     "cluster API of a kmsd replica (KMSCTL_ENDPOINT, default "
                     CLI_DEFAULT_ENDPOINT "; grpc://HOST:PORT = plaintext)", GF_FIELDS(endpoint)},
    [GF_ENDPOINTS] = {"endpoints", 0, "--endpoints", "A,B,C",
                      "replicas to try in order: the next one when a connection fails "
                      "(KMSCTL_ENDPOINTS; --endpoint takes a list too)", GF_FIELDS(endpoint)},
    [GF_CACERT] = {"cacert", 0, "--cacert", "FILE",
                   "CA bundle that signed the server certificate (KMSCTL_CACERT; default: "
                   "system roots)", GF_FIELDS(cacert)},
    [GF_CERT] = {"cert", 0, "--cert", "FILE", "operator client certificate (KMSCTL_CERT)",
                 GF_FIELDS(cert)},
    [GF_KEY] = {"key", 0, "--key", "FILE", "operator client key (KMSCTL_KEY)", GF_FIELDS(key)},
    [GF_OUTPUT] = {"output", 'o', "-o", "FORMAT",
                   "table or json (KMSCTL_OUTPUT, default table)", GF_FIELDS(output)},
    [GF_TIMEOUT] = {"timeout", 0, "--timeout", "DURATION",
                    "deadline of each call (KMSCTL_TIMEOUT, default 10s)", GF_FIELDS(timeout)},
    [GF_HELP] = {"help", 'h', "-h", NULL, "show help", 0, 0},
};
#define N_GFLAGS (sizeof(gflags) / sizeof(gflags[0]))

static void set_global(struct cli_global *g, enum gflag f, const char *v)
{
    if (f == GF_HELP) {
        g->help = true;
        return;
    }
    *(const char **)(void *)((char *)g + gflags[f].val) = v;
    *(const char **)(void *)((char *)g + gflags[f].val_src) = gflags[f].src;
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

void cli_flags_print(FILE *f, const struct cli_flag *flags)
{
    bool any = false;
    for (const struct cli_flag *fl = flags; fl != NULL && fl->name != NULL; fl++) {
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
