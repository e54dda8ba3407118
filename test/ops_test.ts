// Every op of the CPU backend against the plain TypeScript reference (test/reference.ts), on
// seeded random inputs. Tolerances are relative to max(1, |expected|), the reference computing in
// float64: matmul 1e-6 * sqrt(k) (fp32 sums of k products; measured at most 4e-6 for k = 2500,
// where one dropped product would be off by ~5e-3); rmsnorm, rope and swiglu 1e-6 (measured at
// most 2e-7); exact where fp32 is exact (embed, add, kv_store). Results at 1, 2 and 3 threads must
// be bit-identical, and a matmul row must not depend on n.
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";
import { Backend, type DeviceBuffer, DType, type DTypeCode, NativeError } from "../ffi/backend.ts";
import { openLibrary } from "../ffi/library.ts";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "../src/model/dtype.ts";
import { Rng } from "../src/engine/sampler.ts";
import { maxRelError, randomFloats, randomInts } from "./random.ts";
import * as ref from "./reference.ts";
import { rmsnormResidual } from "./rmsnorm_residual.ts";

const backends = [1, 2, 3].map((threads) => Backend.open("cpu", { threads }));
globalThis.addEventListener("unload", () => backends.forEach((b) => b.close()));
const [cpu] = backends;

function assertClose(actual: Float32Array, expected: Float32Array, tol: number, what: string) {
  const err = maxRelError(actual, expected);
  assert(err <= tol, `${what}: error ${err} > ${tol}`);
}

/** Uploads inputs, runs op, downloads `outFloats` floats from the output (which starts as `init`). */
function run(
  be: Backend,
  inputs: ArrayBufferView[],
  outFloats: number,
  op: (out: DeviceBuffer, ...inputs: DeviceBuffer[]) => void,
  init?: Float32Array,
): Float32Array {
  return new Float32Array(runBytes(be, inputs, outFloats * 4, op, init).buffer);
}

/** run, for an output of any type: its `outBytes` bytes. */
function runBytes(
  be: Backend,
  inputs: ArrayBufferView[],
  outBytes: number,
  op: (out: DeviceBuffer, ...inputs: DeviceBuffer[]) => void,
  init?: ArrayBufferView,
): Uint8Array {
  const bufs = inputs.map((a) => {
    const b = be.alloc(Math.max(4, a.byteLength));
    be.upload(b, a);
    return b;
  });
  const out = be.alloc(outBytes);
  try {
    if (init) be.upload(out, init);
    op(out, ...bufs);
    const host = new Uint8Array(outBytes);
    be.download(out, host);
    return host;
  } finally {
    [out, ...bufs].forEach((b) => b.close());
  }
}

/** Weights as stored in dtype, and the fp32 values they hold. */
function weightsOf(values: Float32Array, dtype: DTypeCode): [ArrayBufferView, Float32Array] {
  if (dtype === DType.BF16) {
    const bits = f32ToBf16(values);
    return [bits, bf16ToF32(bits)];
  }
  if (dtype === DType.F16) {
    const bits = f32ToF16(values);
    return [bits, f16ToF32(bits)];
  }
  return [values, values];
}

const DTYPES = [DType.F32, DType.F16, DType.BF16];

Deno.test("embed gathers rows of every table dtype; a bad id is a NativeError naming it", () => {
  const rng = new Rng(1), vocab = 50, dim = 37;
  const tokens = Int32Array.from([0, vocab - 1, ...randomInts(rng, 7, vocab)]);
  for (const dtype of DTYPES) {
    const [table, values] = weightsOf(randomFloats(rng, vocab * dim), dtype);
    const got = run(
      cpu,
      [table, tokens],
      9 * dim,
      (o, t, ids) => cpu.embed(o, t, dtype, ids, 9, dim, vocab),
    );
    assertEquals(got, ref.embed(values, tokens, dim));
  }
  const embedIds = (ids: Int32Array, dtype: DTypeCode = DType.F32, tableBytes = vocab * dim * 4) =>
    run(
      cpu,
      [new Uint8Array(tableBytes), ids],
      ids.length * dim,
      (o, t, b) => cpu.embed(o, t, dtype, b, ids.length, dim, vocab),
    );
  assertThrows(
    () => embedIds(Int32Array.of(3, 50)),
    (e: Error) => e instanceof NativeError && /token id 50 at position 1/.test(e.message),
  );
  assertThrows(
    () => embedIds(Int32Array.of(-1)),
    (e: Error) => e instanceof NativeError && /token id -1 at position 0/.test(e.message),
  );
  assertThrows(
    () => embedIds(Int32Array.of(0), DType.F32, vocab * dim * 2),
    (e: Error) => e instanceof RangeError && /embed table: needs 7400 bytes/.test(e.message),
  );
  assertThrows(
    () => embedIds(Int32Array.of(0), 7 as DTypeCode),
    (e: Error) => e instanceof RangeError && /unknown dtype code 7/.test(e.message),
  );
});

Deno.test("rmsnorm with a residual: x keeps x + residual, out is the norm of that sum", () => {
  const rng = new Rng(9);
  const [n, dim] = [3, 384];
  const x = randomFloats(rng, n * dim, -3, 3), r = randomFloats(rng, n * dim, -3, 3);
  const w = randomFloats(rng, dim, 0.5, 1.5), sum = x.map((v, i) => Math.fround(v + r[i]));
  for (const be of backends) {
    const { kept, normed } = rmsnormResidual(be, x, r, w, n, dim);
    assertEquals(kept, sum);
    assertEquals(
      normed,
      run(be, [sum, w], n * dim, (o, s, wv) => be.rmsnorm(o, DType.F32, s, wv, n, dim, 1e-5)),
    );
    using xb = be.alloc(n * dim * 4), rb = be.alloc(n * dim * 4), wb = be.alloc(dim * 4);
    assertThrows(
      () => be.rmsnorm(xb, DType.F32, xb, wb, n, dim, 1e-5, rb),
      (e: Error) =>
        e instanceof RangeError &&
        /rmsnorm: with a residual, out, x and residual overlap/.test(e.message),
    );
  }
});

Deno.test("rmsnorm, also in place", () => {
  const rng = new Rng(2);
  // the last rows are small enough that eps makes up half the denominator
  for (const [n, dim, size] of [[1, 64, 3], [5, 384, 3], [3, 1001, 3], [2, 100, 0.005]]) {
    const x = randomFloats(rng, n * dim, -size, size), w = randomFloats(rng, dim, 0.5, 1.5);
    const want = ref.rmsnorm(x, w, dim, 1e-5);
    const results = backends.map((be) =>
      run(be, [x, w], n * dim, (o, xb, wb) => be.rmsnorm(o, DType.F32, xb, wb, n, dim, 1e-5))
    );
    assertClose(results[0], want, 1e-6, "rmsnorm");
    for (const be of backends) {
      const inPlace = run(
        be,
        [w],
        n * dim,
        (o, wb) => be.rmsnorm(o, DType.F32, o, wb, n, dim, 1e-5),
        x,
      );
      assertEquals(inPlace, results[0]);
    }
    assertEquals(results[1], results[0]);
    assertEquals(results[2], results[0]);
  }
  const [x, w] = [new Float32Array(8), new Float32Array(4)];
  assertThrows(
    () => run(cpu, [x, w], 8, (o, xb, wb) => cpu.rmsnorm(o, DType.F32, xb, wb, 1, 8, 1e-5)),
    (e: Error) => e instanceof RangeError && /rmsnorm weight: needs 32 bytes/.test(e.message),
  );
  assertThrows(
    () => run(cpu, [x, x], 8, (o, xb, wb) => cpu.rmsnorm(o, DType.F32, xb, wb, 1, 8, -1)),
    (e: Error) => e instanceof NativeError && /eps -1 must be >= 0/.test(e.message),
  );
});

Deno.test("matmul: every weight dtype, GEMV and tiled paths, bias or none, any thread count", () => {
  const rng = new Rng(3);
  // k below, at and past the kernels' 8- and 32-wide steps and prefill's 1024-wide k chunks; m
  // from 1 to enough 384-wide rows for three threads; n = 1 (GEMV), odd, and 256.
  const shapes = [[1, 384, 100], [1, 384, 300], [1, 37, 1], [1, 3, 6], [1, 1000, 33], [2, 13, 3]];
  shapes.push([37, 384, 70], [5, 2500, 9], [256, 64, 5], [4, 40, 1]);
  for (const [n, k, m] of shapes) {
    for (const dtype of DTYPES) {
      const x = randomFloats(rng, n * k);
      const [w, values] = weightsOf(randomFloats(rng, m * k), dtype);
      const bias = m % 2 ? randomFloats(rng, m) : null;
      const want = ref.matmul(x, values, bias, n, k, m);
      const results = backends.map((be) =>
        run(
          be,
          bias ? [x, w, bias] : [x, w],
          n * m,
          (o, xb, wb, bb) => be.matmul(o, xb, DType.F32, wb, dtype, bb ?? null, n, k, m),
        )
      );
      // sums of k products of |values| < 1: fp32 rounding grows like sqrt(k)
      assertClose(results[0], want, 1e-6 * Math.sqrt(k), `matmul ${n}x${k}x${m} dtype ${dtype}`);
      assertEquals(results[1], results[0]);
      assertEquals(results[2], results[0]);
      if (n > 1) { // decode gives a row the bits prefill gives it
        const t = n - 1, row = x.subarray(t * k, (t + 1) * k);
        const one = run(
          cpu,
          bias ? [row, w, bias] : [row, w],
          m,
          (o, xb, wb, bb) => cpu.matmul(o, xb, DType.F32, wb, dtype, bb ?? null, 1, k, m),
        );
        assertEquals(one, results[0].subarray(t * m, (t + 1) * m));
      }
    }
  }
  assertThrows(
    () =>
      run(
        cpu,
        [new Float32Array(4)],
        4,
        (o, xb) => cpu.matmul(o, xb, DType.F32, xb, DType.F32, null, 3, 2, 1),
      ),
    (e: Error) => e instanceof RangeError && /matmul x: needs 24 bytes/.test(e.message),
  );
  const buf = cpu.alloc(64), other = cpu.alloc(64);
  try {
    assertThrows(
      () => cpu.matmul(buf, other, DType.F32, other, 7 as DTypeCode, null, 1, 2, 2),
      (e: Error) => e instanceof RangeError && /unknown dtype code 7/.test(e.message),
    );
    assertThrows(
      () => cpu.matmul(buf, buf, DType.F32, other, DType.F32, null, 1, 2, 2),
      (e: Error) => e instanceof NativeError && /out is x/.test(e.message),
    );
  } finally {
    buf.close();
    other.close();
  }
});

Deno.test("rope: Hugging Face rotate_half at positions up to 4000", () => {
  const rng = new Rng(4);
  for (const [n, heads, hd] of [[1, 4, 64], [7, 6, 128], [3, 2, 16]]) {
    const x = randomFloats(rng, n * heads * hd);
    const pos = randomInts(rng, n, 4000);
    const inv = Float32Array.from({ length: hd / 2 }, (_, i) => Math.pow(10000, (-2 * i) / hd));
    const results = backends.map((be) =>
      run(be, [pos, inv], x.length, (o, p, f) => be.rope(o, p, f, n, heads, hd), x)
    );
    assertClose(results[0], ref.rope(x, pos, inv, heads, hd), 1e-6, "rope");
    assertEquals(results[1], results[0]);
    assertEquals(results[2], results[0]);
    // the per-pair scale hook, one row per group of heads (GQA: q heads over KV-head rows)
    const scaleHeads = heads % 2 ? heads : heads / 2;
    const values = randomFloats(rng, scaleHeads * (hd / 2), 0.5, 4);
    const scaled = run(
      cpu,
      [pos, inv, values],
      x.length,
      (o, p, f, sc) => cpu.rope(o, p, f, n, heads, hd, { pairs: sc, heads: scaleHeads }),
      x,
    );
    assertClose(
      scaled,
      ref.rope(x, pos, inv, heads, hd, { values, heads: scaleHeads }),
      1e-6,
      "rope scaled",
    );
  }
  // decode's one call for a token's [q heads | k heads]: the scale reaches the q heads only
  const [n, qHeads, kvHeads, hd] = [3, 8, 2, 16];
  const heads = qHeads + kvHeads, x = randomFloats(rng, n * heads * hd);
  const pos = randomInts(rng, n, 4000);
  const inv = Float32Array.from({ length: hd / 2 }, (_, i) => Math.pow(10000, (-2 * i) / hd));
  const values = randomFloats(rng, kvHeads * (hd / 2), 0.5, 4);
  const scale = { heads: kvHeads, scaledHeads: qHeads };
  const qk = run(
    cpu,
    [pos, inv, values],
    x.length,
    (o, p, f, sc) => cpu.rope(o, p, f, n, heads, hd, { pairs: sc, ...scale }),
    x,
  );
  assertClose(qk, ref.rope(x, pos, inv, heads, hd, { values, ...scale }), 1e-6, "rope q|k");
  const plain = ref.rope(x, pos, inv, heads, hd);
  for (let t = 0; t < n; t++) { // the k heads as rope without a scale turns them
    const k = (t * heads + qHeads) * hd, end = (t + 1) * heads * hd;
    assertClose(qk.subarray(k, end), plain.subarray(k, end), 1e-6, "rope q|k: k unscaled");
  }
  const buf = cpu.alloc(64);
  try {
    assertThrows(() => cpu.rope(buf, buf, buf, 1, 1, 3), /head_dim must be even, got 3/);
    assertThrows(
      () => cpu.rope(buf, buf, buf, 1, 3, 2, { pairs: buf, heads: 2 }),
      /scaled heads 3 must be at most heads 3 and a multiple of scale heads 2/,
    );
    assertThrows(
      () => cpu.rope(buf, buf, buf, 1, 2, 2, { pairs: buf, heads: 1, scaledHeads: 3 }),
      /scaled heads 3 must be at most heads 2/,
    );
  } finally {
    buf.close();
  }
});

Deno.test("swiglu and add, in place too", () => {
  const rng = new Rng(5);
  for (const count of [1, 1000, 40001]) {
    const a = randomFloats(rng, count, -8, 8), b = randomFloats(rng, count, -2, 2);
    const swiglu = ref.swiglu(a, b), sum = ref.add(a, b);
    const first = run(cpu, [a, b], count, (o, ab, bb) => cpu.swiglu(o, DType.F32, ab, bb, count));
    assertClose(first, swiglu, 1e-6, "swiglu");
    for (const be of backends) {
      assertEquals(
        run(be, [a, b], count, (o, ab, bb) => be.swiglu(o, DType.F32, ab, bb, count)),
        first,
      );
      assertEquals(run(be, [b], count, (o, bb) => be.swiglu(o, DType.F32, o, bb, count), a), first);
      assertEquals(run(be, [a], count, (o, ab) => be.swiglu(o, DType.F32, ab, o, count), b), first);
      assertEquals(run(be, [a, b], count, (o, ab, bb) => be.add(o, ab, bb, count)), sum);
      assertEquals(run(be, [b], count, (o, bb) => be.add(o, o, bb, count), a), sum);
    }
  }
});

/** fp32 values rounded to a narrow dtype, as its bits (the reference converters). */
function rounded(values: Float32Array, dtype: typeof DType.F16 | typeof DType.BF16): Uint16Array {
  return dtype === DType.F16 ? f32ToF16(values) : f32ToBf16(values);
}
const NARROW = [DType.F16, DType.BF16] as const;

Deno.test("rmsnorm and swiglu with an F16/BF16 out: the F32 out rounded, bit for bit", () => {
  const rng = new Rng(9);
  for (const [n, dim] of [[1, 64], [5, 384], [3, 1001]]) {
    const x = randomFloats(rng, n * dim, -3, 3), w = randomFloats(rng, dim, 0.5, 1.5);
    const f32 = run(
      cpu,
      [x, w],
      n * dim,
      (o, xb, wb) => cpu.rmsnorm(o, DType.F32, xb, wb, n, dim, 1e-5),
    );
    for (const dtype of NARROW) {
      for (const be of backends) {
        const got = runBytes(
          be,
          [x, w],
          n * dim * 2,
          (o, xb, wb) => be.rmsnorm(o, dtype, xb, wb, n, dim, 1e-5),
        );
        assertEquals(
          new Uint16Array(got.buffer),
          rounded(f32, dtype),
          `rmsnorm ${n}x${dim} ${dtype}`,
        );
      }
    }
  }
  // up to 300 * 300: past fp16's 65504, so fp16 outs overflow to inf as the converter's do
  for (const [count, range] of [[1, 8], [1000, 8], [40001, 8], [4096, 300]]) {
    const a = randomFloats(rng, count, -range, range), b = randomFloats(rng, count, -range, range);
    const f32 = run(cpu, [a, b], count, (o, ab, bb) => cpu.swiglu(o, DType.F32, ab, bb, count));
    for (const dtype of NARROW) {
      for (const be of backends) {
        const got = runBytes(
          be,
          [a, b],
          count * 2,
          (o, ab, bb) => be.swiglu(o, dtype, ab, bb, count),
        );
        assertEquals(new Uint16Array(got.buffer), rounded(f32, dtype), `swiglu ${count} ${dtype}`);
      }
    }
  }
});

Deno.test("matmul with an F16/BF16 x: the bits of the F32 x holding the same values", () => {
  const rng = new Rng(10);
  // GEMV and tiled paths, k past a 1024-wide chunk, odd n
  for (const [n, k, m] of [[1, 384, 100], [1, 37, 3], [37, 384, 70], [5, 2500, 9], [2, 13, 3]]) {
    for (const dtype of NARROW) {
      const [xNarrow, xWide] = weightsOf(randomFloats(rng, n * k), dtype);
      const [w] = weightsOf(randomFloats(rng, m * k), dtype);
      const bias = m % 2 ? randomFloats(rng, m) : null;
      const withBias = (x: ArrayBufferView) => bias ? [x, w, bias] : [x, w];
      const want = run(
        cpu,
        withBias(xWide),
        n * m,
        (o, xb, wb, bb) => cpu.matmul(o, xb, DType.F32, wb, dtype, bb ?? null, n, k, m),
      );
      for (const be of backends) {
        const got = run(
          be,
          withBias(xNarrow),
          n * m,
          (o, xb, wb, bb) => be.matmul(o, xb, dtype, wb, dtype, bb ?? null, n, k, m),
        );
        assertEquals(got, want, `matmul ${n}x${k}x${m} dtype ${dtype}`);
      }
    }
  }
});

Deno.test("F16/BF16 operands: dtype rule, aliasing and sizes checked before C", () => {
  const buf = cpu.alloc(256), other = cpu.alloc(256);
  try {
    const xRule = /matmul: x dtype BF16 must be F32 or the weights' dtype \((F16|F32)\)/;
    for (const wDtype of [DType.F16, DType.F32]) {
      assertThrows(
        () => cpu.matmul(buf, other, DType.BF16, other, wDtype, null, 2, 4, 4),
        (e: Error) => e instanceof RangeError && xRule.test(e.message),
      );
    }
    assertThrows( // 2 x 40 bf16 x is 160 bytes; a 128-byte slice is short
      () => cpu.matmul(buf, other.slice(0, 128), DType.BF16, other, DType.BF16, null, 2, 40, 1),
      (e: Error) => e instanceof RangeError && /matmul x: needs 160 bytes/.test(e.message),
    );
    assertThrows(
      () => cpu.rmsnorm(buf.slice(0, 30), DType.F16, other, other, 2, 8, 1e-5),
      (e: Error) => e instanceof RangeError && /rmsnorm out: needs 32 bytes/.test(e.message),
    );
    assertThrows(
      () => cpu.swiglu(buf.slice(0, 14), DType.BF16, other, other, 8),
      (e: Error) => e instanceof RangeError && /swiglu out: needs 16 bytes/.test(e.message),
    );
    assertThrows(
      () => cpu.rmsnorm(buf, 7 as DTypeCode, other, other, 2, 8, 1e-5),
      (e: Error) => e instanceof RangeError && /unknown dtype code 7/.test(e.message),
    );
    // a narrow out on its input, exactly or in part; an F32 out may alias (tested above)
    const overlap = /out \((F16|BF16)\) overlaps an input; only an F32 out may alias one/;
    for (const dtype of NARROW) {
      for (const out of [buf, buf.slice(60)]) {
        assertThrows(
          () => cpu.rmsnorm(out, dtype, buf, other, 2, 8, 1e-5),
          (e: Error) =>
            e instanceof RangeError && /^rmsnorm: /.test(e.message) &&
            overlap.test(e.message),
        );
        assertThrows(
          () => cpu.swiglu(out, dtype, other, buf, 16),
          (e: Error) =>
            e instanceof RangeError && /^swiglu: /.test(e.message) &&
            overlap.test(e.message),
        );
      }
      // right after the input is not an overlap
      cpu.rmsnorm(buf.slice(64), dtype, buf, other, 2, 8, 1e-5);
    }
  } finally {
    buf.close();
    other.close();
  }
});

// The same rules in C (kernels/checks.h, shared by both backends), called past the TypeScript
// checks through the symbol table.
Deno.test("C rejects a bad x dtype, a narrow out on an input and an unknown out dtype", () => {
  const lib = openLibrary("cpu");
  const handle = new BigUint64Array(1);
  assertEquals(lib.symbols.iq_ctx_create(0, 1, handle), 0);
  const ctx = Deno.UnsafePointer.create(handle[0])!;
  const mem = new Float32Array(64), out = new Float32Array(64);
  const p = Deno.UnsafePointer.of(mem)!, q = Deno.UnsafePointer.of(out)!;
  const fails = (status: number, message: RegExp) => {
    assertEquals(status, 1); // IQ_ERR_ARG
    const text = new Deno.UnsafePointerView(lib.symbols.iq_last_error(ctx)!).getCString();
    assert(message.test(text), text);
  };
  try {
    const { iq_matmul, iq_rmsnorm, iq_swiglu } = lib.symbols;
    fails(
      iq_matmul(ctx, q, p, DType.BF16, p, DType.F16, null, 2, 4, 4),
      /^iq_matmul: x dtype BF16 must be F32 or the weights' dtype \(F16\)$/,
    );
    fails(iq_matmul(ctx, q, p, 5, p, DType.F32, null, 2, 4, 4), /^iq_matmul: bad x dtype 5$/);
    fails(
      iq_rmsnorm(ctx, Deno.UnsafePointer.offset(p, 60)!, DType.BF16, p, null, p, 2, 8, 1e-5),
      /^iq_rmsnorm: out \(BF16\) overlaps an input; only an F32 out may alias one$/,
    );
    fails(
      iq_swiglu(ctx, p, DType.F16, q, p, 16n),
      /^iq_swiglu: out \(F16\) overlaps an input; only an F32 out may alias one$/,
    );
    fails(iq_swiglu(ctx, q, 3, p, p, 16n), /^iq_swiglu: bad out dtype 3$/);
    fails(
      iq_rmsnorm(ctx, q, DType.F32, p, p, p, 2, 8, 1e-5),
      /^iq_rmsnorm: with a residual, out, x and residual overlap$/,
    );
    assertEquals(iq_rmsnorm(ctx, p, DType.F32, p, null, p, 2, 8, 1e-5), 0); // fp32 in place is fine
  } finally {
    lib.symbols.iq_ctx_destroy(ctx);
    lib.close();
  }
});

/** Key and value caches [kvHeads, cap, hd] holding kRows and vRows (n tokens from position 0) in
 * the given dtype, and the fp32 values each holds. */
function storeKv(
  be: Backend,
  kRows: Float32Array,
  vRows: Float32Array,
  dtype: DTypeCode,
  n: number,
  kvHeads: number,
  hd: number,
  cap: number,
) {
  const bytes = kvHeads * cap * hd * (dtype === DType.F16 ? 2 : 4);
  const [kCache, vCache] = [0, 1].map(() => be.alloc(bytes));
  const [k, v] = [kRows, vRows].map((rows) => be.alloc(rows.byteLength));
  [kCache, vCache].forEach((c) => be.upload(c, new Uint8Array(bytes)));
  be.upload(k, kRows);
  be.upload(v, vRows);
  be.kvStore({ kCache, vCache, cacheDtype: dtype, k, v, n, pos0: 0, kvHeads, headDim: hd, cap });
  k.close();
  v.close();
  const values = (cache: DeviceBuffer) => {
    const host = new Uint8Array(bytes);
    be.download(cache, host);
    return dtype === DType.F16
      ? f16ToF32(new Uint16Array(host.buffer))
      : new Float32Array(host.buffer);
  };
  return { kCache, vCache, kValues: values(kCache), vValues: values(vCache) };
}

Deno.test("kv_store: fp16 rounds like the reference converter, [kv_heads, cap, head_dim] layout", () => {
  const rng = new Rng(6), n = 5, kvHeads = 3, hd = 8, cap = 7;
  // past fp16's range too
  const [kRows, vRows] = [0, 1].map(() => randomFloats(rng, n * kvHeads * hd, -70000, 70000));
  for (const dtype of [DType.F32, DType.F16]) {
    const c = storeKv(cpu, kRows, vRows, dtype, n, kvHeads, hd, cap);
    c.kCache.close();
    c.vCache.close();
    for (const [rows, values] of [[kRows, c.kValues], [vRows, c.vValues]]) {
      for (let t = 0; t < n; t++) {
        for (let h = 0; h < kvHeads; h++) {
          const src = rows.subarray((t * kvHeads + h) * hd, (t * kvHeads + h + 1) * hd);
          const want = dtype === DType.F16 ? f16ToF32(f32ToF16(src)) : src;
          assertEquals(values.subarray((h * cap + t) * hd, (h * cap + t + 1) * hd), want);
        }
      }
    }
  }
});

Deno.test("attention: prefill against the reference, decode equal to prefill's rows, GQA, both caches", () => {
  const rng = new Rng(7);
  for (const [heads, kvHeads, hd] of [[4, 4, 64], [4, 2, 128], [6, 2, 48], [8, 1, 16]]) {
    for (const dtype of [DType.F32, DType.F16]) {
      const cap = 40, total = 33, pos0 = 7, n = total - pos0, scale = 1 / Math.sqrt(hd);
      const [kRows, vRows] = [0, 1].map(() => randomFloats(rng, total * kvHeads * hd, -2, 2));
      const c = storeKv(cpu, kRows, vRows, dtype, total, kvHeads, hd, cap);
      const q = randomFloats(rng, n * heads * hd, -2, 2);
      const shape = {
        pos0,
        heads,
        kvHeads,
        headDim: hd,
        cap,
        scale,
        cacheDtype: dtype,
        kCache: c.kCache,
        vCache: c.vCache,
      };
      const want = ref.attention(q, c.kValues, c.vValues, {
        n,
        pos0,
        heads,
        kvHeads,
        hd,
        cap,
        scale,
      });
      for (const be of backends) {
        const got = run(
          be,
          [q],
          q.length,
          (out, qb) => be.attentionPrefill({ ...shape, out, q: qb, n }),
        );
        assertClose(got, want, 1e-5, `prefill ${heads}/${kvHeads}x${hd} dtype ${dtype}`);
        for (const t of [0, 5, n - 1]) {
          const row = q.subarray(t * heads * hd, (t + 1) * heads * hd);
          const one = run(
            be,
            [row],
            row.length,
            (out, qb) => be.attentionDecode({ ...shape, out, q: qb, n: 1, pos0: pos0 + t }),
          );
          assertEquals(one, got.subarray(t * heads * hd, (t + 1) * heads * hd));
        }
      }
      c.kCache.close();
      c.vCache.close();
    }
  }
});

Deno.test("attention errors: positions past the cache and uneven GQA in TypeScript, head_dim > 256 in C", () => {
  const buf = cpu.alloc(4 * 512 * 8);
  try {
    const base = { out: buf, q: buf, kCache: buf, vCache: buf, cacheDtype: DType.F32, scale: 1 };
    const a = { ...base, n: 1, pos0: 4, heads: 2, kvHeads: 1, headDim: 8, cap: 4 };
    assertThrows(() => cpu.attentionDecode(a), /positions 4..4 outside a 4-token cache/);
    assertThrows(
      () => cpu.attentionDecode({ ...a, pos0: 0, heads: 3, kvHeads: 2 }),
      /not a multiple of kv_heads/,
    );
    assertThrows(
      () => cpu.attentionDecode({ ...a, pos0: 0, heads: 1, headDim: 512, cap: 1 }),
      (e: Error) => e instanceof NativeError && /head_dim 512 exceeds 256/.test(e.message),
    );
  } finally {
    buf.close();
  }
});

const SAMPLINGS: Omit<ref.SampleSettings, "uniform">[] = [
  { history: [], repeatPenalty: 1, temperature: 0, topK: 0, topP: 1, minP: 0 },
  {
    history: [3, 3, 9, -1, 1e9, 17],
    repeatPenalty: 1.3,
    temperature: 0,
    topK: 0,
    topP: 1,
    minP: 0,
  },
  { history: [], repeatPenalty: 1, temperature: 0.7, topK: 40, topP: 1, minP: 0 },
  { history: [], repeatPenalty: 1, temperature: 0.7, topK: 0, topP: 0.9, minP: 0 },
  { history: [], repeatPenalty: 1, temperature: 0.7, topK: 0, topP: 1, minP: 0.05 },
  { history: [1, 2, 2, 5], repeatPenalty: 1.3, temperature: 0.8, topK: 40, topP: 0.95, minP: 0.05 },
  { history: [], repeatPenalty: 1, temperature: 1.5, topK: 0, topP: 1, minP: 0 },
];

Deno.test("sample picks the reference's token; logits are left unchanged", () => {
  const rng = new Rng(8);
  for (const vocab of [1000, 50000]) {
    const logits = randomFloats(rng, vocab, -10, 10);
    logits[17] = logits[18] = 12; // a tie at the top: the lower id wins greedy
    for (const s of SAMPLINGS) {
      for (const uniform of [0, 0.25, 0.5, 0.999999, rng.next()]) {
        const settings = { ...s, uniform };
        const want = ref.sample(logits, settings);
        const history = Int32Array.from(s.history.map((id) => id | 0));
        const got = run(cpu, [logits, history], vocab, (out, l, h) => {
          cpu.sample({
            ...settings,
            outToken: out,
            logits: l,
            vocab,
            history: h,
            nHistory: history.length,
          });
          const after = new Float32Array(vocab);
          cpu.download(l, after);
          assertEquals(after, logits);
        });
        assertEquals(new Int32Array(got.buffer)[0], want, JSON.stringify({ vocab, ...settings }));
      }
    }
  }
});

Deno.test("sample at temperature 1 follows the softmax", () => {
  const vocab = 8, logits = Float32Array.from([2, 1, 0.5, 0, -1, 3, 0.1, 1.5]);
  const draws = 4000, counts = new Array(vocab).fill(0);
  for (let i = 0; i < draws; i++) {
    const settings = {
      history: [],
      repeatPenalty: 1,
      temperature: 1,
      topK: 0,
      topP: 1,
      minP: 0,
      uniform: (i + 0.5) / draws,
    };
    const got = run(
      cpu,
      [logits],
      1,
      (out, l) =>
        cpu.sample({ ...settings, outToken: out, logits: l, vocab, history: null, nHistory: 0 }),
    );
    counts[new Int32Array(got.buffer)[0]]++;
  }
  const z = logits.reduce((s, l) => s + Math.exp(l), 0);
  logits.forEach((l, i) =>
    assert(Math.abs(counts[i] / draws - Math.exp(l) / z) < 0.002, `token ${i}`)
  );
});

Deno.test("sample rejects NaN logits in C and a uniform of 1 in TypeScript", () => {
  const logits = Float32Array.from([0, NaN, 1]);
  const args = {
    history: null,
    nHistory: 0,
    repeatPenalty: 1,
    temperature: 1,
    topK: 0,
    topP: 1,
    minP: 0,
    vocab: 3,
  };
  assertThrows(
    () =>
      run(
        cpu,
        [logits],
        1,
        (out, l) => cpu.sample({ ...args, outToken: out, logits: l, uniform: 0.5 }),
      ),
    (e: Error) => e instanceof NativeError && /logit 1 is NaN/.test(e.message),
  );
  assertThrows(
    () =>
      run(
        cpu,
        [logits],
        1,
        (out, l) => cpu.sample({ ...args, outToken: out, logits: l, uniform: 1 }),
      ),
    /uniform must be in \[0, 1\)/,
  );
});

Deno.test("timeQueued: the span's seconds; spans do not nest; a failed span leaves none open", () => {
  const x = new Float32Array(256).fill(1), w = new Float32Array(256 * 256).fill(0.5);
  const bufs = [x, w].map((a) => {
    const b = cpu.alloc(a.byteLength);
    cpu.upload(b, a);
    return b;
  });
  using y = cpu.alloc(256 * 4);
  try {
    const start = performance.now();
    const seconds = cpu.timeQueued(() => {
      for (let i = 0; i < 20; i++) {
        cpu.matmul(y, bufs[0], DType.F32, bufs[1], DType.F32, null, 1, 256, 256);
      }
    });
    const wall = (performance.now() - start) / 1000;
    assert(seconds > 0 && seconds <= wall, `${seconds} s of a ${wall} s call`);
    cpu.timeQueued(() => {
      assertThrows(() => cpu.timeQueued(() => {}), /a span is open already/);
    });
    assertThrows(() =>
      cpu.timeQueued(() => {
        throw new Error("inside the span");
      }), /inside the span/);
    assert(cpu.timeQueued(() => {}) >= 0); // the failed span was closed
  } finally {
    bufs.forEach((b) => b.close());
  }
  const lib = openLibrary("cpu");
  const handle = new BigUint64Array(1);
  assertEquals(lib.symbols.iq_ctx_create(0, 1, handle), 0);
  const ctx = Deno.UnsafePointer.create(handle[0])!;
  try {
    assertEquals(lib.symbols.iq_timing_end(ctx, new Float64Array(1)), 1); // IQ_ERR_ARG
    const text = new Deno.UnsafePointerView(lib.symbols.iq_last_error(ctx)!).getCString();
    assertEquals(text, "iq_timing_end: no span is open");
  } finally {
    lib.symbols.iq_ctx_destroy(ctx);
    lib.close();
  }
});
