/*
 * kmsctl keys list | show | revoke: the sealed-key records (metadata only;
 * kmsd never returns key material).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_common.h"

const char cli_keys_usage[] =
    "Usage: kmsctl keys COMMAND [flags]\n"
    "\n"
    "Lists, shows and revokes the records of sealed keys (one per Talos Seal).\n"
    "Revoking a record crypto-shreds that disk: its key can never be unsealed\n"
    "again.";

static void key_json_fields(struct cli_json *j, const Kmsd__V1__KeyInfo *k)
{
    cli_json_str(j, "key_id", k->key_id);
    cli_json_str(j, "node_uuid", k->node_uuid);
    cli_json_u64(j, "term", k->term);
    cli_json_time(j, "created_at", k->created_at);
    cli_json_str(j, "source_ip", k->source_ip);
    cli_json_time(j, "last_access_at", k->last_access_at);
    cli_json_time(j, "revoked_at", k->revoked_at);
    cli_json_bool(j, "revoked", k->revoked_at != 0);
    cli_json_u64(j, "origin_term", k->origin_term); /* 0: never rewrapped */
}

void cli_key_print(FILE *f, enum cli_output out, const Kmsd__V1__KeyInfo *k)
{
    if (out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, f);
        key_json_fields(&j, k);
        cli_json_doc_end(&j);
        return;
    }
    char term[48], created[40], access[40], revoked[40];
    if (k->origin_term != 0) {
        snprintf(term, sizeof(term), "%u (rewrapped from %u)", k->term, k->origin_term);
    } else {
        snprintf(term, sizeof(term), "%u", k->term);
    }
    cli_format_time(k->created_at, false, created, sizeof(created));
    cli_format_time(k->last_access_at, false, access, sizeof(access));
    cli_format_time(k->revoked_at, false, revoked, sizeof(revoked));
    const char *rows[][2] = {
        {"Key ID", cli_dash(k->key_id)},
        {"Node UUID", cli_dash(k->node_uuid)},
        {"Key Term", term},
        {"Created", created},
        {"Source IP", cli_dash(k->source_ip)},
        {"Last Access", access},
        {"Revoked", k->revoked_at != 0 ? revoked : "no"},
    };
    struct cli_table *t = cli_table_new_kv();
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        cli_table_row(t, rows[i]);
    }
    cli_table_print(f, t);
    cli_table_free(t);
}

void cli_keys_print(FILE *f, enum cli_output out, Kmsd__V1__KeyInfo *const *k, size_t n)
{
    if (out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, f);
        cli_json_arr_begin(&j, "keys");
        for (size_t i = 0; i < n; i++) {
            cli_json_obj_begin(&j, NULL);
            key_json_fields(&j, k[i]);
            cli_json_obj_end(&j);
        }
        cli_json_arr_end(&j);
        cli_json_doc_end(&j);
        return;
    }
    static const char *const hdr[7] = {"KEY ID",    "NODE UUID",   "TERM",   "CREATED",
                                       "SOURCE IP", "LAST ACCESS", "REVOKED"};
    struct cli_table *t = cli_table_new(7, hdr);
    for (size_t i = 0; i < n; i++) {
        char term[16], created[40], access[40], revoked[40];
        snprintf(term, sizeof(term), "%u", k[i]->term);
        cli_format_time(k[i]->created_at, false, created, sizeof(created));
        cli_format_time(k[i]->last_access_at, false, access, sizeof(access));
        cli_format_time(k[i]->revoked_at, false, revoked, sizeof(revoked));
        const char *row[7] = {cli_dash(k[i]->key_id),    cli_dash(k[i]->node_uuid), term,
                              created, cli_dash(k[i]->source_ip), access, revoked};
        cli_table_row(t, row);
    }
    cli_table_print(f, t);
    cli_table_free(t);
    if (n == 0) {
        fputs("(no keys)\n", f);
    }
}

/* ---- list ------------------------------------------------------------ */

static const char *list_uuid;

#define LIST_MAX_PAGES 100000 /* 10^8 keys: a server that never ends paging */

static unsigned long list_page_size;
static const char *list_unused;
static bool list_revoked;
static unsigned long list_term;

/* "90d", "12h", "30m", "45s" (one number, one unit) to milliseconds; -1
 * when malformed or above ten years. */
static int64_t list_duration_ms(const char *s)
{
    uint64_t v = 0, unit;
    size_t i = 0;

    for (; s[i] >= '0' && s[i] <= '9'; i++) {
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > 1000000000ull) {
            return -1;
        }
    }
    if (i == 0 || s[i] == '\0' || s[i + 1] != '\0') {
        return -1;
    }
    switch (s[i]) {
    case 'd': unit = 86400000ull; break;
    case 'h': unit = 3600000ull; break;
    case 'm': unit = 60000ull; break;
    case 's': unit = 1000ull; break;
    default: return -1;
    }
    if (v * unit > 10ull * 366 * 86400000ull) {
        return -1;
    }
    return (int64_t)(v * unit);
}

static const struct cli_flag list_flags[] = {
    {"node-uuid", 0, CLI_FLAG_STRING, &list_uuid, NULL, 0, 0, "UUID",
     "only the keys sealed by this machine (SMBIOS UUID)", false},
    {"page-size", 0, CLI_FLAG_UINT, &list_page_size, NULL, 1, 1000, "N",
     "keys fetched per request (default: the server's, 1000); all pages are shown", false},
    {"unused-since", 0, CLI_FLAG_STRING, &list_unused, NULL, 0, 0, "AGE",
     "only keys not unsealed for AGE (90d, 12h, 30m, 45s; never-used keys count from their "
     "creation)", false},
    {"revoked", 0, CLI_FLAG_BOOL, &list_revoked, NULL, 0, 0, NULL, "only revoked keys", false},
    {"term", 0, CLI_FLAG_UINT, &list_term, NULL, 1, 4294967295UL, "T",
     "only keys on keyring term T (the term that protects them now)", false},
    CLI_FLAG_END,
};

static int list_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__KeysListRequest req = KMSD__V1__KEYS_LIST_REQUEST__INIT;
    ProtobufCMessage *m = NULL, **pages = NULL;
    Kmsd__V1__KeyInfo **all = NULL;
    size_t n_pages = 0, n_keys = 0;
    int rc;

    list_uuid = NULL;
    list_page_size = 0;
    list_unused = NULL;
    list_revoked = false;
    list_term = 0;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (list_unused != NULL) {
        int64_t age = list_duration_ms(list_unused);
        struct timespec ts;
        if (age <= 0) {
            return cli_usage_error(ctx, "--unused-since: '%s' is not an age such as 90d, 12h, "
                                   "30m or 45s", list_unused);
        }
        clock_gettime(CLOCK_REALTIME, &ts);
        req.unused_since = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 - age;
    }
    req.revoked = list_revoked;
    req.term = (uint32_t)list_term;
    req.node_uuid = (char *)(list_uuid != NULL ? list_uuid : "");
    req.page_size = (uint32_t)list_page_size; /* 0: the server's default (and maximum) */
    /* Pages transparently: every page is fetched, then all keys printed. */
    for (;;) {
        ProtobufCMessage **more;
        Kmsd__V1__KeysListResponse *r;
        rc = cli_rpc(ctx, "keys list", "KeysList", &req.base,
                     &kmsd__v1__keys_list_response__descriptor, &m, false);
        if (rc != 0) {
            goto out;
        }
        r = (Kmsd__V1__KeysListResponse *)m;
        more = realloc(pages, (n_pages + 1) * sizeof(*pages));
        if (more == NULL || n_pages >= LIST_MAX_PAGES) {
            protobuf_c_message_free_unpacked(m, NULL);
            fprintf(ctx->err, "kmsctl: keys list: %s\n",
                    more == NULL ? "out of memory" : "too many pages");
            if (more != NULL) {
                pages = more;
            }
            rc = CLI_EXIT_LOCAL;
            goto out;
        }
        pages = more;
        pages[n_pages++] = m;
        n_keys += r->n_keys;
        if (r->next_page_token == NULL || r->next_page_token[0] == '\0' || r->n_keys == 0) {
            break;
        }
        req.page_token = r->next_page_token;
    }
    all = calloc(n_keys + 1, sizeof(*all));
    if (all == NULL) {
        fprintf(ctx->err, "kmsctl: keys list: out of memory\n");
        rc = CLI_EXIT_LOCAL;
        goto out;
    }
    for (size_t p = 0, k = 0; p < n_pages; p++) {
        Kmsd__V1__KeysListResponse *r = (Kmsd__V1__KeysListResponse *)pages[p];
        for (size_t i = 0; i < r->n_keys; i++) {
            all[k++] = r->keys[i];
        }
    }
    cli_keys_print(ctx->out, ctx->g.out, all, n_keys);
    rc = CLI_EXIT_OK;
out:
    free(all);
    for (size_t p = 0; p < n_pages; p++) {
        protobuf_c_message_free_unpacked(pages[p], NULL);
    }
    free(pages);
    return rc;
}

/* ---- show ------------------------------------------------------------ */

static int show_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    const Kmsd__V1__KeysShowResponse *r = (const Kmsd__V1__KeysShowResponse *)resp;

    (void)arg;
    if (r->key == NULL) {
        fputs("Error: keys show: the server returned no key\n", ctx->err);
        return CLI_EXIT_REMOTE;
    }
    cli_key_print(ctx->out, ctx->g.out, r->key);
    return CLI_EXIT_OK;
}

static const struct cli_method show_method = {"keys show", "KeysShow",
                                              &kmsd__v1__keys_show_response__descriptor, false};

/* The KEY_ID word, checked; 0 or the usage error's exit code. */
static int key_id_arg(struct cli_ctx *ctx, const char *word)
{
    return cli_is_key_id(word) ? 0 : cli_usage_error(ctx, "KEY_ID must be 32 hex digits");
}

static int show_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__KeysShowRequest req = KMSD__V1__KEYS_SHOW_REQUEST__INIT;
    char *pos[1] = {NULL};
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos)) >= 0) {
        return rc;
    }
    if (npos != 1) {
        return cli_usage_error(ctx, "missing KEY_ID");
    }
    if ((rc = key_id_arg(ctx, pos[0])) != 0) {
        return rc;
    }
    req.key_id = pos[0];
    return cli_call(ctx, &show_method, &req.base, show_print_cb, NULL);
}

/* ---- revoke ---------------------------------------------------------- */

static const char *revoke_uuid;

static const struct cli_flag revoke_flags[] = {
    {"node-uuid", 0, CLI_FLAG_STRING, &revoke_uuid, NULL, 0, 0, "UUID",
     "revoke every key sealed by this machine", false},
    CLI_FLAG_END,
};

static int revoke_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    uint64_t n = ((const Kmsd__V1__KeysRevokeResponse *)resp)->revoked;

    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_u64(ctx->out, "revoked", n);
    } else {
        fprintf(ctx->out, "Success! Revoked %" PRIu64 " key%s.\n", n, n == 1 ? "" : "s");
    }
    return CLI_EXIT_OK;
}

static const struct cli_method revoke_method = {
    "keys revoke", "KeysRevoke", &kmsd__v1__keys_revoke_response__descriptor, false};

static int revoke_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__KeysRevokeRequest req = KMSD__V1__KEYS_REVOKE_REQUEST__INIT;
    char *pos[1] = {NULL};
    int npos = 0, rc;

    revoke_uuid = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos)) >= 0) {
        return rc;
    }
    if ((npos == 1) == (revoke_uuid != NULL)) {
        return cli_usage_error(ctx, "give either KEY_ID or --node-uuid UUID");
    }
    if (npos == 1) {
        if ((rc = key_id_arg(ctx, pos[0])) != 0) {
            return rc;
        }
        req.key_id = pos[0];
    } else {
        if (revoke_uuid[0] == '\0') {
            return cli_usage_error(ctx, "--node-uuid must not be empty");
        }
        req.node_uuid = (char *)revoke_uuid;
    }
    return cli_call(ctx, &revoke_method, &req.base, revoke_print_cb, NULL);
}

const struct cli_cmd cli_keys_subs[] = {
    CLI_CMD_LEAF("list", "list sealed keys",
                 "Usage: kmsctl keys list [--node-uuid UUID] [--unused-since AGE] [--revoked] "
                 "[--term T]\n"
                 "\n"
                 "Lists the sealed-key records (all, or one machine's; filters combine).\n"
                 "LAST ACCESS is the last successful unseal as recorded by the cluster\n"
                 "(batched: up to lastAccess.interval late). Times are RFC 3339 UTC.",
                 list_run, list_flags),
    CLI_CMD_LEAF("show", "show one sealed key",
                 "Usage: kmsctl keys show KEY_ID\n"
                 "\n"
                 "Shows one record. KEY_ID is 32 hex digits (bytes 1..16 of the blob Talos\n"
                 "stores in its LUKS2 token).",
                 show_run, NULL),
    CLI_CMD_LEAF("revoke", "revoke a key, or every key of a machine",
                 "Usage: kmsctl keys revoke KEY_ID\n"
                 "       kmsctl keys revoke --node-uuid UUID\n"
                 "\n"
                 "Revokes through the raft log: once acknowledged, no replica unseals the\n"
                 "key(s) again (within one lease period). This crypto-shreds the disk(s):\n"
                 "it cannot be undone.",
                 revoke_run, revoke_flags),
    CLI_CMD_END,
};
