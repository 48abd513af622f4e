/* sqk decode loop (see sqk_llm.h): the host's generate loop in C. */
#include "sqk_llm.h"

#include "sqk_sample.h"

int32_t sqk_llm_decode(sqk_context *ctx, const sqk_program *step, void *const *inputs, void *const *outputs,
                       const void *consts, int64_t const_bytes, int64_t *token, int64_t *pos, const float *logits,
                       int64_t vocab, int64_t max_seq, sqk_sampler *sampler, const int64_t *stop, int64_t n_stop,
                       int64_t remaining, int64_t batch, int64_t *out, int64_t *n_out, int64_t *status,
                       int64_t *scratch_ids, double *scratch_cum) {
    if (!ctx || !step || !token || !pos || !logits || !sampler || !out || !n_out || !status || !scratch_ids ||
        !scratch_cum || (n_stop > 0 && !stop) || vocab < 1 || n_stop < 0 || remaining < 1 || batch < 1)
        return SQK_ERR_ARGS;
    *n_out = 0;
    sqk_rng rng = {sampler->rng_state};
    int32_t rc = SQK_OK;
    for (;;) {
        int64_t tok = sqk_sample(logits, vocab, sampler->temperature, sampler->top_k, sampler->top_p, &rng,
                                 scratch_ids, scratch_cum);
        if (tok < 0) {
            *status = SQK_DECODE_BADLOGITS;
            break;
        }
        int stopped = 0;
        for (int64_t j = 0; j < n_stop; j++) stopped |= stop[j] == tok;
        if (stopped) {
            *status = SQK_DECODE_STOP;
            break;
        }
        out[(*n_out)++] = tok;
        if (--remaining == 0 || *pos >= max_seq) {
            *status = SQK_DECODE_DONE;
            break;
        }
        *token = tok;
        rc = sqk_run(ctx, step, inputs, outputs, consts, const_bytes);
        if (rc != SQK_OK) break;
        ++*pos;
        if (*n_out == batch) {
            *status = SQK_DECODE_BATCH;
            break;
        }
    }
    sampler->rng_state = rng.state;
    return rc;
}
