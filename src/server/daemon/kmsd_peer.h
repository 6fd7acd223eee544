/*
 * Opt-in peer unseal (unseal.peer: true on every member; docs/security.md
 * "Peer unseal"). A sealed member that restarted asks an unsealed member
 * for the root key R over the cluster API (kmsd.v1.Cluster/PeerUnseal);
 * the answer is R wrapped to an X25519 key that exists only in the
 * requesting process (kms_peer_wrap.h). The requester opens the replicated
 * keyring with it before it counts as unsealed.
 *
 * The peer unseal gate (replicated, SetPeerUnsealGate entries): an operator
 * `seal` of a node with unseal.peer closes it, so no member hands R to any
 * other until a node is unsealed with k shares again; that node reopens it
 * with a proof only a holder of R can make, which every serving peer checks.
 *
 * Threads: the requester runs on its own thread (started by kmsd_peer_start
 * when unseal.peer is on); the serving handler on the operator pool; the
 * other functions on any thread unless said otherwise. The state is owned
 * by struct kmsd (d->peer), created by kmsd_peer_start, freed by
 * kmsd_peer_free.
 */
#ifndef KMSD_PEER_H
#define KMSD_PEER_H

#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"

struct kmsd;
struct kms_rpc_call;
struct Kmsd__V1__Entry;

/* Creates d->peer and, with unseal.peer, starts the requester thread. */
int kmsd_peer_start(struct kmsd *d, struct kms_err *err);
/* Stops and joins the requester thread (d->stopping must be set). */
void kmsd_peer_stop(struct kmsd *d);
/* Frees d->peer after every thread that may use it is gone. NULL-safe. */
void kmsd_peer_free(struct kmsd *d);

/* An operator `seal` of this node (cluster_ops_seal.c): wipes the keys
 * (kmsd_seal) and, with unseal.peer, first blocks peer unseal in this
 * process, then closes the replicated gate. 0, or the error of the gate
 * write (the node is sealed either way). Blocking (kmsd_write): pool
 * threads only. */
int kmsd_peer_operator_seal(struct kmsd *d, struct kms_err *err);

/* Called once a node was unsealed with k shares (node_keys.c, without
 * d->mu held): lifts this process's block and, when the gate is closed,
 * schedules its reopen (the requester thread proposes it). */
void kmsd_peer_shares_unsealed(struct kmsd *d);

/* The serving handler of /kmsd.v1.Cluster/PeerUnseal (kmsd_cluster.h;
 * operator pool): reads its request itself (c->raw), after the unseal.peer
 * check. */
struct kmsd_call;
int kmsd_peer_serve_cb(struct kmsd_call *c);

/* Refuses a PeerUnseal call (logged at warn, audited): the dispatcher's
 * path for a certificate that is not a node certificate. */
void kmsd_peer_refuse(struct kmsd *d, struct kms_rpc_call *call, int grpc_status,
                      const char *why);

/* "open" | "closed" from the local replicated state; "" without
 * unseal.peer. Static strings. */
const char *kmsd_peer_gate_state(struct kmsd *d);

/* Leader side of Forward for a SetPeerUnsealGate entry from node caller_id:
 * by_node must be the caller, a reopen must carry a 32-byte proof (and, on
 * an unsealed leader, a valid one). 0 or KMS_EDENIED / KMS_EFORMAT. Pool
 * threads. */
int kmsd_peer_gate_forward_check(struct kmsd *d, const struct Kmsd__V1__Entry *e,
                                 uint64_t caller_id, struct kms_err *err);

#endif /* KMSD_PEER_H */
