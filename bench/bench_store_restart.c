/*
 * bench_store_restart: how fast does a node holding N sealed records serve
 * again after a restart?
 *
 *   bench_store_restart [records (default 1000000)] [dir (default: a temp dir, removed)]
 *
 * Fills a store with N put_record entries through kms_store_apply() (one
 * WriteBatch per entry, as raft applies them), closes it, reopens it and
 * times open + the first record read; then times the same after a restore
 * of the store's own snapshot (the start-up path of a node whose snapshot is
 * not newer than its DB: skipped). Prints one line per figure.
 */
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <raft.h>

#include "kms_store.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void key_of(uint64_t i, uint8_t id[16])
{
    uint64_t x = i * 2 + 1, a = splitmix(&x), b = splitmix(&x);
    memcpy(id, &a, 8);
    memcpy(id + 8, &b, 8);
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int fail(const char *what, const struct kms_err *err)
{
    fprintf(stderr, "bench_store_restart: %s: %s\n", what, err->msg);
    return 1;
}

int main(int argc, char **argv)
{
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 10) : 1000000;
    char tmpl[] = "/tmp/bench_store_XXXXXX";
    const char *dir = argc > 2 ? argv[2] : NULL;
    struct kms_store *s = NULL;
    struct kms_err err;
    uint8_t id[16], nonce[12], ct[48];
    char uuid[64];
    double t0, t1, t2;
    int rc = 1;

    kms_err_clear(&err);
    if (dir == NULL) {
        if (mkdtemp(tmpl) == NULL) {
            perror("mkdtemp");
            return 1;
        }
        dir = tmpl;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/store", dir);
    if (kms_store_open(path, &s, &err) != 0) {
        return fail("open", &err);
    }
    memset(nonce, 7, sizeof(nonce));
    memset(ct, 9, sizeof(ct));
    t0 = now_s();
    for (uint64_t i = 0; i < n; i++) {
        Kmsd__V1__SealedRecord r = KMSD__V1__SEALED_RECORD__INIT;
        Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        struct raft_buffer b;
        struct kms_store_result *res = NULL;

        key_of(i, id);
        snprintf(uuid, sizeof(uuid), "4c4c4544-0000-1000-8000-%012" PRIu64, i % 5000);
        r.version = 1;
        r.key_id.data = id;
        r.key_id.len = 16;
        r.node_uuid = uuid;
        r.term = 1;
        r.nonce.data = nonce;
        r.nonce.len = sizeof(nonce);
        r.ciphertext.data = ct;
        r.ciphertext.len = sizeof(ct);
        r.created_at = 1700000000000 + (int64_t)i;
        pr.record = &r;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
        e.put_record = &pr;
        if (kms_entry_encode(&e, &b, &err) != 0 ||
            kms_store_apply(s, i + 1, b.base, b.len, &res, &err) != 0) {
            raft_free(b.base);
            fail("fill", &err);
            goto out;
        }
        raft_free(b.base);
        if (res->code != 0) {
            fprintf(stderr, "fill: entry %" PRIu64 ": %s\n", i + 1, res->msg);
            kms_store_result_free(res);
            goto out;
        }
        kms_store_result_free(res);
        if ((i + 1) % 200000 == 0) {
            fprintf(stderr, "  %" PRIu64 " records, %.1f s\n", i + 1, now_s() - t0);
        }
    }
    t1 = now_s();
    printf("fill: %" PRIu64 " records in %.2f s (%.0f applies/s)\n", n, t1 - t0,
           (double)n / (t1 - t0));
    kms_store_close(s);
    s = NULL;
    printf("close (flush): %.3f s\n", now_s() - t1);

    for (int round = 0; round < 2; round++) {
        Kmsd__V1__SealedRecord *rec = NULL;
        t0 = now_s();
        if (kms_store_open(path, &s, &err) != 0) {
            fail("reopen", &err);
            goto out;
        }
        t1 = now_s();
        key_of(n / 2, id);
        if (kms_store_record_get(s, id, &rec, &err) != 0) {
            fail("first read", &err);
            goto out;
        }
        t2 = now_s();
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
        printf("restart %d: open %.3f s + first read %.3f ms = %.3f s to serve "
               "(applied %" PRIu64 ", %" PRIu64 " records)\n",
               round + 1, t1 - t0, (t2 - t1) * 1e3, t2 - t0, kms_store_applied_index(s),
               kms_store_count(s));
        if (round == 0) {
            /* What raft does at start: restore the last snapshot. The DB
             * already holds that state, so it must be skipped quickly. */
            struct raft_buffer *bufs = NULL;
            unsigned nb = 0;
            size_t total = 0, off = 0;
            bool skipped = false;
            double ts = now_s();
            if (kms_store_snapshot(s, 0, &bufs, &nb, &err) != 0) {
                fail("snapshot", &err);
                goto out;
            }
            for (unsigned i = 0; i < nb; i++) {
                total += bufs[i].len;
            }
            char *all = malloc(total);
            for (unsigned i = 0; all != NULL && i < nb; i++) {
                memcpy(all + off, bufs[i].base, bufs[i].len);
                off += bufs[i].len;
            }
            kms_store_snapshot_free(bufs, nb);
            double tr = now_s();
            if (all == NULL || kms_store_restore(s, all, total, &skipped, &err) != 0) {
                free(all);
                fail("restore", &err);
                goto out;
            }
            printf("snapshot: %zu bytes in %.2f s; restore at start (same index): %s in %.3f s\n",
                   total, tr - ts, skipped ? "skipped" : "RELOADED", now_s() - tr);
            free(all);
        }
        kms_store_close(s);
        s = NULL;
    }
    /* Crash restart: a child applies 100,000 more records and dies without
     * closing (like kill -9); the reopen then replays the WAL. */
    {
        uint64_t extra = n / 10 > 0 ? n / 10 : 1;
        pid_t pid = fork();
        if (pid == 0) {
            struct kms_store *cs = NULL;
            if (kms_store_open(path, &cs, &err) != 0) {
                _exit(2);
            }
            for (uint64_t i = n; i < n + extra; i++) {
                Kmsd__V1__SealedRecord r = KMSD__V1__SEALED_RECORD__INIT;
                Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
                Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
                struct raft_buffer b;
                struct kms_store_result *res = NULL;
                key_of(i, id);
                r.key_id.data = id;
                r.key_id.len = 16;
                r.node_uuid = (char *)"crash-node";
                r.ciphertext.data = ct;
                r.ciphertext.len = sizeof(ct);
                pr.record = &r;
                e.version = 1;
                e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
                e.put_record = &pr;
                if (kms_entry_encode(&e, &b, &err) != 0 ||
                    kms_store_apply(cs, i + 1, b.base, b.len, &res, &err) != 0) {
                    _exit(3);
                }
                raft_free(b.base);
                kms_store_result_free(res);
            }
            _exit(0); /* no close, no flush */
        }
        int st = 0;
        if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "crash child failed\n");
            goto out;
        }
        Kmsd__V1__SealedRecord *rec = NULL;
        t0 = now_s();
        if (kms_store_open(path, &s, &err) != 0) {
            fail("reopen after crash", &err);
            goto out;
        }
        t1 = now_s();
        key_of(n + extra / 2, id);
        if (kms_store_record_get(s, id, &rec, &err) != 0) {
            fail("read after crash", &err);
            goto out;
        }
        t2 = now_s();
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
        printf("crash restart (%" PRIu64 " applies in the WAL): open %.3f s + first read %.3f ms"
               " = %.3f s (applied %" PRIu64 ")\n",
               extra, t1 - t0, (t2 - t1) * 1e3, t2 - t0, kms_store_applied_index(s));
        kms_store_close(s);
        s = NULL;
    }
    rc = 0;
out:
    kms_store_close(s);
    if (argc <= 2) {
        nftw(tmpl, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    }
    return rc;
}
