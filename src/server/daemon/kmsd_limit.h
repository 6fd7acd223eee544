/*
 * Bounded, keyed-hash counters for the Talos API's limits (limit.c): failed
 * unseals per source address, seals per source address and per node UUID.
 *
 * A limiter counts events per key in a fixed window (window_ms, starting at
 * a key's first event) and in one global window shared by all keys. Keys
 * are hashed with SipHash-2-4 (OpenSSL EVP_MAC "SIPHASH") under a random
 * key drawn per limiter, so an outsider can neither predict which keys share
 * a set nor make two keys collide; the 64-bit hash is the key's identity
 * (two keys share a counter with probability 2^-64). The table is
 * set-associative (KMSD_LIMIT_WAYS entries per set): a new key takes an
 * expired entry of its set, else the least recently used one, so memory is
 * fixed whatever the number of addresses.
 *
 * Threads: every function may be called from any thread (one mutex per
 * limiter, held for a table lookup). The limiter is owned by whoever
 * created it and freed with kmsd_limiter_free() after its last use.
 */
#ifndef KMSD_LIMIT_H
#define KMSD_LIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"

#define KMSD_LIMIT_WAYS 4

struct kmsd_limiter;

/* capacity: number of per-key entries (rounded up to a multiple of
 * KMSD_LIMIT_WAYS, >= KMSD_LIMIT_WAYS). per_key: events allowed per key and
 * window (0 = no per-key limit); global: events allowed per window over all
 * keys (0 = no global limit). KMS_EINVAL, KMS_ENOMEM, KMS_ECRYPTO. */
int kmsd_limiter_new(size_t capacity, unsigned per_key, unsigned global, uint64_t window_ms,
                     struct kmsd_limiter **out, struct kms_err *err);
void kmsd_limiter_free(struct kmsd_limiter *l);

/* True when key's count or the global count reached its limit in the
 * current window (now_ms: a monotonic clock). Counts nothing. *global_hit
 * (may be NULL) tells whether the global bound is the reason. */
bool kmsd_limiter_over(struct kmsd_limiter *l, const void *key, size_t len, uint64_t now_ms,
                       bool *global_hit);

/* Counts one event for key (and globally) unless that would exceed a
 * limit: returns true and counts it when allowed, false (counting nothing)
 * when the key or the global count is already at its limit. */
bool kmsd_limiter_take(struct kmsd_limiter *l, const void *key, size_t len, uint64_t now_ms,
                       bool *global_hit);

/* Counts one event for key and globally, whatever the limits (a failure
 * that happened). */
void kmsd_limiter_count(struct kmsd_limiter *l, const void *key, size_t len, uint64_t now_ms);

/* The limiter key of a source address (16 bytes, IPv4 v4-mapped): the IPv4
 * address (4 bytes) or the IPv6 /64 prefix (8 bytes), since one IPv6 host
 * usually owns a whole /64. Returns the key length. */
size_t kmsd_limit_addr_key(const uint8_t ip16[16], uint8_t out[16]);

#endif /* KMSD_LIMIT_H */
