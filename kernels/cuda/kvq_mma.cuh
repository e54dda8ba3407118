/* kvq_mma.cuh: the InnerQ layout's quantized tiles on tensor cores (included
 * by kvq_attention.cu, which keeps the fp16 positions and the other layouts).
 *
 * Same grid and tiles as the SIMT kernel, for keys grouped over channels and
 * values over tokens, 2/4/8-bit codes, head_dim 64 or 128, groups of >= 32
 * and up to 16 query heads per KV head (the MMA's 16 rows; unused rows are
 * zero). mma.sync m16n8k16 does the multiplies that cost the SIMT kernel G
 * fused multiply-adds per code, and codes become fp16 B fragments with about
 * one operation per code: OR-ing a code into the mantissa of 1024.0 gives
 * 1024 + code exactly, so a pair of codes is one mask of a word (codes i and
 * i + 4 of 8, for 4 bits). The MMA's k order is permuted to match (in each
 * 32-channel stretch lane q holds channels 8q .. 8q + 7), q's A fragments
 * are built in the same order, and the 1024s come off in the fold:
 *   scores: per key group, D = Q_g · (1024 + codes_g), then score += scale ·
 *           (D - 1024 Σ_g fp16(q)) + offset · Σ_g q, per token and head;
 *   values: per block of tokens, D = P_b · (1024 + codes_b), then out +=
 *           scale · (D - 1024 Σ_b fp16(p)) + offset · Σ_b p.
 * q and p are rounded to fp16 for the MMAs (as flash attention does); the
 * folds, softmax and outputs stay fp32. */
#pragma once
#include "prefill_mma.cuh"

constexpr int KM_ROWS = 16; /* query heads per block: the MMA's M */

/* Codes first .. first + 7 (first a multiple of 8) as four half2 registers
 * of 1024 + code: register i holds codes first + i and first + i + 4. */
template <int BITS>
__device__ __forceinline__ void code_pairs(const uint32_t *row, int first, uint32_t out[4]) {
  if constexpr (BITS == 4) {
    const uint32_t w = row[first / 8];
#pragma unroll
    for (int i = 0; i < 4; i++) out[i] = ((w >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
  } else if constexpr (BITS == 2) {
    const uint32_t x = row[first / 16] >> (first % 16 * 2); /* codes at bits 2i */
    const uint32_t y = (x & 0xFFFFu) | (x << 8);             /* code i + 4 now at 16 + 2i */
#pragma unroll
    for (int i = 0; i < 4; i++) out[i] = ((y >> (2 * i)) & 0x00030003u) | 0x64006400u;
  } else {
    const uint32_t w0 = row[first / 4], w1 = row[first / 4 + 1];
#pragma unroll
    for (int i = 0; i < 4; i++)
      out[i] = (__byte_perm(w0, w1, i | (4 + i) << 8) & 0x00FF00FFu) | 0x64006400u;
  }
}

/* The channel (or token) of k-step j's register r (0: k = 2q, 2q + 1; 1: k =
 * 2q + 8, 2q + 9), element e, for lane q: the order code_pairs delivers. */
__device__ __forceinline__ int mma_k_index(int j, int q, int r, int e) {
  return j / 2 * 32 + 8 * q + 2 * (j % 2) + r + 4 * e;
}

/* Whether the tensor-core kernel serves these parameters and this GQA group. */
static bool kvq_mma_serves(const iq_kvq_params &p, int group) {
  const auto bits_ok = [](int b) { return b == 2 || b == 4 || b == 8; };
  return p.k_axis == IQ_AXIS_CHANNELS && p.v_axis == IQ_AXIS_TOKENS && bits_ok(p.k_bits) &&
         bits_ok(p.v_bits) && (p.head_dim == 64 || p.head_dim == 128) && p.k_group >= 32 &&
         p.v_group >= 32 && group <= KM_ROWS;
}

/* grid (kv_heads, qsplits, n): quantized split blockIdx.y + 1 of query blockIdx.z. */
template <int KB, int VB, int D>
__global__ void __launch_bounds__(KQ_THREADS) kvq_mma_kernel(kq_args a) {
  extern __shared__ __align__(16) uint32_t kq_smem[];
  constexpr int NT = D / 32; /* value n-tiles of 8 channels per warp */
  const iq_kvq_params &p = a.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int quad = lane / 4, qp = (lane % 4) * 2;
  const int kvh = blockIdx.x, h0 = kvh * a.group, nh = a.group, t = blockIdx.z;
  const int split = blockIdx.y + 1;
  const int64_t len = (int64_t)a.pos0 + t + 1, nq = kvq_quantized(&p, len);
  const kq_stage st = kq_stage_of(p);
  const int gk = p.k_group, groups = D / gk, b = kvq_block(&p), blocks_per_tile = KVQ_TILE / b;

  float *p_s = reinterpret_cast<float *>(kq_smem); /* [16][KVQ_TILE] scores, then weights */
  float *qsum_s = p_s + KM_ROWS * KVQ_TILE;      /* [16][groups] Σ q, then Σ fp16(q) */
  float *psum_s = qsum_s + 2 * KM_ROWS * (D / 32); /* [16][blocks] Σ p, then Σ fp16(p) */
  uint32_t *stage0 = reinterpret_cast<uint32_t *>(psum_s + 2 * KM_ROWS * (KVQ_TILE / 32));
  __shared__ float red[KM_ROWS][KQ_WARPS], m_s[KM_ROWS], l_s[KM_ROWS], corr_s[KM_ROWS];

  /* q times the softmax scale, staged in p_s (coalesced) for the fragments and sums */
  for (int i = tid; i < KM_ROWS * D; i += KQ_THREADS) {
    const int r = i / D;
    p_s[i] = r < nh ? a.q[((int64_t)t * a.heads + h0 + r) * D + i % D] * a.scale : 0.0f;
  }
  __syncthreads();
  const auto qv = [&](int r, int c) { return p_s[r * D + c]; };
  const int q4 = lane % 4;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int j = 0; j < D / 16; j++) {
    const int c0 = mma_k_index(j, q4, 0, 0), c4 = mma_k_index(j, q4, 0, 1);
    const int c1 = mma_k_index(j, q4, 1, 0), c5 = mma_k_index(j, q4, 1, 1);
    qa[j][0] = pack_half2(qv(quad, c0), qv(quad, c4));
    qa[j][1] = pack_half2(qv(quad + 8, c0), qv(quad + 8, c4));
    qa[j][2] = pack_half2(qv(quad, c1), qv(quad, c5));
    qa[j][3] = pack_half2(qv(quad + 8, c1), qv(quad + 8, c5));
  }
  float *q16sum_s = qsum_s + KM_ROWS * groups;
  for (int i = tid; i < nh * groups; i += KQ_THREADS) {
    const int r = i / groups, gi = i % groups;
    float sum = 0.0f, sum16 = 0.0f;
    for (int e = 0; e < gk; e++) {
      const float x = qv(r, gi * gk + e);
      sum += x;
      sum16 += __half2float(__float2half_rn(x));
    }
    qsum_s[i] = sum;
    q16sum_s[i] = sum16;
  }
  if (tid < KM_ROWS) m_s[tid] = -INFINITY, l_s[tid] = 0.0f, corr_s[tid] = 1.0f;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  __syncthreads(); /* p_s is free again */

  const int64_t tiles = (nq + KVQ_TILE - 1) / KVQ_TILE;
  const int64_t first = (int64_t)blockIdx.y * a.tiles_per_split;
  const int64_t last = min(tiles, first + a.tiles_per_split);
  if (first < last) stage_tile(a, st, stage0, kvh, first);
  for (int64_t tile = first; tile < last; tile++) {
    uint32_t *cur = stage0 + (int)((tile - first) & 1) * st.words;
    if (tile + 1 < last) {
      stage_tile(a, st, stage0 + (int)((tile + 1 - first) & 1) * st.words, kvh, tile + 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const int n = (int)min((int64_t)KVQ_TILE, nq - tile * KVQ_TILE);
    const uint32_t *kc = cur + st.k_codes, *km = cur + st.k_meta;
    const uint32_t *vc = cur + st.v_codes, *vm = cur + st.v_meta;

    /* scores: warp w takes tokens 32w .. 32w + 31, four n-tiles of 8 */
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n0 = warp * 32 + j * 8;
      const uint32_t *row = kc + (n0 + quad) * (st.k_row + 1); /* B column: token n0 + quad */
      float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dg[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int s32 = 0; s32 < D / 32; s32++) { /* two k-steps: 32 channels */
        uint32_t b[4];
        code_pairs<KB>(row, s32 * 32 + 8 * q4, b);
        mma_16816(dg, qa[2 * s32], b[0], b[1]);
        mma_16816(dg, qa[2 * s32 + 1], b[2], b[3]);
        if ((s32 + 1) * 32 % gk == 0) { /* the group ends: fold its pair for this lane's tokens */
          const int gi = s32 * 32 / gk;
          const float q0 = qsum_s[quad * groups + gi], q1 = qsum_s[(quad + 8) * groups + gi];
          const float z0 = 1024.0f * q16sum_s[quad * groups + gi];
          const float z1 = 1024.0f * q16sum_s[(quad + 8) * groups + gi];
#pragma unroll
          for (int e = 0; e < 2; e++) {
            const float2 so = pair_at(km, (n0 + qp + e) * groups + gi);
            sc[e] += so.x * (dg[e] - z0) + so.y * q0;
            sc[2 + e] += so.x * (dg[2 + e] - z1) + so.y * q1;
          }
          dg[0] = dg[1] = dg[2] = dg[3] = 0.0f;
        }
      }
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int tok = n0 + qp + e;
        p_s[quad * KVQ_TILE + tok] = tok < n ? sc[e] : -INFINITY;
        p_s[(quad + 8) * KVQ_TILE + tok] = tok < n ? sc[2 + e] : -INFINITY;
      }
    }
    __syncthreads();
    float s[KM_ROWS];
#pragma unroll
    for (int r = 0; r < KM_ROWS; r++) s[r] = r < nh ? p_s[r * KVQ_TILE + tid] : -INFINITY;
    tile_softmax<KM_ROWS>(s, p_s, red, m_s, l_s, corr_s, nh);
    float *p16sum_s = psum_s + KM_ROWS * blocks_per_tile;
    for (int i = tid; i < nh * blocks_per_tile; i += KQ_THREADS) {
      const int r = i / blocks_per_tile, blk = i % blocks_per_tile;
      float sum = 0.0f, sum16 = 0.0f;
      for (int e = 0; e < b; e++) {
        const float x = p_s[r * KVQ_TILE + blk * b + e];
        sum += x;
        sum16 += __half2float(__float2half_rn(x));
      }
      psum_s[i] = sum;
      p16sum_s[i] = sum16;
    }
    __syncthreads();

    /* values: warp w takes channels w * D / 4 .., NT n-tiles of 8 */
    const float corr0 = corr_s[quad], corr1 = corr_s[quad + 8];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      acc[nt][0] *= corr0, acc[nt][1] *= corr0, acc[nt][2] *= corr1, acc[nt][3] *= corr1;
    }
    for (int blk = 0; blk < n / b; blk++) {
      float dv[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; nt++) dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.0f;
      for (int u = 0; u < b / 32; u++) { /* two k-steps: 32 tokens of the block */
        const float *p0 = p_s + quad * KVQ_TILE + blk * b, *p1 = p_s + (quad + 8) * KVQ_TILE + blk * b;
        uint32_t pa[2][4];
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int j = 2 * u + h;
          const int t0 = mma_k_index(j, q4, 0, 0), t4 = mma_k_index(j, q4, 0, 1);
          const int t1 = mma_k_index(j, q4, 1, 0), t5 = mma_k_index(j, q4, 1, 1);
          pa[h][0] = pack_half2(p0[t0], p0[t4]);
          pa[h][1] = pack_half2(p1[t0], p1[t4]);
          pa[h][2] = pack_half2(p0[t1], p0[t5]);
          pa[h][3] = pack_half2(p1[t1], p1[t5]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          const int ch = warp * (D / 4) + nt * 8 + quad; /* B column */
          uint32_t bv[4];
          code_pairs<VB>(vc + (blk * D + ch) * (st.v_row + 1), u * 32 + 8 * q4, bv);
          mma_16816(dv[nt], pa[0], bv[0], bv[1]);
          mma_16816(dv[nt], pa[1], bv[2], bv[3]);
        }
      }
      const float w0 = psum_s[quad * blocks_per_tile + blk];
      const float w1 = psum_s[(quad + 8) * blocks_per_tile + blk];
      const float z0 = 1024.0f * p16sum_s[quad * blocks_per_tile + blk];
      const float z1 = 1024.0f * p16sum_s[(quad + 8) * blocks_per_tile + blk];
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const float2 so = pair_at(vm, blk * D + warp * (D / 4) + nt * 8 + qp + e);
          acc[nt][e] += so.x * (dv[nt][e] - z0) + so.y * w0;
          acc[nt][2 + e] += so.x * (dv[nt][2 + e] - z1) + so.y * w1;
        }
    }
    __syncthreads(); /* the stage and p_s are rewritten next */
  }

  const int64_t row0 = ((int64_t)split * gridDim.z + t) * a.heads + h0;
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int ch = warp * (D / 4) + nt * 8 + qp + e;
      if (quad < nh) a.part_acc[(row0 + quad) * D + ch] = acc[nt][e];
      if (quad + 8 < nh) a.part_acc[(row0 + quad + 8) * D + ch] = acc[nt][2 + e];
    }
  if (tid < nh) {
    a.part_ml[(row0 + tid) * 2] = m_s[tid];
    a.part_ml[(row0 + tid) * 2 + 1] = l_s[tid];
  }
}

static size_t kvq_mma_smem_bytes(const iq_kvq_params &p) {
  const int d = p.head_dim;
  return sizeof(float) * KM_ROWS * (KVQ_TILE + 2 * (d / 32) + 2 * (KVQ_TILE / 32)) +
         2 * sizeof(uint32_t) * (size_t)kq_stage_of(p).words;
}

template <int KB, int VB, int D> static int launch_mma(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  const size_t smem = kvq_mma_smem_bytes(a.p);
  auto kernel = kvq_mma_kernel<KB, VB, D>;
  IQ_CUDA(ctx, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kernel<<<grid, KQ_THREADS, smem, ctx->stream>>>(a);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

template <int KB, int VB> static int launch_mma_dim(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  return a.p.head_dim == 64 ? launch_mma<KB, VB, 64>(ctx, a, grid)
                            : launch_mma<KB, VB, 128>(ctx, a, grid);
}

template <int KB> static int launch_mma_vbits(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  switch (a.p.v_bits) {
  case 2: return launch_mma_dim<KB, 2>(ctx, a, grid);
  case 4: return launch_mma_dim<KB, 4>(ctx, a, grid);
  default: return launch_mma_dim<KB, 8>(ctx, a, grid);
  }
}

/* The quantized splits of a launch on tensor cores: grid (kv_heads, qsplits, n). */
static int launch_mma_bits(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  switch (a.p.k_bits) {
  case 2: return launch_mma_vbits<2>(ctx, a, grid);
  case 4: return launch_mma_vbits<4>(ctx, a, grid);
  default: return launch_mma_vbits<8>(ctx, a, grid);
  }
}
