/*
 * kmsd-k8s-plugin: Kubernetes KMS v2 plugin backed by a kmsd cluster
 * (docs/kubernetes.md). Runs next to each kube-apiserver.
 *
 *   kmsd-k8s-plugin --socket PATH --endpoints HOST:PORT[,HOST:PORT...]
 *                   --ca FILE --cert FILE --key FILE [--socket-mode 0600]
 *                   [--health-interval-ms 1000] [--attempt-timeout-ms 1500]
 *                   [--max-call-ms 10000] [--threads 4] [--log-level info]
 *
 * Every flag may also come from the environment: KMSD_K8S_SOCKET,
 * KMSD_K8S_ENDPOINTS, KMSD_K8S_CA, KMSD_K8S_CERT, KMSD_K8S_KEY (flags win).
 * Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start, 64 on usage
 * errors.
 */
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"
#include "kms_k8s_plugin.h"
#include "kms_log.h"
#include "kms_rpc.h"

#define EXIT_USAGE 64

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kmsd-k8s-plugin --socket PATH --endpoints HOST:PORT[,HOST:PORT...]\n"
            "                       --ca FILE --cert FILE --key FILE [--socket-mode 0600]\n"
            "                       [--health-interval-ms 1000] [--attempt-timeout-ms 1500]\n"
            "                       [--max-call-ms 10000] [--threads 4] [--log-level LEVEL]\n"
            "Serves v2.KeyManagementService (Kubernetes KMS v2) on the unix socket and\n"
            "calls kmsd.v1.KubernetesKms on the kmsd cluster API with a plugin certificate\n"
            "(CN kmsd-k8s-<name>). See docs/kubernetes.md.\n");
}

/* Unsigned decimal (or octal with a leading 0 when base 0) in [lo, hi]. */
static int parse_uint(const char *s, int base, unsigned long lo, unsigned long hi,
                      unsigned *out)
{
    char *end;
    unsigned long v;

    if (s == NULL || s[0] == '\0' || s[0] == '-') {
        return -1;
    }
    v = strtoul(s, &end, base);
    if (*end != '\0' || v < lo || v > hi) {
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'},
        {"endpoints", required_argument, NULL, 'e'},
        {"ca", required_argument, NULL, 'a'},
        {"cert", required_argument, NULL, 'c'},
        {"key", required_argument, NULL, 'k'},
        {"socket-mode", required_argument, NULL, 'm'},
        {"health-interval-ms", required_argument, NULL, 'H'},
        {"attempt-timeout-ms", required_argument, NULL, 'T'},
        {"max-call-ms", required_argument, NULL, 'M'},
        {"threads", required_argument, NULL, 't'},
        {"log-level", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct kms_k8s_plugin_options opt;
    struct kms_k8s_plugin *p = NULL;
    struct kms_err err;
    char *endpoints = getenv("KMSD_K8S_ENDPOINTS"), *eps = NULL, *save = NULL, *tok;
    enum kms_log_level level = KMS_LOG_INFO;
    sigset_t set;
    int c, sig = 0, rc = 1;

    memset(&opt, 0, sizeof(opt));
    opt.listen = getenv("KMSD_K8S_SOCKET");
    opt.ca_file = getenv("KMSD_K8S_CA");
    opt.cert_file = getenv("KMSD_K8S_CERT");
    opt.key_file = getenv("KMSD_K8S_KEY");
    opt.socket_mode = 0600;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 's': opt.listen = optarg; break;
        case 'e': endpoints = optarg; break;
        case 'a': opt.ca_file = optarg; break;
        case 'c': opt.cert_file = optarg; break;
        case 'k': opt.key_file = optarg; break;
        case 'm': bad = parse_uint(optarg, 8, 0, 0777, &opt.socket_mode); break;
        case 'H': bad = parse_uint(optarg, 10, 50, 600000, &opt.health_interval_ms); break;
        case 'T': bad = parse_uint(optarg, 10, 50, 60000, &opt.attempt_timeout_ms); break;
        case 'M': bad = parse_uint(optarg, 10, 100, 600000, &opt.max_call_ms); break;
        case 't': bad = parse_uint(optarg, 10, 1, 64, &opt.threads); break;
        case 'l': bad = kms_log_level_parse(optarg, &level) != 0 ? -1 : 0; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return EXIT_USAGE;
        }
        if (bad != 0) {
            const char *name = "?";
            for (size_t i = 0; longopts[i].name != NULL; i++) {
                if (longopts[i].val == c) {
                    name = longopts[i].name;
                }
            }
            fprintf(stderr, "kmsd-k8s-plugin: invalid value '%s' for --%s\n", optarg, name);
            return EXIT_USAGE;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "kmsd-k8s-plugin: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return EXIT_USAGE;
    }
    if (opt.listen == NULL || endpoints == NULL || opt.ca_file == NULL ||
        opt.cert_file == NULL || opt.key_file == NULL) {
        fprintf(stderr, "kmsd-k8s-plugin: --socket, --endpoints, --ca, --cert and --key "
                        "are required\n");
        usage(stderr);
        return EXIT_USAGE;
    }
    if ((eps = strdup(endpoints)) == NULL) {
        fprintf(stderr, "kmsd-k8s-plugin: out of memory\n");
        return 1;
    }
    for (tok = strtok_r(eps, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        if (tok[0] == '\0') {
            continue;
        }
        if (opt.n_endpoints == KMS_K8S_MAX_ENDPOINTS || strchr(tok, ':') == NULL) {
            fprintf(stderr, "kmsd-k8s-plugin: --endpoints: %s\n",
                    opt.n_endpoints == KMS_K8S_MAX_ENDPOINTS ? "at most 16 endpoints"
                                                             : "each must be HOST:PORT");
            free(eps);
            return EXIT_USAGE;
        }
        opt.endpoints[opt.n_endpoints++] = tok;
    }
    if (opt.n_endpoints == 0) {
        fprintf(stderr, "kmsd-k8s-plugin: --endpoints is empty\n");
        free(eps);
        return EXIT_USAGE;
    }
    kms_log_set_level(level);

    /* signals are taken by sigwait below: block them before any thread starts */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    kms_err_clear(&err);
    /* seeds pass through this process: no core dumps, no ptrace by the same uid */
    if (kms_process_harden(&err) != 0) {
        kms_log(KMS_LOG_ERROR, "k8s-plugin", "cannot start", "error", err.msg, NULL);
        goto out;
    }
    if (kms_rpc_global_init(false, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "k8s-plugin", "cannot start", "error", err.msg, NULL);
        goto out;
    }
    if (kms_k8s_plugin_start(&opt, &p, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "k8s-plugin", "cannot start", "error", err.msg, NULL);
        kms_rpc_global_shutdown();
        goto out;
    }
    while (sigwait(&set, &sig) != 0) {
    }
    kms_log(KMS_LOG_INFO, "k8s-plugin", "stopping", "signal", sig == SIGTERM ? "TERM" : "INT",
            NULL);
    kms_k8s_plugin_stop(p, 2000);
    kms_rpc_global_shutdown();
    rc = 0;
out:
    free(eps);
    return rc;
}
