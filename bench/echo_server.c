/*
 * kms-echo-server: the ceiling for bench/bench_unseal.py.
 *
 * A gRPC server on the same stack as kmsd's Talos API (src/server/kms_rpc.h:
 * gRPC C core, OpenSSL, the same TLS version policy, 4 KiB messages, the same
 * worker model) whose /sidero.kms.KMSService/Unseal (and Seal) handler does
 * nothing but answer a fixed Response{data = 32 bytes 0x00..0x1f}. Whatever
 * kmsd does per Unseal on top of the TLS handshake and HTTP/2 + gRPC framing
 * is what separates it from this server.
 *
 *   kms-echo-server --listen 127.0.0.1:27290 --cert node1.pem --key node1-key.pem
 *                   [--workers N] [--tls12] [--plaintext]
 *
 * Prints "listening on PORT" on stdout once bound; stops on SIGINT/SIGTERM;
 * SIGHUP re-reads the certificate and key (kms_rpc_server_reload_tls), like
 * kmsd.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_err.h"
#include "kms_rpc.h"

/* Response { bytes data = 1; } with data = 0x00..0x1f. */
static uint8_t fixed_resp[2 + 32];

static void on_unseal(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t reqlen)
{
    (void)arg;
    (void)req;
    (void)reqlen;
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, fixed_resp, sizeof(fixed_resp));
}

static void usage(void)
{
    fprintf(stderr, "usage: kms-echo-server --listen HOST:PORT (--cert FILE --key FILE | "
                    "--plaintext) [--workers N] [--tls12]\n");
    exit(64);
}

int main(int argc, char **argv)
{
    struct kms_rpc_server_config cfg;
    struct kms_rpc_server *srv = NULL;
    struct kms_err err;
    bool tls12 = false, plaintext = false;
    sigset_t set;
    int sig = 0;

    memset(&cfg, 0, sizeof(cfg));
    cfg.mode = KMS_RPC_TLS;
    cfg.max_message = 4096; /* kmsd's talos.maxMessageBytes default */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--listen") == 0 && v != NULL) {
            cfg.listen = v;
            i++;
        } else if (strcmp(a, "--cert") == 0 && v != NULL) {
            cfg.cert_file = v;
            i++;
        } else if (strcmp(a, "--key") == 0 && v != NULL) {
            cfg.key_file = v;
            i++;
        } else if (strcmp(a, "--workers") == 0 && v != NULL) {
            cfg.workers = (unsigned)strtoul(v, NULL, 10);
            i++;
        } else if (strcmp(a, "--tls12") == 0) {
            tls12 = true;
        } else if (strcmp(a, "--plaintext") == 0) {
            plaintext = true;
        } else {
            usage();
        }
    }
    if (cfg.listen == NULL || (!plaintext && (cfg.cert_file == NULL || cfg.key_file == NULL))) {
        usage();
    }
    if (plaintext) {
        cfg.mode = KMS_RPC_INSECURE;
        cfg.cert_file = cfg.key_file = NULL;
    }
    fixed_resp[0] = 0x0a; /* field 1, length-delimited */
    fixed_resp[1] = 32;
    for (int i = 0; i < 32; i++) {
        fixed_resp[2 + i] = (uint8_t)i;
    }

    /* Signals are taken synchronously; block them before any thread exists. */
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    kms_err_clear(&err);
    if (kms_rpc_global_init(tls12, &err) != 0) {
        fprintf(stderr, "kms-echo-server: %s\n", err.msg);
        return 1;
    }
    if (kms_rpc_server_create(&cfg, &srv, &err) != 0 ||
        kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Unseal", on_unseal, NULL) != 0 ||
        kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Seal", on_unseal, NULL) != 0 ||
        kms_rpc_server_start(srv, &err) != 0) {
        fprintf(stderr, "kms-echo-server: %s\n", err.msg[0] ? err.msg : "cannot start");
        kms_rpc_server_destroy(srv);
        kms_rpc_global_shutdown();
        return 1;
    }
    printf("listening on %d\n", kms_rpc_server_port(srv));
    fflush(stdout);

    while (sigwait(&set, &sig) == 0 && sig == SIGHUP) {
        kms_rpc_server_reload_tls(srv);
    }
    kms_rpc_server_stop(srv, 1000);
    kms_rpc_server_destroy(srv);
    kms_rpc_global_shutdown();
    return 0;
}
