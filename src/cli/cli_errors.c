/*
 * kmsctl errors: how a failed call is told to the operator. gRPC status
 * names, the exit code for a status, and the classification of a failure
 * (refused, timed out, TLS, other transport, or an answer from the server)
 * into one readable line. See cli_common.h.
 */
#include "cli_common.h"

#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>

#include "kms_rpc.h"

const char *cli_grpc_code_name(int s)
{
    return kms_rpc_status_camel(s);
}

int cli_exit_for_grpc(int s)
{
    return s == GRPC_STATUS_OK ? CLI_EXIT_OK : CLI_EXIT_REMOTE;
}

void cli_format_rpc_error(char *buf, size_t len, const char *op, int s, const char *details)
{
    const char *desc = kms_rpc_status_desc(s);
    char *safe = cli_safe_dup(details != NULL && details[0] != '\0' ? details
                          : desc != NULL                         ? desc
                                                                 : "unknown error");
    snprintf(buf, len, "Error: %s%s%s (code %s)", op != NULL ? op : "",
             op != NULL && op[0] ? ": " : "", safe != NULL ? safe : "?", cli_grpc_code_name(s));
    free(safe);
}

enum cli_fail_kind cli_fail_classify(int s, const char *details)
{
    const char *d = details != NULL ? details : "";
    if (s == GRPC_STATUS_DEADLINE_EXCEEDED) {
        /* gRPC core's own deadline text; kmsd's deadlines carry their own
         * words ("timed out waiting for ..."). */
        return strcmp(d, "") == 0 || strcmp(d, "Deadline Exceeded") == 0 ? CLI_FAIL_TIMEOUT
                                                                           : CLI_FAIL_APP;
    }
    if (s != GRPC_STATUS_UNAVAILABLE) {
        return CLI_FAIL_APP;
    }
    if (strstr(d, "Connection refused") != NULL) {
        return CLI_FAIL_REFUSED;
    }
    if (strstr(d, "Timeout occurred") != NULL || strstr(d, "timed out") != NULL ||
        strstr(d, "Connection timed out") != NULL) {
        return strstr(d, "failed to connect") != NULL || strstr(d, "Timeout occurred") != NULL
                   ? CLI_FAIL_TIMEOUT
                   : CLI_FAIL_APP;
    }
    if (strstr(d, "Socket closed") != NULL || strstr(d, "andshake") != NULL ||
        strstr(d, "SSL") != NULL || strstr(d, "Ssl") != NULL || strstr(d, "TLS") != NULL ||
        strstr(d, "Connection reset") != NULL || strstr(d, "Broken pipe") != NULL) {
        return CLI_FAIL_TLS;
    }
    if (strstr(d, "failed to connect") != NULL || strstr(d, "DNS resolution failed") != NULL ||
        strstr(d, "empty address list") != NULL || strstr(d, "No route to host") != NULL ||
        strstr(d, "Network is unreachable") != NULL || strstr(d, "Connect Failed") != NULL ||
        strstr(d, "Failed to connect") != NULL || d[0] == '\0') {
        return CLI_FAIL_TRANSPORT;
    }
    return CLI_FAIL_APP;
}

/* An operator-readable line for a failure gRPC core reported (kind !=
 * CLI_FAIL_APP), or for the server refusing the client certificate. */
void cli_explain_failure(struct cli_ctx *ctx, char *buf, size_t len, const char *op,
                            enum cli_fail_kind kind, int s, const char *details)
{
    const char *t = ctx->g.target != NULL ? ctx->g.target : "";
    char *safe = cli_safe_dup(details != NULL ? details : "");
    switch (kind) {
    case CLI_FAIL_REFUSED:
        snprintf(buf, len,
                 "Error: %s: %s: connection refused: nothing listens there (is kmsd running, "
                 "and is this its cluster API port?)",
                 op, t);
        break;
    case CLI_FAIL_TIMEOUT:
        snprintf(buf, len,
                 "Error: %s: %s: no answer within %u ms (--timeout): host down, a firewall "
                 "dropping packets, or a wrong address",
                 op, t, ctx->g.timeout_ms);
        break;
    case CLI_FAIL_TLS:
        if (ctx->g.cert == NULL && !ctx->g.insecure) {
            snprintf(buf, len,
                     "Error: %s: %s: the TLS handshake failed (%s): no client certificate "
                     "configured: the cluster API needs an operator certificate: give --cert "
                     "and --key (KMSCTL_CERT, KMSCTL_KEY)",
                     op, t, safe != NULL ? safe : "?");
            break;
        }
        if (safe != NULL && (strstr(safe, "0A000086") != NULL ||
                             strstr(safe, "certificate verify failed") != NULL ||
                             strstr(safe, "CERTIFICATE_VERIFY_FAILED") != NULL)) {
            snprintf(buf, len,
                     "Error: %s: %s: the server certificate is not signed by the CA %s (TLS "
                     "certificate verify failed): give --cacert the CA of the cluster API",
                     op, t, ctx->g.cacert != NULL ? ctx->g.cacert : "(system roots)");
            break;
        }
        snprintf(buf, len,
                 "Error: %s: %s: the TLS handshake failed (%s): likely the server certificate "
                 "is not signed by the CA %s, or the server refused the client certificate %s "
                 "(not signed by its operator CA)",
                 op, t, safe != NULL ? safe : "?",
                 ctx->g.cacert != NULL ? ctx->g.cacert : "(system roots: give --cacert)",
                 ctx->g.cert != NULL ? ctx->g.cert : "(none)");
        break;
    case CLI_FAIL_TRANSPORT:
        snprintf(buf, len, "Error: %s: %s: cannot connect: %s (code %s)", op, t,
                 safe != NULL && safe[0] ? safe : "unavailable", cli_grpc_code_name(s));
        break;
    case CLI_FAIL_APP:
        if (s == GRPC_STATUS_PERMISSION_DENIED || s == GRPC_STATUS_UNAUTHENTICATED) {
            snprintf(buf, len,
                     "Error: %s: %s refused the client certificate %s: not an operator "
                     "certificate this cluster accepts (%s) (code %s)",
                     op, t, ctx->g.cert != NULL ? ctx->g.cert : "(none)",
                     safe != NULL && safe[0] ? safe : "permission denied",
                     cli_grpc_code_name(s));
        } else {
            cli_format_rpc_error(buf, len, op, s, details);
        }
        break;
    }
    free(safe);
}
