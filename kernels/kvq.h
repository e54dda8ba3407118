/* kvq.h: the quantized KV cache's layout and quantization arithmetic, shared
 * by both backends so they write the same bytes (innerq.h describes the
 * format). Include after the backend's header, which declares iq_fail; the
 * CUDA backend compiles its users with -fmad=false, so every float operation
 * here rounds as in C. */
#ifndef INNERQ_KVQ_H
#define INNERQ_KVQ_H

#include <math.h>
#include <stdint.h>

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
  return over > 0 ? over / b * b : 0;
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
 * Keys grouped over tokens in blocks of 32 beside values grouped over tokens
 * (the kaxis=tokens mix) are ordered by block instead, for an operand whose
 * pairs run along channels: token t, channel c
 * is code j = t / 8 of the 8 that lane (gid = t % 8, tig = c % 8 / 2) uses for
 * channels c0, c0 + 1 (c0 = c - c % 2) and tokens gid + 8 j; those 8 form unit
 * (c / 16 * 32 + gid * 4 + tig) * 2 + c % 16 / 8: per k-step of 16 channels
 * the 32 lanes' units in lane order, each lane's two adjacent.
 *
 * Other rows, other key blocks and 3-bit codes keep natural order. */
#define KVQ_KEY_TILE (-1)

/* The order of one side's codes (0 keys, 1 values): 0 natural, L > 0 rows of L
 * in fragment order, KVQ_KEY_TILE blocks of 32 keys in tile order. */
static KVQ_HD inline int kvq_order(const iq_kvq_params *p, int side) {
  int bits = side ? p->v_bits : p->k_bits, axis = side ? p->v_axis : p->k_axis;
  int group = side ? p->v_group : p->k_group;
  if (bits == 3) return 0;
  if (!side && axis == IQ_AXIS_TOKENS && p->v_axis == IQ_AXIS_TOKENS && group == 32 &&
      p->head_dim % 16 == 0)
    return KVQ_KEY_TILE;
  int len = axis == IQ_AXIS_CHANNELS ? p->head_dim : group;
  return len % 32 == 0 ? len : 0;
}

/* Codes in one period of an order: a row, or a block of keys. */
static KVQ_HD inline int kvq_period(int order, int head_dim) {
  return order == KVQ_KEY_TILE ? 32 * head_dim : order;
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

/* Slot of element i (numbered from a period's start, as grouped) in `order`. */
static KVQ_HD inline int64_t kvq_slot_in(int64_t i, int bits, int order, int head_dim) {
  if (!order) return i;
  int64_t period = kvq_period(order, head_dim), e = i % period;
  int slot = order == KVQ_KEY_TILE ? kvq_key_tile_slot((int)(e % 32), (int)(e / 32), bits)
                                   : kvq_slot_of((int)e, order, bits);
  return i - e + slot;
}

/* The element in slot s of `order`: the inverse of kvq_slot_in. */
static KVQ_HD inline int64_t kvq_elem_in(int64_t s, int bits, int order, int head_dim) {
  if (!order) return s;
  int64_t period = kvq_period(order, head_dim), q = s % period;
  int e = order == KVQ_KEY_TILE ? kvq_key_tile_elem((int)q, bits)
                                : kvq_elem_of((int)q, order, bits);
  return s - q + e;
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

/* Sum of squared error of one group quantized with (scale, offset). */
static KVQ_HD inline float kvq_group_error(const float *x, int stride, int count, int bits,
                                           float scale, float offset) {
  float sse = 0.0f;
  for (int e = 0; e < count; e++) {
    float xe = x[e * stride];
    float d = xe - (scale * (float)kvq_code(xe, scale, offset, bits) + offset);
    sse += d * d;
  }
  return sse;
}

/* The (scale, offset) pair of one group of count values x[e * stride], both
 * rounded to fp16 as stored: asymmetric (min/max), symmetric (zero exact), or
 * in hybrid mode the lower-error one (asymmetric on ties). */
static KVQ_HD inline void kvq_group_params(const float *x, int stride, int count, int bits,
                                           int qmode, float *scale, float *offset) {
  float lo = x[0], hi = x[0];
  for (int e = 1; e < count; e++) {
    float xe = x[e * stride];
    lo = xe < lo ? xe : lo;
    hi = xe > hi ? xe : hi;
  }
  float a_scale = kvq_round_f16((hi - lo) / (float)((1 << bits) - 1));
  float a_offset = kvq_round_f16(lo);
  float amax = fmaxf(fabsf(lo), fabsf(hi));
  float s_scale = kvq_round_f16(amax / (float)((1 << (bits - 1)) - 1));
  float s_offset = kvq_round_f16(-(float)(1 << (bits - 1)) * s_scale);
  int sym = qmode == IQ_QMODE_SYM;
  if (qmode == IQ_QMODE_HYBRID)
    sym = kvq_group_error(x, stride, count, bits, s_scale, s_offset) <
          kvq_group_error(x, stride, count, bits, a_scale, a_offset);
  *scale = sym ? s_scale : a_scale;
  *offset = sym ? s_offset : a_offset;
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
  return ((int64_t)h * p->ring + (x - p->sink) % p->ring) * p->head_dim;
}

/* The dequantized entry (stream token u, channel c) of one side of one KV
 * head: codes and meta point at the head's first code and pair. */
static KVQ_HD inline float kvq_dequantized(const uint32_t *codes, const uint16_t *meta, int64_t u,
                                           int c, int d, int bits, int group, int axis,
                                           int block, int order) {
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
  const uint16_t *pair = meta + (base / group + gi) * 2;
  return kvq_f16_value(pair[0]) * code + kvq_f16_value(pair[1]);
}

/* Pointers to one layer's regions; fp16 as raw bits. */
typedef struct {
  float *key_scale;
  uint16_t *sink_k, *sink_v, *ring_k, *ring_v;
  uint32_t *codes_k, *codes_v;
  uint16_t *meta_k, *meta_v; /* (scale, offset) fp16 pairs */
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
      p->norm > IQ_NORM_RMS || p->meta != IQ_META_F16)
    return iq_fail(ctx, IQ_ERR_ARG, "%s: qmode %d, norm %d or meta %d unknown", op, p->qmode,
                   p->norm, p->meta);
  return IQ_OK;
}

/* Region offsets; see iq_kvq_layout. */
static inline void kvq_offsets(const iq_kvq_params *p, uint64_t off[IQ_KVQ_REGIONS + 1]) {
  uint64_t h = (uint64_t)p->kv_heads, d = (uint64_t)p->head_dim, q = (uint64_t)kvq_quant_cap(p);
  /* in IQ_KVQ_* order */
  const uint64_t bytes[IQ_KVQ_REGIONS] = {
      h * d / 2 * 4,                                                   /* key scale */
      h * (uint64_t)p->sink * d * 2,   h * (uint64_t)p->sink * d * 2,  /* sink K, V */
      h * (uint64_t)p->ring * d * 2,   h * (uint64_t)p->ring * d * 2,  /* ring K, V */
      h * q * d * (uint64_t)p->k_bits / 8, h * q * d * (uint64_t)p->v_bits / 8, /* codes */
      h * q * d / (uint64_t)p->k_group * 4, h * q * d / (uint64_t)p->v_group * 4, /* pairs */
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
