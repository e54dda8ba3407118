/* kvq_chunk_tiles.cuh: a chunk of the quantized cache (the layouts kvq_mma.cu reads) staged in
 * shared memory by a block and unpacked into padded fp16 K and V tiles of 32 rows (kvq_unpack.cuh:
 * a fragment's codes are one load and a few bit operations away, every value scale · code +
 * offset rounded once to fp16). Two users: kvq_prefill.cu's dequantizing kernel, which stores
 * the tiles into a scratch, and kvq_prefill_chunks.cu's tile source, which attends over them. */
#pragma once
#include <utility>

#include "cuda.cuh"
#include "kvq_unpack.cuh"
#include "mma.cuh"

constexpr int KP_WARPS = 8;

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

/* Value rows of channel tile CM (channels 16 CM .. + 15) in tile order (kvq_value_tile_slot):
 * the lane's A fragments of k-steps 0, 1 (value_codes: channels gid, gid + 8 at tokens 16 ks +
 * 2 tig, + 1 and + 8, + 9), raw codes made exact, then scale · code + offset per channel (VG
 * 0: a pair per channel) or per token (VG 32, KIVI's: a pair per token and group of 32
 * channels), stored transposed into the token rows. */
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

/* Starts the copies of chunk `at_chunk` (KV head times its chunks plus the chunk) of the four
 * regions into `words`, in ch's layout (fp8 pairs in the upper half of their region), as one
 * cp.async group. */
template <class ch>
__device__ __forceinline__ void stage_chunk(uint32_t *words, const uint32_t *codes_k,
                                            const uint32_t *meta_k, const uint32_t *codes_v,
                                            const uint32_t *meta_v, int64_t at_chunk) {
  const uint32_t *from[4] = {codes_k + at_chunk * ch::KC_WORDS, meta_k + at_chunk * ch::KM_SRC,
                             codes_v + at_chunk * ch::VC_WORDS, meta_v + at_chunk * ch::VM_SRC};
  constexpr int n[4] = {ch::KC_WORDS, ch::KM_SRC, ch::VC_WORDS, ch::VM_SRC};
  constexpr int at[4] = {ch::KC, ch::KM + ch::KM_WORDS - ch::KM_SRC, ch::VC,
                         ch::VM + ch::VM_WORDS - ch::VM_SRC};
#pragma unroll
  for (int i = 0; i < 4; i++)
    for (int e = threadIdx.x * 4; e < n[i]; e += KP_WARPS * 32 * 4)
      cp_async16_stream(words + at[i] + e, from[i] + e);
  asm volatile("cp.async.commit_group;\n" ::);
}

/* A staged chunk's fp8 pairs widened to fp16 in place (nothing without them), then a barrier. */
template <class ch, bool F8> __device__ __forceinline__ void widen_chunk(uint32_t *words, bool e5m2) {
  if constexpr (F8) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp == 0) widen_pairs<ch::KM_WORDS>(words + ch::KM, lane, e5m2);
    if (warp == 1) widen_pairs<ch::VM_WORDS>(words + ch::VM, lane, e5m2);
    __syncthreads();
  }
}

/* A staged chunk (fp16 pairs) unpacked into the K tile kt and V tile vt (rows of D + 8), each
 * warp a few fragments' worth. */
template <int D, int KB, int VB, int KG, int VG>
__device__ __forceinline__ void unpack_chunk(const uint32_t *words, __half *kt, __half *vt) {
  using ch = km_chunk<D, KB, VB, KG, VG, false>; /* the staged regions' offsets, pairs widened */
  constexpr int KU = KG ? 2 * (D / 32) : D / 16; /* key units: one per warp at head_dim 128 */
  const uint32_t h = 0x64006400u;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unpack_key_units<D, KB, KG>(std::make_integer_sequence<int, KU>(), words + ch::KC,
                              words + ch::KM, kt, warp, lane, h);
  unpack_value_tiles<D, VB, VG, KU>(std::make_integer_sequence<int, D / 16>(), words + ch::VC,
                                    words + ch::VM, vt, warp, lane, h);
}
