/* kvq_unpack.cuh: a quantized chunk (32 tokens, kvq.h's fragment and tile orders) as the
 * tensor-core kernels read it, kvq_mma.cu in decode and kvq_chunk_tiles.cuh for prompts: its
 * regions in words, its codes unpacked into the fp16 pairs of MMA fragments, its fp8 pairs
 * widened. */
#pragma once
#include "mma.cuh"

constexpr int KM_CHUNK = 32; /* tokens of a chunk: a value block */

/* fp16 constants of the unpacking: a code of up to 10 bits OR-ed into the
 * mantissa of 0x6400 (1024) makes the fp16 1024 + code, exactly. */
constexpr uint32_t H_4TH = 0x34003400u, H_NEG256 = 0xDC00DC00u, H_16TH = 0x2C002C00u,
                   H_NEG64 = 0xD400D400u, H_64TH = 0x24002400u, H_NEG16 = 0xCC00CC00u;

/* A raw pair, 1024 + 2^E c per half, as the codes c: one exact fp16 operation. */
template <int E> __device__ __forceinline__ uint32_t raw_code(uint32_t x, uint32_t h) {
  static_assert(E == 0 || E == 2 || E == 4 || E == 6, "a code's place in its byte");
  if constexpr (E == 0) return hsub2(x, h);
  else if constexpr (E == 2) return hfma2(x, H_4TH, H_NEG256);
  else if constexpr (E == 4) return hfma2(x, H_16TH, H_NEG64);
  else return hfma2(x, H_64TH, H_NEG16);
}

/* (x & MASK) | h, h = 0x64006400 held in a register (km_args.h1024): one
 * LOP3, where the literal would take two (LOP3 has one immediate). */
template <uint32_t MASK> __device__ __forceinline__ uint32_t under_1024(uint32_t x, uint32_t h) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(x), "n"(MASK), "r"(h));
  return d;
}

/* The unpackings below give a thread's codes as 4 fp16 pairs, pair i holding
 * its fragment elements 2i and 2i + 1 (k-step i / 2, half i % 2), exact. RAW
 * leaves pair i as 1024 + f_i * code (f_i in raw_factor), which the keys over
 * tokens correct after their MMAs, saving an instruction per pair. */

/* 8 codes of a 32-code run: nibbles (i, i + 4) of x are pair i; f_i = 16^(i % 2). */
template <bool RAW>
__device__ __forceinline__ void unpack_4bit(uint32_t x, uint32_t h, uint32_t pr[4]) {
  const uint32_t y = x >> 8;
  pr[0] = under_1024<0x000F000Fu>(x, h);
  pr[1] = under_1024<0x00F000F0u>(x, h); /* 1024 + 16c */
  pr[2] = under_1024<0x000F000Fu>(y, h);
  pr[3] = under_1024<0x00F000F0u>(y, h);
  if constexpr (!RAW) {
    pr[0] = raw_code<0>(pr[0], h);
    pr[1] = raw_code<4>(pr[1], h);
    pr[2] = raw_code<0>(pr[2], h);
    pr[3] = raw_code<4>(pr[3], h);
  }
}
/* Bytes (0, 2) and (1, 3) of x0, then of x1; f_i = 1. */
template <bool RAW>
__device__ __forceinline__ void unpack_8bit(uint32_t x0, uint32_t x1, uint32_t h, uint32_t pr[4]) {
  pr[0] = __byte_perm(x0, h, 0x7270); /* bytes 0, 2 under 0x64 */
  pr[1] = __byte_perm(x0, h, 0x7371); /* bytes 1, 3 */
  pr[2] = __byte_perm(x1, h, 0x7270);
  pr[3] = __byte_perm(x1, h, 0x7371);
  if constexpr (!RAW)
#pragma unroll
    for (int i = 0; i < 4; i++) pr[i] = raw_code<0>(pr[i], h);
}
/* y holds a 16-bit chunk's two bytes in its two halves: crumb i of each is
 * pair i; f_i = 4^i. */
template <bool RAW>
__device__ __forceinline__ void unpack_2bit(uint32_t y, uint32_t h, uint32_t pr[4]) {
  pr[0] = under_1024<0x00030003u>(y, h);
  pr[1] = under_1024<0x000C000Cu>(y, h); /* 1024 + 4c */
  pr[2] = under_1024<0x00300030u>(y, h);
  pr[3] = under_1024<0x00C000C0u>(y, h);
  if constexpr (!RAW) {
    pr[0] = raw_code<0>(pr[0], h);
    pr[1] = raw_code<2>(pr[1], h);
    pr[2] = raw_code<4>(pr[2], h);
    pr[3] = raw_code<6>(pr[3], h);
  }
}
/* 1 / f_i of a RAW unpacking of BITS-bit codes. */
template <int BITS> __device__ __forceinline__ constexpr float raw_factor_inv(int i) {
  return BITS == 2 ? 1.0f / (float)(1 << (2 * i)) : BITS == 4 && i % 2 ? 1.0f / 16.0f : 1.0f;
}

/* A quad's codes of a token's key row of R runs in fragment order (kvq_slot_of,
 * keys over channels): its chunks are contiguous, R * BITS / 4 words, loaded
 * at once so that the 8 lanes of a quarter warp read distinct banks. */
template <int BITS, int R> struct quad_share {
  static constexpr int WORDS = R * BITS / 4;
  static_assert(WORDS >= 1, "a head_dim of 64 or more: two runs at least");
  uint32_t w[WORDS];
  __device__ __forceinline__ void load(const uint32_t *row, int tig) {
    const uint32_t *src = row + tig * WORDS;
    if constexpr (WORDS % 4 == 0) {
#pragma unroll
      for (int i = 0; i < WORDS; i += 4) {
        const uint4 v = *reinterpret_cast<const uint4 *>(src + i);
        w[i] = v.x, w[i + 1] = v.y, w[i + 2] = v.z, w[i + 3] = v.w;
      }
    } else if constexpr (WORDS == 2) {
      const uint2 v = *reinterpret_cast<const uint2 *>(src);
      w[0] = v.x, w[1] = v.y;
    } else {
      w[0] = src[0];
    }
  }
  /* Run r as 4 fp16 pairs. */
  __device__ __forceinline__ void pairs(int r, uint32_t h, uint32_t pr[4]) const {
    if constexpr (BITS == 4) {
      unpack_4bit<false>(w[r], h, pr);
    } else if constexpr (BITS == 8) {
      unpack_8bit<false>(w[2 * r], w[2 * r + 1], h, pr);
    } else {
      unpack_2bit<false>(__byte_perm(w[r / 2], 0, r % 2 ? 0x4342 : 0x4140), h, pr);
    }
  }
};

/* The two units of k-step ks that lane holds in a block of keys in tile order
 * (kvq_key_tile_slot), as fp16 pairs (RAW by default): x0 for channels 2 tig,
 * + 1, x1 for + 8, + 9; pair j at token gid + 8 j. */
template <int BITS, bool RAW = true>
__device__ __forceinline__ void key_tile_pairs(const uint32_t *codes, int ks, int lane, uint32_t h,
                                               uint32_t x0[4], uint32_t x1[4]) {
  const int unit = (ks * 32 + lane) * 2; /* of 8 codes */
  if constexpr (BITS == 4) {
    const uint2 w = *reinterpret_cast<const uint2 *>(codes + unit);
    unpack_4bit<RAW>(w.x, h, x0);
    unpack_4bit<RAW>(w.y, h, x1);
  } else if constexpr (BITS == 8) {
    const uint4 w = *reinterpret_cast<const uint4 *>(codes + 2 * unit);
    unpack_8bit<RAW>(w.x, w.y, h, x0);
    unpack_8bit<RAW>(w.z, w.w, h, x1);
  } else {
    const uint32_t w = codes[unit / 2];
    unpack_2bit<RAW>(__byte_perm(w, 0, 0x4140), h, x0);
    unpack_2bit<RAW>(__byte_perm(w, 0, 0x4342), h, x1);
  }
}

/* A chunk's key codes, key pairs, value codes and value pairs, in words, as a kernel stages
 * them; each region is contiguous in the cache too. KG, VG: the groups over channels of keys and
 * values, 0 where grouped over the chunk. */
template <int D, int KB, int VB, int KG, int VG, bool F8> struct km_chunk {
  /* words of a chunk's regions as staged: pairs as fp16 (fp8 pairs are widened in place) */
  static constexpr int KC_WORDS = D * KB, KM_WORDS = KG ? KM_CHUNK * D / KG : D,
                       VC_WORDS = D * VB, VM_WORDS = VG ? KM_CHUNK * D / VG : D;
  /* words of the pairs in the cache, copied to the upper half of their region when fp8 */
  static constexpr int KM_SRC = KM_WORDS / (F8 ? 2 : 1), VM_SRC = VM_WORDS / (F8 ? 2 : 1);
  static constexpr int KC = 0, KM = KC + KC_WORDS, VC = KM + KM_WORDS, VM = VC + VC_WORDS,
                       WORDS = VM + VM_WORDS;
};


/* fp8 pairs: a chunk's P pairs arrive as 2-byte pairs in the upper half of
 * their region; the lanes widen them in place to fp16 pairs (each once, where
 * reading them as fp8 would convert each in 8 lanes), so the rest of the
 * kernel reads fp16 pairs. */
template <int P>
__device__ __forceinline__ void widen_pairs(uint32_t *region, int lane, bool e5m2) {
  constexpr int N = (P + 31) / 32;
  const uint16_t *in = reinterpret_cast<const uint16_t *>(region + P / 2);
  uint32_t x[N];
#pragma unroll
  for (int n = 0; n < N; n++) x[n] = lane + 32 * n < P ? in[lane + 32 * n] : 0u;
  __syncwarp(); /* every input read before any output overwrites it */
#pragma unroll
  for (int n = 0; n < N; n++)
    if (lane + 32 * n < P) region[lane + 32 * n] = fp8x2_to_f16x2(x[n], e5m2);
  __syncwarp();
}

/* The A operand of channel tile CM in k-step ks from the lane's words vw in tile order
 * (kvq_value_tile_slot), raw: rows gid, gid + 8 at tokens 2 tig, + 1 (bytes 0, 2), then + 8, + 9
 * (bytes 1, 3), each code c as 1024 + f c, f = 2^(VB j) for the row's code place j. */
template <int VB, int CM>
__device__ __forceinline__ void value_codes(const uint32_t *vw, int ks, uint32_t h, uint32_t fr[4]) {
  constexpr int PER = 8 / VB, Q0 = 2 * CM, Q1 = 2 * CM + 1, J0 = Q0 % PER, J1 = Q1 % PER;
  constexpr uint32_t ONES = (1u << VB) - 1;
  const uint32_t w0 = vw[Q0 / PER * 2 + ks], w1 = vw[Q1 / PER * 2 + ks];
  if constexpr (VB == 8) {
    fr[0] = __byte_perm(w0, h, 0x7270), fr[1] = __byte_perm(w1, h, 0x7270);
    fr[2] = __byte_perm(w0, h, 0x7371), fr[3] = __byte_perm(w1, h, 0x7371);
  } else {
    fr[0] = under_1024<ONES * 0x00010001u << (VB * J0)>(w0, h);
    fr[1] = under_1024<ONES * 0x00010001u << (VB * J1)>(w1, h);
    fr[2] = under_1024<ONES * 0x00010001u << (VB * J0)>(w0 >> 8, h);
    fr[3] = under_1024<ONES * 0x00010001u << (VB * J1)>(w1 >> 8, h);
  }
}

/* 1 / f of row half rh (0: row gid, 1: gid + 8) of channel tile CM (value_codes). */
template <int VB, int CM> __device__ __forceinline__ constexpr float value_factor_inv(int rh) {
  return 1.0f / (float)(1 << (VB * ((2 * CM + rh) % (8 / VB))));
}
