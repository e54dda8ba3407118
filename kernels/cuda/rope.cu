/* rope.cu: rotary embedding, Hugging Face rotate_half pairing (the twin of
 * kernels/cpu/rope.c, with the same fp32 math: angle = pos * inv_freq[i]),
 * and the same optional per-pair scale after the turn. */
#include "cuda.cuh"

/* One thread per (token, head, pair i): channels i and i + half turn together. */
__global__ void rope_kernel(float *x, const int32_t *pos, const float *inv_freq,
                            const float *pair_scale, int heads, int group, int half, int64_t pairs) {
  iq_wait_prior(); /* launched early */
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs;
       p += (int64_t)gridDim.x * blockDim.x) {
    int i = (int)(p % half);
    int64_t row = p / half; /* token * heads + head */
    float angle = (float)pos[row / heads] * inv_freq[i];
    float c = cosf(angle), s = sinf(angle);
    float *v = x + row * 2 * half;
    float a = v[i], b = v[i + half];
    float scale = pair_scale ? pair_scale[(row % heads / group) * half + i] : 1.0f;
    v[i] = (a * c - b * s) * scale;
    v[i + half] = (b * c + a * s) * scale;
  }
}

extern "C" int iq_rope(iq_ctx *ctx, float *x, const int32_t *pos, const float *inv_freq,
                       const float *pair_scale, int n, int heads, int head_dim, int scale_heads) {
  if (!ctx || !x || !pos || !inv_freq) return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: NULL argument");
  if (n <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 2)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: n %d, heads %d, head_dim %d (positive and even)", n,
                   heads, head_dim);
  if (pair_scale && (scale_heads <= 0 || heads % scale_heads))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: heads %d not a multiple of scale_heads %d", heads,
                   scale_heads);
  int64_t pairs = (int64_t)n * heads * (head_dim / 2);
  int group = pair_scale ? heads / scale_heads : 1;
  return iq_launch_early(ctx, rope_kernel, dim3(iq_blocks(ctx, pairs, 256)), dim3(256), 0, x, pos,
                         inv_freq, pair_scale, heads, group, head_dim / 2, pairs);
}
