/*
 * kmsd configuration: option table, YAML file, environment, flags, checks.
 *
 * The file is read in three steps:
 *  1. libyaml walks the events once to record the line of every key path
 *     ("talos.listen", "initialCluster[1]") and to report syntax errors with
 *     their line; libcyaml does not expose lines for values it accepted.
 *  2. libcyaml loads the document against a schema in which every scalar is
 *     a string: it rejects unknown keys and wrong shapes. Numbers are strings
 *     because libcyaml 1.3.1 accepts "4050x" as 4050.
 *  3. Every value goes through the same strict parsers as environment
 *     variables and flags (apply_string), driven by the option table.
 */
#include "kms_config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cyaml/cyaml.h>
#include <yaml.h>

#include "kms_log.h"

/* ------------------------------------------------------------------ */
/* The file schema: every scalar is a string.                          */

struct f_talos {
    char *listen, *advertise, *certFile, *keyFile, *plaintext, *tls12,
        *maxMessageBytes, *workers;
};
struct f_cluster {
    char *listen, *advertise;
};
struct f_raft {
    char *listen, *advertise, *electionTimeout, *heartbeatTimeout,
        *snapshotThreshold, *snapshotTrailing;
};
struct f_http {
    char *listen;
};
struct f_tls {
    char *nodeCertFile, *nodeKeyFile, *clusterCAFile, *operatorCAFile;
};
struct f_peer {
    char *id, *raft, *cluster;
};
struct f_rate {
    char *failedUnsealsPerMinute;
    char *failedUnsealsGlobalPerMinute;
    char *sealsPerMinute;
    char *sealsPerNodePerMinute;
    char *recordsPerNode;
};
struct f_limits {
    char *maxConnections, *maxConnectionsPerAddress, *handshakeTimeout, *maxConcurrentStreams,
        *grpcMemory, *connectionIdle, *connectionMaxAge, *httpMaxConnections,
        *httpMaxConnectionsPerAddress, *listenerProbeInterval, *talosConnectionBytes,
        *abuseBanAfter, *abuseBanTime;
};
struct f_unseal {
    char *peer;
};
struct f_last {
    char *interval, *maxBatch;
};
struct f_enrol {
    char **allowedCIDRs;
    unsigned allowedCIDRs_count;
    char **uuidAllowList;
    unsigned uuidAllowList_count;
};
struct f_seal {
    char *type, *module, *tokenLabel, *keyLabel, *pinFile, *pin, *retryMax;
};
struct f_doc {
    char *nodeId, *dataDir;
    struct f_talos talos;
    struct f_cluster cluster;
    struct f_raft raft;
    struct f_http http;
    struct f_tls tls;
    struct f_peer *initialCluster;
    unsigned initialCluster_count;
    char *unsealReads, *leaseGrace, *requestWait;
    struct f_unseal unseal;
    struct f_rate rateLimit;
    struct f_limits limits;
    struct f_last lastAccess;
    struct f_enrol enrolment;
    struct f_seal seal;
    char *logLevel;
    char *memoryLock;
    char *auditFile;
};

#define OPT_STR(k, s, m) CYAML_FIELD_STRING_PTR(k, CYAML_FLAG_OPTIONAL, s, m, 0, 4096)

static const cyaml_schema_field_t talos_fields[] = {
    OPT_STR("listen", struct f_talos, listen),
    OPT_STR("advertise", struct f_talos, advertise),
    OPT_STR("certFile", struct f_talos, certFile),
    OPT_STR("keyFile", struct f_talos, keyFile),
    OPT_STR("plaintext", struct f_talos, plaintext),
    OPT_STR("tls12", struct f_talos, tls12),
    OPT_STR("maxMessageBytes", struct f_talos, maxMessageBytes),
    OPT_STR("workers", struct f_talos, workers),
    CYAML_FIELD_END};
static const cyaml_schema_field_t cluster_fields[] = {
    OPT_STR("listen", struct f_cluster, listen),
    OPT_STR("advertise", struct f_cluster, advertise),
    CYAML_FIELD_END};
static const cyaml_schema_field_t raft_fields[] = {
    OPT_STR("listen", struct f_raft, listen),
    OPT_STR("advertise", struct f_raft, advertise),
    OPT_STR("electionTimeout", struct f_raft, electionTimeout),
    OPT_STR("heartbeatTimeout", struct f_raft, heartbeatTimeout),
    OPT_STR("snapshotThreshold", struct f_raft, snapshotThreshold),
    OPT_STR("snapshotTrailing", struct f_raft, snapshotTrailing),
    CYAML_FIELD_END};
static const cyaml_schema_field_t http_fields[] = {
    OPT_STR("listen", struct f_http, listen),
    CYAML_FIELD_END};
static const cyaml_schema_field_t tls_fields[] = {
    OPT_STR("nodeCertFile", struct f_tls, nodeCertFile),
    OPT_STR("nodeKeyFile", struct f_tls, nodeKeyFile),
    OPT_STR("clusterCAFile", struct f_tls, clusterCAFile),
    OPT_STR("operatorCAFile", struct f_tls, operatorCAFile),
    CYAML_FIELD_END};
static const cyaml_schema_field_t peer_fields[] = {
    OPT_STR("id", struct f_peer, id),
    OPT_STR("raft", struct f_peer, raft),
    OPT_STR("cluster", struct f_peer, cluster),
    CYAML_FIELD_END};
static const cyaml_schema_value_t peer_entry = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, struct f_peer, peer_fields)};
static const cyaml_schema_field_t unseal_fields[] = {
    OPT_STR("peer", struct f_unseal, peer),
    CYAML_FIELD_END};
static const cyaml_schema_field_t rate_fields[] = {
    OPT_STR("failedUnsealsPerMinute", struct f_rate, failedUnsealsPerMinute),
    OPT_STR("failedUnsealsGlobalPerMinute", struct f_rate, failedUnsealsGlobalPerMinute),
    OPT_STR("sealsPerMinute", struct f_rate, sealsPerMinute),
    OPT_STR("sealsPerNodePerMinute", struct f_rate, sealsPerNodePerMinute),
    OPT_STR("recordsPerNode", struct f_rate, recordsPerNode),
    CYAML_FIELD_END};
static const cyaml_schema_field_t last_fields[] = {
    OPT_STR("interval", struct f_last, interval),
    OPT_STR("maxBatch", struct f_last, maxBatch),
    CYAML_FIELD_END};
static const cyaml_schema_field_t limits_fields[] = {
    OPT_STR("maxConnections", struct f_limits, maxConnections),
    OPT_STR("maxConnectionsPerAddress", struct f_limits, maxConnectionsPerAddress),
    OPT_STR("handshakeTimeout", struct f_limits, handshakeTimeout),
    OPT_STR("maxConcurrentStreams", struct f_limits, maxConcurrentStreams),
    OPT_STR("grpcMemory", struct f_limits, grpcMemory),
    OPT_STR("connectionIdle", struct f_limits, connectionIdle),
    OPT_STR("connectionMaxAge", struct f_limits, connectionMaxAge),
    OPT_STR("httpMaxConnections", struct f_limits, httpMaxConnections),
    OPT_STR("httpMaxConnectionsPerAddress", struct f_limits, httpMaxConnectionsPerAddress),
    OPT_STR("listenerProbeInterval", struct f_limits, listenerProbeInterval),
    OPT_STR("talosConnectionBytes", struct f_limits, talosConnectionBytes),
    OPT_STR("abuseBanAfter", struct f_limits, abuseBanAfter),
    OPT_STR("abuseBanTime", struct f_limits, abuseBanTime),
    CYAML_FIELD_END};
static const cyaml_schema_value_t string_entry = {
    CYAML_VALUE_STRING(CYAML_FLAG_POINTER, char, 0, 4096)};
static const cyaml_schema_field_t enrol_fields[] = {
    CYAML_FIELD_SEQUENCE("allowedCIDRs", CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL,
                         struct f_enrol, allowedCIDRs, &string_entry, 0,
                         KMS_CONFIG_MAX_CIDRS),
    CYAML_FIELD_SEQUENCE("uuidAllowList", CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL,
                         struct f_enrol, uuidAllowList, &string_entry, 0,
                         KMS_CONFIG_MAX_UUIDS),
    CYAML_FIELD_END};
static const cyaml_schema_field_t seal_fields[] = {
    OPT_STR("type", struct f_seal, type),
    OPT_STR("module", struct f_seal, module),
    OPT_STR("tokenLabel", struct f_seal, tokenLabel),
    OPT_STR("keyLabel", struct f_seal, keyLabel),
    OPT_STR("pinFile", struct f_seal, pinFile),
    OPT_STR("pin", struct f_seal, pin),
    OPT_STR("retryMax", struct f_seal, retryMax),
    CYAML_FIELD_END};
static const cyaml_schema_field_t doc_fields[] = {
    OPT_STR("nodeId", struct f_doc, nodeId),
    OPT_STR("dataDir", struct f_doc, dataDir),
    CYAML_FIELD_MAPPING("talos", CYAML_FLAG_OPTIONAL, struct f_doc, talos, talos_fields),
    CYAML_FIELD_MAPPING("cluster", CYAML_FLAG_OPTIONAL, struct f_doc, cluster, cluster_fields),
    CYAML_FIELD_MAPPING("raft", CYAML_FLAG_OPTIONAL, struct f_doc, raft, raft_fields),
    CYAML_FIELD_MAPPING("http", CYAML_FLAG_OPTIONAL, struct f_doc, http, http_fields),
    CYAML_FIELD_MAPPING("tls", CYAML_FLAG_OPTIONAL, struct f_doc, tls, tls_fields),
    CYAML_FIELD_SEQUENCE("initialCluster", CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL,
                         struct f_doc, initialCluster, &peer_entry, 0,
                         KMS_CONFIG_MAX_PEERS),
    OPT_STR("unsealReads", struct f_doc, unsealReads),
    OPT_STR("leaseGrace", struct f_doc, leaseGrace),
    OPT_STR("requestWait", struct f_doc, requestWait),
    CYAML_FIELD_MAPPING("unseal", CYAML_FLAG_OPTIONAL, struct f_doc, unseal, unseal_fields),
    CYAML_FIELD_MAPPING("rateLimit", CYAML_FLAG_OPTIONAL, struct f_doc, rateLimit, rate_fields),
    CYAML_FIELD_MAPPING("limits", CYAML_FLAG_OPTIONAL, struct f_doc, limits, limits_fields),
    CYAML_FIELD_MAPPING("lastAccess", CYAML_FLAG_OPTIONAL, struct f_doc, lastAccess, last_fields),
    CYAML_FIELD_MAPPING("enrolment", CYAML_FLAG_OPTIONAL, struct f_doc, enrolment, enrol_fields),
    CYAML_FIELD_MAPPING("seal", CYAML_FLAG_OPTIONAL, struct f_doc, seal, seal_fields),
    OPT_STR("logLevel", struct f_doc, logLevel),
    OPT_STR("memoryLock", struct f_doc, memoryLock),
    OPT_STR("auditFile", struct f_doc, auditFile),
    CYAML_FIELD_END};
static const cyaml_schema_value_t doc_schema = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, struct f_doc, doc_fields)};

/* ------------------------------------------------------------------ */
/* The option table.                                                   */

enum opt_type {
    T_U64,      /* decimal integer in [min, max] */
    T_UINT,     /* decimal integer in [min, max], stored as unsigned */
    T_BOOL,     /* true | false */
    T_DURATION, /* <digits>(ms|s|m|h) in [min, max] ms, stored as unsigned ms */
    T_SIZE,     /* <digits>[KiB|MiB|GiB] in [min, max] bytes */
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

struct opt {
    const char *name; /* YAML path */
    const char *env;  /* environment variable */
    const char *flag; /* long flag without "--" */
    enum opt_type type;
    const char *def; /* default, parsed like any other value; NULL = none */
    unsigned flags;
    size_t cfg_off;  /* field in struct kms_config */
    size_t file_off; /* char * in struct f_doc (scalars only) */
    uint64_t min, max;
    const char *const *enums;
    const char *meta; /* value placeholder in --help */
    const char *help;
};

static const char *const unseal_reads_names[] = {"lease", "local", NULL};
static const char *const seal_type_names[] = {"shamir", "pkcs11", NULL};
static const char *const log_level_names[] = {"debug", "info", "warn", "error", NULL};

#define C(f) offsetof(struct kms_config, f)
#define F(f) offsetof(struct f_doc, f)
#define NOF ((size_t)-1)
#define IMM KMS_OPT_IMMUTABLE
#define REL KMS_OPT_RELOADABLE
#define MS_MAX 3600000u

/* Grouped by YAML section: the dump prints a section header whenever the
 * prefix before '.' changes. */
static const struct opt opts[] = {
    {"nodeId", "KMSD_NODE_ID", "node-id", T_U64, NULL, IMM | KMS_OPT_REQUIRED,
     C(node_id), F(nodeId), 1, UINT64_C(1) << 63, NULL, "ID",
     "this node's raft id, unique in the cluster (1..2^63)"},
    {"dataDir", "KMSD_DATA_DIR", "data-dir", T_STRING, NULL, IMM | KMS_OPT_REQUIRED,
     C(data_dir), F(dataDir), 0, 0, NULL, "DIR",
     "directory for the raft log and RocksDB state"},
    {"talos.listen", "KMSD_TALOS_LISTEN", "talos-listen", T_ADDR, ":4050", IMM,
     C(talos.listen), F(talos.listen), 0, 0, NULL, "ADDR",
     "Talos KMS API listen address"},
    {"talos.advertise", "KMSD_TALOS_ADVERTISE", "talos-advertise", T_ADDR, "", IMM | O_EMPTY_OK,
     C(talos.advertise), F(talos.advertise), 0, 0, NULL, "ADDR",
     "Talos API address shown to operators (default: talos.listen when it has a host)"},
    {"talos.certFile", "KMSD_TALOS_CERT_FILE", "talos-cert-file", T_PATH, "", REL,
     C(talos.cert_file), F(talos.certFile), 0, 0, NULL, "FILE",
     "PEM server certificate chain for the Talos API"},
    {"talos.keyFile", "KMSD_TALOS_KEY_FILE", "talos-key-file", T_PATH, "", REL,
     C(talos.key_file), F(talos.keyFile), 0, 0, NULL, "FILE",
     "PEM private key for talos.certFile"},
    {"talos.plaintext", "KMSD_TALOS_PLAINTEXT", "talos-plaintext", T_BOOL, "false", IMM,
     C(talos.plaintext), F(talos.plaintext), 0, 0, NULL, "BOOL",
     "serve the Talos API without TLS (development only)"},
    {"talos.tls12", "KMSD_TALOS_TLS12", "talos-tls12", T_BOOL, "false", IMM,
     C(talos.tls12), F(talos.tls12), 0, 0, NULL, "BOOL",
     "also accept TLS 1.2 on the Talos API (default TLS 1.3 only)"},
    {"talos.maxMessageBytes", "KMSD_TALOS_MAX_MESSAGE_BYTES", "talos-max-message-bytes", T_SIZE,
     "4096", IMM, C(talos.max_message_bytes), F(talos.maxMessageBytes), 1024,
     16u << 20, NULL, "SIZE", "largest Talos API request accepted"},
    {"talos.workers", "KMSD_TALOS_WORKERS", "talos-workers", T_UINT, "0", IMM,
     C(talos.workers), F(talos.workers), 0, 1024, NULL, "N",
     "gRPC worker threads (0 = number of cores)"},
    {"cluster.listen", "KMSD_CLUSTER_LISTEN", "cluster-listen", T_ADDR, ":4051", IMM,
     C(cluster.listen), F(cluster.listen), 0, 0, NULL, "ADDR",
     "cluster/operator API (mTLS) listen address"},
    {"cluster.advertise", "KMSD_CLUSTER_ADVERTISE", "cluster-advertise", T_ADDR, "",
     IMM | O_EMPTY_OK, C(cluster.advertise), F(cluster.advertise), 0, 0, NULL, "ADDR",
     "cluster API address peers use (default: from initialCluster or cluster.listen)"},
    {"raft.listen", "KMSD_RAFT_LISTEN", "raft-listen", T_ADDR, ":4052", IMM,
     C(raft.listen), F(raft.listen), 0, 0, NULL, "ADDR", "raft transport (mTLS) listen address"},
    {"raft.advertise", "KMSD_RAFT_ADVERTISE", "raft-advertise", T_ADDR, "", IMM | O_EMPTY_OK,
     C(raft.advertise), F(raft.advertise), 0, 0, NULL, "ADDR",
     "raft address peers use (default: from initialCluster or raft.listen)"},
    {"raft.electionTimeout", "KMSD_RAFT_ELECTION_TIMEOUT", "raft-election-timeout", T_DURATION,
     "1s", IMM, C(raft.election_timeout_ms), F(raft.electionTimeout), 100, 60000, NULL,
     "DURATION", "raft election timeout; also the read-lease period"},
    {"raft.heartbeatTimeout", "KMSD_RAFT_HEARTBEAT_TIMEOUT", "raft-heartbeat-timeout",
     T_DURATION, "100ms", IMM, C(raft.heartbeat_timeout_ms), F(raft.heartbeatTimeout), 10,
     10000, NULL, "DURATION", "raft heartbeat interval; must be below raft.electionTimeout"},
    {"raft.snapshotThreshold", "KMSD_RAFT_SNAPSHOT_THRESHOLD", "raft-snapshot-threshold", T_U64,
     "8192", IMM, C(raft.snapshot_threshold), F(raft.snapshotThreshold), 1, UINT32_MAX, NULL,
     "N", "log entries between raft snapshots"},
    {"raft.snapshotTrailing", "KMSD_RAFT_SNAPSHOT_TRAILING", "raft-snapshot-trailing", T_U64,
     "2048", IMM, C(raft.snapshot_trailing), F(raft.snapshotTrailing), 0, UINT32_MAX, NULL,
     "N", "log entries kept after a snapshot"},
    {"http.listen", "KMSD_HTTP_LISTEN", "http-listen", T_ADDR, ":4053", IMM,
     C(http.listen), F(http.listen), 0, 0, NULL, "ADDR",
     "/metrics /healthz /readyz listen address"},
    {"tls.nodeCertFile", "KMSD_TLS_NODE_CERT_FILE", "tls-node-cert-file", T_PATH, NULL,
     REL | KMS_OPT_REQUIRED, C(tls.node_cert_file), F(tls.nodeCertFile), 0, 0, NULL, "FILE",
     "PEM node certificate for raft and cluster mTLS (server and client)"},
    {"tls.nodeKeyFile", "KMSD_TLS_NODE_KEY_FILE", "tls-node-key-file", T_PATH, NULL,
     REL | KMS_OPT_REQUIRED, C(tls.node_key_file), F(tls.nodeKeyFile), 0, 0, NULL, "FILE",
     "PEM private key for tls.nodeCertFile"},
    {"tls.clusterCAFile", "KMSD_TLS_CLUSTER_CA_FILE", "tls-cluster-ca-file", T_PATH, NULL,
     REL | KMS_OPT_REQUIRED, C(tls.cluster_ca_file), F(tls.clusterCAFile), 0, 0, NULL, "FILE",
     "PEM CA bundle that signs node certificates"},
    {"tls.operatorCAFile", "KMSD_TLS_OPERATOR_CA_FILE", "tls-operator-ca-file", T_PATH, NULL,
     REL | KMS_OPT_REQUIRED, C(tls.operator_ca_file), F(tls.operatorCAFile), 0, 0, NULL,
     "FILE", "PEM CA bundle that signs kmsctl operator certificates"},
    {"initialCluster", "KMSD_INITIAL_CLUSTER", "initial-cluster", T_PEERS, "", IMM,
     C(initial_cluster), NOF, 0, 0, NULL, "ID=RAFT@CLUSTER,...",
     "bootstrap members, identical on every first node"},
    {"unsealReads", "KMSD_UNSEAL_READS", "unseal-reads", T_ENUM, "lease", IMM,
     C(unseal_reads), F(unsealReads), 0, 0, unseal_reads_names, "lease|local",
     "serve Unseal only with a read lease (lease) or from any applied state (local)"},
    {"leaseGrace", "KMSD_LEASE_GRACE", "lease-grace", T_DURATION, "3s", IMM,
     C(lease_grace_ms), F(leaseGrace), 0, 600000, NULL, "DURATION",
     "close the Talos listener after this long without a read lease"},
    {"requestWait", "KMSD_REQUEST_WAIT", "request-wait", T_DURATION, "5s", IMM,
     C(request_wait_ms), F(requestWait), 10, 9000, NULL, "DURATION",
     "longest wait for a leader or lease inside one RPC (below Talos's 10s deadline)"},
    {"unseal.peer", "KMSD_UNSEAL_PEER", "unseal-peer", T_BOOL, "false", IMM,
     C(unseal.peer), F(unseal.peer), 0, 0, NULL, "BOOL",
     "a restarted replica asks an unsealed member for the root key (set on every member; "
     "docs/security.md \"Peer unseal\")"},
    {"rateLimit.failedUnsealsPerMinute", "KMSD_RATE_LIMIT_FAILED_UNSEALS_PER_MINUTE",
     "rate-limit-failed-unseals-per-minute", T_UINT, "30", IMM,
     C(failed_unseals_per_minute), F(rateLimit.failedUnsealsPerMinute), 0, 1000000, NULL,
     "N", "failed Unseals allowed per source address (IPv6: per /64) per minute (0 = no limit)"},
    {"rateLimit.failedUnsealsGlobalPerMinute", "KMSD_RATE_LIMIT_FAILED_UNSEALS_GLOBAL_PER_MINUTE",
     "rate-limit-failed-unseals-global-per-minute", T_UINT, "600", IMM,
     C(failed_unseals_global_per_minute), F(rateLimit.failedUnsealsGlobalPerMinute), 0, 10000000,
     NULL, "N", "failed Unseals allowed per minute over all addresses (0 = no limit)"},
    {"rateLimit.sealsPerMinute", "KMSD_RATE_LIMIT_SEALS_PER_MINUTE", "rate-limit-seals-per-minute",
     T_UINT, "120", IMM, C(seals_per_minute), F(rateLimit.sealsPerMinute), 0, 10000000, NULL, "N",
     "Seals allowed per source address (IPv6: per /64) per minute (0 = no limit)"},
    {"rateLimit.sealsPerNodePerMinute", "KMSD_RATE_LIMIT_SEALS_PER_NODE_PER_MINUTE",
     "rate-limit-seals-per-node-per-minute", T_UINT, "10", IMM, C(seals_per_node_per_minute),
     F(rateLimit.sealsPerNodePerMinute), 0, 1000000, NULL, "N",
     "Seals allowed per node UUID per minute (0 = no limit)"},
    {"rateLimit.recordsPerNode", "KMSD_RATE_LIMIT_RECORDS_PER_NODE", "rate-limit-records-per-node",
     T_UINT, "256", IMM, C(records_per_node), F(rateLimit.recordsPerNode), 0, 100000, NULL, "N",
     "live (unrevoked) keys allowed per node UUID (0 = no limit)"},
    {"lastAccess.interval", "KMSD_LAST_ACCESS_INTERVAL", "last-access-interval", T_DURATION,
     "60s", IMM, C(last_access_interval_ms), F(lastAccess.interval), 0, 86400000, NULL,
     "DURATION",
     "each replica replicates the last-access times of its unseals at most once per this "
     "interval (0 = not recorded)"},
    {"lastAccess.maxBatch", "KMSD_LAST_ACCESS_MAX_BATCH", "last-access-max-batch", T_UINT,
     "4096", IMM, C(last_access_max_batch), F(lastAccess.maxBatch), 1, 65536, NULL, "N",
     "keys per last-access write; keys beyond it wait for the next interval"},
    {"limits.maxConnections", "KMSD_LIMITS_MAX_CONNECTIONS", "limits-max-connections", T_UINT,
     "0", IMM, C(limits.max_connections), F(limits.maxConnections), 0, 1000000, NULL, "N",
     "open connections per gRPC port, all peers (0 = auto: min(1024, (fd limit - 128) / 4))"},
    {"limits.maxConnectionsPerAddress", "KMSD_LIMITS_MAX_CONNECTIONS_PER_ADDRESS",
     "limits-max-connections-per-address", T_UINT, "64", IMM,
     C(limits.max_connections_per_address), F(limits.maxConnectionsPerAddress), 1, 1000000,
     NULL, "N", "open connections per source address on each gRPC port"},
    {"limits.handshakeTimeout", "KMSD_LIMITS_HANDSHAKE_TIMEOUT", "limits-handshake-timeout",
     T_DURATION, "10s", IMM, C(limits.handshake_timeout_ms), F(limits.handshakeTimeout), 100,
     60000, NULL, "DURATION", "a connection must finish TLS and HTTP/2 set-up within this"},
    {"limits.maxConcurrentStreams", "KMSD_LIMITS_MAX_CONCURRENT_STREAMS",
     "limits-max-concurrent-streams", T_UINT, "16", IMM, C(limits.max_concurrent_streams),
     F(limits.maxConcurrentStreams), 1, 1000, NULL, "N",
     "concurrent HTTP/2 streams per gRPC connection"},
    {"limits.grpcMemory", "KMSD_LIMITS_GRPC_MEMORY", "limits-grpc-memory", T_SIZE, "64MiB", IMM,
     C(limits.grpc_memory), F(limits.grpcMemory), 4u << 20, UINT64_C(16) << 30, NULL, "SIZE",
     "gRPC resource quota (transport memory) per gRPC port"},
    {"limits.connectionIdle", "KMSD_LIMITS_CONNECTION_IDLE", "limits-connection-idle",
     T_DURATION, "5m", IMM, C(limits.connection_idle_ms), F(limits.connectionIdle), 1000,
     86400000, NULL, "DURATION", "close gRPC connections without a call for this long"},
    {"limits.connectionMaxAge", "KMSD_LIMITS_CONNECTION_MAX_AGE", "limits-connection-max-age",
     T_DURATION, "30m", IMM, C(limits.connection_max_age_ms), F(limits.connectionMaxAge), 1000,
     86400000, NULL, "DURATION", "GOAWAY gRPC connections older than this (10 s grace)"},
    {"limits.httpMaxConnections", "KMSD_LIMITS_HTTP_MAX_CONNECTIONS",
     "limits-http-max-connections", T_UINT, "64", IMM, C(limits.http_max_connections),
     F(limits.httpMaxConnections), 1, 10000, NULL, "N", "open connections on the HTTP port"},
    {"limits.httpMaxConnectionsPerAddress", "KMSD_LIMITS_HTTP_MAX_CONNECTIONS_PER_ADDRESS",
     "limits-http-max-connections-per-address", T_UINT, "8", IMM,
     C(limits.http_max_connections_per_address), F(limits.httpMaxConnectionsPerAddress), 1,
     10000, NULL, "N", "open connections per source address on the HTTP port"},
    {"limits.listenerProbeInterval", "KMSD_LIMITS_LISTENER_PROBE_INTERVAL",
     "limits-listener-probe-interval", T_DURATION, "2s", IMM,
     C(limits.listener_probe_interval_ms), F(limits.listenerProbeInterval), 0, 60000, NULL,
     "DURATION", "self-connect check of the gRPC listeners (0 = off)"},
    {"limits.talosConnectionBytes", "KMSD_LIMITS_TALOS_CONNECTION_BYTES",
     "limits-talos-connection-bytes", T_SIZE, "32KiB", IMM, C(limits.talos_connection_bytes),
     F(limits.talosConnectionBytes), 0, UINT64_C(1) << 30, NULL, "SIZE",
     "shut down a Talos API connection that received more than this (0 = off)"},
    {"limits.abuseBanAfter", "KMSD_LIMITS_ABUSE_BAN_AFTER", "limits-abuse-ban-after", T_UINT,
     "3", IMM, C(limits.abuse_ban_after), F(limits.abuseBanAfter), 0, 1000, NULL, "N",
     "byte-budget shutdowns of one address within 10s that ban it (0 = never)"},
    {"limits.abuseBanTime", "KMSD_LIMITS_ABUSE_BAN_TIME", "limits-abuse-ban-time", T_DURATION,
     "30s", IMM, C(limits.abuse_ban_ms), F(limits.abuseBanTime), 0, MS_MAX, NULL, "DURATION",
     "how long a banned address is refused on the Talos API"},
    {"enrolment.allowedCIDRs", "KMSD_ENROLMENT_ALLOWED_CIDRS", "enrolment-allowed-cidrs",
     T_CIDRS, "", IMM, C(allowed_cidrs), NOF, 0, 0, NULL, "CIDR,...",
     "source networks allowed to Seal (empty = any)"},
    {"enrolment.uuidAllowList", "KMSD_ENROLMENT_UUID_ALLOW_LIST", "enrolment-uuid-allow-list",
     T_UUIDS, "", IMM, C(uuid_allow_list), NOF, 0, 0, NULL, "UUID,...",
     "node UUIDs allowed to Seal (empty = any)"},
    {"seal.type", "KMSD_SEAL_TYPE", "seal-type", T_ENUM, "shamir", IMM, C(seal.type),
     F(seal.type), 0, 0, seal_type_names, "shamir|pkcs11",
     "how this node gets the root key at start: k shares (shamir) or a PKCS#11 token"},
    {"seal.module", "KMSD_SEAL_MODULE", "seal-module", T_PATH, "", IMM, C(seal.module),
     F(seal.module), 0, 0, NULL, "FILE", "PKCS#11 module (.so) of the HSM (seal.type pkcs11)"},
    {"seal.tokenLabel", "KMSD_SEAL_TOKEN_LABEL", "seal-token-label", T_STRING, "", IMM,
     C(seal.token_label), F(seal.tokenLabel), 0, 0, NULL, "LABEL",
     "label of the PKCS#11 token that holds the wrapping key"},
    {"seal.keyLabel", "KMSD_SEAL_KEY_LABEL", "seal-key-label", T_STRING, "kmsd-root-wrap", IMM,
     C(seal.key_label), F(seal.keyLabel), 0, 0, NULL, "LABEL",
     "CKA_LABEL of the AES-256 wrapping key (created by operator init when missing)"},
    {"seal.pinFile", "KMSD_SEAL_PIN_FILE", "seal-pin-file", T_PATH, "", IMM, C(seal.pin_file),
     F(seal.pinFile), 0, 0, NULL, "FILE", "file whose first line is the token's user PIN"},
    {"seal.pin", "KMSD_PKCS11_PIN", "seal-pin", T_STRING, "", IMM | KMS_OPT_SENSITIVE,
     C(seal.pin), F(seal.pin), 0, 0, NULL, "PIN",
     "the token's user PIN (prefer seal.pinFile or the environment; never logged)"},
    {"seal.retryMax", "KMSD_SEAL_RETRY_MAX", "seal-retry-max", T_DURATION, "30s", IMM,
     C(seal.retry_max_ms), F(seal.retryMax), 100, MS_MAX, NULL, "DURATION",
     "longest wait between auto-unseal attempts while the HSM is unreachable"},
    {"logLevel", "KMSD_LOG_LEVEL", "log-level", T_ENUM, "info", IMM, C(log_level),
     F(logLevel), 0, 0, log_level_names, "debug|info|warn|error", "minimum log level"},
    {"memoryLock", "KMSD_MEMORY_LOCK", "memory-lock", T_BOOL, "true", IMM, C(memory_lock),
     F(memoryLock), 0, 0, NULL, "BOOL",
     "mlockall() the whole process so no key or share is ever swapped out"},
    {"auditFile", "KMSD_AUDIT_FILE", "audit-file", T_STRING, "", IMM, C(audit_file),
     F(auditFile), 0, 0, NULL, "FILE",
     "hash-chained audit log (empty = <dataDir>/audit.log); kmsctl audit verify checks it"},
};
#define N_OPTS (sizeof(opts) / sizeof(opts[0]))

/* ------------------------------------------------------------------ */
/* Where a value came from, for error messages.                        */

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
    struct origin origin[N_OPTS]; /* of each option's current value */
    struct loc *locs;
    size_t n_locs, cap_locs;
    char cyaml_msg[256];   /* first libcyaml error, captured by the log fn */
    char cyaml_field[64];  /* innermost mapping field in its backtrace */
    unsigned cyaml_line;   /* and its line */
};

static unsigned loc_line(const struct loader *l, const char *path)
{
    for (size_t i = 0; i < l->n_locs; i++) {
        if (strcmp(l->locs[i].path, path) == 0) {
            return l->locs[i].line;
        }
    }
    return 0;
}

/* Formats the one-line error. `what` names the option or list element
 * ("talos.listen", "initialCluster[1].id"); for env and flags the variable
 * or flag name replaces it, since that is what the user typed. */
__attribute__((format(printf, 5, 0)))
static int failv(struct loader *l, const struct opt *o, struct origin org, const char *what,
                 const char *fmt, va_list ap)
{
    char detail[384];
    vsnprintf(detail, sizeof(detail), fmt, ap);
    switch (org.kind) {
    case SRC_FILE:
        if (org.line > 0) {
            return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: %s: %s", l->file, org.line,
                               what, detail);
        }
        return kms_err_set(l->err, KMS_ECONFIG, "config %s: %s: %s", l->file, what, detail);
    case SRC_ENV:
        return kms_err_set(l->err, KMS_ECONFIG, "%s: %s", o->env, detail);
    case SRC_FLAG:
        return kms_err_set(l->err, KMS_ECONFIG, "--%s: %s", o->flag, detail);
    case SRC_DEFAULT:
    default:
        if (l->file != NULL) {
            return kms_err_set(l->err, KMS_ECONFIG, "config %s: %s: %s", l->file, what, detail);
        }
        return kms_err_set(l->err, KMS_ECONFIG, "--%s: %s", o->flag, detail);
    }
}

static int fail(struct loader *l, const struct opt *o, struct origin org, const char *what,
                const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int fail(struct loader *l, const struct opt *o, struct origin org, const char *what,
                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = failv(l, o, org, what, fmt, ap);
    va_end(ap);
    return rc;
}

/* Fails about an option's current value (cross-field checks). */
static int fail_opt(struct loader *l, const struct opt *o, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail_opt(struct loader *l, const struct opt *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = failv(l, o, l->origin[o - opts], o->name, fmt, ap);
    va_end(ap);
    return rc;
}

static const struct opt *opt_by_name(const char *name)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        if (strcmp(opts[i].name, name) == 0) {
            return &opts[i];
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Strict scalar parsers. They write a short reason into `why`.         */

/* Leading digits of s as a u64; *end after them. -1 on none or overflow. */
static int parse_digits(const char *s, uint64_t *out, const char **end)
{
    uint64_t v = 0;
    const char *p = s;
    if (!isdigit((unsigned char)*p)) {
        return -1;
    }
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) {
            return -1;
        }
        v = v * 10 + d;
    }
    *out = v;
    *end = p;
    return 0;
}

static int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                     size_t wn)
{
    const char *end;
    uint64_t v;
    if (parse_digits(s, &v, &end) != 0 || *end != '\0') {
        snprintf(why, wn, "invalid number \"%s\"", s);
        return -1;
    }
    if (v < min || v > max) {
        snprintf(why, wn, "%s out of range %llu..%llu", s, (unsigned long long)min,
                 (unsigned long long)max);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_bool(const char *s, bool *out, char *why, size_t wn)
{
    if (strcmp(s, "true") == 0) {
        *out = true;
        return 0;
    }
    if (strcmp(s, "false") == 0) {
        *out = false;
        return 0;
    }
    snprintf(why, wn, "invalid boolean \"%s\" (true or false)", s);
    return -1;
}

static int parse_duration(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                          size_t wn)
{
    static const struct {
        const char *unit;
        uint64_t ms;
    } units[] = {{"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}};
    const char *end;
    uint64_t v;
    if (parse_digits(s, &v, &end) == 0) {
        for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
            if (strcmp(end, units[i].unit) == 0) {
                if (v > UINT64_MAX / units[i].ms) {
                    break;
                }
                v *= units[i].ms;
                if (v < min || v > max) {
                    snprintf(why, wn, "duration %s out of range %llums..%llums", s,
                             (unsigned long long)min, (unsigned long long)max);
                    return -1;
                }
                *out = v;
                return 0;
            }
        }
    }
    snprintf(why, wn, "invalid duration \"%s\" (e.g. 500ms, 3s, 1m)", s);
    return -1;
}

static int parse_size(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                      size_t wn)
{
    static const struct {
        const char *unit;
        uint64_t mul;
    } units[] = {{"", 1}, {"B", 1}, {"KiB", 1024}, {"MiB", 1024 * 1024},
                 {"GiB", 1024 * 1024 * 1024}};
    const char *end;
    uint64_t v;
    if (parse_digits(s, &v, &end) == 0) {
        for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
            if (strcmp(end, units[i].unit) == 0) {
                if (v > UINT64_MAX / units[i].mul) {
                    break;
                }
                v *= units[i].mul;
                if (v < min || v > max) {
                    snprintf(why, wn, "size %s out of range %llu..%llu bytes", s,
                             (unsigned long long)min, (unsigned long long)max);
                    return -1;
                }
                *out = v;
                return 0;
            }
        }
    }
    snprintf(why, wn, "invalid size \"%s\" (e.g. 4096, 4KiB, 1MiB)", s);
    return -1;
}

/* A DNS name or IPv4 literal: letters, digits, '-', '.', '_'. */
static bool valid_hostname(const char *h, size_t n)
{
    if (n == 0 || n > 253) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)h[i];
        if (!isalnum(c) && c != '-' && c != '.' && c != '_') {
            return false;
        }
    }
    return true;
}

/* host:port, :port (unless need_host) or [v6]:port. */
static int parse_addr(const char *s, bool need_host, char *why, size_t wn)
{
    const char *colon;
    const char *port;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        char v6[64];
        struct in6_addr a;
        if (rb == NULL || rb[1] != ':' || (size_t)(rb - s - 1) >= sizeof(v6)) {
            goto bad;
        }
        memcpy(v6, s + 1, (size_t)(rb - s - 1));
        v6[rb - s - 1] = '\0';
        if (inet_pton(AF_INET6, v6, &a) != 1) {
            snprintf(why, wn, "invalid IPv6 address \"%s\"", v6);
            return -1;
        }
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL || memchr(s, ':', (size_t)(colon - s)) != NULL) {
            goto bad; /* no port, or a bare IPv6 literal */
        }
        if (colon == s) {
            if (need_host) {
                snprintf(why, wn, "address \"%s\" needs a host", s);
                return -1;
            }
        } else if (!valid_hostname(s, (size_t)(colon - s))) {
            snprintf(why, wn, "invalid host in \"%s\"", s);
            return -1;
        }
    }
    port = colon + 1;
    {
        uint64_t p;
        const char *end;
        if (parse_digits(port, &p, &end) != 0 || *end != '\0' || p < 1 || p > 65535 ||
            strlen(port) > 5) {
            snprintf(why, wn, "invalid port \"%s\"", port);
            return -1;
        }
    }
    return 0;
bad:
    snprintf(why, wn, "invalid address \"%s\" (host:port, :port or [v6]:port)", s);
    return -1;
}

static int parse_cidr(const char *s, struct kms_config_cidr *c, char *why, size_t wn)
{
    char host[64];
    const char *slash = strchr(s, '/');
    uint64_t prefix;
    const char *end;
    bool v4;
    if (slash == NULL || (size_t)(slash - s) >= sizeof(host)) {
        goto bad;
    }
    memcpy(host, s, (size_t)(slash - s));
    host[slash - s] = '\0';
    memset(c->addr, 0, sizeof(c->addr));
    v4 = strchr(host, ':') == NULL;
    if (v4) {
        c->addr[10] = 0xff;
        c->addr[11] = 0xff;
        if (inet_pton(AF_INET, host, c->addr + 12) != 1) {
            goto bad;
        }
    } else if (inet_pton(AF_INET6, host, c->addr) != 1) {
        goto bad;
    }
    if (parse_digits(slash + 1, &prefix, &end) != 0 || *end != '\0' || strlen(slash + 1) > 3 ||
        prefix > (v4 ? 32u : 128u)) {
        goto bad;
    }
    c->prefix = (unsigned)prefix + (v4 ? 96u : 0u);
    /* Host bits must be zero: "10.0.0.1/8" is more likely a typo than an
     * intent, and matching would silently use 10.0.0.0/8 anyway. */
    for (unsigned bit = c->prefix; bit < 128; bit++) {
        if (c->addr[bit / 8] & (0x80u >> (bit % 8))) {
            snprintf(why, wn, "CIDR \"%s\" has host bits set", s);
            return -1;
        }
    }
    return 0;
bad:
    snprintf(why, wn, "invalid CIDR \"%s\"", s);
    return -1;
}

static int parse_enum(const char *s, const char *const *names, int *out, char *why, size_t wn)
{
    size_t used = 0;
    for (int i = 0; names[i] != NULL; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    used = (size_t)snprintf(why, wn, "invalid value \"%s\" (", s);
    for (int i = 0; names[i] != NULL && used < wn; i++) {
        used += (size_t)snprintf(why + used, wn - used, "%s%s", i ? " | " : "", names[i]);
    }
    if (used < wn) {
        snprintf(why + used, wn - used, ")");
    }
    return -1;
}

/* ------------------------------------------------------------------ */
/* Applying values.                                                    */

static void free_peers(struct kms_config *cfg)
{
    for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
        free(cfg->initial_cluster[i].raft);
        free(cfg->initial_cluster[i].cluster);
    }
    free(cfg->initial_cluster);
    cfg->initial_cluster = NULL;
    cfg->n_initial_cluster = 0;
}

static void free_cidrs(struct kms_config *cfg)
{
    for (size_t i = 0; i < cfg->n_allowed_cidrs; i++) {
        free(cfg->allowed_cidrs[i].text);
    }
    free(cfg->allowed_cidrs);
    cfg->allowed_cidrs = NULL;
    cfg->n_allowed_cidrs = 0;
}

static void free_uuids(struct kms_config *cfg)
{
    for (size_t i = 0; i < cfg->n_uuid_allow_list; i++) {
        free(cfg->uuid_allow_list[i]);
    }
    free(cfg->uuid_allow_list);
    cfg->uuid_allow_list = NULL;
    cfg->n_uuid_allow_list = 0;
}

static int set_string(struct loader *l, const struct opt *o, const char *v)
{
    char **field = (char **)((char *)l->cfg + o->cfg_off);
    char *copy = strdup(v);
    if (copy == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    free(*field);
    *field = copy;
    return 0;
}

/* Appends one initialCluster entry (the list was emptied by the caller). */
static int add_peer(struct loader *l, const struct opt *o, struct origin org, const char *what,
                    const char *id, const char *raft, const char *cluster)
{
    struct kms_config *cfg = l->cfg;
    struct kms_config_peer *p;
    char why[256];
    uint64_t v;
    if (cfg->n_initial_cluster >= KMS_CONFIG_MAX_PEERS) {
        return fail(l, o, org, what, "more than %d members", KMS_CONFIG_MAX_PEERS);
    }
    if (id == NULL || raft == NULL || cluster == NULL) {
        return fail(l, o, org, what, "needs id, raft and cluster");
    }
    if (parse_u64(id, 1, UINT64_C(1) << 63, &v, why, sizeof(why)) != 0 ||
        parse_addr(raft, true, why, sizeof(why)) != 0 ||
        parse_addr(cluster, true, why, sizeof(why)) != 0) {
        return fail(l, o, org, what, "%s", why);
    }
    for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
        if (cfg->initial_cluster[i].id == v) {
            return fail(l, o, org, what, "duplicate id %llu", (unsigned long long)v);
        }
    }
    if (cfg->initial_cluster == NULL) {
        cfg->initial_cluster = calloc(KMS_CONFIG_MAX_PEERS, sizeof(*cfg->initial_cluster));
        if (cfg->initial_cluster == NULL) {
            return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        }
    }
    p = &cfg->initial_cluster[cfg->n_initial_cluster];
    p->id = v;
    p->raft = strdup(raft);
    p->cluster = strdup(cluster);
    cfg->n_initial_cluster++; /* counted first so free_peers frees a half entry */
    if (p->raft == NULL || p->cluster == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    return 0;
}

static int add_cidr(struct loader *l, const struct opt *o, struct origin org, const char *what,
                    const char *s)
{
    struct kms_config *cfg = l->cfg;
    struct kms_config_cidr c;
    char why[256];
    if (cfg->n_allowed_cidrs >= KMS_CONFIG_MAX_CIDRS) {
        return fail(l, o, org, what, "more than %d CIDRs", KMS_CONFIG_MAX_CIDRS);
    }
    if (parse_cidr(s, &c, why, sizeof(why)) != 0) {
        return fail(l, o, org, what, "%s", why);
    }
    if (cfg->allowed_cidrs == NULL) {
        cfg->allowed_cidrs = calloc(KMS_CONFIG_MAX_CIDRS, sizeof(*cfg->allowed_cidrs));
        if (cfg->allowed_cidrs == NULL) {
            return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        }
    }
    c.text = strdup(s);
    if (c.text == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    cfg->allowed_cidrs[cfg->n_allowed_cidrs++] = c;
    return 0;
}

static int add_uuid(struct loader *l, const struct opt *o, struct origin org, const char *what,
                    const char *s)
{
    struct kms_config *cfg = l->cfg;
    size_t n = strlen(s);
    if (cfg->n_uuid_allow_list >= KMS_CONFIG_MAX_UUIDS) {
        return fail(l, o, org, what, "more than %d UUIDs", KMS_CONFIG_MAX_UUIDS);
    }
    /* Same rule as Seal's node_uuid (talos_api.c): 1..128 printable bytes. */
    if (n == 0 || n > KMS_CONFIG_MAX_UUID_LEN) {
        return fail(l, o, org, what, "UUID must be 1..%d bytes", KMS_CONFIG_MAX_UUID_LEN);
    }
    for (size_t i = 0; i < n; i++) {
        if (!isprint((unsigned char)s[i]) || s[i] == ',') {
            return fail(l, o, org, what, "invalid UUID \"%s\"", s);
        }
    }
    if (cfg->uuid_allow_list == NULL) {
        cfg->uuid_allow_list = calloc(KMS_CONFIG_MAX_UUIDS, sizeof(char *));
        if (cfg->uuid_allow_list == NULL) {
            return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        }
    }
    cfg->uuid_allow_list[cfg->n_uuid_allow_list] = strdup(s);
    if (cfg->uuid_allow_list[cfg->n_uuid_allow_list] == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    cfg->n_uuid_allow_list++;
    return 0;
}

/* A list option given as one string (default, env, flag): comma-separated,
 * initialCluster entries as ID=RAFT@CLUSTER. Replaces the whole list. */
static int apply_list_string(struct loader *l, const struct opt *o, struct origin org,
                             const char *v)
{
    char *copy = strdup(v);
    char *save = NULL;
    int rc = 0;
    if (copy == NULL) {
        rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        goto out;
    }
    if (o->type == T_PEERS) {
        free_peers(l->cfg);
    } else if (o->type == T_CIDRS) {
        free_cidrs(l->cfg);
    } else {
        free_uuids(l->cfg);
    }
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        if (o->type == T_PEERS) {
            char *eq = strchr(tok, '=');
            char *at = eq != NULL ? strchr(eq, '@') : NULL;
            if (eq == NULL || at == NULL) {
                rc = fail(l, o, org, o->name, "invalid member \"%s\" (ID=RAFT@CLUSTER)", tok);
                goto out;
            }
            *eq = '\0';
            *at = '\0';
            rc = add_peer(l, o, org, o->name, tok, eq + 1, at + 1);
        } else if (o->type == T_CIDRS) {
            rc = add_cidr(l, o, org, o->name, tok);
        } else {
            rc = add_uuid(l, o, org, o->name, tok);
        }
        if (rc != 0) {
            goto out;
        }
    }
out:
    free(copy);
    return rc;
}

/* Parses v for option o and stores it; `org` says where v came from. */
static int apply_string(struct loader *l, const struct opt *o, struct origin org, const char *v)
{
    void *field = (char *)l->cfg + o->cfg_off;
    char why[256];
    uint64_t u;
    int rc = 0;
    why[0] = '\0';
    switch (o->type) {
    case T_U64:
        if (parse_u64(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(uint64_t *)field = u;
        }
        break;
    case T_UINT:
        if (parse_u64(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(unsigned *)field = (unsigned)u;
        }
        break;
    case T_BOOL:
        (void)parse_bool(v, (bool *)field, why, sizeof(why));
        break;
    case T_DURATION:
        if (parse_duration(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(unsigned *)field = (unsigned)u;
        }
        break;
    case T_SIZE:
        if (parse_size(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(uint64_t *)field = u;
        }
        break;
    case T_ADDR:
        if (!(v[0] == '\0' && (o->flags & O_EMPTY_OK))) {
            (void)parse_addr(v, false, why, sizeof(why));
        }
        if (why[0] == '\0') {
            rc = set_string(l, o, v);
        }
        break;
    case T_STRING:
    case T_PATH:
        rc = set_string(l, o, v);
        break;
    case T_ENUM: {
        int idx;
        if (parse_enum(v, o->enums, &idx, why, sizeof(why)) == 0) {
            if (o->cfg_off == C(unseal_reads)) {
                l->cfg->unseal_reads = (enum kms_unseal_reads)idx;
            } else {
                *(int *)field = idx;
            }
        }
        break;
    }
    case T_PEERS:
    case T_CIDRS:
    case T_UUIDS:
        rc = apply_list_string(l, o, org, v);
        break;
    }
    if (rc == 0 && why[0] != '\0') {
        rc = fail(l, o, org, o->name, "%s", why);
    }
    if (rc == 0) {
        l->origin[o - opts] = org;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* The file.                                                           */

static int loc_add(struct loader *l, const char *path, unsigned line)
{
    if (l->n_locs == l->cap_locs) {
        size_t cap = l->cap_locs ? l->cap_locs * 2 : 64;
        struct loc *n = realloc(l->locs, cap * sizeof(*n));
        if (n == NULL) {
            return -1;
        }
        l->locs = n;
        l->cap_locs = cap;
    }
    l->locs[l->n_locs].path = strdup(path);
    if (l->locs[l->n_locs].path == NULL) {
        return -1;
    }
    l->locs[l->n_locs].line = line;
    l->n_locs++;
    return 0;
}

/*
 * Walks the YAML events once, recording the line of each mapping key and
 * sequence entry by path. Also where syntax errors are reported, with
 * libyaml's line. Nesting deeper than ours is recorded but not needed.
 */
static int index_lines(struct loader *l, const unsigned char *buf, size_t len)
{
    enum { MAXD = 16 };
    struct frame {
        bool seq;
        bool want_key; /* mapping: next scalar is a key */
        unsigned idx;  /* sequence: next entry index */
        size_t plen;   /* path length at this frame */
    } st[MAXD];
    int depth = -1;
    char path[512] = "";
    yaml_parser_t p;
    yaml_event_t ev;
    bool done = false;
    int rc = 0;

    if (!yaml_parser_initialize(&p)) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    yaml_parser_set_input_string(&p, buf, len);
    while (!done) {
        if (!yaml_parser_parse(&p, &ev)) {
            rc = kms_err_set(l->err, KMS_ECONFIG, "config %s:%zu: syntax error: %s", l->file,
                             p.problem_mark.line + 1, p.problem ? p.problem : "invalid YAML");
            goto out;
        }
        unsigned line = (unsigned)ev.start_mark.line + 1;
        bool is_value_start = ev.type == YAML_SCALAR_EVENT ||
                              ev.type == YAML_MAPPING_START_EVENT ||
                              ev.type == YAML_SEQUENCE_START_EVENT ||
                              ev.type == YAML_ALIAS_EVENT;
        /* In a sequence, each value starts an entry "path[i]". */
        if (is_value_start && depth >= 0 && st[depth].seq) {
            size_t n = strlen(path);
            snprintf(path + n, sizeof(path) - n, "[%u]", st[depth].idx++);
            if (loc_add(l, path, line) != 0) {
                rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
                yaml_event_delete(&ev);
                goto out;
            }
        }
        switch (ev.type) {
        case YAML_SCALAR_EVENT:
            if (depth >= 0 && !st[depth].seq && st[depth].want_key) {
                size_t n = st[depth].plen;
                snprintf(path + n, sizeof(path) - n, "%s%s", n ? "." : "",
                         (const char *)ev.data.scalar.value);
                if (loc_add(l, path, line) != 0) {
                    rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
                    yaml_event_delete(&ev);
                    goto out;
                }
                st[depth].want_key = false;
                break;
            }
            /* A value: back to the frame's own path. */
            if (depth >= 0) {
                path[st[depth].plen] = '\0';
                st[depth].want_key = true;
            }
            break;
        case YAML_ALIAS_EVENT:
            if (depth >= 0) {
                path[st[depth].plen] = '\0';
                st[depth].want_key = true;
            }
            break;
        case YAML_MAPPING_START_EVENT:
        case YAML_SEQUENCE_START_EVENT:
            if (depth + 1 >= MAXD) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: nested too deeply",
                                 l->file, line);
                yaml_event_delete(&ev);
                goto out;
            }
            depth++;
            st[depth].seq = ev.type == YAML_SEQUENCE_START_EVENT;
            st[depth].want_key = true;
            st[depth].idx = 0;
            st[depth].plen = strlen(path);
            break;
        case YAML_MAPPING_END_EVENT:
        case YAML_SEQUENCE_END_EVENT:
            depth--;
            if (depth >= 0) {
                path[st[depth].plen] = '\0';
                st[depth].want_key = true;
            }
            break;
        case YAML_STREAM_END_EVENT:
            done = true;
            break;
        default:
            break;
        }
        yaml_event_delete(&ev);
    }
out:
    yaml_parser_delete(&p);
    return rc;
}

/* libcyaml reports problems only through its log callback: keep the first
 * error line, which says what is wrong, and the first "in mapping field
 * 'x' (line: N" backtrace line, which says where. */
static void cyaml_capture(cyaml_log_t level, void *ctx, const char *fmt, va_list args)
{
    struct loader *l = ctx;
    char line[256];
    const char *p;
    if (level < CYAML_LOG_ERROR) {
        return;
    }
    /* libcyaml hands us its own format string. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    vsnprintf(line, sizeof(line), fmt, args);
#pragma GCC diagnostic pop
    line[strcspn(line, "\n")] = '\0';
    if (l->cyaml_msg[0] == '\0') {
        memcpy(l->cyaml_msg, line, sizeof(line));
    } else if (l->cyaml_field[0] == '\0' && (p = strstr(line, "in mapping field '")) != NULL) {
        unsigned ln = 0;
        const char *q;
        p += strlen("in mapping field '");
        q = strchr(p, '\'');
        if (q != NULL && (size_t)(q - p) < sizeof(l->cyaml_field)) {
            memcpy(l->cyaml_field, p, (size_t)(q - p));
            l->cyaml_field[q - p] = '\0';
            if ((q = strstr(q, "(line: ")) != NULL && sscanf(q, "(line: %u", &ln) == 1) {
                l->cyaml_line = ln;
            }
        }
    }
}

/* libcyaml's event names, in the words of a config file. */
static const char *shape(const char *ev)
{
    if (strncmp(ev, "SCALAR", 6) == 0 || strncmp(ev, "STRING", 6) == 0) {
        return "a scalar";
    }
    if (strncmp(ev, "MAPPING", 7) == 0) {
        return "a mapping";
    }
    if (strncmp(ev, "SEQUENCE", 8) == 0) {
        return "a list";
    }
    return ev;
}

/* Full path of the key named `field`, preferring the one on `line`. */
static const struct loc *find_key(const struct loader *l, const char *field, unsigned line)
{
    const struct loc *any = NULL;
    for (size_t i = 0; i < l->n_locs; i++) {
        const char *last = strrchr(l->locs[i].path, '.');
        last = last ? last + 1 : l->locs[i].path;
        if (strcmp(last, field) != 0) {
            continue;
        }
        if (l->locs[i].line == line) {
            return &l->locs[i];
        }
        if (any == NULL) {
            any = &l->locs[i];
        }
    }
    return any;
}

/* Turns a libcyaml failure into our one line. */
static int cyaml_failure(struct loader *l, cyaml_err_t cerr)
{
    const char *m = l->cyaml_msg;
    const char *key;
    const struct loc *at;
    char what[160];
    if (strncmp(m, "Load: ", 6) == 0) {
        m += 6;
    }
    /* "Unexpected key: nodeID": its line comes from our own index. */
    if (cerr == CYAML_ERR_INVALID_KEY && (key = strstr(m, "key: ")) != NULL) {
        key += 5;
        if ((at = find_key(l, key, 0)) != NULL) {
            return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: unknown key \"%s\"",
                               l->file, at->line, key);
        }
        return kms_err_set(l->err, KMS_ECONFIG, "config %s: unknown key \"%s\"", l->file, key);
    }
    /* "Mapping field already seen: nodeId": the second occurrence of a
     * path in our index is the duplicate. */
    if ((key = strstr(m, "already seen: ")) != NULL) {
        key += 14;
        for (size_t i = 0; i < l->n_locs; i++) {
            for (size_t j = 0; j < i; j++) {
                const char *last = strrchr(l->locs[i].path, '.');
                last = last ? last + 1 : l->locs[i].path;
                if (strcmp(l->locs[i].path, l->locs[j].path) == 0 && strcmp(last, key) == 0) {
                    return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: duplicate key \"%s\"",
                                       l->file, l->locs[i].line, l->locs[i].path);
                }
            }
        }
        return kms_err_set(l->err, KMS_ECONFIG, "config %s: duplicate key \"%s\"", l->file, key);
    }
    /* "Expecting STRING, got event: SEQUENCE_START" */
    if (strncmp(m, "Expecting ", 10) == 0 && strstr(m, ", got event: ") != NULL) {
        snprintf(what, sizeof(what), "expected %s, got %s", shape(m + 10),
                 shape(strstr(m, ", got event: ") + 13));
        m = what;
    }
    if (l->cyaml_field[0] != '\0') {
        at = find_key(l, l->cyaml_field, l->cyaml_line);
        return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: %s: %s", l->file,
                           at ? at->line : l->cyaml_line, at ? at->path : l->cyaml_field,
                           m[0] ? m : cyaml_strerror(cerr));
    }
    return kms_err_set(l->err, KMS_ECONFIG, "config %s: %s", l->file,
                       m[0] ? m : cyaml_strerror(cerr));
}

static int read_file(struct loader *l, unsigned char **buf, size_t *len)
{
    FILE *f = fopen(l->file, "rb");
    unsigned char *b = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    if (f == NULL) {
        rc = kms_err_set(l->err, KMS_ECONFIG, "config %s: cannot open: %s", l->file,
                         strerror(errno));
        goto out;
    }
    for (;;) {
        if (n == cap) {
            /* A config is a few KiB; refuse absurd inputs rather than eat RAM. */
            if (cap >= (1u << 20)) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "config %s: larger than 1 MiB", l->file);
                goto out;
            }
            cap = cap ? cap * 2 : 4096;
            unsigned char *nb = realloc(b, cap + 1);
            if (nb == NULL) {
                rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
                goto out;
            }
            b = nb;
        }
        size_t got = fread(b + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "config %s: cannot read: %s", l->file,
                                 strerror(errno));
                goto out;
            }
            break;
        }
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    b = NULL;
out:
    if (f != NULL) {
        fclose(f);
    }
    free(b);
    return rc;
}

static struct origin file_origin(const struct loader *l, const char *path)
{
    struct origin o = {SRC_FILE, loc_line(l, path)};
    return o;
}

static int apply_file_lists(struct loader *l, const struct f_doc *d)
{
    char what[64];
    int rc = 0;
    if (d->initialCluster != NULL) {
        const struct opt *o = opt_by_name("initialCluster");
        free_peers(l->cfg);
        for (unsigned i = 0; i < d->initialCluster_count && rc == 0; i++) {
            const struct f_peer *p = &d->initialCluster[i];
            snprintf(what, sizeof(what), "initialCluster[%u]", i);
            rc = add_peer(l, o, file_origin(l, what), what, p->id, p->raft, p->cluster);
        }
        l->origin[o - opts] = file_origin(l, "initialCluster");
    }
    if (rc == 0 && d->enrolment.allowedCIDRs != NULL) {
        const struct opt *o = opt_by_name("enrolment.allowedCIDRs");
        free_cidrs(l->cfg);
        for (unsigned i = 0; i < d->enrolment.allowedCIDRs_count && rc == 0; i++) {
            snprintf(what, sizeof(what), "enrolment.allowedCIDRs[%u]", i);
            rc = add_cidr(l, o, file_origin(l, what), what, d->enrolment.allowedCIDRs[i]);
        }
        l->origin[o - opts] = file_origin(l, o->name);
    }
    if (rc == 0 && d->enrolment.uuidAllowList != NULL) {
        const struct opt *o = opt_by_name("enrolment.uuidAllowList");
        free_uuids(l->cfg);
        for (unsigned i = 0; i < d->enrolment.uuidAllowList_count && rc == 0; i++) {
            snprintf(what, sizeof(what), "enrolment.uuidAllowList[%u]", i);
            rc = add_uuid(l, o, file_origin(l, what), what, d->enrolment.uuidAllowList[i]);
        }
        l->origin[o - opts] = file_origin(l, o->name);
    }
    return rc;
}

static int load_file(struct loader *l)
{
    static const cyaml_config_t base = {
        .log_fn = cyaml_capture,
        .mem_fn = cyaml_mem,
        .log_level = CYAML_LOG_ERROR,
        .flags = CYAML_CFG_NO_ALIAS,
    };
    cyaml_config_t ccfg = base;
    unsigned char *buf = NULL;
    size_t len = 0;
    struct f_doc *doc = NULL;
    cyaml_err_t cerr;
    int rc;

    if ((rc = read_file(l, &buf, &len)) != 0 || (rc = index_lines(l, buf, len)) != 0) {
        goto out;
    }
    ccfg.log_ctx = l;
    cerr = cyaml_load_data(buf, len, &ccfg, &doc_schema, (cyaml_data_t **)&doc, NULL);
    if (cerr != CYAML_OK) {
        rc = cyaml_failure(l, cerr);
        goto out;
    }
    if (doc == NULL) {
        goto out; /* empty document: defaults only */
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *v;
        if (opts[i].file_off == NOF) {
            continue;
        }
        v = *(char *const *)((const char *)doc + opts[i].file_off);
        if (v != NULL && (rc = apply_string(l, &opts[i], file_origin(l, opts[i].name), v)) != 0) {
            goto out;
        }
    }
    rc = apply_file_lists(l, doc);
out:
    if (doc != NULL) {
        cyaml_free(&ccfg, &doc_schema, doc, 0);
    }
    free(buf);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Environment and flags.                                              */

static int load_env(struct loader *l, char **envp)
{
    int rc = 0;
    if (envp == NULL) {
        goto out;
    }
    for (size_t i = 0; i < N_OPTS && rc == 0; i++) {
        size_t n = strlen(opts[i].env);
        for (char **e = envp; *e != NULL; e++) {
            if (strncmp(*e, opts[i].env, n) == 0 && (*e)[n] == '=') {
                struct origin org = {SRC_ENV, 0};
                /* The first match wins, as with glibc getenv. */
                rc = apply_string(l, &opts[i], org, *e + n + 1);
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
            known = strlen(opts[i].env) == len && strncmp(*e, opts[i].env, len) == 0;
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

static const struct opt *opt_by_flag(const char *name, size_t n)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        if (strlen(opts[i].flag) == n && strncmp(opts[i].flag, name, n) == 0) {
            return &opts[i];
        }
    }
    return NULL;
}

/* First pass: the flags that decide what to load (--config, --help,
 * --version, --check-config, --dump-config); the option flags are applied
 * after the environment. */
static int scan_meta_flags(struct loader *l, int argc, char **argv, const char **file)
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

static int load_flags(struct loader *l, int argc, char **argv)
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
        if ((rc = apply_string(l, o, org, val)) != 0) {
            goto out;
        }
    }
out:
    return rc;
}

/* ------------------------------------------------------------------ */
/* Whole-configuration checks.                                         */

static const char *opt_str(const struct kms_config *cfg, const char *name)
{
    const struct opt *o = opt_by_name(name);
    return *(char *const *)((const char *)cfg + o->cfg_off);
}

/* "host:port" with a concrete host (not empty or a wildcard) can be
 * advertised as is. */
static bool concrete_host(const char *addr)
{
    return addr[0] != ':' && strncmp(addr, "0.0.0.0:", 8) != 0 && strncmp(addr, "[::]:", 5) != 0;
}

/* Fills an empty advertise address from this node's initialCluster entry,
 * else from the listen address when it names a host. */
static int derive_advertise(struct loader *l, const char *adv_name, const char *listen_name,
                            const struct kms_config_peer *self, bool is_raft, bool needed)
{
    const struct opt *o = opt_by_name(adv_name);
    const char *listen = opt_str(l->cfg, listen_name);
    const char *from = NULL;
    if (opt_str(l->cfg, adv_name)[0] != '\0') {
        return 0;
    }
    if (self != NULL) {
        from = is_raft ? self->raft : self->cluster;
    } else if (concrete_host(listen)) {
        from = listen;
    } else if (needed) {
        return fail_opt(l, o, "required when %s (\"%s\") has no host and initialCluster "
                              "does not list this node", listen_name, listen);
    } else {
        return 0;
    }
    return set_string(l, o, from);
}

static int validate(struct loader *l)
{
    struct kms_config *cfg = l->cfg;
    const struct kms_config_peer *self = NULL;
    int rc = 0;

    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &opts[i];
        if ((o->flags & KMS_OPT_REQUIRED) && l->origin[i].kind == SRC_DEFAULT) {
            rc = fail_opt(l, o, "required");
            goto out;
        }
        if ((o->type == T_STRING || o->type == T_PATH) && (o->flags & KMS_OPT_REQUIRED) &&
            opt_str(cfg, o->name)[0] == '\0') {
            rc = fail_opt(l, o, "must not be empty");
            goto out;
        }
    }

    if (cfg->talos.plaintext) {
        if (cfg->talos.cert_file[0] != '\0' || cfg->talos.key_file[0] != '\0') {
            rc = fail_opt(l, opt_by_name(cfg->talos.cert_file[0] ? "talos.certFile"
                                                                  : "talos.keyFile"),
                          "must be empty when talos.plaintext is true");
            goto out;
        }
        if (cfg->talos.tls12) {
            rc = fail_opt(l, opt_by_name("talos.tls12"),
                          "only meaningful with TLS (talos.plaintext is true)");
            goto out;
        }
    } else if (cfg->talos.cert_file[0] == '\0' || cfg->talos.key_file[0] == '\0') {
        rc = fail_opt(l, opt_by_name(cfg->talos.cert_file[0] ? "talos.keyFile"
                                                              : "talos.certFile"),
                      "required unless talos.plaintext is true");
        goto out;
    }

    for (size_t i = 0; i < N_OPTS; i++) {
        const char *path;
        if (opts[i].type != T_PATH) {
            continue;
        }
        path = opt_str(cfg, opts[i].name);
        if (path[0] != '\0' && access(path, R_OK) != 0) {
            rc = fail_opt(l, &opts[i], "cannot read \"%s\": %s", path, strerror(errno));
            goto out;
        }
    }

    if (cfg->seal.type == KMS_SEAL_PKCS11) {
        const char *missing = cfg->seal.module[0] == '\0'        ? "seal.module"
                              : cfg->seal.token_label[0] == '\0' ? "seal.tokenLabel"
                              : cfg->seal.key_label[0] == '\0'   ? "seal.keyLabel"
                                                                 : NULL;
        if (missing != NULL) {
            rc = fail_opt(l, opt_by_name(missing), "required when seal.type is pkcs11");
            goto out;
        }
        if (cfg->seal.pin_file[0] == '\0' && cfg->seal.pin[0] == '\0') {
            rc = fail_opt(l, opt_by_name("seal.pinFile"),
                          "required when seal.type is pkcs11 (or set KMSD_PKCS11_PIN)");
            goto out;
        }
        if (strlen(cfg->seal.token_label) > 32 || strlen(cfg->seal.key_label) > 32) {
            rc = fail_opt(l, opt_by_name(strlen(cfg->seal.token_label) > 32 ? "seal.tokenLabel"
                                                                           : "seal.keyLabel"),
                          "at most 32 bytes (a PKCS#11 label)");
            goto out;
        }
    }

    if (cfg->raft.heartbeat_timeout_ms >= cfg->raft.election_timeout_ms) {
        rc = fail_opt(l, opt_by_name("raft.heartbeatTimeout"),
                      "must be less than raft.electionTimeout (%ums)",
                      cfg->raft.election_timeout_ms);
        goto out;
    }

    for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
        if (cfg->initial_cluster[i].id == cfg->node_id) {
            self = &cfg->initial_cluster[i];
        }
    }
    if (cfg->n_initial_cluster > 0 && self == NULL) {
        rc = fail_opt(l, opt_by_name("initialCluster"), "does not contain nodeId %llu",
                      (unsigned long long)cfg->node_id);
        goto out;
    }

    if ((rc = derive_advertise(l, "raft.advertise", "raft.listen", self, true, true)) != 0 ||
        (rc = derive_advertise(l, "cluster.advertise", "cluster.listen", self, false, true)) !=
            0 ||
        (rc = derive_advertise(l, "talos.advertise", "talos.listen", NULL, false, false)) != 0) {
        goto out;
    }
out:
    return rc;
}

/* ------------------------------------------------------------------ */
/* Public API.                                                         */

void kms_config_free(struct kms_config *cfg)
{
    if (cfg == NULL) {
        return;
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &opts[i];
        if (o->type == T_STRING || o->type == T_PATH || o->type == T_ADDR) {
            free(*(char **)((char *)cfg + o->cfg_off));
        }
    }
    free_peers(cfg);
    free_cidrs(cfg);
    free_uuids(cfg);
    free(cfg->config_file);
    memset(cfg, 0, sizeof(*cfg));
}

int kms_config_load(struct kms_config *cfg, int argc, char **argv, char **envp,
                    struct kms_err *err)
{
    struct loader *l = calloc(1, sizeof(*l));
    const char *file = NULL;
    int rc = 0;

    memset(cfg, 0, sizeof(*cfg));
    if (l == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "config: out of memory");
        goto out;
    }
    l->cfg = cfg;
    l->err = err;
    if ((rc = scan_meta_flags(l, argc, argv, &file)) != 0) {
        goto out;
    }
    if (cfg->help) {
        kms_config_usage(stdout, argc > 0 ? argv[0] : "kmsd");
        goto out;
    }
    if (cfg->version) {
        goto out;
    }
    if (file == NULL && envp != NULL) {
        for (char **e = envp; *e != NULL; e++) {
            if (strncmp(*e, "KMSD_CONFIG=", 12) == 0) {
                file = *e + 12;
                break;
            }
        }
    }
    if (file != NULL && file[0] != '\0') {
        if ((cfg->config_file = strdup(file)) == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "config: out of memory");
            goto out;
        }
        l->file = cfg->config_file;
    }

    for (size_t i = 0; i < N_OPTS; i++) {
        struct origin org = {SRC_DEFAULT, 0};
        const char *def = opts[i].def;
        /* Required options have no default; give strings a "" placeholder so
         * every string field is non-NULL, without marking them as set. */
        if (def == NULL && (opts[i].type == T_STRING || opts[i].type == T_PATH)) {
            def = "";
        }
        if (def != NULL && (rc = apply_string(l, &opts[i], org, def)) != 0) {
            goto out;
        }
    }
    if (l->file != NULL && (rc = load_file(l)) != 0) {
        goto out;
    }
    if ((rc = load_env(l, envp)) != 0 || (rc = load_flags(l, argc, argv)) != 0 ||
        (rc = validate(l)) != 0) {
        goto out;
    }
out:
    if (l != NULL) {
        for (size_t i = 0; i < l->n_locs; i++) {
            free(l->locs[i].path);
        }
        free(l->locs);
        free(l);
    }
    if (rc != 0) {
        kms_config_free(cfg);
        /* Messages quote offending values: keep them one printable line
         * (a quoted YAML scalar may hold newlines and control bytes). */
        for (char *c = err != NULL ? err->msg : NULL; c != NULL && *c != '\0'; c++) {
            if ((unsigned char)*c < 0x20 || *c == 0x7f) {
                *c = ' ';
            }
        }
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Dump and usage.                                                     */

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
        !(o->type == T_STRING && (*(char *const *)((const char *)cfg + o->cfg_off))[0] ==
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
    const void *field = (const char *)cfg + o->cfg_off;
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
        int idx = o->cfg_off == C(unseal_reads) ? (int)cfg->unseal_reads : *(const int *)field;
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
        const struct opt *o = &opts[i];
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
        fprintf(f, "%s%s:%s", indent, key, list_len(cfg, o) > 0 && !redacted(cfg, o, extra) ? "" : " ");
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
            "  --help                    print this help and exit\n"
            "\n",
            prog, prog, prog);
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &opts[i];
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
