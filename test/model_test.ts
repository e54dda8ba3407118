// The forward pass end to end on the CPU backend: tiny random-weight models written in the real
// formats, checked against themselves (prefill vs decode, chunking, config generations) and against
// logits of Hugging Face transformers (test/fixtures/hf_reference.json, made by make_hf_reference.py).
import { deepStrictEqual as assertEquals, ok as assert } from "node:assert";
import { parseArgs } from "node:util";
import { Backend, DType } from "../ffi/backend.ts";
import { gemmInputDtype, planBytes, Transformer } from "../src/engine/forward.ts";
import { generate } from "../src/engine/generate.ts";
import { GREEDY, Rng, Sampler } from "../src/engine/sampler.ts";
import { type Architecture, loadConfig } from "../src/model/config.ts";
import {
  LLAMA3_ROPE,
  type RandomModelOptions,
  type ShapeName,
  writeRandomModel,
} from "../src/model/random_model.ts";
import { layerMatrixDtype, readTensors } from "../src/model/weights.ts";
import { parseKvSpec } from "../src/kv/spec.ts";
import { randomInts } from "./random.ts";
import { backendAs } from "./backend_as.ts";

const SHARED_MODELS = new URL("../../shared/models/", import.meta.url).pathname;

/** Max |a - b| over max |b|: errors relative to the logits' scale. */
function scaledError(a: Float32Array | number[], b: Float32Array | number[]): number {
  let err = 0, scale = 0;
  for (let i = 0; i < b.length; i++) {
    err = Math.max(err, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return err / scale;
}

async function withModel<T>(
  opts: RandomModelOptions & { shape?: RandomModelOptions["shape"] },
  fn: (dir: string) => Promise<T>,
): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "innerq-model-" });
  try {
    await writeRandomModel(dir, "tiny", opts);
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Logits (rows, vocab) for `tokens` fed in chunks of `chunk`. */
async function logitsOf(
  dir: string,
  tokens: Int32Array,
  opts: { chunk: number; kv?: string; threads?: number; asCuda?: boolean },
): Promise<Float32Array> {
  const config = await loadConfig(dir);
  using cpu = Backend.open("cpu", { threads: opts.threads ?? 2 });
  const backend = opts.asCuda ? backendAs(cpu, "cuda") : cpu;
  using model = await Transformer.load(backend, dir, config, {
    ctx: 256,
    kv: opts.kv ?? "fp32",
    chunk: opts.chunk,
    allLogits: true,
  });
  const vocab = config.vocabSize;
  const out = new Float32Array(tokens.length * vocab);
  for (let pos = 0; pos < tokens.length; pos += opts.chunk) {
    const ids = tokens.subarray(pos, pos + opts.chunk);
    const logits = model.forward(model.stageTokens(ids), pos, ids.length);
    backend.download(logits, out.subarray(pos * vocab, (pos + ids.length) * vocab));
  }
  return out;
}

Deno.test("prefill logits equal token-by-token decode logits (fp16 and fp32 caches)", async () => {
  await withModel({ seed: 3, dtype: "BF16" }, async (dir) => {
    const vocab = (await loadConfig(dir)).vocabSize;
    const tokens = randomInts(new Rng(3), 40, vocab);
    for (const kv of ["fp16", "fp32"] as const) {
      const prefilled = await logitsOf(dir, tokens, { chunk: 40, kv });
      const decoded = await logitsOf(dir, tokens, { chunk: 1, kv });
      const chunked = await logitsOf(dir, tokens, { chunk: 7, kv });
      const err = scaledError(decoded, prefilled);
      assert(err < 1e-5, `${kv}: decode vs prefill error ${err}`);
      assert(scaledError(chunked, prefilled) < 1e-5, `${kv}: chunked prefill differs`);
    }
  });
});

Deno.test("decode's fused q/k/v (biases included) and gate/up GEMVs equal prefill's GEMMs", async () => {
  await withModel(
    { seed: 6, dtype: "F32", shape: { architecture: "Qwen2ForCausalLM" } },
    async (dir) => {
      const config = await loadConfig(dir);
      assert(config.qkvBias, "the Qwen2 shape has q/k/v biases");
      {
        using cpu = Backend.open("cpu");
        using model = await Transformer.load(cpu, dir, config, { ctx: 16 });
        const layer = model.weights.layers[0];
        assert(layer.wQkv && layer.bQkv && layer.wGateUp, "q/k/v, their biases and gate/up fused");
        assertEquals(layer.wQkv.shape, [
          (config.numHeads + 2 * config.numKvHeads) * config.headDim,
          config.hiddenSize,
        ]);
      }
      const tokens = randomInts(new Rng(6), 12, config.vocabSize);
      const err = scaledError(
        await logitsOf(dir, tokens, { chunk: 1 }),
        await logitsOf(dir, tokens, { chunk: 12 }),
      );
      assert(err < 1e-5, `decode vs prefill error ${err}`);
    },
  );
});

Deno.test("threads do not change logits", async () => {
  await withModel({ seed: 4, dtype: "F16" }, async (dir) => {
    const tokens = randomInts(new Rng(4), 20, (await loadConfig(dir)).vocabSize);
    const one = await logitsOf(dir, tokens, { chunk: 8, threads: 1 });
    const three = await logitsOf(dir, tokens, { chunk: 8, threads: 3 });
    assertEquals(three, one);
  });
});

Deno.test("both config generations and sharded weights give the same logits", async () => {
  const tokens = Int32Array.from([5, 17, 99, 3, 250, 42]);
  const v5 = await withModel(
    { seed: 5, configStyle: "v5" },
    (dir) => logitsOf(dir, tokens, { chunk: 6 }),
  );
  const v4 = await withModel(
    { seed: 5, configStyle: "v4", shards: 3 },
    (dir) => logitsOf(dir, tokens, { chunk: 6 }),
  );
  assertEquals(v4, v5);
});

// Prefill on CUDA with fp16/bf16 layers: rmsnorm and swiglu write the weights' type for the GEMMs
// (on a GPU the bits of fp32 activations, cuda_test.ts checks the ops; here the CPU's kernels keep
// x in fp32 otherwise, so the logits move by the rounding, as the GPU's did against the CPU's).
Deno.test("fp16/bf16 GEMM inputs where the backend is CUDA: planned, prefill only, near fp32", async () => {
  for (const dtype of ["BF16", "F16"] as const) {
    await withModel({ seed: 6, dtype }, async (dir) => {
      const config = await loadConfig(dir);
      const tokens = randomInts(new Rng(6), 20, config.vocabSize);
      const fp32 = await logitsOf(dir, tokens, { chunk: 8, kv: "fp16" });
      const narrow = await logitsOf(dir, tokens, { chunk: 8, kv: "fp16", asCuda: true });
      const err = scaledError(narrow, fp32);
      assert(err > 0 && err < 3e-2, `${dtype}: prefill differs by ${err} of the largest logit`);
      // decode (one token per call) keeps fp32 activations: the same bits
      assertEquals(
        await logitsOf(dir, tokens, { chunk: 1, kv: "fp16", asCuda: true }),
        await logitsOf(dir, tokens, { chunk: 1, kv: "fp16" }),
      );
      // the state holds what planBytes counts: the two narrow buffers on CUDA only
      using cpu = Backend.open("cpu", { threads: 1 });
      const kv = parseKvSpec("fp16"), ctx = 40, chunk = 8;
      for (const be of [cpu, backendAs(cpu, "cuda")]) {
        using model = await Transformer.load(be, dir, config, { ctx, chunk, kv });
        const gemmDtype = be.kind === "cuda" ? DType[dtype] : DType.F32;
        assertEquals(model.gemmDtype, gemmDtype);
        const allocated = model.state.buffers.reduce((sum, b) => sum + b.bytes, 0);
        assertEquals(allocated, planBytes(be, config, kv, ctx, { chunk, gemmDtype }).stateBytes);
      }
      const extra = planBytes(cpu, config, kv, ctx, { chunk, gemmDtype: DType[dtype] }).stateBytes -
        planBytes(cpu, config, kv, ctx, { chunk }).stateBytes;
      assertEquals(extra, 2 * chunk * (config.hiddenSize + config.intermediateSize));
    });
  }
});

Deno.test("planBytes: a quantized cache's prompt scratch is one layer's fp16 K and V, on CUDA only", async () => {
  // head_dim 32: the quantized caches' smallest
  await withModel({ seed: 8, shape: { hiddenSize: 128, headDim: 32 } }, async (dir) => {
    const config = await loadConfig(dir);
    using cpu = Backend.open("cpu", { threads: 1 });
    const cuda = backendAs(cpu, "cuda"), ctx = 96;
    const [fp16, innerq, kivi] = ["fp16", "innerq:k2v2", "kivi:k4v4"].map(parseKvSpec);
    const layerFp16 = planBytes(cpu, config, fp16, ctx).cacheBytes / config.numLayers;
    // calls whose (query, head) rows fit one block of 128 a KV head unpack in place: no scratch
    const inPlace = 128 / (config.numHeads / config.numKvHeads);
    assert(inPlace < ctx, "the default chunk (the context) needs the scratch");
    for (const kv of [innerq, kivi]) {
      assertEquals(planBytes(cuda, config, kv, ctx).scratchBytes, layerFp16);
      assertEquals(
        planBytes(cuda, config, kv, ctx, { chunk: inPlace + 1 }).scratchBytes,
        layerFp16,
      );
      assertEquals(planBytes(cuda, config, kv, ctx, { chunk: inPlace }).scratchBytes, 0);
      assertEquals(planBytes(cpu, config, kv, ctx).scratchBytes, 0);
    }
    assertEquals(planBytes(cuda, config, fp16, ctx).scratchBytes, 0);
  });
});

Deno.test("gemmInputDtype: the layers' fp16/bf16 on CUDA only, fp32 for mixed or fp32 layers", async () => {
  await withModel({ seed: 7, dtype: "BF16" }, async (dir) => {
    const config = await loadConfig(dir);
    const tensors = await readTensors(dir, config);
    assertEquals(layerMatrixDtype(tensors), DType.BF16);
    const retyped = (name: string, to: "F16" | "F32") =>
      tensors.map(([e, t]) => [e, e.name === name ? { ...t, dtype: to } : t] as typeof tensors[0]);
    // the embedding (and lm head) are not layer matrices; one down projection in fp16 is
    assertEquals(layerMatrixDtype(retyped("model.embed_tokens.weight", "F32")), DType.BF16);
    assertEquals(layerMatrixDtype(retyped("model.layers.1.mlp.down_proj.weight", "F16")), null);
    using cpu = Backend.open("cpu", { threads: 1 });
    const cuda = backendAs(cpu, "cuda");
    assertEquals(gemmInputDtype(cpu, DType.BF16), DType.F32);
    assertEquals(gemmInputDtype(cuda, DType.BF16), DType.BF16);
    assertEquals(gemmInputDtype(cuda, DType.F16), DType.F16);
    assertEquals(gemmInputDtype(cuda, DType.F32), DType.F32);
    assertEquals(gemmInputDtype(cuda, null), DType.F32);
  });
});

interface ReferenceCase {
  name: string;
  args: string[];
  tokens: number[];
  rows: number[];
  logits: number[][];
  hf_fp32_vs_fp64_max_abs: number;
}

/** The writer options scripts/random_model.ts derives from the fixture's arguments. */
function writerOptions(args: string[]): { shape: ShapeName; opts: RandomModelOptions } {
  const { values: v } = parseArgs({
    args,
    options: {
      shape: { type: "string" },
      dtype: { type: "string" },
      seed: { type: "string" },
      arch: { type: "string" },
      "config-style": { type: "string" },
      "rope-scaling": { type: "string" },
    },
  });
  const rope = v["rope-scaling"];
  return {
    shape: v.shape as ShapeName,
    opts: {
      seed: Number(v.seed),
      dtype: v.dtype as "F32",
      configStyle: v["config-style"] as "v5" | "v4",
      shape: {
        architecture: v.arch as Architecture,
        ...(rope ? { ropeScaling: rope === "llama3" ? { ...LLAMA3_ROPE, factor: 8 } : null } : {}),
      },
    },
  };
}

const fixture = JSON.parse(
  await Deno.readTextFile(new URL("fixtures/hf_reference.json", import.meta.url)),
) as { transformers: string; cases: ReferenceCase[] };

for (const c of fixture.cases) {
  Deno.test(`fp32 logits match transformers ${fixture.transformers} within 1e-4: ${c.name}`, async () => {
    const { shape, opts } = writerOptions(c.args);
    assertEquals(shape, "tiny");
    await withModel(opts, async (dir) => {
      const tokens = Int32Array.from(c.tokens);
      const ours = await logitsOf(dir, tokens, { chunk: 64, kv: "fp32" });
      const vocab = c.logits[0].length;
      let worst = 0;
      c.rows.forEach((row, i) => {
        const mine = ours.subarray(row * vocab, (row + 1) * vocab);
        for (let j = 0; j < vocab; j++) worst = Math.max(worst, Math.abs(mine[j] - c.logits[i][j]));
      });
      console.log(`  ${c.name}: max |ours - transformers| = ${worst.toExponential(2)}`);
      assert(worst < 1e-4, `max logit error ${worst}`);
    });
  });
}

const sharedModels = ["gsmwiki-28m", "gsmwiki-28m-kout"].map((m) => SHARED_MODELS + m);
const haveShared = sharedModels.every((dir) => {
  try {
    return Deno.statSync(`${dir}/config.json`).isFile;
  } catch {
    return false;
  }
});
if (!haveShared) console.log(`no trained models in ${SHARED_MODELS}: skipping their tests`);

async function greedyTokens(dir: string, prompt: number[], n: number): Promise<number[]> {
  const config = await loadConfig(dir);
  using backend = Backend.open("cpu");
  using model = await Transformer.load(backend, dir, config, { ctx: 128, kv: "fp16" });
  using sampler = new Sampler(backend, GREEDY, config.vocabSize);
  const out: number[] = [];
  const ids = Int32Array.from(prompt);
  for await (const id of generate(model, ids, sampler, { maxTokens: n, eosTokenIds: [] })) {
    out.push(id);
  }
  return out;
}

Deno.test({
  name:
    "trained model: greedy generation is deterministic and the key-outlier twin gives the same tokens",
  ignore: !haveShared,
  fn: async () => {
    const { TextTokenizer } = await import("../src/tokenizer.ts");
    const tokenizer = await TextTokenizer.load(sharedModels[0]);
    const prompt = tokenizer.encode("Natalia sold clips to 48 of her friends in April, and then");
    const first = await greedyTokens(sharedModels[0], prompt, 24);
    const again = await greedyTokens(sharedModels[0], prompt, 24);
    const twin = await greedyTokens(sharedModels[1], prompt, 24);
    assertEquals(first.length, 24);
    assertEquals(again, first);
    assertEquals(twin, first);
    console.log(`  greedy: ${JSON.stringify(tokenizer.decode(first))}`);
  },
});
