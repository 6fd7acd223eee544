/*
 * kmsd configuration: KMSD_* environment variables and command-line flags.
 */
#include <stdlib.h>
#include <string.h>

#include "config_internal.h"

int config_load_env(struct loader *l, char **envp)
{
    int rc = 0;
    if (envp == NULL) {
        goto out;
    }
    for (size_t i = 0; i < N_OPTS && rc == 0; i++) {
        size_t n = strlen(kms_config_opts[i].env);
        for (char **e = envp; *e != NULL; e++) {
            if (strncmp(*e, kms_config_opts[i].env, n) == 0 && (*e)[n] == '=') {
                struct origin org = {SRC_ENV, 0};
                /* The first match wins, as with glibc getenv. */
                rc = config_apply(l, &kms_config_opts[i], org, *e + n + 1);
                break;
            }
        }
    }
out:
    return rc;
}

/* KMSD_* variables kmsd reads outside the option table. */
static const char *const env_extra[] = {"KMSD_CONFIG", "KMSD_TEST_READ_PAUSE_MS", NULL};

size_t kms_config_unknown_env(char **envp, void (*cb)(void *arg, const char *name, size_t len),
                              void *arg)
{
    size_t n_unknown = 0;
    if (envp == NULL) {
        return 0;
    }
    for (char **e = envp; *e != NULL; e++) {
        const char *eq = strchr(*e, '=');
        size_t len = eq != NULL ? (size_t)(eq - *e) : strlen(*e);
        bool known = false;
        if (strncmp(*e, "KMSD_", 5) != 0) {
            continue;
        }
        for (size_t i = 0; i < N_OPTS && !known; i++) {
            const char *env = kms_config_opts[i].env;
            known = strlen(env) == len && strncmp(*e, env, len) == 0;
        }
        for (size_t i = 0; env_extra[i] != NULL && !known; i++) {
            known = strlen(env_extra[i]) == len && strncmp(*e, env_extra[i], len) == 0;
        }
        if (!known) {
            n_unknown++;
            if (cb != NULL) {
                cb(arg, *e, len);
            }
        }
    }
    return n_unknown;
}

/* First pass: the flags that decide what to load (--config, --help,
 * --version, --check-config, --dump-config, --print-config-table); the
 * option flags are applied after the environment. */
int config_scan_meta_flags(struct loader *l, int argc, char **argv, const char **file)
{
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            l->cfg->help = true;
        } else if (strcmp(a, "--version") == 0) {
            l->cfg->version = true;
        } else if (strcmp(a, "--check-config") == 0) {
            l->cfg->check_only = true;
        } else if (strcmp(a, "--print-config-table") == 0) {
            l->cfg->print_table = true;
        } else if (strcmp(a, "--dump-config") == 0) {
            l->cfg->dump_only = true;
        } else if (strcmp(a, "--config") == 0) {
            if (i + 1 >= argc) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "--config: missing value");
                goto out;
            }
            *file = argv[++i];
        } else if (strncmp(a, "--config=", 9) == 0) {
            *file = a + 9;
        } else if (strncmp(a, "--", 2) == 0) {
            /* An option flag: skip its separate value, if it takes one. */
            const char *eq = strchr(a, '=');
            const struct opt *o = opt_by_flag(a + 2, eq ? (size_t)(eq - a - 2) : strlen(a + 2));
            if (o != NULL && eq == NULL && o->type != T_BOOL) {
                i++;
            }
        }
    }
out:
    return rc;
}

int config_load_flags(struct loader *l, int argc, char **argv)
{
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *eq;
        const char *val;
        const struct opt *o;
        struct origin org = {SRC_FLAG, 0};
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || strcmp(a, "--version") == 0 ||
            strcmp(a, "--check-config") == 0 || strcmp(a, "--dump-config") == 0 ||
            strcmp(a, "--print-config-table") == 0 ||
            strncmp(a, "--config=", 9) == 0) {
            continue;
        }
        if (strcmp(a, "--config") == 0) {
            i++;
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            rc = kms_err_set(l->err, KMS_ECONFIG, "unexpected argument \"%s\" (see --help)", a);
            goto out;
        }
        eq = strchr(a, '=');
        o = opt_by_flag(a + 2, eq ? (size_t)(eq - a - 2) : strlen(a + 2));
        if (o == NULL) {
            rc = kms_err_set(l->err, KMS_ECONFIG, "%.*s: unknown flag (see --help)",
                             eq ? (int)(eq - a) : (int)strlen(a), a);
            goto out;
        }
        if (eq != NULL) {
            val = eq + 1;
        } else if (o->type == T_BOOL) {
            val = "true"; /* "--talos-plaintext" alone switches it on */
        } else if (i + 1 < argc) {
            val = argv[++i];
        } else {
            rc = kms_err_set(l->err, KMS_ECONFIG, "--%s: missing value", o->flag);
            goto out;
        }
        if ((rc = config_apply(l, o, org, val)) != 0) {
            goto out;
        }
    }
out:
    return rc;
}
