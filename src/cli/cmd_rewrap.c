/*
 * kmsctl operator rewrap | retire-term (docs/kmsctl.md, docs/operations.md
 * "Rewrap and retire a term").
 *
 * rewrap drives the leader one bounded step at a time (Operator/Rewrap):
 * each step rewraps at most --batch records in one replicated write and
 * returns a cursor. A failed step (leader change, leader crash) is retried
 * from the same cursor; every step is idempotent, so rerunning the command
 * from the start after an interruption also completes the job.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_common.h"

#define REWRAP_MAX_STEPS 10000000u /* 4096 records per step: far beyond any store */

static unsigned long rw_batch, rw_pause_ms, rw_retries;

const struct cli_flag cli_rewrap_flags[] = {
    {"batch", 0, CLI_FLAG_UINT, &rw_batch, NULL, 1, 1024, "N",
     "records per replicated write (default 256, at most 1024)", false},
    {"pause-ms", 0, CLI_FLAG_UINT, &rw_pause_ms, NULL, 0, 60000, "MS",
     "pause between steps, to leave the leader's log to Seals (default 20)", false},
    {"retries", 0, CLI_FLAG_UINT, &rw_retries, NULL, 0, 1000, "N",
     "failed steps retried in a row, 1 s apart, e.g. across a leader change (default 30)",
     false},
    CLI_FLAG_END,
};

static void sleep_ms(unsigned long ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int cli_rewrap_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__RewrapRequest req = KMSD__V1__REWRAP_REQUEST__INIT;
    uint8_t cursor[16];
    uint64_t scanned = 0, rewrapped = 0, records = 0, steps = 0, failed = 0;
    unsigned long failures = 0;
    uint32_t active = 0;
    bool done = false, json;
    int rc;

    rw_batch = 256;
    rw_pause_ms = 20;
    rw_retries = 30;
    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, NULL, 0, NULL)) >= 0) {
        return rc;
    }
    json = ctx->g.out == CLI_OUT_JSON;
    req.batch = (uint32_t)rw_batch;
    while (!done && steps < REWRAP_MAX_STEPS) {
        ProtobufCMessage *m = NULL;
        Kmsd__V1__RewrapResponse *r;
        rc = cli_rpc(ctx, "rewrap", "Rewrap", &req.base, &kmsd__v1__rewrap_response__descriptor,
                     &m, false);
        if (rc != 0) {
            if (rc == CLI_EXIT_LOCAL || ++failures > rw_retries) {
                fprintf(ctx->err,
                        "kmsctl: rewrap stopped after %" PRIu64 " records rewrapped; run it "
                        "again to continue (records already rewrapped are skipped)\n",
                        rewrapped);
                return rc;
            }
            fprintf(ctx->err, "kmsctl: rewrap: step failed, retrying in 1 s (%lu of %lu)\n",
                    failures, rw_retries);
            sleep_ms(1000);
            continue;
        }
        failures = 0;
        steps++;
        r = (Kmsd__V1__RewrapResponse *)m;
        scanned += r->scanned;
        rewrapped += r->rewrapped;
        failed += r->failed;
        records = r->records;
        active = r->active_term;
        done = r->done;
        if (r->next.len == 16) {
            memcpy(cursor, r->next.data, 16);
            req.after.data = cursor;
            req.after.len = 16;
        }
        protobuf_c_message_free_unpacked(m, NULL);
        if (!json) {
            fprintf(ctx->out, "rewrap: %" PRIu64 " of %" PRIu64 " records scanned, %" PRIu64
                    " rewrapped to term %u\n",
                    scanned, records, rewrapped, active);
            fflush(ctx->out);
        }
        if (!done && rw_pause_ms > 0) {
            sleep_ms(rw_pause_ms);
        }
    }
    if (json) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_u64(&j, "active_term", active);
        cli_json_u64(&j, "scanned", scanned);
        cli_json_u64(&j, "rewrapped", rewrapped);
        cli_json_u64(&j, "steps", steps);
        cli_json_u64(&j, "failed", failed);
        cli_json_bool(&j, "done", done);
        cli_json_doc_end(&j);
    } else if (failed > 0) {
        fprintf(ctx->err,
                "kmsctl: rewrap: %" PRIu64 " records could not be rewrapped (their term key is "
                "missing or they do not authenticate; see the leader's log); %" PRIu64
                " rewrapped\n",
                failed, rewrapped);
    } else {
        fprintf(ctx->out,
                "Success! Every live record is on term %u (%" PRIu64 " rewrapped). Check with\n"
                "'kmsctl keys list --term T' that no record is left on a term, then\n"
                "'kmsctl operator retire-term T' removes its key from the keyring.\n",
                active, rewrapped);
    }
    return failed > 0 ? CLI_EXIT_REMOTE : CLI_EXIT_OK;
}

/* arg: the term retired. */
static int retire_print_cb(struct cli_ctx *ctx, ProtobufCMessage *resp, void *arg)
{
    const Kmsd__V1__RetireTermResponse *r = (const Kmsd__V1__RetireTermResponse *)resp;
    unsigned long t = *(const unsigned long *)arg;

    if (ctx->g.out == CLI_OUT_JSON) {
        struct cli_json j;
        cli_json_doc_begin(&j, ctx->out);
        cli_json_u64(&j, "retired_term", t);
        cli_json_u64(&j, "active_term", r->active_term);
        cli_json_u32_array(&j, "terms", r->terms, r->n_terms);
        cli_json_doc_end(&j);
    } else {
        fprintf(ctx->out, "Success! Retired term %lu: its key is gone from the keyring. Terms "
                "left:", t);
        for (size_t i = 0; i < r->n_terms; i++) {
            fprintf(ctx->out, " %u", r->terms[i]);
        }
        fprintf(ctx->out, " (active %u).\n", r->active_term);
    }
    return CLI_EXIT_OK;
}

static const struct cli_method retire_method = {
    "retire-term", "RetireTerm", &kmsd__v1__retire_term_response__descriptor, false};

int cli_retire_term_run(struct cli_ctx *ctx, const struct cli_cmd *cmd, int argc, char **argv)
{
    Kmsd__V1__RetireTermRequest req = KMSD__V1__RETIRE_TERM_REQUEST__INIT;
    char *pos[1] = {NULL};
    char *end = NULL;
    unsigned long t;
    int npos = 0, rc;

    if ((rc = cli_leaf_parse(ctx, cmd, argc, argv, pos, 1, &npos)) >= 0) {
        return rc;
    }
    if (npos != 1 || pos[0] == NULL) {
        return cli_usage_error(ctx, "retire-term needs one TERM");
    }
    t = strtoul(pos[0], &end, 10);
    if (pos[0][0] < '1' || pos[0][0] > '9' || end == NULL || *end != '\0' || t > 4294967295UL) {
        return cli_usage_error(ctx, "TERM must be a keyring term number (1, 2, ...), not '%s'",
                               pos[0]);
    }
    req.term = (uint32_t)t;
    return cli_call(ctx, &retire_method, &req.base, retire_print_cb, &t);
}

const char cli_rewrap_usage[] =
    "Usage: kmsctl operator rewrap [--batch N] [--pause-ms MS] [--retries N]\n"
    "\n"
    "Moves every live record sealed (or last rewrapped) under an older keyring\n"
    "term onto the active term, in steps of at most N records per replicated\n"
    "write, printing progress. Blobs held by Talos do not change and unseal\n"
    "throughout. Runs against the leader (a follower's hint is followed); a\n"
    "step that fails, e.g. across a leader change, is retried, and an\n"
    "interrupted run is finished by running the command again. Revoked records\n"
    "hold no ciphertext and are left alone.";

const char cli_retire_term_usage[] =
    "Usage: kmsctl operator retire-term TERM\n"
    "\n"
    "Removes TERM's data key from the replicated keyring, on every replica.\n"
    "Refused while any live record still uses TERM (run 'kmsctl operator\n"
    "rewrap' first) and for the active term. Cannot be undone: the key is gone.\n"
    "Kubernetes KMS v2 data wrapped under TERM (in etcd) becomes unreadable:\n"
    "rewrite it under the new key id first (docs/operations.md).";
