// iq_sample of the CPU backend beyond test/ops_test.ts: the full-vocabulary radix sort and the
// top_k heap against the reference's full sort on ties (-0 and +0 among them), -inf logits, the
// softmax frequencies at temperature 1 over 2000 evenly spaced uniforms, and the logits it cannot
// sample (a NaN, a +inf largest, all -inf) failing in C with the message TypeScript derives from
// the token left behind (innerq.h), in every mode.
import { deepStrictEqual as assertEquals, ok as assert, throws as assertThrows } from "node:assert";
import { Backend, NativeError } from "../ffi/backend.ts";
import { GREEDY, Rng, Sampler } from "../src/engine/sampler.ts";
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

/** One iq_sample call that must fail: its NativeError's message and the token it left. */
function failure(logits: Float32Array, s: ref.SampleSettings): { message: string; token: number } {
  const l = cpu.alloc(logits.byteLength), out = cpu.alloc(4);
  const history = cpu.alloc(Math.max(4, s.history.length * 4));
  try {
    cpu.upload(l, logits);
    cpu.upload(out, Int32Array.of(12345));
    cpu.upload(history, Int32Array.from(s.history));
    const args = { ...s, outToken: out, logits: l, vocab: logits.length, history };
    let message = "";
    assertThrows(() => cpu.sample({ ...args, nHistory: s.history.length }), (e: Error) => {
      message = e.message;
      return e instanceof NativeError;
    });
    const token = new Int32Array(1);
    cpu.download(out, token);
    return { message, token: token[0] };
  } finally {
    [l, out, history].forEach((b) => b.close());
  }
}

/** Logits iq_sample cannot sample (innerq.h), what it says of them and the token it leaves. */
const UNSAMPLEABLE = [
  {
    what: "NaNs (a negative one first)",
    // 0xffc00000 and 0x7fc00000: NaNs of both signs, which a sort may put at either end
    logits: new Float32Array(
      Uint32Array.of(0, 0x3f800000, 0xffc00000, 0x7fc00000, 0x7f800000).buffer,
    ),
    message: "iq_sample: logit 2 is NaN",
    token: -(4 * 2 + 1),
  },
  {
    what: "two +inf",
    logits: Float32Array.from([0, Infinity, 1, Infinity, -Infinity]),
    message: "iq_sample: the largest logit (id 1) is +inf",
    token: -(4 * 1 + 2),
  },
  {
    what: "every logit -inf",
    logits: new Float32Array(5).fill(-Infinity),
    message: "iq_sample: every logit is -inf",
    token: -3,
  },
];

/** Greedy with and without the penalty, the full sort, the top_k heap, the penalty and a sort. */
const UNSAMPLEABLE_SETTINGS = [
  { ...OFF, temperature: 0 },
  { ...OFF, temperature: 0, history: [2, 3], repeatPenalty: 1.5 },
  OFF,
  { ...OFF, temperature: 0.5, topK: 2, topP: 0.9, minP: 0.1 },
  { ...OFF, history: [1, 2, 3], repeatPenalty: 1.3 },
].map((s) => ({ ...s, uniform: 0.5 }));

Deno.test("sample: NaN, a +inf largest or every logit -inf fail in C with the token they leave", () => {
  for (const c of UNSAMPLEABLE) {
    for (const s of UNSAMPLEABLE_SETTINGS) {
      const at = `${c.what} ${JSON.stringify(s)}`;
      const got = failure(c.logits, s);
      assertEquals(got, { message: `cpu sample: ${c.message}`, token: c.token }, at);
      // the text TypeScript derives from the token (all the CUDA backend reports) is C's message
      assertThrows(
        () => cpu.sampledToken(got.token),
        (e: Error) => e instanceof NativeError && e.message === got.message,
        at,
      );
    }
  }
  // finite logits over a tiny temperature: the scaled values overflow to +inf
  assertEquals(failure(Float32Array.from([1, 2, -1]), { ...OFF, temperature: 1e-40, uniform: 0 }), {
    message: "cpu sample: iq_sample: the largest logit (id 0) is +inf",
    token: -2,
  });
});

Deno.test("Sampler.sample throws the failure; sampledToken passes ids through", () => {
  const logits = cpu.alloc(12);
  try {
    cpu.upload(logits, Float32Array.from([0, NaN, 1]));
    for (const params of [GREEDY, { ...GREEDY, temperature: 1, seed: 5 }]) {
      using sampler = new Sampler(cpu, params, 3);
      assertThrows(
        () => sampler.sample(logits),
        (e: Error) =>
          e instanceof NativeError && e.message === "cpu sample: iq_sample: logit 1 is NaN",
      );
    }
  } finally {
    logits.close();
  }
  assertEquals([0, 7, 2 ** 31 - 1].map((t) => cpu.sampledToken(t)), [0, 7, 2 ** 31 - 1]);
  assertThrows(() => cpu.sampledToken(-4), /cpu sample: iq_sample: token -4 is not a failure/);
});

Deno.test("sample: NaN or +inf temperature and a uniform of 1 are out of range", () => {
  for (const temperature of [NaN, Infinity]) {
    assertThrows(
      () => sample(Float32Array.from([0, 1, 2]), { ...OFF, temperature, uniform: 0.5 }),
      (e: Error) =>
        e instanceof NativeError && /temperature (nan|inf), .*out of range/.test(e.message),
    );
  }
  assertThrows(() => sample(Float32Array.from([0, 1]), { ...OFF, uniform: 1 }), RangeError);
});
