/* decode_mma.cu: one decode step of attention over the fp16 KV cache on
 * tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate), head_dim 64 or
 * 128, up to 8 query heads per KV head. attention.cu's decode calls it where
 * decode_mma_supported says so and runs its SIMT kernel otherwise (the twin is
 * kernels/cpu/attention.c, as for every decode).
 *
 * Each warp is a split of its own: warp w of the grid takes KV head w / S and
 * the (w % S)-th of S equal runs of the positions 0..pos, and leaves a partial
 * (acc, max, sum) for merge_splits_kernel; blocks only pack warps, so no warp
 * waits for another. S is as large as one wave of resident blocks allows, so
 * one sequence fills every multiprocessor at any context length. A warp walks
 * its run in chunks of 32 tokens, each chunk's key and value rows copied with
 * cp.async into the warp's own shared memory DM_STAGES - 1 chunks ahead: 2 to
 * 3 chunks of 16 KB in flight per warp at head_dim 128, over 100 KB per
 * multiprocessor (the H100 reads as fast with 2 stages; the third is for
 * faster memory), the copies asking L2 for whole 256-byte blocks. Per chunk,
 * as kvq_mma.cu does for the quantized cache:
 *   Sᵀ (32 tokens x 8 heads) = K (A, ldmatrix) · q (B, held in registers),
 * the online softmax per head in exp2 units, P rounded to fp16 and transposed
 * into the B operand in registers (movmatrix), and
 *   outᵀ (channels x 8 heads) += Vᵀ (A, ldmatrix.trans) · Pᵀ.
 * q (times the softmax scale and log2 e) and p are rounded to fp16 as the
 * tensor cores take them, as in prefill_rows.cu; sums and the softmax are fp32. */
#include <math.h>

#include "cuda.cuh"
#include "mma.cuh"
#include "split_softmax.cuh"

constexpr int DM_WARPS = 4, DM_CHUNK = 32, DM_STAGES = 3, DM_HEADS = 8;

/* A stage: a chunk's 32 key rows, then its 32 value rows, each padded to D + 8
 * halves so that the 8 rows an ldmatrix reads lie in distinct banks. */
template <int D> struct dm_stage {
  static constexpr int ROW = D + 8, HALVES = 2 * DM_CHUNK * ROW;
  static constexpr size_t WARP_BYTES = sizeof(__half) * DM_STAGES * HALVES;
};

struct dm_args {
  float *part_acc, *part_ml; /* [splits, heads, D], [splits, heads, {max, sum}] */
  const float *q;            /* [heads, D] */
  const __half *k_cache, *v_cache; /* [kv_heads, cap, D] */
  int heads, group, kv_heads, splits, cap, len;
  float qscale; /* the softmax scale times log2 e */
};

template <int D>
__global__ void __launch_bounds__(DM_WARPS * 32, 1) decode_mma_kernel(dm_args a) {
  using st = dm_stage<D>;
  constexpr int ROW = st::ROW, PIECES = D / 8, ROWS_PER_COPY = 32 / PIECES;
  extern __shared__ __align__(16) __half dm_smem[];
  const int lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (w >= a.kv_heads * a.splits) return; /* the last block's spare warps */
  /* launched early (iq_launch_early): the kernel before may still be writing q or the cache, or
   * reading the partials */
  iq_wait_prior();
  const int kvh = w / a.splits, split = w % a.splits, h0 = kvh * a.group;
  const int begin = (int)((int64_t)split * a.len / a.splits);
  const int end = (int)((int64_t)(split + 1) * a.len / a.splits);
  const int chunks = (end - begin + DM_CHUNK - 1) / DM_CHUNK;
  __half *stages = dm_smem + (threadIdx.x / 32) * DM_STAGES * st::HALVES;
  const int64_t head = (int64_t)kvh * a.cap * D;
  const __half *kb = a.k_cache + head, *vb = a.v_cache + head;

  /* Issues the copies of chunk j into stage j % DM_STAGES and commits them as one group (an empty
   * group past the last chunk, so that wait_group counts alike on every step): a lane copies
   * 16-byte piece lane % PIECES of rows lane / PIECES + ROWS_PER_COPY i. Rows past the run's end
   * repeat its last row: a finite value whose score is masked to -inf, and no read past pos. */
  const int piece = lane % PIECES * 8, row0 = lane / PIECES;
  auto load = [&](int j) {
    if (j < chunks) {
      __half *dst = stages + j % DM_STAGES * st::HALVES;
      const int t0 = begin + j * DM_CHUNK;
#pragma unroll
      for (int i = 0; i < DM_CHUNK / ROWS_PER_COPY; i++) {
        const int r = row0 + i * ROWS_PER_COPY;
        const int64_t t = min(t0 + r, end - 1);
        cp_async16_stream(dst + r * ROW + piece, kb + t * D + piece);
        cp_async16_stream(dst + (DM_CHUNK + r) * ROW + piece, vb + t * D + piece);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
#pragma unroll
  for (int j = 0; j < DM_STAGES - 1; j++) load(j);

  /* q as the B operand of each 16-channel k-step: head gid, channels 2 tig, + 1 and + 8, + 9
   * (zero for heads past the group), read while the first chunks are on their way; every load
   * unconditional (heads past the group read head 0's row), so all are in flight at once */
  uint32_t qb[D / 16][2];
  const float *qr = a.q + (int64_t)(h0 + (gid < a.group ? gid : 0)) * D + 2 * tig;
  float2 qv[D / 16][2];
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
    for (int j = 0; j < 2; j++) qv[ks][j] = *reinterpret_cast<const float2 *>(qr + 16 * ks + 8 * j);
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
    for (int j = 0; j < 2; j++)
      qb[ks][j] = gid < a.group ? pack_half2(qv[ks][j].x * a.qscale, qv[ks][j].y * a.qscale) : 0u;

  /* This thread's share of the running softmax and output: heads 2 tig, + 1 and, per 16-channel
   * tile cm, channels 16 cm + gid and + 8 (acc[cm] = {(gid, h0), (gid, h1), (gid + 8, h0),
   * (gid + 8, h1)}), as the outᵀ accumulator holds them. */
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, acc[D / 16][4];
#pragma unroll
  for (int cm = 0; cm < D / 16; cm++) acc[cm][0] = acc[cm][1] = acc[cm][2] = acc[cm][3] = 0.0f;

  /* ldmatrix row addresses: the lane gives row lane % 8 of matrix lane / 8. Keys (A = a 16x16
   * tile of K as stored): matrices (tokens 0-7, channels 0-7), (8-15, 0-7), (0-7, 8-15),
   * (8-15, 8-15). Values (A = Vᵀ, loaded transposed): (tokens 0-7, channels 0-7), (0-7, 8-15),
   * (8-15, 0-7), (8-15, 8-15). */
  const int k_lane = (lane % 8 + (lane / 8 % 2) * 8) * ROW + lane / 16 * 8;
  const int v_lane = (lane % 8 + lane / 16 * 8) * ROW + lane / 8 % 2 * 8;

  for (int j = 0; j < chunks; j++) {
    load(j + DM_STAGES - 1);
    cp_async_wait<DM_STAGES - 1>(); /* chunk j's */
    __syncwarp(); /* and the other lanes' copies are visible */
    const __half *ks_ = stages + j % DM_STAGES * st::HALVES, *vs = ks_ + DM_CHUNK * ROW;

    /* Sᵀ: s[mt] = tokens 16 mt + gid, + 8 of the chunk for heads 2 tig, + 1 */
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        uint32_t fr[4];
        ldmatrix_x4(fr, ks_ + 16 * mt * ROW + 16 * ks + k_lane);
        mma_16816(s[mt], fr, qb[ks][0], qb[ks][1]);
      }
    const int valid = end - (begin + j * DM_CHUNK); /* >= 1 */
    if (valid < DM_CHUNK) /* the run's last chunk: no tokens past its end */
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int i = 0; i < 4; i++)
          if (16 * mt + gid + i / 2 * 8 >= valid) s[mt][i] = -INFINITY;

    /* online softmax per head: the chunk's max over its 32 tokens (the thread's 4, then the 8
     * lanes of a column); every chunk has a valid token, so the maxima are finite and
     * exp2(-inf) = 0 takes the first chunk's factor and the masked tokens */
    float corr[2], psum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float mx = fmaxf(fmaxf(s[0][h], s[0][h + 2]), fmaxf(s[1][h], s[1][h + 2]));
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m[h], mx);
      corr[h] = exp2f(m[h] - mn);
      m[h] = mn;
    }
    /* P (tokens x heads, this thread's 8x8 fragments) to fp16, transposed into the B operand of
     * each 16-token k-step (movmatrix); the sums are of the fp16 p the MMAs see */
    uint32_t pb[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
      for (int r = 0; r < 2; r++) {
        const uint32_t row = pack_half2(exp2f(s[mt][2 * r] - m[0]), exp2f(s[mt][2 * r + 1] - m[1]));
        const float2 p = pair_f2(row);
        psum[0] += p.x;
        psum[1] += p.y;
        pb[mt][r] = transpose_8x8(row);
      }
#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) psum[h] += __shfl_xor_sync(0xffffffffu, psum[h], o);
      l[h] = l[h] * corr[h] + psum[h];
    }
    /* once the running maxima settle the factors are 1: skip the rescale then */
    if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f))
#pragma unroll
      for (int cm = 0; cm < D / 16; cm++) {
        acc[cm][0] *= corr[0];
        acc[cm][1] *= corr[1];
        acc[cm][2] *= corr[0];
        acc[cm][3] *= corr[1];
      }

    /* outᵀ += Vᵀ · Pᵀ per 16-channel tile, over the chunk's two 16-token k-steps */
#pragma unroll
    for (int cm = 0; cm < D / 16; cm++)
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        uint32_t fr[4];
        ldmatrix_x4_trans(fr, vs + 16 * mt * ROW + 16 * cm + v_lane);
        mma_16816(acc[cm], fr, pb[mt][0], pb[mt][1]);
      }
    __syncwarp(); /* the stage is refilled by the next step's copies */
  }

  iq_allow_next(); /* the merge may start launching */
  /* the partial of this split (an empty run, which the sizing never makes, would leave max
   * -inf and add nothing); the max back to natural units for merge_splits */
  const int64_t row = (int64_t)split * a.heads + h0;
#pragma unroll
  for (int cm = 0; cm < D / 16; cm++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int head = 2 * tig + i % 2;
      if (head < a.group) a.part_acc[(row + head) * D + 16 * cm + gid + i / 2 * 8] = acc[cm][i];
    }
  if (gid == 0)
#pragma unroll
    for (int h = 0; h < 2; h++)
      if (2 * tig + h < a.group) {
        a.part_ml[(row + 2 * tig + h) * 2] = m[h] * LN2;
        a.part_ml[(row + 2 * tig + h) * 2 + 1] = l[h];
      }
}

int decode_mma_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group <= DM_HEADS;
}

/* The kernel for D: warps per block (DM_WARPS where the device's shared memory per block allows)
 * and blocks per multiprocessor, found at the first call. */
struct dm_kernel {
  void (*fn)(dm_args);
  size_t smem;
  int warps, blocks_per_sm;
};

template <int D> static int dm_kernel_of(iq_ctx *ctx, dm_kernel *k) {
  static int warps = 0, blocks = 0;
  constexpr size_t per_warp = dm_stage<D>::WARP_BYTES;
  k->fn = decode_mma_kernel<D>;
  if (!warps) {
    int optin = 0;
    IQ_CUDA(ctx, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        ctx->device));
    const int fit = (int)((size_t)optin / per_warp);
    const int w = fit < 1 ? 1 : fit < DM_WARPS ? fit : DM_WARPS;
    IQ_TRY(iq_kernel_blocks(ctx, k->fn, w * 32, w * per_warp, &blocks));
    warps = w;
  }
  k->warps = warps;
  k->smem = warps * per_warp;
  k->blocks_per_sm = blocks;
  return IQ_OK;
}

/* Arguments are checked by iq_attention_decode: an fp16 cache with 16-byte aligned rows. */
int decode_mma_attention(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                         const void *v_cache, int pos, int heads, int kv_heads, int head_dim,
                         int cap, float scale) {
  dm_kernel k = {nullptr, 0, 1, 1};
  IQ_TRY(head_dim == 128 ? dm_kernel_of<128>(ctx, &k) : dm_kernel_of<64>(ctx, &k));
  /* splits per KV head: as many warps as one wave of resident blocks holds, none with less than
   * a chunk's worth of positions (short contexts stay a few warps and a cheap merge) */
  const int len = pos + 1;
  const int64_t wave = (int64_t)k.blocks_per_sm * ctx->sms * k.warps / kv_heads;
  const int64_t most = (len + DM_CHUNK - 1) / DM_CHUNK;
  const int splits = (int)(wave < 1 ? 1 : wave < most ? wave : most);

  void *scratch;
  const size_t rows = (size_t)splits * heads;
  IQ_TRY(iq_scratch(ctx, sizeof(float) * rows * (head_dim + 2), &scratch));
  dm_args a;
  a.part_acc = (float *)scratch;
  a.part_ml = a.part_acc + rows * head_dim;
  a.q = q;
  a.k_cache = (const __half *)k_cache;
  a.v_cache = (const __half *)v_cache;
  a.heads = heads;
  a.group = heads / kv_heads;
  a.kv_heads = kv_heads;
  a.splits = splits;
  a.cap = cap;
  a.len = len;
  a.qscale = scale * LOG2E;
  const int64_t warps = (int64_t)kv_heads * splits;
  const unsigned blocks = (unsigned)((warps + k.warps - 1) / k.warps);
  IQ_TRY(iq_launch_early(ctx, k.fn, dim3(blocks), dim3(k.warps * 32), k.smem, a));
  IQ_TRY(merge_splits(ctx, out, a.part_acc, a.part_ml, heads, head_dim, splits));
  return IQ_OK;
}
