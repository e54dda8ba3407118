/* elementwise.c: SwiGLU's gate (silu(gate) * up) and the residual add. */
#include <math.h>

#include "cpu.h"
#include "../checks.h"

typedef struct {
  void *out;
  const float *a, *b;
  int out_dtype; /* swiglu's: a narrow out holds the fp32 results rounded */
} pair_job;

static float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

static void swiglu_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const pair_job *j = arg;
  for (int64_t i = begin; i < end; i++)
    iq_store(j->out, j->out_dtype, i, silu_mul(j->a[i], j->b[i]));
}

static void add_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const pair_job *j = arg;
  for (int64_t i = begin; i < end; i++) ((float *)j->out)[i] = j->a[i] + j->b[i];
}

/* Below this many elements a second thread costs more than it saves. */
#define MIN_CHUNK 16384

int iq_swiglu(iq_ctx *ctx, void *out, int out_dtype, const float *gate, const float *up,
              int64_t count) {
  int s = iq_check_pairwise(ctx, "iq_swiglu", out, out_dtype, gate, up, count);
  if (s != IQ_OK) return s;
  pair_job job = {out, gate, up, out_dtype};
  iq_parallel_for(ctx, count, MIN_CHUNK, swiglu_range, &job);
  return IQ_OK;
}

int iq_add(iq_ctx *ctx, float *out, const float *a, const float *b, int64_t count) {
  int s = iq_check_pairwise(ctx, "iq_add", out, IQ_F32, a, b, count);
  if (s != IQ_OK) return s;
  pair_job job = {out, a, b, IQ_F32};
  iq_parallel_for(ctx, count, MIN_CHUNK, add_range, &job);
  return IQ_OK;
}
