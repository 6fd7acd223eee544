/*
 * kmsd configuration.
 *
 * Every option is declared once, in the option table in config.c (YAML key,
 * environment variable, command-line flag, type, default, flags, help). The
 * YAML loader, the environment and flag parsers, --help and the YAML dump are
 * all driven by that table, so they cannot disagree.
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

/* Limits on list options; they match the daemon's fixed tables (kmsd.h). */
#define KMS_CONFIG_MAX_PEERS 16
#define KMS_CONFIG_MAX_CIDRS 32
#define KMS_CONFIG_MAX_UUIDS 256
#define KMS_CONFIG_MAX_UUID_LEN 128

/* Option flags (documented per option in docs/configuration.md). */
#define KMS_OPT_IMMUTABLE  (1u << 0) /* needs a restart to change */
#define KMS_OPT_RELOADABLE (1u << 1) /* SIGHUP re-reads the file it names */
#define KMS_OPT_SENSITIVE  (1u << 2) /* value redacted in dumps and logs */
#define KMS_OPT_REQUIRED   (1u << 3) /* no default; must be set somewhere */

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
    char *raft;    /* host:port of its raft transport */
    char *cluster; /* host:port of its cluster API */
};

struct kms_config_cidr {
    uint8_t addr[16]; /* network address; IPv4 stored v4-mapped (::ffff:a.b.c.d) */
    unsigned prefix;  /* 0..128 over the 16-byte form (IPv4 /24 -> 120) */
    char *text;       /* as written, for dumps */
};

/*
 * The effective configuration. After a successful kms_config_load every
 * string field is non-NULL (possibly ""), every value is validated, and the
 * advertise addresses are filled in (see docs/configuration.md).
 */
struct kms_config {
    char *config_file; /* --config / KMSD_CONFIG, NULL when none */
    bool check_only;   /* --check-config: validate, print nothing, exit */
    bool help;         /* --help: usage was printed to stdout; exit 0 */
    bool version;      /* --version: nothing else loaded; main prints it, exit 0 */
    bool dump_only;    /* --dump-config: load, validate, main dumps it, exit */

    uint64_t node_id;
    char *data_dir;

    struct {
        char *listen;
        char *advertise;
        char *cert_file;
        char *key_file;
        bool plaintext;
        bool tls12;
        uint64_t max_message_bytes;
        unsigned workers; /* 0 = number of cores */
    } talos;

    struct {
        char *listen;
        char *advertise;
    } cluster;

    struct {
        char *listen;
        char *advertise;
        unsigned election_timeout_ms;
        unsigned heartbeat_timeout_ms;
        uint64_t snapshot_threshold;
        uint64_t snapshot_trailing;
    } raft;

    struct {
        char *listen;
    } http;

    struct {
        char *node_cert_file;
        char *node_key_file;
        char *cluster_ca_file;
        char *operator_ca_file;
    } tls;

    struct kms_config_peer *initial_cluster;
    size_t n_initial_cluster;

    enum kms_unseal_reads unseal_reads;
    unsigned lease_grace_ms;
    unsigned request_wait_ms;

    struct {
        bool peer; /* unseal.peer: ask an unsealed member for R (docs/security.md) */
    } unseal;

    unsigned failed_unseals_per_minute; /* 0 = no limit */
    unsigned failed_unseals_global_per_minute; /* 0 = no limit */
    unsigned seals_per_minute;          /* per source address; 0 = no limit */
    unsigned seals_per_node_per_minute; /* per node UUID; 0 = no limit */
    unsigned records_per_node;          /* live records per node UUID; 0 = no limit */

    unsigned last_access_interval_ms;   /* lastAccess.interval; 0 = off */
    unsigned last_access_max_batch;     /* lastAccess.maxBatch */

    struct {
        unsigned max_connections;             /* per gRPC port; 0 = auto */
        unsigned max_connections_per_address; /* per gRPC port */
        unsigned handshake_timeout_ms;
        unsigned max_concurrent_streams;
        uint64_t grpc_memory;                 /* bytes, per gRPC port */
        unsigned connection_idle_ms;
        unsigned connection_max_age_ms;
        unsigned http_max_connections;
        unsigned http_max_connections_per_address;
        unsigned listener_probe_interval_ms;  /* 0 = no probe */
        uint64_t talos_connection_bytes;      /* 0 = no byte police */
        unsigned abuse_ban_after;
        unsigned abuse_ban_ms;
    } limits;

    struct kms_config_cidr *allowed_cidrs; /* empty = any source */
    size_t n_allowed_cidrs;
    char **uuid_allow_list; /* empty = any node UUID */
    size_t n_uuid_allow_list;

    struct {
        int type;             /* enum kms_seal_type */
        char *module;         /* PKCS#11 module path */
        char *token_label;
        char *key_label;
        char *pin_file;
        char *pin;            /* KMSD_PKCS11_PIN; sensitive, "" when unset */
        unsigned retry_max_ms;
    } seal;

    int log_level; /* enum kms_log_level (kms_log.h) */
    bool memory_lock; /* mlockall() at start (default true) */
    char *audit_file; /* hash-chained audit log; "" = <dataDir>/audit.log */
};

/*
 * Builds cfg from defaults, the config file (--config FILE or KMSD_CONFIG),
 * the KMSD_* variables in envp (NULL-terminated, may be NULL) and argv
 * (argv[0] is the program name). cfg is overwritten; on failure it is left
 * empty (kms_config_free is still safe) and KMS_ECONFIG is returned with a
 * one-line message. With --help the usage is printed to stdout, cfg->help is
 * set and 0 is returned without loading anything else; likewise --version
 * (cfg->version set, nothing printed: main prints its build version).
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

#endif /* KMS_CONFIG_H */
