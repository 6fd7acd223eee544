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
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kms_connlimit.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kmsd.h"
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

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version,
                               const char *upload_data, size_t *upload_data_size,
                               void **con_cls)
{
    struct kmsd *d = cls;
    char body[8192];
    size_t o = 0;

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
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
#define M(...) o += (size_t)snprintf(body + o, o < sizeof(body) ? sizeof(body) - o : 0, __VA_ARGS__)
    M("# HELP kmsd_up 1 while the process runs.\n# TYPE kmsd_up gauge\nkmsd_up 1\n");
    M("# TYPE kmsd_sealed gauge\nkmsd_sealed %d\n", kmsd_is_unsealed(d) ? 0 : 1);
    M("# TYPE kmsd_talos_listening gauge\nkmsd_talos_listening %d\n",
      atomic_load(&d->talos_listening) ? 1 : 0);
    M("# TYPE kmsd_cluster_listening gauge\nkmsd_cluster_listening %d\n",
      atomic_load(&d->cluster_listening) ? 1 : 0);
    M("# TYPE kmsd_fd_limit gauge\nkmsd_fd_limit %llu\n", d->fd_limit);
    M("# TYPE kmsd_listener_rebuilds_total counter\nkmsd_listener_rebuilds_total %llu\n",
      d->listener_rebuilds);
    M("# TYPE kmsd_log_suppressed_total counter\nkmsd_log_suppressed_total %llu\n",
      kms_log_suppressed_total());
    {
        /* The Talos server is replaced by the supervisor; its counters are
         * read by port through the accept filter's table, which is
         * lock-protected and does not touch the server object. */
        struct kms_connlimit_stats cs;
        int ports[2] = {talos_port(d), cluster_port(d)};
        const char *names[2] = {"talos", "cluster"};
        M("# HELP kmsd_connections Accept filter: open connections and counters by port.\n"
          "# TYPE kmsd_connections gauge\n");
        for (int i = 0; i < 2; i++) {
            if (ports[i] <= 0) {
                continue;
            }
            kms_connlimit_stats(ports[i], &cs);
            M("kmsd_connections{listener=\"%s\"} %u\n", names[i], cs.open);
            M("kmsd_connections_rejected_total{listener=\"%s\"} %llu\n", names[i],
              cs.rejected);
            M("kmsd_connections_reset_no_fd_total{listener=\"%s\"} %llu\n", names[i],
              cs.emfile);
        }
    }
    /* A quorum read lease, never claimed for unsealReads: local (which
     * serves without one: kmsd_unseal_reads_local says so). */
    M("# TYPE kmsd_read_lease gauge\nkmsd_read_lease %d\n",
      kms_raft_lease_valid(d->raft) ? 1 : 0);
    M("# TYPE kmsd_unseal_reads_local gauge\nkmsd_unseal_reads_local %d\n",
      d->opt.unseal_reads_local ? 1 : 0);
    M("# TYPE kmsd_raft_leader gauge\nkmsd_raft_leader %d\n", st.role == KMS_RAFT_LEADER ? 1 : 0);
    M("# TYPE kmsd_raft_term gauge\nkmsd_raft_term %llu\n", (unsigned long long)st.term);
    M("# TYPE kmsd_raft_commit_index gauge\nkmsd_raft_commit_index %llu\n",
      (unsigned long long)st.commit_index);
    M("# TYPE kmsd_raft_applied_index gauge\nkmsd_raft_applied_index %llu\n",
      (unsigned long long)st.applied_index);
    M("# TYPE kmsd_records gauge\nkmsd_records %llu\n",
      (unsigned long long)kms_store_count(d->store));
    M("# HELP kmsd_keyring_refresh_failures_total Checks where the replicated keyring did "
      "not decrypt under this node's root key.\n"
      "# TYPE kmsd_keyring_refresh_failures_total counter\n"
      "kmsd_keyring_refresh_failures_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.keyring_refresh_failures));
    M("# HELP kmsd_forward_refused_total Cluster/Forward calls refused (identity or entry).\n"
      "# TYPE kmsd_forward_refused_total counter\nkmsd_forward_refused_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.forward_refused));
    M("# HELP kmsd_seal_readback_failures_total Seals refused because the record read back "
      "differed or was absent.\n# TYPE kmsd_seal_readback_failures_total counter\n"
      "kmsd_seal_readback_failures_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.seal_readback_failures));
    M("# HELP kmsd_last_access_writes_total Last-access batches (TouchBatch) this replica "
      "had replicated.\n# TYPE kmsd_last_access_writes_total counter\n"
      "kmsd_last_access_writes_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.touch_writes));
    M("# HELP kmsd_last_access_keys_total Keys carried by those batches.\n"
      "# TYPE kmsd_last_access_keys_total counter\nkmsd_last_access_keys_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.touch_keys));
    M("# HELP kmsd_last_access_dropped_total Unseals not noted for last access because the "
      "batch table was full.\n# TYPE kmsd_last_access_dropped_total counter\n"
      "kmsd_last_access_dropped_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.touch_dropped));
    M("# HELP kmsd_tls_reloads_total SIGHUP TLS reloads by result.\n"
      "# TYPE kmsd_tls_reloads_total counter\n"
      "kmsd_tls_reloads_total{result=\"ok\"} %llu\n"
      "kmsd_tls_reloads_total{result=\"failed\"} %llu\n",
      (unsigned long long)atomic_load(&d->tls_reloads_ok),
      (unsigned long long)atomic_load(&d->tls_reloads_failed));
    M("# TYPE kmsd_tls_reload_failed gauge\nkmsd_tls_reload_failed %d\n",
      atomic_load(&d->tls_reload_last_failed) ? 1 : 0);
    M("# HELP kmsd_requests_total Talos API requests by method and gRPC code.\n"
      "# TYPE kmsd_requests_total counter\n");
    for (int m = 0; m < 2; m++) {
        for (int code = 0; code < KMSD_METRIC_CODES; code++) {
            unsigned long long v = atomic_load(&d->metrics.requests[m][code]);
            if (v > 0) {
                M("kmsd_requests_total{method=\"%s\",code=\"%d\"} %llu\n",
                  m == 0 ? "Seal" : "Unseal", code, v);
            }
        }
    }
    M("# HELP kmsd_unseal_limited_total Failing Unseals refused by the failed-unseal limiter.\n"
      "# TYPE kmsd_unseal_limited_total counter\nkmsd_unseal_limited_total %llu\n",
      (unsigned long long)atomic_load(&d->metrics.unseal_limited));
    M("# HELP kmsd_seal_quota_refused_total Seals refused by a quota.\n"
      "# TYPE kmsd_seal_quota_refused_total counter\n");
    {
        static const char *const q[3] = {"address_rate", "node_rate", "node_records"};
        for (int i = 0; i < 3; i++) {
            M("kmsd_seal_quota_refused_total{quota=\"%s\"} %llu\n", q[i],
              (unsigned long long)atomic_load(&d->metrics.seal_quota[i]));
        }
    }
    M("# HELP kmsd_policy_denied_total Requests refused by the enrolment policy.\n"
      "# TYPE kmsd_policy_denied_total counter\n"
      "kmsd_policy_denied_total{method=\"Seal\"} %llu\n"
      "kmsd_policy_denied_total{method=\"Unseal\"} %llu\n",
      (unsigned long long)atomic_load(&d->metrics.policy_denied[0]),
      (unsigned long long)atomic_load(&d->metrics.policy_denied[1]));
#undef M
    if (o >= sizeof(body)) {
        o = sizeof(body) - 1;
    }
    body[o] = '\0';
    return respond(c, 200, "text/plain; version=0.0.4", body);
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
