/* kvq_prefill.cu: prompt attention over the quantized KV cache on tensor cores
 * (mma.sync m16n8k16, fp16 in, fp32 accumulate), flash-attention-2 style as
 * prefill_mma.cuh, for the layouts kvq_mma.cu reads (kvq_mma_supported) and
 * prompts whose rows fill half a block or more (kvq_prefill_fills); shorter
 * ones keep kvq_mma.cu's blocks of 8 / GQA queries.
 *
 * Two launches. kp_dequant_kernel, a block per (chunk, KV head), unpacks every
 * chunk the prompt's last query sees into an fp16 scratch (kvq_unpack.cuh: a
 * fragment's codes are one load and a few bit operations away, every value
 * scale · code + offset rounded once to fp16): one layer's fp16 K and V of the
 * quantized region, so that no attending block unpacks (unpacking in each
 * block cost 1.28x fp16's instructions; 4096-token prompts at depth 128k ran
 * at 0.89x fp16's rate on a 2-layer Llama-3-8B, from the scratch at 1.01x,
 * H100, session 22). Every call dequantizes the whole region again: a prompt
 * run in chunks (256 tokens a call by default) pays it per chunk, and a call of
 * few query blocks writes and reads several times the bytes that unpacking in
 * place would; neither case is measured yet (docs/next.md, item 5).
 *
 * kvq_prefill_kernel: grid (query blocks, kv_heads, splits), 8 warps. A block
 * holds KP_ROWS rows (query, head) of one KV head: KP_ROWS / GQA queries times
 * their GQA heads, warp w rows 16 w .. 16 w + 15, the blocks with the most keys
 * first, each K and V tile shared by the GQA heads. Q waits in shared memory,
 * so that two blocks fit a multiprocessor. Split 0 walks the fp16 positions
 * (sink, ring) the block's queries see; every split walks its chunks of the
 * scratch, 32 rows a tile, copied with cp.async one tile ahead. Each warp
 * computes S = Q Kᵀ (fragments by ldmatrix), masks the rows whose query sees a
 * chunk as fp16, updates its rows' online softmax and adds P V. One split
 * writes the output; several leave partials for merge_splits. */
#include <math.h>

#include <utility>

#include "cuda.cuh"
#include "checks.h"
#include "kvq.h"
#include "kvq_unpack.cuh"
#include "mma.cuh"
#include "prefill_mma.cuh"
#include "split_softmax.cuh"

constexpr int KP_WARPS = 8, KP_ROWS = 16 * KP_WARPS;
/* splits are sized so that each walks at least this many chunks */
constexpr int KP_MIN_CHUNKS = 8;

struct kp_args {
  const uint32_t *codes_k, *meta_k, *codes_v, *meta_v; /* KV head 0's chunk 0 */
  const __half *sink_k, *sink_v, *ring_k, *ring_v;
  __half *deq; /* the chunks dequantized: [kv head][chunk][K rows, V rows][32][D] */
  const float *q;
  float *out, *part_acc, *part_ml; /* partials when splits > 1 */
  int n, pos0, heads, group, qpb;  /* qpb: queries per block */
  int lag, head_chunks, chunks, chunks_per_split, sink, ring; /* chunks: in deq, per head */
  float qscale; /* the softmax scale times log2(e) */
  int e5m2;
};

/* Positions a query at position p sees quantized (kvq_quantized): whole chunks past the lag. */
__device__ __forceinline__ int kp_quantized(const kp_args &a, int p) {
  return p + 1 > a.lag ? (p + 1 - a.lag) / KM_CHUNK * KM_CHUNK : 0;
}

__device__ __forceinline__ void st_pair(__half *p, uint32_t v) { *reinterpret_cast<uint32_t *>(p) = v; }

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

/* A warp's rows over one tile of 32 key and value rows in shared memory: S = Q Kᵀ, then
 * prefill_mma.cuh's online softmax and P V; seen(row, key) masks a tile when masked is set. */
template <int D> struct kp_rows : fa_rows<D> {
  const __half *qs; /* the warp's 16 rows of Q times qscale in shared memory, padded */

  template <typename Seen>
  __device__ __forceinline__ void attend(const __half *kt, const __half *vt, int lane, bool masked,
                                         Seen seen) {
    constexpr int S = D + 8;
    const int tig = lane % 4;
    float s[KM_CHUNK / 8][4];
#pragma unroll
    for (int nt = 0; nt < KM_CHUNK / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kp = 0; kp < D / 32; kp++) { /* two k-steps: channels 32 kp .. + 31 */
      /* Q's A fragments (rows + 8 (i % 2), channels + 8 (i / 2) for matrix i) */
      uint32_t qa[2][4];
#pragma unroll
      for (int kk = 0; kk < 2; kk++)
        ldmatrix_x4(qa[kk],
                    qs + (lane % 8 + 8 * (lane / 8 % 2)) * S + 32 * kp + 16 * kk + 8 * (lane / 16));
#pragma unroll
      for (int nt = 0; nt < KM_CHUNK / 8; nt++) {
        uint32_t b[4];
        ldmatrix_x4(b, kt + (nt * 8 + lane % 8) * S + 32 * kp + 8 * (lane / 8));
        mma_16816(s[nt], qa[0], b[0], b[1]);
        mma_16816(s[nt], qa[1], b[2], b[3]);
      }
    }
    if (masked)
#pragma unroll
      for (int nt = 0; nt < KM_CHUNK / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (!seen(e / 2, nt * 8 + 2 * tig + e % 2)) s[nt][e] = -INFINITY;
    /* deep in a context the rows' maxima rarely move: a warp skips the rescale where none did */
    this->template update<KM_CHUNK, true>(s, vt, lane);
  }
};

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

/* Two blocks a multiprocessor: Q's fragments held in registers took 174-178 at head_dim 128, one
 * block, and prompts over a 128k cache ran 20% slower (H100, session 20). */
template <int D>
__global__ void __launch_bounds__(KP_WARPS * 32, 2) kvq_prefill_kernel(kp_args a) {
  constexpr int S = D + 8, TILE = KM_CHUNK * S; /* halves of a K or V tile */
  extern __shared__ __align__(16) __half kp_tiles[]; /* [2][K tile, V tile], Q tile */
  __half *qtile = kp_tiles + 4 * TILE;               /* [KP_ROWS][S] */
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int kvh = blockIdx.y, split = blockIdx.z;
  const int t0 = (gridDim.x - 1 - blockIdx.x) * a.qpb, queries = min(a.qpb, a.n - t0);
  const int rows = queries * a.group;
  /* the block's last query sees nq quantized positions, its first nq0 */
  const int len = a.pos0 + t0 + queries, nq = kp_quantized(a, len - 1);
  const int nq0 = kp_quantized(a, a.pos0 + t0);
  const int first = split * a.chunks_per_split, last = min(nq / KM_CHUNK, first + a.chunks_per_split);

  /* copies chunk `chunk`'s dequantized rows into tile pair `pair`; this split's first is on its
   * way before anything else (split 0's fp16 walk uses pair 1 first) */
  const __half *deq = a.deq + (int64_t)kvh * a.chunks * 2 * KM_CHUNK * D;
  auto copy_chunk = [&](int chunk, int pair) {
    const __half *src = deq + (int64_t)chunk * 2 * KM_CHUNK * D;
    __half *kt = kp_tiles + pair * 2 * TILE; /* rows 0-31 keys, 32-63 values: the V tile follows */
    for (int e = threadIdx.x; e < 2 * KM_CHUNK * D / 8; e += KP_WARPS * 32) {
      const int r = e / (D / 8), c = e % (D / 8) * 8;
      cp_async16(kt + r * S + c, src + (int64_t)r * D + c);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  if (first < last) copy_chunk(first, 0);

  /* this thread's rows: r0 = 16 warp + gid and r1 = r0 + 8 of the block, each a query (its
   * position and the positions it sees quantized) and a head */
  kp_rows<D> st;
  st.qs = qtile + 16 * warp * S;
  int pos[2], nqr[2];
  int64_t out_row[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int r = 16 * warp + gid + 8 * j, qi = r / a.group;
    const bool valid = r < rows;
    pos[j] = a.pos0 + t0 + (valid ? qi : 0);
    nqr[j] = kp_quantized(a, pos[j]);
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

  /* the fp16 positions (split 0): the sink, then the ring from the first query's quantized end,
   * 32 rows a tile, rows past the end zero; each row sees position x if x <= its position and x
   * is in the sink or not quantized for its query */
  const int sinkn = min(len, a.sink), fp16n = len - nq0;
  for (int base = 0; split == 0 && base < fp16n; base += KM_CHUNK) {
    __half *kt = kp_tiles + 2 * TILE, *vt = kt + TILE;
    for (int e = threadIdx.x; e < 2 * KM_CHUNK * D / 8; e += KP_WARPS * 32) {
      const int side = e / (KM_CHUNK * D / 8), r = e / (D / 8) % KM_CHUNK, c = e % (D / 8) * 8;
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
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads(); /* the tile's rows, and the first chunk's, are visible */
    if (busy)
      st.attend(kt, vt, lane, true, [&](int j, int col) {
        const int i = base + col, x = i < sinkn ? i : a.sink + nq0 + (i - sinkn);
        return i < fp16n && x <= pos[j] && (x < a.sink || x >= a.sink + nqr[j]);
      });
    __syncthreads(); /* the tile is free again */
  }

  /* the split's chunks from the scratch, each copied while the one before is attended: one
   * barrier a chunk (its tiles complete; every warp done with the other pair, which the next
   * chunk's copy then fills). A chunk at or past a row's quantized end is fp16 to that row (seen
   * above). */
  for (int chunk = first, i = 0; chunk < last; chunk++, i++) {
    __half *kt = kp_tiles + (i & 1) * 2 * TILE, *vt = kt + TILE;
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    if (chunk + 1 < last) copy_chunk(chunk + 1, (i + 1) & 1);
    if (busy)
      st.attend(kt, vt, lane, KM_CHUNK * chunk >= nq0,
                [&](int j, int) { return KM_CHUNK * chunk < nqr[j]; });
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

int kvq_prefill_fills(int n, int group) { return (int64_t)n * group >= KP_ROWS / 2; }

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

/* The scratch holds the splits' partials, then the dequantized chunks: one layer's fp16 K and V
 * of the quantized region (4 KB a token at 8 KV heads of 128). */
template <int D>
static int kp_launch(iq_ctx *ctx, const iq_kvq_params *p, const kp_args &base, int qblocks, float *out) {
  auto fn = kvq_prefill_kernel<D>;
  const size_t smem = sizeof(__half) * (4 * KM_CHUNK + KP_ROWS) * (D + 8);
  static int blocks_per_sm = 0;
  if (!blocks_per_sm) {
    IQ_CUDA(ctx, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    IQ_CUDA(ctx, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, fn, KP_WARPS * 32, smem));
    blocks_per_sm = blocks_per_sm > 0 ? blocks_per_sm : 1;
  }
  /* splits over the chunks where the query blocks alone leave the GPU short of a wave */
  kp_args a = base;
  const int kv_heads = p->kv_heads, chunks = a.chunks;
  const int64_t blocks = (int64_t)qblocks * kv_heads, wave = (int64_t)blocks_per_sm * ctx->sms;
  int64_t splits = blocks >= wave ? 1 : (wave + blocks - 1) / blocks;
  const int64_t most = (chunks + KP_MIN_CHUNKS - 1) / KP_MIN_CHUNKS;
  splits = splits > most ? most : splits;
  splits = splits < 1 ? 1 : splits;
  const int64_t per = (chunks + splits - 1) / splits;
  splits = per ? (chunks + per - 1) / per : 1;
  splits = splits < 1 ? 1 : splits;
  a.chunks_per_split = (int)(per ? per : 1);
  const size_t rows = (size_t)a.n * a.heads;
  const size_t part_bytes = splits > 1 ? sizeof(float) * (size_t)splits * rows * (D + 2) : 0;
  const size_t deq_bytes = sizeof(__half) * (size_t)kv_heads * chunks * 2 * KM_CHUNK * D;
  void *scratch;
  IQ_TRY(iq_scratch(ctx, part_bytes + deq_bytes, &scratch));
  a.part_acc = (float *)scratch;
  a.part_ml = a.part_acc + (size_t)splits * rows * D;
  a.deq = reinterpret_cast<__half *>((char *)scratch + part_bytes);
  if (chunks > 0) {
    const kp_dequant dq = kp_dequant_k<D>(p);
    IQ_CUDA(ctx, cudaFuncSetAttribute(dq.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dq.smem));
    dq.fn<<<dim3((unsigned)chunks, (unsigned)kv_heads), KP_WARPS * 32, dq.smem, ctx->stream>>>(a);
    IQ_CUDA(ctx, cudaGetLastError());
  }
  fn<<<dim3((unsigned)qblocks, (unsigned)kv_heads, (unsigned)splits), KP_WARPS * 32, smem,
       ctx->stream>>>(a);
  IQ_CUDA(ctx, cudaGetLastError());
  if (splits > 1) IQ_TRY(merge_splits(ctx, out, a.part_acc, a.part_ml, (int)rows, D, (int)splits));
  return IQ_OK;
}

/* Arguments are checked by iq_kvq_attention. */
int kvq_prefill_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                          const float *q, int n, int pos0, int heads, float scale) {
  const kvq_regions r = kvq_regions_of(p, layer);
  kp_args a = {};
  a.codes_k = r.codes_k, a.codes_v = r.codes_v;
  a.meta_k = reinterpret_cast<const uint32_t *>(r.meta_k);
  a.meta_v = reinterpret_cast<const uint32_t *>(r.meta_v);
  a.sink_k = reinterpret_cast<const __half *>(r.sink_k);
  a.sink_v = reinterpret_cast<const __half *>(r.sink_v);
  a.ring_k = reinterpret_cast<const __half *>(r.ring_k);
  a.ring_v = reinterpret_cast<const __half *>(r.ring_v);
  a.q = q;
  a.out = out;
  a.n = n, a.pos0 = pos0, a.heads = heads, a.group = heads / p->kv_heads;
  a.qpb = KP_ROWS / a.group;
  a.lag = p->sink + p->recent;
  a.head_chunks = (int)(kvq_quant_cap(p) / KM_CHUNK);
  a.sink = p->sink, a.ring = p->ring;
  a.qscale = scale * LOG2E;
  a.e5m2 = p->meta == IQ_META_E5M2;
  const int qblocks = (n + a.qpb - 1) / a.qpb;
  a.chunks = (int)(kvq_quantized(p, (int64_t)pos0 + n) / KM_CHUNK);
  return p->head_dim == 128 ? kp_launch<128>(ctx, p, a, qblocks, out)
                            : kp_launch<64>(ctx, p, a, qblocks, out);
}
