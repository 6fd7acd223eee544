/*
 * Test helpers: raft 0.22.1 wire frames built by hand (layouts as in
 * src/raft/frame.h). Each builder writes into a caller buffer and returns
 * the number of bytes written. Header-only, static functions.
 */
#ifndef KMS_TEST_FRAME_BUILD_H
#define KMS_TEST_FRAME_BUILD_H

#include <stdint.h>
#include <string.h>

static inline void fb_put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static inline void fb_put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static inline size_t fb_preamble(uint8_t *out, uint8_t type, uint8_t version, uint64_t hdr_len)
{
    memset(out, 0, 16);
    out[0] = type;
    out[2] = version;
    fb_put64(out + 8, hdr_len);
    return 16;
}

/* A fixed-size message (types 2, 3, 4, 6) with header hdr_len bytes, the
 * first u64 being term, the rest filled with `fill`. */
static inline size_t fb_fixed(uint8_t *out, uint8_t type, uint8_t version, uint64_t hdr_len,
                       uint64_t term)
{
    size_t n = fb_preamble(out, type, version, hdr_len);
    memset(out + n, 0, (size_t)hdr_len);
    fb_put64(out + n, term);
    return n + (size_t)hdr_len;
}

static inline size_t fb_request_vote(uint8_t *out, uint64_t term)
{
    return fb_fixed(out, 3, 2, 40, term);
}

static inline size_t fb_request_vote_result(uint8_t *out, uint64_t term)
{
    return fb_fixed(out, 4, 2, 24, term);
}

static inline size_t fb_append_entries_result(uint8_t *out, uint64_t term)
{
    return fb_fixed(out, 2, 2, 32, term);
}

static inline size_t fb_timeout_now(uint8_t *out, uint64_t term)
{
    return fb_fixed(out, 6, 0, 24, term);
}

/* AppendEntries with n entries of lens[i] bytes (type RAFT_COMMAND), header
 * only (the payload is sum(lens) bytes the caller appends). */
static inline size_t fb_append_entries(uint8_t *out, uint64_t term, unsigned n, const uint32_t *lens)
{
    size_t off = fb_preamble(out, 1, 0, 48 + 16ull * n);
    fb_put64(out + off, term);
    fb_put64(out + off + 8, 7);   /* prev index */
    fb_put64(out + off + 16, 1);  /* prev term */
    fb_put64(out + off + 24, 6);  /* commit */
    fb_put64(out + off + 32, n);
    off += 40;
    for (unsigned i = 0; i < n; i++) {
        memset(out + off, 0, 16);
        fb_put64(out + off, term);
        out[off + 8] = 1;
        fb_put32(out + off + 12, lens[i]);
        off += 16;
    }
    fb_put64(out + off, 0);
    return off + 8;
}

/* InstallSnapshot header for a one-voter configuration {1, "127.0.0.1:1"}
 * and data_len bytes of snapshot (the caller appends them). */
#define FB_IS_HEADER_SIZE (16u + 88u)
static inline size_t fb_install_snapshot(uint8_t *out, uint64_t term, uint64_t data_len)
{
    size_t off = fb_preamble(out, 5, 0, 88);
    fb_put64(out + off, term);
    fb_put64(out + off + 8, 100);  /* last index */
    fb_put64(out + off + 16, 1);   /* last term */
    fb_put64(out + off + 24, 1);   /* conf index */
    fb_put64(out + off + 32, 32);  /* conf length: 1+8+8+12+1 = 30, padded */
    off += 40;
    memset(out + off, 0, 32);
    out[off] = 1;                  /* format */
    fb_put64(out + off + 1, 1);    /* servers */
    fb_put64(out + off + 9, 1);    /* id */
    memcpy(out + off + 17, "127.0.0.1:1", 12);
    out[off + 29] = 1;             /* RAFT_VOTER */
    off += 32;
    fb_put64(out + off, data_len);
    fb_put64(out + off + 8, 0);
    return off + 16;
}

#endif /* KMS_TEST_FRAME_BUILD_H */
