/*
 * kmsctl operator rekey init | status | update | cancel: replace the key
 * shares (and the root key under them) without touching any sealed disk.
 * Vault's shape (`vault operator rekey`): init returns a nonce, holders of
 * the current shares each run `update --nonce NONCE` with one share, the
 * last one receives the new shares, printed once.
 *
 * Shares are read like `operator unseal` reads them (cmd_operator.c): from
 * a hidden prompt or stdin ('-'); one on argv is wiped from argv at once;
 * each is checked locally first and wiped with the request and response.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "cli_common.h"
#include "kms_crypto.h"
#include "kms_err.h"

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
    {NULL, 0, 0, NULL, NULL, 0, 0, NULL, NULL, false},
};

static const struct cli_flag rekey_nonce_flags[] = {
    {"nonce", 0, CLI_FLAG_STRING, &rk_nonce, NULL, 0, 0, "NONCE",
     "the rekey's nonce (from rekey init or rekey status)", false},
    {NULL, 0, 0, NULL, NULL, 0, 0, NULL, NULL, false},
};

static void status_print(struct cli_ctx *ctx, const Kmsd__V1__RekeyStatusResponse *r)
{
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_bool(&j, "started", r->started);
        cli_json_str(&j, "nonce", r->nonce);
        cli_json_u64(&j, "progress", r->progress);
        cli_json_u64(&j, "required", r->required);
        cli_json_u64(&j, "new_shares", r->new_shares);
        cli_json_u64(&j, "new_threshold", r->new_threshold);
        cli_json_time(&j, "started_at", r->started_at);
        cli_json_obj_end(&j);
        cli_json_end(&j);
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

static int rekey_init_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__RekeyInitRequest req = KMSD__V1__REKEY_INIT_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    char errbuf[CLI_ERRBUF];
    int npos = 0, rc;

    rk_shares = 5;
    rk_threshold = 3;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    if (cli_init_check(rk_shares, rk_threshold, false, errbuf, sizeof(errbuf)) != 0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    req.key_shares = (uint32_t)rk_shares;
    req.key_threshold = (uint32_t)rk_threshold;
    rc = cli_rpc(ctx, "rekey init", "RekeyInit", &req.base,
                 &kmsd__v1__rekey_status_response__descriptor, &m, false);
    if (rc != 0) {
        return rc;
    }
    Kmsd__V1__RekeyStatusResponse *r = (Kmsd__V1__RekeyStatusResponse *)m;
    status_print(ctx, r);
    if (ctx->g.out != CLI_OUT_JSON) {
        fprintf(ctx->out,
                "\nEach holder of a current share now runs:\n"
                "  kmsctl operator rekey update --nonce %s\n"
                "(%u of them). The last one receives the %u new shares.\n",
                r->nonce, r->required, r->new_shares);
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return CLI_EXIT_OK;
}

static int rekey_status_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__RekeyStatusRequest req = KMSD__V1__REKEY_STATUS_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    rc = cli_rpc(ctx, "rekey status", "RekeyStatus", &req.base,
                 &kmsd__v1__rekey_status_response__descriptor, &m, false);
    if (rc != 0) {
        return rc;
    }
    status_print(ctx, (Kmsd__V1__RekeyStatusResponse *)m);
    protobuf_c_message_free_unpacked(m, NULL);
    return CLI_EXIT_OK;
}

static int rekey_cancel_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__RekeyCancelRequest req = KMSD__V1__REKEY_CANCEL_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int npos = 0, rc;

    rk_nonce = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    req.nonce = rk_nonce != NULL ? rk_nonce : "";
    rc = cli_rpc(ctx, "rekey cancel", "RekeyCancel", &req.base,
                 &kmsd__v1__rekey_cancel_response__descriptor, &m, false);
    if (rc != 0) {
        return rc;
    }
    protobuf_c_message_free_unpacked(m, NULL);
    if (ctx->g.out == CLI_OUT_JSON) {
        fputs("{\n  \"cancelled\": true\n}\n", ctx->out);
    } else {
        fputs("Success! Rekey cancelled; the shares given were wiped. The current shares\n"
              "stay valid.\n",
              ctx->out);
    }
    return CLI_EXIT_OK;
}

static void update_print(struct cli_ctx *ctx, const Kmsd__V1__RekeyUpdateResponse *r)
{
    bool done = r->n_shares > 0;
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_str(&j, "nonce", r->nonce);
        cli_json_u64(&j, "progress", r->progress);
        cli_json_u64(&j, "required", r->required);
        cli_json_bool(&j, "complete", r->complete);
        cli_json_arr_begin(&j, "shares");
        for (size_t i = 0; i < r->n_shares; i++) {
            cli_json_str(&j, NULL, r->shares[i]);
        }
        cli_json_arr_end(&j);
        if (done) {
            cli_json_u64(&j, "threshold", r->threshold);
        }
        if (r->note != NULL && r->note[0] != '\0') {
            cli_json_str(&j, "warning", r->note);
        }
        cli_json_obj_end(&j);
        cli_json_end(&j);
    } else if (!done) {
        fprintf(ctx->out, "Rekey Progress: %u/%u current shares\n", r->progress, r->required);
    } else {
        for (size_t i = 0; i < r->n_shares; i++) {
            fprintf(ctx->out, "New Unseal Key %zu: ", i + 1);
            cli_write_safe(ctx->out, r->shares[i]);
            fputc('\n', ctx->out);
        }
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

static int rekey_update_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__RekeyUpdateRequest req = KMSD__V1__REKEY_UPDATE_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    char share[KMS_SHARE_TEXT_MAX * 2];
    char *pos[1] = {NULL};
    int npos = 0, rc, len = 0;

    rk_nonce = NULL;
    memset(share, 0, sizeof(share));
    rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos);
    if (npos == 1 && strcmp(pos[0], "-") != 0) {
        len = cli_share_take_arg(pos[0], share, sizeof(share));
    }
    if (rc >= 0) {
        OPENSSL_cleanse(share, sizeof(share));
        return rc;
    }
    if (rk_nonce == NULL || rk_nonce[0] == '\0') {
        OPENSSL_cleanse(share, sizeof(share));
        return cli_usage_error(ctx, "--nonce is required (see kmsctl operator rekey status)");
    }
    if (len < 0) {
        return cli_usage_error(ctx, "the key share is too long");
    }
    if (npos == 1 && strcmp(pos[0], "-") == 0) {
        len = cli_read_secret(STDIN_FILENO, NULL, NULL, share, sizeof(share));
    } else if (npos == 0) {
        len = cli_read_secret(STDIN_FILENO, "Current Unseal Key (will be hidden): ", ctx->err,
                              share, sizeof(share));
    }
    if (len <= 0) {
        OPENSSL_cleanse(share, sizeof(share));
        fputs("Error: rekey update: no key share given (or longer than a key share)\n",
              ctx->err);
        return CLI_EXIT_LOCAL;
    }
    {
        /* Catch typos here: nothing is sent for a share that fails its checksum. */
        struct kms_share parsed;
        struct kms_err err;
        kms_err_clear(&err);
        rc = kms_share_parse(share, &parsed, &err);
        OPENSSL_cleanse(&parsed, sizeof(parsed));
        if (rc != 0) {
            OPENSSL_cleanse(share, sizeof(share));
            fputs("Error: rekey update: ", ctx->err);
            cli_write_safe(ctx->err, err.msg[0] ? err.msg : kms_strerror(rc));
            fputs(" (nothing was sent; check the share for typos)\n", ctx->err);
            return CLI_EXIT_LOCAL;
        }
    }
    req.nonce = rk_nonce;
    req.share = share;
    rc = cli_rpc(ctx, "rekey update", "RekeyUpdate", &req.base,
                 &kmsd__v1__rekey_update_response__descriptor, &m, true);
    OPENSSL_cleanse(share, sizeof(share));
    if (rc != 0) {
        return rc;
    }
    Kmsd__V1__RekeyUpdateResponse *r = (Kmsd__V1__RekeyUpdateResponse *)m;
    update_print(ctx, r);
    fflush(ctx->out);
    for (size_t i = 0; i < r->n_shares; i++) {
        if (r->shares[i] != NULL) {
            OPENSSL_cleanse(r->shares[i], strlen(r->shares[i]));
        }
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return CLI_EXIT_OK;
}

const struct cli_cmd cli_rekey_subs[] = {
    {"init", "start a rekey and print its nonce",
     "Usage: kmsctl operator rekey init [--key-shares N] [--key-threshold K]\n"
     "\n"
     "Starts a rekey to N new shares with threshold K on the leader and prints\n"
     "its nonce. Refused while another rekey is in progress.",
     NULL, rekey_init_run, rekey_init_flags, false},
    {"status", "show the rekey in progress",
     "Usage: kmsctl operator rekey status\n"
     "\n"
     "Shows whether a rekey is in progress, its nonce, the current shares given\n"
     "so far and the new share count and threshold.",
     NULL, rekey_status_run, NULL, false},
    {"update", "give the rekey one current key share",
     "Usage: kmsctl operator rekey update --nonce NONCE [SHARE | -]\n"
     "\n"
     "Adds one CURRENT key share to the rekey with this nonce. Without SHARE,\n"
     "prompts for it with hidden input (or reads one line from stdin when it\n"
     "is not a terminal; '-' reads stdin too). The share is checked locally\n"
     "first. The share that reaches the current threshold commits the rekey and\n"
     "prints the new shares, once.",
     NULL, rekey_update_run, rekey_nonce_flags, false},
    {"cancel", "cancel the rekey in progress (Vault's -cancel)",
     "Usage: kmsctl operator rekey cancel [--nonce NONCE]\n"
     "\n"
     "Cancels the rekey in progress (only the one with NONCE when given) and\n"
     "wipes the shares given to it. The current shares stay valid.",
     NULL, rekey_cancel_run, rekey_nonce_flags, false},
    {NULL, NULL, NULL, NULL, NULL, NULL, false},
};
