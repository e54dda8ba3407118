// Plain TypeScript versions of the kernel library's ops, written for clarity (float64 sums, full
// sorts): what test/ops_test.ts checks the CPU backend against.
export function embed(table: Float32Array, tokens: Int32Array, dim: number): Float32Array {
  const out = new Float32Array(tokens.length * dim);
  tokens.forEach((t, i) => out.set(table.subarray(t * dim, (t + 1) * dim), i * dim));
  return out;
}

export function rmsnorm(x: Float32Array, w: Float32Array, dim: number, eps: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let r = 0; r < x.length / dim; r++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[r * dim + i] ** 2;
    const scale = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) out[r * dim + i] = x[r * dim + i] * scale * w[i];
  }
  return out;
}

/** out[n, m] = x[n, k] · w[m, k]ᵀ + bias. */
export function matmul(
  x: Float32Array,
  w: Float32Array,
  bias: Float32Array | null,
  n: number,
  k: number,
  m: number,
): Float32Array {
  const out = new Float32Array(n * m);
  for (let t = 0; t < n; t++) {
    for (let j = 0; j < m; j++) {
      let s = bias ? bias[j] : 0;
      for (let i = 0; i < k; i++) s += x[t * k + i] * w[j * k + i];
      out[t * m + j] = s;
    }
  }
  return out;
}

/** Hugging Face rotate_half: channel i turns with i + head_dim/2 by pos * inv_freq[i] (fp32 product),
 * then both are multiplied by pairScale[h / (scaledHeads / scaleHeads)][i] when given, for the
 * first scaledHeads heads (default all). */
export function rope(
  x: Float32Array,
  pos: Int32Array,
  invFreq: Float32Array,
  heads: number,
  hd: number,
  pairScale: { values: Float32Array; heads: number; scaledHeads?: number } | null = null,
) {
  const out = Float32Array.from(x), half = hd / 2;
  const scaled = pairScale ? pairScale.scaledHeads ?? heads : 0;
  pos.forEach((p, t) => {
    for (let h = 0; h < heads; h++) {
      const base = (t * heads + h) * hd;
      for (let i = 0; i < half; i++) {
        const angle = Math.fround(p * invFreq[i]);
        const a = x[base + i], b = x[base + i + half];
        const scale = h < scaled
          ? pairScale!.values[Math.floor(h / (scaled / pairScale!.heads)) * half + i]
          : 1;
        out[base + i] = (a * Math.cos(angle) - b * Math.sin(angle)) * scale;
        out[base + i + half] = (b * Math.cos(angle) + a * Math.sin(angle)) * scale;
      }
    }
  });
  return out;
}

export const swiglu = (g: Float32Array, u: Float32Array) =>
  g.map((v, i) => (v / (1 + Math.exp(-v))) * u[i]);
export const add = (a: Float32Array, b: Float32Array) => a.map((v, i) => v + b[i]);

/** n queries at positions pos0.. against a [kvHeads, cap, hd] cache. */
export interface AttentionShape {
  n: number;
  pos0: number;
  heads: number;
  kvHeads: number;
  hd: number;
  cap: number;
}

/** Causal attention, queries at pos0.., over caches given as float rows [kvHeads, cap, hd]. */
export function attention(
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  a: AttentionShape & { scale: number },
): Float32Array {
  const out = new Float32Array(a.n * a.heads * a.hd), group = a.heads / a.kvHeads;
  for (let t = 0; t < a.n; t++) {
    for (let h = 0; h < a.heads; h++) {
      const qi = (t * a.heads + h) * a.hd, base = Math.floor(h / group) * a.cap * a.hd;
      const len = a.pos0 + t + 1, scores = new Float64Array(len);
      for (let p = 0; p < len; p++) {
        for (let i = 0; i < a.hd; i++) scores[p] += q[qi + i] * k[base + p * a.hd + i];
        scores[p] *= a.scale;
      }
      const max = Math.max(...scores);
      let sum = 0;
      for (let p = 0; p < len; p++) sum += scores[p] = Math.exp(scores[p] - max);
      for (let i = 0; i < a.hd; i++) {
        let acc = 0;
        for (let p = 0; p < len; p++) acc += scores[p] * v[base + p * a.hd + i];
        out[qi + i] = acc / sum;
      }
    }
  }
  return out;
}

export interface SampleSettings {
  history: number[];
  repeatPenalty: number;
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  uniform: number;
}

/** iq_sample's eight steps as innerq.h states them, in fp32 where the C code is fp32. */
export function sample(logits: Float32Array, settings: SampleSettings): number {
  const l = Float32Array.from(logits), f = Math.fround;
  const s = { ...settings }; // the C side receives floats
  for (const key of ["repeatPenalty", "temperature", "topP", "minP", "uniform"] as const) {
    s[key] = f(s[key]);
  }
  for (const id of new Set(s.history)) {
    if (id >= 0 && id < l.length) {
      l[id] = l[id] > 0 ? l[id] / s.repeatPenalty : l[id] * s.repeatPenalty;
    }
  }
  if (s.temperature <= 0) return l.indexOf(Math.max(...l));
  const cand = Array.from(l, (v, id) => ({ v: f(v / s.temperature), id }));
  cand.sort((a, b) => b.v - a.v || a.id - b.id);
  const kept = cand.slice(0, s.topK > 0 ? s.topK : cand.length);
  let p = kept.map((c) => f(Math.exp(f(c.v - kept[0].v))));
  let sum = 0;
  for (const x of p) sum = f(sum + x);
  p = p.map((x) => f(x / sum));
  if (s.minP > 0) p = p.filter((x) => x >= f(s.minP * p[0]));
  if (s.topP < 1) {
    let cum = 0;
    const end = p.findIndex((x) => (cum = f(cum + x)) >= f(s.topP));
    if (end >= 0) p = p.slice(0, end + 1);
  }
  let total = 0;
  for (const x of p) total = f(total + x);
  const target = f(s.uniform * total);
  let cum = 0;
  const pick = p.findIndex((x) => (cum = f(cum + x)) > target);
  return kept[pick >= 0 ? pick : p.length - 1].id;
}
