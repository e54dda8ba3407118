/* cpu.h: what the CPU backend's files share: the context, errors, the thread
 * pool and dtype conversion. Not part of the public ABI. */
#ifndef INNERQ_CPU_H
#define INNERQ_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "../innerq.h"

/* A hot function built twice, for AVX2 machines (x86-64-v3: AVX2, FMA, F16C)
 * and for any x86-64; the loader picks one at run time. */
#define IQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))

typedef struct iq_pool iq_pool;

struct iq_ctx {
  iq_pool *pool;
  int threads;
  void *scratch; /* grown on demand, freed with the context */
  size_t scratch_bytes;
  double timing_start; /* seconds on CLOCK_MONOTONIC; < 0 when no span is open */
  char error[512];
};

/* At least `bytes` of the context's scratch memory in *out (contents undefined). */
int iq_scratch(iq_ctx *ctx, size_t bytes, void **out);

/* Records a printf-style message on ctx and returns status. */
int iq_fail(iq_ctx *ctx, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* fn(arg, begin, end) over [0, count) split into contiguous ranges, one per
 * worker at most, each at least min_chunk long; returns when all are done.
 * worker is in [0, ctx->threads) so fn can index per-thread scratch. */
typedef void (*iq_range_fn)(void *arg, int64_t begin, int64_t end, int worker);
void iq_parallel_for(iq_ctx *ctx, int64_t count, int64_t min_chunk,
                     iq_range_fn fn, void *arg);

iq_pool *iq_pool_create(int threads);
void iq_pool_destroy(iq_pool *pool);

/* fp16/bf16 to fp32 (exact) and back (round to nearest even). */
float iq_f16_to_f32(uint16_t h);
uint16_t iq_f32_to_f16(float f);
float iq_bf16_to_f32(uint16_t b);
uint16_t iq_f32_to_bf16(float f);
/* Element i of a buffer of dtype (IQ_F32, IQ_F16 or IQ_BF16) as float. */
static inline float iq_load(const void *p, int dtype, int64_t i) {
  switch (dtype) {
  case IQ_F16: return iq_f16_to_f32(((const uint16_t *)p)[i]);
  case IQ_BF16: return iq_bf16_to_f32(((const uint16_t *)p)[i]);
  default: return ((const float *)p)[i];
  }
}
/* Stores v as element i of a buffer of dtype, rounded to nearest even where narrower. */
static inline void iq_store(void *p, int dtype, int64_t i, float v) {
  switch (dtype) {
  case IQ_F16: ((uint16_t *)p)[i] = iq_f32_to_f16(v); break;
  case IQ_BF16: ((uint16_t *)p)[i] = iq_f32_to_bf16(v); break;
  default: ((float *)p)[i] = v;
  }
}
/* Converts count elements of src (dtype) to floats in dst. */
void iq_to_f32(float *dst, const void *src, int dtype, int64_t count);

static inline int iq_valid_dtype(int dtype) {
  return dtype == IQ_F32 || dtype == IQ_F16 || dtype == IQ_BF16;
}

#endif /* INNERQ_CPU_H */
