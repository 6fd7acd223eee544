/* libFuzzer: what a dialling raft peer sends first after TLS, in order:
 * the connection preamble (kms_preamble_parse, kms_preamble_address_ok:
 * protocol, raft id, address) and then the raft frames that follow it
 * (kms_frame_parser_feed). fuzz_raft_frame covers frames alone; this one
 * covers the preamble and the hand-over to the frame parser.
 *
 * Input: the byte stream. Invariants: a parsed preamble has id != 0 and an
 * address length that is a non-zero multiple of 8 within the cap; an
 * accepted address is NUL-terminated inside it and not empty; the frame
 * parser after it never crashes.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "kms_err.h"

#define ADDR_MAX 1024
#define PROTOCOL 1

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char addr[ADDR_MAX];
    struct kms_frame_parser p;
    uint64_t proto, id;
    size_t alen, off, consumed;
    const char *why = NULL;
    int rc;

    if (size < KMS_PREAMBLE_FIXED) {
        return 0;
    }
    rc = kms_preamble_parse(data, PROTOCOL, ADDR_MAX, &proto, &id, &alen, &why);
    if (rc != 0) {
        if ((rc != KMS_EVERSION && rc != KMS_EFORMAT) || why == NULL || alen != 0) {
            abort();
        }
        return 0;
    }
    if (id == 0 || alen == 0 || alen % 8 != 0 || alen > ADDR_MAX || proto != PROTOCOL) {
        abort();
    }
    off = KMS_PREAMBLE_FIXED;
    if (size - off < alen) {
        return 0;
    }
    memcpy(addr, data + off, alen);
    if (kms_preamble_address_ok(addr, alen)) {
        if (memchr(addr, '\0', alen) == NULL || addr[0] == '\0') {
            abort();
        }
    } else {
        return 0;
    }
    off += alen;
    kms_frame_parser_init(&p, false);
    while (off < size) {
        enum kms_frame_event ev;
        consumed = 0;
        rc = kms_frame_parser_feed(&p, data + off, size - off, &consumed, &ev);
        if (rc != 0 || consumed == 0) {
            break;
        }
        off += consumed;
    }
    return 0;
}
