/* sqk runtime: runs a compiled sqk_program (see sqk_runtime.h).
 *
 * A context owns a small pthread pool and a grow-only arena. sqk_run resolves
 * every buffer of the program to a pointer, then runs the steps in order;
 * each step's range [0, range) is cut into chunks that the caller thread and
 * the pool threads claim from a shared counter. Nothing here aborts: every
 * failure is an SQK_ERR_* code.
 */
#define _GNU_SOURCE /* sched_yield, sysconf, sched_getcpu, pthread_setaffinity_np */
#include "sqk_runtime.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SQK_ALIGN 64
#define SQK_MAX_THREADS 1024 /* sanity cap on a typo like SQK_NUM_THREADS=100000 */
/* How long (ns) an idle worker polls for the next step before it sleeps on
 * the condition variable. Measured in time, not iterations: back-to-back
 * steps, and back-to-back runs from Python (~40 us apart), must find the
 * workers awake, or the caller takes every chunk alone (a memory-bound GEMV
 * then streams at one core's bandwidth). A context idle for longer costs no CPU. */
#define SQK_SPIN_NS 200000
#define SQK_CHUNKS_PER_THREAD 4
#define SQK_SPIN 4000 /* polls the caller makes before it sleeps waiting for workers */
#define GATE_CLOSED ((int64_t)1 << 62)

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct sqk_context {
    int64_t n_threads; /* workers including the caller */
    int64_t n_pool;    /* pool threads actually started (n_threads - 1) */
    pthread_t *threads;
    pid_t owner_pid; /* a forked child has no pool threads: refuse to run there */
    int pool_off_cpu; /* the caller's CPU the pool was last kept off (-1: none yet, -2: off) */

    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* caller -> workers: a new generation is posted */
    pthread_cond_t done_cv; /* last worker -> caller: the generation is finished */
    _Atomic uint64_t generation;
    _Atomic int stop;
    /* Which pool threads take part in the current step: `gate` counts the threads
     * that joined it (low bits) until the caller closes it (GATE_CLOSED) once it
     * has run out of chunks; `finished` counts the joined threads done with it.
     * The caller waits for the joined threads only: one not yet scheduled when the
     * gate closes (an oversubscribed machine) skips the step instead of holding the
     * caller until it runs (measured: 5-10 ms per step at load 12 on 2 CPUs). */
    _Atomic int64_t gate;
    _Atomic int64_t finished;

    /* The job of the current generation; written by the caller before it bumps
     * `generation` (release), read by the workers after they see it (acquire). */
    sqk_kernel_fn fn;
    void **args;
    int64_t range, chunk, n_chunks;
    _Atomic int64_t next_chunk;
    _Atomic int32_t error; /* first non-zero kernel return code wins */

    atomic_flag busy; /* one sqk_run at a time per context */
    int64_t error_step;

    /* Grow-only scratch owned by the context. */
    void *arena;
    int64_t arena_cap;
    void **bufptr; /* resolved pointer of each buffer */
    int64_t bufptr_cap;
    void **argv; /* args of the current step */
    int64_t argv_cap;

    /* Profile (sqk_set_profile): counters per step, grown to the program run. */
    int profile;
    sqk_step_profile *prof;
    int64_t prof_cap;
};

/* ---- chunk execution, shared by the caller and the pool threads ---- */

static void run_chunks(sqk_context *ctx) {
    for (;;) {
        /* Once a chunk has failed, the rest of the step is pointless. */
        if (atomic_load_explicit(&ctx->error, memory_order_relaxed) != SQK_OK) return;
        int64_t c = atomic_fetch_add_explicit(&ctx->next_chunk, 1, memory_order_relaxed);
        if (c >= ctx->n_chunks) return;
        int64_t begin = c * ctx->chunk;
        int64_t end = begin + ctx->chunk < ctx->range ? begin + ctx->chunk : ctx->range;
        int32_t rc = ctx->fn(ctx->args, begin, end);
        if (rc != SQK_OK) {
            int32_t expected = SQK_OK;
            atomic_compare_exchange_strong(&ctx->error, &expected, rc);
        }
    }
}

static void *worker_main(void *arg) {
    sqk_context *ctx = arg;
    uint64_t seen = 0; /* the context starts at generation 0 */
    for (;;) {
        uint64_t gen = atomic_load_explicit(&ctx->generation, memory_order_acquire);
        int64_t spin_until = now_ns() + SQK_SPIN_NS;
        for (int i = 1; gen == seen && !atomic_load(&ctx->stop); i++) {
            if ((i & 63) == 0) {
                if (now_ns() > spin_until) break;
                sched_yield(); /* be polite on an oversubscribed machine */
            }
            gen = atomic_load_explicit(&ctx->generation, memory_order_acquire);
        }
        if (gen == seen) {
            pthread_mutex_lock(&ctx->mu);
            while ((gen = atomic_load_explicit(&ctx->generation, memory_order_acquire)) == seen &&
                   !atomic_load(&ctx->stop))
                pthread_cond_wait(&ctx->work_cv, &ctx->mu);
            pthread_mutex_unlock(&ctx->mu);
        }
        if (atomic_load(&ctx->stop)) return NULL;
        seen = gen;
        /* Join the step unless the caller has closed it (then it is done or
         * nearly: skip it). The gate of a step is opened before its generation
         * is posted, so a thread that saw the generation sees that gate or a
         * later one's; joining a later step is fine (its job is what it reads). */
        int64_t g = atomic_load(&ctx->gate);
        while (!(g & GATE_CLOSED) && !atomic_compare_exchange_weak(&ctx->gate, &g, g + 1)) {
        }
        if (g & GATE_CLOSED) continue;
        run_chunks(ctx);
        /* Check in. The last joined thread wakes the caller if it already closed
         * the gate; seq_cst on `finished` and `gate` on both sides: either this
         * thread sees the gate closed or the caller sees this check-in. Taking
         * the mutex makes the signal impossible to lose (the caller tests
         * `finished` under it). */
        int64_t f = atomic_fetch_add(&ctx->finished, 1) + 1;
        g = atomic_load(&ctx->gate);
        if ((g & GATE_CLOSED) && f == (g & ~GATE_CLOSED)) {
            pthread_mutex_lock(&ctx->mu);
            pthread_cond_signal(&ctx->done_cv);
            pthread_mutex_unlock(&ctx->mu);
        }
    }
}

/* ---- context ---- */

static int64_t default_threads(void) {
    const char *env = getenv("SQK_NUM_THREADS");
    if (env && *env) {
        char *end = NULL;
        errno = 0;
        long long v = strtoll(env, &end, 10);
        if (errno == 0 && end && *end == '\0' && v > 0) return (int64_t)v;
        /* A malformed value falls back to the CPU count rather than failing. */
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int64_t)n : 1;
}

/* Keep the pool threads off the CPU the caller runs on. A worker that sleeps
 * between runs is woken by the caller, and Linux tends to wake it on the
 * caller's CPU, where the two then share one core (measured: GEMM 512^3 at 2
 * threads ran at one thread's speed in most runs of a process, ~100 against
 * ~180 GFLOP/s). Workers get the other CPUs of the caller's affinity mask, round
 * robin; the caller itself is never pinned, and pinning is redone (checked at
 * every parallel step: the caller, woken by a worker, may land on its CPU) only
 * when it has moved. SQK_AFFINITY=0 turns this off. */
static void keep_pool_off_caller(sqk_context *ctx) {
    if (ctx->pool_off_cpu == -2 || ctx->n_pool == 0) return; /* (a forked child never gets here) */
    int cpu = sched_getcpu();
    if (cpu < 0 || cpu == ctx->pool_off_cpu) return;
    cpu_set_t allowed, one;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    int others[CPU_SETSIZE], n = 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (c != cpu && CPU_ISSET(c, &allowed)) others[n++] = c;
    if (n == 0) return; /* a single allowed CPU: nothing to choose */
    for (int64_t i = 0; i < ctx->n_pool; i++) {
        CPU_ZERO(&one);
        CPU_SET(others[i % n], &one);
        pthread_setaffinity_np(ctx->threads[i], sizeof one, &one);
    }
    ctx->pool_off_cpu = cpu;
}

static void stop_pool(sqk_context *ctx) {
    pthread_mutex_lock(&ctx->mu);
    atomic_store(&ctx->stop, 1);
    pthread_cond_broadcast(&ctx->work_cv);
    pthread_mutex_unlock(&ctx->mu);
    for (int64_t i = 0; i < ctx->n_pool; i++) pthread_join(ctx->threads[i], NULL);
    ctx->n_pool = 0;
}

sqk_context *sqk_context_new(int64_t n_threads) {
    if (n_threads <= 0) n_threads = default_threads();
    if (n_threads > SQK_MAX_THREADS) n_threads = SQK_MAX_THREADS;

    sqk_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->n_threads = n_threads;
    ctx->owner_pid = getpid();
    ctx->error_step = -1;
    const char *aff = getenv("SQK_AFFINITY");
    ctx->pool_off_cpu = aff && strcmp(aff, "0") == 0 ? -2 : -1;
    atomic_flag_clear(&ctx->busy);
    if (pthread_mutex_init(&ctx->mu, NULL) != 0) goto fail_mu;
    if (pthread_cond_init(&ctx->work_cv, NULL) != 0) goto fail_work;
    if (pthread_cond_init(&ctx->done_cv, NULL) != 0) goto fail_done;

    if (n_threads > 1) {
        ctx->threads = calloc((size_t)(n_threads - 1), sizeof *ctx->threads);
        if (!ctx->threads) goto fail_threads;
        /* Pool threads block every signal so that signals (Ctrl-C in Python)
         * go to the application's own threads; they inherit this mask. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int ok = 1;
        for (int64_t i = 0; i < n_threads - 1; i++) {
            if (pthread_create(&ctx->threads[i], NULL, worker_main, ctx) != 0) {
                ok = 0;
                break;
            }
            ctx->n_pool++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (!ok) {
            stop_pool(ctx);
            free(ctx->threads);
            goto fail_threads;
        }
    }
    return ctx;

fail_threads:
    pthread_cond_destroy(&ctx->done_cv);
fail_done:
    pthread_cond_destroy(&ctx->work_cv);
fail_work:
    pthread_mutex_destroy(&ctx->mu);
fail_mu:
    free(ctx);
    return NULL;
}

void sqk_context_free(sqk_context *ctx) {
    if (!ctx) return;
    /* In a forked child the pool threads do not exist: nothing to join. */
    if (ctx->owner_pid == getpid()) stop_pool(ctx);
    free(ctx->threads);
    pthread_cond_destroy(&ctx->done_cv);
    pthread_cond_destroy(&ctx->work_cv);
    pthread_mutex_destroy(&ctx->mu);
    free(ctx->arena);
    free(ctx->bufptr);
    free(ctx->argv);
    free(ctx->prof);
    free(ctx);
}

int64_t sqk_context_threads(const sqk_context *ctx) { return ctx ? ctx->n_threads : 0; }

int64_t sqk_context_error_step(const sqk_context *ctx) { return ctx ? ctx->error_step : -1; }

const char *sqk_error_string(int32_t code) {
    switch (code) {
    case SQK_OK: return "ok";
    case SQK_ERR_NOMEM: return "out of memory";
    case SQK_ERR_THREADS: return "the thread pool is not usable (could not start, or used after fork)";
    case SQK_ERR_ABI: return "program built for another runtime ABI version";
    case SQK_ERR_INDEX: return "index out of range";
    case SQK_ERR_ARGS: return "bad arguments (NULL pointer, short buffer or malformed program)";
    case SQK_ERR_IO: return "file could not be read or written";
    case SQK_ERR_FORMAT: return "input has the wrong dtype, shape or file format";
    case SQK_ERR_CPU: return "the CPU lacks a feature the program needs";
    default: return "unknown error code";
    }
}

/* ---- running a program ---- */

/* Grow a pointer array owned by the context; contents are not kept. */
static int grow_ptrs(void ***p, int64_t *cap, int64_t need) {
    if (need <= *cap) return SQK_OK;
    void **q = malloc((size_t)need * sizeof *q);
    if (!q) return SQK_ERR_NOMEM;
    free(*p);
    *p = q;
    *cap = need;
    return SQK_OK;
}

static int grow_arena(sqk_context *ctx, int64_t need) {
    if (need <= ctx->arena_cap) return SQK_OK;
    void *p = NULL;
    /* Round up so the last tensor may be read a full vector past its end. */
    size_t size = ((size_t)need + SQK_ALIGN - 1) / SQK_ALIGN * SQK_ALIGN;
    if (posix_memalign(&p, SQK_ALIGN, size) != 0) return SQK_ERR_NOMEM;
    free(ctx->arena);
    ctx->arena = p;
    ctx->arena_cap = need;
    return SQK_OK;
}

/* Is [off, off+n) inside [0, size)? Written to be overflow-free. */
static int in_bounds(int64_t off, int64_t n, int64_t size) {
    return off >= 0 && n >= 0 && off <= size && n <= size - off;
}

/* Resolve every buffer to a pointer, checking it lies within what it points into. */
static int32_t resolve_buffers(sqk_context *ctx, const sqk_program *prog, void *const *inputs,
                               void *const *outputs, const void *consts) {
    for (int64_t i = 0; i < prog->n_buffers; i++) {
        const sqk_buffer *b = &prog->buffers[i];
        char *p = NULL;
        switch (b->kind) {
        case SQK_BUF_INPUT:
            if (b->index < 0 || b->index >= prog->n_inputs ||
                b->nbytes > prog->inputs[b->index].nbytes)
                return SQK_ERR_ARGS;
            p = inputs[b->index];
            break;
        case SQK_BUF_OUTPUT:
            if (b->index < 0 || b->index >= prog->n_outputs ||
                b->nbytes > prog->outputs[b->index].nbytes)
                return SQK_ERR_ARGS;
            p = outputs[b->index];
            break;
        case SQK_BUF_CONST:
            if (!in_bounds(b->index, b->nbytes, prog->const_bytes)) return SQK_ERR_ARGS;
            p = consts ? (char *)consts + b->index : NULL;
            break;
        case SQK_BUF_ARENA:
            if (!in_bounds(b->index, b->nbytes, prog->arena_bytes)) return SQK_ERR_ARGS;
            p = ctx->arena ? (char *)ctx->arena + b->index : NULL;
            break;
        default:
            return SQK_ERR_ARGS;
        }
        ctx->bufptr[i] = p;
    }
    return SQK_OK;
}

static int32_t check_tensors(const sqk_tensor_info *t, int64_t n, void *const *ptrs) {
    if (n < 0 || (n > 0 && (!t || !ptrs))) return SQK_ERR_ARGS;
    for (int64_t i = 0; i < n; i++)
        if (!ptrs[i] && t[i].nbytes > 0) return SQK_ERR_ARGS; /* empty tensors may be NULL */
    return SQK_OK;
}

/* Run one step's [0, range) over the pool; returns the first kernel error. */
static int32_t run_step(sqk_context *ctx, const sqk_step *s) {
    int64_t range = s->range, grain = s->grain > 0 ? s->grain : 1;
    int64_t threads = ctx->n_pool + 1;
    if (range <= grain || threads == 1) return s->fn(ctx->argv, 0, range);

    /* A few chunks per thread, taken first come first served: a worker that
     * wakes late (an idle vCPU can take a millisecond) still gets a share
     * instead of leaving the caller the whole step. */
    int64_t parts = threads * SQK_CHUNKS_PER_THREAD;
    int64_t per_part = range / parts + (range % parts != 0); /* ceil */
    int64_t chunk = per_part > grain ? per_part : grain;
    int64_t n_chunks = range / chunk + (range % chunk != 0);
    if (n_chunks == 1) return s->fn(ctx->argv, 0, range);

    keep_pool_off_caller(ctx);
    ctx->fn = s->fn;
    ctx->args = ctx->argv;
    ctx->range = range;
    ctx->chunk = chunk;
    ctx->n_chunks = n_chunks;
    atomic_store_explicit(&ctx->next_chunk, 0, memory_order_relaxed);
    atomic_store_explicit(&ctx->error, SQK_OK, memory_order_relaxed);
    atomic_store(&ctx->finished, 0);
    atomic_store(&ctx->gate, 0); /* open, after the job fields: a joiner reads them */

    /* Publish: the release store orders the job fields before the new generation. */
    pthread_mutex_lock(&ctx->mu);
    atomic_fetch_add_explicit(&ctx->generation, 1, memory_order_release);
    pthread_cond_broadcast(&ctx->work_cv);
    pthread_mutex_unlock(&ctx->mu);

    run_chunks(ctx); /* the caller is a worker too */

    /* No chunk is left: close the gate, then wait for the threads that joined,
     * so none still reads this step's job; the others skip it. */
    int64_t joined = atomic_fetch_or(&ctx->gate, GATE_CLOSED) & ~GATE_CLOSED;
    for (int i = 0; i < SQK_SPIN && atomic_load(&ctx->finished) < joined; i++)
        if ((i & 63) == 63) sched_yield();
    if (atomic_load(&ctx->finished) < joined) {
        pthread_mutex_lock(&ctx->mu);
        while (atomic_load(&ctx->finished) < joined) pthread_cond_wait(&ctx->done_cv, &ctx->mu);
        pthread_mutex_unlock(&ctx->mu);
    }
    return atomic_load(&ctx->error);
}

/* Resolve one step's arguments and run it; range <= 0 skips it. */
static int32_t exec_step(sqk_context *ctx, const sqk_program *prog, const sqk_step *s) {
    if (s->range <= 0) return SQK_OK; /* zero-size range: nothing to do */
    if (!s->fn || s->n_args < 0 || (s->n_args > 0 && !s->args)) return SQK_ERR_ARGS;
    int32_t rc = grow_ptrs(&ctx->argv, &ctx->argv_cap, s->n_args);
    if (rc != SQK_OK) return rc;
    for (int64_t j = 0; j < s->n_args; j++) {
        int64_t id = s->args[j];
        if (id < 0 || id >= prog->n_buffers) return SQK_ERR_ARGS;
        ctx->argv[j] = ctx->bufptr[id];
    }
    return run_step(ctx, s);
}

/* Grow the profile counters to n steps, keeping the old ones, zeroing the new. */
static int32_t grow_profile(sqk_context *ctx, int64_t n) {
    if (n <= ctx->prof_cap) return SQK_OK;
    sqk_step_profile *p = realloc(ctx->prof, (size_t)n * sizeof *p);
    if (!p) return SQK_ERR_NOMEM;
    memset(p + ctx->prof_cap, 0, (size_t)(n - ctx->prof_cap) * sizeof *p);
    ctx->prof = p;
    ctx->prof_cap = n;
    return SQK_OK;
}

static int32_t run_program(sqk_context *ctx, const sqk_program *prog, void *const *inputs,
                           void *const *outputs, const void *consts, int64_t const_bytes) {
    if (!prog) return SQK_ERR_ARGS;
    if (prog->abi_version != SQK_ABI_VERSION) return SQK_ERR_ABI;
    if (ctx->owner_pid != getpid()) return SQK_ERR_THREADS;
    if (prog->n_buffers < 0 || prog->n_steps < 0 || prog->arena_bytes < 0 ||
        prog->const_bytes < 0 || (prog->n_buffers > 0 && !prog->buffers) ||
        (prog->n_steps > 0 && !prog->steps))
        return SQK_ERR_ARGS;
    if (const_bytes < prog->const_bytes || (prog->const_bytes > 0 && !consts)) return SQK_ERR_ARGS;
    int32_t rc = check_tensors(prog->inputs, prog->n_inputs, inputs);
    if (rc == SQK_OK) rc = check_tensors(prog->outputs, prog->n_outputs, outputs);
    if (rc != SQK_OK) return rc;

    if ((rc = grow_arena(ctx, prog->arena_bytes)) != SQK_OK) return rc;
    if ((rc = grow_ptrs(&ctx->bufptr, &ctx->bufptr_cap, prog->n_buffers)) != SQK_OK) return rc;
    if ((rc = resolve_buffers(ctx, prog, inputs, outputs, consts)) != SQK_OK) return rc;

    sqk_step_profile *prof = NULL;
    if (ctx->profile) {
        if ((rc = grow_profile(ctx, prog->n_steps)) != SQK_OK) return rc;
        prof = ctx->prof;
    }
    for (int64_t i = 0; i < prog->n_steps; i++) {
        ctx->error_step = i; /* stays set only if this step fails */
        if (!prof) { /* the only cost of the profile when it is off */
            rc = exec_step(ctx, prog, &prog->steps[i]);
        } else {
            int64_t t0 = now_ns();
            rc = exec_step(ctx, prog, &prog->steps[i]);
            prof[i].ns += now_ns() - t0;
            prof[i].calls++;
        }
        if (rc != SQK_OK) return rc;
    }
    ctx->error_step = -1;
    return SQK_OK;
}

int32_t sqk_run(sqk_context *ctx, const sqk_program *prog, void *const *inputs,
                void *const *outputs, const void *consts, int64_t const_bytes) {
    if (!ctx) return SQK_ERR_ARGS;
    /* Two threads sharing one context would trample its job fields and arena. */
    if (atomic_flag_test_and_set(&ctx->busy)) return SQK_ERR_ARGS;
    ctx->error_step = -1;
    int32_t rc = run_program(ctx, prog, inputs, outputs, consts, const_bytes);
    if (rc == SQK_OK) ctx->error_step = -1;
    atomic_flag_clear(&ctx->busy);
    return rc;
}

int32_t sqk_set_profile(sqk_context *ctx, int64_t on) {
    if (!ctx) return SQK_ERR_ARGS;
    if (atomic_flag_test_and_set(&ctx->busy)) return SQK_ERR_ARGS; /* a run reads the flag */
    if (on && ctx->prof_cap > 0) memset(ctx->prof, 0, (size_t)ctx->prof_cap * sizeof *ctx->prof);
    ctx->profile = on != 0;
    atomic_flag_clear(&ctx->busy);
    return SQK_OK;
}

int32_t sqk_profile(const sqk_context *ctx, int64_t step, sqk_step_profile *out) {
    if (!ctx || !out || step < 0) return SQK_ERR_ARGS;
    if (step < ctx->prof_cap) *out = ctx->prof[step];
    else out->calls = out->ns = 0;
    return SQK_OK;
}

/* ---- f16 conversion helpers for riscv64 ----
 *
 * LLVM lowers f16 <-> f32 conversions (without Zfhmin) to calls of
 * __extendhfsf2 / __truncsfhf2, which compiler-rt and GCC >= 13's libgcc
 * provide but Debian 12's riscv64 libgcc (GCC 12) does not, so a static
 * runner would not link. LLVM's convention on lp64d (seen in its output):
 * the half travels as its 16 bits in the low bits of fa0 (fmv.w.x / fmv.x.w),
 * the float as a normal float. We take and return those bits through a float
 * parameter and never do arithmetic on it. When the toolchain's libgcc has
 * them too, this object's definitions simply win at link time. */
#if defined(__riscv) && defined(__riscv_float_abi_double)
static float f16_bits_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, x;
    if (exp == 0x1f) {
        x = sign | 0x7f800000u | man << 13; /* inf, NaN (payload kept) */
    } else if (exp != 0) {
        x = sign | (exp + 112) << 23 | man << 13; /* normal: rebias 15 -> 127 */
    } else {
        float v = (float)man * 0x1p-24f; /* zero or subnormal, exact */
        memcpy(&x, &v, sizeof x);
        x |= sign;
    }
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static uint32_t f32_to_f16_bits(float f) { /* round to nearest even */
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xff, man = x & 0x7fffffu;
    if (exp == 0xff) return sign | 0x7c00u | (man ? 0x200u | man >> 13 : 0); /* inf, quiet NaN */
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 0x1f) return sign | 0x7c00u; /* overflow to inf */
    if (e <= 0) {                         /* subnormal half or zero */
        if (e < -10) return sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - e), h = man >> shift, rem = man & ((1u << shift) - 1),
                 mid = 1u << (shift - 1);
        return sign | (h + (rem > mid || (rem == mid && (h & 1))));
    }
    uint32_t h = sign | (uint32_t)e << 10 | man >> 13, rem = man & 0x1fffu;
    return h + (rem > 0x1000u || (rem == 0x1000u && (h & 1))); /* a carry may round up to inf: right */
}

float __extendhfsf2(float h);
float __truncsfhf2(float f);

float __extendhfsf2(float h) {
    uint32_t bits;
    memcpy(&bits, &h, sizeof bits);
    return f16_bits_to_f32(bits & 0xffffu);
}

float __truncsfhf2(float f) {
    uint32_t bits = 0xffff0000u | f32_to_f16_bits(f); /* NaN-boxed like a real f16 in an f register */
    float r;
    memcpy(&r, &bits, sizeof r);
    return r;
}
#endif
