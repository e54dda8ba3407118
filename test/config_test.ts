// config.json parsing: both Hugging Face config generations, GQA, biases, rope scaling, errors.
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";

function assertAlmostEquals(actual: number, expected: number, tolerance: number): void {
  assert(
    Math.abs(actual - expected) <= tolerance,
    `${actual} is not within ${tolerance} of ${expected}`,
  );
}
import { parseConfig, ropeInvFreq } from "../src/model/config.ts";

const LLAMA = {
  architectures: ["LlamaForCausalLM"],
  vocab_size: 128256,
  hidden_size: 4096,
  intermediate_size: 14336,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  max_position_embeddings: 131072,
  bos_token_id: 128000,
  eos_token_id: 128001,
};
const LLAMA3_SCALING = {
  factor: 8.0,
  low_freq_factor: 1.0,
  high_freq_factor: 4.0,
  original_max_position_embeddings: 8192,
};

Deno.test("transformers 5 rope_parameters and the older rope_theta/rope_scaling read the same", () => {
  const v5 = parseConfig("config.json", {
    ...LLAMA,
    rope_parameters: { rope_type: "llama3", rope_theta: 500000, ...LLAMA3_SCALING },
  });
  const v4 = parseConfig("config.json", {
    ...LLAMA,
    rope_theta: 500000,
    rope_scaling: { rope_type: "llama3", ...LLAMA3_SCALING },
  });
  const v4OldKey = parseConfig("config.json", {
    ...LLAMA,
    rope_theta: 500000,
    rope_scaling: { type: "llama3", ...LLAMA3_SCALING },
  });
  assertEquals(v5, v4);
  assertEquals(v4OldKey, v4);
  assertEquals(v5.ropeTheta, 500000);
  assertEquals(v5.ropeScaling, {
    type: "llama3",
    factor: 8,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  assertEquals(v5.headDim, 128);
  assertEquals(v5.numKvHeads, 8);
  assertEquals(v5.bosTokenId, 128000);
  assertEquals(v5.eosTokenIds, [128001]);
});

Deno.test("defaults: no rope entry is theta 10000 unscaled; kv heads default to heads", () => {
  const { num_key_value_heads: _, ...noGqa } = LLAMA;
  const c = parseConfig("config.json", noGqa);
  assertEquals(c.ropeTheta, 10000);
  assertEquals(c.ropeScaling, { type: "default" });
  assertEquals(c.numKvHeads, 32);
  assertEquals(c.tieWordEmbeddings, false);
  assertEquals(c.qkvBias, false);
});

Deno.test("generation_config.json's eos list wins over config.json", () => {
  const c = parseConfig("config.json", LLAMA, { eos_token_id: [128001, 128009], bos_token_id: 1 });
  assertEquals(c.eosTokenIds, [128001, 128009]);
  assertEquals(c.bosTokenId, 1);
});

Deno.test("Qwen2 has q/k/v bias and no o bias; Llama attention_bias has both", () => {
  const qwen = parseConfig("config.json", { ...LLAMA, architectures: ["Qwen2ForCausalLM"] });
  assertEquals([qwen.qkvBias, qwen.oBias], [true, false]);
  const llama = parseConfig("config.json", { ...LLAMA, attention_bias: true });
  assertEquals([llama.qkvBias, llama.oBias], [true, true]);
});

Deno.test("Mistral reads head_dim and its sliding window", () => {
  const c = parseConfig("config.json", {
    ...LLAMA,
    architectures: ["MistralForCausalLM"],
    head_dim: 64,
    sliding_window: 4096,
  });
  assertEquals(c.headDim, 64);
  assertEquals(c.slidingWindow, 4096);
});

Deno.test("unsupported architecture, bad GQA and bad fields are one clear error naming the file", () => {
  assertThrows(
    () => parseConfig("m/config.json", { ...LLAMA, architectures: ["GPT2LMHeadModel"] }),
    /m\/config.json: architecture "GPT2LMHeadModel" is not supported \(supported: LlamaForCausalLM/,
  );
  assertThrows(
    () => parseConfig("m/config.json", { ...LLAMA, num_key_value_heads: 5 }),
    /m\/config.json: num_attention_heads 32 is not a multiple of num_key_value_heads 5/,
  );
  assertThrows(
    () => parseConfig("m/config.json", { ...LLAMA, hidden_size: "4096" }),
    /m\/config.json: "hidden_size" must be a positive integer, got "4096"/,
  );
  assertThrows(
    () =>
      parseConfig("m/config.json", { ...LLAMA, rope_scaling: { rope_type: "yarn", factor: 4 } }),
    /rope type "yarn" is not supported/,
  );
  assertThrows(
    () => parseConfig("m/config.json", { ...LLAMA, hidden_act: "gelu" }),
    /hidden_act "gelu" is not supported/,
  );
});

Deno.test("llama3 rope scaling keeps short wavelengths, slows long ones, blends between", () => {
  const plain = ropeInvFreq(parseConfig("c", { ...LLAMA, rope_theta: 500000 }));
  const scaled = ropeInvFreq(
    parseConfig("c", {
      ...LLAMA,
      rope_theta: 500000,
      rope_scaling: { rope_type: "llama3", ...LLAMA3_SCALING },
    }),
  );
  assertEquals(plain.length, 64);
  let kept = 0, slowed = 0, blended = 0;
  for (let i = 0; i < 64; i++) {
    const wavelen = 2 * Math.PI / plain[i];
    if (wavelen < 8192 / 4) {
      assertEquals(scaled[i], plain[i]);
      kept++;
    } else if (wavelen > 8192) {
      assertAlmostEquals(scaled[i], plain[i] / 8, plain[i] * 1e-6);
      slowed++;
    } else {
      const smooth = (8192 / wavelen - 1) / 3;
      assertAlmostEquals(
        scaled[i],
        (1 - smooth) * plain[i] / 8 + smooth * plain[i],
        plain[i] * 1e-6,
      );
      blended++;
    }
  }
  assert(kept > 0 && slowed > 0 && blended > 0, `${kept} ${slowed} ${blended}`);
  // theta^(-2i/d) at i = 1, d = 128.
  assertAlmostEquals(plain[1], Math.pow(500000, -2 / 128), 1e-7);
});

Deno.test("linear rope scaling divides every frequency", () => {
  const c = parseConfig("c", { ...LLAMA, rope_scaling: { type: "linear", factor: 2 } });
  const plain = ropeInvFreq(parseConfig("c", LLAMA));
  ropeInvFreq(c).forEach((f, i) => assertAlmostEquals(f, plain[i] / 2, plain[i] * 1e-6));
});
