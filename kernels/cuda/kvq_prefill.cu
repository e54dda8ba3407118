/* kvq_prefill.cu: prompt attention over the quantized KV cache on tensor cores for the layouts
 * kvq_mma.cu reads (kvq_mma_supported) and prompts whose rows fill more than half of
 * prefill_rows.cu's block (kvq_prefill_fills); shorter ones keep kvq_mma.cu's blocks of
 * 8 / GQA queries.
 *
 * Where the chunks are unpacked depends on how many query blocks read them. A prompt of one
 * block a KV head (up to 32 tokens at GQA 4) unpacks each chunk in the block that attends over it
 * (kvq_prefill_chunks.cu), reading only the codes. A longer one dequantizes every chunk its last
 * query sees once per call into an fp16 scratch (kp_dequant_kernel, a block per chunk and KV
 * head: one layer's fp16 K and V of the quantized region), then attends over the scratch's rows
 * as tiles (prefill_rows.cu), so that no attending block unpacks: every block unpacking its
 * chunks costs more than the scratch's write and read from two blocks a KV head on (on the whole
 * Llama-3-8B at depth 128k, H100, session 24: 32-token calls 1.31x faster in place, 64-token
 * calls 0.93-0.98x, 128-token 0.84-0.90x). Both walk the fp16 sink and ring. */

#include "cuda.cuh"
#include "checks.h"
#include "kvq.h"
#include "kvq_chunk_tiles.cuh"
#include "kvq_layout.cuh"
#include "prefill_rows.cuh"

static_assert(KM_CHUNK == PR_TILE, "a chunk is one of prefill_rows.cu's tiles");

struct kp_args {
  const uint32_t *codes_k, *meta_k, *codes_v, *meta_v; /* KV head 0's chunk 0 */
  __half *deq; /* the chunks dequantized: [kv head][chunk][K rows, V rows][32][D] */
  int head_chunks, chunks; /* chunks: in deq, per head */
  int e5m2;
};

/* Dequantizes chunk blockIdx.x of KV head blockIdx.y into a.deq as fp16 K and V rows: the chunk's
 * words copied to shared memory, fp8 pairs widened, unpacked into padded tiles by the block, then
 * stored in rows of D. */
template <int D, int KB, int VB, int KG, int VG, bool F8>
__global__ void __launch_bounds__(KP_WARPS * 32) kp_dequant_kernel(kp_args a) {
  using ch = km_chunk<D, KB, VB, KG, VG, F8>;
  constexpr int S = D + 8;
  extern __shared__ __align__(16) uint32_t kp_smem[]; /* chunk words, K tile, V tile */
  __half *kt = reinterpret_cast<__half *>(kp_smem + ch::WORDS), *vt = kt + KM_CHUNK * S;
  const int chunk = blockIdx.x, kvh = blockIdx.y;
  stage_chunk<ch>(kp_smem, a.codes_k, a.meta_k, a.codes_v, a.meta_v,
                  (int64_t)kvh * a.head_chunks + chunk);
  cp_async_wait<0>();
  __syncthreads();
  widen_chunk<ch, F8>(kp_smem, a.e5m2);
  unpack_chunk<D, KB, VB, KG, VG>(kp_smem, kt, vt);
  __syncthreads();
  __half *dst = a.deq + ((int64_t)kvh * a.chunks + chunk) * 2 * KM_CHUNK * D;
  for (int e = threadIdx.x; e < 2 * KM_CHUNK * D / 8; e += KP_WARPS * 32) {
    const int r = e / (D / 8), c = e % (D / 8) * 8; /* rows 0-31 keys, 32-63 values */
    *reinterpret_cast<uint4 *>(dst + (int64_t)r * D + c) = *reinterpret_cast<const uint4 *>(kt + r * S + c);
  }
}

/* At 16 queries of GQA 4 (64 rows) kvq_mma.cu's blocks of 2 queries, each unpacking every chunk,
 * were 8-11% faster than dequantizing into the scratch; at 24 queries 6-18% slower (H200, session
 * 23). */
int kvq_prefill_fills(int n, int group) { return (int64_t)n * group > PR_ROWS / 2; }

/* Up to this many query blocks a KV head unpack the chunks themselves (src/engine/forward.ts's
 * PROMPT_ROWS_IN_PLACE plans no scratch for them). */
constexpr int KP_UNPACKING_BLOCKS = 1;

/* The dequantizing kernel of a layout (kvq_layout.cuh) and its shared memory, set at its first
 * use. */
struct kp_dequant {
  void (*fn)(kp_args);
  size_t smem;
};
struct kp_dequant_maker {
  iq_ctx *ctx;
  kp_dequant *k;
  template <int D, int KB, int VB, int KG, int VG, bool F8> int of() const {
    using ch = km_chunk<D, KB, VB, KG, VG, F8>;
    static int blocks = 0;
    k->fn = kp_dequant_kernel<D, KB, VB, KG, VG, F8>;
    k->smem = sizeof(uint32_t) * ch::WORDS + sizeof(__half) * 2 * KM_CHUNK * (D + 8);
    return iq_kernel_blocks(ctx, k->fn, KP_WARPS * 32, k->smem, &blocks);
  }
};

/* Arguments are checked by iq_kvq_attention. The scratch holds the splits' partials, then, where
 * the chunks are dequantized, one layer's fp16 K and V of the quantized region (4 KB a token at
 * 8 KV heads of 128). */
int kvq_prefill_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                          const float *q, int n, int pos0, int heads, float scale) {
  const kvq_regions r = kvq_regions_of(p, layer);
  const int d = p->head_dim, kv_heads = p->kv_heads, group = heads / kv_heads;
  const int chunks = (int)(kvq_quantized(p, (int64_t)pos0 + n) / KM_CHUNK);
  const bool unpacking = (n + PR_ROWS / group - 1) / (PR_ROWS / group) <= KP_UNPACKING_BLOCKS;
  pr_kernel k;
  IQ_TRY(unpacking ? kp_unpacking_kernel(ctx, p, &k) : pr_rows_kernel(ctx, d, false, &k));
  pr_plan plan;
  pr_plan_of(ctx, k, d, n, heads, kv_heads, chunks, &plan);
  const size_t deq_bytes = unpacking ? 0 : sizeof(__half) * (size_t)kv_heads * chunks * 2 * KM_CHUNK * d;
  void *scratch = nullptr;
  if (plan.part_bytes + deq_bytes) IQ_TRY(iq_scratch(ctx, plan.part_bytes + deq_bytes, &scratch));
  pr_args a = {};
  a.codes_k = r.codes_k, a.codes_v = r.codes_v;
  a.meta_k = reinterpret_cast<const uint32_t *>(r.meta_k);
  a.meta_v = reinterpret_cast<const uint32_t *>(r.meta_v);
  a.head_chunks = (int)(kvq_quant_cap(p) / KM_CHUNK);
  a.e5m2 = p->meta == IQ_META_E5M2;
  if (!unpacking) {
    __half *deq = reinterpret_cast<__half *>((char *)scratch + plan.part_bytes);
    if (chunks > 0) {
      kp_dequant dq;
      IQ_TRY(kvq_layout(p, kp_dequant_maker{ctx, &dq}));
      const kp_args ka = {a.codes_k, a.meta_k, a.codes_v, a.meta_v, deq, a.head_chunks, chunks, a.e5m2};
      dq.fn<<<dim3((unsigned)chunks, (unsigned)kv_heads), KP_WARPS * 32, dq.smem, ctx->stream>>>(ka);
      IQ_CUDA(ctx, cudaGetLastError());
    }
    a.k_tiles = deq, a.v_tiles = deq + KM_CHUNK * d;
    a.head_stride = (int64_t)chunks * 2 * KM_CHUNK * d, a.tile_stride = 2 * KM_CHUNK * d;
  }
  a.sink_k = reinterpret_cast<const __half *>(r.sink_k);
  a.sink_v = reinterpret_cast<const __half *>(r.sink_v);
  a.ring_k = reinterpret_cast<const __half *>(r.ring_k);
  a.ring_v = reinterpret_cast<const __half *>(r.ring_v);
  a.sink = p->sink, a.ring = p->ring, a.lag = p->sink + p->recent;
  a.q = q, a.out = out;
  a.part_acc = (float *)scratch;
  a.part_ml = scratch ? a.part_acc + (size_t)plan.splits * n * heads * d : nullptr;
  a.n = n, a.pos0 = pos0, a.heads = heads, a.group = group;
  a.qscale = scale * LOG2E;
  return pr_attend(ctx, a, k, plan, d, kv_heads);
}
