/*
 * kmsctl status: the replica's state, like `vault status`. Exits 0 when the
 * node is initialised and unsealed, 2 when it is sealed or uninitialised (the
 * state is still printed, so scripts can poll and read it).
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli_common.h"

const char cli_status_usage[] =
    "Usage: kmsctl status [flags]\n"
    "\n"
    "Shows the state of one kmsd replica (the --endpoint): initialised, sealed,\n"
    "unseal progress, raft role, leader, term, commit and applied index, and the\n"
    "cluster's members.\n"
    "\n"
    "Exit code: 0 when the replica is unsealed, 2 when it is sealed or not\n"
    "initialised (or cannot be reached), 1 for a local error.";

static const char *b(bool v)
{
    return v ? "true" : "false";
}

static void kv(struct cli_table *t, const char *k, const char *v)
{
    const char *row[2] = {k, v};
    cli_table_row(t, row);
}

static void kv_u64(struct cli_table *t, const char *k, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%" PRIu64, v);
    kv(t, k, buf);
}

void cli_status_print(FILE *f, enum cli_output out, const Kmsd__V1__StatusResponse *st)
{
    if (out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_init(&j, f);
        cli_json_obj_begin(&j, NULL);
        cli_json_bool(&j, "initialized", st->initialized);
        cli_json_bool(&j, "sealed", st->sealed);
        cli_json_u64(&j, "progress", st->progress);
        cli_json_u64(&j, "threshold", st->threshold);
        cli_json_u64(&j, "shares", st->shares);
        cli_json_u64(&j, "node_id", st->node_id);
        cli_json_str(&j, "role", st->role);
        cli_json_u64(&j, "leader_id", st->leader_id);
        cli_json_u64(&j, "term", st->term);
        cli_json_u64(&j, "commit_index", st->commit_index);
        cli_json_u64(&j, "applied_index", st->applied_index);
        cli_json_members(&j, "members", st->members, st->n_members);
        cli_json_bool(&j, "lease", st->lease);
        cli_json_bool(&j, "talos_listening", st->talos_listening);
        cli_json_str(&j, "version", st->version);
        cli_json_str(&j, "cluster_id", st->cluster_id);
        cli_json_u64(&j, "active_term", st->active_term);
        cli_json_str(&j, "keyring_error", st->keyring_error);
        cli_json_obj_end(&j);
        cli_json_end(&j);
        return;
    }

    static const char *const hdr[2] = {"Key", "Value"};
    static const char *const dashes[2] = {"---", "-----"};
    struct cli_table *t = cli_table_new(2, hdr);
    char buf[64];
    cli_table_row(t, dashes);
    kv(t, "Initialized", b(st->initialized));
    kv(t, "Sealed", b(st->sealed));
    if (st->initialized) {
        kv_u64(t, "Total Shares", st->shares);
        kv_u64(t, "Threshold", st->threshold);
        if (st->sealed) {
            snprintf(buf, sizeof(buf), "%u/%u", st->progress, st->threshold);
            kv(t, "Unseal Progress", buf);
        }
    }
    kv(t, "Version", st->version != NULL && st->version[0] ? st->version : "-");
    kv(t, "Cluster ID", st->cluster_id != NULL && st->cluster_id[0] ? st->cluster_id : "-");
    kv_u64(t, "Node ID", st->node_id);
    kv(t, "Raft Role", st->role != NULL && st->role[0] ? st->role : "-");
    if (st->leader_id != 0) {
        kv_u64(t, "Leader ID", st->leader_id);
    } else {
        kv(t, "Leader ID", "none");
    }
    kv_u64(t, "Raft Term", st->term);
    kv_u64(t, "Commit Index", st->commit_index);
    kv_u64(t, "Applied Index", st->applied_index);
    kv(t, "Read Lease", b(st->lease));
    kv(t, "Talos Listener", st->talos_listening ? "open" : "closed");
    if (st->active_term != 0) {
        kv_u64(t, "Active Key Term", st->active_term);
    } else {
        kv(t, "Active Key Term", "-");
    }
    if (st->keyring_error != NULL && st->keyring_error[0] != '\0') {
        kv(t, "Keyring Error", st->keyring_error);
    }
    cli_table_print(f, t);
    cli_table_free(t);
    if (st->n_members > 0) {
        fputs("\nMembers\n", f);
        cli_members_print(f, CLI_OUT_TABLE, st->members, st->n_members);
    }
}

int cli_status_exit(const Kmsd__V1__StatusResponse *st)
{
    return st->initialized && !st->sealed ? CLI_EXIT_OK : CLI_EXIT_REMOTE;
}

int cli_status_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__StatusRequest req = KMSD__V1__STATUS_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, &npos)) >= 0) {
        return rc;
    }
    rc = cli_rpc(ctx, "status", "Status", &req.base, &kmsd__v1__status_response__descriptor,
                 &m, false);
    if (rc != 0) {
        return rc;
    }
    Kmsd__V1__StatusResponse *st = (Kmsd__V1__StatusResponse *)m;
    cli_status_print(ctx->out, ctx->g.out, st);
    rc = cli_status_exit(st);
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}
