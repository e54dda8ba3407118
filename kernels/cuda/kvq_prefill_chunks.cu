/* kvq_prefill_chunks.cu: prefill_rows_kernel.cuh's tile source for prompts of few query blocks
 * over the quantized cache: each block stages its chunks' codes up to six ahead and unpacks each
 * into the tile pair it attends next (kvq_chunk_tiles.cuh), so the codes are read once a query
 * block and nothing is written back. Deep in a context this reads a quarter to an eighth of the
 * bytes the scratch's dequantize-then-copy moves (kvq_prefill.cu); from a few query blocks on,
 * the unpacking repeated by every block costs more than that. One instantiation per layout
 * (kvq_layout.cuh), in a file of its own so that it compiles beside the others. */
#include "cuda.cuh"
#include "kvq.h"
#include "kvq_chunk_tiles.cuh"
#include "kvq_layout.cuh"
#include "prefill_rows_kernel.cuh"

template <int D, int KB, int VB, int KG, int VG, bool F8> struct kp_chunk_tiles {
  using ch = km_chunk<D, KB, VB, KG, VG, F8>;
  static constexpr bool PLAIN = false;
  /* a chunk's codes are small beside its tiles (3 KB at k2v2 and head_dim 128 against 17): up to
   * 40 KB of them are on their way, and two blocks still fit an SM. Prompts ran as fast with 2,
   * 4 or 6 stages (H100, session 25): shared memory's traffic bounds this source (ncu: L1 75%
   * busy, DRAM 8%), not the codes' latency */
  static constexpr int STAGES = 10240 / ch::WORDS < 2 ? 2 : 10240 / ch::WORDS > 6 ? 6 : 10240 / ch::WORDS;
  static constexpr int WORDS = STAGES * ch::WORDS, PAIRS = 2, PENDING = STAGES - 2;
  static_assert(WORDS % 4 == 0, "the tiles after the stages stay 16-byte aligned");
  uint32_t *words;
  int64_t head;

  __device__ kp_chunk_tiles(uint32_t *words, __half *, int kvh, int)
      : words(words), head(kvh) {}

  /* chunk `chunk`'s words into stage `at` as one cp.async group (empty past the split's last
   * chunk, so that each chunk has its group) */
  __device__ __forceinline__ void stage(const pr_args &a, int chunk, int last, int at) {
    if (chunk < last)
      stage_chunk<ch>(words + at * ch::WORDS, a.codes_k, a.meta_k, a.codes_v, a.meta_v,
                      head * a.head_chunks + chunk);
    else
      asm volatile("cp.async.commit_group;\n" ::);
  }
  __device__ __forceinline__ void begin(const pr_args &a, int first, int last) {
#pragma unroll
    for (int i = 0; i < STAGES; i++) stage(a, first + i, last, i);
  }
  /* the first chunk's words complete (and widened) before its unpacking; a later chunk's were
   * made so by the barrier before the attending of the one before (ahead) */
  __device__ __forceinline__ void fill(const pr_args &a, int, int i, int, __half *kt, __half *vt) {
    if (i == 0) {
      cp_async_wait<STAGES - 1>();
      __syncthreads();
      widen_chunk<ch, F8>(words, a.e5m2);
    }
    unpack_chunk<D, KB, VB, KG, VG>(words + i % STAGES * ch::WORDS, kt, vt);
  }
  /* this chunk's stage is free: the chunk STAGES on into it; the next one's words widened */
  __device__ __forceinline__ void ahead(const pr_args &a, int tile, int i, int last) {
    stage(a, tile + STAGES, last, i % STAGES);
    if (tile + 1 < last) widen_chunk<ch, F8>(words + (i + 1) % STAGES * ch::WORDS, a.e5m2);
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
