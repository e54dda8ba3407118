/* elementwise.cu: SwiGLU and residual add (the twin of kernels/cpu/elementwise.c).
 * Grid-stride loops, float4 when every pointer is 16-byte aligned; out may
 * alias an input since each element is read before it is written. */
#include "cuda.cuh"

struct SiluMul {
  __device__ float operator()(float g, float u) const { return g / (1.0f + expf(-g)) * u; }
};
struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};

/* out[i] = op(a[i], b[i]); float4 loads when vec (every pointer 16-byte aligned). */
template <typename Op>
__global__ void pairwise_kernel(float *out, const float *a, const float *b, int64_t count, bool vec) {
  const Op op;
  int64_t stride = (int64_t)gridDim.x * blockDim.x, t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    int64_t n4 = count / 4;
    for (int64_t i = t; i < n4; i += stride) {
      float4 x = ((const float4 *)a)[i], y = ((const float4 *)b)[i];
      ((float4 *)out)[i] = make_float4(op(x.x, y.x), op(x.y, y.y), op(x.z, y.z), op(x.w, y.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + t; i < count; i += stride) out[i] = op(a[i], b[i]);
}

static bool aligned16(const void *a, const void *b, const void *c) {
  return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 15) == 0;
}

extern "C" int iq_swiglu(iq_ctx *ctx, float *out, const float *gate, const float *up,
                         int64_t count) {
  if (!ctx || !out || !gate || !up) return iq_fail(ctx, IQ_ERR_ARG, "iq_swiglu: NULL argument");
  if (count <= 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_swiglu: count %lld must be positive", (long long)count);
  bool vec = aligned16(out, gate, up);
  pairwise_kernel<SiluMul><<<iq_blocks(ctx, vec ? count / 4 : count, 256), 256, 0, ctx->stream>>>(
      out, gate, up, count, vec);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

extern "C" int iq_add(iq_ctx *ctx, float *out, const float *a, const float *b, int64_t count) {
  if (!ctx || !out || !a || !b) return iq_fail(ctx, IQ_ERR_ARG, "iq_add: NULL argument");
  if (count <= 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_add: count %lld must be positive", (long long)count);
  bool vec = aligned16(out, a, b);
  pairwise_kernel<Add><<<iq_blocks(ctx, vec ? count / 4 : count, 256), 256, 0, ctx->stream>>>(
      out, a, b, count, vec);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
