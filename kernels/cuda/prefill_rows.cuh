/* prefill_rows.cuh: prompt attention on tensor cores in blocks of (query, head) rows of one KV
 * head, over fp16 K and V tiles of 32 rows, split over the tiles where the query blocks alone
 * leave the GPU short of a wave. The kernel (prefill_rows_kernel.cuh) is templated on where its
 * tiles come from: an fp16 cache's own rows and the quantized cache's chunks dequantized into a
 * scratch (prefill_rows.cu), or the quantized chunks unpacked by each block
 * (kvq_prefill_chunks.cu); over a quantized cache the fp16 sink and ring are walked besides. */
#pragma once
#include <cuda_fp16.h>

#include "cuda.cuh"

constexpr int PR_WARPS = 8, PR_ROWS = 16 * PR_WARPS, PR_TILE = 32;

struct pr_args {
  /* rows as tiles (prefill_rows.cu): tile t of KV head h is its PR_TILE key rows at k_tiles + h
   * head_stride + t tile_stride, of head_dim halves each, and its value rows at v_tiles + the
   * same */
  const __half *k_tiles, *v_tiles;
  int64_t head_stride, tile_stride;
  /* chunks unpacked by the block (kvq_prefill_chunks.cu): KV head 0's chunk 0 of each region,
   * head_chunks chunks a KV head; e5m2: the fp8 pairs' format */
  const uint32_t *codes_k, *meta_k, *codes_v, *meta_v;
  int head_chunks, e5m2;
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

/* One instantiation of the kernel: its shared memory and how many blocks fit a multiprocessor. */
struct pr_kernel {
  void (*fn)(pr_args);
  size_t smem;
  int per_sm;
};

/* The kernel over rows as tiles: an fp16 cache's (plain: every position, causal within the
 * prompt) or a quantized cache's dequantized chunks. head_dim 64 or 128. */
int pr_rows_kernel(iq_ctx *ctx, int head_dim, bool plain, pr_kernel *k);
/* The kernel over a quantized cache's chunks, unpacked by each block, for p's layout (one of
 * kvq_mma_supported's). */
int kp_unpacking_kernel(iq_ctx *ctx, const iq_kvq_params *p, pr_kernel *k);

/* How a prompt of qblocks query blocks per KV head over `tiles` tiles is split, and the bytes of
 * the partials it leaves (0 for one split). */
struct pr_plan {
  int qblocks, splits, tiles_per_split;
  size_t part_bytes;
};
void pr_plan_of(iq_ctx *ctx, const pr_kernel &k, int head_dim, int n, int heads, int kv_heads,
                int64_t tiles, pr_plan *plan);

/* Launches kernel k over a with the plan's splits, then their merge; a.part_acc and a.part_ml
 * point at the plan's part_bytes of scratch where it has several. */
int pr_attend(iq_ctx *ctx, pr_args a, const pr_kernel &k, const pr_plan &plan, int head_dim,
              int kv_heads);
