/* prefill_mma.cuh: causal prefill attention on tensor cores (mma.sync
 * m16n8k16, fp16 in, fp32 accumulate), flash-attention-2 style, for an fp16
 * cache and head_dim 64 or 128; attention.cu falls back to its fp32 SIMT
 * kernel otherwise. q and the probabilities are rounded to fp16 for the MMAs,
 * as flash attention does; softmax state and outputs stay fp32.
 *
 * grid (ceil(n / 64), heads), 4 warps: warp w owns queries 16w .. 16w + 15 of
 * the block's 64. K and V tiles of 64 keys are staged in shared memory; each
 * warp computes S = Q Kᵀ (16 x 64), updates its rows' online softmax in
 * registers, and adds P V into its 16 x d output accumulator. */
#pragma once
#include "mma.cuh"

constexpr int MMA_Q = 64, MMA_K = 64, MMA_WARPS = 4;

/* Two halves at p[0] and p[stride], packed: a B fragment register from V. */
__device__ __forceinline__ uint32_t pack_column(const __half *p, int stride) {
  __half2 h = __halves2half2(p[0], p[stride]);
  return *reinterpret_cast<uint32_t *>(&h);
}

template <int D>
__global__ void __launch_bounds__(MMA_WARPS * 32)
    prefill_mma_kernel(float *out, const float *q, const __half *k_cache, const __half *v_cache,
                       int n, int pos0, int heads, int group, int cap, float scale) {
  constexpr int S = D + 8; /* padded smem rows: the 8 row-reading lanes hit distinct banks */
  __shared__ __align__(16) __half ks[MMA_K * S], vs[MMA_K * S];
  const int h = blockIdx.y, t0 = blockIdx.x * MMA_Q;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane / 4, pair = (lane % 4) * 2;
  const __half *kb = k_cache + (int64_t)(h / group) * cap * D, *vb = v_cache + (int64_t)(h / group) * cap * D;

  /* Rows this thread holds in every fragment: r and r + 8 of the warp's 16. */
  const int qr0 = t0 + warp * 16 + quad, qr1 = qr0 + 8;
  const int qpos0 = pos0 + qr0, qpos1 = pos0 + qr1;
  /* Q as A fragments, scaled by scale * log2(e) so the softmax can use exp2. */
  const float qscale = scale * 1.4426950408889634f;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int ks16 = 0; ks16 < D / 16; ks16++) {
    const int c = ks16 * 16 + pair;
    auto at = [&](int row, int col) {
      return row < n ? q[((int64_t)row * heads + h) * D + col] * qscale : 0.0f;
    };
    qa[ks16][0] = pack_half2(at(qr0, c), at(qr0, c + 1));
    qa[ks16][1] = pack_half2(at(qr1, c), at(qr1, c + 1));
    qa[ks16][2] = pack_half2(at(qr0, c + 8), at(qr0, c + 9));
    qa[ks16][3] = pack_half2(at(qr1, c + 8), at(qr1, c + 9));
  }
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  const int kend = pos0 + min(n, t0 + MMA_Q); /* keys the block's last query sees */
  for (int k0 = 0; k0 < kend; k0 += MMA_K) {
    __syncthreads(); /* the previous tile is consumed */
    for (int e = threadIdx.x; e < MMA_K * D / 8; e += MMA_WARPS * 32) {
      const int r = e / (D / 8), c = (e % (D / 8)) * 8;
      const bool in = k0 + r < kend;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4 *>(ks + r * S + c) =
          in ? *reinterpret_cast<const uint4 *>(kb + (int64_t)(k0 + r) * D + c) : zero;
      *reinterpret_cast<uint4 *>(vs + r * S + c) =
          in ? *reinterpret_cast<const uint4 *>(vb + (int64_t)(k0 + r) * D + c) : zero;
    }
    __syncthreads();
    if (k0 > pos0 + min(n - 1, t0 + warp * 16 + 15)) continue; /* tile past the warp's queries */

    float s[MMA_K / 8][4]; /* S = Q Kᵀ, n-tiles of 8 keys */
#pragma unroll
    for (int nt = 0; nt < MMA_K / 8; nt++) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      const __half *kr = ks + (nt * 8 + quad) * S + pair;
#pragma unroll
      for (int ks16 = 0; ks16 < D / 16; ks16++) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t *>(kr + ks16 * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t *>(kr + ks16 * 16 + 8);
        mma_16816(s[nt], qa[ks16], b0, b1);
      }
    }
    /* causal mask and the tile's row maxima */
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < MMA_K / 8; nt++) {
      const int j = k0 + nt * 8 + pair;
      if (j > qpos0) s[nt][0] = -INFINITY;
      if (j + 1 > qpos0) s[nt][1] = -INFINITY;
      if (j > qpos1) s[nt][2] = -INFINITY;
      if (j + 1 > qpos1) s[nt][3] = -INFINITY;
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    /* A row with no visible key yet (only rows past n) keeps max -inf: no NaNs. */
    const float c0 = mx0 == -INFINITY ? 1.0f : exp2f(m0 - mx0);
    const float c1 = mx1 == -INFINITY ? 1.0f : exp2f(m1 - mx1);
    m0 = mx0, m1 = mx1;
    const float base0 = mx0 == -INFINITY ? 0.0f : mx0, base1 = mx1 == -INFINITY ? 0.0f : mx1;
    l0 *= c0, l1 *= c1;
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] *= c0, o[i][1] *= c0, o[i][2] *= c1, o[i][3] *= c1;
#pragma unroll
    for (int nt = 0; nt < MMA_K / 8; nt++) {
      s[nt][0] = exp2f(s[nt][0] - base0), s[nt][1] = exp2f(s[nt][1] - base0);
      s[nt][2] = exp2f(s[nt][2] - base1), s[nt][3] = exp2f(s[nt][3] - base1);
      l0 += s[nt][0] + s[nt][1], l1 += s[nt][2] + s[nt][3];
    }
    /* O += P V: P's accumulator layout is already the A fragment layout */
#pragma unroll
    for (int kk = 0; kk < MMA_K / 16; kk++) {
      const uint32_t pa[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                              pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const __half *vr = vs + (kk * 16 + pair) * S + quad;
#pragma unroll
      for (int nt = 0; nt < D / 8; nt++) {
        const uint32_t b0 = pack_column(vr + nt * 8, S), b1 = pack_column(vr + 8 * S + nt * 8, S);
        mma_16816(o[nt], pa, b0, b1);
      }
    }
  }
  /* the quad's partial sums, then normalise and store fp32 */
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
#pragma unroll
  for (int nt = 0; nt < D / 8; nt++) {
    const int c = nt * 8 + pair;
    if (qr0 < n) {
      float *dst = out + ((int64_t)qr0 * heads + h) * D + c;
      dst[0] = o[nt][0] / l0, dst[1] = o[nt][1] / l0;
    }
    if (qr1 < n) {
      float *dst = out + ((int64_t)qr1 * heads + h) * D + c;
      dst[0] = o[nt][2] / l1, dst[1] = o[nt][3] / l1;
    }
  }
}
