/* prefill_mma.cuh: causal prefill attention on tensor cores (mma.sync
 * m16n8k16, fp16 in, fp32 accumulate), flash-attention-2 style, for an fp16
 * cache and head_dim 64 or 128; attention.cu falls back to its fp32 SIMT
 * kernel otherwise. q and the probabilities are rounded to fp16 for the MMAs,
 * as flash attention does; softmax state and outputs stay fp32.
 *
 * grid (ceil(n / 64), heads), 4 warps: warp w owns queries 16w .. 16w + 15 of
 * the block's 64, the blocks with the most keys first. K and V tiles of 64
 * keys are copied into shared memory with cp.async one tile ahead (two
 * stages); each warp computes S = Q Kᵀ (16 x 64, K's fragments by ldmatrix),
 * masks only the tiles that reach past its first query, updates its rows'
 * online softmax in registers, and adds P V (V's fragments by ldmatrix.trans)
 * into its 16 x d output accumulator. */
#pragma once
#include "mma.cuh"

constexpr int MMA_Q = 64, MMA_K = 64, MMA_WARPS = 4;

/* A warp's 16 query rows (this thread's r0 = gid and r1 = gid + 8 of them) in flash-attention
 * style: outputs, running maxima (log2 units) and sums. update takes the scores of KEYS keys,
 * masked and scaled by log2(e), as MMA accumulators, and the KEYS value rows in shared memory
 * (padded rows of D + 8); with SKIP_STILL a warp whose rows' maxima did not move skips the
 * rescale of its outputs. Shared by prefill_mma_kernel and kvq_prefill.cu. */
template <int D> struct fa_rows {
  float o[D / 8][4], m[2], l[2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    m[0] = -INFINITY, m[1] = -INFINITY, l[0] = 0.0f, l[1] = 0.0f;
  }

  template <int KEYS, bool SKIP_STILL>
  __device__ __forceinline__ void update(float (&s)[KEYS / 8][4], const __half *vt, int lane) {
    constexpr int S = D + 8;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; nt++) {
      mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx[0] = fmaxf(mx[0], __shfl_xor_sync(0xffffffffu, mx[0], off));
      mx[1] = fmaxf(mx[1], __shfl_xor_sync(0xffffffffu, mx[1], off));
    }
    /* a row with no visible key yet keeps max -inf: no NaNs */
    const float c[2] = {mx[0] == -INFINITY ? 1.0f : fast_exp2(m[0] - mx[0]),
                        mx[1] == -INFINITY ? 1.0f : fast_exp2(m[1] - mx[1])};
    m[0] = mx[0], m[1] = mx[1];
    const float base[2] = {mx[0] == -INFINITY ? 0.0f : mx[0], mx[1] == -INFINITY ? 0.0f : mx[1]};
    l[0] *= c[0], l[1] *= c[1];
    if (!SKIP_STILL || __any_sync(0xffffffffu, c[0] != 1.0f || c[1] != 1.0f))
#pragma unroll
      for (int i = 0; i < D / 8; i++) o[i][0] *= c[0], o[i][1] *= c[0], o[i][2] *= c[1], o[i][3] *= c[1];
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) s[nt][e] = fast_exp2(s[nt][e] - base[e / 2]);
      l[0] += s[nt][0] + s[nt][1], l[1] += s[nt][2] + s[nt][3];
    }
    /* O += P V: P's accumulator layout is already the A fragment layout */
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; kk++) {
      const uint32_t pa[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                              pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      /* lanes 8i .. 8i + 7 address matrix i: keys + 8 (i % 2), channels + 8 (i / 2) */
      const __half *vr = vt + (kk * 16 + lane % 8 + 8 * (lane / 8 % 2)) * S + 8 * (lane / 16);
#pragma unroll
      for (int np = 0; np < D / 16; np++) { /* two n-tiles of 8 channels */
        uint32_t b[4];
        ldmatrix_x4_trans(b, vr + 16 * np);
        mma_16816(o[2 * np], pa, b[0], b[1]);
        mma_16816(o[2 * np + 1], pa, b[2], b[3]);
      }
    }
  }
};

/* Dynamic shared memory: two stages of a K and a V tile of padded rows. */
template <int D> constexpr size_t prefill_mma_smem() {
  return sizeof(__half) * 2 * 2 * MMA_K * (D + 8);
}

template <int D>
__global__ void __launch_bounds__(MMA_WARPS * 32)
    prefill_mma_kernel(float *out, const float *q, const __half *k_cache, const __half *v_cache,
                       int n, int pos0, int heads, int group, int cap, float scale) {
  constexpr int S = D + 8; /* padded smem rows: the 8 rows an ldmatrix reads hit distinct banks */
  constexpr int TILE = MMA_K * S;
  extern __shared__ __align__(16) __half pf_smem[]; /* [stage][K tile, V tile] */
  const int h = blockIdx.y, t0 = (gridDim.x - 1 - blockIdx.x) * MMA_Q;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane / 4, pair = (lane % 4) * 2;
  const __half *kb = k_cache + (int64_t)(h / group) * cap * D, *vb = v_cache + (int64_t)(h / group) * cap * D;
  const int kend = pos0 + min(n, t0 + MMA_Q); /* keys the block's last query sees */
  const int tiles = (kend + MMA_K - 1) / MMA_K;

  /* Copies tile `tile`'s K and V rows into stage `stage`; rows past kend are zero. */
  auto load_tile = [&](int tile, int stage) {
    __half *ks = pf_smem + stage * 2 * TILE, *vs = ks + TILE;
    const int k0 = tile * MMA_K;
    for (int e = threadIdx.x; e < MMA_K * D / 8; e += MMA_WARPS * 32) {
      const int r = e / (D / 8), c = (e % (D / 8)) * 8;
      if (k0 + r < kend) {
        cp_async16(ks + r * S + c, kb + (int64_t)(k0 + r) * D + c);
        cp_async16(vs + r * S + c, vb + (int64_t)(k0 + r) * D + c);
      } else {
        *reinterpret_cast<uint4 *>(ks + r * S + c) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4 *>(vs + r * S + c) = make_uint4(0, 0, 0, 0);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  load_tile(0, 0);

  /* Rows this thread holds in every fragment: r and r + 8 of the warp's 16. */
  const int qr0 = t0 + warp * 16 + quad, qr1 = qr0 + 8;
  const int qpos0 = pos0 + qr0, qpos1 = pos0 + qr1;
  /* Q as A fragments, scaled by scale * log2(e) so the softmax can use exp2. */
  const float qscale = scale * LOG2E;
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
  fa_rows<D> fa;
  fa.init();
  const int first = pos0 + t0 + warp * 16;           /* the warp's first query position */
  const int last = pos0 + min(n - 1, t0 + warp * 16 + 15); /* and its last */

  for (int tile = 0; tile < tiles; tile++) {
    if (tile + 1 < tiles) {
      load_tile(tile + 1, (tile + 1) & 1); /* its stage was released at the end of tile - 1 */
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads(); /* the tile's rows, copied by every thread, are visible */
    const int k0 = tile * MMA_K;
    if (k0 <= last) {
      const __half *ks = pf_smem + (tile & 1) * 2 * TILE, *vs = ks + TILE;
      float s[MMA_K / 8][4]; /* S = Q Kᵀ, n-tiles of 8 keys */
#pragma unroll
      for (int nt = 0; nt < MMA_K / 8; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kp = 0; kp < D / 32; kp++) { /* two k-steps: channels 32 kp .. + 31 */
          uint32_t b[4];
          ldmatrix_x4(b, ks + (nt * 8 + lane % 8) * S + 32 * kp + 8 * (lane / 8));
          mma_16816(s[nt], qa[2 * kp], b[0], b[1]);
          mma_16816(s[nt], qa[2 * kp + 1], b[2], b[3]);
        }
      }
      /* causal mask, only where the tile reaches past the warp's first query */
      if (k0 + MMA_K - 1 > first) {
#pragma unroll
        for (int nt = 0; nt < MMA_K / 8; nt++) {
          const int j = k0 + nt * 8 + pair;
          if (j > qpos0) s[nt][0] = -INFINITY;
          if (j + 1 > qpos0) s[nt][1] = -INFINITY;
          if (j > qpos1) s[nt][2] = -INFINITY;
          if (j + 1 > qpos1) s[nt][3] = -INFINITY;
        }
      }
      /* every tile rescales: skipping it where no maximum moved (as kvq_prefill.cu does) was
       * 1-2% slower at depth 32k (H100, session 22) */
      fa.template update<MMA_K, false>(s, vs, lane);
    }
    __syncthreads(); /* every warp is done with this stage before it is refilled */
  }
  /* the quad's partial sums, then normalise and store fp32 */
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    fa.l[0] += __shfl_xor_sync(0xffffffffu, fa.l[0], off);
    fa.l[1] += __shfl_xor_sync(0xffffffffu, fa.l[1], off);
  }
#pragma unroll
  for (int nt = 0; nt < D / 8; nt++) {
    const int c = nt * 8 + pair;
    if (qr0 < n) {
      float *dst = out + ((int64_t)qr0 * heads + h) * D + c;
      dst[0] = fa.o[nt][0] / fa.l[0], dst[1] = fa.o[nt][1] / fa.l[0];
    }
    if (qr1 < n) {
      float *dst = out + ((int64_t)qr1 * heads + h) * D + c;
      dst[0] = fa.o[nt][2] / fa.l[1], dst[1] = fa.o[nt][3] / fa.l[1];
    }
  }
}
