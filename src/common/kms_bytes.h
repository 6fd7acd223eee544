/*
 * Fixed-width integers in byte buffers: the one set of byte-order helpers
 * for every on-disk and on-wire format kmsd defines (raft entry framing,
 * snapshots, backup files, store keys, raft transport frames).
 *
 * Little-endian: entry headers, snapshot and backup files, transport frames.
 * Big-endian: RocksDB keys and values that must sort numerically.
 * p must hold at least the width in bytes; no alignment is required.
 * Pure functions, callable from any thread.
 */
#ifndef KMS_BYTES_H
#define KMS_BYTES_H

#include <stdint.h>

static inline void kms_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static inline void kms_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static inline uint32_t kms_get_le32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) {
        v = v << 8 | p[i];
    }
    return v;
}

static inline uint64_t kms_get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = v << 8 | p[i];
    }
    return v;
}

static inline void kms_put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static inline void kms_put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static inline uint32_t kms_get_be32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

static inline uint64_t kms_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

#endif /* KMS_BYTES_H */
