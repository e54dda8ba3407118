// iq_sample of the CPU backend beyond test/ops_test.ts: the full-vocabulary radix sort and the
// top_k heap against the reference's full sort on ties (-0 and +0 among them), -inf logits, the
// softmax frequencies at temperature 1 over 2000 evenly spaced uniforms, and the inputs that have
// no softmax (NaN temperature, +inf logits, all -inf) failing in C with a message.
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";
import { Backend, NativeError } from "../ffi/backend.ts";
import { Rng } from "../src/engine/sampler.ts";
import { randomFloats, randomInts } from "./random.ts";
import * as ref from "./reference.ts";

const cpu = Backend.open("cpu", { threads: 2 });
globalThis.addEventListener("unload", () => cpu.close());

const OFF = { history: [], repeatPenalty: 1, temperature: 1, topK: 0, topP: 1, minP: 0 };

/** One iq_sample call; checks that logits come back unchanged. */
function sample(logits: Float32Array, s: ref.SampleSettings): number {
  const l = cpu.alloc(logits.byteLength), out = cpu.alloc(4);
  const history = cpu.alloc(Math.max(4, s.history.length * 4));
  try {
    cpu.upload(l, logits);
    cpu.upload(history, Int32Array.from(s.history));
    cpu.sample({
      ...s,
      outToken: out,
      logits: l,
      vocab: logits.length,
      history,
      nHistory: s.history.length,
    });
    const after = new Float32Array(logits.length);
    cpu.download(l, after);
    assertEquals(after, logits);
    const token = new Int32Array(1);
    cpu.download(out, token);
    return token[0];
  } finally {
    [l, out, history].forEach((b) => b.close());
  }
}

Deno.test("sample: ties, -0/+0 and -inf order like the reference's full sort, sorted or heap", () => {
  const rng = new Rng(31);
  for (const vocab of [1000, 50000]) {
    // few distinct values, so most candidates tie with many others
    const logits = Float32Array.from(randomInts(rng, vocab, 9), (v) => (v - 6) / 2);
    for (let i = 0; i < vocab; i += 7) logits[i] = -0;
    for (let i = 3; i < vocab; i += 11) logits[i] = -Infinity;
    const settings = [
      OFF,
      { ...OFF, temperature: 0.7 },
      { ...OFF, topK: vocab / 2 },
      { ...OFF, temperature: 0.5, topK: 0, topP: 0.9, minP: 0.05 },
      { ...OFF, history: [1, 1, 5, -3, vocab, 7], repeatPenalty: 1.3, topK: 40 },
      { ...OFF, temperature: 0 },
    ];
    for (const s of settings) {
      for (const uniform of [0, 1e-6, 0.3, 0.5, 0.77, 0.999999, rng.next()]) {
        const want = ref.sample(logits, { ...s, uniform });
        assertEquals(
          sample(logits, { ...s, uniform }),
          want,
          JSON.stringify({ vocab, ...s, uniform }),
        );
      }
    }
  }
});

Deno.test("sample at temperature 1 without filters: frequencies within 0.01 of the softmax", () => {
  const logits = randomFloats(new Rng(32), 50, -3, 3), draws = 2000;
  const counts = new Array(logits.length).fill(0);
  for (let i = 0; i < draws; i++) counts[sample(logits, { ...OFF, uniform: (i + 0.5) / draws })]++;
  const z = logits.reduce((s, l) => s + Math.exp(l), 0);
  logits.forEach((l, i) => {
    const diff = Math.abs(counts[i] / draws - Math.exp(l) / z);
    assert(diff < 0.01, `token ${i}: frequency off by ${diff}`);
  });
});

Deno.test("sample: +inf wins greedy; no softmax (NaN temperature, +inf, all -inf) is a NativeError", () => {
  const native = (pattern: RegExp) => (e: Error) =>
    e instanceof NativeError && pattern.test(e.message);
  const withInf = Float32Array.from([0, Infinity, 1, Infinity]);
  assertEquals(sample(withInf, { ...OFF, temperature: 0, uniform: 0.5 }), 1);
  assertThrows(
    () => sample(withInf, { ...OFF, uniform: 0.5 }),
    native(/largest scaled logit \(id 1\) is inf/),
  );
  assertThrows(
    () => sample(new Float32Array(4).fill(-Infinity), { ...OFF, uniform: 0.5 }),
    native(/largest scaled logit \(id 0\) is -inf/),
  );
  assertThrows(
    () => sample(Float32Array.from([0, 1, 2]), { ...OFF, temperature: NaN, uniform: 0.5 }),
    native(/temperature nan/),
  );
  assertThrows(
    () => sample(Float32Array.from([0, 1, 2, NaN]), { ...OFF, uniform: 0.5 }),
    native(/logit 3 is NaN/),
  );
  assertThrows(() => sample(Float32Array.from([0, 1]), { ...OFF, uniform: 1 }), RangeError);
});
