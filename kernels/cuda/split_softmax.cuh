/* split_softmax.cuh: what the split-K decode kernels (attention.cu and
 * decode_mma.cu for the fp16 cache, kvq_attention.cu and kvq_mma.cu for the
 * quantized one) share: each block leaves an unnormalised partial (acc, max,
 * sum) for its chunk of keys, and merge_splits (merge_splits.cu) combines the
 * chunks exactly. */
#ifndef INNERQ_SPLIT_SOFTMAX_CUH
#define INNERQ_SPLIT_SOFTMAX_CUH

#include "cuda.cuh"

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/* Launches the merge of splits partials per row (query head) of d channels: out[rows, d] from
 * part_acc[splits, rows, d] and part_ml[splits, rows, {max, sum}] (max in natural units). */
int merge_splits(iq_ctx *ctx, float *out, const float *part_acc, const float *part_ml, int rows,
                 int d, int splits);

#endif /* INNERQ_SPLIT_SOFTMAX_CUH */
