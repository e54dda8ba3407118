/* cuda.cuh: what the CUDA backend's files share (the twin of kernels/cpu/cpu.h):
 * the context, error checks, scratch memory, cuBLAS and dtype loads. Not part
 * of the public ABI. */
#ifndef INNERQ_CUDA_CUH
#define INNERQ_CUDA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <library_types.h>
#include <stddef.h>
#include <stdint.h>

#include "../innerq.h"

/* cuBLAS is opened with dlopen at its first use (iq_cublas), so building needs
 * nvcc alone and decode runs where cuBLAS is missing. These few declarations
 * mirror cublas_api.h (values checked against cuBLAS 13). */
typedef struct cublasContext *cublasHandle_t;
typedef int cublasStatus_t; /* CUBLAS_STATUS_SUCCESS = 0 */
enum { IQ_CUBLAS_OP_N = 0, IQ_CUBLAS_OP_T = 1, IQ_CUBLAS_COMPUTE_32F = 68, IQ_CUBLAS_GEMM_DEFAULT = -1 };
struct iq_cublas {
  void *lib;
  cublasHandle_t handle;
  cublasStatus_t (*destroy)(cublasHandle_t);
  cublasStatus_t (*gemm_ex)(cublasHandle_t, int transa, int transb, int m, int n, int k,
                            const void *alpha, const void *a, cudaDataType a_type, int lda,
                            const void *b, cudaDataType b_type, int ldb, const void *beta, void *c,
                            cudaDataType c_type, int ldc, int compute_type, int algo);
  const char *(*status_string)(cublasStatus_t);
};

/* Bad data that a kernel finds in device memory (a token id out of range) is
 * written here, in pinned host memory the device writes through, and reported
 * by the next call that waits for the stream (iq_sync, iq_download). */
struct iq_fault {
  int32_t bad_token; /* the first bad id seen by iq_embed */
  int32_t vocab;
  int32_t seen; /* nonzero once a fault is recorded */
};

/* The flags of iq_timing_begin's hold, in pinned host memory the device reads through. */
struct iq_hold {
  int32_t release;   /* set by the host: the hold kernel returns */
  int32_t timed_out; /* set by the hold kernel when it gave up waiting */
};

struct iq_ctx {
  int device;
  int sms;                  /* multiprocessors: sizes grids */
  int cc_major;             /* compute capability: 9 and up launch merges early (PDL) */
  cudaStream_t stream;      /* every op of this context runs on it, in order */
  void *scratch;            /* shared by the ops (they run one at a time on the stream) */
  size_t scratch_bytes;
  struct iq_fault *fault;     /* pinned host memory, mapped */
  struct iq_fault *fault_dev; /* the same, as kernels address it */
  struct iq_cublas cublas;  /* lib NULL until first used */
  struct iq_hold *hold;     /* pinned, mapped; NULL until the first timing span */
  struct iq_hold *hold_dev; /* the same, as kernels address it */
  cudaEvent_t marks[2];     /* a timing span's start and end */
  int timing;               /* a span is open */
  char error[512];
};

/* Records a printf-style message on ctx (or the thread's create error when
 * ctx is NULL) and returns status. */
int iq_fail(iq_ctx *ctx, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Lets a held queue (iq_timing_begin) run: called before anything that waits for the device. */
static inline void iq_release_hold(iq_ctx *ctx) {
  if (ctx->hold) __atomic_store_n(&ctx->hold->release, 1, __ATOMIC_SEQ_CST);
}

/* A scratch buffer of at least bytes, grown (never shrunk) on demand. */
int iq_scratch(iq_ctx *ctx, size_t bytes, void **out);

/* The context's cuBLAS handle, bound to its stream; loads cuBLAS at first use. */
int iq_cublas(iq_ctx *ctx, struct iq_cublas **out);

/* kvq_mma.cu: the tensor-core attention over the quantized cache, for the
 * parameters (and query heads per KV head) it supports; iq_kvq_attention
 * checks the arguments and calls it where it applies. */
int kvq_mma_supported(const iq_kvq_params *p, int group);
int kvq_mma_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                      const float *q, int n, int pos0, int heads, float scale);
/* kvq_prefill.cu: prompts over the same layouts on tensor cores in prefill_rows.cuh's blocks of
 * up to 128 (query, head) rows, where n queries of group heads fill more than half a block: the
 * chunks unpacked by the block where one block a KV head holds the prompt, else dequantized once
 * per call into a scratch. */
int kvq_prefill_fills(int n, int group);
int kvq_prefill_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                          const float *q, int n, int pos0, int heads, float scale);

/* decode_mma.cu: one decode step over an fp16 cache (16-byte aligned rows) on tensor cores, for
 * the head_dim and query heads per KV head it supports; iq_attention_decode checks the arguments
 * and calls it where it applies. */
int decode_mma_supported(int head_dim, int group);
int decode_mma_attention(iq_ctx *ctx, float *out, const float *q, const void *k_cache,
                         const void *v_cache, int pos, int heads, int kv_heads, int head_dim,
                         int cap, float scale);

/* Every CUDA call is checked: a failure records "<op>: <call>: <why>" and
 * returns IQ_ERR_DEVICE from the calling ABI function (__func__ is its name). */
#define IQ_CUDA(ctx, call)                                                                     \
  do {                                                                                         \
    cudaError_t iq_err_ = (call);                                                              \
    if (iq_err_ != cudaSuccess)                                                                \
      return iq_fail((ctx), IQ_ERR_DEVICE, "%s: %s: %s", __func__, #call,                      \
                     cudaGetErrorString(iq_err_));                                             \
  } while (0)

/* After every kernel launch: a bad configuration shows here, not later. */
#define IQ_LAUNCHED(ctx) IQ_CUDA((ctx), cudaGetLastError())

/* Returns from the calling function when a helper returned a failure. */
#define IQ_TRY(call)                                                                           \
  do {                                                                                         \
    int iq_status_ = (call);                                                                   \
    if (iq_status_ != IQ_OK) return iq_status_;                                                \
  } while (0)

/* Sets kernel fn's dynamic shared memory to smem and finds how many of its blocks of `threads`
 * a multiprocessor holds (at least 1), once: *blocks is the caller's per-kernel static, 0 until
 * the first call. */
template <class Args>
static int iq_kernel_blocks(iq_ctx *ctx, void (*fn)(Args), int threads, size_t smem, int *blocks) {
  if (*blocks) return IQ_OK;
  IQ_CUDA(ctx, cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  int fit = 0;
  IQ_CUDA(ctx, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, fn, threads, smem));
  *blocks = fit > 0 ? fit : 1;
  return IQ_OK;
}

/* Programmatic dependent launch (compute capability 9+): a kernel launched so may have its
 * blocks placed while the kernel before it drains, hiding a launch's latency; it must call
 * iq_wait_prior() before touching memory that kernel writes or reads. Elsewhere a plain launch. */
template <typename... Params, typename... Args>
static inline int iq_launch_early(iq_ctx *ctx, void (*kernel)(Params...), dim3 grid, dim3 block,
                                  size_t smem, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = ctx->stream;
  cudaLaunchAttribute early;
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &early;
  cfg.numAttrs = ctx->cc_major >= 9 ? 1 : 0;
  IQ_CUDA(ctx, cudaLaunchKernelEx(&cfg, kernel, args...));
  return IQ_OK;
}

/* In a kernel launched by iq_launch_early: waits until the kernel before has finished and its
 * writes are visible. */
__device__ __forceinline__ void iq_wait_prior() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* Lets the next kernel, if launched early, have its blocks placed (it still waits for this one
 * to finish in iq_wait_prior). The decode chain's kernels call it right after their own wait:
 * the next kernel's blocks then sit ready (a GEMV's first weight loads already on their way)
 * while this one works, and never more than one kernel waits ahead. Not in the K/V store
 * and the merge, whose successor is attention: its blocks, resident early, pack onto SMs still
 * busy and the 1k step of attention takes 1-3 us longer (H100, session 13). */
__device__ __forceinline__ void iq_allow_next() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

static inline int iq_valid_dtype(int dtype) {
  return dtype == IQ_F32 || dtype == IQ_F16 || dtype == IQ_BF16;
}

static inline int iq_dtype_bytes(int dtype) { return dtype == IQ_F32 ? 4 : 2; }

/* Blocks for a grid-stride loop over count elements. */
static inline unsigned iq_blocks(const iq_ctx *ctx, int64_t count, int threads) {
  int64_t want = (count + threads - 1) / threads, cap = (int64_t)ctx->sms * 8;
  return (unsigned)(want < 1 ? 1 : want < cap ? want : cap);
}

/* Element loads as float, for kernels templated on the stored type. */
__device__ __forceinline__ float iq_f32(float v) { return v; }
__device__ __forceinline__ float iq_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float iq_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

/* A float stored as T (round to nearest even). */
template <typename T> __device__ __forceinline__ T iq_from_f32(float v);
template <> __device__ __forceinline__ float iq_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half iq_from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 iq_from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

/* Eight consecutive elements from a 16-byte aligned uint4 (T = half or bf16). */
template <typename T>
__device__ __forceinline__ void iq_unpack8(uint4 raw, float out[8]) {
  const T *h = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; i++) out[i] = iq_f32(h[i]);
}

__device__ __forceinline__ float iq_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* Sum over a block of whole warps; every thread gets it. red holds 32 floats. */
__device__ __forceinline__ float iq_block_sum(float v, float *red) {
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = iq_warp_sum(v);
  __syncthreads(); /* red may still be read from a previous call */
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : 0.0f;
  return iq_warp_sum(v);
}

#endif /* INNERQ_CUDA_CUH */
