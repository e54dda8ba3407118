/* attention.c: the KV cache store and causal attention with GQA. Each query
 * is one pass of online softmax over its keys (running max, sum and weighted
 * value, rescaled when the max grows), so no scratch grows with the context;
 * prefill and decode share that routine, so decode at position p gives the
 * same bits as prefill's row for p. */
#include <math.h>

#include "cpu.h"

#define MAX_HEAD_DIM 256

typedef struct {
  float *out;
  const float *q;
  const void *k, *v;
  int dtype, pos0, heads, group, head_dim, cap;
  float scale;
} attention_job;

static void load_row(float *dst, const void *cache, int dtype, int64_t offset, int head_dim) {
  if (dtype == IQ_F16) iq_to_f32(dst, (const uint16_t *)cache + offset, IQ_F16, head_dim);
  else iq_to_f32(dst, (const float *)cache + offset, IQ_F32, head_dim);
}

/* out = softmax(q · k[0..len)ᵀ * scale) · v[0..len) for one head. */
static void attend(float *out, const float *q, const attention_job *j, int64_t base, int len) {
  float acc[MAX_HEAD_DIM] = {0}, row[MAX_HEAD_DIM];
  float max = -INFINITY, sum = 0.0f;
  int d = j->head_dim;
  for (int p = 0; p < len; p++) {
    load_row(row, j->k, j->dtype, base + (int64_t)p * d, d);
    float s = 0.0f;
    for (int i = 0; i < d; i++) s += q[i] * row[i];
    s *= j->scale;
    if (s > max) { /* rescale what was summed under the old max */
      float c = expf(max - s);
      sum *= c;
      for (int i = 0; i < d; i++) acc[i] *= c;
      max = s;
    }
    float w = expf(s - max);
    sum += w;
    load_row(row, j->v, j->dtype, base + (int64_t)p * d, d);
    for (int i = 0; i < d; i++) acc[i] += w * row[i];
  }
  for (int i = 0; i < d; i++) out[i] = acc[i] / sum;
}

/* Items are (query t, head h) pairs, t-major. */
static void attention_items(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const attention_job *j = arg;
  for (int64_t item = begin; item < end; item++) {
    int t = (int)(item / j->heads), h = (int)(item % j->heads);
    int64_t row = item * j->head_dim;
    int64_t base = (int64_t)(h / j->group) * j->cap * j->head_dim;
    attend(j->out + row, j->q + row, j, base, j->pos0 + t + 1);
  }
}

static int check(iq_ctx *ctx, const char *op, const float *out, const float *q, const void *k,
                 const void *v, int dtype, int n, int pos0, int heads, int kv_heads, int head_dim,
                 int cap) {
  if (!ctx || !out || !q || !k || !v) return iq_fail(ctx, IQ_ERR_ARG, "%s: NULL argument", op);
  if (dtype != IQ_F16 && dtype != IQ_F32)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: cache dtype %d is not F16 or F32", op, dtype);
  if (n <= 0 || heads <= 0 || kv_heads <= 0 || cap <= 0 || head_dim <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: sizes must be positive", op);
  if (head_dim > MAX_HEAD_DIM)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: head_dim %d exceeds %d", op, head_dim, MAX_HEAD_DIM);
  if (heads % kv_heads)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: heads %d not a multiple of kv_heads %d", op, heads, kv_heads);
  if (pos0 < 0 || (int64_t)pos0 + n > cap)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: positions %d..%d outside a %d-token cache", op, pos0,
                   pos0 + n - 1, cap);
  return IQ_OK;
}

int iq_attention_prefill(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                         const void *v_cache, int cache_dtype, int n, int pos0, int heads,
                         int kv_heads, int head_dim, int cap, float scale) {
  int s = check(ctx, "iq_attention_prefill", out, q, k_cache, v_cache, cache_dtype, n, pos0, heads,
                kv_heads, head_dim, cap);
  if (s != IQ_OK) return s;
  attention_job job = {out,  q,     k_cache,         v_cache,  cache_dtype, pos0,
                       heads, heads / kv_heads, head_dim, cap,   scale};
  iq_parallel_for(ctx, (int64_t)n * heads, 1, attention_items, &job);
  return IQ_OK;
}

int iq_attention_decode(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                        const void *v_cache, int cache_dtype, int pos, int heads, int kv_heads,
                        int head_dim, int cap, float scale) {
  int s = check(ctx, "iq_attention_decode", out, q, k_cache, v_cache, cache_dtype, 1, pos, heads,
                kv_heads, head_dim, cap);
  if (s != IQ_OK) return s;
  attention_job job = {out,  q,     k_cache,         v_cache,  cache_dtype, pos,
                       heads, heads / kv_heads, head_dim, cap,   scale};
  iq_parallel_for(ctx, heads, 1, attention_items, &job);
  return IQ_OK;
}

int iq_kv_store(iq_ctx *ctx, void *cache, int cache_dtype, const float *x, int n, int pos0,
                int kv_heads, int head_dim, int cap) {
  if (!ctx || !cache || !x) return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: NULL argument");
  if (cache_dtype != IQ_F16 && cache_dtype != IQ_F32)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: cache dtype %d is not F16 or F32", cache_dtype);
  if (n <= 0 || kv_heads <= 0 || head_dim <= 0 || cap <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: sizes must be positive");
  if (pos0 < 0 || (int64_t)pos0 + n > cap)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: positions %d..%d outside a %d-token cache", pos0,
                   pos0 + n - 1, cap);
  for (int t = 0; t < n; t++)
    for (int h = 0; h < kv_heads; h++) {
      const float *src = x + ((int64_t)t * kv_heads + h) * head_dim;
      int64_t dst = ((int64_t)h * cap + pos0 + t) * head_dim;
      if (cache_dtype == IQ_F32) {
        for (int i = 0; i < head_dim; i++) ((float *)cache)[dst + i] = src[i];
      } else {
        for (int i = 0; i < head_dim; i++) ((uint16_t *)cache)[dst + i] = iq_f32_to_f16(src[i]);
      }
    }
  return IQ_OK;
}
