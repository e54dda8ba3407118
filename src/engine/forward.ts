// The forward pass of a Llama-family decoder, as kernel-library calls in forward order.
// Every device buffer is planned at load time: the activations for one chunk of tokens and the
// KV cache for the whole context; nothing is allocated per token.
import {
  type Backend,
  type DeviceBuffer,
  DType,
  DTYPE_BYTES,
  type DTypeCode,
  type Slice,
} from "../../ffi/backend.ts";
import { type ModelConfig, ropeInvFreq } from "../model/config.ts";
import {
  freeWeights,
  gib,
  layerMatrixDtype,
  type LoadProgress,
  loadWeights,
  type ModelWeights,
  readTensors,
  type Weight,
} from "../model/weights.ts";
import type { KvCache } from "../kv/cache.ts";
import {
  formatKvSpec,
  isDense,
  kvCacheBytes,
  type KvSpec,
  makeKvCache,
  parseKvSpec,
} from "../kv/spec.ts";

export interface LoadOptions {
  /** Context length: tokens the KV cache holds (default: the model's max_position_embeddings). */
  ctx?: number;
  /** The KV cache: a spec or its text (default fp16). */
  kv?: KvSpec | string;
  /** Most tokens per forward call; longer prompts are prefilled in chunks. */
  chunk?: number;
  /** Keep logits for every token of a chunk, not only the last (perplexity needs them). */
  allLogits?: boolean;
  onProgress?: LoadProgress;
}

/** The dtype prefill's GEMMs read the normed and SwiGLU activations in: on CUDA, with every layer
 * matrix in fp16 (or bf16), that type, so rmsnorm and swiglu write what cuBLAS reads and no
 * matmul runs a rounding pass first; else fp32 (the CPU keeps exact fp32 activations). The bits
 * are those of fp32 activations: matmul rounded the same fp32 values to the same type before. */
export function gemmInputDtype(backend: Backend, layerMatrices: DTypeCode | null): DTypeCode {
  const narrow = layerMatrices === DType.F16 || layerMatrices === DType.BF16;
  return backend.kind === "cuda" && narrow ? layerMatrices : DType.F32;
}

/** Activation buffers for one chunk of up to `chunk` tokens. */
class RunState {
  readonly buffers: DeviceBuffer[] = [];
  readonly x: DeviceBuffer; // (chunk, dim) residual stream
  readonly xb: DeviceBuffer; // (chunk, dim) normed input of a sublayer
  readonly xo: DeviceBuffer; // (chunk, dim) a sublayer's output, added to x by the next rmsnorm
  readonly q: DeviceBuffer; // (chunk, heads * head_dim)
  readonly k: DeviceBuffer; // (chunk, kv_heads * head_dim)
  readonly v: DeviceBuffer; // (chunk, kv_heads * head_dim)
  readonly att: DeviceBuffer; // (chunk, heads * head_dim) attention output
  readonly hb: DeviceBuffer; // (chunk, hidden) gate, then SwiGLU
  readonly hb2: DeviceBuffer; // (chunk, hidden) up
  // a decode step's outputs of the fused GEMVs (LayerWeights.wQkv, wGateUp), back to back
  readonly qkvRow: DeviceBuffer; // ((heads + 2 kv_heads) * head_dim) q, k, v of one token
  readonly gateUpRow: DeviceBuffer; // (2 hidden) gate, up of one token
  readonly qkvParts: Slice[]; // q, k, v in qkvRow
  readonly qkRow: Slice; // q and k in qkvRow: rope turns them in one call
  readonly gateUpParts: Slice[]; // gate, up in gateUpRow
  // only where prefill's GEMM inputs are fp16/bf16 (gemmInputDtype), in that type:
  readonly xb16: DeviceBuffer | null; // (chunk, dim) normed input of q/k/v and of gate/up
  readonly hb16: DeviceBuffer | null; // (chunk, hidden) SwiGLU, the input of down
  readonly logits: DeviceBuffer; // (logit rows, vocab)
  readonly tokens: DeviceBuffer; // (chunk) int32
  readonly positions: DeviceBuffer; // (ctx) int32: 0 .. ctx - 1, so a call's positions are a slice
  readonly invFreq: DeviceBuffer; // (head_dim / 2)

  /** Device bytes the buffers below take. */
  static bytes(
    c: ModelConfig,
    chunk: number,
    logitRows: number,
    ctx: number,
    gemmDtype: DTypeCode,
  ): number {
    const rows = 3 * c.hiddenSize + 2 * c.numHeads * c.headDim + 2 * c.numKvHeads * c.headDim +
      2 * c.intermediateSize + 1;
    const fusedRows = (c.numHeads + 2 * c.numKvHeads) * c.headDim + 2 * c.intermediateSize;
    const narrow = gemmDtype === DType.F32
      ? 0
      : DTYPE_BYTES[gemmDtype] * chunk * (c.hiddenSize + c.intermediateSize);
    return 4 * (chunk * rows + fusedRows + logitRows * c.vocabSize + ctx + c.headDim / 2) + narrow;
  }

  constructor(
    backend: Backend,
    c: ModelConfig,
    chunk: number,
    logitRows: number,
    ctx: number,
    gemmDtype: DTypeCode,
  ) {
    const alloc = (bytes: number) => {
      const b = backend.alloc(bytes);
      this.buffers.push(b);
      return b;
    };
    const f32 = (n: number) => alloc(n * 4);
    const narrow = (n: number) =>
      gemmDtype === DType.F32 ? null : alloc(n * DTYPE_BYTES[gemmDtype]);
    try {
      this.x = f32(chunk * c.hiddenSize);
      this.xb = f32(chunk * c.hiddenSize);
      this.xo = f32(chunk * c.hiddenSize);
      this.q = f32(chunk * c.numHeads * c.headDim);
      this.k = f32(chunk * c.numKvHeads * c.headDim);
      this.v = f32(chunk * c.numKvHeads * c.headDim);
      this.att = f32(chunk * c.numHeads * c.headDim);
      this.hb = f32(chunk * c.intermediateSize);
      this.hb2 = f32(chunk * c.intermediateSize);
      this.qkvRow = f32((c.numHeads + 2 * c.numKvHeads) * c.headDim);
      this.gateUpRow = f32(2 * c.intermediateSize);
      const qBytes = c.numHeads * c.headDim * 4, kvBytes = c.numKvHeads * c.headDim * 4;
      this.qkvParts = [0, qBytes, qBytes + kvBytes].map((at, i) =>
        this.qkvRow.slice(at, i ? kvBytes : qBytes)
      );
      this.qkRow = this.qkvRow.slice(0, qBytes + kvBytes);
      const upBytes = c.intermediateSize * 4;
      this.gateUpParts = [0, upBytes].map((at) => this.gateUpRow.slice(at, upBytes));
      this.xb16 = narrow(chunk * c.hiddenSize);
      this.hb16 = narrow(chunk * c.intermediateSize);
      this.logits = f32(logitRows * c.vocabSize);
      this.tokens = f32(chunk);
      this.positions = f32(ctx);
      this.invFreq = f32(c.headDim / 2);
    } catch (err) {
      this.close();
      throw err;
    }
  }

  close(): void {
    for (const b of this.buffers) b.close();
  }
}

/** The KV cache's shape for a model, `ctx` positions and forward calls of up to `chunk` tokens. */
function cacheShape(config: ModelConfig, ctx: number, chunk: number) {
  return {
    layers: config.numLayers,
    heads: config.numHeads,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
    capacity: ctx,
    chunk,
  };
}

/** What `Transformer.load` plans with beside the context: tokens per forward call (default
 * min(256, ctx)), logits for every token of a chunk or the last only, and the dtype of prefill's
 * GEMM inputs (gemmInputDtype; default fp32). */
export interface PlanOptions {
  chunk?: number;
  allLogits?: boolean;
  gemmDtype?: DTypeCode;
}

/** The device bytes `Transformer.load` plans beside the weights for `ctx` tokens: the KV cache,
 * the activations, and the scratch a prompt deep in a quantized cache takes on CUDA (`innerq
 * info` finds the longest context that fits with them). */
export function planBytes(
  backend: Backend,
  config: ModelConfig,
  kv: KvSpec,
  ctx: number,
  opts: PlanOptions = {},
): { cacheBytes: number; stateBytes: number; scratchBytes: number } {
  const chunk = opts.chunk ?? Math.min(256, ctx), logitRows = opts.allLogits ? chunk : 1;
  const shape = cacheShape(config, ctx, chunk);
  return {
    cacheBytes: kvCacheBytes(backend, kv, shape),
    stateBytes: RunState.bytes(config, chunk, logitRows, ctx, opts.gemmDtype ?? DType.F32),
    scratchBytes: backend.kind === "cuda" ? promptScratchBytes(kv, shape) : 0,
  };
}

/** (query, head) rows a KV head up to which a prompt call over a quantized cache attends in place
 * (kernels/cuda/kvq_prefill.cu: one block of 128 rows unpacks the chunks itself). */
const PROMPT_ROWS_IN_PLACE = 128;

/** Longer prompt calls over a quantized cache dequantize the chunks they see into one layer's fp16
 * keys and values (kernels/cuda/kvq_prefill.cu), a scratch the context keeps once grown; calls of
 * at most `chunk` tokens whose rows fit one block need none. */
export function promptScratchBytes(
  kv: KvSpec,
  shape: { heads: number; kvHeads: number; headDim: number; capacity: number; chunk: number },
): number {
  const rows = shape.chunk * (shape.heads / shape.kvHeads);
  return isDense(kv) || rows <= PROMPT_ROWS_IN_PLACE
    ? 0
    : 2 * 2 * shape.kvHeads * shape.headDim * shape.capacity;
}

export class Transformer {
  readonly chunk: number;
  readonly allLogits: boolean;
  /** The dtype prefill's (n > 1) GEMMs read the normed and SwiGLU activations in (gemmInputDtype). */
  readonly gemmDtype: DTypeCode;
  #cache: KvCache;

  private constructor(
    readonly backend: Backend,
    readonly dir: string,
    readonly config: ModelConfig,
    readonly weights: ModelWeights,
    cache: KvCache,
    readonly state: RunState,
    opts: Required<Pick<LoadOptions, "chunk" | "allLogits">> & { gemmDtype: DTypeCode },
  ) {
    this.#cache = cache;
    this.chunk = opts.chunk;
    this.allLogits = opts.allLogits;
    this.gemmDtype = opts.gemmDtype;
    backend.upload(state.invFreq, ropeInvFreq(config));
    // every position once, so no forward call (above all no decode step) uploads any
    backend.upload(state.positions, Int32Array.from({ length: cache.shape.capacity }, (_, i) => i));
  }

  /** Loads DIR's weights for its (already read) config and plans every buffer for `ctx` tokens. */
  static async load(
    backend: Backend,
    dir: string,
    config: ModelConfig,
    opts: LoadOptions = {},
  ): Promise<Transformer> {
    const ctx = opts.ctx ?? config.maxPositionEmbeddings;
    if (!Number.isSafeInteger(ctx) || ctx < 1) {
      throw new RangeError(`--ctx must be a positive integer, got ${ctx}`);
    }
    const chunk = Math.min(opts.chunk ?? 256, ctx);
    const allLogits = opts.allLogits ?? false;
    const shape = cacheShape(config, ctx, chunk);
    const kv = typeof opts.kv === "string" ? parseKvSpec(opts.kv) : opts.kv ?? { kind: "fp16" };
    const tensors = await readTensors(dir, config);
    const gemmDtype = gemmInputDtype(backend, layerMatrixDtype(tensors));
    const plan = { chunk, allLogits, gemmDtype };
    const { cacheBytes, stateBytes, scratchBytes } = planBytes(backend, config, kv, ctx, plan);
    const reserve = {
      bytes: cacheBytes + stateBytes + scratchBytes,
      what: `${formatKvSpec(kv)} KV cache for ${ctx} tokens ${gib(cacheBytes)}, activations ${
        gib(stateBytes)
      }${scratchBytes ? `, prompt scratch ${gib(scratchBytes)}` : ""}`,
    };
    const weights = await loadWeights(backend, dir, config, tensors, opts.onProgress, reserve);
    let cache: KvCache | null = null;
    try {
      cache = makeKvCache(backend, shape, kv);
      const state = new RunState(backend, config, chunk, allLogits ? chunk : 1, ctx, gemmDtype);
      return new Transformer(backend, dir, config, weights, cache, state, plan);
    } catch (err) {
      cache?.close();
      freeWeights(weights);
      throw err;
    }
  }

  /** The KV cache forward() stores into and attends over. */
  get cache(): KvCache {
    return this.#cache;
  }

  /** Attends through `cache` from now on and returns the cache it replaces, which the caller then
   * owns (and closes). `cache` must have this cache's shape: make it with
   * makeKvCache(model.backend, model.cache.shape, spec). One copy of the weights can so run several
   * specs over the same tokens (ppl). */
  swapCache(cache: KvCache): KvCache {
    for (const key of ["layers", "heads", "kvHeads", "headDim", "capacity", "chunk"] as const) {
      if (cache.shape[key] !== this.#cache.shape[key]) {
        throw new RangeError(
          `swapCache: the new cache's ${key} is ${cache.shape[key]}, the model's ${
            this.#cache.shape[key]
          }`,
        );
      }
    }
    const old = this.#cache;
    this.#cache = cache;
    return old;
  }

  /** Tokens the cache holds. */
  get capacity(): number {
    return this.cache.shape.capacity;
  }

  /** Runs n tokens (int32 on the device) at positions pos0 .. pos0 + n - 1 through the model and
   * returns the logits: (vocab) of the last token, or (n, vocab) with allLogits. */
  forward(tokens: Slice, pos0: number, n: number): Slice {
    if (n < 1 || n > this.chunk) {
      throw new RangeError(`forward takes 1..${this.chunk} tokens, got ${n}`);
    }
    if (pos0 < 0 || pos0 + n > this.capacity) {
      throw new RangeError(
        `positions ${pos0}..${pos0 + n - 1} exceed the context of ${this.capacity} tokens`,
      );
    }
    const be = this.backend, c = this.config, s = this.state, w = this.weights;
    const dim = c.hiddenSize, hidden = c.intermediateSize, eps = c.rmsNormEps;
    const positions = s.positions.slice(pos0 * 4, n * 4); // pos0 .. pos0 + n - 1

    // the GEMM inputs rmsnorm and swiglu write: fp16/bf16 for prefill where gemmDtype says so
    // (xb16, hb16), else fp32 (xb, hb), as decode's GEMVs read x exactly
    const gd = n > 1 ? this.gemmDtype : DType.F32;
    const xg = gd === DType.F32 ? s.xb : s.xb16!, hg = gd === DType.F32 ? s.hb : s.hb16!;

    // each sublayer's output xo joins the residual stream x in the rmsnorm after it (one kernel)
    be.embed(s.x, w.embed.buf, w.embed.dtype, tokens, n, dim, c.vocabSize); // x = embed[tokens]
    for (let l = 0; l < c.numLayers; l++) {
      const L = w.layers[l];
      // attention block
      const ffnOut = l > 0 ? s.xo : null; // the layer before's
      be.rmsnorm(xg, gd, s.x, L.attnNorm.buf, n, dim, eps, ffnOut); // x += xo; xg = rmsnorm(x)
      let q: Slice = s.q, k: Slice = s.k, v: Slice = s.v;
      const wQkv = n === 1 ? L.wQkv : null; // decode's one GEMV for q, k and v
      if (wQkv) { // q/k/v biases, where the model has them, are fused too (bQkv)
        linear(be, s.qkvRow, xg, gd, wQkv, L.bQkv, n); // [q | k | v] = xg [Wq; Wk; Wv]ᵀ
        [q, k, v] = s.qkvParts;
      } else {
        linear(be, q, xg, gd, L.wq, L.bq, n); // q = xg Wqᵀ (n, heads * head_dim)
        linear(be, k, xg, gd, L.wk, L.bk, n); // k = xg Wkᵀ (n, kv_heads * head_dim)
        linear(be, v, xg, gd, L.wv, L.bv, n); // v = xg Wvᵀ
      }
      if (wQkv && pos0 > 0) { // queryScale is fixed past position 0: q and k in one launch
        const qScale = this.cache.queryScale(l); // the keys' normalization, folded into q
        const scale = qScale && { pairs: qScale, heads: c.numKvHeads, scaledHeads: c.numHeads };
        be.rope(s.qkRow, positions, s.invFreq, n, c.numHeads + c.numKvHeads, c.headDim, scale);
        this.cache.store(l, k, v, pos0, n); // cache k, v at pos0 ..
      } else {
        be.rope(k, positions, s.invFreq, n, c.numKvHeads, c.headDim); // rotate k
        this.cache.store(l, k, v, pos0, n); // cache k, v at pos0 .. (and set queryScale at 0)
        const qScale = this.cache.queryScale(l);
        const scale = qScale && { pairs: qScale, heads: c.numKvHeads };
        be.rope(q, positions, s.invFreq, n, c.numHeads, c.headDim, scale); // rotate (and scale) q
      }
      this.cache.attend(l, q, s.att, pos0, n); // att = softmax(q kᵀ / sqrt(d)) v, causal, GQA
      linear(be, s.xo, s.att, DType.F32, L.wo, L.bo, n); // xo = att Woᵀ (n, dim), att in fp32
      // feed-forward block
      be.rmsnorm(xg, gd, s.x, L.ffnNorm.buf, n, dim, eps, s.xo); // x += xo; xg = rmsnorm(x)
      let gate: Slice = s.hb, up: Slice = s.hb2;
      if (n === 1 && L.wGateUp) {
        linear(be, s.gateUpRow, xg, gd, L.wGateUp, null, n); // [gate | up] = xg [Wgate; Wup]ᵀ
        [gate, up] = s.gateUpParts;
      } else {
        linear(be, gate, xg, gd, L.wGate, null, n); // gate = xg Wgateᵀ (n, hidden)
        linear(be, up, xg, gd, L.wUp, null, n); // up = xg Wupᵀ
      }
      be.swiglu(hg, gd, gate, up, n * hidden); // hg = silu(gate) * up
      linear(be, s.xo, hg, gd, L.wDown, null, n); // xo = hg Wdownᵀ (n, dim)
    }
    // final norm and classifier, for the last token only unless every row's logits are wanted
    const rows = this.allLogits ? n : 1;
    if (rows === n) {
      be.rmsnorm(s.xb, DType.F32, s.x, w.norm.buf, n, dim, eps, s.xo); // x += xo; xb = rmsnorm(x)
    } else {
      be.add(s.x, s.x, s.xo, n * dim); // x += xo
      const last = s.x.slice((n - rows) * dim * 4, rows * dim * 4);
      be.rmsnorm(s.xb, DType.F32, last, w.norm.buf, rows, dim, eps); // xb = rmsnorm(x), fp32
    }
    linear(be, s.logits, s.xb, DType.F32, w.lmHead, null, rows); // logits = xb Wheadᵀ (rows, vocab)
    return s.logits.slice(0, rows * c.vocabSize * 4);
  }

  /** Uploads token ids into the chunk's token buffer and returns it, for forward(). */
  stageTokens(ids: Int32Array): Slice {
    if (ids.length > this.chunk) {
      throw new RangeError(`at most ${this.chunk} tokens per chunk, got ${ids.length}`);
    }
    const vocab = this.config.vocabSize;
    for (const id of ids) {
      if (!(id >= 0 && id < vocab)) {
        throw new RangeError(`token id ${id} outside the vocabulary (0..${vocab - 1})`);
      }
    }
    this.backend.upload(this.state.tokens, ids);
    return this.state.tokens.slice(0, ids.length * 4);
  }

  close(): void {
    this.state.close();
    this.cache.close();
    freeWeights(this.weights);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** out(n, out_features) = x(n, in_features) Wᵀ + bias; x is F32 or of W's dtype. */
function linear(
  be: Backend,
  out: Slice,
  x: Slice,
  xDtype: DTypeCode,
  w: Weight,
  bias: Weight | null,
  n: number,
): void {
  be.matmul(out, x, xDtype, w.buf, w.dtype, bias?.buf ?? null, n, w.shape[1], w.shape[0]);
}
