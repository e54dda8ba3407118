/* rope.c: rotary position embedding in place, Hugging Face's rotate_half
 * layout: channel i < head_dim/2 turns with channel i + head_dim/2. The angle is
 * the fp32 product pos * inv_freq, as transformers computes it. An optional
 * per-pair scale multiplies both channels of a pair after the turn. */
#include <math.h>

#include "cpu.h"

typedef struct {
  float *x;
  const int32_t *pos;
  const float *inv_freq, *pair_scale;
  int heads, head_dim, group; /* group: heads sharing one row of pair_scale */
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
        float scale = j->pair_scale ? j->pair_scale[(h / j->group) * half + i] : 1.0f;
        v[i] = (a * c - b * s) * scale;
        v[i + half] = (b * c + a * s) * scale;
      }
    }
  }
}

int iq_rope(iq_ctx *ctx, float *x, const int32_t *pos, const float *inv_freq,
            const float *pair_scale, int n, int heads, int head_dim, int scale_heads) {
  if (!ctx || !x || !pos || !inv_freq) return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: NULL argument");
  if (n <= 0 || heads <= 0 || head_dim <= 0 || head_dim % 2)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_rope: n %d and heads %d must be positive, head_dim %d positive and even", n,
                   heads, head_dim);
  if (pair_scale && (scale_heads <= 0 || heads % scale_heads))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_rope: heads %d not a multiple of scale_heads %d", heads,
                   scale_heads);
  rope_job job = {x, pos, inv_freq, pair_scale, heads, head_dim, pair_scale ? heads / scale_heads : 1};
  iq_parallel_for(ctx, n, 8, rope_tokens, &job);
  return IQ_OK;
}
