/* sqk sampler: the C twin of sqk/llm/sampling.py, for the runner's generate mode.
 *
 * sqk_sample() draws the same token as sampling.sample() for the same logits, arguments and
 * generator state, bit for bit, on any IEEE-754 machine (the algorithm, step by step, is the
 * docstring of llm/sampling.py). tests/test_sampling.py compiles this file for the host and
 * for riscv64 (under qemu) and holds both against Python.
 */
#ifndef SQK_SAMPLE_H
#define SQK_SAMPLE_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* SplitMix64: state starts at the seed; sampling.Rng */
typedef struct {
    uint64_t state;
} sqk_rng;

uint64_t sqk_rng_next(sqk_rng *rng);        /* one 64-bit draw */
double sqk_rng_random(sqk_rng *rng);        /* (draw >> 11) * 2^-53, in [0, 1) */
double sqk_exp_det(double x);               /* sampling.exp_det: exp for x <= 0, bit-exact */

/* The next token of logits[0..n). temperature 0: argmax (rng untouched). top_k <= 0: no top-k;
 * top_p <= 0: no top-p (Python's None; a valid p is in (0, 1]). ids (n int64) and cum (n double)
 * are scratch space of the caller. Returns the token id, or -1 for bad arguments (n < 1, NULL,
 * temperature < 0 or not finite, top_p > 1, a NaN or +inf logit, every logit -inf). */
int64_t sqk_sample(const float *logits, int64_t n, double temperature, int64_t top_k, double top_p,
                   sqk_rng *rng, int64_t *ids, double *cum);

#ifdef __cplusplus
}
#endif
#endif
