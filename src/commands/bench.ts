// `innerq bench`: llama-bench-style throughput of a model (prompt processing ppN and generation tgN
// at several context depths), and with --kernels the decode-attention and GEMV kernels alone at
// the Llama-3-8B layer shape, as achieved GB/s against the bytes each must read.
import { parseArgs } from "node:util";
import type { Backend } from "../../ffi/backend.ts";
import { DType } from "../../ffi/backend.ts";
import { Transformer } from "../engine/forward.ts";
import { GREEDY, Sampler } from "../engine/sampler.ts";
import { loadConfig } from "../model/config.ts";
import { parseKvSpec, shortKvSpec } from "../kv/spec.ts";
import { AttentionCase, fillRows } from "./attention_case.ts";
import { OpProfile, type OpTime } from "../engine/op_profile.ts";
import {
  defaultModel,
  deviceFlag,
  EXIT,
  formatCount,
  intFlag,
  kvSpecFlag,
  openBackend,
  UsageError,
} from "./common.ts";

export const BENCH_HELP = `innerq bench: measure prompt processing and generation speed

Usage: innerq bench [options]
  -m, --model DIR       model directory (default: as for generate)
  -p, --prompt LIST     prompt lengths to time, comma-separated (default 512; 0: none)
  -n, --gen N           tokens to generate per tg test (default 128)
  -d, --depth LIST      context depths the tests start at (default 0)
  -r, --repeats N       repetitions of each test (default 3)
      --chunk N         most tokens per forward call in prompt processing (default: the
                        longest prompt or depth to prefill, at most 4096)
      --kv SPEC         KV cache (default fp16)
      --fill MODE       how the context at each depth is made: prefill (default: the model runs
                        over depth tokens) or direct (every layer's cache is stored synthetic
                        keys and values without running the model: for depths whose prefill
                        would take too long; tg speed does not depend on the values)
      --device D        auto (default), cuda or cpu
  -t, --threads N       CPU threads
      --kernels         time the decode attention (32 heads, 8 KV heads, head_dim 128, fp16
                        cache, 1k to 1M tokens, or the --depth list) and GEMV kernels
                        instead of a model: the device's time, batches of calls run back
                        to back (the host's time to issue them left out, as in a model)
      --host-clock      with --kernels: time on the host's clock instead, issuing included
                        (also where launches are serialized, as under ncu)
      --profile         time every kernel call on its own (the device waited for before and
                        after each) and print where each test spent its time, per op; the
                        waits make a profiled run slower than a plain one
      --json            one JSON object per row instead of the table
  -h, --help            this help

Rows: ppN = prompt processing of N tokens, tgN = generating N tokens one at a time (forward,
sampling and the token id back to the host), each after "depth" tokens already in the cache.
t/s is mean ± standard deviation over the repeats; GB/s for tg is (weights + KV cache read per
token) x tokens/s. Exit codes: 0 done, 1 error, 2 bad command line.
`;

const OPTIONS = {
  model: { type: "string", short: "m" },
  prompt: { type: "string", short: "p" },
  gen: { type: "string", short: "n" },
  depth: { type: "string", short: "d" },
  repeats: { type: "string", short: "r" },
  chunk: { type: "string" },
  kv: { type: "string" },
  fill: { type: "string" },
  device: { type: "string" },
  threads: { type: "string", short: "t" },
  kernels: { type: "boolean" },
  "host-clock": { type: "boolean" },
  profile: { type: "boolean" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

function listFlag(
  name: string,
  value: string | undefined,
  fallback: number[],
  min: number,
): number[] {
  if (value === undefined) return fallback;
  return value.split(",").map((part) => intFlag(name, part.trim(), min)!);
}

interface Row {
  test: string;
  depth: number;
  tokensPerSecond: number[];
  gbPerSecond?: number;
  /** with --profile: seconds per op over the row's repeats */
  profile?: OpTime[];
}

function mean(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

function stddev(xs: number[]): number {
  const m = mean(xs);
  return xs.length > 1 ? Math.sqrt(xs.reduce((a, x) => a + (x - m) ** 2, 0) / (xs.length - 1)) : 0;
}

/** Seconds taken by fn, after the device has finished its work. */
function timed(backend: Backend, fn: () => void): number {
  backend.sync();
  const start = performance.now();
  fn();
  backend.sync();
  return (performance.now() - start) / 1000;
}

/** Runs tokens through the model from `pos` in chunks; returns nothing, the cache fills. */
function prefillAt(model: Transformer, ids: Int32Array, pos: number): void {
  for (let i = 0; i < ids.length; i += model.chunk) {
    const chunk = ids.subarray(i, i + model.chunk);
    model.forward(model.stageTokens(chunk), pos + i, chunk.length);
  }
}

/** Stores `depth` positions of synthetic rows in every layer's cache without running the model. */
function fillDirect(model: Transformer, depth: number): void {
  const { layers, kvHeads, headDim } = model.cache.shape, be = model.backend;
  using x = be.alloc(model.chunk * kvHeads * headDim * 4);
  be.upload(x, fillRows(model.chunk, kvHeads, headDim));
  for (let l = 0; l < layers; l++) {
    for (let p = 0; p < depth; p += model.chunk) {
      model.cache.store(l, x, x, p, Math.min(model.chunk, depth - p));
    }
  }
}

async function benchModel(
  v: ReturnType<typeof parse>["values"],
  emit: (r: Row) => void,
): Promise<string> {
  const prompts = listFlag("prompt", v.prompt, [512], 0).filter((p) => p > 0);
  if (v.fill !== undefined && v.fill !== "prefill" && v.fill !== "direct") {
    throw new UsageError(`--fill must be prefill or direct, got ${JSON.stringify(v.fill)}`);
  }
  const direct = v.fill === "direct";
  const gen = intFlag("gen", v.gen, 0) ?? 128;
  const depths = listFlag("depth", v.depth, [0], 0);
  const repeats = intFlag("repeats", v.repeats, 1) ?? 3;
  const kv = kvSpecFlag(v.kv ?? "fp16");
  const dir = v.model ?? await defaultModel(v.json ?? false);
  const config = await loadConfig(dir);
  const ctx = Math.max(...depths) + Math.max(...prompts, gen) + 1;
  // the longest prompt (or depth to prefill) in one call up to 4096 tokens: big GEMMs run fastest
  const longest = Math.max(...prompts, ...(direct ? [] : depths), 1);
  const chunk = intFlag("chunk", v.chunk, 1) ?? Math.min(4096, longest);
  using backend = openBackend(
    deviceFlag(v.device),
    intFlag("threads", v.threads, 1),
    v.json ?? false,
  );
  const profile = v.profile ? new OpProfile(backend) : null;
  const be = profile?.backend ?? backend;
  using model = await Transformer.load(be, dir, config, { ctx, kv, chunk });
  using sampler = new Sampler(be, GREEDY, config.vocabSize);
  const tokens = (n: number) =>
    Int32Array.from({ length: n }, (_, i) => (i * 7919 + 13) % config.vocabSize);
  const title =
    `${dir.split("/").filter(Boolean).pop()} (${formatCount(model.weights.params)} params, ` +
    `${config.dtype}) on ${backend.deviceInfo().name}, kv ${model.cache.spec}, chunk ${chunk}` +
    (direct ? ", contexts stored directly (no prefill)" : "");

  for (const depth of depths) {
    if (depth > 0) { // the context the tests start from
      if (direct) fillDirect(model, depth);
      else prefillAt(model, tokens(depth), 0);
    }
    for (const p of prompts) {
      const ids = tokens(p); // made outside the timed region
      prefillAt(model, ids, depth); // warm-up
      const rates = [];
      profile?.reset();
      for (let r = 0; r < repeats; r++) {
        rates.push(p / timed(backend, () => prefillAt(model, ids, depth)));
      }
      emit({ test: `pp${p}`, depth, tokensPerSecond: rates, profile: profile?.times() });
    }
    if (gen > 0) {
      const rates = [];
      sampler.sample(model.forward(model.stageTokens(tokens(1)), depth, 1)); // warm-up; the first input
      profile?.reset();
      for (let r = 0; r < repeats; r++) {
        rates.push(
          gen / timed(backend, () => {
            for (let i = 0; i < gen; i++) {
              sampler.sample(model.forward(sampler.token, depth + i, 1));
            }
          }),
        );
      }
      const bytes = model.weights.decodeBytes + model.cache.bytesPerToken * (depth + gen / 2);
      emit({
        test: `tg${gen}`,
        depth,
        tokensPerSecond: rates,
        gbPerSecond: (bytes * mean(rates)) / 1e9,
        profile: profile?.times(),
      });
    }
  }
  return title;
}

/** Specs `bench --kernels` times when --kv names none. */
const KERNEL_SPECS = [
  "fp16",
  "innerq:k4v4",
  "innerq:k4v2",
  "innerq:k2v2",
  "innerq:k2v2,kaxis=channels",
  "kivi:k4v4",
  "kivi:k2v2",
];

function benchKernels(v: ReturnType<typeof parse>["values"], emit: (r: Row) => void): string {
  const repeats = intFlag("repeats", v.repeats, 1) ?? 3;
  const specs = (v.kv ? [v.kv] : KERNEL_SPECS).map(kvSpecFlag);
  using backend = openBackend(
    deviceFlag(v.device),
    intFlag("threads", v.threads, 1),
    v.json ?? false,
  );
  const iterations = backend.kind === "cuda" ? 200 : 3;
  const time = (fn: () => void) => v["host-clock"] ? timed(backend, fn) : backend.timeQueued(fn);
  const lengths = listFlag(
    "depth",
    v.depth,
    backend.kind === "cuda" ? [1024, 4096, 32768, 131072, 1048576] : [4096, 32768],
    1,
  );
  for (const tokens of lengths) {
    for (const spec of specs) {
      using attention = new AttentionCase(backend, spec, tokens);
      // one untimed batch first: clocks ramp up and caches warm, as every later batch sees them;
      // then the device's time for each batch, queued while held (Backend.timeQueued)
      const batch = () => {
        for (let i = 0; i < iterations; i++) attention.step();
      };
      time(batch);
      const seconds = [];
      for (let r = 0; r < repeats; r++) seconds.push(time(batch) / iterations);
      emit({
        test: `attn ${shortKvSpec(parseKvSpec(attention.cache.spec))} (us)`,
        depth: tokens,
        tokensPerSecond: seconds.map((s) => s * 1e6),
        gbPerSecond: attention.bytes / mean(seconds) / 1e9,
      });
    }
  }
  const gemvs = [[4096, 14336], [14336, 4096], [4096, 128256]].slice(
    0,
    backend.kind === "cuda" ? 3 : 2,
  );
  for (const [kIn, mOut] of gemvs) {
    using w = backend.alloc(kIn * mOut * 2);
    // real data: untouched pages would read as one shared zero page and flatter the CPU
    backend.upload(w, new Uint16Array(kIn * mOut).map((_, i) => 0x3c00 + (i & 0xff)));
    using xv = backend.alloc(kIn * 4);
    using y = backend.alloc(mOut * 4);
    backend.upload(xv, new Float32Array(kIn).fill(0.01));
    backend.matmul(y, xv, DType.F32, w, DType.BF16, null, 1, kIn, mOut);
    const seconds = [];
    for (let r = 0; r < repeats; r++) {
      seconds.push(
        time(() => {
          for (let i = 0; i < iterations; i++) {
            backend.matmul(y, xv, DType.F32, w, DType.BF16, null, 1, kIn, mOut);
          }
        }) / iterations,
      );
    }
    emit({
      test: `gemv bf16 ${mOut}x${kIn} (us)`,
      depth: 0,
      tokensPerSecond: seconds.map((s) => s * 1e6),
      gbPerSecond: (kIn * mOut * 2) / mean(seconds) / 1e9,
    });
  }
  return `kernels on ${backend.deviceInfo().name}; attention: one decode step of a Llama-3-8B ` +
    `layer (32 heads, 8 KV heads, head_dim 128); ${
      v["host-clock"] ? "host" : "device"
    } time per call; GB/s = cache bytes incl. metadata / time`;
}

function parse(args: string[]) {
  try {
    return parseArgs({ args, options: OPTIONS, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** Where a profiled test spent its time: ms per repeat and share, per op. */
function printProfile(r: Row): void {
  const ops = r.profile!, total = ops.reduce((a, t) => a + t.seconds, 0);
  const repeats = r.tokensPerSecond.length;
  console.log(`\n${r.test} at depth ${r.depth}, per repeat (kernel calls timed one by one):\n`);
  console.log(`| ${"op".padEnd(24)} | ${"calls".padStart(7)} | ${"ms".padStart(9)} | share |`);
  console.log(`| ${"-".repeat(24)} | ${"-".repeat(7)}:| ${"-".repeat(9)}:| -----:|`);
  for (const t of ops) {
    const ms = (t.seconds / repeats * 1e3).toFixed(3), share = (100 * t.seconds / total).toFixed(1);
    console.log(
      `| ${t.op.padEnd(24)} | ${String(t.calls / repeats).padStart(7)} | ${ms.padStart(9)} | ${
        share.padStart(5)
      } |`,
    );
  }
}

export async function runBench(args: string[]): Promise<number> {
  const { values: v } = parse(args);
  if (v.help) {
    console.log(BENCH_HELP);
    return EXIT.ok;
  }
  if (v["host-clock"] && !v.kernels) throw new UsageError("--host-clock times --kernels only");
  const rows: Row[] = [];
  const emit = (r: Row) => {
    rows.push(r);
    if (v.json) {
      console.log(
        JSON.stringify({ ...r, mean: mean(r.tokensPerSecond), stddev: stddev(r.tokensPerSecond) }),
      );
    } else console.error(`innerq: ${r.test} at depth ${r.depth} done`);
  };
  let title: string;
  try {
    title = v.kernels ? benchKernels(v, emit) : await benchModel(v, emit);
  } catch (e) {
    if (e instanceof RangeError) throw new UsageError(e.message);
    throw e;
  }
  if (!v.json) {
    const unit = v.kernels ? "us" : "t/s";
    console.log(`${title}\n`);
    console.log(
      `| ${"test".padEnd(28)} | ${"depth".padStart(8)} | ${unit.padStart(20)} | ${
        "GB/s".padStart(8)
      } |`,
    );
    console.log(`| ${"-".repeat(28)} | ${"-".repeat(8)}:| ${"-".repeat(20)}:| ${"-".repeat(8)}:|`);
    for (const r of rows) {
      const rate = `${mean(r.tokensPerSecond).toFixed(2)} ± ${
        stddev(r.tokensPerSecond).toFixed(2)
      }`;
      const gb = r.gbPerSecond === undefined ? "" : r.gbPerSecond.toFixed(1);
      console.log(
        `| ${r.test.padEnd(28)} | ${String(r.depth).padStart(8)} | ${rate.padStart(20)} | ${
          gb.padStart(8)
        } |`,
      );
    }
    for (const r of rows.filter((r) => r.profile)) printProfile(r);
  }
  return EXIT.ok;
}
