// Generation in four verbs, after gpt-fast: prefill, decodeOneToken, decodeTokens (inside generate),
// generate. The decode loop reads one token id back from the device per step and nothing else.
import type { Sampler } from "./sampler.ts";
import type { Transformer } from "./forward.ts";

export type StopReason = "eos" | "length" | "context" | "stop" | "interrupted";

/** Timings and counts of one generation, filled in as it runs. */
export class GenerationStats {
  promptTokens = 0;
  prefillMs = 0;
  /** From the start of prefill until the first token's id is on the host. */
  firstTokenMs = 0;
  decodeTokens = 0;
  decodeMs = 0;
  stopReason: StopReason = "length";

  get prefillTokensPerSecond(): number {
    return this.prefillMs > 0 ? (this.promptTokens * 1000) / this.prefillMs : 0;
  }

  get decodeTokensPerSecond(): number {
    return this.decodeMs > 0 ? (this.decodeTokens * 1000) / this.decodeMs : 0;
  }
}

export interface GenerateOptions {
  /** Most tokens to generate. */
  maxTokens: number;
  /** Token ids that end generation (not emitted). */
  eosTokenIds: number[];
  signal?: AbortSignal;
}

/** Runs the prompt through the model in chunks and samples the first new token. */
export function prefill(
  model: Transformer,
  promptIds: Int32Array,
  sampler: Sampler,
  signal?: AbortSignal,
): number | null {
  if (promptIds.length === 0) throw new RangeError("the prompt is empty: give at least one token");
  if (promptIds.length >= model.capacity) {
    throw new RangeError(
      `the prompt has ${promptIds.length} tokens; the context holds ${model.capacity} (raise --ctx)`,
    );
  }
  sampler.accept(promptIds);
  let logits = null;
  for (let pos = 0; pos < promptIds.length; pos += model.chunk) {
    if (signal?.aborted) return null;
    const ids = promptIds.subarray(pos, pos + model.chunk);
    logits = model.forward(model.stageTokens(ids), pos, ids.length);
  }
  return sampler.sample(logits!);
}

/** One decode step: the last sampled token (already on the device) at `pos` in, the next id out. */
export function decodeOneToken(model: Transformer, sampler: Sampler, pos: number): number {
  const logits = model.forward(sampler.token, pos, 1);
  return sampler.sample(logits);
}

/** Streams generated token ids; stats are filled in as it goes. The consumer may stop early. */
export async function* generate(
  model: Transformer,
  promptIds: Int32Array,
  sampler: Sampler,
  opts: GenerateOptions,
  stats = new GenerationStats(),
): AsyncGenerator<number> {
  const eos = new Set(opts.eosTokenIds);
  stats.promptTokens = promptIds.length;
  const start = performance.now();
  let token = prefill(model, promptIds, sampler, opts.signal);
  stats.prefillMs = stats.firstTokenMs = performance.now() - start;
  let pos = promptIds.length;
  for (let produced = 0; token !== null; produced++) {
    if (eos.has(token)) {
      stats.stopReason = "eos";
      return;
    }
    sampler.accept([token]);
    yield token;
    if (opts.signal?.aborted) break;
    if (produced + 1 >= opts.maxTokens) {
      stats.stopReason = "length";
      return;
    }
    if (pos >= model.capacity) {
      stats.stopReason = "context";
      return;
    }
    const stepStart = performance.now();
    token = decodeOneToken(model, sampler, pos++);
    stats.decodeMs += performance.now() - stepStart;
    stats.decodeTokens++;
  }
  stats.stopReason = "interrupted";
}
