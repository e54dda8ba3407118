// Perplexity and the distance of each KV-cache spec's next-token distribution from a reference
// cache's, over the same tokens: windows of `ctx` tokens run through the real cache in chunks (so a
// quantized cache behaves exactly as at generation), every spec chunk by chunk beside the
// reference, its rows compared as they come and then dropped.
import type { KvCache } from "../kv/cache.ts";
import { formatKvSpec, kvCacheBytes, type KvSpec, makeKvCache } from "../kv/spec.ts";
import { gib } from "../model/weights.ts";
import type { Transformer } from "./forward.ts";

/** One evaluation window: tokens start .. end - 1 are fed (the last one only as a target), and
 * targets from .. end - 1 are scored, each predicted from its predecessors in the window. */
export interface Window {
  start: number;
  end: number;
  from: number;
}

/** Windows of `ctx` tokens starting every `stride` tokens until one reaches the end. A token is
 * scored once, in the first window that holds it and a token before it: with stride < ctx the
 * tokens a window shares with the previous one are context only (llama.cpp / Hugging Face style);
 * with stride = ctx the first token of each window after the first has no predecessor there and is
 * not scored. */
export function perplexityWindows(tokens: number, ctx: number, stride: number): Window[] {
  if (!(ctx >= 2 && stride >= 1 && stride <= ctx)) {
    throw new RangeError(`windows need ctx >= 2 and 1 <= stride <= ctx, got ${ctx}, ${stride}`);
  }
  const out: Window[] = [];
  let scoredTo = 1; // targets below this are scored (token 0 never is)
  for (let start = 0; scoredTo < tokens; start += stride) {
    const end = Math.min(start + ctx, tokens);
    const from = Math.max(scoredTo, start + 1);
    if (from < end) out.push({ start, end, from });
    scoredTo = end;
  }
  return out;
}

/** What one spec scored; the reference's own row has KL 0 and top-1 agreement 1. */
export interface SpecScore {
  spec: KvSpec;
  /** Targets scored. */
  tokens: number;
  /** Sum of -log p(target) (natural log). */
  nll: number;
  /** exp(nll / tokens). */
  ppl: number;
  /** Mean over targets of KL(p_reference || p_spec), in nats. */
  meanKl: number;
  /** The 99th percentile of the per-target KL (linear interpolation between order statistics). */
  klP99: number;
  /** Fraction of targets whose argmax equals the reference's. */
  top1: number;
}

export interface PerplexityOptions {
  ctx: number;
  stride: number;
  /** Called after each chunk with targets scored so far (for every spec) and in all. */
  onProgress?: (done: number, total: number) => void;
  /** Stops after the chunk under way (checked between chunks, where the event loop gets a turn);
   * the scores then cover the targets done. */
  signal?: AbortSignal;
}

export interface PerplexityResult {
  scores: SpecScore[];
  /** Windows run (all of them unless interrupted). */
  windows: number;
  /** Targets scored per spec (fewer than planned when interrupted). */
  tokens: number;
  interrupted: boolean;
}

/** log Σ exp(row) in float64, and the row's argmax (first of ties). With `probs`, writes
 * softmax(row) there. */
function logSumExp(row: Float32Array, probs?: Float64Array): { lse: number; argmax: number } {
  let max = -Infinity, argmax = 0;
  for (let i = 0; i < row.length; i++) {
    if (row[i] > max) {
      max = row[i];
      argmax = i;
    }
  }
  let sum = 0;
  if (probs) {
    for (let i = 0; i < row.length; i++) sum += probs[i] = Math.exp(row[i] - max);
    for (let i = 0; i < row.length; i++) probs[i] /= sum;
  } else {
    for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  }
  return { lse: max + Math.log(sum), argmax };
}

/** Σ p_i (log p_i - log q_i) with log p = a - lseA, log q = b - lseB; exactly 0 when a equals b. */
function klDivergence(
  p: Float64Array,
  a: Float32Array,
  lseA: number,
  b: Float32Array,
  lseB: number,
): number {
  let kl = 0;
  for (let i = 0; i < a.length; i++) kl += p[i] * ((a[i] - lseA) - (b[i] - lseB));
  return Math.max(0, kl); // rounding can leave a tiny negative
}

function percentile(values: Float64Array, q: number): number {
  if (values.length === 0) return NaN;
  const sorted = values.slice().sort();
  const at = q * (sorted.length - 1), lo = Math.floor(at), hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo);
}

/** Scores `tokens` with every spec; specs[0] is the reference the others are compared with. Each
 * spec gets its own KV cache (the model's own when its spec is specs[0]), swapped into the model
 * for its turn at each chunk; the model's cache is put back at the end. The model must keep every
 * row's logits (allLogits) and hold ctx tokens (or all of them, when fewer). */
export async function evaluatePerplexity(
  model: Transformer,
  tokens: Int32Array,
  specs: KvSpec[],
  opts: PerplexityOptions,
): Promise<PerplexityResult> {
  if (specs.length === 0) throw new RangeError("evaluatePerplexity needs at least one spec");
  if (!model.allLogits) throw new RangeError("evaluatePerplexity needs a model loaded allLogits");
  const windows = perplexityWindows(tokens.length, opts.ctx, opts.stride);
  if (Math.min(opts.ctx, tokens.length) > model.capacity) {
    throw new RangeError(`windows of ${opts.ctx} tokens exceed the context of ${model.capacity}`);
  }
  const total = windows.reduce((sum, w) => sum + w.end - w.from, 0);
  const backend = model.backend, shape = model.cache.shape, own = model.cache;
  const vocab = model.config.vocabSize, chunk = model.chunk;

  const made: KvCache[] = [];
  const caches: KvCache[] = [];
  try {
    const needed = specs.map((spec, i) =>
      i === 0 && own.spec === formatKvSpec(spec) ? 0 : kvCacheBytes(backend, spec, shape)
    ).reduce((a, b) => a + b, 0);
    if (backend.kind === "cuda" && needed > backend.deviceInfo().freeBytes) {
      const { name, freeBytes } = backend.deviceInfo();
      throw new Error(
        `${specs.length} KV caches of ${shape.capacity} tokens need ${gib(needed)} on ${name}, ` +
          `${gib(freeBytes)} is free: lower --ctx or give fewer --kv`,
      );
    }
    for (const [i, spec] of specs.entries()) {
      if (i === 0 && own.spec === formatKvSpec(spec)) caches.push(own);
      else {
        const cache = makeKvCache(backend, shape, spec);
        made.push(cache);
        caches.push(cache);
      }
    }

    const ref = new Float32Array(chunk * vocab), other = new Float32Array(chunk * vocab);
    const refProbs = new Float64Array(chunk * vocab);
    const refLse = new Float64Array(chunk), refArgmax = new Int32Array(chunk);
    const nll = new Float64Array(specs.length), agree = new Float64Array(specs.length);
    const kl = specs.map(() => new Float64Array(total));
    let done = 0, started = 0, interrupted = false;

    windows: for (const w of windows) {
      const fed = w.end - 1 - w.start; // the last token is only a target
      const firstRow = w.from - 1 - w.start; // the position whose logits predict `from`
      started++;
      for (let p = 0; p < fed; p += chunk) {
        if (opts.signal?.aborted) {
          interrupted = true;
          if (p === 0) started--;
          break windows;
        }
        const n = Math.min(chunk, fed - p), r0 = Math.max(0, firstRow - p);
        const ids = model.stageTokens(tokens.subarray(w.start + p, w.start + p + n));
        for (const [s, cache] of caches.entries()) {
          model.swapCache(cache);
          const logits = model.forward(ids, p, n);
          if (r0 >= n) continue; // context only: every spec's cache still needs the chunk
          const out = s === 0 ? ref : other;
          backend.download(logits, out.subarray(0, n * vocab));
          for (let r = r0; r < n; r++) {
            const row = out.subarray(r * vocab, (r + 1) * vocab);
            const target = tokens[w.start + p + r + 1], k = done + r - r0;
            if (s === 0) {
              const { lse, argmax } = logSumExp(row, refProbs.subarray(r * vocab, (r + 1) * vocab));
              refLse[r] = lse;
              refArgmax[r] = argmax;
              nll[0] += lse - row[target];
              agree[0]++;
              continue;
            }
            const { lse, argmax } = logSumExp(row);
            nll[s] += lse - row[target];
            if (argmax === refArgmax[r]) agree[s]++;
            kl[s][k] = klDivergence(
              refProbs.subarray(r * vocab, (r + 1) * vocab),
              ref.subarray(r * vocab, (r + 1) * vocab),
              refLse[r],
              row,
              lse,
            );
          }
        }
        done += Math.max(0, n - r0);
        opts.onProgress?.(done, total);
        await new Promise((resolve) => setTimeout(resolve, 0)); // let a SIGINT listener run
      }
    }

    const scores = specs.map((spec, s): SpecScore => {
      const values = kl[s].subarray(0, done);
      return {
        spec,
        tokens: done,
        nll: nll[s],
        ppl: Math.exp(nll[s] / done),
        meanKl: values.reduce((a, b) => a + b, 0) / done,
        klP99: percentile(values, 0.99),
        top1: agree[s] / done,
      };
    });
    return { scores, windows: started, tokens: done, interrupted };
  } finally {
    model.swapCache(own);
    for (const cache of made) cache.close();
  }
}
