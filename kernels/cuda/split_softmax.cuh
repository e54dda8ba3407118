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

/* One block per row (a query head): out = sum_s acc_s e^(m_s - M) / sum_s
 * l_s e^(m_s - M) over the splits; part_acc[split, rows, d], part_ml[split,
 * rows, {max, sum}]. A split that saw no keys has max -inf and adds nothing. */
static __global__ void merge_splits_kernel(float *out, const float *part_acc,
                                           const float *part_ml, int rows, int d, int splits) {
  const int h = blockIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < splits; s++) mx = fmaxf(mx, part_ml[((int64_t)s * rows + h) * 2]);
  float sum = 0.0f;
  for (int s = 0; s < splits; s++) {
    const int64_t ph = (int64_t)s * rows + h;
    const float m = part_ml[ph * 2];
    if (m > -INFINITY) sum += part_ml[ph * 2 + 1] * expf(m - mx);
  }
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; s++) {
      const int64_t ph = (int64_t)s * rows + h;
      const float m = part_ml[ph * 2];
      if (m > -INFINITY) a += part_acc[ph * d + c] * expf(m - mx);
    }
    out[(int64_t)h * d + c] = a / sum;
  }
}

#endif /* INNERQ_SPLIT_SOFTMAX_CUH */
