/* libFuzzer: the request messages of every gRPC API kmsd serves, unpacked
 * and put through the checks their handlers run before doing anything
 * (without gRPC): Talos KMSService Seal/Unseal (node UUID, blob), the
 * cluster API's Forward (its entry re-encoded and decoded, as the leader
 * does before proposing it) and the operator calls (share text, UUIDs).
 *
 * Input: u8 which (mod 8), then the packed request.
 * Invariants: no crash; a Forward entry that kms_entry_encode accepts is
 * decoded back by kms_entry_decode (what the leader proposes, every node
 * can apply); parse functions return 0 or negative codes only.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>

#include "kms_crypto.h"
#include "kms_store.h"
#include "kmsd/v1/cluster.pb-c.h"
#include "sidero/kms/kms.pb-c.h"

static void talos(const uint8_t *p, size_t n)
{
    Sidero__Kms__Request *r = sidero__kms__request__unpack(NULL, n, p);
    uint8_t kid[16], half[32];
    struct kms_err err;
    if (r == NULL) {
        return;
    }
    (void)kms_node_uuid_valid(r->node_uuid);
    kms_err_clear(&err);
    if (kms_blob_parse(r->data.data, r->data.len, kid, half, &err) > 0) {
        abort();
    }
    sidero__kms__request__free_unpacked(r, NULL);
}

static void forward(const uint8_t *p, size_t n)
{
    Kmsd__V1__ForwardRequest *r = kmsd__v1__forward_request__unpack(NULL, n, p);
    struct raft_buffer buf = {NULL, 0};
    Kmsd__V1__Entry *back = NULL;
    struct kms_err err;
    if (r == NULL) {
        return;
    }
    kms_err_clear(&err);
    if (r->entry != NULL && kms_entry_encode(r->entry, &buf, &err) == 0) {
        if (kms_entry_decode(buf.base, buf.len, &back, &err) != 0) {
            abort(); /* the leader would propose what no node can apply */
        }
        kmsd__v1__entry__free_unpacked(back, NULL);
        raft_free(buf.base);
    }
    kmsd__v1__forward_request__free_unpacked(r, NULL);
}

static void unseal(const uint8_t *p, size_t n)
{
    Kmsd__V1__UnsealRequest *r = kmsd__v1__unseal_request__unpack(NULL, n, p);
    struct kms_share sh;
    struct kms_err err;
    if (r == NULL) {
        return;
    }
    kms_err_clear(&err);
    if (kms_share_parse(r->share, &sh, &err) > 0) {
        abort();
    }
    kmsd__v1__unseal_request__free_unpacked(r, NULL);
}

#define UNPACK_FREE(type, fn)                                                                  \
    do {                                                                                       \
        type *m = fn##__unpack(NULL, n, p);                                                    \
        if (m != NULL) {                                                                       \
            fn##__free_unpacked(m, NULL);                                                      \
        }                                                                                      \
    } while (0)

static void keys(const uint8_t *p, size_t n)
{
    Kmsd__V1__KeysRevokeRequest *r = kmsd__v1__keys_revoke_request__unpack(NULL, n, p);
    if (r != NULL) {
        (void)kms_node_uuid_valid(r->node_uuid);
        kmsd__v1__keys_revoke_request__free_unpacked(r, NULL);
    }
    Kmsd__V1__KeysListRequest *l = kmsd__v1__keys_list_request__unpack(NULL, n, p);
    if (l != NULL) {
        (void)kms_node_uuid_valid(l->node_uuid);
        kmsd__v1__keys_list_request__free_unpacked(l, NULL);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *p = data + 1;
    size_t n;
    static int init;

    if (!init) {
        if (kms_crypto_init(NULL) != 0) {
            abort();
        }
        init = 1;
    }
    if (size < 1 || size > 65536) {
        return 0;
    }
    n = size - 1;
    switch (data[0] % 8) {
    case 0:
        talos(p, n);
        break;
    case 1:
        forward(p, n);
        break;
    case 2:
        unseal(p, n);
        break;
    case 3:
        keys(p, n);
        break;
    case 4:
        UNPACK_FREE(Kmsd__V1__MembersAddRequest, kmsd__v1__members_add_request);
        break;
    case 5:
        UNPACK_FREE(Kmsd__V1__InitRequest, kmsd__v1__init_request);
        UNPACK_FREE(Kmsd__V1__KeysShowRequest, kmsd__v1__keys_show_request);
        break;
    case 6:
        UNPACK_FREE(Kmsd__V1__ForwardResponse, kmsd__v1__forward_response);
        break;
    default:
        UNPACK_FREE(Kmsd__V1__TransferLeaderRequest, kmsd__v1__transfer_leader_request);
        UNPACK_FREE(Kmsd__V1__MembersRemoveRequest, kmsd__v1__members_remove_request);
        break;
    }
    return 0;
}
