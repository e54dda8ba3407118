/* rope.cu: rotary embedding, Hugging Face rotate_half pairing (the twin of
 * kernels/cpu/rope.c, with the same fp32 math: angle = pos * inv_freq[i]). */
#include "cuda.cuh"

/* One thread per (token, head, pair i): channels i and i + half turn together. */
__global__ void rope_kernel(float *x, const int32_t *pos, const float *inv_freq, int heads,
                            int half, int64_t pairs) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs;
       p += (int64_t)gridDim.x * blockDim.x) {
    int i = (int)(p % half);
    int64_t row = p / half; /* token * heads + head */
    float angle = (float)pos[row / heads] * inv_freq[i];
    float c = cosf(angle), s = sinf(angle);
    float *v = x + row * 2 * half;
    float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

extern "C" int iq_rope(iq_ctx *ctx, float *x, const int32_t *pos, const float *inv_freq, int n,
                       int heads, int head_dim) {
  if (!ctx || !x || !pos || !inv_freq) return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: NULL argument");
  if (n <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 2)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: n %d, heads %d, head_dim %d (positive and even)", n,
                   heads, head_dim);
  int64_t pairs = (int64_t)n * heads * (head_dim / 2);
  rope_kernel<<<iq_blocks(ctx, pairs, 256), 256, 0, ctx->stream>>>(x, pos, inv_freq, heads,
                                                                   head_dim / 2, pairs);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
