/*
 * Private to the Talos API: talos_api.c (what Seal and Unseal share, and
 * Seal) and talos_unseal.c (Unseal). Not used elsewhere (but by the unit
 * test tests/unit/test_daemon_talos.c).
 *
 * Threads: the handlers (the kms_rpc_handler_fn below) run on the Talos
 * server's gRPC workers; parked jobs on the daemon's pools (write pool for
 * Seal, wait pool for Unseal). Every helper here is safe on any of them.
 * A call passed to these helpers is the caller's (the handler's reference,
 * kms_rpc.h) until one of talos_reply / talos_fail finishes it.
 */
#ifndef KMSD_TALOS_INTERNAL_H
#define KMSD_TALOS_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_rpc.h"
#include "kmsd.h"

#include "sidero/kms/kms.pb-c.h"

/* A warn line for a limit refusal, at most one per 10 s per kind (one
 * static struct per kind), with the number of refusals not logged since.
 * Lock-free. */
struct talos_limit_log {
    _Atomic uint64_t next_ms;
    atomic_ullong suppressed;
};
void talos_limit_log(struct talos_limit_log *l, const char *what, const char *peer,
                     const char *detail);

/* The caller's address as reported (raw: 4 or 16 bytes; *len 0 if unknown)
 * and normalised to 16 bytes (IPv4 as v4-mapped IPv6) for the limiters and
 * CIDR checks. */
void talos_peer_addr(struct kms_rpc_call *call, uint8_t raw[16], size_t *len, uint8_t ip[16]);

/* True when the first c->prefix bits of ip (16 bytes, IPv4 v4-mapped as
 * talos_peer_addr gives it) are those of c->addr (kms_parse_cidr's form);
 * prefix 0 matches every address. Pure. */
bool kmsd_cidr_match(const struct kms_config_cidr *c, const uint8_t ip[16]);

/* What Seal and Unseal check first, on the worker: unpacks req into *out
 * (the caller's to free, also on error), then the node UUID and the
 * enrolment policy (a refusal counted in policy_denied[m]; m 0 = Seal,
 * 1 = Unseal). 0, or KMS_EINVAL / KMS_EDENIED with *msg a static string. */
int talos_request_open(struct kmsd *d, int m, const uint8_t ip[16], const uint8_t *req,
                       size_t reqlen, Sidero__Kms__Request **out, const char **msg);

/* Key ids in logs: hex of the 16-byte id (kid holds 33 bytes; "" when it
 * cannot be encoded). */
void talos_key_hex(const uint8_t *id, size_t len, char kid[33]);

/* Milliseconds left of the request budget (requestWait) that started at t0
 * (kms_mono_ms()); 0 when the budget is spent, the daemon stops, or the
 * server already answered the call (its listener closed). */
unsigned talos_budget_left(struct kmsd *d, struct kms_rpc_call *call, uint64_t t0);

/* Counts an answer (op "seal" or "unseal") in the request metrics and
 * times it from the call's arrival. */
void talos_count(struct kmsd *d, struct kms_rpc_call *call, const char *op, int grpc_code);

/* Finish the call: OK with a Response holding data (wiped after), or the
 * gRPC status of KMS code `code` with msg (logged with peer). Both count
 * the answer; when the server has already answered the call (listener
 * closed), both only release it, uncounted. */
void talos_reply(struct kmsd *d, struct kms_rpc_call *call, const char *op, const uint8_t *data,
                 size_t len);
void talos_fail(struct kmsd *d, struct kms_rpc_call *call, const char *op, int code,
                const char *msg, const char *peer);

/* The Unseal handler (talos_unseal.c); arg is the kmsd. */
void talos_unseal_cb(void *arg, struct kms_rpc_call *call, const uint8_t *req, size_t reqlen);

#endif /* KMSD_TALOS_INTERNAL_H */
