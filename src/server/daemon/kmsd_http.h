/* HTTP endpoints: /healthz /readyz /metrics (http.c). */
#ifndef KMSD_HTTP_H
#define KMSD_HTTP_H

#include "kms_err.h"

struct kmsd;
int kmsd_http_start(struct kmsd *d, struct kms_err *err);
void kmsd_http_stop(struct kmsd *d);

#endif
