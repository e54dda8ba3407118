/* kvq_prefill_chunks.cu: prefill_rows_kernel.cuh's tile source for prompts of few query blocks
 * over the quantized cache: each block stages its chunks' codes two ahead and unpacks each into
 * the tile pair it attends next (kvq_chunk_tiles.cuh), so the codes are read once a query block
 * and nothing is written back. Deep in a context this reads a quarter to an eighth of the bytes
 * the scratch's dequantize-then-copy moves (kvq_prefill.cu); from a few query blocks on, the
 * unpacking repeated by every block costs more than that. One instantiation per layout
 * (kvq_layout.cuh), in a file of its own so that it compiles beside the others. */
#include "cuda.cuh"
#include "kvq.h"
#include "kvq_chunk_tiles.cuh"
#include "kvq_layout.cuh"
#include "prefill_rows_kernel.cuh"

template <int D, int KB, int VB, int KG, int VG, bool F8> struct kp_chunk_tiles {
  using ch = km_chunk<D, KB, VB, KG, VG, F8>;
  static constexpr bool PLAIN = false;
  static constexpr int WORDS = 2 * ch::WORDS; /* two chunks' stages */
  static_assert(WORDS % 4 == 0, "the tiles after the stages stay 16-byte aligned");
  uint32_t *words;
  int64_t head;

  __device__ kp_chunk_tiles(uint32_t *words, __half *, int kvh, int)
      : words(words), head(kvh) {}

  __device__ __forceinline__ void stage(const pr_args &a, int chunk, uint32_t *dst) {
    stage_chunk<ch>(dst, a.codes_k, a.meta_k, a.codes_v, a.meta_v, head * a.head_chunks + chunk);
  }
  __device__ __forceinline__ void begin(const pr_args &a, int first, int last) {
    if (first < last) stage(a, first, words);
    if (first + 1 < last) stage(a, first + 1, words + ch::WORDS);
  }
  /* the first chunk's words complete (and widened) before its unpacking; a later chunk's were
   * made so by the barrier before the attending of the one before (ahead) */
  __device__ __forceinline__ void fill(const pr_args &a, int tile, int i, int last, __half *kt,
                                       __half *vt) {
    if (i == 0) {
      if (tile + 1 < last) asm volatile("cp.async.wait_group 1;\n" ::);
      else asm volatile("cp.async.wait_group 0;\n" ::);
      __syncthreads();
      widen_chunk<ch, F8>(words, a.e5m2);
    }
    unpack_chunk<D, KB, VB, KG, VG>(words + (i & 1) * ch::WORDS, kt, vt);
  }
  /* this chunk's stage is free: the chunk after next into it; the next one's words widened */
  __device__ __forceinline__ void ahead(const pr_args &a, int tile, int i, int last) {
    uint32_t *cur = words + (i & 1) * ch::WORDS;
    if (tile + 2 < last) stage(a, tile + 2, cur);
    if (tile + 1 < last) widen_chunk<ch, F8>(words + ((i + 1) & 1) * ch::WORDS, a.e5m2);
  }
};

struct kp_unpacking {
  iq_ctx *ctx;
  pr_kernel *k;
  template <int D, int KB, int VB, int KG, int VG, bool F8> int of() const {
    return pr_kernel_of<D, kp_chunk_tiles<D, KB, VB, KG, VG, F8>>(ctx, k);
  }
};

int kp_unpacking_kernel(iq_ctx *ctx, const iq_kvq_params *p, pr_kernel *k) {
  return kvq_layout(p, kp_unpacking{ctx, k});
}
