/* attention.c: the KV cache store and causal attention with GQA. Each query
 * is one pass of online softmax over its keys, a block of positions at a time
 * (block max, one rescale of the running sum and weighted value when the max
 * grows), so no scratch grows with the context. Prefill and decode share that
 * routine, so decode at position p gives the same bits as prefill's row for p,
 * at any thread count. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "../checks.h"

#define BLOCK 32 /* positions per block: 32 KiB of fp32 rows at head_dim 256 */
#define GROUP 8  /* query heads sharing one pass over their KV head's rows */
#define LANES 16 /* independent sums, so the dot product vectorizes */

typedef struct {
  float *out;
  const float *q;
  const void *k, *v;
  int dtype, n, pos0, heads, group, head_dim, cap;
  float scale;
  int sub; /* query heads per pass over a KV head, at most GROUP */
} attention_job;

/* GCC 12 converts _Float16 one element at a time even in an AVX2 clone, so
 * fp16 rows go through F16C intrinsics where the CPU has them. */
__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(float *dst, const uint16_t *src,
                                                                 int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
  for (; i < count; i++) dst[i] = iq_f16_to_f32(src[i]);
}

static void load_rows(float *dst, const void *cache, int dtype, int64_t offset, int64_t count) {
  if (dtype == IQ_F32) {
    memcpy(dst, (const float *)cache + offset, (size_t)count * sizeof(float));
  } else if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
    f16_to_f32_f16c(dst, (const uint16_t *)cache + offset, count);
  } else {
    const uint16_t *src = (const uint16_t *)cache + offset;
    for (int64_t i = 0; i < count; i++) dst[i] = iq_f16_to_f32(src[i]);
  }
}

static inline float dot(const float *a, const float *b, int d) {
  float acc[LANES] = {0};
  int i = 0;
  for (; i + LANES <= d; i += LANES)
    for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
  for (; i < d; i++) acc[0] += a[i] * b[i];
  float s = 0.0f;
  for (int j = 0; j < LANES; j++) s += acc[j];
  return s;
}

/* For query t and the g heads h0.. that share one KV head: out = softmax(q ·
 * kᵀ * scale) · v over positions 0 .. pos0 + t. Each K and V block is loaded
 * once for all g heads; each head's arithmetic is the same whatever g is.
 * Both clones compute the same bits: -std=c11 turns off FMA contraction and
 * dot sums its lanes in a fixed order. */
IQ_CLONES static void attend(const attention_job *j, int t, int h0, int g) {
  float acc[GROUP][IQ_MAX_HEAD_DIM], rows[BLOCK * IQ_MAX_HEAD_DIM], s[GROUP][BLOCK];
  float max[GROUP], sum[GROUP];
  int d = j->head_dim, len = j->pos0 + t + 1;
  int64_t base = (int64_t)(h0 / j->group) * j->cap * d;
  const float *q = j->q + ((int64_t)t * j->heads + h0) * d;
  for (int x = 0; x < g; x++) {
    max[x] = -INFINITY;
    sum[x] = 0.0f;
    memset(acc[x], 0, (size_t)d * sizeof(float));
  }
  for (int p0 = 0; p0 < len; p0 += BLOCK) {
    int b = len - p0 < BLOCK ? len - p0 : BLOCK;
    int64_t at = base + (int64_t)p0 * d;
    load_rows(rows, j->k, j->dtype, at, (int64_t)b * d);
    for (int x = 0; x < g; x++) {
      float block_max = -INFINITY;
      for (int r = 0; r < b; r++) {
        s[x][r] = dot(q + x * d, rows + r * d, d) * j->scale;
        if (s[x][r] > block_max) block_max = s[x][r];
      }
      if (block_max > max[x]) { /* rescale what was summed under the old max */
        float c = expf(max[x] - block_max);
        sum[x] *= c;
        for (int i = 0; i < d; i++) acc[x][i] *= c;
        max[x] = block_max;
      }
    }
    load_rows(rows, j->v, j->dtype, at, (int64_t)b * d);
    for (int x = 0; x < g; x++)
      for (int r = 0; r < b; r++) {
        float w = expf(s[x][r] - max[x]);
        sum[x] += w;
        for (int i = 0; i < d; i++) acc[x][i] += w * rows[r * d + i];
      }
  }
  float *out = j->out + ((int64_t)t * j->heads + h0) * d;
  for (int x = 0; x < g; x++)
    for (int i = 0; i < d; i++) out[x * d + i] = acc[x][i] / sum[x];
}

/* Item (k, u) does head sub-group u of queries k and n - 1 - k: causal queries
 * cost more the later they are, so pairing the first with the last balances
 * the equal ranges that iq_parallel_for hands out. */
static void attention_items(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const attention_job *j = arg;
  int per_kv = (j->group + j->sub - 1) / j->sub, units = j->heads / j->group * per_kv;
  for (int64_t item = begin; item < end; item++) {
    int k = (int)(item / units), u = (int)(item % units);
    int first = u % per_kv * j->sub; /* within the group */
    int h0 = u / per_kv * j->group + first;
    int g = j->sub < j->group - first ? j->sub : j->group - first;
    attend(j, k, h0, g);
    if (j->n - 1 - k != k) attend(j, j->n - 1 - k, h0, g);
  }
}

static int attention(iq_ctx *ctx, const char *op, float *out, const float *q, const void *k_cache,
                     const void *v_cache, int cache_dtype, int n, int pos0, int heads,
                     int kv_heads, int head_dim, int cap, float scale) {
  int s = iq_check_attention(ctx, op, out, q, k_cache, v_cache, cache_dtype, n, pos0, heads,
                             kv_heads, head_dim, cap);
  if (s != IQ_OK) return s;
  int group = heads / kv_heads, sub = group < GROUP ? group : GROUP;
  int64_t pairs = ((int64_t)n + 1) / 2;
  /* smaller sub-groups where there would be fewer items than threads */
  while (sub > 1 && pairs * kv_heads * ((group + sub - 1) / sub) < ctx->threads)
    sub = (sub + 1) / 2;
  attention_job job = {out,   q,     k_cache,  v_cache, cache_dtype, n, pos0,
                       heads, group, head_dim, cap,     scale,       sub};
  iq_parallel_for(ctx, pairs * kv_heads * ((group + sub - 1) / sub), 1, attention_items, &job);
  return IQ_OK;
}

int iq_attention_prefill(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                         const void *v_cache, int cache_dtype, int n, int pos0, int heads,
                         int kv_heads, int head_dim, int cap, float scale) {
  return attention(ctx, "iq_attention_prefill", out, q, k_cache, v_cache, cache_dtype, n, pos0,
                   heads, kv_heads, head_dim, cap, scale);
}

int iq_attention_decode(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                        const void *v_cache, int cache_dtype, int pos, int heads, int kv_heads,
                        int head_dim, int cap, float scale) {
  return attention(ctx, "iq_attention_decode", out, q, k_cache, v_cache, cache_dtype, 1, pos,
                   heads, kv_heads, head_dim, cap, scale);
}

typedef struct {
  void *cache[2]; /* keys, values */
  const float *x[2];
  int64_t rows; /* n * kv_heads: rows of each side */
  int dtype, pos0, kv_heads, head_dim, cap;
} store_job;

/* Items are the keys' (token t, kv head h) rows, then the values'. */
static void store_rows(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const store_job *j = arg;
  for (int64_t item = begin; item < end; item++) {
    const int side = item >= j->rows;
    const int64_t row = item - side * j->rows, t = row / j->kv_heads, h = row % j->kv_heads;
    const float *src = j->x[side] + row * j->head_dim;
    int64_t dst = (h * j->cap + j->pos0 + t) * j->head_dim;
    if (j->dtype == IQ_F32) {
      for (int i = 0; i < j->head_dim; i++) ((float *)j->cache[side])[dst + i] = src[i];
    } else {
      for (int i = 0; i < j->head_dim; i++)
        ((uint16_t *)j->cache[side])[dst + i] = iq_f32_to_f16(src[i]);
    }
  }
}

int iq_kv_store(iq_ctx *ctx, void *k_cache, void *v_cache, int cache_dtype, const float *k,
                const float *v, int n, int pos0, int kv_heads, int head_dim, int cap) {
  int s = iq_check_kv_store(ctx, k_cache, v_cache, cache_dtype, k, v, n, pos0, kv_heads, head_dim,
                            cap);
  if (s != IQ_OK) return s;
  const int64_t rows = (int64_t)n * kv_heads;
  store_job job = {{k_cache, v_cache}, {k, v}, rows, cache_dtype, pos0, kv_heads, head_dim, cap};
  /* a decode step's few rows are not worth waking the pool for */
  iq_parallel_for(ctx, 2 * rows, 64, store_rows, &job);
  return IQ_OK;
}
