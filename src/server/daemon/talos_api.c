/*
 * The Talos API: sidero.kms.KMSService Seal and Unseal (docs/talos.md).
 *
 * Talos dials a new TLS connection for every RPC with a 10 s deadline and
 * destroys a LUKS key slot when an OK reply carries wrong bytes, so every
 * failure here is a gRPC status, never OK with other data:
 *   INVALID_ARGUMENT  malformed request or blob
 *   NOT_FOUND         unknown key id
 *   PERMISSION_DENIED UUID mismatch, revoked key, enrolment policy
 *   UNAVAILABLE       sealed, no leader/lease within request_wait; a *failing*
 *                     unseal from a limited address (never a valid one)
 *   RESOURCE_EXHAUSTED a Seal over a quota (rate per address / node UUID,
 *                     live keys per node UUID)
 *
 * Handlers start on gRPC worker threads and never wait there:
 *  - Unseal answers on the worker when it can right now (read lease valid
 *    and the record found, or a definitive refusal): blob -> RocksDB get ->
 *    decrypt -> reply, without the raft thread. Otherwise (no lease yet, or
 *    a miss that must be proven fresh) the call is parked on the daemon's
 *    wait pool, which waits up to requestWait and completes it.
 *  - Seal checks the request on the worker, then parks the call on the
 *    write pool, which encrypts and commits it through kmsd_write (local
 *    propose or forward to the leader) and completes it.
 * Every local read follows the lease deadline rule of kms_raft.h
 * (unseal_read). NOT_FOUND is answered only for a miss read under a valid
 * lease after catching up with the leader's commit index; when that cannot
 * be proven within the budget the answer is UNAVAILABLE (Talos retries),
 * never NOT_FOUND.
 *
 * This file: the answers, limits and checks both methods share
 * (talos_internal.h), the metrics helpers, and Seal. Unseal, its lease
 * reads and its wait for a lease: talos_unseal.c.
 */
#include <arpa/inet.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_touch.h"
#include "kmsd_limit.h"
#include "kmsd_pool.h"
#include "talos_internal.h"

#include "kmsd/v1/entry.pb-c.h"
#include "sidero/kms/kms.pb-c.h"

const char *kmsd_grpc_code_name(int grpc_code)
{
    static const char *const names[KMSD_METRIC_CODES] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED"};
    return grpc_code >= 0 && grpc_code < KMSD_METRIC_CODES ? names[grpc_code] : "UNKNOWN";
}

void kmsd_hist_observe(struct kmsd_hist *h, uint64_t us)
{
    static const uint64_t bounds[KMSD_HIST_BUCKETS] = KMSD_HIST_BOUNDS_US;
    size_t i = 0;
    while (i < KMSD_HIST_BUCKETS && us > bounds[i]) {
        i++;
    }
    atomic_fetch_add_explicit(&h->bucket[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, us, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

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
    case KMS_EQUOTA:
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    default:
        return GRPC_STATUS_UNAVAILABLE;
    }
}

/* ---- what Seal and Unseal share (talos_internal.h) ------------------- */

#define NODE_UUID_INVALID "node uuid must be 1..128 printable ASCII characters"

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

void talos_peer_addr(struct kms_rpc_call *call, uint8_t raw[16], size_t *len, uint8_t ip[16])
{
    if (kms_rpc_call_peer_ip(call, raw, len) != 0) {
        *len = 0;
    }
    ip16(raw, *len, ip);
}

/* ---- limits (kmsd_limit.h; docs/security.md "Limits") ---------------- */

#define LIMIT_TABLE 4096 /* entries per limiter: fixed memory, LRU eviction */
#define LIMIT_WINDOW_MS 60000u
#define LIMIT_LOG_EVERY_MS 10000u

int kmsd_talos_init(struct kmsd *d, struct kms_err *err)
{
    int rc;
    pthread_mutex_init(&d->lease_wake.mu, NULL);
    kms_cond_init_mono(&d->lease_wake.cv);
    atomic_init(&d->lease_wake.waiters, 0);
    d->lease_wake.made = true;
    if ((rc = kmsd_limiter_new(LIMIT_TABLE, d->opt.failed_unseals_per_minute,
                               d->opt.failed_unseals_global_per_minute, LIMIT_WINDOW_MS,
                               &d->unseal_fail_lim, err)) != 0 ||
        (rc = kmsd_limiter_new(LIMIT_TABLE, d->opt.seals_per_minute, 0, LIMIT_WINDOW_MS,
                               &d->seal_addr_lim, err)) != 0 ||
        (rc = kmsd_limiter_new(LIMIT_TABLE, d->opt.seals_per_node_per_minute, 0, LIMIT_WINDOW_MS,
                               &d->seal_uuid_lim, err)) != 0) {
        kmsd_talos_free(d);
        return kms_err_wrap(err, rc, "Talos API limits");
    }
    return 0;
}

void kmsd_talos_free(struct kmsd *d)
{
    kmsd_limiter_free(d->unseal_fail_lim);
    kmsd_limiter_free(d->seal_addr_lim);
    kmsd_limiter_free(d->seal_uuid_lim);
    d->unseal_fail_lim = d->seal_addr_lim = d->seal_uuid_lim = NULL;
    if (d->lease_wake.made) {
        d->lease_wake.made = false;
        pthread_cond_destroy(&d->lease_wake.cv);
        pthread_mutex_destroy(&d->lease_wake.mu);
    }
}

void talos_limit_log(struct talos_limit_log *l, const char *what, const char *peer,
                     const char *detail)
{
    uint64_t now = kms_mono_ms(), next = atomic_load(&l->next_ms);
    char n[24];
    if (now < next || !atomic_compare_exchange_strong(&l->next_ms, &next,
                                                       now + LIMIT_LOG_EVERY_MS)) {
        atomic_fetch_add(&l->suppressed, 1);
        return;
    }
    snprintf(n, sizeof(n), "%llu", (unsigned long long)atomic_exchange(&l->suppressed, 0));
    kms_log(KMS_LOG_WARN, "talos", what, "peer", peer, "detail", detail, "suppressed", n, NULL);
}

static struct talos_limit_log seal_limit_log;

bool kmsd_cidr_match(const struct kms_config_cidr *c, const uint8_t ip[16])
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
            ok = kmsd_cidr_match(&d->opt.cidrs[i], ip);
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

int talos_request_open(struct kmsd *d, int m, const uint8_t ip[16], const uint8_t *req,
                       size_t reqlen, Sidero__Kms__Request **out, const char **msg)
{
    Sidero__Kms__Request *r = sidero__kms__request__unpack(NULL, reqlen, req);

    *out = r;
    if (r == NULL) {
        *msg = "malformed request";
        return KMS_EINVAL;
    }
    if (!kms_node_uuid_valid(r->node_uuid)) {
        *msg = NODE_UUID_INVALID;
        return KMS_EINVAL;
    }
    if (!enrolment_allowed(d, ip, r->node_uuid != NULL ? r->node_uuid : "")) {
        atomic_fetch_add(&d->metrics.policy_denied[m], 1);
        *msg = "enrolment policy refuses this node";
        return KMS_EDENIED;
    }
    return 0;
}

void talos_key_hex(const uint8_t *id, size_t len, char kid[33])
{
    if (kms_hex_encode_ct(id, len, kid, 33, NULL) != 0) {
        kid[0] = '\0';
    }
}

unsigned talos_budget_left(struct kmsd *d, struct kms_rpc_call *call, uint64_t t0)
{
    uint64_t now = kms_mono_ms();
    uint64_t end = t0 + d->opt.request_wait_ms;
    if (now >= end || atomic_load(&d->stopping) || kms_rpc_call_done(call)) {
        return 0;
    }
    return (unsigned)(end - now);
}

void talos_count(struct kmsd *d, struct kms_rpc_call *call, const char *op, int grpc_code)
{
    int m = op[0] == 's' ? 0 : 1;
    if (grpc_code >= 0 && grpc_code < KMSD_METRIC_CODES) {
        atomic_fetch_add(&d->metrics.requests[m][grpc_code], 1);
    }
    kmsd_hist_observe(&d->metrics.talos_latency[m], kms_rpc_call_age_us(call));
}

void talos_reply(struct kmsd *d, struct kms_rpc_call *call, const char *op, const uint8_t *data,
                 size_t len)
{
    Sidero__Kms__Response resp = SIDERO__KMS__RESPONSE__INIT;
    uint8_t buf[128];
    size_t n;

    if (kms_rpc_call_done(call)) {
        /* The listener closed meanwhile and answered UNAVAILABLE. */
        kms_rpc_call_finish(call, GRPC_STATUS_UNAVAILABLE, NULL, NULL, 0);
        return;
    }
    resp.data.data = (uint8_t *)data;
    resp.data.len = len;
    n = protobuf_c_message_get_packed_size(&resp.base);
    if (n > sizeof(buf)) {
        kms_rpc_call_finish(call, GRPC_STATUS_INTERNAL, "reply too large", NULL, 0);
        return;
    }
    protobuf_c_message_pack(&resp.base, buf);
    talos_count(d, call, op, GRPC_STATUS_OK);
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, buf, n);
    OPENSSL_cleanse(buf, sizeof(buf));
}

void talos_fail(struct kmsd *d, struct kms_rpc_call *call, const char *op, int code,
                const char *msg, const char *peer)
{
    if (kms_rpc_call_done(call)) {
        kms_rpc_call_finish(call, GRPC_STATUS_UNAVAILABLE, NULL, NULL, 0);
        return;
    }
    talos_count(d, call, op, kmsd_grpc_status(code));
    kms_log(KMS_LOG_INFO, "talos", "request failed", "op", op, "error",
            kms_errname(code), "detail", msg, "peer", peer, NULL);
    kms_rpc_call_finish(call, kmsd_grpc_status(code), msg, NULL, 0);
}

/* ---- Seal ---------------------------------------------------------- */

/* A parked Seal: everything the write pool needs, owned by the job. */
struct seal_job {
    struct kmsd *d;
    struct kms_rpc_call *call;
    Sidero__Kms__Request *r;
    uint8_t ipraw[16];
    size_t iplen;
    uint64_t t0; /* arrival, kms_mono_ms() */
};

static void seal_job_free(struct seal_job *j)
{
    if (j->r != NULL) {
        OPENSSL_cleanse(j->r->data.data, j->r->data.len);
        sidero__kms__request__free_unpacked(j->r, NULL);
    }
    free(j);
}

/* Write pool thread: encrypt, commit (propose or forward, wait for apply). */
static void seal_run_cb(void *arg)
{
    struct seal_job *j = arg;
    struct kmsd *d = j->d;
    struct kms_rpc_call *call = j->call;
    Sidero__Kms__Request *r = j->r;
    Kmsd__V1__SealedRecord *rec = NULL;
    struct kms_keyring *kr = NULL;
    struct kms_err err;
    struct kmsd_write_result res;
    uint8_t blob[KMS_BLOB_MAX];
    size_t bloblen = 0;
    const char *peer = kms_rpc_call_peer(call);
    unsigned left;
    char kid[33];
    int rc;

    kms_err_clear(&err);
    left = talos_budget_left(d, call, j->t0);
    if (left == 0) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL, "no time left to commit the seal", peer);
        goto out;
    }
    if (d->opt.records_per_node > 0 && r->node_uuid != NULL && r->node_uuid[0] != '\0') {
        uint64_t live = 0;
        /* This replica's applied state: a bound within replication lag. */
        if (kms_store_records_count_live(d->store, r->node_uuid, d->opt.records_per_node, &live,
                                         NULL) == 0 &&
            live >= d->opt.records_per_node) {
            char msg[200];
            atomic_fetch_add(&d->metrics.seal_quota[2], 1);
            snprintf(msg, sizeof(msg),
                     "seal quota: node UUID already has %u live keys "
                     "(rateLimit.recordsPerNode); revoke old ones with kmsctl keys revoke",
                     d->opt.records_per_node);
            talos_limit_log(&seal_limit_log, "seal refused by a quota", peer, msg);
            talos_fail(d, call, "seal", KMS_EQUOTA, msg, peer);
            goto out;
        }
    }
    kr = kmsd_keyring_get(d);
    if (kr == NULL) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL, "node is sealed", peer);
        goto out;
    }
    rc = kms_seal(kr, r->node_uuid, r->data.data, r->data.len, kms_wall_ms(), j->ipraw,
                  j->iplen, &rec, blob, &bloblen, &err);
    if (rc != 0) {
        talos_fail(d, call, "seal", rc, err.msg, peer);
        goto out;
    }
    {
        Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
        Kmsd__V1__PutRecord pr = KMSD__V1__PUT_RECORD__INIT;
        e.version = 1;
        pr.record = rec;
        e.op_case = KMSD__V1__ENTRY__OP_PUT_RECORD;
        e.put_record = &pr;
        rc = kmsd_write(d, &e, left, &res, &err);
    }
    if (rc != 0) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL, err.msg, peer);
        goto out;
    }
    if (res.code != 0) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL, res.msg, peer);
        goto out;
    }
    /* OK only for a record this node can read back exactly as sealed: an
     * answer from a leader that did not store it never reaches Talos. */
    if (kmsd_record_readback(d, rec, &err) != 0) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL, err.msg, peer);
        goto out;
    }
    talos_key_hex(rec->key_id.data, rec->key_id.len, kid);
    kms_log(KMS_LOG_INFO, "audit", "seal", "key_id", kid, "node_uuid", r->node_uuid,
            "peer", peer, NULL);
    talos_reply(d, call, "seal", blob, bloblen);
out:
    OPENSSL_cleanse(blob, sizeof(blob));
    if (rec != NULL) {
        kmsd__v1__sealed_record__free_unpacked(rec, NULL);
    }
    if (kr != NULL) {
        kms_keyring_unref(kr);
    }
    seal_job_free(j);
}

/* The rate quotas of a Seal (per source address, per node UUID): 0 when
 * allowed (and counted), KMS_EQUOTA with msg otherwise. */
static int seal_quota(struct kmsd *d, const uint8_t ip[16], const char *uuid, char *msg,
                      size_t msglen)
{
    uint8_t k[16];
    size_t kl = kmsd_limit_addr_key(ip, k);
    uint64_t now = kms_mono_ms();

    if (!kmsd_limiter_take(d->seal_addr_lim, k, kl, now, NULL)) {
        atomic_fetch_add(&d->metrics.seal_quota[0], 1);
        snprintf(msg, msglen,
                 "seal quota: more than %u seals per minute from this address "
                 "(rateLimit.sealsPerMinute); retry later",
                 d->opt.seals_per_minute);
        return KMS_EQUOTA;
    }
    if (!kmsd_limiter_take(d->seal_uuid_lim, uuid, strlen(uuid), now, NULL)) {
        atomic_fetch_add(&d->metrics.seal_quota[1], 1);
        snprintf(msg, msglen,
                 "seal quota: more than %u seals per minute for this node UUID "
                 "(rateLimit.sealsPerNodePerMinute); retry later",
                 d->opt.seals_per_node_per_minute);
        return KMS_EQUOTA;
    }
    return 0;
}

/* CQ worker: checks that need no waiting, then parks the call on the write
 * pool (a seal always waits for a commit). */
static void seal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t reqlen)
{
    struct kmsd *d = arg;
    struct seal_job *j = NULL;
    uint8_t ip[16];
    const char *peer = kms_rpc_call_peer(call);
    const char *why;
    char msg[160];
    int rc;

    j = calloc(1, sizeof(*j));
    if (j == NULL) {
        talos_fail(d, call, "seal", KMS_ENOMEM, "out of memory", peer);
        goto out;
    }
    j->d = d;
    j->call = call;
    j->t0 = kms_mono_ms();
    talos_peer_addr(call, j->ipraw, &j->iplen, ip);
    if ((rc = talos_request_open(d, 0, ip, req, reqlen, &j->r, &why)) != 0) {
        talos_fail(d, call, "seal", rc, why, peer);
        goto out;
    }
    if (!kmsd_is_unsealed(d)) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL, "node is sealed", peer);
        goto out;
    }
    if ((rc = seal_quota(d, ip, j->r->node_uuid != NULL ? j->r->node_uuid : "", msg,
                         sizeof(msg))) != 0) {
        talos_limit_log(&seal_limit_log, "seal refused by a quota", peer, msg);
        talos_fail(d, call, "seal", KMS_EQUOTA, msg, peer);
        goto out;
    }
    if ((rc = kmsd_pool_submit(d->write_pool, seal_run_cb, j)) != 0) {
        talos_fail(d, call, "seal", KMS_EUNAVAIL,
                   rc == KMS_EBUSY ? "too many seals waiting; retry later" : "shutting down",
                   peer);
        goto out;
    }
    j = NULL; /* the pool owns it */
out:
    if (j != NULL) {
        seal_job_free(j);
    }
}

/* kms_rpc_server_set_abort_hook: the stopping thread of a Talos server. */
static void talos_abort_cb(void *arg)
{
    kmsd_talos_wake(arg);
}

int kmsd_talos_register(struct kmsd *d, struct kms_rpc_server *srv)
{
    int rc;
    /* the server's stop answers parked Unseals' calls: wake them to see it */
    kms_rpc_server_set_abort_hook(srv, talos_abort_cb, d);
    if ((rc = kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Seal", seal_cb, d)) != 0) {
        return rc;
    }
    return kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Unseal", talos_unseal_cb,
                                     d);
}
