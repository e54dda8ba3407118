// The CUDA backend against the CPU reference: every op on seeded random inputs, run on both and
// compared within the tolerance stated beside each test, then a tiny random model end to end.
// Where no GPU answers (no library, no driver, no device) every test is registered as ignored.
import assert from "node:assert/strict";
import {
  Backend,
  type DeviceBuffer,
  DType,
  type DTypeCode,
  NativeError,
  type Slice,
} from "../ffi/backend.ts";
import { GREEDY, Rng, Sampler } from "../src/engine/sampler.ts";
import { generate } from "../src/engine/generate.ts";
import { Transformer } from "../src/engine/forward.ts";
import { loadConfig } from "../src/model/config.ts";
import {
  bf16ToF32,
  type DType as ModelDType,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
} from "../src/model/dtype.ts";
import { writeRandomModel } from "../src/model/random_model.ts";
import { maxRelError, randomFloats, randomInts } from "./random.ts";
import { backendAs } from "./backend_as.ts";
import { rmsnormResidual } from "./rmsnorm_residual.ts";

function openCuda(): Backend | null {
  try {
    return Backend.open("cuda");
  } catch (e) {
    console.log(`no CUDA device: skipping CUDA tests (${e instanceof Error ? e.message : e})`);
    return null;
  }
}
const gpu = openCuda();
const cpu = gpu ? Backend.open("cpu") : null;
globalThis.addEventListener("unload", () => {
  gpu?.close();
  cpu?.close();
});

function test(name: string, fn: (gpu: Backend, cpu: Backend) => void | Promise<void>): void {
  Deno.test({ name: `cuda: ${name}`, ignore: gpu === null, fn: () => fn(gpu!, cpu!) });
}

/** Uploads inputs to fresh buffers, runs op with them and an output buffer (uploaded from init
 * or left as allocated), and returns the output's bytes. Every buffer is freed. */
function runOn(
  be: Backend,
  inputs: ArrayBufferView[],
  out: { bytes: number; init?: ArrayBufferView },
  op: (inputs: DeviceBuffer[], out: DeviceBuffer) => void,
): ArrayBuffer {
  const bufs: DeviceBuffer[] = [];
  try {
    for (const a of inputs) {
      const b = be.alloc(Math.max(a.byteLength, 4));
      bufs.push(b);
      be.upload(b, a);
    }
    const o = be.alloc(out.bytes);
    bufs.push(o);
    if (out.init) be.upload(o, out.init);
    op(bufs.slice(0, inputs.length), o);
    const host = new Uint8Array(out.bytes);
    be.download(o, host);
    return host.buffer;
  } finally {
    for (const b of bufs) b.close();
  }
}

/** runOn on both backends: [cuda, cpu]. */
function onBoth(
  gpu: Backend,
  cpu: Backend,
  inputs: ArrayBufferView[],
  out: { bytes: number; init?: ArrayBufferView },
  op: (be: Backend, inputs: DeviceBuffer[], out: DeviceBuffer) => void,
): [ArrayBuffer, ArrayBuffer] {
  return [gpu, cpu].map((be) => runOn(be, inputs, out, (i, o) => op(be, i, o))) as [
    ArrayBuffer,
    ArrayBuffer,
  ];
}

function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: number,
  what: string,
) {
  const err = maxRelError(actual, expected);
  assert.ok(err <= tol, `${what}: max relative error ${err} > ${tol}`);
}

/** Largest |a - b| in each row of m, relative to the row's largest |b|. */
function maxRowRelError(a: Float32Array, b: Float32Array, m: number): number {
  let worst = 0;
  for (let r = 0; r < b.length / m; r++) {
    let scale = 0, err = 0;
    for (let j = r * m; j < (r + 1) * m; j++) {
      scale = Math.max(scale, Math.abs(b[j]));
      err = Math.max(err, Math.abs(a[j] - b[j]));
    }
    const rel = err / Math.max(scale, 1e-30);
    if (!(rel <= worst)) worst = Number.isNaN(rel) ? Infinity : rel;
  }
  return worst;
}

/** values as stored in dtype, for upload. */
function encode(values: Float32Array, dtype: DTypeCode): ArrayBufferView {
  return dtype === DType.F16 ? f32ToF16(values) : dtype === DType.BF16 ? f32ToBf16(values) : values;
}

const f32 = (b: ArrayBuffer) => new Float32Array(b);
const DTYPES: [string, DTypeCode][] = [["f32", DType.F32], ["f16", DType.F16], [
  "bf16",
  DType.BF16,
]];

// ---- per-op tests ----------------------------------------------------------------------------

test("embed copies rows exactly, every table dtype", (gpu, cpu) => {
  const rng = new Rng(1), vocab = 1000, dim = 96, n = 7;
  const tokens = randomInts(rng, n, vocab);
  tokens[0] = 0;
  tokens[1] = vocab - 1;
  for (const [name, dt] of DTYPES) {
    const table = encode(randomFloats(rng, vocab * dim), dt);
    const [g, c] = onBoth(gpu, cpu, [table, tokens], { bytes: n * dim * 4 }, (be, [t, ids], o) => {
      be.embed(o, t, dt, ids, n, dim, vocab);
    });
    assert.deepEqual(f32(g), f32(c), name);
  }
});

test("embed reports an id outside the vocabulary at the next download", (gpu) => {
  using out = gpu.alloc(16 * 4);
  using ids = gpu.alloc(4);
  using table = gpu.alloc(10 * 16 * 4);
  gpu.upload(ids, new Int32Array([10]));
  gpu.embed(out, table, DType.F32, ids, 1, 16, 10);
  assert.throws(() => gpu.download(out, new Float32Array(16)), /token id 10, outside \[0, 10\)/);
  gpu.download(out, new Float32Array(16)); // the fault is reported once
});

// Tolerance 1e-5 relative (to max(1, |cpu|)): fp32 on both, only the sum order differs.
test("rmsnorm, also in place", (gpu, cpu) => {
  const rng = new Rng(2);
  for (const [n, dim] of [[5, 4096], [3, 100], [1, 7]]) {
    const x = randomFloats(rng, n * dim, -3, 3), w = randomFloats(rng, dim, 0.5, 1.5);
    const [g, c] = onBoth(gpu, cpu, [x, w], { bytes: n * dim * 4 }, (be, [xb, wb], o) => {
      be.rmsnorm(o, DType.F32, xb, wb, n, dim, 1e-5);
    });
    assertClose(f32(g), f32(c), 1e-5, `rmsnorm ${n}x${dim}`);
    const [gi] = onBoth(gpu, cpu, [w], { bytes: n * dim * 4, init: x }, (be, [wb], o) => {
      be.rmsnorm(o, DType.F32, o, wb, n, dim, 1e-5);
    });
    assertClose(f32(gi), f32(c), 1e-5, `rmsnorm in place ${n}x${dim}`);
  }
});

// The residual add is one fp32 add on both (exact alike); the norm as above.
test("rmsnorm with a residual: x + residual kept, the norm of the sum out", (gpu, cpu) => {
  const rng = new Rng(12);
  for (const [n, dim] of [[1, 4096], [3, 100]]) {
    const x = randomFloats(rng, n * dim, -3, 3), r = randomFloats(rng, n * dim, -3, 3);
    const w = randomFloats(rng, dim, 0.5, 1.5);
    const [g, c] = [gpu, cpu].map((be) => rmsnormResidual(be, x, r, w, n, dim));
    assert.deepEqual(g.kept, c.kept, `residual sum ${n}x${dim}`);
    assertClose(g.normed, c.normed, 1e-5, `rmsnorm of the sum ${n}x${dim}`);
  }
});

// Tolerance 1e-5: the angle is the same fp32 product; sinf/cosf differ by an ulp or two.
test("rope at positions up to 5000", (gpu, cpu) => {
  const rng = new Rng(3);
  for (const [n, heads, hd] of [[9, 8, 128], [4, 3, 64], [2, 2, 10]]) {
    const x = randomFloats(rng, n * heads * hd);
    const pos = randomInts(rng, n, 5000);
    const inv = new Float32Array(hd / 2).map((_, i) => 1 / Math.pow(500000, (2 * i) / hd));
    const scaleHeads = heads % 2 ? 1 : heads / 2; // the q-scale hook, one row per head group
    const values = randomFloats(rng, scaleHeads * (hd / 2), 0.5, 4);
    /** x turned on both backends, with `scale` rows of `values` (none: unscaled). */
    const turn = (what: string, scale?: { heads: number; scaledHeads?: number }) => {
      const [g, c] = onBoth(
        gpu,
        cpu,
        [pos, inv, values],
        { bytes: x.byteLength, init: x },
        (be, [p, f, sc], o) =>
          be.rope(o, p, f, n, heads, hd, scale ? { pairs: sc, ...scale } : null),
      );
      assertClose(f32(g), f32(c), 1e-5, `rope ${what} ${n}x${heads}x${hd}`);
    };
    turn("plain");
    turn("scaled", { heads: scaleHeads });
    // decode's [q heads | k heads] in one call: at 8 heads, 3 rows of scale for the first 6
    // (2 heads a row), the last 2 turned unscaled
    if (scaleHeads > 1) turn("q|k", { heads: scaleHeads - 1, scaledHeads: heads - 2 });
  }
});

// Tolerance 1e-5. Odd counts and 4-byte offsets reach the scalar paths beside the float4 ones.
test("swiglu and add, aligned and not, in place", (gpu, cpu) => {
  const rng = new Rng(4);
  for (const [count, offset] of [[10001, 0], [4096, 0], [999, 1]]) {
    const a = randomFloats(rng, count + 1, -6, 6), b = randomFloats(rng, count + 1, -2, 2);
    const bytes = (count + 1) * 4, at = offset * 4, len = count * 4;
    const ops = {
      swiglu: (be: Backend, o: Slice, a: Slice, b: Slice) => be.swiglu(o, DType.F32, a, b, count),
      add: (be: Backend, o: Slice, a: Slice, b: Slice) => be.add(o, a, b, count),
    };
    for (const op of ["swiglu", "add"] as const) {
      const [g, c] = onBoth(gpu, cpu, [a, b], { bytes }, (be, [ab, bb], o) => {
        ops[op](be, o.slice(at, len), ab.slice(at, len), bb.slice(at, len));
      });
      assertClose(
        f32(g).subarray(offset, offset + count),
        f32(c).subarray(offset, offset + count),
        1e-5,
        `${op} ${count}+${offset}`,
      );
      const [gi] = onBoth(gpu, cpu, [b], { bytes, init: a }, (be, [bb], o) => {
        ops[op](be, o.slice(at, len), o.slice(at, len), bb.slice(at, len));
      });
      assertClose(
        f32(gi).subarray(offset, offset + count),
        f32(c).subarray(offset, offset + count),
        1e-5,
        `${op} in place ${count}`,
      );
    }
  }
});

function matmulCase(
  gpu: Backend,
  cpu: Backend,
  rng: Rng,
  dt: DTypeCode,
  n: number,
  k: number,
  m: number,
) {
  const x = randomFloats(rng, n * k), w = encode(randomFloats(rng, m * k, -0.1, 0.1), dt);
  const bias = randomFloats(rng, m);
  return onBoth(gpu, cpu, [x, w, bias], { bytes: n * m * 4 }, (be, [xb, wb, bb], o) => {
    be.matmul(o, xb, DType.F32, wb, dt, bb, n, k, m);
  }).map(f32);
}

// n = 1 is the GEMV: weights read exactly, fp32 sums in another order: 1e-4 relative. k = 300 is
// not a multiple of 8 and takes the element-load kernel; 4096 the 16-byte one.
test("matmul n=1 (GEMV), every weight dtype, with bias", (gpu, cpu) => {
  const rng = new Rng(5);
  for (const [name, dt] of DTYPES) {
    for (const [k, m] of [[4096, 520], [300, 77]]) {
      const [g, c] = matmulCase(gpu, cpu, rng, dt, 1, k, m);
      assertClose(g, c, 1e-4, `gemv ${name} k ${k} m ${m}`);
    }
  }
});

// n > 1 goes to cuBLAS: fp32 weights in fp32 (1e-4 relative); fp16/bf16 weights with x rounded to
// the weight's type (the CPU keeps x in fp32), so 1e-2 of each row's largest |value|.
test("matmul n>1 (cuBLAS), every weight dtype, with bias", (gpu, cpu) => {
  const rng = new Rng(6);
  for (const [name, dt] of DTYPES) {
    for (const [n, k, m] of [[7, 1024, 520], [64, 256, 300], [2, 40, 3]]) {
      const [g, c] = matmulCase(gpu, cpu, rng, dt, n, k, m);
      if (dt === DType.F32) assertClose(g, c, 1e-4, `gemm f32 ${n}x${k}x${m}`);
      else {
        const err = maxRowRelError(g, c, m);
        assert.ok(err <= 1e-2, `gemm ${name} ${n}x${k}x${m}: ${err} of the row's max`);
      }
    }
  }
});

const NARROW: [string, typeof DType.F16 | typeof DType.BF16][] = [["f16", DType.F16], [
  "bf16",
  DType.BF16,
]];
const u16 = (b: ArrayBuffer) => new Uint16Array(b);
const rounded = (values: Float32Array, dt: typeof DType.F16 | typeof DType.BF16) =>
  dt === DType.F16 ? f32ToF16(values) : f32ToBf16(values);

/** Largest distance in units in the last place between fp16 (or bf16) bit patterns a and b. */
function maxUlps(a: Uint16Array, b: Uint16Array): number {
  const ordered = (h: number) => (h & 0x8000 ? -(h & 0x7fff) : h);
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    worst = Math.max(worst, Math.abs(ordered(a[i]) - ordered(b[i])));
  }
  return worst;
}

// F16/BF16 outs for the GEMM that reads them. Against the GPU's own F32 out rounded by the reference
// converter (what the prefill matmul's rounding pass gave before): bit for bit. Against the CPU's
// narrow out: within 1 ulp of the narrow type, as the fp32 values differ by an ulp or two (sum order,
// expf) and may fall either side of a rounding boundary. swiglu takes unaligned outs (2-byte
// offsets) beside aligned inputs too, so the scalar path and the 8-byte stores both run; its
// range up to 300 * 300 overflows fp16 to inf.
test("rmsnorm and swiglu write F16/BF16: the GPU's F32 out rounded exactly, the CPU's to 1 ulp", (
  gpu,
  cpu,
) => {
  const rng = new Rng(21);
  for (const [n, dim] of [[5, 4096], [3, 100], [1, 7]]) {
    const x = randomFloats(rng, n * dim, -3, 3), w = randomFloats(rng, dim, 0.5, 1.5);
    const [f] = onBoth(gpu, cpu, [x, w], { bytes: n * dim * 4 }, (be, [xb, wb], o) => {
      be.rmsnorm(o, DType.F32, xb, wb, n, dim, 1e-5);
    });
    for (const [name, dt] of NARROW) {
      const [g, c] = onBoth(gpu, cpu, [x, w], { bytes: n * dim * 2 }, (be, [xb, wb], o) => {
        be.rmsnorm(o, dt, xb, wb, n, dim, 1e-5);
      });
      assert.deepEqual(u16(g), rounded(f32(f), dt), `rmsnorm ${name} ${n}x${dim} vs the GPU's F32`);
      assert.ok(maxUlps(u16(g), u16(c)) <= 1, `rmsnorm ${name} ${n}x${dim} vs the CPU`);
    }
  }
  const cases = [[10001, 0, 0, 6], [4096, 0, 0, 300], [999, 1, 1, 6], [1000, 0, 1, 6]];
  for (const [count, inAt, outAt, range] of cases) {
    const a = randomFloats(rng, count + 1, -range, range), b = randomFloats(rng, count + 1, -2, 2);
    if (range > 100) b.set(randomFloats(rng, count + 1, -range, range));
    const ins = (ab: DeviceBuffer, bb: DeviceBuffer) =>
      [ab.slice(inAt * 4, count * 4), bb.slice(inAt * 4, count * 4)] as const;
    const [f] = onBoth(gpu, cpu, [a, b], { bytes: (count + 1) * 4 }, (be, [ab, bb], o) => {
      be.swiglu(o.slice(outAt * 4, count * 4), DType.F32, ...ins(ab, bb), count);
    });
    const want = f32(f).subarray(outAt, outAt + count);
    for (const [name, dt] of NARROW) {
      const [g, c] = onBoth(gpu, cpu, [a, b], { bytes: (count + 1) * 2 }, (be, [ab, bb], o) => {
        be.swiglu(o.slice(outAt * 2, count * 2), dt, ...ins(ab, bb), count);
      });
      const [gn, cn] = [
        u16(g).subarray(outAt, outAt + count),
        u16(c).subarray(outAt, outAt + count),
      ];
      const what = `swiglu ${name} ${count} in +${inAt} out +${outAt}`;
      assert.deepEqual(gn, rounded(want, dt), `${what} vs the GPU's F32`);
      assert.ok(maxUlps(gn, cn) <= 1, `${what} vs the CPU`);
    }
  }
});

// x in the weights' F16/BF16 (what rmsnorm and swiglu now write for prefill). Against the CPU,
// which widens the same x: n = 1 (the GEMV, 16-byte loads at k 4096 and element loads at k 300)
// 1e-4 relative as for an F32 x; n > 1 (cuBLAS with no rounding pass) 1e-4 of each row's largest
// |value|: the products are exact in fp32 on both, only the order and the tensor cores' fp32
// accumulation differ. Against the GPU's own matmul of the same values as an F32 x, which its
// rounding pass turns into the same operand for the same cuBLAS call: bit for bit, so prefill's
// logits do not change.
test("matmul with an F16/BF16 x, n=1 and n>1: the CPU's to 1e-4, the GPU's F32 x exactly", (
  gpu,
  cpu,
) => {
  const rng = new Rng(22);
  const shapes = [[1, 4096, 520], [1, 300, 77], [7, 1024, 520], [64, 256, 300], [2, 40, 3]];
  for (const [name, dt] of NARROW) {
    for (const [n, k, m] of shapes) {
      const x = rounded(randomFloats(rng, n * k), dt);
      const wide = dt === DType.F16 ? f16ToF32(x) : bf16ToF32(x);
      const w = encode(randomFloats(rng, m * k, -0.1, 0.1), dt), bias = randomFloats(rng, m);
      const product = (be: Backend, xs: ArrayBufferView, xDt: DTypeCode) =>
        f32(runOn(be, [xs, w, bias], { bytes: n * m * 4 }, ([xb, wb, bb], o) => {
          be.matmul(o, xb, xDt, wb, dt, bb, n, k, m);
        }));
      const g = product(gpu, x, dt), c = product(cpu, x, dt);
      const what = `matmul ${name} x ${n}x${k}x${m}`;
      if (n === 1) assertClose(g, c, 1e-4, what);
      else {
        const err = maxRowRelError(g, c, m);
        assert.ok(err <= 1e-4, `${what}: ${err} of the row's max vs the CPU`);
        assert.deepEqual(g, product(gpu, wide, DType.F32), `${what} vs the GPU's F32 x`);
      }
    }
  }
});

test("kv_store writes the same bytes (fp16 rounding included)", (gpu, cpu) => {
  const rng = new Rng(7), n = 5, pos0 = 3, kvHeads = 4, hd = 64, cap = 16;
  // past fp16's range too
  const [k, v] = [0, 1].map(() => randomFloats(rng, n * kvHeads * hd, -70000, 70000));
  for (const dt of [DType.F16, DType.F32]) {
    const bytes = kvHeads * cap * hd * (dt === DType.F16 ? 2 : 4);
    // the key cache, then the value cache, in one buffer
    const out = { bytes: 2 * bytes, init: new Uint8Array(2 * bytes) };
    const [g, c] = onBoth(gpu, cpu, [k, v], out, (be, [kb, vb], o) => {
      const [kCache, vCache] = [o.slice(0, bytes), o.slice(bytes, bytes)];
      be.kvStore({
        kCache,
        vCache,
        cacheDtype: dt,
        k: kb,
        v: vb,
        n,
        pos0,
        kvHeads,
        headDim: hd,
        cap,
      });
    });
    assert.deepEqual(new Uint8Array(g), new Uint8Array(c), `kv_store dtype ${dt}`);
  }
});

interface AttnCase {
  heads: number;
  kvHeads: number;
  hd: number;
  n: number;
  pos0: number;
  dt: DTypeCode;
  /** q in [-qRange, qRange) (default 2): larger makes the softmax peaked */
  qRange?: number;
  /** the cache rows past the last position NaN: a kernel reading one past the end shows */
  poison?: boolean;
}

function attentionCase(
  gpu: Backend,
  cpu: Backend,
  rng: Rng,
  a: AttnCase,
): [Float32Array, Float32Array] {
  const cap = a.pos0 + a.n + 3;
  const [kf, vf] = [0, 1].map(() => randomFloats(rng, a.kvHeads * cap * a.hd));
  if (a.poison) {
    for (let h = 0; h < a.kvHeads; h++) {
      const from = (h * cap + a.pos0 + a.n) * a.hd, to = (h + 1) * cap * a.hd;
      kf.fill(NaN, from, to);
      vf.fill(NaN, from, to);
    }
  }
  const k = encode(kf, a.dt), v = encode(vf, a.dt);
  const qRange = a.qRange ?? 2;
  const q = randomFloats(rng, a.n * a.heads * a.hd, -qRange, qRange);
  const [g, c] = onBoth(gpu, cpu, [q, k, v], { bytes: q.byteLength }, (be, [qb, kb, vb], o) => {
    const args = { out: o, q: qb, kCache: kb, vCache: vb, cacheDtype: a.dt, pos0: a.pos0, n: a.n };
    const shape = {
      heads: a.heads,
      kvHeads: a.kvHeads,
      headDim: a.hd,
      cap,
      scale: 1 / Math.sqrt(a.hd),
    };
    if (a.n === 1) be.attentionDecode({ ...args, ...shape });
    else be.attentionPrefill({ ...args, ...shape });
  });
  return [f32(g), f32(c)];
}

// Tolerance 1e-4 for the fp32 SIMT kernel (fp32 cache, head_dim 256 and 40). An fp16 cache with
// head_dim 64 or 128 takes the tensor-core kernel, which rounds q and the probabilities to fp16
// (as flash attention does): 4e-3 there.
test("attention prefill: GQA ratios, head_dim 64/128/256/40, fp16 and fp32 caches", (gpu, cpu) => {
  const rng = new Rng(8);
  const shapes = [[8, 8, 64], [8, 2, 128], [12, 4, 64], [4, 1, 128], [4, 2, 256], [6, 3, 40]];
  for (const [heads, kvHeads, hd] of shapes) {
    for (const dt of [DType.F16, DType.F32]) {
      for (const [n, pos0] of [[37, 20], [16, 0], [70, 100], [300, 700]]) {
        const [g, c] = attentionCase(gpu, cpu, rng, { heads, kvHeads, hd, n, pos0, dt });
        const tensorCores = dt === DType.F16 && (hd === 64 || hd === 128);
        assertClose(
          g,
          c,
          tensorCores ? 4e-3 : 1e-4,
          `prefill ${heads}/${kvHeads}x${hd} n ${n} pos0 ${pos0} dtype ${dt}`,
        );
      }
    }
  }
});

/** Whether a decode step runs on tensor cores (decode_mma.cu's decode_mma_supported, behind
 * iq_attention_decode's fp16 cache and aligned rows). */
function decodeOnTensorCores(dt: DTypeCode, hd: number, group: number): boolean {
  return dt === DType.F16 && (hd === 64 || hd === 128) && group <= 8;
}

// The tensor-core decode rounds q (times scale and log2 e) and the probabilities to fp16 as the
// MMAs take them: its outputs agree within 3e-3 of each head's largest |output|. Measured on an
// H100: at most 4e-4 with q in [-2, 2], 1.2e-3 in [-6, 6] and 2e-3 in [-12, 12] (the larger the
// scores, the more q's rounding moves them). Against the row, not against 1: the outputs of
// long contexts are averages far below 1, where an absolute 3e-3 would hide a lost chunk.
const DECODE_MMA_TOL = 3e-3;

// Prompts over an fp16 cache (prefill_rows.cu): blocks of 128 (query, head) rows of one KV head,
// split over 32-row tiles where the query blocks leave the GPU short of a wave. Short prompts deep
// in a context (2 to 40 queries after thousands of positions: one query block, many splits),
// longer ones whose blocks see different numbers of tiles, none a whole number of tiles; GQA 1 to
// 8. Rows past the prompt are NaN and q in [-6, 6] makes the softmax peaked, so a tile read past
// the end, lost or doubled shows; tolerance DECODE_MMA_TOL of each row's largest |output|, as the
// decode on tensor cores (the outputs of long contexts are averages far below 1).
test("attention prefill on tensor cores: short prompts deep in a context, split over tiles", (
  gpu,
  cpu,
) => {
  const rng = new Rng(12);
  const shapes = [[32, 8, 128], [8, 8, 64], [12, 4, 64], [16, 2, 128], [8, 1, 128]];
  const cases = [[2, 3000], [16, 5001], [40, 20000], [130, 2047], [300, 9000]];
  for (const [heads, kvHeads, hd] of shapes) {
    for (const [n, pos0] of cases) {
      const [g, c] = attentionCase(gpu, cpu, rng, {
        heads,
        kvHeads,
        hd,
        n,
        pos0,
        dt: DType.F16,
        qRange: 6,
        poison: true,
      });
      const err = maxRowRelError(g, c, hd);
      const what = `prefill ${heads}/${kvHeads}x${hd} n ${n} pos0 ${pos0}`;
      assert.ok(err <= DECODE_MMA_TOL, `${what}: ${err} of the row's max`);
    }
  }
});

// Tolerance 1e-4 for the SIMT kernels. Long positions split the keys across blocks; 16 query heads
// per KV head take the SIMT 8-head kernel in two blocks, head_dim 256 its fp16 path; head_dim 36
// and the fp32 cache fall back to the prefill kernel. fp16 caches of head_dim 64/128 with up to 8
// query heads per KV head take the tensor-core kernel (DECODE_MMA_TOL). Rows past pos are NaN.
test("attention decode: splits up to 5000 positions, GQA ratios", (gpu, cpu) => {
  const rng = new Rng(9);
  const shapes = [[32, 8, 128], [8, 8, 64], [28, 4, 128], [16, 1, 64], [6, 3, 256], [4, 2, 36]];
  for (const [heads, kvHeads, hd] of shapes) {
    for (const pos of [0, 1, 100, 1000, 4999]) {
      const dt = pos % 2 ? DType.F16 : DType.F32;
      const [g, c] = attentionCase(gpu, cpu, rng, {
        heads,
        kvHeads,
        hd,
        n: 1,
        pos0: pos,
        dt,
        poison: true,
      });
      const what = `decode ${heads}/${kvHeads}x${hd} pos ${pos} dtype ${dt}`;
      if (!decodeOnTensorCores(dt, hd, heads / kvHeads)) assertClose(g, c, 1e-4, what);
      else {
        const err = maxRowRelError(g, c, hd);
        assert.ok(err <= DECODE_MMA_TOL, `${what}: ${err} of the row's max`);
      }
    }
  }
});

// The tensor-core decode (decode_mma.cu: warps of 32-token chunks, each warp a split of its own)
// on every shape it takes: head_dim 64 and 128, 1, 3, 4, 7 and 8 query heads per KV head. Every
// context of 1 to 40 positions (one chunk and its masked tail, then two splits of one chunk each),
// 64 +- 1, and thousands of positions split over up to hundreds of warps, none a whole number of
// chunks; 20000 positions over 8 KV heads give each warp 5 or more chunks on an H100, around its
// ring of 3 stages and more. Rows past pos are NaN, so a copy or a score past the end shows as
// NaN; q in [-6, 6] makes the softmax peaked, so a lost or doubled token shows too. Tolerance
// DECODE_MMA_TOL.
test("attention decode on tensor cores: head_dim 64/128, GQA 1 to 8, short and long contexts", (
  gpu,
  cpu,
) => {
  const rng = new Rng(10);
  const shapes = [
    [8, 8, 64],
    [8, 8, 128],
    [6, 2, 64],
    [16, 4, 64],
    [32, 8, 128],
    [28, 4, 128],
    [16, 2, 64],
    [32, 4, 128],
  ];
  const positions = [...Array(40).keys(), 63, 64, 65, 1000, 4095, 8999];
  const cases = shapes.flatMap(([heads, kvHeads, hd]) =>
    positions.map((pos) => [heads, kvHeads, hd, pos])
  ).concat([[8, 8, 64, 19999], [32, 8, 128, 19999]]);
  for (const [heads, kvHeads, hd, pos] of cases) {
    assert.ok(decodeOnTensorCores(DType.F16, hd, heads / kvHeads));
    const [g, c] = attentionCase(gpu, cpu, rng, {
      heads,
      kvHeads,
      hd,
      n: 1,
      pos0: pos,
      dt: DType.F16,
      qRange: 6,
      poison: true,
    });
    const err = maxRowRelError(g, c, hd);
    assert.ok(
      err <= DECODE_MMA_TOL,
      `decode ${heads}/${kvHeads}x${hd} pos ${pos}: ${err} of the row's max`,
    );
  }
});

test("attention rejects head_dim above 256 on both backends", (gpu, cpu) => {
  for (const be of [gpu, cpu]) {
    assert.throws(() => {
      runOn(be, [new Float32Array(512), new Float32Array(512), new Float32Array(512)], {
        bytes: 2048,
      }, (
        [q, k, v],
        o,
      ) => {
        const shape = { heads: 1, kvHeads: 1, headDim: 512, cap: 1, scale: 1 };
        be.attentionDecode({
          out: o,
          q,
          kCache: k,
          vCache: v,
          cacheDtype: DType.F32,
          pos0: 0,
          n: 1,
          ...shape,
        });
      });
    }, NativeError);
  }
});

// Exactly the same token: both sort by (logit desc, id asc) and run the same fp32 steps. Quantised
// logits make ties common, so the tie rules are exercised too.
test("sample picks the CPU's token for many settings", (gpu, cpu) => {
  const rng = new Rng(10);
  const settings = [
    { temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1 },
    { temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1.5 },
    { temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05, repeatPenalty: 1 },
    { temperature: 1, topK: 40, topP: 1, minP: 0, repeatPenalty: 1.3 },
    { temperature: 1.2, topK: 0, topP: 1, minP: 0, repeatPenalty: 1 },
    { temperature: 0.7, topK: 0, topP: 0.9, minP: 0, repeatPenalty: 1 },
    { temperature: 1, topK: 0, topP: 1, minP: 0.1, repeatPenalty: 1.1 },
    { temperature: 0.5, topK: 1, topP: 1, minP: 0, repeatPenalty: 1 },
    { temperature: 1, topK: 100000, topP: 0.5, minP: 0, repeatPenalty: 0.8 },
  ];
  for (let trial = 0; trial < 120; trial++) {
    const s = settings[trial % settings.length];
    const vocab = [1000, 32000, 7][trial % 3];
    const logits = randomFloats(rng, vocab, -8, 8);
    if (trial % 2) { for (let i = 0; i < vocab; i++) logits[i] = Math.round(logits[i] * 2) / 2; }
    const history = randomInts(rng, 50, vocab + 10).map((id, i) => (i % 7 === 0 ? -1 - id : id));
    const uniform = trial % 10 === 9 ? 0.99999994 : rng.next();
    const [g, c] = onBoth(gpu, cpu, [logits, history], { bytes: 4 }, (be, [lb, hb], o) => {
      be.sample({
        outToken: o,
        logits: lb,
        vocab,
        history: hb,
        nHistory: history.length,
        uniform,
        ...s,
      });
    });
    const at = `trial ${trial}: vocab ${vocab} ${JSON.stringify(s)} uniform ${uniform}`;
    assert.equal(new Int32Array(g)[0], new Int32Array(c)[0], at);
  }
});

test("sample rejects a NaN or +inf temperature and an infinite penalty on both backends", (
  gpu,
  cpu,
) => {
  const logits = Float32Array.from([1, 2, 3]);
  for (
    const bad of [
      { temperature: NaN, repeatPenalty: 1 },
      { temperature: Infinity, repeatPenalty: 1 },
      { temperature: 1, repeatPenalty: Infinity },
    ]
  ) {
    for (const be of [gpu, cpu]) {
      assert.throws(
        () =>
          runOn(be, [logits], { bytes: 4 }, ([lb], o) => {
            be.sample({
              outToken: o,
              logits: lb,
              vocab: 3,
              history: null,
              nHistory: 0,
              topK: 0,
              topP: 1,
              minP: 0,
              uniform: 0.5,
              ...bad,
            });
          }),
        (e: Error) => e instanceof NativeError && /iq_sample: .* out of range/.test(e.message),
        `${be.kind} ${JSON.stringify(bad)}`,
      );
    }
  }
});

/** One sample call on be with its own buffers: the NativeError's message ("" if none) and the
 * token left in out_token (which starts at 12345). */
function sampleOutcome(
  be: Backend,
  logits: Float32Array,
  history: number[],
  s: { temperature: number; topK: number; topP: number; minP: number; repeatPenalty: number },
): { message: string; token: number } {
  const l = be.alloc(logits.byteLength), out = be.alloc(4), h = be.alloc(4 * history.length + 4);
  try {
    be.upload(l, logits);
    be.upload(out, Int32Array.of(12345));
    be.upload(h, Int32Array.from(history));
    let message = "";
    try {
      be.sample({
        outToken: out,
        logits: l,
        vocab: logits.length,
        history: h,
        nHistory: history.length,
        uniform: 0.5,
        ...s,
      });
    } catch (e) {
      if (!(e instanceof NativeError)) throw e;
      message = e.message;
    }
    const token = new Int32Array(1);
    be.download(out, token);
    return { message, token: token[0] };
  } finally {
    [l, out, h].forEach((b) => b.close());
  }
}

// Logits it cannot sample (innerq.h): the CPU fails in C; the GPU returns and leaves only the token,
// the same one, from which TypeScript (sampledToken, and Sampler.sample through it) throws the CPU's
// message. 5000 ids span several per thread of the arg max and several sort passes; the ids that
// must be reported sit late, behind finite logits, a NaN of each sign and +inf beside each other.
test("sample: NaN, a +inf largest and all -inf leave the CPU's failure token and message", (
  gpu,
  cpu,
) => {
  const vocab = 5000, finite = () => randomFloats(new Rng(12), vocab, -8, 8);
  const withBits = (logits: Float32Array, at: Record<number, number>) => {
    const bits = new Uint32Array(logits.buffer);
    for (const [id, b] of Object.entries(at)) bits[Number(id)] = b;
    return logits;
  };
  const NEG_NAN = 0xffc00000, POS_NAN = 0x7fc00000, POS_INF = 0x7f800000;
  const cases = [
    {
      what: "a negative NaN, then a positive one and +inf",
      logits: withBits(finite(), { 3001: NEG_NAN, 4500: POS_NAN, 10: POS_INF }),
      message: "iq_sample: logit 3001 is NaN",
      token: -(4 * 3001 + 1),
    },
    {
      what: "every logit NaN",
      logits: new Float32Array(vocab).fill(NaN),
      message: "iq_sample: logit 0 is NaN",
      token: -1,
    },
    {
      what: "+inf at 2999 and 4000",
      logits: withBits(finite(), { 4000: POS_INF, 2999: POS_INF }),
      message: "iq_sample: the largest logit (id 2999) is +inf",
      token: -(4 * 2999 + 2),
    },
    {
      what: "+inf among three",
      logits: Float32Array.from([-Infinity, 1, Infinity]),
      message: "iq_sample: the largest logit (id 2) is +inf",
      token: -(4 * 2 + 2),
    },
    {
      what: "every logit -inf",
      logits: new Float32Array(vocab).fill(-Infinity),
      message: "iq_sample: every logit is -inf",
      token: -3,
    },
  ];
  const settings = [
    { temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1 },
    { temperature: 0, topK: 0, topP: 1, minP: 0, repeatPenalty: 1.5 },
    { temperature: 1, topK: 0, topP: 1, minP: 0, repeatPenalty: 1 },
    { temperature: 0.7, topK: 40, topP: 0.9, minP: 0.05, repeatPenalty: 1.3 },
  ];
  const history = [2, 3001, 4500, 2999, 1];
  for (const c of cases) {
    for (const s of settings) {
      const at = `${c.what} ${JSON.stringify(s)}`;
      const g = sampleOutcome(gpu, c.logits, history, s);
      const want = { message: `cpu sample: ${c.message}`, token: c.token };
      assert.deepEqual(sampleOutcome(cpu, c.logits, history, s), want, at);
      assert.deepEqual(g, { message: "", token: c.token }, at);
      assert.throws(
        () => gpu.sampledToken(g.token),
        (e: Error) => e instanceof NativeError && e.message === `cuda sample: ${c.message}`,
        at,
      );
    }
    // the generate loop's path: Sampler.sample reads the id back and throws
    const l = gpu.alloc(c.logits.byteLength);
    try {
      gpu.upload(l, c.logits);
      for (const params of [GREEDY, { ...GREEDY, temperature: 0.8, topK: 40, seed: 1 }]) {
        using sampler = new Sampler(gpu, params, c.logits.length);
        assert.throws(
          () => sampler.sample(l),
          (e: Error) => e instanceof NativeError && e.message === `cuda sample: ${c.message}`,
          `${c.what} through Sampler, temperature ${params.temperature}`,
        );
      }
    } finally {
      l.close();
    }
  }
  // finite logits over a tiny temperature: the scaled values overflow to +inf (id 0 the lowest)
  const tiny = { temperature: 1e-40, topK: 0, topP: 1, minP: 0, repeatPenalty: 1 };
  const logits = Float32Array.from([1, 2, -1]);
  const want = { message: "iq_sample: the largest logit (id 0) is +inf", token: -2 };
  assert.deepEqual(sampleOutcome(cpu, logits, [], tiny), {
    ...want,
    message: `cpu sample: ${want.message}`,
  });
  assert.deepEqual(sampleOutcome(gpu, logits, [], tiny), { message: "", token: want.token });
});

// ---- end to end --------------------------------------------------------------------------------

async function withModel(dtype: ModelDType, body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "innerq_cuda_test_" });
  try {
    await writeRandomModel(dir, "tiny", { dtype, seed: 3 });
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** The last prompt token's logits and 16 greedy tokens after it. */
async function runModel(
  be: Backend,
  dir: string,
  chunk: number,
): Promise<[Float32Array, number[]]> {
  const config = await loadConfig(dir);
  using model = await Transformer.load(be, dir, config, { ctx: 64, chunk });
  const prompt = randomInts(new Rng(11), 20, config.vocabSize);
  const logits = new Float32Array(config.vocabSize);
  for (let pos = 0; pos < prompt.length; pos += chunk) {
    const ids = prompt.subarray(pos, pos + chunk);
    be.download(model.forward(model.stageTokens(ids), pos, ids.length), logits);
  }
  using sampler = new Sampler(be, GREEDY, config.vocabSize);
  const tokens: number[] = [];
  for await (const t of generate(model, prompt, sampler, { maxTokens: 16, eosTokenIds: [] })) {
    tokens.push(t);
  }
  return [logits, tokens];
}

// BF16 weights, prompt in one chunk: every prefill GEMM reads x in bf16 (rmsnorm and swiglu write
// it so; o's input is rounded in matmul), so the logits agree to 3e-2 of the largest |logit|
// (greedy tokens may then differ where two are that close).
test("tiny bf16 model: prefill logits match the CPU's", async (gpu, cpu) => {
  await withModel("BF16", async (dir) => {
    const [g] = await runModel(gpu, dir, 64);
    const [c] = await runModel(cpu, dir, 64);
    const err = maxRowRelError(g, c, c.length);
    assert.ok(err <= 3e-2, `logits differ by ${err} of the largest`);
  });
});

// Prefill's GEMMs reading rmsnorm's and swiglu's bf16/fp16 outputs see the operands the rounding
// pass made of fp32 ones: the same logits and tokens, bit for bit.
test("tiny bf16 and f16 models: narrow GEMM inputs give the logits of fp32 ones exactly", async (gpu) => {
  for (const dtype of ["BF16", "F16"] as const) {
    await withModel(dtype, async (dir) => {
      const [nl, nt] = await runModel(gpu, dir, 64);
      const [wl, wt] = await runModel(backendAs(gpu, "cpu"), dir, 64);
      assert.deepEqual(nl, wl, dtype);
      assert.deepEqual(nt, wt, dtype);
    });
  }
});

// One token per forward call: only the GEMV, which reads bf16 weights exactly: logits to 1e-3 of
// the largest, and the same greedy tokens.
test("tiny bf16 model, one token at a time: same logits and greedy tokens", async (gpu, cpu) => {
  await withModel("BF16", async (dir) => {
    const [gl, gt] = await runModel(gpu, dir, 1);
    const [cl, ct] = await runModel(cpu, dir, 1);
    const err = maxRowRelError(gl, cl, cl.length);
    assert.ok(err <= 1e-3, `logits differ by ${err} of the largest`);
    assert.deepEqual(gt, ct);
  });
});

// F32 weights: cuBLAS in fp32 too, so chunked prefill agrees to 1e-4 and greedy tokens match.
test("tiny f32 model: same logits and greedy tokens", async (gpu, cpu) => {
  await withModel("F32", async (dir) => {
    const [gl, gt] = await runModel(gpu, dir, 64);
    const [cl, ct] = await runModel(cpu, dir, 64);
    const err = maxRowRelError(gl, cl, cl.length);
    assert.ok(err <= 1e-4, `logits differ by ${err} of the largest`);
    assert.deepEqual(gt, ct);
  });
});

test("timeQueued holds the queue: host pauses left out, a sync releases it, a second's hold fails", (gpu) => {
  using w = gpu.alloc(4096 * 4096 * 2);
  using x = gpu.alloc(4096 * 4);
  using y = gpu.alloc(4096 * 4);
  const gemv = () => gpu.matmul(y, x, DType.F32, w, DType.BF16, null, 1, 4096, 4096);
  const pause = (ms: number) => {
    const end = performance.now() + ms;
    while (performance.now() < end) { /* the host is busy elsewhere */ }
  };
  gemv();
  gpu.sync();
  const start = performance.now();
  const held = gpu.timeQueued(() => {
    gemv();
    pause(50);
    gemv();
  });
  const wall = (performance.now() - start) / 1000;
  // two GEMVs over 32 MB take tens of microseconds; the 50 ms pause falls before the device starts
  assert.ok(wall >= 0.05 && held > 0 && held < 0.01, `device ${held} s, wall ${wall} s`);
  const released = gpu.timeQueued(() => {
    gemv();
    gpu.sync();
    pause(50);
    gemv();
  });
  assert.ok(released >= 0.045, `a sync in the span lets the device go: ${released} s`);
  assert.throws(() => gpu.timeQueued(() => pause(1100)), /waited a second/);
  assert.ok(gpu.timeQueued(gemv) > 0, "spans work after one that failed");
});
