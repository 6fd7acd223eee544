/*
 * Private to src/store: the RocksDB key layout (kms_store.h describes what
 * each key holds). Shared by the store (store*.c, snapshot.c, export.c,
 * backup.c) and the backup file reader (backup_file.c), which must not
 * depend on RocksDB.
 */
#ifndef KMS_STORE_KEYS_H
#define KMS_STORE_KEYS_H

/* Key prefixes and fixed keys (see kms_store.h). */
#define KS_P_RECORD 'R'
#define KS_P_UUID 'U'
#define KS_P_MEMBER 'M'
#define KS_P_META 'X'
#define KS_K_KEYRING "Kkeyring"
#define KS_K_PEER_GATE "Kpeer_unseal_gate"
#define KS_K_APPLIED "Xapplied"
#define KS_K_COUNT "Xcount"
#define KS_K_RESTORING "Xrestoring"
#define KS_K_ENTRYVER "Xentryver"

#endif /* KMS_STORE_KEYS_H */
