/*
 * Local checks of TLS files and of what kmsd's start-up needs, before any
 * socket is opened: kmsd --check-config (kms_config_check_startup) and
 * kmsctl's pre-connection checks (kms_tls_check_pair / kms_tls_check_ca).
 *
 * Every finding is one line "<prefix>: error: <file>: <problem>" (or
 * "warning:") on the report's FILE; the report counts them. Pure functions
 * of the files named (OpenSSL 3 only); any thread may call them.
 */
#ifndef KMS_TLS_CHECK_H
#define KMS_TLS_CHECK_H

#include <stdbool.h>
#include <stdio.h>

#include "kms_config.h"

struct kms_check_report {
    FILE *f;            /* borrowed; NULL = count only */
    const char *prefix; /* "kmsd: check-config" -> "kmsd: check-config: error: ..." */
    unsigned errors, warnings;
    /* kmsctl style instead: "Error: <prefix>: ..." / "Warning: <prefix>: ..." */
    bool cli_style;
};

/* What a certificate is for: the extended key usages it needs when it has
 * an EKU extension at all (no EKU = any use, like OpenSSL's verifier). */
enum kms_cert_role {
    KMS_CERT_ANY = 0,
    KMS_CERT_SERVER = 1,      /* serverAuth */
    KMS_CERT_CLIENT = 2,      /* clientAuth */
    KMS_CERT_NODE = 3,        /* serverAuth and clientAuth (mutual TLS both ways) */
};

/* Warn when a certificate ends within this many days. */
#define KMS_CERT_WARN_DAYS 30

/* Checks a certificate and its key: both files readable, the first
 * certificate parses, the key parses and matches it, it is valid now
 * (errors when expired or not yet valid, warning within KMS_CERT_WARN_DAYS),
 * its EKU fits role, and when want_cn is non-NULL its subject CN equals it.
 * what names the option ("tls.nodeCertFile"). Returns true when no error
 * was added. */
bool kms_tls_check_pair(struct kms_check_report *r, const char *what, const char *cert_path,
                        const char *key_path, enum kms_cert_role role, const char *want_cn);

/* Checks a CA bundle: readable, at least one certificate, each parses,
 * none expired (warning for one that is). When leaf_path is non-NULL, also
 * that the leaf certificate chains to this bundle (error otherwise). */
bool kms_tls_check_ca(struct kms_check_report *r, const char *what, const char *ca_path,
                      const char *leaf_path, const char *leaf_what);

/* Everything kmsd's start-up will need from cfg's files: the node
 * certificate (CN kmsd-node-<nodeId>, clientAuth+serverAuth) and its key,
 * signed by the cluster CA; the Talos certificate (serverAuth) unless
 * talos.plaintext; the cluster and operator CAs; dataDir exists and is a
 * writable directory, or can be created (its nearest existing ancestor is a
 * writable directory: kmsd creates missing parents too). Returns
 * the number of errors (warnings in r->warnings). */
unsigned kms_config_check_startup(const struct kms_config *cfg, struct kms_check_report *r);

#endif /* KMS_TLS_CHECK_H */
