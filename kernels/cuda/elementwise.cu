/* elementwise.cu: SwiGLU and residual add (the twin of kernels/cpu/elementwise.c).
 * Grid-stride loops, float4 when every pointer is 16-byte aligned; out may
 * alias an input since each element is read before it is written. */
#include "cuda.cuh"

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__global__ void swiglu_kernel(float *out, const float *gate, const float *up, int64_t count,
                              bool vec) {
  int64_t stride = (int64_t)gridDim.x * blockDim.x, t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    int64_t n4 = count / 4;
    for (int64_t i = t; i < n4; i += stride) {
      float4 g = ((const float4 *)gate)[i], u = ((const float4 *)up)[i];
      ((float4 *)out)[i] = make_float4(silu_mul(g.x, u.x), silu_mul(g.y, u.y), silu_mul(g.z, u.z),
                                       silu_mul(g.w, u.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + t; i < count; i += stride) out[i] = silu_mul(gate[i], up[i]);
}

__global__ void add_kernel(float *out, const float *a, const float *b, int64_t count, bool vec) {
  int64_t stride = (int64_t)gridDim.x * blockDim.x, t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    int64_t n4 = count / 4;
    for (int64_t i = t; i < n4; i += stride) {
      float4 x = ((const float4 *)a)[i], y = ((const float4 *)b)[i];
      ((float4 *)out)[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
    }
    done = n4 * 4;
  }
  for (int64_t i = done + t; i < count; i += stride) out[i] = a[i] + b[i];
}

static bool aligned16(const void *a, const void *b, const void *c) {
  return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 15) == 0;
}

extern "C" int iq_swiglu(iq_ctx *ctx, float *out, const float *gate, const float *up,
                         int64_t count) {
  if (!ctx || !out || !gate || !up) return iq_fail(ctx, IQ_ERR_ARG, "iq_swiglu: NULL argument");
  if (count <= 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_swiglu: count %lld must be positive", (long long)count);
  bool vec = aligned16(out, gate, up);
  swiglu_kernel<<<iq_blocks(ctx, vec ? count / 4 : count, 256), 256, 0, ctx->stream>>>(
      out, gate, up, count, vec);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}

extern "C" int iq_add(iq_ctx *ctx, float *out, const float *a, const float *b, int64_t count) {
  if (!ctx || !out || !a || !b) return iq_fail(ctx, IQ_ERR_ARG, "iq_add: NULL argument");
  if (count <= 0) return iq_fail(ctx, IQ_ERR_ARG, "iq_add: count %lld must be positive", (long long)count);
  bool vec = aligned16(out, a, b);
  add_kernel<<<iq_blocks(ctx, vec ? count / 4 : count, 256), 256, 0, ctx->stream>>>(out, a, b,
                                                                                   count, vec);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
