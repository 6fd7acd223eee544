/*
 * The gRPC server's request slots and worker threads.
 *
 * Each worker thread owns one completion queue registered with the server.
 * For every (method, queue) pair RPC_SLOTS_PER_METHOD requests are armed
 * with grpc_server_request_registered_call (payload read by gRPC), plus one
 * generic request per queue for unregistered methods. When a request
 * completes, its data moves into a fresh call (rpc_call_create), the slot
 * is re-armed at once (so a handler that parks a call does not block
 * accepting the next), and the handler runs on the worker. The worker that
 * sees a call's finish batch complete releases its gRPC side
 * (rpc_call_grpc_done); the one that gets the shutdown tag sets
 * srv->shutdown_done. A slot belongs to its queue's worker once the
 * workers run; start arms them before.
 *
 * Workers exit when their queue is shut down (rpc_workers_join, after
 * grpc_server_destroy); a request that fails (ok == false) after gRPC's
 * shutdown kills its slot.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_tsan.h"
#include "rpc_internal.h"

static void arm(struct rpc_slot *s)
{
    struct kms_rpc_server *srv = s->srv;
    grpc_call_error ce;
    s->call = NULL;
    s->payload = NULL;
    grpc_metadata_array_init(&s->md);
    KMS_TSAN_RELEASE(s);
    if (s->generic) {
        grpc_call_details_init(&s->details);
        ce = grpc_server_request_call(srv->server, &s->call, &s->details, &s->md,
                                      srv->cqs[s->cq], srv->cqs[s->cq], s);
    } else {
        ce = grpc_server_request_registered_call(srv->server, srv->methods[s->method].handle,
                                                 &s->call, &s->deadline, &s->md, &s->payload,
                                                 srv->cqs[s->cq], srv->cqs[s->cq], s);
    }
    if (ce != GRPC_CALL_OK) {
        /* Only after shutdown began. */
        grpc_metadata_array_destroy(&s->md);
        if (s->generic) {
            grpc_call_details_destroy(&s->details);
        }
        s->kind = 0;
    }
}

static void on_request(struct rpc_slot *s, bool ok)
{
    struct kms_rpc_server *srv = s->srv;
    struct rpc_method *m = s->generic ? NULL : &srv->methods[s->method];
    struct kms_rpc_call *c;
    grpc_byte_buffer *payload = s->payload;
    grpc_call *call = s->call;
    gpr_timespec deadline = s->generic ? s->details.deadline : s->deadline;
    uint8_t *req = NULL;
    size_t reqlen = 0;
    bool refusing;

    grpc_metadata_array_destroy(&s->md);
    if (s->generic) {
        grpc_call_details_destroy(&s->details);
    }
    if (!ok) {
        /* Server shutting down: the slot is dead. */
        s->kind = 0;
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        if (call != NULL) {
            grpc_call_unref(call);
        }
        return;
    }
    pthread_mutex_lock(&srv->mu);
    srv->live_calls++;
    pthread_mutex_unlock(&srv->mu);
    /* Re-arm even while stopping: calls that reach the server between
     * grpc_server_shutdown_and_notify() and the GOAWAY would otherwise sit
     * unmatched and be failed with CANCELLED instead of being served in the
     * grace period. After shutdown the request fails with ok=false. */
    arm(s);

    c = rpc_call_create(srv, call, m != NULL ? m->path : "(unregistered)", deadline, &refusing);
    if (c == NULL) {
        grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
                                     NULL);
        grpc_call_unref(call);
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        pthread_mutex_lock(&srv->mu);
        srv->live_calls--;
        pthread_cond_broadcast(&srv->cv);
        pthread_mutex_unlock(&srv->mu);
        return;
    }

    if (refusing) {
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        kms_rpc_call_finish(c, GRPC_STATUS_UNAVAILABLE, "server is closing this listener; retry",
                            NULL, 0);
        return;
    }
    if (m == NULL) {
        if (payload != NULL) {
            grpc_byte_buffer_destroy(payload);
        }
        kms_rpc_call_finish(c, GRPC_STATUS_UNIMPLEMENTED, "unknown method", NULL, 0);
        return;
    }
    if (payload == NULL) {
        /* No message: the client half-closed without one, or gRPC already
         * failed the call (e.g. over the size limit). */
        kms_rpc_call_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "missing request message", NULL, 0);
        return;
    }
    {
        grpc_byte_buffer_reader rd;
        grpc_slice all;
        if (!grpc_byte_buffer_reader_init(&rd, payload)) {
            grpc_byte_buffer_destroy(payload);
            kms_rpc_call_finish(c, GRPC_STATUS_INTERNAL, "cannot read request", NULL, 0);
            return;
        }
        all = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
        grpc_byte_buffer_destroy(payload);
        reqlen = GRPC_SLICE_LENGTH(all);
        req = malloc(reqlen > 0 ? reqlen : 1);
        if (req == NULL) {
            grpc_slice_unref(all);
            kms_rpc_call_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
            return;
        }
        memcpy(req, GRPC_SLICE_START_PTR(all), reqlen);
        /* Requests may hold secrets (Seal data). */
        memset(GRPC_SLICE_START_PTR(all), 0, reqlen);
        grpc_slice_unref(all);
    }
    m->fn(m->arg, c, req, reqlen);
    memset(req, 0, reqlen);
    free(req);
}

static void *worker_main(void *arg)
{
    struct kms_rpc_server *srv = ((void **)arg)[0];
    grpc_completion_queue *cq = ((void **)arg)[1];
    free(arg);

    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            break;
        }
        if (ev.type != GRPC_OP_COMPLETE || ev.tag == NULL) {
            continue;
        }
        KMS_TSAN_ACQUIRE(ev.tag);
        switch (*(enum rpc_tag_kind *)ev.tag) {
        case RPC_TAG_REQUEST:
            on_request(ev.tag, ev.success != 0);
            break;
        case RPC_TAG_FINISH:
            rpc_call_grpc_done(ev.tag);
            break;
        case RPC_TAG_SHUTDOWN:
            pthread_mutex_lock(&srv->mu);
            srv->shutdown_done = true;
            pthread_cond_broadcast(&srv->cv);
            pthread_mutex_unlock(&srv->mu);
            break;
        default:
            break;
        }
    }
    return NULL;
}

void rpc_slots_arm_all(struct kms_rpc_server *srv)
{
    for (unsigned w = 0, n = 0; w < srv->workers; w++) {
        for (unsigned m = 0; m < srv->n_methods; m++) {
            for (unsigned j = 0; j < RPC_SLOTS_PER_METHOD; j++, n++) {
                struct rpc_slot *s = &srv->slots[n];
                s->kind = RPC_TAG_REQUEST;
                s->srv = srv;
                s->method = m;
                s->cq = w;
                arm(s);
            }
        }
        srv->slots[n].kind = RPC_TAG_REQUEST;
        srv->slots[n].srv = srv;
        srv->slots[n].generic = true;
        srv->slots[n].cq = w;
        arm(&srv->slots[n]);
        n++;
    }
}

int rpc_workers_start(struct kms_rpc_server *srv)
{
    for (unsigned i = 0; i < srv->workers; i++) {
        void **a = malloc(2 * sizeof(void *));
        if (a == NULL) {
            break;
        }
        a[0] = srv;
        a[1] = srv->cqs[i];
        if (pthread_create(&srv->threads[i], NULL, worker_main, a) != 0) {
            free(a);
            break;
        }
        srv->n_threads++;
    }
    return srv->n_threads < srv->workers ? KMS_ENOMEM : 0;
}

/* Waits for the shutdown event of a queue no worker runs, then frees it. */
static void cq_drain_destroy(grpc_completion_queue *cq)
{
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
}

void rpc_workers_join(struct kms_rpc_server *srv)
{
    for (unsigned i = 0; srv->cqs != NULL && i < srv->workers; i++) {
        if (srv->cqs[i] != NULL) {
            grpc_completion_queue_shutdown(srv->cqs[i]);
        }
    }
    for (unsigned i = 0; i < srv->n_threads; i++) {
        pthread_join(srv->threads[i], NULL);
    }
    for (unsigned i = 0; srv->cqs != NULL && i < srv->workers; i++) {
        if (srv->cqs[i] == NULL) {
            continue;
        }
        if (i >= srv->n_threads) {
            /* queues whose worker never started still need draining */
            cq_drain_destroy(srv->cqs[i]);
        } else {
            grpc_completion_queue_destroy(srv->cqs[i]);
        }
        srv->cqs[i] = NULL;
    }
    srv->n_threads = 0;
}
