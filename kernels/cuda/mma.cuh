/* mma.cuh: small device helpers of the tensor-core kernels (prefill_rows_kernel.cuh,
 * kvq_mma.cu, decode_mma.cu): the m16n8k16 MMA, fp16x2 arithmetic on raw
 * registers, the 8x8 transpose, ldmatrix, 16-byte cp.async. */
#pragma once
#include "cuda.cuh"

/* The tensor-core kernels keep scores in log2 units (the softmax uses exp2): q is scaled by
 * LOG2E, and a partial's maximum goes back to natural units by LN2 for merge_splits. */
constexpr float LOG2E = 1.44269504f, LN2 = 0.69314718f;

__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&h);
}

/* Stores a pair of halves (a raw fp16x2 register) at p, 4-byte aligned. */
__device__ __forceinline__ void st_pair(__half *p, uint32_t v) { *reinterpret_cast<uint32_t *>(p) = v; }

/* fp16x2 arithmetic on raw registers. */
__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
/* movmatrix: the 8x8 fp16 matrix a warp holds, transposed (a C fragment into a B operand). */
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

/* ldmatrix: four 8x8 fp16 matrices from shared memory, lanes 8i .. 8i + 7 giving the addresses
 * of matrix i's 8 rows (16 bytes each); r[i] is the lane's share of matrix i, as an MMA fragment
 * takes it (row lane / 4, columns 2 (lane % 4), + 1), or of its transpose with .trans. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ float2 pair_f2(uint32_t u) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&u));
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
/* The same for data streamed front to back once: L2 fetches the whole 256-byte block around src
 * from DRAM (fp16 decode attention on an H100: 2978 GB/s at 1M tokens instead of 2927). */
__device__ __forceinline__ void cp_async16_stream(void *dst, const void *src) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
/* Waits until at most N of this thread's cp.async groups are still in flight (a compiler
 * barrier too: no shared-memory access moves across it). */
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* 2^x for x <= 0 or -inf (-> 0): MUFU.EX2 alone; exp2f adds a fix-up for
 * subnormal results that fp16 probabilities cannot hold anyway. */
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/* Two fp8 bytes (scale low, offset high) as an fp16 pair, exactly: e5m2 is
 * fp16's top byte; e4m3 (bias 7) goes by cvt on sm_89+, else its bits moved
 * under fp16's exponent and scaled by 2^8. */
__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t x, bool e5m2) {
  if (e5m2) return __byte_perm(x, 0, 0x1404);
#if __CUDA_ARCH__ >= 890
  uint32_t d;
  asm("{\n.reg .b16 t;\ncvt.u16.u32 t, %1;\ncvt.rn.f16x2.e4m3x2 %0, t;\n}\n" : "=r"(d) : "r"(x));
  return d;
#else
  const uint32_t y = __byte_perm(x, 0, 0x4140); /* bytes 0, 1 in the halves' low bytes */
  return hmul2(((y & 0x007F007Fu) << 7) | ((y & 0x00800080u) << 8), 0x5C005C00u /* 256 */);
#endif
}
