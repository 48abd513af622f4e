/* The runner's generate mode: an LLM decoder's prefill and decode loop in one process.
 *
 *   runner --generate --prompt-ids 1,2,3 [-n 32] [--temperature T] [--top-k K] [--top-p P]
 *          [--seed S] [--stop 2,7] [--consts FILE ...] [--threads N] [--state-dir DIR] [--timing]
 *
 * runner.c includes this file when built with -DSQK_RUNNER_GENERATE (it uses that file's
 * helpers: die, xalloc, read_consts, write_npy, check_cpu). sqk links such a runner for a
 * riscv64 decoder (codegen/generate_runner.py) with the decoder's programs (0: the one-token
 * step; 1, when there is one: the prefill chunk) and a table naming them:
 *
 *   sqk_llm_n_programs, sqk_llm_tokens[p]     the programs and their token counts
 *   sqk_llm_programs[p], sqk_llm_consts[p]    the program, the index of its --consts file
 *   sqk_llm_in_slot[p][i]                     input i: a KV state slot, or LLM_TOKEN / LLM_POS / LLM_LAST
 *   sqk_llm_out_slot[p][o]                    output o: the slot it updates, or LLM_LOGITS
 *   sqk_llm_n_slots, sqk_llm_max_seq
 *
 * The prompt is prefilled as llm/decoder.py's Decoder.prefill does it: in pieces of the chunk
 * program's length C, the last one padded with token 0 (input `last` names its final real row),
 * or token by token through the step for a piece shorter than max(2, C / 8) or one whose padded
 * chunk would pass the cache's end. Then each new token is drawn by sqk_sample
 * (runtime/sqk_sample.c: greedy at temperature 0, else the same draws as llm/sampling.py from
 * the same --seed) and run through the step. A token of --stop ends generation (not printed), as
 * does a full KV cache. Each new id is printed on its own line of stdout as soon as it is drawn.
 * --state-dir writes the KV state after the last run (DIR/NAME.npy, the step program's input
 * names) and DIR/pos.txt; --timing prints "prefill N tokens S s, decode M tokens S s" on stderr.
 *
 * The programs' state outputs are buffers of their own (the runner exchanges no state with
 * the caller), so each slot has two buffers that swap after every run: nothing is copied.
 */
#include "sqk_sample.h"

#include <math.h>
#include <time.h>

#define LLM_TOKEN (-2)
#define LLM_POS (-3)
#define LLM_LAST (-4)
#define LLM_LOGITS (-2)
#define MAX_CONSTS 16

extern const int64_t sqk_llm_n_programs, sqk_llm_n_slots, sqk_llm_max_seq;
extern const int64_t sqk_llm_tokens[], sqk_llm_consts[];
extern const sqk_program *const sqk_llm_programs[];
extern const int64_t *const sqk_llm_in_slot[];
extern const int64_t *const sqk_llm_out_slot[];

/* "1,2,3" -> ids (malloc'd); count in *n. Every id a number in [0, limit). */
static int64_t *parse_ids(const char *opt, const char *s, int64_t limit, int64_t *n) {
    int64_t cap = 1;
    for (const char *c = s; *c; c++) cap += *c == ',';
    int64_t *ids = xalloc(cap * (int64_t)sizeof *ids, opt);
    *n = 0;
    if (*s == '\0') return ids;
    for (const char *c = s;;) {
        char *end;
        errno = 0;
        long long v = strtoll(c, &end, 10);
        if (errno || end == c || v < 0 || v >= limit || (*end != ',' && *end != '\0'))
            die(EXIT_USAGE, "%s needs comma-separated token ids in [0, %" PRId64 "), got '%s'", opt, limit, s);
        ids[(*n)++] = v;
        if (*end == '\0') break;
        c = end + 1;
    }
    return ids;
}

static double parse_double(const char *opt, const char *val) {
    char *end;
    errno = 0;
    double v = strtod(val, &end);
    if (errno || end == val || *end != '\0') die(EXIT_USAGE, "%s needs a number, got '%s'", opt, val);
    return v;
}

static long long parse_int(const char *opt, const char *val, long long min) {
    char *end;
    errno = 0;
    long long v = strtoll(val, &end, 10);
    if (errno || end == val || *end != '\0' || v < min)
        die(EXIT_USAGE, "%s needs a whole number >= %lld, got '%s'", opt, min, val);
    return v;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    sqk_context *ctx;
    void **consts;
    void **state, **spare; /* per slot: the current KV state, and the buffer the next run writes */
    float *logits;         /* the last run's logits [vocab] */
    int64_t vocab, pos;
} llm_run;

/* Run program p on tokens[0..C) (C its length) at position r->pos, `last` the row whose logits
 * it returns (a chunk's; the step has none); then advance the position by `advance`. */
static void run_program(llm_run *r, int64_t p, const int64_t *tokens, int64_t last, int64_t advance) {
    const sqk_program *prog = sqk_llm_programs[p];
    void *ins[64], *outs[64];
    if (prog->n_inputs > 64 || prog->n_outputs > 64) die(EXIT_RUNTIME, "the decoder has too many inputs");
    int64_t pos = r->pos;
    for (int64_t i = 0; i < prog->n_inputs; i++) {
        int64_t s = sqk_llm_in_slot[p][i];
        ins[i] = s == LLM_TOKEN ? (void *)tokens : s == LLM_POS ? (void *)&pos : s == LLM_LAST ? (void *)&last
                                                                                             : r->state[s];
    }
    for (int64_t o = 0; o < prog->n_outputs; o++) {
        int64_t s = sqk_llm_out_slot[p][o];
        outs[o] = s == LLM_LOGITS ? (void *)r->logits : r->spare[s];
    }
    int32_t rc = sqk_run(r->ctx, prog, ins, outs, r->consts[sqk_llm_consts[p]], prog->const_bytes);
    if (rc != SQK_OK) {
        int64_t step = sqk_context_error_step(r->ctx);
        die(EXIT_RUNTIME, "%s step %" PRId64 " (kernel '%s') failed: %s (code %d)", prog->name, step,
            step >= 0 && step < prog->n_steps && prog->steps[step].name ? prog->steps[step].name : "?",
            sqk_error_string(rc), rc);
    }
    for (int64_t o = 0; o < prog->n_outputs; o++) {
        int64_t s = sqk_llm_out_slot[p][o];
        if (s >= 0) {
            void *t = r->state[s];
            r->state[s] = r->spare[s];
            r->spare[s] = t;
        }
    }
    r->pos += advance;
}

/* Prefill ids[0..n) as Decoder.prefill does (this file's header). */
static void prefill(llm_run *r, const int64_t *ids, int64_t n) {
    int64_t chunk = sqk_llm_n_programs > 1 ? 1 : 0, c = sqk_llm_tokens[chunk];
    int64_t *padded = xalloc(c * (int64_t)sizeof *padded, "the prefill chunk");
    for (int64_t i = 0; i < n; i += c) {
        int64_t rest = n - i < c ? n - i : c;
        if (c < 2 || rest < (c / 8 > 2 ? c / 8 : 2) || r->pos + c > sqk_llm_max_seq) {
            for (int64_t j = 0; j < rest; j++) run_program(r, 0, ids + i + j, 0, 1);
            continue;
        }
        memset(padded, 0, (size_t)c * sizeof *padded);
        memcpy(padded, ids + i, (size_t)rest * sizeof *padded);
        run_program(r, chunk, padded, rest - 1, rest);
    }
    free(padded);
}

static void write_state(llm_run *r, const char *dir) {
    const sqk_program *step = sqk_llm_programs[0];
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        die(EXIT_RUNTIME, "cannot create the state directory %s: %s", dir, strerror(errno));
    char path[4096];
    for (int64_t i = 0; i < step->n_inputs; i++) {
        int64_t s = sqk_llm_in_slot[0][i];
        if (s < 0) continue;
        output_path(path, sizeof path, dir, step->inputs[i].name);
        if (write_npy(path, &step->inputs[i], r->state[s]) != 0)
            die(EXIT_RUNTIME, "cannot write the state '%s' to %s: %s", step->inputs[i].name, path, strerror(errno));
    }
    snprintf(path, sizeof path, "%s/pos.txt", dir);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "%" PRId64 "\n", r->pos) < 0 || fclose(f) != 0)
        die(EXIT_RUNTIME, "cannot write %s: %s", path, strerror(errno));
}

static int generate_main(int argc, char **argv) {
    if (sqk_llm_n_programs < 1 || sqk_llm_n_programs > 2 || sqk_llm_tokens[0] != 1 ||
        (sqk_llm_n_programs == 2 && sqk_llm_tokens[1] < 2))
        die(EXIT_RUNTIME, "this runner's decoder table is inconsistent (the one-token step, then a chunk)");
    const sqk_program *step = sqk_llm_programs[0];
    int64_t vocab = -1;
    for (int64_t o = 0; o < step->n_outputs; o++)
        if (sqk_llm_out_slot[0][o] == LLM_LOGITS) vocab = step->outputs[o].nbytes / 4;
    if (vocab < 1) die(EXIT_RUNTIME, "this runner's decoder table names no logits output");

    const char *prompt = NULL, *stop_s = "", *state_dir = NULL, *consts_path[MAX_CONSTS];
    long long n_new = 32, top_k = 0, threads = 0;
    double temperature = 0.0, top_p = 0.0;
    unsigned long long seed = 0;
    int n_consts = 0, timing = 0, have_seed = 0;
    for (int i = 2; i < argc; i++) { /* argv[1] is --generate */
        const char *opt = argv[i];
        if (strcmp(opt, "--timing") == 0) {
            timing = 1;
            continue;
        }
        if (strcmp(opt, "--prompt-ids") && strcmp(opt, "-n") && strcmp(opt, "--temperature") &&
            strcmp(opt, "--top-k") && strcmp(opt, "--top-p") && strcmp(opt, "--seed") && strcmp(opt, "--stop") &&
            strcmp(opt, "--consts") && strcmp(opt, "--threads") && strcmp(opt, "--state-dir"))
            die(EXIT_USAGE, "unknown option '%s' for --generate (see --help)", opt);
        if (i + 1 >= argc) die(EXIT_USAGE, "option %s needs a value", opt);
        const char *val = argv[++i];
        if (strcmp(opt, "--prompt-ids") == 0) prompt = val;
        else if (strcmp(opt, "-n") == 0) n_new = parse_int(opt, val, 0);
        else if (strcmp(opt, "--top-k") == 0) top_k = parse_int(opt, val, 0);
        else if (strcmp(opt, "--threads") == 0) threads = parse_int(opt, val, 0);
        else if (strcmp(opt, "--stop") == 0) stop_s = val;
        else if (strcmp(opt, "--state-dir") == 0) state_dir = val;
        else if (strcmp(opt, "--temperature") == 0) {
            temperature = parse_double(opt, val);
            if (!(temperature >= 0.0) || isinf(temperature))
                die(EXIT_USAGE, "--temperature must be a finite number >= 0, got '%s'", val);
        } else if (strcmp(opt, "--top-p") == 0) {
            top_p = parse_double(opt, val);
            if (!(top_p > 0.0 && top_p <= 1.0)) die(EXIT_USAGE, "--top-p must be in (0, 1], got '%s'", val);
        } else if (strcmp(opt, "--seed") == 0) {
            char *end;
            errno = 0;
            seed = strtoull(val, &end, 10);
            if (errno || end == val || *end != '\0' || *val == '-')
                die(EXIT_USAGE, "--seed needs a whole number in [0, 2^64), got '%s'", val);
            have_seed = 1;
        } else {
            if (n_consts == MAX_CONSTS) die(EXIT_USAGE, "too many --consts files");
            consts_path[n_consts++] = val;
        }
    }
    if (!prompt) die(EXIT_USAGE, "--generate needs --prompt-ids ID,ID,...");
    if (temperature > 0.0 && !have_seed) die(EXIT_USAGE, "sampling (--temperature > 0) needs --seed S");
    int64_t n_prompt, n_stop;
    int64_t *ids = parse_ids("--prompt-ids", prompt, vocab, &n_prompt);
    int64_t *stop = parse_ids("--stop", stop_s, vocab, &n_stop);
    if (n_prompt < 1) die(EXIT_USAGE, "--prompt-ids needs at least one token id");
    if (n_prompt > sqk_llm_max_seq)
        die(EXIT_USAGE, "the prompt has %" PRId64 " tokens, the KV cache holds %" PRId64, n_prompt, sqk_llm_max_seq);

    int64_t want_consts = 0;
    for (int64_t p = 0; p < sqk_llm_n_programs; p++) {
        if (sqk_llm_consts[p] + 1 > want_consts) want_consts = sqk_llm_consts[p] + 1;
        if (sqk_llm_programs[p]->abi_version != SQK_ABI_VERSION)
            die(EXIT_RUNTIME, "the decoder was built for runtime ABI %" PRId64 ", this runner has ABI %d",
                sqk_llm_programs[p]->abi_version, SQK_ABI_VERSION);
        check_cpu(sqk_llm_programs[p]);
    }
    if (n_consts != want_consts)
        die(EXIT_USAGE, "the decoder needs %" PRId64 " constants file(s) (--consts FILE each, in order), got %d",
            want_consts, n_consts);
    llm_run r = {0};
    r.consts = xalloc(want_consts * (int64_t)sizeof(void *), "the constants table");
    for (int64_t c = 0; c < want_consts; c++) {
        int64_t bytes = -1;
        for (int64_t p = 0; p < sqk_llm_n_programs; p++)
            if (sqk_llm_consts[p] == c) bytes = sqk_llm_programs[p]->const_bytes;
        r.consts[c] = read_consts(consts_path[c], bytes);
    }
    r.state = xalloc(sqk_llm_n_slots * (int64_t)sizeof(void *), "the state table");
    r.spare = xalloc(sqk_llm_n_slots * (int64_t)sizeof(void *), "the state table");
    for (int64_t i = 0; i < step->n_inputs; i++) {
        int64_t s = sqk_llm_in_slot[0][i];
        if (s < 0) continue;
        r.state[s] = xalloc(step->inputs[i].nbytes, step->inputs[i].name);
        r.spare[s] = xalloc(step->inputs[i].nbytes, step->inputs[i].name);
        memset(r.state[s], 0, (size_t)step->inputs[i].nbytes);
    }
    r.vocab = vocab;
    r.logits = xalloc(vocab * 4, "the logits");
    r.ctx = sqk_context_new((int64_t)threads);
    if (!r.ctx) die(EXIT_RUNTIME, "could not start the thread pool (%s)", sqk_error_string(SQK_ERR_THREADS));

    sqk_rng rng = {seed};
    int64_t *scratch_ids = xalloc(vocab * 8, "sampling");
    double *cum = xalloc(vocab * 8, "sampling");
    double t0 = now_s();
    prefill(&r, ids, n_prompt);
    double t1 = now_s(), t2 = t1;
    long long made = 0;
    while (made < n_new) {
        int64_t tok = sqk_sample(r.logits, vocab, temperature, top_k, top_p, &rng, scratch_ids, cum);
        if (tok < 0) die(EXIT_RUNTIME, "cannot sample from the logits (NaN, +inf or all -inf)");
        int stopped = 0;
        for (int64_t j = 0; j < n_stop; j++) stopped |= stop[j] == tok;
        if (stopped) break;
        printf("%" PRId64 "\n", tok);
        fflush(stdout);
        made++;
        t2 = now_s();
        if (made == n_new || r.pos >= sqk_llm_max_seq) break;
        run_program(&r, 0, &tok, 0, 1);
    }
    if (timing)
        fprintf(stderr, "prefill %" PRId64 " tokens %.6f s, decode %lld tokens %.6f s\n", n_prompt, t1 - t0, made,
                t2 - t1);
    if (state_dir) write_state(&r, state_dir);
    sqk_context_free(r.ctx);
    return 0;
}
