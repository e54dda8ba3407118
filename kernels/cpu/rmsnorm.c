/* rmsnorm.c: out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight, after
 * x[i, :] += residual[i, :] where a residual is given.
 * The sum of squares is kept in double, in independent lanes the compiler can
 * vectorize, so long rows lose no precision. out may be x (fp32 out only):
 * each row is read in full before it is written. A narrow out holds the fp32
 * results rounded, so it equals the fp32 out converted. */
#include <math.h>

#include "cpu.h"
#include "../checks.h"

typedef struct {
  void *out;
  int out_dtype;
  float *x;
  const float *residual, *weight;
  int dim;
  float eps;
} rmsnorm_job;

static void rmsnorm_rows(void *arg, int64_t begin, int64_t end, int worker) {
  (void)worker;
  const rmsnorm_job *j = arg;
  for (int64_t r = begin; r < end; r++) {
    float *x = j->x + r * j->dim;
    if (j->residual)
      for (int i = 0; i < j->dim; i++) x[i] += j->residual[r * j->dim + i];
    double lanes[8] = {0}, ss = 0.0;
    int i = 0;
    for (; i + 8 <= j->dim; i += 8)
      for (int l = 0; l < 8; l++) lanes[l] += (double)x[i + l] * x[i + l];
    for (; i < j->dim; i++) ss += (double)x[i] * x[i];
    for (int l = 0; l < 8; l++) ss += lanes[l];
    float scale = (float)(1.0 / sqrt(ss / j->dim + j->eps));
    for (i = 0; i < j->dim; i++)
      iq_store(j->out, j->out_dtype, r * j->dim + i, x[i] * scale * j->weight[i]);
  }
}

int iq_rmsnorm(iq_ctx *ctx, void *out, int out_dtype, float *x, const float *residual,
               const float *weight, int n, int dim, float eps) {
  int s = iq_check_rmsnorm(ctx, out, out_dtype, x, residual, weight, n, dim, eps);
  if (s != IQ_OK) return s;
  rmsnorm_job job = {out, out_dtype, x, residual, weight, dim, eps};
  iq_parallel_for(ctx, n, 4, rmsnorm_rows, &job);
  return IQ_OK;
}
