// The quantized KV cache on CUDA against the CPU reference (kernels/cpu/kvq.c): the same stores
// write the same bytes (codes, pairs, windows, key normalization), and attention agrees, for every
// setting of test/kvq_harness.ts, GQA groups of 3 and 8, a Llama-3-8B layer at 5000 tokens (many
// splits), prefill blocks that pack 2, 4 and 8 queries, prompts in kvq_prefill.cu's two ways
// (chunks unpacked by the attending blocks, or dequantized into a scratch), and fp8
// (scale, offset) pairs: all 256 codes decode as on the CPU, groups across fp16's range store the
// CPU's bytes. The SIMT kernel agrees within fp32 summation-order noise (1e-4 relative to max(1,
// |cpu|)); the tensor-core kernels round q and the probabilities (and kvq_prefill.cu the
// dequantized keys and values) to fp16 (11-bit mantissa) as the MMAs take them, and agree within
// 4e-3. Where no GPU answers every test is registered as ignored.
import assert from "node:assert/strict";
import { Backend, KvqAxis, KvqMeta, KvqMode, KvqNorm, type KvqParams } from "../ffi/backend.ts";
import { Rng } from "../src/engine/sampler.ts";
import { maxRelError, randomFloats } from "./random.ts";
import {
  download,
  fillLayer,
  FP8,
  KVQ_CASES,
  kvqAttention,
  kvqParams,
  kvRows,
  seen,
  wideRows,
  zeroLayer,
} from "./kvq_harness.ts";

function openCuda(): Backend | null {
  try {
    return Backend.open("cuda");
  } catch (e) {
    console.log(`no CUDA device: skipping CUDA kvq tests (${e instanceof Error ? e.message : e})`);
    return null;
  }
}
const gpu = openCuda();
const cpu = gpu ? Backend.open("cpu") : null;
globalThis.addEventListener("unload", () => {
  gpu?.close();
  cpu?.close();
});

function test(name: string, fn: (gpu: Backend, cpu: Backend) => void): void {
  Deno.test({ name: `cuda kvq: ${name}`, ignore: gpu === null, fn: () => fn(gpu!, cpu!) });
}

/** Whether kvq_mma.cu serves these parameters (its kvq_mma_supported). */
function tensorCores(p: KvqParams, group: number): boolean {
  const keys = p.kAxis === KvqAxis.CHANNELS ? p.kGroup >= 16 : p.kGroup === 32;
  // values over tokens in blocks of 32, or over 32 channels beside keys over such blocks (KIVI's)
  const values = p.vAxis === KvqAxis.TOKENS || p.kAxis === KvqAxis.TOKENS;
  return [2, 4, 8].includes(p.kBits) && [2, 4, 8].includes(p.vBits) && keys && values &&
    p.vGroup === 32 && (p.headDim === 64 || p.headDim === 128) && group <= 8;
}

/** KIVI's grouping: keys over tokens, values over channels, asymmetric, no normalization. */
const KIVI = { kAxis: KvqAxis.TOKENS, vAxis: KvqAxis.CHANNELS, qmode: 0, norm: 0 };

/** Fills the same layer on both backends, checks the bytes, then prefill and decode attention. */
function compare(
  gpu: Backend,
  cpu: Backend,
  name: string,
  params: KvqParams,
  opts: { heads: number; prefill: number; chunks: number[]; decode: number; queries?: number },
): void {
  const { heads, prefill, chunks, decode, queries = 48 } = opts;
  const total = prefill + decode, d = params.headDim;
  const rows = kvRows(params, total, 21);
  const layouts = [gpu, cpu].map((be) => be.kvqLayout(params));
  const layers = [gpu, cpu].map((be, i) => zeroLayer(be, layouts[i]));
  const fill = (to: number, sizes: number[], from: number) =>
    [gpu, cpu].forEach((be, i) => fillLayer(be, layouts[i], layers[i], rows, to, sizes, from));
  const sameBytes = (when: string) => {
    const [g, c] = [gpu, cpu].map((be, i) => download(be, layers[i]));
    const diff = g.findIndex((x, i) => x !== c[i]);
    assert.equal(diff, -1, `${name}, ${when}: layer bytes differ first at ${diff}`);
  };
  const rng = new Rng(5);
  fill(prefill, chunks, 0);
  sameBytes("after prefill");
  const n = Math.min(queries, prefill), pos0 = prefill - n;
  const q = randomFloats(rng, n * heads * d);
  const [g, c] = [gpu, cpu].map((be, i) =>
    kvqAttention(be, layouts[i], layers[i], q, n, pos0, heads)
  );
  const mma = tensorCores(params, heads / params.kvHeads), tol = mma ? 4e-3 : 1e-4;
  let worst = maxRelError(g, c);
  assert(worst < tol, `${name}: prefill attention max error ${worst}`);
  for (let pos = prefill; pos < total; pos++) {
    fill(pos + 1, [1], pos);
    if ((pos - prefill) % 5 && pos !== total - 1) continue;
    const qd = randomFloats(rng, heads * d);
    const [gd, cd] = [gpu, cpu].map((be, i) =>
      kvqAttention(be, layouts[i], layers[i], qd, 1, pos, heads)
    );
    const e = maxRelError(gd, cd);
    assert(e < tol, `${name}: decode at ${pos}: max error ${e}`);
    worst = Math.max(worst, e);
  }
  console.log(`${name} (${mma ? "tensor cores" : "SIMT"}): max error ${worst.toExponential(2)}`);
  sameBytes("after decode");
  const [vg, vc] = [gpu, cpu].map((be, i) => seen(be, layouts[i], layers[i], total));
  assert.deepEqual(vg.k, vc.k, `${name}: dequantized keys`);
  assert.deepEqual(vg.v, vc.v, `${name}: dequantized values`);
  layers.forEach((l) => l.close());
}

// 40 queries of GQA 3 fill one block of 128 (query, head) rows: kvq_prefill_chunks.cu's.
test("every setting writes the CPU's bytes and attends as the CPU does (GQA 3)", (gpu, cpu) => {
  for (const { name, params } of KVQ_CASES) {
    compare(gpu, cpu, name, params, {
      heads: params.kvHeads * 3,
      prefill: 90,
      chunks: [37, 40, 13],
      decode: 40,
      queries: 40,
    });
  }
});

test("GQA 8 and head_dim 128: InnerQ at 2/4/8 bits and KIVI", (gpu, cpu) => {
  const variants: [string, Partial<KvqParams>][] = [
    ["innerq k4v2 g8", {}],
    ["innerq k8v4 g8", { kBits: 8, vBits: 4 }],
    ["innerq k2v8 g8", { kBits: 2, vBits: 8, kGroup: 64 }],
    ["kivi k4v2 g8", KIVI],
    ["keys over tokens k2v2 g8", { kBits: 2, vBits: 2, kAxis: KvqAxis.TOKENS }],
    ["keys over tokens k4v4 g8", { vBits: 4, kAxis: KvqAxis.TOKENS, norm: 0 }],
    ["keys over tokens k8v2 g8", { kBits: 8, vBits: 2, kAxis: KvqAxis.TOKENS }],
    ["innerq k4v2 g8 e4m3", { meta: KvqMeta.E4M3 }],
    ["innerq k2v4 g8 e5m2", { kBits: 2, vBits: 4, kGroup: 16, meta: KvqMeta.E5M2 }],
    [
      "keys over tokens k2v2 g8 e4m3",
      { kBits: 2, vBits: 2, kAxis: KvqAxis.TOKENS, meta: KvqMeta.E4M3 },
    ],
  ];
  for (const [name, over] of variants) {
    const params = kvqParams({
      kvHeads: 1,
      headDim: 128,
      cap: 400,
      ring: 32 + 32 + 64,
      recent: 32,
      kGroup: 32,
      vGroup: 32,
      ...over,
    });
    compare(gpu, cpu, name, params, { heads: 8, prefill: 300, chunks: [64], decode: 20 });
  }
});

test("a Llama-3-8B layer at 5000 tokens: many splits", (gpu, cpu) => {
  for (const [kBits, vBits, over] of [[4, 2, {}], [2, 2, {}], [2, 2, KIVI]] as const) {
    const params = kvqParams({
      kvHeads: 8,
      headDim: 128,
      cap: 5200,
      sink: 4,
      recent: 32,
      ring: 32 + 32 + 256 - 1,
      kBits,
      vBits,
      kGroup: 32,
      vGroup: 32,
      ...over,
    });
    compare(gpu, cpu, `8B ${over === KIVI ? "kivi" : "innerq"} k${kBits}v${vBits}`, params, {
      heads: 32,
      prefill: 5000,
      chunks: [256],
      decode: 6,
    });
  }
});

// A prefill block of the tensor-core kernel takes 8 / GQA queries. 45 queries from position 156
// (sink 4, recent 32: the quantized region grows by a chunk at position 163) put that edge inside
// a block for 2, 4 and 8 queries a block, and leave a last block short.
test("prefill blocks of 8, 4 and 2 queries (GQA 1, 2, 4) across a chunk's edge", (gpu, cpu) => {
  for (const group of [1, 2, 4]) {
    for (
      const [name, over] of [
        ["k4v2", {}],
        ["k2v2 keys over tokens", { kBits: 2, kAxis: KvqAxis.TOKENS }],
      ] as [string, Partial<KvqParams>][]
    ) {
      const params = kvqParams({
        headDim: 128,
        cap: 220,
        sink: 4,
        recent: 32,
        ring: 32 + 32 + 64 - 1,
        kGroup: 32,
        vGroup: 32,
        ...over,
      });
      compare(gpu, cpu, `${name} GQA ${group}`, params, {
        heads: 2 * group,
        prefill: 201,
        chunks: [64, 64, 64, 9],
        decode: 3,
        queries: 45,
      });
    }
  }
});

/** Prompts of each count of queries over a Llama-3-8B-like layer (head_dim 128, groups of 32, sink
 * 4, recent 32) of each variant. */
function comparePrompts(
  gpu: Backend,
  cpu: Backend,
  variants: [string, Partial<KvqParams>][],
  shape: { kvHeads: number; cap: number; ring: number; heads: number; prefill: number },
  queries: number[],
): void {
  const { kvHeads, cap, ring, heads, prefill } = shape;
  for (const [name, over] of variants) {
    const params = kvqParams({
      kvHeads,
      headDim: 128,
      cap,
      sink: 4,
      recent: 32,
      ring,
      kGroup: 32,
      vGroup: 32,
      ...over,
    });
    for (const n of queries) {
      compare(gpu, cpu, `${n} queries ${name}`, params, {
        heads,
        prefill,
        chunks: [256],
        decode: 1,
        queries: n,
      });
    }
  }
}

// Prompts that fill more than half a block of 128 (query, head) rows run kvq_prefill.cu: from
// two blocks a KV head on it dequantizes the chunks they see into an fp16 scratch once per call
// for prefill_rows.cu's blocks. 600 queries of GQA 4 over 8 KV heads make 152 blocks; GQA 8 with
// 48 queries (above) makes 3 a KV head, 45 queries of GQA 4 2 across a chunk's edge.
test("a long prompt over the quantized cache: many query blocks", (gpu, cpu) => {
  comparePrompts(
    gpu,
    cpu,
    [
      ["innerq k4v2", {}],
      ["innerq k2v2 keys over tokens", { kBits: 2, kAxis: KvqAxis.TOKENS }],
      ["kivi k2v2", { kBits: 2, ...KIVI }],
      ["innerq k4v4 e4m3 pairs", { vBits: 4, meta: FP8.e4m3.meta }],
    ],
    { kvHeads: 8, cap: 800, ring: 32 + 32 + 640 - 1, heads: 32, prefill: 700 },
    [600],
  );
});

// One query block a KV head unpacks the chunks itself (kvq_prefill_chunks.cu), split over them
// deep in a context: 20 queries of GQA 4 (40 make two blocks, from the scratch, split too); every
// key and value layout the tensor cores read, fp8 pairs and head_dim 64 among them. The tests
// above give the block a chunk's edge (45 queries of GQA 2) and every setting (GQA 3).
test("a short prompt deep in a context: blocks that unpack their chunks", (gpu, cpu) => {
  comparePrompts(
    gpu,
    cpu,
    [
      ["innerq k4v2", {}],
      ["innerq k2v2 keys over tokens e5m2 pairs", {
        kBits: 2,
        kAxis: KvqAxis.TOKENS,
        meta: FP8.e5m2.meta,
      }],
      ["kivi k2v2", { kBits: 2, ...KIVI }],
      ["innerq k8v4 gk16 e4m3 pairs", { kBits: 8, vBits: 4, kGroup: 16, meta: FP8.e4m3.meta }],
      ["innerq k4v8 head_dim 64", { vBits: 8, headDim: 64 }],
    ],
    { kvHeads: 4, cap: 2200, ring: 32 + 32 + 256 - 1, heads: 16, prefill: 2100 },
    [40, 20],
  );
});

/** Equal up to the sign of zero, NaN equal to NaN. */
function sameValues(a: Float32Array, b: Float32Array): number {
  return a.findIndex((x, i) => !(x === b[i] || (x !== x && b[i] !== b[i])));
}

test("fp8 pairs: all 256 codes decode as on the CPU, in dequantize and attention", (gpu, cpu) => {
  for (const f of [FP8.e4m3, FP8.e5m2]) {
    // every scale byte over codes 1 (keys), every offset byte (values); then attention over the
    // finite ones (bytes with the top exponent field cleared)
    const params = kvqParams({ kvHeads: 1, sink: 0, recent: 0, ring: 16 + 16, meta: f.meta });
    const layouts = [gpu, cpu].map((be) => be.kvqLayout(params));
    const layers = [gpu, cpu].map((be, i) => zeroLayer(be, layouts[i]));
    const keyPairs = new Uint8Array(512), valuePairs = new Uint8Array(512);
    for (let i = 0; i < 256; i++) {
      keyPairs[2 * i] = i;
      valuePairs[2 * i + 1] = i;
    }
    const ones = new Uint32Array(64 * params.headDim * params.kBits / 32).fill(0x11111111);
    const craft = (finite: boolean) => {
      // finite: the exponent field's top bit cleared (values below 2 in both formats)
      const clear = (x: Uint8Array) => finite ? x.map((b) => b & ~0x40) : x;
      [gpu, cpu].forEach((be, i) => {
        const l = layouts[i], layer = layers[i];
        be.upload(layer.slice(l.offsets.metaK, 512), clear(keyPairs));
        be.upload(layer.slice(l.offsets.metaV, 512), clear(valuePairs));
        be.upload(layer.slice(l.offsets.codesK, ones.byteLength), ones);
      });
    };
    craft(false);
    const [vg, vc] = [gpu, cpu].map((be, i) => seen(be, layouts[i], layers[i], 64));
    assert.equal(sameValues(vg.k, vc.k), -1, `${f.name}: dequantized scales`);
    assert.equal(sameValues(vg.v, vc.v), -1, `${f.name}: dequantized offsets`);
    craft(true);
    const q = randomFloats(new Rng(2), 3 * params.headDim, -0.01, 0.01);
    const [ag, ac] = [gpu, cpu].map((be, i) =>
      kvqAttention(be, layouts[i], layers[i], q, 1, 63, 3)
    );
    const e = maxRelError(ag, ac);
    assert(e < 1e-4, `${f.name}: attention over every finite code: max error ${e}`);
    layers.forEach((l) => l.close());
  }
});

/** Fills a layer on both backends from the same rows (stores of 40 and 7 tokens in turn) and
 * returns the first byte where the two differ, -1 where none does. */
function firstStoredDiff(
  gpu: Backend,
  cpu: Backend,
  params: KvqParams,
  rows: { k: Float32Array; v: Float32Array },
  total: number,
): number {
  const layouts = [gpu, cpu].map((be) => be.kvqLayout(params));
  const layers = [gpu, cpu].map((be, i) => zeroLayer(be, layouts[i]));
  [gpu, cpu].forEach((be, i) => fillLayer(be, layouts[i], layers[i], rows, total, [40, 7]));
  const [g, c] = [gpu, cpu].map((be, i) => download(be, layers[i]));
  layers.forEach((l) => l.close());
  return g.findIndex((x, i) => x !== c[i]);
}

test("fp8 pairs: groups across fp16's range store the CPU's bytes, every mode", (gpu, cpu) => {
  for (const meta of [KvqMeta.E4M3, KvqMeta.E5M2]) {
    for (const qmode of [KvqMode.ASYM, KvqMode.SYM, KvqMode.HYBRID]) {
      for (const over of [{}, { kBits: 2, vBits: 8, kAxis: KvqAxis.TOKENS, kGroup: 32 }]) {
        const params = kvqParams({
          cap: 256,
          sink: 0,
          recent: 0,
          ring: 32 + 40,
          vGroup: 32,
          qmode,
          norm: KvqNorm.OFF,
          meta,
          ...over,
        });
        const diff = firstStoredDiff(gpu, cpu, params, wideRows(params, 256, 3), 256);
        assert.equal(diff, -1, `meta ${meta}, qmode ${qmode}: layer bytes differ first at ${diff}`);
      }
    }
  }
});

/** Rows whose groups hold signed zeros: all zero of either sign, zero as the least or the greatest
 * of values of one sign, zeros among others. A group's kind follows its tokens (groups over
 * channels) or its channels (over tokens), so that every group is of one kind. */
function signedZeroRows(p: KvqParams, total: number, seed: number) {
  const rng = new Rng(seed);
  const side = (axis: number) => {
    const x = new Float32Array(total * p.kvHeads * p.headDim);
    for (let i = 0; i < x.length; i++) {
      const t = Math.floor(i / (p.kvHeads * p.headDim)), c = i % p.headDim;
      const kind = (axis === KvqAxis.CHANNELS ? t : c) % 4, r = rng.next();
      const zero = rng.next() < 0.5 ? -0 : 0, value = 2 ** (-8 + 8 * rng.next());
      x[i] = kind === 0 || r < 0.3 ? zero : kind === 1 ? value : kind === 2 ? -value : value - 1.5;
    }
    return x;
  };
  return { k: side(p.kAxis), v: side(p.vAxis) };
}

test("signed zeros: bounds found in any order store the CPU's bytes, every mode", (gpu, cpu) => {
  for (const meta of [KvqMeta.F16, KvqMeta.E4M3]) {
    for (const qmode of [KvqMode.ASYM, KvqMode.SYM, KvqMode.HYBRID]) {
      for (
        const over of [
          { kGroup: 8, vGroup: 32, ring: 32 + 40 },
          { kBits: 2, kAxis: KvqAxis.TOKENS, kGroup: 32, vGroup: 32, ring: 32 + 40 },
          { kGroup: 64, vGroup: 128, ring: 128 + 40 },
        ]
      ) {
        const params = kvqParams({
          cap: 320,
          sink: 0,
          recent: 0,
          qmode,
          norm: KvqNorm.OFF,
          meta,
          ...over,
        });
        const diff = firstStoredDiff(gpu, cpu, params, signedZeroRows(params, 320, 5), 320);
        assert.equal(diff, -1, `${JSON.stringify(over)}, meta ${meta}, qmode ${qmode}: at ${diff}`);
      }
    }
  }
});
