/* matmul.c: out[n, m] = x[n, k] · w[m, k]ᵀ + bias, weights fp32/fp16/bf16,
 * fp32 accumulate.
 * Decode (n = 1) is a GEMV bound by reading the weights once: each weight row
 * is converted to fp32 in registers and dotted with x.
 * Prefill (n > 1) converts a block of weight rows to fp32 once and dots it with
 * every x row, two at a time, so weights are read once per call, not n times.
 * No -march=native: AVX2+FMA+F16C kernels are picked at run time where the CPU
 * has them, with portable C (vectorized by the compiler) elsewhere. A row's
 * result does not depend on how rows are split among threads.
 * An fp16/bf16 x is widened to fp32 in scratch first (exact), so it gives the
 * bits an fp32 x holding the same values gives. */
#include <immintrin.h>

#include "cpu.h"
#include "../checks.h"

typedef struct {
  float *out;
  const float *x, *bias;
  const void *w;
  int dtype, n, k, m;
  int avx2; /* the CPU has AVX2, FMA and F16C */
} matmul_job;

static const void *w_at(const matmul_job *j, int64_t row, int64_t col) {
  size_t elem = j->dtype == IQ_F32 ? 4 : 2;
  return (const char *)j->w + (row * j->k + col) * (int64_t)elem;
}

static float bias_of(const matmul_job *j, int64_t row) { return j->bias ? j->bias[row] : 0.0f; }

/* Both paths sum k in chunks of K_CHUNK, so decode and prefill give a row the
 * same bits. Prefill converts ROWS weight rows of a chunk to fp32 (16 KiB,
 * stays in L1) while every x row passes (an x slice of 256 rows, 1 MiB, stays
 * in L2). */
#define ROWS 4
#define K_CHUNK 1024

static int chunk_len(const matmul_job *j, int k0) {
  return j->k - k0 < K_CHUNK ? j->k - k0 : K_CHUNK;
}

/* ---- AVX2 + FMA + F16C ---------------------------------------------------- */

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE AVX2 __attribute__((always_inline)) static inline

/* Eight weights from element i of w, as fp32. dtype is a constant after inlining. */
AVX2_INLINE __m256 load8(const void *w, int dtype, int64_t i) {
  const __m128i *h = (const __m128i *)((const uint16_t *)w + i);
  switch (dtype) {
  case IQ_F16: return _mm256_cvtph_ps(_mm_loadu_si128(h));
  case IQ_BF16:
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
  default: return _mm256_loadu_ps((const float *)w + i);
  }
}

AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* w · x with four independent FMA chains, enough to hide FMA latency. Rows
 * are read one after another: interleaving several rows' loads was 4x slower
 * (the hardware prefetcher loses the stream). */
AVX2_INLINE float dot_row(const void *w, int dtype, const float *x, int k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(load8(w, dtype, i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w, dtype, i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w, dtype, i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w, dtype, i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(load8(w, dtype, i), _mm256_loadu_ps(x + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < k; i++) s += iq_load(w, dtype, i) * x[i];
  return s;
}

AVX2_INLINE void gemv_avx2_dtype(const matmul_job *j, int64_t begin, int64_t end, int dtype) {
  for (int64_t r = begin; r < end; r++) {
    float s = 0.0f;
    for (int k0 = 0; k0 < j->k; k0 += K_CHUNK)
      s += dot_row(w_at(j, r, k0), dtype, j->x + k0, chunk_len(j, k0));
    j->out[r] = s + bias_of(j, r);
  }
}

AVX2 static void gemv_avx2(const matmul_job *j, int64_t begin, int64_t end) {
  switch (j->dtype) {
  case IQ_F16: gemv_avx2_dtype(j, begin, end, IQ_F16); break;
  case IQ_BF16: gemv_avx2_dtype(j, begin, end, IQ_BF16); break;
  default: gemv_avx2_dtype(j, begin, end, IQ_F32);
  }
}

/* dot_row of fp32 w with two x rows at once, each weight load serving both;
 * per x row the arithmetic is dot_row's, operation for operation. */
AVX2 static void dot_pair_avx2(const float *w, const float *x, const float *y, int k, float *sx,
                               float *sy) {
  __m256 a[4], b[4];
  for (int c = 0; c < 4; c++) a[c] = b[c] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 32 <= k; i += 32)
    for (int c = 0; c < 4; c++) {
      __m256 v = _mm256_loadu_ps(w + i + 8 * c);
      a[c] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + i + 8 * c), a[c]);
      b[c] = _mm256_fmadd_ps(v, _mm256_loadu_ps(y + i + 8 * c), b[c]);
    }
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_loadu_ps(w + i);
    a[0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + i), a[0]);
    b[0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(y + i), b[0]);
  }
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  float t = hsum(_mm256_add_ps(_mm256_add_ps(b[0], b[1]), _mm256_add_ps(b[2], b[3])));
  for (; i < k; i++) {
    s += w[i] * x[i];
    t += w[i] * y[i];
  }
  *sx = s;
  *sy = t;
}

/* ---- portable C ------------------------------------------------------------ */

#define LANES 16

static float sum_lanes(const float *acc) {
  float s = 0.0f;
  for (int j = 0; j < LANES; j++) s += acc[j];
  return s;
}

/* Independent lanes let the compiler vectorize without reassociating a sum;
 * 16-bit weights are converted 256 at a time into a stack buffer. */
static float dot_portable(const void *w, int dtype, const float *x, int k) {
  float acc[LANES] = {0}, buf[256];
  for (int c = 0; c < k; c += 256) {
    int len = k - c < 256 ? k - c : 256, i = 0;
    const float *wf = (const float *)w + c, *xc = x + c;
    if (dtype != IQ_F32) {
      iq_to_f32(buf, (const uint16_t *)w + c, dtype, len);
      wf = buf;
    }
    for (; i + LANES <= len; i += LANES)
      for (int j = 0; j < LANES; j++) acc[j] += wf[i + j] * xc[i + j];
    for (; i < len; i++) acc[0] += wf[i] * xc[i];
  }
  return sum_lanes(acc);
}

static void gemv_portable(const matmul_job *j, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; r++) {
    float s = 0.0f;
    for (int k0 = 0; k0 < j->k; k0 += K_CHUNK)
      s += dot_portable(w_at(j, r, k0), j->dtype, j->x + k0, chunk_len(j, k0));
    j->out[r] = s + bias_of(j, r);
  }
}

static void dot_pair_portable(const float *w, const float *x, const float *y, int k, float *sx,
                              float *sy) {
  *sx = dot_portable(w, IQ_F32, x, k);
  *sy = dot_portable(w, IQ_F32, y, k);
}

/* ---- the op ---------------------------------------------------------------- */

static void gemv_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const matmul_job *j = arg;
  if (j->avx2) gemv_avx2(j, begin, end);
  else gemv_portable(j, begin, end);
}

static void gemm_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const matmul_job *j = arg;
  float block[ROWS][K_CHUNK];
  for (int64_t r0 = begin; r0 < end; r0 += ROWS) {
    int rows = end - r0 < ROWS ? (int)(end - r0) : ROWS;
    for (int t = 0; t < j->n; t++)
      for (int r = 0; r < rows; r++) j->out[(int64_t)t * j->m + r0 + r] = 0.0f;
    for (int k0 = 0; k0 < j->k; k0 += K_CHUNK) {
      int len = chunk_len(j, k0);
      for (int r = 0; r < rows; r++) iq_to_f32(block[r], w_at(j, r0 + r, k0), j->dtype, len);
      for (int t = 0; t < j->n; t += 2) {
        int u = t + 1 < j->n ? t + 1 : t; /* an odd last row pairs with itself */
        const float *x = j->x + (int64_t)t * j->k + k0, *y = j->x + (int64_t)u * j->k + k0;
        for (int r = 0; r < rows; r++) {
          float sx, sy;
          if (j->avx2) dot_pair_avx2(block[r], x, y, len, &sx, &sy);
          else dot_pair_portable(block[r], x, y, len, &sx, &sy);
          j->out[(int64_t)t * j->m + r0 + r] += sx;
          if (u != t) j->out[(int64_t)u * j->m + r0 + r] += sy;
        }
      }
    }
    for (int t = 0; t < j->n; t++)
      for (int r = 0; r < rows; r++) j->out[(int64_t)t * j->m + r0 + r] += bias_of(j, r0 + r);
  }
}

typedef struct {
  float *dst;
  const uint16_t *src;
  int dtype;
} widen_job;

static void widen_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const widen_job *j = arg;
  iq_to_f32(j->dst + begin, j->src + begin, j->dtype, end - begin);
}

int iq_matmul(iq_ctx *ctx, float *out, const void *x, int x_dtype, const void *w, int w_dtype,
              const float *bias, int n, int k, int m) {
  int s = iq_check_matmul(ctx, out, x, x_dtype, w, w_dtype, n, k, m);
  if (s != IQ_OK) return s;
  if (x_dtype != IQ_F32) { /* widened once; the kernels below read fp32 x */
    int64_t count = (int64_t)n * k;
    void *wide;
    s = iq_scratch(ctx, (size_t)count * sizeof(float), &wide);
    if (s != IQ_OK) return s;
    widen_job widen = {wide, x, x_dtype};
    iq_parallel_for(ctx, count, 65536, widen_range, &widen);
    x = wide;
  }
  int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
  matmul_job job = {out, x, bias, w, w_dtype, n, k, m, avx2};
  /* GEMV: a thread gets at least 64 KiB of weights (about 2 us of work). */
  int64_t row_bytes = (int64_t)k * (w_dtype == IQ_F32 ? 4 : 2);
  int64_t min_rows = (65536 + row_bytes - 1) / row_bytes;
  if (n == 1) iq_parallel_for(ctx, m, min_rows, gemv_range, &job);
  else iq_parallel_for(ctx, m, ROWS, gemm_range, &job);
  return IQ_OK;
}
