// `innerq eval gsm8k`: few-shot chain-of-thought GSM8K accuracy for several KV-cache specs in one
// run (one copy of the weights, a cache per spec, the few-shot prefix prefilled once per cache).
import { parseArgs } from "node:util";
import { Transformer } from "../engine/forward.ts";
import {
  extractAnswer,
  GSM8K_STOPS,
  type Gsm8kItem,
  gsm8kPrefix,
  isCorrect,
  parseGsm8k,
  wilsonInterval,
} from "../eval/gsm8k.ts";
import { GSM8K_EXEMPLARS } from "../eval/gsm8k_exemplars.ts";
import { type GreedyResult, PrefixRunner } from "../eval/runner.ts";
import type { KvCache } from "../kv/cache.ts";
import {
  checkKvSpec,
  formatKvSpec,
  kvBytesPerToken,
  kvCacheBytes,
  type KvSpec,
  makeKvCache,
} from "../kv/spec.ts";
import { loadConfig } from "../model/config.ts";
import { gib } from "../model/weights.ts";
import { TextTokenizer } from "../tokenizer.ts";
import {
  deviceFlag,
  etaProgress,
  EXIT,
  intFlag,
  kvSpecFlag,
  openBackend,
  progressBar,
  UsageError,
} from "./common.ts";

const TASKS = ["gsm8k"];

export const EVAL_HELP = `innerq eval: task accuracy for each KV-cache spec

Usage: innerq eval gsm8k --model DIR --data FILE.jsonl [--kv SPEC ...] [options]
GSM8K with few-shot chain of thought: the eight exemplars of Wei et al. 2022 ("Q: ...\\nA: ... The
answer is N.\\n\\n"), the first --shots of them, then "Q: {question}\\nA:". Decoding is greedy and
stops at "\\n\\n", "Q:", end of sequence or --max-tokens. The prediction is the number after "The
answer is", else the last number of the output; it is right when it equals the number after "####"
in the data's answer (commas dropped, compared as numbers).

Every spec answers the same items with the same weights; the few-shot prefix is prefilled once per
cache and each prompt continues from it, with the result a from-scratch prefill would give.

Options
  -m, --model DIR        Hugging Face model directory (required)
      --data FILE.jsonl  one {"question": ..., "answer": "... #### 42"} per line, e.g.
                         ../shared/data/gsm8k/test.jsonl (required)
      --shots N          few-shot exemplars, 0..${GSM8K_EXEMPLARS.length} (default ${GSM8K_EXEMPLARS.length})
      --limit N          only the first N items (default: all)
      --kv SPEC          a KV cache to evaluate (repeatable; default fp16): fp16, fp32,
                         innerq:k4v2[,opts], kivi:k2v2[,opts] (see docs/kv-cache.md)
  -n, --max-tokens N     most tokens generated per answer (default 256)
  -c, --ctx N            context length (default: the longest prompt plus --max-tokens, at most
                         the model's max_position_embeddings)
      --device D         auto (default: CUDA when present), cuda or cpu
  -t, --threads N        CPU threads (default: all cores)
      --json             one JSON object instead of the table
      --out FILE.jsonl   also write one line per (spec, item): question, gold, prediction, correct,
                         output text, tokens generated, why generation stopped
  -q, --quiet            no progress or notices on stderr
  -h, --help             this help

Output: a table on stdout, one row per spec: bits per cached element, items scored, correct,
accuracy with its 95% Wilson score interval, mean tokens generated, and (when fp16 is among the
specs) the share of items whose output text is the fp16 cache's. Progress with an ETA goes to
stderr.

Exit codes: 0 done, 1 error (unreadable or malformed data, model files, native failure), 2 bad
command line, 130 interrupted by Ctrl-C (the table covers the items every spec finished).
`;

const OPTIONS = {
  model: { type: "string", short: "m" },
  data: { type: "string" },
  shots: { type: "string" },
  limit: { type: "string" },
  kv: { type: "string", multiple: true },
  "max-tokens": { type: "string", short: "n" },
  ctx: { type: "string", short: "c" },
  device: { type: "string" },
  threads: { type: "string", short: "t" },
  json: { type: "boolean" },
  out: { type: "string" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
} as const;

interface Row {
  /** The spec as given on the command line. */
  text: string;
  spec: KvSpec;
}

function specRows(given: string[]): Row[] {
  return (given.length ? given : ["fp16"]).map((text) => ({ text, spec: kvSpecFlag(text) }));
}

/** What one spec scored. */
interface Tally {
  items: number;
  correct: number;
  generated: number;
  sameAsFp16: number;
}

export async function runEval(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values, positionals = parsed.positionals;
  if (v.help) {
    console.log(EVAL_HELP);
    return EXIT.ok;
  }
  if (positionals.length === 0) {
    throw new UsageError(
      `eval needs a task: innerq eval ${TASKS.join("|")} --model DIR --data FILE`,
    );
  }
  const [task, ...extra] = positionals;
  if (!TASKS.includes(task)) {
    throw new UsageError(`unknown task "${task}" (tasks: ${TASKS.join(", ")})`);
  }
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}"`);
  if (v.model === undefined) throw new UsageError("eval needs --model DIR");
  if (v.data === undefined) throw new UsageError("eval needs --data FILE.jsonl (the problems)");
  const shots = intFlag("shots", v.shots, 0) ?? GSM8K_EXEMPLARS.length;
  if (shots > GSM8K_EXEMPLARS.length) {
    throw new UsageError(
      `--shots: expected an integer in 0..${GSM8K_EXEMPLARS.length}, got "${v.shots}"`,
    );
  }
  const limit = intFlag("limit", v.limit, 1);
  const maxTokens = intFlag("max-tokens", v["max-tokens"], 1) ?? 256;
  const ctxFlag = intFlag("ctx", v.ctx, 2);
  const threads = intFlag("threads", v.threads, 1);
  const device = deviceFlag(v.device);
  const rows = specRows(v.kv ?? []);
  const quiet = (v.quiet ?? false) || (v.json ?? false);

  let text;
  try {
    text = await Deno.readTextFile(v.data);
  } catch (e) {
    throw new Error(`--data ${v.data}: cannot read (${(e as Error).message})`);
  }
  const items = parseGsm8k(text, v.data, limit);
  if (items.length === 0) throw new Error(`--data ${v.data}: no items`);

  const dir = v.model;
  const config = await loadConfig(dir);
  for (const { spec } of rows) {
    try {
      checkKvSpec(spec, config.headDim);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  }
  const modelMax = Math.min(config.maxPositionEmbeddings, config.slidingWindow ?? Infinity);
  if (ctxFlag !== undefined && config.slidingWindow !== null && ctxFlag > config.slidingWindow) {
    throw new UsageError(
      `--ctx ${ctxFlag} exceeds the model's sliding window of ${config.slidingWindow} tokens`,
    );
  }
  const tokenizer = await TextTokenizer.load(dir);
  const prefixText = gsm8kPrefix(shots);
  const prefix = Int32Array.from(tokenizer.encode(prefixText));
  const prompts = items.map((item) =>
    Int32Array.from(tokenizer.encode(`${prefixText}Q: ${item.question}\nA:`))
  );
  const longest = Math.max(...prompts.map((p) => p.length));
  const ctx = ctxFlag ?? Math.min(modelMax, longest + maxTokens);
  prompts.forEach((p, i) => {
    if (p.length >= ctx) {
      throw new Error(
        `${v.data}:${items[i].line}: the prompt has ${p.length} tokens; the context holds ${ctx}` +
          (ctxFlag === undefined ? " (the model's longest)" : " (raise --ctx)") +
          (shots > 0 ? "; fewer --shots shorten it" : ""),
      );
    }
  });

  let out: Deno.FsFile | undefined;
  if (v.out !== undefined) {
    try {
      out = await Deno.open(v.out, { write: true, create: true, truncate: true });
    } catch (e) {
      throw new Error(`--out ${v.out}: cannot write (${(e as Error).message})`);
    }
  }
  try {
    return await evaluate({
      dir,
      config,
      tokenizer,
      rows,
      items,
      prompts,
      prefix,
      shots,
      ctx,
      maxTokens,
      device,
      threads,
      quiet,
      json: v.json ?? false,
      data: v.data,
      out,
    });
  } finally {
    out?.close();
  }
}

async function evaluate(o: {
  dir: string;
  config: Awaited<ReturnType<typeof loadConfig>>;
  tokenizer: TextTokenizer;
  rows: Row[];
  items: Gsm8kItem[];
  prompts: Int32Array[];
  prefix: Int32Array;
  shots: number;
  ctx: number;
  maxTokens: number;
  device: ReturnType<typeof deviceFlag>;
  threads: number | undefined;
  quiet: boolean;
  json: boolean;
  data: string;
  out: Deno.FsFile | undefined;
}): Promise<number> {
  const { config, rows, items, prompts, quiet } = o;
  using backend = openBackend(o.device, o.threads, quiet);
  const loading = progressBar("loading weights", quiet);
  using model = await Transformer.load(backend, o.dir, config, {
    ctx: o.ctx,
    kv: rows[0].spec,
    onProgress: loading.update,
  });
  loading.end();

  // one cache per spec: the model's own for the first, one made for each other
  const shape = model.cache.shape;
  const needed = rows.slice(1).reduce((sum, r) => sum + kvCacheBytes(backend, r.spec, shape), 0);
  if (backend.kind === "cuda" && needed > backend.deviceInfo().freeBytes) {
    const { name, freeBytes } = backend.deviceInfo();
    throw new Error(
      `${rows.length} KV caches of ${o.ctx} tokens need ${gib(needed)} more on ${name}, ` +
        `${gib(freeBytes)} is free: lower --ctx or give fewer --kv`,
    );
  }
  const own = model.cache;
  const made: KvCache[] = [];
  using runner = new PrefixRunner(model, o.tokenizer, o.prefix, {
    maxTokens: o.maxTokens,
    eosTokenIds: config.eosTokenIds,
    stops: GSM8K_STOPS,
  });
  const abort = new AbortController();
  const onInterrupt = () => abort.abort();
  const many = `${rows.length} spec${rows.length > 1 ? "s" : ""}`;
  const progress = etaProgress(quiet, (done, total) => `gsm8k ${done}/${total} items x ${many}`);
  const tallies: Tally[] = rows.map(() => ({ items: 0, correct: 0, generated: 0, sameAsFp16: 0 }));
  const fp16 = rows.findIndex((r) => formatKvSpec(r.spec) === "fp16");
  const encoder = new TextEncoder();
  let done = 0, prefilled = 0, reused = 0, interrupted = false;
  const start = performance.now();
  Deno.addSignalListener("SIGINT", onInterrupt);
  try {
    const caches = [own];
    for (const r of rows.slice(1)) {
      const cache = makeKvCache(backend, shape, r.spec);
      made.push(cache);
      caches.push(cache);
    }
    items: for (const [i, item] of items.entries()) {
      const results: GreedyResult[] = [];
      for (const cache of caches) {
        model.swapCache(cache);
        const result = await runner.run(prompts[i], abort.signal);
        if (result === null) break items; // an item counts once every spec has answered it
        results.push(result);
      }
      const lines: string[] = [];
      for (const [s, result] of results.entries()) {
        const prediction = extractAnswer(result.text), correct = isCorrect(prediction, item.gold);
        const t = tallies[s];
        t.items++;
        t.correct += correct ? 1 : 0;
        t.generated += result.tokens.length;
        if (fp16 >= 0 && result.text === results[fp16].text) t.sameAsFp16++;
        prefilled += result.prefilled;
        reused += result.reused;
        if (o.out) {
          lines.push(JSON.stringify({
            spec: rows[s].text,
            item: i,
            line: item.line,
            question: item.question,
            gold: item.gold,
            prediction,
            correct,
            output: result.text,
            tokens: result.tokens.length,
            stop: result.stopReason,
          }));
        }
      }
      if (o.out) o.out.writeSync(encoder.encode(lines.map((l) => `${l}\n`).join("")));
      done++;
      progress.update(done, items.length);
      if (abort.signal.aborted) break;
    }
    interrupted = done < items.length;
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
    progress.end();
    model.swapCache(own);
    for (const cache of made) cache.close();
  }
  const seconds = (performance.now() - start) / 1000;

  const layout = {
    layers: config.numLayers,
    heads: config.numHeads,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
  };
  const elements = 2 * layout.layers * layout.kvHeads * layout.headDim;
  const specs = rows.map((r, s) => {
    const t = tallies[s], bytesPerToken = kvBytesPerToken(r.spec, layout);
    const [lo, hi] = wilsonInterval(t.correct, t.items);
    return {
      spec: r.text,
      canonical: formatKvSpec(r.spec),
      bitsPerElement: bytesPerToken / elements * 8,
      bytesPerToken,
      items: t.items,
      correct: t.correct,
      accuracy: t.items ? t.correct / t.items : 0,
      ci95: [lo, hi],
      meanGeneratedTokens: t.items ? t.generated / t.items : 0,
      sameAsFp16: fp16 >= 0 && t.items ? t.sameAsFp16 / t.items : null,
    };
  });
  const runs = done * rows.length;
  const report = {
    task: "gsm8k",
    model: o.dir,
    data: o.data,
    backend: backend.deviceInfo().name,
    shots: o.shots,
    maxTokens: o.maxTokens,
    ctx: o.ctx,
    items: done,
    planned: items.length,
    prefixTokens: o.prefix.length,
    meanPromptTokens: round((prefilled + reused) / Math.max(1, runs), 4),
    meanPrefilledTokens: round(prefilled / Math.max(1, runs), 4),
    interrupted,
    seconds: round(seconds, 4),
    specs,
  };
  if (o.json) {
    console.log(JSON.stringify(report));
  } else {
    printTable(specs, fp16 >= 0);
    if (!quiet) {
      console.error(
        `innerq: ${o.dir} on ${report.backend}: ${done} of ${items.length} items x ${rows.length} ` +
          `spec${rows.length > 1 ? "s" : ""}, ${o.shots}-shot, ${seconds.toFixed(1)} s` +
          (interrupted ? " (interrupted)" : "") +
          `; prompts ${report.meanPromptTokens.toFixed(0)} ` +
          `tokens on average, ${report.meanPrefilledTokens.toFixed(0)} prefilled per item (the ` +
          `rest from the ${o.prefix.length}-token few-shot prefix, prefilled once per cache)`,
      );
    }
  }
  return interrupted ? EXIT.interrupted : EXIT.ok;
}

const round = (x: number, digits: number) => Number(x.toPrecision(digits));
const percent = (x: number) => `${(100 * x).toFixed(1)}%`;

function printTable(
  specs: {
    spec: string;
    bitsPerElement: number;
    items: number;
    correct: number;
    accuracy: number;
    ci95: number[];
    meanGeneratedTokens: number;
    sameAsFp16: number | null;
  }[],
  withFp16: boolean,
): void {
  const header = ["spec", "bits", "items", "correct", "accuracy", "95% CI", "gen tokens"];
  if (withFp16) header.push("= fp16");
  const body = specs.map((s) => {
    const row = [
      s.spec,
      s.bitsPerElement.toFixed(2),
      String(s.items),
      String(s.correct),
      s.items ? percent(s.accuracy) : "-",
      s.items ? `${percent(s.ci95[0])}-${percent(s.ci95[1])}` : "-",
      s.items ? s.meanGeneratedTokens.toFixed(1) : "-",
    ];
    if (withFp16) row.push(s.sameAsFp16 === null ? "-" : percent(s.sameAsFp16));
    return row;
  });
  const width = header.map((h, c) => Math.max(h.length, ...body.map((r) => r[c].length)));
  const line = (cells: string[]) =>
    cells.map((cell, c) => c === 0 ? cell.padEnd(width[c]) : cell.padStart(width[c])).join("  ")
      .trimEnd();
  console.log(line(header));
  for (const r of body) console.log(line(r));
}
