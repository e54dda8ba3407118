/* kvq.c: the quantized KV cache (innerq.h describes the format): store with
 * key normalization and block quantization, attention that folds the
 * dequantization into its dot products, and a dequantizer for tests. The
 * reference the CUDA kernels are tested against: plain loops, no tricks. */
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "../checks.h"
#include "../kvq.h"

int iq_kvq_layout(iq_ctx *ctx, const iq_kvq_params *p, uint64_t offsets[IQ_KVQ_REGIONS + 1]) {
  int st = kvq_check_params(ctx, "iq_kvq_layout", p);
  if (st) return st;
  if (!offsets) return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_layout: NULL offsets");
  kvq_offsets(p, offsets);
  return IQ_OK;
}

/* fp16 row of position x of KV head h, from the sink or the ring. */
static uint16_t *fp16_row(const iq_kvq_params *p, const kvq_regions *r, int side, int h,
                          int64_t x) {
  uint16_t *base = x < p->sink ? (side ? r->sink_v : r->sink_k) : (side ? r->ring_v : r->ring_k);
  return base + kvq_fp16_row(p, h, x);
}

/* Per KV head and RoPE pair: the statistic of |k| over n tokens and both
 * channels of the pair, in stripes of tokens (kvq_norm_factor). */
static void key_normalization(const iq_kvq_params *p, float *key_scale, const float *k, int n) {
  int d = p->head_dim, half = d / 2;
  for (int h = 0; h < p->kv_heads; h++)
    for (int i = 0; i < half; i++) {
      double stripe[KVQ_NORM_STRIPES] = {0.0};
      for (int t = 0; t < n && p->norm != IQ_NORM_OFF; t++)
        for (int c = i; c < d; c += half)
          stripe[t % KVQ_NORM_STRIPES] = kvq_norm_add(
              stripe[t % KVQ_NORM_STRIPES], k[((int64_t)t * p->kv_heads + h) * d + c], p->norm);
      key_scale[h * half + i] = kvq_norm_factor(stripe, 1, p->norm, n);
    }
}

/* Quantizes a block's tile [B, head_dim] of one side into its codes (packed in
 * `order`, kvq_order) and pairs. */
static void quantize_tile(const float *tile, int block, int head_dim, int bits, int group,
                          int axis, int order, int qmode, int format, uint8_t *codes,
                          uint32_t *words, uint16_t *meta) {
  int groups = block * head_dim / group;
  int stride = axis == IQ_AXIS_CHANNELS ? 1 : head_dim;
  for (int gi = 0; gi < groups; gi++) {
    int t, c;
    kvq_group_entry(axis, group, head_dim, gi, 0, &t, &c);
    const float *x = tile + (int64_t)t * head_dim + c;
    float scale, offset;
    kvq_group_params(x, stride, group, bits, qmode, format, &scale, &offset);
    kvq_set_pair(meta, gi, format, scale, offset);
    for (int e = 0; e < group; e++)
      codes[gi * group + e] = (uint8_t)kvq_code(x[e * stride], scale, offset, bits);
  }
  for (int64_t w = 0; w < (int64_t)block * head_dim * bits / 32; w++)
    words[w] = kvq_pack_word_in(codes, w, bits, order, head_dim);
}

/* Quantizes stream block j of KV head h from the ring. */
static void quantize_block(const iq_kvq_params *p, const kvq_regions *r, int h, int64_t j,
                           float *tile, uint8_t *codes) {
  int b = kvq_block(p), d = p->head_dim;
  int64_t qcap = kvq_quant_cap(p), first = j * b; /* first stream token */
  for (int side = 0; side < 2; side++) {
    const uint16_t *ring = side ? r->ring_v : r->ring_k;
    for (int t = 0; t < b; t++) {
      const uint16_t *row = ring + ((int64_t)h * p->ring + (first + t) % p->ring) * d;
      for (int c = 0; c < d; c++) tile[t * d + c] = iq_f16_to_f32(row[c]);
    }
    int bits = side ? p->v_bits : p->k_bits, group = side ? p->v_group : p->k_group;
    uint32_t *words = (side ? r->codes_v : r->codes_k) + ((int64_t)h * qcap + first) * d * bits / 32;
    uint16_t *meta = (side ? r->meta_v : r->meta_k) +
                     kvq_pair_units(((int64_t)h * qcap + first) * d / group, p->meta);
    quantize_tile(tile, b, d, bits, group, side ? p->v_axis : p->k_axis, kvq_order(p, side),
                  p->qmode, p->meta, codes, words, meta);
  }
}

int iq_kvq_store(iq_ctx *ctx, const iq_kvq_params *p, void *layer, const float *k,
                 const float *v, int n, int pos0) {
  int st = kvq_check_params(ctx, "iq_kvq_store", p);
  if (st) return st;
  if (!ctx || !layer || !k || !v) return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_store: NULL argument");
  int b = kvq_block(p), d = p->head_dim, half = d / 2;
  if (n <= 0 || pos0 < 0 || (int64_t)pos0 + n > p->cap || n > p->ring - p->recent - b + 1)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_kvq_store: %d tokens at %d: needs 1..%d tokens within a %d-token cache",
                   n, pos0, p->ring - p->recent - b + 1, p->cap);
  kvq_regions r = kvq_regions_of(p, layer);
  if (pos0 == 0) key_normalization(p, r.key_scale, k, n);
  for (int t = 0; t < n; t++)
    for (int h = 0; h < p->kv_heads; h++) {
      int64_t x = (int64_t)pos0 + t, src = ((int64_t)t * p->kv_heads + h) * d;
      uint16_t *kr = fp16_row(p, &r, 0, h, x), *vr = fp16_row(p, &r, 1, h, x);
      for (int c = 0; c < d; c++) {
        kr[c] = iq_f32_to_f16(k[src + c] / r.key_scale[h * half + c % half]);
        vr[c] = iq_f32_to_f16(v[src + c]);
      }
    }
  /* blocks these tokens complete */
  int64_t done = pos0 > p->sink ? (pos0 - p->sink) / b : 0;
  int64_t now = (int64_t)pos0 + n > p->sink ? ((int64_t)pos0 + n - p->sink) / b : 0;
  if (now == done) return IQ_OK;
  void *scratch;
  st = iq_scratch(ctx, (size_t)b * d * (sizeof(float) + 1), &scratch);
  if (st) return st;
  float *tile = (float *)scratch;
  uint8_t *codes = (uint8_t *)(tile + (int64_t)b * d);
  for (int64_t j = done; j < now; j++)
    for (int h = 0; h < p->kv_heads; h++) quantize_block(p, &r, h, j, tile, codes);
  return IQ_OK;
}

int iq_kvq_dequantize(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *k, float *v,
                      int len) {
  int st = kvq_check_params(ctx, "iq_kvq_dequantize", p);
  if (st) return st;
  if (!ctx || !layer || !k || !v) return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_dequantize: NULL argument");
  if (len <= 0 || len > p->cap)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_dequantize: len %d outside 1..%d", len, p->cap);
  kvq_regions r = kvq_regions_of(p, layer);
  int d = p->head_dim, b = kvq_block(p);
  int64_t nq = kvq_quantized(p, len), qcap = kvq_quant_cap(p);
  for (int h = 0; h < p->kv_heads; h++)
    for (int64_t x = 0; x < len; x++) {
      float *ko = k + ((int64_t)h * len + x) * d, *vo = v + ((int64_t)h * len + x) * d;
      int64_t u = x - p->sink;
      if (u >= 0 && u < nq) {
        const uint32_t *ck = r.codes_k + (int64_t)h * qcap * d * p->k_bits / 32;
        const uint32_t *cv = r.codes_v + (int64_t)h * qcap * d * p->v_bits / 32;
        const uint16_t *mk = r.meta_k + kvq_pair_units((int64_t)h * qcap * d / p->k_group, p->meta);
        const uint16_t *mv = r.meta_v + kvq_pair_units((int64_t)h * qcap * d / p->v_group, p->meta);
        for (int c = 0; c < d; c++) {
          ko[c] = kvq_dequantized(ck, mk, u, c, d, p->k_bits, p->k_group, p->k_axis, b,
                                  kvq_order(p, 0), p->meta);
          vo[c] = kvq_dequantized(cv, mv, u, c, d, p->v_bits, p->v_group, p->v_axis, b,
                                  kvq_order(p, 1), p->meta);
        }
      } else {
        const uint16_t *kr = fp16_row(p, &r, 0, h, x), *vr = fp16_row(p, &r, 1, h, x);
        for (int c = 0; c < d; c++) {
          ko[c] = iq_f16_to_f32(kr[c]);
          vo[c] = iq_f16_to_f32(vr[c]);
        }
      }
    }
  return IQ_OK;
}

/* The element in each slot of one period of an order (kvq_order: a row, or a
 * block of 32 tokens), or slot order itself when len is 0 (natural order).
 * Values over tokens in tile order unpack token-major (token * head_dim +
 * channel; token_major set), so their weighted sum runs along channels as the
 * fp16 rows' does; values over channels are numbered so already. */
typedef struct {
  int len, token_major;
  int16_t elem[32 * 256];
  /* keys over channels: whether each run of 8 slots of a row lies in one group (run_group[k]
   * that of run k): groups of 32 or more in fragment order (a run holds codes of one 32-channel
   * run: kvq.h), of 8 or more in natural order */
  int runs_grouped;
  int16_t run_group[IQ_MAX_HEAD_DIM / 8];
} row_order;

static void order_of(const iq_kvq_params *p, int side, row_order *o) {
  int order = kvq_order(p, side), bits = side ? p->v_bits : p->k_bits, d = p->head_dim;
  o->len = kvq_period(order, d);
  o->token_major = order == KVQ_VALUE_TILE;
  for (int s = 0; s < o->len; s++) {
    int e = (int)kvq_elem_in(s, bits, order, d); /* token-major tiles: channel * 32 + token */
    o->elem[s] = (int16_t)(o->token_major ? e % 32 * d + e / 32 : e);
  }
  const int group = p->k_group;
  o->runs_grouped = !side && p->k_axis == IQ_AXIS_CHANNELS; /* read for keys only */
  for (int s = 0; s < d && o->runs_grouped; s++) {
    const int g = (o->len ? o->elem[s] : s) / group;
    if (s % 8 == 0) o->run_group[s / 8] = (int16_t)g;
    else o->runs_grouped = g == o->run_group[s / 8];
  }
}

typedef struct {
  const iq_kvq_params *p;
  kvq_regions r;
  float *out;
  const float *q;
  int n, pos0, heads, group; /* group: query heads per KV head */
  int tile;                  /* queries a task takes: each code unpacked once for all of them */
  float scale;
  float *scratch;
  int64_t scratch_floats;     /* per worker */
  const row_order *order[2]; /* of the keys' and the values' codes */
} kvq_job;

/* Per-worker scratch for `rows` query rows (a tile's queries times their heads): scores
 * [rows][cap], outputs [rows][d], the rows of q [rows][d], one fp16 row as floats [d], one
 * token's or block's codes as floats [block * d], the rows' folded terms [rows][2 d + 1], and
 * one token's or block's (scale, offset) pairs as floats [2][d]. */
static int64_t kvq_scratch_floats(const iq_kvq_params *p, int rows) {
  int64_t d = p->head_dim;
  return rows * (int64_t)p->cap + 2 * rows * d + d + (int64_t)kvq_block(p) * d +
         rows * (2 * d + 1) + 2 * d;
}

/* Queries a task takes (prefill): up to QUERY_TILE, while their scores fit QUERY_TILE_FLOATS
 * (16 MiB a worker). */
enum { QUERY_TILE = 8, QUERY_TILE_FLOATS = 1 << 22 };
static int query_tile(const iq_kvq_params *p, int n, int group) {
  int64_t fit = QUERY_TILE_FLOATS / ((int64_t)group * p->cap);
  int tile = fit < QUERY_TILE ? (int)fit : QUERY_TILE;
  tile = tile < n ? tile : n;
  return tile > 1 ? tile : 1;
}

/* The first n (scale, offset) pairs at `pairs` as floats, converted once for
 * all the query heads that use them; fp16 pairs as _Float16 (F16C in the AVX2 clones). */
static inline void pairs_of(const uint16_t *pairs, int n, int fmt, float *scale, float *offset) {
  if (fmt == IQ_META_F16) {
    for (int i = 0; i < n; i++) {
      _Float16 half[2]; /* copied, not read through a cast: the cache holds uint16_t */
      memcpy(half, pairs + 2 * i, sizeof half);
      scale[i] = (float)half[0], offset[i] = (float)half[1];
    }
    return;
  }
  for (int i = 0; i < n; i++) kvq_pair(pairs, i, fmt, &scale[i], &offset[i]);
}

/* Eight floats as one vector (GCC's vector extension: AVX in the AVX2 clones, two SSE halves
 * in the default one); loads and stores by memcpy, any alignment. */
typedef float f32x8 __attribute__((vector_size(32)));
/* the helpers below are static and inlined: no call passes a vector across an ABI */
#pragma GCC diagnostic ignored "-Wpsabi"
static inline f32x8 load8(const float *p) {
  f32x8 v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline float sum8(const f32x8 *v) {
  return (((*v)[0] + (*v)[1]) + ((*v)[2] + (*v)[3])) + (((*v)[4] + (*v)[5]) + ((*v)[6] + (*v)[7]));
}

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

/* Codes 8 k .. 8 k + 7 of the words at w (2, 4 or 8 bits) as floats: one shift by lanes, a mask
 * and a conversion (vpsrlvd, vpand, vcvtdq2ps in the AVX2 clones; 8 bits: bytes widened) where one
 * code at a time took a shift, a mask and a conversion each: one decode step at 4k on one core
 * 1.02-1.10x faster at 2 bits, 1.10-1.35x at 4 and 8 (scripts/cpu_attn_ab.ts, session 25). */
static inline __attribute__((always_inline)) f32x8 codes8(const uint32_t *w, int k, int bits) {
  if (bits == 8) { /* eight bytes, widened (vpmovzxbd) */
    u8x8 b;
    memcpy(&b, w + 2 * k, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, i32x8), f32x8);
  }
  const u32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7}, mask = (u32x8){0} + ((1u << bits) - 1);
  const int per8 = 32 / bits / 8; /* runs of eight codes a word */
  const u32x8 v = (u32x8){0} + w[k / per8], shift = (lane + k % per8 * 8) * bits;
  return __builtin_convertvector((i32x8)((v >> shift) & mask), f32x8);
}

/* unpack for 2, 4 or 8 bits, inlined with bits a constant into unpack's clones (always: a copy
 * of its own would be compiled for the default target, and the vector shifts emulated): eight
 * codes at a time, stored in place (natural order) or each to its element (a permuted order, a
 * period at a time). */
static inline __attribute__((always_inline)) void
unpack_words(const uint32_t *w, int count, int bits, const row_order *o, float *out) {
  if (!o->len) {
    for (int k = 0; k < count / 8; k++) {
      const f32x8 f = codes8(w, k, bits);
      memcpy(out + 8 * k, &f, sizeof f);
    }
    return;
  }
  const int len = o->len;
  for (int base = 0; base < count; base += len, w += len * bits / 32) { /* a period */
    const int end = len < count - base ? len : count - base;
    for (int k = 0; k < end / 8; k++) {
      const f32x8 f = codes8(w, k, bits);
      for (int e = 0; e < 8; e++) out[base + o->elem[8 * k + e]] = f[e];
    }
  }
}

/* count codes from code `first` (whole rows: a multiple of the row length
 * and of 32, so rows and blocks start on words) as floats, in element order. */
IQ_CLONES static void unpack(const uint32_t *words, int64_t first, int count, int bits,
                             const row_order *o, float *out) {
  const uint32_t *w = words + first * bits / 32;
  switch (bits) {
  case 2: unpack_words(w, count, 2, o, out); return;
  case 4: unpack_words(w, count, 4, o, out); return;
  case 8: unpack_words(w, count, 8, o, out); return;
  default:
    for (int i = 0; i < count; i++) out[i] = (float)kvq_code_at(words, first + i, bits);
  }
}

/* Two vectors of sums, so that adds (unfused under -std=c11) do not wait on each other; d is a
 * multiple of 8. */
static inline float dot(const float *a, const float *b, int d) {
  f32x8 acc0 = {0}, acc1 = {0};
  int c = 0;
  for (; c + 16 <= d; c += 16) {
    acc0 += load8(a + c) * load8(b + c);
    acc1 += load8(a + c + 8) * load8(b + c + 8);
  }
  if (c < d) acc0 += load8(a + c) * load8(b + c);
  acc0 += acc1;
  return sum8(&acc0);
}

/* Σ q·code·scale over a key row in slot order whose runs of 8 slots each keep to one group
 * (group gs[k] for run k), two runs at a time as in dot; d is a multiple of 16. */
static inline float dot_scaled_runs(const float *q, const float *codes, const float *scale,
                                    const int16_t *gs, int d) {
  f32x8 acc0 = {0}, acc1 = {0};
  for (int k = 0; k < d / 8; k += 2) {
    acc0 += load8(q + 8 * k) * load8(codes + 8 * k) * scale[gs[k]];
    acc1 += load8(q + 8 * k + 8) * load8(codes + 8 * k + 8) * scale[gs[k + 1]];
  }
  acc0 += acc1;
  return sum8(&acc0);
}

/* Scores of the quantized stream tokens [0, nq) for the G query rows q[G][d] (a tile's queries
 * times their heads), each token's codes unpacked once for all G. Channel-grouped keys fold each
 * group's pair as scale * Σ q·code + offset * Σ q (the group sums of q once per call); where
 * runs of 8 slots keep to one group (row_order.runs_grouped), the codes stay in slot order, scaled
 * run by run, and q is permuted into slot order once per call instead. Token-grouped keys take
 * Σ (q·scale) code + Σ q·offset per block. */
IQ_CLONES static void quantized_scores(const kvq_job *j, int kvh, const float *q, int G,
                                       int64_t nq, float *s, int64_t s_stride, float *codes,
                                       float *folded, float *pair_f) {
  const iq_kvq_params *p = j->p;
  int d = p->head_dim, bits = p->k_bits, g = p->k_group, b = kvq_block(p);
  int64_t qcap = kvq_quant_cap(p);
  const uint32_t *words = j->r.codes_k + (int64_t)kvh * qcap * d * bits / 32;
  const int fmt = p->meta;
  const uint16_t *meta = j->r.meta_k + kvq_pair_units((int64_t)kvh * qcap * d / g, fmt);
  const row_order *order = j->order[0];
  if (p->k_axis == IQ_AXIS_CHANNELS) {
    float *qsum = folded, *qp = folded + G * d; /* [G][d / g]; [G][d] q in slot order */
    for (int h = 0; h < G; h++)
      for (int gi = 0; gi < d / g; gi++) {
        float sum = 0.0f;
        for (int e = 0; e < g; e++) sum += q[h * d + gi * g + e];
        qsum[h * (d / g) + gi] = sum;
      }
    float *scale = pair_f, *offset = pair_f + d;
    const int in_slots = order->runs_grouped;
    static const row_order natural = {.len = 0};
    for (int h = 0; h < G && in_slots; h++)
      for (int x = 0; x < d; x++) qp[h * d + x] = q[h * d + (order->len ? order->elem[x] : x)];
    for (int64_t u = 0; u < nq; u++) {
      pairs_of(meta + kvq_pair_units(u * (d / g), fmt), d / g, fmt, scale, offset);
      if (in_slots) {
        unpack(words, u * d, d, bits, &natural, codes);
        for (int h = 0; h < G; h++) {
          float acc = dot_scaled_runs(qp + h * d, codes, scale, order->run_group, d);
          for (int gi = 0; gi < d / g; gi++) acc += offset[gi] * qsum[h * (d / g) + gi];
          s[h * s_stride + u] = acc;
        }
        continue;
      }
      unpack(words, u * d, d, bits, order, codes);
      for (int h = 0; h < G; h++) {
        float acc = 0.0f;
        for (int gi = 0; gi < d / g; gi++)
          acc += scale[gi] * dot(q + h * d + gi * g, codes + gi * g, g) +
                 offset[gi] * qsum[h * (d / g) + gi];
        s[h * s_stride + u] = acc;
      }
    }
  } else {
    float *qs = folded; /* [G][d] q·scale, then [G] Σ q·offset */
    float *scale = pair_f, *offset = pair_f + d;
    for (int64_t blk = 0; blk < nq / b; blk++) {
      pairs_of(meta + kvq_pair_units(blk * d, fmt), d, fmt, scale, offset);
      for (int h = 0; h < G; h++) {
        float bias = 0.0f;
        for (int c = 0; c < d; c++) {
          qs[h * d + c] = q[h * d + c] * scale[c];
          bias += q[h * d + c] * offset[c];
        }
        qs[G * d + h] = bias;
      }
      unpack(words, blk * b * d, b * d, bits, order, codes); /* [channel][token] */
      for (int h = 0; h < G; h++) { /* the block's b scores side by side: a channel at a time */
        float acc[KVQ_MAX_GROUP];
        for (int t = 0; t < b; t++) acc[t] = qs[G * d + h];
        for (int c = 0; c < d; c++)
          for (int t = 0; t < b; t++) acc[t] += qs[h * d + c] * codes[c * b + t];
        memcpy(s + h * s_stride + blk * b, acc, (size_t)b * sizeof(float));
      }
    }
  }
}

/* out[G][d] += Σ_u w[h][u] v_u over the quantized stream tokens [0, nq[h / group]) of each row
 * (rows: a tile's queries times their group of heads):
 * token-grouped values fold scale * Σ w·code + offset * Σ w per block and
 * channel; channel-grouped values take Σ (w·scale) code + Σ w·offset per token
 * and group. */
IQ_CLONES static void quantized_values(const kvq_job *j, int kvh, const float *w,
                                       int64_t w_stride, int G, const int64_t *nq, float *out,
                                       float *codes, float *pair_f) {
  const iq_kvq_params *p = j->p;
  int d = p->head_dim, bits = p->v_bits, g = p->v_group, b = kvq_block(p);
  const int per = j->group;                 /* rows a query */
  const int64_t most = nq[(G - 1) / per]; /* a later query sees at least as many */
  int64_t qcap = kvq_quant_cap(p);
  const uint32_t *words = j->r.codes_v + (int64_t)kvh * qcap * d * bits / 32;
  const int fmt = p->meta;
  const uint16_t *meta = j->r.meta_v + kvq_pair_units((int64_t)kvh * qcap * d / g, fmt);
  const row_order *order = j->order[1];
  float *scale = pair_f, *offset = pair_f + d;
  if (p->v_axis == IQ_AXIS_TOKENS) {
    for (int64_t blk = 0; blk < most / b; blk++) {
      /* [token][channel] when token-major, else [channel][token] */
      unpack(words, blk * b * d, b * d, bits, order, codes);
      pairs_of(meta + kvq_pair_units(blk * d, fmt), d, fmt, scale, offset);
      for (int h = 0; h < G; h++) {
        if (blk * b >= nq[h / per]) continue;
        const float *wb = w + h * w_stride + blk * b;
        float wsum = 0.0f;
        for (int t = 0; t < b; t++) wsum += wb[t];
        if (order->token_major) {
          float sum[256]; /* Σ_t w code per channel (head_dim <= 256) */
          memset(sum, 0, (size_t)d * sizeof(float));
          for (int t = 0; t < b; t++)
            for (int c = 0; c < d; c++) sum[c] += wb[t] * codes[t * d + c];
          for (int c = 0; c < d; c++) out[h * d + c] += scale[c] * sum[c] + offset[c] * wsum;
        } else {
          for (int c = 0; c < d; c++)
            out[h * d + c] += scale[c] * dot(wb, codes + c * b, b) + offset[c] * wsum;
        }
      }
    }
  } else {
    /* a token's row at a time, or a block's 32 in tile order (most is whole blocks) */
    const int rows = order->len > d ? order->len / d : 1;
    for (int64_t u0 = 0; u0 < most; u0 += rows) {
      unpack(words, u0 * d, rows * d, bits, order, codes);
      for (int64_t u = u0; u < u0 + rows; u++) {
        const float *row = codes + (u - u0) * d;
        pairs_of(meta + kvq_pair_units(u * (d / g), fmt), d / g, fmt, scale, offset);
        for (int h = 0; h < G; h++)
          for (int gi = 0; gi < d / g && u < nq[h / per]; gi++) {
            float ws = w[h * w_stride + u] * scale[gi], wo = w[h * w_stride + u] * offset[gi];
            for (int e = 0; e < g; e++) out[h * d + gi * g + e] += ws * row[gi * g + e] + wo;
          }
      }
    }
  }
}

/* Queries t0 .. t0 + nt - 1 and the G query heads of KV head kvh: scores over sink | quantized
 * | ring, one exact softmax per head, then the weighted values. Each quantized row is unpacked
 * once for all nt * G rows, each fp16 row once per query. A query that sees fewer tokens
 * quantized than the tile's last takes the others' scores from their fp16 rows (written over)
 * and stops its quantized values at its own nq. */
IQ_CLONES static void attend_tile(const kvq_job *j, int t0, int nt, int kvh, float *scratch) {
  const iq_kvq_params *p = j->p;
  const int d = p->head_dim, G = j->group, R = nt * G;
  const int64_t cap = p->cap;
  float *s = scratch, *acc = s + R * cap, *rows = acc + (int64_t)R * d;
  float *row = rows + (int64_t)R * d;
  float *codes = row + d, *folded = codes + (int64_t)kvq_block(p) * d;
  float *pair_f = folded + (int64_t)R * (2 * d + 1);
  int64_t len[QUERY_TILE] = {0}, nq[QUERY_TILE] = {0}, sink[QUERY_TILE] = {0};
  for (int i = 0; i < nt; i++) {
    len[i] = (int64_t)j->pos0 + t0 + i + 1;
    nq[i] = kvq_quantized(p, len[i]);
    sink[i] = len[i] < p->sink ? len[i] : p->sink;
  }
  const float *qr = j->q + ((int64_t)t0 * j->heads + (int64_t)kvh * G) * d;
  if (nt > 1) { /* the tile's rows of q side by side (one query's already are) */
    for (int i = 0; i < nt; i++)
      memcpy(rows + (int64_t)i * G * d, qr + (int64_t)i * j->heads * d, (size_t)G * d * 4);
    qr = rows;
  }
  /* where a query sees quantized tokens its sink is whole: they start at p->sink */
  quantized_scores(j, kvh, qr, R, nq[nt - 1], s + p->sink, cap, codes, folded, pair_f);
  for (int i = 0; i < nt; i++)
    for (int64_t x = 0; x < len[i]; x++) { /* fp16 rows: the sink, then the ring */
      if (x >= sink[i] && x - sink[i] < nq[i]) continue;
      iq_to_f32(row, fp16_row(p, &j->r, 0, kvh, x), IQ_F16, d);
      for (int h = i * G; h < (i + 1) * G; h++) s[h * cap + x] = dot(qr + (int64_t)h * d, row, d);
    }
  for (int h = 0; h < R; h++) {
    float *sh = s + h * cap, max = -INFINITY, sum = 0.0f;
    const int64_t n = len[h / G];
    for (int64_t x = 0; x < n; x++) {
      sh[x] *= j->scale;
      max = sh[x] > max ? sh[x] : max;
    }
    for (int64_t x = 0; x < n; x++) {
      sh[x] = expf(sh[x] - max);
      sum += sh[x];
    }
    for (int64_t x = 0; x < n; x++) sh[x] /= sum;
  }
  memset(acc, 0, (size_t)R * d * sizeof(float));
  for (int i = 0; i < nt; i++)
    for (int64_t x = 0; x < len[i]; x++) {
      if (x >= sink[i] && x - sink[i] < nq[i]) continue;
      iq_to_f32(row, fp16_row(p, &j->r, 1, kvh, x), IQ_F16, d);
      for (int h = i * G; h < (i + 1) * G; h++)
        for (int c = 0; c < d; c++) acc[h * d + c] += s[h * cap + x] * row[c];
    }
  quantized_values(j, kvh, s + p->sink, cap, R, nq, acc, codes, pair_f);
  for (int i = 0; i < nt; i++)
    memcpy(j->out + ((int64_t)(t0 + i) * j->heads + (int64_t)kvh * G) * d, acc + (int64_t)i * G * d,
           (size_t)G * d * sizeof(float));
}

static void attend_range(void *arg, int64_t begin, int64_t end, int worker) {
  const kvq_job *j = arg;
  float *scratch = j->scratch + worker * j->scratch_floats;
  for (int64_t i = begin; i < end; i++) {
    const int t0 = (int)(i / j->p->kv_heads) * j->tile;
    const int nt = j->n - t0 < j->tile ? j->n - t0 : j->tile;
    attend_tile(j, t0, nt, (int)(i % j->p->kv_heads), scratch);
  }
}

int iq_kvq_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer, float *out,
                     const float *q, int n, int pos0, int heads, float scale) {
  int st = kvq_check_params(ctx, "iq_kvq_attention", p);
  if (st) return st;
  if (!ctx || !layer || !out || !q)
    return iq_fail(ctx, IQ_ERR_ARG, "iq_kvq_attention: NULL argument");
  if (n <= 0 || pos0 < 0 || (int64_t)pos0 + n > p->cap || heads <= 0 || heads % p->kv_heads)
    return iq_fail(ctx, IQ_ERR_ARG,
                   "iq_kvq_attention: %d queries at %d in a %d-token cache, heads %d a multiple "
                   "of kv_heads %d",
                   n, pos0, p->cap, heads, p->kv_heads);
  int group = heads / p->kv_heads, tile = query_tile(p, n, group);
  int64_t per_worker = kvq_scratch_floats(p, tile * group);
  void *scratch;
  st = iq_scratch(ctx, (size_t)ctx->threads * per_worker * sizeof(float), &scratch);
  if (st) return st;
  static _Thread_local row_order orders[2]; /* 32 KiB: off the stack, built once per call */
  order_of(p, 0, &orders[0]);
  order_of(p, 1, &orders[1]);
  kvq_job j = {.p = p, .r = kvq_regions_of(p, layer), .out = out, .q = q, .n = n, .pos0 = pos0,
               .heads = heads, .group = group, .tile = tile, .scale = scale, .scratch = scratch,
               .scratch_floats = per_worker, .order = {&orders[0], &orders[1]}};
  iq_parallel_for(ctx, (int64_t)(n + tile - 1) / tile * p->kv_heads, 1, attend_range, &j);
  return IQ_OK;
}
