/*
 * Shared cmocka fixtures for the store unit tests (test_store_apply.c,
 * test_store_export.c): a temporary directory, a store opened in it, and
 * builders that apply entries. Include after <cmocka.h>, <ftw.h> and
 * "kms_store.h". All functions are static inline: each test uses some.
 */
#ifndef KMS_TEST_STORE_FIXTURE_H
#define KMS_TEST_STORE_FIXTURE_H

struct dir {
    char path[64];
};

static inline void dir_make(struct dir *d)
{
    snprintf(d->path, sizeof(d->path), "/tmp/test_store_XXXXXX");
    assert_non_null(mkdtemp(d->path));
}

static inline int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static inline void dir_remove(struct dir *d)
{
    nftw(d->path, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

static inline struct kms_store *open_in(struct dir *d, const char *sub)
{
    char p[128];
    struct kms_store *s = NULL;
    struct kms_err err;
    kms_err_clear(&err);
    snprintf(p, sizeof(p), "%s/%s", d->path, sub);
    if (kms_store_open(p, &s, &err) != 0) {
        fail_msg("open %s: %s", p, err.msg);
    }
    return s;
}

static inline void key_id(uint8_t id[16], unsigned n)
{
    memset(id, 0, 16);
    id[0] = 0x5a;
    id[14] = (uint8_t)(n >> 8);
    id[15] = (uint8_t)n;
}

/* Encodes e, applies it at index, returns the result (caller frees) or
 * NULL with *rc set when the apply failed. */
static inline struct kms_store_result *apply_e(struct kms_store *s, uint64_t index,
                                        const Kmsd__V1__Entry *e, int *rc_out,
                                        struct kms_err *err)
{
    struct raft_buffer b;
    struct kms_store_result *res = NULL;
    int rc;
    assert_int_equal(kms_entry_encode(e, &b, err), 0);
    rc = kms_store_apply(s, index, b.base, b.len, &res, err);
    raft_free(b.base);
    if (rc_out != NULL) {
        *rc_out = rc;
    } else if (rc != 0) {
        fail_msg("apply %llu: %s", (unsigned long long)index, err->msg);
    }
    return res;
}

/* Applies and returns the op's result code (and count through *count). */
static inline int apply_code(struct kms_store *s, uint64_t index, const Kmsd__V1__Entry *e,
                      uint64_t *count)
{
    struct kms_err err;
    struct kms_store_result *r;
    int code;
    kms_err_clear(&err);
    r = apply_e(s, index, e, NULL, &err);
    assert_non_null(r);
    assert_false(r->skipped);
    code = r->code;
    if (count != NULL) {
        *count = r->count;
    }
    kms_store_result_free(r);
    return code;
}

static inline int put_record(struct kms_store *s, uint64_t index, unsigned n, const char *uuid)
{
    Kmsd__V1__SealedRecord r = KMSD__V1__SEALED_RECORD__INIT;
    Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    uint8_t id[16], nonce[12], ct[48];
    key_id(id, n);
    memset(nonce, (int)n, sizeof(nonce));
    memset(ct, 0xc7, sizeof(ct));
    r.version = 1;
    r.key_id.data = id;
    r.key_id.len = 16;
    r.node_uuid = (char *)uuid;
    r.term = 1;
    r.nonce.data = nonce;
    r.nonce.len = 12;
    r.ciphertext.data = ct;
    r.ciphertext.len = sizeof(ct);
    r.created_at = 1000 + n;
    pr.record = &r;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
    e.put_record = &pr;
    return apply_code(s, index, &e, NULL);
}

static inline int put_keyring(struct kms_store *s, uint64_t index, bool init, uint32_t term,
                       uint8_t cid)
{
    Kmsd__V1__EncryptedKeyring k = KMSD__V1__ENCRYPTED_KEYRING__INIT;
    Kmsd__V1__PutKeyring pk = KMSD__V1__PUT_KEYRING__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    uint8_t cluster[16], nonce[12], ct[80];
    memset(cluster, cid, sizeof(cluster));
    memset(nonce, (int)term, sizeof(nonce));
    memset(ct, (int)term, sizeof(ct));
    k.version = 1;
    k.cluster_id.data = cluster;
    k.cluster_id.len = 16;
    k.nonce.data = nonce;
    k.nonce.len = 12;
    k.ciphertext.data = ct;
    k.ciphertext.len = sizeof(ct);
    k.share_count = 5;
    k.threshold = 3;
    k.active_term = term;
    pk.keyring = &k;
    pk.init = init;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_PUT_KEYRING;
    e.put_keyring = &pk;
    return apply_code(s, index, &e, NULL);
}

#endif
