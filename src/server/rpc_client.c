/*
 * Blocking unary gRPC client over the gRPC C core (kmsctl, follower-to-leader
 * forwarding). One grpc_channel per target, shared by threads; each call uses
 * its own completion queue and one batch with every op.
 *
 * Connect timeout: gRPC 1.51 bounds each connection attempt (TCP connect and
 * TLS handshake) by max(next reconnect backoff, GRPC_ARG_MIN_RECONNECT_BACKOFF_MS),
 * so the minimum backoff *is* the connect timeout. It is set from
 * kms_rpc_channel_options.connect_timeout_ms; the initial backoff stays
 * short (100 ms) so a restarted peer is retried quickly.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <openssl/pem.h>
#include <openssl/x509.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_tsan.h"
#include "rpc_internal.h"

#define DEFAULT_MAX_MESSAGE (4 * 1024 * 1024)
#define DEFAULT_CONNECT_TIMEOUT_MS 5000u

struct kms_rpc_channel {
    grpc_channel *ch;
    char *target;
    size_t max_message;
};

int kms_rpc_peer_cn_check(const char *peer_pem, const char *cn, struct kms_err *err)
{
    BIO *bio = peer_pem != NULL ? BIO_new_mem_buf(peer_pem, -1) : NULL;
    X509 *cert = bio != NULL ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    X509_NAME *name = cert != NULL ? X509_get_subject_name(cert) : NULL;
    unsigned char *got = NULL;
    int idx, n = -1, rc;

    if (name == NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "peer certificate unreadable");
        goto out;
    }
    idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
    if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0) {
        rc = kms_err_set(err, KMS_EDENIED, "peer certificate must have exactly one CN (%s)", cn);
        goto out;
    }
    n = ASN1_STRING_to_UTF8(&got, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx)));
    if (n < 0 || (size_t)n != strlen(cn) || memcmp(got, cn, (size_t)n) != 0) {
        rc = kms_err_set(err, KMS_EDENIED, "peer certificate CN is '%.*s', expected '%s'",
                         n > 0 && n < 128 ? n : 0, n > 0 ? (const char *)got : "", cn);
        goto out;
    }
    rc = 0;
out:
    OPENSSL_free(got);
    X509_free(cert);
    BIO_free(bio);
    return rc;
}

/* grpc's verify_peer_callback: non-zero fails the handshake. */
static int expect_cn_cb(const char *target_name, const char *peer_pem, void *userdata)
{
    struct kms_err err;
    /* Written by the channel's creator, read on a gRPC handshake thread;
     * the hand-off goes through gRPC, which TSAN cannot see (kms_tsan.h). */
    KMS_TSAN_ACQUIRE(userdata);
    kms_err_clear(&err);
    if (kms_rpc_peer_cn_check(peer_pem, userdata, &err) != 0) {
        kms_log(KMS_LOG_ERROR, "rpc", "server identity refused", "target",
                target_name != NULL ? target_name : "", "error", err.msg, NULL);
        KMS_TSAN_RELEASE(userdata);
        return 1;
    }
    KMS_TSAN_RELEASE(userdata);
    return 0;
}

static void expect_cn_free_cb(void *userdata)
{
    /* The credentials' last reference may drop on another thread than the
     * handshake's; gRPC orders the two, TSAN cannot see it. */
    KMS_TSAN_ACQUIRE(userdata);
    free(userdata);
}

int kms_rpc_channel_create(const char *target, const struct kms_rpc_client_tls *tls,
                           struct kms_rpc_channel **out, struct kms_err *err)
{
    return kms_rpc_channel_create_opts(target, tls, NULL, out, err);
}

int kms_rpc_channel_create_opts(const char *target, const struct kms_rpc_client_tls *tls,
                                const struct kms_rpc_channel_options *opts,
                                struct kms_rpc_channel **out, struct kms_err *err)
{
    struct kms_rpc_channel *c;
    unsigned connect_ms = DEFAULT_CONNECT_TIMEOUT_MS;
    grpc_channel_credentials *creds = NULL;
    char *ca = NULL, *cert = NULL, *key = NULL;
    grpc_arg args[5];
    grpc_channel_args cargs;
    int rc = 0;

    *out = NULL;
    if (target == NULL || target[0] == '\0') {
        return kms_err_set(err, KMS_EINVAL, "rpc client: no target");
    }
    if (opts != NULL && opts->connect_timeout_ms != 0) {
        connect_ms = opts->connect_timeout_ms < INT32_MAX ? opts->connect_timeout_ms : INT32_MAX;
    }
    if (tls != NULL) {
        if (tls->ca_file != NULL &&
            (rc = kms_rpc_read_pem(tls->ca_file, "CA", &ca, err)) != 0) {
            goto out;
        }
        if ((tls->cert_file != NULL) != (tls->key_file != NULL)) {
            rc = kms_err_set(err, KMS_ECONFIG, "client certificate and key go together");
            goto out;
        }
        if (tls->cert_file != NULL &&
            ((rc = kms_rpc_read_pem(tls->cert_file, "certificate", &cert, err)) != 0 ||
             (rc = kms_rpc_read_pem(tls->key_file, "private key", &key, err)) != 0)) {
            goto out;
        }
        if ((rc = kms_rpc_check_tls(cert, key, ca, err)) != 0) {
            rc = kms_err_wrap(err, rc, "client TLS for %s", target);
            goto out;
        }
        verify_peer_options vopt = {NULL, NULL, NULL};
        if (opts != NULL && opts->expect_peer_cn != NULL) {
            vopt.verify_peer_callback = expect_cn_cb;
            vopt.verify_peer_callback_userdata = strdup(opts->expect_peer_cn);
            vopt.verify_peer_destruct = expect_cn_free_cb;
            if (vopt.verify_peer_callback_userdata == NULL) {
                rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
                goto out;
            }
            KMS_TSAN_RELEASE(vopt.verify_peer_callback_userdata);
        }
        if (cert != NULL) {
            grpc_ssl_pem_key_cert_pair pair = {key, cert};
            creds = grpc_ssl_credentials_create(ca, &pair, &vopt, NULL);
        } else {
            creds = grpc_ssl_credentials_create(ca, NULL, &vopt, NULL);
        }
        if (creds == NULL && vopt.verify_peer_callback_userdata != NULL) {
            free(vopt.verify_peer_callback_userdata);
        }
    } else {
        creds = grpc_insecure_credentials_create();
    }
    if (creds == NULL) {
        rc = kms_err_set(err, KMS_ETLS, "rpc client %s: cannot create credentials", target);
        goto out;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL || (c->target = strdup(target)) == NULL) {
        free(c);
        rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    c->max_message = DEFAULT_MAX_MESSAGE;
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = DEFAULT_MAX_MESSAGE;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = DEFAULT_MAX_MESSAGE;
    /* Reconnect quickly after a peer restarts (a new leader, a rolling
     * upgrade): gRPC's default backoff grows to two minutes. The minimum
     * backoff is also gRPC's per-attempt connect deadline (see the top of
     * this file): a value of 100 ms made a lossy link (one dropped SYN, a
     * slow handshake) fail within 0.1 s whatever the call deadline. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
    args[2].value.integer = 100;
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = (char *)GRPC_ARG_MIN_RECONNECT_BACKOFF_MS;
    args[3].value.integer = (int)connect_ms;
    args[4].type = GRPC_ARG_INTEGER;
    args[4].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
    args[4].value.integer = 1000;
    cargs.num_args = 5;
    cargs.args = args;
    c->ch = grpc_channel_create(target, creds, &cargs);
    if (c->ch == NULL) {
        free(c->target);
        free(c);
        rc = kms_err_set(err, KMS_EINVAL, "rpc client: cannot create channel to %s", target);
        goto out;
    }
    *out = c;
out:
    if (creds != NULL) {
        grpc_channel_credentials_release(creds);
    }
    free(ca);
    free(cert);
    kms_rpc_free_secret(key);
    return rc;
}

void kms_rpc_channel_set_max_message(struct kms_rpc_channel *ch, size_t max)
{
    if (ch != NULL && max > 0) {
        ch->max_message = max;
    }
}

void kms_rpc_channel_destroy(struct kms_rpc_channel *ch)
{
    if (ch == NULL) {
        return;
    }
    grpc_channel_destroy(ch->ch);
    free(ch->target);
    free(ch);
}

static char *slice_strdup(grpc_slice s)
{
    size_t n = GRPC_SLICE_LENGTH(s);
    char *p = malloc(n + 1);
    if (p != NULL) {
        memcpy(p, GRPC_SLICE_START_PTR(s), n);
        p[n] = '\0';
    }
    return p;
}

int kms_rpc_unary(struct kms_rpc_channel *ch, const char *method_path, const uint8_t *req,
                  size_t reqlen, unsigned deadline_ms, uint8_t **resp, size_t *resplen,
                  int *grpc_status, char **details, struct kms_err *err)
{
    return kms_rpc_unary_watch(ch, method_path, req, reqlen, deadline_ms, 0, NULL, NULL, resp,
                               resplen, grpc_status, details, err);
}

int kms_rpc_unary_watch(struct kms_rpc_channel *ch, const char *method_path,
                        const uint8_t *req, size_t reqlen, unsigned deadline_ms,
                        unsigned poll_ms, kms_rpc_keep_fn keep_cb, void *keep_arg,
                        uint8_t **resp, size_t *resplen, int *grpc_status, char **details,
                        struct kms_err *err)
{
    bool abandoned = false;
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_slice method, reqs, status_details = grpc_empty_slice();
    grpc_byte_buffer *send, *recv = NULL;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_op ops[6];
    grpc_call_error ce;
    gpr_timespec deadline;
    grpc_event ev;
    int tag = 0;
    int rc = 0;

    *resp = NULL;
    *resplen = 0;
    *grpc_status = GRPC_STATUS_UNKNOWN;
    if (details != NULL) {
        *details = NULL;
    }
    if (ch == NULL || method_path == NULL || (req == NULL && reqlen > 0)) {
        return kms_err_set(err, KMS_EINVAL, "rpc: bad arguments");
    }
    if (reqlen > ch->max_message) {
        return kms_err_set(err, KMS_ERANGE, "rpc %s: request of %zu bytes too large",
                           method_path, reqlen);
    }
    cq = grpc_completion_queue_create_for_next(NULL);
    if (cq == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "rpc: cannot create completion queue");
    }
    deadline = deadline_ms == 0
                   ? gpr_inf_future(GPR_CLOCK_REALTIME)
                   : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                  gpr_time_from_millis((int64_t)deadline_ms, GPR_TIMESPAN));
    method = grpc_slice_from_copied_string(method_path);
    call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
                                    deadline, NULL);
    grpc_slice_unref(method);
    if (call == NULL) {
        grpc_completion_queue_shutdown(cq);
        while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(cq);
        return kms_err_set(err, KMS_ENOMEM, "rpc %s: cannot create call", method_path);
    }
    reqs = grpc_slice_from_copied_buffer((const char *)req, reqlen);
    send = grpc_raw_byte_buffer_create(&reqs, 1);
    grpc_slice_unref(reqs);
    grpc_metadata_array_init(&md_init);
    grpc_metadata_array_init(&md_trail);

    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = 0;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_init;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trail;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &status_details;
    KMS_TSAN_RELEASE(&tag);
    ce = grpc_call_start_batch(call, ops, 6, &tag, NULL);
    if (ce != GRPC_CALL_OK) {
        rc = kms_err_set(err, KMS_EIO, "rpc %s: start_batch failed (%d)", method_path, (int)ce);
    } else {
        if (poll_ms == 0) {
            poll_ms = 100;
        }
        for (;;) {
            gpr_timespec wake =
                keep_cb == NULL || abandoned
                    ? gpr_inf_future(GPR_CLOCK_REALTIME)
                    : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                   gpr_time_from_millis((int64_t)poll_ms, GPR_TIMESPAN));
            ev = grpc_completion_queue_next(cq, wake, NULL);
            if (ev.type == GRPC_OP_COMPLETE && ev.tag == &tag) {
                KMS_TSAN_ACQUIRE(&tag);
                break;
            }
            if (ev.type == GRPC_QUEUE_TIMEOUT && !abandoned && !keep_cb(keep_arg)) {
                /* The caller gave up on this call (e.g. the leader it was
                 * sent to is no longer leader): cancel it locally; the batch
                 * then completes at once with CANCELLED. */
                abandoned = true;
                grpc_call_cancel(call, NULL);
            }
        }
        *grpc_status = abandoned && status != GRPC_STATUS_OK ? GRPC_STATUS_CANCELLED : (int)status;
        if (abandoned && status != GRPC_STATUS_OK) {
            if (details != NULL) {
                *details = strdup("abandoned by the caller");
            }
        } else if (details != NULL && GRPC_SLICE_LENGTH(status_details) > 0) {
            *details = slice_strdup(status_details);
        }
        if (status == GRPC_STATUS_OK) {
            grpc_byte_buffer_reader rd;
            if (recv == NULL) {
                *resp = malloc(1); /* OK with an empty message */
                if (*resp == NULL) {
                    rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
                }
            } else if (!grpc_byte_buffer_reader_init(&rd, recv)) {
                rc = kms_err_set(err, KMS_EIO, "rpc %s: cannot read response", method_path);
            } else {
                grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
                size_t n = GRPC_SLICE_LENGTH(all);
                grpc_byte_buffer_reader_destroy(&rd);
                *resp = malloc(n > 0 ? n : 1);
                if (*resp == NULL) {
                    rc = kms_err_set(err, KMS_ENOMEM, "out of memory");
                } else {
                    memcpy(*resp, GRPC_SLICE_START_PTR(all), n);
                    *resplen = n;
                }
                memset(GRPC_SLICE_START_PTR(all), 0, n);
                grpc_slice_unref(all);
            }
        }
    }
    if (recv != NULL) {
        grpc_byte_buffer_destroy(recv);
    }
    grpc_byte_buffer_destroy(send);
    grpc_slice_unref(status_details);
    grpc_metadata_array_destroy(&md_init);
    grpc_metadata_array_destroy(&md_trail);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    if (rc != 0 && details != NULL) {
        free(*details);
        *details = NULL;
    }
    return rc;
}

#define KMS_RPC_STATUS_NAME(c, name, camel, desc) [c] = name,
#define KMS_RPC_STATUS_CAMEL(c, name, camel, desc) [c] = camel,
#define KMS_RPC_STATUS_DESC(c, name, camel, desc) [c] = desc,
static const char *const status_names[] = {KMS_RPC_STATUS_TABLE(KMS_RPC_STATUS_NAME)};
static const char *const status_camel[] = {KMS_RPC_STATUS_TABLE(KMS_RPC_STATUS_CAMEL)};
static const char *const status_desc[] = {KMS_RPC_STATUS_TABLE(KMS_RPC_STATUS_DESC)};

static bool status_known(int s)
{
    return s >= 0 && (size_t)s < sizeof(status_names) / sizeof(status_names[0]);
}

const char *kms_rpc_status_name(int s)
{
    return status_known(s) ? status_names[s] : "UNKNOWN_STATUS";
}

const char *kms_rpc_status_camel(int s)
{
    return status_known(s) ? status_camel[s] : "Unknown";
}

const char *kms_rpc_status_desc(int s)
{
    return status_known(s) ? status_desc[s] : NULL;
}
