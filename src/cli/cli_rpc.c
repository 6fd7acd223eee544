/*
 * kmsctl calls: the lazy connection to the cluster API (local TLS file
 * checks first), one Operator call with fail-over to the next endpoint and
 * a follower's leader redirect, and cli_call, the connect / call /
 * report / free sequence every command's *_run shares. See cli_common.h.
 */
#include "cli_common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_err.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_tls_check.h"

/* ---- RPC ------------------------------------------------------------- */

static int connect_once(struct cli_ctx *ctx, const char *op)
{
    struct kms_err err;
    kms_err_clear(&err);
    if (!ctx->rpc_inited) {
        /* gRPC's own log lines go through kms_log: keep the terminal clean
         * unless the operator asks for them (KMSD_LOG_LEVEL=debug). */
        const char *lv = getenv("KMSD_LOG_LEVEL");
        enum kms_log_level level;
        if (lv == NULL || kms_log_level_parse(lv, &level) != 0) {
            kms_log_set_level(KMS_LOG_ERROR);
        }
        if (kms_rpc_global_init(false, &err) != 0) {
            fprintf(ctx->err, "Error: %s: ", op);
            cli_write_safe(ctx->err, err.msg);
            fputc('\n', ctx->err);
            return CLI_EXIT_LOCAL;
        }
        ctx->rpc_inited = true;
    }
    if (ctx->ch == NULL && !ctx->g.insecure && !ctx->tls_checked) {
        /* gRPC 1.51 says little when a handshake fails: check locally what
         * can be checked first. (Without a client certificate the
         * handshake fails; the error then says none was configured.) */
        struct kms_check_report rep = {ctx->err, op, 0, 0, true};
        if (ctx->g.cert != NULL) {
            (void)kms_tls_check_pair(&rep, ctx->g.cert_src, ctx->g.cert, ctx->g.key,
                                     KMS_CERT_CLIENT, NULL);
        }
        if (ctx->g.cacert != NULL) {
            (void)kms_tls_check_ca(&rep, ctx->g.cacert_src, ctx->g.cacert, NULL, NULL);
        }
        if (rep.errors > 0) {
            return CLI_EXIT_LOCAL;
        }
        ctx->tls_checked = true;
    }
    if (ctx->ch == NULL) {
        struct kms_rpc_client_tls tls = {ctx->g.cacert, ctx->g.cert, ctx->g.key};
        /* One connection attempt may take the whole --timeout (a lossy or
         * slow link), not gRPC's reconnect backoff. */
        struct kms_rpc_channel_options copts = {ctx->g.timeout_ms, NULL};
        if (kms_rpc_channel_create_opts(ctx->g.target, ctx->g.insecure ? NULL : &tls, &copts,
                                        &ctx->ch, &err) != 0) {
            fprintf(ctx->err, "Error: %s: ", op);
            cli_write_safe(ctx->err, err.msg);
            fputc('\n', ctx->err);
            return CLI_EXIT_LOCAL;
        }
    }
    return 0;
}

bool cli_leader_redirect_parse(const char *details, uint64_t *id, char *addr, size_t addrlen)
{
    static const char pre[] = "not the leader; the leader is node ";
    static const char mid[] = ", cluster API at ";
    const char *p;
    char *end = NULL;
    unsigned long long v;
    size_t n;

    if (details == NULL || (p = strstr(details, pre)) == NULL) {
        return false;
    }
    p += sizeof(pre) - 1;
    if (*p < '1' || *p > '9') {
        return false;
    }
    errno = 0;
    v = strtoull(p, &end, 10);
    if (errno != 0 || end == NULL || strncmp(end, mid, sizeof(mid) - 1) != 0) {
        return false;
    }
    p = end + sizeof(mid) - 1;
    n = strcspn(p, " \t\r\n;,");
    if (n == 0 || n >= addrlen) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c >= 0x7f) {
            return false;
        }
    }
    memcpy(addr, p, n);
    addr[n] = '\0';
    *id = (uint64_t)v;
    return true;
}

static void rpc_fail(struct cli_ctx *ctx, const char *msg)
{
    size_t l = strlen(msg);
    if (l >= sizeof(ctx->last_error)) {
        l = sizeof(ctx->last_error) - 1;
    }
    memcpy(ctx->last_error, msg, l);
    ctx->last_error[l] = '\0';
    if (!ctx->quiet) {
        fprintf(ctx->err, "%s\n", msg);
    }
}

/* Writes run on the leader: a follower answers "not the leader; the leader
 * is node N, cluster API at ADDR" having changed nothing, and the call is
 * sent again there, at most CLI_MAX_REDIRECTS times. */
#define CLI_MAX_REDIRECTS 2

int cli_rpc(struct cli_ctx *ctx, const char *op, const char *method,
            const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
            ProtobufCMessage **resp, bool secret)
{
    char path[96];
    uint8_t *buf = NULL, *rbuf = NULL;
    size_t n, rlen = 0;
    int status = GRPC_STATUS_UNKNOWN, rc, ex = CLI_EXIT_OK;
    char *details = NULL;
    struct kms_err err;
    unsigned hops = 0;

    *resp = NULL;
    kms_err_clear(&err);
    ctx->last_unreachable = false;
    ctx->last_error[0] = '\0';
    snprintf(path, sizeof(path), "/kmsd.v1.Operator/%s", method);
    n = protobuf_c_message_get_packed_size(req);
    buf = malloc(n > 0 ? n : 1);
    if (buf == NULL) {
        fprintf(ctx->err, "Error: %s: out of memory\n", op);
        return CLI_EXIT_LOCAL;
    }
    protobuf_c_message_pack(req, buf);
again:
    if (ctx->fake_rpc == NULL && (rc = connect_once(ctx, op)) != 0) {
        ex = rc;
        goto out;
    }
    if (ctx->fake_rpc != NULL) {
        rc = ctx->fake_rpc(ctx->fake_arg, path, buf, n, &rbuf, &rlen, &status, &details);
        if (rc != 0) {
            kms_err_set(&err, rc, "%s", "fake transport failed");
        }
    } else {
        rc = kms_rpc_unary(ctx->ch, path, buf, n, ctx->g.timeout_ms, &rbuf, &rlen, &status,
                           &details, &err);
    }
    if (rc != 0) {
        fprintf(ctx->err, "Error: %s: ", op);
        cli_write_safe(ctx->err, err.msg[0] ? err.msg : kms_strerror(rc));
        fputc('\n', ctx->err);
        ex = CLI_EXIT_LOCAL;
        goto out;
    }
    if (status != GRPC_STATUS_OK) {
        enum cli_fail_kind kind = cli_fail_classify(status, details);
        char msg[1024];
        if (kind != CLI_FAIL_APP && ctx->g.cur_target + 1 < ctx->g.n_targets &&
            ctx->g.target == ctx->g.targets[ctx->g.cur_target]) {
            /* The call never reached this replica: try the next one. */
            cli_explain_failure(ctx, msg, sizeof(msg), op, kind, status, details);
            if (!ctx->quiet) {
                fprintf(ctx->err, "%s\nNote: trying the next endpoint, %s\n", msg,
                        ctx->g.targets[ctx->g.cur_target + 1]);
            }
            ctx->g.cur_target++;
            ctx->g.target = ctx->g.targets[ctx->g.cur_target];
            goto retry;
        }
        char where[160];
        uint64_t lid = 0;
        char laddr[sizeof(ctx->redirect_target)];

        if (hops < CLI_MAX_REDIRECTS &&
            cli_leader_redirect_parse(details, &lid, laddr, sizeof(laddr)) &&
            (ctx->g.target == NULL || strcmp(laddr, ctx->g.target) != 0)) {
            hops++;
            fprintf(ctx->err, "Note: %s is not the leader; sending %s to leader %llu at ",
                    ctx->g.target != NULL ? ctx->g.target : "", op, (unsigned long long)lid);
            cli_write_safe(ctx->err, laddr);
            fputc('\n', ctx->err);
            memcpy(ctx->redirect_target, laddr, sizeof(laddr));
            ctx->g.target = ctx->redirect_target;
            goto retry;
        }
        /* Transport failures: say which endpoint could not be reached. */
        if (status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED) {
            snprintf(where, sizeof(where), "%s: %s", op, ctx->g.target ? ctx->g.target : "");
        } else {
            snprintf(where, sizeof(where), "%s", op);
        }
        ctx->last_unreachable = kind != CLI_FAIL_APP;
        if (kind != CLI_FAIL_APP || status == GRPC_STATUS_PERMISSION_DENIED ||
            status == GRPC_STATUS_UNAUTHENTICATED) {
            cli_explain_failure(ctx, msg, sizeof(msg), op, kind, status, details);
        } else {
            cli_format_rpc_error(msg, sizeof(msg), where, status, details);
        }
        rpc_fail(ctx, msg);
        ex = cli_exit_for_grpc(status);
        goto out;
    }
    *resp = protobuf_c_message_unpack(resp_desc, NULL, rlen, rbuf);
    if (*resp == NULL) {
        fprintf(ctx->err, "Error: %s: malformed response from the server\n", op);
        ex = CLI_EXIT_REMOTE;
    }
    goto out;
retry:
    /* The call goes to another endpoint (fail-over or leader redirect). */
    if (ctx->ch != NULL) {
        kms_rpc_channel_destroy(ctx->ch);
        ctx->ch = NULL;
    }
    if (rbuf != NULL && secret) {
        OPENSSL_cleanse(rbuf, rlen);
    }
    free(details);
    details = NULL;
    free(rbuf);
    rbuf = NULL;
    goto again;
out:
    if (secret) {
        OPENSSL_cleanse(buf, n);
    }
    free(buf);
    if (rbuf != NULL && secret) {
        OPENSSL_cleanse(rbuf, rlen);
    }
    free(rbuf);
    free(details);
    return ex;
}

int cli_call(struct cli_ctx *ctx, const struct cli_method *m, const ProtobufCMessage *req,
             cli_resp_cb resp_cb, void *arg)
{
    ProtobufCMessage *resp = NULL;
    int rc = cli_rpc(ctx, m->op, m->name, req, m->resp_desc, &resp, m->secret);

    if (rc != 0) {
        return rc;
    }
    rc = resp_cb != NULL ? resp_cb(ctx, resp, arg) : CLI_EXIT_OK;
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

int cli_leaf_call(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                  const struct cli_method *m, const ProtobufCMessage *req, cli_resp_cb resp_cb,
                  void *arg)
{
    int rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL);

    if (rc >= 0) {
        return rc;
    }
    return cli_call(ctx, m, req, resp_cb, arg);
}
