/*
 * The supervisor thread (supervisor.c) and what it shares with the
 * daemon's lifecycle (daemon.c).
 *
 * The supervisor owns the Talos API server (d->talos_srv; srv_mu guards the
 * pointer for readers on other threads) and rebuilds the cluster API server;
 * it runs the periodic jobs (keyring refresh, removal check, self metadata,
 * listener probes, log flush, the systemd watchdog) and applies TLS reloads.
 * It waits on d->wake between jobs. Started by kmsd_start, joined by
 * kmsd_stop, which then closes the Talos API itself.
 */
#ifndef KMSD_SUPERVISOR_H
#define KMSD_SUPERVISOR_H

struct kmsd;
struct kms_err;
struct kms_rpc_server_config;

/* Thread body; arg is the struct kmsd. Returns when d->stopping is set and
 * d->wake signalled. */
void *kmsd_supervisor_main(void *arg);

/* Stops and frees the Talos API server, if open, giving calls in flight
 * grace_ms. The supervisor thread, or kmsd_stop after joining it. */
void kmsd_talos_close(struct kmsd *d, const char *why, unsigned grace_ms);

/* The connection limits both gRPC servers share, from the configuration. */
void kmsd_rpc_limits_fill(const struct kmsd *d, struct kms_rpc_server_config *cfg);

/* (Re)builds the cluster API server. kmsd_start, then the supervisor only. */
int kmsd_cluster_open(struct kmsd *d, struct kms_err *err);

/* Applies a requested TLS reload (kmsd_reload_tls asks for one). Supervisor
 * thread only. */
void kmsd_tls_reload_apply(struct kmsd *d);

#endif /* KMSD_SUPERVISOR_H */
