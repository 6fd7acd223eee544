/*
 * kmsd's configuration options: the one place each option is declared.
 *
 * Each group below is an X-macro list of rows, one row per option:
 *
 *   X(section, key, field, alias, TYPE, default, min, max, flags, enums,
 *     env, flag, meta, help, doc)
 *
 *   section  YAML mapping the key sits in ("root" for top-level keys)
 *   key      YAML key within it; the YAML path is "section.key"
 *   field    member of struct kms_config (in a nested struct named after
 *            the section for NESTED groups, else at the top level)
 *   alias    the daemon's name for the same member (d->opt.<alias>); equal
 *            to `field` outside NESTED groups, except for lists
 *   TYPE     U64 UINT BOOL DURATION (stored as unsigned ms) SIZE (bytes)
 *            STRING PATH (readable when set) ADDR ENUM (int index into
 *            enums) PEERS CIDRS UUIDS (lists: pointer + n_<field>)
 *   default  parsed like any other value; NULL = required, no default
 *   min, max range of numbers, durations (ms) and sizes (bytes)
 *   flags    IMM (restart to change) or REL (SIGHUP re-reads the file it
 *            names), | REQ (must be set), SENS (redacted), EMPTY_OK (ADDR
 *            may be "": derived)
 *   enums    NAMES("a", "b") for an ENUM (index 0, 1...), else NULL
 *   env      KMSD_* environment variable
 *   flag     long command-line flag without "--"
 *   meta     placeholder for the value in --help
 *   help     one line for --help
 *   doc      the meaning column of docs/configuration.md (Markdown)
 *
 * KMS_CONFIG_GROUPS lists the groups in file order (the order of --help,
 * --dump-config and the docs table). A group's kind says how its section
 * maps to C: ROOT (top-level keys, top-level members), NESTED (a YAML
 * section and a struct member of the same name), FLAT (a YAML section
 * whose members sit at the top level of struct kms_config).
 *
 * From these rows come struct kms_config (kms_config.h), the YAML schema
 * (config_file.c), the option table driving defaults, environment, flags,
 * validation, --help and the dump (config_table.c), and the options table
 * in docs/configuration.md (kmsd --print-config-table; test_config_docs
 * fails when the two disagree).
 *
 * Adding an option: one row here, then `kmsd --print-config-table` into
 * docs/configuration.md; code that uses it reads d->opt.<alias>. A rule
 * across options goes into validate() (config_load.c).
 */
#ifndef KMS_CONFIG_OPTIONS_H
#define KMS_CONFIG_OPTIONS_H

/* clang-format off */
#define KMS_CONFIG_OPTS_ROOT1(X) \
    X(root, nodeId, node_id, node_id, U64, NULL, 1, UINT64_C(1) << 63, IMM | REQ, NULL, \
      "KMSD_NODE_ID", "node-id", "ID", \
      "this node's raft id, unique in the cluster (1..2^63)", \
      "This node's raft id, unique in the cluster.") \
    X(root, dataDir, data_dir, data_dir, STRING, NULL, 0, 0, IMM | REQ, NULL, \
      "KMSD_DATA_DIR", "data-dir", "DIR", \
      "directory for the raft log and RocksDB state", \
      "Raft log and RocksDB state.")

#define KMS_CONFIG_OPTS_TALOS(X) \
    X(talos, listen, listen, talos_listen, ADDR, ":4050", 0, 0, IMM, NULL, \
      "KMSD_TALOS_LISTEN", "talos-listen", "ADDR", \
      "Talos KMS API listen address", \
      "Talos KMS API (`sidero.kms.KMSService`).") \
    X(talos, advertise, advertise, talos_advertise, ADDR, "", 0, 0, IMM | EMPTY_OK, NULL, \
      "KMSD_TALOS_ADVERTISE", "talos-advertise", "ADDR", \
      "Talos API address shown to operators (default: talos.listen when it has a host)", \
      "Talos address shown to operators; \"\" = `talos.listen` when it names a host.") \
    X(talos, certFile, cert_file, talos_cert, PATH, "", 0, 0, REL, NULL, \
      "KMSD_TALOS_CERT_FILE", "talos-cert-file", "FILE", \
      "PEM server certificate chain for the Talos API", \
      "PEM server certificate chain. Required unless `talos.plaintext`.") \
    X(talos, keyFile, key_file, talos_key, PATH, "", 0, 0, REL, NULL, \
      "KMSD_TALOS_KEY_FILE", "talos-key-file", "FILE", \
      "PEM private key for talos.certFile", \
      "PEM key for `talos.certFile`. Required unless `talos.plaintext`.") \
    X(talos, plaintext, plaintext, talos_plaintext, BOOL, "false", 0, 0, IMM, NULL, \
      "KMSD_TALOS_PLAINTEXT", "talos-plaintext", "BOOL", \
      "serve the Talos API without TLS (development only)", \
      "No TLS on the Talos API (development only). Excludes `certFile`, `keyFile`, `tls12`.") \
    X(talos, tls12, tls12, talos_tls12, BOOL, "false", 0, 0, IMM, NULL, \
      "KMSD_TALOS_TLS12", "talos-tls12", "BOOL", \
      "also accept TLS 1.2 on the Talos API (default TLS 1.3 only)", \
      "Also accept TLS 1.2 on the Talos port (default 1.3 only). Only with TLS. The cluster API and raft stay TLS 1.3-only; with this on, a SIGHUP rebuilds the cluster API listener instead of reloading it in place (see docs/security.md).") \
    X(talos, transport, transport, talos_transport, ENUM, "h2", 0, 0, IMM, NAMES("grpc", "h2"), \
      "KMSD_TALOS_TRANSPORT", "talos-transport", "h2|grpc", \
      "HTTP/2 stack of the Talos API: h2 (OpenSSL + nghttp2) or grpc (gRPC C core)", \
      "HTTP/2 stack serving the Talos API. `h2`: OpenSSL + nghttp2 (`src/server/rpc_h2.c`): about 0.6x the server CPU of `grpc` per new-connection Unseal and 0.5x per warm call (docs/benchmarks.md). `grpc`: the gRPC C core (the only stack before this option). Same methods, status codes, limits and TLS policy. The cluster API always uses gRPC.") \
    X(talos, maxMessageBytes, max_message_bytes, talos_max_message, SIZE, "4096", 1024, 16u << 20, IMM, NULL, \
      "KMSD_TALOS_MAX_MESSAGE_BYTES", "talos-max-message-bytes", "SIZE", \
      "largest Talos API request accepted", \
      "Largest Talos request accepted.") \
    X(talos, workers, workers, workers, UINT, "0", 0, 1024, IMM, NULL, \
      "KMSD_TALOS_WORKERS", "talos-workers", "N", \
      "gRPC worker threads (0 = number of cores)", \
      "gRPC worker threads; 0 = number of cores.")

#define KMS_CONFIG_OPTS_CLUSTER(X) \
    X(cluster, listen, listen, cluster_listen, ADDR, ":4051", 0, 0, IMM, NULL, \
      "KMSD_CLUSTER_LISTEN", "cluster-listen", "ADDR", \
      "cluster/operator API (mTLS) listen address", \
      "Cluster and operator API (mTLS).") \
    X(cluster, advertise, advertise, cluster_advertise, ADDR, "", 0, 0, IMM | EMPTY_OK, NULL, \
      "KMSD_CLUSTER_ADVERTISE", "cluster-advertise", "ADDR", \
      "cluster API address peers use (default: from initialCluster or cluster.listen)", \
      "Address peers and kmsctl use. \"\" = this node's `initialCluster` entry, else `cluster.listen` if it names a host, else an error.")

#define KMS_CONFIG_OPTS_RAFT(X) \
    X(raft, listen, listen, raft_listen, ADDR, ":4052", 0, 0, IMM, NULL, \
      "KMSD_RAFT_LISTEN", "raft-listen", "ADDR", \
      "raft transport (mTLS) listen address", \
      "Raft transport (mTLS).") \
    X(raft, advertise, advertise, raft_advertise, ADDR, "", 0, 0, IMM | EMPTY_OK, NULL, \
      "KMSD_RAFT_ADVERTISE", "raft-advertise", "ADDR", \
      "raft address peers use (default: from initialCluster or raft.listen)", \
      "Raft address peers use; derived like `cluster.advertise`.") \
    X(raft, electionTimeout, election_timeout_ms, election_timeout_ms, DURATION, "1s", 100, 60000, IMM, NULL, \
      "KMSD_RAFT_ELECTION_TIMEOUT", "raft-election-timeout", "DURATION", \
      "raft election timeout; also the read-lease period", \
      "Election timeout; also the read-lease period.") \
    X(raft, heartbeatTimeout, heartbeat_timeout_ms, heartbeat_timeout_ms, DURATION, "100ms", 10, 10000, IMM, NULL, \
      "KMSD_RAFT_HEARTBEAT_TIMEOUT", "raft-heartbeat-timeout", "DURATION", \
      "raft heartbeat interval; must be below raft.electionTimeout", \
      "Heartbeat interval; must be below `electionTimeout`.") \
    X(raft, snapshotThreshold, snapshot_threshold, snapshot_threshold, U64, "8192", 1, UINT32_MAX, IMM, NULL, \
      "KMSD_RAFT_SNAPSHOT_THRESHOLD", "raft-snapshot-threshold", "N", \
      "log entries between raft snapshots", \
      "Log entries between snapshots.") \
    X(raft, snapshotTrailing, snapshot_trailing, snapshot_trailing, U64, "2048", 0, UINT32_MAX, IMM, NULL, \
      "KMSD_RAFT_SNAPSHOT_TRAILING", "raft-snapshot-trailing", "N", \
      "log entries kept after a snapshot", \
      "Entries kept after a snapshot.")

#define KMS_CONFIG_OPTS_HTTP(X) \
    X(http, listen, listen, http_listen, ADDR, ":4053", 0, 0, IMM, NULL, \
      "KMSD_HTTP_LISTEN", "http-listen", "ADDR", \
      "/metrics /healthz /readyz listen address", \
      "`/metrics`, `/healthz`, `/readyz`.")

#define KMS_CONFIG_OPTS_TLS(X) \
    X(tls, nodeCertFile, node_cert_file, node_cert, PATH, NULL, 0, 0, REL | REQ, NULL, \
      "KMSD_TLS_NODE_CERT_FILE", "tls-node-cert-file", "FILE", \
      "PEM node certificate for raft and cluster mTLS (server and client)", \
      "Node certificate (raft and cluster mTLS, client and server).") \
    X(tls, nodeKeyFile, node_key_file, node_key, PATH, NULL, 0, 0, REL | REQ, NULL, \
      "KMSD_TLS_NODE_KEY_FILE", "tls-node-key-file", "FILE", \
      "PEM private key for tls.nodeCertFile", \
      "Its key.") \
    X(tls, clusterCAFile, cluster_ca_file, cluster_ca, PATH, NULL, 0, 0, REL | REQ, NULL, \
      "KMSD_TLS_CLUSTER_CA_FILE", "tls-cluster-ca-file", "FILE", \
      "PEM CA bundle that signs node certificates", \
      "CA bundle that signs node certificates.") \
    X(tls, operatorCAFile, operator_ca_file, operator_ca, PATH, NULL, 0, 0, REL | REQ, NULL, \
      "KMSD_TLS_OPERATOR_CA_FILE", "tls-operator-ca-file", "FILE", \
      "PEM CA bundle that signs kmsctl operator certificates", \
      "CA bundle that signs kmsctl operator certificates.")

#define KMS_CONFIG_OPTS_ROOT2(X) \
    X(root, initialCluster, initial_cluster, peers, PEERS, "", 0, 0, IMM, NULL, \
      "KMSD_INITIAL_CLUSTER", "initial-cluster", "ID=RAFT@CLUSTER,...", \
      "bootstrap members, identical on every first node", \
      "Bootstrap members, identical on every first node (see below).") \
    X(root, unsealReads, unseal_reads, unseal_reads, ENUM, "lease", 0, 0, IMM, NAMES("lease", "local"), \
      "KMSD_UNSEAL_READS", "unseal-reads", "lease|local", \
      "serve Unseal only with a read lease (lease) or from any applied state (local)", \
      "`lease`: Unseal only with a read lease (revocations effective within one lease). `local`: from any applied state, also without quorum (availability over revocation freshness).") \
    X(root, leaseGrace, lease_grace_ms, lease_grace_ms, DURATION, "3s", 0, 600000, IMM, NULL, \
      "KMSD_LEASE_GRACE", "lease-grace", "DURATION", \
      "close the Talos listener after this long without a read lease", \
      "Close the Talos listener after this long without a read lease (so Talos fails over).") \
    X(root, requestWait, request_wait_ms, request_wait_ms, DURATION, "5s", 10, 9000, IMM, NULL, \
      "KMSD_REQUEST_WAIT", "request-wait", "DURATION", \
      "longest wait for a leader or lease inside one RPC (below Talos's 10s deadline)", \
      "Longest wait for a leader or lease inside one RPC; kept below Talos's 10 s deadline.")

#define KMS_CONFIG_OPTS_UNSEAL(X) \
    X(unseal, peer, peer, peer_unseal, BOOL, "false", 0, 0, IMM, NULL, \
      "KMSD_UNSEAL_PEER", "unseal-peer", "BOOL", \
      "a restarted replica asks an unsealed member for the root key (set on every member; docs/security.md \"Peer unseal\")", \
      "Peer unseal: a restarted replica asks an unsealed member for the root key instead of waiting for k shares, and this replica hands the key to members that ask. Set it on **every** member (a member with `false` neither asks nor answers). Read what it trades first: docs/security.md \"Peer unseal\"; operating it: docs/operations.md \"Unsealing after restarts\".")

#define KMS_CONFIG_OPTS_RATE_LIMIT(X) \
    X(rateLimit, failedUnsealsPerMinute, failed_unseals_per_minute, failed_unseals_per_minute, UINT, "30", 0, 1000000, IMM, NULL, \
      "KMSD_RATE_LIMIT_FAILED_UNSEALS_PER_MINUTE", "rate-limit-failed-unseals-per-minute", "N", \
      "failed Unseals allowed per source address (IPv6: per /64) per minute (0 = no limit)", \
      "Failing Unseals per source address (IPv6: per /64) per minute on this replica; beyond it further *failing* Unseals from that address are refused with `UNAVAILABLE` (an Unseal whose blob decrypts is always served); 0 = no limit.") \
    X(rateLimit, failedUnsealsGlobalPerMinute, failed_unseals_global_per_minute, failed_unseals_global_per_minute, UINT, "600", 0, 10000000, IMM, NULL, \
      "KMSD_RATE_LIMIT_FAILED_UNSEALS_GLOBAL_PER_MINUTE", "rate-limit-failed-unseals-global-per-minute", "N", \
      "failed Unseals allowed per minute over all addresses (0 = no limit)", \
      "The same over all addresses together (bounds an attacker who rotates source addresses); 0 = no limit.") \
    X(rateLimit, sealsPerMinute, seals_per_minute, seals_per_minute, UINT, "120", 0, 10000000, IMM, NULL, \
      "KMSD_RATE_LIMIT_SEALS_PER_MINUTE", "rate-limit-seals-per-minute", "N", \
      "Seals allowed per source address (IPv6: per /64) per minute (0 = no limit)", \
      "Seals per source address (IPv6: per /64) per minute on this replica; beyond: `RESOURCE_EXHAUSTED`; 0 = no limit. A Talos node seals once per encrypted volume at install, so 120 serves a NAT with dozens of nodes installing at once.") \
    X(rateLimit, sealsPerNodePerMinute, seals_per_node_per_minute, seals_per_node_per_minute, UINT, "10", 0, 1000000, IMM, NULL, \
      "KMSD_RATE_LIMIT_SEALS_PER_NODE_PER_MINUTE", "rate-limit-seals-per-node-per-minute", "N", \
      "Seals allowed per node UUID per minute (0 = no limit)", \
      "Seals per node UUID per minute on this replica; beyond: `RESOURCE_EXHAUSTED`; 0 = no limit.") \
    X(rateLimit, recordsPerNode, records_per_node, records_per_node, UINT, "256", 0, 100000, IMM, NULL, \
      "KMSD_RATE_LIMIT_RECORDS_PER_NODE", "rate-limit-records-per-node", "N", \
      "live (unrevoked) keys allowed per node UUID (0 = no limit)", \
      "Live (unrevoked) keys per node UUID, counted in this replica's applied state; a Seal beyond it gets `RESOURCE_EXHAUSTED` until old keys are revoked; 0 = no limit.")

#define KMS_CONFIG_OPTS_LAST_ACCESS(X) \
    X(lastAccess, interval, last_access_interval_ms, last_access_interval_ms, DURATION, "60s", 0, 86400000, IMM, NULL, \
      "KMSD_LAST_ACCESS_INTERVAL", "last-access-interval", "DURATION", \
      "each replica replicates the last-access times of its unseals at most once per this interval (0 = not recorded)", \
      "Each replica collects the key ids of its successful unseals (one slot per key, the latest time kept) and replicates them as one `TouchBatch` write at most once per interval, forwarded to the leader by a follower: an unseal burst costs each replica at most one replicated write per interval. `keys list/show` show the result (`LAST ACCESS`) up to one interval late. 0 = last access not recorded.") \
    X(lastAccess, maxBatch, last_access_max_batch, last_access_max_batch, UINT, "4096", 1, 65536, IMM, NULL, \
      "KMSD_LAST_ACCESS_MAX_BATCH", "last-access-max-batch", "N", \
      "keys per last-access write; keys beyond it wait for the next interval", \
      "Keys per last-access write (and per replica's table); keys that find the table full are counted in `kmsd_last_access_dropped_total` and recorded at their next unseal.")

#define KMS_CONFIG_OPTS_LIMITS(X) \
    X(limits, maxConnections, max_connections, max_conns, UINT, "0", 0, 1000000, IMM, NULL, \
      "KMSD_LIMITS_MAX_CONNECTIONS", "limits-max-connections", "N", \
      "open connections per gRPC port, all peers (0 = auto: min(1024, (fd limit - 128) / 4))", \
      "Open connections per gRPC port (Talos API, cluster API), all peers together; more are reset at accept. 0 = min(1024, (fd limit − 128) / 4), fd limit after raising the soft `RLIMIT_NOFILE` to the hard one.") \
    X(limits, maxConnectionsPerAddress, max_connections_per_address, max_conns_per_addr, UINT, "64", 1, 1000000, IMM, NULL, \
      "KMSD_LIMITS_MAX_CONNECTIONS_PER_ADDRESS", "limits-max-connections-per-address", "N", \
      "open connections per source address on each gRPC port", \
      "Open connections per source address on each gRPC port.") \
    X(limits, handshakeTimeout, handshake_timeout_ms, handshake_timeout_ms, DURATION, "10s", 100, 60000, IMM, NULL, \
      "KMSD_LIMITS_HANDSHAKE_TIMEOUT", "limits-handshake-timeout", "DURATION", \
      "a connection must finish TLS and HTTP/2 set-up within this", \
      "A gRPC connection must finish TCP accept → TLS → HTTP/2 settings within this (`GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS`).") \
    X(limits, maxConcurrentStreams, max_concurrent_streams, max_streams, UINT, "16", 1, 1000, IMM, NULL, \
      "KMSD_LIMITS_MAX_CONCURRENT_STREAMS", "limits-max-concurrent-streams", "N", \
      "concurrent HTTP/2 streams per gRPC connection", \
      "HTTP/2 streams in flight per gRPC connection (advertised in SETTINGS).") \
    X(limits, grpcMemory, grpc_memory, grpc_memory, SIZE, "64MiB", 4u << 20, UINT64_C(16) << 30, IMM, NULL, \
      "KMSD_LIMITS_GRPC_MEMORY", "limits-grpc-memory", "SIZE", \
      "gRPC resource quota (transport memory) per gRPC port", \
      "gRPC resource quota per gRPC port (transport buffers; under pressure gRPC shrinks them).") \
    X(limits, connectionIdle, connection_idle_ms, conn_idle_ms, DURATION, "5m", 1000, 86400000, IMM, NULL, \
      "KMSD_LIMITS_CONNECTION_IDLE", "limits-connection-idle", "DURATION", \
      "close gRPC connections without a call for this long", \
      "Close gRPC connections without a call for this long.") \
    X(limits, connectionMaxAge, connection_max_age_ms, conn_max_age_ms, DURATION, "30m", 1000, 86400000, IMM, NULL, \
      "KMSD_LIMITS_CONNECTION_MAX_AGE", "limits-connection-max-age", "DURATION", \
      "GOAWAY gRPC connections older than this (10 s grace)", \
      "GOAWAY gRPC connections older than this; calls in flight get 10 s.") \
    X(limits, httpMaxConnections, http_max_connections, http_max_conns, UINT, "64", 1, 10000, IMM, NULL, \
      "KMSD_LIMITS_HTTP_MAX_CONNECTIONS", "limits-http-max-connections", "N", \
      "open connections on the HTTP port", \
      "Open connections on the HTTP port (`/healthz`, `/readyz`, `/metrics`).") \
    X(limits, httpMaxConnectionsPerAddress, http_max_connections_per_address, http_max_conns_per_addr, UINT, "8", 1, 10000, IMM, NULL, \
      "KMSD_LIMITS_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "limits-http-max-connections-per-address", "N", \
      "open connections per source address on the HTTP port", \
      "Open connections per source address on the HTTP port.") \
    X(limits, listenerProbeInterval, listener_probe_interval_ms, probe_interval_ms, DURATION, "2s", 0, 60000, IMM, NULL, \
      "KMSD_LIMITS_LISTENER_PROBE_INTERVAL", "limits-listener-probe-interval", "DURATION", \
      "self-connect check of the gRPC listeners (0 = off)", \
      "How often the supervisor self-connects to the Talos and cluster ports to check that they really accept (drives `/readyz` and `kmsctl status`; two failed probes rebuild the listener). 0 = no probe.") \
    X(limits, talosConnectionBytes, talos_connection_bytes, talos_conn_bytes, SIZE, "32KiB", 0, UINT64_C(1) << 30, IMM, NULL, \
      "KMSD_LIMITS_TALOS_CONNECTION_BYTES", "limits-talos-connection-bytes", "SIZE", \
      "shut down a Talos API connection that received more than this (0 = off)", \
      "A Talos API connection that has received more than this is shut down (HTTP/2 rapid reset; a Talos connection carries one call of ≤ `talos.maxMessageBytes`, about 6 KiB with TLS); never below 4 × `talos.maxMessageBytes` + 16 KiB. 0 = off.") \
    X(limits, abuseBanAfter, abuse_ban_after, abuse_ban_after, UINT, "3", 0, 1000, IMM, NULL, \
      "KMSD_LIMITS_ABUSE_BAN_AFTER", "limits-abuse-ban-after", "N", \
      "byte-budget shutdowns of one address within 10s that ban it (0 = never)", \
      "Connections of one address shut down for their byte budget within 10 s that ban the address from the Talos API; 0 = never ban.") \
    X(limits, abuseBanTime, abuse_ban_ms, abuse_ban_ms, DURATION, "30s", 0, 3600000, IMM, NULL, \
      "KMSD_LIMITS_ABUSE_BAN_TIME", "limits-abuse-ban-time", "DURATION", \
      "how long a banned address is refused on the Talos API", \
      "How long a banned address is reset at accept on the Talos API.")

#define KMS_CONFIG_OPTS_ENROLMENT(X) \
    X(enrolment, allowedCIDRs, allowed_cidrs, cidrs, CIDRS, "", 0, 0, IMM, NULL, \
      "KMSD_ENROLMENT_ALLOWED_CIDRS", "enrolment-allowed-cidrs", "CIDR,...", \
      "source networks allowed to Seal (empty = any)", \
      "Source networks allowed to Seal **and Unseal**; empty = any.") \
    X(enrolment, uuidAllowList, uuid_allow_list, uuids, UUIDS, "", 0, 0, IMM, NULL, \
      "KMSD_ENROLMENT_UUID_ALLOW_LIST", "enrolment-uuid-allow-list", "UUID,...", \
      "node UUIDs allowed to Seal (empty = any)", \
      "Node UUIDs allowed to Seal **and Unseal** (1..128 printable bytes each, no commas); empty = any. Removing a UUID (or narrowing the CIDRs) therefore also stops its existing keys from unsealing: revoke instead if that is the intent, the policy is per replica configuration.")

#define KMS_CONFIG_OPTS_SEAL(X) \
    X(seal, type, type, seal_type, ENUM, "shamir", 0, 0, IMM, NAMES("shamir", "pkcs11"), \
      "KMSD_SEAL_TYPE", "seal-type", "shamir|pkcs11", \
      "how this node gets the root key at start: k shares (shamir) or a PKCS#11 token", \
      "How this replica gets the root key at start: `shamir` = k shares (`kmsctl operator unseal`); `pkcs11` = it unwraps the root key itself with an AES-256 key in a PKCS#11 token (auto-unseal; docs/operations.md \"PKCS#11 seal\").") \
    X(seal, module, module, seal_module, PATH, "", 0, 0, IMM, NULL, \
      "KMSD_SEAL_MODULE", "seal-module", "FILE", \
      "PKCS#11 module (.so) of the HSM (seal.type pkcs11)", \
      "The HSM vendor's PKCS#11 module (`.so`), loaded with `dlopen`; e.g. `/usr/lib/softhsm/libsofthsm2.so`. Required with `pkcs11`.") \
    X(seal, tokenLabel, token_label, seal_token_label, STRING, "", 0, 0, IMM, NULL, \
      "KMSD_SEAL_TOKEN_LABEL", "seal-token-label", "LABEL", \
      "label of the PKCS#11 token that holds the wrapping key", \
      "Label of the token (HSM partition) that holds the wrapping key, at most 32 bytes. Required with `pkcs11`.") \
    X(seal, keyLabel, key_label, seal_key_label, STRING, "kmsd-root-wrap", 0, 0, IMM, NULL, \
      "KMSD_SEAL_KEY_LABEL", "seal-key-label", "LABEL", \
      "CKA_LABEL of the AES-256 wrapping key (created by operator init when missing)", \
      "`CKA_LABEL` of the AES-256 wrapping key, at most 32 bytes. `operator init` (or `seal-migrate --to pkcs11`) generates it in the token when missing: sensitive, not extractable. An existing key must be AES-256, sensitive and not extractable.") \
    X(seal, pinFile, pin_file, seal_pin_file, PATH, "", 0, 0, IMM, NULL, \
      "KMSD_SEAL_PIN_FILE", "seal-pin-file", "FILE", \
      "file whose first line is the token's user PIN", \
      "File whose first line is the token's user PIN (mode 0600, owned by kmsd). Required with `pkcs11` unless `KMSD_PKCS11_PIN` is set.") \
    X(seal, pin, pin, seal_pin, STRING, "", 0, 0, IMM | SENS, NULL, \
      "KMSD_PKCS11_PIN", "seal-pin", "PIN", \
      "the token's user PIN (prefer seal.pinFile or the environment; never logged)", \
      "The PIN itself; meant for `KMSD_PKCS11_PIN` (e.g. from systemd `LoadCredential`/an env file). Takes precedence over `seal.pinFile`. Never logged, `<redacted>` in `--dump-config`. Avoid the flag: argv is readable by every local user.") \
    X(seal, retryMax, retry_max_ms, seal_retry_max_ms, DURATION, "30s", 100, 3600000, IMM, NULL, \
      "KMSD_SEAL_RETRY_MAX", "seal-retry-max", "DURATION", \
      "longest wait between auto-unseal attempts while the HSM is unreachable", \
      "While the HSM is unreachable the replica retries the unwrap with backoff from 250 ms doubling up to this.")

#define KMS_CONFIG_OPTS_ROOT3(X) \
    X(root, logLevel, log_level, log_level, ENUM, "info", 0, 0, IMM, NAMES("debug", "info", "warn", "error"), \
      "KMSD_LOG_LEVEL", "log-level", "debug|info|warn|error", \
      "minimum log level", \
      "Minimum log level.") \
    X(root, memoryLock, memory_lock, memory_lock, BOOL, "true", 0, 0, IMM, NULL, \
      "KMSD_MEMORY_LOCK", "memory-lock", "BOOL", \
      "mlockall() the whole process so no key or share is ever swapped out", \
      "`mlockall(MCL_CURRENT\\|MCL_FUTURE\\|MCL_ONFAULT)` at start, so no buffer holding a share or passphrase is ever swapped out. If it fails (`RLIMIT_MEMLOCK`), kmsd logs a warning naming `LimitMEMLOCK=infinity` and runs on. `false` turns it off (with a warning).") \
    X(root, auditFile, audit_file, audit_file, STRING, "", 0, 0, IMM, NULL, \
      "KMSD_AUDIT_FILE", "audit-file", "FILE", \
      "hash-chained audit log (empty = <dataDir>/audit.log); kmsctl audit verify checks it", \
      "The hash-chained audit log (one JSON line per Seal/Unseal and per operator call, after its outcome; docs/security.md \"Audit log\"), created 0600 and appended to; empty = `<dataDir>/audit.log`. A restart continues the chain; SIGHUP reopens the file (log rotation). `kmsctl audit verify FILE` checks it.")

#define KMS_CONFIG_GROUPS(G) \
    G(ROOT, root1, KMS_CONFIG_OPTS_ROOT1) \
    G(NESTED, talos, KMS_CONFIG_OPTS_TALOS) \
    G(NESTED, cluster, KMS_CONFIG_OPTS_CLUSTER) \
    G(NESTED, raft, KMS_CONFIG_OPTS_RAFT) \
    G(NESTED, http, KMS_CONFIG_OPTS_HTTP) \
    G(NESTED, tls, KMS_CONFIG_OPTS_TLS) \
    G(ROOT, root2, KMS_CONFIG_OPTS_ROOT2) \
    G(NESTED, unseal, KMS_CONFIG_OPTS_UNSEAL) \
    G(FLAT, rateLimit, KMS_CONFIG_OPTS_RATE_LIMIT) \
    G(FLAT, lastAccess, KMS_CONFIG_OPTS_LAST_ACCESS) \
    G(NESTED, limits, KMS_CONFIG_OPTS_LIMITS) \
    G(FLAT, enrolment, KMS_CONFIG_OPTS_ENROLMENT) \
    G(NESTED, seal, KMS_CONFIG_OPTS_SEAL) \
    G(ROOT, root3, KMS_CONFIG_OPTS_ROOT3)

/* clang-format on */

#endif /* KMS_CONFIG_OPTIONS_H */
