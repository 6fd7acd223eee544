/* kmsctl: flags and environment, dispatch and exit codes, errors, JSON and
 * table output, share input; the RPC is replaced by an in-memory fake. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/status.h>

#include "cli_common.h"
#include "kms_crypto.h"

/* ---- helpers --------------------------------------------------------- */

static const char *const *fake_env;

static const char *env_get(const char *name)
{
    for (const char *const *p = fake_env; p != NULL && p[0] != NULL; p += 2) {
        if (strcmp(p[0], name) == 0) {
            return p[1];
        }
    }
    return NULL;
}

struct cap {
    char *buf;
    size_t len;
    FILE *f;
};

static void cap_open(struct cap *c)
{
    c->buf = NULL;
    c->len = 0;
    c->f = open_memstream(&c->buf, &c->len);
    assert_non_null(c->f);
}

static char *cap_close(struct cap *c)
{
    fclose(c->f);
    return c->buf;
}

/* Mutable argv from string literals. */
struct argv_buf {
    int argc;
    char *argv[32];
};

static void av(struct argv_buf *a, ...)
{
    va_list ap;
    const char *s;
    a->argc = 0;
    va_start(ap, a);
    while ((s = va_arg(ap, const char *)) != NULL && a->argc < 31) {
        a->argv[a->argc++] = strdup(s);
    }
    va_end(ap);
    a->argv[a->argc] = NULL;
}

static void av_free(struct argv_buf *a)
{
    for (int i = 0; i < a->argc; i++) {
        free(a->argv[i]);
    }
}

/* ---- global flags and environment ------------------------------------ */

static void test_defaults(void **state)
{
    struct cli_global g;
    char err[CLI_ERRBUF];
    (void)state;
    fake_env = NULL;
    cli_global_init(&g);
    cli_global_env(&g, env_get);
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), 0);
    assert_string_equal(g.target, "127.0.0.1:4051");
    assert_int_equal(g.out, CLI_OUT_TABLE);
    assert_int_equal(g.timeout_ms, 10000);
    assert_false(g.insecure);
    assert_null(g.cacert);
}

static void test_env_then_flags_win(void **state)
{
    static const char *const env[] = {
        "KMSCTL_ENDPOINT", "kms-1:4051", "KMSCTL_CACERT", "/env/ca.pem",
        "KMSCTL_CERT",     "/env/op.pem", "KMSCTL_KEY",   "/env/op-key.pem",
        "KMSCTL_OUTPUT",   "json",        "KMSCTL_TIMEOUT", "2s", NULL};
    struct cli_global g;
    struct argv_buf a;
    char *pos[4];
    int npos = 0;
    char err[CLI_ERRBUF];
    (void)state;

    fake_env = env;
    cli_global_init(&g);
    cli_global_env(&g, env_get);
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), 0);
    assert_string_equal(g.target, "kms-1:4051");
    assert_string_equal(g.cacert, "/env/ca.pem");
    assert_string_equal(g.cert, "/env/op.pem");
    assert_string_equal(g.key, "/env/op-key.pem");
    assert_int_equal(g.out, CLI_OUT_JSON);
    assert_int_equal(g.timeout_ms, 2000);

    av(&a, "--endpoint", "kms-2:4051", "-otable", "--timeout=500ms", "--cacert", "/flag/ca.pem",
       "word", NULL);
    assert_int_equal(cli_parse(a.argc, a.argv, NULL, &g, pos, 4, &npos, err, sizeof(err)), 0);
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), 0);
    assert_string_equal(g.target, "kms-2:4051");
    assert_string_equal(g.cacert, "/flag/ca.pem");
    assert_string_equal(g.cert, "/env/op.pem"); /* not overridden */
    assert_int_equal(g.out, CLI_OUT_TABLE);
    assert_int_equal(g.timeout_ms, 500);
    assert_int_equal(npos, 1);
    assert_string_equal(pos[0], "word");
    av_free(&a);
    fake_env = NULL;
}

static void test_bad_env_named_or_overridden(void **state)
{
    static const char *const env[] = {"KMSCTL_TIMEOUT", "soon", "KMSCTL_OUTPUT", "xml", NULL};
    struct cli_global g;
    struct argv_buf a;
    int npos = 0;
    char err[CLI_ERRBUF];
    (void)state;

    fake_env = env;
    cli_global_init(&g);
    cli_global_env(&g, env_get);
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_non_null(strstr(err, "KMSCTL_OUTPUT"));

    /* The flag wins, so the bad environment value no longer matters. */
    av(&a, "-o", "json", "--timeout", "3s", NULL);
    assert_int_equal(cli_parse(a.argc, a.argv, NULL, &g, NULL, 0, &npos, err, sizeof(err)), 0);
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), 0);
    assert_int_equal(g.timeout_ms, 3000);
    av_free(&a);

    cli_global_init(&g);
    cli_global_env(&g, env_get);
    av(&a, "-o", "json", NULL);
    assert_int_equal(cli_parse(a.argc, a.argv, NULL, &g, NULL, 0, &npos, err, sizeof(err)), 0);
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_non_null(strstr(err, "'soon' from KMSCTL_TIMEOUT"));
    av_free(&a);
    fake_env = NULL;
}

static void test_endpoint_forms(void **state)
{
    static const struct {
        const char *in;
        int ok;
        const char *target;
        bool insecure;
    } cases[] = {
        {"10.0.0.1:4051", 1, "10.0.0.1:4051", false},
        {"https://kms.example.com:4051", 1, "kms.example.com:4051", false},
        {"grpc://127.0.0.1:4051", 1, "127.0.0.1:4051", true},
        {"[::1]:4051", 1, "[::1]:4051", false},
        {"kms-1", 0, NULL, false},
        {"kms-1:", 0, NULL, false},
        {"kms-1:99999", 0, NULL, false},
        {"http://kms-1:4051", 0, NULL, false},
        {"kms-1:4051/x", 0, NULL, false},
    };
    char err[CLI_ERRBUF];
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct cli_global g;
        cli_global_init(&g);
        g.endpoint = cases[i].in;
        g.endpoint_src = "--endpoint";
        int rc = cli_global_finish(&g, err, sizeof(err));
        if (cases[i].ok) {
            assert_int_equal(rc, 0);
            assert_string_equal(g.target, cases[i].target);
            assert_int_equal(g.insecure, cases[i].insecure);
        } else {
            assert_int_equal(rc, CLI_EXIT_LOCAL);
            assert_non_null(strstr(err, "--endpoint"));
        }
    }
    /* cert without key */
    struct cli_global g;
    cli_global_init(&g);
    g.cert = "/x.pem";
    g.cert_src = "--cert";
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_non_null(strstr(err, "--key"));

    /* endpoint lists */
    cli_global_init(&g);
    g.endpoint = "kms-1:4051,https://kms-2:4051,[::1]:4051";
    g.endpoint_src = "--endpoints";
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), 0);
    assert_int_equal(g.n_targets, 3);
    assert_string_equal(g.target, "kms-1:4051");
    assert_string_equal(g.targets[1], "kms-2:4051");
    assert_string_equal(g.targets[2], "[::1]:4051");
    g.endpoint = "kms-1:4051,,kms-2:4051";
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_non_null(strstr(err, "--endpoints"));
    g.endpoint = "grpc://kms-1:4051,kms-2:4051";
    assert_int_equal(cli_global_finish(&g, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_non_null(strstr(err, "mixes"));
}

static void test_durations_and_numbers(void **state)
{
    unsigned ms = 0;
    unsigned long v = 0;
    (void)state;
    assert_int_equal(cli_parse_duration_ms("10s", &ms), 0);
    assert_int_equal(ms, 10000);
    assert_int_equal(cli_parse_duration_ms("10", &ms), 0);
    assert_int_equal(ms, 10000);
    assert_int_equal(cli_parse_duration_ms("250ms", &ms), 0);
    assert_int_equal(ms, 250);
    assert_int_equal(cli_parse_duration_ms("1.5s", &ms), 0);
    assert_int_equal(ms, 1500);
    assert_int_equal(cli_parse_duration_ms("2m", &ms), 0);
    assert_int_equal(ms, 120000);
    assert_int_equal(cli_parse_duration_ms("1h", &ms), 0);
    assert_int_equal(ms, 3600000);
    const char *bad[] = {"", "s", "-1s", "0", "0.1ms", "2h", "1..2s", "10 s", "10sec", ".", "1e3"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_not_equal(cli_parse_duration_ms(bad[i], &ms), 0);
    }
    assert_int_equal(cli_parse_ulong("255", 1, 255, &v), 0);
    assert_int_equal(v, 255);
    assert_int_not_equal(cli_parse_ulong("256", 1, 255, &v), 0);
    assert_int_not_equal(cli_parse_ulong("0", 1, 255, &v), 0);
    assert_int_not_equal(cli_parse_ulong("-1", 0, 255, &v), 0);
    assert_int_not_equal(cli_parse_ulong("5x", 0, 255, &v), 0);
    assert_int_not_equal(cli_parse_ulong(" 5", 0, 255, &v), 0);
    assert_int_not_equal(cli_parse_ulong("99999999999999999999999", 0, ~0UL, &v), 0);
    assert_true(cli_is_key_id("0123456789abcdefABCDEF0123456789"));
    assert_false(cli_is_key_id("0123456789abcdef0123456789abcde"));
    assert_false(cli_is_key_id("0123456789abcdef0123456789abcdeg"));
}

static void test_parse_errors(void **state)
{
    static unsigned long n;
    static bool flag;
    static const char *str;
    static bool n_seen;
    static const struct cli_flag flags[] = {
        {"key-shares", 0, CLI_FLAG_UINT, &n, &n_seen, 1, 255, "N", "h", false},
        {"reset", 0, CLI_FLAG_BOOL, &flag, NULL, 0, 0, NULL, "h", false},
        {"node-uuid", 'u', CLI_FLAG_STRING, &str, NULL, 0, 0, "U", "h", false},
        {NULL, 0, 0, NULL, NULL, 0, 0, NULL, NULL, false},
    };
    struct cli_global g;
    struct argv_buf a;
    char *pos[2];
    int npos;
    char err[CLI_ERRBUF];
    (void)state;

    cli_global_init(&g);
    av(&a, "--key-shares=7", "--reset", "-uabc", "--", "-notaflag", NULL);
    assert_int_equal(cli_parse(a.argc, a.argv, flags, &g, pos, 2, &npos, err, sizeof(err)), 0);
    assert_int_equal(n, 7);
    assert_true(n_seen);
    assert_true(flag);
    assert_string_equal(str, "abc");
    assert_int_equal(npos, 1);
    assert_string_equal(pos[0], "-notaflag");
    av_free(&a);

    static const struct {
        const char *args[3];
        const char *msg;
    } cases[] = {
        {{"--nope", NULL}, "unknown flag --nope"},
        {{"-x", NULL}, "unknown flag -x"},
        {{"--key-shares", NULL}, "flag --key-shares needs a value"},
        {{"--key-shares", "300", NULL}, "invalid value '300' for --key-shares"},
        {{"--reset=yes", NULL}, "flag --reset takes no value"},
        {{"a", "b", "c"}, "unexpected argument 'c'"},
        {{"-o", NULL}, "flag -o needs a value"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        a.argc = 0;
        for (int k = 0; k < 3 && cases[i].args[k] != NULL; k++) {
            a.argv[a.argc++] = strdup(cases[i].args[k]);
        }
        cli_global_init(&g);
        assert_int_equal(cli_parse(a.argc, a.argv, flags, &g, pos, 2, &npos, err, sizeof(err)),
                         CLI_EXIT_LOCAL);
        assert_non_null(strstr(err, cases[i].msg));
        assert_null(strchr(err, '\n'));
        av_free(&a);
    }
}

static void test_init_check(void **state)
{
    char err[CLI_ERRBUF];
    (void)state;
    assert_int_equal(cli_init_check(5, 3, false, err, sizeof(err)), 0);
    assert_int_equal(cli_init_check(2, 2, false, err, sizeof(err)), 0);
    assert_int_equal(cli_init_check(255, 255, false, err, sizeof(err)), 0);
    assert_int_equal(cli_init_check(1, 1, true, err, sizeof(err)), 0);
    assert_int_equal(cli_init_check(1, 1, false, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_int_equal(cli_init_check(5, 1, true, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_int_equal(cli_init_check(3, 4, false, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_int_equal(cli_init_check(0, 0, false, err, sizeof(err)), CLI_EXIT_LOCAL);
    assert_int_equal(cli_init_check(256, 3, false, err, sizeof(err)), CLI_EXIT_LOCAL);
}

/* ---- errors and exit codes ------------------------------------------- */

static void test_exit_codes_and_error_text(void **state)
{
    char buf[512];
    (void)state;
    assert_int_equal(cli_exit_for_grpc(GRPC_STATUS_OK), 0);
    for (int s = 1; s <= 16; s++) {
        assert_int_equal(cli_exit_for_grpc(s), 2);
    }
    assert_string_equal(cli_grpc_code_name(GRPC_STATUS_FAILED_PRECONDITION), "FailedPrecondition");
    assert_string_equal(cli_grpc_code_name(GRPC_STATUS_UNAVAILABLE), "Unavailable");
    assert_string_equal(cli_grpc_code_name(GRPC_STATUS_DEADLINE_EXCEEDED), "DeadlineExceeded");
    assert_string_equal(cli_grpc_code_name(99), "Unknown");

    cli_format_rpc_error(buf, sizeof(buf), "unseal", GRPC_STATUS_FAILED_PRECONDITION,
                         "share 2: checksum mismatch");
    assert_string_equal(buf, "Error: unseal: share 2: checksum mismatch (code FailedPrecondition)");
    cli_format_rpc_error(buf, sizeof(buf), "rotate", GRPC_STATUS_PERMISSION_DENIED, NULL);
    assert_string_equal(buf, "Error: rotate: permission denied (code PermissionDenied)");
    /* A hostile server cannot send terminal escapes. */
    cli_format_rpc_error(buf, sizeof(buf), "status", GRPC_STATUS_INTERNAL,
                         "bad\x1b[2Jthing\n\xff\xc2\x9b");
    assert_string_equal(buf, "Error: status: bad?[2Jthing??? (code Internal)");

    Kmsd__V1__StatusResponse st = KMSD__V1__STATUS_RESPONSE__INIT;
    assert_int_equal(cli_status_exit(&st), 2); /* uninitialised */
    st.initialized = true;
    st.sealed = true;
    assert_int_equal(cli_status_exit(&st), 2);
    st.sealed = false;
    assert_int_equal(cli_status_exit(&st), 2); /* unsealed, no lease, listener closed */
    st.lease = true;
    assert_int_equal(cli_status_exit(&st), 2); /* listener closed */
    st.talos_listening = true;
    assert_int_equal(cli_status_exit(&st), 0); /* serving */
    st.lease = false;
    assert_int_equal(cli_status_exit(&st), 2); /* no lease */
    st.unseal_reads = "local";
    assert_int_equal(cli_status_exit(&st), 0); /* local reads need no lease */
    st.sealed = true;
    assert_int_equal(cli_status_exit(&st), 2);

    /* What a failed call says about the connection. */
    assert_int_equal(cli_fail_classify(GRPC_STATUS_UNAVAILABLE,
                                       "failed to connect to all addresses; last error: UNKNOWN: "
                                       "ipv4:127.0.0.1:1: Failed to connect to remote host: "
                                       "Connection refused"),
                     CLI_FAIL_REFUSED);
    assert_int_equal(cli_fail_classify(GRPC_STATUS_UNAVAILABLE, "Socket closed"), CLI_FAIL_TLS);
    assert_int_equal(cli_fail_classify(GRPC_STATUS_DEADLINE_EXCEEDED, "Deadline Exceeded"),
                     CLI_FAIL_TIMEOUT);
    assert_int_equal(cli_fail_classify(GRPC_STATUS_UNAVAILABLE,
                                       "no read lease: cluster quorum unreachable"),
                     CLI_FAIL_APP);
    assert_int_equal(cli_fail_classify(GRPC_STATUS_FAILED_PRECONDITION, "sealed"), CLI_FAIL_APP);
}

/* ---- JSON, time, table ----------------------------------------------- */

static char *json_of(const char *s)
{
    struct cap c;
    cap_open(&c);
    cli_json_escape(c.f, s);
    return cap_close(&c);
}

static void test_json_escape(void **state)
{
    char *o;
    (void)state;
    o = json_of("plain");
    assert_string_equal(o, "\"plain\"");
    free(o);
    o = json_of("q\"b\\s/");
    assert_string_equal(o, "\"q\\\"b\\\\s/\"");
    free(o);
    o = json_of("\b\f\n\r\t\x01\x1f\x7f");
    assert_string_equal(o, "\"\\b\\f\\n\\r\\t\\u0001\\u001f\\u007f\"");
    free(o);
    o = json_of("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91"); /* é € key emoji pass through */
    assert_string_equal(o, "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91\"");
    free(o);
    /* invalid: lone continuation, truncated, overlong, surrogate, > U+10FFFF */
    o = json_of("a\x80" "b\xc3" "c\xc0\xaf" "d\xed\xa0\x80" "e\xf4\x90\x80\x80");
    assert_string_equal(o, "\"a\\ufffdb\\ufffdc\\ufffd\\ufffdd\\ufffd\\ufffd\\ufffde"
                           "\\ufffd\\ufffd\\ufffd\\ufffd\"");
    free(o);
    o = json_of("\xe2\x80\xa8");
    assert_string_equal(o, "\"\\u2028\"");
    free(o);
    o = json_of(NULL);
    assert_string_equal(o, "\"\"");
    free(o);
}

static void test_json_writer_nesting(void **state)
{
    struct cap c;
    struct cli_json j;
    (void)state;
    cap_open(&c);
    cli_json_init(&j, c.f);
    cli_json_obj_begin(&j, NULL);
    cli_json_arr_begin(&j, "empty");
    cli_json_arr_end(&j);
    cli_json_arr_begin(&j, "a");
    cli_json_u64(&j, NULL, 1);
    cli_json_i64(&j, NULL, -2);
    cli_json_obj_begin(&j, NULL);
    cli_json_null(&j, "n");
    cli_json_obj_end(&j);
    cli_json_arr_end(&j);
    cli_json_str(&j, "k\"", "v");
    cli_json_time(&j, "t", 0);
    cli_json_obj_end(&j);
    cli_json_end(&j);
    char *o = cap_close(&c);
    assert_string_equal(o, "{\n"
                           "  \"empty\": [],\n"
                           "  \"a\": [\n"
                           "    1,\n"
                           "    -2,\n"
                           "    {\n"
                           "      \"n\": null\n"
                           "    }\n"
                           "  ],\n"
                           "  \"k\\\"\": \"v\",\n"
                           "  \"t\": null\n"
                           "}\n");
    free(o);
}

static void test_time_format(void **state)
{
    char buf[48];
    (void)state;
    cli_format_time(0, false, buf, sizeof(buf));
    assert_string_equal(buf, "-");
    cli_format_time(1700000000123LL, false, buf, sizeof(buf));
    assert_string_equal(buf, "2023-11-14T22:13:20Z");
    cli_format_time(1700000000123LL, true, buf, sizeof(buf));
    assert_string_equal(buf, "2023-11-14T22:13:20.123Z");
    cli_format_time(-1, true, buf, sizeof(buf));
    assert_string_equal(buf, "1969-12-31T23:59:59.999Z");
}

static void test_table(void **state)
{
    static const char *const hdr[3] = {"ID", "NAME", "X"};
    static const char *const r1[3] = {"1", "caf\xc3\xa9", ""};
    static const char *const r2[3] = {"100", "a\x1b", "z"};
    struct cap c;
    (void)state;
    cap_open(&c);
    struct cli_table *t = cli_table_new(3, hdr);
    cli_table_row(t, r1);
    cli_table_row(t, r2);
    cli_table_print(c.f, t);
    cli_table_free(t);
    char *o = cap_close(&c);
    assert_string_equal(o, "ID   NAME  X\n"
                           "1    caf\xc3\xa9\n"
                           "100  a?    z\n");
    free(o);
}

/* ---- status output --------------------------------------------------- */

static Kmsd__V1__MemberStatus m1 = KMSD__V1__MEMBER_STATUS__INIT;
static Kmsd__V1__MemberStatus m2 = KMSD__V1__MEMBER_STATUS__INIT;
static Kmsd__V1__MemberStatus *members[2] = {&m1, &m2};

static void fill_status(Kmsd__V1__StatusResponse *st)
{
    kmsd__v1__status_response__init(st);
    kmsd__v1__member_status__init(&m1);
    kmsd__v1__member_status__init(&m2);
    m1.id = 1;
    m1.raft_address = "10.0.0.1:4052";
    m1.cluster_address = "10.0.0.1:4051";
    m1.talos_address = "10.0.0.1:4050";
    m1.role = "voter";
    m1.version = "0.1.0";
    m1.is_leader = true;
    m2.id = 2;
    m2.raft_address = "10.0.0.2:4052";
    m2.role = "voter";
    m2.version = "0.1.0\"x";
    st->initialized = true;
    st->sealed = false;
    st->progress = 0;
    st->threshold = 3;
    st->shares = 5;
    st->node_id = 1;
    st->role = "leader";
    st->leader_id = 1;
    st->term = 7;
    st->commit_index = 42;
    st->applied_index = 41;
    st->n_members = 2;
    st->members = members;
    st->version = "0.1.0";
    st->lease = true;
    st->talos_listening = true;
    st->cluster_id = "00112233445566778899aabbccddeeff";
    st->active_term = 2;
}

static const char status_json[] =
    "{\n"
    "  \"initialized\": true,\n"
    "  \"sealed\": false,\n"
    "  \"progress\": 0,\n"
    "  \"threshold\": 3,\n"
    "  \"shares\": 5,\n"
    "  \"node_id\": 1,\n"
    "  \"role\": \"leader\",\n"
    "  \"leader_id\": 1,\n"
    "  \"term\": 7,\n"
    "  \"commit_index\": 42,\n"
    "  \"applied_index\": 41,\n"
    "  \"members\": [\n"
    "    {\n"
    "      \"id\": 1,\n"
    "      \"raft_address\": \"10.0.0.1:4052\",\n"
    "      \"cluster_address\": \"10.0.0.1:4051\",\n"
    "      \"talos_address\": \"10.0.0.1:4050\",\n"
    "      \"role\": \"voter\",\n"
    "      \"version\": \"0.1.0\",\n"
    "      \"is_leader\": true,\n"
    "      \"entry_version\": 0\n"
    "    },\n"
    "    {\n"
    "      \"id\": 2,\n"
    "      \"raft_address\": \"10.0.0.2:4052\",\n"
    "      \"cluster_address\": \"\",\n"
    "      \"talos_address\": \"\",\n"
    "      \"role\": \"voter\",\n"
    "      \"version\": \"0.1.0\\\"x\",\n"
    "      \"is_leader\": false,\n"
    "      \"entry_version\": 0\n"
    "    }\n"
    "  ],\n"
    "  \"lease\": true,\n"
    "  \"talos_listening\": true,\n"
    "  \"version\": \"0.1.0\",\n"
    "  \"cluster_id\": \"00112233445566778899aabbccddeeff\",\n"
    "  \"active_term\": 2,\n"
    "  \"keyring_terms\": [],\n"
    "  \"keyring_error\": \"\",\n"
    "  \"talos_listening\": true,\n"
    "  \"unseal_reads\": \"lease\",\n"
    "  \"read_lease\": \"true\",\n"
    "  \"member\": true,\n"
    "  \"serving\": true,\n"
    "  \"peer_unseal\": false,\n"
    "  \"peer_unseal_gate\": \"\",\n"
    "  \"seal_type\": \"shamir\",\n"
    "  \"hsm_wrapped\": false,\n"
    "  \"seal_error\": \"\",\n"
    "  \"entry_version_supported\": 0,\n"
    "  \"entry_version_emitting\": 0,\n"
    "  \"entry_version_applied\": 0\n"
    "}\n";

static void test_status_json(void **state)
{
    Kmsd__V1__StatusResponse st;
    struct cap c;
    (void)state;
    fill_status(&st);
    cap_open(&c);
    cli_status_print(c.f, CLI_OUT_JSON, &st);
    char *o = cap_close(&c);
    assert_string_equal(o, status_json);
    free(o);
}

static void test_status_table(void **state)
{
    Kmsd__V1__StatusResponse st;
    struct cap c;
    (void)state;
    fill_status(&st);
    st.sealed = true;
    st.progress = 2;
    cap_open(&c);
    cli_status_print(c.f, CLI_OUT_TABLE, &st);
    char *o = cap_close(&c);
    assert_non_null(strstr(o, "Key              Value\n---              -----\n"));
    assert_non_null(strstr(o, "\nSealed           true\n"));
    assert_non_null(strstr(o, "\nUnseal Progress  2/3\n"));
    assert_non_null(strstr(o, "\nApplied Index    41\n"));
    assert_non_null(strstr(o, "\nMembers\nID  ROLE   LEADER  RAFT ADDRESS"));
    assert_non_null(strstr(o, "\n1   voter  yes     10.0.0.1:4052"));
    free(o);
}

static void test_keys_json_times(void **state)
{
    Kmsd__V1__KeyInfo k = KMSD__V1__KEY_INFO__INIT;
    Kmsd__V1__KeyInfo *list[1] = {&k};
    struct cap c;
    (void)state;
    k.key_id = "00112233445566778899aabbccddeeff";
    k.node_uuid = "uuid-1";
    k.term = 1;
    k.created_at = 1700000000123LL;
    k.source_ip = "10.0.0.9";
    k.revoked_at = 0;
    cap_open(&c);
    cli_keys_print(c.f, CLI_OUT_JSON, list, 1);
    char *o = cap_close(&c);
    assert_non_null(strstr(o, "\"created_at\": \"2023-11-14T22:13:20.123Z\""));
    assert_non_null(strstr(o, "\"last_access_at\": null"));
    assert_non_null(strstr(o, "\"revoked_at\": null"));
    free(o);
    cap_open(&c);
    cli_key_print(c.f, CLI_OUT_TABLE, &k);
    o = cap_close(&c);
    assert_non_null(strstr(o, "Created      2023-11-14T22:13:20Z\n"));
    assert_non_null(strstr(o, "Revoked      no\n"));
    free(o);
}

/* ---- full dispatch with a fake server -------------------------------- */

static const struct cli_cmd test_subs[] = {
    {"status", "s", cli_status_usage, NULL, cli_status_run, NULL, false},
    {"operator", "o", cli_operator_usage, cli_operator_subs, NULL, NULL, false},
    {"keys", "k", cli_keys_usage, cli_keys_subs, NULL, NULL, false},
    {NULL, NULL, NULL, NULL, NULL, NULL, false},
};
static const struct cli_cmd test_root = {"kmsctl", "t", "Usage: kmsctl", test_subs, NULL, NULL,
                                         false};

struct fake {
    char method[96];
    int status;
    const char *details;
    ProtobufCMessage *resp;
    uint8_t req[512];
    size_t reqlen;
    int calls;
    int redirects;            /* the first N calls answer redirect_details */
    const char *redirect_details;
};

static int fake_rpc(void *arg, const char *method, const uint8_t *req, size_t reqlen,
                    uint8_t **resp, size_t *resplen, int *grpc_status, char **details)
{
    struct fake *f = arg;
    f->calls++;
    snprintf(f->method, sizeof(f->method), "%s", method);
    if (reqlen <= sizeof(f->req)) {
        memcpy(f->req, req, reqlen);
        f->reqlen = reqlen;
    }
    *grpc_status = f->status;
    *details = f->details ? strdup(f->details) : NULL;
    *resp = NULL;
    *resplen = 0;
    if (f->calls <= f->redirects) {
        free(*details);
        *grpc_status = GRPC_STATUS_UNAVAILABLE;
        *details = strdup(f->redirect_details);
        return 0;
    }
    if (f->status == GRPC_STATUS_OK) {
        size_t n = f->resp ? protobuf_c_message_get_packed_size(f->resp) : 0;
        *resp = malloc(n + 1);
        if (f->resp) {
            protobuf_c_message_pack(f->resp, *resp);
        }
        *resplen = n;
    }
    return 0;
}

static int run_main(struct fake *f, char **out, char **err, struct argv_buf *a)
{
    struct cap co, ce;
    struct cli_ctx ctx;
    cap_open(&co);
    cap_open(&ce);
    cli_ctx_init(&ctx, co.f, ce.f);
    ctx.fake_rpc = fake_rpc;
    ctx.fake_arg = f;
    fake_env = NULL;
    int rc = cli_main(&test_root, &ctx, a->argc, a->argv, env_get);
    cli_ctx_close(&ctx);
    *out = cap_close(&co);
    *err = cap_close(&ce);
    return rc;
}

static void test_leader_redirect(void **state)
{
    Kmsd__V1__RotateResponse rr = KMSD__V1__ROTATE_RESPONSE__INIT;
    static const char msg[] = "not the leader; the leader is node 2, cluster API at "
                              "127.0.0.1:29211";
    struct fake f = {.status = GRPC_STATUS_OK};
    struct argv_buf a;
    char *out, *err, addr[64];
    uint64_t id = 0;
    (void)state;

    assert_true(cli_leader_redirect_parse(msg, &id, addr, sizeof(addr)));
    assert_int_equal(id, 2);
    assert_string_equal(addr, "127.0.0.1:29211");
    /* wrapped by a handler's own message: still found */
    assert_true(cli_leader_redirect_parse("rotate: not the leader; the leader is node 13, "
                                          "cluster API at [::1]:4051", &id, addr,
                                          sizeof(addr)));
    assert_int_equal(id, 13);
    assert_string_equal(addr, "[::1]:4051");
    assert_false(cli_leader_redirect_parse(NULL, &id, addr, sizeof(addr)));
    assert_false(cli_leader_redirect_parse("not the leader; leader is 2 at 127.0.0.1:4052",
                                           &id, addr, sizeof(addr))); /* raft's: no follow */
    assert_false(cli_leader_redirect_parse("not the leader; the leader is node 2 (its cluster "
                                           "API address is unknown)", &id, addr,
                                           sizeof(addr)));
    assert_false(cli_leader_redirect_parse("not the leader; the leader is node 0, cluster API "
                                           "at x:1", &id, addr, sizeof(addr)));
    assert_false(cli_leader_redirect_parse("not the leader; the leader is node 2, cluster API "
                                           "at ", &id, addr, sizeof(addr)));
    assert_false(cli_leader_redirect_parse("not the leader; the leader is node 2, cluster API "
                                           "at \x1b[31m", &id, addr, 4));

    /* a follower answers the redirect once: kmsctl sends the call again */
    rr.active_term = 3;
    f.resp = &rr.base;
    f.redirects = 1;
    f.redirect_details = msg;
    av(&a, "kmsctl", "-o", "json", "operator", "rotate", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_int_equal(f.calls, 2);
    assert_string_equal(f.method, "/kmsd.v1.Operator/Rotate");
    assert_non_null(strstr(out, "\"active_term\": 3"));
    assert_non_null(strstr(err, "sending rotate to leader 2 at 127.0.0.1:29211"));
    free(out);
    free(err);
    av_free(&a);

    /* the same redirect again from the leader it named: no loop */
    f.calls = 0;
    f.redirects = 10;
    av(&a, "kmsctl", "operator", "rotate", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 2);
    assert_int_equal(f.calls, 2);
    assert_non_null(strstr(err, "not the leader"));
    free(out);
    free(err);
    av_free(&a);
}

static void test_dispatch_status(void **state)
{
    Kmsd__V1__StatusResponse st;
    struct fake f = {.status = GRPC_STATUS_OK};
    struct argv_buf a;
    char *out, *err;
    (void)state;

    fill_status(&st);
    st.sealed = true;
    f.resp = &st.base;
    /* global flag before the command, sealed -> JSON still printed, exit 2 */
    av(&a, "kmsctl", "-o", "json", "status", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 2);
    assert_string_equal(f.method, "/kmsd.v1.Operator/Status");
    assert_non_null(strstr(out, "\"sealed\": true"));
    assert_string_equal(err, "");
    free(out);
    free(err);
    av_free(&a);

    st.sealed = false;
    av(&a, "kmsctl", "status", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_non_null(strstr(out, "Sealed           false"));
    free(out);
    free(err);
    av_free(&a);

    /* unknown command / flag: one line, exit 1, no call */
    f.calls = 0;
    av(&a, "kmsctl", "frobnicate", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 1);
    assert_string_equal(err, "Error: unknown command 'frobnicate' (see 'kmsctl -h')\n");
    free(out);
    free(err);
    av_free(&a);
    av(&a, "kmsctl", "operator", "seal", "--force", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 1);
    assert_string_equal(err, "Error: unknown flag --force (see 'kmsctl operator seal -h')\n");
    free(out);
    free(err);
    av_free(&a);
    av(&a, "kmsctl", "operator", "init", "-h", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_non_null(strstr(out, "--key-shares N"));
    assert_null(strstr(out, "dev-single-share")); /* hidden */
    free(out);
    free(err);
    av_free(&a);
    assert_int_equal(f.calls, 0);

    /* server error: details shown with the code name, exit 2 */
    f.status = GRPC_STATUS_ALREADY_EXISTS;
    f.details = "cluster is already initialised";
    av(&a, "kmsctl", "operator", "init", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 2);
    assert_string_equal(f.method, "/kmsd.v1.Operator/Initialize");
    assert_string_equal(err,
                        "Error: init: cluster is already initialised (code AlreadyExists)\n");
    free(out);
    free(err);
    av_free(&a);
}

static void make_share(char *text, size_t len, uint8_t index)
{
    struct kms_share s;
    memset(&s, 0, sizeof(s));
    s.index = index;
    s.len = 32;
    for (int i = 0; i < 32; i++) {
        s.y[i] = (uint8_t)(i * 7 + index);
    }
    assert_int_equal(kms_share_format(&s, text, len, NULL), 0);
}

static void test_dispatch_unseal(void **state)
{
    Kmsd__V1__UnsealResponse ur = KMSD__V1__UNSEAL_RESPONSE__INIT;
    struct fake f = {.status = GRPC_STATUS_OK};
    struct argv_buf a;
    char share[KMS_SHARE_TEXT_MAX];
    char *out, *err;
    (void)state;

    make_share(share, sizeof(share), 2);
    ur.sealed = true;
    ur.progress = 2;
    ur.threshold = 3;
    f.resp = &ur.base;
    av(&a, "kmsctl", "operator", "unseal", share, NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_string_equal(out, "Sealed: true\nUnseal Progress: 2/3\n");
    /* the request carried the share; argv no longer does */
    Kmsd__V1__UnsealRequest *req = kmsd__v1__unseal_request__unpack(NULL, f.reqlen, f.req);
    assert_non_null(req);
    assert_string_equal(req->share, share);
    assert_false(req->reset);
    kmsd__v1__unseal_request__free_unpacked(req, NULL);
    assert_null(strstr(a.argv[3], "kms1"));
    free(out);
    free(err);
    av_free(&a);

    /* a typo never reaches the server */
    char typo[KMS_SHARE_TEXT_MAX];
    snprintf(typo, sizeof(typo), "%s", share);
    size_t n = strlen(typo);
    typo[n - 3] = typo[n - 3] == '0' ? '1' : '0';
    f.calls = 0;
    av(&a, "kmsctl", "operator", "unseal", typo, NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 1);
    assert_int_equal(f.calls, 0);
    assert_non_null(strstr(err, "checksum"));
    assert_null(strstr(err, "kms1-"));
    free(out);
    free(err);
    av_free(&a);

    /* server-side failure: wrapped chain and code */
    f.status = GRPC_STATUS_FAILED_PRECONDITION;
    f.details = "share 2: checksum mismatch";
    av(&a, "kmsctl", "operator", "unseal", share, NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 2);
    assert_string_equal(err, "Error: unseal: share 2: checksum mismatch (code FailedPrecondition)\n");
    free(out);
    free(err);
    av_free(&a);

    /* --reset alone: no prompt, reset sent */
    f.status = GRPC_STATUS_OK;
    f.details = NULL;
    ur.progress = 0;
    av(&a, "kmsctl", "operator", "unseal", "--reset", "-o", "json", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    req = kmsd__v1__unseal_request__unpack(NULL, f.reqlen, f.req);
    assert_non_null(req);
    assert_true(req->reset);
    assert_string_equal(req->share, "");
    kmsd__v1__unseal_request__free_unpacked(req, NULL);
    assert_string_equal(out, "{\n  \"sealed\": true,\n  \"progress\": 0,\n  \"threshold\": 3\n}\n");
    free(out);
    free(err);
    av_free(&a);

    /* unsealed */
    ur.sealed = false;
    ur.progress = 3;
    av(&a, "kmsctl", "operator", "unseal", share, NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_string_equal(out, "Sealed: false\n");
    free(out);
    free(err);
    av_free(&a);
}

static void test_dispatch_init_and_keys(void **state)
{
    Kmsd__V1__InitResponse ir = KMSD__V1__INIT_RESPONSE__INIT;
    char *shares[2] = {"kms1-001-aa\"-x", "kms1-002-bb"};
    struct fake f = {.status = GRPC_STATUS_OK};
    struct argv_buf a;
    char *out, *err;
    (void)state;

    ir.n_shares = 2;
    ir.shares = shares;
    ir.threshold = 2;
    ir.cluster_id = "abcd";
    f.resp = &ir.base;
    av(&a, "kmsctl", "operator", "init", "--key-shares", "2", "--key-threshold=2", "-o", "json",
       NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_string_equal(out, "{\n  \"shares\": [\n    \"kms1-001-aa\\\"-x\",\n    \"kms1-002-bb\"\n"
                             "  ],\n  \"threshold\": 2,\n  \"cluster_id\": \"abcd\"\n}\n");
    Kmsd__V1__InitRequest *req = kmsd__v1__init_request__unpack(NULL, f.reqlen, f.req);
    assert_non_null(req);
    assert_int_equal(req->key_shares, 2);
    assert_int_equal(req->key_threshold, 2);
    kmsd__v1__init_request__free_unpacked(req, NULL);
    free(out);
    free(err);
    av_free(&a);

    av(&a, "kmsctl", "operator", "init", "--key-shares", "2", "--key-threshold=2", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_non_null(strstr(out, "Unseal Key 1: kms1-001-aa\"-x\nUnseal Key 2: kms1-002-bb\n"));
    assert_non_null(strstr(out, "shown only once"));
    free(out);
    free(err);
    av_free(&a);

    Kmsd__V1__KeysRevokeResponse rr = KMSD__V1__KEYS_REVOKE_RESPONSE__INIT;
    rr.revoked = 2;
    f.resp = &rr.base;
    av(&a, "kmsctl", "keys", "revoke", "--node-uuid", "u-1", NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 0);
    assert_string_equal(f.method, "/kmsd.v1.Operator/KeysRevoke");
    assert_string_equal(out, "Success! Revoked 2 keys.\n");
    free(out);
    free(err);
    av_free(&a);
    av(&a, "kmsctl", "keys", "revoke", "--node-uuid", "u-1", "00112233445566778899aabbccddeeff",
       NULL);
    assert_int_equal(run_main(&f, &out, &err, &a), 1);
    free(out);
    free(err);
    av_free(&a);
}

static void test_read_secret_pipe(void **state)
{
    int p[2];
    char buf[64];
    (void)state;
    assert_int_equal(pipe(p), 0);
    assert_int_equal(write(p[1], "  kms1-abc \r\nnext\n", 18), 18);
    assert_int_equal(cli_read_secret(p[0], "x", NULL, buf, sizeof(buf)), 8);
    assert_string_equal(buf, "kms1-abc");
    assert_int_equal(cli_read_secret(p[0], "x", NULL, buf, sizeof(buf)), 4);
    assert_string_equal(buf, "next");
    close(p[1]);
    assert_int_equal(cli_read_secret(p[0], "x", NULL, buf, sizeof(buf)), -1); /* EOF */
    close(p[0]);
    /* too long */
    assert_int_equal(pipe(p), 0);
    assert_int_equal(write(p[1], "0123456789\n", 11), 11);
    assert_int_equal(cli_read_secret(p[0], NULL, NULL, buf, 8), -1);
    assert_int_equal(buf[0], 0);
    close(p[1]);
    close(p[0]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_env_then_flags_win),
        cmocka_unit_test(test_bad_env_named_or_overridden),
        cmocka_unit_test(test_endpoint_forms),
        cmocka_unit_test(test_durations_and_numbers),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_init_check),
        cmocka_unit_test(test_exit_codes_and_error_text),
        cmocka_unit_test(test_json_escape),
        cmocka_unit_test(test_json_writer_nesting),
        cmocka_unit_test(test_time_format),
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_status_json),
        cmocka_unit_test(test_status_table),
        cmocka_unit_test(test_keys_json_times),
        cmocka_unit_test(test_leader_redirect),
        cmocka_unit_test(test_dispatch_status),
        cmocka_unit_test(test_dispatch_unseal),
        cmocka_unit_test(test_dispatch_init_and_keys),
        cmocka_unit_test(test_read_secret_pipe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
