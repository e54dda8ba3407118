// Greedy generation for evaluations whose prompts share a prefix (few-shot exemplars): the prefix
// is prefilled once per KV cache and every prompt continues from it, with exactly the result a
// from-scratch prefill of the whole prompt gives.
//
// Where a prompt continues from: the last multiple of the model's chunk within the shared prefix,
// R. A from-scratch prefill (engine/generate.ts) runs chunks [0, chunk), [chunk, 2 chunk), ...;
// continuing from R runs the same chunks from R on, so every kernel call sees the same inputs as
// from scratch, on every backend (a split elsewhere could change rounding where prefill and decode
// kernels differ, and the quantized caches compute the key normalization from the first chunk
// stored). The price: fewer than `chunk` prefix tokens are prefilled again per prompt.
//
// What a cache needs to continue from R after a prompt wrote positions >= R:
// - dense (fp16, fp32): nothing. A query reads positions up to its own, and every position >= R is
//   stored again before a query reads it.
// - quantized (innerq, kivi; kernels/innerq.h): the key normalization (set by the store of
//   position 0), the sink rows and the quantized blocks below R's block are never written again;
//   the block holding R and later blocks are quantized again, from the ring, when a prompt
//   completes them, before any query can see them quantized. The fp16 ring is not safe: position x
//   is in slot (x - sink) % ring, so a prompt of more than about `chunk` tokens overwrites rows of
//   positions < R that later queries read in fp16 (and that the block holding R is quantized from).
//   So the rings (about recent + block + chunk rows per KV head and layer) are copied to the host
//   after the prefix and uploaded again before each prompt.
// - any other cache: no reuse; every prompt is prefilled from position 0.
import type { Slice } from "../../ffi/backend.ts";
import type { KvCache } from "../kv/cache.ts";
import { DenseKvCache } from "../kv/dense.ts";
import { QuantizedKvCache } from "../kv/quantized.ts";
import { decodeOneToken, type StopReason } from "../engine/generate.ts";
import type { Transformer } from "../engine/forward.ts";
import { GREEDY, Sampler } from "../engine/sampler.ts";
import { StopMatcher, StreamDecoder, type TextTokenizer } from "../tokenizer.ts";

/** Puts back what later stores overwrite of a cache holding a prefix. */
export interface PrefixSnapshot {
  restore(): void;
}

/** Whether a cache can continue from a prefix it holds (the kinds above). */
export function canContinue(cache: KvCache): boolean {
  return cache instanceof DenseKvCache || cache instanceof QuantizedKvCache;
}

/** A snapshot of what `cache` needs to continue from the prefix it holds now; null for a cache
 * that cannot continue from a prefix (the caller then prefills every prompt from 0). */
export function snapshotPrefix(cache: KvCache): PrefixSnapshot | null {
  if (cache instanceof DenseKvCache) return { restore() {} };
  if (cache instanceof QuantizedKvCache) {
    const { ringK, codesK } = cache.layout.offsets; // ringK, ringV (each 256-aligned), then codes
    const saved: { slice: Slice; bytes: Uint8Array }[] = [];
    for (let l = 0; l < cache.shape.layers; l++) {
      const slice = cache.layerBuffer(l).slice(ringK, codesK - ringK);
      const bytes = new Uint8Array(slice.bytes);
      cache.backend.download(slice, bytes);
      saved.push({ slice, bytes });
    }
    return {
      restore() {
        for (const { slice, bytes } of saved) cache.backend.upload(slice, bytes);
      },
    };
  }
  return null;
}

/** The longest common prefix of two token arrays. */
export function commonPrefix(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

export interface GreedyOptions {
  /** Most tokens to generate. */
  maxTokens: number;
  /** Token ids that end generation (not part of the output). */
  eosTokenIds: number[];
  /** Strings that end generation; the output is cut before the first one. */
  stops: string[];
}

export interface GreedyResult {
  /** Generated ids, the one that completed a stop string included, an end-of-sequence id not. */
  tokens: number[];
  /** The decoded output, cut before the first stop string. */
  text: string;
  stopReason: Exclude<StopReason, "interrupted">;
  /** Prompt tokens taken from the prefix, and prefilled for this prompt. */
  reused: number;
  prefilled: number;
}

interface PrefixState {
  snapshot: PrefixSnapshot | null;
  /** The cache holds the prefix as the snapshot left it (false until first used, or after a
   * prompt ran from 0 over it). */
  valid: boolean;
}

/** Greedy generation over prompts that share `prefix` (token ids), through whatever cache the model
 * holds at each call: a cache seen for the first time gets the prefix prefilled and snapshotted,
 * later calls restore it and prefill only what follows. */
export class PrefixRunner {
  readonly sampler: Sampler;
  /** The prefix tokens a prompt continues from: a multiple of the model's chunk. */
  readonly reusable: number;
  #states = new Map<KvCache, PrefixState>();
  #eos: Set<number>;
  #lastYield = performance.now();

  constructor(
    readonly model: Transformer,
    readonly tokenizer: TextTokenizer,
    readonly prefix: Int32Array,
    readonly opts: GreedyOptions,
  ) {
    this.sampler = new Sampler(model.backend, GREEDY, model.config.vocabSize);
    this.#eos = new Set(opts.eosTokenIds);
    // keep one token back: it may merge with the text after it (a prompt's lcp with the prefix
    // is then one shorter), and a prompt must have at least one token of its own to prefill
    this.reusable = Math.floor(Math.max(0, prefix.length - 1) / model.chunk) * model.chunk;
  }

  /** Prompt tokens a prompt of these ids takes from the prefix, through the model's cache now. */
  reuseFor(ids: Int32Array): number {
    const r = this.reusable;
    const ok = r > 0 && r < ids.length && canContinue(this.model.cache);
    return ok && commonPrefix(ids, this.prefix) >= r ? r : 0;
  }

  /** Generates from `ids` greedily; null when `signal` aborts first. Yields to the event loop now
   * and then (so a SIGINT listener can abort). */
  async run(ids: Int32Array, signal?: AbortSignal): Promise<GreedyResult | null> {
    const model = this.model, chunk = model.chunk;
    if (ids.length === 0) throw new RangeError("the prompt is empty");
    if (ids.length >= model.capacity) {
      throw new RangeError(
        `the prompt has ${ids.length} tokens; the context holds ${model.capacity} (raise --ctx)`,
      );
    }
    let state = this.#states.get(model.cache);
    if (!state) this.#states.set(model.cache, state = { snapshot: null, valid: false });
    const from = this.reuseFor(ids);
    if (from === 0) {
      state.valid = false; // this prompt overwrites the prefix from position 0
    } else if (state.valid) {
      state.snapshot!.restore();
    } else {
      for (let pos = 0; pos < from; pos += chunk) {
        const part = this.prefix.subarray(pos, Math.min(pos + chunk, from));
        model.forward(model.stageTokens(part), pos, part.length);
      }
      state.snapshot = snapshotPrefix(model.cache);
      state.valid = true;
    }

    let logits = null;
    for (let pos = from; pos < ids.length; pos += chunk) {
      const part = ids.subarray(pos, pos + chunk);
      logits = model.forward(model.stageTokens(part), pos, part.length);
    }
    let token = this.sampler.sample(logits!);

    const decoder = new StreamDecoder(this.tokenizer, { skipSpecialTokens: true });
    const stops = new StopMatcher(this.opts.stops);
    const tokens: number[] = [];
    let text = "", pos = ids.length, stopReason: GreedyResult["stopReason"];
    for (;;) {
      if (this.#eos.has(token)) {
        stopReason = "eos";
        break;
      }
      tokens.push(token);
      const { emit, stopped } = stops.push(decoder.push(token));
      text += emit;
      if (stopped) {
        stopReason = "stop";
        break;
      }
      if (tokens.length >= this.opts.maxTokens) {
        stopReason = "length";
        break;
      }
      if (pos >= model.capacity) {
        stopReason = "context";
        break;
      }
      if (performance.now() - this.#lastYield > 50) {
        await new Promise((resolve) => setTimeout(resolve, 0));
        this.#lastYield = performance.now();
      }
      if (signal?.aborted) return null;
      token = decodeOneToken(model, this.sampler, pos++);
    }
    if (stopReason !== "stop") text += stops.push(decoder.flush()).emit + stops.flush();
    return { tokens, text, stopReason, reused: from, prefilled: ids.length - from };
  }

  close(): void {
    this.sampler.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
