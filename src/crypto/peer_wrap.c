/* Peer unseal wrap: kms_peer_wrap.h. OpenSSL 3 EVP only. */
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "kms_crypto.h"
#include "kms_peer_wrap.h"

static const char wrap_label[] = "kmsd/peer-unseal/v1";
static const char proof_label[] = "kmsd/peer-unseal/reopen/v1";

#define BINDING_LEN (KMS_CLUSTER_ID_LEN + 16)
#define LABELLED_LEN (sizeof(wrap_label) - 1 + BINDING_LEN)

struct kms_peer_eph {
    EVP_PKEY *key;
};

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

/* label ‖ cluster_id ‖ u64be(requester) ‖ u64be(peer): the HKDF info and the AAD. */
static void labelled_binding(const struct kms_peer_binding *b, uint8_t out[LABELLED_LEN])
{
    size_t o = sizeof(wrap_label) - 1;
    memcpy(out, wrap_label, o);
    memcpy(out + o, b->cluster_id, KMS_CLUSTER_ID_LEN);
    put_be64(out + o + KMS_CLUSTER_ID_LEN, b->requester_id);
    put_be64(out + o + KMS_CLUSTER_ID_LEN + 8, b->peer_id);
}

static int keygen(EVP_PKEY **out, uint8_t pub[KMS_PEER_PUB_LEN], struct kms_err *err)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_X25519, NULL);
    EVP_PKEY *key = NULL;
    size_t publen = KMS_PEER_PUB_LEN;
    int rc;

    *out = NULL;
    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) != 1 || EVP_PKEY_keygen(ctx, &key) != 1 ||
        EVP_PKEY_get_raw_public_key(key, pub, &publen) != 1 || publen != KMS_PEER_PUB_LEN) {
        rc = kms_err_set(err, KMS_ECRYPTO, "X25519 key generation failed");
        goto out;
    }
    *out = key;
    key = NULL;
    rc = 0;
out:
    EVP_PKEY_free(key);
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

/* X25519(priv, their_pub) then the KEK. KMS_EFORMAT when OpenSSL refuses
 * the public key or the shared secret is all zero (a low-order point). */
static int kek_derive(EVP_PKEY *priv, const uint8_t their_pub[KMS_PEER_PUB_LEN],
                      const uint8_t requester_pub[KMS_PEER_PUB_LEN],
                      const uint8_t peer_pub[KMS_PEER_PUB_LEN], const struct kms_peer_binding *b,
                      uint8_t kek[32], struct kms_err *err)
{
    EVP_PKEY *peer = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, their_pub,
                                                 KMS_PEER_PUB_LEN);
    EVP_PKEY_CTX *ctx = NULL;
    uint8_t shared[32], salt[2 * KMS_PEER_PUB_LEN], info[LABELLED_LEN], acc = 0;
    size_t slen = sizeof(shared);
    int rc;

    if (peer == NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "peer unseal: invalid X25519 public key");
        goto out;
    }
    ctx = EVP_PKEY_CTX_new(priv, NULL);
    if (ctx == NULL || EVP_PKEY_derive_init(ctx) != 1 || EVP_PKEY_derive_set_peer(ctx, peer) != 1 ||
        EVP_PKEY_derive(ctx, shared, &slen) != 1 || slen != sizeof(shared)) {
        rc = kms_err_set(err, KMS_EFORMAT, "peer unseal: X25519 refused the public key");
        goto out;
    }
    for (size_t i = 0; i < sizeof(shared); i++) {
        acc |= shared[i];
    }
    if (acc == 0) {
        rc = kms_err_set(err, KMS_EFORMAT, "peer unseal: low-order X25519 public key");
        goto out;
    }
    memcpy(salt, requester_pub, KMS_PEER_PUB_LEN);
    memcpy(salt + KMS_PEER_PUB_LEN, peer_pub, KMS_PEER_PUB_LEN);
    labelled_binding(b, info);
    if ((rc = kms_hkdf_sha256(shared, sizeof(shared), salt, sizeof(salt), info, sizeof(info), kek,
                              32, err)) != 0) {
        kms_err_wrap(err, rc, "peer unseal: key derivation");
        goto out;
    }
    rc = 0;
out:
    OPENSSL_cleanse(shared, sizeof(shared));
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(peer);
    return rc;
}

int kms_peer_eph_new(struct kms_peer_eph **out, uint8_t pub[KMS_PEER_PUB_LEN],
                     struct kms_err *err)
{
    struct kms_peer_eph *e = OPENSSL_zalloc(sizeof(*e));
    int rc;

    *out = NULL;
    if (e == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "out of memory");
    }
    if ((rc = keygen(&e->key, pub, err)) != 0) {
        OPENSSL_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

void kms_peer_eph_free(struct kms_peer_eph *eph)
{
    if (eph != NULL) {
        EVP_PKEY_free(eph->key); /* OpenSSL wipes the private key it frees */
        OPENSSL_free(eph);
    }
}

int kms_peer_wrap(const uint8_t requester_pub[KMS_PEER_PUB_LEN],
                  const struct kms_peer_binding *b, const uint8_t root[32],
                  uint8_t peer_pub[KMS_PEER_PUB_LEN], uint8_t nonce[KMS_PEER_NONCE_LEN],
                  uint8_t wrapped[KMS_PEER_WRAP_LEN], struct kms_err *err)
{
    EVP_PKEY *mine = NULL;
    uint8_t kek[32], aad[LABELLED_LEN];
    int rc;

    if (requester_pub == NULL || b == NULL || b->cluster_id == NULL || root == NULL) {
        return kms_err_set(err, KMS_EINVAL, "peer wrap: invalid argument");
    }
    if ((rc = keygen(&mine, peer_pub, err)) != 0 ||
        (rc = kek_derive(mine, requester_pub, requester_pub, peer_pub, b, kek, err)) != 0 ||
        (rc = kms_rand_bytes(nonce, KMS_PEER_NONCE_LEN, err)) != 0) {
        goto out;
    }
    labelled_binding(b, aad);
    rc = kms_aead_seal(kek, nonce, aad, sizeof(aad), root, 32, wrapped, err);
out:
    OPENSSL_cleanse(kek, sizeof(kek));
    EVP_PKEY_free(mine);
    return rc;
}

int kms_peer_unwrap(const struct kms_peer_eph *eph, const uint8_t *peer_pub, size_t peer_pub_len,
                    const struct kms_peer_binding *b, const uint8_t *nonce, size_t nonce_len,
                    const uint8_t *wrapped, size_t wrapped_len, uint8_t root[32],
                    struct kms_err *err)
{
    uint8_t kek[32], aad[LABELLED_LEN], mypub[KMS_PEER_PUB_LEN];
    size_t mylen = sizeof(mypub);
    int rc;

    if (eph == NULL || b == NULL || b->cluster_id == NULL || root == NULL) {
        return kms_err_set(err, KMS_EINVAL, "peer unwrap: invalid argument");
    }
    if (peer_pub == NULL || peer_pub_len != KMS_PEER_PUB_LEN || nonce == NULL ||
        nonce_len != KMS_PEER_NONCE_LEN || wrapped == NULL || wrapped_len != KMS_PEER_WRAP_LEN) {
        return kms_err_set(err, KMS_EFORMAT,
                           "peer unwrap: public key %zu, nonce %zu, wrap %zu bytes (want %d, %d, %d)",
                           peer_pub_len, nonce_len, wrapped_len, KMS_PEER_PUB_LEN,
                           KMS_PEER_NONCE_LEN, KMS_PEER_WRAP_LEN);
    }
    if (EVP_PKEY_get_raw_public_key(eph->key, mypub, &mylen) != 1 || mylen != sizeof(mypub)) {
        return kms_err_set(err, KMS_ECRYPTO, "peer unwrap: own public key");
    }
    if ((rc = kek_derive(eph->key, peer_pub, mypub, peer_pub, b, kek, err)) != 0) {
        goto out;
    }
    labelled_binding(b, aad);
    rc = kms_aead_open(kek, nonce, aad, sizeof(aad), wrapped, wrapped_len, root, err);
    if (rc != 0) {
        kms_err_set(err, rc, "peer unwrap: the wrap is not for this key pair, cluster and pair "
                             "of nodes");
    }
out:
    OPENSSL_cleanse(kek, sizeof(kek));
    return rc;
}

int kms_peer_reopen_proof(const uint8_t root[32], const uint8_t cluster_id[16],
                          uint64_t generation, uint8_t out[KMS_PEER_PROOF_LEN],
                          struct kms_err *err)
{
    uint8_t info[sizeof(proof_label) - 1 + 8];
    memcpy(info, proof_label, sizeof(proof_label) - 1);
    put_be64(info + sizeof(proof_label) - 1, generation);
    return kms_hkdf_sha256(root, 32, cluster_id, KMS_CLUSTER_ID_LEN, info, sizeof(info), out,
                           KMS_PEER_PROOF_LEN, err);
}
