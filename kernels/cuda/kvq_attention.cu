/* kvq_attention.cu: attention over the quantized KV cache (the twin of
 * iq_kvq_attention in kernels/cpu/kvq.c), flash-decoding style.
 *
 * grid (kv_heads * hblocks, 1 + qsplits, n queries): a block serves up to G
 * query heads of one KV head for one query. Split 0 walks the query's fp16
 * positions (sink and ring); splits 1.. walk chunks of the quantized region in
 * tiles of KVQ_TILE tokens, one token per thread for scores and one channel
 * per thread for values, each tile's codes and pairs copied to shared memory
 * with cp.async while the previous tile is computed (two stages). Every block
 * leaves a partial (acc, max, sum); merge_splits_kernel combines them.
 *
 * The dequantization folds into the dot products:
 * - keys grouped over channels (InnerQ): score = Σ_g scale_g Σ q·code +
 *   offset_g Σ_g q, the group sums of q computed once per block;
 * - values grouped over tokens (InnerQ): out_c += scale Σ_t p·code + offset
 *   Σ_t p per block of tokens, the block sums of p computed once per tile;
 * - the KIVI-style axes (keys over tokens, values over channels) dequantize
 *   each code with its pair before the multiply, as those layouts require. */
#include <math.h>

#include "cuda.cuh"
#include "checks.h"
#include "kvq.h"
#include "mma.cuh"
#include "split_softmax.cuh"

constexpr int KQ_THREADS = KVQ_TILE; /* one token (scores) or channel (values) per thread */
constexpr int KQ_WARPS = KQ_THREADS / 32;
#ifndef KQ_BLOCKS_PER_SM
#define KQ_BLOCKS_PER_SM 8
#endif

struct kq_args {
  iq_kvq_params p;
  kvq_regions r;
  float *part_acc, *part_ml;
  const float *q;
  int heads, group, hblocks, pos0, tiles_per_split;
  float scale;
};

/* A code as float without an int-to-float conversion: 2^23 + code, minus 2^23. */
__device__ __forceinline__ float code_float(uint32_t code) {
  return __uint_as_float(0x4B000000u | code) - 8388608.0f;
}

template <int BITS> __device__ __forceinline__ uint32_t code_at(const uint32_t *w, int i) {
  if constexpr (BITS == 3) {
    return kvq_code_at(w, i, 3);
  } else {
    return (w[i * BITS / 32] >> ((i * BITS) & 31)) & ((1u << BITS) - 1);
  }
}

/* Four consecutive floats of shared memory (16-byte aligned): one broadcast
 * load where a thread would otherwise issue four. */
__device__ __forceinline__ float4 f4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ float dot4(float4 a, float x, float y, float z, float w) {
  return a.x * x + a.y * y + a.z * z + a.w * w;
}

/* Pair i of staged pairs, fp16 (fp8 pairs are widened when staged: stage_widen). */
__device__ __forceinline__ float2 pair_at(const uint32_t *pairs, int i) { return pair_f2(pairs[i]); }

/* Copies words [0, count) of src to dst with cp.async: 16 bytes at a time
 * when padded_row is 0, else rows of row_words words to rows of row_words + 1
 * (an odd stride: threads reading one row each hit distinct banks), 4 bytes
 * at a time. */
__device__ __forceinline__ void stage_copy(uint32_t *dst, const uint32_t *src, int count,
                                           int padded_row) {
  if (!padded_row) {
    for (int e = threadIdx.x * 4; e < count; e += KQ_THREADS * 4) {
      const unsigned d = (unsigned)__cvta_generic_to_shared(dst + e);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src + e));
    }
    return;
  }
  for (int e = threadIdx.x; e < count; e += KQ_THREADS) {
    const int row = e / padded_row;
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst + e + row);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src + e));
  }
}

/* A tile's pairs of one side: 128 * head_dim / group, a multiple of 32, so a multiple of 4 words
 * (16-byte copies) in either format. */
__host__ __device__ inline int kq_pairs(const iq_kvq_params &p, int group) {
  return KVQ_TILE * p.head_dim / group;
}

/* Shared-memory words of one stage (a tile's codes and pairs) and its layout. */
struct kq_stage {
  int k_codes, k_meta, v_codes, v_meta; /* word offsets; pairs as fp16 */
  int k_meta8, v_meta8;                 /* fp8 pairs as copied (then widened), or 0 */
  int words;
  int k_row, v_row; /* padded row lengths for stage_copy (0: unpadded) */
};

__host__ __device__ inline kq_stage kq_stage_of(const iq_kvq_params &p) {
  const int d = p.head_dim, t = KVQ_TILE, b = kvq_block(&p);
  kq_stage s;
  /* InnerQ rows: a token's key codes; a (block, channel)'s value codes */
  s.k_row = p.k_axis == IQ_AXIS_CHANNELS && p.k_bits != 3 ? d * p.k_bits / 32 : 0;
  const int v_bits_per_channel = b * p.v_bits;
  s.v_row = p.v_axis == IQ_AXIS_TOKENS && p.v_bits != 3 && v_bits_per_channel % 32 == 0 &&
                    kvq_order(&p, 1) != KVQ_VALUE_TILE
                ? v_bits_per_channel / 32
                : 0;
  const int k_words = t * d * p.k_bits / 32, v_words = t * d * p.v_bits / 32;
  s.k_codes = 0;
  s.k_meta = s.k_codes + (k_words + (s.k_row ? k_words / s.k_row : 0) + 3) / 4 * 4;
  s.v_codes = s.k_meta + kq_pairs(p, p.k_group);
  s.v_meta = s.v_codes + (v_words + (s.v_row ? v_words / s.v_row : 0) + 3) / 4 * 4;
  s.words = s.v_meta + kq_pairs(p, p.v_group);
  const bool f8 = p.meta != IQ_META_F16;
  s.k_meta8 = f8 ? s.words : 0;
  s.v_meta8 = f8 ? s.k_meta8 + kq_pairs(p, p.k_group) / 2 : 0;
  s.words += f8 ? (kq_pairs(p, p.k_group) + kq_pairs(p, p.v_group)) / 2 : 0;
  return s;
}

/* Issues the copies of quantized tile `tile` (tokens tile * KVQ_TILE ..) of KV head kvh. */
__device__ __forceinline__ void stage_tile(const kq_args &a, const kq_stage &st, uint32_t *dst,
                                           int kvh, int64_t tile) {
  const iq_kvq_params &p = a.p;
  const int d = p.head_dim;
  const int64_t qcap = kvq_quant_cap(&p), u0 = tile * KVQ_TILE;
  const int64_t tok = (int64_t)kvh * qcap + u0;
  stage_copy(dst + st.k_codes, a.r.codes_k + tok * d * p.k_bits / 32, KVQ_TILE * d * p.k_bits / 32,
             st.k_row);
  stage_copy(dst + st.v_codes, a.r.codes_v + tok * d * p.v_bits / 32, KVQ_TILE * d * p.v_bits / 32,
             st.v_row);
  const uint32_t *mk = reinterpret_cast<const uint32_t *>(
      a.r.meta_k + kvq_pair_units(tok * d / p.k_group, p.meta));
  const uint32_t *mv = reinterpret_cast<const uint32_t *>(
      a.r.meta_v + kvq_pair_units(tok * d / p.v_group, p.meta));
  const bool f8 = p.meta != IQ_META_F16;
  stage_copy(dst + (f8 ? st.k_meta8 : st.k_meta), mk, kq_pairs(p, p.k_group) / (f8 ? 2 : 1), 0);
  stage_copy(dst + (f8 ? st.v_meta8 : st.v_meta), mv, kq_pairs(p, p.v_group) / (f8 ? 2 : 1), 0);
  asm volatile("cp.async.commit_group;\n" ::);
}

/* fp8 pairs of a staged tile to fp16 pairs (exact), once per tile, so the loops read fp16 pairs. */
__device__ __forceinline__ void stage_widen(const iq_kvq_params &p, const kq_stage &st,
                                            uint32_t *stage) {
  const bool e5m2 = p.meta == IQ_META_E5M2;
  const uint16_t *k8 = reinterpret_cast<const uint16_t *>(stage + st.k_meta8);
  const uint16_t *v8 = reinterpret_cast<const uint16_t *>(stage + st.v_meta8);
  for (int i = threadIdx.x; i < kq_pairs(p, p.k_group); i += KQ_THREADS)
    stage[st.k_meta + i] = fp8x2_to_f16x2(k8[i], e5m2);
  for (int i = threadIdx.x; i < kq_pairs(p, p.v_group); i += KQ_THREADS)
    stage[st.v_meta + i] = fp8x2_to_f16x2(v8[i], e5m2);
}

/* The online-softmax step of a tile: s[g] is this thread's score (-inf for
 * none); afterwards p_s[g][tid] holds its weight against the new running max,
 * and corr_s[g] the factor that rescales what was accumulated before. */
template <int G>
__device__ __forceinline__ void tile_softmax(const float s[G], float *p_s, float (*red)[KQ_WARPS],
                                             float *m_s, float *l_s, float *corr_s) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int g = 0; g < G; g++) {
    const float mx = warp_max(s[g]);
    if (lane == 0) red[g][warp] = mx;
  }
  __syncthreads();
  if (tid < G) {
    float mx = m_s[tid];
    for (int w = 0; w < KQ_WARPS; w++) mx = fmaxf(mx, red[tid][w]);
    /* a tile with no keys yet (mx still -inf) corrects by 1 and weighs 0 */
    corr_s[tid] = mx == -INFINITY ? 1.0f : expf(m_s[tid] - mx);
    m_s[tid] = mx;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; g++) {
    const float p = s[g] == -INFINITY ? 0.0f : expf(s[g] - m_s[g]);
    p_s[g * KQ_THREADS + tid] = p;
    const float sum = iq_warp_sum(p);
    if (lane == 0) red[g][warp] = sum;
  }
  __syncthreads();
  if (tid < G) {
    float sum = 0.0f;
    for (int w = 0; w < KQ_WARPS; w++) sum += red[tid][w];
    l_s[tid] = l_s[tid] * corr_s[tid] + sum;
  }
}

/* Channels of the output per thread: CPT (d > KQ_THREADS), or one channel
 * shared by KQ_THREADS / d threads that split the tile's tokens (d smaller). */
constexpr int KQ_MAX_CPT = IQ_MAX_HEAD_DIM / KQ_THREADS;

template <int G, int KB, int VB, int KAX, int VAX>
__global__ void __launch_bounds__(KQ_THREADS) kvq_attention_kernel(kq_args a) {
  extern __shared__ __align__(16) uint32_t kq_smem[];
  const iq_kvq_params &p = a.p;
  const int d = p.head_dim, tid = threadIdx.x;
  const int kvh = blockIdx.x / a.hblocks, h0 = kvh * a.group + (blockIdx.x % a.hblocks) * G;
  const int nh = min(G, kvh * a.group + a.group - h0), t = blockIdx.z;
  const int64_t len = (int64_t)a.pos0 + t + 1, nq = kvq_quantized(&p, len);
  const int64_t sinkn = min(len, (int64_t)p.sink), ringn = len - sinkn - nq;
  const kq_stage st = kq_stage_of(p);

  float *q_s = reinterpret_cast<float *>(kq_smem); /* [G][d], times the softmax scale */
  float *p_s = q_s + G * d;                         /* [G][KQ_THREADS] */
  float *qsum_s = p_s + G * KQ_THREADS;             /* [G][d / k_group] group sums of q */
  float *psum_s = qsum_s + G * (d / KVQ_MIN_GROUP); /* [G][KVQ_TILE / block] block sums of p */
  uint32_t *stage0 = reinterpret_cast<uint32_t *>(psum_s + G * (KVQ_TILE / KVQ_MIN_GROUP));
  __shared__ float red[G][KQ_WARPS], m_s[G], l_s[G], corr_s[G];

  for (int i = tid; i < G * d; i += KQ_THREADS) {
    const int g = i / d;
    q_s[i] = g < nh ? a.q[((int64_t)t * a.heads + h0 + g) * d + i % d] * a.scale : 0.0f;
  }
  if (tid < G) m_s[tid] = -INFINITY, l_s[tid] = 0.0f;
  __syncthreads();
  if (KAX == IQ_AXIS_CHANNELS)
    for (int i = tid; i < G * (d / p.k_group); i += KQ_THREADS) {
      const int g = i / (d / p.k_group), gi = i % (d / p.k_group);
      float sum = 0.0f;
      for (int e = 0; e < p.k_group; e++) sum += q_s[g * d + gi * p.k_group + e];
      qsum_s[i] = sum;
    }

  const int cpt = d > KQ_THREADS ? d / KQ_THREADS : 1, copies = d < KQ_THREADS ? KQ_THREADS / d : 1;
  const int c0 = tid % min(d, KQ_THREADS), phase = tid / min(d, KQ_THREADS);
  float acc[KQ_MAX_CPT][G];
#pragma unroll
  for (int i = 0; i < KQ_MAX_CPT; i++)
#pragma unroll
    for (int g = 0; g < G; g++) acc[i][g] = 0.0f;

  if (blockIdx.y == 0) {
    /* the fp16 positions: sink 0 .. sinkn - 1, then ring positions from sink + nq, copied to
     * the stage area (keys padded by 16 bytes per row) as many rows at a time as fit */
    const int64_t fp16n = sinkn + ringn;
    const int kstride = d + 8, chunks = d / 8;
    const int rows_fit = min(KQ_THREADS, 2 * st.words * 4 / ((kstride + d) * 2) / 8 * 8);
    __half *k_s = reinterpret_cast<__half *>(stage0), *v_s = k_s + rows_fit * kstride;
    for (int64_t base = 0; base < fp16n; base += rows_fit) {
      const int n = (int)min((int64_t)rows_fit, fp16n - base);
      for (int e = tid; e < n * chunks; e += KQ_THREADS) {
        const int r = e / chunks, c = e % chunks * 8;
        const int64_t i = base + r, x = i < sinkn ? i : p.sink + nq + (i - sinkn);
        const int64_t row = kvq_fp16_row(&p, kvh, x) + c;
        const uint16_t *ks = (x < p.sink ? a.r.sink_k : a.r.ring_k) + row;
        const uint16_t *vs = (x < p.sink ? a.r.sink_v : a.r.ring_v) + row;
        const unsigned kd = (unsigned)__cvta_generic_to_shared(k_s + r * kstride + c);
        const unsigned vd = (unsigned)__cvta_generic_to_shared(v_s + r * d + c);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(kd), "l"(ks));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(vd), "l"(vs));
      }
      asm volatile("cp.async.commit_group;\n" ::);
      asm volatile("cp.async.wait_all;\n" ::);
      __syncthreads();
      float s[G];
#pragma unroll
      for (int g = 0; g < G; g++) s[g] = tid < n ? 0.0f : -INFINITY;
      if (tid < n) {
        const __half *kr = k_s + tid * kstride;
        for (int c = 0; c < d; c += 8) {
          float k[8];
          iq_unpack8<__half>(*reinterpret_cast<const uint4 *>(kr + c), k);
#pragma unroll
          for (int g = 0; g < G; g++)
            s[g] += dot4(f4(q_s + g * d + c), k[0], k[1], k[2], k[3]) +
                    dot4(f4(q_s + g * d + c + 4), k[4], k[5], k[6], k[7]);
        }
      }
      tile_softmax<G>(s, p_s, red, m_s, l_s, corr_s);
      for (int ci = 0; ci < cpt; ci++) {
        const int c = c0 + ci * KQ_THREADS;
#pragma unroll
        for (int g = 0; g < G; g++) acc[ci][g] *= corr_s[g];
        for (int j = phase; j < n; j += copies) {
          const float v = __half2float(v_s[j * d + c]);
#pragma unroll
          for (int g = 0; g < G; g++) acc[ci][g] += p_s[g * KQ_THREADS + j] * v;
        }
      }
      __syncthreads(); /* the rows, p_s and corr_s are rewritten by the next tile */
    }
  } else {
    const int64_t tiles = (nq + KVQ_TILE - 1) / KVQ_TILE;
    const int64_t first = (int64_t)(blockIdx.y - 1) * a.tiles_per_split;
    const int64_t last = min(tiles, first + a.tiles_per_split);
    const int b = kvq_block(&p);
    if (first < last) stage_tile(a, st, stage0, kvh, first);
    for (int64_t tile = first; tile < last; tile++) {
      uint32_t *cur = stage0 + (int)((tile - first) & 1) * st.words;
      if (tile + 1 < last) {
        stage_tile(a, st, stage0 + (int)((tile + 1 - first) & 1) * st.words, kvh, tile + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if (p.meta != IQ_META_F16) {
        stage_widen(p, st, cur);
        __syncthreads();
      }
      const int n = (int)min((int64_t)KVQ_TILE, nq - tile * KVQ_TILE);
      const uint32_t *kc = cur + st.k_codes, *km = cur + st.k_meta;
      const uint32_t *vc = cur + st.v_codes, *vm = cur + st.v_meta;

      /* scores: thread tid scores token tid of the tile */
      float s[G];
#pragma unroll
      for (int g = 0; g < G; g++) s[g] = tid < n ? 0.0f : -INFINITY;
      if (tid < n) {
        if constexpr (KAX == IQ_AXIS_CHANNELS) {
          const int gk = p.k_group, groups = d / gk;
          for (int gi = 0; gi < groups; gi++) {
            float dot[G];
#pragma unroll
            for (int g = 0; g < G; g++) dot[g] = 0.0f;
            if constexpr (KB == 3) {
              for (int e = 0; e < gk; e++) {
                const float code = code_float(kvq_code_at(kc, tid * d + gi * gk + e, 3));
#pragma unroll
                for (int g = 0; g < G; g++) dot[g] += q_s[g * d + gi * gk + e] * code;
              }
            } else {
              /* rows in fragment order (kvq.h): slot by slot; the tensor-core kernel
               * (kvq_mma.cu) takes the common cases, this path groups of 8 */
              const uint32_t *row = kc + tid * (st.k_row + 1);
              for (int e = 0; e < gk; e++) {
                const int slot = kvq_slot_of(gi * gk + e, d, KB);
                const float code = code_float((row[slot * KB / 32] >> ((slot * KB) & 31)) &
                                              ((1u << KB) - 1));
#pragma unroll
                for (int g = 0; g < G; g++) dot[g] += q_s[g * d + gi * gk + e] * code;
              }
            }
            const float2 so = pair_at(km, tid * groups + gi);
#pragma unroll
            for (int g = 0; g < G; g++) s[g] += so.x * dot[g] + so.y * qsum_s[g * groups + gi];
          }
        } else {
          /* keys grouped over tokens: token tid is element tid % b of its block's channels */
          const int blk = tid / b, e = tid % b;
          const int korder = kvq_order(&p, 0); /* rows of b, or tiles of 32 tokens */
          const int slot = korder > 0 ? kvq_slot_of(e, korder, KB) : e;
          for (int c = 0; c < d; c += 4) {
            float k[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
              const float2 so = pair_at(km, blk * d + c + i);
              const int at = korder == KVQ_KEY_TILE
                                 ? (int)kvq_slot_in((blk * d + c + i) * b + e, KB, korder, d)
                                 : (blk * d + c + i) * b + slot;
              k[i] = so.x * code_float(code_at<KB>(kc, at)) + so.y;
            }
#pragma unroll
            for (int g = 0; g < G; g++) s[g] += dot4(f4(q_s + g * d + c), k[0], k[1], k[2], k[3]);
          }
        }
      }
      tile_softmax<G>(s, p_s, red, m_s, l_s, corr_s);

      /* values: thread owns channel(s) c; the block sums of p first */
      if constexpr (VAX == IQ_AXIS_TOKENS) {
        for (int i = tid; i < G * (KVQ_TILE / b); i += KQ_THREADS) {
          const int g = i / (KVQ_TILE / b), blk = i % (KVQ_TILE / b);
          float sum = 0.0f;
          for (int e = 0; e < b; e++) sum += p_s[g * KQ_THREADS + blk * b + e];
          psum_s[i] = sum;
        }
        __syncthreads();
      }
      for (int ci = 0; ci < cpt; ci++) {
        const int c = c0 + ci * KQ_THREADS;
#pragma unroll
        for (int g = 0; g < G; g++) acc[ci][g] *= corr_s[g];
        if constexpr (VAX == IQ_AXIS_TOKENS) {
          const int blocks = (n + b - 1) / b;
          for (int blk = phase; blk < blocks; blk += copies) {
            float dot[G];
#pragma unroll
            for (int g = 0; g < G; g++) dot[g] = 0.0f;
            const float *pw = p_s + blk * b;
            if (kvq_order(&p, 1) == KVQ_VALUE_TILE) { /* blocks of 32 in tile order */
              const uint32_t *block = vc + blk * b * d * VB / 32;
              for (int e = 0; e < b; e++) {
                const float code = code_float(code_at<VB>(block, kvq_value_tile_slot(e, c, VB)));
#pragma unroll
                for (int g = 0; g < G; g++) dot[g] += pw[g * KQ_THREADS + e] * code;
              }
            } else { /* a (block, channel) row of b codes, in fragment order when b % 32 == 0 */
              const bool permuted = kvq_order(&p, 1) != 0;
              const uint32_t *row = st.v_row ? vc + (blk * d + c) * (st.v_row + 1)
                                             : vc + blk * b * d * VB / 32;
              const int first = st.v_row ? 0 : c * b;
              for (int slot = 0; slot < b; slot++) {
                const int e = permuted ? kvq_elem_of(slot, b, VB) : slot;
                const float code = code_float(code_at<VB>(row, first + slot));
#pragma unroll
                for (int g = 0; g < G; g++) dot[g] += pw[g * KQ_THREADS + e] * code;
              }
            }
            const float2 so = pair_at(vm, blk * d + c);
#pragma unroll
            for (int g = 0; g < G; g++)
              acc[ci][g] += so.x * dot[g] + so.y * psum_s[g * (KVQ_TILE / b) + blk];
          }
        } else {
          /* values grouped over channels: a token row's codes (or, in tile order, a block's
           * 32 rows), a pair per group */
          const int groups = d / p.v_group, order = kvq_order(&p, 1);
          const int slot = order > 0 ? kvq_slot_of(c, d, VB) : c;
          for (int j = 4 * phase; j < n; j += 4 * copies) { /* n is whole blocks: fours */
            float v[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
              const float2 so = pair_at(vm, (j + i) * groups + c / p.v_group);
              /* in tile order kvq_slot_in((j + i) * d + c), without its 64-bit division */
              const int at = order == KVQ_VALUE_ROWS_TILE
                                 ? (j + i) / 32 * 32 * d + kvq_value_tile_slot((j + i) % 32, c, VB)
                                 : (j + i) * d + slot;
              v[i] = so.x * code_float(code_at<VB>(vc, at)) + so.y;
            }
#pragma unroll
            for (int g = 0; g < G; g++)
              acc[ci][g] += dot4(f4(p_s + g * KQ_THREADS + j), v[0], v[1], v[2], v[3]);
          }
        }
      }
      __syncthreads(); /* the stage, p_s and corr_s are rewritten next */
    }
  }

  /* threads sharing a channel (d < KQ_THREADS) add up their tokens' parts */
  const int64_t row0 = ((int64_t)blockIdx.y * gridDim.z + t) * a.heads + h0;
  if (copies > 1) {
    float *sum_s = reinterpret_cast<float *>(stage0); /* [copies][G][d] */
#pragma unroll
    for (int g = 0; g < G; g++) sum_s[(phase * G + g) * d + c0] = acc[0][g];
    __syncthreads();
    for (int i = tid; i < nh * d; i += KQ_THREADS) {
      float sum = 0.0f;
      for (int ph = 0; ph < copies; ph++) sum += sum_s[ph * G * d + i];
      a.part_acc[(row0 + i / d) * d + i % d] = sum;
    }
  } else {
    for (int ci = 0; ci < cpt; ci++)
#pragma unroll
      for (int g = 0; g < G; g++)
        if (g < nh) a.part_acc[(row0 + g) * d + c0 + ci * KQ_THREADS] = acc[ci][g];
  }
  if (tid < nh) {
    a.part_ml[(row0 + tid) * 2] = m_s[tid];
    a.part_ml[(row0 + tid) * 2 + 1] = l_s[tid];
  }
}

/* Shared memory of a launch: q, p, the sums, and two stages (also reused for
 * the final reduction over copies). */
static size_t kq_smem_bytes(const iq_kvq_params &p, int G) {
  const int d = p.head_dim;
  const size_t fixed = sizeof(float) * (G * d + G * KQ_THREADS + G * (d / KVQ_MIN_GROUP) +
                                        G * (KVQ_TILE / KVQ_MIN_GROUP));
  size_t stages = 2 * sizeof(uint32_t) * (size_t)kq_stage_of(p).words;
  const size_t reduce = sizeof(float) * (size_t)KQ_THREADS * G; /* copies * d = KQ_THREADS */
  return fixed + (stages > reduce ? stages : reduce);
}

template <int G, int KB, int VB, int KAX, int VAX>
static int launch(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  const size_t smem = kq_smem_bytes(a.p, G);
  auto kernel = kvq_attention_kernel<G, KB, VB, KAX, VAX>;
  IQ_CUDA(ctx, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kernel<<<grid, KQ_THREADS, smem, ctx->stream>>>(a);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

/* The kernel for the parameters' bits and axes: G query heads per block. */
template <int G, int KB, int VB>
static int launch_axes(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  const int k = a.p.k_axis, v = a.p.v_axis;
  if (k == IQ_AXIS_CHANNELS && v == IQ_AXIS_TOKENS)
    return launch<G, KB, VB, IQ_AXIS_CHANNELS, IQ_AXIS_TOKENS>(ctx, a, grid);
  if (k == IQ_AXIS_TOKENS && v == IQ_AXIS_CHANNELS)
    return launch<G, KB, VB, IQ_AXIS_TOKENS, IQ_AXIS_CHANNELS>(ctx, a, grid);
  if (k == IQ_AXIS_TOKENS)
    return launch<G, KB, VB, IQ_AXIS_TOKENS, IQ_AXIS_TOKENS>(ctx, a, grid);
  return launch<G, KB, VB, IQ_AXIS_CHANNELS, IQ_AXIS_CHANNELS>(ctx, a, grid);
}

template <int G, int KB>
static int launch_vbits(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  switch (a.p.v_bits) {
  case 2: return launch_axes<G, KB, 2>(ctx, a, grid);
  case 3: return launch_axes<G, KB, 3>(ctx, a, grid);
  case 4: return launch_axes<G, KB, 4>(ctx, a, grid);
  default: return launch_axes<G, KB, 8>(ctx, a, grid);
  }
}

template <int G> static int launch_bits(iq_ctx *ctx, const kq_args &a, dim3 grid) {
  switch (a.p.k_bits) {
  case 2: return launch_vbits<G, 2>(ctx, a, grid);
  case 3: return launch_vbits<G, 3>(ctx, a, grid);
  case 4: return launch_vbits<G, 4>(ctx, a, grid);
  default: return launch_vbits<G, 8>(ctx, a, grid);
  }
}

extern "C" int iq_kvq_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                                const float *q, int n, int pos0, int heads, float scale) {
  IQ_TRY(kvq_check_params(ctx, "iq_kvq_attention", p));
  if (!ctx || !layer || !out || !q)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_attention: NULL argument");
  if (n <= 0 || pos0 < 0 || (int64_t)pos0 + n > p->cap || heads <= 0 || heads % p->kv_heads)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_kvq_attention: %d queries at %d in a %d-token cache, heads %d a multiple "
                   "of kv_heads %d",
                   n, pos0, p->cap, heads, p->kv_heads);
  if (n > 65535)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_attention: %d queries in one call (at most 65535)", n);
  const int group = heads / p->kv_heads, G = group > 4 ? 8 : 4;
  if (kvq_mma_supported(p, group) && ((uintptr_t)q & 7) == 0) /* they read q as float2 */
    return kvq_prefill_fills(n, group)
               ? kvq_prefill_attention(ctx, p, layer, out, q, n, pos0, heads, scale)
               : kvq_mma_attention(ctx, p, layer, out, q, n, pos0, heads, scale);
  const int hblocks = (group + G - 1) / G;
  if (kq_smem_bytes(*p, G) > 200 * 1024)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_attention: head_dim %d with these bits and groups "
                   "needs %zu bytes of shared memory", p->head_dim, kq_smem_bytes(*p, G));
  /* the quantized tiles of the longest query, split so the GPU holds about
   * KQ_BLOCKS_PER_SM blocks per multiprocessor */
  const int64_t tiles = (kvq_quantized(p, (int64_t)pos0 + n) + KVQ_TILE - 1) / KVQ_TILE;
  const int64_t per_split = (int64_t)p->kv_heads * hblocks * n;
  int64_t qsplits = (KQ_BLOCKS_PER_SM * (int64_t)ctx->sms + per_split - 1) / per_split;
  qsplits = qsplits < 1 ? 1 : qsplits > tiles ? tiles : qsplits;
  const int64_t tiles_per_split = qsplits ? (tiles + qsplits - 1) / qsplits : 1;
  qsplits = qsplits ? (tiles + tiles_per_split - 1) / tiles_per_split : 0;
  const int splits = (int)(1 + qsplits);

  void *scratch;
  const size_t rows = (size_t)splits * n * heads;
  IQ_TRY(iq_scratch(ctx, sizeof(float) * rows * (p->head_dim + 2), &scratch));
  kq_args a;
  a.p = *p;
  a.r = kvq_regions_of(p, layer);
  a.part_acc = (float *)scratch;
  a.part_ml = a.part_acc + rows * p->head_dim;
  a.q = q;
  a.heads = heads;
  a.group = group;
  a.hblocks = hblocks;
  a.pos0 = pos0;
  a.tiles_per_split = (int)tiles_per_split;
  a.scale = scale;
  dim3 grid((unsigned)(p->kv_heads * hblocks), (unsigned)splits, (unsigned)n);
  IQ_TRY(G == 4 ? launch_bits<4>(ctx, a, grid) : launch_bits<8>(ctx, a, grid));
  IQ_TRY(merge_splits(ctx, out, a.part_acc, a.part_ml, n * heads, p->head_dim, splits));
  return IQ_OK;
}
