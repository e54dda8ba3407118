/* prefill_rows_kernel.cuh: the prompt kernel of prefill_rows.cuh on tensor cores (mma.sync
 * m16n8k16, fp16 in, fp32 accumulate), flash-attention-2 style, templated on its tile source.
 *
 * grid (query blocks, kv_heads, splits), 8 warps. A block holds PR_ROWS rows (query, head) of
 * one KV head: PR_ROWS / GQA queries times their GQA heads, warp w rows 16 w .. 16 w + 15, the
 * blocks with the most keys first, so that each K and V tile is read once for all the GQA heads.
 * Q waits in shared memory, so that two blocks fit a multiprocessor. Every split walks its
 * tiles of 32 key and value rows, each filled while those before are attended; a prompt of few
 * query blocks (a short prompt deep in a context) is split over the tiles to fill the GPU, and
 * merge_splits combines the partials. Each warp computes S = Q Kᵀ (fragments by ldmatrix),
 * masks where a tile reaches past a row's query, updates its rows' online softmax and adds P V
 * (V's fragments by ldmatrix.trans); q and the probabilities are rounded to fp16 for the MMAs,
 * as flash attention does, softmax state and outputs stay fp32. Over a quantized cache split 0
 * also walks the fp16 positions (sink, ring) the block's queries see, and a chunk is masked for
 * the rows whose query still sees it in fp16.
 *
 * A tile source Src has PLAIN (its tiles hold every position: an fp16 cache), WORDS (the shared
 * words it stages into, before the tiles), PAIRS (its K and V tile pairs), PENDING (how many of
 * a thread's cp.async groups may still be in flight when tile i is attended: what it copies
 * ahead) and, called by every thread:
 *   begin(a, first, last): starts the split's first tiles on their way;
 *   fill(a, tile, i, last, kt, vt): fills tile pair i % PAIRS (kt, vt) with the split's i-th
 *     tile where it is made rather than copied (the copies of tile i are waited for after it);
 *   ahead(a, tile, i, last): once tile i's rows are visible to every warp and every warp is
 *     done with tile i - 1, starts what comes next. */
#pragma once
#include <math.h>

#include "prefill_rows.cuh"
#include "mma.cuh"

/* Positions a query at position p sees quantized (kvq_quantized): whole chunks past the lag. */
__device__ __forceinline__ int pr_quantized(const pr_args &a, int p) {
  return p + 1 > a.lag ? (p + 1 - a.lag) / PR_TILE * PR_TILE : 0;
}

/* A warp's 16 rows (this thread's r0 = gid and r1 = gid + 8 of them) in flash-attention style:
 * outputs, running maxima (log2 units) and sums, over one tile of 32 key and value rows in shared
 * memory (padded rows of D + 8) at a time: S = Q Kᵀ, masked by seen(row, key) when masked is set,
 * then the online softmax and O += P V. */
template <int D> struct pr_rows {
  const __half *qs; /* the warp's 16 rows of Q times qscale in shared memory, padded */
  float o[D / 8][4], m[2], l[2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    m[0] = -INFINITY, m[1] = -INFINITY, l[0] = 0.0f, l[1] = 0.0f;
  }

  template <typename Seen>
  __device__ __forceinline__ void attend(const __half *kt, const __half *vt, int lane, bool masked,
                                         Seen seen) {
    constexpr int S = D + 8;
    const int tig = lane % 4;
    float s[PR_TILE / 8][4];
#pragma unroll
    for (int nt = 0; nt < PR_TILE / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kp = 0; kp < D / 32; kp++) { /* two k-steps: channels 32 kp .. + 31 */
      /* Q's A fragments (rows + 8 (i % 2), channels + 8 (i / 2) for matrix i) */
      uint32_t qa[2][4];
#pragma unroll
      for (int kk = 0; kk < 2; kk++)
        ldmatrix_x4(qa[kk],
                    qs + (lane % 8 + 8 * (lane / 8 % 2)) * S + 32 * kp + 16 * kk + 8 * (lane / 16));
#pragma unroll
      for (int nt = 0; nt < PR_TILE / 8; nt++) {
        uint32_t b[4];
        ldmatrix_x4(b, kt + (nt * 8 + lane % 8) * S + 32 * kp + 8 * (lane / 8));
        mma_16816(s[nt], qa[0], b[0], b[1]);
        mma_16816(s[nt], qa[1], b[2], b[3]);
      }
    }
    if (masked)
#pragma unroll
      for (int nt = 0; nt < PR_TILE / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (!seen(e / 2, nt * 8 + 2 * tig + e % 2)) s[nt][e] = -INFINITY;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < PR_TILE / 8; nt++) {
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
    /* deep in a context the rows' maxima rarely move: a warp skips the rescale where none did */
    if (__any_sync(0xffffffffu, c[0] != 1.0f || c[1] != 1.0f))
#pragma unroll
      for (int i = 0; i < D / 8; i++) o[i][0] *= c[0], o[i][1] *= c[0], o[i][2] *= c[1], o[i][3] *= c[1];
#pragma unroll
    for (int nt = 0; nt < PR_TILE / 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) s[nt][e] = fast_exp2(s[nt][e] - base[e / 2]);
      l[0] += s[nt][0] + s[nt][1], l[1] += s[nt][2] + s[nt][3];
    }
    /* O += P V: P's accumulator layout is already the A fragment layout */
#pragma unroll
    for (int kk = 0; kk < PR_TILE / 16; kk++) {
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

/* Two blocks a multiprocessor: Q's fragments held in registers took 174-178 at head_dim 128, one
 * block, and prompts over a 128k cache ran 20% slower (H100, session 20). */
template <int D, class Src>
__global__ void __launch_bounds__(PR_WARPS * 32, 2) prefill_rows_kernel(pr_args a) {
  constexpr int S = D + 8, TILE = PR_TILE * S; /* halves of a K or V tile */
  constexpr bool PLAIN = Src::PLAIN;
  extern __shared__ __align__(16) uint32_t pr_smem[]; /* Src's words, [PAIRS][K, V tile], Q tile */
  __half *tiles = reinterpret_cast<__half *>(pr_smem + Src::WORDS), *qtile = tiles + 2 * Src::PAIRS * TILE;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int kvh = blockIdx.y, split = blockIdx.z;
  const int t0 = (gridDim.x - 1 - blockIdx.x) * a.qpb, queries = min(a.qpb, a.n - t0);
  const int rows = queries * a.group;
  /* the block's last query sees len positions and, over a quantized cache, nq of them as
   * chunks; its first sees nq0 as chunks. Plain, every position is in the tiles. */
  const int len = a.pos0 + t0 + queries;
  const int nq = PLAIN ? len : pr_quantized(a, len - 1);
  const int nq0 = PLAIN ? 0 : pr_quantized(a, a.pos0 + t0);
  const int first = split * a.tiles_per_split;
  const int last = min((nq + PR_TILE - 1) / PR_TILE, first + a.tiles_per_split);

  /* this split's first tiles are on their way before anything else (into the pairs before the
   * last or Src's words: split 0's fp16 walk uses the last pair) */
  Src src(pr_smem, tiles, kvh, len);
  src.begin(a, first, last);

  /* this thread's rows: r0 = 16 warp + gid and r1 = r0 + 8 of the block, each a query (its
   * position and the positions it sees quantized) and a head */
  pr_rows<D> st;
  st.qs = qtile + 16 * warp * S;
  int pos[2], nqr[2];
  int64_t out_row[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int r = 16 * warp + gid + 8 * j, qi = r / a.group;
    const bool valid = r < rows;
    pos[j] = a.pos0 + t0 + (valid ? qi : 0);
    nqr[j] = PLAIN ? 0 : pr_quantized(a, pos[j]);
    out_row[j] = valid ? (int64_t)(t0 + qi) * a.heads + kvh * a.group + r % a.group : -1;
  }
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
      float2 lo = make_float2(0.0f, 0.0f), hi = lo;
      if (out_row[j] >= 0) {
        const float *qr = a.q + out_row[j] * D + 16 * ks + 2 * tig;
        lo = *reinterpret_cast<const float2 *>(qr);
        hi = *reinterpret_cast<const float2 *>(qr + 8);
      }
      __half *qrow = qtile + (16 * warp + gid + 8 * j) * S + 16 * ks + 2 * tig;
      st_pair(qrow, pack_half2(lo.x * a.qscale, lo.y * a.qscale));
      st_pair(qrow + 8, pack_half2(hi.x * a.qscale, hi.y * a.qscale));
    }
  }
  st.init();
  __syncwarp(); /* the warp's Q rows are in shared memory */
  const bool busy = 16 * warp < rows; /* the warp has rows */

  /* a quantized cache's fp16 positions (split 0): the sink, then the ring from the first query's
   * quantized end, 32 rows a tile, rows past the end zero; each row sees position x if x <= its
   * position and x is in the sink or not quantized for its query */
  const int sinkn = PLAIN ? 0 : min(len, a.sink), fp16n = PLAIN ? 0 : len - nq0;
  for (int base = 0; split == 0 && base < fp16n; base += PR_TILE) {
    __half *kt = tiles + 2 * (Src::PAIRS - 1) * TILE, *vt = kt + TILE;
    for (int e = threadIdx.x; e < 2 * PR_TILE * D / 8; e += PR_WARPS * 32) {
      const int side = e / (PR_TILE * D / 8), r = e / (D / 8) % PR_TILE, c = e % (D / 8) * 8;
      __half *dst = (side ? vt : kt) + r * S + c;
      const int i = base + r;
      if (i < fp16n) {
        const int x = i < sinkn ? i : a.sink + nq0 + (i - sinkn);
        const __half *src = x < a.sink ? (side ? a.sink_v : a.sink_k) + ((int64_t)kvh * a.sink + x) * D
                                       : (side ? a.ring_v : a.ring_k) +
                                             ((int64_t)kvh * a.ring + (x - a.sink) % a.ring) * D;
        cp_async16(dst, src + c);
      } else {
        *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
    cp_async_wait<0>();
    __syncthreads(); /* the tile's rows, and the first tiles' copies, are visible */
    if (busy)
      st.attend(kt, vt, lane, true, [&](int j, int col) {
        const int i = base + col, x = i < sinkn ? i : a.sink + nq0 + (i - sinkn);
        return i < fp16n && x <= pos[j] && (x < a.sink || x >= a.sink + nqr[j]);
      });
    __syncthreads(); /* the tile is free again */
  }

  /* the split's tiles, each filled while those before are attended: one barrier a tile (its
   * rows complete; every warp done with the pair before, which the source then fills). Plain, a
   * tile is masked where it reaches past the block's first query; over a quantized cache, where
   * a row's query still sees the chunk in fp16 (seen above). */
  for (int tile = first, i = 0; tile < last; tile++, i++) {
    __half *kt = tiles + i % Src::PAIRS * 2 * TILE, *vt = kt + TILE;
    src.fill(a, tile, i, last, kt, vt);
    cp_async_wait<Src::PENDING>();
    __syncthreads();
    src.ahead(a, tile, i, last);
    if (!busy) continue;
    if constexpr (PLAIN)
      st.attend(kt, vt, lane, PR_TILE * tile + PR_TILE - 1 > a.pos0 + t0,
                [&](int j, int col) { return PR_TILE * tile + col <= pos[j]; });
    else
      st.attend(kt, vt, lane, PR_TILE * tile >= nq0,
                [&](int j, int) { return PR_TILE * tile < nqr[j]; });
  }

  /* the quad's partial sums; then the output, or this split's partial (max in natural units) */
#pragma unroll
  for (int j = 0; j < 2; j++)
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) st.l[j] += __shfl_xor_sync(0xffffffffu, st.l[j], off);
  const bool whole = gridDim.z == 1;
  const int64_t all_rows = (int64_t)a.n * a.heads;
#pragma unroll
  for (int j = 0; j < 2; j++) {
    if (out_row[j] < 0) continue;
    const int64_t row = whole ? out_row[j] : split * all_rows + out_row[j];
    float *dst = (whole ? a.out : a.part_acc) + row * D + 2 * tig;
    const float f = whole ? 1.0f / st.l[j] : 1.0f;
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
      *reinterpret_cast<float2 *>(dst + 8 * nt) = make_float2(st.o[nt][2 * j] * f, st.o[nt][2 * j + 1] * f);
    if (!whole && tig == 0) {
      a.part_ml[row * 2] = st.m[j] * LN2; /* -inf: saw nothing */
      a.part_ml[row * 2 + 1] = st.l[j];
    }
  }
}

/* The kernel of source Src, its shared memory set at its first use. */
template <int D, class Src> int pr_kernel_of(iq_ctx *ctx, pr_kernel *k) {
  static int per_sm = 0;
  k->fn = prefill_rows_kernel<D, Src>;
  k->smem = sizeof(uint32_t) * Src::WORDS + sizeof(__half) * (2 * Src::PAIRS * PR_TILE + PR_ROWS) * (D + 8);
  IQ_TRY(iq_kernel_blocks(ctx, k->fn, PR_WARPS * 32, k->smem, &per_sm));
  k->per_sm = per_sm;
  return IQ_OK;
}
