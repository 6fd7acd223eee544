/*
 * The PKCS#11 seal (kms_pkcs11.h): wraps and unwraps the root key R with an
 * AES-256 key that never leaves the token. PKCS#11 C API only, module loaded
 * with dlopen + C_GetFunctionList.
 */
#include "kms_pkcs11.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <p11-kit/pkcs11.h>

#include "kms_crypto.h"

#define WRAP_VERSION 1
#define WRAP_AAD_LABEL "kmsd/hsm-wrap/v1"
#define WRAP_AAD_LABEL_LEN (sizeof(WRAP_AAD_LABEL) - 1)
#define GCM_IV_LEN 12
#define GCM_TAG_LEN 16
#define KWP_LEN 40 /* RFC 5649 of 32 bytes: 32 + 8 */
#define MAX_SLOTS 64
#define LABEL_MAX 32 /* CK_TOKEN_INFO.label and our CKA_LABEL limit */

struct kms_p11 {
    pthread_mutex_t mu;        /* serialises every call into the module */
    void *dl;                  /* dlopen handle */
    CK_FUNCTION_LIST_PTR f;    /* the module's function list */
    char *module;              /* malloc */
    char *token_label;         /* malloc */
    char *key_label;           /* malloc */
    char *pin;                 /* secure memory, KMS_P11_PIN_MAX bytes */
};

/* One logged-in session, for the length of one call. */
struct sess {
    struct kms_p11 *p;
    bool initialized;          /* we called C_Initialize (and must finalize) */
    bool open;
    bool logged_in;
    CK_SESSION_HANDLE h;
    CK_SLOT_ID slot;
};

static const char *ckr_name(CK_RV rv)
{
    switch (rv) {
    case CKR_OK: return "CKR_OK";
    case CKR_PIN_INCORRECT: return "CKR_PIN_INCORRECT";
    case CKR_PIN_LOCKED: return "CKR_PIN_LOCKED";
    case CKR_TOKEN_NOT_PRESENT: return "CKR_TOKEN_NOT_PRESENT";
    case CKR_DEVICE_REMOVED: return "CKR_DEVICE_REMOVED";
    case CKR_DEVICE_ERROR: return "CKR_DEVICE_ERROR";
    case CKR_MECHANISM_INVALID: return "CKR_MECHANISM_INVALID";
    case CKR_ENCRYPTED_DATA_INVALID: return "CKR_ENCRYPTED_DATA_INVALID";
    case CKR_WRAPPED_KEY_INVALID: return "CKR_WRAPPED_KEY_INVALID";
    case CKR_GENERAL_ERROR: return "CKR_GENERAL_ERROR";
    case CKR_FUNCTION_FAILED: return "CKR_FUNCTION_FAILED";
    case CKR_USER_PIN_NOT_INITIALIZED: return "CKR_USER_PIN_NOT_INITIALIZED";
    case CKR_TOKEN_NOT_RECOGNIZED: return "CKR_TOKEN_NOT_RECOGNIZED";
    case CKR_SESSION_HANDLE_INVALID: return "CKR_SESSION_HANDLE_INVALID";
    default: return "CKR_?";
    }
}

/* Maps a failed CK_RV to a KMS_E* with "pkcs11: <what>: CKR_X (0xN)". */
static int p11_fail(struct kms_err *err, CK_RV rv, const char *what)
{
    int code = KMS_ECRYPTO;

    switch (rv) {
    case CKR_PIN_INCORRECT:
    case CKR_PIN_LOCKED:
    case CKR_PIN_INVALID:
    case CKR_PIN_EXPIRED:
    case CKR_USER_PIN_NOT_INITIALIZED:
        code = KMS_EDENIED;
        break;
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SLOT_ID_INVALID:
        code = KMS_EUNAVAIL;
        break;
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_WRAPPED_KEY_INVALID:
    case CKR_WRAPPED_KEY_LEN_RANGE:
        code = KMS_EAUTH;
        break;
    default:
        break;
    }
    return kms_err_set(err, code, "pkcs11: %s: %s (0x%lx)", what, ckr_name(rv),
                       (unsigned long)rv);
}

/* A decrypt or unwrap that fails for any reason but the device or the
 * session is an authentication failure: tokens report a bad GCM tag or a
 * bad KWP integrity check variously (SoftHSM: CKR_GENERAL_ERROR). */
static int unwrap_fail(struct kms_err *err, CK_RV rv, const char *what)
{
    int rc = p11_fail(err, rv, what);
    if (rc == KMS_EUNAVAIL || rc == KMS_EDENIED) {
        return rc;
    }
    return kms_err_set(err, KMS_EAUTH,
                       "pkcs11: %s: %s (0x%lx): the wrapped root key does not decrypt under "
                       "this key (another key, token or cluster)",
                       what, ckr_name(rv), (unsigned long)rv);
}

static char *str_dup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL) {
        memcpy(d, s, n);
    }
    return d;
}

int kms_p11_open(const struct kms_p11_params *params, struct kms_p11 **out,
                 struct kms_err *err)
{
    struct kms_p11 *p = NULL;
    CK_C_GetFunctionList get_list;
    CK_RV rv;
    size_t pinlen;
    int rc;

    if (params == NULL || out == NULL || params->module == NULL || params->module[0] == '\0' ||
        params->token_label == NULL || params->key_label == NULL || params->pin == NULL) {
        rc = kms_err_set(err, KMS_EINVAL, "pkcs11: invalid argument");
        goto out;
    }
    if (strlen(params->token_label) == 0 || strlen(params->token_label) > LABEL_MAX ||
        strlen(params->key_label) == 0 || strlen(params->key_label) > LABEL_MAX) {
        rc = kms_err_set(err, KMS_EINVAL, "pkcs11: token and key labels must be 1..%d bytes",
                         LABEL_MAX);
        goto out;
    }
    pinlen = strlen(params->pin);
    if (pinlen == 0 || pinlen >= KMS_P11_PIN_MAX) {
        rc = kms_err_set(err, KMS_EINVAL, "pkcs11: the PIN must be 1..%d bytes",
                         KMS_P11_PIN_MAX - 1);
        goto out;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "pkcs11: out of memory");
        goto out;
    }
    pthread_mutex_init(&p->mu, NULL);
    p->module = str_dup(params->module);
    p->token_label = str_dup(params->token_label);
    p->key_label = str_dup(params->key_label);
    p->pin = kms_secmem_alloc(KMS_P11_PIN_MAX);
    if (p->module == NULL || p->token_label == NULL || p->key_label == NULL || p->pin == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "pkcs11: out of memory");
        goto out;
    }
    memcpy(p->pin, params->pin, pinlen + 1);
    p->dl = dlopen(params->module, RTLD_NOW | RTLD_LOCAL);
    if (p->dl == NULL) {
        const char *why = dlerror();
        rc = kms_err_set(err, KMS_EIO, "pkcs11: cannot load module %s: %s", params->module,
                         why != NULL ? why : "unknown error");
        goto out;
    }
    *(void **)(&get_list) = dlsym(p->dl, "C_GetFunctionList");
    if (get_list == NULL) {
        rc = kms_err_set(err, KMS_EIO, "pkcs11: %s is not a PKCS#11 module (no C_GetFunctionList)",
                         params->module);
        goto out;
    }
    rv = get_list(&p->f);
    if (rv != CKR_OK || p->f == NULL) {
        rc = p11_fail(err, rv, "C_GetFunctionList");
        goto out;
    }
    if (p->f->version.major != 2) {
        rc = kms_err_set(err, KMS_EVERSION, "pkcs11: module %s implements PKCS#11 %u.%u, need 2.x",
                         params->module, p->f->version.major, p->f->version.minor);
        goto out;
    }
    *out = p;
    p = NULL;
    rc = 0;
out:
    kms_p11_close(p);
    return rc;
}

void kms_p11_close(struct kms_p11 *p)
{
    if (p == NULL) {
        return;
    }
    if (p->dl != NULL) {
        dlclose(p->dl);
    }
    kms_secmem_free(p->pin, KMS_P11_PIN_MAX);
    free(p->module);
    free(p->token_label);
    free(p->key_label);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* True when the blank-padded 32-byte PKCS#11 label equals `want`. */
static bool label_eq(const unsigned char lab[32], const char *want)
{
    size_t n = strlen(want), end = 32;
    while (end > 0 && lab[end - 1] == ' ') {
        end--;
    }
    return n == end && memcmp(lab, want, n) == 0;
}

static void sess_end(struct sess *s)
{
    CK_FUNCTION_LIST_PTR f = s->p->f;
    if (s->logged_in) {
        (void)f->C_Logout(s->h);
    }
    if (s->open) {
        (void)f->C_CloseSession(s->h);
    }
    if (s->initialized) {
        (void)f->C_Finalize(NULL);
    }
    s->logged_in = s->open = s->initialized = false;
}

/* C_Initialize, find the token, open a RW session, log in. Caller holds
 * p->mu and calls sess_end whatever this returns. */
static int sess_begin(struct kms_p11 *p, struct sess *s, struct kms_err *err)
{
    CK_C_INITIALIZE_ARGS args;
    CK_SLOT_ID slots[MAX_SLOTS];
    CK_ULONG n = MAX_SLOTS;
    CK_RV rv;
    bool found = false;

    memset(s, 0, sizeof(*s));
    s->p = p;
    memset(&args, 0, sizeof(args));
    args.flags = CKF_OS_LOCKING_OK;
    rv = p->f->C_Initialize(&args);
    if (rv == CKR_OK) {
        s->initialized = true;
    } else if (rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
        return p11_fail(err, rv, "C_Initialize");
    }
    rv = p->f->C_GetSlotList(CK_TRUE, slots, &n);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_GetSlotList");
    }
    for (CK_ULONG i = 0; i < n && !found; i++) {
        CK_TOKEN_INFO ti;
        if (p->f->C_GetTokenInfo(slots[i], &ti) == CKR_OK &&
            label_eq(ti.label, p->token_label) && (ti.flags & CKF_TOKEN_INITIALIZED)) {
            s->slot = slots[i];
            found = true;
        }
    }
    if (!found) {
        return kms_err_set(err, KMS_EUNAVAIL,
                           "pkcs11: no token labelled \"%s\" in module %s (HSM unreachable or "
                           "token missing)", p->token_label, p->module);
    }
    rv = p->f->C_OpenSession(s->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s->h);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_OpenSession");
    }
    s->open = true;
    rv = p->f->C_Login(s->h, CKU_USER, (CK_UTF8CHAR_PTR)p->pin, (CK_ULONG)strlen(p->pin));
    if (rv == CKR_PIN_INCORRECT) {
        return kms_err_set(err, KMS_EDENIED, "pkcs11: wrong PIN for token \"%s\"",
                           p->token_label);
    }
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        return p11_fail(err, rv, "C_Login");
    }
    s->logged_in = rv == CKR_OK;
    return 0;
}

/* Finds the wrapping key by label and checks it: AES, 32 bytes, sensitive,
 * not extractable. *found false (and 0) when there is none. */
static int key_find(struct sess *s, CK_OBJECT_HANDLE *key, bool *found, struct kms_err *err)
{
    CK_FUNCTION_LIST_PTR f = s->p->f;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_LABEL, s->p->key_label, strlen(s->p->key_label)},
    };
    CK_OBJECT_HANDLE objs[2];
    CK_ULONG n = 0, vlen = 0;
    CK_BBOOL sens = CK_FALSE, extr = CK_TRUE;
    CK_ATTRIBUTE attrs[] = {
        {CKA_VALUE_LEN, &vlen, sizeof(vlen)},
        {CKA_SENSITIVE, &sens, sizeof(sens)},
        {CKA_EXTRACTABLE, &extr, sizeof(extr)},
    };
    CK_RV rv;

    *found = false;
    rv = f->C_FindObjectsInit(s->h, tmpl, 3);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_FindObjectsInit");
    }
    rv = f->C_FindObjects(s->h, objs, 2, &n);
    (void)f->C_FindObjectsFinal(s->h);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_FindObjects");
    }
    if (n == 0) {
        return 0;
    }
    if (n > 1) {
        return kms_err_set(err, KMS_EFORMAT,
                           "pkcs11: more than one AES key labelled \"%s\" in token \"%s\"",
                           s->p->key_label, s->p->token_label);
    }
    rv = f->C_GetAttributeValue(s->h, objs[0], attrs, 3);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_GetAttributeValue");
    }
    if (vlen != 32) {
        return kms_err_set(err, KMS_EFORMAT, "pkcs11: key \"%s\" is AES-%lu, need AES-256",
                           s->p->key_label, (unsigned long)vlen * 8);
    }
    if (!sens || extr) {
        return kms_err_set(err, KMS_EFORMAT,
                           "pkcs11: key \"%s\" must be CKA_SENSITIVE and not CKA_EXTRACTABLE",
                           s->p->key_label);
    }
    *key = objs[0];
    *found = true;
    return 0;
}

static int key_create(struct sess *s, CK_OBJECT_HANDLE *key, struct kms_err *err)
{
    CK_MECHANISM m = {CKM_AES_KEY_GEN, NULL, 0};
    CK_BBOOL t = CK_TRUE, fl = CK_FALSE;
    CK_ULONG len = 32;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_TOKEN, &t, sizeof(t)},       {CKA_PRIVATE, &t, sizeof(t)},
        {CKA_SENSITIVE, &t, sizeof(t)},   {CKA_EXTRACTABLE, &fl, sizeof(fl)},
        {CKA_ENCRYPT, &t, sizeof(t)},     {CKA_DECRYPT, &t, sizeof(t)},
        {CKA_WRAP, &t, sizeof(t)},        {CKA_UNWRAP, &t, sizeof(t)},
        {CKA_VALUE_LEN, &len, sizeof(len)},
        {CKA_LABEL, s->p->key_label, strlen(s->p->key_label)},
    };
    CK_RV rv = s->p->f->C_GenerateKey(s->h, &m, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), key);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_GenerateKey (AES-256 wrapping key)");
    }
    return 0;
}

/* CKM_AES_GCM when the token offers it for encrypt and decrypt, else KWP
 * when offered for wrap and unwrap. */
static int mech_pick(struct sess *s, unsigned *mech, struct kms_err *err)
{
    CK_MECHANISM_INFO mi;

    if (s->p->f->C_GetMechanismInfo(s->slot, CKM_AES_GCM, &mi) == CKR_OK &&
        (mi.flags & CKF_ENCRYPT) && (mi.flags & CKF_DECRYPT)) {
        *mech = KMS_P11_MECH_GCM;
        return 0;
    }
    if (s->p->f->C_GetMechanismInfo(s->slot, CKM_AES_KEY_WRAP_PAD, &mi) == CKR_OK &&
        (mi.flags & CKF_WRAP) && (mi.flags & CKF_UNWRAP)) {
        *mech = KMS_P11_MECH_KWP;
        return 0;
    }
    return kms_err_set(err, KMS_ECRYPTO,
                       "pkcs11: token \"%s\" offers neither CKM_AES_GCM nor "
                       "CKM_AES_KEY_WRAP_PAD", s->p->token_label);
}

static void gcm_params(CK_GCM_PARAMS *g, uint8_t *iv, uint8_t *aad, const uint8_t cid[16])
{
    memcpy(aad, WRAP_AAD_LABEL, WRAP_AAD_LABEL_LEN);
    memcpy(aad + WRAP_AAD_LABEL_LEN, cid, KMS_CLUSTER_ID_LEN);
    memset(g, 0, sizeof(*g));
    g->pIv = iv;
    g->ulIvLen = GCM_IV_LEN;
    g->ulIvBits = GCM_IV_LEN * 8;
    g->pAAD = aad;
    g->ulAADLen = WRAP_AAD_LABEL_LEN + KMS_CLUSTER_ID_LEN;
    g->ulTagBits = GCM_TAG_LEN * 8;
}

/* The attributes of the session object that holds R around a KWP wrap or
 * unwrap: a generic secret, not on the token, neither sensitive nor
 * unextractable (its value is read back after C_UnwrapKey). Template
 * entries for C_CreateObject / C_UnwrapKey, which only read them. */
static const CK_OBJECT_CLASS r_cls = CKO_SECRET_KEY;
static const CK_KEY_TYPE r_kt = CKK_GENERIC_SECRET;
static const CK_BBOOL r_true = CK_TRUE, r_false = CK_FALSE;
#define R_ATTRS                                                                                  \
    {CKA_CLASS, (void *)&r_cls, sizeof(r_cls)}, {CKA_KEY_TYPE, (void *)&r_kt, sizeof(r_kt)},     \
        {CKA_TOKEN, (void *)&r_false, sizeof(r_false)},                                          \
        {CKA_SENSITIVE, (void *)&r_false, sizeof(r_false)},                                      \
        {CKA_EXTRACTABLE, (void *)&r_true, sizeof(r_true)}

/* A session object holding R, for C_WrapKey (KWP). */
static int root_object(struct sess *s, const uint8_t root[32], CK_OBJECT_HANDLE *obj,
                       struct kms_err *err)
{
    CK_ATTRIBUTE tmpl[] = {R_ATTRS, {CKA_VALUE, (void *)root, 32}};
    CK_RV rv = s->p->f->C_CreateObject(s->h, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), obj);
    if (rv != CKR_OK) {
        return p11_fail(err, rv, "C_CreateObject (session copy of the root key)");
    }
    return 0;
}

/* One wrap or unwrap: its session, the wrapping key, the KWP session object
 * holding R (destroyed at the end), the AAD and the plaintext/ciphertext
 * buffer (wiped at the end). */
struct job {
    struct sess s;
    CK_OBJECT_HANDLE key, robj;
    bool robj_made;
    uint8_t aad[WRAP_AAD_LABEL_LEN + KMS_CLUSTER_ID_LEN];
    uint8_t buf[64];
    CK_ULONG blen;
};

static void job_init(struct kms_p11 *p, struct job *j)
{
    memset(j, 0, sizeof(*j));
    j->s.p = p;
    j->blen = sizeof(j->buf);
}

/* Session and wrapping key (caller holds p->mu): KMS_ENOTFOUND naming key
 * and token when there is none and need_key; *found says which. */
static int job_key(struct job *j, bool need_key, bool *found, struct kms_err *err)
{
    struct kms_p11 *p = j->s.p;
    int rc;

    if ((rc = sess_begin(p, &j->s, err)) != 0 || (rc = key_find(&j->s, &j->key, found, err)) != 0) {
        return rc;
    }
    if (!*found && need_key) {
        return kms_err_set(err, KMS_ENOTFOUND, "pkcs11: no AES key labelled \"%s\" in token \"%s\"",
                           p->key_label, p->token_label);
    }
    return 0;
}

/* Destroys the KWP object, ends the session, releases p->mu, wipes buf. */
static void job_end(struct job *j)
{
    struct kms_p11 *p = j->s.p;

    if (j->robj_made) {
        (void)p->f->C_DestroyObject(j->s.h, j->robj);
    }
    sess_end(&j->s);
    pthread_mutex_unlock(&p->mu);
    OPENSSL_cleanse(j->buf, sizeof(j->buf));
}

int kms_p11_check(struct kms_p11 *p, bool *key_found, unsigned *mech, struct kms_err *err)
{
    struct sess s;
    CK_OBJECT_HANDLE key = 0;
    unsigned m = 0;
    int rc;

    if (p == NULL || key_found == NULL) {
        return kms_err_set(err, KMS_EINVAL, "pkcs11: invalid argument");
    }
    pthread_mutex_lock(&p->mu);
    if ((rc = sess_begin(p, &s, err)) != 0 || (rc = key_find(&s, &key, key_found, err)) != 0 ||
        (rc = mech_pick(&s, &m, err)) != 0) {
        goto out;
    }
    if (mech != NULL) {
        *mech = m;
    }
out:
    sess_end(&s);
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int kms_p11_wrap(struct kms_p11 *p, const uint8_t cluster_id[16], const uint8_t root[32],
                 bool create_key, unsigned mech, Kmsd__V1__HsmWrap **out, struct kms_err *err)
{
    Kmsd__V1__HsmWrap *w = NULL; /* malloc, moved to *out */
    struct job j;
    bool found = false;
    CK_RV rv;
    int rc;

    job_init(p, &j);
    if (p == NULL || cluster_id == NULL || root == NULL || out == NULL ||
        (mech != KMS_P11_MECH_AUTO && mech != KMS_P11_MECH_GCM && mech != KMS_P11_MECH_KWP)) {
        return kms_err_set(err, KMS_EINVAL, "pkcs11 wrap: invalid argument");
    }
    pthread_mutex_lock(&p->mu);
    w = calloc(1, sizeof(*w));
    if (w == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "pkcs11 wrap: out of memory");
        goto out;
    }
    kmsd__v1__hsm_wrap__init(w);
    if ((rc = job_key(&j, !create_key, &found, err)) != 0) {
        goto out;
    }
    if (mech == KMS_P11_MECH_AUTO && (rc = mech_pick(&j.s, &mech, err)) != 0) {
        goto out;
    }
    if (!found && (rc = key_create(&j.s, &j.key, err)) != 0) {
        goto out;
    }
    if (mech == KMS_P11_MECH_GCM) {
        CK_GCM_PARAMS g;
        CK_MECHANISM m = {CKM_AES_GCM, &g, sizeof(g)};
        w->iv.data = malloc(GCM_IV_LEN);
        if (w->iv.data == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "pkcs11 wrap: out of memory");
            goto out;
        }
        w->iv.len = GCM_IV_LEN;
        if ((rc = kms_rand_bytes(w->iv.data, GCM_IV_LEN, err)) != 0) {
            goto out;
        }
        gcm_params(&g, w->iv.data, j.aad, cluster_id);
        if ((rv = p->f->C_EncryptInit(j.s.h, &m, j.key)) != CKR_OK) {
            rc = p11_fail(err, rv, "C_EncryptInit (CKM_AES_GCM)");
            goto out;
        }
        if ((rv = p->f->C_Encrypt(j.s.h, (CK_BYTE_PTR)root, 32, j.buf, &j.blen)) != CKR_OK) {
            rc = p11_fail(err, rv, "C_Encrypt (CKM_AES_GCM)");
            goto out;
        }
        if (j.blen != 32 + GCM_TAG_LEN) {
            rc = kms_err_set(err, KMS_ECRYPTO, "pkcs11: CKM_AES_GCM gave %lu bytes, expected %d",
                             (unsigned long)j.blen, 32 + GCM_TAG_LEN);
            goto out;
        }
    } else {
        CK_MECHANISM m = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
        if ((rc = root_object(&j.s, root, &j.robj, err)) != 0) {
            goto out;
        }
        j.robj_made = true;
        if ((rv = p->f->C_WrapKey(j.s.h, &m, j.key, j.robj, j.buf, &j.blen)) != CKR_OK) {
            rc = p11_fail(err, rv, "C_WrapKey (CKM_AES_KEY_WRAP_PAD)");
            goto out;
        }
        if (j.blen != KWP_LEN) {
            rc = kms_err_set(err, KMS_ECRYPTO,
                             "pkcs11: CKM_AES_KEY_WRAP_PAD gave %lu bytes, expected %d",
                             (unsigned long)j.blen, KWP_LEN);
            goto out;
        }
    }
    w->ciphertext.data = malloc(j.blen);
    w->key_label = str_dup(p->key_label);
    w->token_label = str_dup(p->token_label);
    if (w->ciphertext.data == NULL || w->key_label == NULL || w->token_label == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "pkcs11 wrap: out of memory");
        goto out;
    }
    memcpy(w->ciphertext.data, j.buf, j.blen);
    w->ciphertext.len = j.blen;
    w->version = WRAP_VERSION;
    w->mechanism = mech;
    *out = w;
    w = NULL;
    rc = 0;
out:
    job_end(&j);
    if (w != NULL) {
        kmsd__v1__hsm_wrap__free_unpacked(w, NULL);
    }
    if (rc != 0) {
        kms_err_wrap(err, rc, "wrap root key");
    }
    return rc;
}

int kms_p11_unwrap(struct kms_p11 *p, const Kmsd__V1__HsmWrap *w, const uint8_t cluster_id[16],
                   uint8_t root[32], struct kms_err *err)
{
    struct job j;
    bool found = false;
    CK_RV rv;
    int rc;

    job_init(p, &j);
    if (p == NULL || w == NULL || cluster_id == NULL || root == NULL) {
        return kms_err_set(err, KMS_EINVAL, "pkcs11 unwrap: invalid argument");
    }
    if (w->version != WRAP_VERSION) {
        return kms_err_set(err, KMS_EVERSION, "pkcs11: wrapped root key version %u, need %d",
                           w->version, WRAP_VERSION);
    }
    if ((w->mechanism == KMS_P11_MECH_GCM &&
         (w->iv.len != GCM_IV_LEN || w->ciphertext.len != 32 + GCM_TAG_LEN)) ||
        (w->mechanism == KMS_P11_MECH_KWP && w->ciphertext.len != KWP_LEN) ||
        (w->mechanism != KMS_P11_MECH_GCM && w->mechanism != KMS_P11_MECH_KWP)) {
        return kms_err_set(err, KMS_EFORMAT, "pkcs11: malformed wrapped root key (mechanism 0x%x)",
                           w->mechanism);
    }
    pthread_mutex_lock(&p->mu);
    if ((rc = job_key(&j, true, &found, err)) != 0) {
        goto out;
    }
    if (w->mechanism == KMS_P11_MECH_GCM) {
        CK_GCM_PARAMS g;
        CK_MECHANISM m = {CKM_AES_GCM, &g, sizeof(g)};
        uint8_t iv[GCM_IV_LEN];
        memcpy(iv, w->iv.data, GCM_IV_LEN);
        gcm_params(&g, iv, j.aad, cluster_id);
        if ((rv = p->f->C_DecryptInit(j.s.h, &m, j.key)) != CKR_OK) {
            rc = p11_fail(err, rv, "C_DecryptInit (CKM_AES_GCM)");
            goto out;
        }
        rv = p->f->C_Decrypt(j.s.h, w->ciphertext.data, (CK_ULONG)w->ciphertext.len, j.buf,
                             &j.blen);
        if (rv != CKR_OK) {
            rc = unwrap_fail(err, rv, "C_Decrypt (CKM_AES_GCM)");
            goto out;
        }
    } else {
        CK_MECHANISM m = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
        CK_ATTRIBUTE tmpl[] = {R_ATTRS};
        CK_ATTRIBUTE val = {CKA_VALUE, j.buf, sizeof(j.buf)};
        rv = p->f->C_UnwrapKey(j.s.h, &m, j.key, w->ciphertext.data, (CK_ULONG)w->ciphertext.len,
                               tmpl, sizeof(tmpl) / sizeof(tmpl[0]), &j.robj);
        if (rv != CKR_OK) {
            rc = unwrap_fail(err, rv, "C_UnwrapKey (CKM_AES_KEY_WRAP_PAD)");
            goto out;
        }
        j.robj_made = true;
        if ((rv = p->f->C_GetAttributeValue(j.s.h, j.robj, &val, 1)) != CKR_OK) {
            rc = p11_fail(err, rv, "C_GetAttributeValue (unwrapped root key)");
            goto out;
        }
        j.blen = val.ulValueLen;
    }
    if (j.blen != 32) {
        rc = kms_err_set(err, KMS_EAUTH, "pkcs11: unwrapped root key is %lu bytes, expected 32",
                         (unsigned long)j.blen);
        goto out;
    }
    memcpy(root, j.buf, 32);
    rc = 0;
out:
    job_end(&j);
    if (rc != 0) {
        OPENSSL_cleanse(root, 32);
        kms_err_wrap(err, rc, "unwrap root key");
    }
    return rc;
}

int kms_p11_wrap_dup(const Kmsd__V1__HsmWrap *w, Kmsd__V1__HsmWrap **out, struct kms_err *err)
{
    size_t n;
    uint8_t *buf;

    if (w == NULL || out == NULL) {
        return kms_err_set(err, KMS_EINVAL, "pkcs11: invalid argument");
    }
    n = kmsd__v1__hsm_wrap__get_packed_size(w);
    buf = malloc(n == 0 ? 1 : n);
    if (buf == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "pkcs11: out of memory");
    }
    kmsd__v1__hsm_wrap__pack(w, buf);
    *out = kmsd__v1__hsm_wrap__unpack(NULL, n, buf);
    free(buf);
    if (*out == NULL) {
        return kms_err_set(err, KMS_ENOMEM, "pkcs11: out of memory");
    }
    return 0;
}

int kms_p11_pin_read(const char *path, char pin[KMS_P11_PIN_MAX], struct kms_err *err)
{
    FILE *f = NULL;
    size_t n;
    int rc;

    memset(pin, 0, KMS_P11_PIN_MAX);
    f = fopen(path, "re");
    if (f == NULL) {
        rc = kms_err_set(err, KMS_EIO, "pkcs11: cannot read PIN file %s: %s", path,
                         strerror(errno));
        goto out;
    }
    if (fgets(pin, KMS_P11_PIN_MAX, f) == NULL) {
        rc = kms_err_set(err, KMS_EFORMAT, "pkcs11: PIN file %s is empty", path);
        goto out;
    }
    n = strlen(pin);
    if (n > 0 && pin[n - 1] == '\n') {
        pin[--n] = '\0';
    } else if (!feof(f) && fgetc(f) != EOF) {
        rc = kms_err_set(err, KMS_EFORMAT, "pkcs11: PIN in %s is longer than %d bytes", path,
                         KMS_P11_PIN_MAX - 2);
        goto out;
    }
    if (n > 0 && pin[n - 1] == '\r') {
        pin[--n] = '\0';
    }
    if (n == 0) {
        rc = kms_err_set(err, KMS_EFORMAT, "pkcs11: PIN file %s is empty", path);
        goto out;
    }
    rc = 0;
out:
    if (f != NULL) {
        fclose(f);
    }
    if (rc != 0) {
        OPENSSL_cleanse(pin, KMS_P11_PIN_MAX);
    }
    return rc;
}
