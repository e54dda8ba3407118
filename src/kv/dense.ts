// The dense cache: keys and values stored as fp16 (the default) or fp32 (reference runs), one
// [kv_heads, capacity, head_dim] buffer per layer for each.
import {
  type Backend,
  type DeviceBuffer,
  DType,
  DTYPE_BYTES,
  type Slice,
} from "../../ffi/backend.ts";
import type { CacheShape, KvCache } from "./cache.ts";

/** Keys and values of every layer, per token. */
export function denseBytesPerToken(
  spec: "fp16" | "fp32",
  shape: Omit<CacheShape, "capacity" | "chunk">,
): number {
  return 2 * shape.layers * shape.kvHeads * shape.headDim * (spec === "fp16" ? 2 : 4);
}

export class DenseKvCache implements KvCache {
  readonly bytesPerToken: number;
  readonly fixedBytes = 0;
  readonly #dtype: typeof DType.F16 | typeof DType.F32;
  readonly #keys: DeviceBuffer[] = [];
  readonly #values: DeviceBuffer[] = [];
  readonly #scale: number;

  constructor(
    readonly backend: Backend,
    readonly shape: CacheShape,
    readonly spec: "fp16" | "fp32",
  ) {
    this.#dtype = spec === "fp16" ? DType.F16 : DType.F32;
    const rowBytes = shape.kvHeads * shape.headDim * DTYPE_BYTES[this.#dtype];
    this.bytesPerToken = denseBytesPerToken(spec, shape);
    this.#scale = 1 / Math.sqrt(shape.headDim);
    try {
      for (let i = 0; i < shape.layers; i++) {
        this.#keys.push(backend.alloc(rowBytes * shape.capacity));
        this.#values.push(backend.alloc(rowBytes * shape.capacity));
      }
    } catch (err) {
      this.close();
      throw err;
    }
  }

  /** A layer's two caches and their shape, as kvStore and attention take them. */
  #caches(layer: number) {
    const { kvHeads, headDim, capacity } = this.shape;
    const [kCache, vCache] = [this.#keys[layer], this.#values[layer]];
    return { kCache, vCache, cacheDtype: this.#dtype, kvHeads, headDim, cap: capacity };
  }

  store(layer: number, k: Slice, v: Slice, pos0: number, n: number): void {
    this.backend.kvStore({ ...this.#caches(layer), k, v, n, pos0 });
  }

  queryScale(): null {
    return null;
  }

  attend(layer: number, q: Slice, out: Slice, pos0: number, n: number): void {
    const args = {
      ...this.#caches(layer),
      out,
      q,
      pos0,
      n,
      heads: this.shape.heads,
      scale: this.#scale,
    };
    if (n === 1) this.backend.attentionDecode(args);
    else this.backend.attentionPrefill(args);
  }

  close(): void {
    for (const b of [...this.#keys, ...this.#values]) b.close();
    this.#keys.length = this.#values.length = 0;
  }
}
