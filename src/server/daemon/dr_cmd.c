/*
 * kmsd recover: lost-quorum recovery on a survivor (see kmsd_dr.h and
 * docs/operations.md "Lost quorum").
 *
 * The survivor's dataDir is opened offline: RocksDB's lock on <dataDir>/store
 * refuses it while a kmsd runs on it. The new raft configuration is this node
 * alone, or the ids given with --members (each must be a member known to the
 * store or listed in initialCluster, for its raft address). The command
 * prints what it is about to do and refuses unless --yes-i-understand is
 * given or an operator types "RECOVER" on a terminal.
 */
#include "kmsd_dr.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms_config.h"
#include "kms_raft.h"
#include "kms_store.h"
#include "kmsd.h"

#define DR_MAX_MEMBERS KMS_CONFIG_MAX_PEERS

struct dr_members {
    struct kms_raft_peer m[DR_MAX_MEMBERS];
    size_t n;
};

bool kmsd_dr_is_subcommand(int argc, char **argv)
{
    return argc > 1 && (strcmp(argv[1], "recover") == 0 || strcmp(argv[1], "restore") == 0);
}

static int dr_member_addr_cb(void *arg, const Kmsd__V1__Member *m)
{
    struct dr_members *dm = arg;
    for (size_t i = 0; i < dm->n; i++) {
        if (dm->m[i].id == m->id && dm->m[i].address[0] == '\0' && m->raft_address != NULL) {
            snprintf(dm->m[i].address, sizeof(dm->m[i].address), "%s", m->raft_address);
        }
    }
    return 0;
}

/* Parses "1,4,5" into dm (ids only). */
static int dr_parse_members(const char *list, struct dr_members *dm, struct kms_err *err)
{
    const char *p = list;
    dm->n = 0;
    while (*p != '\0') {
        char *end = NULL;
        unsigned long long v;
        errno = 0;
        v = strtoull(p, &end, 10);
        if (errno != 0 || end == p || v == 0 || (*end != ',' && *end != '\0')) {
            return kms_err_set(err, KMS_EINVAL, "--members: '%s' is not a list of node ids", list);
        }
        for (size_t i = 0; i < dm->n; i++) {
            if (dm->m[i].id == v) {
                return kms_err_set(err, KMS_EINVAL, "--members: id %llu twice", v);
            }
        }
        if (dm->n == DR_MAX_MEMBERS) {
            return kms_err_set(err, KMS_EINVAL, "--members: at most %d ids", DR_MAX_MEMBERS);
        }
        dm->m[dm->n].id = v;
        dm->m[dm->n].address[0] = '\0';
        dm->n++;
        p = *end == ',' ? end + 1 : end;
    }
    if (dm->n == 0) {
        return kms_err_set(err, KMS_EINVAL, "--members: empty list");
    }
    return 0;
}

static bool dr_confirm_on_tty(const char *word)
{
    char line[64];
    if (!isatty(STDIN_FILENO)) {
        return false;
    }
    fprintf(stderr, "Type %s to continue: ", word);
    fflush(stderr);
    if (fgets(line, sizeof(line), stdin) == NULL) {
        return false;
    }
    line[strcspn(line, "\r\n")] = '\0';
    return strcmp(line, word) == 0;
}

static void dr_recover_usage(FILE *f)
{
    fprintf(f,
            "usage: kmsd recover --config FILE [--members ID,ID...] [--yes-i-understand]\n"
            "  Lost-quorum recovery, offline, on ONE survivor: forces a new raft\n"
            "  configuration made of this node (default) or the listed member ids.\n"
            "  Other kmsd flags (--data-dir ...) are accepted as for the daemon.\n");
}

static int dr_recover(int argc, char **argv, char **envp)
{
    struct kms_config cfg;
    struct kms_err err;
    struct kms_store *store = NULL;
    struct dr_members dm;
    const char *members_arg = NULL;
    bool yes = false;
    char **cargv = NULL;
    int cargc = 0;
    char path[4200];
    uint64_t applied = 0, count = 0;
    int rc, code = 0;

    memset(&cfg, 0, sizeof(cfg));
    memset(&dm, 0, sizeof(dm));
    kms_err_clear(&err);
    cargv = calloc((size_t)argc + 1, sizeof(*cargv));
    if (cargv == NULL) {
        code = 2;
        goto out;
    }
    cargv[cargc++] = argv[0];
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--yes-i-understand") == 0) {
            yes = true;
        } else if (strcmp(argv[i], "--members") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kmsd recover: --members: missing value\n");
                code = 1;
                goto out;
            }
            members_arg = argv[++i];
        } else if (strncmp(argv[i], "--members=", 10) == 0) {
            members_arg = argv[i] + 10;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            dr_recover_usage(stdout);
            goto out;
        } else {
            cargv[cargc++] = argv[i];
        }
    }
    if (kms_config_load(&cfg, cargc, cargv, envp, &err) != 0) {
        fprintf(stderr, "kmsd recover: %s\n", err.msg);
        code = 1;
        goto out;
    }
    if (cfg.help || cfg.version || cfg.dump_only || cfg.check_only) {
        fprintf(stderr, "kmsd recover: --help/--version/--check-config/--dump-config are not "
                        "recover options\n");
        code = 1;
        goto out;
    }
    if (members_arg != NULL) {
        if (dr_parse_members(members_arg, &dm, &err) != 0) {
            fprintf(stderr, "kmsd recover: %s\n", err.msg);
            code = 1;
            goto out;
        }
    } else {
        dm.n = 1;
        dm.m[0].id = cfg.node_id;
    }
    /* Opening the store takes RocksDB's lock: a kmsd running on this
     * dataDir makes this fail, so recovery never runs under a live node. */
    snprintf(path, sizeof(path), "%s/store", cfg.data_dir);
    if ((rc = kms_store_open(path, &store, &err)) != 0) {
        fprintf(stderr,
                "kmsd recover: cannot open the store (is kmsd still running on %s?): %s\n",
                cfg.data_dir, err.msg);
        code = 2;
        goto out;
    }
    applied = kms_store_applied_index(store);
    count = kms_store_count(store);
    for (size_t i = 0; i < dm.n; i++) {
        if (dm.m[i].id == cfg.node_id) {
            snprintf(dm.m[i].address, sizeof(dm.m[i].address), "%s", cfg.raft.advertise);
        }
    }
    (void)kms_store_members_list(store, dr_member_addr_cb, &dm, NULL);
    kms_store_close(store);
    store = NULL;
    for (size_t i = 0; i < dm.n; i++) {
        for (size_t j = 0; j < cfg.n_initial_cluster && dm.m[i].address[0] == '\0'; j++) {
            if (cfg.initial_cluster[j].id == dm.m[i].id) {
                snprintf(dm.m[i].address, sizeof(dm.m[i].address), "%s",
                         cfg.initial_cluster[j].raft);
            }
        }
        if (dm.m[i].address[0] == '\0') {
            fprintf(stderr,
                    "kmsd recover: member %" PRIu64 " has no known raft address (not in the "
                    "store's member list nor in initialCluster)\n",
                    dm.m[i].id);
            code = 1;
            goto out;
        }
    }
    fprintf(stderr,
            "kmsd recover: LOST-QUORUM RECOVERY of node %" PRIu64 " in %s\n"
            "  state machine: applied index %" PRIu64 ", %" PRIu64 " records\n"
            "  new raft configuration (voters):",
            cfg.node_id, cfg.data_dir, applied, count);
    for (size_t i = 0; i < dm.n; i++) {
        fprintf(stderr, " %" PRIu64 "@%s", dm.m[i].id, dm.m[i].address);
    }
    fprintf(stderr,
            "\n"
            "WARNING: every other member is dropped from the cluster for good.\n"
            "WARNING: entries that were committed by the old quorum but never reached this\n"
            "         node are LOST (seals acknowledged then may not unseal). Run this on\n"
            "         the survivor with the highest applied index.\n"
            "WARNING: NEVER run this while any old member could still be running: two\n"
            "         clusters would accept writes. Stop or power off every old member.\n"
            "WARNING: a removed member must have its dataDir WIPED before it is started\n"
            "         again; it then rejoins empty with `kmsctl operator members add`.\n"
            "WARNING: run it ONCE, on ONE node.\n");
    if (!yes && !dr_confirm_on_tty("RECOVER")) {
        fprintf(stderr, "kmsd recover: refused: pass --yes-i-understand (or type RECOVER on "
                        "a terminal) to go ahead; nothing was changed\n");
        code = 1;
        goto out;
    }
    if ((rc = kms_raft_recover(cfg.data_dir, cfg.node_id, dm.m, dm.n, &err)) != 0) {
        fprintf(stderr, "kmsd recover: %s (%s); nothing was changed\n", err.msg,
                kms_strerror(rc));
        code = 2;
        goto out;
    }
    printf("kmsd recover: node %" PRIu64 " now has a %zu-voter configuration.\n"
           "Next: start kmsd on it, unseal it with k shares (kmsctl operator unseal),\n"
           "then add fresh members with empty dataDirs: kmsctl operator members add ...\n",
           cfg.node_id, dm.n);
out:
    if (store != NULL) {
        kms_store_close(store);
    }
    free(cargv);
    kms_config_free(&cfg);
    return code;
}

static void dr_restore_usage(FILE *f)
{
    fprintf(f,
            "usage: kmsd restore --snapshot FILE --config FILE [--force]\n"
            "  Builds a fresh dataDir for one member of a NEW cluster from a snapshot\n"
            "  (kmsctl operator snapshot save). Run it on every new member, with the\n"
            "  same FILE and the same initialCluster (which must list this node).\n"
            "  --force replaces a non-empty dataDir of the same cluster.\n");
}

/* The audit trail survives a restore: the hash-chained audit file in dataDir
 * (the default auditFile, and rotated copies audit.log.*) is neither counted
 * as content nor removed (kmsd continues its chain at the next start). */
static bool dr_is_audit_file(const char *name)
{
    return strncmp(name, "audit.log", 9) == 0 && (name[9] == '\0' || name[9] == '.');
}

static int dr_rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    if (ftw->level == 0 || (ftw->level == 1 && dr_is_audit_file(path + ftw->base))) {
        return 0; /* dataDir itself and the audit trail stay */
    }
    return remove(path) != 0 && errno != ENOENT ? -1 : 0;
}

/* 1 when dir exists and holds anything (audit files aside), 0 when empty or
 * missing, -1 error. */
static int dr_dir_nonempty(const char *dir)
{
    DIR *dp = opendir(dir);
    struct dirent *de;
    int r = 0;
    if (dp == NULL) {
        return errno == ENOENT ? 0 : -1;
    }
    while ((de = readdir(dp)) != NULL) {
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0 &&
            !dr_is_audit_file(de->d_name)) {
            r = 1;
            break;
        }
    }
    closedir(dp);
    return r;
}

static int dr_restore(int argc, char **argv, char **envp)
{
    struct kms_config cfg;
    struct kms_err err;
    struct kms_store *store = NULL;
    struct kms_backup_info *info = NULL;
    const char *snap = NULL;
    bool force = false, self_listed = false;
    char **cargv = NULL;
    int cargc = 0, rc, code = 0, ne;
    char path[4200];

    memset(&cfg, 0, sizeof(cfg));
    kms_err_clear(&err);
    cargv = calloc((size_t)argc + 1, sizeof(*cargv));
    info = calloc(1, sizeof(*info));
    if (cargv == NULL || info == NULL) {
        code = 2;
        goto out;
    }
    cargv[cargc++] = argv[0];
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--force") == 0) {
            force = true;
        } else if (strcmp(argv[i], "--snapshot") == 0 && i + 1 < argc) {
            snap = argv[++i];
        } else if (strncmp(argv[i], "--snapshot=", 11) == 0) {
            snap = argv[i] + 11;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            dr_restore_usage(stdout);
            goto out;
        } else {
            cargv[cargc++] = argv[i];
        }
    }
    if (snap == NULL) {
        dr_restore_usage(stderr);
        code = 1;
        goto out;
    }
    if (kms_config_load(&cfg, cargc, cargv, envp, &err) != 0) {
        fprintf(stderr, "kmsd restore: %s\n", err.msg);
        code = 1;
        goto out;
    }
    for (size_t i = 0; i < cfg.n_initial_cluster; i++) {
        self_listed = self_listed || cfg.initial_cluster[i].id == cfg.node_id;
    }
    if (!self_listed) {
        fprintf(stderr, "kmsd restore: initialCluster must list this node (%" PRIu64 "): every "
                        "new member is restored from the snapshot and bootstraps together\n",
                cfg.node_id);
        code = 1;
        goto out;
    }
    /* Verify the whole file before touching anything. */
    if (kms_backup_verify(snap, info, NULL, NULL, &err) != 0) {
        fprintf(stderr, "kmsd restore: %s; nothing was changed\n", err.msg);
        code = 1;
        goto out;
    }
    ne = dr_dir_nonempty(cfg.data_dir);
    if (ne < 0) {
        fprintf(stderr, "kmsd restore: %s: %s\n", cfg.data_dir, strerror(errno));
        code = 2;
        goto out;
    }
    snprintf(path, sizeof(path), "%s/store", cfg.data_dir);
    if (ne == 1) {
        Kmsd__V1__EncryptedKeyring *ek = NULL;
        char cid[40] = "";
        if (!force) {
            fprintf(stderr, "kmsd restore: dataDir %s is not empty: refusing (pass --force to "
                            "replace it with the snapshot); nothing was changed\n",
                    cfg.data_dir);
            code = 1;
            goto out;
        }
        if (dr_dir_nonempty(path) == 1) {
            if (kms_store_open(path, &store, &err) != 0) {
                fprintf(stderr, "kmsd restore: cannot open the existing store (is kmsd "
                                "running?): %s\n", err.msg);
                code = 2;
                goto out;
            }
            if (kms_store_keyring_get(store, &ek, NULL) == 0) {
                for (size_t i = 0; i < ek->cluster_id.len && i < 16; i++) {
                    snprintf(cid + 2 * i, 3, "%02x", ek->cluster_id.data[i]);
                }
                kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
            }
            kms_store_close(store);
            store = NULL;
            if (cid[0] != '\0' && strcmp(cid, info->cluster_id) != 0) {
                fprintf(stderr, "kmsd restore: dataDir %s holds cluster %s but the snapshot is "
                                "of cluster %s: refusing even with --force; nothing was changed\n",
                        cfg.data_dir, cid, info->cluster_id);
                code = 1;
                goto out;
            }
        }
        if (nftw(cfg.data_dir, dr_rm_cb, 16, FTW_DEPTH | FTW_PHYS) != 0) {
            fprintf(stderr, "kmsd restore: cannot empty %s: %s\n", cfg.data_dir, strerror(errno));
            code = 2;
            goto out;
        }
    }
    if (mkdir(cfg.data_dir, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "kmsd restore: cannot create %s: %s\n", cfg.data_dir, strerror(errno));
        code = 2;
        goto out;
    }
    if ((rc = kms_store_open(path, &store, &err)) != 0 ||
        (rc = kms_backup_load(store, snap, info, &err)) != 0) {
        fprintf(stderr, "kmsd restore: %s (%s)\n", err.msg, kms_strerror(rc));
        if (store != NULL) {
            kms_store_close(store);
            store = NULL;
        }
        (void)nftw(path, dr_rm_cb, 16, FTW_DEPTH | FTW_PHYS);
        (void)rmdir(path); /* dr_rm_cb keeps the top directory */
        code = 2;
        goto out;
    }
    kms_store_close(store);
    store = NULL;
    printf("kmsd restore: node %" PRIu64 " restored from %s: cluster %s, snapshot index %" PRIu64
           ", %" PRIu64 " records (%" PRIu64 " revoked).\n"
           "Next: restore every member of initialCluster the same way, start them, and\n"
           "unseal each with k of the cluster's existing key shares.\n",
           cfg.node_id, snap, info->cluster_id, info->index, info->records, info->revoked);
out:
    free(info);
    free(cargv);
    kms_config_free(&cfg);
    return code;
}

int kmsd_dr_main(int argc, char **argv, char **envp)
{
    if (argc > 1 && strcmp(argv[1], "restore") == 0) {
        return dr_restore(argc, argv, envp);
    }
    if (argc > 1 && strcmp(argv[1], "recover") == 0) {
        return dr_recover(argc, argv, envp);
    }
    dr_recover_usage(stderr);
    return 1;
}
