/*
 * kmsctl operator members list | add | remove | transfer-leader.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli_common.h"

const char cli_members_usage[] =
    "Usage: kmsctl operator members COMMAND [flags]\n"
    "\n"
    "Lists and changes the raft membership of the cluster. Changes go through\n"
    "the leader (any replica forwards them).";

void cli_json_members(struct cli_json *j, const char *key, Kmsd__V1__MemberStatus *const *m,
                      size_t n)
{
    cli_json_arr_begin(j, key);
    for (size_t i = 0; i < n; i++) {
        cli_json_obj_begin(j, NULL);
        cli_json_u64(j, "id", m[i]->id);
        cli_json_str(j, "raft_address", m[i]->raft_address);
        cli_json_str(j, "cluster_address", m[i]->cluster_address);
        cli_json_str(j, "talos_address", m[i]->talos_address);
        cli_json_str(j, "role", m[i]->role);
        cli_json_str(j, "version", m[i]->version);
        cli_json_bool(j, "is_leader", m[i]->is_leader);
        cli_json_u64(j, "entry_version", m[i]->entry_version);
        cli_json_obj_end(j);
    }
    cli_json_arr_end(j);
}

void cli_members_print(FILE *f, enum cli_output out, Kmsd__V1__MemberStatus *const *m, size_t n)
{
    if (out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, f);
        cli_json_members(&j, "members", m, n);
        cli_json_doc_end(&j);
        return;
    }
    static const char *const hdr[7] = {"ID",    "ROLE",    "LEADER", "RAFT ADDRESS",
                                       "CLUSTER ADDRESS", "TALOS ADDRESS", "VERSION"};
    struct cli_table *t = cli_table_new(7, hdr);
    for (size_t i = 0; i < n; i++) {
        char id[24];
        snprintf(id, sizeof(id), "%" PRIu64, m[i]->id);
        const char *row[7] = {id,
                              cli_dash(m[i]->role),
                              m[i]->is_leader ? "yes" : "no",
                              cli_dash(m[i]->raft_address),
                              cli_dash(m[i]->cluster_address),
                              cli_dash(m[i]->talos_address),
                              cli_dash(m[i]->version)};
        cli_table_row(t, row);
    }
    cli_table_print(f, t);
    cli_table_free(t);
}

/* ---- list ------------------------------------------------------------ */

static int list_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    const Kmsd__V1__MembersListResponse *r = (const Kmsd__V1__MembersListResponse *)resp;

    (void)arg;
    cli_members_print(ctx->out, ctx->g.out, r->members, r->n_members);
    return CLI_EXIT_OK;
}

static const struct cli_method list_method = {
    "members list", "MembersList", &kmsd__v1__members_list_response__descriptor, false};

static int list_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__MembersListRequest req = KMSD__V1__MEMBERS_LIST_REQUEST__INIT;
    return cli_leaf_call(ctx, cmd, argc, argv, &list_method, &req.base, list_print_cb, NULL);
}

/* ---- add ------------------------------------------------------------- */

static unsigned long add_id;
static const char *add_raft, *add_cluster, *add_talos;
static bool add_id_seen;

static const struct cli_flag add_flags[] = {
    {"id", 0, CLI_FLAG_UINT, &add_id, &add_id_seen, 1, ~0UL,
     "N", "node id of the new member (required)", false},
    {"raft-address", 0, CLI_FLAG_STRING, &add_raft, NULL, 0, 0, "HOST:PORT",
     "its raft transport address (required)", false},
    {"cluster-address", 0, CLI_FLAG_STRING, &add_cluster, NULL, 0, 0, "HOST:PORT",
     "its cluster API address (forwarding, kmsctl)", false},
    {"talos-address", 0, CLI_FLAG_STRING, &add_talos, NULL, 0, 0, "HOST:PORT",
     "its Talos API address", false},
    CLI_FLAG_END,
};

static int add_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)resp;
    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_u64(ctx->out, "added", add_id);
    } else {
        fprintf(ctx->out, "Success! Node %lu added to the cluster (raft address ", add_id);
        cli_write_safe(ctx->out, add_raft);
        fputs(").\n", ctx->out);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method add_method = {"members add", "MembersAdd",
                                             &kmsd__v1__members_add_response__descriptor, false};

static int add_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__MembersAddRequest req = KMSD__V1__MEMBERS_ADD_REQUEST__INIT;
    int rc;

    add_id = 0;
    add_id_seen = false;
    add_raft = add_cluster = add_talos = NULL;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (!add_id_seen) {
        return cli_usage_error(ctx, "--id is required");
    }
    if (add_raft == NULL || add_raft[0] == '\0') {
        return cli_usage_error(ctx, "--raft-address is required");
    }
    req.id = add_id;
    req.raft_address = (char *)add_raft;
    req.cluster_address = (char *)(add_cluster != NULL ? add_cluster : "");
    req.talos_address = (char *)(add_talos != NULL ? add_talos : "");
    return cli_call(ctx, &add_method, &req.base, add_print_cb, NULL);
}

/* ---- remove ---------------------------------------------------------- */

static unsigned long rm_id;
static bool rm_id_seen;

static const struct cli_flag rm_flags[] = {
    {"id", 0, CLI_FLAG_UINT, &rm_id, &rm_id_seen, 1, ~0UL, "N", "node id to remove (required)",
     false},
    CLI_FLAG_END,
};

static int remove_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)resp;
    (void)arg;
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_u64(ctx->out, "removed", rm_id);
    } else {
        fprintf(ctx->out, "Success! Node %lu removed from the cluster.\n", rm_id);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method remove_method = {
    "members remove", "MembersRemove", &kmsd__v1__members_remove_response__descriptor, false};

static int remove_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__MembersRemoveRequest req = KMSD__V1__MEMBERS_REMOVE_REQUEST__INIT;
    int rc;

    rm_id = 0;
    rm_id_seen = false;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    if (!rm_id_seen) {
        return cli_usage_error(ctx, "--id is required");
    }
    req.id = rm_id;
    return cli_call(ctx, &remove_method, &req.base, remove_print_cb, NULL);
}

/* ---- transfer-leader ------------------------------------------------- */

static unsigned long tl_id;

static const struct cli_flag tl_flags[] = {
    {"id", 0, CLI_FLAG_UINT, &tl_id, NULL, 1, ~0UL, "N",
     "voter to hand leadership to (default: the most up-to-date voter)", false},
    CLI_FLAG_END,
};

int cli_new_leader_print(struct cli_ctx *ctx, uint64_t nl, const char *before,
                         const char *after, const char *unknown)
{
    if (ctx->g.out == CLI_OUT_JSON) {
        cli_json_print_u64(ctx->out, "new_leader_id", nl);
    } else if (nl != 0) {
        fprintf(ctx->out, "%s%" PRIu64 "%s", before, nl, after);
    } else {
        fputs(unknown, ctx->out);
    }
    return CLI_EXIT_OK;
}

static int transfer_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    (void)arg;
    return cli_new_leader_print(ctx,
                                ((const Kmsd__V1__TransferLeaderResponse *)resp)->new_leader_id,
                                "Success! Leadership transferred to node ", ".\n",
                                "Success! Leadership transfer started.\n");
}

static const struct cli_method transfer_method = {
    "transfer-leader", "TransferLeader", &kmsd__v1__transfer_leader_response__descriptor, false};

static int transfer_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__TransferLeaderRequest req = KMSD__V1__TRANSFER_LEADER_REQUEST__INIT;
    int rc;

    tl_id = 0;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    req.id = tl_id;
    return cli_call(ctx, &transfer_method, &req.base, transfer_print_cb, NULL);
}

const struct cli_cmd cli_members_subs[] = {
    CLI_CMD_LEAF("list", "list the cluster's members",
                 "Usage: kmsctl operator members list [flags]\n\n"
                 "Lists every member with its role, addresses and version; the leader is\n"
                 "marked.",
                 list_run, NULL),
    CLI_CMD_LEAF("add", "add a member",
                 "Usage: kmsctl operator members add --id N --raft-address HOST:PORT\n"
                 "                                   [--cluster-address HOST:PORT] "
                 "[--talos-address HOST:PORT]\n\n"
                 "Adds a node to the raft configuration. Start the new kmsd first (without\n"
                 "initialCluster), then add it; it catches up from the leader and must be\n"
                 "unsealed like any replica.",
                 add_run, add_flags),
    CLI_CMD_LEAF("remove", "remove a member",
                 "Usage: kmsctl operator members remove --id N\n\n"
                 "Removes a node from the raft configuration. Keep a quorum: remove one\n"
                 "member at a time.",
                 remove_run, rm_flags),
    CLI_CMD_LEAF("transfer-leader", "hand leadership to another voter",
                 "Usage: kmsctl operator members transfer-leader [--id N]\n\n"
                 "Asks the leader to hand over to node N (default: the most up-to-date\n"
                 "voter).",
                 transfer_run, tl_flags),
    CLI_CMD_END,
};
