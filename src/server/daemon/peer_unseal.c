/*
 * Opt-in peer unseal: kmsd_peer.h, docs/security.md "Peer unseal".
 *
 * Requester (its own thread, only with unseal.peer): while this node is
 * initialised and sealed, not sealed by an operator in this process and the
 * replicated gate is open, it asks every other current member in turn
 * (PeerUnseal, mTLS with this node's certificate, the callee's certificate
 * CN checked) and backs off (250 ms doubling to 8 s) after a round where
 * none answered. A fresh X25519 key pair per request; R is unwrapped into
 * secure memory and installed only once it opens the replicated keyring.
 *
 * Server (operator pool): the caller's node certificate (cluster CA, one CN
 * kmsd-node-<id>) must name a current member other than this node and match
 * from_id; per-requester and global rate limits; a read barrier so the
 * membership and gate state include every write acknowledged before the
 * call; this node unsealed; the gate open, and a reopened gate's proof
 * valid under this node's R. Every request is audited on both sides.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/status.h>
#include <openssl/crypto.h>

#include "kms_crypto.h"
#include "kms_log.h"
#include "kms_peer_wrap.h"
#include "kms_raft.h"
#include "kms_rpc.h"
#include "kms_store.h"
#include "kms_time.h"
#include "kmsd.h"
#include "kmsd_authz.h"
#include "kmsd_cluster.h"
#include "kmsd_limit.h"
#include "kmsd_peer.h"

#include "kmsd/v1/cluster.pb-c.h"
#include "kmsd/v1/entry.pb-c.h"

#define PEER_PATH "/kmsd.v1.Cluster/PeerUnseal"
#define PEER_BACKOFF_MIN_MS 250u
#define PEER_BACKOFF_MAX_MS 8000u
#define PEER_CALL_MS 4000u         /* one request, read barrier included */
#define PEER_BARRIER_MS 2000u      /* serving side's read barrier */
/* Initialisation reaches this node through the replicated keyring, which
 * no notification reports: while uninitialised, the requester re-checks it
 * this often. */
#define PEER_UNINIT_RECHECK_MS 50u
#define PEER_REOPEN_RETRY_MS 1000u
/* Serving side: requests per requester node and minute, and over all. A
 * requester backing off asks each peer at most ~8 times a minute. */
#define PEER_PER_NODE_PER_MIN 20u
#define PEER_GLOBAL_PER_MIN 60u

struct kmsd_peer_unseal {
    pthread_t thread;
    bool started;
    struct kmsd_limiter *lim;     /* serving side, by requester id */

    pthread_mutex_t mu;           /* guards the fields below */
    bool operator_sealed;         /* an operator sealed this process: no peer unseal
                                   * until k shares are given */
    bool reopen_pending;          /* unsealed with shares while the gate was closed */
    uint64_t reopen_generation;   /* the generation to reopen */
};

/* ---- helpers ------------------------------------------------------------ */

static bool is_member(struct kmsd *d, uint64_t id)
{
    struct kms_raft_status st;
    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    for (size_t i = 0; i < st.n_members && i < sizeof(st.members) / sizeof(st.members[0]); i++) {
        if (st.members[i].id == id) {
            return true;
        }
    }
    return false;
}

/* The local gate: *closed, *generation; false when never closed. */
static bool gate_read(struct kmsd *d, Kmsd__V1__PeerUnsealGate **out)
{
    *out = NULL;
    return kms_store_peer_gate_get(d->store, out, NULL) == 0;
}

const char *kmsd_peer_gate_state(struct kmsd *d)
{
    Kmsd__V1__PeerUnsealGate *g = NULL;
    const char *s = "open";
    if (!d->opt.peer_unseal) {
        return "";
    }
    if (gate_read(d, &g) && g->closed) {
        s = "closed";
    }
    if (g != NULL) {
        kmsd__v1__peer_unseal_gate__free_unpacked(g, NULL);
    }
    return s;
}

/* A secure-memory copy of R, or NULL when sealed. Free with
 * kms_secmem_free(p, KMS_ROOT_KEY_LEN). */
static uint8_t *root_copy(struct kmsd *d)
{
    uint8_t *root = NULL;
    pthread_mutex_lock(&d->mu);
    if (d->unsealed && d->root != NULL && (root = kms_secmem_alloc(KMS_ROOT_KEY_LEN)) != NULL) {
        memcpy(root, d->root, KMS_ROOT_KEY_LEN);
    }
    pthread_mutex_unlock(&d->mu);
    return root;
}

/* 0 when the gate lets this node (holding root) serve: never closed, or
 * reopened with a proof valid under root for its generation. */
static int gate_check(struct kmsd *d, const uint8_t *root, const ProtobufCBinaryData *cluster_id,
                      struct kms_err *err)
{
    Kmsd__V1__PeerUnsealGate *g = NULL;
    uint8_t want[KMS_PEER_PROOF_LEN];
    int rc = 0;

    if (!gate_read(d, &g)) {
        return 0;
    }
    if (g->closed) {
        rc = kms_err_set(err, KMS_ESEALED,
                         "the cluster is administratively sealed (operator seal of node %" PRIu64
                         "): peer unseal is disabled until a node is given k shares again",
                         g->by_node);
    } else if (cluster_id->len != KMS_CLUSTER_ID_LEN || g->proof.len != KMS_PEER_PROOF_LEN ||
               kms_peer_reopen_proof(root, cluster_id->data, g->generation, want, NULL) != 0 ||
               CRYPTO_memcmp(want, g->proof.data, KMS_PEER_PROOF_LEN) != 0) {
        kms_log(KMS_LOG_ERROR, "peer", "peer unseal gate was reopened without a valid proof: "
                "treated as closed", NULL);
        rc = kms_err_set(err, KMS_ESEALED, "the peer unseal gate was reopened without a valid "
                         "proof: treated as closed (unseal a node with k shares)");
    }
    OPENSSL_cleanse(want, sizeof(want));
    kmsd__v1__peer_unseal_gate__free_unpacked(g, NULL);
    return rc;
}

static void audit_line(const char *op, uint64_t other, const char *addr, const char *outcome,
                       const char *why)
{
    char id[24];
    snprintf(id, sizeof(id), "%" PRIu64, other);
    kms_log(KMS_LOG_INFO, "audit", "peer-unseal", "op", op,
            strcmp(op, "peer-unseal-serve") == 0 ? "requester" : "peer", id, "addr",
            addr != NULL ? addr : "", "outcome", outcome, "reason", why != NULL ? why : "",
            NULL);
}

/* ---- serving side ------------------------------------------------------- */

void kmsd_peer_refuse(struct kmsd *d, struct kms_rpc_call *call, int grpc_status,
                      const char *why)
{
    const char *cn = kms_rpc_call_peer_cn(call);
    uint64_t id = 0;
    (void)d;
    (void)kmsd_authz_node_cn_parse(cn, &id);
    kms_log(KMS_LOG_WARN, "peer", "peer unseal refused", "reason", why, "peer",
            kms_rpc_call_peer(call), "cn", cn != NULL ? cn : "", NULL);
    audit_line("peer-unseal-serve", id, kms_rpc_call_peer(call), "refused", why);
    kms_rpc_call_finish(call, grpc_status, why, NULL, 0);
}

int kmsd_peer_serve_cb(struct kmsd_call *c)
{
    struct kmsd *d = c->d;
    struct kms_rpc_call *call = c->call;
    Kmsd__V1__PeerUnsealRequest *r = NULL;
    Kmsd__V1__PeerUnsealResponse resp = KMSD__V1__PEER_UNSEAL_RESPONSE__INIT;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_peer_binding b;
    uint8_t *root = NULL;
    uint8_t peer_pub[KMS_PEER_PUB_LEN], nonce[KMS_PEER_NONCE_LEN], wrapped[KMS_PEER_WRAP_LEN];
    uint64_t caller = c->node_id; /* the trampoline checked the certificate */
    struct kms_err err;
    char why[320];
    bool global = false;

    kms_err_clear(&err);
    if (!d->opt.peer_unseal) {
        snprintf(why, sizeof(why), "peer unseal is not enabled on node %" PRIu64
                 " (unseal.peer: false)", d->opt.node_id);
        kmsd_peer_refuse(d, call, GRPC_STATUS_FAILED_PRECONDITION, why);
        goto out;
    }
    r = kmsd__v1__peer_unseal_request__unpack(NULL, c->len, c->raw);
    if (r == NULL || r->requester_pub.len != KMS_PEER_PUB_LEN) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_INVALID_ARGUMENT,
                         "malformed request (requester_pub must be 32 bytes)");
        goto out;
    }
    if (r->from_id != caller || caller == d->opt.node_id) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_PERMISSION_DENIED,
                         "from_id differs from the certificate's node id");
        goto out;
    }
    if (!kmsd_limiter_take(d->peer->lim, &caller, sizeof(caller), kms_mono_ms(), &global)) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                         global ? "too many peer unseal requests (all nodes); retry later"
                                : "too many peer unseal requests from this node; retry later");
        goto out;
    }
    /* Membership and the gate as of every write acknowledged before now. */
    if (kmsd_read_barrier(d, PEER_BARRIER_MS) != 0) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_UNAVAILABLE,
                         "this node cannot confirm the cluster's current state (no quorum)");
        goto out;
    }
    if (!is_member(d, caller)) {
        snprintf(why, sizeof(why), "node %" PRIu64 " is not a member of the cluster", caller);
        kmsd_peer_refuse(d, call, GRPC_STATUS_PERMISSION_DENIED, why);
        goto out;
    }
    if ((root = root_copy(d)) == NULL) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_FAILED_PRECONDITION, "this node is sealed");
        goto out;
    }
    if (kms_store_keyring_get(d->store, &ek, NULL) != 0 ||
        ek->cluster_id.len != KMS_CLUSTER_ID_LEN) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_FAILED_PRECONDITION, "no keyring");
        goto out;
    }
    if (gate_check(d, root, &ek->cluster_id, &err) != 0) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_FAILED_PRECONDITION, err.msg);
        goto out;
    }
    b.cluster_id = ek->cluster_id.data;
    b.requester_id = caller;
    b.peer_id = d->opt.node_id;
    if (kms_peer_wrap(r->requester_pub.data, &b, root, peer_pub, nonce, wrapped, &err) != 0) {
        kmsd_peer_refuse(d, call, GRPC_STATUS_INVALID_ARGUMENT, err.msg);
        goto out;
    }
    resp.peer_id = d->opt.node_id;
    resp.peer_pub.data = peer_pub;
    resp.peer_pub.len = sizeof(peer_pub);
    resp.nonce.data = nonce;
    resp.nonce.len = sizeof(nonce);
    resp.wrapped_root.data = wrapped;
    resp.wrapped_root.len = sizeof(wrapped);
    resp.cluster_id = ek->cluster_id;
    audit_line("peer-unseal-serve", caller, kms_rpc_call_peer(call), "granted", "");
    kms_log(KMS_LOG_WARN, "peer", "root key handed to a member (peer unseal)", "requester_cn",
            kms_rpc_call_peer_cn(call), "peer", kms_rpc_call_peer(call), NULL);
    kmsd_call_finish_msg(call, &resp.base);
out:
    OPENSSL_cleanse(wrapped, sizeof(wrapped));
    kms_secmem_free(root, KMS_ROOT_KEY_LEN);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    if (r != NULL) {
        kmsd__v1__peer_unseal_request__free_unpacked(r, NULL);
    }
    return 0;
}

/* ---- the gate ----------------------------------------------------------- */

static int gate_write(struct kmsd *d, bool close, uint64_t generation, const uint8_t *proof,
                      struct kmsd_write_result *res, struct kms_err *err)
{
    Kmsd__V1__Entry e = KMSD__V1__ENTRY__INIT;
    Kmsd__V1__SetPeerUnsealGate g = KMSD__V1__SET_PEER_UNSEAL_GATE__INIT;

    g.close = close;
    g.generation = generation;
    if (proof != NULL) {
        g.proof.data = (uint8_t *)proof;
        g.proof.len = KMS_PEER_PROOF_LEN;
    }
    g.at = kms_wall_ms();
    g.by_node = d->opt.node_id;
    e.version = 1;
    e.op_case = KMSD__V1__ENTRY__OP_SET_PEER_UNSEAL_GATE;
    e.set_peer_unseal_gate = &g;
    return kmsd_write(d, &e, d->opt.request_wait_ms, res, err);
}

int kmsd_peer_operator_seal(struct kmsd *d, struct kms_err *err)
{
    struct kmsd_write_result res;
    int rc;

    if (!d->opt.peer_unseal || d->peer == NULL) {
        kmsd_seal(d);
        return 0;
    }
    /* Block first, so the requester thread cannot unseal again in between. */
    pthread_mutex_lock(&d->peer->mu);
    d->peer->operator_sealed = true;
    d->peer->reopen_pending = false;
    pthread_mutex_unlock(&d->peer->mu);
    kmsd_seal(d); /* signals d->wake */
    if ((rc = gate_write(d, true, 0, NULL, &res, err)) != 0) {
        kms_log(KMS_LOG_ERROR, "peer", "sealed, but the peer unseal gate could not be closed",
                "error", err != NULL ? err->msg : "", NULL);
        return kms_err_wrap(err, rc, "node sealed, but closing the cluster's peer unseal gate "
                            "failed (other members may still hand the root key to a "
                            "restarted member); retry the seal");
    }
    kms_log(KMS_LOG_WARN, "peer", "peer unseal gate closed: no member hands out the root key "
            "until a node is unsealed with k shares", "result", res.msg, NULL);
    return 0;
}

void kmsd_peer_shares_unsealed(struct kmsd *d)
{
    Kmsd__V1__PeerUnsealGate *g = NULL;
    if (!d->opt.peer_unseal || d->peer == NULL) {
        return;
    }
    (void)gate_read(d, &g);
    pthread_mutex_lock(&d->peer->mu);
    d->peer->operator_sealed = false;
    d->peer->reopen_pending = g != NULL && g->closed;
    d->peer->reopen_generation = g != NULL ? g->generation : 0;
    pthread_mutex_unlock(&d->peer->mu);
    kmsd_wake_signal(&d->wake); /* the requester thread reopens the gate */
    if (g != NULL) {
        kmsd__v1__peer_unseal_gate__free_unpacked(g, NULL);
    }
}

int kmsd_peer_gate_forward_check(struct kmsd *d, const Kmsd__V1__Entry *e, uint64_t caller_id,
                                 struct kms_err *err)
{
    const Kmsd__V1__SetPeerUnsealGate *g = e->set_peer_unseal_gate;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    uint8_t *root = NULL, want[KMS_PEER_PROOF_LEN];
    int rc = 0;

    if (e->version != 1 || g == NULL) {
        return kms_err_set(err, KMS_EFORMAT, "bad entry version");
    }
    if (g->by_node != caller_id) {
        return kms_err_set(err, KMS_EDENIED, "by_node differs from the certificate's node id");
    }
    if (g->close) {
        return 0;
    }
    if (g->proof.len != KMS_PEER_PROOF_LEN) {
        return kms_err_set(err, KMS_EFORMAT, "a gate reopen needs a 32-byte proof");
    }
    /* A sealed leader cannot check the proof; the serving peers do anyway. */
    if ((root = root_copy(d)) != NULL && kms_store_keyring_get(d->store, &ek, NULL) == 0 &&
        ek->cluster_id.len == KMS_CLUSTER_ID_LEN &&
        (kms_peer_reopen_proof(root, ek->cluster_id.data, g->generation, want, NULL) != 0 ||
         CRYPTO_memcmp(want, g->proof.data, KMS_PEER_PROOF_LEN) != 0)) {
        rc = kms_err_set(err, KMS_EDENIED, "gate reopen proof is not valid for this cluster");
    }
    OPENSSL_cleanse(want, sizeof(want));
    kms_secmem_free(root, KMS_ROOT_KEY_LEN);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    return rc;
}

/* Requester thread: reopens the gate after an unseal with k shares. */
static void gate_reopen(struct kmsd *d, uint64_t generation)
{
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kmsd_write_result res;
    uint8_t *root = root_copy(d), proof[KMS_PEER_PROOF_LEN];
    struct kms_err err;
    bool done = false;

    kms_err_clear(&err);
    if (root == NULL || kms_store_keyring_get(d->store, &ek, &err) != 0 ||
        ek->cluster_id.len != KMS_CLUSTER_ID_LEN ||
        kms_peer_reopen_proof(root, ek->cluster_id.data, generation, proof, &err) != 0) {
        goto out;
    }
    if (gate_write(d, false, generation, proof, &res, &err) != 0) {
        kms_log(KMS_LOG_WARN, "peer", "reopening the peer unseal gate failed; retrying",
                "error", err.msg, NULL);
        goto out;
    }
    done = true;
    kms_log(KMS_LOG_WARN, "peer",
            res.code == 0 ? "peer unseal gate reopened (this node was unsealed with k shares)"
                          : "peer unseal gate not reopened: it changed meanwhile",
            "result", res.msg, NULL);
out:
    if (done) {
        pthread_mutex_lock(&d->peer->mu);
        if (d->peer->reopen_generation == generation) {
            d->peer->reopen_pending = false;
        }
        pthread_mutex_unlock(&d->peer->mu);
    }
    OPENSSL_cleanse(proof, sizeof(proof));
    kms_secmem_free(root, KMS_ROOT_KEY_LEN);
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
}

/* ---- requesting side ---------------------------------------------------- */

/* Polled while a request is in flight: a stopping daemon abandons it. */
static bool keep_cb(void *arg)
{
    struct kmsd *d = arg;
    return !atomic_load(&d->stopping);
}

/* One request to member id. 0 once this node is unsealed with the key it
 * got (or was unsealed meanwhile); otherwise the reason in err. */
static int ask_peer(struct kmsd *d, uint64_t id, struct kms_err *err)
{
    Kmsd__V1__PeerUnsealRequest req = KMSD__V1__PEER_UNSEAL_REQUEST__INIT;
    Kmsd__V1__PeerUnsealResponse *resp = NULL;
    Kmsd__V1__EncryptedKeyring *ek = NULL;
    struct kms_peer_eph *eph = NULL;
    struct kms_rpc_channel *ch = NULL;
    struct kms_rpc_client_tls tls = {d->opt.cluster_ca, d->opt.node_cert, d->opt.node_key};
    struct kms_rpc_channel_options copts;
    struct kms_peer_binding b;
    uint8_t pub[KMS_PEER_PUB_LEN], buf[64], *out = NULL, *root = NULL;
    size_t len, outlen = 0;
    char addr[256], cn[40], *details = NULL;
    int status = 0, rc;
    uint64_t t0 = kms_mono_ms();

    if ((rc = kmsd_member_cluster_address(d, id, addr)) != 0) {
        return kms_err_set(err, KMS_EUNAVAIL, "no cluster address known for node %" PRIu64, id);
    }
    if ((rc = kms_store_keyring_get(d->store, &ek, err)) != 0) {
        goto out;
    }
    if ((rc = kms_peer_eph_new(&eph, pub, err)) != 0) {
        goto out;
    }
    req.from_id = d->opt.node_id;
    req.requester_pub.data = pub;
    req.requester_pub.len = sizeof(pub);
    len = protobuf_c_message_pack(&req.base, buf);
    snprintf(cn, sizeof(cn), "kmsd-node-%" PRIu64, id);
    memset(&copts, 0, sizeof(copts));
    copts.expect_peer_cn = cn; /* only that member's certificate is believed */
    copts.connect_timeout_ms = 2000;
    if ((rc = kms_rpc_channel_create_opts(addr, &tls, &copts, &ch, err)) != 0) {
        rc = kms_err_wrap(err, KMS_EUNAVAIL, "node %" PRIu64 " at %s", id, addr);
        goto out;
    }
    rc = kms_rpc_unary_watch(ch, PEER_PATH, buf, len, PEER_CALL_MS, 100, keep_cb, d, &out,
                             &outlen, &status, &details, err);
    if (rc != 0 || status != GRPC_STATUS_OK) {
        rc = kms_err_set(err, status == GRPC_STATUS_PERMISSION_DENIED ? KMS_EDENIED : KMS_EUNAVAIL,
                         "node %" PRIu64 " at %s: %s: %s", id, addr,
                         kms_rpc_status_name(status), details != NULL ? details : "no answer");
        goto out;
    }
    resp = kmsd__v1__peer_unseal_response__unpack(NULL, outlen, out);
    if (resp == NULL || resp->peer_id != id || resp->cluster_id.len != ek->cluster_id.len ||
        ek->cluster_id.len != KMS_CLUSTER_ID_LEN ||
        memcmp(resp->cluster_id.data, ek->cluster_id.data, KMS_CLUSTER_ID_LEN) != 0) {
        rc = kms_err_set(err, KMS_EFORMAT, "node %" PRIu64 ": malformed answer, or another "
                         "node or cluster", id);
        goto out;
    }
    if ((root = kms_secmem_alloc(KMS_ROOT_KEY_LEN)) == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "no secure memory");
        goto out;
    }
    b.cluster_id = ek->cluster_id.data;
    b.requester_id = d->opt.node_id;
    b.peer_id = id;
    if ((rc = kms_peer_unwrap(eph, resp->peer_pub.data, resp->peer_pub.len, &b,
                              resp->nonce.data, resp->nonce.len, resp->wrapped_root.data,
                              resp->wrapped_root.len, root, err)) != 0) {
        kms_err_wrap(err, rc, "node %" PRIu64, id);
        goto out;
    }
    {
        char via[48];
        snprintf(via, sizeof(via), "peer unseal from node %" PRIu64, id);
        if ((rc = kmsd_unseal_with_root(d, root, via, err)) != 0) {
            kms_err_wrap(err, rc, "node %" PRIu64 "'s key", id);
            goto out;
        }
    }
    {
        char ms[24];
        snprintf(ms, sizeof(ms), "%" PRIu64, kms_mono_ms() - t0);
        kms_log(KMS_LOG_INFO, "peer", "unsealed by a peer", "peer", cn, "ms", ms, NULL);
    }
    rc = 0;
out:
    audit_line("peer-unseal-request", id, addr, rc == 0 ? "unsealed" : "failed",
               rc == 0 ? "" : (err != NULL ? err->msg : ""));
    kms_secmem_free(root, KMS_ROOT_KEY_LEN);
    kms_peer_eph_free(eph);
    if (resp != NULL) {
        kmsd__v1__peer_unseal_response__free_unpacked(resp, NULL);
    }
    if (ek != NULL) {
        kmsd__v1__encrypted_keyring__free_unpacked(ek, NULL);
    }
    if (ch != NULL) {
        kms_rpc_channel_destroy(ch);
    }
    if (out != NULL) {
        OPENSSL_cleanse(out, outlen);
        free(out);
    }
    free(details);
    return rc;
}

/* One round over every other current member; 0 once unsealed. */
static int ask_round(struct kmsd *d, struct kms_err *last)
{
    struct kms_raft_status st;
    int rc = KMS_EUNAVAIL;

    memset(&st, 0, sizeof(st));
    (void)kms_raft_status(d->raft, &st);
    kms_err_set(last, KMS_EUNAVAIL, "no other member known");
    for (size_t i = 0; i < st.n_members && i < sizeof(st.members) / sizeof(st.members[0]); i++) {
        if (st.members[i].id == d->opt.node_id || atomic_load(&d->stopping)) {
            continue;
        }
        kms_err_clear(last);
        if ((rc = ask_peer(d, st.members[i].id, last)) == 0 || kmsd_is_unsealed(d)) {
            return 0;
        }
    }
    return rc;
}

static void *peer_main(void *arg)
{
    struct kmsd *d = arg;
    struct kmsd_peer_unseal *p = d->peer;
    unsigned backoff = PEER_BACKOFF_MIN_MS;
    uint64_t next = 0, next_reopen = 0;
    bool said_blocked = false, said_gate = false;
    char last_err[sizeof(((struct kms_err *)0)->msg)] = "";

    for (;;) {
        /* The ticket before any state is read (kmsd_wake.h); `until` is
         * when to look again without a signal. */
        uint64_t ticket = kmsd_wake_ticket(&d->wake);
        uint64_t now, until = KMSD_WAKE_NEVER;
        bool blocked, reopen;
        uint64_t gen;
        Kmsd__V1__PeerUnsealGate *g = NULL;
        bool closed;

        if (atomic_load(&d->stopping)) {
            break;
        }
        now = kms_mono_ms();
        pthread_mutex_lock(&p->mu);
        blocked = p->operator_sealed;
        reopen = p->reopen_pending;
        gen = p->reopen_generation;
        pthread_mutex_unlock(&p->mu);
        if (kmsd_is_unsealed(d)) {
            backoff = PEER_BACKOFF_MIN_MS;
            next = 0;
            said_blocked = said_gate = false;
            last_err[0] = '\0';
            if (reopen && now >= next_reopen) {
                gate_reopen(d, gen);
                next_reopen = kms_mono_ms() + PEER_REOPEN_RETRY_MS;
            }
            /* Until sealed, or a reopen is due (retried: a write to the
             * cluster); both signal. */
            (void)kmsd_wake_wait_until(&d->wake, ticket, reopen ? next_reopen : KMSD_WAKE_NEVER);
            continue;
        }
        if (blocked) {
            if (!said_blocked) {
                kms_log(KMS_LOG_INFO, "peer", "sealed by an operator: no peer unseal until k "
                        "shares are given", NULL);
                said_blocked = true;
            }
            (void)kmsd_wake_wait_until(&d->wake, ticket, KMSD_WAKE_NEVER); /* k shares */
            continue;
        }
        if (!kmsd_is_initialized(d)) {
            until = now + PEER_UNINIT_RECHECK_MS;
        }
        if (now < next) {
            until = next; /* backing off: the next round */
        }
        if (until != KMSD_WAKE_NEVER) {
            (void)kmsd_wake_wait_until(&d->wake, ticket, until);
            continue;
        }
        closed = gate_read(d, &g) && g->closed;
        if (g != NULL) {
            kmsd__v1__peer_unseal_gate__free_unpacked(g, NULL);
        }
        if (closed) {
            if (!said_gate) {
                kms_log(KMS_LOG_WARN, "peer", "the cluster is administratively sealed: peer "
                        "unseal disabled until a node is given k shares", NULL);
                said_gate = true;
            }
            next = now + PEER_REOPEN_RETRY_MS;
            continue;
        }
        said_gate = false;
        {
            struct kms_err err;
            kms_err_clear(&err);
            if (ask_round(d, &err) == 0) {
                continue;
            }
            if (strcmp(err.msg, last_err) != 0) {
                kms_log(KMS_LOG_WARN, "peer", "peer unseal: no member handed out the key; "
                        "retrying with backoff", "error", err.msg, NULL);
                snprintf(last_err, sizeof(last_err), "%s", err.msg);
            }
        }
        /* Jitter of up to a quarter, so restarted members do not ask in step. */
        {
            uint8_t j = 0;
            (void)kms_rand_bytes(&j, 1, NULL);
            next = kms_mono_ms() + backoff + (backoff / 4) * j / 255;
        }
        backoff = backoff * 2 > PEER_BACKOFF_MAX_MS ? PEER_BACKOFF_MAX_MS : backoff * 2;
    }
    return NULL;
}

int kmsd_peer_start(struct kmsd *d, struct kms_err *err)
{
    struct kmsd_peer_unseal *p = calloc(1, sizeof(*p));
    int rc;

    if (p == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&p->mu, NULL);
    if ((rc = kmsd_limiter_new(64, PEER_PER_NODE_PER_MIN, PEER_GLOBAL_PER_MIN, 60000, &p->lim,
                               err)) != 0) {
        pthread_mutex_destroy(&p->mu);
        free(p);
        return kms_err_wrap(err, rc, "peer unseal limiter");
    }
    d->peer = p;
    if (!d->opt.peer_unseal) {
        return 0;
    }
    if (pthread_create(&p->thread, NULL, peer_main, d) != 0) {
        return kms_err_set(err, KMS_ENOMEM, "cannot start the peer unseal thread");
    }
    p->started = true;
    kms_log(KMS_LOG_WARN, "peer", "unseal.peer: true: this node asks unsealed members for the "
            "root key after a restart and hands it to members that ask (docs/security.md)",
            NULL);
    return 0;
}

void kmsd_peer_stop(struct kmsd *d)
{
    if (d->peer != NULL && d->peer->started) {
        pthread_join(d->peer->thread, NULL);
        d->peer->started = false;
    }
}

void kmsd_peer_free(struct kmsd *d)
{
    if (d->peer == NULL) {
        return;
    }
    kmsd_peer_stop(d);
    kmsd_limiter_free(d->peer->lim);
    pthread_mutex_destroy(&d->peer->mu);
    free(d->peer);
    d->peer = NULL;
}
