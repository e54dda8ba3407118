// The kernel library's symbol table: kernels/innerq.h, one entry per C function, in header order.

export const symbols = {
  iq_abi_version: { parameters: [], result: "i32" }, // int iq_abi_version(void)
  iq_backend_name: { parameters: [], result: "pointer" }, // const char *iq_backend_name(void)
  iq_ctx_create: {
    parameters: [
      "i32", // int device
      "i32", // int threads
      "buffer", // iq_ctx **out
    ],
    result: "i32",
  },
  iq_ctx_destroy: { parameters: ["pointer"], result: "void" }, // void iq_ctx_destroy(iq_ctx *ctx)
  iq_last_error: { parameters: ["pointer"], result: "pointer" }, // const char *iq_last_error(const iq_ctx *ctx)
  iq_device_info: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // char *name
      "i32", // int cap
      "buffer", // uint64_t *free_bytes
      "buffer", // uint64_t *total_bytes
    ],
    result: "i32",
  },
  iq_sync: { parameters: ["pointer"], result: "i32" }, // int iq_sync(iq_ctx *ctx)
  iq_timing_begin: { parameters: ["pointer"], result: "i32" }, // int iq_timing_begin(iq_ctx *ctx)
  iq_timing_end: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // double *seconds
    ],
    result: "i32",
  },

  iq_alloc: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "u64", // uint64_t bytes
      "buffer", // void **out
    ],
    result: "i32",
  },
  iq_free: { parameters: ["pointer", "pointer"], result: "i32" }, // int iq_free(iq_ctx *ctx, void *buf)
  iq_upload: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // void *dst
      "buffer", // const void *host_src
      "u64", // uint64_t bytes
    ],
    result: "i32",
  },
  iq_download: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // void *host_dst
      "pointer", // const void *src
      "u64", // uint64_t bytes
    ],
    result: "i32",
  },

  iq_embed: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // float *out
      "pointer", // const void *table
      "i32", // int table_dtype
      "pointer", // const int32_t *tokens
      "i32", // int n
      "i32", // int dim
      "i32", // int vocab
    ],
    result: "i32",
  },
  iq_rmsnorm: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // void *out
      "i32", // int out_dtype
      "pointer", // float *x
      "pointer", // const float *residual
      "pointer", // const float *weight
      "i32", // int n
      "i32", // int dim
      "f32", // float eps
    ],
    result: "i32",
  },
  iq_matmul: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // float *out
      "pointer", // const void *x
      "i32", // int x_dtype
      "pointer", // const void *w
      "i32", // int w_dtype
      "pointer", // const float *bias (NULL: none)
      "i32", // int n
      "i32", // int k
      "i32", // int m
    ],
    result: "i32",
  },
  iq_rope: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // float *x
      "pointer", // const int32_t *pos
      "pointer", // const float *inv_freq
      "pointer", // const float *pair_scale (NULL: none)
      "i32", // int n
      "i32", // int heads
      "i32", // int head_dim
      "i32", // int scale_heads
      "i32", // int scaled_heads
    ],
    result: "i32",
  },
  iq_swiglu: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // void *out
      "i32", // int out_dtype
      "pointer", // const float *gate
      "pointer", // const float *up
      "i64", // int64_t count
    ],
    result: "i32",
  },
  iq_add: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // float *out
      "pointer", // const float *a
      "pointer", // const float *b
      "i64", // int64_t count
    ],
    result: "i32",
  },

  iq_kv_store: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // void *k_cache
      "pointer", // void *v_cache
      "i32", // int cache_dtype
      "pointer", // const float *k
      "pointer", // const float *v
      "i32", // int n
      "i32", // int pos0
      "i32", // int kv_heads
      "i32", // int head_dim
      "i32", // int cap
    ],
    result: "i32",
  },
  iq_attention_prefill: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // float *out
      "pointer", // const float *q
      "pointer", // const void *k_cache
      "pointer", // const void *v_cache
      "i32", // int cache_dtype
      "i32", // int n
      "i32", // int pos0
      "i32", // int heads
      "i32", // int kv_heads
      "i32", // int head_dim
      "i32", // int cap
      "f32", // float scale
    ],
    result: "i32",
  },
  iq_attention_decode: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // float *out
      "pointer", // const float *q
      "pointer", // const void *k_cache
      "pointer", // const void *v_cache
      "i32", // int cache_dtype
      "i32", // int pos
      "i32", // int heads
      "i32", // int kv_heads
      "i32", // int head_dim
      "i32", // int cap
      "f32", // float scale
    ],
    result: "i32",
  },

  iq_kvq_layout: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // const iq_kvq_params *p
      "buffer", // uint64_t offsets[IQ_KVQ_REGIONS + 1]
    ],
    result: "i32",
  },
  iq_kvq_store: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // const iq_kvq_params *p
      "pointer", // void *layer
      "pointer", // const float *k
      "pointer", // const float *v
      "i32", // int n
      "i32", // int pos0
    ],
    result: "i32",
  },
  iq_kvq_attention: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // const iq_kvq_params *p
      "pointer", // const void *layer
      "pointer", // float *out
      "pointer", // const float *q
      "i32", // int n
      "i32", // int pos0
      "i32", // int heads
      "f32", // float scale
    ],
    result: "i32",
  },
  iq_kvq_dequantize: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "buffer", // const iq_kvq_params *p
      "pointer", // const void *layer
      "pointer", // float *k
      "pointer", // float *v
      "i32", // int len
    ],
    result: "i32",
  },

  iq_sample: {
    parameters: [
      "pointer", // iq_ctx *ctx
      "pointer", // int32_t *out_token
      "pointer", // const float *logits
      "i32", // int vocab
      "pointer", // const int32_t *history
      "i32", // int n_history
      "f32", // float repeat_penalty
      "f32", // float temperature
      "i32", // int top_k
      "f32", // float top_p
      "f32", // float min_p
      "f32", // float uniform
    ],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

export type KernelSymbols = typeof symbols;
