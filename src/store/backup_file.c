/*
 * Backup files (`kmsctl operator snapshot save`; kms_store.h "backup
 * files"). Layout:
 *   text header  "KMSD-SNAPSHOT 1\n", '#' comment lines and "key: value"
 *                lines, ended by an empty line (at most 4 KiB)
 *   body         entries {u32le klen, u32le vlen, key, value, zero pad to 8}
 *                (kms_store_export_next encoding)
 *   trailer      "KMSDSNAP", u64le entry count, SHA-256 of every byte
 *                before these 32 (header, body, magic and count)
 * Reading side (verify, inspect): no RocksDB, so kmsctl links it
 * (kms_snapfile). Verification maps the file read-only (page cache, no
 * second heap copy).
 */
#include "kms_bytes.h"
#include "kms_store.h"
#include "store_keys.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define BK_MAGIC "KMSD-SNAPSHOT 1\n"
#define BK_TRAILER_MAGIC "KMSDSNAP"
#define BK_TRAILER_LEN 48u
#define BK_HEADER_MAX 4096u

static void bk_header_field(struct kms_backup_info *info, const char *line, size_t n)
{
    char key[32], val[64];
    const char *colon = memchr(line, ':', n);
    size_t kl, vl;
    if (colon == NULL || line[0] == '#') {
        return;
    }
    kl = (size_t)(colon - line);
    vl = n - kl - 1;
    if (kl >= sizeof(key) || vl >= sizeof(val)) {
        return;
    }
    memcpy(key, line, kl);
    key[kl] = '\0';
    memcpy(val, colon + 1, vl);
    val[vl] = '\0';
    const char *v = val;
    while (*v == ' ') {
        v++;
    }
    if (strcmp(key, "cluster-id") == 0) {
        snprintf(info->cluster_id, sizeof(info->cluster_id), "%s", v);
    } else if (strcmp(key, "index") == 0) {
        info->index = strtoull(v, NULL, 10);
    } else if (strcmp(key, "node") == 0) {
        info->node = strtoull(v, NULL, 10);
    } else if (strcmp(key, "active-term") == 0) {
        info->active_term = (uint32_t)strtoul(v, NULL, 10);
    } else if (strcmp(key, "shares") == 0) {
        unsigned n1 = 0, k1 = 0;
        if (sscanf(v, "%u of %u", &k1, &n1) == 2) {
            info->threshold = k1;
            info->share_count = n1;
        }
    } else if (strcmp(key, "created") == 0) {
        snprintf(info->created, sizeof(info->created), "%s", v);
    }
}

int kms_backup_verify(const char *path, struct kms_backup_info *info,
                      int (*entry_cb)(void *arg, const uint8_t *k, size_t klen, const uint8_t *v,
                                      size_t vlen),
                      void *arg, struct kms_err *err)
{
    int fd = -1, rc = 0;
    struct stat st;
    uint8_t *map = NULL;
    size_t size = 0, hdr_end = 0, off;
    uint8_t md[32];
    unsigned int ml = 0;
    EVP_MD_CTX *ctx = NULL;
    uint64_t want_entries;

    memset(info, 0, sizeof(*info));
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = kms_err_set(err, KMS_EIO, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = kms_err_set(err, KMS_EINVAL, "%s: not a regular file", path);
        goto out;
    }
    size = (size_t)st.st_size;
    if (size < strlen(BK_MAGIC) + 1 + BK_TRAILER_LEN) {
        rc = kms_err_set(err, KMS_ECORRUPT, "%s: %zu bytes: too short for a kmsd snapshot "
                         "(truncated?)", path, size);
        goto out;
    }
    map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        map = NULL;
        rc = kms_err_set(err, KMS_EIO, "%s: mmap: %s", path, strerror(errno));
        goto out;
    }
    if (memcmp(map, BK_MAGIC, strlen(BK_MAGIC)) != 0) {
        rc = kms_err_set(err, KMS_EFORMAT, "%s: not a kmsd snapshot file (no '%.15s' header)",
                         path, BK_MAGIC);
        goto out;
    }
    /* The header ends at the first empty line. */
    for (off = strlen(BK_MAGIC); off < size && off < BK_HEADER_MAX; ) {
        const uint8_t *nl = memchr(map + off, '\n', size - off);
        if (nl == NULL) {
            break;
        }
        size_t n = (size_t)(nl - (map + off));
        if (n == 0) {
            hdr_end = off + 1;
            break;
        }
        bk_header_field(info, (const char *)map + off, n);
        off += n + 1;
    }
    if (hdr_end == 0 || hdr_end % 8 != 0 || size - hdr_end < BK_TRAILER_LEN) {
        rc = kms_err_set(err, KMS_ECORRUPT, "%s: damaged header (truncated or altered)", path);
        goto out;
    }
    if (memcmp(map + size - BK_TRAILER_LEN, BK_TRAILER_MAGIC, 8) != 0) {
        rc = kms_err_set(err, KMS_ECORRUPT,
                         "%s: no end marker: the file is truncated (or was not finished)", path);
        goto out;
    }
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(ctx, map, size - 32) != 1 || EVP_DigestFinal_ex(ctx, md, &ml) != 1 ||
        ml != 32) {
        rc = kms_err_set(err, KMS_ECRYPTO, "%s: SHA-256 failed", path);
        goto out;
    }
    if (CRYPTO_memcmp(md, map + size - 32, 32) != 0) {
        rc = kms_err_set(err, KMS_ECORRUPT,
                         "%s: checksum mismatch: the file is damaged or was altered", path);
        goto out;
    }
    want_entries = kms_get_le64(map + size - 40);
    if (info->cluster_id[0] == '\0' || info->index == 0) {
        rc = kms_err_set(err, KMS_ECORRUPT, "%s: header lacks cluster-id or index", path);
        goto out;
    }
    info->body_offset = hdr_end;
    info->body_len = size - BK_TRAILER_LEN - hdr_end;
    for (off = hdr_end; off < size - BK_TRAILER_LEN; ) {
        size_t left = size - BK_TRAILER_LEN - off, klen, vlen, need;
        if (left < 8) {
            rc = kms_err_set(err, KMS_ECORRUPT, "%s: entry header cut at offset %zu", path, off);
            goto out;
        }
        klen = kms_get_le32(map + off);
        vlen = kms_get_le32(map + off + 4);
        need = (8 + klen + vlen + 7) & ~(size_t)7;
        if (klen == 0 || need > left) {
            rc = kms_err_set(err, KMS_ECORRUPT, "%s: bad entry at offset %zu", path, off);
            goto out;
        }
        const uint8_t *k = map + off + 8, *v = map + off + 8 + klen;
        info->entries++;
        if (k[0] == KS_P_RECORD) {
            Kmsd__V1__SealedRecord *r = kmsd__v1__sealed_record__unpack(NULL, vlen, v);
            if (r == NULL) {
                rc = kms_err_set(err, KMS_ECORRUPT, "%s: unreadable record at offset %zu", path,
                                 off);
                goto out;
            }
            info->records++;
            if (r->revoked_at != 0) {
                info->revoked++;
            }
            if (r->term < KMS_BACKUP_MAX_TERMS) {
                info->per_term[r->term]++;
            }
            kmsd__v1__sealed_record__free_unpacked(r, NULL);
        } else if (k[0] == KS_P_MEMBER) {
            info->members++;
        } else if (klen == strlen(KS_K_KEYRING) && memcmp(k, KS_K_KEYRING, klen) == 0) {
            info->has_keyring = true;
        }
        if (entry_cb != NULL && (rc = entry_cb(arg, k, klen, v, vlen)) != 0) {
            goto out;
        }
        off += need;
    }
    if (info->entries != want_entries) {
        rc = kms_err_set(err, KMS_ECORRUPT, "%s: %" PRIu64 " entries, the trailer says %" PRIu64,
                         path, info->entries, want_entries);
        goto out;
    }
    if (!info->has_keyring) {
        rc = kms_err_set(err, KMS_ECORRUPT, "%s: no keyring in the snapshot", path);
        goto out;
    }
out:
    EVP_MD_CTX_free(ctx);
    if (map != NULL) {
        munmap(map, size);
    }
    if (fd >= 0) {
        close(fd);
    }
    return rc;
}

const uint8_t *kms_backup_trailer_magic(void)
{
    return (const uint8_t *)BK_TRAILER_MAGIC;
}

