/*
 * kmsctl: the kmsd operator tool (like `vault operator`, `etcdctl`).
 *
 * One file per command group (cmd_status.c, cmd_operator.c, cmd_members.c,
 * cmd_keys.c, cmd_audit.c), dispatched from the table below; flags, output and the
 * connection are in cli_common.c. Exit codes: 0 ok, 1 local or usage error,
 * 2 remote error; `status`: 0 serving, 2 not serving, 1 cannot ask.
 */
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include "cli_common.h"

#ifndef KMSD_VERSION
#define KMSD_VERSION "unknown"
#endif
#ifndef KMSD_BUILD_VERSION
#define KMSD_BUILD_VERSION KMSD_VERSION
#endif

static int version_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    int npos = 0, rc;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_str(&j, "version", KMSD_VERSION);
        cli_json_obj_end(&j);
        cli_json_end(&j);
    } else {
        fprintf(ctx->out, "kmsctl %s\n", KMSD_BUILD_VERSION);
    }
    return 0;
}

static const struct cli_cmd root_subs[] = {
    {"status", "show a replica's state (exit 2 when not serving, 1 on errors)",
     cli_status_usage, NULL, cli_status_run, cli_status_flags, false},
    {"operator", "init, unseal, seal, step-down, rotate, rewrap, retire-term, members", cli_operator_usage,
     cli_operator_subs, NULL, NULL, false},
    {"keys", "list, show and revoke sealed keys", cli_keys_usage, cli_keys_subs, NULL, NULL,
     false},
    {"audit", "verify a hash-chained audit file (offline)", cli_audit_usage, cli_audit_subs,
     NULL, NULL, false},
    {"version", "print kmsctl's version", "Usage: kmsctl version", NULL, version_run, NULL,
     false},
    {"help", "help about any command: kmsctl help operator unseal", "Usage: kmsctl help [COMMAND...]",
     NULL, NULL, NULL, false},
    {NULL, NULL, NULL, NULL, NULL, NULL, false},
};

static const struct cli_cmd root = {
    "kmsctl", "kmsd operator tool",
    "Usage: kmsctl COMMAND [flags]\n"
    "\n"
    "kmsctl talks to the cluster API of one kmsd replica (mutual TLS, port 4051).\n"
    "kmsctl --version (or kmsctl version) prints the version.\n"
    "Exit codes: 0 ok, 1 local or usage error, 2 remote error.",
    root_subs, NULL, NULL, false,
};

int main(int argc, char **argv)
{
    struct cli_ctx ctx;
    struct rlimit no_core = {0, 0};
    int rc;

    /* Key shares pass through this process: no core dumps, no ptrace by
     * other processes of the same user. */
    (void)setrlimit(RLIMIT_CORE, &no_core);
    (void)prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("kmsctl %s\n", KMSD_BUILD_VERSION);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    cli_ctx_init(&ctx, stdout, stderr);
    rc = cli_main(&root, &ctx, argc, argv, NULL);
    cli_ctx_close(&ctx);
    if (fflush(stdout) != 0 && rc == 0) {
        fprintf(stderr, "Error: cannot write output\n");
        rc = 1;
    }
    return rc;
}
