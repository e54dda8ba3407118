/* matmul.cu: out[n, m] = x[n, k] · w[m, k]ᵀ + bias (the twin of
 * kernels/cpu/matmul.c). Decode (n = 1) is memory bound: a GEMV that streams
 * each weight row once with 16-byte loads, one warp per row. Prefill (n > 1)
 * goes to cuBLAS, which takes x and fp16/bf16 weights in the same type: an x
 * already in the weights' type (rmsnorm and swiglu write it so) goes as it is;
 * an fp32 x is rounded into scratch first (that rounding is the only precision
 * lost vs the CPU, and it gives the bits the narrow x would). */
#include <type_traits>

#include "cuda.cuh"
#include "checks.h"

constexpr int GEMV_WARPS = 4; /* rows per block */

__device__ __forceinline__ float dot8(const float w[8], const float v[8]) {
  return w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3] + w[4] * v[4] + w[5] * v[5] +
         w[6] * v[6] + w[7] * v[7];
}

/* Sum of the products of 16 bytes of weights T with the matching elements of x (X: fp32, or T
 * itself when x is fp16/bf16, then 16 bytes of x too). */
template <typename T, typename X>
__device__ __forceinline__ float dot16(uint4 raw, const X *x) {
  if constexpr (std::is_same_v<T, float>) {
    float4 a = __ldg(reinterpret_cast<const float4 *>(x));
    return __uint_as_float(raw.x) * a.x + __uint_as_float(raw.y) * a.y +
           __uint_as_float(raw.z) * a.z + __uint_as_float(raw.w) * a.w;
  } else {
    float w[8], v[8];
    iq_unpack8<T>(raw, w);
    if constexpr (std::is_same_v<X, float>) {
      const float4 *x4 = reinterpret_cast<const float4 *>(x);
      float4 a = __ldg(x4), b = __ldg(x4 + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      static_assert(std::is_same_v<X, T>, "x is fp32 or the weights' type");
      iq_unpack8<T>(__ldg(reinterpret_cast<const uint4 *>(x)), v);
    }
    return dot8(w, v);
  }
}

/* Needs w, x 16-byte aligned and k a multiple of 16 / sizeof(T). Weights are
 * loaded cache-streaming (read once per token); x stays in L1/L2. Launched
 * early, each warp issues its row's first AHEAD loads before waiting for the
 * kernel that writes x: they need nothing from it. */
template <typename T, typename X>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_vec_kernel(float *out, const X *x, const T *w, const float *bias, int k, int m) {
  constexpr int V = 16 / sizeof(T), AHEAD = 4; /* elements per load, loads before the wait */
  int row = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= m) return;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + (int64_t)row * k);
  int nv = k / V;
  uint4 first[AHEAD];
#pragma unroll
  for (int j = 0; j < AHEAD; j++)
    first[j] = lane + 32 * j < nv ? __ldcs(wr + lane + 32 * j) : make_uint4(0, 0, 0, 0);
  iq_wait_prior();
  iq_allow_next();
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < AHEAD; j++)
    if (lane + 32 * j < nv) acc += dot16<T, X>(first[j], x + (lane + 32 * j) * V);
#pragma unroll 4
  for (int i = lane + 32 * AHEAD; i < nv; i += 32) acc += dot16<T, X>(__ldcs(wr + i), x + i * V);
  acc = iq_warp_sum(acc);
  if (lane == 0) out[row] = acc + (bias ? bias[row] : 0.0f);
}

/* Any alignment: element loads. */
template <typename T, typename X>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(float *out, const X *x, const T *w, const float *bias, int k, int m) {
  int row = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= m) return;
  iq_wait_prior(); /* launched early */
  iq_allow_next();
  const T *wr = w + (int64_t)row * k;
  float acc = 0.0f;
  for (int i = lane; i < k; i += 32) acc += iq_f32(wr[i]) * iq_f32(x[i]);
  acc = iq_warp_sum(acc);
  if (lane == 0) out[row] = acc + (bias ? bias[row] : 0.0f);
}

template <typename T, typename X>
static int launch_gemv(iq_ctx *ctx, float *out, const void *x, const void *w, const float *bias,
                       int k, int m) {
  const T *wt = static_cast<const T *>(w);
  const X *xt = static_cast<const X *>(x);
  dim3 blocks((unsigned)((m + GEMV_WARPS - 1) / GEMV_WARPS)), threads(GEMV_WARPS * 32);
  bool vec = (((uintptr_t)w | (uintptr_t)x) & 15) == 0 && k % (16 / sizeof(T)) == 0;
  return vec ? iq_launch_early(ctx, gemv_vec_kernel<T, X>, blocks, threads, 0, out, xt, wt, bias, k, m)
             : iq_launch_early(ctx, gemv_kernel<T, X>, blocks, threads, 0, out, xt, wt, bias, k, m);
}

/* The GEMV for weights T, x fp32 or (narrow) T too. */
template <typename T>
static int launch_gemv_x(iq_ctx *ctx, float *out, const void *x, int x_dtype, const void *w,
                         const float *bias, int k, int m) {
  return x_dtype == IQ_F32 ? launch_gemv<T, float>(ctx, out, x, w, bias, k, m)
                           : launch_gemv<T, T>(ctx, out, x, w, bias, k, m);
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

static cudaDataType cuda_type(int dtype) {
  return dtype == IQ_F16 ? CUDA_R_16F : dtype == IQ_BF16 ? CUDA_R_16BF : CUDA_R_32F;
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

extern "C" int iq_matmul(iq_ctx *ctx, float *out, const void *x, int x_dtype, const void *w,
                         int w_dtype, const float *bias, int n, int k, int m) {
  IQ_TRY(iq_check_matmul(ctx, out, x, x_dtype, w, w_dtype, n, k, m));
  if (n == 1) { /* launched early: the kernel before may still be writing x */
    if (w_dtype == IQ_F16) return launch_gemv_x<__half>(ctx, out, x, x_dtype, w, bias, k, m);
    if (w_dtype == IQ_BF16) return launch_gemv_x<__nv_bfloat16>(ctx, out, x, x_dtype, w, bias, k, m);
    return launch_gemv<float, float>(ctx, out, x, w, bias, k, m);
  }
  /* x in the weights' type goes as it is; an fp32 x with fp16/bf16 weights is rounded first */
  const float *xf = static_cast<const float *>(x);
  if (x_dtype == w_dtype) IQ_TRY(gemm(ctx, out, x, w, cuda_type(w_dtype), n, k, m));
  else if (w_dtype == IQ_F16) IQ_TRY(rounded_gemm<__half>(ctx, out, xf, w, CUDA_R_16F, n, k, m));
  else IQ_TRY(rounded_gemm<__nv_bfloat16>(ctx, out, xf, w, CUDA_R_16BF, n, k, m));
  if (bias) {
    int64_t count = (int64_t)n * m;
    bias_kernel<<<iq_blocks(ctx, count, 256), 256, 0, ctx->stream>>>(out, bias, m, count);
    IQ_LAUNCHED(ctx);
  }
  return IQ_OK;
}
