/*
 * The gRPC server's TLS: credentials for its listener and the certificate
 * reload (kms_rpc_server_reload_tls).
 *
 * A server that may reload in place gets credentials with a
 * certificate-config fetcher: gRPC 1.51 calls fetch_cert_config at every
 * handshake, on whichever gRPC thread does the handshake (often another
 * server's worker). kms_rpc_server_reload_tls() only sets srv->reload (any
 * thread, signal-safe); the next handshake's fetch re-reads the files under
 * srv->tls_mu and keeps the old material when they are unusable.
 * kms_rpc_server_destroy() takes tls_mu once after gRPC's shutdown, so a
 * fetch still running has finished before srv is freed.
 *
 * A TLS 1.3-only server in a process that allows TLS 1.2 gets static
 * credentials instead (see needs_static_tls) and is rebuilt to reload.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "rpc_internal.h"

/* Reads cert, key and roots. For server-only TLS without a CA, the server's
 * own chain stands in as roots: gRPC 1.51 aborts on NULL pem_root_certs in
 * fetched configs, and they are unused when no client cert is requested. */
int rpc_tls_load(struct kms_rpc_server *srv, char **cert, char **key, char **roots,
                 struct kms_err *err)
{
    int rc;
    *cert = *key = *roots = NULL;
    if ((rc = kms_rpc_read_pem(srv->cert_file, "certificate", cert, err)) != 0 ||
        (rc = kms_rpc_read_pem(srv->key_file, "private key", key, err)) != 0) {
        goto fail;
    }
    if (srv->ca_file != NULL) {
        if ((rc = kms_rpc_read_pem(srv->ca_file, "CA", roots, err)) != 0) {
            goto fail;
        }
    } else if ((*roots = strdup(*cert)) == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = kms_rpc_check_tls(*cert, *key, srv->ca_file != NULL ? *roots : NULL, err)) != 0) {
        rc = kms_err_wrap(err, rc, "%s / %s", srv->cert_file, srv->key_file);
        goto fail;
    }
    return 0;
fail:
    free(*cert);
    kms_rpc_free_secret(*key);
    free(*roots);
    *cert = *key = *roots = NULL;
    return rc;
}

/* gRPC 1.51 calls this at every handshake. */
static grpc_ssl_certificate_config_reload_status fetch_cert_config(
    void *user_data, grpc_ssl_server_certificate_config **config)
{
    struct kms_rpc_server *srv = user_data;
    grpc_ssl_certificate_config_reload_status st = GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED;
    char *cert, *key, *roots;
    struct kms_err err;

    *config = NULL;
    if (srv->tls_given && !atomic_load(&srv->reload)) {
        return st;
    }
    pthread_mutex_lock(&srv->tls_mu);
    if (!srv->tls_given || atomic_exchange(&srv->reload, false)) {
        kms_err_clear(&err);
        if (rpc_tls_load(srv, &cert, &key, &roots, &err) != 0) {
            kms_log(KMS_LOG_ERROR, "rpc",
                    srv->tls_given ? "TLS reload failed, keeping the current certificate"
                                   : "cannot load TLS certificate",
                    "addr", srv->listen, "error", err.msg, NULL);
            st = srv->tls_given ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED
                                : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
        } else {
            grpc_ssl_pem_key_cert_pair pair = {key, cert};
            *config = grpc_ssl_server_certificate_config_create(roots, &pair, 1);
            kms_rpc_free_secret(key);
            free(cert);
            free(roots);
            if (*config == NULL) {
                st = srv->tls_given ? GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_UNCHANGED
                                    : GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_FAIL;
            } else {
                if (srv->tls_given) {
                    kms_log(KMS_LOG_INFO, "rpc", "TLS certificate reloaded", "addr",
                            srv->listen, NULL);
                }
                srv->tls_given = true;
                st = GRPC_SSL_CERTIFICATE_CONFIG_RELOAD_NEW;
            }
        }
    }
    pthread_mutex_unlock(&srv->tls_mu);
    return st;
}

void kms_rpc_server_reload_tls(struct kms_rpc_server *srv)
{
    if (srv != NULL && srv->mode != KMS_RPC_INSECURE) {
        atomic_store(&srv->reload, true);
    }
}

/* gRPC 1.51 has no C API for a per-server TLS version floor (the process
 * policy from kms_rpc_global_init is the only knob), but its credentials
 * object has one: grpc_ssl_server_credentials::set_min_tls_version, an
 * exported non-virtual member (Itanium ABI: `this` first). Only static
 * credentials honour it: with a certificate-config fetcher, every config
 * the fetcher returns builds an SSL_CTX with the default versions. So a
 * server that must stay TLS 1.3-only while the process allows 1.2
 * (talos.tls12) gets static credentials, and its owner reloads it by
 * rebuilding it (kms_rpc_server_reload_needs_rebuild).
 * tests/integration/test_adv_hygiene.py checks both ports with s_client. */
extern void _ZN27grpc_ssl_server_credentials19set_min_tls_versionE16grpc_tls_version(
    grpc_server_credentials *self, grpc_tls_version v);

static bool needs_static_tls(const struct kms_rpc_server *srv)
{
    return srv->mode != KMS_RPC_INSECURE && !srv->allow_tls12 && kms_rpc_tls12_allowed();
}

bool kms_rpc_server_reload_needs_rebuild(const struct kms_rpc_server *srv)
{
    /* the h2 transport builds its own SSL_CTX, with the floor, on reload */
    return srv != NULL && srv->transport != KMS_RPC_H2 && needs_static_tls(srv);
}

grpc_server_credentials *rpc_tls_creds_create(struct kms_rpc_server *srv)
{
    grpc_ssl_server_credentials_options *opts;
    grpc_server_credentials *creds = NULL;
    grpc_ssl_client_certificate_request_type req =
        srv->mode == KMS_RPC_MTLS ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    if (srv->mode == KMS_RPC_INSECURE) {
        return grpc_insecure_server_credentials_create();
    }
    if (needs_static_tls(srv)) {
        char *cert, *key, *roots;
        struct kms_err err;
        kms_err_clear(&err);
        if (rpc_tls_load(srv, &cert, &key, &roots, &err) != 0) {
            kms_log(KMS_LOG_ERROR, "rpc", "cannot load TLS certificate", "addr", srv->listen,
                    "error", err.msg, NULL);
            return NULL;
        }
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_server_credentials_create_ex(roots, &pair, 1, req, NULL);
        kms_rpc_free_secret(key);
        free(cert);
        free(roots);
        if (creds != NULL) {
            _ZN27grpc_ssl_server_credentials19set_min_tls_versionE16grpc_tls_version(creds,
                                                                                    TLS1_3);
        }
        return creds;
    }
    opts = grpc_ssl_server_credentials_create_options_using_config_fetcher(req, fetch_cert_config,
                                                                           srv);
    if (opts == NULL) {
        return NULL;
    }
    return grpc_ssl_server_credentials_create_with_options(opts); /* takes opts */
}
