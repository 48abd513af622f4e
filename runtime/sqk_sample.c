/* sqk sampler: the C twin of sqk/llm/sampling.py (see sqk_sample.h and that module's docstring).
 *
 * Bit-exact agreement with Python needs IEEE double arithmetic with no fused multiply-add: GCC
 * contracts a*b+c into an FMA by default wherever the target has one (rv64gc, x86 with -mfma), so
 * contraction is switched off here for GCC and for clang; build with -ffp-contract=off as well
 * when another compiler is used.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "sqk_sample.h"

#include <math.h>
#include <stddef.h>

/* the constants of sampling.py (fdlibm's two-part ln 2; C_n = 1/n!) */
static const double INV_LN2 = 0x1.71547652b82fep+0;
static const double LN2_HI = 0x1.62e42fee00000p-1;
static const double LN2_LO = 0x1.a39ef35793c76p-33;
static const double EXP_COEFFS[13] = {
    1.0 / 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0,
    1.0 / 40320.0, 1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0,
    1.0 / 6227020800.0,
};
static const double EXP_CUTOFF = -700.0;

uint64_t sqk_rng_next(sqk_rng *rng) {
    uint64_t z = (rng->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double sqk_rng_random(sqk_rng *rng) {
    return (double)(sqk_rng_next(rng) >> 11) * 0x1p-53;
}

double sqk_exp_det(double x) {
    if (!(x >= EXP_CUTOFF)) return 0.0;                /* also -inf */
    double k = rint(x * INV_LN2);
    double r = (x - k * LN2_HI) - k * LN2_LO;
    double p = EXP_COEFFS[12];
    for (int i = 11; i >= 0; i--) p = p * r + EXP_COEFFS[i];
    p = p * r + 1.0;
    return ldexp(p, (int)k);
}

/* a before b: larger logit first, ties by lower id (a total order, so any sort agrees) */
static int before(const float *l, int64_t a, int64_t b) {
    return l[a] > l[b] || (l[a] == l[b] && a < b);
}

static void sift_down(const float *l, int64_t *h, int64_t i, int64_t size) {
    for (;;) {
        int64_t best = i, c1 = 2 * i + 1, c2 = 2 * i + 2;
        if (c1 < size && before(l, h[c1], h[best])) best = c1;
        if (c2 < size && before(l, h[c2], h[best])) best = c2;
        if (best == i) return;
        int64_t t = h[i]; h[i] = h[best]; h[best] = t;
        i = best;
    }
}

/* ids[0..k) = the k first ids in `before` order (a heap with the best at the root: k extractions) */
static void top_ids(const float *l, int64_t n, int64_t k, int64_t *ids) {
    for (int64_t i = 0; i < n; i++) ids[i] = i;
    for (int64_t i = n / 2 - 1; i >= 0; i--) sift_down(l, ids, i, n);
    for (int64_t i = 0; i < k; i++) {                   /* the i-th best goes to n-1-i */
        int64_t t = ids[0]; ids[0] = ids[n - 1 - i]; ids[n - 1 - i] = t;
        sift_down(l, ids, 0, n - 1 - i);
    }
    for (int64_t i = 0, j = n - 1; i < j; i++, j--) {   /* reversed: best first */
        int64_t t = ids[i]; ids[i] = ids[j]; ids[j] = t;
    }
}

int64_t sqk_sample(const float *logits, int64_t n, double temperature, int64_t top_k, double top_p,
                   sqk_rng *rng, int64_t *ids, double *cum) {
    if (logits == NULL || n < 1 || !(temperature >= 0.0) || isinf(temperature) || !(top_p <= 1.0))
        return -1;
    int64_t argmax = -1;
    for (int64_t i = 0; i < n; i++) {
        float v = logits[i];
        if (isnan(v) || v == INFINITY) return -1;
        if (v != -INFINITY && (argmax < 0 || v > logits[argmax])) argmax = i;
    }
    if (argmax < 0) return -1;                          /* every logit -inf */
    if (temperature == 0.0) return argmax;
    if (rng == NULL || ids == NULL || cum == NULL) return -1;

    int64_t k = n;                                      /* candidates, in order */
    if (top_k > 0 || top_p > 0.0) {
        if (top_k > 0 && top_k < n) k = top_k;
        top_ids(logits, n, k, ids);
    } else {
        for (int64_t i = 0; i < n; i++) ids[i] = i;
    }
    double m = (double)logits[argmax], c = 0.0;
    for (int64_t j = 0; j < k; j++) {
        c = c + sqk_exp_det(((double)logits[ids[j]] - m) / temperature);
        cum[j] = c;
    }
    int64_t keep = k;
    if (top_p > 0.0) {
        double threshold = top_p * cum[k - 1];
        for (keep = 1; keep < k && !(cum[keep - 1] >= threshold); keep++) {}
    }
    double r = sqk_rng_random(rng) * cum[keep - 1];
    for (int64_t j = 0; j < keep; j++)
        if (cum[j] > r) return ids[j];
    return ids[keep - 1];
}
