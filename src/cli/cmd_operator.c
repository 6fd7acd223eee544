/*
 * kmsctl operator init | unseal | seal | step-down | rotate (and the members
 * group from cmd_members.c).
 *
 * Key shares: typed shares are read without echo straight from the file
 * descriptor (no stdio buffer keeps a copy), checked locally (format and
 * checksum, so a typo never reaches the server), and wiped with
 * OPENSSL_cleanse together with the request bytes. A share given on the
 * command line is wiped from argv at once (it may still be in the shell's
 * history: prefer the prompt). Shares are never logged.
 */
#include <errno.h>
#include <stdlib.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "cli_common.h"
#include "kms_crypto.h"
#include "kms_err.h"
#include "kms_share_seal.h"

const char cli_operator_usage[] =
    "Usage: kmsctl operator COMMAND [flags]\n"
    "\n"
    "Operator tasks: the init ceremony, unsealing and sealing replicas,\n"
    "leadership, keyring rotation and membership.";

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

/* ---- init ------------------------------------------------------------ */

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

static const struct cli_flag init_flags[] = {
    {"key-shares", 0, CLI_FLAG_UINT, &init_shares, NULL, 0, ~0UL, "N",
     "number of key shares to split the root key into (default 5, at most 255)", false},
    {"key-threshold", 0, CLI_FLAG_UINT, &init_threshold, NULL, 0, ~0UL, "K",
     "shares needed to unseal (default 3, 2 <= K <= N)", false},
    /* Development only: one share of one (the share IS the root key). */
    {"dev-single-share", 0, CLI_FLAG_BOOL, &init_dev_single, NULL, 0, 0, NULL,
     "allow --key-shares 1 --key-threshold 1 (development only)", true},
    {"share-recipients", 0, CLI_FLAG_STRING, &init_recipients, NULL, 0, 0, "FILE",
     "one PEM RSA public key per share holder: share i is printed encrypted to key i", false},
    {NULL, 0, 0, NULL, NULL, 0, 0, NULL, NULL, false},
};

static void init_print_encrypted(struct cli_ctx *ctx, const Kmsd__V1__InitResponse *r)
{
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_arr_begin(&j, "encrypted_shares");
        for (size_t i = 0; i < r->n_encrypted_shares; i++) {
            cli_json_str(&j, NULL, r->encrypted_shares[i]);
        }
        cli_json_arr_end(&j);
        cli_json_u64(&j, "threshold", r->threshold);
        cli_json_str(&j, "cluster_id", r->cluster_id);
        cli_json_obj_end(&j);
        cli_json_end(&j);
        return;
    }
    for (size_t i = 0; i < r->n_encrypted_shares; i++) {
        fprintf(ctx->out, "Unseal Key %zu (encrypted to recipient %zu): ", i + 1, i + 1);
        cli_write_safe(ctx->out, r->encrypted_shares[i]);
        fputc('\n', ctx->out);
    }
    fputs("\nCluster ID: ", ctx->out);
    cli_write_safe(ctx->out, r->cluster_id);
    fprintf(ctx->out,
            "\n\nkmsd initialised with %zu key shares and a key threshold of %u.\n"
            "Each share above is encrypted to one recipient's public key (in the order of\n"
            "--share-recipients): send it to that holder, who unseals with\n"
            "  kmsctl operator unseal --share-key THEIR-KEY.pem\n"
            "kmsd does not store the shares; nobody can recover a lost one.\n",
            r->n_encrypted_shares, r->threshold);
}

static void init_print(struct cli_ctx *ctx, const Kmsd__V1__InitResponse *r)
{
    if (r->n_encrypted_shares > 0) {
        init_print_encrypted(ctx, r);
        return;
    }
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_arr_begin(&j, "shares");
        for (size_t i = 0; i < r->n_shares; i++) {
            cli_json_str(&j, NULL, r->shares[i]);
        }
        cli_json_arr_end(&j);
        cli_json_u64(&j, "threshold", r->threshold);
        cli_json_str(&j, "cluster_id", r->cluster_id);
        if (r->recovery) { /* PKCS#11 seal only: Shamir output unchanged */
            cli_json_bool(&j, "recovery", true);
        }
        cli_json_obj_end(&j);
        cli_json_end(&j);
        fprintf(ctx->err,
                "WARNING: these %zu key shares are shown only once; kmsd does not store them.\n",
                r->n_shares);
        return;
    }
    if (r->recovery) {
        for (size_t i = 0; i < r->n_shares; i++) {
            fprintf(ctx->out, "Recovery Key %zu: ", i + 1);
            cli_write_safe(ctx->out, r->shares[i]);
            fputc('\n', ctx->out);
        }
        fputs("\nCluster ID: ", ctx->out);
        cli_write_safe(ctx->out, r->cluster_id);
        fprintf(ctx->out,
                "\n\nkmsd initialised with the PKCS#11 seal, %zu recovery shares and a\n"
                "threshold of %u.\n"
                "\n"
                "Replicas unseal themselves through the HSM at every start. The recovery\n"
                "shares are shown only once: %u of them are needed for seal migration and,\n"
                "if the HSM or its key is lost, to unseal by hand (kmsctl operator unseal).\n"
                "Hand each to a different operator and keep it offline.\n",
                r->n_shares, r->threshold, r->threshold);
        return;
    }
    for (size_t i = 0; i < r->n_shares; i++) {
        fprintf(ctx->out, "Unseal Key %zu: ", i + 1);
        cli_write_safe(ctx->out, r->shares[i]);
        fputc('\n', ctx->out);
    }
    fputs("\nCluster ID: ", ctx->out);
    cli_write_safe(ctx->out, r->cluster_id);
    fprintf(ctx->out,
            "\n\nkmsd initialised with %zu key shares and a key threshold of %u.\n"
            "\n"
            "WARNING: the key shares are shown only once. kmsd does not store them and\n"
            "nobody can recover them. Hand each share to a different operator now and\n"
            "keep it offline. Every replica starts sealed (also after each restart)\n"
            "and needs %u of these shares (kmsctl operator unseal) before it serves\n"
            "keys. If fewer than %u shares survive, every sealed disk is lost.\n",
            r->n_shares, r->threshold, r->threshold, r->threshold);
}

static int init_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__InitRequest req = KMSD__V1__INIT_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    char errbuf[CLI_ERRBUF];
    int npos = 0, rc;

    init_shares = 5;
    init_threshold = 3;
    init_dev_single = false;
    init_recipients = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
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
            for (size_t i = 0; i < req.n_share_recipients; i++) {
                free(req.share_recipients[i]);
            }
            free(req.share_recipients);
            return cli_usage_error(ctx, "--share-recipients has %zu keys for --key-shares %lu",
                                   req.n_share_recipients, init_shares);
        }
    }
    req.key_shares = (uint32_t)init_shares;
    req.key_threshold = (uint32_t)init_threshold;
    rc = cli_rpc(ctx, "init", "Initialize", &req.base, &kmsd__v1__init_response__descriptor, &m,
                 true);
    for (size_t i = 0; i < req.n_share_recipients; i++) {
        free(req.share_recipients[i]);
    }
    free(req.share_recipients);
    if (rc != 0) {
        return rc;
    }
    Kmsd__V1__InitResponse *r = (Kmsd__V1__InitResponse *)m;
    init_print(ctx, r);
    fflush(ctx->out);
    for (size_t i = 0; i < r->n_shares; i++) {
        if (r->shares[i] != NULL) {
            OPENSSL_cleanse(r->shares[i], strlen(r->shares[i]));
        }
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return CLI_EXIT_OK;
}

/* ---- unseal ---------------------------------------------------------- */

static bool unseal_reset;
static const char *unseal_share_key;

static const struct cli_flag unseal_flags[] = {
    {"reset", 0, CLI_FLAG_BOOL, &unseal_reset, NULL, 0, 0, NULL,
     "discard the shares entered so far on this replica (then add SHARE if given)", false},
    {"share-key", 0, CLI_FLAG_STRING, &unseal_share_key, NULL, 0, 0, "KEY.pem",
     "the share given is encrypted (init --share-recipients): decrypt it with this "
     "private key first", false},
    {NULL, 0, 0, NULL, NULL, 0, 0, NULL, NULL, false},
};

static int unseal_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__UnsealRequest req = KMSD__V1__UNSEAL_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    char share[KMS_SHARE_SEAL_MAX_TEXT + 8];
    char *pos[1] = {NULL};
    int npos = 0, rc, len = 0;

    unseal_reset = false;
    unseal_share_key = NULL;
    memset(share, 0, sizeof(share));
    rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos);
    if (npos == 1 && strcmp(pos[0], "-") != 0) {
        len = cli_share_take_arg(pos[0], share, sizeof(share));
    }
    if (rc >= 0) {
        OPENSSL_cleanse(share, sizeof(share));
        return rc;
    }
    if (len < 0) {
        return cli_usage_error(ctx, "the key share is too long");
    }
    if (npos == 1 && strcmp(pos[0], "-") == 0) {
        len = cli_read_secret(STDIN_FILENO, NULL, NULL, share, sizeof(share));
    } else if (npos == 0 && !unseal_reset) {
        len = cli_read_secret(STDIN_FILENO, "Unseal Key (will be hidden): ", ctx->err, share,
                              sizeof(share));
    }
    if (len < 0 || (len == 0 && !unseal_reset)) {
        OPENSSL_cleanse(share, sizeof(share));
        fputs("Error: unseal: no key share given (or longer than a key share)\n", ctx->err);
        return CLI_EXIT_LOCAL;
    }
    if (len > 0 && unseal_share_key != NULL) {
        char errbuf[CLI_ERRBUF];
        if (cli_share_key_open(unseal_share_key, share, sizeof(share), errbuf,
                               sizeof(errbuf)) != 0) {
            fputs("Error: unseal: --share-key ", ctx->err);
            cli_write_safe(ctx->err, errbuf);
            fputs(" (nothing was sent)\n", ctx->err);
            return CLI_EXIT_LOCAL;
        }
    }
    if (len > 0) {
        /* Catch typos here: nothing is sent for a share that fails its checksum. */
        struct kms_share parsed;
        struct kms_err err;
        kms_err_clear(&err);
        rc = kms_share_parse(share, &parsed, &err);
        OPENSSL_cleanse(&parsed, sizeof(parsed));
        if (rc != 0) {
            OPENSSL_cleanse(share, sizeof(share));
            fputs("Error: unseal: ", ctx->err);
            cli_write_safe(ctx->err, err.msg[0] ? err.msg : kms_strerror(rc));
            fputs(" (nothing was sent; check the share for typos)\n", ctx->err);
            return CLI_EXIT_LOCAL;
        }
    }
    req.share = share;
    req.reset = unseal_reset;
    rc = cli_rpc(ctx, "unseal", "Unseal", &req.base, &kmsd__v1__unseal_response__descriptor, &m,
                 true);
    OPENSSL_cleanse(share, sizeof(share));
    if (rc != 0) {
        return rc;
    }
    Kmsd__V1__UnsealResponse *r = (Kmsd__V1__UnsealResponse *)m;
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_bool(&j, "sealed", r->sealed);
        cli_json_u64(&j, "progress", r->progress);
        cli_json_u64(&j, "threshold", r->threshold);
        cli_json_obj_end(&j);
        cli_json_end(&j);
    } else if (r->sealed) {
        if (unseal_reset && len == 0) {
            fputs("Unseal progress reset.\n", ctx->out);
        }
        fprintf(ctx->out, "Sealed: true\nUnseal Progress: %u/%u\n", r->progress, r->threshold);
    } else {
        fputs("Sealed: false\n", ctx->out);
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return CLI_EXIT_OK;
}

/* ---- seal, step-down, rotate ---------------------------------------- */

static int seal_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__SealRequest req = KMSD__V1__SEAL_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    rc = cli_rpc(ctx, "seal", "Seal", &req.base, &kmsd__v1__seal_response__descriptor, &m,
                 false);
    if (rc != 0) {
        return rc;
    }
    protobuf_c_message_free_unpacked(m, NULL);
    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, ctx->out);
        cli_json_obj_begin(&j, NULL);
        cli_json_bool(&j, "sealed", true);
        cli_json_obj_end(&j);
        cli_json_end(&j);
    } else {
        fputs("Success! Sealed the replica at ", ctx->out);
        cli_write_safe(ctx->out, ctx->g.target);
        fputs(": its keys are wiped from memory and its Talos port is closed.\n", ctx->out);
    }
    return CLI_EXIT_OK;
}

static int step_down_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__StepDownRequest req = KMSD__V1__STEP_DOWN_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    rc = cli_rpc(ctx, "step-down", "StepDown", &req.base,
                 &kmsd__v1__step_down_response__descriptor, &m, false);
    if (rc != 0) {
        return rc;
    }
    uint64_t nl = ((Kmsd__V1__StepDownResponse *)m)->new_leader_id;
    protobuf_c_message_free_unpacked(m, NULL);
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_u64(ctx->out, "new_leader_id", nl);
    } else if (nl != 0) {
        fprintf(ctx->out, "Success! Stepped down; node %" PRIu64 " is the new leader.\n", nl);
    } else {
        fputs("Success! Stepped down; a new leader is being elected.\n", ctx->out);
    }
    return CLI_EXIT_OK;
}

static int rotate_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__RotateRequest req = KMSD__V1__ROTATE_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    rc = cli_rpc(ctx, "rotate", "Rotate", &req.base, &kmsd__v1__rotate_response__descriptor, &m,
                 false);
    if (rc != 0) {
        return rc;
    }
    uint32_t t = ((Kmsd__V1__RotateResponse *)m)->active_term;
    protobuf_c_message_free_unpacked(m, NULL);
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

/* ---- seal-migrate ---------------------------------------------------- */

static const char *migrate_to;

static const struct cli_flag migrate_flags[] = {
    {"to", 0, CLI_FLAG_STRING, &migrate_to, NULL, 0, 0, "pkcs11|shamir",
     "the seal to migrate the cluster to", false},
    {NULL, 0, CLI_FLAG_BOOL, NULL, NULL, 0, 0, NULL, NULL, false},
};

#define MIGRATE_MAX_SHARES 255

static int seal_migrate_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc,
                            char **argv)
{
    Kmsd__V1__SealMigrateRequest req = KMSD__V1__SEAL_MIGRATE_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    char *shares[MIGRATE_MAX_SHARES];
    size_t n = 0;
    int npos = 0, rc;
    bool tty = isatty(STDIN_FILENO) != 0;

    migrate_to = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
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
        struct kms_share parsed;
        struct kms_err err;
        int len;
        snprintf(prompt, sizeof(prompt), "Key share %zu (empty line to finish): ", n + 1);
        len = cli_read_secret(STDIN_FILENO, tty ? prompt : NULL, tty ? ctx->err : NULL, buf,
                              sizeof(buf));
        if (len <= 0) {
            OPENSSL_cleanse(buf, sizeof(buf));
            break;
        }
        kms_err_clear(&err);
        rc = kms_share_parse(buf, &parsed, &err);
        OPENSSL_cleanse(&parsed, sizeof(parsed));
        if (rc != 0) {
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
    rc = cli_rpc(ctx, "seal-migrate", "SealMigrate", &req.base,
                 &kmsd__v1__seal_migrate_response__descriptor, &m, false);
    if (rc != 0) {
        goto out;
    }
    {
        Kmsd__V1__SealMigrateResponse *r = (Kmsd__V1__SealMigrateResponse *)m;
        if (ctx->g.out == CLI_OUT_JSON) {
            struct cli_json j;
            cli_json_init(&j, ctx->out);
            cli_json_obj_begin(&j, NULL);
            cli_json_str(&j, "seal_type", r->seal_type);
            cli_json_u64(&j, "active_term", r->active_term);
            cli_json_obj_end(&j);
            cli_json_end(&j);
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
        protobuf_c_message_free_unpacked(m, NULL);
    }
    rc = CLI_EXIT_OK;
out:
    for (size_t i = 0; i < n; i++) {
        OPENSSL_cleanse(shares[i], strlen(shares[i]));
        free(shares[i]);
    }
    return rc;
}

const struct cli_cmd cli_operator_subs[] = {
    {"init", "initialise a new cluster and print its key shares",
     "Usage: kmsctl operator init [--key-shares N] [--key-threshold K]\n"
     "                            [--share-recipients FILE]\n"
     "\n"
     "Generates the root key, splits it into N key shares of which any K unseal\n"
     "a replica, and stores the first keyring (encrypted under the root key).\n"
     "The shares are printed once and never stored: hand each to a different\n"
     "operator. Run once per cluster, against any replica.",
     NULL, init_run, init_flags, false},
    {"unseal", "give a replica one key share",
     "Usage: kmsctl operator unseal [--reset] [--share-key KEY.pem] [SHARE | -]\n"
     "\n"
     "Adds one key share to the replica at --endpoint. Without SHARE, prompts for\n"
     "it with hidden input (or reads one line from stdin when it is not a\n"
     "terminal; '-' reads stdin too). The share is checked locally first (a typo\n"
     "is refused before anything is sent). Once the threshold is reached the\n"
     "replica unseals. Each replica is unsealed separately.",
     NULL, unseal_run, unseal_flags, false},
    {"seal", "wipe a replica's keys from memory",
     "Usage: kmsctl operator seal\n"
     "\n"
     "Seals the replica at --endpoint: it wipes the root key and keyring from\n"
     "memory, closes its Talos port, and needs key shares again to serve keys.",
     NULL, seal_run, NULL, false},
    {"step-down", "make the leader give up leadership",
     "Usage: kmsctl operator step-down\n"
     "\n"
     "Asks the replica at --endpoint, which must be the leader, to hand\n"
     "leadership to another voter.",
     NULL, step_down_run, NULL, false},
    {"rotate", "add a keyring term for new seals",
     "Usage: kmsctl operator rotate\n"
     "\n"
     "Adds a new data key term to the keyring. New seals use it; keys sealed\n"
     "under earlier terms keep unsealing. The root key and shares are unchanged.",
     NULL, rotate_run, NULL, false},
    {"seal-migrate", "move the cluster between the Shamir and the PKCS#11 seal",
     "Usage: kmsctl operator seal-migrate --to pkcs11|shamir < shares\n"
     "\n"
     "Reads k key shares, one per line (prompted, hidden, on a terminal; an empty\n"
     "line ends), and moves the cluster to the other seal. --to pkcs11 (k unseal\n"
     "shares): the root key is wrapped by the HSM key (created if missing) and\n"
     "replicas with seal.type pkcs11 unseal themselves; the shares become\n"
     "recovery shares. --to shamir (k recovery shares): the HSM wrap is removed\n"
     "and every replica needs k shares at start again. Both rotate the keyring\n"
     "once. Runs on the leader, which must have seal.type pkcs11 for --to pkcs11.",
     NULL, seal_migrate_run, migrate_flags, false},
    /* cmd_rewrap.c */
    {"rewrap", "re-encrypt every record on an older term under the active term",
     cli_rewrap_usage, NULL, cli_rewrap_run, cli_rewrap_flags, false},
    {"retire-term", "remove an old term's key from the keyring", cli_retire_term_usage, NULL,
     cli_retire_term_run, NULL, false},
    {"members", "list and change the cluster's members", cli_members_usage, cli_members_subs,
     NULL, NULL, false},
    {"snapshot", "save and inspect online backups", cli_snapshot_usage, cli_snapshot_subs,
     NULL, NULL, false},
    {"rekey", "replace the key shares (new root key)", cli_rekey_usage, cli_rekey_subs, NULL,
     NULL, false},
    {NULL, NULL, NULL, NULL, NULL, NULL, false},
};
