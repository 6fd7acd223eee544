/*
 * Strict scalar parsers shared by kmsd's configuration, kmsctl and the raft
 * transport: one grammar per kind of value.
 *
 *   integer   decimal digits only ("007" is 7; no sign, no spaces)
 *   bool      true | false
 *   duration  <digits>[.<digits>]<unit>, unit ms | s | m | h; the value must
 *             be a whole number of milliseconds ("1.5s" = 1500 ms, "0.5ms"
 *             is refused). A bare number is refused unless the caller names
 *             a default unit (kmsctl: seconds).
 *   size      <digits>[B | KiB | MiB | GiB]
 *   address   host:port | :port | [v6]:port; port 1..65535 (at most five
 *             digits); host a DNS name or IPv4 literal (letters, digits,
 *             '-', '.', '_'), or an IPv6 literal in brackets
 *   CIDR      a.b.c.d/n | v6/n; host bits must be zero
 *
 * On failure each returns -1 and writes a one-line reason into why[wn]
 * (when why is not NULL), quoting the input: kmsd's configuration errors
 * are made of these reasons. Pure: any thread.
 */
#ifndef KMS_PARSE_H
#define KMS_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Integer in [min, max]. */
int kms_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                  size_t wn);

int kms_parse_bool(const char *s, bool *out, char *why, size_t wn);

/* Duration in [min_ms, max_ms] milliseconds. bare_unit_ms: what a number
 * without a unit counts in (1000 for seconds), 0 to refuse it. */
int kms_parse_duration_ms(const char *s, uint64_t min_ms, uint64_t max_ms,
                          uint64_t bare_unit_ms, uint64_t *out, char *why, size_t wn);

/* Size in [min, max] bytes. */
int kms_parse_size(const char *s, uint64_t min, uint64_t max, uint64_t *out, char *why,
                   size_t wn);

/* An address split into its parts; host is "" for ":port", without the
 * brackets for "[v6]:port". */
struct kms_addr {
    char host[256];
    uint16_t port;
};

#define KMS_PARSE_ADDR_NEED_HOST (1u << 0) /* refuse ":port" */
#define KMS_PARSE_ADDR_PORT0 (1u << 1)     /* accept port 0 (a listener: any free port) */

/* out may be NULL (validate only). */
int kms_parse_addr(const char *s, unsigned flags, struct kms_addr *out, char *why, size_t wn);

/* addr: the network address, IPv4 stored v4-mapped (::ffff:a.b.c.d);
 * prefix over the 16-byte form (IPv4 /24 -> 120). */
int kms_parse_cidr(const char *s, uint8_t addr[16], unsigned *prefix, char *why, size_t wn);

#endif /* KMS_PARSE_H */
