/*
 * kmsctl operator unseal [SHARE | -] and operator seal-migrate: giving a
 * replica (or the leader, to move between the Shamir and the PKCS#11 seal)
 * key shares. Reading, checking and wiping the shares is cli_share_input.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "cli_common.h"
#include "kms_crypto.h"
#include "kms_err.h"
#include "kms_share_seal.h"

/* ---- unseal ---------------------------------------------------------- */

static bool unseal_reset;
static const char *unseal_share_key;

const struct cli_flag cli_unseal_flags[] = {
    {"reset", 0, CLI_FLAG_BOOL, &unseal_reset, NULL, 0, 0, NULL,
     "discard the shares entered so far on this replica (then add SHARE if given)", false},
    {"share-key", 0, CLI_FLAG_STRING, &unseal_share_key, NULL, 0, 0, "KEY.pem",
     "the share given is encrypted (init --share-recipients): decrypt it with this "
     "private key first", false},
    CLI_FLAG_END,
};

/* arg: the struct cli_share_in (len 0: --reset alone). */
static int unseal_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    const Kmsd__V1__UnsealResponse *r = (const Kmsd__V1__UnsealResponse *)resp;
    const struct cli_share_in *in = arg;

    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_bool(&j, "sealed", r->sealed);
        cli_json_u64(&j, "progress", r->progress);
        cli_json_u64(&j, "threshold", r->threshold);
        cli_json_doc_end(&j);
    } else if (r->sealed) {
        if (unseal_reset && in->len == 0) {
            fputs("Unseal progress reset.\n", ctx->out);
        }
        fprintf(ctx->out, "Sealed: true\nUnseal Progress: %u/%u\n", r->progress, r->threshold);
    } else {
        fputs("Sealed: false\n", ctx->out);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method unseal_method = {"unseal", "Unseal",
                                                &kmsd__v1__unseal_response__descriptor, true};

int cli_unseal_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__UnsealRequest req = KMSD__V1__UNSEAL_REQUEST__INIT;
    char share[KMS_SHARE_SEAL_MAX_TEXT + 8];
    struct cli_share_in in = {share, sizeof(share), 0, false, 0};
    int rc;

    unseal_reset = false;
    unseal_share_key = NULL;
    if ((rc = cli_share_parse(ctx, cmd, argc, argv, &in)) >= 0 ||
        (rc = cli_share_get(ctx, "unseal", &in, "Unseal Key (will be hidden): ", unseal_reset,
                            unseal_share_key)) != 0) {
        return rc;
    }
    req.share = share;
    req.reset = unseal_reset;
    rc = cli_call(ctx, &unseal_method, &req.base, unseal_print_cb, &in);
    OPENSSL_cleanse(share, sizeof(share));
    return rc;
}

/* ---- seal-migrate ---------------------------------------------------- */

static const char *migrate_to;

const struct cli_flag cli_seal_migrate_flags[] = {
    {"to", 0, CLI_FLAG_STRING, &migrate_to, NULL, 0, 0, "pkcs11|shamir",
     "the seal to migrate the cluster to", false},
    CLI_FLAG_END,
};

#define MIGRATE_MAX_SHARES 255

static int migrate_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    const Kmsd__V1__SealMigrateResponse *r = (const Kmsd__V1__SealMigrateResponse *)resp;

    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_str(&j, "seal_type", r->seal_type);
        cli_json_u64(&j, "active_term", r->active_term);
        cli_json_doc_end(&j);
    } else if (strcmp(migrate_to, "pkcs11") == 0) {
        fprintf(ctx->out,
                "Success! The cluster uses the PKCS#11 seal (keyring term %u): replicas\n"
                "configured with seal.type pkcs11 unseal themselves at start. The key\n"
                "shares are now recovery shares.\n", r->active_term);
    } else {
        fprintf(ctx->out,
                "Success! The cluster uses the Shamir seal (keyring term %u): every\n"
                "replica needs k of these shares at start again (set seal.type shamir).\n",
                r->active_term);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method migrate_method = {
    "seal-migrate", "SealMigrate", &kmsd__v1__seal_migrate_response__descriptor, false};

int cli_seal_migrate_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__SealMigrateRequest req = KMSD__V1__SEAL_MIGRATE_REQUEST__INIT;
    char *shares[MIGRATE_MAX_SHARES];
    size_t n = 0;
    int rc;
    bool tty = isatty(STDIN_FILENO) != 0;

    migrate_to = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (migrate_to == NULL || (strcmp(migrate_to, "pkcs11") != 0 &&
                               strcmp(migrate_to, "shamir") != 0)) {
        return cli_usage_error(ctx, "--to pkcs11 or --to shamir is required");
    }
    /* One share per line until an empty line or end of input; each is
     * checked locally and wiped after the call. */
    while (n < MIGRATE_MAX_SHARES) {
        char buf[KMS_SHARE_TEXT_MAX * 2], prompt[64];
        struct kms_err err;
        int len;
        snprintf(prompt, sizeof(prompt), "Key share %zu (empty line to finish): ", n + 1);
        len = cli_read_secret(STDIN_FILENO, tty ? prompt : NULL, tty ? ctx->err : NULL, buf,
                              sizeof(buf));
        if (len <= 0) {
            OPENSSL_cleanse(buf, sizeof(buf));
            break;
        }
        if (cli_share_check(buf, &err) != 0) {
            OPENSSL_cleanse(buf, sizeof(buf));
            fprintf(ctx->err, "Error: seal-migrate: share %zu: %s (nothing was sent)\n", n + 1,
                    err.msg);
            rc = CLI_EXIT_LOCAL;
            goto out;
        }
        shares[n] = strdup(buf);
        OPENSSL_cleanse(buf, sizeof(buf));
        if (shares[n] == NULL) {
            rc = CLI_EXIT_LOCAL;
            goto out;
        }
        n++;
    }
    if (n == 0) {
        fputs("Error: seal-migrate: no key shares given (one per line on stdin)\n", ctx->err);
        rc = CLI_EXIT_LOCAL;
        goto out;
    }
    req.to = (char *)migrate_to;
    req.n_shares = n;
    req.shares = shares;
    rc = cli_call(ctx, &migrate_method, &req.base, migrate_print_cb, NULL);
out:
    cli_shares_wipe(NULL, shares, n);
    for (size_t i = 0; i < n; i++) {
        free(shares[i]);
    }
    return rc;
}
