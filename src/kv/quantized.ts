// The quantized caches (InnerQ and the KIVI-style baseline): per layer one buffer laid out by the
// kernel library (kernels/innerq.h: fp16 sink | quantized region | fp16 recent ring, and the keys'
// normalization), filled by iq_kvq_store and read by iq_kvq_attention.
import type { Backend, DeviceBuffer, KvqLayout, KvqParams, Slice } from "../../ffi/backend.ts";
import { kvqBlock } from "../../ffi/backend.ts";
import type { CacheShape, KvCache } from "./cache.ts";
import { formatKvSpec, kvBytesPerToken, kvqOptions, type QuantSpec } from "./spec.ts";

/** The kernel library's parameters for a spec and cache shape. */
export function kvqParams(spec: QuantSpec, shape: CacheShape): KvqParams {
  const params = {
    kvHeads: shape.kvHeads,
    headDim: shape.headDim,
    cap: shape.capacity,
    ...kvqOptions(spec),
    ring: 0,
  };
  // the ring holds the recent window, the block about to leave it, and one store's tokens
  params.ring = spec.recent + kvqBlock(params) + shape.chunk - 1;
  return params;
}

export class QuantizedKvCache implements KvCache {
  readonly spec: string;
  readonly bytesPerToken: number;
  readonly fixedBytes: number;
  readonly layout: KvqLayout;
  readonly #layers: DeviceBuffer[] = [];
  readonly #scale: number;
  readonly #normalized: boolean;

  constructor(readonly backend: Backend, readonly shape: CacheShape, spec: QuantSpec) {
    this.spec = formatKvSpec(spec);
    this.layout = backend.kvqLayout(kvqParams(spec, shape));
    this.bytesPerToken = kvBytesPerToken(spec, shape);
    this.fixedBytes = Math.max(
      0,
      this.layout.bytes * shape.layers - this.bytesPerToken * shape.capacity,
    );
    this.#scale = 1 / Math.sqrt(shape.headDim);
    this.#normalized = spec.norm !== "off";
    try {
      for (let i = 0; i < shape.layers; i++) this.#layers.push(backend.alloc(this.layout.bytes));
    } catch (err) {
      this.close();
      throw err;
    }
  }

  store(layer: number, k: Slice, v: Slice, pos0: number, n: number): void {
    this.backend.kvqStore(this.layout, this.#layers[layer], k, v, n, pos0);
  }

  queryScale(layer: number): Slice | null {
    if (!this.#normalized) return null;
    const bytes = this.shape.kvHeads * this.shape.headDim / 2 * 4;
    return this.#layers[layer].slice(this.layout.offsets.keyScale, bytes);
  }

  attend(layer: number, q: Slice, out: Slice, pos0: number, n: number): void {
    const buf = this.#layers[layer];
    this.backend.kvqAttention(this.layout, buf, out, q, n, pos0, this.shape.heads, this.#scale);
  }

  /** The layer's buffer, for tests that compare backends byte for byte. */
  layerBuffer(layer: number): DeviceBuffer {
    return this.#layers[layer];
  }

  close(): void {
    for (const b of this.#layers) b.close();
    this.#layers.length = 0;
  }
}
