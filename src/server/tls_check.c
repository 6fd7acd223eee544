/*
 * Local TLS file and start-up checks (kms_tls_check.h).
 */
#include "kms_tls_check.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

static void report(struct kms_check_report *r, bool is_err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void report(struct kms_check_report *r, bool is_err, const char *fmt, ...)
{
    va_list ap;
    if (is_err) {
        r->errors++;
    } else {
        r->warnings++;
    }
    if (r->f == NULL) {
        return;
    }
    if (r->cli_style) {
        fprintf(r->f, "%s: %s: ", is_err ? "Error" : "Warning",
                r->prefix != NULL ? r->prefix : "check");
    } else {
        fprintf(r->f, "%s: %s: ", r->prefix != NULL ? r->prefix : "check",
                is_err ? "error" : "warning");
    }
    va_start(ap, fmt);
    vfprintf(r->f, fmt, ap);
    va_end(ap);
    fputc('\n', r->f);
}

/* Never prompt for a passphrase: an encrypted key cannot be used by kmsd. */
static int no_pass_cb(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* Opens path for reading; on failure reports why (missing, permission, not a
 * regular file) and returns NULL. */
static BIO *open_file(struct kms_check_report *r, const char *what, const char *path)
{
    struct stat sb;
    BIO *b;
    if (stat(path, &sb) != 0) {
        report(r, true, "%s %s: %s", what, path,
               errno == ENOENT ? "file does not exist" : strerror(errno));
        return NULL;
    }
    if (!S_ISREG(sb.st_mode)) {
        report(r, true, "%s %s: not a regular file", what, path);
        return NULL;
    }
    b = BIO_new_file(path, "r");
    if (b == NULL) {
        report(r, true, "%s %s: cannot open: %s", what, path, strerror(errno));
        ERR_clear_error();
    }
    return b;
}

static X509 *read_cert(struct kms_check_report *r, const char *what, const char *path)
{
    BIO *b = open_file(r, what, path);
    X509 *x;
    if (b == NULL) {
        return NULL;
    }
    x = PEM_read_bio_X509(b, NULL, no_pass_cb, NULL);
    BIO_free(b);
    ERR_clear_error();
    if (x == NULL) {
        report(r, true, "%s %s: no PEM certificate in the file (want -----BEGIN CERTIFICATE-----)",
               what, path);
    }
    return x;
}

static void check_times(struct kms_check_report *r, const char *what, const char *path, X509 *x,
                        bool fail_expired)
{
    time_t soon = time(NULL) + (time_t)KMS_CERT_WARN_DAYS * 86400;
    const ASN1_TIME *na = X509_get0_notAfter(x), *nb = X509_get0_notBefore(x);
    char end[64] = "?";
    BIO *m = BIO_new(BIO_s_mem());
    if (m != NULL) {
        if (ASN1_TIME_print(m, na) == 1) {
            int n = BIO_read(m, end, (int)sizeof(end) - 1);
            end[n > 0 ? n : 0] = '\0';
        }
        BIO_free(m);
    }
    if (X509_cmp_current_time(na) <= 0) {
        report(r, fail_expired, "%s %s: certificate expired on %s", what, path, end);
    } else if (X509_cmp_current_time(nb) >= 0) {
        report(r, fail_expired, "%s %s: certificate is not valid yet (notBefore in the future; "
               "check the clock)", what, path);
    } else if (X509_cmp_time(na, &soon) <= 0) {
        report(r, false, "%s %s: certificate expires within %d days (on %s): renew it", what, path,
               KMS_CERT_WARN_DAYS, end);
    }
}

static void check_eku(struct kms_check_report *r, const char *what, const char *path, X509 *x,
                      enum kms_cert_role role)
{
    EXTENDED_KEY_USAGE *eku;
    bool server = false, client = false;
    int crit = 0;

    if (role == KMS_CERT_ANY) {
        return;
    }
    eku = X509_get_ext_d2i(x, NID_ext_key_usage, &crit, NULL);
    if (eku == NULL) {
        return; /* no EKU extension: any use */
    }
    for (int i = 0; i < sk_ASN1_OBJECT_num(eku); i++) {
        int nid = OBJ_obj2nid(sk_ASN1_OBJECT_value(eku, i));
        server |= nid == NID_server_auth || nid == NID_anyExtendedKeyUsage;
        client |= nid == NID_client_auth || nid == NID_anyExtendedKeyUsage;
    }
    EXTENDED_KEY_USAGE_free(eku);
    bool need_server = role == KMS_CERT_SERVER || role == KMS_CERT_NODE;
    bool need_client = role == KMS_CERT_CLIENT || role == KMS_CERT_NODE;
    if ((need_server && !server) || (need_client && !client)) {
        report(r, true, "%s %s: extended key usage lacks %s%s%s (it is used as %s)", what, path,
               need_server && !server ? "serverAuth" : "",
               need_server && !server && need_client && !client ? " and " : "",
               need_client && !client ? "clientAuth" : "",
               role == KMS_CERT_NODE ? "the node's server and client certificate for raft and "
                                       "the cluster API"
               : role == KMS_CERT_SERVER ? "a TLS server certificate"
                                         : "a TLS client certificate");
    }
}

bool kms_tls_check_pair(struct kms_check_report *r, const char *what, const char *cert_path,
                        const char *key_path, enum kms_cert_role role, const char *want_cn)
{
    unsigned before = r->errors;
    X509 *x = NULL;
    EVP_PKEY *k = NULL;
    BIO *b = NULL;
    char cn[256];

    x = read_cert(r, what, cert_path);
    b = open_file(r, "its key", key_path);
    if (b != NULL) {
        k = PEM_read_bio_PrivateKey(b, NULL, no_pass_cb, NULL);
        ERR_clear_error();
        if (k == NULL) {
            report(r, true, "key %s (for %s): no unencrypted PEM private key in the file",
                   key_path, cert_path);
        }
    }
    if (x == NULL) {
        goto out;
    }
    if (k != NULL && X509_check_private_key(x, k) != 1) {
        report(r, true, "%s %s: the key %s does not match this certificate (they are not a pair)",
               what, cert_path, key_path);
    }
    ERR_clear_error();
    check_times(r, what, cert_path, x, true);
    check_eku(r, what, cert_path, x, role);
    if (want_cn != NULL) {
        int n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn,
                                          (int)sizeof(cn));
        if (n < 0) {
            report(r, true, "%s %s: no subject CN (want CN=%s)", what, cert_path, want_cn);
        } else if (strcmp(cn, want_cn) != 0) {
            report(r, true, "%s %s: subject CN is '%s', want '%s' (it must match nodeId)", what,
                   cert_path, cn, want_cn);
        }
    }
    if (role == KMS_CERT_SERVER) {
        GENERAL_NAMES *san = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
        if (san == NULL) {
            report(r, false, "%s %s: no subjectAltName: clients that check the server name "
                   "(grpc-go, Talos) will refuse it", what, cert_path);
        }
        GENERAL_NAMES_free(san);
    }
out:
    BIO_free(b);
    EVP_PKEY_free(k);
    X509_free(x);
    return r->errors == before;
}

bool kms_tls_check_ca(struct kms_check_report *r, const char *what, const char *ca_path,
                      const char *leaf_path, const char *leaf_what)
{
    unsigned before = r->errors;
    BIO *b = open_file(r, what, ca_path);
    X509_STORE *store = NULL;
    X509_STORE_CTX *vctx = NULL;
    X509 *x, *leaf = NULL;
    int n = 0;

    if (b == NULL) {
        return false;
    }
    store = X509_STORE_new();
    while ((x = PEM_read_bio_X509(b, NULL, no_pass_cb, NULL)) != NULL) {
        n++;
        check_times(r, what, ca_path, x, false);
        if (store != NULL) {
            (void)X509_STORE_add_cert(store, x);
        }
        X509_free(x);
    }
    ERR_clear_error();
    if (n == 0) {
        report(r, true, "%s %s: no PEM certificate in the file", what, ca_path);
        goto out;
    }
    if (leaf_path == NULL || store == NULL) {
        goto out;
    }
    {
        BIO *lb = BIO_new_file(leaf_path, "r");
        if (lb != NULL) {
            leaf = PEM_read_bio_X509(lb, NULL, no_pass_cb, NULL);
            BIO_free(lb);
        }
        ERR_clear_error();
    }
    if (leaf == NULL) {
        goto out; /* reported by the pair check */
    }
    vctx = X509_STORE_CTX_new();
    if (vctx != NULL && X509_STORE_CTX_init(vctx, store, leaf, NULL) == 1) {
        if (X509_verify_cert(vctx) != 1) {
            int e = X509_STORE_CTX_get_error(vctx);
            /* Expiry is reported by the pair check already. */
            if (e != X509_V_ERR_CERT_HAS_EXPIRED && e != X509_V_ERR_CERT_NOT_YET_VALID) {
                report(r, true, "%s %s: not signed by %s %s (%s)", leaf_what, leaf_path, what,
                       ca_path, X509_verify_cert_error_string(e));
            }
        }
    }
    ERR_clear_error();
out:
    X509_STORE_CTX_free(vctx);
    X509_free(leaf);
    X509_STORE_free(store);
    BIO_free(b);
    return r->errors == before;
}

/* kmsd creates a missing dataDir with its missing parents (mode 0700) at
 * start: it can when the nearest existing ancestor is a directory this user
 * may write. */
static void check_data_dir(struct kms_check_report *r, const char *dir)
{
    struct stat sb;
    char anc[4096];
    char *slash;

    if (dir == NULL || dir[0] == '\0') {
        report(r, true, "dataDir: empty (set dataDir to a directory kmsd may write)");
        return;
    }
    if (stat(dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) {
            report(r, true, "dataDir %s: exists but is not a directory", dir);
        } else if (access(dir, W_OK | X_OK) != 0) {
            report(r, true, "dataDir %s: not writable by this user (uid %u): %s", dir,
                   (unsigned)geteuid(), strerror(errno));
        }
        return;
    }
    if (errno == ENOTDIR) {
        report(r, true, "dataDir %s: does not exist and cannot be created: a parent in the path "
               "is a file, not a directory", dir);
        return;
    }
    if (errno != ENOENT) {
        report(r, true, "dataDir %s: %s", dir, strerror(errno));
        return;
    }
    if (strlen(dir) >= sizeof(anc)) {
        report(r, true, "dataDir %s: path too long", dir);
        return;
    }
    snprintf(anc, sizeof(anc), "%s", dir);
    for (;;) {
        while ((slash = strrchr(anc, '/')) != NULL && slash[1] == '\0' && slash != anc) {
            *slash = '\0'; /* trailing slashes */
        }
        slash = strrchr(anc, '/');
        if (slash == NULL) {
            snprintf(anc, sizeof(anc), ".");
        } else if (slash == anc) {
            anc[1] = '\0';
        } else {
            *slash = '\0';
        }
        if (stat(anc, &sb) == 0) {
            break;
        }
        if (errno != ENOENT || strcmp(anc, "/") == 0 || strcmp(anc, ".") == 0) {
            report(r, true, "dataDir %s: cannot be created: %s: %s", dir, anc, strerror(errno));
            return;
        }
    }
    if (!S_ISDIR(sb.st_mode)) {
        report(r, true, "dataDir %s: does not exist and cannot be created: its parent %s is not "
               "a directory", dir, anc);
    } else if (access(anc, W_OK | X_OK) != 0) {
        report(r, true, "dataDir %s: does not exist and cannot be created: %s is not writable "
               "by this user (uid %u) (create it: install -d -m 0700 -o <user> %s)", dir, anc,
               (unsigned)geteuid(), dir);
    } else if (r->f != NULL) {
        fprintf(r->f, "%s: note: dataDir %s does not exist yet; kmsd creates it%s (mode 0700) "
                "under %s at start\n", r->prefix != NULL ? r->prefix : "check", dir,
                strlen(anc) + 1 < strlen(dir) && strchr(dir + strlen(anc) + 1, '/') != NULL
                    ? " and its missing parents"
                    : "",
                anc);
    }
}

unsigned kms_config_check_startup(const struct kms_config *cfg, struct kms_check_report *r)
{
    char cn[64];
    unsigned before = r->errors;

    snprintf(cn, sizeof(cn), "kmsd-node-%llu", (unsigned long long)cfg->node_id);
    if (cfg->tls.node_cert_file[0] != '\0' && cfg->tls.node_key_file[0] != '\0') {
        if (kms_tls_check_pair(r, "tls.nodeCertFile", cfg->tls.node_cert_file,
                               cfg->tls.node_key_file, KMS_CERT_NODE, cn) &&
            cfg->tls.cluster_ca_file[0] != '\0') {
            (void)kms_tls_check_ca(r, "tls.clusterCAFile", cfg->tls.cluster_ca_file,
                                   cfg->tls.node_cert_file, "tls.nodeCertFile");
        } else if (cfg->tls.cluster_ca_file[0] != '\0') {
            (void)kms_tls_check_ca(r, "tls.clusterCAFile", cfg->tls.cluster_ca_file, NULL, NULL);
        }
    }
    if (cfg->tls.operator_ca_file[0] != '\0') {
        (void)kms_tls_check_ca(r, "tls.operatorCAFile", cfg->tls.operator_ca_file, NULL, NULL);
    }
    if (!cfg->talos.plaintext && cfg->talos.cert_file[0] != '\0' &&
        cfg->talos.key_file[0] != '\0') {
        (void)kms_tls_check_pair(r, "talos.certFile", cfg->talos.cert_file, cfg->talos.key_file,
                                 KMS_CERT_SERVER, NULL);
    }
    check_data_dir(r, cfg->data_dir);
    return r->errors - before;
}
