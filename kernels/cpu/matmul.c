/* matmul.c: out[n, m] = x[n, k] · w[m, k]ᵀ + bias, weights fp32/fp16/bf16,
 * fp32 accumulate. Decode (n = 1) is a GEMV bound by reading the weights once,
 * so the dot products are written for the compiler to vectorize (16 independent
 * lanes) and cloned for AVX2+FMA with a baseline fallback; no -march=native.
 * Prefill (n > 1) converts a block of weight rows to fp32 once and dots it with
 * every x row, so weights are read once per call, not n times. */
#include <string.h>

#include "cpu.h"

#define LANES 16
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))

static float sum_lanes(const float *acc) {
  float s = 0.0f;
  for (int j = 0; j < LANES; j++) s += acc[j];
  return s;
}

CLONES static float dot_f32(const float *w, const float *x, int k) {
  float acc[LANES] = {0};
  int i = 0;
  for (; i + LANES <= k; i += LANES)
    for (int j = 0; j < LANES; j++) acc[j] += w[i + j] * x[i + j];
  for (; i < k; i++) acc[0] += w[i] * x[i];
  return sum_lanes(acc);
}

CLONES static float dot_f16(const _Float16 *w, const float *x, int k) {
  float acc[LANES] = {0};
  int i = 0;
  for (; i + LANES <= k; i += LANES)
    for (int j = 0; j < LANES; j++) acc[j] += (float)w[i + j] * x[i + j];
  for (; i < k; i++) acc[0] += (float)w[i] * x[i];
  return sum_lanes(acc);
}

CLONES static float dot_bf16(const uint16_t *w, const float *x, int k) {
  float acc[LANES] = {0};
  int i = 0;
  for (; i + LANES <= k; i += LANES)
    for (int j = 0; j < LANES; j++) {
      uint32_t bits = (uint32_t)w[i + j] << 16;
      float f;
      memcpy(&f, &bits, 4);
      acc[j] += f * x[i + j];
    }
  for (; i < k; i++) acc[0] += iq_bf16_to_f32(w[i]) * x[i];
  return sum_lanes(acc);
}

static float dot(const void *w, int dtype, int64_t offset, const float *x, int k) {
  switch (dtype) {
  case IQ_F16: return dot_f16((const _Float16 *)w + offset, x, k);
  case IQ_BF16: return dot_bf16((const uint16_t *)w + offset, x, k);
  default: return dot_f32((const float *)w + offset, x, k);
  }
}

typedef struct {
  float *out;
  const float *x, *bias;
  const void *w;
  int dtype, n, k, m;
} matmul_job;

static void gemv_rows(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const matmul_job *j = arg;
  for (int64_t r = begin; r < end; r++)
    j->out[r] = dot(j->w, j->dtype, r * j->k, j->x, j->k) + (j->bias ? j->bias[r] : 0.0f);
}

/* Weight rows converted per step, and the k-slice they are converted in: a
 * ROWS x K_CHUNK fp32 block (32 KiB) stays in L1/L2 while every x row passes. */
#define ROWS 4
#define K_CHUNK 2048

static void gemm_rows(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const matmul_job *j = arg;
  float block[ROWS][K_CHUNK];
  for (int64_t r0 = begin; r0 < end; r0 += ROWS) {
    int rows = end - r0 < ROWS ? (int)(end - r0) : ROWS;
    for (int t = 0; t < j->n; t++)
      for (int r = 0; r < rows; r++) j->out[(int64_t)t * j->m + r0 + r] = j->bias ? j->bias[r0 + r] : 0.0f;
    for (int k0 = 0; k0 < j->k; k0 += K_CHUNK) {
      int len = j->k - k0 < K_CHUNK ? j->k - k0 : K_CHUNK;
      for (int r = 0; r < rows; r++) {
        size_t elem = j->dtype == IQ_F32 ? 4 : 2;
        iq_to_f32(block[r], (const char *)j->w + ((r0 + r) * (int64_t)j->k + k0) * elem, j->dtype, len);
      }
      for (int t = 0; t < j->n; t++) {
        const float *x = j->x + (int64_t)t * j->k + k0;
        float *out = j->out + (int64_t)t * j->m + r0;
        for (int r = 0; r < rows; r++) out[r] += dot_f32(block[r], x, len);
      }
    }
  }
}

int iq_matmul(iq_ctx *ctx, float *out, const float *x, const void *w, int w_dtype,
              const float *bias, int n, int k, int m) {
  if (!ctx || !out || !x || !w) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: NULL argument");
  if (!iq_valid_dtype(w_dtype)) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: bad w dtype %d", w_dtype);
  if (n <= 0 || k <= 0 || m <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: n %d, k %d and m %d must be positive", n, k, m);
  if ((const void *)out == (const void *)x) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: out is x");
  matmul_job job = {out, x, bias, w, w_dtype, n, k, m};
  if (n == 1) iq_parallel_for(ctx, m, 16, gemv_rows, &job);
  else iq_parallel_for(ctx, m, ROWS, gemm_rows, &job);
  return IQ_OK;
}
