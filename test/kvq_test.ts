// The quantized KV cache on the CPU backend (kernels/cpu/kvq.c), the reference the CUDA kernels
// are held to: the packed format as documented, exact round trips, hybrid never worse than either
// mode, windows exact, key normalization, and fused attention equal to dequantize-then-reference.
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";
import {
  Backend,
  KvqAxis,
  type KvqLayout,
  KvqMeta,
  KvqMode,
  KvqNorm,
  type KvqParams,
  NativeError,
} from "../ffi/backend.ts";
import { Rng } from "../src/engine/sampler.ts";
import { maxRelError, randomFloats, randomInts } from "./random.ts";
import {
  download,
  expectedAttention,
  fillLayer,
  FP8,
  type Fp8,
  fp8Pair,
  fp8Value,
  groupIds,
  keyScale,
  KVQ_CASES,
  kvqAttention,
  kvqParams,
  kvRows,
  seen,
  wideRows,
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
        const { words, qcap } = storedCodes(layout, layer, 0);
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
  for (const [bits, meta] of [2, 3, 4].flatMap((b) => Object.values(KvqMeta).map((m) => [b, m]))) {
    const errors = [KvqMode.ASYM, KvqMode.SYM, KvqMode.HYBRID].map((qmode) => {
      const p = kvqParams({ kBits: bits, sink: 0, recent: 0, qmode, norm: KvqNorm.OFF, meta });
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
      assert(hybrid[g] <= best * (1 + 1e-5) + 1e-12, `meta ${meta} group ${g}: ${hybrid[g]}`);
      if (sym[g] < asym[g]) symChosen++;
      if (asym[g] < sym[g]) asymChosen++;
    }
    assert(
      symChosen > 0 && asymChosen > 0,
      `both modes win somewhere (${symChosen}, ${asymChosen})`,
    );
  }
});

/** A layer's packed codes of one side as stored, and the quantized tokens per KV head. */
function storedCodes(layout: KvqLayout, layer: ReturnType<typeof zeroLayer>, side: 0 | 1) {
  const p = layout.params, qcap = Math.ceil((p.cap - p.sink) / 128) * 128;
  const bits = side ? p.vBits : p.kBits, at = side ? layout.offsets.codesV : layout.offsets.codesK;
  const bytes = download(cpu, layer.slice(at, p.kvHeads * qcap * p.headDim * bits / 8));
  return { words: new Uint32Array(bytes.buffer), qcap };
}

/** A layer's (scale, offset) pairs of one side as decoded values, and their raw bytes. */
function storedPairs(layout: KvqLayout, layer: ReturnType<typeof zeroLayer>, side: 0 | 1, f: Fp8) {
  const p = layout.params, qcap = Math.ceil((p.cap - p.sink) / 128) * 128;
  const count = p.kvHeads * qcap * p.headDim / (side ? p.vGroup : p.kGroup);
  const at = side ? layout.offsets.metaV : layout.offsets.metaK;
  const bytes = download(cpu, layer.slice(at, 2 * count)); // the scale byte, then the offset's
  const value = (i: number) => fp8Value(bytes[i], f);
  return { bytes, scale: (g: number) => value(2 * g), offset: (g: number) => value(2 * g + 1) };
}

Deno.test("kvq fp8: all 256 codes of scales and offsets decode as their format defines", () => {
  for (const f of [FP8.e4m3, FP8.e5m2]) {
    // 64 tokens, all quantized: key pair i (token i / 4, group i % 4) is scale byte i with offset
    // 0 over codes 1, value pair i (block i / 64, channel i % 64) scale 0 and offset byte i
    const p = kvqParams({ kvHeads: 1, sink: 0, recent: 0, ring: 16 + 16, meta: f.meta });
    const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout), d = p.headDim;
    const f16 = cpu.kvqLayout({ ...p, meta: KvqMeta.F16 });
    const regions = (l: KvqLayout) => {
      const { metaK, metaV } = l.offsets;
      return [metaV - metaK, l.bytes - metaV];
    };
    // 256 stream tokens of room, 4 pairs each: 2 bytes a pair, 4 with fp16
    assertEquals(regions(layout), [2048, 2048]);
    assertEquals(regions(f16), [4096, 4096]);
    const keyPairs = new Uint8Array(512), valuePairs = new Uint8Array(512);
    for (let i = 0; i < 256; i++) {
      keyPairs[2 * i] = i; // scale i, offset 0
      valuePairs[2 * i + 1] = i; // scale 0, offset i
    }
    cpu.upload(layer.slice(layout.offsets.metaK, 512), keyPairs);
    cpu.upload(layer.slice(layout.offsets.metaV, 512), valuePairs);
    const ones = new Uint32Array(64 * d * p.kBits / 32).fill(0x11111111); // 4-bit codes, all 1
    cpu.upload(layer.slice(layout.offsets.codesK, ones.byteLength), ones);
    const view = seen(cpu, layout, layer, 64);
    const same = (a: number, b: number) => Object.is(a + 0, b + 0) || (a !== a && b !== b);
    for (let u = 0; u < 64; u++) {
      for (let c = 0; c < d; c++) {
        const k = fp8Value(u * 4 + Math.floor(c / 16), f) * 1 + 0;
        const v = 0 * 0 + fp8Value(Math.floor(u / 16) * 64 + c, f);
        assert(same(view.k[u * d + c], Math.fround(k)), `${f.name} scale ${u * 4 + c / 16}`);
        assert(same(view.v[u * d + c], Math.fround(v)), `${f.name} offset ${u}, ${c}`);
      }
    }
    layer.close();
  }
});

Deno.test("kvq fp8: pairs are the formats' directed roundings and cover their groups", () => {
  const settings: [string, Partial<KvqParams>][] = [
    ["innerq k4v2", {}],
    ["innerq k2v8, keys over tokens", { kBits: 2, vBits: 8, kAxis: KvqAxis.TOKENS }],
    ["kivi k3v4", { kBits: 3, vBits: 4, kAxis: KvqAxis.TOKENS, vAxis: KvqAxis.CHANNELS }],
  ];
  for (const [name, over] of settings) {
    for (const f of [FP8.e4m3, FP8.e5m2]) {
      for (const qmode of [KvqMode.ASYM, KvqMode.SYM, KvqMode.HYBRID]) {
        const total = 256, what = `${name}, ${f.name}, qmode ${qmode}`;
        const p = kvqParams({
          cap: total,
          sink: 0,
          recent: 0,
          ring: 16 + 40,
          kGroup: 16,
          vGroup: 16,
          norm: KvqNorm.OFF,
          qmode,
          meta: f.meta,
          ...over,
        });
        const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout);
        const rows = wideRows(p, total, 7);
        fillLayer(cpu, layout, layer, rows, total, [40, 1, 13]);
        const view = seen(cpu, layout, layer, total);
        const stats = { exact: 0, saturated: 0, covered: 0 };
        for (const side of [0, 1] as const) {
          const x = (side ? rows.v : rows.k).map((e) => Float16Array.of(e)[0]); // as the ring holds
          const ids = groupIds(p, side, total), d = p.headDim, row = p.kvHeads * d;
          const seenAs = side ? view.v : view.k; // [kvHeads, total, d]
          const got = (i: number) =>
            seenAs[(Math.floor((i % row) / d) * total + Math.floor(i / row)) * d + i % d];
          const bits = side ? p.vBits : p.kBits, top = 2 ** bits - 1, half = 2 ** (bits - 1);
          const members = new Map<number, number[]>();
          ids.forEach((g, i) => members.set(g, [...(members.get(g) ?? []), i]));
          const stored = storedPairs(layout, layer, side, f);
          for (const [g, elems] of members) {
            for (const b of [stored.bytes[2 * g], stored.bytes[2 * g + 1]]) {
              assert((b & 0x7f) <= (f.name === "e4m3" ? 0x7e : 0x7b), `${what}: byte ${b}`);
            }
            const values = elems.map((i) => x[i]);
            const lo = Math.min(...values), hi = Math.max(...values);
            const asym = fp8Pair(lo, hi, bits, false, f), sym = fp8Pair(lo, hi, bits, true, f);
            const scale = stored.scale(g), offset = stored.offset(g);
            const is = (q: { scale: number; offset: number }) =>
              q.scale === scale && q.offset === offset;
            // asymmetric and symmetric modes store exactly the reference pair; hybrid one of them,
            // the symmetric one only where its offset did not saturate
            const symExact = sym.offset === -half * sym.scale;
            if (qmode === KvqMode.ASYM) assert(is(asym), `${what}, group ${g}: ${scale} ${offset}`);
            if (qmode === KvqMode.SYM) assert(is(sym), `${what}, group ${g}: ${scale} ${offset}`);
            if (qmode === KvqMode.HYBRID) {
              assert(is(asym) || (symExact && is(sym)), `${what}, ${g}`);
            }
            // where the stored pair reaches both ends, every value is within half a step
            if (!(offset <= lo && offset + top * scale >= hi)) {
              stats.saturated++;
              assert(f.name === "e4m3" || Math.max(-lo, hi) > 57344 - 2 ** 13, `${what}: ${lo}`);
              continue;
            }
            stats.covered++;
            for (const i of elems) {
              const err = Math.abs(got(i) - x[i]);
              const slack = 1e-6 * (Math.abs(x[i]) + Math.abs(offset) + top * scale);
              assert(err <= 0.5 * scale * (1 + 1e-4) + slack, `${what}: ${x[i]} -> ${got(i)}`);
            }
            // zero-range groups come back exactly where their value is in the format
            if (lo === hi && is({ scale: 0, offset: lo })) {
              stats.exact++;
              for (const i of elems) assert(got(i) === x[i], `${what}: constant ${x[i]}`);
            }
          }
        }
        assert(stats.exact > 20 && stats.covered > 1000, `${what}: ${JSON.stringify(stats)}`);
        if (f.name === "e4m3" && qmode === KvqMode.ASYM) assert(stats.saturated > 50, what);
        layer.close();
      }
    }
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

Deno.test("kvq: normalization over a prompt longer than its stripes, by max and by RMS", () => {
  // 100 tokens in one store: every one of the 32 stripes (kvq.h, KVQ_NORM_STRIPES) takes 3-4
  for (const norm of [KvqNorm.MAX, KvqNorm.RMS]) {
    const p = kvqParams({ norm, ring: 8 + 16 + 100 });
    const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout);
    const n = 100, rows = kvRows(p, n, 11), d = p.headDim, half = d / 2;
    fillLayer(cpu, layout, layer, rows, n, [n]);
    const scale = keyScale(cpu, layout, layer);
    for (let h = 0; h < p.kvHeads; h++) {
      for (let i = 0; i < half; i++) {
        let max = 0, squares = 0;
        for (let t = 0; t < n; t++) {
          for (const c of [i, i + half]) {
            const x = rows.k[(t * p.kvHeads + h) * d + c];
            max = Math.max(max, Math.abs(x));
            squares += x * x;
          }
        }
        const got = scale[h * half + i];
        if (norm === KvqNorm.MAX) assertEquals(got, Math.fround(max));
        else {
          const want = Math.sqrt(squares / (2 * n));
          assert(
            Math.abs(got - want) <= 1e-6 * want,
            `rms ${got} vs ${want} (head ${h}, pair ${i})`,
          );
        }
      }
    }
    layer.close();
  }
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

// A prefill call takes its queries in tiles (each quantized row unpacked once for the tile) and
// must give each query what a call of that query alone gives, bit for bit: 45 queries from
// position 11 cross the edges where the quantized region grows, in every setting.
Deno.test("kvq: queries attended together equal each attended alone, exactly", () => {
  for (const { name, params } of KVQ_CASES) {
    const layout = cpu.kvqLayout(params), layer = zeroLayer(cpu, layout);
    const heads = params.kvHeads * 2, d = params.headDim, n = 45, pos0 = 11;
    fillLayer(cpu, layout, layer, kvRows(params, pos0 + n, 4), pos0 + n, [37, 19]);
    const q = randomFloats(new Rng(8), n * heads * d, -1, 1);
    const together = kvqAttention(cpu, layout, layer, q, n, pos0, heads);
    for (let t = 0; t < n; t++) {
      const row = q.subarray(t * heads * d, (t + 1) * heads * d);
      const alone = kvqAttention(cpu, layout, layer, row, 1, pos0 + t, heads);
      assertEquals(
        together.subarray(t * heads * d, (t + 1) * heads * d),
        alone,
        `${name}, query ${t}`,
      );
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
    [{ meta: 3 }, /meta 3 unknown/],
    [{ meta: -1 }, /meta -1 unknown/],
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

/** The value tile order of kernels/kvq.h, from its description: value (token t, channel c) of a
 * block of 32 is held by lane (gid = c % 8, tig = t % 8 / 2) for channel tile cm = c / 16, row
 * half rh = c % 16 / 8, k-step ks = t / 16, half = t % 16 / 8, in byte half + 2 (t % 2) of the
 * lane's word w = q / per * 2 + ks at code place q % per (q = 2 cm + rh, per = 8 / bits), lane
 * words at w / 4 * 128 + lane * 4 + w % 4. */
function valueTileSlot(t: number, c: number, bits: number): number {
  const per = 8 / bits, q = 2 * Math.floor(c / 16) + Math.floor((c % 16) / 8);
  const lane = (c % 8) * 4 + Math.floor((t % 8) / 2), w = Math.floor(q / per) * 2 + (t >> 4);
  const word = Math.floor(w / 4) * 128 + lane * 4 + (w % 4);
  const byte = Math.floor((t % 16) / 8) + 2 * (t % 2);
  return word * (32 / bits) + byte * per + (q % per);
}

Deno.test("kvq: values in blocks of 32 tokens are packed in the documented tile order", () => {
  // over tokens (InnerQ) and over channels beside keys over tokens (KIVI): the same slots
  for (const axis of [KvqAxis.TOKENS, KvqAxis.CHANNELS]) {
    for (const [bits, d] of [[2, 64], [4, 64], [8, 64], [2, 128], [4, 32]]) {
      const overTokens = axis === KvqAxis.TOKENS;
      const p = kvqParams({
        headDim: d,
        vBits: bits,
        vGroup: 32,
        vAxis: axis,
        sink: 0,
        recent: 0,
        qmode: KvqMode.ASYM,
        ...(overTokens ? {} : { kAxis: KvqAxis.TOKENS, kGroup: 32, norm: KvqNorm.OFF }),
      });
      p.ring = 32 + 64;
      p.kGroup = Math.min(p.kGroup, d);
      const layout = cpu.kvqLayout(p), layer = zeroLayer(cpu, layout);
      const total = 64, row = p.kvHeads * d, top = (1 << bits) - 1;
      const codes = randomInts(new Rng(bits * 31 + d), total * row, top + 1);
      // each group holds 0 and top, so min/max give scale 1 and offset 0 exactly
      const v = Float32Array.from(codes, (code, i) => {
        const e = overTokens ? Math.floor(i / row) : i % d; // the entry's place in its group
        return e % 32 === 0 ? 0 : e % 32 === 1 ? top : code;
      });
      const k = randomFloats(new Rng(d), total * row, 1);
      fillLayer(cpu, layout, layer, { k, v }, total, [total]);
      const { words, qcap } = storedCodes(layout, layer, 1);
      for (let h = 0; h < p.kvHeads; h++) {
        for (let t = 0; t < total; t++) {
          for (let c = 0; c < d; c++) {
            const slot = (h * qcap + t - (t % 32)) * d + valueTileSlot(t % 32, c, bits);
            const bit = slot * bits, code = (words[bit >>> 5] >>> (bit & 31)) & top;
            assertEquals(
              code,
              v[t * row + h * d + c],
              `value (${h}, ${t}, ${c}), ${bits} bits, d ${d}, axis ${axis}`,
            );
          }
        }
      }
      layer.close();
    }
  }
});
