/*
 * kmsctl internals, one file per job:
 *   cli_args.c         global flags and their environment twins, flag parsing
 *   cli_dispatch.c     the command table walk, help, usage errors
 *   cli_output.c       terminal-safe text, RFC 3339 times, tables
 *   cli_json.c         a small JSON writer (-o json)
 *   cli_errors.c       failed calls told in one line, Vault's exit codes
 *   cli_rpc.c          the connection to a kmsd cluster API and cli_call
 *   cli_share_input.c  reading, checking and wiping key shares
 *   cli_share_recipients.c  share holders' keys (init, unseal --share-key)
 * and one cmd_*.c per command or group (their tables are declared at the
 * end; kmsctl.c has main and the root table).
 *
 * kmsctl is single-threaded: every function here runs on main's thread.
 * Strings in struct cli_global and the command tables are borrowed (argv,
 * the environment, static text); what a function allocates for its caller
 * says so where it is declared.
 *
 * Everything here except the connection is pure (no globals, output to a
 * FILE *), so tests/unit/test_kmsctl_args.c can drive it in memory.
 *
 * Exit codes (like Vault): 0 ok, 1 local or usage error (bad flags,
 * unreadable files), 2 remote error (any non-OK gRPC status, including a
 * refused connection or a deadline). `status` differs (docs/kmsctl.md): 0
 * serving, 2 reached but not serving, 1 when it cannot ask.
 */
#ifndef KMSCTL_CLI_COMMON_H
#define KMSCTL_CLI_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <protobuf-c/protobuf-c.h>

#include "kmsd/v1/cluster.pb-c.h"

struct kms_err;

#define CLI_EXIT_OK 0
#define CLI_EXIT_LOCAL 1
#define CLI_EXIT_REMOTE 2

#define CLI_DEFAULT_ENDPOINT "127.0.0.1:4051"
#define CLI_DEFAULT_TIMEOUT_MS 10000u
#define CLI_ERRBUF 512
#define CLI_MAX_ENDPOINTS 8
#define CLI_TARGET_MAX 256

enum cli_output { CLI_OUT_TABLE = 0, CLI_OUT_JSON = 1 };

/* ---- global flags ---------------------------------------------------- */

/* Raw values (env first, then flags override) and where each came from, so
 * a bad value names its source ("--timeout" or "KMSCTL_TIMEOUT"). The
 * strings are borrowed from argv / the environment. */
struct cli_global {
    const char *endpoint, *cacert, *cert, *key, *output, *timeout;
    const char *endpoint_src, *cacert_src, *cert_src, *key_src, *output_src, *timeout_src;
    bool help;
    /* Filled by cli_global_finish(). */
    enum cli_output out;
    unsigned timeout_ms;
    bool insecure;          /* endpoint given as grpc://host:port */
    const char *target;     /* endpoint without its scheme (the one in use) */
    /* --endpoints a,b,c (or KMSCTL_ENDPOINT with commas): each without its
     * scheme; cli_rpc moves to the next one when a connection fails. */
    char targets[CLI_MAX_ENDPOINTS][CLI_TARGET_MAX];
    unsigned n_targets, cur_target;
};

typedef const char *(*cli_getenv_fn)(const char *name);

/* Defaults. */
void cli_global_init(struct cli_global *g);
/* KMSCTL_ENDPOINT (or KMSCTL_ENDPOINTS), KMSCTL_CACERT, KMSCTL_CERT, KMSCTL_KEY, KMSCTL_OUTPUT,
 * KMSCTL_TIMEOUT (empty values are ignored). getenv_fn NULL = getenv. */
void cli_global_env(struct cli_global *g, cli_getenv_fn getenv_fn);
/* Validates and converts output and timeout, splits the endpoint list at
 * commas (at most CLI_MAX_ENDPOINTS, one scheme for all) and each endpoint's
 * scheme (none or https:// = TLS, grpc:// = plaintext). CLI_EXIT_LOCAL with a
 * one-line message in errbuf on error, else 0. */
int cli_global_finish(struct cli_global *g, char *errbuf, size_t errlen);

/* ---- argument parsing ----------------------------------------------- */

enum cli_flag_kind { CLI_FLAG_BOOL, CLI_FLAG_STRING, CLI_FLAG_UINT };

/* A command's own flag. dest: bool * / const char ** / unsigned long *
 * (UINT values are checked against [min, max]). seen (optional) is set when
 * the flag was given. Hidden flags are accepted but not listed in help. */
struct cli_flag {
    const char *name;     /* long name without "--" */
    char short_name;      /* 0 for none */
    enum cli_flag_kind kind;
    void *dest;
    bool *seen;
    unsigned long min, max;
    const char *metavar;  /* "N", "ADDR" */
    const char *help;
    bool hidden;
};

/* Parses argv[0..argc) (argv[0] is the first word after the command name)
 * against flags (terminated by an entry with name NULL; may be NULL) plus the
 * global flags, which are accepted anywhere. Forms: --name value,
 * --name=value, -x value, -xvalue, --bool, "--" ends flags. Positional words
 * are collected into pos[] (capacity maxpos, count in *npos); one more is a
 * usage error. Returns 0 or CLI_EXIT_LOCAL with a one-line message in
 * errbuf. */
int cli_parse(int argc, char **argv, const struct cli_flag *flags, struct cli_global *g,
              char **pos, int maxpos, int *npos, char *errbuf, size_t errlen);

/* Parses only leading global flags; *cmd_index receives the index of the
 * first non-flag word (argc when none). */
int cli_parse_leading(int argc, char **argv, struct cli_global *g, int *cmd_index,
                      char *errbuf, size_t errlen);

/* Strict unsigned decimal in [min, max]: no sign, no spaces, no suffix. */
int cli_parse_ulong(const char *s, unsigned long min, unsigned long max, unsigned long *out);

/* "10s", "500ms", "2m", "1.5s", "10" (seconds). 1 ms .. 1 hour. */
int cli_parse_duration_ms(const char *s, unsigned *out_ms);

/* True for 32 hex digits. */
bool cli_is_key_id(const char *s);

/* The "Flags:" lines of flags (may be NULL) and the global flags, for help. */
void cli_flags_print(FILE *f, const struct cli_flag *flags);

/* Ends a flag table. */
#define CLI_FLAG_END {.name = NULL}

/* ---- commands and dispatch ------------------------------------------ */

struct cli_ctx;

/* One row of a command table (like WireGuard's `wg` subcommands): a leaf
 * has run (and its flags), a group has subs. run receives the words after
 * the command's name and returns the exit code. */
struct cli_cmd {
    const char *name;
    const char *summary;          /* one line for the parent's help */
    const char *usage;            /* "kmsctl operator init [flags]" and details */
    const struct cli_cmd *subs;   /* sub-table (CLI_CMD_END ends it), or NULL */
    int (*run)(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
    const struct cli_flag *flags; /* for help output */
    bool hidden;
};

#define CLI_CMD_LEAF(name_, summary_, usage_, run_, flags_) \
    {.name = (name_), .summary = (summary_), .usage = (usage_), .run = (run_), .flags = (flags_)}
#define CLI_CMD_GROUP(name_, summary_, usage_, subs_) \
    {.name = (name_), .summary = (summary_), .usage = (usage_), .subs = (subs_)}
#define CLI_CMD_END {.name = NULL}

struct cli_ctx {
    struct cli_global g;
    FILE *out, *err;
    const char *path;             /* "operator init", for messages */
    const struct cli_cmd *root;
    /* connection (lazy) */
    struct kms_rpc_channel *ch;
    bool rpc_inited;
    char redirect_target[256];    /* the leader's address once a follower named it */
    /* quiet: cli_rpc does not print its error, only stores it in last_error
     * (status --cluster puts it in a row). */
    bool quiet;
    char last_error[CLI_ERRBUF];
    bool last_unreachable;        /* the last failure was a connection failure */
    bool tls_checked;             /* local TLS file checks passed */
    /* test hook: when set, cli_rpc() calls it instead of the network */
    int (*fake_rpc)(void *arg, const char *method, const uint8_t *req, size_t reqlen,
                    uint8_t **resp, size_t *resplen, int *grpc_status, char **details);
    void *fake_arg;
};

void cli_ctx_init(struct cli_ctx *ctx, FILE *out, FILE *err);
void cli_ctx_close(struct cli_ctx *ctx);

/* Full program: leading global flags, then the command path through the
 * table, -h / help, env, finish, run. Returns the exit code. */
int cli_main(const struct cli_cmd *root, struct cli_ctx *ctx, int argc, char **argv,
             cli_getenv_fn getenv_fn);

/* Help for a command (usage, subcommands, flags, global flags). */
void cli_print_help(FILE *f, const struct cli_cmd *cmd, const char *path);

/* Prints "Error: <msg> (see 'kmsctl <path> -h')" and returns CLI_EXIT_LOCAL. */
int cli_usage_error(struct cli_ctx *ctx, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Parses a leaf command's flags into ctx->g and pos[], handles -h, and
 * finishes the globals. Returns -1 to go on, else the exit code to return.
 * pos NULL: no positional words (npos may then be NULL too). */
int cli_leaf_parse(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                   char **pos, int maxpos, int *npos);

/* ---- errors ---------------------------------------------------------- */

/* Go-style gRPC code name ("FailedPrecondition"); "Unknown" beyond the
 * table. */
const char *cli_grpc_code_name(int grpc_status);

/* 0 for OK, CLI_EXIT_REMOTE for every other status. */
int cli_exit_for_grpc(int grpc_status);

/* What a failed call's status says about the connection: the call reached
 * the server (an application error: CLI_FAIL_APP), or gRPC core failed it
 * before: refused, timed out, TLS handshake (gRPC 1.51 says only "Socket
 * closed" or "handshake" failures), or another transport failure. */
enum cli_fail_kind {
    CLI_FAIL_APP = 0,
    CLI_FAIL_REFUSED,
    CLI_FAIL_TIMEOUT,
    CLI_FAIL_TLS,
    CLI_FAIL_TRANSPORT,
};
enum cli_fail_kind cli_fail_classify(int grpc_status, const char *details);
/* "Error: <op>: <details> (code <Name>)" into buf (no newline); details are
 * made terminal-safe; empty details use the code's description. */
void cli_format_rpc_error(char *buf, size_t len, const char *op, int grpc_status,
                          const char *details);
/* The operator-readable line for a failure gRPC core reported (kind !=
 * CLI_FAIL_APP) or for the server refusing the client certificate: names
 * ctx's target, timeout and TLS files. */
void cli_explain_failure(struct cli_ctx *ctx, char *buf, size_t len, const char *op,
                         enum cli_fail_kind kind, int grpc_status, const char *details);

/* ---- output ---------------------------------------------------------- */

/* Writes s with control and non-UTF-8 bytes replaced (for tables and error
 * messages: a server string cannot move the cursor or change colours). */
void cli_write_safe(FILE *f, const char *s);
/* s as cli_write_safe writes it, malloc'd (NULL when out of memory). */
char *cli_safe_dup(const char *s);
/* Length of the valid UTF-8 sequence at s (1..4) with its code point, or 0. */
int cli_utf8_next(const unsigned char *s, uint32_t *cp);
/* s, or "-" for NULL and "" (table cells). */
const char *cli_dash(const char *s);
/* "<label> 1: <share>" ... one line per share, terminal-safe. */
void cli_print_shares(FILE *f, const char *label, char *const *shares, size_t n);

/* Unix milliseconds to RFC 3339 UTC: "2024-05-01T12:34:56Z", or with
 * with_ms "2024-05-01T12:34:56.789Z". 0 gives "-". */
void cli_format_time(int64_t unix_ms, bool with_ms, char *buf, size_t len);

/* Simple aligned table: header row, then rows, two spaces between columns. */
struct cli_table;
struct cli_table *cli_table_new(unsigned ncols, const char *const *header);
void cli_table_row(struct cli_table *t, const char *const *cells);
void cli_table_print(FILE *f, const struct cli_table *t);
void cli_table_free(struct cli_table *t);
/* The two-column "Key  Value" table (with its "---  -----" line) of status
 * and keys show, and one of its rows. */
struct cli_table *cli_table_new_kv(void);
void cli_table_kv(struct cli_table *t, const char *k, const char *v);

/* JSON writer: pretty printed (2 spaces), keys in the order written. key is
 * NULL inside arrays. Strings are escaped (RFC 8259); invalid UTF-8 becomes
 * U+FFFD. Nesting deeper than CLI_JSON_MAX_DEPTH is ignored. */
#define CLI_JSON_MAX_DEPTH 16
struct cli_json {
    FILE *f;
    int depth;
    bool first[CLI_JSON_MAX_DEPTH];
};
void cli_json_init(struct cli_json *j, FILE *f);
void cli_json_escape(FILE *f, const char *s);
void cli_json_obj_begin(struct cli_json *j, const char *key);
void cli_json_obj_end(struct cli_json *j);
void cli_json_arr_begin(struct cli_json *j, const char *key);
void cli_json_arr_end(struct cli_json *j);
void cli_json_str(struct cli_json *j, const char *key, const char *v); /* NULL -> "" */
void cli_json_u64(struct cli_json *j, const char *key, uint64_t v);
void cli_json_i64(struct cli_json *j, const char *key, int64_t v);
void cli_json_bool(struct cli_json *j, const char *key, bool v);
void cli_json_null(struct cli_json *j, const char *key);
/* RFC 3339 string with milliseconds, or null for 0. */
void cli_json_time(struct cli_json *j, const char *key, int64_t unix_ms);
/* Ends the document with a newline. */
void cli_json_end(struct cli_json *j);
/* A whole document's outer object: init and "{" ... "}" and the newline. */
void cli_json_doc_begin(struct cli_json *j, FILE *f);
void cli_json_doc_end(struct cli_json *j);
/* Arrays of strings and of numbers under key. */
void cli_json_str_array(struct cli_json *j, const char *key, char *const *v, size_t n);
void cli_json_u32_array(struct cli_json *j, const char *key, const uint32_t *v, size_t n);
/* Prints the one-field document {"key": v} to f, with a newline. */
void cli_json_print_u64(FILE *f, const char *key, uint64_t v);
void cli_json_print_bool(FILE *f, const char *key, bool v);

/* ---- RPC ------------------------------------------------------------- */

/* One Operator call: packs req, calls method ("Status" -> /kmsd.v1.Operator/
 * Status), unpacks into *resp (free with protobuf_c_message_free_unpacked).
 * On failure prints the error to ctx->err and returns the exit code (1 for
 * local failures such as unreadable TLS files, 2 for any gRPC status other
 * than OK). secret: request and response bytes are wiped after use. */
int cli_rpc(struct cli_ctx *ctx, const char *op, const char *method,
            const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
            ProtobufCMessage **resp, bool secret);
/* cli_rpc follows a follower's "not the leader; the leader is node N,
 * cluster API at ADDR" (nothing was changed there) to ADDR, at most twice,
 * with a note on ctx->err. This parses that message: true with *id and addr
 * (printable, no spaces) filled. */
bool cli_leader_redirect_parse(const char *details, uint64_t *id, char *addr, size_t addrlen);

/* One Operator method as a command calls it (a static const per command). */
struct cli_method {
    const char *op;                             /* "members add", for messages */
    const char *name;                           /* "MembersAdd" */
    const ProtobufCMessageDescriptor *resp_desc;
    bool secret;                                /* cli_rpc's secret */
};
/* Uses a call's answer (prints it); returns the exit code. resp is owned
 * by cli_call, which frees it once this returns. */
typedef int (*cli_resp_cb)(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg);
/* What every command's call does: cli_rpc (connect, call, error report),
 * then resp_cb(ctx, resp, arg) (NULL: nothing to print), then the free.
 * Returns cli_rpc's exit code when the call failed, else resp_cb's
 * (CLI_EXIT_OK without one). */
int cli_call(struct cli_ctx *ctx, const struct cli_method *m, const ProtobufCMessage *req,
             cli_resp_cb resp_cb, void *arg);
/* A command without positional words that sends req as it is: its flags
 * (cli_leaf_parse), then cli_call. */
int cli_leaf_call(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                  const struct cli_method *m, const ProtobufCMessage *req, cli_resp_cb resp_cb,
                  void *arg);

/* ---- key shares (cli_share_input.c) ---------------------------------- */

/* A share given on the command line: copies arg into share (cap bytes,
 * not terminated beyond what the caller zeroed) and wipes arg in argv (and
 * so in /proc/PID/cmdline). Its length, or -1 when it does not fit (arg is
 * wiped all the same). */
int cli_share_take_arg(char *arg, char *share, size_t cap);

/* Reads one line (a share) without echo when fd is a terminal; at most
 * cap-1 bytes, surrounding whitespace trimmed. Returns its length, or -1. */
int cli_read_secret(int fd, const char *prompt, FILE *prompt_to, char *buf, size_t cap);

/* Format and checksum of a share text, locally (nothing is sent for a
 * typo): 0, or a negative KMS_E* with err filled. */
int cli_share_check(const char *share, struct kms_err *err);

/* One share for a command taking [SHARE | -]. buf (cap bytes) is the
 * caller's; it holds the share and is wiped by the functions below on every
 * failure, and by the caller after the call. */
struct cli_share_in {
    char *buf;
    size_t cap;
    int npos;  /* SHARE words given: 0 or 1 */
    bool dash; /* the word was '-' (stdin) */
    int len;   /* bytes in buf; -1 when the SHARE word was too long */
};
/* Parses cmd's flags and the optional SHARE | '-' word (zeroes buf first; a
 * SHARE is copied into buf and wiped from argv at once). Returns -1 to go
 * on, else the exit code (help, usage error). */
int cli_share_parse(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv,
                    struct cli_share_in *in);
/* The share for op ("unseal"): the SHARE word's, one line of stdin for '-',
 * or typed at prompt when there is no word (unless optional: then none is
 * fine). Decrypted with key_path first when given (init
 * --share-recipients), then checked locally. 0 with in->len set (0 only
 * when optional), else the exit code with the error printed. */
int cli_share_get(struct cli_ctx *ctx, const char *op, struct cli_share_in *in,
                  const char *prompt, bool optional, const char *key_path);
/* Wipes shares (of a response: init, rekey update, before it is freed),
 * after flushing shown_on (where they were printed; may be NULL). */
void cli_shares_wipe(FILE *shown_on, char *const *shares, size_t n);

/* ---- commands (cmd_*.c) --------------------------------------------- */

/* Group tables (name NULL ends each) and usage texts, for kmsctl.c's root
 * table; "operator members" is cmd_members.c. */
extern const char cli_status_usage[];
extern const struct cli_flag cli_status_flags[];
int cli_status_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
extern const struct cli_cmd cli_operator_subs[];
extern const char cli_operator_usage[];
extern const struct cli_cmd cli_members_subs[];
extern const char cli_members_usage[];
extern const struct cli_cmd cli_keys_subs[];
extern const char cli_keys_usage[];
extern const struct cli_cmd cli_snapshot_subs[]; /* cmd_snapshot.c */
extern const struct cli_cmd cli_audit_subs[];    /* cmd_audit.c */
extern const char cli_audit_usage[];
/* operator init (cmd_init.c), unseal and seal-migrate (cmd_unseal.c) */
extern const struct cli_flag cli_init_flags[];
int cli_init_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
extern const struct cli_flag cli_unseal_flags[];
int cli_unseal_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
extern const struct cli_flag cli_seal_migrate_flags[];
int cli_seal_migrate_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
/* operator rewrap / retire-term (cmd_rewrap.c) */
extern const char cli_rewrap_usage[];
extern const struct cli_flag cli_rewrap_flags[];
extern const char cli_retire_term_usage[];
int cli_rewrap_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
int cli_retire_term_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv);
extern const char cli_snapshot_usage[];
extern const struct cli_cmd cli_rekey_subs[]; /* cmd_rekey.c */
extern const char cli_rekey_usage[];

/* Share recipients (cli_share_recipients.c). load: the PEM public keys in path, in
 * order, each checked (*pems: n malloc'd strings in a malloc'd array).
 * open: replaces the encrypted share text in share (cap bytes) by the share
 * it holds, decrypted with the private key in key_path; share is wiped on
 * failure. Both: 0 or CLI_EXIT_LOCAL with errbuf filled. */
int cli_share_recipients_load(const char *path, char ***pems, size_t *n, char *errbuf,
                              size_t errlen);
int cli_share_key_open(const char *key_path, char *share, size_t cap, char *errbuf,
                       size_t errlen);

/* After step-down or transfer-leader: {"new_leader_id": N}, or
 * before N after when N is known, else unknown. CLI_EXIT_OK. */
int cli_new_leader_print(struct cli_ctx *ctx, uint64_t nl, const char *before,
                         const char *after, const char *unknown);
/* Writes members as a JSON array under key. */
void cli_json_members(struct cli_json *j, const char *key, Kmsd__V1__MemberStatus *const *m,
                      size_t n);

/* Status output, exposed for tests. */
void cli_status_print(FILE *f, enum cli_output out, const Kmsd__V1__StatusResponse *st);
/* 0 when serving: initialised, unsealed, a read lease (or unsealReads:
 * local) and the Talos listener open; else CLI_EXIT_REMOTE. */
int cli_status_exit(const Kmsd__V1__StatusResponse *st);
bool cli_status_serving(const Kmsd__V1__StatusResponse *st);
/* Table, or {"members": [...]} in JSON. */
void cli_members_print(FILE *f, enum cli_output out, Kmsd__V1__MemberStatus *const *m,
                       size_t n);
void cli_key_print(FILE *f, enum cli_output out, const Kmsd__V1__KeyInfo *k);
void cli_keys_print(FILE *f, enum cli_output out, Kmsd__V1__KeyInfo *const *k, size_t n);

/* operator init: local check of shares/threshold; 0 or CLI_EXIT_LOCAL. */
int cli_init_check(unsigned long shares, unsigned long threshold, bool allow_single,
                   char *errbuf, size_t errlen);

#endif /* KMSCTL_CLI_COMMON_H */
