/*
 * The option table: config_options.h's rows as data (struct opt), in file
 * order. Everything that walks options (defaults, file, environment,
 * flags, validation, dump, --help, docs table) walks this array.
 */
#include <stddef.h>
#include <string.h>

#include "config_internal.h"

/* The row columns config_options.h uses. */
#define IMM KMS_OPT_IMMUTABLE
#define REL KMS_OPT_RELOADABLE
#define REQ KMS_OPT_REQUIRED
#define SENS KMS_OPT_SENSITIVE
#define EMPTY_OK O_EMPTY_OK
#define NAMES(...) ((const char *const[]){__VA_ARGS__, NULL})

/* Offset of a scalar's string in the file document; lists are read
 * element by element (config_file.c), so they have none. */
#define FOFF_U64(p) FOFF(p)
#define FOFF_UINT(p) FOFF(p)
#define FOFF_BOOL(p) FOFF(p)
#define FOFF_DURATION(p) FOFF(p)
#define FOFF_SIZE(p) FOFF(p)
#define FOFF_STRING(p) FOFF(p)
#define FOFF_PATH(p) FOFF(p)
#define FOFF_ADDR(p) FOFF(p)
#define FOFF_ENUM(p) FOFF(p)
#define FOFF_PEERS(p) NOF
#define FOFF_CIDRS(p) NOF
#define FOFF_UUIDS(p) NOF
#define FOFF(p) offsetof(struct kms_config_file_doc, p)

#define ROW(name, field, fpath, T, def, min, max, flags, enums, env, flag, meta, help, doc) \
    {name, env, flag, T_##T, def, flags, offsetof(struct kms_config, field), FOFF_##T(fpath), \
     min, max, enums, meta, help, doc},
#define ROW_ROOT(sec, key, f, a, T, ...) ROW(#key, f, key, T, __VA_ARGS__)
#define ROW_FLAT(sec, key, f, a, T, ...) ROW(#sec "." #key, f, sec.key, T, __VA_ARGS__)
#define ROW_NESTED(sec, key, f, a, T, ...) ROW(#sec "." #key, sec.f, sec.key, T, __VA_ARGS__)
#define GROUP(kind, sec, LIST) LIST(ROW_##kind)

const struct opt kms_config_opts[] = {KMS_CONFIG_GROUPS(GROUP)};
const size_t kms_config_n_opts = sizeof(kms_config_opts) / sizeof(kms_config_opts[0]);

const struct opt *opt_by_name(const char *name)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        if (strcmp(kms_config_opts[i].name, name) == 0) {
            return &kms_config_opts[i];
        }
    }
    return NULL;
}

const struct opt *opt_by_flag(const char *name, size_t n)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *flag = kms_config_opts[i].flag;
        if (strlen(flag) == n && strncmp(flag, name, n) == 0) {
            return &kms_config_opts[i];
        }
    }
    return NULL;
}

void *opt_field(struct kms_config *cfg, const struct opt *o)
{
    return (char *)cfg + o->cfg_off;
}

const void *opt_cfield(const struct kms_config *cfg, const struct opt *o)
{
    return (const char *)cfg + o->cfg_off;
}
