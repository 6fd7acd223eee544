/*
 * kmsctl operator init: the init ceremony. Checks --key-shares and
 * --key-threshold locally, optionally loads one public key per share holder
 * (--share-recipients, cli_share_recipients.c), and prints the shares the server
 * returns once, in the clear or each encrypted to its holder. The response's
 * shares are wiped once printed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_common.h"

int cli_init_check(unsigned long shares, unsigned long threshold, bool allow_single,
                   char *errbuf, size_t errlen)
{
    if (shares < 1 || shares > 255) {
        snprintf(errbuf, errlen, "--key-shares must be from 1 to 255 (got %lu)", shares);
        return CLI_EXIT_LOCAL;
    }
    if (shares == 1 && threshold == 1) {
        if (allow_single) {
            return 0;
        }
        snprintf(errbuf, errlen,
                 "a single key share puts the whole root key in one person's hands; "
                 "use at least --key-shares 2 --key-threshold 2");
        return CLI_EXIT_LOCAL;
    }
    if (threshold < 2 || threshold > shares) {
        snprintf(errbuf, errlen, "--key-threshold must be from 2 to --key-shares (%lu), got %lu",
                 shares, threshold);
        return CLI_EXIT_LOCAL;
    }
    return 0;
}

static unsigned long init_shares, init_threshold;
static bool init_dev_single;
static const char *init_recipients;

const struct cli_flag cli_init_flags[] = {
    {"key-shares", 0, CLI_FLAG_UINT, &init_shares, NULL, 0, ~0UL, "N",
     "number of key shares to split the root key into (default 5, at most 255)", false},
    {"key-threshold", 0, CLI_FLAG_UINT, &init_threshold, NULL, 0, ~0UL, "K",
     "shares needed to unseal (default 3, 2 <= K <= N)", false},
    /* Development only: one share of one (the share IS the root key). */
    {"dev-single-share", 0, CLI_FLAG_BOOL, &init_dev_single, NULL, 0, 0, NULL,
     "allow --key-shares 1 --key-threshold 1 (development only)", true},
    {"share-recipients", 0, CLI_FLAG_STRING, &init_recipients, NULL, 0, 0, "FILE",
     "one PEM RSA public key per share holder: share i is printed encrypted to key i", false},
    CLI_FLAG_END,
};

/* The shares once: in the clear (Unseal or, with the PKCS#11 seal,
 * Recovery Keys) or each encrypted to its --share-recipients holder. */
static void init_print(struct cli_ctx *ctx, const Kmsd__V1__InitResponse *r)
{
    bool enc = r->n_encrypted_shares > 0;
    char *const *shares = enc ? r->encrypted_shares : r->shares;
    size_t n = enc ? r->n_encrypted_shares : r->n_shares;

    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_str_array(&j, enc ? "encrypted_shares" : "shares", shares, n);
        cli_json_u64(&j, "threshold", r->threshold);
        cli_json_str(&j, "cluster_id", r->cluster_id);
        if (!enc && r->recovery) { /* PKCS#11 seal only: Shamir output unchanged */
            cli_json_bool(&j, "recovery", true);
        }
        cli_json_doc_end(&j);
        if (!enc) {
            fprintf(ctx->err,
                    "WARNING: these %zu key shares are shown only once; kmsd does not store "
                    "them.\n",
                    n);
        }
        return;
    }
    if (enc) {
        for (size_t i = 0; i < n; i++) {
            fprintf(ctx->out, "Unseal Key %zu (encrypted to recipient %zu): ", i + 1, i + 1);
            cli_write_safe(ctx->out, shares[i]);
            fputc('\n', ctx->out);
        }
    } else {
        cli_print_shares(ctx->out, r->recovery ? "Recovery Key" : "Unseal Key", shares, n);
    }
    fputs("\nCluster ID: ", ctx->out);
    cli_write_safe(ctx->out, r->cluster_id);
    if (enc) {
        fprintf(ctx->out,
                "\n\nkmsd initialised with %zu key shares and a key threshold of %u.\n"
                "Each share above is encrypted to one recipient's public key (in the order of\n"
                "--share-recipients): send it to that holder, who unseals with\n"
                "  kmsctl operator unseal --share-key THEIR-KEY.pem\n"
                "kmsd does not store the shares; nobody can recover a lost one.\n",
                n, r->threshold);
    } else if (r->recovery) {
        fprintf(ctx->out,
                "\n\nkmsd initialised with the PKCS#11 seal, %zu recovery shares and a\n"
                "threshold of %u.\n"
                "\n"
                "Replicas unseal themselves through the HSM at every start. The recovery\n"
                "shares are shown only once: %u of them are needed for seal migration and,\n"
                "if the HSM or its key is lost, to unseal by hand (kmsctl operator unseal).\n"
                "Hand each to a different operator and keep it offline.\n",
                n, r->threshold, r->threshold);
    } else {
        fprintf(ctx->out,
                "\n\nkmsd initialised with %zu key shares and a key threshold of %u.\n"
                "\n"
                "WARNING: the key shares are shown only once. kmsd does not store them and\n"
                "nobody can recover them. Hand each share to a different operator now and\n"
                "keep it offline. Every replica starts sealed (also after each restart)\n"
                "and needs %u of these shares (kmsctl operator unseal) before it serves\n"
                "keys. If fewer than %u shares survive, every sealed disk is lost.\n",
                n, r->threshold, r->threshold, r->threshold);
    }
}

static int init_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    Kmsd__V1__InitResponse *r = (Kmsd__V1__InitResponse *)resp;

    (void)arg;
    init_print(ctx, r);
    cli_shares_wipe(ctx->out, r->shares, r->n_shares);
    return CLI_EXIT_OK;
}

static void recipients_free(Kmsd__V1__InitRequest *req)
{
    for (size_t i = 0; i < req->n_share_recipients; i++) {
        free(req->share_recipients[i]);
    }
    free(req->share_recipients);
    req->share_recipients = NULL;
    req->n_share_recipients = 0;
}

static const struct cli_method init_method = {"init", "Initialize",
                                              &kmsd__v1__init_response__descriptor, true};

int cli_init_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__InitRequest req = KMSD__V1__INIT_REQUEST__INIT;
    char errbuf[CLI_ERRBUF];
    int rc;

    init_shares = 5;
    init_threshold = 3;
    init_dev_single = false;
    init_recipients = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (cli_init_check(init_shares, init_threshold, init_dev_single, errbuf, sizeof(errbuf)) !=
        0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    if (init_recipients != NULL) {
        if (cli_share_recipients_load(init_recipients, &req.share_recipients,
                                      &req.n_share_recipients, errbuf, sizeof(errbuf)) != 0) {
            fprintf(ctx->err, "Error: init: --share-recipients %s (nothing was sent)\n", errbuf);
            return CLI_EXIT_LOCAL;
        }
        if (req.n_share_recipients != init_shares) {
            size_t n = req.n_share_recipients;
            recipients_free(&req);
            return cli_usage_error(ctx, "--share-recipients has %zu keys for --key-shares %lu",
                                   n, init_shares);
        }
    }
    req.key_shares = (uint32_t)init_shares;
    req.key_threshold = (uint32_t)init_threshold;
    rc = cli_call(ctx, &init_method, &req.base, init_print_cb, NULL);
    recipients_free(&req);
    return rc;
}
