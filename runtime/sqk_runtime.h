/* sqk runtime: the contract between compiled kernels, the C runtime and Python.
 *
 * This header is the single source of truth: codegen emits a `sqk_program`
 * with exactly this layout, the runtime (sqk_runtime.c) executes it, and the
 * cffi build reads the declarations between the cdef markers below.
 * Every struct field is 8 bytes wide (int64_t or a pointer) so the LLVM side
 * can emit the same layout on every 64-bit target without padding rules.
 */
#ifndef SQK_RUNTIME_H
#define SQK_RUNTIME_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
#define SQK_ABI_VERSION 1

/* Error codes: kernels and runtime calls return these; Python maps them to exceptions. */
#define SQK_OK 0
#define SQK_ERR_NOMEM 1          /* allocation of the arena or scratch failed */
#define SQK_ERR_THREADS 2        /* the thread pool could not be started (or is used after fork) */
#define SQK_ERR_ABI 3            /* program built for another ABI version */
#define SQK_ERR_INDEX 4          /* an index input (gather ids) was out of range */
#define SQK_ERR_ARGS 5           /* bad arguments to a runtime call (NULL, sizes, context busy) */
#define SQK_ERR_IO 6             /* runner: a file could not be read or written */
#define SQK_ERR_FORMAT 7         /* runner: an input file has the wrong dtype/shape/format */
#define SQK_ERR_CPU 8            /* runner: the CPU lacks a feature the program needs */

/* Where a buffer lives. */
#define SQK_BUF_INPUT 0          /* index = position in the inputs array */
#define SQK_BUF_OUTPUT 1         /* index = position in the outputs array */
#define SQK_BUF_CONST 2          /* index = byte offset into the constants blob */
#define SQK_BUF_ARENA 3          /* index = byte offset into the arena */

/* dtype codes (same numbering as sqk.ir.dtypes) */
#define SQK_F32 0
#define SQK_F16 1
#define SQK_I64 2
#define SQK_I32 3
#define SQK_I8 4
#define SQK_U8 5
#define SQK_BOOL 6
#define SQK_I4 7

/* A kernel processes work items [begin, end) of its range; it returns SQK_OK or an error code. */
typedef int32_t (*sqk_kernel_fn)(void **args, int64_t begin, int64_t end);

typedef struct {
    int64_t kind;                /* SQK_BUF_* */
    int64_t index;               /* see SQK_BUF_* */
    int64_t nbytes;
} sqk_buffer;

typedef struct {
    const char *name;            /* kernel name, for errors and profiles */
    sqk_kernel_fn fn;
    const int64_t *args;         /* buffer ids, in the kernel's argument order */
    int64_t n_args;
    int64_t range;               /* number of work items */
    int64_t grain;               /* minimum work items per thread (>= 1) */
} sqk_step;

typedef struct {
    const char *name;
    int64_t dtype;               /* SQK_F32 ... */
    int64_t rank;
    const int64_t *shape;
    int64_t nbytes;
} sqk_tensor_info;

typedef struct {
    int64_t abi_version;         /* SQK_ABI_VERSION */
    const char *name;
    int64_t n_inputs;
    const sqk_tensor_info *inputs;
    int64_t n_outputs;
    const sqk_tensor_info *outputs;
    int64_t n_buffers;
    const sqk_buffer *buffers;
    int64_t n_steps;
    const sqk_step *steps;
    int64_t arena_bytes;
    int64_t const_bytes;
    int64_t needs_vector;        /* riscv64: 1 when the code uses the V extension */
} sqk_program;

typedef struct sqk_context sqk_context;

/* A context owns a thread pool and an arena; one run at a time per context (a second
 * concurrent sqk_run on the same context returns SQK_ERR_ARGS). n_threads counts the
 * calling thread, which works too: n threads = n-1 pool threads + the caller.
 * n_threads <= 0: $SQK_NUM_THREADS if set, else the number of online CPUs. NULL on failure. */
sqk_context *sqk_context_new(int64_t n_threads);
void sqk_context_free(sqk_context *ctx);
int64_t sqk_context_threads(const sqk_context *ctx);

/* Run every step of `prog` in order. inputs/outputs are arrays of n_inputs/n_outputs
 * pointers to contiguous tensors of the sizes in prog->inputs/outputs; consts points
 * to const_bytes bytes (64-byte aligned). A step's range is split into chunks of
 * max(grain, ceil(range / (4 * threads))) items, which the caller and the pool
 * threads take first come first served; range <= 0 skips the step. Returns SQK_OK
 * or an error code (the first failing kernel's code); on error,
 * sqk_context_error_step() names the step that failed (or -1 if none did). */
int32_t sqk_run(sqk_context *ctx, const sqk_program *prog, void *const *inputs,
                void *const *outputs, const void *consts, int64_t const_bytes);
int64_t sqk_context_error_step(const sqk_context *ctx);
const char *sqk_error_string(int32_t code);

/* Per-step profile: the wall time of each step of sqk_run (monotonic clock around
 * the whole step: dispatch to the pool, every chunk, the wait for the last one).
 * Off by default; when off, a step costs one predictable branch more, nothing per
 * work item. A step skipped for range <= 0 counts a call of 0 ns. */
typedef struct {
    int64_t calls;               /* runs of the step since profiling was turned on */
    int64_t ns;                  /* their summed wall time */
} sqk_step_profile;

/* on != 0: turn profiling on and zero every counter; 0: turn it off (counters kept).
 * SQK_ERR_ARGS while a run is in progress on ctx. With it on, sqk_run grows the
 * counters to the program's step count (SQK_ERR_NOMEM if it cannot). */
int32_t sqk_set_profile(sqk_context *ctx, int64_t on);
/* Counters of step `step` (of the programs run since profiling was turned on) into
 * *out: zeros for a step never timed; SQK_ERR_ARGS for NULL or step < 0. Read
 * between runs (the run's thread updates them without synchronization). */
int32_t sqk_profile(const sqk_context *ctx, int64_t step, sqk_step_profile *out);
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif
