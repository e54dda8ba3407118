// innerq ppl: the windows, perplexity against an independent computation, KL divergence from the
// fp16 cache (0 against itself, growing as bits fall), and the command line.
import { deepStrictEqual as assertEquals, match as assertMatch, ok as assert } from "node:assert";
import { Backend } from "../ffi/backend.ts";
import { Transformer } from "../src/engine/forward.ts";
import { evaluatePerplexity, perplexityWindows } from "../src/engine/perplexity.ts";
import { Rng } from "../src/engine/sampler.ts";
import { loadConfig } from "../src/model/config.ts";
import { writeRandomModel } from "../src/model/random_model.ts";
import { parseKvSpec } from "../src/kv/spec.ts";
import { TextTokenizer } from "../src/tokenizer.ts";
import { innerq } from "./cli.ts";

// a tiny random-weight model with head_dim 64, so every quantized spec applies
const model = await Deno.makeTempDir({ prefix: "innerq-ppl-" });
await writeRandomModel(model, "tiny", { seed: 5, shape: { headDim: 64 } });
globalThis.addEventListener("unload", () => Deno.removeSync(model, { recursive: true }));

/** English-looking text from a seeded word list: the byte-level tokenizer gives ~1 token a byte. */
function makeText(words: number, seed: number): string {
  const vocab = ("the a cache of keys and values is quantized to two or four bits while the " +
    "model reads every token once at each step then writes it back in groups").split(" ");
  const rng = new Rng(seed);
  const out: string[] = [];
  for (let i = 0; i < words; i++) {
    out.push(vocab[Math.floor(rng.next() * vocab.length)] + (rng.next() < 0.1 ? "." : ""));
  }
  return out.join(" ");
}
const textFile = `${model}/text.txt`;
await Deno.writeTextFile(textFile, makeText(160, 1));

const config = await loadConfig(model);
const tokenizer = await TextTokenizer.load(model);
const allTokens = Int32Array.from(tokenizer.encode(await Deno.readTextFile(textFile)));

async function withModel<T>(
  opts: { ctx: number; chunk?: number },
  fn: (m: Transformer, be: Backend) => T | Promise<T>,
): Promise<T> {
  using backend = Backend.open("cpu", { threads: 2 });
  using m = await Transformer.load(backend, model, config, {
    ctx: opts.ctx,
    chunk: opts.chunk,
    kv: "fp16",
    allLogits: true,
  });
  return await fn(m, backend);
}

Deno.test("windows score every token once (stride < ctx) or all but each window's first", () => {
  // non-overlapping: targets 1..7, 9..15, 17..19 (a window's first token has no predecessor)
  assertEquals(perplexityWindows(20, 8, 8), [
    { start: 0, end: 8, from: 1 },
    { start: 8, end: 16, from: 9 },
    { start: 16, end: 20, from: 17 },
  ]);
  // overlapping: the shared tokens are context only
  assertEquals(perplexityWindows(20, 8, 4), [
    { start: 0, end: 8, from: 1 },
    { start: 4, end: 12, from: 8 },
    { start: 8, end: 16, from: 12 },
    { start: 12, end: 20, from: 16 },
  ]);
  // a last window of one token has nothing to score; fewer tokens than ctx: one window
  assertEquals(perplexityWindows(9, 8, 8), [{ start: 0, end: 8, from: 1 }]);
  assertEquals(perplexityWindows(5, 8, 3), [{ start: 0, end: 5, from: 1 }]);
  for (const [n, ctx, stride] of [[100, 16, 5], [100, 16, 1], [37, 10, 9]]) {
    const scored = perplexityWindows(n, ctx, stride).flatMap((w) =>
      Array.from({ length: w.end - w.from }, (_, i) => w.from + i)
    );
    assertEquals(scored, Array.from({ length: n - 1 }, (_, i) => i + 1));
  }
});

Deno.test("ppl is exp(mean NLL) of an independent computation, chunked or not", async () => {
  const tokens = allTokens.subarray(0, 60), vocab = config.vocabSize;
  for (const [ctx, stride] of [[24, 24], [24, 10]]) {
    // independent: each window in one forward call; a target t is scored in the first window
    // [b, b + ctx) with b < t, b a multiple of the stride
    const expected = await withModel({ ctx, chunk: ctx }, (m, be) => {
      let nll = 0, count = 0;
      const logits = new Float32Array(ctx * vocab);
      const scored = new Set<number>();
      for (let b = 0; b < tokens.length - 1; b += stride) {
        const ids = tokens.subarray(b, b + ctx);
        be.download(
          m.forward(m.stageTokens(ids), 0, ids.length),
          logits.subarray(0, ids.length * vocab),
        );
        for (let t = b + 1; t < b + ids.length; t++) {
          if (scored.has(t)) continue;
          scored.add(t);
          const row = Array.from(logits.subarray((t - 1 - b) * vocab, (t - b) * vocab));
          const max = Math.max(...row);
          const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
          nll += lse - row[tokens[t]];
          count++;
        }
        if (b + ctx >= tokens.length) break;
      }
      return { ppl: Math.exp(nll / count), count };
    });
    const got = await withModel(
      { ctx, chunk: 7 },
      (m) => evaluatePerplexity(m, tokens, [parseKvSpec("fp16")], { ctx, stride }),
    );
    assertEquals(got.tokens, expected.count);
    const ppl = got.scores[0].ppl;
    assert(
      Math.abs(ppl / expected.ppl - 1) < 1e-5,
      `ctx ${ctx} stride ${stride}: ${ppl} vs ${expected.ppl}`,
    );
  }
});

Deno.test("KL from fp16: exactly 0 against itself, and growing as bits fall", async () => {
  const specs = ["fp16", "fp16", "innerq:k8v8", "innerq:k4v4", "innerq:k2v2"];
  const r = await withModel(
    { ctx: 192 },
    (m) =>
      evaluatePerplexity(m, allTokens.subarray(0, 384), specs.map(parseKvSpec), {
        ctx: 192,
        stride: 192,
      }),
  );
  assertEquals(r.windows, 2);
  assertEquals(r.tokens, 382);
  const [ref, again, k8, k4, k2] = r.scores;
  for (const s of [ref, again]) {
    assertEquals([s.meanKl, s.klP99, s.top1], [0, 0, 1]);
    assertEquals(s.nll, ref.nll);
  }
  const kl = [k8, k4, k2].map((s) => s.meanKl);
  assert(0 < kl[0] && kl[0] < kl[1] && kl[1] < kl[2], `mean KL k8v8, k4v4, k2v2: ${kl}`);
  assert(k2.klP99 >= k2.meanKl && k2.top1 < 1, `k2v2: ${JSON.stringify(k2)}`);
  for (const s of r.scores) assert(Number.isFinite(s.ppl) && s.ppl > 1);
});

const base = ["ppl", "--model", model, "--file", textFile, "--device", "cpu", "--ctx", "96"];

Deno.test("the CLI prints the table, or one JSON object with --json", async () => {
  const help = await innerq(["ppl", "--help"]);
  assertEquals(help.code, 0);
  assertMatch(help.stdout, /Usage: innerq ppl --model DIR --file TEXT/);
  const args = [...base, "--limit", "200", "--kv", "innerq:k4v2", "--kv", "kivi:k2v2"];
  const table = await innerq(args);
  assertEquals(table.code, 0, table.stderr);
  const lines = table.stdout.trim().split("\n");
  assertMatch(lines[0], /^spec +bits +bytes\/token +ppl +Δppl +mean KL +KL p99 +top-1$/);
  assertMatch(lines[1], /^fp16 +16\.00 /);
  assertMatch(lines[2], /^innerq:k4v2 +4\.00 +/); // (4 + 2) / 2 bits + two fp16 pairs per 32
  assertMatch(lines[3], /^kivi:k2v2 +3\.00 +/);
  assertMatch(lines[4], /KL divergence .* orders the specs; perplexity deltas .* noisy/);
  assertMatch(table.stderr, /197 tokens scored in 3 windows of 96/);

  const json = await innerq([...args, "--json", "--stride", "48"]);
  assertEquals(json.code, 0, json.stderr);
  assertEquals(json.stderr, "");
  const r = JSON.parse(json.stdout);
  assertEquals([r.tokens, r.stride, r.ctx, r.windows, r.model], [199, 48, 96, 4, model]);
  assertEquals(r.specs.map((s: { spec: string }) => s.spec), ["fp16", "innerq:k4v2", "kivi:k2v2"]);
  assertEquals([r.specs[0].meanKl, r.specs[0].top1, r.specs[0].deltaPpl], [0, 1, 0]);
  const layers = config.numLayers, kvHeads = config.numKvHeads, d = config.headDim;
  assertEquals(r.specs[0].bytesPerToken, 2 * layers * kvHeads * d * 2);
  assertEquals(r.specs[1].bitsPerElement, 4);
  assert(r.specs[2].meanKl > 0 && r.specs[2].ppl > 1);
});

Deno.test("bad command lines exit 2 and bad files exit 1, with one line", async () => {
  const usage: [string[], RegExp][] = [
    [["ppl", "--file", textFile], /needs --model/],
    [["ppl", "--model", model], /needs --file/],
    [[...base, "--kv", "innerq:k5v2"], /--kv "innerq:k5v2"/],
    [[...base, "--ctx", "1"], /--ctx: expected an integer >= 2/],
    [[...base, "--stride", "0"], /--stride: expected an integer >= 1/],
    [[...base, "--stride", "97"], /--stride 97 exceeds --ctx 96/],
    [[...base, "--limit", "1"], /--limit/],
    [[...base, "--bogus"], /bogus/],
  ];
  for (const [args, message] of usage) {
    const r = await innerq(args);
    assertEquals(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assertMatch(r.stderr.split("\n")[0], message);
  }
  const short = `${model}/short.txt`;
  await Deno.writeTextFile(short, "a");
  const files: [string[], RegExp][] = [
    [[...base, "--file", "/nonexistent.txt"], /^innerq: --file \/nonexistent.txt: cannot read/],
    [[...base, "--file", short], /1 token\(s\); perplexity needs at least 2/],
  ];
  for (const [args, message] of files) {
    const r = await innerq(args);
    assertEquals(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
    assertMatch(r.stderr, message);
    assertEquals(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
});
