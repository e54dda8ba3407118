/* attention.cu: KV-cache stores and causal attention (the twin of
 * kernels/cpu/attention.c). Both attention kernels use online softmax (running
 * max, sum and weighted V), so no score matrix is ever materialised.
 * - prefill: on tensor cores for an fp16 cache and head_dim 64/128
 *   (prefill_rows.cu); otherwise one block per (16 queries, head) with key
 *   tiles in shared memory and fp32 SIMT math.
 * - decode (flash-decoding): on tensor cores for an fp16 cache, head_dim
 *   64/128 and up to 8 query heads per KV head (decode_mma.cu); otherwise
 *   positions 0..pos are split into chunks across blocks; one block serves up
 *   to 8 query heads of a KV head, so each K/V element is read once; a thread
 *   dots one whole key per tile (no shuffles per key) and the block walks V
 *   rows coalesced; a second kernel merges the chunks. */
#include <math.h>

#include "cuda.cuh"
#include "checks.h"
#include "mma.cuh"
#include "prefill_rows.cuh"
#include "split_softmax.cuh"


/* Element e of k and of v, [n, kv_heads, d], to row (h, pos0 + t) of its cache. */
template <typename T>
__global__ void kv_store_kernel(T *k_cache, T *v_cache, const float *k, const float *v, int pos0,
                                int kv_heads, int d, int cap, int64_t count) {
  iq_wait_prior(); /* launched early; no iq_allow_next: see cuda.cuh */
  int64_t row = (int64_t)kv_heads * d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count;
       e += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = e / row, r = e % row, h = r / d, c = r % d;
    const int64_t at = (h * cap + pos0 + t) * d + c;
    k_cache[at] = iq_from_f32<T>(k[e]);
    v_cache[at] = iq_from_f32<T>(v[e]);
  }
}

/* ---- prefill ------------------------------------------------------------ */

constexpr int PF_Q = 16;     /* queries per block */
constexpr int PF_K = 32;     /* keys per shared-memory tile: one per lane */
constexpr int PF_WARPS = 8;  /* each warp owns PF_Q / PF_WARPS queries */
constexpr int PF_QW = PF_Q / PF_WARPS;
constexpr int PF_DL = IQ_MAX_HEAD_DIM / 32; /* output channels per lane: lane + 32 i */

static size_t prefill_smem(int d) { return sizeof(float) * ((size_t)PF_Q * d + 2 * PF_K * (d + 1)); }

/* grid (ceil(n / PF_Q), heads). Lane j scores key k0 + j of a tile; each lane
 * then accumulates its channels of p · V over the tile's keys. */
template <typename T>
__global__ void __launch_bounds__(PF_WARPS * 32)
    prefill_kernel(float *out, const float *q, const T *k_cache, const T *v_cache, int n, int pos0,
                   int heads, int group, int d, int cap, float scale) {
  extern __shared__ float smem[];
  const int ds = d + 1; /* padded rows: lanes reading different keys use different banks */
  float *qs = smem, *ks = qs + PF_Q * d, *vs = ks + PF_K * ds;
  const int h = blockIdx.y, t0 = blockIdx.x * PF_Q, nq = min(PF_Q, n - t0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T *kb = k_cache + (int64_t)(h / group) * cap * d, *vb = v_cache + (int64_t)(h / group) * cap * d;

  for (int e = threadIdx.x; e < nq * d; e += blockDim.x)
    qs[e] = q[((int64_t)(t0 + e / d) * heads + h) * d + e % d];
  float m[PF_QW], l[PF_QW], acc[PF_QW][PF_DL];
#pragma unroll
  for (int j = 0; j < PF_QW; j++) {
    m[j] = -INFINITY;
    l[j] = 0.0f;
#pragma unroll
    for (int i = 0; i < PF_DL; i++) acc[j][i] = 0.0f;
  }

  const int kend = pos0 + t0 + nq; /* the block's last query sees keys 0 .. kend - 1 */
  for (int k0 = 0; k0 < kend; k0 += PF_K) {
    const int nk = min(PF_K, kend - k0);
    __syncthreads(); /* the previous tile is consumed (and qs is written) */
    for (int e = threadIdx.x; e < nk * d; e += blockDim.x) {
      int r = e / d, c = e % d;
      ks[r * ds + c] = iq_f32(kb[(int64_t)(k0 + r) * d + c]);
      vs[r * ds + c] = iq_f32(vb[(int64_t)(k0 + r) * d + c]);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PF_QW; j++) {
      const int qi = warp * PF_QW + j, qpos = pos0 + t0 + qi;
      if (qi >= nq || k0 > qpos) continue; /* warp-uniform */
      float s = -INFINITY;
      if (lane < nk && k0 + lane <= qpos) {
        const float *qr = qs + qi * d, *kr = ks + lane * ds;
        float dot = 0.0f;
        for (int c = 0; c < d; c++) dot += qr[c] * kr[c];
        s = dot * scale;
      }
      float tmax = s;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
      /* tmax is finite: key k0 <= qpos is visible to lane 0. */
      const float mnew = fmaxf(m[j], tmax), corr = expf(m[j] - mnew), p = expf(s - mnew);
      l[j] = l[j] * corr + iq_warp_sum(p);
      m[j] = mnew;
#pragma unroll
      for (int i = 0; i < PF_DL; i++) acc[j][i] *= corr;
      for (int kk = 0; kk < nk; kk++) {
        const float pk = __shfl_sync(0xffffffffu, p, kk);
#pragma unroll
        for (int i = 0; i < PF_DL; i++)
          if (lane + 32 * i < d) acc[j][i] += pk * vs[kk * ds + lane + 32 * i];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < PF_QW; j++) {
    const int qi = warp * PF_QW + j;
    if (qi >= nq) continue;
    float *o = out + ((int64_t)(t0 + qi) * heads + h) * d;
#pragma unroll
    for (int i = 0; i < PF_DL; i++)
      if (lane + 32 * i < d) o[lane + 32 * i] = acc[j][i] / l[j];
  }
}

template <typename T>
static int launch_prefill(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                          const void *v_cache, int n, int pos0, int heads, int kv_heads, int d,
                          int cap, float scale) {
  size_t smem = prefill_smem(d);
  if (smem > 48 * 1024)
    IQ_CUDA(ctx, cudaFuncSetAttribute(prefill_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)smem));
  dim3 grid((unsigned)((n + PF_Q - 1) / PF_Q), (unsigned)heads);
  prefill_kernel<T><<<grid, PF_WARPS * 32, smem, ctx->stream>>>(
      out, q, (const T *)k_cache, (const T *)v_cache, n, pos0, heads, heads / kv_heads, d, cap, scale);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

/* ---- decode --------------------------------------------------------------- */

/* Tuning, measured with scripts/sweep_decode.sh (overridable with -D to try others). */
#ifndef DEC_BLOCKS_PER_SM
#define DEC_BLOCKS_PER_SM 8
#endif
#ifndef DEC_MIN_KEYS
#define DEC_MIN_KEYS 128
#endif
constexpr int DEC_THREADS = 128; /* keys per tile: one per thread */

/* Eight consecutive halves (16-byte aligned, in shared memory) as floats. */
__device__ __forceinline__ void load8(const __half *p, float out[8]) {
  iq_unpack8<__half>(*reinterpret_cast<const uint4 *>(p), out);
}
__device__ __forceinline__ float2 load2(const __half *p) {
  return __half22float2(*reinterpret_cast<const __half2 *>(p));
}


/* grid (kv_heads * hblocks, splits): a block takes one KV head, up to G of its
 * query heads and one chunk of positions, in tiles of DEC_THREADS keys. Each
 * tile's K and V rows are copied to shared memory with coalesced cp.async.
 * QK: each thread owns one key of the tile and dots its whole row with the G
 * queries (no shuffles per key; q comes from shared memory as broadcasts).
 * Softmax: one block-wide max and sum per tile and head (online: the running
 * state is rescaled once per tile). PV: each thread owns channel pairs of the
 * G outputs and walks the tile's V rows.
 * Writes the chunk's unnormalised partial: part_acc[split, head, d],
 * part_ml[split, head, {max, sum}]. Needs an fp16 cache, d % 8 == 0 and 16-byte
 * aligned rows. */
template <typename T, int G>
__global__ void __launch_bounds__(DEC_THREADS)
    decode_kernel(float *part_acc, float *part_ml, const float *q, const T *k_cache,
                  const T *v_cache, int heads, int group, int hblocks, int d, int cap,
                  int positions, int chunk, float scale) {
  constexpr int WARPS = DEC_THREADS / 32, MAX_PAIRS = G * IQ_MAX_HEAD_DIM / 2;
  constexpr int SLOTS = (MAX_PAIRS + DEC_THREADS - 1) / DEC_THREADS;
  extern __shared__ float4 dec_smem[];
  float *q_s = reinterpret_cast<float *>(dec_smem); /* [G][d], scaled */
  float *p_s = q_s + G * d;                           /* [G][DEC_THREADS] */
  /* The tile's K rows (padded by 16 bytes so a quarter-warp reading 8 rows
   * hits distinct banks) and V rows, copied in coalesced by cp.async. */
  const int kstride = d + 16 / (int)sizeof(T);
  T *k_s = reinterpret_cast<T *>(p_s + G * DEC_THREADS), *v_s = k_s + DEC_THREADS * kstride;
  __shared__ float red[G][WARPS], m_s[G], l_s[G], corr_s[G];
  const int kvh = blockIdx.x / hblocks, h0 = kvh * group + (blockIdx.x % hblocks) * G;
  const int nh = min(G, kvh * group + group - h0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int begin = blockIdx.y * chunk, end = min(positions, begin + chunk);
  const T *kb = k_cache + (int64_t)kvh * cap * d, *vb = v_cache + (int64_t)kvh * cap * d;
  const int pairs = d / 2;

  for (int i = tid; i < G * d; i += DEC_THREADS) {
    const int g = i / d;
    q_s[i] = g < nh ? q[(int64_t)(h0 + g) * d + i % d] * scale : 0.0f;
  }
  if (tid < G) m_s[tid] = -INFINITY, l_s[tid] = 0.0f;
  float2 acc[SLOTS];
#pragma unroll
  for (int r = 0; r < SLOTS; r++) acc[r] = make_float2(0.0f, 0.0f);
  __syncthreads();

  for (int base = begin; base < end; base += DEC_THREADS) {
    const int j = base + tid, n = min(DEC_THREADS, end - base);
    float s[G];
#pragma unroll
    for (int g = 0; g < G; g++) s[g] = j < end ? 0.0f : -INFINITY;
    const int row_chunks = d * (int)sizeof(T) / 16;
    for (int e = tid; e < n * row_chunks; e += DEC_THREADS) {
      const int r = e / row_chunks, c = (e % row_chunks) * (16 / (int)sizeof(T));
      const unsigned kd = (unsigned)__cvta_generic_to_shared(k_s + r * kstride + c);
      const unsigned vd = (unsigned)__cvta_generic_to_shared(v_s + r * d + c);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(kd),
                   "l"(kb + (int64_t)(base + r) * d + c));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(vd),
                   "l"(vb + (int64_t)(base + r) * d + c));
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_all;\n" ::);
    __syncthreads();
    if (j < end) {
      const T *kr = k_s + tid * kstride;
      for (int c = 0; c < d; c += 8) {
        float k[8];
        load8(kr + c, k);
#pragma unroll
        for (int g = 0; g < G; g++) {
          const float4 qa = *reinterpret_cast<const float4 *>(q_s + g * d + c);
          const float4 qb = *reinterpret_cast<const float4 *>(q_s + g * d + c + 4);
          s[g] += qa.x * k[0] + qa.y * k[1] + qa.z * k[2] + qa.w * k[3] + qb.x * k[4] +
                  qb.y * k[5] + qb.z * k[6] + qb.w * k[7];
        }
      }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
      const float mx = warp_max(s[g]);
      if (lane == 0) red[g][warp] = mx;
    }
    __syncthreads();
    if (tid < G) {
      float mx = m_s[tid];
      for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, red[tid][w]);
      corr_s[tid] = expf(m_s[tid] - mx); /* 0 on the first tile */
      m_s[tid] = mx;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; g++) {
      const float p = j < end ? expf(s[g] - m_s[g]) : 0.0f;
      p_s[g * DEC_THREADS + tid] = p;
      const float sum = iq_warp_sum(p);
      if (lane == 0) red[g][warp] = sum;
    }
    __syncthreads();
    if (tid < G) {
      float sum = 0.0f;
      for (int w = 0; w < WARPS; w++) sum += red[tid][w];
      l_s[tid] = l_s[tid] * corr_s[tid] + sum;
    }
#pragma unroll
    for (int r = 0; r < SLOTS; r++) {
      const int i = tid + r * DEC_THREADS;
      if (i >= G * pairs) break;
      const int g = i / pairs, c = 2 * (i % pairs);
      const float corr = corr_s[g];
      float2 a = make_float2(acc[r].x * corr, acc[r].y * corr);
      const T *vc = v_s + c;
      const float *p = p_s + g * DEC_THREADS;
#pragma unroll 8
      for (int t = 0; t < n; t++) {
        const float2 v = load2(vc + (int64_t)t * d);
        a.x += p[t] * v.x;
        a.y += p[t] * v.y;
      }
      acc[r] = a;
    }
    __syncthreads(); /* p_s, red and corr_s are rewritten by the next tile */
  }

#pragma unroll
  for (int r = 0; r < SLOTS; r++) {
    const int i = tid + r * DEC_THREADS;
    if (i >= G * pairs) break;
    const int g = i / pairs, c = 2 * (i % pairs);
    if (g >= nh) continue;
    const int64_t ph = (int64_t)blockIdx.y * heads + h0 + g;
    part_acc[ph * d + c] = acc[r].x;
    part_acc[ph * d + c + 1] = acc[r].y;
  }
  if (tid < nh) {
    const int64_t ph = (int64_t)blockIdx.y * heads + h0 + tid;
    part_ml[ph * 2] = m_s[tid];
    part_ml[ph * 2 + 1] = l_s[tid];
  }
}

template <typename T, int G>
static int launch_decode(iq_ctx *ctx, dim3 grid, float *part_acc, float *part_ml, const float *q,
                         const void *k_cache, const void *v_cache, int heads, int group,
                         int hblocks, int d, int cap, int positions, int chunk, float scale) {
  const size_t smem = sizeof(float) * G * (d + DEC_THREADS) +
                      sizeof(T) * DEC_THREADS * (2 * d + 16 / sizeof(T));
  IQ_CUDA(ctx, cudaFuncSetAttribute(decode_kernel<T, G>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem));
  decode_kernel<T, G><<<grid, DEC_THREADS, smem, ctx->stream>>>(
      part_acc, part_ml, q, (const T *)k_cache, (const T *)v_cache, heads, group, hblocks, d, cap,
      positions, chunk, scale);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

template <typename T>
static int decode(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                  const void *v_cache, int pos, int heads, int kv_heads, int d, int cap,
                  float scale) {
  const int group = heads / kv_heads;
  const int G = group > 4 ? 8 : group > 2 ? 4 : group;
  const int hblocks = (group + G - 1) / G;
  /* Enough chunks for DEC_BLOCKS_PER_SM blocks per multiprocessor (the memory
   * system needs that many loads in flight), each of >= DEC_MIN_KEYS keys so
   * short contexts are not all merge overhead. */
  const int positions = pos + 1, per_split = kv_heads * hblocks;
  int splits = (DEC_BLOCKS_PER_SM * ctx->sms + per_split - 1) / per_split;
  splits = max(1, min(splits, (positions + DEC_MIN_KEYS - 1) / DEC_MIN_KEYS));
  const int chunk = (positions + splits - 1) / splits;
  splits = (positions + chunk - 1) / chunk; /* none empty */

  void *scratch;
  IQ_TRY(iq_scratch(ctx, sizeof(float) * (size_t)splits * heads * (d + 2), &scratch));
  float *part_acc = (float *)scratch, *part_ml = part_acc + (size_t)splits * heads * d;
  dim3 grid((unsigned)(kv_heads * hblocks), (unsigned)splits);
  switch (G) {
  case 1: IQ_TRY((launch_decode<T, 1>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, cap, positions, chunk, scale))); break;
  case 2: IQ_TRY((launch_decode<T, 2>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, cap, positions, chunk, scale))); break;
  case 4: IQ_TRY((launch_decode<T, 4>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, cap, positions, chunk, scale))); break;
  default: IQ_TRY((launch_decode<T, 8>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, cap, positions, chunk, scale)));
  }
  IQ_TRY(merge_splits(ctx, out, part_acc, part_ml, heads, d, splits));
  return IQ_OK;
}

/* ---- ABI ------------------------------------------------------------------ */

extern "C" int iq_kv_store(iq_ctx *ctx, void *k_cache, void *v_cache, int cache_dtype,
                           const float *k, const float *v, int n, int pos0, int kv_heads,
                           int head_dim, int cap) {
  IQ_TRY(iq_check_kv_store(ctx, k_cache, v_cache, cache_dtype, k, v, n, pos0, kv_heads, head_dim,
                           cap));
  int64_t count = (int64_t)n * kv_heads * head_dim;
  unsigned blocks = iq_blocks(ctx, count, 256);
  if (cache_dtype == IQ_F16)
    return iq_launch_early(ctx, kv_store_kernel<__half>, dim3(blocks), dim3(256), 0,
                           (__half *)k_cache, (__half *)v_cache, k, v, pos0, kv_heads, head_dim,
                           cap, count);
  return iq_launch_early(ctx, kv_store_kernel<float>, dim3(blocks), dim3(256), 0, (float *)k_cache,
                         (float *)v_cache, k, v, pos0, kv_heads, head_dim, cap, count);
}

/* An fp16 cache's prompt by prefill_rows.cu: a block's (query, head) rows share one KV head's
 * tiles, which are the cache's rows, and a short prompt deep in a context splits over them. */
static int launch_prefill_rows(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                               const void *v_cache, int n, int pos0, int heads, int kv_heads,
                               int head_dim, int cap, float scale) {
  pr_kernel k;
  IQ_TRY(pr_rows_kernel(ctx, head_dim, true, &k));
  pr_plan plan;
  pr_plan_of(ctx, k, head_dim, n, heads, kv_heads, ((int64_t)pos0 + n + PR_TILE - 1) / PR_TILE, &plan);
  void *scratch = nullptr;
  if (plan.part_bytes) IQ_TRY(iq_scratch(ctx, plan.part_bytes, &scratch));
  pr_args a = {};
  a.k_tiles = (const __half *)k_cache, a.v_tiles = (const __half *)v_cache;
  a.head_stride = (int64_t)cap * head_dim, a.tile_stride = PR_TILE * head_dim;
  a.q = q, a.out = out;
  a.part_acc = (float *)scratch;
  a.part_ml = scratch ? a.part_acc + (size_t)plan.splits * n * heads * head_dim : nullptr;
  a.n = n, a.pos0 = pos0, a.heads = heads, a.group = heads / kv_heads;
  a.qscale = scale * LOG2E;
  return pr_attend(ctx, a, k, plan, head_dim, kv_heads);
}

extern "C" int iq_attention_prefill(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                                    const void *v_cache, int cache_dtype, int n, int pos0,
                                    int heads, int kv_heads, int head_dim, int cap, float scale) {
  IQ_TRY(iq_check_attention(ctx, "iq_attention_prefill", out, q, k_cache, v_cache, cache_dtype, n,
                            pos0, heads, kv_heads, head_dim, cap));
  /* Tensor cores for several queries over an fp16 cache (16-byte aligned rows, q read as float2). */
  if (cache_dtype == IQ_F16 && n > 1 && (head_dim == 128 || head_dim == 64) &&
      heads / kv_heads <= PR_ROWS && (((uintptr_t)k_cache | (uintptr_t)v_cache) & 15) == 0 &&
      ((uintptr_t)q & 7) == 0)
    return launch_prefill_rows(ctx, out, q, k_cache, v_cache, n, pos0, heads, kv_heads, head_dim,
                               cap, scale);
  if (cache_dtype == IQ_F16)
    return launch_prefill<__half>(ctx, out, q, k_cache, v_cache, n, pos0, heads, kv_heads, head_dim,
                                  cap, scale);
  return launch_prefill<float>(ctx, out, q, k_cache, v_cache, n, pos0, heads, kv_heads, head_dim,
                               cap, scale);
}

extern "C" int iq_attention_decode(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                                   const void *v_cache, int cache_dtype, int pos, int heads,
                                   int kv_heads, int head_dim, int cap, float scale) {
  IQ_TRY(iq_check_attention(ctx, "iq_attention_decode", out, q, k_cache, v_cache, cache_dtype, 1,
                            pos, heads, kv_heads, head_dim, cap));
  /* The split kernel takes fp16 caches with 16-byte aligned rows of 8-channel
   * slices; an fp32 cache (reference runs) or odd head_dim takes the prefill kernel. */
  bool vec = cache_dtype == IQ_F16 && head_dim % 8 == 0 &&
             (((uintptr_t)k_cache | (uintptr_t)v_cache) & 15) == 0;
  if (!vec)
    return iq_attention_prefill(ctx, out, q, k_cache, v_cache, cache_dtype, 1, pos, heads, kv_heads,
                                head_dim, cap, scale);
  if (decode_mma_supported(head_dim, heads / kv_heads) && ((uintptr_t)q & 7) == 0) /* float2 q */
    return decode_mma_attention(ctx, out, q, k_cache, v_cache, pos, heads, kv_heads, head_dim, cap,
                                scale);
  return decode<__half>(ctx, out, q, k_cache, v_cache, pos, heads, kv_heads, head_dim, cap, scale);
}
