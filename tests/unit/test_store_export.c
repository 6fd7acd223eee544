/* Online-backup side of kms_store on a real RocksDB in temp dirs: the
 * streaming export (same body as a raft snapshot, point in time, chunk
 * bounds) and backup files (verify, altered/truncated refused, load into an
 * empty store only). Fixtures copied from test_store_apply.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>

#include <fcntl.h>
#include <unistd.h>
#include <openssl/evp.h>

#include "kms_store.h"

/* ---- fixtures ----------------------------------------------------------- */

#include "store_fixture.h"

/* ---- streaming export and backup files (export.c, backup.c) -------------- */

struct blob {
    uint8_t *p;
    size_t n;
};

static void blob_add(struct blob *b, const void *p, size_t n)
{
    b->p = realloc(b->p, b->n + n + 1);
    assert_non_null(b->p);
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

/* Exports the whole store in chunks of cap bytes into out. */
static uint64_t export_all(struct kms_store *s, size_t cap, struct blob *out, uint64_t *applied)
{
    struct kms_store_export *x = NULL;
    struct kms_err err;
    uint8_t *buf = malloc(cap);
    uint64_t total = 0, n;
    size_t used;
    bool done = false;
    kms_err_clear(&err);
    assert_non_null(buf);
    assert_int_equal(kms_store_export_open(s, &x, &err), 0);
    *applied = kms_store_export_applied(x);
    while (!done) {
        assert_int_equal(kms_store_export_next(x, buf, cap, &used, &n, &done, &err), 0);
        assert_true(used % 8 == 0);
        blob_add(out, buf, used);
        total += n;
    }
    kms_store_export_close(x);
    free(buf);
    return total;
}

static struct kms_store *filled(struct dir *d, unsigned records)
{
    struct kms_store *s;
    dir_make(d);
    s = open_in(d, "db");
    assert_int_equal(put_keyring(s, 1, true, 1, 0xab), 0);
    for (unsigned i = 0; i < records; i++) {
        assert_int_equal(put_record(s, 2 + i, i, "uuid-a"), 0);
    }
    return s;
}

static void test_export_matches_snapshot_body(void **state)
{
    struct dir d;
    struct kms_store *s = filled(&d, 50);
    struct raft_buffer *bufs = NULL;
    unsigned nb = 0;
    struct blob snap = {NULL, 0}, ex = {NULL, 0};
    uint64_t applied = 0, entries;
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_store_snapshot(s, 0, &bufs, &nb, &err), 0);
    for (unsigned i = 0; i < nb; i++) {
        blob_add(&snap, bufs[i].base, bufs[i].len);
    }
    kms_store_snapshot_free(bufs, nb);
    entries = export_all(s, 256, &ex, &applied);
    assert_int_equal(applied, 51);
    /* keyring + 50 records + 50 uuid index entries */
    assert_int_equal(entries, 101);
    assert_true(snap.n >= 72);
    assert_int_equal(ex.n, snap.n - 72);
    assert_memory_equal(ex.p, snap.p + 72, ex.n);
    free(snap.p);
    free(ex.p);
    kms_store_close(s);
    dir_remove(&d);
}

static void test_export_point_in_time(void **state)
{
    struct dir d;
    struct kms_store *s = filled(&d, 20);
    struct kms_store_export *x = NULL;
    struct kms_err err;
    uint8_t buf[4096];
    size_t used;
    uint64_t n, records = 0;
    bool done = false;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_store_export_open(s, &x, &err), 0);
    for (unsigned i = 20; i < 30; i++) {
        assert_int_equal(put_record(s, 2 + i, i, "uuid-b"), 0); /* after the pin */
    }
    while (!done) {
        assert_int_equal(kms_store_export_next(x, buf, sizeof(buf), &used, &n, &done, &err), 0);
        for (size_t off = 0; off < used;) {
            uint32_t kl = buf[off] | buf[off + 1] << 8 | buf[off + 2] << 16 |
                          (uint32_t)buf[off + 3] << 24;
            uint32_t vl = buf[off + 4] | buf[off + 5] << 8 | buf[off + 6] << 16 |
                          (uint32_t)buf[off + 7] << 24;
            records += buf[off + 8] == 'R';
            off += (8 + kl + vl + 7) & ~(size_t)7;
        }
    }
    assert_int_equal(records, 20);
    assert_int_equal(kms_store_export_applied(x), 21);
    kms_store_export_close(x);
    /* a chunk too small for one entry */
    assert_int_equal(kms_store_export_open(s, &x, &err), 0);
    assert_int_equal(kms_store_export_next(x, buf, 16, &used, &n, &done, &err), KMS_ERANGE);
    kms_store_export_close(x);
    kms_store_close(s);
    dir_remove(&d);
}

/* Writes a backup file the way kmsctl does: header, body, trailer. */
static void write_backup(const char *path, const struct blob *body, uint64_t entries,
                         unsigned extra)
{
    char hdr[256];
    struct blob f = {NULL, 0};
    uint8_t tr[16], md[32];
    unsigned int ml = 0;
    size_t hl = (size_t)snprintf(hdr, sizeof(hdr),
                                 "KMSD-SNAPSHOT 1\n# test\ncluster-id: %s\nindex: 51\nnode: 1\n"
                                 "shares: 3 of 5\nx-pad: %.*s\n",
                                 "abababababababababababababababab", (int)extra, "aaaaaaaa");
    do { /* a '#' comment line of at least one '#', then the empty line */
        hdr[hl++] = '#';
    } while ((hl + 2) % 8 != 0);
    hdr[hl++] = '\n';
    hdr[hl++] = '\n';
    blob_add(&f, hdr, hl);
    blob_add(&f, body->p, body->n);
    memcpy(tr, kms_backup_trailer_magic(), 8);
    for (int i = 0; i < 8; i++) {
        tr[8 + i] = (uint8_t)(entries >> (8 * i));
    }
    blob_add(&f, tr, 16);
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    assert_int_equal(EVP_DigestInit_ex(c, EVP_sha256(), NULL), 1);
    assert_int_equal(EVP_DigestUpdate(c, f.p, f.n), 1);
    assert_int_equal(EVP_DigestFinal_ex(c, md, &ml), 1);
    EVP_MD_CTX_free(c);
    blob_add(&f, md, 32);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(f.p, 1, f.n, fp), f.n);
    fclose(fp);
    free(f.p);
}

static void test_backup_verify_and_load(void **state)
{
    struct dir d;
    struct kms_store *s = filled(&d, 30), *t;
    struct blob ex = {NULL, 0};
    struct kms_backup_info *info = calloc(1, sizeof(*info));
    struct kms_err err;
    uint64_t applied = 0, entries;
    char path[128], bad[160];
    Kmsd__V1__SealedRecord *r = NULL;
    uint8_t id[16];
    (void)state;
    kms_err_clear(&err);
    assert_non_null(info);
    entries = export_all(s, 1024, &ex, &applied);
    snprintf(path, sizeof(path), "%s/b.kmssnap", d.path);
    for (unsigned extra = 0; extra < 8; extra++) { /* every header alignment */
        write_backup(path, &ex, entries, extra);
        assert_int_equal(kms_backup_verify(path, info, NULL, NULL, &err), 0);
    }
    assert_string_equal(info->cluster_id, "abababababababababababababababab");
    assert_int_equal(info->index, 51);
    assert_int_equal(info->records, 30);
    assert_int_equal(info->per_term[1], 30);
    assert_true(info->has_keyring);
    assert_int_equal(info->threshold, 3);

    snprintf(bad, sizeof(bad), "%s/altered", d.path);
    {
        /* one byte of a finished file flipped: checksum mismatch */
        FILE *fp = fopen(path, "rb");
        struct blob f = {NULL, 0};
        uint8_t tmp[4096];
        size_t k;
        while ((k = fread(tmp, 1, sizeof(tmp), fp)) > 0) {
            blob_add(&f, tmp, k);
        }
        fclose(fp);
        f.p[f.n / 2] ^= 0x40;
        fp = fopen(bad, "wb");
        fwrite(f.p, 1, f.n, fp);
        fclose(fp);
        assert_int_equal(kms_backup_verify(bad, info, NULL, NULL, &err), KMS_ECORRUPT);
        assert_non_null(strstr(err.msg, "checksum mismatch"));
        f.p[f.n / 2] ^= 0x40;
        fp = fopen(bad, "wb");
        fwrite(f.p, 1, f.n - 20, fp); /* truncated */
        fclose(fp);
        assert_int_equal(kms_backup_verify(bad, info, NULL, NULL, &err), KMS_ECORRUPT);
        assert_non_null(strstr(err.msg, "truncated"));
        free(f.p);
    }

    /* load into a fresh store; a non-empty one is refused */
    t = open_in(&d, "restored");
    assert_int_equal(kms_backup_load(t, path, info, &err), 0);
    assert_int_equal(kms_store_count(t), 30);
    assert_int_equal(kms_store_applied_index(t), 0);
    key_id(id, 7);
    assert_int_equal(kms_store_record_get(t, id, &r, &err), 0);
    assert_int_equal(r->created_at, 1007);
    kmsd__v1__sealed_record__free_unpacked(r, NULL);
    assert_int_equal(kms_backup_load(t, path, info, &err), KMS_EEXIST);
    assert_int_equal(kms_backup_load(s, path, info, &err), KMS_EEXIST);
    kms_store_close(t);
    free(ex.p);
    free(info);
    kms_store_close(s);
    dir_remove(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_export_matches_snapshot_body),
        cmocka_unit_test(test_export_point_in_time),
        cmocka_unit_test(test_backup_verify_and_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
