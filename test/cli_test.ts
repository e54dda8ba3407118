// The command line as users run it: exit codes, one-line errors, --json, stdin prompts, seeds.
import { deepStrictEqual as assertEquals, match as assertMatch, ok as assert } from "node:assert";
import { writeRandomModel } from "../src/model/random_model.ts";
import { innerq } from "./cli.ts";

const model = await Deno.makeTempDir({ prefix: "innerq-cli-" });
await writeRandomModel(model, "tiny", { seed: 9 });
globalThis.addEventListener("unload", () => Deno.removeSync(model, { recursive: true }));
const base = ["--model", model, "--device", "cpu", "-n", "12"];

Deno.test("--help for the tool and each command exits 0", async () => {
  for (const args of [["--help"], ["generate", "--help"], ["info", "--help"]]) {
    const r = await innerq(args);
    assertEquals(r.code, 0);
    assertMatch(r.stdout, /Usage: innerq/);
  }
});

Deno.test("bad command lines exit 2 with a one-line error naming the flag", async () => {
  const cases: [string[], RegExp][] = [
    [["frobnicate"], /unknown command "frobnicate"/],
    [["generate", "--model", model, "--bogus", "x"], /bogus/],
    [["generate", ...base, "--temp", "-1", "hi"], /--temp/],
    [["generate", ...base, "--top-p", "1.5", "hi"], /--top-p/],
    [["generate", ...base, "--kv", "q3", "hi"], /--kv|fp16/],
    [["bench", "--model", model, "--device", "cpu", "--kv", "q3"], /--kv/],
    [["bench", "--kernels", "--device", "cpu", "--kv", "innerq:k5v2"], /--kv/],
    [["bench", "--model", model, "--device", "cpu", "--host-clock"], /--host-clock/],
    [["info", "--model", model, "--kv", "kivi:k2v2,meta=e3m4"], /--kv/],
    [["generate", ...base, "--device", "tpu", "hi"], /--device/],
    [["generate", ...base, "-n", "zero", "hi"], /max-tokens/],
  ];
  for (const [args, message] of cases) {
    const r = await innerq(args);
    assertEquals(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    const first = r.stderr.split("\n")[0];
    assertMatch(first, /^innerq: /);
    assertMatch(first, message);
  }
});

Deno.test("bad model files exit 1 with one line naming the file", async () => {
  const missing = await innerq(["generate", "--model", "/nonexistent/model", "hi"]);
  assertEquals(missing.code, 1);
  assertMatch(missing.stderr, /^innerq: \/nonexistent\/model\/config.json: not found/);
  assertEquals(missing.stderr.trim().split("\n").length, 1);

  const broken = await Deno.makeTempDir({ prefix: "innerq-broken-" });
  try {
    for (const f of ["config.json", "tokenizer.json", "generation_config.json"]) {
      await Deno.copyFile(`${model}/${f}`, `${broken}/${f}`);
    }
    const weights = await Deno.readFile(`${model}/model.safetensors`);
    await Deno.writeFile(`${broken}/model.safetensors`, weights.subarray(0, weights.length - 100));
    const r = await innerq(["generate", "--model", broken, "--device", "cpu", "hi"]);
    assertEquals(r.code, 1);
    assertMatch(r.stderr, /^innerq: .*model\.safetensors/);
    assertEquals(r.stderr.trim().split("\n").length, 1, r.stderr);
  } finally {
    await Deno.remove(broken, { recursive: true });
  }
});

Deno.test("a prompt on stdin, --json, and the same seed giving the same text", async () => {
  const run = (seed: string) =>
    innerq(["generate", ...base, "--json", "--seed", seed, "--ignore-eos"], "Once upon");
  const a = await run("7"), b = await run("7");
  assertEquals(a.code, 0, a.stderr);
  const ja = JSON.parse(a.stdout), jb = JSON.parse(b.stdout);
  assertEquals(ja.generatedTokens, 12);
  assertEquals(ja.stopReason, "length");
  assertEquals(jb.tokens, ja.tokens);
  assertEquals(jb.text, ja.text);
  assert(ja.promptTokens > 0 && ja.kvBytesPerToken > 0);
});

Deno.test("streamed text equals the --json text, and stats go to stderr", async () => {
  const args = ["generate", ...base, "--seed", "3", "--ignore-eos", "Once upon a time"];
  const streamed = await innerq(args);
  const json = JSON.parse((await innerq([...args, "--json"])).stdout);
  assertEquals(streamed.code, 0, streamed.stderr);
  assertEquals(streamed.stdout, json.text.endsWith("\n") ? json.text : json.text + "\n");
  assertMatch(streamed.stderr, /decode \d+ tokens, [\d.]+ tok\/s/);
  const quiet = await innerq([...args, "--quiet"]);
  assertEquals(quiet.stderr, "");
});

Deno.test("info describes the model", async () => {
  const r = await innerq(["info", "--model", model, "--json"]);
  assertEquals(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  assertEquals(info.architecture, "LlamaForCausalLM");
  assert(info.params > 0);
});
