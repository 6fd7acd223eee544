/*
 * kms_pkcs11: the PKCS#11 seal. The root key R is wrapped by an AES-256 key
 * that lives in a PKCS#11 token (a network HSM in production, SoftHSM2 in
 * development and tests) and never leaves it: CKA_SENSITIVE, not
 * CKA_EXTRACTABLE. The module is loaded with dlopen + C_GetFunctionList and
 * driven through the PKCS#11 C API directly (header: p11-kit/pkcs11.h).
 *
 * Mechanism: CKM_AES_GCM (C_Encrypt/C_Decrypt, 12-byte random IV, 128-bit
 * tag, AAD = "kmsd/hsm-wrap/v1" || cluster_id) when the token offers it for
 * encrypt and decrypt, else CKM_AES_KEY_WRAP_PAD (RFC 5649, C_WrapKey and
 * C_UnwrapKey of a session object holding R). The result is a
 * Kmsd__V1__HsmWrap carried in the replicated EncryptedKeyring.
 *
 * Every operation is self-contained: C_Initialize, find the token by label,
 * open a session, C_Login (CKU_USER), work, C_Logout, close, C_Finalize. So
 * an HSM that went away and came back (or a SoftHSM token directory moved
 * back) is found again by the next call, and nothing is held between calls.
 *
 * Errors (negative KMS_E*, message names token and key, never the PIN):
 *   KMS_EIO        the module does not load or lacks C_GetFunctionList
 *   KMS_EUNAVAIL   no token with that label (HSM unreachable, token gone),
 *                  or the device/session failed
 *   KMS_EDENIED    wrong PIN, PIN locked
 *   KMS_ENOTFOUND  no key with that label in the token
 *   KMS_EFORMAT    the key is not a 256-bit AES key, is extractable, or the
 *                  wrap record is malformed
 *   KMS_EAUTH      the wrapped key does not decrypt (another key or cluster)
 *   KMS_ECRYPTO    any other PKCS#11 failure (CKR code in the message)
 *
 * Threads: a struct kms_p11 may be used from any thread; calls are
 * serialised by its own mutex (C_Initialize/C_Finalize are process-wide).
 */
#ifndef KMS_PKCS11_H
#define KMS_PKCS11_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kms_err.h"
#include "kmsd/v1/record.pb-c.h"

#define KMS_P11_MECH_AUTO 0u
#define KMS_P11_MECH_GCM 0x1087u      /* CKM_AES_GCM */
#define KMS_P11_MECH_KWP 0x210au      /* CKM_AES_KEY_WRAP_PAD */
#define KMS_P11_PIN_MAX 256

/* What to open. Strings are borrowed for the call that takes them. */
struct kms_p11_params {
    const char *module;      /* path of the PKCS#11 module (.so) */
    const char *token_label; /* CKA_LABEL of the token (CK_TOKEN_INFO.label) */
    const char *key_label;   /* CKA_LABEL of the AES-256 wrapping key */
    const char *pin;         /* user PIN, NUL-terminated; never logged */
};

struct kms_p11;

/* dlopens params->module and gets its function list; copies the labels and
 * the PIN (the PIN into secure memory). *out is owned by the caller: free
 * with kms_p11_close. Does not talk to the token yet. */
int kms_p11_open(const struct kms_p11_params *params, struct kms_p11 **out,
                 struct kms_err *err);
/* Wipes the PIN, dlcloses the module. NULL is fine. */
void kms_p11_close(struct kms_p11 *p);

/* Logs in and looks the key up. *key_found says whether it exists (a
 * missing key is not an error here); an existing key must be a sensitive,
 * non-extractable AES-256 key (KMS_EFORMAT otherwise). *mech (may be NULL)
 * receives the mechanism a wrap would use now. */
int kms_p11_check(struct kms_p11 *p, bool *key_found, unsigned *mech, struct kms_err *err);

/* Wraps root (32 bytes) for cluster_id. When the key is missing and
 * create_key is set, generates it in the token (CKM_AES_KEY_GEN, token
 * object, private, sensitive, not extractable); otherwise KMS_ENOTFOUND.
 * mech: KMS_P11_MECH_AUTO (GCM when offered, else KWP) or one of the two.
 * *out is malloc-owned: free with kmsd__v1__hsm_wrap__free_unpacked(*out,
 * NULL). */
int kms_p11_wrap(struct kms_p11 *p, const uint8_t cluster_id[16], const uint8_t root[32],
                 bool create_key, unsigned mech, Kmsd__V1__HsmWrap **out, struct kms_err *err);

/* Unwraps into root (32 bytes, caller's secure memory); wiped on failure. */
int kms_p11_unwrap(struct kms_p11 *p, const Kmsd__V1__HsmWrap *w, const uint8_t cluster_id[16],
                   uint8_t root[32], struct kms_err *err);

/* Deep copy of a wrap record (rotation carries it to the next keyring).
 * *out as for kms_p11_wrap. */
int kms_p11_wrap_dup(const Kmsd__V1__HsmWrap *w, Kmsd__V1__HsmWrap **out, struct kms_err *err);

/* Reads a PIN file: the first line, without its newline, 1..KMS_P11_PIN_MAX-1
 * bytes, into pin (KMS_P11_PIN_MAX bytes, wiped on failure). KMS_EIO when
 * unreadable, KMS_EFORMAT when empty or too long. */
int kms_p11_pin_read(const char *path, char pin[KMS_P11_PIN_MAX], struct kms_err *err);

#endif /* KMS_PKCS11_H */
