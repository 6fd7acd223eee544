/*
 * kmsctl status: the replica's state, like `vault status`. Exits 0 when the
 * node serves (initialised, unsealed, a read lease or unsealReads: local, the
 * Talos listener open), 2 when it does not (the state is still printed, so
 * scripts can poll and read it), 1 when it cannot be asked (connection,
 * TLS, arguments). --cluster asks every member itself, like
 * `etcdctl endpoint status --cluster`.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_rpc.h"

#include "cli_common.h"

const char cli_status_usage[] =
    "Usage: kmsctl status [flags]\n"
    "\n"
    "Shows the state of one kmsd replica (the --endpoint): initialised, sealed,\n"
    "unseal progress, raft role, leader, term, commit and applied index, and the\n"
    "cluster's members.\n"
    "\n"
    "With --cluster: one row per member (asked directly at its cluster API\n"
    "address, as the replica reached lists it); unreachable members show so.\n"
    "\n"
    "Exit code: 0 serving (unsealed, read lease or unsealReads: local, Talos\n"
    "listener open); 2 reached but not serving (uninitialised, sealed, no lease,\n"
    "listener closed, or waiting to be added); 1 error (cannot connect, TLS\n"
    "failure, bad arguments). With --cluster: 0 when every member serves, 2 when\n"
    "one does not or cannot be reached, 1 when no endpoint answers.";

static bool opt_cluster;

const struct cli_flag cli_status_flags[] = {
    {"cluster", 0, CLI_FLAG_BOOL, &opt_cluster, NULL, 0, 0, NULL,
     "one row per member, each asked directly", false},
    CLI_FLAG_END,
};

static bool local_reads(const Kmsd__V1__StatusResponse *st)
{
    return st->unseal_reads != NULL && strcmp(st->unseal_reads, "local") == 0;
}

/* What the table says about reads: the quorum lease, or unsealReads: local
 * (which never claims one). */
static const char *lease_text(const Kmsd__V1__StatusResponse *st)
{
    if (local_reads(st)) {
        return "local reads (no quorum lease)";
    }
    return st->lease ? "true" : "false";
}

/* Older servers do not send member: a node that lists members or holds the
 * keyring is one. */
static bool is_member(const Kmsd__V1__StatusResponse *st)
{
    return st->member || st->initialized || st->n_members > 0;
}

bool cli_status_serving(const Kmsd__V1__StatusResponse *st)
{
    return st->initialized && !st->sealed && (st->lease || local_reads(st)) &&
           st->talos_listening;
}

static const char *b(bool v)
{
    return v ? "true" : "false";
}

static void kv_u64(struct cli_table *t, const char *k, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%" PRIu64, v);
    cli_table_kv(t, k, buf);
}

void cli_status_print(FILE *f, enum cli_output out, const Kmsd__V1__StatusResponse *st)
{
    if (out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, f);
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
        cli_json_u32_array(&j, "keyring_terms", st->keyring_terms, st->n_keyring_terms);
        cli_json_str(&j, "keyring_error", st->keyring_error);
        cli_json_bool(&j, "talos_listening", st->talos_listening);
        cli_json_str(&j, "unseal_reads",
                     st->unseal_reads != NULL && st->unseal_reads[0] ? st->unseal_reads : "lease");
        cli_json_str(&j, "read_lease", lease_text(st));
        cli_json_bool(&j, "member", is_member(st));
        cli_json_bool(&j, "serving", cli_status_serving(st));
        cli_json_bool(&j, "peer_unseal", st->peer_unseal);
        cli_json_str(&j, "peer_unseal_gate",
                     st->peer_unseal_gate != NULL ? st->peer_unseal_gate : "");
        cli_json_str(&j, "seal_type",
                     st->seal_type != NULL && st->seal_type[0] ? st->seal_type : "shamir");
        cli_json_bool(&j, "hsm_wrapped", st->hsm_wrapped);
        cli_json_str(&j, "seal_error", st->seal_error);
        cli_json_u64(&j, "entry_version_supported", st->entry_version_supported);
        cli_json_u64(&j, "entry_version_emitting", st->entry_version_emitting);
        cli_json_u64(&j, "entry_version_applied", st->entry_version_applied);
        cli_json_doc_end(&j);
        return;
    }

    struct cli_table *t = cli_table_new_kv();
    char buf[64];
    cli_table_kv(t, "Initialized", b(st->initialized));
    cli_table_kv(t, "Sealed", b(st->sealed));
    if (st->initialized) {
        kv_u64(t, "Total Shares", st->shares);
        kv_u64(t, "Threshold", st->threshold);
        if (st->sealed) {
            snprintf(buf, sizeof(buf), "%u/%u", st->progress, st->threshold);
            cli_table_kv(t, "Unseal Progress", buf);
        }
    }
    cli_table_kv(t, "Version", cli_dash(st->version));
    cli_table_kv(t, "Cluster ID", cli_dash(st->cluster_id));
    kv_u64(t, "Node ID", st->node_id);
    cli_table_kv(t, "Raft Role", cli_dash(st->role));
    if (st->leader_id != 0) {
        kv_u64(t, "Leader ID", st->leader_id);
    } else {
        cli_table_kv(t, "Leader ID", "none");
    }
    kv_u64(t, "Raft Term", st->term);
    kv_u64(t, "Commit Index", st->commit_index);
    kv_u64(t, "Applied Index", st->applied_index);
    cli_table_kv(t, "Read Lease", lease_text(st));
    if (local_reads(st)) {
        cli_table_kv(t, "Unseal Reads", "unsealReads: local");
    }
    if (!is_member(st)) {
        cli_table_kv(t, "Member", "no: waiting to be added (kmsctl operator members add)");
    }
    cli_table_kv(t, "Talos Listener", st->talos_listening ? "open" : "closed");
    if (st->entry_version_supported != 0) {
        /* Older servers send none of these. */
        if (st->entry_version_emitting != 0) {
            snprintf(buf, sizeof(buf), "emitting %u, applied %u, supported %u",
                     st->entry_version_emitting, st->entry_version_applied,
                     st->entry_version_supported);
        } else {
            snprintf(buf, sizeof(buf), "applied %u, supported %u", st->entry_version_applied,
                     st->entry_version_supported);
        }
        cli_table_kv(t, "Entry Version", buf);
    }
    if (st->active_term != 0) {
        kv_u64(t, "Active Key Term", st->active_term);
    } else {
        cli_table_kv(t, "Active Key Term", "-");
    }
    if (st->n_keyring_terms > 0) {
        char terms[256];
        size_t off = 0;
        terms[0] = '\0';
        for (size_t i = 0; i < st->n_keyring_terms && off + 16 < sizeof(terms); i++) {
            off += (size_t)snprintf(terms + off, sizeof(terms) - off, "%s%u", i ? "," : "",
                                    st->keyring_terms[i]);
        }
        if (off + 16 >= sizeof(terms) && st->n_keyring_terms > 0) {
            snprintf(terms + off, sizeof(terms) - off, ",...");
        }
        cli_table_kv(t, "Keyring Terms", terms);
    }
    if (st->keyring_error != NULL && st->keyring_error[0] != '\0') {
        cli_table_kv(t, "Keyring Error", st->keyring_error);
    }
    if (st->peer_unseal) {
        cli_table_kv(t, "Peer Unseal",
                     st->peer_unseal_gate != NULL && strcmp(st->peer_unseal_gate, "closed") == 0
                         ? "on; gate closed (operator seal: give a sealed node k shares)"
                         : "on");
    }
    if (st->seal_type != NULL && strcmp(st->seal_type, "pkcs11") == 0) {
        cli_table_kv(t, "Seal Type",
                     st->hsm_wrapped ? "pkcs11 (auto-unseal)"
                                     : "pkcs11 (cluster still on Shamir: seal-migrate)");
    } else if (st->hsm_wrapped) {
        cli_table_kv(t, "Seal Type",
                     "shamir (cluster has an HSM-wrapped key: needs recovery shares)");
    }
    if (st->seal_error != NULL && st->seal_error[0] != '\0') {
        cli_table_kv(t, "Seal Error", st->seal_error);
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
    return cli_status_serving(st) ? CLI_EXIT_OK : CLI_EXIT_REMOTE;
}

/* ---- --cluster -------------------------------------------------------- */

struct member_row {
    uint64_t id;
    const char *addr;
    Kmsd__V1__StatusResponse *st; /* NULL when unreachable */
    char error[CLI_ERRBUF];
};

static void cluster_print(FILE *f, enum cli_output out, struct member_row *rows, size_t n)
{
    if (out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, f);
        cli_json_arr_begin(&j, "members");
        for (size_t i = 0; i < n; i++) {
            Kmsd__V1__StatusResponse *st = rows[i].st;
            cli_json_obj_begin(&j, NULL);
            cli_json_u64(&j, "id", rows[i].id);
            cli_json_str(&j, "address", rows[i].addr);
            cli_json_bool(&j, "reachable", st != NULL);
            if (st == NULL) {
                cli_json_str(&j, "error", rows[i].error);
            } else {
                cli_json_str(&j, "role", st->role);
                cli_json_bool(&j, "initialized", st->initialized);
                cli_json_bool(&j, "sealed", st->sealed);
                cli_json_bool(&j, "lease", st->lease);
                cli_json_str(&j, "unseal_reads", local_reads(st) ? "local" : "lease");
                cli_json_str(&j, "read_lease", lease_text(st));
                cli_json_u64(&j, "term", st->term);
                cli_json_u64(&j, "leader_id", st->leader_id);
                cli_json_u64(&j, "applied_index", st->applied_index);
                cli_json_str(&j, "version", st->version);
                cli_json_bool(&j, "talos_listening", st->talos_listening);
                cli_json_bool(&j, "serving", cli_status_serving(st));
            }
            cli_json_obj_end(&j);
        }
        cli_json_arr_end(&j);
        cli_json_doc_end(&j);
        return;
    }
    static const char *const hdr[8] = {"ID",    "ADDRESS",       "ROLE",    "SEALED",
                                       "LEASE", "APPLIED INDEX", "VERSION", "TALOS LISTENER"};
    struct cli_table *t = cli_table_new(8, hdr);
    for (size_t i = 0; i < n; i++) {
        Kmsd__V1__StatusResponse *st = rows[i].st;
        char id[24], applied[24];
        snprintf(id, sizeof(id), "%" PRIu64, rows[i].id);
        if (st == NULL) {
            const char *row[8] = {id, rows[i].addr, "unreachable", "-", "-", "-", "-", "-"};
            cli_table_row(t, row);
            continue;
        }
        snprintf(applied, sizeof(applied), "%" PRIu64, st->applied_index);
        const char *row[8] = {id,
                              rows[i].addr,
                              cli_dash(st->role),
                              !st->initialized ? "uninitialised" : b(st->sealed),
                              lease_text(st),
                              applied,
                              cli_dash(st->version),
                              st->talos_listening ? "open" : "closed"};
        cli_table_row(t, row);
    }
    cli_table_print(f, t);
    cli_table_free(t);
    for (size_t i = 0; i < n; i++) {
        if (rows[i].st == NULL && out == CLI_OUT_TABLE) {
            fprintf(f, "member %" PRIu64 ": ", rows[i].id);
            cli_write_safe(f, rows[i].error);
            fputc('\n', f);
        }
    }
}

/* first: the Status of the replica reached, whose member list is used. */
static int cluster_run(struct cli_ctx *ctx, Kmsd__V1__StatusResponse *first)
{
    Kmsd__V1__StatusRequest req = KMSD__V1__STATUS_REQUEST__INIT;
    size_t n = first->n_members;
    struct member_row *rows = calloc(n > 0 ? n : 1, sizeof(*rows));
    int ex = CLI_EXIT_OK;

    if (rows == NULL) {
        fprintf(ctx->err, "Error: status: out of memory\n");
        return CLI_EXIT_LOCAL;
    }
    if (n == 0) {
        fprintf(ctx->err, "Error: status --cluster: %s lists no members (not a member of a "
                "cluster yet)\n", ctx->g.target);
        free(rows);
        return CLI_EXIT_REMOTE;
    }
    ctx->quiet = true;
    for (size_t i = 0; i < n; i++) {
        const Kmsd__V1__MemberStatus *m = first->members[i];
        ProtobufCMessage *resp = NULL;
        rows[i].id = m->id;
        rows[i].addr = cli_dash(m->cluster_address);
        if (strcmp(rows[i].addr, "-") == 0) {
            snprintf(rows[i].error, sizeof(rows[i].error), "no cluster API address known");
            ex = CLI_EXIT_REMOTE;
            continue;
        }
        /* Each member itself, no fail-over to another one. */
        if (ctx->ch != NULL) {
            kms_rpc_channel_destroy(ctx->ch);
            ctx->ch = NULL;
        }
        ctx->g.target = rows[i].addr;
        ctx->g.n_targets = 1;
        ctx->g.cur_target = 0;
        if (cli_rpc(ctx, "status", "Status", &req.base, &kmsd__v1__status_response__descriptor,
                    &resp, false) != 0) {
            memcpy(rows[i].error, ctx->last_error, sizeof(rows[i].error));
            rows[i].error[sizeof(rows[i].error) - 1] = '\0';
            if (rows[i].error[0] == '\0') {
                snprintf(rows[i].error, sizeof(rows[i].error), "unreachable");
            }
            ex = CLI_EXIT_REMOTE;
            continue;
        }
        rows[i].st = (Kmsd__V1__StatusResponse *)resp;
        if (!cli_status_serving(rows[i].st)) {
            ex = CLI_EXIT_REMOTE;
        }
    }
    ctx->quiet = false;
    cluster_print(ctx->out, ctx->g.out, rows, n);
    for (size_t i = 0; i < n; i++) {
        if (rows[i].st != NULL) {
            protobuf_c_message_free_unpacked(&rows[i].st->base, NULL);
        }
    }
    free(rows);
    return ex;
}

int cli_status_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__StatusRequest req = KMSD__V1__STATUS_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    int rc;

    opt_cluster = false;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    rc = cli_rpc(ctx, "status", "Status", &req.base, &kmsd__v1__status_response__descriptor,
                 &m, false);
    if (rc != 0) {
        /* Not asked at all (connection, TLS, an error answer): 1, apart
         * from 2 = reached and not serving. */
        return CLI_EXIT_LOCAL;
    }
    Kmsd__V1__StatusResponse *st = (Kmsd__V1__StatusResponse *)m;
    if (opt_cluster) {
        rc = cluster_run(ctx, st);
    } else {
        cli_status_print(ctx->out, ctx->g.out, st);
        rc = cli_status_exit(st);
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return rc;
}
