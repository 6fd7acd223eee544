/*
 * Process-wide gRPC set-up: the TLS version policy and gRPC's logging.
 *
 * gRPC 1.51 (Debian's libgrpc, linked to the system OpenSSL 3) has no API to
 * raise the minimum TLS version: it calls SSL_CTX_set_min_proto_version(1.2)
 * on every context it makes. OpenSSL's system_default configuration is
 * applied inside SSL_CTX_new(), before gRPC's call, so we set BOTH
 *   MinProtocol = TLSv1.3          (overwritten by gRPC, kept for others)
 *   Protocol    = -TLSv1.2, ...    (SSL_OP_NO_TLSv1_2: gRPC does not clear it)
 * and OpenSSL then negotiates TLS 1.3 only. The configuration is written to a
 * private temporary file and loaded with OPENSSL_init_ssl(LOAD_CONFIG) before
 * grpc_init(); it replaces the system /etc/ssl/openssl.cnf for this process.
 * The result is checked on a fresh SSL_CTX, so a process that had already
 * initialised OpenSSL's configuration gets an error instead of silently
 * accepting TLS 1.2.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/support/log.h>
#include <openssl/conf.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "kms_log.h"
#include "kms_rpc.h"
#include "kms_time.h"
#include "rpc_internal.h"

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static bool g_policy_loaded;
static atomic_bool g_tls12;

/* No session tickets: a TLS 1.3 server sends two NewSessionTicket messages
 * after every handshake by default (each an AEAD encryption of the session
 * and a write), and gRPC 1.51 exposes no option for it. Talos opens a new
 * connection per call and never resumes, kmsd's own clients do not either:
 * the tickets were pure cost on every connection. */
#define KMS_TLS_NO_TICKETS "Options = -SessionTicket\n" "NumTickets = 0\n"

/* The OpenSSL config around the policy's own lines: the system_default
 * section that every SSL_CTX of this process starts from. */
#define KMS_TLS_POLICY_HEAD                                                   \
    "# written by kmsd: TLS policy for this process only\n"                   \
    "openssl_conf = kmsd_conf\n"                                              \
    "[kmsd_conf]\n"                                                           \
    "ssl_conf = kmsd_ssl\n"                                                   \
    "[kmsd_ssl]\n"                                                            \
    "system_default = kmsd_sysdef\n"                                          \
    "[kmsd_sysdef]\n"

static const char *const policy_tls13 =
    KMS_TLS_POLICY_HEAD
    "MinProtocol = TLSv1.3\n"
    "Protocol = -SSLv3, -TLSv1, -TLSv1.1, -TLSv1.2, TLSv1.3\n"
    KMS_TLS_NO_TICKETS;

static const char *const policy_tls12 =
    KMS_TLS_POLICY_HEAD
    "MinProtocol = TLSv1.2\n"
    "CipherString = DEFAULT:@SECLEVEL=2\n"
    KMS_TLS_NO_TICKETS;

/* True when a fresh context refuses TLS 1.2 (min 1.3 or NO_TLSv1_2 set). */
static bool tls12_refused(void)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    bool refused;
    if (ctx == NULL) {
        return false;
    }
    /* What gRPC does after SSL_CTX_new(). */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    refused = (SSL_CTX_get_options(ctx) & SSL_OP_NO_TLSv1_2) != 0;
    SSL_CTX_free(ctx);
    return refused;
}

static int write_policy(const char *text, char *path, size_t pathlen, struct kms_err *err)
{
    const char *dir = getenv("TMPDIR");
    size_t len = strlen(text);
    int fd;

    if (dir == NULL || dir[0] == '\0') {
        dir = "/tmp";
    }
    snprintf(path, pathlen, "%s/kmsd-openssl-XXXXXX", dir);
    fd = mkstemp(path);
    if (fd < 0) {
        return kms_err_set(err, KMS_EIO, "TLS policy: cannot create %s: %s", path,
                           strerror(errno));
    }
    if (write(fd, text, len) != (ssize_t)len) {
        int e = errno;
        close(fd);
        unlink(path);
        return kms_err_set(err, KMS_EIO, "TLS policy: cannot write %s: %s", path, strerror(e));
    }
    close(fd);
    return 0;
}

static int load_policy(bool allow_tls12, struct kms_err *err)
{
    char path[512];
    OPENSSL_INIT_SETTINGS *settings;
    int rc;

    if ((rc = write_policy(allow_tls12 ? policy_tls12 : policy_tls13, path, sizeof(path),
                           err)) != 0) {
        return rc;
    }
    settings = OPENSSL_INIT_new();
    if (settings == NULL) {
        unlink(path);
        return kms_err_set(err, KMS_ENOMEM, "TLS policy: OPENSSL_INIT_new failed");
    }
    OPENSSL_INIT_set_config_filename(settings, path);
    OPENSSL_INIT_set_config_file_flags(settings, CONF_MFLAGS_DEFAULT_SECTION);
    (void)OPENSSL_init_ssl(OPENSSL_INIT_LOAD_CONFIG | OPENSSL_INIT_LOAD_SSL_STRINGS, settings);
    OPENSSL_INIT_free(settings);
    /* OpenSSL loads its configuration once per process: if something loaded
     * it before us, load ours explicitly (the ssl_conf module is registered
     * by now). */
    if (!allow_tls12 && !tls12_refused()) {
        if (CONF_modules_load_file(path, NULL, 0) <= 0) {
            ERR_clear_error();
        }
    }
    unlink(path);
    ERR_clear_error();
    if (!allow_tls12 && !tls12_refused()) {
        return kms_err_set(err, KMS_ETLS,
                           "TLS policy: cannot restrict OpenSSL to TLS 1.3 (was OpenSSL "
                           "configured before kms_rpc_global_init?)");
    }
    return 0;
}

static void grpc_log_sink(gpr_log_func_args *args)
{
    char where[64];
    enum kms_log_level lvl = args->severity == GPR_LOG_SEVERITY_ERROR ? KMS_LOG_WARN
                             : args->severity == GPR_LOG_SEVERITY_INFO ? KMS_LOG_INFO
                                                                      : KMS_LOG_DEBUG;
    const char *file = args->file != NULL ? strrchr(args->file, '/') : NULL;
    snprintf(where, sizeof(where), "%s:%d", file != NULL ? file + 1 : "?", args->line);
    /* kms_rpc_server_stop() shuts the listening socket down itself, and
     * gRPC reports that as "Failed accept4: Invalid argument" every time a
     * listener closes on purpose (seal, lease loss, stop): expected, so
     * debug. Any other accept failure (EMFILE, ...) stays a warning. */
    if (args->message != NULL &&
        strstr(args->message, "Failed accept4: Invalid argument") != NULL) {
        lvl = KMS_LOG_DEBUG;
    }
    /* gRPC's messages embed peers and error details: key on the source
     * location so one failing call site shares one rate-limit bucket. */
    kms_log_keyed(lvl, "grpc", where, args->message != NULL ? args->message : "", "src", where,
                  NULL);
}

/* Debian builds Abseil without NDEBUG, so absl::Mutex runs its debug-only
 * deadlock detection (a global lock-order graph updated on every lock) in
 * every gRPC mutex: 6.5 % of kmsd's CPU per new-connection Unseal in a perf
 * profile (docs/benchmarks.md). gRPC's own release builds have it off; so do
 * we. There is no C API: the C++ function is looked up by its mangled name
 * (enum OnDeadlockCycle { kIgnore = 0, kReport, kAbort }, passed as int).
 * Not found (another Abseil build): left as it is, and said at debug. */
static void absl_deadlock_detection_off(void)
{
    static const char *const names[] = {
        "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
        "_ZN4absl12lts_2022062329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
        "_ZN4absl29SetMutexDeadlockDetectionModeENS_15OnDeadlockCycleE",
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        void *sym = dlsym(RTLD_DEFAULT, names[i]);
        if (sym != NULL) {
            void (*set_mode)(int);
            memcpy(&set_mode, &sym, sizeof(set_mode));
            set_mode(0);
            return;
        }
    }
    kms_log(KMS_LOG_DEBUG, "rpc",
            "absl::SetMutexDeadlockDetectionMode not found: Abseil's deadlock detection "
            "left as built",
            NULL);
}

int kms_rpc_global_init(bool allow_tls12, struct kms_err *err)
{
    int rc = 0;

    pthread_mutex_lock(&g_mu);
    if (!g_policy_loaded) {
        if ((rc = load_policy(allow_tls12, err)) == 0) {
            g_policy_loaded = true;
            atomic_store(&g_tls12, allow_tls12);
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (rc != 0) {
        return rc;
    }
    absl_deadlock_detection_off();
    grpc_init();
    /* After grpc_init(): it re-reads GRPC_VERBOSITY. Only errors (failed
     * binds, failed handshakes) reach our log, as warnings. */
    if (getenv("GRPC_VERBOSITY") == NULL) {
        gpr_set_log_verbosity(GPR_LOG_SEVERITY_ERROR);
    }
    gpr_set_log_function(grpc_log_sink);
    return 0;
}

void kms_rpc_global_shutdown(void)
{
    uint64_t start, waited;

    /* grpc_shutdown_blocking() drops our reference, but it is not always the
     * last one: every gRPC channel holds its own (grpc_init in its
     * constructor) and drops it with a non-blocking grpc_shutdown() on a
     * gRPC thread once its last subchannel and call are gone, possibly after
     * this returns. A process that exited then ran OpenSSL's atexit clean-up
     * under a gRPC executor still connecting that channel (kmsctl after a
     * leader redirect; ASan: SEGV in RAND_get_rand_method from
     * tsi_ssl_client_handshaker_factory_create_handshaker, or the channel's
     * TLS objects leaked). So wait, bounded, until gRPC has really shut
     * down. */
    grpc_shutdown_blocking();
    start = kms_mono_ms();
    while (grpc_is_initialized() && kms_mono_ms() - start < 3000) {
        kms_sleep_ms(2);
    }
    waited = kms_mono_ms() - start;
    if (grpc_is_initialized()) {
        kms_log(KMS_LOG_WARN, "rpc",
                "gRPC had not shut down 3 s after its last user: a channel or server was "
                "not destroyed",
                NULL);
    } else if (waited >= 100) {
        kms_logf(KMS_LOG_DEBUG, "rpc", "waited %llu ms for gRPC's last channel to close",
                 (unsigned long long)waited);
    }
}

bool kms_rpc_tls12_allowed(void)
{
    return atomic_load(&g_tls12);
}

/* ---- helpers shared by server and client ------------------------------ */

int kms_rpc_read_pem(const char *path, const char *what, char **out, struct kms_err *err)
{
    FILE *f;
    char *buf = NULL;
    size_t len = 0, cap = 0;

    *out = NULL;
    if (path == NULL || path[0] == '\0') {
        return kms_err_set(err, KMS_ECONFIG, "no %s file configured", what);
    }
    f = fopen(path, "rb");
    if (f == NULL) {
        return kms_err_set(err, KMS_EIO, "cannot read %s file %s: %s", what, path,
                           strerror(errno));
    }
    for (;;) {
        size_t n;
        if (cap - len < 4097) {
            size_t ncap = cap == 0 ? 8192 : cap * 2;
            char *nb;
            if (ncap > (1u << 20) + 8192) {
                kms_rpc_free_secret(buf);
                fclose(f);
                return kms_err_set(err, KMS_EFORMAT, "%s file %s is larger than 1 MiB", what,
                                   path);
            }
            nb = malloc(ncap);
            if (nb == NULL) {
                kms_rpc_free_secret(buf);
                fclose(f);
                return kms_err_set(err, KMS_ENOMEM, "out of memory reading %s", path);
            }
            if (buf != NULL) {
                memcpy(nb, buf, len);
                OPENSSL_cleanse(buf, len);
                free(buf);
            }
            buf = nb;
            cap = ncap;
        }
        n = fread(buf + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0) {
            break;
        }
    }
    if (ferror(f)) {
        kms_rpc_free_secret(buf);
        fclose(f);
        return kms_err_set(err, KMS_EIO, "cannot read %s file %s", what, path);
    }
    fclose(f);
    buf[len] = '\0';
    if (len == 0) {
        free(buf);
        return kms_err_set(err, KMS_EFORMAT, "%s file %s is empty", what, path);
    }
    *out = buf;
    return 0;
}

void kms_rpc_free_secret(char *pem)
{
    if (pem != NULL) {
        OPENSSL_cleanse(pem, strlen(pem));
        free(pem);
    }
}

static int count_certs(const char *pem, X509 **first)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509 *x;
    int n = 0;
    if (bio == NULL) {
        return 0;
    }
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        if (n == 0 && first != NULL) {
            *first = x;
        } else {
            X509_free(x);
        }
        n++;
    }
    ERR_clear_error();
    BIO_free(bio);
    return n;
}

int kms_rpc_check_tls(const char *cert_pem, const char *key_pem, const char *ca_pem,
                      struct kms_err *err)
{
    X509 *leaf = NULL;
    EVP_PKEY *key = NULL;
    BIO *bio = NULL;
    int rc = 0;

    if (cert_pem != NULL) {
        if (count_certs(cert_pem, &leaf) == 0) {
            rc = kms_err_set(err, KMS_ETLS, "certificate file holds no PEM certificate");
            goto out;
        }
    }
    if (key_pem != NULL) {
        bio = BIO_new_mem_buf(key_pem, -1);
        key = bio != NULL ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
        if (key == NULL) {
            rc = kms_err_set(err, KMS_ETLS,
                             "key file holds no unencrypted PEM private key");
            goto out;
        }
        if (leaf != NULL && X509_check_private_key(leaf, key) != 1) {
            rc = kms_err_set(err, KMS_ETLS, "private key does not match the certificate");
            goto out;
        }
    }
    if (ca_pem != NULL && count_certs(ca_pem, NULL) == 0) {
        rc = kms_err_set(err, KMS_ETLS, "CA file holds no PEM certificate");
        goto out;
    }
out:
    ERR_clear_error();
    EVP_PKEY_free(key);
    BIO_free(bio);
    X509_free(leaf);
    return rc;
}

int kms_rpc_check_tls_files(const char *cert_file, const char *key_file, struct kms_err *err)
{
    char *cert = NULL;
    char *key = NULL;
    int rc;

    if ((rc = kms_rpc_read_pem(cert_file, "certificate", &cert, err)) != 0 ||
        (rc = kms_rpc_read_pem(key_file, "private key", &key, err)) != 0 ||
        (rc = kms_rpc_check_tls(cert, key, NULL, err)) != 0) {
        rc = kms_err_wrap(err, rc, "%s", cert_file);
    }
    free(cert);
    kms_rpc_free_secret(key);
    return rc;
}
