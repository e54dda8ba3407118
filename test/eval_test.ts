// innerq eval gsm8k: answer extraction, gold parsing, the Wilson interval, prompts, the few-shot
// prefix reused across prompts giving exactly the from-scratch result, and the command line.
import {
  deepStrictEqual as assertEquals,
  match as assertMatch,
  notDeepStrictEqual as assertNotEquals,
  ok as assert,
  throws as assertThrows,
} from "node:assert";
import { Backend } from "../ffi/backend.ts";
import { Transformer } from "../src/engine/forward.ts";
import { generate } from "../src/engine/generate.ts";
import { GREEDY, Sampler } from "../src/engine/sampler.ts";
import {
  extractAnswer,
  GSM8K_STOPS,
  gsm8kPrefix,
  gsm8kPrompt,
  isCorrect,
  parseGold,
  parseGsm8k,
  wilsonInterval,
} from "../src/eval/gsm8k.ts";
import { GSM8K_EXEMPLARS } from "../src/eval/gsm8k_exemplars.ts";
import { PrefixRunner, snapshotPrefix } from "../src/eval/runner.ts";
import type { KvCache } from "../src/kv/cache.ts";
import { makeKvCache, parseKvSpec } from "../src/kv/spec.ts";
import { loadConfig } from "../src/model/config.ts";
import { writeRandomModel } from "../src/model/random_model.ts";
import { TextTokenizer } from "../src/tokenizer.ts";
import { CLI, innerq } from "./cli.ts";

// a tiny random-weight model with head_dim 64, so every quantized spec applies
const model = await Deno.makeTempDir({ prefix: "innerq-eval-" });
await writeRandomModel(model, "tiny", { seed: 7, shape: { headDim: 64 } });
globalThis.addEventListener("unload", () => Deno.removeSync(model, { recursive: true }));

Deno.test("answer extraction: 'The answer is' first, else the last number", () => {
  const cases: [string, number | null][] = [
    [" There are 15 trees. 21 - 15 = 6. The answer is 6.", 6],
    [" She has $1,200 left. The answer is $1,200.", 1200],
    [" The answer is 1,234,567.", 1234567],
    [" It drops 3 degrees twice: 0 - 6 = -6. The answer is -6.", -6],
    [" The answer is: 3.50 dollars.", 3.5],
    [" The answer is **42**", 42],
    [" the answer is 7", 7],
    // the answer phrase wins over later numbers
    [" The answer is 12. Then 5 more and 8 more.", 12],
    // no answer phrase: the last number, commas dropped, decimals kept
    [" 5 bags of 3 apples is 15 apples, so 1,500 grams", 1500],
    [" He pays 2.25 per hour", 2.25],
    [" The total is -4", -4],
    // a minus after a number is subtraction, not a sign
    [" 21-15", 15],
    [" 21-15=6", 6],
    // "The answer is" with no number after it: the last number
    [" The answer is unclear, maybe 9.", 9],
    [" I do not know.", null],
    ["", null],
  ];
  for (const [output, expected] of cases) {
    assertEquals(extractAnswer(output), expected, JSON.stringify(output));
  }
  assert(isCorrect(1200, 1200) && isCorrect(18, 18.0) && !isCorrect(null, 0) && !isCorrect(17, 18));
});

Deno.test("gold answers: the number after the last ####, commas dropped", () => {
  assertEquals(parseGold("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18"), 18);
  assertEquals(parseGold("... so 70,000\n#### 70,000"), 70000);
  assertEquals(parseGold("#### -3"), -3);
  assertEquals(parseGold("#### 2.5 "), 2.5);
  assertEquals(parseGold("#### 1\n#### 2"), 2);
  assertEquals(parseGold("no marker 42"), null);
  assertEquals(parseGold("#### many"), null);
});

Deno.test("data files: items in order, blank lines skipped, bad lines named by file and line", () => {
  const good = [
    JSON.stringify({ question: "q1", answer: "a\n#### 1,000" }),
    "",
    JSON.stringify({ question: "q2", answer: "#### 2", extra: true }),
    JSON.stringify({ question: "q3", answer: "#### 3" }),
  ].join("\n") + "\n";
  assertEquals(parseGsm8k(good, "f.jsonl"), [
    { question: "q1", answer: "a\n#### 1,000", gold: 1000, line: 1 },
    { question: "q2", answer: "#### 2", gold: 2, line: 3 },
    { question: "q3", answer: "#### 3", gold: 3, line: 4 },
  ]);
  assertEquals(parseGsm8k(good, "f.jsonl", 2).map((i) => i.line), [1, 3]);
  const bad: [string, RegExp][] = [
    ['{"question": "q", "answer": "#### 1"}\n{"question": ', /: f\.jsonl:2: not JSON/],
    ['{"question": "q"}', /: f\.jsonl:1: no string "answer"/],
    ['{"answer": "#### 1"}', /: f\.jsonl:1: no string "question"/],
    ["[1, 2]", /: f\.jsonl:1: expected a JSON object/],
    ['{"question": "q", "answer": "42"}', /: f\.jsonl:1: the answer does not end with "#### /],
  ];
  for (const [text, message] of bad) assertThrows(() => parseGsm8k(text, "f.jsonl"), message);
  // a bad line past the limit is not read
  assertEquals(parseGsm8k('{"question": "q", "answer": "#### 1"}\nnot json', "f", 1).length, 1);
});

Deno.test("the Wilson score interval matches published values", () => {
  // Newcombe 1998 (Statistics in Medicine 17:857), table I: 81/263 and 15/148
  const known: [number, number, number, number][] = [
    [81, 263, 0.2553, 0.3662],
    [15, 148, 0.0624, 0.1605],
    [5, 10, 0.2366, 0.7634],
    [0, 20, 0, 0.1611], // 0 of n: z² / (n + z²)
    [10, 10, 0.7225, 1],
  ];
  for (const [k, n, lo, hi] of known) {
    const [a, b] = wilsonInterval(k, n);
    assert(Math.abs(a - lo) < 5e-5 && Math.abs(b - hi) < 5e-5, `${k}/${n}: ${a}, ${b}`);
  }
  assertEquals(wilsonInterval(0, 0), [0, 1]);
});

Deno.test("prompts: the first N exemplars as Q/A pairs, then the question", () => {
  assertEquals(gsm8kPrompt("How many?", 0), "Q: How many?\nA:");
  const two = gsm8kPrompt("How many?", 2);
  assertEquals(
    two,
    `Q: ${GSM8K_EXEMPLARS[0].question}\nA: ${GSM8K_EXEMPLARS[0].answer}\n\n` +
      `Q: ${GSM8K_EXEMPLARS[1].question}\nA: ${GSM8K_EXEMPLARS[1].answer}\n\nQ: How many?\nA:`,
  );
  assert(two.startsWith("Q: There are 15 trees in the grove."));
  const eight = gsm8kPrompt("How many?", 8);
  assertEquals(eight.split("Q: ").length - 1, 9);
  assertEquals(eight.split("\n\n").length, 9);
  assert(eight.startsWith(gsm8kPrefix(8)) && eight.endsWith("\n\nQ: How many?\nA:"));
  assertEquals(GSM8K_EXEMPLARS.length, 8);
  const answers = GSM8K_EXEMPLARS.map((e) => extractAnswer(e.answer));
  assertEquals(answers, [6, 5, 39, 8, 9, 29, 33, 8]);
  for (const e of GSM8K_EXEMPLARS) assertMatch(e.answer, /The answer is \d+\.$/);
  assertMatch(GSM8K_EXEMPLARS[7].question, /^Olivia has \$23\./);
  assertThrows(() => gsm8kPrefix(9), /shots must be an integer in 0\.\.8/);
  assertThrows(() => gsm8kPrefix(-1), RangeError);
  assertEquals(GSM8K_STOPS, ["\n\n", "Q:"]);
});

// ---- the few-shot prefix reused: the same greedy tokens as a from-scratch prefill -------------

const QUESTIONS = [
  "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?",
  "James runs 3 sprints 3 times a week, 60 meters each. How many meters a week?",
  "Tom has 12 apples and gives away 5. How many are left?",
];
const config = await loadConfig(model);
const tokenizer = await TextTokenizer.load(model);
const encode = (text: string) => Int32Array.from(tokenizer.encode(text));

/** The logits of the model's last forward call (a whole run's last step after a generation). */
function lastLogits(m: Transformer): Float32Array {
  const out = new Float32Array(m.config.vocabSize);
  m.backend.download(m.state.logits.slice(0, out.byteLength), out);
  return out;
}

/** Greedy tokens from scratch: a fresh cache of `spec`, generate() as `innerq generate` runs it;
 * and the logits of its last step. */
async function fromScratch(m: Transformer, spec: string, ids: Int32Array, maxTokens: number) {
  const cache = makeKvCache(m.backend, m.cache.shape, parseKvSpec(spec));
  const old = m.swapCache(cache);
  try {
    using sampler = new Sampler(m.backend, GREEDY, m.config.vocabSize);
    const tokens: number[] = [];
    for await (const id of generate(m, ids, sampler, { maxTokens, eosTokenIds: [] })) {
      tokens.push(id);
    }
    return { tokens, logits: lastLogits(m) };
  } finally {
    m.swapCache(old).close();
  }
}

/** The logits after prefilling ids[from..] in chunks from `from` over the model's cache as it is. */
function prefillLogits(m: Transformer, ids: Int32Array, from: number): Float32Array {
  let logits = null;
  for (let pos = from; pos < ids.length; pos += m.chunk) {
    const part = ids.subarray(pos, pos + m.chunk);
    logits = m.forward(m.stageTokens(part), pos, part.length);
  }
  const out = new Float32Array(m.config.vocabSize);
  m.backend.download(logits!, out);
  return out;
}

/** The CUDA backend where one answers (the tests below run on it too), else null. */
function openCuda(): Backend | null {
  try {
    return Backend.open("cuda");
  } catch {
    return null;
  }
}
const gpu = openCuda();
globalThis.addEventListener("unload", () => gpu?.close());

for (
  const [device, spec] of ["cpu", "cuda"].flatMap((d) =>
    ["fp16", "innerq:k4v2", "kivi:k2v2"].map((s) => [d, s])
  )
) {
  const name = `${device} ${spec}: prompts continuing from the shared prefix give the ` +
    "from-scratch tokens and logits";
  Deno.test({ name, ignore: device === "cuda" && gpu === null }, async () => {
    using cpu = Backend.open("cpu", { threads: 2 });
    const backend = device === "cuda" ? gpu! : cpu;
    // chunks of 16 make a small ring (recent 32 + block 32 + 15 rows), which every prompt's
    // question and answer overwrite: without the ring restored, the quantized caches go wrong
    using m = await Transformer.load(backend, model, config, { ctx: 640, chunk: 16, kv: spec });
    const prefixText = gsm8kPrefix(1);
    const prefix = encode(prefixText), maxTokens = 48;
    const prompts = QUESTIONS.map((q) => encode(`${prefixText}Q: ${q}\nA:`));
    using runner = new PrefixRunner(m, tokenizer, prefix, {
      maxTokens,
      eosTokenIds: [],
      stops: [],
    });
    const expectedReuse = Math.floor((prefix.length - 1) / 16) * 16;
    assert(expectedReuse >= 256, `prefix of ${prefix.length} tokens`);
    assertEquals(runner.reusable, expectedReuse);
    // every prompt, then the first again after the others wrote over its positions: the same
    // tokens as from scratch, and the same logits to the bit at the last step (which attends over
    // every position)
    const got = [];
    for (const ids of [...prompts, prompts[0]]) {
      const r = (await runner.run(ids))!;
      assertEquals([r.reused, r.prefilled], [expectedReuse, ids.length - expectedReuse]);
      assertEquals([r.tokens.length, r.stopReason], [maxTokens, "length"]);
      got.push({ tokens: r.tokens, logits: lastLogits(m) });
    }
    const own = m.cache;
    for (const [i, ids] of [...prompts, prompts[0]].entries()) {
      assertEquals(got[i], await fromScratch(m, spec, ids, maxTokens), `prompt ${i}`);
    }
    assertNotEquals(got[0].tokens, got[1].tokens);
    assert(m.cache === own);
    if (spec === "fp16") return;

    // the control: continuing from the prefix without restoring the ring changes the logits
    const scratch = makeKvCache(backend, m.cache.shape, parseKvSpec(spec));
    m.swapCache(scratch);
    const expected = prefillLogits(m, prompts[1], 0);
    m.swapCache(own).close();
    await runner.run(prompts[0]); // the cache now holds prompt 0's question and answer
    assertNotEquals(prefillLogits(m, prompts[1], expectedReuse), expected);
    // and run() restores it
    assertEquals((await runner.run(prompts[1]))!.tokens, got[1].tokens);
    assertEquals(lastLogits(m), got[1].logits);
  });
}

/** A cache kind the runner does not know: a dense cache behind another class. */
class OtherCache implements KvCache {
  constructor(readonly inner: KvCache) {}
  get spec() {
    return this.inner.spec;
  }
  get shape() {
    return this.inner.shape;
  }
  get bytesPerToken() {
    return this.inner.bytesPerToken;
  }
  get fixedBytes() {
    return this.inner.fixedBytes;
  }
  store(...args: Parameters<KvCache["store"]>) {
    this.inner.store(...args);
  }
  queryScale(layer: number) {
    return this.inner.queryScale(layer);
  }
  attend(...args: Parameters<KvCache["attend"]>) {
    this.inner.attend(...args);
  }
  close() {
    this.inner.close();
  }
}

Deno.test("a cache of an unknown kind, or a prompt off the prefix, prefills from 0", async () => {
  using backend = Backend.open("cpu", { threads: 2 });
  using m = await Transformer.load(backend, model, config, { ctx: 512, chunk: 16 });
  const prefixText = gsm8kPrefix(1);
  using runner = new PrefixRunner(m, tokenizer, encode(prefixText), {
    maxTokens: 8,
    eosTokenIds: [],
    stops: [],
  });
  const ids = encode(`${prefixText}Q: ${QUESTIONS[0]}\nA:`);
  const other = encode(`Q: ${QUESTIONS[1]}\nA:`);
  assertEquals(runner.reuseFor(other), 0);
  const r = (await runner.run(other))!;
  assertEquals([r.reused, r.prefilled], [0, other.length]);
  assertEquals(r.tokens, (await fromScratch(m, "fp16", other, 8)).tokens);
  assertEquals(runner.reuseFor(ids), runner.reusable); // the fp16 cache continues

  const wrapped = new OtherCache(makeKvCache(backend, m.cache.shape, parseKvSpec("fp16")));
  assertEquals(snapshotPrefix(wrapped), null);
  const own = m.swapCache(wrapped);
  try {
    assertEquals(runner.reuseFor(ids), 0);
    for (const prompt of [ids, ids]) {
      const w = (await runner.run(prompt))!;
      assertEquals([w.reused, w.prefilled], [0, prompt.length]);
      assertEquals(w.tokens, (await fromScratch(m, "fp16", prompt, 8)).tokens);
    }
  } finally {
    m.swapCache(own).close();
  }
});

Deno.test("generation stops at a stop string, cut from the text, or at end of sequence", async () => {
  using backend = Backend.open("cpu", { threads: 2 });
  using m = await Transformer.load(backend, model, config, { ctx: 256, chunk: 64 });
  const ids = encode("Q: 1 + 1?\nA:");
  using free = new PrefixRunner(m, tokenizer, new Int32Array(0), {
    maxTokens: 24,
    eosTokenIds: [],
    stops: [],
  });
  const full = (await free.run(ids))!;
  assertEquals(full.stopReason, "length");
  // stop at the text of generated tokens 2..4: the output is cut before its first occurrence,
  // and generation ends with the token that completes it
  const stopText = tokenizer.decode(full.tokens.slice(2, 5));
  const at = full.text.indexOf(stopText);
  let completing = 1;
  while (!tokenizer.decode(full.tokens.slice(0, completing)).includes(stopText)) completing++;
  using stopping = new PrefixRunner(m, tokenizer, new Int32Array(0), {
    maxTokens: 24,
    eosTokenIds: [],
    stops: [stopText],
  });
  const r = (await stopping.run(ids))!;
  assertEquals(
    [r.stopReason, r.tokens, r.text],
    ["stop", full.tokens.slice(0, completing), full.text.slice(0, at)],
  );
  using eos = new PrefixRunner(m, tokenizer, new Int32Array(0), {
    maxTokens: 24,
    eosTokenIds: [full.tokens[3]],
    stops: [],
  });
  const e = (await eos.run(ids))!;
  const firstEos = full.tokens.indexOf(full.tokens[3]);
  assertEquals([e.stopReason, e.tokens], ["eos", full.tokens.slice(0, firstEos)]);
});

// ---- the command line --------------------------------------------------------------------------

const data = `${model}/items.jsonl`;
await Deno.writeTextFile(
  data,
  [
    {
      question: "Tom has 12 apples and gives away 5. How many are left?",
      answer: "12-5=7\n#### 7",
    },
    { question: "A pen costs $2. How much do 3 pens cost?", answer: "3*2=6\n#### 6" },
    { question: "What is 1,000 plus 200?", answer: "1,000+200=1,200\n#### 1,200" },
  ].map((o) => JSON.stringify(o)).join("\n") + "\n",
);
const base = ["eval", "gsm8k", "--model", model, "--data", data, "--device", "cpu", "-t", "2"];

Deno.test("the CLI prints the table, or one JSON object with --json, and --out lines", async () => {
  const help = await innerq(["eval", "--help"]);
  assertEquals(help.code, 0);
  assertMatch(help.stdout, /Usage: innerq eval gsm8k --model DIR --data FILE\.jsonl/);
  const args = [...base, "--shots", "1", "-n", "6", "--kv", "fp16", "--kv", "innerq:k4v2"];
  const table = await innerq(args);
  assertEquals(table.code, 0, table.stderr);
  const lines = table.stdout.trim().split("\n");
  assertMatch(lines[0], /^spec +bits +items +correct +accuracy +95% CI +gen tokens += fp16$/);
  assertMatch(lines[1], /^fp16 +16\.00 +3 +\d +\d+\.\d% +\d+\.\d%-\d+\.\d% +\d+\.\d +100\.0%$/);
  assertMatch(lines[2], /^innerq:k4v2 +4\.00 +3 +\d /);
  assertEquals(lines.length, 3);
  assertMatch(table.stderr, /3 of 3 items x 2 specs, 1-shot/);

  const out = `${model}/out.jsonl`;
  const json = await innerq([...args, "--json", "--out", out, "--kv", "kivi:k2v2"]);
  assertEquals(json.code, 0, json.stderr);
  assertEquals(json.stderr, "");
  const r = JSON.parse(json.stdout);
  assertEquals(
    [r.task, r.items, r.planned, r.shots, r.maxTokens, r.interrupted, r.model],
    ["gsm8k", 3, 3, 1, 6, false, model],
  );
  assertEquals(r.specs.map((s: { spec: string }) => s.spec), ["fp16", "innerq:k4v2", "kivi:k2v2"]);
  for (const s of r.specs) {
    assertEquals(s.items, 3);
    assertEquals(s.ci95, wilsonInterval(s.correct, 3));
    assert(s.meanGeneratedTokens > 0 && s.meanGeneratedTokens <= 6, JSON.stringify(s));
  }
  assertEquals(r.specs[0].sameAsFp16, 1);
  const records = (await Deno.readTextFile(out)).trim().split("\n").map((l) => JSON.parse(l));
  assertEquals(records.length, 9);
  assertEquals(
    records.map((x) => [x.item, x.spec]),
    [0, 1, 2].flatMap((i) => r.specs.map((s: { spec: string }) => [i, s.spec])),
  );
  assertEquals(records.filter((x) => x.item === 2).map((x) => x.gold), [1200, 1200, 1200]);
  for (const x of records) {
    assertEquals(Object.keys(x), [
      "spec",
      "item",
      "line",
      "question",
      "gold",
      "prediction",
      "correct",
      "output",
      "tokens",
      "stop",
    ]);
    assertEquals(x.prediction, extractAnswer(x.output));
    assertEquals(x.correct, x.prediction === x.gold);
  }
  const correct = r.specs.map((s: { spec: string }) =>
    records.filter((x) => x.spec === s.spec && x.correct).length
  );
  assertEquals(correct, r.specs.map((s: { correct: number }) => s.correct));
});

Deno.test("Ctrl-C prints the items every spec finished and exits 130", async () => {
  const many = `${model}/many.jsonl`, out = `${model}/interrupted.jsonl`;
  const item = JSON.stringify({ question: "What is 2 + 2?", answer: "#### 4" });
  await Deno.writeTextFile(many, `${item}\n`.repeat(400));
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-all",
      "--quiet",
      CLI,
      ...base,
      "--data",
      many,
      "--shots",
      "1",
      "-n",
      "32",
    ]
      .concat(["--kv", "fp16", "--kv", "kivi:k2v2", "--json", "--out", out]),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  for (let i = 0; i < 600; i++) { // up to a minute for the first item
    await new Promise((resolve) => setTimeout(resolve, 100));
    if ((await Deno.stat(out).catch(() => null))?.size) break;
  }
  child.kill("SIGINT");
  const { code, stdout, stderr } = await child.output();
  assertEquals(code, 130, new TextDecoder().decode(stderr));
  const r = JSON.parse(new TextDecoder().decode(stdout));
  assert(r.interrupted && r.items >= 1 && r.items < 400, JSON.stringify(r));
  assertEquals(r.specs.map((s: { items: number }) => s.items), [r.items, r.items]);
  assertEquals((await Deno.readTextFile(out)).trim().split("\n").length, 2 * r.items);
});

Deno.test("bad command lines exit 2 and bad files exit 1, with one line", async () => {
  const usage: [string[], RegExp][] = [
    [["eval"], /eval needs a task: innerq eval gsm8k/],
    [["eval", "mmlu", "--model", model, "--data", data], /unknown task "mmlu" \(tasks: gsm8k\)/],
    [["eval", "gsm8k", "--model", model], /needs --data FILE\.jsonl/],
    [["eval", "gsm8k", "--data", data], /needs --model DIR/],
    [[...base, "--shots", "9"], /--shots: expected an integer in 0\.\.8, got "9"/],
    [[...base, "--shots=-1"], /--shots: expected an integer >= 0/],
    [[...base, "--limit", "0"], /--limit: expected an integer >= 1/],
    [[...base, "--kv", "innerq:k5v2"], /--kv "innerq:k5v2"/],
    [[...base, "--bogus"], /bogus/],
  ];
  for (const [args, message] of usage) {
    const r = await innerq(args);
    assertEquals(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assertMatch(r.stderr.split("\n")[0], message);
  }
  const notJson = `${model}/not-json.jsonl`, noAnswer = `${model}/no-answer.jsonl`;
  const good = JSON.stringify({ question: "q", answer: "#### 1" });
  await Deno.writeTextFile(notJson, `${good}\n\n${good}\n{"question": "q",\n`);
  await Deno.writeTextFile(noAnswer, `${good}\n{"question": "q"}\n`);
  const files: [string[], RegExp][] = [
    [[...base, "--data", "/nonexistent.jsonl"], /^innerq: --data \/nonexistent.jsonl: cannot read/],
    [[...base, "--data", notJson], new RegExp(`^innerq: ${notJson}:4: not JSON`)],
    [[...base, "--data", noAnswer], new RegExp(`^innerq: ${noAnswer}:2: no string "answer"`)],
    // 8 shots are ~2,700 byte-level tokens: more than the model's 512 positions
    [base, new RegExp(`^innerq: ${data}:1: the prompt has \\d+ tokens; the context holds 512`)],
    [
      [...base, "--shots", "0", "--out", `${model}/no/such/dir.jsonl`],
      /^innerq: --out .*: cannot write/,
    ],
  ];
  for (const [args, message] of files) {
    const r = await innerq(args);
    assertEquals(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
    assertMatch(r.stderr, message);
    assertEquals(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
});
