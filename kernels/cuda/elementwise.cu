/* elementwise.cu: SwiGLU and residual add (the twin of kernels/cpu/elementwise.c).
 * Grid-stride loops over fp32 inputs, float4 loads when they allow it; out
 * (fp32, or fp16/bf16 for SwiGLU's, rounded from the fp32 result) may alias an
 * input when fp32, since each element is read before it is written. */
#include "cuda.cuh"
#include "checks.h"

struct SiluMul {
  __device__ float operator()(float g, float u) const { return g / (1.0f + expf(-g)) * u; }
};
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

/* Four results stored at out: one 16-byte store of fp32, one 8-byte store of fp16/bf16. */
template <typename T> __device__ __forceinline__ void store4(T *out, float4 v) {
  uint2 raw;
  T *h = reinterpret_cast<T *>(&raw);
  h[0] = iq_from_f32<T>(v.x);
  h[1] = iq_from_f32<T>(v.y);
  h[2] = iq_from_f32<T>(v.z);
  h[3] = iq_from_f32<T>(v.w);
  *reinterpret_cast<uint2 *>(out) = raw;
}
template <> __device__ __forceinline__ void store4<float>(float *out, float4 v) {
  *reinterpret_cast<float4 *>(out) = v;
}

/* out[i] = op(a[i], b[i]) as T; float4 loads when vec (a, b 16-byte aligned, out 4 * sizeof(T)). */
template <typename Op, typename T>
__global__ void pairwise_kernel(T *out, const float *a, const float *b, int64_t count, bool vec) {
  iq_wait_prior(); /* launched early */
  iq_allow_next();
  const Op op;
  int64_t stride = (int64_t)gridDim.x * blockDim.x, t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    int64_t n4 = count / 4;
    for (int64_t i = t; i < n4; i += stride) {
      float4 x = ((const float4 *)a)[i], y = ((const float4 *)b)[i];
      store4<T>(out + 4 * i, make_float4(op(x.x, y.x), op(x.y, y.y), op(x.z, y.z), op(x.w, y.w)));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + t; i < count; i += stride) out[i] = iq_from_f32<T>(op(a[i], b[i]));
}

template <typename Op, typename T>
static int launch_pairwise(iq_ctx *ctx, void *out, const float *a, const float *b, int64_t count) {
  bool vec = (((uintptr_t)a | (uintptr_t)b) & 15) == 0 &&
             ((uintptr_t)out & (4 * sizeof(T) - 1)) == 0;
  return iq_launch_early(ctx, pairwise_kernel<Op, T>, dim3(iq_blocks(ctx, vec ? count / 4 : count, 256)),
                         dim3(256), 0, static_cast<T *>(out), a, b, count, vec);
}

extern "C" int iq_swiglu(iq_ctx *ctx, void *out, int out_dtype, const float *gate,
                         const float *up, int64_t count) {
  IQ_TRY(iq_check_pairwise(ctx, "iq_swiglu", out, out_dtype, gate, up, count));
  if (out_dtype == IQ_F16) return launch_pairwise<SiluMul, __half>(ctx, out, gate, up, count);
  if (out_dtype == IQ_BF16) return launch_pairwise<SiluMul, __nv_bfloat16>(ctx, out, gate, up, count);
  return launch_pairwise<SiluMul, float>(ctx, out, gate, up, count);
}

extern "C" int iq_add(iq_ctx *ctx, float *out, const float *a, const float *b, int64_t count) {
  IQ_TRY(iq_check_pairwise(ctx, "iq_add", out, IQ_F32, a, b, count));
  return launch_pairwise<Add, float>(ctx, out, a, b, count);
}
