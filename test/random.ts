// Seeded random inputs for tests: the same seed gives the same arrays on every machine.
import { Rng } from "../src/engine/sampler.ts";

/** Uniform floats in [lo, hi) from a seeded generator. */
export function randomFloats(rng: Rng, count: number, lo = -1, hi = 1): Float32Array {
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = lo + (hi - lo) * rng.next();
  return out;
}

/** Uniform integers in [0, bound). */
export function randomInts(rng: Rng, count: number, bound: number): Int32Array {
  const out = new Int32Array(count);
  for (let i = 0; i < count; i++) out[i] = Math.floor(rng.next() * bound);
  return out;
}

/** Largest |a[i] - b[i]| relative to max(1, |b[i]|). */
export function maxRelError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const err = Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i]));
    if (!(err <= worst)) worst = Number.isNaN(err) ? Infinity : err;
  }
  return worst;
}
