/*
 * kmsctl operator: the group's command table, and its one-call commands
 * seal, step-down and rotate. The other rows run in their own files:
 * init (cmd_init.c), unseal and seal-migrate (cmd_unseal.c), rewrap and
 * retire-term (cmd_rewrap.c), members (cmd_members.c), snapshot
 * (cmd_snapshot.c), rekey (cmd_rekey.c).
 */
#include <stdio.h>

#include "cli_common.h"

const char cli_operator_usage[] =
    "Usage: kmsctl operator COMMAND [flags]\n"
    "\n"
    "Operator tasks: the init ceremony, unsealing and sealing replicas,\n"
    "leadership, keyring rotation and membership.";

/* ---- seal, step-down, rotate ---------------------------------------- */

static int seal_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)resp;
    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_bool(ctx->out, "sealed", true);
    } else {
        fputs("Success! Sealed the replica at ", ctx->out);
        cli_write_safe(ctx->out, ctx->g.target);
        fputs(": its keys are wiped from memory and its Talos port is closed.\n", ctx->out);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method seal_method = {"seal", "Seal",
                                              &kmsd__v1__seal_response__descriptor, false};

static int seal_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__SealRequest req = KMSD__V1__SEAL_REQUEST__INIT;
    return cli_leaf_call(ctx, cmd, argc, argv, &seal_method, &req.base, seal_print_cb, NULL);
}

static int step_down_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)arg;
    return cli_new_leader_print(ctx, ((const Kmsd__V1__StepDownResponse *)resp)->new_leader_id,
                                "Success! Stepped down; node ", " is the new leader.\n",
                                "Success! Stepped down; a new leader is being elected.\n");
}

static const struct cli_method step_down_method = {
    "step-down", "StepDown", &kmsd__v1__step_down_response__descriptor, false};

static int step_down_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__StepDownRequest req = KMSD__V1__STEP_DOWN_REQUEST__INIT;
    return cli_leaf_call(ctx, cmd, argc, argv, &step_down_method, &req.base, step_down_print_cb,
                         NULL);
}

static int rotate_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    uint32_t t = ((const Kmsd__V1__RotateResponse *)resp)->active_term;

    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_u64(ctx->out, "active_term", t);
    } else {
        fprintf(ctx->out,
                "Success! Rotated the keyring: new seals use key term %u; keys sealed under\n"
                "earlier terms still unseal.\n",
                t);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method rotate_method = {"rotate", "Rotate",
                                                &kmsd__v1__rotate_response__descriptor, false};

static int rotate_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__RotateRequest req = KMSD__V1__ROTATE_REQUEST__INIT;
    return cli_leaf_call(ctx, cmd, argc, argv, &rotate_method, &req.base, rotate_print_cb, NULL);
}

const struct cli_cmd cli_operator_subs[] = {
    CLI_CMD_LEAF("init", "initialise a new cluster and print its key shares",
                 "Usage: kmsctl operator init [--key-shares N] [--key-threshold K]\n"
                 "                            [--share-recipients FILE]\n"
                 "\n"
                 "Generates the root key, splits it into N key shares of which any K unseal\n"
                 "a replica, and stores the first keyring (encrypted under the root key).\n"
                 "The shares are printed once and never stored: hand each to a different\n"
                 "operator. Run once per cluster, against any replica.",
                 cli_init_run, cli_init_flags),
    CLI_CMD_LEAF("unseal", "give a replica one key share",
                 "Usage: kmsctl operator unseal [--reset] [--share-key KEY.pem] [SHARE | -]\n"
                 "\n"
                 "Adds one key share to the replica at --endpoint. Without SHARE, prompts for\n"
                 "it with hidden input (or reads one line from stdin when it is not a\n"
                 "terminal; '-' reads stdin too). The share is checked locally first (a typo\n"
                 "is refused before anything is sent). Once the threshold is reached the\n"
                 "replica unseals. Each replica is unsealed separately.",
                 cli_unseal_run, cli_unseal_flags),
    CLI_CMD_LEAF("seal", "wipe a replica's keys from memory",
                 "Usage: kmsctl operator seal\n"
                 "\n"
                 "Seals the replica at --endpoint: it wipes the root key and keyring from\n"
                 "memory, closes its Talos port, and needs key shares again to serve keys.",
                 seal_run, NULL),
    CLI_CMD_LEAF("step-down", "make the leader give up leadership",
                 "Usage: kmsctl operator step-down\n"
                 "\n"
                 "Asks the replica at --endpoint, which must be the leader, to hand\n"
                 "leadership to another voter.",
                 step_down_run, NULL),
    CLI_CMD_LEAF("rotate", "add a keyring term for new seals",
                 "Usage: kmsctl operator rotate\n"
                 "\n"
                 "Adds a new data key term to the keyring. New seals use it; keys sealed\n"
                 "under earlier terms keep unsealing. The root key and shares are unchanged.",
                 rotate_run, NULL),
    CLI_CMD_LEAF("seal-migrate", "move the cluster between the Shamir and the PKCS#11 seal",
                 "Usage: kmsctl operator seal-migrate --to pkcs11|shamir < shares\n"
                 "\n"
                 "Reads k key shares, one per line (prompted, hidden, on a terminal; an empty\n"
                 "line ends), and moves the cluster to the other seal. --to pkcs11 (k unseal\n"
                 "shares): the root key is wrapped by the HSM key (created if missing) and\n"
                 "replicas with seal.type pkcs11 unseal themselves; the shares become\n"
                 "recovery shares. --to shamir (k recovery shares): the HSM wrap is removed\n"
                 "and every replica needs k shares at start again. Both rotate the keyring\n"
                 "once. Runs on the leader, which must have seal.type pkcs11 for --to pkcs11.",
                 cli_seal_migrate_run, cli_seal_migrate_flags),
    /* cmd_rewrap.c */
    CLI_CMD_LEAF("rewrap", "re-encrypt every record on an older term under the active term",
                 cli_rewrap_usage,
                 cli_rewrap_run, cli_rewrap_flags),
    CLI_CMD_LEAF("retire-term", "remove an old term's key from the keyring",
                 cli_retire_term_usage,
                 cli_retire_term_run, NULL),
    CLI_CMD_GROUP("members", "list and change the cluster's members",
                  cli_members_usage, cli_members_subs),
    CLI_CMD_GROUP("snapshot", "save and inspect online backups",
                  cli_snapshot_usage, cli_snapshot_subs),
    CLI_CMD_GROUP("rekey", "replace the key shares (new root key)",
                  cli_rekey_usage, cli_rekey_subs),
    CLI_CMD_END,
};
