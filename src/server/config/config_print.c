/*
 * kmsd configuration: the effective-configuration dump (--dump-config),
 * --help and the options table of docs/configuration.md
 * (--print-config-table), all from the option table.
 */
#include <stdio.h>
#include <string.h>

#include "config_internal.h"

static void put_quoted(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            fprintf(f, "\\%c", *p);
        } else if (*p < 0x20 || *p == 0x7f) {
            fprintf(f, "\\x%02x", *p);
        } else {
            fputc(*p, f);
        }
    }
    fputc('"', f);
}

static void put_duration(FILE *f, unsigned ms)
{
    if (ms != 0 && ms % 3600000u == 0) {
        fprintf(f, "%uh", ms / 3600000u);
    } else if (ms != 0 && ms % 60000u == 0) {
        fprintf(f, "%um", ms / 60000u);
    } else if (ms != 0 && ms % 1000u == 0) {
        fprintf(f, "%us", ms / 1000u);
    } else {
        fprintf(f, "%ums", ms);
    }
}

static bool redacted(const struct kms_config *cfg, const struct opt *o,
                     const char *const *extra)
{
    /* An unset (empty) sensitive string hides nothing and stays "". */
    if ((o->flags & KMS_OPT_SENSITIVE) &&
        !(o->type == T_STRING && (*(char *const *)opt_cfield(cfg, o))[0] ==
                                     '\0')) {
        return true;
    }
    for (size_t i = 0; extra != NULL && extra[i] != NULL; i++) {
        if (strcmp(extra[i], o->name) == 0) {
            return true;
        }
    }
    return false;
}

static void put_value(FILE *f, const struct kms_config *cfg, const struct opt *o,
                      const char *indent)
{
    const void *field = opt_cfield(cfg, o);
    switch (o->type) {
    case T_U64:
    case T_SIZE:
        fprintf(f, "%llu", (unsigned long long)*(const uint64_t *)field);
        break;
    case T_UINT:
        fprintf(f, "%u", *(const unsigned *)field);
        break;
    case T_BOOL:
        fputs(*(const bool *)field ? "true" : "false", f);
        break;
    case T_DURATION:
        put_duration(f, *(const unsigned *)field);
        break;
    case T_STRING:
    case T_PATH:
    case T_ADDR: {
        const char *s = *(char *const *)field;
        put_quoted(f, s ? s : "");
        break;
    }
    case T_ENUM: {
        int idx = *(const int *)field;
        fputs(o->enums[idx < 0 ? 0 : idx], f);
        break;
    }
    case T_PEERS:
        if (cfg->n_initial_cluster == 0) {
            fputs("[]", f);
        }
        for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
            fprintf(f, "\n%s  - { id: %llu, raft: ", indent,
                    (unsigned long long)cfg->initial_cluster[i].id);
            put_quoted(f, cfg->initial_cluster[i].raft);
            fputs(", cluster: ", f);
            put_quoted(f, cfg->initial_cluster[i].cluster);
            fputs(" }", f);
        }
        break;
    case T_CIDRS:
        if (cfg->n_allowed_cidrs == 0) {
            fputs("[]", f);
        }
        for (size_t i = 0; i < cfg->n_allowed_cidrs; i++) {
            fprintf(f, "\n%s  - ", indent);
            put_quoted(f, cfg->allowed_cidrs[i].text);
        }
        break;
    case T_UUIDS:
        if (cfg->n_uuid_allow_list == 0) {
            fputs("[]", f);
        }
        for (size_t i = 0; i < cfg->n_uuid_allow_list; i++) {
            fprintf(f, "\n%s  - ", indent);
            put_quoted(f, cfg->uuid_allow_list[i]);
        }
        break;
    }
}

static size_t list_len(const struct kms_config *cfg, const struct opt *o)
{
    switch (o->type) {
    case T_PEERS:
        return cfg->n_initial_cluster;
    case T_CIDRS:
        return cfg->n_allowed_cidrs;
    case T_UUIDS:
        return cfg->n_uuid_allow_list;
    default:
        return 0;
    }
}

int kms_config_dump_redacting(const struct kms_config *cfg, FILE *f, const char *const *extra)
{
    char section[32] = "";
    int rc = 0;
    fputs("# kmsd effective configuration\n", f);
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &kms_config_opts[i];
        const char *dot = strchr(o->name, '.');
        const char *key = o->name;
        const char *indent = "";
        if (dot != NULL) {
            size_t n = (size_t)(dot - o->name);
            if (strlen(section) != n || strncmp(section, o->name, n) != 0) {
                snprintf(section, sizeof(section), "%.*s", (int)n, o->name);
                fprintf(f, "%s:\n", section);
            }
            key = dot + 1;
            indent = "  ";
        } else {
            section[0] = '\0';
        }
        /* A non-empty list starts on the next line: no trailing blank. */
        fprintf(f, "%s%s:%s", indent, key,
                list_len(cfg, o) > 0 && !redacted(cfg, o, extra) ? "" : " ");
        if (redacted(cfg, o, extra)) {
            fputs("\"<redacted>\"", f);
        } else {
            put_value(f, cfg, o, indent);
        }
        fputc('\n', f);
    }
    if (fflush(f) != 0 || ferror(f)) {
        rc = KMS_EIO;
    }
    return rc;
}

int kms_config_dump(const struct kms_config *cfg, FILE *f)
{
    return kms_config_dump_redacting(cfg, f, NULL);
}

void kms_config_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: %s [--config FILE] [--check-config | --dump-config] [--OPTION VALUE ...]\n"
            "       %s recover --config FILE [--members ID,ID] [--yes-i-understand]\n"
            "       %s restore --snapshot FILE --config FILE [--force]\n"
            "\n"
            "Precedence: defaults < config file < KMSD_* environment < flags.\n"
            "Flags take \"--flag VALUE\" or \"--flag=VALUE\"; a boolean flag alone means true.\n"
            "\n"
            "  --config FILE             YAML configuration file (env KMSD_CONFIG)\n"
            "  --check-config            validate the configuration and exit\n"
            "  --dump-config             validate, print the effective configuration as YAML\n"
            "                            (sensitive values redacted) and exit\n"
            "  --version                 print the version and exit\n"
            "  --print-config-table      print the options table of docs/configuration.md\n"
            "                            and exit\n"
            "  --help                    print this help and exit\n"
            "\n",
            prog, prog, prog);
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &kms_config_opts[i];
        fprintf(f, "  --%s %s\n      %s\n      yaml %s, env %s", o->flag, o->meta, o->help,
                o->name, o->env);
        if (o->flags & KMS_OPT_REQUIRED) {
            fputs(", required", f);
        } else if (o->def != NULL) {
            fprintf(f, ", default \"%s\"", o->def);
        }
        if (o->flags & KMS_OPT_RELOADABLE) {
            fputs(", reloaded on SIGHUP", f);
        }
        if (o->flags & KMS_OPT_SENSITIVE) {
            fputs(", sensitive", f);
        }
        fputc('\n', f);
    }
}

/* ------------------------------------------------------------------ */
/* The docs table.                                                     */

/* A bound as the docs write it: 2^63, 2^32-1, else decimal. */
static void put_bound(FILE *f, uint64_t v)
{
    if (v == UINT64_C(1) << 63) {
        fputs("2^63", f);
    } else if (v == UINT32_MAX) {
        fputs("2^32-1", f);
    } else {
        fprintf(f, "%llu", (unsigned long long)v);
    }
}

/* A size in the largest unit that divides it. */
static void put_size(FILE *f, uint64_t v)
{
    static const char *const units[] = {"GiB", "MiB", "KiB"};
    for (unsigned i = 0; i < 3 && v != 0; i++) {
        uint64_t mul = UINT64_C(1) << (10 * (3 - i));
        if (v % mul == 0) {
            fprintf(f, "%llu%s", (unsigned long long)(v / mul), units[i]);
            return;
        }
    }
    fprintf(f, "%llu", (unsigned long long)v);
}

/* A duration bound: "0" rather than "0ms". */
static void put_duration_bound(FILE *f, uint64_t ms)
{
    if (ms == 0) {
        fputs("0", f);
    } else {
        put_duration(f, (unsigned)ms);
    }
}

/* "<what> MIN..MAX", each bound written by put. */
static void put_range(FILE *f, const char *what, const struct opt *o,
                      void (*put)(FILE *, uint64_t))
{
    fprintf(f, "%s ", what);
    put(f, o->min);
    fputs("..", f);
    put(f, o->max);
}

static void put_doc_type(FILE *f, const struct opt *o)
{
    switch (o->type) {
    case T_U64:
    case T_UINT:
        put_range(f, "integer", o, put_bound);
        break;
    case T_DURATION:
        put_range(f, "duration", o, put_duration_bound);
        break;
    case T_SIZE:
        put_range(f, "size", o, put_size);
        break;
    case T_BOOL:
        fputs("bool", f);
        break;
    case T_STRING:
        fputs("string", f);
        break;
    case T_PATH:
        fputs("path", f);
        break;
    case T_ADDR:
        fputs((o->flags & O_EMPTY_OK) ? "address or \"\"" : "address", f);
        break;
    case T_ENUM:
        for (size_t i = 0; o->enums[i] != NULL; i++) {
            fprintf(f, "%s`%s`", i ? " \\| " : "", o->enums[i]);
        }
        break;
    case T_PEERS:
        fprintf(f, "list, max %d", KMS_CONFIG_MAX_PEERS);
        break;
    case T_CIDRS:
        fprintf(f, "list of CIDR, max %d", KMS_CONFIG_MAX_CIDRS);
        break;
    case T_UUIDS:
        fprintf(f, "list of UUID, max %d", KMS_CONFIG_MAX_UUIDS);
        break;
    }
}

int kms_config_print_table(FILE *f)
{
    fputs("| YAML key | type | default | env | flag | | meaning |\n"
          "|---|---|---|---|---|---|---|\n", f);
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &kms_config_opts[i];
        fprintf(f, "| `%s` | ", o->name);
        put_doc_type(f, o);
        if (o->def == NULL) {
            fputs(" | required", f);
        } else if (o->type == T_PEERS || o->type == T_CIDRS || o->type == T_UUIDS) {
            fprintf(f, " | `[%s]`", o->def);
        } else if (o->def[0] == '\0') {
            fputs(" | `\"\"`", f);
        } else {
            fprintf(f, " | `%s`", o->def);
        }
        fprintf(f, " | `%s` | `--%s` | %s%s | %s |\n", o->env, o->flag,
                (o->flags & KMS_OPT_RELOADABLE) ? "R" : "I",
                (o->flags & KMS_OPT_SENSITIVE) ? " S" : "", o->doc);
    }
    return fflush(f) != 0 || ferror(f) ? KMS_EIO : 0;
}
