/* kvq_mma.cu: attention over the quantized KV cache on tensor cores (mma.sync
 * m16n8k16, fp16 in, fp32 accumulate) for values in blocks of 32 tokens and
 * keys grouped over channels (groups of 16 or more: InnerQ) or over the same
 * blocks of tokens (the kaxis=tokens mix), and for KIVI's layout (keys over
 * blocks of 32 tokens, values over groups of 32 channels), 2, 4 or 8 bits,
 * fp16 or fp8 pairs, head_dim 64 or 128, up to 8 query heads per KV head. kvq_attention.cu calls it where
 * kvq_mma_supported says so and runs its SIMT kernel otherwise.
 *
 * grid (kv_heads, 1 + splits, query blocks), 4 warps a block. A block takes
 * one query (decode) or, in prefill, as many as their heads fill the MMAs' 8
 * columns (km_col_row), so a chunk unpacked once serves them all. Split 0
 * walks the queries' fp16 positions (sink, ring); the others walk chunks of 32 quantized
 * tokens (one value block), each warp its own chunks, copied to its own
 * shared memory with cp.async one chunk ahead. Per chunk a warp computes
 *   Sᵀ (32 tokens x 8 heads) = K codes (A operand) · q (B, held in registers),
 * folding each key group's pair as s += scale · (codes · q) + offset · Σ q
 * (keys over tokens: q times each channel's scale is the B operand, and the
 * offsets take one more MMA);
 * updates its heads' online softmax (Σ p by one more MMA); turns P into the B
 * operand of the values in registers (movmatrix transposes the score
 * fragment); and computes
 *   outᵀ (channels x heads) += V codes (A) · Pᵀ,
 * folding each block's pair as out += scale · (codes · p) + offset · Σ p
 * (values over channels: each token's scale goes into Pᵀ, value_groups).
 * The codes are stored in fragment or tile order (kvq.h), so a thread's share
 * of an A operand is one load and one bit operation per fp16 pair: a code c
 * OR-ed under 0x6400 is the fp16 1024 + c; keys over tokens and values enter
 * the MMA so (raw), the 1024 and the code's place in its byte taken off the
 * fp32 sums after. q and p are rounded to fp16 as the tensor cores
 * take them, as in prefill_rows.cu; sums and the softmax are fp32. The 4 warps
 * merge into one partial per block (at short contexts each warp leaves its
 * own), merge_splits_kernel the splits. */
#include <math.h>

#include <utility>

#include "cuda.cuh"
#include "checks.h"
#include "kvq.h"
#include "kvq_layout.cuh"
#include "kvq_unpack.cuh"
#include "mma.cuh"
#include "split_softmax.cuh"

constexpr int KM_WARPS = 4, KM_HEADS = 8;

/* The kernel's parameters, 112 bytes in the order it reads them. At short contexts a block is
 * the first on its multiprocessor, and each constant-cache line of parameters it touches is a
 * serial miss (ncu: stall_imc on ULDC): a quantized split's first copies need only the first
 * 48 bytes (the line that starts the parameter bank at 0x210), q the next 64. Regions are offsets
 * from the layer in 256-byte units (kvq_offsets aligns them so), the cache's geometry what the
 * kernel needs of iq_kvq_params (blocks of KM_CHUNK tokens: kvq_mma_supported). */
struct km_args {
  const char *layer;
  uint32_t codes_k, meta_k, codes_v, meta_v; /* region offsets / 256 */
  int pos0, lag, chunks_per_split, head_chunks; /* lag: sink + recent; head_chunks: quant_cap / 32 */
  int heads, group;
  const float *q;
  float *part_acc; /* then part_ml, [rows, {max, sum}] */
  uint32_t sink_k, sink_v, ring_k, ring_v;
  int sink, ring;
  float qscale; /* the softmax scale times log2(e) */
  uint32_t h1024; /* 0x64006400, from the host so that it stays in a register (under_1024) */
  int warp_rows;  /* each warp leaves its own partial (short contexts), else each block one */
  int e5m2;       /* fp8 pairs are e5m2, else e4m3 */
  int n, qpb;     /* queries, and queries per block: their heads share the 8 columns (km_col_row) */
};

static_assert(sizeof(km_args) == 112, "km_args: two constant-cache lines");

template <typename T> __device__ __forceinline__ const T *km_region(const km_args &a, uint32_t off) {
  return reinterpret_cast<const T *>(a.layer + (uint64_t)off * 256);
}

/* Column c of a block whose first query is t0 holds head h0 + c % group of query t0 + c / group
 * when the block packs queries (P), else head h0 + c of query t0; km_col_row is its row of
 * [n, heads]. */
template <bool P> __device__ __forceinline__ int km_col_query(const km_args &a, int t0, int c) {
  return P ? t0 + c / a.group : t0;
}
template <bool P>
__device__ __forceinline__ int64_t km_col_row(const km_args &a, int t0, int h0, int c) {
  return (int64_t)km_col_query<P>(a, t0, c) * a.heads + h0 + (P ? c % a.group : c);
}

/* Positions a query at position p sees quantized (kvq_quantized): whole chunks past the lag. */
__device__ __forceinline__ int km_quantized(const km_args &a, int p) {
  return p + 1 > a.lag ? (p + 1 - a.lag) / KM_CHUNK * KM_CHUNK : 0;
}

/* One warp's stage: a chunk (km_chunk), or the fp16 tile (16 key and 16 value rows, padded). */
template <int D, int KB, int VB, int KG, int VG, bool F8>
struct km_stage : km_chunk<D, KB, VB, KG, VG, F8> {
  static constexpr int TILE = KM_CHUNK * (D + 8) / 2;
  static constexpr int WORDS = km_chunk<D, KB, VB, KG, VG, F8>::WORDS;
  static constexpr int WARP_WORDS = 2 * WORDS > TILE ? 2 * WORDS : TILE;
};

/* A lane's first words (lane * 4 on) of its KV head's quantized chunk 0 in each region. */
struct km_source {
  const uint32_t *kc, *km, *vc, *vm;
};

/* Issues the copies of quantized chunk `chunk` into the stage dst. */
template <int D, int KB, int VB, int KG, int VG, bool F8>
__device__ __forceinline__ void stage_chunk(const km_source &src, uint32_t *dst, int chunk,
                                            int lane) {
  using st = km_stage<D, KB, VB, KG, VG, F8>;
  const uint32_t *from[4] = {src.kc + chunk * st::KC_WORDS, src.km + chunk * st::KM_SRC,
                             src.vc + chunk * st::VC_WORDS, src.vm + chunk * st::VM_SRC};
  constexpr int words[4] = {st::KC_WORDS, st::KM_SRC, st::VC_WORDS, st::VM_SRC};
  constexpr int at[4] = {st::KC, st::KM + st::KM_WORDS - st::KM_SRC, st::VC,
                         st::VM + st::VM_WORDS - st::VM_SRC};
  uint32_t *to = dst + lane * 4;
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int e = 0; e < words[i]; e += 128)
      if (words[i] % 128 == 0 || e + lane * 4 < words[i]) cp_async16_stream(to + at[i] + e, from[i] + e);
  asm volatile("cp.async.commit_group;\n" ::);
}

/* A warp's running softmax and output for its 8 heads: this thread holds
 * heads 2 tig, 2 tig + 1 and, per 16-channel tile cm, channels 16 cm + gid
 * and + 8 (acc[cm] = {(gid, h0), (gid, h1), (gid + 8, h0), (gid + 8, h1)});
 * values over channels (KIVI's) keep Σ p offset of group gid % (D / 32) apart
 * in off ({h0, h1, h0, h1}), added to acc after the last chunk (value_offsets). */
template <int D> struct km_state {
  float m[2], l[2], acc[D / 16][4], off[4];
};

/* The softmax step of a chunk's scores s[mt][.] (tokens 16 mt + gid and + 8,
 * heads 2 tig, + 1; -inf for none): rescales the state, and returns the B
 * operands of Pᵀ per 16-token k-step and 1024 Σ p per head (of the fp16 p, from
 * one MMA per k-step with A all 1024: exact, no shuffles). The running maximum
 * moves only when a score passes it by more than MAX_LAG (log2 units), so p <=
 * 2^MAX_LAG and most chunks skip the rescale. */
constexpr float MAX_LAG = 8.0f;
/* A head's running maximum before it has seen a position: finite, so that a chunk or piece its
 * query does not see (scores all -inf) gives p = 2^-inf = 0 and leaves the state as it was. */
constexpr float KM_NONE = -1e30f;
template <int D>
__device__ __forceinline__ void chunk_softmax(km_state<D> &st, const float s[2][4], uint32_t h,
                                              uint32_t pb[2][2], float ps[2]) {
  float corr[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    float mx = fmaxf(fmaxf(s[0][j], s[0][j + 2]), fmaxf(s[1][j], s[1][j + 2]));
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    /* m is finite: KM_NONE until a score passes it */
    const float m = mx > st.m[j] + MAX_LAG ? mx : st.m[j];
    corr[j] = m == st.m[j] ? 1.0f : fast_exp2(st.m[j] - m);
    st.m[j] = m;
  }
#pragma unroll
  for (int mt = 0; mt < 2; mt++) {
    uint32_t row[2];
#pragma unroll
    for (int r = 0; r < 2; r++)
      row[r] = pack_half2(fast_exp2(s[mt][2 * r] - st.m[0]), fast_exp2(s[mt][2 * r + 1] - st.m[1]));
    pb[mt][0] = transpose_8x8(row[0]);
    pb[mt][1] = transpose_8x8(row[1]);
  }
  float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const uint32_t fh[4] = {h, h, h, h};
  mma_16816(sum, fh, pb[0][0], pb[0][1]);
  mma_16816(sum, fh, pb[1][0], pb[1][1]);
#pragma unroll
  for (int j = 0; j < 2; j++) {
    ps[j] = sum[j];
    st.l[j] = st.l[j] * corr[j] + sum[j] * (1.0f / 1024.0f);
  }
  if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
    for (int cm = 0; cm < D / 16; cm++) {
      st.acc[cm][0] *= corr[0];
      st.acc[cm][1] *= corr[1];
      st.acc[cm][2] *= corr[0];
      st.acc[cm][3] *= corr[1];
    }
#pragma unroll
    for (int i = 0; i < 4; i++) st.off[i] *= corr[i % 2];
  }
}

/* tmp += the raw codes of channel tile CM (value_codes) · B over a chunk's two k-steps. */
template <int VB, int CM>
__device__ __forceinline__ void value_mma(float tmp[4], const uint32_t *vw, const uint32_t b[2][2],
                                          uint32_t h) {
#pragma unroll
  for (int ks = 0; ks < 2; ks++) {
    uint32_t fr[4];
    value_codes<VB, CM>(vw, ks, h, fr);
    mma_16816(tmp, fr, b[ks][0], b[ks][1]);
  }
}

/* The value MMAs of channel tile CM over a chunk: A from the lane's words vw in
 * tile order (kvq_value_tile_slot), unpacked raw (1024 + f code, f = 2^(VB j)
 * for the row's code place j), B = Pᵀ; then per channel c (rows gid, gid + 8),
 * with its (scale, offset) pair in vm and 1024 Σ p = ps,
 *   out += scale · Σ p code + offset · Σ p = scale / f · tmp + (offset / 1024 - scale / f) · ps. */
template <int D, int VB, int CM>
__device__ __forceinline__ void value_tile(km_state<D> &st, const uint32_t *vw, const uint32_t *vm,
                                           const uint32_t pb[2][2], const float ps[2], int gid,
                                           uint32_t h) {
  float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  value_mma<VB, CM>(tmp, vw, pb, h);
  const int c0 = 16 * CM + gid;
  const float2 so0 = pair_f2(vm[c0]), so1 = pair_f2(vm[c0 + 8]);
  const float sf0 = so0.x * value_factor_inv<VB, CM>(0), sf1 = so1.x * value_factor_inv<VB, CM>(1);
  const float of0 = so0.y * (1.0f / 1024.0f) - sf0, of1 = so1.y * (1.0f / 1024.0f) - sf1;
  /* two FMAs each (a + (b + c) would take three) */
  st.acc[CM][0] = fmaf(sf0, tmp[0], fmaf(of0, ps[0], st.acc[CM][0]));
  st.acc[CM][1] = fmaf(sf0, tmp[1], fmaf(of0, ps[1], st.acc[CM][1]));
  st.acc[CM][2] = fmaf(sf1, tmp[2], fmaf(of1, ps[0], st.acc[CM][2]));
  st.acc[CM][3] = fmaf(sf1, tmp[3], fmaf(of1, ps[1], st.acc[CM][3]));
}

template <int D, int VB, int... CM>
__device__ __forceinline__ void value_tiles(std::integer_sequence<int, CM...>, km_state<D> &st,
                                            const uint32_t *vw, const uint32_t *vm,
                                            const uint32_t pb[2][2], const float ps[2], int gid,
                                            uint32_t h) {
  (value_tile<D, VB, CM>(st, vw, vm, pb, ps, gid, h), ...);
}

/* Values grouped over channels (KIVI's: a pair per token and group of 32 channels): a token's
 * scale varies along the MMAs' k (tokens), so it goes into B: per group, Bg = Pᵀ times each
 * token's scale, rounded to fp16 (a scale above 2^16 / 2^MAX_LAG = 256 would overflow it). The
 * codes enter raw (1024 + f code, value_codes), so an MMA per k-step with A all -1024 and the
 * same fp16 Bg the codes meet starts each tile's sums at -1024 Σ Bg (the 1024s cancel to fp32
 * rounding). The offsets are the same for a group's 32 channels: one MMA per k-step sums Σ p
 * offset for every group at once (value_offsets). Per channel row (heads 2 tig, + 1)
 *   out += (Σ Bg (1024 + f code) - 1024 Σ Bg) / f   (+ Σ p offset, after the last chunk).
 * A group's two channel tiles T take the code places of tiles 0 and 1 (a group's first tile is
 * even), and their words are the group's VB of the lane's, loaded per group from shared memory
 * (vc: the lane's first word of the chunk's value codes). vm holds the chunk's pairs token by
 * token, a word (scale, offset) per group. */
template <int D, int VB, int G, int T>
__device__ __forceinline__ void value_group_tile(km_state<D> &st, const uint32_t *gw,
                                                 const uint32_t bg[2][2], const float base[4],
                                                 uint32_t h) {
  float tmp[4] = {base[0], base[1], base[2], base[3]};
  value_mma<VB, T>(tmp, gw, bg, h);
  constexpr int CM = 2 * G + T;
#pragma unroll
  for (int i = 0; i < 4; i++) /* row gid (i < 2) or gid + 8 */
    st.acc[CM][i] = fmaf(value_factor_inv<VB, T>(i / 2), tmp[i], st.acc[CM][i]);
}

template <int D, int VB, int G>
__device__ __forceinline__ void value_group(km_state<D> &st, const uint32_t *vc, const uint32_t *vm,
                                            const uint32_t pb[2][2], int tig, uint32_t h) {
  constexpr int NG = D / 32, GW = VB; /* groups; a group's words per lane (8 / (8 / VB)) */
  uint32_t gw[GW];                    /* the lane's words GW G .. (kvq_value_tile_slot) */
  if constexpr (GW == 2) {
    const uint2 x = *reinterpret_cast<const uint2 *>(vc + G / 2 * 128 + G % 2 * 2);
    gw[0] = x.x, gw[1] = x.y;
  } else {
#pragma unroll
    for (int i = 0; i < GW / 4; i++) {
      const uint4 x = *reinterpret_cast<const uint4 *>(vc + (GW / 4 * G + i) * 128);
      gw[4 * i] = x.x, gw[4 * i + 1] = x.y, gw[4 * i + 2] = x.z, gw[4 * i + 3] = x.w;
    }
  }
  uint32_t bg[2][2];
  float base[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  constexpr uint32_t NEG1024 = 0xE400E400u;
  const uint32_t fn[4] = {NEG1024, NEG1024, NEG1024, NEG1024};
#pragma unroll
  for (int ks = 0; ks < 2; ks++) {
#pragma unroll
    for (int half = 0; half < 2; half++) { /* tokens 16 ks + 2 tig, + 1, then + 8, + 9 */
      const int t = 16 * ks + 8 * half + 2 * tig;
      bg[ks][half] = hmul2(pb[ks][half], __byte_perm(vm[t * NG + G], vm[(t + 1) * NG + G], 0x5410));
    }
    mma_16816(base, fn, bg[ks][0], bg[ks][1]);
  }
  value_group_tile<D, VB, G, 0>(st, gw, bg, base, h);
  value_group_tile<D, VB, G, 1>(st, gw, bg, base, h);
}

/* Σ p offset of the chunk for group gid % (D / 32), rows gid and gid + 8 alike, into st.off: A
 * holds the group's offsets at the lane's tokens, B = Pᵀ. */
template <int D>
__device__ __forceinline__ void value_offsets(km_state<D> &st, const uint32_t *vm,
                                              const uint32_t pb[2][2], int gid, int tig) {
  constexpr int NG = D / 32;
#pragma unroll
  for (int ks = 0; ks < 2; ks++) {
    uint32_t of[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
      const int t = 16 * ks + 8 * half + 2 * tig, g = gid % NG;
      of[half] = __byte_perm(vm[t * NG + g], vm[(t + 1) * NG + g], 0x7632);
    }
    const uint32_t fo[4] = {of[0], of[0], of[1], of[1]};
    mma_16816(st.off, fo, pb[ks][0], pb[ks][1]);
  }
}

template <int D, int VB, int... G>
__device__ __forceinline__ void value_groups(std::integer_sequence<int, G...>, km_state<D> &st,
                                             const uint32_t *vc, const uint32_t *vm,
                                             const uint32_t pb[2][2], int gid, int tig,
                                             uint32_t h) {
  value_offsets<D>(st, vm, pb, gid, tig);
  (value_group<D, VB, G>(st, vc, vm, pb, tig, h), ...);
}

/* After the last chunk: each channel row takes its group's Σ p offset from lane (group, tig). */
template <int D> __device__ __forceinline__ void add_value_offsets(km_state<D> &st, int tig) {
#pragma unroll
  for (int g = 0; g < D / 32; g++)
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const float o = __shfl_sync(0xffffffffu, st.off[j], g * 4 + tig);
#pragma unroll
      for (int cm = 2 * g; cm < 2 * g + 2; cm++) st.acc[cm][j] += o, st.acc[cm][j + 2] += o;
    }
}

/* 4 blocks a multiprocessor; KIVI's values at head_dim 128 take 136-162 registers (held to 128,
 * ptxas spills 24-76 bytes), so 3 */
template <int D, int KB, int VB, int KG, int VG, bool F8, bool P>
__global__ void __launch_bounds__(KM_WARPS * 32, VG && D > 64 ? 3 : 4) kvq_mma_kernel(km_args a) {
  using st = km_stage<D, KB, VB, KG, VG, F8>;
  extern __shared__ __align__(16) uint32_t km_smem[];
  const uint32_t h = a.h1024;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  /* launched early (iq_launch_early): the kernel before may still be writing q or the cache, or
   * reading the partials */
  iq_wait_prior();
  /* one query a block (always in decode) finds its query and columns without a.n and a.qpb,
   * so that its q loads do not wait on them */
  const int kvh = blockIdx.x, h0 = kvh * a.group, t0 = P ? blockIdx.z * a.qpb : blockIdx.z;
  const int queries = P ? min(a.qpb, a.n - t0) : 1;
  const int nh = P ? queries * a.group : min(a.group, KM_HEADS); /* columns in use */
  /* positions the block's last query sees (len <= cap fits 32 bits), the quantized ones among
   * them; its first query sees nq0 of them quantized, at most one chunk fewer. Split 0 walks
   * the fp16 positions from there (fp16n), each column masking what its query does not see */
  const int len = a.pos0 + t0 + queries, nq = km_quantized(a, len - 1);
  const int nq0 = P ? km_quantized(a, a.pos0 + t0) : nq;
  const int sinkn = min(len, a.sink), fp16n = len - nq0;
  constexpr int KPG = KG ? KG / 16 : 1; /* k-steps per key group (over channels) */

  /* a quantized split's warps start copying their first chunk before anything else */
  uint32_t *stage = km_smem + warp * st::WARP_WORDS;
  const int64_t head = (int64_t)kvh * a.head_chunks; /* the head's chunk 0 */
  const km_source src = {km_region<uint32_t>(a, a.codes_k) + head * st::KC_WORDS + lane * 4,
                         km_region<uint32_t>(a, a.meta_k) + head * st::KM_SRC + lane * 4,
                         km_region<uint32_t>(a, a.codes_v) + head * st::VC_WORDS + lane * 4,
                         km_region<uint32_t>(a, a.meta_v) + head * st::VM_SRC + lane * 4};
  const int chunks = nq / KM_CHUNK;
  const int first = blockIdx.y ? (blockIdx.y - 1) * a.chunks_per_split + warp : 0;
  const int last = blockIdx.y ? min(chunks, (int)blockIdx.y * a.chunks_per_split) : 0;
  if (first < last) stage_chunk<D, KB, VB, KG, VG, F8>(src, stage, first, lane);

  /* the fp16 split's warps copy their first piece of positions instead: a lane a row, lanes
   * 0-15 the piece's 16 key rows and 16-31 its value rows, of padded length FP16_S (the row
   * address found once, not per 16 bytes), rows past the end zero */
  constexpr int FP16_PIECE = 16, FP16_S = D + 8;
  __half *tile = reinterpret_cast<__half *>(stage);
  auto load_piece = [&](int base) {
    const int side = lane / FP16_PIECE, i = base + lane % FP16_PIECE;
    __half *dst = tile + lane * FP16_S;
    if (i < fp16n) { /* stream position x, its row as kvq_fp16_row finds it */
      const int x = i < sinkn ? i : a.sink + nq0 + (i - sinkn);
      const __half *b = x < a.sink
                            ? km_region<__half>(a, side ? a.sink_v : a.sink_k) +
                                  ((int64_t)kvh * a.sink + x) * D
                            : km_region<__half>(a, side ? a.ring_v : a.ring_k) +
                                  ((int64_t)kvh * a.ring + (x - a.sink) % a.ring) * D;
#pragma unroll
      for (int c = 0; c < D; c += 8) cp_async16(dst + c, b + c);
    } else {
#pragma unroll
      for (int c = 0; c < D; c += 8) *reinterpret_cast<uint4 *>(dst + c) = make_uint4(0, 0, 0, 0);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  if (blockIdx.y == 0 && warp * FP16_PIECE < fp16n) load_piece(warp * FP16_PIECE);

  /* q times the softmax scale and log2(e) (a.qscale: scores in log2 units, the softmax uses
   * exp2), rounded to fp16, read straight into the B operand of each k-step (head gid, channels
   * 16 ks + 2 tig, + 1, + 8, + 9; zero past the group), all loads issued at once and no block
   * barrier, while the first chunk is on its way; and, keys over channels, the sums of those
   * q over each key group for heads 2 tig and + 1, by MMAs of a tile of ones with q: C's
   * columns 2 tig, + 1 are this thread's heads (shorter than a chain of shuffles) */
  uint32_t qb[D / 16][2];
  float qg[D / 16 / KPG][2]; /* per key group */
  const float *qrow = a.q + km_col_row<P>(a, t0, h0, gid < nh ? gid : 0) * D + 2 * tig;
  float2 qv[D / 16][2]; /* loaded unconditionally (heads past the group read head 0, then zero) */
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
    for (int j = 0; j < 2; j++) qv[ks][j] = *reinterpret_cast<const float2 *>(qrow + 16 * ks + 8 * j);
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++)
#pragma unroll
    for (int j = 0; j < 2; j++)
      qb[ks][j] = gid < nh ? pack_half2(qv[ks][j].x * a.qscale, qv[ks][j].y * a.qscale) : 0u;
  if constexpr (KG != 0) {
    const uint32_t ones[4] = {0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u};
#pragma unroll
    for (int g = 0; g < D / 16; g += KPG) {
      float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int ks = g; ks < g + KPG; ks++) mma_16816(sum, ones, qb[ks][0], qb[ks][1]);
      qg[g / KPG][0] = sum[0], qg[g / KPG][1] = sum[1];
    }
  }

  km_state<D> state;
  state.m[0] = state.m[1] = KM_NONE;
  state.l[0] = state.l[1] = 0.0f;
#pragma unroll
  for (int cm = 0; cm < D / 16; cm++)
#pragma unroll
    for (int i = 0; i < 4; i++) state.acc[cm][i] = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; i++) state.off[i] = 0.0f;

  if (blockIdx.y == 0) {
    /* the fp16 positions, 16 at a time per warp (the first 16 copied before q was set up):
     * their key rows and value rows in one tile of padded rows in the warp's shared memory
     * (stride D + 8: the 8 rows an ldmatrix reads lie in distinct banks). ldmatrix row
     * addresses as in decode_mma.cu: keys (A = the 16x16 tile as stored) matrices (tokens
     * 0-7, channels 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15); values (A = Vᵀ, loaded
     * transposed) (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) */
    const int k_lane = (lane % 8 + lane / 8 % 2 * 8) * FP16_S + lane / 16 * 8;
    const int v_lane = (lane % 8 + lane / 16 * 8) * FP16_S + lane / 8 % 2 * 8;
    /* packed queries: position x is seen by this thread's column j (head 2 tig + j) if x <
     * ends[j] and x is in the sink or at or past starts[j], the first position its query sees
     * fp16; one query sees every row before fp16n */
    int ends[2], starts[2];
#pragma unroll
    for (int j = 0; j < 2 && P; j++) {
      const int p = a.pos0 + km_col_query<P>(a, t0, 2 * tig + j);
      ends[j] = p + 1, starts[j] = a.sink + km_quantized(a, p);
    }
    for (int base = warp * FP16_PIECE; base < fp16n; base += KM_WARPS * FP16_PIECE) {
      asm volatile("cp.async.wait_group 0;\n" ::);
      __syncwarp();
      float s[2][4];
      float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int ks = 0; ks < D / 16; ks++) {
        uint32_t fr[4];
        ldmatrix_x4(fr, tile + 16 * ks + k_lane);
        mma_16816(sc, fr, qb[ks][0], qb[ks][1]);
      }
#pragma unroll
      for (int i = 0; i < 4; i++) { /* row gid then gid + 8 (rows past fp16n are past len) */
        const int r = base + gid + i / 2 * 8, x = r < sinkn ? r : a.sink + nq0 + (r - sinkn);
        const bool seen = P ? x < ends[i % 2] && (x < a.sink || x >= starts[i % 2]) : r < fp16n;
        s[0][i] = seen ? sc[i] : -INFINITY;
      }
#pragma unroll
      for (int i = 0; i < 4; i++) s[1][i] = -INFINITY; /* a piece is one 16-token tile */
      uint32_t pb[2][2];
      float ps[2];
      chunk_softmax<D>(state, s, h, pb, ps);
      const __half *vt = tile + FP16_PIECE * FP16_S; /* the value rows */
#pragma unroll
      for (int cm = 0; cm < D / 16; cm++) {
        uint32_t fr[4];
        ldmatrix_x4_trans(fr, vt + 16 * cm + v_lane);
        mma_16816(state.acc[cm], fr, pb[0][0], pb[0][1]);
      }
      __syncwarp(); /* the tile takes the next piece */
      if (base + KM_WARPS * FP16_PIECE < fp16n) load_piece(base + KM_WARPS * FP16_PIECE);
    }
  } else {
    /* the chunk that the block's last query sees quantized and its first does not (if any) is
     * fp16 to the queries that see nq0 quantized (split 0 gives it them) */
    const int chunk0 = P && nq0 < nq ? nq0 / KM_CHUNK : -1;
    /* quantized chunks first + warp, + 4, ... of this split */
    for (int chunk = first, i = 0; chunk < last; chunk += KM_WARPS, i++) {
      uint32_t *cur = stage + (i & 1) * st::WORDS;
      if (chunk + KM_WARPS < last) {
        stage_chunk<D, KB, VB, KG, VG, F8>(src, stage + ((i + 1) & 1) * st::WORDS, chunk + KM_WARPS, lane);
        asm volatile("cp.async.wait_group 1;\n" ::);
      } else {
        asm volatile("cp.async.wait_group 0;\n" ::);
      }
      __syncwarp();
      if constexpr (F8) { /* fp8 pairs to fp16, in place */
        widen_pairs<st::KM_WORDS>(cur + st::KM, lane, a.e5m2);
        widen_pairs<st::VM_WORDS>(cur + st::VM, lane, a.e5m2);
      }

      float s[2][4];
      if constexpr (KG) {
        /* keys grouped over channels: per 16-token tile, A = the key codes of tokens gid and
         * gid + 8; each group's pairs folded as it ends */
      constexpr int R = D / 32, KROW = D * KB / 32;
      constexpr int KGW = D / KPG / 16; /* pairs per key row */
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        const int row = 16 * mt + gid; /* of the chunk */
        const uint32_t *r0 = cur + st::KC + row * KROW, *r1 = r0 + 8 * KROW;
        const int m0 = row * KGW, m1 = m0 + 8 * KGW; /* the rows' first pairs */
        float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 4; i++) s[mt][i] = 0.0f;
        quad_share<KB, R> w0, w1;
        w0.load(r0, tig);
        w1.load(r1, tig);
#pragma unroll
        for (int r = 0; r < R; r++) {
          uint32_t x0[4], x1[4];
          w0.pairs(r, h, x0);
          w1.pairs(r, h, x1);
#pragma unroll
          for (int kk = 0; kk < 2; kk++) {
            const int ks = 2 * r + kk;
            const uint32_t fr[4] = {x0[2 * kk], x1[2 * kk], x0[2 * kk + 1], x1[2 * kk + 1]};
            mma_16816(tmp, fr, qb[ks][0], qb[ks][1]);
            if ((ks + 1) % KPG == 0) { /* the group ends: fold its pairs */
              const float2 so0 = pair_f2(cur[st::KM + m0 + ks / KPG]);
              const float2 so1 = pair_f2(cur[st::KM + m1 + ks / KPG]);
              s[mt][0] = fmaf(so0.x, tmp[0], fmaf(so0.y, qg[ks / KPG][0], s[mt][0]));
              s[mt][1] = fmaf(so0.x, tmp[1], fmaf(so0.y, qg[ks / KPG][1], s[mt][1]));
              s[mt][2] = fmaf(so1.x, tmp[2], fmaf(so1.y, qg[ks / KPG][0], s[mt][2]));
              s[mt][3] = fmaf(so1.x, tmp[3], fmaf(so1.y, qg[ks / KPG][1], s[mt][3]));
#pragma unroll
              for (int i = 0; i < 4; i++) tmp[i] = 0.0f;
            }
          }
        }
      }
      } else {
        /* keys grouped over tokens (the block): the scales fold into q (B = q * scale per
         * channel, rounded to fp16); the offsets into one more MMA per k-step (the rows gid of
         * its A hold them: every token gets the same sum of q * offset; rows gid + 8 unused);
         * the codes enter RAW (1024 + f code), so a third MMA sums 1024 * q * scale to take
         * off, and 1 / f applies per row of the score fragment after. A per k-step = the
         * lane's two units, channels 2 tig, + 1 and + 8, + 9 at tokens gid + 8 j
         * (kvq_key_tile_slot). */
        float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f}, raw[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
          for (int i = 0; i < 4; i++) s[mt][i] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
          const uint2 m0 = *reinterpret_cast<const uint2 *>(cur + st::KM + 16 * ks + 2 * tig);
          const uint2 m1 = *reinterpret_cast<const uint2 *>(cur + st::KM + 16 * ks + 8 + 2 * tig);
          const uint32_t sc0 = __byte_perm(m0.x, m0.y, 0x5410), sc1 = __byte_perm(m1.x, m1.y, 0x5410);
          const uint32_t o0 = __byte_perm(m0.x, m0.y, 0x7632), o1 = __byte_perm(m1.x, m1.y, 0x7632);
          const uint32_t qs0 = hmul2(qb[ks][0], sc0), qs1 = hmul2(qb[ks][1], sc1);
          const uint32_t fo[4] = {o0, sc0, o1, sc1}, fh[4] = {h, h, h, h};
          mma_16816(bias, fo, qb[ks][0], qb[ks][1]);
          mma_16816(raw, fh, qs0, qs1);
          uint32_t x0[4], x1[4]; /* pairs j = 0..3 of the two units (channel halves) */
          key_tile_pairs<KB>(cur + st::KC, ks, lane, h, x0, x1);
#pragma unroll
          for (int mt = 0; mt < 2; mt++) {
            const uint32_t fr[4] = {x0[2 * mt], x0[2 * mt + 1], x1[2 * mt], x1[2 * mt + 1]};
            mma_16816(s[mt], fr, qs0, qs1);
          }
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++) /* row gid of tile mt is pair j = 2 mt, row gid + 8 2 mt + 1 */
#pragma unroll
          for (int i = 0; i < 4; i++)
            s[mt][i] = fmaf(s[mt][i] - raw[i % 2], raw_factor_inv<KB>(2 * mt + i / 2), bias[i % 2]);
      }
      if (P && chunk == chunk0)
#pragma unroll
        for (int j = 0; j < 2; j++)
          if (km_quantized(a, a.pos0 + km_col_query<P>(a, t0, 2 * tig + j)) < KM_CHUNK * chunk + 1)
#pragma unroll
            for (int i = j; i < 8; i += 2) s[i / 4][i % 4] = -INFINITY;
      uint32_t pb[2][2];
      float ps[2];
      chunk_softmax<D>(state, s, h, pb, ps);

      if constexpr (VG) { /* values over channels: a group at a time */
        value_groups<D, VB>(std::make_integer_sequence<int, D / 32>(), state,
                            cur + st::VC + lane * 4, cur + st::VM, pb, gid, tig, h);
      } else { /* values over tokens: the lane's words of the chunk in tile order, 16-byte loads */
        constexpr int VW = D * VB / 32;
        uint32_t vw[VW];
#pragma unroll
        for (int i = 0; i < VW / 4; i++) {
          const uint4 x = *reinterpret_cast<const uint4 *>(cur + st::VC + i * 128 + lane * 4);
          vw[4 * i] = x.x, vw[4 * i + 1] = x.y, vw[4 * i + 2] = x.z, vw[4 * i + 3] = x.w;
        }
        value_tiles<D, VB>(std::make_integer_sequence<int, D / 16>(), state, vw, cur + st::VM,
                           pb, ps, gid, h);
      }
      __syncwarp(); /* the stage is refilled next */
    }
  }

  if constexpr (VG) add_value_offsets<D>(state, tig);
  iq_allow_next(); /* the merge may start launching */
  const int n = P ? a.n : gridDim.z; /* queries */
  const int64_t rows = (int64_t)gridDim.y * (a.warp_rows ? KM_WARPS : 1) * n * a.heads;
  float *part_ml = a.part_acc + rows * D;
  if (a.warp_rows) {
    /* each warp its own partial, split blockIdx.y * KM_WARPS + warp, as in decode_mma.cu: at a
     * chunk or two per warp, the block merge below would cost a third of the warps' time */
    const int64_t split = ((int64_t)blockIdx.y * KM_WARPS + warp) * n * a.heads;
    const int64_t row[2] = {split + km_col_row<P>(a, t0, h0, 2 * tig),
                            split + km_col_row<P>(a, t0, h0, 2 * tig + 1)};
#pragma unroll
    for (int cm = 0; cm < D / 16; cm++)
#pragma unroll
      for (int i = 0; i < 4; i++)
        if (2 * tig + i % 2 < nh)
          a.part_acc[row[i % 2] * D + 16 * cm + gid + i / 2 * 8] = state.acc[cm][i];
    if (gid == 0)
#pragma unroll
      for (int j = 0; j < 2; j++)
        if (2 * tig + j < nh) { /* -inf: saw nothing */
          part_ml[row[j] * 2] = state.m[j] == KM_NONE ? -INFINITY : state.m[j] * LN2;
          part_ml[row[j] * 2 + 1] = state.l[j];
        }
    return;
  }
  /* the warps' partials into one: each warp scales its output and sum to the block's maximum
   * per head first (a factor per head and thread), so the merge below only adds (shared memory
   * [warp][head][D], the stages' space, and (max, sum) per warp and head) */
  __shared__ float w_m[KM_WARPS][KM_HEADS], w_l[KM_WARPS][KM_HEADS];
  if (gid == 0)
#pragma unroll
    for (int j = 0; j < 2; j++) w_m[warp][2 * tig + j] = state.m[j];
  __syncthreads(); /* and every warp is done with its stages */
  float f[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < KM_WARPS; w++) mx = fmaxf(mx, w_m[w][2 * tig + j]);
    f[j] = state.m[j] == KM_NONE ? 0.0f : fast_exp2(state.m[j] - mx); /* 0: saw nothing */
  }
  float *w_acc = reinterpret_cast<float *>(km_smem);
#pragma unroll
  for (int cm = 0; cm < D / 16; cm++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int head = 2 * tig + i % 2, c = 16 * cm + gid + i / 2 * 8;
      w_acc[(warp * KM_HEADS + head) * D + c] = state.acc[cm][i] * f[i % 2];
    }
  if (gid == 0)
#pragma unroll
    for (int j = 0; j < 2; j++) w_l[warp][2 * tig + j] = state.l[j] * f[j];
  __syncthreads();
  const int64_t split = (int64_t)blockIdx.y * n * a.heads;
  for (int i = threadIdx.x; i < nh * D; i += blockDim.x) {
    const int col = i / D, c = i % D;
    const int64_t row = split + km_col_row<P>(a, t0, h0, col);
    float acc = 0.0f;
#pragma unroll
    for (int w = 0; w < KM_WARPS; w++) acc += w_acc[(w * KM_HEADS + col) * D + c];
    a.part_acc[row * D + c] = acc;
    if (c == 0) {
      float mx = KM_NONE, l = 0.0f;
#pragma unroll
      for (int w = 0; w < KM_WARPS; w++) mx = fmaxf(mx, w_m[w][col]), l += w_l[w][col];
      part_ml[row * 2] = mx == KM_NONE ? -INFINITY : mx * LN2; /* natural units; -inf: none */
      part_ml[row * 2 + 1] = l;
    }
  }
}

int kvq_mma_supported(const iq_kvq_params *p, int group) {
  const int b2 = p->k_bits == 2 || p->k_bits == 4 || p->k_bits == 8;
  const int v2 = p->v_bits == 2 || p->v_bits == 4 || p->v_bits == 8;
  const int keys = p->k_axis == IQ_AXIS_CHANNELS ? p->k_group >= 16 : p->k_group == KM_CHUNK;
  /* values over tokens in blocks of a chunk, or over 32 channels beside such keys (KIVI's) */
  const int values = p->v_axis == IQ_AXIS_TOKENS ? kvq_order(p, 1) == KVQ_VALUE_TILE
                                                 : kvq_order(p, 1) == KVQ_VALUE_ROWS_TILE;
  return b2 && v2 && keys && values && p->v_group == KM_CHUNK &&
         (p->head_dim == 64 || p->head_dim == 128) && group <= KM_HEADS;
}

/* A kernel, its shared memory and how many of its blocks a multiprocessor holds. */
struct km_kernel {
  void (*fn)(km_args);
  size_t smem;
  int blocks_per_sm;
};

/* The kernel for D, KB, VB, KG, VG, F8, P; its attributes are set at the first call. */
template <int D, int KB, int VB, int KG, int VG, bool F8, bool P>
static int km_kernel_of(iq_ctx *ctx, km_kernel *k) {
  static int blocks = 0;
  const size_t warps = sizeof(uint32_t) * KM_WARPS * km_stage<D, KB, VB, KG, VG, F8>::WARP_WORDS;
  const size_t merge = sizeof(float) * KM_WARPS * KM_HEADS * D;
  k->fn = kvq_mma_kernel<D, KB, VB, KG, VG, F8, P>;
  k->smem = warps > merge ? warps : merge;
  IQ_TRY(iq_kernel_blocks(ctx, k->fn, KM_WARPS * 32, k->smem, &blocks));
  k->blocks_per_sm = blocks;
  return IQ_OK;
}

/* The kernel of a layout (kvq_layout.cuh). P: the queries of a block share the MMAs' columns
 * (prefill); a decode step's kernel has one query and none of their masks. */
template <bool P> struct km_kernel_maker {
  iq_ctx *ctx;
  km_kernel *k;
  template <int D, int KB, int VB, int KG, int VG, bool F8> int of() const {
    return km_kernel_of<D, KB, VB, KG, VG, F8, P>(ctx, k);
  }
};

/* Arguments are checked by iq_kvq_attention. */
int kvq_mma_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                      const float *q, int n, int pos0, int heads, float scale) {
  /* prefill: as many queries a block as their heads fill the MMAs' columns */
  const int group = heads / p->kv_heads, qpb = n < KM_HEADS / group ? n : KM_HEADS / group;
  const int64_t blocks = (n + qpb - 1) / qpb;
  km_kernel k = {nullptr, 0, 1};
  IQ_TRY(qpb > 1 ? kvq_layout(p, km_kernel_maker<true>{ctx, &k})
                 : kvq_layout(p, km_kernel_maker<false>{ctx, &k}));
  /* the chunks of the longest query, split so that one wave of resident blocks (one fp16 block
   * per KV head and query block beside them) covers them, each warp at least one chunk */
  const int64_t chunks = kvq_quantized(p, (int64_t)pos0 + n) / KM_CHUNK;
  const int64_t per_split = (int64_t)p->kv_heads * blocks;
  int64_t qsplits = ((int64_t)k.blocks_per_sm * ctx->sms - per_split) / per_split;
  const int64_t most = (chunks + KM_WARPS - 1) / KM_WARPS;
  qsplits = qsplits < 1 ? 1 : qsplits;
  qsplits = qsplits > most ? most : qsplits;
  const int64_t per = qsplits ? (chunks + qsplits - 1) / qsplits : 1;
  qsplits = qsplits ? (chunks + per - 1) / per : 0;
  const int splits = (int)(1 + qsplits);
  /* up to this many partials per query head the merge reads each warp's, sparing the blocks
   * their merge (about 2.5k tokens and less) */
  const int warp_rows = splits * KM_WARPS <= 80;
  const int rows_per_head = warp_rows ? splits * KM_WARPS : splits;

  void *scratch;
  const size_t rows = (size_t)rows_per_head * n * heads;
  IQ_TRY(iq_scratch(ctx, sizeof(float) * rows * (p->head_dim + 2), &scratch));
  uint64_t off[IQ_KVQ_REGIONS + 1];
  kvq_offsets(p, off);
  km_args a;
  a.layer = (const char *)layer;
  a.codes_k = (uint32_t)(off[IQ_KVQ_CODES_K] / 256), a.meta_k = (uint32_t)(off[IQ_KVQ_META_K] / 256);
  a.codes_v = (uint32_t)(off[IQ_KVQ_CODES_V] / 256), a.meta_v = (uint32_t)(off[IQ_KVQ_META_V] / 256);
  a.pos0 = pos0;
  a.lag = p->sink + p->recent;
  a.chunks_per_split = (int)per;
  a.head_chunks = (int)(kvq_quant_cap(p) / KM_CHUNK);
  a.heads = heads;
  a.group = group;
  a.q = q;
  a.part_acc = (float *)scratch;
  a.sink_k = (uint32_t)(off[IQ_KVQ_SINK_K] / 256), a.sink_v = (uint32_t)(off[IQ_KVQ_SINK_V] / 256);
  a.ring_k = (uint32_t)(off[IQ_KVQ_RING_K] / 256), a.ring_v = (uint32_t)(off[IQ_KVQ_RING_V] / 256);
  a.sink = p->sink;
  a.ring = p->ring;
  a.qscale = scale * LOG2E;
  a.h1024 = 0x64006400u;
  a.warp_rows = warp_rows;
  a.e5m2 = p->meta == IQ_META_E5M2;
  a.n = n;
  a.qpb = qpb;
  dim3 grid((unsigned)p->kv_heads, (unsigned)splits, (unsigned)blocks);
  IQ_TRY(iq_launch_early(ctx, k.fn, grid, dim3(KM_WARPS * 32), k.smem, a));
  IQ_TRY(merge_splits(ctx, out, a.part_acc, a.part_acc + rows * p->head_dim, n * heads, p->head_dim,
                      rows_per_head));
  return IQ_OK;
}
