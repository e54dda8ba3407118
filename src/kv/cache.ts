// The KV-cache policy interface: forward.ts stores each layer's new keys and values through it and
// asks it for attention, so a policy (fp16, innerq, kivi) owns both its layout and its kernels.
import type { Slice } from "../../ffi/backend.ts";

export interface CacheShape {
  layers: number;
  kvHeads: number;
  heads: number;
  headDim: number;
  /** Tokens the cache holds: the context length. */
  capacity: number;
  /** Most tokens one store takes (the forward pass's chunk). */
  chunk: number;
}

export interface KvCache {
  /** The spec it was made from, e.g. "fp16". */
  readonly spec: string;
  readonly shape: CacheShape;
  /** Bytes of cache per token, all layers, metadata included. */
  readonly bytesPerToken: number;
  /** Bytes on top of bytesPerToken * capacity (windows kept in fp16, normalization factors). */
  readonly fixedBytes: number;
  /** Stores keys and values k, v [n, kv_heads * head_dim] (after RoPE) at positions pos0 .. pos0 + n - 1. */
  store(layer: number, k: Slice, v: Slice, pos0: number, n: number): void;
  /** The per-pair factors [kv_heads, head_dim / 2] to multiply q by before attend (iq_rope's
   * pair_scale), valid once position 0 is stored; null when the cache wants q as it is. */
  queryScale(layer: number): Slice | null;
  /** out[n, heads, head_dim] = causal attention of q[n, heads, head_dim] at positions pos0 ..
   * over everything stored up to each query's position. */
  attend(layer: number, q: Slice, out: Slice, pos0: number, n: number): void;
  close(): void;
}
