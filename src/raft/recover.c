/*
 * Lost-quorum recovery (kms_raft_recover, kms_raft.h): forces a new raft
 * configuration into a stopped node's log with libraft's raft_recover().
 *
 * Offline only: one thread, its own libuv loop, a plain TCP transport that
 * never listens or connects (raft_init only records id and address in it).
 * raft_recover() loads the log and appends, at the next index and in the
 * last entry's term, a configuration entry holding only `members`; on the
 * next start raft takes it as the current configuration and the node (the
 * only voter, or one of the given voters) elects a leader among them.
 */
#include "kms_raft.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

/* raft_init() wants a state machine; nothing is applied while recovering. */
static int recover_fsm_apply_cb(struct raft_fsm *fsm, const struct raft_buffer *buf,
                                void **result)
{
    (void)fsm;
    (void)buf;
    *result = NULL;
    return RAFT_INVALID;
}

static int recover_fsm_snapshot_cb(struct raft_fsm *fsm, struct raft_buffer *bufs[],
                                   unsigned *n_bufs)
{
    (void)fsm;
    (void)bufs;
    (void)n_bufs;
    return RAFT_INVALID;
}

static int recover_fsm_restore_cb(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    (void)fsm;
    (void)buf;
    return RAFT_INVALID;
}

static void recover_closed_cb(struct raft *raft)
{
    (void)raft;
}

/* True when dir holds raft metadata (the node has raft state to recover). */
static bool raft_dir_has_state(const char *dir)
{
    char path[4200];
    struct stat st;
    snprintf(path, sizeof(path), "%s/metadata1", dir);
    if (stat(path, &st) == 0 && st.st_size > 0) {
        return true;
    }
    snprintf(path, sizeof(path), "%s/metadata2", dir);
    return stat(path, &st) == 0 && st.st_size > 0;
}

int kms_raft_recover(const char *data_dir, uint64_t self_id, const struct kms_raft_peer *members,
                     size_t n_members, struct kms_err *err)
{
    char dir[4096];
    struct uv_loop_s loop;
    struct raft_uv_transport transport;
    struct raft_io io;
    struct raft_fsm fsm;
    struct raft raft;
    struct raft_configuration conf;
    const char *self_address = NULL;
    bool loop_ok = false, transport_ok = false, io_ok = false, raft_ok = false;
    int rv, rc = 0;

    raft_configuration_init(&conf);
    if (data_dir == NULL || self_id == 0 || members == NULL || n_members == 0) {
        rc = kms_err_set(err, KMS_EINVAL, "recover: data dir, node id and members are required");
        goto out;
    }
    if (snprintf(dir, sizeof(dir), "%s/raft", data_dir) >= (int)sizeof(dir)) {
        rc = kms_err_set(err, KMS_EINVAL, "recover: data_dir too long");
        goto out;
    }
    if (!raft_dir_has_state(dir)) {
        rc = kms_err_set(err, KMS_ENOTFOUND,
                         "recover: %s holds no raft state (nothing to recover; an empty node "
                         "joins with `members add` instead)",
                         dir);
        goto out;
    }
    for (size_t i = 0; i < n_members; i++) {
        if (members[i].id == 0 || members[i].address[0] == '\0') {
            rc = kms_err_set(err, KMS_EINVAL, "recover: member %zu has no id or address", i);
            goto out;
        }
        if (members[i].id == self_id) {
            self_address = members[i].address;
        }
        rv = raft_configuration_add(&conf, members[i].id, members[i].address, RAFT_VOTER);
        if (rv != 0) {
            rc = kms_err_set(err, KMS_EINVAL, "recover: member %" PRIu64 ": %s", members[i].id,
                             raft_strerror(rv));
            goto out;
        }
    }
    if (self_address == NULL) {
        rc = kms_err_set(err, KMS_EINVAL,
                         "recover: the new configuration must include this node (%" PRIu64 ")",
                         self_id);
        goto out;
    }
    if (uv_loop_init(&loop) != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "recover: uv_loop_init failed");
        goto out;
    }
    loop_ok = true;
    memset(&transport, 0, sizeof(transport));
    transport.version = 1;
    if ((rv = raft_uv_tcp_init(&transport, &loop)) != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "recover: cannot create the transport: %s (%s)",
                         raft_strerror(rv), transport.errmsg);
        goto out;
    }
    transport_ok = true;
    memset(&io, 0, sizeof(io));
    rv = raft_uv_init(&io, &loop, dir, &transport);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "recover: raft_uv_init(%s): %s", dir,
                         io.errmsg[0] != '\0' ? io.errmsg : raft_strerror(rv));
        goto out;
    }
    io_ok = true;
    memset(&fsm, 0, sizeof(fsm));
    fsm.version = 1;
    fsm.apply = recover_fsm_apply_cb;
    fsm.snapshot = recover_fsm_snapshot_cb;
    fsm.restore = recover_fsm_restore_cb;
    rv = raft_init(&raft, &io, &fsm, self_id, self_address);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "recover: raft_init: %s", raft_errmsg(&raft));
        goto out;
    }
    raft_ok = true;
    rv = raft_recover(&raft, &conf);
    if (rv != 0) {
        rc = kms_err_set(err, KMS_ERAFT, "recover: raft_recover(%s): %s (%s)", dir,
                         raft_strerror(rv), io.errmsg);
        goto out;
    }
out:
    raft_configuration_close(&conf);
    if (raft_ok) {
        raft_close(&raft, recover_closed_cb);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    if (io_ok) {
        raft_uv_close(&io);
    }
    if (transport_ok) {
        raft_uv_tcp_close(&transport);
    }
    if (loop_ok) {
        uv_run(&loop, UV_RUN_DEFAULT);
        (void)uv_loop_close(&loop);
    }
    return rc;
}
