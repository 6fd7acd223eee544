/* libFuzzer: snapshot restore (kms_store_restore) into a real RocksDB
 * store, then every read of what was restored (records, members, keyring,
 * digest) and one apply on top. A snapshot arrives from the leader over
 * raft's InstallSnapshot: its keys and values go into RocksDB as they are,
 * so every later read must cope with whatever they hold.
 *
 * Input: u8 flags, then bytes. flags bit 0: the bytes are a snapshot body
 * and the harness writes a valid 72-byte header for it (magic, version,
 * index above the store's, entry count, length, SHA-256), so the fuzzer
 * gets past the checksum; otherwise the bytes are the whole snapshot.
 * Invariants: no crash; restore returns 0 or a negative code; the reads
 * return 0 or a negative code.
 *
 * Seeds: KMS_FUZZ_WRITE_SEEDS=<dir> fuzz_store_restore -runs=0 writes the
 * body of a snapshot holding a record, a member and a keyring.
 */
#include "fuzz_store_util.h"

#include <stdint.h>

#include <openssl/evp.h>
#include <raft.h>

#include "kms_err.h"
#include "kms_log.h"

#define HDR 72

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static uint64_t count_entries(const uint8_t *b, size_t n)
{
    uint64_t c = 0;
    size_t off = 0;
    while (n - off >= 8) {
        size_t kl = (size_t)b[off] | (size_t)b[off + 1] << 8 | (size_t)b[off + 2] << 16 |
                    (size_t)b[off + 3] << 24;
        size_t vl = (size_t)b[off + 4] | (size_t)b[off + 5] << 8 | (size_t)b[off + 6] << 16 |
                    (size_t)b[off + 7] << 24;
        size_t step = ((kl + vl + 7) & ~(size_t)7);
        if (kl + vl < kl || step > n - off - 8) {
            break;
        }
        off += 8 + step;
        c++;
    }
    return c;
}

static int rec_cb(void *arg, const Kmsd__V1__SealedRecord *r)
{
    (void)arg;
    return r == NULL ? -1 : 0;
}

static int mem_cb(void *arg, const Kmsd__V1__Member *m)
{
    (void)arg;
    return m == NULL ? -1 : 0;
}

static void reads(struct kms_store *s)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    Kmsd__V1__SealedRecord *rec = NULL;
    uint8_t digest[32], kid[16] = "fuzz-key-id-0001";
    struct kms_err err;

    kms_err_clear(&err);
    (void)kms_store_records_list(s, NULL, rec_cb, NULL, &err);
    (void)kms_store_records_list(s, "3f1c9a4e-7b2d-4c11-9e0a-5d6f7a8b9c0d", rec_cb, NULL, &err);
    (void)kms_store_members_list(s, mem_cb, NULL, &err);
    if (kms_store_keyring_get(s, &ek, &err) == 0) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    if (kms_store_record_get(s, kid, &rec, &err) == 0) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    (void)kms_store_digest(s, digest, &err);
    (void)kms_store_count(s);
}

/* A framed Noop entry, applied after the restore. */
static const uint8_t NOOP[16] = {'K', 'E', 1, 0, 5, 0, 0, 0, 0x08, 0x01, 0x8a, 0x01, 0x00, 0, 0, 0};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    kms_log_set_level(KMS_LOG_ERROR);
    const char *dir = getenv("KMS_FUZZ_WRITE_SEEDS");
    if (dir != NULL) {
        /* Build a state through the public apply path, then snapshot it. */
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        Kmsd__V1__Member m = KMSD__V1__MEMBER__INIT;
        Kmsd__V1__PutMember pm = KMSD__V1__PUT_MEMBER__INIT;
        uint8_t member[256];
        m.id = 2;
        m.raft_address = "127.0.0.1:4052";
        m.cluster_address = "127.0.0.1:4051";
        m.talos_address = "127.0.0.1:4050";
        m.version = "0.1.0";
        pm.member = &m;
        e.version = 1;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_MEMBER;
        e.put_member = &pm;
        struct kms_store *s = fz_store_get();
        struct kms_store_result *res = NULL;
        struct raft_buffer *bufs = NULL;
        unsigned nb = 0;
        uint8_t fr[300];
        struct kms_err err;
        size_t n = kmsd__v1__entry__pack(&e, member);
        memset(fr, 0, sizeof(fr));
        memcpy(fr, "KE\x01\x00", 4);
        fr[4] = (uint8_t)n;
        memcpy(fr + 8, member, n);
        kms_err_clear(&err);
        if (kms_store_apply(s, 1, fr, 8 + ((n + 7) & ~(size_t)7), &res, &err) == 0) {
            kms_store_result_free(res);
        }
        if (kms_store_snapshot(s, 0, &bufs, &nb, &err) == 0) {
            char path[512];
            FILE *f;
            snprintf(path, sizeof(path), "%s/seed-member", dir);
            if ((f = fopen(path, "wb")) != NULL) {
                uint8_t flag = 1;
                fwrite(&flag, 1, 1, f);
                for (unsigned i = 0; i < nb; i++) {
                    const uint8_t *b = bufs[i].base;
                    size_t l = bufs[i].len;
                    if (i == 0) {
                        b += HDR;
                        l -= HDR;
                    }
                    fwrite(b, 1, l, f);
                }
                fclose(f);
            }
            kms_store_snapshot_free(bufs, nb);
        }
        fz_store_drop();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[HDR + (1 << 20)];
    struct kms_store *s;
    struct kms_store_result *res = NULL;
    struct kms_err err;
    const uint8_t *snap = data + 1;
    size_t len = size - 1;
    bool skipped = false;
    int rc;

    if (size < 1 || size - 1 > (1 << 20)) {
        return 0;
    }
    s = fz_store_get();
    if (data[0] & 1) {
        uint64_t idx = kms_store_applied_index(s) + 1;
        unsigned int dl = 32;
        memset(buf, 0, HDR);
        buf[0] = 'K';
        buf[1] = 'S';
        buf[2] = 1;
        put64(buf + 8, idx);
        put64(buf + 16, idx);
        put64(buf + 24, count_entries(data + 1, size - 1));
        put64(buf + 32, size - 1);
        if (EVP_Digest(data + 1, size - 1, buf + 40, &dl, EVP_sha256(), NULL) != 1) {
            abort();
        }
        memcpy(buf + HDR, data + 1, size - 1);
        snap = buf;
        len = HDR + size - 1;
    }
    kms_err_clear(&err);
    rc = kms_store_restore(s, snap, len, &skipped, &err);
    if (rc > 0) {
        abort();
    }
    if (rc == 0 && !kms_store_restoring(s)) {
        reads(s);
        if (kms_store_apply(s, kms_store_applied_index(s) + 1, NOOP, sizeof(NOOP), &res,
                            &err) == 0) {
            kms_store_result_free(res);
        } else if (res != NULL) {
            abort();
        }
    }
    return 0;
}
