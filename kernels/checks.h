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

static inline const char *iq_dtype_name(int dtype) {
  return dtype == IQ_F32 ? "F32" : dtype == IQ_F16 ? "F16" : dtype == IQ_BF16 ? "BF16" : "unknown";
}

/* Whether byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte. */
static inline int iq_overlap(const void *a, uint64_t a_bytes, const void *b, uint64_t b_bytes) {
  uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
  return x < y + b_bytes && y < x + a_bytes;
}

/* An op's output of out_dtype over count elements computed from the fp32 inputs a and b (b may
 * be NULL): the dtype is valid, and a narrow out overlaps neither input (it is written while
 * other threads still read the inputs, at other offsets). */
static inline int iq_check_out(iq_ctx *ctx, const char *op, const void *out, int out_dtype,
                               const float *a, const float *b, int64_t count) {
  if (!iq_valid_dtype(out_dtype))
    return iq_fail(ctx, IQ_ERR_ARG, "%s: bad out dtype %d", op, out_dtype);
  if (out_dtype == IQ_F32) return IQ_OK;
  uint64_t in = (uint64_t)count * 4, narrow = (uint64_t)count * 2;
  if (iq_overlap(out, narrow, a, in) || (b && iq_overlap(out, narrow, b, in)))
    return iq_fail(ctx, IQ_ERR_ARG,
                   "%s: out (%s) overlaps an input; only an F32 out may alias one", op,
                   iq_dtype_name(out_dtype));
  return IQ_OK;
}

/* iq_swiglu and iq_add (out_dtype IQ_F32): out[i] = op(a[i], b[i]) over count elements. */
static inline int iq_check_pairwise(iq_ctx *ctx, const char *op, const void *out, int out_dtype,
                                    const float *a, const float *b, int64_t count) {
  if (!ctx || !out || !a || !b) return iq_fail(ctx, IQ_ERR_ARG, "%s: NULL argument", op);
  if (count <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: count %lld must be positive", op, (long long)count);
  return iq_check_out(ctx, op, out, out_dtype, a, b, count);
}

static inline int iq_check_rmsnorm(iq_ctx *ctx, const void *out, int out_dtype, const float *x,
                                   const float *residual, const float *weight, int n, int dim,
                                   float eps) {
  if (!ctx || !out || !x || !weight) return iq_fail(ctx, IQ_ERR_ARG, "iq_rmsnorm: NULL argument");
  if (n <= 0 || dim <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rmsnorm: n %d and dim %d must be positive", n, dim);
  if (!(eps >= 0.0f)) return iq_fail(ctx, IQ_ERR_ARG, "iq_rmsnorm: eps %g must be >= 0", eps);
  const int64_t count = (int64_t)n * dim;
  const int s = iq_check_out(ctx, "iq_rmsnorm", out, out_dtype, x, residual, count);
  if (s != IQ_OK || !residual) return s;
  /* x is written as well: no fp32 out on it or the residual either, and the two apart */
  const uint64_t in = (uint64_t)count * 4, out_bytes = (uint64_t)count * (out_dtype == IQ_F32 ? 4 : 2);
  if (iq_overlap(out, out_bytes, x, in) || iq_overlap(out, out_bytes, residual, in) ||
      iq_overlap(x, in, residual, in))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rmsnorm: with a residual, out, x and residual overlap");
  return IQ_OK;
}

static inline int iq_check_rope(iq_ctx *ctx, const float *x, const int32_t *pos,
                                const float *inv_freq, const float *pair_scale, int n, int heads,
                                int head_dim, int scale_heads, int scaled_heads) {
  if (!ctx || !x || !pos || !inv_freq) return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: NULL argument");
  if (n <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 2)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_rope: n %d and heads %d must be positive, head_dim %d positive and even", n,
                   heads, head_dim);
  if (pair_scale && (scale_heads <= 0 || scaled_heads <= 0 || scaled_heads > heads ||
                     scaled_heads % scale_heads))
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_rope: scaled_heads %d must be in 1..heads %d and a multiple of scale_heads %d",
                   scaled_heads, heads, scale_heads);
  return IQ_OK;
}

static inline int iq_check_matmul(iq_ctx *ctx, const float *out, const void *x, int x_dtype,
                                  const void *w, int w_dtype, int n, int k, int m) {
  if (!ctx || !out || !x || !w) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: NULL argument");
  if (!iq_valid_dtype(w_dtype))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: bad w dtype %d", w_dtype);
  if (!iq_valid_dtype(x_dtype))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: bad x dtype %d", x_dtype);
  if (x_dtype != IQ_F32 && x_dtype != w_dtype)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: x dtype %s must be F32 or the weights' dtype (%s)",
                   iq_dtype_name(x_dtype), iq_dtype_name(w_dtype));
  if (n <= 0 || k <= 0 || m <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: n %d, k %d and m %d must be positive", n, k, m);
  if ((const void *)out == x) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: out is x");
  return IQ_OK;
}

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

static inline int iq_check_kv_store(iq_ctx *ctx, const void *k_cache, const void *v_cache,
                                    int dtype, const float *k, const float *v, int n, int pos0,
                                    int kv_heads, int head_dim, int cap) {
  if (!ctx || !k_cache || !v_cache || !k || !v)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: NULL argument");
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
