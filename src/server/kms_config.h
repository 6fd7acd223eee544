/*
 * kmsd configuration.
 *
 * Every option is declared once, as a row of config_options.h (YAML key,
 * C member, environment variable, command-line flag, type, default, range,
 * flags, help, docs). The struct below, the YAML schema, the environment and
 * flag parsers, validation, --help, the YAML dump and the docs table are all
 * generated from those rows, so they cannot disagree.
 *
 * Precedence: built-in defaults < config file < KMSD_* environment < flags.
 * Each layer is parsed strictly as it is applied (a bad value in the file is
 * an error even if the environment overrides it), then the effective
 * configuration is validated as a whole (cross-field rules, file access).
 *
 * Errors are one line in err->msg with code KMS_ECONFIG, naming where the
 * value came from:
 *   config /etc/kmsd.yaml:7: talos.listen: invalid port "4050x"
 *   KMSD_RAFT_LISTEN: invalid address "x"
 *   --node-id: required
 *
 * Reference: docs/configuration.md.
 */
#ifndef KMS_CONFIG_H
#define KMS_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kms_err.h"

#include "config/config_options.h"

/* Limits on list options (the daemon's tables use them too). */
#define KMS_CONFIG_MAX_PEERS 16
#define KMS_CONFIG_MAX_CIDRS 32
#define KMS_CONFIG_MAX_UUIDS 256
#define KMS_CONFIG_MAX_UUID_LEN 128

/* Option flags (documented per option in docs/configuration.md). */
#define KMS_OPT_IMMUTABLE  (1u << 0) /* needs a restart to change */
#define KMS_OPT_RELOADABLE (1u << 1) /* SIGHUP re-reads the file it names */
#define KMS_OPT_SENSITIVE  (1u << 2) /* value redacted in dumps and logs */
#define KMS_OPT_REQUIRED   (1u << 3) /* no default; must be set somewhere */

/* Values of the ENUM options: the index of the name in their row. */
enum kms_unseal_reads {
    KMS_UNSEAL_READS_LEASE = 0, /* serve only while holding a read lease */
    KMS_UNSEAL_READS_LOCAL = 1, /* serve from any applied state */
};

enum kms_seal_type {
    KMS_SEAL_SHAMIR = 0, /* the root key comes from k shares at every start */
    KMS_SEAL_PKCS11 = 1, /* unwrapped by a key in a PKCS#11 token (auto-unseal) */
};

struct kms_config_peer {
    uint64_t id;
    union {
        char *raft;         /* host:port of its raft transport */
        char *raft_address; /* the daemon's name for it */
    };
    union {
        char *cluster;         /* host:port of its cluster API */
        char *cluster_address; /* the daemon's name for it */
    };
};

struct kms_config_cidr {
    uint8_t addr[16]; /* network address; IPv4 stored v4-mapped (::ffff:a.b.c.d) */
    unsigned prefix;  /* 0..128 over the 16-byte form (IPv4 /24 -> 120) */
    char *text;       /* as written, for dumps */
};

/* The C type of each option TYPE (config_options.h); a list is a pointer
 * and a count n_<name>. */
#define KMS_CFG_DECL_U64(n) uint64_t n;
#define KMS_CFG_DECL_UINT(n) unsigned n;
#define KMS_CFG_DECL_BOOL(n) bool n;
#define KMS_CFG_DECL_DURATION(n) unsigned n; /* milliseconds */
#define KMS_CFG_DECL_SIZE(n) uint64_t n;     /* bytes */
#define KMS_CFG_DECL_STRING(n) char *n;
#define KMS_CFG_DECL_PATH(n) char *n;
#define KMS_CFG_DECL_ADDR(n) char *n;
#define KMS_CFG_DECL_ENUM(n) int n;
#define KMS_CFG_DECL_PEERS(n) struct kms_config_peer *n; size_t n_##n;
#define KMS_CFG_DECL_CIDRS(n) struct kms_config_cidr *n; size_t n_##n;
#define KMS_CFG_DECL_UUIDS(n) char **n; size_t n_##n;

/* A top-level member; a list also answers to its alias (same storage). */
#define KMS_CFG_TOP_U64(f, a) KMS_CFG_DECL_U64(f)
#define KMS_CFG_TOP_UINT(f, a) KMS_CFG_DECL_UINT(f)
#define KMS_CFG_TOP_BOOL(f, a) KMS_CFG_DECL_BOOL(f)
#define KMS_CFG_TOP_DURATION(f, a) KMS_CFG_DECL_DURATION(f)
#define KMS_CFG_TOP_SIZE(f, a) KMS_CFG_DECL_SIZE(f)
#define KMS_CFG_TOP_STRING(f, a) KMS_CFG_DECL_STRING(f)
#define KMS_CFG_TOP_PATH(f, a) KMS_CFG_DECL_PATH(f)
#define KMS_CFG_TOP_ADDR(f, a) KMS_CFG_DECL_ADDR(f)
#define KMS_CFG_TOP_ENUM(f, a) KMS_CFG_DECL_ENUM(f)
#define KMS_CFG_TOP_LIST(T, f, a) union { struct { T(f) }; struct { T(a) }; };
#define KMS_CFG_TOP_PEERS(f, a) KMS_CFG_TOP_LIST(KMS_CFG_DECL_PEERS, f, a)
#define KMS_CFG_TOP_CIDRS(f, a) KMS_CFG_TOP_LIST(KMS_CFG_DECL_CIDRS, f, a)
#define KMS_CFG_TOP_UUIDS(f, a) KMS_CFG_TOP_LIST(KMS_CFG_DECL_UUIDS, f, a)

#define KMS_CFG_ROW_TOP(sec, key, f, a, T, ...) KMS_CFG_TOP_##T(f, a)
#define KMS_CFG_ROW_FIELD(sec, key, f, a, T, ...) KMS_CFG_DECL_##T(f)
#define KMS_CFG_ROW_ALIAS(sec, key, f, a, T, ...) KMS_CFG_DECL_##T(a)

/* A NESTED section is a struct named after it (cfg.talos.listen) in a
 * union with the same members under their daemon names (cfg.talos_listen):
 * two names for one storage, so the daemon reads the validated
 * configuration directly. */
#define KMS_CFG_GROUP_ROOT(sec, LIST) LIST(KMS_CFG_ROW_TOP)
#define KMS_CFG_GROUP_FLAT(sec, LIST) LIST(KMS_CFG_ROW_TOP)
#define KMS_CFG_GROUP_NESTED(sec, LIST) \
    union { struct { LIST(KMS_CFG_ROW_FIELD) } sec; struct { LIST(KMS_CFG_ROW_ALIAS) }; };
#define KMS_CFG_GROUP(kind, sec, LIST) KMS_CFG_GROUP_##kind(sec, LIST)

/*
 * The effective configuration. After a successful kms_config_load every
 * string field is non-NULL (possibly ""), every value is validated, and the
 * advertise addresses are filled in (see docs/configuration.md).
 *
 * One member per row of config_options.h, e.g. talos.listen is
 * cfg.talos.listen (also cfg.talos_listen), unsealReads cfg.unseal_reads,
 * initialCluster cfg.initial_cluster / cfg.n_initial_cluster (also
 * cfg.peers / cfg.n_peers). The daemon keeps a copy as d->opt (kmsd.h).
 */
struct kms_config {
    char *config_file; /* --config / KMSD_CONFIG, NULL when none */
    bool check_only;   /* --check-config: validate, print nothing, exit */
    bool help;         /* --help: usage was printed to stdout; exit 0 */
    bool version;      /* --version: nothing else loaded; main prints it, exit 0 */
    bool dump_only;    /* --dump-config: load, validate, main dumps it, exit */
    bool print_table;  /* --print-config-table: nothing else loaded; main prints the
                        * docs table (kms_config_print_table), exit 0 */

    KMS_CONFIG_GROUPS(KMS_CFG_GROUP)

    /* Derived by kms_config_load from the options above. */
    bool unseal_reads_local; /* unsealReads is local */
    bool seal_pkcs11;        /* seal.type is pkcs11 */
};

/*
 * Builds cfg from defaults, the config file (--config FILE or KMSD_CONFIG),
 * the KMSD_* variables in envp (NULL-terminated, may be NULL) and argv
 * (argv[0] is the program name). cfg is overwritten; on failure it is left
 * empty (kms_config_free is still safe) and KMS_ECONFIG is returned with a
 * one-line message. With --help the usage is printed to stdout, cfg->help is
 * set and 0 is returned without loading anything else; likewise --version
 * (cfg->version set, nothing printed: main prints its build version),
 * and --print-config-table (cfg->print_table set: main prints
 * kms_config_print_table).
 * --dump-config loads and validates everything and sets cfg->dump_only.
 */
int kms_config_load(struct kms_config *cfg, int argc, char **argv, char **envp,
                    struct kms_err *err);

/*
 * Calls cb(arg, name, len) for every KMSD_* variable in envp that is not a
 * kmsd option (a misspelling is otherwise silently ignored); name is the
 * whole "NAME=value" entry, len the length of NAME. Returns how many.
 * Pure: any thread.
 */
size_t kms_config_unknown_env(char **envp, void (*cb)(void *arg, const char *name, size_t len),
                              void *arg);

/* Frees everything cfg owns and zeroes it. Safe on a zeroed or freed cfg. */
void kms_config_free(struct kms_config *cfg);

/* Prints the effective configuration as YAML that kms_config_load accepts,
 * with KMS_OPT_SENSITIVE values replaced by "<redacted>". 0 or KMS_EIO. */
int kms_config_dump(const struct kms_config *cfg, FILE *f);

/* Like kms_config_dump, also redacting the options whose YAML names are in
 * `extra` (NULL-terminated), e.g. file paths in a support bundle. */
int kms_config_dump_redacting(const struct kms_config *cfg, FILE *f,
                              const char *const *extra);

/* Prints the --help text generated from the option table. */
void kms_config_usage(FILE *f, const char *prog);

/* Prints the options table of docs/configuration.md (Markdown), generated
 * from the option table. 0 or KMS_EIO. */
int kms_config_print_table(FILE *f);

#endif /* KMS_CONFIG_H */
