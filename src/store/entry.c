/*
 * Raft log entry framing (proto/README.md "Raft log entry framing").
 * canonical raft 0.15 loses entries whose length is not a multiple of 8, so
 * every entry is an 8-byte header, the packed kmsd.v1.Entry and zero padding.
 */
#include <raft.h>

#include "kms_store.h"
#include "kms_bytes.h"

#include <string.h>

static size_t pad8(size_t n)
{
    return (n + 7u) & ~(size_t)7u;
}

/* True when the op case is one this software knows. */
static int op_known(Kmsd__V1__Entry__OpCase c)
{
    switch (c) {
    case KMSD__V1__ENTRY__OP_PUT_RECORD:
    case KMSD__V1__ENTRY__OP_REVOKE_KEY:
    case KMSD__V1__ENTRY__OP_REVOKE_NODE:
    case KMSD__V1__ENTRY__OP_PUT_KEYRING:
    case KMSD__V1__ENTRY__OP_PUT_MEMBER:
    case KMSD__V1__ENTRY__OP_REMOVE_MEMBER:
    case KMSD__V1__ENTRY__OP_TOUCH_BATCH:
    case KMSD__V1__ENTRY__OP_REWRAP_BATCH:
    case KMSD__V1__ENTRY__OP_RETIRE_TERM:
    case KMSD__V1__ENTRY__OP_NOOP:
    case KMSD__V1__ENTRY__OP_REKEY_KEYRING:
    case KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE:
        return 1;
    default:
        return 0;
    }
}

uint32_t kms_entry_op_min_version(Kmsd__V1__Entry__OpCase c)
{
    switch (c) {
    case KMSD__V1__ENTRY__OP_REKEY_KEYRING:
    case KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE:
    case KMSD__V1__ENTRY__OP_REWRAP_BATCH:
    case KMSD__V1__ENTRY__OP_RETIRE_TERM:
        return 2;
    default:
        return 1;
    }
}

int kms_entry_encode(const Kmsd__V1__Entry *e, struct raft_buffer *out, struct kms_err *err)
{
    int rc = 0;
    size_t n, total;
    uint8_t *p;

    if (out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "encode entry: no output buffer");
    }
    out->base = NULL;
    out->len = 0;
    if (e == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "encode entry: no entry");
        goto out;
    }
    if (e->version == 0 || e->version > KMS_ENTRY_VERSION) {
        rc = kms_err_set(err, KMS_EINVAL, "encode entry: version %u not in 1..%u",
                         (unsigned)e->version, (unsigned)KMS_ENTRY_VERSION);
        goto out;
    }
    if (!op_known(e->op_case)) {
        rc = kms_err_set(err, KMS_EINVAL, "encode entry: no known op (case %d)", (int)e->op_case);
        goto out;
    }
    n = kmsd__v1__entry__get_packed_size(e);
    if (n > KMS_ENTRY_MAX_PAYLOAD) {
        rc = kms_err_set(err, KMS_ERANGE, "encode entry: %zu bytes exceeds the %u-byte limit", n,
                         (unsigned)KMS_ENTRY_MAX_PAYLOAD);
        goto out;
    }
    total = KMS_ENTRY_HEADER_LEN + pad8(n);
    p = raft_malloc(total);
    if (p == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "encode entry: out of memory");
        goto out;
    }
    memset(p, 0, total);
    p[0] = 'K';
    p[1] = 'E';
    p[2] = KMS_ENTRY_FRAME_VERSION;
    p[3] = 0;
    kms_put_le32(p + 4, (uint32_t)n);
    if (kmsd__v1__entry__pack(e, p + KMS_ENTRY_HEADER_LEN) != n) {
        raft_free(p);
        rc = kms_err_set(err, KMS_EINVAL, "encode entry: packed size mismatch");
        goto out;
    }
    /* What goes into the log must decode on every node: protobuf-c keeps
     * unknown fields of a message it unpacked (a forwarded entry) and can
     * pack some of them into bytes its own unpack refuses (found by
     * fuzz_rpc_request: an unknown field with number 0). Such an entry would
     * stop every replica at apply (sticky KMS_ECORRUPT): refuse it here. */
    {
        Kmsd__V1__Entry *back = kmsd__v1__entry__unpack(NULL, n, p + KMS_ENTRY_HEADER_LEN);
        if (back == NULL || !op_known(back->op_case)) {
            if (back != NULL) {
                kmsd__v1__entry__free_unpacked(back, NULL);
            }
            raft_free(p);
            rc = kms_err_set(err, KMS_EINVAL, "encode entry: does not decode back (malformed "
                                              "unknown fields?)");
            goto out;
        }
        kmsd__v1__entry__free_unpacked(back, NULL);
    }
    out->base = p;
    out->len = total;
out:
    return rc;
}

int kms_entry_decode(const void *buf, size_t len, Kmsd__V1__Entry **out, struct kms_err *err)
{
    int rc = 0;
    const uint8_t *p = buf;
    Kmsd__V1__Entry *e = NULL;
    size_t n;

    if (out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "decode entry: no output");
    }
    *out = NULL;
    if (p == NULL || len < KMS_ENTRY_HEADER_LEN) {
        rc = kms_err_set(err, KMS_ECORRUPT, "bad entry frame: %zu bytes, shorter than the header",
                         len);
        goto out;
    }
    if (p[0] != 'K' || p[1] != 'E') {
        rc = kms_err_set(err, KMS_ECORRUPT, "bad entry frame: magic %02x%02x, want \"KE\"", p[0],
                         p[1]);
        goto out;
    }
    if (p[2] != KMS_ENTRY_FRAME_VERSION) {
        rc = kms_err_set(err, KMS_EVERSION, "bad entry frame: framing version %u, supported %u",
                         p[2], (unsigned)KMS_ENTRY_FRAME_VERSION);
        goto out;
    }
    if (p[3] != 0) {
        rc = kms_err_set(err, KMS_ECORRUPT, "bad entry frame: reserved byte %u", p[3]);
        goto out;
    }
    n = kms_get_le32(p + 4);
    if (n > KMS_ENTRY_MAX_PAYLOAD || len % 8 != 0 || len != KMS_ENTRY_HEADER_LEN + pad8(n)) {
        rc = kms_err_set(err, KMS_ECORRUPT,
                         "bad entry frame: payload length %zu does not match frame length %zu", n,
                         len);
        goto out;
    }
    for (size_t i = KMS_ENTRY_HEADER_LEN + n; i < len; i++) {
        if (p[i] != 0) {
            rc = kms_err_set(err, KMS_ECORRUPT, "bad entry frame: non-zero padding");
            goto out;
        }
    }
    e = kmsd__v1__entry__unpack(NULL, n, p + KMS_ENTRY_HEADER_LEN);
    if (e == NULL) {
        rc = kms_err_set(err, KMS_ECORRUPT, "bad entry: payload is not a kmsd.v1.Entry");
        goto out;
    }
    if (e->version == 0) {
        rc = kms_err_set(err, KMS_EVERSION, "entry version 0 is invalid (a proposer bug)");
        goto out;
    }
    if (e->version > KMS_ENTRY_VERSION) {
        rc = kms_err_set(err, KMS_EVERSION,
                         "entry version %u is not supported (this kmsd supports up to %u): "
                         "upgrade this node",
                         (unsigned)e->version, (unsigned)KMS_ENTRY_VERSION);
        goto out;
    }
    if (!op_known(e->op_case)) {
        rc = kms_err_set(err, KMS_ECORRUPT, "entry version %u has an unknown op (case %d)",
                         (unsigned)e->version, (int)e->op_case);
        goto out;
    }
    *out = e;
    e = NULL;
out:
    if (e != NULL) {
        kmsd__v1__entry__free_unpacked(e, NULL);
    }
    return rc;
}
