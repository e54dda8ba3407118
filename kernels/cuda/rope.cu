/* rope.cu: rotary embedding, Hugging Face rotate_half pairing (the twin of
 * kernels/cpu/rope.c, with the same fp32 math: angle = pos * inv_freq[i]),
 * and the same optional per-pair scale of the first scaled heads after the turn. */
#include "cuda.cuh"
#include "checks.h"

/* One thread per (token, head, pair i): channels i and i + half turn together. */
__global__ void rope_kernel(float *x, const int32_t *pos, const float *inv_freq,
                            const float *pair_scale, int heads, int scaled, int group, int half,
                            int64_t pairs) {
  iq_wait_prior(); /* launched early */
  iq_allow_next();
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs;
       p += (int64_t)gridDim.x * blockDim.x) {
    int i = (int)(p % half);
    int64_t row = p / half; /* token * heads + head */
    float angle = (float)pos[row / heads] * inv_freq[i];
    float c = cosf(angle), s = sinf(angle);
    float *v = x + row * 2 * half;
    float a = v[i], b = v[i + half];
    const int head = (int)(row % heads);
    float scale = head < scaled ? pair_scale[(head / group) * half + i] : 1.0f;
    v[i] = (a * c - b * s) * scale;
    v[i + half] = (b * c + a * s) * scale;
  }
}

extern "C" int iq_rope(iq_ctx *ctx, float *x, const int32_t *pos, const float *inv_freq,
                       const float *pair_scale, int n, int heads, int head_dim, int scale_heads,
                       int scaled_heads) {
  IQ_TRY(iq_check_rope(ctx, x, pos, inv_freq, pair_scale, n, heads, head_dim, scale_heads,
                       scaled_heads));
  const int64_t pairs = (int64_t)n * heads * (head_dim / 2);
  const int scaled = pair_scale ? scaled_heads : 0, group = pair_scale ? scaled_heads / scale_heads : 1;
  return iq_launch_early(ctx, rope_kernel, dim3(iq_blocks(ctx, pairs, 256)), dim3(256), 0, x, pos,
                         inv_freq, pair_scale, heads, scaled, group, head_dim / 2, pairs);
}
