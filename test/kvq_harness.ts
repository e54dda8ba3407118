// Builds quantized caches for the kvq tests of both backends: parameters, a layer filled by a
// sequence of stores, what a query sees (iq_kvq_dequantize) and the attention it should get.
import {
  type Backend,
  type DeviceBuffer,
  KvqAxis,
  type KvqLayout,
  KvqMode,
  KvqNorm,
  type KvqParams,
} from "../ffi/backend.ts";
import { Rng } from "../src/engine/sampler.ts";
import { randomFloats } from "./random.ts";
import * as ref from "./reference.ts";

/** An InnerQ layout over a small cache; override any field. */
export function kvqParams(over: Partial<KvqParams> = {}): KvqParams {
  return {
    kvHeads: 2,
    headDim: 64,
    cap: 160,
    sink: 3,
    recent: 8,
    ring: 8 + 16 + 40,
    kBits: 4,
    kGroup: 16,
    kAxis: KvqAxis.CHANNELS,
    vBits: 2,
    vGroup: 16,
    vAxis: KvqAxis.TOKENS,
    qmode: KvqMode.HYBRID,
    norm: KvqNorm.MAX,
    meta: 0,
    ...over,
  };
}

/** The settings the tests sweep: InnerQ and KIVI groupings, every bit width, windows on and off. */
export const KVQ_CASES: { name: string; params: KvqParams }[] = [
  { name: "innerq k4v2", params: kvqParams() },
  { name: "innerq k2v2 rms", params: kvqParams({ kBits: 2, norm: KvqNorm.RMS }) },
  { name: "innerq k3v3 gk32", params: kvqParams({ kBits: 3, vBits: 3, kGroup: 32 }) },
  { name: "innerq k8v8 no windows", params: kvqParams({ kBits: 8, vBits: 8, sink: 0, recent: 0 }) },
  {
    name: "kivi k2v4",
    params: kvqParams({
      kBits: 2,
      vBits: 4,
      kAxis: KvqAxis.TOKENS,
      vAxis: KvqAxis.CHANNELS,
      kGroup: 16,
      vGroup: 32,
      qmode: KvqMode.ASYM,
      norm: KvqNorm.OFF,
    }),
  },
  { name: "innerq k4v2 gv32", params: kvqParams({ vGroup: 32, ring: 8 + 32 + 40 }) },
  {
    name: "innerq k2v8 gv32 no sink",
    params: kvqParams({ kBits: 2, vBits: 8, vGroup: 32, sink: 0, ring: 8 + 32 + 40 }),
  },
  {
    name: "innerq k4v4 gk8 gv32",
    params: kvqParams({ vBits: 4, kGroup: 8, vGroup: 32, ring: 8 + 32 + 40 }),
  },
  {
    name: "keys over tokens, values over tokens (the kaxis=tokens mix)",
    params: kvqParams({
      kBits: 2,
      kAxis: KvqAxis.TOKENS,
      kGroup: 32,
      vGroup: 32,
      ring: 8 + 32 + 40,
    }),
  },
  {
    name: "channels both, block 1",
    params: kvqParams({ vAxis: KvqAxis.CHANNELS, vGroup: 8, recent: 5, ring: 5 + 1 + 40 }),
  },
];

/** A layer buffer of `layout`, zeroed. */
export function zeroLayer(be: Backend, layout: KvqLayout): DeviceBuffer {
  const buf = be.alloc(layout.bytes);
  be.upload(buf, new Uint8Array(layout.bytes));
  return buf;
}

function upload(be: Backend, data: Float32Array): DeviceBuffer {
  const buf = be.alloc(data.byteLength);
  be.upload(buf, data);
  return buf;
}

export function download(
  be: Backend,
  buf: DeviceBuffer | { ptr: Deno.PointerObject; bytes: number },
) {
  const host = new Uint8Array(buf.bytes);
  be.download(buf, host);
  return host;
}

/** Keys and values [total, kvHeads * headDim]: channels of uneven size (outliers in keys), some
 * groups off-centre, so both quantization modes get chosen. */
export function kvRows(p: KvqParams, total: number, seed: number) {
  const rng = new Rng(seed), row = p.kvHeads * p.headDim;
  const k = randomFloats(rng, total * row, -1, 1), v = randomFloats(rng, total * row, -1, 1);
  for (let i = 0; i < k.length; i++) {
    const c = i % p.headDim;
    k[i] *= c % 13 === 0 ? 8 : 1; // outlier channels
    if (c % 4 === 1) k[i] += 0.75; // off-centre channels
    if (Math.floor(i / row) % 5 === 2) v[i] += 0.5; // off-centre tokens
  }
  return { k, v };
}

/** Stores rows[from .. total - 1] in chunks of the given sizes (cycled). */
export function fillLayer(
  be: Backend,
  layout: KvqLayout,
  layer: DeviceBuffer,
  rows: { k: Float32Array; v: Float32Array },
  total: number,
  chunks: number[],
  from = 0,
): void {
  const row = layout.params.kvHeads * layout.params.headDim;
  for (let pos = from, i = 0; pos < total; i++) {
    const n = Math.min(chunks[i % chunks.length], total - pos);
    const k = upload(be, rows.k.subarray(pos * row, (pos + n) * row));
    const v = upload(be, rows.v.subarray(pos * row, (pos + n) * row));
    be.kvqStore(layout, layer, k, v, n, pos);
    k.close();
    v.close();
    pos += n;
  }
}

/** What a query at position len - 1 sees: k, v [kvHeads, len, headDim] (keys normalized). */
export function seen(be: Backend, layout: KvqLayout, layer: DeviceBuffer, len: number) {
  const bytes = layout.params.kvHeads * len * layout.params.headDim * 4;
  const k = be.alloc(bytes), v = be.alloc(bytes);
  be.kvqDequantize(layout, layer, k, v, len);
  const out = {
    k: new Float32Array(download(be, k).buffer),
    v: new Float32Array(download(be, v).buffer),
  };
  k.close();
  v.close();
  return out;
}

/** The key normalization [kvHeads, headDim / 2] of a layer. */
export function keyScale(be: Backend, layout: KvqLayout, layer: DeviceBuffer): Float32Array {
  const bytes = layout.params.kvHeads * layout.params.headDim / 2 * 4;
  return new Float32Array(download(be, layer.slice(layout.offsets.keyScale, bytes)).buffer);
}

/** Attention of q[n, heads, hd] at pos0.. over the layer, by iq_kvq_attention. */
export function kvqAttention(
  be: Backend,
  layout: KvqLayout,
  layer: DeviceBuffer,
  q: Float32Array,
  n: number,
  pos0: number,
  heads: number,
): Float32Array {
  const qb = upload(be, q), out = be.alloc(q.byteLength);
  be.kvqAttention(layout, layer, out, qb, n, pos0, heads, 1 / Math.sqrt(layout.params.headDim));
  const result = new Float32Array(download(be, out).buffer);
  qb.close();
  out.close();
  return result;
}

/** The same attention computed by dequantize-then-reference: each query over what it sees. */
export function expectedAttention(
  be: Backend,
  layout: KvqLayout,
  layer: DeviceBuffer,
  q: Float32Array,
  n: number,
  pos0: number,
  heads: number,
): Float32Array {
  const { kvHeads, headDim: hd } = layout.params;
  const out = new Float32Array(n * heads * hd);
  for (let t = 0; t < n; t++) {
    const len = pos0 + t + 1, view = seen(be, layout, layer, len);
    const row = q.subarray(t * heads * hd, (t + 1) * heads * hd);
    const a = { n: 1, pos0: len - 1, heads, kvHeads, hd, cap: len, scale: 1 / Math.sqrt(hd) };
    out.set(ref.attention(row, view.k, view.v, a), t * heads * hd);
  }
  return out;
}
