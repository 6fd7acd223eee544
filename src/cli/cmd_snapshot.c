/*
 * kmsctl operator snapshot save FILE | inspect FILE (online backups).
 * save: SnapshotBegin / SnapshotChunk... / SnapshotEnd against the replica
 * at --endpoint, written to FILE.tmp (0600), fsynced, renamed to FILE; the
 * file format is in src/store/backup.c. inspect: offline, kms_backup_verify.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "cli_common.h"
#include "kms_bytes.h"
#include "kms_store.h"

#include "kmsd/v1/cluster.pb-c.h"

static int snap_write_all(int fd, EVP_MD_CTX *md, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    if (EVP_DigestUpdate(md, buf, n) != 1) {
        return -1;
    }
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int save_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__SnapshotBeginRequest breq = KMSD__V1__SNAPSHOT_BEGIN_REQUEST__INIT;
    Kmsd__V1__SnapshotEndRequest ereq = KMSD__V1__SNAPSHOT_END_REQUEST__INIT;
    Kmsd__V1__SnapshotBeginResponse *b = NULL;
    ProtobufCMessage *m = NULL;
    EVP_MD_CTX *md = NULL;
    char *pos[1] = {NULL};
    char tmp[4200], hdr[2048], cid[40] = "", created[40];
    uint8_t trailer[48];
    unsigned int ml = 0;
    uint64_t entries = 0, bytes = 0, seq = 0;
    int npos = 0, rc, fd = -1, code = CLI_EXIT_OK;
    bool done = false;
    size_t hl;
    time_t now = time(NULL);
    struct tm tmv;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos)) >= 0) {
        return rc;
    }
    if (npos != 1) {
        return cli_usage_error(ctx, "snapshot save: expected one FILE");
    }
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", pos[0]) >= (int)sizeof(tmp)) {
        return cli_usage_error(ctx, "snapshot save: file name too long");
    }
    rc = cli_rpc(ctx, "snapshot save", "SnapshotBegin", &breq.base,
                 &kmsd__v1__snapshot_begin_response__descriptor, &m, false);
    if (rc != 0) {
        return rc;
    }
    b = (Kmsd__V1__SnapshotBeginResponse *)m;
    m = NULL;
    for (size_t i = 0; i < b->cluster_id.len && i < 16; i++) {
        snprintf(cid + 2 * i, 3, "%02x", b->cluster_id.data[i]);
    }
    gmtime_r(&now, &tmv);
    strftime(created, sizeof(created), "%Y-%m-%dT%H:%M:%SZ", &tmv);
    hl = (size_t)snprintf(hdr, sizeof(hdr),
                          "KMSD-SNAPSHOT 1\n"
                          "# kmsd online snapshot: the encrypted keyring, every sealed record\n"
                          "# and the member list of one replica at one raft index.\n"
                          "# It is USELESS without k of the cluster's unseal key shares: the\n"
                          "# keyring is encrypted under the root key they rebuild. Keep it\n"
                          "# like the dataDir (it is the same data). Restore: kmsd restore.\n"
                          "cluster-id: %s\n"
                          "index: %" PRIu64 "\n"
                          "node: %" PRIu64 "\n"
                          "records-at-start: %" PRIu64 "\n"
                          "active-term: %u\n"
                          "shares: %u of %u\n"
                          "created: %s\n",
                          cid, b->applied_index, b->node_id, b->records, b->active_term,
                          b->threshold, b->share_count, created);
    /* Pad the header with '#' so the body starts 8-byte aligned, then the
     * empty line that ends it. */
    do { /* a '#' comment line of at least one '#', then the empty line */
        hdr[hl++] = '#';
    } while ((hl + 2) % 8 != 0);
    hdr[hl++] = '\n';
    hdr[hl++] = '\n';

    md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        fprintf(ctx->err, "Error: snapshot save: SHA-256 unavailable\n");
        code = CLI_EXIT_LOCAL;
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || snap_write_all(fd, md, hdr, hl) != 0) {
        fprintf(ctx->err, "Error: snapshot save: %s: %s\n", tmp, strerror(errno));
        code = CLI_EXIT_LOCAL;
        goto out;
    }
    while (!done) {
        Kmsd__V1__SnapshotChunkRequest creq = KMSD__V1__SNAPSHOT_CHUNK_REQUEST__INIT;
        Kmsd__V1__SnapshotChunkResponse *c;
        creq.handle = b->handle;
        creq.seq = seq++;
        rc = cli_rpc(ctx, "snapshot save", "SnapshotChunk", &creq.base,
                     &kmsd__v1__snapshot_chunk_response__descriptor, &m, false);
        if (rc != 0) {
            code = rc;
            goto out;
        }
        c = (Kmsd__V1__SnapshotChunkResponse *)m;
        if (c->data.len % 8 != 0 || snap_write_all(fd, md, c->data.data, c->data.len) != 0) {
            fprintf(ctx->err, "Error: snapshot save: %s: %s\n", tmp,
                    c->data.len % 8 != 0 ? "misaligned chunk from the server" : strerror(errno));
            code = CLI_EXIT_LOCAL;
            goto out;
        }
        entries += c->entries;
        bytes += c->data.len;
        done = c->done;
        protobuf_c_message_free_unpacked(m, NULL);
        m = NULL;
    }
    memcpy(trailer, kms_backup_trailer_magic(), 8);
    kms_put_le64(trailer + 8, entries);
    if (snap_write_all(fd, md, trailer, 16) != 0 ||
        EVP_DigestFinal_ex(md, trailer + 16, &ml) != 1 || ml != 32 ||
        write(fd, trailer + 16, 32) != 32 || fsync(fd) != 0 || close(fd) != 0) {
        fd = -1;
        fprintf(ctx->err, "Error: snapshot save: %s: %s\n", tmp, strerror(errno));
        code = CLI_EXIT_LOCAL;
        goto out;
    }
    fd = -1;
    if (rename(tmp, pos[0]) != 0) {
        fprintf(ctx->err, "Error: snapshot save: rename to %s: %s\n", pos[0], strerror(errno));
        code = CLI_EXIT_LOCAL;
        goto out;
    }
    if (ctx->g.out == CLI_OUT_JSON) {
        fprintf(ctx->out,
                "{\"file\": \"%s\", \"cluster_id\": \"%s\", \"index\": %" PRIu64
                ", \"node\": %" PRIu64 ", \"entries\": %" PRIu64 ", \"bytes\": %" PRIu64 "}\n",
                pos[0], cid, b->applied_index, b->node_id, entries, bytes + hl + 48);
    } else {
        fprintf(ctx->out,
                "Success! Saved a snapshot of cluster %s at index %" PRIu64 " (node %" PRIu64
                ") to %s: %" PRIu64 " entries, %" PRIu64 " bytes.\n"
                "It is useless without %u of the %u unseal key shares.\n",
                cid, b->applied_index, b->node_id, pos[0], entries, bytes + hl + 48,
                b->threshold, b->share_count);
    }
out:
    if (fd >= 0) {
        close(fd);
    }
    if (code != CLI_EXIT_OK) {
        (void)unlink(tmp);
    }
    if (b != NULL) {
        ereq.handle = b->handle;
        if (cli_rpc(ctx, "snapshot save", "SnapshotEnd", &ereq.base,
                    &kmsd__v1__snapshot_end_response__descriptor, &m, false) == 0) {
            protobuf_c_message_free_unpacked(m, NULL);
            m = NULL;
        }
        protobuf_c_message_free_unpacked(&b->base, NULL);
    }
    if (m != NULL) {
        protobuf_c_message_free_unpacked(m, NULL);
    }
    EVP_MD_CTX_free(md);
    return code;
}

static int inspect_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    struct kms_backup_info *info;
    struct kms_err err;
    char *pos[1] = {NULL};
    int npos = 0, rc, code = CLI_EXIT_OK;
    unsigned terms = 0;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos)) >= 0) {
        return rc;
    }
    if (npos != 1) {
        return cli_usage_error(ctx, "snapshot inspect: expected one FILE");
    }
    info = calloc(1, sizeof(*info));
    if (info == NULL) {
        return CLI_EXIT_LOCAL;
    }
    kms_err_clear(&err);
    if (kms_backup_verify(pos[0], info, NULL, NULL, &err) != 0) {
        fprintf(ctx->err, "Error: snapshot inspect: %s\n", err.msg);
        code = CLI_EXIT_LOCAL;
        goto out;
    }
    for (unsigned t = 0; t < KMS_BACKUP_MAX_TERMS; t++) {
        terms += info->per_term[t] != 0;
    }
    if (ctx->g.out == CLI_OUT_JSON) {
        fprintf(ctx->out,
                "{\"cluster_id\": \"%s\", \"index\": %" PRIu64 ", \"node\": %" PRIu64
                ", \"records\": %" PRIu64 ", \"revoked\": %" PRIu64 ", \"members\": %" PRIu64
                ", \"active_term\": %u, \"terms_in_use\": %u, \"shares\": %u, "
                "\"threshold\": %u, \"created\": \"%s\", \"checksum\": \"ok\"}\n",
                info->cluster_id, info->index, info->node, info->records, info->revoked,
                info->members, info->active_term, terms, info->share_count, info->threshold,
                info->created);
    } else {
        fprintf(ctx->out,
                "Snapshot %s: checksum OK\n"
                "  cluster id   %s\n"
                "  index        %" PRIu64 " (taken on node %" PRIu64 ", %s)\n"
                "  records      %" PRIu64 " (%" PRIu64 " revoked)\n"
                "  members      %" PRIu64 "\n"
                "  terms        %u in use, active term %u\n"
                "  unseal       needs %u of the %u key shares\n",
                pos[0], info->cluster_id, info->index, info->node, info->created,
                info->records, info->revoked, info->members, terms, info->active_term,
                info->threshold, info->share_count);
    }
out:
    free(info);
    return code;
}

const char cli_snapshot_usage[] =
    "Usage: kmsctl operator snapshot save FILE | inspect FILE\n"
    "\n"
    "Online backups: `save` copies the replica at --endpoint (any initialised\n"
    "replica; nothing is stopped) at one raft index into FILE; `inspect` checks\n"
    "a file offline. A snapshot is useless without k unseal key shares.";

const struct cli_cmd cli_snapshot_subs[] = {
    CLI_CMD_LEAF("save", "save a point-in-time copy of the cluster state to FILE",
                 "Usage: kmsctl operator snapshot save FILE\n"
                 "\n"
                 "Copies the applied state of the replica at --endpoint (cluster id, raft\n"
                 "index, members, the encrypted keyring, every record) from one RocksDB\n"
                 "snapshot, streamed in 1 MiB chunks, into FILE (written as FILE.tmp, mode\n"
                 "0600, then renamed), with a SHA-256 over the whole file. Seals and unseals\n"
                 "go on meanwhile. A follower's copy is as fresh as its applied index.",
                 save_run, NULL),
    CLI_CMD_LEAF("inspect", "verify a snapshot file and print what it holds (offline)",
                 "Usage: kmsctl operator snapshot inspect FILE\n"
                 "\n"
                 "Verifies the checksum and every entry, then prints the cluster id, index,\n"
                 "record, revoked and term counts. A truncated or altered file is refused\n"
                 "(exit 1). Needs no endpoint.",
                 inspect_run, NULL),
    CLI_CMD_END,
};
