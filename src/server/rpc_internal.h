/*
 * Private to the kms_rpc library; not part of its API (kms_rpc.h).
 *
 * Shared helpers (rpc_client.c, tls_policy.c, rpc_tls.c): PEM files and
 * certificate/key checks.
 *
 * The server's internals, shared by its four files:
 *   rpc_server.c  lifecycle: create, start, stop, destroy; owns the server
 *   rpc_tls.c     credentials and the certificate-config fetcher (reload)
 *   rpc_worker.c  request slots, worker threads and their completion queues
 *   rpc_call.c    the call object: creation, finish, accessors, the abort
 *                 of open calls while stopping
 *   rpc_h2.c      the second transport (KMS_RPC_H2): listener, event loops,
 *                 TLS and HTTP/2 without the gRPC C core; it shares the call
 *                 object, its accounting and stop steps 1-3 (its own header
 *                 comment has its threads and ownership)
 *
 * Threads. The thread that owns the server (kmsd's supervisor or main)
 * runs create, add_method, start, stop and destroy. Each worker thread
 * owns one completion queue and handles every event on it (new requests,
 * finish batches, the shutdown tag). Handlers may finish their call from
 * any thread. The certificate fetcher runs on whichever gRPC thread does a
 * handshake (often another server's worker).
 *
 * Locks. srv->mu guards state, shutdown_done, the call counters, the calls
 * list and refusing/last_call; srv->cv is signalled (CLOCK_MONOTONIC) on
 * every change of them. srv->tls_mu serialises the fetcher's loads. The two
 * are never held together, and neither is held while a handler or a hook
 * runs or a batch is started (call_send drops srv->mu first).
 *
 * Tags handed to gRPC: every tag points to a struct whose first member is
 * `enum rpc_tag_kind` (struct rpc_slot, struct kms_rpc_call, the shutdown
 * tag). KMS_TSAN_RELEASE before handing one over, KMS_TSAN_ACQUIRE when a
 * worker gets it back (kms_tsan.h).
 */
#ifndef KMS_RPC_INTERNAL_H
#define KMS_RPC_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>

#include "kms_connlimit.h"
#include "kms_err.h"
#include "kms_rpc.h"

/* ---- shared helpers (tls_policy.c) ---------------------------------- */

/* Reads a whole (PEM) file into a NUL-terminated malloc'd string; limit 1 MiB.
 * `what` names the file in the error ("certificate"). */
int kms_rpc_read_pem(const char *path, const char *what, char **out, struct kms_err *err);

/* Checks that cert_pem parses as at least one certificate, key_pem as a
 * private key, and that they match. ca_pem (optional) must hold at least
 * one certificate. */
int kms_rpc_check_tls(const char *cert_pem, const char *key_pem, const char *ca_pem,
                      struct kms_err *err);

/* Wipes (OPENSSL_cleanse) and frees a key PEM. NULL is accepted. */
void kms_rpc_free_secret(char *pem);

/* ---- server internals ---------------------------------------------- */

#define RPC_SLOTS_PER_METHOD 4
#define RPC_MAX_METHODS 64

enum rpc_tag_kind { RPC_TAG_REQUEST = 1, RPC_TAG_FINISH, RPC_TAG_SHUTDOWN };

enum rpc_srv_state { RPC_ST_CREATED, RPC_ST_RUNNING, RPC_ST_STOPPED };

struct rpc_method {
    char *path;   /* owned */
    kms_rpc_handler_fn fn;
    void *arg;
    void *handle; /* grpc_server_register_method() */
};

/* One armed request (rpc_worker.c). Written by the worker that owns its
 * queue (and by start, before the workers run). */
struct rpc_slot {
    enum rpc_tag_kind kind; /* RPC_TAG_REQUEST, 0 once dead; first member */
    struct kms_rpc_server *srv;
    bool generic;               /* unregistered methods: UNIMPLEMENTED */
    grpc_call_details details;  /* generic only */
    unsigned method;
    unsigned cq;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_byte_buffer *payload;
};

/* A call (rpc_call.c). Two references: the handler's (dropped by
 * kms_rpc_call_finish) and gRPC's (dropped when the finish batch completes
 * on a worker, rpc_call_grpc_done). The call is finished by its handler or,
 * while the server stops, by the server itself (UNAVAILABLE): whoever wins
 * the exchange on `finished` sends the status; the handler's later finish
 * only drops its reference. */
struct kms_rpc_call {
    enum rpc_tag_kind kind;     /* RPC_TAG_FINISH; first member */
    struct kms_rpc_server *srv; /* used only while the gRPC side is live */
    grpc_call *call;
    char method[128];
    char *peer;
    char *cn;
    char *cert_pem;
    gpr_timespec deadline; /* monotonic */
    size_t max_message;
    atomic_int refs;       /* handler + gRPC side */
    atomic_bool finished;  /* status sent (by the handler or the server) */
    bool by_server;        /* finished by the server while stopping */
    struct kms_rpc_call *prev, *next; /* srv->calls, under srv->mu */
    /* batch state */
    grpc_byte_buffer *send;
    grpc_slice details;
    bool has_details;
    int cancelled;
    /* observation (kms_rpc_call_set_finish_hook, _note_set): written by the
     * handler's thread before the finish, read in kms_rpc_call_finish */
    uint64_t arrival_us;   /* kms_mono_us() when the call was created */
    kms_rpc_finish_hook_fn finish_hook;
    void *finish_hook_arg;
    char note[KMS_RPC_NOTE_MAX];
    /* KMS_RPC_H2 only (rpc_h2.c): the connection (its loop keeps it while
     * this points to it) and stream; the queued answer, written by the
     * finishing thread before it queues the call, read by the loop. */
    struct h2_conn *h2_conn;
    int32_t h2_stream;
    int h2_status;
    char *h2_details;
    uint8_t *h2_resp;
    size_t h2_resplen;
    struct kms_rpc_call *h2_qnext;
};

struct kms_rpc_server {
    /* configuration (owned copies; written before start, read-only after) */
    char *listen;
    enum kms_rpc_mode mode;
    char *cert_file, *key_file, *ca_file;
    unsigned workers;
    size_t max_message;
    bool allow_tls12;
    enum kms_rpc_transport transport;
    struct rpc_h2 *h2;          /* KMS_RPC_H2: rpc_h2.c's state, from start to destroy */
    struct kms_connlimit conn_limit;
    unsigned handshake_timeout_ms, max_streams, max_idle_ms, max_age_ms;
    size_t memory_quota;
    grpc_resource_quota *quota; /* one reference, released at destroy */
    bool limit_registered;      /* port registered with kms_connlimit */
    kms_rpc_abort_hook_fn abort_hook; /* kms_rpc_server_set_abort_hook */
    void *abort_hook_arg;

    struct rpc_method methods[RPC_MAX_METHODS];
    unsigned n_methods;

    grpc_server *server;
    grpc_completion_queue **cqs; /* one per worker */
    pthread_t *threads;
    unsigned n_threads;          /* workers started */
    struct rpc_slot *slots;
    size_t n_slots;
    int port;

    /* TLS material for the certificate-config fetcher (rpc_tls.c) */
    pthread_mutex_t tls_mu;
    atomic_bool reload;
    atomic_bool tls_given; /* the fetcher returned an initial config */

    struct { enum rpc_tag_kind kind; } shutdown_tag;

    pthread_mutex_t mu;
    pthread_cond_t cv;          /* CLOCK_MONOTONIC */
    enum rpc_srv_state state;
    bool shutdown_done;
    size_t live_calls;          /* calls whose gRPC side is live (finish batch pending) */
    size_t open_calls;          /* calls not finished yet */
    struct kms_rpc_call *calls; /* every call with a live gRPC side */
    bool refusing;              /* stop step 3: new calls get UNAVAILABLE */
    struct timespec last_call;  /* CLOCK_MONOTONIC of the last call's arrival */
};

/* rpc_tls.c. Reads cert, key and roots into malloc'd strings (key: free
 * with kms_rpc_free_secret) and checks that they match. Any thread. */
int rpc_tls_load(struct kms_rpc_server *srv, char **cert, char **key, char **roots,
                 struct kms_err *err);

/* rpc_tls.c. The listener's credentials (insecure, static TLS or the
 * reload fetcher); NULL on failure (logged). Start only. */
grpc_server_credentials *rpc_tls_creds_create(struct kms_rpc_server *srv);

/* rpc_worker.c. Arms every slot (srv->slots, allocated by start) once the
 * server runs. Start only, before rpc_workers_start. */
void rpc_slots_arm_all(struct kms_rpc_server *srv);

/* rpc_worker.c. Starts one thread per completion queue; srv->n_threads
 * counts those that run. 0, or KMS_ENOMEM when not all could start. */
int rpc_workers_start(struct kms_rpc_server *srv);

/* rpc_worker.c. After grpc_server_destroy: shuts every queue down, joins
 * the workers, drains the queues no worker ran and destroys them all. */
void rpc_workers_join(struct kms_rpc_server *srv);

/* rpc_call.c. A worker got a request: makes its call (two references),
 * links it into srv->calls and counts it open. NULL when out of memory (the
 * caller then cancels the grpc call). *refusing: the server stops and the
 * call must be answered UNAVAILABLE without a handler. Worker only. */
struct kms_rpc_call *rpc_call_create(struct kms_rpc_server *srv, grpc_call *call,
                                     const char *method, gpr_timespec deadline,
                                     bool *refusing);

/* rpc_call.c. The transport-neutral parts of rpc_call_create. rpc_call_new
 * makes the call (peer copied, deadline on GPR_CLOCK_MONOTONIC or
 * infinite); the caller fills its transport fields, then rpc_call_link
 * links it into srv->calls and counts it open (from then on stop step 3 may
 * finish it). The caller has counted srv->live_calls. */
struct kms_rpc_call *rpc_call_new(struct kms_rpc_server *srv, const char *method,
                                  const char *peer, gpr_timespec deadline);
void rpc_call_link(struct kms_rpc_call *c, bool *refusing);

/* rpc_h2.c. Start: listener, TLS context, accept filter, loops; on failure
 * the caller stops and destroys srv as after any failed start. */
int rpc_h2_start(struct kms_rpc_server *srv, struct kms_err *err);

/* rpc_h2.c. Stop step 4: waits up to wait_ms for answers to be written,
 * closes every connection, joins the loops, waits for every call's
 * transport side. The stopping thread. */
void rpc_h2_shutdown(struct kms_rpc_server *srv, unsigned wait_ms);

/* rpc_h2.c. Frees what rpc_h2_start made. Destroy only, after shutdown. */
void rpc_h2_free(struct kms_rpc_server *srv);

/* rpc_h2.c. call_send for an h2 call: queues the answer on the call's loop
 * (any thread). */
void rpc_h2_call_send(struct kms_rpc_call *c, int grpc_status, const char *details,
                      const uint8_t *resp, size_t resplen);

/* rpc_call.c. The gRPC side of c is over (its finish batch completed, or
 * never started): releases the grpc objects, unlinks it and drops gRPC's
 * reference. Worker (RPC_TAG_FINISH), or the finishing thread on error. */
void rpc_call_grpc_done(struct kms_rpc_call *c);

/* rpc_call.c. Stop step 3: finishes every open call with UNAVAILABLE and
 * makes calls that still arrive refused; then runs the abort hook when it
 * finished any. Returns how many it finished. The stopping thread only. */
size_t rpc_calls_abort(struct kms_rpc_server *srv);

#endif /* KMS_RPC_INTERNAL_H */
