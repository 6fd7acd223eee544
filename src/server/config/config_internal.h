/*
 * kmsd configuration internals, shared by config_*.c only.
 *
 *   config_table.c  the option table generated from config_options.h
 *   config_file.c   the YAML file: schema, line index, libcyaml errors
 *   config_load.c   applying values, cross-option validation, the public
 *                   kms_config_load / kms_config_free
 *   config_args.c   KMSD_* environment and command-line flags
 *   config_print.c  --dump-config, --help and the docs table
 *
 * Single-threaded: one loader per kms_config_load call.
 */
#ifndef KMS_CONFIG_INTERNAL_H
#define KMS_CONFIG_INTERNAL_H

#include <stdarg.h>

#include "kms_config.h"

enum opt_type {
    T_U64,      /* decimal integer in [min, max] */
    T_UINT,     /* decimal integer in [min, max], stored as unsigned */
    T_BOOL,     /* true | false */
    T_DURATION, /* kms_parse_duration_ms in [min, max] ms, stored as unsigned ms */
    T_SIZE,     /* kms_parse_size in [min, max] bytes */
    T_STRING,   /* any string */
    T_PATH,     /* file path; must be readable when non-empty */
    T_ADDR,     /* host:port | :port | [v6]:port */
    T_ENUM,     /* one of opt->enums, stored as int index */
    T_PEERS,    /* initialCluster */
    T_CIDRS,    /* list of CIDRs */
    T_UUIDS,    /* list of node UUIDs */
};

/* Option-local flags beyond the public KMS_OPT_* ones. */
#define O_EMPTY_OK (1u << 8) /* T_ADDR: "" allowed (advertise: derive it) */

/*
 * The file document libcyaml loads (config_file.c): every scalar is a
 * string (numbers too: libcyaml 1.3.1 accepts "4050x" as 4050), parsed by
 * the same code as environment variables and flags. One struct per YAML
 * section, generated from the rows.
 */
struct kms_config_file_peer {
    char *id, *raft, *cluster;
};
#define FDOC_SCALAR(k) char *k;
#define FDOC_U64 FDOC_SCALAR
#define FDOC_UINT FDOC_SCALAR
#define FDOC_BOOL FDOC_SCALAR
#define FDOC_DURATION FDOC_SCALAR
#define FDOC_SIZE FDOC_SCALAR
#define FDOC_STRING FDOC_SCALAR
#define FDOC_PATH FDOC_SCALAR
#define FDOC_ADDR FDOC_SCALAR
#define FDOC_ENUM FDOC_SCALAR
#define FDOC_PEERS(k) struct kms_config_file_peer *k; unsigned k##_count;
#define FDOC_CIDRS(k) char **k; unsigned k##_count;
#define FDOC_UUIDS(k) char **k; unsigned k##_count;
#define FDOC_ROW(sec, key, f, a, T, ...) FDOC_##T(key)
#define FDOC_SECTION_ROOT(sec, LIST)
#define FDOC_SECTION_FLAT(sec, LIST) struct kms_config_file_##sec { LIST(FDOC_ROW) };
#define FDOC_SECTION_NESTED FDOC_SECTION_FLAT
#define FDOC_SECTION(kind, sec, LIST) FDOC_SECTION_##kind(sec, LIST)
#define FDOC_MEMBER_ROOT(sec, LIST) LIST(FDOC_ROW)
#define FDOC_MEMBER_FLAT(sec, LIST) struct kms_config_file_##sec sec;
#define FDOC_MEMBER_NESTED FDOC_MEMBER_FLAT
#define FDOC_MEMBER(kind, sec, LIST) FDOC_MEMBER_##kind(sec, LIST)

KMS_CONFIG_GROUPS(FDOC_SECTION)
struct kms_config_file_doc {
    KMS_CONFIG_GROUPS(FDOC_MEMBER)
};

/* One row of config_options.h, as data. */
struct opt {
    const char *name; /* YAML path */
    const char *env;  /* environment variable */
    const char *flag; /* long flag without "--" */
    enum opt_type type;
    const char *def; /* default, parsed like any other value; NULL = none */
    unsigned flags;
    size_t cfg_off;  /* field in struct kms_config */
    size_t file_off; /* char * in the file document (scalars only), else NOF */
    uint64_t min, max;
    const char *const *enums;
    const char *meta; /* value placeholder in --help */
    const char *help;
    const char *doc;  /* docs/configuration.md meaning column */
};
#define NOF ((size_t)-1)

/* The rows in file order (config_table.c). */
extern const struct opt kms_config_opts[];
extern const size_t kms_config_n_opts;
#define N_OPTS kms_config_n_opts

/* The row named `name` (YAML path) or with long flag name[0..n). NULL when
 * none. */
const struct opt *opt_by_name(const char *name);
const struct opt *opt_by_flag(const char *name, size_t n);
/* An option's field in cfg. */
void *opt_field(struct kms_config *cfg, const struct opt *o);
const void *opt_cfield(const struct kms_config *cfg, const struct opt *o);

/* Where a value came from, for error messages. */
enum src_kind { SRC_DEFAULT, SRC_FILE, SRC_ENV, SRC_FLAG };

struct origin {
    enum src_kind kind;
    unsigned line; /* SRC_FILE, 0 if unknown */
};

/* Line index of the file: key path -> line. */
struct loc {
    char *path;
    unsigned line;
};

struct loader {
    struct kms_config *cfg;
    struct kms_err *err;
    const char *file;
    struct origin *origin; /* of each option's current value, N_OPTS entries */
    struct loc *locs;
    size_t n_locs, cap_locs;
    char cyaml_msg[256];   /* first libcyaml error, captured by the log fn */
    char cyaml_field[64];  /* innermost mapping field in its backtrace */
    unsigned cyaml_line;   /* and its line */
};

/* The one-line error about option o's value from `org`; `what` names the
 * option or list element ("talos.listen", "initialCluster[1]"). */
int config_fail(struct loader *l, const struct opt *o, struct origin org, const char *what,
                const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Parses v for option o and stores it; `org` says where v came from. */
int config_apply(struct loader *l, const struct opt *o, struct origin org, const char *v);
/* Appends one entry to a list option (emptied first by the caller). */
int config_add_peer(struct loader *l, const struct opt *o, struct origin org,
                    const char *what, const char *id, const char *raft, const char *cluster);
int config_add_cidr(struct loader *l, const struct opt *o, struct origin org,
                    const char *what, const char *s);
int config_add_uuid(struct loader *l, const struct opt *o, struct origin org,
                    const char *what, const char *s);
/* Empties the list of option o. */
void config_list_clear(struct kms_config *cfg, const struct opt *o);

/* The file (config_file.c): l->file into l->cfg. */
int config_load_file(struct loader *l);

/* Environment and flags (config_args.c). */
int config_scan_meta_flags(struct loader *l, int argc, char **argv, const char **file);
int config_load_env(struct loader *l, char **envp);
int config_load_flags(struct loader *l, int argc, char **argv);

#endif /* KMS_CONFIG_INTERNAL_H */
