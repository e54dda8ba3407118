// `innerq info`: what a model directory holds and what its KV cache costs, without loading weights.
import { parseArgs } from "node:util";
import { loadConfig } from "../model/config.ts";
import { openModelWeights } from "../model/safetensors.ts";
import { matchTensors } from "../model/weights.ts";
import { KV_SPECS, kvBytesPerToken } from "../kv/spec.ts";
import { defaultModel, EXIT, formatBytes, formatCount, UsageError } from "./common.ts";

export const INFO_HELP = `innerq info: describe a model directory

Usage: innerq info [--model DIR] [--json]
  -m, --model DIR   Hugging Face model directory (default: as for generate)
      --json        one JSON object instead of text
  -h, --help        this help

Exit codes: 0 done, 1 bad model files, 2 bad command line.
`;

export async function runInfo(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        model: { type: "string", short: "m" },
        json: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values;
  if (v.help) {
    console.log(INFO_HELP);
    return EXIT.ok;
  }
  const dir = v.model ?? await defaultModel(v.json ?? false);
  const c = await loadConfig(dir);
  const tensors = matchTensors(dir, c, await openModelWeights(dir));
  const params = tensors.reduce((sum, [, t]) => sum + t.shape.reduce((a, b) => a * b, 1), 0);
  const bytes = tensors.reduce((sum, [, t]) => sum + t.bytes, 0);
  const dtypes = [...new Set(tensors.map(([, t]) => t.dtype))].join(", ");
  const shape = {
    layers: c.numLayers,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
  };
  const kv = Object.fromEntries(KV_SPECS.map((spec) => [spec, kvBytesPerToken(spec, shape)]));
  const info = {
    model: dir,
    architecture: c.architecture,
    params,
    weightBytes: bytes,
    dtypes,
    layers: c.numLayers,
    hiddenSize: c.hiddenSize,
    intermediateSize: c.intermediateSize,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
    vocabSize: c.vocabSize,
    maxPositionEmbeddings: c.maxPositionEmbeddings,
    ropeTheta: c.ropeTheta,
    ropeScaling: c.ropeScaling.type,
    tieWordEmbeddings: c.tieWordEmbeddings,
    kvBytesPerToken: kv,
  };
  if (v.json) {
    console.log(JSON.stringify(info));
    return EXIT.ok;
  }
  const rows: [string, string][] = [
    ["model", dir],
    ["architecture", c.architecture],
    ["parameters", `${formatCount(params)} (${formatBytes(bytes)} as ${dtypes})`],
    ["layers", String(c.numLayers)],
    ["hidden / ffn", `${c.hiddenSize} / ${c.intermediateSize}`],
    ["heads / kv heads", `${c.numHeads} / ${c.numKvHeads} of dim ${c.headDim}`],
    ["vocabulary", String(c.vocabSize)],
    [
      "context",
      `${c.maxPositionEmbeddings} tokens (rope theta ${c.ropeTheta}, scaling ${c.ropeScaling.type})`,
    ],
    ["tied embeddings", String(c.tieWordEmbeddings)],
    ...KV_SPECS.map((spec): [string, string] => [
      `kv cache ${spec}`,
      `${formatBytes(kv[spec])}/token, ${
        formatBytes(kv[spec] * c.maxPositionEmbeddings)
      } at full context`,
    ]),
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  for (const [k, val] of rows) console.log(`${k.padEnd(width)}  ${val}`);
  return EXIT.ok;
}
