/*
 * kmsctl: the kmsd operator tool (like `vault operator`, `etcdctl`).
 *
 * One file per command or group (cmd_status.c, cmd_operator.c and the files
 * its table names, cmd_keys.c, cmd_audit.c), dispatched from the table below
 * by cli_dispatch.c; flags, output and the connection are the other cli_*.c
 * (cli_common.h). Exit codes: 0 ok, 1 local or usage error,
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
    int rc;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_str(&j, "version", KMSD_VERSION);
        cli_json_doc_end(&j);
    } else {
        fprintf(ctx->out, "kmsctl %s\n", KMSD_BUILD_VERSION);
    }
    return 0;
}

static const struct cli_cmd root_subs[] = {
    CLI_CMD_LEAF("status", "show a replica's state (exit 2 when not serving, 1 on errors)",
                 cli_status_usage,
                 cli_status_run, cli_status_flags),
    CLI_CMD_GROUP("operator", "init, unseal, seal, step-down, rotate, rewrap, retire-term, members",
                  cli_operator_usage, cli_operator_subs),
    CLI_CMD_GROUP("keys", "list, show and revoke sealed keys",
                  cli_keys_usage, cli_keys_subs),
    CLI_CMD_GROUP("audit", "verify a hash-chained audit file (offline)",
                  cli_audit_usage, cli_audit_subs),
    CLI_CMD_LEAF("version", "print kmsctl's version",
                 "Usage: kmsctl version",
                 version_run, NULL),
    CLI_CMD_LEAF("help", "help about any command: kmsctl help operator unseal",
                 "Usage: kmsctl help [COMMAND...]",
                 NULL, NULL),
    CLI_CMD_END,
};

static const struct cli_cmd root =
    CLI_CMD_GROUP("kmsctl", "kmsd operator tool",
                  "Usage: kmsctl COMMAND [flags]\n"
                  "\n"
                  "kmsctl talks to the cluster API of one kmsd replica (mutual TLS, port 4051).\n"
                  "kmsctl --version (or kmsctl version) prints the version.\n"
                  "Exit codes: 0 ok, 1 local or usage error, 2 remote error.",
                  root_subs);

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
