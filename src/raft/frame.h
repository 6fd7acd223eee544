/*
 * kms_frame: incremental parser of the raft 0.22.1 (cowsql/raft) TCP wire
 * format, plus the kmsd stamp frame (kms_transport.h, "Lease stamps").
 *
 * The TLS transport runs every byte it forwards, in both directions,
 * through one parser per direction: to find frame boundaries (where a stamp
 * goes, where one must be cut out) and to refuse frames libraft would
 * mis-decode. libraft trusts the lengths a peer sends (an AppendEntries
 * header claiming more entries than it holds makes a replica read past its
 * buffer, an InstallSnapshot with an empty configuration trips an assertion),
 * so the parser checks every length against what raft 0.22.1's encoder
 * (src/uv_encoding.c, src/configuration.c) produces.
 *
 * A frame on the wire:
 *     preamble (16 bytes):  u8 type, u8 0, u8 version, u8 0, u32 0,
 *                           u64 header length (little endian)
 *     header (header length bytes, layout by type)
 *     payload: AppendEntries: the entries' data back to back, each of the
 *              length its batch header entry gives (no padding on the wire;
 *              raft's receiver assumes each is a multiple of 8);
 *              InstallSnapshot: the snapshot data, length in the header;
 *              other types: none.
 *
 * The parser is pure (no I/O, no allocation): feed it any chunking of the
 * stream; it consumes bytes up to the next event and says what happened.
 * Events never straddle sections, so every byte a single feed call consumes
 * lies in one of: "preamble+header" (kms_frame_parser_in_payload() false
 * before the call) or "payload" (true before the call).
 *
 * Ownership: the caller owns the parser struct (plain memory, nothing to
 * free). Threading: a parser is used by one thread at a time.
 */
#ifndef KMS_FRAME_H
#define KMS_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Message types, byte 0 of the preamble (enum in raft 0.22.1 <raft.h>). */
#define KMS_FRAME_APPEND_ENTRIES 1
#define KMS_FRAME_APPEND_ENTRIES_RESULT 2
#define KMS_FRAME_REQUEST_VOTE 3
#define KMS_FRAME_REQUEST_VOTE_RESULT 4
#define KMS_FRAME_INSTALL_SNAPSHOT 5
#define KMS_FRAME_TIMEOUT_NOW 6
#define KMS_FRAME_STAMP 0xC8 /* == KMS_STAMP_FRAME_TYPE */

#define KMS_FRAME_PREAMBLE 16u
#define KMS_FRAME_STAMP_BODY 48u   /* == KMS_STAMP_FRAME_BODY */
#define KMS_FRAME_STAMP_VERSION 1u
#define KMS_FRAME_STAMP_SIZE (KMS_FRAME_PREAMBLE + KMS_FRAME_STAMP_BODY)

/* Limits beyond raft's own encoder (which has none). */
#define KMS_FRAME_HEADER_MAX (1u << 20)              /* any header: 1 MiB
                                                       (65533 entries) */
/* AppendEntries data: raft 0.22.1 sends at most max_inflight_entries (32 by
 * default, kmsd does not change it) entries per message, and a kmsd entry
 * is at most 16 MiB of payload plus its 8-byte header, padded: 32 of them
 * are 512 MiB + 512 bytes. A lower cap would make the leader resend a
 * refused message forever. */
#define KMS_FRAME_AE_PAYLOAD_MAX (520ull << 20)
#define KMS_FRAME_IS_PAYLOAD_MAX (1ull << 30)        /* snapshot data: 1 GiB */

/* Stamp content (same fields as struct kms_transport_stamp, kept separate so
 * this module needs no raft/libuv headers). */
struct kms_frame_stamp {
    uint64_t sent_us, echo_us, term, flags, lease_rem_us, commit;
};

/* What the frame whose header just completed looks like. */
struct kms_frame_info {
    uint8_t type;         /* KMS_FRAME_* */
    uint8_t version;      /* preamble byte 2 */
    uint64_t header_len;  /* preamble's header length */
    uint64_t payload_len; /* bytes following the header */
    uint64_t term;        /* first header field: the sender's term (all raft
                             types); stamp frames: stamp.term */
    uint64_t n_entries;   /* AppendEntries only */
    struct kms_frame_stamp stamp; /* stamp frames only */
};

enum kms_frame_event {
    KMS_FRAME_EV_NONE = 0, /* consumed everything given, mid-section */
    KMS_FRAME_EV_HEADER,   /* a raft frame's preamble+header just completed
                              and is valid; info filled. If info.payload_len
                              is 0 the frame also ended. */
    KMS_FRAME_EV_STAMP,    /* a stamp frame just completed; info filled */
    KMS_FRAME_EV_END,      /* the payload of a raft frame just completed */
};

struct kms_frame_parser {
    /* All private; zero-initialise with kms_frame_parser_init(). */
    bool allow_stamp;
    int sec;               /* section of the next byte */
    int field;             /* header field being read */
    uint8_t buf[48];       /* current fixed-size field(s) */
    size_t got, need;
    uint64_t hdr_left;     /* header bytes still to come */
    uint64_t payload_left;
    uint64_t entries_left; /* AppendEntries batch entries still to read */
    uint64_t conf_left;    /* InstallSnapshot configuration bytes to come */
    uint64_t servers_left;
    uint64_t addr_len;     /* bytes of the current address so far */
    bool failed;
    const char *error;     /* static string, set when failed */
    struct kms_frame_info info;
};

/* Resets p. allow_stamp: whether stamp frames are legal in this stream
 * (incoming connections that negotiated "kmsd-raft/2"). */
void kms_frame_parser_init(struct kms_frame_parser *p, bool allow_stamp);

/* Consumes bytes of data[0..len) up to and including the next event.
 * *used = bytes consumed (<= len; 0 only when len is 0), *ev = what
 * happened, p->info describes the frame for HEADER/STAMP/END.
 * Returns 0, or KMS_EFORMAT when the stream is malformed (p->error says why;
 * *used then counts the bytes up to and including the offending one, and
 * every later call fails too). */
int kms_frame_parser_feed(struct kms_frame_parser *p, const void *data, size_t len,
                          size_t *used, enum kms_frame_event *ev);

/* Whether the next byte starts a new frame. */
bool kms_frame_parser_at_start(const struct kms_frame_parser *p);

/* Whether the next byte belongs to a raft frame's payload. */
bool kms_frame_parser_in_payload(const struct kms_frame_parser *p);

/* Why the parser failed (static string), or NULL. */
const char *kms_frame_parser_error(const struct kms_frame_parser *p);

/* Writes the KMS_FRAME_STAMP_SIZE bytes of a stamp frame into out. */
void kms_frame_stamp_encode(const struct kms_frame_stamp *s,
                            uint8_t out[KMS_FRAME_STAMP_SIZE]);

/* The transport's connection preamble, the first bytes a dialling peer
 * sends after TLS: u64le protocol, u64le raft id, u64le address length
 * (a multiple of 8, 8..addr_max), then the address, NUL-padded.
 * kms_preamble_parse checks the 24 fixed bytes: 0, KMS_EVERSION for another
 * protocol (*proto_out says which), KMS_EFORMAT for id 0 or a bad length;
 * *why names the problem. kms_preamble_address_ok checks the address
 * bytes (NUL-terminated inside len, not empty). Pure: any thread. */
#define KMS_PREAMBLE_FIXED 24
int kms_preamble_parse(const uint8_t pre[KMS_PREAMBLE_FIXED], uint64_t protocol,
                       size_t addr_max, uint64_t *proto_out, uint64_t *id, size_t *addr_len,
                       const char **why);
bool kms_preamble_address_ok(const char *addr, size_t len);

#endif /* KMS_FRAME_H */
