// Typed wrappers over the kernel library. A Backend owns the library handle and one native context;
// DeviceBuffers own their allocations. Every op checks its arguments here, before C sees them.
import { type BackendKind, type KernelLibrary, openLibrary } from "./library.ts";

export type { BackendKind } from "./library.ts";

/** IQ_ABI_VERSION in kernels/innerq.h: the symbol table below matches it. */
const ABI_VERSION = 9;

/** iq_dtype in kernels/innerq.h. */
export const DType = { F32: 0, F16: 1, BF16: 2 } as const;
export type DTypeCode = typeof DType[keyof typeof DType];
const dtypeBytes: Record<DTypeCode, number> = { 0: 4, 1: 2, 2: 2 };
export const DTYPE_BYTES = dtypeBytes;
const dtypeNames: Record<DTypeCode, string> = { 0: "F32", 1: "F16", 2: "BF16" };

/** A byte range of device memory. */
export interface Slice {
  readonly ptr: Deno.PointerObject;
  readonly bytes: number;
}

export class NativeError extends Error {}

/** A sub-range of a range of device memory. */
export function sliceOf(s: Slice, byteOffset: number, bytes = s.bytes - byteOffset): Slice {
  if (byteOffset < 0 || bytes < 0 || byteOffset + bytes > s.bytes) {
    throw new RangeError(`slice [${byteOffset}, +${bytes}) outside a ${s.bytes}-byte buffer`);
  }
  return { ptr: Deno.UnsafePointer.offset(s.ptr, byteOffset)!, bytes };
}

export class DeviceBuffer implements Slice {
  #backend: Backend | null;
  constructor(backend: Backend, readonly ptr: Deno.PointerObject, readonly bytes: number) {
    this.#backend = backend;
  }

  /** A sub-range of this buffer. */
  slice(byteOffset: number, bytes = this.bytes - byteOffset): Slice {
    return sliceOf(this, byteOffset, bytes);
  }

  close(): void {
    this.#backend?.release(this);
    this.#backend = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

export interface SamplingArgs {
  outToken: Slice; // int32
  logits: Slice; // float[vocab]
  vocab: number;
  history: Slice | null; // int32[nHistory]
  nHistory: number;
  repeatPenalty: number;
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  uniform: number;
}

export interface AttentionArgs {
  out: Slice; // float[n, heads, headDim]
  q: Slice; // float[n, heads, headDim]
  kCache: Slice; // [kvHeads, cap, headDim] of cacheDtype
  vCache: Slice;
  cacheDtype: DTypeCode;
  pos0: number; // position of the first query
  n: number; // queries (1 at decode)
  heads: number;
  kvHeads: number;
  headDim: number;
  cap: number;
  scale: number;
}

/** iq_kv_store's operands: keys and values of n tokens, each [n, kvHeads * headDim] fp32, to
 * positions pos0 .. pos0 + n - 1 of their [kvHeads, cap, headDim] caches. */
export interface KvStoreArgs {
  kCache: Slice; // [kvHeads, cap, headDim] of cacheDtype
  vCache: Slice;
  cacheDtype: DTypeCode;
  k: Slice; // float[n, kvHeads * headDim]
  v: Slice;
  n: number;
  pos0: number;
  kvHeads: number;
  headDim: number;
  cap: number;
}

/** iq_kvq_params in kernels/innerq.h, field for field (all int32, in this order). */
export interface KvqParams {
  kvHeads: number;
  headDim: number;
  cap: number;
  sink: number;
  recent: number;
  ring: number;
  kBits: number;
  kGroup: number;
  kAxis: number;
  vBits: number;
  vGroup: number;
  vAxis: number;
  qmode: number;
  norm: number;
  meta: number;
}
const KVQ_FIELDS = [
  "kvHeads",
  "headDim",
  "cap",
  "sink",
  "recent",
  "ring",
  "kBits",
  "kGroup",
  "kAxis",
  "vBits",
  "vGroup",
  "vAxis",
  "qmode",
  "norm",
  "meta",
] as const satisfies readonly (keyof KvqParams)[];
export const KvqAxis = { CHANNELS: 0, TOKENS: 1 } as const;
export const KvqMode = { ASYM: 0, SYM: 1, HYBRID: 2 } as const;
export const KvqNorm = { OFF: 0, MAX: 1, RMS: 2 } as const;
export const KvqMeta = { F16: 0, E4M3: 1, E5M2: 2 } as const;
/** The regions of a quantized layer buffer (IQ_KVQ_* in kernels/innerq.h), in order. */
export const KVQ_REGIONS = [
  "keyScale",
  "sinkK",
  "sinkV",
  "ringK",
  "ringV",
  "codesK",
  "codesV",
  "metaK",
  "metaV",
] as const;

/** A checked quantized-cache layout: the packed params and each region's byte offset. */
export interface KvqLayout {
  readonly params: Readonly<KvqParams>;
  readonly packed: Int32Array;
  readonly offsets: Record<typeof KVQ_REGIONS[number], number>;
  /** Bytes of one layer's buffer. */
  readonly bytes: number;
}

/** Tokens that leave the recent window together (kvq_block in kernels/kvq.h). */
export function kvqBlock(p: KvqParams): number {
  if (p.kAxis === KvqAxis.TOKENS) return p.kGroup;
  if (p.vAxis === KvqAxis.TOKENS) return p.vGroup;
  return 1;
}

function cString(ptr: Deno.PointerValue): string {
  return ptr === null ? "" : new Deno.UnsafePointerView(ptr).getCString();
}

function positiveInts(values: Record<string, number>): void {
  for (const [name, v] of Object.entries(values)) {
    if (!Number.isSafeInteger(v) || v <= 0) {
      throw new RangeError(`${name} must be a positive integer, got ${v}`);
    }
  }
}

/** Bytes per element of a dtype code; an unknown code is a RangeError here, not NaN sizes. */
function elementBytes(dtype: DTypeCode): number {
  const bytes = dtypeBytes[dtype];
  if (bytes === undefined) throw new RangeError(`unknown dtype code ${dtype}`);
  return bytes;
}

function need(slice: Slice, bytes: number, name: string): void {
  if (slice.bytes < bytes) {
    throw new RangeError(`${name}: needs ${bytes} bytes, buffer has ${slice.bytes}`);
  }
}

/** Whether the first aBytes of a and the first bBytes of b share a byte. */
function overlaps(a: Slice, aBytes: number, b: Slice, bBytes: number): boolean {
  const x = BigInt(Deno.UnsafePointer.value(a.ptr)), y = BigInt(Deno.UnsafePointer.value(b.ptr));
  return x < y + BigInt(bBytes) && y < x + BigInt(aBytes);
}

/** An fp16/bf16 out of `count` elements must not overlap the fp32 inputs it is computed from
 * (the kernels write it while other threads still read them); an fp32 out may alias one. */
function checkNarrowOut(
  op: string,
  out: Slice,
  outDtype: DTypeCode,
  count: number,
  inputs: Slice[],
) {
  if (outDtype === DType.F32) return;
  const outBytes = count * elementBytes(outDtype);
  if (inputs.some((input) => overlaps(out, outBytes, input, count * 4))) {
    throw new RangeError(
      `${op}: out (${dtypeNames[outDtype]}) overlaps an input; only an F32 out may alias one`,
    );
  }
}

export class Backend {
  readonly kind: BackendKind;
  #lib: KernelLibrary;
  #ctx: Deno.PointerObject;
  #live = new Set<DeviceBuffer>();
  #closed = false;

  private constructor(kind: BackendKind, lib: KernelLibrary, ctx: Deno.PointerObject) {
    this.kind = kind;
    this.#lib = lib;
    this.#ctx = ctx;
  }

  /** Opens a backend; the returned object owns the library and the native context. */
  static open(kind: BackendKind, opts: { device?: number; threads?: number } = {}): Backend {
    const lib = openLibrary(kind);
    try {
      const version = lib.symbols.iq_abi_version();
      if (version !== ABI_VERSION) {
        throw new Error(
          `kernel library ABI ${version}, expected ${ABI_VERSION}: run \`deno task build\``,
        );
      }
      const out = new BigUint64Array(1);
      const status = lib.symbols.iq_ctx_create(opts.device ?? 0, opts.threads ?? 0, out);
      const ctx = Deno.UnsafePointer.create(out[0]);
      if (status !== 0 || ctx === null) {
        throw new NativeError(`${kind} backend: ${cString(lib.symbols.iq_last_error(null))}`);
      }
      return new Backend(kind, lib, ctx);
    } catch (e) {
      lib.close();
      throw e;
    }
  }

  #check(status: number, op: string): void {
    if (status !== 0) {
      throw new NativeError(
        `${this.kind} ${op}: ${cString(this.#lib.symbols.iq_last_error(this.#ctx))}`,
      );
    }
  }

  get #sym() {
    if (this.#closed) throw new Error("backend is closed");
    return this.#lib.symbols;
  }

  get #c() {
    if (this.#closed) throw new Error("backend is closed");
    return this.#ctx;
  }

  deviceInfo(): { name: string; freeBytes: number; totalBytes: number } {
    const name = new Uint8Array(256);
    const free = new BigUint64Array(1);
    const total = new BigUint64Array(1);
    this.#check(this.#sym.iq_device_info(this.#c, name, name.length, free, total), "device_info");
    const end = name.indexOf(0);
    return {
      name: new TextDecoder().decode(name.subarray(0, end < 0 ? name.length : end)),
      freeBytes: Number(free[0]),
      totalBytes: Number(total[0]),
    };
  }

  sync(): void {
    this.#check(this.#sym.iq_sync(this.#c), "sync");
  }

  /** Seconds the device takes for the calls `fn` issues, run back to back: the device's queue is
   * held while they are issued (iq_timing_begin), so the host's issue time is left out, as in a
   * forward pass the host runs ahead of. On the CPU backend, the host's time. */
  timeQueued(fn: () => void): number {
    this.#check(this.#sym.iq_timing_begin(this.#c), "timing_begin");
    const seconds = new Float64Array(1);
    try {
      fn();
    } catch (e) {
      this.#sym.iq_timing_end(this.#c, seconds); // releases the hold; fn's error is the one to tell
      throw e;
    }
    this.#check(this.#sym.iq_timing_end(this.#c, seconds), "timing_end");
    return seconds[0];
  }

  alloc(bytes: number): DeviceBuffer {
    positiveInts({ bytes });
    const out = new BigUint64Array(1);
    this.#check(this.#sym.iq_alloc(this.#c, BigInt(bytes), out), `alloc of ${bytes} bytes`);
    const buf = new DeviceBuffer(this, Deno.UnsafePointer.create(out[0])!, bytes);
    this.#live.add(buf);
    return buf;
  }

  /** Called by DeviceBuffer.close. */
  release(buf: DeviceBuffer): void {
    if (!this.#live.delete(buf) || this.#closed) return;
    this.#check(this.#sym.iq_free(this.#c, buf.ptr), "free");
  }

  upload(dst: Slice, src: ArrayBufferView): void {
    need(dst, src.byteLength, "upload destination");
    if (src.byteLength === 0) return; // Deno passes an empty buffer as NULL
    this.#check(this.#sym.iq_upload(this.#c, dst.ptr, src, BigInt(src.byteLength)), "upload");
  }

  download(src: Slice, dst: ArrayBufferView): void {
    need(src, dst.byteLength, "download source");
    if (dst.byteLength === 0) return;
    this.#check(this.#sym.iq_download(this.#c, dst, src.ptr, BigInt(dst.byteLength)), "download");
  }

  embed(
    out: Slice,
    table: Slice,
    tableDtype: DTypeCode,
    tokens: Slice,
    n: number,
    dim: number,
    vocab: number,
  ) {
    positiveInts({ n, dim, vocab });
    need(out, n * dim * 4, "embed out");
    need(table, vocab * dim * elementBytes(tableDtype), "embed table");
    need(tokens, n * 4, "embed tokens");
    const s = this.#sym.iq_embed(
      this.#c,
      out.ptr,
      table.ptr,
      tableDtype,
      tokens.ptr,
      n,
      dim,
      vocab,
    );
    this.#check(s, "embed");
  }

  /** out[n, dim] of outDtype = rmsnorm(x[n, dim]) * weight, computed in fp32 (a narrow out holds
   * it rounded). out may be x only when outDtype is F32. With a residual, x += residual first (x
   * keeps the sum: the residual stream's add in the same kernel), and out, x and residual are
   * three separate ranges. */
  rmsnorm(
    out: Slice,
    outDtype: DTypeCode,
    x: Slice,
    weight: Slice,
    n: number,
    dim: number,
    eps: number,
    residual: Slice | null = null,
  ): void {
    positiveInts({ n, dim });
    need(out, n * dim * elementBytes(outDtype), "rmsnorm out");
    need(x, n * dim * 4, "rmsnorm x");
    need(weight, dim * 4, "rmsnorm weight");
    if (residual) need(residual, n * dim * 4, "rmsnorm residual");
    checkNarrowOut("rmsnorm", out, outDtype, n * dim, residual ? [x, residual] : [x]);
    if (residual) { // x is written as well: out, x and residual all apart
      const outBytes = n * dim * elementBytes(outDtype), bytes = n * dim * 4;
      if (
        overlaps(out, outBytes, x, bytes) || overlaps(out, outBytes, residual, bytes) ||
        overlaps(x, bytes, residual, bytes)
      ) {
        throw new RangeError("rmsnorm: with a residual, out, x and residual overlap");
      }
    }
    const s = this.#sym.iq_rmsnorm(
      this.#c,
      out.ptr,
      outDtype,
      x.ptr,
      residual?.ptr ?? null,
      weight.ptr,
      n,
      dim,
      eps,
    );
    this.#check(s, "rmsnorm");
  }

  /** out[n, m] = x[n, k] · w[m, k]ᵀ + bias[m] in fp32; x is F32 or of the weights' dtype. */
  matmul(
    out: Slice,
    x: Slice,
    xDtype: DTypeCode,
    w: Slice,
    wDtype: DTypeCode,
    bias: Slice | null,
    n: number,
    k: number,
    m: number,
  ): void {
    positiveInts({ n, k, m });
    const xBytes = elementBytes(xDtype), wBytes = elementBytes(wDtype);
    if (xDtype !== DType.F32 && xDtype !== wDtype) {
      throw new RangeError(
        `matmul: x dtype ${dtypeNames[xDtype]} must be F32 or the weights' dtype (${
          dtypeNames[wDtype]
        })`,
      );
    }
    need(out, n * m * 4, "matmul out");
    need(x, n * k * xBytes, "matmul x");
    need(w, m * k * wBytes, "matmul w");
    if (bias) need(bias, m * 4, "matmul bias");
    const s = this.#sym.iq_matmul(
      this.#c,
      out.ptr,
      x.ptr,
      xDtype,
      w.ptr,
      wDtype,
      bias?.ptr ?? null,
      n,
      k,
      m,
    );
    this.#check(s, "matmul");
  }

  /** Rotates x[n, heads, headDim] in place; `scale` multiplies both channels of each pair of the
   * first `scale.scaledHeads` heads of a token (default all) after the turn, one row [headDim / 2]
   * per group of scaledHeads / scale.heads heads; the heads after them turn unscaled (decode turns
   * a token's [q heads | k heads] in one call). */
  rope(
    x: Slice,
    pos: Slice,
    invFreq: Slice,
    n: number,
    heads: number,
    headDim: number,
    scale: { pairs: Slice; heads: number; scaledHeads?: number } | null = null,
  ): void {
    positiveInts({ n, heads, headDim });
    if (headDim % 2) throw new RangeError(`rope head_dim must be even, got ${headDim}`);
    need(x, n * heads * headDim * 4, "rope x");
    need(pos, n * 4, "rope positions");
    need(invFreq, (headDim / 2) * 4, "rope inv_freq");
    const scaledHeads = scale?.scaledHeads ?? heads;
    if (scale) {
      positiveInts({ scaleHeads: scale.heads, scaledHeads });
      if (scaledHeads > heads || scaledHeads % scale.heads) {
        throw new RangeError(
          `rope scaled heads ${scaledHeads} must be at most heads ${heads} and a multiple of scale heads ${scale.heads}`,
        );
      }
      need(scale.pairs, scale.heads * (headDim / 2) * 4, "rope pair scale");
    }
    const s = this.#sym.iq_rope(
      this.#c,
      x.ptr,
      pos.ptr,
      invFreq.ptr,
      scale?.pairs.ptr ?? null,
      n,
      heads,
      headDim,
      scale?.heads ?? 0,
      scale ? scaledHeads : 0,
    );
    this.#check(s, "rope");
  }

  /** out[count] of outDtype = silu(gate) * up, computed in fp32 (a narrow out holds it rounded).
   * out may alias gate or up only when outDtype is F32. */
  swiglu(out: Slice, outDtype: DTypeCode, gate: Slice, up: Slice, count: number): void {
    positiveInts({ count });
    need(out, count * elementBytes(outDtype), "swiglu out");
    need(gate, count * 4, "swiglu gate");
    need(up, count * 4, "swiglu up");
    checkNarrowOut("swiglu", out, outDtype, count, [gate, up]);
    const s = this.#sym.iq_swiglu(this.#c, out.ptr, outDtype, gate.ptr, up.ptr, BigInt(count));
    this.#check(s, "swiglu");
  }

  add(out: Slice, a: Slice, b: Slice, count: number): void {
    positiveInts({ count });
    for (const [s, name] of [[out, "out"], [a, "a"], [b, "b"]] as const) {
      need(s, count * 4, `add ${name}`);
    }
    this.#check(this.#sym.iq_add(this.#c, out.ptr, a.ptr, b.ptr, BigInt(count)), "add");
  }

  /** Stores keys and values of n tokens in their caches, in one kernel (KvStoreArgs). */
  kvStore(a: KvStoreArgs): void {
    const { n, pos0, kvHeads, headDim, cap } = a;
    positiveInts({ n, kvHeads, headDim, cap });
    if (!Number.isSafeInteger(pos0) || pos0 < 0 || pos0 + n > cap) {
      throw new RangeError(
        `kv_store positions ${pos0}..${pos0 + n - 1} outside a ${cap}-token cache`,
      );
    }
    const cacheBytes = kvHeads * cap * headDim * elementBytes(a.cacheDtype);
    need(a.kCache, cacheBytes, "kv_store kCache");
    need(a.vCache, cacheBytes, "kv_store vCache");
    need(a.k, n * kvHeads * headDim * 4, "kv_store k");
    need(a.v, n * kvHeads * headDim * 4, "kv_store v");
    const s = this.#sym.iq_kv_store(
      this.#c,
      a.kCache.ptr,
      a.vCache.ptr,
      a.cacheDtype,
      a.k.ptr,
      a.v.ptr,
      n,
      pos0,
      kvHeads,
      headDim,
      cap,
    );
    this.#check(s, "kv_store");
  }

  #checkAttention(a: AttentionArgs, op: string): void {
    positiveInts({ n: a.n, heads: a.heads, kvHeads: a.kvHeads, headDim: a.headDim, cap: a.cap });
    if (a.heads % a.kvHeads) {
      throw new RangeError(`${op}: heads ${a.heads} not a multiple of kv_heads ${a.kvHeads}`);
    }
    if (!Number.isSafeInteger(a.pos0) || a.pos0 < 0 || a.pos0 + a.n > a.cap) {
      throw new RangeError(
        `${op}: positions ${a.pos0}..${a.pos0 + a.n - 1} outside a ${a.cap}-token cache`,
      );
    }
    const rows = a.n * a.heads * a.headDim * 4;
    need(a.out, rows, `${op} out`);
    need(a.q, rows, `${op} q`);
    const cacheBytes = a.kvHeads * a.cap * a.headDim * elementBytes(a.cacheDtype);
    need(a.kCache, cacheBytes, `${op} k cache`);
    need(a.vCache, cacheBytes, `${op} v cache`);
  }

  attentionPrefill(a: AttentionArgs): void {
    this.#checkAttention(a, "attention_prefill");
    const s = this.#sym.iq_attention_prefill(
      this.#c,
      a.out.ptr,
      a.q.ptr,
      a.kCache.ptr,
      a.vCache.ptr,
      a.cacheDtype,
      a.n,
      a.pos0,
      a.heads,
      a.kvHeads,
      a.headDim,
      a.cap,
      a.scale,
    );
    this.#check(s, "attention_prefill");
  }

  /** The decode step: one query (a.n must be 1) at position a.pos0. */
  attentionDecode(a: AttentionArgs): void {
    if (a.n !== 1) throw new RangeError(`attention_decode takes one query, got ${a.n}`);
    this.#checkAttention(a, "attention_decode");
    const s = this.#sym.iq_attention_decode(
      this.#c,
      a.out.ptr,
      a.q.ptr,
      a.kCache.ptr,
      a.vCache.ptr,
      a.cacheDtype,
      a.pos0,
      a.heads,
      a.kvHeads,
      a.headDim,
      a.cap,
      a.scale,
    );
    this.#check(s, "attention_decode");
  }

  /** Checks params (in C, which owns the layout) and returns the layer buffer's layout. */
  kvqLayout(params: KvqParams): KvqLayout {
    const packed = Int32Array.from(KVQ_FIELDS, (f) => {
      const v = params[f];
      if (!Number.isSafeInteger(v) || v < -(2 ** 31) || v >= 2 ** 31) {
        throw new RangeError(`kvq ${f} must be a 32-bit integer, got ${v}`);
      }
      return v;
    });
    const out = new BigUint64Array(KVQ_REGIONS.length + 1);
    this.#check(this.#sym.iq_kvq_layout(this.#c, packed, out), "kvq_layout");
    const offsets = Object.fromEntries(KVQ_REGIONS.map((r, i) => [r, Number(out[i])]));
    return {
      params: { ...params },
      packed,
      offsets: offsets as KvqLayout["offsets"],
      bytes: Number(out[KVQ_REGIONS.length]),
    };
  }

  #checkKvq(layout: KvqLayout, layer: Slice, n: number, pos0: number, op: string): void {
    positiveInts({ n });
    const { cap } = layout.params;
    if (!Number.isSafeInteger(pos0) || pos0 < 0 || pos0 + n > cap) {
      throw new RangeError(
        `${op}: positions ${pos0}..${pos0 + n - 1} outside a ${cap}-token cache`,
      );
    }
    need(layer, layout.bytes, `${op} layer`);
  }

  /** Stores k, v [n, kvHeads * headDim] at positions pos0 .. pos0 + n - 1 of a quantized layer. */
  kvqStore(layout: KvqLayout, layer: Slice, k: Slice, v: Slice, n: number, pos0: number): void {
    this.#checkKvq(layout, layer, n, pos0, "kvq_store");
    const { kvHeads, headDim, ring, recent } = layout.params;
    const most = ring - recent - kvqBlock(layout.params) + 1;
    if (n > most) throw new RangeError(`kvq_store: ${n} tokens, the ring takes at most ${most}`);
    need(k, n * kvHeads * headDim * 4, "kvq_store k");
    need(v, n * kvHeads * headDim * 4, "kvq_store v");
    const s = this.#sym.iq_kvq_store(this.#c, layout.packed, layer.ptr, k.ptr, v.ptr, n, pos0);
    this.#check(s, "kvq_store");
  }

  /** out[n, heads, headDim] = causal attention of q over a quantized layer. */
  kvqAttention(
    layout: KvqLayout,
    layer: Slice,
    out: Slice,
    q: Slice,
    n: number,
    pos0: number,
    heads: number,
    scale: number,
  ): void {
    this.#checkKvq(layout, layer, n, pos0, "kvq_attention");
    positiveInts({ heads });
    if (heads % layout.params.kvHeads) {
      throw new RangeError(
        `kvq_attention: heads ${heads} not a multiple of kv_heads ${layout.params.kvHeads}`,
      );
    }
    const rows = n * heads * layout.params.headDim * 4;
    need(out, rows, "kvq_attention out");
    need(q, rows, "kvq_attention q");
    const s = this.#sym.iq_kvq_attention(
      this.#c,
      layout.packed,
      layer.ptr,
      out.ptr,
      q.ptr,
      n,
      pos0,
      heads,
      scale,
    );
    this.#check(s, "kvq_attention");
  }

  /** k, v [kvHeads, len, headDim] fp32: what a query at position len - 1 sees (keys normalized). */
  kvqDequantize(layout: KvqLayout, layer: Slice, k: Slice, v: Slice, len: number): void {
    this.#checkKvq(layout, layer, len, 0, "kvq_dequantize");
    const bytes = layout.params.kvHeads * len * layout.params.headDim * 4;
    need(k, bytes, "kvq_dequantize k");
    need(v, bytes, "kvq_dequantize v");
    const s = this.#sym.iq_kvq_dequantize(this.#c, layout.packed, layer.ptr, k.ptr, v.ptr, len);
    this.#check(s, "kvq_dequantize");
  }

  sample(a: SamplingArgs): void {
    positiveInts({ vocab: a.vocab });
    need(a.outToken, 4, "sample out_token");
    need(a.logits, a.vocab * 4, "sample logits");
    if (a.nHistory > 0) {
      need(a.history ?? { ptr: null!, bytes: 0 }, a.nHistory * 4, "sample history");
    }
    if (!(a.uniform >= 0 && a.uniform < 1)) {
      throw new RangeError(`sample uniform must be in [0, 1), got ${a.uniform}`);
    }
    const s = this.#sym.iq_sample(
      this.#c,
      a.outToken.ptr,
      a.logits.ptr,
      a.vocab,
      a.history?.ptr ?? null,
      a.nHistory,
      a.repeatPenalty,
      a.temperature,
      a.topK,
      a.topP,
      a.minP,
      a.uniform,
    );
    this.#check(s, "sample");
  }

  /** A token id read back from sample's outToken, checked: a negative one is innerq.h's
   * -(4 * id + reason) for logits it could not sample (the CUDA backend's only report of them),
   * thrown as the NativeError the CPU backend's sample throws for the same logits. */
  sampledToken(token: number): number {
    if (token >= 0) return token;
    const id = Math.floor(-token / 4), reason = -token % 4;
    const why = reason === 1
      ? `logit ${id} is NaN`
      : reason === 2
      ? `the largest logit (id ${id}) is +inf`
      : reason === 3
      ? "every logit is -inf"
      : `token ${token} is not a failure innerq.h defines`;
    throw new NativeError(`${this.kind} sample: iq_sample: ${why}`);
  }

  /** Frees every live buffer, the context, then the library (the handle outlives every symbol). */
  close(): void {
    if (this.#closed) return;
    for (const buf of this.#live) this.#lib.symbols.iq_free(this.#ctx, buf.ptr);
    this.#live.clear();
    this.#lib.symbols.iq_ctx_destroy(this.#ctx);
    this.#closed = true;
    this.#lib.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
