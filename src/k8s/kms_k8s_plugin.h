/*
 * kmsd-k8s-plugin's core (plugin.c): the v2.KeyManagementService handlers
 * on the unix socket, the failover client to the kmsd replicas and the
 * cached health.
 *
 * Threads: the rpc server's workers run the handlers; Status answers from
 * the cache at once, Encrypt and Decrypt park on the plugin's pool (they
 * wait for kmsd); one health thread refreshes the cache every
 * health_interval_ms. kms_k8s_plugin_start/stop from main only.
 */
#ifndef KMS_K8S_PLUGIN_H
#define KMS_K8S_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>

#include "kms_err.h"

#define KMS_K8S_MAX_ENDPOINTS 16

/* Strings are borrowed from argv (they outlive the plugin). */
struct kms_k8s_plugin_options {
    const char *listen;            /* socket path ("unix:" prefix accepted) */
    unsigned socket_mode;          /* permission bits of the socket file, e.g. 0600 */
    const char *endpoints[KMS_K8S_MAX_ENDPOINTS]; /* kmsd cluster API "host:port" */
    size_t n_endpoints;
    const char *ca_file;           /* CA of the kmsd node certificates */
    const char *cert_file;         /* plugin certificate (CN kmsd-k8s-<name>) */
    const char *key_file;
    unsigned health_interval_ms;   /* Status poll of kmsd; 0 = 1000 */
    unsigned attempt_timeout_ms;   /* one call to one replica; 0 = 1500 */
    unsigned max_call_ms;          /* one Encrypt/Decrypt over all replicas; 0 = 10000 */
    unsigned threads;              /* pool threads; 0 = 4 */
};

struct kms_k8s_plugin;

/* Creates the channels and the socket, starts the health thread and the
 * server. The socket file is created with socket_mode (umask 0177 while it
 * is bound, then chmod); a stale socket at the path is removed, any other
 * file there is an error. */
int kms_k8s_plugin_start(const struct kms_k8s_plugin_options *opt, struct kms_k8s_plugin **out,
                         struct kms_err *err);

/* Stops the server (grace_ms for calls in flight), the pool and the health
 * thread, removes the socket file and frees everything. NULL is fine. */
void kms_k8s_plugin_stop(struct kms_k8s_plugin *p, unsigned grace_ms);

#endif /* KMS_K8S_PLUGIN_H */
