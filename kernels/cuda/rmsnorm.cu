/* rmsnorm.cu: RMS normalisation (the twin of kernels/cpu/rmsnorm.c). One block
 * per row: a block-wide fp32 sum of squares, then the scaled row. */
#include "cuda.cuh"

__global__ void rmsnorm_kernel(float *out, const float *x, const float *weight, int dim,
                               float eps) {
  __shared__ float red[32];
  const float *xr = x + (int64_t)blockIdx.x * dim;
  float *yr = out + (int64_t)blockIdx.x * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = iq_block_sum(ss, red);
  float inv = 1.0f / sqrtf(ss / (float)dim + eps);
  /* out may be x: each thread rewrites only the elements it read itself. */
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * inv * weight[i];
}

extern "C" int iq_rmsnorm(iq_ctx *ctx, float *out, const float *x, const float *weight, int n,
                          int dim, float eps) {
  if (!ctx || !out || !x || !weight) return iq_fail(ctx, IQ_ERR_ARG, "iq_rmsnorm: NULL argument");
  if (n <= 0 || dim <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rmsnorm: n %d and dim %d must be positive", n, dim);
  int threads = dim >= 4096 ? 1024 : dim >= 1024 ? 512 : 256;
  rmsnorm_kernel<<<n, threads, 0, ctx->stream>>>(out, x, weight, dim, eps);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
