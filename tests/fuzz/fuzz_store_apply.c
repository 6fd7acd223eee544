/* libFuzzer: raft log entries, decoded (kms_entry_decode) and applied
 * (kms_store_apply) to a real RocksDB store. Every entry a node applies came
 * from the raft log, i.e. from whoever could propose or replicate it.
 *
 * Input: a sequence of chunks {u8 flags, u16le len, len bytes}. flags bit 0:
 * the bytes are a packed Entry that the harness frames ("KE" 1 0, u32le
 * length, zero padding); otherwise they are applied raw (framing errors).
 * Invariants: decode returns 0 / KMS_ECORRUPT / KMS_EVERSION only; apply
 * (of what decodes: apply calls the same decoder) returns 0 with a result
 * or a negative code with none, and never crashes whatever the store holds.
 *
 * Seeds: KMS_FUZZ_WRITE_SEEDS=<dir> fuzz_store_apply -runs=0 writes one
 * seed per entry type (how corpus/fuzz_store_apply was made).
 */
#include "fuzz_store_util.h"

#include <stdint.h>

#include "kms_err.h"
#include "kmsd/v1/entry.pb-c.h"

static uint64_t next_index = 1;

static size_t frame(const uint8_t *p, size_t n, uint8_t *out)
{
    size_t padded = (n + 7) & ~(size_t)7;
    out[0] = 'K';
    out[1] = 'E';
    out[2] = 1;
    out[3] = 0;
    out[4] = (uint8_t)n;
    out[5] = (uint8_t)(n >> 8);
    out[6] = (uint8_t)(n >> 16);
    out[7] = (uint8_t)(n >> 24);
    memcpy(out + 8, p, n);
    memset(out + 8 + n, 0, padded - n);
    return 8 + padded;
}

static void one(struct kms_store *s, const uint8_t *p, size_t n, int framed)
{
    static uint8_t buf[8 + 65536 + 8];
    struct kms_store_result *res = NULL;
    Kmsd__V1__Entry *e = NULL;
    struct kms_err err;
    size_t len = framed ? frame(p, n, buf) : n;
    const uint8_t *in = framed ? buf : p;
    int drc, arc;

    kms_err_clear(&err);
    drc = kms_entry_decode(in, len, &e, &err);
    if (drc == 0) {
        kmsd__v1__entry__free_unpacked(e, NULL);
    } else if (drc != KMS_ECORRUPT && drc != KMS_EVERSION) {
        abort();
    }
    /* kms_store_apply decodes with the same function; an undecodable entry
     * would only make the store's error sticky and force a slow reopen. */
    if (drc != 0 || kms_store_fatal(s, &err) != 0) {
        return;
    }
    kms_err_clear(&err);
    arc = kms_store_apply(s, next_index++, in, len, &res, &err);
    if (arc == 0) {
        if (res == NULL) {
            abort();
        }
        kms_store_result_free(res);
    } else if (res != NULL || arc > 0) {
        abort();
    }
}

static void write_seed(const char *dir, const char *name, Kmsd__V1__Entry *e)
{
    uint8_t buf[4096];
    size_t n = kmsd__v1__entry__pack(e, buf + 3);
    char path[512];
    FILE *f;
    buf[0] = 1;
    buf[1] = (uint8_t)n;
    buf[2] = (uint8_t)(n >> 8);
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if ((f = fopen(path, "wb")) == NULL) {
        abort();
    }
    fwrite(buf, 1, n + 3, f);
    fclose(f);
}

static void write_seeds(const char *dir)
{
    static uint8_t key_id[16] = "fuzz-key-id-0001", nonce[12] = "fuzz-nonce12";
    static uint8_t ct[48], cid[16] = "fuzz-cluster-id";
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__SealedRecord rec = KMSD__V1__SEALED_RECORD__INIT;
    Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
    Kmsd__V1__RevokeKey rk = KMSD__V1__REVOKE_KEY__INIT;
    Kmsd__V1__RevokeNode rn = KMSD__V1__REVOKE_NODE__INIT;
    Kmsd__V1__EncryptedKeyring ek = KMSD__V1__ENCRYPTED_KEYRING__INIT;
    Kmsd__V1__PutKeyring pk = KMSD__V1__PUT_KEYRING__INIT;
    Kmsd__V1__Member m = KMSD__V1__MEMBER__INIT;
    Kmsd__V1__PutMember pm = KMSD__V1__PUT_MEMBER__INIT;
    Kmsd__V1__RemoveMember rm = KMSD__V1__REMOVE_MEMBER__INIT;
    Kmsd__V1__Touch t = KMSD__V1__TOUCH__INIT, *tp = &t;
    Kmsd__V1__TouchBatch tb = KMSD__V1__TOUCH_BATCH__INIT;
    Kmsd__V1__Noop noop = KMSD__V1__NOOP__INIT;
    Kmsd__V1__RekeyKeyring rkk = KMSD__V1__REKEY_KEYRING__INIT;
    uint8_t wrap[60];

    memset(wrap, 0x5c, sizeof(wrap));
    e.version = 1;
    rec.version = 1;
    rec.key_id.data = key_id;
    rec.key_id.len = 16;
    rec.node_uuid = "3f1c9a4e-7b2d-4c11-9e0a-5d6f7a8b9c0d";
    rec.term = 1;
    rec.nonce.data = nonce;
    rec.nonce.len = 12;
    rec.ciphertext.data = ct;
    rec.ciphertext.len = sizeof(ct);
    rec.created_at = 1700000000000;
    pr.record = &rec;
    ek.version = 1;
    ek.cluster_id.data = cid;
    ek.cluster_id.len = 16;
    ek.nonce.data = nonce;
    ek.nonce.len = 12;
    ek.ciphertext.data = ct;
    ek.ciphertext.len = sizeof(ct);
    ek.share_count = 5;
    ek.threshold = 3;
    ek.active_term = 1;
    pk.keyring = &ek;
    pk.init = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_KEYRING;
    e.put_keyring = &pk;
    write_seed(dir, "keyring", &e);
    e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
    e.put_record = &pr;
    write_seed(dir, "record", &e);
    rk.key_id.data = key_id;
    rk.key_id.len = 16;
    rk.revoked_at = 1700000001000;
    e.op_case = KMSD__V1__ENTRY__OP_REVOKE_KEY;
    e.revoke_key = &rk;
    write_seed(dir, "revoke-key", &e);
    rn.node_uuid = rec.node_uuid;
    rn.revoked_at = 1700000002000;
    e.op_case = KMSD__V1__ENTRY__OP_REVOKE_NODE;
    e.revoke_node = &rn;
    write_seed(dir, "revoke-node", &e);
    m.id = 2;
    m.raft_address = "127.0.0.1:4052";
    m.cluster_address = "127.0.0.1:4051";
    m.talos_address = "127.0.0.1:4050";
    m.version = "0.1.0";
    pm.member = &m;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_MEMBER;
    e.put_member = &pm;
    write_seed(dir, "member", &e);
    rm.id = 2;
    e.op_case = KMSD__V1__ENTRY__OP_REMOVE_MEMBER;
    e.remove_member = &rm;
    write_seed(dir, "remove-member", &e);
    t.key_id.data = key_id;
    t.key_id.len = 16;
    t.at = 1700000003000;
    tb.n_touches = 1;
    tb.touches = &tp;
    e.op_case = KMSD__V1__ENTRY__OP_TOUCH_BATCH;
    e.touch_batch = &tb;
    write_seed(dir, "touch", &e);
    e.op_case = KMSD__V1__ENTRY__OP_NOOP;
    e.noop = &noop;
    write_seed(dir, "noop", &e);
    ek.share_count = 4;
    ek.threshold = 2;
    rkk.keyring = &ek;
    rkk.wrapped_root.data = wrap;
    rkk.wrapped_root.len = sizeof(wrap);
    e.op_case = KMSD__V1__ENTRY__OP_REKEY_KEYRING;
    e.rekey_keyring = &rkk;
    write_seed(dir, "rekey", &e);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *dir = getenv("KMS_FUZZ_WRITE_SEEDS");
    if (dir != NULL) {
        write_seeds(dir);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kms_store *s = fz_store_get();
    size_t off = 0;

    while (off + 3 <= size) {
        uint8_t flags = data[off];
        size_t n = (size_t)data[off + 1] | ((size_t)data[off + 2] << 8);
        off += 3;
        if (n > size - off) {
            n = size - off;
        }
        one(s, data + off, n, flags & 1);
        off += n;
    }
    return 0;
}
