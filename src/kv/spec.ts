// Parses a --kv spec and makes the cache it names.
//   fp16 | fp32                      dense caches
//   innerq:k4v2[,opt=value...]       InnerQ: keys grouped over channels (2-bit keys: over tokens,
//                                    by measurement), values over tokens
//   kivi:k2v2[,opt=value...]         KIVI-style baseline: keys over tokens, values over channels
// Options: gk, gv (group sizes), g (both), sink, recent, norm=max|rms|off, hybrid=on|off,
// kaxis/vaxis=channels|tokens (to mix the two groupings), meta=f16|e4m3|e5m2 (the precision of
// each group's scale and offset).
import { type Backend, KvqAxis, KvqMeta, KvqMode, KvqNorm } from "../../ffi/backend.ts";
import type { CacheShape, KvCache } from "./cache.ts";
import { denseBytesPerToken, DenseKvCache } from "./dense.ts";
import { kvqParams, QuantizedKvCache } from "./quantized.ts";

export type DenseSpec = { kind: "fp16" | "fp32" };
export interface QuantSpec {
  kind: "innerq" | "kivi";
  kBits: number;
  vBits: number;
  kGroup: number;
  vGroup: number;
  kAxis: "channels" | "tokens";
  vAxis: "channels" | "tokens";
  sink: number;
  recent: number;
  norm: "max" | "rms" | "off";
  hybrid: boolean;
  /** Scale and offset of each group: fp16 (4 bytes a pair) or fp8 (2 bytes). */
  meta: "f16" | "e4m3" | "e5m2";
}
export type KvSpec = DenseSpec | QuantSpec;

export function isDense(spec: KvSpec): spec is DenseSpec {
  return spec.kind === "fp16" || spec.kind === "fp32";
}

/** Defaults of each quantized family (see docs/kv-cache.md for how they were chosen). */
const DEFAULTS: Record<QuantSpec["kind"], Omit<QuantSpec, "kind" | "kBits" | "vBits">> = {
  innerq: {
    kGroup: 32,
    vGroup: 32,
    kAxis: "channels",
    vAxis: "tokens",
    sink: 4,
    recent: 32,
    norm: "max",
    hybrid: true,
    meta: "f16",
  },
  kivi: {
    kGroup: 32,
    vGroup: 32,
    kAxis: "tokens",
    vAxis: "channels",
    sink: 4,
    recent: 32,
    norm: "off",
    hybrid: false,
    meta: "f16",
  },
};

const BITS = [2, 3, 4, 8];
const ALLOWED = "fp16, fp32, innerq:kKvV or kivi:kKvV (K, V in 2, 3, 4, 8) with options " +
  "gk=, gv=, g=, sink=, recent=, norm=max|rms|off, hybrid=on|off, kaxis=, vaxis=channels|tokens, " +
  "meta=f16|e4m3|e5m2";

export function parseKvSpec(text: string): KvSpec {
  const fail = (why: string): never => {
    throw new Error(`--kv ${JSON.stringify(text)}: ${why} (allowed: ${ALLOWED})`);
  };
  if (text === "fp16" || text === "fp32") return { kind: text };
  const [family, rest = ""] = text.split(":", 2);
  if (family !== "innerq" && family !== "kivi") fail(`unknown cache ${JSON.stringify(family)}`);
  const kind = family as QuantSpec["kind"];
  const [bits, ...options] = rest.split(",");
  const m = /^k(\d)v(\d)$/.exec(bits);
  if (!m || !BITS.includes(+m[1]) || !BITS.includes(+m[2])) {
    fail(`bits ${JSON.stringify(bits)} are not kKvV with K and V in ${BITS.join(", ")}`);
  }
  const spec: QuantSpec = { kind, kBits: +m![1], vBits: +m![2], ...DEFAULTS[kind] };
  // 2-bit keys lose less grouped over tokens, beside InnerQ's values (docs/kv-cache.md)
  if (kind === "innerq" && spec.kBits === 2) spec.kAxis = "tokens";
  const seen = new Set<string>();
  for (const option of options) {
    const [key, value] = option.split("=", 2);
    if (value === undefined) fail(`option ${JSON.stringify(option)} is not key=value`);
    if (seen.has(key)) fail(`option ${key} given twice`);
    seen.add(key);
    const count = (lo: number, hi: number) => {
      if (!/^\d+$/.test(value) || +value < lo || +value > hi) {
        fail(`${key}=${value}: expected an integer in ${lo}..${hi}`);
      }
      return +value;
    };
    const group = () => {
      const g = count(8, 128);
      if (g & (g - 1)) fail(`${key}=${value}: a group is a power of two from 8 to 128`);
      return g;
    };
    const oneOf = <T extends string>(choices: readonly T[]): T => {
      if (!(choices as readonly string[]).includes(value)) {
        fail(`${key}=${value}: expected one of ${choices.join(", ")}`);
      }
      return value as T;
    };
    switch (key) {
      case "gk":
        spec.kGroup = group();
        break;
      case "gv":
        spec.vGroup = group();
        break;
      case "g":
        spec.kGroup = spec.vGroup = group();
        break;
      case "sink":
        spec.sink = count(0, 1 << 20);
        break;
      case "recent":
        spec.recent = count(0, 1 << 20);
        break;
      case "norm":
        spec.norm = oneOf(["max", "rms", "off"] as const);
        break;
      case "hybrid":
        spec.hybrid = oneOf(["on", "off"] as const) === "on";
        break;
      case "kaxis":
        spec.kAxis = oneOf(["channels", "tokens"] as const);
        break;
      case "vaxis":
        spec.vAxis = oneOf(["channels", "tokens"] as const);
        break;
      case "meta":
        spec.meta = oneOf(["f16", "e4m3", "e5m2"] as const);
        break;
      default:
        fail(`unknown option ${JSON.stringify(key)}`);
    }
  }
  if (spec.kAxis === "tokens" && spec.vAxis === "tokens" && spec.kGroup !== spec.vGroup) {
    fail(
      `keys and values both grouped over tokens need one group size, got ${spec.kGroup}, ${spec.vGroup}`,
    );
  }
  return spec;
}

/** The canonical text of a spec: every option spelled out. */
export function formatKvSpec(spec: KvSpec): string {
  if (isDense(spec)) return spec.kind;
  return `${spec.kind}:k${spec.kBits}v${spec.vBits},gk=${spec.kGroup},gv=${spec.vGroup},` +
    `kaxis=${spec.kAxis},vaxis=${spec.vAxis},sink=${spec.sink},recent=${spec.recent},` +
    `norm=${spec.norm},hybrid=${spec.hybrid ? "on" : "off"},meta=${spec.meta}`;
}

/** The spec as one would write it: bits and family, then only the options that differ from the
 * family's defaults (e.g. "innerq:k2v2,kaxis=tokens"). */
export function shortKvSpec(spec: KvSpec): string {
  if (isDense(spec)) return spec.kind;
  const base = `${spec.kind}:k${spec.kBits}v${spec.vBits}`;
  const defaults = formatKvSpec(parseKvSpec(base)).split(",").slice(1);
  const options = formatKvSpec(spec).split(",").slice(1);
  return [base, ...options.filter((o, i) => o !== defaults[i])].join(",");
}

/** Checks a spec against a model's head_dim (groups over channels must divide it). */
export function checkKvSpec(spec: KvSpec, headDim: number): void {
  if (isDense(spec)) return;
  if (headDim % 32) {
    throw new Error(`--kv ${spec.kind} needs head_dim a multiple of 32, the model has ${headDim}`);
  }
  for (
    const [side, axis, group] of [["k", spec.kAxis, spec.kGroup], ["v", spec.vAxis, spec.vGroup]]
  ) {
    if (axis === "channels" && headDim % (group as number)) {
      throw new Error(`--kv g${side}=${group} must divide the model's head_dim ${headDim}`);
    }
  }
}

/** Bytes per cached token, all layers, codes and (scale, offset) pairs (4 bytes fp16, 2 fp8)
 * included; the sink, the recent window and the key normalization are a fixed cost on top (see
 * KvCache.fixedBytes). */
export function kvBytesPerToken(
  spec: KvSpec,
  shape: Omit<CacheShape, "capacity" | "chunk">,
): number {
  if (isDense(spec)) return denseBytesPerToken(spec.kind, shape);
  const d = shape.headDim;
  const pair = spec.meta === "f16" ? 4 : 2;
  const perHead = d * (spec.kBits + spec.vBits) / 8 + pair * d / spec.kGroup +
    pair * d / spec.vGroup;
  return shape.layers * shape.kvHeads * perHead;
}

/** The iq_kvq_params axes and modes of a quantized spec. */
export function kvqOptions(spec: QuantSpec) {
  const axis = (a: QuantSpec["kAxis"]) => a === "channels" ? KvqAxis.CHANNELS : KvqAxis.TOKENS;
  return {
    kBits: spec.kBits,
    vBits: spec.vBits,
    kGroup: spec.kGroup,
    vGroup: spec.vGroup,
    kAxis: axis(spec.kAxis),
    vAxis: axis(spec.vAxis),
    sink: spec.sink,
    recent: spec.recent,
    qmode: spec.hybrid ? KvqMode.HYBRID : KvqMode.ASYM,
    norm: { max: KvqNorm.MAX, rms: KvqNorm.RMS, off: KvqNorm.OFF }[spec.norm],
    meta: { f16: KvqMeta.F16, e4m3: KvqMeta.E4M3, e5m2: KvqMeta.E5M2 }[spec.meta],
  };
}

/** Device bytes the cache of a spec takes, all layers (checks the spec against the shape). */
export function kvCacheBytes(backend: Backend, spec: KvSpec, shape: CacheShape): number {
  checkKvSpec(spec, shape.headDim);
  if (isDense(spec)) {
    return kvBytesPerToken(spec, shape) * shape.capacity;
  }
  return backend.kvqLayout(kvqParams(spec, shape)).bytes * shape.layers;
}

export function makeKvCache(backend: Backend, shape: CacheShape, spec: KvSpec): KvCache {
  if (isDense(spec)) {
    return new DenseKvCache(backend, shape, spec.kind);
  }
  return new QuantizedKvCache(backend, shape, spec);
}
