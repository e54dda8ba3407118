/* embed.cu: token embedding lookup (the twin of kernels/cpu/embed.c). Token
 * ids live on the device, so an id outside [0, vocab) cannot fail this call as
 * on the CPU: its row is filled with NaN and the next iq_sync or iq_download
 * fails with IQ_ERR_ARG naming the id. */
#include <math.h>

#include "cuda.cuh"

/* One block per token; threads stride over the row. */
template <typename T>
__global__ void embed_kernel(float *out, const T *table, const int32_t *tokens, int dim, int vocab,
                             struct iq_fault *fault) {
  int32_t id = tokens[blockIdx.x];
  float *row = out + (int64_t)blockIdx.x * dim;
  if (id < 0 || id >= vocab) {
    if (threadIdx.x == 0 && atomicCAS(&fault->seen, 0, 1) == 0) {
      fault->bad_token = id;
      fault->vocab = vocab;
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = NAN;
    return;
  }
  const T *src = table + (int64_t)id * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = iq_f32(src[i]);
}

extern "C" int iq_embed(iq_ctx *ctx, float *out, const void *table, int table_dtype,
                        const int32_t *tokens, int n, int dim, int vocab) {
  if (!ctx || !out || !table || !tokens) return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: NULL argument");
  if (!iq_valid_dtype(table_dtype))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: bad table dtype %d", table_dtype);
  if (n <= 0 || dim <= 0 || vocab <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: n %d, dim %d and vocab %d must be positive", n, dim,
                   vocab);
  dim3 grid(n), block(256);
  switch (table_dtype) {
  case IQ_F16:
    embed_kernel<<<grid, block, 0, ctx->stream>>>(out, (const __half *)table, tokens, dim, vocab,
                                                  ctx->fault_dev);
    break;
  case IQ_BF16:
    embed_kernel<<<grid, block, 0, ctx->stream>>>(out, (const __nv_bfloat16 *)table, tokens, dim,
                                                  vocab, ctx->fault_dev);
    break;
  default:
    embed_kernel<<<grid, block, 0, ctx->stream>>>(out, (const float *)table, tokens, dim, vocab,
                                                  ctx->fault_dev);
  }
  IQ_LAUNCHED(ctx);
  return IQ_OK;
}
