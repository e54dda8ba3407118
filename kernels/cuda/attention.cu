/* attention.cu: KV-cache stores and causal attention (the twin of
 * kernels/cpu/attention.c). Both attention kernels use online softmax (running
 * max, sum and weighted V), so no score matrix is ever materialised.
 * - prefill: one block per (16 queries, head); key tiles go through shared
 *   memory; fp32 SIMT math.
 * - decode (flash-decoding): positions 0..pos are split into chunks across
 *   blocks; one block serves every query head of a KV head, so each K/V element
 *   is read once, with 16-byte loads; a second kernel merges the chunks. */
#include <math.h>

#include "cuda.cuh"

constexpr int MAX_HEAD_DIM = 256;

template <typename T>
__global__ void kv_store_kernel(T *cache, const float *x, int pos0, int kv_heads, int d, int cap,
                                int64_t count) {
  int64_t row = (int64_t)kv_heads * d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count;
       e += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = e / row, r = e % row, h = r / d, c = r % d;
    cache[(h * cap + pos0 + t) * d + c] = iq_from_f32<T>(x[e]);
  }
}

/* ---- prefill ------------------------------------------------------------ */

constexpr int PF_Q = 16;     /* queries per block */
constexpr int PF_K = 32;     /* keys per shared-memory tile: one per lane */
constexpr int PF_WARPS = 8;  /* each warp owns PF_Q / PF_WARPS queries */
constexpr int PF_QW = PF_Q / PF_WARPS;
constexpr int PF_DL = MAX_HEAD_DIM / 32; /* output channels per lane: lane + 32 i */

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

constexpr int DEC_WARPS = 4;
/* Tuning, measured with scripts/device_bench.sh (overridable with -D to try others). */
#ifndef DEC_BLOCKS_PER_SM
#define DEC_BLOCKS_PER_SM 16
#endif
#ifndef DEC_MIN_KEYS
#define DEC_MIN_KEYS 128
#endif

/* Eight consecutive elements (16-byte aligned) as floats. */
__device__ __forceinline__ void load8(const __half *p, float out[8]) {
  iq_unpack8<__half>(__ldg(reinterpret_cast<const uint4 *>(p)), out);
}
__device__ __forceinline__ void load8(const float *p, float out[8]) {
  float4 a = __ldg(reinterpret_cast<const float4 *>(p)), b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

/* grid (kv_heads * hblocks, splits); block (kv head, up to G of its query
 * heads, one chunk of positions). A group of L lanes (L = pow2 >= d / 8)
 * holds one key, 8 channels per lane, so a warp takes 32 / L keys a step.
 * Every (warp, group) keeps its own online-softmax state per head; the block
 * merges them and writes its chunk's unnormalised partial:
 * part_acc[split, head, d], part_ml[split, head, {max, sum}]. */
template <typename T, int G>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    decode_kernel(float *part_acc, float *part_ml, const float *q, const T *k_cache,
                  const T *v_cache, int heads, int group, int hblocks, int d, int L, int cap,
                  int positions, int chunk, float scale) {
  __shared__ float sm_ml[DEC_WARPS * 32][G][2];
  __shared__ float sm_acc[DEC_WARPS * 256 * G]; /* states x G x d <= DEC_WARPS * 32 / L * 8 L * G */
  const int kvh = blockIdx.x / hblocks, h0 = kvh * group + (blockIdx.x % hblocks) * G;
  const int nh = min(G, kvh * group + group - h0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int KW = 32 / L, grp = lane / L, c0 = (lane % L) * 8;
  const bool active = c0 < d;
  const int begin = blockIdx.y * chunk, end = min(positions, begin + chunk);
  const T *kb = k_cache + (int64_t)kvh * cap * d + c0, *vb = v_cache + (int64_t)kvh * cap * d + c0;

  float qr[G][8], m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; g++) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) {
      qr[g][e] = active && g < nh ? q[(int64_t)(h0 + g) * d + c0 + e] : 0.0f;
      acc[g][e] = 0.0f;
    }
  }
  /* The loop bound is warp-uniform (shuffles need every lane); j may pass end.
   * The next step's K and V are loaded before this step's math, so each lane
   * keeps two 16-byte loads of each in flight: memory latency, not issue,
   * bounds a split, and there are too few warps per SM to hide it otherwise. */
  const int step = DEC_WARPS * KW;
  float k[8] = {0}, v[8] = {0}, kn[8] = {0}, vn[8] = {0};
  {
    const int j = begin + warp * KW + grp;
    if (j < end && active) load8(kb + (int64_t)j * d, k), load8(vb + (int64_t)j * d, v);
  }
  for (int base = begin + warp * KW; base < end; base += step) {
    const int j = base + grp, jn = j + step;
    const bool valid = j < end;
    if (jn < end && active) load8(kb + (int64_t)jn * d, kn), load8(vb + (int64_t)jn * d, vn);
#pragma unroll
    for (int g = 0; g < G; g++) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; e++) dot += qr[g][e] * k[e];
      for (int o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (!valid) continue;
      /* One exp per key: either the max moves (rescale the past) or it doesn't. */
      const float s = dot * scale;
      if (s > m[g]) {
        const float corr = expf(m[g] - s);
        m[g] = s;
        l[g] = l[g] * corr + 1.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = acc[g][e] * corr + v[e];
      } else {
        const float p = expf(s - m[g]);
        l[g] += p;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] += p * v[e];
      }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) k[e] = kn[e], v[e] = vn[e];
  }

  const int state = warp * KW + grp, states = DEC_WARPS * KW;
#pragma unroll
  for (int g = 0; g < G; g++) {
    if (active)
#pragma unroll
      for (int e = 0; e < 8; e++) sm_acc[(state * G + g) * d + c0 + e] = acc[g][e];
    if (lane % L == 0) sm_ml[state][g][0] = m[g], sm_ml[state][g][1] = l[g];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * d; idx += blockDim.x) {
    const int g = idx / d, c = idx % d, h = h0 + g;
    float mx = -INFINITY;
    for (int s = 0; s < states; s++) mx = fmaxf(mx, sm_ml[s][g][0]);
    float sum = 0.0f, a = 0.0f;
    for (int s = 0; s < states; s++) {
      const float ms = sm_ml[s][g][0];
      if (ms == -INFINITY) continue; /* a state that saw no key */
      const float w = expf(ms - mx);
      sum += sm_ml[s][g][1] * w;
      a += sm_acc[(s * G + g) * d + c] * w;
    }
    const int64_t ph = (int64_t)blockIdx.y * heads + h;
    part_acc[ph * d + c] = a;
    if (c == 0) part_ml[ph * 2] = mx, part_ml[ph * 2 + 1] = sum;
  }
}

/* One block per head: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M). */
__global__ void merge_kernel(float *out, const float *part_acc, const float *part_ml, int heads,
                             int d, int splits) {
  const int h = blockIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < splits; s++) mx = fmaxf(mx, part_ml[((int64_t)s * heads + h) * 2]);
  float sum = 0.0f;
  for (int s = 0; s < splits; s++) {
    const int64_t ph = (int64_t)s * heads + h;
    sum += part_ml[ph * 2 + 1] * expf(part_ml[ph * 2] - mx);
  }
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float a = 0.0f;
    for (int s = 0; s < splits; s++) {
      const int64_t ph = (int64_t)s * heads + h;
      a += part_acc[ph * d + c] * expf(part_ml[ph * 2] - mx);
    }
    out[(int64_t)h * d + c] = a / sum;
  }
}

template <typename T, int G>
static void launch_decode(iq_ctx *ctx, dim3 grid, float *part_acc, float *part_ml, const float *q,
                          const void *k_cache, const void *v_cache, int heads, int group,
                          int hblocks, int d, int L, int cap, int positions, int chunk,
                          float scale) {
  decode_kernel<T, G><<<grid, DEC_WARPS * 32, 0, ctx->stream>>>(
      part_acc, part_ml, q, (const T *)k_cache, (const T *)v_cache, heads, group, hblocks, d, L,
      cap, positions, chunk, scale);
}

template <typename T>
static int decode(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                  const void *v_cache, int pos, int heads, int kv_heads, int d, int cap,
                  float scale) {
  const int group = heads / kv_heads;
  const int G = group >= 8 ? 8 : group > 4 ? 8 : group > 2 ? 4 : group;
  const int hblocks = (group + G - 1) / G;
  int L = 1;
  while (L * 8 < d) L *= 2;
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
  case 1: launch_decode<T, 1>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, L, cap, positions, chunk, scale); break;
  case 2: launch_decode<T, 2>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, L, cap, positions, chunk, scale); break;
  case 4: launch_decode<T, 4>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, L, cap, positions, chunk, scale); break;
  default: launch_decode<T, 8>(ctx, grid, part_acc, part_ml, q, k_cache, v_cache, heads, group, hblocks, d, L, cap, positions, chunk, scale);
  }
  IQ_LAUNCHED(ctx);
  merge_kernel<<<heads, 128, 0, ctx->stream>>>(out, part_acc, part_ml, heads, d, splits);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

/* ---- ABI ------------------------------------------------------------------ */

static int check(iq_ctx *ctx, const char *op, const void *out, const void *q, const void *k,
                 const void *v, int dtype, int n, int pos0, int heads, int kv_heads, int d, int cap) {
  if (!ctx || !out || !q || !k || !v) return iq_fail(ctx, IQ_ERR_ARG, "%s: NULL argument", op);
  if (dtype != IQ_F16 && dtype != IQ_F32)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: cache dtype %d is not F16 or F32", op, dtype);
  if (n <= 0 || heads <= 0 || kv_heads <= 0 || d <= 0 || cap <= 0 || heads % kv_heads)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: bad shape: n %d, heads %d, kv_heads %d, head_dim %d, cap %d",
                   op, n, heads, kv_heads, d, cap);
  if (d > MAX_HEAD_DIM)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: head_dim %d above %d", op, d, MAX_HEAD_DIM);
  if (pos0 < 0 || (int64_t)pos0 + n > cap)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: positions %d..%lld outside a %d-token cache", op, pos0,
                   (long long)pos0 + n - 1, cap);
  return IQ_OK;
}

extern "C" int iq_kv_store(iq_ctx *ctx, void *cache, int cache_dtype, const float *x, int n,
                           int pos0, int kv_heads, int head_dim, int cap) {
  if (!ctx || !cache || !x) return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: NULL argument");
  if (cache_dtype != IQ_F16 && cache_dtype != IQ_F32)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: cache dtype %d is not F16 or F32", cache_dtype);
  if (n <= 0 || kv_heads <= 0 || head_dim <= 0 || cap <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: bad shape: n %d, kv_heads %d, head_dim %d, cap %d",
                   n, kv_heads, head_dim, cap);
  if (pos0 < 0 || (int64_t)pos0 + n > cap)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kv_store: positions %d..%lld outside a %d-token cache",
                   pos0, (long long)pos0 + n - 1, cap);
  int64_t count = (int64_t)n * kv_heads * head_dim;
  unsigned blocks = iq_blocks(ctx, count, 256);
  if (cache_dtype == IQ_F16)
    kv_store_kernel<__half><<<blocks, 256, 0, ctx->stream>>>((__half *)cache, x, pos0, kv_heads,
                                                             head_dim, cap, count);
  else
    kv_store_kernel<float><<<blocks, 256, 0, ctx->stream>>>((float *)cache, x, pos0, kv_heads,
                                                            head_dim, cap, count);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

extern "C" int iq_attention_prefill(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                                    const void *v_cache, int cache_dtype, int n, int pos0,
                                    int heads, int kv_heads, int head_dim, int cap, float scale) {
  IQ_TRY(check(ctx, "iq_attention_prefill", out, q, k_cache, v_cache, cache_dtype, n, pos0, heads,
               kv_heads, head_dim, cap));
  if (cache_dtype == IQ_F16)
    return launch_prefill<__half>(ctx, out, q, k_cache, v_cache, n, pos0, heads, kv_heads, head_dim,
                                  cap, scale);
  return launch_prefill<float>(ctx, out, q, k_cache, v_cache, n, pos0, heads, kv_heads, head_dim,
                               cap, scale);
}

extern "C" int iq_attention_decode(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                                   const void *v_cache, int cache_dtype, int pos, int heads,
                                   int kv_heads, int head_dim, int cap, float scale) {
  IQ_TRY(check(ctx, "iq_attention_decode", out, q, k_cache, v_cache, cache_dtype, 1, pos, heads,
               kv_heads, head_dim, cap));
  /* The vector path needs 16-byte aligned rows of 8-channel slices. */
  bool vec = head_dim % 8 == 0 && (((uintptr_t)k_cache | (uintptr_t)v_cache) & 15) == 0;
  if (!vec)
    return iq_attention_prefill(ctx, out, q, k_cache, v_cache, cache_dtype, 1, pos, heads, kv_heads,
                                head_dim, cap, scale);
  if (cache_dtype == IQ_F16)
    return decode<__half>(ctx, out, q, k_cache, v_cache, pos, heads, kv_heads, head_dim, cap, scale);
  return decode<float>(ctx, out, q, k_cache, v_cache, pos, heads, kv_heads, head_dim, cap, scale);
}
