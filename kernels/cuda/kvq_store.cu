/* kvq_store.cu: the quantized KV cache's layout, store and dequantizer (the
 * twin of the first half of kernels/cpu/kvq.c). Built with -fmad=false: the
 * quantization arithmetic in kvq.h then rounds exactly as the C backend's, so
 * both write the same codes and pairs. */
#include <math.h>

#include "cuda.cuh"
#include "kvq.h"

extern "C" int iq_kvq_layout(iq_ctx *ctx, const iq_kvq_params *p,
                             uint64_t offsets[IQ_KVQ_REGIONS + 1]) {
  IQ_TRY(kvq_check_params(ctx, "iq_kvq_layout", p));
  if (!offsets) return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_layout: NULL offsets");
  kvq_offsets(p, offsets);
  return IQ_OK;
}

/* grid (kv_heads, ceil(head_dim / 64)), block 32 x KVQ_NORM_STRIPES: lane l takes RoPE pair
 * 32 blockIdx.y + l, warp s the tokens of stripe s (t % KVQ_NORM_STRIPES = s), in the C
 * backend's order; lane l of warp 0 then combines the pair's stripes. With a thread per pair
 * (8 blocks of 64 threads for Llama-3) a 4096-token prompt at depth 0 ran at 20.8k tokens/s,
 * with the stripes at 29.8k (pp4096 k2v2, H100, docs/perf.md session 21). */
__global__ void __launch_bounds__(32 * KVQ_NORM_STRIPES)
    key_norm_kernel(iq_kvq_params p, float *key_scale, const float *k, int n) {
  __shared__ double stripes[KVQ_NORM_STRIPES][32];
  const int h = blockIdx.x, lane = threadIdx.x % 32, s = threadIdx.x / 32, d = p.head_dim;
  const int half = d / 2, i = blockIdx.y * 32 + lane;
  double stat = 0.0;
  for (int t = s; i < half && t < n && p.norm != IQ_NORM_OFF; t += KVQ_NORM_STRIPES)
    for (int c = i; c < d; c += half)
      stat = kvq_norm_add(stat, k[((int64_t)t * p.kv_heads + h) * d + c], p.norm);
  stripes[s][lane] = stat;
  __syncthreads();
  if (s == 0 && i < half) key_scale[h * half + i] = kvq_norm_factor(&stripes[0][lane], 32, p.norm, n);
}

/* Rows of n tokens into the sink or the ring as fp16, keys divided by their
 * pair's factor. */
__global__ void rows_kernel(iq_kvq_params p, kvq_regions r, const float *k, const float *v, int n,
                            int pos0) {
  iq_wait_prior(); /* launched early; no iq_allow_next: see cuda.cuh */
  const int d = p.head_dim, half = d / 2;
  const int64_t count = (int64_t)n * p.kv_heads * d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / ((int64_t)p.kv_heads * d);
    const int h = (int)(e / d % p.kv_heads), c = (int)(e % d);
    const int64_t row = kvq_fp16_row(&p, h, pos0 + t) + c;
    (pos0 + t < p.sink ? r.sink_k : r.ring_k)[row] =
        kvq_f16_bits(k[e] / r.key_scale[h * half + c % half]);
    (pos0 + t < p.sink ? r.sink_v : r.ring_v)[row] = kvq_f16_bits(v[e]);
  }
}

/* Two running values over a group's lanes (kvq_lanes: a power of two up to 32, aligned within
 * the warp), halves first as kvq_group_error adds them: x = op(x, the partner lane's x); every
 * lane of the group gets the result. */
template <typename Op> __device__ inline float2 group_reduce(float2 x, int lanes, Op op) {
  for (int half = lanes / 2; half > 0; half /= 2)
    x = op(x, make_float2(__shfl_xor_sync(0xffffffffu, x.x, half, lanes),
                          __shfl_xor_sync(0xffffffffu, x.y, half, lanes)));
  return x;
}

/* Slices a stream block's side is quantized in, a block of threads each, so that a decode step's
 * one stream block per KV head and side (16 blocks for an 8B's 8 KV heads) spreads over more of
 * the GPU. Each slice holds whole words of the stored order: a tile order's words hold codes of
 * one 32-channel slice, a row order's of one row (kvq.h), so a slice is a contiguous range of the
 * block's groups, or, for values over channels in a tile (a word holds codes of 4 tokens), a
 * range of channels of every token, whole groups (slice_group). Natural order (3 bits, short
 * rows) stays whole. */
#define QUANTIZE_SLICES 4
__device__ inline int quantize_slices(int order, int axis, int block, int head_dim, int group) {
  const int most = !order                         ? 1
                   : order == KVQ_VALUE_ROWS_TILE ? head_dim / (group > 32 ? group : 32)
                   : axis == IQ_AXIS_TOKENS       ? head_dim / 32
                                                  : block;
  return most < QUANTIZE_SLICES ? most : QUANTIZE_SLICES;
}

/* Group k of slice `slice` (of `slices`, per_slice groups each) of a block: the k-th of a
 * contiguous range, or, by channels (KVQ_VALUE_ROWS_TILE), of the slice's channels token by
 * token. */
__device__ inline int slice_group(int k, int slice, int slices, int per_slice, bool by_channels,
                                  int head_dim, int group) {
  if (!by_channels) return slice * per_slice + k;
  const int per_token = head_dim / slices / group;
  return k / per_token * (head_dim / group) + slice * per_token + k % per_token;
}

/* grid (blocks x QUANTIZE_SLICES, kv_heads, 2 sides), block QUANTIZE_THREADS: quantizes a slice
 * of stream block first_block + blockIdx.x / QUANTIZE_SLICES of one side of one KV head from the
 * ring. The tile is copied to shared memory (rows padded by one float, so lanes walking a channel
 * over tokens hit distinct banks); kvq_lanes(group) lanes of a warp take a group, each lane its
 * elements lane, lane + L, ... (up to QUANTIZE_MINE), and find the group's bounds, pair and codes
 * together; each code goes to its slot in the stored order, so that a thread packs a word of the
 * slice from consecutive bytes. */
#define QUANTIZE_THREADS 1024
#define QUANTIZE_MINE (KVQ_MAX_GROUP / KVQ_LANES)
__global__ void __launch_bounds__(QUANTIZE_THREADS)
    quantize_kernel(iq_kvq_params p, kvq_regions r, int64_t first_block) {
  extern __shared__ float q_tile[];
  const int b = kvq_block(&p), d = p.head_dim, h = blockIdx.y, side = blockIdx.z, row = d + 1;
  const int bits = side ? p.v_bits : p.k_bits, group = side ? p.v_group : p.k_group;
  const int axis = side ? p.v_axis : p.k_axis, order = kvq_order(&p, side);
  const int slices = quantize_slices(order, axis, b, d, group);
  const int slice = blockIdx.x % QUANTIZE_SLICES;
  if (slice >= slices) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  uint8_t *codes = reinterpret_cast<uint8_t *>(q_tile + b * row); /* in slot order */
  const int64_t first = (first_block + blockIdx.x / QUANTIZE_SLICES) * b, qcap = kvq_quant_cap(&p);
  const uint16_t *ring = side ? r.ring_v : r.ring_k;
  for (int t = warp; t < b; t += warps) { /* first + t < cap: 32 bits */
    const uint16_t *src = ring + ((int64_t)h * p.ring + (int)(first + t) % p.ring) * d;
    for (int c = lane; c < d; c += 32) q_tile[t * row + c] = kvq_f16_value(src[c]);
  }
  __syncthreads();
  uint16_t *meta = (side ? r.meta_v : r.meta_k) +
                   kvq_pair_units(((int64_t)h * qcap + first) * d / group, p.meta);
  const int stride = axis == IQ_AXIS_CHANNELS ? 1 : row, lanes = kvq_lanes(group);
  const int per_warp = 32 / lanes, mine = group / lanes, period = kvq_period(order, d);
  const int per_slice = b * d / group / slices; /* groups; a multiple of per_warp */
  const bool by_channels = order == KVQ_VALUE_ROWS_TILE;
  const bool asym = p.qmode != IQ_QMODE_SYM, sym = p.qmode != IQ_QMODE_ASYM;
  /* every lane of a warp runs the same passes, as the shuffles need */
  for (int gw = warp * per_warp; gw < per_slice; gw += warps * per_warp) {
    const int gi = slice_group(gw + lane / lanes, slice, slices, per_slice, by_channels, d, group);
    const int l = lane % lanes;
    int t, c;
    kvq_group_entry(axis, group, d, gi, 0, &t, &c);
    const float *x = q_tile + t * row + c;
    float v[QUANTIZE_MINE];
#pragma unroll
    for (int k = 0; k < QUANTIZE_MINE; k++) v[k] = k < mine ? x[(l + k * lanes) * stride] : 0.0f;
    float2 bounds = make_float2(v[0], v[0]); /* lo, hi */
#pragma unroll
    for (int k = 1; k < QUANTIZE_MINE; k++)
      if (k < mine) bounds = make_float2(fminf(bounds.x, v[k]), fmaxf(bounds.y, v[k]));
    bounds = group_reduce(bounds, lanes, [](float2 a, float2 b) {
      return make_float2(fminf(a.x, b.x), fmaxf(a.y, b.y));
    });
    const kvq_candidates cand = kvq_candidates_of(bounds.x, bounds.y, bits, p.meta);
    int asym_code[QUANTIZE_MINE], sym_code[QUANTIZE_MINE];
    float asym_error = 0.0f, sym_error = 0.0f; /* kvq_group_error's lane partials */
#pragma unroll
    for (int k = 0; k < QUANTIZE_MINE; k++) {
      if (k >= mine) break;
      if (asym) {
        asym_code[k] = kvq_code(v[k], cand.scale[0], cand.offset[0], bits);
        asym_error += kvq_code_error(v[k], asym_code[k], cand.scale[0], cand.offset[0]);
      }
      if (sym) {
        sym_code[k] = kvq_code(v[k], cand.scale[1], cand.offset[1], bits);
        sym_error += kvq_code_error(v[k], sym_code[k], cand.scale[1], cand.offset[1]);
      }
    }
    if (p.qmode == IQ_QMODE_HYBRID) {
      const float2 sums = group_reduce(make_float2(asym_error, sym_error), lanes,
                                       [](float2 a, float2 b) {
                                         return make_float2(a.x + b.x, a.y + b.y);
                                       });
      asym_error = sums.x, sym_error = sums.y;
    }
    const bool keeps_sym = kvq_keeps_sym(&cand, bits, p.qmode, asym_error, sym_error);
    if (l == 0)
      kvq_set_pair(meta, gi, p.meta, keeps_sym ? cand.scale[1] : cand.scale[0],
                   keeps_sym ? cand.offset[1] : cand.offset[0]);
#pragma unroll
    for (int k = 0; k < QUANTIZE_MINE; k++) {
      if (k >= mine) break;
      const int i = gi * group + l + k * lanes, e = order ? i % period : 0;
      codes[order ? i - e + kvq_slot_in_period(e, bits, order, d) : i] =
          (uint8_t)(keeps_sym ? sym_code[k] : asym_code[k]);
    }
  }
  __syncthreads();
  uint32_t *words = (side ? r.codes_v : r.codes_k) + ((int64_t)h * qcap + first) * d * bits / 32;
  for (int w = threadIdx.x; w < b * d * bits / 32; w += blockDim.x) {
    if (slices > 1) { /* the word's slice: that of its first code (its group, or its channel) */
      const int s0 = w * (32 / bits), e = s0 % period;
      const int elem = s0 - e + kvq_elem_in_period(e, bits, order, d);
      if ((by_channels ? elem % d / (d / slices) : elem / group / per_slice) != slice) continue;
    }
    words[w] = kvq_pack_word(codes, w, bits);
  }
}

extern "C" int iq_kvq_store(iq_ctx *ctx, const iq_kvq_params *p, void *layer, const float *k,
                            const float *v, int n, int pos0) {
  IQ_TRY(kvq_check_params(ctx, "iq_kvq_store", p));
  if (!ctx || !layer || !k || !v) return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_store: NULL argument");
  const int b = kvq_block(p), d = p->head_dim;
  if (n <= 0 || pos0 < 0 || (int64_t)pos0 + n > p->cap || n > p->ring - p->recent - b + 1)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_kvq_store: %d tokens at %d: needs 1..%d tokens within a %d-token cache",
                   n, pos0, p->ring - p->recent - b + 1, p->cap);
  const kvq_regions r = kvq_regions_of(p, layer);
  if (pos0 == 0) {
    key_norm_kernel<<<dim3((unsigned)p->kv_heads, (unsigned)(d / 2 + 31) / 32), 32 * KVQ_NORM_STRIPES,
                      0, ctx->stream>>>(*p, r.key_scale, k, n);
    IQ_LAUNCHED(ctx);
  }
  const int64_t count = (int64_t)n * p->kv_heads * d;
  IQ_TRY(iq_launch_early(ctx, rows_kernel, dim3(iq_blocks(ctx, count, 256)), dim3(256), 0, *p, r, k,
                         v, n, pos0));
  /* blocks these tokens complete */
  const int64_t done = pos0 > p->sink ? (pos0 - p->sink) / b : 0;
  const int64_t now = (int64_t)pos0 + n > p->sink ? ((int64_t)pos0 + n - p->sink) / b : 0;
  if (now == done) return IQ_OK;
  const size_t smem = (size_t)b * ((d + 1) * sizeof(float) + d);
  if (smem > 48 * 1024) /* past the default: blocks of 128 tokens at head_dim 128, 64 at 256 */
    IQ_CUDA(ctx, cudaFuncSetAttribute(quantize_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)smem));
  dim3 grid((unsigned)((now - done) * QUANTIZE_SLICES), (unsigned)p->kv_heads, 2);
  quantize_kernel<<<grid, QUANTIZE_THREADS, smem, ctx->stream>>>(*p, r, done);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

/* k, v [kv_heads, len, d]: sink and ring rows as stored, quantized rows
 * dequantized, as a query at position len - 1 sees them. */
__global__ void dequantize_kernel(iq_kvq_params p, kvq_regions r, float *k, float *v, int len) {
  const int d = p.head_dim, b = kvq_block(&p);
  const int64_t nq = kvq_quantized(&p, len), qcap = kvq_quant_cap(&p);
  const int64_t count = (int64_t)p.kv_heads * len * d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int h = (int)(e / ((int64_t)len * d)), c = (int)(e % d);
    const int64_t x = e / d % len, u = x - p.sink;
    if (u >= 0 && u < nq) {
      k[e] = kvq_dequantized(r.codes_k + (int64_t)h * qcap * d * p.k_bits / 32,
                             r.meta_k + kvq_pair_units((int64_t)h * qcap * d / p.k_group, p.meta),
                             u, c, d, p.k_bits, p.k_group, p.k_axis, b, kvq_order(&p, 0), p.meta);
      v[e] = kvq_dequantized(r.codes_v + (int64_t)h * qcap * d * p.v_bits / 32,
                             r.meta_v + kvq_pair_units((int64_t)h * qcap * d / p.v_group, p.meta),
                             u, c, d, p.v_bits, p.v_group, p.v_axis, b, kvq_order(&p, 1), p.meta);
    } else {
      const int64_t row = kvq_fp16_row(&p, h, x) + c;
      k[e] = kvq_f16_value((x < p.sink ? r.sink_k : r.ring_k)[row]);
      v[e] = kvq_f16_value((x < p.sink ? r.sink_v : r.ring_v)[row]);
    }
  }
}

extern "C" int iq_kvq_dequantize(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *k,
                                 float *v, int len) {
  IQ_TRY(kvq_check_params(ctx, "iq_kvq_dequantize", p));
  if (!ctx || !layer || !k || !v)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_dequantize: NULL argument");
  if (len <= 0 || len > p->cap)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_dequantize: len %d outside 1..%d", len, p->cap);
  const int64_t count = (int64_t)p->kv_heads * len * p->head_dim;
  dequantize_kernel<<<iq_blocks(ctx, count, 256), 256, 0, ctx->stream>>>(
      *p, kvq_regions_of(p, layer), k, v, len);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
