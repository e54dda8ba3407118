// The quantized KV cache on the CPU backend (kernels/cpu/kvq.c), the reference the CUDA kernels
// are held to: the packed format as documented, exact round trips, hybrid never worse than either
// mode, windows exact, key normalization, and fused attention equal to dequantize-then-reference.
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";
import { Backend, KvqAxis, KvqMode, KvqNorm, type KvqParams, NativeError } from "../ffi/backend.ts";
import { Rng } from "../src/engine/sampler.ts";
import { maxRelError, randomFloats, randomInts } from "./random.ts";
import {
  download,
  expectedAttention,
  fillLayer,
  keyScale,
  KVQ_CASES,
  kvqAttention,
  kvqParams,
  kvRows,
  seen,
  zeroLayer,
} from "./kvq_harness.ts";

const cpu = Backend.open("cpu", { threads: 2 });
globalThis.addEventListener("unload", () => cpu.close());

const fp16 = (x: number) => Float16Array.of(x)[0];

/** The fragment order of kernels/kvq.h, from its description: element e of a row of `len` codes
 * is in run e / 32; there k-step ks = e % 32 / 16 and, within it, r = e % 16 belongs to lane quad
 * tig = r % 8 / 2 as its f-th element (f = 4 ks + 2 (r / 8) + r % 2); the quad's 8 codes of the
 * run are chunk tig * (len / 32) + run, ordered as the unpacking takes them. */
function slotOf(e: number, len: number, bits: number): number {
  const run = Math.floor(e / 32), ks = Math.floor((e % 32) / 16), r = e % 16;
  const tig = Math.floor((r % 8) / 2), f = 4 * ks + 2 * Math.floor(r / 8) + (r % 2);
  const inChunk = bits === 8
    ? [0, 2, 1, 3, 4, 6, 5, 7][f] // bytes (0, 2), (1, 3) of each k-step's word
    : [0, 4, 1, 5, 2, 6, 3, 7][f]; // 4 bits: nibbles (i, i + 4) make pair i; 2 bits: crumbs
  return (tig * (len / 32) + run) * 8 + inChunk;
}

Deno.test("kvq: every bit width and both axes round-trip codes on a grid exactly, packed as documented", () => {
  for (const bits of [2, 3, 4, 8]) {
    for (
      const [kAxis, vAxis] of [[KvqAxis.CHANNELS, KvqAxis.TOKENS], [
        KvqAxis.TOKENS,
        KvqAxis.CHANNELS,
      ]]
    ) {
      const g = 16,
        p = kvqParams({
          kBits: bits,
          vBits: bits,
          kAxis,
          vAxis,
          kGroup: g,
          vGroup: g,
          sink: 0,
          recent: 0,
          qmode: KvqMode.ASYM,
          norm: KvqNorm.OFF,
        });
      const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout);
      const total = 64, d = p.headDim, row = p.kvHeads * d, top = (1 << bits) - 1;
      const rng = new Rng(bits * 7 + kAxis);
      // codes per element; each group holds code 0 and code `top`, so min/max recover (scale, offset)
      const kCodes = randomInts(rng, total * row, top + 1);
      const vCodes = randomInts(rng, total * row, top + 1);
      const groupOf = (t: number, c: number, axis: number) =>
        axis === KvqAxis.CHANNELS ? [t, Math.floor(c / g)] : [Math.floor(t / g), c];
      const values = (axis: number, codes: Int32Array) => {
        const x = new Float32Array(total * row);
        for (let t = 0; t < total; t++) {
          for (let h = 0; h < p.kvHeads; h++) {
            for (let c = 0; c < d; c++) {
              const [a, b] = groupOf(t, c, axis);
              const first = axis === KvqAxis.CHANNELS ? c % g : t % g;
              const i = t * row + h * d + c;
              if (first === 0) codes[i] = 0;
              if (first === 1) codes[i] = top;
              const scale = 2 ** -((a + b + h) % 4 + 1), offset = -1 + 0.25 * ((a * 3 + b + h) % 8);
              x[i] = scale * codes[i] + offset;
            }
          }
        }
        return x;
      };
      const k = values(kAxis, kCodes), v = values(vAxis, vCodes);
      fillLayer(cpu, layout, layer, { k, v }, total, [5, 16, 1, 30]);
      const view = seen(cpu, layout, layer, total);
      const asRows = (x: Float32Array) =>
        // [kvHeads, len, d] -> [len, kvHeads * d]
        Float32Array.from({ length: x.length }, (_, i) => {
          const t = Math.floor(i / row), h = Math.floor((i % row) / d), c = i % d;
          return x[(h * total + t) * d + c];
        });
      assertEquals(asRows(view.k), k, `keys, ${bits} bits`);
      assertEquals(asRows(view.v), v, `values, ${bits} bits`);
      if (kAxis === KvqAxis.CHANNELS) {
        // the key codes as documented: 32 codes take `bits` words, slot i at bit i * bits; a
        // token's row of d codes holds channel c in slot slotOf(c) (2, 4, 8 bits; 3 bits: c)
        const qcap = Math.ceil((layout.params.cap - layout.params.sink) / 128) * 128;
        const bytes = download(
          cpu,
          layer.slice(layout.offsets.codesK, p.kvHeads * qcap * d * bits / 8),
        );
        const words = new Uint32Array(bytes.buffer);
        for (let h = 0; h < p.kvHeads; h++) {
          for (let t = 0; t < total; t++) {
            for (let c = 0; c < d; c++) {
              const i = (h * qcap + t) * d + (bits === 3 ? c : slotOf(c, d, bits)), bit = i * bits;
              const w = bit >>> 5, shift = bit & 31;
              const high = shift + bits > 32 ? words[w + 1] << (32 - shift) : 0;
              const code = ((words[w] >>> shift) | high) & ((1 << bits) - 1);
              if (code !== kCodes[t * row + h * d + c]) {
                throw new Error(`code (${h}, ${t}, ${c}) at ${bits} bits: ${code}`);
              }
            }
          }
        }
      }
      layer.close();
    }
  }
});

Deno.test("kvq: hybrid is never worse than symmetric or asymmetric alone, on any group", () => {
  for (const bits of [2, 3, 4]) {
    const errors = [KvqMode.ASYM, KvqMode.SYM, KvqMode.HYBRID].map((qmode) => {
      const p = kvqParams({ kBits: bits, sink: 0, recent: 0, qmode, norm: KvqNorm.OFF });
      const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout);
      const total = 96, rows = kvRows(p, total, 11);
      fillLayer(cpu, layout, layer, rows, total, [17]);
      const view = seen(cpu, layout, layer, total);
      layer.close();
      // squared error per key group (a token's 16 channels) against the fp16 input
      const groups = new Float64Array(view.k.length / p.kGroup);
      for (let h = 0; h < p.kvHeads; h++) {
        for (let t = 0; t < total; t++) {
          for (let c = 0; c < p.headDim; c++) {
            const i = (h * total + t) * p.headDim + c;
            const d = view.k[i] - fp16(rows.k[(t * p.kvHeads + h) * p.headDim + c]);
            groups[Math.floor(i / p.kGroup)] += d * d;
          }
        }
      }
      return groups;
    });
    const [asym, sym, hybrid] = errors;
    let symChosen = 0, asymChosen = 0;
    for (let g = 0; g < hybrid.length; g++) {
      const best = Math.min(asym[g], sym[g]);
      assert(hybrid[g] <= best * (1 + 1e-5) + 1e-12, `group ${g}: ${hybrid[g]} > ${best}`);
      if (sym[g] < asym[g]) symChosen++;
      if (asym[g] < sym[g]) asymChosen++;
    }
    assert(
      symChosen > 0 && asymChosen > 0,
      `both modes win somewhere (${symChosen}, ${asymChosen})`,
    );
  }
});

Deno.test("kvq: sink and recent rows are exact, normalization is max |k| per RoPE pair", () => {
  const p = kvqParams();
  const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout);
  const total = 100, first = 24, rows = kvRows(p, total, 5), d = p.headDim, half = d / 2;
  fillLayer(cpu, layout, layer, rows, first, [first]);
  const scale = keyScale(cpu, layout, layer);
  for (let h = 0; h < p.kvHeads; h++) {
    for (let i = 0; i < half; i++) {
      let max = 0;
      for (let t = 0; t < first; t++) {
        for (const c of [i, i + half]) {
          max = Math.max(max, Math.abs(rows.k[(t * p.kvHeads + h) * d + c]));
        }
      }
      assertEquals(scale[h * half + i], Math.fround(max));
    }
  }
  for (const [from, len] of [[first, 40], [40, total]]) {
    fillLayer(cpu, layout, layer, rows, len, [1, 9], from); // what a query sees as the cache holds len
    const view = seen(cpu, layout, layer, len);
    const nq = Math.max(0, Math.floor((len - p.sink - p.recent) / 16) * 16);
    for (let h = 0; h < p.kvHeads; h++) {
      for (let t = 0; t < len; t++) {
        if (t >= p.sink && t < p.sink + nq) continue;
        for (let c = 0; c < d; c++) {
          const i = (t * p.kvHeads + h) * d + c, o = (h * len + t) * d + c;
          assertEquals(view.k[o], fp16(Math.fround(rows.k[i] / scale[h * half + (c % half)])));
          assertEquals(view.v[o], fp16(rows.v[i]));
        }
      }
    }
    // and the quantized rows are close, not copies
    if (nq > 0) {
      const o = (0 * len + p.sink) * d;
      assert(
        view.v[o] !== fp16(rows.v[p.sink * p.kvHeads * d]) ||
          view.v[o + 1] !== fp16(rows.v[p.sink * p.kvHeads * d + 1]),
      );
    }
  }
  layer.close();
});

Deno.test("kvq: fused attention equals dequantize-then-reference, prefill and decode, every setting", () => {
  for (const { name, params } of KVQ_CASES) {
    const layout = cpu.kvqLayout(params), layer = zeroLayer(cpu, layout);
    const heads = params.kvHeads * 3, d = params.headDim, rng = new Rng(3);
    const total = 120, rows = kvRows(params, total, 9);
    // prefill 0..79 in chunks, then decode one token at a time
    fillLayer(cpu, layout, layer, rows, 80, [37, 40, 3]);
    const q = randomFloats(rng, 40 * heads * d, -1, 1);
    const got = kvqAttention(cpu, layout, layer, q, 40, 40, heads);
    const want = expectedAttention(cpu, layout, layer, q, 40, 40, heads);
    const err = maxRelError(got, want);
    assert(err < 2e-5, `${name}, prefill: max error ${err}`);
    for (let pos = 80; pos < total; pos++) {
      fillLayer(cpu, layout, layer, rows, pos + 1, [1], pos);
      if (pos % 7) continue;
      const qd = randomFloats(rng, heads * d, -1, 1);
      const e = maxRelError(
        kvqAttention(cpu, layout, layer, qd, 1, pos, heads),
        expectedAttention(cpu, layout, layer, qd, 1, pos, heads),
      );
      assert(e < 2e-5, `${name}, decode at ${pos}: max error ${e}`);
    }
    layer.close();
  }
});

Deno.test("kvq: bad parameters and calls are clear errors, before or in C", () => {
  const bad: [Partial<KvqParams>, RegExp][] = [
    [{ kBits: 5 }, /keys bits 5 not 2, 3, 4 or 8/],
    [{ headDim: 48 }, /head_dim 48 a multiple of 32/],
    [{ kGroup: 24 }, /keys group 24 must be a power of two in 8..128 and divide head_dim 64/],
    [{ vGroup: 4 }, /values group 4 must be a power of two/],
    [{ kAxis: KvqAxis.TOKENS, kGroup: 8 }, /groups over tokens differ \(8, 16\)/],
    [{ ring: 10 }, /ring 10 >= recent \+ 16/],
    [{ norm: 7 }, /norm 7/],
  ];
  for (const [over, message] of bad) {
    assertThrows(
      () => cpu.kvqLayout(kvqParams(over)),
      (e: Error) => e instanceof NativeError && message.test(e.message),
    );
  }
  const layout = cpu.kvqLayout(kvqParams()), layer = zeroLayer(cpu, layout);
  const x = cpu.alloc(64 * 2 * 64 * 4);
  assertThrows(() => cpu.kvqStore(layout, layer, x, x, 42, 0), /ring takes at most 41/);
  assertThrows(
    () => cpu.kvqStore(layout, layer, x, x, 4, 158),
    /positions 158..161 outside a 160-token cache/,
  );
  assertThrows(
    () => cpu.kvqAttention(layout, layer, x, x, 1, 0, 3, 1),
    /heads 3 not a multiple of kv_heads 2/,
  );
  assertThrows(
    () => cpu.kvqStore(layout, layer.slice(0, 100), x, x, 1, 0),
    /kvq_store layer: needs/,
  );
  x.close();
  layer.close();
});
