// `innerq info`: what a model directory holds and what its KV cache costs, without loading weights.
import { parseArgs } from "node:util";
import { gemmInputDtype, planBytes } from "../engine/forward.ts";
import { loadConfig } from "../model/config.ts";
import { deviceWeightBytes, layerMatrixDtype, readTensors } from "../model/weights.ts";
import { checkKvSpec, kvBytesPerToken } from "../kv/spec.ts";
import {
  defaultModel,
  deviceFlag,
  EXIT,
  formatBytes,
  formatCount,
  kvSpecFlag,
  openBackend,
  UsageError,
} from "./common.ts";

export const INFO_HELP = `innerq info: describe a model directory

Usage: innerq info [--model DIR] [--kv SPEC ...] [--device D] [--json]
  -m, --model DIR   Hugging Face model directory (default: as for generate)
      --kv SPEC     a KV cache spec to report bytes per token for (repeatable; default: fp16
                    and the main innerq and kivi settings)
      --device D    auto (default), cuda or cpu: with a GPU, also the longest context each spec
                    fits in its free memory beside the weights, activations and a quantized
                    cache's prompt scratch (as generate would plan them)
      --json        one JSON object instead of text
  -h, --help        this help

Exit codes: 0 done, 1 bad model files, 2 bad command line.
`;

const DEFAULT_SPECS = [
  "fp16",
  "innerq:k8v8",
  "innerq:k4v4",
  "innerq:k4v2",
  "innerq:k2v2",
  "kivi:k4v4",
  "kivi:k2v2",
];

export async function runInfo(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        model: { type: "string", short: "m" },
        kv: { type: "string", multiple: true },
        device: { type: "string" },
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
  const specs = (v.kv ?? DEFAULT_SPECS).map((text) => ({ text, spec: kvSpecFlag(text) }));
  const device = deviceFlag(v.device);
  const dir = v.model ?? await defaultModel(v.json ?? false);
  const c = await loadConfig(dir);
  const tensors = await readTensors(dir, c);
  const params = tensors.reduce((sum, [, t]) => sum + t.shape.reduce((a, b) => a * b, 1), 0);
  const bytes = tensors.reduce((sum, [, t]) => sum + t.bytes, 0);
  const dtypes = [...new Set(tensors.map(([, t]) => t.dtype))].join(", ");
  const shape = {
    layers: c.numLayers,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
  };
  // the default list shows what applies to this model; a spec asked for must apply
  const usable = specs.filter(({ spec }) => {
    try {
      checkKvSpec(spec, c.headDim);
      return true;
    } catch (e) {
      if (v.kv) throw new UsageError((e as Error).message);
      return false;
    }
  });
  // keyed by the spec as written; every option is spelled out in docs/kv-cache.md
  const kv = Object.fromEntries(usable.map((s) => [s.text, kvBytesPerToken(s.spec, shape)]));
  // with a GPU: the longest context each spec fits in its free memory
  let gpu: { name: string; freeBytes: number; longestContext: Record<string, number> } | undefined;
  if (device !== "cpu") {
    using backend = openBackend(device, undefined, true);
    if (backend.kind === "cuda") {
      const { name, freeBytes } = backend.deviceInfo();
      const weights = deviceWeightBytes(tensors);
      const gemmDtype = gemmInputDtype(backend, layerMatrixDtype(tensors));
      const fits = (spec: (typeof usable)[number]["spec"]) => (ctx: number) => {
        const { cacheBytes, stateBytes, scratchBytes } = planBytes(backend, c, spec, ctx, {
          gemmDtype,
        });
        return weights + cacheBytes + stateBytes + scratchBytes <= freeBytes;
      };
      gpu = {
        name,
        freeBytes,
        longestContext: Object.fromEntries(
          usable.map((s) => [s.text, longestContext(fits(s.spec))]),
        ),
      };
    }
  }
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
    gpu,
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
    ...(gpu
      ? [["gpu", `${gpu.name}, ${formatBytes(gpu.freeBytes)} free`] as [string, string]]
      : []),
    ...Object.entries(kv).map(([spec, bytes]): [string, string] => [
      `kv ${spec}`,
      `${formatBytes(bytes)}/token, ${
        formatBytes(bytes * c.maxPositionEmbeddings)
      } at full context` +
      (gpu ? `; fits ${formatCount(gpu.longestContext[spec])} tokens on the GPU` : ""),
    ]),
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  for (const [k, val] of rows) console.log(`${k.padEnd(width)}  ${val}`);
  return EXIT.ok;
}

/** The largest n in 0..limit with fits(n), for fits true up to some n and false after (0 when
 * even one token does not fit). */
export function longestContext(fits: (n: number) => boolean, limit = 2 ** 30): number {
  if (!fits(1)) return 0;
  let lo = 1, hi = limit; // fits(lo); the answer is in lo..hi
  if (fits(hi)) return hi;
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (fits(mid)) lo = mid;
    else hi = mid;
  }
  return lo;
}
