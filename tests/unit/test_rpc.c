/*
 * kms_rpc: real gRPC over real TLS on 127.0.0.1 (ports 26000-26999).
 *
 * Certificates are made in a temporary directory with the openssl CLI
 * (ECDSA P-256): ca.pem, server (CN=kmsd-node-1, SAN IP:127.0.0.1,
 * DNS:localhost), client (CN=kmsd-node-2) and a foreign CA with its own
 * client certificate.
 *
 * `test_rpc --serve PORT [--plaintext] [--tls12] [--cert F --key F]` runs
 * an echo Talos-like server (Seal: blob = 0xEC || uuid-len || uuid || data;
 * Unseal reverses it, INVALID_ARGUMENT on a foreign blob, PERMISSION_DENIED
 * on a UUID mismatch) until SIGTERM; tests/integration uses it with the Go
 * client.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "kms_rpc.h"
#include "sidero/kms/kms.pb-c.h"

static char g_dir[256];
static char g_ca[300], g_srv_cert[300], g_srv_key[300], g_cli_cert[300], g_cli_key[300];
static char g_foreign_cert[300], g_foreign_key[300];
static int g_port_base;
/* KMS_TEST_RPC_TRANSPORT=h2 (ctest's test_rpc_h2): every server that is not
 * mutual TLS runs on the h2 transport (rpc_h2.c); the client stays gRPC. */
static enum kms_rpc_transport g_transport = KMS_RPC_GRPC;

/* With every server on h2, no thread of this process polls gRPC's engine
 * between the client's fail-fast calls, and a gRPC 1.51 client channel in
 * TRANSIENT_FAILURE starts its reconnect from a timer and completes it only
 * while something polls (seen with GRPC_TRACE=subchannel: "tcp_connect"
 * never completes). kmsd always runs the gRPC cluster API, whose workers
 * poll; here, tests that keep a channel across a server restart take a new
 * channel after the restart instead (as Talos, a connection per call). */
static bool renew_channels(void)
{
    return g_transport == KMS_RPC_H2;
}

static enum kms_rpc_transport transport_for(enum kms_rpc_mode mode)
{
    return mode == KMS_RPC_MTLS ? KMS_RPC_GRPC : g_transport;
}

static int next_port(void)
{
    static int n;
    return g_port_base + (n++ % 200);
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* ---- PKI ------------------------------------------------------------- */

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd);
}

static int make_pki(void)
{
    const char *gen = "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256";
    snprintf(g_dir, sizeof(g_dir), "/tmp/kms-test-rpc-XXXXXX");
    if (mkdtemp(g_dir) == NULL) {
        return -1;
    }
    if (sh("cd %s && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n"
           "extendedKeyUsage=serverAuth,clientAuth\\nbasicConstraints=CA:FALSE\\n' > ext.cnf && "
           "%s -out ca-key.pem && %s -out foreign-ca-key.pem && "
           "openssl req -x509 -new -key ca-key.pem -subj /CN=test-ca -days 2 -sha256 "
           "-addext basicConstraints=critical,CA:TRUE "
           "-addext keyUsage=critical,keyCertSign,cRLSign -out ca.pem && "
           "openssl req -x509 -new -key foreign-ca-key.pem -subj /CN=foreign-ca -days 2 -sha256 "
           "-addext basicConstraints=critical,CA:TRUE "
           "-addext keyUsage=critical,keyCertSign,cRLSign -out foreign-ca.pem && "
           "for l in server:kmsd-node-1:ca client:kmsd-node-2:ca foreign:kmsd-node-3:foreign-ca; do "
           "n=${l%%%%:*}; r=${l#*:}; cn=${r%%%%:*}; ca=${r#*:}; "
           "%s -out $n-key.pem && "
           "openssl req -new -key $n-key.pem -subj /CN=$cn -out $n.csr && "
           "openssl x509 -req -in $n.csr -CA $ca.pem -CAkey $ca-key.pem -CAcreateserial "
           "-days 2 -sha256 -extfile ext.cnf -out $n.pem 2>/dev/null || exit 1; done",
           g_dir, gen, gen, gen) != 0) {
        return -1;
    }
    snprintf(g_ca, sizeof(g_ca), "%s/ca.pem", g_dir);
    snprintf(g_srv_cert, sizeof(g_srv_cert), "%s/server.pem", g_dir);
    snprintf(g_srv_key, sizeof(g_srv_key), "%s/server-key.pem", g_dir);
    snprintf(g_cli_cert, sizeof(g_cli_cert), "%s/client.pem", g_dir);
    snprintf(g_cli_key, sizeof(g_cli_key), "%s/client-key.pem", g_dir);
    snprintf(g_foreign_cert, sizeof(g_foreign_cert), "%s/foreign.pem", g_dir);
    snprintf(g_foreign_key, sizeof(g_foreign_key), "%s/foreign-key.pem", g_dir);
    return 0;
}

/* ---- handlers -------------------------------------------------------- */

static void echo_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, req, len);
}

static void whoami_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    char buf[512];
    uint8_t ip[16];
    size_t iplen = 0;
    const char *cn = kms_rpc_call_peer_cn(call);
    int iprc = kms_rpc_call_peer_ip(call, ip, &iplen);
    uint64_t dl = kms_rpc_call_deadline_ms(call);
    int n = snprintf(buf, sizeof(buf), "cn=%s peer=%s ip=%d.%d.%d.%d/%zu dl=%s pem=%s",
                     cn != NULL ? cn : "(none)", kms_rpc_call_peer(call),
                     iprc == 0 ? ip[0] : 0, iprc == 0 ? ip[1] : 0, iprc == 0 ? ip[2] : 0,
                     iprc == 0 ? ip[3] : 0, iplen,
                     dl > 0 && dl <= 6000 ? "ok" : "bad",
                     kms_rpc_call_peer_cert_pem(call) != NULL ? "yes" : "no");
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, (const uint8_t *)buf, (size_t)n);
}

static void fail_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    kms_rpc_call_finish(call, GRPC_STATUS_NOT_FOUND, "no such key", NULL, 0);
}

struct later {
    struct kms_rpc_call *call;
    unsigned ms;
    uint8_t data[64];
    size_t len;
};

/* test_abort_hook's hook reads the parked call (it holds no reference);
 * declared here so the late finish can order itself after that read. */
static atomic_int g_abort_hooks;

static void *later_main(void *arg)
{
    struct later *l = arg;
    sleep_ms(l->ms);
    /* Acquire whatever abort hook ran meanwhile: its read of the call then
     * happens before the finish below frees it (without this, only the
     * sleep orders them, and ThreadSanitizer rightly reports the free). */
    (void)atomic_load(&g_abort_hooks);
    kms_rpc_call_finish(l->call, GRPC_STATUS_OK, NULL, l->data, l->len);
    free(l);
    return NULL;
}

/* Finishes from another thread after the number of ms in the request. */
static atomic_int g_slow_started;
static struct kms_rpc_call *_Atomic g_slow_call; /* the latest Slow call */
static void slow_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    struct later *l = calloc(1, sizeof(*l));
    pthread_t t;
    char num[16] = {0};
    memcpy(num, req, len < sizeof(num) - 1 ? len : sizeof(num) - 1);
    atomic_store(&g_slow_call, call);
    l->call = call;
    l->ms = (unsigned)atoi(num);
    l->len = len < sizeof(l->data) ? len : sizeof(l->data);
    memcpy(l->data, req, l->len);
    atomic_fetch_add(&g_slow_started, 1);
    if (pthread_create(&t, NULL, later_main, l) != 0) {
        free(l);
        kms_rpc_call_finish(call, GRPC_STATUS_INTERNAL, "thread", NULL, 0);
        return;
    }
    pthread_detach(t);
}

static struct kms_rpc_server *start_server_hook(int port, enum kms_rpc_mode mode, size_t max,
                                                unsigned workers, kms_rpc_abort_hook_fn hook,
                                                void *hook_arg)
{
    struct kms_rpc_server_config cfg;
    struct kms_rpc_server *srv = NULL;
    struct kms_err err;
    char listen[64];
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    memset(&cfg, 0, sizeof(cfg));
    cfg.listen = listen;
    cfg.mode = mode;
    cfg.transport = transport_for(cfg.mode);
    cfg.cert_file = g_srv_cert;
    cfg.key_file = g_srv_key;
    cfg.ca_file = mode == KMS_RPC_MTLS ? g_ca : NULL;
    cfg.max_message = max;
    cfg.workers = workers;
    kms_err_clear(&err);
    if (kms_rpc_server_create(&cfg, &srv, &err) != 0) {
        fprintf(stderr, "create: %s\n", err.msg);
        return NULL;
    }
    assert_int_equal(kms_rpc_server_add_method(srv, "/test.Echo/Echo", echo_cb, NULL), 0);
    assert_int_equal(kms_rpc_server_add_method(srv, "/test.Echo/Whoami", whoami_cb, NULL), 0);
    assert_int_equal(kms_rpc_server_add_method(srv, "/test.Echo/Fail", fail_cb, NULL), 0);
    assert_int_equal(kms_rpc_server_add_method(srv, "/test.Echo/Slow", slow_cb, NULL), 0);
    kms_rpc_server_set_abort_hook(srv, hook, hook_arg);
    if (kms_rpc_server_start(srv, &err) != 0) {
        fprintf(stderr, "start: %s\n", err.msg);
        kms_rpc_server_destroy(srv);
        return NULL;
    }
    return srv;
}

static struct kms_rpc_server *start_server(int port, enum kms_rpc_mode mode, size_t max,
                                           unsigned workers)
{
    return start_server_hook(port, mode, max, workers, NULL, NULL);
}

static struct kms_rpc_channel *channel(int port, const char *ca, const char *cert,
                                       const char *key, bool plaintext)
{
    struct kms_rpc_channel *ch = NULL;
    struct kms_rpc_client_tls tls = {ca, cert, key};
    struct kms_err err;
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    kms_err_clear(&err);
    if (kms_rpc_channel_create(target, plaintext ? NULL : &tls, &ch, &err) != 0) {
        fprintf(stderr, "channel: %s\n", err.msg);
        return NULL;
    }
    return ch;
}

/* Returns the gRPC status; copies the response (NUL-terminated) into out. */
static int call(struct kms_rpc_channel *ch, const char *method, const void *req, size_t len,
                char *out, size_t outlen, unsigned deadline_ms)
{
    uint8_t *resp = NULL;
    size_t rlen = 0;
    int status = -1;
    char *details = NULL;
    struct kms_err err;
    kms_err_clear(&err);
    int rc = kms_rpc_unary(ch, method, req, len, deadline_ms, &resp, &rlen, &status, &details,
                           &err);
    assert_int_equal(rc, 0);
    if (out != NULL && outlen > 0) {
        size_t n = rlen < outlen - 1 ? rlen : outlen - 1;
        if (resp != NULL) {
            memcpy(out, resp, n);
        }
        out[resp != NULL ? n : 0] = '\0';
        if (status != 0 && details != NULL) {
            snprintf(out, outlen, "%s", details);
        }
    }
    free(resp);
    free(details);
    return status;
}

static bool tcp_refused(int port)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int rc, e;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    e = errno;
    close(fd);
    return rc != 0 && e == ECONNREFUSED;
}

/* ---- tests ----------------------------------------------------------- */

static void test_tls_echo(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 4096, 2);
    struct kms_rpc_channel *ch;
    char out[512];
    assert_non_null(srv);
    ch = channel(port, g_ca, NULL, NULL, false);
    assert_non_null(ch);
    assert_int_equal(call(ch, "/test.Echo/Echo", "hello", 5, out, sizeof(out), 5000), 0);
    assert_string_equal(out, "hello");
    /* empty request and response */
    assert_int_equal(call(ch, "/test.Echo/Echo", "", 0, out, sizeof(out), 5000), 0);
    assert_string_equal(out, "");
    assert_int_equal(call(ch, "/test.Echo/Whoami", "x", 1, out, sizeof(out), 5000), 0);
    assert_non_null(strstr(out, "cn=(none)"));
    assert_non_null(strstr(out, "peer=ipv4:127.0.0.1:"));
    assert_non_null(strstr(out, "ip=127.0.0.1/4"));
    assert_non_null(strstr(out, "dl=ok"));
    assert_int_equal(call(ch, "/test.Echo/Fail", "x", 1, out, sizeof(out), 5000),
                     GRPC_STATUS_NOT_FOUND);
    assert_string_equal(out, "no such key");
    assert_int_equal(call(ch, "/test.Echo/Nope", "x", 1, out, sizeof(out), 5000),
                     GRPC_STATUS_UNIMPLEMENTED);
    kms_rpc_channel_destroy(ch);

    /* Plaintext client against a TLS server fails. */
    ch = channel(port, NULL, NULL, NULL, true);
    assert_int_equal(call(ch, "/test.Echo/Echo", "x", 1, out, sizeof(out), 2000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_channel_destroy(ch);
    /* A client trusting another CA fails. */
    snprintf(out, sizeof(out), "%s/foreign-ca.pem", g_dir);
    ch = channel(port, out, NULL, NULL, false);
    assert_int_equal(call(ch, "/test.Echo/Echo", "x", 1, out, sizeof(out), 2000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_stop(srv, 1000);
    kms_rpc_server_destroy(srv);
}

static void test_plaintext_echo(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_INSECURE, 4096, 1);
    struct kms_rpc_channel *ch;
    char out[64];
    assert_non_null(srv);
    ch = channel(port, NULL, NULL, NULL, true);
    assert_int_equal(call(ch, "/test.Echo/Echo", "plain", 5, out, sizeof(out), 5000), 0);
    assert_string_equal(out, "plain");
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_destroy(srv);
}

static void test_mtls(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_MTLS, 0, 2);
    struct kms_rpc_channel *ch;
    char out[512];
    assert_non_null(srv);

    ch = channel(port, g_ca, NULL, NULL, false); /* no client cert */
    assert_int_equal(call(ch, "/test.Echo/Echo", "x", 1, out, sizeof(out), 3000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_channel_destroy(ch);

    ch = channel(port, g_ca, g_foreign_cert, g_foreign_key, false); /* foreign CA */
    assert_int_equal(call(ch, "/test.Echo/Echo", "x", 1, out, sizeof(out), 3000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_channel_destroy(ch);

    ch = channel(port, g_ca, g_cli_cert, g_cli_key, false);
    assert_int_equal(call(ch, "/test.Echo/Whoami", "x", 1, out, sizeof(out), 3000), 0);
    assert_non_null(strstr(out, "cn=kmsd-node-2 "));
    assert_non_null(strstr(out, "pem=yes"));
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_stop(srv, 1000);
    kms_rpc_server_destroy(srv);
}

static void test_max_message(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 4096, 1);
    struct kms_rpc_channel *ch = channel(port, g_ca, NULL, NULL, false);
    char *big = calloc(1, 5 * 1024);
    char out[64];
    assert_non_null(srv);
    memset(big, 'a', 5 * 1024);
    assert_int_equal(call(ch, "/test.Echo/Echo", big, 5 * 1024, out, sizeof(out), 5000),
                     GRPC_STATUS_RESOURCE_EXHAUSTED);
    assert_int_equal(call(ch, "/test.Echo/Echo", big, 4000, NULL, 0, 5000), 0);
    /* the connection survives */
    assert_int_equal(call(ch, "/test.Echo/Echo", "ok", 2, out, sizeof(out), 5000), 0);
    free(big);
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_destroy(srv);
}

static void test_async_finish(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 0, 1);
    struct kms_rpc_channel *ch = channel(port, g_ca, NULL, NULL, false);
    char out[64];
    double t0 = now_ms();
    assert_non_null(srv);
    assert_int_equal(call(ch, "/test.Echo/Slow", "200", 3, out, sizeof(out), 5000), 0);
    assert_string_equal(out, "200");
    assert_true(now_ms() - t0 >= 190);
    /* a parked call does not block the single worker */
    {
        struct kms_rpc_channel *ch2 = channel(port, g_ca, NULL, NULL, false);
        assert_int_equal(call(ch2, "/test.Echo/Echo", "x", 1, out, sizeof(out), 5000), 0);
        kms_rpc_channel_destroy(ch2);
    }
    /* deadline shorter than the handler: DEADLINE_EXCEEDED, then the late
     * finish is harmless */
    assert_int_equal(call(ch, "/test.Echo/Slow", "500", 3, out, sizeof(out), 100),
                     GRPC_STATUS_DEADLINE_EXCEEDED);
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_stop(srv, 2000);
    kms_rpc_server_destroy(srv);
}

struct bg_call {
    int port;
    const char *req;
    int status;
    pthread_t t;
};

static void *bg_call_main(void *arg)
{
    struct bg_call *b = arg;
    struct kms_rpc_channel *ch = channel(b->port, g_ca, NULL, NULL, false);
    char out[64];
    b->status = call(ch, "/test.Echo/Slow", b->req, strlen(b->req), out, sizeof(out), 10000);
    kms_rpc_channel_destroy(ch);
    return NULL;
}

static void test_stop_restart(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 4096, 2);
    struct kms_rpc_server *srv2 = NULL;
    struct kms_rpc_channel *ch = channel(port, g_ca, NULL, NULL, false);
    struct bg_call b = {port, "400", -1, 0};
    struct kms_err err;
    char out[128];
    double t0;
    assert_non_null(srv);
    assert_int_equal(call(ch, "/test.Echo/Echo", "a", 1, out, sizeof(out), 5000), 0);
    assert_false(tcp_refused(port));

    /* Port busy: a second server on the same port fails, naming it. */
    {
        struct kms_rpc_server_config cfg = {0};
        char listen[64];
        snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
        cfg.listen = listen;
        cfg.mode = KMS_RPC_INSECURE;
        cfg.transport = transport_for(cfg.mode);
        kms_err_clear(&err);
        assert_int_equal(kms_rpc_server_create(&cfg, &srv2, &err), 0);
        assert_int_equal(kms_rpc_server_start(srv2, &err), KMS_EIO);
        assert_non_null(strstr(err.msg, listen));
        kms_rpc_server_destroy(srv2);
        srv2 = NULL;
    }

    /* In-flight call during stop gets its grace period; the listener is
     * closed at once. */
    atomic_store(&g_slow_started, 0);
    pthread_create(&b.t, NULL, bg_call_main, &b);
    while (atomic_load(&g_slow_started) == 0) {
        sleep_ms(5);
    }
    t0 = now_ms();
    kms_rpc_server_stop(srv, 3000);
    assert_true(now_ms() - t0 >= 300);
    pthread_join(b.t, NULL);
    assert_int_equal(b.status, 0);
    assert_true(tcp_refused(port));
    assert_int_equal(call(ch, "/test.Echo/Echo", "a", 1, out, sizeof(out), 2000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_server_destroy(srv);

    /* Restart on the same port. */
    srv = start_server(port, KMS_RPC_TLS, 4096, 2);
    assert_non_null(srv);
    if (renew_channels()) {
        kms_rpc_channel_destroy(ch);
        ch = channel(port, g_ca, NULL, NULL, false);
    }
    t0 = now_ms();
    int st;
    while ((st = call(ch, "/test.Echo/Echo", "b", 1, out, sizeof(out), 2000)) != 0 &&
           now_ms() - t0 < 3000) {
        assert_int_equal(st, GRPC_STATUS_UNAVAILABLE);
        sleep_ms(50);
    }
    assert_int_equal(st, 0);
    assert_string_equal(out, "b");

    /* Grace over: the in-flight call is cancelled with UNAVAILABLE. */
    atomic_store(&g_slow_started, 0);
    b.req = "1500";
    b.status = -1;
    pthread_create(&b.t, NULL, bg_call_main, &b);
    while (atomic_load(&g_slow_started) == 0) {
        sleep_ms(5);
    }
    t0 = now_ms();
    kms_rpc_server_stop(srv, 100);
    /* The stop does not wait for the parked handler (it finishes 1.5 s after
     * it started): the server answers the open call itself. */
    fprintf(stderr, "stop(100) with a handler parked for 1.5 s took %.0f ms\n", now_ms() - t0);
    assert_true(now_ms() - t0 < 1000);
    pthread_join(b.t, NULL);
    assert_int_equal(b.status, GRPC_STATUS_UNAVAILABLE);
    kms_rpc_server_destroy(srv);
    kms_rpc_channel_destroy(ch);
    /* The handler's late kms_rpc_call_finish() runs after the server is
     * gone and only releases the call (ASan checks it). */
    sleep_ms(1600);
}

/* The abort hook runs once the stop has answered a parked call itself, and
 * the call is already done when it runs (a parked handler woken by it sees
 * kms_rpc_call_done()). */
static atomic_bool g_abort_saw_done;
static void abort_hook_cb(void *arg)
{
    struct kms_rpc_call *c = atomic_load(&g_slow_call);
    (void)arg;
    atomic_store(&g_abort_saw_done, c != NULL && kms_rpc_call_done(c));
    atomic_fetch_add(&g_abort_hooks, 1);
}

static void test_abort_hook(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server_hook(port, KMS_RPC_TLS, 4096, 2, abort_hook_cb,
                                                   NULL);
    struct bg_call b = {port, "1500", -1, 0};
    assert_non_null(srv);
    /* a stop with nothing open answers nothing: no hook */
    {
        struct kms_rpc_server *idle = start_server_hook(next_port(), KMS_RPC_TLS, 4096, 1,
                                                        abort_hook_cb, NULL);
        assert_non_null(idle);
        kms_rpc_server_stop(idle, 0);
        kms_rpc_server_destroy(idle);
        assert_int_equal(atomic_load(&g_abort_hooks), 0);
    }
    atomic_store(&g_slow_started, 0);
    atomic_store(&g_slow_call, NULL);
    pthread_create(&b.t, NULL, bg_call_main, &b);
    while (atomic_load(&g_slow_started) == 0) {
        sleep_ms(5);
    }
    assert_false(kms_rpc_call_done(atomic_load(&g_slow_call)));
    kms_rpc_server_stop(srv, 100);
    assert_int_equal(atomic_load(&g_abort_hooks), 1);
    assert_true(atomic_load(&g_abort_saw_done));
    pthread_join(b.t, NULL);
    assert_int_equal(b.status, GRPC_STATUS_UNAVAILABLE);
    kms_rpc_server_destroy(srv);
    /* the parked handler's late finish only releases the call */
    sleep_ms(1600);
}

static atomic_int g_keep_polls;
static bool keep_300ms_cb(void *arg)
{
    double *t0 = arg;
    atomic_fetch_add(&g_keep_polls, 1);
    return now_ms() - *t0 < 300;
}

/* kms_rpc_unary_watch: a call abandoned by its poll callback is cancelled at
 * once and reported CANCELLED, long before the handler would answer. */
static void test_unary_watch(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 0, 1);
    struct kms_rpc_channel *ch = channel(port, g_ca, NULL, NULL, false);
    uint8_t *resp = NULL;
    size_t rlen = 0;
    int status = -1;
    char *details = NULL;
    struct kms_err err;
    double t0;
    (void)state;
    assert_non_null(srv);
    kms_err_clear(&err);
    atomic_store(&g_keep_polls, 0);
    t0 = now_ms();
    assert_int_equal(kms_rpc_unary_watch(ch, "/test.Echo/Slow", (const uint8_t *)"1500", 4, 5000,
                                         50, keep_300ms_cb, &t0, &resp, &rlen, &status,
                                         &details, &err),
                     0);
    assert_int_equal(status, GRPC_STATUS_CANCELLED);
    assert_null(resp);
    assert_true(now_ms() - t0 >= 250);
    assert_true(now_ms() - t0 < 1000);
    assert_true(atomic_load(&g_keep_polls) >= 3);
    free(details);
    /* a call that completes first is not affected */
    details = NULL;
    t0 = now_ms();
    assert_int_equal(kms_rpc_unary_watch(ch, "/test.Echo/Slow", (const uint8_t *)"100", 3, 5000,
                                         50, keep_300ms_cb, &t0, &resp, &rlen, &status,
                                         &details, &err),
                     0);
    assert_int_equal(status, GRPC_STATUS_OK);
    assert_int_equal(rlen, 3);
    free(resp);
    free(details);
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_stop(srv, 2000);
    kms_rpc_server_destroy(srv);
    sleep_ms(1600); /* the abandoned handler's late finish */
}

/* The connect timeout bounds one connection attempt, not gRPC's 100 ms
 * reconnect backoff: against a listener that never answers the handshake,
 * a call with a 3 s deadline and a 1.5 s connect timeout lasts >= 1.5 s. */
static void test_connect_timeout(void **state)
{
    int port = next_port();
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct kms_rpc_client_tls tls = {g_ca, NULL, NULL};
    struct kms_rpc_channel_options opts = {1500, NULL};
    struct kms_rpc_channel *ch = NULL;
    struct kms_err err;
    char target[64];
    double t0, dt;
    int one = 1;
    (void)state;
    assert_true(fd >= 0);
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fd, 16), 0); /* the kernel accepts; nobody answers */
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    kms_err_clear(&err);
    assert_int_equal(kms_rpc_channel_create_opts(target, &tls, &opts, &ch, &err), 0);
    t0 = now_ms();
    int st = call(ch, "/test.Echo/Echo", "x", 1, NULL, 0, 3000);
    dt = now_ms() - t0;
    fprintf(stderr, "connect timeout 1.5 s: call ended after %.0f ms (status %d)\n", dt, st);
    assert_true(st == GRPC_STATUS_UNAVAILABLE || st == GRPC_STATUS_DEADLINE_EXCEEDED);
    assert_true(dt >= 1300);
    kms_rpc_channel_destroy(ch);
    close(fd);
}

struct load {
    int port;
    int calls;
    atomic_int ok, unavailable, cancelled, other;
    atomic_bool stop;
    struct kms_rpc_channel *shared;
};

static void *load_main(void *arg)
{
    struct load *l = arg;
    char req[32], out[64];
    struct kms_rpc_channel *ch = l->shared;
    if (ch == NULL) {
        ch = channel(l->port, g_ca, NULL, NULL, false);
    }
    for (int i = 0; l->calls > 0 ? i < l->calls : !atomic_load(&l->stop); i++) {
        int n = snprintf(req, sizeof(req), "req-%d", i);
        int st = call(ch, "/test.Echo/Echo", req, (size_t)n, out, sizeof(out), 5000);
        if (st == 0 && strcmp(out, req) == 0) {
            atomic_fetch_add(&l->ok, 1);
        } else if (st == GRPC_STATUS_UNAVAILABLE) {
            atomic_fetch_add(&l->unavailable, 1);
            sleep_ms(10);
            if (renew_channels() && ch != l->shared) {
                kms_rpc_channel_destroy(ch);
                ch = channel(l->port, g_ca, NULL, NULL, false);
            }
        } else if (st == GRPC_STATUS_CANCELLED) {
            /* gRPC 1.51 cancels calls that reach a connection in the few
             * microseconds between shutdown and its GOAWAY. */
            atomic_fetch_add(&l->cancelled, 1);
        } else {
            fprintf(stderr, "load: status %d (%s)\n", st, out);
            atomic_fetch_add(&l->other, 1);
        }
    }
    if (ch != l->shared) {
        kms_rpc_channel_destroy(ch);
    }
    return NULL;
}

static void test_concurrent(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 4096, 2);
    struct load l;
    pthread_t t[8];
    assert_non_null(srv);
    memset(&l, 0, sizeof(l));
    l.port = port;
    l.calls = 25;
    l.shared = channel(port, g_ca, NULL, NULL, false);
    for (int i = 0; i < 8; i++) {
        pthread_create(&t[i], NULL, load_main, &l);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(t[i], NULL);
    }
    assert_int_equal(atomic_load(&l.ok), 200);
    assert_int_equal(atomic_load(&l.other) + atomic_load(&l.unavailable) +
                         atomic_load(&l.cancelled),
                     0);
    kms_rpc_channel_destroy(l.shared);
    kms_rpc_server_destroy(srv);
}

/* start -> stop -> start cycles on one port while clients hammer it. */
static void test_cycles_under_load(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 4096, 2);
    struct load l;
    pthread_t t[4];
    int ok_before;
    assert_non_null(srv);
    memset(&l, 0, sizeof(l));
    l.port = port;
    for (int i = 0; i < 4; i++) {
        pthread_create(&t[i], NULL, load_main, &l);
    }
    for (int c = 0; c < 5; c++) {
        sleep_ms(200);
        kms_rpc_server_stop(srv, 500);
        kms_rpc_server_destroy(srv);
        assert_true(tcp_refused(port));
        sleep_ms(100);
        srv = start_server(port, KMS_RPC_TLS, 4096, 2);
        assert_non_null(srv);
    }
    ok_before = atomic_load(&l.ok);
    sleep_ms(1500); /* channels back off at most 1 s */
    assert_true(atomic_load(&l.ok) > ok_before);
    atomic_store(&l.stop, true);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
    }
    fprintf(stderr, "cycles: ok=%d unavailable=%d cancelled=%d other=%d\n",
            atomic_load(&l.ok), atomic_load(&l.unavailable), atomic_load(&l.cancelled),
            atomic_load(&l.other));
    assert_int_equal(atomic_load(&l.other), 0);
    assert_true(atomic_load(&l.cancelled) < atomic_load(&l.ok) / 50);
    kms_rpc_server_destroy(srv);
}

static void test_reload(void **state)
{
    int port = next_port();
    char cert[400], key[400];
    struct kms_rpc_server_config cfg = {0};
    struct kms_rpc_server *srv = NULL;
    struct kms_rpc_channel *ch;
    struct kms_err err;
    char listen[64], out[64];
    snprintf(cert, sizeof(cert), "%s/live.pem", g_dir);
    snprintf(key, sizeof(key), "%s/live-key.pem", g_dir);
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    /* start with the foreign-CA certificate, then rotate to ours */
    assert_int_equal(sh("cp %s %s && cp %s %s", g_foreign_cert, cert, g_foreign_key, key), 0);
    cfg.listen = listen;
    cfg.mode = KMS_RPC_TLS;
    cfg.transport = transport_for(cfg.mode);
    cfg.cert_file = cert;
    cfg.key_file = key;
    cfg.workers = 1;
    kms_err_clear(&err);
    assert_int_equal(kms_rpc_server_create(&cfg, &srv, &err), 0);
    assert_int_equal(kms_rpc_server_add_method(srv, "/test.Echo/Echo", echo_cb, NULL), 0);
    assert_int_equal(kms_rpc_server_start(srv, &err), 0);
    ch = channel(port, g_ca, NULL, NULL, false);
    assert_int_equal(call(ch, "/test.Echo/Echo", "x", 1, out, sizeof(out), 2000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_channel_destroy(ch);
    /* a broken file + reload keeps the old certificate */
    assert_int_equal(sh("echo garbage > %s", cert), 0);
    kms_rpc_server_reload_tls(srv);
    ch = channel(port, g_ca, NULL, NULL, false);
    assert_int_equal(call(ch, "/test.Echo/Echo", "x", 1, out, sizeof(out), 2000),
                     GRPC_STATUS_UNAVAILABLE);
    kms_rpc_channel_destroy(ch);
    assert_int_equal(sh("cp %s %s && cp %s %s", g_srv_cert, cert, g_srv_key, key), 0);
    kms_rpc_server_reload_tls(srv);
    ch = channel(port, g_ca, NULL, NULL, false);
    assert_int_equal(call(ch, "/test.Echo/Echo", "y", 1, out, sizeof(out), 3000), 0);
    kms_rpc_channel_destroy(ch);
    kms_rpc_server_destroy(srv);
}

static void test_bad_config(void **state)
{
    struct kms_rpc_server_config cfg = {0};
    struct kms_rpc_server *srv = NULL;
    struct kms_err err;
    cfg.listen = "127.0.0.1:26999";
    cfg.mode = KMS_RPC_TLS;
    cfg.transport = transport_for(cfg.mode);
    cfg.cert_file = g_srv_cert;
    cfg.key_file = g_cli_key; /* does not match */
    kms_err_clear(&err);
    assert_int_equal(kms_rpc_server_create(&cfg, &srv, &err), KMS_ETLS);
    assert_non_null(strstr(err.msg, "does not match"));
    cfg.key_file = "/nonexistent/key.pem";
    assert_int_equal(kms_rpc_server_create(&cfg, &srv, &err), KMS_EIO);
    assert_non_null(strstr(err.msg, "/nonexistent/key.pem"));
    cfg.mode = KMS_RPC_MTLS;
    cfg.transport = transport_for(cfg.mode);
    assert_int_equal(kms_rpc_server_create(&cfg, &srv, &err), KMS_ECONFIG);
    assert_null(srv);
}

/* Raw OpenSSL client: handshake with the given limits/ALPN, then speak
 * HTTP/2 and report whether the server answered with a SETTINGS frame. */
static int raw_tls(int port, int max_version, bool alpn_h2, bool *handshake_ok)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = NULL;
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int got = 0;
    *handshake_ok = false;
    /* This process's policy sets NO_TLSv1_2 for every context; undo it to
     * act as a foreign TLS 1.2 client. */
    SSL_CTX_clear_options(ctx, SSL_OP_NO_TLSv1_2);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(ctx, max_version);
    if (alpn_h2) {
        static const unsigned char h2[] = {2, 'h', '2'};
        SSL_CTX_set_alpn_protos(ctx, h2, sizeof(h2));
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        goto out;
    }
    {
        struct timeval tv = {2, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    }
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) {
        goto out;
    }
    *handshake_ok = true;
    {
        static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        static const unsigned char settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
        unsigned char buf[64];
        int n;
        if (SSL_write(ssl, preface, (int)strlen(preface)) <= 0 ||
            SSL_write(ssl, settings, sizeof(settings)) <= 0) {
            goto out;
        }
        n = SSL_read(ssl, buf, sizeof(buf));
        got = n >= 9 && buf[3] == 4 ? 1 : 0; /* server SETTINGS frame */
    }
out:
    ERR_clear_error();
    if (ssl != NULL) {
        SSL_free(ssl);
    }
    close(fd);
    SSL_CTX_free(ctx);
    return got;
}

static void test_tls_policy(void **state)
{
    int port = next_port();
    struct kms_rpc_server *srv = start_server(port, KMS_RPC_TLS, 4096, 1);
    bool hs;
    assert_non_null(srv);
    /* TLS 1.3 + h2: a gRPC server answers */
    assert_int_equal(raw_tls(port, TLS1_3_VERSION, true, &hs), 1);
    assert_true(hs);
    /* TLS 1.2 only: refused in the handshake (policy is 1.3 only) */
    assert_int_equal(raw_tls(port, TLS1_2_VERSION, true, &hs), 0);
    assert_false(hs);
    /* No ALPN: the TLS handshake completes but gRPC closes the connection
     * (its peer check wants the negotiated "h2") */
    assert_int_equal(raw_tls(port, TLS1_3_VERSION, false, &hs), 0);
    kms_rpc_server_destroy(srv);
}

/* ---- --serve mode (integration) ---------------------------------------- */

static volatile sig_atomic_t g_term;
static void on_term(int sig)
{
    g_term = 1;
}

static void serve_seal(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    Sidero__Kms__Request *r = sidero__kms__request__unpack(NULL, len, req);
    Sidero__Kms__Response resp = SIDERO__KMS__RESPONSE__INIT;
    uint8_t blob[512], out[600];
    size_t ulen, n;
    if (r == NULL || r->data.len == 0 || (ulen = strlen(r->node_uuid)) > 200 ||
        r->data.len > 256) {
        if (r != NULL) {
            sidero__kms__request__free_unpacked(r, NULL);
        }
        kms_rpc_call_finish(call, GRPC_STATUS_INVALID_ARGUMENT, "bad request", NULL, 0);
        return;
    }
    blob[0] = 0xEC;
    blob[1] = (uint8_t)ulen;
    memcpy(blob + 2, r->node_uuid, ulen);
    memcpy(blob + 2 + ulen, r->data.data, r->data.len);
    resp.data.data = blob;
    resp.data.len = 2 + ulen + r->data.len;
    n = sidero__kms__response__pack(&resp, out);
    sidero__kms__request__free_unpacked(r, NULL);
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, out, n);
}

static void serve_unseal(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t len)
{
    Sidero__Kms__Request *r = sidero__kms__request__unpack(NULL, len, req);
    Sidero__Kms__Response resp = SIDERO__KMS__RESPONSE__INIT;
    uint8_t out[600];
    size_t n, ulen;
    if (r == NULL || r->data.len < 3 || r->data.data[0] != 0xEC ||
        (size_t)r->data.data[1] + 2 > r->data.len) {
        if (r != NULL) {
            sidero__kms__request__free_unpacked(r, NULL);
        }
        kms_rpc_call_finish(call, GRPC_STATUS_INVALID_ARGUMENT, "malformed blob", NULL, 0);
        return;
    }
    ulen = r->data.data[1];
    if (strlen(r->node_uuid) != ulen || memcmp(r->node_uuid, r->data.data + 2, ulen) != 0) {
        sidero__kms__request__free_unpacked(r, NULL);
        kms_rpc_call_finish(call, GRPC_STATUS_PERMISSION_DENIED, "uuid mismatch", NULL, 0);
        return;
    }
    resp.data.data = r->data.data + 2 + ulen;
    resp.data.len = r->data.len - 2 - ulen;
    n = sidero__kms__response__pack(&resp, out);
    sidero__kms__request__free_unpacked(r, NULL);
    kms_rpc_call_finish(call, GRPC_STATUS_OK, NULL, out, n);
}

static int serve(int argc, char **argv)
{
    struct kms_rpc_server_config cfg = {0};
    struct kms_rpc_server *srv = NULL;
    struct kms_err err;
    char listen[64];
    bool tls12 = false;
    kms_err_clear(&err);
    snprintf(listen, sizeof(listen), "127.0.0.1:%s", argv[2]);
    cfg.listen = listen;
    cfg.mode = KMS_RPC_TLS;
    cfg.transport = transport_for(cfg.mode);
    cfg.max_message = 4096;
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--plaintext") == 0) {
            cfg.mode = KMS_RPC_INSECURE;
            cfg.transport = transport_for(cfg.mode);
        } else if (strcmp(argv[i], "--tls12") == 0) {
            tls12 = true;
        } else if (strcmp(argv[i], "--cert") == 0 && i + 1 < argc) {
            cfg.cert_file = argv[++i];
        } else if (strcmp(argv[i], "--key") == 0 && i + 1 < argc) {
            cfg.key_file = argv[++i];
        }
    }
    cfg.allow_tls12 = tls12; /* a Talos-like port: 1.2 too when asked */
    if (kms_rpc_global_init(tls12, &err) != 0 || kms_rpc_server_create(&cfg, &srv, &err) != 0 ||
        kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Seal", serve_seal, NULL) != 0 ||
        kms_rpc_server_add_method(srv, "/sidero.kms.KMSService/Unseal", serve_unseal, NULL) !=
            0 ||
        kms_rpc_server_start(srv, &err) != 0) {
        fprintf(stderr, "serve: %s\n", err.msg);
        return 1;
    }
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    fprintf(stderr, "serving on %s\n", listen);
    while (!g_term) {
        pause();
    }
    kms_rpc_server_stop(srv, 1000);
    kms_rpc_server_destroy(srv);
    kms_rpc_global_shutdown();
    return 0;
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_tls_echo),
        cmocka_unit_test(test_plaintext_echo),
        cmocka_unit_test(test_mtls),
        cmocka_unit_test(test_max_message),
        cmocka_unit_test(test_async_finish),
        cmocka_unit_test(test_tls_policy),
        cmocka_unit_test(test_reload),
        cmocka_unit_test(test_concurrent),
        cmocka_unit_test(test_stop_restart),
        cmocka_unit_test(test_abort_hook),
        cmocka_unit_test(test_unary_watch),
        cmocka_unit_test(test_connect_timeout),
        cmocka_unit_test(test_cycles_under_load),
    };
    struct kms_err err;
    int rc;

    {
        const char *t = getenv("KMS_TEST_RPC_TRANSPORT");
        g_transport = t != NULL && strcmp(t, "h2") == 0 ? KMS_RPC_H2 : KMS_RPC_GRPC;
    }
    if (argc >= 3 && strcmp(argv[1], "--serve") == 0) {
        return serve(argc, argv);
    }
    signal(SIGPIPE, SIG_IGN);
    if (make_pki() != 0) {
        fprintf(stderr, "cannot generate test certificates with openssl\n");
        return 1;
    }
    /* ports 26000-26999: spread by pid so parallel runs rarely collide */
    g_port_base = 26000 + (int)(getpid() % 4) * 200;
    kms_err_clear(&err);
    if (kms_rpc_global_init(false, &err) != 0) {
        fprintf(stderr, "global init: %s\n", err.msg);
        return 1;
    }
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    kms_rpc_global_shutdown();
    sh("rm -rf %s", g_dir);
    return rc;
}
