// KV store and attention of the CPU backend beyond test/ops_test.ts: chunks at pos0 = 0 and
// pos0 > 0 (earlier keys stored by an earlier call), lengths across the kernel's 32-position
// blocks, a maximum that keeps growing (the online-softmax rescale), GQA groups of 1 to 8, and
// the same bits at 1, 2 and 3 threads and between decode and prefill. Against the Float64
// reference in test/reference.ts the tolerance is 1e-5 relative to max(1, |expected|).
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";
import { Backend, type DeviceBuffer, DType, type DTypeCode, NativeError } from "../ffi/backend.ts";
import { f16ToF32, f32ToF16 } from "../src/model/dtype.ts";
import { Rng } from "../src/engine/sampler.ts";
import { maxRelError, randomFloats } from "./random.ts";
import * as ref from "./reference.ts";

const backends = [1, 2, 3].map((threads) => Backend.open("cpu", { threads }));
globalThis.addEventListener("unload", () => backends.forEach((b) => b.close()));
const [cpu] = backends;

function upload(be: Backend, data: ArrayBufferView): DeviceBuffer {
  const buf = be.alloc(data.byteLength);
  be.upload(buf, data);
  return buf;
}

function download(be: Backend, buf: DeviceBuffer): Uint8Array {
  const host = new Uint8Array(buf.bytes);
  be.download(buf, host);
  return host;
}

/** Caches filled by two kv_store calls (positions 0..pos0-1, then pos0..total-1), unused rows 0. */
class Caches {
  k: DeviceBuffer;
  v: DeviceBuffer;
  kValues: Float32Array;
  vValues: Float32Array;

  constructor(
    be: Backend,
    rng: Rng,
    readonly dtype: DTypeCode,
    pos0: number,
    total: number,
    kvHeads: number,
    hd: number,
    cap: number,
    keyScale = 1,
  ) {
    const bytes = kvHeads * cap * hd * (dtype === DType.F16 ? 2 : 4);
    [this.k, this.v] = [0, 1].map(() => upload(be, new Uint8Array(bytes)));
    const kRows = randomFloats(rng, total * kvHeads * hd, -2, 2).map((x) => x * keyScale);
    const vRows = randomFloats(rng, total * kvHeads * hd, -2, 2);
    for (const [from, to] of [[0, pos0], [pos0, total]]) {
      if (to === from) continue;
      const [k, v] = [kRows, vRows].map((rows) =>
        upload(be, rows.subarray(from * kvHeads * hd, to * kvHeads * hd))
      );
      const shape = { n: to - from, pos0: from, kvHeads, headDim: hd, cap };
      be.kvStore({ kCache: this.k, vCache: this.v, cacheDtype: dtype, k, v, ...shape });
      k.close();
      v.close();
    }
    const values = (buf: DeviceBuffer) => {
      const host = download(be, buf);
      return dtype === DType.F16
        ? f16ToF32(new Uint16Array(host.buffer))
        : new Float32Array(host.buffer);
    };
    this.kValues = values(this.k);
    this.vValues = values(this.v);
  }

  close() {
    this.k.close();
    this.v.close();
  }
}

/** Runs prefill (or decode when n is 1 and decode is set) and returns out. */
function attend(
  be: Backend,
  c: Caches,
  q: Float32Array,
  s: ref.AttentionShape,
  decode = false,
): Float32Array {
  const qb = upload(be, q), out = be.alloc(q.byteLength);
  try {
    const args = {
      out,
      q: qb,
      kCache: c.k,
      vCache: c.v,
      cacheDtype: c.dtype,
      pos0: s.pos0,
      n: s.n,
      heads: s.heads,
      kvHeads: s.kvHeads,
      headDim: s.hd,
      cap: s.cap,
      scale: 1 / Math.sqrt(s.hd),
    };
    if (decode) be.attentionDecode(args);
    else be.attentionPrefill(args);
    return new Float32Array(download(be, out).buffer);
  } finally {
    qb.close();
    out.close();
  }
}

Deno.test("kv_store at pos0 > 0: fp16 bytes equal the reference converter's, other rows untouched", () => {
  const rng = new Rng(21), kvHeads = 2, hd = 48, cap = 12, pos0 = 5, n = 4;
  const kRows = randomFloats(rng, n * kvHeads * hd, -3, 3);
  kRows[0] = 65520; // rounds to infinity in fp16
  kRows[1] = 2 ** -25; // the tie between 0 and the smallest subnormal: to 0
  kRows[2] = 3 * 2 ** -25; // a tie between two subnormals: to even
  const vRows = randomFloats(rng, n * kvHeads * hd, -3, 3);
  for (const dtype of [DType.F32, DType.F16]) {
    const size = dtype === DType.F16 ? 2 : 4, bytes = kvHeads * cap * hd * size;
    const init = new Uint8Array(bytes).fill(0xab);
    const [kCache, vCache, k, v] = [init, init, kRows, vRows].map((a) => upload(cpu, a));
    const shape = { n, pos0, kvHeads, headDim: hd, cap };
    cpu.kvStore({ kCache, vCache, cacheDtype: dtype, k, v, ...shape });
    for (const [cache, rows] of [[kCache, kRows], [vCache, vRows]] as const) {
      const want = Uint8Array.from(init);
      for (let t = 0; t < n; t++) {
        for (let h = 0; h < kvHeads; h++) {
          const src = rows.subarray((t * kvHeads + h) * hd, (t * kvHeads + h + 1) * hd);
          const stored = dtype === DType.F16 ? f32ToF16(src) : src;
          want.set(
            new Uint8Array(stored.buffer, stored.byteOffset, stored.byteLength),
            (h * cap + pos0 + t) * hd * size,
          );
        }
      }
      assertEquals(download(cpu, cache), want);
    }
    [kCache, vCache, k, v].forEach((b) => b.close());
  }
});

Deno.test("attention: prefill vs reference, pos0 0 and > 0, n 1/7/33, GQA, both caches", () => {
  const rng = new Rng(22);
  for (const [heads, kvHeads] of [[4, 4], [4, 2], [6, 2], [8, 1]]) {
    for (const hd of [48, 64, 128]) {
      for (const dtype of [DType.F32, DType.F16]) {
        for (const n of [1, 7, 33]) {
          for (const pos0 of [0, 9]) {
            const cap = 48, shape = { n, pos0, heads, kvHeads, hd, cap };
            const c = new Caches(cpu, rng, dtype, pos0, pos0 + n, kvHeads, hd, cap);
            const q = randomFloats(rng, n * heads * hd, -2, 2);
            const want = ref.attention(q, c.kValues, c.vValues, {
              ...shape,
              scale: 1 / Math.sqrt(hd),
            });
            const got = attend(cpu, c, q, shape);
            const err = maxRelError(got, want);
            assert(err <= 1e-5, `${JSON.stringify({ ...shape, dtype })}: error ${err}`);
            c.close();
          }
        }
      }
    }
  }
});

Deno.test("attention: a maximum growing block after block (the rescale) stays within 1e-5", () => {
  const rng = new Rng(23), heads = 4, kvHeads = 2, hd = 64, n = 3, pos0 = 200, cap = 203;
  const c = new Caches(cpu, rng, DType.F32, pos0, pos0 + n, kvHeads, hd, cap);
  // keys that align more with q the later they are: scores climb from about -20 to 20
  const q = new Float32Array(n * heads * hd).fill(1);
  const keys = new Float32Array(cap * kvHeads * hd);
  for (let p = 0; p < cap; p++) keys.fill((p / cap - 0.5) * 40 / Math.sqrt(hd), p * kvHeads * hd);
  const [k, v] = [keys, randomFloats(rng, cap * kvHeads * hd, -2, 2)].map((a) => upload(cpu, a));
  const store = { n: cap, pos0: 0, kvHeads, headDim: hd, cap };
  cpu.kvStore({ kCache: c.k, vCache: c.v, cacheDtype: DType.F32, k, v, ...store });
  k.close();
  v.close();
  const [kValues, vValues] = [c.k, c.v].map((b) => new Float32Array(download(cpu, b).buffer));
  const shape = { n, pos0, heads, kvHeads, hd, cap };
  const want = ref.attention(q, kValues, vValues, { ...shape, scale: 1 / Math.sqrt(hd) });
  const err = maxRelError(attend(cpu, c, q, shape), want);
  assert(err <= 1e-5, `error ${err}`);
  c.close();
});

Deno.test("attention: the same bits at 1, 2 and 3 threads; decode equals every prefill row", () => {
  const rng = new Rng(24);
  for (const [heads, kvHeads, hd] of [[8, 1, 64], [6, 2, 48], [32, 8, 128]]) {
    for (const dtype of [DType.F32, DType.F16]) {
      const n = 37, pos0 = 30, cap = 80, shape = { n, pos0, heads, kvHeads, hd, cap };
      const caches = backends.map((be) =>
        new Caches(be, new Rng(25), dtype, pos0, pos0 + n, kvHeads, hd, cap)
      );
      const q = randomFloats(rng, n * heads * hd, -2, 2);
      const outs = backends.map((be, i) => attend(be, caches[i], q, shape));
      assertEquals(outs[1], outs[0]);
      assertEquals(outs[2], outs[0]);
      backends.forEach((be, i) => {
        for (let t = 0; t < n; t++) {
          const row = q.slice(t * heads * hd, (t + 1) * heads * hd);
          const one = attend(be, caches[i], row, { ...shape, n: 1, pos0: pos0 + t }, true);
          assertEquals(one, outs[0].subarray(t * heads * hd, (t + 1) * heads * hd));
        }
      });
      caches.forEach((c) => c.close());
    }
  }
});

Deno.test("attention errors: past the cache and uneven GQA in TypeScript; head_dim and dtype in C", () => {
  const buf = cpu.alloc(4 * 512 * 8);
  try {
    const base = { out: buf, q: buf, kCache: buf, vCache: buf, cacheDtype: DType.F32, scale: 1 };
    const a = { ...base, n: 3, pos0: 2, heads: 2, kvHeads: 1, headDim: 8, cap: 4 };
    assertThrows(() => cpu.attentionPrefill(a), RangeError);
    assertThrows(() => cpu.attentionPrefill({ ...a, pos0: 0, heads: 6, kvHeads: 4 }), RangeError);
    const native = (pattern: RegExp) => (e: Error) =>
      e instanceof NativeError && pattern.test(e.message);
    assertThrows(
      () => cpu.attentionPrefill({ ...a, pos0: 0, n: 1, heads: 1, headDim: 512, cap: 1 }),
      native(/iq_attention_prefill: head_dim 512 exceeds 256/),
    );
    assertThrows(
      () => cpu.attentionDecode({ ...a, pos0: 0, n: 1, cacheDtype: DType.BF16 }),
      native(/iq_attention_decode: cache dtype 2 is not F16 or F32/),
    );
    assertThrows(
      () =>
        cpu.kvStore({
          kCache: buf,
          vCache: buf,
          cacheDtype: DType.BF16,
          k: buf,
          v: buf,
          n: 1,
          pos0: 0,
          kvHeads: 1,
          headDim: 8,
          cap: 4,
        }),
      native(/iq_kv_store: cache dtype 2 is not F16 or F32/),
    );
  } finally {
    buf.close();
  }
});
