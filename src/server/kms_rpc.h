/*
 * kms_rpc: unary gRPC over the gRPC C core (libgrpc 1.51), server and client.
 *
 * Used by the Talos API (server TLS, 4 KiB messages), the cluster API (mutual
 * TLS), follower-to-leader forwarding and kmsctl (clients). Messages are
 * opaque bytes: callers pack and unpack protobuf-c themselves.
 *
 * Process set-up: call kms_rpc_global_init() once, before any other use of
 * OpenSSL's TLS (it installs the TLS version policy through an OpenSSL config
 * that must be loaded before the first SSL_CTX is created), and
 * kms_rpc_global_shutdown() at exit after every server and channel is gone.
 *
 * Server threads: N workers each poll their own completion queue and run the
 * handlers. A handler receives the request bytes (valid only during the
 * handler) and must complete the call exactly once with kms_rpc_call_finish(),
 * from the handler or later from any thread. Handlers must not block a
 * worker (workers also drive gRPC's polling: TLS handshakes and new calls):
 * one that must wait parks the call on its own thread and finishes it there.
 * The call object (and the strings its accessors return) stays valid until
 * the handler's kms_rpc_call_finish() returns, even if the server stopped
 * and answered the call UNAVAILABLE meanwhile (kms_rpc_call_done()).
 */
#ifndef KMS_RPC_H
#define KMS_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/status.h> /* GRPC_STATUS_* for handlers */

#include "kms_err.h"

/* ---- process-wide ---------------------------------------------------- */

/* Loads the TLS policy (TLS 1.3 only; TLS 1.2 too when allow_tls12) into
 * OpenSSL's system_default configuration, checks that it took effect, routes
 * gRPC's own log lines into kms_log (module "grpc", warnings and errors), then
 * calls grpc_init(). Call once, early, before any TLS context exists. A second
 * call only adds a grpc_init() reference (the first policy stays). */
int kms_rpc_global_init(bool allow_tls12, struct kms_err *err);

/* grpc_shutdown_blocking(): balances kms_rpc_global_init(); then waits (up
 * to 3 s, a warning if longer) until channels destroyed earlier have let
 * gRPC shut down. Call it last, at exit. */
void kms_rpc_global_shutdown(void);

/* True when kms_rpc_global_init() allowed TLS 1.2. */
bool kms_rpc_tls12_allowed(void);

/* ---- server ---------------------------------------------------------- */

/* How a server speaks HTTP/2 (kms_rpc_server_config.transport). */
enum kms_rpc_transport {
    KMS_RPC_GRPC = 0, /* the gRPC C core (every mode) */
    KMS_RPC_H2 = 1,   /* OpenSSL + nghttp2, rpc_h2.c: TLS and INSECURE only, no
                       * client certificates; same API, same limits (the Talos
                       * port: about half the CPU per new connection) */
};

enum kms_rpc_mode {
    KMS_RPC_TLS = 0,      /* server certificate only (Talos API) */
    KMS_RPC_MTLS = 1,     /* client certificate required, verified against ca_file */
    KMS_RPC_INSECURE = 2, /* plaintext h2c; only when explicitly asked */
};

struct kms_rpc_server_config {
    const char *listen;      /* "host:port", "[::]:4050", "0.0.0.0:4050" */
    enum kms_rpc_mode mode;
    const char *cert_file;   /* PEM chain (TLS, MTLS) */
    const char *key_file;    /* PEM private key (TLS, MTLS) */
    const char *ca_file;     /* PEM CA bundle for client certs (MTLS; optional for TLS) */
    unsigned workers;        /* worker threads; 0 = number of online CPUs */
    size_t max_message;      /* max receive and send message bytes; 0 = 4 MiB */
    bool allow_tls12;        /* accept TLS 1.2 too, if kms_rpc_global_init allowed it;
                              * false: this port negotiates TLS 1.3 only */
    enum kms_rpc_transport transport; /* 0 = KMS_RPC_GRPC */

    /* Resource limits (docs/security.md "Limits"); 0 takes the default. */
    unsigned max_conns;            /* open connections, all peers; 0 = 1024 */
    unsigned max_conns_per_addr;   /* open connections per source address; 0 = 64 */
    unsigned handshake_timeout_ms; /* TCP accept to HTTP/2 settings, TLS included; 0 = 10 s */
    unsigned max_streams;          /* concurrent streams per connection; 0 = 16 */
    size_t memory_quota;           /* gRPC resource quota (transport buffers); 0 = 64 MiB */
    unsigned max_idle_ms;          /* close connections idle this long; 0 = 5 min */
    unsigned max_age_ms;           /* GOAWAY connections older than this; 0 = 30 min */
    unsigned long long max_conn_bytes; /* shut down a connection that received more; 0 = off */
    unsigned ban_after;            /* byte-budget kills in 10 s that ban the address; 0 = never */
    unsigned ban_ms;               /* how long such an address is refused */
};

struct kms_rpc_server;
struct kms_rpc_call;

typedef void (*kms_rpc_handler_fn)(void *arg, struct kms_rpc_call *call, const uint8_t *req,
                                   size_t reqlen);

/* Validates cfg and reads the TLS files once (so a bad path fails here); the
 * strings in cfg are copied. Nothing is bound yet. */
int kms_rpc_server_create(const struct kms_rpc_server_config *cfg,
                          struct kms_rpc_server **out, struct kms_err *err);

/* Registers a unary method by full path ("/sidero.kms.KMSService/Seal").
 * Before kms_rpc_server_start() only. Unknown methods get UNIMPLEMENTED. */
int kms_rpc_server_add_method(struct kms_rpc_server *srv, const char *path,
                              kms_rpc_handler_fn fn, void *arg);

/* Binds the listener and starts the workers. KMS_EIO naming the address when
 * it cannot be bound (port busy, bad address). A server can be started once;
 * to listen again after kms_rpc_server_stop(), destroy it and create another
 * (the same port can be reused at once). */
int kms_rpc_server_start(struct kms_rpc_server *srv, struct kms_err *err);

/* Stops in this order: (1) the listener is closed at once (new connections
 * are refused); (2) connections already accepted deliver their calls and
 * open calls may finish normally, until none is open and none arrived for
 * 250 ms, at most grace_ms; (3) calls still open are answered UNAVAILABLE by
 * the server itself (their handlers' later kms_rpc_call_finish() only
 * releases the call) and late arrivals get UNAVAILABLE without a handler;
 * (4) gRPC's shutdown, the workers exit. It does not wait for parked
 * handlers. Call from one thread (not a worker); idempotent. */
void kms_rpc_server_stop(struct kms_rpc_server *srv, unsigned grace_ms);

/* Wake-up for parked handlers: fn(arg) runs on the stopping thread each
 * time kms_rpc_server_stop() has itself answered open calls UNAVAILABLE
 * (step 3), after kms_rpc_call_done() became true for every one of them,
 * so that a handler waiting for something else (a lease) can give up at
 * once instead of noticing at its next check. fn must not block and must
 * not use srv. Before kms_rpc_server_start() only. */
typedef void (*kms_rpc_abort_hook_fn)(void *arg);
void kms_rpc_server_set_abort_hook(struct kms_rpc_server *srv, kms_rpc_abort_hook_fn fn,
                                   void *arg);

/* Stops (with grace 0) if still running, then frees. NULL is accepted. */
void kms_rpc_server_destroy(struct kms_rpc_server *srv);

/* Re-reads cert, key and CA files for the handshakes that follow (existing
 * connections are untouched). Thread- and signal-safe (sets a flag; the
 * files are read at the next handshake; if they are unreadable or invalid
 * the old material stays and an error is logged). */
void kms_rpc_server_reload_tls(struct kms_rpc_server *srv);

/* True when srv cannot reload in place and must be rebuilt to pick up new
 * TLS files: a TLS 1.3-only server in a process whose policy also allows
 * TLS 1.2 (talos.tls12) uses static credentials (gRPC 1.51 drops the
 * per-server version floor for fetched configs). Any thread. */
bool kms_rpc_server_reload_needs_rebuild(const struct kms_rpc_server *srv);

/* Reads cert_file and key_file and checks that they parse and match (what
 * the servers' reload would accept). Any thread. */
int kms_rpc_check_tls_files(const char *cert_file, const char *key_file, struct kms_err *err);

/* Bound port (useful with "127.0.0.1:0"); 0 before start. */
int kms_rpc_server_port(const struct kms_rpc_server *srv);

/* Checks that the running server's accept loop really accepts: connects to
 * its port and waits up to timeout_ms for the accept filter to see the
 * connection (kms_connlimit.h). Returns an enum kms_probe_result (0 = ok).
 * Blocks; call from a thread that is not a worker. */
int kms_rpc_server_probe(const struct kms_rpc_server *srv, unsigned timeout_ms);

/* Connection counters of the running server (kms_connlimit.h). */
struct kms_connlimit_stats;
void kms_rpc_server_conn_stats(const struct kms_rpc_server *srv,
                               struct kms_connlimit_stats *out);

/* Completes the call: grpc_status GRPC_STATUS_OK sends resp (may be empty);
 * any other status sends no message and details (may be NULL). Exactly once
 * per call, from any thread (the worker that received it, or another one the
 * handler parked it on); the call must not be used afterwards. The handler
 * owns one reference to the call until then, so the call stays valid even
 * after the server has stopped (it then already answered UNAVAILABLE and
 * this only releases the call). Thread-safe. */
void kms_rpc_call_finish(struct kms_rpc_call *call, int grpc_status, const char *details,
                         const uint8_t *resp, size_t resplen);

/* Observation of a call's outcome (metrics, audit). The hook runs inside
 * kms_rpc_call_finish() of the handler (not for the server's own
 * UNAVAILABLE answers while stopping), on the finishing thread, before the
 * status is sent; call, its peer, CN and note are valid during it. It must
 * not block and must not finish the call. Set it from the handler before
 * the call can be finished (e.g. first thing in the handler). */
typedef void (*kms_rpc_finish_hook_fn)(void *arg, struct kms_rpc_call *call, int grpc_status,
                                       const char *details);
void kms_rpc_call_set_finish_hook(struct kms_rpc_call *call, kms_rpc_finish_hook_fn fn,
                                  void *arg);

/* Microseconds since the call arrived (server side). Thread-safe. */
uint64_t kms_rpc_call_age_us(const struct kms_rpc_call *call);

/* A short note the handler attaches to the call for the audit line ("reset",
 * "key_id=..."): copied, cut at KMS_RPC_NOTE_MAX - 1 bytes. Never a secret.
 * Handler's thread only, before the finish. kms_rpc_call_note() is "" when
 * none was set. */
#define KMS_RPC_NOTE_MAX 160
void kms_rpc_call_note_set(struct kms_rpc_call *call, const char *note);
const char *kms_rpc_call_note(const struct kms_rpc_call *call);

/* True once the call has been finished (by its handler, or by the server
 * while stopping). A parked handler may test it to give up early (the
 * server's abort hook says when to test again); it must still call
 * kms_rpc_call_finish() exactly once. Thread-safe. */
bool kms_rpc_call_done(const struct kms_rpc_call *call);

/* Full method path of the call. */
const char *kms_rpc_call_method(const struct kms_rpc_call *call);

/* gRPC peer string: "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555". Never NULL. */
const char *kms_rpc_call_peer(const struct kms_rpc_call *call);

/* Peer IP as raw bytes: 4 (IPv4, also for IPv4-mapped IPv6) or 16 bytes.
 * KMS_ENOTFOUND for a non-IP peer (unix socket). */
int kms_rpc_call_peer_ip(const struct kms_rpc_call *call, uint8_t ip[16], size_t *iplen);

/* Subject CN of the verified client certificate (mTLS), else NULL. */
const char *kms_rpc_call_peer_cn(const struct kms_rpc_call *call);

/* PEM of the client's leaf certificate (mTLS), else NULL. */
const char *kms_rpc_call_peer_cert_pem(const struct kms_rpc_call *call);

/* Milliseconds left until the client's deadline (0 when already past);
 * UINT64_MAX when the client set none. */
uint64_t kms_rpc_call_deadline_ms(const struct kms_rpc_call *call);

/* ---- client ---------------------------------------------------------- */

/* Files for a TLS channel; with cert_file/key_file NULL no client certificate
 * is presented. ca_file NULL means the system roots. */
struct kms_rpc_client_tls {
    const char *ca_file;
    const char *cert_file;
    const char *key_file;
};

struct kms_rpc_channel;

/* Channel options; zero fields take the defaults. */
struct kms_rpc_channel_options {
    /* Bound on one connection attempt (TCP connect + TLS handshake); the
     * call's deadline still applies. 0 = 5 s. kmsctl passes --timeout. */
    unsigned connect_timeout_ms;
    /* When set (TLS only): the server certificate's subject must hold
     * exactly one CN, equal to this string, on top of the usual chain and
     * host name checks; otherwise the handshake fails (the call sees
     * UNAVAILABLE) and an error is logged. Copied. */
    const char *expect_peer_cn;
};

/* The check behind expect_peer_cn, for tests: 0 when the PEM certificate's
 * subject holds exactly one CN and it equals cn, else KMS_EDENIED (with the
 * reason in err) or KMS_EFORMAT (not a certificate). */
int kms_rpc_peer_cn_check(const char *peer_pem, const char *cn, struct kms_err *err);

/* target "host:port". tls NULL = plaintext (h2c). The connection is made
 * lazily and re-made after failures; the channel is thread-safe and may be
 * shared by many concurrent kms_rpc_unary() calls. */
int kms_rpc_channel_create(const char *target, const struct kms_rpc_client_tls *tls,
                           struct kms_rpc_channel **out, struct kms_err *err);

/* kms_rpc_channel_create with options (opts NULL = defaults). */
int kms_rpc_channel_create_opts(const char *target, const struct kms_rpc_client_tls *tls,
                                const struct kms_rpc_channel_options *opts,
                                struct kms_rpc_channel **out, struct kms_err *err);

/* Optional: max response size accepted (default 4 MiB). */
void kms_rpc_channel_set_max_message(struct kms_rpc_channel *ch, size_t max);

/* Blocking unary call. Returns 0 when the call completed (any gRPC status:
 * see *grpc_status, *details malloc'd or NULL); *resp is malloc'd (NULL when
 * the status is not OK) and *resplen set. A non-zero return (KMS_ENOMEM,
 * KMS_EINVAL) means the call could not be started; transport failures are
 * reported as status UNAVAILABLE / DEADLINE_EXCEEDED, not as errors.
 * Waits for the connection until the deadline (wait_for_ready is off: a
 * refused connection fails fast with UNAVAILABLE). */
int kms_rpc_unary(struct kms_rpc_channel *ch, const char *method_path, const uint8_t *req,
                  size_t reqlen, unsigned deadline_ms, uint8_t **resp, size_t *resplen,
                  int *grpc_status, char **details, struct kms_err *err);

/* Polled by kms_rpc_unary_watch() on the calling thread while the call is in
 * flight; return false to abandon the call. */
typedef bool (*kms_rpc_keep_fn)(void *arg);

/* kms_rpc_unary() that calls keep_cb(keep_arg) every poll_ms (0 = 100 ms)
 * while waiting. When keep_cb returns false the call is cancelled locally and
 * completes with *grpc_status CANCELLED, details "abandoned by the caller"
 * (the server may or may not have acted on the request). keep_cb NULL is
 * kms_rpc_unary(). */
int kms_rpc_unary_watch(struct kms_rpc_channel *ch, const char *method_path,
                        const uint8_t *req, size_t reqlen, unsigned deadline_ms,
                        unsigned poll_ms, kms_rpc_keep_fn keep_cb, void *keep_arg,
                        uint8_t **resp, size_t *resplen, int *grpc_status, char **details,
                        struct kms_err *err);

void kms_rpc_channel_destroy(struct kms_rpc_channel *ch);

/* The gRPC status codes, once: {code, NAME, CamelName, description}.
 * NAME is what logs and metrics print ("UNAVAILABLE"), CamelName what
 * kmsctl prints (grpc-go's spelling, "Unavailable"), the description a
 * lower-case phrase for error messages. */
#define KMS_RPC_STATUS_TABLE(X)                                               \
    X(0, "OK", "OK", "ok")                                                    \
    X(1, "CANCELLED", "Canceled", "call cancelled")                           \
    X(2, "UNKNOWN", "Unknown", "unknown error")                               \
    X(3, "INVALID_ARGUMENT", "InvalidArgument", "invalid argument")           \
    X(4, "DEADLINE_EXCEEDED", "DeadlineExceeded", "deadline exceeded")        \
    X(5, "NOT_FOUND", "NotFound", "not found")                                \
    X(6, "ALREADY_EXISTS", "AlreadyExists", "already exists")                 \
    X(7, "PERMISSION_DENIED", "PermissionDenied", "permission denied")        \
    X(8, "RESOURCE_EXHAUSTED", "ResourceExhausted", "resource exhausted")     \
    X(9, "FAILED_PRECONDITION", "FailedPrecondition", "failed precondition")  \
    X(10, "ABORTED", "Aborted", "aborted")                                    \
    X(11, "OUT_OF_RANGE", "OutOfRange", "out of range")                       \
    X(12, "UNIMPLEMENTED", "Unimplemented", "not implemented by this server") \
    X(13, "INTERNAL", "Internal", "internal error")                           \
    X(14, "UNAVAILABLE", "Unavailable", "unavailable")                        \
    X(15, "DATA_LOSS", "DataLoss", "data loss")                               \
    X(16, "UNAUTHENTICATED", "Unauthenticated", "not authenticated")

/* Name of a gRPC status code ("UNAVAILABLE"); "UNKNOWN_STATUS" for a code
 * outside the table. Never NULL; any thread. */
const char *kms_rpc_status_name(int grpc_status);

/* kmsctl's spelling ("Unavailable"); "Unknown" outside the table. */
const char *kms_rpc_status_camel(int grpc_status);

/* Description ("unavailable"); NULL outside the table. */
const char *kms_rpc_status_desc(int grpc_status);

#endif /* KMS_RPC_H */
