/*
 * Which CA a cluster-API client certificate chains to.
 *
 * The gRPC server has already verified the client certificate against the
 * union of the cluster CA and the operator CA; these checks re-verify the
 * leaf (grpc's "x509_pem_cert" auth property) against one CA at a time.
 */
#ifndef KMSD_AUTHZ_H
#define KMSD_AUTHZ_H

#include <stdbool.h>

#include "kms_err.h"

struct kmsd;
struct kms_rpc_call;
struct kmsd_authz;

/* Loads both CA files. Replaces d->authz atomically on reload. */
int kmsd_authz_load(struct kmsd *d, struct kms_err *err);
void kmsd_authz_free(struct kmsd *d);

/* A node certificate from the cluster CA with CN "kmsd-node-<id>". */
bool kmsd_authz_node(struct kmsd *d, struct kms_rpc_call *call);
/* A certificate from the operator CA. */
bool kmsd_authz_operator(struct kmsd *d, struct kms_rpc_call *call);

#endif
