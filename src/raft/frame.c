/*
 * Incremental raft 0.22.1 wire-frame parser (see frame.h).
 *
 * Every size rule below is tied to what raft 0.22.1's encoder writes
 * (src/uv_encoding.c sizeof*() and encode*(), src/configuration.c
 * configurationEncodeToBuf()) so that everything a 0.22.1 peer sends passes
 * and nothing that would make its decoder read out of bounds or assert does.
 */
#include <string.h>

#include "frame.h"
#include "kms_bytes.h"
#include "kms_err.h"

/* Sections of a frame. */
enum { SEC_PREAMBLE = 0, SEC_HEADER, SEC_PAYLOAD };

/* Header fields (what p->buf is collecting). */
enum {
    F_PREAMBLE = 0,
    F_FIXED,        /* whole fixed-size header (stamp and small messages) */
    F_AE_FIXED,     /* AppendEntries: term, prev index, prev term, commit, n */
    F_AE_ENTRY,     /* one 16-byte batch header entry */
    F_AE_TAIL,      /* the trailing unused u64 */
    F_IS_FIXED,     /* InstallSnapshot: term, last index, last term,
                       conf index, conf length */
    F_CONF_FORMAT,  /* configuration: u8 encoding format */
    F_CONF_N,       /* configuration: u64 number of servers */
    F_SRV_ID,       /* server: u64 id */
    F_SRV_ADDR,     /* server: NUL-terminated address (byte by byte) */
    F_SRV_ROLE,     /* server: u8 role */
    F_CONF_PAD,     /* configuration: zero padding to 8 bytes */
    F_IS_DATA_LEN,  /* InstallSnapshot: u64 snapshot data length */
    F_IS_TAIL,      /* the trailing unused u64 */
};

/* Exact header sizes of the fixed-size messages, as raft 0.22.1 encodes them
 * (uv_encoding.c): */
#define RV_HEADER 40u  /* sizeofRequestVote: term, candidate, last index,
                          last term, flags */
#define RVR_HEADER 24u /* sizeofRequestVoteResult: term, granted, u8 flags,
                          u8 0, u16 features, u16 capacity, u16 0 */
#define AER_HEADER 32u /* sizeofAppendEntriesResult: term, rejected, last
                          index, u16 features, u16 capacity, u32 0 */
#define TN_HEADER 24u  /* sizeofTimeoutNow: term, last index, last term */

/* AppendEntries: 4 u64 + batch header (u64 n + 16 bytes per entry) + u64
 * unused (sizeofAppendEntries, uvSizeofBatchHeader). */
#define AE_FIXED 40u   /* the 4 u64 and n */
#define AE_ENTRY 16u   /* u64 term, u8 type, 3 unused, u32 length */
#define AE_TAIL 8u
#define AE_HEADER_MIN (AE_FIXED + AE_TAIL)

/* InstallSnapshot: 5 u64 + configuration + u64 data length + u64 unused
 * (sizeofInstallSnapshot). */
#define IS_FIXED 40u
#define IS_TRAILER 16u
/* Configuration (configurationEncodedSize): u8 format + u64 n + per server
 * (u64 id, NUL-terminated address, u8 role), padded to a multiple of 8
 * (bytePad64). configurationDecode asserts a non-empty buffer and reads the
 * format byte and n unchecked, so the smallest acceptable is 1 + 8 padded. */
#define CONF_FORMAT 1u /* ENCODING_FORMAT */
#define CONF_MIN 16u
#define CONF_SERVER_MIN 11u /* id + one address byte + NUL + role */
#define IS_HEADER_MIN (IS_FIXED + CONF_MIN + IS_TRAILER)

/* Highest version byte raft 0.22.1 writes per type (src/message.h
 * MESSAGE__*_VERSION); its decoder also accepts lower ones at these exact
 * sizes. */
static const uint8_t version_max[7] = {
    [KMS_FRAME_APPEND_ENTRIES] = 0,
    [KMS_FRAME_APPEND_ENTRIES_RESULT] = 2,
    [KMS_FRAME_REQUEST_VOTE] = 2,
    [KMS_FRAME_REQUEST_VOTE_RESULT] = 2,
    [KMS_FRAME_INSTALL_SNAPSHOT] = 0,
    [KMS_FRAME_TIMEOUT_NOW] = 0,
};

/* Entry types raft's uvDecodeBatchHeader accepts: RAFT_COMMAND,
 * RAFT_BARRIER, RAFT_CHANGE. */
#define ENTRY_TYPE_MIN 1u
#define ENTRY_TYPE_MAX 3u
/* Server roles configurationAdd accepts: RAFT_STANDBY, RAFT_VOTER,
 * RAFT_SPARE. */
#define ROLE_MAX 2u

static int parser_fail(struct kms_frame_parser *p, const char *why)
{
    p->failed = true;
    p->error = why;
    return KMS_EFORMAT;
}

static void parser_next_frame(struct kms_frame_parser *p)
{
    p->sec = SEC_PREAMBLE;
    p->field = F_PREAMBLE;
    p->got = 0;
    p->need = KMS_FRAME_PREAMBLE;
}

void kms_frame_parser_init(struct kms_frame_parser *p, bool allow_stamp)
{
    memset(p, 0, sizeof *p);
    p->allow_stamp = allow_stamp;
    parser_next_frame(p);
}

/* Starts collecting a fixed-size header field of `need` bytes; in_conf: the
 * field lies inside the InstallSnapshot configuration. */
static int parser_expect(struct kms_frame_parser *p, int field, size_t need, bool in_conf)
{
    if (need > p->hdr_left) {
        return parser_fail(p, "header shorter than its fields");
    }
    if (in_conf && need > p->conf_left) {
        return parser_fail(p, "configuration shorter than its fields");
    }
    p->field = field;
    p->got = 0;
    p->need = need;
    return 0;
}

/* The next server of the configuration, or the padding after the last. */
static int parser_next_server(struct kms_frame_parser *p)
{
    if (p->servers_left > 0) {
        return parser_expect(p, F_SRV_ID, 8, true);
    }
    if (p->conf_left >= 8) {
        return parser_fail(p, "configuration longer than its servers");
    }
    if (p->conf_left == 0) {
        return parser_expect(p, F_IS_DATA_LEN, 8, false);
    }
    return parser_expect(p, F_CONF_PAD, (size_t)p->conf_left, true);
}

static int parser_header_done(struct kms_frame_parser *p, enum kms_frame_event *ev)
{
    if (p->hdr_left != 0) {
        return parser_fail(p, "header longer than its fields");
    }
    if (p->info.type == KMS_FRAME_STAMP) {
        *ev = KMS_FRAME_EV_STAMP;
        parser_next_frame(p);
        return 0;
    }
    *ev = KMS_FRAME_EV_HEADER;
    p->payload_left = p->info.payload_len;
    if (p->payload_left > 0) {
        p->sec = SEC_PAYLOAD;
    } else {
        parser_next_frame(p);
    }
    return 0;
}

/* Validates the 16-byte preamble in p->buf and sets up the header. */
static int parser_preamble(struct kms_frame_parser *p)
{
    const uint8_t *b = p->buf;
    uint8_t type = b[0];
    uint8_t version = b[2];
    uint64_t len = kms_get_le64(b + 8);
    uint64_t fixed = 0;

    memset(&p->info, 0, sizeof p->info);
    p->info.type = type;
    p->info.version = version;
    p->info.header_len = len;
    /* uvEncodeMessage writes bytes 1, 3 and 4..7 as zero. */
    if (b[1] != 0 || b[3] != 0 || kms_get_le32(b + 4) != 0) {
        return parser_fail(p, "non-zero reserved preamble bytes");
    }
    if (type == KMS_FRAME_STAMP) {
        if (!p->allow_stamp) {
            return parser_fail(p, "stamp frame on a connection without stamps");
        }
        if (version != KMS_FRAME_STAMP_VERSION) {
            return parser_fail(p, "unsupported stamp frame version");
        }
        if (len != KMS_FRAME_STAMP_BODY) {
            return parser_fail(p, "stamp frame of the wrong length");
        }
        fixed = KMS_FRAME_STAMP_BODY;
    } else if (type >= KMS_FRAME_APPEND_ENTRIES && type <= KMS_FRAME_TIMEOUT_NOW) {
        if (version > version_max[type]) {
            return parser_fail(p, "unsupported message version");
        }
    } else {
        return parser_fail(p, "unknown message type");
    }
    switch (type) {
    case KMS_FRAME_REQUEST_VOTE:
        fixed = RV_HEADER;
        break;
    case KMS_FRAME_REQUEST_VOTE_RESULT:
        fixed = RVR_HEADER;
        break;
    case KMS_FRAME_APPEND_ENTRIES_RESULT:
        fixed = AER_HEADER;
        break;
    case KMS_FRAME_TIMEOUT_NOW:
        fixed = TN_HEADER;
        break;
    default:
        break;
    }
    p->sec = SEC_HEADER;
    p->hdr_left = len;
    if (fixed != 0) {
        if (len != fixed) {
            return parser_fail(p, "header length wrong for the message type");
        }
        return parser_expect(p, F_FIXED, (size_t)fixed, false);
    }
    if (len > KMS_FRAME_HEADER_MAX) {
        return parser_fail(p, "header too long");
    }
    if (type == KMS_FRAME_APPEND_ENTRIES) {
        if (len < AE_HEADER_MIN || (len - AE_HEADER_MIN) % AE_ENTRY != 0) {
            return parser_fail(p, "AppendEntries header length not 48 + 16n");
        }
        return parser_expect(p, F_AE_FIXED, AE_FIXED, false);
    }
    if (len < IS_HEADER_MIN) {
        return parser_fail(p, "InstallSnapshot header too short");
    }
    return parser_expect(p, F_IS_FIXED, IS_FIXED, false);
}

/* A fixed-size field is complete in p->buf. */
static int parser_field_done(struct kms_frame_parser *p, enum kms_frame_event *ev)
{
    const uint8_t *b = p->buf;
    struct kms_frame_info *in = &p->info;
    uint64_t v;

    switch (p->field) {
    case F_PREAMBLE:
        return parser_preamble(p);
    case F_FIXED:
        in->term = kms_get_le64(b);
        if (in->type == KMS_FRAME_STAMP) {
            in->stamp.sent_us = kms_get_le64(b);
            in->stamp.echo_us = kms_get_le64(b + 8);
            in->stamp.term = kms_get_le64(b + 16);
            in->stamp.flags = kms_get_le64(b + 24);
            in->stamp.lease_rem_us = kms_get_le64(b + 32);
            in->stamp.commit = kms_get_le64(b + 40);
            in->term = in->stamp.term;
        }
        return parser_header_done(p, ev);
    case F_AE_FIXED:
        in->term = kms_get_le64(b);
        v = kms_get_le64(b + 32);
        /* The decoder trusts n and reads 16 bytes per entry from a header of
         * the length the preamble gave: they must agree exactly. */
        if (v != (in->header_len - AE_HEADER_MIN) / AE_ENTRY) {
            return parser_fail(p, "AppendEntries entry count does not match its header");
        }
        in->n_entries = v;
        p->entries_left = v;
        if (v > 0) {
            return parser_expect(p, F_AE_ENTRY, AE_ENTRY, false);
        }
        return parser_expect(p, F_AE_TAIL, AE_TAIL, false);
    case F_AE_ENTRY:
        if (b[8] < ENTRY_TYPE_MIN || b[8] > ENTRY_TYPE_MAX) {
            return parser_fail(p, "AppendEntries entry of unknown type");
        }
        v = kms_get_le32(b + 12);
        /* raft sizes the payload as the plain sum of the lengths but then
         * locates each entry at 8-byte padded offsets (uvDecodeEntriesBatch):
         * an unpadded length would make it read past the payload. Every
         * entry raft and kmsd create (commands, barriers, configurations) is
         * a multiple of 8. */
        if (v % 8 != 0) {
            return parser_fail(p, "AppendEntries entry length not a multiple of 8");
        }
        in->payload_len += v;
        if (in->payload_len > KMS_FRAME_AE_PAYLOAD_MAX) {
            return parser_fail(p, "AppendEntries payload too large");
        }
        p->entries_left--;
        if (p->entries_left > 0) {
            return parser_expect(p, F_AE_ENTRY, AE_ENTRY, false);
        }
        return parser_expect(p, F_AE_TAIL, AE_TAIL, false);
    case F_AE_TAIL:
    case F_IS_TAIL:
        return parser_header_done(p, ev);
    case F_IS_FIXED:
        in->term = kms_get_le64(b);
        v = kms_get_le64(b + 32);
        if (v != in->header_len - IS_FIXED - IS_TRAILER) {
            return parser_fail(p, "InstallSnapshot configuration length does not match its header");
        }
        if (v < CONF_MIN || v % 8 != 0) {
            return parser_fail(p, "InstallSnapshot configuration length invalid");
        }
        p->conf_left = v;
        return parser_expect(p, F_CONF_FORMAT, 1, true);
    case F_CONF_FORMAT:
        if (b[0] != CONF_FORMAT) {
            return parser_fail(p, "unknown configuration format");
        }
        return parser_expect(p, F_CONF_N, 8, true);
    case F_CONF_N:
        v = kms_get_le64(b);
        if (v == 0 || v > p->conf_left / CONF_SERVER_MIN) {
            return parser_fail(p, "configuration server count invalid");
        }
        p->servers_left = v;
        return parser_next_server(p);
    case F_SRV_ID:
        if (kms_get_le64(b) == 0) {
            return parser_fail(p, "configuration server id 0");
        }
        p->field = F_SRV_ADDR;
        p->addr_len = 0;
        return 0;
    case F_SRV_ROLE:
        if (b[0] > ROLE_MAX) {
            return parser_fail(p, "configuration server role invalid");
        }
        p->servers_left--;
        return parser_next_server(p);
    case F_CONF_PAD:
        for (size_t i = 0; i < p->need; i++) {
            if (b[i] != 0) {
                return parser_fail(p, "configuration padding not zero");
            }
        }
        return parser_expect(p, F_IS_DATA_LEN, 8, false);
    case F_IS_DATA_LEN:
        v = kms_get_le64(b);
        if (v > KMS_FRAME_IS_PAYLOAD_MAX) {
            return parser_fail(p, "InstallSnapshot data too large");
        }
        in->payload_len = v;
        return parser_expect(p, F_IS_TAIL, 8, false);
    default:
        return parser_fail(p, "parser state corrupt");
    }
}

/* One byte of a configuration server address. */
static int parser_addr_byte(struct kms_frame_parser *p, uint8_t c)
{
    if (p->conf_left == 0 || p->hdr_left == 0) {
        return parser_fail(p, "configuration address not terminated");
    }
    p->conf_left--;
    p->hdr_left--;
    if (c != 0) {
        p->addr_len++;
        return 0;
    }
    if (p->addr_len == 0) {
        return parser_fail(p, "configuration address empty");
    }
    return parser_expect(p, F_SRV_ROLE, 1, true);
}

int kms_frame_parser_feed(struct kms_frame_parser *p, const void *data, size_t len,
                          size_t *used, enum kms_frame_event *ev)
{
    const uint8_t *d = data;
    size_t i = 0;
    size_t n;
    int rc = 0;

    *ev = KMS_FRAME_EV_NONE;
    if (p->failed) {
        rc = KMS_EFORMAT;
        goto out;
    }
    while (i < len) {
        if (p->sec == SEC_PAYLOAD) {
            n = len - i;
            if (n > p->payload_left) {
                n = (size_t)p->payload_left;
            }
            i += n;
            p->payload_left -= n;
            if (p->payload_left == 0) {
                *ev = KMS_FRAME_EV_END;
                parser_next_frame(p);
            }
            goto out;
        }
        if (p->field == F_SRV_ADDR) {
            rc = parser_addr_byte(p, d[i]);
            i++;
            if (rc != 0) {
                goto out;
            }
            continue;
        }
        n = p->need - p->got;
        if (n > len - i) {
            n = len - i;
        }
        memcpy(p->buf + p->got, d + i, n);
        p->got += n;
        i += n;
        if (p->sec == SEC_HEADER) {
            p->hdr_left -= n;
            if (p->field >= F_CONF_FORMAT && p->field <= F_CONF_PAD) {
                p->conf_left -= n;
            }
        }
        if (p->got < p->need) {
            continue;
        }
        rc = parser_field_done(p, ev);
        if (rc != 0 || *ev != KMS_FRAME_EV_NONE) {
            goto out;
        }
    }
out:
    *used = i;
    return rc;
}

bool kms_frame_parser_at_start(const struct kms_frame_parser *p)
{
    return !p->failed && p->sec == SEC_PREAMBLE && p->got == 0;
}

bool kms_frame_parser_in_payload(const struct kms_frame_parser *p)
{
    return !p->failed && p->sec == SEC_PAYLOAD;
}

const char *kms_frame_parser_error(const struct kms_frame_parser *p)
{
    return p->failed ? p->error : NULL;
}

void kms_frame_stamp_encode(const struct kms_frame_stamp *s, uint8_t out[KMS_FRAME_STAMP_SIZE])
{
    memset(out, 0, KMS_FRAME_PREAMBLE);
    out[0] = KMS_FRAME_STAMP;
    out[2] = KMS_FRAME_STAMP_VERSION;
    kms_put_le64(out + 8, KMS_FRAME_STAMP_BODY);
    kms_put_le64(out + 16, s->sent_us);
    kms_put_le64(out + 24, s->echo_us);
    kms_put_le64(out + 32, s->term);
    kms_put_le64(out + 40, s->flags);
    kms_put_le64(out + 48, s->lease_rem_us);
    kms_put_le64(out + 56, s->commit);
}

int kms_preamble_parse(const uint8_t pre[KMS_PREAMBLE_FIXED], uint64_t protocol,
                       size_t addr_max, uint64_t *proto_out, uint64_t *id, size_t *addr_len,
                       const char **why)
{
    uint64_t len = kms_get_le64(pre + 16);
    *proto_out = kms_get_le64(pre);
    *id = kms_get_le64(pre + 8);
    *addr_len = 0;
    if (*proto_out != protocol) {
        *why = "unsupported preamble protocol";
        return KMS_EVERSION;
    }
    if (*id == 0 || len == 0 || len % 8 != 0 || len > addr_max) {
        *why = "malformed preamble";
        return KMS_EFORMAT;
    }
    *addr_len = (size_t)len;
    *why = NULL;
    return 0;
}

bool kms_preamble_address_ok(const char *addr, size_t len)
{
    return len > 0 && memchr(addr, '\0', len) != NULL && addr[0] != '\0';
}
