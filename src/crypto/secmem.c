/*
 * Secure memory, process hardening and randomness.
 *
 * Key material (root key, shares, keyring terms, the plaintext keyring while
 * it is packed or unpacked) lives in the OpenSSL secure heap: one mmap'd
 * arena, mlock'ed so it never reaches swap, MADV_DONTDUMP so it is left out
 * of core dumps, guard pages around it, and every free clears the block.
 */
#include "kms_crypto.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "kms_log.h"
#include "kms_tsan.h"

/* Result of the one-time initialisation, read by every later call. */
static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_rc;          /* 0 or KMS_ECRYPTO */
static bool init_locked;     /* heap mlocked and MADV_DONTDUMP */

static void init_secure_heap(void)
{
    int r;

    if (CRYPTO_secure_malloc_initialized()) {
        /* Someone (a test, an embedding program) set it up already. */
        init_rc = 0;
        init_locked = true;
        return;
    }
    /* minsize 16: small blocks (shares, 32-byte keys) do not waste much. */
    r = CRYPTO_secure_malloc_init(KMS_SECURE_HEAP_SIZE, 16);
    if (r == 0) {
        init_rc = KMS_ECRYPTO;
        return;
    }
    init_rc = 0;
    /* 2: the arena exists but mlock or madvise failed (RLIMIT_MEMLOCK).
     * Still better than the ordinary heap (guard pages, clear on free), and
     * refusing to start would only push operators to weaker setups. */
    init_locked = r == 1;
    if (!init_locked) {
        kms_log(KMS_LOG_WARN, "crypto",
                "secure heap is not locked in memory (raise RLIMIT_MEMLOCK / LimitMEMLOCK); "
                "key material may be swapped",
                NULL);
    }
}

int kms_crypto_init(struct kms_err *err)
{
    if (pthread_once(&init_once, init_secure_heap) != 0) {
        return kms_err_set(err, KMS_ECRYPTO, "crypto init: pthread_once failed");
    }
    if (init_rc != 0) {
        return kms_err_set(err, init_rc,
                           "crypto init: cannot create the %u-byte OpenSSL secure heap",
                           (unsigned)KMS_SECURE_HEAP_SIZE);
    }
    return 0;
}

bool kms_crypto_secure_heap_locked(void)
{
    return init_rc == 0 && init_locked && CRYPTO_secure_malloc_initialized();
}

int kms_process_harden(struct kms_err *err)
{
    struct rlimit rl = {0, 0};

    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        return kms_err_set(err, KMS_EIO, "harden: prctl(PR_SET_DUMPABLE): %s", strerror(errno));
    }
    if (setrlimit(RLIMIT_CORE, &rl) != 0) {
        return kms_err_set(err, KMS_EIO, "harden: setrlimit(RLIMIT_CORE): %s", strerror(errno));
    }
    return 0;
}

/* The secure heap hands a block freed on one thread to the next
 * allocation on another under its own lock, inside libcrypto, which
 * ThreadSanitizer is told to ignore (tests/tsan.supp, called_from_lib): it
 * would see our last writes to a freed keyring and the next owner's first
 * writes to the same bytes as a race. This tag stands for that lock: every
 * free releases it, every allocation acquires it. No-op outside TSAN. */
static char secmem_heap_tag;

void *kms_secmem_alloc(size_t n)
{
    /* OPENSSL_secure_zalloc falls back to the ordinary heap before
     * CRYPTO_secure_malloc_init, and returns NULL when the arena is full. */
    void *p = OPENSSL_secure_zalloc(n == 0 ? 1 : n);
    KMS_TSAN_ACQUIRE(&secmem_heap_tag);
    return p;
}

void kms_secmem_free(void *p, size_t n)
{
    if (p == NULL) {
        return;
    }
    /* Clears n bytes (the secure heap clears the whole block anyway) and
     * frees; handles fallback heap pointers too. */
    KMS_TSAN_RELEASE(&secmem_heap_tag);
    OPENSSL_secure_clear_free(p, n == 0 ? 1 : n);
}

int kms_rand_bytes(void *buf, size_t n, struct kms_err *err)
{
    uint8_t *p = buf;

    while (n > 0) {
        int chunk = n > (size_t)INT_MAX ? INT_MAX : (int)n;
        if (RAND_bytes(p, chunk) != 1) {
            return kms_err_set(err, KMS_ECRYPTO, "RAND_bytes failed");
        }
        p += chunk;
        n -= (size_t)chunk;
    }
    return 0;
}
