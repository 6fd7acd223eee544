/*
 * The call object of the gRPC server: creation from a completed request,
 * kms_rpc_call_finish() (one batch: initial metadata, message, status,
 * close), the accessors handlers use, and stop step 3, where the server
 * itself answers open calls UNAVAILABLE.
 *
 * Lifetime (struct kms_rpc_call in rpc_internal.h): two references, the
 * handler's and gRPC's. The handler's goes in kms_rpc_call_finish(); gRPC's
 * when the worker sees the finish batch complete (rpc_call_grpc_done), which
 * also unlinks the call from srv->calls and clears c->srv. So a handler
 * parked on another thread never holds a stop up, and the shell it still
 * points to stays valid: once the server finished a call, nothing of it
 * reaches back into the server.
 *
 * `finished` decides who sends the status: the handler
 * (kms_rpc_call_finish) or the stopping thread (rpc_calls_abort), whoever
 * exchanges it first. by_server is written before that exchange publishes
 * `finished` and read by the handler only after it saw finished == true.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_time.h"
#include "kms_tsan.h"
#include "rpc_internal.h"

/* Drops one reference; the last one frees the shell. Touches no server. */
static void call_unref(struct kms_rpc_call *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1) {
        return;
    }
    free(c->peer);
    free(c->cn);
    free(c->cert_pem);
    free(c);
}

/* The gRPC side is over (finish batch completed, or never started): release
 * the gRPC objects and the server's accounting, then the gRPC reference. */
void rpc_call_grpc_done(struct kms_rpc_call *c)
{
    struct kms_rpc_server *srv = c->srv;
    if (c->send != NULL) {
        grpc_byte_buffer_destroy(c->send);
        c->send = NULL;
    }
    if (c->has_details) {
        grpc_slice_unref(c->details);
        c->has_details = false;
    }
    if (c->call != NULL) {
        grpc_call_unref(c->call);
        c->call = NULL;
    }
    pthread_mutex_lock(&srv->mu);
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else if (srv->calls == c) {
        srv->calls = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    c->prev = c->next = NULL;
    c->srv = NULL;
    srv->live_calls--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
    call_unref(c);
}

static char *auth_prop(grpc_auth_context *ctx, const char *name)
{
    grpc_auth_property_iterator it = grpc_auth_context_find_properties_by_name(ctx, name);
    const grpc_auth_property *p = grpc_auth_property_iterator_next(&it);
    char *s;
    if (p == NULL || p->value == NULL) {
        return NULL;
    }
    s = malloc(p->value_length + 1);
    if (s != NULL) {
        memcpy(s, p->value, p->value_length);
        s[p->value_length] = '\0';
    }
    return s;
}

struct kms_rpc_call *rpc_call_new(struct kms_rpc_server *srv, const char *method,
                                  const char *peer, gpr_timespec deadline)
{
    struct kms_rpc_call *c = calloc(1, sizeof(*c));

    if (c == NULL) {
        return NULL;
    }
    c->kind = RPC_TAG_FINISH;
    c->srv = srv;
    snprintf(c->method, sizeof(c->method), "%s", method);
    c->arrival_us = kms_mono_us();
    c->max_message = srv->max_message;
    atomic_init(&c->refs, 2);
    atomic_init(&c->finished, false);
    c->peer = peer != NULL ? strdup(peer) : NULL;
    c->deadline = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
    if (deadline.tv_sec == INT64_MAX) {
        c->deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    }
    return c;
}

void rpc_call_link(struct kms_rpc_call *c, bool *refusing)
{
    struct kms_rpc_server *srv = c->srv;
    pthread_mutex_lock(&srv->mu);
    c->next = srv->calls;
    if (srv->calls != NULL) {
        srv->calls->prev = c;
    }
    srv->calls = c;
    srv->open_calls++;
    clock_gettime(CLOCK_MONOTONIC, &srv->last_call);
    *refusing = srv->refusing;
    pthread_mutex_unlock(&srv->mu);
}

struct kms_rpc_call *rpc_call_create(struct kms_rpc_server *srv, grpc_call *call,
                                     const char *method, gpr_timespec deadline,
                                     bool *refusing)
{
    struct kms_rpc_call *c;
    char *p = grpc_call_get_peer(call);

    c = rpc_call_new(srv, method, p, deadline);
    gpr_free(p);
    if (c == NULL) {
        return NULL;
    }
    c->call = call;
    if (srv->mode == KMS_RPC_MTLS) {
        grpc_auth_context *ctx = grpc_call_auth_context(call);
        if (ctx != NULL) {
            if (grpc_auth_context_peer_is_authenticated(ctx)) {
                c->cn = auth_prop(ctx, GRPC_X509_CN_PROPERTY_NAME);
                c->cert_pem = auth_prop(ctx, GRPC_X509_PEM_CERT_PROPERTY_NAME);
            }
            grpc_auth_context_release(ctx);
        }
    }
    rpc_call_link(c, refusing);
    return c;
}

/* Sends the status (and message). The caller won the `finished` exchange,
 * so the gRPC side is live and c->srv valid. */
static void call_send(struct kms_rpc_call *c, int grpc_status, const char *details,
                      const uint8_t *resp, size_t resplen)
{
    grpc_op ops[4];
    size_t n = 0;
    grpc_call_error ce;
    grpc_call *gcall;
    struct kms_rpc_server *srv = c->srv;

    pthread_mutex_lock(&srv->mu);
    srv->open_calls--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
    if (grpc_status == GRPC_STATUS_OK && resp != NULL && resplen > c->max_message) {
        grpc_status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        details = "response larger than the maximum message size";
    }
    if (c->h2_conn != NULL) {
        rpc_h2_call_send(c, grpc_status, details, resp, resplen);
        return;
    }
    memset(ops, 0, sizeof(ops));
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = 0;
    n++;
    if (grpc_status == GRPC_STATUS_OK) {
        grpc_slice s = grpc_slice_from_copied_buffer((const char *)resp, resplen);
        c->send = grpc_raw_byte_buffer_create(&s, 1);
        grpc_slice_unref(s);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->send;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = (grpc_status_code)grpc_status;
    if (details != NULL && details[0] != '\0') {
        c->details = grpc_slice_from_copied_string(details);
        c->has_details = true;
        ops[n].data.send_status_from_server.status_details = &c->details;
    }
    n++;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n].data.recv_close_on_server.cancelled = &c->cancelled;
    n++;
    /* Once the batch is started a worker may complete it and clear
     * c->call: read it before. */
    gcall = c->call;
    KMS_TSAN_RELEASE(c);
    ce = grpc_call_start_batch(gcall, ops, n, c, NULL);
    if (ce != GRPC_CALL_OK) {
        kms_logf(KMS_LOG_ERROR, "rpc", "grpc_call_start_batch failed: %d", (int)ce);
        grpc_call_cancel(gcall, NULL);
        rpc_call_grpc_done(c);
    }
}

void kms_rpc_call_finish(struct kms_rpc_call *c, int grpc_status, const char *details,
                         const uint8_t *resp, size_t resplen)
{
    if (atomic_exchange(&c->finished, true)) {
        if (!c->by_server) {
            kms_log(KMS_LOG_ERROR, "rpc", "kms_rpc_call_finish called twice", "method",
                    c->method, NULL);
            return;
        }
        /* The server answered UNAVAILABLE while stopping: drop the
         * handler's reference only. */
        call_unref(c);
        return;
    }
    if (c->finish_hook != NULL) {
        c->finish_hook(c->finish_hook_arg, c, grpc_status, details);
    }
    call_send(c, grpc_status, details, resp, resplen);
    call_unref(c);
}

void kms_rpc_call_set_finish_hook(struct kms_rpc_call *c, kms_rpc_finish_hook_fn fn, void *arg)
{
    c->finish_hook = fn;
    c->finish_hook_arg = arg;
}

uint64_t kms_rpc_call_age_us(const struct kms_rpc_call *c)
{
    uint64_t now = kms_mono_us();
    return now > c->arrival_us ? now - c->arrival_us : 0;
}

void kms_rpc_call_note_set(struct kms_rpc_call *c, const char *note)
{
    snprintf(c->note, sizeof(c->note), "%s", note != NULL ? note : "");
}

const char *kms_rpc_call_note(const struct kms_rpc_call *c)
{
    return c->note;
}

bool kms_rpc_call_done(const struct kms_rpc_call *c)
{
    return atomic_load(&c->finished);
}

size_t rpc_calls_abort(struct kms_rpc_server *srv)
{
    size_t n = 0;
    pthread_mutex_lock(&srv->mu);
    srv->refusing = true;
    for (;;) {
        struct kms_rpc_call *c;
        for (c = srv->calls; c != NULL; c = c->next) {
            if (!atomic_load(&c->finished)) {
                break;
            }
        }
        if (c == NULL) {
            break;
        }
        /* by_server is written before the exchange publishes `finished`;
         * the handler reads it only after seeing finished == true. */
        c->by_server = true;
        if (atomic_exchange(&c->finished, true)) {
            c->by_server = false; /* the handler won the race */
            continue;
        }
        pthread_mutex_unlock(&srv->mu);
        call_send(c, GRPC_STATUS_UNAVAILABLE, "server is closing this listener; retry", NULL,
                  0);
        n++;
        pthread_mutex_lock(&srv->mu);
    }
    pthread_mutex_unlock(&srv->mu);
    if (n > 0 && srv->abort_hook != NULL) {
        /* every call it finished has `finished` set: parked handlers that
         * wake now see kms_rpc_call_done() */
        srv->abort_hook(srv->abort_hook_arg);
    }
    return n;
}

const char *kms_rpc_call_method(const struct kms_rpc_call *c)
{
    return c->method;
}

const char *kms_rpc_call_peer(const struct kms_rpc_call *c)
{
    return c->peer != NULL ? c->peer : "unknown";
}

int kms_rpc_call_peer_ip(const struct kms_rpc_call *c, uint8_t ip[16], size_t *iplen)
{
    char host[128];
    const char *p = c->peer;
    const char *start, *end;
    size_t n;

    if (p == NULL) {
        return KMS_ENOTFOUND;
    }
    if (strncmp(p, "ipv4:", 5) == 0) {
        start = p + 5;
        end = strrchr(start, ':');
        if (end == NULL) {
            end = start + strlen(start);
        }
    } else if (strncmp(p, "ipv6:", 5) == 0) {
        start = p + 5;
        if (start[0] == '[') {
            start++;
            end = strchr(start, ']');
        } else if (strncmp(start, "%5B", 3) == 0 || strncmp(start, "%5b", 3) == 0) {
            start += 3;
            end = strstr(start, "%5D");
            if (end == NULL) {
                end = strstr(start, "%5d");
            }
        } else {
            end = strrchr(start, ':');
        }
        if (end == NULL) {
            return KMS_ENOTFOUND;
        }
    } else {
        return KMS_ENOTFOUND;
    }
    n = (size_t)(end - start);
    if (n == 0 || n >= sizeof(host)) {
        return KMS_ENOTFOUND;
    }
    memcpy(host, start, n);
    host[n] = '\0';
    {
        char *pct = strchr(host, '%'); /* zone id: fe80::1%eth0 or %25eth0 */
        if (pct != NULL) {
            *pct = '\0';
        }
    }
    if (inet_pton(AF_INET, host, ip) == 1) {
        *iplen = 4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, ip) == 1) {
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(ip, mapped, 12) == 0) {
            memmove(ip, ip + 12, 4);
            *iplen = 4;
        } else {
            *iplen = 16;
        }
        return 0;
    }
    return KMS_ENOTFOUND;
}

const char *kms_rpc_call_peer_cn(const struct kms_rpc_call *c)
{
    return c->cn;
}

const char *kms_rpc_call_peer_cert_pem(const struct kms_rpc_call *c)
{
    return c->cert_pem;
}

uint64_t kms_rpc_call_deadline_ms(const struct kms_rpc_call *c)
{
    gpr_timespec now, left;
    int64_t ms;
    if (c->deadline.tv_sec == INT64_MAX) {
        return UINT64_MAX;
    }
    now = gpr_now(GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(c->deadline, now) <= 0) {
        return 0;
    }
    left = gpr_time_sub(c->deadline, now);
    ms = gpr_time_to_millis(left);
    return ms < 0 ? 0 : (uint64_t)ms;
}
