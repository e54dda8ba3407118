/* innerq.h: the one C ABI of the kernel library, served by two backends.
 *
 *   build/libinnerq_cpu.so   kernels/cpu/ (C; the reference, runs everywhere)
 *   build/libinnerq_cuda.so  kernels/cuda/ (CUDA; NVIDIA GPUs)
 *
 * Conventions
 * - Every call returns an iq_status; on failure iq_last_error(ctx) says why.
 * - Buffers are device pointers from iq_alloc (host memory on the CPU backend).
 *   Ops never allocate per call; scratch lives in the context.
 * - Activations are fp32, row-major, except where an op takes their dtype
 *   (rmsnorm's and swiglu's out, matmul's x): there fp16 or bf16 may stand in,
 *   so a GEMM reads its input in the weights' type with no rounding pass.
 *   Writing fp16/bf16 rounds to nearest even (fp16 overflows to inf; NaN stays
 *   NaN). Weights may be fp32, fp16 or bf16 and are read as stored (fp32
 *   accumulate). Token ids and positions are int32.
 * - Linear layers use the Hugging Face layout: W[out_features, in_features].
 * - Calls on one context are ordered; iq_download returns once data has arrived.
 */
#ifndef INNERQ_H
#define INNERQ_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IQ_ABI_VERSION 9

typedef enum {
  IQ_OK = 0,
  IQ_ERR_ARG = 1,    /* an argument is out of range or a pointer is NULL */
  IQ_ERR_MEMORY = 2, /* an allocation failed */
  IQ_ERR_DEVICE = 3, /* the device or driver failed */
} iq_status;

typedef enum {
  IQ_F32 = 0,
  IQ_F16 = 1,
  IQ_BF16 = 2,
} iq_dtype;

typedef struct iq_ctx iq_ctx;

/* ---- library and context ---------------------------------------------- */

int iq_abi_version(void);
/* "cpu" or "cuda" */
const char *iq_backend_name(void);
/* device: GPU ordinal (ignored on the CPU backend); threads: CPU worker threads,
 * 0 = one per core (ignored on CUDA). *out is NULL on failure. */
int iq_ctx_create(int device, int threads, iq_ctx **out);
void iq_ctx_destroy(iq_ctx *ctx);
/* Message of the last failure on ctx; with ctx NULL, of the last failed
 * iq_ctx_create on this thread. Never NULL. */
const char *iq_last_error(const iq_ctx *ctx);
/* Device name (NUL-terminated, truncated to cap) and memory in bytes. */
int iq_device_info(iq_ctx *ctx, char *name, int cap, uint64_t *free_bytes,
                   uint64_t *total_bytes);
/* Waits until every call issued on ctx has finished. */
int iq_sync(iq_ctx *ctx);
/* Timing of queued calls, for benchmarks: iq_timing_begin holds the device's
 * queue (the device waits, at most a second, for iq_timing_end) and marks the
 * start, so that the calls issued next run back to back however slowly the
 * host issues them, as in a forward pass the host runs ahead of; iq_timing_end
 * marks the end, releases the hold, waits, and writes the seconds between the
 * marks. It fails if the hold ran out first (too many calls in the span, or
 * slow ones on the host). A call that waits for the device (iq_sync, upload,
 * download, alloc, free) releases the hold early. One span at a time per ctx.
 * The CPU backend, whose calls finish as issued, times the span on the host's
 * clock. */
int iq_timing_begin(iq_ctx *ctx);
int iq_timing_end(iq_ctx *ctx, double *seconds);

/* ---- buffers ------------------------------------------------------------ */

int iq_alloc(iq_ctx *ctx, uint64_t bytes, void **out);
int iq_free(iq_ctx *ctx, void *buf);
int iq_upload(iq_ctx *ctx, void *dst, const void *host_src, uint64_t bytes);
int iq_download(iq_ctx *ctx, void *host_dst, const void *src, uint64_t bytes);

/* ---- ops of a Llama forward pass ---------------------------------------- */

/* out[n, dim] = table[tokens[i], :]; table[vocab, dim] of table_dtype.
 * Token ids must lie in [0, vocab). */
int iq_embed(iq_ctx *ctx, float *out, const void *table, int table_dtype,
             const int32_t *tokens, int n, int dim, int vocab);

/* out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight, computed in
 * fp32 and stored as out_dtype (IQ_F32, IQ_F16 or IQ_BF16): a narrow out holds
 * exactly the fp32 result rounded. out may be x when out_dtype is IQ_F32; a
 * narrower out must not overlap x. With residual non-NULL, x[i, :] +=
 * residual[i, :] first and x keeps the sum (the residual stream's add, fused
 * into the norm that follows it); then out overlaps neither x nor residual,
 * and residual does not overlap x. */
int iq_rmsnorm(iq_ctx *ctx, void *out, int out_dtype, float *x, const float *residual,
               const float *weight, int n, int dim, float eps);

/* out[n, m] = x[n, k] · w[m, k]ᵀ + bias[m], fp32; bias may be NULL. out != x.
 * x_dtype is IQ_F32, or w_dtype when that is IQ_F16 or IQ_BF16 (else
 * IQ_ERR_ARG). A narrow x gives the bits an fp32 x holding the same values
 * gives: on the CPU, which widens it; on CUDA for n > 1, where cuBLAS reads x
 * in the weights' type, an fp32 x being rounded to it first (a narrow x skips
 * that pass). */
int iq_matmul(iq_ctx *ctx, float *out, const void *x, int x_dtype,
              const void *w, int w_dtype, const float *bias, int n, int k,
              int m);

/* Rotary embedding in place on x[n, heads, head_dim], Hugging Face layout:
 * channel i < head_dim/2 pairs with i + head_dim/2 and both turn by the angle
 * pos[t] * inv_freq[i]. inv_freq[head_dim/2] carries rope_theta and any
 * rope_scaling (computed by the caller).
 * pair_scale, when not NULL, is [scale_heads, head_dim/2] for the first
 * scaled_heads heads of each token (a multiple of scale_heads, at most heads):
 * after turning, both channels of pair i of head h < scaled_heads are
 * multiplied by pair_scale[h / (scaled_heads / scale_heads)][i]; the heads
 * after them turn unscaled, so decode turns one token's [q heads | k heads]
 * in one call. A factor shared by a pair commutes with the rotation; the
 * InnerQ cache multiplies q by its keys' per-channel normalization here, so
 * decode pays nothing for it. */
int iq_rope(iq_ctx *ctx, float *x, const int32_t *pos, const float *inv_freq,
            const float *pair_scale, int n, int heads, int head_dim,
            int scale_heads, int scaled_heads);

/* out[i] = silu(gate[i]) * up[i], computed in fp32 and stored as out_dtype
 * (IQ_F32, IQ_F16 or IQ_BF16; a narrow out holds the fp32 result rounded).
 * out may alias either input when out_dtype is IQ_F32; a narrower out must
 * overlap neither. */
int iq_swiglu(iq_ctx *ctx, void *out, int out_dtype, const float *gate,
              const float *up, int64_t count);

/* out[i] = a[i] + b[i]; out may alias either input. */
int iq_add(iq_ctx *ctx, float *out, const float *a, const float *b,
           int64_t count);

/* ---- KV cache and attention --------------------------------------------- */
/* A cache holds one layer's keys or values as [kv_heads, cap, head_dim] of
 * cache_dtype (IQ_F16 or IQ_F32); position p of head h is row h * cap + p. */

/* Writes keys k and values v, each [n, kv_heads * head_dim] (one row per
 * token), to positions pos0 .. pos0 + n - 1 of k_cache and v_cache (one
 * call, one kernel: a decode step stores both in one launch); needs
 * pos0 + n <= cap. */
int iq_kv_store(iq_ctx *ctx, void *k_cache, void *v_cache, int cache_dtype,
                const float *k, const float *v, int n, int pos0, int kv_heads,
                int head_dim, int cap);

/* Causal attention for a chunk of n queries q[n, heads, head_dim] at positions
 * pos0 .. pos0 + n - 1, whose keys and values are already stored: query t sees
 * cache positions 0 .. pos0 + t. GQA: query head h reads KV head
 * h / (heads / kv_heads). out[n, heads, head_dim]; softmax(q·kᵀ * scale). */
int iq_attention_prefill(iq_ctx *ctx, float *out, const float *q,
                         const void *k_cache, const void *v_cache,
                         int cache_dtype, int n, int pos0, int heads,
                         int kv_heads, int head_dim, int cap, float scale);

/* One query q[heads, head_dim] at position pos, over cache positions
 * 0 .. pos: the decode step. Same semantics as prefill with n = 1. */
int iq_attention_decode(iq_ctx *ctx, float *out, const float *q,
                        const void *k_cache, const void *v_cache,
                        int cache_dtype, int pos, int heads, int kv_heads,
                        int head_dim, int cap, float scale);

/* ---- quantized KV cache (InnerQ and KIVI-style) --------------------------
 * One layer's keys and values live in one buffer of iq_kvq_layout bytes,
 * per KV head:
 *   sink:  the first `sink` positions, fp16, for the whole run;
 *   quant: positions sink .. sink + nq - 1, b-bit codes with one (scale,
 *          offset) pair per group: value = scale * code + offset;
 *   ring:  fp16 rows of the latest positions (`ring` rows, a ring buffer).
 * Position x >= sink is stream token u = x - sink, in ring slot u % ring.
 * A query at position p (L = p + 1 tokens) sees the quantized copy of stream
 * tokens u < nq(L) = block * floor(max(0, L - sink - recent) / block) and the
 * fp16 copy of the rest, so `recent` .. `recent + block - 1` tokens stay fp16
 * and tokens leave the window a whole block at a time. Prefill and decode
 * follow the same rule for every query, so each token sees its predecessors
 * exactly as generation would.
 *
 * Groups lie along one axis, chosen separately for keys and values:
 *   IQ_AXIS_CHANNELS: `group` consecutive channels of one token (InnerQ keys,
 *     KIVI values). Codes of a token row are contiguous; pairs [token][group].
 *   IQ_AXIS_TOKENS: `group` consecutive tokens of one channel (InnerQ values,
 *     KIVI keys). Per block of `group` tokens, codes [channel][token] are
 *     contiguous; pairs [block][channel].
 * block = the group of the side grouped along tokens (1 when neither is; both
 * must be equal when both are).
 * Packing: every 32 consecutive slots take `bits` uint32 words, slot i at bit
 * i * bits of their little-endian concatenation (2, 3, 4 and 8 bits). Rows of
 * codes (a token's channels when grouped over channels, a block's tokens of
 * one channel when grouped over tokens) whose length is a multiple of 32 hold
 * their 2-, 4- and 8-bit codes in the tensor cores' fragment order
 * (kvq_slot_of in kernels/kvq.h), except that blocks of 32 keys over tokens,
 * and the values of blocks of 32 tokens (head_dim * bits a multiple of 128),
 * over tokens or over channels, take a tile order of the whole block
 * (kvq_key_tile_slot, kvq_value_tile_slot); other rows and 3-bit codes are in
 * natural order, element i in slot i.
 * Pairs (`meta`): IQ_META_F16, two fp16 (4 bytes: scale, then offset), each
 * rounded to nearest; IQ_META_E4M3 or IQ_META_E5M2, two fp8 bytes in one
 * little-endian uint16 (2 bytes: the scale in the low byte, the offset in the
 * high), rounded so the stored pair covers the group's [min, max]: the offset
 * down, then the least scale that reaches max. e4m3 is OCP's "fn" (bias 7,
 * largest 448), e5m2 has bias 15 (largest 57344), both with subnormals; past
 * the largest value an offset or scale saturates and values outside clip
 * (kvq_round_pair in kernels/kvq.h).
 * Hybrid mode quantizes each group symmetrically (offset = -2^(bits-1) *
 * scale, so zero is exact) and asymmetrically (min/max) and keeps the pair
 * with the lower squared error; both modes share the (scale, offset) form, so
 * decode reads no mode bit.
 * Key normalization: at the store of position 0, each KV head's RoPE pair i
 * gets a factor n_i (max |k| or RMS over the stored tokens and both channels
 * of the pair); keys are divided by it before they are cached (ring and sink
 * too), and the caller multiplies q by it (iq_rope's pair_scale, pointing at
 * the key_scale region), so q·k is unchanged. Off: every factor is 1. */

enum { IQ_AXIS_CHANNELS = 0, IQ_AXIS_TOKENS = 1 };
enum { IQ_QMODE_ASYM = 0, IQ_QMODE_SYM = 1, IQ_QMODE_HYBRID = 2 };
enum { IQ_NORM_OFF = 0, IQ_NORM_MAX = 1, IQ_NORM_RMS = 2 };
enum { IQ_META_F16 = 0, IQ_META_E4M3 = 1, IQ_META_E5M2 = 2 };

typedef struct {
  int32_t kv_heads, head_dim, cap; /* cap: positions the cache holds */
  int32_t sink, recent, ring;      /* ring >= recent + block + the longest store */
  int32_t k_bits, k_group, k_axis;
  int32_t v_bits, v_group, v_axis;
  int32_t qmode, norm, meta;
} iq_kvq_params;

/* Regions of a layer buffer, in order; offsets[IQ_KVQ_REGIONS] is the size. */
enum {
  IQ_KVQ_KEY_SCALE = 0, /* f32 [kv_heads, head_dim / 2] */
  IQ_KVQ_SINK_K,        /* f16 [kv_heads, sink, head_dim] */
  IQ_KVQ_SINK_V,
  IQ_KVQ_RING_K, /* f16 [kv_heads, ring, head_dim] */
  IQ_KVQ_RING_V,
  IQ_KVQ_CODES_K, /* u32 per KV head: quant_cap tokens of head_dim codes */
  IQ_KVQ_CODES_V,
  IQ_KVQ_META_K, /* (scale, offset) pairs per KV head: 4 bytes (f16) or 2 (fp8) */
  IQ_KVQ_META_V,
  IQ_KVQ_REGIONS
};

/* Checks p and writes the byte offsets of every region (each 256-aligned)
 * and, last, the buffer's size. */
int iq_kvq_layout(iq_ctx *ctx, const iq_kvq_params *p,
                  uint64_t offsets[IQ_KVQ_REGIONS + 1]);

/* Stores k, v [n, kv_heads * head_dim] (keys after RoPE) at positions pos0 ..
 * pos0 + n - 1 (n <= ring - recent - block + 1), computing the key
 * normalization first when pos0 == 0, and quantizes every block these tokens
 * complete. Positions must be stored in order. */
int iq_kvq_store(iq_ctx *ctx, const iq_kvq_params *p, void *layer,
                 const float *k, const float *v, int n, int pos0);

/* Causal attention of q[n, heads, head_dim] (already multiplied by the key
 * normalization) at positions pos0 .. pos0 + n - 1 over the cache, each query
 * seeing the cache as the rule above says. out[n, heads, head_dim]. */
int iq_kvq_attention(iq_ctx *ctx, const iq_kvq_params *p, const void *layer,
                     float *out, const float *q, int n, int pos0, int heads,
                     float scale);

/* What a query at position len - 1 sees when len positions are stored, in
 * normalized key space:
 * k, v [kv_heads, len, head_dim] fp32 (sink and ring rows as stored,
 * quantized rows dequantized). For tests and tools; not fast. */
int iq_kvq_dequantize(iq_ctx *ctx, const iq_kvq_params *p, const void *layer,
                      float *k, float *v, int len);

/* ---- sampling ------------------------------------------------------------ */

/* Picks one token from logits[vocab] and writes it to *out_token (a device
 * int32). logits are left unchanged. Steps, in this order:
 * 1. repetition penalty: each distinct id in history[n_history] (ids outside
 *    [0, vocab) are ignored) has its logit l set to l / penalty if l > 0,
 *    else l * penalty; penalty 1 is off.
 * 2. temperature <= 0: the arg max (lowest id on ties); done.
 * 3. l /= temperature (NaN and +inf temperatures are out of range);
 *    candidates ordered by l descending, lower id first on ties.
 * 4. top_k > 0: keep the first top_k candidates.
 * 5. p = softmax over the kept candidates.
 * 6. min_p > 0: keep candidates with p >= min_p * p_max.
 * 7. top_p < 1: keep the shortest prefix whose p sums to >= top_p.
 * 8. the token is the first kept candidate whose running sum of p exceeds
 *    uniform * (sum of kept p); uniform in [0, 1) comes from the caller's
 *    seeded generator, so equal seeds give equal tokens.
 * Logits that cannot be sampled, in every mode: a NaN logit, or a largest
 * value m (of step 1's logits when greedy, of step 3's otherwise) that is
 * +inf or -inf. For them *out_token is negative, -(4 * id + reason):
 *   reason 1: logit id is NaN (the lowest such id);
 *   reason 2: m is +inf, at id (the lowest such id);
 *   reason 3: m is -inf, every value is (id 0).
 * The CUDA backend finds this on the device and returns IQ_OK, so the caller
 * must check the token it reads back; the CPU backend also returns
 * IQ_ERR_ARG, its message the text the caller derives from the token:
 *   "iq_sample: logit <id> is NaN",
 *   "iq_sample: the largest logit (id <id>) is +inf",
 *   "iq_sample: every logit is -inf".
 * vocab is at most 2^29, so every id fits the code. */
int iq_sample(iq_ctx *ctx, int32_t *out_token, const float *logits, int vocab,
              const int32_t *history, int n_history, float repeat_penalty,
              float temperature, int top_k, float top_p, float min_p,
              float uniform);

#ifdef __cplusplus
}
#endif

#endif /* INNERQ_H */
