// Builds quantized caches for the kvq tests of both backends: parameters, a layer filled by a
// sequence of stores, what a query sees (iq_kvq_dequantize) and the attention it should get.
import {
  type Backend,
  type DeviceBuffer,
  KvqAxis,
  type KvqLayout,
  KvqMeta,
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
  // keys over channels in groups of 32 or more: the C backend reads their codes in slot order
  { name: "innerq k4v4 gk32", params: kvqParams({ vBits: 4, kGroup: 32 }) },
  { name: "innerq k8v2 gk64", params: kvqParams({ kBits: 8, kGroup: 64 }) },
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
  { name: "innerq k4v2 e4m3", params: kvqParams({ meta: KvqMeta.E4M3 }) },
  {
    name: "innerq k3v3 gk32 e5m2",
    params: kvqParams({ kBits: 3, vBits: 3, kGroup: 32, meta: KvqMeta.E5M2 }),
  },
  {
    name: "kivi k2v4 e4m3",
    params: kvqParams({
      kBits: 2,
      vBits: 4,
      kAxis: KvqAxis.TOKENS,
      vAxis: KvqAxis.CHANNELS,
      qmode: KvqMode.ASYM,
      norm: KvqNorm.OFF,
      meta: KvqMeta.E4M3,
    }),
  },
  // KIVI's groups of 32: keys over tokens and values over channels in blocks of 32 tokens in tile
  // order (kvq.h), which the CUDA backend reads on tensor cores; 3-bit keys take its SIMT kernel
  {
    name: "kivi k2v2 g32",
    params: kvqParams({
      kBits: 2,
      kAxis: KvqAxis.TOKENS,
      kGroup: 32,
      vAxis: KvqAxis.CHANNELS,
      vGroup: 32,
      ring: 8 + 32 + 40,
      qmode: KvqMode.ASYM,
      norm: KvqNorm.OFF,
    }),
  },
  {
    name: "kivi k4v8 g32 e5m2, hybrid",
    params: kvqParams({
      kAxis: KvqAxis.TOKENS,
      kGroup: 32,
      vBits: 8,
      vAxis: KvqAxis.CHANNELS,
      vGroup: 32,
      ring: 8 + 32 + 40,
      norm: KvqNorm.OFF,
      meta: KvqMeta.E5M2,
    }),
  },
  {
    name: "kivi k3v4 g32",
    params: kvqParams({
      kBits: 3,
      kAxis: KvqAxis.TOKENS,
      kGroup: 32,
      vBits: 4,
      vAxis: KvqAxis.CHANNELS,
      vGroup: 32,
      ring: 8 + 32 + 40,
      qmode: KvqMode.ASYM,
      norm: KvqNorm.OFF,
    }),
  },
  {
    name: "the kaxis=tokens mix, k2v8 e5m2",
    params: kvqParams({
      kBits: 2,
      vBits: 8,
      kAxis: KvqAxis.TOKENS,
      kGroup: 32,
      vGroup: 32,
      ring: 8 + 32 + 40,
      meta: KvqMeta.E5M2,
    }),
  },
  {
    name: "channels both, block 1, e4m3",
    params: kvqParams({
      vAxis: KvqAxis.CHANNELS,
      vGroup: 8,
      recent: 5,
      ring: 5 + 1 + 40,
      meta: KvqMeta.E4M3,
    }),
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

/** The fp8 formats of the (scale, offset) pairs, from their definitions (OCP 8-bit floating
 * point): mantissa bits, exponent bias, the largest finite value. e4m3 is the "fn" variant: no
 * infinities, S.1111.111 is NaN. */
export const FP8 = {
  e4m3: { name: "e4m3", meta: KvqMeta.E4M3, mant: 3, bias: 7, max: 448 },
  e5m2: { name: "e5m2", meta: KvqMeta.E5M2, mant: 2, bias: 15, max: 57344 },
} as const;
export type Fp8 = (typeof FP8)[keyof typeof FP8];

/** The value of fp8 byte `code`. */
export function fp8Value(code: number, f: Fp8): number {
  const sign = code & 0x80 ? -1 : 1, exp = (code & 0x7f) >> f.mant;
  const frac = code & ((1 << f.mant) - 1), top = (1 << (7 - f.mant)) - 1;
  if (exp === top && f.name === "e5m2") return frac ? NaN : sign * Infinity;
  if (exp === top && frac === 7) return NaN;
  return sign * (exp === 0
    ? frac / 2 ** f.mant * 2 ** (1 - f.bias) // subnormal
    : (1 + frac / 2 ** f.mant) * 2 ** (exp - f.bias));
}

const finite = new Map<string, number[]>();
/** Every finite value of a format, ascending (one zero). */
function fp8Finite(f: Fp8): number[] {
  let values = finite.get(f.name);
  if (!values) {
    const all = Array.from({ length: 256 }, (_, c) => fp8Value(c, f)).filter(Number.isFinite);
    values = [...new Set(all.map((x) => x + 0))].sort((a, b) => a - b); // -0 + 0 is +0
    finite.set(f.name, values);
  }
  return values;
}

/** The largest fp8 value <= x, or -max where there is none (saturation). */
export function fp8Down(x: number, f: Fp8): number {
  const below = fp8Finite(f).filter((v) => v <= x);
  return below.length ? below[below.length - 1] : -f.max;
}

/** The least fp8 s >= 0 with base + steps * s >= target, or max where there is none (doubles
 * hold these sums exactly). */
export function fp8Cover(base: number, target: number, steps: number, f: Fp8): number {
  return fp8Finite(f).find((s) => s >= 0 && base + steps * s >= target) ?? f.max;
}

/** The pair kernels/kvq.h stores for a group of values from lo to hi (kvq_round_pair):
 * asymmetric, the offset rounded down and the least scale that reaches hi; symmetric, the least
 * scale that reaches max(|lo|, |hi|) and the offset -2^(bits-1) scale (saturated). */
export function fp8Pair(lo: number, hi: number, bits: number, sym: boolean, f: Fp8) {
  const half = 2 ** (bits - 1);
  if (sym) {
    const scale = fp8Cover(0, Math.max(Math.abs(lo), Math.abs(hi)), half - 1, f);
    return { scale, offset: Math.max(-half * scale, -f.max) };
  }
  const offset = fp8Down(lo, f);
  return { scale: fp8Cover(offset, hi, 2 ** bits - 1, f), offset };
}

/** Group ids of one side of a layer's rows [total, kvHeads * headDim]: element i of the rows is
 * in group groupOf[i], which is pair groupOf[i] of the side's meta region (tokens < qcap). */
export function groupIds(p: KvqParams, side: 0 | 1, total: number): Int32Array {
  const { kvHeads, headDim: d } = p;
  const g = side ? p.vGroup : p.kGroup, axis = side ? p.vAxis : p.kAxis;
  const qcap = Math.ceil((p.cap - p.sink) / 128) * 128, ids = new Int32Array(total * kvHeads * d);
  for (let t = 0; t < total; t++) {
    for (let h = 0; h < kvHeads; h++) {
      for (let c = 0; c < d; c++) {
        const u = t - p.sink; // sink rows are not quantized: their ids are unused
        const local = axis === KvqAxis.CHANNELS
          ? u * (d / g) + Math.floor(c / g)
          : Math.floor(u / g) * d + c;
        ids[(t * kvHeads + h) * d + c] = h * (qcap * d / g) + local;
      }
    }
  }
  return ids;
}

/** Keys and values whose groups span fp16's range for the fp8 tests: per group a centre from
 * 2^-18 to 2^15.8 (fp8 subnormals, e4m3's saturation at 448, e5m2's at 57344) and a width from
 * 2^-10 of it to twice it; some groups constant (zero, an fp8 value, anything), with all values
 * but one equal, or at the edge of the cover's float arithmetic. */
export function wideRows(p: KvqParams, total: number, seed: number) {
  const rng = new Rng(seed), fp8 = [FP8.e4m3, FP8.e5m2];
  const side = (s: 0 | 1) => {
    const ids = groupIds(p, s, total), kinds = new Map<number, () => number>();
    const x = new Float32Array(ids.length);
    for (let i = 0; i < x.length; i++) {
      let draw = kinds.get(ids[i]);
      if (!draw) {
        const r = new Rng(seed * 7919 + ids[i] * 2 + s), kind = r.next();
        const sign = r.next() < 0.5 ? -1 : 1, centre = sign * 2 ** (-18 + 33.8 * r.next());
        const width = Math.abs(centre) * 2 ** (1 - 11 * r.next());
        const code = Math.floor(r.next() * 256), f = fp8[Math.floor(r.next() * 2)];
        const exact = Number.isFinite(fp8Value(code, f)) ? fp8Value(code, f) : 0;
        // a step of 3, 7, 15 or 255 units beside -2^-16: the float quotient (big + 2^-16) / steps
        // rounds to an fp8 value that falls short by 2^-16, so the cover must take the next one
        const big = [3, 7, 15, 255][Math.floor(r.next() * 4)] * 2 ** Math.floor(r.next() * 8);
        draw = kind < 0.05
          ? () => 0
          : kind < 0.15
          ? () => exact
          : kind < 0.2
          ? () => centre
          : kind < 0.25
          ? () => (rng.next() < 0.1 ? centre + width : centre)
          : kind < 0.3
          ? () => (rng.next() < 0.5 ? -(2 ** -16) : big)
          : () => Math.max(-65000, Math.min(65000, centre + width * (2 * rng.next() - 1)));
        kinds.set(ids[i], draw);
      }
      x[i] = draw();
    }
    return x;
  };
  return { k: side(0), v: side(1) };
}
