// Sampling settings, the seeded generator behind them, and the device-side state iq_sample needs:
// the chosen token stays on the device (the next step's input), and only its id is read back.
import type { Backend, DeviceBuffer, Slice } from "../../ffi/backend.ts";

export interface SamplingParams {
  /** 0 = greedy. */
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** 0 = off. */
  minP: number;
  /** 1 = off. */
  repeatPenalty: number;
  /** How many recent tokens the repetition penalty looks at. */
  repeatLastN: number;
  seed: number;
}

/** llama.cpp's defaults, so users get what they know. */
export const DEFAULT_SAMPLING: Omit<SamplingParams, "seed"> = {
  temperature: 0.8,
  topK: 40,
  topP: 0.95,
  minP: 0.05,
  repeatPenalty: 1,
  repeatLastN: 64,
};

/** Greedy decoding: the arg max every step (benchmarks and deterministic tests). */
export const GREEDY: SamplingParams = {
  temperature: 0,
  topK: 0,
  topP: 1,
  minP: 0,
  repeatPenalty: 1,
  repeatLastN: 0,
  seed: 0,
};

/** mulberry32: small, fast and seedable; equal seeds give equal draws. */
export class Rng {
  #state: number;
  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** A draw in [0, 1) with 24 bits, exactly representable in fp32 (so it stays < 1 in C). */
  next(): number {
    let t = (this.#state = (this.#state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 8) / 0x1000000;
  }
}

export class Sampler {
  /** The chosen token, int32 on the device. */
  readonly token: DeviceBuffer;
  #history: DeviceBuffer | null;
  #historyHost: Int32Array;
  #seen = 0;
  #rng: Rng;
  #tokenHost = new Int32Array(1);

  constructor(readonly backend: Backend, readonly params: SamplingParams, readonly vocab: number) {
    this.#rng = new Rng(params.seed);
    this.token = backend.alloc(4);
    const n = params.repeatPenalty !== 1 ? Math.max(0, params.repeatLastN) : 0;
    this.#historyHost = new Int32Array(n);
    try {
      this.#history = n > 0 ? backend.alloc(n * 4) : null;
    } catch (err) {
      this.token.close();
      throw err;
    }
  }

  /** Records tokens for the repetition penalty (prompt and generated alike). */
  accept(ids: ArrayLike<number>): void {
    if (!this.#history) return;
    const n = this.#historyHost.length;
    for (let i = 0; i < ids.length; i++) this.#historyHost[(this.#seen + i) % n] = ids[i];
    this.#seen += ids.length;
    this.backend.upload(this.#history, this.#historyHost);
  }

  /** Picks the next token from logits (vocab floats on the device) into `token`, returns its id.
   * Logits with a NaN or no finite largest value throw a NativeError saying which, on either
   * backend (CUDA reports them only in the id, which is read back here anyway). */
  sample(logits: Slice): number {
    const p = this.params;
    this.backend.sample({
      outToken: this.token,
      logits,
      vocab: this.vocab,
      history: this.#history,
      nHistory: Math.min(this.#seen, this.#historyHost.length),
      repeatPenalty: p.repeatPenalty,
      temperature: p.temperature,
      topK: p.topK,
      topP: p.topP,
      minP: p.minP,
      uniform: this.#rng.next(),
    });
    this.backend.download(this.token, this.#tokenHost);
    return this.backend.sampledToken(this.#tokenHost[0]);
  }

  close(): void {
    this.token.close();
    this.#history?.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
