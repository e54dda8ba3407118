// Reads a Hugging Face model directory's config.json (+ generation_config.json) into one checked
// ModelConfig. Both config generations are read: transformers 5's `rope_parameters` and the older
// top-level `rope_theta` / `rope_scaling`.

export const ARCHITECTURES = [
  "LlamaForCausalLM",
  "MistralForCausalLM",
  "Qwen2ForCausalLM",
] as const;
export type Architecture = typeof ARCHITECTURES[number];

/** How rotary frequencies are scaled (Hugging Face `rope_type`). */
export type RopeScaling =
  | { type: "default" }
  | { type: "linear"; factor: number }
  | {
    type: "llama3";
    factor: number;
    lowFreqFactor: number;
    highFreqFactor: number;
    originalMaxPositionEmbeddings: number;
  };

export interface ModelConfig {
  architecture: Architecture;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** q, k and v projections carry a bias (Qwen2 always; Llama with attention_bias). */
  qkvBias: boolean;
  /** o_proj carries a bias (Llama with attention_bias). */
  oBias: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
  /** The dtype the config declares (`dtype` or `torch_dtype`), for display. */
  dtype: string;
  /** Mistral's sliding window, when the model uses one. */
  slidingWindow: number | null;
}

type Json = Record<string, unknown>;

class ConfigReader {
  constructor(readonly file: string, readonly json: Json) {}

  fail(what: string): never {
    throw new Error(`${this.file}: ${what}`);
  }

  int(key: string, fallback?: number, json: Json = this.json): number {
    const v = json[key] ?? fallback;
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
      this.fail(`"${key}" must be a positive integer, got ${JSON.stringify(json[key])}`);
    }
    return v;
  }

  num(key: string, fallback?: number, json: Json = this.json): number {
    const v = json[key] ?? fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      this.fail(`"${key}" must be a positive number, got ${JSON.stringify(json[key])}`);
    }
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.json[key] ?? fallback;
    if (typeof v !== "boolean") {
      this.fail(`"${key}" must be true or false, got ${JSON.stringify(v)}`);
    }
    return v;
  }
}

async function readJson(path: string, required: boolean): Promise<Json | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (!required && e instanceof Deno.errors.NotFound) return null;
    if (e instanceof Deno.errors.NotFound) {
      throw new Error(`${path}: not found (expected a Hugging Face model directory)`);
    }
    throw e;
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new Error(`${path}: expected a JSON object`);
  }
  return json as Json;
}

function tokenIds(v: unknown): number[] {
  const list = Array.isArray(v) ? v : v === undefined || v === null ? [] : [v];
  return list.filter((x): x is number => Number.isSafeInteger(x) && x >= 0);
}

function readRope(r: ConfigReader): { theta: number; scaling: RopeScaling } {
  // transformers 5: rope_parameters = {rope_type, rope_theta, factor, ...}; before: rope_theta + rope_scaling.
  const params = r.json.rope_parameters as Json | undefined;
  const scaling = (params ?? r.json.rope_scaling ?? null) as Json | null;
  const theta = r.num("rope_theta", 10000, params ?? r.json);
  if (scaling === null) return { theta, scaling: { type: "default" } };
  const type = scaling.rope_type ?? scaling.type ?? "default";
  switch (type) {
    case "default":
      return { theta, scaling: { type: "default" } };
    case "linear":
      return { theta, scaling: { type: "linear", factor: r.num("factor", undefined, scaling) } };
    case "llama3":
      return {
        theta,
        scaling: {
          type: "llama3",
          factor: r.num("factor", undefined, scaling),
          lowFreqFactor: r.num("low_freq_factor", undefined, scaling),
          highFreqFactor: r.num("high_freq_factor", undefined, scaling),
          originalMaxPositionEmbeddings: r.int(
            "original_max_position_embeddings",
            undefined,
            scaling,
          ),
        },
      };
    default:
      r.fail(
        `rope type ${JSON.stringify(type)} is not supported (supported: default, linear, llama3)`,
      );
  }
}

/** Parses config.json text (already read) plus an optional generation config. */
export function parseConfig(file: string, json: Json, generation: Json | null = null): ModelConfig {
  const r = new ConfigReader(file, json);
  const archs = json.architectures;
  const architecture = Array.isArray(archs) ? archs[0] : undefined;
  if (!ARCHITECTURES.includes(architecture)) {
    r.fail(
      `architecture ${JSON.stringify(architecture ?? null)} is not supported (supported: ${
        ARCHITECTURES.join(", ")
      })`,
    );
  }
  const hiddenSize = r.int("hidden_size");
  const numHeads = r.int("num_attention_heads");
  const numKvHeads = r.int("num_key_value_heads", numHeads);
  if (numHeads % numKvHeads) {
    r.fail(
      `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`,
    );
  }
  const headDim = r.int("head_dim", hiddenSize / numHeads);
  if (headDim % 2) r.fail(`head_dim ${headDim} must be even for rotary embeddings`);
  const act = json.hidden_act ?? "silu";
  if (act !== "silu") {
    r.fail(`hidden_act ${JSON.stringify(act)} is not supported (expected "silu")`);
  }
  const attentionBias = r.bool("attention_bias", false);
  const rope = readRope(r);
  const eos = tokenIds(generation?.eos_token_id ?? json.eos_token_id);
  const bos = tokenIds(generation?.bos_token_id ?? json.bos_token_id);
  const useSliding = json.use_sliding_window !== false && typeof json.sliding_window === "number";
  return {
    architecture: architecture as Architecture,
    vocabSize: r.int("vocab_size"),
    hiddenSize,
    intermediateSize: r.int("intermediate_size"),
    numLayers: r.int("num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: r.num("rms_norm_eps", 1e-6),
    ropeTheta: rope.theta,
    ropeScaling: rope.scaling,
    maxPositionEmbeddings: r.int("max_position_embeddings", 2048),
    tieWordEmbeddings: r.bool("tie_word_embeddings", false),
    qkvBias: architecture === "Qwen2ForCausalLM" || attentionBias,
    oBias: architecture !== "Qwen2ForCausalLM" && attentionBias,
    bosTokenId: bos[0] ?? null,
    eosTokenIds: eos,
    dtype: String(json.dtype ?? json.torch_dtype ?? "unknown"),
    slidingWindow: useSliding ? json.sliding_window as number : null,
  };
}

/** Reads DIR/config.json and, when present, DIR/generation_config.json. */
export async function loadConfig(dir: string): Promise<ModelConfig> {
  const file = `${dir}/config.json`;
  const json = (await readJson(file, true))!;
  const generation = await readJson(`${dir}/generation_config.json`, false);
  return parseConfig(file, json, generation);
}

/** The rotary inverse frequencies, inv_freq[head_dim / 2], as transformers computes them. */
export function ropeInvFreq(c: ModelConfig): Float32Array {
  const half = c.headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / Math.pow(c.ropeTheta, (2 * i) / c.headDim);
  const s = c.ropeScaling;
  if (s.type === "linear") {
    for (let i = 0; i < half; i++) inv[i] /= s.factor;
  } else if (s.type === "llama3") {
    // Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / inv[i];
      if (wavelen > lowWavelen) {
        inv[i] = inv[i] / s.factor;
      } else if (wavelen >= highWavelen) {
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) /
          (s.highFreqFactor - s.lowFreqFactor);
        inv[i] = (1 - smooth) * (inv[i] / s.factor) + smooth * inv[i];
      }
    }
  }
  return inv;
}
