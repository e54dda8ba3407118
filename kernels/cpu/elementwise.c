/* elementwise.c: SwiGLU's gate (silu(gate) * up) and the residual add. */
#include <math.h>

#include "cpu.h"

typedef struct {
  float *out;
  const float *a, *b;
} pair_job;

static void swiglu_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const pair_job *j = arg;
  for (int64_t i = begin; i < end; i++) {
    float g = j->a[i];
    j->out[i] = g / (1.0f + expf(-g)) * j->b[i];
  }
}

static void add_range(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const pair_job *j = arg;
  for (int64_t i = begin; i < end; i++) j->out[i] = j->a[i] + j->b[i];
}

/* Below this many elements a second thread costs more than it saves. */
#define MIN_CHUNK 16384

int iq_swiglu(iq_ctx *ctx, float *out, const float *gate, const float *up, int64_t count) {
  if (!ctx || !out || !gate || !up) return iq_fail(ctx, IQ_ERR_ARG, "iq_swiglu: NULL argument");
  if (count <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_swiglu: count %lld must be positive", (long long)count);
  pair_job job = {out, gate, up};
  iq_parallel_for(ctx, count, MIN_CHUNK, swiglu_range, &job);
  return IQ_OK;
}

int iq_add(iq_ctx *ctx, float *out, const float *a, const float *b, int64_t count) {
  if (!ctx || !out || !a || !b) return iq_fail(ctx, IQ_ERR_ARG, "iq_add: NULL argument");
  if (count <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_add: count %lld must be positive", (long long)count);
  pair_job job = {out, a, b};
  iq_parallel_for(ctx, count, MIN_CHUNK, add_range, &job);
  return IQ_OK;
}
