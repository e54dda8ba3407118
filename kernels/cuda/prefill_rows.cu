/* prefill_rows.cu: prompt attention over rows as tiles (prefill_rows.cuh): an fp16 cache's own
 * rows, or a quantized cache's chunks dequantized into a scratch (kvq_prefill.cu); the plan of a
 * prompt's splits and the launch of any source's kernel. */
#include "prefill_rows_kernel.cuh"
#include "split_softmax.cuh"

/* splits are sized so that each walks at least this many tiles */
constexpr int PR_MIN_TILES = 8;

/* Tiles copied from rows with cp.async PAIRS - 1 tiles ahead: deep in a context a tile's copy
 * takes longer than attending one tile (two ahead: prompts of 40-256 tokens at depth 128k 1.06-1.27x
 * faster than one; three ran level with two; H100, session 25). PLAIN: the cache holds every
 * position, and rows past the block's last are zero. */
template <int D, bool P> struct pr_row_tiles {
  static constexpr bool PLAIN = P;
  static constexpr int WORDS = 0, PAIRS = 3, PENDING = PAIRS - 2;
  __half *tiles;
  int kvh, len;

  __device__ pr_row_tiles(uint32_t *, __half *tiles, int kvh, int len)
      : tiles(tiles), kvh(kvh), len(len) {}

  /* tile `tile`'s key and value rows into tile pair `pair` as one cp.async group (empty past
   * the split's last tile, so that each tile has its group) */
  __device__ __forceinline__ void copy(const pr_args &a, int tile, int last, int pair) {
    constexpr int S = D + 8, TILE = PR_TILE * S;
    const int64_t at = (int64_t)kvh * a.head_stride + (int64_t)tile * a.tile_stride;
    const __half *ks = a.k_tiles + at, *vs = a.v_tiles + at;
    const int valid = len - PR_TILE * tile;
    __half *kt = tiles + pair * 2 * TILE;
    for (int e = threadIdx.x; tile < last && e < PR_TILE * D / 8; e += PR_WARPS * 32) {
      const int r = e / (D / 8), c = e % (D / 8) * 8;
      if (!PLAIN || r < valid) {
        cp_async16(kt + r * S + c, ks + r * D + c);
        cp_async16(kt + TILE + r * S + c, vs + r * D + c);
      } else {
        *reinterpret_cast<uint4 *>(kt + r * S + c) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4 *>(kt + TILE + r * S + c) = make_uint4(0, 0, 0, 0);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  __device__ __forceinline__ void begin(const pr_args &a, int first, int last) {
#pragma unroll
    for (int i = 0; i < PAIRS - 1; i++) copy(a, first + i, last, i);
  }
  __device__ __forceinline__ void fill(const pr_args &, int, int, int, __half *, __half *) {}
  __device__ __forceinline__ void ahead(const pr_args &a, int tile, int i, int last) {
    copy(a, tile + PAIRS - 1, last, (i + PAIRS - 1) % PAIRS);
  }
};

int pr_rows_kernel(iq_ctx *ctx, int head_dim, bool plain, pr_kernel *k) {
  if (head_dim == 128)
    return plain ? pr_kernel_of<128, pr_row_tiles<128, true>>(ctx, k)
                 : pr_kernel_of<128, pr_row_tiles<128, false>>(ctx, k);
  return plain ? pr_kernel_of<64, pr_row_tiles<64, true>>(ctx, k)
               : pr_kernel_of<64, pr_row_tiles<64, false>>(ctx, k);
}

void pr_plan_of(iq_ctx *ctx, const pr_kernel &k, int head_dim, int n, int heads, int kv_heads,
                int64_t tiles, pr_plan *plan) {
  const int group = heads / kv_heads, qpb = PR_ROWS / group;
  const int qblocks = (n + qpb - 1) / qpb;
  const int64_t blocks = (int64_t)qblocks * kv_heads, wave = (int64_t)k.per_sm * ctx->sms;
  int64_t splits = blocks >= wave ? 1 : (wave + blocks - 1) / blocks;
  const int64_t most = (tiles + PR_MIN_TILES - 1) / PR_MIN_TILES;
  splits = splits > most ? most : splits;
  splits = splits < 1 ? 1 : splits;
  const int64_t per = (tiles + splits - 1) / splits;
  splits = per ? (tiles + per - 1) / per : 1; /* none empty */
  splits = splits < 1 ? 1 : splits;
  plan->qblocks = qblocks;
  plan->splits = (int)splits;
  plan->tiles_per_split = (int)(per ? per : 1);
  plan->part_bytes = splits > 1 ? sizeof(float) * (size_t)splits * n * heads * (head_dim + 2) : 0;
}

int pr_attend(iq_ctx *ctx, pr_args a, const pr_kernel &k, const pr_plan &plan, int head_dim,
              int kv_heads) {
  a.qpb = PR_ROWS / a.group;
  a.tiles_per_split = plan.tiles_per_split;
  k.fn<<<dim3((unsigned)plan.qblocks, (unsigned)kv_heads, (unsigned)plan.splits), PR_WARPS * 32,
         k.smem, ctx->stream>>>(a);
  IQ_CUDA(ctx, cudaGetLastError());
  if (plan.splits > 1)
    IQ_TRY(merge_splits(ctx, a.out, a.part_acc, a.part_ml, a.n * a.heads, head_dim, plan.splits));
  return IQ_OK;
}
