/* prefill_rows.cu: prompt attention on tensor cores in blocks of (query, head) rows of one KV
 * head, over fp16 K and V tiles of 32 rows, split over the tiles where the query blocks alone
 * leave the GPU short of a wave. Two callers: attention.cu for an fp16 cache (the tiles are the
 * cache's rows) and kvq_prefill.cu for the quantized one (the tiles are its chunks, dequantized
 * into a scratch, and the fp16 sink and ring are walked besides). */
#pragma once
#include <cuda_fp16.h>

#include "cuda.cuh"

constexpr int PR_WARPS = 8, PR_ROWS = 16 * PR_WARPS, PR_TILE = 32;

struct pr_args {
  /* tile t of KV head h: its PR_TILE key rows at k_tiles + h head_stride + t tile_stride, of
   * head_dim halves each, and its value rows at v_tiles + the same */
  const __half *k_tiles, *v_tiles;
  int64_t head_stride, tile_stride;
  /* the quantized cache's fp16 positions: sink rows, ring rows (cap of each: sink, ring), and
   * lag (sink + recent): a query at p sees the whole chunks up to p + 1 - lag as tiles */
  const __half *sink_k, *sink_v, *ring_k, *ring_v;
  int sink, ring, lag;
  const float *q;                  /* [n][heads][head_dim], 8-byte aligned */
  float *out, *part_acc, *part_ml; /* partials [splits][n heads] when splits > 1 */
  int n, pos0, heads, group;
  int qpb, tiles_per_split; /* queries per block (PR_ROWS / group) and the plan's: pr_attend's */
  float qscale; /* the softmax scale times log2(e) */
};

/* How a prompt of qblocks query blocks per KV head over `tiles` tiles is split, and the bytes of
 * the partials it leaves (0 for one split). */
struct pr_plan {
  int qblocks, splits, tiles_per_split;
  size_t part_bytes;
};
int pr_plan_of(iq_ctx *ctx, int head_dim, bool plain, int n, int heads, int kv_heads,
               int64_t tiles, pr_plan *plan);

/* Launches the attention (and the splits' merge) of a with the plan's splits; a.part_acc and
 * a.part_ml point at the plan's part_bytes of scratch where it has several. plain: the tiles hold
 * every position (an fp16 cache, causal within the prompt); otherwise a quantized cache's chunks,
 * with its sink and ring walked by split 0. head_dim 64 or 128. */
int pr_attend(iq_ctx *ctx, pr_args a, const pr_plan &plan, int head_dim, int kv_heads, bool plain);
