/* libFuzzer: the raft frame parser (src/raft/frame.h) on arbitrary bytes
 * (every byte a peer sends over the raft transport goes through it).
 *
 * Input: byte 0 bit 0 = stamps allowed, byte 1 = seed of the chunking, the
 * rest = the stream. The stream is parsed once in one piece and once in
 * pseudo-random chunks of 1..64 bytes; both must report the same events and
 * the same error at the same offset, and the accepted frames must obey the
 * size rules. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "kms_err.h"

#define MAX_EVENTS 4096

struct trace {
    size_t n;
    struct {
        int ev;
        uint8_t type;
        uint64_t term, payload, offset;
    } e[MAX_EVENTS];
    int rc;
    size_t fail_offset;
};

static struct trace t_whole, t_chunked;

static void check_info(const struct kms_frame_parser *p, enum kms_frame_event ev)
{
    const struct kms_frame_info *in = &p->info;
    if (ev == KMS_FRAME_EV_STAMP) {
        if (in->type != KMS_FRAME_STAMP || in->header_len != KMS_FRAME_STAMP_BODY ||
            !p->allow_stamp) {
            abort();
        }
    } else if (ev == KMS_FRAME_EV_HEADER) {
        if (in->type < 1 || in->type > 6 || in->header_len > KMS_FRAME_HEADER_MAX) {
            abort();
        }
        if (in->type == KMS_FRAME_APPEND_ENTRIES &&
            (in->header_len != 48 + 16 * in->n_entries ||
             in->payload_len > KMS_FRAME_AE_PAYLOAD_MAX)) {
            abort();
        }
        if (in->type == KMS_FRAME_INSTALL_SNAPSHOT && in->payload_len > KMS_FRAME_IS_PAYLOAD_MAX) {
            abort();
        }
        if (in->type != KMS_FRAME_APPEND_ENTRIES && in->type != KMS_FRAME_INSTALL_SNAPSHOT &&
            in->payload_len != 0) {
            abort();
        }
    }
}

static void run(const uint8_t *data, size_t len, bool allow, unsigned seed, struct trace *t)
{
    struct kms_frame_parser p;
    size_t off = 0;
    uint32_t x = seed * 2654435761u + 1;

    memset(t, 0, sizeof *t);
    kms_frame_parser_init(&p, allow);
    while (off < len) {
        size_t chunk = len - off;
        size_t used;
        enum kms_frame_event ev;
        if (seed != 0) {
            x = x * 1103515245u + 12345u;
            chunk = 1 + (x >> 16) % 64;
            if (chunk > len - off) {
                chunk = len - off;
            }
        }
        t->rc = kms_frame_parser_feed(&p, data + off, chunk, &used, &ev);
        if (used > chunk) {
            abort();
        }
        off += used;
        if (t->rc != 0) {
            if (t->rc != KMS_EFORMAT || kms_frame_parser_error(&p) == NULL) {
                abort();
            }
            t->fail_offset = off;
            /* Failures stick. */
            if (kms_frame_parser_feed(&p, data, len, &used, &ev) != KMS_EFORMAT || used != 0) {
                abort();
            }
            return;
        }
        if (used == 0) {
            abort();
        }
        check_info(&p, ev);
        if (ev != KMS_FRAME_EV_NONE && t->n < MAX_EVENTS) {
            t->e[t->n].ev = ev;
            t->e[t->n].type = p.info.type;
            t->e[t->n].term = p.info.term;
            t->e[t->n].payload = p.info.payload_len;
            t->e[t->n].offset = off;
            t->n++;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bool allow;
    unsigned seed;

    if (size < 2) {
        return 0;
    }
    allow = (data[0] & 1) != 0;
    seed = data[1] + 1u;
    run(data + 2, size - 2, allow, 0, &t_whole);
    run(data + 2, size - 2, allow, seed, &t_chunked);
    if (t_whole.rc != t_chunked.rc || t_whole.fail_offset != t_chunked.fail_offset ||
        t_whole.n != t_chunked.n ||
        memcmp(t_whole.e, t_chunked.e, t_whole.n * sizeof t_whole.e[0]) != 0) {
        abort();
    }
    return 0;
}
