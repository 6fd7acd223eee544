/*
 * Sealed records as the operator sees and revokes them (kmsd_cluster.h):
 * KeysList (paged, filtered), KeysShow, KeysRevoke (a key or every key of a
 * node UUID, on the leader). Operator pool threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms_crypto.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_cluster.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

static int hex_decode16(const char *s, uint8_t out[16])
{
    size_t n = 0;
    if (s == NULL || strlen(s) != 32 || kms_hex_decode_ct(s, 32, out, 16, &n, NULL) != 0 ||
        n != 16) {
        return -1;
    }
    return 0;
}

static char *ip_text(const ProtobufCBinaryData *ip)
{
    char buf[64] = "";
    if (ip->len == 4) {
        snprintf(buf, sizeof(buf), "%u.%u.%u.%u", ip->data[0], ip->data[1], ip->data[2],
                 ip->data[3]);
    } else if (ip->len == 16) {
        size_t o = 0;
        for (int i = 0; i < 16; i += 2) {
            o += (size_t)snprintf(buf + o, sizeof(buf) - o, i ? ":%x" : "%x",
                                  (ip->data[i] << 8) | ip->data[i + 1]);
        }
    }
    return strdup(buf);
}

static int key_info_fill(Kmsd__V1__KeyInfo *ki, const Kmsd__V1__SealedRecord *rec)
{
    char *hex = malloc(33);
    if (hex == NULL) {
        return KMS_ENOMEM;
    }
    if (kms_hex_encode_ct(rec->key_id.data, rec->key_id.len, hex, 33, NULL) != 0) {
        hex[0] = '\0';
    }
    kmsd__v1__key_info__init(ki);
    ki->key_id = hex;
    ki->node_uuid = strdup(rec->node_uuid != NULL ? rec->node_uuid : "");
    ki->term = rec->term;
    ki->created_at = rec->created_at;
    ki->source_ip = ip_text(&rec->source_ip);
    ki->last_access_at = rec->last_access_at;
    ki->revoked_at = rec->revoked_at;
    ki->origin_term = rec->origin_term;
    return 0;
}

static void key_info_clear(Kmsd__V1__KeyInfo *ki)
{
    free(ki->key_id);
    free(ki->node_uuid);
    free(ki->source_ip);
}

/* KeysList paging (cluster.proto): default and maximum page size. */
#define KEYS_PAGE_MAX 1000u
#define KEYS_LIST_MORE 1 /* keys_list_each: page full, one more key exists */

struct keys_ctx {
    Kmsd__V1__KeyInfo *ki;
    size_t n, cap;
    size_t limit; /* page size; 0 = unbounded (KeysRevoke and friends) */
    /* KeysList filters (cluster.proto); 0/false = off */
    int64_t unused_since;
    bool revoked;
    uint32_t term;
};

/* KeysList filters: unused since (last access, or creation when never
 * used, before the bound), revoked only, on one term only. */
static bool keys_filter_match(const struct keys_ctx *c, const Kmsd__V1__SealedRecord *rec)
{
    int64_t used = rec->last_access_at != 0 ? rec->last_access_at : rec->created_at;

    if (c->unused_since > 0 && used >= c->unused_since) {
        return false;
    }
    if (c->revoked && rec->revoked_at == 0) {
        return false;
    }
    if (c->term != 0 && rec->term != c->term) {
        return false;
    }
    return true;
}

static int keys_list_each(void *arg, const Kmsd__V1__SealedRecord *rec)
{
    struct keys_ctx *c = arg;
    if (!keys_filter_match(c, rec)) {
        return 0;
    }
    if (c->limit > 0 && c->n == c->limit) {
        return KEYS_LIST_MORE;
    }
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        Kmsd__V1__KeyInfo *ki = realloc(c->ki, cap * sizeof(*ki));
        if (ki == NULL) {
            return KMS_ENOMEM;
        }
        c->ki = ki;
        c->cap = cap;
    }
    if (key_info_fill(&c->ki[c->n], rec) != 0) {
        return KMS_ENOMEM;
    }
    c->n++;
    return 0;
}

int kmsd_op_keys_list_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__KeysListRequest *r = (const Kmsd__V1__KeysListRequest *)c->req;
    Kmsd__V1__KeysListResponse resp = KMSD__V1__KEYS_LIST_RESPONSE__INIT;
    Kmsd__V1__KeyInfo **ptrs = NULL;
    struct keys_ctx k = {NULL, 0, 0, KEYS_PAGE_MAX, 0, false, 0};
    uint8_t after[16];
    char next[33] = "";
    int rc;

    if (r->page_size > 0 && r->page_size < KEYS_PAGE_MAX) {
        k.limit = r->page_size;
    }
    k.unused_since = r->unused_since;
    k.revoked = r->revoked;
    k.term = r->term;
    if (r->page_token != NULL && r->page_token[0] != '\0' &&
        (strlen(r->page_token) != 32 ||
         kms_hex_decode_ct(r->page_token, 32, after, sizeof(after), NULL, NULL) != 0)) {
        rc = kms_err_set(&c->err, KMS_EINVAL, "invalid page token");
        goto out;
    }
    /* Operator reads reflect every write acknowledged before the call,
     * whichever replica acknowledged it. */
    (void)kmsd_read_barrier(d, d->opt.request_wait_ms);
    rc = kms_store_records_list_after(
        d->store, r->node_uuid != NULL && r->node_uuid[0] ? r->node_uuid : NULL,
        r->page_token != NULL && r->page_token[0] != '\0' ? after : NULL, keys_list_each, &k,
        &c->err);
    if (rc == KEYS_LIST_MORE) {
        rc = 0;
        snprintf(next, sizeof(next), "%s", k.ki[k.n - 1].key_id);
    }
    if (rc != 0) {
        if (c->err.msg[0] == '\0') {
            kms_err_set(&c->err, rc, NULL);
        }
        goto out;
    }
    ptrs = calloc(k.n + 1, sizeof(*ptrs));
    if (ptrs == NULL) {
        rc = kms_err_set(&c->err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < k.n; i++) {
        ptrs[i] = &k.ki[i];
    }
    resp.n_keys = k.n;
    resp.keys = ptrs;
    resp.next_page_token = next;
    kmsd_call_reply(c, &resp.base);
out:
    for (size_t i = 0; i < k.n; i++) {
        key_info_clear(&k.ki[i]);
    }
    free(k.ki);
    free(ptrs);
    return rc;
}

int kmsd_op_keys_show_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__KeysShowRequest *r = (const Kmsd__V1__KeysShowRequest *)c->req;
    Kmsd__V1__KeysShowResponse resp = KMSD__V1__KEYS_SHOW_RESPONSE__INIT;
    Kmsd__V1__SealedRecord *rec = NULL;
    Kmsd__V1__KeyInfo ki;
    uint8_t id[16];
    int rc;

    kmsd__v1__key_info__init(&ki);
    ki.key_id = ki.node_uuid = ki.source_ip = NULL;
    if (hex_decode16(r->key_id, id) != 0) {
        rc = kms_err_set(&c->err, KMS_EINVAL, "key id must be 32 hex digits");
        goto out;
    }
    kmsd_call_note(c, "key_id=%.32s", r->key_id);
    (void)kmsd_read_barrier(d, d->opt.request_wait_ms);
    if ((rc = kms_store_record_get(d->store, id, &rec, &c->err)) != 0) {
        if (rc == KMS_ENOTFOUND) {
            kms_err_set(&c->err, rc, "no such key");
        }
        goto out;
    }
    if (key_info_fill(&ki, rec) != 0) {
        rc = kms_err_set(&c->err, KMS_ENOMEM, "out of memory");
        goto out;
    }
    resp.key = &ki;
    kmsd_call_reply(c, &resp.base);
out:
    key_info_clear(&ki);
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    return rc;
}

int kmsd_op_keys_revoke_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    const Kmsd__V1__KeysRevokeRequest *r = (const Kmsd__V1__KeysRevokeRequest *)c->req;
    Kmsd__V1__KeysRevokeResponse resp = KMSD__V1__KEYS_REVOKE_RESPONSE__INIT;
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__RevokeKey rk = KMSD__V1__REVOKE_KEY__INIT;
    Kmsd__V1__RevokeNode rn = KMSD__V1__REVOKE_NODE__INIT;
    struct kmsd_write_result res;
    uint8_t id[16];
    int rc;

    e.version = 1;
    if (r->key_id != NULL && r->key_id[0] != '\0') {
        if (hex_decode16(r->key_id, id) != 0) {
            return kms_err_set(&c->err, KMS_EINVAL, "key id must be 32 hex digits");
        }
        rk.key_id.data = id;
        rk.key_id.len = 16;
        rk.revoked_at = kms_wall_ms();
        e.op_case = KMSD__V1__ENTRY__OP_REVOKE_KEY;
        e.revoke_key = &rk;
        kmsd_call_note(c, "key_id=%.32s", r->key_id);
    } else if (r->node_uuid != NULL && r->node_uuid[0] != '\0') {
        rn.node_uuid = r->node_uuid;
        rn.revoked_at = kms_wall_ms();
        e.op_case = KMSD__V1__ENTRY__OP_REVOKE_NODE;
        e.revoke_node = &rn;
        kmsd_call_note(c, "node_uuid=%.100s", r->node_uuid);
    } else {
        return kms_err_set(&c->err, KMS_EINVAL, "give a key id or a node UUID");
    }
    if ((rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, &c->err)) != 0) {
        return rc;
    }
    if (res.code != 0) {
        return kms_err_set(&c->err, res.code, "%s",
                           res.code == KMS_ENOTFOUND ? "no such key" : res.msg);
    }
    resp.revoked = e.op_case == KMSD__V1__ENTRY__OP_REVOKE_KEY ? 1 : res.count;
    kmsd_call_reply(c, &resp.base);
    return 0;
}
