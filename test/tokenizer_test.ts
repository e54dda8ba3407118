// Tokenizer: round trips, streaming decode, special tokens, chat templates, stop strings, errors.
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
if (!haveSmollm2) console.log(`no tokenizer at ${SMOLLM2}: skipping the SmolLM2 tests`);

const TEXTS = [
  "Once upon a time, there was a little robot.",
  "emoji 🤖👩‍👩‍👧 and CJK 世界你好, accents héllo",
  "  leading spaces,\ttabs\n\nand   runs of    spaces\n",
  "\n\nnewlines first\r\nthen CRLF\n",
  "Natalia sold clips to 48 of her friends in April.",
  "Spaces before punctuation , . ! ? and do n't", // what transformers' clean-up pass would eat
];

/** A TextTokenizer over files written to a temporary directory. */
async function tokenizerFrom(json: unknown, config?: unknown): Promise<TextTokenizer> {
  const dir = await Deno.makeTempDir({ prefix: "innerq-tok-" });
  try {
    await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(json));
    if (config) await Deno.writeTextFile(`${dir}/tokenizer_config.json`, JSON.stringify(config));
    return await TextTokenizer.load(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const byteTokenizer = () => tokenizerFrom(byteLevelTokenizerJson().json);

/** A tiny tokenizer in Llama 2's layout: SentencePiece "▁" spaces (prepended, stripped again on
 * decode), byte fallback for what the vocabulary lacks, a post-processor that adds <s>. Python's
 * tokenizers gives the same ids and text for TEXTS. */
function sentencePieceJson() {
  const specials = ["<unk>", "<s>", "</s>"];
  const bytes = Array.from(
    { length: 256 },
    (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`,
  );
  const ascii = Array.from({ length: 0x7e - 0x20 }, (_, i) => String.fromCharCode(0x21 + i));
  const merges = [["▁", "t"], ["h", "e"], ["▁t", "he"], ["▁", "a"], ["i", "n"], ["o", "n"]];
  const pieces = [...specials, ...bytes, "▁", ...ascii, ...merges.map(([a, b]) => a + b)];
  const bos = { SpecialToken: { id: "<s>", type_id: 0 } };
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: specials.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: "▁" },
        { type: "Replace", pattern: { String: " " }, content: "▁" },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [bos, { Sequence: { id: "A", type_id: 0 } }],
      pair: [bos, { Sequence: { id: "A", type_id: 0 } }, bos, {
        Sequence: { id: "B", type_id: 1 },
      }],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "▁" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: Object.fromEntries(pieces.map((piece, id) => [piece, id])),
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  };
}

/** Streams ids one at a time; returns the pieces, flush's last. */
function stream(t: TextTokenizer, ids: number[], skipSpecialTokens = false): string[] {
  const decoder = new StreamDecoder(t, { skipSpecialTokens });
  return [...ids.map((id) => decoder.push(id)), decoder.flush()];
}

function checkRoundTripsAndStreaming(t: TextTokenizer) {
  for (const text of TEXTS) {
    const ids = t.encode(text, { addSpecialTokens: false });
    assertEquals(t.decode(ids), text);
    const pieces = stream(t, ids);
    assertEquals(pieces.join(""), text);
    assert(
      !pieces.some((p) => p.includes("\uFFFD")),
      `a piece holds half a character: ${JSON.stringify(pieces)}`,
    );
  }
}

Deno.test("byte-level test tokenizer: any text round-trips and streams, merges apply", async () => {
  const t = await byteTokenizer();
  const { vocabSize, eosId } = byteLevelTokenizerJson();
  assertEquals(t.vocabSize, vocabSize);
  assertEquals(t.tokenToId(END_OF_TEXT), eosId);
  assertEquals(eosId, vocabSize - 1);
  checkRoundTripsAndStreaming(t);
  assertEquals(t.encode(" the").length, 1);
  assert(t.encode("the").length < 3);
  assertEquals(t.encode("the"), t.encode("the", { addSpecialTokens: false })); // no BOS
});

Deno.test("SentencePiece-style tokenizer: leading spaces and byte fallback stream exactly", async () => {
  const t = await tokenizerFrom(sentencePieceJson());
  checkRoundTripsAndStreaming(t);
  // A window that starts mid-text must not lose the space the decoder strips at the start.
  assertEquals(stream(t, t.encode("the cat", { addSpecialTokens: false })).join(""), "the cat");
});

Deno.test("StreamDecoder decodes a short window per token, not everything so far", async () => {
  const t = await byteTokenizer();
  const ids = t.encode(TEXTS.join("").repeat(20), { addSpecialTokens: false });
  let longest = 0;
  const decode = t.decode.bind(t);
  t.decode = (window, opts) => {
    longest = Math.max(longest, window.length);
    return decode(window, opts);
  };
  assertEquals(stream(t, ids).join(""), decode(ids));
  assert(longest <= 8, `decoded ${longest} ids at once`);
});

Deno.test("special tokens: the post-processor's BOS, and add_bos_token / add_eos_token", async () => {
  const json = sentencePieceJson();
  const config = { bos_token: "<s>", eos_token: { content: "</s>" }, unk_token: "<unk>" };
  const plain = (await tokenizerFrom(json)).encode("the cat", { addSpecialTokens: false });
  // Expected ids as transformers 5's PreTrainedTokenizerFast gives them for these configs.
  const cases: [Record<string, boolean>, number[]][] = [
    [{}, [1, ...plain]],
    [{ add_bos_token: false }, plain],
    [{ add_bos_token: true }, [1, ...plain]],
    [{ add_eos_token: true }, [...plain, 2]],
    [{ add_bos_token: true, add_eos_token: true }, [1, ...plain, 2]],
  ];
  for (const [flags, expected] of cases) {
    const t = await tokenizerFrom(json, { ...config, ...flags });
    assertEquals(t.encode("the cat"), expected, JSON.stringify(flags));
    assertEquals(t.encode("the cat", { addSpecialTokens: false }), plain);
  }
  const t = await tokenizerFrom(json, config);
  assertEquals(t.eosTokenId, 2);
  assertEquals(t.decode(t.encode("the cat")), "<s> the cat");
  assertEquals(t.decode(t.encode("the cat"), { skipSpecialTokens: true }), "the cat");
});

Deno.test({
  name: "SmolLM2 tokenizer: round trips, streaming, special tokens, ChatML template",
  ignore: !haveSmollm2,
  fn: async () => {
    const t = await TextTokenizer.load(SMOLLM2);
    assertEquals(t.vocabSize, 49152);
    checkRoundTripsAndStreaming(t);
    const prompt = t.applyChatTemplate([{ role: "user", content: "What is 2+2?" }]);
    assertEquals(
      prompt,
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" +
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    );
    assertEquals(
      t.applyChatTemplate([{ role: "system", content: "Be brief." }, {
        role: "user",
        content: "Hi",
      }], {
        addGenerationPrompt: false,
      }),
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    );
    // No post-processor: special tokens come only from the text, each as one id.
    const ids = t.encode(prompt);
    assertEquals(ids, t.encode(prompt, { addSpecialTokens: false }));
    const imStart = t.tokenToId("<|im_start|>")!, imEnd = t.tokenToId("<|im_end|>")!;
    assertEquals(ids.filter((id) => id === imStart).length, 3);
    assertEquals(t.eosTokenId, imEnd);
    const visible = t.decode(ids, { skipSpecialTokens: true });
    assert(visible.startsWith("system\nYou are"), visible);
    assertEquals(stream(t, ids, true).join(""), visible);
  },
});

Deno.test("chat_template as a list of named templates: the default one is used", async () => {
  const t = await tokenizerFrom(byteLevelTokenizerJson().json, {
    chat_template: [
      { name: "tool_use", template: "tools" },
      { name: "default", template: "{% for m in messages %}[{{ m.content }}]{% endfor %}" },
    ],
  });
  assert(t.hasChatTemplate);
  assertEquals(t.applyChatTemplate([{ role: "user", content: "hi" }]), "[hi]");
});

Deno.test("no chat template and missing or broken files are clear errors naming the file", async () => {
  const t = await byteTokenizer();
  assertEquals(t.hasChatTemplate, false);
  assertThrows(
    () => t.applyChatTemplate([{ role: "user", content: "hi" }]),
    /model has no chat template \(tokenizer_config.json chat_template\)/,
  );
  await assertRejects(
    TextTokenizer.load("/nonexistent"),
    /\/nonexistent\/tokenizer.json: not found/,
  );
  const dir = await Deno.makeTempDir({ prefix: "innerq-tok-" });
  try {
    await Deno.writeTextFile(`${dir}/tokenizer.json`, "{ not json");
    await assertRejects(
      TextTokenizer.load(dir),
      new RegExp(`${dir}/tokenizer.json: not a valid JSON object`),
    );
    await Deno.writeTextFile(
      `${dir}/tokenizer.json`,
      JSON.stringify(byteLevelTokenizerJson().json),
    );
    await Deno.writeTextFile(`${dir}/tokenizer_config.json`, "[1,");
    await assertRejects(TextTokenizer.load(dir), /tokenizer_config.json: not a valid JSON object/);
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
  assertEquals(run(["ab"], ["aab"]), { out: "a", stopped: true });
  assertEquals(run(["END"], ["the E", "N", "D"]), { out: "the ", stopped: true });
  assertEquals(run(["END"], ["the E", "N", "d"]), { out: "the ENd", stopped: false });
  assertEquals(run(["xyz", "b"], ["aaxy", "b"]), { out: "aaxy", stopped: true });
  assertEquals(run([], ["no stops ", "at all"]), { out: "no stops at all", stopped: false });
  const m = new StopMatcher(["stop"]);
  assertEquals(m.push("so st"), { emit: "so ", stopped: false });
  assertEquals(m.flush(), "st");
  assertThrows(() => new StopMatcher(["ok", ""]), /empty/);
});
