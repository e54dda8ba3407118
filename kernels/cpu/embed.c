/* embed.c: the embedding gather, out[i, :] = table[tokens[i], :] as fp32. */
#include "cpu.h"

int iq_embed(iq_ctx *ctx, float *out, const void *table, int table_dtype,
             const int32_t *tokens, int n, int dim, int vocab) {
  if (!ctx || !out || !table || !tokens) return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: NULL argument");
  if (n <= 0 || dim <= 0 || vocab <= 0)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: n %d, dim %d, vocab %d must be positive", n, dim,
                   vocab);
  if (!iq_valid_dtype(table_dtype))
    return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: bad table dtype %d", table_dtype);
  for (int i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      return iq_fail(ctx, IQ_ERR_ARG, "iq_embed: token id %d at position %d is outside [0, %d)",
                     tokens[i], i, vocab);
  size_t row_bytes = (size_t)dim * (table_dtype == IQ_F32 ? 4 : 2);
  for (int i = 0; i < n; i++)
    iq_to_f32(out + (size_t)i * dim, (const char *)table + row_bytes * (size_t)tokens[i],
              table_dtype, dim);
  return IQ_OK;
}
