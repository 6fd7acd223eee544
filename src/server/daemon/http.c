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
#include <stdio.h>
#include <string.h>

#include "kms_log.h"
#include "kms_raft.h"
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
#undef M
    if (o >= sizeof(body)) {
        o = sizeof(body) - 1;
    }
    body[o] = '\0';
    return respond(c, 200, "text/plain; version=0.0.4", body);
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
    d->http = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD |
                                   (((struct sockaddr *)&ss)->sa_family == AF_INET6 ? MHD_USE_IPv6 : 0),
                               (uint16_t)port, NULL, NULL, handler, d, MHD_OPTION_SOCK_ADDR, &ss,
                               MHD_OPTION_CONNECTION_LIMIT, 64U, MHD_OPTION_CONNECTION_TIMEOUT,
                               10U, MHD_OPTION_END);
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
