/*
 * kmsd configuration: applying values and checking the whole.
 *
 * Layers are applied in order (defaults, file, environment, flags), each
 * value parsed strictly as it is applied by the kms_parse.h parsers the
 * option's TYPE names; then validate() checks the rules across options and
 * fills in the derived values (advertise addresses, unseal_reads_local,
 * seal_pkcs11).
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config_internal.h"
#include "kms_parse.h"

/* ------------------------------------------------------------------ */
/* Errors.                                                             */

/* Formats the one-line error. `what` names the option or list element
 * ("talos.listen", "initialCluster[1].id"); for env and flags the variable
 * or flag name replaces it, since that is what the user typed. */
__attribute__((format(printf, 5, 0)))
static int failv(struct loader *l, const struct opt *o, struct origin org, const char *what,
                 const char *fmt, va_list ap)
{
    char detail[384];
    vsnprintf(detail, sizeof(detail), fmt, ap);
    switch (org.kind) {
    case SRC_FILE:
        if (org.line > 0) {
            return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: %s: %s", l->file, org.line,
                               what, detail);
        }
        return kms_err_set(l->err, KMS_ECONFIG, "config %s: %s: %s", l->file, what, detail);
    case SRC_ENV:
        return kms_err_set(l->err, KMS_ECONFIG, "%s: %s", o->env, detail);
    case SRC_FLAG:
        return kms_err_set(l->err, KMS_ECONFIG, "--%s: %s", o->flag, detail);
    case SRC_DEFAULT:
    default:
        if (l->file != NULL) {
            return kms_err_set(l->err, KMS_ECONFIG, "config %s: %s: %s", l->file, what, detail);
        }
        return kms_err_set(l->err, KMS_ECONFIG, "--%s: %s", o->flag, detail);
    }
}

int config_fail(struct loader *l, const struct opt *o, struct origin org, const char *what,
                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = failv(l, o, org, what, fmt, ap);
    va_end(ap);
    return rc;
}

/* Fails about an option's current value (cross-field checks). */
static int fail_opt(struct loader *l, const struct opt *o, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail_opt(struct loader *l, const struct opt *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = failv(l, o, l->origin[o - kms_config_opts], o->name, fmt, ap);
    va_end(ap);
    return rc;
}

static int parse_enum(const char *s, const char *const *names, int *out, char *why, size_t wn)
{
    size_t used = 0;
    for (int i = 0; names[i] != NULL; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    used = (size_t)snprintf(why, wn, "invalid value \"%s\" (", s);
    for (int i = 0; names[i] != NULL && used < wn; i++) {
        used += (size_t)snprintf(why + used, wn - used, "%s%s", i ? " | " : "", names[i]);
    }
    if (used < wn) {
        snprintf(why + used, wn - used, ")");
    }
    return -1;
}


/* ------------------------------------------------------------------ */
/* Applying values.                                                    */

static void free_peers(struct kms_config *cfg)
{
    for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
        free(cfg->initial_cluster[i].raft);
        free(cfg->initial_cluster[i].cluster);
    }
    free(cfg->initial_cluster);
    cfg->initial_cluster = NULL;
    cfg->n_initial_cluster = 0;
}

static void free_cidrs(struct kms_config *cfg)
{
    for (size_t i = 0; i < cfg->n_allowed_cidrs; i++) {
        free(cfg->allowed_cidrs[i].text);
    }
    free(cfg->allowed_cidrs);
    cfg->allowed_cidrs = NULL;
    cfg->n_allowed_cidrs = 0;
}

static void free_uuids(struct kms_config *cfg)
{
    for (size_t i = 0; i < cfg->n_uuid_allow_list; i++) {
        free(cfg->uuid_allow_list[i]);
    }
    free(cfg->uuid_allow_list);
    cfg->uuid_allow_list = NULL;
    cfg->n_uuid_allow_list = 0;
}

void config_list_clear(struct kms_config *cfg, const struct opt *o)
{
    switch (o->type) {
    case T_PEERS:
        free_peers(cfg);
        break;
    case T_CIDRS:
        free_cidrs(cfg);
        break;
    case T_UUIDS:
        free_uuids(cfg);
        break;
    default:
        break;
    }
}

static int set_string(struct loader *l, const struct opt *o, const char *v)
{
    char **field = opt_field(l->cfg, o);
    char *copy = strdup(v);
    if (copy == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    free(*field);
    *field = copy;
    return 0;
}

/* Appends one initialCluster entry (the list was emptied by the caller). */
int config_add_peer(struct loader *l, const struct opt *o, struct origin org, const char *what,
                    const char *id, const char *raft, const char *cluster)
{
    struct kms_config *cfg = l->cfg;
    struct kms_config_peer *p;
    char why[256];
    uint64_t v;
    if (cfg->n_initial_cluster >= KMS_CONFIG_MAX_PEERS) {
        return config_fail(l, o, org, what, "more than %d members", KMS_CONFIG_MAX_PEERS);
    }
    if (id == NULL || raft == NULL || cluster == NULL) {
        return config_fail(l, o, org, what, "needs id, raft and cluster");
    }
    if (kms_parse_u64(id, 1, UINT64_C(1) << 63, &v, why, sizeof(why)) != 0 ||
        kms_parse_addr(raft, KMS_PARSE_ADDR_NEED_HOST, NULL, why, sizeof(why)) != 0 ||
        kms_parse_addr(cluster, KMS_PARSE_ADDR_NEED_HOST, NULL, why, sizeof(why)) != 0) {
        return config_fail(l, o, org, what, "%s", why);
    }
    for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
        if (cfg->initial_cluster[i].id == v) {
            return config_fail(l, o, org, what, "duplicate id %llu", (unsigned long long)v);
        }
    }
    if (cfg->initial_cluster == NULL) {
        cfg->initial_cluster = calloc(KMS_CONFIG_MAX_PEERS, sizeof(*cfg->initial_cluster));
        if (cfg->initial_cluster == NULL) {
            return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        }
    }
    p = &cfg->initial_cluster[cfg->n_initial_cluster];
    p->id = v;
    p->raft = strdup(raft);
    p->cluster = strdup(cluster);
    cfg->n_initial_cluster++; /* counted first so free_peers frees a half entry */
    if (p->raft == NULL || p->cluster == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    return 0;
}

int config_add_cidr(struct loader *l, const struct opt *o, struct origin org, const char *what,
                    const char *s)
{
    struct kms_config *cfg = l->cfg;
    struct kms_config_cidr c;
    char why[256];
    if (cfg->n_allowed_cidrs >= KMS_CONFIG_MAX_CIDRS) {
        return config_fail(l, o, org, what, "more than %d CIDRs", KMS_CONFIG_MAX_CIDRS);
    }
    if (kms_parse_cidr(s, c.addr, &c.prefix, why, sizeof(why)) != 0) {
        return config_fail(l, o, org, what, "%s", why);
    }
    if (cfg->allowed_cidrs == NULL) {
        cfg->allowed_cidrs = calloc(KMS_CONFIG_MAX_CIDRS, sizeof(*cfg->allowed_cidrs));
        if (cfg->allowed_cidrs == NULL) {
            return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        }
    }
    c.text = strdup(s);
    if (c.text == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    cfg->allowed_cidrs[cfg->n_allowed_cidrs++] = c;
    return 0;
}

int config_add_uuid(struct loader *l, const struct opt *o, struct origin org, const char *what,
                    const char *s)
{
    struct kms_config *cfg = l->cfg;
    size_t n = strlen(s);
    if (cfg->n_uuid_allow_list >= KMS_CONFIG_MAX_UUIDS) {
        return config_fail(l, o, org, what, "more than %d UUIDs", KMS_CONFIG_MAX_UUIDS);
    }
    /* Same rule as Seal's node_uuid (talos_api.c): 1..128 printable bytes. */
    if (n == 0 || n > KMS_CONFIG_MAX_UUID_LEN) {
        return config_fail(l, o, org, what, "UUID must be 1..%d bytes", KMS_CONFIG_MAX_UUID_LEN);
    }
    for (size_t i = 0; i < n; i++) {
        if (!isprint((unsigned char)s[i]) || s[i] == ',') {
            return config_fail(l, o, org, what, "invalid UUID \"%s\"", s);
        }
    }
    if (cfg->uuid_allow_list == NULL) {
        cfg->uuid_allow_list = calloc(KMS_CONFIG_MAX_UUIDS, sizeof(char *));
        if (cfg->uuid_allow_list == NULL) {
            return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        }
    }
    cfg->uuid_allow_list[cfg->n_uuid_allow_list] = strdup(s);
    if (cfg->uuid_allow_list[cfg->n_uuid_allow_list] == NULL) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    cfg->n_uuid_allow_list++;
    return 0;
}

/* A list option given as one string (default, env, flag): comma-separated,
 * initialCluster entries as ID=RAFT@CLUSTER. Replaces the whole list. */
static int apply_list_string(struct loader *l, const struct opt *o, struct origin org,
                             const char *v)
{
    char *copy = strdup(v);
    char *save = NULL;
    int rc = 0;
    if (copy == NULL) {
        rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
        goto out;
    }
    config_list_clear(l->cfg, o);
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        if (o->type == T_PEERS) {
            char *eq = strchr(tok, '=');
            char *at = eq != NULL ? strchr(eq, '@') : NULL;
            if (eq == NULL || at == NULL) {
                rc = config_fail(l, o, org, o->name, "invalid member \"%s\" (ID=RAFT@CLUSTER)",
                                 tok);
                goto out;
            }
            *eq = '\0';
            *at = '\0';
            rc = config_add_peer(l, o, org, o->name, tok, eq + 1, at + 1);
        } else if (o->type == T_CIDRS) {
            rc = config_add_cidr(l, o, org, o->name, tok);
        } else {
            rc = config_add_uuid(l, o, org, o->name, tok);
        }
        if (rc != 0) {
            goto out;
        }
    }
out:
    free(copy);
    return rc;
}

/* Parses v for option o and stores it; `org` says where v came from. */
int config_apply(struct loader *l, const struct opt *o, struct origin org, const char *v)
{
    void *field = opt_field(l->cfg, o);
    char why[256];
    uint64_t u;
    int rc = 0;
    why[0] = '\0';
    switch (o->type) {
    case T_U64:
        if (kms_parse_u64(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(uint64_t *)field = u;
        }
        break;
    case T_UINT:
        if (kms_parse_u64(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(unsigned *)field = (unsigned)u;
        }
        break;
    case T_BOOL:
        (void)kms_parse_bool(v, (bool *)field, why, sizeof(why));
        break;
    case T_DURATION:
        if (kms_parse_duration_ms(v, o->min, o->max, 0, &u, why, sizeof(why)) == 0) {
            *(unsigned *)field = (unsigned)u;
        }
        break;
    case T_SIZE:
        if (kms_parse_size(v, o->min, o->max, &u, why, sizeof(why)) == 0) {
            *(uint64_t *)field = u;
        }
        break;
    case T_ADDR:
        if (!(v[0] == '\0' && (o->flags & O_EMPTY_OK))) {
            (void)kms_parse_addr(v, 0, NULL, why, sizeof(why));
        }
        if (why[0] == '\0') {
            rc = set_string(l, o, v);
        }
        break;
    case T_STRING:
    case T_PATH:
        rc = set_string(l, o, v);
        break;
    case T_ENUM: {
        int idx;
        if (parse_enum(v, o->enums, &idx, why, sizeof(why)) == 0) {
            *(int *)field = idx;
        }
        break;
    }
    case T_PEERS:
    case T_CIDRS:
    case T_UUIDS:
        rc = apply_list_string(l, o, org, v);
        break;
    }
    if (rc == 0 && why[0] != '\0') {
        rc = config_fail(l, o, org, o->name, "%s", why);
    }
    if (rc == 0) {
        l->origin[o - kms_config_opts] = org;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Whole-configuration checks.                                         */

static const char *opt_str(const struct kms_config *cfg, const char *name)
{
    const struct opt *o = opt_by_name(name);
    return *(char *const *)((const char *)cfg + o->cfg_off);
}

/* "host:port" with a concrete host (not empty or a wildcard) can be
 * advertised as is. */
static bool concrete_host(const char *addr)
{
    return addr[0] != ':' && strncmp(addr, "0.0.0.0:", 8) != 0 && strncmp(addr, "[::]:", 5) != 0;
}

/* Fills an empty advertise address from this node's initialCluster entry,
 * else from the listen address when it names a host. */
static int derive_advertise(struct loader *l, const char *adv_name, const char *listen_name,
                            const struct kms_config_peer *self, bool is_raft, bool needed)
{
    const struct opt *o = opt_by_name(adv_name);
    const char *listen = opt_str(l->cfg, listen_name);
    const char *from = NULL;
    if (opt_str(l->cfg, adv_name)[0] != '\0') {
        return 0;
    }
    if (self != NULL) {
        from = is_raft ? self->raft : self->cluster;
    } else if (concrete_host(listen)) {
        from = listen;
    } else if (needed) {
        return fail_opt(l, o, "required when %s (\"%s\") has no host and initialCluster "
                              "does not list this node", listen_name, listen);
    } else {
        return 0;
    }
    return set_string(l, o, from);
}

static int validate(struct loader *l)
{
    struct kms_config *cfg = l->cfg;
    const struct kms_config_peer *self = NULL;
    int rc = 0;

    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &kms_config_opts[i];
        if ((o->flags & KMS_OPT_REQUIRED) && l->origin[i].kind == SRC_DEFAULT) {
            rc = fail_opt(l, o, "required");
            goto out;
        }
        if ((o->type == T_STRING || o->type == T_PATH) && (o->flags & KMS_OPT_REQUIRED) &&
            opt_str(cfg, o->name)[0] == '\0') {
            rc = fail_opt(l, o, "must not be empty");
            goto out;
        }
    }

    if (cfg->talos.plaintext) {
        if (cfg->talos.cert_file[0] != '\0' || cfg->talos.key_file[0] != '\0') {
            rc = fail_opt(l, opt_by_name(cfg->talos.cert_file[0] ? "talos.certFile"
                                                                  : "talos.keyFile"),
                          "must be empty when talos.plaintext is true");
            goto out;
        }
        if (cfg->talos.tls12) {
            rc = fail_opt(l, opt_by_name("talos.tls12"),
                          "only meaningful with TLS (talos.plaintext is true)");
            goto out;
        }
    } else if (cfg->talos.cert_file[0] == '\0' || cfg->talos.key_file[0] == '\0') {
        rc = fail_opt(l, opt_by_name(cfg->talos.cert_file[0] ? "talos.keyFile"
                                                              : "talos.certFile"),
                      "required unless talos.plaintext is true");
        goto out;
    }

    for (size_t i = 0; i < N_OPTS; i++) {
        const char *path;
        if (kms_config_opts[i].type != T_PATH) {
            continue;
        }
        path = opt_str(cfg, kms_config_opts[i].name);
        if (path[0] != '\0' && access(path, R_OK) != 0) {
            rc = fail_opt(l, &kms_config_opts[i], "cannot read \"%s\": %s", path, strerror(errno));
            goto out;
        }
    }

    if (cfg->seal.type == KMS_SEAL_PKCS11) {
        const char *missing = cfg->seal.module[0] == '\0'        ? "seal.module"
                              : cfg->seal.token_label[0] == '\0' ? "seal.tokenLabel"
                              : cfg->seal.key_label[0] == '\0'   ? "seal.keyLabel"
                                                                 : NULL;
        if (missing != NULL) {
            rc = fail_opt(l, opt_by_name(missing), "required when seal.type is pkcs11");
            goto out;
        }
        if (cfg->seal.pin_file[0] == '\0' && cfg->seal.pin[0] == '\0') {
            rc = fail_opt(l, opt_by_name("seal.pinFile"),
                          "required when seal.type is pkcs11 (or set KMSD_PKCS11_PIN)");
            goto out;
        }
        if (strlen(cfg->seal.token_label) > 32 || strlen(cfg->seal.key_label) > 32) {
            rc = fail_opt(l, opt_by_name(strlen(cfg->seal.token_label) > 32 ? "seal.tokenLabel"
                                                                           : "seal.keyLabel"),
                          "at most 32 bytes (a PKCS#11 label)");
            goto out;
        }
    }

    if (cfg->raft.heartbeat_timeout_ms >= cfg->raft.election_timeout_ms) {
        rc = fail_opt(l, opt_by_name("raft.heartbeatTimeout"),
                      "must be less than raft.electionTimeout (%ums)",
                      cfg->raft.election_timeout_ms);
        goto out;
    }

    for (size_t i = 0; i < cfg->n_initial_cluster; i++) {
        if (cfg->initial_cluster[i].id == cfg->node_id) {
            self = &cfg->initial_cluster[i];
        }
    }
    if (cfg->n_initial_cluster > 0 && self == NULL) {
        rc = fail_opt(l, opt_by_name("initialCluster"), "does not contain nodeId %llu",
                      (unsigned long long)cfg->node_id);
        goto out;
    }

    if ((rc = derive_advertise(l, "raft.advertise", "raft.listen", self, true, true)) != 0 ||
        (rc = derive_advertise(l, "cluster.advertise", "cluster.listen", self, false, true)) !=
            0 ||
        (rc = derive_advertise(l, "talos.advertise", "talos.listen", NULL, false, false)) != 0) {
        goto out;
    }
    cfg->unseal_reads_local = cfg->unseal_reads == KMS_UNSEAL_READS_LOCAL;
    cfg->seal_pkcs11 = cfg->seal.type == KMS_SEAL_PKCS11;
out:
    return rc;
}

/* ------------------------------------------------------------------ */
/* Public API.                                                         */

void kms_config_free(struct kms_config *cfg)
{
    if (cfg == NULL) {
        return;
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &kms_config_opts[i];
        if (o->type == T_STRING || o->type == T_PATH || o->type == T_ADDR) {
            free(*(char **)opt_field(cfg, o));
        }
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        config_list_clear(cfg, &kms_config_opts[i]);
    }
    free(cfg->config_file);
    memset(cfg, 0, sizeof(*cfg));
}

int kms_config_load(struct kms_config *cfg, int argc, char **argv, char **envp,
                    struct kms_err *err)
{
    struct loader *l = calloc(1, sizeof(*l));
    const char *file = NULL;
    int rc = 0;

    memset(cfg, 0, sizeof(*cfg));
    if (l == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "config: out of memory");
        goto out;
    }
    l->origin = calloc(N_OPTS, sizeof(*l->origin));
    if (l->origin == NULL) {
        rc = kms_err_set(err, KMS_ENOMEM, "config: out of memory");
        goto out;
    }
    l->cfg = cfg;
    l->err = err;
    if ((rc = config_scan_meta_flags(l, argc, argv, &file)) != 0) {
        goto out;
    }
    if (cfg->help) {
        kms_config_usage(stdout, argc > 0 ? argv[0] : "kmsd");
        goto out;
    }
    if (cfg->version || cfg->print_table) {
        goto out;
    }
    if (file == NULL && envp != NULL) {
        for (char **e = envp; *e != NULL; e++) {
            if (strncmp(*e, "KMSD_CONFIG=", 12) == 0) {
                file = *e + 12;
                break;
            }
        }
    }
    if (file != NULL && file[0] != '\0') {
        if ((cfg->config_file = strdup(file)) == NULL) {
            rc = kms_err_set(err, KMS_ENOMEM, "config: out of memory");
            goto out;
        }
        l->file = cfg->config_file;
    }

    for (size_t i = 0; i < N_OPTS; i++) {
        struct origin org = {SRC_DEFAULT, 0};
        const char *def = kms_config_opts[i].def;
        enum opt_type t = kms_config_opts[i].type;
        /* Required options have no default; give strings a "" placeholder so
         * every string field is non-NULL, without marking them as set. */
        if (def == NULL && (t == T_STRING || t == T_PATH)) {
            def = "";
        }
        if (def != NULL && (rc = config_apply(l, &kms_config_opts[i], org, def)) != 0) {
            goto out;
        }
    }
    if (l->file != NULL && (rc = config_load_file(l)) != 0) {
        goto out;
    }
    if ((rc = config_load_env(l, envp)) != 0 || (rc = config_load_flags(l, argc, argv)) != 0 ||
        (rc = validate(l)) != 0) {
        goto out;
    }
out:
    if (l != NULL) {
        for (size_t i = 0; i < l->n_locs; i++) {
            free(l->locs[i].path);
        }
        free(l->locs);
        free(l->origin);
        free(l);
    }
    if (rc != 0) {
        kms_config_free(cfg);
        /* Messages quote offending values: keep them one printable line
         * (a quoted YAML scalar may hold newlines and control bytes). */
        for (char *c = err != NULL ? err->msg : NULL; c != NULL && *c != '\0'; c++) {
            if ((unsigned char)*c < 0x20 || *c == 0x7f) {
                *c = ' ';
            }
        }
    }
    return rc;
}

