/* checks.h: argument checks both backends share, so a bad call fails the same
 * way, with the same message, on each. Include after the backend's header
 * (cpu.h or cuda.cuh), which declares iq_fail. */
#ifndef INNERQ_CHECKS_H
#define INNERQ_CHECKS_H

#include <math.h>

#include "innerq.h"

#define IQ_MAX_HEAD_DIM 256
/* iq_sample's failure token -(4 * id + reason) must fit an int32 */
#define IQ_SAMPLE_MAX_VOCAB (1 << 29)

static inline int iq_check_attention(iq_ctx *ctx, const char *op, const void *out, const void *q,
                                     const void *k, const void *v, int dtype, int n, int pos0,
                                     int heads, int kv_heads, int head_dim, int cap) {
  if (!ctx || !out || !q || !k || !v) return iq_fail(ctx, IQ_ERR_ARG, "%s: NULL argument", op);
  if (dtype != IQ_F16 && dtype != IQ_F32)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: cache dtype %d is not F16 or F32", op, dtype);
  if (n <= 0 || heads <= 0 || kv_heads <= 0 || cap <= 0 || head_dim <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: sizes must be positive", op);
  if (head_dim > IQ_MAX_HEAD_DIM)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: head_dim %d exceeds %d", op, head_dim, IQ_MAX_HEAD_DIM);
  if (heads % kv_heads)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: heads %d not a multiple of kv_heads %d", op, heads,
                   kv_heads);
  if (pos0 < 0 || (int64_t)pos0 + n > cap)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: positions %d..%lld outside a %d-token cache", op, pos0,
                   (long long)pos0 + n - 1, cap);
  return IQ_OK;
}

static inline int iq_check_kv_store(iq_ctx *ctx, const void *cache, int dtype, const float *x,
                                    int n, int pos0, int kv_heads, int head_dim, int cap) {
  if (!ctx || !cache || !x) return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: NULL argument");
  if (dtype != IQ_F16 && dtype != IQ_F32)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: cache dtype %d is not F16 or F32", dtype);
  if (n <= 0 || kv_heads <= 0 || head_dim <= 0 || cap <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: sizes must be positive");
  if (pos0 < 0 || (int64_t)pos0 + n > cap)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: positions %d..%lld outside a %d-token cache",
                   pos0, (long long)pos0 + n - 1, cap);
  return IQ_OK;
}

static inline int iq_check_sample(iq_ctx *ctx, const int32_t *out_token, const float *logits,
                                  int vocab, const int32_t *history, int n_history,
                                  float repeat_penalty, float temperature, int top_k, float top_p,
                                  float min_p, float uniform) {
  if (!ctx || !out_token || !logits || (n_history > 0 && !history))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_sample: NULL argument");
  if (vocab <= 0 || vocab > IQ_SAMPLE_MAX_VOCAB || n_history < 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_sample: vocab %d must be in 1..2^29, n_history %d >= 0",
                   vocab, n_history);
  if (!(repeat_penalty > 0.0f && isfinite(repeat_penalty)) || !(temperature < INFINITY) ||
      top_k < 0 || !(top_p > 0.0f && top_p <= 1.0f) || !(min_p >= 0.0f && min_p <= 1.0f) ||
      !(uniform >= 0.0f && uniform < 1.0f))
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_sample: repeat_penalty %g, temperature %g, top_k %d, top_p %g, min_p %g or "
                   "uniform %g out of range",
                   repeat_penalty, temperature, top_k, top_p, min_p, uniform);
  return IQ_OK;
}

#endif /* INNERQ_CHECKS_H */
