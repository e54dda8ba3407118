// Writes a random-weight model of a named shape in the real Hugging Face layout, for tests and
// speed work without real weights:
//   deno run -A scripts/random_model.ts --shape llama3-8b --dtype BF16 --seed 0 DIR
import { parseArgs } from "node:util";
import {
  LLAMA3_ROPE,
  type ShapeName,
  SHAPES,
  writeRandomModel,
} from "../src/model/random_model.ts";
import { type Architecture, ARCHITECTURES } from "../src/model/config.ts";
import { type DType, isDType } from "../src/model/dtype.ts";

const USAGE = `usage: random_model.ts [--shape ${
  Object.keys(SHAPES).join("|")
}] [--dtype F32|F16|BF16]
  [--seed N] [--arch ${ARCHITECTURES.join("|")}] [--config-style v5|v4] [--shards N]
  [--rope-scaling none|llama3] [--layers N] DIR`;

function fail(message: string): never {
  console.error(`random_model: ${message}\n${USAGE}`);
  Deno.exit(2);
}

const { values, positionals } = parseArgs({
  args: Deno.args,
  allowPositionals: true,
  options: {
    shape: { type: "string", default: "tiny" },
    dtype: { type: "string", default: "BF16" },
    seed: { type: "string", default: "0" },
    arch: { type: "string" },
    "config-style": { type: "string", default: "v5" },
    shards: { type: "string", default: "1" },
    "rope-scaling": { type: "string" },
    layers: { type: "string" },
  },
});
if (positionals.length !== 1) fail("expected one output directory");
if (!(values.shape in SHAPES)) fail(`--shape ${values.shape} is not a known shape`);
if (!isDType(values.dtype)) fail(`--dtype ${values.dtype} is not F32, F16 or BF16`);
const arch = values.arch;
if (arch !== undefined && !ARCHITECTURES.includes(arch as Architecture)) {
  fail(`--arch ${arch} is not supported`);
}
const style = values["config-style"];
if (style !== "v5" && style !== "v4") fail(`--config-style must be v5 or v4, got ${style}`);
const ropeScaling = values["rope-scaling"];
if (ropeScaling !== undefined && ropeScaling !== "none" && ropeScaling !== "llama3") {
  fail(`--rope-scaling must be none or llama3, got ${ropeScaling}`);
}
const seed = Number(values.seed), shards = Number(values.shards);
if (!Number.isSafeInteger(seed) || seed < 0) fail(`--seed must be a non-negative integer`);
if (!Number.isSafeInteger(shards) || shards < 1) fail(`--shards must be a positive integer`);
// Fewer layers keep a shape's per-layer kernels: a 2-layer Llama-3-8B (2.8 GB) writes in 34 s on a
// 2-core machine, the whole model (16 GB) in 81 s on the GPU machine.
const layers = values.layers === undefined ? undefined : Number(values.layers);
if (layers !== undefined && (!Number.isSafeInteger(layers) || layers < 1)) {
  fail(`--layers must be a positive integer`);
}

await writeRandomModel(positionals[0], values.shape as ShapeName, {
  seed,
  dtype: values.dtype as DType,
  configStyle: style,
  shards,
  shape: {
    ...(arch ? { architecture: arch as Architecture } : {}),
    ...(layers ? { numLayers: layers } : {}),
    ...(ropeScaling
      ? { ropeScaling: ropeScaling === "llama3" ? { ...LLAMA3_ROPE, factor: 8 } : null }
      : {}),
  },
});
console.error(
  `random_model: wrote ${values.shape} (${values.dtype}, seed ${seed}) to ${positionals[0]}`,
);
