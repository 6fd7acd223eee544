/*
 * kmsctl operator rekey init | status | update | cancel: replace the key
 * shares (and the root key under them) without touching any sealed disk.
 * Vault's shape (`vault operator rekey`): init returns a nonce, holders of
 * the current shares each run `update --nonce NONCE` with one share, the
 * last one receives the new shares, printed once.
 *
 * Shares are read like `operator unseal` reads them (cli_share_input.c):
 * from a hidden prompt or stdin ('-'); one on argv is wiped from argv at
 * once; each is checked locally first and wiped with the request and
 * response.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>

#include "cli_common.h"
#include "kms_crypto.h"

const char cli_rekey_usage[] =
    "Usage: kmsctl operator rekey COMMAND [flags]\n"
    "\n"
    "Replaces the key shares: a new root key split into new shares, the keyring\n"
    "re-encrypted under it in one replicated write. Holders of the CURRENT\n"
    "shares each give one against the rekey's nonce; the old shares stop\n"
    "working once it commits. Runs on the leader (kmsctl follows it); a leader\n"
    "change cancels a rekey in progress.";

static unsigned long rk_shares, rk_threshold;
static char *rk_nonce;

static const struct cli_flag rekey_init_flags[] = {
    {"key-shares", 0, CLI_FLAG_UINT, &rk_shares, NULL, 0, ~0UL, "N",
     "number of NEW key shares (default 5, at most 255)", false},
    {"key-threshold", 0, CLI_FLAG_UINT, &rk_threshold, NULL, 0, ~0UL, "K",
     "NEW shares needed to unseal (default 3, 2 <= K <= N)", false},
    CLI_FLAG_END,
};

static const struct cli_flag rekey_nonce_flags[] = {
    {"nonce", 0, CLI_FLAG_STRING, &rk_nonce, NULL, 0, 0, "NONCE",
     "the rekey's nonce (from rekey init or rekey status)", false},
    CLI_FLAG_END,
};

static void status_print(struct cli_ctx *ctx, const Kmsd__V1__RekeyStatusResponse *r)
{
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_bool(&j, "started", r->started);
        cli_json_str(&j, "nonce", r->nonce);
        cli_json_u64(&j, "progress", r->progress);
        cli_json_u64(&j, "required", r->required);
        cli_json_u64(&j, "new_shares", r->new_shares);
        cli_json_u64(&j, "new_threshold", r->new_threshold);
        cli_json_time(&j, "started_at", r->started_at);
        cli_json_doc_end(&j);
        return;
    }
    if (!r->started) {
        fputs("Rekey in progress: false\n", ctx->out);
        return;
    }
    char t[40];
    cli_format_time(r->started_at, false, t, sizeof(t));
    fputs("Rekey in progress: true\nNonce: ", ctx->out);
    cli_write_safe(ctx->out, r->nonce);
    fprintf(ctx->out,
            "\nStarted: %s\nProgress: %u/%u current shares\nNew Shares: %u\n"
            "New Threshold: %u\n",
            t, r->progress, r->required, r->new_shares, r->new_threshold);
}

static int status_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)arg;
    status_print(ctx, (const Kmsd__V1__RekeyStatusResponse *)resp);
    return CLI_EXIT_OK;
}

/* rekey init: the status, then what each share holder runs next. */
static int init_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    const Kmsd__V1__RekeyStatusResponse *r = (const Kmsd__V1__RekeyStatusResponse *)resp;

    (void)arg;
    status_print(ctx, r);
    if (ctx->g.out != CLI_OUT_JSON) {
        fprintf(ctx->out,
                "\nEach holder of a current share now runs:\n"
                "  kmsctl operator rekey update --nonce %s\n"
                "(%u of them). The last one receives the %u new shares.\n",
                r->nonce, r->required, r->new_shares);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method init_method = {
    "rekey init", "RekeyInit", &kmsd__v1__rekey_status_response__descriptor, false};
static const struct cli_method status_method = {
    "rekey status", "RekeyStatus", &kmsd__v1__rekey_status_response__descriptor, false};
static const struct cli_method cancel_method = {
    "rekey cancel", "RekeyCancel", &kmsd__v1__rekey_cancel_response__descriptor, false};
static const struct cli_method update_method = {
    "rekey update", "RekeyUpdate", &kmsd__v1__rekey_update_response__descriptor, true};

static int rekey_init_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__RekeyInitRequest req = KMSD__V1__REKEY_INIT_REQUEST__INIT;
    char errbuf[CLI_ERRBUF];
    int rc;

    rk_shares = 5;
    rk_threshold = 3;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (cli_init_check(rk_shares, rk_threshold, false, errbuf, sizeof(errbuf)) != 0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    req.key_shares = (uint32_t)rk_shares;
    req.key_threshold = (uint32_t)rk_threshold;
    return cli_call(ctx, &init_method, &req.base, init_print_cb, NULL);
}

static int rekey_status_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__RekeyStatusRequest req = KMSD__V1__REKEY_STATUS_REQUEST__INIT;
    return cli_leaf_call(ctx, cmd, argc, argv, &status_method, &req.base, status_print_cb, NULL);
}

static int cancel_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)resp;
    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_bool(ctx->out, "cancelled", true);
    } else {
        fputs("Success! Rekey cancelled; the shares given were wiped. The current shares\n"
              "stay valid.\n",
              ctx->out);
    }
    return CLI_EXIT_OK;
}

static int rekey_cancel_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__RekeyCancelRequest req = KMSD__V1__REKEY_CANCEL_REQUEST__INIT;
    int rc;

    rk_nonce = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    req.nonce = rk_nonce != NULL ? rk_nonce : "";
    return cli_call(ctx, &cancel_method, &req.base, cancel_print_cb, NULL);
}

static void update_print(struct cli_ctx *ctx, const Kmsd__V1__RekeyUpdateResponse *r)
{
    bool done = r->n_shares > 0;
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_str(&j, "nonce", r->nonce);
        cli_json_u64(&j, "progress", r->progress);
        cli_json_u64(&j, "required", r->required);
        cli_json_bool(&j, "complete", r->complete);
        cli_json_str_array(&j, "shares", r->shares, r->n_shares);
        if (done) {
            cli_json_u64(&j, "threshold", r->threshold);
        }
        if (r->note != NULL && r->note[0] != '\0') {
            cli_json_str(&j, "warning", r->note);
        }
        cli_json_doc_end(&j);
    } else if (!done) {
        fprintf(ctx->out, "Rekey Progress: %u/%u current shares\n", r->progress, r->required);
    } else {
        cli_print_shares(ctx->out, "New Unseal Key", r->shares, r->n_shares);
        fprintf(ctx->out,
                "\nRekey complete: %zu new key shares, key threshold %u. The old shares no\n"
                "longer unseal any replica. Every unsealed replica switched without a\n"
                "restart; sealed and restarted replicas need %u of these new shares.\n",
                r->n_shares, r->threshold, r->threshold);
    }
    if (done) {
        fprintf(ctx->err,
                "WARNING: these %zu new key shares are shown only once; kmsd does not store "
                "them. Hand each to a different holder now.\n",
                r->n_shares);
    }
    if (r->note != NULL && r->note[0] != '\0') {
        fputs("WARNING: ", ctx->err);
        cli_write_safe(ctx->err, r->note);
        fputc('\n', ctx->err);
    }
}

static int update_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    Kmsd__V1__RekeyUpdateResponse *r = (Kmsd__V1__RekeyUpdateResponse *)resp;

    (void)arg;
    update_print(ctx, r);
    cli_shares_wipe(ctx->out, r->shares, r->n_shares);
    return CLI_EXIT_OK;
}

static int rekey_update_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__RekeyUpdateRequest req = KMSD__V1__REKEY_UPDATE_REQUEST__INIT;
    char share[KMS_SHARE_TEXT_MAX * 2];
    struct cli_share_in in = {share, sizeof(share), 0, false, 0};
    int rc;

    rk_nonce = NULL;
    if ((rc = cli_share_parse(ctx, cmd, argc, argv, &in)) >= 0) {
        return rc;
    }
    if (rk_nonce == NULL || rk_nonce[0] == '\0') {
        OPENSSL_cleanse(share, sizeof(share));
        return cli_usage_error(ctx, "--nonce is required (see kmsctl operator rekey status)");
    }
    if ((rc = cli_share_get(ctx, "rekey update", &in, "Current Unseal Key (will be hidden): ",
                            false, NULL)) != 0) {
        return rc;
    }
    req.nonce = rk_nonce;
    req.share = share;
    rc = cli_call(ctx, &update_method, &req.base, update_print_cb, NULL);
    OPENSSL_cleanse(share, sizeof(share));
    return rc;
}

const struct cli_cmd cli_rekey_subs[] = {
    CLI_CMD_LEAF("init", "start a rekey and print its nonce",
                 "Usage: kmsctl operator rekey init [--key-shares N] [--key-threshold K]\n"
                 "\n"
                 "Starts a rekey to N new shares with threshold K on the leader and prints\n"
                 "its nonce. Refused while another rekey is in progress.",
                 rekey_init_run, rekey_init_flags),
    CLI_CMD_LEAF("status", "show the rekey in progress",
                 "Usage: kmsctl operator rekey status\n"
                 "\n"
                 "Shows whether a rekey is in progress, its nonce, the current shares given\n"
                 "so far and the new share count and threshold.",
                 rekey_status_run, NULL),
    CLI_CMD_LEAF("update", "give the rekey one current key share",
                 "Usage: kmsctl operator rekey update --nonce NONCE [SHARE | -]\n"
                 "\n"
                 "Adds one CURRENT key share to the rekey with this nonce. Without SHARE,\n"
                 "prompts for it with hidden input (or reads one line from stdin when it\n"
                 "is not a terminal; '-' reads stdin too). The share is checked locally\n"
                 "first. The share that reaches the current threshold commits the rekey and\n"
                 "prints the new shares, once.",
                 rekey_update_run, rekey_nonce_flags),
    CLI_CMD_LEAF("cancel", "cancel the rekey in progress (Vault's -cancel)",
                 "Usage: kmsctl operator rekey cancel [--nonce NONCE]\n"
                 "\n"
                 "Cancels the rekey in progress (only the one with NONCE when given) and\n"
                 "wipes the shares given to it. The current shares stay valid.",
                 rekey_cancel_run, rekey_nonce_flags),
    CLI_CMD_END,
};
