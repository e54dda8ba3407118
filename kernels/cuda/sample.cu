/* sample.cu: token sampling on the device (the twin of kernels/cpu/sample.c);
 * only the chosen id is written, to *out_token in device memory. Same steps
 * and the same fp32 operations in the same order as the CPU, so both pick the
 * same token:
 * 1. with a repetition penalty, work = the logits penalized (else the logits);
 * 2. temperature <= 0: an arg max, lowest id on ties (two passes);
 * 3. else keys = step 1's row / temperature, sorted descending by CUB's radix sort,
 *    which is stable (lower id first on ties) and treats -0 as +0;
 * 4. one block: exps in parallel, then one thread runs the CPU's sequential
 *    sums (softmax, top_p, pick) over the kept prefix, in the CPU's order.
 *    With top_k 0 that walk covers the whole vocabulary: about a millisecond
 *    at 128k, the price of summing in the CPU's order.
 * Logits it cannot sample (a NaN, a largest value of +inf or -inf) are found
 * in the arg max's reduction or at the head of the sort, and written as the
 * negative token of innerq.h for the caller, who reads the token anyway. */
#include <cub/device/device_radix_sort.cuh>

#include "cuda.cuh"
#include "checks.h"

constexpr int SAMPLE_THREADS = 1024;

/* The token for a largest value m at id, the lowest such id (for a NaN m, the
 * lowest NaN id): id when m is finite, else innerq.h's -(4 * id + reason). */
static __device__ int32_t checked_token(float m, int32_t id) {
  if (isfinite(m)) return id;
  if (isnan(m)) return -(4 * id + 1); /* logit id is NaN */
  if (m > 0.0f) return -(4 * id + 2); /* +inf, at id */
  return -3;                          /* every value is -inf */
}

__global__ void copy_kernel(float *work, const float *logits, int vocab) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x)
    work[i] = logits[i];
}

/* Each distinct id once: an entry acts only if no earlier entry holds its id. */
__global__ void penalty_kernel(float *work, const int32_t *history, int n_history, int vocab,
                               float penalty) {
  for (int i = threadIdx.x; i < n_history; i += blockDim.x) {
    const int32_t id = history[i];
    if (id < 0 || id >= vocab) continue;
    bool first = true;
    for (int j = 0; j < i && first; j++) first = history[j] != id;
    if (!first) continue;
    const float l = work[id];
    work[id] = l > 0.0f ? l / penalty : l * penalty;
  }
}

/* Arg max, lowest id on ties, and the lowest NaN id beside it (a NaN never wins the arg max), in
 * two passes: ARGMAX_BLOCKS blocks each leave the best of their grid-stride share, one block then
 * takes the best of those. A single block's serial walk over 128k logits took 54 us; this is two
 * short trips to L2. */
constexpr int ARGMAX_BLOCKS = 128, ARGMAX_THREADS = 256;

struct best_id {
  float v;
  int i, nan; /* i: the lowest id holding v, vocab if none; nan: the lowest NaN id, vocab if none */
};

/* The better of a and b: the larger value, the lower id on ties; the lower NaN id. */
__device__ __forceinline__ best_id better(best_id a, best_id b) {
  const bool take = b.v > a.v || (b.v == a.v && b.i < a.i);
  return {take ? b.v : a.v, take ? b.i : a.i, min(a.nan, b.nan)};
}

/* The best of the block's threads' candidates, valid in thread 0. */
__device__ best_id block_best(best_id mine) {
  __shared__ best_id all[ARGMAX_THREADS];
  all[threadIdx.x] = mine;
  for (int half = ARGMAX_THREADS / 2; half > 0; half /= 2) {
    __syncthreads();
    if ((int)threadIdx.x < half) all[threadIdx.x] = better(all[threadIdx.x], all[threadIdx.x + half]);
  }
  return all[0];
}

__global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_blocks_kernel(best_id *partial, const float *logits, int vocab) {
  best_id b = {-INFINITY, vocab, vocab};
  /* ids ascend along a thread's stride, so a tie keeps the first */
  for (int i = blockIdx.x * ARGMAX_THREADS + threadIdx.x; i < vocab; i += ARGMAX_BLOCKS * ARGMAX_THREADS) {
    const float v = logits[i];
    if (v > b.v || (v == b.v && b.i == vocab)) b.v = v, b.i = i;
    if (isnan(v) && b.nan == vocab) b.nan = i;
  }
  b = block_best(b);
  if (threadIdx.x == 0) partial[blockIdx.x] = b;
}

__global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_final_kernel(int32_t *out_token, const best_id *partial, int vocab) {
  best_id b = {-INFINITY, vocab, vocab};
  for (int k = threadIdx.x; k < ARGMAX_BLOCKS; k += ARGMAX_THREADS) b = better(b, partial[k]);
  b = block_best(b);
  /* b.i == vocab only if every logit is NaN */
  if (threadIdx.x == 0) *out_token = b.nan < vocab ? checked_token(NAN, b.nan) : checked_token(b.v, b.i);
}

/* A NaN becomes the positive NaN, whose key the descending sort puts before
 * +inf: the lowest NaN id then heads the candidates. */
__global__ void temperature_kernel(float *keys, int32_t *ids, const float *work, int vocab,
                                   float temperature) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x) {
    const float l = work[i];
    keys[i] = isnan(l) ? __int_as_float(0x7fffffff) : l / temperature;
    ids[i] = i;
  }
}

/* Calls step(i, p[i]) for i = 0, 1, ... on thread 0 until it returns true or
 * count ends, staging p through shared memory a tile at a time so the serial
 * walk (the CPU's summation order) runs at shared-memory speed. Every thread of
 * the block must call it. */
template <typename Step>
__device__ void serial_walk(const float *p, int count, Step step) {
  __shared__ float tile[SAMPLE_THREADS];
  __shared__ bool stop;
  __syncthreads(); /* every thread is done with stop and p from before */
  if (threadIdx.x == 0) stop = false;
  for (int t0 = 0; t0 < count; t0 += SAMPLE_THREADS) {
    __syncthreads(); /* the previous tile is consumed; stop is written */
    if (stop) return;
    if (t0 + (int)threadIdx.x < count) tile[threadIdx.x] = p[t0 + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0)
      for (int i = 0; i < min(SAMPLE_THREADS, count - t0) && !stop; i++) stop = step(t0 + i, tile[i]);
  }
  __syncthreads();
}

/* One block. keys/ids: the candidates sorted; count: top_k or the whole
 * vocabulary. Results of thread 0's walks reach the others through shared. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
    pick_kernel(int32_t *out_token, const float *keys, const int32_t *ids, float *p, int count,
                float top_p, float min_p, float uniform) {
  __shared__ float sum;
  __shared__ int kept;
  const float max = keys[0];
  if (!isfinite(max)) { /* a NaN, +inf or every value -inf: no softmax */
    if (threadIdx.x == 0) *out_token = checked_token(max, ids[0]);
    return; /* the whole block: max is the same for every thread */
  }
  for (int i = threadIdx.x; i < count; i += blockDim.x) p[i] = expf(keys[i] - max);
  float s = 0.0f; /* thread 0's */
  serial_walk(p, count, [&](int, float v) { return s += v, false; });
  if (threadIdx.x == 0) sum = s, kept = count;
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += blockDim.x) p[i] /= sum;
  __syncthreads();
  if (min_p > 0.0f) { /* p is non-increasing, so the kept set is a prefix: count it */
    const float floor = min_p * p[0];
    int n = 0;
    for (int t0 = 0; t0 < count; t0 += blockDim.x)
      n += __syncthreads_count(t0 + (int)threadIdx.x < count && p[t0 + threadIdx.x] >= floor);
    if (threadIdx.x == 0) kept = n;
    __syncthreads();
  }
  if (top_p < 1.0f) { /* the shortest prefix reaching top_p */
    float cum = 0.0f;
    int k = kept;
    serial_walk(p, kept, [&](int i, float v) { return (cum += v) >= top_p ? (k = i + 1, true) : false; });
    if (threadIdx.x == 0) kept = k;
    __syncthreads();
  }
  float total = 0.0f;
  serial_walk(p, kept, [&](int, float v) { return total += v, false; });
  const float target = uniform * total;
  float cum = 0.0f;
  int pick = kept - 1; /* rounding can leave cum <= target to the end */
  serial_walk(p, kept, [&](int i, float v) { return (cum += v) > target ? (pick = i, true) : false; });
  if (threadIdx.x == 0) *out_token = ids[pick];
}

static size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

extern "C" int iq_sample(iq_ctx *ctx, int32_t *out_token, const float *logits, int vocab,
                         const int32_t *history, int n_history, float repeat_penalty,
                         float temperature, int top_k, float top_p, float min_p, float uniform) {
  IQ_TRY(iq_check_sample(ctx, out_token, logits, vocab, history, n_history, repeat_penalty,
                         temperature, top_k, top_p, min_p, uniform));

  const size_t row = align256(sizeof(float) * (size_t)vocab);
  size_t sort_bytes = 0;
  IQ_CUDA(ctx, cub::DeviceRadixSort::SortPairsDescending(
                   nullptr, sort_bytes, (const float *)nullptr, (float *)nullptr,
                   (const int32_t *)nullptr, (int32_t *)nullptr, vocab, 0, 32, ctx->stream));
  void *scratch;
  const size_t tmp_bytes = sort_bytes > sizeof(best_id) * ARGMAX_BLOCKS ? sort_bytes
                                                                       : sizeof(best_id) * ARGMAX_BLOCKS;
  IQ_TRY(iq_scratch(ctx, 5 * row + tmp_bytes, &scratch));
  char *base = (char *)scratch;
  float *work = (float *)base, *keys = (float *)(base + row), *sorted = (float *)(base + 2 * row);
  int32_t *ids = (int32_t *)(base + 3 * row), *sorted_ids = (int32_t *)(base + 4 * row);
  void *sort_tmp = base + 5 * row; /* the sort's temporary space, or the arg max's partials */
  float *p = keys; /* free once sorted */

  const unsigned blocks = iq_blocks(ctx, vocab, 256);
  const float *penalized = logits; /* the logits, or with a penalty their copy in work */
  if (repeat_penalty != 1.0f && n_history > 0) {
    copy_kernel<<<blocks, 256, 0, ctx->stream>>>(work, logits, vocab);
    IQ_LAUNCHED(ctx);
    penalty_kernel<<<1, 256, 0, ctx->stream>>>(work, history, n_history, vocab, repeat_penalty);
    IQ_LAUNCHED(ctx);
    penalized = work;
  }
  if (temperature <= 0.0f) {
    best_id *partial = static_cast<best_id *>(sort_tmp);
    argmax_blocks_kernel<<<ARGMAX_BLOCKS, ARGMAX_THREADS, 0, ctx->stream>>>(partial, penalized, vocab);
    IQ_LAUNCHED(ctx);
    argmax_final_kernel<<<1, ARGMAX_THREADS, 0, ctx->stream>>>(out_token, partial, vocab);
    IQ_LAUNCHED(ctx);
    return IQ_OK;
  }
  temperature_kernel<<<blocks, 256, 0, ctx->stream>>>(keys, ids, penalized, vocab, temperature);
  IQ_LAUNCHED(ctx);
  IQ_CUDA(ctx, cub::DeviceRadixSort::SortPairsDescending(sort_tmp, sort_bytes, keys, sorted, ids,
                                                         sorted_ids, vocab, 0, 32, ctx->stream));
  const int count = top_k > 0 && top_k < vocab ? top_k : vocab;
  pick_kernel<<<1, SAMPLE_THREADS, 0, ctx->stream>>>(out_token, sorted, sorted_ids, p, count, top_p,
                                                     min_p, uniform);
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
