// Parses a --kv spec and makes the cache it names.
import type { Backend } from "../../ffi/backend.ts";
import type { CacheShape, KvCache } from "./cache.ts";
import { denseBytesPerToken, DenseKvCache } from "./dense.ts";

export const KV_SPECS = ["fp16", "fp32"] as const;
export type KvSpec = typeof KV_SPECS[number];

export function parseKvSpec(spec: string): KvSpec {
  if ((KV_SPECS as readonly string[]).includes(spec)) return spec as KvSpec;
  throw new Error(
    `--kv: unknown cache spec ${JSON.stringify(spec)} (allowed: ${KV_SPECS.join(", ")})`,
  );
}

/** Bytes per token of the cache a spec makes, before any is allocated (for planning and `info`). */
export function kvBytesPerToken(spec: KvSpec, shape: Omit<CacheShape, "capacity">): number {
  return denseBytesPerToken(spec, shape);
}

export function makeKvCache(backend: Backend, shape: CacheShape, spec: KvSpec): KvCache {
  return new DenseKvCache(backend, shape, spec);
}
