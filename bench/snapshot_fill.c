/*
 * kms-snapshot-fill: builds a large snapshot file for the 100k / 1M-record
 * benchmarks (bench/bench_onemillion.py) without sealing a million keys
 * over the network.
 *
 *   kms-snapshot-fill IN.snap OUT.snap RECORDS
 *
 * Reads IN (a real `kmsctl operator snapshot save` file, verified with
 * kms_backup_verify), writes OUT: IN's header (with a comment saying the
 * file is synthetic), every entry of IN, then filler records until OUT
 * holds RECORDS records. A filler record is a copy of one of IN's records
 * (same term, nonce and ciphertext sizes) under a new key id and a new node
 * UUID, with its 'U' index entry, so the store, the raft snapshot and the
 * lookups have the size and shape of a real 1M-record cluster. Fillers do
 * not unseal (the key id is bound into the ciphertext); IN's own records
 * still do. The trailer (entry count, SHA-256) is computed as `snapshot
 * save` does, so `kmsd restore` and `snapshot inspect` accept the file.
 * Exit 0, or 1 with a message on stderr.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "kms_store.h"

#include "kmsd/v1/record.pb-c.h"

struct fill_in {
    uint8_t **rec;   /* packed SealedRecord values of IN's records */
    size_t *reclen;
    size_t n_rec, cap;
};

struct fill_out {
    FILE *f;
    EVP_MD_CTX *md;
    uint64_t entries;
    int bad;
};

static void fill_write(struct fill_out *o, const void *p, size_t n)
{
    if (n > 0 && (fwrite(p, 1, n, o->f) != n || EVP_DigestUpdate(o->md, p, n) != 1)) {
        o->bad = 1;
    }
}

static void fill_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static void fill_entry(struct fill_out *o, const uint8_t *k, size_t klen, const uint8_t *v,
                       size_t vlen)
{
    static const uint8_t zero[8];
    uint8_t h[8];
    size_t pad = (8 - ((8 + klen + vlen) & 7)) & 7;
    fill_le(h, klen, 4);
    fill_le(h + 4, vlen, 4);
    fill_write(o, h, 8);
    fill_write(o, k, klen);
    fill_write(o, v, vlen);
    fill_write(o, zero, pad);
    o->entries++;
}

static int fill_collect_cb(void *arg, const uint8_t *k, size_t klen, const uint8_t *v,
                           size_t vlen)
{
    struct fill_in *in = arg;
    (void)klen;
    if (k[0] != 'R') {
        return 0;
    }
    if (in->n_rec == in->cap) {
        size_t nc = in->cap ? in->cap * 2 : 1024;
        uint8_t **r = realloc(in->rec, nc * sizeof(*r));
        size_t *l = r ? realloc(in->reclen, nc * sizeof(*l)) : NULL;
        if (r == NULL || l == NULL) {
            free(r != in->rec ? r : NULL);
            return KMS_ENOMEM;
        }
        in->rec = r;
        in->reclen = l;
        in->cap = nc;
    }
    in->rec[in->n_rec] = malloc(vlen);
    if (in->rec[in->n_rec] == NULL) {
        return KMS_ENOMEM;
    }
    memcpy(in->rec[in->n_rec], v, vlen);
    in->reclen[in->n_rec++] = vlen;
    return 0;
}

struct fill_copy {
    struct fill_out *o;
};

static int fill_copy_cb(void *arg, const uint8_t *k, size_t klen, const uint8_t *v,
                        size_t vlen)
{
    fill_entry(((struct fill_copy *)arg)->o, k, klen, v, vlen);
    return 0;
}

static uint64_t fill_mix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    struct kms_backup_info info;
    struct kms_err err;
    struct fill_in in;
    struct fill_out o;
    struct fill_copy cp;
    char *hdr = NULL;
    size_t hl = 0, want;
    FILE *inf = NULL;
    uint64_t seed = 0x6b6d7364, total;
    int code = 1;

    memset(&in, 0, sizeof(in));
    memset(&o, 0, sizeof(o));
    kms_err_clear(&err);
    if (argc != 4 || (total = strtoull(argv[3], NULL, 10)) == 0) {
        fprintf(stderr, "usage: kms-snapshot-fill IN.snap OUT.snap RECORDS\n");
        return 1;
    }
    if (kms_backup_verify(argv[1], &info, fill_collect_cb, &in, &err) != 0) {
        fprintf(stderr, "kms-snapshot-fill: %s\n", err.msg);
        goto out;
    }
    if (in.n_rec == 0 || total < in.n_rec) {
        fprintf(stderr, "kms-snapshot-fill: %s has %zu records (need 1 .. RECORDS)\n", argv[1],
                in.n_rec);
        goto out;
    }
    /* IN's header, without its final empty line and padding comment. */
    hdr = calloc(1, info.body_offset + 256);
    inf = fopen(argv[1], "rb");
    if (hdr == NULL || inf == NULL || fread(hdr, 1, info.body_offset, inf) != info.body_offset) {
        fprintf(stderr, "kms-snapshot-fill: cannot read %s\n", argv[1]);
        goto out;
    }
    hl = info.body_offset - 1; /* drop the empty line */
    while (hl > 0 && hdr[hl - 1] == '\n') {
        /* drop trailing lines made only of '#' and spaces (padding) */
        size_t s = hl - 1;
        while (s > 0 && hdr[s - 1] != '\n') {
            s--;
        }
        if (strspn(hdr + s, "# ") != hl - 1 - s || hl - 1 - s == 0) {
            break;
        }
        hl = s;
    }
    hl += (size_t)snprintf(hdr + hl, 200, "# synthetic: %" PRIu64 " records, filled by "
                           "kms-snapshot-fill from %zu real ones (benchmarks only)\n",
                           total, in.n_rec);
    want = (hl + 2 + 1 + 7) & ~(size_t)7; /* "#" pad "\n" then "\n" */
    hdr[hl++] = '#';
    while (hl + 2 < want) {
        hdr[hl++] = ' ';
    }
    hdr[hl++] = '\n';
    hdr[hl++] = '\n';

    o.f = fopen(argv[2], "wb");
    o.md = EVP_MD_CTX_new();
    if (o.f == NULL || o.md == NULL || EVP_DigestInit_ex(o.md, EVP_sha256(), NULL) != 1) {
        fprintf(stderr, "kms-snapshot-fill: cannot create %s\n", argv[2]);
        goto out;
    }
    fill_write(&o, hdr, hl);
    cp.o = &o;
    if (kms_backup_verify(argv[1], &info, fill_copy_cb, &cp, &err) != 0) {
        fprintf(stderr, "kms-snapshot-fill: %s\n", err.msg);
        goto out;
    }
    for (uint64_t i = in.n_rec; i < total && !o.bad; i++) {
        Kmsd__V1__SealedRecord *r;
        uint8_t kid[16], rk[17], uk[80], *buf;
        char uuid[40];
        uint64_t a = fill_mix(&seed), b = fill_mix(&seed), c = fill_mix(&seed);
        size_t len, ul;

        r = kmsd__v1__sealed_record__unpack(NULL, in.reclen[i % in.n_rec], in.rec[i % in.n_rec]);
        if (r == NULL) {
            fprintf(stderr, "kms-snapshot-fill: unreadable record\n");
            goto out;
        }
        memcpy(kid, &a, 8);
        memcpy(kid + 8, &b, 8);
        snprintf(uuid, sizeof(uuid), "%08" PRIx32 "-%04" PRIx32 "-4%03" PRIx32 "-8%03" PRIx32
                 "-%012" PRIx64, (uint32_t)c, (uint32_t)(c >> 32) & 0xffff,
                 (uint32_t)(c >> 48) & 0xfff, (uint32_t)(a >> 52), (uint64_t)(b & 0xffffffffffffULL));
        r->key_id.data = kid;
        r->key_id.len = 16;
        r->node_uuid = uuid;
        len = kmsd__v1__sealed_record__get_packed_size(r);
        buf = malloc(len);
        if (buf == NULL) {
            r->key_id.data = NULL;
            r->node_uuid = NULL;
            kmsd__v1__sealed_record__free_unpacked(r, NULL);
            goto out;
        }
        kmsd__v1__sealed_record__pack(r, buf);
        rk[0] = 'R';
        memcpy(rk + 1, kid, 16);
        fill_entry(&o, rk, sizeof(rk), buf, len);
        ul = strlen(uuid);
        uk[0] = 'U';
        memcpy(uk + 1, uuid, ul);
        uk[1 + ul] = '\0';
        memcpy(uk + 2 + ul, kid, 16);
        fill_entry(&o, uk, ul + 18, (const uint8_t *)"", 0);
        free(buf);
        /* The strings belong to this loop, not to protobuf-c. */
        r->key_id.data = NULL;
        r->key_id.len = 0;
        r->node_uuid = NULL;
        kmsd__v1__sealed_record__free_unpacked(r, NULL);
    }
    {
        uint8_t tr[16], md[32];
        unsigned int ml = 0;
        memcpy(tr, kms_backup_trailer_magic(), 8);
        fill_le(tr + 8, o.entries, 8);
        fill_write(&o, tr, 16);
        if (EVP_DigestFinal_ex(o.md, md, &ml) != 1 || ml != 32 || fwrite(md, 1, 32, o.f) != 32) {
            o.bad = 1;
        }
    }
    if (o.bad || fflush(o.f) != 0) {
        fprintf(stderr, "kms-snapshot-fill: write to %s failed\n", argv[2]);
        goto out;
    }
    printf("%s: %" PRIu64 " records, %" PRIu64 " entries\n", argv[2], total, o.entries);
    code = 0;
out:
    if (o.f != NULL && fclose(o.f) != 0) {
        code = 1;
    }
    EVP_MD_CTX_free(o.md);
    if (inf != NULL) {
        fclose(inf);
    }
    for (size_t i = 0; i < in.n_rec; i++) {
        free(in.rec[i]);
    }
    free(in.rec);
    free(in.reclen);
    free(hdr);
    return code;
}
