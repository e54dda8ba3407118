// `innerq ppl`: perplexity of a text, and what each KV-cache spec costs against the fp16 cache
// (KL divergence of the next-token distribution, top-1 agreement), for several specs in one run.
import { parseArgs } from "node:util";
import { Transformer } from "../engine/forward.ts";
import { evaluatePerplexity, type SpecScore } from "../engine/perplexity.ts";
import { loadConfig } from "../model/config.ts";
import { checkKvSpec, formatKvSpec, kvBytesPerToken, type KvSpec } from "../kv/spec.ts";
import { TextTokenizer } from "../tokenizer.ts";
import {
  deviceFlag,
  etaProgress,
  EXIT,
  formatBytes,
  intFlag,
  kvSpecFlag,
  openBackend,
  progressBar,
  UsageError,
} from "./common.ts";

export const PPL_HELP =
  `innerq ppl: perplexity, and each KV-cache spec's distance from the fp16 cache

Usage: innerq ppl --model DIR --file TEXT [--kv SPEC ...] [options]
The text is tokenized once (with the tokenizer's special tokens, e.g. BOS, at its start) and cut in
windows of --ctx tokens starting every --stride tokens; in each window every token is predicted from
its predecessors in that window, through the real KV cache in prefill chunks, so a quantized cache
behaves exactly as at generation. A token is scored once, in the first window that holds it and a
token before it: tokens a window shares with the previous one (stride < ctx) are context only,
as in llama.cpp and Hugging Face; with stride = ctx (non-overlapping windows) the first token of
each window after the first is not scored.

Every spec runs over the same tokens. fp16 runs first as the reference (added when not given);
against it each spec reports the mean KL divergence KL(p_fp16 || p_spec) of the next-token
distribution (nats), its 99th percentile and top-1 agreement (same argmax), computed in float64.

Options
  -m, --model DIR        Hugging Face model directory (required)
  -f, --file TEXT        the text to score, e.g. ../shared/data/wikitext-2/test.txt (required)
      --kv SPEC          a KV cache to score (repeatable): fp32, innerq:k4v2[,opts], kivi:k2v2[,opts]
                         (see innerq info --help and docs/kv-cache.md)
  -c, --ctx N            tokens per window, >= 2 (default 1024)
      --stride N         tokens between window starts, 1..ctx (default: ctx, non-overlapping)
      --limit N          use only the first N tokens of the text (default: all)
      --device D         auto (default: CUDA when present), cuda or cpu
  -t, --threads N        CPU threads (default: all cores)
      --json             one JSON object instead of the table
      --plot FILE.svg    also write a chart (SVG): mean KL against bytes per token, one labelled
                         mark per spec, log-scale KL
  -q, --quiet            no progress or notices on stderr
  -h, --help             this help

Output: a table on stdout, one row per spec: bits per cached element and bytes per token (codes and
(scale, offset) metadata; the fp16 sink and recent window are a fixed cost on top), perplexity and
its change from fp16, mean KL, KL p99, top-1 agreement. Progress with an ETA goes to stderr.
--plot writes its file after the table (the path is checked for writing before the run).

Exit codes: 0 done, 1 error (unreadable text or model files, native failure), 2 bad command line,
130 interrupted by Ctrl-C (the table, and the plot, cover the tokens scored so far).
`;

const OPTIONS = {
  model: { type: "string", short: "m" },
  file: { type: "string", short: "f" },
  kv: { type: "string", multiple: true },
  ctx: { type: "string", short: "c" },
  stride: { type: "string" },
  limit: { type: "string" },
  device: { type: "string" },
  threads: { type: "string", short: "t" },
  json: { type: "boolean" },
  plot: { type: "string" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
} as const;

interface Row {
  /** The spec as given on the command line. */
  text: string;
  spec: KvSpec;
}

/** The rows to run: fp16 first (the reference), then every other --kv in the order given. */
function specRows(given: string[]): Row[] {
  const rows: Row[] = [{ text: "fp16", spec: { kind: "fp16" } }];
  for (const text of given) {
    const spec = kvSpecFlag(text);
    if (formatKvSpec(spec) !== "fp16") rows.push({ text, spec });
  }
  return rows;
}

function formatKl(x: number): string {
  if (!Number.isFinite(x)) return "-";
  if (x === 0) return "0";
  return x < 1e-3 ? x.toExponential(2) : x.toFixed(4);
}

const round = (x: number, digits: number) => Number(x.toPrecision(digits));

export async function runPpl(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args, options: OPTIONS, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values;
  if (v.help) {
    console.log(PPL_HELP);
    return EXIT.ok;
  }
  if (v.model === undefined) throw new UsageError("ppl needs --model DIR");
  if (v.file === undefined) throw new UsageError("ppl needs --file TEXT (the text to score)");
  const ctx = intFlag("ctx", v.ctx, 2) ?? 1024;
  const stride = intFlag("stride", v.stride, 1) ?? ctx;
  if (stride > ctx) {
    throw new UsageError(`--stride ${stride} exceeds --ctx ${ctx}: windows would skip tokens`);
  }
  const limit = intFlag("limit", v.limit, 2);
  const threads = intFlag("threads", v.threads, 1);
  const device = deviceFlag(v.device);
  const rows = specRows(v.kv ?? []);
  const quiet = (v.quiet ?? false) || (v.json ?? false);

  let text;
  try {
    text = await Deno.readTextFile(v.file);
  } catch (e) {
    throw new Error(`--file ${v.file}: cannot read (${(e as Error).message})`);
  }
  if (v.plot !== undefined) await checkWritable(v.plot);
  const dir = v.model;
  const config = await loadConfig(dir);
  for (const { spec } of rows) {
    try {
      checkKvSpec(spec, config.headDim);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  }
  if (config.slidingWindow !== null && ctx > config.slidingWindow) {
    throw new UsageError(
      `--ctx ${ctx} exceeds the model's sliding window of ${config.slidingWindow} tokens`,
    );
  }
  const tokenizer = await TextTokenizer.load(dir);
  const all = tokenizer.encode(text);
  const tokens = Int32Array.from(limit === undefined ? all : all.slice(0, limit));
  if (tokens.length < 2) {
    throw new Error(
      `--file ${v.file}: ${tokens.length} token(s); perplexity needs at least 2`,
    );
  }

  using backend = openBackend(device, threads, quiet);
  const loading = progressBar("loading weights", quiet);
  using model = await Transformer.load(backend, dir, config, {
    ctx: Math.min(ctx, tokens.length),
    kv: "fp16",
    allLogits: true,
    onProgress: loading.update,
  });
  loading.end();

  const abort = new AbortController();
  const onInterrupt = () => abort.abort();
  const progress = etaProgress(quiet, (done, total) => `ppl ${done}/${total} tokens`);
  const start = performance.now();
  Deno.addSignalListener("SIGINT", onInterrupt);
  let result;
  try {
    result = await evaluatePerplexity(model, tokens, rows.map((r) => r.spec), {
      ctx,
      stride,
      onProgress: progress.update,
      signal: abort.signal,
    });
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
    progress.end();
  }
  const seconds = (performance.now() - start) / 1000;

  const shape = {
    layers: config.numLayers,
    heads: config.numHeads,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
  };
  const elements = 2 * shape.layers * shape.kvHeads * shape.headDim;
  const reference = result.scores[0];
  const specs = result.scores.map((score: SpecScore, i) => {
    const bytesPerToken = kvBytesPerToken(score.spec, shape);
    return {
      spec: rows[i].text,
      canonical: formatKvSpec(score.spec),
      bitsPerElement: bytesPerToken / elements * 8,
      bytesPerToken,
      ppl: score.ppl,
      deltaPpl: score.ppl - reference.ppl,
      meanKl: score.meanKl,
      klP99: score.klP99,
      top1: score.top1,
    };
  });
  const report = {
    model: dir,
    file: v.file,
    backend: backend.deviceInfo().name,
    ctx,
    stride,
    fileTokens: all.length,
    tokens: result.tokens,
    windows: result.windows,
    interrupted: result.interrupted,
    seconds: round(seconds, 4),
    specs,
  };
  if (v.json) {
    console.log(JSON.stringify(report));
  } else {
    printTable(specs);
    console.log(
      "KL divergence from the fp16 cache is what orders the specs; perplexity deltas on a small " +
        "model are noisy (they can go below zero).",
    );
    if (!quiet) {
      console.error(
        `innerq: ${dir} on ${report.backend}: ${result.tokens} tokens scored in ${result.windows} ` +
          `windows of ${ctx} (stride ${stride}), ${specs.length} specs, ${seconds.toFixed(1)} s` +
          (result.interrupted ? " (interrupted)" : ""),
      );
    }
  }
  if (v.plot !== undefined) {
    const name = dir.replace(/\/+$/, "").split("/").pop() || dir;
    await writePlot(v.plot, specs, {
      title: `${name}: KL from the fp16 cache over ${result.tokens} tokens` +
        (result.interrupted ? " (interrupted)" : ""),
      notes: [`${v.file}, windows of ${ctx} tokens, stride ${stride}, on ${report.backend}`],
    });
    if (!quiet) console.error(`innerq: plot written to ${v.plot}`);
  }
  return result.interrupted ? EXIT.interrupted : EXIT.ok;
}

/** Fails early, before a long run, when --plot's file cannot be written: leaves no file behind. */
async function checkWritable(path: string): Promise<void> {
  let existed = true;
  try {
    if ((await Deno.stat(path)).isDirectory) throw new Error("is a directory");
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) {
      throw new Error(`--plot ${path}: cannot write (${(e as Error).message})`);
    }
    existed = false;
  }
  try {
    (await Deno.open(path, { write: true, create: true })).close();
    if (!existed) await Deno.remove(path);
  } catch (e) {
    throw new Error(`--plot ${path}: cannot write (${(e as Error).message})`);
  }
}

/** The chart of `innerq ppl --plot`: the first spec (fp16) is the reference, the rest are marks.
 * Vega is loaded only here, so the other commands do not pay for it. */
async function writePlot(
  path: string,
  specs: { spec: string; bytesPerToken: number; meanKl: number; top1: number; ppl: number }[],
  opts: { title: string; notes: string[] },
): Promise<void> {
  const { klPlotSvg } = await import("../report/kl_plot.ts");
  const [reference, ...rest] = specs;
  const svg = await klPlotSvg(rest, { ...opts, reference });
  try {
    await Deno.writeTextFile(path, svg);
  } catch (e) {
    throw new Error(`--plot ${path}: cannot write (${(e as Error).message})`);
  }
}

function printTable(specs: {
  spec: string;
  bitsPerElement: number;
  bytesPerToken: number;
  ppl: number;
  deltaPpl: number;
  meanKl: number;
  klP99: number;
  top1: number;
}[]): void {
  const header = ["spec", "bits", "bytes/token", "ppl", "Δppl", "mean KL", "KL p99", "top-1"];
  const body = specs.map((s, i) => [
    s.spec,
    s.bitsPerElement.toFixed(2),
    formatBytes(s.bytesPerToken),
    s.ppl.toFixed(3),
    i === 0 ? "-" : `${s.deltaPpl >= 0 ? "+" : ""}${s.deltaPpl.toFixed(3)}`,
    i === 0 ? "-" : formatKl(s.meanKl),
    i === 0 ? "-" : formatKl(s.klP99),
    i === 0 ? "-" : `${(100 * s.top1).toFixed(2)}%`,
  ]);
  const width = header.map((h, c) => Math.max(h.length, ...body.map((r) => r[c].length)));
  const line = (cells: string[]) =>
    cells.map((cell, c) => c === 0 ? cell.padEnd(width[c]) : cell.padStart(width[c])).join("  ")
      .trimEnd();
  console.log(line(header));
  for (const r of body) console.log(line(r));
}
