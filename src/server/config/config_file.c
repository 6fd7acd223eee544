/*
 * kmsd configuration: the YAML file.
 *
 * The file is read in three steps:
 *  1. libyaml walks the events once to record the line of every key path
 *     ("talos.listen", "initialCluster[1]") and to report syntax errors with
 *     their line; libcyaml does not expose lines for values it accepted.
 *  2. libcyaml loads the document against a schema, generated from
 *     config_options.h, in which every scalar is a string: it rejects
 *     unknown keys and wrong shapes.
 *  3. Every value goes through the same strict parsers as environment
 *     variables and flags (config_apply), driven by the option table.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cyaml/cyaml.h>
#include <yaml.h>

#include "config_internal.h"

/* ------------------------------------------------------------------ */
/* The schema, from the rows: one field array per YAML section.        */

#define CY_SCALAR(k, st) CYAML_FIELD_STRING_PTR(#k, CYAML_FLAG_OPTIONAL, st, k, 0, 4096),
#define CY_U64 CY_SCALAR
#define CY_UINT CY_SCALAR
#define CY_BOOL CY_SCALAR
#define CY_DURATION CY_SCALAR
#define CY_SIZE CY_SCALAR
#define CY_STRING CY_SCALAR
#define CY_PATH CY_SCALAR
#define CY_ADDR CY_SCALAR
#define CY_ENUM CY_SCALAR
#define CY_LIST(k, st, entry, max) \
    CYAML_FIELD_SEQUENCE(#k, CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL, st, k, entry, 0, max),
#define CY_PEERS(k, st) CY_LIST(k, st, &peer_entry, KMS_CONFIG_MAX_PEERS)
#define CY_CIDRS(k, st) CY_LIST(k, st, &string_entry, KMS_CONFIG_MAX_CIDRS)
#define CY_UUIDS(k, st) CY_LIST(k, st, &string_entry, KMS_CONFIG_MAX_UUIDS)
#define CY_ROW_ROOT(sec, key, f, a, T, ...) CY_##T(key, struct kms_config_file_doc)
#define CY_ROW_SECTION(sec, key, f, a, T, ...) CY_##T(key, struct kms_config_file_##sec)

#define CY_FIELDS_ROOT(sec, LIST)
#define CY_FIELDS_FLAT(sec, LIST) \
    static const cyaml_schema_field_t sec##_fields[] = {LIST(CY_ROW_SECTION) CYAML_FIELD_END};
#define CY_FIELDS_NESTED CY_FIELDS_FLAT
#define CY_FIELDS(kind, sec, LIST) CY_FIELDS_##kind(sec, LIST)

#define CY_DOC_ROOT(sec, LIST) LIST(CY_ROW_ROOT)
#define CY_DOC_FLAT(sec, LIST) \
    CYAML_FIELD_MAPPING(#sec, CYAML_FLAG_OPTIONAL, struct kms_config_file_doc, sec, sec##_fields),
#define CY_DOC_NESTED CY_DOC_FLAT
#define CY_DOC(kind, sec, LIST) CY_DOC_##kind(sec, LIST)

/* An initialCluster entry (its fields are not options). */
static const cyaml_schema_field_t peer_fields[] = {
    CY_SCALAR(id, struct kms_config_file_peer)
    CY_SCALAR(raft, struct kms_config_file_peer)
    CY_SCALAR(cluster, struct kms_config_file_peer)
    CYAML_FIELD_END};
static const cyaml_schema_value_t peer_entry = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_DEFAULT, struct kms_config_file_peer, peer_fields)};
static const cyaml_schema_value_t string_entry = {
    CYAML_VALUE_STRING(CYAML_FLAG_POINTER, char, 0, 4096)};

KMS_CONFIG_GROUPS(CY_FIELDS)
static const cyaml_schema_field_t doc_fields[] = {KMS_CONFIG_GROUPS(CY_DOC) CYAML_FIELD_END};
static const cyaml_schema_value_t doc_schema = {
    CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, struct kms_config_file_doc, doc_fields)};

/* ------------------------------------------------------------------ */
/* Line index.                                                         */

static unsigned loc_line(const struct loader *l, const char *path)
{
    for (size_t i = 0; i < l->n_locs; i++) {
        if (strcmp(l->locs[i].path, path) == 0) {
            return l->locs[i].line;
        }
    }
    return 0;
}


static int loc_add(struct loader *l, const char *path, unsigned line)
{
    if (l->n_locs == l->cap_locs) {
        size_t cap = l->cap_locs ? l->cap_locs * 2 : 64;
        struct loc *n = realloc(l->locs, cap * sizeof(*n));
        if (n == NULL) {
            return -1;
        }
        l->locs = n;
        l->cap_locs = cap;
    }
    l->locs[l->n_locs].path = strdup(path);
    if (l->locs[l->n_locs].path == NULL) {
        return -1;
    }
    l->locs[l->n_locs].line = line;
    l->n_locs++;
    return 0;
}

/*
 * Walks the YAML events once, recording the line of each mapping key and
 * sequence entry by path. Also where syntax errors are reported, with
 * libyaml's line. Nesting deeper than ours is recorded but not needed.
 */
static int index_lines(struct loader *l, const unsigned char *buf, size_t len)
{
    enum { MAXD = 16 };
    struct frame {
        bool seq;
        bool want_key; /* mapping: next scalar is a key */
        unsigned idx;  /* sequence: next entry index */
        size_t plen;   /* path length at this frame */
    } st[MAXD];
    int depth = -1;
    char path[512] = "";
    yaml_parser_t p;
    yaml_event_t ev;
    bool done = false;
    int rc = 0;

    if (!yaml_parser_initialize(&p)) {
        return kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
    }
    yaml_parser_set_input_string(&p, buf, len);
    while (!done) {
        if (!yaml_parser_parse(&p, &ev)) {
            rc = kms_err_set(l->err, KMS_ECONFIG, "config %s:%zu: syntax error: %s", l->file,
                             p.problem_mark.line + 1, p.problem ? p.problem : "invalid YAML");
            goto out;
        }
        unsigned line = (unsigned)ev.start_mark.line + 1;
        bool is_value_start = ev.type == YAML_SCALAR_EVENT ||
                              ev.type == YAML_MAPPING_START_EVENT ||
                              ev.type == YAML_SEQUENCE_START_EVENT ||
                              ev.type == YAML_ALIAS_EVENT;
        /* In a sequence, each value starts an entry "path[i]". */
        if (is_value_start && depth >= 0 && st[depth].seq) {
            size_t n = strlen(path);
            snprintf(path + n, sizeof(path) - n, "[%u]", st[depth].idx++);
            if (loc_add(l, path, line) != 0) {
                rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
                yaml_event_delete(&ev);
                goto out;
            }
        }
        switch (ev.type) {
        case YAML_SCALAR_EVENT:
            if (depth >= 0 && !st[depth].seq && st[depth].want_key) {
                size_t n = st[depth].plen;
                snprintf(path + n, sizeof(path) - n, "%s%s", n ? "." : "",
                         (const char *)ev.data.scalar.value);
                if (loc_add(l, path, line) != 0) {
                    rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
                    yaml_event_delete(&ev);
                    goto out;
                }
                st[depth].want_key = false;
                break;
            }
            /* A value: back to the frame's own path. */
            if (depth >= 0) {
                path[st[depth].plen] = '\0';
                st[depth].want_key = true;
            }
            break;
        case YAML_ALIAS_EVENT:
            if (depth >= 0) {
                path[st[depth].plen] = '\0';
                st[depth].want_key = true;
            }
            break;
        case YAML_MAPPING_START_EVENT:
        case YAML_SEQUENCE_START_EVENT:
            if (depth + 1 >= MAXD) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: nested too deeply",
                                 l->file, line);
                yaml_event_delete(&ev);
                goto out;
            }
            depth++;
            st[depth].seq = ev.type == YAML_SEQUENCE_START_EVENT;
            st[depth].want_key = true;
            st[depth].idx = 0;
            st[depth].plen = strlen(path);
            break;
        case YAML_MAPPING_END_EVENT:
        case YAML_SEQUENCE_END_EVENT:
            depth--;
            if (depth >= 0) {
                path[st[depth].plen] = '\0';
                st[depth].want_key = true;
            }
            break;
        case YAML_STREAM_END_EVENT:
            done = true;
            break;
        default:
            break;
        }
        yaml_event_delete(&ev);
    }
out:
    yaml_parser_delete(&p);
    return rc;
}

/* libcyaml reports problems only through its log callback: keep the first
 * error line, which says what is wrong, and the first "in mapping field
 * 'x' (line: N" backtrace line, which says where. */
static void cyaml_capture(cyaml_log_t level, void *ctx, const char *fmt, va_list args)
{
    struct loader *l = ctx;
    char line[256];
    const char *p;
    if (level < CYAML_LOG_ERROR) {
        return;
    }
    /* libcyaml hands us its own format string. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    vsnprintf(line, sizeof(line), fmt, args);
#pragma GCC diagnostic pop
    line[strcspn(line, "\n")] = '\0';
    if (l->cyaml_msg[0] == '\0') {
        memcpy(l->cyaml_msg, line, sizeof(line));
    } else if (l->cyaml_field[0] == '\0' && (p = strstr(line, "in mapping field '")) != NULL) {
        unsigned ln = 0;
        const char *q;
        p += strlen("in mapping field '");
        q = strchr(p, '\'');
        if (q != NULL && (size_t)(q - p) < sizeof(l->cyaml_field)) {
            memcpy(l->cyaml_field, p, (size_t)(q - p));
            l->cyaml_field[q - p] = '\0';
            if ((q = strstr(q, "(line: ")) != NULL && sscanf(q, "(line: %u", &ln) == 1) {
                l->cyaml_line = ln;
            }
        }
    }
}

/* libcyaml's event names, in the words of a config file. */
static const char *shape(const char *ev)
{
    if (strncmp(ev, "SCALAR", 6) == 0 || strncmp(ev, "STRING", 6) == 0) {
        return "a scalar";
    }
    if (strncmp(ev, "MAPPING", 7) == 0) {
        return "a mapping";
    }
    if (strncmp(ev, "SEQUENCE", 8) == 0) {
        return "a list";
    }
    return ev;
}

/* Full path of the key named `field`, preferring the one on `line`. */
static const struct loc *find_key(const struct loader *l, const char *field, unsigned line)
{
    const struct loc *any = NULL;
    for (size_t i = 0; i < l->n_locs; i++) {
        const char *last = strrchr(l->locs[i].path, '.');
        last = last ? last + 1 : l->locs[i].path;
        if (strcmp(last, field) != 0) {
            continue;
        }
        if (l->locs[i].line == line) {
            return &l->locs[i];
        }
        if (any == NULL) {
            any = &l->locs[i];
        }
    }
    return any;
}

/* Turns a libcyaml failure into our one line. */
static int cyaml_failure(struct loader *l, cyaml_err_t cerr)
{
    const char *m = l->cyaml_msg;
    const char *key;
    const struct loc *at;
    char what[160];
    if (strncmp(m, "Load: ", 6) == 0) {
        m += 6;
    }
    /* "Unexpected key: nodeID": its line comes from our own index. */
    if (cerr == CYAML_ERR_INVALID_KEY && (key = strstr(m, "key: ")) != NULL) {
        key += 5;
        if ((at = find_key(l, key, 0)) != NULL) {
            return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: unknown key \"%s\"",
                               l->file, at->line, key);
        }
        return kms_err_set(l->err, KMS_ECONFIG, "config %s: unknown key \"%s\"", l->file, key);
    }
    /* "Mapping field already seen: nodeId": the second occurrence of a
     * path in our index is the duplicate. */
    if ((key = strstr(m, "already seen: ")) != NULL) {
        key += 14;
        for (size_t i = 0; i < l->n_locs; i++) {
            for (size_t j = 0; j < i; j++) {
                const char *last = strrchr(l->locs[i].path, '.');
                last = last ? last + 1 : l->locs[i].path;
                if (strcmp(l->locs[i].path, l->locs[j].path) == 0 && strcmp(last, key) == 0) {
                    return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: duplicate key \"%s\"",
                                       l->file, l->locs[i].line, l->locs[i].path);
                }
            }
        }
        return kms_err_set(l->err, KMS_ECONFIG, "config %s: duplicate key \"%s\"", l->file, key);
    }
    /* "Expecting STRING, got event: SEQUENCE_START" */
    if (strncmp(m, "Expecting ", 10) == 0 && strstr(m, ", got event: ") != NULL) {
        snprintf(what, sizeof(what), "expected %s, got %s", shape(m + 10),
                 shape(strstr(m, ", got event: ") + 13));
        m = what;
    }
    if (l->cyaml_field[0] != '\0') {
        at = find_key(l, l->cyaml_field, l->cyaml_line);
        return kms_err_set(l->err, KMS_ECONFIG, "config %s:%u: %s: %s", l->file,
                           at ? at->line : l->cyaml_line, at ? at->path : l->cyaml_field,
                           m[0] ? m : cyaml_strerror(cerr));
    }
    return kms_err_set(l->err, KMS_ECONFIG, "config %s: %s", l->file,
                       m[0] ? m : cyaml_strerror(cerr));
}

static int read_file(struct loader *l, unsigned char **buf, size_t *len)
{
    FILE *f = fopen(l->file, "rb");
    unsigned char *b = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    if (f == NULL) {
        rc = kms_err_set(l->err, KMS_ECONFIG, "config %s: cannot open: %s", l->file,
                         strerror(errno));
        goto out;
    }
    for (;;) {
        if (n == cap) {
            /* A config is a few KiB; refuse absurd inputs rather than eat RAM. */
            if (cap >= (1u << 20)) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "config %s: larger than 1 MiB", l->file);
                goto out;
            }
            cap = cap ? cap * 2 : 4096;
            unsigned char *nb = realloc(b, cap + 1);
            if (nb == NULL) {
                rc = kms_err_set(l->err, KMS_ENOMEM, "config: out of memory");
                goto out;
            }
            b = nb;
        }
        size_t got = fread(b + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) {
                rc = kms_err_set(l->err, KMS_ECONFIG, "config %s: cannot read: %s", l->file,
                                 strerror(errno));
                goto out;
            }
            break;
        }
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    b = NULL;
out:
    if (f != NULL) {
        fclose(f);
    }
    free(b);
    return rc;
}

static struct origin file_origin(const struct loader *l, const char *path)
{
    struct origin o = {SRC_FILE, loc_line(l, path)};
    return o;
}

/* A list of strings from the file replaces option `name`'s list, entry by
 * entry through add (config_add_cidr, config_add_uuid). */
static int apply_file_strings(struct loader *l, const char *name, char *const *items,
                              unsigned n,
                              int (*add)(struct loader *, const struct opt *, struct origin,
                                         const char *, const char *))
{
    const struct opt *o = opt_by_name(name);
    char what[64];
    int rc = 0;
    if (items == NULL) {
        return 0;
    }
    config_list_clear(l->cfg, o);
    for (unsigned i = 0; i < n && rc == 0; i++) {
        snprintf(what, sizeof(what), "%s[%u]", name, i);
        rc = add(l, o, file_origin(l, what), what, items[i]);
    }
    l->origin[o - kms_config_opts] = file_origin(l, name);
    return rc;
}

static int apply_file_lists(struct loader *l, const struct kms_config_file_doc *d)
{
    char what[64];
    int rc = 0;
    if (d->initialCluster != NULL) {
        const struct opt *o = opt_by_name("initialCluster");
        config_list_clear(l->cfg, o);
        for (unsigned i = 0; i < d->initialCluster_count && rc == 0; i++) {
            const struct kms_config_file_peer *p = &d->initialCluster[i];
            snprintf(what, sizeof(what), "initialCluster[%u]", i);
            rc = config_add_peer(l, o, file_origin(l, what), what, p->id, p->raft, p->cluster);
        }
        l->origin[o - kms_config_opts] = file_origin(l, "initialCluster");
    }
    if (rc == 0) {
        rc = apply_file_strings(l, "enrolment.allowedCIDRs", d->enrolment.allowedCIDRs,
                                d->enrolment.allowedCIDRs_count, config_add_cidr);
    }
    if (rc == 0) {
        rc = apply_file_strings(l, "enrolment.uuidAllowList", d->enrolment.uuidAllowList,
                                d->enrolment.uuidAllowList_count, config_add_uuid);
    }
    return rc;
}

int config_load_file(struct loader *l)
{
    static const cyaml_config_t base = {
        .log_fn = cyaml_capture,
        .mem_fn = cyaml_mem,
        .log_level = CYAML_LOG_ERROR,
        .flags = CYAML_CFG_NO_ALIAS,
    };
    cyaml_config_t ccfg = base;
    unsigned char *buf = NULL;
    size_t len = 0;
    struct kms_config_file_doc *doc = NULL;
    cyaml_err_t cerr;
    int rc;

    if ((rc = read_file(l, &buf, &len)) != 0 || (rc = index_lines(l, buf, len)) != 0) {
        goto out;
    }
    ccfg.log_ctx = l;
    cerr = cyaml_load_data(buf, len, &ccfg, &doc_schema, (cyaml_data_t **)&doc, NULL);
    if (cerr != CYAML_OK) {
        rc = cyaml_failure(l, cerr);
        goto out;
    }
    if (doc == NULL) {
        goto out; /* empty document: defaults only */
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &kms_config_opts[i];
        const char *v;
        if (o->file_off == NOF) {
            continue;
        }
        v = *(char *const *)((const char *)doc + o->file_off);
        if (v != NULL && (rc = config_apply(l, o, file_origin(l, o->name), v)) != 0) {
            goto out;
        }
    }
    rc = apply_file_lists(l, doc);
out:
    if (doc != NULL) {
        cyaml_free(&ccfg, &doc_schema, doc, 0);
    }
    free(buf);
    return rc;
}
