/* split_softmax.cuh: what the split-K decode kernels (attention.cu for the
 * fp16 cache, kvq_attention.cu for the quantized one) share: each block
 * leaves an unnormalised partial (acc, max, sum) for its chunk of keys, and
 * merge_splits_kernel combines the chunks exactly. */
#ifndef INNERQ_SPLIT_SOFTMAX_CUH
#define INNERQ_SPLIT_SOFTMAX_CUH

#include "cuda.cuh"

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

constexpr int MERGE_THREADS = 512;

/* One block per row (a query head): out = sum_s acc_s e^(m_s - M) / sum_s
 * l_s e^(m_s - M) over the splits; part_acc[split, rows, d], part_ml[split,
 * rows, {max, sum}]. A split that saw no keys has max -inf and adds nothing.
 * The weights e^(m_s - M) go to shared memory first; then MERGE_THREADS / d
 * groups of d threads take every group-th split, four loads in flight each
 * (a row's partials are read from L2, and with hundreds of splits the
 * latency of one load after another would dominate), and add up in shared
 * memory. */
static __global__ void __launch_bounds__(MERGE_THREADS)
    merge_splits_kernel(float *out, const float *part_acc, const float *part_ml, int rows, int d,
                        int splits) {
  extern __shared__ float merge_w[]; /* [splits], then [groups][d] */
  __shared__ float red[MERGE_THREADS / 32];
  const int h = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float mx = -INFINITY;
  for (int s = tid; s < splits; s += MERGE_THREADS)
    mx = fmaxf(mx, part_ml[((int64_t)s * rows + h) * 2]);
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
  for (int w = 1; w < MERGE_THREADS / 32; w++) mx = fmaxf(mx, red[w]);
  __syncthreads(); /* red is reused below */
  float sum = 0.0f;
  for (int s = tid; s < splits; s += MERGE_THREADS) {
    const int64_t ph = (int64_t)s * rows + h;
    const float m = part_ml[ph * 2];
    const float w = m > -INFINITY ? expf(m - mx) : 0.0f;
    merge_w[s] = w;
    sum += part_ml[ph * 2 + 1] * w;
  }
  sum = iq_warp_sum(sum);
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  sum = 0.0f;
  for (int w = 0; w < MERGE_THREADS / 32; w++) sum += red[w];

  const int groups = MERGE_THREADS / d, g = tid / d, c = tid % d;
  float *part = merge_w + splits; /* [groups][d] */
  if (g < groups) {
    const float *acc = part_acc + (int64_t)h * d + c;
    const int64_t stride = (int64_t)rows * d;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int s = g;
    for (; s + 3 * groups < splits; s += 4 * groups)
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] += acc[(s + i * groups) * stride] * merge_w[s + i * groups];
    for (; s < splits; s += groups) a[0] += acc[s * stride] * merge_w[s];
    part[g * d + c] = (a[0] + a[1]) + (a[2] + a[3]);
  }
  __syncthreads();
  if (tid < d) {
    float total = 0.0f;
    for (int i = 0; i < groups; i++) total += part[i * d + tid];
    out[(int64_t)h * d + tid] = total / sum;
  }
}

/* Launches merge_splits_kernel over rows (query heads) of d <= 256 channels. */
static inline int merge_splits(iq_ctx *ctx, float *out, const float *part_acc,
                               const float *part_ml, int rows, int d, int splits) {
  const size_t smem = sizeof(float) * ((size_t)splits + (size_t)MERGE_THREADS / d * d);
  if (smem > 48 * 1024)
    return iq_fail(ctx, IQ_ERR_ARG, "merge_splits: %d splits of %d channels exceed shared memory",
                   splits, d);
  merge_splits_kernel<<<rows, MERGE_THREADS, smem, ctx->stream>>>(out, part_acc, part_ml, rows, d,
                                                                  splits);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

#endif /* INNERQ_SPLIT_SOFTMAX_CUH */
