// Tokenizer: round trips, streaming decode, chat templates, stop strings, and clear errors.
import {
  deepStrictEqual as assertEquals,
  ok as assert,
  rejects as assertRejects,
  throws as assertThrows,
} from "node:assert";
import { StopMatcher, StreamDecoder, TextTokenizer } from "../src/tokenizer.ts";
import { byteLevelTokenizerJson, END_OF_TEXT } from "../src/model/byte_tokenizer.ts";

const SMOLLM2 =
  new URL("../../shared/models/tokenizers/smollm2-135m-instruct", import.meta.url).pathname;
const haveSmollm2 = (() => {
  try {
    return Deno.statSync(`${SMOLLM2}/tokenizer.json`).isFile;
  } catch {
    return false;
  }
})();
if (!haveSmollm2) console.log(`no tokenizer at ${SMOLLM2}: skipping its tests`);

const TEXTS = [
  "Once upon a time, there was a little robot.",
  "emoji 🤖👩‍👩‍👧 and CJK 世界你好, accents héllo",
  "  leading spaces,\ttabs\n\nand   runs of    spaces\n",
  "Natalia sold clips to 48 of her friends in April.",
];

async function byteTokenizer(): Promise<TextTokenizer> {
  const dir = await Deno.makeTempDir({ prefix: "innerq-tok-" });
  await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(byteLevelTokenizerJson().json));
  try {
    return await TextTokenizer.load(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function checkRoundTrips(t: TextTokenizer) {
  for (const text of TEXTS) {
    const ids = t.encode(text, { addSpecialTokens: false });
    assertEquals(t.decode(ids), text);
    const stream = new StreamDecoder(t);
    const pieces = ids.map((id) => stream.push(id));
    pieces.push(stream.flush());
    assertEquals(pieces.join(""), text);
    assert(
      !pieces.some((p) => p.includes("\uFFFD")),
      `a piece holds half a character: ${JSON.stringify(pieces)}`,
    );
  }
}

Deno.test("byte-level test tokenizer: any text round-trips, merges apply, EOS is last", async () => {
  const t = await byteTokenizer();
  const { vocabSize, eosId } = byteLevelTokenizerJson();
  assertEquals(t.vocabSize, vocabSize);
  assertEquals(t.tokenToId(END_OF_TEXT), eosId);
  assertEquals(eosId, vocabSize - 1);
  checkRoundTrips(t);
  assertEquals(t.encode(" the").length, 1);
  assert(t.encode("the").length < 3);
});

Deno.test({
  name: "SmolLM2 tokenizer: round trips, streaming, ChatML template",
  ignore: !haveSmollm2,
  fn: async () => {
    const t = await TextTokenizer.load(SMOLLM2);
    assertEquals(t.vocabSize, 49152);
    checkRoundTrips(t);
    const prompt = t.applyChatTemplate([{ role: "user", content: "What is 2+2?" }]);
    assertEquals(
      prompt,
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" +
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    );
    const ids = t.encode(prompt, { addSpecialTokens: false });
    assertEquals(ids[0], t.tokenToId("<|im_start|>"));
    assertEquals(t.eosTokenId, t.tokenToId("<|im_end|>"));
    assertEquals(t.decode(ids, { skipSpecialTokens: true }).startsWith("system\n"), true);
  },
});

Deno.test("no chat template and missing or broken files are clear errors naming the file", async () => {
  const t = await byteTokenizer();
  assertEquals(t.hasChatTemplate, false);
  assertThrows(() => t.applyChatTemplate([{ role: "user", content: "hi" }]), /no chat template/);
  await assertRejects(
    TextTokenizer.load("/nonexistent"),
    /\/nonexistent\/tokenizer.json: not found/,
  );
  const dir = await Deno.makeTempDir({ prefix: "innerq-tok-" });
  try {
    await Deno.writeTextFile(`${dir}/tokenizer.json`, "{ not json");
    await assertRejects(TextTokenizer.load(dir), /tokenizer.json: not a valid JSON object/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("stop strings: split across pushes, at the start, overlapping prefixes, none", () => {
  const run = (stops: string[], pushes: string[]) => {
    const m = new StopMatcher(stops);
    let out = "";
    for (const p of pushes) {
      const { emit, stopped } = m.push(p);
      out += emit;
      if (stopped) return { out, stopped };
    }
    return { out: out + m.flush(), stopped: false };
  };
  assertEquals(run(["\n\n"], ["Hello\n", "\nWorld"]), { out: "Hello", stopped: true });
  assertEquals(run(["Q:"], ["Q: what"]), { out: "", stopped: true });
  assertEquals(run(["ab"], ["a", "a", "b", "c"]), { out: "a", stopped: true });
  assertEquals(run(["END"], ["the E", "N", "D"]), { out: "the ", stopped: true });
  assertEquals(run(["END"], ["the E", "N", "d"]), { out: "the ENd", stopped: false });
  assertEquals(run(["xyz", "b"], ["aaxy", "b"]), { out: "aaxy", stopped: true });
  const m = new StopMatcher(["stop"]);
  assertEquals(m.push("so st"), { emit: "so ", stopped: false });
  assertEquals(m.flush(), "st");
});
