/* sqk decode loop: an LLM decoder's generate loop on the host, in C (runtime/sqk_llm.c).
 *
 * Decoder.generate (llm/decoder.py, through llm/native.py) prefills the prompt from Python
 * (one call per chunk), then hands the token-by-token loop to sqk_llm_decode: draw the next
 * token from the logits with sqk_sample (runtime/sqk_sample.c, the C twin of
 * llm/sampling.py: the same ids as the Python loop), run the one-token step program on it,
 * repeat. Python is off the per-token path; it is called back between batches of tokens
 * (streaming) only. Built into the cffi runtime beside sqk_runtime.c; the cffi build reads
 * the declarations between the cdef markers.
 */
#ifndef SQK_LLM_H
#define SQK_LLM_H
#include "sqk_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
/* How the next token is drawn (llm/sampling.py's sample arguments). */
typedef struct {
    double temperature; /* 0: greedy (argmax, ties to the lowest id; the generator is not used) */
    int64_t top_k;      /* <= 0: no top-k (Python's None) */
    double top_p;       /* <= 0: no top-p (Python's None); else in (0, 1] */
    uint64_t rng_state; /* SplitMix64 state (sampling.Rng.state), advanced by every draw */
} sqk_sampler;

/* What ended a call of sqk_llm_decode (*status). */
#define SQK_DECODE_BATCH 0   /* `batch` tokens drawn and run through the step: call again */
#define SQK_DECODE_DONE 1    /* `remaining` reached 0, or the KV cache is full (*pos == max_seq) */
#define SQK_DECODE_STOP 2    /* a token of `stop` was drawn (not emitted, not run) */
#define SQK_DECODE_BADLOGITS 3 /* the logits cannot be sampled (NaN, +inf or every one -inf) */

/* Up to `batch` steps of a generation. `step` is the one-token decoder program, run with
 * the pointer arrays inputs/outputs as sqk_run takes them; its token input points at
 * *token, its position input at *pos, and its logits output at logits[0..vocab); every
 * state (KV cache) output is its input's memory, updated in place. Each iteration: draw a
 * token from logits (sqk_sample with *sampler); a token of stop[0..n_stop) ends the call
 * (SQK_DECODE_STOP); otherwise it is appended to out (*n_out counts them, from 0 in this
 * call) and `remaining` (tokens the generation may still emit) drops by one; at 0, or when
 * *pos >= max_seq, the call ends (SQK_DECODE_DONE) without running the step; else the step
 * runs on the token at *pos, *pos advances, and after `batch` tokens the call ends
 * (SQK_DECODE_BATCH). scratch_ids and scratch_cum hold vocab entries each.
 * Returns SQK_OK, a sqk_run error code (sqk_context_error_step names the failing step; the
 * tokens drawn before it are in out), or SQK_ERR_ARGS for bad arguments. */
int32_t sqk_llm_decode(sqk_context *ctx, const sqk_program *step, void *const *inputs, void *const *outputs,
                       const void *consts, int64_t const_bytes, int64_t *token, int64_t *pos, const float *logits,
                       int64_t vocab, int64_t max_seq, sqk_sampler *sampler, const int64_t *stop, int64_t n_stop,
                       int64_t remaining, int64_t batch, int64_t *out, int64_t *n_out, int64_t *status,
                       int64_t *scratch_ids, double *scratch_cum);
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif
