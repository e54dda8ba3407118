/* rope.c: rotary position embedding in place, Hugging Face's rotate_half
 * layout: channel i < head_dim/2 turns with channel i + head_dim/2. The angle is
 * the fp32 product pos * inv_freq, as transformers computes it. An optional
 * per-pair scale multiplies both channels of a pair of the first scaled heads
 * after the turn. */
#include <math.h>

#include "cpu.h"
#include "../checks.h"

typedef struct {
  float *x;
  const int32_t *pos;
  const float *inv_freq, *pair_scale;
  int heads, head_dim, scaled, group; /* the first scaled heads take pair_scale, group a row */
} rope_job;

static void rope_tokens(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const rope_job *j = arg;
  int half = j->head_dim / 2;
  for (int64_t t = begin; t < end; t++) {
    for (int i = 0; i < half; i++) {
      float angle = (float)j->pos[t] * j->inv_freq[i];
      float c = cosf(angle), s = sinf(angle);
      for (int h = 0; h < j->heads; h++) {
        float *v = j->x + (t * j->heads + h) * j->head_dim;
        float a = v[i], b = v[i + half];
        float scale = h < j->scaled ? j->pair_scale[(h / j->group) * half + i] : 1.0f;
        v[i] = (a * c - b * s) * scale;
        v[i + half] = (b * c + a * s) * scale;
      }
    }
  }
}

int iq_rope(iq_ctx *ctx, float *x, const int32_t *pos, const float *inv_freq,
            const float *pair_scale, int n, int heads, int head_dim, int scale_heads,
            int scaled_heads) {
  int s = iq_check_rope(ctx, x, pos, inv_freq, pair_scale, n, heads, head_dim, scale_heads,
                        scaled_heads);
  if (s != IQ_OK) return s;
  const int scaled = pair_scale ? scaled_heads : 0;
  rope_job job = {x, pos, inv_freq, pair_scale, heads, head_dim, scaled,
                  pair_scale ? scaled_heads / scale_heads : 1};
  iq_parallel_for(ctx, n, 8, rope_tokens, &job);
  return IQ_OK;
}
