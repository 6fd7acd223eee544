/*
 * Mutual-TLS raft transport (src/raft/kms_transport.h): real canonical raft,
 * real TLS, loopback, dev PKI from deploy/gen-pki.sh in a temporary directory.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/ssl.h>
#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include "frame.h"
#include "frame_build.h"
#include "kms_time.h"
#include "kms_transport.h"

/* libraft 0.22.1 leaks a few small objects when a follower receives an
 * InstallSnapshot while one is in progress (raft's TCP transport too); the
 * snapshot test runs with leak detection off. */
#if defined(__SANITIZE_ADDRESS__)
#define KMS_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KMS_LSAN 1
#endif
#endif
#ifdef KMS_LSAN
#include <sanitizer/lsan_interface.h>
#define lsan_off() __lsan_disable()
#define lsan_on() __lsan_enable()
#else
#define lsan_off() ((void)0)
#define lsan_on() ((void)0)
#endif

#ifndef KMS_SOURCE_DIR
#define KMS_SOURCE_DIR ""
#endif

static char g_tmp[256];
static char g_pki[300];
static uv_loop_t g_loop;
static uv_timer_t g_tick;

/* ---- helpers ---------------------------------------------------------- */

static void pki_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "%s/%s", g_pki, name);
}

static void source_dir(char *buf, size_t size)
{
    const char *p;
    if (KMS_SOURCE_DIR[0] != '\0') {
        snprintf(buf, size, "%s", KMS_SOURCE_DIR);
        return;
    }
    /* __FILE__ is <src>/tests/unit/test_raft_transport.c */
    snprintf(buf, size, "%s", __FILE__);
    p = strstr(buf, "/tests/unit/");
    if (p != NULL) {
        buf[p - buf] = '\0';
    } else {
        snprintf(buf, size, ".");
    }
}

static int free_port(void)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int port;
    assert_true(fd >= 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

static void tick_cb(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until cond(arg) or timeout; returns whether cond held. */
static bool run_until(bool (*cond)(void *), void *arg, unsigned timeout_ms)
{
    uint64_t deadline;
    uv_update_time(&g_loop);
    deadline = uv_now(&g_loop) + timeout_ms;
    uv_timer_start(&g_tick, tick_cb, 10, 10);
    while (!cond(arg) && uv_now(&g_loop) < deadline) {
        uv_run(&g_loop, UV_RUN_ONCE);
    }
    uv_timer_stop(&g_tick);
    return cond(arg);
}

static bool never(void *arg)
{
    (void)arg;
    return false;
}

static void run_for(unsigned ms)
{
    run_until(never, NULL, ms);
}

static bool flag_set(void *arg)
{
    return atomic_load((atomic_bool *)arg);
}

static struct kms_transport_stats stats(struct raft_uv_transport *t)
{
    struct kms_transport_stats s;
    kms_transport_tls_stats(t, &s);
    return s;
}

static void init_transport(struct raft_uv_transport *t, const char *cert, const char *key,
                           const char *ca)
{
    struct kms_transport_tls_config cfg;
    struct kms_err err;
    char c[400], k[400], a[400];
    pki_path(c, sizeof c, cert);
    pki_path(k, sizeof k, key);
    pki_path(a, sizeof a, ca);
    memset(&cfg, 0, sizeof cfg);
    cfg.cert_file = c;
    cfg.key_file = k;
    cfg.ca_file = a;
    cfg.handshake_timeout_ms = 3000;
    memset(t, 0, sizeof *t);
    if (kms_transport_tls_init(t, &g_loop, &cfg, &err) != 0) {
        fail_msg("kms_transport_tls_init: %s", err.msg);
    }
}

/* ---- transport hooks ------------------------------------------------------ */

#define STAMP_MAGIC 0x5A5A5A5A5A5A5A5Aull

/* Hooks of one node. stamp_out encodes who sent to whom and a sequence
 * number, so stamp_in can check that every field arrived intact and came
 * from the peer the transport names. */
struct hook_ctx {
    uint64_t self;
    uint64_t seq;
    uint64_t deny_id;       /* peer_allowed refuses this id */
    unsigned from[4];       /* stamps received, by sender id */
    unsigned bad;           /* stamps failing a check */
    uint64_t last_arrival;
    unsigned out_calls, out_skipped;
};

static bool hk_stamp_out(void *data, uint64_t peer_id, struct kms_transport_stamp *s)
{
    struct hook_ctx *h = data;
    h->out_calls++;
    h->seq++;
    if (h->seq % 5 == 0) {
        h->out_skipped++;
        return false; /* no stamp before this frame */
    }
    s->sent_us = kms_mono_us();
    s->echo_us = h->self;
    s->term = peer_id;
    s->flags = KMS_STAMP_LEADER;
    s->commit = h->seq;
    s->lease_rem_us = h->seq ^ STAMP_MAGIC;
    return true;
}

static void hk_stamp_in(void *data, uint64_t peer_id, const struct kms_transport_stamp *s,
                        uint64_t arrival_us)
{
    struct hook_ctx *h = data;
    uint64_t now = kms_mono_us();
    bool ok = peer_id >= 1 && peer_id <= 3 && peer_id != h->self && s->echo_us == peer_id &&
              s->term == h->self && s->flags == KMS_STAMP_LEADER &&
              s->lease_rem_us == (s->commit ^ STAMP_MAGIC) && s->sent_us <= arrival_us &&
              arrival_us <= now && arrival_us >= h->last_arrival &&
              now - arrival_us < 1000000;
    if (!ok) {
        h->bad++;
        return;
    }
    h->last_arrival = arrival_us;
    h->from[peer_id]++;
}

static bool hk_peer_allowed(void *data, uint64_t peer_id)
{
    struct hook_ctx *h = data;
    return peer_id != h->deny_id;
}

static void hooks_install(struct raft_uv_transport *t, struct hook_ctx *h, uint64_t self)
{
    struct kms_transport_hooks hooks;
    memset(h, 0, sizeof *h);
    h->self = self;
    hooks.data = h;
    hooks.stamp_out = hk_stamp_out;
    hooks.stamp_in = hk_stamp_in;
    hooks.peer_allowed = hk_peer_allowed;
    kms_transport_tls_set_hooks(t, &hooks);
}

/* ---- raft nodes ----------------------------------------------------------- */

struct node {
    uint64_t id;
    char addr[64];
    char dir[400];
    struct raft_uv_transport transport;
    struct raft_io io;
    struct raft_fsm fsm;
    struct raft raft;
    uint64_t applied; /* commands applied by the FSM */
    uint64_t sum;
    bool started, closed;
    bool hooks;           /* install hk below before raft starts */
    unsigned snap_threshold; /* 0 = practically never */
    unsigned restores;       /* fsm_restore calls */
    struct hook_ctx hk;
};

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result)
{
    struct node *n = fsm->data;
    uint64_t v;
    assert_int_equal(buf->len, 8);
    memcpy(&v, buf->base, 8);
    n->applied++;
    n->sum += v;
    *result = NULL;
    return 0;
}

static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    struct node *n = fsm->data;
    *bufs = raft_malloc(sizeof **bufs);
    (*bufs)[0].len = 16;
    (*bufs)[0].base = raft_malloc(16);
    memcpy((*bufs)[0].base, &n->applied, 8);
    memcpy((char *)(*bufs)[0].base + 8, &n->sum, 8);
    *n_bufs = 1;
    return 0;
}

static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    struct node *n = fsm->data;
    memcpy(&n->applied, buf->base, 8);
    memcpy(&n->sum, (char *)buf->base + 8, 8);
    n->restores++;
    raft_free(buf->base);
    return 0;
}

/* Starts node n (id, addr set) with the given certificate, bootstrapped with
 * the voters (ids[i], addrs[i]). */
static void node_start(struct node *n, const char *cert, const char *key, const char *ca,
                       const uint64_t *ids, char addrs[][64], unsigned n_voters,
                       unsigned election_ms)
{
    struct raft_configuration conf;
    int rv;

    snprintf(n->dir, sizeof n->dir, "%s/raft-%s", g_tmp, n->addr);
    assert_int_equal(mkdir(n->dir, 0700), 0);
    if (getenv("KMS_TEST_PLAIN_TCP") != NULL) {
        /* Comparison runs: libraft's own TCP transport, no hooks. */
        memset(&n->transport, 0, sizeof n->transport);
        n->transport.version = 1;
        assert_int_equal(raft_uv_tcp_init(&n->transport, &g_loop), 0);
        n->hooks = false;
    } else
    init_transport(&n->transport, cert, key, ca);
    if (n->hooks) {
        hooks_install(&n->transport, &n->hk, n->id);
    }
    rv = raft_uv_init(&n->io, &g_loop, n->dir, &n->transport);
    assert_int_equal(rv, 0);
    raft_uv_set_connect_retry_delay(&n->io, 100);
    n->fsm.version = 1;
    n->fsm.data = n;
    n->fsm.apply = fsm_apply;
    n->fsm.snapshot = fsm_snapshot;
    n->fsm.restore = fsm_restore;
    rv = raft_init(&n->raft, &n->io, &n->fsm, n->id, n->addr);
    if (rv != 0) {
        fail_msg("raft_init: %s", raft_errmsg(&n->raft));
    }
    n->raft.data = n;
    raft_set_election_timeout(&n->raft, election_ms);
    raft_set_heartbeat_timeout(&n->raft, 50);
    raft_set_snapshot_threshold(&n->raft, n->snap_threshold != 0 ? n->snap_threshold : 1u << 20);
    raft_set_snapshot_trailing(&n->raft, 8);
    raft_configuration_init(&conf);
    for (unsigned i = 0; i < n_voters; i++) {
        assert_int_equal(raft_configuration_add(&conf, ids[i], addrs[i], RAFT_VOTER), 0);
    }
    rv = raft_bootstrap(&n->raft, &conf);
    raft_configuration_close(&conf);
    if (rv != 0) {
        fail_msg("raft_bootstrap: %s", raft_errmsg(&n->raft));
    }
    rv = raft_start(&n->raft);
    if (rv != 0) {
        fail_msg("raft_start: %s", raft_errmsg(&n->raft));
    }
    n->started = true;
}

static void node_closed_cb(struct raft *r)
{
    struct node *n = r->data;
    raft_uv_close(&n->io);
    if (getenv("KMS_TEST_PLAIN_TCP") != NULL) {
        raft_uv_tcp_close(&n->transport);
    } else
    kms_transport_tls_close(&n->transport);
    n->closed = true;
}

static bool node_is_closed(void *arg)
{
    return ((struct node *)arg)->closed;
}

static void node_stop(struct node *n)
{
    if (!n->started) {
        return;
    }
    raft_close(&n->raft, node_closed_cb);
    assert_true(run_until(node_is_closed, n, 5000));
    n->started = false;
}

struct cluster {
    struct node nodes[3];
};

static struct node *leader_of(struct cluster *c)
{
    for (int i = 0; i < 3; i++) {
        if (raft_state(&c->nodes[i].raft) == RAFT_LEADER) {
            return &c->nodes[i];
        }
    }
    return NULL;
}

static bool has_leader(void *arg)
{
    return leader_of(arg) != NULL;
}

struct applied_goal {
    struct cluster *c;
    uint64_t want;
};

static bool all_applied(void *arg)
{
    struct applied_goal *g = arg;
    for (int i = 0; i < 3; i++) {
        if (g->c->nodes[i].applied < g->want) {
            return false;
        }
    }
    return true;
}

static unsigned g_apply_done, g_apply_failed;

static void apply_cb(struct raft_apply *req, int status, void *result)
{
    (void)result;
    if (status == 0) {
        g_apply_done++;
    } else {
        g_apply_failed++;
    }
    free(req);
}

static void apply_n(struct node *leader, unsigned count, uint64_t first)
{
    for (unsigned i = 0; i < count; i++) {
        struct raft_buffer buf;
        struct raft_apply *req = calloc(1, sizeof *req);
        uint64_t v = first + i;
        assert_non_null(req);
        buf.len = 8; /* libraft 0.15 needs 8-byte multiples */
        buf.base = raft_malloc(buf.len);
        memcpy(buf.base, &v, 8);
        assert_int_equal(raft_apply(&leader->raft, req, &buf, 1, apply_cb), 0);
    }
}

/* ---- raw TLS client in a thread (blocking OpenSSL) ------------------------ */

enum raw_result { RAW_HANDSHAKE_FAILED = 1, RAW_CLOSED, RAW_OPEN };

struct raw_client {
    const char *cert, *key; /* NULL = no client certificate */
    int port;
    uint64_t claim_id;
    const uint8_t *send;    /* bytes sent after the preamble (may be NULL) */
    size_t send_len;
    bool alpn_stamps;       /* offer "kmsd-raft/2"; else no ALPN (old kmsd) */
    bool got_stamps;        /* the server selected "kmsd-raft/2" */
    enum raw_result result;
    atomic_bool done;
};

static void *raw_client_main(void *arg)
{
    struct raw_client *rc = arg;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = NULL;
    struct sockaddr_in sa;
    struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
    unsigned char pre[32 + 16];
    char path[400];
    char byte;
    int fd = -1;
    int n;

    rc->result = RAW_HANDSHAKE_FAILED;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    pki_path(path, sizeof path, "ca.pem");
    SSL_CTX_load_verify_locations(ctx, path, NULL);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (rc->cert != NULL) {
        pki_path(path, sizeof path, rc->cert);
        SSL_CTX_use_certificate_chain_file(ctx, path);
        pki_path(path, sizeof path, rc->key);
        SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM);
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)rc->port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        goto out;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (rc->alpn_stamps) {
        SSL_set_alpn_protos(ssl, (const unsigned char *)"\x0bkmsd-raft/2", 12);
    }
    if (SSL_connect(ssl) != 1) {
        goto out;
    }
    {
        const unsigned char *alpn = NULL;
        unsigned alpn_len = 0;
        SSL_get0_alpn_selected(ssl, &alpn, &alpn_len);
        rc->got_stamps = alpn_len == 11 && memcmp(alpn, "kmsd-raft/2", 11) == 0;
    }
    /* Preamble: version, id, address length (16), "127.0.0.1:1" padded. */
    memset(pre, 0, sizeof pre);
    for (int i = 0; i < 8; i++) {
        pre[i] = (unsigned char)((uint64_t)1 >> (8 * i));
        pre[8 + i] = (unsigned char)(rc->claim_id >> (8 * i));
        pre[16 + i] = (unsigned char)((uint64_t)16 >> (8 * i));
    }
    memcpy(pre + 24, "127.0.0.1:1", 11);
    if (SSL_write(ssl, pre, 40) != 40) {
        rc->result = RAW_CLOSED;
        goto out;
    }
    if (rc->send_len > 0 && SSL_write(ssl, rc->send, (int)rc->send_len) != (int)rc->send_len) {
        rc->result = RAW_CLOSED;
        goto out;
    }
    errno = 0;
    n = SSL_read(ssl, &byte, 1);
    if (n <= 0 && SSL_get_error(ssl, n) == SSL_ERROR_SYSCALL &&
        (errno == EAGAIN || errno == EWOULDBLOCK)) {
        rc->result = RAW_OPEN; /* nothing from the server for 1 s: still open */
    } else if (n <= 0 && SSL_get_error(ssl, n) == SSL_ERROR_WANT_READ) {
        rc->result = RAW_OPEN;
    } else {
        rc->result = RAW_CLOSED;
    }
out:
    SSL_free(ssl);
    if (fd >= 0) {
        close(fd);
    }
    SSL_CTX_free(ctx);
    atomic_store(&rc->done, true);
    return NULL;
}

static void raw_client_go(struct raw_client *rcp)
{
    pthread_t th;
    atomic_init(&rcp->done, false);
    assert_int_equal(pthread_create(&th, NULL, raw_client_main, rcp), 0);
    assert_true(run_until(flag_set, &rcp->done, 10000));
    pthread_join(th, NULL);
    run_for(100); /* let the server side finish its teardown */
}

/* Connects with node2's certificate claiming id 2, offers ALPN or not, sends
 * `len` bytes of raft stream. */
static enum raw_result raw_client_send(int port, bool alpn, const uint8_t *data, size_t len,
                                       bool *got_stamps)
{
    struct raw_client rc;
    memset(&rc, 0, sizeof rc);
    rc.cert = "node2.pem";
    rc.key = "node2-key.pem";
    rc.port = port;
    rc.claim_id = 2;
    rc.send = data;
    rc.send_len = len;
    rc.alpn_stamps = alpn;
    raw_client_go(&rc);
    if (got_stamps != NULL) {
        *got_stamps = rc.got_stamps;
    }
    return rc.result;
}

static enum raw_result raw_client_run(const char *cert, const char *key, int port,
                                      uint64_t claim_id)
{
    struct raw_client rc;
    pthread_t th;
    memset(&rc, 0, sizeof rc);
    rc.cert = cert;
    rc.key = key;
    rc.port = port;
    rc.claim_id = claim_id;
    atomic_init(&rc.done, false);
    assert_int_equal(pthread_create(&th, NULL, raw_client_main, &rc), 0);
    assert_true(run_until(flag_set, &rc.done, 10000));
    pthread_join(th, NULL);
    run_for(100); /* let the server side finish its teardown */
    return rc.result;
}

/* ---- direct transport use ------------------------------------------------ */

struct connect_probe {
    struct raft_uv_connect req;
    int status;
    atomic_bool done;
};

static void raft_free_handle(uv_handle_t *h)
{
    raft_free(h);
}

static void probe_cb(struct raft_uv_connect *req, struct uv_stream_s *stream, int status)
{
    struct connect_probe *p = req->data;
    p->status = status;
    if (status == 0) {
        uv_close((uv_handle_t *)stream, raft_free_handle);
    } else {
        assert_null(stream);
    }
    atomic_store(&p->done, true);
}

static int probe_connect(struct raft_uv_transport *t, uint64_t id, const char *address)
{
    struct connect_probe p;
    int rv;
    memset(&p, 0, sizeof p);
    p.req.data = &p;
    atomic_init(&p.done, false);
    rv = t->connect(t, &p.req, id, address, probe_cb);
    if (rv != 0) {
        return rv;
    }
    assert_true(run_until(flag_set, &p.done, 10000));
    return p.status;
}

/* ---- tests ------------------------------------------------------------------- */

static void test_cluster(void **state)
{
    struct cluster *c = calloc(1, sizeof *c);
    struct node *foreign = calloc(1, sizeof *foreign);
    uint64_t ids[3] = {1, 2, 3};
    char addrs[3][64];
    struct applied_goal goal;
    struct node *leader;
    struct kms_transport_stats before[3], after[3];
    raft_term terms[3];
    raft_id leader_id;
    char name[3][32];
    (void)state;

    assert_non_null(c);
    assert_non_null(foreign);
    for (int i = 0; i < 3; i++) {
        snprintf(addrs[i], sizeof addrs[i], "127.0.0.1:%d", free_port());
    }
    for (int i = 0; i < 3; i++) {
        struct node *n = &c->nodes[i];
        n->id = ids[i];
        snprintf(n->addr, sizeof n->addr, "%s", addrs[i]);
        snprintf(name[0], sizeof name[0], "node%d.pem", i + 1);
        snprintf(name[1], sizeof name[1], "node%d-key.pem", i + 1);
        node_start(n, name[0], name[1], "ca.pem", ids, addrs, 3, 400);
    }

    /* Election and 100 entries over mutual TLS. */
    assert_true(run_until(has_leader, c, 15000));
    leader = leader_of(c);
    apply_n(leader, 100, 1);
    goal.c = c;
    goal.want = 100;
    assert_true(run_until(all_applied, &goal, 20000));
    assert_int_equal(g_apply_done, 100);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(c->nodes[i].applied, 100);
        assert_int_equal(c->nodes[i].sum, 5050);
        before[i] = stats(&c->nodes[i].transport);
        assert_true(before[i].accepted >= 1);
        assert_true(before[i].connected >= 1);
    }

    /* A node with a foreign-CA certificate (CN kmsd-node-1, so only the CA is
     * wrong) believes it is id 1 in a cluster with nodes 2 and 3, and keeps
     * campaigning with ever higher terms. Nothing it sends may get through. */
    for (int i = 0; i < 3; i++) {
        terms[i] = c->nodes[i].raft.current_term;
    }
    leader_id = leader->id;
    foreign->id = 1;
    snprintf(foreign->addr, sizeof foreign->addr, "127.0.0.1:%d", free_port());
    {
        char faddrs[3][64];
        snprintf(faddrs[0], sizeof faddrs[0], "%s", foreign->addr);
        snprintf(faddrs[1], sizeof faddrs[1], "%s", addrs[1]);
        snprintf(faddrs[2], sizeof faddrs[2], "%s", addrs[2]);
        node_start(foreign, "foreign-node1.pem", "foreign-node1-key.pem", "ca.pem", ids,
                   faddrs, 3, 150);
    }
    run_for(2000);
    for (int i = 1; i < 3; i++) {
        after[i] = stats(&c->nodes[i].transport);
        assert_true(after[i].rejected > before[i].rejected);
        assert_int_equal(after[i].accepted, before[i].accepted);
        assert_int_equal(c->nodes[i].raft.current_term, terms[i]);
    }
    assert_true(foreign->raft.current_term > 2); /* it did campaign */
    assert_int_not_equal(raft_state(&foreign->raft), RAFT_LEADER);
    assert_int_equal(foreign->applied, 0);
    leader = leader_of(c);
    assert_non_null(leader);
    assert_int_equal(leader->id, leader_id);
    node_stop(foreign);

    /* Raw TLS client without a certificate: rejected. */
    before[0] = stats(&c->nodes[0].transport);
    assert_int_equal(raw_client_run(NULL, NULL, atoi(strchr(addrs[0], ':') + 1), 2),
                     RAW_CLOSED);
    after[0] = stats(&c->nodes[0].transport);
    assert_int_equal(after[0].rejected, before[0].rejected + 1);
    assert_int_equal(after[0].accepted, before[0].accepted);

    /* Valid certificate for kmsd-node-2 claiming to be id 3: rejected. */
    before[0] = after[0];
    assert_int_equal(raw_client_run("node2.pem", "node2-key.pem",
                                     atoi(strchr(addrs[0], ':') + 1), 3),
                     RAW_CLOSED);
    after[0] = stats(&c->nodes[0].transport);
    assert_int_equal(after[0].rejected, before[0].rejected + 1);
    assert_int_equal(after[0].accepted, before[0].accepted);

    /* Control: the same certificate claiming id 2 is handed to raft. */
    before[0] = after[0];
    assert_int_equal(raw_client_run("node2.pem", "node2-key.pem",
                                     atoi(strchr(addrs[0], ':') + 1), 2),
                     RAW_OPEN);
    after[0] = stats(&c->nodes[0].transport);
    assert_int_equal(after[0].accepted, before[0].accepted + 1);
    assert_int_equal(after[0].rejected, before[0].rejected);

    /* Operator certificate (clientAuth, CN kmsctl-operator): rejected. */
    before[0] = after[0];
    assert_int_equal(raw_client_run("operator.pem", "operator-key.pem",
                                     atoi(strchr(addrs[0], ':') + 1), 2),
                     RAW_CLOSED);
    after[0] = stats(&c->nodes[0].transport);
    assert_int_equal(after[0].rejected, before[0].rejected + 1);

    /* Dialling id 3 at node 2's address: the server is kmsd-node-2, so the
     * connect fails; dialling id 2 there succeeds. */
    before[0] = stats(&c->nodes[0].transport);
    assert_int_equal(probe_connect(&c->nodes[0].transport, 3, addrs[1]), RAFT_NOCONNECTION);
    assert_int_equal(probe_connect(&c->nodes[0].transport, 2, addrs[1]), 0);
    after[0] = stats(&c->nodes[0].transport);
    assert_int_equal(after[0].connect_failed, before[0].connect_failed + 1);
    assert_int_equal(after[0].connected, before[0].connected + 1);

    /* Reload with new files: new connections keep working. */
    {
        struct kms_err err;
        char cert[400], key[400], ca[400];
        pki_path(cert, sizeof cert, "node1.pem");
        pki_path(key, sizeof key, "node1-key.pem");
        pki_path(ca, sizeof ca, "ca.pem");
        assert_int_equal(kms_transport_tls_reload(&c->nodes[0].transport, cert, key, ca, &err),
                         0);
        pki_path(cert, sizeof cert, "missing.pem");
        assert_int_equal(kms_transport_tls_reload(&c->nodes[0].transport, cert, key, ca, &err),
                         KMS_ETLS);
        assert_int_equal(probe_connect(&c->nodes[0].transport, 2, addrs[1]), 0);
    }

    /* The cluster still commits. */
    leader = leader_of(c);
    assert_non_null(leader);
    apply_n(leader, 10, 101);
    goal.want = 110;
    assert_true(run_until(all_applied, &goal, 20000));

    for (int i = 0; i < 3; i++) {
        node_stop(&c->nodes[i]);
    }
    free(foreign);
    free(c);
}

/* Three raft nodes with hooks: stamps flow between every pair with intact
 * contents, the right peer ids and monotonic arrival times; raft commits.
 * Then a client holding node 2's valid certificate sends malformed frames
 * to node 1 (each closes its connection, is counted, raft never sees it),
 * frames without ALPN (old kmsd: accepted, no stamps), a stamp over ALPN,
 * and is refused by peer_allowed; the cluster keeps committing. */
static void test_cluster_stamps(void **state)
{
    struct cluster *c = calloc(1, sizeof *c);
    uint64_t ids[3] = {1, 2, 3};
    char addrs[3][64];
    char name[2][32];
    struct applied_goal goal;
    struct node *leader;
    struct kms_transport_stats before, after;
    uint8_t *buf = calloc(1, 4096);
    size_t n;
    int port1;
    bool got_stamps = true;
    (void)state;

    assert_non_null(c);
    assert_non_null(buf);
    for (int i = 0; i < 3; i++) {
        snprintf(addrs[i], sizeof addrs[i], "127.0.0.1:%d", free_port());
    }
    port1 = atoi(strchr(addrs[0], ':') + 1);
    for (int i = 0; i < 3; i++) {
        struct node *nd = &c->nodes[i];
        nd->id = ids[i];
        nd->hooks = true;
        snprintf(nd->addr, sizeof nd->addr, "%s", addrs[i]);
        snprintf(name[0], sizeof name[0], "node%d.pem", i + 1);
        snprintf(name[1], sizeof name[1], "node%d-key.pem", i + 1);
        node_start(nd, name[0], name[1], "ca.pem", ids, addrs, 3, 400);
    }
    assert_true(run_until(has_leader, c, 15000));
    leader = leader_of(c);
    apply_n(leader, 50, 1);
    goal.c = c;
    goal.want = 50;
    assert_true(run_until(all_applied, &goal, 20000));
    run_for(300); /* a few heartbeats both ways */
    for (int i = 0; i < 3; i++) {
        struct node *nd = &c->nodes[i];
        struct kms_transport_stats st = stats(&nd->transport);
        assert_int_equal(nd->hk.bad, 0);
        /* Followers talk only to the leader once it is elected. */
        for (uint64_t j = 1; j <= 3; j++) {
            if (j != nd->id && (nd == leader || j == leader->id)) {
                assert_true(nd->hk.from[j] > 0);
            }
        }
        assert_true(nd->hk.out_skipped > 0); /* stamp_out returning false */
        assert_int_equal(st.stamps_out, nd->hk.out_calls - nd->hk.out_skipped);
        assert_true(st.stamps_in > 0);
        assert_int_equal(st.malformed, 0);
        assert_int_equal(st.malformed_out, 0);
    }

    /* Malformed frames from a peer with a valid certificate. */
    const struct {
        const char *what;
        size_t len;
    } bad[] = {{"1,000,000 entries in a 48-byte AppendEntries header", 0},
               {"unknown type", 0},
               {"stamp without ALPN", 0},
               {"entry of type 9", 0},
               {"valid frame, then RequestVote with a short header", 0}};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        struct kms_frame_stamp st = {1, 2, 1, KMS_STAMP_LEADER, 5, 6};
        uint32_t lens[2] = {8, 8};
        n = 0;
        switch (k) {
        case 0:
            n = fb_append_entries(buf, 1, 0, NULL);
            fb_put64(buf + 16 + 32, 1000000);
            break;
        case 1:
            n = fb_fixed(buf, 7, 0, 24, 1);
            break;
        case 2:
            kms_frame_stamp_encode(&st, buf);
            n = KMS_FRAME_STAMP_SIZE;
            break;
        case 3:
            n = fb_append_entries(buf, 1, 2, lens);
            buf[16 + 40 + 16 + 8] = 9;
            memset(buf + n, 0, 16);
            n += 16;
            break;
        case 4:
            n = fb_request_vote_result(buf, 0);
            n += fb_fixed(buf + n, 3, 2, 32, 0);
            break;
        }
        before = stats(&c->nodes[0].transport);
        assert_int_equal(raw_client_send(port1, false, buf, n, NULL), RAW_CLOSED);
        after = stats(&c->nodes[0].transport);
        print_message("malformed: %s\n", bad[k].what);
        assert_int_equal(after.malformed, before.malformed + 1);
        assert_int_equal(after.accepted, before.accepted + 1);
    }

    /* An old peer (no ALPN) sending valid frames: kept open, no stamps. A
     * stale RequestVoteResult and AppendEntriesResult are ignored by raft. */
    n = fb_request_vote_result(buf, 0);
    n += fb_append_entries_result(buf + n, 0);
    before = stats(&c->nodes[0].transport);
    assert_int_equal(raw_client_send(port1, false, buf, n, &got_stamps), RAW_OPEN);
    assert_false(got_stamps);
    after = stats(&c->nodes[0].transport);
    assert_int_equal(after.malformed, before.malformed);
    assert_int_equal(after.accepted, before.accepted + 1);

    /* Over "kmsd-raft/2" a stamp from "node 2" reaches stamp_in intact and
     * is cut out of the stream (raft would drop the connection on type
     * 0xC8, and the client would see it closed). */
    {
        struct kms_frame_stamp st = {1, 2, 1, KMS_STAMP_LEADER, 77 ^ STAMP_MAGIC, 77};
        unsigned from2 = c->nodes[0].hk.from[2];
        st.sent_us = kms_mono_us();
        kms_frame_stamp_encode(&st, buf);
        n = KMS_FRAME_STAMP_SIZE;
        n += fb_request_vote_result(buf + n, 0);
        before = stats(&c->nodes[0].transport);
        assert_int_equal(raw_client_send(port1, true, buf, n, &got_stamps), RAW_OPEN);
        assert_true(got_stamps);
        after = stats(&c->nodes[0].transport);
        assert_int_equal(after.malformed, before.malformed);
        assert_true(after.stamps_in > before.stamps_in);
        assert_true(c->nodes[0].hk.from[2] > from2);
        assert_int_equal(c->nodes[0].hk.bad, 0);
    }

    /* peer_allowed = false for id 2: rejected before raft sees it. */
    c->nodes[0].hk.deny_id = 2;
    before = stats(&c->nodes[0].transport);
    assert_int_equal(raw_client_send(port1, true, NULL, 0, NULL), RAW_CLOSED);
    after = stats(&c->nodes[0].transport);
    assert_true(after.rejected >= before.rejected + 1);
    assert_int_equal(after.accepted, before.accepted);
    c->nodes[0].hk.deny_id = 0;

    /* Still one cluster, still committing. */
    assert_true(run_until(has_leader, c, 10000));
    leader = leader_of(c);
    apply_n(leader, 10, 51);
    goal.want = 60;
    assert_true(run_until(all_applied, &goal, 20000));
    for (int i = 0; i < 3; i++) {
        assert_int_equal(c->nodes[i].hk.bad, 0);
        node_stop(&c->nodes[i]);
    }
    free(buf);
    free(c);
}

/* Real InstallSnapshot through the transport: nodes 1 and 2 commit 200
 * entries with a snapshot every 32 and 8 trailing, then node 3 starts and
 * can only catch up from a snapshot (its configuration encoded by raft
 * itself must pass validation). */
static void test_cluster_snapshot(void **state)
{
    struct cluster *c = calloc(1, sizeof *c);
    uint64_t ids[3] = {1, 2, 3};
    char addrs[3][64];
    char name[2][32];
    struct applied_goal goal;
    struct node *leader;
    (void)state;

    lsan_off();
    assert_non_null(c);
    for (int i = 0; i < 3; i++) {
        snprintf(addrs[i], sizeof addrs[i], "127.0.0.1:%d", free_port());
        c->nodes[i].id = ids[i];
        c->nodes[i].hooks = true;
        c->nodes[i].snap_threshold = 32;
        snprintf(c->nodes[i].addr, sizeof c->nodes[i].addr, "%s", addrs[i]);
    }
    for (int i = 0; i < 2; i++) {
        snprintf(name[0], sizeof name[0], "node%d.pem", i + 1);
        snprintf(name[1], sizeof name[1], "node%d-key.pem", i + 1);
        node_start(&c->nodes[i], name[0], name[1], "ca.pem", ids, addrs, 3, 400);
    }
    c->nodes[2].applied = 200; /* not started: all_applied waits on 1 and 2 */
    assert_true(run_until(has_leader, c, 15000));
    leader = leader_of(c);
    apply_n(leader, 200, 1);
    goal.c = c;
    goal.want = 200;
    assert_true(run_until(all_applied, &goal, 20000));
    c->nodes[2].applied = 0;
    /* Node 3 takes no snapshots of its own: libraft 0.22.1 crashes (NULL
     * dereference in its legacy snapshot code) when a follower's own
     * snapshot completes while it installs the leader's (seen with raft's
     * TCP transport too: KMS_TEST_SNAP3=1 KMS_TEST_PLAIN_TCP=1). */
    if (getenv("KMS_TEST_SNAP3") == NULL) {
        c->nodes[2].snap_threshold = 0;
    }
    node_start(&c->nodes[2], "node3.pem", "node3-key.pem", "ca.pem", ids, addrs, 3, 400);
    assert_true(run_until(all_applied, &goal, 20000));
    assert_int_equal(c->nodes[2].sum, 200 * 201 / 2);
    assert_true(c->nodes[2].restores >= 1); /* it did install a snapshot */
    for (int i = 0; i < 3 && getenv("KMS_TEST_PLAIN_TCP") == NULL; i++) {
        struct kms_transport_stats st = stats(&c->nodes[i].transport);
        assert_int_equal(st.malformed, 0);
        assert_int_equal(st.malformed_out, 0);
        assert_int_equal(c->nodes[i].hk.bad, 0);
    }
    for (int i = 0; i < 3; i++) {
        node_stop(&c->nodes[i]);
    }
    free(c);
    lsan_on();
}

/* Data path without raft: a bulk transfer through two transports, exercising
 * back-pressure, over the given host (IPv4 literal, hostname or IPv6). */
struct pipe_test {
    struct raft_uv_transport a, b;
    uv_stream_t *accepted;
    raft_id accepted_id;
    char accepted_addr[64];
    size_t received;
    uint64_t hash;
    bool eof;
    atomic_bool a_closed, b_closed;
    struct hook_ctx ha, hb;
    char rbuf[65536];
};

static void pt_alloc(uv_handle_t *h, size_t s, uv_buf_t *buf)
{
    struct pipe_test *pt = h->data;
    (void)s;
    *buf = uv_buf_init(pt->rbuf, sizeof pt->rbuf);
}

static void pt_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    struct pipe_test *pt = stream->data;
    if (nread < 0) {
        pt->eof = true;
        uv_close((uv_handle_t *)stream, raft_free_handle);
        pt->accepted = NULL;
        return;
    }
    for (ssize_t i = 0; i < nread; i++) {
        pt->hash = pt->hash * 31 + (unsigned char)buf->base[i];
    }
    pt->received += (size_t)nread;
}

static void pt_accept(struct raft_uv_transport *t, raft_id id, const char *address,
                      struct uv_stream_s *stream)
{
    struct pipe_test *pt = t->data;
    pt->accepted = stream;
    pt->accepted_id = id;
    snprintf(pt->accepted_addr, sizeof pt->accepted_addr, "%s", address);
    stream->data = pt;
    assert_int_equal(uv_read_start(stream, pt_alloc, pt_read), 0);
}

struct pt_conn {
    struct raft_uv_connect req;
    uv_stream_t *stream;
    int status;
    bool done;
};

static void pt_connect_cb(struct raft_uv_connect *req, struct uv_stream_s *stream, int status)
{
    struct pt_conn *pc = req->data;
    pc->stream = stream;
    pc->status = status;
    pc->done = true;
}

static bool pc_done(void *arg)
{
    return ((struct pt_conn *)arg)->done;
}

struct pt_write {
    uv_write_t req;
    bool done;
    int status;
};

static void pt_write_cb(uv_write_t *req, int status)
{
    struct pt_write *w = (struct pt_write *)req;
    w->status = status;
    w->done = true;
}

static bool pw_done(void *arg)
{
    return ((struct pt_write *)arg)->done;
}

struct pt_goal {
    struct pipe_test *pt;
    size_t want;
};

static bool pt_received(void *arg)
{
    struct pt_goal *g = arg;
    return g->pt->received >= g->want;
}

static bool pt_eof(void *arg)
{
    return ((struct pipe_test *)arg)->eof;
}

static void pt_a_closed(struct raft_uv_transport *t)
{
    atomic_store(&((struct pipe_test *)t->data)->a_closed, true);
}

static void pt_b_closed(struct raft_uv_transport *t)
{
    atomic_store(&((struct pipe_test *)t->data)->b_closed, true);
}

static void run_pipe_test(const char *host, bool optional)
{
    struct pipe_test *pt = calloc(1, sizeof *pt);
    struct pt_conn pc;
    struct pt_write pw;
    struct pt_goal goal;
    char addr[128];
    size_t big = 8u << 20;
    char *data = malloc(big);
    uint64_t hash = 0;
    uv_buf_t buf;
    int rv;

    assert_non_null(pt);
    assert_non_null(data);
    /* One InstallSnapshot frame carrying big - header bytes of data: the
     * transport only forwards valid raft frames. */
    for (size_t i = 0; i < big; i++) {
        data[i] = (char)(i * 7 + (i >> 13));
    }
    fb_install_snapshot((uint8_t *)data, 5, big - FB_IS_HEADER_SIZE);
    for (size_t i = 0; i < big; i++) {
        hash = hash * 31 + (unsigned char)data[i];
    }
    snprintf(addr, sizeof addr, "%s:%d", host, free_port());
    init_transport(&pt->a, "node1.pem", "node1-key.pem", "ca.pem");
    init_transport(&pt->b, "node2.pem", "node2-key.pem", "ca.pem");
    pt->a.data = pt;
    pt->b.data = pt;
    hooks_install(&pt->a, &pt->ha, 1);
    hooks_install(&pt->b, &pt->hb, 2);
    assert_int_equal(pt->a.init(&pt->a, 1, addr), 0);
    assert_int_equal(pt->b.init(&pt->b, 2, "127.0.0.1:9"), 0);
    rv = pt->a.listen(&pt->a, pt_accept);
    if (rv != 0 && optional) {
        print_message("skipping %s: %s\n", addr, pt->a.errmsg);
        goto close;
    }
    assert_int_equal(rv, 0);

    memset(&pc, 0, sizeof pc);
    pc.req.data = &pc;
    assert_int_equal(pt->b.connect(&pt->b, &pc.req, 1, addr, pt_connect_cb), 0);
    assert_true(run_until(pc_done, &pc, 10000));
    assert_int_equal(pc.status, 0);

    memset(&pw, 0, sizeof pw);
    buf = uv_buf_init(data, (unsigned)big);
    assert_int_equal(uv_write(&pw.req, pc.stream, &buf, 1, pt_write_cb), 0);
    goal.pt = pt;
    goal.want = big;
    assert_true(run_until(pt_received, &goal, 30000));
    assert_true(run_until(pw_done, &pw, 10000));
    assert_int_equal(pw.status, 0);
    assert_int_equal(pt->received, big);
    assert_true(pt->hash == hash);
    assert_int_equal(pt->accepted_id, 2);
    assert_string_equal(pt->accepted_addr, "127.0.0.1:9");
    /* One frame, one stamp before it, cut out again (the hash matched). */
    assert_int_equal(stats(&pt->b).stamps_out, 1);
    assert_int_equal(stats(&pt->a).stamps_in, 1);
    assert_int_equal(pt->ha.from[2], 1);
    assert_int_equal(pt->ha.bad, 0);

    /* Closing the sender's stream reaches the receiver as EOF. */
    uv_close((uv_handle_t *)pc.stream, raft_free_handle);
    assert_true(run_until(pt_eof, pt, 10000));

close:
    pt->a.close(&pt->a, pt_a_closed);
    pt->b.close(&pt->b, pt_b_closed);
    assert_true(run_until(flag_set, &pt->a_closed, 5000));
    assert_true(run_until(flag_set, &pt->b_closed, 5000));
    kms_transport_tls_close(&pt->a);
    kms_transport_tls_close(&pt->b);
    free(data);
    free(pt);
}

static void test_pipe_ipv4(void **state)
{
    (void)state;
    run_pipe_test("127.0.0.1", false);
}

static void test_pipe_hostname(void **state)
{
    (void)state;
    run_pipe_test("localhost", false);
}

static void test_pipe_ipv6(void **state)
{
    (void)state;
    run_pipe_test("[::1]", true);
}

/* Raft closes the transport with a connect in flight: its callback gets
 * RAFT_CANCELED, and the close callback comes after. */
static void test_cancel_connect(void **state)
{
    struct pipe_test *pt = calloc(1, sizeof *pt);
    struct pt_conn pc;
    int lfd;
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    char addr[64];
    (void)state;

    /* A listener that never accepts: TCP connects, TLS never answers. */
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(lfd, 4), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sa, &len), 0);
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));

    init_transport(&pt->b, "node2.pem", "node2-key.pem", "ca.pem");
    pt->b.data = pt;
    assert_int_equal(pt->b.init(&pt->b, 2, "127.0.0.1:9"), 0);
    memset(&pc, 0, sizeof pc);
    pc.req.data = &pc;
    assert_int_equal(pt->b.connect(&pt->b, &pc.req, 1, addr, pt_connect_cb), 0);
    run_for(200);
    assert_false(pc.done);
    pt->b.close(&pt->b, pt_b_closed);
    assert_true(run_until(flag_set, &pt->b_closed, 5000));
    assert_true(pc.done);
    assert_int_equal(pc.status, RAFT_CANCELED);
    kms_transport_tls_close(&pt->b);
    close(lfd);
    free(pt);
}

/* A peer that connects and says nothing is dropped after the timeout, and an
 * invalid address fails the connect. */
static void test_timeout_and_bad_address(void **state)
{
    struct pipe_test *pt = calloc(1, sizeof *pt);
    struct pt_conn pc;
    struct sockaddr_in sa;
    char addr[64];
    int port = free_port();
    int fd;
    (void)state;

    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    init_transport(&pt->a, "node1.pem", "node1-key.pem", "ca.pem");
    pt->a.data = pt;
    assert_int_equal(pt->a.init(&pt->a, 1, addr), 0);
    assert_int_equal(pt->a.listen(&pt->a, pt_accept), 0);
    fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    run_for(500);
    assert_int_equal(stats(&pt->a).active, 1);
    run_for(3000); /* handshake_timeout_ms = 3000 */
    assert_int_equal(stats(&pt->a).active, 0);
    assert_int_equal(stats(&pt->a).rejected, 1);
    close(fd);

    memset(&pc, 0, sizeof pc);
    pc.req.data = &pc;
    assert_int_equal(pt->a.connect(&pt->a, &pc.req, 2, "::1:80", pt_connect_cb),
                     RAFT_NOCONNECTION);
    assert_int_equal(pt->a.connect(&pt->a, &pc.req, 2, "127.0.0.1", pt_connect_cb),
                     RAFT_NOCONNECTION);
    assert_int_equal(pt->a.connect(&pt->a, &pc.req, 2, "127.0.0.1:99999", pt_connect_cb),
                     RAFT_NOCONNECTION);
    /* Nothing listens there: refused, reported asynchronously. */
    assert_int_equal(pt->a.connect(&pt->a, &pc.req, 2, "127.0.0.1:1", pt_connect_cb), 0);
    assert_true(run_until(pc_done, &pc, 5000));
    assert_int_equal(pc.status, RAFT_NOCONNECTION);

    pt->a.close(&pt->a, pt_a_closed);
    assert_true(run_until(flag_set, &pt->a_closed, 5000));
    kms_transport_tls_close(&pt->a);
    free(pt);
}

/* An older kmsd as server: TLS without ALPN. The transport (with hooks)
 * must send it plain raft frames, no stamp. */
struct old_server {
    int lfd;
    uint8_t got[256];
    size_t got_len;
    atomic_bool done;
};

static void *old_server_main(void *arg)
{
    struct old_server *os = arg;
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    SSL *ssl = NULL;
    struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
    char path[400];
    int fd;
    int n;

    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    pki_path(path, sizeof path, "node1.pem");
    SSL_CTX_use_certificate_chain_file(ctx, path);
    pki_path(path, sizeof path, "node1-key.pem");
    SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM);
    pki_path(path, sizeof path, "ca.pem");
    SSL_CTX_load_verify_locations(ctx, path, NULL);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    fd = accept(os->lfd, NULL, NULL);
    if (fd < 0) {
        goto out;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_accept(ssl) != 1) {
        close(fd);
        goto out;
    }
    /* Everything until the client goes quiet for 1 s. */
    while (os->got_len < sizeof os->got) {
        n = SSL_read(ssl, os->got + os->got_len, (int)(sizeof os->got - os->got_len));
        if (n <= 0) {
            break;
        }
        os->got_len += (size_t)n;
    }
    SSL_free(ssl);
    close(fd);
out:
    SSL_CTX_free(ctx);
    atomic_store(&os->done, true);
    return NULL;
}

static void test_old_server_no_stamps(void **state)
{
    struct pipe_test *pt = calloc(1, sizeof *pt);
    struct old_server os;
    struct pt_conn pc;
    struct pt_write pw;
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    pthread_t th;
    uint8_t frame[64];
    size_t flen = fb_request_vote(frame, 4);
    uv_buf_t buf;
    char addr[64];
    (void)state;

    memset(&os, 0, sizeof os);
    atomic_init(&os.done, false);
    os.lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(os.lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(os.lfd, 4), 0);
    assert_int_equal(getsockname(os.lfd, (struct sockaddr *)&sa, &len), 0);
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
    assert_int_equal(pthread_create(&th, NULL, old_server_main, &os), 0);

    init_transport(&pt->b, "node2.pem", "node2-key.pem", "ca.pem");
    pt->b.data = pt;
    hooks_install(&pt->b, &pt->hb, 2);
    assert_int_equal(pt->b.init(&pt->b, 2, "127.0.0.1:9"), 0);
    memset(&pc, 0, sizeof pc);
    pc.req.data = &pc;
    assert_int_equal(pt->b.connect(&pt->b, &pc.req, 1, addr, pt_connect_cb), 0);
    assert_true(run_until(pc_done, &pc, 10000));
    assert_int_equal(pc.status, 0);
    memset(&pw, 0, sizeof pw);
    buf = uv_buf_init((char *)frame, (unsigned)flen);
    assert_int_equal(uv_write(&pw.req, pc.stream, &buf, 1, pt_write_cb), 0);
    assert_true(run_until(flag_set, &os.done, 10000));
    pthread_join(th, NULL);
    /* Preamble (24 + 16 address bytes), then the RequestVote as raft wrote
     * it: no stamp frame in between. */
    assert_int_equal(os.got_len, 40 + flen);
    assert_memory_equal(os.got + 40, frame, flen);
    assert_int_equal(stats(&pt->b).stamps_out, 0);
    assert_int_equal(pt->hb.out_calls, 0);

    uv_close((uv_handle_t *)pc.stream, raft_free_handle);
    pt->b.close(&pt->b, pt_b_closed);
    assert_true(run_until(flag_set, &pt->b_closed, 5000));
    kms_transport_tls_close(&pt->b);
    close(os.lfd);
    free(pt);
}

/* Outgoing set-up is bounded by connect_timeout_ms (default 2 s), not the
 * 10 s incoming handshake deadline: a peer that accepts TCP but never
 * answers TLS (like one whose packets vanish) is given up after ~2 s. */
static void test_connect_deadline(void **state)
{
    struct pipe_test *pt = calloc(1, sizeof *pt);
    struct pt_conn pc;
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    uint64_t t0, dt;
    char addr[64];
    int lfd;
    (void)state;

    lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(lfd, 4), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sa, &len), 0);
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));

    init_transport(&pt->b, "node2.pem", "node2-key.pem", "ca.pem"); /* handshake 3000 */
    pt->b.data = pt;
    assert_int_equal(pt->b.init(&pt->b, 2, "127.0.0.1:9"), 0);
    memset(&pc, 0, sizeof pc);
    pc.req.data = &pc;
    t0 = kms_mono_ms();
    assert_int_equal(pt->b.connect(&pt->b, &pc.req, 1, addr, pt_connect_cb), 0);
    assert_true(run_until(pc_done, &pc, 5000));
    dt = kms_mono_ms() - t0;
    assert_int_equal(pc.status, RAFT_NOCONNECTION);
    assert_true(dt >= 1900 && dt < 2900);
    assert_int_equal(stats(&pt->b).connect_failed, 1);
    pt->b.close(&pt->b, pt_b_closed);
    assert_true(run_until(flag_set, &pt->b_closed, 5000));
    kms_transport_tls_close(&pt->b);
    close(lfd);
    free(pt);
}

static void test_init_errors(void **state)
{
    struct raft_uv_transport t;
    struct kms_transport_tls_config cfg;
    struct kms_err err;
    char c[400], k[400], a[400];
    (void)state;

    memset(&cfg, 0, sizeof cfg);
    assert_int_equal(kms_transport_tls_init(&t, &g_loop, &cfg, &err), KMS_EINVAL);
    pki_path(c, sizeof c, "node1.pem");
    pki_path(k, sizeof k, "node2-key.pem"); /* wrong key */
    pki_path(a, sizeof a, "ca.pem");
    cfg.cert_file = c;
    cfg.key_file = k;
    cfg.ca_file = a;
    assert_int_equal(kms_transport_tls_init(&t, &g_loop, &cfg, &err), KMS_ETLS);
    assert_non_null(strstr(err.msg, "node2-key.pem"));
    cfg.key_file = c;
    cfg.ca_file = "/nonexistent/ca.pem";
    assert_int_equal(kms_transport_tls_init(&t, &g_loop, &cfg, &err), KMS_ETLS);
}

static int group_setup(void **state)
{
    char src[512];
    char cmd[1400];
    (void)state;
    signal(SIGPIPE, SIG_IGN);
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kms-test-transport-XXXXXX");
    if (mkdtemp(g_tmp) == NULL) {
        return -1;
    }
    snprintf(g_pki, sizeof g_pki, "%s/pki", g_tmp);
    source_dir(src, sizeof src);
    snprintf(cmd, sizeof cmd, "bash '%s/deploy/gen-pki.sh' '%s' --nodes 3", src, g_pki);
    if (system(cmd) != 0) {
        fprintf(stderr, "gen-pki.sh failed: %s\n", cmd);
        return -1;
    }
    if (uv_loop_init(&g_loop) != 0) {
        return -1;
    }
    uv_timer_init(&g_loop, &g_tick);
    return 0;
}

static int group_teardown(void **state)
{
    char cmd[400];
    int rv;
    (void)state;
    uv_close((uv_handle_t *)&g_tick, NULL);
    uv_run(&g_loop, UV_RUN_DEFAULT);
    rv = uv_loop_close(&g_loop);
    if (rv != 0) {
        fprintf(stderr, "loop still has handles: %s\n", uv_strerror(rv));
        uv_print_all_handles(&g_loop, stderr);
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    if (system(cmd) != 0) {
        return -1;
    }
    return rv == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_errors),
        cmocka_unit_test(test_pipe_ipv4),
        cmocka_unit_test(test_pipe_hostname),
        cmocka_unit_test(test_pipe_ipv6),
        cmocka_unit_test(test_cancel_connect),
        cmocka_unit_test(test_timeout_and_bad_address),
        cmocka_unit_test(test_old_server_no_stamps),
        cmocka_unit_test(test_connect_deadline),
        cmocka_unit_test(test_cluster),
        cmocka_unit_test(test_cluster_stamps),
        cmocka_unit_test(test_cluster_snapshot),
    };
    if (getenv("KMS_TEST_FILTER") != NULL) {
        cmocka_set_test_filter(getenv("KMS_TEST_FILTER")); /* e.g. "test_cluster*" */
    }
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
