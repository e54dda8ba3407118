// Writes a Llama-family model with seeded random weights in the real Hugging Face layout
// (config.json, generation_config.json, safetensors, tokenizer.json): for tests, for the default
// model where no trained one is at hand, and for speed work at real shapes.
import { byteLevelTokenizerJson } from "./byte_tokenizer.ts";
import { type DType, f32ToBf16, f32ToF16 } from "./dtype.ts";
import {
  type TensorToWrite,
  writeSafetensors,
  writeShardedSafetensors,
} from "./safetensors_writer.ts";
import { expectedTensors } from "./weights.ts";
import { type ModelConfig, parseConfig } from "./config.ts";

/** The config fields a written model chooses; the rest follow from them. */
export type ModelShape =
  & Pick<
    ModelConfig,
    | "architecture"
    | "hiddenSize"
    | "intermediateSize"
    | "numLayers"
    | "numHeads"
    | "numKvHeads"
    | "headDim"
    | "tieWordEmbeddings"
    | "ropeTheta"
    | "maxPositionEmbeddings"
  >
  & {
    /** null: the byte-level test tokenizer's vocabulary. */
    vocabSize: number | null;
    /** Hugging Face rope scaling parameters (as written to config.json), e.g. Llama 3.1's llama3
     * type; null for none. */
    ropeScaling: Record<string, unknown> | null;
  };

/** Llama 3.1's rope scaling, less its factor. */
export const LLAMA3_ROPE = {
  rope_type: "llama3",
  low_freq_factor: 1,
  high_freq_factor: 4,
  original_max_position_embeddings: 8192,
};

/** Named shapes: a tiny one for tests and the default, and real model shapes for speed work. */
export const SHAPES = {
  tiny: {
    architecture: "LlamaForCausalLM",
    hiddenSize: 64,
    intermediateSize: 160,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 16,
    vocabSize: null,
    tieWordEmbeddings: true,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: 512,
  },
  "llama3.2-1b": {
    architecture: "LlamaForCausalLM",
    hiddenSize: 2048,
    intermediateSize: 8192,
    numLayers: 16,
    numHeads: 32,
    numKvHeads: 8,
    headDim: 64,
    vocabSize: 128256,
    tieWordEmbeddings: true,
    ropeTheta: 500000,
    ropeScaling: { ...LLAMA3_ROPE, factor: 32 },
    maxPositionEmbeddings: 131072,
  },
  "llama3-8b": {
    architecture: "LlamaForCausalLM",
    hiddenSize: 4096,
    intermediateSize: 14336,
    numLayers: 32,
    numHeads: 32,
    numKvHeads: 8,
    headDim: 128,
    vocabSize: 128256,
    tieWordEmbeddings: false,
    ropeTheta: 500000,
    ropeScaling: { ...LLAMA3_ROPE, factor: 8 },
    maxPositionEmbeddings: 131072,
  },
} as const satisfies Record<string, ModelShape>;

export type ShapeName = keyof typeof SHAPES;

export interface RandomModelOptions {
  seed?: number;
  dtype?: DType;
  /** "v5" writes transformers 5's rope_parameters; "v4" the older top-level rope_theta / rope_scaling. */
  configStyle?: "v5" | "v4";
  /** Safetensors shards: 1 writes model.safetensors, more write an index. */
  shards?: number;
  /** Overrides of the named shape. */
  shape?: Partial<ModelShape>;
}

/** A seeded stream of uniform numbers (mulberry32), per tensor so tensors don't depend on order. */
function uniforms(seed: number, count: number, scale: number, offset = 0): Float32Array {
  const out = new Float32Array(count);
  let s = seed >>> 0;
  for (let i = 0; i < count; i++) {
    let t = (s = (s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = offset + scale * ((((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1);
  }
  return out;
}

function nameSeed(seed: number, name: string): number {
  let h = seed ^ 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

function encode(values: Float32Array, dtype: DType): Uint8Array {
  if (dtype === "F32") return new Uint8Array(values.buffer);
  const half = dtype === "BF16" ? f32ToBf16(values) : f32ToF16(values);
  return new Uint8Array(half.buffer);
}

function configJson(
  shape: ModelShape,
  vocabSize: number,
  eosId: number,
  dtype: DType,
  style: "v5" | "v4",
) {
  const torchDtype = { F32: "float32", F16: "float16", BF16: "bfloat16" }[dtype];
  const rope = style === "v5"
    ? {
      rope_parameters: { rope_theta: shape.ropeTheta, rope_type: "default", ...shape.ropeScaling },
    }
    : { rope_theta: shape.ropeTheta, rope_scaling: shape.ropeScaling };
  return {
    architectures: [shape.architecture],
    model_type: shape.architecture === "Qwen2ForCausalLM"
      ? "qwen2"
      : shape.architecture === "MistralForCausalLM"
      ? "mistral"
      : "llama",
    hidden_size: shape.hiddenSize,
    intermediate_size: shape.intermediateSize,
    num_hidden_layers: shape.numLayers,
    num_attention_heads: shape.numHeads,
    num_key_value_heads: shape.numKvHeads,
    head_dim: shape.headDim,
    hidden_act: "silu",
    max_position_embeddings: shape.maxPositionEmbeddings,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: shape.tieWordEmbeddings,
    vocab_size: vocabSize,
    bos_token_id: eosId,
    eos_token_id: eosId,
    [style === "v5" ? "dtype" : "torch_dtype"]: torchDtype,
    ...rope,
  };
}

/** Writes a random-weight model of a named shape into DIR (created if needed). */
export async function writeRandomModel(
  dir: string,
  name: ShapeName,
  opts: RandomModelOptions = {},
): Promise<void> {
  const shape: ModelShape = { ...SHAPES[name], ...opts.shape };
  const seed = opts.seed ?? 0, dtype = opts.dtype ?? "BF16";
  const tokenizer = byteLevelTokenizerJson();
  const vocabSize = shape.vocabSize ?? tokenizer.vocabSize;
  const config = configJson(shape, vocabSize, tokenizer.eosId, dtype, opts.configStyle ?? "v5");
  const tensors: TensorToWrite[] = expectedTensors(parseConfig("config.json", config)).map((t) => {
    const count = t.shape.reduce((a, b) => a * b, 1);
    const s = nameSeed(seed, t.name);
    // Norm weights near 1, biases small, matrices with unit-variance outputs for unit-variance inputs.
    const values = t.name.endsWith("norm.weight")
      ? uniforms(s, count, 0.1, 1)
      : t.kind === "vector"
      ? uniforms(s, count, 0.1)
      : uniforms(s, count, Math.sqrt(3 / t.shape[1]));
    return { name: t.name, dtype, shape: t.shape, data: encode(values, dtype) };
  });
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config, null, 2) + "\n");
  await Deno.writeTextFile(
    `${dir}/generation_config.json`,
    JSON.stringify({ bos_token_id: tokenizer.eosId, eos_token_id: tokenizer.eosId }, null, 2) +
      "\n",
  );
  await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(tokenizer.json));
  const shards = opts.shards ?? 1;
  if (shards > 1) await writeShardedSafetensors(dir, tensors, shards);
  else await writeSafetensors(`${dir}/model.safetensors`, tensors);
}
