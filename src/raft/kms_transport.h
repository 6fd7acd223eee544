/*
 * kms_transport: a mutual-TLS 1.3 `struct raft_uv_transport` for canonical
 * raft (cowsql/raft 0.22.1, <raft/uv.h>).
 *
 * Canonical raft reads and writes the uv_stream_t a transport hands it with
 * its own framing. To put TLS under it without touching raft, every
 * connection is a small proxy running on the raft loop:
 *
 *     raft <-> uv_pipe_t ==socketpair== uv_pipe_t <-> SSL (memory BIOs) <-> TCP
 *
 * raft gets the first end of an AF_UNIX socketpair (a uv_pipe_t allocated
 * with raft_malloc(), so raft can raft_free() it after uv_close() as it does
 * with its own TCP handles); the transport owns the other end, the SSL object
 * and the TCP handle. When raft closes its pipe the proxy sees EOF and tears
 * the connection down; when the peer goes away or misbehaves the proxy closes
 * its end, so raft sees EOF (reads) or EPIPE (writes).
 *
 * Security rules:
 *   - TLS 1.3 only, certificates on both sides, verified against ca_file
 *     (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT). OpenSSL's default
 *     purpose checks apply: a server certificate needs serverAuth, a client
 *     certificate clientAuth (deploy/gen-pki.sh issues node certificates with
 *     both).
 *   - Identity: a node's certificate subject must hold exactly one commonName
 *     and it must be exactly "kmsd-node-<id>" with <id> the decimal raft id
 *     ("kmsd-node-3"; no leading zeros, no other spelling). SANs are not used
 *     for identity; addresses may change, ids do not.
 *   - The connecting side checks the server's CN against the id it dialled,
 *     else the connect fails with RAFT_NOCONNECTION.
 *   - After the TLS handshake the connecting side sends, inside TLS, the
 *     preamble raft's TCP transport sends in clear (little endian):
 *         u64 protocol version (1)
 *         u64 raft id of the connecting node
 *         u64 n = size of the address field (strlen(address)+1 rounded up to 8)
 *         n bytes: NUL-terminated address, zero padded
 *     The accepting side reads it, checks that the client certificate's CN
 *     is kmsd-node-<claimed id>, and only then hands the connection to raft.
 *   - If hooks with peer_allowed are installed, the accepting side also
 *     asks it about the (certificate-verified) claimed id; false = rejected.
 *   - Connections failing any check are dropped, counted as rejected and
 *     logged with kms_log (module "raft", rate limited). Incoming connections
 *     that do not finish TLS handshake + preamble within handshake_timeout_ms
 *     are dropped too; outgoing ones that do not finish TCP connect + TLS
 *     within connect_timeout_ms (short, 2 s by default, so that a peer is
 *     dialled again soon after a partition heals) fail with
 *     RAFT_NOCONNECTION. Nothing between nodes travels in plaintext.
 *
 * Frame validation (always on, hooks or not): the proxy walks every byte in
 * both directions with the raft 0.22.1 frame parser of frame.h. Incoming, a
 * frame's preamble and header are held back until they are complete and
 * valid: known type (1..6, or the stamp type when stamps were negotiated),
 * version byte no higher than 0.22.1 sends, reserved preamble bytes zero,
 * header length exact for the fixed-size messages, AppendEntries header of
 * exactly 48 + 16 * n_entries bytes (<= 1 MiB) with valid entry types and
 * 8-byte multiple lengths summing to <= 520 MiB, InstallSnapshot
 * configuration that decodes within its length (format 1, n servers with
 * non-zero ids, NUL-terminated addresses, valid roles, zero padding) and
 * snapshot data <= 1 GiB. A malformed frame closes the connection before
 * any of its bytes reach raft, is counted in `malformed` and logged (rate
 * limited). Outgoing, raft's own stream is walked the same way to find
 * frame starts; a frame raft writes that peers would refuse closes that
 * connection (`malformed_out`, logged as an error).
 *
 * Addresses: "host:port", "[v6addr]:port" or "hostname:port". Numeric
 * addresses are used as is; hostnames go through uv_getaddrinfo() and the
 * first result is used (for listen and connect alike).
 *
 * SIGPIPE: libuv writes to streams with write(2), so a write to a peer that
 * has gone (raft writing to its pipe after the proxy dropped the connection,
 * or the proxy writing to a reset TCP socket) raises SIGPIPE. The process
 * must ignore SIGPIPE (kms_raft_start() does; tests do it themselves).
 *
 * Threading: everything runs on the thread of the uv loop given to init,
 * including kms_transport_tls_reload(), kms_transport_tls_set_hooks() and
 * every hook. Only kms_transport_tls_stats() may be
 * called from any thread (relaxed atomic counters).
 */
#ifndef KMS_TRANSPORT_H
#define KMS_TRANSPORT_H

#include <stdbool.h>
#include <stdint.h>

#include <raft.h>
#include <raft/uv.h>

#include "kms_err.h"

struct uv_loop_s;

/* Preamble protocol version sent inside TLS. */
#define KMS_TRANSPORT_PROTOCOL 1

/*
 * Lease stamps (the read-lease protocol of lease.h; the argument is in
 * docs/architecture.md). Both ends of a connection negotiate them with TLS
 * ALPN: the connecting side offers "kmsd-raft/2" then "kmsd-raft/1"; a
 * server that selects "kmsd-raft/2" understands stamp frames. A peer that
 * selects nothing (an older kmsd) gets plain raft frames and no stamps.
 * The accepting side selects "kmsd-raft/2" whenever it is offered (with or
 * without hooks: without stamp_in it drops the stamps), else "kmsd-raft/1",
 * and accepts clients that offer no ALPN at all (older kmsd); such
 * connections carry no stamps, and a stamp frame on them is malformed.
 * Stamps are sent only when hooks with stamp_out are installed; stamp_out
 * and stamp_in are called on the loop thread from inside the transport's
 * read callbacks (they must not call back into the transport).
 *
 * On a connection where stamps were negotiated, the sending proxy writes one
 * stamp frame immediately before every raft frame it forwards from raft to
 * the peer (stamp_out is asked for its content right then, so `sent_us` is
 * read at the moment the bytes are handed to TLS). The receiving proxy
 * removes stamp frames from the stream (raft never sees them) and calls
 * stamp_in with the arrival time read when the frame was decoded, before
 * the raft frame that follows it is written to raft.
 *
 * Stamp frame on the wire (inside TLS, little endian), shaped like a raft
 * frame so one parser walks both:
 *     u8  type = KMS_STAMP_FRAME_TYPE, u8 0, u8 version = 1, u8 0, u32 0
 *     u64 header length = KMS_STAMP_FRAME_BODY (48)
 *     u64 sent_us, echo_us, term, flags, lease_rem_us, commit
 * A stamp frame with another length or version closes the connection.
 */
#define KMS_STAMP_FRAME_TYPE 0xC8
#define KMS_STAMP_FRAME_BODY 48u
#define KMS_STAMP_LEADER 0x1u  /* flags: sender leads `term` and seeks a lease */
#define KMS_STAMP_SHRED 0x4u   /* flags: sender has a revocation to shred and needs
                                  new entries to snapshot (node.c "shred"); a
                                  leader answers with NOOPs. Older nodes ignore it. */
/* flags bits 8..15: the highest raft entry version (Entry.version) the
 * sender applies; 0 (older kmsd, which sends no such bits and ignores them)
 * means 1. The leader emits a version only once every member advertises it
 * (node.c "entry version"). */
#define KMS_STAMP_EV_SHIFT 8u
#define KMS_STAMP_EV_MASK 0xffu

struct kms_transport_stamp {
    uint64_t sent_us;      /* sender's CLOCK_MONOTONIC, microseconds */
    uint64_t echo_us;      /* newest sent_us the sender has received from
                              the receiver (the receiver's clock); 0 = none */
    uint64_t term;         /* sender's current raft term */
    uint64_t flags;        /* KMS_STAMP_LEADER */
    uint64_t lease_rem_us; /* leader: microseconds its quorum lease still
                              runs after sent_us; 0 = no lease */
    uint64_t commit;       /* leader: its commit index at sent_us */
};

/* Called on the loop thread. `data` is the hooks' own pointer. */
struct kms_transport_hooks {
    void *data;
    /* Fill *s for a frame that is about to be written to peer `peer_id`.
     * Return false to send no stamp before this frame. */
    bool (*stamp_out)(void *data, uint64_t peer_id, struct kms_transport_stamp *s);
    /* A stamp arrived from `peer_id` (identity proven by the peer's
     * certificate). arrival_us: local CLOCK_MONOTONIC when it was decoded. */
    void (*stamp_in)(void *data, uint64_t peer_id, const struct kms_transport_stamp *s,
                     uint64_t arrival_us);
    /* Whether an incoming connection from `peer_id` may reach raft (it is in
     * the current configuration, or this node has no configuration yet).
     * NULL = every peer with a valid node certificate. */
    bool (*peer_allowed)(void *data, uint64_t peer_id);
};

/* Installs the hooks (copied). Call before raft starts the transport. */
void kms_transport_tls_set_hooks(struct raft_uv_transport *t,
                                 const struct kms_transport_hooks *hooks);

struct kms_transport_tls_config {
    const char *cert_file;   /* PEM certificate chain, leaf first; required */
    const char *key_file;    /* PEM private key of that certificate; required */
    const char *ca_file;     /* PEM cluster CA bundle; required */
    const char *bind_address; /* NULL = listen on the address raft passes to
                                 init (the node's advertised address) */
    unsigned handshake_timeout_ms; /* incoming: TLS + preamble; 0 = 10000 */
    unsigned connect_timeout_ms;   /* outgoing: TCP connect + TLS; 0 = 2000 */
    unsigned tcp_user_timeout_ms;  /* TCP_USER_TIMEOUT of every connection:
                                      data unacknowledged this long closes
                                      it (silent partition); 0 = 5000 */
};

/* Counters for metrics. Monotonic except `active`. */
struct kms_transport_stats {
    uint64_t accepted;       /* incoming connections handed to raft */
    uint64_t rejected;       /* incoming connections dropped before that:
                                TLS failure, bad certificate, bad preamble,
                                CN/id mismatch, timeout */
    uint64_t connected;      /* outgoing connections handed to raft */
    uint64_t connect_failed; /* outgoing attempts that failed (not canceled),
                                including servers with the wrong identity */
    uint64_t active;         /* connections currently open (any phase) */
    uint64_t malformed;      /* incoming connections closed for a malformed
                                frame after hand-over to raft */
    uint64_t malformed_out;  /* outgoing connections closed because raft
                                wrote a frame peers would refuse */
    uint64_t stamps_in;      /* stamp frames received (and cut out) */
    uint64_t stamps_out;     /* stamp frames sent */
};

/* Fills *t (caller-allocated, must stay valid and unmoved until
 * kms_transport_tls_close()) with the TLS transport. The files are read now
 * (the paths are not kept); bind_address is copied. On failure nothing is
 * allocated and *t must not be used.
 * Returns 0, KMS_EINVAL (bad cfg), KMS_ETLS (unreadable or invalid
 * certificate/key/CA) or KMS_ENOMEM. */
int kms_transport_tls_init(struct raft_uv_transport *t, struct uv_loop_s *loop,
                           const struct kms_transport_tls_config *cfg,
                           struct kms_err *err);

/* Releases what kms_transport_tls_init() allocated. Call it only after raft
 * closed the transport (the close callback raft passed to t->close fired,
 * which happens before raft's own close callback), or if raft never
 * initialised it (raft_init not called or failed before io init). After it
 * returns, the memory of *t may be released. */
void kms_transport_tls_close(struct raft_uv_transport *t);

/* Loads cert, key and CA into a new SSL context and uses it for every
 * connection started afterwards; connections already open keep the old one
 * (OpenSSL reference counting frees it with the last of them). On failure the
 * current context stays in use. Loop thread only. Returns 0, KMS_ETLS or
 * KMS_EINVAL. */
int kms_transport_tls_reload(struct raft_uv_transport *t, const char *cert,
                             const char *key, const char *ca,
                             struct kms_err *err);

/* Snapshot of the counters; safe from any thread while the transport lives. */
void kms_transport_tls_stats(const struct raft_uv_transport *t,
                             struct kms_transport_stats *out);

/* Checks an X509 certificate's subject against the identity rule above.
 * `cert` is an X509 * (void to keep OpenSSL out of this header). Returns 1 if
 * its only commonName is exactly "kmsd-node-<id>", else 0. */
int kms_transport_cert_matches_id(const void *cert, uint64_t id);

#endif /* KMS_TRANSPORT_H */
