// One decode step of attention at the Llama-3-8B layer shape (32 query heads, 8 KV heads,
// head_dim 128) over a cache of any spec filled to a given length: what `innerq bench --kernels`
// and bench/attention_bench.ts time, the shape the peers in ../shared/peers are measured at.
import type { Backend, DeviceBuffer } from "../../ffi/backend.ts";
import type { KvCache } from "../kv/cache.ts";
import { type KvSpec, makeKvCache } from "../kv/spec.ts";

export const LAYER = { heads: 32, kvHeads: 8, headDim: 128 } as const;
const FILL_ROWS = 4096;

/** `count` rows of kvHeads * headDim floats like a model's keys and values: channels of uneven
 * size, tokens that differ. For filling caches without running a model. */
export function fillRows(count: number, kvHeads: number, headDim: number): Float32Array {
  return new Float32Array(count * kvHeads * headDim).map((_, i) =>
    Math.cos(i * 0.37) * (1 + (i % headDim) / 32)
  );
}

export class AttentionCase {
  readonly cache: KvCache;
  readonly #q: DeviceBuffer;
  readonly #out: DeviceBuffer;

  /** A one-layer cache of `spec` holding `tokens` positions of deterministic rows. */
  constructor(readonly backend: Backend, spec: KvSpec, readonly tokens: number) {
    const { heads, kvHeads, headDim } = LAYER;
    const shape = { layers: 1, heads, kvHeads, headDim, capacity: tokens, chunk: FILL_ROWS };
    this.cache = makeKvCache(backend, shape, spec);
    this.#q = backend.alloc(heads * headDim * 4);
    this.#out = backend.alloc(heads * headDim * 4);
    backend.upload(this.#q, new Float32Array(heads * headDim).map((_, i) => Math.sin(i)));
    const rows = fillRows(FILL_ROWS, kvHeads, headDim);
    using x = backend.alloc(rows.byteLength);
    backend.upload(x, rows);
    for (let p = 0; p < tokens; p += FILL_ROWS) {
      this.cache.store(0, x, x, p, Math.min(FILL_ROWS, tokens - p));
    }
    this.step();
    backend.sync();
  }

  /** Bytes one step reads: the cache of `tokens` positions, metadata included. */
  get bytes(): number {
    return this.cache.bytesPerToken * this.tokens;
  }

  /** One decode step: the query at position tokens - 1 over the whole cache (not waited for). */
  step(): void {
    this.cache.attend(0, this.#q, this.#out, this.tokens - 1, 1);
  }

  close(): void {
    this.cache.close();
    this.#q.close();
    this.#out.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
