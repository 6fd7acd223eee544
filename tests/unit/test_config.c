/*
 * Configuration: file, defaults, precedence, every error's exact one-line
 * message, dump redaction and round trip, --help coverage.
 *
 * Fixtures live in tests/unit/configs (KMS_TEST_CONFIG_DIR); the tests chdir
 * there so the relative certificate paths in them resolve.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kms_config.h"
#include "kms_log.h"

#ifndef KMS_TEST_CONFIG_DIR
#error "KMS_TEST_CONFIG_DIR must name tests/unit/configs"
#endif

static char *no_env[] = {NULL};

/* Loads with argv built from the NULL-terminated varargs after argv[0]. */
static int load(struct kms_config *cfg, struct kms_err *err, char **envp, ...)
{
    char *argv[32] = {"kmsd"};
    int argc = 1;
    va_list ap;
    va_start(ap, envp);
    for (char *a = va_arg(ap, char *); a != NULL && argc < 31; a = va_arg(ap, char *)) {
        argv[argc++] = a;
    }
    va_end(ap);
    kms_err_clear(err);
    return kms_config_load(cfg, argc, argv, envp, err);
}

static int setup(void **state)
{
    (void)state;
    return chdir(KMS_TEST_CONFIG_DIR);
}

static void test_full_file(void **state)
{
    struct kms_config c;
    struct kms_err e;
    (void)state;
    assert_int_equal(load(&c, &e, no_env, "--config", "full.yaml", NULL), 0);
    assert_string_equal(c.config_file, "full.yaml");
    assert_false(c.check_only);
    assert_int_equal(c.node_id, 2);
    assert_string_equal(c.data_dir, "/var/lib/kmsd-test");
    assert_string_equal(c.talos.listen, "10.0.0.2:5050");
    assert_string_equal(c.talos.advertise, "kms.example.com:5050");
    assert_string_equal(c.talos.cert_file, "pki/talos.pem");
    assert_string_equal(c.talos.key_file, "pki/talos.key");
    assert_false(c.talos.plaintext);
    assert_true(c.talos.tls12);
    assert_int_equal(c.talos.max_message_bytes, 8192);
    assert_int_equal(c.talos.workers, 4);
    assert_string_equal(c.cluster.listen, ":5051");
    assert_string_equal(c.cluster.advertise, "10.0.0.2:5051");
    assert_string_equal(c.raft.listen, "[::]:5052");
    assert_string_equal(c.raft.advertise, "[fd00::2]:5052");
    assert_int_equal(c.raft.election_timeout_ms, 2000);
    assert_int_equal(c.raft.heartbeat_timeout_ms, 250);
    assert_int_equal(c.raft.snapshot_threshold, 1000);
    assert_int_equal(c.raft.snapshot_trailing, 100);
    assert_string_equal(c.http.listen, "127.0.0.1:5053");
    assert_string_equal(c.tls.node_cert_file, "pki/node.pem");
    assert_string_equal(c.tls.node_key_file, "pki/node.key");
    assert_string_equal(c.tls.cluster_ca_file, "pki/cluster-ca.pem");
    assert_string_equal(c.tls.operator_ca_file, "pki/operator-ca.pem");
    assert_int_equal(c.n_initial_cluster, 3);
    assert_int_equal(c.initial_cluster[0].id, 1);
    assert_string_equal(c.initial_cluster[0].raft, "10.0.0.1:5052");
    assert_string_equal(c.initial_cluster[0].cluster, "10.0.0.1:5051");
    assert_int_equal(c.initial_cluster[1].id, 2);
    assert_string_equal(c.initial_cluster[1].raft, "[fd00::2]:5052");
    assert_int_equal(c.initial_cluster[2].id, 3);
    assert_string_equal(c.initial_cluster[2].cluster, "kms-3.example.com:5051");
    assert_int_equal(c.unseal_reads, KMS_UNSEAL_READS_LOCAL);
    assert_int_equal(c.lease_grace_ms, 60000);
    assert_int_equal(c.request_wait_ms, 4000);
    assert_int_equal(c.failed_unseals_per_minute, 5);
    assert_int_equal(c.n_allowed_cidrs, 2);
    assert_string_equal(c.allowed_cidrs[0].text, "10.0.0.0/8");
    assert_int_equal(c.allowed_cidrs[0].prefix, 104);
    assert_int_equal(c.allowed_cidrs[0].addr[10], 0xff);
    assert_int_equal(c.allowed_cidrs[0].addr[12], 10);
    assert_int_equal(c.allowed_cidrs[1].prefix, 8);
    assert_int_equal(c.allowed_cidrs[1].addr[0], 0xfd);
    assert_int_equal(c.n_uuid_allow_list, 2);
    assert_string_equal(c.uuid_allow_list[0], "4c4c4544-0042-3510-8052-b7c04f333231");
    assert_int_equal(c.log_level, KMS_LOG_DEBUG);
    kms_config_free(&c);
    kms_config_free(&c); /* idempotent */
}

static void test_defaults(void **state)
{
    struct kms_config c;
    struct kms_err e;
    (void)state;
    assert_int_equal(load(&c, &e, no_env, "--config", "minimal.yaml", "--check-config", NULL),
                     0);
    assert_true(c.check_only);
    assert_int_equal(c.node_id, 1);
    assert_string_equal(c.talos.listen, ":4050");
    assert_string_equal(c.talos.advertise, ""); /* ":4050" has no host to advertise */
    assert_string_equal(c.talos.cert_file, "");
    assert_true(c.talos.plaintext);
    assert_false(c.talos.tls12);
    assert_int_equal(c.talos.max_message_bytes, 4096);
    assert_int_equal(c.talos.workers, 0);
    assert_string_equal(c.cluster.listen, ":4051");
    assert_string_equal(c.raft.listen, ":4052");
    assert_int_equal(c.raft.election_timeout_ms, 1000);
    assert_int_equal(c.raft.heartbeat_timeout_ms, 100);
    assert_int_equal(c.raft.snapshot_threshold, 8192);
    assert_int_equal(c.raft.snapshot_trailing, 2048);
    assert_string_equal(c.http.listen, ":4053");
    assert_int_equal(c.n_initial_cluster, 0);
    assert_null(c.initial_cluster);
    assert_int_equal(c.unseal_reads, KMS_UNSEAL_READS_LEASE);
    assert_int_equal(c.lease_grace_ms, 3000);
    assert_int_equal(c.request_wait_ms, 5000);
    assert_int_equal(c.failed_unseals_per_minute, 30);
    assert_int_equal(c.n_allowed_cidrs, 0);
    assert_int_equal(c.n_uuid_allow_list, 0);
    assert_int_equal(c.log_level, KMS_LOG_INFO);
    kms_config_free(&c);
}

/* Advertise addresses come from this node's initialCluster entry. */
static void test_advertise_derived(void **state)
{
    struct kms_config c;
    struct kms_err e;
    char *env[] = {"KMSD_NODE_ID=2",
                   "KMSD_INITIAL_CLUSTER=1=10.0.0.1:4052@10.0.0.1:4051,"
                   "2=10.0.0.2:4052@10.0.0.2:4051",
                   NULL};
    (void)state;
    assert_int_equal(load(&c, &e, env, "--config", "minimal.yaml", "--raft-advertise=",
                          "--cluster-advertise", "", "--talos-listen", "10.9.9.9:4050", NULL),
                     0);
    assert_int_equal(c.n_initial_cluster, 2);
    assert_string_equal(c.raft.advertise, "10.0.0.2:4052");
    assert_string_equal(c.cluster.advertise, "10.0.0.2:4051");
    assert_string_equal(c.talos.advertise, "10.9.9.9:4050");
    kms_config_free(&c);
}

static void test_env_overrides_file(void **state)
{
    struct kms_config c;
    struct kms_err e;
    char *env[] = {"PATH=/bin",
                   "KMSD_TALOS_LISTEN=127.0.0.1:6050",
                   "KMSD_RAFT_ELECTION_TIMEOUT=3s",
                   "KMSD_UNSEAL_READS=lease",
                   "KMSD_ENROLMENT_ALLOWED_CIDRS=192.168.0.0/16,::1/128",
                   "KMSD_ENROLMENT_UUID_ALLOW_LIST=a,b,c",
                   "KMSD_INITIAL_CLUSTER=2=10.1.0.2:1@10.1.0.2:2",
                   "KMSD_NOT_AN_OPTION=ignored",
                   NULL};
    (void)state;
    assert_int_equal(load(&c, &e, env, "--config", "full.yaml", NULL), 0);
    assert_string_equal(c.talos.listen, "127.0.0.1:6050");
    assert_int_equal(c.raft.election_timeout_ms, 3000);
    assert_int_equal(c.unseal_reads, KMS_UNSEAL_READS_LEASE);
    assert_int_equal(c.n_allowed_cidrs, 2);
    assert_int_equal(c.allowed_cidrs[0].prefix, 112);
    assert_int_equal(c.allowed_cidrs[1].prefix, 128);
    assert_int_equal(c.n_uuid_allow_list, 3);
    assert_string_equal(c.uuid_allow_list[2], "c");
    assert_int_equal(c.n_initial_cluster, 1);
    assert_string_equal(c.initial_cluster[0].raft, "10.1.0.2:1");
    assert_string_equal(c.initial_cluster[0].cluster, "10.1.0.2:2");
    /* Untouched by env: still from the file. */
    assert_int_equal(c.raft.heartbeat_timeout_ms, 250);
    kms_config_free(&c);
}

static void test_flag_overrides_env(void **state)
{
    struct kms_config c;
    struct kms_err e;
    char *env[] = {"KMSD_TALOS_LISTEN=127.0.0.1:6050", "KMSD_NODE_ID=3",
                   "KMSD_CONFIG=full.yaml", NULL};
    (void)state;
    assert_int_equal(load(&c, &e, env, "--talos-listen", "127.0.0.1:7050", "--node-id=2",
                          "--talos-tls12=false", "--log-level", "error", NULL),
                     0);
    assert_string_equal(c.config_file, "full.yaml"); /* from KMSD_CONFIG */
    assert_string_equal(c.talos.listen, "127.0.0.1:7050");
    assert_int_equal(c.node_id, 2);
    assert_false(c.talos.tls12);
    assert_int_equal(c.log_level, KMS_LOG_ERROR);
    kms_config_free(&c);
}

/* Everything from flags alone, no file. */
static void test_flags_only(void **state)
{
    struct kms_config c;
    struct kms_err e;
    (void)state;
    assert_int_equal(load(&c, &e, NULL, "--node-id", "9223372036854775808", "--data-dir", "/d",
                          "--talos-plaintext", "--tls-node-cert-file", "pki/node.pem",
                          "--tls-node-key-file", "pki/node.key", "--tls-cluster-ca-file",
                          "pki/cluster-ca.pem", "--tls-operator-ca-file",
                          "pki/operator-ca.pem", "--raft-listen", "127.0.0.1:4052",
                          "--cluster-listen", "127.0.0.1:4051", NULL),
                     0);
    assert_null(c.config_file);
    assert_true(c.node_id == (UINT64_C(1) << 63));
    assert_true(c.talos.plaintext);
    assert_string_equal(c.raft.advertise, "127.0.0.1:4052");
    kms_config_free(&c);
}

struct bad_case {
    const char *file;
    const char *msg;
};

static void test_bad_files(void **state)
{
    static const struct bad_case cases[] = {
        {"bad-unknown-key.yaml", "config bad-unknown-key.yaml:3: unknown key \"nodeID\""},
        {"bad-port-suffix.yaml",
         "config bad-port-suffix.yaml:5: talos.listen: invalid port \"4050x\""},
        {"bad-port-zero.yaml", "config bad-port-zero.yaml:4: raft.listen: invalid port \"0\""},
        {"bad-port-range.yaml",
         "config bad-port-range.yaml:4: cluster.listen: invalid port \"70000\""},
        {"bad-duration.yaml", "config bad-duration.yaml:4: raft.electionTimeout: invalid "
                              "duration \"1sec\" (e.g. 500ms, 3s, 1m)"},
        {"bad-heartbeat.yaml", "config bad-heartbeat.yaml:13: raft.heartbeatTimeout: must be "
                               "less than raft.electionTimeout (500ms)"},
        {"bad-unseal-reads.yaml",
         "config bad-unseal-reads.yaml:3: unsealReads: invalid value \"stale\" (lease | local)"},
        {"bad-dup-id.yaml", "config bad-dup-id.yaml:6: initialCluster[2]: duplicate id 1"},
        {"bad-self-missing.yaml",
         "config bad-self-missing.yaml:10: initialCluster: does not contain nodeId 4"},
        {"bad-cidr.yaml",
         "config bad-cidr.yaml:6: enrolment.allowedCIDRs[1]: invalid CIDR \"10.0.0.0/33\""},
        {"missing.yaml", "config missing.yaml: cannot open: No such file or directory"},
        {"bad-no-node-id.yaml", "config bad-no-node-id.yaml: nodeId: required"},
        {"bad-syntax.yaml", "config bad-syntax.yaml:5: syntax error: did not find expected key"},
        {"bad-bool.yaml",
         "config bad-bool.yaml:4: talos.tls12: invalid boolean \"yes\" (true or false)"},
        {"bad-tls12-plaintext.yaml", "config bad-tls12-plaintext.yaml:5: talos.tls12: only "
                                     "meaningful with TLS (talos.plaintext is true)"},
        {"bad-missing-keyfile.yaml",
         "config bad-missing-keyfile.yaml:7: tls.nodeKeyFile: cannot read \"pki/missing.key\": "
         "No such file or directory"},
        {"bad-node-id.yaml", "config bad-node-id.yaml:1: nodeId: invalid number \"0x10\""},
        {"bad-shape.yaml",
         "config bad-shape.yaml:4: talos.listen: expected a scalar, got a list"},
        /* control characters in a quoted value become spaces: one line */
        {"bad-multiline-value.yaml",
         "config bad-multiline-value.yaml:4: raft.listen: invalid address \"127.0.0.1:40   x:  "
         "y\" (host:port, :port or [v6]:port)"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct kms_config c;
        struct kms_err e;
        int rc = load(&c, &e, no_env, "--config", (char *)cases[i].file, NULL);
        if (rc != KMS_ECONFIG || strcmp(e.msg, cases[i].msg) != 0) {
            print_error("%s: rc %d, got  %s\n             want %s\n", cases[i].file, rc, e.msg,
                        cases[i].msg);
            fail();
        }
        assert_null(c.data_dir); /* cfg is left empty */
        kms_config_free(&c);
    }
}

static void expect_error(char **env, const char *msg, ...)
{
    char *argv[32] = {"kmsd"};
    int argc = 1;
    struct kms_config c;
    struct kms_err e;
    va_list ap;
    va_start(ap, msg);
    for (char *a = va_arg(ap, char *); a != NULL && argc < 31; a = va_arg(ap, char *)) {
        argv[argc++] = a;
    }
    va_end(ap);
    kms_err_clear(&e);
    assert_int_equal(kms_config_load(&c, argc, argv, env, &e), KMS_ECONFIG);
    if (strcmp(e.msg, msg) != 0) {
        print_error("got  %s\nwant %s\n", e.msg, msg);
        fail();
    }
    kms_config_free(&c);
}

static void test_bad_env_and_flags(void **state)
{
    char *env_addr[] = {"KMSD_RAFT_LISTEN=x", NULL};
    char *env_peers[] = {"KMSD_INITIAL_CLUSTER=1=a:1@b:2,1=c:1@d:2", NULL};
    char *env_peer_syntax[] = {"KMSD_INITIAL_CLUSTER=1=a:1", NULL};
    char *env_v6[] = {"KMSD_HTTP_LISTEN=[fe80::zz]:1", NULL};
    (void)state;
    expect_error(env_addr, "KMSD_RAFT_LISTEN: invalid address \"x\" (host:port, :port or "
                           "[v6]:port)", NULL);
    expect_error(env_peers, "KMSD_INITIAL_CLUSTER: duplicate id 1", NULL);
    expect_error(env_peer_syntax,
                 "KMSD_INITIAL_CLUSTER: invalid member \"1=a:1\" (ID=RAFT@CLUSTER)", NULL);
    expect_error(env_v6, "KMSD_HTTP_LISTEN: invalid IPv6 address \"fe80::zz\"", NULL);
    expect_error(NULL, "--node-id: required", NULL);
    expect_error(NULL, "--node-id: 0 out of range 1..9223372036854775808", "--node-id", "0",
                 NULL);
    expect_error(NULL, "--node-id: missing value", "--data-dir", "/d", "--node-id", NULL);
    expect_error(NULL, "--nope: unknown flag (see --help)", "--nope=1", NULL);
    expect_error(NULL, "unexpected argument \"stray\" (see --help)", "stray", NULL);
    expect_error(NULL, "--config: missing value", "--config", NULL);
    expect_error(NULL, "--raft-heartbeat-timeout: duration 1h out of range 10ms..10000ms",
                 "--raft-heartbeat-timeout", "1h", NULL);
    expect_error(NULL, "--talos-max-message-bytes: invalid size \"4k\" (e.g. 4096, 4KiB, 1MiB)",
                 "--talos-max-message-bytes", "4k", NULL);
    expect_error(NULL, "--enrolment-allowed-cidrs: CIDR \"10.0.0.1/8\" has host bits set",
                 "--enrolment-allowed-cidrs", "10.0.0.1/8", NULL);
    expect_error(NULL, "--raft-listen: invalid port \"99999999999999999999999\"",
                 "--raft-listen", ":99999999999999999999999", NULL);
    expect_error(NULL, "--raft-listen: invalid address \"::1:5\" (host:port, :port or "
                       "[v6]:port)", "--raft-listen", "::1:5", NULL);
    /* Cross-field rules name the option and where its value came from. */
    expect_error(NULL, "--talos-key-file: required unless talos.plaintext is true",
                 "--node-id", "1", "--data-dir", "/d", "--tls-node-cert-file", "pki/node.pem",
                 "--tls-node-key-file", "pki/node.key", "--tls-cluster-ca-file",
                 "pki/cluster-ca.pem", "--tls-operator-ca-file", "pki/operator-ca.pem",
                 "--talos-cert-file", "pki/talos.pem", NULL);
    expect_error(NULL, "--raft-advertise: required when raft.listen "
                       "(\":4052\") has no host and initialCluster does not list this node",
                 "--config", "minimal.yaml", "--raft-advertise=", NULL);
    expect_error(NULL, "--talos-cert-file: must be empty when talos.plaintext is true",
                 "--config", "minimal.yaml", "--talos-cert-file", "pki/talos.pem", NULL);
}

static char *dump_to_string(const struct kms_config *c, const char *const *extra)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    assert_int_equal(kms_config_dump_redacting(c, f, extra), 0);
    fclose(f);
    return buf;
}

static void test_dump_redacts(void **state)
{
    static const char *const extra[] = {"tls.nodeKeyFile", "talos.keyFile", NULL};
    struct kms_config c;
    struct kms_err e;
    char *plain;
    char *red;
    (void)state;
    assert_int_equal(load(&c, &e, no_env, "--config", "full.yaml", NULL), 0);
    plain = dump_to_string(&c, NULL);
    assert_non_null(strstr(plain, "  nodeKeyFile: \"pki/node.key\"\n"));
    assert_null(strstr(plain, "<redacted>")); /* seal.pin (the one SENSITIVE option) unset */
    red = dump_to_string(&c, extra);
    assert_non_null(strstr(red, "  nodeKeyFile: \"<redacted>\"\n"));
    assert_non_null(strstr(red, "  keyFile: \"<redacted>\"\n"));
    assert_null(strstr(red, "pki/node.key"));
    assert_null(strstr(red, "pki/talos.key"));
    assert_non_null(strstr(red, "  nodeCertFile: \"pki/node.pem\"\n"));
    free(plain);
    free(red);
    kms_config_free(&c);
}

/* The dump is a config file that loads back to the same configuration. */
static void test_dump_round_trip(void **state)
{
    struct kms_config c, d;
    struct kms_err e;
    char path[] = "/tmp/kmsd-config-XXXXXX";
    char *first;
    char *second;
    int fd;
    (void)state;
    assert_int_equal(load(&c, &e, no_env, "--config", "full.yaml", NULL), 0);
    first = dump_to_string(&c, NULL);
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, first, strlen(first)), (ssize_t)strlen(first));
    close(fd);
    assert_int_equal(load(&d, &e, no_env, "--config", path, NULL), 0);
    second = dump_to_string(&d, NULL);
    assert_string_equal(first, second);
    unlink(path);
    free(first);
    free(second);
    kms_config_free(&c);
    kms_config_free(&d);
}

static void test_help_lists_every_option(void **state)
{
    static const char *const want[] = {
        "--node-id", "--data-dir", "--talos-listen", "--talos-advertise", "--talos-cert-file",
        "--talos-key-file", "--talos-plaintext", "--talos-tls12", "--talos-max-message-bytes",
        "--talos-workers", "--cluster-listen", "--cluster-advertise", "--raft-listen",
        "--raft-advertise", "--raft-election-timeout", "--raft-heartbeat-timeout",
        "--raft-snapshot-threshold", "--raft-snapshot-trailing", "--http-listen",
        "--tls-node-cert-file", "--tls-node-key-file", "--tls-cluster-ca-file",
        "--tls-operator-ca-file", "--initial-cluster", "--unseal-reads", "--lease-grace",
        "--request-wait", "--rate-limit-failed-unseals-per-minute",
        "--enrolment-allowed-cidrs", "--enrolment-uuid-allow-list", "--log-level",
        "--config", "--check-config", "--help", "KMSD_TLS_CLUSTER_CA_FILE",
        "yaml rateLimit.failedUnsealsPerMinute", "default \"100ms\"", NULL};
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    struct kms_config c;
    struct kms_err e;
    (void)state;
    assert_non_null(f);
    kms_config_usage(f, "kmsd");
    fclose(f);
    for (size_t i = 0; want[i] != NULL; i++) {
        if (strstr(buf, want[i]) == NULL) {
            print_error("--help lacks %s\n", want[i]);
            fail();
        }
    }
    /* Every key in the dump (the table) appears in the help. */
    free(buf);
    /* --help short-circuits loading: no file, no required options. */
    assert_int_equal(load(&c, &e, no_env, "--config", "missing.yaml", "--help", NULL), 0);
    assert_true(c.help);
    kms_config_free(&c);
}

/* --version short-circuits like --help; --dump-config loads and validates
 * everything (a bad file still fails) and only sets dump_only. */
static void test_version_and_dump_flags(void **state)
{
    struct kms_config c;
    struct kms_err e;
    (void)state;
    assert_int_equal(load(&c, &e, no_env, "--config", "missing.yaml", "--version", NULL), 0);
    assert_true(c.version);
    assert_false(c.dump_only);
    kms_config_free(&c);
    assert_int_equal(load(&c, &e, no_env, "--config", "minimal.yaml", "--dump-config", NULL),
                     0);
    assert_true(c.dump_only);
    assert_false(c.check_only);
    assert_false(c.version);
    assert_int_equal(c.node_id, 1);
    kms_config_free(&c);
    assert_int_not_equal(load(&c, &e, no_env, "--dump-config", "--config", "bad-dup-id.yaml",
                              NULL),
                         0);
    assert_non_null(strstr(e.msg, "duplicate id 1"));
    kms_config_free(&c);
}

/* The daemon reads the same members under its own names (d->opt), and the
 * values derived from them; durations take a fraction (kms_parse.h). */
static void test_daemon_view(void **state)
{
    struct kms_config c;
    struct kms_err e;
    (void)state;
    assert_int_equal(load(&c, &e, no_env, "--config", "full.yaml", NULL), 0);
    assert_ptr_equal(c.talos_listen, c.talos.listen);
    assert_ptr_equal(c.node_cert, c.tls.node_cert_file);
    assert_ptr_equal(c.peers, c.initial_cluster);
    assert_int_equal(c.n_peers, 3);
    assert_string_equal(c.peers[2].cluster_address, "kms-3.example.com:5051");
    assert_string_equal(c.peers[1].raft_address, "[fd00::2]:5052");
    assert_int_equal(c.n_cidrs, 2);
    assert_int_equal(c.cidrs[0].prefix, 104);
    assert_int_equal(c.n_uuids, 2);
    assert_int_equal(c.election_timeout_ms, 2000);
    assert_int_equal(c.talos_max_message, 8192);
    assert_true(c.unseal_reads_local);
    assert_false(c.seal_pkcs11);
    kms_config_free(&c);

    assert_int_equal(load(&c, &e, no_env, "--config", "minimal.yaml", "--raft-election-timeout",
                          "1.5s", "--lease-grace", "0.5m", NULL),
                     0);
    assert_int_equal(c.raft.election_timeout_ms, 1500);
    assert_int_equal(c.lease_grace_ms, 30000);
    assert_false(c.unseal_reads_local);
    kms_config_free(&c);
    expect_error(NULL, "--raft-election-timeout: invalid duration \"1.0005s\" (e.g. 500ms, 3s, "
                       "1m)", "--raft-election-timeout", "1.0005s", NULL);
    expect_error(NULL, "--raft-election-timeout: invalid duration \"2\" (e.g. 500ms, 3s, 1m)",
                 "--raft-election-timeout", "2", NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_file),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_advertise_derived),
        cmocka_unit_test(test_env_overrides_file),
        cmocka_unit_test(test_flag_overrides_env),
        cmocka_unit_test(test_flags_only),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_bad_env_and_flags),
        cmocka_unit_test(test_dump_redacts),
        cmocka_unit_test(test_dump_round_trip),
        cmocka_unit_test(test_help_lists_every_option),
        cmocka_unit_test(test_version_and_dump_flags),
        cmocka_unit_test(test_daemon_view),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
