/*
 * kmsctl key-share input, shared by operator unseal, operator seal-migrate
 * and operator rekey update: a SHARE word is copied and wiped from argv at
 * once (it may still be in the shell's history: prefer the prompt), '-'
 * reads one line of stdin, no word prompts without echo. Typed shares are
 * read straight from the file descriptor (no stdio buffer keeps a copy),
 * checked locally (format and checksum: a typo never reaches the server)
 * and wiped with OPENSSL_cleanse. Shares are never logged.
 */
#include "cli_common.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_err.h"

int cli_share_take_arg(char *arg, char *share, size_t cap)
{
    size_t n = strlen(arg);
    int len = -1;
    if (n < cap) {
        memcpy(share, arg, n);
        len = (int)n;
    }
    OPENSSL_cleanse(arg, n);
    return len;
}

/* ---- reading a secret ------------------------------------------------ */

static int tty_fd = -1;
static struct termios tty_saved;

static void tty_restore_signal(int sig)
{
    if (tty_fd >= 0) {
        (void)tcsetattr(tty_fd, TCSANOW, &tty_saved);
        (void)!write(STDERR_FILENO, "\n", 1);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

int cli_read_secret(int fd, const char *prompt, FILE *prompt_to, char *buf, size_t cap)
{
    struct termios t;
    struct sigaction sa, old_int, old_term, old_hup, old_quit;
    bool tty = isatty(fd) && tcgetattr(fd, &tty_saved) == 0;
    size_t n = 0;
    bool too_long = false, got_any = false;
    int rc;

    if (cap < 2) {
        return -1;
    }
    if (tty) {
        if (prompt != NULL && prompt_to != NULL) {
            fputs(prompt, prompt_to);
            fflush(prompt_to);
        }
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = tty_restore_signal;
        sigemptyset(&sa.sa_mask);
        tty_fd = fd;
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        sigaction(SIGHUP, &sa, &old_hup);
        sigaction(SIGQUIT, &sa, &old_quit);
        t = tty_saved;
        t.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL);
        (void)tcsetattr(fd, TCSAFLUSH, &t);
    }
    for (;;) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            break;
        }
        got_any = true;
        if (c == '\n') {
            break;
        }
        if (n + 1 < cap) {
            buf[n++] = c;
        } else {
            too_long = true;
        }
        c = 0;
    }
    if (tty) {
        (void)tcsetattr(fd, TCSAFLUSH, &tty_saved);
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
        sigaction(SIGHUP, &old_hup, NULL);
        sigaction(SIGQUIT, &old_quit, NULL);
        tty_fd = -1;
        if (prompt_to != NULL) {
            fputc('\n', prompt_to);
        }
    }
    buf[n] = '\0';
    /* Trim surrounding whitespace (CR from Windows files, spaces). */
    size_t start = 0, end = n;
    while (start < end && (buf[start] == ' ' || buf[start] == '\t' || buf[start] == '\r')) {
        start++;
    }
    while (end > start &&
           (buf[end - 1] == ' ' || buf[end - 1] == '\t' || buf[end - 1] == '\r')) {
        end--;
    }
    if (start > 0) {
        memmove(buf, buf + start, end - start);
    }
    rc = (int)(end - start);
    OPENSSL_cleanse(buf + rc, cap - (size_t)rc);
    if (too_long || !got_any) {
        OPENSSL_cleanse(buf, cap);
        return -1;
    }
    return rc;
}

/* ---- one share for a command ---------------------------------------- */

int cli_share_check(const char *share, struct kms_err *err)
{
    struct kms_share parsed;
    int rc;

    kms_err_clear(err);
    rc = kms_share_parse(share, &parsed, err);
    OPENSSL_cleanse(&parsed, sizeof(parsed));
    return rc;
}

int cli_share_parse(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                    struct cli_share_in *in)
{
    char *pos[1] = {NULL};
    int rc;

    memset(in->buf, 0, in->cap);
    in->npos = 0;
    in->len = 0;
    rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &in->npos);
    in->dash = in->npos == 1 && strcmp(pos[0], "-") == 0;
    if (in->npos == 1 && !in->dash) {
        in->len = cli_share_take_arg(pos[0], in->buf, in->cap);
    }
    if (rc >= 0) {
        OPENSSL_cleanse(in->buf, in->cap);
    }
    return rc;
}

int cli_share_get(struct cli_ctx *ctx, const char *op, struct cli_share_in *in,
                  const char *prompt, bool optional, const char *key_path)
{
    struct kms_err err;
    int rc;

    if (in->len < 0) {
        return cli_usage_error(ctx, "the key share is too long");
    }
    if (in->dash) {
        in->len = cli_read_secret(STDIN_FILENO, NULL, NULL, in->buf, in->cap);
    } else if (in->npos == 0 && !optional) {
        in->len = cli_read_secret(STDIN_FILENO, prompt, ctx->err, in->buf, in->cap);
    }
    if (in->len < 0 || (in->len == 0 && !optional)) {
        OPENSSL_cleanse(in->buf, in->cap);
        fprintf(ctx->err, "Error: %s: no key share given (or longer than a key share)\n", op);
        return CLI_EXIT_LOCAL;
    }
    if (in->len == 0) {
        return 0;
    }
    if (key_path != NULL) {
        char errbuf[CLI_ERRBUF];
        if (cli_share_key_open(key_path, in->buf, in->cap, errbuf, sizeof(errbuf)) != 0) {
            fprintf(ctx->err, "Error: %s: --share-key ", op);
            cli_write_safe(ctx->err, errbuf);
            fputs(" (nothing was sent)\n", ctx->err);
            return CLI_EXIT_LOCAL;
        }
    }
    if ((rc = cli_share_check(in->buf, &err)) != 0) {
        OPENSSL_cleanse(in->buf, in->cap);
        fprintf(ctx->err, "Error: %s: ", op);
        cli_write_safe(ctx->err, err.msg[0] ? err.msg : kms_strerror(rc));
        fputs(" (nothing was sent; check the share for typos)\n", ctx->err);
        return CLI_EXIT_LOCAL;
    }
    return 0;
}

void cli_shares_wipe(FILE *shown_on, char *const *shares, size_t n)
{
    if (shown_on != NULL) {
        fflush(shown_on);
    }
    for (size_t i = 0; i < n; i++) {
        if (shares[i] != NULL) {
            OPENSSL_cleanse(shares[i], strlen(shares[i]));
        }
    }
}
