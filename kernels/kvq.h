/* kvq.h: the quantized KV cache's layout and quantization arithmetic, shared
 * by both backends so they write the same bytes (innerq.h describes the
 * format). Include after the backend's header, which declares iq_fail; the
 * CUDA backend compiles its users with -fmad=false, so every float operation
 * here rounds as in C. */
#ifndef INNERQ_KVQ_H
#define INNERQ_KVQ_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "innerq.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define KVQ_HD __host__ __device__
static KVQ_HD inline float kvq_round_f16(float x) { return __half2float(__float2half_rn(x)); }
static KVQ_HD inline uint16_t kvq_f16_bits(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
static KVQ_HD inline float kvq_f16_value(uint16_t h) { return __half2float(__ushort_as_half(h)); }
#else
#define KVQ_HD
static inline float kvq_round_f16(float x) { return iq_f16_to_f32(iq_f32_to_f16(x)); }
static inline uint16_t kvq_f16_bits(float x) { return iq_f32_to_f16(x); }
static inline float kvq_f16_value(uint16_t h) { return iq_f16_to_f32(h); }
#endif

static KVQ_HD inline uint32_t kvq_f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
static KVQ_HD inline float kvq_f32_of(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}
/* 2^e, -126 <= e <= 127 */
static KVQ_HD inline float kvq_pow2(int e) { return kvq_f32_of((uint32_t)(e + 127) << 23); }

/* fp8 scales and offsets (IQ_META_E4M3, IQ_META_E5M2): a byte of sign,
 * exponent and mantissa with subnormals. e4m3 is OCP's "fn" variant: bias 7,
 * no infinities, 0x7f and 0xff NaN, largest 448 (0x7e). e5m2: bias 15,
 * exponent 31 infinities and NaNs, largest 57344 (0x7b). */
static KVQ_HD inline int kvq_fp8_mant(int meta) { return meta == IQ_META_E4M3 ? 3 : 2; }
static KVQ_HD inline int kvq_fp8_bias(int meta) { return meta == IQ_META_E4M3 ? 7 : 15; }
/* the largest finite magnitude's code */
static KVQ_HD inline uint32_t kvq_fp8_top(int meta) { return meta == IQ_META_E4M3 ? 0x7e : 0x7b; }

/* The value of fp8 byte b (NaN and infinity codes too). */
static KVQ_HD inline float kvq_fp8_value(uint32_t b, int meta) {
  const int m = kvq_fp8_mant(meta), e = (int)(b & 0x7f) >> m, n = (int)(b & ((1u << m) - 1));
  float mag;
  if ((b & 0x7f) > kvq_fp8_top(meta))
    mag = kvq_f32_of(meta == IQ_META_E5M2 && (b & 0x7f) == 0x7c ? 0x7f800000u : 0x7fc00000u);
  else /* an integer times the unit of its binade: exact */
    mag = (float)(e ? n + (1 << m) : n) * kvq_pow2((e ? e : 1) - kvq_fp8_bias(meta) - m);
  return b & 0x80 ? -mag : mag;
}

/* x as an fp8 byte, rounded toward -inf (dir < 0), to nearest even (dir 0) or
 * toward +inf (dir > 0), and saturated: magnitudes past the largest finite
 * value (infinities too) give it; NaN gives 0. Never a NaN or infinity code. */
static KVQ_HD inline uint32_t kvq_fp8_bits(float x, int meta, int dir) {
  const int m = kvq_fp8_mant(meta), bias = kvq_fp8_bias(meta);
  const uint32_t u = kvq_f32_bits(x), sign = u >> 31 << 7, abs = u & 0x7fffffffu;
  const uint32_t top = kvq_fp8_top(meta);
  if (abs > 0x7f800000u) return 0;
  int e = (int)(abs >> 23) - 127; /* x's binade (float subnormals: below fp8's) */
  if (e > (int)(top >> m) - bias) return sign | top;
  if (e < 1 - bias) e = 1 - bias; /* fp8 subnormals: the lowest binade's unit */
  /* |x| in units of the fp8 binade's last place: a power-of-two scaling, exact */
  const float y = kvq_f32_of(abs) * kvq_pow2(m - e), n = floorf(y), rem = y - n;
  const int away = dir == 0 ? rem > 0.5f || (rem == 0.5f && ((int)n & 1))
                            : rem > 0.0f && (dir > 0) == !sign;
  /* codes grow with magnitude across binades, so rounding away carries on */
  const uint32_t code = (uint32_t)(((e + bias - 1) << m) + (int)n + away);
  return sign | (code < top ? code : top);
}

/* Groups are powers of two in [KVQ_MIN_GROUP, KVQ_MAX_GROUP]; the quantized
 * region of each KV head holds a multiple of KVQ_TILE tokens, so every tile
 * of the CUDA kernels starts 16-byte aligned. */
#define KVQ_MIN_GROUP 8
#define KVQ_MAX_GROUP 128
#define KVQ_TILE 128

/* Tokens that leave the recent window together: the token-axis group. */
static KVQ_HD inline int kvq_block(const iq_kvq_params *p) {
  if (p->k_axis == IQ_AXIS_TOKENS) return p->k_group;
  if (p->v_axis == IQ_AXIS_TOKENS) return p->v_group;
  return 1;
}

/* Stream tokens of the quantized region a query sees when len tokens exist. */
static KVQ_HD inline int64_t kvq_quantized(const iq_kvq_params *p, int64_t len) {
  int64_t over = len - p->sink - p->recent;
  int b = kvq_block(p);
  return over > 0 ? (int32_t)over / b * b : 0; /* len <= cap: 32 bits, a short division */
}

/* Stream tokens each KV head has room for in the quantized region. */
static KVQ_HD inline int64_t kvq_quant_cap(const iq_kvq_params *p) {
  int64_t q = p->cap > p->sink ? p->cap - p->sink : 0;
  return (q + KVQ_TILE - 1) / KVQ_TILE * KVQ_TILE;
}

/* Code i of a packed array: 32 codes take `bits` words, code i at bit i * bits. */
static KVQ_HD inline uint32_t kvq_code_at(const uint32_t *words, int64_t i, int bits) {
  int64_t bit = i * bits;
  int shift = (int)(bit & 31);
  uint64_t pair = words[bit >> 5];
  if (shift + bits > 32) pair |= (uint64_t)words[(bit >> 5) + 1] << 32;
  return (uint32_t)(pair >> shift) & ((1u << bits) - 1);
}

/* Word w of the packing of codes[] (one code a byte). */
static KVQ_HD inline uint32_t kvq_pack_word(const uint8_t *codes, int64_t w, int bits) {
  int64_t first = (w * 32) / bits, last = (w * 32 + 31) / bits;
  uint32_t word = 0;
  for (int64_t i = first; i <= last; i++) {
    int64_t shift = i * bits - w * 32; /* may be negative for a code begun in the word before */
    uint32_t c = codes[i];
    word |= shift >= 0 ? c << shift : c >> -shift;
  }
  return word;
}

/* Codes with 2, 4 or 8 bits are stored in the tensor cores' fragment order, so
 * that the CUDA kernel loads each thread's codes of an mma.m16n8k16 operand as
 * one piece and unpacks them into fp16 pairs with a few bit operations.
 *
 * Rows of L codes (a token's channels for groups over channels, a block's
 * tokens of one channel for values grouped over tokens), L a multiple of 32:
 * element e of a row lies in run r = e / 32 (two k-steps of 16); within the run
 * in k-step ks, held by lane quad tig (elements 2 tig, 2 tig + 1 and 2 tig + 8,
 * 2 tig + 9 of each k-step) as its f-th of 8. A quad's 8 codes of run r form
 * chunk tig * (L / 32) + r (each quad's chunks contiguous), f in the slot the
 * unpacking expects.
 *
 * Keys grouped over tokens in blocks of 32 (KIVI's keys, and the kaxis=tokens
 * mix) are ordered by block instead, for an operand whose pairs run along
 * channels: token t, channel c
 * is code j = t / 8 of the 8 that lane (gid = t % 8, tig = c % 8 / 2) uses for
 * channels c0, c0 + 1 (c0 = c - c % 2) and tokens gid + 8 j; those 8 form unit
 * (c / 16 * 32 + gid * 4 + tig) * 2 + c % 16 / 8: per k-step of 16 channels
 * the 32 lanes' units in lane order, each lane's two adjacent.
 *
 * Values grouped over tokens in blocks of 32 (head_dim * bits a multiple of
 * 128) are ordered by block too, for the value MMA's A operand (channels x
 * tokens) unpacked raw: lane (gid, tig) holds, of channel tile cm and row half
 * rh (channel 16 cm + 8 rh + gid), tokens 16 ks + 8 half + 2 tig + p; the
 * pair (p = 0, 1) of (cm, rh, ks, half) sits in bytes half + 2 p of the
 * lane's word w = q / per * 2 + ks at code place j = q % per within the byte
 * (q = 2 cm + rh, per = 8 / bits codes a byte), so every code of one channel
 * row takes the same place j (one unpacking factor 2^(bits j) per output row).
 * Lane words: w / 4 * 128 + lane * 4 + w % 4 (16-byte loads without bank
 * conflicts). Values grouped over channels in blocks of 32 tokens (KIVI's
 * values beside its keys) take the same slots (KVQ_VALUE_ROWS_TILE), their
 * elements numbered as grouped, token-major (t * head_dim + c).
 *
 * Other rows, other blocks and 3-bit codes keep natural order. */
#define KVQ_KEY_TILE (-1)
#define KVQ_VALUE_TILE (-2)
#define KVQ_VALUE_ROWS_TILE (-3)

/* The order of one side's codes (0 keys, 1 values): 0 natural, L > 0 rows of L
 * in fragment order, KVQ_KEY_TILE / KVQ_VALUE_TILE / KVQ_VALUE_ROWS_TILE
 * blocks of 32 keys / values in tile order. */
static KVQ_HD inline int kvq_order(const iq_kvq_params *p, int side) {
  int bits = side ? p->v_bits : p->k_bits, axis = side ? p->v_axis : p->k_axis;
  int group = side ? p->v_group : p->k_group;
  if (bits == 3) return 0;
  if (!side && axis == IQ_AXIS_TOKENS && group == 32 && p->head_dim % 16 == 0)
    return KVQ_KEY_TILE;
  if (side && kvq_block(p) == 32 && p->head_dim * bits % 128 == 0)
    return axis == IQ_AXIS_TOKENS ? KVQ_VALUE_TILE : KVQ_VALUE_ROWS_TILE;
  int len = axis == IQ_AXIS_CHANNELS ? p->head_dim : group;
  return len % 32 == 0 ? len : 0;
}

/* Codes in one period of an order: a row, or a block of 32 tokens. */
static KVQ_HD inline int kvq_period(int order, int head_dim) {
  return order < 0 ? 32 * head_dim : order;
}

/* Slot (position in units of codes) of element e in a permuted row of len. */
static KVQ_HD inline int kvq_slot_of(int e, int len, int bits) {
  int r = e / 32, rr = e % 16, ks = e % 32 / 16;
  int tig = rr % 8 / 2, f = ks * 4 + rr / 8 * 2 + rr % 2;
  /* 4 bits: the unpacking yields nibbles (i, i + 4) as pair i; 2 bits: crumb i
   * of each byte; 8 bits: bytes (0, 2) and (1, 3) of each k-step's word */
  int q = bits == 8 ? f / 4 * 4 + f % 4 / 2 + 2 * (f % 2) : f / 2 + 4 * (f % 2);
  return (tig * (len / 32) + r) * 8 + q;
}

/* The element in slot s of a permuted row: the inverse of kvq_slot_of. */
static KVQ_HD inline int kvq_elem_of(int s, int len, int bits) {
  int k = s / 8, q = s % 8, tig = k / (len / 32), r = k % (len / 32);
  int f = bits == 8 ? q / 4 * 4 + 2 * (q % 2) + q % 4 / 2 : 2 * (q % 4) + q / 4;
  return r * 32 + f / 4 * 16 + f / 2 % 2 * 8 + tig * 2 + f % 2;
}

/* Slot of key (token t, channel c) in a block of 32 in tile order. Within a
 * unit, 2 and 4 bits hold channel c0's tokens then c0 + 1's (pair j of the
 * unpacking: (c0, c0 + 1) at token gid + 8 j); 8 bits hold tokens j = 0, 1 of
 * both channels in the first word, j = 2, 3 in the second. */
static KVQ_HD inline int kvq_key_tile_slot(int t, int c, int bits) {
  int j = t / 8, cc = c % 2;
  int unit = (c / 16 * 32 + t % 8 * 4 + c % 8 / 2) * 2 + c % 16 / 8;
  return unit * 8 + (bits == 8 ? j / 2 * 4 + cc * 2 + j % 2 : cc * 4 + j);
}

/* The block element (c * 32 + t, as grouped over tokens) in slot s: the
 * inverse of kvq_key_tile_slot. */
static KVQ_HD inline int kvq_key_tile_elem(int s, int bits) {
  int unit = s / 8, p = s % 8, half = unit % 2, lane = unit / 2 % 32, ks = unit / 64;
  int cc = bits == 8 ? p % 4 / 2 : p / 4, j = bits == 8 ? p / 4 * 2 + p % 2 : p % 4;
  int t = lane / 4 + 8 * j, c = 16 * ks + 8 * half + lane % 4 * 2 + cc;
  return c * 32 + t;
}

/* Slot of value (token t, channel c) in a block of 32 in tile order. */
static KVQ_HD inline int kvq_value_tile_slot(int t, int c, int bits) {
  int per = 8 / bits, q = c / 16 * 2 + c % 16 / 8;
  int lane = c % 8 * 4 + t % 8 / 2, w = q / per * 2 + t / 16;
  int word = w / 4 * 128 + lane * 4 + w % 4, byte = t % 16 / 8 + 2 * (t % 2);
  return word * (32 / bits) + 8 / bits * byte + q % per;
}

/* The block element (c * 32 + t) in slot s: the inverse of kvq_value_tile_slot. */
static KVQ_HD inline int kvq_value_tile_elem(int s, int bits) {
  int per = 8 / bits, word = s / (32 / bits), place = s % (32 / bits);
  int lane = word % 128 / 4, w = word / 128 * 4 + word % 4, byte = place / per;
  int q = w / 2 * per + place % per;
  int c = q / 2 * 16 + q % 2 * 8 + lane / 4, t = w % 2 * 16 + byte % 2 * 8 + lane % 4 * 2 + byte / 2;
  return c * 32 + t;
}

/* Slot of element e of one period (e < kvq_period) in `order` (not 0). */
static KVQ_HD inline int kvq_slot_in_period(int e, int bits, int order, int head_dim) {
  switch (order) {
  case KVQ_KEY_TILE: return kvq_key_tile_slot(e % 32, e / 32, bits);
  case KVQ_VALUE_TILE: return kvq_value_tile_slot(e % 32, e / 32, bits);
  case KVQ_VALUE_ROWS_TILE: return kvq_value_tile_slot(e / head_dim, e % head_dim, bits);
  default: return kvq_slot_of(e, order, bits);
  }
}

/* Slot of element i (numbered from a period's start, as grouped) in `order`. */
static KVQ_HD inline int64_t kvq_slot_in(int64_t i, int bits, int order, int head_dim) {
  if (!order) return i;
  int64_t period = kvq_period(order, head_dim), e = i % period;
  return i - e + kvq_slot_in_period((int)e, bits, order, head_dim);
}

/* The element in slot s of one period (s < kvq_period) of `order` (not 0). */
static KVQ_HD inline int kvq_elem_in_period(int s, int bits, int order, int head_dim) {
  switch (order) {
  case KVQ_KEY_TILE: return kvq_key_tile_elem(s, bits);
  case KVQ_VALUE_TILE: return kvq_value_tile_elem(s, bits);
  case KVQ_VALUE_ROWS_TILE: {
    const int e = kvq_value_tile_elem(s, bits); /* channel * 32 + token */
    return e % 32 * head_dim + e / 32;
  }
  default: return kvq_elem_of(s, order, bits);
  }
}

/* The element in slot s of `order`: the inverse of kvq_slot_in. */
static KVQ_HD inline int64_t kvq_elem_in(int64_t s, int bits, int order, int head_dim) {
  if (!order) return s;
  int64_t period = kvq_period(order, head_dim), q = s % period;
  return s - q + kvq_elem_in_period((int)q, bits, order, head_dim);
}

/* Code i of a packed array in `order` (i numbered from a period's start). */
static KVQ_HD inline uint32_t kvq_code_in(const uint32_t *words, int64_t i, int bits, int order,
                                          int head_dim) {
  return kvq_code_at(words, kvq_slot_in(i, bits, order, head_dim), bits);
}

/* Word w of the packing of codes[] (one code a byte, element order) in `order`. */
static KVQ_HD inline uint32_t kvq_pack_word_in(const uint8_t *codes, int64_t w, int bits,
                                               int order, int head_dim) {
  if (!order) return kvq_pack_word(codes, w, bits);
  uint32_t word = 0;
  for (int k = 0; k < 32 / bits; k++)
    word |= (uint32_t)codes[kvq_elem_in(w * (32 / bits) + k, bits, order, head_dim)] << (k * bits);
  return word;
}

static KVQ_HD inline int kvq_code(float x, float scale, float offset, int bits) {
  if (!(scale > 0.0f)) return 0;
  float c = rintf((x - offset) / scale);
  float top = (float)((1 << bits) - 1);
  return (int)(c < 0.0f ? 0.0f : c > top ? top : c);
}

/* A group's sums run over kvq_lanes(count) lanes, as a warp of the CUDA store
 * computes them: lane l adds the errors of elements l, l + L, l + 2 L, ... in
 * turn, then the lanes' partials add pairwise, halves first (a butterfly). The
 * C backend adds in the same order, so both backends choose the same pair. */
#define KVQ_LANES 32
static KVQ_HD inline int kvq_lanes(int count) { return count < KVQ_LANES ? count : KVQ_LANES; }

/* Squared error of x stored as code with (scale, offset). */
static KVQ_HD inline float kvq_code_error(float x, int code, float scale, float offset) {
  float d = x - (scale * (float)code + offset);
  return d * d;
}

/* Sum of squared error of one group quantized with (scale, offset), in the
 * lanes' order. */
static KVQ_HD inline float kvq_group_error(const float *x, int stride, int count, int bits,
                                           float scale, float offset) {
  const int lanes = kvq_lanes(count);
  float part[KVQ_LANES];
  for (int l = 0; l < lanes; l++) {
    part[l] = 0.0f;
    for (int e = l; e < count; e += lanes)
      part[l] += kvq_code_error(x[e * stride], kvq_code(x[e * stride], scale, offset, bits), scale,
                                 offset);
  }
  for (int half = lanes / 2; half > 0; half /= 2)
    for (int l = 0; l < half; l++) part[l] += part[l + half];
  return part[0];
}

/* Bytes of one (scale, offset) pair: two fp16 (scale first), or two fp8
 * bytes in one uint16 (the scale in the low byte). */
static KVQ_HD inline int kvq_pair_bytes(int meta) { return meta == IQ_META_F16 ? 4 : 2; }

/* Where pair i starts, in uint16 units from the first: meta + kvq_pair_units(i, format) is
 * a head's or a block's first pair. */
static KVQ_HD inline int64_t kvq_pair_units(int64_t i, int format) {
  return i * kvq_pair_bytes(format) / 2;
}

/* Pair i of meta, as stored: the one place pairs are read. */
static KVQ_HD inline void kvq_pair(const uint16_t *meta, int64_t i, int format, float *scale,
                                   float *offset) {
  if (format == IQ_META_F16) {
    *scale = kvq_f16_value(meta[2 * i]);
    *offset = kvq_f16_value(meta[2 * i + 1]);
  } else {
    *scale = kvq_fp8_value(meta[i] & 0xffu, format);
    *offset = kvq_fp8_value((uint32_t)meta[i] >> 8, format);
  }
}

/* Stores pair i; scale and offset are already representable (kvq_group_params). */
static KVQ_HD inline void kvq_set_pair(uint16_t *meta, int64_t i, int format, float scale,
                                       float offset) {
  if (format == IQ_META_F16) {
    meta[2 * i] = kvq_f16_bits(scale);
    meta[2 * i + 1] = kvq_f16_bits(offset);
  } else {
    meta[i] = (uint16_t)(kvq_fp8_bits(scale, format, 0) | kvq_fp8_bits(offset, format, 0) << 8);
  }
}

/* The least fp8 scale s >= 0 with base + steps * s >= target, or the largest
 * finite one where none is. The float quotient rounded up is never above it
 * (rounding is monotone and steps * s is exact) but may fall short when
 * target - base rounds down (a sum spanning more than 24 bits, e5m2 only);
 * the test that steps it up is exact in double, where fp8 and fp16 values
 * and their small multiples add without rounding. */
static KVQ_HD inline float kvq_fp8_cover(float base, float target, int steps, int format) {
  const float need = (target - base) / (float)steps;
  uint32_t s = kvq_fp8_bits(need > 0.0f ? need : 0.0f, format, 1);
  while (s < kvq_fp8_top(format) &&
         (double)base + steps * (double)kvq_fp8_value(s, format) < (double)target)
    s++;
  return kvq_fp8_value(s, format);
}

/* The stored pair of a group with minimum lo and maximum hi, asymmetric or
 * symmetric (offset -2^(bits-1) * scale, so zero is exact), as decoded.
 * fp16: scale and offset rounded to nearest, each on its own (the format's
 * precision makes any miss at the group's ends negligible).
 * fp8 (3 or 2 mantissa bits): rounded so the stored pair covers [lo, hi]:
 * asymmetric, the offset is the largest fp8 <= lo, then the scale the least
 * with offset + (2^bits - 1) * scale >= hi; symmetric, the scale the least with
 * (2^(bits-1) - 1) * scale >= max(|lo|, |hi|), and the offset follows it.
 * Where the format's range is too small (e4m3: offsets below -448, scales
 * above 448, e.g. a 2-bit group of values spanning more than 1344), the
 * offset or scale saturates at the largest finite value and the values
 * outside the stored range clip to its ends; e5m2 reaches 57344. Zero-range
 * groups whose value is representable round-trip exactly (scale 0). */
static KVQ_HD inline void kvq_round_pair(float lo, float hi, int bits, int sym, int format,
                                         float *scale, float *offset) {
  const int top = (1 << bits) - 1, half = 1 << (bits - 1);
  const float amax = fmaxf(fabsf(lo), fabsf(hi));
  if (format == IQ_META_F16) {
    *scale = kvq_round_f16(sym ? amax / (float)(half - 1) : (hi - lo) / (float)top);
    *offset = kvq_round_f16(sym ? -(float)half * *scale : lo);
  } else if (sym) {
    *scale = kvq_fp8_cover(0.0f, amax, half - 1, format);
    *offset = kvq_fp8_value(kvq_fp8_bits(-(float)half * *scale, format, 0), format);
  } else {
    *offset = kvq_fp8_value(kvq_fp8_bits(lo, format, -1), format);
    *scale = kvq_fp8_cover(*offset, hi, top, format);
  }
}

/* A group's candidate pairs from its bounds lo, hi (as found by fminf / fmaxf,
 * in any order): [0] asymmetric (min/max), [1] symmetric (zero exact). */
typedef struct {
  float scale[2], offset[2];
} kvq_candidates;

static KVQ_HD inline kvq_candidates kvq_candidates_of(float lo, float hi, int bits, int format) {
  kvq_candidates c;
  /* + 0: a zero bound is +0 whichever of -0 and +0 the search met first */
  kvq_round_pair(lo + 0.0f, hi + 0.0f, bits, 0, format, &c.scale[0], &c.offset[0]);
  kvq_round_pair(lo + 0.0f, hi + 0.0f, bits, 1, format, &c.scale[1], &c.offset[1]);
  return c;
}

/* Whether a group stores its symmetric candidate: always in symmetric mode; in
 * hybrid mode where that has the lower error with its stored values
 * (asymmetric on ties) and its offset is exactly -2^(bits-1) * scale (not
 * saturated, so it covers the group as asymmetric does where the range fits
 * the format; fp16 pairs pass unless they overflow, when the symmetric error
 * is not finite either). The errors are read only in hybrid mode. */
static KVQ_HD inline int kvq_keeps_sym(const kvq_candidates *c, int bits, int qmode,
                                       float asym_error, float sym_error) {
  if (qmode != IQ_QMODE_HYBRID) return qmode == IQ_QMODE_SYM;
  return c->offset[1] == -(float)(1 << (bits - 1)) * c->scale[1] && sym_error < asym_error;
}

/* The (scale, offset) pair of one group of count values x[e * stride], as
 * stored in `format` (kvq_round_pair): asymmetric, symmetric, or in hybrid
 * mode the better of the two (kvq_keeps_sym). */
static KVQ_HD inline void kvq_group_params(const float *x, int stride, int count, int bits,
                                           int qmode, int format, float *scale, float *offset) {
  float lo = x[0], hi = x[0];
  for (int e = 1; e < count; e++) {
    lo = fminf(lo, x[e * stride]);
    hi = fmaxf(hi, x[e * stride]);
  }
  const kvq_candidates c = kvq_candidates_of(lo, hi, bits, format);
  float asym_error = 0.0f, sym_error = 0.0f;
  if (qmode == IQ_QMODE_HYBRID) {
    asym_error = kvq_group_error(x, stride, count, bits, c.scale[0], c.offset[0]);
    sym_error = kvq_group_error(x, stride, count, bits, c.scale[1], c.offset[1]);
  }
  const int sym = kvq_keeps_sym(&c, bits, qmode, asym_error, sym_error);
  *scale = c.scale[sym];
  *offset = c.offset[sym];
}

/* Key normalization's statistic per KV head and RoPE pair (|k| over the prompt's tokens and both
 * channels of the pair): token t adds into stripe t % KVQ_NORM_STRIPES, and the stripes combine
 * in order, so that the CUDA kernel can give each stripe a warp and both backends still add in
 * the same order (RMS sums are not associative). */
#define KVQ_NORM_STRIPES 32
static KVQ_HD inline double kvq_norm_add(double stat, double x, int norm) {
  return norm == IQ_NORM_MAX ? fmax(stat, fabs(x)) : stat + x * x;
}

/* The pair's factor from its stripes over n tokens: 1 where off or zero. */
static KVQ_HD inline float kvq_norm_factor(const double *stripe, int stride, int norm, int n) {
  double stat = 0.0;
  for (int s = 0; s < KVQ_NORM_STRIPES && norm != IQ_NORM_OFF; s++)
    stat = norm == IQ_NORM_MAX ? fmax(stat, stripe[s * stride]) : stat + stripe[s * stride];
  if (norm == IQ_NORM_RMS) stat = sqrt(stat / (2.0 * n));
  return stat > 0.0 ? (float)stat : 1.0f;
}

/* Within a block of B tokens x hd channels, group gi's element e is tile
 * entry (token, channel) below; its code is local index gi * group + e and its
 * pair is local pair gi, on both axes. */
static KVQ_HD inline void kvq_group_entry(int axis, int group, int head_dim, int gi, int e,
                                          int *token, int *channel) {
  if (axis == IQ_AXIS_CHANNELS) {
    *token = gi / (head_dim / group);
    *channel = gi % (head_dim / group) * group + e;
  } else {
    *token = e;
    *channel = gi;
  }
}

/* Element offset of position x's fp16 row of KV head h, in the sink region
 * when x < sink, else in the ring. */
static KVQ_HD inline int64_t kvq_fp16_row(const iq_kvq_params *p, int h, int64_t x) {
  if (x < p->sink) return ((int64_t)h * p->sink + x) * p->head_dim;
  /* x < cap fits 32 bits: a 32-bit modulo, where a 64-bit one is a long GPU subroutine */
  return ((int64_t)h * p->ring + (int32_t)(x - p->sink) % p->ring) * p->head_dim;
}

/* The dequantized entry (stream token u, channel c) of one side of one KV
 * head: codes and meta point at the head's first code and pair (pairs in
 * `format`). */
static KVQ_HD inline float kvq_dequantized(const uint32_t *codes, const uint16_t *meta, int64_t u,
                                           int c, int d, int bits, int group, int axis,
                                           int block, int order, int format) {
  int64_t j = u / block, t = u % block, gi, e;
  if (axis == IQ_AXIS_CHANNELS) {
    gi = t * (d / group) + c / group;
    e = c % group;
  } else {
    gi = c;
    e = t;
  }
  int64_t base = j * block * d; /* the block's first code */
  float code = (float)kvq_code_in(codes, base + gi * group + e, bits, order, d);
  float scale, offset;
  kvq_pair(meta, base / group + gi, format, &scale, &offset);
  return scale * code + offset;
}

/* Pointers to one layer's regions; fp16 as raw bits. */
typedef struct {
  float *key_scale;
  uint16_t *sink_k, *sink_v, *ring_k, *ring_v;
  uint32_t *codes_k, *codes_v;
  uint16_t *meta_k, *meta_v; /* (scale, offset) pairs: kvq_pair reads them */
} kvq_regions;

/* Checks the parameters both backends accept. */
static inline int kvq_check_params(iq_ctx *ctx, const char *op, const iq_kvq_params *p) {
  if (!p) return iq_fail(ctx, IQ_ERR_ARG, "%s: NULL params", op);
  if (p->kv_heads <= 0 || p->cap <= 0 || p->head_dim <= 0 || p->head_dim % 32 ||
      p->head_dim > 256)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "%s: kv_heads %d, cap %d must be positive and head_dim %d a multiple of 32 "
                   "up to 256",
                   op, p->kv_heads, p->cap, p->head_dim);
  const int bits[2] = {p->k_bits, p->v_bits}, group[2] = {p->k_group, p->v_group},
            axis[2] = {p->k_axis, p->v_axis};
  for (int s = 0; s < 2; s++) {
    const char *side = s ? "values" : "keys";
    if (bits[s] != 2 && bits[s] != 3 && bits[s] != 4 && bits[s] != 8)
      return iq_fail(ctx, IQ_ERR_ARG, "%s: %s bits %d not 2, 3, 4 or 8", op, side, bits[s]);
    if (axis[s] != IQ_AXIS_CHANNELS && axis[s] != IQ_AXIS_TOKENS)
      return iq_fail(ctx, IQ_ERR_ARG, "%s: %s axis %d unknown", op, side, axis[s]);
    if (group[s] < KVQ_MIN_GROUP || group[s] > KVQ_MAX_GROUP || (group[s] & (group[s] - 1)) ||
        (axis[s] == IQ_AXIS_CHANNELS && p->head_dim % group[s]))
      return iq_fail(ctx, IQ_ERR_ARG,
                     "%s: %s group %d must be a power of two in %d..%d and divide head_dim %d "
                     "when over channels",
                     op, side, group[s], KVQ_MIN_GROUP, KVQ_MAX_GROUP, p->head_dim);
  }
  if (p->k_axis == IQ_AXIS_TOKENS && p->v_axis == IQ_AXIS_TOKENS && p->k_group != p->v_group)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: key and value groups over tokens differ (%d, %d)", op,
                   p->k_group, p->v_group);
  if (p->sink < 0 || p->recent < 0 || p->ring < p->recent + kvq_block(p))
    return iq_fail(ctx, IQ_ERR_ARG, "%s: sink %d, recent %d >= 0 and ring %d >= recent + %d",
                   op, p->sink, p->recent, p->ring, kvq_block(p));
  if (p->qmode < IQ_QMODE_ASYM || p->qmode > IQ_QMODE_HYBRID || p->norm < IQ_NORM_OFF ||
      p->norm > IQ_NORM_RMS || p->meta < IQ_META_F16 || p->meta > IQ_META_E5M2)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: qmode %d, norm %d or meta %d unknown", op, p->qmode,
                   p->norm, p->meta);
  return IQ_OK;
}

/* Region offsets; see iq_kvq_layout. */
static inline void kvq_offsets(const iq_kvq_params *p, uint64_t off[IQ_KVQ_REGIONS + 1]) {
  uint64_t h = (uint64_t)p->kv_heads, d = (uint64_t)p->head_dim, q = (uint64_t)kvq_quant_cap(p);
  uint64_t pair = (uint64_t)kvq_pair_bytes(p->meta);
  /* in IQ_KVQ_* order */
  const uint64_t bytes[IQ_KVQ_REGIONS] = {
      h * d / 2 * 4,                                                   /* key scale */
      h * (uint64_t)p->sink * d * 2,   h * (uint64_t)p->sink * d * 2,  /* sink K, V */
      h * (uint64_t)p->ring * d * 2,   h * (uint64_t)p->ring * d * 2,  /* ring K, V */
      h * q * d * (uint64_t)p->k_bits / 8, h * q * d * (uint64_t)p->v_bits / 8, /* codes */
      h * q * d / (uint64_t)p->k_group * pair, h * q * d / (uint64_t)p->v_group * pair, /* pairs */
  };
  uint64_t at = 0;
  for (int r = 0; r < IQ_KVQ_REGIONS; r++) {
    off[r] = at;
    at += (bytes[r] + 255) / 256 * 256;
  }
  off[IQ_KVQ_REGIONS] = at;
}

static inline kvq_regions kvq_regions_of(const iq_kvq_params *p, const void *layer) {
  uint64_t off[IQ_KVQ_REGIONS + 1];
  kvq_offsets(p, off);
  char *b = (char *)layer;
  kvq_regions r;
  r.key_scale = (float *)(b + off[IQ_KVQ_KEY_SCALE]);
  r.sink_k = (uint16_t *)(b + off[IQ_KVQ_SINK_K]);
  r.sink_v = (uint16_t *)(b + off[IQ_KVQ_SINK_V]);
  r.ring_k = (uint16_t *)(b + off[IQ_KVQ_RING_K]);
  r.ring_v = (uint16_t *)(b + off[IQ_KVQ_RING_V]);
  r.codes_k = (uint32_t *)(b + off[IQ_KVQ_CODES_K]);
  r.codes_v = (uint32_t *)(b + off[IQ_KVQ_CODES_V]);
  r.meta_k = (uint16_t *)(b + off[IQ_KVQ_META_K]);
  r.meta_v = (uint16_t *)(b + off[IQ_KVQ_META_V]);
  return r;
}

#endif /* INNERQ_KVQ_H */
