/* rmsnorm.cu: RMS normalisation (the twin of kernels/cpu/rmsnorm.c), after the
 * residual add where one is given. One block per row: a block-wide fp32 sum of
 * squares, then the scaled row, stored as T (fp32, or rounded to fp16/bf16 for
 * the GEMM that reads it: the same bits that rounding the fp32 row afterwards
 * gives). */
#include "cuda.cuh"
#include "checks.h"

/* Launched early, each thread loads its first PRE weights before waiting for the kernel that
 * writes x (all of them up to dim = PRE * blockDim: a decode step's rows). */
template <typename T>
__global__ void rmsnorm_kernel(T *out, float *x, const float *residual, const float *weight, int dim,
                               float eps) {
  constexpr int PRE = 4;
  __shared__ float red[32];
  float w[PRE];
#pragma unroll
  for (int j = 0; j < PRE; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    w[j] = i < dim ? weight[i] : 0.0f;
  }
  iq_wait_prior();
  iq_allow_next();
  float *xr = x + (int64_t)blockIdx.x * dim;
  T *yr = out + (int64_t)blockIdx.x * dim;
  float ss = 0.0f;
  if (residual) { /* x += residual: each thread keeps the elements it sums and rescales below */
    const float *rr = residual + (int64_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
      const float v = xr[i] + rr[i];
      xr[i] = v;
      ss += v * v;
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  }
  ss = iq_block_sum(ss, red);
  float inv = 1.0f / sqrtf(ss / (float)dim + eps);
  /* out may be x (fp32 only): each thread rewrites only the elements it read itself. */
#pragma unroll
  for (int j = 0; j < PRE; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < dim) yr[i] = iq_from_f32<T>(xr[i] * inv * w[j]);
  }
  for (int i = threadIdx.x + PRE * blockDim.x; i < dim; i += blockDim.x)
    yr[i] = iq_from_f32<T>(xr[i] * inv * weight[i]);
}

template <typename T>
static int launch_rmsnorm(iq_ctx *ctx, void *out, float *x, const float *residual,
                          const float *weight, int n, int dim, float eps) {
  int threads = dim >= 4096 ? 1024 : dim >= 1024 ? 512 : 256;
  return iq_launch_early(ctx, rmsnorm_kernel<T>, dim3(n), dim3(threads), 0, static_cast<T *>(out),
                         x, residual, weight, dim, eps);
}

extern "C" int iq_rmsnorm(iq_ctx *ctx, void *out, int out_dtype, float *x, const float *residual,
                          const float *weight, int n, int dim, float eps) {
  IQ_TRY(iq_check_rmsnorm(ctx, out, out_dtype, x, residual, weight, n, dim, eps));
  if (out_dtype == IQ_F16)
    return launch_rmsnorm<__half>(ctx, out, x, residual, weight, n, dim, eps);
  if (out_dtype == IQ_BF16)
    return launch_rmsnorm<__nv_bfloat16>(ctx, out, x, residual, weight, n, dim, eps);
  return launch_rmsnorm<float>(ctx, out, x, residual, weight, n, dim, eps);
}
