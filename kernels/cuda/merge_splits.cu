/* merge_splits.cu: the exact merge of the split-K decode kernels' partials
 * (split_softmax.cuh), compiled once for all four of them. */
#include "split_softmax.cuh"

constexpr int MERGE_WARPS = 8;

/* out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M) over the splits;
 * part_acc[split, rows, d], part_ml[split, rows, {max, sum}]. A split that saw
 * no keys has max -inf and adds nothing. grid (rows, ceil(d / 32)): block
 * (h, x) merges channels 32 x .. 32 x + 31 of row h, so a decode step's few
 * rows still spread over the GPU. Warp w takes splits w, w + MERGE_WARPS, ..,
 * lane = the channel. Its first LOADS loads are issued before anything else,
 * so that their trip to L2 overlaps the block finding the row's M and sum
 * (the (max, sum) pairs are a few KB in L2) with the weights e^(m_s - M) in
 * shared memory; splits past those follow four loads at a time, and the warps
 * add up in shared memory. */
template <int LOADS>
static __global__ void __launch_bounds__(MERGE_WARPS * 32)
    merge_splits_kernel(float *out, const float *part_acc, const float *part_ml, int rows, int d,
                        int splits) {
  extern __shared__ float merge_w[]; /* [splits] */
  __shared__ float red[MERGE_WARPS], part[MERGE_WARPS][32];
  const int h = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int c = blockIdx.y * 32 + lane;
  iq_wait_prior(); /* launched early (iq_launch_early): the partials are complete past this */
  const float *acc = part_acc + (int64_t)h * d + c;
  const int64_t stride = (int64_t)rows * d;
  float first[LOADS];
#pragma unroll
  for (int i = 0; i < LOADS; i++) {
    const int s = warp + i * MERGE_WARPS;
    first[i] = c < d && s < splits ? acc[s * stride] : 0.0f;
  }

  float mx = -INFINITY;
  for (int s = tid; s < splits; s += MERGE_WARPS * 32)
    mx = fmaxf(mx, part_ml[((int64_t)s * rows + h) * 2]);
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
  for (int w = 1; w < MERGE_WARPS; w++) mx = fmaxf(mx, red[w]);
  __syncthreads(); /* red is reused below */
  float sum = 0.0f;
  for (int s = tid; s < splits; s += MERGE_WARPS * 32) {
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
  for (int w = 0; w < MERGE_WARPS; w++) sum += red[w];

  float t = 0.0f;
#pragma unroll
  for (int i = 0; i < LOADS; i++) {
    const int s = warp + i * MERGE_WARPS;
    if (s < splits) t += first[i] * merge_w[s];
  }
  float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c < d) {
    int s = warp + LOADS * MERGE_WARPS;
    for (; s + 3 * MERGE_WARPS < splits; s += 4 * MERGE_WARPS)
#pragma unroll
      for (int i = 0; i < 4; i++)
        a[i] += acc[(s + i * MERGE_WARPS) * stride] * merge_w[s + i * MERGE_WARPS];
    for (; s < splits; s += MERGE_WARPS) a[0] += acc[s * stride] * merge_w[s];
  }
  t += (a[0] + a[1]) + (a[2] + a[3]);
  part[warp][lane] = t;
  __syncthreads();
  if (warp == 0 && c < d) {
    float total = 0.0f;
    for (int w = 0; w < MERGE_WARPS; w++) total += part[w][lane];
    out[(int64_t)h * d + c] = total / sum;
  }
}

int merge_splits(iq_ctx *ctx, float *out, const float *part_acc, const float *part_ml, int rows,
                 int d, int splits) {
  const size_t smem = sizeof(float) * (size_t)splits;
  if (smem > 48 * 1024)
    return iq_fail(ctx, IQ_ERR_ARG, "merge_splits: %d splits exceed shared memory", splits);
  /* the loads issued first take a decode step's partials per head at 1k-4k in one trip (32 for
   * fp16, 33-36 quantized), 72 at long contexts */
  void (*fn)(float *, const float *, const float *, int, int, int) =
      splits <= 32 ? merge_splits_kernel<4>
      : splits <= 40 ? merge_splits_kernel<5>
                     : merge_splits_kernel<9>;
  /* on compute capability 9+ the merge launches while the split kernel drains, hiding a
   * launch's latency per decode step */
  return iq_launch_early(ctx, fn, dim3((unsigned)rows, (unsigned)((d + 31) / 32)),
                         dim3(MERGE_WARPS * 32), smem, out, part_acc, part_ml, rows, d, splits);
}
