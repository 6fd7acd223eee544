/*
 * HTTP endpoints (:4053) with libmicrohttpd:
 *   /healthz  200 while the process runs (liveness)
 *   /readyz   200 when this node serves Talos (unsealed, lease or grace), else 503
 *   /metrics  Prometheus text format
 * No secret is ever exposed here; the endpoint is unauthenticated, so bind
 * it to a management network.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <microhttpd.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms_connlimit.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kmsd_seal.h"
#include "kmsd.h"
#include "kmsd_audit.h"
#include "kmsd_http.h"


static enum MHD_Result respond(struct MHD_Connection *c, unsigned code, const char *type,
                               const char *body)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), (void *)body,
                                                             MHD_RESPMEM_MUST_COPY);
    enum MHD_Result ret;
    if (r == NULL) {
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    ret = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    return ret;
}

/* Port of a "host:port" listen address; 0 when there is none. */
static int listen_port(const char *listen)
{
    const char *colon = listen != NULL ? strrchr(listen, ':') : NULL;
    int p = 0;
    if (colon != NULL && sscanf(colon + 1, "%d", &p) != 1) {
        p = 0;
    }
    return p;
}

static int talos_port(const struct kmsd *d)
{
    return listen_port(d->opt.talos_listen);
}

static int cluster_port(const struct kmsd *d)
{
    return listen_port(d->opt.cluster_listen);
}

/* ---- /metrics ---------------------------------------------------------
 *
 * Every metric is one row of `metric_table` below: name, type, HELP text and
 * how its samples are rendered; the loop prints HELP and TYPE for each row,
 * so no metric can miss them. A plain atomic counter or gauge in struct kmsd
 * is one line (COUNTER_FIELD / GAUGE_FIELD); a histogram (struct kmsd_hist)
 * is one line (HIST_FIELD); labelled metrics have a small render function.
 * docs/metrics.md lists every row (tests/integration/test_obs_metrics.py
 * fails when the two differ). Values are read with atomic loads, once per
 * scrape: the request paths only do atomic adds. */

struct mbuf {
    char *buf;
    size_t len, cap;
    bool failed; /* out of memory: the scrape answers 500 */
};

static void mb_printf(struct mbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void mb_printf(struct mbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (b->failed) {
        return;
    }
    for (;;) {
        size_t room = b->cap - b->len;
        va_start(ap, fmt);
        n = vsnprintf(b->buf != NULL ? b->buf + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = true;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap == 0 ? 16384 : b->cap * 2;
        while (cap - b->len <= (size_t)n) {
            cap *= 2;
        }
        char *nb = realloc(b->buf, cap);
        if (nb == NULL) {
            b->failed = true;
            return;
        }
        b->buf = nb;
        b->cap = cap;
    }
}

/* A label value with \, " and newline escaped (exposition format). */
static void label_escape(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    for (; in != NULL && *in != '\0' && o + 3 < outlen; in++) {
        if (*in == '\\' || *in == '"') {
            out[o++] = '\\';
            out[o++] = *in;
        } else if (*in == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
}

/* What one scrape reads once and several rows use. */
struct scrape {
    struct kmsd *d;
    struct kms_raft_status st;
};

struct metric_row;
typedef void (*metric_render_fn)(const struct scrape *s, const struct metric_row *row,
                                 struct mbuf *b);
struct metric_row {
    const char *name;
    const char *type; /* "counter", "gauge" or "histogram" */
    const char *help;
    metric_render_fn render;
    size_t off; /* r_field / r_hist: offset of the value in struct kmsd */
};

static void r_field(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    const atomic_ullong *v = (const atomic_ullong *)((const char *)s->d + row->off);
    mb_printf(b, "%s %llu\n", row->name, (unsigned long long)atomic_load(v));
}

static void hist_render(struct mbuf *b, const char *name, const char *labels,
                        struct kmsd_hist *h)
{
    static const uint64_t bounds[KMSD_HIST_BUCKETS] = KMSD_HIST_BOUNDS_US;
    unsigned long long cum = 0;
    const char *sep = labels[0] != '\0' ? "," : "";
    for (size_t i = 0; i <= KMSD_HIST_BUCKETS; i++) {
        cum += atomic_load(&h->bucket[i]);
        if (i < KMSD_HIST_BUCKETS) {
            mb_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
                      (double)bounds[i] / 1e6, cum);
        } else {
            mb_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, cum);
        }
    }
    /* count is the +Inf bucket: the buckets are read after the count was
     * bumped last, so the two never disagree within one scrape */
    mb_printf(b, "%s_sum%s%s%s %.6f\n", name, labels[0] ? "{" : "", labels,
              labels[0] ? "}" : "", (double)atomic_load(&h->sum_us) / 1e6);
    mb_printf(b, "%s_count%s%s%s %llu\n", name, labels[0] ? "{" : "", labels,
              labels[0] ? "}" : "", cum);
}

static void r_hist(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    hist_render(b, row->name, "", (struct kmsd_hist *)((char *)s->d + row->off));
}

static void r_talos_latency(const struct scrape *s, const struct metric_row *row,
                            struct mbuf *b)
{
    hist_render(b, row->name, "method=\"Seal\"", &s->d->metrics.talos_latency[0]);
    hist_render(b, row->name, "method=\"Unseal\"", &s->d->metrics.talos_latency[1]);
}

static void r_up(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    (void)s;
    mb_printf(b, "%s 1\n", row->name);
}

static void r_build_info(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    char v[128], bv[256];
    label_escape(KMSD_VERSION, v, sizeof(v));
    label_escape(KMSD_BUILD_VERSION, bv, sizeof(bv));
    mb_printf(b, "%s{version=\"%s\",build=\"%s\"} 1\n", row->name, v, bv);
}

static void r_initialized(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, kmsd_is_initialized(s->d) ? 1 : 0);
}

static void r_sealed(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, kmsd_is_unsealed(s->d) ? 0 : 1);
}

static void r_unseal_progress(const struct scrape *s, const struct metric_row *row,
                              struct mbuf *b)
{
    unsigned p = 0, t = 0;
    kmsd_unseal_progress(s->d, &p, &t);
    mb_printf(b, "%s %u\n", row->name, p);
}

static void r_unseal_threshold(const struct scrape *s, const struct metric_row *row,
                               struct mbuf *b)
{
    unsigned p = 0, t = 0;
    kmsd_unseal_progress(s->d, &p, &t);
    mb_printf(b, "%s %u\n", row->name, t);
}

static void r_talos_listening(const struct scrape *s, const struct metric_row *row,
                              struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, atomic_load(&s->d->talos_listening) ? 1 : 0);
}

static void r_cluster_listening(const struct scrape *s, const struct metric_row *row,
                                struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, atomic_load(&s->d->cluster_listening) ? 1 : 0);
}

static void r_fd_limit(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s %llu\n", row->name, s->d->fd_limit);
}

static void r_listener_rebuilds(const struct scrape *s, const struct metric_row *row,
                                struct mbuf *b)
{
    mb_printf(b, "%s %llu\n", row->name, s->d->listener_rebuilds);
}

static void r_log_suppressed(const struct scrape *s, const struct metric_row *row,
                             struct mbuf *b)
{
    (void)s;
    mb_printf(b, "%s %llu\n", row->name, kms_log_suppressed_total());
}

/* The accept filter's table, read by port (lock-protected there; it does
 * not touch the server objects the supervisor replaces). which: 0 open,
 * 1 rejected, 2 reset for lack of file descriptors. */
static void conn_render(const struct scrape *s, const struct metric_row *row, struct mbuf *b,
                        int which)
{
    struct kms_connlimit_stats cs;
    int ports[2] = {talos_port(s->d), cluster_port(s->d)};
    const char *names[2] = {"talos", "cluster"};
    for (int i = 0; i < 2; i++) {
        if (ports[i] <= 0) {
            continue;
        }
        kms_connlimit_stats(ports[i], &cs);
        mb_printf(b, "%s{listener=\"%s\"} %llu\n", row->name, names[i],
                  which == 0 ? (unsigned long long)cs.open
                             : which == 1 ? cs.rejected : cs.emfile);
    }
}

static void r_conn_open(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    conn_render(s, row, b, 0);
}

static void r_conn_rejected(const struct scrape *s, const struct metric_row *row,
                            struct mbuf *b)
{
    conn_render(s, row, b, 1);
}

static void r_conn_emfile(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    conn_render(s, row, b, 2);
}

static void r_read_lease(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    /* a quorum read lease, never claimed for unsealReads: local */
    mb_printf(b, "%s %d\n", row->name, kms_raft_lease_valid(s->d->raft) ? 1 : 0);
}

static void r_reads_local(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, s->d->opt.unseal_reads_local ? 1 : 0);
}

#define HSM_VALUE(fn, expr)                                                                \
    static void fn(const struct scrape *s, const struct metric_row *row, struct mbuf *b)   \
    {                                                                                      \
        struct kmsd_hsm_metrics m;                                                         \
        kmsd_hsm_metric_values(s->d, &m);                                                  \
        mb_printf(b, "%s %llu\n", row->name, (unsigned long long)(expr));                 \
    }
HSM_VALUE(r_hsm_enabled, m.enabled ? 1 : 0)
HSM_VALUE(r_hsm_error, m.failing ? 1 : 0)
HSM_VALUE(r_hsm_attempts, m.attempts)
HSM_VALUE(r_hsm_failures, m.failures)

static void r_raft_leader(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, s->st.role == KMS_RAFT_LEADER ? 1 : 0);
}

#define RAFT_U64(fn, field)                                                                \
    static void fn(const struct scrape *s, const struct metric_row *row, struct mbuf *b)   \
    {                                                                                      \
        mb_printf(b, "%s %llu\n", row->name, (unsigned long long)s->st.field);             \
    }
RAFT_U64(r_raft_term, term)
RAFT_U64(r_raft_commit, commit_index)
RAFT_U64(r_raft_applied, applied_index)
RAFT_U64(r_raft_elections, elections_started)
RAFT_U64(r_raft_elections_won, elections_won)
RAFT_U64(r_raft_leader_changes, leader_changes)
RAFT_U64(r_raft_snapshot_installs, snapshots_restored)
#undef RAFT_U64

static void r_records(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s %llu\n", row->name, (unsigned long long)kms_store_count(s->d->store));
}

static void r_tls_reloads(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    mb_printf(b, "%s{result=\"ok\"} %llu\n%s{result=\"failed\"} %llu\n", row->name,
              (unsigned long long)atomic_load(&s->d->tls_reloads_ok), row->name,
              (unsigned long long)atomic_load(&s->d->tls_reloads_failed));
}

static void r_tls_reload_failed(const struct scrape *s, const struct metric_row *row,
                                struct mbuf *b)
{
    mb_printf(b, "%s %d\n", row->name, atomic_load(&s->d->tls_reload_last_failed) ? 1 : 0);
}

static void r_requests(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    for (int m = 0; m < 2; m++) {
        for (int code = 0; code < KMSD_METRIC_CODES; code++) {
            unsigned long long v = atomic_load(&s->d->metrics.requests[m][code]);
            if (v > 0) {
                mb_printf(b, "%s{method=\"%s\",code=\"%s\"} %llu\n", row->name,
                          m == 0 ? "Seal" : "Unseal", kmsd_grpc_code_name(code), v);
            }
        }
    }
}

static void r_cluster_requests(const struct scrape *s, const struct metric_row *row,
                               struct mbuf *b)
{
    if (!atomic_load_explicit(&s->d->op_methods_ready, memory_order_acquire)) {
        return; /* the cluster API is not registered yet */
    }
    for (size_t i = 0; i < KMSD_OP_METHODS; i++) {
        const char *path = s->d->op_methods[i].path, *m;
        if (path == NULL) {
            continue;
        }
        m = strrchr(path, '/');
        for (int code = 0; code < KMSD_METRIC_CODES; code++) {
            unsigned long long v = atomic_load(&s->d->metrics.cluster_calls[i][code]);
            if (v > 0) {
                mb_printf(b, "%s{method=\"%s\",code=\"%s\"} %llu\n", row->name,
                          m != NULL ? m + 1 : path, kmsd_grpc_code_name(code), v);
            }
        }
    }
}

static void r_seal_quota(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    static const char *const q[3] = {"address_rate", "node_rate", "node_records"};
    for (int i = 0; i < 3; i++) {
        mb_printf(b, "%s{quota=\"%s\"} %llu\n", row->name, q[i],
                  (unsigned long long)atomic_load(&s->d->metrics.seal_quota[i]));
    }
}

static void r_policy_denied(const struct scrape *s, const struct metric_row *row,
                            struct mbuf *b)
{
    mb_printf(b, "%s{method=\"Seal\"} %llu\n%s{method=\"Unseal\"} %llu\n", row->name,
              (unsigned long long)atomic_load(&s->d->metrics.policy_denied[0]), row->name,
              (unsigned long long)atomic_load(&s->d->metrics.policy_denied[1]));
}

static void r_audit_lines(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    (void)s;
    mb_printf(b, "%s %llu\n", row->name, (unsigned long long)kmsd_audit_lines_total());
}

static void r_audit_failures(const struct scrape *s, const struct metric_row *row,
                             struct mbuf *b)
{
    (void)s;
    mb_printf(b, "%s %llu\n", row->name,
              (unsigned long long)kmsd_audit_write_failures_total());
}

/* Earliest notAfter of the certificates in a PEM file (a CA bundle may
 * hold several), as Unix seconds; false when none parses. */
static bool pem_not_after(const char *file, long long *out)
{
    FILE *f = file != NULL && file[0] != '\0' ? fopen(file, "r") : NULL;
    X509 *x;
    bool found = false;
    if (f == NULL) {
        return false;
    }
    while ((x = PEM_read_X509(f, NULL, NULL, NULL)) != NULL) {
        struct tm tm;
        if (ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) == 1) {
            long long t = (long long)timegm(&tm);
            if (!found || t < *out) {
                *out = t;
            }
            found = true;
        }
        X509_free(x);
    }
    ERR_clear_error(); /* the end of the file reads as a PEM "error" */
    fclose(f);
    return found;
}

static void r_cert_expiry(const struct scrape *s, const struct metric_row *row, struct mbuf *b)
{
    const struct kms_config *o = &s->d->opt;
    const char *names[4] = {"node", "talos", "cluster_ca", "operator_ca"};
    const char *files[4] = {o->node_cert, o->talos_cert, o->cluster_ca, o->operator_ca};
    for (int i = 0; i < 4; i++) {
        long long t = 0;
        char f[512];
        if (files[i] == NULL || files[i][0] == '\0' || !pem_not_after(files[i], &t)) {
            continue;
        }
        label_escape(files[i], f, sizeof(f));
        mb_printf(b, "%s{certificate=\"%s\",file=\"%s\"} %lld\n", row->name, names[i], f, t);
    }
}

#define KOFF(field) offsetof(struct kmsd, field)
#define COUNTER_FIELD(name, help, field) {name, "counter", help, r_field, KOFF(field)}
#define HIST_FIELD(name, help, field) {name, "histogram", help, r_hist, KOFF(field)}
#define ROW(name, type, help, fn) {name, type, help, fn, 0}

static const struct metric_row metric_table[] = {
    /* process and build */
    ROW("kmsd_up", "gauge", "1 while the process runs.", r_up),
    ROW("kmsd_build_info", "gauge",
        "Always 1; labels: release version and build (git describe).",
        r_build_info),
    ROW("kmsd_fd_limit", "gauge", "RLIMIT_NOFILE soft limit after start.", r_fd_limit),
    ROW("kmsd_log_suppressed_total", "counter",
        "Log lines dropped by the per-message rate limit.",
        r_log_suppressed),
    /* key state */
    ROW("kmsd_initialized", "gauge",
        "1 once the cluster has a keyring (operator init).",
        r_initialized),
    ROW("kmsd_sealed", "gauge", "1 while this node holds no root key.", r_sealed),
    ROW("kmsd_unseal_progress", "gauge",
        "Unseal shares given to this node so far (threshold once unsealed).",
        r_unseal_progress),
    ROW("kmsd_unseal_threshold", "gauge",
        "Unseal shares needed (0 before init).",
        r_unseal_threshold),
    COUNTER_FIELD("kmsd_keyring_refresh_failures_total",
                  "Checks where the replicated keyring did not decrypt under this node's root key.",
                  metrics.keyring_refresh_failures),
    /* listeners and connections */
    ROW("kmsd_talos_listening", "gauge",
        "1 while the Talos API listener is open and its last self-connect probe succeeded.",
        r_talos_listening),
    ROW("kmsd_cluster_listening", "gauge",
        "1 while the cluster API listener is open and its last self-connect probe succeeded.",
        r_cluster_listening),
    ROW("kmsd_listener_rebuilds_total", "counter",
        "Listeners rebuilt after a failed probe or a reload.",
        r_listener_rebuilds),
    ROW("kmsd_connections", "gauge",
        "Open connections per gRPC listener (accept filter).",
        r_conn_open),
    ROW("kmsd_connections_rejected_total", "counter",
        "Connections closed at accept by the connection caps.",
        r_conn_rejected),
    ROW("kmsd_connections_reset_no_fd_total", "counter",
        "Connections reset at accept for lack of file descriptors.",
        r_conn_emfile),
    /* Talos API */
    ROW("kmsd_requests_total", "counter",
        "Talos API requests answered, by method and gRPC code name.",
        r_requests),
    ROW("kmsd_request_duration_seconds", "histogram",
        "Talos API Seal/Unseal latency, arrival to answer.",
        r_talos_latency),
    COUNTER_FIELD("kmsd_unseal_limited_total",
                  "Failing Unseals refused by the failed-unseal rate limiter.",
                  metrics.unseal_limited),
    ROW("kmsd_seal_quota_refused_total", "counter",
        "Seals refused by a rate limit or quota.",
        r_seal_quota),
    ROW("kmsd_policy_denied_total", "counter",
        "Requests refused by the enrolment policy.",
        r_policy_denied),
    COUNTER_FIELD("kmsd_seal_readback_failures_total",
                  "Seals refused because the record read back differed or was absent.",
                  metrics.seal_readback_failures),
    /* cluster API */
    ROW("kmsd_cluster_requests_total", "counter",
        "Cluster API calls (Forward and operator calls) answered here, by method and gRPC code "
        "name.",
        r_cluster_requests),
    HIST_FIELD("kmsd_forward_duration_seconds",
               "Cluster/Forward calls served by this leader, arrival to answer.",
               metrics.forward_latency),
    COUNTER_FIELD("kmsd_forward_refused_total",
                  "Cluster/Forward calls refused (identity or entry).",
                  metrics.forward_refused),
    /* last access (touch.c) */
    COUNTER_FIELD("kmsd_last_access_writes_total",
                  "Last-access batches (TouchBatch) this replica had replicated.",
                  metrics.touch_writes),
    COUNTER_FIELD("kmsd_last_access_keys_total", "Keys carried by those batches.",
                  metrics.touch_keys),
    COUNTER_FIELD("kmsd_last_access_dropped_total",
                  "Unseals not noted for last access because the batch table was full.",
                  metrics.touch_dropped),
    /* raft */
    ROW("kmsd_seal_pkcs11", "gauge", "1 when seal.type is pkcs11.", r_hsm_enabled),
    ROW("kmsd_seal_hsm_error", "gauge",
        "1 while the HSM auto-unseal fails (reason in kmsctl status).", r_hsm_error),
    ROW("kmsd_seal_hsm_unseal_attempts_total", "counter",
        "Auto-unseal attempts through the PKCS#11 token.", r_hsm_attempts),
    ROW("kmsd_seal_hsm_unseal_failures_total", "counter",
        "Failed auto-unseal attempts through the PKCS#11 token.", r_hsm_failures),
    ROW("kmsd_raft_leader", "gauge", "1 while this node is the raft leader.", r_raft_leader),
    ROW("kmsd_raft_term", "gauge", "Current raft term.", r_raft_term),
    ROW("kmsd_raft_commit_index", "gauge", "Raft commit index.", r_raft_commit),
    ROW("kmsd_raft_applied_index", "gauge", "Raft index applied to the store.", r_raft_applied),
    ROW("kmsd_raft_elections_total", "counter",
        "Times this node stood for election since start.",
        r_raft_elections),
    ROW("kmsd_raft_elections_won_total", "counter",
        "Times this node became leader since start.",
        r_raft_elections_won),
    ROW("kmsd_raft_leader_changes_total", "counter",
        "Times the leader this node knows changed (to another node or none).",
        r_raft_leader_changes),
    ROW("kmsd_raft_snapshot_installs_total", "counter",
        "Snapshots installed from the leader since start.",
        r_raft_snapshot_installs),
    HIST_FIELD("kmsd_raft_apply_duration_seconds",
               "Entries proposed on this node as leader, proposal until applied.",
               metrics.raft_apply_latency),
    ROW("kmsd_read_lease", "gauge",
        "1 while this node holds a quorum read lease (never for unsealReads: local).",
        r_read_lease),
    ROW("kmsd_unseal_reads_local", "gauge",
        "1 when unsealReads is local (Unseals served without a lease).",
        r_reads_local),
    ROW("kmsd_records", "gauge", "Sealed records in the store.", r_records),
    /* TLS */
    ROW("kmsd_tls_reloads_total", "counter", "SIGHUP TLS reloads by result.", r_tls_reloads),
    ROW("kmsd_tls_reload_failed", "gauge",
        "1 when the latest TLS reload kept (some) old material.",
        r_tls_reload_failed),
    ROW("kmsd_certificate_expiry_timestamp_seconds", "gauge",
        "notAfter (Unix time) of each configured certificate file (earliest in a bundle).",
        r_cert_expiry),
    /* audit */
    ROW("kmsd_audit_lines_total", "counter",
        "Lines appended to the hash-chained audit file.",
        r_audit_lines),
    ROW("kmsd_audit_write_failures_total", "counter",
        "Audit lines that could not be written to the audit file.",
        r_audit_failures),
};

static enum MHD_Result metrics_respond(struct kmsd *d, struct MHD_Connection *c)
{
    struct scrape s;
    struct mbuf b = {NULL, 0, 0, false};
    struct MHD_Response *r;
    enum MHD_Result ret;

    memset(&s, 0, sizeof(s));
    s.d = d;
    (void)kms_raft_status(d->raft, &s.st);
    for (size_t i = 0; i < sizeof(metric_table) / sizeof(metric_table[0]); i++) {
        const struct metric_row *row = &metric_table[i];
        mb_printf(&b, "# HELP %s %s\n# TYPE %s %s\n", row->name, row->help, row->name,
                  row->type);
        row->render(&s, row, &b);
    }
    if (b.failed || b.buf == NULL) {
        free(b.buf);
        return respond(c, 500, "text/plain", "out of memory\n");
    }
    r = MHD_create_response_from_buffer(b.len, b.buf, MHD_RESPMEM_MUST_FREE);
    if (r == NULL) {
        free(b.buf);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", "text/plain; version=0.0.4");
    ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version,
                               const char *upload_data, size_t *upload_data_size,
                               void **con_cls)
{
    struct kmsd *d = cls;
    (void)version;
    (void)upload_data;
    (void)upload_data_size;
    (void)con_cls;

    if (strcmp(method, "GET") != 0) {
        return respond(c, 405, "text/plain", "method not allowed\n");
    }
    if (strcmp(url, "/healthz") == 0) {
        return respond(c, 200, "text/plain", "ok\n");
    }
    if (strcmp(url, "/readyz") == 0) {
        /* the supervisor's last self-connect probe, not just "opened" */
        bool ready = atomic_load(&d->talos_listening);
        return respond(c, ready ? 200 : 503, "text/plain", ready ? "ready\n" : "not ready\n");
    }
    if (strcmp(url, "/metrics") != 0) {
        return respond(c, 404, "text/plain", "not found\n");
    }
    return metrics_respond(d, c);
}

#define HTTP_THREADS 2        /* epoll thread pool */
#define HTTP_IDLE_TIMEOUT_S 5 /* close a connection idle this long */

/* libmicrohttpd's own messages (accept failures, limits) into kms_log,
 * rate-limited by format like every other line. */
static void http_log_cb(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    size_t n;
    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) {
        msg[--n] = '\0';
    }
    kms_log_keyed(KMS_LOG_WARN, "http", fmt, msg, NULL);
}

int kmsd_http_start(struct kmsd *d, struct kms_err *err)
{
    struct sockaddr_storage ss;
    socklen_t sslen = 0;
    char host[256];
    const char *colon;
    unsigned port;

    if (d->opt.http_listen == NULL || d->opt.http_listen[0] == '\0') {
        return 0;
    }
    colon = strrchr(d->opt.http_listen, ':');
    if (colon == NULL || sscanf(colon + 1, "%u", &port) != 1 || port == 0 || port > 65535) {
        return kms_err_set(err, KMS_ECONFIG, "http.listen: invalid address %s",
                           d->opt.http_listen);
    }
    snprintf(host, sizeof(host), "%.*s", (int)(colon - d->opt.http_listen), d->opt.http_listen);
    if (host[0] == '[') {
        memmove(host, host + 1, strlen(host));
        host[strcspn(host, "]")] = '\0';
    }
    memset(&ss, 0, sizeof(ss));
    if (host[0] == '\0' || strcmp(host, "0.0.0.0") == 0) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        sslen = sizeof(*sin);
    } else if (strchr(host, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1) {
            return kms_err_set(err, KMS_ECONFIG, "http.listen: invalid address %s",
                               d->opt.http_listen);
        }
        sslen = sizeof(*sin6);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) {
            return kms_err_set(err, KMS_ECONFIG, "http.listen: invalid address %s (use an IP)",
                               d->opt.http_listen);
        }
        sslen = sizeof(*sin);
    }
    (void)sslen;
    /* Idle connections must not starve the probes: epoll in a small thread
     * pool (one idle connection costs no thread), a per-address cap so one
     * client cannot hold every slot, a total cap, and a short idle timeout.
     * Connections over a cap are closed at accept by libmicrohttpd. */
    d->http = MHD_start_daemon(
        MHD_USE_EPOLL_INTERNAL_THREAD | MHD_USE_ERROR_LOG |
            (((struct sockaddr *)&ss)->sa_family == AF_INET6 ? MHD_USE_IPv6 : 0),
        (uint16_t)port, NULL, NULL, handler, d, MHD_OPTION_EXTERNAL_LOGGER, http_log_cb, NULL,
        MHD_OPTION_SOCK_ADDR, &ss,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)HTTP_THREADS,
        MHD_OPTION_CONNECTION_LIMIT, d->opt.http_max_conns,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, d->opt.http_max_conns_per_addr,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_IDLE_TIMEOUT_S, MHD_OPTION_END);
    if (d->http == NULL) {
        return kms_err_set(err, KMS_EIO, "http: cannot listen on %s", d->opt.http_listen);
    }
    kms_log(KMS_LOG_INFO, "http", "HTTP endpoints listening", "addr", d->opt.http_listen, NULL);
    return 0;
}

void kmsd_http_stop(struct kmsd *d)
{
    if (d->http != NULL) {
        MHD_stop_daemon(d->http);
        d->http = NULL;
    }
}
