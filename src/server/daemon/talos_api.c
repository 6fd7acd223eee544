/*
 * The Talos API: sidero.kms.KMSService Seal and Unseal (DESIGN §5).
 *
 * Talos dials a new TLS connection for every RPC with a 10 s deadline and
 * destroys a LUKS key slot when an OK reply carries wrong bytes, so every
 * failure here is a gRPC status, never OK with other data:
 *   INVALID_ARGUMENT  malformed request or blob
 *   NOT_FOUND         unknown key id
 *   PERMISSION_DENIED UUID mismatch, revoked key, enrolment policy
 *   UNAVAILABLE       sealed, no leader/lease within request_wait, rate limited
 *
 * Handlers run on gRPC worker threads. Unseal never touches the raft thread:
 * blob -> RocksDB get -> decrypt -> reply. Seal encrypts here and commits
 * through kmsd_write (local propose or forward to the leader).
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"

#include "kmsd/v1/entry.pb-c.h"
#include "sidero/kms/kms.pb-c.h"

int kmsd_grpc_status(int code)
{
    switch (code) {
    case KMS_OK:
        return GRPC_STATUS_OK;
    case KMS_EINVAL:
    case KMS_EFORMAT:
    case KMS_ECHECKSUM:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case KMS_ENOTFOUND:
        return GRPC_STATUS_NOT_FOUND;
    case KMS_EDENIED:
    case KMS_EREVOKED:
        return GRPC_STATUS_PERMISSION_DENIED;
    case KMS_EEXIST:
        return GRPC_STATUS_ALREADY_EXISTS;
    case KMS_ESEALED:
    case KMS_EUNINIT:
    case KMS_EAUTH:
    case KMS_EDUP:
    case KMS_ETOOFEW:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case KMS_ERANGE:
        return GRPC_STATUS_OUT_OF_RANGE;
    default:
        return GRPC_STATUS_UNAVAILABLE;
    }
}

/* Normalises a peer address to 16 bytes (IPv4 as v4-mapped IPv6). */
static void ip16(const uint8_t *ip, size_t len, uint8_t out[16])
{
    memset(out, 0, 16);
    if (len == 4) {
        out[10] = 0xff;
        out[11] = 0xff;
        memcpy(out + 12, ip, 4);
    } else if (len == 16) {
        memcpy(out, ip, 16);
    }
}

/* The caller's address as reported (4 or 16 bytes; iplen 0 if unknown) and
 * normalised to 16 bytes for the limiter and CIDR checks. */
static void peer_addr(struct kms_rpc_call *call, uint8_t raw[16], size_t *len, uint8_t ip[16])
{
    if (kms_rpc_call_peer_ip(call, raw, len) != 0) {
        *len = 0;
    }
    ip16(raw, *len, ip);
}

static size_t rate_slot(const uint8_t ip[16])
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++) {
        h = (h ^ ip[i]) * 16777619u;
    }
    return h % KMSD_RATE_SLOTS;
}

bool kmsd_rate_limited(struct kmsd *d, const uint8_t ip[16])
{
    bool limited = false;
    size_t i = rate_slot(ip);
    uint64_t now = kms_mono_ms();

    if (d->opt.failed_unseals_per_minute == 0) {
        return false;
    }
    pthread_mutex_lock(&d->rate_mu);
    struct kmsd_rate_slot *s = &d->rate[i];
    if (memcmp(s->ip, ip, 16) == 0 && now - s->window_start_ms < 60000 &&
        s->failures >= d->opt.failed_unseals_per_minute) {
        limited = true;
    }
    pthread_mutex_unlock(&d->rate_mu);
    return limited;
}

void kmsd_rate_fail(struct kmsd *d, const uint8_t ip[16])
{
    size_t i = rate_slot(ip);
    uint64_t now = kms_mono_ms();

    pthread_mutex_lock(&d->rate_mu);
    struct kmsd_rate_slot *s = &d->rate[i];
    if (memcmp(s->ip, ip, 16) != 0 || now - s->window_start_ms >= 60000) {
        /* A colliding address takes the slot over: the limiter is best
         * effort and never blocks an address it has not seen fail. */
        memcpy(s->ip, ip, 16);
        s->window_start_ms = now;
        s->failures = 0;
    }
    s->failures++;
    pthread_mutex_unlock(&d->rate_mu);
}

static bool cidr_match(const struct kmsd_cidr *c, const uint8_t ip[16])
{
    unsigned bits = c->prefix;
    for (unsigned i = 0; i < 16 && bits > 0; i++) {
        unsigned take = bits >= 8 ? 8 : bits;
        uint8_t mask = (uint8_t)(0xff << (8 - take));
        if ((c->addr[i] & mask) != (ip[i] & mask)) {
            return false;
        }
        bits -= take;
    }
    return true;
}

static bool enrolment_allowed(struct kmsd *d, const uint8_t ip[16], const char *uuid)
{
    bool ok;
    if (d->opt.n_cidrs > 0) {
        ok = false;
        for (size_t i = 0; i < d->opt.n_cidrs && !ok; i++) {
            ok = cidr_match(&d->opt.cidrs[i], ip);
        }
        if (!ok) {
            return false;
        }
    }
    if (d->opt.n_uuids > 0) {
        ok = false;
        for (size_t i = 0; i < d->opt.n_uuids && !ok; i++) {
            ok = strcasecmp(d->opt.uuids[i], uuid) == 0;
        }
        if (!ok) {
            return false;
        }
    }
    return true;
}

/* Key ids in logs: hex of the 16-byte id (kid must hold 33 bytes). */
static void key_hex(const uint8_t *id, size_t len, char kid[33])
{
    if (kms_hex_encode_ct(id, len, kid, 33, NULL) != 0) {
        kid[0] = '\0';
    }
}

static void count(struct kmsd *d, const char *op, int grpc_code)
{
    if (grpc_code >= 0 && grpc_code < KMSD_METRIC_CODES) {
        atomic_fetch_add(&d->metrics.requests[op[0] == 's' ? 0 : 1][grpc_code], 1);
    }
}

static void reply(struct kmsd *d, struct kms_rpc_call *call, const char *op,
                  const uint8_t *data, size_t len)
{
    Sidero__Kms__Response resp = SIDERO__KMS__RESPONSE__INIT;
    uint8_t buf[128];
    size_t n;

    resp.data.data = (uint8_t *)data;
    resp.data.len = len;
    n = protobuf_c_message_get_packed_size(&resp.base);
    if (n > sizeof(buf)) {
        kms_rpc_call_finish(call, GRPC_STATUS_INTERNAL, "reply too large", NULL, 0);
        return;
    }
    protobuf_c_message_pack(&resp.base, buf);
    count(d, op, GRPC_STATUS_OK);
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, buf, n);
    OPENSSL_cleanse(buf, sizeof(buf));
}

static void fail(struct kmsd *d, struct kms_rpc_call *call, const char *op, int code,
                 const char *msg, const char *peer)
{
    count(d, op, kmsd_grpc_status(code));
    kms_log(KMS_LOG_INFO, "talos", "request failed", "op", op, "error",
            kms_errname(code), "detail", msg, "peer", peer, NULL);
    kms_rpc_call_finish(call, kmsd_grpc_status(code), msg, NULL, 0);
}

static void seal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t reqlen)
{
    struct kmsd *d = arg;
    Sidero__Kms__Request *r = NULL;
    Kmsd__V1__SealedRecord *rec = NULL;
    struct kms_keyring *kr = NULL;
    struct kms_err err;
    struct kmsd_write_result res;
    uint8_t blob[KMS_BLOB_MAX];
    size_t bloblen = 0;
    uint8_t ip[16], ipraw[16];
    size_t iplen = 0;
    const char *peer = kms_rpc_call_peer(call);
    char kid[33];
    int rc;

    kms_err_clear(&err);
    peer_addr(call, ipraw, &iplen, ip);
    r = sidero__kms__request__unpack(NULL, reqlen, req);
    if (r == NULL) {
        fail(d, call, "seal", KMS_EINVAL, "malformed request", peer);
        goto out;
    }
    if (!enrolment_allowed(d, ip, r->node_uuid != NULL ? r->node_uuid : "")) {
        fail(d, call, "seal", KMS_EDENIED, "enrolment policy refuses this node", peer);
        goto out;
    }
    kr = kmsd_keyring_get(d);
    if (kr == NULL) {
        fail(d, call, "seal", KMS_EUNAVAIL, "node is sealed", peer);
        goto out;
    }
    rc = kms_seal(kr, r->node_uuid, r->data.data, r->data.len, kms_wall_ms(), ipraw, iplen,
                  &rec, blob, &bloblen, &err);
    if (rc != 0) {
        fail(d, call, "seal", rc, err.msg, peer);
        goto out;
    }
    {
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
        e.version = 1;
        pr.record = rec;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
        e.put_record = &pr;
        rc = kmsd_write(d, &e, d->opt.request_wait_ms, &res, &err);
    }
    if (rc != 0) {
        fail(d, call, "seal", KMS_EUNAVAIL, err.msg, peer);
        goto out;
    }
    if (res.code != 0) {
        fail(d, call, "seal", KMS_EUNAVAIL, res.msg, peer);
        goto out;
    }
    key_hex(rec->key_id.data, rec->key_id.len, kid);
    kms_log(KMS_LOG_INFO, "audit", "seal", "key_id", kid, "node_uuid", r->node_uuid,
            "peer", peer, NULL);
    reply(d, call, "seal", blob, bloblen);
out:
    OPENSSL_cleanse(blob, sizeof(blob));
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    if (r != NULL) {
        OPENSSL_cleanse(r->data.data, r->data.len);
        sidero__kms__request__free_unpacked(r, NULL);
    }
}

static void unseal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t reqlen)
{
    struct kmsd *d = arg;
    Sidero__Kms__Request *r = NULL;
    Kmsd__V1__SealedRecord *rec = NULL;
    struct kms_keyring *kr = NULL;
    struct kms_err err;
    uint8_t key_id[16], client_half[32];
    uint8_t data[KMS_BLOB_MAX];
    size_t datalen = 0;
    uint8_t ip[16], ipraw[16];
    size_t iplen = 0;
    const char *peer = kms_rpc_call_peer(call);
    char kid[33];
    int rc;

    kms_err_clear(&err);
    peer_addr(call, ipraw, &iplen, ip);
    if (kmsd_rate_limited(d, ip)) {
        fail(d, call, "unseal", KMS_EUNAVAIL, "too many failed unseals from this address; retry later",
             peer);
        goto out;
    }
    r = sidero__kms__request__unpack(NULL, reqlen, req);
    if (r == NULL) {
        kmsd_rate_fail(d, ip);
        fail(d, call, "unseal", KMS_EINVAL, "malformed request", peer);
        goto out;
    }
    rc = kms_blob_parse(r->data.data, r->data.len, key_id, client_half, &err);
    if (rc != 0) {
        kmsd_rate_fail(d, ip);
        fail(d, call, "unseal", KMS_EINVAL, err.msg, peer);
        goto out;
    }
    key_hex(key_id, 16, kid);
    if (kmsd_wait_readable(d, d->opt.request_wait_ms) != 0) {
        fail(d, call, "unseal", KMS_EUNAVAIL, "no read lease: cluster quorum unreachable", peer);
        goto out;
    }
    rc = kms_store_record_get(d->store, key_id, &rec, &err);
    if (rc == KMS_ENOTFOUND && kmsd_read_barrier(d, d->opt.request_wait_ms) == 0) {
        /* Sealed through another replica a moment ago? Catch up with the
         * leader's commit index once before saying NOT_FOUND. */
        kms_err_clear(&err);
        rc = kms_store_record_get(d->store, key_id, &rec, &err);
    }
    if (rc != 0) {
        kmsd_rate_fail(d, ip);
        fail(d, call, "unseal", rc == KMS_ENOTFOUND ? KMS_ENOTFOUND : KMS_EUNAVAIL,
             rc == KMS_ENOTFOUND ? "unknown key" : err.msg, peer);
        goto out;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        kr = kmsd_keyring_get(d);
        if (kr == NULL) {
            fail(d, call, "unseal", KMS_EUNAVAIL, "node is sealed", peer);
            goto out;
        }
        rc = kms_unseal(kr, rec, r->node_uuid, r->data.data, r->data.len, data, &datalen, &err);
        if (rc != KMS_ENOTFOUND || attempt == 1) {
            break;
        }
        /* The record's term came from a rotation this node has not loaded
         * yet: pick the new keyring up and try once more. */
        kms_keyring_unref(kr);
        kr = NULL;
        kmsd_keyring_refresh(d);
    }
    if (rc != 0) {
        kmsd_rate_fail(d, ip);
        if (rc == KMS_ENOTFOUND || rc == KMS_EAUTH) {
            rc = rc == KMS_EAUTH ? KMS_EDENIED : KMS_EUNAVAIL;
        }
        kms_log(KMS_LOG_WARN, "audit", "unseal refused", "key_id", kid, "node_uuid",
                r->node_uuid, "peer", peer, "error", kms_errname(rc), NULL);
        fail(d, call, "unseal", rc, err.msg, peer);
        goto out;
    }
    kms_log(KMS_LOG_INFO, "audit", "unseal", "key_id", kid, "node_uuid", r->node_uuid,
            "peer", peer, NULL);
    reply(d, call, "unseal", data, datalen);
out:
    OPENSSL_cleanse(data, sizeof(data));
    OPENSSL_cleanse(client_half, sizeof(client_half));
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    if (r != NULL) {
        sidero__kms__request__free_unpacked(r, NULL);
    }
}

int kmsd_talos_register(struct kmsd *d, struct kms_rpc_server *srv)
{
    int rc;
    if ((rc = kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Seal", seal_cb, d)) != 0) {
        return rc;
    }
    return kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Unseal", unseal_cb, d);
}
