/*
 * kms-raft-harness: runs one kmsd raft node (RocksDB store + kms_raft) and
 * takes line commands on stdin, answering each with one JSON line on stdout.
 * Logs go to stderr. Used by tests/integration/test_raft_*.py and
 * bench/bench_raft.py.
 *
 *   kms-raft-harness --id N --data DIR --addr HOST:PORT [--bind HOST:PORT]
 *       [--peers ID=HOST:PORT,...]   initial cluster (omit to join later)
 *       [--election-ms MS] [--heartbeat-ms MS]
 *       [--snapshot-threshold N] [--snapshot-trailing N]
 *       [--cert F --key F --ca F]     mutual-TLS raft transport
 *
 * Commands:
 *   ping                          {"ok":true}
 *   status                        raft + store status
 *   propose N SIZE K [TIMEOUT_MS] N PutRecord entries with SIZE-byte
 *                                 ciphertexts, K in flight; rate
 *   propose_dup N SIZE K [MS]     the same, every key proposed twice: one of
 *                                 each pair gets EEXIST, and every error
 *                                 result must name the op's own key
 *                                 ("mismatched" counts those that do not)
 *   digest                        store digest, applied index, record count
 *   wait_applied INDEX MS         read-your-writes wait
 *   add ID ADDR [MS] | remove ID [MS] | transfer ID [MS]
 *   reload                        re-read the raft TLS files
 *   fsyncprobe DIR N              N x (4 KiB write + fdatasync) rate
 *   quit                          graceful stop (also on EOF)
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kms_err.h"
#include "kms_raft.h"
#include "kms_store.h"
#include "kms_time.h"

#define MAX_PEERS 16

static struct kms_store *g_store;
static struct kms_raft *g_raft;
static uint64_t g_id;

/* Prints a JSON string literal (the messages we print are plain ASCII). */
static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            fputc('\\', f);
            fputc(c, f);
        } else if (c < 0x20 || c >= 0x7f) {
            fprintf(f, "\\u%04x", c);
        } else {
            fputc(c, f);
        }
    }
    fputc('"', f);
}

static void reply_result(int rc, const struct kms_err *err, uint64_t ms)
{
    printf("{\"ok\":%s,\"code\":\"%s\",\"ms\":%" PRIu64 ",\"error\":", rc == 0 ? "true" : "false",
           kms_errname(rc), ms);
    json_str(stdout, rc == 0 ? "" : err->msg);
    printf("}\n");
}

static void cmd_status(void)
{
    struct kms_raft_status st;
    kms_raft_status(g_raft, &st);
    printf("{\"id\":%" PRIu64 ",\"role\":\"%s\",\"term\":%" PRIu64 ",\"leader_id\":%" PRIu64
           ",\"leader_address\":",
           st.id, kms_raft_role_name(st.role), st.term, st.leader_id);
    json_str(stdout, st.leader_address);
    printf(",\"commit\":%" PRIu64 ",\"applied\":%" PRIu64 ",\"last_index\":%" PRIu64
           ",\"snapshot_index\":%" PRIu64 ",\"snapshots_restored\":%" PRIu64
           ",\"elections_won\":%" PRIu64 ",\"lease\":%s,\"last_leader_contact_ms\":%" PRId64
           ",\"store_applied\":%" PRIu64 ",\"store_count\":%" PRIu64 ",\"members\":[",
           st.commit_index, st.applied_index, st.last_index, st.snapshot_index,
           st.snapshots_restored, st.elections_won, st.lease ? "true" : "false",
           st.last_leader_contact_ms == UINT64_MAX ? (int64_t)-1
                                                   : (int64_t)st.last_leader_contact_ms,
           kms_store_applied_index(g_store), kms_store_count(g_store));
    for (size_t i = 0; i < st.n_members; i++) {
        printf("%s{\"id\":%" PRIu64 ",\"address\":", i ? "," : "", st.members[i].id);
        json_str(stdout, st.members[i].address);
        printf(",\"role\":\"%s\"}", kms_raft_member_role_name(st.members[i].role));
    }
    printf("]}\n");
}

/* ---------------------------------------------------------------- propose */

struct prop_run {
    uint64_t n;
    size_t size;
    unsigned timeout_ms;
    uint8_t prefix[8];
    _Atomic uint64_t next;
    _Atomic uint64_t committed, notleader, unavail, timedout, other, apply_errors;
    _Atomic uint64_t max_index;
    bool dup;                      /* seq 2i and 2i+1 propose the same key */
    _Atomic uint64_t mismatched;   /* an error result naming another key */
    pthread_mutex_t mu;
    char last_error[600];
    uint64_t lat_sum_us;
    uint64_t lat_max_us;
};

static void *prop_worker(void *arg)
{
    struct prop_run *pr = arg;
    uint8_t *ct = malloc(pr->size > 0 ? pr->size : 1);
    uint8_t key_id[16];
    uint8_t nonce[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};

    for (size_t i = 0; i < pr->size; i++) {
        ct[i] = (uint8_t)(i * 31u + 7u);
    }
    for (;;) {
        uint64_t seq = atomic_fetch_add(&pr->next, 1);
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        Kmsd__V1__PutRecord pr_op = KMSD__V1__PUT_RECORD__INIT;
        Kmsd__V1__SealedRecord rec = KMSD__V1__SEALED_RECORD__INIT;
        struct kms_raft_result res;
        struct kms_err err;
        uint64_t t0, dt;
        int rc;

        if (seq >= pr->n) {
            break;
        }
        memcpy(key_id, pr->prefix, 8);
        for (int b = 0; b < 8; b++) {
            uint64_t kseq = pr->dup ? seq / 2 : seq;
            key_id[8 + b] = (uint8_t)(kseq >> (56 - 8 * b));
        }
        rec.version = 1;
        rec.key_id.data = key_id;
        rec.key_id.len = sizeof(key_id);
        rec.node_uuid = "4c4c4544-0000-1000-8000-000000000000";
        rec.term = 1;
        rec.nonce.data = nonce;
        rec.nonce.len = sizeof(nonce);
        rec.ciphertext.data = ct;
        rec.ciphertext.len = pr->size;
        rec.created_at = kms_wall_ms();
        pr_op.record = &rec;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
        e.put_record = &pr_op;

        kms_err_clear(&err);
        t0 = kms_mono_ms();
        rc = kms_raft_propose(g_raft, &e, pr->timeout_ms, &res, &err);
        dt = kms_mono_ms() - t0;
        if (rc == 0) {
            uint64_t mi = atomic_load(&pr->max_index);
            atomic_fetch_add(&pr->committed, 1);
            while (res.index > mi && !atomic_compare_exchange_weak(&pr->max_index, &mi, res.index)) {
            }
            if (res.code != 0) {
                char hx[33];
                atomic_fetch_add(&pr->apply_errors, 1);
                for (int b = 0; b < 16; b++) {
                    snprintf(hx + 2 * b, 3, "%02x", key_id[b]);
                }
                if (strstr(res.msg, hx) == NULL) {
                    /* the result of another entry: a mapping bug */
                    atomic_fetch_add(&pr->mismatched, 1);
                }
            }
            pthread_mutex_lock(&pr->mu);
            pr->lat_sum_us += dt * 1000u;
            if (dt * 1000u > pr->lat_max_us) {
                pr->lat_max_us = dt * 1000u;
            }
            pthread_mutex_unlock(&pr->mu);
            continue;
        }
        pthread_mutex_lock(&pr->mu);
        snprintf(pr->last_error, sizeof(pr->last_error), "%s: %s", kms_errname(rc), err.msg);
        pthread_mutex_unlock(&pr->mu);
        if (rc == KMS_ENOTLEADER || rc == KMS_ESHUTDOWN) {
            atomic_fetch_add(&pr->notleader, 1);
            break;
        } else if (rc == KMS_EUNAVAIL) {
            atomic_fetch_add(&pr->unavail, 1);
        } else if (rc == KMS_ETIMEDOUT) {
            atomic_fetch_add(&pr->timedout, 1);
        } else {
            atomic_fetch_add(&pr->other, 1);
        }
    }
    free(ct);
    return NULL;
}

static void cmd_propose(uint64_t n, size_t size, unsigned k, unsigned timeout_ms, bool dup)
{
    struct prop_run *pr = calloc(1, sizeof(*pr));
    pthread_t th[256];
    uint64_t t0, ms;
    double rate;

    if (k == 0) {
        k = 1;
    }
    if (k > 256) {
        k = 256;
    }
    pr->n = n;
    pr->size = size;
    pr->timeout_ms = timeout_ms;
    pr->dup = dup;
    pthread_mutex_init(&pr->mu, NULL);
    if (getrandom(pr->prefix, sizeof(pr->prefix), 0) != (ssize_t)sizeof(pr->prefix)) {
        memset(pr->prefix, 0x5a, sizeof(pr->prefix));
    }
    t0 = kms_mono_ms();
    for (unsigned i = 0; i < k; i++) {
        pthread_create(&th[i], NULL, prop_worker, pr);
    }
    for (unsigned i = 0; i < k; i++) {
        pthread_join(th[i], NULL);
    }
    ms = kms_mono_ms() - t0;
    rate = ms > 0 ? (double)atomic_load(&pr->committed) * 1000.0 / (double)ms : 0.0;
    printf("{\"ok\":%s,\"n\":%" PRIu64 ",\"size\":%zu,\"inflight\":%u,\"committed\":%" PRIu64
           ",\"notleader\":%" PRIu64 ",\"unavail\":%" PRIu64 ",\"timedout\":%" PRIu64
           ",\"other\":%" PRIu64 ",\"apply_errors\":%" PRIu64 ",\"max_index\":%" PRIu64
           ",\"mismatched\":%" PRIu64 ",\"ms\":%" PRIu64 ",\"rate\":%.1f,\"lat_avg_ms\":%.2f,\"lat_max_ms\":%.1f,\"error\":",
           atomic_load(&pr->committed) == n ? "true" : "false", n, size, k,
           atomic_load(&pr->committed), atomic_load(&pr->notleader), atomic_load(&pr->unavail),
           atomic_load(&pr->timedout), atomic_load(&pr->other), atomic_load(&pr->apply_errors),
           atomic_load(&pr->max_index), atomic_load(&pr->mismatched), ms, rate,
           atomic_load(&pr->committed) ? (double)pr->lat_sum_us / 1000.0 /
                                             (double)atomic_load(&pr->committed)
                                       : 0.0,
           (double)pr->lat_max_us / 1000.0);
    json_str(stdout, pr->last_error);
    printf("}\n");
    pthread_mutex_destroy(&pr->mu);
    free(pr);
}

static void cmd_digest(void)
{
    uint8_t d[32];
    struct kms_err err;
    int rc;
    kms_err_clear(&err);
    rc = kms_store_digest(g_store, d, &err);
    if (rc != 0) {
        reply_result(rc, &err, 0);
        return;
    }
    printf("{\"ok\":true,\"digest\":\"");
    for (int i = 0; i < 32; i++) {
        printf("%02x", d[i]);
    }
    printf("\",\"applied\":%" PRIu64 ",\"count\":%" PRIu64 "}\n", kms_store_applied_index(g_store),
           kms_store_count(g_store));
}

static void cmd_fsyncprobe(const char *dir, unsigned n)
{
    char path[4096];
    char buf[4096];
    uint64_t t0, ms;
    int fd;
    snprintf(path, sizeof(path), "%s/fsync-probe.tmp", dir);
    fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0) {
        printf("{\"ok\":false,\"error\":\"open failed\"}\n");
        return;
    }
    memset(buf, 0xab, sizeof(buf));
    t0 = kms_mono_ms();
    for (unsigned i = 0; i < n; i++) {
        if (pwrite(fd, buf, sizeof(buf), (off_t)i * (off_t)sizeof(buf)) !=
                (ssize_t)sizeof(buf) ||
            fdatasync(fd) != 0) {
            break;
        }
    }
    ms = kms_mono_ms() - t0;
    close(fd);
    unlink(path);
    printf("{\"ok\":true,\"n\":%u,\"ms\":%" PRIu64 ",\"rate\":%.1f}\n", n, ms,
           ms > 0 ? (double)n * 1000.0 / (double)ms : 0.0);
}

/* ---------------------------------------------------------------- main */

static int parse_peers(const char *s, struct kms_raft_peer *peers, size_t *n)
{
    char buf[4096];
    char *save = NULL;
    snprintf(buf, sizeof(buf), "%s", s);
    *n = 0;
    for (char *tok = strtok_r(buf, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (eq == NULL || *n >= MAX_PEERS) {
            return -1;
        }
        *eq = '\0';
        peers[*n].id = strtoull(tok, NULL, 10);
        snprintf(peers[*n].address, sizeof(peers[*n].address), "%s", eq + 1);
        (*n)++;
    }
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: kms-raft-harness --id N --data DIR --addr HOST:PORT [--bind HOST:PORT]\n"
                    "  [--peers ID=HOST:PORT,...] [--election-ms MS] [--heartbeat-ms MS]\n"
                    "  [--snapshot-threshold N] [--snapshot-trailing N]\n"
                    "  [--cert FILE --key FILE --ca FILE]\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"id", required_argument, NULL, 'i'},
        {"data", required_argument, NULL, 'd'},
        {"addr", required_argument, NULL, 'a'},
        {"bind", required_argument, NULL, 'b'},
        {"peers", required_argument, NULL, 'p'},
        {"election-ms", required_argument, NULL, 'e'},
        {"heartbeat-ms", required_argument, NULL, 'h'},
        {"snapshot-threshold", required_argument, NULL, 's'},
        {"snapshot-trailing", required_argument, NULL, 't'},
        {"cert", required_argument, NULL, 'C'},
        {"key", required_argument, NULL, 'K'},
        {"ca", required_argument, NULL, 'A'},
        {NULL, 0, NULL, 0},
    };
    struct kms_raft_config cfg;
    struct kms_raft_peer peers[MAX_PEERS];
    struct kms_err err;
    char store_dir[4096];
    char line[4096];
    int c, rc;

    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    memset(&cfg, 0, sizeof(cfg));
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'i':
            cfg.id = strtoull(optarg, NULL, 10);
            break;
        case 'd':
            cfg.data_dir = optarg;
            break;
        case 'a':
            cfg.raft_address = optarg;
            break;
        case 'b':
            cfg.bind_address = optarg;
            break;
        case 'p':
            if (parse_peers(optarg, peers, &cfg.n_initial) != 0) {
                usage();
                return 2;
            }
            cfg.initial_cluster = peers;
            break;
        case 'e':
            cfg.election_timeout_ms = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'h':
            cfg.heartbeat_timeout_ms = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 's':
            cfg.snapshot_threshold = strtoull(optarg, NULL, 10);
            break;
        case 't':
            cfg.snapshot_trailing = strtoull(optarg, NULL, 10);
            break;
        case 'C':
            cfg.cert_file = optarg;
            break;
        case 'K':
            cfg.key_file = optarg;
            break;
        case 'A':
            cfg.ca_file = optarg;
            break;
        default:
            usage();
            return 2;
        }
    }
    if (cfg.id == 0 || cfg.data_dir == NULL || cfg.raft_address == NULL) {
        usage();
        return 2;
    }
    g_id = cfg.id;
    kms_err_clear(&err);
    if (mkdir(cfg.data_dir, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "cannot create %s: %s\n", cfg.data_dir, strerror(errno));
        return 1;
    }
    snprintf(store_dir, sizeof(store_dir), "%s/store", cfg.data_dir);
    if ((rc = kms_store_open(store_dir, &g_store, &err)) != 0) {
        fprintf(stderr, "store: %s\n", err.msg);
        printf("{\"ok\":false,\"ready\":false,\"error\":");
        json_str(stdout, err.msg);
        printf("}\n");
        return 1;
    }
    if ((rc = kms_raft_start(&cfg, g_store, &g_raft, &err)) != 0) {
        fprintf(stderr, "raft: %s\n", err.msg);
        printf("{\"ok\":false,\"ready\":false,\"error\":");
        json_str(stdout, err.msg);
        printf("}\n");
        kms_store_close(g_store);
        return 1;
    }
    printf("{\"ok\":true,\"ready\":true,\"id\":%" PRIu64 "}\n", g_id);

    while (fgets(line, sizeof(line), stdin) != NULL) {
        char cmd[64] = "", a1[512] = "", a2[512] = "", a3[64] = "", a4[64] = "";
        int n = sscanf(line, "%63s %511s %511s %63s %63s", cmd, a1, a2, a3, a4);
        uint64_t t0 = kms_mono_ms();
        if (n <= 0) {
            continue;
        }
        kms_err_clear(&err);
        if (strcmp(cmd, "ping") == 0) {
            printf("{\"ok\":true}\n");
        } else if (strcmp(cmd, "status") == 0) {
            cmd_status();
        } else if ((strcmp(cmd, "propose") == 0 || strcmp(cmd, "propose_dup") == 0) && n >= 3) {
            cmd_propose(strtoull(a1, NULL, 10), (size_t)strtoul(a2, NULL, 10),
                        n >= 4 ? (unsigned)strtoul(a3, NULL, 10) : 1,
                        n >= 5 ? (unsigned)strtoul(a4, NULL, 10) : 5000,
                        strcmp(cmd, "propose_dup") == 0);
        } else if (strcmp(cmd, "digest") == 0) {
            cmd_digest();
        } else if (strcmp(cmd, "lease") == 0) {
            printf("{\"ok\":true,\"lease\":%s}\n", kms_raft_lease_valid(g_raft) ? "true" : "false");
        } else if (strcmp(cmd, "wait_applied") == 0 && n >= 3) {
            rc = kms_raft_wait_applied(g_raft, strtoull(a1, NULL, 10),
                                       (unsigned)strtoul(a2, NULL, 10));
            kms_err_set(&err, rc, NULL);
            reply_result(rc, &err, kms_mono_ms() - t0);
        } else if (strcmp(cmd, "add") == 0 && n >= 3) {
            rc = kms_raft_add(g_raft, strtoull(a1, NULL, 10), a2,
                              n >= 4 ? (unsigned)strtoul(a3, NULL, 10) : 30000, &err);
            reply_result(rc, &err, kms_mono_ms() - t0);
        } else if (strcmp(cmd, "remove") == 0 && n >= 2) {
            rc = kms_raft_remove(g_raft, strtoull(a1, NULL, 10),
                                 n >= 3 ? (unsigned)strtoul(a2, NULL, 10) : 10000, &err);
            reply_result(rc, &err, kms_mono_ms() - t0);
        } else if (strcmp(cmd, "transfer") == 0 && n >= 2) {
            rc = kms_raft_transfer(g_raft, strtoull(a1, NULL, 10),
                                   n >= 3 ? (unsigned)strtoul(a2, NULL, 10) : 10000, &err);
            reply_result(rc, &err, kms_mono_ms() - t0);
        } else if (strcmp(cmd, "reload") == 0) {
            rc = kms_raft_reload_tls(g_raft, &err);
            reply_result(rc, &err, kms_mono_ms() - t0);
        } else if (strcmp(cmd, "fsyncprobe") == 0 && n >= 3) {
            cmd_fsyncprobe(a1, (unsigned)strtoul(a2, NULL, 10));
        } else if (strcmp(cmd, "quit") == 0) {
            break;
        } else {
            printf("{\"ok\":false,\"error\":\"unknown command\"}\n");
        }
    }
    kms_raft_stop(g_raft);
    kms_store_close(g_store);
    printf("{\"ok\":true,\"stopped\":true}\n");
    return 0;
}
