/* matmul.cu: out[n, m] = x[n, k] · w[m, k]ᵀ + bias (the twin of
 * kernels/cpu/matmul.c). Decode (n = 1) is memory bound: a GEMV that streams
 * each weight row once with 16-byte loads, one warp per row. Prefill (n > 1)
 * goes to cuBLAS; fp16/bf16 weights need x in the same type, so x is rounded
 * into scratch first (that rounding is the only precision lost vs the CPU). */
#include "cuda.cuh"

constexpr int GEMV_WARPS = 4; /* rows per block */

/* Sum of the products of 16 bytes of weights with the matching x. */
template <typename T>
__device__ __forceinline__ float dot16(uint4 raw, const float4 *x) {
  float w[8];
  iq_unpack8<T>(raw, w);
  float4 a = __ldg(x), b = __ldg(x + 1);
  return w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
         w[6] * b.z + w[7] * b.w;
}
template <>
__device__ __forceinline__ float dot16<float>(uint4 raw, const float4 *x) {
  float4 a = __ldg(x);
  return __uint_as_float(raw.x) * a.x + __uint_as_float(raw.y) * a.y + __uint_as_float(raw.z) * a.z +
         __uint_as_float(raw.w) * a.w;
}

/* Needs w, x 16-byte aligned and k a multiple of 16 / sizeof(T). Weights are
 * loaded cache-streaming (read once per token); x stays in L1/L2. */
template <typename T>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_vec_kernel(float *out, const float *x, const T *w, const float *bias, int k, int m) {
  constexpr int V = 16 / sizeof(T); /* elements per load */
  int row = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= m) return;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + (int64_t)row * k);
  const float4 *x4 = reinterpret_cast<const float4 *>(x);
  int nv = k / V;
  float acc = 0.0f;
#pragma unroll 4
  for (int i = lane; i < nv; i += 32) acc += dot16<T>(__ldcs(wr + i), x4 + i * (V / 4));
  acc = iq_warp_sum(acc);
  if (lane == 0) out[row] = acc + (bias ? bias[row] : 0.0f);
}

/* Any alignment: element loads. */
template <typename T>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(float *out, const float *x, const T *w, const float *bias, int k, int m) {
  int row = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= m) return;
  const T *wr = w + (int64_t)row * k;
  float acc = 0.0f;
  for (int i = lane; i < k; i += 32) acc += iq_f32(wr[i]) * x[i];
  acc = iq_warp_sum(acc);
  if (lane == 0) out[row] = acc + (bias ? bias[row] : 0.0f);
}

template <typename T>
static void launch_gemv(iq_ctx *ctx, float *out, const float *x, const void *w, const float *bias,
                        int k, int m) {
  const T *wt = static_cast<const T *>(w);
  unsigned blocks = (unsigned)((m + GEMV_WARPS - 1) / GEMV_WARPS);
  bool vec = (((uintptr_t)w | (uintptr_t)x) & 15) == 0 && k % (16 / sizeof(T)) == 0;
  if (vec)
    gemv_vec_kernel<T><<<blocks, GEMV_WARPS * 32, 0, ctx->stream>>>(out, x, wt, bias, k, m);
  else
    gemv_kernel<T><<<blocks, GEMV_WARPS * 32, 0, ctx->stream>>>(out, x, wt, bias, k, m);
}

template <typename T>
__global__ void round_kernel(T *dst, const float *src, int64_t count) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = iq_from_f32<T>(src[i]);
}

__global__ void bias_kernel(float *out, const float *bias, int m, int64_t count) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x)
    out[i] += bias[i % m];
}

/* Row-major out[n, m] = x[n, k] w[m, k]ᵀ is, in cuBLAS's column-major terms,
 * C[m, n] = Aᵀ B with A = w as a k×m matrix (lda k) and B = x as k×n (ldb k). */
static int gemm(iq_ctx *ctx, float *out, const void *x, const void *w, cudaDataType type, int n,
                int k, int m) {
  struct iq_cublas *cb;
  IQ_TRY(iq_cublas(ctx, &cb));
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t s = cb->gemm_ex(cb->handle, IQ_CUBLAS_OP_T, IQ_CUBLAS_OP_N, m, n, k, &one, w, type,
                                 k, x, type, k, &zero, out, CUDA_R_32F, m, IQ_CUBLAS_COMPUTE_32F,
                                 IQ_CUBLAS_GEMM_DEFAULT);
  if (s != 0)
    return iq_fail(ctx, IQ_ERR_DEVICE, "iq_matmul: cublasGemmEx (n %d, k %d, m %d): %s", n, k, m,
                   cb->status_string(s));
  return IQ_OK;
}

template <typename T>
static int rounded_gemm(iq_ctx *ctx, float *out, const float *x, const void *w, cudaDataType type,
                        int n, int k, int m) {
  int64_t count = (int64_t)n * k;
  void *xr;
  IQ_TRY(iq_scratch(ctx, (size_t)count * sizeof(T), &xr));
  round_kernel<T><<<iq_blocks(ctx, count, 256), 256, 0, ctx->stream>>>((T *)xr, x, count);
  IQ_LAUNCHED(ctx);
  return gemm(ctx, out, xr, w, type, n, k, m);
}

extern "C" int iq_matmul(iq_ctx *ctx, float *out, const float *x, const void *w, int w_dtype,
                         const float *bias, int n, int k, int m) {
  if (!ctx || !out || !x || !w) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: NULL argument");
  if (!iq_valid_dtype(w_dtype)) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: bad w dtype %d", w_dtype);
  if (n <= 0 || k <= 0 || m <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: n %d, k %d and m %d must be positive", n, k, m);
  if ((const void *)out == (const void *)x) return iq_fail(ctx, IQ_ERR_ARG, "iq_matmul: out is x");
  if (n == 1) {
    if (w_dtype == IQ_F16) launch_gemv<__half>(ctx, out, x, w, bias, k, m);
    else if (w_dtype == IQ_BF16) launch_gemv<__nv_bfloat16>(ctx, out, x, w, bias, k, m);
    else launch_gemv<float>(ctx, out, x, w, bias, k, m);
    IQ_LAUNCHED(ctx);
    return IQ_OK;
  }
  if (w_dtype == IQ_F16) IQ_TRY(rounded_gemm<__half>(ctx, out, x, w, CUDA_R_16F, n, k, m));
  else if (w_dtype == IQ_BF16) IQ_TRY(rounded_gemm<__nv_bfloat16>(ctx, out, x, w, CUDA_R_16BF, n, k, m));
  else IQ_TRY(gemm(ctx, out, x, w, CUDA_R_32F, n, k, m));
  if (bias) {
    int64_t count = (int64_t)n * m;
    bias_kernel<<<iq_blocks(ctx, count, 256), 256, 0, ctx->stream>>>(out, bias, m, count);
    IQ_LAUNCHED(ctx);
  }
  return IQ_OK;
}
