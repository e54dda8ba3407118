/* kvq_prefill.cu: prompt attention over the quantized KV cache on tensor cores
 * for the layouts kvq_mma.cu reads (kvq_mma_supported) and prompts whose rows
 * fill more than half of prefill_rows.cu's block (kvq_prefill_fills); shorter
 * ones keep kvq_mma.cu's blocks of 8 / GQA queries.
 *
 * Two launches. kp_dequant_kernel, a block per (chunk, KV head), unpacks every
 * chunk the prompt's last query sees into an fp16 scratch (kvq_unpack.cuh: a
 * fragment's codes are one load and a few bit operations away, every value
 * scale · code + offset rounded once to fp16): one layer's fp16 K and V of the
 * quantized region, so that no attending block unpacks (unpacking in each
 * block cost 1.28x fp16's instructions; 4096-token prompts at depth 128k ran
 * at 0.89x fp16's rate on a 2-layer Llama-3-8B, from the scratch at 1.01x,
 * H100, session 22). prefill_rows.cu then attends over the scratch's chunks as
 * tiles and over the fp16 sink and ring. Every call dequantizes the whole
 * region again: a 256-token call at depth 128k (generate's chunk) ran 1.12x
 * faster than unpacking in place, a 32-token one 1.32x slower (whole
 * Llama-3-8B, H100, session 23, docs/perf.md). */

#include <utility>

#include "cuda.cuh"
#include "checks.h"
#include "kvq.h"
#include "kvq_unpack.cuh"
#include "mma.cuh"
#include "prefill_rows.cuh"

constexpr int KP_WARPS = 8;
static_assert(KM_CHUNK == PR_TILE, "a chunk is one of prefill_rows.cu's tiles");

struct kp_args {
  const uint32_t *codes_k, *meta_k, *codes_v, *meta_v; /* KV head 0's chunk 0 */
  __half *deq; /* the chunks dequantized: [kv head][chunk][K rows, V rows][32][D] */
  int head_chunks, chunks; /* chunks: in deq, per head */
  int e5m2;
};

/* Key rows of unit u (m-tile u / R of 16 tokens, run u % R of 32 channels), keys grouped over
 * channels in fragment order: lane (gid, tig) holds tokens gid, gid + 8 at channels 16 ks +
 * 2 tig, + 1 and + 8, + 9 of the run's k-steps ks; each value is its group's scale · code +
 * offset, one fp16 FMA. */
template <int D, int KB, int KG, int U>
__device__ __forceinline__ void unpack_keys_grouped(const uint32_t *codes, const uint32_t *meta,
                                                    __half *kt, int lane, uint32_t h) {
  constexpr int R = D / 32, KROW = D * KB / 32, KPG = KG / 16, KGW = D / KG, S = D + 8, r = U % R;
  const int gid = lane / 4, tig = lane % 4, row = 16 * (U / R) + gid;
  quad_share<KB, R> w[2];
  w[0].load(codes + row * KROW, tig);
  w[1].load(codes + (row + 8) * KROW, tig);
#pragma unroll
  for (int half = 0; half < 2; half++) { /* token row, then row + 8 */
    uint32_t x[4];
    w[half].pairs(r, h, x);
    const int t = row + 8 * half;
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
      const int ks = 2 * r + kk;
      const uint32_t m = meta[t * KGW + ks / KPG];
      const uint32_t sc = __byte_perm(m, 0, 0x1010), of = __byte_perm(m, 0, 0x3232);
      st_pair(kt + t * S + 16 * ks + 2 * tig, hfma2(x[2 * kk], sc, of));
      st_pair(kt + t * S + 16 * ks + 8 + 2 * tig, hfma2(x[2 * kk + 1], sc, of));
    }
  }
}

/* Key rows of k-step u (channels 16 u .. 16 u + 15), keys grouped over the chunk in tile order
 * (kvq_key_tile_slot): pair j of the lane's units is channels (c, c + 1) at token gid + 8 j,
 * each channel with its own (scale, offset). */
template <int D, int KB, int u>
__device__ __forceinline__ void unpack_keys_tiled(const uint32_t *codes, const uint32_t *meta,
                                                  __half *kt, int lane, uint32_t h) {
  constexpr int S = D + 8;
  const int gid = lane / 4, tig = lane % 4;
  uint32_t x[2][4];
  key_tile_pairs<KB, false>(codes, u, lane, h, x[0], x[1]);
#pragma unroll
  for (int half = 0; half < 2; half++) { /* channels 2 tig, + 1, then + 8, + 9 */
    const int c = 16 * u + 8 * half + 2 * tig;
    const uint2 m = *reinterpret_cast<const uint2 *>(meta + c);
    const uint32_t sc = __byte_perm(m.x, m.y, 0x5410), of = __byte_perm(m.x, m.y, 0x7632);
#pragma unroll
    for (int j = 0; j < 4; j++) st_pair(kt + (gid + 8 * j) * S + c, hfma2(x[half][j], sc, of));
  }
}

/* Value rows of channel tile CM (channels 16 CM .. + 15) in tile order (kvq_value_tile_slot):
 * the lane's A fragments of k-steps 0, 1 (value_codes: channels gid, gid + 8 at tokens 16 ks +
 * 2 tig, + 1 and + 8, + 9), raw codes made exact, then scale · code + offset per channel (VG
 * 0: a pair per channel) or per token (VG 32, KIVI's: a pair per token and group of 32
 * channels), stored transposed into the token rows. */
/* The key units U... of a chunk (KG: 2 m-tiles times D / 32 runs; keys over the chunk: D / 16
 * k-steps), unit U by warp U % KP_WARPS. */
template <int D, int KB, int KG, int... U>
__device__ __forceinline__ void unpack_key_units(std::integer_sequence<int, U...>,
                                                 const uint32_t *codes, const uint32_t *meta,
                                                 __half *kt, int warp, int lane, uint32_t h) {
  if constexpr (KG)
    ((U % KP_WARPS == warp ? unpack_keys_grouped<D, KB, KG, U>(codes, meta, kt, lane, h) : void()),
     ...);
  else
    ((U % KP_WARPS == warp ? unpack_keys_tiled<D, KB, U>(codes, meta, kt, lane, h) : void()), ...);
}

template <int D, int VB, int VG, int CM>
__device__ __forceinline__ void unpack_values(const uint32_t *codes, const uint32_t *meta,
                                              __half *vt, int lane, uint32_t h) {
  constexpr int S = D + 8, PER = 8 / VB, E0 = VB * (2 * CM % PER), E1 = VB * ((2 * CM + 1) % PER);
  constexpr int NG = D / 32, W0 = 2 * CM / PER * 2, W1 = (2 * CM + 1) / PER * 2;
  const int gid = lane / 4, tig = lane % 4;
  uint32_t vw[W1 + 2]; /* the lane's words (kvq.h: w / 4 * 128 + lane * 4 + w % 4); value_codes
                          reads W0, W0 + 1, W1, W1 + 1 */
#pragma unroll
  for (int w = W0; w < W1 + 2; w++) vw[w] = codes[w / 4 * 128 + lane * 4 + w % 4];
#pragma unroll
  for (int ks = 0; ks < 2; ks++) {
    uint32_t fr[4];
    value_codes<VB, CM>(vw, ks, h, fr);
#pragma unroll
    for (int i = 0; i < 4; i++) { /* channel 16 CM + gid (+ 8 for odd i), tokens t, t + 1 */
      const int c = 16 * CM + gid + i % 2 * 8, t = 16 * ks + i / 2 * 8 + 2 * tig;
      const uint32_t code = i % 2 ? raw_code<E1>(fr[i], h) : raw_code<E0>(fr[i], h);
      uint32_t sc, of;
      if constexpr (VG) {
        const uint32_t m0 = meta[t * NG + c / 32], m1 = meta[(t + 1) * NG + c / 32];
        sc = __byte_perm(m0, m1, 0x5410), of = __byte_perm(m0, m1, 0x7632);
      } else {
        const uint32_t m = meta[c];
        sc = __byte_perm(m, 0, 0x1010), of = __byte_perm(m, 0, 0x3232);
      }
      const uint32_t v = hfma2(code, sc, of);
      vt[t * S + c] = __ushort_as_half((unsigned short)(v & 0xFFFFu));
      vt[(t + 1) * S + c] = __ushort_as_half((unsigned short)(v >> 16));
    }
  }
}

/* The value tiles CM... of a chunk, tile CM by warp (U0 + CM) % KP_WARPS (U0: the key units,
 * so that both sides spread over the warps). */
template <int D, int VB, int VG, int U0, int... CM>
__device__ __forceinline__ void unpack_value_tiles(std::integer_sequence<int, CM...>,
                                                   const uint32_t *codes, const uint32_t *meta,
                                                   __half *vt, int warp, int lane, uint32_t h) {
  (((U0 + CM) % KP_WARPS == warp ? unpack_values<D, VB, VG, CM>(codes, meta, vt, lane, h) : void()),
   ...);
}

/* Dequantizes chunk blockIdx.x of KV head blockIdx.y into a.deq as fp16 K and V rows: the chunk's
 * words copied to shared memory, fp8 pairs widened, unpacked into padded tiles by the block (each
 * warp a few fragments' worth), then stored in rows of D. */
template <int D, int KB, int VB, int KG, int VG, bool F8>
__global__ void __launch_bounds__(KP_WARPS * 32) kp_dequant_kernel(kp_args a) {
  using ch = km_chunk<D, KB, VB, KG, VG, F8>;
  constexpr int S = D + 8, KU = KG ? 2 * (D / 32) : D / 16; /* key units: one per warp at 128 */
  extern __shared__ __align__(16) uint32_t kp_smem[]; /* chunk words, K tile, V tile */
  __half *kt = reinterpret_cast<__half *>(kp_smem + ch::WORDS), *vt = kt + KM_CHUNK * S;
  const uint32_t h = 0x64006400u;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, chunk = blockIdx.x, kvh = blockIdx.y;
  const int64_t at_chunk = (int64_t)kvh * a.head_chunks + chunk;
  const uint32_t *from[4] = {a.codes_k + at_chunk * ch::KC_WORDS, a.meta_k + at_chunk * ch::KM_SRC,
                             a.codes_v + at_chunk * ch::VC_WORDS, a.meta_v + at_chunk * ch::VM_SRC};
  constexpr int words[4] = {ch::KC_WORDS, ch::KM_SRC, ch::VC_WORDS, ch::VM_SRC};
  constexpr int at[4] = {ch::KC, ch::KM + ch::KM_WORDS - ch::KM_SRC, ch::VC,
                         ch::VM + ch::VM_WORDS - ch::VM_SRC};
#pragma unroll
  for (int i = 0; i < 4; i++)
    for (int e = threadIdx.x * 4; e < words[i]; e += KP_WARPS * 32 * 4)
      cp_async16_stream(kp_smem + at[i] + e, from[i] + e);
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  if constexpr (F8) { /* fp8 pairs to fp16, in place */
    if (warp == 0) widen_pairs<ch::KM_WORDS>(kp_smem + ch::KM, lane, a.e5m2);
    if (warp == 1) widen_pairs<ch::VM_WORDS>(kp_smem + ch::VM, lane, a.e5m2);
    __syncthreads();
  }
  unpack_key_units<D, KB, KG>(std::make_integer_sequence<int, KU>(), kp_smem + ch::KC,
                              kp_smem + ch::KM, kt, warp, lane, h);
  unpack_value_tiles<D, VB, VG, KU>(std::make_integer_sequence<int, D / 16>(), kp_smem + ch::VC,
                                    kp_smem + ch::VM, vt, warp, lane, h);
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

/* The dequantizing kernel of p's layout, and its shared memory. */
struct kp_dequant {
  void (*fn)(kp_args);
  size_t smem;
};

template <int D, int KB, int VB, int KG, int VG, bool F8> static kp_dequant kp_dequant_of() {
  using ch = km_chunk<D, KB, VB, KG, VG, F8>;
  return {kp_dequant_kernel<D, KB, VB, KG, VG, F8>,
          sizeof(uint32_t) * ch::WORDS + sizeof(__half) * 2 * KM_CHUNK * (D + 8)};
}

template <int D, int KB, int VB, bool F8> static kp_dequant kp_dequant_g(const iq_kvq_params *p) {
  if (p->v_axis == IQ_AXIS_CHANNELS) return kp_dequant_of<D, KB, VB, 0, 32, F8>();
  if (p->k_axis == IQ_AXIS_TOKENS) return kp_dequant_of<D, KB, VB, 0, 0, F8>();
  switch (p->k_group) {
  case 16: return kp_dequant_of<D, KB, VB, 16, 0, F8>();
  case 32: return kp_dequant_of<D, KB, VB, 32, 0, F8>();
  case 64: return kp_dequant_of<D, KB, VB, 64, 0, F8>();
  default: return kp_dequant_of<D, KB, VB, (D < 128 ? D : 128), 0, F8>();
  }
}

template <int D, int KB, int VB> static kp_dequant kp_dequant_m(const iq_kvq_params *p) {
  return p->meta == IQ_META_F16 ? kp_dequant_g<D, KB, VB, false>(p) : kp_dequant_g<D, KB, VB, true>(p);
}

template <int D, int KB> static kp_dequant kp_dequant_v(const iq_kvq_params *p) {
  switch (p->v_bits) {
  case 2: return kp_dequant_m<D, KB, 2>(p);
  case 4: return kp_dequant_m<D, KB, 4>(p);
  default: return kp_dequant_m<D, KB, 8>(p);
  }
}

template <int D> static kp_dequant kp_dequant_k(const iq_kvq_params *p) {
  switch (p->k_bits) {
  case 2: return kp_dequant_v<D, 2>(p);
  case 4: return kp_dequant_v<D, 4>(p);
  default: return kp_dequant_v<D, 8>(p);
  }
}

/* Arguments are checked by iq_kvq_attention. The scratch holds the splits' partials, then the
 * dequantized chunks: one layer's fp16 K and V of the quantized region (4 KB a token at 8 KV
 * heads of 128). */
int kvq_prefill_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                          const float *q, int n, int pos0, int heads, float scale) {
  const kvq_regions r = kvq_regions_of(p, layer);
  const int d = p->head_dim, kv_heads = p->kv_heads;
  const int chunks = (int)(kvq_quantized(p, (int64_t)pos0 + n) / KM_CHUNK);
  pr_plan plan;
  IQ_TRY(pr_plan_of(ctx, d, false, n, heads, kv_heads, chunks, &plan));
  const size_t deq_bytes = sizeof(__half) * (size_t)kv_heads * chunks * 2 * KM_CHUNK * d;
  void *scratch;
  IQ_TRY(iq_scratch(ctx, plan.part_bytes + deq_bytes, &scratch));
  kp_args k = {};
  k.codes_k = r.codes_k, k.codes_v = r.codes_v;
  k.meta_k = reinterpret_cast<const uint32_t *>(r.meta_k);
  k.meta_v = reinterpret_cast<const uint32_t *>(r.meta_v);
  k.deq = reinterpret_cast<__half *>((char *)scratch + plan.part_bytes);
  k.head_chunks = (int)(kvq_quant_cap(p) / KM_CHUNK);
  k.chunks = chunks;
  k.e5m2 = p->meta == IQ_META_E5M2;
  if (chunks > 0) {
    const kp_dequant dq = d == 128 ? kp_dequant_k<128>(p) : kp_dequant_k<64>(p);
    IQ_CUDA(ctx, cudaFuncSetAttribute(dq.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dq.smem));
    dq.fn<<<dim3((unsigned)chunks, (unsigned)kv_heads), KP_WARPS * 32, dq.smem, ctx->stream>>>(k);
    IQ_CUDA(ctx, cudaGetLastError());
  }
  pr_args a = {};
  a.k_tiles = k.deq, a.v_tiles = k.deq + KM_CHUNK * d;
  a.head_stride = (int64_t)chunks * 2 * KM_CHUNK * d, a.tile_stride = 2 * KM_CHUNK * d;
  a.sink_k = reinterpret_cast<const __half *>(r.sink_k);
  a.sink_v = reinterpret_cast<const __half *>(r.sink_v);
  a.ring_k = reinterpret_cast<const __half *>(r.ring_k);
  a.ring_v = reinterpret_cast<const __half *>(r.ring_v);
  a.sink = p->sink, a.ring = p->ring, a.lag = p->sink + p->recent;
  a.q = q, a.out = out;
  a.part_acc = (float *)scratch;
  a.part_ml = a.part_acc + (size_t)plan.splits * n * heads * d;
  a.n = n, a.pos0 = pos0, a.heads = heads, a.group = heads / kv_heads;
  a.qscale = scale * LOG2E;
  return pr_attend(ctx, a, plan, d, kv_heads, false);
}
