/*
 * kmsctl dispatch: walks the command table (kmsctl.c's root, each group's
 * table in its cmd_*.c) from argv, prints help (`-h`, `kmsctl help ...`)
 * and usage errors, and owns the cli_ctx's life. See cli_common.h.
 */
#include "cli_common.h"

#include <stdarg.h>
#include <string.h>

#include "kms_rpc.h"

/* ---- dispatch and help ---------------------------------------------- */

void cli_ctx_init(struct cli_ctx *ctx, FILE *out, FILE *err)
{
    memset(ctx, 0, sizeof(*ctx));
    cli_global_init(&ctx->g);
    ctx->out = out;
    ctx->err = err;
    ctx->path = "";
}

void cli_ctx_close(struct cli_ctx *ctx)
{
    if (ctx->ch != NULL) {
        kms_rpc_channel_destroy(ctx->ch);
        ctx->ch = NULL;
    }
    if (ctx->rpc_inited) {
        kms_rpc_global_shutdown();
        ctx->rpc_inited = false;
    }
}

int cli_usage_error(struct cli_ctx *ctx, const char *fmt, ...)
{
    char msg[CLI_ERRBUF];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fputs("Error: ", ctx->err);
    cli_write_safe(ctx->err, msg);
    fprintf(ctx->err, " (see 'kmsctl%s%s -h')\n", ctx->path[0] ? " " : "", ctx->path);
    return CLI_EXIT_LOCAL;
}

void cli_print_help(FILE *f, const struct cli_cmd *cmd, const char *path)
{
    fprintf(f, "%s\n", cmd->usage != NULL ? cmd->usage : cmd->summary);
    if (cmd->subs != NULL) {
        fprintf(f, "\nCommands:\n");
        for (const struct cli_cmd *s = cmd->subs; s->name != NULL; s++) {
            if (!s->hidden) {
                fprintf(f, "  %-18s %s\n", s->name, s->summary);
            }
        }
        fprintf(f, "\nRun 'kmsctl%s%s COMMAND -h' for a command's flags.\n", path[0] ? " " : "",
                path);
    }
    cli_flags_print(f, cmd->flags);
}

static const struct cli_cmd *find_sub(const struct cli_cmd *cmd, const char *name)
{
    for (const struct cli_cmd *s = cmd->subs; s != NULL && s->name != NULL; s++) {
        if (strcmp(s->name, name) == 0) {
            return s;
        }
    }
    return NULL;
}

static void path_append(char *path, size_t len, const char *word)
{
    size_t n = strlen(path);
    snprintf(path + n, len - n, "%s%s", n > 0 ? " " : "", word);
}

/* "kmsctl help [cmd...]" */
static int run_help(struct cli_ctx *ctx, const struct cli_cmd *root, int argc, char **argv)
{
    static char path[128];
    const struct cli_cmd *cmd = root;
    path[0] = '\0';
    for (int i = 0; i < argc; i++) {
        if (argv[i][0] == '-') {
            continue; /* "help -h" and the like */
        }
        const struct cli_cmd *s = find_sub(cmd, argv[i]);
        if (s == NULL) {
            ctx->path = path;
            return cli_usage_error(ctx, "unknown command '%.60s'", argv[i]);
        }
        cmd = s;
        path_append(path, sizeof(path), argv[i]);
    }
    cli_print_help(ctx->out, cmd, path);
    return CLI_EXIT_OK;
}

int cli_main(const struct cli_cmd *root, struct cli_ctx *ctx, int argc, char **argv,
             cli_getenv_fn getenv_fn)
{
    static char path[128];
    char errbuf[CLI_ERRBUF];
    const struct cli_cmd *cmd = root;
    int idx = 0;

    path[0] = '\0';
    ctx->path = path;
    ctx->root = root;
    cli_global_init(&ctx->g);
    cli_global_env(&ctx->g, getenv_fn);
    argc--; /* program name */
    argv++;
    while (cmd->subs != NULL) {
        if (cli_parse_leading(argc, argv, &ctx->g, &idx, errbuf, sizeof(errbuf)) != 0) {
            return cli_usage_error(ctx, "%s", errbuf);
        }
        if (idx >= argc) {
            break;
        }
        if (cmd == root && strcmp(argv[idx], "help") == 0) {
            return run_help(ctx, root, argc - idx - 1, argv + idx + 1);
        }
        const struct cli_cmd *s = find_sub(cmd, argv[idx]);
        if (s == NULL) {
            return cli_usage_error(ctx, "unknown command '%.60s'", argv[idx]);
        }
        cmd = s;
        path_append(path, sizeof(path), argv[idx]);
        argc -= idx + 1;
        argv += idx + 1;
        idx = 0;
    }
    if (cmd->run == NULL) {
        /* A group without a subcommand. */
        if (ctx->g.help) {
            cli_print_help(ctx->out, cmd, path);
            return CLI_EXIT_OK;
        }
        if (idx < argc) {
            return cli_usage_error(ctx, "unexpected argument '%.60s'", argv[idx]);
        }
        cli_print_help(ctx->err, cmd, path);
        return CLI_EXIT_LOCAL;
    }
    return cmd->run(ctx, cmd, argc, argv);
}

int cli_leaf_parse(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                   char **pos, int maxpos, int *npos)
{
    char errbuf[CLI_ERRBUF];
    char *dummy[1];
    int dummy_n = 0;
    if (pos == NULL) {
        pos = dummy;
        maxpos = 0;
    }
    if (npos == NULL) {
        npos = &dummy_n;
    }
    if (cli_parse(argc, argv, cmd->flags, &ctx->g, pos, maxpos, npos, errbuf,
                  sizeof(errbuf)) != 0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    if (ctx->g.help) {
        cli_print_help(ctx->out, cmd, ctx->path);
        return CLI_EXIT_OK;
    }
    if (cli_global_finish(&ctx->g, errbuf, sizeof(errbuf)) != 0) {
        return cli_usage_error(ctx, "%s", errbuf);
    }
    return -1;
}
